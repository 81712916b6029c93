//! Builds without root: a rootless daemon and daemonless commands (as root and as a user)
//! build the same image, ID for ID, as the root daemon (the oracle: layers carry the
//! image's own owners); and each thing a rootless start needs, when missing, is a clear
//! error naming the cause and the fix, leaving nothing behind, beside a start that works.
//! The test user, its subordinate ranges and any sysctl changed are put back after.

use isula_integration::rootless::{user_bin, TestUser, UserDaemon};
use isula_integration::{
    bin, build_id, busybox_rootfs, docker_archive, require_root, wait_until, wait_until_explained,
    Daemon,
};
use std::path::Path;
use std::process::Command;

/// A tool the test cannot do without: missing, the test fails (never skips).
fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{tool} is needed by the rootless tests: scripts/deps.sh test"
    );
}

fn needs() -> bool {
    if !require_root() {
        return false;
    }
    for t in [
        "runc",
        "newuidmap",
        "newgidmap",
        "useradd",
        "userdel",
        "pgrep",
    ] {
        need(t);
    }
    true
}

const STATIC: &str = "build-time=2020-01-01 00:00:00";

/// RUN (a whiteout and an opaque directory among its changes), COPY --chown, a COPY to a
/// new top-level name (written to its upper directly, between two overlay steps), RUN
/// --mount of the cache, bind and tmpfs kinds, --network=none, and a second stage copying
/// from the first.
const DOCKERFILE: &str = "FROM busybox AS base
RUN echo hi > /hello && mkdir -p /srv/data /opq/old && chown 1000:1000 /srv/data && rm -f /bin/vi
RUN rm -rf /opq && mkdir /opq && echo new > /opq/only
COPY --chown=33:33 app.txt /srv/app.txt
COPY app.txt /plain/
RUN cat /plain/app.txt > /plain/seen
RUN --mount=type=cache,target=/cache,id=rl echo c > /cache/c && cp /cache/c /from-cache
RUN --mount=type=bind,source=app.txt,target=/mnt/app.txt cat /mnt/app.txt > /srv/copied
RUN --mount=type=secret,id=tok test \"$(cat /run/secrets/tok)\" = s3cret && echo seen > /secret-seen
RUN --mount=type=tmpfs,target=/scratch echo t > /scratch/t && cat /scratch/t > /from-tmpfs
RUN --network=none ip link 2>/dev/null | grep -c lo > /links || true
FROM busybox
COPY --from=base /srv /srv
COPY --from=base /plain /plain
COPY --from=base /opq/only /hello /
RUN chown -R 2000:3000 /srv/data && ls -ln /srv | awk '{print $3, $4, $NF}' > /listing
";

/// The `--secret` of the corpus builds (a file beside the context).
fn secret(ctx: &str) -> String {
    format!("id=tok,src={ctx}/../secret.txt")
}

/// Writes the context (Dockerfile and app.txt) and the secret into the user's home.
fn context(user: &TestUser) -> String {
    user.write("work/secret.txt", b"s3cret");
    user.write("work/ctx/Dockerfile", DOCKERFILE.as_bytes());
    user.write("work/ctx/app.txt", b"the app\n");
    user.home.path().join("work/ctx").display().to_string()
}

fn busybox_archive(user: &TestUser) -> String {
    let p = user.write(
        "work/busybox.tar",
        &docker_archive(&[busybox_rootfs(&[])], "busybox:latest"),
    );
    p.display().to_string()
}

/// The root daemon's image ID of the corpus (the oracle).
fn root_build(ctx: &str) -> String {
    let d = Daemon::start();
    d.load_fixed_busybox("busybox");
    build_id(&d.ok(&[
        "ctr-img",
        "build",
        "--build-static",
        STATIC,
        "--secret",
        &secret(ctx),
        "-t",
        "rl:1",
        ctx,
    ]))
}

fn assert_no_leftovers(user: &TestUser) {
    let procs = user.processes();
    assert!(procs.is_empty(), "processes left behind: {procs:?}");
    assert!(!user.socket().exists(), "the socket was left behind");
    let dl = user.run_dir().join("isula-build/daemonless");
    let left: Vec<_> = std::fs::read_dir(&dl)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "daemonless sockets left: {left:?}");
}

#[test]
fn rootless_daemon_builds_the_root_daemons_image() {
    if !needs() {
        return;
    }
    let user = TestUser::with_range("d", 200000, 65536);
    let ctx = context(&user);
    let want = root_build(&ctx);
    let archive = busybox_archive(&user);
    let mut daemon = UserDaemon::start(&user, &[]);
    // The user's places: socket under $XDG_RUNTIME_DIR (0600), data under XDG_DATA_HOME.
    let mode = std::fs::metadata(user.socket())
        .expect("socket")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    assert!(
        user.data_dir().join("store.lock").exists(),
        "{}",
        daemon.log()
    );
    user.ok(&["ctr-img", "load", "-i", &archive]);
    let out = user.ok(&[
        "ctr-img",
        "build",
        "--build-static",
        STATIC,
        "--secret",
        &secret(&ctx),
        "-t",
        "rl:1",
        &ctx,
    ]);
    assert_eq!(
        build_id(&out),
        want,
        "rootless image differs from root's:\n{out}"
    );
    // The cache: every step reused, the same image.
    let again = user.ok(&[
        "ctr-img",
        "build",
        "--build-static",
        STATIC,
        "--secret",
        &secret(&ctx),
        "-t",
        "rl:2",
        &ctx,
    ]);
    assert!(again.contains("Using cache"), "{again}");
    assert_eq!(build_id(&again), want);
    // RUN --mount=type=ssh: the user's agent forwarded into the step.
    need("ssh-agent");
    let agent_sock = user.home.path().join("run/agent.sock");
    let mut agent = user
        .command(Path::new("ssh-agent"))
        .arg("-D")
        .arg("-a")
        .arg(&agent_sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("ssh-agent");
    wait_until(
        "ssh-agent to start",
        std::time::Duration::from_secs(10),
        || agent_sock.exists(),
    );
    user.write(
        "work/ssh/Dockerfile",
        b"FROM busybox\nRUN --mount=type=ssh test -S \"$SSH_AUTH_SOCK\" && echo agent > /agent\n",
    );
    let ssh_ctx = user.home.path().join("work/ssh").display().to_string();
    let ssh = format!("default={}", agent_sock.display());
    let built = user.cli(&["ctr-img", "build", "--ssh", &ssh, "-t", "ssh:1", &ssh_ctx]);
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    // Save writes the user's file, with the same image in it (its config's digest).
    let saved = user.home.path().join("work/saved.tar");
    user.ok(&[
        "ctr-img",
        "save",
        "rl:1",
        "-o",
        &saved.display().to_string(),
    ]);
    let meta = std::fs::metadata(&saved).expect("saved archive");
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), user.uid);
    let listing = Command::new("tar")
        .arg("-tf")
        .arg(&saved)
        .output()
        .expect("tar");
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains(&format!("{want}.json")),
        "{}",
        String::from_utf8_lossy(&listing.stdout)
    );
    // Resource limits need a delegated cgroup (cgroup v1 or no delegation here): refused
    // before anything runs, nothing stored.
    let before = user.ok(&["ctr-img", "images"]);
    let err = user.fails(&["ctr-img", "build", "-m", "100m", "-t", "rl:3", &ctx]);
    assert!(
        err.contains("resource limits (--memory)") && err.contains("Delegate=yes"),
        "{err}"
    );
    assert_eq!(user.ok(&["ctr-img", "images"]), before);
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    assert_no_leftovers(&user);
    // The store is sound, checked by the rootless daemon itself.
    let check = user
        .command(&user_bin("isula-builder"))
        .arg("--check-store")
        .output()
        .expect("check-store");
    assert!(
        check.status.success(),
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}

#[test]
fn daemonless_builds_the_root_daemons_image_as_root_and_as_a_user() {
    if !needs() {
        return;
    }
    need("docker-registry");
    need("skopeo");
    let user = TestUser::with_range("l", 300000, 65536);
    let ctx = context(&user);
    let want = root_build(&ctx);
    let archive = busybox_archive(&user);

    // Root, daemonless, on roots of its own.
    let roots = tempfile::tempdir().expect("roots");
    let root_cli = |args: &[&str]| {
        let o = Command::new(bin("isula-build"))
            .arg("--daemonless")
            .arg("--dataroot")
            .arg(roots.path().join("data"))
            .arg("--runroot")
            .arg(roots.path().join("run"))
            .arg("--config-dir")
            .arg(roots.path().join("etc"))
            .args(args)
            .env_remove("ISULABUILD_HOST")
            .env_remove("ISULABUILD_KEY_FILE")
            .output()
            .expect("isula-build");
        assert!(
            o.status.success(),
            "root daemonless {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    root_cli(&["ctr-img", "load", "-i", &archive]);
    let out = root_cli(&[
        "ctr-img",
        "build",
        "--build-static",
        STATIC,
        "--secret",
        &secret(&ctx),
        "-t",
        "rl:1",
        &ctx,
    ]);
    assert_eq!(build_id(&out), want, "{out}");
    // Its key and socket were its own, and are gone: a daemon's published key on the same
    // config directory is never replaced.
    assert!(!roots.path().join("etc/isula-build.pub").exists());
    let left: Vec<_> = std::fs::read_dir(roots.path().join("run/daemonless"))
        .expect("daemonless dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");

    // A user, daemonless (the flag, then the variable), pushing in the same command.
    let registry = isula_integration::registry::Registry::start(Default::default());
    user.write(
        "config/isula-build/registries.toml",
        isula_integration::insecure_registries(&[&registry.host()]).as_bytes(),
    );
    user.ok(&["--daemonless", "ctr-img", "load", "-i", &archive]);
    let dest = format!("docker://{}/rootless/app:1", registry.host());
    let out = user.ok(&[
        "--daemonless",
        "ctr-img",
        "build",
        "--build-static",
        STATIC,
        "--secret",
        &secret(&ctx),
        "-t",
        "rl:1",
        "-o",
        &dest,
        &ctx,
    ]);
    assert_eq!(build_id(&out), want, "{out}");
    let images = user
        .command(&user_bin("isula-build"))
        .args(["ctr-img", "images"])
        .env("ISULA_BUILD_DAEMONLESS", "1")
        .output()
        .expect("images");
    assert!(
        String::from_utf8_lossy(&images.stdout).contains(&want[..12]),
        "{}",
        String::from_utf8_lossy(&images.stderr)
    );
    // The registry has it, with the image's config: the same ID.
    let inspect = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config", "--raw"])
        .arg(format!("docker://{}/rootless/app:1", registry.host()))
        .output()
        .expect("skopeo");
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    assert_eq!(isula_integration::sha256_hex(&inspect.stdout), want);
    // And a rootless pull into an empty store brings the same image back.
    let fresh = user.home.path().join("work/fresh");
    std::fs::create_dir_all(&fresh).expect("mkdir");
    user.chown(&fresh);
    let pulled = user.ok(&[
        "--daemonless",
        "--dataroot",
        &fresh.display().to_string(),
        "ctr-img",
        "pull",
        &format!("{}/rootless/app:1", registry.host()),
    ]);
    assert!(pulled.contains(&want), "{pulled}");
    assert_no_leftovers(&user);
    // Without the flag or the variable nothing serves the user: the client says so.
    let err = user.fails(&["ctr-img", "images"]);
    assert!(err.contains(&user.socket().display().to_string()), "{err}");
}

#[test]
fn daemonless_commands_take_turns_on_a_store_and_leave_a_daemons_store_alone() {
    if !needs() {
        return;
    }
    let user = TestUser::with_range("k", 400000, 65536);
    let archive = busybox_archive(&user);
    user.ok(&["--daemonless", "ctr-img", "load", "-i", &archive]);
    user.write(
        "work/slow/Dockerfile",
        b"FROM busybox\nRUN sleep 4 && echo slept > /slept\n",
    );
    let slow_ctx = user.home.path().join("work/slow").display().to_string();
    let slow = user
        .command(&user_bin("isula-build"))
        .args([
            "--daemonless",
            "ctr-img",
            "build",
            "-t",
            "slow:1",
            &slow_ctx,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("slow build");
    // Once its builder serves, a second daemonless command on the store is refused.
    let dl = user.run_dir().join("isula-build/daemonless");
    wait_until(
        "the first builder to serve",
        std::time::Duration::from_secs(30),
        || std::fs::read_dir(&dl).is_ok_and(|mut r| r.next().is_some()),
    );
    let err = user.fails(&["--daemonless", "ctr-img", "images"]);
    assert!(
        err.contains("a daemonless isula-build command (pid") && err.contains("wait for it"),
        "{err}"
    );
    let done = slow.wait_with_output().expect("slow build");
    assert!(
        done.status.success(),
        "the first command was disturbed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    // Positive control: once it is done the next one runs and sees its image.
    assert!(user
        .ok(&["--daemonless", "ctr-img", "images"])
        .contains("slow"));

    // A daemon serving the store: daemonless is refused, naming it; the daemon is unharmed.
    let mut daemon = UserDaemon::start(&user, &[]);
    let err = user.fails(&["--daemonless", "ctr-img", "images"]);
    assert!(
        err.contains("the isula-builder daemon (pid") && err.contains("without --daemonless"),
        "{err}"
    );
    assert!(user.ok(&["ctr-img", "images"]).contains("slow"));
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
    assert!(user
        .ok(&["--daemonless", "ctr-img", "images"])
        .contains("slow"));
    assert_no_leftovers(&user);
    let check = user
        .command(&user_bin("isula-builder"))
        .arg("--check-store")
        .output()
        .expect("check-store");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Starts the rootless daemon expecting a refusal; returns its message.
fn start_fails(cmd: &mut Command) -> String {
    let out = cmd.output().expect("isula-builder");
    assert!(
        !out.status.success(),
        "the daemon should have refused to start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn assert_untouched(user: &TestUser) {
    assert!(!user.data_dir().exists(), "the data root was made");
    assert!(
        !user.run_dir().join("isula-build").exists(),
        "the run root was made"
    );
    assert_no_leftovers(user);
}

#[test]
fn rootless_refused_without_newuidmap_then_starts_with_it() {
    if !needs() {
        return;
    }
    let user = TestUser::with_range("n", 500000, 65536);
    // A PATH with runc but no newuidmap.
    let path = user.home.path().join("work/path");
    std::fs::create_dir_all(&path).expect("mkdir");
    std::os::unix::fs::symlink("/usr/sbin/runc", path.join("runc")).expect("link");
    let err = start_fails(user.command(&user_bin("isula-builder")).env("PATH", &path));
    assert!(
        err.contains("newuidmap is not installed") && err.contains("apt-get install uidmap"),
        "{err}"
    );
    assert_untouched(&user);
    let mut d = UserDaemon::start(&user, &[]);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
}

#[test]
fn rootless_refused_without_a_subordinate_range_then_starts_with_one() {
    if !needs() {
        return;
    }
    let mut user = TestUser::new("r");
    let err = start_fails(&mut user.command(&user_bin("isula-builder")));
    assert!(
        err.contains(&format!(
            "user {} (uid {}) has no subordinate uid range in /etc/subuid",
            user.name, user.uid
        )) && err.contains("usermod --add-subuids"),
        "{err}"
    );
    assert_untouched(&user);
    user.add_range(600000, 65536);
    let mut d = UserDaemon::start(&user, &[]);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
}

/// A layer with one file owned by `uid`:`uid`.
fn layer_owned_by(uid: u64) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_size(0);
    b.append_data(&mut h, "owned/", std::io::empty())
        .expect("dir");
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o644);
    h.set_uid(uid);
    h.set_gid(uid);
    h.set_mtime(1_600_000_000);
    h.set_size(2);
    b.append_data(&mut h, "owned/file", &b"x\n"[..])
        .expect("file");
    b.into_inner().expect("tar")
}

#[test]
fn rootless_refuses_owners_beyond_its_range_and_takes_those_within() {
    if !needs() {
        return;
    }
    // 0 is the user, 1-1000 the subordinate range: uids 0-1000.
    let user = TestUser::with_range("s", 700000, 1000);
    let mut daemon = UserDaemon::start(&user, &[]);
    let big = user.write(
        "work/big.tar",
        &docker_archive(&[busybox_rootfs(&[]), layer_owned_by(5000)], "big:1"),
    );
    let before = user.ok(&["ctr-img", "images"]);
    let err = user.fails(&["ctr-img", "load", "-i", &big.display().to_string()]);
    assert!(
        err.contains("\"owned/file\" is owned by uid 5000")
            && err.contains("maps uids 0-1000")
            && err.contains("/etc/subuid"),
        "{err}"
    );
    assert_eq!(
        user.ok(&["ctr-img", "images"]),
        before,
        "the refused load left something"
    );
    // COPY --chown beyond the range, likewise.
    let archive = busybox_archive(&user);
    user.ok(&["ctr-img", "load", "-i", &archive]);
    user.write(
        "work/chown/Dockerfile",
        b"FROM busybox\nCOPY --chown=5000:5000 f /f\n",
    );
    user.write("work/chown/f", b"f\n");
    let ctx = user.home.path().join("work/chown").display().to_string();
    let err = user.fails(&["ctr-img", "build", "-t", "chown:1", &ctx]);
    assert!(
        err.contains("uid 5000 is not mapped") && err.contains("0-1000"),
        "{err}"
    );
    // Positive control: owners within the range load and build.
    let fits = user.write(
        "work/fits.tar",
        &docker_archive(&[busybox_rootfs(&[]), layer_owned_by(999)], "fits:1"),
    );
    user.ok(&["ctr-img", "load", "-i", &fits.display().to_string()]);
    user.write(
        "work/chown/Dockerfile",
        b"FROM busybox\nCOPY --chown=1000:1000 f /f\n",
    );
    user.ok(&["ctr-img", "build", "-t", "chown:2", &ctx]);
    assert_eq!(daemon.stop(), Some(0), "{}", daemon.log());
}

#[test]
fn rootless_refused_with_an_unwritable_runtime_dir_then_starts_with_its_own() {
    if !needs() {
        return;
    }
    let user = TestUser::with_range("w", 800000, 65536);
    // Root's, not the user's.
    let theirs = tempfile::tempdir().expect("dir");
    std::fs::set_permissions(
        theirs.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let err = start_fails(
        user.command(&user_bin("isula-builder"))
            .env("XDG_RUNTIME_DIR", theirs.path()),
    );
    assert!(
        err.contains(&format!(
            "the run root {}/isula-build is not usable by uid {}",
            theirs.path().display(),
            user.uid
        )) && err.contains("set $XDG_RUNTIME_DIR to a private directory you own"),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(theirs.path()).expect("ls").count(), 0);
    assert_untouched(&user);
    let mut d = UserDaemon::start(&user, &[]);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
}

#[test]
fn rootless_refused_where_the_kernel_refuses_user_namespaces_then_starts() {
    if !needs() {
        return;
    }
    need("unshare");
    need("chroot");
    let user = TestUser::with_range("u", 900000, 65536);
    // A chroot (a bind of / in a private mount namespace, so every path is the same): the
    // kernel refuses chrooted processes a user namespace, as a container's seccomp
    // profile or user.max_user_namespaces = 0 do. (This machine's root cannot lower the
    // sysctl: its CAP_SYS_RESOURCE is dropped.)
    let jail = tempfile::tempdir().expect("jail");
    let script = "mount --make-rprivate / && mount --rbind / \"$0\" && exec chroot --userspec=\"$1:$2\" \"$0\" \"$3\"";
    let err = start_fails(
        user.env_command(Path::new("unshare"))
            .args(["--mount", "sh", "-c", script])
            .arg(jail.path())
            .arg(user.uid.to_string())
            .arg(user.gid.to_string())
            .arg(user_bin("isula-builder")),
    );
    assert!(
        err.contains(
            "the kernel refuses this user a user namespace (unshare: Operation not permitted"
        ) && err.contains("sysctl user.max_user_namespaces > 0")
            && err.contains("not in a chroot"),
        "{err}"
    );
    assert_untouched(&user);
    let mut d = UserDaemon::start(&user, &[]);
    assert_eq!(d.stop(), Some(0), "{}", d.log());
}

/// A daemonless build of `ctx` (its RUN sleeps 60 s) as `user`, once its step runs (the
/// user's runc container).
fn start_long_build(user: &TestUser, ctx: &str) -> std::process::Child {
    let cli = user
        .command(&user_bin("isula-build"))
        .args(["--daemonless", "ctr-img", "build", "-t", "long:1", ctx])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("build");
    wait_until_explained(
        "the step to run",
        std::time::Duration::from_secs(30),
        || user.processes().iter().any(|p| p.contains("sleep 60")),
        || format!("{:?}", user.processes()),
    );
    cli
}

/// Waits until none of `user`'s processes is left (the builder and its step gone).
fn nothing_left_running(user: &TestUser) {
    wait_until_explained(
        "the user's processes to end",
        std::time::Duration::from_secs(30),
        || user.processes().is_empty(),
        || format!("left running: {:?}", user.processes()),
    );
}

#[test]
fn an_interrupted_daemonless_build_leaves_nothing_running() {
    if !needs() {
        return;
    }
    let user = TestUser::with_range("c", 1000000, 65536);
    let archive = busybox_archive(&user);
    user.ok(&["--daemonless", "ctr-img", "load", "-i", &archive]);
    let before = user.ok(&["--daemonless", "ctr-img", "images"]);
    user.write("work/long/Dockerfile", b"FROM busybox\nRUN sleep 60\n");
    let ctx = user.home.path().join("work/long").display().to_string();
    // Once the step runs (a runc container of the user's), Ctrl-C.
    let mut cli = start_long_build(&user, &ctx);
    let pid = rustix::process::Pid::from_raw(cli.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let status = cli.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    // The builder cancels the step, cleans up and exits on its own, well before the step
    // would have ended.
    nothing_left_running(&user);
    // Nothing stored, and the next command finds the store free.
    assert_eq!(user.ok(&["--daemonless", "ctr-img", "images"]), before);

    // A client killed outright (SIGKILL: no chance to stop its builder): the builder
    // goes with it, and frees the store.
    let mut cli = start_long_build(&user, &ctx);
    cli.kill().expect("SIGKILL");
    cli.wait().expect("wait");
    nothing_left_running(&user);
    // The next command sweeps what the killed one left in the run root.
    assert_eq!(user.ok(&["--daemonless", "ctr-img", "images"]), before);
    assert_no_leftovers(&user);
    let check = user
        .command(&user_bin("isula-builder"))
        .arg("--check-store")
        .output()
        .expect("check-store");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}
