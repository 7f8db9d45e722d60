#!/usr/bin/env bash
# What `vol import` of a qcow2 image costs against the two ways QEMU's own
# tools do it: a qcow2 made by qemu-img (SIZE virtual, a quarter of it
# random data in scattered 1 MiB runs), imported into a new volume
#   vpool      `vpool vol import V img.qcow2` (qemu-img convert into a sparse
#              temporary raw file, then the sparse import over the API)
#   qemu-nbd   `qemu-img convert -n --target-is-zero -O raw img.qcow2
#              nbd+unix:///V?socket=...` into a volume vpool created (what
#              a user does by hand: straight into vpool's NBD export)
#   raw-file   `qemu-img convert -O raw img.qcow2 file.raw` (the floor: no
#              vpool at all)
# alternating which goes first, seconds each, then medians and ratios. The
# exported volume is compared with the image (qemu-img compare) once.
#
#   bench/import.sh [--rounds N] [--size SIZE]
#
# In bench/out/import. Figures are measured, never asserted; see
# BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=4 size=1G
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
cargo build -q --release -p vpool
vpool=$PWD/target/release/vpool
work=${BENCH_DIR:-$PWD/bench/out/import}
rm -rf "$work"; mkdir -p "$work"
home=$work/home
export VPOOL_CONFIG=/dev/null
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
"$vpool" --home "$home" serve >"$work/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do "$vpool" --home "$home" pool list >/dev/null 2>&1 && break; sleep 0.1; done

# The image: SIZE virtual, every fourth MiB random.
qemu-img create -q -f raw "$work/src.raw" "$size"
python3 - "$work/src.raw" <<'PY'
import os, sys
f = open(sys.argv[1], "r+b")
size = os.fstat(f.fileno()).st_size
for mib in range(0, size >> 20, 4):
    f.seek(mib << 20); f.write(os.urandom(1 << 20))
PY
qemu-img convert -q -f raw -O qcow2 "$work/src.raw" "$work/img.qcow2"
bytes=$(stat -c %s "$work/src.raw")

secs() { local t=$(date +%s.%N); "$@" >/dev/null || { echo "import: $* failed" >&2; return 1; }; awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }'; }
run_vpool() { "$vpool" --home "$home" vol import "v$1" "$work/img.qcow2"; }
run_nbd() {
  "$vpool" --home "$home" vol create "n$1" --size "$bytes" >/dev/null
  qemu-img convert -n --target-is-zero -f qcow2 -O raw "$work/img.qcow2" "nbd+unix:///n$1?socket=$home/nbd.sock"
}
run_file() { rm -f "$work/out.raw"; qemu-img convert -f qcow2 -O raw "$work/img.qcow2" "$work/out.raw"; }

declare -a v=() n=() f=()
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then
    a=$(secs run_vpool "$r"); b=$(secs run_nbd "$r"); c=$(secs run_file)
  else
    c=$(secs run_file); b=$(secs run_nbd "$r"); a=$(secs run_vpool "$r")
  fi
  echo "import round=$r vpool_s=$a qemu_img_to_nbd_s=$b qemu_img_to_file_s=$c"
  v+=("$a"); n+=("$b"); f+=("$c")
done
for vol in v1 n1; do
  "$vpool" --home "$home" vol export "$vol" "$work/check.raw" --force >/dev/null
  qemu-img compare -q -f raw -F raw "$work/src.raw" "$work/check.raw" ||
    { echo "import: volume $vol differs from the image" >&2; exit 1; }
done
echo "import: v1 and n1 equal the image"
python3 - "${v[*]}" "${n[*]}" "${f[*]}" <<'PY'
import statistics, sys
v, n, f = ([float(x) for x in a.split()] for a in sys.argv[1:4])
print(f"qcow2 import: vpool {statistics.median(v):.2f} s, qemu-img to the NBD export {statistics.median(n):.2f} s, qemu-img to a raw file {statistics.median(f):.2f} s")
print(f"ratios (median of per-round): vpool/qemu-img-to-nbd {statistics.median(a / b for a, b in zip(v, n)):.2f}, vpool/qemu-img-to-file {statistics.median(a / c for a, c in zip(v, f)):.2f}")
PY
