# shellcheck shell=bash disable=SC2034,SC2154
# Host-side code shared by the VM tests vm/boot-test.sh, vm/migrate.sh and
# vm/powercut.sh. Sourced (after `set -euo pipefail`) with VM_PROG set to the
# script's name for messages and VM_DIR to this directory; it sources
# vm/kernel.sh (vm_kernel_prepare) and sets REPO, and the kernel cache
# settings `cache` and `kernel_pkg` from VPOOL_VM_CACHE / VPOOL_VM_KERNEL_PKG.
#
# What it holds:
#   log, die, now, elapsed     messages with the "$VM_PROG: " prefix, timing
#   common_option              the options all three take (--vpool-bin ...)
#   need_tools, find_busybox   the tools a test needs; a static busybox
#   make_workdir, cleanup      the work dir (temp or --workdir, kept on
#                              failure or --keep); the EXIT trap's body, which
#                              first calls the script's own stop_all
#   find_vpool, need_vpool_cli the vpool binary: --vpool-bin, or built with
#                              cargo for $vpool_profile
#   stop_process, wait_alive,  a daemon the host runs (by the name of its pid
#   wait_daemon_socket         variable): stop it, wait for it while it lives
#   initramfs_start/_pack      the busybox initramfs: init, kernel modules
#   build_rootfs               the busybox ext4 root fs, with vm/guest-lib.sh
#   free_port                  a free TCP port on 127.0.0.1

REPO=$(cd "$VM_DIR/.." && pwd)
cache=${VPOOL_VM_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/vpool-vm}
kernel_pkg=${VPOOL_VM_KERNEL_PKG:-}
# shellcheck source=vm/kernel.sh
. "$VM_DIR/kernel.sh"

log() { printf '%s: %s\n' "$VM_PROG" "$*"; }
die() { printf '%s: FAIL: %s\n' "$VM_PROG" "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# common_option ARG...: takes the options every test has, if $1 is one:
# --vpool-bin PATH, --workdir DIR, --keep, --timeout SECS (boot_timeout);
# sets opt_shift to the number of arguments it took. 1 if $1 is another.
common_option() {
    opt_shift=2
    case "$1" in
        --vpool-bin) vpool_bin=${2:?--vpool-bin needs a value} ;;
        --workdir) workdir=${2:?--workdir needs a value} ;;
        --timeout) boot_timeout=${2:?--timeout needs a value} ;;
        --keep) keep=1; opt_shift=1 ;;
        *) return 1 ;;
    esac
}

# need_tools TOOL...: die unless every TOOL is on PATH.
need_tools() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found (run scripts/install-deps.sh)"
    done
}

# find_busybox: sets busybox to a statically linked busybox, or dies.
find_busybox() {
    local b
    busybox=
    for b in /bin/busybox /usr/bin/busybox; do
        if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then busybox=$b; break; fi
    done
    [ -n "$busybox" ] || die "no static busybox found (apt-get install busybox-static)"
}

# make_workdir NAME: workdir (--workdir, made absolute) or a new temp dir
# TMPDIR/NAME.XXXXXX, removed at exit on success unless keep=1.
make_workdir() {
    if [ -z "$workdir" ]; then
        workdir=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
        [ "$keep" = 1 ] || cleanup_workdir=1
    else
        mkdir -p "$workdir"
        workdir=$(cd "$workdir" && pwd)
    fi
}

# cleanup: the EXIT trap (`trap cleanup EXIT`). Calls the script's stop_all
# (its processes), removes a half-fetched kernel, and the work dir if it is a
# temp dir and the script succeeded; says where it is if it failed.
cleanup() {
    local rc=$?
    stop_all
    [ -z "${fetch_tmp:-}" ] || rm -rf "$fetch_tmp"
    if [ "${cleanup_workdir:-0}" = 1 ] && [ $rc -eq 0 ]; then
        rm -rf "$workdir"
    elif [ $rc -ne 0 ]; then
        echo "$VM_PROG: logs and images kept in $workdir" >&2
    fi
    exit $rc
}

# find_vpool: vpool_bin as given, or built with cargo (profile
# $vpool_profile: debug or release); dies unless it is executable; makes the
# path absolute.
find_vpool() {
    local t profile_flag=() target_dir
    if [ -z "$vpool_bin" ]; then
        t=$(now)
        log "building vpool ($vpool_profile)"
        [ "$vpool_profile" = release ] && profile_flag=(--release)
        (cd "$REPO" && cargo build -q -p vpool --bin vpool "${profile_flag[@]}") ||
            die "cargo build -p vpool failed"
        target_dir=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
            sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
        vpool_bin=${target_dir:-$REPO/target}/$vpool_profile/vpool
        log "vpool built ($(elapsed "$t") s)"
    fi
    [ -x "$vpool_bin" ] || die "vpool binary $vpool_bin not found"
    vpool_bin=$(cd "$(dirname "$vpool_bin")" && pwd)/$(basename "$vpool_bin")
}

# need_vpool_cli: die unless vpool_bin has the `serve` and `vol` commands.
need_vpool_cli() {
    local help
    help=$("$vpool_bin" --help 2>&1 || true)
    if ! grep -qw serve <<<"$help" || ! grep -qw vol <<<"$help"; then
        die "$vpool_bin has no 'serve'/'vol' commands (vpool --help says: $(head -n 3 <<<"$help" | tr '\n' ' '))"
    fi
}

# A daemon the host runs is named by the variable that holds its pid (empty
# when it does not run), e.g. server_pid or 'server_pid[A]', with NAME for
# messages and LOG, its log file.

# stop_process PIDVAR NAME LOG [SIGNAL]: send SIGNAL (default TERM) and wait
# up to 20 s, then KILL; empties PIDVAR.
stop_process() {
    local -n stop_pid_ref=$1
    local name=$2 plog=$3 sig=${4:-TERM} i=0 rc=0 pid=${stop_pid_ref:-}
    [ -n "$pid" ] || return 0
    # stderr off for the whole block: bash reports a child killed by a signal
    # ("Killed") when it reaps it, which may happen during the polling.
    {
        kill "-$sig" "$pid" || true
        while kill -0 "$pid" && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
        if kill -0 "$pid"; then
            log "warning: $name did not exit within 20 s of SIG$sig; killing it"
            kill -KILL "$pid" || true
        fi
        wait "$pid" || rc=$?
    } 2>/dev/null
    if [ "$sig" = TERM ] && [ $rc -ne 0 ]; then
        log "warning: $name exited with status $rc after SIGTERM (log: $plog)"
    fi
    stop_pid_ref=
}

# wait_alive PIDVAR NAME LOG DESC CMD...: until CMD succeeds (its output
# discarded), 60 s at most; dies (with the tail of LOG) if the daemon exits
# first, after reaping it and emptying PIDVAR.
wait_alive() {
    local -n wait_pid_ref=$1
    local name=$2 plog=$3 desc=$4 i=0
    shift 4
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$wait_pid_ref" 2>/dev/null; then
            wait "$wait_pid_ref" 2>/dev/null || true
            wait_pid_ref=
            tail -n 20 "$plog" >&2
            die "$name exited while waiting for $desc (log: $plog)"
        fi
        i=$((i + 1))
        if [ $i -ge 600 ]; then
            tail -n 20 "$plog" >&2
            die "$name: no $desc after 60 s (log: $plog)"
        fi
        sleep 0.1
    done
}

# wait_daemon_socket PIDVAR NAME LOG SOCK: until the daemon has made the unix socket
# SOCK, 30 s at most.
wait_daemon_socket() {
    local -n sock_pid_ref=$1
    local i=0
    while [ ! -S "$4" ]; do
        kill -0 "$sock_pid_ref" 2>/dev/null || wait_alive "$1" "$2" "$3" "$(basename "$4")" false
        i=$((i + 1))
        [ $i -lt 300 ] || die "$2 created no $4 within 30 s"
        sleep 0.1
    done
}

# initramfs_start INIT [DIR...]: a new initramfs tree in $workdir/initramfs
# (ird): static busybox as /bin/busybox and /bin/sh, vm/INIT as /init, the
# kernel's modules and their load order in /lib/modules, empty directories
# /dev /proc /sys and DIR...
initramfs_start() {
    local init=$1 d
    shift
    ird=$workdir/initramfs
    rm -rf "$ird"
    mkdir -p "$ird"/{bin,dev,proc,sys,lib/modules}
    for d in "$@"; do mkdir -p "$ird/$d"; done
    cp "$busybox" "$ird/bin/busybox"
    ln -s busybox "$ird/bin/sh"
    cp "$VM_DIR/$init" "$ird/init"
    chmod 755 "$ird/init"
    cp "$kdir"/modules/*.ko "$ird/lib/modules/" 2>/dev/null || true
    cp "$kdir/modules/order" "$ird/lib/modules/order"
}

# initramfs_pack: $ird as $workdir/initramfs.cpio.gz.
initramfs_pack() {
    (cd "$ird" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$workdir/initramfs.cpio.gz"
}

# build_rootfs INIT MIB: $workdir/rootfs.img, a MIB MiB ext4 filesystem
# (label vpoolroot) made from $workdir/rootdir: busybox with a link for each
# applet in /bin, vm/INIT as /sbin/init, vm/guest-lib.sh (which it sources)
# as /lib/guest-lib.sh, empty /dev /proc /sys /tmp /data /etc.
build_rootfs() {
    local init=$1 mib=$2 rfd=$workdir/rootdir applet
    rm -rf "$rfd"
    mkdir -p "$rfd"/{bin,sbin,lib,dev,proc,sys,tmp,data,etc}
    cp "$busybox" "$rfd/bin/busybox"
    for applet in $("$busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$rfd/bin/$applet"
    done
    cp "$VM_DIR/$init" "$rfd/sbin/init"
    chmod 755 "$rfd/sbin/init"
    cp "$VM_DIR/guest-lib.sh" "$rfd/lib/guest-lib.sh"
    rm -f "$workdir/rootfs.img"
    truncate -s "${mib}M" "$workdir/rootfs.img"
    mkfs.ext4 -q -F -L vpoolroot -d "$rfd" "$workdir/rootfs.img" >/dev/null
}

# free_port: a TCP port on 127.0.0.1 that is free now (python3, or $py).
free_port() {
    "${py:-python3}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
