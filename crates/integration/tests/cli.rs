//! Client behaviour: shell completion, the install script, several images in one archive,
//! and a client that goes away cancelling its operation on the daemon.

use isula_integration::*;
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn completion_scripts_for_both_binaries() {
    for (binary, word) in [("isula-build", "ctr-img"), ("isula-builder", "--dataroot")] {
        for shell in ["bash", "zsh"] {
            let out = run_ok(Command::new(bin(binary)).args(["completion", shell]));
            assert!(out.contains(word), "{binary} {shell}");
        }
    }
}

#[test]
fn install_script_stages_a_working_configuration() {
    if !require_root() {
        return;
    }
    let stage = tempfile::tempdir().expect("tmp");
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    // Install the debug binaries already built instead of building a release.
    let release = repo.join("target/release");
    let had_release =
        release.join("isula-builder").exists() && release.join("isula-build").exists();
    // Copies made here go again when the test ends: a later run must not install them
    // as if they were a release build of newer code.
    let _copies = RemoveOnDrop(if had_release {
        Vec::new()
    } else {
        ["isula-builder", "isula-build"]
            .iter()
            .map(|b| release.join(b))
            .collect()
    });
    if !had_release {
        std::fs::create_dir_all(&release).expect("mkdir");
        for b in ["isula-builder", "isula-build"] {
            std::fs::copy(bin(b), release.join(b)).expect("copy");
        }
    }
    run_ok(
        Command::new(repo.join("scripts/install.sh"))
            .arg("--no-build")
            .env("DESTDIR", stage.path()),
    );
    let etc = stage.path().join("etc/isula-build");
    for f in [
        "configuration.toml",
        "storage.toml",
        "registries.toml",
        "policy.json",
    ] {
        assert!(etc.join(f).is_file(), "{f}");
    }
    assert!(stage
        .path()
        .join("usr/lib/systemd/system/isula-build.service")
        .is_file());
    // The staged daemon starts on the staged configuration.
    let work = tempfile::tempdir().expect("tmp");
    let sock = work.path().join("s.sock");
    let child = Command::new(stage.path().join("usr/bin/isula-builder"))
        .arg("--config-dir")
        .arg(&etc)
        .arg("--dataroot")
        .arg(work.path().join("data"))
        .arg("--runroot")
        .arg(work.path().join("run"))
        .arg("--host")
        .arg(format!("unix://{}", sock.display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("daemon");
    let _stop = KillOnDrop(child);
    wait_until(
        "the installed daemon to serve its staged configuration",
        Duration::from_secs(20),
        || {
            Command::new(stage.path().join("usr/bin/isula-build"))
                .args(["--host", &format!("unix://{}", sock.display()), "info"])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    );
}

/// Removes files when the test ends, passing or not.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Kills (and reaps) a process when the test ends, passing or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn one_docker_archive_carries_several_images() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    let mut ids = Vec::new();
    for n in ["one", "two"] {
        let p = work.path().join(format!("{n}.tar"));
        std::fs::write(&p, busybox_rootfs(&[("etc/name", n.as_bytes())])).expect("write");
        let out = d.ok(&[
            "ctr-img",
            "import",
            p.to_str().expect("utf8"),
            &format!("multi/{n}:1"),
        ]);
        ids.push(import_id(&out));
    }
    let archive = work.path().join("both.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "multi/one:1",
        "multi/two:1",
        "-o",
        archive.to_str().expect("utf8"),
    ]);
    let err = d.fails(&[
        "ctr-img",
        "save",
        "multi/one:1",
        "multi/two:1",
        "-f",
        "oci",
        "-o",
        work.path().join("x.tar").to_str().expect("utf8"),
    ]);
    assert!(err.contains("only supports saving single image"), "{err}");
    d.ok(&["ctr-img", "rm", "-a"]);
    let out = d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    for id in &ids {
        assert!(out.contains(&format!("Loaded image as {id}\n")), "{out}");
    }
    let mut rows = d.images();
    rows.sort();
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].0.as_str(), rows[1].0.as_str()),
        ("multi/one", "multi/two")
    );
}

#[test]
fn killing_the_client_cancels_its_import() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    // 300 MB that the daemon must read, hash and unpack: long enough to be caught mid-way.
    let src = work.path().join("big.tar");
    std::fs::write(&src, big_rootfs(300)).expect("write");
    let mut client = d
        .cli_command(&["ctr-img", "import", src.to_str().expect("utf8"), "big:1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    let ingest = d.data().join("ingest");
    wait_until("the import to start", Duration::from_secs(60), || {
        std::fs::read_dir(&ingest).map(|r| r.count()).unwrap_or(0) > 0
    });
    client.kill().expect("kill client");
    let _ = client.wait();
    wait_until(
        "the daemon to clean up (5 s)",
        Duration::from_secs(5),
        || d.leftovers().is_empty(),
    );
    assert!(
        d.images().is_empty(),
        "a cancelled import must not leave an image"
    );
    assert!(d.log().contains("operation cancelled"), "{}", d.log());
}

#[test]
fn usage_errors_exit_1_as_isula_build_does() {
    let code = |binary: &str, args: &[&str]| {
        let o = Command::new(bin(binary)).args(args).output().expect("run");
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    assert_eq!(code("isula-build", &["--bogus"]).0, Some(1));
    assert_eq!(code("isula-build", &["ctr-img", "frobnicate"]).0, Some(1));
    assert_eq!(
        code("isula-build", &["ctr-img", "build", "--bogus"]).0,
        Some(1)
    );
    assert_eq!(code("isula-builder", &["--bogus"]).0, Some(1));
    // Help, version, and a command group named alone (its help on stdout) exit 0.
    assert_eq!(code("isula-build", &["--help"]).0, Some(0));
    assert_eq!(code("isula-build", &["-v"]).0, Some(0));
    let (status, out) = code("isula-build", &["ctr-img"]);
    assert_eq!(status, Some(0));
    assert!(out.contains("Usage"), "{out}");
}

#[test]
fn global_timeout_and_log_level_and_honest_info() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    // --timeout: a Go duration within [100ms, 120s], used for the health check.
    let err = d.fails(&["--timeout", "50ms", "ctr-img", "images"]);
    assert!(err.contains("invalid timeout value: 50ms"), "{err}");
    let err = d.fails(&["--timeout", "soon", "ctr-img", "images"]);
    assert!(err.contains("invalid duration"), "{err}");
    d.ok(&["--timeout", "500ms", "ctr-img", "images"]);
    d.ok(&["--log-level", "debug", "ctr-img", "images"]);
    let err = d.fails(&["--log-level", "loud", "ctr-img", "images"]);
    assert!(err.contains("loud"), "{err}");
    // No daemon behind the socket: the original's message, within the timeout.
    let o = Command::new(bin("isula-build"))
        .args([
            "--timeout",
            "200ms",
            "--host",
            "unix:///nonexistent/isula.sock",
        ])
        .args(["ctr-img", "images"])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Cannot connect to the isula-builder"),
        "{o:?}"
    );
    // info -V: every runtime figure is measured, none is a placeholder zero.
    let out = d.ok(&["info", "-V"]);
    for field in ["MemSys", "HeapSys", "HeapAlloc", "HeapInUse", "Threads"] {
        let value: u64 = out
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("{field} missing in {out}"))
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{field} is not a number in {out}"));
        assert!(value > 0, "{field} is 0 in {out}");
    }
}

#[test]
fn inspect_and_history_show_the_config_and_steps() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    let long = "x".repeat(60);
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM busybox\nLABEL a=b\nRUN echo {long} > /f\n"),
    )
    .expect("df");
    let id = build_id(&d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "hist:1",
        ctx.to_str().expect("ctx"),
    ]));
    let doc: serde_json::Value =
        serde_json::from_str(&d.ok(&["ctr-img", "inspect", "hist:1"])).expect("json");
    assert_eq!(doc[0]["Id"], format!("sha256:{id}"));
    assert_eq!(doc[0]["RepoTags"][0], "hist:1");
    assert_eq!(doc[0]["Config"]["config"]["Labels"]["a"], "b");
    assert_eq!(
        doc[0]["Manifest"]["config"]["digest"],
        format!("sha256:{id}")
    );
    let out = d.ok(&["ctr-img", "history", "hist:1"]);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| !l.starts_with('-') && !l.starts_with("IMAGE"))
        .collect();
    // The base was loaded from an archive without history: the build's two steps.
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].starts_with(&id[..12]), "{out}");
    assert!(rows[0].contains("RUN") && rows[0].contains("..."), "{out}");
    assert!(
        !rows[0].contains("MB"),
        "the RUN's layer, not the base's: {out}"
    );
    assert!(
        rows[1].starts_with("<missing>") && rows[1].contains("LABEL a=b"),
        "{out}"
    );
    let full = d.ok(&["ctr-img", "history", "--no-trunc", "hist:1"]);
    assert!(full.contains(&long), "{full}");
    let err = d.fails(&["ctr-img", "inspect", "nothere:1"]);
    assert!(err.contains("nothere:1"), "{err}");
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let client = bin("isula-build");
    let run = |reader: &str| {
        Command::new("bash")
            .args([
                "-c",
                // The client starts once the reader had time to go (or to be there).
                &format!("set -o pipefail; (sleep 0.3; exec \"$0\" version) | {reader}"),
                client.to_str().expect("utf8"),
            ])
            .env(
                "ISULABUILD_HOST",
                format!("unix://{}", d.socket().display()),
            )
            .output()
            .expect("bash")
    };
    // The reader is gone before anything is written: SIGPIPE's exit, no panic.
    let o = run("true");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked") && err.is_empty(), "{err}");
    // The positive control: a reader that reads it all sees both sections.
    let o = run("cat");
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Client:") && out.contains("Server:"), "{out}");
}
