//! `--metrics-addr`: the Prometheus page moves with what the daemon does, and only then.
//! A build counts as finished, its steps as misses, its rebuild as hits (the misses still);
//! a failing build as failed (finished still); a push and a pull count their bytes (each
//! on its own daemon only); a remote
//! build the context bytes it received; the store size and free space are there. Anything
//! but `GET /metrics` is a 404; an address already taken stops the start.

use isula_integration::registry::{free_port, Registry, RegistryOptions};
use isula_integration::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::Command;

fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the metrics address");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    (head.to_string(), body.to_string())
}

/// Every sample of the page, by name with its labels.
fn scrape(addr: &str) -> HashMap<String, f64> {
    let (head, body) = get(addr, "/metrics");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a sample");
            (name.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

fn at(m: &HashMap<String, f64>, name: &str) -> f64 {
    *m.get(name)
        .unwrap_or_else(|| panic!("no {name} on the page: {m:?}"))
}

#[test]
fn metrics_move_with_builds_cache_transfers_and_contexts() {
    if !require_root() || !require_tool("docker-registry") {
        return;
    }
    let reg = Registry::start(RegistryOptions::default());
    let metrics = format!("127.0.0.1:{}", free_port());
    let tcp = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&reg.host()]))],
        &[
            "--metrics-addr",
            &metrics,
            "--host",
            &format!("tcp://{tcp}"),
            "--insecure-tcp",
        ],
        &[],
    );
    d.import_busybox("busybox:latest", &[]);
    let m0 = scrape(&metrics);
    for name in [
        "isula_build_builds_running",
        "isula_build_builds_finished_total",
        "isula_build_builds_failed_total",
        "isula_build_cache_hits_total",
        "isula_build_cache_misses_total",
        "isula_build_pulled_bytes_total",
        "isula_build_pushed_bytes_total",
        "isula_build_context_received_bytes_total",
        "isula_build_build_duration_seconds_count",
        "isula_build_step_duration_seconds_count",
    ] {
        assert_eq!(at(&m0, name), 0.0, "{name} before anything ran");
    }
    assert!(at(&m0, "isula_build_store_size_bytes") > 0.0);
    assert!(at(&m0, "isula_build_data_root_free_bytes") > 0.0);

    // A build: finished, its two steps run (misses), its FROM neither.
    let ctx = d.dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).expect("ctx");
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM busybox\nRUN echo one > /one\nRUN echo two > /two\n",
    )
    .expect("Dockerfile");
    let ctx_s = ctx.to_str().expect("utf8");
    d.ok(&["ctr-img", "build", "-t", "m:1", ctx_s]);
    let m1 = scrape(&metrics);
    assert_eq!(at(&m1, "isula_build_builds_finished_total"), 1.0);
    assert_eq!(at(&m1, "isula_build_builds_failed_total"), 0.0);
    assert_eq!(at(&m1, "isula_build_builds_running"), 0.0);
    assert_eq!(at(&m1, "isula_build_cache_misses_total"), 2.0);
    assert_eq!(at(&m1, "isula_build_cache_hits_total"), 0.0);
    assert_eq!(at(&m1, "isula_build_build_duration_seconds_count"), 1.0);
    assert_eq!(at(&m1, "isula_build_step_duration_seconds_count"), 3.0);
    assert!(at(&m1, "isula_build_build_duration_seconds_sum") > 0.0);
    assert_eq!(
        at(
            &m1,
            "isula_build_build_duration_seconds_bucket{le=\"+Inf\"}"
        ),
        1.0
    );
    assert!(at(&m1, "isula_build_store_size_bytes") > at(&m0, "isula_build_store_size_bytes"));

    // The same build again: both steps hit, the misses stay.
    let out = d.ok(&["ctr-img", "build", "-t", "m:2", ctx_s]);
    assert_eq!(cached_steps(&out).len(), 2, "{out}");
    let m2 = scrape(&metrics);
    assert_eq!(at(&m2, "isula_build_builds_finished_total"), 2.0);
    assert_eq!(at(&m2, "isula_build_cache_hits_total"), 2.0);
    assert_eq!(at(&m2, "isula_build_cache_misses_total"), 2.0);

    // A failing build: failed, not finished.
    let bad = d.dir.path().join("bad");
    std::fs::create_dir_all(&bad).expect("bad");
    std::fs::write(bad.join("Dockerfile"), "FROM busybox\nRUN exit 3\n").expect("Dockerfile");
    d.fails(&["ctr-img", "build", bad.to_str().expect("utf8")]);
    let m3 = scrape(&metrics);
    assert_eq!(at(&m3, "isula_build_builds_failed_total"), 1.0);
    assert_eq!(at(&m3, "isula_build_builds_finished_total"), 2.0);
    assert_eq!(at(&m3, "isula_build_pushed_bytes_total"), 0.0);

    // A push counts its bytes, a pull (after the image is gone) its own.
    let image = format!("{}/metrics/m:1", reg.host());
    d.ok(&["ctr-img", "tag", "m:1", &image]);
    d.ok(&["ctr-img", "push", &image]);
    let m4 = scrape(&metrics);
    let pushed = at(&m4, "isula_build_pushed_bytes_total");
    assert!(pushed > 1000.0, "pushed {pushed}");
    assert_eq!(at(&m4, "isula_build_pulled_bytes_total"), 0.0);
    // A pull (by a second daemon, whose store lacks the blobs) counts its own.
    let metrics2 = format!("127.0.0.1:{}", free_port());
    let d2 = Daemon::start_configured(
        &[("registries.toml", &insecure_registries(&[&reg.host()]))],
        &["--metrics-addr", &metrics2],
        &[],
    );
    assert_eq!(
        at(&scrape(&metrics2), "isula_build_pulled_bytes_total"),
        0.0
    );
    d2.ok(&["ctr-img", "pull", &image]);
    let pulled = at(&scrape(&metrics2), "isula_build_pulled_bytes_total");
    assert!(pulled > 1000.0, "pulled {pulled}");
    let m5 = scrape(&metrics);
    assert_eq!(at(&m5, "isula_build_pulled_bytes_total"), 0.0);
    assert_eq!(at(&m5, "isula_build_pushed_bytes_total"), pushed);

    // A remote build: the context's bytes are counted as received.
    assert_eq!(at(&m5, "isula_build_context_received_bytes_total"), 0.0);
    std::fs::write(ctx.join("payload"), vec![7u8; 50_000]).expect("payload");
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {image}\nCOPY payload /payload\n"),
    )
    .expect("Dockerfile");
    let o = d
        .cli_command(&["--host", &format!("tcp://{tcp}"), "ctr-img", "build", ctx_s])
        .output()
        .expect("remote build");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m6 = scrape(&metrics);
    assert!(at(&m6, "isula_build_context_received_bytes_total") >= 50_000.0);
    assert_eq!(at(&m6, "isula_build_builds_finished_total"), 3.0);

    // Only /metrics is served.
    let (head, _) = get(&metrics, "/other");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // An address already taken stops the start, naming it.
    let etc = tempfile::tempdir().expect("etc");
    let o = Command::new(bin("isula-builder"))
        .arg("--config-dir")
        .arg(etc.path())
        .arg("--dataroot")
        .arg(etc.path().join("data"))
        .arg("--runroot")
        .arg(etc.path().join("run"))
        .arg("--host")
        .arg(format!("unix://{}", etc.path().join("s.sock").display()))
        .args(["--metrics-addr", &metrics])
        .env_remove("ISULABUILD_HOST")
        .output()
        .expect("isula-builder");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("binding the metrics address"), "{err}");
}
