//! Pull, push, login and builds against a real Distribution registry on 127.0.0.1
//! (Debian's docker-registry), checked with skopeo and the registry's own access log.

use isula_integration::registry::{Fault, FaultProxy, Registry, RegistryOptions, TokenIssuer};
use isula_integration::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn ready() -> bool {
    require_root() && require_tool("docker-registry") && require_tool("skopeo")
}

fn id_of(d: &Daemon, name: &str) -> Option<String> {
    let (repo, tag) = name.rsplit_once(':').expect("name:tag");
    d.images()
        .into_iter()
        .find(|(r, t, _)| r == repo && t == tag)
        .map(|(_, _, id)| id)
}

/// A registry holding `REPO:1` (busybox), and a daemon for it with an empty store.
fn seeded(repo: &str) -> (Registry, Daemon, String) {
    let reg = Registry::start(RegistryOptions::default());
    let d = Daemon::for_registries(&[&reg.host()]);
    let base = format!("{}/{repo}:1", reg.host());
    d.import_busybox(&base, &[]);
    d.ok(&["ctr-img", "push", &base]);
    d.ok(&["ctr-img", "rm", "-a"]);
    (reg, d, base)
}

/// Pushes `name`, empties the store, pulls it back and checks that the image ID is `id`.
fn round_trip(d: &Daemon, name: &str, id: &str) {
    d.ok(&["ctr-img", "push", name]);
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["ctr-img", "pull", name]);
    assert_eq!(id_of(d, name).as_deref(), Some(&id[..12]));
}

fn skopeo_raw(reference: &str) -> serde_json::Value {
    let out =
        run_ok(Command::new("skopeo").args(["inspect", "--raw", "--tls-verify=false", reference]));
    serde_json::from_str(&out).expect("manifest JSON")
}

#[test]
fn push_pull_round_trip_by_tag_and_digest() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    let name = format!("{host}/busybox:1");
    let id = d.import_busybox(&name, &[]);
    let out = d.ok(&["ctr-img", "push", &name]);
    for line in [
        "Getting image source signatures",
        "Copying blob sha256:",
        "Copying config sha256:",
        "Writing manifest to image destination",
        "Storing signatures",
    ] {
        assert!(out.contains(line), "{line:?} missing from:\n{out}");
    }
    assert!(
        out.ends_with(&format!("Push success with image: {name}\n")),
        "{out}"
    );
    // What we pushed is a Docker v2s2 manifest with gzip layers that skopeo can copy.
    let m = skopeo_raw(&format!("docker://{name}"));
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let oci_dir = d.dir.path().join("skopeo-oci");
    run_ok(
        Command::new("skopeo")
            .args([
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{name}"),
            ])
            .arg(format!("oci:{}:x", oci_dir.display())),
    );

    // Round trip: remove, pull, same ID.
    d.ok(&["ctr-img", "rm", &name]);
    let out = d.ok(&["ctr-img", "pull", &name]);
    assert!(
        out.ends_with(&format!("Pull success with image: {name}\n")),
        "{out}"
    );
    assert_eq!(id_of(&d, &name).as_deref(), Some(&id[..12]));
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
    // The pulled image (gzip layers, manifest as pulled) saves into archives others read.
    for (fmt, transport) in [("docker", "docker-archive"), ("oci", "oci-archive")] {
        let out = d.dir.path().join(format!("pulled-{fmt}.tar"));
        d.ok(&[
            "ctr-img",
            "save",
            "-f",
            fmt,
            &name,
            "-o",
            out.to_str().expect("path"),
        ]);
        run_ok(
            Command::new("skopeo")
                .args(["inspect"])
                .arg(format!("{transport}:{}", out.display())),
        );
    }

    // By digest, into an empty store.
    let digest = format!(
        "sha256:{}",
        sha256_hex(&serde_json::to_vec(&m).expect("json"))
    );
    let raw = run_ok(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{name}"),
    ]));
    let digest_raw = format!("sha256:{}", sha256_hex(raw.as_bytes()));
    let _ = digest;
    d.ok(&["ctr-img", "rm", "-a"]);
    let by_digest = format!("{host}/busybox@{digest_raw}");
    d.ok(&["ctr-img", "pull", &by_digest]);
    let out = d.ok(&["ctr-img", "images"]);
    assert!(out.contains(&id[..12]), "{out}");
    // A digest that does not match is refused, and nothing is stored.
    d.ok(&["ctr-img", "rm", "-a"]);
    let before = d.store_snapshot();
    let wrong = format!("{host}/busybox@sha256:{}", "0".repeat(64));
    let err = d.fails(&["ctr-img", "pull", &wrong]);
    assert!(err.contains(&host), "{err}");
    assert_eq!(d.store_snapshot(), before);

    // --format oci.
    d.import_busybox(&format!("{host}/oci:1"), &[]);
    d.ok(&["ctr-img", "push", "-f", "oci", &format!("{host}/oci:1")]);
    let m = skopeo_raw(&format!("docker://{host}/oci:1"));
    assert_eq!(m["mediaType"], "application/vnd.oci.image.manifest.v1+json");
    assert_eq!(
        m["config"]["mediaType"],
        "application/vnd.oci.image.config.v1+json"
    );
    assert_eq!(
        m["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let err = d.fails(&["ctr-img", "push", "-f", "v1", &format!("{host}/oci:1")]);
    assert!(err.contains("format"), "{err}");
}

#[test]
fn builds_pull_their_base_and_push_only_new_blobs() {
    if !ready() {
        return;
    }
    let (reg, d, base) = seeded("base");
    let host = reg.host();
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN echo built > /built\nCOPY --from={base} /bin/busybox /copied\n"),
    )
    .expect("Dockerfile");
    let uploads_before = reg.count_requests("PUT", "/v2/app/blobs/uploads/");
    let app = format!("{host}/app:1");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "-o",
        &format!("docker://{app}"),
        ctx.to_str().expect("ctx"),
    ]);
    assert!(from_pulled(&out), "{out}");
    assert!(!out.contains("Push success"), "the client's line: {out}");
    // The base layer was mounted from base/, not uploaded: only the new layer and the config.
    assert_eq!(
        reg.count_requests("PUT", "/v2/app/blobs/uploads/") - uploads_before,
        2,
        "{}",
        reg.log()
    );
    assert!(reg.count_requests("POST", "/v2/app/blobs/uploads/?mount=") >= 1);
    let m = skopeo_raw(&format!("docker://{app}"));
    assert_eq!(m["layers"].as_array().map(|a| a.len()), Some(2));
    // Pushing it again sends no blob at all.
    let puts = reg.count_requests("PUT", "/blobs/uploads/");
    let out = d.ok(&["ctr-img", "push", &app]);
    assert!(out.contains("skipped: already exists"), "{out}");
    assert_eq!(reg.count_requests("PUT", "/blobs/uploads/"), puts);
    // A second tag in the same repository: HEAD finds every blob.
    d.ok(&["ctr-img", "tag", &app, &format!("{host}/app:2")]);
    d.ok(&["ctr-img", "push", &format!("{host}/app:2")]);
    assert_eq!(reg.count_requests("PUT", "/blobs/uploads/"), puts);
    // isula-build's oci://: the same push with an OCI manifest.
    let oci = format!("{host}/app:oci");
    d.ok(&[
        "ctr-img",
        "build",
        "-o",
        &format!("oci://{oci}"),
        ctx.to_str().expect("ctx"),
    ]);
    let m = skopeo_raw(&format!("docker://{oci}"));
    assert_eq!(
        m["mediaType"], "application/vnd.oci.image.manifest.v1+json",
        "{m}"
    );
    // The pulled and built images run through skopeo too.
    let out = d.dir.path().join("app-oci");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false", &format!("docker://{app}")])
            .arg(format!("oci:{}:app", out.display())),
    );
}

#[test]
fn missing_images_and_blocked_registries_fail_clearly() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let conf = format!(
        "{}[[registry]]\nlocation = \"blocked.example\"\nblocked = true\n",
        insecure_registries(&[&host])
    );
    let policy = "{\"default\":[{\"type\":\"insecureAcceptAnything\"}],\"transports\":{\"docker\":{\"127.0.0.1:1/rejected\":[{\"type\":\"reject\"}],\"127.0.0.1:1/signed\":[{\"type\":\"signedBy\",\"keyType\":\"GPGKeys\",\"keyPath\":\"/etc/pki/k.gpg\"}]}}}";
    let d = Daemon::start_configured(
        &[("registries.toml", &conf), ("policy.json", policy)],
        &[],
        &[],
    );
    let before = d.store_snapshot();
    let err = d.fails(&["ctr-img", "pull", &format!("{host}/nothing:1")]);
    assert!(err.contains(&host) && err.contains("not found"), "{err}");
    let err = d.fails(&["ctr-img", "pull", "blocked.example/x:1"]);
    assert!(err.contains("blocked"), "{err}");
    let err = d.fails(&["ctr-img", "pull", "127.0.0.1:1/rejected/x:1"]);
    assert!(err.contains("policy.json rejects"), "{err}");
    // A signature requirement starts the daemon (what it governs is verified once the
    // manifest is fetched: tests/signatures.rs).
    // Not insecure: a plain-HTTP registry is not used without TLS.
    let d2 = Daemon::start();
    let err = d2.fails(&["ctr-img", "pull", &format!("{host}/nothing:1")]);
    assert!(err.contains(&host), "{err}");
    let err = d.fails(&["ctr-img", "push", "never-stored:1"]);
    assert!(err.contains("never-stored"), "{err}");
    assert_eq!(d.store_snapshot(), before);
}

#[test]
fn htpasswd_over_tls_login_push_logout() {
    if !(ready() && require_tool("htpasswd") && require_tool("openssl")) {
        return;
    }
    let password = "correct-horse-Battery-9";
    let reg = Registry::start(RegistryOptions {
        htpasswd: Some(("tester".into(), password.into())),
        tls: true,
        ..Default::default()
    });
    let host = reg.host();
    let ca = std::fs::read_to_string(&reg.certs.as_ref().expect("certs").ca).expect("ca");
    let d = Daemon::start_configured(
        &[(&format!("certs.d/{host}/ca.crt"), &ca)],
        &["--log-level", "debug"],
        &[],
    );
    let auth = d.etc().join("auth.json");
    // Wrong password: refused, nothing stored.
    let o = d.login(&host, "tester", "wrong-password-1");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(err.contains("Unauthorized login attempt"), "{err}");
    assert!(
        !err.contains("wrong-password-1"),
        "the password is in the error: {err}"
    );
    assert!(!auth.exists());
    // Anonymous push: refused with a hint.
    let name = format!("{host}/secure:1");
    d.import_busybox(&name, &[]);
    let err = d.fails(&["ctr-img", "push", &name]);
    assert!(err.contains("authentication required"), "{err}");
    // Right password: stored 0600 and used.
    let o = d.login(&host, "tester", password);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Login Succeeded\n");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&auth)
        .expect("auth.json")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&auth).expect("read")).expect("json");
    assert!(stored["auths"][&host]["auth"].is_string(), "{stored}");
    // Login again with no credentials uses the stored ones.
    let o = d.cli(&["login", &host]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "try to login with existing credentials...\n\nLogin Succeed with AuthFile\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    d.ok(&["ctr-img", "push", &name]);
    d.ok(&["ctr-img", "rm", &name]);
    d.ok(&["ctr-img", "pull", &name]);
    // Neither password shows up in the logs.
    assert!(!d.log().contains(password), "password in the daemon log");
    assert!(
        !d.log().contains("wrong-password-1"),
        "password in the daemon log"
    );
    // Logout removes it; then pushing is refused again.
    assert_eq!(
        d.ok(&["logout", &host]),
        format!("Removed authentication for {host}\n")
    );
    let o = d.cli(&["logout", &host]);
    assert!(!o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stdout), "\nLogout Failed\n\n");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("not logged in registry {host}")),
        "{o:?}"
    );
    let err = d.fails(&["ctr-img", "push", &name]);
    assert!(err.contains("authentication required"), "{err}");
    assert_eq!(d.ok(&["logout", "-a"]), "Removed authentications\n");
    // As isula-build: -a wins over a server named with it.
    assert_eq!(d.ok(&["logout", "-a", &host]), "Removed authentications\n");
    // Without the CA the registry's certificate is refused (it is not listed insecure).
    let d2 = Daemon::start();
    let err = d2.fails(&["ctr-img", "pull", &name]);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
}

#[test]
fn bearer_token_flow() {
    if !(ready() && require_tool("openssl")) {
        return;
    }
    let issuer = TokenIssuer::start("tokenuser", "token-pass-77");
    let reg = Registry::start(RegistryOptions {
        token: Some((issuer.realm(), issuer.cert.clone())),
        ..Default::default()
    });
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    let name = format!("{host}/tok/busybox:1");
    let id = d.import_busybox(&name, &[]);
    let err = d.fails(&["ctr-img", "push", &name]);
    assert!(err.contains("authentication required"), "{err}");
    let o = d.login(&host, "tokenuser", "bad");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Unauthorized login attempt"));
    let o = d.login(&host, "tokenuser", "token-pass-77");
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        reg.log()
    );
    round_trip(&d, &name, &id);
    assert!(issuer.issued.load(std::sync::atomic::Ordering::SeqCst) >= 2);
    assert!(!d.log().contains("token-pass-77"));
}

#[test]
fn faults_leave_the_store_unchanged_and_the_next_try_works() {
    if !ready() {
        return;
    }
    let mut reg = Registry::start(RegistryOptions::default());
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let phost = proxy.host();
    let d = Daemon::for_registries(&[&phost]);
    // A layer big enough that half of it is a real interruption.
    let rootfs = d.dir.path().join("big.tar");
    std::fs::write(&rootfs, big_rootfs(8)).expect("big rootfs");
    let name = format!("{phost}/big:1");
    d.ok(&["ctr-img", "import", rootfs.to_str().expect("path"), &name]);

    // Push: the registry dies half-way through the upload.
    proxy.set(Fault::KillDuringUpload);
    let images = d.images();
    let err = d.fails(&["ctr-img", "push", &name]);
    eprintln!("push fault: {err}");
    assert!(err.contains(&phost) && err.contains("big"), "{err}");
    assert_eq!(d.images(), images);
    reg.restart();
    d.ok(&["ctr-img", "push", &name]);

    // Pull of a corrupted blob: refused, nothing kept.
    d.ok(&["ctr-img", "rm", "-a"]);
    let empty = d.store_snapshot();
    proxy.set(Fault::CorruptBlobs);
    let err = d.fails(&["ctr-img", "pull", &name]);
    eprintln!("corrupt: {err}");
    assert!(
        err.contains("digest mismatch") && err.contains(&phost),
        "{err}"
    );
    assert_eq!(d.store_snapshot(), empty);

    // Pull: the registry dies half-way through a blob.
    proxy.set(Fault::KillDuringBlobGet);
    let err = d.fails(&["ctr-img", "pull", &name]);
    eprintln!("pull fault: {err}");
    assert!(err.contains(&phost), "{err}");
    assert_eq!(d.store_snapshot(), empty);
    reg.restart();
    proxy.set(Fault::None);
    d.ok(&["ctr-img", "pull", &name]);
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
}

#[test]
fn proxy_build_args_travel_encrypted_and_stay_out_of_logs_and_images() {
    if !require_root() {
        return;
    }
    let d = Daemon::start_with(&["--log-level", "debug"]);
    d.import_busybox("busybox:latest", &[]);
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nARG http_proxy\nRUN echo \"proxy=$http_proxy\" > /seen\n",
    )
    .expect("df");
    let secret = "http://user:Pr0xyS3cret@proxy.invalid:3128";
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--build-arg",
        &format!("http_proxy={secret}"),
        "--build-arg",
        "OTHER=1",
        "-o",
        &format!(
            "docker-archive:{}:proxy:1",
            d.dir.path().join("p.tar").display()
        ),
        ctx.to_str().expect("ctx"),
    ]);
    assert!(!out.contains("Pr0xyS3cret"), "{out}");
    assert!(
        !d.log().contains("Pr0xyS3cret"),
        "proxy value in the daemon log"
    );
    // RUN saw it, but the image's config and history do not carry it.
    let tar = std::fs::read(d.dir.path().join("p.tar")).expect("archive");
    let mut a = tar::Archive::new(&tar[..]);
    let mut config_seen = false;
    for e in a.entries().expect("entries") {
        let mut e = e.expect("entry");
        let path = e.path().expect("path").to_string_lossy().to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read");
        if path.ends_with(".json") {
            assert!(
                !String::from_utf8_lossy(&data).contains("Pr0xyS3cret"),
                "{path} carries the proxy value"
            );
            config_seen |= path != "manifest.json";
        }
    }
    assert!(config_seen);
}

#[test]
fn manifest_lists_create_annotate_inspect_push() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    // Without --experimental the commands are refused.
    let plain = Daemon::start();
    let err = plain.fails(&["manifest", "inspect", "x:1"]);
    assert!(err.contains("--experimental"), "{err}");

    let d = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&host]))],
        &["--experimental"],
        &[],
    );
    let amd = d.import_busybox("multi-amd64:1", &[]);
    let arm = d.import_busybox("multi-arm64:1", &[("etc/flavour", b"arm\n")]);
    let list_id = d.ok(&[
        "manifest",
        "create",
        "multi:1",
        "multi-amd64:1",
        "multi-arm64:1",
    ]);
    assert_eq!(list_id.trim().len(), 64, "{list_id}");
    let err = d.fails(&["manifest", "create", "multi:1", "multi-amd64:1"]);
    assert!(err.contains("already exists"), "{err}");
    let err = d.fails(&["manifest", "create", "other:1", "no-such-image:1"]);
    assert!(err.contains("no-such-image"), "{err}");
    let out = d.ok(&[
        "manifest",
        "annotate",
        "--arch",
        "arm64",
        "--variant",
        "v8",
        "multi:1",
        "multi-arm64:1",
    ]);
    assert_eq!(out, "Annotate manifest succeed\n");
    // A list may start empty, as in isula-build.
    let empty = d.ok(&["manifest", "create", "empty:1"]);
    assert_eq!(empty.trim().len(), 64, "{empty}");
    let err = d.fails(&[
        "manifest",
        "annotate",
        "--arch",
        "arm64",
        "multi:1",
        "busybox-not-listed:1",
    ]);
    assert!(err.contains("busybox-not-listed"), "{err}");
    let text = d.ok(&["manifest", "inspect", "multi:1"]);
    assert!(
        text.contains("\n    \"manifests\": [\n        {"),
        "indented by 4: {text}"
    );
    let shown: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(
        shown["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let arches: Vec<String> = shown["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .map(|m| {
            format!(
                "{}/{}",
                m["platform"]["architecture"].as_str().unwrap_or(""),
                m["platform"]["variant"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(arches, vec!["amd64/".to_string(), "arm64/v8".to_string()]);

    let dest = format!("{host}/multi:1");
    let out = d.ok(&["manifest", "push", "multi:1", &dest]);
    assert!(
        out.contains("Writing manifest list to image destination"),
        "{out}"
    );
    assert!(
        out.ends_with("Push manifest list multi:1 succeed\n"),
        "{out}"
    );
    assert!(!out.contains("Push success"), "{out}");
    let raw = skopeo_raw(&format!("docker://{dest}"));
    assert_eq!(
        raw["mediaType"],
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    let listed = raw["manifests"].as_array().expect("manifests");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[1]["platform"]["architecture"], "arm64");
    // Each listed manifest is in the repository, and a pull picks this machine's entry.
    for m in listed {
        let digest = m["digest"].as_str().expect("digest");
        skopeo_raw(&format!("docker://{host}/multi@{digest}"));
    }
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["ctr-img", "pull", &dest]);
    assert_eq!(id_of(&d, &dest).as_deref(), Some(&amd[..12]));
    assert_ne!(amd, arm);
}

#[test]
fn search_registries_mirrors_and_rewriting() {
    if !ready() {
        return;
    }
    let mirror = Registry::start(RegistryOptions::default());
    let primary = Registry::start(RegistryOptions::default());
    let (m, p) = (mirror.host(), primary.host());
    // Put an image in the mirror only.
    let seed = Daemon::for_registries(&[&m]);
    let id = seed.import_busybox(&format!("{m}/team/busybox:1"), &[]);
    seed.ok(&["ctr-img", "push", &format!("{m}/team/busybox:1")]);
    let conf = format!(
        "unqualified-search-registries = [\"{p}\", \"{m}\"]\n\
         [[registry]]\nprefix = \"example.test/team\"\nlocation = \"{p}/team\"\ninsecure = true\n\
         [[registry.mirror]]\nlocation = \"{m}/team\"\ninsecure = true\n\
         [[registry]]\nlocation = \"{p}\"\ninsecure = true\n\
         [[registry]]\nlocation = \"{m}\"\ninsecure = true\n"
    );
    let d = Daemon::start_configured(&[("registries.toml", &conf)], &[], &[]);
    // A name under the prefix comes from the mirror (the primary location lacks it).
    let out = d.ok(&["ctr-img", "pull", "example.test/team/busybox:1"]);
    assert!(
        out.contains("Pull success with image: example.test/team/busybox:1"),
        "{out}"
    );
    assert_eq!(
        id_of(&d, "example.test/team/busybox:1").as_deref(),
        Some(&id[..12])
    );
    // A short name is tried in each search registry in turn; the second has it.
    let out = d.ok(&["ctr-img", "pull", "team/busybox:1"]);
    // The client names the image as it was given, as isula-build's does.
    assert!(
        out.ends_with("Pull success with image: team/busybox:1\n"),
        "{out}"
    );
    assert!(id_of(&d, &format!("{m}/team/busybox:1")).is_some());
    // And a build's FROM finds it by the short name now in the store, without pulling.
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM team/busybox:1\nRUN true\n").expect("df");
    let gets = mirror.count_requests("GET", "/manifests/");
    let out = d.ok(&["ctr-img", "build", ctx.to_str().expect("ctx")]);
    assert!(!from_pulled(&out), "{out}");
    assert_eq!(mirror.count_requests("GET", "/manifests/"), gets);
}

#[test]
fn credentials_are_not_sent_across_a_redirect_to_another_host() {
    if !(ready() && require_tool("htpasswd")) {
        return;
    }
    let reg = Registry::start(RegistryOptions {
        htpasswd: Some(("tester".into(), "Redirect-Pass-3".into())),
        ..Default::default()
    });
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let phost = proxy.host();
    let d = Daemon::for_registries(&[&phost]);
    let o = d.login(&phost, "tester", "Redirect-Pass-3");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let name = format!("{phost}/redir:1");
    let id = d.import_busybox(&name, &[]);
    d.ok(&["ctr-img", "push", &name]);
    d.ok(&["ctr-img", "rm", "-a"]);

    // Blob downloads are redirected to another host (127.0.0.2), which serves them from
    // the registry's storage and notes any Authorization header it is sent.
    let spy = std::net::TcpListener::bind("127.0.0.2:0").expect("bind 127.0.0.2");
    let spy_port = spy.local_addr().expect("addr").port();
    let storage = reg.dir.path().join("data/docker/registry/v2/blobs/sha256");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (seen, served) = (seen.clone(), served.clone());
        std::thread::spawn(move || {
            for conn in spy.incoming().flatten() {
                let mut w = conn.try_clone().expect("clone");
                let mut r = std::io::BufReader::new(conn);
                let mut req = String::new();
                std::io::BufRead::read_line(&mut r, &mut req).expect("line");
                loop {
                    let mut h = String::new();
                    if std::io::BufRead::read_line(&mut r, &mut h).unwrap_or(0) == 0
                        || h.trim().is_empty()
                    {
                        break;
                    }
                    seen.lock().expect("seen").push(h.trim().to_string());
                }
                let hex = req
                    .split(' ')
                    .nth(1)
                    .and_then(|p| p.strip_prefix("/blob/"))
                    .unwrap_or("")
                    .to_string();
                let data = std::fs::read(
                    storage
                        .join(&hex[..2.min(hex.len())])
                        .join(&hex)
                        .join("data"),
                )
                .unwrap_or_default();
                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = w.write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        data.len()
                    )
                    .as_bytes(),
                );
                let _ = w.write_all(&data);
            }
        });
    }
    proxy.set(Fault::RedirectBlobs(spy_port));
    d.ok(&["ctr-img", "pull", &name]);
    assert_eq!(id_of(&d, &name).as_deref(), Some(&id[..12]));
    assert!(
        served.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the redirect was not followed"
    );
    let headers = seen.lock().expect("seen").clone();
    assert!(
        !headers
            .iter()
            .any(|h| h.to_ascii_lowercase().starts_with("authorization")),
        "credentials crossed to another host: {headers:?}"
    );
}

#[test]
fn uploads_fall_back_to_patch_when_a_single_put_is_refused() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let phost = proxy.host();
    let d = Daemon::for_registries(&[&phost]);
    let name = format!("{phost}/chunked:1");
    let id = d.import_busybox(&name, &[]);
    proxy.set(Fault::RefuseMonolithic);
    d.ok(&["ctr-img", "push", &name]);
    // The data went up in PATCH requests, and the result reads back intact.
    assert!(
        reg.count_requests("PATCH", "/v2/chunked/blobs/uploads/") >= 2,
        "{}",
        reg.log()
    );
    proxy.set(Fault::None);
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["ctr-img", "pull", &name]);
    assert_eq!(id_of(&d, &name).as_deref(), Some(&id[..12]));
}

/// Runs `isula-build ARGS` on a pseudo-terminal (util-linux `script`), typing `input`.
fn on_tty(d: &Daemon, args: &str, input: &str) -> String {
    let cmd = format!("{} {args}", bin("isula-build").display());
    let c = d.cli_command(&[]);
    let envs: Vec<(String, String)> = c
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
        .collect();
    let mut script = Command::new("script");
    script
        .args(["-qec", &cmd, "/dev/null"])
        .envs(envs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = script.spawn().expect("script");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = input.to_string();
    // Type slowly enough for each prompt to be up.
    let typer = std::thread::spawn(move || {
        for line in input.lines() {
            std::thread::sleep(std::time::Duration::from_millis(700));
            let _ = stdin.write_all(format!("{line}\n").as_bytes());
        }
        std::thread::sleep(std::time::Duration::from_millis(1500));
    });
    let out = child.wait_with_output().expect("script output");
    let _ = typer.join();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn interactive_login_prompts_and_does_not_echo_the_password() {
    if !(ready() && require_tool("htpasswd") && require_tool("script")) {
        return;
    }
    let reg = Registry::start(RegistryOptions {
        htpasswd: Some(("tty-user".into(), "Typed-Secret-42".into())),
        ..Default::default()
    });
    let host = reg.host();
    let d = Daemon::for_registries(&[&host]);
    // Nothing stored: the client asks for both, and the password is not echoed.
    let out = on_tty(&d, &format!("login {host}"), "tty-user\nTyped-Secret-42\n");
    assert!(
        out.contains("Username:") && out.contains("Password:"),
        "{out}"
    );
    assert!(out.contains("Login Succeeded"), "{out}");
    assert!(
        !out.contains("Typed-Secret-42"),
        "the password was echoed: {out}"
    );
    // Stored now: no prompt at all.
    let out = on_tty(&d, &format!("login {host}"), "");
    assert!(
        out.contains("Login Succeed with AuthFile") && !out.contains("Password:"),
        "{out}"
    );
    // -u given: only the password is asked for.
    let out = on_tty(&d, &format!("login {host} -u tty-user"), "wrong-one\n");
    assert!(
        out.contains("Password:") && out.contains("Unauthorized login attempt"),
        "{out}"
    );
}

#[test]
fn concurrent_builds_share_one_pull_of_their_base() {
    if !ready() {
        return;
    }
    let (reg, d, base) = seeded("shared");
    let before = reg.count_requests("GET", "/v2/shared/manifests/1");
    let children: Vec<_> = (0..4)
        .map(|i| {
            let ctx = d.dir.path().join(format!("ctx{i}"));
            std::fs::create_dir_all(&ctx).expect("ctx");
            std::fs::write(
                ctx.join("Dockerfile"),
                format!("FROM {base}\nRUN echo {i} > /n\n"),
            )
            .expect("df");
            d.cli_command(&["ctr-img", "build", ctx.to_str().expect("ctx")])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("build")
        })
        .collect();
    for c in children {
        let o = c.wait_with_output().expect("build");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    assert_eq!(
        reg.count_requests("GET", "/v2/shared/manifests/1") - before,
        1,
        "{}",
        reg.log()
    );
}

#[test]
fn client_certificates_from_certs_d() {
    if !(ready() && require_tool("openssl")) {
        return;
    }
    let reg = Registry::start(RegistryOptions {
        tls: true,
        client_certs: true,
        ..Default::default()
    });
    let host = reg.host();
    let certs = reg.certs.as_ref().expect("certs");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).expect("read cert");
    let ca = read(&certs.ca);
    // The CA alone is not enough: the registry wants a client certificate.
    let d = Daemon::start_configured(&[(&format!("certs.d/{host}/ca.crt"), &ca)], &[], &[]);
    let name = format!("{host}/mtls:1");
    d.import_busybox(&name, &[]);
    let err = d.fails(&["ctr-img", "push", &name]);
    // (TLS 1.3: the server drops the connection after the handshake.)
    assert!(err.contains(&host) && err.contains("ping"), "{err}");
    let (cert, key) = (read(&certs.client_cert), read(&certs.client_key));
    let d = Daemon::start_configured(
        &[
            (&format!("certs.d/{host}/ca.crt"), &ca),
            (&format!("certs.d/{host}/client.cert"), &cert),
            (&format!("certs.d/{host}/client.key"), &key),
        ],
        &[],
        &[],
    );
    let id = d.import_busybox(&name, &[]);
    round_trip(&d, &name, &id);
}

#[test]
fn server_errors_are_retried() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let phost = proxy.host();
    let d = Daemon::for_registries(&[&phost]);
    let name = format!("{phost}/flaky:1");
    let id = d.import_busybox(&name, &[]);
    d.ok(&["ctr-img", "push", &name]);
    d.ok(&["ctr-img", "rm", "-a"]);
    // Two 503s in a row, then the registry answers: the pull gets through.
    proxy.set(Fault::ServerErrors(2));
    d.ok(&["ctr-img", "pull", &name]);
    assert_eq!(id_of(&d, &name).as_deref(), Some(&id[..12]));
    assert_eq!(
        *proxy.fault.lock().expect("fault"),
        Fault::None,
        "the 503s were not served"
    );
}

#[test]
fn live_progress_on_a_terminal_and_plain_lines_elsewhere() {
    if !ready() || !require_tool("script") || !require_tool("runc") {
        return;
    }
    let (_reg, d, base) = seeded("live");
    let work = d.dir.path().join("live");
    std::fs::create_dir_all(&work).expect("dir");
    // Not a terminal: isula-build's lines only, no event ever reaches the text.
    let plain = d.ok(&["ctr-img", "pull", &base]);
    assert!(
        !plain.contains('\u{1e}') && !plain.contains("Downloading"),
        "{plain}"
    );
    d.ok(&["ctr-img", "rm", &base]);
    // The idle unpack of the pulled layer may hold its blob a moment: once it is done
    // and collected, the next pull downloads it again.
    d.wait_idle();
    // A terminal: the same lines plus live blocks.
    let out = on_tty(&d, &format!("ctr-img pull {base}"), "");
    assert!(
        out.contains("Downloading ") && out.contains("done"),
        "{out}"
    );
    assert!(
        out.contains(&format!("Pull success with image: {base}")),
        "{out}"
    );
    assert!(!out.contains('\u{1e}'), "{out}");
    // New content, so that its layer is uploaded (not mounted from the base's repository).
    let pushed = format!("{}-fresh:1", base.trim_end_matches(":1"));
    d.import_busybox(&pushed, &[("etc/fresh", b"fresh\n")]);
    let out = on_tty(&d, &format!("ctr-img push {pushed}"), "");
    assert!(out.contains("Uploading "), "{out}");
    let archive = work.join("live.tar");
    let out = on_tty(
        &d,
        &format!("ctr-img save {base} -o {}", archive.display()),
        "",
    );
    assert!(out.contains("Saving live.tar"), "{out}");
    assert!(
        out.contains(&format!("Save success with image: [{base}]")),
        "{out}"
    );
    d.ok(&["ctr-img", "rm", "-a"]);
    let out = on_tty(&d, &format!("ctr-img load -i {}", archive.display()), "");
    assert!(out.contains("Loading live.tar"), "{out}");
    assert!(out.contains("Loaded image as "), "{out}");
    // A build: each step's time after it.
    let ctx = work.join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), format!("FROM {base}\nRUN true\n")).expect("df");
    let out = on_tty(
        &d,
        &format!("ctr-img build --no-cache {}", ctx.display()),
        "",
    );
    assert!(out.contains("STEP  2: RUN true"), "{out}");
    assert!(out.matches(" ---> ").count() >= 2, "{out}");
    assert!(out.contains("Build success with image id: "), "{out}");
}

/// A registry that resets connections or stops reading or answering in the middle of a
/// blob: the transfer fails after `registry_stall_timeout` (3 s here) instead of hanging,
/// is tried again on a new request, and succeeds when the registry recovers; a registry
/// that keeps stalling fails the push or pull naming the registry and the blob, with
/// nothing kept, and the next try works.
#[test]
fn resets_and_stalls_mid_blob_are_retried_and_a_hung_registry_fails_in_time() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let phost = proxy.host();
    let d = Daemon::start_configured(
        &[
            (
                "registries.toml",
                &insecure_registries(&[&phost, &reg.host()]),
            ),
            ("configuration.toml", "registry_stall_timeout = \"3s\"\n"),
        ],
        &["--log-level", "debug"],
        &[],
    );
    // A layer larger than the socket buffers, so that a registry that stops reading
    // really stops the upload; each phase its own content and repository (no mounts, no
    // "already there"). Built, every layer (ADD of the rootfs, COPY), then pushed once
    // straight to the registry under another repository (another host to the daemon: no
    // cross-repository mount), which makes and keeps their gzip: each push below sends
    // stored blobs, the path these faults are about (a stream that breaks is
    // `a_push_sends_the_gzip_as_it_makes_it_keeps_it_and_survives_a_broken_stream`).
    let ctx = d.dir.path().join("stall-ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("rootfs.tar"), busybox_rootfs(&[])).expect("rootfs");
    let image = |i: u64| {
        let name = format!("{phost}/stall{i}/big:1");
        std::fs::write(ctx.join("noise.bin"), noise(64, 0x1234_5678 + i)).expect("noise");
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nADD rootfs.tar /\nCOPY noise.bin /data/noise.bin\n",
        )
        .expect("Dockerfile");
        d.ok(&["ctr-img", "build", "-t", &name, ctx.to_str().expect("path")]);
        name
    };
    let retries = || d.log().matches("upload failed; retrying").count();
    let names: Vec<String> = (1..=4).map(image).collect();
    for (i, name) in names.iter().enumerate() {
        let warm = format!("{}/warm{i}/big:1", reg.host());
        d.ok(&["ctr-img", "tag", name, &warm]);
        d.ok(&["ctr-img", "push", &warm]);
        d.ok(&["ctr-img", "rm", &warm]);
    }
    d.wait_idle();

    // One reset mid-upload: a new upload session, the push succeeds.
    proxy.set(Fault::ResetUploads(1));
    let before = retries();
    d.ok(&["ctr-img", "push", &names[0]]);
    assert!(retries() > before, "the reset was not retried");
    skopeo_raw(&format!("docker://{}", names[0]));

    // A registry that stops reading once: the stalled send fails in time, and is retried.
    proxy.set(Fault::StallUploads(1));
    let before = retries();
    d.ok(&["ctr-img", "push", &names[1]]);
    assert!(retries() > before, "the stall was not retried");
    skopeo_raw(&format!("docker://{}", names[1]));

    // A registry that keeps stalling: the push fails naming the registry and the blob;
    // the tag never appears, the store is as it was; the next push works.
    proxy.set(Fault::StallUploads(100));
    let store = d.store_snapshot();
    let err = d.fails(&["ctr-img", "push", &names[2]]);
    eprintln!("stalled push: {err}");
    assert!(
        err.contains(&phost)
            && err.contains("blob sha256:")
            && err.contains("stall3/big")
            && err.contains("no progress for 3s")
            && !err.contains("_state="),
        "{err}"
    );
    assert_eq!(d.store_snapshot(), store);
    proxy.set(Fault::None);
    let seen = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{}", names[2]))
        .output()
        .expect("skopeo");
    assert!(!seen.status.success(), "a failed push left its tag");
    d.ok(&["ctr-img", "push", &names[2]]);
    d.ok(&["ctr-img", "push", &names[3]]);

    // Pulls: a blob answer that stops half way once is fetched again; one that always
    // stops fails the pull naming the registry, with nothing kept; the next pull works.
    // (The build cache goes too: it would keep the built layers here.)
    d.ok(&["ctr-img", "rm", "-a"]);
    d.ok(&["builder", "prune", "-a", "-f"]);
    let empty = d.store_snapshot();
    proxy.set(Fault::StallBlobGets(1));
    d.ok(&["ctr-img", "pull", &names[0]]);
    assert!(id_of(&d, &names[0]).is_some());
    proxy.set(Fault::StallBlobGets(100));
    let before = d.store_snapshot();
    let err = d.fails(&["ctr-img", "pull", &names[1]]);
    eprintln!("stalled pull: {err}");
    assert!(
        err.contains(&phost) && err.contains("no progress for 3s"),
        "{err}"
    );
    assert_eq!(d.store_snapshot(), before);
    proxy.set(Fault::None);
    d.ok(&["ctr-img", "pull", &names[1]]);
    d.ok(&["ctr-img", "rm", "-a"]);
    assert_eq!(d.store_snapshot(), empty);
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
}

/// The gzip recorded for each uncompressed layer blob (`compressed` in metadata.json).
fn gzip_records(d: &Daemon) -> std::collections::BTreeMap<String, String> {
    let text = std::fs::read_to_string(d.data().join("metadata.json")).expect("metadata");
    let meta: serde_json::Value = serde_json::from_str(&text).expect("metadata JSON");
    meta["compressed"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v["digest"].as_str()?.to_string())))
        .collect()
}

#[test]
fn a_push_sends_the_gzip_as_it_makes_it_keeps_it_and_survives_a_broken_stream() {
    if !ready() || !require_tool("runc") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let proxy = FaultProxy::start(reg.port, reg.pid_handle());
    let phost = proxy.host();
    let d = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&phost]))],
        &["--log-level", "debug"],
        &[("ISULA_BUILD_PHASES", "1")],
    );
    d.import_busybox("busybox:latest", &[]);
    // No layer is gzipped in idle time, so each push below makes the gzip itself; an
    // operation runs throughout, so no background work runs beside the pushes either.
    let busy = d.busy("busybox");

    let push = |repo: &str, seed: u64| {
        let name = format!("{phost}/{repo}:1");
        let before = gzip_records(&d);
        d.import_busybox(&name, &[("data/noise.bin", &noise(24, seed))]);
        assert_eq!(gzip_records(&d), before, "a gzip was made before the push");
        let patches = reg.count_requests("PATCH", &format!("/v2/{repo}/blobs/uploads/"));
        d.ok(&["ctr-img", "push", &name]);
        assert!(
            reg.count_requests("PATCH", &format!("/v2/{repo}/blobs/uploads/")) > patches,
            "{repo}: the layer did not go up as a stream"
        );
        // The layer the registry holds is the gzip the store kept, and it is whole.
        let manifest = skopeo_raw(&format!("docker://{name}"));
        let layer = manifest["layers"][0]["digest"].as_str().expect("layer");
        let kept: Vec<String> = gzip_records(&d)
            .into_values()
            .filter(|g| !before.values().any(|b| b == g))
            .collect();
        assert_eq!(kept, vec![layer.to_string()], "{repo}");
        let out = d.dir.path().join(repo.replace('/', "-"));
        run_ok(Command::new("skopeo").args([
            "copy",
            "--src-tls-verify=false",
            &format!("docker://{name}"),
            &format!("oci:{}:x", out.display()),
        ]));
        let id = id_of(&d, &name).expect("id");
        (name, id)
    };

    // A stream that goes through.
    let (a, a_id) = push("stream/a", 0x5eed_0001);
    // Pushed again elsewhere: the kept gzip goes up in one PUT, no new gzip is made.
    let again = format!("{phost}/stream/again:1");
    d.ok(&["ctr-img", "tag", &a, &again]);
    let made = d.log().matches("gzip (for a push)").count();
    d.ok(&["ctr-img", "push", &again]);
    assert_eq!(
        reg.count_requests("PATCH", "/v2/stream/again/blobs/uploads/"),
        0,
        "the kept gzip was streamed again"
    );
    assert!(made > 0, "no gzip phase logged");
    assert_eq!(d.log().matches("gzip (for a push)").count(), made);

    // A stream reset half way: the finished gzip goes up the ordinary way instead.
    proxy.set(Fault::ResetUploads(1));
    let (b, b_id) = push("stream/b", 0x5eed_0002);
    assert!(
        d.log()
            .contains("streamed upload failed; sending the stored gzip"),
        "the reset stream was not noticed"
    );
    proxy.set(Fault::None);

    // Both pull back as the same images, their layers kept packed (no directory) while
    // the store is busy; once it is idle their directories are made.
    d.ok(&["ctr-img", "rm", &a, &again, &b]);
    let layer_dirs = || {
        std::fs::read_dir(d.data().join("layers"))
            .map(|rd| rd.count())
            .unwrap_or(0)
    };
    let dirs = layer_dirs();
    for (name, id) in [(&a, &a_id), (&b, &b_id)] {
        d.ok(&["ctr-img", "pull", name]);
        assert_eq!(id_of(&d, name).as_deref(), Some(id.as_str()), "{name}");
    }
    assert_eq!(layer_dirs(), dirs, "a pull unpacked its layer");
    busy.end();
    assert!(d.leftovers().is_empty(), "{:?}", d.leftovers());
    assert_eq!(layer_dirs(), dirs + 2, "the idle unpack");
}
