#!/bin/busybox sh
# shellcheck shell=dash
# /sbin/init of the root filesystem built by vm/boot-test.sh.
# The phase comes from the kernel command line: vpool_phase=write|verify.
# It prints one marker line that the host greps on the serial console:
#   VPOOL-BOOT-TEST: WRITE-DONE sha256=...
#   VPOOL-BOOT-TEST: PASS sha256=...
#   VPOOL-BOOT-TEST: FAIL (...)
export PATH=/bin:/sbin
# guest_mounts, kernel_arg, finish (flush, print the marker, power off).
# shellcheck source=vm/guest-lib.sh
. /lib/guest-lib.sh
guest_mounts

phase=$(kernel_arg vpool_phase '')

root_dev=$(awk '$2 == "/" && $1 != "rootfs" { print $1 }' /proc/mounts | tail -n 1)
echo "guest: root is $root_dev, phase=$phase"

case "$phase" in
write)
    rm -f /data/payload.bin /data/payload.sha256
    mkdir -p /data
    if ! dd if=/dev/urandom of=/data/payload.bin bs=1M count=8 2>/dev/null; then
        finish "VPOOL-BOOT-TEST: FAIL (dd)"
    fi
    (cd /data && sha256sum payload.bin > payload.sha256)
    sum=$(cut -d' ' -f1 /data/payload.sha256)
    finish "VPOOL-BOOT-TEST: WRITE-DONE sha256=$sum"
    ;;
verify)
    if [ ! -f /data/payload.sha256 ] || [ ! -f /data/payload.bin ]; then
        finish "VPOOL-BOOT-TEST: FAIL (payload missing after reboot)"
    fi
    sum=$(cut -d' ' -f1 /data/payload.sha256)
    size=$(stat -c %s /data/payload.bin)
    if [ "$size" != 8388608 ]; then
        finish "VPOOL-BOOT-TEST: FAIL (payload is $size bytes, want 8388608)"
    fi
    # Drop the page cache so the data is read back from the disk.
    echo 3 > /proc/sys/vm/drop_caches
    if (cd /data && sha256sum -c payload.sha256 >/dev/null 2>&1); then
        finish "VPOOL-BOOT-TEST: PASS sha256=$sum"
    else
        finish "VPOOL-BOOT-TEST: FAIL (checksum mismatch, want sha256=$sum)"
    fi
    ;;
*)
    finish "VPOOL-BOOT-TEST: FAIL (unknown phase '$phase')"
    ;;
esac
