//! Power cuts for tests: a small ext4 file system on a loop device that a test puts a data
//! root on, shuts down at once without flushing its journal (`EXT4_IOC_SHUTDOWN` with
//! `EXT4_GOING_FLAGS_NOLOGFLUSH`: what is not yet durable is lost, as in a power cut), and
//! mounts again (the journal replays what was committed), as a machine coming back does.

use crate::{runc_containers, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct Ext4 {
    image: PathBuf,
    mount: PathBuf,
    /// The tmpfs the image lives on ([`Ext4::cramped`]), unmounted last.
    tmpfs: Option<PathBuf>,
    _dir: tempfile::TempDir,
    /// The loop device it is mounted from (a new one at each mount: were the old one's
    /// shut-down superblock still held by anything, `mount -o loop` would reuse it).
    device: Option<String>,
}

/// `mkfs.ext4`, `losetup` and `mount` are needed (and root): in CI they must be there.
pub fn available() -> bool {
    crate::require_root() && crate::require_tool("mkfs.ext4")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Ext4 {
    /// A new ext4 file system of `size_mib` (a sparse image on the disk), mounted.
    pub fn new(size_mib: u64) -> Ext4 {
        // The image beside the test binary, on the disk (a tmpfs /tmp would do too: the
        // loop device's writes are what the shutdown cuts).
        let exe = std::env::current_exe().expect("test binary");
        let dir = tempfile::Builder::new()
            .prefix("isula-powercut-")
            .tempdir_in(exe.parent().expect("its directory"))
            .expect("tempdir");
        let image = dir.path().join("fs.img");
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(size_mib << 20).expect("size");
        drop(f);
        run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).expect("mount point");
        let mut fs = Ext4 {
            image,
            mount,
            tmpfs: None,
            _dir: dir,
            device: None,
        };
        fs.mount();
        fs
    }

    /// A disk that fails under the store: an ext4 file system of `size_mib` whose image
    /// lives on a tmpfs of only `room_mib`, so that writing back more than that fails in
    /// the loop device (EIO), as a failing disk's writes do.
    pub fn cramped(room_mib: u64, size_mib: u64) -> Ext4 {
        let dir = tempfile::Builder::new()
            .prefix("isula-cramped-")
            .tempdir()
            .expect("tempdir");
        let tmpfs = dir.path().join("backing");
        let mount = dir.path().join("mnt");
        for d in [&tmpfs, &mount] {
            std::fs::create_dir(d).expect("dir");
        }
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={room_mib}m"), "tmpfs"])
            .arg(&tmpfs));
        let image = tmpfs.join("fs.img");
        let mut fs = Ext4 {
            image: image.clone(),
            mount,
            tmpfs: Some(tmpfs),
            _dir: dir,
            device: None,
        };
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("image");
        // No journal (the data's writeback is what fails, and nothing else), and the inode
        // tables are not written out at once: they would not fit.
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1"])
            .arg(&image));
        fs.mount();
        fs
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }

    fn mount(&mut self) {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&self.image)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mounted = Command::new("mount")
            .args(["-t", "ext4", &device])
            .arg(&self.mount)
            .output()
            .expect("mount");
        if !mounted.status.success() {
            let _ = Command::new("losetup").args(["-d", &device]).output();
            panic!(
                "mounting {device}: {}",
                String::from_utf8_lossy(&mounted.stderr)
            );
        }
        self.device = Some(device);
    }

    /// The power cut: everything not yet on the disk is gone; every later access fails.
    pub fn cut(&self) {
        isula_sys::shutdown_fs_without_flush(&self.mount).expect("EXT4_IOC_SHUTDOWN");
    }

    /// Unmounts it (and first whatever is mounted below it or below `also`, as a reboot
    /// would), then mounts it again.
    pub fn remount(&mut self, also: &[&Path]) {
        self.unmount(also);
        self.mount();
    }

    fn unmount(&mut self, also: &[&Path]) {
        let Some(device) = self.device.clone() else {
            return;
        };
        // The overlays of a build the cut stopped, below the run root, hold the file system.
        for dir in also.iter().copied().chain([self.mount.as_path()]) {
            for p in isula_sys::mount::mounts_below(dir) {
                let _ = rustix::mount::unmount(&p, rustix::mount::UnmountFlags::DETACH);
            }
        }
        // The dead daemon's and containers' files are closed by the time they are reaped,
        // but the kernel may drop the last references to the file system a moment later:
        // an EBUSY is tried again for up to 10 s.
        let mut last = None;
        for _ in 0..100 {
            match rustix::mount::unmount(&self.mount, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => {
                    self.device = None;
                    // Detached now, or (still held) as soon as its last user goes.
                    let _ = Command::new("losetup").args(["-d", &device]).output();
                    return;
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("unmounting {}: {last:?}", self.mount.display());
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        if self.device.is_some() && !std::thread::panicking() {
            self.unmount(&[]);
        } else if let Some(device) = &self.device {
            let _ = rustix::mount::unmount(&self.mount, rustix::mount::UnmountFlags::DETACH);
            let _ = Command::new("losetup").args(["-d", device]).output();
        }
        if let Some(t) = &self.tmpfs {
            let _ = rustix::mount::unmount(t, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

/// A daemon whose data root and config directory are on `fs`.
pub fn daemon_on(fs: &Ext4, files: &[(&str, &str)], extra: &[&str]) -> Daemon {
    Daemon::start_in(Some(fs.path()), files, extra, &[])
}

/// The power cut and the machine coming back: the file system is shut down at once, the
/// daemon and its containers die with it, the run root (a tmpfs on a real machine) is
/// emptied, the file system is mounted again and the daemon started.
pub fn cut_and_restart(fs: &mut Ext4, d: &mut Daemon) {
    fs.cut();
    crash(fs, d);
    d.restart();
}

/// [`cut_and_restart`] after the cut has happened (the daemon may still be running).
pub fn crash(fs: &mut Ext4, d: &mut Daemon) {
    d.kill();
    let runc_root = d.run_root().join("runc");
    for id in runc_containers(&runc_root) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["kill", "-a", &id, "KILL"])
            .output();
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["delete", "-f", &id])
            .output();
    }
    let run = d.run_root();
    fs.remount(&[&run]);
    if run.exists() {
        isula_sys::rooted::remove_tree(&run).expect("empty the run root");
    }
}
