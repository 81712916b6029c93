//! Overlay mounts with guards: a mounted rootfs is unmounted when its guard drops, on every
//! path out of a build step (success, error, cancel, panic).

use crate::{Result, SysError};
use rustix::mount::{MountFlags, UnmountFlags};
use std::path::{Path, PathBuf};

/// A mounted file system, unmounted on drop.
#[derive(Debug)]
pub struct MountGuard {
    target: PathBuf,
    mounted: bool,
}

impl MountGuard {
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting a failure (drop only logs it).
    pub fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        unmount(&self.target)
    }
}

/// Mount points strictly below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_below(dir: &Path) -> Vec<std::path::PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<std::path::PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(std::path::PathBuf::from)
        .filter(|p| p != dir && p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts `target` (detaching it if it is busy).
pub fn unmount_path(target: &Path) -> Result<()> {
    unmount(target)
}

fn unmount(target: &Path) -> Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        // Still busy (a straggling process): detach now, the kernel finishes later.
        Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(target, UnmountFlags::DETACH)
            .map_err(|e| SysError::new("unmount", target, e)),
        Err(e) => Err(SysError::new("unmount", target, e)),
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount(&self.target) {
                tracing::error!(target = %self.target.display(), error = %e, "unmount failed");
            }
        }
    }
}

/// Overlay features our diff code does not understand (it reads whiteouts and opaque
/// directories only), so they are always off, whatever the configured options say.
const OVERLAY_FIXED: [(&str, &str); 3] = [
    ("index", "off"),
    ("redirect_dir", "off"),
    ("metacopy", "off"),
];

/// The xattr that marks an overlay directory opaque: `trusted.overlay.opaque`, or
/// `user.overlay.opaque` in a user namespace (where overlays are mounted with `userxattr`).
pub fn opaque_xattr() -> &'static str {
    if crate::userns::in_user_namespace() {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

/// Mounts an overlay at `target`: `lowers` top first (at least one), `upper` and `work` on
/// the same file system. `options` are extra mount options (`nodev`, ...).
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    options: &[String],
) -> Result<MountGuard> {
    overlay(lowers, Some((upper, work)), target, options, false)
}

/// Mounts a private tmpfs at `target` (mode 0700, `size` bytes, nosuid, nodev, noexec):
/// memory that holds a step's secrets and agent sockets, never the disk.
pub fn mount_tmpfs(target: &Path, size: u64) -> Result<MountGuard> {
    let data = std::ffi::CString::new(format!("mode=0700,size={size},nr_inodes=1024"))
        .map_err(|_| SysError::new("mount tmpfs", target, rustix::io::Errno::INVAL))?;
    rustix::mount::mount(
        "tmpfs",
        target,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        data.as_c_str(),
    )
    .map_err(|e| SysError::new("mount tmpfs", target, e))?;
    Ok(MountGuard {
        target: target.to_path_buf(),
        mounted: true,
    })
}

/// Mounts a read-only overlay of `lowers` (top first, at least one) at `target`: a view of
/// an image or stage, for `COPY --from` and for looking things up in a base.
pub fn mount_overlay_ro(lowers: &[PathBuf], target: &Path, empty: &Path) -> Result<MountGuard> {
    // Without an upper directory overlayfs wants two lower layers; an empty one is enough.
    let mut all = lowers.to_vec();
    if all.len() < 2 {
        all.push(empty.to_path_buf());
    }
    overlay(&all, None, target, &[], true)
}

/// [`mount_overlay_ro`] for reading an image's files as data only (its SBOM): no device
/// node, set-id bit or program of the image takes effect through it.
pub fn mount_overlay_ro_inert(
    lowers: &[PathBuf],
    target: &Path,
    empty: &Path,
) -> Result<MountGuard> {
    let mut all = lowers.to_vec();
    if all.len() < 2 {
        all.push(empty.to_path_buf());
    }
    overlay(
        &all,
        None,
        target,
        &["nodev,nosuid,noexec".to_string()],
        true,
    )
}

fn overlay(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    options: &[String],
    read_only: bool,
) -> Result<MountGuard> {
    if lowers.is_empty() {
        return Err(SysError::new(
            "mount overlay",
            target,
            rustix::io::Errno::INVAL,
        ));
    }
    let mut flags = MountFlags::empty();
    if read_only {
        flags |= MountFlags::RDONLY;
    }
    let mut extra = Vec::new();
    for o in options.iter().flat_map(|o| o.split(',')) {
        match o {
            "nodev" => flags |= MountFlags::NODEV,
            "nosuid" => flags |= MountFlags::NOSUID,
            "noexec" => flags |= MountFlags::NOEXEC,
            "noatime" => flags |= MountFlags::NOATIME,
            // The kernel's default for new mounts; not an overlay parameter.
            "relatime" => {}
            "" => {}
            other => extra.push(other.to_string()),
        }
    }
    // Ours last: they win over the same keys in the configured options.
    extra.extend(OVERLAY_FIXED.iter().map(|(k, v)| format!("{k}={v}")));
    if crate::userns::in_user_namespace() {
        // In a user namespace overlayfs may not use `trusted.*` xattrs: its opaque marks
        // go to `user.overlay.*` (`userxattr`, Linux 5.11+), which refuses
        // `redirect_dir=off` but means the same with `nofollow` (none made, none followed).
        for o in extra.iter_mut() {
            if o == "redirect_dir=off" {
                *o = "redirect_dir=nofollow".into();
            }
        }
        extra.push("userxattr".into());
    }
    // A writable overlay is volatile (Linux 5.10+): its syncs and fsyncs (a RUN's dpkg
    // makes thousands) and the sync of the upper file system at unmount do nothing. The
    // store makes an upper directory durable itself when it keeps it (one syncfs at
    // commit, or before a cache record names it), and a step cut short is thrown away.
    if upper.is_some() && !extra.iter().any(|o| o == "volatile") {
        let mut volatile = extra.clone();
        volatile.push("volatile".into());
        match overlay_any(lowers, upper, target, flags, &volatile) {
            // A kernel without the option refuses it: mount without.
            Err(e) if e.errno() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {}
            done => return done,
        }
    }
    overlay_any(lowers, upper, target, flags, &extra)
}

/// The mount API (Linux 6.8+) takes one lower layer per call, so a base image of any depth
/// fits; older kernels get the classic option string, limited to a page.
fn overlay_any(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    flags: MountFlags,
    extra: &[String],
) -> Result<MountGuard> {
    match overlay_fsconfig(lowers, upper, target, flags, extra) {
        Ok(()) => {}
        Err(e) if e == rustix::io::Errno::NOSYS || e == rustix::io::Errno::INVAL => {
            overlay_legacy(lowers, upper, target, flags, extra)?
        }
        Err(e) => return Err(SysError::new("mount overlay", target, e)),
    }
    Ok(MountGuard {
        target: target.to_path_buf(),
        mounted: true,
    })
}

fn overlay_fsconfig(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    flags: MountFlags,
    extra: &[String],
) -> rustix::io::Result<()> {
    use rustix::mount::{
        fsconfig_create, fsconfig_set_string, fsmount, fsopen, move_mount, FsMountFlags,
        FsOpenFlags, MountAttrFlags, MoveMountFlags,
    };
    let fs = fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC)?;
    for l in lowers {
        fsconfig_set_string(&fs, "lowerdir+", l.as_path())?;
    }
    if let Some((u, w)) = upper {
        fsconfig_set_string(&fs, "upperdir", u)?;
        fsconfig_set_string(&fs, "workdir", w)?;
    }
    for o in extra {
        match o.split_once('=') {
            Some((k, v)) => fsconfig_set_string(&fs, k, v)?,
            None => rustix::mount::fsconfig_set_flag(&fs, o.as_str())?,
        }
    }
    fsconfig_create(&fs)?;
    let mut attrs = MountAttrFlags::empty();
    for (f, a) in [
        (MountFlags::RDONLY, MountAttrFlags::MOUNT_ATTR_RDONLY),
        (MountFlags::NODEV, MountAttrFlags::MOUNT_ATTR_NODEV),
        (MountFlags::NOSUID, MountAttrFlags::MOUNT_ATTR_NOSUID),
        (MountFlags::NOEXEC, MountAttrFlags::MOUNT_ATTR_NOEXEC),
        (MountFlags::NOATIME, MountAttrFlags::MOUNT_ATTR_NOATIME),
    ] {
        if flags.contains(f) {
            attrs |= a;
        }
    }
    let mnt = fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs)?;
    move_mount(
        &mnt,
        "",
        rustix::fs::CWD,
        target,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
}

fn overlay_legacy(
    lowers: &[PathBuf],
    upper: Option<(&Path, &Path)>,
    target: &Path,
    flags: MountFlags,
    extra: &[String],
) -> Result<()> {
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut data = format!("lowerdir={lower}");
    if let Some((u, w)) = upper {
        data.push_str(&format!(
            ",upperdir={},workdir={}",
            u.display(),
            w.display()
        ));
    }
    for o in extra {
        data.push(',');
        data.push_str(o);
    }
    if data.len() >= 4096 {
        return Err(SysError::io(
            "mount overlay",
            target,
            std::io::Error::other(format!(
                "{} lower layers make the mount options too long for this kernel (Linux 6.8 or later has no such limit)",
                lowers.len()
            )),
        ));
    }
    let data = std::ffi::CString::new(data)
        .map_err(|_| SysError::new("mount overlay", target, rustix::io::Errno::INVAL))?;
    rustix::mount::mount("overlay", target, "overlay", flags, Some(data.as_c_str()))
        .map_err(|e| SysError::new("mount overlay", target, e))
}

#[cfg(test)]
mod mountinfo_tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(super::unescape_mountinfo("/plain"), "/plain");
        assert_eq!(super::unescape_mountinfo("/end\\04"), "/end\\04");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_mount_and_guard() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: mounting needs root");
            return;
        }
        let d = tempfile::tempdir().expect("tmp");
        let (lower, upper, work, merged) = (
            d.path().join("l"),
            d.path().join("u"),
            d.path().join("w"),
            d.path().join("m"),
        );
        for p in [&lower, &upper, &work, &merged] {
            std::fs::create_dir(p).expect("mkdir");
        }
        std::fs::write(lower.join("base"), b"from lower").expect("write");
        {
            let _m = mount_overlay(
                std::slice::from_ref(&lower),
                &upper,
                &work,
                &merged,
                &["nodev,relatime".into()],
            )
            .expect("mount");
            assert_eq!(
                std::fs::read(merged.join("base")).expect("read"),
                b"from lower"
            );
            std::fs::write(merged.join("new"), b"x").expect("write");
            std::fs::remove_file(merged.join("base")).expect("rm");
            // A writable overlay is volatile (this kernel has the option): no sync of the
            // upper file system at unmount, no fsync passed down.
            let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
            let line = info
                .lines()
                .find(|l| l.split(' ').nth(4) == Some(&*merged.to_string_lossy()))
                .expect("the overlay in mountinfo");
            assert!(line.contains("volatile"), "{line}");
        }
        assert!(!merged.join("new").exists(), "unmounted on drop");
        // The upper directory mounts again with a fresh work directory (a volatile mount
        // leaves its work directory unusable).
        let work2 = d.path().join("w2");
        std::fs::create_dir(&work2).expect("mkdir");
        {
            let _m = mount_overlay(std::slice::from_ref(&lower), &upper, &work2, &merged, &[])
                .expect("mount again");
            assert_eq!(std::fs::read(merged.join("new")).expect("read"), b"x");
        }
        assert!(upper.join("new").exists());
        assert!(
            std::fs::symlink_metadata(upper.join("base")).is_ok(),
            "whiteout in upper"
        );
        assert!(crate::mounts_under(d.path()).expect("mountinfo").is_empty());
    }

    #[test]
    fn deep_stacks_mount() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: mounting needs root");
            return;
        }
        // 200 lowers with long paths: far past the 4 KiB of the classic option string.
        let d = tempfile::tempdir().expect("tmp");
        let long = "l".repeat(60);
        let lowers: Vec<PathBuf> = (0..200)
            .map(|i| {
                let p = d.path().join(format!("{long}-{i:03}"));
                std::fs::create_dir(&p).expect("mkdir");
                std::fs::write(p.join(format!("f{i}")), i.to_string()).expect("write");
                p
            })
            .collect();
        let (upper, work, merged, empty) = (
            d.path().join("u"),
            d.path().join("w"),
            d.path().join("m"),
            d.path().join("e"),
        );
        for p in [&upper, &work, &merged, &empty] {
            std::fs::create_dir(p).expect("mkdir");
        }
        {
            let _m = mount_overlay(&lowers, &upper, &work, &merged, &[]).expect("mount");
            assert_eq!(std::fs::read_to_string(merged.join("f0")).expect("f0"), "0");
            assert_eq!(
                std::fs::read_to_string(merged.join("f199")).expect("f199"),
                "199"
            );
        }
        {
            let _m = mount_overlay_ro(&lowers[..1], &merged, &empty).expect("ro mount");
            assert!(merged.join("f0").exists());
            assert!(std::fs::write(merged.join("x"), b"x").is_err(), "read-only");
        }
        assert!(crate::mounts_under(d.path()).expect("mountinfo").is_empty());
    }
}
