# shellcheck shell=dash
# Shared by the /sbin/init scripts of the root filesystems the VM tests
# build (vm/guest-init.sh for vm/boot-test.sh, vm/migrate-init.sh for
# vm/migrate.sh): build_rootfs in vm/lib.sh copies it to /lib/guest-lib.sh,
# and they source it from there (busybox sh, PATH=/bin:/sbin).

# guest_mounts: /proc, /sys and /dev (devtmpfs).
guest_mounts() {
    mount -t proc proc /proc 2>/dev/null
    mount -t sysfs sysfs /sys 2>/dev/null
    mount -t devtmpfs devtmpfs /dev 2>/dev/null
}

# kernel_arg NAME DEFAULT: the value of the last NAME=VALUE on the kernel
# command line, or DEFAULT.
kernel_arg() {
    local value="$2" arg cmdline
    read -r cmdline < /proc/cmdline
    for arg in $cmdline; do
        case "$arg" in
            "$1"=*) value=${arg#"$1"=} ;;
        esac
    done
    echo "$value"
}

# finish LINE: flush the filesystem to the NBD server, print LINE (the
# marker the host greps on the console) and power off before the VM
# disappears.
finish() {
    sync
    mount -o remount,ro / || echo "guest: remount ro failed"
    sync
    echo "$1"
    sync
    poweroff -f
}
