//! Switching from isula-build 0.9.x: its images live in a containers/storage overlay store
//! under `<data_root>/storage`. Buildah uses the same storage library, so it makes such a
//! store here: an image from a rootfs, one committed on top of it with two names, one pulled
//! from a registry (its manifest names compressed blobs the store did not keep) and one whose
//! layer data was damaged. The first start of our daemon on that data root brings every
//! sound image across with its names and the same ID, names the damaged one, leaves the old
//! files as they were, and does not run again at the next start.

use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use sha2::Digest as _;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Buildah {
    root: PathBuf,
    run: PathBuf,
}

impl Buildah {
    fn cmd(&self, args: &[&str]) -> String {
        run_ok(
            Command::new("buildah")
                .arg("--root")
                .arg(&self.root)
                .arg("--runroot")
                .arg(&self.run)
                .args(["--storage-driver", "overlay"])
                .args(args),
        )
        .trim()
        .to_string()
    }

    /// `name` as a new image: `base` (or scratch) plus `files` (a tar added at /).
    fn commit(&self, base: &str, tar: &Path, name: &str) -> String {
        let c = self.cmd(&["from", "--pull-never", base]);
        self.cmd(&["add", &c, tar.to_str().expect("path"), "/"]);
        self.cmd(&["config", "--cmd", "/bin/sh", &c]);
        let id = self.cmd(&["commit", "-q", &c, name]);
        self.cmd(&["rm", &c]);
        id
    }

    /// (full name, image ID) of every image.
    fn images(&self) -> Vec<(String, String)> {
        let out = self.cmd(&[
            "images",
            "--no-trunc",
            "--format",
            "{{.Name}}:{{.Tag}} {{.ID}}",
        ]);
        let mut v: Vec<(String, String)> = out
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                Some((f.next()?.to_string(), f.next()?.to_string()))
            })
            .map(|(n, id)| (n, id.trim_start_matches("sha256:").to_string()))
            .collect();
        v.sort();
        v
    }
}

/// Every file under `dir` with its size and content digest, for "left untouched".
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("stat");
            let rel = p.strip_prefix(dir).expect("rel").display().to_string();
            if m.is_dir() {
                out.push(format!("{rel}/ {:o}", m.permissions().mode_bits()));
                stack.push(p);
            } else if m.is_file() {
                let data = std::fs::read(&p).expect("read");
                out.push(format!(
                    "{rel} {}",
                    hex::encode(sha2::Sha256::digest(&data))
                ));
            } else {
                out.push(format!("{rel} {:?}", m.file_type()));
            }
        }
    }
    out.sort();
    out
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}
impl ModeBits for std::fs::Permissions {
    fn mode_bits(&self) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        self.mode()
    }
}

#[test]
fn an_isula_build_0_9_store_comes_across_on_first_start() {
    if !require_root() || !require_tool("buildah") || !require_tool("docker-registry") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let mut d = Daemon::for_registries(&[&reg.host()]);
    d.stop();
    let work = tempfile::tempdir().expect("tmp");
    let b = Buildah {
        root: d.data().join("storage"),
        run: work.path().join("buildah-run"),
    };
    let tar = |name: &str, files: &[(&str, &[u8])]| {
        let p = work.path().join(name);
        std::fs::write(&p, files_tar(files)).expect("tar");
        p
    };
    let rootfs = work.path().join("rootfs.tar");
    std::fs::write(&rootfs, busybox_rootfs(&[])).expect("rootfs");
    b.commit("scratch", &rootfs, "mig/base:1");
    b.commit(
        "localhost/mig/base:1",
        &tar("app.tar", &[("etc/app", b"from buildah\n")]),
        "mig/app:2",
    );
    b.cmd(&["tag", "localhost/mig/app:2", "mig/app:latest"]);
    // Pulled: pushed (gzip) and pulled back after removing the local copy.
    b.commit(
        "localhost/mig/base:1",
        &tar("other.tar", &[("etc/other", b"pulled\n")]),
        "mig/other:1",
    );
    let remote = format!("{}/reg/other:1", reg.host());
    b.cmd(&[
        "push",
        "--tls-verify=false",
        "localhost/mig/other:1",
        &format!("docker://{remote}"),
    ]);
    b.cmd(&["rmi", "localhost/mig/other:1"]);
    b.cmd(&["pull", "--tls-verify=false", &format!("docker://{remote}")]);
    // Damaged: a file of its layer is shorter than the layer's tar says.
    let broken_id = b.commit(
        "localhost/mig/base:1",
        &tar("broken.tar", &[("etc/broken", &[b'x'; 4096])]),
        "mig/broken:1",
    );
    let images: serde_json::Value = serde_json::from_slice(
        &std::fs::read(b.root.join("overlay-images/images.json")).expect("images.json"),
    )
    .expect("json");
    let top = images
        .as_array()
        .expect("list")
        .iter()
        .find(|i| broken_id.ends_with(i["id"].as_str().expect("id")))
        .expect("broken image")["layer"]
        .as_str()
        .expect("layer")
        .to_string();
    std::fs::write(
        b.root.join("overlay").join(&top).join("diff/etc/broken"),
        b"short",
    )
    .expect("damage");
    let mut want = b.images();
    want.retain(|(n, _)| !n.contains("broken"));
    assert_eq!(want.len(), 4, "{want:?}");
    let before = tree(&b.root);

    d.restart();
    let log = d.log();
    assert!(log.contains("migrated=3 failed=1"), "{log}");
    assert!(
        log.lines().any(|l| l.contains("image not migrated")
            && l.contains("localhost/mig/broken:1")
            && l.contains("etc/broken is shorter")),
        "{log}"
    );
    // Same names, same IDs.
    let listing = d.ok(&["ctr-img", "images"]);
    for (name, id) in &want {
        let (repo, tag) = name.rsplit_once(':').expect("tag");
        let familiar = repo.strip_prefix("docker.io/library/").unwrap_or(repo);
        assert!(
            listing.lines().any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 2 && f[0] == familiar && f[1] == tag && id.starts_with(f[2])
            }),
            "{name} {id} not in\n{listing}"
        );
    }
    assert!(!listing.contains("broken"), "{listing}");
    assert_eq!(d.images().len(), 4, "{listing}");
    // Every image is whole: the store check verifies every blob and layer.
    d.stop_and_check_store();
    d.restart();
    // The old store is as it was.
    assert_eq!(tree(&b.root), before, "the old store changed");

    // Usable: a build on a migrated image, and a push of the pulled one.
    let ctx = work.path().join("ctx");
    std::fs::create_dir(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM localhost/mig/app:2\nRUN cat /etc/app\n",
    )
    .expect("df");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "on-migrated:1",
        ctx.to_str().expect("ctx"),
    ]);
    assert!(out.contains("from buildah"), "{out}");
    let again = format!("{}/reg/again:1", reg.host());
    d.ok(&["ctr-img", "tag", &remote, &again]);
    d.ok(&["ctr-img", "push", &again]);
    let digest = run_ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{again}"),
    ]));
    assert!(digest.starts_with("sha256:"), "{digest}");

    // Once only: an image removed after the migration does not come back.
    d.ok(&["ctr-img", "rm", "localhost/mig/app:latest"]);
    d.stop();
    d.restart();
    let listing = d.ok(&["ctr-img", "images"]);
    assert!(
        !listing
            .lines()
            .any(|l| l.starts_with("localhost/mig/app ") && l.contains(" latest ")),
        "{listing}"
    );
    assert!(d.data().join("migrated-from-isula-build.json").is_file());
}
