//! Pull matrix: images put into a real Distribution registry by every producer at hand (our
//! push in both formats, `docker push`, `buildah push`, `skopeo copy`, OCI layouts written
//! by hand), with every layer media type (gzip, uncompressed tar, zstd) and with manifest
//! lists and OCI indexes that hold other platforms and BuildKit attestation entries. Each
//! cell is pulled by tag and by digest, used as a FROM base with a RUN, and saved to both
//! archive formats. Content we cannot use is refused with an error naming its media type,
//! and the store is left as it was.

use isula_integration::oci_layout::{Layout, OCI_LAYER, OCI_LAYER_GZIP};
use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use std::path::PathBuf;
use std::process::Command;

const MARKER: &[u8] = b"isula-marker";
const WRONG_MARKER: &[u8] = b"wrong-platform";

fn ready() -> bool {
    require_root()
        && require_tool("docker-registry")
        && require_tool("skopeo")
        && require_tool("curl")
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Some architecture other than ours, for the entries that must not be picked.
fn other_arch() -> &'static str {
    if host_arch() == "arm64" {
        "amd64"
    } else {
        "arm64"
    }
}

/// A registry, a daemon that may talk to it, and the test image as a docker-archive (the
/// input of the other producers).
struct Bench {
    reg: Registry,
    d: Daemon,
    archive: PathBuf,
}

impl Bench {
    fn new() -> Bench {
        let reg = Registry::start(RegistryOptions::default());
        let conf = format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            reg.host()
        );
        let d = Daemon::start_configured(&[("registries.toml", &conf)], &[], &[]);
        d.import_busybox("src:1", &[("marker", MARKER)]);
        let archive = d.dir.path().join("src.tar");
        d.ok(&[
            "ctr-img",
            "save",
            "src:1",
            "-o",
            archive.to_str().expect("path"),
        ]);
        Bench { reg, d, archive }
    }

    fn name(&self, cell: &str) -> String {
        format!("{}/x/{cell}:1", self.reg.host())
    }

    fn tmp(&self, name: &str) -> PathBuf {
        self.d.dir.path().join(name)
    }

    fn layout(&self, name: &str) -> Layout {
        Layout::new(&self.tmp(name))
    }

    /// `skopeo copy` with `args` from `src` to this registry's `cell`.
    fn skopeo_copy(&self, args: &[&str], src: &str, cell: &str) -> String {
        let dest = format!("docker://{}", self.name(cell));
        run_ok(
            Command::new("skopeo")
                .args(["copy", "--dest-tls-verify=false"])
                .args(args)
                .args([src, &dest]),
        );
        self.name(cell)
    }

    /// The manifest stored under `reference` (a tag or digest), byte for byte.
    fn manifest(&self, repo: &str, reference: &str) -> Vec<u8> {
        let out = Command::new("curl")
            .args(["-sSf", "-H"])
            .arg("Accept: application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json")
            .arg(format!(
                "http://{}/v2/{repo}/manifests/{reference}",
                self.reg.host()
            ))
            .output()
            .expect("curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }
}

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).expect("manifest JSON")
}

/// What pulling `name` must give: the top manifest's digest, its media type, and the
/// config digest (the image ID) of the entry for this platform.
struct Expected {
    top_digest: String,
    top_type: String,
    image_id: String,
    layer_types: Vec<String>,
}

fn expected(b: &Bench, name: &str) -> Expected {
    let (path, tag) = name
        .split_once('/')
        .and_then(|(_, rest)| rest.rsplit_once(':'))
        .expect("name");
    let top = b.manifest(path, tag);
    let top_json = json(&top);
    let top_type = top_json["mediaType"].as_str().unwrap_or("").to_string();
    let image = match top_json["manifests"].as_array() {
        Some(entries) => {
            let entry = entries
                .iter()
                .find(|e| {
                    e["platform"]["os"] == "linux" && e["platform"]["architecture"] == host_arch()
                })
                .expect("an entry for this platform");
            json(&b.manifest(path, entry["digest"].as_str().expect("digest")))
        }
        None => top_json,
    };
    Expected {
        top_digest: format!("sha256:{}", sha256_hex(&top)),
        top_type,
        image_id: image["config"]["digest"]
            .as_str()
            .expect("config digest")
            .trim_start_matches("sha256:")
            .to_string(),
        layer_types: image["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["mediaType"].as_str().unwrap_or("").to_string())
            .collect(),
    }
}

fn ids(d: &Daemon) -> Vec<String> {
    d.images().into_iter().map(|(_, _, id)| id).collect()
}

/// Pull by tag and by digest, build FROM it with a RUN that reads the marker, save the
/// result in both formats and have skopeo read the archives.
fn check_cell(b: &Bench, name: &str) -> Expected {
    let want = expected(b, name);
    let d = &b.d;
    d.ok(&["ctr-img", "rm", "-a"]);

    let out = d.ok(&["ctr-img", "pull", name]);
    assert!(
        out.ends_with(&format!("Pull success with image: {name}\n")),
        "{out}"
    );
    let rows = d.images();
    assert!(
        rows.iter()
            .any(|(r, t, id)| format!("{r}:{t}") == name && want.image_id.starts_with(id.as_str())),
        "{name} should be listed as {}: {rows:?}",
        want.image_id
    );
    d.ok(&["ctr-img", "rm", "-a"]);

    let (repo, _) = name.rsplit_once(':').expect("tag");
    let by_digest = format!("{repo}@{}", want.top_digest);
    let out = d.ok(&["ctr-img", "pull", &by_digest]);
    assert!(out.contains("Pull success"), "{out}");
    let listed = ids(d);
    assert!(
        listed.len() == 1 && want.image_id.starts_with(listed[0].as_str()),
        "pull by digest of {name}: {listed:?}, want {}",
        want.image_id
    );
    d.ok(&["ctr-img", "rm", "-a"]);

    // FROM pulls it (the store is empty); the RUN proves the layers were unpacked right.
    let ctx = b.tmp("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {name}\nRUN test \"$(cat /marker)\" = {} && echo ran > /ran\n",
            String::from_utf8_lossy(MARKER)
        ),
    )
    .expect("Dockerfile");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--tag",
        "built:1",
        ctx.to_str().expect("ctx"),
    ]);
    assert!(from_pulled(&out), "{out}");
    let built = build_id(&out);
    // Built again on that base: every step from the cache, the same image.
    let out = d.ok(&["ctr-img", "build", ctx.to_str().expect("ctx")]);
    assert!(out.contains("Using cache"), "{out}");
    assert_eq!(build_id(&out), built, "{out}");
    // Pushed in the default (docker) format whatever the base's layers were: a zstd or
    // uncompressed base layer goes up as gzip.
    let pushed = format!("{repo}-built:1");
    d.ok(&["ctr-img", "tag", "built:1", &pushed]);
    d.ok(&["ctr-img", "push", &pushed]);
    let (pushed_path, _) = pushed
        .split_once('/')
        .and_then(|(_, rest)| rest.rsplit_once(':'))
        .expect("name");
    let m = json(&b.manifest(pushed_path, "1"));
    let types: Vec<&str> = m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        types,
        vec!["application/vnd.docker.image.rootfs.diff.tar.gzip"; want.layer_types.len() + 1],
        "{name} built on and pushed"
    );
    for (format, file) in [("docker", "built-docker.tar"), ("oci", "built-oci.tar")] {
        let file = b.tmp(file);
        let _ = std::fs::remove_file(&file);
        d.ok(&[
            "ctr-img",
            "save",
            "-f",
            format,
            "built:1",
            "-o",
            file.to_str().expect("path"),
        ]);
        let transport = if format == "docker" {
            "docker-archive"
        } else {
            "oci-archive"
        };
        let info = run_ok(
            Command::new("skopeo")
                .arg("inspect")
                .arg(format!("{transport}:{}", file.display())),
        );
        let info = json(info.as_bytes());
        assert_eq!(
            info["Layers"].as_array().map(Vec::len),
            Some(want.layer_types.len() + 1),
            "{name} saved as {format}: {info}"
        );
    }
    d.ok(&["ctr-img", "rm", "-a"]);
    want
}

fn ours(format: &str) {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let name = b.name(&format!("ours-{format}"));
    b.d.ok(&["ctr-img", "tag", "src:1", &name]);
    b.d.ok(&["ctr-img", "push", "-f", format, &name]);
    let want = check_cell(&b, &name);
    let (manifest_type, layer_type) = if format == "oci" {
        (
            "application/vnd.oci.image.manifest.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        )
    } else {
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        )
    };
    assert_eq!(want.top_type, manifest_type);
    assert_eq!(want.layer_types, [layer_type]);
}

#[test]
fn our_push_docker_format() {
    ours("docker");
}

#[test]
fn our_push_oci_format() {
    ours("oci");
}

#[test]
fn docker_push() {
    if !ready() || !require_docker() {
        return;
    }
    let b = Bench::new();
    let out = run_ok(Command::new("docker").arg("load").arg("-i").arg(&b.archive));
    let loaded = out
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .expect("docker load names the image")
        .trim()
        .to_string();
    let _loaded = DockerImage(loaded.clone());
    let name = b.name("docker");
    let _tagged = DockerImage(name.clone());
    run_ok(Command::new("docker").args(["tag", &loaded, &name]));
    run_ok(Command::new("docker").args(["push", &name]));
    let want = check_cell(&b, &name);
    assert_eq!(
        want.top_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
}

fn buildah(format: &str) {
    if !ready() || !require_tool("buildah") {
        return;
    }
    let b = Bench::new();
    let root = b.tmp("buildah");
    let buildah = |args: &[&str]| {
        run_ok(
            Command::new("buildah")
                .arg("--root")
                .arg(root.join("root"))
                .arg("--runroot")
                .arg(root.join("run"))
                .args(["--storage-driver", "vfs"])
                .args(args),
        )
    };
    let id = buildah(&[
        "pull",
        "-q",
        &format!("docker-archive:{}", b.archive.display()),
    ]);
    let name = b.name(&format!("buildah-{format}"));
    buildah(&[
        "push",
        "--format",
        format,
        "--tls-verify=false",
        id.trim(),
        &format!("docker://{name}"),
    ]);
    let want = check_cell(&b, &name);
    let expected_type = if format == "oci" {
        "application/vnd.oci.image.manifest.v1+json"
    } else {
        "application/vnd.docker.distribution.manifest.v2+json"
    };
    assert_eq!(want.top_type, expected_type);
    // buildah's own storage is its business; leave nothing mounted behind.
    let _ = Command::new("buildah")
        .arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args(["--storage-driver", "vfs", "rmi", "-a", "-f"])
        .output();
}

#[test]
fn buildah_push_oci() {
    buildah("oci");
}

#[test]
fn buildah_push_v2s2() {
    buildah("v2s2");
}

#[test]
fn skopeo_copy_oci_gzip() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let src = format!("docker-archive:{}", b.archive.display());
    let name = b.skopeo_copy(&["--format", "oci"], &src, "skopeo-oci");
    let want = check_cell(&b, &name);
    assert_eq!(want.top_type, "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(want.layer_types, [OCI_LAYER_GZIP]);
}

#[test]
fn skopeo_copy_oci_zstd() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let src = format!("docker-archive:{}", b.archive.display());
    let name = b.skopeo_copy(
        &["--format", "oci", "--dest-compress-format", "zstd"],
        &src,
        "skopeo-zstd",
    );
    let want = check_cell(&b, &name);
    assert_eq!(
        want.layer_types,
        ["application/vnd.oci.image.layer.v1.tar+zstd"]
    );
}

#[test]
fn oci_uncompressed_tar_layers() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let mut l = b.layout("layout");
    let image = l.image(
        &busybox_rootfs(&[("marker", MARKER)]),
        OCI_LAYER,
        host_arch(),
    );
    l.tag(&image.manifest, "tar");
    let name = b.skopeo_copy(&["--preserve-digests"], &l.reference("tar"), "oci-tar");
    let want = check_cell(&b, &name);
    assert_eq!(want.layer_types, [OCI_LAYER]);
    assert_eq!(
        want.image_id,
        image.config.digest.trim_start_matches("sha256:")
    );
}

/// A layout index: another platform first (with a different marker, so that picking it
/// fails the RUN), then ours, then (with `attestations`) attestation entries for both.
/// Returns the layout and our entry's image ID.
fn multi_platform_layout(b: &Bench, attestations: bool) -> (Layout, String) {
    let mut l = b.layout("layout");
    let other = l.image(
        &busybox_rootfs(&[("marker", WRONG_MARKER)]),
        OCI_LAYER_GZIP,
        other_arch(),
    );
    let ours = l.image(
        &busybox_rootfs(&[("marker", MARKER)]),
        OCI_LAYER_GZIP,
        host_arch(),
    );
    let mut entries = vec![
        Layout::entry(
            &other,
            other_arch(),
            (other_arch() == "arm64").then_some("v8"),
        ),
        Layout::entry(&ours, host_arch(), None),
    ];
    if attestations {
        entries.extend([l.attestation(&other), l.attestation(&ours)]);
    }
    let index = l.index(entries);
    l.tag(&index, "index");
    (
        l,
        ours.config.digest.trim_start_matches("sha256:").to_string(),
    )
}

#[test]
fn skopeo_copy_all_of_an_oci_index_with_attestations() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let (l, ours) = multi_platform_layout(&b, true);
    let name = b.skopeo_copy(
        &["--all", "--preserve-digests"],
        &l.reference("index"),
        "skopeo-index",
    );
    let want = check_cell(&b, &name);
    assert_eq!(want.top_type, "application/vnd.oci.image.index.v1+json");
    assert_eq!(want.image_id, ours);
    pull_other_platform(&b, &name);
}

#[test]
fn skopeo_copy_all_of_a_docker_manifest_list() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    // Attestations cannot be converted to v2s2, so this list has none.
    let (l, _) = multi_platform_layout(&b, false);
    // skopeo turns the index into a Docker manifest list of v2s2 manifests.
    let name = b.skopeo_copy(
        &["--all", "--format", "v2s2"],
        &l.reference("index"),
        "skopeo-list",
    );
    let want = check_cell(&b, &name);
    assert_eq!(
        want.top_type,
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    pull_other_platform(&b, &name);
}

/// `pull --platform` of the other entry of a list another tool wrote (its arm64 entry
/// says variant v8, which `linux/arm64` must match): that image, with its marker.
fn pull_other_platform(b: &Bench, name: &str) {
    let d = &b.d;
    d.ok(&["ctr-img", "rm", "-a"]);
    let platform = format!("linux/{}", other_arch());
    d.ok(&["ctr-img", "pull", "--platform", &platform, name]);
    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["ctr-img", "inspect", name])).expect("inspect");
    assert_eq!(inspect[0]["Config"]["architecture"], other_arch(), "{name}");
    assert_eq!(
        d.image_text(name, "marker").as_deref(),
        Some(String::from_utf8_lossy(WRONG_MARKER).as_ref()),
        "{name}: not the {platform} entry"
    );
    d.ok(&["ctr-img", "rm", "-a"]);
}

fn refused(b: &Bench, name: &str, wants: &[&str], not: &[&str]) {
    let before = b.d.store_snapshot();
    let err = b.d.fails(&["ctr-img", "pull", name]);
    for w in wants {
        assert!(err.contains(w), "{w:?} missing from: {err}");
    }
    for n in not {
        assert!(!err.contains(n), "{n:?} should not be in: {err}");
    }
    assert_eq!(
        b.d.store_snapshot(),
        before,
        "a refused pull changed the store"
    );
}

#[test]
fn content_that_is_not_a_usable_image_is_refused_by_media_type() {
    if !ready() {
        return;
    }
    let b = Bench::new();
    let rootfs = busybox_rootfs(&[("marker", MARKER)]);
    let mut l = b.layout("layout");

    // An index with no entry for this platform: the error lists what it has, and not the
    // attestation entries.
    let other = l.image(&rootfs, OCI_LAYER_GZIP, other_arch());
    let index = l.index(vec![
        Layout::entry(&other, other_arch(), Some("v8")),
        l.attestation(&other),
    ]);
    l.tag(&index, "foreign");
    let name = b.skopeo_copy(
        &["--all", "--preserve-digests"],
        &l.reference("foreign"),
        "foreign-only",
    );
    refused(
        &b,
        &name,
        &[
            &format!("linux/{}", host_arch()),
            &format!("linux/{}/v8", other_arch()),
        ],
        &["unknown/unknown"],
    );

    // An artifact (a Helm chart, say): named by its config media type.
    let chart = l.blob(
        "application/vnd.cncf.helm.chart.content.v1.tar+gzip",
        &gzip(b"chart"),
    );
    let artifact = l.manifest_over("application/vnd.cncf.helm.config.v1+json", b"{}", &[chart]);
    l.tag(&artifact.manifest, "artifact");
    let name = b.skopeo_copy(
        &["--preserve-digests"],
        &l.reference("artifact"),
        "artifact",
    );
    refused(
        &b,
        &name,
        &[
            "application/vnd.cncf.helm.config.v1+json",
            "not a container image",
        ],
        &[],
    );

    // A layer of a media type we do not unpack: named, never guessed at.
    let odd = l.blob("application/vnd.example.layer.v1.tar+lz4", &gzip(&rootfs));
    let config = serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&rootfs))]},
    });
    let image = l.manifest_over(
        isula_integration::oci_layout::OCI_CONFIG,
        &serde_json::to_vec(&config).expect("config"),
        &[odd],
    );
    l.tag(&image.manifest, "odd-layer");
    let name = b.skopeo_copy(
        &["--preserve-digests"],
        &l.reference("odd-layer"),
        "odd-layer",
    );
    refused(
        &b,
        &name,
        &[
            "application/vnd.example.layer.v1.tar+lz4",
            "not an image layer",
        ],
        &[],
    );
    // Nothing was downloaded for any of them: only manifests were asked for.
    let log = b.reg.log();
    assert_eq!(
        b.reg.count_requests("GET", "/v2/x/odd-layer/blobs/"),
        0,
        "{log}"
    );
}
