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
    let source = req.image.trim();
    let img = match state.store.resolve(source) {
        Ok(img) => img,
        // A name standing for several platforms: the new name stands for them too.
        Err(isula_store::StoreError::ImageNotFound(_)) if state.lists.exists(source) => {
            let members = state
                .lists
                .members(source)
                .map_err(crate::rpc::registry::status)?;
            let ids: Vec<String> = members.iter().map(|m| m.image.hex().to_string()).collect();
            let oci = state
                .lists
                .is_oci(source)
                .map_err(crate::rpc::registry::status)?;
            let full = name.to_string();
            // An image holding the new name gives it up to the list, once the list is
            // written (noted first: a daemon stopped in between finishes it on start).
            let holder = state.store.image_named(&full).map(|h| h.id);
            let held: Vec<(String, isula_types::ImageId)> =
                holder.iter().map(|h| (full.clone(), h.clone())).collect();
            let _moves =
                crate::rpc::local_index::note_moves_to_list(state, &held).map_err(error::store)?;
            state
                .lists
                .replace(&state.store, &full, &ids, oci)
                .map_err(crate::rpc::registry::status)?;
            isula_store::failpoint::hit("tag.list-written");
            if let Some(h) = holder {
                state.store.untag(&h, &full).map_err(error::store)?;
            }
            return Ok(());
        }
        Err(e) => return Err(error::store(e)),
    };
    let full = name.to_string();
    let before = state.store.image_named(&full).map(|i| i.id);
    let _moves = crate::rpc::local_index::note_move_to(state, &full, &img).map_err(error::store)?;
    state.store.tag(&img.id, &name).map_err(error::store)?;
    // Tagging another platform's image with a name of one: it joins the name's platforms.
    crate::rpc::local_index::adopt(state, &full, &img.id, before.as_ref())
        .map_err(crate::rpc::registry::status)?;
    Ok(())
}
