//! Every bad input gets a clear error and leaves the store (and the host) as it was.

use isula_integration::*;
use std::path::Path;

fn raw_entry(
    name: &str,
    kind: tar::EntryType,
    data: &[u8],
    link: Option<&str>,
) -> (tar::Header, Vec<u8>) {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    if let Some(l) = link {
        h.set_link_name(l).expect("link name");
    }
    // Written raw: tar's set_path refuses `..`, and we want exactly these bytes.
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    (h, data.to_vec())
}

fn tar_of(entries: &[(tar::Header, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (h, data) in entries {
        b.append(h, &data[..]).expect("append");
    }
    b.into_inner().expect("tar")
}

/// A daemon with one good image in it, and its store snapshot.
fn daemon_with_image(work: &Path) -> (Daemon, Vec<String>) {
    let d = Daemon::start();
    let good = work.join("good.tar");
    std::fs::write(&good, busybox_rootfs(&[])).expect("write");
    d.ok(&["ctr-img", "import", good.to_str().expect("utf8"), "good:1"]);
    let snap = d.store_snapshot();
    (d, snap)
}

#[test]
fn hostile_import_tarballs_are_refused() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let (d, before) = daemon_with_image(work.path());
    let victim_dir = tempfile::tempdir().expect("victim");
    let victim = victim_dir.path().join("victim");
    std::fs::write(&victim, b"host file").expect("victim");
    let vdir = victim_dir.path().to_str().expect("utf8");
    let vfile = victim.to_str().expect("utf8");

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            tar_of(&[raw_entry(
                "../../escape",
                tar::EntryType::Regular,
                b"x",
                None,
            )]),
            "contains '..'",
        ),
        (
            "symlink-then-file",
            tar_of(&[
                raw_entry("out", tar::EntryType::Symlink, b"", Some(vdir)),
                raw_entry("out/victim", tar::EntryType::Regular, b"pwned", None),
            ]),
            "through a symlink",
        ),
        (
            "hardlink-to-host",
            tar_of(&[raw_entry("h", tar::EntryType::Link, b"", Some(vfile))]),
            "hard link target",
        ),
        (
            "whiteout-under-symlink",
            tar_of(&[
                raw_entry("out", tar::EntryType::Symlink, b"", Some(vdir)),
                raw_entry("out/.wh.victim", tar::EntryType::Regular, b"", None),
            ]),
            "through a symlink",
        ),
    ];
    for (name, data, want) in cases {
        let p = work.path().join(format!("{name}.tar"));
        std::fs::write(&p, data).expect("write");
        let err = d.fails(&["ctr-img", "import", p.to_str().expect("utf8"), "evil:1"]);
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(d.store_snapshot(), before, "{name} changed the store");
        assert_eq!(
            std::fs::read(&victim).expect("victim"),
            b"host file",
            "{name}"
        );
        assert_eq!(
            std::fs::read_dir(victim_dir.path()).expect("ls").count(),
            1,
            "{name}"
        );
    }

    // A truncated gzip.
    let gz = gzip(&busybox_rootfs(&[]));
    let p = work.path().join("truncated.tar.gz");
    std::fs::write(&p, &gz[..gz.len() / 2]).expect("write");
    let err = d.fails(&["ctr-img", "import", p.to_str().expect("utf8")]);
    assert!(err.contains("truncated.tar.gz"), "{err}");
    assert_eq!(d.store_snapshot(), before);

    // Over the 1 GiB import limit (a sparse file: no disk used).
    let p = work.path().join("huge.tar");
    std::fs::File::create(&p)
        .expect("create")
        .set_len((1 << 30) + 1)
        .expect("len");
    let err = d.fails(&["ctr-img", "import", p.to_str().expect("utf8")]);
    assert!(err.contains("over the limit of 1073741824 bytes"), "{err}");
    assert_eq!(d.store_snapshot(), before);

    // A bad reference is refused before the file is read.
    let err = d.fails(&["ctr-img", "import", p.to_str().expect("utf8"), "UPPER:case"]);
    assert!(err.contains("invalid reference format"), "{err}");
    let err = d.fails(&["ctr-img", "import", "/nonexistent/rootfs.tar"]);
    assert!(err.contains("/nonexistent/rootfs.tar"), "{err}");
    assert_eq!(d.store_snapshot(), before);
    assert!(d.leftovers().is_empty());
}

/// Writes a docker-archive by hand: one layer, a config and a manifest.json.
fn docker_archive(layer: &[u8], diff_id_hex: &str, manifest_padding: usize) -> Vec<u8> {
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{diff_id_hex}"]}}}}"#
    );
    let config_hex = sha256_hex(config.as_bytes());
    let manifest = format!(
        r#"[{{"Config":"{config_hex}.json","RepoTags":["bad:1"],"Layers":["layer.tar"],"Pad":"{}"}}]"#,
        " ".repeat(manifest_padding)
    );
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("layer.tar", layer),
        (&format!("{config_hex}.json") as &str, config.as_bytes()),
        ("manifest.json", manifest.as_bytes()),
    ] {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).expect("append");
    }
    b.into_inner().expect("tar")
}

#[test]
fn bad_archives_are_refused() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let (d, before) = daemon_with_image(work.path());
    let layer = busybox_rootfs(&[("etc/x", b"x")]);
    let right = sha256_hex(&layer);
    let wrong = sha256_hex(b"something else");

    // Sanity: the hand-made archive loads when it is right.
    let ok = work.path().join("ok.tar");
    std::fs::write(&ok, docker_archive(&layer, &right, 0)).expect("write");
    let d2 = Daemon::start();
    d2.ok(&["ctr-img", "load", "-i", ok.to_str().expect("utf8")]);
    assert_eq!(d2.images().len(), 1);

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "diffid-mismatch",
            docker_archive(&layer, &wrong, 0),
            "diff ID mismatch",
        ),
        (
            "big-manifest",
            docker_archive(&layer, &right, 1 << 20),
            "manifest.json is over the limit",
        ),
        (
            "not-an-archive",
            b"hello, I am not a tar file at all".repeat(100),
            "not a valid tar archive",
        ),
        ("empty-tar", tar_of(&[]), "neither a docker-archive"),
        (
            "truncated",
            docker_archive(&layer, &right, 0)[..layer.len() / 2].to_vec(),
            "bad.tar",
        ),
    ];
    for (name, data, want) in cases {
        let p = work.path().join(format!("{name}.tar"));
        std::fs::write(&p, data).expect("write");
        let err = d.fails(&["ctr-img", "load", "-i", p.to_str().expect("utf8")]);
        let err = err.replace(&format!("{name}.tar"), "bad.tar");
        assert!(err.contains(want), "{name}: {err}");
        assert_eq!(d.store_snapshot(), before, "{name} changed the store");
    }
    assert!(d.leftovers().is_empty());
}

#[test]
fn rm_reports_each_failure_and_goes_on() {
    if !require_root() {
        return;
    }
    let work = tempfile::tempdir().expect("tmp");
    let (d, _) = daemon_with_image(work.path());
    let o = d.cli(&["ctr-img", "rm", "missing:1", "good:1", "also-missing"]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with(
            "Find local image \"missing:1\" failed: image \"missing:1\" not found in local store\n"
        ),
        "{out}"
    );
    assert!(out.contains("Deleted layer: sha256:"), "{out}");
    assert!(out.contains("Deleted image: good:1\n"), "{out}");
    assert!(
        out.ends_with("Find local image \"also-missing\" failed: image \"also-missing\" not found in local store\n"),
        "{out}"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("remove one or more images failed"));
    assert!(d.images().is_empty());
    // Everything the image had is collected.
    assert_eq!(
        std::fs::read_dir(d.data().join("blobs/sha256"))
            .expect("blobs")
            .count(),
        0
    );
    assert_eq!(
        std::fs::read_dir(d.data().join("layers"))
            .expect("layers")
            .count(),
        0
    );
}
