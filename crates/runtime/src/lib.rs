//! RUN steps in a real OCI runtime. We write the bundle (`config.json` for a rootfs that the
//! builder has mounted) and drive the `runc` binary: host network, Docker's default
//! capabilities plus the build's `--cap-add`, the host's `/etc/hosts` and
//! `/etc/resolv.conf` bind-mounted read-only, output streamed as it comes. Cancelling kills
//! the container; the container is always deleted. The daemon never forks itself: runc does
//! the namespace work.

use serde_json::json;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Docker's default capability set for containers (and build steps).
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability name runc knows (for validating `--cap-add`).
pub const ALL_CAPS: [&str; 41] = [
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_READ",
    "CAP_AUDIT_WRITE",
    "CAP_BLOCK_SUSPEND",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_PERFMON",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYSLOG",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_MODULE",
    "CAP_SYS_NICE",
    "CAP_SYS_PACCT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
];

/// The capabilities by number (`capability.h`).
const CAPS_BY_BIT: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// Every capability the daemon itself may pass on (its bounding set): what an insecure
/// step gets (the host may withhold some, even from root).
pub fn bounding_caps() -> Vec<String> {
    let mask = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapBnd:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(u64::MAX);
    CAPS_BY_BIT
        .iter()
        .enumerate()
        .filter(|(bit, _)| mask & (1u64 << bit) != 0)
        .map(|(_, c)| c.to_string())
        .collect()
}

/// Where binfmt_misc is (debug builds: `ISULA_BINFMT_DIR` may point elsewhere, so tests can
/// stand for a machine without a handler).
fn binfmt_dir() -> PathBuf {
    if cfg!(debug_assertions) {
        if let Some(d) = std::env::var_os("ISULA_BINFMT_DIR") {
            return PathBuf::from(d);
        }
    }
    PathBuf::from("/proc/sys/fs/binfmt_misc")
}

/// Whether RUN on a `host` machine can execute binaries of `architecture` (Go's names;
/// `qemu` is QEMU's name for it): natively, or through a QEMU handler registered in binfmt_misc with the F flag
/// (the interpreter opened at registration, so it works inside a container's root).
pub fn can_run(architecture: &str, qemu: &str, host: &str) -> Result<(), String> {
    if architecture == host || (host == "amd64" && architecture == "386") {
        return Ok(());
    }
    let dir = binfmt_dir();
    let entry = dir.join(format!("qemu-{qemu}"));
    let install = format!(
        "RUN for {architecture} needs QEMU's user-mode emulation: install qemu-user-static \
         (and binfmt-support) so that a qemu-{qemu} handler is registered in {}",
        dir.display()
    );
    let Ok(text) = std::fs::read_to_string(&entry) else {
        if !dir.join("status").exists() {
            return Err(format!(
                "{install} (binfmt_misc is not mounted there: mount -t binfmt_misc binfmt_misc {})",
                dir.display()
            ));
        }
        return Err(format!("{install}; there is no handler for {qemu}"));
    };
    if text.lines().next().map(str::trim) != Some("enabled") {
        return Err(format!(
            "{install}; the qemu-{qemu} handler is disabled (update-binfmts --enable qemu-{qemu})"
        ));
    }
    let flags = text
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .unwrap_or_default();
    if !flags.contains('F') {
        return Err(format!(
            "{install}; the qemu-{qemu} handler lacks the F (fix binary) flag, so it cannot run \
             inside a build's root: register it with F, as qemu-user-static does"
        ));
    }
    Ok(())
}

/// Host files bind-mounted into every step (never part of a layer).
pub const HOST_FILES: [&str; 2] = ["/etc/hosts", "/etc/resolv.conf"];

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("unknown capability {0:?}")]
    UnknownCapability(String),
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime {runtime} failed: {message}")]
    Runtime { runtime: String, message: String },
    #[error("step cancelled")]
    Cancelled,
}

fn io(op: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let op = op.into();
    move |source| RuntimeError::Io { op, source }
}

/// Normalises `--cap-add` names (`sys_admin`, `CAP_SYS_ADMIN`) and refuses unknown ones.
pub fn normalize_cap(name: &str) -> Result<String, RuntimeError> {
    let upper = name.trim().to_ascii_uppercase();
    let full = if upper.starts_with("CAP_") {
        upper
    } else {
        format!("CAP_{upper}")
    };
    if ALL_CAPS.contains(&full.as_str()) {
        Ok(full)
    } else {
        Err(RuntimeError::UnknownCapability(name.to_string()))
    }
}

/// Runs a build step's process on a prepared rootfs. runc is the real one; tests of step
/// logic may put another behind it.
pub trait Runtime: Send + Sync {
    /// Runs `process` on `rootfs` (its bundle directory `bundle` exists and is empty),
    /// passing its output on as it comes. Returns the exit code.
    fn run(
        &self,
        bundle: &Path,
        rootfs: &Path,
        process: &Process,
        cancel: &CancelFlag,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<i32, RuntimeError>;
}

impl Runtime for Runc {
    fn run(
        &self,
        bundle: &Path,
        rootfs: &Path,
        process: &Process,
        cancel: &CancelFlag,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<i32, RuntimeError> {
        Runc::run(self, bundle, rootfs, process, cancel, output)
    }
}

/// What one RUN step executes.
#[derive(Debug, Clone, Default)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    /// Extra capabilities (normalised names).
    pub cap_add: Vec<String>,
    /// No seccomp filter for this step (`--security-opt seccomp=unconfined`).
    pub seccomp_unconfined: bool,
    /// The step's own mounts (`RUN --mount`), after the defaults.
    pub mounts: Vec<Mount>,
    /// A network namespace of its own with only loopback (`--network=none`) instead of the
    /// host's network.
    pub network_none: bool,
    /// `RUN --security=insecure`: every capability, no seccomp filter, no masked or
    /// read-only kernel paths, a writable /sys (as BuildKit's insecure entitlement).
    pub insecure: bool,
    /// The /etc/hosts to show instead of the host's (with `--add-host` lines).
    pub hosts_file: Option<PathBuf>,
    /// Per-build resource limits.
    pub limits: Limits,
}

/// A build's resource limits for its RUN steps (None: the default).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory: Option<i64>,
    pub cpu_shares: Option<u64>,
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    /// -1: unlimited.
    pub pids: Option<i64>,
    pub shm_size: Option<u64>,
    /// (RLIMIT_NAME, soft, hard); u64::MAX is unlimited.
    pub rlimits: Vec<(String, u64, u64)>,
}

/// Docker's `--ulimit` names and the rlimits they set.
pub const ULIMITS: [(&str, &str); 16] = [
    ("as", "RLIMIT_AS"),
    ("core", "RLIMIT_CORE"),
    ("cpu", "RLIMIT_CPU"),
    ("data", "RLIMIT_DATA"),
    ("fsize", "RLIMIT_FSIZE"),
    ("locks", "RLIMIT_LOCKS"),
    ("memlock", "RLIMIT_MEMLOCK"),
    ("msgqueue", "RLIMIT_MSGQUEUE"),
    ("nice", "RLIMIT_NICE"),
    ("nofile", "RLIMIT_NOFILE"),
    ("nproc", "RLIMIT_NPROC"),
    ("rss", "RLIMIT_RSS"),
    ("rtprio", "RLIMIT_RTPRIO"),
    ("rttime", "RLIMIT_RTTIME"),
    ("sigpending", "RLIMIT_SIGPENDING"),
    ("stack", "RLIMIT_STACK"),
];

/// `NAME=SOFT[:HARD]` as docker reads `--ulimit` (-1: unlimited; soft ≤ hard).
pub fn parse_ulimit(text: &str) -> Result<(String, u64, u64), String> {
    let (name, values) = text
        .split_once('=')
        .ok_or_else(|| format!("--ulimit {text:?}: expected NAME=SOFT[:HARD]"))?;
    let rlimit = ULIMITS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, r)| r.to_string())
        .ok_or_else(|| format!("--ulimit {text:?}: unknown limit {name:?}"))?;
    let value = |v: &str| -> Result<u64, String> {
        match v.trim() {
            "-1" | "unlimited" => Ok(u64::MAX),
            n => n
                .parse::<u64>()
                .map_err(|_| format!("--ulimit {text:?}: {n:?} is not a number")),
        }
    };
    let (soft, hard) = match values.split_once(':') {
        Some((s, h)) => (value(s)?, value(h)?),
        None => {
            let v = value(values)?;
            (v, v)
        }
    };
    if soft > hard {
        return Err(format!(
            "--ulimit {text:?}: the soft limit is over the hard limit"
        ));
    }
    Ok((rlimit, soft, hard))
}

/// One extra mount of a step, as the OCI spec writes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub destination: String,
    /// `bind` or `tmpfs`.
    pub kind: String,
    pub source: PathBuf,
    pub options: Vec<String>,
}

/// System calls a RUN step is refused (EPERM) unless it was given the capability that
/// makes them legitimate. Ours, written for this builder (not Docker's profile file), with
/// the same aim: the kernel interfaces a build has no use for and that widen the attack
/// surface (keyrings, BPF, perf, module loading, new namespaces, mounts, handle-based
/// opens, clocks, reboot, swap, accounting).
const SECCOMP_DENIED: &[(&[&str], Option<&str>)] = &[
    (&["add_key", "keyctl", "request_key"], None),
    (
        &["bpf", "perf_event_open", "userfaultfd", "lookup_dcookie"],
        Some("CAP_SYS_ADMIN"),
    ),
    (
        &[
            "mount",
            "umount2",
            "pivot_root",
            "unshare",
            "setns",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "move_mount",
            "open_tree",
            "mount_setattr",
            "quotactl",
            "name_to_handle_at",
        ],
        Some("CAP_SYS_ADMIN"),
    ),
    (&["open_by_handle_at"], Some("CAP_DAC_READ_SEARCH")),
    (
        &[
            "init_module",
            "finit_module",
            "delete_module",
            "kexec_load",
            "kexec_file_load",
        ],
        Some("CAP_SYS_MODULE"),
    ),
    (
        &["ptrace", "process_vm_readv", "process_vm_writev", "kcmp"],
        Some("CAP_SYS_PTRACE"),
    ),
    (
        &["clock_settime", "clock_adjtime", "settimeofday", "adjtimex"],
        Some("CAP_SYS_TIME"),
    ),
    (&["reboot"], Some("CAP_SYS_BOOT")),
    (&["swapon", "swapoff"], Some("CAP_SYS_ADMIN")),
    (&["acct"], Some("CAP_SYS_PACCT")),
    (&["iopl", "ioperm"], Some("CAP_SYS_RAWIO")),
];

/// The seccomp filter of a step with the capabilities `caps`: everything allowed but the
/// calls above whose capability it lacks.
fn seccomp(caps: &[String]) -> serde_json::Value {
    let denied: Vec<&str> = SECCOMP_DENIED
        .iter()
        .filter(|(_, cap)| cap.is_none_or(|c| !caps.iter().any(|have| have == c)))
        .flat_map(|(names, _)| names.iter().copied())
        .collect();
    let architectures: &[&str] = match std::env::consts::ARCH {
        "x86_64" => &["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64" => &["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        _ => &[],
    };
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": architectures,
        "syscalls": [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    })
}

/// The most tasks (processes and threads) one RUN may have at once.
pub const PIDS_LIMIT: i64 = 32768;

/// The OCI runtime spec for a build step on `rootfs`.
pub fn spec(rootfs: &Path, process: &Process) -> serde_json::Value {
    let mut caps: Vec<String> = if process.insecure {
        bounding_caps()
    } else {
        DEFAULT_CAPS.iter().map(|c| c.to_string()).collect()
    };
    let l = &process.limits;
    let shm_size = match l.shm_size {
        Some(b) => format!("size={b}"),
        None => "size=65536k".to_string(),
    };
    let rootless = isula_sys::userns::in_user_namespace();
    // A rootless daemon has no cgroup of its own unless one was delegated to it, and runc
    // fails a limit it cannot set: only the limits a build asked for go in (the daemon
    // refused them already where no cgroup is delegated).
    let mut resources = match (rootless, l.pids) {
        (true, None) => json!({}),
        (_, pids) => json!({"pids": {"limit": pids.unwrap_or(PIDS_LIMIT)}}),
    };
    if let Some(m) = l.memory {
        resources["memory"] = json!({"limit": m});
    }
    let mut cpu = serde_json::Map::new();
    if let Some(v) = l.cpu_shares {
        cpu.insert("shares".into(), json!(v));
    }
    if let Some(v) = l.cpu_quota {
        cpu.insert("quota".into(), json!(v));
    }
    if let Some(v) = l.cpu_period {
        cpu.insert("period".into(), json!(v));
    }
    if let Some(v) = &l.cpuset_cpus {
        cpu.insert("cpus".into(), json!(v));
    }
    if !cpu.is_empty() {
        resources["cpu"] = serde_json::Value::Object(cpu);
    }
    let rlimits: Vec<serde_json::Value> = l
        .rlimits
        .iter()
        .map(|(t, soft, hard)| json!({"type": t, "soft": soft, "hard": hard}))
        .collect();
    let sys_options = if process.insecure {
        json!(["nosuid", "noexec", "nodev"])
    } else {
        json!(["nosuid", "noexec", "nodev", "ro"])
    };
    for c in &process.cap_add {
        if !caps.contains(c) {
            caps.push(c.clone());
        }
    }
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", shm_size]}),
        json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
    ];
    if rootless {
        // A user namespace may not mount sysfs for the host's network namespace, nor
        // cgroup v1 hierarchies: the host's /sys is bound instead, read-only (its
        // cgroup tree with it).
        mounts.push(json!({"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "nosuid", "noexec", "nodev", "ro"]}));
    } else {
        mounts.push(json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options}));
        mounts.push(json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}));
    }
    for f in HOST_FILES {
        let source = match &process.hosts_file {
            Some(h) if f == "/etc/hosts" => h.as_path(),
            _ => Path::new(f),
        };
        if source.exists() {
            mounts.push(json!({"destination": f, "type": "bind", "source": source, "options": ["rbind", "ro", "nosuid", "nodev", "noexec"]}));
        }
    }
    let mut namespaces = vec![
        json!({"type": "pid"}),
        json!({"type": "ipc"}),
        json!({"type": "uts"}),
        json!({"type": "mount"}),
    ];
    if process.network_none {
        // runc brings the loopback device up in a new network namespace.
        namespaces.push(json!({"type": "network"}));
    }
    let (masked, readonly) = if process.insecure {
        (json!([]), json!([]))
    } else {
        (
            // Docker's default masked and read-only paths.
            json!([
                "/proc/asound",
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware",
                "/sys/devices/virtual/powercap"
            ]),
            json!([
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger"
            ]),
        )
    };
    for m in &process.mounts {
        mounts.push(json!({"destination": m.destination, "type": m.kind, "source": m.source, "options": m.options}));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": process.uid, "gid": process.gid, "additionalGids": process.additional_gids},
            "args": process.args,
            "env": process.env,
            "cwd": if process.cwd.is_empty() { "/" } else { process.cwd.as_str() },
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false,
            "rlimits": rlimits
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": "isula-build",
        "mounts": mounts,
        "linux": {
            // No network namespace unless --network=none: RUN uses the host network (the
            // manual).
            "namespaces": namespaces,
            "maskedPaths": masked,
            "readonlyPaths": readonly,
            // A fork bomb in a RUN stops at this many tasks instead of taking the host.
            "resources": resources,
            "seccomp": if process.seccomp_unconfined || process.insecure { serde_json::Value::Null } else { seccomp(&caps) }
        }
    })
}

/// The mount destinations a step adds to the rootfs (so the builder can keep the mount
/// points runc creates out of the layer).
pub fn mount_points() -> Vec<&'static str> {
    let mut v = vec!["/proc", "/dev", "/sys"];
    v.extend(HOST_FILES.iter().filter(|f| Path::new(f).exists()));
    v
}

/// A cancellation flag shared with whoever may stop the step.
pub type CancelFlag = Arc<AtomicBool>;

/// The runc binary and its state directory.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    pub state_root: PathBuf,
}

impl Runc {
    /// Finds `name_or_path` (an absolute path, or a name on PATH).
    pub fn new(name_or_path: &str, state_root: &Path) -> Result<Runc, RuntimeError> {
        let binary = if name_or_path.contains('/') {
            PathBuf::from(name_or_path)
        } else {
            std::env::var_os("PATH")
                .into_iter()
                .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
                .map(|d| d.join(name_or_path))
                .find(|p| p.is_file())
                .ok_or_else(|| RuntimeError::Runtime {
                    runtime: name_or_path.to_string(),
                    message: "not found on PATH (install runc)".into(),
                })?
        };
        Ok(Runc {
            binary,
            state_root: state_root.to_path_buf(),
        })
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root").arg(&self.state_root);
        if isula_sys::userns::in_user_namespace() {
            // Root of a user namespace only: runc must not expect the host's cgroups.
            c.args(["--rootless", "true"]);
        }
        c
    }

    /// `runc kill` of every process of container `id`. A rootless runc without a cgroup
    /// cannot list them (`--all` fails): there SIGKILL goes to the container's init, which
    /// takes the rest of its PID namespace with it.
    fn kill(&self, id: &str) -> Command {
        let mut c = self.command();
        c.arg("kill");
        if !isula_sys::userns::in_user_namespace() {
            c.arg("--all");
        }
        c.args([id, "KILL"]);
        c
    }

    /// Removes every container runc has under this state root (what a crash of the daemon
    /// left running): killed, then deleted. Returns their IDs.
    pub fn remove_all(&self) -> Vec<String> {
        if !self.state_root.is_dir() {
            return Vec::new();
        }
        let ids: Vec<String> = self
            .command()
            .args(["list", "-q"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        for id in &ids {
            let _ = self.kill(id).output();
            let _ = self.command().args(["delete", "--force", id]).output();
        }
        ids
    }

    /// Runs `process` on `rootfs` with its bundle in `bundle` (an empty private directory).
    /// Output (stdout and stderr together) goes to `output` as it arrives. Returns the exit
    /// code.
    pub fn run(
        &self,
        bundle: &Path,
        rootfs: &Path,
        process: &Process,
        cancel: &CancelFlag,
        output: &mut dyn FnMut(&[u8]),
    ) -> Result<i32, RuntimeError> {
        std::fs::create_dir_all(&self.state_root)
            .map_err(io("creating the runc state directory"))?;
        let config = serde_json::to_vec_pretty(&spec(rootfs, process))
            .map_err(|e| io("encoding config.json")(e.into()))?;
        std::fs::write(bundle.join("config.json"), config).map_err(io("writing config.json"))?;
        let id = format!("isula-build-{}", hex::encode(rand::random::<[u8; 8]>()));
        let (mut reader, writer) = std::io::pipe().map_err(io("creating the output pipe"))?;
        let writer2 = writer.try_clone().map_err(io("cloning the output pipe"))?;
        // runc's own errors (as opposed to the step's output) go to a JSON log, so that a
        // runtime that cannot start the step is told apart from a step that failed.
        let log = bundle.join("runc-log.json");
        let mut child = self
            .command()
            .arg("--log")
            .arg(&log)
            .args(["--log-format", "json"])
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(writer2)
            .spawn()
            .map_err(io(format!("starting {}", self.binary.display())))?;
        // Watch for cancellation while the output is read here.
        let done = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (done, cancel, runc, id) = (done.clone(), cancel.clone(), self.clone(), id.clone());
            std::thread::spawn(move || {
                let mut killed = false;
                while !done.load(Ordering::SeqCst) {
                    if cancel.load(Ordering::SeqCst) {
                        // Repeated until runc exits: a cancel can come before the container
                        // exists, when a single kill would find nothing to kill.
                        let _ = runc.kill(&id).output();
                        killed = true;
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                killed
            })
        };
        let mut buf = [0u8; 8192];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => output(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let status = child.wait().map_err(io("waiting for runc"));
        done.store(true, Ordering::SeqCst);
        let killed = watcher.join().unwrap_or(false);
        // Always remove the container's state, whatever happened.
        let _ = self.command().args(["delete", "--force", &id]).output();
        if killed || cancel.load(Ordering::SeqCst) {
            return Err(RuntimeError::Cancelled);
        }
        let status = status?;
        let code = status
            .code()
            .unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0));
        if code != 0 {
            if let Some(message) = runtime_error(&log) {
                return Err(RuntimeError::Runtime {
                    runtime: self.binary.display().to_string(),
                    message: rootless_hint(message),
                });
            }
        }
        Ok(code)
    }
}

/// A rootless runc refused a new /proc: the /proc it would hide is not fully visible,
/// which is what a container's masked paths do. Said with the fix.
fn rootless_hint(message: String) -> String {
    if isula_sys::userns::in_user_namespace()
        && message.contains("\"proc\"")
        && message.contains("operation not permitted")
    {
        return format!("{message} (a rootless builder in a container needs its /proc unmasked to mount one for RUN: docker run --security-opt systempaths=unconfined, or securityContext.procMount: Unmasked in Kubernetes)");
    }
    message
}

/// The last error runc logged (JSON lines with "level" and "msg"), if any.
fn runtime_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .find_map(|v| v["msg"].as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_validated() {
        assert_eq!(
            normalize_cap("sys_admin").ok().as_deref(),
            Some("CAP_SYS_ADMIN")
        );
        assert_eq!(
            normalize_cap("CAP_NET_ADMIN").ok().as_deref(),
            Some("CAP_NET_ADMIN")
        );
        assert!(normalize_cap("CAP_FLY").is_err());
        let s = spec(
            Path::new("/r"),
            &Process {
                cap_add: vec!["CAP_SYS_ADMIN".into()],
                ..Default::default()
            },
        );
        let caps = s["process"]["capabilities"]["bounding"]
            .as_array()
            .map(|a| a.len());
        assert_eq!(caps, Some(DEFAULT_CAPS.len() + 1));
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert!(!ns.contains(&"network"), "RUN uses the host network");
        assert!(s["linux"]["seccomp"].is_object());
        assert_eq!(
            s["linux"]["maskedPaths"].as_array().map(|a| a.len()),
            Some(11)
        );

        let s = spec(
            Path::new("/r"),
            &Process {
                network_none: true,
                insecure: true,
                hosts_file: Some("/build/hosts".into()),
                ..Default::default()
            },
        );
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["type"].as_str())
            .collect();
        assert!(ns.contains(&"network"));
        assert_eq!(
            s["process"]["capabilities"]["bounding"]
                .as_array()
                .map(|a| a.len()),
            Some(bounding_caps().len())
        );
        let mut by_bit = CAPS_BY_BIT.to_vec();
        by_bit.sort();
        assert_eq!(by_bit, ALL_CAPS.to_vec());
        assert!(s["linux"]["seccomp"].is_null());
        assert_eq!(s["linux"]["maskedPaths"], json!([]));
        let sys = s["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["destination"] == "/sys")
            .cloned()
            .unwrap_or_default();
        assert!(!sys["options"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|o| o == "ro"));
    }
}
