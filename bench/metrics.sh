#!/usr/bin/env bash
# What counting I/O for `GET /metrics` costs: two `vpool serve` (release
# build), one with `--no-io-metrics`, each with a volume; fio 4 KiB random
# writes and reads on each in turn, alternating which goes first; IOPS
# with counting over IOPS without.
#
#   bench/metrics.sh [--rounds N] [--runtime SEC] [--iodepth N]
#
#   --rounds N      rounds (default 4)
#   --runtime SEC   each fio run (default 10)
#   --iodepth N     fio's queue depth (default 1)
#
# In bench/out/metrics. Prints one line per run (`metrics NAME=VALUE`),
# then medians and ratios. Figures are measured, never asserted; see
# BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=4 runtime=10 iodepth=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --iodepth) iodepth=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine" >&2; exit 1; }
cargo build -q --release -p vpool
vpool=$PWD/target/release/vpool
work=${BENCH_DIR:-$PWD/bench/out/metrics}
rm -rf "$work"; mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
start() { # HOME [ARGS...]
  local home=$1; shift
  "$vpool" --home "$home" serve "$@" >"$home.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 300); do
    "$vpool" --home "$home" pool list >/dev/null 2>&1 && break
    sleep 0.1
  done
  "$vpool" --home "$home" vol create v --size 1G >/dev/null
  fio --name=fill --ioengine=nbd --uri="nbd+unix:///v?socket=$home/nbd.sock" --rw=write \
    --bs=1M --iodepth=8 --size=256M --output-format=terse >/dev/null 2>>"$work/fio.err"
}
start "$work/on"
start "$work/off" --no-io-metrics
# iops HOME RW: fio 4k IOPS on the first 256 MiB of HOME's volume.
iops() {
  fio --name=m --ioengine=nbd --uri="nbd+unix:///v?socket=$1/nbd.sock" --rw="$2" --bs=4k \
    --iodepth="$iodepth" --size=256M --time_based --runtime="$runtime" --output-format=json \
    2>>"$work/fio.err" | python3 -c '
import json, sys
t = sys.stdin.read()
j = json.loads(t[t.index("{"):])["jobs"][0]
print(round(j["write"]["iops"] + j["read"]["iops"], 1))'
}
declare -A all=()
for r in $(seq "$rounds"); do
  for rw in randwrite randread; do
    if [ $((r % 2)) = 1 ]; then
      on=$(iops "$work/on" "$rw"); off=$(iops "$work/off" "$rw")
    else
      off=$(iops "$work/off" "$rw"); on=$(iops "$work/on" "$rw")
    fi
    echo "metrics round=$r rw=$rw iops_counted=$on iops_not_counted=$off"
    all[$rw]+="$on/$off "
  done
done
python3 - "${all[randwrite]}" "${all[randread]}" "$iodepth" <<'EOF'
import statistics, sys
for name, runs in (("randwrite", sys.argv[1]), ("randread", sys.argv[2])):
    pairs = [tuple(float(x) for x in p.split("/")) for p in runs.split()]
    on, off = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    print(f"4k {name} qd{sys.argv[3]}: counted {on:.0f} IOPS, not counted {off:.0f} IOPS, counted/not {ratio:.3f}")
EOF
