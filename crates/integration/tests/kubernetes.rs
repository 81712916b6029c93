//! What `contrib/kubernetes/` relies on. The grpc.health.v1 service: SERVING on the
//! health-only plain port (`--health-addr`, the kubelet's gRPC probe) for the server and
//! the control service, NOT_SERVING for an unknown service, and the control API not
//! reachable there. The daemon image (`contrib/image/Dockerfile`, built by our builder on
//! a debootstrap base) run in Docker with the StatefulSet's args, env and mounts (the
//! ConfigMap's configuration.toml, the Secret's TLS files, the data and run volumes), its
//! probe port answering and a remote build driven into it over mutual TLS, refused for a
//! certificate of another CA.

use isula_integration::kube::{field, yaml_list};
use isula_integration::pki::{Pki, CLIENT_EXT};
use isula_integration::registry::free_port;
use isula_integration::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The probe's answer for `service` at `addr` (plain gRPC), or the error.
fn probe(addr: &str, service: &str) -> Result<i32, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        let mut c = HealthClient::new(channel);
        c.check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

#[test]
fn the_health_port_answers_probes_and_nothing_else() {
    if !require_root() {
        return;
    }
    let health = format!("127.0.0.1:{}", free_port());
    let mut d = Daemon::start_with(&["--health-addr", &health]);
    assert_eq!(probe(&health, ""), Ok(ServingStatus::Serving as i32));
    assert_eq!(
        probe(&health, "isula.build.v1.Control"),
        Ok(ServingStatus::Serving as i32)
    );
    let unknown = probe(&health, "no.such.Service").expect_err("an unknown service");
    assert!(unknown.contains("NotFound"), "{unknown}");
    // The control API is not served there: its own health check is unimplemented.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let control = rt.block_on(async {
        let mut c =
            isula_api::v1::control_client::ControlClient::connect(format!("http://{health}"))
                .await
                .expect("connect");
        c.health_check(()).await.map(|_| ()).map_err(|s| s.code())
    });
    assert_eq!(control, Err(tonic::Code::Unimplemented));
    // Its connection closed (a graceful stop waits for open connections).
    drop(rt);
    assert!(
        d.log().contains("serving grpc.health.v1 alone"),
        "{}",
        d.log()
    );
    // Stopped: nothing answers.
    d.stop();
    assert!(probe(&health, "").is_err());
}

/// The ConfigMap's configuration.toml (its block scalar).
fn configmap_toml(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text
        .lines()
        .skip_while(|l| l.trim() != "configuration.toml: |");
    lines.next().expect("configuration.toml in the ConfigMap");
    for l in lines {
        if !l.starts_with("    ") && !l.trim().is_empty() {
            break;
        }
        out.push_str(l.strip_prefix("    ").unwrap_or(""));
        out.push('\n');
    }
    out
}

/// Removes a Docker container when dropped.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new(DOCKER).args(["rm", "-f", &self.0]).output();
    }
}

/// Capability names by number (linux/capability.h), for what a bounding set lacks.
const CAPS: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// `privileged: true` as Docker gives it: `--privileged`, or, where this machine's own
/// bounding set lacks capabilities (a test machine that is itself a container, where
/// Docker's privileged mode cannot apply them all), every capability it has with the rest
/// of privileged mode: no seccomp or AppArmor profile, unmasked /proc and /sys, every
/// device, the cgroup tree writable.
fn privileged(docker: &mut Command) {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .expect("CapBnd");
    let missing: Vec<&str> = CAPS
        .iter()
        .enumerate()
        .filter(|(i, _)| bounding & (1 << i) == 0)
        .map(|(_, n)| *n)
        .collect();
    if missing.is_empty() {
        docker.arg("--privileged");
        return;
    }
    docker.args(["--cap-add", "ALL"]);
    for cap in missing {
        docker.args(["--cap-drop", cap]);
    }
    docker.args([
        "--security-opt",
        "seccomp=unconfined",
        "--security-opt",
        "apparmor=unconfined",
        "--security-opt",
        "systempaths=unconfined",
        "--device-cgroup-rule",
        "a *:* rwm",
        "--cgroupns",
        "host",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup:rw",
    ]);
}

/// Debian's Docker client (scripts/deps.sh: docker.io), which speaks the engine's API.
const DOCKER: &str = "/usr/bin/docker";

#[test]
fn the_daemon_image_runs_as_the_statefulset_says_and_builds_over_mutual_tls() {
    if !require_root()
        || !require_docker()
        || !require_tool("openssl")
        || !require_tool("debootstrap")
        || !require_tool("strip")
    {
        return;
    }
    let work = tempfile::tempdir().expect("work");
    // The image, built by our builder from contrib/image/Dockerfile.
    let builder = Daemon::start();
    let bins = bin("isula-builder");
    let bins = bins.parent().expect("bin dir");
    let archive = work.path().join("image.tar");
    let tag = format!("isula-build-test:{}", std::process::id());
    let o = Command::new(repo().join("scripts/daemon-image.sh"))
        .arg("--bin-dir")
        .arg(bins)
        .args(["--tag", &tag, "--save"])
        .arg(&archive)
        .env(
            "ISULABUILD_HOST",
            format!("unix://{}", builder.socket().display()),
        )
        .env_remove("ISULA_BUILD_HOST")
        .output()
        .expect("daemon-image.sh");
    assert!(o.status.success(), "daemon-image.sh: {}", text(&o));
    let _image = DockerImage(tag.clone());
    let o = Command::new(DOCKER)
        .arg("load")
        .arg("-i")
        .arg(&archive)
        .output()
        .expect("docker load");
    assert!(o.status.success(), "docker load: {}", text(&o));
    drop(builder);

    // The StatefulSet's args, env and mounts; the ConfigMap and the Secret as files.
    let kube = repo().join("contrib/kubernetes");
    let sts = std::fs::read_to_string(kube.join("statefulset.yaml")).expect("statefulset");
    let cm = std::fs::read_to_string(kube.join("configmap.yaml")).expect("configmap");
    let pki = Pki::new();
    pki.sign("ca", "ci", "ci", CLIENT_EXT);
    pki.sign("other-ca", "rogue-ci", "ci", CLIENT_EXT);
    let tls = work.path().join("tls");
    std::fs::create_dir_all(&tls).expect("tls");
    for (from, to) in [
        ("ca.pem", "ca.pem"),
        ("server.pem", "server.pem"),
        ("server.key", "server-key.pem"),
    ] {
        std::fs::copy(pki.path(from), tls.join(to)).expect("secret file");
    }
    let config = work.path().join("config");
    std::fs::create_dir_all(&config).expect("config");
    std::fs::write(config.join("configuration.toml"), configmap_toml(&cm)).expect("toml");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        config.join("configuration.toml"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    // The pod's ports, on free ones here (the engine runs without a bridge: host network).
    let (control, metrics, health) = (free_port(), free_port(), free_port());
    let args: Vec<String> = yaml_list(&sts, "args")
        .into_iter()
        .map(|i| i[0].1.clone())
        .map(|a| {
            a.replace("0.0.0.0:2376", &format!("127.0.0.1:{control}"))
                .replace("0.0.0.0:9090", &format!("127.0.0.1:{metrics}"))
                .replace("0.0.0.0:8081", &format!("127.0.0.1:{health}"))
        })
        .collect();
    assert!(args.iter().any(|a| a == "--tlsverify"), "{args:?}");
    let env = yaml_list(&sts, "env");
    let mounts = yaml_list(&sts, "volumeMounts");
    let data = work.path().join("data");
    let run = work.path().join("run");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::create_dir_all(&run).expect("run");
    let name = format!("isula-build-test-{}", std::process::id());
    let mut docker = Command::new(DOCKER);
    docker.args(["run", "-d", "--name", &name, "--network", "host"]);
    assert!(sts.contains("privileged: true"));
    privileged(&mut docker);
    for e in &env {
        let (k, v) = (
            field(e, "name").expect("name"),
            field(e, "value").unwrap_or(""),
        );
        docker.args(["-e", &format!("{k}={v}")]);
    }
    for m in &mounts {
        let volume = field(m, "name").expect("a mount's name");
        let path = field(m, "mountPath").expect("mountPath");
        let ro = if field(m, "readOnly") == Some("true") {
            ":ro"
        } else {
            ""
        };
        let source = match (volume, field(m, "subPath")) {
            ("data", None) => data.clone(),
            ("run", None) => run.clone(),
            ("config", Some(sub)) => config.join(sub),
            ("tls", None) => tls.clone(),
            other => panic!("a mount this test does not know: {other:?}"),
        };
        docker.args(["-v", &format!("{}:{path}{ro}", source.display())]);
    }
    docker.arg(&tag).args(&args);
    // Removed however the run ends (a failed start still leaves a created container).
    let _container = Container(name.clone());
    let o = docker.output().expect("docker run");
    assert!(o.status.success(), "docker run: {}", text(&o));
    let logs = || {
        Command::new(DOCKER)
            .args(["logs", &name])
            .output()
            .map(|o| text(&o))
            .unwrap_or_default()
    };
    let health_addr = format!("127.0.0.1:{health}");
    wait_until_explained(
        "the pod's probe port to say SERVING",
        Duration::from_secs(60),
        || probe(&health_addr, "isula.build.v1.Control") == Ok(ServingStatus::Serving as i32),
        logs,
    );

    // A base for the build, through the pod's own socket (as `kubectl exec` would).
    let busybox = work.path().join("busybox.tar");
    std::fs::write(&busybox, busybox_rootfs(&[])).expect("busybox");
    let o = Command::new(DOCKER)
        .arg("cp")
        .arg(&busybox)
        .arg(format!("{name}:/tmp/busybox.tar"))
        .output()
        .expect("docker cp");
    assert!(o.status.success(), "{}", text(&o));
    let o = Command::new(DOCKER)
        .args([
            "exec",
            &name,
            "isula-build",
            "ctr-img",
            "import",
            "/tmp/busybox.tar",
            "busybox:latest",
        ])
        .output()
        .expect("docker exec");
    assert!(
        o.status.success(),
        "import in the pod: {}\n{}",
        text(&o),
        logs()
    );

    // A remote build over mutual TLS, as a client outside the cluster (CN=ci: builder).
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(ctx.join("f"), "from the client\n").expect("f");
    std::fs::write(
        ctx.join("Dockerfile"),
        // RUN checks what COPY brought: it runs (runc) in the pod.
        "FROM busybox\nCOPY f /f\nRUN grep -q 'from the client' /f && cat /f > /made\n",
    )
    .expect("Dockerfile");
    let client = |cert: &str, args: &[&str]| {
        let mut c = Command::new(bin("isula-build"));
        c.arg("--host")
            .arg(format!("tcp://127.0.0.1:{control}"))
            .args([
                "--tlscacert",
                &pki.path("ca.pem").display().to_string(),
                "--tlscert",
                &pki.path(&format!("{cert}.pem")).display().to_string(),
                "--tlskey",
                &pki.path(&format!("{cert}.key")).display().to_string(),
            ])
            .args(args)
            .env_remove("ISULA_BUILD_HOST")
            .env_remove("ISULABUILD_HOST")
            .env_remove("ISULA_BUILD_CERT_PATH");
        c.output().expect("isula-build")
    };
    let c = ctx.to_str().expect("utf8");
    let o = client("rogue-ci", &["ctr-img", "build", "-t", "app:1", c]);
    assert!(
        !o.status.success(),
        "another CA's certificate: {}",
        text(&o)
    );
    let o = client("ci", &["ctr-img", "build", "-t", "app:1", c]);
    assert!(o.status.success(), "remote build: {}\n{}", text(&o), logs());
    assert!(text(&o).contains("Sent the build context"), "{}", text(&o));
    let o = client("ci", &["ctr-img", "images"]);
    assert!(
        o.status.success() && text(&o).contains("app"),
        "{}",
        text(&o)
    );
    // The store is on the data volume.
    assert!(
        std::fs::read_dir(&data).is_ok_and(|mut d| d.next().is_some()),
        "nothing on the data volume"
    );
    // The pod's metrics say so.
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{metrics}")).expect("metrics");
    use std::io::{Read, Write};
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("GET");
    let mut page = String::new();
    s.read_to_string(&mut page).expect("page");
    assert!(
        page.contains("isula_build_builds_finished_total 1\n"),
        "{page}"
    );
}
