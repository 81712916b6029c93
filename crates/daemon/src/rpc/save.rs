//! Save: images to a docker-archive (several) or an oci-archive (one), or as separated
//! images (base, lib and app tarballs plus an index; see `isula_transport::separated`).

use crate::error;
use crate::rpc::absolute_path;
use crate::state::State;
use isula_api::v1::SaveRequest;
use isula_store::ImageRecord;
use isula_transport::save::{self, Format};
use isula_transport::separated::{self, SaveSpec};
use isula_transport::{Cancel, ClientFiles};
use isula_types::platform::BuildPlatform;
use isula_types::Reference;
use std::sync::Arc;
use tonic::Status;

/// What a save request asks for, checked.
pub enum Job {
    Archive {
        images: Vec<String>,
        path: std::path::PathBuf,
        format: Format,
        /// `--platform`: the entry of a manifest list to save, or the platform an image
        /// must be for.
        platform: Option<BuildPlatform>,
    },
    Separated(SaveSpec),
}

pub fn validate(req: SaveRequest) -> Result<Job, Status> {
    if req.images.is_empty() {
        return Err(error::invalid("save accepts at least one image"));
    }
    match req.sep {
        Some(sep) if sep.enabled => {
            if sep.base.is_empty() {
                return Err(error::invalid("base image name(-b) must be provided"));
            }
            let rename = (!sep.rename.is_empty())
                .then(|| absolute_path("the rename file (-r)", &sep.rename))
                .transpose()?;
            Ok(Job::Separated(SaveSpec {
                apps: req.images,
                base: sep.base,
                lib: (!sep.lib.is_empty()).then_some(sep.lib),
                rename,
                dest: absolute_path("the destination directory (-d)", &sep.dest)?,
            }))
        }
        _ => {
            let format = Format::parse(&req.format).map_err(error::transport)?;
            let platform = (!req.platform.is_empty())
                .then(|| BuildPlatform::parse(&req.platform))
                .transpose()
                .map_err(|e| error::invalid(format!("--platform: {e}")))?;
            Ok(Job::Archive {
                images: req.images,
                path: absolute_path("save output", &req.path)?,
                format,
                platform,
            })
        }
    }
}

pub fn save(
    state: &Arc<State>,
    files: &dyn ClientFiles,
    job: Job,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    match job {
        Job::Archive {
            images,
            path,
            format,
            platform,
        } => {
            // A manifest list saved whole: an oci-archive with its index.
            if let [name] = images.as_slice() {
                if platform.is_none() && format == Format::Oci && is_list(state, name) {
                    let members = state
                        .lists
                        .members(name)
                        .map_err(crate::rpc::registry::status)?;
                    let mut records = Vec::new();
                    for m in members {
                        let rec = state.store.image(&m.image).map_err(|_| {
                            Status::not_found(format!(
                                "image {} of manifest list {name} is not in the local store",
                                m.image.hex()
                            ))
                        })?;
                        records.push((rec, m.platform));
                    }
                    let r = Reference::parse(name).map_err(|e| error::invalid(e.to_string()))?;
                    return save::save_index(
                        &state.store,
                        files,
                        &records,
                        Some(&r),
                        &path,
                        cancel,
                        out,
                    )
                    .map_err(error::transport);
                }
            }
            let mut items = Vec::new();
            for name in &images {
                let (image, tag) = resolve(state, name, platform.as_ref())?;
                save::add_item(&mut items, image, tag);
            }
            save::save_items(&state.store, files, items, &path, format, cancel, out)
                .map_err(error::transport)
        }
        Job::Separated(spec) => {
            separated::save(&state.store, files, &spec, cancel, out).map_err(error::transport)
        }
    }
}

/// Whether `name` names a manifest list and no image.
fn is_list(state: &State, name: &str) -> bool {
    matches!(
        state.store.resolve(name),
        Err(isula_store::StoreError::ImageNotFound(_))
    ) && state.lists.exists(name)
}

/// The image `name` stands for, and the tag to save it under: an image (of `platform` if
/// given), or the entry for `platform` of the manifest list `name`.
fn resolve(
    state: &State,
    name: &str,
    platform: Option<&BuildPlatform>,
) -> Result<(ImageRecord, Option<Reference>), Status> {
    let image = match state.store.resolve(name) {
        Ok(image) => image,
        Err(isula_store::StoreError::ImageNotFound(_)) if state.lists.exists(name) => {
            return list_entry(state, name, platform)
        }
        Err(e) => return Err(error::transport(e.into())),
    };
    if let Some(p) = platform {
        let config = crate::rpc::list::config(state, &image);
        let fits = config
            .as_ref()
            .is_some_and(|c| p.matches(&c.os, &c.architecture, c.variant.as_deref()));
        if !fits {
            return Err(error::invalid(format!(
                "image {name} is for {}, not {p}",
                crate::rpc::list::platform(state, &image)
            )));
        }
    }
    let tag = Reference::parse(name)
        .ok()
        .filter(|r| image.names.contains(&r.to_string()));
    Ok((image, tag))
}

/// The entry for `platform` of the manifest list `name`, saved under the list's name.
fn list_entry(
    state: &State,
    name: &str,
    platform: Option<&BuildPlatform>,
) -> Result<(ImageRecord, Option<Reference>), Status> {
    let Some(p) = platform else {
        let members = state
            .lists
            .members(name)
            .map_err(crate::rpc::registry::status)?;
        let platforms: Vec<String> = members
            .iter()
            .map(|m| isula_registry::manifest_list::platform_text(&m.platform))
            .collect();
        return Err(error::invalid(format!(
            "{name} is a manifest list of {} images ({}): save one with --platform, or the whole list with -f oci",
            members.len(),
            platforms.join(", ")
        )));
    };
    let id = state
        .lists
        .image_for(name, p)
        .map_err(crate::rpc::registry::status)?
        .ok_or_else(|| Status::not_found(format!("manifest list {name} not found")))?;
    let image = state.store.image(&id).map_err(|_| {
        Status::not_found(format!(
            "the {p} image of manifest list {name} is not in the local store"
        ))
    })?;
    let tag = Reference::parse(name).ok();
    Ok((image, tag))
}
