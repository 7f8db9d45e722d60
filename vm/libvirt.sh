#!/usr/bin/env bash
# A libvirt domain whose disks are vpool volumes, attached with the XML that
# `vpool vol info --libvirt` prints, survives a restart of the vpool daemon.
#
#   A real libvirtd (Debian's, started by this script without systemd, in a
#   private mount namespace over its own /etc/libvirt, /run/libvirt and
#   /var/lib/libvirt, so the host's libvirt is not touched) defines and
#   starts a TCG domain (Linux, busybox initramfs) with two disks:
#     vda  `vpool vol info lv-a --libvirt --target vda`        (Unix socket)
#     vdb  `vpool vol info lv-b --libvirt --target vdb --tcp`  (TCP)
#   The guest (vm/libvirt-init.sh) writes numbered 4 KiB records, each
#   flushed before the next, alternately to vda and vdb, and prints
#   `VPOOL-LV: n=N` after each. Once it has written RECORDS_BEFORE records,
#   the host restarts `vpool serve` (SIGTERM, then a new daemon on the same
#   home and ports) under the running VM; the guest must go on (QEMU
#   reconnects, libvirt's <reconnect delay>) for RECORDS_AFTER more records
#   without an I/O error. scripts/install-deps.sh installs libvirt 11 from
#   bookworm-backports, which passes <reconnect> to QEMU. libvirt 9.0
#   (Debian 12's own) drops it: with that one the restart is not tried
#   under libvirt (QEMU would fail the requests in flight when its
#   connection goes) but under plain QEMU with the same guest and the
#   -blockdev nodes a newer libvirt makes of the printed XML
#   (reconnect-delay). Then the domain is destroyed and the host reads both
#   volumes back and checks every record the guest reported.
#
# Usage: vm/libvirt.sh [--vpool-bin PATH] [--workdir DIR] [--keep] [--timeout SECS]
# Needs root (libvirtd, mount namespaces), libvirt-daemon-system,
# libvirt-daemon-driver-qemu, libvirt-clients, qemu-system-x86
# (scripts/install-deps.sh installs them).
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_PROG=libvirt
# shellcheck source=vm/lib.sh
. "$VM_DIR/lib.sh"

vpool_bin=
vpool_profile=debug
workdir=
keep=0
boot_timeout=${VPOOL_VM_BOOT_TIMEOUT:-300}
records_before=8
records_after=8
mem=${VPOOL_VM_MEM:-192}

while [ $# -gt 0 ]; do
    if common_option "$@"; then shift "$opt_shift"; continue; fi
    case "$1" in
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "libvirt: unknown argument: $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || die "needs root (libvirtd, mount namespaces)"
need_tools qemu-system-x86_64 libvirtd virsh unshare cpio gzip timeout
find_busybox
find_vpool
need_vpool_cli

make_workdir vpool-lv
server_pid=
libvirtd_pid=
domain=vpool-lv-$$
virsh_() { virsh -q -c "qemu:///system?socket=$workdir/libvirt/run/libvirt-sock" "$@"; }
stop_server() { stop_process server_pid "vpool serve" "$workdir/server.log" "${1:-TERM}"; }
stop_all() {
    if [ -n "$libvirtd_pid" ]; then
        virsh_ destroy "$domain" >/dev/null 2>&1 || true
        virsh_ undefine "$domain" >/dev/null 2>&1 || true
    fi
    stop_server
    stop_process libvirtd_pid libvirtd "$workdir/libvirtd.log"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
t_start=$(now)

# ---------------------------------------------------------------- guest
vm_kernel_prepare
initramfs_start libvirt-init.sh tmp
initramfs_pack
log "kernel $kernel_pkg; initramfs built"

# ---------------------------------------------------------------- vpool
export VPOOL_HOME=$workdir/vpool-home
export VPOOL_CONFIG=/dev/null
mkdir -p "$VPOOL_HOME"
nbd_port=$(free_port)
start_server() {
    echo "=== start vpool serve ($(date -u +%T))" >>"$workdir/server.log"
    "$vpool_bin" serve --nbd-listen "127.0.0.1:$nbd_port" >>"$workdir/server.log" 2>&1 &
    server_pid=$!
    wait_alive server_pid "vpool serve" "$workdir/server.log" "its API" "$vpool_bin" vol list
}
start_server
"$vpool_bin" vol create lv-a --size 16M >/dev/null
"$vpool_bin" vol create lv-b --size 16M >/dev/null
disk_a=$("$vpool_bin" vol info lv-a --libvirt --target vda)
disk_b=$("$vpool_bin" vol info lv-b --libvirt --target vdb --tcp)
log "vpool serving lv-a (Unix socket) and lv-b (TCP 127.0.0.1:$nbd_port)"

# ---------------------------------------------------------------- libvirtd
lv=$workdir/libvirt
mkdir -p "$lv"/{etc,run,lib,log,cache}
cp -r /etc/libvirt/. "$lv/etc/"
# QEMU as root: the daemon's sockets are its owner's (docs/cli.md); no
# cgroups, namespaces or confinement in a test container; the console to
# a file rather than through virtlogd.
cat >"$lv/etc/qemu.conf" <<'EOF'
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
stdio_handler = "file"
cgroup_controllers = [ ]
namespaces = [ ]
security_driver = "none"
EOF
cat >"$lv/etc/libvirtd.conf" <<'EOF'
unix_sock_rw_perms = "0700"
auth_unix_rw = "none"
auth_unix_ro = "none"
EOF
mkdir -p /run/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
unshare --mount --propagation private bash -c '
    lv=$1
    mount --bind "$lv/etc" /etc/libvirt
    mount --bind "$lv/run" /run/libvirt
    mount --bind "$lv/lib" /var/lib/libvirt
    mount --bind "$lv/log" /var/log/libvirt
    mount --bind "$lv/cache" /var/cache/libvirt
    exec libvirtd' libvirtd "$lv" >"$workdir/libvirtd.log" 2>&1 &
libvirtd_pid=$!
wait_alive libvirtd_pid libvirtd "$workdir/libvirtd.log" "its socket" virsh_ version
log "libvirtd $(virsh_ version | awk '/library/ { print $NF; exit }') running"

# ---------------------------------------------------------------- domain
console=$workdir/console.log
cat >"$workdir/domain.xml" <<EOF
<domain type='qemu'>
  <name>$domain</name>
  <memory unit='MiB'>$mem</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>$kdir/vmlinuz</kernel>
    <initrd>$workdir/initramfs.cpio.gz</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet loglevel=4</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>$(command -v qemu-system-x86_64)</emulator>
$disk_a
$disk_b
    <serial type='file'>
      <source path='$console'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
virsh_ define "$workdir/domain.xml" >/dev/null || die "virsh define failed (domain: $workdir/domain.xml)"
virsh_ start "$domain" >/dev/null || { tail -n 20 "$lv/log/qemu/$domain.log" >&2 2>/dev/null; die "virsh start failed"; }
log "domain $domain started"

# last_record: the highest N of `VPOOL-LV: n=N` so far (-1 before any).
last_record() {
    local n
    n=$({ grep -a -o 'VPOOL-LV: n=[0-9]*' "$console" 2>/dev/null || true; } | tail -n 1 | sed 's/.*n=//')
    echo "${n:--1}"
}
# wait_records N DESC: until the guest reported record N; dies on FAIL, on
# the domain's end, or after the boot timeout.
wait_records() {
    local want=$1 t
    t=$(now)
    while [ "$(last_record)" -lt "$want" ]; do
        if grep -a -q 'VPOOL-LV: FAIL' "$console" 2>/dev/null; then
            grep -a 'VPOOL-LV' "$console" | tail -n 5 >&2
            die "the guest failed: $(grep -a -o 'VPOOL-LV: FAIL.*' "$console" | head -n 1)"
        fi
        virsh_ domstate "$domain" 2>/dev/null | grep -q running || {
            tail -n 20 "$console" >&2; die "the domain stopped while waiting for $2"; }
        if [ "$(awk -v a="$t" -v b="$(now)" 'BEGIN { print int(b - a) }')" -ge "$boot_timeout" ]; then
            tail -n 20 "$console" >&2; die "no $2 within $boot_timeout s"
        fi
        sleep 0.5
    done
}
wait_records $((records_before - 1)) "record $((records_before - 1))"
before=$(last_record)
# Later libvirt releases pass <reconnect delay> to QEMU (reconnect-delay);
# 9.0 (Debian 12) accepts the element and drops it, and then a daemon
# restart fails the guest's requests in flight: the restart is done under
# plain QEMU below instead.
if grep -q '"reconnect-delay"' "$lv/log/qemu/$domain.log"; then
    t=$(now)
    stop_server
    log "vpool serve stopped under the running VM at record $before"
    start_server
    log "vpool serve started again ($(elapsed "$t") s after the stop)"
    wait_records $((before + records_after)) "$records_after records after the restart"
    restarted=1
else
    log "libvirt $(virsh_ version | awk '/library/ { print $NF; exit }') drops <reconnect> (QEMU got no reconnect-delay): the daemon restart is not tried"
    wait_records $((before + records_after)) "$records_after more records"
    restarted=0
fi
last=$(last_record)
grep -a -q 'VPOOL-LV: FAIL' "$console" && die "the guest failed: $(grep -a -o 'VPOOL-LV: FAIL.*' "$console" | head -n 1)"
virsh_ destroy "$domain" >/dev/null
virsh_ undefine "$domain" >/dev/null
log "the guest wrote records 0..$last; domain destroyed"

# ---------------------------------------------------------------- check
# check_records LAST: records 0..LAST are on lv-a and lv-b.
check_records() {
    local n file got bad=0
    "$vpool_bin" vol export lv-a "$workdir/a.raw" --force >/dev/null
    "$vpool_bin" vol export lv-b "$workdir/b.raw" --force >/dev/null
    for ((n = 0; n <= $1; n++)); do
        file=$workdir/a.raw
        [ $((n % 2)) -eq 1 ] && file=$workdir/b.raw
        got=$(dd if="$file" bs=4096 skip=$((n / 2)) count=1 2>/dev/null | head -c 12)
        if [ "$got" != "$(printf 'REC %08d' "$n")" ]; then
            log "record $n: got '$got'"
            bad=$((bad + 1))
        fi
    done
    [ "$bad" -eq 0 ] || die "$bad of $(($1 + 1)) records missing or wrong on the volumes"
}
check_records "$last"

# ------------------------------------------- the restart under plain QEMU
# What libvirt releases that keep <reconnect delay='D'/>: -blockdev
# nbd with reconnect-delay=D. Tried here whatever the libvirt, so vpool's
# side of a restart (its shutdown, then the reconnection) is always tested.
if [ "$restarted" = 0 ]; then
    delay=$(grep -o "reconnect delay='[0-9]*'" <<<"$disk_a" | grep -o '[0-9]*')
    : >"$console"
    qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 1 -m "$mem" \
        -nographic -monitor none -serial "file:$console" -no-reboot -nic none \
        -kernel "$kdir/vmlinuz" -initrd "$workdir/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4" \
        -blockdev "{\"driver\":\"nbd\",\"node-name\":\"a\",\"server\":{\"type\":\"unix\",\"path\":\"$VPOOL_HOME/nbd.sock\"},\"export\":\"lv-a\",\"reconnect-delay\":$delay,\"cache\":{\"direct\":true}}" \
        -blockdev "{\"driver\":\"nbd\",\"node-name\":\"b\",\"server\":{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"$nbd_port\"},\"export\":\"lv-b\",\"reconnect-delay\":$delay,\"cache\":{\"direct\":true}}" \
        -device virtio-blk-pci,drive=a -device virtio-blk-pci,drive=b \
        </dev/null >"$workdir/qemu.log" 2>&1 &
    qemu_pid=$!
    domstate_ok() { kill -0 "$qemu_pid" 2>/dev/null; }
    # wait_records checks the domain through virsh: here through the pid.
    virsh_() { if [ "$1" = domstate ]; then domstate_ok && echo running; else command virsh -q -c "qemu:///system?socket=$workdir/libvirt/run/libvirt-sock" "$@"; fi; }
    wait_records $((records_before - 1)) "record $((records_before - 1)) under plain QEMU"
    before=$(last_record)
    t=$(now)
    stop_server
    log "vpool serve stopped under QEMU (reconnect-delay=$delay) at record $before"
    start_server
    log "vpool serve started again ($(elapsed "$t") s after the stop)"
    wait_records $((before + records_after)) "$records_after records after the restart"
    last=$(last_record)
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
    check_records "$last"
    log "the guest under plain QEMU went on through the restart: records $((before + 1))..$last after it"
    restarted=1
fi
if [ "$restarted" = 1 ]; then
    log "PASS: all $((last + 1)) records on lv-a and lv-b; $((last - before)) written after the daemon restart ($(elapsed "$t_start") s in all)"
else
    log "PASS: all $((last + 1)) records on lv-a and lv-b, through the printed XML ($(elapsed "$t_start") s in all)"
fi
