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
        // `-p` keeps the untagged images a manifest list names (a build for several
        // platforms makes them so); `-a` removes the lists too.
        let listed = if req.all {
            Default::default()
        } else {
            state
                .lists
                .named_images()
                .map_err(crate::rpc::registry::status)?
        };
        state
            .store
            .images()
            .into_iter()
            .filter(|i| req.all || (i.names.is_empty() && !listed.contains(&i.id)))
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
    if req.all {
        for name in state.lists.names().map_err(crate::rpc::registry::status)? {
            failed |= !remove_list(state, &isula_store::familiar(&name), false, out);
        }
    }
    for name in &targets {
        let removed = state.store.remove(name);
        if matches!(removed, Err(StoreError::ImageNotFound(_))) && state.lists.exists(name) {
            failed |= !remove_list(state, name, true, out);
            continue;
        }
        match removed {
            Ok(events) => report(events, out),
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

fn report(events: Vec<RemoveEvent>, out: &mut dyn FnMut(String)) {
    for e in events {
        out(match e {
            RemoveEvent::Untagged(n) => format!("Untagged image: {n}"),
            RemoveEvent::DeletedLayer(c) => format!("Deleted layer: sha256:{}", c.hex()),
            RemoveEvent::Deleted { name, .. } => format!("Deleted image: {name}"),
        });
    }
}

/// Removes the manifest list `name`; with `images`, also the images it named that have no
/// name of their own and no other list names. Returns whether all went well.
fn remove_list(state: &State, name: &str, images: bool, out: &mut dyn FnMut(String)) -> bool {
    let members = match state.lists.remove(name) {
        Ok(m) => m,
        Err(e) => {
            out(format!("Remove manifest list {name:?} failed: {e}"));
            return false;
        }
    };
    out(format!("Deleted manifest list: {name}"));
    if !images {
        return true;
    }
    let listed = match state.lists.named_images() {
        Ok(l) => l,
        Err(e) => {
            out(format!(
                "Remove the images of manifest list {name:?} failed: {e}"
            ));
            return false;
        }
    };
    let mut ok = true;
    for id in members {
        let unnamed = state
            .store
            .image(&id)
            .is_ok_and(|i| i.names.is_empty() && !listed.contains(&i.id));
        if !unnamed {
            continue;
        }
        match state.store.remove(id.hex()) {
            Ok(events) => report(events, out),
            // Removed meanwhile by someone else: nothing left to do.
            Err(StoreError::ImageNotFound(_)) => {}
            Err(e) => {
                ok = false;
                out(format!("Remove image {:?} failed: {e}", id.hex()));
            }
        }
    }
    ok
}
