#!/usr/bin/env bash
# Benchmark: import, save, load, push and pull of a generated ~400 MB, 20,000-file image
# (about half compressible: ~230 MB gzipped), builds, printing
# seconds and the daemon's peak RSS for each step, so later work can be compared.
#   scripts/bench.sh            (needs root; MB=... FILES=... to change the size,
#                               ROUNDS=... for the rounds, ONLY=main|cache|reuse|remote|peers|rootless for one part
#                               (ONLY=push: the import and the gzip and zstd push and pull rows, and the
#                               push right after a build, each in ROUNDS interleaved rounds);
#                               peers = each workload beside buildah and BuildKit, interleaved,
#                               WORKLOADS="copy run load save push pull" to pick some;
#                               the scale rows: ONLY=peers MB=2500 FILES=100000 ROUNDS=1;
#                               BIN=DIR to time the binaries in DIR (not built here);
#                               SETTLE=3 seconds without daemon CPU make it idle, SETTLE_MAX=600
#                               seconds after which a daemon not idle fails the bench)
# In the peers and cache parts, every timed run of ours is followed by a wait until our daemon
# is idle (its deferred unpack done), which is reported beside the wait; nothing is
# timed while a daemon here still works. A timed command that fails fails the bench.
set -euo pipefail
cd "$(dirname "$0")/.."
only() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }
files="${FILES:-20000}"
mb="${MB:-400}"
tck=$(getconf CLK_TCK)
# BIN=DIR: the binaries in DIR, as they are (another build to compare with), else ours,
# built now.
if [ -n "${BIN:-}" ]; then
    bin="$BIN"
elif ! built=$(cargo build --release --bins 2>&1); then
    printf 'bench: cargo build --release --bins failed:\n%s\n' "$(tail -n 30 <<<"$built")" >&2
    exit 1
else
    bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
fi
work=$(mktemp -d /var/tmp/isula-bench.XXXXXX)
sock="unix://$work/isula_build.sock"
daemon=""
daemon2=""
daemon3=""
registry=""
cleanup() {
    local p
    for p in "$daemon" "$daemon2"; do
        if [ -n "$p" ]; then kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; fi
    done
    if [ -n "$registry" ]; then kill "$registry" 2>/dev/null || true; wait "$registry" 2>/dev/null || true; fi
    # The rootless part's daemon (its outer process passes the signal on) and its user.
    if [ -n "$upid" ]; then
        kill -TERM "$upid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$upid" 2>/dev/null || break; sleep 0.1; done
    fi
    drop_user
    rm -rf "$work"
}
upid=""
made_user=""
drop_user() {
    [ -n "$made_user" ] || return 0
    userdel "$ruser" 2>/dev/null || true
    sed -i "/^$ruser:/d" /etc/subuid /etc/subgid
    made_user=""
}
trap cleanup EXIT

python3 - "$work/rootfs.tar" "$files" "$mb" <<'PY'
import io, os, sys, tarfile
path, files, mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
per = (mb << 20) // files
with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
    for d in range(100):
        info = tarfile.TarInfo(f"app/d{d:03}"); info.type = tarfile.DIRTYPE; info.mode = 0o755
        t.addfile(info)
    for i in range(files):
        # Like real files, about half compressible: gzip makes the layer ~230 MB.
        rand = per * 55 // 100
        data = os.urandom(rand) + (b"isula-build bench %05d " % i) * ((per - rand) // 24 + 1)
        data = data[:per]
        info = tarfile.TarInfo(f"app/d{i % 100:03}/f{i:05}.bin"); info.size = len(data); info.mode = 0o644
        t.addfile(info, io.BytesIO(data))
PY

# A Distribution registry for push and pull, when installed (plain HTTP on 127.0.0.1).
reg_host=""
if command -v docker-registry >/dev/null 2>&1; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    reg_host="127.0.0.1:$port"
    mkdir -p "$work/etc" "$work/registry"
    printf 'version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
        "$work/registry" "$reg_host" > "$work/registry.yml"
    docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
    registry=$!
    printf '[[registry]]\nlocation = "%s"\ninsecure = true\n' "$reg_host" > "$work/etc/registries.toml"
    for _ in $(seq 100); do curl -sf "http://$reg_host/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
fi

# ISULA_BUILD_PHASES=1: the daemon logs its timed phases; each step below prints their sums.
ISULA_BUILD_PHASES=1 "$bin/isula-builder" --dataroot "$work/data" --runroot "$work/run" --host "$sock" \
    --config-dir "$work/etc" 2>"$work/daemon.log" &
daemon=$!
export ISULABUILD_HOST="$sock"
for _ in $(seq 100); do "$bin/isula-build" version >/dev/null 2>&1 && break; sleep 0.1; done

# dockerd, when a Docker engine runs here and its process is visible: its CPU and its idle
# wait stand for BuildKit's (which runs inside it).
dockerd=""
if docker info >/dev/null 2>&1; then dockerd=$(pidof -s dockerd || true); fi

# Clocks read without forking (the idle wait polls them ten times a second): US, microseconds
# since the epoch; TICKS, the CPU ticks of process $1 (utime + stime: all its threads);
# CHILD_TICKS, those of this shell's waited-for children (cutime + cstime: a command timed
# here and what it waited for).
us() { US=${EPOCHREALTIME/[^0-9]/}; }
ticks_of() {
    local line f
    if ! read -r line 2>/dev/null <"/proc/$1/stat"; then
        echo "bench: process $1 (a daemon) has exited" >&2
        exit 1
    fi
    read -r -a f <<<"${line##*) }"
    TICKS=$((f[11] + f[12]))
}
child_ticks() {
    local line f
    read -r line <"/proc/$$/stat"
    read -r -a f <<<"${line##*) }"
    CHILD_TICKS=$((f[13] + f[14]))
}
# Into variable $1: microseconds $2, or CPU ticks $2, as seconds.
us_secs() { printf -v "$1" '%d.%06d' $(($2 / 1000000)) $(($2 % 1000000)); }
tick_secs() { printf -v "$1" '%d.%02d' $(($2 / tck)) $(($2 % tck * 100 / tck)); }
# The median of samples $1 (nothing for none), their spread (min-max).
median() { tr ' ' '\n' <<<"$1" | { grep . || true; } | sort -n | awk '{ a[NR] = $1 } END { if (NR) print a[int((NR + 1) / 2)] }'; }
spread() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'; }
# The median of samples $1 to two decimals, "-" for none; $1 / $2 likewise.
num() { local m; m=$(median "$1"); if [ -n "$m" ]; then printf '%.2f' "$m"; else printf -; fi; }
div() {
    if [ -n "$1" ] && [ -n "$2" ] && [ "$1" != - ] && [ "$2" != - ]; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'
    else printf -; fi
}
# Whether the store at data root $1 keeps no layer packed (loaded or pulled, waiting to be
# unpacked when the daemon idles).
nothing_packed() {
    [ -f "$1/metadata.json" ] || return 0
    python3 -c 'import json, sys; sys.exit(1 if json.load(open(sys.argv[1])).get("packed") else 0)' \
        "$1/metadata.json"
}
# The ticks of each daemon (by pid) when it was last found idle.
declare -A SEEN_IDLE
# Waits until process $1 is idle: it used no CPU for SETTLE seconds (3: longer than the
# 100 ms of quiet our store waits for before its idle-time work) and, with a data root $2, that store
# keeps no layer packed. Sets IDLE_AT, the time it was last seen using CPU (to 0.1 s; the
# wait's start if it used none), and IDLE_TICKS, its CPU ticks then. Returns 1 if it is not
# idle within $3 seconds (SETTLE_MAX, 600).
settle() {
    local pid="$1" root="${2:-}" limit=$((${3:-${SETTLE_MAX:-600}} * 1000000))
    local window=$((${SETTLE:-3} * 1000000)) start last prev look=0
    us; start=$US; last=$US
    ticks_of "$pid"; prev=$TICKS
    while [ $((US - start)) -lt "$limit" ]; do
        sleep 0.1
        us; ticks_of "$pid"
        if [ "$TICKS" != "$prev" ]; then
            prev=$TICKS; last=$US
        elif [ $((US - last)) -ge "$window" ] && [ "$US" -ge "$look" ]; then
            if [ -z "$root" ] || nothing_packed "$root"; then
                IDLE_AT=$last; IDLE_TICKS=$prev; SEEN_IDLE[$pid]=$prev
                return 0
            fi
            look=$((US + 1000000))
        fi
    done
    return 1
}
not_idle() {
    echo "bench: daemon $1 not idle after ${SETTLE_MAX:-600} s (still using CPU, or layers still packed in $2/metadata.json)" >&2
    exit 1
}
# Process $1 idle (settle $@), at once if it used no CPU since it was last found idle. Our
# daemons must get there; dockerd may not (a warning).
quiet() {
    ticks_of "$1"
    [ "${SEEN_IDLE[$1]:-}" != "$TICKS" ] || return 0
    settle "$@" && return 0
    [ -n "${2:-}" ] && not_idle "$1" "$2"
    echo "# process $1 not idle after ${3:-${SETTLE_MAX:-600}} s" >&2
}
# Before anything is timed: every daemon here idle, and nothing left to write back. Docker
# and buildah leave what they wrote in the page cache (they never sync), and a tool timed
# next would pay for writing it: our commits make the layer durable with one syncfs, which
# writes back everything dirty on the file system, a peer's leftovers included (1.5 GB left
# dirty by another process added 0.4-0.7 s to our COPY build). So each tool starts clean.
quiet_all() {
    quiet "$daemon" "$work/data"
    [ -z "$daemon2" ] || quiet "$daemon2" "$work/data2"
    [ -z "$daemon3" ] || quiet "$daemon3" "$uhome/data/isula-build"
    [ -z "$dockerd" ] || quiet "$dockerd" "" 60
    sync
}
# Fails the bench: row $2's command ($3...) exited with status $1; the tail of its stderr
# (in $work/stderr).
run_failed() {
    local rc="$1" name="$2"; shift 2
    {
        printf 'bench: %s: exit status %s from' "$name" "$rc"; printf ' %q' "$@"; echo
        echo "its stderr ends with:"
        tail -n 20 "$work/stderr" | sed 's/^/    /'
    } >&2
    exit 1
}
# An untimed command between timed runs (set-up), which must succeed too.
must() { "$@" >/dev/null 2>"$work/stderr" || run_failed $? "set-up" "$@"; }

sync
printf '%-28s %10s %12s %14s\n' "step" "seconds" "daemon CPU s" "peak RSS (MB)"
# The phase lines the daemon logged after line $1 of its log.
phase_lines() {
    tail -n +"$(($1 + 1))" "$work/daemon.log" | { grep 'isula_phase' || true; } | sed 's/\x1b\[[0-9;]*m//g'
}
# Phase lines on stdin summed per phase: seconds (and MB), divided by $1 (runs; default 1).
sum_phases() {
    awk -v runs="${1:-1}" '
        match($0, /phase="[^"]*"/) { p = substr($0, RSTART + 7, RLENGTH - 8)
            match($0, /ms=[0-9.]+/); ms = substr($0, RSTART + 3, RLENGTH - 3)
            match($0, /bytes=[0-9]+/); b = substr($0, RSTART + 6, RLENGTH - 6)
            if (!(p in t)) order[++n] = p
            t[p] += ms; by[p] += b; c[p]++ }
        END { for (i = 1; i <= n; i++) { p = order[i]
            printf "    %-52s %8.2f s %6.1f x", p, t[p] / 1000 / runs, c[p] / runs
            if (by[p] > 0) printf " %9.1f MB", by[p] / 1048576 / runs
            printf "\n" } }'
}
# The phases the daemon logged after line $1 of its log: seconds (and MB) summed per phase.
phases() { phase_lines "$1" | sum_phases 1; }
step() {
    local name="$1"; shift
    sync                                  # earlier steps' writeback must not bill this one
    echo 5 > "/proc/$daemon/clear_refs"   # reset the peak RSS
    local t0 t1 c0 hwm lines rc=0 wall cpu
    lines=$(wc -l < "$work/daemon.log")
    ticks_of "$daemon"; c0=$TICKS
    us; t0=$US
    "$bin/isula-build" "$@" >/dev/null 2>"$work/stderr" || rc=$?
    us; t1=$US
    [ "$rc" = 0 ] || run_failed "$rc" "$name" "$bin/isula-build" "$@"
    ticks_of "$daemon"
    us_secs wall $((t1 - t0)); tick_secs cpu $((TICKS - c0))
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon/status")
    awk -v n="$name" -v a="$wall" -v c="$cpu" -v h="$hwm" \
        'BEGIN { printf "%-28s %10.2f %12.2f %14.1f\n", n, a, c, h / 1024 }'
    [ -n "${PHASES:-1}" ] && phases "$lines"
    return 0
}
size=$(du -m "$work/rootfs.tar" | cut -f1)
echo "# image: $files files, ${size} MB tar"
if only main || only push; then
step "import (tar)" ctr-img import "$work/rootfs.tar" bench:1
if [ -n "$reg_host" ]; then
    # Push and pull in rounds (ROUNDS, default 3), interleaved: each round, for gzip, zstd
    # and zstd:chunked, the image imported afresh (no compressed form yet), pushed right
    # after the import (its form made on every core while it uploads: the push waits for
    # it), pushed again to an emptied registry with the form kept (only sending), then
    # pulled into an empty store. Each sample prints as it is taken (with the daemon's
    # phases in the first round); then medians with the spread (min-max), the daemon's and
    # the registry's CPU seconds, and the ratios right after / kept (the aim: <= 1.1).
    push_rounds="${ROUNDS:-3}"
    declare -A PT PCPU PREG
    # push_step NAME CMD...: runs isula-build CMD now (no wait for idle: a push right after
    # an import must find no form made in idle time) and records its samples.
    push_step() {
        local name="$1"; shift
        local t0 t1 c0 g0 rc=0 wall cpu reg lines
        sync
        lines=$(wc -l < "$work/daemon.log")
        ticks_of "$daemon"; c0=$TICKS
        ticks_of "$registry"; g0=$TICKS
        us; t0=$US
        "$bin/isula-build" "$@" >/dev/null 2>"$work/stderr" || rc=$?
        us; t1=$US
        [ "$rc" = 0 ] || run_failed "$rc" "$name" "$bin/isula-build" "$@"
        us_secs wall $((t1 - t0))
        ticks_of "$daemon"; tick_secs cpu $((TICKS - c0))
        ticks_of "$registry"; tick_secs reg $((TICKS - g0))
        PT[$name]+="$wall "; PCPU[$name]+="$cpu "; PREG[$name]+="$reg "
        printf '%-40s %8.2f   daemon CPU %5.2f   registry CPU %5.2f\n' "$name" "$wall" "$cpu" "$reg"
        if [ "$round" = 1 ] && [ -n "${PHASES:-1}" ]; then phases "$lines"; fi
    }
    empty_registry() { rm -rf "${work:?}/registry/"*; }
    codecs=(gzip zstd zstd:chunked)
    echo "# push and pull: $push_rounds interleaved rounds (the codecs' order rotates)"
    for round in $(seq "$push_rounds"); do
        for i in 0 1 2; do
            c=${codecs[$(((i + round - 1) % 3))]}
            ref="$reg_host/bench-${c/:/-}:1"
            must "$bin/isula-build" ctr-img rm -a
            quiet "$daemon" "$work/data"
            # The registry is emptied first: the push follows the import at once, as in a
            # script (a gap of 100 ms lets the unpack start, which stops when the push does).
            empty_registry
            must "$bin/isula-build" ctr-img import "$work/rootfs.tar" "$ref"
            push_step "push $c (right after import)" ctr-img push --compression "$c" "$ref"
            [ "$round" = 1 ] && echo "# registry holds $(du -sm "$work/registry" | cut -f1) MB ($c)"
            empty_registry
            # The push with the form kept is the baseline: the daemon idle first (the
            # import's unpack, queued for a quiet spell, started after the first push and
            # would run beside this one, or stop at its start and clean up beside it).
            quiet "$daemon" "$work/data"
            push_step "push $c (form kept)" ctr-img push --compression "$c" "$ref"
            must "$bin/isula-build" ctr-img rm -a
            quiet "$daemon" "$work/data"
            push_step "pull $c (empty store)" ctr-img pull "$ref"
        done
    done
    printf "# %-38s %8s   %-13s %10s %12s\n" "medians over $push_rounds rounds" seconds "(spread)" "daemon CPU" "registry CPU"
    prow() {
        printf '%-40s %8.2f   %-13s %10s %12s\n' "$1" "$(median "${PT[$1]}")" "($(spread "${PT[$1]}"))" \
            "$(num "${PCPU[$1]}")" "$(num "${PREG[$1]}")"
    }
    for c in "${codecs[@]}"; do
        prow "push $c (right after import)"
        prow "push $c (form kept)"
        prow "pull $c (empty store)"
    done
    # pratio NAME A B: the ratio of row A's median to row B's, and each round's own ratio.
    pratio() {
        local per
        per=$(paste -d/ <(tr ' ' '\n' <<<"${PT[$2]}" | grep .) <(tr ' ' '\n' <<<"${PT[$3]}" | grep .) \
            | awk -F/ '{ printf "%s%.2f", (NR > 1 ? " " : ""), $1 / $2 }')
        printf '%-40s %8s   (rounds: %s; aim <= 1.10)\n' "$1" \
            "$(div "$(median "${PT[$2]}")" "$(median "${PT[$3]}")")" "$per"
    }
    for c in "${codecs[@]}"; do
        pratio "ratio $c after import / kept" "push $c (right after import)" "push $c (form kept)"
    done
    # Back to the imported image for the steps below.
    must "$bin/isula-build" ctr-img rm -a
    must "$bin/isula-build" ctr-img import "$work/rootfs.tar" bench:1
fi
fi  # ONLY
if only main; then
step "save docker-archive" ctr-img save bench:1 -o "$work/docker.tar"
step "save oci-archive" ctr-img save bench:1 -o "$work/oci.tar" -f oci
step "rm" ctr-img rm bench:1
step "load docker-archive" ctr-img load -i "$work/docker.tar"
step "rm" ctr-img rm bench:1
step "load oci-archive" ctr-img load -i "$work/oci.tar"
step "images" ctr-img images
fi  # ONLY

# Builds: a big COPY of the generated context, a RUN writing ~150 MB, the manual's example.
mkdir -p "$work/base" "$work/ctx-copy" "$work/ctx-run" "$work/ctx-small"
mkdir -p "$work/base/bin" && cp /bin/busybox "$work/base/bin/" && ln -s busybox "$work/base/bin/sh" \
    && ln -s busybox "$work/base/bin/dd" && ln -s busybox "$work/base/bin/cat" && ln -s busybox "$work/base/bin/sync"
tar -C "$work/base" -cf "$work/base.tar" .
"$bin/isula-build" ctr-img import "$work/base.tar" busybox:bench >/dev/null
tar -C "$work/ctx-copy" -xf "$work/rootfs.tar"
printf 'FROM busybox:bench\nCOPY . /app/\n' > "$work/ctx-copy/Dockerfile"
printf 'FROM busybox:bench\nRUN dd if=/dev/urandom of=/big bs=1M count=150 2>/dev/null\n' > "$work/ctx-run/Dockerfile"
echo "This is bar file" > "$work/ctx-small/bar.txt"
printf 'FROM busybox:bench\nLABEL foo=bar\nCOPY ./* /home/dir1/\n' > "$work/ctx-small/Dockerfile"
if only push && [ -n "$reg_host" ]; then
    # A push right after a build (`build && push` in CI): the built layer has no gzip or zstd
    # (no layer is compressed in idle time), so the push makes its form from the layer's
    # files while it uploads; then the same push to an emptied registry with that form kept
    # (only sending). In rounds like the import's (gzip, then zstd, each after a build of
    # its own, untimed, that the push follows at once, as in CI), the phases in the first.
    for round in $(seq "$push_rounds"); do
        for c in gzip zstd; do
            # The last round's image and its kept forms go (the cache with them, which
            # would keep its layer).
            "$bin/isula-build" ctr-img rm "$reg_host/bench-built:1" >/dev/null 2>&1 || true
            must "$bin/isula-build" builder prune --all -f </dev/null
            empty_registry
            must "$bin/isula-build" ctr-img build --no-cache --tag "$reg_host/bench-built:1" "$work/ctx-copy"
            push_step "push $c (right after build)" ctr-img push --compression "$c" "$reg_host/bench-built:1"
            empty_registry
            # The baseline starts with the daemon idle (the built layer's unpack done), as
            # the import's does.
            quiet "$daemon" "$work/data"
            push_step "push $c (built, form kept)" ctr-img push --compression "$c" "$reg_host/bench-built:1"
        done
    done
    printf "# %-38s %8s   %-13s %10s %12s\n" "medians over $push_rounds rounds" seconds "(spread)" "daemon CPU" "registry CPU"
    for c in gzip zstd; do
        prow "push $c (right after build)"
        prow "push $c (built, form kept)"
    done
    for c in gzip zstd; do
        pratio "ratio $c after build / kept" "push $c (right after build)" "push $c (built, form kept)"
    done
    must "$bin/isula-build" ctr-img rm "$reg_host/bench-built:1"
fi
if only main; then
step "build: COPY 20k files" ctr-img build "$work/ctx-copy"
step "build: RUN writes 150 MB" ctr-img build "$work/ctx-run"
step "build: manual example" ctr-img build "$work/ctx-small"
# Idle: once the daemon's background work is done, plus the idle
# trimmer's 5 s period.
settle "$daemon" "$work/data" || not_idle "$daemon" "$work/data"
sleep 6
awk '/VmRSS/ { printf "%-28s %10s %12s %14.1f\n", "daemon RSS, idle", "-", "-", $2 / 1024 }' "/proc/$daemon/status"
fi  # ONLY

# The build cache, in rounds (ROUNDS, default 3) that interleave: the COPY build from an
# empty cache (builder prune --all: the first build of a context), unchanged, with one file
# changed, and with the cache bypassed (--no-cache), each beside BuildKit's build of the
# same context in the same state when a Docker engine runs here. Medians with the spread
# (min-max), our daemon's CPU seconds and the seconds until it was idle, and ratios; the
# daemon's peak RSS over them all.
rounds="${ROUNDS:-3}"
# Per row name, space-separated samples: T, the seconds of the command (what the user waits
# for); CPU, the CPU seconds of the daemon (or tool) doing the work; IDLE, the seconds from
# the command's start until that daemon was idle again (its deferred work done).
declare -A T CPU IDLE PEAK
# timed NAME WHO CMD...: once every daemon here is idle, runs CMD and records its samples; a
# CMD that fails fails the bench. WHO does the work:
#   ours, ours2  our daemon (the second one): CPU and IDLE from CMD's start until it is idle
#                (settle), which must come;
#   docker       dockerd, when visible here (BuildKit runs in it): its CPU and the client's,
#                until dockerd is idle; else only IDLE, as the wait;
#   self         CMD itself, no daemon (buildah): its CPU and its children's, IDLE the wait.
timed() {
    local name="$1" who="$2"; shift 2
    local pid="" root="" rc=0 c0=0 k0 t0 t1 wall x
    case "$who" in
    ours) pid=$daemon root=$work/data ;;
    ours2) pid=$daemon2 root=$work/data2 ;;
    ours3) pid=$daemon3 root=$uhome/data/isula-build ;;
    docker) pid=$dockerd ;;
    esac
    quiet_all
    sync
    if [ -n "$pid" ]; then ticks_of "$pid"; c0=$TICKS; fi
    child_ticks; k0=$CHILD_TICKS
    us; t0=$US
    "$@" >/dev/null 2>"$work/stderr" || rc=$?
    us; t1=$US
    [ "$rc" = 0 ] || run_failed "$rc" "$name" "$@"
    child_ticks
    us_secs wall $((t1 - t0)); T[$name]+="$wall "
    case "$who" in
    ours | ours2 | ours3)
        settle "$pid" "$root" || not_idle "$pid" "$root"
        tick_secs x $((IDLE_TICKS - c0)); CPU[$name]+="$x "
        us_secs x $((IDLE_AT - t0)); IDLE[$name]+="$x " ;;
    docker)
        if [ -n "$pid" ] && settle "$pid" "" 60; then
            tick_secs x $((IDLE_TICKS - c0 + CHILD_TICKS - k0)); CPU[$name]+="$x "
            us_secs x $((IDLE_AT - t0)); IDLE[$name]+="$x "
        else
            IDLE[$name]+="$wall "
        fi ;;
    self)
        tick_secs x $((CHILD_TICKS - k0)); CPU[$name]+="$x "
        IDLE[$name]+="$wall " ;;
    esac
}
row() {
    printf '%-34s %8.2f   %-13s CPU %6s   idle %6s\n' "$1" "$(median "${T[$1]}")" "($(spread "${T[$1]}"))" \
        "$(num "${CPU[$1]:-}")" "$(num "${IDLE[$1]:-}")"
}
# Row $1 / row $2: the wait, and until idle.
ratio() {
    printf '%-34s %8s   until idle %6s\n' "$3" "$(div "$(median "${T[$1]}")" "$(median "${T[$2]}")")" \
        "$(div "$(median "${IDLE[$1]:-}")" "$(median "${IDLE[$2]:-}")")"
}
# Each workload beside the peers installed here (buildah; Docker with BuildKit), in ROUNDS
# interleaved rounds (the order of the tools rotates each round): medians with the spread,
# our daemon's CPU and time until idle, and ours divided by the best peer. Every tool starts
# from the same state each time, and no daemon here works while one is timed.
if only peers; then
    peer_docker=""
    if [ -x /usr/bin/docker ] && docker info >/dev/null 2>&1; then peer_docker=1; fi
    peer_buildah=""
    command -v buildah >/dev/null 2>&1 && peer_buildah=1
    bah=(buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver overlay)
    dk() { DOCKER_BUILDKIT=1 /usr/bin/docker "$@"; }
    dkc=(env DOCKER_BUILDKIT=1 /usr/bin/docker)
    "$bin/isula-build" ctr-img rm -a >/dev/null 2>&1 || true
    "$bin/isula-build" ctr-img import "$work/base.tar" busybox:bench >/dev/null
    if [ "$mb" -gt 1000 ]; then
        # Past import's 1 GiB limit: the image is the COPY build's (busybox plus the files).
        "$bin/isula-build" ctr-img build --no-cache -t bench:1 "$work/ctx-copy" >/dev/null
    else
        "$bin/isula-build" ctr-img import "$work/rootfs.tar" bench:1 >/dev/null
    fi
    "$bin/isula-build" ctr-img save busybox:bench -o "$work/peer-base.tar" >/dev/null
    "$bin/isula-build" ctr-img save bench:1 -o "$work/peer-image.tar" >/dev/null
    if [ -n "$peer_buildah" ]; then
        "${bah[@]}" pull -q "docker-archive:$work/peer-base.tar" >/dev/null
        "${bah[@]}" tag "$("${bah[@]}" images -q | head -1)" localhost/busybox:bench >/dev/null 2>&1 || true
        for c in copy run; do
            sed 's|^FROM busybox:bench|FROM localhost/busybox:bench|' "$work/ctx-$c/Dockerfile" > "$work/Dockerfile.buildah-$c"
        done
    fi
    if [ -n "$peer_docker" ]; then
        dk load -i "$work/peer-base.tar" >/dev/null
    fi
    # One workload: ours, then each peer: "cmd_" functions set CMD to the tool's command,
    # "prep_" ones reset state untimed before it.
    workload() {
        local w="$1" r="$2"
        local tools=(ours)
        [ -n "$peer_buildah" ] && tools+=(buildah)
        [ -n "$peer_docker" ] && tools+=(docker)
        local n=${#tools[@]} i t who lines hwm
        for ((i = 0; i < n; i++)); do
            t=${tools[$(((i + r) % n))]}
            who=$t
            [ "$t" = buildah ] && who=self
            "prep_$w" "$t"
            quiet_all
            lines=$(wc -l < "$work/daemon.log")
            [ "$t" = ours ] && echo 5 > "/proc/$daemon/clear_refs"
            "cmd_$w" "$t"
            # For ours, this waits until our daemon is idle again (its unpack done).
            timed "$w: $t" "$who" "${CMD[@]}"
            if [ "$t" = ours ]; then
                # Our phases in this run, its idle-time work included.
                phase_lines "$lines" >> "$work/phases-$w"
                hwm=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$daemon/status")
                if [ "$hwm" -gt "${PEAK[$w]:-0}" ]; then PEAK[$w]=$hwm; fi
            fi
        done
    }
    # A build of ctx-$2 without cache, by tool $1.
    build_ctx() {
        case "$1" in
        ours) CMD=("$bin/isula-build" ctr-img build --no-cache "$work/ctx-$2") ;;
        buildah) CMD=("${bah[@]}" bud -q --network host --layers=false -f "$work/Dockerfile.buildah-$2" -t "bench-$2" "$work/ctx-$2") ;;
        docker) CMD=("${dkc[@]}" build --no-cache --network host -q -t "isula-bench-$2:1" "$work/ctx-$2") ;;
        esac
    }
    prep_copy() { :; }
    cmd_copy() { build_ctx "$1" copy; }
    prep_run() { :; }
    cmd_run() { build_ctx "$1" run; }
    # Every name of the image goes, so that the load finds nothing of it in the store (and
    # our untagged COPY builds and build cache go too: at scale, bench:1 is such a build,
    # and they would still hold its layers).
    prep_load() {
        case "$1" in
        ours) "$bin/isula-build" ctr-img rm bench:1 ${reg_host:+"$reg_host/bench:1"} >/dev/null 2>&1 || true
            "$bin/isula-build" ctr-img rm -p >/dev/null 2>&1 || true
            "$bin/isula-build" builder prune --all -f </dev/null >/dev/null 2>&1 || true ;;
        buildah) "${bah[@]}" rmi -f localhost/bench:1 docker.io/library/bench:1 ${reg_host:+"$reg_host/bench:1"} >/dev/null 2>&1 || true ;;
        docker) dk rmi -f bench:1 ${reg_host:+"$reg_host/bench:1"} >/dev/null 2>&1 || true
            # Its build cache goes as ours does (with it the context BuildKit kept, as our
            # prune drops our record of the context's hashes): the next COPY starts alike.
            dk builder prune -af >/dev/null 2>&1 || true ;;
        esac
    }
    # The registry name for push, after a load.
    retag() {
        [ -n "$reg_host" ] || return 0
        "$bin/isula-build" ctr-img tag bench:1 "$reg_host/bench:1" >/dev/null
        if [ -n "$peer_docker" ]; then dk tag bench:1 "$reg_host/bench:1"; fi
    }
    cmd_load() {
        case "$1" in
        ours) CMD=("$bin/isula-build" ctr-img load -i "$work/peer-image.tar") ;;
        buildah) CMD=("${bah[@]}" pull -q "docker-archive:$work/peer-image.tar") ;;
        docker) CMD=("${dkc[@]}" load -i "$work/peer-image.tar") ;;
        esac
    }
    prep_save() { rm -f "$work/peer-save.tar"; }
    cmd_save() {
        case "$1" in
        ours) CMD=("$bin/isula-build" ctr-img save bench:1 -o "$work/peer-save.tar") ;;
        buildah) CMD=("${bah[@]}" push -q bench:1 "docker-archive:$work/peer-save.tar:bench:1") ;;
        docker) CMD=("${dkc[@]}" save -o "$work/peer-save.tar" bench:1) ;;
        esac
    }
    prep_push() { rm -rf "${work:?}/registry/"*; }
    cmd_push() {
        case "$1" in
        ours) CMD=("$bin/isula-build" ctr-img push "$reg_host/bench:1") ;;
        buildah) CMD=("${bah[@]}" push -q --tls-verify=false bench:1 "docker://$reg_host/bench:1") ;;
        docker) CMD=("${dkc[@]}" push "$reg_host/bench:1") ;;
        esac
    }
    prep_pull() { prep_load "$1"; }
    cmd_pull() {
        case "$1" in
        ours) CMD=("$bin/isula-build" ctr-img pull "$reg_host/bench:1") ;;
        buildah) CMD=("${bah[@]}" pull -q --tls-verify=false "docker://$reg_host/bench:1") ;;
        docker) CMD=("${dkc[@]}" pull -q "$reg_host/bench:1") ;;
        esac
    }
    loads=(copy run load save)
    [ -n "$reg_host" ] && loads+=(push pull)
    # WORKLOADS="copy push": only those (pull needs the registry, as push does).
    if [ -n "${WORKLOADS:-}" ]; then read -r -a loads <<<"$WORKLOADS"; fi
    # Every tool holds bench:1 (and its registry name) for save and push.
    if [ -n "$peer_buildah" ]; then cmd_load buildah; must "${CMD[@]}"; fi
    if [ -n "$peer_docker" ]; then cmd_load docker; must "${CMD[@]}"; fi
    retag
    for r in $(seq "$rounds"); do
        for w in "${loads[@]}"; do
            # The registry copy that pull reads is pushed (untimed) by ours.
            if [ "$w" = pull ]; then prep_push ours; cmd_push ours; must "${CMD[@]}"; fi
            workload "$w" "$r"
            [ "$w" = load ] && retag
            # pull removed bench:1: every tool gets it back for the next round.
            if [ "$w" = pull ]; then
                for t in ours buildah docker; do
                    case "$t" in buildah) [ -n "$peer_buildah" ] || continue ;; docker) [ -n "$peer_docker" ] || continue ;; esac
                    prep_load "$t"; cmd_load "$t"; must "${CMD[@]}"
                done
                retag
            fi
        done
    done
    # The least median over the peers of samples $1 (T or IDLE) for workload $2.
    best() {
        local -n samples=$1
        local t
        for t in buildah docker; do
            if [ -n "${samples[$2: $t]:-}" ]; then median "${samples[$2: $t]}"; fi
        done | sort -n | head -1
    }
    cell() { if [ -n "${T[$1]:-}" ]; then printf '%.2f (%s)' "$(median "${T[$1]}")" "$(spread "${T[$1]}")"; else printf -; fi; }
    echo "# ours beside the peers: $rounds interleaved rounds, median seconds of the command (spread);"
    echo "# for ours also its daemon's CPU seconds and the seconds until it was idle again (its unpack"
    echo "# and gzip done), from the command's start; ours / the best peer, for the command (wait) and"
    echo "# until idle (idle; buildah has no daemon: its idle is its wait); the daemon's peak RSS (MB)"
    printf '%-8s %20s %7s %7s %20s %20s %6s %6s %8s\n' workload ours "CPU s" "idle s" buildah docker wait idle "peak MB"
    for w in "${loads[@]}"; do
        printf '%-8s %20s %7s %7s %20s %20s %6s %6s %8s\n' "$w" "$(cell "$w: ours")" \
            "$(num "${CPU[$w: ours]:-}")" "$(num "${IDLE[$w: ours]:-}")" \
            "$(cell "$w: buildah")" "$(cell "$w: docker")" \
            "$(div "$(median "${T[$w: ours]}")" "$(best T "$w")")" \
            "$(div "$(median "${IDLE[$w: ours]}")" "$(best IDLE "$w")")" "${PEAK[$w]:--}"
    done
    if [ -n "$peer_buildah$peer_docker" ]; then
        echo "# the peers' median CPU seconds and seconds until idle: buildah's process and what it waited"
        echo "# for (idle when it exits); Docker's client and dockerd until dockerd is idle"
        if [ -n "$peer_docker" ] && [ -z "$dockerd" ]; then
            echo "# (dockerd's process is not visible here: no CPU for Docker, its idle is its wait)"
        fi
        printf '%-8s %14s %14s %14s %14s\n' workload "buildah CPU s" "buildah idle" "docker CPU s" "docker idle"
        for w in "${loads[@]}"; do
            printf '%-8s %14s %14s %14s %14s\n' "$w" "$(num "${CPU[$w: buildah]:-}")" "$(num "${IDLE[$w: buildah]:-}")" \
                "$(num "${CPU[$w: docker]:-}")" "$(num "${IDLE[$w: docker]:-}")"
        done
    fi
    echo "# our phases, mean per run of each workload, its idle-time work included (seconds, times, MB)"
    for w in "${loads[@]}"; do
        echo "$w:"
        if [ -f "$work/phases-$w" ]; then sum_phases "$rounds" < "$work/phases-$w"; fi
    done
fi  # peers

if only cache; then
bk=""
if [ -x /usr/bin/docker ] && docker info >/dev/null 2>&1; then
    bk=1
    "$bin/isula-build" ctr-img save busybox:bench -o "$work/base-bk.tar" >/dev/null
    docker load -i "$work/base-bk.tar" >/dev/null
    must env DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -t isula-bench-bk:1 "$work/ctx-copy"
fi
echo 5 > "/proc/$daemon/clear_refs"
for r in $(seq "$rounds"); do
    "$bin/isula-build" builder prune --all --force >/dev/null
    timed "cold (empty cache)" ours "$bin/isula-build" ctr-img build "$work/ctx-copy"
    timed "unchanged" ours "$bin/isula-build" ctr-img build "$work/ctx-copy"
    if [ -n "$bk" ]; then
        timed "buildkit unchanged" docker env DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -t isula-bench-bk:1 "$work/ctx-copy"
    fi
    echo "changed $r" >> "$work/ctx-copy/app/d000/f00000.bin"
    timed "one file changed" ours "$bin/isula-build" ctr-img build "$work/ctx-copy"
    if [ -n "$bk" ]; then
        timed "buildkit one file changed" docker env DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -t isula-bench-bk:1 "$work/ctx-copy"
    fi
    timed "--no-cache" ours "$bin/isula-build" ctr-img build --no-cache "$work/ctx-copy"
done
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon/status")
echo "# build cache: COPY of the context, $rounds rounds, median seconds of the command (spread),"
echo "# the daemon's CPU seconds and the seconds until it was idle again, from the command's start"
echo "# (BuildKit's: Docker's client and dockerd, when visible here); ratios of the wait and until idle"
row "cold (empty cache)"
row "unchanged"
row "one file changed"
row "--no-cache"
ratio "one file changed" "cold (empty cache)" "one file changed / cold"
if [ -n "$bk" ]; then
    row "buildkit unchanged"
    row "buildkit one file changed"
    ratio "unchanged" "buildkit unchanged" "unchanged / buildkit unchanged"
    ratio "one file changed" "buildkit one file changed" "one changed / buildkit one changed"
fi
awk -v h="$hwm" 'BEGIN { printf "%-34s %8.1f MB\n", "peak daemon RSS (cache rounds)", h / 1024 }'

# Sharing through the registry: a second daemon with an empty store builds with
# --cache-from, beside that daemon pulling the image the build made; interleaved rounds.
if [ -n "$reg_host" ]; then
    "$bin/isula-build" ctr-img tag busybox:bench "$reg_host/busybox:bench" >/dev/null
    "$bin/isula-build" ctr-img push "$reg_host/busybox:bench" >/dev/null
    sed "s|^FROM busybox:bench|FROM $reg_host/busybox:bench|" "$work/ctx-copy/Dockerfile" > "$work/Dockerfile.reg"
    "$bin/isula-build" ctr-img build -f "$work/Dockerfile.reg" --tag "$reg_host/app:copy" \
        --cache-to "$reg_host/cache:copy" "$work/ctx-copy" >/dev/null
    "$bin/isula-build" ctr-img push "$reg_host/app:copy" >/dev/null
    sock2="unix://$work/isula_build2.sock"
    "$bin/isula-builder" --dataroot "$work/data2" --runroot "$work/run2" --host "$sock2" \
        --config-dir "$work/etc" 2>"$work/daemon2.log" &
    daemon2=$!
    for _ in $(seq 100); do ISULABUILD_HOST="$sock2" "$bin/isula-build" version >/dev/null 2>&1 && break; sleep 0.1; done
    empty2() {
        ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img rm -a >/dev/null 2>&1 || true
        ISULABUILD_HOST="$sock2" "$bin/isula-build" builder prune -a -f >/dev/null 2>&1 || true
    }
    echo 5 > "/proc/$daemon2/clear_refs"
    pull2() {
        empty2
        timed "second daemon: pull" ours2 env ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img pull "$reg_host/app:copy"
    }
    from2() {
        empty2
        timed "second daemon: --cache-from" ours2 env ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img build \
            -f "$work/Dockerfile.reg" --cache-from "$reg_host/cache:copy" "$work/ctx-copy"
    }
    # Which goes first alternates: on this VM the first of a pair is the faster one.
    for r in $(seq "$rounds"); do
        if [ $((r % 2)) = 1 ]; then pull2; from2; else from2; pull2; fi
    done
    hwm2=$(awk '/VmHWM/ {print $2}' "/proc/$daemon2/status")
    kill -TERM "$daemon2" 2>/dev/null || true
    wait "$daemon2" 2>/dev/null || true
    daemon2=""
    echo "# registry cache: a second daemon with an empty store, median seconds (spread), its CPU"
    echo "# seconds and the seconds until it was idle again (the pulled layers unpacked)"
    row "second daemon: pull"
    row "second daemon: --cache-from"
    ratio "second daemon: --cache-from" "second daemon: pull" "--cache-from / pull"
    awk -v h="$hwm2" 'BEGIN { printf "%-34s %8.1f MB\n", "peak second daemon RSS", h / 1024 }'
fi

fi  # cache

# Reuse: early cutoff by content (a stage that runs again and makes the same files: the
# rebuild, and whether the image ID is the first build's), beside BuildKit; and cache
# mounts through the registry (BuildKit cannot export them: ours alone).
if only reuse; then
bk=""
if [ -x /usr/bin/docker ] && docker info >/dev/null 2>&1; then
    bk=1
    "$bin/isula-build" ctr-img save busybox:bench -o "$work/base-reuse.tar" >/dev/null
    docker load -i "$work/base-reuse.tar" >/dev/null
fi
cat > "$work/Dockerfile.cutoff" <<'DF'
FROM busybox:bench AS build
ARG UNUSED=0
COPY app /src
RUN cp -a /src /out && echo $UNUSED > /elsewhere
FROM busybox:bench
COPY --from=build /out /app
RUN echo built > /built
DF
cutoff() {  # tool, UNUSED value, iidfile
    case "$1" in
    ours) CMD=("$bin/isula-build" ctr-img build -f "$work/Dockerfile.cutoff" --build-arg "UNUSED=$2" \
        --iidfile "$3" "$work/ctx-copy") ;;
    docker) CMD=(env DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -f "$work/Dockerfile.cutoff" \
        --build-arg "UNUSED=$2" --iidfile "$3" "$work/ctx-copy") ;;
    esac
}
tools=(ours)
[ -n "$bk" ] && tools+=(docker)
declare -A first_id same
for t in "${tools[@]}"; do
    rm -f "$work/iid-$t-0"
    cutoff "$t" 0 "$work/iid-$t-0"; must "${CMD[@]}"
    first_id[$t]=$(sed 's/^sha256://' "$work/iid-$t-0")
    same[$t]=0
done
for r in $(seq "$rounds"); do
    for ((i = 0; i < ${#tools[@]}; i++)); do
        t=${tools[$(((i + r) % ${#tools[@]}))]}
        rm -f "$work/iid-$t-$r"
        cutoff "$t" "$r" "$work/iid-$t-$r"
        timed "early cutoff: $t" "$t" "${CMD[@]}"
        [ "$(sed 's/^sha256://' "$work/iid-$t-$r")" = "${first_id[$t]}" ] && same[$t]=$((same[$t] + 1))
    done
done
echo "# early cutoff: a stage's ARG changes (its RUN runs again, copying the 20k-file context to the"
echo "# same files); the next stage's COPY --from is keyed by content; $rounds rounds, median seconds"
echo "# (spread), CPU and seconds until idle; how many rebuilds gave the first build's image ID"
row "early cutoff: ours"
printf '%-34s %s/%s\n' "  same image ID as the first" "${same[ours]}" "$rounds"
if [ -n "$bk" ]; then
    row "early cutoff: docker"
    printf '%-34s %s/%s\n' "  BuildKit: same image ID" "${same[docker]}" "$rounds"
    ratio "early cutoff: ours" "early cutoff: docker" "early cutoff / BuildKit"
fi

# Cache mounts: a RUN fills a 100 MB cache mount; exported with --cache-to --cache-mounts
# (beside the same export without them), then a fresh daemon seeds it with --cache-from
# --cache-mounts (beside the same build not seeding it: the RUN starts from nothing).
if [ -n "$reg_host" ]; then
    "$bin/isula-build" ctr-img tag busybox:bench "$reg_host/busybox:bench" >/dev/null
    "$bin/isula-build" ctr-img push "$reg_host/busybox:bench" >/dev/null
    mkdir -p "$work/ctx-mount"
    cat > "$work/ctx-mount/Dockerfile" <<DF
FROM $reg_host/busybox:bench
ARG R=0
RUN --mount=type=cache,id=bench-dl,target=/dl [ -e /dl/pkgs ] || dd if=/dev/urandom of=/dl/pkgs bs=1M count=100 2>/dev/null; echo \$R > /r
DF
    for r in $(seq "$rounds"); do
        timed "export without mounts" ours "$bin/isula-build" ctr-img build --build-arg "R=$r" \
            --cache-to "$reg_host/cache:plain" "$work/ctx-mount"
        timed "export with --cache-mounts" ours "$bin/isula-build" ctr-img build --build-arg "R=$r" \
            --cache-to "$reg_host/cache:mounts" --cache-mounts "$work/ctx-mount"
    done
    sock2="unix://$work/isula_build3.sock"
    "$bin/isula-builder" --dataroot "$work/data2" --runroot "$work/run2" --host "$sock2" \
        --config-dir "$work/etc" 2>"$work/daemon3.log" &
    daemon2=$!
    for _ in $(seq 100); do ISULABUILD_HOST="$sock2" "$bin/isula-build" version >/dev/null 2>&1 && break; sleep 0.1; done
    fresh2() {
        ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img rm -a >/dev/null 2>&1 || true
        ISULABUILD_HOST="$sock2" "$bin/isula-build" builder prune -a -f >/dev/null 2>&1 || true
    }
    for r in $(seq "$rounds"); do
        fresh2
        timed "fresh daemon, mount seeded" ours2 env ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img build \
            --build-arg "R=x$r" --cache-from "$reg_host/cache:mounts" --cache-mounts "$work/ctx-mount"
        fresh2
        timed "fresh daemon, mount empty" ours2 env ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img build \
            --build-arg "R=y$r" --cache-from "$reg_host/cache:plain" "$work/ctx-mount"
    done
    kill -TERM "$daemon2" 2>/dev/null || true
    wait "$daemon2" 2>/dev/null || true
    daemon2=""
    echo "# cache mounts through the registry (BuildKit cannot export them): a RUN that fills a 100 MB"
    echo "# cache mount when it is empty; $rounds rounds, median seconds (spread)"
    row "export without mounts"
    row "export with --cache-mounts"
    row "fresh daemon, mount seeded"
    row "fresh daemon, mount empty"
fi
fi  # reuse

# Remote builds over loopback with mutual TLS (a CA made here with openssl): the COPY build
# of the 20k-file context, sent over the connection the first time, unchanged, and with one
# file changed (the bytes the client says it sent), beside the same daemon's local cold
# build (its unix socket, the context read in place).
if only remote && command -v openssl >/dev/null 2>&1; then
    pki="$work/pki"
    mkdir -p "$pki"
    (
        cd "$pki"
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj /CN=bench-ca
        printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
        printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > client.ext
        for n in server client; do
            cn=$n; [ "$n" = server ] && cn=127.0.0.1
            openssl req -newkey rsa:2048 -nodes -keyout "$n.key" -out "$n.csr" -subj "/CN=$cn"
            openssl x509 -req -in "$n.csr" -CA ca.pem -CAkey ca.key -set_serial "$RANDOM" -days 2 \
                -extfile "$n.ext" -out "$n.pem"
        done
    ) >/dev/null 2>&1
    mkdir -p "$work/etc-remote"
    cp -a "$work/etc/." "$work/etc-remote/" 2>/dev/null || true
    printf '[roles]\nbuilder = ["client"]\n' > "$work/etc-remote/configuration.toml"
    chmod 600 "$work/etc-remote/configuration.toml"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    sock3="unix://$work/isula_build_remote.sock"
    "$bin/isula-builder" --dataroot "$work/data2" --runroot "$work/run2" --host "$sock3" \
        --host "tcp://127.0.0.1:$port" --tlsverify --tlscacert "$pki/ca.pem" --tlscert "$pki/server.pem" \
        --tlskey "$pki/server.key" --config-dir "$work/etc-remote" 2>"$work/daemon-remote.log" &
    daemon2=$!
    for _ in $(seq 100); do ISULABUILD_HOST="$sock3" "$bin/isula-build" version >/dev/null 2>&1 && break; sleep 0.1; done
    ISULABUILD_HOST="$sock3" "$bin/isula-build" ctr-img import "$work/base.tar" busybox:bench >/dev/null
    rb=("$bin/isula-build" --host "tcp://127.0.0.1:$port" --tlscacert "$pki/ca.pem" --tlscert "$pki/client.pem" --tlskey "$pki/client.key")
    reset_remote() {
        ISULABUILD_HOST="$sock3" "$bin/isula-build" builder prune -a -f >/dev/null 2>&1 || true
    }
    declare -A SENT
    # A remote build whose output (the bytes the client sent) goes to file $2.
    printf '#!/bin/sh\nexec %s ctr-img build "$1" > "$2"\n' "${rb[*]}" > "$work/rb.sh"
    chmod +x "$work/rb.sh"
    for r in $(seq "$rounds"); do
        reset_remote
        timed "local cold build (unix socket)" ours2 env ISULABUILD_HOST="$sock3" "$bin/isula-build" ctr-img build "$work/ctx-copy"
        reset_remote
        timed "remote cold build (context sent)" ours2 "${rb[@]}" ctr-img build "$work/ctx-copy"
        timed "remote unchanged rebuild" ours2 "${rb[@]}" ctr-img build "$work/ctx-copy"
        echo "remote $r" >> "$work/ctx-copy/app/d001/f00001.bin"
        # The wire: what the client says it sent for the one changed file.
        timed "remote, one file changed" ours2 "$work/rb.sh" "$work/ctx-copy" "$work/remote-$r.out"
        SENT[$r]=$(awk '/^Sent the build context:/ { print $9 }' "$work/remote-$r.out")
    done
    kill -TERM "$daemon2" 2>/dev/null || true
    wait "$daemon2" 2>/dev/null || true
    daemon2=""
    echo "# remote builds over loopback with mutual TLS: the COPY build of the context, $rounds rounds,"
    echo "# median seconds (spread), the daemon's CPU and seconds until idle"
    row "local cold build (unix socket)"
    row "remote cold build (context sent)"
    row "remote unchanged rebuild"
    row "remote, one file changed"
    ratio "remote cold build (context sent)" "local cold build (unix socket)" "remote cold / local cold"
    printf '%-34s %s\n' "bytes sent, one file changed" "${SENT[*]}"
fi  # remote

# Root against rootless: the COPY of the 20k-file context and the RUN writing 150 MB, each
# with --no-cache, by the root daemon, by a rootless daemon and by rootless daemonless
# commands, interleaved in ROUNDS rounds (the order rotates). The user is ROOTLESS_USER
# (default isula-bench): when it does not exist it is made (useradd -r, no home) with
# subordinate ranges after the highest in /etc/subuid and /etc/subgid, and removed at the
# end with its lines. A daemonless command starts its own builder, so its row includes that
# start (and its CPU is the command's own).
if only rootless; then
    ruser="${ROOTLESS_USER:-isula-bench}"
    made_user=""
    if ! id "$ruser" >/dev/null 2>&1; then
        useradd -r -M -s /bin/sh "$ruser"
        made_user=1
    fi
    for f in /etc/subuid /etc/subgid; do
        if ! grep -q "^$ruser:" "$f" 2>/dev/null; then
            next=$(awk -F: '{ e = $2 + $3; if (e > m) m = e } END { print (m > 100000 ? m : 100000) }' "$f" 2>/dev/null || echo 100000)
            echo "$ruser:$next:65536" >> "$f"
        fi
    done
    uhome="$work/rootless"
    mkdir -p "$uhome/run" "$uhome/data" "$uhome/conf" "$uhome/dl"
    chown -R "$ruser" "$uhome"
    chmod 700 "$uhome/run"
    chmod 755 "$work"
    chmod -R a+rX "$work/ctx-copy" "$work/ctx-run" "$work/base.tar"
    uenv="XDG_RUNTIME_DIR=$uhome/run XDG_DATA_HOME=$uhome/data XDG_CONFIG_HOME=$uhome/conf HOME=$uhome"
    as_user() { su "$ruser" -s /bin/sh -c "cd $uhome && env -u ISULABUILD_HOST -u ISULA_BUILD_HOST $uenv $*"; }
    as_user "$bin/isula-builder >$uhome/daemon.log 2>&1 & echo \$! > $uhome/pid"
    upid=$(cat "$uhome/pid")
    for _ in $(seq 100); do as_user "$bin/isula-build version" >/dev/null 2>&1 && break; sleep 0.1; done
    # The daemon proper is the child that entered the user namespace; its parent only waits.
    daemon3=$(pgrep -P "$upid" -n isula-builder || true)
    [ -n "$daemon3" ] || { echo "bench: the rootless daemon did not start:" >&2; cat "$uhome/daemon.log" >&2; exit 1; }
    must as_user "$bin/isula-build ctr-img import $work/base.tar busybox:bench"
    must as_user "$bin/isula-build --daemonless --dataroot $uhome/dl ctr-img import $work/base.tar busybox:bench"
    for r in $(seq "$rounds"); do
        for w in copy run; do
            order=(root rootless daemonless)
            for i in $(seq $(((r - 1) % 3))); do order=("${order[@]:1}" "${order[0]}"); done
            for who in "${order[@]}"; do
                case $who in
                root) timed "$w: root daemon" ours "$bin/isula-build" ctr-img build --no-cache "$work/ctx-$w" ;;
                rootless) timed "$w: rootless daemon" ours3 as_user "$bin/isula-build ctr-img build --no-cache $work/ctx-$w" ;;
                daemonless) timed "$w: rootless daemonless" self as_user "$bin/isula-build --daemonless --dataroot $uhome/dl ctr-img build --no-cache $work/ctx-$w" ;;
                esac
            done
        done
        # Untagged builds pile up: keep each store to its base between rounds.
        must "$bin/isula-build" ctr-img rm --prune
        must as_user "$bin/isula-build ctr-img rm --prune"
        must as_user "$bin/isula-build --daemonless --dataroot $uhome/dl ctr-img rm --prune"
    done
    kill -TERM "$upid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$upid" 2>/dev/null || break; sleep 0.1; done
    upid=""
    daemon3=""
    drop_user
    echo "# root, rootless daemon and rootless daemonless builds (--no-cache), $rounds interleaved rounds,"
    echo "# median seconds (spread), the daemon's CPU (daemonless: the command's) and seconds until idle"
    for w in copy run; do
        row "$w: root daemon"
        row "$w: rootless daemon"
        row "$w: rootless daemonless"
        ratio "$w: rootless daemon" "$w: root daemon" "$w: rootless / root"
        ratio "$w: rootless daemonless" "$w: root daemon" "$w: daemonless / root"
    done
fi  # rootless

if only main; then
# 100 builds at once (the manual's limit), each with a RUN.
for i in $(seq 1 100); do
    mkdir -p "$work/many/$i"
    printf 'FROM busybox:bench\nRUN echo %s > /n\n' "$i" > "$work/many/$i/Dockerfile"
done
sync
t0=$(date +%s.%N)
pids=()
for i in $(seq 1 100); do
    "$bin/isula-build" ctr-img build --tag "many:$i" "$work/many/$i" >/dev/null 2>"$work/many/$i/stderr" &
    pids+=($!)
done
failed=0 first=0 first_rc=0
for i in $(seq 1 100); do
    rc=0
    wait "${pids[$((i - 1))]}" || rc=$?
    if [ "$rc" != 0 ]; then
        failed=$((failed + 1))
        if [ "$first" = 0 ]; then first=$i first_rc=$rc; fi
    fi
done
t1=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon/status")
awk -v a="$t0" -v b="$t1" -v f="$failed" -v h="$hwm" \
    'BEGIN { printf "%-28s %10.2f %12s %14.1f  (%d failed)\n", "100 builds at once", b - a, "-", h / 1024, f }'
if [ "$failed" != 0 ]; then
    cp "$work/many/$first/stderr" "$work/stderr"
    run_failed "$first_rc" "100 builds at once, $failed failed, the first" \
        "$bin/isula-build" ctr-img build --tag "many:$first" "$work/many/$first"
fi
# A peer's build, timed once (timed: our daemon idle first), with its CPU (buildah's own and
# its children's; Docker's client and dockerd's, when visible).
peer_row() { printf '%-28s %10s %12s\n' "$1" "$(num "${T[$1]}")" "$(num "${CPU[$1]:-}")"; }

# The same builds by buildah, when installed (its own storage under the bench directory).
if command -v buildah >/dev/null 2>&1; then
    "$bin/isula-build" ctr-img save busybox:bench -o "$work/base-buildah.tar" >/dev/null
    bah=(buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver overlay)
    "${bah[@]}" pull -q "docker-archive:$work/base-buildah.tar" >/dev/null
    "${bah[@]}" tag "$("${bah[@]}" images -q | head -1)" localhost/busybox:bench >/dev/null 2>&1 || true
    for c in copy run small; do
        sed 's|^FROM busybox:bench|FROM localhost/busybox:bench|' "$work/ctx-$c/Dockerfile" > "$work/Dockerfile.buildah-$c"
        timed "buildah bud: ctx-$c" self "${bah[@]}" bud -q --network host --layers=false \
            -f "$work/Dockerfile.buildah-$c" -t "bench-$c" "$work/ctx-$c"
        peer_row "buildah bud: ctx-$c"
    done
    "${bah[@]}" rmi -a -f >/dev/null 2>&1 || true
fi

# The same builds by Docker's classic builder, when a Docker engine runs here.
if docker info >/dev/null 2>&1; then
    "$bin/isula-build" ctr-img save busybox:bench -o "$work/base-img.tar" >/dev/null
    docker load -i "$work/base-img.tar" >/dev/null
    for c in copy run small; do
        timed "docker build: ctx-$c" docker env DOCKER_BUILDKIT=0 docker build --network host -q \
            -t "isula-bench-$c:1" "$work/ctx-$c"
        peer_row "docker build: ctx-$c"
        docker rmi -f "isula-bench-$c:1" >/dev/null 2>&1 || true
    done
    # BuildKit (the 20.10 client of Debian's docker.io runs it without buildx): the COPY
    # build from an empty build cache, then again unchanged.
    if [ -x /usr/bin/docker ]; then
        DOCKER_BUILDKIT=1 /usr/bin/docker builder prune -af >/dev/null 2>&1 || true
        for run in cold cached; do
            timed "buildkit: COPY, $run" docker env DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q \
                -t isula-bench-bk:1 "$work/ctx-copy"
            peer_row "buildkit: COPY, $run"
        done
        docker rmi -f isula-bench-bk:1 >/dev/null 2>&1 || true
    fi
    docker rmi -f busybox:bench >/dev/null 2>&1 || true
fi
fi  # ONLY
