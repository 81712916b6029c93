//! List: the rows of `ctr-img images` (one per name; `<none>` for an untagged image),
//! newest first, optionally filtered by a repository, reference or ID.

use crate::error;
use crate::state::State;
use isula_api::v1::list_response::ImageInfo;
use isula_api::v1::{ListRequest, ListResponse};
use isula_store::ImageRecord;
use isula_types::Reference;
use tonic::Status;

fn created(img: &ImageRecord) -> String {
    img.created
        .as_deref()
        .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_else(|| "<unknown>".into())
}

/// The image's config, if it can be read.
pub(crate) fn config(state: &State, img: &ImageRecord) -> Option<isula_types::image::ImageConfig> {
    let raw = state
        .store
        .content()
        .read_small(img.id.digest(), isula_types::limits::MANIFEST_MAX)
        .ok()?;
    serde_json::from_slice(&raw).ok()
}

/// The image's os/arch[/variant], from its config ("" if it cannot be read).
pub(crate) fn platform(state: &State, img: &ImageRecord) -> String {
    let Some(c) = config(state, img) else {
        return String::new();
    };
    isula_types::image::platform_string(&c.os, &c.architecture, c.variant.as_deref())
}

/// The local manifest lists each image is an entry of (their names stand for it on its
/// platform: see `local_index`).
fn listed_names(state: &State) -> std::collections::HashMap<isula_types::ImageId, Vec<String>> {
    let mut out: std::collections::HashMap<_, Vec<String>> = Default::default();
    for name in state.lists.names().unwrap_or_default() {
        for m in state.lists.members(&name).unwrap_or_default() {
            out.entry(m.image).or_default().push(name.clone());
        }
    }
    out
}

fn rows(
    state: &State,
    img: &ImageRecord,
    lists: &std::collections::HashMap<isula_types::ImageId, Vec<String>>,
    keep: &dyn Fn(&Reference) -> bool,
) -> Vec<ImageInfo> {
    let platform = platform(state, img);
    let row = |repo: String, tag: String| ImageInfo {
        repository: repo,
        tag,
        // The full ID (the wire contract); clients show 12 characters.
        id: img.id.hex().to_string(),
        created: created(img),
        size: isula_types::human_size(img.size),
        platform: platform.clone(),
    };
    let listed = lists.get(&img.id).map(Vec::as_slice).unwrap_or_default();
    let named: Vec<ImageInfo> = img
        .names
        .iter()
        .chain(listed)
        .filter_map(|n| Reference::parse(n).ok())
        .filter(|r| keep(r))
        .map(|r| row(r.familiar_name(), r.tag().unwrap_or("<none>").to_string()))
        .collect();
    if img.names.is_empty() && listed.is_empty() {
        vec![row("<none>".into(), "<none>".into())]
    } else {
        named
    }
}

pub fn list(state: &State, req: ListRequest) -> Result<ListResponse, Status> {
    let mut images = state.store.images();
    images.sort_by(|a, b| {
        b.created
            .cmp(&a.created)
            .then_with(|| a.names.cmp(&b.names))
    });
    let filter = req.image_name.trim();
    let lists = listed_names(state);
    let mut out = Vec::new();
    if filter.is_empty() {
        for img in &images {
            out.extend(rows(state, img, &lists, &|_| true));
        }
        return Ok(ListResponse { images: out });
    }
    // A repository (all its tags) or a reference with an explicit tag.
    if let Ok(want) = Reference::parse(filter) {
        let explicit_tag = filter
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'));
        for img in &images {
            out.extend(
                rows(state, img, &lists, &|r| {
                    r.name() == want.name() && (!explicit_tag || r.tag() == want.tag())
                })
                .into_iter()
                .filter(|row| row.repository != "<none>"),
            );
        }
    }
    if out.is_empty() {
        // An image ID or ID prefix.
        match state.store.resolve(filter) {
            Ok(img) => out.extend(rows(state, &img, &lists, &|_| true)),
            Err(isula_store::StoreError::ImageNotFound(_)) => {
                return Err(Status::not_found(format!("no such image: {filter}")))
            }
            Err(e) => return Err(error::store(e)),
        }
    }
    Ok(ListResponse { images: out })
}
