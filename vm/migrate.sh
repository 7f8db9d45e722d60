#!/usr/bin/env bash
# Live-migrate a running VM whose root disk is a vpool volume served over NBD,
# back and forth between two QEMU processes, while the guest writes.
#
#   The guest (vm/migrate-init.sh as /sbin/init) writes numbered, checksummed
#   4 KiB records into /data/seq.bin, each flushed (`dd conv=fsync`) before the
#   next, and prints `VPOOL-MIG: SYNCED n=N` after each.
#   The host migrates it MIGRATIONS times (default 10): a destination QEMU with
#   the same command line plus `-incoming unix:...`, QMP `migrate` on the
#   source, `query-migrate` until completed, the destination running, QMP
#   `quit` on the source (as libvirt does). After each, the guest must go on
#   writing on the destination.
#   Then one cancelled migration: to a destination QEMU on the other host,
#   throttled (max-bandwidth 1 MiB/s) so it cannot complete, QMP
#   `migrate_cancel` 2 s after RAM started to flow, the normal bandwidth set
#   back, the source still running (`cont` if paused), the destination
#   quit. The guest must go on writing on the source for 3 s, and (--hosts
#   2) the source's host must still (or again within 30 s) own the volume.
#   Then the host sends STOP (a line on the guest's second serial port); the
#   guest drops its page cache, compares the file on disk with the copy it
#   kept in RAM and prints `VPOOL-MIG: PASS n=N` or `VPOOL-MIG: FAIL (...)`.
#   The host reads the volume back over NBD, extracts the file with debugfs
#   and checks every record (number and sha256) itself.
#
#   --hosts 1: one `vpool serve`; both QEMUs use its nbd.sock.
#   --hosts 2: two daemons (hosts A and B, each its own VPOOL_HOME) attach one
#              shared pool on S3 (Ceph RGW, scripts/ceph.sh); the QEMUs
#              alternate between A's and B's nbd.sock; the volume's owner must
#              follow the VM (the peer link, `vpool serve --peer-listen`).
#
# Usage: vm/migrate.sh [--hosts 1|2] [options]   (see --help)
# Exit status: 0 only if every migration completed (and the cancelled one
# was cancelled with the source running on), the guest printed PASS and the
# host-side check agreed (and, with --hosts 2, the owner followed).
set -euo pipefail

VM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VM_PROG=migrate
# shellcheck source=vm/lib.sh
. "$VM_DIR/lib.sh"

hosts=1
vpool_bin=
vpool_profile=debug
workdir=
keep=0
migrations=10
interval=${VPOOL_MIG_INTERVAL:-2}
min_records=3
boot_timeout=${VPOOL_VM_BOOT_TIMEOUT:-600}
mig_timeout=${VPOOL_MIG_TIMEOUT:-180}
mem=${VPOOL_VM_MEM:-192}
slots=1024
bandwidth_mib=1024
cancel_bw=$((1024 * 1024))  # the cancelled migration's max-bandwidth (bytes/s)
cancel_hold=2               # ... cancelled this long after RAM started to flow
cancel_run=3                # the guest writes this long on the source after it
ceph_env=${VPOOL_MIG_CEPH_ENV:-${VPOOL_CEPH_DIR:-/tmp/vpool-ceph}/env}
serve_args=${VPOOL_MIG_SERVE_ARGS:-}
pool_args=${VPOOL_MIG_POOL_ARGS:-}

usage() {
    cat <<EOF
Usage: vm/migrate.sh [options]

Boots Linux (Debian's cloud kernel) under qemu-system-x86_64 (TCG) with its
root disk on a vpool volume over NBD, and live-migrates it between two QEMU
processes $migrations times while the guest writes and flushes numbered,
checksummed records; then starts one more migration to the other host,
throttled to $((cancel_bw / 1024)) KiB/s, and cancels it (QMP migrate_cancel)
$cancel_hold s after RAM started to flow: the source must run on (\`cont\` if
paused), the destination QEMU is quit, the guest must go on writing on the
source for $cancel_run s and, with --hosts 2, the source's host must own the
volume (still, or again within 30 s). Then the guest verifies every record.
Exits 0 only on PASS.

Options:
  --hosts 1|2              1 (default): one vpool daemon, both QEMUs on its
                           nbd.sock, volume 'root' (vpool vol import).
                           2: two daemons (homes DIR/host-a, DIR/host-b) that
                           attach one shared pool on S3 (Ceph RGW: the env
                           file of scripts/ceph.sh), volume 'shared/root';
                           each started with --peer-listen 127.0.0.1:PORT; the
                           QEMUs alternate between A's and B's nbd.sock, and
                           the owner must be the host the VM ran on last.
  --vpool-bin PATH         vpool binary to use (default: build it with cargo,
                           dev profile, and use target/debug/vpool)
  --release                build and use the release vpool binary instead
  --migrations N           number of migrations (default: $migrations)
  --interval SECS          the guest writes at least this long (and at least
                           $min_records records) on each QEMU before the next
                           migration (default: $interval)
  --mem MIB                guest memory (default: $mem)
  --slots N                records in /data/seq.bin before it wraps around
                           (default: $slots, 4 KiB each)
  --bandwidth MIB          migration max-bandwidth in MiB/s (default: $bandwidth_mib)
  --ceph-env FILE          --hosts 2: the env file of scripts/ceph.sh (default:
                           $ceph_env; started with scripts/ceph.sh start if absent)
  --serve-args "ARGS"      --hosts 2: more arguments for each 'vpool serve'
  --pool-args "ARGS"       --hosts 2: more arguments for 'pool create/attach'
                           (e.g. "--durability remote")
  --workdir DIR            keep all files (images, logs) in DIR (default: a temp dir)
  --keep                   do not delete the temp work dir at the end
  --timeout SECS           limit for the boot and for the final verification
                           (default: $boot_timeout)
  --migrate-timeout SECS   limit for each migration (default: $mig_timeout)
  -h, --help               this text

Environment:
  VPOOL_VM_CACHE           kernel cache (default: \${XDG_CACHE_HOME:-\$HOME/.cache}/vpool-vm)
  VPOOL_VM_KERNEL_PKG      Debian kernel package (see vm/boot-test.sh)
  VPOOL_VM_MEM             guest memory in MiB (default: 192)

Needs: qemu-system-x86_64, qemu-img, python3 (QMP), busybox (busybox-static),
cpio, gzip, mkfs.ext4 and debugfs (e2fsprogs); apt-get and dpkg-deb for the
first run. scripts/install-deps.sh installs them.
EOF
}

while [ $# -gt 0 ]; do
    if common_option "$@"; then shift "$opt_shift"; continue; fi
    case "$1" in
        --hosts) hosts=${2:?--hosts needs a value}; shift 2 ;;
        --hosts=*) hosts=${1#*=}; shift ;;
        --release) vpool_profile=release; shift ;;
        --migrations) migrations=${2:?--migrations needs a value}; shift 2 ;;
        --interval) interval=${2:?--interval needs a value}; shift 2 ;;
        --mem) mem=${2:?--mem needs a value}; shift 2 ;;
        --slots) slots=${2:?--slots needs a value}; shift 2 ;;
        --bandwidth) bandwidth_mib=${2:?--bandwidth needs a value}; shift 2 ;;
        --ceph-env) ceph_env=${2:?--ceph-env needs a value}; shift 2 ;;
        --serve-args) serve_args=${2?--serve-args needs a value}; shift 2 ;;
        --pool-args) pool_args=${2?--pool-args needs a value}; shift 2 ;;
        --migrate-timeout) mig_timeout=${2:?--migrate-timeout needs a value}; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "migrate: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$hosts" in
    1|2) ;;
    *) echo "migrate: --hosts must be 1 or 2, not '$hosts'" >&2; exit 2 ;;
esac
for v in migrations slots mem bandwidth_mib; do
    case "${!v}" in
        ''|*[!0-9]*) echo "migrate: --${v%_mib} must be a number, not '${!v}'" >&2; exit 2 ;;
    esac
done

need_tools qemu-system-x86_64 qemu-img python3 cpio gzip mkfs.ext4 debugfs timeout
find_busybox

# ---------------------------------------------------------------- work dir
make_workdir vpool-mig
# Unix socket paths (QMP, migration, serial) must fit in 108 bytes.
[ ${#workdir} -le 80 ] || die "work dir path too long for unix sockets: $workdir"

# Hosts: A, and B with --hosts 2. server_pid/home/sock are per host.
declare -A server_pid=() home=() sock=()
host_list=(A)
[ "$hosts" = 2 ] && host_list=(A B)
# QEMU processes by incarnation (1 = the first source, 2 = the first
# destination, ...).
declare -A qemu_pid=() qemu_host=()

# stop_server HOST [SIGNAL]: TERM (default) and wait up to 20 s, then KILL.
stop_server() { stop_process "server_pid[$1]" "vpool serve ($1)" "$workdir/server-$1.log" "${2:-TERM}"; }
# kill_qemu IDX: SIGKILL that QEMU if it still runs.
kill_qemu() {
    local pid=${qemu_pid[$1]:-}
    [ -n "$pid" ] || return 0
    { kill -KILL "$pid" || true; wait "$pid" || true; } 2>/dev/null
    qemu_pid[$1]=
}
stop_all() {
    local i h
    for i in "${!qemu_pid[@]}"; do kill_qemu "$i"; done
    for h in "${host_list[@]}"; do stop_server "$h"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t_start=$(now)

# ---------------------------------------------------------------- helper
# QMP client, one migration, the STOP line, the host-side record check.
helper=$workdir/migrate-helper.py
cat > "$helper" <<'PYEOF'
"""Helpers of vm/migrate.sh (written there; edit it there).

  qmp SOCK CMD [JSON-ARGS]          run a QMP command, print its return (JSON)
  wait-qmp SOCK TIMEOUT             wait until SOCK answers; print the run state
  migrate SRC DST URI TIMEOUT BW    migrate from QMP SRC to QMP DST (waiting in
                                    -incoming on URI), max-bandwidth BW bytes/s;
                                    wait until DST runs (`cont` if paused), QMP
                                    `quit` SRC; print a JSON summary
  migrate-cancel SRC DST URI HOLD LOW BW
                                    start a migration from QMP SRC to QMP DST
                                    throttled to max-bandwidth LOW bytes/s,
                                    `migrate_cancel` it HOLD s after RAM
                                    started to flow, wait until `cancelled`,
                                    set max-bandwidth back to BW, make sure
                                    SRC runs (`cont` if paused), QMP `quit`
                                    DST (if it has not exited); print a JSON
                                    summary
  send SOCK TEXT                    connect to a unix socket and send TEXT
  check FILE SLOTS N                check the records of the guest's seq.bin
"""
import hashlib
import json
import socket
import sys
import time


class Qmp:
    def __init__(self, path, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.settimeout(60)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.f = self.s.makefile("rb")
        greeting = self.read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def read(self):
        line = self.f.readline()
        if not line:
            raise EOFError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self.read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"QMP {name}: {r['error']}")
            # an event: skip it

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def status(q):
    return q.cmd("query-status")["status"]


def migrate(src_path, dst_path, uri, timeout, bandwidth):
    dst = Qmp(dst_path)
    st = status(dst)
    if st != "inmigrate":
        raise RuntimeError(f"destination is {st!r}, not 'inmigrate'")
    src = Qmp(src_path)
    st = status(src)
    if st != "running":
        raise RuntimeError(f"source is {st!r}, not 'running'")
    src.cmd("migrate-set-parameters", {"max-bandwidth": bandwidth})
    t0 = time.monotonic()
    src.cmd("migrate", {"uri": uri})
    deadline = t0 + timeout
    while True:
        q = src.cmd("query-migrate")
        s = q.get("status")
        if s == "completed":
            break
        if s in ("failed", "cancelled"):
            raise RuntimeError(f"migration {s}: {q.get('error-desc', q)}")
        if time.monotonic() > deadline:
            try:
                src.cmd("migrate_cancel")
            except Exception:
                pass
            raise RuntimeError(f"migration not completed after {timeout} s: {q}")
        time.sleep(0.05)
    t_done = time.monotonic()
    # Without -S the destination starts by itself once the state is in;
    # `cont` if it is paused (as libvirt would).
    conts = 0
    while True:
        st = status(dst)
        if st == "running":
            break
        if st in ("paused", "postmigrate", "prelaunch") and conts < 3:
            dst.cmd("cont")
            conts += 1
        elif st not in ("inmigrate", "paused", "postmigrate", "prelaunch", "finish-migrate"):
            raise RuntimeError(f"destination is {st!r} after the migration")
        if time.monotonic() > t_done + 30:
            raise RuntimeError(f"destination not running 30 s after the migration ({st!r})")
        time.sleep(0.05)
    t_run = time.monotonic()
    src_state = status(src)
    try:
        src.cmd("quit")
    except (EOFError, OSError):
        pass
    src.close()
    dst.close()
    ram = q.get("ram", {})
    print(json.dumps({
        "status": q.get("status"),
        "total_time_ms": q.get("total-time"),
        "downtime_ms": q.get("downtime"),
        "setup_time_ms": q.get("setup-time"),
        "wall_s": round(t_done - t0, 3),
        "dest_running_after_s": round(t_run - t0, 3),
        "dest_conts": conts,
        "source_state": src_state,
        "ram_transferred": ram.get("transferred"),
        "ram_total": ram.get("total"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
    }))


def migrate_cancel(src_path, dst_path, uri, hold, low_bw, bandwidth):
    dst = Qmp(dst_path)
    st = status(dst)
    if st != "inmigrate":
        raise RuntimeError(f"destination is {st!r}, not 'inmigrate'")
    src = Qmp(src_path)
    st = status(src)
    if st != "running":
        raise RuntimeError(f"source is {st!r}, not 'running'")
    # Throttled so that it cannot complete before it is cancelled: the
    # first pass alone (~90 MiB) takes minutes at LOW.
    src.cmd("migrate-set-parameters", {"max-bandwidth": low_bw})
    t0 = time.monotonic()
    src.cmd("migrate", {"uri": uri})
    t_flow = None
    while True:
        q = src.cmd("query-migrate")
        s = q.get("status")
        t = time.monotonic()
        if s == "active":
            if t_flow is None and (q.get("ram", {}).get("transferred") or 0) > 0:
                t_flow = t
            if t_flow is not None and t - t_flow >= hold:
                break
        elif s != "setup":
            raise RuntimeError(f"migration {s} before it was cancelled: {q.get('error-desc', q)}")
        if t > t0 + 60:
            raise RuntimeError(f"migration not active with RAM sent after 60 s: {q}")
        time.sleep(0.05)
    q_at_cancel = q
    t_cancel = time.monotonic()
    src.cmd("migrate_cancel")
    while True:
        q = src.cmd("query-migrate")
        s = q.get("status")
        if s == "cancelled":
            break
        if s not in ("active", "cancelling", "device", "pre-switchover"):
            raise RuntimeError(f"migration {s} after migrate_cancel, not 'cancelled': {q.get('error-desc', q)}")
        if time.monotonic() > t_cancel + 30:
            raise RuntimeError(f"migration not cancelled 30 s after migrate_cancel: {q}")
        time.sleep(0.05)
    t_cancelled = time.monotonic()
    src.cmd("migrate-set-parameters", {"max-bandwidth": bandwidth})
    bw_after = src.cmd("query-migrate-parameters").get("max-bandwidth")
    if bw_after != bandwidth:
        raise RuntimeError(f"max-bandwidth is {bw_after} after restoring it to {bandwidth}")
    # The source must run on; `cont` if it is paused (as libvirt would).
    conts = 0
    src_state_after = status(src)
    while True:
        st = status(src)
        if st == "running":
            break
        if st in ("paused", "postmigrate", "finish-migrate") and conts < 3:
            src.cmd("cont")
            conts += 1
        elif st not in ("paused", "postmigrate", "finish-migrate"):
            raise RuntimeError(f"source is {st!r} after the cancelled migration")
        if time.monotonic() > t_cancelled + 30:
            raise RuntimeError(f"source not running 30 s after the cancel ({st!r})")
        time.sleep(0.05)
    # The destination: QEMU 7.2 exits by itself when the stream breaks
    # ("load of migration failed"); `quit` it if it has not yet.
    try:
        dst_state = status(dst)
        dst.cmd("quit")
    except (EOFError, OSError, RuntimeError):
        dst_state = "exited"
    src.close()
    dst.close()
    ram = q_at_cancel.get("ram", {})
    print(json.dumps({
        "status": q.get("status"),
        "status_at_cancel": q_at_cancel.get("status"),
        "flowing_s": round(t_cancel - t_flow, 3),
        "wall_s": round(t_cancel - t0, 3),
        "cancel_ms": round((t_cancelled - t_cancel) * 1000),
        "ram_transferred": ram.get("transferred"),
        "ram_total": ram.get("total"),
        "source_state_after_cancel": src_state_after,
        "source_conts": conts,
        "dest_state": dst_state,
        "max_bandwidth_after": bw_after,
    }))


def check(path, slots, n):
    """seq.bin after n records in `slots` slots: slot s holds the newest
    record m <= n with (m - 1) % slots == s; header `VPOOLREC m sha256`."""
    data = open(path, "rb").read()
    used = min(n, slots)
    if len(data) != used * 4096:
        return f"seq.bin is {len(data)} bytes, want {used} records of 4096"
    bad = []
    for s in range(used):
        rec = data[s * 4096:(s + 1) * 4096]
        want = s + 1 + slots * ((n - (s + 1)) // slots)
        hdr = rec[:128].decode("ascii", "replace")
        parts = hdr.split()
        body_sum = hashlib.sha256(rec[128:]).hexdigest()
        if hdr[127] != "\n" or len(parts) != 3 or parts[0] != "VPOOLREC":
            bad.append(f"slot {s}: no record header ({hdr[:40]!r})")
        elif parts[1] != str(want):
            bad.append(f"slot {s}: record {parts[1]}, want {want}")
        elif parts[2] != body_sum:
            bad.append(f"slot {s}: record {want}: body sha256 {body_sum} != header {parts[2]}")
    if bad:
        return f"{len(bad)} bad slot(s): " + "; ".join(bad[:5])
    return None


def main():
    cmd = sys.argv[1]
    a = sys.argv[2:]
    if cmd == "qmp":
        q = Qmp(a[0])
        print(json.dumps(q.cmd(a[1], json.loads(a[2]) if len(a) > 2 else None)))
    elif cmd == "wait-qmp":
        print(status(Qmp(a[0], float(a[1]))))
    elif cmd == "migrate":
        migrate(a[0], a[1], a[2], float(a[3]), int(a[4]))
    elif cmd == "migrate-cancel":
        migrate_cancel(a[0], a[1], a[2], float(a[3]), int(a[4]), int(a[5]))
    elif cmd == "send":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(a[0])
        s.sendall(a[1].encode().decode("unicode_escape").encode())
        time.sleep(0.3)
        s.close()
    elif cmd == "check":
        err = check(a[0], int(a[1]), int(a[2]))
        if err:
            print(err)
            sys.exit(1)
        print(f"{min(int(a[2]), int(a[1]))} slots checked, newest record {a[2]}")
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # one line for the shell
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
PYEOF
helper() { python3 "$helper" "$@"; }

# ---------------------------------------------------------------- kernel
vm_kernel_prepare
log "kernel $kernel_pkg, modules: $(tr '\n' ' ' < "$kdir/modules/order")"

# ---------------------------------------------------------------- initramfs
t=$(now)
initramfs_start initramfs-init.sh newroot
initramfs_pack

# ---------------------------------------------------------------- root fs
# 256 MiB (sparse; the import skips holes): room for the record file
# (--slots x 4 KiB) on top of busybox.
fs_mib=$(( (slots * 4 / 1024) + 64 ))
[ "$fs_mib" -ge 256 ] || fs_mib=256
build_rootfs migrate-init.sh "$fs_mib"
log "initramfs and $fs_mib MiB ext4 root fs built ($(elapsed "$t") s)"

# ---------------------------------------------------------------- vpool
find_vpool
need_vpool_cli

# vp HOST ARGS...: the vpool CLI against HOST's daemon.
vp() { local h=$1; shift; VPOOL_HOME=${home[$h]} "$vpool_bin" "$@"; }
# wait_for HOST DESC CMD...: until CMD succeeds, while HOST's daemon lives, 60 s max.
wait_for() {
    local h=$1
    shift
    wait_alive "server_pid[$h]" "vpool serve ($h)" "$workdir/server-$h.log" "$@"
}
# start_server HOST [ARGS...]
start_server() {
    local h=$1
    shift
    echo "=== start vpool serve $* ($(date -u +%T))" >>"$workdir/server-$h.log"
    VPOOL_HOME=${home[$h]} "$vpool_bin" serve "$@" >>"$workdir/server-$h.log" 2>&1 &
    server_pid[$h]=$!
    wait_for "$h" "API (vpool vol list)" vp "$h" vol list
}
# wait_socket HOST: until HOST's daemon has made its nbd.sock, 30 s max.
wait_socket() { wait_daemon_socket "server_pid[$1]" "vpool serve ($1)" "$workdir/server-$1.log" "${sock[$1]}"; }
nbd_url() { printf 'nbd+unix:///%s?socket=%s' "$export" "${sock[$1]}"; }

t=$(now)
if [ "$hosts" = 1 ]; then
    export=root
    home[A]=$workdir/vpool-home
    sock[A]=${home[A]}/nbd.sock
    rm -rf "${home[A]}"
    mkdir -p "${home[A]}"
    start_server A
    vp A vol import "$export" "$workdir/rootfs.img" >>"$workdir/server-A.log" 2>&1 || {
        tail -n 20 "$workdir/server-A.log" >&2; die "vpool vol import $export failed"; }
    wait_socket A
    log "imported rootfs.img as vpool volume '$export' ($(elapsed "$t") s)"
else
    # Shared pool on Ceph RGW. The env file exports VPOOL_TEST_S3_ENDPOINT,
    # VPOOL_TEST_S3_BUCKET and the AWS_* credentials, which both daemons and
    # the CLI inherit (as crates/vpool/tests/shared_rgw.rs does).
    if [ ! -f "$ceph_env" ] || ! bash "$REPO/scripts/ceph.sh" status "$(dirname "$ceph_env")" >/dev/null 2>&1; then
        log "starting Ceph RGW (scripts/ceph.sh start $(dirname "$ceph_env"))"
        ceph_env=$(bash "$REPO/scripts/ceph.sh" start "$(dirname "$ceph_env")" | tail -n 1) ||
            die "scripts/ceph.sh start failed"
    fi
    # shellcheck disable=SC1090
    . "$ceph_env"
    [ -n "${VPOOL_TEST_S3_ENDPOINT:-}" ] || die "$ceph_env sets no VPOOL_TEST_S3_ENDPOINT"
    export=shared/root
    s3_url=s3://${VPOOL_TEST_S3_BUCKET:-vpool-test}/vpool-mig-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
    declare -A peer_port=()
    for h in A B; do
        home[$h]=$workdir/host-${h,,}
        sock[$h]=${home[$h]}/nbd.sock
        rm -rf "${home[$h]}" "$workdir/cache-${h,,}"
        mkdir -p "${home[$h]}"
        peer_port[$h]=$(free_port)
        # The daemons find each other through the pool: the lease of a
        # volume's owner records its peer address (`vol status` shows it).
        # shellcheck disable=SC2086
        start_server "$h" --peer-listen "127.0.0.1:${peer_port[$h]}" $serve_args
    done
    shared_pool() { # HOST VERB
        local h=$1 verb=$2 extra=()
        [ "$verb" = create ] && extra=(--shared)
        # shellcheck disable=SC2086
        vp "$h" pool "$verb" shared --s3 "$s3_url" --endpoint "$VPOOL_TEST_S3_ENDPOINT" \
            --cache "$workdir/cache-${h,,}" --cache-size 256M --seal-after 0.5 \
            --lease-expire 3 "${extra[@]}" $pool_args >>"$workdir/server-$h.log" 2>&1 || {
            tail -n 20 "$workdir/server-$h.log" >&2; die "vpool pool $verb shared ($h) failed"; }
    }
    shared_pool A create
    shared_pool B attach
    # `vol import` goes through the API (create, begin_import, writes,
    # end_import); whether each of those is served for a volume of a shared
    # pool was not checked, so the tested path is used: `vol create` on A
    # (the creator owns it), then qemu-img writes the image over A's NBD
    # socket, as shared_rgw.rs does.
    vp A vol create "$export" --size "${fs_mib}M" >>"$workdir/server-A.log" 2>&1 || {
        tail -n 20 "$workdir/server-A.log" >&2; die "vpool vol create $export failed"; }
    wait_socket A
    wait_socket B
    qemu-img convert -n -f raw -O raw "$workdir/rootfs.img" "$(nbd_url A)" ||
        die "qemu-img convert rootfs.img -> $(nbd_url A) failed"
    log "shared pool at $s3_url (A: peer port ${peer_port[A]}, B: ${peer_port[B]}); rootfs.img written to '$export' through A ($(elapsed "$t") s)"
    log "status on A: $(vp A vol status "$export" --json 2>&1 | tr -d '\n')"
fi
# The guest must see the volume, not the original file.
mv "$workdir/rootfs.img" "$workdir/rootfs.orig.img"
# Only A is probed: with --hosts 2 a client of B would be a client of the
# volume on the host that does not own it (and may move it there).
wait_for A "NBD export '$export' on ${sock[A]}" qemu-img info -f raw "$(nbd_url A)"
if [ "$hosts" = 1 ]; then sock[B]=${sock[A]}; fi
# owner: with --hosts 2, which host says `here: true` in `vol status`
# (A, B, "A+B" or "none").
here_on() {
    vp "$1" vol status "$export" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin).get("here"))' 2>/dev/null || true
}
owner() {
    local h o=
    for h in A B; do
        [ "$(here_on "$h")" != True ] || o=${o:+$o+}$h
    done
    echo "${o:-none}"
}

# ---------------------------------------------------------------- QEMU
# start_qemu IDX HOST [incoming]: QEMU incarnation IDX, its disk on HOST's
# nbd.sock. Everything the guest sees is the same for every incarnation;
# only the host-side files differ: console-IDX.log (ttyS0), ctl-IDX.sock
# (ttyS1, for STOP), qmp-IDX.sock, mig-IDX.sock (-incoming).
start_qemu() {
    local i=$1 h=$2 incoming=${3:-} extra=()
    [ -z "$incoming" ] || extra=(-incoming "unix:$workdir/mig-$i.sock")
    rm -f "$workdir/console-$i.log" "$workdir/ctl-$i.sock" "$workdir/qmp-$i.sock" "$workdir/mig-$i.sock"
    qemu-system-x86_64 \
        -accel tcg -machine q35 -cpu max -smp 1 -m "$mem" \
        -nographic -monitor none -no-reboot \
        -serial "file:$workdir/console-$i.log" \
        -chardev "socket,id=ctl,path=$workdir/ctl-$i.sock,server=on,wait=off" -serial chardev:ctl \
        -qmp "unix:$workdir/qmp-$i.sock,server=on,wait=off" \
        -kernel "$kdir/vmlinuz" -initrd "$workdir/initramfs.cpio.gz" \
        -append "console=ttyS0 panic=-1 quiet loglevel=4 vpool_mig_slots=$slots" \
        -drive "file.driver=nbd,file.server.type=unix,file.server.path=${sock[$h]},file.export=$export,format=raw,if=virtio,cache=none" \
        -nic none "${extra[@]}" </dev/null >"$workdir/qemu-$i.log" 2>&1 &
    qemu_pid[$i]=$!
    qemu_host[$i]=$h
    local st k=0
    while [ ! -S "$workdir/qmp-$i.sock" ] && kill -0 "${qemu_pid[$i]}" 2>/dev/null && [ $k -lt 300 ]; do
        sleep 0.1
        k=$((k + 1))
    done
    if ! kill -0 "${qemu_pid[$i]}" 2>/dev/null; then
        cat "$workdir/qemu-$i.log" >&2
        die "QEMU $i (host $h) exited at start"
    fi
    st=$(helper wait-qmp "$workdir/qmp-$i.sock" 30 2>&1) || {
        cat "$workdir/qemu-$i.log" >&2; die "QEMU $i (host $h): no QMP: $st"; }
}
qemu_alive() { [ -n "${qemu_pid[$1]:-}" ] && kill -0 "${qemu_pid[$1]}" 2>/dev/null; }
# Guest output so far: every console in order (a line may be cut in two
# at a migration; the last SYNCED is always whole in one of them).
last_synced() { # IDX: the last `SYNCED n=` in console-IDX.log, or 0
    local n
    n=$(grep -a -o 'VPOOL-MIG: SYNCED n=[0-9]*' "$workdir/console-$1.log" 2>/dev/null | tail -n 1 || true)
    echo "${n##*=}" | sed 's/^$/0/'
}
count_synced() { grep -a -c 'VPOOL-MIG: SYNCED n=' "$workdir/console-$1.log" 2>/dev/null || true; }
marker() { grep -a -o -E "VPOOL-MIG: $2.*" "$workdir/console-$1.log" 2>/dev/null | tr -d '\r' | tail -n 1 || true; }
guest_died() { # IDX WHAT
    tail -n 30 "$workdir/console-$1.log" >&2 2>/dev/null || true
    cat "$workdir/qemu-$1.log" >&2 2>/dev/null || true
    die "QEMU $1 (host ${qemu_host[$1]}) exited $2 (console: $workdir/console-$1.log)"
}
# wait_writing IDX MIN_RECORDS SECS TIMEOUT: until console-IDX.log has at
# least MIN_RECORDS SYNCED lines and SECS seconds passed.
wait_writing() {
    local i=$1 want=$2 secs=$3 limit=$4 t0 c
    t0=$(now)
    while :; do
        qemu_alive "$i" || guest_died "$i" "while the guest should be writing"
        c=$(count_synced "$i")
        if [ "${c:-0}" -ge "$want" ] && awk -v a="$t0" -v b="$(now)" -v s="$secs" 'BEGIN { exit !(b - a >= s) }'; then
            return 0
        fi
        if awk -v a="$t0" -v b="$(now)" -v s="$limit" 'BEGIN { exit !(b - a >= s) }'; then
            tail -n 20 "$workdir/console-$i.log" >&2 || true
            die "QEMU $i (host ${qemu_host[$i]}): only ${c:-0} records synced in $limit s"
        fi
        sleep 0.2
    done
}
# wait_exit IDX SECS: until QEMU IDX exits; 1 if it does not in time.
wait_exit() {
    local i=$1 n=$(($2 * 10)) k=0
    while qemu_alive "$i" && [ $k -lt "$n" ]; do sleep 0.1; k=$((k + 1)); done
    if qemu_alive "$i"; then return 1; fi
    wait "${qemu_pid[$i]}" 2>/dev/null || true
    qemu_pid[$i]=
}

# ---------------------------------------------------------------- boot
cur=1
t=$(now)
start_qemu 1 A
k=0
until [ -n "$(marker 1 WRITING)" ]; do
    qemu_alive 1 || guest_died 1 "during boot"
    k=$((k + 1))
    if [ $k -ge $((boot_timeout * 5)) ]; then
        tail -n 30 "$workdir/console-1.log" >&2 || true
        die "the guest did not start writing within $boot_timeout s"
    fi
    sleep 0.2
done
log "guest booted on host A and writing ($(elapsed "$t") s; $(marker 1 WRITING))"
wait_writing 1 "$min_records" "$interval" 120
log "writing: $(last_synced 1) records synced on QEMU 1"

# ---------------------------------------------------------------- migrations
other() { if [ "$hosts" = 2 ] && [ "$1" = A ]; then echo B; elif [ "$hosts" = 2 ]; then echo A; else echo A; fi; }
summary=()
field() { python3 -c 'import json,sys; v = json.loads(sys.argv[1]).get(sys.argv[2]); print("?" if v is None else v)' "$out" "$1"; }
bw=$((bandwidth_mib * 1024 * 1024))
for m in $(seq 1 "$migrations"); do
    next=$((cur + 1))
    src_h=${qemu_host[$cur]}
    dst_h=$(other "$src_h")
    start_qemu "$next" "$dst_h" incoming
    n_before=$(last_synced "$cur")
    t=$(now)
    out=$(helper migrate "$workdir/qmp-$cur.sock" "$workdir/qmp-$next.sock" \
        "unix:$workdir/mig-$next.sock" "$mig_timeout" "$bw" 2>&1) || {
        tail -n 10 "$workdir/console-$cur.log" >&2 || true
        cat "$workdir/qemu-$cur.log" "$workdir/qemu-$next.log" >&2 || true
        die "migration $m ($src_h -> $dst_h, QEMU $cur -> $next): $out"; }
    secs=$(elapsed "$t")
    wait_exit "$cur" 15 || { log "warning: source QEMU $cur did not exit 15 s after quit; killing it"; kill_qemu "$cur"; }
    n_src=$(last_synced "$cur")
    qemu_alive "$next" || guest_died "$next" "right after migration $m"
    total_ms=$(field total_time_ms)
    down_ms=$(field downtime_ms)
    setup_ms=$(field setup_time_ms)
    run_s=$(field dest_running_after_s)
    xfer=$(field ram_transferred)
    syncs=$(field dirty_sync_count)
    conts=$(field dest_conts)
    line=$(printf 'migration %2d: %s -> %s (QEMU %d -> %d)  total %6s ms  downtime %5s ms  setup %4s ms  dest running after %6s s  (%s s with quit; RAM sent %s MiB, %s dirty syncs%s; guest at record %s, was %s when it started)' \
        "$m" "$src_h" "$dst_h" "$cur" "$next" "$total_ms" "$down_ms" "$setup_ms" "$run_s" "$secs" \
        "$(awk -v b="$xfer" 'BEGIN { if (b ~ /^[0-9]+$/) printf "%.1f", b / 1048576; else print "?" }')" \
        "$syncs" "$([ "$conts" = 0 ] || echo ", cont x$conts")" "$n_src" "$n_before")
    log "$line"
    summary+=("$line")
    cur=$next
    # The guest must go on writing (and flushing) on the destination.
    wait_writing "$cur" "$min_records" "$interval" 120
    if [ "$hosts" = 2 ]; then
        log "  owner of $export after $(elapsed "$t") s: $(owner) (the VM runs on $dst_h)"
    fi
done
log "after $migrations migrations: record $(last_synced "$cur") synced on QEMU $cur (host ${qemu_host[$cur]})"

# ---------------------------------------------------------------- cancelled migration
# After the normal migrations, one more to a destination QEMU on the other
# host (with --hosts 1 the same daemon), throttled to cancel_bw (1 MiB/s:
# the first pass alone, ~90 MiB, would take minutes) and cancelled (QMP
# migrate_cancel) cancel_hold (2 s) after RAM started to flow; then the
# normal max-bandwidth is set back, the source must run (`cont` if paused)
# and the destination QEMU is quit. It had the volume open all along: with
# --hosts 2 a client of B while A, the owner, keeps its own. Then the guest
# must go on syncing records on the source for cancel_run (3 s), with
# --hosts 2 the source's host must own the volume (still, or again within
# 30 s), and the final verification below follows.
wait_records() { # IDX N SECS TIMEOUT: until console-IDX.log has SYNCED n>=N and SECS s passed
    local i=$1 want=$2 secs=$3 limit=$4 t0 c
    t0=$(now)
    while :; do
        qemu_alive "$i" || guest_died "$i" "while the guest should be writing"
        c=$(last_synced "$i")
        if [ "${c:-0}" -ge "$want" ] && awk -v a="$t0" -v b="$(now)" -v s="$secs" 'BEGIN { exit !(b - a >= s) }'; then
            return 0
        fi
        if awk -v a="$t0" -v b="$(now)" -v s="$limit" 'BEGIN { exit !(b - a >= s) }'; then
            tail -n 20 "$workdir/console-$i.log" >&2 || true
            die "QEMU $i (host ${qemu_host[$i]}): at record ${c:-0} after $limit s, not $want"
        fi
        sleep 0.2
    done
}
next=$((cur + 1))
cancelled=$next
src_h=${qemu_host[$cur]}
dst_h=$(other "$src_h")
start_qemu "$next" "$dst_h" incoming
n_before=$(last_synced "$cur")
t=$(now)
out=$(helper migrate-cancel "$workdir/qmp-$cur.sock" "$workdir/qmp-$next.sock" \
    "unix:$workdir/mig-$next.sock" "$cancel_hold" "$cancel_bw" "$bw" 2>&1) || {
    tail -n 10 "$workdir/console-$cur.log" >&2 || true
    cat "$workdir/qemu-$cur.log" "$workdir/qemu-$next.log" >&2 || true
    die "cancelled migration ($src_h -> $dst_h, QEMU $cur -> $next): $out"; }
secs=$(elapsed "$t")
wait_exit "$next" 15 || { log "warning: destination QEMU $next did not exit 15 s after quit; killing it"; kill_qemu "$next"; }
qemu_alive "$cur" || guest_died "$cur" "after the cancelled migration"
c=$(count_synced "$next")
[ "${c:-0}" = 0 ] || die "the guest ran on QEMU $next, the destination of the cancelled migration ($c records synced there)"
n_src=$(last_synced "$cur")
xfer=$(field ram_transferred)
line=$(printf 'cancelled migration: %s -> %s (QEMU %d -> %d)  cancelled after %s s of RAM flowing at %s KiB/s (%s MiB sent; %s at cancel), cancel took %s ms; source %s after it%s; destination %s  (%s s; guest at record %s, was %s when it started)' \
    "$src_h" "$dst_h" "$cur" "$next" "$(field flowing_s)" "$((cancel_bw / 1024))" \
    "$(awk -v b="$xfer" 'BEGIN { if (b ~ /^[0-9]+$/) printf "%.1f", b / 1048576; else print "?" }')" \
    "$(field status_at_cancel)" "$(field cancel_ms)" "$(field source_state_after_cancel)" \
    "$([ "$(field source_conts)" = 0 ] || echo ", cont x$(field source_conts)")" "$(d=$(field dest_state); if [ "$d" = exited ]; then echo "had exited by itself"; else echo "was $d, quit"; fi)" \
    "$secs" "$n_src" "$n_before")
log "$line"
summary+=("$line")
# The guest must go on writing (and flushing) on the source.
t=$(now)
wait_records "$cur" $((n_src + min_records)) "$cancel_run" 120
line="  after the cancel: the guest synced records $n_src..$(last_synced "$cur") on QEMU $cur (host $src_h) in $(elapsed "$t") s"
if [ "$hosts" = 2 ]; then
    # The source's host must own the volume: still, or again within 30 s.
    t=$(now)
    o=$(owner)
    first_owner=$o
    until [ "$o" = "$src_h" ]; do
        if awk -v a="$t" -v b="$(now)" 'BEGIN { exit !(b - a >= 30) }'; then
            for h in A B; do log "vol status on $h: $(vp "$h" vol status "$export" --json 2>&1 | tr -d '\n')"; done
            die "owner of $export is '$o', not host $src_h (where the VM runs) 30 s after the cancelled migration"
        fi
        sleep 0.5
        o=$(owner)
    done
    line+="; owner $first_owner$([ "$first_owner" = "$src_h" ] || echo ", $src_h after $(elapsed "$t") s")"
fi
log "$line"
summary+=("$line")

# ---------------------------------------------------------------- stop, verify
t=$(now)
k=0
until [ -n "$(marker "$cur" STOPPED)" ]; do
    qemu_alive "$cur" || guest_died "$cur" "before it stopped writing"
    # Resent every 5 s: the guest reads ttyS1 in a loop.
    if [ $((k % 25)) -eq 0 ]; then
        helper send "$workdir/ctl-$cur.sock" 'STOP\n' >/dev/null 2>&1 ||
            log "warning: could not send STOP to $workdir/ctl-$cur.sock"
    fi
    k=$((k + 1))
    [ $k -lt 300 ] || die "the guest did not stop within 60 s of STOP"
    sleep 0.2
done
wait_exit "$cur" "$boot_timeout" || {
    tail -n 20 "$workdir/console-$cur.log" >&2 || true
    die "the guest did not power off within $boot_timeout s of STOP"; }
# One log of the guest's whole run.
for i in $(printf '%s\n' "${!qemu_host[@]}" | sort -n); do
    echo "=== QEMU $i (host ${qemu_host[$i]})$([ "$i" != "$cancelled" ] || echo ": destination of the cancelled migration")"
    cat "$workdir/console-$i.log" 2>/dev/null || true
done > "$workdir/console.log"
verdict=$(marker "$cur" '(PASS|FAIL)')
stopped=$(marker "$cur" STOPPED)
log "guest: $stopped; $verdict ($(elapsed "$t") s)"
case "$verdict" in
    "VPOOL-MIG: PASS n="*) final_n=${verdict##*n=} ;;
    *) tail -n 20 "$workdir/console-$cur.log" >&2 || true; die "the guest did not verify its records: ${verdict:-no verdict}" ;;
esac
[ "$final_n" = "${stopped##*n=}" ] || die "guest stopped at n=${stopped##*n=} but verified n=$final_n"

# ---------------------------------------------------------------- host check
last_h=${qemu_host[$cur]}
if [ "$hosts" = 2 ]; then
    # The owner must follow the VM: within 30 s of the guest's exit, the
    # host it ran on last owns the volume.
    # Both hosts are asked: exactly one may say `here`.
    t=$(now)
    until [ "$(owner)" = "$last_h" ]; do
        if awk -v a="$t" -v b="$(now)" 'BEGIN { exit !(b - a >= 30) }'; then
            for h in A B; do log "vol status on $h: $(vp "$h" vol status "$export" --json 2>&1 | tr -d '\n')"; done
            die "owner of $export is '$(owner)', not host $last_h (where the VM ran last), 30 s after the guest quit"
        fi
        sleep 0.5
    done
    log "owner: host $last_h, where the VM ran last ($(elapsed "$t") s after the guest quit)"
    for h in A B; do log "vol status $export on $h: $(vp "$h" vol status "$export" --json 2>&1 | tr -d '\n')"; done
fi
t=$(now)
qemu-img convert -f raw -O raw "$(nbd_url "$last_h")" "$workdir/readback.img" ||
    die "qemu-img could not read $(nbd_url "$last_h") back"
debugfs -R "dump /data/seq.bin $workdir/seq.bin" "$workdir/readback.img" >/dev/null 2>&1 ||
    die "debugfs could not find /data/seq.bin in the volume read back"
out=$(helper check "$workdir/seq.bin" "$slots" "$final_n" 2>&1) ||
    die "host-side check of the volume read back from host $last_h: $out"
rm -f "$workdir/readback.img" "$workdir/seq.bin"
log "host read-back over NBD from host $last_h: $out"

for h in "${host_list[@]}"; do stop_server "$h"; done
if [ "$hosts" = 2 ]; then
    # Each handover's pause, as the new owner logged it (from holding its
    # client's requests back to serving them here).
    pauses=$(cat "$workdir"/server-[AB].log | sed -n 's/.*volume handed over.*pause_ms=\([0-9]*\).*/\1/p' | sort -n | tr '\n' ' ')
    summary+=("handover pauses (ms, sorted): ${pauses:-none}")
fi
log "summary:"
for line in "${summary[@]}"; do log "  $line"; done
log "PASS with --hosts $hosts: $migrations migrations and 1 cancelled, $final_n records written and flushed, all verified; total $(elapsed "$t_start") s"
