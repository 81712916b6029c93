#!/usr/bin/env bash
# The main job, offline, on a fresh machine: install runc and busybox-static, build,
# start isula-builder on a temporary data root and socket, import a busybox rootfs as an
# image, build the manual's example Dockerfile on it (RUN in runc), and list the images. Everything it creates is under one temp directory, removed at exit
# (KEEP=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "scripts/demo.sh must run as root (it installs packages and runs containers): sudo scripts/demo.sh" >&2
    exit 1
fi
command -v cargo >/dev/null || { echo "cargo is not on PATH: install a Rust toolchain (rustup) first" >&2; exit 1; }
scripts/deps.sh run
cargo build --release --bins
bin="$PWD/target/release"
work=$(mktemp -d /tmp/isula-demo.XXXXXX)
sock="unix://$work/isula_build.sock"
daemon=""
cleanup() {
    if [ -n "$daemon" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; fi
    if [ "${KEEP:-0}" != 1 ]; then rm -rf "$work"; else echo "kept $work"; fi
}
trap cleanup EXIT

# A busybox rootfs: Debian's static busybox with every applet linked.
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,tmp,root,proc,sys,dev}
cp /bin/busybox "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
tar --numeric-owner -C "$rootfs" -cJf "$work/busybox.tar.xz" .

# The shipped configuration, in a private config dir.
install -d -m 0755 "$work/etc"
install -m 0600 config/* "$work/etc/"

"$bin/isula-builder" --dataroot "$work/data" --runroot "$work/run" --host "$sock" \
    --config-dir "$work/etc" 2>"$work/daemon.log" &
daemon=$!
for _ in $(seq 100); do
    "$bin/isula-build" --host "$sock" version >/dev/null 2>&1 && break
    sleep 0.1
done
export ISULABUILD_HOST="$sock"
"$bin/isula-build" version
"$bin/isula-build" ctr-img import "$work/busybox.tar.xz" busybox:latest

# The manual's example, on the busybox base (no registry is reachable offline).
ctx="$work/context"
mkdir -p "$ctx"
echo "This is bar file" > "$ctx/bar.txt"
printf '%s\n' 'FROM busybox:latest' 'LABEL foo=bar' 'COPY ./* /home/dir1/' \
    'RUN ls /home/dir1 && cat /home/dir1/bar.txt' > "$ctx/dockerfile"
(cd "$ctx" && "$bin/isula-build" ctr-img build -f dockerfile --tag foo:latest .)
"$bin/isula-build" ctr-img images
"$bin/isula-build" info -H
