//! SIGKILL of the daemon in the middle of operations. After each, the restarted daemon must
//! have cleaned up what the dead one left (RUN containers, mounts, work and temp
//! directories), `--check-store` must pass, and the same operation must then work.

use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn listing(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn mounts_under(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| std::path::Path::new(p).starts_with(dir) && std::path::Path::new(p) != dir)
        .map(String::from)
        .collect()
}

/// The sockets the daemon has open (its listener and one per client connection).
fn daemon_sockets(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|t| t.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// Kills the daemon once `ready` holds (the operation is under way), then restarts it.
fn kill_during(d: &mut Daemon, args: &[&str], what: &str, ready: impl FnMut() -> bool) {
    let mut client: Child = d
        .cli_command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    wait_until(what, Duration::from_secs(60), ready);
    d.kill();
    let _ = client.wait();
    d.restart();
}

/// Everything a crash could leave is gone, and the store checks out.
fn assert_recovered(d: &mut Daemon, what: &str) {
    let runc_root = d.run_root().join("runc");
    assert!(
        runc_containers(&runc_root).is_empty(),
        "{what}: a RUN container is left"
    );
    assert!(
        mounts_under(&d.run_root()).is_empty() && mounts_under(&d.data()).is_empty(),
        "{what}: mounts left: {:?} {:?}",
        mounts_under(&d.run_root()),
        mounts_under(&d.data())
    );
    assert!(
        listing(&d.run_root().join("builds")).is_empty(),
        "{what}: build work left"
    );
    assert!(
        listing(&d.data().join("ingest")).is_empty(),
        "{what}: ingest left"
    );
    eprintln!("{what}: recovered; checking the store");
    d.stop_and_check_store();
    d.restart();
}

#[test]
fn sigkill_during_run_copy_import_pull_push_rm_and_tag() {
    if !require_root() || !require_tool("runc") || !require_tool("docker-registry") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let mut d = Daemon::for_registries(&[&reg.host()]);
    d.load_fixed_busybox("busybox:latest");
    let work = tempfile::tempdir().expect("tmp");
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");

    // A RUN: its container keeps running after the daemon dies; the next start removes it.
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nRUN sleep 60\n").expect("df");
    let runc_root = d.run_root().join("runc");
    kill_during(
        &mut d,
        &["ctr-img", "build", ctx.to_str().expect("ctx")],
        "the RUN to start",
        || !runc_containers(&runc_root).is_empty(),
    );
    assert_recovered(&mut d, "RUN");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo ran > /ran\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "ran:1",
        ctx.to_str().expect("ctx"),
    ]);

    // A big COPY: killed while the build's work directory fills.
    std::fs::write(ctx.join("big.bin"), vec![7u8; 150 << 20]).expect("big");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY big.bin /big.bin\n",
    )
    .expect("df");
    let builds = d.run_root().join("builds");
    kill_during(
        &mut d,
        &["ctr-img", "build", ctx.to_str().expect("ctx")],
        "the COPY to be under way",
        || !listing(&builds).is_empty(),
    );
    assert_recovered(&mut d, "COPY");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "copied:1",
        ctx.to_str().expect("ctx"),
    ]);
    std::fs::remove_file(ctx.join("big.bin")).expect("rm");

    // An import, killed while its layer streams in.
    let rootfs = work.path().join("big.tar");
    std::fs::write(&rootfs, big_rootfs(150)).expect("rootfs");
    let ingest = d.data().join("ingest");
    kill_during(
        &mut d,
        &[
            "ctr-img",
            "import",
            rootfs.to_str().expect("utf8"),
            "imported:1",
        ],
        "the import to be under way",
        || !listing(&ingest).is_empty(),
    );
    assert_recovered(&mut d, "import");
    d.ok(&[
        "ctr-img",
        "import",
        rootfs.to_str().expect("utf8"),
        "imported:1",
    ]);

    // A push and a pull of that image, each killed half way.
    let remote = format!("{}/faults/big:1", reg.host());
    d.ok(&["ctr-img", "tag", "imported:1", &remote]);
    d.wait_idle();
    let uploads = || {
        reg.count_requests("PATCH", "/v2/faults/big/blobs/uploads/")
            + reg.count_requests("PUT", "/v2/faults/big/blobs/uploads/")
    };
    let before = uploads();
    let reg_dir = reg.dir.path().join("data");
    let reg_bytes = || {
        fn walk(p: &std::path::Path) -> u64 {
            std::fs::read_dir(p)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| match e.metadata() {
                            Ok(m) if m.is_dir() => walk(&e.path()),
                            Ok(m) => m.len(),
                            Err(_) => 0,
                        })
                        .sum()
                })
                .unwrap_or(0)
        }
        walk(&reg_dir)
    };
    let start_bytes = reg_bytes();
    kill_during(
        &mut d,
        &["ctr-img", "push", &remote],
        "the push to be under way",
        || uploads() > before || reg_bytes() > start_bytes + (1 << 20),
    );
    assert_recovered(&mut d, "push");
    d.ok(&["ctr-img", "push", &remote]);
    d.ok(&["ctr-img", "rm", &remote, "imported:1"]);
    kill_during(
        &mut d,
        &["ctr-img", "pull", &remote],
        "the pull to be under way",
        || !listing(&ingest).is_empty(),
    );
    assert_recovered(&mut d, "pull");
    d.ok(&["ctr-img", "pull", &remote]);

    // rm and tag are quick: killed as soon as the client's connection is in the daemon,
    // whichever way it lands (before, during or after the metadata write).
    for (args, what) in [
        (vec!["ctr-img", "tag", "ran:1", "ran:2"], "tag"),
        (vec!["ctr-img", "rm", "copied:1"], "rm"),
    ] {
        let connections = daemon_sockets(&d);
        let mut client = d
            .cli_command(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("client");
        wait_until(
            "the client's connection to reach the daemon",
            Duration::from_secs(20),
            || daemon_sockets(&d) > connections || client.try_wait().is_ok_and(|s| s.is_some()),
        );
        d.kill();
        let _ = client.wait();
        d.restart();
        assert_recovered(&mut d, what);
        // Done before the kill or not at all: either way the names are whole, and doing it
        // (again) works.
        let copied_there = d.images().iter().any(|(r, _, _)| r == "copied");
        if what == "tag" || copied_there {
            d.ok(&args);
        }
    }
    assert!(d.images().iter().any(|(r, t, _)| r == "ran" && t == "2"));
}

/// Flips one byte in the middle of a stored blob.
fn corrupt(path: &std::path::Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open blob");
    let len = f.metadata().expect("stat").len();
    let at = len / 2;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut b).expect("read");
    f.seek(SeekFrom::Start(at)).expect("seek");
    f.write_all(&[b[0] ^ 0xff]).expect("write");
}

#[test]
fn a_blob_corrupted_on_disk_is_caught_when_next_used() {
    if !require_root() || !require_tool("docker-registry") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    // The gzip form is made by a first push (to another registry) and kept.
    let first = Registry::start(RegistryOptions::default());
    let d = Daemon::for_registries(&[&reg.host(), &first.host()]);
    let id = d.import_busybox("victim:1", &[]);
    let made = format!("{}/faults/victim:1", first.host());
    d.ok(&["ctr-img", "tag", "victim:1", &made]);
    d.ok(&["ctr-img", "push", &made]);
    d.wait_idle();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.data().join("metadata.json")).expect("metadata"),
    )
    .expect("json");
    let img = &meta["images"][format!("sha256:{id}")];
    let layer = img["blobs"][0].as_str().expect("layer blob").to_string();
    let gz = meta["compressed"][&layer]["digest"]
        .as_str()
        .expect("its gzip form")
        .to_string();
    let blob_path = |d_: &str| {
        d.data()
            .join("blobs/sha256")
            .join(d_.trim_start_matches("sha256:"))
    };
    // The gzip form, as a push sends it.
    corrupt(&blob_path(&gz));
    let remote = format!("{}/faults/victim:1", reg.host());
    d.ok(&["ctr-img", "tag", "victim:1", &remote]);
    let err = d.fails(&["ctr-img", "push", &remote]);
    assert!(
        err.contains(gz.trim_start_matches("sha256:")) || err.to_lowercase().contains("digest"),
        "{err}"
    );
    // The layer itself, as a save reads it.
    corrupt(&blob_path(&layer));
    let out = tempfile::tempdir().expect("tmp");
    let err = d.fails(&[
        "ctr-img",
        "save",
        "victim:1",
        "-o",
        out.path().join("v.tar").to_str().expect("utf8"),
    ]);
    assert!(err.to_lowercase().contains("digest"), "{err}");
    assert!(!out.path().join("v.tar").exists(), "a bad archive was left");
}

/// Imports a busybox image with 300 MB of incompressible data as `big:1` (through `dir`).
fn import_big(d: &Daemon, dir: &std::path::Path) {
    let rootfs = dir.join("big.tar");
    std::fs::write(&rootfs, big_rootfs(300)).expect("rootfs");
    d.ok(&["ctr-img", "import", rootfs.to_str().expect("utf8"), "big:1"]);
    std::fs::remove_file(&rootfs).expect("rm");
}

/// Whether the daemon holds a file open under `dir` (a save's nameless archive shows there).
fn daemon_has_open_under(d: &Daemon, dir: &std::path::Path) -> bool {
    pid_has_open_under(d.pid(), dir)
}

fn pid_has_open_under(pid: i32, dir: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten().any(|e| {
                std::fs::read_link(e.path())
                    .map(|t| t.starts_with(dir))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false)
}

/// Starts the client with `args`, kills it once `ready` holds, and waits until the daemon
/// has cancelled the operation and cleaned up its ingest and temp files; the daemon then
/// answers the next call.
fn kill_client_when(d: &Daemon, args: &[&str], what: &str, ready: &dyn Fn() -> bool) {
    let cancelled = || d.log().matches("cancelled").count();
    let before = cancelled();
    let mut client = d
        .cli_command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    wait_until(what, Duration::from_secs(60), ready);
    client.kill().expect("kill client");
    let _ = client.wait();
    wait_until("the daemon to cancel", Duration::from_secs(20), || {
        cancelled() > before
    });
    wait_until("the daemon to clean up", Duration::from_secs(20), || {
        listing(&d.data().join("ingest")).is_empty() && listing(&d.data().join("tmp")).is_empty()
    });
    d.ok(&["ctr-img", "images"]);
}

/// A client killed mid-stream cancels its operation: nothing half-done stays, and the
/// daemon answers the next call.
#[test]
fn killing_the_client_cancels_load_save_pull_and_push() {
    if !require_root() || !require_tool("docker-registry") || !require_tool("skopeo") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let d = Daemon::for_registries(&[&reg.host()]);
    let work = tempfile::tempdir().expect("tmp");
    import_big(&d, work.path());
    let archive = work.path().join("big-archive.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "big:1",
        "-o",
        archive.to_str().expect("utf8"),
    ]);
    let ingest = d.data().join("ingest");
    let kill_when = |args: &[&str], what: &str, ready: &dyn Fn() -> bool| {
        kill_client_when(&d, args, what, ready)
    };

    // Save: the archive has no name until it is complete.
    let dest = work.path().join("out.tar");
    kill_when(
        &[
            "ctr-img",
            "save",
            "big:1",
            "-o",
            dest.to_str().expect("utf8"),
        ],
        "the save to start",
        &|| daemon_has_open_under(&d, work.path()),
    );
    assert!(!dest.exists(), "a cancelled save left its archive");

    // Push: the tag never appears in the registry.
    let remote = format!("{}/cancel/big:1", reg.host());
    d.ok(&["ctr-img", "tag", "big:1", &remote]);
    d.wait_idle();
    kill_when(&["ctr-img", "push", &remote], "the push to start", &|| {
        reg.count_requests("POST", "/v2/cancel/big/blobs/uploads/") > 0
    });
    let seen = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{remote}"))
        .output()
        .expect("skopeo");
    assert!(!seen.status.success(), "a cancelled push left its tag");
    d.ok(&["ctr-img", "push", &remote]);

    // Load and pull into an empty store: no image appears.
    d.ok(&["ctr-img", "rm", "-a"]);
    kill_when(
        &["ctr-img", "load", "-i", archive.to_str().expect("utf8")],
        "the load to start",
        &|| !listing(&ingest).is_empty(),
    );
    assert!(d.images().is_empty(), "a cancelled load left an image");
    kill_when(&["ctr-img", "pull", &remote], "the pull to start", &|| {
        !listing(&ingest).is_empty()
    });
    assert!(d.images().is_empty(), "a cancelled pull left an image");
    d.ok(&["ctr-img", "pull", &remote]);
    assert_eq!(d.images().len(), 1);
}

#[test]
fn a_missing_or_failing_runtime_fails_the_run_clearly_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    // A runtime that fails at once, as a broken runc would.
    let broken = work.path().join("broken-runc");
    std::fs::write(
        &broken,
        "#!/bin/sh\n# Fails every call, logging as runc does (--log FILE --log-format json).\n\
         log=; prev=\nfor a in \"$@\"; do [ \"$prev\" = --log ] && log=$a; prev=$a; done\n\
         [ -n \"$log\" ] && echo '{\"level\":\"error\",\"msg\":\"runtime exploded\"}' >> \"$log\"\n\
         exit 1\n",
    )
    .expect("script");
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    for (runtime, want) in [
        ("/nonexistent/runc".to_string(), "/nonexistent/runc"),
        (broken.display().to_string(), "runtime exploded"),
    ] {
        let d = Daemon::start_configured(
            &[("configuration.toml", &format!("runtime = {runtime:?}\n"))],
            &[],
            &[],
        );
        d.load_fixed_busybox("busybox:latest");
        let ctx = work.path().join("ctx");
        std::fs::create_dir_all(&ctx).expect("ctx");
        std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nRUN true\n").expect("df");
        let err = d.fails(&["ctr-img", "build", ctx.to_str().expect("ctx")]);
        assert!(
            err.contains(want) && err.contains("RUN"),
            "{runtime}: {err}"
        );
        // Steps without RUN still build.
        std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nENV A=1\n").expect("df");
        d.ok(&[
            "ctr-img",
            "build",
            "-t",
            "norun:1",
            ctx.to_str().expect("ctx"),
        ]);
        assert!(mounts_under(&d.run_root()).is_empty() && mounts_under(&d.data()).is_empty());
        assert!(listing(&d.run_root().join("builds")).is_empty());
    }
}

#[test]
fn sigkill_during_a_cache_export_leaves_no_partial_cache() {
    if !require_root()
        || !require_tool("runc")
        || !require_tool("docker-registry")
        || !require_tool("skopeo")
    {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let mut d = Daemon::for_registries(&[&reg.host()]);
    d.load_fixed_busybox("busybox:latest");
    let work = tempfile::tempdir().expect("tmp");
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    // Random data: its gzip is as big as itself, so the export takes a while.
    let mut data = vec![0u8; 120 << 20];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(ctx.join("big.bin"), &data).expect("big");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY big.bin /big.bin\n",
    )
    .expect("df");
    let cache = format!("{}/faults/cache:1", reg.host());
    let uploads = || reg.count_requests("POST", "/v2/faults/cache/blobs/uploads/");
    let before = uploads();
    kill_during(
        &mut d,
        &[
            "ctr-img",
            "build",
            "--cache-to",
            &cache,
            ctx.to_str().expect("ctx"),
        ],
        "the cache export to start",
        || uploads() > before,
    );
    // The cache's manifest goes last: a killed export leaves no tag to read.
    let seen = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{cache}"))
        .output()
        .expect("skopeo");
    assert!(!seen.status.success(), "a killed export left a cache tag");
    assert_recovered(&mut d, "cache export");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--cache-to",
        &cache,
        ctx.to_str().expect("ctx"),
    ]);
    assert!(out.contains("Build cache exported to"), "{out}");
}

/// A SIGKILL at every step of a stage commit (failpoints pause a debug daemon at exactly
/// that step; see `isula_store::failpoint`), from the squash through the hashing, syncing
/// and moving of the layer (kept as its files alone) to the image record: the restart
/// cleans up, the store checks out, no half-made image has the name, and the same build
/// then works and gives a sound image.
#[test]
fn sigkill_at_every_step_of_a_stage_commit() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let mut d = Daemon::start_with(&["--log-level", "debug"]);
    d.load_fixed_busybox("busybox:latest");
    let work = tempfile::tempdir().expect("tmp");
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(ctx.join("data.txt"), "copied\n").expect("data");
    let build = |d: &Daemon, round: &str| {
        d.cli_command(&[
            "ctr-img",
            "build",
            "-t",
            "committed:1",
            ctx.to_str().expect("ctx"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(|c| (c, round.to_string()))
        .expect("client")
    };
    let points = [
        "step.snapshot-adopted",
        "commit.squashed",
        "commit.layer-hashed",
        "commit.layer-written",
        "commit.layer-placed",
        "commit.layer-moved",
        "commit.layer-committed",
        "commit.recorded",
        "commit.image-blobs-written",
    ];
    for point in points {
        // A Dockerfile of its own per round, so that every round commits afresh.
        std::fs::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM busybox\nCOPY data.txt /data.txt\n\
                 RUN dd if=/dev/zero of=/big bs=1M count=200 2>/dev/null && echo {point} > /round\n"
            ),
        )
        .expect("df");
        d.stop();
        d.set_env("ISULA_FAILPOINT", Some(point));
        d.restart();
        let reached = format!("failpoint {point} reached");
        let before = d.log().matches(&reached).count();
        let (mut client, _) = build(&d, point);
        wait_until(&reached, Duration::from_secs(120), || {
            d.log().matches(&reached).count() > before
        });
        d.kill();
        let _ = client.wait();
        d.set_env("ISULA_FAILPOINT", None);
        d.restart();
        assert_recovered(&mut d, point);
        assert!(
            !d.images().iter().any(|(r, _, _)| r == "committed"),
            "{point}: a build killed before its image was stored left the name"
        );
        // The same build (whatever the dead one recorded in the cache) gives a sound image.
        d.ok(&[
            "ctr-img",
            "build",
            "-t",
            "committed:1",
            ctx.to_str().expect("ctx"),
        ]);
        std::fs::write(
            work.path().join("Dockerfile.check"),
            format!(
                "FROM committed:1\nRUN test \"$(cat /round)\" = {point} && test \"$(cat /data.txt)\" = copied \
                 && test \"$(wc -c < /big)\" = 209715200\n"
            ),
        )
        .expect("df");
        d.ok(&[
            "ctr-img",
            "build",
            "-f",
            work.path().join("Dockerfile.check").to_str().expect("utf8"),
            ctx.to_str().expect("ctx"),
        ]);
        d.ok(&["ctr-img", "rm", "committed:1"]);
    }
    d.stop_and_check_store();
}

/// A client killed while its build pushes the result (`-o docker://`), and while a
/// manifest list goes up: the push stops, the registry never gets the tag, and the same
/// push then works.
#[test]
fn killing_the_client_cancels_a_build_output_push_and_a_manifest_push() {
    if !require_root()
        || !require_tool("runc")
        || !require_tool("docker-registry")
        || !require_tool("skopeo")
    {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let d = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&reg.host()]))],
        &["--experimental", "--log-level", "debug"],
        &[],
    );
    let work = tempfile::tempdir().expect("tmp");
    import_big(&d, work.path());
    d.wait_idle();
    let tag_seen = |remote: &str| {
        Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{remote}"))
            .output()
            .expect("skopeo")
            .status
            .success()
    };

    // The build's own layer is small; the base's 300 MB go up first.
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM big:1\nRUN echo built > /built\n",
    )
    .expect("df");
    let built = format!("{}/cancel/built:1", reg.host());
    let output = format!("docker://{built}");
    let build_args = [
        "ctr-img",
        "build",
        "-o",
        output.as_str(),
        ctx.to_str().expect("ctx"),
    ];
    kill_client_when(&d, &build_args, "the build's push to start", &|| {
        reg.count_requests("POST", "/v2/cancel/built/blobs/uploads/") > 0
    });
    assert!(!tag_seen(&built), "a cancelled build push left its tag");
    assert!(
        runc_containers(&d.run_root().join("runc")).is_empty()
            && listing(&d.run_root().join("builds")).is_empty(),
        "a cancelled build left its container or work"
    );
    d.ok(&build_args);
    assert!(tag_seen(&built));

    // A manifest list over the big image.
    d.ok(&["manifest", "create", "biglist:1", "big:1"]);
    let dest = format!("{}/cancel/list:1", reg.host());
    kill_client_when(
        &d,
        &["manifest", "push", "biglist:1", &dest],
        "the manifest push to start",
        &|| reg.count_requests("POST", "/v2/cancel/list/blobs/uploads/") > 0,
    );
    assert!(!tag_seen(&dest), "a cancelled manifest push left its tag");
    d.ok(&["manifest", "push", "biglist:1", &dest]);
    assert!(tag_seen(&dest));
}

/// SIGKILL of the daemon while it writes a save (the archive has no name until complete,
/// so none appears) and while it reads a load (no image, the ingest swept at restart).
#[test]
fn sigkill_during_save_and_load() {
    if !require_root() {
        return;
    }
    let mut d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    import_big(&d, work.path());
    let out = work.path().join("out");
    std::fs::create_dir(&out).expect("out");
    let archive = work.path().join("big-archive.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "big:1",
        "-o",
        archive.to_str().expect("utf8"),
    ]);

    let dest = out.join("saved.tar");
    let save = [
        "ctr-img",
        "save",
        "big:1",
        "-o",
        dest.to_str().expect("utf8"),
    ];
    let pid = d.pid();
    kill_during(&mut d, &save, "the save to write its archive", || {
        pid_has_open_under(pid, &out)
    });
    assert!(
        listing(&out).is_empty(),
        "a killed save left {:?}",
        listing(&out)
    );
    assert_recovered(&mut d, "save");
    d.ok(&save);
    assert!(dest.exists());

    d.ok(&["ctr-img", "rm", "-a"]);
    let ingest = d.data().join("ingest");
    kill_during(
        &mut d,
        &["ctr-img", "load", "-i", archive.to_str().expect("utf8")],
        "the load to be under way",
        || !listing(&ingest).is_empty(),
    );
    assert_recovered(&mut d, "load");
    assert!(d.images().is_empty(), "a killed load left an image");
    d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    assert_eq!(d.images().len(), 1);
}

/// A writeback error (the layer's sync fails with EIO, as a failing disk makes it: an
/// error point, for this machine has no device that fails writes on demand). Nothing is
/// recorded over data that may not be on the disk: an import and a build fail naming the
/// sync and the error, a load keeps its layer packed (durable through its blob, whose own
/// fsync is not the one failing) and its idle-time unpack fails the same way, no layer
/// directory is added and none half made is left; with the disk sound again the store
/// checks out and the same operations work (the positive control).
#[test]
fn a_writeback_error_fails_the_operation_and_records_nothing() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let mut d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    d.wait_idle();
    let layer_dirs = |d: &Daemon| {
        let mut l = listing(&d.data().join("layers"));
        l.sort();
        l
    };
    let before = layer_dirs(&d);
    assert_eq!(before.len(), 1, "busybox's layer directory: {before:?}");
    d.stop();
    d.set_env("ISULA_FAILPOINT", Some("layer.sync-eio"));
    d.restart();

    let work = tempfile::tempdir().expect("tmp");
    let tar = work.path().join("rootfs.tar");
    std::fs::write(&tar, busybox_rootfs(&[("etc/marker", b"imported\n")])).expect("rootfs");
    let archive = work.path().join("loaded.tar");
    std::fs::write(
        &archive,
        docker_archive(
            &[busybox_rootfs(&[("etc/marker", b"loaded\n")])],
            "loaded:1",
        ),
    )
    .expect("archive");
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(ctx.join("f"), b"copied\n").expect("f");
    let build = |from: &str| {
        std::fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {from}\nCOPY f /f\nRUN test \"$(cat /f)\" = copied\n"),
        )
        .expect("df");
        [
            "ctr-img",
            "build",
            "-t",
            "built:1",
            ctx.to_str().expect("utf8"),
        ]
    };
    let names_the_error = |what: &str, err: &str| {
        assert!(
            err.contains("syncfs") && err.contains("Input/output error"),
            "the {what}'s error names neither the sync nor the error: {err}"
        );
    };
    let named = |d: &Daemon, repo: &str| d.images().iter().any(|(r, _, _)| r == repo);

    let err = d.fails(&["ctr-img", "import", tar.to_str().expect("utf8"), "base:1"]);
    names_the_error("import", &err);
    assert!(!named(&d, "base"), "a failed import left its name");
    let err = d.fails(&build("busybox"));
    names_the_error("build", &err);
    assert!(!named(&d, "built"), "a failed build left its name");
    // A load keeps the layer packed: it succeeds, and its unpack in idle time fails.
    d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    wait_until(
        "the idle-time unpack to fail on the sync",
        Duration::from_secs(60),
        || {
            d.log().lines().any(|l| {
                l.contains("unpacking a packed layer")
                    && l.contains("syncfs")
                    && l.contains("Input/output error")
            })
        },
    );
    d.stop();
    assert_eq!(
        layer_dirs(&d),
        before,
        "layer directories added without a sync"
    );
    assert!(
        listing(&d.data().join("tmp")).is_empty(),
        "staged layers left: {:?}",
        listing(&d.data().join("tmp"))
    );

    // The disk sound again: the store checks out, and the same operations work.
    d.set_env("ISULA_FAILPOINT", None);
    d.restart();
    d.stop_and_check_store();
    d.restart();
    d.ok(&["ctr-img", "import", tar.to_str().expect("utf8"), "base:1"]);
    for from in ["base:1", "loaded:1", "busybox"] {
        d.ok(&build(from));
        assert_eq!(
            d.image_text("built:1", "f").as_deref(),
            Some("copied"),
            "{from}"
        );
    }
    d.stop_and_check_store();
}

/// The platforms `ctr-img images` gives the repository `multi` (any domain), sorted, and
/// the number of untagged images.
fn multi_platforms(d: &Daemon) -> (Vec<String>, usize) {
    let out = d.ok(&["ctr-img", "images"]);
    let mut found: Vec<String> = out
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|r| r == "multi" || r.ends_with("/multi"))
        })
        .map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("linux/"))
                .unwrap_or("no platform column")
                .to_string()
        })
        .collect();
    found.sort();
    let untagged = out
        .lines()
        .filter(|l| l.split_whitespace().next() == Some("<none>"))
        .count();
    (found, untagged)
}

/// The other platform's architecture than this machine's (images of it are only loaded,
/// never run).
fn other_arch() -> &'static str {
    if host_arch() == "amd64" {
        "arm64"
    } else {
        "amd64"
    }
}

/// A daemon (logging at debug) holding `base-host:1` (this machine's platform),
/// `base-other:1` ([`other_arch`]) and `third:1` (this machine's, another layer).
fn daemon_with_platform_bases(dir: &std::path::Path) -> Daemon {
    let d = Daemon::start_with(&["--log-level", "debug"]);
    let images = [
        ("base-host:1", host_arch(), busybox_rootfs(&[])),
        ("base-other:1", other_arch(), busybox_rootfs(&[])),
        ("third:1", host_arch(), busybox_rootfs(&[("third", b"3")])),
    ];
    for (name, arch, rootfs) in images {
        let a = dir.join("image.tar");
        std::fs::write(&a, docker_archive_for(&[rootfs], name, arch)).expect("archive");
        d.ok(&["ctr-img", "load", "-i", a.to_str().expect("utf8")]);
    }
    d
}

/// Restarts `d` with failpoint `point` armed, runs the client with `args` until the daemon
/// pauses there, SIGKILLs it, and requires the one name-move note it wrote; without
/// `keep_note` the note goes (the control); then restarts `d` unarmed.
fn kill_at_point(d: &mut Daemon, point: &str, args: &[&str], keep_note: bool, what: &str) {
    d.stop();
    d.set_env("ISULA_FAILPOINT", Some(point));
    d.restart();
    let reached = format!("failpoint {point} reached");
    let said = tempfile::NamedTempFile::new().expect("client output");
    let mut client = d
        .cli_command(args)
        .stdout(Stdio::null())
        .stderr(said.reopen().expect("client output"))
        .spawn()
        .expect("client");
    wait_until_explained(
        &reached,
        Duration::from_secs(60),
        || d.log().contains(&reached),
        || {
            let log = d.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            format!(
                "the client said {:?}; the daemon's log ends {tail:#?}",
                std::fs::read_to_string(said.path()).unwrap_or_default()
            )
        },
    );
    d.kill();
    let _ = client.wait();
    let notes = d.data().join("name-moves");
    assert_eq!(listing(&notes).len(), 1, "{what}: the note of the move");
    if !keep_note {
        std::fs::remove_dir_all(&notes).expect("remove the note");
    }
    d.set_env("ISULA_FAILPOINT", None);
    d.restart();
}

/// A SIGKILL while `tag` gives a name to an image of another platform than the image
/// holding it: after the name moved and before the local list kept the first image
/// under it, and after the list was written and before the image gave the name up. The
/// restart finishes the move from the note the daemon wrote first: the name stands for
/// both platforms, nothing is untagged, and `rm -p` removes neither. The control removes
/// the note before the restart: the first platform's image is then left untagged (what a
/// kill did before the notes), and `rm -p` removes it.
#[test]
fn a_kill_while_a_name_joins_another_platform_loses_neither() {
    if !require_root() {
        return;
    }
    let other = other_arch();
    let mut both = vec![format!("linux/{}", host_arch()), format!("linux/{other}")];
    both.sort();
    let work = tempfile::tempdir().expect("tmp");
    let cases = [
        ("local-index.name-moved", true),
        ("local-index.list-written", true),
        ("local-index.name-moved", false),
    ];
    for (point, keep_note) in cases {
        let what = format!("{point} (note kept: {keep_note})");
        let mut d = daemon_with_platform_bases(work.path());
        // multi:1 is the first image's only name.
        d.ok(&["ctr-img", "tag", "base-host:1", "multi:1"]);
        d.ok(&["ctr-img", "rm", "base-host:1"]);
        let args = ["ctr-img", "tag", "base-other:1", "multi:1"];
        kill_at_point(&mut d, point, &args, keep_note, &what);
        let notes = d.data().join("name-moves");
        let (platforms, untagged) = multi_platforms(&d);
        if keep_note {
            assert_eq!(platforms, both, "{what}: what the name stands for");
            assert_eq!(untagged, 0, "{what}: an image lost its name");
            assert!(listing(&notes).is_empty(), "{what}: the note is left");
        } else {
            assert_eq!(platforms, vec![format!("linux/{other}")], "{what}");
            assert_eq!(untagged, 1, "{what}: the first image kept a name");
        }
        let images = |d: &Daemon| d.ok(&["ctr-img", "images"]).lines().count();
        let listed = images(&d);
        d.ok(&["ctr-img", "rm", "-p"]);
        let (after, _) = multi_platforms(&d);
        assert_eq!(
            after, platforms,
            "{what}: rm -p removed a platform of the name"
        );
        // What rm -p removes: nothing after a finished move, the untagged image otherwise.
        assert_eq!(images(&d), listed - untagged, "{what}: rm -p");
        assert_recovered(&mut d, &what);
        d.stop_and_check_store();
    }
}

/// The image IDs `ctr-img images` gives the repository `repo` (any domain), sorted.
fn ids_of(d: &Daemon, repo: &str) -> Vec<String> {
    let out = d.ok(&["ctr-img", "images"]);
    let mut ids: Vec<String> = out
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .is_some_and(|r| r == repo || r.ends_with(&format!("/{repo}")))
        })
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    ids.sort();
    ids
}

/// A SIGKILL while `tag LIST NAME` gives a name an image holds to a local list: after the
/// list is written and before the image gives the name up. The restart finishes it from
/// the note: the name stands for the list's images. The control removes the note: the
/// image that kept the name then joins the list in place of its platform's entry (the
/// list no longer the one tagged).
#[test]
fn a_kill_while_a_list_takes_a_name_from_an_image() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    for keep_note in [true, false] {
        let what = format!("tag.list-written (note kept: {keep_note})");
        let mut d = daemon_with_platform_bases(work.path());
        d.ok(&["ctr-img", "tag", "base-host:1", "multi:1"]);
        d.ok(&["ctr-img", "tag", "base-other:1", "multi:1"]);
        d.ok(&["ctr-img", "tag", "third:1", "solo:1"]);
        let list = ids_of(&d, "multi");
        assert_eq!(list.len(), 2, "{what}: multi:1 is a list of two");
        let args = ["ctr-img", "tag", "multi:1", "solo:1"];
        kill_at_point(&mut d, "tag.list-written", &args, keep_note, &what);
        if keep_note {
            assert_eq!(ids_of(&d, "solo"), list, "{what}: solo:1 is multi:1's list");
        } else {
            assert_ne!(ids_of(&d, "solo"), list, "{what}");
        }
        assert_recovered(&mut d, &what);
        d.stop_and_check_store();
    }
}

/// A SIGKILL after an image took the name of a local list (`tag IMAGE LIST`) and before
/// the list took it in: the restart finishes it from the note (the image replaces its
/// platform's entry of the list); the control, without the note, leaves the name to the
/// image alone beside the list.
#[test]
fn a_kill_while_an_image_joins_a_list_by_name() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    for keep_note in [true, false] {
        let what = format!("local-index.name-moved into a list (note kept: {keep_note})");
        let mut d = daemon_with_platform_bases(work.path());
        d.ok(&["ctr-img", "tag", "base-host:1", "multi:1"]);
        d.ok(&["ctr-img", "tag", "base-other:1", "multi:1"]);
        let mut expect = [ids_of(&d, "third"), ids_of(&d, "base-other")].concat();
        expect.sort();
        let args = ["ctr-img", "tag", "third:1", "multi:1"];
        kill_at_point(&mut d, "local-index.name-moved", &args, keep_note, &what);
        if keep_note {
            assert_eq!(ids_of(&d, "multi"), expect, "{what}: the list's images");
        } else {
            assert_ne!(ids_of(&d, "multi"), expect, "{what}");
        }
        assert_recovered(&mut d, &what);
        d.stop_and_check_store();
    }
}
