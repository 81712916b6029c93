#!/usr/bin/env bash
# Installs isula-build from this checkout: the two binaries, the default configuration
# (existing files are kept) and the systemd unit. DESTDIR installs into a staging root.
#   scripts/install.sh [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
dest="${DESTDIR:-}"
if [ "${1:-}" != "--no-build" ]; then
    cargo build --release --bins
fi
install -d -m 0755 "$dest/usr/bin" "$dest/etc/isula-build" "$dest/usr/lib/systemd/system"
install -m 0755 target/release/isula-builder target/release/isula-build "$dest/usr/bin/"
for f in configuration.toml storage.toml registries.toml policy.json; do
    if [ ! -e "$dest/etc/isula-build/$f" ]; then
        install -m 0600 "config/$f" "$dest/etc/isula-build/$f"
    fi
done
install -m 0644 contrib/isula-build.service "$dest/usr/lib/systemd/system/isula-build.service"
if [ -z "$dest" ] && ! getent group isula >/dev/null; then
    groupadd --system isula || true
fi
echo "installed isula-build into ${dest:-/}"
