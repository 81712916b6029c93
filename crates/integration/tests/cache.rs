//! The build cache against the real daemon, runc and overlayfs: which steps hit and which
//! miss as inputs change, that a cached build gives the image a build without the cache
//! gives, and that the cache survives restarts, SIGKILL, image removal and its size cap.

use isula_integration::*;
use std::path::{Path, PathBuf};

fn daemon_with_busybox(config: &[(&str, &str)]) -> Daemon {
    let d = Daemon::start_configured(config, &[], &[]);
    d.import_busybox("busybox:latest", &[]);
    d
}

fn steps(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_prefix("STEP "))
        .map(|rest| {
            rest.split_once(": ")
                .map(|(_, s)| s)
                .unwrap_or(rest)
                .to_string()
        })
        .collect()
}

struct Ctx {
    dir: PathBuf,
}

impl Ctx {
    fn new(d: &Daemon, dockerfile: &str, files: &[(&str, &str)]) -> Ctx {
        let dir = d.dir.path().join("ctx");
        std::fs::create_dir_all(&dir).expect("ctx");
        std::fs::write(dir.join("Dockerfile"), dockerfile).expect("Dockerfile");
        let c = Ctx { dir };
        for (name, text) in files {
            c.write(name, text);
        }
        c
    }

    fn write(&self, name: &str, text: &str) {
        let p = self.dir.join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    fn path(&self) -> &str {
        self.dir.to_str().expect("path")
    }
}

fn build(d: &Daemon, ctx: &Ctx, extra: &[&str]) -> (String, String) {
    let mut args = vec!["ctr-img", "build"];
    args.extend_from_slice(extra);
    args.push(ctx.path());
    let out = d.ok(&args);
    (build_id(&out), out)
}

const DOCKERFILE: &str = "FROM busybox\n\
ARG V=1\n\
ENV A=1\n\
COPY a.txt /a.txt\n\
RUN echo run-$V > /r\n\
COPY dir/ /dir/\n\
WORKDIR /w\n\
RUN cat /a.txt /dir/x > /w/copy\n";

const AFTER_FROM: [&str; 7] = [
    "ARG V=1",
    "ENV A=1",
    "COPY a.txt /a.txt",
    "RUN echo run-$V > /r",
    "COPY dir/ /dir/",
    "WORKDIR /w",
    "RUN cat /a.txt /dir/x > /w/copy",
];

fn expect_hits(out: &str, upto: usize) {
    let want: Vec<String> = AFTER_FROM[..upto].iter().map(|s| s.to_string()).collect();
    assert_eq!(cached_steps(out), want, "{out}");
    assert_eq!(steps(out).len(), AFTER_FROM.len() + 1, "{out}");
}

#[test]
fn steps_hit_until_their_input_changes() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox(&[]);
    let ctx = Ctx::new(
        &d,
        DOCKERFILE,
        &[
            ("a.txt", "a"),
            ("dir/x", "x"),
            ("unused", "u"),
            ("dir/ignored.log", "i"),
            (".dockerignore", "**/*.log\n"),
        ],
    );
    let (first, out) = build(&d, &ctx, &[]);
    assert!(cached_steps(&out).is_empty(), "{out}");

    // Unchanged: every step hits and the image is the same one.
    let (id, out) = build(&d, &ctx, &[]);
    expect_hits(&out, 7);
    assert_eq!(id, first, "a full hit gives the image it reuses");

    // Files no step selects, and ignored ones, change nothing.
    ctx.write("unused", "changed");
    ctx.write("dir/ignored.log", "changed");
    let (id, out) = build(&d, &ctx, &[]);
    expect_hits(&out, 7);
    assert_eq!(id, first);

    // A build arg enters only the steps that use it (the RUN sees it in its environment).
    let (_, out) = build(&d, &ctx, &["--build-arg", "V=2"]);
    expect_hits(&out, 3);
    assert!(out.contains("Using cache") && !out.contains("STEP  5: RUN echo run-$V > /r\nUsing"));

    // A change in the second COPY's sources: the steps before it hit, it and later miss.
    ctx.write("dir/x", "x2");
    let (second, out) = build(&d, &ctx, &[]);
    expect_hits(&out, 4);
    assert_ne!(second, first);

    // The first COPY's source: from there on.
    ctx.write("a.txt", "a2");
    let (_, out) = build(&d, &ctx, &[]);
    expect_hits(&out, 2);

    // Back to an earlier content: that build's steps hit again.
    ctx.write("a.txt", "a");
    ctx.write("dir/x", "x");
    let (id, out) = build(&d, &ctx, &[]);
    expect_hits(&out, 7);
    assert_eq!(id, first);

    // --no-cache runs everything.
    let (_, out) = build(&d, &ctx, &["--no-cache"]);
    assert!(cached_steps(&out).is_empty(), "{out}");
    assert!(d.ok(&["ctr-img", "build", "--help"]).contains("--no-cache"));
    let info = d.ok(&["info", "-H"]);
    let line = info
        .lines()
        .find(|l| l.trim_start().starts_with("Build Cache:"))
        .unwrap_or_else(|| panic!("{info}"));
    assert!(!line.contains("(0 steps)"), "{line}");
}

fn save(d: &Daemon, id: &str, name: &str) -> Vec<u8> {
    let out = d.dir.path().join(name);
    let _ = std::fs::remove_file(&out);
    d.ok(&["ctr-img", "save", id, "-o", out.to_str().expect("path")]);
    std::fs::read(&out).expect("archive")
}

#[test]
fn cached_and_uncached_builds_give_byte_identical_archives() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox(&[]);
    let df = "FROM busybox AS tools\nRUN mkdir -p /out && echo tool > /out/tool\n\
FROM busybox\nCOPY a.txt /a.txt\nRUN rm /bin/vi && echo made > /made && rm -f /made2\n\
COPY --from=tools /out /opt/\nRUN echo $(cat /a.txt) > /final && touch /tmpfile && rm /tmpfile\n";
    let ctx = Ctx::new(&d, df, &[("a.txt", "one")]);
    let stat = "--build-static=build-time=2020-05-23 10:55:33";
    let (a, _) = build(&d, &ctx, &[stat]);
    let (b, out) = build(&d, &ctx, &[stat]);
    assert_eq!(a, b);
    assert_eq!(cached_steps(&out).len(), 5, "{out}");
    // A partial hit (the COPY changed) against a build that uses no cache at all.
    ctx.write("a.txt", "two");
    let (partial, out) = build(&d, &ctx, &[stat]);
    assert_eq!(
        cached_steps(&out).len(),
        1,
        "only the tools stage's RUN: {out}"
    );
    let partial_archive = save(&d, &partial, "partial.tar");
    d.ok(&["ctr-img", "rm", &partial]);
    let (fresh, out) = build(&d, &ctx, &[stat, "--no-cache"]);
    assert!(cached_steps(&out).is_empty());
    assert_eq!(fresh, partial, "the cache changed the image");
    assert_eq!(
        save(&d, &fresh, "fresh.tar"),
        partial_archive,
        "archives differ"
    );
}

#[test]
fn the_cache_survives_restarts_kills_and_image_removal() {
    if !require_root() {
        return;
    }
    let mut d = daemon_with_busybox(&[]);
    let ctx = Ctx::new(
        &d,
        "FROM busybox\nCOPY a.txt /a\nRUN cp /a /b\n",
        &[("a.txt", "a")],
    );
    let (first, _) = build(&d, &ctx, &["--tag", "app:1"]);
    assert_eq!(d.stop(), Some(0));
    d.restart();
    let (id, out) = build(&d, &ctx, &[]);
    assert_eq!(id, first);
    assert_eq!(cached_steps(&out).len(), 2, "{out}");

    // Removing the image keeps the cache whole; the cache keeps nothing the image needed.
    d.ok(&["ctr-img", "rm", "app:1"]);
    assert!(d
        .images()
        .iter()
        .all(|(_, _, i)| !first.starts_with(i.as_str())));
    let (id, out) = build(&d, &ctx, &["--tag", "app:1"]);
    assert_eq!(id, first);
    assert_eq!(cached_steps(&out).len(), 2, "{out}");

    // SIGKILL in the middle of a step: the next daemon drops what was half made, and the
    // rebuild is right.
    ctx.write("a.txt", "b");
    std::fs::write(
        ctx.dir.join("Dockerfile"),
        "FROM busybox\nCOPY a.txt /a\nRUN cp /a /b && sleep 30\n",
    )
    .expect("Dockerfile");
    let mut client = d
        .cli_command(&["ctr-img", "build", ctx.path()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("client");
    let runc_root = d.run_root().join("runc");
    wait_until(
        "the RUN to start",
        std::time::Duration::from_secs(30),
        || !runc_containers(&runc_root).is_empty(),
    );
    d.kill();
    let _ = client.wait();
    for c in runc_containers(&runc_root) {
        let _ = std::process::Command::new("runc")
            .arg("--root")
            .arg(&runc_root)
            .args(["delete", "-f", &c])
            .output();
    }
    d.restart();
    std::fs::write(
        ctx.dir.join("Dockerfile"),
        "FROM busybox\nCOPY a.txt /a\nRUN cp /a /b\n",
    )
    .expect("Dockerfile");
    let (second, out) = build(&d, &ctx, &["--tag", "app:2"]);
    assert_ne!(second, first);
    // The COPY ran before the kill but its record was never made durable: it runs again.
    assert!(cached_steps(&out).len() <= 1, "{out}");
    let (again, out) = build(&d, &ctx, &[]);
    assert_eq!(again, second);
    assert_eq!(cached_steps(&out).len(), 2, "{out}");
    d.stop_and_check_store();
}

#[test]
fn a_small_cap_evicts_and_a_disabled_cache_records_nothing() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox(&[("configuration.toml", "build_cache_max_size = \"1\"\n")]);
    let ctx = Ctx::new(&d, "FROM busybox\nRUN echo hi > /hi\n", &[]);
    build(&d, &ctx, &[]);
    let (_, out) = build(&d, &ctx, &[]);
    assert!(
        cached_steps(&out).is_empty(),
        "a 1-byte cap keeps nothing: {out}"
    );
    assert!(cache_snapshots(&d.data()).is_empty());

    let off = daemon_with_busybox(&[("configuration.toml", "build_cache = false\n")]);
    let ctx = Ctx::new(&off, "FROM busybox\nRUN echo hi > /hi\n", &[]);
    build(&off, &ctx, &[]);
    let (_, out) = build(&off, &ctx, &[]);
    assert!(cached_steps(&out).is_empty(), "{out}");
    assert!(cache_snapshots(&off.data()).is_empty());
}

fn cache_snapshots(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("cache/snapshots"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The DESCRIPTION column of `builder du`.
fn du_descriptions(d: &Daemon) -> Vec<String> {
    let out = d.ok(&["builder", "du"]);
    out.lines()
        .filter(|l| !l.starts_with("---") && !l.starts_with("ID "))
        .filter(|l| l.len() > 14 && l.as_bytes()[..12].iter().all(u8::is_ascii_hexdigit))
        .map(|l| {
            // ID, RECLAIMABLE, SIZE (two words), LAST ACCESSED (free text), DESCRIPTION:
            // the description starts at its column.
            let header = out.lines().find(|h| h.starts_with("ID ")).expect("header");
            let col = header.find("DESCRIPTION").expect("column");
            l.get(col..).unwrap_or("").to_string()
        })
        .collect()
}

fn du_total_records(d: &Daemon) -> usize {
    let out = d.ok(&["builder", "du"]);
    out.lines()
        .find_map(|l| l.strip_prefix("Records:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no record count in {out}"))
}

#[test]
fn builder_du_shows_and_prune_frees_the_cache() {
    if !require_root() {
        return;
    }
    let mut d = daemon_with_busybox(&[]);
    let kept_df = "FROM busybox\nCOPY a.txt /a\nRUN cp /a /b\n";
    let ctx = Ctx::new(&d, kept_df, &[("a.txt", "a")]);
    let (kept, _) = build(&d, &ctx, &["--tag", "kept:1"]);
    let gone_df = "FROM busybox\nRUN echo other > /o\n";
    std::fs::write(ctx.dir.join("Dockerfile"), gone_df).expect("Dockerfile");
    build(&d, &ctx, &["--tag", "gone:1"]);
    d.ok(&["ctr-img", "rm", "gone:1"]);

    let listed = du_descriptions(&d);
    for want in ["COPY a.txt /a", "RUN cp /a /b", "RUN echo other > /o"] {
        assert!(listed.iter().any(|l| l == want), "{want} in {listed:?}");
    }
    let before = du_total_records(&d);
    let du = d.ok(&["builder", "du"]);
    assert!(du.contains("Reclaimable:") && du.contains("Total:"), "{du}");
    let verbose = d.ok(&["builder", "du", "--verbose"]);
    assert!(
        verbose.contains("Parent:") && verbose.contains("sha256:"),
        "{verbose}"
    );

    // Without --force and with no one to say yes, nothing goes.
    let err = d.fails(&["builder", "prune"]);
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(du_total_records(&d), before);
    let err = d.fails(&["builder", "prune", "-f", "--keep-storage", "lots"]);
    assert!(err.contains("lots"), "{err}");

    // Dangling only: the removed image's steps go, the kept image's stay.
    let out = d.ok(&["builder", "prune", "-f"]);
    assert!(out.contains("Deleted build cache objects:"), "{out}");
    assert!(out.contains("Total reclaimed space:"), "{out}");
    let listed = du_descriptions(&d);
    assert!(
        !listed.iter().any(|l| l.contains("echo other")),
        "{listed:?}"
    );
    assert!(listed.iter().any(|l| l == "RUN cp /a /b"), "{listed:?}");
    let (again, out) = build(&d, &ctx, &[]);
    assert!(cached_steps(&out).is_empty(), "pruned steps ran: {out}");
    d.ok(&["ctr-img", "rm", &again]);
    std::fs::write(ctx.dir.join("Dockerfile"), kept_df).expect("Dockerfile");
    let (id, out) = build(&d, &ctx, &[]);
    assert_eq!(id, kept);
    assert_eq!(cached_steps(&out).len(), 2, "kept steps were pruned: {out}");

    // A cap above what the cache holds takes nothing, even with --all.
    let out = d.ok(&["builder", "prune", "-f", "-a", "--keep-storage", "10GB"]);
    assert_eq!(out, "Total reclaimed space: 0 B\n");
    // --all takes everything; the image it came from stays whole.
    let out = d.ok(&["builder", "prune", "--all", "--force"]);
    assert!(out.contains("Deleted build cache objects:"), "{out}");
    assert_eq!(du_total_records(&d), 0);
    assert!(cache_snapshots(&d.data()).is_empty());
    let context_records = std::fs::read_dir(d.data().join("cache/context"))
        .expect("context records")
        .count();
    assert_eq!(context_records, 0, "prune --all keeps context records");
    save(&d, &kept, "kept.tar");
    let (_, out) = build(&d, &ctx, &[]);
    assert!(cached_steps(&out).is_empty(), "{out}");
    d.stop_and_check_store();
}

#[test]
fn a_base_with_127_layers_builds_and_rebuilds_from_the_cache() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox(&[]);
    // Layer 0: busybox. Layers 1..=126: each adds /l/NNN and rewrites /l/top; layer 100
    // deletes /l/050 (a whiteout) so the order of the lower layers shows.
    let mut layers = vec![busybox_rootfs(&[])];
    for i in 1..=126u32 {
        let own = format!("l/{i:03}");
        let n = i.to_string();
        let mut files: Vec<(&str, &[u8])> =
            vec![(own.as_str(), n.as_bytes()), ("l/top", n.as_bytes())];
        if i == 100 {
            files.push(("l/.wh.050", b""));
        }
        layers.push(files_tar(&files));
    }
    assert_eq!(layers.len(), 127);
    let archive = d.dir.path().join("deep.tar");
    std::fs::write(&archive, docker_archive(&layers, "deep:1")).expect("archive");
    d.ok(&["ctr-img", "load", "-i", archive.to_str().expect("path")]);

    let ctx = Ctx::new(
        &d,
        "FROM deep:1\n\
         RUN test \"$(ls /l | wc -l)\" = 126 && test ! -e /l/050 && test \"$(cat /l/top)\" = 126\n\
         COPY a.txt /a\n\
         RUN cat /a /l/001 > /b\n\
         WORKDIR /w\n\
         RUN echo more > /w/more\n\
         FROM busybox\n\
         COPY --from=0 /l/ /l/\n\
         COPY --from=deep:1 /l/126 /126\n\
         RUN test \"$(cat /l/top)\" = 126 && test ! -e /l/050 && cat /126\n",
        &[("a.txt", "a")],
    );
    let (first, out) = build(&d, &ctx, &["--tag", "deeper:1"]);
    assert!(cached_steps(&out).is_empty(), "{out}");
    let (again, out) = build(&d, &ctx, &[]);
    assert_eq!(again, first);
    assert_eq!(cached_steps(&out).len(), 8, "{out}");
    // A stage of 128 layers as the base of the next.
    std::fs::write(
        ctx.dir.join("Dockerfile"),
        "FROM deep:1 AS base\nRUN echo x > /x\nFROM base\nRUN cat /x && cat /l/top\n",
    )
    .expect("Dockerfile");
    let (_, out) = build(&d, &ctx, &[]);
    assert!(out.lines().any(|l| l == "x"), "{out}");
    assert!(out.lines().any(|l| l == "126"), "{out}");
    let saved = save(&d, &first, "deep-built.tar");
    assert!(!saved.is_empty());
}

/// The inode of `rel` in each COPY snapshot that has it.
fn snapshot_inodes(data: &Path, rel: &str) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt;
    cache_snapshots(data)
        .iter()
        .filter_map(|id| {
            std::fs::symlink_metadata(data.join("cache/snapshots").join(id).join("diff").join(rel))
                .ok()
                .map(|m| m.ino())
        })
        .collect()
}

#[test]
fn a_copy_with_one_file_changed_links_the_others_and_gives_the_full_copy_image() {
    if !require_root() {
        return;
    }
    let base = |d: &Daemon| d.load_fixed_busybox("base:1");
    let d = Daemon::start();
    base(&d);
    let df =
        "FROM base:1\nCOPY . /app/\nRUN cat /app/d/one /app/d/two && stat -c %a /app/d/three\n";
    let ctx = Ctx::new(
        &d,
        df,
        &[
            ("d/one", "1\n"),
            ("d/two", "2\n"),
            ("d/three", "3\n"),
            ("sub/deep/x", "x\n"),
        ],
    );
    let stat = "--build-static=build-time=2024-01-02 03:04:05";
    build(&d, &ctx, &[stat]);
    ctx.write("d/one", "one changed\n");
    std::fs::set_permissions(
        ctx.dir.join("d/three"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .expect("chmod");
    let (id, out) = build(&d, &ctx, &[stat]);
    assert!(out.lines().any(|l| l == "one changed"), "{out}");
    assert!(out.lines().any(|l| l == "600"), "{out}");
    // Unchanged files are one inode in both versions; changed ones are not.
    let two = snapshot_inodes(&d.data(), "app/d/two");
    assert_eq!(two.len(), 2, "{two:?}");
    assert_eq!(two[0], two[1], "app/d/two was copied again");
    let deep = snapshot_inodes(&d.data(), "app/sub/deep/x");
    assert_eq!(deep.len(), 2);
    assert_eq!(deep[0], deep[1]);
    for changed in ["app/d/one", "app/d/three"] {
        let i = snapshot_inodes(&d.data(), changed);
        assert_eq!(i.len(), 2, "{changed}");
        assert_ne!(i[0], i[1], "{changed} was linked though it changed");
    }
    // --no-cache reuses nothing: with the recorded file damaged behind our back (same
    // size), its RUN still reads what the context holds.
    let snap = cache_snapshots(&d.data())
        .into_iter()
        .map(|s| {
            d.data()
                .join("cache/snapshots")
                .join(s)
                .join("diff/app/d/two")
        })
        .find(|p| p.exists())
        .expect("a snapshot with app/d/two");
    std::fs::write(&snap, "X\n").expect("damage");
    let (_, out) = build(&d, &ctx, &[stat, "--no-cache"]);
    assert!(
        out.lines().any(|l| l == "2"),
        "--no-cache used a recorded file: {out}"
    );
    assert!(!out.lines().any(|l| l == "X"), "{out}");
    std::fs::write(&snap, "2\n").expect("repair");
    // The image is the one a full copy makes (a daemon without a cache copies everything).
    let off =
        Daemon::start_configured(&[("configuration.toml", "build_cache = false\n")], &[], &[]);
    base(&off);
    let ctx_off = Ctx::new(&off, df, &[]);
    for f in ["d/one", "d/two", "d/three", "sub/deep/x"] {
        std::fs::create_dir_all(ctx_off.dir.join(f).parent().expect("parent")).expect("mkdir");
        std::fs::copy(ctx.dir.join(f), ctx_off.dir.join(f)).expect("copy");
    }
    // Same mtimes and modes as the first context.
    for f in [
        "d",
        "d/one",
        "d/two",
        "d/three",
        "sub",
        "sub/deep",
        "sub/deep/x",
        ".",
    ] {
        let m = std::fs::metadata(ctx.dir.join(f)).expect("meta");
        std::fs::set_permissions(ctx_off.dir.join(f), m.permissions()).expect("mode");
        let t = m.modified().expect("mtime");
        std::fs::File::options()
            .write(f != "." && !m.is_dir())
            .read(true)
            .open(ctx_off.dir.join(f))
            .and_then(|file| file.set_modified(t))
            .expect("set mtime");
    }
    let (fresh, _) = build(&off, &ctx_off, &[stat]);
    assert_eq!(fresh, id, "linking changed the image");
    assert_eq!(save(&off, &fresh, "fresh.tar"), save(&d, &id, "linked.tar"));
}

const CUTOFF: &str = "FROM busybox AS build\n\
ARG UNUSED=1\n\
ARG OWNER=0\n\
ARG CONTENT=same\n\
RUN mkdir -p /out/sub && echo hello > /out/a && echo $CONTENT > /out/sub/b && \
ln -s a /out/link && chown $OWNER /out/a && echo $UNUSED > /elsewhere\n\
FROM busybox\n\
COPY --from=build /out /app\n\
RUN --mount=type=bind,from=build,source=/out,target=/m cat /m/a /m/sub/b > /seen\n\
RUN echo after > /after\n";

/// The steps of the final stage that came from the cache.
fn final_stage_hits(out: &str) -> Vec<String> {
    cached_steps(out)
        .into_iter()
        .filter(|s| {
            s.starts_with("COPY --from")
                || s.starts_with("RUN --mount")
                || s.starts_with("RUN echo after")
        })
        .collect()
}

#[test]
fn a_stage_that_runs_again_and_makes_the_same_files_stops_the_rebuild_there() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox(&[]);
    let ctx = Ctx::new(&d, CUTOFF, &[]);
    let (first, out) = build(&d, &ctx, &[]);
    assert!(cached_steps(&out).is_empty(), "{out}");
    let all_after = [
        "COPY --from=build /out /app",
        "RUN --mount=type=bind,from=build,source=/out,target=/m cat /m/a /m/sub/b > /seen",
        "RUN echo after > /after",
    ];

    // The ARG is in the RUN's environment: the stage runs again (new files, new times),
    // writes the same bytes under /out, and the final stage hits from the COPY on, giving
    // the image it gave before (BuildKit's early cutoff).
    let (id, out) = build(&d, &ctx, &["--build-arg", "UNUSED=2"]);
    assert!(
        !cached_steps(&out)
            .iter()
            .any(|s| s.starts_with("RUN mkdir")),
        "the build stage's RUN must run again:\n{out}"
    );
    assert_eq!(final_stage_hits(&out), all_after, "{out}");
    assert_eq!(id, first, "same files copied: same image\n{out}");

    // Once more with another value, and after a restart (the noted digests persist, and
    // a digest taken afresh gives the same key).
    let mut d = d;
    assert_eq!(d.stop(), Some(0));
    d.restart();
    let (id, out) = build(&d, &ctx, &["--build-arg", "UNUSED=3"]);
    assert_eq!(final_stage_hits(&out), all_after, "{out}");
    assert_eq!(id, first);

    // Positive controls: what the copy reads changed, by content or by owner: the COPY
    // and everything after it run, and the image differs.
    for (arg, what) in [("CONTENT=other", "content"), ("OWNER=7", "owner")] {
        let (id, out) = build(&d, &ctx, &["--build-arg", arg]);
        assert!(final_stage_hits(&out).is_empty(), "{what} changed:\n{out}");
        assert_ne!(id, first, "{what} changed");
    }

    // Back to the first stage output: the first image again.
    let (id, out) = build(&d, &ctx, &["--build-arg", "UNUSED=4"]);
    assert_eq!(final_stage_hits(&out), all_after, "{out}");
    assert_eq!(id, first);

    // --no-cache reads nothing for keys and runs everything.
    let (_, out) = build(&d, &ctx, &["--no-cache"]);
    assert!(cached_steps(&out).is_empty(), "{out}");
}

/// A size as `builder du` prints it ("20.5 MB"), in bytes.
fn parse_human(s: &str) -> u64 {
    let (num, unit) = s
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("size {s:?}"));
    let v: f64 = num.parse().unwrap_or_else(|_| panic!("size {s:?}"));
    let scale = match unit {
        "B" => 1.0,
        "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        other => panic!("unit {other} in {s:?}"),
    };
    (v * scale) as u64
}

/// The summary line `key` of `builder du` (the last one: `--verbose` has per-record lines
/// of the same names above it).
fn du_line(out: &str, key: &str) -> u64 {
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix(key))
        .map(parse_human)
        .unwrap_or_else(|| panic!("no {key} in {out}"))
}

#[test]
fn builder_du_counts_files_linked_between_versions_of_a_step_once() {
    if !require_root() {
        return;
    }
    let d = Daemon::start_configured(&[], &["--log-level", "debug"], &[]);
    d.import_busybox("busybox:latest", &[]);
    let ctx = Ctx::new(&d, "FROM busybox\nCOPY d/ /d/\n", &[("d/small", "1")]);
    // 8 MB of incompressible bytes: a file the next version of the COPY links.
    let big: Vec<u8> = (0..8_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(ctx.dir.join("d/big"), &big).expect("big");
    let ways = |d: &Daemon| {
        let log = d.log();
        (
            log.matches("COPY writes its layer as a tar").count(),
            log.matches("COPY writes its upper directly").count(),
        )
    };
    // The first version is written as a tar (it has nothing to link); its directory is
    // made in idle time.
    build(&d, &ctx, &[]);
    assert_eq!(ways(&d), (1, 0));
    d.wait_idle();
    // The second makes its files (the cache holds a version of the step now)...
    ctx.write("d/small", "2");
    build(&d, &ctx, &[]);
    assert_eq!(ways(&d), (1, 1));
    let one = d.ok(&["builder", "du", "--verbose"]);
    let total_one = du_line(&one, "Total:");
    // (each version's layer, and each second version's snapshot and layer one set of files)
    assert!((16_000_000..24_000_000).contains(&total_one), "{one}");

    // ... which the third links.
    ctx.write("d/small", "3");
    build(&d, &ctx, &[]);
    assert_eq!(ways(&d), (1, 2));
    let two = d.ok(&["builder", "du", "--verbose"]);
    // Both COPY records hold the big file (each record's own size counts it) ...
    let sizes: u64 = two
        .lines()
        .filter_map(|l| l.strip_prefix("Size:"))
        .map(parse_human)
        .sum();
    assert!(
        sizes >= 16_000_000,
        "the positive control: per-record sizes count it twice\n{two}"
    );
    // ... the total counts it once, and says what is shared.
    let total_two = du_line(&two, "Total:");
    assert!(
        total_two < total_one + 1_000_000,
        "linked files counted twice: {total_one} then {total_two}\n{two}"
    );
    assert!(du_line(&two, "Shared:") >= 16_000_000, "{two}");
}

#[test]
fn builder_prune_until_takes_only_what_was_not_used_since() {
    if !require_root() {
        return;
    }
    let d = daemon_with_busybox(&[]);
    let ctx = Ctx::new(&d, "FROM busybox\nRUN echo old > /old\n", &[]);
    build(&d, &ctx, &[]);
    // Those records were last used two hours ago (set in the index while the daemon is
    // stopped: no wait for the clock).
    let mut d = d;
    assert_eq!(d.stop(), Some(0));
    let index = d.data().join("cache/index.json");
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index).expect("index")).expect("json");
    let two_hours_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
        - 7200;
    for r in v["records"].as_object_mut().expect("records").values_mut() {
        r["last_used"] = two_hours_ago.into();
        r["created"] = two_hours_ago.into();
    }
    std::fs::write(&index, serde_json::to_vec(&v).expect("json")).expect("write");
    d.restart();
    std::fs::write(
        ctx.dir.join("Dockerfile"),
        "FROM busybox\nRUN echo new > /new\n",
    )
    .expect("Dockerfile");
    build(&d, &ctx, &[]);
    for (bad, names) in [
        ("until", "until"),
        ("until=soon", "soon"),
        ("label=x", "label"),
    ] {
        let e = d.fails(&["builder", "prune", "-a", "-f", "--filter", bad]);
        assert!(e.contains(names), "{bad}: {e}");
    }
    let listed = du_descriptions(&d);
    assert!(
        listed.iter().any(|l| l == "RUN echo old > /old"),
        "{listed:?}"
    );
    // Last used an hour ago or more goes; the step just built stays.
    let out = d.ok(&["builder", "prune", "-a", "-f", "--filter", "until=1h"]);
    assert!(out.contains("Deleted build cache objects:"), "{out}");
    let listed = du_descriptions(&d);
    assert!(!listed.iter().any(|l| l.contains("echo old")), "{listed:?}");
    assert!(
        listed.iter().any(|l| l == "RUN echo new > /new"),
        "{listed:?}"
    );
    // The same filter once more: nothing older is left.
    let out = d.ok(&["builder", "prune", "-a", "-f", "--filter", "until=30m"]);
    assert_eq!(out, "Total reclaimed space: 0 B\n");
    let (_, out) = build(&d, &ctx, &[]);
    assert_eq!(cached_steps(&out), vec!["RUN echo new > /new"], "{out}");
}

/// Bytes free on the file system holding `path`.
fn free_bytes(path: &Path) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=avail"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df: {out:?}"))
}

/// Fills the file system at `dir` until `left` bytes are free (a file of zeros, written
/// for real so that it takes blocks).
fn fill_until(dir: &Path, left: u64, name: &str) -> PathBuf {
    let p = dir.join(name);
    let take = free_bytes(dir).saturating_sub(left);
    let mut f = std::fs::File::create(&p).expect("filler");
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0;
    while written < take {
        let n = chunk.len().min((take - written) as usize);
        std::io::Write::write_all(&mut f, &chunk[..n]).expect("fill");
        written += n as u64;
    }
    f.sync_all().expect("sync");
    p
}

#[test]
fn keep_free_trims_the_cache_after_builds_and_when_idle() {
    if !isula_integration::powercut::available() {
        return;
    }
    let fs = isula_integration::powercut::Ext4::new(400);
    let mib = 1u64 << 20;
    let mut d = isula_integration::powercut::daemon_on(
        &fs,
        &[("configuration.toml", "build_cache_keep_free = \"100MiB\"\n")],
        &[],
    );
    d.import_busybox("busybox:latest", &[]);
    let ctx = Ctx::new(
        &d,
        "FROM busybox\nRUN head -c 20000000 /dev/urandom > /a\n",
        &[],
    );
    build(&d, &ctx, &[]);
    // Plenty free: the record stays (the positive control).
    let (_, out) = build(&d, &ctx, &[]);
    assert_eq!(cached_steps(&out).len(), 1, "{out}");

    // When idle: the file system fills from elsewhere; the cache gives back what it holds.
    let filler = fill_until(fs.path(), 80 * mib, "filler");
    wait_until_explained(
        "the idle daemon to trim its cache",
        std::time::Duration::from_secs(90),
        || du_total_records(&d) == 0,
        || d.ok(&["builder", "du"]),
    );
    std::fs::remove_file(&filler).expect("rm filler");

    // After a build: room for the build, not for the floor afterwards.
    std::fs::write(
        ctx.dir.join("Dockerfile"),
        "FROM busybox\nRUN echo kept > /k\n",
    )
    .expect("Dockerfile");
    build(&d, &ctx, &[]);
    let (_, out) = build(&d, &ctx, &[]);
    assert_eq!(cached_steps(&out).len(), 1, "{out}");
    let filler = fill_until(fs.path(), 110 * mib, "filler");
    std::fs::write(
        ctx.dir.join("Dockerfile"),
        "FROM busybox\nRUN head -c 30000000 /dev/urandom > /b\n",
    )
    .expect("Dockerfile");
    build(&d, &ctx, &[]);
    assert!(free_bytes(fs.path()) >= 100 * mib || du_total_records(&d) == 0);
    std::fs::write(
        ctx.dir.join("Dockerfile"),
        "FROM busybox\nRUN echo kept > /k\n",
    )
    .expect("Dockerfile");
    let (_, out) = build(&d, &ctx, &[]);
    assert!(
        cached_steps(&out).is_empty(),
        "the least recently used went: {out}"
    );
    std::fs::remove_file(&filler).expect("rm filler");
    d.stop_and_check_store();
}
