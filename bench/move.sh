#!/usr/bin/env bash
# What `vpool vol move` costs: the move of a volume (half of it written)
# between two local pools of one daemon, against `qemu-img convert` of the
# same volume between the same daemon's NBD exports (a fresh target each
# time); and the slowdown of a fio workload on the volume while it moves.
#
#   bench/move.sh [--rounds N] [--size SIZE] [--runtime SEC] [--s3]
#
#   --rounds N      rounds; in each, move and convert alternate (default 3)
#   --size SIZE     the volume (default 1G); its first half is written
#   --runtime SEC   each fio run for the slowdown (default 10)
#   --s3            the second pool on S3 ($VPOOL_TEST_S3_ENDPOINT etc.,
#                   `. /tmp/vpool-ceph/env`) instead of local
#
# One `vpool serve` (release build) in bench/out/move. Prints one line per
# run (`move NAME=VALUE`), then medians and ratios. Figures are measured,
# never asserted; see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 size=1G runtime=10 s3=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --s3) s3=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine" >&2; exit 1; }
cargo build -q --release -p vpool
vpool=$PWD/target/release/vpool
work=${BENCH_DIR:-$PWD/bench/out/move}
rm -rf "$work"; mkdir -p "$work"
home=$work/home
sock=$home/nbd.sock
v() { "$vpool" --home "$home" "$@"; }
uri() { printf 'nbd+unix:///%s?socket=%s' "$1" "$sock"; }
now() { date +%s.%N; }
secs() { python3 -c "print(round($2 - $1, 3))"; }

"$vpool" --home "$home" serve >"$work/serve.log" 2>&1 &
pid=$!
cleanup() { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 300); do
  v pool list >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
v pool create a --dir "$work/a" >/dev/null
if [ "$s3" = 1 ]; then
  : "${VPOOL_TEST_S3_ENDPOINT:?no S3 endpoint: . /tmp/vpool-ceph/env}"
  v pool create b --s3 "s3://$VPOOL_TEST_S3_BUCKET/bench-move-$(date +%s)-$RANDOM" \
    --endpoint "$VPOOL_TEST_S3_ENDPOINT" --cache "$work/b" --cache-size 4G >/dev/null
else
  v pool create b --dir "$work/b" >/dev/null
fi
v vol create a/v --size "$size" >/dev/null
bytes=$(v --json vol info a/v | python3 -c 'import json,sys; print(json.load(sys.stdin)["size_bytes"])')
fio --name=fill --ioengine=nbd --uri="$(uri a/v)" --rw=write --bs=1M --iodepth=8 \
  --size=$((bytes / 2)) --output-format=terse >/dev/null 2>>"$work/fio.err"

# fio_iops: 4 KiB random writes at qd1 on the volume, wherever it is ($1).
fio_iops() {
  fio --name=w --ioengine=nbd --uri="$(uri "$1")" --rw=randwrite --bs=4k --iodepth=1 \
    --size=$((bytes / 2)) --time_based --runtime="$runtime" --output-format=json \
    2>>"$work/fio.err" | python3 -c '
import json, sys
t = sys.stdin.read()
print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"], 1))'
}

declare -A all=()
at=a
for r in $(seq "$rounds"); do
  other=$([ "$at" = a ] && echo b || echo a)
  # The move there (and the volume stays there for the next round).
  t=$(now); v vol move "$at/v" "$other" >/dev/null; move=$(secs "$t" "$(now)")
  # qemu-img convert of the same image between the same two pools.
  v vol create "$at/c" --size "$size" >/dev/null
  t=$(now)
  qemu-img convert -n -f raw -O raw "$(uri "$other/v")" "$(uri "$at/c")"
  convert=$(secs "$t" "$(now)")
  v vol delete "$at/c" >/dev/null
  at=$other
  # fio alone, then during a move slowed to last the run.
  alone=$(fio_iops "$at/v")
  other=$([ "$at" = a ] && echo b || echo a)
  rate=$(( bytes / 2 / runtime ))
  v vol move "$at/v" "$other" --max-rate "$rate" --detach >/dev/null
  during=$(fio_iops "$at/v")
  while v --json job list | python3 -c 'import json,sys; sys.exit(0 if any(j["state"]=="running" for j in json.load(sys.stdin)["jobs"]) else 1)'; do
    sleep 0.2
  done
  at=$other
  echo "move round=$r move_s=$move convert_s=$convert fio_alone_iops=$alone fio_during_move_iops=$during"
  all[move]+="$move "; all[convert]+="$convert "; all[alone]+="$alone "; all[during]+="$during "
done
python3 - "${all[move]}" "${all[convert]}" "${all[alone]}" "${all[during]}" <<'EOF'
import statistics, sys
m, c, a, d = ([float(x) for x in s.split()] for s in sys.argv[1:])
med = statistics.median
print(f"move median: move {med(m):.2f} s, qemu-img convert {med(c):.2f} s, move/convert {med([x / y for x, y in zip(m, c)]):.2f}")
print(f"fio 4k randwrite qd1: alone {med(a):.0f} IOPS, during a move {med(d):.0f} IOPS, during/alone {med([y / x for x, y in zip(a, d)]):.2f}")
EOF
