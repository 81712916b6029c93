//! The only crate that talks to the kernel directly. It owns rooted path resolution
//! (`openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`, with a component walk for kernels
//! without openat2), the `*at` file operations used to build layer trees and rootfs
//! contents (whiteouts, xattrs, ownership, times), and file locks. Nothing here decides
//! policy: callers say how a path must be resolved, this crate makes sure it is.

pub mod lock;
pub mod rooted;

pub use lock::FileLock;
pub use rooted::{Resolve, Root};

use std::path::PathBuf;

/// A failed system call, with what it was doing and on what.
#[derive(Debug, thiserror::Error)]
#[error("{op} {}: {source}", path.display())]
pub struct SysError {
    pub op: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl SysError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, errno: rustix::io::Errno) -> Self {
        SysError {
            op,
            path: path.into(),
            source: errno.into(),
        }
    }

    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SysError {
            op,
            path: path.into(),
            source,
        }
    }

    /// The raw errno, when there is one.
    pub fn errno(&self) -> Option<i32> {
        self.source.raw_os_error()
    }
}

pub type Result<T> = std::result::Result<T, SysError>;

/// fsync a directory so that a rename or create inside it is durable.
pub fn fsync_dir(path: &std::path::Path) -> Result<()> {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| SysError::new("open", path, e))?;
    rustix::fs::fsync(&fd).map_err(|e| SysError::new("fsync", path, e))
}

/// Renames `from` to `to`, failing with EEXIST if `to` exists (never overwrites).
pub fn rename_noreplace(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| SysError::new("rename", to, e))
}

/// Whether `path` is a mount point listed in /proc/self/mountinfo (for leak checks).
pub fn mounts_under(prefix: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(prefix))
        .collect())
}
