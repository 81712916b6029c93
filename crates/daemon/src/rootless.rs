//! The rootless daemon: `isula-builder` started by an ordinary user. It owns the user's
//! default places (data under `$XDG_DATA_HOME/isula-build`, run state and the socket under
//! `$XDG_RUNTIME_DIR`, configuration under `$XDG_CONFIG_HOME/isula-build`) and the move
//! into a user namespace: the process the user started checks what the move needs (a
//! subordinate id range in /etc/subuid and /etc/subgid, `newuidmap`/`newgidmap`, writable
//! roots), starts itself again as a child that unshares a user and mount namespace, maps
//! the child's ids with `newuidmap`/`newgidmap` (0 is the user, 1.. the subordinate range),
//! and then only waits for it, passing on SIGTERM/SIGINT/SIGHUP. In the namespace the
//! child is root over the mapped ids, so the rest of the daemon runs unchanged: layers keep
//! the image's own owners (0 in the image is 0 in a tar). This module must not decide
//! anything about builds; the kernel calls are `isula_sys::userns`.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Set (to "READ_FD,WRITE_FD") in the child's environment: it is the daemon that must
/// enter the namespace, and those are its ends of the pipes to its parent.
const SYNC_ENV: &str = "ISULA_BUILD_USERNS_SYNC";

/// The child tells its parent it has unshared (`U`), or failed (`E` + errno, 4 bytes LE).
const UNSHARED: u8 = b'U';
const FAILED: u8 = b'E';
/// The parent tells the child its maps are written.
const MAPPED: u8 = b'G';

/// Whether this daemon runs for an ordinary user: started by one, or the child such a
/// start made (root of its user namespace).
pub fn active() -> bool {
    std::env::var_os(SYNC_ENV).is_some() || !rustix::process::geteuid().is_root()
}

static DAEMONLESS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes that this daemon serves one daemonless command (`--daemonless`).
pub fn set_daemonless(on: bool) {
    DAEMONLESS.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the control socket is for the daemon's own user only (0600, no group): a
/// rootless daemon's, or a daemonless command's.
pub fn private_socket() -> bool {
    active() || DAEMONLESS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Where the public key goes: the config directory, except for a daemonless command,
/// whose key is its own (beside its private socket), never the one a daemon on the same
/// config directory published.
pub fn key_dir(settings: &crate::config::Settings) -> PathBuf {
    match (
        &settings.socket,
        DAEMONLESS.load(std::sync::atomic::Ordering::Relaxed),
    ) {
        (Some(socket), true) => socket
            .parent()
            .map_or_else(|| settings.config_dir.clone(), Path::to_path_buf),
        _ => settings.config_dir.clone(),
    }
}

/// The user's default places.
#[derive(Debug, Clone)]
pub struct UserDefaults {
    pub data_root: PathBuf,
    pub run_root: PathBuf,
    pub socket: PathBuf,
    pub config_dir: PathBuf,
}

fn xdg(var: &str, home_rel: &str) -> Result<PathBuf> {
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        if !p.is_absolute() {
            bail!("${var} ({}) must be an absolute path", p.display());
        }
        return Ok(p);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .context("a rootless isula-builder needs $HOME or $XDG_DATA_HOME")?;
    Ok(home.join(home_rel))
}

/// The user's default places, when rootless (None for root).
pub fn user_defaults() -> Result<Option<UserDefaults>> {
    if !active() {
        return Ok(None);
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .context(
            "$XDG_RUNTIME_DIR is not set: a rootless isula-builder keeps its socket and run state there (log in through systemd-logind, which makes /run/user/UID, or set it to a private directory you own), or give --runroot and --host",
        )?;
    if !runtime.is_absolute() {
        bail!(
            "$XDG_RUNTIME_DIR ({}) must be an absolute path",
            runtime.display()
        );
    }
    Ok(Some(UserDefaults {
        data_root: xdg("XDG_DATA_HOME", ".local/share")?.join("isula-build"),
        run_root: runtime.join("isula-build"),
        socket: isula_api::user_socket_in(&runtime),
        config_dir: xdg("XDG_CONFIG_HOME", ".config")?.join("isula-build"),
    }))
}

/// Who holds a data root (beside its store lock, for the message a second daemon gives).
const HOLDER_FILE: &str = "in-use-by";

/// Notes who now holds the data root's lock: a daemon serving its socket, or one daemonless
/// command. Only read while the lock is held by another, so a stale note is never read.
pub fn record_holder(settings: &crate::config::Settings, daemonless: bool) {
    let pid = std::process::id();
    let text = match (daemonless, &settings.socket) {
        (true, _) => format!("daemonless {pid}\n"),
        (false, Some(s)) => format!("daemon {pid} unix://{}\n", s.display()),
        (false, None) => format!("daemon {pid} tcp\n"),
    };
    let path = settings.data_root.join(HOLDER_FILE);
    if let Err(e) = std::fs::write(&path, text) {
        tracing::warn!(path = %path.display(), error = %e, "cannot note who holds the data root");
    }
}

/// What the holder note of `data_root` says, as the end of a refusal (empty if none).
pub fn holder_of(data_root: &Path) -> String {
    let text = std::fs::read_to_string(data_root.join(HOLDER_FILE)).unwrap_or_default();
    let mut f = text.split_whitespace();
    match (f.next(), f.next(), f.next()) {
        (Some("daemonless"), Some(pid), _) => format!(
            ": a daemonless isula-build command (pid {pid}) is using it; wait for it to finish (one daemonless command per data root at a time), or give this one another --dataroot"
        ),
        (Some("daemon"), Some(pid), Some(host)) => format!(
            ": the isula-builder daemon (pid {pid}) serves it on {host}; use that daemon (without --daemonless), or stop it first"
        ),
        _ => String::new(),
    }
}

/// The cgroup directory of this process when cgroup v2 delegates it to us (writable by the
/// daemon): None under cgroup v1, or when it is not ours to write.
fn delegated_cgroup() -> Option<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        return None; // cgroup v1: never delegated to a user
    }
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = root.join(rel.trim_start_matches('/'));
    rustix::fs::access(
        dir.join("cgroup.subtree_control"),
        rustix::fs::Access::WRITE_OK,
    )
    .ok()
    .map(|()| dir)
}

/// A rootless daemon applies resource limits only where a cgroup is delegated to it; a
/// build asking for one elsewhere is refused before it starts, naming what to do.
pub fn check_limits(l: isula_runtime::Limits) -> Result<isula_runtime::Limits, String> {
    if !isula_sys::userns::in_user_namespace() {
        return Ok(l);
    }
    let mut asked = Vec::new();
    for (set, flag) in [
        (l.memory.is_some(), "--memory"),
        (l.cpu_shares.is_some(), "--cpu-shares"),
        (l.cpu_quota.is_some(), "--cpu-quota"),
        (l.cpu_period.is_some(), "--cpu-period"),
        (l.cpuset_cpus.is_some(), "--cpuset-cpus"),
        (l.pids.is_some(), "--pids-limit"),
    ] {
        if set {
            asked.push(flag);
        }
    }
    if asked.is_empty() || delegated_cgroup().is_some() {
        return Ok(l);
    }
    let why = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "this rootless daemon's cgroup is not delegated to its user"
    } else {
        "this machine uses cgroup v1, which does not delegate cgroups to users"
    };
    Err(format!(
        "resource limits ({}) need a cgroup of this daemon's own, and {why}: build without them, start the daemon in a delegated cgroup v2 unit (systemd-run --user -p Delegate=yes isula-builder; cgroup v2 needs systemd.unified_cgroup_hierarchy=1 at boot), or use a root daemon",
        asked.join(", ")
    ))
}

/// A subordinate id range of /etc/subuid or /etc/subgid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubRange {
    pub start: u32,
    pub count: u32,
}

/// The first range of `user` (by name or uid) in a subuid/subgid file's text.
pub fn sub_range(text: &str, user: &str, uid: u32) -> Option<SubRange> {
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let who = f.next()?;
        if who != user && who.parse::<u32>().ok() != Some(uid) {
            return None;
        }
        let start = f.next()?.trim().parse().ok()?;
        let count: u32 = f.next()?.trim().parse().ok()?;
        (count > 0).then_some(SubRange { start, count })
    })
}

fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        f.next()?;
        (f.next()?.parse::<u32>().ok()? == uid).then(|| name.to_string())
    })
}

/// `name` on PATH (the usual directories when PATH is unset).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/usr/sbin:/bin:/sbin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Makes `dir` (mode 0700) or says why it cannot, naming the fix. The directories it
/// made are added to `made` (deepest last), for removal if the start fails.
fn prepare_dir(dir: &Path, what: &str, fix: &str, made: &mut Vec<PathBuf>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect();
    missing.reverse();
    let result = std::fs::create_dir_all(dir).and_then(|()| {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        // Writable by us: a probe file, removed at once.
        let probe = dir.join(format!(".isula-build-probe-{}", std::process::id()));
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)
    });
    made.extend(missing.into_iter().filter(|d| d.exists()));
    result.with_context(|| {
        format!(
            "the {what} {} is not usable by uid {}: {fix}",
            dir.display(),
            rustix::process::getuid().as_raw()
        )
    })
}

/// Removes the (still empty) directories a failed start made, deepest first.
fn remove_made(made: &[PathBuf]) {
    for d in made.iter().rev() {
        let _ = std::fs::remove_dir(d);
    }
}

/// What the daemon must do at start: go on (as root, or as the child in its namespace),
/// or exit with a code (the parent, once its child is done).
pub enum Start {
    Continue,
    Exit(i32),
}

/// Called first thing in `main`, while the process has one thread.
pub fn enter(settings: &crate::config::Settings) -> Result<Start> {
    if let Some(sync) = std::env::var_os(SYNC_ENV) {
        child(&sync)?;
        return Ok(Start::Continue);
    }
    if rustix::process::geteuid().is_root() {
        return Ok(Start::Continue);
    }
    parent(settings).map(Start::Exit)
}

/// The child: unshare, tell the parent, wait for the maps, settle.
fn child(sync: &std::ffi::OsStr) -> Result<()> {
    let text = sync.to_string_lossy();
    let (r, w) = text
        .split_once(',')
        .and_then(|(r, w)| Some((r.parse::<i32>().ok()?, w.parse::<i32>().ok()?)))
        .with_context(|| format!("${SYNC_ENV} is malformed: {text:?}"))?;
    let mut from_parent = std::fs::File::from(isula_sys::userns::inherited_pipe(r)?);
    let mut to_parent = std::fs::File::from(isula_sys::userns::inherited_pipe(w)?);
    let parent = rustix::process::getppid().map_or(0, |p| p.as_raw_nonzero().get() as u32);
    if !isula_sys::userns::die_with_parent(parent)? {
        bail!("the process that started this daemon is gone");
    }
    if let Err(e) = isula_sys::userns::unshare_user_and_mount() {
        let errno = e.errno().unwrap_or(0);
        let mut msg = vec![FAILED];
        msg.extend_from_slice(&errno.to_le_bytes());
        let _ = to_parent.write_all(&msg);
        std::process::exit(1);
    }
    to_parent
        .write_all(&[UNSHARED])
        .context("telling the parent")?;
    let mut go = [0u8; 1];
    from_parent
        .read_exact(&mut go)
        .context("waiting for the parent to map the ids")?;
    if go[0] != MAPPED {
        // The parent said why on its side.
        std::process::exit(1);
    }
    isula_sys::userns::settle_in_namespace()?;
    if !rustix::process::geteuid().is_root() {
        bail!("the user namespace's maps do not make this process root in it");
    }
    Ok(())
}

/// overlayfs mounts in a user namespace (with `userxattr`) came with Linux 5.11.
fn check_kernel() -> Result<()> {
    let uname = rustix::system::uname();
    let release = uname.release().to_string_lossy().to_string();
    if !overlay_in_userns(&release) {
        bail!(
            "the kernel {release} is older than 5.11: a rootless isula-builder needs overlayfs in a user namespace (userxattr, Linux 5.11); fuse-overlayfs is not supported yet: run the daemon as root, or on a newer kernel"
        );
    }
    Ok(())
}

/// Whether kernel `release` ("6.1.0-18-amd64") mounts overlayfs in a user namespace.
fn overlay_in_userns(release: &str) -> bool {
    let mut nums = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    (nums.next().unwrap_or(0), nums.next().unwrap_or(0)) >= (5, 11)
}

/// Reads the subordinate range of `user` from `file`, or says how to add one.
fn read_sub_range(file: &str, user: &str, uid: u32) -> Result<SubRange> {
    let kind = if file.ends_with("subuid") {
        "uid"
    } else {
        "gid"
    };
    let text = std::fs::read_to_string(file).unwrap_or_default();
    sub_range(&text, user, uid).with_context(|| {
        format!(
            "user {user} (uid {uid}) has no subordinate {kind} range in {file}: a rootless isula-builder maps the image's ids there; add one as root, e.g. `usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}`"
        )
    })
}

/// The parent: checks, starts the child, maps its ids, waits for it.
fn parent(settings: &crate::config::Settings) -> Result<i32> {
    let uid = rustix::process::getuid().as_raw();
    let gid = rustix::process::getgid().as_raw();
    let user = user_name(uid)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| uid.to_string());
    let newuidmap = find_tool("newuidmap").context(
        "newuidmap is not installed: a rootless isula-builder needs it (and newgidmap) to map the subordinate ids; install the uidmap package (apt-get install uidmap)",
    )?;
    let newgidmap = find_tool("newgidmap").context(
        "newgidmap is not installed: install the uidmap package (apt-get install uidmap)",
    )?;
    check_kernel()?;
    let subuid = read_sub_range("/etc/subuid", &user, uid)?;
    let subgid = read_sub_range("/etc/subgid", &user, uid)?;
    let mut made = Vec::new();
    let ids = Ids {
        uid,
        gid,
        user: &user,
        subuid,
        subgid,
        newuidmap: &newuidmap,
        newgidmap: &newgidmap,
    };
    let result = start_child(settings, &ids, &mut made);
    if result.is_err() {
        remove_made(&made);
    }
    result
}

/// Who the parent maps, and with what.
struct Ids<'a> {
    uid: u32,
    gid: u32,
    user: &'a str,
    subuid: SubRange,
    subgid: SubRange,
    newuidmap: &'a Path,
    newgidmap: &'a Path,
}

/// The parent's part once what must be installed and configured is: the roots made, the
/// child started and mapped, then waited for.
fn start_child(
    settings: &crate::config::Settings,
    ids: &Ids<'_>,
    made: &mut Vec<PathBuf>,
) -> Result<i32> {
    let Ids {
        uid,
        gid,
        user,
        subuid,
        subgid,
        newuidmap,
        newgidmap,
    } = *ids;
    prepare_dir(
        &settings.run_root,
        "run root",
        "set $XDG_RUNTIME_DIR to a private directory you own (systemd-logind makes /run/user/UID), or give --runroot",
        made,
    )?;
    prepare_dir(
        &settings.data_root,
        "data root",
        "give --dataroot a directory you own (default $XDG_DATA_HOME/isula-build)",
        made,
    )?;
    if let Some(socket) = &settings.socket {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!(
                    "the socket's directory {} cannot be made by uid {uid}: set $XDG_RUNTIME_DIR to a private directory you own, or give --host",
                    dir.display()
                )
            })?;
        }
    }
    // Signals are caught before the child exists, so a stop sent at once is passed on.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut signals = runtime.block_on(async { Signals::catch() })?;
    let (from_child, child_w) = rustix::pipe::pipe().context("making a pipe")?;
    let (child_r, to_child) = rustix::pipe::pipe().context("making a pipe")?;
    for fd in [&from_child, &to_child] {
        rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::CLOEXEC).context("pipe")?;
    }
    let exe = std::env::current_exe().context("finding this program")?;
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut child = std::process::Command::new(&exe)
        .args(&args)
        .env(
            SYNC_ENV,
            format!("{},{}", child_r.as_raw_fd(), child_w.as_raw_fd()),
        )
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    drop((child_r, child_w));
    let pid = child.id();
    let mut from_child = std::fs::File::from(from_child);
    let mut to_child = std::fs::File::from(to_child);
    let mut first = [0u8; 5];
    let n = read_some(&mut from_child, &mut first);
    let mapped = match first.first().copied() {
        _ if n == 0 => Err(anyhow::anyhow!(
            "the daemon in the user namespace ended before it unshared"
        )),
        Some(FAILED) => {
            let errno = i32::from_le_bytes([first[1], first[2], first[3], first[4]]);
            let e = std::io::Error::from_raw_os_error(errno);
            let fix = match isula_sys::userns::max_user_namespaces() {
                Some(0) => "user namespaces are turned off (sysctl user.max_user_namespaces = 0): as root, `sysctl -w user.max_user_namespaces=15000`".to_string(),
                _ => "allow unprivileged user namespaces (sysctl user.max_user_namespaces > 0, kernel.unprivileged_userns_clone = 1 where it exists, kernel.apparmor_restrict_unprivileged_userns = 0 where it exists; not in a chroot, which the kernel refuses them; in a container, a seccomp profile that allows unshare and clone with CLONE_NEWUSER)".to_string(),
            };
            Err(anyhow::anyhow!(
                "the kernel refuses this user a user namespace (unshare: {e}): {fix}, or run the daemon as root"
            ))
        }
        Some(UNSHARED) => map_ids(newuidmap, newgidmap, pid, uid, gid, subuid, subgid, user),
        _ => Err(anyhow::anyhow!(
            "the daemon in the user namespace said {first:?}"
        )),
    };
    if let Err(e) = mapped {
        drop(to_child);
        let _ = child.wait();
        return Err(e);
    }
    to_child
        .write_all(&[MAPPED])
        .context("telling the daemon its ids are mapped")?;
    drop(to_child);
    let status = runtime.block_on(async move {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        loop {
            tokio::select! {
                status = &mut rx => break status,
                sig = signals.recv() => {
                    if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                        let _ = rustix::process::kill_process(p, sig);
                    }
                }
            }
        }
    });
    let status = status
        .map_err(|_| anyhow::anyhow!("lost the daemon"))?
        .context("waiting for the daemon")?;
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    }))
}

fn read_some(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if buf[0] == UNSHARED {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    got
}

#[allow(clippy::too_many_arguments)]
fn map_ids(
    newuidmap: &Path,
    newgidmap: &Path,
    pid: u32,
    uid: u32,
    gid: u32,
    subuid: SubRange,
    subgid: SubRange,
    user: &str,
) -> Result<()> {
    for (tool, own, range) in [(newuidmap, uid, subuid), (newgidmap, gid, subgid)] {
        let out = std::process::Command::new(tool)
            .arg(pid.to_string())
            .args(["0", &own.to_string(), "1"])
            .args(["1", &range.start.to_string(), &range.count.to_string()])
            .output()
            .with_context(|| format!("running {}", tool.display()))?;
        if !out.status.success() {
            bail!(
                "{} {pid} 0 {own} 1 1 {} {} failed: {}: check that {} is setuid root (the uidmap package installs it so) and that /etc/sub{}id gives {user} that range",
                tool.display(),
                range.start,
                range.count,
                String::from_utf8_lossy(&out.stderr).trim(),
                tool.display(),
                if tool == newuidmap { "u" } else { "g" }
            );
        }
    }
    Ok(())
}

/// The stop signals the parent passes on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
            int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            hup: signal(SignalKind::hangup()).context("catching SIGHUP")?,
        })
    }

    async fn recv(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal;
        tokio::select! {
            _ = self.term.recv() => Signal::TERM,
            _ = self.int.recv() => Signal::INT,
            _ = self.hup.recv() => Signal::HUP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_with_overlayfs_in_user_namespaces() {
        assert!(overlay_in_userns("5.11.0"));
        assert!(overlay_in_userns("6.1.0-18-amd64"));
        assert!(overlay_in_userns("6.18.44-fc-v1300"));
        assert!(!overlay_in_userns("5.10.0-28-amd64"));
        assert!(!overlay_in_userns("4.19.0"));
        assert!(!overlay_in_userns("garbage"));
    }

    #[test]
    fn the_holder_of_a_data_root_is_named() {
        let d = tempfile::tempdir().expect("tmp");
        assert_eq!(holder_of(d.path()), "");
        std::fs::write(d.path().join(HOLDER_FILE), "daemonless 42\n").expect("write");
        assert!(holder_of(d.path()).contains("a daemonless isula-build command (pid 42)"));
        std::fs::write(d.path().join(HOLDER_FILE), "daemon 7 unix:///s.sock\n").expect("write");
        assert!(holder_of(d.path())
            .contains("the isula-builder daemon (pid 7) serves it on unix:///s.sock"));
    }

    #[test]
    fn sub_ranges_by_name_or_uid() {
        let text = "alice:100000:65536\n1001:200000:1000\nbad:line\nzero:1:0\n";
        assert_eq!(
            sub_range(text, "alice", 1000),
            Some(SubRange {
                start: 100000,
                count: 65536
            })
        );
        assert_eq!(
            sub_range(text, "bob", 1001),
            Some(SubRange {
                start: 200000,
                count: 1000
            })
        );
        assert_eq!(sub_range(text, "carol", 1002), None);
        assert_eq!(sub_range(text, "zero", 5), None);
    }
}
