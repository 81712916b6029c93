//! Timed phases of an operation, for finding where its time goes: each phase logs its
//! duration (and bytes, where it counts them) at debug level under the target
//! `isula_phase` when it ends. The daemon shows them with `ISULA_BUILD_PHASES=1`;
//! `scripts/bench.sh` sums them per workload.

use std::time::Instant;

pub const TARGET: &str = "isula_phase";

/// A phase running from `start` until it is dropped.
pub struct Phase {
    name: &'static str,
    start: Instant,
    bytes: u64,
}

impl Phase {
    pub fn start(name: &'static str) -> Phase {
        Phase {
            name,
            start: Instant::now(),
            bytes: 0,
        }
    }

    /// Counts `n` more bytes handled by the phase.
    pub fn add_bytes(&mut self, n: u64) {
        self.bytes += n;
    }
}

impl Drop for Phase {
    fn drop(&mut self) {
        tracing::debug!(
            target: "isula_phase",
            phase = self.name,
            ms = self.start.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            "phase"
        );
    }
}
