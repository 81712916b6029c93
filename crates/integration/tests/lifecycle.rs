//! The daemon's life: one per data root, refusing bad config at start, telling systemd it
//! is ready, shutting down cleanly on SIGTERM, and a store that survives SIGKILL in the
//! middle of a load or a save.

use isula_integration::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn second_daemon_on_same_data_root_refuses() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let other_socket = d.dir.path().join("other.sock");
    let out = d.command_on(&other_socket).output().expect("second daemon");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another isula-builder is already running on data root"),
        "{err}"
    );
    assert!(!other_socket.exists());
    // The first one is unharmed.
    assert!(d.cli(&["version"]).status.success());
}

#[test]
fn bad_config_files_stop_the_start() {
    if !require_root() {
        return;
    }
    let cases: [(&str, &str, u32, &str); 4] = [
        (
            "registries.toml",
            "[registries.search]\nregistries = [\"a\"\n",
            0o600,
            "registries.toml",
        ),
        (
            "configuration.toml",
            "loglevel = \"chatty\"\n",
            0o600,
            "invalid log level",
        ),
        (
            "policy.json",
            "{\"default\":[{\"type\":\"madeUp\"}]}",
            0o600,
            "not supported",
        ),
        (
            "storage.toml",
            "[storage]\ndriver = \"overlay\"\n",
            0o666,
            "too open",
        ),
    ];
    for (name, text, mode, want) in cases {
        let dir = tempfile::tempdir().expect("tmp");
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).expect("etc");
        std::fs::write(etc.join(name), text).expect("write");
        std::fs::set_permissions(etc.join(name), std::fs::Permissions::from_mode(mode))
            .expect("chmod");
        let out = std::process::Command::new(bin("isula-builder"))
            .arg("--dataroot")
            .arg(dir.path().join("data"))
            .arg("--runroot")
            .arg(dir.path().join("run"))
            .arg("--config-dir")
            .arg(&etc)
            .arg("--host")
            .arg(format!("unix://{}", dir.path().join("s.sock").display()))
            .output()
            .expect("daemon");
        assert!(!out.status.success(), "{name}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
        assert!(!dir.path().join("s.sock").exists());
        assert!(
            !dir.path().join("data").exists(),
            "{name}: nothing may be created"
        );
    }
}

#[test]
fn sigterm_leaves_no_socket_or_mounts_and_notifies_systemd() {
    if !require_root() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let notify = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).expect("notify socket");
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut d = Daemon::start_with(&[]);
    d.stop();
    // Start again under a fake systemd notify socket.
    let log = std::fs::File::create(dir.path().join("log")).expect("log");
    let mut child = d
        .command()
        .env("NOTIFY_SOCKET", &notify)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 64];
    let n = listener.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(&buf[..n], b"READY=1");
    assert!(d.socket().exists());
    assert!(d.cli(&["version"]).status.success());
    d.child = Some(child.try_clone_handle());
    assert_eq!(d.stop(), Some(0));
    let _ = child.wait();
    assert!(!d.socket().exists(), "socket left behind");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for root in [d.data(), d.run_root()] {
        assert!(
            !mounts.contains(root.to_str().expect("utf8")),
            "mount left under {}",
            root.display()
        );
    }
}

trait CloneHandle {
    fn try_clone_handle(&mut self) -> std::process::Child;
}

impl CloneHandle for std::process::Child {
    /// Hands the process to the Daemon helper, which signals and reaps it.
    fn try_clone_handle(&mut self) -> std::process::Child {
        std::mem::replace(
            self,
            std::process::Command::new("true")
                .spawn()
                .expect("placeholder process"),
        )
    }
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn sigkill_during_load_and_save_leaves_a_consistent_store() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let mut d = Daemon::start();
    let src = work.path().join("big.tar");
    std::fs::write(&src, big_rootfs(400)).expect("write");
    let id_line = d.ok(&["ctr-img", "import", src.to_str().expect("utf8"), "big:1"]);
    assert!(id_line.contains("Import success"));
    std::fs::remove_file(&src).expect("rm");
    let archive = work.path().join("big-archive.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "big:1",
        "-o",
        archive.to_str().expect("utf8"),
    ]);
    d.ok(&["ctr-img", "rm", "big:1"]);
    let empty = d.store_snapshot();

    // Load, killed while the layer streams into the ingest area.
    let mut client = d
        .cli_command(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("load");
    let ingest = d.data().join("ingest");
    wait_until("the load to be under way", Duration::from_secs(60), || {
        dir_bytes(&ingest) > 20 << 20
    });
    d.kill();
    let _ = client.wait();
    assert!(dir_bytes(&ingest) > 0, "the kill must land mid-load");
    d.restart();
    assert!(d.images().is_empty(), "a half-loaded image is listed");
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
    assert_eq!(d.store_snapshot(), empty, "the crash left data behind");
    let out = d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    assert!(out.contains("Loaded image as "), "{out}");
    assert_eq!(d.images().len(), 1);
    let loaded = d.store_snapshot();

    // Save, killed while the archive is being written (it has no name yet).
    let dest = work.path().join("out").join("saved.tar");
    std::fs::create_dir(dest.parent().expect("parent")).expect("mkdir");
    let mut client = d
        .cli_command(&[
            "ctr-img",
            "save",
            "big:1",
            "-o",
            dest.to_str().expect("utf8"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("save");
    let pid = d.pid();
    let out_dir = dest
        .parent()
        .expect("parent")
        .to_str()
        .expect("utf8")
        .to_string();
    wait_until("the save to be under way", Duration::from_secs(60), || {
        std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|rd| {
            rd.flatten().any(|fd| {
                std::fs::read_link(fd.path())
                    .is_ok_and(|t| t.to_string_lossy().starts_with(&out_dir))
                    && std::fs::metadata(fd.path()).is_ok_and(|m| m.len() > 20 << 20)
            })
        })
    });
    d.kill();
    let _ = client.wait();
    assert_eq!(
        std::fs::read_dir(dest.parent().expect("parent"))
            .expect("ls")
            .count(),
        0,
        "partial or temp file left"
    );
    d.restart();
    assert_eq!(d.store_snapshot(), loaded);
    d.ok(&[
        "ctr-img",
        "save",
        "big:1",
        "-o",
        dest.to_str().expect("utf8"),
    ]);
    assert_eq!(
        std::fs::metadata(&dest).expect("saved").len(),
        std::fs::metadata(&archive).expect("a").len()
    );
    d.stop();
    let check = d.command().arg("--check-store").output().expect("check");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn sigterm_cancels_a_running_load_and_cleans_up() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let mut d = Daemon::start();
    let src = work.path().join("big.tar");
    std::fs::write(&src, big_rootfs(300)).expect("write");
    let mut client = d
        .cli_command(&["ctr-img", "import", src.to_str().expect("utf8"), "big:1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("import");
    let ingest = d.data().join("ingest");
    wait_until(
        "the import to be under way",
        Duration::from_secs(60),
        || dir_bytes(&ingest) > 10 << 20,
    );
    assert_eq!(d.stop(), Some(0));
    let status = client.wait().expect("client");
    assert!(
        !status.success(),
        "the import must fail when the daemon stops"
    );
    assert!(
        d.leftovers().is_empty(),
        "cancelled work left {:?}",
        d.leftovers()
    );
    assert!(!d.socket().exists());
}

#[test]
fn starts_on_isula_build_0_9_6_default_files_and_names_unknown_keys() {
    if !require_root() {
        return;
    }
    // The roots the file names are overridden by the test's flags (nothing touches /var).
    let d = Daemon::start_configured(
        &[
            (
                "configuration.toml",
                "debug = false\nloglevel = \"\"\ngroup = \"isula\"\nrun_root = \"/var/run/isula-build/\"\ndata_root = \"/var/lib/isula-build/\"\nruntime = \"\"\nnewer_key = true\n",
            ),
            (
                "storage.toml",
                "[storage]\ndriver = \"overlay\"\n\n[storage.options.overlay]\nmountopt = \"nodev\"\n",
            ),
        ],
        &[],
        &[],
    );
    d.import_busybox("busybox:latest", &[]);
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo ran-in-runc\n",
    )
    .expect("df");
    let out = d.ok(&["ctr-img", "build", ctx.to_str().expect("path")]);
    assert!(out.lines().any(|l| l == "ran-in-runc"), "{out}");
    let log = d.log();
    assert!(log.contains("unknown key \"newer_key\" ignored"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "colour escapes in a log that is not a terminal"
    );
}
