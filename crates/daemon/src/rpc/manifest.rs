//! Manifest lists (experimental): create, annotate, inspect, push.

use crate::error;
use crate::rpc::registry::status;
use crate::state::State;
use isula_api::v1::{
    ManifestAnnotateRequest, ManifestCreateRequest, ManifestCreateResponse, ManifestInspectRequest,
    ManifestInspectResponse, ManifestPushRequest,
};
use isula_transport::Cancel;
use std::sync::Arc;
use tonic::Status;

fn need(what: &str, v: &str) -> Result<(), Status> {
    if v.trim().is_empty() {
        return Err(error::invalid(format!("{what} is required")));
    }
    Ok(())
}

pub fn create(state: &State, req: ManifestCreateRequest) -> Result<ManifestCreateResponse, Status> {
    need("the manifest list name", &req.manifest_list)?;
    let id = state
        .lists
        .create(&state.store, &req.manifest_list, &req.manifests)
        .map_err(status)?;
    Ok(ManifestCreateResponse {
        image_id: id.hex().to_string(),
    })
}

pub fn annotate(state: &State, req: ManifestAnnotateRequest) -> Result<(), Status> {
    need("the manifest list name", &req.manifest_list)?;
    need("the image", &req.manifest)?;
    if req.arch.is_empty()
        && req.os.is_empty()
        && req.os_features.is_empty()
        && req.variant.is_empty()
    {
        return Err(error::invalid(
            "nothing to annotate: give --arch, --os, --os-features or --variant",
        ));
    }
    state
        .lists
        .annotate(
            &state.store,
            &req.manifest_list,
            &req.manifest,
            &isula_registry::manifest_list::Annotation {
                arch: req.arch.clone(),
                os: req.os.clone(),
                os_features: req.os_features.clone(),
                variant: req.variant.clone(),
            },
        )
        .map_err(status)
}

pub fn inspect(
    state: &State,
    req: ManifestInspectRequest,
) -> Result<ManifestInspectResponse, Status> {
    need("the manifest list name", &req.manifest_list)?;
    let data = state
        .lists
        .inspect(&state.store, &req.manifest_list)
        .map_err(status)?;
    Ok(ManifestInspectResponse { data })
}

/// The layer compression of a list push (`--compression`, `--compression-level`, over the
/// daemon's `compression`), checked before anything goes up.
pub fn push_compression(
    req: &ManifestPushRequest,
    default: isula_types::compression::LayerCompression,
) -> Result<isula_types::compression::LayerCompression, Status> {
    isula_types::compression::LayerCompression::parse(
        &req.compression,
        req.compression_level,
        default,
    )
    .map_err(|e| error::invalid(e.to_string()))
}

pub fn push(
    state: &Arc<State>,
    req: ManifestPushRequest,
    compression: isula_types::compression::LayerCompression,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<isula_types::Digest, Status> {
    need("the manifest list name", &req.manifest_list)?;
    need("the destination", &req.dest)?;
    let digest = state
        .lists
        .push(
            &state.registry,
            &state.store,
            &req.manifest_list,
            &req.dest,
            compression,
            cancel,
            out,
        )
        .map_err(status)?;
    // "Push manifest list NAME succeed" is the client's line.
    tracing::info!(list = %req.manifest_list, dest = %req.dest, %digest, "manifest list pushed");
    Ok(digest)
}
