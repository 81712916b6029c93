//! RUN through the real runc on a real overlay (root only; CI fails rather than skips).

use isula_runtime::{Process, Runc, RuntimeError};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn ready() -> bool {
    let ok = rustix::process::geteuid().is_root() && Path::new("/bin/busybox").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "runc tests need root and busybox-static in CI"
        );
        eprintln!("skipping: needs root and /bin/busybox (outside CI)");
    }
    ok
}

fn busybox_rootfs(dir: &Path) {
    std::fs::create_dir_all(dir.join("bin")).expect("bin");
    std::fs::create_dir_all(dir.join("etc")).expect("etc");
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox");
    for a in ["sh", "echo", "cat", "sleep", "id", "ls"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).expect("link");
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    runc: Runc,
    bundle: std::path::PathBuf,
    upper: std::path::PathBuf,
    merged: std::path::PathBuf,
    _mount: isula_sys::mount::MountGuard,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("tmp");
    let p = dir.path();
    busybox_rootfs(&p.join("lower"));
    for d in ["upper", "work", "merged", "bundle", "state"] {
        std::fs::create_dir(p.join(d)).expect("mkdir");
    }
    let mount = isula_sys::mount::mount_overlay(
        &[p.join("lower")],
        &p.join("upper"),
        &p.join("work"),
        &p.join("merged"),
        &[],
    )
    .expect("overlay");
    Setup {
        runc: Runc::new("runc", &p.join("state")).expect("runc"),
        bundle: p.join("bundle"),
        upper: p.join("upper"),
        merged: p.join("merged"),
        _mount: mount,
        _dir: dir,
    }
}

fn process(script: &str) -> Process {
    Process {
        args: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into()],
        cwd: "/".into(),
        ..Default::default()
    }
}

#[test]
fn runs_and_streams_output_and_exit_code() {
    if !ready() {
        return;
    }
    let s = setup();
    let mut out = Vec::new();
    let cancel = Arc::new(AtomicBool::new(false));
    let code = s
        .runc
        .run(
            &s.bundle,
            &s.merged,
            &process("echo hello; echo oops >&2; echo data > /file; id -u; exit 3"),
            &cancel,
            &mut |b| out.extend_from_slice(b),
        )
        .expect("run");
    assert_eq!(code, 3, "{}", String::from_utf8_lossy(&out));
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("hello\n") && text.contains("oops\n") && text.contains("0\n"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(s.upper.join("file")).expect("in upper"),
        b"data\n"
    );
    // The host's resolv.conf is visible inside but not written into the layer.
    let mut out = Vec::new();
    let code = s
        .runc
        .run(
            &s.bundle,
            &s.merged,
            &process("cat /etc/resolv.conf >/dev/null && echo ok"),
            &cancel,
            &mut |b| out.extend_from_slice(b),
        )
        .expect("run");
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (0, "ok"));
}

#[test]
fn cancel_kills_the_container_and_cleans_state() {
    if !ready() {
        return;
    }
    let s = setup();
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c2.store(true, Ordering::SeqCst);
    });
    let start = Instant::now();
    let r = s.runc.run(
        &s.bundle,
        &s.merged,
        &process("sleep 60"),
        &cancel,
        &mut |_| {},
    );
    t.join().expect("thread");
    assert!(matches!(r, Err(RuntimeError::Cancelled)), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let list = std::process::Command::new(&s.runc.binary)
        .arg("--root")
        .arg(&s.runc.state_root)
        .args(["list", "-q"])
        .output()
        .expect("runc list");
    assert!(
        String::from_utf8_lossy(&list.stdout).trim().is_empty(),
        "container left behind"
    );
}

#[test]
fn a_cancel_before_the_container_exists_still_stops_it() {
    if !ready() {
        return;
    }
    let s = setup();
    let cancel = Arc::new(AtomicBool::new(true));
    let start = Instant::now();
    let r = s.runc.run(
        &s.bundle,
        &s.merged,
        &process("sleep 60"),
        &cancel,
        &mut |_| {},
    );
    assert!(matches!(r, Err(RuntimeError::Cancelled)), "{r:?}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
}

#[test]
fn a_step_is_confined_like_a_docker_container() {
    if !ready() {
        return;
    }
    let s = setup();
    let cancel = Arc::new(AtomicBool::new(false));
    let mut out = Vec::new();
    // The pids limit (cgroup v1 or v2), a masked path and a read-only one.
    let masked = [
        "/proc/keys",
        "/proc/timer_list",
        "/proc/sched_debug",
        "/proc/kcore",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("a masked /proc file exists on this host");
    let script = format!(
        "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; \
         cat {masked} | wc -c; \
         (echo 1 > /proc/sys/kernel/panic) 2>/dev/null && echo writable || echo read-only"
    );
    let code = s
        .runc
        .run(
            &s.bundle,
            &s.merged,
            &Process {
                args: vec!["/bin/busybox".into(), "sh".into(), "-c".into(), script],
                ..process("")
            },
            &cancel,
            &mut |b| out.extend_from_slice(b),
        )
        .expect("run");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{text}");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        vec![
            isula_runtime::PIDS_LIMIT.to_string().as_str(),
            "0",
            "read-only"
        ],
        "{text}"
    );
}

#[test]
fn seccomp_refuses_new_namespaces_unless_unconfined() {
    if !ready() {
        return;
    }
    let s = setup();
    let cancel = Arc::new(AtomicBool::new(false));
    let run = |unconfined: bool| {
        let mut out = Vec::new();
        let code = s
            .runc
            .run(
                &s.bundle,
                &s.merged,
                &Process {
                    args: vec![
                        "/bin/busybox".into(),
                        "unshare".into(),
                        "-U".into(),
                        "/bin/busybox".into(),
                        "true".into(),
                    ],
                    seccomp_unconfined: unconfined,
                    ..process("")
                },
                &cancel,
                &mut |b| out.extend_from_slice(b),
            )
            .expect("run");
        (code, String::from_utf8_lossy(&out).to_string())
    };
    let (code, out) = run(false);
    assert_ne!(code, 0, "a new user namespace was allowed: {out}");
    assert!(out.contains("Operation not permitted"), "{out}");
    let (code, out) = run(true);
    assert_eq!(code, 0, "unconfined: {out}");
}
