//! Load: every image of a docker-archive or oci-archive, or an app from separated images.

use crate::error;
use crate::rpc::absolute_path;
use crate::state::State;
use isula_api::v1::LoadRequest;
use isula_transport::separated::{self, LoadSpec};
use isula_transport::{load, Cancel, ClientFiles};
use std::sync::Arc;
use tonic::Status;

/// What a load request asks for, checked.
pub enum Job {
    Archive(std::path::PathBuf),
    Separated(LoadSpec),
}

pub fn validate(req: LoadRequest) -> Result<Job, Status> {
    match req.sep {
        Some(sep) if sep.enabled => {
            // The app name travels in both fields; `sep.app` wins.
            let app = if sep.app.is_empty() {
                req.path
            } else {
                sep.app
            };
            if app.is_empty() {
                return Err(error::invalid("app image name(-i) should not be empty"));
            }
            if sep.dir.is_empty() {
                return Err(error::invalid(
                    "image tarball directory should not be empty",
                ));
            }
            let optional =
                |what: &str, p: &str| (!p.is_empty()).then(|| absolute_path(what, p)).transpose();
            Ok(Job::Separated(LoadSpec {
                app,
                dir: absolute_path("the tarball directory (-d)", &sep.dir)?,
                base: optional("the base tarball (-b)", &sep.base)?,
                lib: optional("the lib tarball (-l)", &sep.lib)?,
                skip_check: sep.skip_check,
            }))
        }
        _ => Ok(Job::Archive(absolute_path("load input", &req.path)?)),
    }
}

pub fn load(
    state: &Arc<State>,
    files: &dyn ClientFiles,
    job: Job,
    cancel: &Cancel,
    out: &mut dyn FnMut(String),
) -> Result<(), Status> {
    match job {
        Job::Archive(path) => load::load(&state.store, files, &path, cancel, out),
        Job::Separated(spec) => separated::load(&state.store, files, &spec, cancel, out),
    }
    .map_err(error::transport)?;
    Ok(())
}
