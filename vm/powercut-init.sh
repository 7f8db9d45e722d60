#!/bin/busybox sh
# shellcheck shell=dash
# /init of the power-cut guest built by vm/powercut.sh. The whole guest is
# this initramfs (no switch_root): it loads the virtio modules, mounts the
# pool's ext4 filesystem from the virtio disk /dev/vda on /pool, brings up
# eth0 for QEMU user networking (10.0.2.15, the host forwards ports to it)
# and runs `vpool serve` on /pool/vpool with NBD on :10809 and the API on
# :7070 (bearer token /etc/vpool-token). The host drives the workload and
# kills QEMU: nothing here ever shuts down cleanly.
#
# Kernel command line: vpool_writeback=lazy|default. lazy turns off the
# kernel's background writeback and makes ext4 commit its journal only every
# 10 minutes, so that what vpool did not fsync is (nearly always) still only
# in the guest's page cache when the power goes; default leaves the kernel's settings
# (writeback of dirty pages after 30 s, ext4 commit every 5 s).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "POWERCUT-GUEST: FAIL ($*)"
    poweroff -f
}

writeback=default
read -r cmdline < /proc/cmdline
for arg in $cmdline; do
    case "$arg" in
        vpool_writeback=*) writeback=${arg#vpool_writeback=} ;;
    esac
done

while read -r m; do
    insmod "/lib/modules/$m" || echo "powercut-guest: insmod $m failed"
done < /lib/modules/order

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -le 300 ] || fail "no /dev/vda after 30 s"
    sleep 0.1
done

opts=rw
if [ "$writeback" = lazy ]; then
    echo 0 > /proc/sys/vm/dirty_writeback_centisecs
    echo 360000 > /proc/sys/vm/dirty_expire_centisecs
    echo 90 > /proc/sys/vm/dirty_ratio
    echo 80 > /proc/sys/vm/dirty_background_ratio
    opts=rw,commit=600
fi
mkdir -p /pool
# Mounting replays the ext4 journal left by the previous power cut.
mount -t ext4 -o "$opts" /dev/vda /pool || fail "cannot mount /dev/vda"
echo "powercut-guest: /dev/vda on /pool ($opts), writeback $writeback"

ip link set lo up
i=0
while ! ip link show eth0 >/dev/null 2>&1; do
    i=$((i + 1))
    [ "$i" -le 100 ] || fail "no eth0 after 10 s"
    sleep 0.1
done
ip addr add 10.0.2.15/24 dev eth0
ip link set eth0 up
ip route add default via 10.0.2.2

mkdir -p /tmp
export HOME=/tmp TMPDIR=/tmp VPOOL_HOME=/pool/vpool
echo "POWERCUT-GUEST: starting vpool serve"
# Through a pipe, so that its log has no terminal colours.
{
    vpool serve --nbd-listen 0.0.0.0:10809 --api-listen 0.0.0.0:7070 --api-token-file /etc/vpool-token
    echo "POWERCUT-GUEST: FAIL (vpool serve exited with status $?)"
} 2>&1 | cat
# Nothing to do without the daemon; the host sees it and gives up.
sleep 3600
