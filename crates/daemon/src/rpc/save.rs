//! Save: images to a docker-archive (several) or an oci-archive (one), or as separated
//! images (base, lib and app tarballs plus an index; see `isula_transport::separated`).

use crate::error;
use crate::rpc::absolute_path;
use crate::state::State;
use isula_api::v1::SaveRequest;
use isula_transport::save::{self, Format};
use isula_transport::separated::{self, SaveSpec};
use isula_transport::{Cancel, ClientFiles};
use std::sync::Arc;
use tonic::Status;

/// What a save request asks for, checked.
pub enum Job {
    Archive {
        images: Vec<String>,
        path: std::path::PathBuf,
        format: Format,
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
            Ok(Job::Archive {
                images: req.images,
                path: absolute_path("save output", &req.path)?,
                format,
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
        } => save::save(&state.store, files, &images, &path, format, cancel, out),
        Job::Separated(spec) => separated::save(&state.store, files, &spec, cancel, out),
    }
    .map_err(error::transport)
}
