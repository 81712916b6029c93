//! One name for many platforms, as containerd's image store has it: pulling or building
//! another platform of a name adds that image under the name instead of taking the name
//! from the other platform's image. The name then becomes a local manifest list
//! (`state.lists`, what a build for several platforms makes) over one image per platform,
//! which no longer hold the name themselves; FROM, `images`, `save --platform`, `push`
//! (the whole list, or `--platform`), `rm` and `rm -p` read it so.

use crate::state::State;
use isula_registry::error::RegistryError;
use isula_store::ImageRecord;
use isula_types::platform::BuildPlatform;
use isula_types::{media, ImageId, Reference};
use std::sync::{Arc, Mutex};

/// The lock that orders changes to what the full name `full` stands for (pulls of several
/// platforms of one name, at once, for the stages of a multi-platform build).
pub fn name_lock(state: &State, full: &str) -> Arc<Mutex<()>> {
    let mut pulls = state.pulls.lock().unwrap_or_else(|p| p.into_inner());
    pulls.entry(format!("name {full}")).or_default().clone()
}

/// The image's platform as its config gives it (None when the config has no
/// architecture: it fits any platform).
pub fn platform_of(state: &State, img: &ImageRecord) -> Option<(String, String, Option<String>)> {
    let c = crate::rpc::list::config(state, img)?;
    (!c.architecture.is_empty()).then_some((c.os, c.architecture, c.variant))
}

/// Whether `img` is for `platform` (an image that says no architecture fits any).
pub fn fits(state: &State, img: &ImageRecord, platform: &BuildPlatform) -> bool {
    platform_of(state, img)
        .is_none_or(|(os, arch, variant)| platform.matches(&os, &arch, variant.as_deref()))
}

fn same_platform(state: &State, a: &ImageRecord, b: &ImageRecord) -> bool {
    match (platform_of(state, a), platform_of(state, b)) {
        (Some((os, arch, variant)), Some(_)) => {
            let text = isula_types::image::platform_string(&os, &arch, variant.as_deref());
            BuildPlatform::parse(&text).is_ok_and(|p| fits(state, b, &p))
        }
        // One of them fits any platform: it replaces, as a name always did.
        _ => true,
    }
}

/// The images holding each full name `names` stand for now (what [`adopt`] is told after
/// an operation that may give one of them to another image).
pub fn holders(state: &State, names: &[Reference]) -> Vec<(String, ImageId)> {
    names
        .iter()
        .filter_map(|r| {
            let full = r.to_string();
            state.store.image_named(&full).map(|i| (full, i.id))
        })
        .collect()
}

/// After image `new` took the full name `full` (a pull, a build's tag): when the name
/// stood for an image of another platform (`before`, the holder before the operation) or
/// is a local list already, the name becomes (or stays) a local list with `new` as its
/// entry for its platform, the entries of other platforms kept. Returns whether it did.
pub fn adopt(
    state: &State,
    full: &str,
    new: &ImageId,
    before: Option<&ImageId>,
) -> Result<bool, RegistryError> {
    let lock = name_lock(state, full);
    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
    let store = &state.store;
    let new_rec = store.image(new)?;
    let mut members: Vec<ImageRecord> = Vec::new();
    if state.lists.exists(full) {
        for m in state.lists.members(full)? {
            // An image removed behind the list's back is dropped from it.
            if let Ok(rec) = store.image(&m.image) {
                members.push(rec);
            }
        }
    } else {
        match before.filter(|b| *b != new).map(|b| store.image(b)) {
            Some(Ok(prev)) if !same_platform(state, &prev, &new_rec) => members.push(prev),
            _ => return Ok(false),
        }
    }
    let mut ids: Vec<String> = members
        .iter()
        .filter(|m| m.id != *new && !same_platform(state, m, &new_rec))
        .map(|m| m.id.hex().to_string())
        .collect();
    ids.push(new.hex().to_string());
    let oci = members
        .iter()
        .chain([&new_rec])
        .any(|m| m.manifest_media_type == media::OCI_MANIFEST);
    state.lists.replace(store, full, &ids, oci)?;
    // The list holds the name now: no image does (else the name would say two things).
    for id in members.iter().map(|m| &m.id).chain([new]) {
        store.untag(id, full)?;
    }
    tracing::info!(name = %full, images = ids.len(), "name stands for several platforms");
    Ok(true)
}
