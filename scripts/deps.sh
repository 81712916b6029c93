#!/usr/bin/env bash
# Installs what isula-build needs from Debian's packages (only what is missing).
#   scripts/deps.sh run    runc and busybox-static (the main job)
#   scripts/deps.sh test   also skopeo, gnupg (signatures), umoci, docker.io, bzip2, docker-registry, apache2-utils
#                          (htpasswd), openssl, bsdutils (script), buildah, curl and e2fsprogs
#                          (mkfs.ext4 for a small data root), openssh-client (ssh-agent for
#                          --ssh), git, qemu-user-static and binfmt-support (RUN for other
#                          architectures), uidmap and passwd (newuidmap, useradd: the rootless
#                          tests), libcap2-bin and binutils (setcap, strip: the builder image
#                          of the unprivileged-container test, and the daemon image), rpm
#                          (rpmbuild for scripts/package.sh; rpm databases of the attest tests),
#                          db5.3-util (db_load: a Berkeley DB rpm database), faketime (a daemon
#                          on another day: the reproducible-build test), debootstrap (the daemon image's
#                          base), and Debian's arm64 busybox-static binary in
#                          /var/cache/isula-build-tests/ (the tests)
set -euo pipefail
want=(runc busybox-static xz-utils)
if [ "${1:-run}" = test ]; then
    want+=(skopeo gnupg umoci docker.io bzip2 docker-registry apache2-utils openssl bsdutils buildah curl e2fsprogs openssh-client git qemu-user-static binfmt-support uidmap passwd libcap2-bin binutils rpm debootstrap db5.3-util faketime)
fi
missing=()
for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if [ "${1:-run}" = test ]; then
    # QEMU's handlers, registered with the F flag, so foreign binaries run in RUN.
    if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
            echo "warning: binfmt_misc cannot be mounted here: the cross-platform tests will fail" >&2
    fi
    update-binfmts --enable >/dev/null 2>&1 || true
    # An arm64 busybox for the cross-platform tests: Debian's package, never committed.
    cache=/var/cache/isula-build-tests
    if [ ! -x "$cache/busybox-arm64" ]; then
        mkdir -p "$cache/deb"
        if ! dpkg --print-foreign-architectures | grep -qx arm64; then
            dpkg --add-architecture arm64
        fi
        apt-get update -qq
        (cd "$cache/deb" && apt-get download -qq busybox-static:arm64 2>/dev/null)
        rm -rf "$cache/deb/x"
        dpkg-deb -x "$cache"/deb/busybox-static_*_arm64.deb "$cache/deb/x"
        install -m 0755 "$cache/deb/x/bin/busybox" "$cache/busybox-arm64"
        rm -rf "$cache/deb"
    fi
fi
