//! ImageInspect (ours): one image's config and manifest, verbatim, for `ctr-img inspect`
//! and `ctr-img history`.

use crate::error;
use crate::state::State;
use isula_api::v1::{ImageInspectRequest, ImageInspectResponse};
use isula_types::limits;
use tonic::Status;

pub fn inspect(state: &State, req: ImageInspectRequest) -> Result<ImageInspectResponse, Status> {
    if req.image.trim().is_empty() {
        return Err(error::invalid("inspect needs an image"));
    }
    let store = &state.store;
    let name = req.image.trim();
    let img = match store.resolve(name) {
        Ok(img) => img,
        // A name standing for several platforms: this machine's image, as containerd
        // picks one.
        Err(isula_store::StoreError::ImageNotFound(_)) if state.lists.exists(name) => {
            let host = isula_types::platform::BuildPlatform::host();
            let id = state
                .lists
                .image_for(name, &host)
                .map_err(crate::rpc::registry::status)?
                .ok_or_else(|| Status::not_found(format!("no image {name}")))?;
            store.image(&id).map_err(error::store)?
        }
        Err(e) => return Err(error::store(e)),
    };
    let config = store
        .content()
        .read_small(img.id.digest(), limits::MANIFEST_MAX)
        .map_err(error::store)?;
    // supply chain: `inspect --sbom|--provenance` prints the attestation, not the image.
    let predicate = if req.predicate_type.is_empty() {
        Vec::new()
    } else {
        let found = store
            .attestations(&img.id)
            .into_iter()
            .find(|a| a.predicate_type == req.predicate_type)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "image {name} has no {} attestation (build it with --sbom or --provenance, \
                     or pull it from a registry that has its attestations)",
                    req.predicate_type
                ))
            })?;
        store
            .content()
            .read_small(&found.blob, isula_attest::PREDICATE_MAX)
            .map_err(error::store)?
    };
    let manifest = store
        .content()
        .read_small(&img.manifest, limits::MANIFEST_MAX)
        .map_err(error::store)?;
    let layer_sizes = img
        .layers
        .iter()
        .map(|c| store.layer(c).map(|l| l.size as i64))
        .collect::<Result<Vec<_>, _>>()
        .map_err(error::store)?;
    Ok(ImageInspectResponse {
        id: img.id.hex().to_string(),
        names: img.names.iter().map(|n| isula_store::familiar(n)).collect(),
        config,
        manifest,
        manifest_media_type: img.manifest_media_type.clone(),
        layer_sizes,
        predicate,
    })
}
