#!/usr/bin/env bash
# Makes the Debian base of the daemon image (contrib/image/Dockerfile): bookworm, minbase,
# with runc (RUN steps) and ca-certificates (registries over TLS), from Debian's package
# registry with debootstrap, as a tarball `ctr-img import` takes. Never pulled from an
# image registry. The tarball is kept (by default in /var/cache/isula-build-tests) and
# made again only when missing.
#   scripts/debian-base.sh [OUT.tar]      prints the tarball's path
set -euo pipefail
out="${1:-/var/cache/isula-build-tests/debian-bookworm-minbase.tar}"
mirror="${DEBIAN_MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\/\?\)$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
if [ ! -s "$out" ]; then
    command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    mkdir -p "$(dirname "$out")"
    root="$(mktemp -d)"
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include=runc,ca-certificates bookworm "$root" "$mirror" >"$root.log" 2>&1 ||
        { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    # What a container image does not carry: apt's lists and caches, logs of the install.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
        "$root"/var/log/*.log "$root"/dev/*
    tar --numeric-owner -C "$root" -cf "$out.tmp" .
    mv "$out.tmp" "$out"
fi
echo "$out"
