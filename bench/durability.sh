#!/usr/bin/env bash
# What remote durability costs: 4 KiB random writes at queue depth 1, each
# followed by a FLUSH (fio --fsync=1) and without, on a pool on S3 with
# `--durability remote` (a FLUSH is in the bucket when acknowledged: the
# flush journal) against the same on `--durability host` (a FLUSH is in the
# host's cache), and against `rbd bench` writes at one thread on the same
# Ceph cluster (an RBD write is durable in the cluster when acknowledged).
#
#   bench/durability.sh [--rounds N] [--runtime SEC] [--iodepth N] [--no-rbd]
#
#   --rounds N      rounds; in each, host and remote alternate (host first in
#                   odd rounds, remote first in even ones) (default 3)
#   --runtime SEC   fio --runtime of each run (default 10)
#   --iodepth N     fio --iodepth, and rbd bench --io-threads (default 1);
#                   above 1, flushes that meet share the journal's PUTs
#   --no-rbd        skip the RBD peer
#
# One `vpool serve` (release build) holds both pools, under
# s3://BUCKET/bench-durability-<random>/{host,remote}; a 256 MiB volume in
# each. The object store: $VPOOL_TEST_S3_ENDPOINT etc. (`. /tmp/vpool-ceph/env`
# after scripts/ceph.sh start). Prints one line per run and per figure
# (`durability NAME=VALUE`), then the medians and the ratios. The pools'
# objects are deleted at the end (remote mode writes every byte twice: a
# run of the defaults leaves GBs in the OSD until radosgw's garbage
# collector, which the script runs, frees them). Figures are measured,
# never asserted; see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 runtime=10 rbd=1 qd=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --iodepth) qd=$2; shift 2 ;;
    --no-rbd) rbd=0; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
# shellcheck source=bench/s3-bench.sh
. bench/s3-bench.sh
work=${BENCH_DIR:-$PWD/bench/out/durability}
rm -rf "$work"; mkdir -p "$work"
home=$work/home
prefix=bench-durability-$(date +%s)-$RANDOM

"$vpool" --home "$home" serve >"$work/serve.log" 2>&1 &
pid=$!
cleanup() {
  kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true
  delete_prefix "$prefix/" 2>/dev/null || echo "note: could not delete s3://$bucket/$prefix/" >&2
  if [ -n "${VPOOL_TEST_CEPH_CONF:-}" ] && command -v radosgw-admin >/dev/null; then
    radosgw-admin -c "$VPOOL_TEST_CEPH_CONF" gc process --include-all >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
for _ in $(seq 300); do
  "$vpool" --home "$home" pool list >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.1
done
for mode in host remote; do
  "$vpool" --home "$home" pool create "$mode" --s3 "s3://$bucket/$prefix/$mode" \
    --endpoint "$endpoint" --cache "$work/cache-$mode" --cache-size 1G \
    --durability "$mode" >/dev/null
  "$vpool" --home "$home" vol create "$mode/v" --size 256M >/dev/null
done

# run MODE FSYNC: IOPS of 4 KiB random writes at $qd (FSYNC=1: each flushed).
run() {
  fio --name=d --ioengine=nbd --uri="nbd+unix:///$1/v?socket=$home/nbd.sock" \
    --rw=randwrite --bs=4k --iodepth="$qd" --fsync="$2" --time_based --runtime="$runtime" \
    --output-format=json 2>>"$work/fio.err" | python3 -c '
import json, sys
t = sys.stdin.read()
print(round(json.loads(t[t.index("{"):])["jobs"][0]["write"]["iops"], 1))'
}

declare -A all=()
for r in $(seq "$rounds"); do
  order=(host remote); [ $((r % 2)) = 0 ] && order=(remote host)
  for fsync in 1 0; do
    for mode in "${order[@]}"; do
      iops=$(run "$mode" "$fsync")
      echo "durability round=$r mode=$mode fsync=$fsync iops=$iops"
      all[$mode-$fsync]+="$iops "
    done
  done
done
rbd_iops=""
if [ "$rbd" = 1 ]; then
  rbd_iops=$(bench/rbd.sh --rounds "$rounds" --threads "$qd" --io-total 4M --image-size 64M \
    | sed -n 's/^rbd randwrite_4k_iops=\([0-9.]*\).*/\1/p')
  echo "durability rbd_randwrite_iops=$rbd_iops threads=$qd"
fi
stats=$("$vpool" --home "$home" cache stats --pool remote --json)
python3 - "$rbd_iops" "$stats" "${all[host-1]}" "${all[remote-1]}" "${all[host-0]}" "${all[remote-0]}" "$qd" <<'PY'
import json, statistics, sys
rbd, stats = sys.argv[1], json.loads(sys.argv[2])
med = lambda s: statistics.median(float(x) for x in s.split())
h1, r1, h0, r0 = (med(a) for a in sys.argv[3:7])
print(f"durability iodepth={sys.argv[7]} host_write_flush_iops={h1} remote_write_flush_iops={r1} ratio={r1 / h1:.3f}")
print(f"durability host_write_iops={h0} remote_write_iops={r0} ratio={r0 / h0:.3f}")
print(f"durability journal_entries={stats['journal_entries']} journal_bytes={stats['journal_bytes']}")
if rbd:
    print(f"durability rbd_write_iops={rbd} remote_write_flush_over_rbd={r1 / float(rbd):.3f}")
PY
