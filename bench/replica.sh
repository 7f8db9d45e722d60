#!/usr/bin/env bash
# What `vpool replica` costs: the first (whole) run of a volume (half of it
# written) into another pool, against `qemu-img convert` of the same
# volume between the same daemon's NBD exports (a fresh target); then, in
# each round, CHANGE% of the volume rewritten by fio (4 KiB random
# writes) and an incremental run: its duration against a convert, the
# bytes it wrote per byte changed. With --s3, the objects the replica
# pool's bucket holds per GiB replicated.
#
#   bench/replica.sh [--rounds N] [--size SIZE] [--change PCT] [--s3]
#
#   --rounds N      incremental rounds (default 3)
#   --size SIZE     the volume (default 1G); its first half is written
#   --change PCT    percent of the volume rewritten before each run
#                   (default 1)
#   --s3            the replica's pool on S3 ($VPOOL_TEST_S3_ENDPOINT
#                   etc., `. /tmp/vpool-ceph/env`) instead of local
#
# One `vpool serve` (release build) in bench/out/replica. Prints one line
# per run (`replica NAME=VALUE`), then medians and ratios. Figures are
# measured, never asserted; see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 size=1G change=1 s3=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --change) change=$2; shift 2 ;;
    --s3) s3=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$s3" = 1 ]; then
  # shellcheck source=bench/s3-bench.sh
  . bench/s3-bench.sh
else
  fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine" >&2; exit 1; }
  cargo build -q --release -p vpool
  vpool=$PWD/target/release/vpool
fi
work=${BENCH_DIR:-$PWD/bench/out/replica}
rm -rf "$work"; mkdir -p "$work"
home=$work/home
sock=$home/nbd.sock
prefix=bench-replica-$(date +%s)-$RANDOM
v() { "$vpool" --home "$home" "$@"; }
uri() { printf 'nbd+unix:///%s?socket=%s' "$1" "$sock"; }
now() { date +%s.%N; }
secs() { python3 -c "print(round($2 - $1, 3))"; }
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

"$vpool" --home "$home" serve >"$work/serve.log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  if [ "$s3" = 1 ]; then delete_prefix "$prefix/" || true; fi
}
trap cleanup EXIT
for _ in $(seq 300); do
  v pool list >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
v pool create a --dir "$work/a" >/dev/null
if [ "$s3" = 1 ]; then
  v pool create b --s3 "s3://$bucket/$prefix" --endpoint "$endpoint" \
    --cache "$work/b" --cache-size 4G >/dev/null
else
  v pool create b --dir "$work/b" >/dev/null
fi
v vol create a/v --size "$size" >/dev/null
bytes=$(v --json vol info a/v | field '["size_bytes"]')
fio --name=fill --ioengine=nbd --uri="$(uri a/v)" --rw=write --bs=1M --iodepth=8 \
  --size=$((bytes / 2)) --output-format=terse >/dev/null 2>>"$work/fio.err"

# convert: seconds for qemu-img convert of a/v into a fresh volume of b.
convert() {
  v vol create b/c --size "$size" >/dev/null
  local t; t=$(now)
  qemu-img convert -n -f raw -O raw "$(uri a/v)" "$(uri b/c)"
  secs "$t" "$(now)"
  v vol delete b/c >/dev/null
}
# run_job ID: waits for job ID; prints "SECONDS CHANGED MOVED".
run_job() {
  v --json job wait "$1" | python3 -c '
import json, sys
r = json.load(sys.stdin)["result"]
print(r["took_ms"] / 1000, r["changed_bytes"], r["moved_bytes"])'
}

full_convert=$(convert)
job=$(v --json replica add a/v --to b | field '["job"]')
read -r full_s _ full_moved < <(run_job "$job")
echo "replica first run_s=$full_s moved_bytes=$full_moved convert_s=$full_convert"
declare -A all=()
ios=$(( bytes * change / 100 / 4096 ))
for r in $(seq "$rounds"); do
  fio --name=change --ioengine=nbd --uri="$(uri a/v)" --rw=randwrite --bs=4k --iodepth=8 \
    --number_ios="$ios" --size="$bytes" --randrepeat=0 --output-format=terse >/dev/null 2>>"$work/fio.err"
  job=$(v --json replica run a/v --detach | field '["id"]')
  read -r inc_s changed moved < <(run_job "$job")
  conv=$(convert)
  echo "replica round=$r run_s=$inc_s changed_bytes=$changed moved_bytes=$moved written_by_fio=$((ios * 4096)) convert_s=$conv"
  all[run]+="$inc_s "; all[conv]+="$conv "; all[moved]+="$moved "; all[written]+="$((ios * 4096)) "
done
objects=-
if [ "$s3" = 1 ]; then
  for _ in $(seq 1200); do
    v --json cache stats --pool b | python3 -c '
import json, sys
s = json.load(sys.stdin)
sys.exit(0 if s["upload_lag_bytes"] == 0 and s["dirty_bytes"] < 4096 else 1)' && break
    sleep 0.1
  done
  objects=$(list_keys "$prefix/" | wc -l)
fi
python3 - "$full_s" "$full_convert" "$full_moved" "${all[run]}" "${all[conv]}" "${all[moved]}" "${all[written]}" "$objects" <<'EOF'
import statistics, sys
full_s, full_conv, full_moved = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
run, conv, moved, written = ([float(x) for x in s.split()] for s in sys.argv[4:8])
objects = sys.argv[8]
med = statistics.median
print(f"first run: {full_s:.2f} s, qemu-img convert {full_conv:.2f} s, run/convert {full_s / full_conv:.2f}")
print(f"incremental run median: {med(run):.2f} s, convert {med(conv):.2f} s, run/convert {med([x / y for x, y in zip(run, conv)]):.3f}")
print(f"bytes written per byte fio wrote: {med([m / w for m, w in zip(moved, written)]):.2f}")
if objects != "-":
    gib = (full_moved + sum(moved)) / 2**30
    print(f"objects in the bucket: {objects} for {gib:.2f} GiB replicated ({int(objects) / gib:.0f} per GiB)")
EOF
