//! A build inside a Docker container started without --privileged and without added
//! capabilities, as a non-root user: the image holding our binaries is made by our own
//! builder from `contrib/image/Dockerfile.unprivileged` (`scripts/daemon-image.sh
//! --unprivileged`: a Debian base made with debootstrap, uidmap installed from Debian's
//! package registry, newuidmap/newgidmap with file capabilities instead of setuid, a user
//! with a subordinate range), saved as a docker-archive, run under
//! `contrib/seccomp/rootless-build.json` with /proc unmasked,
//! and inside it a daemonless rootless build with RUN and COPY pushes to a registry on the
//! host, checked with skopeo. Beside it, the two relaxations are shown to be needed: with
//! Docker's default seccomp profile, and with /proc masked, the build is refused with the
//! fix named. A private dockerd of the test's own (its own data and exec roots and
//! socket, no bridge, no iptables) runs the containers, so the machine's Docker is left
//! alone.

use isula_integration::kube::field;
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
        isula_integration::wait_until_explained(
            "the test's dockerd to come up",
            Duration::from_secs(60),
            || d.docker(&["info"]).status.success(),
            || std::fs::read_to_string(d.dir.path().join("log")).unwrap_or_default(),
        );
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

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
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
        "strip",
        "runc",
        "debootstrap",
    ] {
        need(t);
    }
    let work = tempfile::Builder::new()
        .prefix("isula-unpriv-")
        .tempdir()
        .expect("work");
    // The builder image, made by our own builder from contrib/image/Dockerfile.unprivileged.
    let image = work.path().join("image.tar");
    let tag = "isula-rootless:test";
    let registry = isula_integration::registry::Registry::start(Default::default());
    let ours = Daemon::for_registries(&[&registry.host()]);
    let bins = bin("isula-builder");
    let o = Command::new(repo().join("scripts/daemon-image.sh"))
        .arg("--unprivileged")
        .arg("--bin-dir")
        .arg(bins.parent().expect("bin dir"))
        .args(["--tag", tag, "--save"])
        .arg(&image)
        .env(
            "ISULABUILD_HOST",
            format!("unix://{}", ours.socket().display()),
        )
        .env_remove("ISULA_BUILD_HOST")
        .output()
        .expect("daemon-image.sh");
    assert!(
        o.status.success(),
        "daemon-image.sh --unprivileged: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let docker = PrivateDocker::start();
    let loaded = docker.docker(&["load", "-i", &image.display().to_string()]);
    assert!(
        loaded.status.success(),
        "{}",
        String::from_utf8_lossy(&loaded.stderr)
    );

    // What the container sees: a busybox base, a context, registries.toml.
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
        args.extend(["-v", &input_mount, "--entrypoint", "sh", tag, "-c", &script]);
        docker.docker(&args)
    };
    let seccomp = format!("seccomp={}", profile());

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
    let out = docker_run(&["--security-opt", &seccomp]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("systempaths=unconfined"), "{err}");

    // The documented settings: the build runs, without a capability, and pushes.
    let out = docker_run(&[
        "--security-opt",
        &seccomp,
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

    // contrib/kubernetes/build-job.yaml, run as a kubelet would run its container: its
    // args (the registry's name replaced by this one's), env, mounts and securityContext.
    // Two things are the test's own: the base the context's FROM pulls is pushed to that
    // registry first, and the user's registries.toml (mounted where the rootless client
    // looks) lets the builder talk plain HTTP to it. `hostUsers: false` has no Docker
    // equivalent; the container's user runs without privileges all the same.
    let job = std::fs::read_to_string(repo().join("contrib/kubernetes/build-job.yaml"))
        .expect("build-job.yaml");
    let base = format!("{}/base/busybox:latest", registry.host());
    ours.ok(&["ctr-img", "tag", "busybox:latest", &base]);
    ours.ok(&["ctr-img", "push", &base]);
    let job_in = work.path().join("job");
    let ctx = job_in.join("ctx");
    let conf = job_in.join("conf");
    std::fs::create_dir_all(&ctx).expect("mkdir");
    std::fs::create_dir_all(&conf).expect("mkdir");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN echo from-the-job > /job\nCOPY app.txt /app.txt\n"),
    )
    .expect("Dockerfile");
    std::fs::write(ctx.join("app.txt"), "job\n").expect("app");
    std::fs::write(
        conf.join("registries.toml"),
        isula_integration::insecure_registries(&[&registry.host()]),
    )
    .expect("registries");
    run(Command::new("chmod").args(["-R", "a+rX"]).arg(&job_in));
    let scalar = |key: &str| {
        isula_integration::kube::yaml_scalar(&job, key)
            .unwrap_or_else(|| panic!("no {key} in build-job.yaml"))
    };
    assert_eq!(scalar("hostUsers"), "false");
    assert_eq!(scalar("procMount"), "Unmasked");
    assert_eq!(scalar("type"), "Localhost");
    let profile_name = scalar("localhostProfile");
    assert!(
        profile().ends_with(&format!("/{profile_name}")),
        "{profile_name}"
    );
    // No privileged container and no added capability.
    assert_eq!(
        isula_integration::kube::yaml_scalar(&job, "privileged"),
        None
    );
    assert!(
        !job.lines()
            .any(|l| l.trim_start().starts_with("capabilities:")),
        "build-job.yaml adds capabilities"
    );
    let user = format!("{}:{}", scalar("runAsUser"), scalar("runAsGroup"));
    let mut args: Vec<String> = vec![
        "run".into(),
        "--rm".into(),
        "--network".into(),
        "host".into(),
        "--user".into(),
        user,
        "--security-opt".into(),
        format!("seccomp={}", profile()),
        "--security-opt".into(),
        "systempaths=unconfined".into(),
    ];
    for e in isula_integration::kube::yaml_list(&job, "env") {
        let k = field(&e, "name").expect("an env name");
        args.extend([
            "-e".into(),
            format!("{k}={}", field(&e, "value").unwrap_or("")),
        ]);
    }
    let volumes = isula_integration::kube::yaml_list(&job, "volumes");
    for m in isula_integration::kube::yaml_list(&job, "volumeMounts") {
        let name = field(&m, "name").expect("a mount's name");
        let path = field(&m, "mountPath").expect("mountPath");
        let volume = volumes
            .iter()
            .find(|v| field(v, "name") == Some(name))
            .unwrap_or_else(|| panic!("no volume {name}"));
        if field(volume, "medium") == Some("Memory") {
            // An emptyDir in memory, owned by the pod's fsGroup.
            args.extend([
                "--tmpfs".into(),
                format!("{path}:uid=1000,gid={},mode=0700", scalar("fsGroup")),
            ]);
        } else if volume
            .iter()
            .any(|(k, v)| k == "emptyDir" || (k.is_empty() && v == "emptyDir"))
        {
            args.extend(["--mount".into(), format!("type=volume,dst={path}")]);
        } else if volume.iter().any(|(k, v)| k.is_empty() && v == "configMap") {
            let ro = if field(&m, "readOnly") == Some("true") {
                ":ro"
            } else {
                ""
            };
            args.extend(["-v".into(), format!("{}:{path}{ro}", ctx.display())]);
        } else {
            panic!("a volume this test does not know: {volume:?}");
        }
    }
    args.extend([
        "-v".into(),
        format!("{}:/home/builder/.config/isula-build:ro", conf.display()),
        tag.into(),
    ]);
    let job_args: Vec<String> = isula_integration::kube::yaml_list(&job, "args")
        .into_iter()
        .map(|i| i[0].1.replace("registry.example.com", &registry.host()))
        .collect();
    assert!(job_args.iter().any(|a| a == "--daemonless"), "{job_args:?}");
    args.extend(job_args);
    let out = docker.docker(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "the Job's container: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = Command::new("skopeo")
        .args(["inspect", "--tls-verify=false", "--config"])
        .arg(format!("docker://{}/app:1", registry.host()))
        .output()
        .expect("skopeo");
    let config = String::from_utf8_lossy(&pushed.stdout);
    assert!(
        pushed.status.success() && config.contains("RUN echo from-the-job"),
        "{config}{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
}

const STATIC: &str = "build-time=2020-01-01 00:00:00";
