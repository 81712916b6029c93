//! Interchange with a real Docker engine: our docker-archive loads into dockerd and runs;
//! an archive made by `docker save` loads into our store. CI starts
//! `dockerd --iptables=false --bridge=none`; elsewhere the test skips if no engine answers.

use isula_integration::*;
use std::process::Command;

#[test]
fn docker_loads_and_runs_our_archive_and_we_load_docker_save() {
    if !require_root() || !require_docker() {
        return;
    }
    const NAME: &str = "isula-e2e/busybox:docker";
    let _cleanup = DockerImage(NAME.into());
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    let src = work.path().join("rootfs.tar.gz");
    std::fs::write(
        &src,
        gzip(&busybox_rootfs(&[("etc/msg", b"hello from isula-build\n")])),
    )
    .expect("write");
    let out = d.ok(&["ctr-img", "import", src.to_str().expect("utf8"), NAME]);
    let id = import_id(&out);
    let ours = work.path().join("ours.tar");
    d.ok(&["ctr-img", "save", NAME, "-o", ours.to_str().expect("utf8")]);

    let loaded = run_ok(Command::new("docker").args(["load", "-i"]).arg(&ours));
    assert!(
        loaded.contains(&format!("Loaded image: {NAME}")),
        "{loaded}"
    );
    let docker_id =
        run_ok(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", NAME]));
    assert_eq!(docker_id.trim(), format!("sha256:{id}"));
    let ran = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "host",
        NAME,
        "cat",
        "/etc/msg",
    ]));
    assert_eq!(ran, "hello from isula-build\n");
    let ran = run_ok(Command::new("docker").args([
        "run",
        "--rm",
        "--network",
        "host",
        NAME,
        "sh",
        "-c",
        "echo $((6*7))",
    ]));
    assert_eq!(ran, "42\n");

    // The other way: docker save -> our load.
    d.ok(&["ctr-img", "rm", "-a"]);
    let theirs = work.path().join("theirs.tar");
    run_ok(
        Command::new("docker")
            .args(["save", NAME, "-o"])
            .arg(&theirs),
    );
    let out = d.ok(&["ctr-img", "load", "-i", theirs.to_str().expect("utf8")]);
    assert!(out.ends_with(&format!("Loaded image as {id}\n")), "{out}");
    assert_eq!(
        d.images(),
        vec![(
            "isula-e2e/busybox".into(),
            "docker".into(),
            id[..12].to_string()
        )]
    );
    // Saved again by us: the blob our load wrote is copied without a second hash (its
    // file unchanged), and the archive is Docker's image again for Docker.
    let again = work.path().join("again.tar");
    d.ok(&["ctr-img", "save", NAME, "-o", again.to_str().expect("utf8")]);
    run_ok(Command::new("docker").args(["rmi", NAME]));
    let loaded = run_ok(Command::new("docker").args(["load", "-i"]).arg(&again));
    assert!(loaded.contains(NAME), "{loaded}");
    let docker_id =
        run_ok(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", NAME]));
    assert_eq!(docker_id.trim(), format!("sha256:{id}"));
    // Docker's layer tar, kept packed by the load, unpacks for a build on it.
    let ctx = work.path().join("on-docker");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM isula-e2e/busybox:docker\nRUN ls /bin/busybox > /seen\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "on-docker:1",
        ctx.to_str().expect("utf8"),
    ]);
    assert_eq!(
        d.image_text("on-docker:1", "seen").as_deref(),
        Some("/bin/busybox")
    );
}
