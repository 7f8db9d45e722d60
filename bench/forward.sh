#!/usr/bin/env bash
# What a host that does not own a volume costs its clients, and what moving
# ownership costs: two `vpool serve` (release build), hosts A and B with a
# peer link each, attach one shared pool on S3; volume v is owned by A.
#
#   bench/forward.sh [--rounds N] [--ios N] [--runtime SEC] [--pause-sizes "MIB ..."]
#
#   --rounds N        rounds; in each, the owner A and the forwarding host B
#                     alternate (A first in odd rounds) for every workload
#                     (default 3)
#   --ios N           fio --number_ios of each run (default 30000: 120 MB
#                     of writes, which the bucket keeps; the micro-cluster's
#                     16 GiB OSD fills with time-based runs)
#   --runtime SEC     fio --runtime of each run, a cap (default 20)
#   --pause-sizes L   MiB written on the owner (and not yet in the bucket:
#                     the pools seal after 600 s) before each handover whose
#                     pause is measured (default "0 16 64 256")
#
# Workloads (fio's nbd engine, 4 KiB): random read qd1, random write qd1,
# random write + flush qd1, random write qd16. During them a client stays
# connected to A (an idle qemu-io), so ownership does not move to B. Then,
# for each size in --pause-sizes: that many MiB written on the owner, a
# client on the other host (qemu-io: a write, a pause, a read), and the
# pause the new owner logs (`pause_ms`: from stopping admission to serving
# here: the old owner's upload and release, and the open here).
#
# The object store: $VPOOL_TEST_S3_ENDPOINT etc. (`. /tmp/vpool-ceph/env`
# after scripts/ceph.sh start). Prints `forward NAME=VALUE` lines, then the
# medians and the ratios forwarded/owner. The pool's objects are deleted at
# the end. Figures are measured, never asserted; see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=3 runtime=20 ios=30000 sizes="0 16 64 256"
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --ios) ios=$2; shift 2 ;;
    --pause-sizes) sizes=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
# shellcheck source=bench/s3-bench.sh
. bench/s3-bench.sh
work=${BENCH_DIR:-$PWD/bench/out/forward}
rm -rf "$work"; mkdir -p "$work"
prefix=bench-forward-$(date +%s)-$RANDOM
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  delete_prefix "$prefix/" 2>/dev/null || echo "note: could not delete s3://$bucket/$prefix/" >&2
  if [ -n "${VPOOL_TEST_CEPH_CONF:-}" ] && command -v radosgw-admin >/dev/null; then
    radosgw-admin -c "$VPOOL_TEST_CEPH_CONF" gc process --include-all >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for h in a b; do
  "$vpool" --home "$work/$h" serve --peer-listen "127.0.0.1:$(free_port)" >"$work/$h.log" 2>&1 &
  pids+=($!)
done
for h in a b; do
  for _ in $(seq 300); do
    "$vpool" --home "$work/$h" pool list >/dev/null 2>&1 && break
    sleep 0.1
  done
done
for h in a b; do
  verb=attach extra=()
  [ "$h" = a ] && verb=create extra=(--shared)
  "$vpool" --home "$work/$h" pool "$verb" shared --s3 "s3://$bucket/$prefix" \
    --endpoint "$endpoint" --cache "$work/cache-$h" --cache-size 2G --seal-after 600 \
    "${extra[@]}" >/dev/null
done
"$vpool" --home "$work/a" vol create shared/v --size 1G >/dev/null
uri() { echo "nbd+unix:///shared/v?socket=$work/$1/nbd.sock"; }
# Fill a 256 MiB region so reads find data.
fio --name=fill --ioengine=nbd --uri="$(uri a)" --rw=write --bs=1M --size=256M \
  --output-format=terse >/dev/null 2>>"$work/fio.err"

# run HOST RW QD FSYNC: IOPS of 4 KiB random I/O through HOST's NBD socket.
run() {
  fio --name=f --ioengine=nbd --uri="$(uri "$1")" --rw="$2" --bs=4k --iodepth="$3" \
    --fsync="$4" --size=256M --number_ios="$ios" --runtime="$runtime" --output-format=json \
    2>>"$work/fio.err" | python3 -c '
import json, sys
t = sys.stdin.read(); j = json.loads(t[t.index("{"):])["jobs"][0]
print(round(j["read"]["iops"] + j["write"]["iops"], 1))'
}

# An idle client on A keeps the volume there during the workloads.
qemu-io -f raw -c "sleep 100000000" "$(uri a)" >/dev/null &
pin=$!
pids+=("$pin")
declare -A all=()
workloads=("randread 1 0" "randwrite 1 0" "randwrite 1 1" "randwrite 16 0")
for r in $(seq "$rounds"); do
  order=(a b); [ $((r % 2)) = 0 ] && order=(b a)
  for w in "${workloads[@]}"; do
    read -r rw qd fsync <<<"$w"
    for h in "${order[@]}"; do
      iops=$(run "$h" "$rw" "$qd" "$fsync")
      echo "forward round=$r host=$h rw=$rw qd=$qd fsync=$fsync iops=$iops"
      all["$h $w"]+="$iops "
    done
  done
done
kill "$pin" 2>/dev/null || true
wait "$pin" 2>/dev/null || true

# Handover pauses: write SIZE MiB on the owner, then a client on the
# other host; the new owner logs the pause.
owner=a
for mib in $sizes; do
  other=b; [ "$owner" = b ] && other=a
  if [ "$mib" -gt 0 ]; then
    fio --name=dirty --ioengine=nbd --uri="$(uri "$owner")" --rw=write --bs=1M \
      --offset=512M --size="${mib}M" --output-format=terse >/dev/null 2>>"$work/fio.err"
  fi
  dirty=$("$vpool" --home "$work/$owner" vol status shared/v --json |
    python3 -c 'import json,sys; print(json.load(sys.stdin).get("unuploaded_bytes"))')
  before=$(grep -c "volume handed over" "$work/$other.log" || true)
  qemu-io -f raw -c "write -P 0x42 0 64k" -c "sleep 8000" -c "read -P 0x42 0 64k" "$(uri "$other")" >/dev/null
  pause=$(grep "volume handed over" "$work/$other.log" | sed -n "$((before + 1))p" | sed -n 's/.*pause_ms=\([0-9]*\).*/\1/p')
  # What the old owner still had to upload when it was asked to release.
  released=$(grep "volume released pool" "$work/$owner.log" | tail -n 1)
  at_release=$(sed -n 's/.*unuploaded_bytes=\([0-9]*\).*/\1/p' <<<"$released")
  close_ms=$(sed -n 's/.*close_ms=\([0-9]*\).*/\1/p' <<<"$released")
  echo "forward handover from=$owner to=$other written_mib=$mib unuploaded_after_write=$dirty unuploaded_at_release=${at_release:-?} release_close_ms=${close_ms:-?} pause_ms=${pause:-none}"
  [ -n "$pause" ] && owner=$other
done

python3 - "${workloads[@]}" <<PY
import statistics, sys
all = {$(for k in "${!all[@]}"; do printf '"%s": "%s", ' "$k" "${all[$k]}"; done)}
for w in sys.argv[1:]:
    a = statistics.median(float(x) for x in all["a " + w].split())
    b = statistics.median(float(x) for x in all["b " + w].split())
    rw, qd, fsync = w.split()
    print(f"forward {rw} qd={qd} fsync={fsync} owner_iops={a} forwarded_iops={b} ratio={b / a:.3f}")
PY
