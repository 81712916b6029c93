//! Import: a rootfs tarball becomes a one-layer image.

use crate::error;
use crate::rpc::absolute_path;
use crate::state::State;
use isula_api::v1::ImportRequest;
use isula_transport::{import, Cancel, ClientFiles};
use isula_types::Reference;
use std::sync::Arc;
use tonic::Status;

/// Checks the request before any work starts.
pub fn validate(req: &ImportRequest) -> Result<(std::path::PathBuf, Option<Reference>), Status> {
    let source = absolute_path("import source", &req.source)?;
    let reference = match req.reference.trim() {
        "" => None,
        r => Some(Reference::parse(r).map_err(|e| error::invalid(e.to_string()))?),
    };
    Ok((source, reference))
}

pub fn import(
    state: &Arc<State>,
    files: &dyn ClientFiles,
    source: std::path::PathBuf,
    reference: Option<Reference>,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    import::import(
        &state.store,
        files,
        &source,
        reference.as_ref(),
        cancel,
        out,
    )
    .map_err(error::transport)?;
    Ok(())
}
