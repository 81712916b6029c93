//! The packages of `scripts/package.sh`: the `.deb` installed on this machine (the group
//! made, the unit's ExecStart line started by hand on a socket and roots of the test's own,
//! an image built through it), the configuration kept across a reinstall while a packaged
//! non-configuration file is replaced, removal leaving only the conffiles and purge leaving
//! nothing; the `.rpm`'s file list, configuration flags and scripts read with `rpm -qp`.
//! The machine is restored whatever happens: the package purged, the daemon stopped, the
//! group removed when the test made it.

use isula_integration::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

const CONFFILES: [&str; 4] = [
    "/etc/isula-build/configuration.toml",
    "/etc/isula-build/policy.json",
    "/etc/isula-build/registries.toml",
    "/etc/isula-build/storage.toml",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sh(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().expect("run");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", "isula-build"])
        .output()
        .is_ok_and(|o| o.status.success() && !o.stdout.is_empty() && o.stdout != b"not-installed")
}

fn group_exists() -> bool {
    Command::new("getent")
        .args(["group", "isula"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Puts the machine back: the daemon stopped, the package purged, the group gone if the
/// test made it.
struct Restore {
    daemon: Option<Child>,
    group_before: bool,
    key_before: Option<Vec<u8>>,
}

const PUBLIC_KEY: &str = "/etc/isula-build/isula-build.pub";

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(mut c) = self.daemon.take() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&c),
                rustix::process::Signal::TERM,
            );
            let _ = c.wait();
        }
        if installed() {
            let _ = Command::new("dpkg")
                .args(["--purge", "isula-build"])
                .status();
        }
        if !self.group_before && group_exists() {
            let _ = Command::new("groupdel").arg("isula").status();
        }
        if let Some(key) = &self.key_before {
            let _ = std::fs::create_dir_all("/etc/isula-build");
            let _ = std::fs::write(PUBLIC_KEY, key);
        }
    }
}

fn make_packages(out: &Path) -> (PathBuf, PathBuf) {
    let bin_dir = bin("isula-builder");
    let bin_dir = bin_dir.parent().expect("bin dir");
    let (ok, text) = sh(Command::new(repo().join("scripts/package.sh"))
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(out)
        .arg("--fast"));
    assert!(ok, "package.sh: {text}");
    let find = |suffix: &str| {
        text.lines()
            .map(PathBuf::from)
            .find(|p| p.to_string_lossy().ends_with(suffix) && p.exists())
            .unwrap_or_else(|| panic!("no {suffix} in package.sh's output: {text}"))
    };
    (find(".deb"), find(".rpm"))
}

/// The unit's ExecStart= words.
fn exec_start(unit: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(unit).expect("unit");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart= in the unit");
    line.split_whitespace().map(str::to_string).collect()
}

#[test]
fn deb_installs_runs_builds_and_removes_cleanly_rpm_lists_its_files() {
    if !require_root() {
        return;
    }
    for tool in ["dpkg", "dpkg-deb", "rpm", "rpmbuild", "runc"] {
        assert!(
            require_tool(tool),
            "{tool} is needed (scripts/deps.sh test)"
        );
    }
    // Never over a package or binaries someone installed on this machine.
    assert!(
        !installed(),
        "isula-build is installed here: the test would replace it"
    );
    assert!(
        !Path::new("/usr/bin/isula-builder").exists(),
        "an isula-build is installed here (/usr/bin/isula-builder)"
    );
    // Another test's daemon on the default configuration directory may have published its
    // key there: it is put back afterwards; any other file there means an installation.
    let key_before = std::fs::read(PUBLIC_KEY).ok();
    if let Ok(dir) = std::fs::read_dir("/etc/isula-build") {
        let names: Vec<String> = dir
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| n == "isula-build.pub"),
            "an isula-build configuration is installed here: {names:?}"
        );
    }
    let mut restore = Restore {
        daemon: None,
        group_before: group_exists(),
        key_before,
    };
    let work = tempfile::tempdir().expect("tempdir");
    let (deb, rpm) = make_packages(work.path());

    // Install: files in place, the group made, the conffiles registered.
    let (ok, text) = sh(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i: {text}");
    assert!(group_exists(), "postinst made no isula group");
    for f in [
        "/usr/bin/isula-builder",
        "/usr/bin/isula-build",
        "/usr/lib/systemd/system/isula-build.service",
        "/usr/share/bash-completion/completions/isula-build",
        "/usr/share/zsh/vendor-completions/_isula-build",
        "/usr/share/fish/vendor_completions.d/isula-build.fish",
    ]
    .iter()
    .chain(CONFFILES.iter())
    {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let completion = std::fs::read_to_string("/usr/share/bash-completion/completions/isula-build")
        .expect("completion");
    assert!(completion.contains("ctr-img"), "{completion}");
    let (_, conffiles) =
        sh(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "isula-build"]));
    for f in CONFFILES {
        assert!(conffiles.contains(f), "{f} not a conffile: {conffiles}");
    }

    // A reinstall keeps a changed configuration file and replaces a changed packaged file
    // that is not configuration (the positive control).
    let config = "/etc/isula-build/configuration.toml";
    let mut changed = std::fs::read_to_string(config).expect("config");
    changed.push_str("\n# kept by the test\n");
    std::fs::write(config, &changed).expect("change config");
    std::fs::write(
        "/usr/share/fish/vendor_completions.d/isula-build.fish",
        "# changed\n",
    )
    .expect("change completion");
    let (ok, text) = sh(Command::new("dpkg")
        .args(["-i", "--force-confold"])
        .arg(&deb));
    assert!(ok, "dpkg -i again: {text}");
    assert_eq!(std::fs::read_to_string(config).expect("config"), changed);
    assert_ne!(
        std::fs::read_to_string("/usr/share/fish/vendor_completions.d/isula-build.fish")
            .expect("completion"),
        "# changed\n"
    );

    // The unit's command line, by hand (no systemd here), on a socket and roots of its own
    // with the installed configuration.
    let words = exec_start(Path::new("/usr/lib/systemd/system/isula-build.service"));
    assert_eq!(words[0], "/usr/bin/isula-builder", "{words:?}");
    let root = work.path().join("roots");
    let socket = root.join("isula_build.sock");
    let log = std::fs::File::create(work.path().join("daemon.log")).expect("log");
    let child = Command::new(&words[0])
        .args(&words[1..])
        .arg("--host")
        .arg(format!("unix://{}", socket.display()))
        .arg("--dataroot")
        .arg(root.join("data"))
        .arg("--runroot")
        .arg(root.join("run"))
        .env_remove("ISULABUILD_HOST")
        .env_remove("NOTIFY_SOCKET")
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("isula-builder");
    restore.daemon = Some(child);
    let client = |args: &[&str]| {
        let mut c = Command::new("/usr/bin/isula-build");
        c.arg("--host")
            .arg(format!("unix://{}", socket.display()))
            .args(args)
            .env_remove("ISULA_BUILD_HOST")
            .env_remove("ISULABUILD_HOST");
        sh(&mut c)
    };
    wait_until_explained(
        "the packaged daemon answers",
        Duration::from_secs(30),
        || client(&["version"]).0,
        || std::fs::read_to_string(work.path().join("daemon.log")).unwrap_or_default(),
    );
    // The socket is the group's, as the package made it.
    let meta = std::fs::metadata(&socket).expect("socket");
    let (_, gid) = sh(Command::new("getent").args(["group", "isula"]));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        gid.split(':').nth(2).map(str::to_string),
        Some(meta.gid().to_string())
    );
    let tarball = work.path().join("busybox.tar");
    std::fs::write(&tarball, busybox_rootfs(&[])).expect("tarball");
    let (ok, text) = client(&[
        "ctr-img",
        "import",
        tarball.to_str().expect("utf8"),
        "busybox:latest",
    ]);
    assert!(ok, "import: {text}");
    let ctx = work.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo packaged > /made\n",
    )
    .expect("Dockerfile");
    let (ok, text) = client(&[
        "ctr-img",
        "build",
        "-t",
        "packaged:1",
        ctx.to_str().expect("utf8"),
    ]);
    assert!(ok, "build: {text}");
    let (ok, text) = client(&["ctr-img", "images"]);
    assert!(ok && text.contains("packaged"), "images: {text}");
    assert!(Path::new(PUBLIC_KEY).exists());
    if let Some(mut c) = restore.daemon.take() {
        rustix::process::kill_process(
            rustix::process::Pid::from_child(&c),
            rustix::process::Signal::TERM,
        )
        .expect("stop the daemon");
        assert!(
            c.wait().expect("wait").success(),
            "the daemon did not stop cleanly"
        );
    }

    // Remove: only the conffiles stay; purge: nothing.
    let (_, listed) = sh(Command::new("dpkg").args(["-L", "isula-build"]));
    let files: Vec<String> = listed
        .lines()
        .filter(|l| Path::new(l).is_file())
        .map(str::to_string)
        .collect();
    assert!(files.len() >= 11, "{listed}");
    let (ok, text) = sh(Command::new("dpkg").args(["-r", "isula-build"]));
    assert!(ok, "dpkg -r: {text}");
    for f in &files {
        let is_conffile = CONFFILES.contains(&f.as_str());
        assert_eq!(Path::new(f).exists(), is_conffile, "{f} after remove");
    }
    let mut left: Vec<String> = std::fs::read_dir("/etc/isula-build")
        .expect("/etc/isula-build after remove")
        .map(|e| e.expect("entry").path().display().to_string())
        .collect();
    left.sort();
    assert_eq!(left, CONFFILES, "what remove left in /etc/isula-build");
    let (_, status) =
        sh(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Status}", "isula-build"]));
    assert_eq!(status, "config-files");
    let (ok, text) = sh(Command::new("dpkg").args(["--purge", "isula-build"]));
    assert!(ok, "dpkg --purge: {text}");
    for f in &files {
        assert!(!Path::new(f).exists(), "{f} after purge");
    }
    assert!(
        !Path::new("/etc/isula-build").exists(),
        "/etc/isula-build after purge"
    );
    assert!(!installed());

    // The rpm: its files, the configuration as %config(noreplace), its scripts.
    let (ok, list) = sh(Command::new("rpm").arg("-qpl").arg(&rpm));
    assert!(ok, "rpm -qpl: {list}");
    let mut got: Vec<&str> = list.lines().collect();
    got.sort();
    let mut want = vec![
        "/etc/isula-build",
        "/usr/bin/isula-build",
        "/usr/bin/isula-builder",
        "/usr/lib/systemd/system/isula-build.service",
        "/usr/share/bash-completion/completions/isula-build",
        "/usr/share/doc/isula-build/README.md",
        "/usr/share/fish/vendor_completions.d/isula-build.fish",
        "/usr/share/zsh/site-functions/_isula-build",
    ];
    want.extend(CONFFILES);
    want.sort();
    assert_eq!(got, want);
    let (ok, flags) = sh(Command::new("rpm")
        .args([
            "-qp",
            "--qf",
            "[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEMODES:perms}\\n]",
        ])
        .arg(&rpm));
    assert!(ok, "{flags}");
    for line in flags.lines() {
        let name = line.split(' ').next().unwrap_or_default();
        if CONFFILES.contains(&name) {
            assert!(line.contains(" cn "), "not %config(noreplace): {line}");
            assert!(line.ends_with("-rw-------"), "{line}");
        } else {
            assert!(!line.contains(" cn "), "configuration? {line}");
        }
    }
    let (ok, scripts) = sh(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    assert!(ok, "{scripts}");
    let pre = scripts
        .split("postinstall scriptlet")
        .next()
        .unwrap_or_default();
    assert!(
        pre.contains("preinstall scriptlet") && pre.contains("groupadd --system isula"),
        "{scripts}"
    );
    assert!(scripts.contains("systemctl daemon-reload"), "{scripts}");
    assert!(
        scripts.contains("systemctl stop isula-build.service"),
        "{scripts}"
    );
    let (_, requires) = sh(Command::new("rpm").args(["-qpR"]).arg(&rpm));
    assert!(requires.contains("runc"), "{requires}");
}
