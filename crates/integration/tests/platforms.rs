//! `ctr-img build --platform` for another architecture, end to end: an arm64 base (Debian's
//! arm64 busybox-static, fetched by the test setup) built with RUN under QEMU's user-mode
//! emulation (qemu-user-static's binfmt_misc handler), the image config saying arm64,
//! BuildKit's platform ARGs, a cross-compiling stage on `$BUILDPLATFORM` that runs
//! natively, a base of the wrong platform refused, and no handler registered refused with
//! the package to install, nothing left behind.

use isula_integration::registry::free_port;
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
    // Bases named by a registry that is not there (nothing listens on port 9): another
    // platform of a local name is pulled, and that pull fails.
    d.ok(&["ctr-img", "tag", "busybox:latest", "127.0.0.1:9/busybox:1"]);
    d.ok(&[
        "ctr-img",
        "tag",
        "busybox-arm64:1",
        "127.0.0.1:9/busybox-arm64:1",
    ]);
    for (df, want) in [
        (
            "FROM 127.0.0.1:9/busybox:1\nRUN true\n",
            "is for linux/amd64, and pulling its linux/arm64 image failed",
        ),
        (
            "FROM busybox-arm64:1\nRUN true\n",
            "install qemu-user-static",
        ),
        (
            "FROM --platform=linux/s390x 127.0.0.1:9/busybox-arm64:1\n",
            "is for linux/arm64, and pulling its linux/s390x image failed",
        ),
        (
            "FROM --platform=windows/amd64 busybox\n",
            "linux images only",
        ),
    ] {
        if df.starts_with("FROM 127.0.0.1:9/busybox:1") && !cfg!(target_arch = "x86_64") {
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

/// Loads `busybox-ARCH:1` for this machine's architecture and for arm64.
fn load_two_bases(d: &Daemon, arm64_busybox: &std::path::Path) {
    let dir = tempfile::tempdir().expect("tmp");
    for (arch, binary) in [(host_arch(), None), ("arm64", Some(arm64_busybox))] {
        let name = format!("busybox-{arch}:1");
        let rootfs = match binary {
            Some(b) => busybox_rootfs_with(b, &[]),
            None => busybox_rootfs(&[]),
        };
        let a = dir.path().join(format!("{arch}.tar"));
        std::fs::write(&a, docker_archive_for(&[rootfs], &name, arch)).expect("archive");
        d.ok(&["ctr-img", "load", "-i", a.to_str().expect("utf8")]);
    }
}

fn skopeo(args: &[&str]) -> serde_json::Value {
    let raw = run_ok(std::process::Command::new("skopeo").args(args));
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("skopeo {args:?}: {e}: {raw}"))
}

#[test]
fn a_two_platform_list_is_kept_used_saved_and_removed_locally() {
    let Some(busybox) = arm64_busybox() else {
        return;
    };
    if !require_root() || !require_tool("runc") || !require_tool("skopeo") {
        return;
    }
    let d = Daemon::start_with(&["--experimental"]);
    load_two_bases(&d, &busybox);
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox-$TARGETARCH:1\nRUN uname -m > /arch\nRUN for i in 1 2 3; do echo line-$i-$(uname -m); done\n",
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let host = format!("linux/{}", host_arch());
    let platforms = format!("{host},linux/arm64");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--platform",
        &platforms,
        "-t",
        "multi:1",
        c,
    ]);
    // The builds may run at once, but their logs come one after the other, in platform order.
    let at = |what: &str| {
        out.find(what)
            .unwrap_or_else(|| panic!("{what:?} is not in the output: {out}"))
    };
    let host_line = format!("line-3-{}", std::env::consts::ARCH);
    assert!(
        at(&format!("Building for {host}")) < at(&host_line),
        "{out}"
    );
    assert!(at(&host_line) < at("Building for linux/arm64"), "{out}");
    assert!(
        at("Building for linux/arm64") < at("line-1-aarch64"),
        "{out}"
    );
    assert!(at("line-3-aarch64") < at("Manifest list multi:1"), "{out}");
    assert_eq!(out.matches("Committed stage").count(), 2, "{out}");

    // `manifest inspect` shows the list built.
    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["manifest", "inspect", "multi:1"])).expect("json");
    assert_eq!(
        inspect["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let mut archs: Vec<&str> = inspect["manifests"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|m| m["platform"]["architecture"].as_str())
        .collect();
    archs.sort_unstable();
    let mut want = vec![host_arch(), "arm64"];
    want.sort_unstable();
    assert_eq!(archs, want, "{inspect}");

    // FROM a local list takes the entry for the stage's platform.
    let user = tempfile::tempdir().expect("ctx");
    std::fs::write(
        user.path().join("Dockerfile"),
        "FROM multi:1\nRUN cp /arch /seen\n",
    )
    .expect("df");
    let u = user.path().to_str().expect("utf8");
    for (platform, tag, uname) in [
        ("linux/arm64", "user:arm", "aarch64"),
        (&host[..], "user:host", std::env::consts::ARCH),
    ] {
        d.ok(&["ctr-img", "build", "--platform", platform, "-t", tag, u]);
        assert_eq!(
            d.image_text(tag, "seen").as_deref(),
            Some(uname),
            "{platform}"
        );
    }
    // A platform the list lacks is pulled (as for any name); the list's name here is on a
    // registry that is not there (nothing listens on port 9), so the pull fails and says
    // what the list has.
    d.ok(&["ctr-img", "tag", "multi:1", "127.0.0.1:9/multi:1"]);
    std::fs::write(
        user.path().join("Dockerfile"),
        "FROM 127.0.0.1:9/multi:1\nRUN cp /arch /seen\n",
    )
    .expect("df");
    let err = d.fails(&["ctr-img", "build", "--platform", "linux/s390x", u]);
    assert!(
        err.contains("linux/s390x") && err.contains("it has") && err.contains("linux/arm64"),
        "{err}"
    );
    d.ok(&["ctr-img", "rm", "127.0.0.1:9/multi:1"]);

    // `rm -p` keeps the untagged images the list names.
    d.ok(&["ctr-img", "rm", "-p"]);
    d.ok(&["manifest", "inspect", "multi:1"]);

    // save: one platform's image under the list's name; the whole list as an OCI archive.
    let out_dir = tempfile::tempdir().expect("out");
    let arm_tar = out_dir.path().join("arm.tar");
    let arm = arm_tar.to_str().expect("utf8");
    d.ok(&[
        "ctr-img",
        "save",
        "--platform",
        "linux/arm64",
        "multi:1",
        "-o",
        arm,
    ]);
    let seen = skopeo(&["inspect", &format!("docker-archive:{arm}")]);
    assert_eq!(seen["Architecture"], "arm64", "{seen}");
    let manifest = run_ok(std::process::Command::new("tar").args(["-xOf", arm, "manifest.json"]));
    assert!(manifest.contains("\"multi:1\""), "{manifest}");
    let err = d.fails(&[
        "ctr-img",
        "save",
        "multi:1",
        "-o",
        &format!("{}/x.tar", out_dir.path().display()),
    ]);
    assert!(
        err.contains("manifest list") && err.contains("--platform"),
        "{err}"
    );
    let err = d.fails(&[
        "ctr-img",
        "save",
        "--platform",
        "linux/arm64",
        &format!("busybox-{}:1", host_arch()),
        "-o",
        &format!("{}/y.tar", out_dir.path().display()),
    ]);
    assert!(
        err.contains(&format!("is for {host}, not linux/arm64")),
        "{err}"
    );
    let oci_tar = out_dir.path().join("all.tar");
    let oci = oci_tar.to_str().expect("utf8");
    d.ok(&["ctr-img", "save", "-f", "oci", "multi:1", "-o", oci]);
    let index = skopeo(&["inspect", "--raw", &format!("oci-archive:{oci}")]);
    assert_eq!(
        index["manifests"].as_array().map(Vec::len),
        Some(2),
        "{index}"
    );
    let arm_entry = skopeo(&[
        "--override-arch",
        "arm64",
        "inspect",
        &format!("oci-archive:{oci}"),
    ]);
    assert_eq!(arm_entry["Architecture"], "arm64", "{arm_entry}");
    assert!(!out_dir.path().join("x.tar").exists() && !out_dir.path().join("y.tar").exists());

    // rm of the list's name removes the list and the images only it named.
    let before = d.images().len();
    let out = d.ok(&["ctr-img", "rm", "multi:1"]);
    assert!(out.contains("Deleted manifest list: multi:1"), "{out}");
    assert_eq!(out.matches("Deleted image").count(), 2, "{out}");
    assert_eq!(d.images().len(), before - 2);
    let err = d.fails(&["manifest", "inspect", "multi:1"]);
    assert!(err.contains("multi:1"), "{err}");
}

#[test]
fn a_two_platform_build_to_an_oci_archive_holds_the_index() {
    let Some(busybox) = arm64_busybox() else {
        return;
    };
    if !require_root() || !require_tool("runc") || !require_tool("skopeo") {
        return;
    }
    let d = Daemon::start();
    load_two_bases(&d, &busybox);
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox-$TARGETARCH:1\nRUN uname -m > /arch\n",
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let platforms = format!("linux/{},linux/arm64", host_arch());
    let out_dir = tempfile::tempdir().expect("out");
    let tar = out_dir.path().join("multi.tar");
    let t = tar.to_str().expect("utf8");
    d.ok(&[
        "ctr-img",
        "build",
        "--platform",
        &platforms,
        "--format",
        "oci",
        "-o",
        &format!("oci-archive:{t}:multi:2"),
        c,
    ]);
    let index = skopeo(&["inspect", "--raw", &format!("oci-archive:{t}")]);
    assert_eq!(
        index["mediaType"], "application/vnd.oci.image.index.v1+json",
        "{index}"
    );
    assert_eq!(
        index["manifests"].as_array().map(Vec::len),
        Some(2),
        "{index}"
    );
    for m in index["manifests"].as_array().into_iter().flatten() {
        assert_eq!(
            m["mediaType"], "application/vnd.oci.image.manifest.v1+json",
            "{m}"
        );
    }
    // Each image of the archive is the one built for its platform.
    for (arch, uname) in [("arm64", "aarch64"), (host_arch(), std::env::consts::ARCH)] {
        let dest = out_dir.path().join(format!("dir-{arch}"));
        run_ok(std::process::Command::new("skopeo").args([
            "--override-arch",
            arch,
            "copy",
            &format!("oci-archive:{t}"),
            &format!("dir:{}", dest.display()),
        ]));
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dest.join("manifest.json")).expect("manifest"))
                .expect("json");
        let layers = manifest["layers"].as_array().expect("layers");
        let top = layers.last().expect("a layer")["digest"]
            .as_str()
            .expect("digest")
            .trim_start_matches("sha256:")
            .to_string();
        let listing = run_ok(
            std::process::Command::new("tar")
                .arg("-xOf")
                .arg(dest.join(&top))
                .arg("arch"),
        );
        assert_eq!(listing.trim(), uname, "{arch}");
    }
    // Loaded back (by a daemon of its own), the archive gives this machine's image, named.
    let fresh = Daemon::start();
    fresh.ok(&["ctr-img", "load", "-i", t]);
    assert_eq!(
        fresh.image_text("multi:2", "arch").as_deref(),
        Some(std::env::consts::ARCH)
    );
    // The list is kept in the store under the archive's name.
    let err = d.fails(&[
        "ctr-img",
        "save",
        "multi:2",
        "-o",
        &format!("{}/x.tar", out_dir.path().display()),
    ]);
    assert!(err.contains("manifest list"), "{err}");
    // `rm -a` takes the lists with the images.
    let out = d.ok(&["ctr-img", "rm", "-a"]);
    assert!(out.contains("Deleted manifest list: "), "{out}");
    assert!(d.images().is_empty());
    let err = d.fails(&[
        "ctr-img",
        "save",
        "multi:2",
        "-o",
        &format!("{}/z.tar", out_dir.path().display()),
    ]);
    assert!(err.contains("no such image: multi:2"), "{err}");
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
    load_two_bases(&d, &busybox);
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

#[test]
fn one_platform_failing_stops_the_others_and_makes_no_list() {
    let Some(busybox) = arm64_busybox() else {
        return;
    };
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start_with(&["--experimental"]);
    load_two_bases(&d, &busybox);
    let before = d.images().len();
    let ctx = tempfile::tempdir().expect("ctx");
    // The arm64 build fails at once; this machine's would take a minute, and is stopped.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox-$TARGETARCH:1\nRUN if [ \"$(uname -m)\" = aarch64 ]; then exit 3; fi; sleep 60\n",
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let platforms = format!("linux/{},linux/arm64", host_arch());
    let started = std::time::Instant::now();
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--platform",
        &platforms,
        "-t",
        "bad:1",
        c,
    ]);
    assert!(err.contains("building for linux/arm64"), "{err}");
    assert!(!err.contains("Committed stage"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(55),
        "the other build was not stopped"
    );
    assert_eq!(d.images().len(), before);
    let err = d.fails(&["manifest", "inspect", "bad:1"]);
    assert!(err.contains("bad:1"), "{err}");
    for sub in ["ingest", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(d.data().join(sub))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
    let builds = d.run_root().join("builds");
    let left: Vec<_> = std::fs::read_dir(&builds)
        .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{}: {left:?}", builds.display());
}

#[test]
fn the_builds_of_several_platforms_run_at_once() {
    let Some(busybox) = arm64_busybox() else {
        return;
    };
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    load_two_bases(&d, &busybox);
    let port = free_port();
    // This machine's build waits for a word from the arm64 build (RUN uses the host's
    // network): one after the other, the first would wait in vain and fail. (`nc` is not
    // the last command, so that it is not the container's PID 1, which ignores TERM.)
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM busybox-$TARGETARCH:1\n\
             RUN if [ \"$(uname -m)\" = aarch64 ]; then \
               for i in $(seq 150); do echo from-arm64 | nc -w 1 127.0.0.1 {port} && exit 0; sleep 0.2; done; exit 1; \
             else timeout 60 nc -l -p {port} > /heard; test -s /heard; fi\n"
        ),
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let platforms = format!("linux/{},linux/arm64", host_arch());
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--platform",
        &platforms,
        "-t",
        "together:1",
        c,
    ]);
    // This machine's image (the first committed) holds what it heard.
    let host_id = out
        .lines()
        .find_map(|l| l.strip_prefix("Committed stage 0 with ID: "))
        .unwrap_or_else(|| panic!("no commit in {out}"))
        .trim()
        .to_string();
    assert_eq!(
        d.image_text(&host_id, "heard").as_deref(),
        Some("from-arm64"),
        "{out}"
    );
}

#[test]
fn a_multi_platform_oci_archive_made_by_buildah_loads_this_machines_image() {
    if !require_root() || !require_tool("buildah") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let root = dir.path().display().to_string();
    let buildah = |args: &[&str]| {
        run_ok(
            std::process::Command::new("buildah")
                .args([
                    "--root",
                    &format!("{root}/root"),
                    "--runroot",
                    &format!("{root}/run"),
                    "--storage-driver",
                    "vfs",
                ])
                .args(args),
        )
    };
    let layer = dir.path().join("layer.tar");
    std::fs::write(&layer, busybox_rootfs(&[])).expect("layer");
    let layer = layer.to_str().expect("utf8");
    buildah(&["manifest", "create", "lst"]);
    // Another platform first, so that the pick is not simply the first entry.
    for arch in ["s390x", host_arch()] {
        let c = buildah(&["from", "scratch"]).trim().to_string();
        buildah(&["add", &c, layer, "/"]);
        buildah(&[
            "config",
            "--arch",
            arch,
            "--label",
            &format!("arch={arch}"),
            &c,
        ]);
        buildah(&["commit", "-q", &c, &format!("img-{arch}")]);
        buildah(&[
            "manifest",
            "add",
            "lst",
            &format!("containers-storage:localhost/img-{arch}"),
        ]);
    }
    let archive = dir.path().join("multi.tar");
    let a = archive.to_str().expect("utf8");
    buildah(&[
        "manifest",
        "push",
        "-q",
        "--all",
        "lst",
        &format!("oci-archive:{a}:multi:3"),
    ]);
    let d = Daemon::start();
    d.ok(&["ctr-img", "load", "-i", a]);
    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["ctr-img", "inspect", "multi:3"])).expect("json");
    assert_eq!(
        inspect[0]["Config"]["architecture"],
        host_arch(),
        "{inspect}"
    );
    assert_eq!(d.images().len(), 1);
}

/// Platforms of the rows of `ctr-img images` for `repo` (its PLATFORM column).
fn platforms_of(d: &Daemon, repo: &str) -> Vec<String> {
    let out = d.ok(&["ctr-img", "images"]);
    let mut found: Vec<String> = out
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(repo))
        // No PLATFORM column when every image is for this machine.
        .map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("linux/"))
                .map_or_else(|| format!("linux/{}", host_arch()), str::to_string)
        })
        .collect();
    found.sort();
    found
}

#[test]
fn one_name_stands_for_the_platforms_pulled_and_built_under_it() {
    if !require_tool("docker-registry") || !require_tool("skopeo") {
        return;
    }
    let Some(d) = arm64_daemon(&[]) else { return };
    if host_arch() != "amd64" {
        return;
    }
    let reg = isula_integration::registry::Registry::start(Default::default());
    let host = reg.host();
    // A list of two platforms in the registry, pushed by a daemon that has both.
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
    let repo = format!("{host}/multi");
    maker.ok(&["manifest", "push", "multi:1", &list]);

    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("f"), "f").expect("f");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {list}\nCOPY f /f\n"),
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");

    // The bug: an arm64 build pulls the arm64 entry under the list's name; a build for
    // both platforms then found "the" image of that name for arm64 only.
    let fresh = Daemon::for_registries(&[&host]);
    fresh.ok(&[
        "ctr-img",
        "build",
        "--platform",
        "linux/arm64",
        "-t",
        "one:1",
        c,
    ]);
    assert_eq!(platforms_of(&fresh, &repo), vec!["linux/arm64"]);
    fresh.ok(&[
        "ctr-img",
        "build",
        "--platform",
        "linux/amd64,linux/arm64",
        "-t",
        "both:1",
        c,
    ]);
    assert_eq!(
        platforms_of(&fresh, &repo),
        vec!["linux/amd64", "linux/arm64"]
    );
    // Each platform's image is the registry's (its ID is the digest of the config the
    // list's entry for that platform names).
    let ours: Vec<String> = fresh
        .ok(&["ctr-img", "images", &repo])
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(repo.as_str()))
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    assert_eq!(ours.len(), 2, "{ours:?}");
    for arch in ["amd64", "arm64"] {
        let raw = run_ok(std::process::Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--config",
            "--tls-verify=false",
            "--override-os",
            "linux",
            "--override-arch",
            arch,
            &format!("docker://{list}"),
        ]));
        let id = sha256_hex(raw.as_bytes());
        assert!(
            ours.iter().any(|o| id.starts_with(o.as_str())),
            "{arch}: registry's {id}, ours {ours:?}"
        );
    }

    // inspect: this machine's image of the name.
    let inspect: serde_json::Value =
        serde_json::from_str(&fresh.ok(&["ctr-img", "inspect", &list])).expect("json");
    assert_eq!(
        inspect[0]["Config"]["architecture"],
        host_arch(),
        "{inspect}"
    );

    // save: one platform, or a clear error naming them.
    let nowhere = dir.path().join("never.tar");
    let err = fresh.fails(&[
        "ctr-img",
        "save",
        &list,
        "-o",
        nowhere.to_str().expect("utf8"),
    ]);
    assert!(!nowhere.exists());
    assert!(
        err.contains("linux/amd64") && err.contains("linux/arm64") && err.contains("--platform"),
        "{err}"
    );
    let saved = dir.path().join("arm-saved.tar");
    fresh.ok(&[
        "ctr-img",
        "save",
        "--platform",
        "linux/arm64",
        &list,
        "-o",
        saved.to_str().expect("utf8"),
    ]);
    let config = skopeo(&[
        "inspect",
        "--config",
        &format!("docker-archive:{}", saved.display()),
    ]);
    assert_eq!(config["architecture"], "arm64", "{config}");

    // push: the whole list, or one platform's image under the name.
    let whole = format!("{host}/pushed:all");
    fresh.ok(&["ctr-img", "tag", &list, &whole]);
    fresh.ok(&["ctr-img", "push", &whole]);
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{whole}"),
    ]);
    assert_eq!(raw["manifests"].as_array().map(Vec::len), Some(2), "{raw}");
    fresh.ok(&["ctr-img", "push", "--platform", "linux/arm64", &list]);
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{list}"),
    ]);
    assert!(
        raw["manifests"].is_null() && raw["config"].is_object(),
        "one image: {raw}"
    );
    let config = skopeo(&[
        "inspect",
        "--config",
        "--tls-verify=false",
        &format!("docker://{list}"),
    ]);
    assert_eq!(config["architecture"], "arm64", "{config}");
    let err = fresh.fails(&["ctr-img", "push", "--platform", "linux/s390x", &list]);
    assert!(err.contains("linux/s390x"), "{err}");

    // rm -p keeps what the name stands for; rm of the name takes both.
    let before = fresh.images().len();
    fresh.ok(&["ctr-img", "rm", "-p"]);
    assert_eq!(fresh.images().len(), before);
    assert_eq!(
        platforms_of(&fresh, &repo),
        vec!["linux/amd64", "linux/arm64"]
    );

    // After a plain pull (this machine's platform), a build for another adds it.
    let pulled = Daemon::for_registries(&[&host]);
    pulled.ok(&["ctr-img", "pull", &whole]);
    let whole_repo = format!("{host}/pushed");
    assert_eq!(platforms_of(&pulled, &whole_repo), vec!["linux/amd64"]);
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM {whole}\nCOPY f /f\n"),
    )
    .expect("df");
    pulled.ok(&[
        "ctr-img",
        "build",
        "--platform",
        "linux/arm64",
        "-t",
        "built:1",
        c,
    ]);
    assert_eq!(
        platforms_of(&pulled, &whole_repo),
        vec!["linux/amd64", "linux/arm64"]
    );
    // Pulling the same platform again replaces only that entry.
    pulled.ok(&["ctr-img", "pull", "--platform", "linux/arm64", &whole]);
    assert_eq!(
        platforms_of(&pulled, &whole_repo),
        vec!["linux/amd64", "linux/arm64"]
    );
    pulled.ok(&["ctr-img", "rm", &whole]);
    assert!(platforms_of(&pulled, &whole_repo).is_empty());
    let left: Vec<String> = pulled
        .images()
        .into_iter()
        .map(|(r, t, _)| format!("{r}:{t}"))
        .collect();
    assert_eq!(
        left,
        vec!["built:1"],
        "rm of the name takes its images, nothing else"
    );
}

/// A build for another platform under a tag an image of this machine's platform holds
/// joins it (the tag becomes a local list of both), and a build for the same platform
/// again replaces that platform's entry only: `images` shows both platforms under the
/// tag, `rm -p` keeps both, and `rm` of the tag removes the list. No QEMU: the builds only
/// COPY (the arm64 base is this machine's busybox with an arm64 config).
#[test]
fn a_build_for_another_platform_joins_the_tag_it_names() {
    if !require_root() || !require_tool("runc") || host_arch() != "amd64" {
        return;
    }
    let d = Daemon::start();
    let dir = tempfile::tempdir().expect("tmp");
    for (name, arch) in [("base:1", "amd64"), ("base-arm:1", "arm64")] {
        let a = dir.path().join(format!("{arch}.tar"));
        std::fs::write(&a, docker_archive_for(&[busybox_rootfs(&[])], name, arch))
            .expect("archive");
        d.ok(&["ctr-img", "load", "-i", a.to_str().expect("utf8")]);
    }
    let ctx = tempfile::tempdir().expect("ctx");
    let c = ctx.path().to_str().expect("utf8");
    // The platforms of the tag's repository, however `images` spells it.
    let joined = |d: &Daemon| {
        let out = d.ok(&["ctr-img", "images"]);
        let repo = out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .find(|r| *r == "joined" || r.ends_with("/joined"))
            .map(str::to_string);
        repo.map(|r| platforms_of(d, &r)).unwrap_or_default()
    };
    let build = |base: &str, platform: &str, content: &str| {
        std::fs::write(ctx.path().join("f"), content).expect("f");
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM {base}\nCOPY f /f\n"),
        )
        .expect("df");
        d.ok(&[
            "ctr-img",
            "build",
            "--platform",
            platform,
            "-t",
            "joined:1",
            c,
        ]);
    };
    build("base:1", "linux/amd64", "one");
    assert_eq!(joined(&d), vec!["linux/amd64"]);
    build("base-arm:1", "linux/arm64", "two");
    assert_eq!(joined(&d), vec!["linux/amd64", "linux/arm64"]);
    // Built again for this machine: its entry is replaced, the arm64 one kept.
    let before = d.ok(&["ctr-img", "images"]);
    build("base:1", "linux/amd64", "three");
    let after = d.ok(&["ctr-img", "images"]);
    assert_eq!(joined(&d), vec!["linux/amd64", "linux/arm64"]);
    assert_ne!(before, after, "the amd64 entry was not replaced");
    d.ok(&["ctr-img", "rm", "-p"]);
    assert_eq!(joined(&d), vec!["linux/amd64", "linux/arm64"]);
    d.ok(&["ctr-img", "rm", "joined:1"]);
    assert!(joined(&d).is_empty());
}
