//! Remove: `ctr-img rm` by name, ID or ID prefix, `-a` (all) or `-p` (untagged only). One
//! bad name does not stop the others; the stream ends with an error if any failed.

use crate::error;
use crate::state::State;
use isula_api::v1::RemoveRequest;
use isula_store::RemoveEvent;
use isula_transport::Cancel;
use std::sync::Arc;
use tonic::Status;

pub fn remove(
    state: &Arc<State>,
    req: RemoveRequest,
    _cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    let targets: Vec<String> = if req.all || req.prune {
        if !req.image_id.is_empty() {
            return Err(error::invalid(
                "image names cannot be given with --all or --prune",
            ));
        }
        state
            .store
            .images()
            .into_iter()
            .filter(|i| req.all || i.names.is_empty())
            .map(|i| i.id.to_string())
            .collect()
    } else if req.image_id.is_empty() {
        return Err(error::invalid(
            "remove needs at least one image, or --all or --prune",
        ));
    } else {
        req.image_id.clone()
    };
    let mut failed = 0;
    for name in &targets {
        match state.store.remove(name) {
            Ok(events) => {
                for e in events {
                    out(match e {
                        RemoveEvent::Untagged(n) => format!("Untagged: {n}\n"),
                        RemoveEvent::Deleted(id) => format!("Deleted: {id}\n"),
                    });
                }
            }
            Err(e) => {
                failed += 1;
                out(format!("Failed to remove image {name}: {e}\n"));
            }
        }
    }
    if failed > 0 {
        return Err(Status::failed_precondition(format!(
            "failed to remove {failed} of {} image(s)",
            targets.len()
        )));
    }
    Ok(())
}
