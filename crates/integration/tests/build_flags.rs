//! The docker build flags beyond isula-build's, end to end with real runc: `--network`
//! and `RUN --network` (none: a loopback only), `--label`, `--add-host`, and
//! `RUN --security=insecure` with a daemon that allows it.

use isula_integration::*;

fn layer_file(d: &Daemon, image: &str, name: &str) -> Option<String> {
    let dir = tempfile::tempdir().expect("tmp");
    let archive = dir.path().join("a.tar");
    d.ok(&[
        "ctr-img",
        "save",
        image,
        "-o",
        archive.to_str().expect("utf8"),
    ]);
    let mut found = None;
    let mut a = tar::Archive::new(std::fs::File::open(&archive).expect("archive"));
    for e in a.entries().expect("entries") {
        let mut e = e.expect("entry");
        if !e.path().expect("path").to_string_lossy().ends_with(".tar") {
            continue;
        }
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).expect("read");
        for f in tar::Archive::new(&data[..]).entries().expect("layer") {
            let mut f = f.expect("file");
            if f.path()
                .expect("path")
                .to_string_lossy()
                .trim_start_matches("./")
                == name
            {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut f, &mut s).expect("read");
                found = Some(s.trim().to_string());
            }
        }
    }
    found
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
