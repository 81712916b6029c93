//! Save: images to a docker-archive (several) or an oci-archive (one).

use crate::error;
use crate::rpc::absolute_path;
use crate::state::State;
use isula_api::v1::SaveRequest;
use isula_transport::save::{self, Format};
use isula_transport::{Cancel, ClientFiles};
use std::sync::Arc;
use tonic::Status;

pub fn validate(req: &SaveRequest) -> Result<(std::path::PathBuf, Format), Status> {
    if req.sep.as_ref().is_some_and(|s| s.enabled) {
        return Err(Status::unimplemented(
            "saving separated images is not supported",
        ));
    }
    if req.images.is_empty() {
        return Err(error::invalid("save needs at least one image"));
    }
    let format = Format::parse(&req.format).map_err(error::transport)?;
    Ok((absolute_path("save output", &req.path)?, format))
}

pub fn save(
    state: &Arc<State>,
    files: &dyn ClientFiles,
    images: Vec<String>,
    path: std::path::PathBuf,
    format: Format,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    save::save(&state.store, files, &images, &path, format, cancel, out).map_err(error::transport)
}
