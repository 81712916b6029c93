//! Squashing a stack of step snapshots (overlay upper directories, top first) into one
//! layer directory: what a single overlay layer holding all of their changes would be.
//! Files are hard-linked, not copied (snapshots are never written again); directories are
//! made with the topmost snapshot's metadata and merged down to the first opaque one.
//!
//! A whiteout or opaque marker only means something where the base below the stack has
//! that path, so one is kept only then: a file made by one step and deleted by a later one
//! leaves nothing, as it would in a single upper directory.
//!
//! Snapshots hold what RUN made, so every lookup is relative to a directory handle and
//! never follows a symlink; the base is looked up without following any either.

use crate::apply::opaque_xattr;
use crate::error::{Result, StoreError};
use isula_sys::rooted::{self, Resolve, Root};
use rustix::fs::{FileType, Mode, OFlags};
use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn sys(op: &'static str, path: &Path, e: rustix::io::Errno) -> StoreError {
    StoreError::io(op, path, e.into())
}

fn open_dir(dir: BorrowedFd<'_>, name: &OsStr, rel: &Path) -> Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys("open", rel, e))
}

fn is_whiteout(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn xattr(fd: BorrowedFd<'_>, key: &str) -> Option<Vec<u8>> {
    let mut v = vec![0u8; 256];
    let n = rustix::fs::fgetxattr(fd, key, &mut v).ok()?;
    v.truncate(n);
    Some(v)
}

/// Squashes `stack` (snapshot diff directories, top first) into `out` (an empty directory).
/// `base` is a read-only view of what lies below the stack (None: nothing).
pub fn squash(stack: &[&Path], base: Option<&Path>, out: &Path) -> Result<()> {
    let open = |p: &Path| {
        rustix::fs::open(
            p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| sys("open", p, e))
    };
    let layers = stack.iter().map(|p| open(p)).collect::<Result<Vec<_>>>()?;
    let base = base.map(Root::open).transpose()?;
    let out_fd = open(out)?;
    let fds: Vec<BorrowedFd<'_>> = layers.iter().map(|f| f.as_fd()).collect();
    merge_dir(&fds, base.as_ref(), Path::new(""), out_fd.as_fd())
}

/// [`squash`] of a stack of one, done on that snapshot itself (which nothing else uses):
/// the whiteouts and opaque markers the base gives no meaning to go, every directory keeps
/// its times, and nothing is linked or made.
pub fn trim_in_place(dir: &Path, base: Option<&Path>) -> Result<()> {
    let fd = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| sys("open", dir, e))?;
    let base = base.map(Root::open).transpose()?;
    trim_dir(fd.as_fd(), base.as_ref(), Path::new(""))
}

fn trim_dir(dir: BorrowedFd<'_>, base: Option<&Root>, rel: &Path) -> Result<()> {
    let mut subdirs = Vec::new();
    let mut gone = Vec::new();
    for ent in rustix::fs::Dir::read_from(dir).map_err(|e| sys("read", rel, e))? {
        let ent = ent.map_err(|e| sys("read", rel, e))?;
        let n = ent.file_name().to_bytes();
        if n == b"." || n == b".." {
            continue;
        }
        let name = OsStr::from_bytes(n).to_os_string();
        match ent.file_type() {
            FileType::Directory => subdirs.push(name),
            FileType::CharacterDevice | FileType::Unknown
                if rooted::lstat(dir, &name)?.is_some_and(|st| is_whiteout(&st))
                    && !base_has(base, &rel.join(&name)) =>
            {
                gone.push(name);
            }
            _ => {}
        }
    }
    if !gone.is_empty() {
        let st = rustix::fs::fstat(dir).map_err(|e| sys("stat", rel, e))?;
        for name in &gone {
            rustix::fs::unlinkat(dir, name.as_os_str(), rustix::fs::AtFlags::empty())
                .map_err(|e| sys("remove", &rel.join(name), e))?;
        }
        let t = rustix::fs::Timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec as _,
        };
        rustix::fs::futimens(
            dir,
            &rustix::fs::Timestamps {
                last_access: t,
                last_modification: t,
            },
        )
        .map_err(|e| sys("utimes", rel, e))?;
    }
    for name in subdirs {
        let child = rel.join(&name);
        let sub = open_dir(dir, &name, &child)?;
        // As the squash makes it: opaque only when it hides something of the base.
        let opaque = xattr(sub.as_fd(), opaque_xattr());
        if opaque.is_some() && !(opaque.as_deref() == Some(b"y") && base_has(base, &child)) {
            rustix::fs::fremovexattr(&sub, opaque_xattr())
                .map_err(|e| sys("removexattr", &child, e))?;
        }
        trim_dir(sub.as_fd(), base, &child)?;
    }
    Ok(())
}

/// Whether the base has anything at `rel` (reached through directories only).
fn base_has(base: Option<&Root>, rel: &Path) -> bool {
    let Some(root) = base else { return false };
    match root.parent(rel, Resolve::NoSymlinks, false) {
        Ok((dir, name)) => rooted::lstat(dir.as_fd(), &name).is_ok_and(|s| s.is_some()),
        Err(_) => false,
    }
}

/// Merges directory `rel` of `layers` (top first; each has `rel` as a directory, and no
/// layer below the last one shows through) into `out`, the directory made for `rel`.
fn merge_dir(
    layers: &[BorrowedFd<'_>],
    base: Option<&Root>,
    rel: &Path,
    out: BorrowedFd<'_>,
) -> Result<()> {
    let mut names: BTreeSet<OsString> = BTreeSet::new();
    for l in layers {
        for ent in rustix::fs::Dir::read_from(l).map_err(|e| sys("read", rel, e))? {
            let ent = ent.map_err(|e| sys("read", rel, e))?;
            let n = ent.file_name().to_bytes();
            if n != b"." && n != b".." {
                names.insert(OsStr::from_bytes(n).to_os_string());
            }
        }
    }
    for name in names {
        let child = rel.join(&name);
        // The topmost layer that has the name decides what it is.
        let mut top = None;
        for (i, l) in layers.iter().enumerate() {
            if let Some(st) = rooted::lstat(*l, &name)? {
                top = Some((i, st));
                break;
            }
        }
        let Some((i, st)) = top else { continue };
        if is_whiteout(&st) {
            if base_has(base, &child) {
                rooted::mknod_whiteout(out, &name)?;
            }
            continue;
        }
        if !rooted::is_dir(&st) {
            rooted::hardlink(layers[i], &name, out, &name)?;
            continue;
        }
        // This directory, merged with the same directory in the layers below, down to the
        // first one that hides what is under it.
        let mut below: Vec<OwnedFd> = Vec::new();
        let mut cut = false;
        for l in &layers[i..] {
            match rooted::lstat(*l, &name)? {
                Some(s) if rooted::is_dir(&s) => {
                    let fd = open_dir(*l, &name, &child)?;
                    let opaque = xattr(fd.as_fd(), opaque_xattr()).as_deref() == Some(b"y");
                    below.push(fd);
                    if opaque {
                        cut = true;
                        break;
                    }
                }
                Some(_) => {
                    cut = true;
                    break;
                }
                None => {}
            }
        }
        rooted::mkdir(out, &name, 0o700)?;
        let sub = open_dir(out, &name, &child)?;
        let below_fds: Vec<BorrowedFd<'_>> = below.iter().map(|f| f.as_fd()).collect();
        merge_dir(&below_fds, base, &child, sub.as_fd())?;
        // Metadata after the contents, so the mtime sticks.
        rooted::lchown(out, &name, st.st_uid, st.st_gid)?;
        rooted::chmod(out, &name, st.st_mode & 0o7777)?;
        if let Some(cap) = xattr(below_fds[0], "security.capability") {
            rooted::set_xattr(out, &name, OsStr::new("security.capability"), &cap)?;
        }
        if cut && base_has(base, &child) {
            rooted::set_xattr(out, &name, OsStr::new(opaque_xattr()), b"y")?;
        }
        rooted::set_times(out, &name, (st.st_mtime, st.st_mtime_nsec as u32))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    fn is_whiteout(m: &std::fs::Metadata) -> bool {
        m.file_type().is_char_device() && m.rdev() == 0
    }

    fn is_opaque(path: &Path) -> bool {
        let mut v = [0u8; 4];
        matches!(rustix::fs::lgetxattr(path, opaque_xattr(), &mut v), Ok(1) if v[0] == b'y')
    }

    fn root() -> bool {
        rustix::process::geteuid().is_root()
    }

    fn whiteout(p: &Path) {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            p,
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            rustix::fs::makedev(0, 0),
        )
        .expect("whiteout");
    }

    fn opaque(p: &Path) {
        rustix::fs::lsetxattr(p, opaque_xattr(), b"y", rustix::fs::XattrFlags::empty())
            .expect("opaque");
    }

    #[test]
    fn stacks_merge_like_one_upper() {
        if !root() {
            eprintln!("skipping: whiteouts and trusted xattrs need root");
            return;
        }
        let d = tempfile::tempdir().expect("tmp");
        let (base, l1, l2, out) = (
            d.path().join("base"),
            d.path().join("l1"),
            d.path().join("l2"),
            d.path().join("out"),
        );
        for p in [&base, &l1, &l2, &out] {
            std::fs::create_dir(p).expect("mkdir");
        }
        // base: /etc/old, /keep, /gone-dir/x
        std::fs::create_dir(base.join("etc")).expect("etc");
        std::fs::write(base.join("etc/old"), "old").expect("old");
        std::fs::create_dir(base.join("gone-dir")).expect("gone");
        std::fs::write(base.join("gone-dir/x"), "x").expect("x");
        // step 1: new /etc/new, /tmpfile, /newdir/a
        std::fs::create_dir(l1.join("etc")).expect("etc");
        std::fs::write(l1.join("etc/new"), "new").expect("new");
        std::fs::write(l1.join("tmpfile"), "t").expect("t");
        std::fs::create_dir(l1.join("newdir")).expect("newdir");
        std::fs::write(l1.join("newdir/a"), "a").expect("a");
        // step 2: deletes /etc/old (base) and /tmpfile (step 1), replaces /newdir (opaque),
        // replaces /gone-dir with an empty opaque directory.
        std::fs::create_dir(l2.join("etc")).expect("etc");
        whiteout(&l2.join("etc/old"));
        whiteout(&l2.join("tmpfile"));
        for dir in ["newdir", "gone-dir"] {
            std::fs::create_dir(l2.join(dir)).expect("dir");
            opaque(&l2.join(dir));
        }
        std::fs::write(l2.join("newdir/b"), "b").expect("b");
        squash(&[&l2, &l1], Some(&base), &out).expect("squash");

        assert_eq!(
            std::fs::read_to_string(out.join("etc/new")).expect("new"),
            "new"
        );
        assert!(is_whiteout(
            &std::fs::symlink_metadata(out.join("etc/old")).expect("wh")
        ));
        assert!(
            std::fs::symlink_metadata(out.join("tmpfile")).is_err(),
            "a whiteout over a file the base never had is dropped"
        );
        assert!(
            !out.join("newdir/a").exists(),
            "hidden by the opaque directory"
        );
        assert!(out.join("newdir/b").exists());
        assert!(!is_opaque(&out.join("newdir")), "not in the base: plain");
        assert!(
            is_opaque(&out.join("gone-dir")),
            "in the base: stays opaque"
        );
        // A stack of one trimmed in place makes the same layer as its squash.
        let (one, trimmed, out1) = (
            d.path().join("one"),
            d.path().join("trimmed"),
            d.path().join("out1"),
        );
        for p in [&one, &trimmed] {
            std::fs::create_dir_all(p.join("etc")).expect("etc");
            whiteout(&p.join("etc/old"));
            whiteout(&p.join("tmpfile"));
            std::fs::write(p.join("etc/new"), "new").expect("new");
            for dir in ["newdir", "gone-dir"] {
                std::fs::create_dir(p.join(dir)).expect("dir");
                opaque(&p.join(dir));
            }
            let t = std::fs::FileTimes::new()
                .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(777));
            for dir in ["", "etc", "newdir", "gone-dir"] {
                std::fs::File::open(p.join(dir))
                    .and_then(|f| f.set_times(t))
                    .expect("times");
            }
        }
        std::fs::create_dir(&out1).expect("mkdir");
        squash(&[&one], Some(&base), &out1).expect("squash");
        trim_in_place(&trimmed, Some(&base)).expect("trim");
        let tar =
            |p: &Path| crate::diff::write_layer(p, Vec::new(), &Default::default()).expect("tar");
        assert!(
            tar(&out1) == tar(&trimmed),
            "trimmed in place is not the squash"
        );
        assert!(std::fs::symlink_metadata(trimmed.join("tmpfile")).is_err());
        assert!(is_whiteout(
            &std::fs::symlink_metadata(trimmed.join("etc/old")).expect("wh")
        ));
        assert!(!is_opaque(&trimmed.join("newdir")) && is_opaque(&trimmed.join("gone-dir")));
        assert_eq!(
            std::fs::metadata(&trimmed).expect("m").mtime(),
            777,
            "the root keeps its time"
        );
        // Files are shared with the snapshot, not copied.
        assert_eq!(
            std::fs::metadata(out.join("etc/new")).expect("m").ino(),
            std::fs::metadata(l1.join("etc/new")).expect("m").ino()
        );
    }
}
