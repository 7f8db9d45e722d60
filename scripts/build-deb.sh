#!/usr/bin/env bash
# Build a Debian package of vpool with dpkg-deb (no cargo-deb needed):
# /usr/bin/vpool, the systemd unit, /etc/vpool/vpool.toml as a conffile,
# the docs. See docs/service.md.
#
#   scripts/build-deb.sh                  release build, then the package
#   scripts/build-deb.sh --binary PATH    package PATH instead of building
#   scripts/build-deb.sh --out DIR        where the .deb goes (default target/debian)
#   scripts/build-deb.sh --compress none  dpkg-deb's -Z (default xz; tests use none)
#
# Prints the path of the .deb it made.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

binary=
out=target/debian
compress=xz
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=${2:?--binary needs a path}; shift 2 ;;
        --out) out=${2:?--out needs a directory}; shift 2 ;;
        --compress) compress=${2:?--compress needs a type}; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "build-deb: unknown argument $1" >&2; exit 2 ;;
    esac
done

if [ -z "$binary" ]; then
    cargo build --release --locked -p vpool >&2
    binary=target/release/vpool
fi
[ -x "$binary" ] || { echo "build-deb: $binary is not an executable" >&2; exit 1; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' crates/vpool/Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
chmod 755 "$root"
trap 'rm -rf "$root"' EXIT

install -D -m 755 "$binary" "$root/usr/bin/vpool"
strip --strip-debug "$root/usr/bin/vpool" 2>/dev/null || true
install -D -m 644 packaging/vpool.service "$root/lib/systemd/system/vpool.service"
install -D -m 644 packaging/vpool.toml "$root/etc/vpool/vpool.toml"
for doc in README.md docs/service.md docs/cli.md; do
    install -D -m 644 "$doc" "$root/usr/share/doc/vpool/$(basename "$doc")"
done

mkdir -p "$root/DEBIAN"
installed_kib=$(du -sk "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: vpool
Version: $version
Architecture: $arch
Maintainer: vpool developers <vpool@localhost>
Installed-Size: $installed_kib
Depends: libc6 (>= 2.36)
Recommends: qemu-utils
Suggests: libnbd-bin, qemu-system-x86
Section: admin
Priority: optional
Description: storage pools for virtual machine disks
 vpool serves thin, snapshotting volumes to QEMU, libvirt and NBD clients,
 from pools on local disks or on S3-compatible object storage shared by
 several hosts.
CONTROL
echo /etc/vpool/vpool.toml >"$root/DEBIAN/conffiles"

# Installing does not start the daemon (`systemctl enable --now vpool`
# does); upgrading restarts a running one; removing stops it. The home,
# /var/lib/vpool, is left alone.
cat >"$root/DEBIAN/postinst" <<'SCRIPT'
#!/bin/sh
set -e
# dpkg --root=DIR: not this system's services.
[ -z "${DPKG_ROOT:-}" ] || exit 0
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
    if [ -n "$2" ]; then
        systemctl try-restart vpool.service || true
    fi
fi
SCRIPT
cat >"$root/DEBIAN/prerm" <<'SCRIPT'
#!/bin/sh
set -e
[ -z "${DPKG_ROOT:-}" ] || exit 0
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop vpool.service || true
fi
SCRIPT
cat >"$root/DEBIAN/postrm" <<'SCRIPT'
#!/bin/sh
set -e
[ -z "${DPKG_ROOT:-}" ] || exit 0
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
SCRIPT
chmod 755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/vpool_${version}_${arch}.deb"
dpkg-deb --root-owner-group "-Z$compress" --build "$root" "$deb" >&2
echo "$deb"
