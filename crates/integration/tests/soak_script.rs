//! `scripts/soak.sh` counts every operation and fails on a refused one: a small soak (3 builds
//! in a row, 2 clients for 5 s) on the built binaries passes against a healthy daemon,
//! printing each kind's successes and the peaks of a 1 GiB load, the daemon's unpack of it
//! and its push, which gzips it (the positive control), and fails, naming the kind, once the daemon refuses
//! requests (without the big load). The refusal is real: the daemon's OCI runtime (the
//! soak's `RUNTIME`) is runc behind a wrapper that refuses `run` once a flag file exists,
//! which the test creates when the soak reaches the phase under test; from then on every
//! build that runs its RUN fails inside the daemon.

use isula_integration::*;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The soak counts RUN cgroups machine-wide, so two soaks at once would see each other's.
static ONE_SOAK_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A soak that runs longer than this is killed (its trap stops its daemon).
const SOAK_TIMEOUT: Duration = Duration::from_secs(180);

/// What the refusing runtime says, so the soak's report can be traced to it.
const REFUSAL: &str = "soak test: the runtime refuses to run containers";

/// The kinds of the mixed phase, as the soak's table names them.
const KINDS: [&str; 8] = [
    "build", "images", "tag", "rm", "save", "load", "inspect", "info",
];

/// runc behind a wrapper that refuses `run` once [`Refuser::arm`] has made its flag file.
struct Refuser {
    dir: tempfile::TempDir,
}

impl Refuser {
    fn new() -> Refuser {
        let runc = run_ok(Command::new("sh").args(["-c", "command -v runc"]));
        let dir = tempfile::Builder::new()
            .prefix("isula-soak-runtime-")
            .tempdir()
            .expect("tempdir");
        let flag = dir.path().join("refuse");
        let script = format!(
            "#!/bin/sh\n\
             # runc, except that `run` is refused while {flag} exists.\n\
             for a in \"$@\"; do\n\
             \x20   if [ \"$a\" = run ] && [ -e '{flag}' ]; then echo '{REFUSAL}' >&2; exit 1; fi\n\
             done\n\
             exec '{runc}' \"$@\"\n",
            flag = flag.display(),
            runc = runc.trim(),
        );
        let path = dir.path().join("runtime");
        std::fs::write(&path, script).expect("write the runtime");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Refuser { dir }
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("runtime")
    }

    fn arm(&self) {
        std::fs::write(self.dir.path().join("refuse"), b"").expect("arm the refusal");
    }
}

struct SoakRun {
    success: bool,
    /// stdout, then stderr.
    output: String,
}

/// Runs the small soak with a big load of `load_gib` GiB; with `refuser`, its runtime is the
/// daemon's, armed as soon as the soak prints a line starting with `arm_at`.
fn soak(load_gib: u32, refuser: Option<(&Refuser, &str)>) -> SoakRun {
    let _one = ONE_SOAK_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // The soak takes a directory; bin() also checks that both binaries (and, for the big
    // load, sparse-archive) are built.
    let builder = bin("isula-builder");
    bin("isula-build");
    if load_gib > 0 {
        bin("sparse-archive");
    }
    let bin_dir = builder.parent().expect("bin dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/soak.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .env("BIN", bin_dir)
        .env("BUILDS", "3")
        .env("CLIENTS", "2")
        .env("DURATION", "5")
        .env("LOAD_GIB", load_gib.to_string())
        .env_remove("SHORT")
        .env_remove("KEEP")
        .env_remove("MIN_OK")
        .env_remove("PEAK_MB")
        .env_remove("RUNTIME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some((r, _)) = refuser {
        cmd.env("RUNTIME", r.runtime());
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("run scripts/soak.sh");
    let pid = rustix::process::Pid::from_raw(child.id() as i32).expect("pid");
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if started.elapsed() > SOAK_TIMEOUT {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })
    };
    let mut stderr = child.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut output = String::new();
    for line in BufReader::new(child.stdout.take().expect("stdout")).lines() {
        let line = line.expect("soak output");
        eprintln!("soak: {line}");
        if let Some((r, arm_at)) = refuser {
            if line.starts_with(arm_at) {
                r.arm();
            }
        }
        output.push_str(&line);
        output.push('\n');
    }
    let status = child.wait().expect("wait for the soak");
    done.store(true, Ordering::SeqCst);
    let timed_out = watchdog.join().expect("watchdog");
    let errors = errors.join().expect("stderr reader");
    eprint!("{errors}");
    assert!(
        !timed_out,
        "the soak ran over {SOAK_TIMEOUT:?} and was stopped:\n{output}{errors}"
    );
    eprintln!("soak: {status} after {:?}", started.elapsed());
    SoakRun {
        success: status.success(),
        output: output + &errors,
    }
}

/// The mixed phase's table: kind -> (ok, expected, failed).
fn table(output: &str) -> Vec<(String, u64, u64, u64)> {
    let row = regex::Regex::new(r"^(\w+) +(\d+) +(\d+) +(\d+)(  .*)?$").expect("regex");
    output
        .lines()
        .filter_map(|l| row.captures(l))
        .filter(|c| KINDS.contains(&&c[1]))
        .map(|c| {
            let n = |i: usize| c[i].parse::<u64>().expect("count");
            (c[1].to_string(), n(2), n(3), n(4))
        })
        .collect()
}

/// The kinds the soak's FAIL lines blame.
fn failed_kinds(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("FAIL: "))
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_string()))
        .filter(|k| KINDS.contains(&k.as_str()))
        .collect()
}

#[test]
fn healthy_daemon_passes_the_soak_with_every_kind_counted() {
    if !require_root()
        || !require_tool("runc")
        || !require_tool("busybox")
        || !require_tool("docker-registry")
    {
        return;
    }
    let run = soak(1, None);
    assert!(
        run.success,
        "the soak failed on a healthy daemon:\n{}",
        run.output
    );
    assert!(
        run.output
            .contains("soak: every operation succeeded, no growth, store sound"),
        "{}",
        run.output
    );
    let rows = table(&run.output);
    let kinds: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(kinds, KINDS, "the table's kinds:\n{}", run.output);
    for (kind, ok, _, failed) in &rows {
        assert!(*ok >= 1, "{kind}: no success counted:\n{}", run.output);
        assert_eq!(*failed, 0, "{kind}: failures counted:\n{}", run.output);
    }
    // The big load waited for the daemon's work on it, each phase timed with its peak.
    for phase in ["load", "unpack", "push", "settle"] {
        let line = regex::Regex::new(&format!(
            r"(?m)^  {phase} +\d+\.\d s, daemon peak RSS \d+ MB$"
        ))
        .expect("regex");
        assert!(
            line.is_match(&run.output),
            "no {phase} phase:\n{}",
            run.output
        );
    }
    assert!(
        run.output.contains("load + unpack + push of 1 GiB in "),
        "{}",
        run.output
    );
}

#[test]
fn refusing_daemon_fails_the_mixed_phase_naming_build() {
    if !require_root() || !require_tool("runc") || !require_tool("busybox") {
        return;
    }
    let refuser = Refuser::new();
    // Armed once the builds in a row are through: only the mixed phase meets the refusal.
    let run = soak(0, Some((&refuser, "3 builds in ")));
    assert!(
        !run.success,
        "the soak passed although every RUN was refused:\n{}",
        run.output
    );
    assert!(
        run.output.lines().any(|l| l.starts_with("3 builds in ")),
        "the builds in a row should have passed:\n{}",
        run.output
    );
    let fail = run
        .output
        .lines()
        .find(|l| l.starts_with("FAIL: build: "))
        .unwrap_or_else(|| panic!("no FAIL line names build:\n{}", run.output));
    assert!(fail.contains("in the mixed phase"), "{fail}");
    assert!(
        fail.contains(REFUSAL),
        "the first error is not the refusal: {fail}"
    );
    assert_eq!(failed_kinds(&run.output), ["build"], "{}", run.output);
    let rows = table(&run.output);
    let build = rows
        .iter()
        .find(|r| r.0 == "build")
        .unwrap_or_else(|| panic!("no build row:\n{}", run.output));
    assert!(build.3 >= 1, "no build failure counted:\n{}", run.output);
    // The other kinds went on working and were counted.
    for (kind, ok, _, failed) in rows.iter().filter(|r| r.0 != "build") {
        assert!(*ok >= 1 && *failed == 0, "{kind}:\n{}", run.output);
    }
}

#[test]
fn refusing_daemon_stops_the_builds_in_a_row() {
    if !require_root() || !require_tool("runc") || !require_tool("busybox") {
        return;
    }
    let refuser = Refuser::new();
    // Armed after the warm-up build: the first --no-cache build in a row (the second) fails.
    let run = soak(0, Some((&refuser, "baseline: ")));
    assert!(
        !run.success,
        "the soak passed although every RUN was refused:\n{}",
        run.output
    );
    let fail = run
        .output
        .lines()
        .find(|l| l.starts_with("FAIL: build: build "))
        .unwrap_or_else(|| panic!("no FAIL line names a build in a row:\n{}", run.output));
    assert!(fail.contains(" of 3 in a row: "), "{fail}");
    assert!(
        fail.contains(REFUSAL),
        "the error is not the refusal: {fail}"
    );
    // It stopped there: no mixed phase.
    assert!(!run.output.contains("mixed: "), "{}", run.output);
}
