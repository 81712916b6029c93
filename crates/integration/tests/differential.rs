//! Differential tests against a real Docker engine: every case under
//! `testdata/diff/<case>/` (a Dockerfile and its context; optional: `args` of build args,
//! `flags` of other build flags, `secrets` to pass with `--secret`, `served/` for a local HTTP server whose URL is the
//! build arg `HTTP_BASE`, `special` of files git cannot hold, made in a copy of the
//! context: `socket PATH`, `fifo PATH`, `chardev PATH` (a /dev/null node)) is built by Docker and by us from the same busybox base, and
//! the image configs (Env in order, Cmd, Entrypoint, WorkingDir, User, Labels, ExposedPorts, Volumes, StopSignal,
//! Healthcheck, OnBuild, Shell) and the flattened filesystems (paths, types, modes, owners,
//! content, link targets) must match. The reference is BuildKit (`DOCKER_BUILDKIT=1` with
//! the Docker 20.10 client, `--network host` since the test engine has no bridge).

use isula_integration::*;
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;

const BASE: &str = "isula-diff/busybox:1";
const ARM64_BASE: &str = "isula-diff/busybox-arm64:1";

/// The Docker 20.10 client of Debian's docker.io package: it runs BuildKit itself
/// (`DOCKER_BUILDKIT=1`), while the newer client first on PATH here wants buildx.
const BUILDKIT_CLIENT: &str = "/usr/bin/docker";

/// Path → description of the flattened filesystem of a docker-archive's (single) image.
fn flatten(archive: &Path) -> (serde_json::Value, BTreeMap<String, String>) {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut a = tar::Archive::new(std::fs::File::open(archive).expect("archive"));
    for e in a.entries().expect("entries") {
        let mut e = e.expect("entry");
        let name = e.path().expect("path").display().to_string();
        if e.header().entry_type().is_file()
            && (name.ends_with(".json") || name.ends_with(".tar") || name == "manifest.json")
        {
            let mut data = Vec::new();
            e.read_to_end(&mut data).expect("read");
            files.insert(name, data);
        }
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&files["manifest.json"]).expect("manifest");
    let config_name = manifest[0]["Config"].as_str().expect("config");
    let config: serde_json::Value =
        serde_json::from_slice(&files[config_name]).expect("config json");
    let mut fs: BTreeMap<String, String> = BTreeMap::new();
    for layer in manifest[0]["Layers"].as_array().expect("layers") {
        let data = &files[layer.as_str().expect("layer name")];
        let mut entries: Vec<(String, String)> = Vec::new();
        let mut removals: Vec<(String, bool)> = Vec::new();
        let mut t = tar::Archive::new(&data[..]);
        for e in t.entries().expect("layer entries") {
            let mut e = e.expect("layer entry");
            let raw = e.path().expect("path").display().to_string();
            let name = raw
                .trim_start_matches("./")
                .trim_end_matches('/')
                .to_string();
            if name.is_empty() || name == "." {
                continue;
            }
            let (dir, base) = match name.rsplit_once('/') {
                Some((d, b)) => (format!("{d}/"), b.to_string()),
                None => (String::new(), name.clone()),
            };
            if base == ".wh..wh..opq" {
                removals.push((dir, true));
                continue;
            }
            if let Some(gone) = base.strip_prefix(".wh.") {
                removals.push((format!("{dir}{gone}"), false));
                continue;
            }
            let h = e.header().clone();
            let mode = h.mode().expect("mode") & 0o7777;
            let owner = format!("{}:{}", h.uid().expect("uid"), h.gid().expect("gid"));
            let desc = match h.entry_type() {
                tar::EntryType::Directory => format!("dir {mode:o} {owner}"),
                tar::EntryType::Symlink => format!(
                    "symlink -> {}",
                    e.link_name().expect("link").expect("target").display()
                ),
                tar::EntryType::Link => {
                    let target = e
                        .link_name()
                        .expect("link")
                        .expect("target")
                        .display()
                        .to_string();
                    let target = target.trim_start_matches("./").to_string();
                    let from_layer = entries
                        .iter()
                        .rev()
                        .find(|(n, _)| *n == target)
                        .map(|(_, d)| d.clone());
                    from_layer
                        .or_else(|| fs.get(&target).cloned())
                        .unwrap_or_else(|| format!("hardlink to missing {target}"))
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut content = Vec::new();
                    e.read_to_end(&mut content).expect("content");
                    format!("file {mode:o} {owner} {}", sha256_hex(&content))
                }
                other => format!("{other:?} {mode:o} {owner}"),
            };
            entries.push((name, desc));
        }
        for (path, opaque) in removals {
            if opaque {
                fs.retain(|k, _| !k.starts_with(&path));
            } else {
                let prefix = format!("{path}/");
                fs.retain(|k, _| k != &path && !k.starts_with(&prefix));
            }
        }
        for (name, desc) in entries {
            // A directory over a directory keeps the newer metadata; anything else replaces.
            if !desc.starts_with("dir ") {
                let prefix = format!("{name}/");
                fs.retain(|k, _| !k.starts_with(&prefix));
            }
            fs.insert(name, desc);
        }
    }
    (config, fs)
}

fn normalized(config: &serde_json::Value) -> BTreeMap<&'static str, serde_json::Value> {
    let c = &config["config"];
    let mut out = BTreeMap::new();
    for key in [
        "Env",
        "Cmd",
        "Entrypoint",
        "WorkingDir",
        "User",
        "Labels",
        "ExposedPorts",
        "Volumes",
        "StopSignal",
        "Healthcheck",
        "OnBuild",
        "Shell",
    ] {
        let v = c.get(key).cloned().unwrap_or(serde_json::Value::Null);
        let empty =
            v.is_null() || v.as_str() == Some("") || v.as_object().is_some_and(|o| o.is_empty());
        out.insert(key, if empty { serde_json::Value::Null } else { v });
    }
    out
}

/// The case itself, or with a `special` list a copy of it holding those files.
fn with_special_files(case: &Path, copy: &Path) -> std::path::PathBuf {
    let Ok(list) = std::fs::read_to_string(case.join("special")) else {
        return case.to_path_buf();
    };
    run_ok(Command::new("cp").arg("-a").arg(case).arg(copy));
    for l in list.lines().filter(|l| !l.trim().is_empty()) {
        let (kind, rel) = l.trim().split_once(' ').expect("special: KIND PATH");
        let path = copy.join(rel.trim());
        match kind {
            "socket" => {
                std::os::unix::net::UnixListener::bind(&path).expect("bind a socket");
            }
            "fifo" => {
                run_ok(Command::new("mkfifo").arg(&path));
            }
            "chardev" => {
                run_ok(Command::new("mknod").arg(&path).args(["c", "1", "3"]));
            }
            other => panic!("special: unknown kind {other}"),
        }
    }
    copy.to_path_buf()
}

#[test]
fn dockerfiles_build_like_docker() {
    if !require_root() || !require_docker() {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    let base_src = work.path().join("busybox.tar");
    std::fs::write(
        &base_src,
        busybox_rootfs(&[
            (
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
            ),
            ("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        ]),
    )
    .expect("write");
    d.ok(&["ctr-img", "import", base_src.to_str().expect("utf8"), BASE]);
    let base_archive = work.path().join("base.tar");
    d.ok(&[
        "ctr-img",
        "save",
        BASE,
        "-o",
        base_archive.to_str().expect("utf8"),
    ]);
    run_ok(
        Command::new("docker")
            .args(["load", "-i"])
            .arg(&base_archive),
    );
    // An arm64 base too (Debian's arm64 busybox-static, from the test setup), for the
    // cases built with `--platform linux/arm64` (RUN under QEMU in both builders).
    let arm64 = arm64_busybox();
    if let Some(busybox) = &arm64 {
        let a = work.path().join("base-arm64.tar");
        std::fs::write(
            &a,
            docker_archive_for(&[busybox_rootfs_with(busybox, &[])], ARM64_BASE, "arm64"),
        )
        .expect("write");
        d.ok(&["ctr-img", "load", "-i", a.to_str().expect("utf8")]);
        run_ok(Command::new("docker").args(["load", "-i"]).arg(&a));
    }

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/diff");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .expect("cases")
        .flatten()
        .map(|e| e.path())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 30,
        "the differential corpus needs at least 30 cases"
    );
    let mut failures = Vec::new();
    let mut docker_images = Vec::new();
    for case in &cases {
        let name = case
            .file_name()
            .and_then(|n| n.to_str())
            .expect("name")
            .to_string();
        let tag = format!("isula-diff/case-{name}:1");
        let uses_arm64 = std::fs::read_to_string(case.join("Dockerfile"))
            .unwrap_or_default()
            .contains(ARM64_BASE);
        if uses_arm64 && arm64.is_none() {
            continue;
        }
        let mut args: Vec<String> = std::fs::read_to_string(case.join("args"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .flat_map(|l| ["--build-arg".to_string(), l.trim().to_string()])
            .collect();
        // `flags`: build flags both builders take, one per line (`--label a=b`).
        for l in std::fs::read_to_string(case.join("flags"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            args.extend(l.split_whitespace().map(str::to_string));
        }
        // `secrets`: one `ID FILE` per line (FILE in the case), given to both builds.
        for l in std::fs::read_to_string(case.join("secrets"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            let (id, file) = l.trim().split_once(' ').expect("secrets: ID FILE");
            args.push("--secret".into());
            args.push(format!("id={id},src={}", case.join(file.trim()).display()));
        }
        // `served/`: files on a local HTTP server, its URL the build arg HTTP_BASE.
        let _server = case.join("served").is_dir().then(|| {
            let s = isula_integration::http_files::HttpFiles::serve(&case.join("served"));
            args.push("--build-arg".into());
            args.push(format!("HTTP_BASE={}", s.url("")));
            s
        });
        let case = &with_special_files(case, &work.path().join(format!("{name}-context")));
        let docker = Command::new(BUILDKIT_CLIENT)
            .env("DOCKER_BUILDKIT", "1")
            .args(["build", "--network", "host", "-q", "-t", &tag])
            .args(&args)
            .arg(case)
            .output()
            .expect("docker build");
        if !docker.status.success() {
            failures.push(format!(
                "{name}: docker build failed: {}",
                String::from_utf8_lossy(&docker.stderr)
            ));
            continue;
        }
        docker_images.push(tag.clone());
        let theirs = work.path().join(format!("{name}-docker.tar"));
        run_ok(
            Command::new("docker")
                .args(["save", "-o"])
                .arg(&theirs)
                .arg(&tag),
        );
        let ours = work.path().join(format!("{name}-ours.tar"));
        let spec = format!("docker-archive:{}:{tag}", ours.display());
        let mut cmd = d.cli_command(&["ctr-img", "build", "-o", &spec]);
        cmd.args(&args).arg(case);
        let o = cmd.output().expect("our build");
        if !o.status.success() {
            failures.push(format!(
                "{name}: our build failed: {}",
                String::from_utf8_lossy(&o.stderr)
            ));
            continue;
        }
        let (their_config, their_fs) = flatten(&theirs);
        let (our_config, our_fs) = flatten(&ours);
        for key in ["architecture", "os", "variant"] {
            if their_config.get(key) != our_config.get(key) {
                failures.push(format!(
                    "{name}: config {key}: docker {} / ours {}",
                    their_config.get(key).cloned().unwrap_or_default(),
                    our_config.get(key).cloned().unwrap_or_default()
                ));
            }
        }
        let (tc, oc) = (normalized(&their_config), normalized(&our_config));
        for (k, v) in &tc {
            if oc.get(k) != Some(v) {
                failures.push(format!(
                    "{name}: config {k}: docker {v} / ours {}",
                    oc.get(k).cloned().unwrap_or_default()
                ));
            }
        }
        for (path, desc) in &their_fs {
            match our_fs.get(path) {
                Some(o) if o == desc => {}
                Some(o) => failures.push(format!("{name}: /{path}: docker `{desc}` / ours `{o}`")),
                None => failures.push(format!("{name}: /{path}: docker `{desc}` / ours missing")),
            }
        }
        for (path, desc) in &our_fs {
            if !their_fs.contains_key(path) {
                failures.push(format!("{name}: /{path}: ours `{desc}` / docker missing"));
            }
        }
    }
    for t in docker_images
        .iter()
        .chain([&BASE.to_string(), &ARM64_BASE.to_string()])
    {
        let _ = Command::new("docker").args(["rmi", "-f", t]).output();
    }
    assert!(
        failures.is_empty(),
        "{} difference(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
