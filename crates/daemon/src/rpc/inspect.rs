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
    let img = store.resolve(req.image.trim()).map_err(error::store)?;
    let config = store
        .content()
        .read_small(img.id.digest(), limits::MANIFEST_MAX)
        .map_err(error::store)?;
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
    })
}
