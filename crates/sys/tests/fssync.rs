//! `FsSync` reports a writeback error: the store makes a layer directory durable with one
//! `syncfs` through a handle opened before anything was written there, and a failed
//! writeback must fail that commit, not report success. The error is made for real: an
//! ext4 file system on a loop device whose image lives on a tmpfs too small for it, so
//! the writeback of a file past the tmpfs's room fails in the loop device.

use isula_sys::FsSync;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A tmpfs of `room_mib`, holding a sparse image of `size_mib` with ext4 on it (no
/// journal: the data's writeback is what fails), mounted through a loop device.
struct Cramped {
    tmpfs: PathBuf,
    mount: PathBuf,
    device: Option<String>,
    _dir: tempfile::TempDir,
}

impl Cramped {
    fn new(room_mib: u64, size_mib: u64) -> Cramped {
        let dir = tempfile::tempdir().expect("tempdir");
        let tmpfs = dir.path().join("backing");
        let mount = dir.path().join("mnt");
        for d in [&tmpfs, &mount] {
            std::fs::create_dir(d).expect("dir");
        }
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={room_mib}m"), "tmpfs"])
            .arg(&tmpfs));
        let mut fs = Cramped {
            tmpfs,
            mount,
            device: None,
            _dir: dir,
        };
        let image = fs.tmpfs.join("fs.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size_mib << 20))
            .expect("image");
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F", "-O", "^has_journal"])
            .arg(&image));
        let device = run(Command::new("losetup").args(["-f", "--show"]).arg(&image));
        fs.device = Some(device.clone());
        run(Command::new("mount")
            .args(["-t", "ext4", &device])
            .arg(&fs.mount));
        fs
    }

    fn path(&self) -> &Path {
        &self.mount
    }
}

impl Drop for Cramped {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.mount, rustix::mount::UnmountFlags::DETACH);
        if let Some(d) = &self.device {
            let _ = Command::new("losetup").args(["-d", d]).output();
        }
        let _ = rustix::mount::unmount(&self.tmpfs, rustix::mount::UnmountFlags::DETACH);
    }
}

fn can_mount() -> bool {
    let root = rustix::process::geteuid().is_root();
    let tools = ["mkfs.ext4", "losetup"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !(root && tools) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run this as root with mkfs.ext4 and losetup"
        );
        eprintln!("skipping: needs root, mkfs.ext4 and losetup");
        return false;
    }
    true
}

/// Writes `mib` MiB of non-zero bytes to `path`, without syncing them.
fn write_file(path: &Path, mib: usize) {
    let mut f = std::fs::File::create(path).expect("create");
    let piece: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..mib {
        f.write_all(&piece).expect("write (into the page cache)");
    }
}

#[test]
fn a_writeback_error_fails_every_handle_opened_before_it_and_only_those() {
    if !can_mount() {
        return;
    }
    // 24 MiB of room under a 128 MiB file system.
    let fs = Cramped::new(24, 128);
    let early = FsSync::open(fs.path()).expect("handle before the writes");
    let other = FsSync::open(fs.path()).expect("a second early handle");
    // The control: what fits is written back, and the handle says so.
    write_file(&fs.path().join("small"), 1);
    early.sync().expect("a writeback that fits succeeds");
    // 48 MiB cannot fit: its writeback fails in the loop device.
    write_file(&fs.path().join("big"), 48);
    let seen_by_other = other.sync();
    assert!(
        seen_by_other.is_err(),
        "the writeback of 48 MiB into 24 MiB of room did not fail: the test cannot tell"
    );
    // Opened after the error: the kernel sampled the error sequence then.
    let late = FsSync::open(fs.path()).expect("handle after the error");
    // The early handle still reports it (another handle's sync did not take it away) ...
    let e = early
        .sync()
        .expect_err("a handle opened before the writes must report their failed writeback");
    let text = e.to_string();
    assert!(text.contains("syncfs"), "{text}");
    assert!(
        text.contains(&fs.path().display().to_string()),
        "the error names the file system's directory: {text}"
    );
    // ... once; and a handle opened after it never sees it, which is why the store opens
    // its handle before anything is written.
    early.sync().expect("reported once");
    late.sync()
        .expect("a handle opened after the error does not see it");
}
