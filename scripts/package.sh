#!/usr/bin/env bash
# Makes the isula-build packages: a .deb (dpkg-deb) and an .rpm (rpmbuild; Debian's `rpm`
# package has it) holding the two binaries, the default configuration in /etc/isula-build
# (conffiles / %config(noreplace): an upgrade keeps what the administrator changed), the
# systemd unit, shell completions (bash, zsh, fish) and the `isula` group (made at install
# when missing; left on removal, as Debian's packages leave their system groups, since files
# may still belong to it).
#   scripts/package.sh [--no-build] [--bin-dir DIR] [--out DIR] [--fast] [deb] [rpm]
# --bin-dir takes the binaries from DIR (default: target/release, built first unless
# --no-build); --out is where the packages go (default: target/packages). Naming neither
# deb nor rpm makes both. --fast compresses with gzip -1 (the tests' debug binaries are
# hundreds of MB; xz takes minutes on them). Prints the path of each package made.
set -euo pipefail
cd "$(dirname "$0")/.."
build=1
bin_dir=""
out=""
kinds=()
fast=0
while [ $# -gt 0 ]; do
    case "$1" in
        --no-build) build=0 ;;
        --bin-dir) bin_dir="$2"; shift ;;
        --out) out="$2"; shift ;;
        --fast) fast=1 ;;
        deb|rpm) kinds+=("$1") ;;
        *) echo "scripts/package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
[ "${#kinds[@]}" -gt 0 ] || kinds=(deb rpm)
target="${CARGO_TARGET_DIR:-target}"
if [ -z "$bin_dir" ]; then
    bin_dir="$target/release"
    if [ "$build" = 1 ]; then
        cargo build --release -p isula-daemon -p isula-cli --bins
    fi
fi
out="${out:-$target/packages}"
for b in isula-builder isula-build; do
    [ -x "$bin_dir/$b" ] || { echo "scripts/package.sh: $bin_dir/$b is missing" >&2; exit 1; }
done
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
[ -n "$version" ] || { echo "scripts/package.sh: no version in Cargo.toml" >&2; exit 1; }
release=1
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The installed tree, shared by both formats (zsh's directory differs: see below).
stage() {
    local root="$1" zsh_dir="$2"
    install -d -m 0755 "$root/usr/bin" "$root/etc/isula-build" "$root/usr/lib/systemd/system" \
        "$root/usr/share/bash-completion/completions" "$root/$zsh_dir" \
        "$root/usr/share/fish/vendor_completions.d" "$root/usr/share/doc/isula-build"
    install -m 0755 "$bin_dir/isula-builder" "$bin_dir/isula-build" "$root/usr/bin/"
    for f in configuration.toml storage.toml registries.toml policy.json; do
        install -m 0600 "config/$f" "$root/etc/isula-build/$f"
    done
    install -m 0644 contrib/isula-build.service "$root/usr/lib/systemd/system/isula-build.service"
    "$bin_dir/isula-build" completion bash >"$root/usr/share/bash-completion/completions/isula-build"
    "$bin_dir/isula-build" completion zsh >"$root/$zsh_dir/_isula-build"
    "$bin_dir/isula-build" completion fish >"$root/usr/share/fish/vendor_completions.d/isula-build.fish"
    chmod 0644 "$root/usr/share/bash-completion/completions/isula-build" "$root/$zsh_dir/_isula-build" \
        "$root/usr/share/fish/vendor_completions.d/isula-build.fish"
    install -m 0644 README.md "$root/usr/share/doc/isula-build/README.md"
}

# What both formats run: the group before the files land, the unit known after.
make_group='getent group isula >/dev/null || groupadd --system isula'
systemd_reload='if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null 2>&1 || true; fi'
systemd_stop='if [ -d /run/systemd/system ]; then systemctl stop isula-build.service >/dev/null 2>&1 || true; fi'

make_deb() {
    local root="$work/deb"
    stage "$root" usr/share/zsh/vendor-completions
    local arch
    arch="$(dpkg --print-architecture)"
    install -d -m 0755 "$root/DEBIAN"
    cat >"$root/DEBIAN/control" <<EOF
Package: isula-build
Version: $version-$release
Architecture: $arch
Maintainer: isula-build (Rust) <isula-build@localhost>
Depends: libc6, runc
Section: admin
Priority: optional
Installed-Size: $(du -sk --exclude=DEBIAN "$root" | cut -f1)
Description: container image builder (isula-builder daemon and isula-build client)
 Builds OCI and Docker images from Dockerfiles, locally over a unix socket or
 remotely over mutual TLS.
EOF
    (cd "$root" && find etc -type f | sed 's|^|/|' | sort) >"$root/DEBIAN/conffiles"
    cat >"$root/DEBIAN/postinst" <<EOF
#!/bin/sh
set -e
if [ "\$1" = configure ]; then
    $make_group
    $systemd_reload
fi
exit 0
EOF
    cat >"$root/DEBIAN/prerm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ]; then
    $systemd_stop
fi
exit 0
EOF
    # The daemon writes its public key (made anew at each start) beside the configuration:
    # not a conffile, so removal takes it (only the conffiles stay) and purge the directory.
    cat >"$root/DEBIAN/postrm" <<EOF
#!/bin/sh
set -e
if [ "\$1" = remove ] || [ "\$1" = purge ]; then
    rm -f /etc/isula-build/isula-build.pub
fi
if [ "\$1" = purge ]; then
    rmdir /etc/isula-build 2>/dev/null || true
fi
$systemd_reload
exit 0
EOF
    chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
    local deb="$out/isula-build_${version}-${release}_${arch}.deb"
    local z=(-Zxz)
    [ "$fast" = 0 ] || z=(-Zgzip -z1)
    dpkg-deb --root-owner-group "${z[@]}" --build "$root" "$deb" >/dev/null
    echo "$deb"
}

make_rpm() {
    command -v rpmbuild >/dev/null || { echo "scripts/package.sh: rpmbuild is missing (apt-get install rpm)" >&2; exit 1; }
    local top="$work/rpm" root="$work/rpm-root"
    local arch
    arch="$(uname -m)"
    stage "$root" usr/share/zsh/site-functions
    install -d "$top/SPECS" "$top/RPMS" "$top/BUILD" "$top/BUILDROOT" "$top/SRPMS" "$top/SOURCES"
    cat >"$top/SPECS/isula-build.spec" <<EOF
%global debug_package %{nil}
%global __os_install_post %{nil}
%define _build_id_links none
Name: isula-build
Version: $version
Release: $release
Summary: container image builder (isula-builder daemon and isula-build client)
License: MulanPSL-2.0
BuildArch: $arch
Requires: runc
Requires(pre): shadow-utils
AutoReqProv: no

%description
Builds OCI and Docker images from Dockerfiles, locally over a unix socket or
remotely over mutual TLS.

%install
cp -a $root/. %{buildroot}/

%pre
$make_group

%post
$systemd_reload

%preun
if [ "\$1" = 0 ]; then
    $systemd_stop
fi

%postun
if [ "\$1" = 0 ]; then
    rm -f /etc/isula-build/isula-build.pub
fi
$systemd_reload

%files
%attr(0755,root,root) /usr/bin/isula-builder
%attr(0755,root,root) /usr/bin/isula-build
%dir %attr(0755,root,root) /etc/isula-build
%config(noreplace) %attr(0600,root,root) /etc/isula-build/configuration.toml
%config(noreplace) %attr(0600,root,root) /etc/isula-build/storage.toml
%config(noreplace) %attr(0600,root,root) /etc/isula-build/registries.toml
%config(noreplace) %attr(0600,root,root) /etc/isula-build/policy.json
%attr(0644,root,root) /usr/lib/systemd/system/isula-build.service
%attr(0644,root,root) /usr/share/bash-completion/completions/isula-build
%attr(0644,root,root) /usr/share/zsh/site-functions/_isula-build
%attr(0644,root,root) /usr/share/fish/vendor_completions.d/isula-build.fish
%doc /usr/share/doc/isula-build/README.md
EOF
    local z=()
    [ "$fast" = 0 ] || z=(--define "_binary_payload w1.gzdio")
    rpmbuild --quiet --nodeps -bb --define "_topdir $top" "${z[@]}" --target "$arch" \
        "$top/SPECS/isula-build.spec" >"$work/rpmbuild.log" 2>&1 ||
        { cat "$work/rpmbuild.log" >&2; exit 1; }
    local rpm="$out/isula-build-${version}-${release}.${arch}.rpm"
    cp "$top/RPMS/$arch/isula-build-${version}-${release}.${arch}.rpm" "$rpm"
    echo "$rpm"
}

for k in "${kinds[@]}"; do
    "make_$k"
done
