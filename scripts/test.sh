#!/usr/bin/env bash
# THE test command for vpool (CI runs it through .ci/run).
#
#   scripts/test.sh                 all stages
#   scripts/test.sh --skip fuzz     leave out a stage (repeatable):
#                                   deps fmt clippy ceph test fuzz vm libvirt migrate powercut
#   scripts/test.sh --only test     run just these stages (repeatable)
#
# Stages, in order, each timed:
#   deps    scripts/install-deps.sh (quiet when nothing is missing)
#   fmt     cargo fmt --all -- --check
#   clippy  cargo clippy --workspace --all-targets -- -D warnings
#   ceph    scripts/ceph.sh start, then scripts/ceph.sh check: a Ceph RGW (S3)
#           micro-cluster (1 mon, 1 mgr, 1 OSD, radosgw on loopback, ~10 s,
#           ~1 GB of RAM) in $VPOOL_CEPH_DIR (default /tmp/vpool-ceph),
#           reused if already up there. Its DIR/env (VPOOL_TEST_S3_ENDPOINT,
#           VPOOL_TEST_S3_BUCKET, AWS_*, VPOOL_TEST_CEPH_CONF, VPOOL_CEPH_DIR)
#           is exported to the stages after it, with VPOOL_REQUIRE_S3=1 so
#           that tests needing S3 fail instead of skipping. Stopped (and DIR
#           removed) when this script ends, unless VPOOL_KEEP_CEPH=1 or it was
#           already up before. `--only test` runs without it (S3 tests skip):
#           use `--only ceph --only test`.
#   test    cargo test --workspace
#   install scripts/install-check.sh: `cargo install --locked --path
#           crates/vpool` (a debug build reusing the test stage's), then
#           the installed binary serves, and qemu-io writes and reads a
#           volume
#   fuzz    scripts/fuzz-smoke.sh (FUZZ_SECONDS per target, default 20);
#           skipped while there is no fuzz/ directory or target
#   vm      vm/boot-test.sh: Linux boots twice under QEMU (TCG) from a vpool
#           volume served over NBD; during boot 1 the volume moves into
#           another pool (`vol move`, live); the server is SIGKILLed between
#           the boots. VM_SERVER=qemu-nbd runs the same boots against qemu-nbd
#           (to check the harness itself).
#   libvirt vm/libvirt.sh: a real libvirtd (Debian's, in a private mount
#           namespace) defines and starts a TCG domain whose two disks are
#           vpool volumes attached with the XML `vol info --libvirt` prints
#           (Unix socket and --tcp); the guest writes flushed records to
#           both; the daemon is restarted under a running VM (under libvirt
#           when it passes <reconnect>, else under QEMU with the
#           reconnect-delay that libvirt would give) and the guest must go
#           on; every record is checked on the volumes.
#   migrate vm/migrate.sh --hosts 2: a Linux VM (TCG) whose root disk is a
#           volume of a shared pool on the RGW, live-migrated ten times
#           between two vpool daemons (hosts A and B, a peer link each)
#           while it writes and syncs checksummed records; every record is
#           checked, and ownership must follow the VM. Needs the ceph stage.
#   powercut vm/powercut.sh --rounds 4 --self-test --debug: vpool serve inside
#           a QEMU (TCG) VM on ext4 on a virtio disk backed by a host file;
#           the VM's power is cut (QEMU SIGKILLed) 4 times under NBD writes,
#           flushes and snapshots, once also during recovery; after each cut
#           the VM boots again and every flushed write (and the prefix
#           property, as far as the client can see it) is checked. Then one
#           round on a disk that ignores flushes, which the checker must
#           catch. POWERCUT_ROUNDS changes the count (bench/powercut.sh is
#           the long run).
# Every stage runs even if an earlier one failed. The last line is
# `N passed, N failed[, N skipped]` counting stages; exit status 1 if any
# failed. The whole run is meant to take under TEST_BUDGET_SECS (1800);
# stages are killed at TEST_DEADLINE_SECS (4800, under CI's 90 minutes).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1

all_stages=(deps fmt clippy ceph test install fuzz vm libvirt migrate powercut)
skip=()
only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --skip) skip+=("${2:?--skip needs a stage}"); shift 2 ;;
        --only) only+=("${2:?--only needs a stage}"); shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "test.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
for s in "${skip[@]}" "${only[@]}"; do
    [[ " ${all_stages[*]} " == *" $s "* ]] || { echo "test.sh: no stage '$s' (${all_stages[*]})" >&2; exit 2; }
done

budget=${TEST_BUDGET_SECS:-1800}
deadline=${TEST_DEADLINE_SECS:-4800}
start=$(date +%s.%N)
now() { date +%s.%N; }
secs_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

passed=0 failed=0 skipped=0
summary=()
record() { # stage result seconds [note]
    summary+=("$(printf '%-8s %-5s %7s s  %s' "$1" "$2" "$3" "${4:-}")")
}
wanted() {
    local s=$1 x
    for x in "${skip[@]}"; do [ "$x" = "$s" ] && return 1; done
    [ ${#only[@]} -eq 0 ] && return 0
    for x in "${only[@]}"; do [ "$x" = "$s" ] && return 0; done
    return 1
}
skip_stage() { # name reason
    echo
    echo "==> $1: SKIPPED ($2)"
    skipped=$((skipped + 1))
    record "$1" skip 0 "$2"
}
# run_stage NAME NOTE CMD...: runs CMD with stdin closed, under a timeout of
# whatever is left before the deadline.
run_stage() {
    local name=$1 note=$2 t rc left
    shift 2
    left=$(awk -v a="$start" -v b="$(now)" -v d="$deadline" 'BEGIN { printf "%d", d - (b - a) }')
    if [ "$left" -le 30 ]; then
        echo
        echo "==> $name: FAILED (no time left before the ${deadline} s deadline)"
        failed=$((failed + 1))
        record "$name" FAIL 0 "deadline reached"
        return
    fi
    echo
    echo "==> $name: $*"
    t=$(now)
    rc=0
    timeout -k 30 "$left" "$@" </dev/null || rc=$?
    local took
    took=$(secs_since "$t")
    if [ $rc -eq 0 ]; then
        passed=$((passed + 1))
        echo "==> $name: PASS ($took s)"
        record "$name" PASS "$took" "$note"
    else
        failed=$((failed + 1))
        [ $rc -eq 124 ] && note="killed at the ${deadline} s deadline${note:+; $note}"
        echo "==> $name: FAILED, exit $rc ($took s)"
        record "$name" FAIL "$took" "$note"
    fi
}

echo "vpool tests in $REPO ($(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(nproc) cores)"

wanted deps && run_stage deps "" scripts/install-deps.sh
wanted fmt && run_stage fmt "" cargo fmt --all -- --check
wanted clippy && run_stage clippy "" cargo clippy --workspace --all-targets -- -D warnings

if wanted ceph; then
    ceph_dir=${VPOOL_CEPH_DIR:-/tmp/vpool-ceph}
    export VPOOL_REQUIRE_S3=1
    ceph_note="S3 for the tests"
    if scripts/ceph.sh status "$ceph_dir" >/dev/null 2>&1; then
        ceph_note="reused the cluster already up in $ceph_dir"
    elif [ "${VPOOL_KEEP_CEPH:-0}" != 1 ]; then
        stop_ceph() { scripts/ceph.sh stop "$ceph_dir" || echo "test.sh: scripts/ceph.sh stop $ceph_dir failed" >&2; }
        trap stop_ceph EXIT
        trap 'exit 130' INT
        trap 'exit 143' TERM
    else
        ceph_note="kept running (VPOOL_KEEP_CEPH=1)"
    fi
    # shellcheck disable=SC2016  # $1 is for the inner bash
    run_stage ceph "$ceph_note" bash -c \
        'scripts/ceph.sh start "$1" >/dev/null && scripts/ceph.sh check "$1"' ceph "$ceph_dir"
    if [ -f "$ceph_dir/env" ]; then
        # shellcheck disable=SC1091
        . "$ceph_dir/env"
        echo "==> ceph: S3 at $VPOOL_TEST_S3_ENDPOINT, bucket $VPOOL_TEST_S3_BUCKET ($ceph_dir/env)"
    fi
fi

wanted test && run_stage test "" cargo test --workspace
wanted install && run_stage install "cargo install --locked, then a volume over NBD" scripts/install-check.sh

if wanted fuzz; then
    shopt -s nullglob
    fuzz_targets=(fuzz/fuzz_targets/*.rs)
    shopt -u nullglob
    if [ ! -d fuzz ]; then
        skip_stage fuzz "no fuzz/ directory yet"
    elif [ ${#fuzz_targets[@]} -eq 0 ]; then
        skip_stage fuzz "no targets in fuzz/fuzz_targets/ yet"
    else
        run_stage fuzz "${#fuzz_targets[@]} target(s) x ${FUZZ_SECONDS:-20} s" scripts/fuzz-smoke.sh
    fi
fi

if wanted vm; then
    case "${VM_SERVER:-vpool}" in
        vpool)
            run_stage vm "server vpool, moved live during boot 1, SIGKILL between boots" \
                vm/boot-test.sh --server vpool --kill-server --move-to cold ;;
        qemu-nbd)
            # Only to check the harness itself against a known-good server.
            run_stage vm "server qemu-nbd" vm/boot-test.sh --server qemu-nbd ;;
        *) echo "test.sh: VM_SERVER must be vpool or qemu-nbd" >&2; failed=$((failed + 1)) ;;
    esac
fi

if wanted libvirt; then
    run_stage libvirt "libvirt domain with two vpool disks, daemon restarted under a VM" vm/libvirt.sh
fi

if wanted migrate; then
    if [ -n "${VPOOL_TEST_S3_ENDPOINT:-}" ]; then
        run_stage migrate "10 live migrations between two hosts" vm/migrate.sh --hosts 2
    else
        skip_stage migrate "no S3 endpoint (the ceph stage did not run)"
    fi
fi

if wanted powercut; then
    run_stage powercut "${POWERCUT_ROUNDS:-4} power cuts + self-test (dev build)" \
        vm/powercut.sh --rounds "${POWERCUT_ROUNDS:-4}" --self-test --debug
fi

total=$(secs_since "$start")
echo
echo "==> summary (total $total s, budget $budget s)"
for line in "${summary[@]}"; do echo "    $line"; done
if awk -v t="$total" -v b="$budget" 'BEGIN { exit !(t > b) }'; then
    echo "WARNING: the run took $total s, over the $budget s budget"
fi
if [ $skipped -gt 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ $failed -eq 0 ]
