//! Exclusive or shared, non-blocking file locks (flock) held for the life of a value: one daemon per
//! data root, one writer of the store's metadata.

use crate::{Result, SysError};
use rustix::fs::{flock, FlockOperation, Mode, OFlags};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct FileLock {
    _fd: OwnedFd,
    path: PathBuf,
}

impl FileLock {
    /// Takes the lock or fails at once with EWOULDBLOCK if another process holds it.
    pub fn try_exclusive(path: &Path) -> Result<FileLock> {
        Self::take(path, FlockOperation::NonBlockingLockExclusive)
    }

    /// A shared lock: any number at once, none while an exclusive one is held (EWOULDBLOCK).
    pub fn try_shared(path: &Path) -> Result<FileLock> {
        Self::take(path, FlockOperation::NonBlockingLockShared)
    }

    fn take(path: &Path, how: FlockOperation) -> Result<FileLock> {
        let fd = rustix::fs::open(
            path,
            OFlags::CREATE | OFlags::RDWR | OFlags::CLOEXEC | OFlags::NOFOLLOW,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| SysError::new("open lock file", path, e))?;
        flock(&fd, how).map_err(|e| SysError::new("lock", path, e))?;
        Ok(FileLock {
            _fd: fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether an error from [`FileLock::try_exclusive`] means "held by someone else".
pub fn is_held_elsewhere(e: &SysError) -> bool {
    e.errno() == Some(rustix::io::Errno::WOULDBLOCK.raw_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("lock");
        let first = FileLock::try_exclusive(&p).expect("first");
        let second = FileLock::try_exclusive(&p).expect_err("second must fail");
        assert!(is_held_elsewhere(&second), "{second}");
        drop(first);
        FileLock::try_exclusive(&p).expect("after release");
    }
}
