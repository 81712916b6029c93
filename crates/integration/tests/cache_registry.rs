//! The build cache shared through a real Distribution registry: one daemon exports with
//! `--cache-to`, another with an empty store imports with `--cache-from`, and a cache
//! that cannot be read never fails a build.

use isula_integration::registry::{Fault, FaultProxy, Registry, RegistryOptions};
use isula_integration::*;
use std::path::PathBuf;
use std::process::Command;

fn ready() -> bool {
    require_root() && require_tool("docker-registry") && require_tool("skopeo")
}

const STATIC: &str = "--build-static=build-time=2024-01-02 03:04:05";

fn dockerfile(base: &str) -> String {
    format!(
        "FROM {base} AS build\n\
         ARG V=1\n\
         COPY a.txt /a.txt\n\
         RUN cp /a.txt /b.txt && echo $V > /v && rm /bin/vi\n\
         WORKDIR /w\n\
         COPY dir/ /w/dir/\n\
         RUN rm /a.txt && test ! -e /bin/vi && test -e /b.txt\n\
         FROM {base}\n\
         COPY --from=build /b.txt /w/ /out/\n\
         ENV X=1\n\
         RUN ls /out > /listing\n"
    )
}

fn context(d: &Daemon, name: &str, base: &str) -> PathBuf {
    let dir = d.dir.path().join(name);
    std::fs::create_dir_all(dir.join("dir")).expect("ctx");
    std::fs::write(dir.join("Dockerfile"), dockerfile(base)).expect("Dockerfile");
    std::fs::write(dir.join("a.txt"), "a").expect("a");
    std::fs::write(dir.join("dir/x"), "x").expect("x");
    dir
}

/// A registry, its host, a busybox base pushed to it as `HOST/base:1`, and the daemon
/// that pushed it (which may talk plain HTTP to it).
fn registry_with_base() -> (Registry, String, String, Daemon) {
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let base = format!("{host}/base:1");
    let d = Daemon::for_registries(&[&host]);
    d.import_busybox(&base, &[]);
    d.ok(&["ctr-img", "push", &base]);
    (reg, host, base, d)
}

fn build(d: &Daemon, ctx: &std::path::Path, extra: &[&str]) -> (String, String) {
    let mut args = vec!["ctr-img", "build", STATIC];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().expect("path"));
    let out = d.ok(&args);
    (build_id(&out), out)
}

/// The snapshot blobs the exported records name (from the cache's config blob).
fn snapshot_blobs(reference: &str) -> Vec<String> {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("records JSON");
    v["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["snapshot"]["digest"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_second_daemon_reuses_the_cache_through_a_registry() {
    if !ready() {
        return;
    }
    let (reg, host, base, d1) = registry_with_base();
    let cache = format!("{host}/cache:1");
    let ctx1 = context(&d1, "ctx", &base);
    let (first, out) = build(&d1, &ctx1, &["--cache-to", &cache]);
    assert!(
        out.contains(&format!("Build cache exported to {cache}")),
        "{out}"
    );
    let snapshots = snapshot_blobs(&cache);
    assert_eq!(snapshots.len(), 7, "one per step that changed files");

    // An empty store: every step hits, the image is the same, and no step's snapshot is
    // downloaded (both stages are reused whole).
    let d2 = Daemon::for_registries(&[&host]);
    let ctx2 = context(&d2, "ctx", &base);
    let (id, out) = build(
        &d2,
        &ctx2,
        &[
            "--cache-from",
            &format!("type=registry,ref={cache}"),
            "--tag",
            "app:2",
        ],
    );
    assert_eq!(id, first, "{out}");
    assert_eq!(cached_steps(&out).len(), 9, "{out}");
    for s in &snapshots {
        assert_eq!(
            reg.count_requests("GET", &format!("/v2/cache/blobs/{s}")),
            0,
            "snapshot {s} was fetched for a full hit"
        );
    }
    // The image is whole: a build on it reads the copied files.
    let check = d2.dir.path().join("check");
    std::fs::create_dir_all(&check).expect("check");
    std::fs::write(
        check.join("Dockerfile"),
        "FROM app:2\nRUN cat /out/b.txt /out/dir/x /listing && test ! -e /out/a.txt\n",
    )
    .expect("Dockerfile");
    let out = d2.ok(&["ctr-img", "build", check.to_str().expect("path")]);
    assert!(out.contains("ax"), "{out}");

    // A change in a later step's input: the steps before it come from the registry (their
    // snapshots fetched now, whiteouts included), and the image is the one a build
    // without any cache makes.
    let d3 = Daemon::for_registries(&[&host]);
    let ctx3 = context(&d3, "ctx", &base);
    std::fs::write(ctx3.join("dir/x"), "changed").expect("x");
    let (partial, out) = build(&d3, &ctx3, &["--cache-from", &cache]);
    assert_eq!(
        cached_steps(&out),
        [
            "ARG V=1",
            "COPY a.txt /a.txt",
            "RUN cp /a.txt /b.txt && echo $V > /v && rm /bin/vi",
            "WORKDIR /w"
        ],
        "{out}"
    );
    std::fs::write(ctx1.join("dir/x"), "changed").expect("x");
    let (fresh, _) = build(&d1, &ctx1, &["--no-cache"]);
    assert_eq!(partial, fresh, "the shared cache changed the image");
}

#[test]
fn a_cache_that_cannot_be_read_never_fails_the_build() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host, "127.0.0.1:1"]);
    let base = format!("{host}/base:1");
    d.import_busybox(&base, &[]);
    d.ok(&["ctr-img", "push", &base]);
    let ctx = context(&d, "ctx", &base);
    for (source, says) in [
        (format!("{host}/nothing:1"), "not found".to_string()),
        ("127.0.0.1:1/cache:1".to_string(), "127.0.0.1:1".to_string()),
        (base.clone(), "not an isula-build cache".to_string()),
    ] {
        let (_, out) = build(&d, &ctx, &["--cache-from", &source]);
        let warning = out
            .lines()
            .find(|l| l.starts_with("[Warning] the build cache"))
            .unwrap_or_else(|| panic!("no warning for {source}: {out}"));
        assert!(
            warning.contains(&source) && warning.contains(&says),
            "{warning}"
        );
    }
    // Exporting to a registry that is not there fails the call, says why, and keeps the
    // image that was built.
    let before = d.images().len();
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--tag",
        "kept:1",
        "--cache-to",
        "127.0.0.1:1/cache:1",
        ctx.to_str().expect("path"),
    ]);
    assert!(
        err.contains("exporting its build cache to 127.0.0.1:1/cache:1"),
        "{err}"
    );
    assert_eq!(d.images().len(), before + 1);
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--cache-to",
        "type=local,dest=/tmp/x",
        ctx.to_str().expect("path"),
    ]);
    assert!(err.contains("local"), "{err}");
}

#[test]
fn the_cache_goes_through_login_and_tls_as_pull_and_push_do() {
    if !(ready() && require_tool("htpasswd") && require_tool("openssl")) {
        return;
    }
    let password = "cache-Password-7";
    let reg = Registry::start(RegistryOptions {
        htpasswd: Some(("tester".into(), password.into())),
        tls: true,
        ..Default::default()
    });
    let host = reg.host();
    let ca = std::fs::read_to_string(&reg.certs.as_ref().expect("certs").ca).expect("ca");
    let ca_file = format!("certs.d/{host}/ca.crt");
    let start = || {
        let d = Daemon::start_configured(&[(ca_file.as_str(), ca.as_str())], &[], &[]);
        d.load_fixed_busybox("base:1");
        d
    };
    let cache = format!("{host}/cache:1");
    let d1 = start();
    let ctx1 = context(&d1, "ctx", "base:1");
    let err = d1.fails(&[
        "ctr-img",
        "build",
        "--cache-to",
        &cache,
        ctx1.to_str().expect("path"),
    ]);
    assert!(err.contains("authentication required"), "{err}");
    let o = d1.login(&host, "tester", password);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (first, _) = build(&d1, &ctx1, &["--cache-to", &cache]);

    // Not logged in: the cache cannot be read, the build says so and runs every step.
    let d2 = start();
    let ctx2 = context(&d2, "ctx", "base:1");
    let (_, out) = build(&d2, &ctx2, &["--cache-from", &cache]);
    assert!(
        out.contains(&format!("[Warning] the build cache {cache} cannot be used")),
        "{out}"
    );
    assert!(cached_steps(&out).is_empty(), "{out}");
    // Logged in: every step hits.
    let d3 = start();
    let o = d3.login(&host, "tester", password);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ctx3 = context(&d3, "ctx", "base:1");
    let (id, out) = build(&d3, &ctx3, &["--cache-from", &cache]);
    assert_eq!(id, first, "{out}");
    assert_eq!(cached_steps(&out).len(), 9, "{out}");
    assert!(!d3.log().contains(password), "password in the daemon log");
}

#[test]
fn a_cache_source_that_fails_half_way_costs_time_not_the_build() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let host = proxy.host();
    let start = || {
        let d = Daemon::for_registries(&[&host]);
        d.load_fixed_busybox("base:1");
        d
    };
    let cache = format!("{host}/cache:1");
    let d1 = start();
    let ctx1 = context(&d1, "ctx", "base:1");
    build(&d1, &ctx1, &["--cache-to", &cache]);
    // The records are read (one blob GET); the snapshots a later step needs never come.
    let d2 = start();
    let ctx2 = context(&d2, "ctx", "base:1");
    std::fs::write(ctx2.join("dir/x"), "changed").expect("x");
    proxy.set(Fault::FailBlobGetsAfter(1));
    let (id, out) = build(&d2, &ctx2, &["--cache-from", &cache]);
    proxy.set(Fault::None);
    assert!(
        out.contains("running the stage again without the registry cache"),
        "{out}"
    );
    // The stage ran whole the second time, numbered as the first time.
    assert_eq!(out.matches("STEP  2: ARG V=1").count(), 2, "{out}");
    std::fs::write(ctx1.join("dir/x"), "changed").expect("x");
    let (fresh, _) = build(&d1, &ctx1, &["--no-cache"]);
    assert_eq!(id, fresh);
}

/// `curl` against the plain-HTTP registry `host`; returns the body.
fn curl(args: &[&str]) -> Vec<u8> {
    let o = Command::new("curl")
        .args(["-sfS"])
        .args(args)
        .output()
        .expect("curl");
    assert!(
        o.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o.stdout
}

#[test]
fn a_stage_record_whose_config_lists_other_layers_is_not_used() {
    if !(ready() && require_tool("curl")) {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let start = || {
        let d = Daemon::for_registries(&[&host]);
        d.load_fixed_busybox("base:1");
        d
    };
    let d1 = start();
    let ctx1 = context(&d1, "ctx", "base:1");
    let (first, _) = build(&d1, &ctx1, &["--cache-to", &format!("{host}/cache:1")]);

    // A tampered copy of the cache: every stage config claims one layer less.
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json";
    let manifest: serde_json::Value = serde_json::from_slice(&curl(&[
        "-H",
        accept,
        &format!("http://{host}/v2/cache/manifests/1"),
    ]))
    .expect("manifest");
    let config_digest = manifest["config"]["digest"].as_str().expect("digest");
    let mut records: serde_json::Value = serde_json::from_slice(&curl(&[
        "-L",
        &format!("http://{host}/v2/cache/blobs/{config_digest}"),
    ]))
    .expect("records");
    let mut tampered = 0;
    for r in records["records"].as_array_mut().expect("records") {
        if let Some(cfg) = r["stage"]["config"].as_str() {
            let mut c: serde_json::Value = serde_json::from_str(cfg).expect("config");
            c["rootfs"]["diff_ids"]
                .as_array_mut()
                .expect("diff ids")
                .pop();
            r["stage"]["config"] = serde_json::Value::String(c.to_string());
            tampered += 1;
        }
    }
    assert_eq!(tampered, 2);
    let body = serde_json::to_vec(&records).expect("json");
    let digest = format!("sha256:{}", sha256_hex(&body));
    let file = d1.dir.path().join("records.json");
    std::fs::write(&file, &body).expect("write");
    let loc = String::from_utf8(curl(&[
        "-X",
        "POST",
        "-o",
        "/dev/null",
        "-w",
        "%header{location}",
        &format!("http://{host}/v2/cache/blobs/uploads/"),
    ]))
    .expect("location");
    let sep = if loc.contains('?') { '&' } else { '?' };
    let url = if loc.starts_with("http") {
        format!("{loc}{sep}digest={digest}")
    } else {
        format!("http://{host}{loc}{sep}digest={digest}")
    };
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/octet-stream",
        "--data-binary",
        &format!("@{}", file.display()),
        &url,
    ]);
    let mut m = manifest.clone();
    m["config"]["digest"] = serde_json::Value::String(digest);
    m["config"]["size"] = serde_json::json!(body.len());
    let mfile = d1.dir.path().join("manifest.json");
    std::fs::write(&mfile, serde_json::to_vec(&m).expect("json")).expect("write");
    curl(&[
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/vnd.oci.image.manifest.v1+json",
        "--data-binary",
        &format!("@{}", mfile.display()),
        &format!("http://{host}/v2/cache/manifests/bad"),
    ]);

    // The steps hit, the stage record is refused, the stage runs again: the right image.
    let d2 = start();
    let ctx2 = context(&d2, "ctx", "base:1");
    let (id, out) = build(&d2, &ctx2, &["--cache-from", &format!("{host}/cache:bad")]);
    assert!(out.contains("lists other layers than its record"), "{out}");
    assert!(
        out.contains("running the stage again without the registry cache"),
        "{out}"
    );
    assert_eq!(id, first);
}

/// The cache mounts a cache export holds: id → blob digest.
fn exported_mounts(reference: &str) -> Vec<String> {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--config",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("records JSON");
    v["mounts"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cache_mounts_travel_through_the_registry_to_a_fresh_daemon() {
    if !ready() {
        return;
    }
    let (_reg, host, base, d1) = registry_with_base();
    let with = format!("{host}/cache:mounts");
    let without = format!("{host}/cache:plain");
    // A "package download" kept in a cache mount; a secret beside it never goes.
    let df = format!(
        "FROM {base}\n\
         ARG V=1\n\
         RUN --mount=type=cache,id=pkgs,target=/var/cache/pkgs --mount=type=secret,id=tok \
         echo $V >> /var/cache/pkgs/runs && ls /var/cache/pkgs > /seen && \
         test ! -e /var/cache/pkgs/tok\n"
    );
    let ctx = d1.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), &df).expect("Dockerfile");
    let secret = d1.dir.path().join("tok");
    std::fs::write(&secret, "s3cret").expect("secret");
    let secret_arg = format!("id=tok,src={}", secret.display());
    let c = ctx.to_str().expect("path");
    let err = d1.fails(&["ctr-img", "build", "--cache-mounts", c]);
    assert!(err.contains("--cache-mounts goes with"), "{err}");
    d1.ok(&[
        "ctr-img",
        "build",
        "--secret",
        &secret_arg,
        "--cache-to",
        &without,
        c,
    ]);
    assert!(
        exported_mounts(&without).is_empty(),
        "exported without --cache-mounts"
    );
    let out = d1.ok(&[
        "ctr-img",
        "build",
        "--secret",
        &secret_arg,
        "--build-arg",
        "V=2",
        "--cache-to",
        &with,
        "--cache-mounts",
        c,
    ]);
    assert!(out.contains("Exporting cache mount id=pkgs"), "{out}");
    assert_eq!(exported_mounts(&with), vec!["pkgs"]);
    // Nothing of the secret is in any blob of the export.
    let layers = skopeo_layers(&with);
    for l in &layers {
        let blob = curl(&["-L", &format!("http://{host}/v2/cache/blobs/{l}")]);
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&blob[..]), &mut tar)
            .expect("gunzip");
        assert!(
            !tar.windows(6).any(|w| w == b"s3cret"),
            "the secret went in {l}"
        );
    }

    // A fresh daemon: the RUN misses (V=3), its cache mount comes seeded with both runs.
    let d2 = Daemon::for_registries(&[&host]);
    let ctx2 = d2.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx2).expect("ctx");
    std::fs::write(ctx2.join("Dockerfile"), &df).expect("Dockerfile");
    let secret2 = d2.dir.path().join("tok");
    std::fs::write(&secret2, "s3cret").expect("secret");
    let arg2 = format!("id=tok,src={}", secret2.display());
    let c2 = ctx2.to_str().expect("path");
    d2.ok(&[
        "ctr-img",
        "build",
        "--secret",
        &arg2,
        "--build-arg",
        "V=3",
        "--cache-from",
        &with,
        "--cache-mounts",
        "-t",
        "seeded:1",
        c2,
    ]);
    let runs = std::fs::read_to_string(
        d2.data()
            .join("cache-mounts")
            .join(sha256_hex(b"pkgs"))
            .join("data/runs"),
    )
    .expect("the seeded cache mount");
    assert_eq!(
        runs, "1\n2\n3\n",
        "seeded with the exported runs, then this one"
    );
    // The positive control: without --cache-mounts a fresh daemon starts the mount empty.
    let d3 = Daemon::for_registries(&[&host]);
    let ctx3 = d3.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx3).expect("ctx");
    std::fs::write(ctx3.join("Dockerfile"), &df).expect("Dockerfile");
    let secret3 = d3.dir.path().join("tok");
    std::fs::write(&secret3, "s3cret").expect("secret");
    let arg3 = format!("id=tok,src={}", secret3.display());
    d3.ok(&[
        "ctr-img",
        "build",
        "--secret",
        &arg3,
        "--build-arg",
        "V=3",
        "--cache-from",
        &with,
        ctx3.to_str().expect("path"),
    ]);
    let runs = std::fs::read_to_string(
        d3.data()
            .join("cache-mounts")
            .join(sha256_hex(b"pkgs"))
            .join("data/runs"),
    )
    .expect("the cache mount");
    assert_eq!(runs, "3\n");
}

/// The layer digests of the manifest at `reference`.
fn skopeo_layers(reference: &str) -> Vec<String> {
    let out = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{reference}"),
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).expect("manifest");
    v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter_map(|l| l["digest"].as_str().map(str::to_string))
        .collect()
}

/// A COPY written as its stage's layer tar (the stage's last step to change files)
/// travels like any step: its record (the stage as it stands after it) goes out with its
/// layer, a fresh daemon hits it and gets the same image, and a longer Dockerfile with a
/// RUN after it hits the COPY and finds its files below the RUN.
#[test]
fn a_copy_written_as_a_tar_travels_through_the_registry_cache() {
    if !ready() {
        return;
    }
    let (_reg, host, base, d1) = registry_with_base();
    let cache = format!("{host}/cache:1");
    let context = |d: &Daemon, df: &str| -> PathBuf {
        let dir = d.dir.path().join("packed");
        std::fs::create_dir_all(dir.join("dir")).expect("ctx");
        std::fs::write(dir.join("Dockerfile"), df).expect("Dockerfile");
        std::fs::write(dir.join("dir/x"), "x").expect("x");
        dir
    };
    let df = format!("FROM {base}\nCOPY dir/ /app/\n");
    let (first, out) = build(&d1, &context(&d1, &df), &["--cache-to", &cache]);
    assert!(d1.log().contains("COPY writes its layer as a tar"), "{out}");
    // Schema 2: a builder that reads schema 1 refuses it rather than take the step for one
    // that changed no files (a cache without such a step stays schema 1).
    let schema_of = |reference: &str| -> u64 {
        let out = run_ok(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--raw",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ]));
        let v: serde_json::Value = serde_json::from_str(&out).expect("records JSON");
        v["schema"].as_u64().expect("schema")
    };
    assert_eq!(schema_of(&cache), 2);
    let plain = format!("{host}/cache:plain");
    build(
        &d1,
        &context(&d1, &format!("FROM {base}\nENV Z=1\n")),
        &["--cache-to", &plain],
    );
    assert_eq!(schema_of(&plain), 1);
    let d2 = Daemon::for_registries(&[&host]);
    let (id, out) = build(&d2, &context(&d2, &df), &["--cache-from", &cache]);
    assert_eq!(id, first, "{out}");
    assert_eq!(cached_steps(&out), ["COPY dir/ /app/"], "{out}");
    let d3 = Daemon::for_registries(&[&host]);
    let longer = format!("{df}RUN cat /app/x > /seen\n");
    let (_, out) = build(
        &d3,
        &context(&d3, &longer),
        &["--cache-from", &cache, "--tag", "run:1"],
    );
    assert_eq!(cached_steps(&out), ["COPY dir/ /app/"], "{out}");
    assert_eq!(d3.image_text("run:1", "seen").as_deref(), Some("x"));
    // A config step after it: the COPY hits, the stage does not, and the stage's layer is
    // the one the record brought (as its gzip blob).
    let d4 = Daemon::for_registries(&[&host]);
    let (_, out) = build(
        &d4,
        &context(&d4, &format!("{df}ENV Y=1\n")),
        &["--cache-from", &cache, "--tag", "env:1"],
    );
    assert_eq!(cached_steps(&out), ["COPY dir/ /app/"], "{out}");
    assert_eq!(d4.image_text("env:1", "app/x").as_deref(), Some("x"));
    d4.ok(&[
        "ctr-img",
        "save",
        "env:1",
        "-o",
        d4.dir.path().join("env.tar").to_str().expect("utf8"),
    ]);
}
