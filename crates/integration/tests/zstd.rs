//! zstd layers (`--compression zstd`, `--compression-level`, the daemon's `compression`
//! key) pushed to a real Distribution registry (Debian's docker-registry): the manifest's
//! media types, the blobs' first bytes, skopeo, buildah and our own pull reading them
//! back, the zstd form kept in the store and reused, and the refusals, each beside a
//! positive control.

use isula_integration::registry::{Fault, FaultProxy, Registry, RegistryOptions};
use isula_integration::*;
use std::process::Command;

const ZSTD_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

fn ready() -> bool {
    require_root() && require_tool("docker-registry") && require_tool("skopeo")
}

fn raw_manifest(name: &str) -> serde_json::Value {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]));
    serde_json::from_str(&out).expect("manifest JSON")
}

fn layer_types(m: &serde_json::Value) -> Vec<String> {
    m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["mediaType"].as_str().unwrap_or("").to_string())
        .collect()
}

fn layer_digests(m: &serde_json::Value) -> Vec<String> {
    m["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The first bytes of a blob as the registry stored it.
fn registry_blob_head(reg: &Registry, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = reg
        .dir
        .path()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    data[..8.min(data.len())].to_vec()
}

/// `metadata.json`'s record of the `key` forms (`compressed` for gzip,
/// `compressed_zstd`): stored layer blob → its form's digest.
fn forms(d: &Daemon, key: &str) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(d.data().join("metadata.json")).expect("metadata");
    let meta: serde_json::Value = serde_json::from_str(&text).expect("metadata JSON");
    meta[key]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v["digest"].as_str()?.to_string())))
        .collect()
}

fn blob_file(d: &Daemon, digest: &str) -> std::path::PathBuf {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    d.data().join("blobs/sha256").join(hex)
}

fn id_of(d: &Daemon, name: &str) -> Option<String> {
    let (repo, tag) = name.rsplit_once(':').expect("name:tag");
    d.images()
        .into_iter()
        .find(|(r, t, _)| r == repo && t == tag)
        .map(|(_, _, id)| id)
}

#[test]
fn zstd_push_is_oci_zstd_kept_reused_and_read_by_skopeo_buildah_and_us() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    let gz_name = format!("{host}/z/gzip:1");
    let name = format!("{host}/z/app:1");
    let id = d.import_busybox(&name, &[("data/noise.bin", &noise(4, 0x25d))]);
    d.ok(&["ctr-img", "tag", &name, &gz_name]);

    // Positive control: the default is still gzip in a Docker manifest.
    d.ok(&["ctr-img", "push", &gz_name]);
    let m = raw_manifest(&gz_name);
    assert_eq!(m["mediaType"], DOCKER_MANIFEST, "{m}");
    assert_eq!(layer_types(&m), vec![DOCKER_GZIP], "{m}");
    let gz_layer = layer_digests(&m).remove(0);
    assert!(registry_blob_head(&reg, &gz_layer).starts_with(&GZIP_MAGIC));
    assert!(
        forms(&d, "compressed_zstd").is_empty(),
        "zstd made for a gzip push"
    );

    // zstd: an OCI manifest (the docker default switched, and said so), zstd layers whose
    // blobs really are zstd, made while uploading (a streamed PATCH).
    let out = d.ok(&["ctr-img", "push", "--compression", "zstd", &name]);
    assert!(
        out.contains("Pushing in OCI format: zstd layers need an OCI manifest"),
        "{out}"
    );
    assert!(
        reg.count_requests("PATCH", "/v2/z/app/blobs/uploads/") > 0,
        "the zstd did not go up as it was made"
    );
    let m = raw_manifest(&name);
    assert_eq!(m["mediaType"], OCI_MANIFEST, "{m}");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(layer_types(&m), vec![ZSTD_LAYER], "{m}");
    let zst_layer = layer_digests(&m).remove(0);
    assert!(
        registry_blob_head(&reg, &zst_layer).starts_with(&ZSTD_MAGIC),
        "{:x?}",
        registry_blob_head(&reg, &zst_layer)
    );
    // Kept in the store beside the gzip, under the same layer blob.
    let zstd_forms = forms(&d, "compressed_zstd");
    let gzip_forms = forms(&d, "compressed");
    assert_eq!(zstd_forms.values().collect::<Vec<_>>(), vec![&zst_layer]);
    assert_eq!(gzip_forms.values().collect::<Vec<_>>(), vec![&gz_layer]);
    assert_eq!(
        zstd_forms.keys().collect::<Vec<_>>(),
        gzip_forms.keys().collect::<Vec<_>>()
    );
    assert!(blob_file(&d, &zst_layer).is_file());

    // Pushed again elsewhere: the kept zstd goes up in one PUT, nothing is compressed.
    let again = format!("{host}/z/again:1");
    d.ok(&["ctr-img", "tag", &name, &again]);
    d.ok(&["ctr-img", "push", "--compression", "zstd", &again]);
    assert_eq!(
        reg.count_requests("PATCH", "/v2/z/again/blobs/uploads/"),
        0,
        "the kept zstd was made and streamed again"
    );
    assert_eq!(
        layer_digests(&raw_manifest(&again)),
        vec![zst_layer.clone()]
    );
    assert_eq!(forms(&d, "compressed_zstd"), zstd_forms);

    // skopeo copies it to an OCI layout, layer still zstd.
    let layout = d.dir.path().join("skopeo-oci");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}:x", layout.display()),
    ]));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("index JSON");
    let mdigest = index["manifests"][0]["digest"].as_str().expect("manifest");
    let copied: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            layout
                .join("blobs/sha256")
                .join(mdigest.trim_start_matches("sha256:")),
        )
        .expect("manifest blob"),
    )
    .expect("manifest JSON");
    assert_eq!(layer_types(&copied), vec![ZSTD_LAYER], "{copied}");

    // buildah pulls it into a storage of its own.
    if require_tool("buildah") {
        let root = d.dir.path().join("buildah-root");
        let runroot = d.dir.path().join("buildah-run");
        let buildah = |args: &[&str]| {
            run_ok(
                Command::new("buildah")
                    .arg("--root")
                    .arg(&root)
                    .arg("--runroot")
                    .arg(&runroot)
                    .arg("--storage-driver")
                    .arg("vfs")
                    .args(args),
            )
        };
        buildah(&["pull", "--tls-verify=false", &format!("docker://{name}")]);
        let images = buildah(&["images", "--format", "{{.ID}}"]);
        assert!(
            id.starts_with(images.trim()),
            "buildah has {images:?}, we built {id}"
        );
        let _ = Command::new("buildah")
            .arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs", "rmi", "-a", "-f"])
            .output();
    }

    // Our own pull of it: the same image, its files intact.
    d.ok(&["ctr-img", "rm", "-a"]);
    // Removed with its images: the zstd form and its record went with the gzip one.
    assert!(
        !blob_file(&d, &zst_layer).exists(),
        "the zstd form outlived its layer"
    );
    assert!(forms(&d, "compressed_zstd").is_empty());
    assert!(forms(&d, "compressed").is_empty());
    d.ok(&["ctr-img", "pull", &name]);
    assert_eq!(id_of(&d, &name).as_deref(), Some(&id[..12]));
    assert_eq!(
        d.image_files(&name)
            .get("data/noise.bin")
            .map(|e| e.content.len()),
        Some(4 << 20)
    );
    // A pulled zstd layer pushed as zstd goes as it is (nothing made), and as gzip gets a
    // gzip form.
    let third = format!("{host}/z/third:1");
    d.ok(&["ctr-img", "tag", &name, &third]);
    d.ok(&["ctr-img", "push", "--compression", "zstd", &third]);
    assert_eq!(
        layer_digests(&raw_manifest(&third)),
        vec![zst_layer.clone()]
    );
    assert!(forms(&d, "compressed_zstd").is_empty());
    let fourth = format!("{host}/z/fourth:1");
    d.ok(&["ctr-img", "tag", &name, &fourth]);
    d.ok(&["ctr-img", "push", "--format", "oci", &fourth]);
    let m = raw_manifest(&fourth);
    assert_eq!(layer_types(&m), vec![OCI_GZIP], "{m}");
    assert_eq!(
        forms(&d, "compressed").get(&zst_layer),
        Some(&layer_digests(&m)[0])
    );
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
}

#[test]
fn bad_compressions_levels_and_formats_are_refused_clearly() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let host = reg.host();
    let phost = proxy.host();
    let d = Daemon::for_registries(&[&host, &phost]);
    let name = format!("{host}/r/app:1");
    d.import_busybox(&name, &[]);
    let before = d.store_snapshot();
    let refused = |args: &[&str], want: &str| {
        let mut all = vec!["ctr-img", "push"];
        all.extend_from_slice(args);
        all.push(&name);
        let err = d.fails(&all);
        assert!(err.contains(want), "{args:?}: {err}");
    };
    refused(
        &["--compression", "foo"],
        "invalid compression \"foo\": use gzip, zstd or zstd:chunked",
    );
    refused(
        &["--compression", "zstd:chunked", "--compression-level", "23"],
        "compression level 23 is out of range for zstd:chunked: use 1 to 22",
    );
    refused(
        &["--format", "docker", "--compression", "zstd:chunked"],
        "needs the oci format",
    );
    refused(
        &["--compression", "zstd", "--compression-level", "23"],
        "compression level 23 is out of range for zstd: use 1 to 22",
    );
    refused(
        &["--compression", "zstd", "--compression-level", "0"],
        "compression level 0 is out of range for zstd",
    );
    refused(
        &["--compression", "gzip", "--compression-level", "10"],
        "compression level 10 is out of range for gzip: use 1 to 9",
    );
    refused(
        &["--format", "docker", "--compression", "zstd"],
        "--compression zstd needs the oci format",
    );
    // Nothing was sent, nothing made.
    assert_eq!(reg.count_requests("PUT", "/v2/r/"), 0, "{}", reg.log());
    assert_eq!(d.store_snapshot(), before);
    // Positive controls: the same pushes with valid values go through.
    d.ok(&[
        "ctr-img",
        "push",
        "--compression",
        "gzip",
        "--compression-level",
        "9",
        &name,
    ]);
    assert_eq!(layer_types(&raw_manifest(&name)), vec![DOCKER_GZIP]);
    d.ok(&[
        "ctr-img",
        "push",
        "--format",
        "oci",
        "--compression",
        "zstd",
        "--compression-level",
        "19",
        &name,
    ]);
    assert_eq!(layer_types(&raw_manifest(&name)), vec![ZSTD_LAYER]);

    // A registry that refuses zstd manifests: the error names the registry, the layer and
    // the media type, and says what to do.
    proxy.set(Fault::RefuseZstdManifests);
    let pname = format!("{phost}/r/refusing:1");
    d.ok(&["ctr-img", "tag", &name, &pname]);
    let err = d.fails(&["ctr-img", "push", "--compression", "zstd", &pname]);
    let zst = forms(&d, "compressed_zstd")
        .into_values()
        .next()
        .expect("zstd form");
    for want in [
        phost.as_str(),
        &format!("layer {zst}"),
        ZSTD_LAYER,
        "push with --compression gzip",
    ] {
        assert!(err.contains(want), "{want:?} missing: {err}");
    }
    // Positive control: the same registry and fault take the gzip push.
    d.ok(&["ctr-img", "push", "--compression", "gzip", &pname]);
}

#[test]
fn the_daemon_default_build_outputs_and_cache_exports_take_zstd() {
    if !ready() || !require_tool("runc") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::start_configured(
        &[
            ("registries.toml", &insecure_registries(&[&host])),
            ("configuration.toml", "compression = \"zstd\"\n"),
        ],
        &["--log-level", "debug"],
        &[],
    );
    let name = format!("{host}/d/app:1");
    d.import_busybox(&name, &[]);
    // The daemon's default: zstd, in OCI, with no flag.
    d.ok(&["ctr-img", "push", &name]);
    let m = raw_manifest(&name);
    assert_eq!(m["mediaType"], OCI_MANIFEST);
    assert_eq!(layer_types(&m), vec![ZSTD_LAYER]);
    // Positive control: the request's --compression wins over it.
    let gz = format!("{host}/d/gz:1");
    d.ok(&["ctr-img", "tag", &name, &gz]);
    d.ok(&["ctr-img", "push", "--compression", "gzip", &gz]);
    let m = raw_manifest(&gz);
    assert_eq!(m["mediaType"], DOCKER_MANIFEST);
    assert_eq!(layer_types(&m), vec![DOCKER_GZIP]);

    // build -o docker:// and --cache-to with zstd (named here, the same as the default).
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("a.txt"), "zstd build\n").expect("file");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {name}\nCOPY a.txt /a.txt\nRUN echo ran > /ran\n"),
    )
    .expect("Dockerfile");
    let built = format!("{host}/d/built:1");
    let cache = format!("{host}/d/cache:1");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--compression",
        "zstd",
        "--cache-to",
        &cache,
        "-o",
        &format!("docker://{built}"),
        ctx.to_str().expect("ctx"),
    ]);
    let first = build_id(&out);
    let m = raw_manifest(&built);
    assert_eq!(m["mediaType"], OCI_MANIFEST);
    // The base's layer (imported: uncompressed, zstd made for the push) and the build's.
    let types = layer_types(&m);
    assert!(types.len() >= 2, "{m}");
    assert!(types.iter().all(|t| t == ZSTD_LAYER), "{m}");
    for l in layer_digests(&m) {
        assert!(registry_blob_head(&reg, &l).starts_with(&ZSTD_MAGIC), "{l}");
    }
    let c = raw_manifest(&cache);
    let types = layer_types(&c);
    assert!(!types.is_empty(), "{c}");
    assert!(types.iter().all(|t| t == ZSTD_LAYER), "{c}");
    for l in layer_digests(&c) {
        assert!(registry_blob_head(&reg, &l).starts_with(&ZSTD_MAGIC), "{l}");
    }
    // A fresh daemon builds from that zstd cache (every step a hit).
    let d2 = Daemon::for_registries(&[&host]);
    let out = d2.ok(&[
        "ctr-img",
        "build",
        "--cache-from",
        &cache,
        ctx.to_str().expect("ctx"),
    ]);
    assert_eq!(build_id(&out), first, "{out}");
    assert_eq!(cached_steps(&out).len(), 2, "{out}");
    // --compression with nothing to compress for is refused; positive control above.
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--compression",
        "zstd",
        ctx.to_str().expect("ctx"),
    ]);
    assert!(
        err.contains("apply to -o docker://... and --cache-to only"),
        "{err}"
    );
}

/// The blob the registry stored for `digest`.
fn registry_blob(reg: &Registry, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
    let path = reg
        .dir
        .path()
        .join("data/docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

#[test]
fn zstd_chunked_push_carries_a_table_that_finds_each_file_and_pulls_anywhere() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    let name = format!("{host}/zc/app:1");
    let noise_data = noise(3, 0x77);
    let id = d.import_busybox(
        &name,
        &[
            ("data/noise.bin", &noise_data),
            ("data/hello.txt", b"hello\n"),
        ],
    );
    let out = d.ok(&["ctr-img", "push", "--compression", "zstd:chunked", &name]);
    assert!(out.contains("Pushing in OCI format"), "{out}");
    let m = raw_manifest(&name);
    assert_eq!(layer_types(&m), vec![ZSTD_LAYER], "{m}");
    let layer = &m["layers"][0];
    let ann = &layer["annotations"];
    let position = |key: &str| -> Vec<u64> {
        ann[key]
            .as_str()
            .unwrap_or_else(|| panic!("no {key} in {m}"))
            .split(':')
            .map(|n| n.parse().expect("number"))
            .collect()
    };
    let mpos = position("io.github.containers.zstd-chunked.manifest-position");
    let tpos = position("io.github.containers.zstd-chunked.tarsplit-position");
    assert_eq!(mpos.len(), 4);
    assert_eq!(mpos[3], 1, "manifest type");
    let blob = registry_blob(&reg, layer["digest"].as_str().expect("digest"));
    assert_eq!(blob.len() as u64, layer["size"].as_u64().expect("size"));
    // The footer: a 64-byte skippable frame naming both tables where the annotations do,
    // ending in "GNUlInUx".
    let footer = &blob[blob.len() - 72..];
    assert_eq!(&footer[..8], &[0x50, 0x2a, 0x4d, 0x18, 64, 0, 0, 0]);
    assert_eq!(&footer[64..], b"GNUlInUx");
    let word = |i: usize| u64::from_le_bytes(footer[8 + 8 * i..16 + 8 * i].try_into().expect("8"));
    assert_eq!(
        (word(0), word(1), word(2), word(3)),
        (mpos[0], mpos[1], mpos[2], mpos[3])
    );
    assert_eq!((word(4), word(5), word(6)), (tpos[0], tpos[1], tpos[2]));
    let packed = &blob[mpos[0] as usize..(mpos[0] + mpos[1]) as usize];
    assert_eq!(
        ann["io.github.containers.zstd-chunked.manifest-checksum"].as_str(),
        Some(sha256(packed).as_str())
    );
    let toc: serde_json::Value =
        serde_json::from_slice(&zstd::stream::decode_all(packed).expect("toc")).expect("toc JSON");
    // Every file's frame decodes alone to that file of the image.
    let files = d.image_files(&name);
    let mut checked = 0;
    for e in toc["entries"].as_array().expect("entries") {
        if e["type"] != "reg" || e["size"].as_u64().unwrap_or(0) == 0 {
            continue;
        }
        let (a, b) = (
            e["offset"].as_u64().expect("offset") as usize,
            e["endOffset"].as_u64().expect("endOffset") as usize,
        );
        let data = zstd::stream::decode_all(&blob[a..b]).expect("one file's frame");
        assert_eq!(e["digest"].as_str(), Some(sha256(&data).as_str()));
        let name_in = e["name"].as_str().expect("name").trim_start_matches("./");
        let want = files
            .get(name_in)
            .unwrap_or_else(|| panic!("{name_in} is not in the image"));
        assert_eq!(want.content, data, "{name_in}");
        checked += 1;
    }
    assert!(checked >= 3, "only {checked} files in the table");
    // The form is kept, with its table's annotations, and the next push only sends it.
    assert_eq!(forms(&d, "compressed_zstd_chunked").len(), 1);
    let again = format!("{host}/zc/again:1");
    d.ok(&["ctr-img", "tag", &name, &again]);
    d.ok(&["ctr-img", "push", "--compression", "zstd:chunked", &again]);
    assert_eq!(raw_manifest(&again)["layers"], m["layers"]);
    // skopeo reads it as zstd (the tables are skippable frames); buildah pulls it.
    let layout = d.dir.path().join("skopeo-oci-chunked");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("oci:{}:x", layout.display()),
    ]));
    if require_tool("buildah") {
        let root = d.dir.path().join("buildah-root-chunked");
        let runroot = d.dir.path().join("buildah-run-chunked");
        let buildah = |args: &[&str]| {
            run_ok(
                Command::new("buildah")
                    .arg("--root")
                    .arg(&root)
                    .arg("--runroot")
                    .arg(&runroot)
                    .arg("--storage-driver")
                    .arg("vfs")
                    .args(args),
            )
        };
        buildah(&["pull", "--tls-verify=false", &format!("docker://{name}")]);
        let images = buildah(&["images", "--format", "{{.ID}}"]);
        assert!(
            id.starts_with(images.trim()),
            "buildah has {images:?}, we built {id}"
        );
        let _ = Command::new("buildah")
            .arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs", "rmi", "-a", "-f"])
            .output();
    }
    // Our own pull into an empty store: the same image, its files intact.
    d.ok(&["ctr-img", "rm", "-a"]);
    assert!(forms(&d, "compressed_zstd_chunked").is_empty());
    d.ok(&["ctr-img", "pull", &name]);
    assert_eq!(id_of(&d, &name).as_deref(), Some(&id[..12]));
    assert_eq!(
        d.image_files(&name)
            .get("data/noise.bin")
            .map(|e| e.content.clone()),
        Some(noise_data)
    );
}

#[test]
fn a_zstd_chunked_layer_buildah_pushed_is_pulled_whole() {
    if !ready() || !require_tool("buildah") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    d.import_busybox("busybox:latest", &[("data/hello.txt", b"from buildah\n")]);
    let archive = d.dir.path().join("bb.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "-o",
        archive.to_str().expect("utf8"),
        "busybox:latest",
    ]);
    let root = d.dir.path().join("buildah-root-pushes");
    let runroot = d.dir.path().join("buildah-run-pushes");
    let buildah = |args: &[&str]| {
        run_ok(
            Command::new("buildah")
                .arg("--root")
                .arg(&root)
                .arg("--runroot")
                .arg(&runroot)
                .arg("--storage-driver")
                .arg("vfs")
                .args(args),
        )
    };
    buildah(&["pull", &format!("docker-archive:{}", archive.display())]);
    let name = format!("{host}/zc/from-buildah:1");
    buildah(&[
        "push",
        "--tls-verify=false",
        "--compression-format",
        "zstd:chunked",
        "busybox:latest",
        &format!("docker://{name}"),
    ]);
    // buildah wrote zstd:chunked: zstd layers with the table's annotations (buildah 1.28
    // spells them as containers/storage then did, `io.containers.zstd-chunked.*`; we
    // write today's `io.github.containers.zstd-chunked.*`).
    let m = raw_manifest(&name);
    assert_eq!(layer_types(&m), vec![ZSTD_LAYER], "{m}");
    let ann = &m["layers"][0]["annotations"];
    assert!(
        ann["io.containers.zstd-chunked.manifest-checksum"].is_string()
            || ann["io.github.containers.zstd-chunked.manifest-checksum"].is_string(),
        "{m}"
    );
    // Our pull reads it whole: the same files.
    d.ok(&["ctr-img", "pull", &name]);
    assert_eq!(
        d.image_text(&name, "data/hello.txt").as_deref(),
        Some("from buildah")
    );
    let _ = Command::new("buildah")
        .arg("--root")
        .arg(&root)
        .arg("--runroot")
        .arg(&runroot)
        .args(["--storage-driver", "vfs", "rmi", "-a", "-f"])
        .output();
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The manifests a pushed list names, each read from the registry: (platform, manifest).
fn list_members(
    host: &str,
    repo: &str,
    list: &serde_json::Value,
) -> Vec<(String, serde_json::Value)> {
    list["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            let platform = format!(
                "{}/{}",
                m["platform"]["os"].as_str().unwrap_or(""),
                m["platform"]["architecture"].as_str().unwrap_or("")
            );
            let digest = m["digest"].as_str().expect("digest");
            let manifest = raw_manifest(&format!("{host}/{repo}@{digest}"));
            assert_eq!(
                m["mediaType"], manifest["mediaType"],
                "the list names {platform}'s manifest by another media type"
            );
            (platform, manifest)
        })
        .collect()
}

/// Every member of `list` is an OCI manifest whose layers are zstd (blobs starting with
/// the zstd magic), with the zstd:chunked table's annotations when `chunked`.
fn assert_zstd_members(reg: &Registry, repo: &str, list: &serde_json::Value, chunked: bool) {
    let host = reg.host();
    let members = list_members(&host, repo, list);
    assert_eq!(members.len(), 2, "{list}");
    for (platform, m) in members {
        assert_eq!(m["mediaType"], OCI_MANIFEST, "{platform}: {m}");
        let types = layer_types(&m);
        assert!(!types.is_empty(), "{platform}: {m}");
        assert!(types.iter().all(|t| t == ZSTD_LAYER), "{platform}: {m}");
        for (layer, digest) in m["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .zip(layer_digests(&m))
        {
            assert!(
                registry_blob_head(reg, &digest).starts_with(&ZSTD_MAGIC),
                "{platform}: {digest} is no zstd"
            );
            let has_table = layer["annotations"]
                ["io.github.containers.zstd-chunked.manifest-position"]
                .is_string();
            assert_eq!(has_table, chunked, "{platform}: {layer}");
        }
    }
}

#[test]
fn manifest_lists_go_up_in_the_asked_compression_and_skopeo_buildah_read_them() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&host]))],
        &["--experimental"],
        &[],
    );
    // A build for two platforms with -o docker://: a list of two images, built from
    // scratch (nothing runs, so no emulator is needed).
    let ctx = d.dir.path().join("multi");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("a.txt"), "a\n").expect("file");
    std::fs::write(ctx.join("noise.bin"), noise(1, 0x3c)).expect("file");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nARG TARGETARCH\nCOPY a.txt /a.txt\nCOPY noise.bin /noise-$TARGETARCH.bin\n",
    )
    .expect("df");
    let build = |dest: &str, extra: &[&str]| {
        let out = format!("docker://{dest}");
        let mut args = vec![
            "ctr-img",
            "build",
            "--platform",
            "linux/amd64,linux/arm64",
            "-o",
            &out,
        ];
        args.extend_from_slice(extra);
        let c = ctx.to_str().expect("ctx");
        args.push(c);
        d.ok(&args)
    };
    // Positive control: without --compression, a Docker manifest list of gzip layers.
    let plain = format!("{host}/l/plain:1");
    build(&plain, &[]);
    let list = raw_manifest(&plain);
    assert_eq!(list["mediaType"], DOCKER_LIST, "{list}");
    for (platform, m) in list_members(&host, "l/plain", &list) {
        assert_eq!(m["mediaType"], DOCKER_MANIFEST, "{platform}");
        assert!(
            layer_types(&m).iter().all(|t| t == DOCKER_GZIP),
            "{platform}: {m}"
        );
    }
    // --compression zstd: an OCI index of OCI manifests with zstd layers.
    let built = format!("{host}/l/built:1");
    let out = build(&built, &["--compression", "zstd"]);
    assert!(out.contains("OCI"), "the switch to OCI was not said: {out}");
    let list = raw_manifest(&built);
    assert_eq!(list["mediaType"], OCI_INDEX, "{list}");
    assert_zstd_members(&reg, "l/built", &list, false);

    // skopeo copies the whole list to an OCI layout, layers still zstd.
    let layout = d.dir.path().join("skopeo-oci");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{built}"),
        &format!("oci:{}:x", layout.display()),
    ]));
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
            .expect("index JSON");
    let top = index["manifests"][0]["digest"]
        .as_str()
        .expect("list digest");
    let blob = |d: &str| -> serde_json::Value {
        let raw = std::fs::read(
            layout
                .join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )
        .expect("blob");
        serde_json::from_slice(&raw).expect("JSON")
    };
    let copied = blob(top);
    assert_eq!(
        copied["manifests"].as_array().map(Vec::len),
        Some(2),
        "{copied}"
    );
    for m in copied["manifests"].as_array().into_iter().flatten() {
        let manifest = blob(m["digest"].as_str().expect("digest"));
        assert!(
            layer_types(&manifest).iter().all(|t| t == ZSTD_LAYER),
            "{manifest}"
        );
    }

    // buildah pulls the arm64 image out of the list (pulling runs nothing).
    if require_tool("buildah") {
        let root = d.dir.path().join("buildah-root");
        let runroot = d.dir.path().join("buildah-run");
        let buildah = |args: &[&str]| {
            run_ok(
                Command::new("buildah")
                    .arg("--root")
                    .arg(&root)
                    .arg("--runroot")
                    .arg(&runroot)
                    .args(["--storage-driver", "vfs"])
                    .args(args),
            )
        };
        buildah(&[
            "pull",
            "--tls-verify=false",
            "--platform",
            "linux/arm64",
            &format!("docker://{built}"),
        ]);
        let arch = buildah(&[
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.OCIv1.Architecture}}",
            &built,
        ]);
        assert_eq!(arch.trim(), "arm64");
        let _ = Command::new("buildah")
            .arg("--root")
            .arg(&root)
            .arg("--runroot")
            .arg(&runroot)
            .args(["--storage-driver", "vfs", "rmi", "-a", "-f"])
            .output();
    }
    // Our own pull of each platform: its files intact.
    let fresh = Daemon::for_registries(&[&host]);
    for arch in ["amd64", "arm64"] {
        fresh.ok(&[
            "ctr-img",
            "pull",
            "--platform",
            &format!("linux/{arch}"),
            &built,
        ]);
        assert_eq!(
            fresh
                .image_files(&built)
                .get(&format!("noise-{arch}.bin"))
                .map(|e| e.content.len()),
            Some(1 << 20),
            "{arch}"
        );
        fresh.ok(&["ctr-img", "rm", "-a"]);
    }

    // `manifest push --compression zstd:chunked` of a list made of two imported images;
    // bad values are refused before anything goes up, beside the good ones.
    d.import_busybox("one-amd64:1", &[]);
    d.import_busybox("one-arm64:1", &[("etc/flavour", b"arm\n")]);
    d.ok(&["manifest", "create", "made:1", "one-amd64:1", "one-arm64:1"]);
    d.ok(&[
        "manifest",
        "annotate",
        "--arch",
        "arm64",
        "made:1",
        "one-arm64:1",
    ]);
    let made = format!("{host}/l/made:1");
    for (args, want) in [
        (
            vec!["--compression", "lz4"],
            "invalid compression \"lz4\": use gzip, zstd or zstd:chunked",
        ),
        (
            vec!["--compression", "zstd:chunked", "--compression-level", "23"],
            "compression level 23 is out of range for zstd:chunked: use 1 to 22",
        ),
    ] {
        let mut all = vec!["manifest", "push"];
        all.extend(args.iter().copied());
        all.extend(["made:1", made.as_str()]);
        let err = d.fails(&all);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(reg.count_requests("PUT", "/v2/l/made/"), 0, "{}", reg.log());
    let out = d.ok(&[
        "manifest",
        "push",
        "--compression",
        "zstd:chunked",
        "made:1",
        &made,
    ]);
    assert!(out.contains("OCI"), "{out}");
    let list = raw_manifest(&made);
    assert_eq!(list["mediaType"], OCI_INDEX, "{list}");
    assert_zstd_members(&reg, "l/made", &list, true);
    // The same list pushed with gzip: a Docker list again, over the kept gzip forms.
    let again = format!("{host}/l/made-gzip:1");
    d.ok(&[
        "manifest",
        "push",
        "--compression",
        "gzip",
        "made:1",
        &again,
    ]);
    let list = raw_manifest(&again);
    assert_eq!(list["mediaType"], DOCKER_LIST, "{list}");
    for (platform, m) in list_members(&host, "l/made-gzip", &list) {
        assert!(
            layer_types(&m).iter().all(|t| t == DOCKER_GZIP),
            "{platform}: {m}"
        );
    }

    // `ctr-img push --compression zstd` of a name that stands for a list: the whole list.
    let named = format!("{host}/l/named:1");
    d.ok(&["manifest", "create", &named, "one-amd64:1", "one-arm64:1"]);
    d.ok(&[
        "manifest",
        "annotate",
        "--arch",
        "arm64",
        &named,
        "one-arm64:1",
    ]);
    let err = d.fails(&[
        "ctr-img",
        "push",
        "--format",
        "docker",
        "--compression",
        "zstd",
        &named,
    ]);
    assert!(err.contains("needs the oci format"), "{err}");
    d.ok(&["ctr-img", "push", "--compression", "zstd", &named]);
    let list = raw_manifest(&named);
    assert_eq!(list["mediaType"], OCI_INDEX, "{list}");
    assert_zstd_members(&reg, "l/named", &list, false);
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
}
