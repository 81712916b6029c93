#!/usr/bin/env bash
# Load and soak: many builds in a row, then many clients doing mixed operations at once,
# against one daemon on temporary roots. Afterwards nothing may have grown: mounts, open
# files, threads, temp and work directories, RUN cgroups, runc containers; and the daemon's
# peak RSS must stay within PEAK_MB. Prints the figures; exits non-zero on any growth.
#
# Then the load of a big docker-archive (a sparse file: zero-filled files, read, hashed,
# stored and unpacked in full) must keep the daemon's peak RSS within PEAK_MB too.
#
#   scripts/soak.sh                 1000 builds, 20 clients for 600 s, a 20 GiB load (as root)
#   SHORT=1 scripts/soak.sh         100 builds, 8 clients for 60 s, a 2 GiB load (what
#                                   scripts/test.sh runs)
#   LOAD_GIB=N                      the size of the big load (0: none)
#   BIN=target/release scripts/soak.sh   other binaries (default: target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/soak.sh must run as root" >&2
    exit 1
fi
if [ "${SHORT:-0}" = 1 ]; then
    builds=${BUILDS:-100} clients=${CLIENTS:-8} duration=${DURATION:-60} load_gib=${LOAD_GIB:-2}
else
    builds=${BUILDS:-1000} clients=${CLIENTS:-20} duration=${DURATION:-600} load_gib=${LOAD_GIB:-20}
fi
peak_mb=${PEAK_MB:-64}
bin="$PWD/${BIN:-target/debug}"
work=$(mktemp -d /tmp/isula-soak.XXXXXX)
sock="unix://$work/isula_build.sock"
daemon=""
cleanup() {
    if [ -n "$daemon" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT
mkdir -p "$work/etc" "$work/ctx" "$work/rootfs/bin"
"$bin/isula-builder" --dataroot "$work/data" --runroot "$work/run" --config-dir "$work/etc" \
    --host "$sock" >"$work/daemon.log" 2>&1 &
daemon=$!
export ISULABUILD_HOST="$sock" ISULABUILD_KEY_FILE="$work/etc/isula-build.pub"
cli() { "$bin/isula-build" "$@"; }
for _ in $(seq 100); do cli version >/dev/null 2>&1 && break; sleep 0.1; done

# A busybox base and a build context.
cp "$(command -v busybox)" "$work/rootfs/bin/busybox"
for a in $("$work/rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$work/rootfs/bin/$a"; done
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
cli ctr-img import "$work/rootfs.tar" busybox:latest >/dev/null
head -c 65536 /dev/urandom >"$work/ctx/data.bin"
printf 'FROM busybox\nCOPY data.bin /data.bin\nRUN cat /data.bin | wc -c > /size\n' >"$work/ctx/Dockerfile"

count() { "$@" 2>/dev/null | wc -l; }
sample() {
    local pid=$daemon
    echo "fds=$(ls /proc/$pid/fd | wc -l) threads=$(ls /proc/$pid/task | wc -l)" \
        "mounts=$(grep -c " $work" /proc/self/mountinfo || true)" \
        "tmp=$(count ls -A "$work/data/tmp") ingest=$(count ls -A "$work/data/ingest")" \
        "builds=$(count ls -A "$work/run/builds")" \
        "cgroups=$(count find /sys/fs/cgroup -maxdepth 2 -name 'isula-build-*')" \
        "containers=$(count runc --root "$work/run/runc" list -q)"
}
value() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

cli ctr-img build -t warm:1 "$work/ctx" >/dev/null
base=$(sample)
echo "baseline: $base"

start=$(date +%s)
for i in $(seq "$builds"); do
    if [ $((i % 2)) = 0 ]; then flag=--no-cache; else flag=; fi
    cli ctr-img build $flag -t "soak:$((i % 5))" "$work/ctx" >/dev/null
done
echo "$builds builds in $(( $(date +%s) - start )) s: $(sample)"

mixed() {
    local n=$1 end=$(( $(date +%s) + duration )) i=0
    while [ "$(date +%s)" -lt "$end" ]; do
        i=$((i + 1))
        case $((i % 8)) in
            0) cli ctr-img build -t "c$n:1" "$work/ctx" ;;
            1) cli ctr-img images ;;
            2) cli ctr-img tag busybox:latest "t$n:$i" ;;
            3) cli ctr-img rm "t$n:$((i - 1))" ;;
            4) rm -f "$work/s$n.tar"; cli ctr-img save busybox:latest -o "$work/s$n.tar" ;;
            5) [ -f "$work/s$n.tar" ] && cli ctr-img load -i "$work/s$n.tar" ;;
            6) cli ctr-img inspect busybox:latest ;;
            7) cli info ;;
        esac >/dev/null 2>&1 || true
    done
    echo "$i"
}
pids=()
for n in $(seq "$clients"); do mixed "$n" >"$work/ops.$n" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
ops=$(cat "$work"/ops.* | awk '{s+=$1} END {print s}')
# Idle worker threads of the async runtime end after 10 s: what remains then is a leak.
sleep 12
after=$(sample)
peak=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$daemon/status)
echo "$clients clients for $duration s: $ops operations"
echo "after:    $after"
echo "daemon peak RSS: $peak MB (limit $peak_mb MB)"

fail=0
for k in mounts tmp ingest builds cgroups containers; do
    if [ "$(value "$after" $k)" != 0 ]; then echo "FAIL: $k left: $(value "$after" $k)"; fail=1; fi
done
for k in fds threads; do
    b=$(value "$base" $k) a=$(value "$after" $k)
    if [ "$a" -gt $((b + 8)) ]; then echo "FAIL: $k grew from $b to $a"; fail=1; fi
done
if [ "$peak" -gt "$peak_mb" ]; then echo "FAIL: peak RSS $peak MB over $peak_mb MB"; fail=1; fi
if ! cli ctr-img images >/dev/null; then echo "FAIL: the daemon does not answer"; fail=1; fi

if [ "$load_gib" -gt 0 ]; then
    # The peak is measured from here on (writing 5 to clear_refs resets VmHWM).
    echo 5 >/proc/$daemon/clear_refs
    "$bin/sparse-archive" "$load_gib" "$work/big.tar" "big:1" >/dev/null
    start=$(date +%s)
    if cli ctr-img load -i "$work/big.tar" >/dev/null; then
        load_peak=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$daemon/status)
        echo "load of a $load_gib GiB docker-archive in $(( $(date +%s) - start )) s:" \
            "daemon peak RSS $load_peak MB (limit $peak_mb MB)"
        if [ "$load_peak" -gt "$peak_mb" ]; then
            echo "FAIL: peak RSS $load_peak MB over $peak_mb MB during the big load"; fail=1
        fi
        cli ctr-img rm big:1 >/dev/null || { echo "FAIL: rm of the big image"; fail=1; }
    else
        echo "FAIL: the load of a $load_gib GiB docker-archive"; fail=1
    fi
    rm -f "$work/big.tar"
    after_load=$(sample)
    for k in mounts tmp ingest builds; do
        if [ "$(value "$after_load" $k)" != 0 ]; then echo "FAIL: $k left after the big load"; fail=1; fi
    done
fi
kill -TERM "$daemon"; wait "$daemon" || true; daemon=""
if ! "$bin/isula-builder" --dataroot "$work/data" --runroot "$work/run" --config-dir "$work/etc" \
    --check-store >/dev/null 2>&1; then
    echo "FAIL: --check-store"; fail=1
fi
[ "$fail" = 0 ] && echo "soak: no growth, store sound"
exit "$fail"
