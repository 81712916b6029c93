//! Rooted path resolution and `*at` operations relative to a directory handle.
//!
//! Every path inside a rootfs, layer or build context is resolved against a [`Root`] handle,
//! never by joining strings. [`Resolve::InRoot`] follows symlinks as a chroot would (an
//! absolute or `..`-climbing link stays inside); [`Resolve::NoSymlinks`] refuses any symlink
//! on the way (layer extraction: a layer never writes through its own links). Magic links
//! (`/proc/self/fd/N`) are never followed.

use crate::{Result, SysError};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags, CWD};
use rustix::io::Errno;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// How symlinks met while resolving a path are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// Follow symlinks, scoped to the root (like a chroot).
    InRoot,
    /// Fail with ELOOP on any symlink.
    NoSymlinks,
}

/// An open directory that paths are resolved within.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    path: PathBuf,
}

const MAX_SYMLINKS: usize = 40;

impl Root {
    pub fn open(path: &Path) -> Result<Root> {
        let fd = rustix::fs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| SysError::new("open root", path, e))?;
        Ok(Root {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn display(&self, rel: &Path) -> PathBuf {
        self.path.join(rel.strip_prefix("/").unwrap_or(rel))
    }

    /// Opens `rel` inside the root. `flags` should include what the caller needs
    /// (`PATH`, `RDONLY`, `DIRECTORY`, ...); CLOEXEC and NOFOLLOW-on-magic-links are added.
    pub fn open_at(&self, rel: &Path, how: Resolve, flags: OFlags, mode: Mode) -> Result<OwnedFd> {
        let resolve = match how {
            Resolve::InRoot => ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
            Resolve::NoSymlinks => ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS,
        };
        let rel_clean = clean_relative(rel);
        let target: &Path = if rel_clean.as_os_str().is_empty() {
            Path::new(".")
        } else {
            &rel_clean
        };
        match rustix::fs::openat2(&self.fd, target, flags | OFlags::CLOEXEC, mode, resolve) {
            Ok(fd) => Ok(fd),
            Err(Errno::NOSYS) | Err(Errno::PERM) if openat2_unavailable() => {
                self.walk(target, how, flags, mode)
            }
            Err(e) => Err(SysError::new("resolve", self.display(rel), e)),
        }
    }

    /// Component walk used where openat2 is missing (kernels before 5.6).
    fn walk(&self, rel: &Path, how: Resolve, flags: OFlags, mode: Mode) -> Result<OwnedFd> {
        let err = |e| SysError::new("resolve", self.display(rel), e);
        let mut pending: Vec<OsString> = components(rel);
        pending.reverse();
        let mut stack: Vec<OwnedFd> = Vec::new();
        let mut links = 0;
        while let Some(name) = pending.pop() {
            let cur = stack.last().map_or(self.fd.as_fd(), |f| f.as_fd());
            if name == ".." {
                stack.pop();
                continue;
            }
            let last = pending.is_empty();
            let fd = rustix::fs::openat(
                cur,
                name.as_os_str(),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(err)?;
            let st = rustix::fs::fstat(&fd).map_err(err)?;
            if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                if how == Resolve::NoSymlinks {
                    return Err(err(Errno::LOOP));
                }
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(err(Errno::LOOP));
                }
                let target =
                    rustix::fs::readlinkat(cur, name.as_os_str(), Vec::new()).map_err(err)?;
                let target = PathBuf::from(OsStr::from_bytes(target.as_bytes()));
                if target.is_absolute() {
                    stack.clear();
                }
                let mut more = components(&target);
                more.reverse();
                pending.extend(more);
                continue;
            }
            if last {
                // Reopen with the real flags, relative to the parent, without following.
                let fd = rustix::fs::openat(
                    cur,
                    name.as_os_str(),
                    flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    mode,
                )
                .map_err(err)?;
                return Ok(fd);
            }
            stack.push(fd);
        }
        // Empty path or it ended on ".." / a symlink to a directory: open the current dir.
        let cur = stack.last().map_or(self.fd.as_fd(), |f| f.as_fd());
        rustix::fs::openat(cur, ".", flags | OFlags::CLOEXEC, mode).map_err(err)
    }

    /// Opens the directory `rel` (O_PATH), creating missing components (mode 0755) when
    /// `create` is set. Symlinks are handled as `how` says.
    pub fn dir(&self, rel: &Path, how: Resolve, create: bool) -> Result<OwnedFd> {
        let flags = OFlags::PATH | OFlags::DIRECTORY;
        match self.open_at(rel, how, flags, Mode::empty()) {
            Ok(fd) => return Ok(fd),
            Err(e) if create && e.errno() == Some(Errno::NOENT.raw_os_error()) => {}
            Err(e) => return Err(e),
        }
        // Create one component at a time from the deepest existing ancestor.
        let comps = components(&clean_relative(rel));
        let mut built = PathBuf::new();
        for c in comps {
            built.push(&c);
            match self.open_at(&built, how, flags, Mode::empty()) {
                Ok(_) => continue,
                Err(e) if e.errno() == Some(Errno::NOENT.raw_os_error()) => {
                    let parent = built.parent().unwrap_or(Path::new(""));
                    let pfd = self.open_at(parent, how, flags, Mode::empty())?;
                    match rustix::fs::mkdirat(&pfd, c.as_os_str(), Mode::from_raw_mode(0o755)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(SysError::new("mkdir", self.display(&built), e)),
                    }
                }
                Err(e) => return Err(e),
            }
        }
        self.open_at(rel, how, flags, Mode::empty())
    }

    /// Splits `rel` into its parent directory handle and final name. The name is never
    /// empty, `.` or `..`.
    pub fn parent(&self, rel: &Path, how: Resolve, create: bool) -> Result<(OwnedFd, OsString)> {
        let clean = clean_relative(rel);
        let name = match clean.file_name() {
            Some(n) => n.to_os_string(),
            None => return Err(SysError::new("resolve", self.display(rel), Errno::INVAL)),
        };
        let parent = clean.parent().unwrap_or(Path::new(""));
        Ok((self.dir(parent, how, create)?, name))
    }
}

fn openat2_unavailable() -> bool {
    use std::sync::OnceLock;
    static UNAVAILABLE: OnceLock<bool> = OnceLock::new();
    *UNAVAILABLE.get_or_init(|| {
        matches!(
            rustix::fs::openat2(
                CWD,
                "/",
                OFlags::PATH | OFlags::CLOEXEC,
                Mode::empty(),
                ResolveFlags::empty()
            ),
            Err(Errno::NOSYS) | Err(Errno::PERM)
        )
    })
}

/// Path components as names, dropping root and `.`, keeping `..` (resolution handles it).
fn components(p: &Path) -> Vec<OsString> {
    p.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect()
}

/// `rel` made relative (a leading `/` means the root) with `.` components dropped.
pub fn clean_relative(rel: &Path) -> PathBuf {
    components(rel).into_iter().collect()
}

// ---- operations on (parent dir, name) pairs -------------------------------------------

fn at_err(op: &'static str, name: &OsStr, e: Errno) -> SysError {
    SysError::new(op, name, e)
}

/// lstat of `name` in `dir`, or None if it does not exist.
pub fn lstat(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<rustix::fs::Stat>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::NOENT) => Ok(None),
        Err(e) => Err(at_err("lstat", name, e)),
    }
}

pub fn is_dir(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::Directory
}

/// Creates a new regular file (fails if anything exists at `name`).
pub fn create_file(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode & 0o7777),
    )
    .map_err(|e| at_err("create", name, e))?;
    Ok(std::fs::File::from(fd))
}

/// Opens an existing regular file for reading, without following a final symlink.
pub fn open_read(dir: BorrowedFd<'_>, name: &OsStr) -> Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| at_err("open", name, e))?;
    Ok(std::fs::File::from(fd))
}

pub fn mkdir(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode & 0o7777))
        .map_err(|e| at_err("mkdir", name, e))
}

pub fn symlink(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    rustix::fs::symlinkat(target, dir, name).map_err(|e| at_err("symlink", name, e))
}

/// Hard link `old_name` in `old_dir` as `new_name` in `new_dir`; a symlink is linked itself.
pub fn hardlink(
    old_dir: BorrowedFd<'_>,
    old_name: &OsStr,
    new_dir: BorrowedFd<'_>,
    new_name: &OsStr,
) -> Result<()> {
    rustix::fs::linkat(old_dir, old_name, new_dir, new_name, AtFlags::empty())
        .map_err(|e| at_err("link", new_name, e))
}

/// An overlayfs whiteout: a character device 0:0.
pub fn mknod_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    rustix::fs::mknodat(
        dir,
        name,
        FileType::CharacterDevice,
        Mode::empty(),
        rustix::fs::makedev(0, 0),
    )
    .map_err(|e| at_err("mknod whiteout", name, e))
}

/// A device node (`kind` is a character or block device) with `mode`'s permission bits.
pub fn mknod_device(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    kind: FileType,
    mode: u32,
    rdev: u64,
) -> Result<()> {
    rustix::fs::mknodat(dir, name, kind, Mode::from_raw_mode(mode & 0o7777), rdev)
        .map_err(|e| at_err("mknod", name, e))
}

pub fn mkfifo(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    rustix::fs::mknodat(
        dir,
        name,
        FileType::Fifo,
        Mode::from_raw_mode(mode & 0o7777),
        0,
    )
    .map_err(|e| at_err("mkfifo", name, e))
}

pub fn lchown(dir: BorrowedFd<'_>, name: &OsStr, uid: u32, gid: u32) -> Result<()> {
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| match unmapped_owner(e, uid, gid) {
        Some(source) => SysError::io("chown", PathBuf::from(name), source),
        None => at_err("chown", name, e),
    })
}

/// In a user namespace, chown fails with EINVAL for an owner the namespace does not map:
/// said in words, with the mapped ids and the fix, instead of "invalid argument".
fn unmapped_owner(e: rustix::io::Errno, uid: u32, gid: u32) -> Option<std::io::Error> {
    use crate::userns;
    if e != rustix::io::Errno::INVAL || !userns::in_user_namespace() {
        return None;
    }
    let (which, id, map) = if !userns::is_mapped(userns::uid_map(), uid) {
        ("uid", uid, userns::uid_map())
    } else {
        ("gid", gid, userns::gid_map())
    };
    Some(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!(
            "{which} {id} is not mapped in this rootless daemon's user namespace (it maps {which}s {}): give the user a subordinate range of at least {id} ids in /etc/sub{which} and restart the daemon",
            userns::describe_map(map)
        ),
    ))
}

/// chmod of a non-symlink entry we created ourselves.
pub fn chmod(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> Result<()> {
    // On a handle, never by path: chmodat follows a final symlink (Linux has no
    // AT_SYMLINK_NOFOLLOW for it before fchmodat2), so the inode is pinned with O_PATH
    // first, a symlink is left alone (its mode means nothing), and the mode is set through
    // the handle's /proc magic link, which leads to exactly that inode.
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| at_err("open", name, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| at_err("stat", name, e))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Symlink {
        return Ok(());
    }
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::fs::chmod(proc_path.as_str(), Mode::from_raw_mode(mode & 0o7777))
        .map_err(|e| at_err("chmod", name, e))
}

/// Sets atime and mtime (seconds, nanoseconds) without following a final symlink.
/// Owner, then mode, then times of a file through its open handle (one the caller made:
/// nothing is looked up by name).
pub fn set_owner_mode_times(
    file: &std::fs::File,
    owner: (u32, u32),
    mode: u32,
    mtime: (i64, u32),
) -> std::io::Result<()> {
    // Only what differs is changed: each change is an inode update in the journal (and,
    // through an overlay, a round through its upper file too), and a file just made has
    // its maker's owner and the mode it was made with already. A stat costs neither.
    let st = rustix::fs::fstat(file)?;
    let want = mode & 0o7777;
    let chown = (st.st_uid, st.st_gid) != owner;
    if chown {
        rustix::fs::fchown(
            file,
            Some(rustix::fs::Uid::from_raw(owner.0)),
            Some(rustix::fs::Gid::from_raw(owner.1)),
        )
        .map_err(|e| unmapped_owner(e, owner.0, owner.1).unwrap_or_else(|| e.into()))?;
    }
    // After a chown always: it clears set-id bits.
    if chown || st.st_mode & 0o7777 != want {
        rustix::fs::fchmod(file, Mode::from_raw_mode(want))?;
    }
    let ts = rustix::fs::Timespec {
        tv_sec: mtime.0,
        tv_nsec: mtime.1 as _,
    };
    rustix::fs::futimens(
        file,
        &rustix::fs::Timestamps {
            last_access: ts,
            last_modification: ts,
        },
    )?;
    Ok(())
}

pub fn set_times(dir: BorrowedFd<'_>, name: &OsStr, mtime: (i64, u32)) -> Result<()> {
    let ts = rustix::fs::Timespec {
        tv_sec: mtime.0,
        tv_nsec: mtime.1 as _,
    };
    let times = rustix::fs::Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rustix::fs::utimensat(dir, name, &times, AtFlags::SYMLINK_NOFOLLOW)
        .map_err(|e| at_err("utimes", name, e))
}

/// Sets an extended attribute on `name` in `dir` without following a final symlink (the
/// O_PATH handle pins the inode; its /proc magic link leads to exactly that inode).
pub fn set_xattr(dir: BorrowedFd<'_>, name: &OsStr, key: &OsStr, value: &[u8]) -> Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| at_err("open", name, e))?;
    let proc_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::fs::setxattr(
        proc_path.as_str(),
        key,
        value,
        rustix::fs::XattrFlags::empty(),
    )
    .map_err(|e| at_err("setxattr", name, e))
}

/// Removes `name` in `dir` and, for a directory, everything under it. Never follows links.
pub fn remove_all(dir: BorrowedFd<'_>, name: &OsStr) -> Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => return Ok(()),
        Err(Errno::ISDIR) | Err(Errno::PERM) => {}
        Err(e) => return Err(at_err("unlink", name, e)),
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| at_err("open", name, e))?;
    clear_dir(sub.as_fd())?;
    match rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(at_err("rmdir", name, e)),
    }
}

/// Removes every entry of an open directory.
pub fn clear_dir(dir: BorrowedFd<'_>) -> Result<()> {
    let mut names = Vec::new();
    {
        let fd = rustix::fs::openat(
            dir,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| at_err("open", OsStr::new("."), e))?;
        let it =
            rustix::fs::Dir::read_from(&fd).map_err(|e| at_err("readdir", OsStr::new("."), e))?;
        for ent in it {
            let ent = ent.map_err(|e| at_err("readdir", OsStr::new("."), e))?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.push(OsStr::from_bytes(n).to_os_string());
            }
        }
    }
    for n in names {
        remove_all(dir, &n)?;
    }
    Ok(())
}

/// Removes a directory tree given by path (the top is not followed if it is a symlink).
pub fn remove_tree(path: &Path) -> Result<()> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    let Some(name) = path.file_name() else {
        return Err(SysError::new("remove", path, Errno::INVAL));
    };
    let pfd = match rustix::fs::open(
        parent,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(SysError::new("open", parent, e)),
    };
    remove_all(pfd.as_fd(), name).map_err(|e| SysError {
        path: path.to_path_buf(),
        ..e
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink as std_symlink;

    #[test]
    fn in_root_keeps_symlinks_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::write(root.join("etc/passwd"), b"inside").expect("write");
        std_symlink("/etc", root.join("abs")).expect("symlink");
        std_symlink("../../../../etc", root.join("rel")).expect("symlink");
        let r = Root::open(&root).expect("root");
        for p in [
            "abs/passwd",
            "rel/passwd",
            "../../etc/passwd",
            "/etc/passwd",
        ] {
            let fd = r
                .open_at(Path::new(p), Resolve::InRoot, OFlags::RDONLY, Mode::empty())
                .expect(p);
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).expect("read");
            assert_eq!(s, "inside", "{p}");
        }
        let e = r.open_at(
            Path::new("abs/passwd"),
            Resolve::NoSymlinks,
            OFlags::RDONLY,
            Mode::empty(),
        );
        assert!(e.is_err());
        // The walk (fallback) gives the same answers.
        for p in ["abs/passwd", "rel/passwd", "../../etc/passwd"] {
            let fd = r
                .walk(Path::new(p), Resolve::InRoot, OFlags::RDONLY, Mode::empty())
                .expect(p);
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).expect("read");
            assert_eq!(s, "inside", "walk {p}");
        }
        assert!(r
            .walk(
                Path::new("abs/passwd"),
                Resolve::NoSymlinks,
                OFlags::RDONLY,
                Mode::empty()
            )
            .is_err());
    }

    #[test]
    fn dir_creates_parents_and_remove_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let r = Root::open(dir.path()).expect("root");
        let (pfd, name) = r
            .parent(Path::new("a/b/c/file"), Resolve::NoSymlinks, true)
            .expect("parent");
        assert_eq!(name, "file");
        create_file(pfd.as_fd(), &name, 0o644).expect("create");
        assert!(dir.path().join("a/b/c/file").is_file());
        remove_tree(&dir.path().join("a")).expect("remove");
        assert!(!dir.path().join("a").exists());
    }
}

#[cfg(test)]
mod chmod_tests {
    #[test]
    fn chmod_never_goes_through_a_symlink() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"x").expect("write");
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let inner = dir.path().join("inner");
        std::fs::create_dir(&inner).expect("mkdir");
        std::os::unix::fs::symlink(&outside, inner.join("link")).expect("symlink");
        std::fs::write(inner.join("file"), b"y").expect("write");
        let root = std::fs::File::open(&inner).expect("open");
        use std::os::fd::AsFd;
        super::chmod(root.as_fd(), std::ffi::OsStr::new("link"), 0o777).expect("chmod link");
        super::chmod(root.as_fd(), std::ffi::OsStr::new("file"), 0o640).expect("chmod file");
        let mode =
            |p: &std::path::Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&outside), 0o600, "the symlink's target changed");
        assert_eq!(mode(&inner.join("file")), 0o640);
    }
}
