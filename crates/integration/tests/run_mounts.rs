//! `RUN --mount` end to end, with real runc (the layer contents beside BuildKit's are in the
//! differential corpus: `testdata/diff/run-mount-*`): cache mounts kept across builds and
//! restarts and never in a layer, their sharing modes, what enters a step's cache key, and
//! bad mounts refused naming the line with nothing left.

use isula_integration::*;
use std::process::Stdio;

fn daemon() -> Daemon {
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    d
}

fn build(d: &Daemon, ctx: &std::path::Path, extra: &[&str]) -> String {
    let mut args = vec!["ctr-img", "build"];
    args.extend_from_slice(extra);
    args.push(ctx.to_str().expect("ctx"));
    d.ok(&args)
}

/// Every entry of every layer of a saved image, as `path` → content.
fn layer_files(d: &Daemon, image: &str) -> Vec<(String, Vec<u8>)> {
    d.layer_entries(image)
        .0
        .into_iter()
        .map(|e| (e.path, e.content))
        .collect()
}

#[test]
fn cache_mounts_persist_across_builds_and_restarts_and_stay_out_of_images() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let mut d = daemon();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN --mount=type=cache,target=/root/.cache echo run-marker-7 >> /root/.cache/log && wc -l < /root/.cache/log > /runs\n",
    )
    .expect("df");
    build(&d, ctx.path(), &["-t", "c:1"]);
    // --no-cache runs the step again: the cache mount still holds the first run's line.
    build(&d, ctx.path(), &["--no-cache", "-t", "c:2"]);
    d.stop();
    d.restart();
    build(&d, ctx.path(), &["--no-cache", "-t", "c:3"]);
    let runs = |image: &str| {
        layer_files(&d, image)
            .into_iter()
            .find(|(p, _)| p == "runs")
            .map(|(_, c)| String::from_utf8_lossy(&c).trim().to_string())
    };
    assert_eq!(runs("c:1").as_deref(), Some("1"));
    assert_eq!(runs("c:2").as_deref(), Some("2"));
    assert_eq!(runs("c:3").as_deref(), Some("3"), "lost across a restart");
    // The cache's content is in no layer; the mount point is, as BuildKit leaves it.
    let files = layer_files(&d, "c:3");
    assert!(files.iter().any(|(p, _)| p == "root/.cache"), "{files:?}");
    assert!(
        !files
            .iter()
            .any(|(p, c)| p.ends_with("log") || String::from_utf8_lossy(c).contains("run-marker-7")),
        "the cache's content reached a layer"
    );
    // A cached build does not run the step (the cache mount's content is not in the key).
    let out = build(&d, ctx.path(), &["-t", "c:4"]);
    assert_eq!(cached_steps(&out).len(), 1, "{out}");
    assert!(d.data().join("cache-mounts").is_dir());
    // `builder du` shows the cache mount; `builder prune` frees it, and the next run of
    // the step starts from an empty one.
    let du = d.ok(&["builder", "du", "--verbose"]);
    assert!(du.contains("cache mount id=/root/.cache"), "{du}");
    let pruned = d.ok(&["builder", "prune", "-f"]);
    // Its key is the hash of its id.
    let key = sha256_hex(b"/root/.cache");
    assert!(pruned.contains(&key[..12]), "{pruned}");
    assert_eq!(
        std::fs::read_dir(d.data().join("cache-mounts"))
            .map(|r| r.count())
            .unwrap_or(0),
        0
    );
    let du = d.ok(&["builder", "du", "--verbose"]);
    assert!(!du.contains("cache mount"), "{du}");
    build(&d, ctx.path(), &["--no-cache", "-t", "c:5"]);
    assert_eq!(
        runs("c:5").as_deref(),
        Some("1"),
        "the pruned cache came back"
    );
    d.stop_and_check_store();
}

#[test]
fn a_bind_mount_keys_on_what_it_shows() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = daemon();
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::create_dir(ctx.path().join("src")).expect("src");
    std::fs::write(ctx.path().join("src/main.txt"), "v1\n").expect("src");
    std::fs::write(ctx.path().join("other.txt"), "a\n").expect("other");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nRUN --mount=source=src,target=/src cat /src/main.txt > /built\n",
    )
    .expect("df");
    build(&d, ctx.path(), &["-t", "b:1"]);
    // A file outside the mounted source changes nothing.
    std::fs::write(ctx.path().join("other.txt"), "b\n").expect("other");
    let out = build(&d, ctx.path(), &["-t", "b:2"]);
    assert_eq!(cached_steps(&out).len(), 1, "{out}");
    // One inside it runs the step again, which sees the new content.
    std::fs::write(ctx.path().join("src/main.txt"), "v2\n").expect("src");
    let out = build(&d, ctx.path(), &["-t", "b:3"]);
    assert!(cached_steps(&out).is_empty(), "{out}");
    let built = layer_files(&d, "b:3")
        .into_iter()
        .find(|(p, _)| p == "built")
        .map(|(_, c)| c);
    assert_eq!(built.as_deref(), Some(&b"v2\n"[..]));
}

/// Two builds at once on one cache mount: `locked` ones take turns (no interleaving);
/// a `private` one that finds it in use gets its own (the kept cache sees one run).
#[test]
fn cache_mount_sharing_modes() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = daemon();
    let work = tempfile::tempdir().expect("tmp");
    for (sharing, check) in [
        ("locked", "start\nend\nstart\nend\n"),
        ("private", "start\nend\n"),
    ] {
        let mut children = Vec::new();
        for i in 0..2 {
            let ctx = work.path().join(format!("{sharing}-{i}"));
            std::fs::create_dir_all(&ctx).expect("ctx");
            std::fs::write(
                ctx.join("Dockerfile"),
                format!(
                    "FROM busybox\nRUN --mount=type=cache,id={sharing},target=/c,sharing={sharing} \
                     echo start >> /c/log && sleep 2 && echo end >> /c/log && echo {i} > /which\n"
                ),
            )
            .expect("df");
            children.push(
                d.cli_command(&["ctr-img", "build", ctx.to_str().expect("ctx")])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("client"),
            );
        }
        for c in children {
            let o = c.wait_with_output().expect("wait");
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        }
        // What the kept cache holds, read by a third build.
        let ctx = work.path().join(format!("{sharing}-read"));
        std::fs::create_dir_all(&ctx).expect("ctx");
        std::fs::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM busybox\nRUN --mount=type=cache,id={sharing},target=/c cat /c/log > /log\n"
            ),
        )
        .expect("df");
        build(&d, &ctx, &["-t", &format!("{sharing}:read")]);
        let log = layer_files(&d, &format!("{sharing}:read"))
            .into_iter()
            .find(|(p, _)| p == "log")
            .map(|(_, c)| String::from_utf8_lossy(&c).to_string());
        assert_eq!(log.as_deref(), Some(check), "sharing={sharing}");
    }
}

#[test]
fn bad_mounts_fail_naming_the_line_and_leave_nothing() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = daemon();
    let ctx = tempfile::tempdir().expect("ctx");
    for (mount, want) in [
        ("type=cache,target=/x,id=../up", "plain name"),
        // Not a stage: an image, pulled (here from a port nothing listens on).
        (
            "type=bind,target=/x,from=127.0.0.1:1/nosuchstage",
            "nosuchstage",
        ),
        ("type=bind,target=/x,from=later", "later one"),
        ("type=bind,target=/x,source=missing-dir", "missing-dir"),
        ("type=volume,target=/x", "unsupported mount type"),
        ("type=cache", "requires a target"),
        ("type=cache,target=$EMPTY", "requires a target"),
        ("type=tmpfs,target=/", "cannot mount over the root"),
        ("type=secret,id=tok,required", "secret tok is required"),
    ] {
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!(
                "FROM busybox AS first\nARG EMPTY=\nRUN --mount={mount} true\nFROM busybox AS later\n"
            ),
        )
        .expect("df");
        let before = d.images();
        let t = std::time::Instant::now();
        let err = d.fails(&[
            "ctr-img",
            "build",
            "--target",
            "first",
            ctx.path().to_str().expect("ctx"),
        ]);
        eprintln!("{mount}: {:?}: {err}", t.elapsed());
        assert!(
            err.contains(want) && err.contains("line 3"),
            "{mount}: {err}"
        );
        assert_eq!(d.images(), before, "{mount}: the images changed");
        for sub in ["tmp", "ingest"] {
            assert!(
                std::fs::read_dir(d.data().join(sub))
                    .map(|r| r.count())
                    .unwrap_or(0)
                    == 0,
                "{mount}: {sub} left"
            );
        }
        d.assert_no_build_work(mount);
    }
}
