#!/usr/bin/env bash
# The test command (README; .ci/run calls it): installs the test dependencies, starts a
# Docker engine if none runs (and stops it after), checks formatting and lints, and runs
# every test as root. With every dependency installed here, no test may skip (CI=1).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/test.sh must run as root (the end-to-end tests mount, chown and run containers)" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "cargo is not on PATH: install a Rust toolchain (rustup) first" >&2; exit 1; }
scripts/deps.sh test
export CI=1

dockerd_pid=""
stop_dockerd() {
    if [ -n "$dockerd_pid" ]; then
        kill -TERM "$dockerd_pid" 2>/dev/null || true
        wait "$dockerd_pid" 2>/dev/null || true
    fi
}
trap stop_dockerd EXIT
if ! docker info >/dev/null 2>&1; then
    dockerd --iptables=false --bridge=none >/tmp/isula-test-dockerd.log 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { cat /tmp/isula-test-dockerd.log; echo "dockerd did not start" >&2; exit 1; }
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
cargo test --workspace
# Load and soak, shortened (scripts/soak.sh without SHORT is the full 10-minute run).
SHORT=1 scripts/soak.sh
