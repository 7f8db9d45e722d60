#!/usr/bin/env bash
# Snapshot and clone costs, vpool beside qemu-img (qcow2) in one run.
#
#   bench/snapshots.sh [--written-gib N] [--fio-secs N]
#
# Prints:
#  1. in-process (vpool-bench snapshots): snapshot creation p50/p99 on a
#     volume with N GiB written, reads through a 100-deep clone chain and
#     after 1000 snapshots as ratios to a plain volume, 100 clones of a
#     template (time, new bytes);
#  2. through the CLI: `vpool snap create` p50/p99 (a process start, an API
#     request, a log record and an fdatasync each);
#  3. the cost of one snapshot a second during a 4 KiB random-write fio run
#     (qd32, over NBD), as the ratio of IOPS with and without, alternated;
#  4. the peer: `qemu-img snapshot -c` (internal qcow2 snapshot) p50/p99 on
#     an image with N GiB written, and 100 backing-file clones
#     (`qemu-img create -b`), time and bytes.
# Figures are measured, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
written_gib=1 fio_secs=15
while [ $# -gt 0 ]; do
  case "$1" in
    --written-gib) written_gib=$2; shift 2 ;;
    --fio-secs) fio_secs=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
for t in fio qemu-img python3; do
  command -v $t >/dev/null || { echo "$t is missing: run scripts/install-deps.sh" >&2; exit 1; }
done
cargo build -q --release -p vpool -p vpool-bench
work=${BENCH_DIR:-$PWD/bench/out/snapshots}
rm -rf "$work"; mkdir -p "$work"
daemon=
cleanup() { [ -n "$daemon" ] && kill "$daemon" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
pct() { python3 -c "import sys; v=sorted(float(x) for x in sys.stdin.read().split()); print(f'p50 {v[len(v)//2]:.1f} ms, p99 {v[min(len(v)-1, round((len(v)-1)*0.99))]:.1f} ms')"; }
ms_of() { local t0 t1; t0=$(date +%s%N); "$@" >/dev/null; t1=$(date +%s%N); echo $(((t1 - t0) / 1000)) | awk '{ printf "%.3f\n", $1 / 1000 }'; }

echo "== in-process (vpool-bench snapshots --written-gib $written_gib)"
target/release/vpool-bench snapshots --pool "$work/inproc" --written-gib "$written_gib"
rm -rf "$work/inproc"

echo
echo "== through the CLI"
export VPOOL_HOME=$work/pool
target/release/vpool serve >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do [ -S "$VPOOL_HOME/nbd.sock" ] && break; sleep 0.1; done
V=target/release/vpool
$V vol create bench --size "${written_gib}G" >/dev/null
uri="nbd+unix:///bench?socket=$VPOOL_HOME/nbd.sock"
fio --name=fill --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=8 --size="${written_gib}G" >/dev/null 2>&1
for i in $(seq 50); do ms_of $V snap create "bench@cli$i"; done | pct | sed 's/^/vpool snap create: /'

echo
echo "== one snapshot a second during 4 KiB random writes (qd32, ${fio_secs} s runs, alternated)"
fio_iops() {
  fio --name=rw --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --size="${written_gib}G" \
      --time_based --runtime="$fio_secs" --output-format=json 2>/dev/null |
    python3 -c "import json,sys; t=sys.stdin.read(); print(json.loads(t[t.index('{'):])['jobs'][0]['write']['iops'])"
}
ratios=()
with_snapshots() { # round -> IOPS of a run with one snapshot a second
  ( i=0; while :; do i=$((i + 1)); $V snap create "bench@r${1}s$i" >/dev/null; sleep 1; done ) &
  local snapper=$!
  fio_iops
  kill $snapper; wait $snapper 2>/dev/null || true
}
for round in 1 2 3 4; do
  # A B, then B A: the volume's state drifts (garbage, cleaner) over the run.
  if [ $((round % 2)) -eq 1 ]; then
    base=$(fio_iops); with=$(with_snapshots "$round")
  else
    with=$(with_snapshots "$round"); base=$(fio_iops)
  fi
  echo "round $round: without $base IOPS, with $with IOPS"
  ratios+=("$(python3 -c "print($with / $base)")")
done
python3 -c "import statistics,sys; r=[float(x) for x in sys.argv[1:]]; print(f'ratio with/without: median {statistics.median(r):.2f} (spread {min(r):.2f}-{max(r):.2f})')" "${ratios[@]}"
kill $daemon; wait $daemon 2>/dev/null || true; daemon=

echo
echo "== peer: qemu-img ($(qemu-img --version | head -1))"
qemu-img create -q -f qcow2 "$work/base.qcow2" "${written_gib}G"
qemu-io -f qcow2 -c "write -P 0x5a 0 ${written_gib}G" "$work/base.qcow2" >/dev/null
for i in $(seq 50); do ms_of qemu-img snapshot -c "s$i" "$work/base.qcow2"; done | pct | sed 's/^/qemu-img snapshot -c: /'
before=$(du -sb "$work" | cut -f1)
t0=$(date +%s%N)
for i in $(seq 100); do
  qemu-img create -q -f qcow2 -b "$work/base.qcow2" -F qcow2 "$work/clone$i.qcow2"
done
t1=$(date +%s%N)
after=$(du -sb "$work" | cut -f1)
echo "qemu-img create -b (100 backing-file clones): $(awk -v ns=$((t1 - t0)) 'BEGIN { printf "%.3f", ns / 1e9 }') s, $((after - before)) new bytes"
