//! Separated images (`ctr-img save -b/-l/-r/-d`, `ctr-img load -d/-b/-l/--no-check`), the
//! cases of the spec (separated-images.md §10) against the real daemon: a lib image on
//! busybox and two apps on the lib, saved apart, removed, and loaded back whole.

use isula_integration::*;
use sha2::Digest as _;
use std::path::Path;

struct Fixture {
    d: Daemon,
    work: tempfile::TempDir,
    app1: String,
    app2: String,
}

fn build(d: &Daemon, work: &Path, name: &str, dockerfile: &str) -> String {
    let ctx = work.join(format!("ctx-{}", name.replace([':', '/'], "_")));
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), dockerfile).expect("df");
    build_id(&d.ok(&["ctr-img", "build", "-t", name, ctx.to_str().expect("ctx")]))
}

fn fixture() -> Option<Fixture> {
    if !require_root() || !require_tool("runc") {
        return None;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().expect("tmp");
    d.load_fixed_busybox("busybox:latest");
    build(
        &d,
        work.path(),
        "lib:latest",
        "FROM busybox\nRUN mkdir -p /lib1 && echo lib > /lib1/l\n",
    );
    let app1 = build(
        &d,
        work.path(),
        "app1:latest",
        "FROM lib:latest\nRUN echo one > /app\n",
    );
    let app2 = build(
        &d,
        work.path(),
        "app2:latest",
        "FROM lib:latest\nRUN echo two > /app\n",
    );
    Some(Fixture {
        d,
        work,
        app1,
        app2,
    })
}

fn sha256_file(p: &Path) -> String {
    hex::encode(sha2::Sha256::digest(std::fs::read(p).expect("read")))
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest")).expect("manifest")).expect("json")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn save_splits_apps_into_shared_base_and_lib_and_load_puts_them_back() {
    let Some(f) = fixture() else { return };
    let (d, w) = (&f.d, f.work.path());
    let dest = w.join("D");
    let dest_s = dest.to_str().expect("p");
    let out = d.ok(&[
        "ctr-img",
        "save",
        "-b",
        "busybox",
        "-l",
        "lib:latest",
        "-d",
        dest_s,
        "app1:latest",
        "app2:latest",
    ]);
    assert!(
        out.ends_with("Save success with image: [app1:latest app2:latest]\n"),
        "{out}"
    );
    assert_eq!(
        names(&dest),
        [
            "app1_latest_app_image.tar.gz",
            "app1_latest_base_image.tar.gz",
            "app1_latest_lib_image.tar.gz",
            "app2_latest_app_image.tar.gz",
            "manifest"
        ]
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dest.join("manifest")), 0o600);
    assert_eq!(mode(&dest.join("app1_latest_app_image.tar.gz")), 0o644);
    let m = manifest(&dest);
    for app in ["app1:latest", "app2:latest"] {
        let e = &m[app];
        assert_eq!(e["base"], "app1_latest_base_image.tar.gz", "{m}");
        assert_eq!(e["lib"], "app1_latest_lib_image.tar.gz", "{m}");
        assert_eq!(e["baseImageName"], "busybox");
        assert_eq!(e["libImageName"], "lib:latest");
        for (file, hash) in [("app", "appHash"), ("lib", "libHash"), ("base", "baseHash")] {
            let name = e[file].as_str().expect("name");
            assert_eq!(e[hash], sha256_file(&dest.join(name)), "{file} of {app}");
        }
        assert_eq!(e["appLayers"].as_array().expect("app layers").len(), 1);
        assert_eq!(e["libLayers"].as_array().expect("lib layers").len(), 1);
        assert_eq!(e["baseLayer"].as_str().expect("base").len(), 64);
    }
    // The keys come in isula-build's field order.
    let text = std::fs::read_to_string(dest.join("manifest")).expect("manifest");
    let order = [
        "\"app\"",
        "\"appHash\"",
        "\"appLayers\"",
        "\"lib\"",
        "\"libHash\"",
        "\"libImageName\"",
        "\"libLayers\"",
        "\"base\"",
        "\"baseHash\"",
        "\"baseImageName\"",
        "\"baseLayer\"",
    ];
    let pos: Vec<usize> = order.iter().map(|k| text.find(k).expect(k)).collect();
    assert!(pos.windows(2).all(|p| p[0] < p[1]), "{text}");
    // The app tarball holds the docker-archive's metadata; base and lib only layers.
    let members = |file: &str| -> Vec<String> {
        let f = std::fs::File::open(dest.join(file)).expect("open");
        let mut a = tar::Archive::new(flate2::read::GzDecoder::new(f));
        a.entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                assert_eq!(e.header().mtime().expect("mtime"), 1_483_142_400);
                e.path().expect("path").display().to_string()
            })
            .collect()
    };
    let app_members = members("app1_latest_app_image.tar.gz");
    assert!(
        app_members.contains(&"manifest.json".to_string()),
        "{app_members:?}"
    );
    assert!(app_members.contains(&"repositories".to_string()));
    assert!(app_members.contains(&format!("{}.json", f.app1)));
    let base_members = members("app1_latest_base_image.tar.gz");
    let base_l = m["app1:latest"]["baseLayer"].as_str().expect("l");
    for part in ["layer.tar", "VERSION", "json"] {
        assert!(
            base_members.contains(&format!("{base_l}/{part}")),
            "{base_members:?}"
        );
    }
    // The pieces of one app together are an ordinary docker-archive: another tool reads it
    // and finds the app's own config (the format isula-build's containers/image writes).
    if require_tool("skopeo") {
        let merged = w.join("merged");
        std::fs::create_dir(&merged).expect("merged");
        for piece in [
            "app1_latest_base_image.tar.gz",
            "app1_latest_lib_image.tar.gz",
            "app1_latest_app_image.tar.gz",
        ] {
            run_ok(
                std::process::Command::new("tar")
                    .arg("-xzf")
                    .arg(dest.join(piece))
                    .arg("-C")
                    .arg(&merged),
            );
        }
        let archive = w.join("merged.tar");
        run_ok(
            std::process::Command::new("tar")
                .arg("-C")
                .arg(&merged)
                .arg("-cf")
                .arg(&archive)
                .arg("."),
        );
        let config: serde_json::Value = serde_json::from_str(&run_ok(
            std::process::Command::new("skopeo")
                .args(["inspect", "--config"])
                .arg(format!("docker-archive:{}", archive.display())),
        ))
        .expect("config");
        assert_eq!(
            config["rootfs"]["diff_ids"].as_array().map(|a| a.len()),
            Some(3),
            "{config}"
        );
        let raw = run_ok(
            std::process::Command::new("skopeo")
                .args(["inspect", "--raw"])
                .arg(format!("docker-archive:{}", archive.display())),
        );
        let manifest: serde_json::Value = serde_json::from_str(&raw).expect("manifest");
        assert_eq!(
            manifest["config"]["digest"],
            format!("sha256:{}", f.app1),
            "{raw}"
        );
    }

    // Loaded back after the apps and the lib are gone: the same images.
    let before_rm = d.images();
    d.ok(&["ctr-img", "rm", "app1:latest", "app2:latest", "lib:latest"]);
    let out = d.ok(&["ctr-img", "load", "-i", "app1:latest", "-d", dest_s]);
    assert!(
        out.ends_with(&format!("Loaded image as {}\n", f.app1)),
        "{out}"
    );
    let out = d.ok(&["ctr-img", "load", "-i", "app2", "-d", dest_s, "--no-check"]);
    assert!(
        out.ends_with(&format!("Loaded image as {}\n", f.app2)),
        "{out}"
    );
    let mut now = d.images();
    now.retain(|(r, _, _)| r != "lib");
    let mut want = before_rm.clone();
    want.retain(|(r, _, _)| r != "lib");
    now.sort();
    want.sort();
    assert_eq!(now, want);
    // And it runs: files of the lib and the app layers are there.
    let ctx = w.join("ctx-use");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM app1:latest\nRUN cat /lib1/l /app\n",
    )
    .expect("df");
    let out = d.ok(&["ctr-img", "build", ctx.to_str().expect("ctx")]);
    assert!(out.contains("lib\none\n"), "{out}");

    // -b and -l given explicitly, alone or together, from another place.
    let elsewhere = w.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("dir");
    let base_copy = elsewhere.join("b.tar.gz");
    let lib_copy = elsewhere.join("l.tar.gz");
    std::fs::copy(dest.join("app1_latest_base_image.tar.gz"), &base_copy).expect("cp");
    std::fs::copy(dest.join("app1_latest_lib_image.tar.gz"), &lib_copy).expect("cp");
    for flags in [
        vec![
            "-b",
            base_copy.to_str().expect("p"),
            "-l",
            lib_copy.to_str().expect("p"),
        ],
        vec!["-b", base_copy.to_str().expect("p")],
        vec!["-l", lib_copy.to_str().expect("p")],
    ] {
        d.ok(&["ctr-img", "rm", "app1:latest"]);
        let mut a = vec!["ctr-img", "load", "-i", "app1:latest", "-d", dest_s];
        a.extend(flags.iter());
        let out = d.ok(&a);
        assert!(
            out.ends_with(&format!("Loaded image as {}\n", f.app1)),
            "{flags:?}: {out}"
        );
    }
}

#[test]
fn renamed_lib_less_and_default_destination() {
    let Some(f) = fixture() else { return };
    let (d, w) = (&f.d, f.work.path());
    let rename = w.join("rename.json");
    std::fs::write(
        &rename,
        r#"[{"name":"app1_latest_base_image.tar.gz","rename":"base1.tar.gz"},
            {"name":"app1_latest_lib_image.tar.gz","rename":"lib1.tar.gz"},
            {"name":"app1_latest_app_image.tar.gz","rename":"app1.tar.gz"},
            {"name":"app2_latest_app_image.tar.gz","rename":"app2.tar.gz"},
            {"name":"not-written.tar.gz","rename":"x.tar.gz"}]"#,
    )
    .expect("rename");
    let dest = w.join("R");
    d.ok(&[
        "ctr-img",
        "save",
        "-b",
        "busybox:latest",
        "-l",
        "lib",
        "-r",
        rename.to_str().expect("p"),
        "-d",
        dest.to_str().expect("p"),
        "app1",
        "app2",
    ]);
    assert_eq!(
        names(&dest),
        [
            "app1.tar.gz",
            "app2.tar.gz",
            "base1.tar.gz",
            "lib1.tar.gz",
            "manifest"
        ]
    );
    assert_eq!(manifest(&dest)["app2:latest"]["lib"], "lib1.tar.gz");

    // Without -l the lib layers are part of each app; loading needs no lib.
    let no_lib = w.join("NL");
    d.ok(&[
        "ctr-img",
        "save",
        "-b",
        "busybox",
        "-d",
        no_lib.to_str().expect("p"),
        "app1:latest",
    ]);
    let m = manifest(&no_lib);
    assert_eq!(m["app1:latest"]["lib"], "");
    assert!(m["app1:latest"]["libLayers"].is_null(), "{m}");
    assert_eq!(
        m["app1:latest"]["appLayers"].as_array().expect("l").len(),
        2
    );
    d.ok(&["ctr-img", "rm", "app1:latest"]);
    let out = d.ok(&[
        "ctr-img",
        "load",
        "-i",
        "app1:latest",
        "-d",
        no_lib.to_str().expect("p"),
    ]);
    assert!(
        out.ends_with(&format!("Loaded image as {}\n", f.app1)),
        "{out}"
    );

    // No -d: ./Images in the client's directory.
    let o = d
        .cli_command(&["ctr-img", "save", "-b", "busybox", "app2:latest"])
        .current_dir(w)
        .output()
        .expect("save");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(w.join("Images/manifest").is_file());
    assert!(w.join("Images/app2_latest_app_image.tar.gz").is_file());
}

#[test]
fn bad_saves_and_loads_are_refused_and_change_nothing() {
    let Some(f) = fixture() else { return };
    let (d, w) = (&f.d, f.work.path());
    let p = |name: &str| w.join(name).display().to_string();
    build(d, w, "other:1", "FROM busybox\nRUN echo other > /o\n");
    let before = d.images();
    // Saves.
    std::fs::write(w.join("broken.json"), b"[{\"name\": ").expect("rename");
    for (args, want) in [
        (
            vec![
                "-b",
                "busybox",
                "-r",
                &p("broken.json"),
                "-d",
                &p("S1"),
                "app1",
            ],
            "check rename file failed",
        ),
        (
            vec![
                "-b",
                "busybox",
                "-r",
                &p("missing.json"),
                "-d",
                &p("S2"),
                "app1",
            ],
            "check rename file failed",
        ),
        (vec!["-b", "nobase:1", "-d", &p("S3"), "app1"], "nobase:1"),
        (
            vec!["-b", "busybox", "-l", "nolib:1", "-d", &p("S4"), "app1"],
            "nolib:1",
        ),
        (vec!["-b", "busybox", "-d", &p("S5"), "noapp:1"], "noapp:1"),
        (
            vec!["-b", "busybox", "-d", &p("S6"), &f.app1[..12]],
            "as image name to save separated image is not allowed",
        ),
        (
            vec!["-b", "busybox", "-l", "other:1", "-d", &p("S7"), "app1"],
            "dismatch checksum for lib image other:1",
        ),
        (
            vec!["-b", "lib:latest", "-d", &p("S8"), "app1"],
            "number of base layers 2 more than one",
        ),
    ] {
        let mut a = vec!["ctr-img", "save"];
        a.extend(args.iter().copied());
        let err = d.fails(&a);
        assert!(err.contains(want), "{args:?}: {err}");
        let dest = args
            .iter()
            .position(|a| *a == "-d")
            .map(|i| args[i + 1])
            .expect("dest");
        assert!(!Path::new(dest).exists(), "{args:?} left {dest}");
    }
    // Rename values must be plain file names.
    std::fs::write(
        w.join("slash.json"),
        r#"[{"name":"app1_latest_app_image.tar.gz","rename":"../x.tar.gz"}]"#,
    )
    .expect("rename");
    let err = d.fails(&[
        "ctr-img",
        "save",
        "-b",
        "busybox",
        "-r",
        &p("slash.json"),
        "-d",
        &p("S9"),
        "app1",
    ]);
    assert!(err.contains("not a plain file name"), "{err}");

    // Loads.
    let dest = w.join("D");
    d.ok(&[
        "ctr-img",
        "save",
        "-b",
        "busybox",
        "-l",
        "lib",
        "-d",
        dest.to_str().expect("p"),
        "app1",
        "app2",
    ]);
    let dir = dest.to_str().expect("p");
    let lib_file = dest
        .join("app1_latest_lib_image.tar.gz")
        .display()
        .to_string();
    std::fs::write(w.join("garbage.tar.gz"), b"not a tarball").expect("garbage");
    let (garbage, nothere) = (p("garbage.tar.gz"), p("nothere.tar.gz"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["-i", "app1", "-b", &lib_file],
            "image tarball directory should not be empty",
        ),
        (vec!["-i", "app1:latest"], "app1:latest"),
        (
            vec!["-i", "app1", "-d", dir, "-b", &lib_file],
            "check sum for file",
        ),
        (
            vec!["-i", "app1", "-d", dir, "-l", &garbage],
            "check sum for file",
        ),
        (
            vec!["-i", "app1", "-d", dir, "-b", &nothere],
            "resolve base tarball path failed",
        ),
        (
            vec!["-i", "app3", "-d", dir],
            "failed to find app image app3:latest",
        ),
    ];
    for (args, want) in &cases {
        let mut a = vec!["ctr-img", "load"];
        a.extend(args.iter().copied());
        let err = d.fails(&a);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A tarball gone, a damaged manifest, and a garbage lib with --no-check.
    let app = dest.join("app1_latest_app_image.tar.gz");
    std::fs::rename(&app, w.join("moved.tar.gz")).expect("mv");
    let err = d.fails(&["ctr-img", "load", "-i", "app1", "-d", dir]);
    assert!(err.contains("app1_latest_app_image.tar.gz"), "{err}");
    let err = d.fails(&["ctr-img", "load", "-i", "app1", "-d", dir, "--no-check"]);
    assert!(err.contains("unpack app image tarball"), "{err}");
    std::fs::rename(w.join("moved.tar.gz"), &app).expect("mv back");
    let err = d.fails(&[
        "ctr-img",
        "load",
        "-i",
        "app1",
        "-d",
        dir,
        "--no-check",
        "-l",
        &p("garbage.tar.gz"),
    ]);
    assert!(
        err.contains("unpack lib image tarball") || err.contains("garbage.tar.gz"),
        "{err}"
    );
    std::fs::write(dest.join("manifest"), b"").expect("truncate");
    let err = d.fails(&["ctr-img", "load", "-i", "app1", "-d", dir]);
    assert!(err.contains("load manifest file failed"), "{err}");
    let mut after = d.images();
    after.sort();
    let mut want = before;
    want.sort();
    assert_eq!(after, want, "a refused operation changed the store");
    // Nothing half-done is left (the build cache's blobs stay, so no wait_idle).
    for sub in ["ingest", "tmp"] {
        let left: Vec<_> = std::fs::read_dir(d.data().join(sub))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{sub}: {left:?}");
    }
}
