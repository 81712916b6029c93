//! The daemon over TCP with mutual TLS: a CA the test makes (openssl), certificates per
//! role, and each refusal beside its positive control: no certificate, one from another
//! CA, an expired one, a common name in no role, a role too low; the log names who did
//! what; a plain TCP listener only on loopback with --insecure-tcp.

use isula_integration::pki::{Pki, CLIENT_EXT};
use isula_integration::registry::free_port;
use isula_integration::*;
use std::path::PathBuf;
use std::process::Command;

/// A client certificate's extensions.
const CLIENT: &str = CLIENT_EXT;

const ROLES: &str =
    "[roles]\nadmin = [\"admin\"]\nbuilder = [\"builder\"]\nreader = [\"reader\"]\n";

/// A daemon with busybox, serving its socket and TCP with mutual TLS (the PKI's server
/// certificate, clients of its CA, ROLES); and the TCP address.
fn tls_daemon(pki: &Pki) -> (Daemon, String) {
    let (d, host) = pki.daemon("server", &[("configuration.toml", ROLES)], &[]);
    d.import_busybox("busybox:latest", &[]);
    let addr = host.trim_start_matches("tcp://").to_string();
    (d, addr)
}

/// `isula-build --host tcp://ADDR` with `tls` flags and `args`.
fn remote(d: &Daemon, addr: &str, tls: &[String], args: &[&str]) -> std::process::Output {
    let mut c = d.cli_command(&[]);
    c.arg("--host")
        .arg(format!("tcp://{addr}"))
        .args(tls)
        .args(args);
    c.env_remove("ISULA_BUILD_CERT_PATH");
    c.output().expect("isula-build")
}

/// Every generation directory of every context the daemon keeps.
fn generations(d: &Daemon) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for c in std::fs::read_dir(d.data().join("contexts"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for g in std::fs::read_dir(c.path()).into_iter().flatten().flatten() {
            if g.path().is_dir() {
                v.push(g.path());
            }
        }
    }
    v.sort();
    v
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn mutual_tls_and_roles_decide_who_may_do_what() {
    if !require_root() || !require_tool("openssl") {
        return;
    }
    let pki = Pki::new();
    for cn in ["admin", "builder", "reader", "nobody"] {
        pki.sign("ca", cn, cn, CLIENT);
    }
    pki.sign("other-ca", "rogue", "admin", CLIENT);
    pki.sign_days("ca", "expired", "admin", -1, CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let host = format!("tcp://{addr}");

    // Every role lists (the positive control of each refusal below).
    for cn in ["admin", "builder", "reader"] {
        let o = remote(&d, &addr, &pki.client(cn), &["ctr-img", "images"]);
        assert!(o.status.success(), "{cn}: {}", text(&o));
        assert!(text(&o).contains("busybox"), "{cn}: {}", text(&o));
    }
    // A role too low: the reader may not build, the builder may not tag; the admin may.
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\n").expect("df");
    let o = remote(
        &d,
        &addr,
        &pki.client("reader"),
        &["ctr-img", "build", ctx.to_str().expect("utf8")],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("needs the builder role; the certificate CN=reader has reader"),
        "{}",
        text(&o)
    );
    let o = remote(
        &d,
        &addr,
        &pki.client("builder"),
        &["ctr-img", "tag", "busybox", "x:1"],
    );
    assert!(text(&o).contains("needs the admin role"), "{}", text(&o));
    let o = remote(
        &d,
        &addr,
        &pki.client("admin"),
        &["ctr-img", "tag", "busybox", "x:1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.images().iter().any(|(r, t, _)| r == "x" && t == "1"));
    // A builder's remote build sends its context; the client writes its --iidfile itself
    // (the daemon never opens the path: see the private-namespace test below).
    let iid = d.dir.path().join("iid");
    let o = remote(
        &d,
        &addr,
        &pki.client("builder"),
        &[
            "ctr-img",
            "build",
            "--iidfile",
            iid.to_str().expect("utf8"),
            ctx.to_str().expect("utf8"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let id = std::fs::read_to_string(&iid).expect("the client wrote the iidfile");
    assert!(
        id.len() == 64 && text(&o).contains(&format!("image id: {id}")),
        "{id:?}: {}",
        text(&o)
    );
    let o = remote(
        &d,
        &addr,
        &pki.client("builder"),
        &["ctr-img", "build", ctx.to_str().expect("utf8")],
    );
    assert!(o.status.success(), "{}", text(&o));
    // A common name in no role.
    let o = remote(&d, &addr, &pki.client("nobody"), &["ctr-img", "images"]);
    assert!(text(&o).contains("CN=nobody has no role"), "{}", text(&o));
    // Another CA's certificate (CN=admin), an expired one (CN=admin): the handshake fails.
    for bad in ["rogue", "expired"] {
        let o = remote(&d, &addr, &pki.client(bad), &["ctr-img", "images"]);
        assert!(!o.status.success(), "{bad}: {}", text(&o));
        assert!(text(&o).contains("Cannot connect"), "{bad}: {}", text(&o));
        assert!(
            text(&o).contains("its log says which"),
            "{bad}: {}",
            text(&o)
        );
        assert!(!text(&o).contains("busybox"), "{bad}");
    }
    // No certificate at all: the daemon refuses the handshake (curl, with and without).
    if require_tool("curl") {
        let url = format!("https://{addr}/isula.build.v1.Control/HealthCheck");
        let no_cert = Command::new("curl")
            .args(["-sS", "--http2", "--cacert"])
            .arg(pki.path("ca.pem"))
            .arg(&url)
            .output()
            .expect("curl");
        assert!(!no_cert.status.success(), "{}", text(&no_cert));
        let with_cert = Command::new("curl")
            .args(["-sS", "--http2", "-o", "/dev/null", "--cacert"])
            .arg(pki.path("ca.pem"))
            .arg("--cert")
            .arg(pki.path("admin.pem"))
            .arg("--key")
            .arg(pki.path("admin.key"))
            .arg(&url)
            .output()
            .expect("curl");
        assert!(with_cert.status.success(), "{}", text(&with_cert));
    }
    // ISULA_BUILD_HOST and ISULA_BUILD_CERT_PATH (Docker's layout) work as the flags do.
    let certs = tempfile::tempdir().expect("certs");
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("reader.pem", "cert.pem"),
        ("reader.key", "key.pem"),
    ] {
        std::fs::copy(pki.path(from), certs.path().join(to)).expect("copy");
    }
    let o = d
        .cli_command(&["version"])
        .env_remove("ISULABUILD_HOST")
        .env("ISULA_BUILD_HOST", &host)
        .env("ISULA_BUILD_CERT_PATH", certs.path())
        .output()
        .expect("isula-build");
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Server:"), "{}", text(&o));
    // The unix socket is unchanged, and the log names who did what.
    d.ok(&["ctr-img", "images"]);
    let log = d.log();
    assert!(
        log.contains("remote operation") && log.contains("cn=reader") && log.contains("cn=admin"),
        "{log}"
    );
    assert!(
        log.contains("refused") && log.contains("cn=nobody"),
        "{log}"
    );
    // The handshakes refused, with why.
    assert!(log.contains("tls accept error"), "{log}");
    assert!(log.to_ascii_lowercase().contains("expired"), "{log}");
}

#[test]
fn plain_tcp_only_on_loopback_with_insecure_tcp() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_with(&["--host", &format!("tcp://{addr}"), "--insecure-tcp"]);
    let o = remote(&d, &addr, &[], &["ctr-img", "images"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(d.log().contains("WITHOUT TLS"), "{}", d.log());
    // Refused at start: TCP without TLS, and --insecure-tcp off loopback.
    let etc = tempfile::tempdir().expect("etc");
    for (flags, want) in [
        (vec!["--host", "tcp://127.0.0.1:1"], "needs mutual TLS"),
        (
            vec!["--host", "tcp://0.0.0.0:1", "--insecure-tcp"],
            "only a loopback address",
        ),
    ] {
        let o = Command::new(bin("isula-builder"))
            .args(["--config-dir"])
            .arg(etc.path())
            .args(["--dataroot"])
            .arg(etc.path().join("data"))
            .args(["--runroot"])
            .arg(etc.path().join("run"))
            .args(&flags)
            .env_remove("ISULABUILD_HOST")
            .output()
            .expect("isula-builder");
        assert!(!o.status.success(), "{flags:?}");
        assert!(text(&o).contains(want), "{flags:?}: {}", text(&o));
    }
}

/// The line a remote build prints: files and bytes sent.
fn sent(out: &str) -> (usize, u64) {
    let l = out
        .lines()
        .find(|l| l.starts_with("Sent the build context:"))
        .unwrap_or_else(|| panic!("no context line in {out}"));
    let words: Vec<&str> = l.split_whitespace().collect();
    // "Sent the build context: N of M files, B bytes ..."
    (
        words[4].parse().expect("files"),
        words[8].parse().expect("bytes"),
    )
}

#[test]
fn a_remote_build_sends_only_what_changed_from_files_the_daemon_cannot_see() {
    if !require_root() || !require_tool("openssl") || !require_tool("unshare") {
        return;
    }
    let pki = Pki::new();
    pki.sign("ca", "builder", "builder", CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let host = format!("tcp://{addr}");
    // The context lives in a tmpfs mounted in the client's own mount namespace: the daemon
    // cannot see it, whatever the path says.
    let mnt = d.dir.path().join("private");
    std::fs::create_dir_all(&mnt).expect("mnt");
    let client = bin("isula-build");
    let tls = pki.client("builder").join(" ");
    std::fs::write(
        d.dir.path().join("Dockerfile.remote"),
        "FROM busybox\nCOPY src/ /app/\nRUN cat /app/a /app/sub/b > /joined\n",
    )
    .expect("df");
    let script = format!(
        "set -e; mount -t tmpfs none {m}; cd {m}; mkdir -p src/sub; \
         cp {df} Dockerfile; echo ignored > src/skip.log; echo '**/*.log' > .dockerignore; \
         head -c 3000000 /dev/urandom > src/big; echo one > src/a; echo two > src/sub/b; \
         head -c 2000000 /dev/urandom > unread.bin; \
         B=\"{c} --host {host} {tls}\"; \
         $B ctr-img build -t r:1 . > ../out1; $B ctr-img build -t r:2 . > ../out2; \
         echo changed > src/a; $B ctr-img build -t r:3 . > ../out3; \
         printf 'FROM busybox\\nONBUILD COPY unread.bin /u\\n' > ob.Dockerfile; \
         $B ctr-img build -f ob.Dockerfile -t onb:1 . > ../out4; \
         printf 'FROM onb:1\\nCOPY src/a /a\\n' > child.Dockerfile; \
         $B ctr-img build -f child.Dockerfile -t child:1 . > ../out5; \
         cat ../out1; echo ===; cat ../out2; echo ===; cat ../out3; echo ===; cat ../out5",
        m = mnt.display(),
        df = d.dir.path().join("Dockerfile.remote").display(),
        c = client.display(),
    );
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env_remove("ISULABUILD_HOST")
        .output()
        .expect("unshare");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    // The daemon's view: the mount point is empty.
    assert_eq!(std::fs::read_dir(&mnt).expect("mnt").count(), 0);
    let parts: Vec<&str> = out.split("===").collect();
    let (f1, b1) = sent(parts[0]);
    let (f2, b2) = sent(parts[1]);
    let (f3, b3) = sent(parts[2]);
    // First: what the Dockerfile reads (COPY src/: big, a, b), less the ignored file; not
    // the Dockerfile, .dockerignore or the 2 MB the Dockerfile never reads.
    assert_eq!(f1, 3, "{out}");
    assert!(b1 > 3_000_000 && b1 < 3_100_000, "{out}");
    // Unchanged: nothing; one file changed: that file.
    assert_eq!((f2, b2), (0, 0), "{out}");
    assert_eq!((f3, b3), (1, 8), "{out}");
    // A base image's ONBUILD trigger may read anything: then the whole context goes (the
    // 2 MB file the trigger copies among it).
    let (f5, b5) = sent(parts[3]);
    assert!(f5 >= 2 && b5 >= 2_000_000, "{out}");
    assert_eq!(
        d.image_files("child:1").get("u").map(|e| e.content.len()),
        Some(2_000_000)
    );
    assert_eq!(
        cached_steps(parts[1]).len(),
        2,
        "an unchanged rebuild hits: {out}"
    );
    assert_eq!(d.image_text("r:1", "joined").as_deref(), Some("one\ntwo"));
    assert_eq!(
        d.image_text("r:3", "joined").as_deref(),
        Some("changed\ntwo")
    );
    assert!(
        d.image_text("r:1", "app/skip.log").is_none(),
        "ignored file sent"
    );
    // builder du shows the kept context; prune frees it.
    let du = d.ok(&["builder", "du"]);
    assert!(du.contains("build context of cn:builder"), "{du}");
    d.ok(&["builder", "prune", "-a", "-f"]);
    let du = d.ok(&["builder", "du"]);
    assert!(!du.contains("build context of"), "{du}");
    assert_eq!(
        std::fs::read_dir(d.data().join("contexts"))
            .expect("contexts")
            .count(),
        0
    );
}

#[test]
fn a_remote_context_over_the_layer_limit_is_refused_before_anything_is_kept() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_configured(
        &[("configuration.toml", "max_layer_size = \"3MB\"\n")],
        &["--host", &format!("tcp://{addr}"), "--insecure-tcp"],
        &[],
    );
    d.import_busybox("busybox:latest", &[]);
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nCOPY f /f\n").expect("df");
    // Within the limit: built (the positive control).
    std::fs::write(ctx.join("f"), vec![7u8; 100_000]).expect("f");
    let o = remote(
        &d,
        &addr,
        &[],
        &["ctr-img", "build", ctx.to_str().expect("utf8")],
    );
    assert!(o.status.success(), "{}", text(&o));
    let kept = d.data().join("contexts");
    let before = std::fs::read_dir(&kept).expect("contexts").count();
    std::fs::write(ctx.join("f"), vec![7u8; 4_000_000]).expect("f");
    let o = remote(
        &d,
        &addr,
        &[],
        &["ctr-img", "build", ctx.to_str().expect("utf8")],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("over the limit"), "{}", text(&o));
    assert_eq!(std::fs::read_dir(&kept).expect("contexts").count(), before);
}

#[test]
fn every_file_a_remote_command_names_travels_over_the_connection() {
    if !require_root() || !require_tool("openssl") || !require_tool("unshare") {
        return;
    }
    let pki = Pki::new();
    pki.sign("ca", "admin", "admin", CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let host = format!("tcp://{addr}");
    // The client's files are in a tmpfs of its own mount namespace: the daemon sees none.
    let mnt = d.dir.path().join("private");
    std::fs::create_dir_all(&mnt).expect("mnt");
    let client = bin("isula-build");
    let tls = pki.client("admin").join(" ");
    let script = format!(
        r#"set -e; mount -t tmpfs none {m}; cd {m}; B="{c} --host {host} {tls}"
        mkdir -p out ctx extra rf; echo hi > rf/hello; tar -cf rootfs.tar -C rf .
        echo from-extra > extra/e.txt; printf s3cret > secret.txt
        printf 'FROM busybox\nCOPY --from=extra e.txt /e.txt\nRUN --mount=type=secret,id=s cat /run/secrets/s > /s.txt\n' > ctx/Dockerfile
        printf 'FROM busybox\nRUN echo app > /app.txt\n' > app.Dockerfile
        echo "== save"; $B ctr-img save -o out/bb.tar busybox:latest
        tar -tf out/bb.tar | grep -q manifest.json
        echo "== load"; $B ctr-img load -i out/bb.tar
        echo "== import"; $B ctr-img import rootfs.tar imp:1
        echo "== build"; $B ctr-img build --build-context extra=extra --secret id=s,src=secret.txt \
            --iidfile out/iid -o docker-archive:out/built.tar:built:1 -t built:1 ctx
        echo "== iid $(cat out/iid)"
        tar -tf out/built.tar | grep -q manifest.json
        echo "== app"; $B ctr-img build -f app.Dockerfile -t app:1 ctx
        echo "== sep save"; $B ctr-img save -b busybox:latest -d out/sep app:1
        ls out/sep
        $B ctr-img rm app:1
        echo "== sep load"; $B ctr-img load -i app:1 -d out/sep
        echo "== exists"; if $B ctr-img save -o out/bb.tar busybox:latest 2>&1; then exit 9; fi
        echo "== disconnect"; head -c 1500000000 /dev/zero > big.tar
        if timeout -s KILL 1 $B ctr-img load -i big.tar; then exit 8; fi
        echo "== end""#,
        m = mnt.display(),
        c = client.display(),
    );
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env_remove("ISULABUILD_HOST")
        .output()
        .expect("unshare");
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("== end"), "{out}");
    assert_eq!(std::fs::read_dir(&mnt).expect("mnt").count(), 0);
    // The build's image: its named context and secret came from the client's files, and
    // the --iidfile written there holds its ID.
    assert_eq!(
        d.image_text("built:1", "e.txt").as_deref(),
        Some("from-extra")
    );
    assert_eq!(d.image_text("built:1", "s.txt").as_deref(), Some("s3cret"));
    assert_eq!(d.image_text("imp:1", "hello").as_deref(), Some("hi"));
    let iid = out
        .lines()
        .find_map(|l| l.strip_prefix("== iid "))
        .expect("iid line")
        .to_string();
    assert_eq!(iid.len(), 64, "{out}");
    let inspect = d.ok(&["ctr-img", "images", "built:1"]);
    assert!(inspect.contains(&iid[..12]), "{inspect}\n{out}");
    assert!(out.contains("Loaded image as"), "{out}");
    assert!(
        out.contains("app1_latest") || out.contains("app_1_app_image"),
        "{out}"
    );
    // An existing output is refused, naming the client's path (not the daemon's).
    let exists = out.split("== exists").nth(1).unwrap_or_default();
    assert!(
        exists.contains("out/bb.tar") && exists.contains("exist"),
        "{out}"
    );
    assert!(!exists.contains("/.isula-remote"), "{out}");
    // Nothing is left on the daemon: no upload (the killed one included), no output.
    let left = || -> Vec<PathBuf> {
        let mut v = Vec::new();
        for owner in std::fs::read_dir(d.data().join("remote-files"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for kind in ["in", "out"] {
                v.extend(
                    std::fs::read_dir(owner.path().join(kind))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .map(|e| e.path()),
                );
            }
        }
        v
    };
    wait_until_explained(
        "the upload to be removed",
        std::time::Duration::from_secs(20),
        || left().is_empty(),
        || format!("{:?}\n{out}", left()),
    );
    // The positive control for "nothing left": the owner's directory was used.
    assert!(d.data().join("remote-files").is_dir());
}

#[test]
fn a_context_that_changes_while_it_is_sent_fails_clearly_and_keeps_the_last_one() {
    if !require_root() || !require_tool("openssl") {
        return;
    }
    let pki = Pki::new();
    pki.sign("ca", "builder", "builder", CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let tls = pki.client("builder");
    let ctx = d.dir.path().join("changing");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nCOPY . /c/\n").expect("df");
    std::fs::write(ctx.join("grow"), "start\n").expect("grow");
    // Small files sent in the same message as "grow" (before it, by name), so the batch
    // that fails holds files the daemon has already made.
    for i in 0..300 {
        std::fs::write(ctx.join(format!("f{i:03}")), format!("small {i}\n")).expect("small");
    }
    let ctx_s = ctx.display().to_string();
    // Positive control: a still context builds.
    let o = remote(&d, &addr, &tls, &["ctr-img", "build", "-t", "c:1", &ctx_s]);
    assert!(o.status.success(), "{}", text(&o));
    // A file written to all the time while the context is listed and sent.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), ctx.join("grow"));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .expect("grow");
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = f.write_all(&[b'x'; 4096]);
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    };
    let o = remote(&d, &addr, &tls, &["ctr-img", "build", "-t", "c:2", &ctx_s]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().expect("writer");
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    assert!(
        out.contains("grow changed while the build context was sent"),
        "{out}"
    );
    let images = d.images();
    let tagged = |tag: &str| images.iter().any(|(r, t, _)| r.ends_with("c") && t == tag);
    assert!(tagged("1"), "{images:?}");
    assert!(
        !tagged("2"),
        "no image from a half-sent context: {images:?}"
    );
    // The last context the daemon kept is whole: the image from it still reads "start",
    // and the failed sync left no generation beside it.
    assert_eq!(d.image_text("c:1", "c/grow").as_deref(), Some("start"));
    assert_eq!(generations(&d).len(), 1, "{:?}", generations(&d));
    let o = remote(&d, &addr, &tls, &["ctr-img", "build", "-t", "c:3", &ctx_s]);
    assert!(o.status.success(), "{}", text(&o));
    let grown = std::fs::read(ctx.join("grow")).expect("grow");
    assert_eq!(
        d.image_files("c:3")
            .get("c/grow")
            .map(|e| e.content.clone()),
        Some(grown),
        "the next build sends the file as it is now"
    );
}

#[test]
fn a_client_that_goes_away_mid_context_leaves_nothing_behind() {
    if !require_root() || !require_tool("openssl") {
        return;
    }
    let pki = Pki::new();
    pki.sign("ca", "builder", "builder", CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let tls = pki.client("builder");
    let ctx = d.dir.path().join("big-ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nCOPY . /c/\n").expect("df");
    std::fs::write(ctx.join("small"), "kept\n").expect("small");
    let ctx_s = ctx.display().to_string();
    // Positive control: a whole sync keeps one generation of this client's context.
    let o = remote(&d, &addr, &tls, &["ctr-img", "build", "-t", "g:1", &ctx_s]);
    assert!(o.status.success(), "{}", text(&o));
    let tree_of = || generations(&d);
    let before = tree_of();
    assert_eq!(before.len(), 1, "{before:?}");
    // Small files sent in the same message as the first chunk of "big" (before it, by
    // name): made by the daemon before the client is killed.
    for i in 0..500 {
        std::fs::write(ctx.join(format!("a{i:03}")), format!("small {i}\n")).expect("small");
    }
    // A file big enough that the client is still sending it when it is killed.
    let big = std::fs::File::create(ctx.join("big")).expect("big");
    big.set_len(3 << 30).expect("sparse 3 GiB");
    let mut c = d.cli_command(&[]);
    c.arg("--host")
        .arg(format!("tcp://{addr}"))
        .args(&tls)
        .args(["ctr-img", "build", "-t", "g:2", &ctx_s])
        .env_remove("ISULA_BUILD_CERT_PATH")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().expect("client");
    // Killed once the daemon has begun receiving (a new generation appeared).
    wait_until(
        "the daemon to begin receiving",
        std::time::Duration::from_secs(60),
        || tree_of().len() >= 2,
    );
    assert_eq!(tree_of().len(), 2, "the daemon never began receiving");
    child.kill().expect("kill");
    let _ = child.wait();
    // The half-received generation goes; the last one stays, whole.
    wait_until_explained(
        "the half-received generation to go",
        std::time::Duration::from_secs(30),
        || tree_of() == before,
        || format!("{:?} against {before:?}", tree_of()),
    );
    assert!(d.images().iter().all(|(_, t, _)| t != "2"));
    std::fs::remove_file(ctx.join("big")).expect("rm big");
    let o = remote(&d, &addr, &tls, &["ctr-img", "build", "-t", "g:3", &ctx_s]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(d.image_text("g:3", "c/small").as_deref(), Some("kept"));
}

#[test]
fn a_client_may_keep_only_so_many_uploads_waiting() {
    if !require_root() || !require_tool("openssl") {
        return;
    }
    let pki = Pki::new();
    pki.sign("ca", "admin", "admin", CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let tls = pki.client("admin");
    let archive = d.dir.path().join("bb.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "-o",
        archive.to_str().expect("utf8"),
        "busybox:latest",
    ]);
    let load = || {
        remote(
            &d,
            &addr,
            &tls,
            &["ctr-img", "load", "-i", archive.to_str().expect("utf8")],
        )
    };
    // Positive control: a load over the connection works.
    let o = load();
    assert!(o.status.success(), "{}", text(&o));
    // Sixteen uploads of this client waiting (as if their commands still ran).
    use sha2::Digest as _;
    let owner = &hex::encode(sha2::Sha256::digest(b"cn:admin"))[..32];
    let waiting = d.data().join("remote-files").join(owner).join("in");
    for i in 0..16 {
        std::fs::create_dir_all(waiting.join(format!("{i:032x}"))).expect("waiting upload");
    }
    let o = load();
    assert!(!o.status.success());
    assert!(
        text(&o).contains("16 uploads of this client wait to be used (at most 16)"),
        "{}",
        text(&o)
    );
    std::fs::remove_dir_all(&waiting).expect("rm");
    let o = load();
    assert!(o.status.success(), "{}", text(&o));
}

/// Every path under `dir` that is the inode `ino` (device, inode).
fn paths_of(dir: &std::path::Path, ino: (u64, u64)) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            stack.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if (m.dev(), m.ino()) == ino {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn a_remote_copy_links_the_synced_files_and_makes_the_layer_a_local_copy_makes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !require_root() || !require_tool("openssl") {
        return;
    }
    let pki = Pki::new();
    pki.sign("ca", "builder", "builder", CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let tls = pki.client("builder");
    let ctx = d.dir.path().join("linked");
    std::fs::create_dir_all(ctx.join("src/sub")).expect("ctx");
    std::fs::write(ctx.join("src/a"), "one\n").expect("a");
    std::fs::write(ctx.join("src/sub/b"), "two\n").expect("b");
    std::fs::set_permissions(
        ctx.join("src/sub/b"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::fs::write(ctx.join("src/big"), noise(2, 7)).expect("big");
    std::fs::write(ctx.join("src/empty"), "").expect("empty");
    std::fs::create_dir_all(ctx.join("dup/in")).expect("dup");
    std::fs::write(ctx.join("dup/in/d"), "dup\n").expect("d");
    // Linked: /c/ (step 1). Copied: a file again in a later step (src/a is in a layer
    // then), with another mode (a link would share the mode), and dup/in/d at its second
    // place in one step (the first links it).
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nCOPY src/ /c/\nCOPY src/a /twice/a\nCOPY --chmod=600 src/sub/b /own/b\nCOPY dup/in dup/ /x/\n",
    )
    .expect("df");
    let ctx_s = ctx.display().to_string();
    // One build time for every build: the directories a build makes (/x/) take its clock,
    // and two builds may straddle a second.
    let epoch = ["--build-arg", "SOURCE_DATE_EPOCH=1600000000"];
    let o = remote(
        &d,
        &addr,
        &tls,
        &["ctr-img", "build", epoch[0], epoch[1], "-t", "r:1", &ctx_s],
    );
    assert!(o.status.success(), "{}", text(&o));
    // The oracle: the same build from the local socket, copying (no cache: nothing of
    // the remote build is reused).
    d.ok(&[
        "ctr-img",
        "build",
        epoch[0],
        epoch[1],
        "--no-cache",
        "-t",
        "l:1",
        &ctx_s,
    ]);
    let entries = |img: &str| {
        let (e, _) = d.layer_entries(img);
        e.into_iter()
            .map(|e| (e.path, e.mode, e.uid, e.gid, e.mtime, e.content))
            .collect::<Vec<_>>()
    };
    let (remote_layers, local_layers) = (entries("r:1"), entries("l:1"));
    assert!(
        remote_layers
            .iter()
            .any(|e| e.0 == "x/in/d" && e.5 == b"dup\n"),
        "{remote_layers:?}"
    );
    // The directory the build made has the build's time in both (the flake this avoids).
    assert!(
        remote_layers
            .iter()
            .any(|e| e.0.trim_end_matches('/') == "x" && e.4 == 1_600_000_000),
        "{remote_layers:?}"
    );
    assert!(
        remote_layers == local_layers,
        "remote {remote_layers:?}\nlocal {local_layers:?}"
    );
    // The synced files of step 1 are the layer's: a link each (the context's, and the
    // build's snapshot and layer).
    let tree = generations(&d).pop().expect("a generation").join("tree");
    let a = std::fs::metadata(tree.join("src/a")).expect("a");
    let linked = paths_of(&d.data(), (a.dev(), a.ino()));
    assert!(
        linked.iter().any(|p| p.ends_with("c/a")) && linked.len() >= 2,
        "{linked:?}"
    );
    assert!(
        linked.iter().all(|p| !p.ends_with("twice/a")),
        "src/a in two steps' layers is two files: {linked:?}"
    );
    let b = std::fs::metadata(tree.join("src/sub/b")).expect("b");
    let linked_b = paths_of(&d.data(), (b.dev(), b.ino()));
    assert!(
        linked_b.iter().all(|p| !p.ends_with("own/b")),
        "another mode is a copy: {linked_b:?}"
    );
    let dup = std::fs::metadata(tree.join("dup/in/d")).expect("d");
    let linked_d = paths_of(&d.data(), (dup.dev(), dup.ino()));
    // Linked at one of its two places only.
    assert!(
        linked_d.iter().any(|p| p.ends_with("x/d"))
            != linked_d.iter().any(|p| p.ends_with("x/in/d")),
        "{linked_d:?}"
    );
    // The client changes src/a: the next sync makes it a new inode; the layers keep theirs.
    std::fs::write(ctx.join("src/a"), "ONE\n").expect("a");
    let o = remote(
        &d,
        &addr,
        &tls,
        &["ctr-img", "build", epoch[0], epoch[1], "-t", "r:2", &ctx_s],
    );
    assert!(o.status.success(), "{}", text(&o));
    let layer_copies: Vec<&PathBuf> = linked
        .iter()
        .filter(|p| !p.starts_with(d.data().join("contexts")))
        .collect();
    assert!(!layer_copies.is_empty(), "{linked:?}");
    for p in layer_copies {
        assert_eq!(
            std::fs::read_to_string(p).expect("layer file"),
            "one\n",
            "{}",
            p.display()
        );
    }
    assert_eq!(d.image_text("r:2", "c/a").as_deref(), Some("ONE"));
    assert_eq!(d.image_text("r:1", "c/a").as_deref(), Some("one"));
    // An unchanged rebuild after the links (which change the files' ctime) reads nothing
    // and hits every step.
    let o = remote(
        &d,
        &addr,
        &tls,
        &["ctr-img", "build", epoch[0], epoch[1], "-t", "r:3", &ctx_s],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert_eq!(sent(&out), (0, 0), "{out}");
    assert_eq!(cached_steps(&out).len(), 4, "{out}");
}

#[test]
fn a_context_synced_in_another_boot_is_sent_again() {
    if !require_root() || !require_tool("openssl") {
        return;
    }
    let pki = Pki::new();
    pki.sign("ca", "builder", "builder", CLIENT);
    let (d, addr) = tls_daemon(&pki);
    let tls = pki.client("builder");
    let ctx = d.dir.path().join("booted");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("Dockerfile"), "FROM busybox\nCOPY f g /c/\n").expect("df");
    std::fs::write(ctx.join("f"), "f\n").expect("f");
    std::fs::write(ctx.join("g"), "g\n").expect("g");
    let ctx_s = ctx.display().to_string();
    let build = |tag: &str| {
        let o = remote(&d, &addr, &tls, &["ctr-img", "build", "-t", tag, &ctx_s]);
        let out = text(&o);
        assert!(o.status.success(), "{out}");
        sent(&out)
    };
    assert_eq!(build("b:1"), (2, 4));
    // Positive control: in the same boot, an unchanged context is not sent again.
    assert_eq!(build("b:2"), (0, 0));
    // Its files were never fsynced: after a power cut (another boot) they are not trusted.
    let gens = generations(&d);
    assert_eq!(gens.len(), 1, "{gens:?}");
    std::fs::write(gens[0].join("boot"), "00000000-0000-0000-0000-000000000000").expect("boot");
    assert_eq!(build("b:3"), (2, 4));
    assert_eq!(generations(&d).len(), 1, "the untrusted one went");
}
