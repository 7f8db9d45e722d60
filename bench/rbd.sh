#!/usr/bin/env bash
# The Ceph RBD peer: `rbd bench` on the micro-cluster of scripts/ceph.sh
# (1 mon, 1 bluestore OSD on a sparse file, Debian 12's Ceph 16.2), the
# figures vpool's pools on S3 are to be set beside.
#
#   bench/rbd.sh [--rounds N] [--threads N] [--io-total SIZE] [--image-size SIZE] [--keep]
#
#   --rounds N         rounds of each workload, alternated (default 3)
#   --threads N        rbd bench --io-threads (default 16)
#   --io-total SIZE    rbd bench --io-total per run (default 64M)
#   --image-size SIZE  the image (default 1G), written in full once first so
#                      that reads hit data (RBD answers reads of objects never
#                      written with zeros without touching the disk)
#   --keep             keep the pool and image afterwards
#
# Uses the cluster up in $VPOOL_CEPH_DIR (default /tmp/vpool-ceph), else
# starts one there and stops it at the end. Creates a pool `vpool-bench-rbd`
# (8 PGs, size 1) and an image in it, with the librbd cache off
# (rbd_cache=false), and runs, per round:
#   rbd bench --io-type write --io-size 4K --io-pattern rand --io-threads 16 --io-total 64M
#   rbd bench --io-type read  --io-size 4K --io-pattern rand --io-threads 16 --io-total 64M
# Prints one parseable line per workload, the median of the rounds and their
# min-max:
#   rbd randwrite_4k_iops=N randwrite_4k_mbps=N min_iops=N max_iops=N rounds=N threads=N
#   rbd randread_4k_iops=N randread_4k_mbps=N min_iops=N max_iops=N rounds=N threads=N
# (MB/s = IOPS x 4096 / 10^6). Takes about a minute with the defaults.
# Figures are measured, never asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="bench/rbd.sh $*"
rounds=3 threads=16 io_total=64M image_size=1G keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --io-total) io_total=$2; shift 2 ;;
    --image-size) image_size=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for t in rbd ceph python3; do
  command -v "$t" >/dev/null || { echo "$t is missing: run scripts/install-deps.sh (or scripts/ceph.sh install)" >&2; exit 1; }
done

cluster_dir=${VPOOL_CEPH_DIR:-/tmp/vpool-ceph}
work=${BENCH_DIR:-$PWD/bench/out/rbd}
rm -rf "$work"; mkdir -p "$work"
started=0
if ! scripts/ceph.sh status "$cluster_dir" 2>/dev/null; then
  scripts/ceph.sh start "$cluster_dir" >/dev/null
  started=1
fi
conf=$cluster_dir/ceph.conf
pool=vpool-bench-rbd image=bench
rbd_() { rbd -c "$conf" --rbd-cache=false "$@"; }
ceph_() { ceph -c "$conf" "$@"; }

cleanup() {
  local rc=$?
  if [ "$started" = 1 ]; then
    scripts/ceph.sh stop "$cluster_dir" || true
  elif [ "$keep" = 0 ]; then
    ceph_ osd pool rm "$pool" "$pool" --yes-i-really-really-mean-it >/dev/null 2>&1 || true
  fi
  [ "$rc" = 0 ] || echo "bench/rbd.sh failed (exit $rc); rbd output in $work" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

ceph_ osd pool rm "$pool" "$pool" --yes-i-really-really-mean-it >/dev/null 2>&1 || true
ceph_ osd pool create "$pool" 8 8 replicated >/dev/null 2>&1
ceph_ osd pool set "$pool" size 1 --yes-i-really-mean-it >/dev/null 2>&1
rbd_ pool init "$pool"
rbd_ create --size "$image_size" "$pool/$image"

echo "# Ceph RBD (rbd bench) on the scripts/ceph.sh micro-cluster"
echo
echo "- command: \`$cmdline\` (rounds=$rounds threads=$threads io-total=$io_total image=$image_size)"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- ceph: $(ceph --version | sed 's/ ([0-9a-f]*)//'), 1 bluestore OSD on a sparse file, pool size 1, rbd_cache=false"
echo "- machine: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r), cluster on $(df --output=source "$cluster_dir" | tail -1)"
echo "- load at start: $(uptime | sed 's/.*load average/load average/')"
echo

# Prefill: the whole image, sequentially, so that reads hit data.
rbd_ bench --io-type write --io-size 4M --io-pattern seq --io-threads 4 \
  --io-total "$image_size" "$pool/$image" >"$work/prefill.out" 2>&1 ||
  { echo "prefill failed:" >&2; tail -20 "$work/prefill.out" >&2; exit 1; }

# bench_run TYPE ROUND: one rbd bench run; appends "TYPE IOPS" to runs.txt.
bench_run() {
  local type=$1 r=$2 out=$work/$1-$2.out
  rbd_ bench --io-type "$type" --io-size 4K --io-pattern rand --io-threads "$threads" \
    --io-total "$io_total" "$pool/$image" >"$out" 2>&1 ||
    { echo "rbd bench --io-type $type failed:" >&2; tail -20 "$out" >&2; exit 1; }
  # Last line: "elapsed: 11   ops: 16384   ops/sec: 1437.5   bytes/sec: 5.6 MiB/s"
  local iops
  iops=$(sed -n 's/.*ops\/sec: *\([0-9.]*\).*/\1/p' "$out" | tail -1)
  [ -n "$iops" ] || { echo "no ops/sec in rbd bench output:" >&2; tail -5 "$out" >&2; exit 1; }
  echo "$type $iops" >>"$work/runs.txt"
}
: >"$work/runs.txt"
for r in $(seq "$rounds"); do
  bench_run write "$r"
  bench_run read "$r"
done

echo "- load at end: $(uptime | sed 's/.*load average/load average/')"
echo
python3 - "$work/runs.txt" "$rounds" "$threads" <<'PY'
import statistics, sys
runs, rounds, threads = sys.argv[1], sys.argv[2], sys.argv[3]
got = {}
for line in open(runs):
    t, iops = line.split()
    got.setdefault(t, []).append(float(iops))
for t, name in (("write", "randwrite_4k"), ("read", "randread_4k")):
    v = got[t]
    med = statistics.median(v)
    print(f"rbd {name}_iops={med:.0f} {name}_mbps={med * 4096 / 1e6:.1f} "
          f"min_iops={min(v):.0f} max_iops={max(v):.0f} rounds={rounds} threads={threads}")
PY
