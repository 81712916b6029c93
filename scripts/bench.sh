#!/usr/bin/env bash
# Benchmark: import, save, load, push and pull of a generated ~400 MB, 20,000-file image
# (about half compressible: ~230 MB gzipped), builds, printing
# seconds and the daemon's peak RSS for each step, so later work can be compared.
#   scripts/bench.sh            (needs root; MB=... FILES=... to change the size,
#                               ROUNDS=... for the rounds, ONLY=main|cache|peers for one part:
#                               peers = each workload beside buildah and BuildKit, interleaved,
#                               WORKLOADS="copy run load save push pull" to pick some;
#                               the scale rows: ONLY=peers MB=2500 FILES=100000 ROUNDS=1)
set -euo pipefail
cd "$(dirname "$0")/.."
only() { [ -z "${ONLY:-}" ] || [ "$ONLY" = "$1" ]; }
files="${FILES:-20000}"
mb="${MB:-400}"
cargo build --release --bins >/dev/null 2>&1
bin="$PWD/target/release"
work=$(mktemp -d /var/tmp/isula-bench.XXXXXX)
sock="unix://$work/isula_build.sock"
daemon=""
cleanup() {
    if [ -n "$daemon" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    if [ -n "$registry" ]; then kill "$registry" 2>/dev/null || true; wait "$registry" 2>/dev/null || true; fi
    rm -rf "$work"
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
registry=""
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

sync
printf '%-28s %10s %12s %14s\n' "step" "seconds" "daemon CPU s" "peak RSS (MB)"
cpu() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$daemon/stat"; }
# Waits (at most 60 s) until the daemon has used no CPU for 3 s.
settle() {
    local a b n=0
    while [ $n -lt 20 ]; do
        a=$(cpu); sleep 3; b=$(cpu)
        [ "$a" = "$b" ] && return 0
        n=$((n + 1))
    done
}
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
    local t0 t1 c0 c1 hwm lines
    lines=$(wc -l < "$work/daemon.log")
    c0=$(cpu)
    t0=$(date +%s.%N)
    "$bin/isula-build" "$@" >/dev/null
    t1=$(date +%s.%N)
    c1=$(cpu)
    hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon/status")
    awk -v n="$name" -v a="$t0" -v b="$t1" -v c="$c0" -v d="$c1" -v h="$hwm" \
        'BEGIN { printf "%-28s %10.2f %12.2f %14.1f\n", n, b - a, d - c, h / 1024 }'
    [ -n "${PHASES:-1}" ] && phases "$lines"
    return 0
}
size=$(du -m "$work/rootfs.tar" | cut -f1)
echo "# image: $files files, ${size} MB tar"
if only main; then
step "import (tar)" ctr-img import "$work/rootfs.tar" bench:1
if [ -n "$reg_host" ]; then
    # Right after the import, the push waits for the layer's gzip, which the daemon makes in
    # the background after every commit; the second push (to an emptied registry) finds it
    # ready and only sends it.
    "$bin/isula-build" ctr-img tag bench:1 "$reg_host/bench:1" >/dev/null
    step "push (right after import)" ctr-img push "$reg_host/bench:1"
    echo "# registry holds $(du -sm "$work/registry" | cut -f1) MB"
    rm -rf "${work:?}/registry/"*
    step "push (gzip ready)" ctr-img push "$reg_host/bench:1"
    step "rm" ctr-img rm -a
    step "pull (empty store)" ctr-img pull "$reg_host/bench:1"
    # Back to the imported image for the steps below.
    "$bin/isula-build" ctr-img rm -a >/dev/null
    "$bin/isula-build" ctr-img import "$work/rootfs.tar" bench:1 >/dev/null
fi
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
if only main; then
step "build: COPY 20k files" ctr-img build "$work/ctx-copy"
step "build: RUN writes 150 MB" ctr-img build "$work/ctx-run"
step "build: manual example" ctr-img build "$work/ctx-small"
# Idle: once the daemon's background gzip of the built layers is done, plus the idle
# trimmer's 5 s period.
settle
sleep 6
awk '/VmRSS/ { printf "%-28s %10s %12s %14.1f\n", "daemon RSS, idle", "-", "-", $2 / 1024 }' "/proc/$daemon/status"
fi  # ONLY

# The build cache, in rounds (ROUNDS, default 3) that interleave: the COPY build from an
# empty cache (builder prune --all: the first build of a context), unchanged, with one file
# changed, and with the cache bypassed (--no-cache), each beside BuildKit's build of the
# same context in the same state when a Docker engine runs here. Medians with the spread
# (min-max), and ratios; the daemon's peak RSS over them all.
rounds="${ROUNDS:-3}"
declare -A T PEAK
timed() {
    local name="$1"; shift
    sync
    local t0 t1
    t0=$(date +%s.%N)
    "$@" >/dev/null 2>&1 || echo "# $name failed" >&2
    t1=$(date +%s.%N)
    T[$name]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') "
}
median() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
spread() { tr ' ' '\n' <<<"$1" | grep . | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }'; }
row() { printf '%-34s %8.2f   (%s)\n' "$1" "$(median "${T[$1]}")" "$(spread "${T[$1]}")"; }
ratio() { awk -v a="$(median "${T[$1]}")" -v b="$(median "${T[$2]}")" -v n="$3" 'BEGIN { printf "%-34s %8.2f\n", n, a / b }'; }
# Each workload beside the peers installed here (buildah; Docker with BuildKit), in ROUNDS
# interleaved rounds (the order of the tools rotates each round): medians with the spread,
# and ours divided by the best peer. Every tool starts from the same state each time.
if only peers; then
    peer_docker=""
    if [ -x /usr/bin/docker ] && docker info >/dev/null 2>&1; then peer_docker=1; fi
    peer_buildah=""
    command -v buildah >/dev/null 2>&1 && peer_buildah=1
    bah=(buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver overlay)
    dk() { DOCKER_BUILDKIT=1 /usr/bin/docker "$@"; }
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
    # One workload: ours, then each peer, as named commands; "prep" commands reset state
    # untimed before each.
    workload() {
        local w="$1" r="$2"
        local tools=(ours)
        [ -n "$peer_buildah" ] && tools+=(buildah)
        [ -n "$peer_docker" ] && tools+=(docker)
        local n=${#tools[@]} i
        for ((i = 0; i < n; i++)); do
            local t=${tools[$(((i + r) % n))]}
            "prep_$w" "$t"
            sync
            local lines
            lines=$(wc -l < "$work/daemon.log")
            [ "$t" = ours ] && echo 5 > "/proc/$daemon/clear_refs"
            timed "$w: $t" "run_$w" "$t"
            # Our phases in this run (the idle-time work after it is not counted).
            [ "$t" = ours ] && phase_lines "$lines" >> "$work/phases-$w"
            if [ "$t" = ours ]; then
                local hwm
                hwm=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$daemon/status")
                [ "$hwm" -gt "${PEAK[$w]:-0}" ] && PEAK[$w]=$hwm
                # Our idle-time work (gzip, unpack of packed layers) is done before the next
                # tool runs: the peers get a quiet machine.
                settle
            fi
        done
    }
    # A build of ctx-$2 without cache, by tool $1.
    build_ctx() {
        case "$1" in
        ours) "$bin/isula-build" ctr-img build --no-cache "$work/ctx-$2" ;;
        buildah) "${bah[@]}" bud -q --network host --layers=false -f "$work/Dockerfile.buildah-$2" -t "bench-$2" "$work/ctx-$2" ;;
        docker) dk build --no-cache --network host -q -t "isula-bench-$2:1" "$work/ctx-$2" ;;
        esac
    }
    prep_copy() { :; }
    run_copy() { build_ctx "$1" copy; }
    prep_run() { :; }
    run_run() { build_ctx "$1" run; }
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
    run_load() {
        case "$1" in
        ours) "$bin/isula-build" ctr-img load -i "$work/peer-image.tar" ;;
        buildah) "${bah[@]}" pull -q "docker-archive:$work/peer-image.tar" ;;
        docker) dk load -i "$work/peer-image.tar" ;;
        esac
    }
    prep_save() { rm -f "$work/peer-save.tar"; }
    run_save() {
        case "$1" in
        ours) "$bin/isula-build" ctr-img save bench:1 -o "$work/peer-save.tar" ;;
        buildah) "${bah[@]}" push -q bench:1 "docker-archive:$work/peer-save.tar:bench:1" ;;
        docker) dk save -o "$work/peer-save.tar" bench:1 ;;
        esac
    }
    prep_push() { rm -rf "${work:?}/registry/"*; }
    run_push() {
        case "$1" in
        ours) "$bin/isula-build" ctr-img push "$reg_host/bench:1" ;;
        buildah) "${bah[@]}" push -q --tls-verify=false bench:1 "docker://$reg_host/bench:1" ;;
        docker) dk push "$reg_host/bench:1" ;;
        esac
    }
    prep_pull() { prep_load "$1"; }
    run_pull() {
        case "$1" in
        ours) "$bin/isula-build" ctr-img pull "$reg_host/bench:1" ;;
        buildah) "${bah[@]}" pull -q --tls-verify=false "docker://$reg_host/bench:1" ;;
        docker) dk pull -q "$reg_host/bench:1" ;;
        esac
    }
    loads=(copy run load save)
    [ -n "$reg_host" ] && loads+=(push pull)
    # WORKLOADS="copy push": only those (pull needs the registry, as push does).
    if [ -n "${WORKLOADS:-}" ]; then read -r -a loads <<<"$WORKLOADS"; fi
    # Every tool holds bench:1 (and its registry name) for save and push.
    run_load buildah >/dev/null 2>&1 || true
    [ -n "$peer_docker" ] && run_load docker >/dev/null 2>&1
    retag
    # Our idle-time work on bench:1 (its gzip) is done before the first timed run.
    settle
    for r in $(seq "$rounds"); do
        for w in "${loads[@]}"; do
            # The registry copy that pull reads is pushed (untimed) by ours.
            if [ "$w" = pull ]; then prep_push ours; run_push ours >/dev/null 2>&1; fi
            workload "$w" "$r"
            [ "$w" = load ] && retag
            # pull removed bench:1: every tool gets it back for the next round.
            if [ "$w" = pull ]; then
                for t in ours buildah docker; do
                    case "$t" in buildah) [ -n "$peer_buildah" ] || continue ;; docker) [ -n "$peer_docker" ] || continue ;; esac
                    prep_load "$t"; run_load "$t" >/dev/null 2>&1 || true
                done
                retag
            fi
        done
    done
    echo "# ours beside the peers: $rounds interleaved rounds, median seconds (spread); ours / best peer;"
    echo "# the daemon's peak RSS over its runs of each workload"
    printf '%-12s %18s %18s %18s %10s %10s\n' workload ours buildah docker "ours/best" "peak MB"
    for w in "${loads[@]}"; do
        cell() { if [ -n "${T[$w: $1]:-}" ]; then printf '%6.2f (%s)' "$(median "${T[$w: $1]}")" "$(spread "${T[$w: $1]}")"; else printf '%18s' -; fi; }
        best=$(for t in buildah docker; do [ -n "${T[$w: $t]:-}" ] && median "${T[$w: $t]}"; done | sort -n | head -1)
        ours=$(median "${T[$w: ours]}")
        printf '%-12s %18s %18s %18s %10s %10s\n' "$w" "$(cell ours)" "$(cell buildah)" "$(cell docker)" \
            "$([ -n "$best" ] && awk -v a="$ours" -v b="$best" 'BEGIN { printf "%.2f", a / b }' || echo -)" \
            "${PEAK[$w]:--}"
    done
    echo "# our phases, mean per run of each workload (seconds, times, MB)"
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
    DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -t isula-bench-bk:1 "$work/ctx-copy" >/dev/null 2>&1
fi
echo 5 > "/proc/$daemon/clear_refs"
for r in $(seq "$rounds"); do
    "$bin/isula-build" builder prune --all --force >/dev/null
    timed "cold (empty cache)" "$bin/isula-build" ctr-img build "$work/ctx-copy"
    timed "unchanged" "$bin/isula-build" ctr-img build "$work/ctx-copy"
    if [ -n "$bk" ]; then
        timed "buildkit unchanged" env DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -t isula-bench-bk:1 "$work/ctx-copy"
    fi
    echo "changed $r" >> "$work/ctx-copy/app/d000/f00000.bin"
    timed "one file changed" "$bin/isula-build" ctr-img build "$work/ctx-copy"
    if [ -n "$bk" ]; then
        timed "buildkit one file changed" env DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -t isula-bench-bk:1 "$work/ctx-copy"
    fi
    timed "--no-cache" "$bin/isula-build" ctr-img build --no-cache "$work/ctx-copy"
done
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon/status")
echo "# build cache: COPY of the context, $rounds rounds, median seconds (spread)"
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
        timed "second daemon: pull" env ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img pull "$reg_host/app:copy"
    }
    from2() {
        empty2
        timed "second daemon: --cache-from" env ISULABUILD_HOST="$sock2" "$bin/isula-build" ctr-img build \
            -f "$work/Dockerfile.reg" --cache-from "$reg_host/cache:copy" "$work/ctx-copy"
    }
    # Which goes first alternates: on this VM the first of a pair is the faster one.
    for r in $(seq "$rounds"); do
        if [ $((r % 2)) = 1 ]; then pull2; from2; else from2; pull2; fi
    done
    hwm2=$(awk '/VmHWM/ {print $2}' "/proc/$daemon2/status")
    kill -TERM "$daemon2" 2>/dev/null || true
    wait "$daemon2" 2>/dev/null || true
    echo "# registry cache: a second daemon with an empty store, median seconds (spread)"
    row "second daemon: pull"
    row "second daemon: --cache-from"
    ratio "second daemon: --cache-from" "second daemon: pull" "--cache-from / pull"
    awk -v h="$hwm2" 'BEGIN { printf "%-34s %8.1f MB\n", "peak second daemon RSS", h / 1024 }'
fi

fi  # cache

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
    "$bin/isula-build" ctr-img build --tag "many:$i" "$work/many/$i" >/dev/null 2>&1 &
    pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
t1=$(date +%s.%N)
hwm=$(awk '/VmHWM/ {print $2}' "/proc/$daemon/status")
awk -v a="$t0" -v b="$t1" -v f="$failed" -v h="$hwm" \
    'BEGIN { printf "%-28s %10.2f %12s %14.1f  (%d failed)\n", "100 builds at once", b - a, "-", h / 1024, f }'

# The same builds by buildah, when installed (its own storage under the bench directory).
if command -v buildah >/dev/null 2>&1; then
    "$bin/isula-build" ctr-img save busybox:bench -o "$work/base-buildah.tar" >/dev/null
    bah=(buildah --root "$work/buildah/root" --runroot "$work/buildah/run" --storage-driver overlay)
    "${bah[@]}" pull -q "docker-archive:$work/base-buildah.tar" >/dev/null
    "${bah[@]}" tag "$("${bah[@]}" images -q | head -1)" localhost/busybox:bench >/dev/null 2>&1 || true
    for c in copy run small; do
        sed 's|^FROM busybox:bench|FROM localhost/busybox:bench|' "$work/ctx-$c/Dockerfile" > "$work/Dockerfile.buildah-$c"
        sync
        t0=$(date +%s.%N)
        "${bah[@]}" bud -q --network host --layers=false -f "$work/Dockerfile.buildah-$c" -t "bench-$c" "$work/ctx-$c" >/dev/null 2>&1 \
            || echo "buildah build of ctx-$c failed"
        t1=$(date +%s.%N)
        awk -v n="buildah bud: ctx-$c" -v a="$t0" -v b="$t1" 'BEGIN { printf "%-28s %10.2f\n", n, b - a }'
    done
    "${bah[@]}" rmi -a -f >/dev/null 2>&1 || true
fi

# The same builds by Docker's classic builder, when a Docker engine runs here.
if docker info >/dev/null 2>&1; then
    "$bin/isula-build" ctr-img save busybox:bench -o "$work/base-img.tar" >/dev/null
    docker load -i "$work/base-img.tar" >/dev/null
    for c in copy run small; do
        sync
        t0=$(date +%s.%N)
        DOCKER_BUILDKIT=0 docker build --network host -q -t "isula-bench-$c:1" "$work/ctx-$c" >/dev/null 2>&1
        t1=$(date +%s.%N)
        awk -v n="docker build: ctx-$c" -v a="$t0" -v b="$t1" 'BEGIN { printf "%-28s %10.2f\n", n, b - a }'
        docker rmi -f "isula-bench-$c:1" >/dev/null 2>&1 || true
    done
    # BuildKit (the 20.10 client of Debian's docker.io runs it without buildx): the COPY
    # build from an empty build cache, then again unchanged.
    if [ -x /usr/bin/docker ]; then
        DOCKER_BUILDKIT=1 /usr/bin/docker builder prune -af >/dev/null 2>&1 || true
        for run in cold cached; do
            sync
            t0=$(date +%s.%N)
            DOCKER_BUILDKIT=1 /usr/bin/docker build --network host -q -t isula-bench-bk:1 "$work/ctx-copy" >/dev/null 2>&1
            t1=$(date +%s.%N)
            awk -v n="buildkit: COPY, $run" -v a="$t0" -v b="$t1" 'BEGIN { printf "%-28s %10.2f\n", n, b - a }'
        done
        docker rmi -f isula-bench-bk:1 >/dev/null 2>&1 || true
    fi
    docker rmi -f busybox:bench >/dev/null 2>&1 || true
fi
fi  # ONLY
