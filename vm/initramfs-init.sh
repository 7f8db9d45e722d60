#!/bin/busybox sh
# shellcheck shell=dash
# /init of the initramfs built by vm/boot-test.sh.
# Loads the virtio modules the Debian cloud kernel builds as modules,
# mounts /dev/vda (ext4 is built in) and switch_roots into it.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

echo "initramfs: loading modules"
# /lib/modules/order lists the .ko files, dependencies first.
while read -r m; do
    insmod "/lib/modules/$m" || echo "initramfs: insmod $m failed"
done < /lib/modules/order

i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then
        echo "VPOOL-BOOT-TEST: FAIL (no /dev/vda after 30 s)"
        poweroff -f
    fi
    sleep 0.1
done

mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
    echo "VPOOL-BOOT-TEST: FAIL (cannot mount /dev/vda)"
    poweroff -f
fi
echo "initramfs: /dev/vda mounted, switching root"
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
