//! A build inside a Docker container started without --privileged and without added
//! capabilities, as a non-root user: the image holding our binaries is made by our own
//! builder (a rootfs of the binaries, runc, newuidmap/newgidmap with file capabilities
//! instead of setuid, busybox and their libraries, imported and saved as a
//! docker-archive), run under `contrib/seccomp/rootless-build.json` with /proc unmasked,
//! and inside it a daemonless rootless build with RUN and COPY pushes to a registry on the
//! host, checked with skopeo. Beside it, the two relaxations are shown to be needed: with
//! Docker's default seccomp profile, and with /proc masked, the build is refused with the
//! fix named. A private dockerd of the test's own (its own data and exec roots and
//! socket, no bridge, no iptables) runs the containers, so the machine's Docker is left
//! alone.

use isula_integration::{bin, build_id, busybox_rootfs, docker_archive, require_root, Daemon};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

fn need(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{tool} is needed: scripts/deps.sh test");
}

/// A dockerd of the test's own, stopped (and its roots removed) on drop.
struct PrivateDocker {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl PrivateDocker {
    fn start() -> PrivateDocker {
        let dir = tempfile::Builder::new()
            .prefix("isula-dockerd-")
            .tempdir()
            .expect("tempdir");
        let log = std::fs::File::create(dir.path().join("log")).expect("log");
        let child = Command::new("dockerd")
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("pid"))
            .arg("--host")
            .arg(format!(
                "unix://{}",
                dir.path().join("docker.sock").display()
            ))
            .args(["--bridge", "none", "--iptables=false", "--ip6tables=false"])
            .args(["--ip-masq=false"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("dockerd");
        let d = PrivateDocker {
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !d.docker(&["info"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "dockerd did not come up:\n{}",
                std::fs::read_to_string(d.dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        d
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .args(args)
            .env(
                "DOCKER_HOST",
                format!("unix://{}", self.dir.path().join("docker.sock").display()),
            )
            .output()
            .expect("docker")
    }
}

impl Drop for PrivateDocker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // dockerd leaves its default network namespace bound under the exec root.
        for m in isula_sys::mount::mounts_below(self.dir.path()) {
            let _ = isula_sys::mount::unmount_path(&m);
        }
    }
}

fn run(cmd: &mut Command) {
    let o = cmd.output().expect("run");
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The rootfs of the builder image, as a tar with numeric owners and file capabilities.
fn builder_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in [
        "usr/local/bin",
        "usr/bin",
        "usr/sbin",
        "bin",
        "etc",
        "tmp",
        "home/builder",
        "run/user/1000",
        "data",
        "proc",
        "sys",
        "dev",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for name in ["isula-builder", "isula-build"] {
        run(Command::new("strip")
            .arg("-o")
            .arg(root.join("usr/local/bin").join(name))
            .arg(bin(name)));
    }
    let runc = which("runc");
    std::fs::copy(&runc, root.join("usr/sbin/runc")).expect("runc");
    // newuidmap/newgidmap with the capabilities they use instead of setuid: a setuid
    // helper opens the map as root, which needs CAP_SYS_ADMIN over the host's namespace.
    for (tool, caps) in [
        ("newuidmap", "cap_setuid,cap_setfcap+ep"),
        ("newgidmap", "cap_setgid+ep"),
    ] {
        let to = root.join("usr/bin").join(tool);
        std::fs::copy(which(tool), &to).expect("copy");
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        run(Command::new("setcap").arg(caps).arg(&to));
    }
    let busybox = which("busybox");
    std::fs::copy(&busybox, root.join("bin/busybox")).expect("busybox");
    for applet in ["sh", "cat", "echo", "grep", "id", "ls", "sleep"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("link");
    }
    // The libraries they load.
    let mut libs = std::collections::BTreeSet::new();
    for b in [
        root.join("usr/local/bin/isula-builder"),
        root.join("usr/local/bin/isula-build"),
        root.join("usr/sbin/runc"),
        root.join("usr/bin/newuidmap"),
        root.join("usr/bin/newgidmap"),
    ] {
        let o = Command::new("ldd").arg(&b).output().expect("ldd");
        for w in String::from_utf8_lossy(&o.stdout).split_whitespace() {
            if w.starts_with('/') {
                libs.insert(PathBuf::from(w));
            }
        }
    }
    for l in libs {
        let to = root.join(l.strip_prefix("/").expect("absolute"));
        std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&l, &to).expect("copy library");
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000:builder:/home/builder:/bin/sh\n",
    )
    .expect("passwd");
    std::fs::write(root.join("etc/group"), "root:x:0:\nbuilder:x:1000:\n").expect("group");
    for f in ["etc/subuid", "etc/subgid"] {
        std::fs::write(root.join(f), "builder:100000:65536\n").expect("subid");
    }
    std::fs::set_permissions(
        root.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod tmp");
    for d in ["home/builder", "run/user/1000", "data"] {
        std::os::unix::fs::chown(root.join(d), Some(1000), Some(1000)).expect("chown");
    }
    std::fs::set_permissions(
        root.join("run/user/1000"),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod");
    let tar = dir.join("rootfs.tar");
    run(Command::new("tar")
        .args([
            "--xattrs",
            "--xattrs-include=security.capability",
            "--numeric-owner",
            "-C",
        ])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    tar
}

fn which(tool: &str) -> PathBuf {
    let o = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .expect("sh");
    let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(!p.is_empty(), "{tool} not found");
    std::fs::canonicalize(p).expect("canonical")
}

fn profile() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../contrib/seccomp/rootless-build.json")
        .canonicalize()
        .expect("contrib/seccomp/rootless-build.json")
        .display()
        .to_string()
}

#[test]
fn builds_and_pushes_in_a_container_without_privileges() {
    if !require_root() {
        return;
    }
    for t in [
        "dockerd",
        "docker",
        "docker-registry",
        "skopeo",
        "setcap",
        "strip",
        "ldd",
        "busybox",
        "runc",
        "newuidmap",
        "tar",
    ] {
        need(t);
    }
    let work = tempfile::Builder::new()
        .prefix("isula-unpriv-")
        .tempdir()
        .expect("work");
    // The builder image, made by our own builder.
    let rootfs = builder_rootfs(work.path());
    let image = work.path().join("image.tar");
    let ours = Daemon::start();
    {
        ours.ok(&[
            "ctr-img",
            "import",
            &rootfs.display().to_string(),
            "isula-rootless:test",
        ]);
        ours.ok(&[
            "ctr-img",
            "save",
            "isula-rootless:test",
            "-o",
            &image.display().to_string(),
        ]);
    }
    let docker = PrivateDocker::start();
    let loaded = docker.docker(&["load", "-i", &image.display().to_string()]);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );

    // What the container sees: a busybox base, a context, registries.toml.
    let registry = isula_integration::registry::Registry::start(Default::default());
    let input = work.path().join("in");
    std::fs::create_dir_all(input.join("ctx")).expect("mkdir");
    std::fs::create_dir_all(input.join("etc")).expect("mkdir");
    std::fs::write(
        input.join("bb.tar"),
        docker_archive(&[busybox_rootfs(&[])], "busybox:latest"),
    )
    .expect("base");
    std::fs::write(
        input.join("ctx/Dockerfile"),
        "FROM busybox\nRUN echo built > /built && id -u > /uid\nCOPY --chown=7:7 app.txt /app.txt\n",
    )
    .expect("Dockerfile");
    std::fs::write(input.join("ctx/app.txt"), "app\n").expect("app");
    std::fs::write(
        input.join("etc/registries.toml"),
        isula_integration::insecure_registries(&[&registry.host()]),
    )
    .expect("registries");
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(&input));
    let dest = format!("docker://{}/unpriv/app:1", registry.host());
    let script = format!(
        "grep CapEff /proc/self/status && \
         isula-build --daemonless --dataroot /data --config-dir /in/etc ctr-img load -i /in/bb.tar >/dev/null && \
         isula-build --daemonless --dataroot /data --config-dir /in/etc ctr-img build --build-static '{STATIC}' -o {dest} /in/ctx"
    );
    let docker_run = |security: &[&str]| {
        let mut args = vec![
            "run",
            "--rm",
            "--network",
            "host",
            "--user",
            "1000:1000",
            "-e",
            "XDG_RUNTIME_DIR=/run/user/1000",
            "-e",
            "HOME=/home/builder",
            "--mount",
            "type=volume,dst=/data",
        ];
        let input_mount = format!("{}:/in:ro", input.display());
        args.extend(security);
        args.extend([
            "-v",
            &input_mount,
            "isula-rootless:test",
            "sh",
            "-c",
            &script,
        ]);
        docker.docker(&args)
    };
    let profile = format!("seccomp={}", profile());

    // Docker's default seccomp profile refuses the user namespace: said, with the fix.
    let out = docker_run(&["--security-opt", "systempaths=unconfined"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the kernel refuses this user a user namespace")
            && err.contains("a seccomp profile that allows unshare"),
        "{err}"
    );
    // With /proc masked, RUN cannot have a /proc of its own: said, with the fix.
    let out = docker_run(&["--security-opt", &profile]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("systempaths=unconfined"), "{err}");

    // The documented settings: the build runs, without a capability, and pushes.
    let out = docker_run(&[
        "--security-opt",
        &profile,
        "--security-opt",
        "systempaths=unconfined",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("CapEff:\t0000000000000000"), "{stdout}");
    let id = build_id(&stdout);
    let config = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config", "--raw"])
        .arg(format!("docker://{}/unpriv/app:1", registry.host()))
        .output()
        .expect("skopeo");
    assert!(
        config.status.success(),
        "{}",
        String::from_utf8_lossy(&config.stderr)
    );
    assert_eq!(isula_integration::sha256_hex(&config.stdout), id);
    // The same image as the root daemon builds from the same inputs.
    ours.ok(&[
        "ctr-img",
        "load",
        "-i",
        &input.join("bb.tar").display().to_string(),
    ]);
    let want = build_id(&ours.ok(&[
        "ctr-img",
        "build",
        "--build-static",
        STATIC,
        &input.join("ctx").display().to_string(),
    ]));
    assert_eq!(id, want);
}

const STATIC: &str = "build-time=2020-01-01 00:00:00";
