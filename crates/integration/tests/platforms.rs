//! `ctr-img build --platform` for another architecture, end to end: an arm64 base (Debian's
//! arm64 busybox-static, fetched by the test setup) built with RUN under QEMU's user-mode
//! emulation (qemu-user-static's binfmt_misc handler), the image config saying arm64,
//! BuildKit's platform ARGs, a cross-compiling stage on `$BUILDPLATFORM` that runs
//! natively, a base of the wrong platform refused, and no handler registered refused with
//! the package to install, nothing left behind.

use isula_integration::*;

fn arm64_daemon(env: &[(&str, &str)]) -> Option<Daemon> {
    if !require_root() || !require_tool("runc") {
        return None;
    }
    let busybox = arm64_busybox()?;
    let d = Daemon::start_with_env(&[], env);
    d.load_fixed_busybox("busybox:latest");
    let dir = tempfile::tempdir().expect("tmp");
    let archive = dir.path().join("arm64.tar");
    std::fs::write(
        &archive,
        docker_archive_for(
            &[busybox_rootfs_with(&busybox, &[])],
            "busybox-arm64:1",
            "arm64",
        ),
    )
    .expect("archive");
    d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    Some(d)
}

#[test]
fn an_arm64_build_runs_under_qemu_and_says_arm64() {
    let Some(d) = arm64_daemon(&[]) else { return };
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("f"), "f").expect("write");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM --platform=$BUILDPLATFORM busybox AS build\n\
         RUN uname -m > /built-on\n\
         FROM busybox-arm64:1\n\
         ARG TARGETPLATFORM TARGETARCH BUILDARCH\n\
         RUN uname -m > /arch && echo \"$TARGETPLATFORM $TARGETARCH $BUILDARCH\" > /args\n\
         COPY --from=build /built-on /built-on\n",
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let out_dir = tempfile::tempdir().expect("out");
    let archive = out_dir.path().join("cross.tar");
    d.ok(&[
        "ctr-img",
        "build",
        "--platform",
        "linux/arm64",
        "-t",
        "cross:1",
        "-o",
        &format!("docker-archive:{}:cross:1", archive.display()),
        c,
    ]);
    assert_eq!(d.image_text("cross:1", "arch").as_deref(), Some("aarch64"));
    let host_uname = run_ok(std::process::Command::new("uname").arg("-m"));
    // The build stage ran natively (no emulation): it saw this machine.
    assert_eq!(
        d.image_text("cross:1", "built-on").as_deref(),
        Some(host_uname.trim())
    );
    let host_arch = match host_uname.trim() {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
    .to_string();
    assert_eq!(
        d.image_text("cross:1", "args"),
        Some(format!("linux/arm64 arm64 {host_arch}"))
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["ctr-img", "inspect", "cross:1"])).expect("json");
    assert_eq!(inspect[0]["Config"]["architecture"], "arm64");
    assert_eq!(inspect[0]["Config"]["os"], "linux");
    if require_tool("skopeo") {
        let out = run_ok(
            std::process::Command::new("skopeo")
                .args(["inspect", "--raw", "--config"])
                .arg(format!("docker-archive:{}", archive.display())),
        );
        let config: serde_json::Value = serde_json::from_str(&out).expect("config");
        assert_eq!(config["architecture"], "arm64", "{out}");
    }
    // FROM scratch takes the build's platform.
    std::fs::write(ctx.path().join("Dockerfile"), "FROM scratch\nCOPY f /f\n").expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "--platform",
        "linux/arm64",
        "-t",
        "scratch:arm64",
        c,
    ]);
    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["ctr-img", "inspect", "scratch:arm64"])).expect("json");
    assert_eq!(inspect[0]["Config"]["architecture"], "arm64");
}

#[test]
fn a_base_of_another_platform_and_a_missing_handler_are_refused() {
    let empty = tempfile::tempdir().expect("binfmt");
    // A binfmt_misc with no handlers (a daemon debug hook): the machine without QEMU.
    std::fs::write(empty.path().join("status"), "enabled\n").expect("status");
    let Some(d) = arm64_daemon(&[("ISULA_BINFMT_DIR", empty.path().to_str().expect("utf8"))])
    else {
        return;
    };
    let ctx = tempfile::tempdir().expect("ctx");
    let c = ctx.path().to_str().expect("utf8");
    for (df, want) in [
        (
            "FROM busybox\nRUN true\n",
            "is for linux/amd64, not linux/arm64",
        ),
        (
            "FROM busybox-arm64:1\nRUN true\n",
            "install qemu-user-static",
        ),
        (
            "FROM --platform=linux/s390x busybox-arm64:1\n",
            "not linux/s390x",
        ),
        (
            "FROM --platform=windows/amd64 busybox\n",
            "linux images only",
        ),
    ] {
        if df.starts_with("FROM busybox\n") && !cfg!(target_arch = "x86_64") {
            continue;
        }
        std::fs::write(ctx.path().join("Dockerfile"), df).expect("df");
        let before = d.images();
        let err = d.fails(&["ctr-img", "build", "--platform", "linux/arm64", c]);
        assert!(err.contains(want), "{df}: {err}");
        assert_eq!(d.images(), before, "{df}: the images changed");
        d.assert_no_build_work(df);
    }
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--platform",
        "linux/arm64,linux/amd64",
        c,
    ]);
    assert!(err.contains("needs a name for its manifest list"), "{err}");
    let err = d.fails(&["ctr-img", "build", "--platform", "linux/", c]);
    assert!(err.contains("invalid platform"), "{err}");
}

#[test]
fn pull_platform_picks_the_list_entry_and_images_shows_it() {
    if !require_tool("docker-registry") {
        return;
    }
    let reg = isula_integration::registry::Registry::start(Default::default());
    let host = reg.host();
    let Some(d) = arm64_daemon(&[]) else { return };
    // A list of the two, pushed through a daemon that has both.
    let maker = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&host]))],
        &["--experimental"],
        &[],
    );
    let dir = tempfile::tempdir().expect("tmp");
    for (image, archive) in [
        ("busybox-arm64:1", "arm.tar"),
        ("busybox:latest", "amd.tar"),
    ] {
        let a = dir.path().join(archive);
        d.ok(&["ctr-img", "save", image, "-o", a.to_str().expect("utf8")]);
        maker.ok(&["ctr-img", "load", "-i", a.to_str().expect("utf8")]);
    }
    maker.ok(&[
        "manifest",
        "create",
        "multi:1",
        "busybox:latest",
        "busybox-arm64:1",
    ]);
    let list = format!("{host}/multi:1");
    maker.ok(&["manifest", "push", "multi:1", &list]);
    let fresh = Daemon::for_registries(&[&host]);
    fresh.ok(&["ctr-img", "pull", "--platform", "linux/arm64", &list]);
    let inspect: serde_json::Value =
        serde_json::from_str(&fresh.ok(&["ctr-img", "inspect", &list])).expect("json");
    assert_eq!(inspect[0]["Config"]["architecture"], "arm64");
    let images = fresh.ok(&["ctr-img", "images"]);
    assert!(
        images.contains("PLATFORM") && images.contains("linux/arm64"),
        "{images}"
    );
    let err = fresh.fails(&["ctr-img", "pull", "--platform", "linux/s390x", &list]);
    assert!(err.contains("no image for linux/s390x"), "{err}");
    let err = fresh.fails(&["ctr-img", "pull", "--platform", "linux/", &list]);
    assert!(err.contains("invalid platform"), "{err}");
    // This machine's images alone: isula-build's table, no PLATFORM column.
    let host_only = Daemon::start();
    host_only.load_fixed_busybox("busybox:latest");
    assert!(!host_only.ok(&["ctr-img", "images"]).contains("PLATFORM"));
}

#[test]
fn two_platforms_in_one_build_push_a_list_of_two() {
    if !require_tool("docker-registry") || !require_tool("skopeo") {
        return;
    }
    let reg = isula_integration::registry::Registry::start(Default::default());
    let host = reg.host();
    let Some(busybox) = arm64_busybox() else {
        return;
    };
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::for_registries(&[&host]);
    let dir = tempfile::tempdir().expect("tmp");
    for (arch, binary) in [(host_arch(), None), ("arm64", Some(busybox.as_path()))] {
        let name = format!("busybox-{arch}:1");
        let rootfs = match binary {
            Some(b) => busybox_rootfs_with(b, &[]),
            None => busybox_rootfs(&[]),
        };
        let a = dir.path().join(format!("{arch}.tar"));
        std::fs::write(&a, docker_archive_for(&[rootfs], &name, arch)).expect("archive");
        d.ok(&["ctr-img", "load", "-i", a.to_str().expect("utf8")]);
    }
    let ctx = tempfile::tempdir().expect("ctx");
    // The automatic ARGs pick each platform's base.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox-$TARGETARCH:1\nRUN uname -m > /arch\n",
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let list = format!("{host}/multi:1");
    let platforms = format!("linux/{},linux/arm64", host_arch());
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--platform",
        &platforms,
        "-o",
        &format!("docker://{list}"),
        c,
    ]);
    assert!(out.contains("Building for linux/arm64"), "{out}");
    let raw = run_ok(
        std::process::Command::new("skopeo")
            .args(["inspect", "--raw", "--tls-verify=false"])
            .arg(format!("docker://{list}")),
    );
    let index: serde_json::Value = serde_json::from_str(&raw).expect("index");
    let mut archs: Vec<String> = index["manifests"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|m| {
            m["platform"]["architecture"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    archs.sort();
    let mut want = vec![host_arch().to_string(), "arm64".to_string()];
    want.sort();
    assert_eq!(archs, want, "{raw}");
    // Each platform pulls its own image, built for it.
    for (platform, uname) in [
        ("linux/arm64", "aarch64"),
        (
            &format!("linux/{}", host_arch())[..],
            std::env::consts::ARCH,
        ),
    ] {
        let fresh = Daemon::for_registries(&[&host]);
        fresh.ok(&["ctr-img", "pull", "--platform", platform, &list]);
        assert_eq!(
            fresh.image_text(&list, "arch").as_deref(),
            Some(uname),
            "{platform}"
        );
    }
    // Outputs that take one image say so; a list needs a name.
    for (args, want) in [
        (
            vec!["-o", "docker-archive:/tmp/x.tar:x:1"],
            "takes one image",
        ),
        (vec![], "needs a name"),
    ] {
        let mut a = vec!["ctr-img", "build", "--platform", &platforms];
        a.extend(args);
        a.push(c);
        let err = d.fails(&a);
        assert!(err.contains(want), "{err}");
    }
}
