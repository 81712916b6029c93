//! Load: every image of a docker-archive or oci-archive.

use crate::error;
use crate::rpc::absolute_path;
use crate::state::State;
use isula_api::v1::LoadRequest;
use isula_transport::{load, Cancel, ClientFiles};
use std::sync::Arc;
use tonic::Status;

pub fn validate(req: &LoadRequest) -> Result<std::path::PathBuf, Status> {
    if req.sep.as_ref().is_some_and(|s| s.enabled) {
        return Err(Status::unimplemented(
            "loading separated images is not supported",
        ));
    }
    absolute_path("load input", &req.path)
}

pub fn load(
    state: &Arc<State>,
    files: &dyn ClientFiles,
    path: std::path::PathBuf,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    load::load(&state.store, files, &path, cancel, out).map_err(error::transport)?;
    Ok(())
}
