//! Prometheus metrics for the operators of a fleet (`--metrics-addr ADDR:PORT`,
//! `metrics_addr` in configuration.toml): builds running, finished and failed; build and step
//! durations; build cache hits and misses; bytes pulled, pushed and received from clients
//! (context sync); the store's size and the data root's free space. The text format is
//! written here by hand (it is small); the HTTP side answers `GET /metrics` and nothing
//! else. This module only counts: it never changes what an operation does or prints.
//!
//! Steps and registry bytes are read from the lines an operation already reports (a
//! `STEP n:` line starts a step, which lasts until the next one or the build's end;
//! `Using cache` marks it a hit; progress events carry each blob's bytes so far), so no
//! crate below the daemon knows about metrics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bounds (seconds) of the build duration buckets.
const BUILD_BUCKETS: [f64; 12] = [
    0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];
/// Upper bounds (seconds) of the step duration buckets.
const STEP_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A histogram with fixed buckets; the sum kept in microseconds.
pub struct Histogram {
    bounds: &'static [f64; 12],
    counts: [AtomicU64; 12],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new(bounds: &'static [f64; 12]) -> Self {
        Histogram {
            bounds,
            counts: [const { AtomicU64::new(0) }; 12],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if secs <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{b}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The daemon's counters (one set per process).
pub struct Metrics {
    builds_running: AtomicI64,
    builds_finished: AtomicU64,
    builds_failed: AtomicU64,
    build_seconds: Histogram,
    step_seconds: Histogram,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    bytes_pulled: AtomicU64,
    bytes_pushed: AtomicU64,
    bytes_received: AtomicU64,
}

pub static METRICS: Metrics = Metrics {
    builds_running: AtomicI64::new(0),
    builds_finished: AtomicU64::new(0),
    builds_failed: AtomicU64::new(0),
    build_seconds: Histogram::new(&BUILD_BUCKETS),
    step_seconds: Histogram::new(&STEP_BUCKETS),
    cache_hits: AtomicU64::new(0),
    cache_misses: AtomicU64::new(0),
    bytes_pulled: AtomicU64::new(0),
    bytes_pushed: AtomicU64::new(0),
    bytes_received: AtomicU64::new(0),
};

/// A running build: counted as running until [`BuildTimer::end`] (or drop: failed).
pub struct BuildTimer {
    started: Instant,
    ended: bool,
}

impl Metrics {
    pub fn build_started(&self) -> BuildTimer {
        self.builds_running.fetch_add(1, Ordering::Relaxed);
        BuildTimer {
            started: Instant::now(),
            ended: false,
        }
    }

    /// Bytes of a build context received from a client.
    pub fn received(&self, bytes: u64) {
        self.bytes_received.fetch_add(bytes, Ordering::Relaxed);
    }
}

impl BuildTimer {
    pub fn end(mut self, ok: bool) {
        self.finish(ok);
    }

    fn finish(&mut self, ok: bool) {
        if self.ended {
            return;
        }
        self.ended = true;
        let m = &METRICS;
        m.builds_running.fetch_sub(1, Ordering::Relaxed);
        if ok {
            m.builds_finished.fetch_add(1, Ordering::Relaxed);
        } else {
            m.builds_failed.fetch_add(1, Ordering::Relaxed);
        }
        m.build_seconds.observe(self.started.elapsed());
    }
}

impl Drop for BuildTimer {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Reads an operation's report lines for what they tell the metrics: steps, cache hits,
/// the bytes of each blob pulled or pushed. The last step ends when the tap is dropped.
#[derive(Default, Debug)]
pub struct Tap {
    /// Bytes so far per (action, blob), so each event adds only what is new.
    moved: HashMap<(String, String), u64>,
    /// The step under way: when it started, whether it is a FROM, whether the cache had it.
    step: Option<(Instant, bool, bool)>,
}

impl Tap {
    pub fn line(&mut self, line: &str) {
        if let Some(e) = isula_transport::progress::parse(line) {
            let counter = match e.action.as_str() {
                "Downloading" => &METRICS.bytes_pulled,
                "Uploading" => &METRICS.bytes_pushed,
                _ => return,
            };
            let seen = self.moved.entry((e.action, e.id)).or_insert(0);
            if e.current > *seen {
                counter.fetch_add(e.current - *seen, Ordering::Relaxed);
                *seen = e.current;
            }
            return;
        }
        if let Some(rest) = line.strip_prefix("STEP ") {
            self.end_step();
            let instruction = rest.split_once(':').map_or("", |(_, i)| i.trim_start());
            let from = instruction
                .get(..5)
                .is_some_and(|w| w.eq_ignore_ascii_case("FROM "));
            self.step = Some((Instant::now(), from, false));
        } else if line.starts_with("Using cache ") {
            if let Some(s) = self.step.as_mut() {
                s.2 = true;
            }
        }
    }

    fn end_step(&mut self) {
        let Some((started, from, hit)) = self.step.take() else {
            return;
        };
        METRICS.step_seconds.observe(started.elapsed());
        if !from {
            let c = if hit {
                &METRICS.cache_hits
            } else {
                &METRICS.cache_misses
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.end_step();
    }
}

/// The metrics page.
pub fn render(data_root: &Path) -> String {
    use std::fmt::Write;
    let m = &METRICS;
    let mut out = String::new();
    let mut one = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    one(
        "isula_build_builds_running",
        "gauge",
        "Builds running now.",
        m.builds_running.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_builds_finished_total",
        "counter",
        "Builds that succeeded.",
        m.builds_finished.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_builds_failed_total",
        "counter",
        "Builds that failed or were cancelled.",
        m.builds_failed.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_cache_hits_total",
        "counter",
        "Build steps taken from the build cache.",
        m.cache_hits.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_cache_misses_total",
        "counter",
        "Build steps run (not in the build cache); FROM steps are neither.",
        m.cache_misses.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_pulled_bytes_total",
        "counter",
        "Bytes of blobs pulled from registries.",
        m.bytes_pulled.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_pushed_bytes_total",
        "counter",
        "Bytes of blobs pushed to registries.",
        m.bytes_pushed.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_context_received_bytes_total",
        "counter",
        "Bytes of build contexts received from remote clients.",
        m.bytes_received.load(Ordering::Relaxed).to_string(),
    );
    one(
        "isula_build_store_size_bytes",
        "gauge",
        "Disk space used under the data root.",
        store_size(data_root).to_string(),
    );
    one(
        "isula_build_data_root_free_bytes",
        "gauge",
        "Free space of the data root's file system (for unprivileged users).",
        rustix::fs::statvfs(data_root)
            .map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
            .to_string(),
    );
    m.build_seconds.render(
        &mut out,
        "isula_build_build_duration_seconds",
        "How long builds took, from start to their end.",
    );
    m.step_seconds.render(
        &mut out,
        "isula_build_step_duration_seconds",
        "How long build steps took, from a step's line to the next step's or the build's end.",
    );
    out
}

/// The space files under `root` take on its file system: each inode once (layers share
/// files through links), mounts below it (a build's overlay) left out.
fn store_size(root: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::symlink_metadata(root) else {
        return 0;
    };
    let dev = top.dev();
    let mut seen = std::collections::HashSet::new();
    let mut total = 0u64;
    let mut dirs: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.dev() != dev {
                continue;
            }
            if md.is_dir() {
                dirs.push(e.path());
            }
            if md.nlink() > 1 && !md.is_dir() && !seen.insert(md.ino()) {
                continue;
            }
            total = total.saturating_add(md.blocks().saturating_mul(512));
        }
    }
    total
}

/// The largest request head read (a scraper's GET is a few hundred bytes).
const REQUEST_MAX: usize = 8192;

/// Binds `addr` now (so a bad address stops the start), then serves `GET /metrics`.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the metrics address {addr}: {e}"))
}

pub async fn serve(listener: tokio::net::TcpListener, data_root: PathBuf) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let data_root = data_root.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            // The request head, until its blank line (bounded, and within 10 s).
            let read = tokio::time::timeout(Duration::from_secs(10), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < REQUEST_MAX {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let head = String::from_utf8_lossy(&buf);
            let mut words = head.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, body) =
                if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                    let body = tokio::task::spawn_blocking(move || render(&data_root))
                        .await
                        .unwrap_or_default();
                    ("200 OK", body)
                } else {
                    (
                        "404 Not Found",
                        "only GET /metrics is served here\n".to_string(),
                    )
                };
            let reply = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(reply.as_bytes()).await;
            let _ = conn.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_counts_into_every_bucket_at_or_above() {
        static H: Histogram = Histogram::new(&STEP_BUCKETS);
        H.observe(Duration::from_millis(300));
        let mut out = String::new();
        H.render(&mut out, "h", "help");
        assert!(out.contains("h_bucket{le=\"0.25\"} 0\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"0.5\"} 1\n"), "{out}");
        assert!(out.contains("h_bucket{le=\"+Inf\"} 1\n"), "{out}");
        assert!(out.contains("h_sum 0.3\n"), "{out}");
    }

    #[test]
    fn progress_events_add_only_new_bytes() {
        let before = METRICS.bytes_pulled.load(Ordering::Relaxed);
        let mut tap = Tap::default();
        tap.line(&isula_transport::progress::event(
            "abc",
            "Downloading",
            10,
            100,
        ));
        tap.line(&isula_transport::progress::event(
            "abc",
            "Downloading",
            100,
            100,
        ));
        tap.line(&isula_transport::progress::event(
            "abc",
            "Downloading",
            100,
            100,
        ));
        tap.line(&isula_transport::progress::event(
            "abc",
            "Extracting",
            500,
            500,
        ));
        assert_eq!(METRICS.bytes_pulled.load(Ordering::Relaxed) - before, 100);
    }
}
