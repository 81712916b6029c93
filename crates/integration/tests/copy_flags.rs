//! The newer COPY flags end to end, as BuildKit documents and tests them (Docker 20.10's
//! frontend has neither, so they are checked here rather than in the differential
//! corpus): `--exclude` patterns match paths relative to each source (a source itself is
//! never excluded, `!` exceptions re-include) and keep excluded files out of the step's
//! key; `--parents` keeps each source's path (below a `/./` pivot) with its parent
//! directories' modes.

use isula_integration::*;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// The image's files: path → (mode, content).
fn image_files(d: &Daemon, image: &str) -> BTreeMap<String, (u32, String)> {
    d.image_files(image)
        .into_iter()
        .map(|(p, e)| {
            (
                p,
                (e.mode, String::from_utf8_lossy(&e.content).into_owned()),
            )
        })
        .collect()
}

/// A daemon with busybox loaded and an empty context directory (None: not root, or no
/// runc, and the test skips).
fn daemon_and_context() -> Option<(Daemon, tempfile::TempDir)> {
    if !require_root() || !require_tool("runc") {
        return None;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    Some((d, tempfile::tempdir().expect("ctx")))
}

fn write(root: &std::path::Path, files: &[(&str, &str)]) {
    for (p, c) in files {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        std::fs::write(path, c).expect("write");
    }
}

#[test]
fn exclude_and_parents_as_buildkit() {
    let Some((d, ctx)) = daemon_and_context() else {
        return;
    };
    let c = ctx.path();
    write(
        c,
        &[
            ("dir/a.txt", "a"),
            ("dir/b.log", "b"),
            ("dir/sub/c.tmp", "c"),
            ("dir/sub/d.txt", "d"),
            ("dir/keep/no.log", "no"),
            ("dir/deep/z.log", "z"),
            ("dir/keep/yes.log", "yes"),
            ("hom.md", "top-level"),
            ("home/x.md", "x"),
            ("home/y.txt", "y"),
            ("a/b/c.txt", "abc"),
            ("a/b/d/e", "e"),
            ("src/pkg/x.go", "go"),
            ("src/pkg/x_test.go", "test"),
        ],
    );
    std::fs::set_permissions(c.join("a"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::write(
        c.join("Dockerfile"),
        "FROM busybox\n\
         COPY --exclude=*.log --exclude=sub/*.tmp --exclude=keep/*.log --exclude=!keep/yes.log dir /x/\n\
         COPY --exclude=*.md hom* /h/\n\
         COPY --parents a/b/c.txt a/b/d/ /p/\n\
         COPY --parents --exclude=*_test.go src/./pkg /q/\n",
    )
    .expect("df");
    let cx = c.to_str().expect("utf8");
    d.ok(&["ctr-img", "build", "-t", "cf:1", cx]);
    let f = image_files(&d, "cf:1");
    let has = |p: &str| f.contains_key(p);
    // `*.log` matches names at the source's top only, as Go's filepath.Match.
    for p in [
        "x/a.txt",
        "x/sub/d.txt",
        "x/keep/yes.log",
        "x/deep/z.log",
        "h/hom.md",
        "h/y.txt",
    ] {
        assert!(has(p), "{p} missing: {:?}", f.keys().collect::<Vec<_>>());
    }
    for p in ["x/b.log", "x/sub/c.tmp", "x/keep/no.log", "h/x.md"] {
        assert!(!has(p), "{p} was not excluded");
    }
    assert_eq!(f.get("p/a/b/c.txt").map(|v| v.1.as_str()), Some("abc"));
    assert_eq!(f.get("p/a/b/d/e").map(|v| v.1.as_str()), Some("e"));
    assert_eq!(
        f.get("p/a").map(|v| v.0 & 0o7777),
        Some(0o700),
        "parent mode"
    );
    assert!(has("q/pkg/x.go") && !has("q/pkg/x_test.go") && !has("q/src"));
    // An excluded file changing does not make the step run again; an included one does.
    std::fs::write(c.join("dir/b.log"), "changed").expect("write");
    let out = d.ok(&["ctr-img", "build", "-t", "cf:2", cx]);
    assert_eq!(out.matches("Using cache").count(), 4, "{out}");
    std::fs::write(c.join("dir/a.txt"), "changed").expect("write");
    let out = d.ok(&["ctr-img", "build", "-t", "cf:3", cx]);
    assert_eq!(out.matches("Using cache").count(), 0, "{out}");
}

#[test]
fn copy_link_owns_its_destination_directories() {
    let Some((d, ctx)) = daemon_and_context() else {
        return;
    };
    let c = ctx.path();
    write(c, &[("a.txt", "a")]);
    std::fs::write(
        c.join("Dockerfile"),
        "FROM busybox\n\
         RUN mkdir -p /opt/real /opt/real2 && ln -s real /opt/link && ln -s real2 /opt/link2 && mkdir -m 700 /srv && touch /srv/keep\n\
         COPY --link a.txt /opt/link/\n\
         COPY a.txt /opt/link2/\n\
         COPY --link --chown=7:8 a.txt /srv/\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "link:1",
        c.to_str().expect("utf8"),
    ]);
    let f = image_files(&d, "link:1");
    // --link: the symlink in the way is replaced by a directory, not followed.
    assert!(
        f.contains_key("opt/link/a.txt"),
        "{:?}",
        f.keys()
            .filter(|k| k.starts_with("opt"))
            .collect::<Vec<_>>()
    );
    assert!(!f.contains_key("opt/real/a.txt"));
    // Without it the link is followed.
    assert!(f.contains_key("opt/real2/a.txt"));
    // The directory is the copy's (0755, its owner); what it held stays.
    assert_eq!(f.get("srv").map(|v| v.0 & 0o7777), Some(0o755));
    assert!(f.contains_key("srv/keep") && f.contains_key("srv/a.txt"));
}

/// A COPY of many directories (more than the copy keeps waiting for their metadata at
/// once) and files, written on several threads: every directory and file has the source's
/// mode and mtime, owned as --chown says, with its content, as one thread would make it.
#[test]
fn a_copy_of_many_directories_keeps_every_mode_time_and_content() {
    let Some((d, ctx)) = daemon_and_context() else {
        return;
    };
    let c = ctx.path();
    let mut want = BTreeMap::new();
    for i in 0..300u32 {
        let dir = format!("tree/d{:03}/e{}", i, i % 7);
        for j in 0..3u32 {
            let p = format!("{dir}/f{j}");
            write(c, &[(&p, &format!("{i}-{j}"))]);
            let mode = if j == 0 {
                0o600
            } else {
                0o644 + (i % 2) * 0o100
            };
            std::fs::set_permissions(c.join(&p), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
            want.insert(
                format!("t/d{:03}/e{}/f{j}", i, i % 7),
                (mode, 1_000_000 + u64::from(i * 3 + j)),
            );
        }
        let mode = if i % 3 == 0 { 0o750 } else { 0o755 };
        for (k, dpath) in [format!("tree/d{i:03}/e{}", i % 7), format!("tree/d{i:03}")]
            .into_iter()
            .enumerate()
        {
            std::fs::set_permissions(c.join(&dpath), std::fs::Permissions::from_mode(mode))
                .expect("chmod");
            want.insert(
                dpath.replacen("tree", "t", 1),
                (mode, 2_000_000 + u64::from(i * 2) + k as u64),
            );
        }
    }
    // Times last, deepest first, so making the entries does not change them.
    let mut paths: Vec<&String> = want.keys().collect();
    paths.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
    for p in paths {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(want[p].1);
        let src = c.join(p.replacen('t', "tree", 1));
        std::fs::File::open(&src)
            .and_then(|f| f.set_times(std::fs::FileTimes::new().set_modified(t)))
            .expect("times");
    }
    std::fs::write(
        c.join("Dockerfile"),
        "FROM busybox\nCOPY --chown=7:8 tree /t/\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "many:1",
        c.to_str().expect("utf8"),
    ]);
    let got = d.image_files("many:1");
    for (p, (mode, mtime)) in &want {
        let e = got
            .get(p)
            .unwrap_or_else(|| panic!("{p} is not in the image"));
        assert_eq!(
            (e.mode & 0o7777, e.mtime, e.uid, e.gid),
            (*mode, *mtime, 7, 8),
            "{p}"
        );
        if p.contains("/f") {
            let (i, j) = (&p[3..6], &p[p.len() - 1..]);
            assert_eq!(
                String::from_utf8_lossy(&e.content),
                format!(
                    "{}-{j}",
                    i.trim_start_matches('0').parse::<u32>().unwrap_or(0)
                ),
                "{p}"
            );
        }
    }
}

/// Every entry under `root` (not `root` itself), symlinks not followed.
fn walk(root: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() && !p.is_symlink() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}

/// The last layer's diff ID of `image`, from its saved archive's manifest.
fn last_layer(d: &Daemon, image: &str) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let archive = dir.path().join("image.tar");
    d.ok(&[
        "ctr-img",
        "save",
        image,
        "-o",
        archive.to_str().expect("utf8"),
    ]);
    let mut a = tar::Archive::new(std::fs::File::open(&archive).expect("archive"));
    for e in a.entries().expect("entries") {
        let mut e = e.expect("entry");
        if e.path().expect("path").to_string_lossy() == "manifest.json" {
            let m: serde_json::Value = serde_json::from_reader(&mut e).expect("manifest");
            let layers = m[0]["Layers"].as_array().expect("layers");
            return layers
                .last()
                .and_then(|l| l.as_str())
                .expect("a layer")
                .to_string();
        }
    }
    panic!("no manifest.json in the archive of {image}");
}

/// A COPY whose destination is a top-level name the layers below lack writes its step's
/// upper directory directly, without the overlay, or (its stage's last step to change
/// files, of one source path) its layer as a tar, making no file: either layer is byte
/// for byte the one the overlay path makes (the same COPY with `--chown=0:0`, which both
/// leave to the overlay, is the control), a RUN after it sees its files, and a
/// destination the base has, one a WORKDIR made, or one with ".." still goes through the
/// overlay.
#[test]
fn a_copy_to_a_new_top_level_name_makes_the_layer_the_overlay_makes() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start_with(&["--log-level", "debug"]);
    d.load_fixed_busybox("busybox:latest");
    let ctx = tempfile::tempdir().expect("ctx");
    let c = ctx.path();
    write(
        c,
        &[
            ("a", "hello\n"),
            ("d/e/f", "x\n"),
            ("d/deep/er/g", "y\n"),
            ("skip.txt", "ignored\n"),
            (".dockerignore", "skip.txt\n"),
            (&format!("d/{}", "n".repeat(120)), "long\n"),
        ],
    );
    std::fs::create_dir_all(c.join("emptyd")).expect("dir");
    std::fs::set_permissions(c.join("d/e/f"), std::fs::Permissions::from_mode(0o4755))
        .expect("chmod");
    std::fs::set_permissions(c.join("d/deep"), std::fs::Permissions::from_mode(0o700))
        .expect("chmod");
    // The context's own mode, which a directory made for it takes.
    std::fs::set_permissions(c, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    std::os::unix::fs::symlink("../a", c.join("d/link")).expect("symlink");
    std::fs::hard_link(c.join("a"), c.join("hard")).expect("link");
    // Times before the builds' SOURCE_DATE_EPOCH, so that the clamp keeps them and the
    // layers compare them too (files, then directories deepest first).
    let mut entries: Vec<PathBuf> = walk(c);
    entries.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for (i, p) in entries.iter().enumerate() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(100 + i as u64);
        if !p.is_symlink() {
            std::fs::File::open(p)
                .and_then(|f| f.set_times(std::fs::FileTimes::new().set_modified(t)))
                .expect("times");
        }
    }
    // A FIFO (left out) and a socket (an empty file), made after the times were set (a
    // FIFO's open would wait for a writer): the clamp gives them the same time.
    let fifo = c.join("d/fifo");
    run_ok(std::process::Command::new("mkfifo").arg(&fifo));
    let _socket = std::os::unix::net::UnixListener::bind(c.join("d/sock")).expect("socket");
    let lines = |d: &Daemon| {
        let log = d.log();
        (
            log.matches("COPY writes its layer as a tar").count(),
            log.matches("COPY writes its upper directly").count(),
        )
    };
    // The Dockerfile outside the context, which the builds compare.
    let df_dir = tempfile::tempdir().expect("df dir");
    let df_path = df_dir.path().join("Dockerfile");
    // Which way the build's COPY went: (as a tar, its upper written directly).
    let build = |df: &str, tag: &str| -> (usize, usize) {
        std::fs::write(&df_path, df).expect("df");
        let before = lines(&d);
        d.ok(&[
            "ctr-img",
            "build",
            "--no-cache",
            "-f",
            df_path.to_str().expect("utf8"),
            "--build-arg",
            "SOURCE_DATE_EPOCH=1000",
            "-t",
            tag,
            c.to_str().expect("utf8"),
        ]);
        let after = lines(&d);
        (after.0 - before.0, after.1 - before.1)
    };
    // A base whose /opt differs from what a fresh directory would be (mode and owner).
    build(
        "FROM busybox\nRUN mkdir -m 0750 /opt && chown 5:6 /opt\n",
        "base:1",
    );
    // Each COPY (FROM, flags, sources and destination) as its stage's last step to change
    // files (its layer written as a tar, but for several sources), with a step after it
    // (straight into the upper), and through the overlay (`--chown=0:0`, the owner it
    // gets anyway, keeps it there).
    for (from, copy, tar) in [
        ("busybox", ". /app/", true),
        ("busybox", ". /new/dir/", true),
        ("busybox", ". app", true),
        ("base:1", ". /app/", true),
        ("scratch", ". /x/", true),
        ("busybox", "--chmod=640 . /app/", true),
        ("busybox", "--exclude=d/deep . /app/", true),
        ("busybox", "d/l* /one/", true),
        ("busybox", "a d* emptyd /multi/", false),
        ("busybox", "a /single", true),
        ("busybox", "a /file/", true),
        ("busybox", "d/link /followed", true),
        ("busybox", "d/sock /n/s", true),
    ] {
        let last = build(&format!("FROM {from}\nCOPY {copy}\n"), "last:1");
        let direct = build(
            &format!("FROM {from}\nCOPY {copy}\nWORKDIR /\n"),
            "direct:1",
        );
        let through = build(
            &format!("FROM {from}\nCOPY --chown=0:0 {copy}\n"),
            "overlay:1",
        );
        let expected = if tar { (1, 0) } else { (0, 1) };
        assert_eq!(
            (last, direct, through),
            (expected, (0, 1), (0, 0)),
            "{from} {copy}: the paths taken"
        );
        let layer = last_layer(&d, "overlay:1");
        assert_eq!(last_layer(&d, "direct:1"), layer, "{from} {copy}: direct");
        assert_eq!(last_layer(&d, "last:1"), layer, "{from} {copy}: as a tar");
    }
    build("FROM busybox\nCOPY . /app/\n", "last:1");
    let files = d.image_files("last:1");
    assert_eq!(files["app/d/e/f"].mode & 0o7777, 0o4755);
    assert_eq!(files["app/d/deep"].mode & 0o7777, 0o700);
    assert!(
        files["app/d/e/f"].mtime < 1000,
        "the context's times were kept"
    );
    assert!(!files.contains_key("app/skip.txt"));
    assert!(!files.contains_key("app/d/fifo"));
    assert_eq!(files["app/d/sock"].content, b"");
    // The next step's overlay has the directly written snapshot below it.
    assert_eq!(
        build(
            "FROM busybox\nCOPY . /app/\nRUN cat /app/d/link /app/hard > /seen\n",
            "run:1"
        ),
        (0, 1)
    );
    assert_eq!(
        d.image_text("run:1", "seen").as_deref(),
        Some("hello\nhello")
    );
    // A FIFO alone, to a destination of one name, makes nothing: no layer (the files path,
    // whose upper stays empty).
    assert_eq!(build("FROM busybox\nCOPY d/fifo /f\n", "fifo:1"), (0, 1));
    assert_eq!(last_layer(&d, "fifo:1"), last_layer(&d, "busybox:latest"));
    // Names a layer below has, or may climb to: the overlay.
    for df in [
        "FROM busybox\nCOPY . /bin/x/\n",
        "FROM busybox\nWORKDIR /w\nCOPY . .\n",
        "FROM busybox\nCOPY a /z/../q\n",
        "FROM busybox\nRUN mkdir /m\nCOPY . /m/\n",
        "FROM base:1\nCOPY . /opt/x/\n",
    ] {
        assert_eq!(build(df, "other:1"), (0, 0), "{df}");
    }
    // The base's /opt, copied up as it was.
    let files = d.image_files("other:1");
    let opt = &files["opt"];
    assert_eq!((opt.mode & 0o7777, opt.uid, opt.gid), (0o750, 5, 6));
    assert_eq!(
        String::from_utf8_lossy(&files["opt/x/a"].content),
        "hello\n"
    );
}

/// A COPY written as its stage's layer tar is a step like any other: recorded (as the
/// stage stands after it), hit by an unchanged rebuild (the same image), stacked under a
/// RUN that a longer Dockerfile adds after it (its layer's directory made then), kept
/// across a restart; its layer's directory is made in idle time, and the store check
/// passes. `--no-cache` writes it again, to the same image. A stage that a later stage
/// uses writes its files instead, and so does a build that misses the record once the
/// cache holds a version of the step (here: another clamp).
#[test]
fn a_copy_written_as_a_tar_is_cached_and_reused_like_any_step() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let mut d = Daemon::start_with(&["--log-level", "debug"]);
    d.load_fixed_busybox("busybox:latest");
    let ctx = tempfile::tempdir().expect("ctx");
    let c = ctx.path().to_path_buf();
    write(&c, &[("a", "hello\n"), ("d/b", "b\n")]);
    let df_dir = tempfile::tempdir().expect("df dir");
    let df = df_dir.path().join("Dockerfile");
    let build = |d: &Daemon, body: &str, extra: &[&str]| -> String {
        std::fs::write(&df, body).expect("df");
        // Reproducible: the same image whenever it is built.
        let mut args = vec![
            "ctr-img",
            "build",
            "--build-arg",
            "SOURCE_DATE_EPOCH=1000",
            "-f",
            df.to_str().expect("utf8"),
        ];
        args.extend_from_slice(extra);
        args.push(c.to_str().expect("utf8"));
        d.ok(&args)
    };
    let tars = |d: &Daemon| d.log().matches("COPY writes its layer as a tar").count();
    let copy = "FROM busybox\nCOPY . /app/\nENV X=1\n";
    let out = build(&d, copy, &["-t", "app:1"]);
    assert_eq!(tars(&d), 1, "{out}");
    assert!(cached_steps(&out).is_empty(), "{out}");
    let id = build_id(&out);
    let out = build(&d, copy, &["-t", "app:2"]);
    assert_eq!(build_id(&out), id, "{out}");
    assert_eq!(cached_steps(&out), ["COPY . /app/", "ENV X=1"], "{out}");
    assert_eq!(tars(&d), 1, "an unchanged rebuild wrote the layer again");
    d.wait_idle();
    assert!(
        d.log().contains("packed layer unpacked"),
        "the layer's directory was not made in idle time"
    );
    // A RUN after it: the COPY comes from the cache, and its files are below the RUN.
    let out = build(
        &d,
        "FROM busybox\nCOPY . /app/\nRUN cat /app/a /app/d/b > /seen\n",
        &["-t", "run:1"],
    );
    assert_eq!(cached_steps(&out), ["COPY . /app/"], "{out}");
    assert_eq!(d.image_text("run:1", "seen").as_deref(), Some("hello\nb"));
    assert_eq!(
        String::from_utf8_lossy(&d.image_files("app:1")["app/d/b"].content),
        "b\n"
    );
    // A stage a later stage uses writes its files (the later one would wait for them).
    let directs = |d: &Daemon| d.log().matches("COPY writes its upper directly").count();
    let before = directs(&d);
    let out = build(
        &d,
        "FROM busybox AS s\nCOPY . /app/\nFROM busybox\nCOPY --from=s /app/a /a\n",
        &["--no-cache", "-t", "staged:1"],
    );
    assert_eq!((tars(&d), directs(&d) - before), (1, 1), "{out}");
    assert_eq!(d.image_text("staged:1", "a").as_deref(), Some("hello"));
    // The record's tar was written with SOURCE_DATE_EPOCH's clamp: a build without it makes
    // another tar (the context's own times), so it does not use the record (whose key it
    // shares) and keeps the files it made (the cache holding a version of the step, the
    // files path; unrecorded, the key being taken); the clamped build still hits.
    let before = directs(&d);
    std::fs::write(&df, copy).expect("df");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "-f",
        df.to_str().expect("utf8"),
        "-t",
        "unclamped:1",
        c.to_str().expect("utf8"),
    ]);
    assert!(
        !cached_steps(&out).contains(&"COPY . /app/".to_string()),
        "{out}"
    );
    assert_eq!((tars(&d), directs(&d) - before), (1, 1), "{out}");
    let files = d.image_files("unclamped:1");
    assert!(files["app/a"].mtime > 1000, "the context's own time");
    assert_eq!(String::from_utf8_lossy(&files["app/d/b"].content), "b\n");
    let out = build(&d, copy, &["-t", "app:5"]);
    assert_eq!(build_id(&out), id, "{out}");
    d.stop_and_check_store();
    d.restart();
    let out = build(&d, copy, &["-t", "app:3"]);
    assert_eq!(build_id(&out), id, "{out}");
    assert_eq!(cached_steps(&out), ["COPY . /app/", "ENV X=1"], "{out}");
    // --no-cache: written again (the same layer, the record kept as it was).
    let out = build(&d, copy, &["--no-cache", "-t", "app:4"]);
    assert_eq!(build_id(&out), id, "{out}");
    assert_eq!(tars(&d), 2, "{out}");
}

/// A COPY of several sources whose earlier source's files are planned as links to the
/// previous version of the step (unchanged files are linked, not copied): a later source's
/// directory merging into one of its directories keeps the links planned there; a later
/// source's file replacing it drops them with it (they were left planned, and the build
/// failed with "Not a directory" when they were made).
#[test]
fn a_later_source_merging_into_or_replacing_a_directory_keeps_or_drops_its_links() {
    let Some((d, ctx)) = daemon_and_context() else {
        return;
    };
    let c = ctx.path();
    write(
        c,
        &[
            ("s1/sub/f", "f\n"),
            ("s2/other", "o\n"),
            ("Dockerfile", "FROM busybox\nCOPY s1/ s2/ /t/\n"),
        ],
    );
    let dir = c.to_str().expect("utf8");
    d.ok(&["ctr-img", "build", "-t", "u:1", dir]);
    assert_eq!(d.image_text("u:1", "t/sub/f").as_deref(), Some("f"));
    // The step again (same instruction): t/sub/f is unchanged, so it is planned as a link,
    // and s2's directory "sub" merges into t/sub: the link stays planned and is made.
    write(c, &[("s2/sub/g", "g\n")]);
    d.ok(&["ctr-img", "build", "-t", "u:merged", dir]);
    assert_eq!(d.image_text("u:merged", "t/sub/f").as_deref(), Some("f"));
    assert_eq!(d.image_text("u:merged", "t/sub/g").as_deref(), Some("g"));
    // And again, s2's "sub" now a file that takes the directory's place.
    std::fs::remove_dir_all(c.join("s2/sub")).expect("rm");
    write(c, &[("s2/sub", "now a file\n")]);
    d.ok(&["ctr-img", "build", "-t", "u:2", dir]);
    let files = d.image_files("u:2");
    assert_eq!(
        String::from_utf8_lossy(&files["t/sub"].content),
        "now a file\n"
    );
    assert!(!files.contains_key("t/sub/f"));
    assert_eq!(d.image_text("u:2", "t/other").as_deref(), Some("o"));
}
