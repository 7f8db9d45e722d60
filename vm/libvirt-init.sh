#!/bin/busybox sh
# shellcheck shell=dash
# /init of the initramfs built by vm/libvirt.sh: the guest writes numbered
# 4 KiB records, each flushed (dd oflag=direct conv=fsync) before the next,
# alternately to /dev/vda and /dev/vdb (two vpool disks that libvirt
# attached from `vpool vol info --libvirt`), and prints
# `VPOOL-LV: n=N` after record N. A write that fails prints
# `VPOOL-LV: FAIL ...` and powers off: the daemon's restart under it must
# be a pause, not an error. Record N goes to disk N%2 at offset
# (N/2)*4096: `REC N` and the padding to 4 KiB.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do
    insmod "/lib/modules/$m" || echo "libvirt-init: insmod $m failed"
done < /lib/modules/order
i=0
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ]; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then
        echo "VPOOL-LV: FAIL (no /dev/vda and /dev/vdb after 30 s)"
        poweroff -f
    fi
    sleep 0.1
done
echo "VPOOL-LV: disks vda $(cat /sys/block/vda/size) vdb $(cat /sys/block/vdb/size) sectors"
n=0
while [ "$n" -lt 100000 ]; do
    disk=/dev/vda
    [ $((n % 2)) -eq 1 ] && disk=/dev/vdb
    if ! { printf 'REC %08d\n' "$n"; head -c 4083 /dev/zero; } |
        dd of="$disk" bs=4096 count=1 seek=$((n / 2)) oflag=direct conv=fsync,notrunc 2>/tmp/dd.err; then
        echo "VPOOL-LV: FAIL (record $n to $disk: $(cat /tmp/dd.err))"
        poweroff -f
    fi
    echo "VPOOL-LV: n=$n"
    n=$((n + 1))
    sleep 0.2
done
poweroff -f
