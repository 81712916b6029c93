//! Power cuts: the data root (and config directory) on a small loop-mounted ext4 that is
//! shut down without flushing its journal (`EXT4_IOC_SHUTDOWN`, NOLOGFLUSH) right after an
//! operation reports success, then mounted again and the daemon restarted. The oracle: a
//! build FROM each image sees exactly the files it was given (every file checks against
//! its sha256, and busybox itself must exec), names point where they pointed, and
//! `--check-store` passes. A cut in the middle of an operation must leave a store that
//! starts and passes `--check-store`, with the interrupted work gone.
//!
//! The positive controls: `--check-store` refuses a layer directory emptied behind its
//! back (and repairs it from its blob), and names the image when no blob holds the layer.

use isula_integration::powercut::{self, Ext4};
use isula_integration::registry::{Registry, RegistryOptions};
use isula_integration::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Small files per payload: a realistic rootfs has thousands.
const FILES: usize = 2500;

fn ready() -> bool {
    powercut::available() && require_tool("runc") && require_tool("docker-registry")
}

/// Deterministic bytes of `len` for `seed`.
fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A busybox rootfs with FILES files under /payload/ (seeded by `seed`) and
/// /payload.sums, which `sha256sum -c` checks them against.
fn payload_rootfs(seed: u64) -> Vec<u8> {
    let files: Vec<(String, Vec<u8>)> = (0..FILES)
        .map(|i| {
            let len = 64 + (i * 131 + seed as usize * 17) % 3000;
            (
                format!("payload/f{i}"),
                bytes(seed * 100_000 + i as u64, len),
            )
        })
        .collect();
    let sums: String = files
        .iter()
        .map(|(p, c)| format!("{}  /{p}\n", sha256_hex(c)))
        .collect();
    let mut extra: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    extra.push(("payload.sums", sums.as_bytes()));
    busybox_rootfs(&extra)
}

/// A build FROM `image` checks every file `sums` (in the image) lists: an empty or torn
/// file fails it, and so does an empty busybox (it cannot exec).
fn sees_its_files(d: &Daemon, image: &str, sums: &[&str]) {
    let ctx = tempfile::tempdir().expect("ctx");
    let checks: Vec<String> = sums
        .iter()
        .map(|s| format!("sha256sum -c -s {s}"))
        .chain(["busybox true".to_string()])
        .collect();
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!(
            "FROM {image}\nRUN {} && echo verified\n",
            checks.join(" && ")
        ),
    )
    .expect("Dockerfile");
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--no-cache",
        "-t",
        "oracle:1",
        ctx.path().to_str().expect("path"),
    ]);
    assert!(out.contains("verified"), "{image}: {out}");
    d.ok(&["ctr-img", "rm", "oracle:1"]);
}

fn sorted_images(d: &Daemon) -> Vec<(String, String, String)> {
    let mut v = d.images();
    v.sort();
    v
}

/// Whether the store's record holds a packed layer now (a loaded or pulled layer whose
/// directory the idle unpack has not made yet): the "packed" cuts must find one.
fn packed_now(d: &Daemon) -> bool {
    let text = std::fs::read_to_string(d.data().join("metadata.json")).expect("metadata");
    let meta: serde_json::Value = serde_json::from_str(&text).expect("metadata json");
    meta["packed"].as_object().is_some_and(|p| !p.is_empty())
}

/// Cuts the power, brings the machine back, and requires the names to point where they
/// pointed and `--check-store` to pass.
fn cut(fs: &mut Ext4, d: &mut Daemon, what: &str) {
    let before = sorted_images(d);
    powercut::cut_and_restart(fs, d);
    assert_eq!(
        sorted_images(d),
        before,
        "names after a power cut after {what}"
    );
    check_store(d, what);
}

fn check_store(d: &mut Daemon, what: &str) {
    let stopped = d.stop();
    assert_eq!(
        stopped,
        Some(0),
        "the daemon did not stop cleanly after {what}:\n{}",
        d.log()
    );
    let check = d.command().arg("--check-store").output().expect("check");
    let out = String::from_utf8_lossy(&check.stdout).to_string();
    assert!(
        check.status.success() && !out.contains("repaired"),
        "--check-store after {what}: {out}\n{}",
        String::from_utf8_lossy(&check.stderr)
    );
    d.restart();
}

fn write(dir: &Path, name: &str, data: &[u8]) -> String {
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write");
    p.to_str().expect("path").to_string()
}

#[test]
fn import_load_and_pull_survive_a_power_cut() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let regs = insecure_registries(&[&host]);
    // The images to pull, pushed by a daemon of their own.
    let src = Daemon::for_registries(&[&host]);
    let inputs = tempfile::tempdir().expect("inputs");
    for (seed, name) in [(4, "pl:1"), (5, "pl:2")] {
        let tar = write(inputs.path(), "p.tar", &payload_rootfs(seed));
        let full = format!("{host}/{name}");
        src.ok(&["ctr-img", "import", &tar, &full]);
        src.ok(&["ctr-img", "push", &full]);
    }
    drop(src);

    let mut fs = Ext4::new(1024);
    let mut d = powercut::daemon_on(&fs, &[("registries.toml", &regs)], &[]);

    let tar = write(inputs.path(), "imp.tar", &payload_rootfs(1));
    d.ok(&["ctr-img", "import", &tar, "imp:1"]);
    cut(&mut fs, &mut d, "an import");
    sees_its_files(&d, "imp:1", &["/payload.sums"]);

    // A load, cut while its layer is still packed, then one cut after the idle unpack.
    let a = write(
        inputs.path(),
        "ld1.tar",
        &docker_archive(&[payload_rootfs(2)], "ld:1"),
    );
    d.ok(&["ctr-img", "load", "-i", &a]);
    assert!(
        packed_now(&d),
        "the load's layer was unpacked before the cut"
    );
    cut(&mut fs, &mut d, "a load (packed)");
    sees_its_files(&d, "ld:1", &["/payload.sums"]);
    let a = write(
        inputs.path(),
        "ld2.tar",
        &docker_archive(&[payload_rootfs(3)], "ld:2"),
    );
    d.ok(&["ctr-img", "load", "-i", &a]);
    d.wait_idle();
    cut(&mut fs, &mut d, "a load (unpacked when idle)");
    sees_its_files(&d, "ld:2", &["/payload.sums"]);

    // The same for a pull.
    let p1 = format!("{host}/pl:1");
    d.ok(&["ctr-img", "pull", &p1]);
    assert!(
        packed_now(&d),
        "the pull's layer was unpacked before the cut"
    );
    cut(&mut fs, &mut d, "a pull (packed)");
    sees_its_files(&d, &p1, &["/payload.sums"]);
    let p2 = format!("{host}/pl:2");
    d.ok(&["ctr-img", "pull", &p2]);
    d.wait_idle();
    cut(&mut fs, &mut d, "a pull (unpacked when idle)");
    sees_its_files(&d, &p2, &["/payload.sums"]);
    // Every image still builds after all the cuts.
    for img in ["imp:1", "ld:1", "ld:2"] {
        sees_its_files(&d, img, &["/payload.sums"]);
    }
}

/// A context of `n` files under app/ with app.sums, an archive for ADD with its sums,
/// and a secret.
fn build_context(dir: &Path, seed: u64, base: &str) {
    let app = dir.join("app");
    std::fs::create_dir_all(&app).expect("app");
    let mut sums = String::new();
    for i in 0..400 {
        let c = bytes(seed * 1000 + i, 50 + (i as usize * 97) % 5000);
        std::fs::write(app.join(format!("a{i}")), &c).expect("file");
        sums.push_str(&format!("{}  /app/a{i}\n", sha256_hex(&c)));
    }
    std::fs::write(dir.join("app.sums"), sums).expect("sums");
    let added: Vec<(String, Vec<u8>)> = (0..200)
        .map(|i| (format!("x{i}"), bytes(seed * 7000 + i, 300 + i as usize)))
        .collect();
    let refs: Vec<(&str, &[u8])> = added
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_slice()))
        .collect();
    std::fs::write(dir.join("arch.tar"), files_tar(&refs)).expect("arch");
    let added_sums: String = added
        .iter()
        .map(|(p, c)| format!("{}  /added/{p}\n", sha256_hex(c)))
        .collect();
    std::fs::write(dir.join("added.sums"), added_sums).expect("added sums");
    std::fs::write(dir.join("tok"), format!("secret-{seed}")).expect("secret");
    std::fs::write(
        dir.join("Dockerfile"),
        format!(
            "FROM {base} AS gen\n\
             RUN mkdir /gen && for i in $(seq 1 300); do head -c $((i * 37)) /payload/f$i > /gen/g$i; done && cd /gen && sha256sum g* | sed 's|  |  /gen/|' > /gen.sums\n\
             FROM {base}\n\
             COPY app/ /app/\n\
             COPY app.sums added.sums /\n\
             ADD arch.tar /added/\n\
             COPY --from=gen /gen /gen\n\
             COPY --from=gen /gen.sums /gen.sums\n\
             RUN --mount=type=bind,source=app,target=/ctx-app cp -a /ctx-app /bound && sed 's|/app/|/bound/|' /app.sums > /bound.sums\n\
             RUN --mount=type=cache,target=/cache echo cached > /cache/x && cp /cache/x /cached\n\
             RUN --mount=type=tmpfs,target=/scratch echo tmpfs > /scratch/t && cp /scratch/t /tmpfsed\n\
             RUN --mount=type=secret,id=tok sha256sum /run/secrets/tok | cut -d' ' -f1 > /secret.sum\n\
             RUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" && echo agent > /ssh\n\
             RUN for f in cached tmpfsed ssh secret.sum; do test -s /$f; done && echo built > /built\n"
        ),
    )
    .expect("Dockerfile");
}

const BUILT_SUMS: &[&str] = &[
    "/payload.sums",
    "/app.sums",
    "/added.sums",
    "/gen.sums",
    "/bound.sums",
];

struct Agent {
    child: std::process::Child,
    sock: String,
}

impl Agent {
    fn start(dir: &Path) -> Agent {
        let sock = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .arg("-D")
            .arg("-a")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ssh-agent");
        wait_until("ssh-agent", Duration::from_secs(10), || sock.exists());
        Agent {
            child,
            sock: sock.to_str().expect("path").to_string(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn build(d: &Daemon, ctx: &Path, agent: &Agent, tag: &str) -> String {
    let mut c = d.cli_command(&["ctr-img", "build", "-t", tag]);
    c.args([
        "--secret",
        &format!("id=tok,src={}", ctx.join("tok").display()),
    ])
    .args(["--ssh", &format!("default={}", agent.sock)])
    .arg(ctx);
    let o = c.output().expect("build");
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "build failed: {out}{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        d.log()
    );
    out
}

#[test]
fn builds_and_names_survive_a_power_cut() {
    if !ready() || !require_tool("ssh-agent") {
        return;
    }
    let inputs = tempfile::tempdir().expect("inputs");
    let agent = Agent::start(inputs.path());
    let mut fs = Ext4::new(1024);
    let mut d = powercut::daemon_on(&fs, &[], &["--log-level", "debug"]);
    let tar = write(inputs.path(), "base.tar", &payload_rootfs(11));
    d.ok(&["ctr-img", "import", &tar, "base:1"]);
    let ctx = inputs.path().join("ctx");
    build_context(&ctx, 1, "base:1");

    // COPY, ADD, RUN, every RUN --mount kind, a multi-stage build.
    let first = build_id(&build(&d, &ctx, &agent, "app:1"));
    cut(&mut fs, &mut d, "a build");
    sees_its_files(&d, "app:1", BUILT_SUMS);
    assert_eq!(
        d.image_text("app:1", "secret.sum").as_deref(),
        Some(sha256_hex(b"secret-1").as_str())
    );

    // A COPY that ends its stage writes its layer as a tar, kept packed (its directory is
    // made later): the cut comes before that.
    let packed = inputs.path().join("packed");
    std::fs::create_dir_all(&packed).expect("packed");
    let mut sums = String::new();
    for i in 0..300 {
        let c = bytes(5000 + i, 100 + (i as usize * 131) % 9000);
        std::fs::write(packed.join(format!("f{i}")), &c).expect("file");
        sums.push_str(&format!("{}  /packed/f{i}\n", sha256_hex(&c)));
    }
    std::fs::write(packed.join("packed.sums"), sums).expect("sums");
    std::fs::write(packed.join("Dockerfile"), "FROM base:1\nCOPY . /packed/\n").expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "packed:1",
        packed.to_str().expect("utf8"),
    ]);
    assert!(
        d.log().contains("COPY writes its layer as a tar"),
        "{}",
        d.log()
    );
    cut(
        &mut fs,
        &mut d,
        "a build whose COPY wrote its layer as a tar",
    );
    sees_its_files(&d, "packed:1", &["/packed/packed.sums"]);

    // The cache is whole after the cut: the same build hits on every step.
    let out = build(&d, &ctx, &agent, "app:1");
    assert_eq!(build_id(&out), first, "{out}");
    let steps = out
        .lines()
        .filter(|l| l.starts_with("STEP ") && !l.contains(": FROM "))
        .count();
    assert_eq!(cached_steps(&out).len(), steps, "every step hits: {out}");
    cut(&mut fs, &mut d, "a cached build");

    // Rename by a rebuild: app:1 moves to the new image.
    std::fs::write(ctx.join("app/a7"), b"changed").expect("change");
    let sums = std::fs::read_to_string(ctx.join("app.sums")).expect("sums");
    let sums: String = sums
        .lines()
        .map(|l| {
            if l.ends_with("/app/a7") {
                format!("{}  /app/a7\n", sha256_hex(b"changed"))
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(ctx.join("app.sums"), sums).expect("sums");
    let second = build_id(&build(&d, &ctx, &agent, "app:1"));
    assert_ne!(second, first);
    cut(&mut fs, &mut d, "a rebuild that moved a name");
    let app = d
        .images()
        .into_iter()
        .find(|(r, t, _)| r.ends_with("app") && t == "1")
        .expect("app:1");
    assert!(second.starts_with(&app.2), "app:1 is {app:?}, not {second}");
    sees_its_files(&d, "app:1", BUILT_SUMS);

    // Tag and rm.
    d.ok(&["ctr-img", "tag", "app:1", "app:2"]);
    cut(&mut fs, &mut d, "a tag");
    sees_its_files(&d, "app:2", BUILT_SUMS);
    d.ok(&["ctr-img", "rm", "app:2"]);
    cut(&mut fs, &mut d, "an untag");
    d.ok(&["ctr-img", "rm", "app:1"]);
    cut(&mut fs, &mut d, "a removal");
    assert!(!d.images().iter().any(|(r, _, _)| r.ends_with("app")));
    sees_its_files(&d, "base:1", &["/payload.sums"]);
}

#[test]
fn cache_imports_logins_saves_and_migrations_survive_a_power_cut() {
    if !ready() || !require_tool("buildah") {
        return;
    }
    let reg = Registry::start(RegistryOptions {
        htpasswd: Some(("tester".into(), "pw-1".into())),
        ..Default::default()
    });
    let host = reg.host();
    let regs = insecure_registries(&[&host]);
    let inputs = tempfile::tempdir().expect("inputs");
    let mut fs = Ext4::new(1024);

    // A store of isula-build 0.9 (containers/storage, made by buildah) to migrate.
    let old = fs.path().join("data/storage");
    std::fs::create_dir_all(&old).expect("old store");
    let rootfs = inputs.path().join("rootfs");
    std::fs::create_dir_all(&rootfs).expect("rootfs");
    let tar = write(inputs.path(), "old.tar", &payload_rootfs(21));
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-xf")
            .arg(&tar),
    );
    let buildah = |args: &[&str]| {
        run_ok(
            Command::new("buildah")
                .arg("--root")
                .arg(&old)
                .arg("--runroot")
                .arg(inputs.path().join("buildah-run"))
                .args(["--storage-driver", "overlay"])
                .args(args),
        )
        .trim()
        .to_string()
    };
    let c = buildah(&["from", "scratch"]);
    buildah(&["copy", &c, rootfs.to_str().expect("path"), "/"]);
    buildah(&["commit", "-q", &c, "localhost/old:1"]);
    buildah(&["rm", &c]);
    let _ = Command::new("buildah")
        .arg("--root")
        .arg(&old)
        .args(["--storage-driver", "overlay", "unshare", "true"])
        .output();
    let mut d = powercut::daemon_on(&fs, &[("registries.toml", &regs)], &[]);
    assert!(
        d.images().iter().any(|(r, _, _)| r.ends_with("old")),
        "migrated: {:?}\n{}",
        d.images(),
        d.log()
    );
    cut(&mut fs, &mut d, "a store migration");
    sees_its_files(&d, "localhost/old:1", &["/payload.sums"]);

    // Login: auth.json survives.
    let o = d.login(&host, "tester", "pw-1");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    cut(&mut fs, &mut d, "a login");
    let auth = std::fs::read_to_string(d.etc().join("auth.json")).expect("auth.json");
    assert!(auth.contains(&host), "{auth}");

    // --cache-from: a cache exported by another daemon, imported here.
    let base = format!("{host}/base:1");
    let cache = format!("{host}/cache:1");
    let other = Daemon::for_registries(&[&host]);
    assert!(other.login(&host, "tester", "pw-1").status.success());
    let tar = write(inputs.path(), "base.tar", &payload_rootfs(22));
    other.ok(&["ctr-img", "import", &tar, &base]);
    other.ok(&["ctr-img", "push", &base]);
    let ctx = inputs.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN mkdir /gen && for i in $(seq 1 200); do head -c $((i * 53)) /payload/f$i > /gen/g$i; done && cd /gen && sha256sum g* | sed 's|  |  /gen/|' > /gen.sums\n"),
    )
    .expect("Dockerfile");
    let c = ctx.to_str().expect("path");
    let first = build_id(&other.ok(&["ctr-img", "build", "--cache-to", &cache, "-t", "c:1", c]));
    let out = d.ok(&["ctr-img", "build", "--cache-from", &cache, "-t", "c:1", c]);
    assert_eq!(build_id(&out), first, "{out}");
    cut(&mut fs, &mut d, "a --cache-from build");
    sees_its_files(&d, "c:1", &["/payload.sums", "/gen.sums"]);

    // Save: the archive is whole after the cut.
    let out_dir = fs.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("out");
    let archive = out_dir.join("c.tar");
    d.ok(&[
        "ctr-img",
        "save",
        "c:1",
        "-o",
        archive.to_str().expect("path"),
    ]);
    let saved = std::fs::read(&archive).expect("archive");
    cut(&mut fs, &mut d, "a save");
    assert_eq!(
        sha256_hex(&std::fs::read(&archive).expect("archive after the cut")),
        sha256_hex(&saved),
        "the saved archive changed in the cut"
    );
}

/// Runs `args` and cuts the power at a random point of it; returns whether the client
/// reported success before the cut.
fn cut_during(fs: &mut Ext4, d: &mut Daemon, args: &[&str], within: Duration, seed: u64) -> bool {
    let delay = within.mul_f64((seed % 1000) as f64 / 1000.0);
    // Only its status counts (its output, unread, could fill a pipe and stop it: a build
    // whose RUN meets the cut prints an error per file).
    let mut child = d
        .cli_command(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("client");
    // The cut point is a time: waiting for it is what this test means by a random point.
    std::thread::sleep(delay);
    let finished = child.try_wait().ok().flatten().map(|s| s.success());
    fs.cut();
    let status = match finished {
        Some(ok) => ok,
        None => child.wait().map(|s| s.success()).unwrap_or(false),
    };
    powercut::crash(fs, d);
    d.restart();
    status
}

#[test]
fn a_cut_in_the_middle_leaves_a_store_that_starts_and_checks() {
    if !ready() {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let host = reg.host();
    let regs = insecure_registries(&[&host]);
    let inputs = tempfile::tempdir().expect("inputs");
    let src = Daemon::for_registries(&[&host]);
    let pulled = format!("{host}/big:1");
    let tar = write(inputs.path(), "big.tar", &big_rootfs(60));
    src.ok(&["ctr-img", "import", &tar, &pulled]);
    src.ok(&["ctr-img", "push", &pulled]);
    drop(src);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    eprintln!("cut points seed: {seed}");

    let mut fs = Ext4::new(1024);
    let mut d = powercut::daemon_on(&fs, &[("registries.toml", &regs)], &[]);
    let base_tar = write(inputs.path(), "base.tar", &payload_rootfs(31));
    d.ok(&["ctr-img", "import", &base_tar, "base:1"]);
    cut(&mut fs, &mut d, "the base import");
    let ctx = inputs.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM base:1\nRUN for i in $(seq 1 40); do head -c 1000000 /dev/urandom > /r$i; done\nRUN cp -a /payload /copy\n",
    )
    .expect("Dockerfile");
    let archive = write(
        inputs.path(),
        "load.tar",
        &docker_archive(&[big_rootfs(60)], "ld:1"),
    );
    let save_to = fs.path().join("saved.tar");
    // Each operation, what it makes (removed after the run that times it), and its args.
    let strings = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<String>>();
    let c = ctx.to_str().expect("path");
    let saved = save_to.to_str().expect("path");
    let ops: Vec<(&str, &str, Vec<String>)> = vec![
        (
            "import",
            "im:1",
            strings(&["ctr-img", "import", &tar, "im:1"]),
        ),
        (
            "load",
            "ld:1",
            strings(&["ctr-img", "load", "-i", &archive]),
        ),
        ("pull", &pulled, strings(&["ctr-img", "pull", &pulled])),
        (
            "build",
            "bu:1",
            strings(&["ctr-img", "build", "--no-cache", "-t", "bu:1", c]),
        ),
        (
            "save",
            "",
            strings(&["ctr-img", "save", "base:1", "-o", saved]),
        ),
    ];
    for (i, (what, made, args)) in ops.iter().enumerate() {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // Timed once, then undone, so that the cut lands inside the operation.
        let start = Instant::now();
        d.ok(&args);
        let took = start.elapsed();
        if made.is_empty() {
            std::fs::remove_file(&save_to).expect("remove the saved archive");
        } else {
            d.ok(&["ctr-img", "rm", made]);
        }
        let before = sorted_images(&d);
        let point = seed.rotate_left(i as u32 * 7);
        let within = took.mul_f64(0.9);
        let done = cut_during(&mut fs, &mut d, &args, within, point);
        eprintln!(
            "{what}: takes {} ms, cut at {} ms, finished first: {done}",
            took.as_millis(),
            within.mul_f64((point % 1000) as f64 / 1000.0).as_millis()
        );
        // The store starts (restart did), passes the check, and holds nothing half-done.
        check_store(&mut d, &format!("a cut during {what}"));
        assert!(d.leftovers().is_empty(), "{what}: {:?}", d.leftovers());
        let after = sorted_images(&d);
        // What the client was told succeeded is there; interrupted work is gone, unless
        // it was made durable just before the cut (then it is whole: the check passed,
        // and a build FROM it runs its busybox).
        let new: Vec<&(String, String, String)> =
            after.iter().filter(|r| !before.contains(r)).collect();
        if done && *what != "save" {
            assert!(
                !new.is_empty(),
                "{what} succeeded but left no image: {after:?}"
            );
        }
        for (repo, tag, _) in &new {
            eprintln!("{what}: {repo}:{tag} was committed before the cut (finished: {done})");
            sees_its_files(&d, &format!("{repo}:{tag}"), &[]);
        }
        for row in &before {
            assert!(after.contains(row), "{what}: {row:?} was lost: {after:?}");
        }
        if *what == "save" && save_to.exists() {
            // Whole or absent.
            let bytes = std::fs::read(&save_to).expect("saved");
            let mut a = tar::Archive::new(&bytes[..]);
            assert!(
                a.entries()
                    .expect("entries")
                    .map(|e| e
                        .expect("entry")
                        .path()
                        .expect("path")
                        .to_string_lossy()
                        .to_string())
                    .any(|p| p == "manifest.json"),
                "a saved archive that is there is whole"
            );
        }
        sees_its_files(&d, "base:1", &["/payload.sums"]);
    }
}

#[test]
fn check_store_repairs_a_layer_emptied_behind_its_back() {
    if !ready() {
        return;
    }
    let inputs = tempfile::tempdir().expect("inputs");
    let mut d = Daemon::start();
    let tar = write(inputs.path(), "imp.tar", &payload_rootfs(41));
    let id = import_id(&d.ok(&["ctr-img", "import", &tar, "imp:1"]));
    let ctx = inputs.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM imp:1\nRUN mkdir /gen && for i in $(seq 1 100); do head -c $((i * 11)) /payload/f$i > /gen/g$i; done && cd /gen && sha256sum g* | sed 's|  |  /gen/|' > /gen.sums\n",
    )
    .expect("Dockerfile");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "built:1",
        ctx.to_str().expect("path"),
    ]);
    d.wait_idle();
    assert_eq!(d.stop(), Some(0));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.data().join("metadata.json")).expect("meta"))
            .expect("json");
    let layers = |img: &str| -> Vec<String> {
        let rec = meta["images"]
            .as_object()
            .expect("images")
            .values()
            .find(|i| {
                i["names"]
                    .as_array()
                    .expect("names")
                    .iter()
                    .any(|n| n.as_str().is_some_and(|n| n.contains(img)))
            })
            .expect("image");
        rec["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| {
                l.as_str()
                    .expect("chain")
                    .trim_start_matches("sha256:")
                    .to_string()
            })
            .collect()
    };
    let data = d.data();
    let empty_files = |chain: &str| {
        let dir = data.join("layers").join(chain).join("diff");
        let mut n = 0;
        let mut stack = vec![dir];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p).expect("dir").flatten() {
                let t = e.file_type().expect("type");
                if t.is_dir() {
                    stack.push(e.path());
                } else if t.is_file() {
                    std::fs::File::create(e.path()).expect("truncate");
                    n += 1;
                }
            }
        }
        assert!(n > 0, "nothing to empty in {chain}");
    };
    let check = |d: &Daemon| {
        let o = d.command().arg("--check-store").output().expect("check");
        (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    // Sound: nothing to say.
    let (ok, out) = check(&d);
    assert!(ok && !out.contains("repaired"), "{out}");

    // A store from before directories were recorded: its directories are kept, made
    // durable and recorded at start; the check learns what each makes (the built one from
    // its diff ID, the imported one from its blob) and repairs nothing.
    let path = d.data().join("metadata.json");
    let mut older: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("meta")).expect("json");
    let obj = older.as_object_mut().expect("object");
    assert!(obj.remove("dirs").is_some() && obj.remove("dirs_recorded").is_some());
    std::fs::write(&path, serde_json::to_vec(&older).expect("json")).expect("write");
    d.restart();
    assert!(d
        .log()
        .contains("layer directories of an older store made durable and recorded"));
    assert_eq!(d.stop(), Some(0));
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("meta")).expect("json");
    let dirs = recorded["dirs"].as_object().expect("dirs recorded");
    assert!(
        dirs.values().all(|r| r.get("tree").is_none()),
        "not yet known: {dirs:?}"
    );
    let (ok, out) = check(&d);
    assert!(ok && !out.contains("repaired"), "{out}");
    let learned: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("meta")).expect("json");
    let dirs = learned["dirs"].as_object().expect("dirs");
    assert!(
        dirs.len() >= 2 && dirs.values().all(|r| r["tree"].is_string()),
        "learned: {dirs:?}"
    );

    // The imported layer (its blob is kept): found and made again from the blob.
    empty_files(&layers("imp")[0]);
    let (ok, out) = check(&d);
    assert!(ok, "{out}");
    assert!(
        out.contains("repaired: layer") && out.contains("made again from blob"),
        "{out}"
    );
    let (ok, out) = check(&d);
    assert!(
        ok && !out.contains("repaired"),
        "a second check finds it sound: {out}"
    );

    // The built layer: kept as its files alone (no layer is gzipped in idle time), so
    // nothing else holds it: the check fails, naming the layer and the image.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.data().join("metadata.json")).expect("meta"))
            .expect("json");
    assert!(
        meta["compressed"].as_object().is_none_or(|c| c.is_empty()),
        "a gzip form was made in idle time: {}",
        meta["compressed"]
    );
    let top = layers("built")[1].clone();
    empty_files(&top);
    let (ok, out) = check(&d);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("layer sha256:{top}")) && out.contains("built:1"),
        "the problem names the layer and the image: {out}"
    );
    let _ = id;
}

/// A disk that fails under the store (the writeback of what an import writes fails in the
/// loop device: its image is on a tmpfs too small for it): the import fails with the
/// error, names nothing, and the daemon goes on answering. The control: the same import
/// on a file system with room succeeds.
#[test]
fn an_import_whose_writeback_fails_says_so_and_names_nothing() {
    if !powercut::available() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    // 40 MiB of noise (incompressible) in a busybox rootfs.
    let rootfs = busybox_rootfs(&[("big", &bytes(7, 40 << 20))]);
    let archive = write(dir.path(), "rootfs.tar", &rootfs);
    // Big enough for the daemon's free-space floor (min_free_space, 256 MiB).
    let roomy = Ext4::cramped(512, 1024);
    let d = powercut::daemon_on(&roomy, &[], &[]);
    d.ok(&["ctr-img", "import", &archive, "big:1"]);
    drop(d);
    drop(roomy);
    // 40 MiB for a file system whose import writes the 40 MiB tar and its 40 MiB of files.
    let fs = Ext4::cramped(40, 1024);
    let d = powercut::daemon_on(&fs, &[], &[]);
    let err = d.fails(&["ctr-img", "import", &archive, "big:1"]);
    assert!(
        err.contains("Input/output error") || err.contains("No space left"),
        "{err}"
    );
    assert!(
        !d.images().iter().any(|(name, _, _)| name.contains("big")),
        "{:?}",
        d.images()
    );
    d.ok(&["ctr-img", "images"]);
}

/// Writes `mib` MiB of non-zero bytes to `path`, without syncing them.
fn write_unsynced(path: &Path, mib: usize) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("create");
    let piece: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..mib {
        f.write_all(&piece).expect("write (into the page cache)");
    }
}

/// `FsSync`, through which the store makes a layer directory durable (one syncfs through a
/// handle opened before anything was written there), reports a real failed writeback: to
/// every handle opened before it, once, and never to one opened after it, which is why
/// the store opens its handle first.
#[test]
fn a_writeback_error_fails_every_handle_opened_before_it_and_only_those() {
    if !powercut::available() {
        return;
    }
    // 24 MiB of room under a 128 MiB file system.
    let fs = Ext4::cramped(24, 128);
    let early = isula_sys::FsSync::open(fs.path()).expect("handle before the writes");
    let other = isula_sys::FsSync::open(fs.path()).expect("a second early handle");
    // The control: what fits is written back, and the handle says so.
    write_unsynced(&fs.path().join("small"), 1);
    early.sync().expect("a writeback that fits succeeds");
    // 48 MiB cannot fit: its writeback fails in the loop device.
    write_unsynced(&fs.path().join("big"), 48);
    assert!(
        other.sync().is_err(),
        "the writeback of 48 MiB into 24 MiB of room did not fail: the test cannot tell"
    );
    // Opened after the error: the kernel sampled the error sequence then.
    let late = isula_sys::FsSync::open(fs.path()).expect("handle after the error");
    // The early handle still reports it (another handle's sync did not take it away) ...
    let text = early
        .sync()
        .expect_err("a handle opened before the writes must report their failed writeback")
        .to_string();
    assert!(text.contains("syncfs"), "{text}");
    assert!(
        text.contains(&fs.path().display().to_string()),
        "the error names the file system's directory: {text}"
    );
    // ... once; a handle opened after it never sees it.
    early.sync().expect("reported once");
    late.sync()
        .expect("a handle opened after the error does not see it");
}

/// A COPY that writes its layer as a tar onto a file system that fills up: the build fails
/// with the store's own error (the write, and what it met), not the broken pipe the copy
/// then meets; no image is named, the half-written blob goes, and the next build works.
/// The control: the same COPY of a smaller file on the same file system succeeds.
#[test]
fn a_copy_written_as_a_tar_onto_a_full_disk_says_so_and_leaves_nothing() {
    if !powercut::available() {
        return;
    }
    // Past the daemon's free-space floor (min_free_space, 256 MiB) with room for a 100 MiB
    // layer, not for a 900 MiB one.
    let fs = Ext4::new(800);
    let d = powercut::daemon_on(&fs, &[], &["--log-level", "debug"]);
    d.load_fixed_busybox("busybox:latest");
    let ctx = tempfile::tempdir().expect("ctx");
    // Sparse: the context costs no disk, its layer's tar is that many zeros.
    let big = std::fs::File::create(ctx.path().join("big")).expect("big");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nCOPY big /data/\n",
    )
    .expect("df");
    // --no-cache: every version written as a tar (with the cache, the versions after the
    // first make files).
    let build = |tag: &str| {
        d.cli(&[
            "ctr-img",
            "build",
            "--no-cache",
            "-t",
            tag,
            ctx.path().to_str().expect("utf8"),
        ])
    };
    big.set_len(100 << 20).expect("size");
    let out = build("small:1");
    assert!(out.status.success(), "{out:?}");
    big.set_len(900 << 20).expect("size");
    let out = build("big:1");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("No space left on device")
            && err.contains("/ingest/")
            && !err.contains("the layer's store stopped"),
        "{err}"
    );
    assert_eq!(d.log().matches("COPY writes its layer as a tar").count(), 2);
    assert!(
        !d.images().iter().any(|(r, _, _)| r == "big"),
        "{:?}",
        d.images()
    );
    let ingest: Vec<_> = std::fs::read_dir(d.data().join("ingest"))
        .expect("ingest")
        .collect();
    assert!(ingest.is_empty(), "{ingest:?}");
    big.set_len(50 << 20).expect("size");
    let out = build("after:1");
    assert!(out.status.success(), "{out:?}");
}
