#!/bin/busybox sh
# shellcheck shell=dash
# /sbin/init of the root filesystem built by vm/migrate.sh: a writer that
# keeps going while the host live-migrates the VM between QEMU processes.
#
# It writes numbered 4 KiB records into /data/seq.bin, one at a time, each
# with `dd conv=notrunc,fsync` (so each is flushed to the NBD server before
# the next one starts), and keeps an exact copy of the file in RAM (/tmp is
# a tmpfs; RAM travels with the migration). The file has SLOTS slots
# (vpool_mig_slots=N on the kernel command line, default 1024): record n
# goes to slot (n-1) mod SLOTS, so once it wraps around every record
# overwrites an older one, and a stale block would show.
#
# A record: a 128-byte header line `VPOOLREC <n> <sha256 of the body>`
# (padded with spaces, ending in a newline), then 3968 random bytes.
#
# Lines on the serial console (ttyS0) that the host greps:
#   VPOOL-MIG: WRITING slots=S        the writer started
#   VPOOL-MIG: SYNCED n=N             record N is written and fsync'ed
#   VPOOL-MIG: STOPPED n=N            the host said STOP; N records written
#   VPOOL-MIG: PASS n=N               after drop_caches, the file equals the copy
#   VPOOL-MIG: FAIL (...)
# The host says STOP by writing a line `STOP` to the second serial port
# (ttyS1, a socket on the host side).
export PATH=/bin:/sbin
# guest_mounts, kernel_arg, finish (flush, print the marker, power off).
# shellcheck source=vm/guest-lib.sh
. /lib/guest-lib.sh
guest_mounts
mount -t tmpfs -o size=90% tmpfs /tmp 2>/dev/null

slots=$(kernel_arg vpool_mig_slots 1024)

# The stop listener: the first line with STOP on ttyS1 creates /tmp/stop.
(
    stty -F /dev/ttyS1 raw -echo 2>/dev/null || echo "guest: stty ttyS1 failed"
    while :; do
        if read -r line < /dev/ttyS1; then
            case "$line" in
                *STOP*) : > /tmp/stop; exit 0 ;;
            esac
        else
            sleep 0.5
        fi
    done
) &

mkdir -p /data
rm -f /data/seq.bin /tmp/copy /tmp/stop
: > /data/seq.bin || finish "VPOOL-MIG: FAIL (cannot create /data/seq.bin)"
: > /tmp/copy
sync
echo "VPOOL-MIG: WRITING slots=$slots"

n=0
while [ ! -e /tmp/stop ]; do
    n=$((n + 1))
    slot=$(((n - 1) % slots))
    dd if=/dev/urandom of=/tmp/body bs=3968 count=1 2>/dev/null ||
        finish "VPOOL-MIG: FAIL (dd urandom, record $n)"
    sum=$(sha256sum /tmp/body)
    sum=${sum%% *}
    { printf '%-127s\n' "VPOOLREC $n $sum"; cat /tmp/body; } > /tmp/rec
    if ! dd if=/tmp/rec of=/data/seq.bin bs=4096 seek="$slot" conv=notrunc,fsync 2>/dev/null; then
        finish "VPOOL-MIG: FAIL (write or fsync of record $n failed)"
    fi
    dd if=/tmp/rec of=/tmp/copy bs=4096 seek="$slot" conv=notrunc 2>/dev/null ||
        finish "VPOOL-MIG: FAIL (tmpfs copy, record $n)"
    echo "VPOOL-MIG: SYNCED n=$n"
done
echo "VPOOL-MIG: STOPPED n=$n"

# Read everything back from the disk, not from the page cache.
sync
echo 3 > /proc/sys/vm/drop_caches
size=$(stat -c %s /data/seq.bin)
want=$(stat -c %s /tmp/copy)
if [ "$size" != "$want" ]; then
    finish "VPOOL-MIG: FAIL (/data/seq.bin is $size bytes, want $want; n=$n)"
fi
if ! diff=$(cmp /data/seq.bin /tmp/copy 2>&1); then
    # cmp names the first differing byte ("differ: char N, line L" from
    # busybox): say which slot it is in and what it holds.
    off=$(echo "$diff" | sed -n 's/.* \(char\|byte\) \([0-9]*\).*/\2/p')
    bad_slot=$(( (${off:-1} - 1) / 4096 ))
    got=$(dd if=/data/seq.bin bs=4096 skip="$bad_slot" count=1 2>/dev/null | head -c 100 | tr -c 'A-Za-z0-9 ' '.')
    exp=$(dd if=/tmp/copy bs=4096 skip="$bad_slot" count=1 2>/dev/null | head -c 100 | tr -c 'A-Za-z0-9 ' '.')
    finish "VPOOL-MIG: FAIL (slot $bad_slot differs: $diff; disk has '$got', expected '$exp'; n=$n)"
fi
finish "VPOOL-MIG: PASS n=$n"
