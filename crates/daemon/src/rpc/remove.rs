//! Remove: `ctr-img rm` by name, ID or ID prefix, `-a` (all) or `-p` (untagged only). One
//! bad name does not stop the others; the stream ends with an error if any failed.

use crate::error;
use crate::state::State;
use isula_api::v1::RemoveRequest;
use isula_store::{RemoveEvent, StoreError};
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
            .map(|i| i.id.hex().to_string())
            .collect()
    } else if req.image_id.is_empty() {
        return Err(error::invalid(
            "remove needs at least one image, or --all or --prune",
        ));
    } else {
        req.image_id.clone()
    };
    // The lines are isula-build's, without a newline: its client adds one to each.
    let mut failed = false;
    for name in &targets {
        match state.store.remove(name) {
            Ok(events) => {
                for e in events {
                    out(match e {
                        RemoveEvent::Untagged(n) => format!("Untagged image: {n}"),
                        RemoveEvent::DeletedLayer(c) => {
                            format!("Deleted layer: sha256:{}", c.hex())
                        }
                        RemoveEvent::Deleted { name, .. } => format!("Deleted image: {name}"),
                    });
                }
            }
            Err(e) => {
                failed = true;
                out(match e {
                    StoreError::ImageNotFound(_) => format!(
                        "Find local image {name:?} failed: image {name:?} not found in local store"
                    ),
                    StoreError::AmbiguousImage { .. } => {
                        format!("Find local image {name:?} failed: {e}")
                    }
                    e => format!("Remove image {name:?} failed: {e}"),
                });
            }
        }
    }
    if failed {
        return Err(Status::failed_precondition(
            "remove one or more images failed",
        ));
    }
    Ok(())
}
