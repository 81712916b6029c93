//! `ctr-img build` end to end with the real binaries, runc and overlayfs: the manual's
//! examples, --iidfile, --build-static, archive outputs read by Docker, cancellation and
//! concurrent builds.

use isula_integration::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn daemon_with_busybox() -> Daemon {
    let d = Daemon::start();
    d.import_busybox(
        "busybox:latest",
        &[
            ("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", b"root:x:0:\n"),
        ],
    );
    d
}

fn in_dir(d: &Daemon, dir: &Path, args: &[&str]) -> std::process::Output {
    d.cli_command(args)
        .current_dir(dir)
        .output()
        .expect("isula-build")
}

#[test]
fn manual_examples() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox();
    let ctx = tempfile::tempdir().expect("ctx");
    let c = ctx.path();
    std::fs::write(
        c.join("dockerfile"),
        "FROM busybox:latest\nLABEL foo=bar\nCOPY ./* /home/dir1/\n",
    )
    .expect("df");
    std::fs::write(c.join("bar.txt"), "This is bar file\n").expect("bar");
    std::fs::write(
        c.join("Dockerfile_arg"),
        "FROM busybox\nARG foo\nADD ${foo}.txt .\nRUN cat ${foo}.txt\n",
    )
    .expect("df");

    // The first example: -f dockerfile, context ".".
    let o = in_dir(&d, c, &["ctr-img", "build", "-f", "dockerfile", "."]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("STEP  1: FROM busybox:latest\nSTEP  2: LABEL foo=bar\nSTEP  3: COPY ./* /home/dir1/\nGetting image source signatures\n"), "{out}");
    let id = build_id(&out);
    assert!(d
        .images()
        .iter()
        .any(|r| r.2 == id[..12] && r.0 == "<none>"));

    // --build-arg and --iidfile.
    let o = in_dir(
        &d,
        c,
        &[
            "ctr-img",
            "build",
            "--build-arg",
            "foo=bar",
            "-f",
            "Dockerfile_arg",
            "--iidfile",
            "testfile",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("STEP  4: RUN cat ${foo}.txt\nThis is bar file\n"),
        "{out}"
    );
    let iid = std::fs::read_to_string(c.join("testfile")).expect("iidfile");
    assert_eq!(iid, build_id(&out));

    // --build-static twice: the same ID.
    let stat = |tag: &str| {
        let o = in_dir(
            &d,
            c,
            &[
                "ctr-img",
                "build",
                "-f",
                "Dockerfile_arg",
                "--build-arg",
                "foo=bar",
                "--build-static=build-time=2020-05-23 10:55:33",
                "--tag",
                tag,
                ".",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        build_id(&String::from_utf8_lossy(&o.stdout))
    };
    let (a, b) = (stat("static:a"), stat("static:b"));
    assert_eq!(a, b, "--build-static must give the same image ID");
    let rows = d.images();
    assert!(
        rows.iter().any(|r| r.0 == "static" && r.1 == "a")
            && rows.iter().any(|r| r.0 == "static" && r.1 == "b")
    );

    // Errors name the step and line; nothing is left behind.
    std::fs::write(c.join("Dockerfile"), "FROM busybox\nRUN exit 9\n").expect("df");
    let o = in_dir(&d, c, &["ctr-img", "build", "."]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("STEP 2 (line 2) RUN exit 9") && err.contains("non-zero code: 9"),
        "{err}"
    );
    std::fs::write(c.join("Dockerfile"), "FROM busybox\nFROB x\n").expect("df");
    let err =
        String::from_utf8_lossy(&in_dir(&d, c, &["ctr-img", "build", "."]).stderr).to_string();
    assert!(err.contains("line 2: unknown instruction: FROB"), "{err}");
    let err = String::from_utf8_lossy(
        &in_dir(&d, c, &["ctr-img", "build", "-o", "docker-daemon:x", "."]).stderr,
    )
    .to_string();
    assert!(err.contains("tag is required"), "{err}");
    assert!(d.leftovers().is_empty());
    assert!(isula_sys_mounts(&d).is_empty());
}

fn isula_sys_mounts(d: &Daemon) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let roots = [d.data(), d.run_root()];
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| {
            roots
                .iter()
                .any(|r| m.starts_with(r.to_str().unwrap_or("/nonexistent")))
        })
        .map(String::from)
        .collect()
}

#[test]
fn archive_output_runs_in_docker() {
    if !require_root() || !require_docker() {
        return;
    }
    let d = daemon_with_busybox();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("Dockerfile"), "FROM busybox\nENV GREETING=hello\nRUN echo \"$GREETING from RUN\" > /msg\nCMD [\"cat\", \"/msg\"]\n").expect("df");
    let out_tar = ctx.path().join("out.tar");
    let spec = format!("docker-archive:{}:isula-e2e/built:1", out_tar.display());
    let o = in_dir(&d, ctx.path(), &["ctr-img", "build", "-o", &spec, "."]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _cleanup = DockerImage("isula-e2e/built:1".into());
    run_ok(Command::new("docker").args(["load", "-i"]).arg(&out_tar));
    let ran = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "host",
        "isula-e2e/built:1",
    ]));
    assert_eq!(ran, "hello from RUN\n");
    // The output's name is in the local store too.
    assert!(d
        .images()
        .iter()
        .any(|r| r.0 == "isula-e2e/built" && r.1 == "1"));
}

#[test]
fn killing_the_client_mid_run_cancels_the_build() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN echo started && sleep 600\n",
    )
    .expect("df");
    let mut client = d
        .cli_command(&["ctr-img", "build", "."])
        .current_dir(ctx.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    // Wait until the RUN is running (its container exists).
    let runc_root = d.run_root().join("runc");
    wait_until("the RUN to start", Duration::from_secs(60), || {
        !runc_containers(&runc_root).is_empty()
    });
    client.kill().expect("kill");
    let _ = client.wait();
    // Within 5 s: no container, mount, build directory or store temp file; the build's slot
    // is released (logged as cancelled) and another build runs.
    wait_until(
        "the cancelled build to be cleaned up",
        Duration::from_secs(5),
        || {
            runc_containers(&runc_root).is_empty()
                && isula_sys_mounts(&d).is_empty()
                && std::fs::read_dir(d.run_root().join("builds"))
                    .map(|r| r.count())
                    .unwrap_or(0)
                    == 0
                && d.leftovers().is_empty()
                && d.log().contains("build cancelled")
        },
    );
    std::fs::write(ctx.path().join("Dockerfile"), "FROM busybox\nRUN true\n").expect("df");
    let o = d
        .cli_command(&["ctr-img", "build", "."])
        .current_dir(ctx.path())
        .output()
        .expect("build");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn twenty_builds_at_once() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox();
    let ctx = tempfile::tempdir().expect("ctx");
    let mut children = Vec::new();
    for i in 0..20 {
        let dir = ctx.path().join(format!("c{i}"));
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(
            dir.join("Dockerfile"),
            format!("FROM busybox\nRUN echo build {i} > /which\nLABEL n={i}\n"),
        )
        .expect("df");
        let child = d
            .cli_command(&["ctr-img", "build", "--tag", &format!("many:{i}"), "."])
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client");
        children.push(child);
    }
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().expect("wait");
        assert!(
            o.status.success(),
            "build {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let rows = d.images();
    for i in 0..20 {
        assert!(
            rows.iter().any(|r| r.0 == "many" && r.1 == i.to_string()),
            "many:{i} missing"
        );
    }
    assert!(isula_sys_mounts(&d).is_empty());
}

#[test]
fn docker_daemon_output_loads_into_docker() {
    if !require_root() || !require_docker() {
        return;
    }
    let d = daemon_with_busybox();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN echo streamed to dockerd > /msg\nCMD [\"cat\", \"/msg\"]\n",
    )
    .expect("df");
    let _cleanup = DockerImage("isula-e2e/daemon-out:2".into());
    let o = in_dir(
        &d,
        ctx.path(),
        &[
            "ctr-img",
            "build",
            "-o",
            "docker-daemon:isula-e2e/daemon-out:2",
            ".",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = build_id(&String::from_utf8_lossy(&o.stdout));
    let docker_id = run_ok(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        "isula-e2e/daemon-out:2",
    ]));
    assert_eq!(docker_id.trim(), format!("sha256:{id}"));
    let ran = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "host",
        "isula-e2e/daemon-out:2",
    ]));
    assert_eq!(ran, "streamed to dockerd\n");
}

#[test]
fn isulad_output_hands_a_valid_archive_to_isula_load() {
    if !require_root() {
        return;
    }
    // iSulad cannot run here: an `isula` stand-in checks what it is given and records it.
    let bin_dir = tempfile::tempdir().expect("bin");
    let record = bin_dir.path().join("record");
    let script = format!(
        "#!/bin/sh\n[ \"$1\" = load ] && [ \"$2\" = -i ] || exit 64\ntar -xOf \"$3\" manifest.json > {rec} || exit 65\necho \"$3\" >> {rec}.path\necho \"Load image from $3 success\"\n",
        rec = record.display()
    );
    std::fs::write(bin_dir.path().join("isula"), script).expect("script");
    std::fs::set_permissions(
        bin_dir.path().join("isula"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let path = format!(
        "{}:{}",
        bin_dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let d = Daemon::start_with_env(&[], &[("PATH", &path)]);
    let src = d.dir.path().join("busybox.tar");
    std::fs::write(&src, busybox_rootfs(&[])).expect("write");
    d.ok(&[
        "ctr-img",
        "import",
        src.to_str().expect("utf8"),
        "busybox:latest",
    ]);
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN echo x > /x\n",
    )
    .expect("df");
    let o = in_dir(
        &d,
        ctx.path(),
        &["ctr-img", "build", "-o", "isulad:busybox:2.0", "."],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let manifest = std::fs::read_to_string(&record).expect("isula was run");
    assert!(
        manifest.contains("\"RepoTags\":[\"busybox:2.0\"]"),
        "{manifest}"
    );
    let staged = std::fs::read_to_string(record.with_extension("path")).expect("path");
    assert!(
        staged.trim().starts_with("/var/tmp/isula-build-tmp-"),
        "{staged}"
    );
    assert!(
        !std::path::Path::new(staged.trim()).exists(),
        "the staging file must be removed"
    );
}

#[test]
fn sigterm_during_a_build_stops_cleanly() {
    if !require_root() {
        return;
    }
    let mut d = daemon_with_busybox();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN sleep 600\n",
    )
    .expect("df");
    let mut client = d
        .cli_command(&["ctr-img", "build", "."])
        .current_dir(ctx.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    let runc_root = d.run_root().join("runc");
    wait_until("the RUN to start", Duration::from_secs(60), || {
        !runc_containers(&runc_root).is_empty()
    });
    let start = Instant::now();
    assert_eq!(d.stop(), Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        start.elapsed()
    );
    assert!(!client.wait().expect("client").success());
    assert!(runc_containers(&runc_root).is_empty(), "container left");
    assert!(isula_sys_mounts(&d).is_empty(), "mounts left");
    assert!(d.leftovers().is_empty(), "store temp files left");
    assert!(!d.socket().exists());
}

#[test]
fn oci_archive_output_is_readable_by_skopeo() {
    if !require_root() || !require_tool("skopeo") {
        return;
    }
    let d = daemon_with_busybox();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nLABEL kind=oci\nRUN echo x > /x\n",
    )
    .expect("df");
    let out = ctx.path().join("image.oci.tar");
    let spec = format!("oci-archive:{}:isula-e2e/oci:1", out.display());
    let o = in_dir(
        &d,
        ctx.path(),
        &["ctr-img", "build", "--format", "oci", "-o", &spec, "."],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let id = build_id(&String::from_utf8_lossy(&o.stdout));
    let raw = run_ok(
        Command::new("skopeo")
            .args(["inspect", "--raw", "--config"])
            .arg(format!("oci-archive:{}", out.display())),
    );
    assert_eq!(sha256_hex(raw.as_bytes()), id);
    let manifest = run_ok(
        Command::new("skopeo")
            .args(["inspect", "--raw"])
            .arg(format!("oci-archive:{}", out.display())),
    );
    assert!(
        manifest.contains("application/vnd.oci.image.manifest.v1+json"),
        "{manifest}"
    );
}

#[test]
fn run_has_a_seccomp_filter_that_a_build_can_drop() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let ctx = d.dir.path().join("ctx-seccomp");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN busybox unshare -U busybox true\n",
    )
    .expect("df");
    let c = ctx.to_str().expect("ctx");
    let o = d.cli(&["ctr-img", "build", "--no-cache", c]);
    assert!(
        !o.status.success(),
        "a new user namespace was allowed in RUN"
    );
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Operation not permitted"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    d.ok(&[
        "ctr-img",
        "build",
        "--no-cache",
        "--security-opt",
        "seccomp=unconfined",
        c,
    ]);
    let err = d.fails(&["ctr-img", "build", "--security-opt", "apparmor=x", c]);
    assert!(err.contains("seccomp=unconfined"), "{err}");
}
