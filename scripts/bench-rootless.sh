#!/usr/bin/env bash
# Root daemon against rootless daemon against rootless daemonless: the same two builds
# (COPY of 20,000 files, RUN writing 150 MB), three runs each with --no-cache; prints each
# time and the median.
#   scripts/bench-rootless.sh USER    (USER exists and has ranges in /etc/subuid, /etc/subgid)
# Run as root after `cargo build --release --bins` (BIN=target/release by default).
set -euo pipefail
user=${1:?usage: $0 USER}
bin=$(realpath "${BIN:-target/release}")
work=$(mktemp -d /tmp/isula-bench-rootless-XXXXXX)
trap 'kill $rootpid 2>/dev/null || true; su "$user" -s /bin/sh -c "kill \$(cat $work/urun/upid) 2>/dev/null" || true; sleep 1; rm -rf "$work"' EXIT
chmod 755 "$work"
mkdir -p "$work/bb/bin" "$work/copy/files" "$work/run" "$work/urun"
cp /bin/busybox "$work/bb/bin/"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$work/bb/bin/$a"; done
tar --owner=0 --group=0 -C "$work/bb" -cf "$work/bb.tar" .
python3 - "$work/copy/files" <<'PY'
import os, sys
d = sys.argv[1]
for i in range(20000):
    sub = os.path.join(d, str(i % 100))
    os.makedirs(sub, exist_ok=True)
    with open(os.path.join(sub, f"f{i}"), "wb") as f:
        f.write(os.urandom(1024 + i % 4096))
PY
printf 'FROM bb\nCOPY files /files\n' > "$work/copy/Dockerfile"
mkdir -p "$work/runctx"
printf 'FROM bb\nRUN head -c 150000000 /dev/urandom > /big && sync\n' > "$work/runctx/Dockerfile"
chown -R "$user" "$work/urun"
chmod -R a+rX "$work"
median() { sort -n | sed -n 2p; }
time_it() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }

"$bin/isula-builder" --dataroot "$work/root/data" --runroot "$work/root/run" --config-dir "$work/root/etc" \
    --host "unix://$work/root.sock" >"$work/root.log" 2>&1 &
rootpid=$!
sleep 2
root_cli() { ISULABUILD_HOST="unix://$work/root.sock" ISULABUILD_KEY_FILE="$work/root/etc/isula-build.pub" "$bin/isula-build" "$@"; }
root_cli ctr-img import "$work/bb.tar" bb >/dev/null
as_user() { su "$user" -s /bin/sh -c "cd /tmp; XDG_RUNTIME_DIR=$work/urun XDG_DATA_HOME=$work/udata XDG_CONFIG_HOME=$work/uconf HOME=$work/urun $*"; }
mkdir -p "$work/udata" "$work/uconf"; chown "$user" "$work/udata" "$work/uconf"
as_user "$bin/isula-builder >$work/urun/log 2>&1 & echo \$! > $work/urun/upid"
sleep 3
as_user "$bin/isula-build ctr-img import $work/bb.tar bb" >/dev/null
for kind in copy runctx; do
    r=(); u=(); l=()
    for i in 1 2 3; do
        r+=("$(time_it root_cli ctr-img build --no-cache "$work/$kind")")
        u+=("$(time_it as_user "$bin/isula-build ctr-img build --no-cache $work/$kind")")
    done
    printf '%s root:     %s  median %s\n' "$kind" "${r[*]}" "$(printf '%s\n' "${r[@]}" | median)"
    printf '%s rootless: %s  median %s\n' "$kind" "${u[*]}" "$(printf '%s\n' "${u[@]}" | median)"
done
as_user "kill \$(cat $work/urun/upid)"; sleep 2
for kind in copy runctx; do
    l=()
    for i in 1 2 3; do
        l+=("$(time_it as_user "$bin/isula-build --daemonless ctr-img build --no-cache $work/$kind")")
    done
    printf '%s rootless daemonless: %s  median %s\n' "$kind" "${l[*]}" "$(printf '%s\n' "${l[@]}" | median)"
done
