//! Attestations end to end (issue 32, "Attest"): `build --sbom` lists what the image's own
//! package tool lists (dpkg-query in a debootstrap image; rpm -qa over rpm databases that
//! Debian's rpm writes, and a Berkeley DB one db_load writes from them); `--provenance`;
//! the registry round trip in BuildKit's layout (skopeo reads the index, our pull keeps
//! the attestations); oci-archive outputs carry them (skopeo and umoci open the archive);
//! and SOURCE_DATE_EPOCH makes two builds on different days (the second daemon under
//! faketime) give the same image and the same attestations.

use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const SPDX: &str = "https://spdx.dev/Document";
const SLSA: &str = "https://slsa.dev/provenance/v1";

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `(name, version)` of the SPDX document's packages (the image's own entry aside).
fn sbom_packages(doc: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = doc["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| p["primaryPackagePurpose"] != "CONTAINER")
        .map(|p| {
            (
                p["name"].as_str().expect("name").to_string(),
                p["versionInfo"].as_str().expect("version").to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

fn sbom_files(doc: &Value) -> Vec<String> {
    doc["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["fileName"].as_str().expect("fileName").to_string())
        .collect()
}

/// Lines `NAME\tVERSION` of a package tool, sorted.
fn tool_list(out: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (n, ver) = l.split_once('\t').unwrap_or((l, ""));
            (n.to_string(), ver.to_string())
        })
        .collect();
    v.sort();
    v
}

/// A context with this Dockerfile (and the files given).
fn context(dockerfile: &str, files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("context");
    std::fs::write(dir.path().join("Dockerfile"), dockerfile).expect("Dockerfile");
    for (n, t) in files {
        std::fs::write(dir.path().join(n), t).expect("file");
    }
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The cached debootstrap base (scripts/debian-base.sh makes it once, ~45 s).
fn debian_base() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out =
        run_ok(Command::new(repo.join("scripts/debian-base.sh")).env_remove("ISULABUILD_HOST"));
    PathBuf::from(out.trim())
}

#[test]
fn sbom_of_a_debootstrap_image_is_what_dpkg_query_lists() {
    if !require_root() || !require_tool("debootstrap") || !require_tool("dpkg-query") {
        return;
    }
    let base = debian_base();
    let d = Daemon::start();
    d.ok(&["ctr-img", "import", path(&base), "debian-attest:base"]);
    let ctx = context(
        "FROM debian-attest:base\nCOPY stray.conf /etc/stray.conf\nLABEL attest=yes\n",
        &[("stray.conf", "owned by no package\n")],
    );
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--sbom",
        "-t",
        "deb-sbom:1",
        path(ctx.path()),
    ]);
    assert!(out.contains("Generating SBOM"), "{out}");
    let doc = json(&d.ok(&["ctr-img", "inspect", "--sbom", "deb-sbom:1"]));
    assert_eq!(doc["spdxVersion"], "SPDX-2.3");

    // The oracle: Debian's own dpkg-query over the image's own database.
    let admin = tempfile::tempdir().expect("admindir");
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&base)
            .arg("-C")
            .arg(admin.path())
            .arg("./var/lib/dpkg"),
    );
    let admindir = format!("--admindir={}", admin.path().join("var/lib/dpkg").display());
    let listed = run_ok(Command::new("dpkg-query").args([
        admindir.as_str(),
        "-W",
        "-f",
        "${Package}\t${Version}\n",
    ]));
    let want = tool_list(&listed);
    assert!(
        want.len() > 50,
        "a debootstrap minbase has packages: {want:?}"
    );
    assert_eq!(sbom_packages(&doc), want);
    // Every package has its purl with the architecture.
    let libc = doc["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["name"] == "libc6")
        .expect("libc6");
    let purl = libc["externalRefs"][0]["referenceLocator"]
        .as_str()
        .expect("purl");
    assert!(
        purl.starts_with("pkg:deb/debian/libc6@") && purl.contains("arch="),
        "{purl}"
    );
    // The file the Dockerfile added is listed as no package's; a packaged one is not.
    let files = sbom_files(&doc);
    assert!(files.contains(&"/etc/stray.conf".to_string()), "{files:?}");
    let stray = doc["files"]
        .as_array()
        .expect("files")
        .iter()
        .find(|f| f["fileName"] == "/etc/stray.conf")
        .expect("stray");
    assert_eq!(stray["comment"], "owned by no package");
    assert_eq!(
        stray["checksums"][1]["checksumValue"],
        sha256_hex(b"owned by no package\n")
    );
    assert!(
        !files.contains(&"/usr/bin/dpkg".to_string()),
        "dpkg owns /usr/bin/dpkg"
    );
    // Only what was asked for: no provenance on this image, said by name.
    let err = d.fails(&["ctr-img", "inspect", "--provenance", "deb-sbom:1"]);
    assert!(
        err.contains("provenance") && err.contains("deb-sbom:1"),
        "{err}"
    );
}

/// Builds two tiny rpms with rpmbuild (one with an epoch) and installs them into a new
/// database under `root` (`var/lib/rpm`) with Debian's rpm. Returns `rpm -qa`'s list.
fn rpm_database(root: &Path) -> Vec<(String, String)> {
    let top = root.parent().expect("parent").join("rpmbuild");
    let dbpath = root.join("var/lib/rpm");
    std::fs::create_dir_all(&dbpath).expect("dbpath");
    let mut rpms = Vec::new();
    for (name, epoch, version, release, license) in [
        ("attest-hello", None, "1.0", "3", "MIT"),
        ("attest-world", Some(2), "0.9.1", "1.oe2203", "GPL-2.0-only"),
    ] {
        let spec = top.join(format!("{name}.spec"));
        std::fs::create_dir_all(&top).expect("top");
        std::fs::write(
            &spec,
            format!(
                "Name: {name}\n{}Version: {version}\nRelease: {release}\nSummary: t\nLicense: {license}\nBuildArch: noarch\n%description\nt\n%install\nmkdir -p %{{buildroot}}/usr/share/{name}\necho {name} > %{{buildroot}}/usr/share/{name}/data\n%files\n/usr/share/{name}/data\n",
                epoch.map(|e| format!("Epoch: {e}\n")).unwrap_or_default()
            ),
        )
        .expect("spec");
        run_ok(Command::new("rpmbuild").args([
            "-bb",
            "--nodeps",
            "--define",
            &format!("_topdir {}", top.display()),
            path(&spec),
        ]));
        rpms.push(top.join(format!("RPMS/noarch/{name}-{version}-{release}.noarch.rpm")));
    }
    run_ok(Command::new("rpm").args(["--initdb", "--dbpath", path(&dbpath)]));
    let mut install = Command::new("rpm");
    install.args(["-i", "--justdb", "--nodeps", "--dbpath", path(&dbpath)]);
    install.args(&rpms);
    run_ok(&mut install);
    tool_list(&run_ok(Command::new("rpm").args([
        "-qa",
        "--dbpath",
        path(&dbpath),
        "--qf",
        "%{NAME}\t%{EVR}\n",
    ])))
}

/// Writes the Berkeley DB hash `Packages` of the headers in `sqlite` with db_load (pages
/// of `page_size` bytes: 512 puts each header on overflow pages).
fn bdb_from_sqlite(sqlite: &Path, out: &Path, page_size: u32) {
    let dump = out.with_extension("dump");
    let script = format!(
        "import sqlite3, struct\nc = sqlite3.connect({sqlite:?})\nlines = ['VERSION=3', 'format=bytevalue', 'type=hash', 'db_pagesize={page_size}', 'HEADER=END']\nfor hnum, blob in c.execute('SELECT hnum, blob FROM Packages'):\n    lines.append(' ' + struct.pack('<I', hnum).hex())\n    lines.append(' ' + bytes(blob).hex())\nlines.append('DATA=END')\nopen({dump:?}, 'w').write('\\n'.join(lines) + '\\n')\n",
        sqlite = sqlite.display().to_string(),
        dump = dump.display().to_string()
    );
    run_ok(Command::new("python3").args(["-c", &script]));
    run_ok(Command::new("db5.3_load").args(["-f", path(&dump), path(out)]));
}

#[test]
fn sbom_of_rpm_databases_is_what_rpm_qa_lists() {
    if !require_root()
        || !require_tool("rpmbuild")
        || !require_tool("rpm")
        || !require_tool("db5.3_load")
        || !require_tool("python3")
    {
        return;
    }
    let work = tempfile::tempdir().expect("work");
    let root = work.path().join("root");
    let want = rpm_database(&root);
    assert_eq!(
        want,
        [
            ("attest-hello".to_string(), "1.0-3".to_string()),
            ("attest-world".to_string(), "2:0.9.1-1.oe2203".to_string())
        ],
        "rpm -qa"
    );
    let sqlite = root.join("var/lib/rpm/rpmdb.sqlite");
    let db = std::fs::read(&sqlite).expect("rpmdb.sqlite");
    let wal = std::fs::read(root.join("var/lib/rpm/rpmdb.sqlite-wal")).unwrap_or_default();
    // 512-byte pages put every header on overflow pages; 16 KiB pages keep them inline.
    let bdb_path = work.path().join("Packages");
    bdb_from_sqlite(&sqlite, &bdb_path, 512);
    let bdb = std::fs::read(&bdb_path).expect("Packages");
    let big_path = work.path().join("Packages-16k");
    bdb_from_sqlite(&sqlite, &big_path, 16384);
    let bdb_inline = std::fs::read(&big_path).expect("Packages");
    let d = Daemon::start();
    let os_release: &[u8] = b"ID=openEuler\nVERSION_ID=\"22.03\"\n";
    let cases: Vec<(&str, Vec<ImageFile<'_>>)> = vec![
        (
            "sqlite",
            vec![
                ("var/lib/rpm/rpmdb.sqlite", db.as_slice()),
                ("var/lib/rpm/rpmdb.sqlite-wal", wal.as_slice()),
                ("etc/os-release", os_release),
            ],
        ),
        (
            "bdb",
            vec![
                ("var/lib/rpm/Packages", bdb.as_slice()),
                ("etc/os-release", os_release),
            ],
        ),
        (
            "bdb-inline",
            vec![
                ("var/lib/rpm/Packages", bdb_inline.as_slice()),
                ("etc/os-release", os_release),
            ],
        ),
    ];
    for (kind, files) in cases {
        let base = format!("rpm-{kind}:base");
        d.import_busybox(&base, &files);
        let ctx = context(&format!("FROM {base}\nLABEL kind={kind}\n"), &[]);
        let tag = format!("rpm-{kind}:1");
        d.ok(&["ctr-img", "build", "--sbom", "-t", &tag, path(ctx.path())]);
        let doc = json(&d.ok(&["ctr-img", "inspect", "--sbom", &tag]));
        assert_eq!(sbom_packages(&doc), want, "{kind}");
        let world = doc["packages"]
            .as_array()
            .expect("packages")
            .iter()
            .find(|p| p["name"] == "attest-world")
            .expect("attest-world");
        assert_eq!(
            world["externalRefs"][0]["referenceLocator"],
            "pkg:rpm/openeuler/attest-world@0.9.1-1.oe2203?arch=noarch&epoch=2",
            "{kind}"
        );
        assert_eq!(world["licenseDeclared"], "GPL-2.0-only", "{kind}");
        // The busybox files belong to no rpm: listed as such.
        let files = sbom_files(&doc);
        assert!(
            files.iter().any(|f| f.ends_with("/busybox")),
            "{kind}: {files:?}"
        );
    }
    // A database that is not one: the build fails naming it, and no image is made.
    d.import_busybox(
        "rpm-bad:base",
        &[(
            "var/lib/rpm/Packages",
            b"this is not a Berkeley DB file at all, no no".as_slice(),
        )],
    );
    let ctx = context("FROM rpm-bad:base\nLABEL kind=bad\n", &[]);
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--sbom",
        "-t",
        "rpm-bad:1",
        path(ctx.path()),
    ]);
    assert!(err.contains("/var/lib/rpm/Packages"), "{err}");
    // Positive control: the same build without --sbom succeeds.
    d.ok(&["ctr-img", "build", "-t", "rpm-bad:1", path(ctx.path())]);
}

/// A file put into an imported image: its path and content.
type ImageFile<'a> = (&'a str, &'a [u8]);

fn skopeo_raw(reference: &str) -> Value {
    json(&run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        reference,
    ])))
}

#[test]
fn attestations_go_to_a_registry_and_come_back() {
    if !require_root() || !require_tool("docker-registry") || !require_tool("skopeo") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    d.import_busybox(
        "att-base:1",
        &[(
            "var/lib/dpkg/status",
            b"Package: busybox\nStatus: install ok installed\nVersion: 1:1.35.0-4\nArchitecture: amd64\n".as_slice(),
        )],
    );
    let ctx = context("FROM att-base:1\nARG VERSION\nLABEL v=$VERSION\n", &[]);
    let name = format!("{host}/attest/app:1");
    d.ok(&[
        "ctr-img",
        "build",
        "--sbom",
        "--provenance",
        "mode=max",
        "--build-arg",
        "VERSION=7",
        "--build-arg",
        "http_proxy=http://user:secret@proxy.test:3128",
        "-t",
        &name,
        path(ctx.path()),
    ]);
    let sbom = json(&d.ok(&["ctr-img", "inspect", "--sbom", &name]));
    let prov = json(&d.ok(&["ctr-img", "inspect", "--provenance", &name]));
    assert_eq!(
        sbom_packages(&sbom),
        [("busybox".to_string(), "1:1.35.0-4".to_string())]
    );
    let ext = &prov["buildDefinition"]["externalParameters"];
    assert_eq!(ext["request"]["args"]["build-arg:VERSION"], "7");
    assert!(
        !prov.to_string().contains("secret@proxy"),
        "no proxy value in the provenance: {prov}"
    );
    let deps = prov["buildDefinition"]["resolvedDependencies"].to_string();
    assert!(deps.contains("pkg:docker/att-base@1"), "{deps}");
    assert!(
        prov["runDetails"]["metadata"]["invocationId"].is_string(),
        "max: {prov}"
    );
    // `images` shows the image once; no attestation entry.
    let rows: Vec<_> = d
        .images()
        .into_iter()
        .filter(|(repo, _, _)| repo.contains("attest/app"))
        .collect();
    assert_eq!(rows.len(), 1, "{rows:?}");

    d.ok(&["ctr-img", "push", &name]);
    // The registry holds BuildKit's layout: an index of the image and its attestations.
    let index = skopeo_raw(&format!("docker://{name}"));
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let entries = index["manifests"].as_array().expect("manifests");
    assert_eq!(entries.len(), 2, "{index}");
    let image_digest = entries[0]["digest"].as_str().expect("digest");
    assert_eq!(entries[0]["platform"]["os"], "linux");
    let att = &entries[1];
    assert_eq!(att["platform"]["os"], "unknown");
    assert_eq!(att["platform"]["architecture"], "unknown");
    assert_eq!(
        att["annotations"]["vnd.docker.reference.type"],
        "attestation-manifest"
    );
    assert_eq!(
        att["annotations"]["vnd.docker.reference.digest"],
        image_digest
    );
    let att_manifest = skopeo_raw(&format!(
        "docker://{host}/attest/app@{}",
        att["digest"].as_str().expect("digest")
    ));
    let layers = att_manifest["layers"].as_array().expect("layers");
    let types: Vec<&str> = layers
        .iter()
        .map(|l| {
            assert_eq!(l["mediaType"], "application/vnd.in-toto+json");
            l["annotations"]["in-toto.io/predicate-type"]
                .as_str()
                .expect("predicate type")
        })
        .collect();
    assert_eq!(types, [SPDX, SLSA]);
    // skopeo takes the image out of the index (it skips the attestation entry).
    let copied = tempfile::tempdir().expect("copy");
    run_ok(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{name}"),
        &format!("dir:{}", copied.path().join("img").display()),
    ]));

    // Our pull keeps them: the same documents come back.
    d.ok(&["ctr-img", "rm", &name]);
    d.ok(&["ctr-img", "pull", &name]);
    assert_eq!(json(&d.ok(&["ctr-img", "inspect", "--sbom", &name])), sbom);
    assert_eq!(
        json(&d.ok(&["ctr-img", "inspect", "--provenance", &name])),
        prov
    );
    // FROM the pulled image takes the image, never the attestation manifest.
    let from = context(&format!("FROM {name}\nLABEL again=1\n"), &[]);
    d.ok(&["ctr-img", "build", "-t", "att-from:1", path(from.path())]);
    // A prune keeps them while the image lives; rm takes them with it.
    d.cli(&["ctr-img", "rm", "-p"]);
    assert_eq!(json(&d.ok(&["ctr-img", "inspect", "--sbom", &name])), sbom);
    d.ok(&["ctr-img", "rm", &name]);
    let err = d.fails(&["ctr-img", "inspect", "--sbom", &name]);
    assert!(!err.is_empty());
}

#[test]
fn docker_pulls_an_image_whose_index_has_attestations() {
    if !require_root() || !require_tool("docker-registry") || !require_docker() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    d.load_fixed_busybox("busybox:latest");
    let ctx = context("FROM busybox\nLABEL docker=1\n", &[]);
    let name = format!("{host}/attest/docker:{}", std::process::id());
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--sbom",
        "--provenance",
        "-o",
        &format!("docker://{name}"),
        path(ctx.path()),
    ]);
    let id = build_id(&out);
    let _image = DockerImage(name.clone());
    // Docker 20.10 takes the linux image out of the index and leaves the attestation
    // manifest (platform unknown/unknown) alone.
    run_ok(Command::new("docker").args(["pull", &name]));
    let got = run_ok(Command::new("docker").args(["image", "inspect", "-f", "{{.Id}}", &name]));
    assert_eq!(got.trim(), format!("sha256:{id}"));
}

#[test]
fn oci_archive_outputs_carry_attestations() {
    if !require_root() || !require_tool("skopeo") || !require_tool("umoci") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let ctx = context("FROM busybox\nLABEL oci=1\n", &[]);
    let out = tempfile::tempdir().expect("out");
    let archive = out.path().join("app.tar");
    d.ok(&[
        "ctr-img",
        "build",
        "--sbom",
        "--provenance",
        "-o",
        &format!("oci-archive:{}:app:1", archive.display()),
        path(ctx.path()),
    ]);
    let layout = out.path().join("layout");
    std::fs::create_dir_all(&layout).expect("layout");
    run_ok(
        Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&layout),
    );
    let index = json(&std::fs::read_to_string(layout.join("index.json")).expect("index.json"));
    let entries = index["manifests"].as_array().expect("manifests");
    assert_eq!(entries.len(), 2, "{index}");
    assert_eq!(
        entries[0]["annotations"]["org.opencontainers.image.ref.name"],
        "1"
    );
    assert_eq!(
        entries[1]["annotations"]["vnd.docker.reference.digest"],
        entries[0]["digest"]
    );
    assert!(entries[1]["annotations"]
        .get("org.opencontainers.image.ref.name")
        .is_none());
    let att_hex = entries[1]["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .expect("digest");
    let att = json(
        &std::fs::read_to_string(layout.join("blobs/sha256").join(att_hex)).expect("manifest"),
    );
    let stmt_hex = att["layers"][0]["digest"]
        .as_str()
        .and_then(|d| d.strip_prefix("sha256:"))
        .expect("layer");
    let stmt = json(
        &std::fs::read_to_string(layout.join("blobs/sha256").join(stmt_hex)).expect("statement"),
    );
    assert_eq!(stmt["predicateType"], SPDX);
    assert_eq!(
        stmt["subject"][0]["digest"]["sha256"].as_str(),
        entries[0]["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
    );
    // skopeo and umoci open the archive by its tag.
    run_ok(
        Command::new("skopeo").args(["inspect", &format!("oci-archive:{}:1", archive.display())]),
    );
    let bundle = out.path().join("bundle");
    run_ok(Command::new("umoci").args([
        "unpack",
        "--image",
        &format!("{}:1", layout.display()),
        path(&bundle),
    ]));
    assert!(bundle.join("rootfs/bin/busybox").exists());
    // Our own load takes the image (the attestation manifest is no image) and keeps its
    // attestations.
    let d2 = Daemon::start();
    let loaded = d2.ok(&["ctr-img", "load", "-i", path(&archive)]);
    assert!(loaded.contains("Loaded 2 attestations"), "{loaded}");
    assert_eq!(d2.images().len(), 1, "{:?}", d2.images());
    for flag in ["--sbom", "--provenance"] {
        assert_eq!(
            json(&d2.ok(&["ctr-img", "inspect", flag, "app:1"])),
            json(&d.ok(&["ctr-img", "inspect", flag, "app:1"])),
            "{flag}"
        );
    }
}

const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

#[test]
fn source_date_epoch_gives_the_same_image_and_attestations_on_another_day() {
    if !require_root() || !require_tool("runc") || !require_tool("faketime") {
        return;
    }
    assert!(Path::new(FAKETIME_LIB).exists(), "{FAKETIME_LIB}");
    let ctx = context(
        "FROM busybox\nCOPY f /f\nRUN echo made > /made && touch /new\n",
        &[("f", "f\n")],
    );
    // One build: a fresh daemon (faked `days` ahead when given), the client's
    // SOURCE_DATE_EPOCH when given, mode=min; the image ID, SBOM and provenance.
    let build = |days: Option<u32>, epoch: Option<&str>| {
        let env: Vec<(&str, String)> = match days {
            Some(n) => vec![
                ("LD_PRELOAD", FAKETIME_LIB.to_string()),
                ("FAKETIME", format!("+{n}d")),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_string()),
            ],
            None => Vec::new(),
        };
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let d = Daemon::start_with_env(&[], &env);
        d.load_fixed_busybox("busybox:latest");
        let mut cmd = d.cli_command(&[
            "ctr-img",
            "build",
            "--no-cache",
            "--sbom",
            "--provenance",
            "-t",
            "repro:1",
            path(ctx.path()),
        ]);
        match epoch {
            Some(e) => cmd.env("SOURCE_DATE_EPOCH", e),
            None => cmd.env_remove("SOURCE_DATE_EPOCH"),
        };
        let out = run_ok(&mut cmd);
        let id = build_id(&out);
        let sbom = d.ok(&["ctr-img", "inspect", "--sbom", "repro:1"]);
        let prov = d.ok(&["ctr-img", "inspect", "--provenance", "repro:1"]);
        let image = json(&d.ok(&["ctr-img", "inspect", "repro:1"]));
        let base = json(&d.ok(&["ctr-img", "inspect", "busybox:latest"]));
        (id, sbom, prov, image, base)
    };
    let today = build(None, Some("1600000000"));
    let later = build(Some(2), Some("1600000000"));
    assert_eq!(today.0, later.0, "the same image ID two days apart");
    assert_eq!(today.1, later.1, "the same SBOM");
    assert_eq!(today.2, later.2, "the same provenance (mode=min)");
    let config = &today.3[0]["Config"];
    assert_eq!(config["created"], "2020-09-13T12:26:40Z");
    // The base's layers are kept as they are, below the one this build made.
    let base_ids = today.4[0]["Config"]["rootfs"]["diff_ids"]
        .as_array()
        .expect("base diff_ids")
        .clone();
    let ids = config["rootfs"]["diff_ids"].as_array().expect("diff_ids");
    assert_eq!(&ids[..base_ids.len()], &base_ids[..]);
    assert_eq!(ids.len(), base_ids.len() + 1);
    // Positive control: without SOURCE_DATE_EPOCH, two days apart differ.
    let plain_today = build(None, None);
    let plain_later = build(Some(2), None);
    assert_ne!(
        plain_today.0, plain_later.0,
        "faketime moved the daemon's clock"
    );
}

#[test]
fn provenance_names_what_the_build_fetched_and_no_secret() {
    if !require_root() || !require_tool("git") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let files = tempfile::tempdir().expect("files");
    std::fs::write(files.path().join("tool.bin"), b"tool-bytes\n").expect("write");
    let server = isula_integration::http_files::HttpFiles::serve(files.path());
    // A git repository served over dumb HTTP, its commit known.
    let repos = tempfile::tempdir().expect("repos");
    let work = repos.path().join("work");
    std::fs::create_dir_all(&work).expect("work");
    let git = |dir: &Path, args: &[&str]| {
        run_ok(
            Command::new("git")
                .arg("-C")
                .arg(dir)
                .args(args)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@e")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@e"),
        )
    };
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("a.txt"), "one\n").expect("write");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let commit = git(&work, &["rev-parse", "HEAD"]).trim().to_string();
    run_ok(
        Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(repos.path().join("repo.git")),
    );
    git(&repos.path().join("repo.git"), &["update-server-info"]);
    let git_server = isula_integration::http_files::HttpFiles::serve(repos.path());
    let tool_url = server.url("tool.bin");
    let repo_url = git_server.url("repo.git");
    let ctx = context(
        &format!("FROM busybox\nADD {tool_url} /opt/tool.bin\nADD {repo_url}#main /src/\n"),
        &[("secret.txt", "s3cr3t-value\n")],
    );
    d.ok(&[
        "ctr-img",
        "build",
        "--provenance",
        "--build-arg",
        "API_TOKEN=tok-value-123",
        "--build-arg",
        "https_proxy=http://u:proxypw@proxy.test:3128",
        "--secret",
        &format!("id=npmrc,src={}", ctx.path().join("secret.txt").display()),
        "-t",
        "prov:1",
        path(ctx.path()),
    ]);
    let text = d.ok(&["ctr-img", "inspect", "--provenance", "prov:1"]);
    for withheld in [
        "tok-value-123",
        "proxypw",
        "s3cr3t-value",
        "API_TOKEN",
        "https_proxy",
    ] {
        assert!(!text.contains(withheld), "{withheld} in {text}");
    }
    let prov = json(&text);
    let bd = &prov["buildDefinition"];
    let deps = bd["resolvedDependencies"].as_array().expect("deps");
    let dep = |uri: &str| {
        deps.iter()
            .find(|d| d["uri"] == uri)
            .unwrap_or_else(|| panic!("no {uri} in {deps:?}"))
    };
    assert_eq!(
        dep(&tool_url)["digest"]["sha256"],
        sha256_hex(b"tool-bytes\n")
    );
    assert_eq!(dep(&repo_url)["digest"]["sha1"], commit.as_str());
    // The base image by its manifest digest.
    let purl = format!("pkg:docker/busybox@latest?platform=linux%2F{}", host_arch());
    assert!(dep(&purl)["digest"]["sha256"].is_string(), "{deps:?}");
    // The Dockerfile by its digest; the secret by its id only.
    let df = std::fs::read(ctx.path().join("Dockerfile")).expect("df");
    assert_eq!(
        bd["externalParameters"]["configSource"]["digest"]["sha256"],
        sha256_hex(&df)
    );
    assert_eq!(
        bd["externalParameters"]["request"]["secrets"][0]["id"],
        "npmrc"
    );
    // mode=min: nothing that varies between runs.
    let meta = &prov["runDetails"]["metadata"];
    for varies in ["invocationId", "startedOn", "finishedOn"] {
        assert!(meta.get(varies).is_none(), "{varies} in min: {meta}");
    }
    assert_eq!(prov["runDetails"]["builder"]["id"], "isula-builder");
    // A mode that is not one: refused before the build, naming it.
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--provenance",
        "mode=full",
        "-t",
        "prov:2",
        path(ctx.path()),
    ]);
    assert!(err.contains("mode=full"), "{err}");
}

#[test]
fn a_two_platform_push_lists_each_images_attestations_after_the_images() {
    let Some(arm64) = arm64_busybox() else {
        return;
    };
    if !require_root() || !require_tool("docker-registry") || !require_tool("skopeo") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&host]))],
        &["--experimental"],
        &[],
    );
    let dir = tempfile::tempdir().expect("tmp");
    for (arch, rootfs) in [
        (host_arch(), busybox_rootfs(&[])),
        ("arm64", busybox_rootfs_with(&arm64, &[])),
    ] {
        let a = dir.path().join(format!("{arch}.tar"));
        let name = format!("busybox-{arch}:1");
        std::fs::write(&a, docker_archive_for(&[rootfs], &name, arch)).expect("archive");
        d.ok(&["ctr-img", "load", "-i", path(&a)]);
    }
    let ctx = context("FROM busybox-$TARGETARCH:1\nLABEL multi=1\n", &[]);
    let name = format!("{host}/attest/multi:1");
    d.ok(&[
        "ctr-img",
        "build",
        "--sbom",
        "--platform",
        &format!("linux/{},linux/arm64", host_arch()),
        "-o",
        &format!("docker://{name}"),
        path(ctx.path()),
    ]);
    let index = skopeo_raw(&format!("docker://{name}"));
    assert_eq!(
        index["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    let entries = index["manifests"].as_array().expect("manifests");
    assert_eq!(entries.len(), 4, "{index}");
    let images: Vec<&Value> = entries[..2].iter().collect();
    for (i, att) in entries[2..].iter().enumerate() {
        assert_eq!(att["platform"]["os"], "unknown", "{index}");
        assert_eq!(
            att["annotations"]["vnd.docker.reference.digest"], images[i]["digest"],
            "{index}"
        );
    }
    // Each image's statement names that image's platform.
    let att = skopeo_raw(&format!(
        "docker://{host}/attest/multi@{}",
        entries[3]["digest"].as_str().expect("digest")
    ));
    assert_eq!(
        att["layers"][0]["annotations"]["in-toto.io/predicate-type"],
        SPDX
    );
}
