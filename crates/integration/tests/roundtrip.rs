//! import → images → tag → save → rm → load → images, for docker-archive and oci-archive,
//! with the archives read back by skopeo and umoci.

use isula_integration::*;
use std::process::Command;

#[test]
fn round_trip_through_both_archive_formats() {
    if !require_root() {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    let src = work.path().join("busybox.tar.gz");
    std::fs::write(&src, gzip(&busybox_rootfs(&[("etc/msg", b"round trip\n")]))).expect("write");
    let out = d.ok(&[
        "ctr-img",
        "import",
        src.to_str().expect("utf8"),
        "busybox:latest",
    ]);
    assert!(
        out.starts_with("Getting image source signatures\nCopying blob sha256:"),
        "{out}"
    );
    let id = import_id(&out);
    assert_eq!(id.len(), 64);
    assert_eq!(
        d.images(),
        vec![("busybox".into(), "latest".into(), id[..12].to_string())]
    );

    d.ok(&["ctr-img", "tag", "busybox", "e2e/busybox:v1"]);
    // Bad names are refused before anything changes.
    let before = d.store_snapshot();
    let err = d.fails(&["ctr-img", "tag", "busybox", "Bad/Name"]);
    assert!(err.contains("invalid reference format"), "{err}");
    assert_eq!(d.store_snapshot(), before);
    let mut rows = d.images();
    rows.sort();
    assert_eq!(
        rows,
        vec![
            ("busybox".into(), "latest".into(), id[..12].to_string()),
            ("e2e/busybox".into(), "v1".into(), id[..12].to_string()),
        ]
    );
    // Name filter.
    assert_eq!(
        d.ok(&["ctr-img", "images", "e2e/busybox"])
            .matches(&id[..12])
            .count(),
        1
    );

    let docker_tar = work.path().join("docker.tar");
    let oci_tar = work.path().join("oci.tar");
    let out = d.ok(&[
        "ctr-img",
        "save",
        "busybox:latest",
        "e2e/busybox:v1",
        "-o",
        docker_tar.to_str().expect("utf8"),
    ]);
    assert!(
        out.ends_with("Save success with image: [busybox:latest e2e/busybox:v1]\n"),
        "{out}"
    );
    assert_eq!(out.matches("Save success").count(), 1, "{out}");
    let out = d.ok(&[
        "ctr-img",
        "save",
        &id[..12],
        "-o",
        oci_tar.to_str().expect("utf8"),
        "-f",
        "oci",
    ]);
    assert!(
        out.ends_with(&format!("Save success with image: [{}]\n", &id[..12])),
        "{out}"
    );
    let err = d.fails(&[
        "ctr-img",
        "save",
        "busybox",
        "-o",
        docker_tar.to_str().expect("utf8"),
    ]);
    assert!(err.contains("already exist"), "{err}");

    let out = d.ok(&["ctr-img", "rm", "busybox", "e2e/busybox:v1"]);
    let layer = out
        .lines()
        .nth(1)
        .and_then(|l| l.strip_prefix("Deleted layer: sha256:"))
        .unwrap_or_else(|| panic!("no layer line in {out}"));
    assert_eq!(
        out,
        format!("Untagged image: busybox\nDeleted layer: sha256:{layer}\nDeleted image: e2e/busybox:v1\n")
    );
    assert!(d.images().is_empty());
    // An empty list is isula-build's head, verbatim.
    assert_eq!(
        d.ok(&["ctr-img", "images"]),
        "-----------   ----   ---------   --------\nREPOSITORY    TAG    IMAGE ID    CREATED\n-----------   ----   ---------   --------\n"
    );
    assert!(d.leftovers().is_empty());

    let out = d.ok(&["ctr-img", "load", "-i", docker_tar.to_str().expect("utf8")]);
    assert!(out.ends_with(&format!("Loaded image as {id}\n")), "{out}");
    let mut rows = d.images();
    rows.sort();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r.2 == id[..12]));
    assert_eq!(rows[1].0, "e2e/busybox");

    // Saving again gives the same bytes.
    let again = work.path().join("again.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "busybox:latest",
        "e2e/busybox:v1",
        "-o",
        again.to_str().expect("utf8"),
    ]);
    assert_eq!(
        std::fs::read(&docker_tar).expect("a"),
        std::fs::read(&again).expect("b")
    );

    d.ok(&["ctr-img", "rm", "-a"]);
    assert!(d.images().is_empty());
    let out = d.ok(&["ctr-img", "load", "-i", oci_tar.to_str().expect("utf8")]);
    assert!(out.ends_with(&format!("Loaded image as {id}\n")), "{out}");
    // The OCI archive was saved by ID: no name travels with it.
    assert_eq!(
        d.images(),
        vec![("<none>".into(), "<none>".into(), id[..12].to_string())]
    );
    let again_oci = work.path().join("again-oci.tar");
    d.ok(&[
        "ctr-img",
        "save",
        &id,
        "-o",
        again_oci.to_str().expect("utf8"),
        "-f",
        "oci",
    ]);
    assert_eq!(
        std::fs::read(&oci_tar).expect("a"),
        std::fs::read(&again_oci).expect("b")
    );
    let out = d.ok(&["ctr-img", "rm", "-p"]);
    assert!(out.ends_with(&format!("\nDeleted image: {id}\n")), "{out}");

    let ok = Command::new(bin("isula-builder"))
        .arg("--dataroot")
        .arg(d.data())
        .arg("--config-dir")
        .arg(d.etc())
        .arg("--check-store")
        .output()
        .expect("check");
    // The running daemon holds the data root: the check refuses rather than race it.
    assert!(!ok.status.success());
    assert!(String::from_utf8_lossy(&ok.stderr).contains("already running"));
}

#[test]
fn archives_are_readable_by_skopeo_and_umoci() {
    if !require_root() || !require_tool("skopeo") || !require_tool("umoci") {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    let src = work.path().join("rootfs.tar");
    std::fs::write(&src, busybox_rootfs(&[("etc/msg", b"from isula\n")])).expect("write");
    let id = import_id(&d.ok(&[
        "ctr-img",
        "import",
        src.to_str().expect("utf8"),
        "localhost/e2e:1",
    ]));
    let docker_tar = work.path().join("d.tar");
    let oci_tar = work.path().join("o.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "localhost/e2e:1",
        "-o",
        docker_tar.to_str().expect("utf8"),
    ]);
    d.ok(&[
        "ctr-img",
        "save",
        "localhost/e2e:1",
        "-o",
        oci_tar.to_str().expect("utf8"),
        "-f",
        "oci",
    ]);

    for r in [
        format!("docker-archive:{}", docker_tar.display()),
        format!("oci-archive:{}", oci_tar.display()),
    ] {
        let out = run_ok(Command::new("skopeo").args(["inspect", "--config", &r]));
        let config: serde_json::Value = serde_json::from_str(&out).expect("json");
        assert_eq!(
            config["rootfs"]["diff_ids"].as_array().map(|a| a.len()),
            Some(1),
            "{r}"
        );
        let raw = run_ok(Command::new("skopeo").args(["inspect", "--raw", "--config", &r]));
        assert_eq!(
            sha256_hex(raw.as_bytes()),
            id,
            "{r}: config bytes must be ours, unchanged"
        );
    }
    let layout = work.path().join("layout");
    run_ok(Command::new("skopeo").args([
        "copy",
        &format!("oci-archive:{}", oci_tar.display()),
        &format!("oci:{}:latest", layout.display()),
    ]));
    let bundle = work.path().join("bundle");
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:latest", layout.display()))
            .arg(&bundle),
    );
    assert_eq!(
        std::fs::read(bundle.join("rootfs/etc/msg")).expect("msg"),
        b"from isula\n"
    );
    assert!(bundle.join("rootfs/bin/busybox").is_file());
}

#[test]
fn import_of_xz_and_bzip2_tarballs() {
    if !require_root() || !require_tool("xz") || !require_tool("bzip2") {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    let plain = work.path().join("rootfs.tar");
    std::fs::write(&plain, busybox_rootfs(&[])).expect("write");
    let mut ids = Vec::new();
    for (tool, ext) in [("xz", "xz"), ("bzip2", "bz2")] {
        let out = work.path().join(format!("rootfs.tar.{ext}"));
        run_ok(
            Command::new(tool)
                .arg("-k")
                .arg("-c")
                .arg(&plain)
                .stdout(std::fs::File::create(&out).expect("out")),
        );
        ids.push(import_id(&d.ok(&[
            "ctr-img",
            "import",
            out.to_str().expect("utf8"),
            &format!("imported:{ext}"),
        ])));
    }
    assert_eq!(d.images().len(), 2);
    // Same content, different created time: same layer, one blob set on disk.
    let layers = std::fs::read_dir(d.data().join("layers"))
        .expect("layers")
        .count();
    assert_eq!(layers, 1);
}

/// The layer directories in the store (chain IDs).
fn layer_dirs(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(d.data().join("layers"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A layer tar whose one entry has the raw name `name` (the tar crate refuses `..`).
fn raw_layer(name: &str) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(5);
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    b.append(&h, &b"pwned"[..]).expect("append");
    b.into_inner().expect("tar")
}

#[test]
fn a_loaded_image_stays_packed_until_a_build_needs_it_or_the_machine_is_idle() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let mut d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    d.import_busybox("hold:1", &[]);
    // An operation that runs throughout: no quiet spell, so no background unpack.
    let busy = d.busy("hold:1");

    // The load stores the layer, checked, and unpacks nothing.
    let before = layer_dirs(&d);
    let archive = work.path().join("app.tar");
    std::fs::write(
        &archive,
        docker_archive(
            &[busybox_rootfs(&[("etc/app", b"from the archive\n")])],
            "app:1",
        ),
    )
    .expect("archive");
    d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    assert_eq!(layer_dirs(&d), before, "the load unpacked its layer");

    // A build from it makes the directory then and there.
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM app:1\nRUN cat /etc/app > /copied\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "built:1",
        ctx.to_str().expect("utf8"),
    ]);
    assert_eq!(
        d.image_text("built:1", "copied").as_deref(),
        Some("from the archive")
    );
    assert_eq!(layer_dirs(&d).len(), before.len() + 2, "base and new layer");

    // Once the machine is idle, a loaded layer's directory is made without any build.
    busy.end();
    let n = layer_dirs(&d).len();
    std::fs::write(
        &archive,
        docker_archive(&[busybox_rootfs(&[("etc/other", b"second\n")])], "other:1"),
    )
    .expect("archive");
    d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("utf8")]);
    wait_until(
        "the idle unpack",
        std::time::Duration::from_secs(60),
        || layer_dirs(&d).len() == n + 1,
    );

    // A layer the unpack would refuse is refused by the load, naming the entry, and
    // nothing is kept.
    let snapshot = d.store_snapshot();
    let bad = work.path().join("bad.tar");
    std::fs::write(&bad, docker_archive(&[raw_layer("../escape")], "bad:1")).expect("bad");
    let err = d.fails(&["ctr-img", "load", "-i", bad.to_str().expect("utf8")]);
    assert!(err.contains("../escape") && err.contains(".."), "{err}");
    assert_eq!(d.store_snapshot(), snapshot);
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
    d.stop_and_check_store();
}
