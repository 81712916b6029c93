//! Builds through the real store, overlay and runc (root only; CI fails rather than skips).

use isula_builder_core::{build, BuildOptions, Context};
use isula_runtime::Runc;
use isula_store::Store;
use isula_types::image::ImageConfig;
use isula_types::{limits, Reference};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn ready() -> bool {
    let ok = rustix::process::geteuid().is_root() && Path::new("/bin/busybox").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "build tests need root and busybox-static in CI"
        );
        eprintln!("skipping: needs root and /bin/busybox (outside CI)");
    }
    ok
}

/// The busybox base: every applet, plus users and groups for USER and --chown.
fn busybox_tar() -> Vec<u8> {
    isula_integration::busybox_rootfs(&[
        (
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        ),
        ("etc/group", b"root:x:0:\napp:x:1000:\nextra:x:2000:app\n"),
    ])
}

/// The directory of the newest layer of `built:1`.
/// The directory of `built:1`'s top layer (made now if the layer is kept packed: a COPY
/// that ends its stage writes its layer as a tar).
fn top_layer(e: &Env) -> std::path::PathBuf {
    let img = e.store.resolve("built:1").expect("img");
    layer_files(e, img.layers.last().expect("layer"))
}

/// The directory of layer `chain`, made now if it is kept packed.
fn layer_files(e: &Env, chain: &isula_types::ChainId) -> std::path::PathBuf {
    e.store
        .layer_diff(chain, &e.store.lease())
        .expect("the layer's directory")
}

struct Env {
    dir: tempfile::TempDir,
    store: Store,
    runc: Runc,
}

fn env() -> Env {
    let dir = tempfile::tempdir().expect("tmp");
    let (store, _) = Store::open(&dir.path().join("data")).expect("store");
    let src = dir.path().join("busybox.tar");
    std::fs::write(&src, busybox_tar()).expect("write");
    let r = Reference::parse("busybox:latest").expect("ref");
    isula_transport::import::import(
        &store,
        &isula_transport::AsDaemon,
        &src,
        Some(&r),
        &Default::default(),
        &mut |_| {},
    )
    .expect("import");
    let runc = Runc::new("runc", &dir.path().join("runc")).expect("runc");
    Env { dir, store, runc }
}

fn run_build(
    e: &Env,
    dockerfile: &str,
    context: &Path,
    args: &[(&str, &str)],
    time: Option<i64>,
) -> (Result<isula_types::ImageId, String>, String) {
    run_build_with(e, dockerfile, context, |o| {
        o.build_args = args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        o.build_time = time;
    })
}

fn config_of(e: &Env, id: &isula_types::ImageId) -> ImageConfig {
    serde_json::from_slice(
        &e.store
            .content()
            .read_small(id.digest(), limits::MANIFEST_MAX)
            .expect("config"),
    )
    .expect("json")
}

#[test]
fn builds_the_manual_example_with_run_and_config() {
    if !ready() {
        return;
    }
    let e = env();
    let ctx = e.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("a.txt"), b"A").expect("a");
    std::fs::write(ctx.join("b.txt"), b"B").expect("b");
    std::fs::write(ctx.join("ignored.log"), b"no").expect("log");
    std::fs::write(ctx.join(".dockerignore"), b"*.log\n").expect("ignore");
    let df = "FROM busybox\nLABEL foo=bar\nARG WHO=world\nENV A=1 B=$A\nENV C=$A\nWORKDIR /app\nCOPY ./*.txt /home/dir1/\nRUN echo hello $WHO > /app/out && echo ran as $(id -u)\nUSER app\nRUN echo groups: $(id -G)\nEXPOSE 80 90-91/udp\nENTRYPOINT [\"/bin/sh\"]\n";
    let (id, log) = run_build(&e, df, &ctx, &[("WHO", "isula")], None);
    let id = id.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(
        log.starts_with("STEP  1: FROM busybox\nSTEP  2: LABEL foo=bar\n"),
        "{log}"
    );
    assert!(log.contains("ran as 0\n"), "{log}");
    let c = config_of(&e, &id);
    let cc = c.config.expect("config");
    assert_eq!(
        cc.labels.expect("labels").get("foo").map(String::as_str),
        Some("bar")
    );
    let env = cc.env.expect("env");
    assert!(
        env.contains(&"A=1".to_string())
            && env.contains(&"B=".to_string())
            && env.contains(&"C=1".to_string()),
        "{env:?}"
    );
    assert!(
        !env.iter().any(|e| e.starts_with("WHO=")),
        "ARGs are not stored"
    );
    assert_eq!(cc.working_dir, "/app");
    assert_eq!(cc.user, "app");
    assert_eq!(
        cc.exposed_ports
            .expect("ports")
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["80/tcp", "90/udp", "91/udp"]
    );
    assert_eq!(cc.entrypoint, Some(vec!["/bin/sh".to_string()]));
    assert_eq!(
        c.rootfs.diff_ids.len(),
        2,
        "one base layer plus one commit for the stage"
    );
    let img = e.store.resolve("built:1").expect("tagged");
    let top = layer_files(&e, &img.layers[1]);
    assert_eq!(
        std::fs::read(top.join("app/out")).expect("out"),
        b"hello isula\n"
    );
    assert_eq!(std::fs::read(top.join("home/dir1/a.txt")).expect("a"), b"A");
    assert!(
        !top.join("home/dir1/ignored.log").exists(),
        ".dockerignore applies"
    );
    assert!(log.contains("groups: 1000 2000\n"), "{log}");
    for leaked in ["proc", "sys", "dev", "etc/hosts", "etc/resolv.conf"] {
        assert!(
            std::fs::symlink_metadata(top.join(leaked)).is_err(),
            "{leaked} leaked into the layer"
        );
    }
    assert!(
        isula_sys::mounts_under(e.dir.path())
            .expect("mountinfo")
            .is_empty(),
        "mounts left"
    );
    assert!(!e.dir.path().join("work").exists(), "work dir left");
}

#[test]
fn failing_run_names_the_step_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let e = env();
    let ctx = e.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    let before = e.store.images().len();
    let (r, log) = run_build(
        &e,
        "FROM busybox\nRUN touch /x\nRUN exit 7\n",
        &ctx,
        &[],
        None,
    );
    let err = r.expect_err("must fail");
    assert!(
        err.contains("STEP 3 (line 3) RUN exit 7") && err.contains("non-zero code: 7"),
        "{err}\n{log}"
    );
    assert_eq!(e.store.images().len(), before);
    assert!(isula_sys::mounts_under(e.dir.path())
        .expect("mountinfo")
        .is_empty());
    assert!(
        std::fs::read_dir(e.dir.path().join("data/tmp"))
            .expect("tmp")
            .next()
            .is_none(),
        "staged layers left"
    );
}

#[test]
fn build_static_is_reproducible_and_multistage_copies_between_stages() {
    if !ready() {
        return;
    }
    let e = env();
    let ctx = e.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("f"), b"data").expect("f");
    let df = "FROM busybox AS 1build\nRUN echo built > /artifact\nFROM busybox\nCOPY --from=1build /artifact /final\nCOPY f /f\nRUN echo $RANDOM > /dev/null\n";
    let (a, log) = run_build(&e, df, &ctx, &[], Some(1_590_000_000));
    let a = a.unwrap_or_else(|err| panic!("{err}\n{log}"));
    let (b, log) = run_build(&e, df, &ctx, &[], Some(1_590_000_000));
    let b = b.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert_eq!(a, b, "same inputs and build time give the same image ID");
    let top = top_layer(&e);
    assert_eq!(std::fs::read(top.join("final")).expect("final"), b"built\n");
    let c = config_of(&e, &a);
    assert_eq!(c.created.as_deref(), Some("2020-05-20T18:40:00Z"));
}

#[test]
fn escapes_are_contained() {
    if !ready() {
        return;
    }
    let e = env();
    let ctx = e.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::os::unix::fs::symlink("/etc", ctx.join("hostetc")).expect("symlink");
    std::fs::write(ctx.join("f"), b"payload").expect("f");
    // A context symlink to /etc is resolved inside the context: there is no passwd there.
    let (r, _) = run_build(
        &e,
        "FROM busybox\nCOPY hostetc/passwd /stolen\n",
        &ctx,
        &[],
        None,
    );
    assert!(r.is_err(), "the host's /etc/passwd must not be reachable");
    // COPY ../x stays inside the context.
    let (r, _) = run_build(
        &e,
        "FROM busybox\nCOPY ../../../../etc/hostname /x\n",
        &ctx,
        &[],
        None,
    );
    assert!(r.is_err());
    // A RUN-made link to / does not lead COPY out of the rootfs.
    let marker = format!("/tmp/isula-escape-{}", std::process::id());
    let df = format!("FROM busybox\nRUN ln -s / /x\nCOPY f /x{marker}\n");
    let (r, log) = run_build(&e, &df, &ctx, &[], None);
    r.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(!Path::new(&marker).exists(), "COPY wrote to the host");
    let top = top_layer(&e);
    assert_eq!(
        std::fs::read(top.join(marker.trim_start_matches('/'))).expect("inside"),
        b"payload"
    );
    // WORKDIR through /proc/self/fd is a plain path inside the rootfs, not the daemon's fds.
    let (r, log) = run_build(
        &e,
        "FROM busybox\nWORKDIR /proc/self/fd/1\nCOPY f .\n",
        &ctx,
        &[],
        None,
    );
    r.unwrap_or_else(|err| panic!("{err}\n{log}"));
    let top = top_layer(&e);
    assert_eq!(
        std::fs::read(top.join("proc/self/fd/1/f")).expect("inside"),
        b"payload"
    );
}

fn run_build_with(
    e: &Env,
    dockerfile: &str,
    context: &Path,
    edit: impl FnOnce(&mut BuildOptions),
) -> (Result<isula_types::ImageId, String>, String) {
    let mut log = String::new();
    let mut opts = BuildOptions {
        build_id: "test".into(),
        dockerfile: dockerfile.into(),
        context: context.to_path_buf(),
        tags: vec![Reference::parse("built:1").expect("ref")],
        work_dir: e.dir.path().join("work"),
        ..Default::default()
    };
    edit(&mut opts);
    let mut sink = |l: String| log.push_str(&l);
    let mut ctx = Context {
        store: &e.store,
        runc: &e.runc,
        cancel: Arc::new(AtomicBool::new(false)),
        log: &mut sink,
        pull: None,
        remote: None,
        ssh: None,
        download: None,
    };
    let built = build(&mut ctx, &opts);
    drop(ctx);
    // The daemon's last line: the unused build args.
    let r = built
        .map(|b| {
            log.extend(isula_builder_core::unused_args_warning(&b.unused_args));
            b.id
        })
        .map_err(|e| e.to_string());
    (r, log)
}

#[test]
fn heredocs_onbuild_target_proxies_and_caps() {
    if !ready() {
        return;
    }
    let e = env();
    let ctx = e.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");

    // Heredocs: a RUN script, a RUN reading a document on stdin, and COPY of a document.
    let df = "FROM busybox\nARG NAME=heredoc\nRUN <<EOF\necho script ran\necho one > /one\nEOF\nRUN cat > /two <<END\nsecond $NAME\nEND\nCOPY <<EOT /etc/greeting\nhi $NAME\nEOT\n";
    let (id, log) = run_build_with(&e, df, &ctx, |_| {});
    id.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(log.contains("script ran\n"), "{log}");
    let top = top_layer(&e);
    assert_eq!(
        std::fs::read_to_string(top.join("one")).expect("one"),
        "one\n"
    );
    assert_eq!(
        std::fs::read_to_string(top.join("two")).expect("two"),
        "second heredoc\n"
    );
    assert_eq!(
        std::fs::read_to_string(top.join("etc/greeting")).expect("greeting"),
        "hi heredoc\n"
    );

    // ONBUILD triggers run in the child build and are not inherited further.
    let (parent, log) = run_build_with(
        &e,
        "FROM busybox\nONBUILD RUN echo triggered > /t\n",
        &ctx,
        |o| {
            o.tags = vec![Reference::parse("parent:1").expect("ref")];
        },
    );
    parent.unwrap_or_else(|err| panic!("{err}\n{log}"));
    let (child, log) = run_build_with(&e, "FROM parent:1\nRUN cat /t\n", &ctx, |_| {});
    let child = child.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(log.contains("triggered\n"), "{log}");
    assert!(config_of(&e, &child)
        .config
        .expect("config")
        .on_build
        .is_none());

    // --target builds up to a stage, and only the stages it needs.
    let df = "FROM busybox AS first\nRUN echo first > /f\nFROM busybox AS unused\nRUN exit 1\nFROM first AS second\nRUN echo second > /s\nFROM busybox\nRUN exit 1\n";
    let (id, log) = run_build_with(&e, df, &ctx, |o| o.target = Some("second".into()));
    let id = id.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(
        !log.contains("RUN exit 1"),
        "unneeded stages must not run: {log}"
    );
    assert_eq!(config_of(&e, &id).rootfs.diff_ids.len(), 3);
    let (r, _) = run_build_with(&e, df, &ctx, |o| o.target = Some("nope".into()));
    assert!(r
        .expect_err("unknown target")
        .contains("target stage \"nope\" could not be found"));

    // Proxies: from the daemon's environment (--proxy) and from build args without ARG;
    // visible to RUN, never stored in the image.
    let df = "FROM busybox\nRUN echo \"http=$http_proxy https=$https_proxy\"\n";
    let (id, log) = run_build_with(&e, df, &ctx, |o| {
        o.proxy = true;
        o.host_proxy_env = vec![("http_proxy".into(), "http://host-proxy:3128".into())];
        o.build_args = vec![
            ("https_proxy".into(), "http://arg-proxy:3129".into()),
            ("UNUSED".into(), "1".into()),
        ];
    });
    let id = id.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(
        log.contains("http=http://host-proxy:3128 https=http://arg-proxy:3129\n"),
        "{log}"
    );
    assert!(
        log.ends_with("[Warning] One or more build-args [UNUSED] were not consumed\n"),
        "{log}"
    );
    let raw = String::from_utf8(
        e.store
            .content()
            .read_small(id.digest(), limits::MANIFEST_MAX)
            .expect("config"),
    )
    .expect("utf8");
    assert!(
        !raw.contains("proxy:31"),
        "a proxy value reached the image config: {raw}"
    );
    // Proxies never enter a cache key, so the step runs again only without the cache.
    let (_, log) = run_build_with(&e, df, &ctx, |o| {
        o.proxy = false;
        o.host_proxy_env = vec![("http_proxy".into(), "http://host-proxy:3128".into())];
    });
    assert!(log.contains("Using cache"), "{log}");
    let (_, log) = run_build_with(&e, df, &ctx, |o| {
        o.proxy = false;
        o.host_proxy_env = vec![("http_proxy".into(), "http://host-proxy:3128".into())];
        o.cache = isula_builder_core::CacheMode::Refresh;
    });
    assert!(
        log.contains("http= https=\n"),
        "--proxy=false must not pass the host's proxies: {log}"
    );

    // WORKDIR (BuildKit): missing directories are made for the USER; existing ones stay.
    let (id, log) = run_build_with(
        &e,
        "FROM busybox\nUSER app\nWORKDIR /srv/app\nWORKDIR /tmp\n",
        &ctx,
        |_| {},
    );
    id.unwrap_or_else(|err| panic!("{err}\n{log}"));
    let top = top_layer(&e);
    for d in ["srv", "srv/app"] {
        let m = std::fs::metadata(top.join(d)).expect("workdir");
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::uid(&m),
                std::os::unix::fs::MetadataExt::gid(&m)
            ),
            (1000, 1000),
            "{d}"
        );
    }
    assert!(
        !top.join("tmp").exists(),
        "an existing directory is not touched"
    );

    // COPY --chown: the destination directories it creates belong to that owner too.
    std::fs::write(ctx.join("f"), b"f").expect("f");
    let (id, log) = run_build_with(
        &e,
        "FROM busybox\nCOPY --chown=app f /deep/a/b/\n",
        &ctx,
        |_| {},
    );
    id.unwrap_or_else(|err| panic!("{err}\n{log}"));
    let top = top_layer(&e);
    for d in ["deep", "deep/a", "deep/a/b", "deep/a/b/f"] {
        let m = std::fs::symlink_metadata(top.join(d)).expect("copied");
        assert_eq!(
            (
                std::os::unix::fs::MetadataExt::uid(&m),
                std::os::unix::fs::MetadataExt::gid(&m)
            ),
            (1000, 1000),
            "{d}"
        );
    }

    // Modes come through whole: bits a umask would take away (files are made with their
    // mode, and fixed up only where the made file differs), set-id bits (after the
    // owner, which a chown clears them for), with and without --chown.
    {
        use std::os::unix::fs::PermissionsExt;
        let modes = ctx.join("modes");
        const MODES: [(&str, u32); 5] = [
            ("m666", 0o666),
            ("m777", 0o777),
            ("m6755", 0o6755),
            ("m1644", 0o1644),
            ("m0400", 0o400),
        ];
        std::fs::create_dir_all(&modes).expect("modes");
        for (name, mode) in MODES {
            let p = modes.join(name);
            std::fs::write(&p, name.as_bytes()).expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
        }
        // The test's umask takes group and other write bits from a plain create: m666 and
        // m777 need their mode set again (shown here, or the case would prove nothing).
        let umask = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|st| {
                st.lines()
                    .find_map(|l| l.strip_prefix("Umask:"))
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
            .expect("the umask in /proc/self/status");
        assert_eq!(
            umask & 0o022,
            0o022,
            "umask {umask:o} keeps group/other write"
        );
        // A set-group-ID destination directory (group 50) gives new files its group:
        // COPY still makes them root's, as BuildKit does.
        let sgid = "FROM busybox\nRUN mkdir /sgid && chown 0:50 /sgid && chmod 2775 /sgid \
                    && touch /sgid/probe\nCOPY modes /sgid/\n";
        for (df, dir, owner) in [
            ("FROM busybox\nCOPY modes /kept/\n", "kept", (0, 0)),
            (
                "FROM busybox\nCOPY --chown=app modes /owned/\n",
                "owned",
                (1000, 1000),
            ),
            (sgid, "sgid", (0, 0)),
        ] {
            let (id, log) = run_build_with(&e, df, &ctx, |_| {});
            id.unwrap_or_else(|err| panic!("{err}\n{log}"));
            let top = top_layer(&e);
            if dir == "sgid" {
                // The directory does what the case needs: a file made in it plainly
                // (by the RUN) got its group.
                let img = e.store.resolve("built:1").expect("img");
                let probe = img
                    .layers
                    .iter()
                    .map(|l| layer_files(&e, l).join("sgid/probe"))
                    .find(|p| p.exists())
                    .unwrap_or_else(|| panic!("no layer of {:?} holds sgid/probe", img.layers));
                let m = std::fs::symlink_metadata(&probe).expect("probe");
                assert_eq!(
                    std::os::unix::fs::MetadataExt::gid(&m),
                    50,
                    "the probe's group"
                );
            }
            for (name, mode) in MODES {
                let m = std::fs::symlink_metadata(top.join(dir).join(name)).expect("copied");
                assert_eq!(m.permissions().mode() & 0o7777, mode, "{dir}/{name}");
                assert_eq!(
                    (
                        std::os::unix::fs::MetadataExt::uid(&m),
                        std::os::unix::fs::MetadataExt::gid(&m)
                    ),
                    owner,
                    "{dir}/{name}"
                );
                assert_eq!(
                    std::fs::read(top.join(dir).join(name)).expect("read"),
                    name.as_bytes()
                );
            }
        }
        std::fs::remove_dir_all(&modes).expect("rm modes");
    }

    // --chmod sets the mode; ADD refuses remote URLs with the manual's reason.
    let (id, log) = run_build_with(
        &e,
        "FROM busybox\nCOPY --chmod=0600 f /modes/f\n",
        &ctx,
        |_| {},
    );
    id.unwrap_or_else(|err| panic!("{err}\n{log}"));
    let top = top_layer(&e);
    let m = std::fs::metadata(top.join("modes/f")).expect("f");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777,
        0o600
    );
    let (r, _) = run_build_with(&e, "FROM busybox\nCOPY --chmod=9 f /x\n", &ctx, |_| {});
    assert!(r.expect_err("bad mode").contains("invalid --chmod"));
    let (r, _) = run_build_with(
        &e,
        "FROM busybox\nADD https://example.com/x.tar.gz /x/\n",
        &ctx,
        |_| {},
    );
    // A builder given no HTTP client says so (the daemon's downloads: add_remote.rs).
    assert!(r.expect_err("remote ADD").contains("no HTTP client"));

    // --cap-add: CAP_SYS_ADMIN (bit 21) is effective only when asked for.
    let df = "FROM busybox\nRUN grep CapEff /proc/self/status\n";
    let cap_eff = |log: &str| -> u64 {
        let hex = log
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .expect("CapEff line")
            .trim()
            .to_string();
        u64::from_str_radix(&hex, 16).expect("hex")
    };
    let (_, log) = run_build_with(&e, df, &ctx, |_| {});
    assert_eq!(cap_eff(&log) & (1 << 21), 0, "{log}");
    let (_, log) = run_build_with(&e, df, &ctx, |o| o.cap_add = vec!["CAP_SYS_ADMIN".into()]);
    assert_ne!(cap_eff(&log) & (1 << 21), 0, "{log}");
}

#[test]
fn a_failed_pull_keeps_its_kind() {
    if !ready() {
        return;
    }
    let e = env();
    let ctx_dir = e.dir.path().join("ctx-pull");
    std::fs::create_dir_all(&ctx_dir).expect("ctx");
    for (dockerfile, kind) in [
        ("FROM missing:1\n", isula_store::ErrorKind::NotFound),
        (
            "FROM busybox\nCOPY --from=down:1 /x /x\n",
            isula_store::ErrorKind::Unavailable,
        ),
    ] {
        let puller =
            |name: &str, _: &isula_types::platform::BuildPlatform, _: &mut dyn FnMut(String)| {
                Err(isula_builder_core::PullFailure {
                    kind: if name.starts_with("missing") {
                        isula_store::ErrorKind::NotFound
                    } else {
                        isula_store::ErrorKind::Unavailable
                    },
                    message: format!("pulling {name} failed"),
                })
            };
        let opts = BuildOptions {
            build_id: "pull".into(),
            dockerfile: dockerfile.into(),
            context: ctx_dir.clone(),
            work_dir: e.dir.path().join("work-pull"),
            ..Default::default()
        };
        let mut sink = |_: String| {};
        let mut ctx = Context {
            store: &e.store,
            runc: &e.runc,
            cancel: Arc::new(AtomicBool::new(false)),
            log: &mut sink,
            pull: Some(&puller),
            remote: None,
            ssh: None,
            download: None,
        };
        let err = build(&mut ctx, &opts).expect_err("the pull fails");
        assert_eq!(err.kind(), kind, "{dockerfile}: {err}");
        assert!(err.to_string().contains("failed"), "{err}");
    }
}

/// A runtime that records what it is asked to run, writes a marker into the rootfs (so the
/// step has changes to keep), and exits with the code its command names (`exit N`).
#[derive(Default)]
struct Recorder {
    runs: std::sync::Mutex<Vec<isula_runtime::Process>>,
}

impl isula_runtime::Runtime for Recorder {
    fn run(
        &self,
        _bundle: &Path,
        rootfs: &Path,
        process: &isula_runtime::Process,
        _cancel: &isula_runtime::CancelFlag,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<i32, isula_runtime::RuntimeError> {
        let mut runs = self.runs.lock().expect("lock");
        runs.push(process.clone());
        std::fs::write(rootfs.join(format!("ran-{}", runs.len())), "x").expect("marker");
        output(b"recorded\n");
        let last = process.args.last().cloned().unwrap_or_default();
        Ok(last
            .strip_prefix("exit ")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }
}

#[test]
fn run_steps_reach_the_runtime_as_docker_gives_them() {
    if !ready() {
        return;
    }
    let e = env();
    let ctx = e.dir.path().join("ctx-runtime");
    std::fs::create_dir_all(&ctx).expect("ctx");
    let rec = Recorder::default();
    let build_with = |dockerfile: &str, args: &[(&str, &str)]| {
        let opts = BuildOptions {
            build_id: "runtime".into(),
            dockerfile: dockerfile.into(),
            context: ctx.clone(),
            work_dir: e.dir.path().join("work-runtime"),
            build_args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cap_add: vec!["CAP_NET_ADMIN".into()],
            ..Default::default()
        };
        let mut log = String::new();
        let mut sink = |l: String| log.push_str(&l);
        let mut c = Context {
            store: &e.store,
            runc: &rec,
            cancel: Arc::new(AtomicBool::new(false)),
            log: &mut sink,
            pull: None,
            remote: None,
            ssh: None,
            download: None,
        };
        let r = build(&mut c, &opts).map(|b| b.id);
        (r, log)
    };
    let df = "FROM busybox\nARG A=1\nENV E=2\nUSER app\nWORKDIR /w\nRUN echo $A $E\nRUN [\"/bin/echo\", \"exec\"]\n";
    let (r, log) = build_with(df, &[("http_proxy", "http://proxy:1")]);
    r.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert!(log.contains("recorded\n"), "{log}");
    {
        let runs = rec.runs.lock().expect("lock");
        assert_eq!(runs.len(), 2);
        let p = &runs[0];
        assert_eq!(p.args, ["/bin/sh", "-c", "echo $A $E"]);
        assert_eq!((p.uid, p.gid), (1000, 1000));
        assert_eq!(p.cwd, "/w");
        assert_eq!(p.cap_add, ["CAP_NET_ADMIN"]);
        for want in ["E=2", "A=1", "http_proxy=http://proxy:1"] {
            assert!(p.env.iter().any(|v| v == want), "{want} in {:?}", p.env);
        }
        assert!(p.env.iter().any(|v| v.starts_with("PATH=")), "{:?}", p.env);
        assert_eq!(runs[1].args, ["/bin/echo", "exec"]);
    }
    // Another proxy changes no key: nothing runs again.
    let (r, log) = build_with(df, &[("http_proxy", "http://other:2")]);
    r.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert_eq!(rec.runs.lock().expect("lock").len(), 2, "{log}");
    // A changed build arg that a RUN uses runs it (and what follows) again.
    let (r, log) = build_with(df, &[("A", "9")]);
    r.unwrap_or_else(|err| panic!("{err}\n{log}"));
    assert_eq!(rec.runs.lock().expect("lock").len(), 4, "{log}");
    // A non-zero exit is the step's error, with its number and line.
    let (r, _) = build_with("FROM busybox\nRUN true\nRUN exit 7\n", &[]);
    let err = r.expect_err("exit 7");
    assert!(
        err.to_string().contains("STEP 3 (line 3) RUN exit 7") && err.to_string().contains("7"),
        "{err}"
    );
}
