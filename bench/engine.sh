#!/usr/bin/env bash
# In-process engine throughput beside fio on a raw file on the same disk, in
# one run, alternating (A B A B ...) because this machine drifts; prints the
# median of the pairwise ratios and their spread. Also: metadata memory per
# mapped block, and recovery time after SIGKILL of a volume that took random
# 4 KiB writes.
#
#   bench/engine.sh [--rounds N] [--total-mib N] [--recovery-writes N]
#
# Figures are measured, never asserted. See BENCHMARKS.md for the latest table.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 total_mib=256 recovery_writes=1000000
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --total-mib) total_mib=$2; shift 2 ;;
    --recovery-writes) recovery_writes=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v fio >/dev/null || { echo "fio is missing: run scripts/install-deps.sh" >&2; exit 1; }
cargo build -q --release -p vpool-bench
bin=target/release/vpool-bench
work=${BENCH_DIR:-$PWD/bench/out/engine}
rm -rf "$work"; mkdir -p "$work"
size=$((1 << 30))
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

fio_run() { # pattern -> MB/s
  local rw=$1 bs=$2 fsync=$3
  rm -f "$work/raw"
  fio --name=raw --filename="$work/raw" --size=$size --rw="$rw" --bs="$bs" --io_size=$((total_mib << 20)) \
      --ioengine=psync --fsync="$fsync" --end_fsync=1 --randrepeat=1 --output-format=json 2>/dev/null \
    | python3 -c "import json,sys; j=json.load(sys.stdin)['jobs'][0]['write']; print(j['bw_bytes']/1e6)"
}
vpool_run() {
  local pattern=$1 flush=$2
  rm -rf "$work/pool"
  "$bin" write --pool "$work/pool" --pattern "$pattern" --size-bytes $size \
      --total-bytes $((total_mib << 20)) --flush-every "$flush" | json "['mb_per_s']"
}

ratios() { python3 - "$@" <<'PY'
import statistics, sys
name, *vals = sys.argv[1:]
pairs = [(float(vals[i]), float(vals[i+1])) for i in range(0, len(vals), 2)]
r = [a / b for a, b in pairs]
print(f"| {name} | {statistics.median([a for a,_ in pairs]):.1f} | {statistics.median([b for _,b in pairs]):.1f} | {statistics.median(r):.2f} | {min(r):.2f}-{max(r):.2f} |")
PY
}

echo "| workload | vpool MB/s (median) | fio raw file MB/s (median) | ratio vpool/fio (median of pairs) | spread |"
echo "|---|---|---|---|---|"
vals=()
for _ in $(seq "$rounds"); do
  vals+=("$(vpool_run randwrite 32)" "$(fio_run randwrite 4k 32)")
done
ratios "4 KiB random write, flush every 32" "${vals[@]}"
vals=()
for _ in $(seq "$rounds"); do
  vals+=("$(vpool_run seqwrite 0)" "$(fio_run write 1m 0)")
done
ratios "1 MiB sequential write" "${vals[@]}"

echo
echo "metadata memory:"
"$bin" memory --blocks 1000000

echo
echo "recovery after SIGKILL: 4 GiB volume, $recovery_writes random 4 KiB writes"
rm -rf "$work/pool"
"$bin" write --pool "$work/pool" --pattern randwrite --size-bytes $((4 << 30)) \
   --total-bytes $((recovery_writes * 4096)) --flush-every 0 --wait-for-kill >"$work/writer.json" &
pid=$!
until [ -s "$work/writer.json" ]; do
  kill -0 $pid 2>/dev/null || { echo "writer died" >&2; exit 1; }
  sleep 0.2
done
kill -9 $pid; wait $pid 2>/dev/null || true
"$bin" recover --pool "$work/pool"
rm -rf "$work"
