#!/usr/bin/env bash
# Builds the daemon image (contrib/image/Dockerfile) with isula-build: the Debian base from
# scripts/debian-base.sh imported as debian-base:bookworm when the daemon lacks it, the
# binaries (stripped) and config/ staged as the build context.
#   scripts/daemon-image.sh [--unprivileged] [--bin-dir DIR] [--tag NAME:TAG] [--save PATH]
# --unprivileged builds contrib/image/Dockerfile.unprivileged instead (the image of
# daemonless, rootless builds in a container without privileges; tag
# isula-build-unprivileged:VERSION).
# The client's usual environment says which daemon builds it (ISULABUILD_HOST, --host via
# ISULA_BUILD_HOST...). --save also writes a docker-archive (for `docker load`).
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir="${CARGO_TARGET_DIR:-target}/release"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
tag=""
save=""
dockerfile=contrib/image/Dockerfile
while [ $# -gt 0 ]; do
    case "$1" in
        --unprivileged) dockerfile=contrib/image/Dockerfile.unprivileged ;;
        --bin-dir) bin_dir="$2"; shift ;;
        --tag) tag="$2"; shift ;;
        --save) save="$2"; shift ;;
        *) echo "scripts/daemon-image.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
if [ -z "$tag" ]; then
    case "$dockerfile" in
        *.unprivileged) tag="isula-build-unprivileged:$version" ;;
        *) tag="isula-build:$version" ;;
    esac
fi
client="$bin_dir/isula-build"
[ -x "$client" ] && [ -x "$bin_dir/isula-builder" ] || { echo "scripts/daemon-image.sh: no binaries in $bin_dir" >&2; exit 1; }
if ! "$client" ctr-img images 2>/dev/null | grep -q '^debian-base *bookworm '; then
    base="$(scripts/debian-base.sh)"
    "$client" ctr-img import "$base" debian-base:bookworm >/dev/null
fi
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
for b in isula-builder isula-build; do
    strip -o "$ctx/$b" "$bin_dir/$b"
done
mkdir -p "$ctx/config"
install -m 0600 config/configuration.toml config/storage.toml config/registries.toml config/policy.json "$ctx/config/"
cp "$dockerfile" "$ctx/Dockerfile"
args=(ctr-img build -t "$tag")
[ -z "$save" ] || args+=(-o "docker-archive:$save:$tag")
"$client" "${args[@]}" "$ctx"
