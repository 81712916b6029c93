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
    // The name has moved to `new`; nothing keeps the image it left yet.
    isula_store::failpoint::hit("local-index.name-moved");
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
    isula_store::failpoint::hit("local-index.list-written");
    // The list holds the name now: no image does (else the name would say two things).
    for id in members.iter().map(|m| &m.id).chain([new]) {
        store.untag(id, full)?;
    }
    tracing::info!(name = %full, images = ids.len(), "name stands for several platforms");
    Ok(true)
}

/// Durable notes of the names an operation may take from an image of another platform
/// (a pull, a build's tags, `tag`), written before the name moves and removed when the
/// operation ends (on [`Drop`]). The name moves to the new image in one store write and
/// the list that keeps the old image under it is written after: a daemon stopped between
/// the two (a power cut, a kill) would leave the old platform untagged, and `rm -p` would
/// then remove it. [`recover`] finishes such a move when the daemon starts again.
pub struct NameMoves {
    paths: Vec<std::path::PathBuf>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct NameMove {
    name: String,
    /// The image holding the name before the operation; none when a local list held it.
    image: Option<String>,
    /// The name goes to a local list (`tag LIST NAME`): the image gives it up.
    #[serde(default)]
    to_list: bool,
}

fn moves_dir(state: &State) -> std::path::PathBuf {
    state.settings.data_root.join("name-moves")
}

/// Notes (durably) that the full names `names` may move away from what holds them now: an
/// image, or a local list (an image of another platform joins it after taking the name).
pub fn note_moves(state: &State, names: &[String]) -> Result<NameMoves, isula_store::StoreError> {
    let held: Vec<(String, Option<ImageId>)> = names
        .iter()
        .filter_map(|n| match state.store.image_named(n) {
            Some(img) => Some((n.clone(), Some(img.id))),
            None => state.lists.exists(n).then(|| (n.clone(), None)),
        })
        .collect();
    note(state, &held, false)
}

/// [`note_moves`] for giving the full name `full` to the image `new` (`tag`): nothing to note
/// when the image holding it is `new` or of its platform (the name then simply moves, in
/// one store write), so retagging within a platform costs no sync.
pub fn note_move_to(
    state: &State,
    full: &str,
    new: &ImageRecord,
) -> Result<NameMoves, isula_store::StoreError> {
    match state.store.image_named(full) {
        Some(held) if held.id == new.id || same_platform(state, &held, new) => {
            Ok(NameMoves { paths: Vec::new() })
        }
        _ => note_moves(state, &[full.to_string()]),
    }
}

/// Notes (durably) that the full names of `before` go from the images holding them to a
/// local list (`tag LIST NAME`): the list is written first, then the image gives the name
/// up, and [`recover`] finishes that.
pub fn note_moves_to_list(
    state: &State,
    before: &[(String, ImageId)],
) -> Result<NameMoves, isula_store::StoreError> {
    let held: Vec<(String, Option<ImageId>)> = before
        .iter()
        .map(|(n, id)| (n.clone(), Some(id.clone())))
        .collect();
    note(state, &held, true)
}

fn note(
    state: &State,
    before: &[(String, Option<ImageId>)],
    to_list: bool,
) -> Result<NameMoves, isula_store::StoreError> {
    let mut moves = NameMoves { paths: Vec::new() };
    if before.is_empty() {
        return Ok(moves);
    }
    let dir = moves_dir(state);
    std::fs::create_dir_all(&dir).map_err(|e| isula_store::StoreError::io("create", &dir, e))?;
    for (name, image) in before {
        let path = dir.join(format!(
            "{}-{:016x}.json",
            isula_types::Digest::of_bytes(name.as_bytes()).hex(),
            rand::random::<u64>()
        ));
        let note = NameMove {
            name: name.clone(),
            image: image.as_ref().map(|i| i.hex().to_string()),
            to_list,
        };
        let body = serde_json::to_vec(&note)
            .map_err(|e| isula_store::StoreError::io("encode", &path, e.into()))?;
        isula_store::metadata::write_atomic(&path, &body)?;
        moves.paths.push(path);
    }
    Ok(moves)
}

impl Drop for NameMoves {
    fn drop(&mut self) {
        let Some(dir) = self
            .paths
            .first()
            .and_then(|p| p.parent())
            .map(|d| d.to_path_buf())
        else {
            return;
        };
        for p in self.paths.drain(..) {
            if let Err(e) = std::fs::remove_file(&p) {
                tracing::warn!(path = %p.display(), error = %e, "removing a name-move note");
            }
        }
        // Durable, so that a later start does not finish a move from an older state.
        if let Err(e) = isula_sys::fsync_dir(&dir) {
            tracing::warn!(error = %e, "syncing the name-move notes");
        }
    }
}

/// On start: finishes the name moves a stopped daemon left half done. An image that took
/// a noted name from an image of another platform joins it under the name (a local list);
/// an image that took a noted list's name joins the list; an image noted as giving its
/// name to a list gives it up. Returns how many names it mended.
pub fn recover(state: &State) -> usize {
    let mut mended = 0;
    let dir = moves_dir(state);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e.flatten().map(|e| e.path()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "reading the name-move notes");
            Vec::new()
        }
    };
    for path in entries {
        if path.extension().is_some_and(|x| x == "json") {
            match finish_move(state, &path) {
                Ok(true) => mended += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(note = %path.display(), error = %e, "finishing a name move")
                }
            }
        }
        // A note that did not parse was never complete (notes are written atomically).
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(note = %path.display(), error = %e, "removing a name-move note");
        }
    }
    if mended > 0 {
        tracing::warn!(
            names = mended,
            "finished name moves an earlier daemon left half done"
        );
    }
    let _ = isula_sys::fsync_dir(&dir);
    mended
}

fn finish_move(state: &State, path: &std::path::Path) -> Result<bool, RegistryError> {
    let Ok(note) = serde_json::from_slice::<NameMove>(
        &std::fs::read(path).map_err(|e| RegistryError::Config(e.to_string()))?,
    ) else {
        return Ok(false);
    };
    // Still where it was (the operation stopped before the name moved), or gone.
    let Some(holder) = state.store.image_named(&note.name) else {
        return Ok(false);
    };
    let Some(image) = &note.image else {
        // A list held the name and an image took it: the image joins the list.
        if state.lists.exists(&note.name) {
            return adopt(state, &note.name, &holder.id, None);
        }
        return Ok(false);
    };
    let Ok(prev) = isula_types::Digest::parse(&format!("sha256:{image}")).map(ImageId) else {
        return Ok(false);
    };
    if note.to_list {
        // The list was written and the image still holds the name: it gives it up.
        if holder.id == prev && state.lists.exists(&note.name) {
            state.store.untag(&prev, &note.name)?;
            return Ok(true);
        }
        return Ok(false);
    }
    if holder.id == prev || state.store.image(&prev).is_err() {
        return Ok(false);
    }
    adopt(state, &note.name, &holder.id, Some(&prev))
}
