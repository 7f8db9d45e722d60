#!/usr/bin/env bash
# Install everything vpool's tests need on a Debian 12 machine. Idempotent:
# checks first, runs `apt-get update` only when a package is missing, and
# prints nothing when everything is already there. Exits non-zero, with the
# installer's output, if something cannot be installed.
#
#   scripts/install-deps.sh        install what is missing
#   scripts/install-deps.sh -v     say what is checked and installed
#
# Debian packages (checked by the commands they provide):
#   fio; libnbd-bin (nbdinfo nbdcopy nbdfuse); python3-libnbd (nbdsh);
#   nbdkit; qemu-system-x86 (qemu-system-x86_64); qemu-utils (qemu-img
#   qemu-io qemu-nbd); busybox-static; cpio; e2fsprogs (mkfs.ext4 debugfs);
#   curl; gzip; systemd (systemd-analyze); libvirt-daemon-system,
#   libvirt-daemon-driver-qemu, libvirt-clients (libvirtd, virsh) from
#   bookworm-backports (libvirt 11: Debian 12's 9.0 drops a disk's
#   <reconnect>); and for the Ceph micro-cluster of scripts/ceph.sh (S3 tests,
#   bench/rbd.sh): ceph-mon, ceph-mgr, ceph-osd, radosgw, ceph-common (ceph
#   rbd rados radosgw-admin monmaptool ceph-authtool), python3.
# Note: Debian 12's qemu-system-x86 is QEMU 7.2; installing it removes a
# newer (backported) qemu-utils, so qemu-utils 7.2 is installed after it.
# QEMU 10's qemu-utils (bookworm-backports) is unpacked beside it, under
# /opt/vpool-test/qemu10 (not installed: the two cannot be), for the tests
# that try what vpool prints with both QEMU versions.
# Rust: rustfmt and clippy (rustup component add), cargo-fuzz (cargo install).
set -euo pipefail

verbose=0
case "${1:-}" in
    -v|--verbose) verbose=1 ;;
    "") ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument $1" >&2; exit 2 ;;
esac

say() { [ "$verbose" = 0 ] || printf 'install-deps: %s\n' "$*"; }
log=$(mktemp "${TMPDIR:-/tmp}/install-deps.XXXXXX.log")
trap 'rm -f "$log"' EXIT
fail() {
    printf 'install-deps: FAILED: %s\n' "$1" >&2
    if [ -s "$log" ]; then
        echo "install-deps: last lines of the installer's output:" >&2
        tail -n 40 "$log" | sed 's/^/    /' >&2
    fi
    exit 1
}
# Run a command, its output into the log (shown on failure, or with -v).
run() {
    say "+ $*"
    if [ "$verbose" = 1 ]; then
        "$@" 2>&1 | tee -a "$log"
        return "${PIPESTATUS[0]}"
    fi
    "$@" >>"$log" 2>&1
}

have() { command -v "$1" >/dev/null 2>&1; }
installed=()

# ------------------------------------------------------------------ Debian
sudo=()
if [ "$(id -u)" != 0 ]; then
    have sudo || { echo "install-deps: not root and no sudo" >&2; exit 1; }
    sudo=(sudo -n)
fi
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=600
          -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

static_busybox() {
    local b
    for b in /bin/busybox /usr/bin/busybox; do
        if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then return 0; fi
    done
    return 1
}
python3_libnbd() {
    # nbdsh is python3-libnbd's; the module must import in Debian's python3.
    have nbdsh && /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1
}

# package -> check that passes when it is usable
missing_pkgs() {
    local m=()
    have fio || m+=(fio)
    { have nbdinfo && have nbdcopy && have nbdfuse; } || m+=(libnbd-bin)
    python3_libnbd || m+=(python3-libnbd)
    have nbdkit || m+=(nbdkit)
    have qemu-system-x86_64 || m+=(qemu-system-x86)
    { have qemu-img && have qemu-io && have qemu-nbd; } || m+=(qemu-utils)
    static_busybox || m+=(busybox-static)
    have cpio || m+=(cpio)
    { have mkfs.ext4 && have debugfs; } || m+=(e2fsprogs)
    have curl || m+=(curl)
    have gzip || m+=(gzip)
    # systemd-analyze checks the unit file packaging/vpool.service.
    have systemd-analyze || m+=(systemd)
    # vm/libvirt.sh: a real libvirtd (its package makes the libvirt-qemu
    # user the QEMU driver needs) and virsh: bookworm-backports' (libvirt
    # 11; 9.0 drops <reconnect>, see libvirt_new), installed below.
    # The metrics test parses GET /metrics with Prometheus' own parser.
    /usr/bin/python3 -c 'import prometheus_client' >/dev/null 2>&1 || m+=(python3-prometheus-client)
    # The Ceph micro-cluster's packages: scripts/ceph.sh keeps the list.
    local ceph_pkgs
    read -r -a ceph_pkgs <<<"$("$(dirname "${BASH_SOURCE[0]}")/ceph.sh" missing-packages)"
    m+=("${ceph_pkgs[@]}")
    echo "${m[@]}"
}

# libvirt 10 or later: Debian 12's 9.0 accepts <reconnect> in a disk and
# drops it, so a daemon restart under a libvirt VM could not be tested.
libvirt_new() {
    have libvirtd && have virsh && id libvirt-qemu >/dev/null 2>&1 &&
        [ "$(libvirtd --version 2>/dev/null | awk '{ split($NF, v, "."); print v[1] }')" -ge 10 ] 2>/dev/null
}
libvirt_pkgs=(libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
bpo_list=/etc/apt/sources.list.d/vpool-bookworm-backports.list

read -r -a missing <<<"$(missing_pkgs)"
if [ ${#missing[@]} -gt 0 ]; then
    say "missing Debian packages: ${missing[*]}"
    have apt-get || fail "apt-get not found; install by hand: ${missing[*]}"
    # A source that cannot be reached makes update complain; the install
    # below is what decides.
    run "${sudo[@]}" apt-get update -q || say "apt-get update reported errors (continuing)"
    # qemu-system-x86 first, on its own: on a machine with a newer
    # qemu-utils it removes that, and qemu-utils 7.2 is installed next.
    if [[ " ${missing[*]} " == *" qemu-system-x86 "* ]]; then
        run "${sudo[@]}" apt-get install "${apt_opts[@]}" qemu-system-x86 ||
            fail "apt-get install qemu-system-x86"
        installed+=(qemu-system-x86)
        read -r -a missing <<<"$(missing_pkgs)"
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        run "${sudo[@]}" apt-get install "${apt_opts[@]}" "${missing[@]}" ||
            fail "apt-get install ${missing[*]}"
        installed+=("${missing[@]}")
    fi
    read -r -a still <<<"$(missing_pkgs)"
    [ ${#still[@]} -eq 0 ] || fail "still missing after apt-get install: ${still[*]}"
fi

# ------------------------------------------------- libvirt from backports
# bookworm-backports is added as a source (its packages are only ever
# installed when asked for by name with -t), then libvirt 11 from it.
if ! libvirt_new; then
    say "installing libvirt from bookworm-backports: ${libvirt_pkgs[*]}"
    if [ ! -f "$bpo_list" ]; then
        echo "deb http://deb.debian.org/debian bookworm-backports main" |
            run "${sudo[@]}" tee "$bpo_list"
    fi
    run "${sudo[@]}" apt-get update -q || say "apt-get update reported errors (continuing)"
    run "${sudo[@]}" apt-get install "${apt_opts[@]}" -t bookworm-backports "${libvirt_pkgs[@]}" ||
        fail "apt-get install -t bookworm-backports ${libvirt_pkgs[*]}"
    libvirt_new || fail "libvirt from bookworm-backports is not 10 or later"
    installed+=("${libvirt_pkgs[@]}")
fi

# ------------------------------------------------- QEMU 10's qemu-img, aside
# Fetched with a private apt state (lists and archives under
# /var/cache/vpool-test/bpo), so the machine's sources stay as they are.
qemu10_root=/opt/vpool-test/qemu10
qemu10_ok() { "$qemu10_root/usr/bin/qemu-img" --version 2>/dev/null | grep -q '^qemu-img version 10\.'; }
if ! qemu10_ok; then
    say "unpacking QEMU 10's qemu-utils from bookworm-backports into $qemu10_root"
    state=/var/cache/vpool-test/bpo
    run "${sudo[@]}" mkdir -p "$state/lists/partial" "$state/archives/partial" "$qemu10_root"
    echo "deb http://deb.debian.org/debian bookworm-backports main" |
        run "${sudo[@]}" tee "$state/sources.list"
    bpo=(-o "Dir::Etc::SourceList=$state/sources.list" -o Dir::Etc::SourceParts=/dev/null
         -o "Dir::State::Lists=$state/lists")
    run "${sudo[@]}" apt-get "${bpo[@]}" update -q || fail "apt-get update of bookworm-backports"
    (cd "$state/archives" && run "${sudo[@]}" apt-get "${bpo[@]}" download \
        qemu-utils/bookworm-backports) || fail "downloading qemu-utils from bookworm-backports"
    deb=$(ls -t "$state"/archives/qemu-utils_*bpo12*_amd64.deb 2>/dev/null | head -n 1)
    [ -n "$deb" ] || fail "no bookworm-backports qemu-utils package was downloaded"
    run "${sudo[@]}" dpkg-deb -x "$deb" "$qemu10_root" || fail "unpacking $deb"
    qemu10_ok || fail "$qemu10_root/usr/bin/qemu-img is not QEMU 10"
    installed+=(qemu-utils-10-aside)
fi

# ------------------------------------------------------------------ Rust
have cargo || fail "cargo not found (the machine's Rust toolchain is missing)"
for comp in rustfmt:fmt clippy:clippy; do
    name=${comp%%:*} sub=${comp##*:}
    if ! cargo "$sub" --version >/dev/null 2>&1; then
        have rustup || fail "cargo $sub is missing and there is no rustup to add $name"
        run rustup component add "$name" || fail "rustup component add $name"
        cargo "$sub" --version >/dev/null 2>&1 || fail "cargo $sub still does not work"
        installed+=("$name")
    fi
done
if ! cargo fuzz --version >/dev/null 2>&1; then
    run cargo install cargo-fuzz --locked --version '^0.13' || fail "cargo install cargo-fuzz"
    cargo fuzz --version >/dev/null 2>&1 || fail "cargo fuzz still does not work"
    installed+=(cargo-fuzz)
fi

if [ ${#installed[@]} -gt 0 ]; then
    echo "install-deps: installed ${installed[*]}"
fi
say "all dependencies present"
