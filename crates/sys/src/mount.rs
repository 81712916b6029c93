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

/// Mounts an overlay at `target`: `lowers` top first (at least one), `upper` and `work` on
/// the same file system. `options` are extra mount options (`nodev`, ...).
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
    options: &[String],
) -> Result<MountGuard> {
    if lowers.is_empty() {
        return Err(SysError::new(
            "mount overlay",
            target,
            rustix::io::Errno::INVAL,
        ));
    }
    let lower = lowers
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let mut data = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        upper.display(),
        work.display()
    );
    let mut flags = MountFlags::empty();
    for o in options.iter().flat_map(|o| o.split(',')) {
        match o {
            "nodev" => flags |= MountFlags::NODEV,
            "nosuid" => flags |= MountFlags::NOSUID,
            "noexec" => flags |= MountFlags::NOEXEC,
            "noatime" => flags |= MountFlags::NOATIME,
            "" => {}
            other => {
                data.push(',');
                data.push_str(other);
            }
        }
    }
    if data.len() >= 4096 {
        return Err(SysError::io(
            "mount overlay",
            target,
            std::io::Error::other(format!(
                "{} lower layers make the mount options too long",
                lowers.len()
            )),
        ));
    }
    let data = std::ffi::CString::new(data)
        .map_err(|_| SysError::new("mount overlay", target, rustix::io::Errno::INVAL))?;
    rustix::mount::mount("overlay", target, "overlay", flags, Some(data.as_c_str()))
        .map_err(|e| SysError::new("mount overlay", target, e))?;
    Ok(MountGuard {
        target: target.to_path_buf(),
        mounted: true,
    })
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
                &["nodev".into()],
            )
            .expect("mount");
            assert_eq!(
                std::fs::read(merged.join("base")).expect("read"),
                b"from lower"
            );
            std::fs::write(merged.join("new"), b"x").expect("write");
            std::fs::remove_file(merged.join("base")).expect("rm");
        }
        assert!(!merged.join("new").exists(), "unmounted on drop");
        assert!(upper.join("new").exists());
        assert!(
            std::fs::symlink_metadata(upper.join("base")).is_ok(),
            "whiteout in upper"
        );
        assert!(crate::mounts_under(d.path()).expect("mountinfo").is_empty());
    }
}
