//! `-o isulad:IMAGE:TAG`: writes a docker-archive to `/var/tmp/isula-build-tmp-<id>.tar`
//! (the manual's staging file) and has iSulad load it with `isula load -i`. The staging file
//! is removed whatever happens.

use crate::save::SaveItem;
use crate::{docker_archive, Cancel, Result, TransportError};
use isula_store::Store;
use isula_types::Reference;
use std::path::{Path, PathBuf};

pub const STAGING_DIR: &str = "/var/tmp";

struct Remove(PathBuf);

impl Drop for Remove {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Loads the store image `id` into iSulad as `name`; returns what `isula load` printed.
pub fn load_into_isulad(
    store: &Store,
    id: &isula_types::ImageId,
    name: &Reference,
    staging_dir: &Path,
    op_id: &str,
    cancel: &Cancel,
) -> Result<String> {
    let image = store.image(id)?;
    let path = staging_dir.join(format!("isula-build-tmp-{op_id}.tar"));
    let file = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| TransportError::io("create", &path, e))?;
    let _remove = Remove(path.clone());
    let items = [SaveItem {
        image,
        tags: vec![name.clone()],
    }];
    let out = docker_archive::write(
        store,
        &items,
        std::io::BufWriter::with_capacity(1 << 20, file),
        cancel,
    )?;
    let file = out
        .into_inner()
        .map_err(|e| TransportError::io("write", &path, e.into_error()))?;
    file.sync_all()
        .map_err(|e| TransportError::io("fsync", &path, e))?;
    drop(file);
    let out = std::process::Command::new("isula")
        .args(["load", "-i"])
        .arg(&path)
        .output()
        .map_err(|e| {
            TransportError::Invalid(format!("running `isula load` (is iSulad installed?): {e}"))
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(TransportError::Invalid(format!(
            "isula load -i {} failed: {}",
            path.display(),
            text.trim()
        )));
    }
    Ok(text)
}
