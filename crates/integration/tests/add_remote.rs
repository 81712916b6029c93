//! ADD of URLs and git repositories end to end, against servers on 127.0.0.1 (a small HTTP
//! file server, `git daemon`, and a bare repository over dumb HTTP): names, modes, owners
//! and mtimes as BuildKit gives them, `--checksum` verified (and a cached step with one
//! downloads nothing), refs resolved to commits, and every bad input failing naming the
//! line with nothing left.

use isula_integration::http_files::{HttpFiles, LAST_MODIFIED};
use isula_integration::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// The image's files: path → (mode, uid, gid, mtime, content).
fn image_files(d: &Daemon, image: &str) -> BTreeMap<String, (u32, u64, u64, u64, Vec<u8>)> {
    d.image_files(image)
        .into_iter()
        .map(|(p, e)| (p, (e.mode, e.uid, e.gid, e.mtime, e.content)))
        .collect()
}

#[test]
fn add_urls_as_buildkit() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let files = tempfile::tempdir().expect("files");
    std::fs::write(files.path().join("tool.bin"), b"tool-bytes\n").expect("write");
    std::fs::create_dir(files.path().join("sub")).expect("dir");
    std::fs::write(files.path().join("sub/data.txt"), b"data\n").expect("write");
    std::fs::write(files.path().join("pack.tar"), busybox_rootfs(&[])).expect("tar");
    let server = HttpFiles::serve(files.path());
    let sum = sha256_hex(b"tool-bytes\n");
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM busybox\n\
             ADD {tool} /opt/\n\
             ADD --chmod=0755 --chown=7:8 {data}?token=s3cret /data\n\
             ADD --checksum=sha256:{sum} {tool} /checked\n\
             ADD {pack} /packs/\n",
            tool = server.url("tool.bin"),
            data = server.url("sub/data.txt"),
            pack = server.url("pack.tar"),
        ),
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let out = d.ok(&["ctr-img", "build", "-t", "add:1", c]);
    // The Dockerfile line is shown as written; nothing else shows a URL's query.
    assert!(
        !out.lines()
            .any(|l| !l.starts_with("STEP") && l.contains("s3cret")),
        "a URL query was shown:\n{out}"
    );
    assert!(!d.log().contains("s3cret"), "a URL query was logged");
    let f = image_files(&d, "add:1");
    let tool = &f["opt/tool.bin"];
    assert_eq!(
        (tool.0 & 0o7777, tool.1, tool.2),
        (0o600, 0, 0),
        "mode and owner"
    );
    assert_eq!(tool.3, LAST_MODIFIED as u64, "mtime from Last-Modified");
    assert_eq!(tool.4, b"tool-bytes\n");
    let data = &f["data"];
    assert_eq!((data.0 & 0o7777, data.1, data.2), (0o755, 7, 8));
    assert_eq!(f["checked"].4, b"tool-bytes\n");
    // A remote archive is not unpacked.
    assert!(f.contains_key("packs/pack.tar") && !f.contains_key("packs/bin/busybox"));
    // Again: every step is cached; the step with a checksum downloaded nothing.
    let before = server.hits().iter().filter(|p| *p == "/tool.bin").count();
    let out = d.ok(&["ctr-img", "build", "-t", "add:2", c]);
    assert_eq!(out.matches("Using cache").count(), 4, "{out}");
    let after = server.hits().iter().filter(|p| *p == "/tool.bin").count();
    assert_eq!(
        after,
        before + 1,
        "only the ADD without --checksum downloads again"
    );
}

#[test]
fn bad_remote_sources_fail_naming_the_line_and_leave_nothing() {
    if !require_root() || !require_tool("runc") || !require_tool("git") {
        return;
    }
    let d = Daemon::start_configured(
        &[(
            "configuration.toml",
            "max_layer_size = \"8MB\"\nregistry_stall_timeout = \"1s\"\n",
        )],
        &[],
        &[],
    );
    d.load_fixed_busybox("busybox:latest");
    let files = tempfile::tempdir().expect("files");
    std::fs::write(files.path().join("f"), b"f").expect("write");
    let server = HttpFiles::serve(files.path());
    let repo = tempfile::tempdir().expect("repo");
    git_repo(repo.path());
    let git = HttpFiles::serve(repo.path());
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("local.txt"), b"x").expect("write");
    let zero = "0".repeat(64);
    let cases = [
        (format!("ADD {} /x", server.url("missing")), "404"),
        (
            format!("ADD {} /x", server.url("redirect-loop")),
            "redirect",
        ),
        (format!("ADD {} /x", server.url("huge")), "over the limit"),
        (
            format!("ADD {} /x", server.url("endless")),
            "over the limit",
        ),
        (format!("ADD {} /x", server.url("stall")), "1s"),
        (
            format!("ADD --checksum=sha256:{zero} {} /x", server.url("f")),
            "--checksum",
        ),
        (format!("COPY {} /x", server.url("f")), "not of COPY"),
        (
            "ADD --checksum=sha256:12 local.txt /x".to_string(),
            "64 hex digits",
        ),
        (
            format!("ADD --checksum=sha256:{zero} local.txt /x"),
            "needs a URL",
        ),
        (
            format!("ADD {}#no-such-ref /x/", git.url("bare.git")),
            "unknown git ref",
        ),
        (
            format!("ADD {}#main:no-such-dir /x/", git.url("bare.git")),
            "no-such-dir",
        ),
    ];
    for (line, want) in &cases {
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM busybox\n{line}\n"),
        )
        .expect("df");
        let before = d.images();
        let err = d.fails(&["ctr-img", "build", ctx.path().to_str().expect("utf8")]);
        assert!(
            err.contains(want) && err.contains("line 2"),
            "{line}: {err}"
        );
        assert_eq!(d.images(), before, "{line}: the images changed");
        d.assert_no_build_work(line);
    }
}

/// A repository at `dir/work` with a tag v1 (a.txt = one, docs/readme) and a later main
/// commit (a.txt = two), committed at fixed times, and its bare clone `dir/bare.git`
/// ready for dumb HTTP.
fn git_repo(dir: &Path) -> (i64, i64) {
    let work = dir.join("work");
    std::fs::create_dir_all(work.join("docs")).expect("dir");
    let g = |args: &[&str], time: &str| git_in(&work, args, Some(time));
    g(&["init", "-q", "-b", "main"], "1600000000 +0000");
    std::fs::write(work.join("a.txt"), "one\n").expect("write");
    std::fs::write(work.join("docs/readme"), "docs\n").expect("write");
    g(&["add", "."], "1600000000 +0000");
    g(&["commit", "-q", "-m", "one"], "1600000000 +0000");
    g(&["tag", "-a", "v1", "-m", "v1"], "1600000000 +0000");
    std::fs::write(work.join("a.txt"), "two\n").expect("write");
    g(&["commit", "-q", "-am", "two"], "1650000000 +0000");
    run_ok(
        Command::new("git")
            .args(["clone", "-q", "--bare"])
            .arg(&work)
            .arg(dir.join("bare.git")),
    );
    git_in(&dir.join("bare.git"), &["update-server-info"], None);
    (1_600_000_000, 1_650_000_000)
}

/// `git -C dir ARGS` as a fixed author, at `time` ("SECONDS +0000") when given.
fn git_in(dir: &Path, args: &[&str], time: Option<&str>) -> String {
    let mut c = Command::new("git");
    c.arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@e")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@e");
    if let Some(t) = time {
        c.env("GIT_AUTHOR_DATE", t).env("GIT_COMMITTER_DATE", t);
    }
    run_ok(&mut c)
}

/// `git daemon` serving `base` on a free port of 127.0.0.1; killed on drop.
struct GitDaemon(std::process::Child, u16);

impl Drop for GitDaemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn git_daemon(base: &Path) -> GitDaemon {
    let port = isula_integration::registry::free_port();
    let child = Command::new("git")
        .args([
            "daemon",
            "--reuseaddr",
            "--export-all",
            "--listen=127.0.0.1",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", base.display()))
        .arg(base)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("git daemon");
    let d = GitDaemon(child, port);
    wait_until("git daemon", std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    d
}

#[test]
fn add_git_repositories() {
    if !require_root() || !require_tool("runc") || !require_tool("git") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let repos = tempfile::tempdir().expect("repos");
    let (v1_time, main_time) = git_repo(repos.path());
    let daemon = git_daemon(repos.path());
    let dumb = HttpFiles::serve(repos.path());
    let ctx = tempfile::tempdir().expect("ctx");
    let smart = format!("git://127.0.0.1:{}/bare.git", daemon.1);
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM busybox\n\
             ADD {smart}#v1 /v1/\n\
             ADD {smart}#main:docs /docs/\n\
             ADD --keep-git-dir=true {dumb} /full/\n",
            dumb = dumb.url("bare.git"),
        ),
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    d.ok(&["ctr-img", "build", "-t", "git:1", c]);
    let f = image_files(&d, "git:1");
    assert_eq!(f["v1/a.txt"].4, b"one\n", "the tag's tree");
    assert_eq!(
        f["v1/a.txt"].3, v1_time as u64,
        "mtime is the commit's time"
    );
    assert!(f.contains_key("v1/docs/readme") && !f.contains_key("v1/.git"));
    assert_eq!(f["docs/readme"].4, b"docs\n", "a subdirectory of main");
    assert!(!f.contains_key("docs/a.txt"));
    assert_eq!(f["full/a.txt"].4, b"two\n", "HEAD over dumb HTTP");
    assert_eq!(f["full/a.txt"].3, main_time as u64);
    assert!(
        f.contains_key("full/.git/HEAD"),
        "--keep-git-dir keeps .git"
    );
    // The steps are keyed by the commits: unchanged, all cached; a new commit on main
    // runs the steps that follow it.
    let out = d.ok(&["ctr-img", "build", "-t", "git:2", c]);
    assert_eq!(out.matches("Using cache").count(), 3, "{out}");
    let work = repos.path().join("work");
    std::fs::write(work.join("docs/readme"), "new docs\n").expect("write");
    git_in(&work, &["commit", "-q", "-am", "three"], None);
    git_in(&work, &["push", "-q", "../bare.git", "main"], None);
    git_in(
        &repos.path().join("bare.git"),
        &["update-server-info"],
        None,
    );
    let out = d.ok(&["ctr-img", "build", "-t", "git:3", c]);
    assert_eq!(out.matches("Using cache").count(), 1, "{out}");
    assert_eq!(image_files(&d, "git:3")["docs/readme"].4, b"new docs\n");
}
