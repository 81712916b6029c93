//! Helpers for the rootless and daemonless tests: a system user made for the test (with
//! subordinate id ranges the test writes into /etc/subuid and /etc/subgid, and removes
//! again), its private XDG directories, and the real binaries run as that user.

use crate::bin;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// /etc/subuid, /etc/subgid and /etc/passwd are edited by one test at a time.
static ETC: Mutex<()> = Mutex::new(());

/// A user made for one test; removed with its subordinate ranges (and any process of its)
/// on drop.
pub struct TestUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Its home, XDG directories and files, owned by it.
    pub home: tempfile::TempDir,
    /// The subuid/subgid lines this test added (removed on drop).
    lines: Vec<String>,
}

/// Replaces `file` at once (a temp file renamed over it): daemons starting in other tests
/// read it meanwhile, and must never see it truncated.
fn replace(file: &str, text: &str) {
    let tmp = format!("{file}.isula-test-{}", std::process::id());
    std::fs::write(&tmp, text).expect("write sub id file");
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .expect("chmod sub id file");
    std::fs::rename(&tmp, file).expect("replace sub id file");
}

fn add_line(file: &str, line: &str) {
    let mut text = std::fs::read_to_string(file).unwrap_or_default();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(line);
    text.push('\n');
    replace(file, &text);
}

fn remove_line(file: &str, line: &str) {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| *l != line)
        .map(|l| format!("{l}\n"))
        .collect();
    replace(file, &kept);
}

impl TestUser {
    /// A new system user (no subordinate ranges yet) with a private home in /tmp.
    pub fn new(tag: &str) -> TestUser {
        let name = format!("isrl{tag}{}", std::process::id() % 100000);
        {
            let _g = ETC.lock().unwrap_or_else(|p| p.into_inner());
            let _ = Command::new("userdel").arg(&name).output();
            // -r: a system user, which useradd gives no subordinate ranges of its own.
            let out = Command::new("useradd")
                .args(["-r", "-M", "-s", "/bin/sh", &name])
                .output()
                .expect("useradd (passwd package)");
            assert!(
                out.status.success(),
                "useradd {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let id = |flag: &str| -> u32 {
            let o = Command::new("id").args([flag, &name]).output().expect("id");
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        let (uid, gid) = (id("-u"), id("-g"));
        let home = tempfile::Builder::new()
            .prefix("isula-rootless-")
            .tempdir()
            .expect("home");
        let user = TestUser {
            name,
            uid,
            gid,
            home,
            lines: Vec::new(),
        };
        for d in ["", "run", "data", "config", "work"] {
            let p = user.home.path().join(d);
            std::fs::create_dir_all(&p).expect("mkdir");
            user.chown(&p);
        }
        std::fs::set_permissions(
            user.run_dir(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod run");
        user
    }

    /// A user with `count` subordinate uids and gids from `start`.
    pub fn with_range(tag: &str, start: u32, count: u32) -> TestUser {
        let mut u = TestUser::new(tag);
        u.add_range(start, count);
        u
    }

    pub fn add_range(&mut self, start: u32, count: u32) {
        let line = format!("{}:{start}:{count}", self.name);
        let _g = ETC.lock().unwrap_or_else(|p| p.into_inner());
        add_line("/etc/subuid", &line);
        add_line("/etc/subgid", &line);
        self.lines.push(line);
    }

    pub fn chown(&self, p: &Path) {
        std::os::unix::fs::lchown(p, Some(self.uid), Some(self.gid)).expect("chown");
    }

    /// Writes `data` to `rel` under the home (owned by the user).
    pub fn write(&self, rel: &str, data: &[u8]) -> PathBuf {
        let p = self.home.path().join(rel);
        let parent = p.parent().expect("parent");
        std::fs::create_dir_all(parent).expect("mkdir");
        let mut d = parent.to_path_buf();
        while d.starts_with(self.home.path()) {
            self.chown(&d);
            if !d.pop() {
                break;
            }
        }
        std::fs::write(&p, data).expect("write");
        self.chown(&p);
        p
    }

    pub fn run_dir(&self) -> PathBuf {
        self.home.path().join("run")
    }
    pub fn data_dir(&self) -> PathBuf {
        self.home.path().join("data/isula-build")
    }
    pub fn config_dir(&self) -> PathBuf {
        self.home.path().join("config/isula-build")
    }
    pub fn socket(&self) -> PathBuf {
        self.run_dir().join("isula_build.sock")
    }

    /// `program` run as this user with a clean environment: PATH, HOME and the XDG
    /// directories in its home.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = self.env_command(program);
        c.uid(self.uid).gid(self.gid);
        c
    }

    /// `program` with this user's environment, run as the caller (root).
    pub fn env_command(&self, program: &Path) -> Command {
        let mut c = Command::new(program);
        c.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", self.home.path())
            .env("USER", &self.name)
            .env("XDG_RUNTIME_DIR", self.run_dir())
            .env("XDG_DATA_HOME", self.home.path().join("data"))
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .current_dir(self.home.path());
        c
    }

    /// `isula-build ARGS` as this user (its default socket: its rootless daemon's).
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(&user_bin("isula-build"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("isula-build")
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "isula-build {args:?} as {} failed: {}\n{}",
            self.name,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            !o.status.success(),
            "isula-build {args:?} as {} should have failed: {}",
            self.name,
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }

    /// The processes this user runs (none must be left behind).
    pub fn processes(&self) -> Vec<String> {
        let o = Command::new("pgrep")
            .args(["-a", "-u", &self.uid.to_string()])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(String::from)
            .collect()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", &self.uid.to_string()])
            .output();
        let _g = ETC.lock().unwrap_or_else(|p| p.into_inner());
        for l in &self.lines {
            remove_line("/etc/subuid", l);
            remove_line("/etc/subgid", l);
        }
        let _ = Command::new("userdel").arg(&self.name).output();
    }
}

/// The binaries where any user can run them: the target directory when it is open to
/// all, else hard links (or copies) in a directory of /tmp made once per test process.
pub fn user_bin(name: &str) -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let real = bin(name);
    let open = real.ancestors().skip(1).all(|d| {
        std::fs::metadata(d)
            .is_ok_and(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o001 != 0)
    });
    if open {
        return real;
    }
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("isula-rootless-bin-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("bin dir");
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        for n in ["isula-build", "isula-builder"] {
            let (from, to) = (bin(n), d.join(n));
            if std::fs::hard_link(&from, &to).is_err() {
                std::fs::copy(&from, &to).expect("copy binary");
            }
        }
        d
    });
    dir.join(name)
}

/// A rootless `isula-builder` run by a test user on its default places.
pub struct UserDaemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl UserDaemon {
    /// Starts it and waits until the user's client reaches it through the default socket.
    pub fn start(user: &TestUser, extra: &[&str]) -> UserDaemon {
        let log = user.home.path().join("daemon.log");
        let f = std::fs::File::create(&log).expect("log");
        let child = user
            .command(&user_bin("isula-builder"))
            .args(["--log-level", "debug"])
            .args(extra)
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("isula-builder");
        let mut d = UserDaemon {
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if user.socket().exists() && user.cli(&["version"]).status.success() {
                return d;
            }
            if let Some(c) = d.child.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    panic!(
                        "rootless isula-builder exited with {s}:\n{}\n/etc/subuid:\n{}\n/etc/subgid:\n{}",
                        d.log(),
                        std::fs::read_to_string("/etc/subuid").unwrap_or_default(),
                        std::fs::read_to_string("/etc/subgid").unwrap_or_default()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "rootless isula-builder did not come up:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM to the process the user started (it passes it on); its exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("rootless isula-builder did not stop:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for UserDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}
