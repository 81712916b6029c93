//! The docker build flags beyond isula-build's, end to end with real runc: `--network`
//! and `RUN --network` (none: a loopback only), `--label`, `--add-host`, and
//! `RUN --security=insecure` with a daemon that allows it.

use isula_integration::*;

fn layer_file(d: &Daemon, image: &str, name: &str) -> Option<String> {
    d.image_text(image, name)
}

#[test]
fn network_labels_and_hosts() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let ctx = tempfile::tempdir().expect("ctx");
    let c = ctx.path().to_str().expect("utf8");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nLABEL from.file=1 over=file\n\
         RUN ls /sys/class/net | tr '\\n' ' ' > /nets\n\
         RUN --network=host ls /sys/class/net | tr '\\n' ' ' > /host-nets\n\
         RUN --network=none ls /sys/class/net | tr '\\n' ' ' > /none-nets\n\
         RUN grep -E 'db[.]local|cache' /etc/hosts > /hosts || true\n",
    )
    .expect("df");
    let host_devices = std::fs::read_dir("/sys/class/net").expect("net").count();
    assert!(
        host_devices > 1,
        "the test needs a host with a device beside lo"
    );
    d.ok(&["ctr-img", "build", "-t", "n:host", c]);
    assert_ne!(layer_file(&d, "n:host", "nets").as_deref(), Some("lo"));
    assert_eq!(layer_file(&d, "n:host", "none-nets").as_deref(), Some("lo"));
    let out = d.ok(&[
        "ctr-img",
        "build",
        "--network",
        "none",
        "--label",
        "over=flag",
        "--label",
        "empty=",
        "--add-host",
        "db.local:10.1.2.3",
        "--add-host",
        "cache=fd00::7",
        "-t",
        "n:none",
        c,
    ]);
    // The network and the hosts are in the steps' keys: these ran again.
    assert!(
        out.matches("Using cache").count() <= 1,
        "steps of another network came from the cache:\n{out}"
    );
    assert_eq!(layer_file(&d, "n:none", "nets").as_deref(), Some("lo"));
    assert_ne!(layer_file(&d, "n:none", "host-nets").as_deref(), Some("lo"));
    assert_eq!(
        layer_file(&d, "n:none", "hosts").as_deref(),
        Some("10.1.2.3\tdb.local\nfd00::7\tcache")
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["ctr-img", "inspect", "n:none"])).expect("json");
    let labels = &inspect[0]["Config"]["config"]["Labels"];
    assert_eq!(labels["from.file"], "1");
    assert_eq!(labels["over"], "flag", "--label wins over LABEL: {labels}");
    assert_eq!(labels["empty"], "");
    // No /etc/hosts of ours is left in the image.
    assert_eq!(layer_file(&d, "n:none", "etc/hosts"), None);
}

#[test]
fn insecure_steps_need_the_daemon_to_allow_them() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start_with(&["--allow-insecure"]);
    d.load_fixed_busybox("busybox:latest");
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\n\
         RUN grep CapEff /proc/self/status | cut -f2 > /default-caps\n\
         RUN --security=insecure grep CapEff /proc/self/status | cut -f2 > /caps && grep Seccomp: /proc/self/status | cut -f2 > /seccomp\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "insecure:1",
        ctx.path().to_str().expect("utf8"),
    ]);
    let caps =
        |f: &str| u64::from_str_radix(&layer_file(&d, "insecure:1", f).expect(f), 16).expect("hex");
    // CAP_SYS_ADMIN (bit 21) only in the insecure step.
    assert_eq!(caps("default-caps") & (1 << 21), 0);
    assert_ne!(caps("caps") & (1 << 21), 0);
    assert!(caps("caps").count_ones() > caps("default-caps").count_ones() + 20);
    assert_eq!(
        layer_file(&d, "insecure:1", "seccomp").as_deref(),
        Some("0")
    );
}

#[test]
fn per_build_limits_reach_every_run_step() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let ctx = tempfile::tempdir().expect("ctx");
    // cgroups v1 (this machine) or v2 (the unified hierarchy): each read where it is.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\n\
         RUN (cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max) > /memory\n\
         RUN (cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max) > /pids\n\
         RUN (cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max) > /quota\n\
         RUN (cat /sys/fs/cgroup/cpu/cpu.shares 2>/dev/null || cat /sys/fs/cgroup/cpu.weight) > /shares\n\
         RUN (cat /sys/fs/cgroup/cpuset/cpuset.cpus 2>/dev/null || cat /sys/fs/cgroup/cpuset.cpus) > /cpus\n\
         RUN ulimit -n > /nofile && ulimit -Hn > /nofile-hard && df -k /dev/shm | tail -n 1 | awk '{print $2}' > /shm\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "--memory",
        "64m",
        "--pids-limit",
        "77",
        "--cpu-quota",
        "50000",
        "--cpu-shares",
        "512",
        "--cpuset-cpus",
        "0",
        "--ulimit",
        "nofile=1000:2000",
        "--shm-size",
        "8m",
        "-t",
        "limits:1",
        ctx.path().to_str().expect("utf8"),
    ]);
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory").exists();
    let f = |name: &str| layer_file(&d, "limits:1", name).unwrap_or_default();
    assert_eq!(f("memory"), (64u64 << 20).to_string());
    assert_eq!(f("pids"), "77");
    assert_eq!(f("quota"), "50000");
    // v2 maps shares to a weight (runc: 1 + (shares-2)*9999/262142).
    assert_eq!(
        f("shares"),
        if v1 {
            "512".to_string()
        } else {
            "20".to_string()
        }
    );
    assert_eq!(f("cpus"), "0");
    assert_eq!(
        (f("nofile").as_str(), f("nofile-hard").as_str()),
        ("1000", "2000")
    );
    assert_eq!(f("shm"), "8192");
    // Bad limits are refused naming the flag, before anything runs.
    for (flag, value, want) in [
        ("--memory", "1m", "minimum is 6MB"),
        ("--cpu-quota", "10", "minimum is 1000"),
        ("--cpuset-cpus", "zero", "--cpuset-cpus"),
        ("--ulimit", "files=1", "unknown limit"),
        ("--ulimit", "nofile=10:5", "over the hard limit"),
        ("--memory", "lots", "invalid size"),
    ] {
        let err = d.fails(&[
            "ctr-img",
            "build",
            flag,
            value,
            ctx.path().to_str().expect("utf8"),
        ]);
        assert!(err.contains(want), "{flag} {value}: {err}");
    }
}

#[test]
fn source_date_epoch_is_the_build_time() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let ctx = tempfile::tempdir().expect("ctx");
    std::fs::write(ctx.path().join("f"), "f").expect("write");
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox\nCOPY f /f\nRUN touch /new\n",
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let id = |out: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix("Build success with image id: "))
            .map(str::to_string)
            .unwrap_or_else(|| panic!("no id in {out}"))
    };
    let epoch = d.ok(&[
        "ctr-img",
        "build",
        "--no-cache",
        "--build-arg",
        "SOURCE_DATE_EPOCH=1600000000",
        c,
    ]);
    let stat = d.ok(&[
        "ctr-img",
        "build",
        "--no-cache",
        "--build-static",
        "build-time=2020-09-13 12:26:40",
        c,
    ]);
    assert_eq!(
        id(&epoch),
        id(&stat),
        "SOURCE_DATE_EPOCH gives the --build-static image"
    );
    assert!(!epoch.contains("were not consumed"), "{epoch}");
    let err = d.fails(&[
        "ctr-img",
        "build",
        "--build-arg",
        "SOURCE_DATE_EPOCH=yesterday",
        c,
    ]);
    assert!(err.contains("SOURCE_DATE_EPOCH"), "{err}");
}

#[test]
fn named_build_contexts() {
    if !require_root() || !require_tool("runc") {
        return;
    }
    let d = Daemon::start();
    d.load_fixed_busybox("busybox:latest");
    let base = tempfile::tempdir().expect("base");
    std::fs::write(
        base.path().join("Dockerfile"),
        "FROM busybox\nLABEL from=ctxbase\n",
    )
    .expect("df");
    d.ok(&[
        "ctr-img",
        "build",
        "-t",
        "ctxbase:1",
        base.path().to_str().expect("utf8"),
    ]);
    let extra = tempfile::tempdir().expect("extra");
    std::fs::write(extra.path().join("lib.txt"), "lib-v1").expect("write");
    let ctx = tempfile::tempdir().expect("ctx");
    // The stage named `extra` is overridden by the context of that name: never built.
    std::fs::write(
        ctx.path().join("Dockerfile"),
        "FROM busybox AS extra\nRUN false\n\
         FROM base\nCOPY --from=extra lib.txt /lib.txt\n\
         RUN --mount=from=extra,target=/m cat /m/lib.txt > /mounted\n",
    )
    .expect("df");
    let c = ctx.path().to_str().expect("utf8");
    let extra_flag = format!("extra={}", extra.path().display());
    let build = |tag: &str| {
        d.ok(&[
            "ctr-img",
            "build",
            "--build-context",
            "base=docker-image://ctxbase:1",
            "--build-context",
            &extra_flag,
            "-t",
            tag,
            c,
        ])
    };
    build("named:1");
    assert_eq!(
        layer_file(&d, "named:1", "lib.txt").as_deref(),
        Some("lib-v1")
    );
    assert_eq!(
        layer_file(&d, "named:1", "mounted").as_deref(),
        Some("lib-v1")
    );
    let inspect: serde_json::Value =
        serde_json::from_str(&d.ok(&["ctr-img", "inspect", "named:1"])).expect("json");
    assert_eq!(inspect[0]["Config"]["config"]["Labels"]["from"], "ctxbase");
    // The directory's content keys the steps that read it.
    let out = build("named:2");
    assert_eq!(out.matches("Using cache").count(), 2, "{out}");
    std::fs::write(extra.path().join("lib.txt"), "lib-v2").expect("write");
    let out = build("named:3");
    assert_eq!(out.matches("Using cache").count(), 0, "{out}");
    assert_eq!(
        layer_file(&d, "named:3", "mounted").as_deref(),
        Some("lib-v2")
    );
    // Bad ones name the flag.
    let missing = extra.path().join("missing");
    for (flag, want) in [
        (
            format!("x={}", missing.display()),
            "not a directory".to_string(),
        ),
        (
            "x=https://example.com/ctx.tar".to_string(),
            "only a directory".to_string(),
        ),
        (
            "x=docker-image://UPPER/Case".to_string(),
            "--build-context x".to_string(),
        ),
        ("=dir".to_string(), "not a valid name".to_string()),
    ] {
        let err = d.fails(&["ctr-img", "build", "--build-context", &flag, c]);
        assert!(err.contains(&want), "{flag}: {err}");
    }
    std::fs::write(ctx.path().join("Dockerfile"), "FROM extra\n").expect("df");
    let err = d.fails(&["ctr-img", "build", "--build-context", &extra_flag, c]);
    assert!(
        err.contains("FROM takes an image") && err.contains("line 1"),
        "{err}"
    );
}
