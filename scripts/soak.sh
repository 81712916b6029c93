#!/usr/bin/env bash
# Load and soak: many builds in a row, then many clients doing mixed operations at once,
# against one daemon on temporary roots. Every operation must succeed: a failed build in a
# row stops the soak at once; in the mixed phase each kind of operation (build, images, tag,
# rm, save, load, inspect, info) is counted, the counts are printed as a table, and a kind
# that failed even once, or succeeded fewer than MIN_OK times, fails the soak, naming the kind
# and its first error. Afterwards nothing may have grown: mounts, open files, threads, temp
# and work directories, RUN cgroups, runc containers; and the daemon's peak RSS must stay
# within PEAK_MB. Prints the figures; exits non-zero on any failure or growth.
#
# Then the load of a big docker-archive (a sparse file: zero-filled files, read, hashed,
# stored and unpacked in full), the daemon's idle-time work on it (unpacking the packed
# layer; its directory takes no tar digest, as its blob stays) and, when docker-registry is
# installed, its push (the gzip is made while it uploads) must keep the daemon's peak RSS
# within PEAK_MB too: the soak waits until each is done (no layer packed, the push returned,
# then 3 s without daemon CPU) and prints each phase's time and peak.
#
#   scripts/soak.sh                 1000 builds, 20 clients for 600 s, a 20 GiB load (as root)
#   SHORT=1 scripts/soak.sh         100 builds, 8 clients for 60 s, a 2 GiB load (what
#                                   scripts/test.sh runs)
#   BUILDS=N CLIENTS=N DURATION=S   the builds in a row, the clients and seconds of the mix
#   LOAD_GIB=N                      the size of the big load (0: none)
#   PEAK_MB=N                       the daemon's peak RSS limit (64)
#   MIN_OK=N                        successes each kind needs in the mix (1)
#   RUNTIME=PATH                    the daemon's OCI runtime (configuration.toml `runtime`;
#                                   default runc), e.g. a wrapper that refuses
#   BIN=target/release scripts/soak.sh   other binaries (default: target/debug)
#   KEEP=1                          keep the work directory (daemon.log, the ops files)
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
min_ok=${MIN_OK:-1}
bin="${BIN:-${CARGO_TARGET_DIR:-target}/debug}"
case $bin in /*) ;; *) bin="$PWD/$bin" ;; esac
work=$(mktemp -d /tmp/isula-soak.XXXXXX)
sock="unix://$work/isula_build.sock"
daemon=""
registry=""
cleanup() {
    if [ -n "$daemon" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    if [ -n "$registry" ]; then kill "$registry" 2>/dev/null || true; wait "$registry" 2>/dev/null || true; fi
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT
# A command's output as one line (for a FAIL message).
oneline() { tr -s '\n\t' '  ' <<<"$1" | sed 's/^ *//; s/ *$//' | cut -c1-400; }
# Ends the soak at once: message $1, then the tail of the daemon's log.
abort() {
    echo "FAIL: $1"
    echo "daemon log (tail):"
    tail -n 20 "$work/daemon.log" | sed 's/^/    /'
    exit 1
}

mkdir -p "$work/etc" "$work/ctx" "$work/rootfs/bin"
if [ -n "${RUNTIME:-}" ]; then
    printf 'runtime = "%s"\n' "$RUNTIME" >"$work/etc/configuration.toml"
fi
# A registry on 127.0.0.1 for the big image's push (plain HTTP), when there is a big load.
reg_host=""
if [ "$load_gib" -gt 0 ] && command -v docker-registry >/dev/null 2>&1; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    reg_host="127.0.0.1:$port"
    printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
        "$work/registry" "$reg_host" >"$work/registry.yml"
    docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
    registry=$!
    printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$reg_host" >"$work/etc/registries.toml"
fi
"$bin/isula-builder" --dataroot "$work/data" --runroot "$work/run" --config-dir "$work/etc" \
    --host "$sock" >"$work/daemon.log" 2>&1 &
daemon=$!
export ISULABUILD_HOST="$sock" ISULABUILD_KEY_FILE="$work/etc/isula-build.pub"
cli() { "$bin/isula-build" "$@"; }
# Runs the CLI ($@); on failure sets ERROR to what it said, as one line: its error output,
# then the end of its output (where a failed RUN's own words are).
try_cli() {
    local out errf="$work/stderr.$BASHPID"
    if out=$(cli "$@" 2>"$errf"); then return 0; fi
    ERROR=$(oneline "$(cat "$errf")")
    [ -z "$out" ] || ERROR+=" (its output ends: $(oneline "$(tail -n 3 <<<"$out")"))"
    return 1
}
for _ in $(seq 100); do cli version >/dev/null 2>&1 && break; sleep 0.1; done
cli version >/dev/null 2>&1 || abort "the daemon does not answer 10 s after its start"

# A busybox base and a build context.
cp "$(command -v busybox)" "$work/rootfs/bin/busybox"
for a in $("$work/rootfs/bin/busybox" --list); do [ "$a" = busybox ] || ln -sf busybox "$work/rootfs/bin/$a"; done
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
try_cli ctr-img import "$work/rootfs.tar" busybox:latest || abort "import: the busybox base: $ERROR"
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

try_cli ctr-img build -t warm:1 "$work/ctx" || abort "build: the warm-up build: $ERROR"
base=$(sample)
echo "baseline: $base"

start=$(date +%s)
for i in $(seq "$builds"); do
    flags=()
    if [ $((i % 2)) = 0 ]; then flags=(--no-cache); fi
    try_cli ctr-img build "${flags[@]}" -t "soak:$((i % 5))" "$work/ctx" ||
        abort "build: build $i of $builds in a row: $ERROR"
done
echo "$builds builds in $(( $(date +%s) - start )) s: $(sample)"

# The mixed phase. Each client runs rounds of every kind, in this order, until DURATION
# is over (a round once begun is finished, so each kind runs at least once per client).
kinds=(build images tag rm save load inspect info)
# Failures a concurrent mix may meet by design, per kind: exact texts (fixed strings of the
# CLI's error output), counted as "expected" rather than failed. None today: every client
# works on names and files of its own (a tag and an rm of c$n-owned names, a save to and a
# load from its own file), so nothing one client does can make another's request fail.
declare -A expected=()
# Runs the CLI ($2...) as one operation of kind $1; appends "KIND<TAB>ok", "KIND<TAB>expected"
# or "KIND<TAB>failed<TAB>ERROR" to the client's file, $ops_file.
op() {
    local kind=$1
    shift
    if try_cli "$@"; then
        printf '%s\tok\n' "$kind" >>"$ops_file"
    elif [ -n "${expected[$kind]:-}" ] && grep -qF -- "${expected[$kind]}" <<<"$ERROR"; then
        printf '%s\texpected\n' "$kind" >>"$ops_file"
    else
        printf '%s\tfailed\t%s\n' "$kind" "$ERROR" >>"$ops_file"
    fi
}
mixed() {
    local n=$1 end=$(( $(date +%s) + duration )) round=0 kind ops_file="$work/ops.$1"
    : >"$ops_file"
    while [ "$(date +%s)" -lt "$end" ]; do
        round=$((round + 1))
        for kind in "${kinds[@]}"; do
            case $kind in
                # Every other build runs its RUN (the others come from the cache).
                build)
                    if [ $((round % 2)) = 1 ]; then
                        op build ctr-img build --no-cache -t "c$n:1" "$work/ctx"
                    else
                        op build ctr-img build -t "c$n:1" "$work/ctx"
                    fi ;;
                images) op images ctr-img images ;;
                tag) op tag ctr-img tag busybox:latest "t$n:$round" ;;
                rm) op rm ctr-img rm "t$n:$round" ;;
                save) rm -f "$work/s$n.tar"; op save ctr-img save busybox:latest -o "$work/s$n.tar" ;;
                load) op load ctr-img load -i "$work/s$n.tar" ;;
                inspect) op inspect ctr-img inspect busybox:latest ;;
                info) op info info ;;
            esac
        done
    done
}
echo "mixed: $clients clients for $duration s"
pids=()
for n in $(seq "$clients"); do mixed "$n" & pids+=($!); done
for p in "${pids[@]}"; do wait "$p"; done
ops=$(cat "$work"/ops.* | wc -l)

fail=0
# The table, and a FAIL line for each kind that failed or succeeded too rarely.
printf '%-8s %8s %9s %7s  %s\n' kind ok expected failed "first error"
for kind in "${kinds[@]}"; do
    counts=$(cat "$work"/ops.* | awk -F'\t' -v k="$kind" '
        $1 == k && $2 == "ok" { n_ok++ }
        $1 == k && $2 == "expected" { n_expected++ }
        $1 == k && $2 == "failed" { if (!n_failed++) first = $3 }
        END { printf "%d\t%d\t%d\t%s\n", n_ok, n_expected, n_failed, first }')
    IFS=$'\t' read -r ok expect failed first <<<"$counts"
    [[ "$ok $expect $failed" =~ ^[0-9]+\ [0-9]+\ [0-9]+$ ]] || abort "counting the $kind operations: $counts"
    printf '%-8s %8d %9d %7d  %s\n' "$kind" "$ok" "$expect" "$failed" "$first"
    if [ "$failed" -gt 0 ]; then
        echo "FAIL: $kind: $failed of $((ok + expect + failed)) failed in the mixed phase, the first with: $first"
        fail=1
    fi
    if [ "$ok" -lt "$min_ok" ]; then
        echo "FAIL: $kind: $ok succeeded in the mixed phase, fewer than $min_ok"
        fail=1
    fi
done

# Idle worker threads of the async runtime end after 10 s: what remains then is a leak.
sleep 12
after=$(sample)
peak=$(awk '/VmHWM/ {print int($2/1024)}' /proc/$daemon/status)
echo "$clients clients for $duration s: $ops operations"
echo "after:    $after"
echo "daemon peak RSS: $peak MB (limit $peak_mb MB)"

for k in mounts tmp ingest builds cgroups containers; do
    if [ "$(value "$after" $k)" != 0 ]; then echo "FAIL: $k left: $(value "$after" $k)"; fail=1; fi
done
for k in fds threads; do
    b=$(value "$base" $k) a=$(value "$after" $k)
    if [ "$a" -gt $((b + 8)) ]; then echo "FAIL: $k grew from $b to $a"; fail=1; fi
done
if [ "$peak" -gt "$peak_mb" ]; then echo "FAIL: peak RSS $peak MB over $peak_mb MB"; fail=1; fi
if ! cli ctr-img images >/dev/null; then echo "FAIL: the daemon does not answer"; fail=1; fi

# Clocks read without forking: MS, milliseconds since the epoch; TICKS, the daemon's CPU
# ticks (utime + stime of all its threads).
ms() { MS=$(( ${EPOCHREALTIME/[^0-9]/} / 1000 )); }
ticks() {
    local line f
    read -r line <"/proc/$daemon/stat"
    read -r -a f <<<"${line##*) }"
    TICKS=$((f[11] + f[12]))
}
# Ends phase $1 begun at PHASE_MS: prints its time and the daemon's peak RSS in it (VmHWM,
# reset at the phase's start), keeps the largest peak in LOAD_PEAK, and starts the next
# phase (resetting VmHWM: writing 5 to clear_refs sets it to the RSS now).
phase_end() {
    local hwm
    ms
    hwm=$(awk '/VmHWM/ {print int($2/1024)}' "/proc/$daemon/status")
    echo 5 >"/proc/$daemon/clear_refs"
    [ "$hwm" -le "$LOAD_PEAK" ] || LOAD_PEAK=$hwm
    printf '  %-7s %6d.%01d s, daemon peak RSS %d MB\n' "$1" $(((MS - PHASE_MS) / 1000)) \
        $(((MS - PHASE_MS) % 1000 / 100)) "$hwm"
    PHASE_MS=$MS
}

if [ "$load_gib" -gt 0 ]; then
    made=$("$bin/sparse-archive" "$load_gib" "$work/big.tar" "big:1")
    layer=$(sed -n 's/.* layer \(sha256:[0-9a-f]\{64\}\)$/\1/p' <<<"$made")
    [ -n "$layer" ] || abort "sparse-archive printed no layer digest: $made"
    meta="$work/data/metadata.json"
    # How long the daemon may take over its idle-time work on the big layer.
    limit_ms=$(( (60 + 30 * load_gib) * 1000 ))
    echo "load of a $load_gib GiB docker-archive (layer $layer), then the daemon's unpack of it" \
        "(idle-time work, timed from the load's end)${reg_host:+, then its push}:"
    LOAD_PEAK=0
    echo 5 >"/proc/$daemon/clear_refs"
    ms; PHASE_MS=$MS; load_ms=$MS
    if try_cli ctr-img load -i "$work/big.tar"; then
        phase_end load
        rm -f "$work/big.tar"
        # The daemon unpacks the packed layer once no request runs. Done: no layer packed,
        # and no daemon CPU for 3 s (nothing else left running).
        unpacked="" pushed="" busy_ms=$PHASE_MS
        ticks; prev=$TICKS
        while :; do
            sleep 0.1
            ms; ticks
            if [ "$TICKS" != "$prev" ]; then prev=$TICKS busy_ms=$MS; fi
            if [ -z "$unpacked" ] && ! grep -q '"packed":' "$meta"; then
                unpacked=1; phase_end unpack
            fi
            if [ -n "$unpacked" ] && [ -z "$pushed" ] && [ -n "$reg_host" ]; then
                # The push gzips the layer while it uploads it.
                if try_cli ctr-img tag big:1 "$reg_host/soak/big:1" &&
                    try_cli ctr-img push "$reg_host/soak/big:1"; then
                    ms; phase_end push
                else
                    echo "FAIL: push: the big image: $ERROR"; fail=1
                fi
                pushed=1
                ticks; prev=$TICKS; busy_ms=$MS
                continue
            fi
            if [ -n "$unpacked" ] && [ $((MS - busy_ms)) -ge 3000 ]; then
                phase_end settle
                break
            fi
            if [ $((MS - load_ms)) -gt "$limit_ms" ]; then
                phase_end "(stop)"
                echo "FAIL: the daemon's work on the big load not done in $((limit_ms / 1000)) s" \
                    "(unpacked: ${unpacked:-no})"
                fail=1
                break
            fi
        done
        echo "load + unpack${reg_host:+ + push} of $load_gib GiB in $(( (MS - load_ms) / 1000 )) s:" \
            "daemon peak RSS $LOAD_PEAK MB (limit $peak_mb MB)"
        if [ "$LOAD_PEAK" -gt "$peak_mb" ]; then
            echo "FAIL: peak RSS $LOAD_PEAK MB over $peak_mb MB during the big load, its unpack${reg_host:+ and its push}"
            fail=1
        fi
        try_cli ctr-img rm big:1 || { echo "FAIL: rm: the big image: $ERROR"; fail=1; }
        if [ -n "$reg_host" ] && [ -n "$pushed" ]; then
            try_cli ctr-img rm "$reg_host/soak/big:1" || { echo "FAIL: rm: the pushed name: $ERROR"; fail=1; }
        fi
    else
        echo "FAIL: load: the $load_gib GiB docker-archive: $ERROR"; fail=1
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
if [ "$fail" = 0 ]; then
    echo "soak: every operation succeeded, no growth, store sound"
else
    echo "soak: FAILED (see the FAIL lines above)"
fi
exit "$fail"
