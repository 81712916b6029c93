//! A client that is not root (a member of the socket's group) cannot make the daemon read
//! or write files it could not itself: client paths are opened with the client's identity.

use isula_integration::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;

const NOBODY: u32 = 65534;

#[test]
fn group_members_get_their_own_rights_not_the_daemons() {
    if !require_root() {
        return;
    }
    // The socket is root:nogroup 0660, so uid nobody (group nogroup) may connect.
    let d = Daemon::start_with(&["--group", "nogroup"]);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let meta = std::fs::metadata(d.socket()).expect("socket");
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, NOBODY));

    let work = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret_dir = work.path().join("root-only");
    std::fs::create_dir(&secret_dir).expect("mkdir");
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let secret = secret_dir.join("rootfs.tar");
    std::fs::write(&secret, busybox_rootfs(&[])).expect("write");
    let public = work.path().join("public.tar");
    std::fs::write(&public, busybox_rootfs(&[("etc/msg", b"public")])).expect("write");
    let mine = work.path().join("nobody-owned");
    std::fs::create_dir(&mine).expect("mkdir");
    std::os::unix::fs::chown(&mine, Some(NOBODY), Some(NOBODY)).expect("chown");

    let as_nobody = |args: &[&str]| {
        d.cli_command(args)
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("run as nobody")
    };
    let before = d.store_snapshot();
    // Whatever changes the store or its names is root's (the manual: every operation needs
    // root); the group grants reading and saving to one's own paths.
    for args in [
        vec![
            "ctr-img",
            "import",
            public.to_str().expect("utf8"),
            "public:1",
        ],
        vec!["ctr-img", "load", "-i", public.to_str().expect("utf8")],
        vec!["ctr-img", "rm", "-a"],
        vec!["ctr-img", "tag", "public:1", "busybox:latest"],
        vec!["ctr-img", "pull", "localhost:1/x:1"],
        vec!["logout", "-a"],
    ] {
        let o = as_nobody(&args);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("requires root"),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert_eq!(d.store_snapshot(), before);
    d.ok(&[
        "ctr-img",
        "import",
        public.to_str().expect("utf8"),
        "public:1",
    ]);
    let o = as_nobody(&["ctr-img", "images"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("public"));
    assert!(as_nobody(&["ctr-img", "inspect", "public:1"])
        .status
        .success());
    assert!(as_nobody(&["info"]).status.success());

    // Saving into a directory nobody cannot write is refused; into its own it works, and
    // the archive belongs to nobody.
    let o = as_nobody(&[
        "ctr-img",
        "save",
        "public:1",
        "-o",
        secret_dir.join("x.tar").to_str().expect("utf8"),
    ]);
    assert!(!o.status.success());
    let o = as_nobody(&[
        "ctr-img",
        "save",
        "public:1",
        "-o",
        work.path().join("x.tar").to_str().expect("utf8"),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("Permission denied"));
    assert!(!work.path().join("x.tar").exists());
    let out = mine.join("saved.tar");
    let o = as_nobody(&[
        "ctr-img",
        "save",
        "public:1",
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::metadata(&out).expect("saved").uid(), NOBODY);
    // Root still reads and writes anywhere.
    d.ok(&[
        "ctr-img",
        "import",
        secret.to_str().expect("utf8"),
        "root:1",
    ]);
}

/// The confused deputy: while a group member's saves run, its output directory keeps being
/// swapped for a symlink into a root-only directory. The archive is linked into place with
/// the member's identity, so nothing may ever appear there.
#[test]
fn swapping_a_save_directory_for_a_symlink_never_writes_where_the_caller_cannot() {
    if !require_root() {
        return;
    }
    let d = Daemon::start_with(&["--group", "nogroup"]);
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let work = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret_dir = work.path().join("root-only");
    std::fs::create_dir(&secret_dir).expect("mkdir");
    std::fs::set_permissions(&secret_dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let mine = work.path().join("mine");
    std::fs::create_dir(&mine).expect("mkdir");
    std::os::unix::fs::chown(&mine, Some(NOBODY), Some(NOBODY)).expect("chown");
    let real = mine.join("out");
    std::fs::create_dir(&real).expect("mkdir");
    std::os::unix::fs::chown(&real, Some(NOBODY), Some(NOBODY)).expect("chown");
    let evil = mine.join("evil");
    std::os::unix::fs::symlink(&secret_dir, &evil).expect("symlink");
    d.import_busybox("public:1", &[]);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, real, evil) = (stop.clone(), real.clone(), evil.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &real,
                    rustix::fs::CWD,
                    &evil,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .expect("exchange");
                swaps += 1;
            }
            swaps
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (mut saves, mut ok) = (0, 0);
    while std::time::Instant::now() < deadline {
        let out = real.join(format!("save-{saves}.tar"));
        let o = d
            .cli_command(&[
                "ctr-img",
                "save",
                "public:1",
                "-o",
                out.to_str().expect("utf8"),
            ])
            .uid(NOBODY)
            .gid(NOBODY)
            .output()
            .expect("save as nobody");
        saves += 1;
        ok += o.status.success() as u32;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().expect("swapper");
    let inside: Vec<_> = std::fs::read_dir(&secret_dir)
        .expect("read")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        inside.is_empty(),
        "files appeared in the root-only directory: {inside:?}"
    );
    assert!(saves > 20 && swaps > 1000, "saves {saves}, swaps {swaps}");
    eprintln!("{saves} saves ({ok} succeeded) against {swaps} swaps: nothing escaped");
}

#[test]
fn a_fifo_or_a_directory_as_input_is_refused_at_once() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let dir = tempfile::tempdir().expect("tmp");
    let fifo = dir.path().join("in.fifo");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .expect("mkfifo");
    let t = std::time::Instant::now();
    let err = d.fails(&["ctr-img", "load", "-i", fifo.to_str().expect("utf8")]);
    assert!(err.contains("is a FIFO"), "{err}");
    let err = d.fails(&["ctr-img", "import", fifo.to_str().expect("utf8"), "x:1"]);
    assert!(err.contains("is a FIFO"), "{err}");
    let err = d.fails(&[
        "ctr-img",
        "import",
        dir.path().to_str().expect("utf8"),
        "x:1",
    ]);
    assert!(err.contains("is a directory"), "{err}");
    assert!(t.elapsed() < std::time::Duration::from_secs(20));
    // And the daemon still stops at once.
    let mut d = d;
    assert_eq!(d.stop(), Some(0));
}
