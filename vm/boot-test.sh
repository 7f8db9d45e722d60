#!/usr/bin/env bash
# Boot a real Linux VM whose root disk is served over NBD, twice:
#   boot 1 writes 8 MiB of random data plus its sha256 to the root fs, syncs,
#          and powers off;
#   (the NBD server is restarted, so the data must have been persisted)
#   boot 2 checks the data against the checksum and prints PASS or FAIL.
# The script also reads the volume back from the host over NBD and checks the
# file with debugfs, so the server is verified independently of the guest.
#
# Usage: vm/boot-test.sh [--server vpool|qemu-nbd] [options]   (see --help)
# Exit status: 0 only if boot 2 printed PASS and the host-side check agreed;
# non-zero (with the reason) on any failure.
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_PROG=boot-test
# shellcheck source=vm/lib.sh
. "$VM_DIR/lib.sh"

server=vpool
vpool_bin=
vpool_profile=debug
workdir=
keep=0
restart_server=1
restart_signal=TERM
boot_timeout=${VPOOL_VM_BOOT_TIMEOUT:-600}
mem=${VPOOL_VM_MEM:-256}
vol=root
move_to=

usage() {
    cat <<EOF
Usage: vm/boot-test.sh [options]

Boots Linux (Debian's cloud kernel) under qemu-system-x86_64 (TCG) with its
root disk on an NBD export served from a unix socket, writes a file on boot 1,
checks it on boot 2. Exits 0 only on PASS.

Options:
  --server vpool|qemu-nbd  NBD server to test (default: vpool).
                           vpool:    VPOOL_HOME=DIR vpool vol import $vol rootfs.img
                                     VPOOL_HOME=DIR vpool serve  (socket DIR/nbd.sock)
                           qemu-nbd: qemu-nbd --persistent -f raw --socket SOCK -x $vol rootfs.img
  --vpool-bin PATH         vpool binary to use (default: build it with cargo,
                           dev profile, and use target/debug/vpool)
  --release                build and use the release vpool binary instead
  --workdir DIR            keep all files (images, logs) in DIR (default: a temp dir)
  --keep                   do not delete the temp work dir at the end
  --no-restart-server      keep one server process for both boots
  --kill-server            restart the server between the boots with SIGKILL
                           instead of SIGTERM: what the guest flushed must
                           survive a crash of the server process
  --move-to POOL           (vpool) during boot 1, move the root volume into a
                           new local pool POOL with `vpool vol move` (slowed
                           to 1 MB/s so that it spans the guest's writes);
                           boot 2 and the host check use POOL/$vol
  --timeout SECS           limit for each boot (default: $boot_timeout)
  -h, --help               this text

Environment:
  VPOOL_VM_CACHE           kernel cache (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/vpool-vm)
  VPOOL_VM_KERNEL_PKG      Debian kernel package (default: the one
                           linux-image-cloud-amd64 depends on, or the newest cached)
  VPOOL_VM_MEM             guest memory in MiB (default: 256)

Needs: qemu-system-x86_64, qemu-img, busybox (busybox-static), cpio, gzip,
mkfs.ext4 and debugfs (e2fsprogs), apt-get and dpkg-deb for the first run.
scripts/install-deps.sh installs them.
EOF
}

while [ $# -gt 0 ]; do
    if common_option "$@"; then shift "$opt_shift"; continue; fi
    case "$1" in
        --server) server=${2:?--server needs a value}; shift 2 ;;
        --server=*) server=${1#*=}; shift ;;
        --release) vpool_profile=release; shift ;;
        --no-restart-server) restart_server=0; shift ;;
        --kill-server) restart_signal=KILL; shift ;;
        --move-to) move_to=${2:?--move-to needs a pool name}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "boot-test: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
if [ -n "$move_to" ] && [ "$server" != vpool ]; then
    echo "boot-test: --move-to needs --server vpool" >&2; exit 2
fi
case "$server" in
    vpool|qemu-nbd) ;;
    *) echo "boot-test: --server must be vpool or qemu-nbd, not '$server'" >&2; exit 2 ;;
esac

need_tools qemu-system-x86_64 qemu-img cpio gzip mkfs.ext4 debugfs sha256sum timeout
find_busybox
if [ "$server" = qemu-nbd ]; then
    command -v qemu-nbd >/dev/null 2>&1 || die "qemu-nbd not found (apt-get install qemu-utils)"
fi

# ---------------------------------------------------------------- work dir
make_workdir vpool-vm
server_pid=
# stop_server [SIGNAL]: TERM (default) and wait up to 20 s, then KILL.
stop_server() { stop_process server_pid "$server" "$workdir/server.log" "${1:-TERM}"; }
stop_all() { stop_server; }
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$(now)

# ---------------------------------------------------------------- kernel
vm_kernel_prepare
log "kernel $kernel_pkg, modules: $(tr '\n' ' ' < "$kdir/modules/order")"

# ---------------------------------------------------------------- initramfs
t=$(now)
initramfs_start initramfs-init.sh newroot
initramfs_pack

# ---------------------------------------------------------------- root fs
build_rootfs guest-init.sh 64
log "initramfs and 64 MiB ext4 root fs built ($(elapsed "$t") s)"

# ---------------------------------------------------------------- server
# vpool: `vpool serve` is the daemon (API on $VPOOL_HOME/api.sock, NBD on
# $VPOOL_HOME/nbd.sock, every volume an export of its name); `vpool vol
# import` is a client of the running daemon.
sock=
nbd_url() { printf 'nbd+unix:///%s?socket=%s' "$vol" "$sock"; }
# wait_for DESC CMD...: until CMD succeeds, while the server lives, 60 s max.
wait_for() { wait_alive server_pid "$server" "$workdir/server.log" "$@"; }
start_server() {
    echo "=== start $server ($(date -u +%T))" >>"$workdir/server.log"
    case "$server" in
        qemu-nbd)
            sock=$workdir/nbd.sock
            rm -f "$sock"
            qemu-nbd --persistent -f raw --socket "$sock" -x "$vol" "$workdir/rootfs.img" \
                >>"$workdir/server.log" 2>&1 &
            server_pid=$!
            ;;
        vpool)
            sock=$VPOOL_HOME/nbd.sock
            "$vpool_bin" serve >>"$workdir/server.log" 2>&1 &
            server_pid=$!
            wait_for "API (vpool vol list)" "$vpool_bin" vol list
            ;;
    esac
}
# A sleep-free check that the export answers (after an import, for vpool).
wait_export() { wait_for "NBD export '$vol' on $sock" qemu-img info -f raw "$(nbd_url)"; }

if [ "$server" = vpool ]; then
    find_vpool
    need_vpool_cli
    export VPOOL_HOME=$workdir/vpool-home
    rm -rf "$VPOOL_HOME"
    mkdir -p "$VPOOL_HOME"
    start_server
    t=$(now)
    "$vpool_bin" vol import "$vol" "$workdir/rootfs.img" >>"$workdir/server.log" 2>&1 || {
        tail -n 20 "$workdir/server.log" >&2; die "vpool vol import $vol failed"; }
    log "imported rootfs.img as vpool volume '$vol' ($(elapsed "$t") s)"
    # The guest must see the volume, not the original file.
    mv "$workdir/rootfs.img" "$workdir/rootfs.orig.img"
    wait_daemon_socket server_pid "vpool serve" "$workdir/server.log" "$sock"
else
    start_server
fi
wait_export
log "$server serving export '$vol' on $sock"

# ---------------------------------------------------------------- boots
boot() {
    local phase=$1 console=$workdir/console-$1.log t rc=0
    rm -f "$console"
    t=$(now)
    timeout --foreground -k 10 "$boot_timeout" qemu-system-x86_64 \
        -accel tcg -machine q35 -cpu max -smp 1 -m "$mem" \
        -nographic -monitor none -serial "file:$console" -no-reboot \
        -kernel "$kdir/vmlinuz" -initrd "$workdir/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 vpool_phase=$phase" \
        -drive "file=nbd+unix:///$vol?socket=$sock,format=raw,if=virtio,cache=none" \
        -nic none </dev/null >"$workdir/qemu-$phase.log" 2>&1 || rc=$?
    boot_secs=$(elapsed "$t")
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        tail -n 30 "$console" >&2 2>/dev/null || true
        die "boot '$phase' timed out after $boot_timeout s (console: $console)"
    fi
    if [ $rc -ne 0 ]; then
        cat "$workdir/qemu-$phase.log" >&2
        tail -n 30 "$console" >&2 2>/dev/null || true
        die "qemu-system-x86_64 exited with status $rc in boot '$phase'"
    fi
    marker=$(grep -a -o 'VPOOL-BOOT-TEST: .*' "$console" | tr -d '\r' | tail -n 1 || true)
    log "boot '$phase' took $boot_secs s: ${marker:-no marker}"
}

mover_pid=
if [ -n "$move_to" ]; then
    "$vpool_bin" pool create "$move_to" >>"$workdir/server.log" 2>&1 ||
        die "vpool pool create $move_to failed"
    # Once the guest runs: the move mirrors its writes (at 8 MB/s, about a
    # second for the root fs's data), then switches its connection to the
    # new pool while it runs on.
    ( sleep 0.5; "$vpool_bin" vol move "$vol" "$move_to" --max-rate 8M && date +%s.%N ) \
        >"$workdir/move.log" 2>&1 &
    mover_pid=$!
fi
boot write
if [ -n "$mover_pid" ]; then
    booted_at=$(date +%s.%N)
    if ! wait "$mover_pid"; then
        cat "$workdir/move.log" >&2
        die "vpool vol move $vol $move_to failed"
    fi
    moved_at=$(tail -n 1 "$workdir/move.log")
    when=after
    if awk -v m="$moved_at" -v b="$booted_at" 'BEGIN { exit !(m < b) }'; then when=before; fi
    log "moved '$vol' into pool $move_to during boot 1 (the switch came $when the guest powered off): $(tail -n 2 "$workdir/move.log" | head -n 1)"
    vol=$move_to/$vol
fi
case "$marker" in
    "VPOOL-BOOT-TEST: WRITE-DONE sha256="*) want=${marker##*sha256=} ;;
    *) tail -n 40 "$workdir/console-write.log" >&2; die "boot 1 did not write the payload" ;;
esac
boot1_secs=$boot_secs

if [ "$restart_server" = 1 ]; then
    stop_server "$restart_signal"
    start_server
    wait_export
    log "$server restarted (after SIG$restart_signal)"
fi

boot verify
boot2_secs=$boot_secs
case "$marker" in
    "VPOOL-BOOT-TEST: PASS sha256=$want") ;;
    *) tail -n 40 "$workdir/console-verify.log" >&2; die "boot 2 did not verify the payload" ;;
esac

# ---------------------------------------------------------------- host check
# Read the whole volume back over NBD and check the file with debugfs.
qemu-img convert -f raw -O raw "nbd+unix:///$vol?socket=$sock" "$workdir/readback.img" ||
    die "qemu-img could not read the export back"
debugfs -R "dump /data/payload.bin $workdir/payload.bin" "$workdir/readback.img" >/dev/null 2>&1 ||
    die "debugfs could not find /data/payload.bin in the exported volume"
got=$(sha256sum "$workdir/payload.bin" | cut -d' ' -f1)
[ "$got" = "$want" ] || die "host read-back sha256 $got != guest's $want"
rm -f "$workdir/readback.img" "$workdir/payload.bin"
log "host read-back over NBD matches sha256=$want"

stop_server
log "PASS with --server $server: boot 1 ${boot1_secs} s, boot 2 ${boot2_secs} s, total $(elapsed "$t_start") s"
