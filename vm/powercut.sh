#!/usr/bin/env bash
# Power-cut test: vpool serve runs inside a VM (QEMU, TCG) on an ext4
# filesystem on a virtio disk backed by a host file; a client on the host
# writes and flushes over NBD (and takes and deletes snapshots over the API)
# while the VM's power is cut (QEMU SIGKILLed) at a random moment; the VM
# boots again on the same disk and the checker verifies every flushed write,
# then the next round writes more. What the guest kernel had only in its page
# cache is lost, as in a real power cut: this tests vpool's fsyncs, which a
# SIGKILL of the daemon (crates/vpool/tests/nbd_crash.rs) cannot.
#
# Usage: vm/powercut.sh [--rounds N] [--self-test] [options]   (see --help)
# Exit status: 0 if every round passed (and, with --self-test, the checker
# caught the lost flushed writes of the lying-disk round); 1 otherwise.
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_PROG=powercut
# shellcheck source=vm/lib.sh
. "$VM_DIR/lib.sh"
CLIENT=$VM_DIR/powercut-client.py

rounds=3
seed=
disk=mixed
writeback=mixed
work_min=2
work_max=8
self_test=0
recovery_cuts=1
mem=${VPOOL_VM_MEM:-512}
smp=1
sectors=32768
pool_size=2G
boot_timeout=${VPOOL_VM_BOOT_TIMEOUT:-300}
vpool_bin=
vpool_profile=release
workdir=
keep=0

usage() {
    cat <<EOF
Usage: vm/powercut.sh [options]

Runs vpool serve inside a Linux VM (QEMU TCG, Debian's cloud kernel, a
busybox initramfs) with its pool on ext4 on a virtio disk backed by a host
file, and cuts the VM's power (SIGKILL of QEMU) in the middle of a workload
driven from the host over NBD and the API, N times; after each cut the VM
boots again on the same disk and every flushed write is checked. Exits 0
only if every check passed.

Options:
  --rounds N          power cuts (default: $rounds); N + 1 boots
  --seed N            seed for the workload, the disk modes and the cut times
                      (default: random; printed, to replay a run)
  --disk MODE         how the guest's disk keeps what the guest wrote:
                        direct:   -drive file=pool.img,cache=none (O_DIRECT):
                                  every write the virtual disk completed is in
                                  the file when QEMU dies; only the guest's page
                                  cache is lost
                        volatile: the file through nbdkit's cache filter
                                  (cache=writeback): the disk has a volatile
                                  write cache, and what the guest wrote but did
                                  not flush to the disk is lost too
                        mixed:    (default) alternate direct and volatile
  --writeback MODE    the guest kernel's writeback of dirty pages:
                        default:  the kernel's (30 s expiry, ext4 commit 5 s)
                        lazy:     no background writeback, ext4 commit=600:
                                  whatever vpool did not fsync is lost
                        mixed:    (default) alternate, two rounds each
  --work SECS         power cut a random time in [MIN, MAX] seconds into the
                      workload, given as MIN:MAX (default: $work_min:$work_max)
  --self-test         after the rounds, one more round on a disk that ignores
                      flushes (nbdkit cache=unsafe: a disk that lies), then a
                      boot on the honest disk: the checker must report lost
                      flushed writes. Proves the test can fail.
  --no-recovery-cuts  by default, in rounds 3, 7, 11, ... the power is also
                      cut once while vpool recovers at boot (0-2.5 s after it
                      starts), before the boot that checks; this turns it off
  --sectors N         volume size in 512-byte sectors (default: $sectors = 16 MiB)
  --mem MIB           guest memory (default: $mem)
  --smp N             guest CPUs (default: $smp; TCG runs them on host threads)
  --vpool-bin PATH    vpool binary (default: cargo build --release -p vpool)
  --debug             build and use the dev-profile binary instead (what the
                      test stage of scripts/test.sh has already built)
  --workdir DIR       keep everything in DIR (default: a temp dir, removed on PASS)
  --keep              keep the temp dir on PASS too
  --timeout SECS      limit for a boot until the API answers (default: $boot_timeout)
  -h, --help          this text

Environment: VPOOL_VM_CACHE, VPOOL_VM_KERNEL_PKG (as for vm/boot-test.sh),
VPOOL_VM_MEM, VPOOL_VM_BOOT_TIMEOUT.

Needs: qemu-system-x86_64, nbdkit (its cache filter) for volatile disks,
python3-libnbd (/usr/bin/python3 with the nbd module), busybox-static, cpio,
gzip, mkfs.ext4, ldd, apt-get + dpkg-deb for the first run (kernel).
EOF
}

while [ $# -gt 0 ]; do
    if common_option "$@"; then shift "$opt_shift"; continue; fi
    case "$1" in
        --rounds) rounds=${2:?}; shift 2 ;;
        --seed) seed=${2:?}; shift 2 ;;
        --disk) disk=${2:?}; shift 2 ;;
        --writeback) writeback=${2:?}; shift 2 ;;
        --work) work_min=${2%%:*}; work_max=${2##*:}; shift 2 ;;
        --self-test) self_test=1; shift ;;
        --no-recovery-cuts) recovery_cuts=0; shift ;;
        --sectors) sectors=${2:?}; shift 2 ;;
        --mem) mem=${2:?}; shift 2 ;;
        --smp) smp=${2:?}; shift 2 ;;
        --debug) vpool_profile=debug; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "powercut: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$disk" in direct|volatile|mixed) ;; *) echo "powercut: --disk direct|volatile|mixed" >&2; exit 2 ;; esac
case "$writeback" in default|lazy|mixed) ;; *) echo "powercut: --writeback default|lazy|mixed" >&2; exit 2 ;; esac
if ! [[ "$rounds" =~ ^[0-9]+$ ]] || [ "$rounds" -lt 1 ]; then
    echo "powercut: --rounds needs a number >= 1" >&2; exit 2
fi
if ! [[ "$work_min" =~ ^[0-9]+$ && "$work_max" =~ ^[0-9]+$ ]] || [ "$work_min" -gt "$work_max" ]; then
    echo "powercut: --work MIN:MAX, whole seconds" >&2; exit 2
fi
[ -n "$seed" ] || seed=$(( (RANDOM << 15) | RANDOM ))
RANDOM=$seed

py=/usr/bin/python3
need_tools qemu-system-x86_64 cpio gzip mkfs.ext4 ldd timeout
"$py" -c 'import nbd' 2>/dev/null || die "$py has no nbd module (apt-get install python3-libnbd)"
if [ "$disk" != direct ] || [ "$self_test" = 1 ]; then
    command -v nbdkit >/dev/null 2>&1 || die "nbdkit not found (apt-get install nbdkit)"
fi
find_busybox

# ---------------------------------------------------------------- work dir
make_workdir vpool-powercut
qemu_pid='' nbdkit_pid='' client_pid=''
# power_cut: SIGKILL QEMU, then the disk behind it (nbdkit): nothing the guest
# had not written to its disk, and nothing the disk had not written to the
# file (volatile mode), survives.
power_cut() {
    {
        [ -z "$qemu_pid" ] || { kill -KILL "$qemu_pid"; wait "$qemu_pid"; }
        [ -z "$nbdkit_pid" ] || { kill -KILL "$nbdkit_pid"; wait "$nbdkit_pid"; }
    } 2>/dev/null || true
    qemu_pid='' nbdkit_pid=''
}
stop_all() {
    power_cut
    [ -z "$client_pid" ] || { kill "$client_pid" 2>/dev/null; wait "$client_pid" 2>/dev/null; } || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$(now)
log "seed $seed (--seed $seed replays the choices), work dir $workdir"

# ---------------------------------------------------------------- kernel
vm_kernel_prepare
log "kernel $kernel_pkg"

# ---------------------------------------------------------------- vpool
find_vpool
"$vpool_bin" serve --help 2>&1 | grep -q -- --nbd-listen || die "$vpool_bin serve has no --nbd-listen"

# ---------------------------------------------------------------- initramfs
# busybox, /init, the modules, vpool and the shared libraries it needs (as
# ldd lists them, with the dynamic loader), the API token.
t=$(now)
initramfs_start powercut-init.sh pool etc tmp
if command -v strip >/dev/null 2>&1; then
    strip -o "$ird/bin/vpool" "$vpool_bin"
else
    cp "$vpool_bin" "$ird/bin/vpool"
fi
for lib in $(ldd "$vpool_bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
    mkdir -p "$ird$(dirname "$lib")"
    cp -L "$lib" "$ird$lib"
done
token_file=$workdir/api-token
od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "$token_file"
chmod 600 "$token_file"
install -m 600 "$token_file" "$ird/etc/vpool-token"
initramfs_pack
rm -rf "$ird"

# The pool's disk: an ext4 filesystem on a sparse raw file, made here.
pool_img=$workdir/pool.img
rm -f "$pool_img"
truncate -s "$pool_size" "$pool_img"
mkfs.ext4 -q -F -L vpoolpool -E lazy_itable_init=0,lazy_journal_init=0 "$pool_img" >/dev/null
log "initramfs ($(du -k "$workdir/initramfs.cpio.gz" | cut -f1) KiB) and $pool_size ext4 pool disk made ($(elapsed "$t") s)"

nbd_port=$(free_port)
api_port=$(free_port)
[ "$api_port" != "$nbd_port" ] || api_port=$(free_port)
state=$workdir/state

# ---------------------------------------------------------------- boots
# boot_vm DIR DISK WRITEBACK: start the disk (nbdkit for volatile/lying) and
# QEMU in the background, console in DIR/console.log.
boot_vm() {
    local dir=$1 mode=$2 wb=$3 drive sock
    case "$mode" in
        direct)
            drive="file=$pool_img,format=raw,if=virtio,cache=none,aio=threads" ;;
        volatile|lying)
            sock=$dir/disk.sock
            mkdir -p "$dir/nbdkit-tmp"
            local cmode=writeback
            [ "$mode" = lying ] && cmode=unsafe
            TMPDIR=$dir/nbdkit-tmp nbdkit --foreground --exit-with-parent --unix "$sock" \
                --filter=cache file "$pool_img" cache=$cmode >"$dir/nbdkit.log" 2>&1 &
            nbdkit_pid=$!
            local i=0
            until [ -S "$sock" ]; do
                kill -0 "$nbdkit_pid" 2>/dev/null || { cat "$dir/nbdkit.log" >&2; die "nbdkit exited"; }
                i=$((i + 1)); [ $i -lt 300 ] || die "nbdkit made no socket in 30 s"
                sleep 0.1
            done
            drive="file=nbd+unix:///?socket=$sock,format=raw,if=virtio,cache=none" ;;
    esac
    qemu-system-x86_64 \
        -accel tcg -machine q35 -cpu max -smp "$smp" -m "$mem" \
        -nographic -monitor none -serial "file:$dir/console.log" -no-reboot \
        -kernel "$kdir/vmlinuz" -initrd "$workdir/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 vpool_writeback=$wb" \
        -drive "$drive" \
        -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$nbd_port-:10809,hostfwd=tcp:127.0.0.1:$api_port-:7070" \
        -device virtio-net-pci,netdev=n0,romfile= \
        </dev/null >"$dir/qemu.log" 2>&1 &
    qemu_pid=$!
}
client() { "$py" "$CLIENT" "$@"; }

mode_of() { # round -> disk mode
    case "$disk" in
        mixed) if [ $(($1 % 2)) = 1 ]; then echo direct; else echo volatile; fi ;;
        *) echo "$disk" ;;
    esac
}
wb_of() { # round -> writeback mode
    case "$writeback" in
        mixed) if [ $((($1 - 1) / 2 % 2)) = 0 ]; then echo default; else echo lazy; fi ;;
        *) echo "$writeback" ;;
    esac
}

total=$rounds
[ "$self_test" = 1 ] && total=$((rounds + 1))
passed=0
lost_reported=
for ((r = 1; r <= total + 1; r++)); do
    dir=$workdir/round-$r
    mkdir -p "$dir"
    lying=0
    if [ "$self_test" = 1 ] && [ "$r" = "$total" ]; then lying=1; fi
    mode=$(mode_of "$r")
    [ "$lying" = 1 ] && mode=lying
    [ "$r" -le "$total" ] || mode=$(mode_of "$r")
    wb=$(wb_of "$r")
    t=$(now)
    boot_vm "$dir" "$mode" "$wb"
    if [ "$recovery_cuts" = 1 ] && [ $((r % 4)) = 3 ] && [ "$lying" = 0 ] && [ "$r" -le "$total" ]; then
        # A power cut while the daemon recovers from the previous one.
        i=0
        until grep -qa 'POWERCUT-GUEST: starting vpool serve' "$dir/console.log" 2>/dev/null; do
            kill -0 "$qemu_pid" 2>/dev/null || die "boot $r: QEMU exited (console: $dir/console.log)"
            i=$((i + 1)); [ $i -lt $((boot_timeout * 10)) ] || die "boot $r: vpool serve did not start"
            sleep 0.1
        done
        rcut_ms=$(( (RANDOM * 32768 + RANDOM) % 2501 ))
        sleep "$(awk -v ms="$rcut_ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
        power_cut
        recovered=no
        grep -qa 'pool recovered' "$dir/console.log" && recovered=yes
        log "round $r: power cut during recovery, $rcut_ms ms after vpool serve started (recovery had finished: $recovered)"
        mv "$dir/console.log" "$dir/console-recovery-cut.log"
        boot_vm "$dir" "$mode" "$wb"
    fi
    if ! timeout -k 5 $((boot_timeout + 10)) "$py" "$CLIENT" wait --api "$api_port" --token "$token_file" \
            --timeout "$boot_timeout" --qemu-pid "$qemu_pid" --console "$dir/console.log" \
            >"$dir/pool-at-boot.json" 2>"$dir/wait.err"; then
        cat "$dir/wait.err" >&2
        grep -a 'POWERCUT-GUEST\|vpool\|ERROR\|panic' "$dir/console.log" | tail -n 30 >&2 || true
        die "boot $r: the daemon did not come up (console: $dir/console.log)"
    fi
    boot_secs=$(elapsed "$t")
    pool_line=$("$py" -c 'import json, sys; p = json.load(open(sys.argv[1]))
print("%d segments, %d checkpoints written, %d segments cleaned" % (p["segments"], p["checkpoints_written"], p["cleaner"]["segments_cleaned"]))' "$dir/pool-at-boot.json" 2>/dev/null || echo "pool info unreadable")
    t=$(now)
    if [ "$r" = 1 ]; then
        client init --api "$api_port" --token "$token_file" --state "$state" --sectors "$sectors" >"$dir/check.out" 2>&1 ||
            { cat "$dir/check.out" >&2; die "boot 1: creating the volume failed"; }
        check_line="volume created"
    else
        rc=0
        timeout -k 5 600 "$py" "$CLIENT" check --nbd "$nbd_port" --api "$api_port" --token "$token_file" \
            --state "$state" --log "$workdir/round-$((r - 1))/work.log" >"$dir/check.out" 2>&1 || rc=$?
        if [ "$self_test" = 1 ] && [ "$r" = $((total + 1)) ]; then
            # After the lying-disk round: the checker must have failed, for
            # lost flushed writes.
            if [ $rc = 3 ] && grep -q LOST-FLUSHED "$dir/check.out"; then
                lost_reported=$(grep -c LOST-FLUSHED "$dir/check.out" || true)
                log "self-test: after round $((r - 1)) on a disk that ignored flushes, the checker failed as it must:"
                grep -m 3 'LOST-FLUSHED' "$dir/check.out" | sed 's/^/    /'
                log "self-test: the checker says: $(grep -m 1 '^powercut-client: .* errors' "$dir/check.out" | sed 's/^powercut-client: //; s/;.*//')"
            else
                cat "$dir/check.out" >&2
                die "self-test: the checker did not report lost flushed writes after the lying-disk round (exit $rc)"
            fi
            power_cut
            break
        fi
        if [ $rc != 0 ]; then
            cat "$dir/check.out" >&2
            die "boot $r: the check of round $((r - 1)) failed (disk $(mode_of $((r - 1))), writeback $(wb_of $((r - 1))); logs in $workdir/round-$((r - 1)) and $dir)"
        fi
        check_line=$(grep '^check OK' "$dir/check.out" | sed 's/; pool:.*//; s/^check OK: /OK, /')
        passed=$((passed + 1))
    fi
    check_secs=$(elapsed "$t")
    if [ "$r" -gt "$total" ]; then
        log "boot $r ($mode, $wb): up in $boot_secs s ($pool_line); check ${check_secs} s: $check_line"
        power_cut
        break
    fi

    # The workload, and the power cut a random time into it.
    if [ "$lying" = 1 ]; then
        cut_ms=$((work_max * 1000))
    else
        cut_ms=$((work_min * 1000 + (RANDOM * 32768 + RANDOM) % ((work_max - work_min) * 1000 + 1)))
    fi
    client_seed=$(( (RANDOM << 15) | RANDOM ))
    "$py" "$CLIENT" work --nbd "$nbd_port" --api "$api_port" --token "$token_file" --log "$dir/work.log" \
        --seed "$client_seed" --round "$r" --sectors "$sectors" --max-seconds $((work_max + 120)) \
        >"$dir/work.out" 2>&1 &
    client_pid=$!
    i=0
    until [ -s "$dir/work.log" ]; do
        kill -0 "$client_pid" 2>/dev/null || { cat "$dir/work.out" >&2; die "round $r: the work client exited before connecting"; }
        i=$((i + 1)); [ $i -lt 600 ] || die "round $r: the work client did not connect in 60 s"
        sleep 0.1
    done
    sleep "$(awk -v ms="$cut_ms" 'BEGIN { printf "%.3f", ms / 1000 }')"
    if ! kill -0 "$client_pid" 2>/dev/null; then
        wait "$client_pid" || true
        client_pid=''
        tail -n 3 "$dir/work.log" >&2
        die "round $r: the work client ended before the power cut (a request failed?): log $dir/work.log"
    fi
    power_cut
    wait "$client_pid" || { cat "$dir/work.out" >&2; die "round $r: the work client failed"; }
    client_pid=
    summary=$(awk '$1 == "W" || $1 == "Z" { s++ } $1 == "A" || $1 == "AF" { a++ } $1 == "FD" { f++ }
        $1 == "SD" { n++ } END { printf "%d sent, %d acked, %d flushes, %d snapshots", s, a, f, n }' "$dir/work.log")
    # The main thread's last line (the snapshot thread may log after it).
    ending=$(grep -E '^(error|timeout|BUG)' "$dir/work.log" | tail -n 1 || true)
    case "$ending" in
        error*) ;;
        *) die "round $r: the work client ended with '$ending' before the power cut (log $dir/work.log)" ;;
    esac
    log "round $r ($mode disk, $wb writeback): up in $boot_secs s ($pool_line); check ${check_secs} s: $check_line; cut at $(awk -v ms="$cut_ms" 'BEGIN { printf "%.1f", ms / 1000 }') s: $summary"
done

if [ "$self_test" = 1 ]; then
    [ -n "$lost_reported" ] || die "self-test did not run"
    log "PASS: $passed power cuts checked, self-test caught the lying disk, seed $seed, total $(elapsed "$t_start") s"
else
    log "PASS: $passed power cuts checked, seed $seed, total $(elapsed "$t_start") s"
fi
