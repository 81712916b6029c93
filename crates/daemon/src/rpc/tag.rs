//! Tag: adds a name to an image (the name moves if another image had it).

use crate::error;
use crate::state::State;
use isula_api::v1::TagRequest;
use isula_types::Reference;
use tonic::Status;

pub fn tag(state: &State, req: TagRequest) -> Result<(), Status> {
    // Refuse a bad name before touching anything.
    let name = Reference::parse(req.tag.trim()).map_err(|e| error::invalid(e.to_string()))?;
    if name.digest().is_some() {
        return Err(error::invalid(format!(
            "cannot tag with a digest reference {:?}",
            req.tag
        )));
    }
    let img = state
        .store
        .resolve(req.image.trim())
        .map_err(error::store)?;
    state.store.tag(&img.id, &name).map_err(error::store)
}
