#!/usr/bin/env bash
# Installs what isula-build needs from Debian's packages (only what is missing).
#   scripts/deps.sh run    runc and busybox-static (the main job)
#   scripts/deps.sh test   also skopeo, umoci, docker.io, bzip2, docker-registry, apache2-utils
#                          (htpasswd), openssl, bsdutils (script), buildah, curl and e2fsprogs
#                          (mkfs.ext4 for a small data root), openssh-client (ssh-agent for
#                          --ssh) and git (the tests)
set -euo pipefail
want=(runc busybox-static xz-utils)
if [ "${1:-run}" = test ]; then
    want+=(skopeo umoci docker.io bzip2 docker-registry apache2-utils openssl bsdutils buildah curl e2fsprogs openssh-client git)
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
