//! Squashing a stack of step snapshots (overlay upper directories, top first) into one
//! layer directory: what a single overlay layer holding all of their changes would be.
//! Files are hard-linked, not copied (snapshots are never written again); directories are
//! made with the topmost snapshot's metadata and merged down to the first opaque one.
//!
//! A whiteout or opaque marker only means something where the base below the stack has
//! that path, so one is kept only then: a file made by one step and deleted by a later one
//! leaves nothing, as it would in a single upper directory.

use crate::apply::OPAQUE_XATTR;
use crate::error::{Result, StoreError};
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |e| StoreError::io(op, path, e)
}

fn is_whiteout(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device() && m.rdev() == 0
}

fn is_opaque(path: &Path) -> bool {
    let mut v = [0u8; 4];
    matches!(rustix::fs::lgetxattr(path, OPAQUE_XATTR, &mut v), Ok(1) if v[0] == b'y')
}

/// Squashes `stack` (snapshot diff directories, top first) into `out` (an empty directory).
/// `base` is a read-only view of what lies below the stack (None: nothing).
pub fn squash(stack: &[&Path], base: Option<&Path>, out: &Path) -> Result<()> {
    let stack: Vec<&Path> = stack.to_vec();
    merge_dir(&stack, base, Path::new(""), out)
}

fn base_has(base: Option<&Path>, rel: &Path) -> bool {
    base.is_some_and(|b| std::fs::symlink_metadata(b.join(rel)).is_ok())
}

/// Merges directory `rel` of `layers` (top first; each has `rel` as a directory, and no
/// layer below the last one shows through) into `out/rel`.
fn merge_dir(layers: &[&Path], base: Option<&Path>, rel: &Path, out: &Path) -> Result<()> {
    let mut names: BTreeSet<OsString> = BTreeSet::new();
    for l in layers {
        let d = l.join(rel);
        for ent in std::fs::read_dir(&d).map_err(io("read", &d))? {
            names.insert(ent.map_err(io("read", &d))?.file_name());
        }
    }
    for name in names {
        let child = rel.join(&name);
        // The topmost layer that has the name decides what it is.
        let mut top = None;
        for (i, l) in layers.iter().enumerate() {
            if let Ok(m) = std::fs::symlink_metadata(l.join(&child)) {
                top = Some((i, m));
                break;
            }
        }
        let Some((i, meta)) = top else { continue };
        let src = layers[i].join(&child);
        let dest = out.join(&child);
        if is_whiteout(&meta) {
            if base_has(base, &child) {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &dest,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| StoreError::io("mknod", &dest, e.into()))?;
            }
            continue;
        }
        if meta.is_dir() {
            // This directory, merged with the same directory in the layers below, down to
            // the first one that hides what is under it.
            let mut below: Vec<&Path> = Vec::new();
            let mut cut = false;
            for l in &layers[i..] {
                match std::fs::symlink_metadata(l.join(&child)) {
                    Ok(m) if m.is_dir() => {
                        below.push(l);
                        if is_opaque(&l.join(&child)) {
                            cut = true;
                            break;
                        }
                    }
                    Ok(_) => {
                        cut = true;
                        break;
                    }
                    Err(_) => {}
                }
            }
            std::fs::create_dir(&dest).map_err(io("mkdir", &dest))?;
            merge_dir(&below, base, &child, out)?;
            copy_dir_meta(&src, &dest, &meta)?;
            if cut && base_has(base, &child) {
                rustix::fs::lsetxattr(&dest, OPAQUE_XATTR, b"y", rustix::fs::XattrFlags::empty())
                    .map_err(|e| StoreError::io("setxattr", &dest, e.into()))?;
            }
            continue;
        }
        std::fs::hard_link(&src, &dest).map_err(io("link", &dest))?;
    }
    Ok(())
}

/// Owner, mode, capabilities and times of a directory (after its contents are in place, so
/// the mtime sticks).
fn copy_dir_meta(src: &Path, dest: &Path, meta: &std::fs::Metadata) -> Result<()> {
    rustix::fs::chownat(
        rustix::fs::CWD,
        dest,
        Some(rustix::process::Uid::from_raw(meta.uid())),
        Some(rustix::process::Gid::from_raw(meta.gid())),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| StoreError::io("chown", dest, e.into()))?;
    rustix::fs::chmod(dest, rustix::fs::Mode::from_raw_mode(meta.mode() & 0o7777))
        .map_err(|e| StoreError::io("chmod", dest, e.into()))?;
    let mut v = vec![0u8; 256];
    if let Ok(n) = rustix::fs::lgetxattr(src, "security.capability", &mut v) {
        rustix::fs::lsetxattr(
            dest,
            "security.capability",
            &v[..n],
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(|e| StoreError::io("setxattr", dest, e.into()))?;
    }
    let t = rustix::fs::Timespec {
        tv_sec: meta.mtime(),
        tv_nsec: meta.mtime_nsec() as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dest,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|e| StoreError::io("utimes", dest, e.into()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
            rustix::fs::lsetxattr(
                l2.join(dir).as_path(),
                OPAQUE_XATTR,
                b"y",
                rustix::fs::XattrFlags::empty(),
            )
            .expect("opaque");
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
        // Files are shared with the snapshot, not copied.
        assert_eq!(
            std::fs::metadata(out.join("etc/new")).expect("m").ino(),
            std::fs::metadata(l1.join("etc/new")).expect("m").ino()
        );
    }
}
