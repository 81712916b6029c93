//! Helpers for end-to-end tests: run the real `isula-builder` on a temp socket with temp
//! data, run and config roots, drive it with the real `isula-build`, and build test inputs
//! (a busybox rootfs from Debian's busybox-static). Binaries come from the cargo target
//! directory, so `cargo build --bins` must run first (the README's test command does).

pub mod http_files;
pub mod kube;
pub mod oci_layout;
pub mod pki;
pub mod powercut;
pub mod registry;
pub mod rootless;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// registries.toml listing `hosts` as insecure.
pub fn insecure_registries(hosts: &[&str]) -> String {
    hosts
        .iter()
        .map(|h| format!("[[registry]]\nlocation = \"{h}\"\ninsecure = true\n"))
        .collect()
}

/// Root-only tests skip outside CI (saying so) and fail in CI.
pub fn require_root() -> bool {
    if rustix::process::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "end-to-end tests must run as root in CI"
    );
    eprintln!("skipping: end-to-end tests need root (outside CI)");
    false
}

/// An external tool needed by a test: in CI it must be there; elsewhere the test skips.
pub fn require_tool(name: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} must be installed in CI"
        );
        eprintln!("skipping: {name} is not installed (outside CI)");
    }
    found
}

pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bins` first",
        p.display()
    );
    p
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    /// `taskset -c CPUS` around the daemon (None: every CPU).
    cpus: Option<String>,
    /// Where the data root and config directory are (None: in `dir`); the run root, the
    /// socket and the log stay in `dir`, as /run and /var/log are not the data disk.
    roots: Option<PathBuf>,
}

impl Daemon {
    /// `login SERVER -u USER --password-stdin`, the password written to its stdin.
    pub fn login(&self, server: &str, user: &str, password: &str) -> Output {
        let mut c = self.cli_command(&["login", server, "-u", user, "--password-stdin"]);
        c.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().expect("login");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(format!("{password}\n").as_bytes())
            .expect("password");
        child.wait_with_output().expect("login output")
    }

    pub fn data(&self) -> PathBuf {
        self.roots
            .as_deref()
            .unwrap_or(self.dir.path())
            .join("data")
    }
    pub fn run_root(&self) -> PathBuf {
        self.dir.path().join("run")
    }
    pub fn etc(&self) -> PathBuf {
        self.roots.as_deref().unwrap_or(self.dir.path()).join("etc")
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("isula_build.sock")
    }
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// A daemon that may talk plain HTTP (or unverified TLS) to `hosts`, logging at debug.
    pub fn for_registries(hosts: &[&str]) -> Daemon {
        Self::start_configured(
            &[("registries.toml", &insecure_registries(hosts))],
            &["--log-level", "debug"],
            &[],
        )
    }

    /// Stops the daemon cleanly and requires `--check-store` to find nothing wrong and to
    /// have nothing to repair (a repair exits 0 too, but means the store was damaged).
    pub fn stop_and_check_store(&mut self) {
        assert_eq!(self.stop(), Some(0), "the daemon did not stop cleanly");
        let check = self
            .command()
            .arg("--check-store")
            .output()
            .expect("check-store");
        let stdout = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success() && !stdout.contains("repaired"),
            "--check-store: {stdout}\n{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }

    /// A daemon on fresh temp roots.
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Daemon {
        Self::start_with_env(extra, &[])
    }

    /// A daemon with extra flags and environment variables.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Daemon {
        Self::start_configured(&[], extra, env)
    }

    /// A daemon whose config directory holds `files` (name, contents), e.g.
    /// `registries.toml`, `certs.d/HOST/ca.crt`.
    pub fn start_configured(
        files: &[(&str, &str)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        Self::start_in(None, files, extra, env)
    }

    /// [`Daemon::start_configured`] with the data root and config directory under `roots`
    /// (a file system of the test's own, say).
    pub fn start_in(
        roots: Option<&Path>,
        files: &[(&str, &str)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Daemon {
        Self::try_start_in(roots, files, extra, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Daemon::start_in`], returning why the daemon did not come up instead of failing.
    pub fn try_start_in(
        roots: Option<&Path>,
        files: &[(&str, &str)],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Daemon, String> {
        let dir = tempfile::Builder::new()
            .prefix("isula-e2e-")
            .tempdir()
            .expect("tempdir");
        let etc = roots.unwrap_or(dir.path()).join("etc");
        std::fs::create_dir_all(&etc).expect("etc");
        for (name, text) in files {
            let p = etc.join(name);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, text).expect("write config");
        }
        let mut d = Daemon {
            roots: roots.map(Path::to_path_buf),
            dir,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            cpus: None,
        };
        d.try_restart()?;
        Ok(d)
    }

    /// A daemon on fresh temp roots that may use only the CPUs `cpus` (taskset's list).
    pub fn start_on_cpus(cpus: &str) -> Daemon {
        let mut d = Self::start();
        d.stop();
        d.cpus = Some(cpus.to_string());
        d.restart();
        d
    }

    pub fn command(&self) -> Command {
        self.command_on(&self.socket())
    }

    /// The daemon command on these roots, serving `socket`.
    pub fn command_on(&self, socket: &Path) -> Command {
        let mut c = match &self.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(bin("isula-builder"));
                c
            }
            None => Command::new(bin("isula-builder")),
        };
        c.arg("--dataroot")
            .arg(self.data())
            .arg("--runroot")
            .arg(self.run_root())
            .arg("--config-dir")
            .arg(self.etc())
            .arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("ISULABUILD_HOST");
        c
    }

    /// (Re)starts the daemon on the same roots and waits until it answers.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Daemon::restart`], returning why the daemon did not come up instead of failing.
    pub fn try_restart(&mut self) -> Result<(), String> {
        // A daemon still running would answer the readiness check while the new one fails
        // on the store lock, and then outlive the test.
        if let Some(c) = self.child.as_mut() {
            assert!(
                matches!(c.try_wait(), Ok(Some(_))),
                "restart() while the daemon still runs: stop() or kill() it first"
            );
        }
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("log");
        let child = self
            .command()
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn isula-builder");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.socket().exists() && self.cli(&["version"]).status.success() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(format!(
                        "isula-builder exited with {status}:\n{}",
                        self.log()
                    ));
                }
            }
            if Instant::now() >= deadline {
                let _ = self.child.as_mut().map(|c| c.kill());
                return Err(format!("isula-builder did not come up:\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sets (`Some`) or removes (`None`) an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.env.push((key.to_string(), v.to_string()));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let pid = rustix::process::Pid::from_raw(c.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("isula-builder did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin("isula-build"));
        c.args(args)
            .env(
                "ISULABUILD_HOST",
                format!("unix://{}", self.socket().display()),
            )
            .env("ISULABUILD_KEY_FILE", self.etc().join("isula-build.pub"));
        c
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run isula-build")
    }

    /// Runs the CLI and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "isula-build {args:?} failed: {}\n{}\ndaemon log:\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    }

    /// Runs the CLI and requires failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            !o.status.success(),
            "isula-build {args:?} should have failed: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).to_string()
    }

    /// Loads a busybox image as `name` from a fixed archive: the same image ID on every
    /// daemon (an import would stamp its own creation time).
    pub fn load_fixed_busybox(&self, name: &str) {
        let archive = self.dir.path().join("fixed-busybox.tar");
        std::fs::write(&archive, docker_archive(&[busybox_rootfs(&[])], name)).expect("archive");
        self.ok(&["ctr-img", "load", "-i", archive.to_str().expect("path")]);
        let _ = std::fs::remove_file(&archive);
    }

    /// Imports a busybox rootfs (plus `extra` files) as `name`; returns the image ID.
    pub fn import_busybox(&self, name: &str, extra: &[(&str, &[u8])]) -> String {
        let tar = self.dir.path().join("busybox-import.tar");
        std::fs::write(&tar, busybox_rootfs(extra)).expect("write rootfs");
        let out = self.ok(&["ctr-img", "import", tar.to_str().expect("path"), name]);
        let _ = std::fs::remove_file(&tar);
        import_id(&out)
    }

    /// Every entry of every layer of `image` as saved to a docker-archive, bottom layer
    /// first, with the archive's bytes.
    pub fn layer_entries(&self, image: &str) -> (Vec<LayerEntry>, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tmp");
        let archive = dir.path().join("image.tar");
        self.ok(&[
            "ctr-img",
            "save",
            image,
            "-o",
            archive.to_str().expect("utf8"),
        ]);
        let bytes = std::fs::read(&archive).expect("archive");
        let mut out = Vec::new();
        let mut a = tar::Archive::new(&bytes[..]);
        for e in a.entries().expect("entries") {
            let mut e = e.expect("entry");
            if !e.path().expect("path").to_string_lossy().ends_with(".tar") {
                continue;
            }
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).expect("read layer");
            for f in tar::Archive::new(&data[..]).entries().expect("layer") {
                let mut f = f.expect("file");
                let h = f.header().clone();
                let mut content = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut content).expect("read file");
                out.push(LayerEntry {
                    path: f
                        .path()
                        .expect("path")
                        .to_string_lossy()
                        .trim_start_matches("./")
                        .trim_end_matches('/')
                        .to_string(),
                    mode: h.mode().expect("mode"),
                    uid: h.uid().expect("uid"),
                    gid: h.gid().expect("gid"),
                    mtime: h.mtime().expect("mtime"),
                    content,
                });
            }
        }
        (out, bytes)
    }

    /// The last version of each path in `image`'s layers (see [`Daemon::layer_entries`]).
    pub fn image_files(&self, image: &str) -> BTreeMap<String, LayerEntry> {
        self.layer_entries(image)
            .0
            .into_iter()
            .map(|e| (e.path.clone(), e))
            .collect()
    }

    /// The text of `name` in `image`'s layers, trimmed (None: no such file).
    pub fn image_text(&self, image: &str, name: &str) -> Option<String> {
        self.image_files(image)
            .get(name)
            .map(|e| String::from_utf8_lossy(&e.content).trim().to_string())
    }

    /// Asserts that no build left its private directory under the run root.
    pub fn assert_no_build_work(&self, what: &str) {
        let left: Vec<_> = std::fs::read_dir(self.run_root().join("builds"))
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{what}: build work left: {left:?}");
    }

    /// The rows of `ctr-img images` as (repository, tag, id).
    pub fn images(&self) -> Vec<(String, String, String)> {
        self.ok(&["ctr-img", "images"])
            .lines()
            .filter(|l| !l.starts_with('-') && !l.starts_with("REPOSITORY"))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0].to_string(), f[1].to_string(), f[2].to_string())
            })
            .collect()
    }

    /// Waits until the daemon's background work is done: the directory of every packed
    /// layer and the tar digest of every layer directory no blob holds (so that snapshots
    /// are not taken half-way through), and nothing left behind by it.
    pub fn wait_idle(&self) {
        let data = self.data();
        let done = || {
            let text = match std::fs::read_to_string(data.join("metadata.json")) {
                Ok(t) => t,
                // A store that recorded nothing yet has nothing to do, unless layers are
                // there (then the record is missing, which is no idle store).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return std::fs::read_dir(data.join("layers"))
                        .map_or(true, |mut d| d.next().is_none())
                }
                Err(_) => return false,
            };
            let Ok(meta) = serde_json::from_str::<serde_json::Value>(&text) else {
                return false;
            };
            let empty = serde_json::Map::new();
            let compressed = meta["compressed"].as_object().unwrap_or(&empty);
            let images = meta["images"].as_object().unwrap_or(&empty);
            // Packed (loaded or pulled) layers are unpacked in idle time.
            let packed = meta["packed"].as_object().is_some_and(|p| !p.is_empty());
            // Layer directories committed without their tar digest get it in idle time,
            // unless a stored blob holds the layer (the check compares with that blob).
            let blob_there = |d: &str| {
                d.strip_prefix("sha256:")
                    .is_some_and(|h| data.join("blobs/sha256").join(h).is_file())
            };
            // The blobs the store counts as holding a layer (`blobs_holding`): its plain
            // tar, that tar's kept forms, its packed blob, and the layer blobs images and
            // cache stage records name beside it.
            let index: serde_json::Value = std::fs::read(data.join("cache/index.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let stages: Vec<&serde_json::Value> = index["records"]
                .as_object()
                .into_iter()
                .flat_map(|r| r.values())
                .map(|r| &r["stage"])
                .collect();
            let beside = |layers: &serde_json::Value, blobs: &serde_json::Value, chain: &str| {
                let layers = layers.as_array().into_iter().flatten();
                layers
                    .zip(blobs.as_array().into_iter().flatten())
                    .filter(|(l, _)| {
                        l.as_str() == Some(chain) || l["chain_id"].as_str() == Some(chain)
                    })
                    .filter_map(|(_, b)| b.as_str().map(str::to_string))
                    .collect::<Vec<_>>()
            };
            let held = |chain: &str| {
                let diff_id = meta["layers"][chain]["diff_id"].as_str().or_else(|| {
                    stages.iter().find_map(|s| {
                        s["layers"].as_array().into_iter().flatten().find_map(|l| {
                            (l["chain_id"].as_str() == Some(chain))
                                .then(|| l["diff_id"].as_str())
                                .flatten()
                        })
                    })
                });
                let mut blobs: Vec<String> = Vec::new();
                if let Some(d) = diff_id {
                    blobs.push(d.to_string());
                    for k in ["compressed", "compressed_zstd", "compressed_zstd_chunked"] {
                        blobs.extend(meta[k][d]["digest"].as_str().map(str::to_string));
                    }
                }
                blobs.extend(meta["packed"][chain].as_str().map(str::to_string));
                for img in images.values() {
                    blobs.extend(beside(&img["layers"], &img["blobs"], chain));
                }
                for st in &stages {
                    blobs.extend(beside(&st["layers"], &st["blobs"], chain));
                }
                blobs.iter().any(|b| blob_there(b))
            };
            let unhashed = meta["dirs"].as_object().is_some_and(|d| {
                d.iter()
                    .any(|(chain, r)| r["unhashed"] == true && !held(chain))
            });
            !packed
                && !unhashed
                && std::fs::read_dir(data.join("ingest")).map_or(true, |mut d| d.next().is_none())
                && {
                    // Every blob on disk is referenced (a finished gzip of a layer whose image
                    // was removed meanwhile is collected right after).
                    let mut live = std::collections::HashSet::new();
                    // Every kept form of a layer blob: gzip, zstd and zstd:chunked.
                    let forms: Vec<&serde_json::Map<String, serde_json::Value>> =
                        ["compressed", "compressed_zstd", "compressed_zstd_chunked"]
                            .iter()
                            .filter_map(|k| meta[*k].as_object())
                            .collect();
                    for img in images.values() {
                        for b in img["blobs"].as_array().into_iter().flatten() {
                            if let Some(d) = b.as_str() {
                                live.insert(d.to_string());
                                for f in &forms {
                                    if let Some(g) = f.get(d).and_then(|c| c["digest"].as_str()) {
                                        live.insert(g.to_string());
                                    }
                                }
                            }
                        }
                        for k in ["manifest", "id"] {
                            if let Some(d) = img[k].as_str() {
                                live.insert(d.to_string());
                            }
                        }
                    }
                    // The build cache's stage records keep their config and layer blobs
                    // (and those blobs' gzip forms) whatever happens to images.
                    let index: serde_json::Value = std::fs::read(data.join("cache/index.json"))
                        .ok()
                        .and_then(|b| serde_json::from_slice(&b).ok())
                        .unwrap_or_default();
                    let records = index["records"].as_object().cloned().unwrap_or_default();
                    for r in records.values() {
                        let stage = &r["stage"];
                        let blobs = stage["blobs"].as_array().into_iter().flatten();
                        for d in blobs.chain([&stage["config"]]).filter_map(|b| b.as_str()) {
                            live.insert(d.to_string());
                            if let Some(g) = compressed.get(d).and_then(|c| c["digest"].as_str()) {
                                live.insert(g.to_string());
                            }
                        }
                    }
                    std::fs::read_dir(data.join("blobs/sha256")).map_or(true, |rd| {
                        rd.flatten().all(|e| {
                            live.contains(&format!("sha256:{}", e.file_name().to_string_lossy()))
                        })
                    })
                }
        };
        // Background work starts after 100 ms without an operation.
        wait_until_explained(
            "the background unpack and hashing of every layer",
            Duration::from_secs(60),
            done,
            || {
                let names = |sub: &str| {
                    std::fs::read_dir(data.join(sub))
                        .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
                        .unwrap_or_default()
                };
                format!(
                    "metadata.json: {}\nblobs: {:?}\ningest: {:?}\ndaemon log:\n{}",
                    std::fs::read_to_string(data.join("metadata.json")).unwrap_or_default(),
                    names("blobs/sha256"),
                    names("ingest"),
                    self.log()
                )
            },
        );
    }

    /// What the store holds on disk, for "nothing changed" checks.
    pub fn store_snapshot(&self) -> Vec<String> {
        self.wait_idle();
        let data = self.data();
        let mut out = Vec::new();
        for sub in ["blobs/sha256", "layers", "ingest", "tmp"] {
            if let Ok(rd) = std::fs::read_dir(data.join(sub)) {
                for e in rd.flatten() {
                    out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
                }
            }
        }
        out.push(std::fs::read_to_string(data.join("metadata.json")).unwrap_or_default());
        out.sort();
        out
    }

    pub fn leftovers(&self) -> Vec<String> {
        // A running daemon may be unpacking in the background (its staged files are no
        // leftover); a stopped one has left whatever it left.
        if self.child.is_some() {
            self.wait_idle();
        }
        let data = self.data();
        let mut out = Vec::new();
        for sub in ["ingest", "tmp"] {
            if let Ok(rd) = std::fs::read_dir(data.join(sub)) {
                out.extend(
                    rd.flatten()
                        .map(|e| format!("{sub}/{}", e.file_name().to_string_lossy())),
                );
            }
        }
        out
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
    }
}

/// A busybox rootfs tarball (uncompressed) from Debian's busybox-static, with every applet
/// linked, plus `extra` files.
pub fn busybox_rootfs(extra: &[(&str, &[u8])]) -> Vec<u8> {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static must be installed (apt-get install busybox-static)");
    busybox_rootfs_with(Path::new(busybox), extra)
}

/// Where the test setup (`scripts/deps.sh test`) put Debian's arm64 `busybox-static`
/// binary (`ISULA_TEST_BUSYBOX_ARM64` may say elsewhere), if it did.
pub fn arm64_busybox() -> Option<PathBuf> {
    let p = std::env::var_os("ISULA_TEST_BUSYBOX_ARM64")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/isula-build-tests/busybox-arm64"));
    if p.exists() {
        return Some(p);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: scripts/deps.sh test downloads it",
        p.display()
    );
    eprintln!(
        "skipping: no arm64 busybox at {} (scripts/deps.sh test makes it)",
        p.display()
    );
    None
}

/// [`busybox_rootfs`] with the `busybox` binary at `busybox` (of any architecture; the
/// applet links are the host busybox's list, so nothing foreign runs here).
pub fn busybox_rootfs_with(busybox: &Path, extra: &[(&str, &[u8])]) -> Vec<u8> {
    let lister = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .unwrap_or(busybox);
    let list = Command::new(lister)
        .arg("--list")
        .output()
        .expect("busybox --list");
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_data(&mut h, name, std::io::empty()).expect("dir");
    };
    for d in ["bin", "etc", "tmp", "root", "proc", "sys", "dev"] {
        dir(&mut b, d);
    }
    let data = std::fs::read(busybox).expect("read busybox");
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    b.append_data(&mut h, "bin/busybox", &data[..])
        .expect("busybox");
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| *a != "busybox")
    {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")
            .expect("applet");
    }
    for (name, content) in extra {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, name, *content).expect("extra");
    }
    b.into_inner().expect("tar")
}

/// One entry of a saved image's layer.
#[derive(Debug, Clone)]
pub struct LayerEntry {
    /// Relative, without `./` or a trailing `/`.
    pub path: String,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub content: Vec<u8>,
}

/// The image ID an import printed (`Import success with image id: ...`).
pub fn import_id(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("Import success with image id: "))
        .unwrap_or_else(|| panic!("no import line in {out}"))
        .trim()
        .trim_matches('"')
        .to_string()
}

/// Whether a build's first FROM pulled its image: the pull's copy lines come between the
/// first step line and the next.
pub fn from_pulled(out: &str) -> bool {
    out.lines()
        .skip_while(|l| !l.starts_with("STEP  1:"))
        .skip(1)
        .take_while(|l| !l.starts_with("STEP "))
        .any(|l| l == "Getting image source signatures")
}

/// The image ID a build printed (`Build success with image id: ID`, or with --iidfile
/// `Write image ID [ID] to file: PATH`).
pub fn build_id(out: &str) -> String {
    out.lines()
        .find_map(|l| {
            l.strip_prefix("Build success with image id: ").or_else(|| {
                l.strip_prefix("Write image ID [")
                    .and_then(|r| r.split_once(']'))
                    .map(|(id, _)| id)
            })
        })
        .unwrap_or_else(|| panic!("no success line in {out}"))
        .trim()
        .to_string()
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Runs a command and requires success; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// A Docker engine that answers: required in CI, otherwise the test skips (saying so).
pub fn require_docker() -> bool {
    if !require_tool("docker") {
        return false;
    }
    let ok = Command::new("docker")
        .arg("info")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "a Docker engine must run in CI"
        );
        eprintln!("skipping: no Docker engine answers (outside CI)");
    }
    ok
}

/// Removes a Docker image when dropped.
pub struct DockerImage(pub String);

impl Drop for DockerImage {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// The containers runc has under `root`.
/// A build that keeps the daemon busy (`RUN sleep 300` on `base`) until [`Busy::end`]:
/// while it runs the store has no quiet spell, so no background unpack starts.
pub struct Busy {
    client: Child,
    runc_root: PathBuf,
    _ctx: tempfile::TempDir,
}

impl Daemon {
    /// Starts a [`Busy`] build on `base` and waits until its RUN runs.
    pub fn busy(&self, base: &str) -> Busy {
        let ctx = tempfile::tempdir().expect("ctx");
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM {base}\nRUN sleep 300\n"),
        )
        .expect("df");
        let client = self
            .cli_command(&[
                "ctr-img",
                "build",
                "--no-cache",
                &ctx.path().to_string_lossy(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("client");
        let runc_root = self.run_root().join("runc");
        wait_until("the busy build's RUN", Duration::from_secs(60), || {
            !runc_containers(&runc_root).is_empty()
        });
        Busy {
            client,
            runc_root,
            _ctx: ctx,
        }
    }
}

impl Busy {
    /// Ends the build (its client goes, the daemon cancels it) and waits for its container
    /// to go.
    pub fn end(mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
        wait_until("the busy build to stop", Duration::from_secs(60), || {
            runc_containers(&self.runc_root).is_empty()
        });
    }
}

pub fn runc_containers(root: &Path) -> Vec<String> {
    Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(["list", "-q"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (up to `timeout`) until `cond` holds; panics with `what` otherwise.
pub fn wait_until(what: &str, timeout: Duration, cond: impl FnMut() -> bool) {
    wait_until_explained(what, timeout, cond, String::new);
}

/// [`wait_until`], whose timeout also says what `state` finds (made only then).
pub fn wait_until_explained(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    state: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            state()
        );
        // Polled: what is waited for (a file another process writes) has no signal.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A busybox rootfs tarball with `mb` megabytes of incompressible data at `data/big.bin`
/// (long enough to interrupt an operation in the middle).
pub fn big_rootfs(mb: usize) -> Vec<u8> {
    busybox_rootfs(&[("data/big.bin", &noise(mb, 0x9e37_79b9_7f4a_7c15))])
}

/// `mb` megabytes of incompressible bytes, different for each `seed` (not 0).
pub fn noise(mb: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut data = vec![0u8; mb << 20];
    for chunk in data.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    data
}

/// A tar of regular files (`name`, content), mode 0644, owned by root.
pub fn files_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, name, *content).expect("file");
    }
    b.into_inner().expect("tar")
}

/// A `docker save` archive of one image named `repo_tag` whose layers are the given
/// (uncompressed) tars, bottom first.
pub fn docker_archive(layers: &[Vec<u8>], repo_tag: &str) -> Vec<u8> {
    docker_archive_for(layers, repo_tag, host_arch())
}

/// [`docker_archive`] of an image for linux on `architecture` (Go's name: arm64).
pub fn docker_archive_for(layers: &[Vec<u8>], repo_tag: &str, architecture: &str) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    let config = serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).expect("config");
    let config_name = format!("{}.json", sha256_hex(&config));
    let layer_names: Vec<String> = layers
        .iter()
        .map(|l| format!("{}/layer.tar", sha256_hex(l)))
        .collect();
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [repo_tag],
        "Layers": layer_names,
    }]);
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data).expect("entry");
    };
    add(&mut b, &config_name, &config);
    for (name, l) in layer_names.iter().zip(layers) {
        add(&mut b, name, l);
    }
    add(
        &mut b,
        "manifest.json",
        &serde_json::to_vec(&manifest).expect("manifest"),
    );
    b.into_inner().expect("tar")
}

/// The OCI name of this machine's architecture.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The instructions (STEP lines) of a build's output that came from the cache.
pub fn cached_steps(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out.lines().collect();
    let mut hits = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some(rest) = l.strip_prefix("STEP ") {
            if lines
                .get(i + 1)
                .is_some_and(|n| n.starts_with("Using cache "))
            {
                let ins = rest.split_once(": ").map(|(_, s)| s).unwrap_or(rest);
                hits.push(ins.to_string());
            }
        }
    }
    hits
}
