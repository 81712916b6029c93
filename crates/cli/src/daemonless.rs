//! Daemonless: the client starts its own `isula-builder` for one command, on a private
//! socket in the run root, talks to it as to any daemon, and stops it when the command is
//! done. The CLI links neither the store nor the builder (STYLE.md): the builder runs as a
//! child process, as root or (an ordinary user) rootless. Also the user's defaults for
//! finding a daemon: a non-root client looks for the user's rootless one.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Whether this client runs for an ordinary user (who has a rootless daemon of their own).
fn rootless() -> bool {
    !rustix::process::geteuid().is_root()
}

fn runtime_dir() -> Option<PathBuf> {
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The daemon's socket by default: the system's, or for a user their rootless daemon's
/// under $XDG_RUNTIME_DIR.
pub fn default_socket() -> PathBuf {
    match (rootless(), runtime_dir()) {
        (true, Some(dir)) => isula_api::user_socket_in(&dir),
        _ => PathBuf::from(isula_api::DEFAULT_SOCKET),
    }
}

/// The daemon's config directory by default (where it publishes its public key).
pub fn default_config_dir() -> PathBuf {
    if rootless() {
        if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(d).join("isula-build");
        }
        if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(h).join(".config/isula-build");
        }
    }
    PathBuf::from("/etc/isula-build")
}

/// The daemon's run root by default (isula-builder's own defaults, which this client
/// cannot link).
fn default_run_root() -> Result<PathBuf> {
    if !rootless() {
        return Ok(PathBuf::from("/var/run/isula-build"));
    }
    runtime_dir()
        .map(|d| d.join("isula-build"))
        .context("$XDG_RUNTIME_DIR is not set: a daemonless command keeps its builder's socket under it; set it to a private directory you own, or give --runroot")
}

/// Where the public key of the daemonless builder is, once it serves.
static KEY_FILE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The public key file of this command's own builder, when daemonless.
pub fn key_file() -> Option<&'static PathBuf> {
    KEY_FILE.get()
}

/// What a daemonless command needs to know.
pub struct Options {
    pub data_root: Option<PathBuf>,
    pub run_root: Option<PathBuf>,
    pub config_dir: Option<PathBuf>,
    pub log_level: String,
    pub timeout: Duration,
}

/// The builder of one daemonless command; stopped (SIGTERM, then waited for) on drop.
pub struct Builder {
    child: Option<std::process::Child>,
    socket: PathBuf,
    /// This command's directory in the run root (removed when the builder is done).
    dir: PathBuf,
}

impl Builder {
    /// The `unix://` host of the builder.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Starts `isula-builder` (beside this program, else on PATH) and waits until it
    /// serves on its private socket. Called on the thread that lives as long as the
    /// command: the builder stops when that thread ends (its parent-death signal), so a
    /// client killed outright leaves no builder holding the store.
    pub async fn start(o: &Options) -> Result<Builder> {
        let run_root = match &o.run_root {
            Some(r) => r.clone(),
            None => default_run_root()?,
        };
        let exe = builder_program()?;
        // A directory of this command's own: its socket and its builder's public key.
        let dir = run_root
            .join("daemonless")
            .join(std::process::id().to_string());
        let socket = dir.join("isula_build.sock");
        sweep_stale(dir.parent().unwrap_or(&run_root));
        let mut c = std::process::Command::new(&exe);
        c.arg("--runroot").arg(&run_root);
        if let Some(d) = &o.data_root {
            c.arg("--dataroot").arg(d);
        }
        if let Some(d) = &o.config_dir {
            c.arg("--config-dir").arg(d);
        }
        let _ = KEY_FILE.set(dir.join(isula_api::secret::PUBLIC_KEY_FILE));
        c.arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .arg("--daemonless")
            .args(["--log-level", daemon_level(&o.log_level)])
            .env_remove(isula_api::HOST_ENV)
            .env_remove("ISULA_BUILD_HOST")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let child = c
            .spawn()
            .with_context(|| format!("daemonless: starting {}", exe.display()))?;
        let mut b = Builder {
            child: Some(child),
            socket,
            dir,
        };
        let deadline = Instant::now() + o.timeout;
        loop {
            if let Some(c) = b.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    b.child = None;
                    b.remove_dir();
                    bail!(
                        "daemonless: the builder could not start ({status}; its message is above)"
                    );
                }
            }
            if std::os::unix::net::UnixStream::connect(&b.socket).is_ok() {
                return Ok(b);
            }
            if Instant::now() > deadline {
                bail!(
                    "daemonless: the builder did not serve on {} within {:?}",
                    b.socket.display(),
                    o.timeout
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the builder and waits for it (an error unless it stopped cleanly).
    pub fn stop(mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let result = Self::stop_child(&mut child);
        self.remove_dir();
        result
    }

    /// The builder removes its socket; its public key and the directory go here.
    fn remove_dir(&self) {
        let _ = std::fs::remove_file(self.dir.join(isula_api::secret::PUBLIC_KEY_FILE));
        let _ = std::fs::remove_dir(&self.dir);
    }

    fn stop_child(child: &mut std::process::Child) -> Result<()> {
        if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match child.try_wait() {
                Ok(Some(s)) if s.success() => return Ok(()),
                Ok(Some(s)) => bail!("daemonless: the builder stopped with {s}"),
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("daemonless: the builder did not stop within 60 s: killed")
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e).context("daemonless: waiting for the builder"),
            }
        }
    }
}

impl Drop for Builder {
    /// A command cut short (Ctrl-C) leaves before [`Builder::stop`]: the builder is told to
    /// stop, and cancels and cleans up what it was doing on its own.
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
    }
}

/// Removes what killed daemonless commands left in `daemonless_dir` (a directory per
/// command, named by its pid): those whose command is gone. Their builders went with
/// them.
fn sweep_stale(daemonless_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(daemonless_dir) else {
        return;
    };
    for e in entries.flatten() {
        let Some(pid) = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
            .and_then(rustix::process::Pid::from_raw)
        else {
            continue;
        };
        if rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH) {
            for f in ["isula_build.sock", isula_api::secret::PUBLIC_KEY_FILE] {
                let _ = std::fs::remove_file(e.path().join(f));
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// logrus names the client takes, as the daemon's four levels.
fn daemon_level(level: &str) -> &'static str {
    match level.to_ascii_lowercase().as_str() {
        "debug" | "trace" => "debug",
        "info" => "info",
        "warn" | "warning" => "warn",
        _ => "error",
    }
}

/// `isula-builder` beside this program (an installation puts both in one directory; so
/// does cargo), else on PATH.
fn builder_program() -> Result<PathBuf> {
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        let p = dir.join("isula-builder");
        if p.is_file() {
            return Ok(p);
        }
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("isula-builder"))
        .find(|p| p.is_file())
        .context("daemonless: isula-builder is not installed beside isula-build nor on PATH")
}

/// Starts the builder for `cli` (--daemonless): refused with --host, which names a daemon.
pub async fn start_for(cli: &crate::Cli, timeout: Duration) -> Result<Builder> {
    if !cli.host.is_empty() {
        bail!("--daemonless runs its own builder: it takes no --host");
    }
    let o = Options {
        data_root: cli.dataroot.clone(),
        run_root: cli.runroot.clone(),
        config_dir: cli.config_dir.clone(),
        log_level: cli.log_level.clone(),
        timeout,
    };
    Builder::start(&o).await
}
