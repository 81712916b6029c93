//! One file per RPC. `service.rs` routes the generated trait's methods here.

pub mod build;
pub mod builder_cache;
pub mod context_sync;
pub mod health;
pub mod import;
pub mod info;
pub mod inspect;
pub mod list;
pub mod load;
pub mod local_index;
pub mod manifest;
mod ordered_log;
pub mod registry;
pub mod remote_files;
pub mod remove;
pub mod save;
pub mod session;
pub mod sign;
pub mod tag;
pub mod version;

use tonic::Status;

/// A path sent by the client must be absolute (the client makes it so).
pub fn absolute_path(what: &str, p: &str) -> Result<std::path::PathBuf, Status> {
    let path = std::path::PathBuf::from(p);
    if p.is_empty() || !path.is_absolute() {
        return Err(crate::error::invalid(format!(
            "{what} must be an absolute path, got {p:?}"
        )));
    }
    Ok(path)
}
