#!/usr/bin/env bash
# A pool on S3 (Ceph RGW on loopback) against the same volume on a local
# pool, against the object store's own PUT/GET speed, and against Ceph RBD
# on the same cluster: the figures of the S3-pools issue, in one run.
#
#   bench/s3.sh [--quick] [--rounds N] [--runtime SEC] [--ramp SEC] [--size SIZE]
#               [--cold-size SIZE] [--lag-runtime SEC] [--no-rbd] [--keep]
#
#   --quick            a smoke run for CI (< 1 min): --rounds 1 --runtime 3
#                      --ramp 0 --size 64m --cold-size 64m --lag-runtime 5,
#                      cache 1G, rbd.sh with --io-total 4M --image-size 64M;
#                      options given after it override it
#   --rounds N         rounds of every alternated comparison (default 3)
#   --runtime SEC      fio --runtime of each warm run and cold random read (default 15)
#   --ramp SEC         fio --ramp_time before each warm run (default 1)
#   --size SIZE        the warm volume, fio syntax (default 1g)
#   --cold-size SIZE   the volume written, uploaded and read back cold (default 1g)
#   --lag-runtime SEC  the 4 KiB random-write load under which the upload lag
#                      is sampled every second (default 30)
#   --no-rbd           skip the RBD peer
#   --keep             keep the pools' data (local pool, cache directories)
#
# What it measures (fio's nbd engine; 4 KiB random I/O at --iodepth 16, like
# rbd.sh's 16 threads):
#   1. warm: 4 KiB random read and write IOPS on a volume of an S3 pool whose
#      cache (4 GiB) holds it (written, uploaded, read once), as a ratio to
#      the same volume on a local pool; one `vpool serve` per pool; the pair
#      is run A B in odd rounds, B A in even ones. Target >= 0.8.
#   2. cold: a --cold-size volume is written (1 MiB sequential writes) and
#      uploaded, the daemon stopped, a fresh empty cache directory attached
#      (`vpool pool attach`) and served, and the volume read sequentially
#      (1 MiB, qd 8, and again on another fresh cache at qd 1): MB/s (target
#      >= 200), alternated with plain parallel GETs (4 at a time, curl) of
#      the same segment objects from the bucket;
#      then on a fresh cache again, random 4 KiB reads (qd 16) for --runtime
#      seconds: bytes fetched from the bucket per byte fio read (target <= 2).
#   3. upload: the cold volume's segment objects' bytes over the time from
#      its first write until its daemon has stopped (a clean stop uploads the
#      open segment too), and the daemon's upload_mb_per_s, alternated with
#      plain parallel PUTs (4 at a time) of as many 32 MiB objects; then
#      upload_lag_bytes and upload_lag_seconds sampled every second under
#      --lag-runtime seconds of 4 KiB random writes (qd 16) on the warm
#      volume: max and median.
#   4. peer: bench/rbd.sh --rounds 1 once per round (after the vpool runs in
#      odd rounds, before them in even ones), and vpool-S3's warm 4 KiB
#      random write/read IOPS of the same round as a ratio to rbd's.
# After every S3 write run the script waits until no sealed segment is left
# to upload, so no run pays for the previous one's uploads. Each run also
# records the CPU seconds of the daemon, radosgw and ceph-osd (all on this
# machine). Prints one parseable line per figure (`s3 NAME=VALUE ...`) and a
# summary table; runs.jsonl, lag.tsv and the daemons' logs stay in
# bench/out/s3/.
#
# The object store: $VPOOL_TEST_S3_ENDPOINT, $VPOOL_TEST_S3_BUCKET and the
# AWS_* credentials if set; else the scripts/ceph.sh cluster in
# $VPOOL_CEPH_DIR (default /tmp/vpool-ceph), started if it is not up (and
# then stopped at the end). The two pools go under s3://BUCKET/bench-<random>/
# (warm/ and cold/); that prefix (and bench-<random>-raw/, the plain PUTs) is
# deleted at the end, also on failure or Ctrl-C, and radosgw's garbage collector is run so the space
# comes back. Figures are measured, never asserted; see BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="bench/s3.sh $*"
rounds=3 runtime=15 ramp=1 size=1g cold_size=1g lag_runtime=30 cache_size=4G
rbd=1 keep=0 qd=16
rbd_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) rounds=1 runtime=3 ramp=0 size=64m cold_size=64m lag_runtime=5 cache_size=1G
             rbd_args=(--io-total 4M --image-size 64M); shift ;;
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --ramp) ramp=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --cold-size) cold_size=$2; shift 2 ;;
    --lag-runtime) lag_runtime=$2; shift 2 ;;
    --no-rbd) rbd=0; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

missing=()
for tool in fio nbdinfo curl python3 cargo; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing tools: ${missing[*]} (Debian: apt-get install fio libnbd-bin curl python3; cargo from rustup)" >&2
  exit 1
fi
fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine (Debian's fio package does)" >&2; exit 1; }

to_bytes() {
  python3 - "$1" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)([kmgt]?)i?b?", sys.argv[1].lower())
if not m: sys.exit(f"bad size {sys.argv[1]!r}")
print(int(m[1]) << (10 * " kmgt".index(m[2] or " ")))
PY
}
size_bytes=$(to_bytes "$size")
cold_bytes=$(to_bytes "$cold_size")
for b in "$size_bytes" "$cold_bytes"; do
  [ $((b % (1 << 20))) -eq 0 ] && [ "$b" -ge $((16 << 20)) ] \
    || { echo "--size and --cold-size must be whole MiB, at least 16 MiB" >&2; exit 2; }
done

cargo build -q --release -p vpool
vpool=$PWD/target/release/vpool
work=${BENCH_DIR:-$PWD/bench/out/s3}
export VPOOL_CONFIG_DIR=$work/config   # never touch the user's pools.json
rm -rf "$work"; mkdir -p "$work"

# --- the object store ---
cluster_dir=${VPOOL_CEPH_DIR:-/tmp/vpool-ceph}
started_cluster=0
if [ -z "${VPOOL_TEST_S3_ENDPOINT:-}" ]; then
  if ! scripts/ceph.sh status "$cluster_dir" >/dev/null 2>&1; then
    echo "starting the Ceph micro-cluster in $cluster_dir (scripts/ceph.sh start)" >&2
    scripts/ceph.sh start "$cluster_dir" >/dev/null
    started_cluster=1
  fi
  # shellcheck disable=SC1091
  . "$cluster_dir/env"
fi
endpoint=${VPOOL_TEST_S3_ENDPOINT:?no S3 endpoint}
bucket=${VPOOL_TEST_S3_BUCKET:?no S3 bucket}
region=${AWS_REGION:-us-east-1}
: "${AWS_ACCESS_KEY_ID:?no AWS_ACCESS_KEY_ID}" "${AWS_SECRET_ACCESS_KEY:?no AWS_SECRET_ACCESS_KEY}"
prefix=bench-$(date +%s)-$RANDOM
url=s3://$bucket/$prefix/warm
ceph_conf=$cluster_dir/ceph.conf
have_ceph=0
[ -f "$ceph_conf" ] && scripts/ceph.sh status "$cluster_dir" >/dev/null 2>&1 && have_ceph=1
if [ "$rbd" = 1 ] && [ "$have_ceph" = 0 ]; then
  echo "note: no scripts/ceph.sh cluster up in $cluster_dir: the RBD peer is skipped" >&2
  rbd=0
fi

# sig, list_keys PREFIX, delete_prefix PREFIX.
# shellcheck source=bench/s3-keys.sh
. bench/s3-keys.sh

# --- processes ---
declare -A dpid=()
sampler_pid=""
cleanup() {
  local rc=$?
  [ -z "$sampler_pid" ] || kill "$sampler_pid" 2>/dev/null || true
  for name in "${!dpid[@]}"; do kill -TERM "${dpid[$name]}" 2>/dev/null || true; done
  for name in "${!dpid[@]}"; do
    # A clean stop of an S3 daemon uploads what is left first.
    for _ in $(seq 600); do kill -0 "${dpid[$name]}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${dpid[$name]}" 2>/dev/null || true
    wait "${dpid[$name]}" 2>/dev/null || true
  done
  if [ "$keep" = 0 ]; then
    delete_prefix "$prefix/" 2>/dev/null || echo "note: could not delete $url/" >&2
    delete_prefix "$prefix-raw/" 2>/dev/null || true
    # Deleted objects' data stays in RGW until its garbage collector runs (2 h by default).
    if [ "$have_ceph" = 1 ] && command -v radosgw-admin >/dev/null; then
      radosgw-admin -c "$ceph_conf" gc process --include-all >/dev/null 2>&1 || true
    fi
    rm -rf "$work"/local "$work"/cache-* "$work"/blob
  fi
  if [ "$started_cluster" = 1 ]; then scripts/ceph.sh stop "$cluster_dir" >/dev/null 2>&1 || true; fi
  [ "$rc" = 0 ] || echo "bench/s3.sh failed (exit $rc); logs in $work" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_daemon NAME DIR: `vpool serve` on DIR, until its API answers.
start_daemon() {
  local name=$1 dir=$2
  "$vpool" --home "$dir" serve >"$work/$name.log" 2>&1 &
  dpid[$name]=$!
  for _ in $(seq 600); do
    if ! kill -0 "${dpid[$name]}" 2>/dev/null; then
      echo "vpool serve ($name) exited during startup; its log:" >&2; cat "$work/$name.log" >&2; return 1
    fi
    [ -S "$dir/api.sock" ] && "$vpool" --home "$dir" vol list >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "vpool serve ($name) did not answer within 60 s; its log:" >&2; cat "$work/$name.log" >&2; return 1
}
# stop_daemon NAME: SIGTERM (an S3 daemon uploads everything and lets the pool go), wait.
stop_daemon() {
  local name=$1 pid=${dpid[$1]}
  kill -TERM "$pid"
  for _ in $(seq 1200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "vpool serve ($name) did not stop within 120 s; killing it" >&2; kill -KILL "$pid"
  fi
  wait "$pid" 2>/dev/null || true
  unset "dpid[$name]"
}
# new_cache NAME: a fresh, empty cache directory attached to the pool, served.
new_cache() {
  local dir=$work/cache-$1
  rm -rf "$dir"
  "$vpool" pool attach --s3 "$url" --endpoint "$endpoint" --cache "$dir" --cache-size "$cache_size" >/dev/null
  start_daemon "$1" "$dir"
}

# stats DIR FIELD...: those fields of `vpool cache stats --json`, space-separated.
stats() {
  local dir=$1; shift
  "$vpool" --home "$dir" cache stats --json | python3 -c '
import json, sys
j = json.load(sys.stdin)
print(" ".join(str(j[k]) for k in sys.argv[1:]))' "$@"
}
# settle DIR: until no sealed segment waits for upload (fails after 5 min); prints the seconds waited.
settle() {
  local t0 lag
  t0=$(date +%s.%N)
  for _ in $(seq 3000); do
    lag=$(stats "$1" upload_lag_bytes)
    [ "$lag" = 0 ] && break
    sleep 0.1
  done
  if [ "$lag" != 0 ]; then
    echo "the upload lag of $1 is still $lag bytes after 5 min; the object store's last error: $(stats "$1" last_error)" >&2
    return 1
  fi
  python3 -c "import sys, time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$t0"
}
# cpu PID: its CPU seconds so far (user + system, all threads); 0 if gone.
clk_tck=$(getconf CLK_TCK)
cpu() {
  local pid=${1:-0}
  [ -r "/proc/$pid/stat" ] || { echo 0; return; }
  awk -v hz="$clk_tck" '{ sub(/.*\) /, ""); printf "%.2f\n", ($12 + $13) / hz }' "/proc/$pid/stat" 2>/dev/null || echo 0
}
ceph_pid() { cat "$cluster_dir/pid/$1.pid" 2>/dev/null || echo 0; }
# cpus DAEMON-PID: "PID:SECONDS" of the daemon, radosgw and ceph-osd.
cpus() {
  local r o
  r=$(ceph_pid rgw) o=$(ceph_pid osd)
  echo "$1:$(cpu "$1") $r:$(cpu "$r") $o:$(cpu "$o")"
}
# cpu_fields "$(cpus ..)" "$(cpus ..)": rec's cpu_daemon_s= cpu_rgw_s= cpu_osd_s=
# (-1 where the process changed in between, e.g. radosgw restarted).
cpu_fields() {
  python3 - "$1" "$2" <<'PY'
import sys
a, b = sys.argv[1].split(), sys.argv[2].split()
out = []
for name, x, y in zip(("daemon", "rgw", "osd"), a, b):
    (px, sx), (py, sy) = x.split(":"), y.split(":")
    out.append(f"cpu_{name}_s={float(sy) - float(sx):.2f}" if px == py and px != "0" else f"cpu_{name}_s=-1")
print(" ".join(out))
PY
}
# rec K=V...: one JSON line (numbers stay numbers) appended to runs.jsonl.
rec() {
  python3 -c '
import json, sys
d = {}
for kv in sys.argv[1:]:
    k, v = kv.split("=", 1)
    try: d[k] = int(v)
    except ValueError:
        try: d[k] = float(v)
        except ValueError: d[k] = v
print(json.dumps(d))' "$@" >>"$work/runs.jsonl"
}
now() { date +%s.%N; }
# rgw_gc: radosgw keeps deleted objects' data until its garbage collector runs
# (2 h by default); the runs delete GiBs (the cleaner's dead segments, the
# plain PUTs), so collect between measurements or the micro-cluster's OSD fills.
rgw_gc() {
  [ "$have_ceph" = 1 ] && command -v radosgw-admin >/dev/null || return 0
  timeout 300 radosgw-admin -c "$ceph_conf" gc process --include-all >/dev/null 2>&1 || true
}
osd_avail() {
  [ "$have_ceph" = 1 ] || { echo "?"; return; }
  timeout 30 ceph -c "$ceph_conf" df -f json 2>/dev/null \
    | python3 -c 'import json, sys; print("%.1f GiB" % (json.load(sys.stdin)["stats"]["total_avail_bytes"] / 2**30))' \
    || echo "?"
}
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }

# fio_run URI ARGS...: prints "IOPS MB/s IO_BYTES".
fio_run() {
  local uri=$1; shift
  fio --name=s3bench --ioengine=nbd --uri="$uri" --output-format=json "$@" 2>"$work/fio.err" \
    | python3 -c '
import json, sys
text = sys.stdin.read()  # fio prints "fio: connected to NBD server" before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
if j["error"]:
    sys.exit("fio error %s" % j["error"])
d = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
print(d["iops"], d["bw_bytes"] / 1e6, d["io_bytes"])
' || { echo "fio failed on $uri:" >&2; cat "$work/fio.err" >&2; return 1; }
}

# The pools: a local one and one on S3, a daemon each, the same volume on both.
"$vpool" pool create --s3 "$url" --endpoint "$endpoint" --cache "$work/cache-warm" \
  --cache-size "$cache_size" >"$work/pool-create.out" 2>&1 \
  || { echo "vpool pool create failed:" >&2; cat "$work/pool-create.out" >&2; exit 1; }
start_daemon warm "$work/cache-warm"
start_daemon local "$work/local"
s3dir=$work/cache-warm s3name=warm
for d in "$work/local" "$s3dir"; do "$vpool" --home "$d" vol create bench --size "$size_bytes" >/dev/null; done
declare -A uri=([s3]="nbd+unix:///bench?socket=$s3dir/nbd.sock"
                [local]="nbd+unix:///bench?socket=$work/local/nbd.sock")
declare -A pid_of=([s3]=warm [local]=local)

echo "# vpool pool on S3 (Ceph RGW) vs local pool, object store, and RBD"
echo
echo "- command: \`$cmdline\` (rounds=$rounds runtime=${runtime}s ramp=${ramp}s warm volume=$size_bytes cold volume=$cold_bytes lag-runtime=${lag_runtime}s cache=$cache_size qd=$qd)"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- vpool: $("$vpool" --version) ($(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates 2>/dev/null || echo '+dirty'))"
echo "- object store: $endpoint, bucket $bucket, pools under s3://$bucket/$prefix/$([ "$have_ceph" = 1 ] && echo ", $(ceph --version 2>/dev/null | sed 's/ ([0-9a-f]*)//') radosgw (scripts/ceph.sh micro-cluster: 1 bluestore OSD on a sparse file, pool size 1)")"
echo "- fio: $(fio --version), --ioengine=nbd; raw PUT/GET: $(curl --version | head -1 | cut -d' ' -f1-2), 4 in parallel"
echo "- machine: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r), work dir on $(df --output=source "$work" | tail -1); the object store runs on the same cores"
echo "- object store space free at start: $(osd_avail)"
echo "- load at start: $(uptime | sed 's/.*load average/load average/')"
echo

# Prefill: the whole volume, 1 MiB sequential writes, on both; the S3 pool
# uploads it, and both read it once, so the S3 pool's cache is warm.
for s in s3 local; do
  fio_run "${uri[$s]}" --rw=write --bs=1m --iodepth=8 --size="$size_bytes" >/dev/null
done
settle "$s3dir" >/dev/null
for s in s3 local; do
  fio_run "${uri[$s]}" --rw=read --bs=1m --iodepth=8 --size="$size_bytes" >/dev/null
done
: >"$work/runs.jsonl"

# warm_run SERVER WORKLOAD ROUND
warm_run() {
  local s=$1 wl=$2 r=$3 pid=${dpid[${pid_of[$1]}]} c0 c1 f0 f1 out settle_s=0
  c0=$(cpus "$pid")
  [ "$s" = local ] || f0=$(stats "$s3dir" bytes_fetched read_misses)
  out=$(fio_run "${uri[$s]}" --rw="$wl" --bs=4k --iodepth="$qd" --size="$size_bytes" --norandommap \
        --time_based --runtime="$runtime" --ramp_time="$ramp")
  c1=$(cpus "$pid")
  local fetched=0 misses=0
  if [ "$s" = s3 ]; then
    f1=$(stats "$s3dir" bytes_fetched read_misses)
    read -r a b <<<"$f0"; read -r x y <<<"$f1"; fetched=$((x - a)); misses=$((y - b))
    [ "$wl" = randread ] || settle_s=$(settle "$s3dir")
  fi
  read -r iops mbps io <<<"$out"
  # shellcheck disable=SC2046
  rec phase=warm server="$s" workload="$wl" round="$r" iops="$iops" mbps="$mbps" io_bytes="$io" \
      $(cpu_fields "$c0" "$c1") fetched="$fetched" misses="$misses" settle_s="$settle_s"
}
rbd_round() {
  local r=$1 out=$work/rbd-$1.out
  VPOOL_CEPH_DIR=$cluster_dir BENCH_DIR=$work/rbd-$r bench/rbd.sh --rounds 1 "${rbd_args[@]}" >"$out" 2>&1 \
    || { echo "bench/rbd.sh failed:" >&2; tail -20 "$out" >&2; return 1; }
  local w r_
  w=$(sed -n 's/^rbd randwrite_4k_iops=\([0-9]*\).*/\1/p' "$out")
  r_=$(sed -n 's/^rbd randread_4k_iops=\([0-9]*\).*/\1/p' "$out")
  rec phase=rbd workload=randwrite round="$r" iops="$w"
  rec phase=rbd workload=randread round="$r" iops="$r_"
}

# 1 and 4: warm S3 vs local (A B / B A), RBD in the same rounds.
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then order=(s3 local); else order=(local s3); fi
  [ "$rbd" = 0 ] || [ $((r % 2)) = 1 ] || rbd_round "$r"
  for wl in randread randwrite; do
    for s in "${order[@]}"; do warm_run "$s" "$wl" "$r"; done
  done
  [ "$rbd" = 0 ] || [ $((r % 2)) = 0 ] || rbd_round "$r"
  rgw_gc
  echo "  warm round $r done ($(uptime | sed 's/.*load average/load average/'))" >&2
done

# 3b: the upload lag under 4 KiB random writes, sampled every second (on the
# API socket, at fixed ticks, so a loaded machine does not stretch them).
lag_sampler() {
  exec python3 - "$1/api.sock" <<'PY'
import http.client, json, socket, sys, time
class Unix(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=5)
        self.unix_path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(5)
        self.sock.connect(self.unix_path)
t0 = time.time()
k = 0
while True:
    t = time.time()
    try:
        c = Unix(sys.argv[1]); c.request("GET", "/v1/cache"); j = json.loads(c.getresponse().read()); c.close()
        print(f"{t - t0:.3f} {j['upload_lag_bytes']} {j['upload_lag_seconds']:.3f} {j['dirty_bytes']} {j['bytes_uploaded']}", flush=True)
    except Exception as e:
        print(f"# {t - t0:.3f} {e}", flush=True)
    k += 1
    time.sleep(max(0.0, t0 + k - time.time()))
PY
}
t0=$(now)
lag_sampler "$s3dir" >"$work/lag.tsv" 2>&1 &
sampler_pid=$!
c0=$(cpus "${dpid[$s3name]}")
out=$(fio_run "${uri[s3]}" --rw=randwrite --bs=4k --iodepth="$qd" --size="$size_bytes" --norandommap \
      --time_based --runtime="$lag_runtime")
load_end=$(elapsed "$t0" "$(now)")
c1=$(cpus "${dpid[$s3name]}")
drain_s=$(settle "$s3dir")
kill "$sampler_pid" 2>/dev/null || true; wait "$sampler_pid" 2>/dev/null || true; sampler_pid=""
read -r iops mbps io <<<"$out"
# shellcheck disable=SC2046
rec phase=lag iops="$iops" mbps="$mbps" load_end_s="$load_end" drain_s="$drain_s" $(cpu_fields "$c0" "$c1")
rgw_gc
echo "  upload lag done" >&2

# 2 and 3a, on a second S3 pool (no garbage from the random writes above, so
# its cleaner stays idle), per round: write the cold volume (upload figures)
# and plain PUTs; a fresh cache: sequential read, and plain GETs of the
# volume's segments; a fresh cache again: random 4 KiB reads. The daemons of
# the warm pools go first.
stop_daemon local
stop_daemon warm
head -c $((32 << 20)) /dev/urandom >"$work/blob"
raw_put() {
  local r=$1 n=$(((cold_bytes + (32 << 20) - 1) / (32 << 20))) t0 t1 bad
  t0=$(now)
  bad=$(seq "$n" | xargs -P 4 -I{} curl -sS -o /dev/null -w '%{http_code}\n' --max-time 300 "${sig[@]}" \
          -T "$work/blob" "$endpoint/$bucket/$prefix-raw/put-$r-{}" | grep -vc '^200$' || true)
  t1=$(now)
  [ "$bad" = 0 ] || { echo "raw PUT: $bad requests failed" >&2; return 1; }
  rec phase=raw_put round="$r" bytes=$((n << 25)) seconds="$(elapsed "$t0" "$t1")"
  delete_prefix "$prefix-raw/"
}
raw_get() {
  local r=$1 t0 t1 got
  t0=$(now)
  got=$(awk '{print $1}' "$work/cold-$r.keys" | xargs -P 4 -I{} curl -sS -o /dev/null --fail \
          -w '%{size_download}\n' --max-time 300 "${sig[@]}" "$endpoint/$bucket/{}" | awk '{s += $1} END {print s + 0}')
  t1=$(now)
  rec phase=raw_get round="$r" bytes="$got" seconds="$(elapsed "$t0" "$t1")"
}
# cold_write ROUND: write the round's cold volume, then stop the daemon, which
# uploads what is left (the open segment) and lets the pool go; the upload
# figure is the bytes of the segment objects that appeared in the bucket
# over the time from the first write until the daemon has stopped.
cold_write() {
  local r=$1 vol=cold$1 t0 t1 u0 u1 out mbps_stat wmbps new_bytes
  "$vpool" --home "$s3dir" vol create "$vol" --size "$cold_bytes" >/dev/null
  list_keys "$prefix/cold/segments/" | sort >"$work/before-$r.keys"
  u0=$(stats "$s3dir" bytes_uploaded)
  t0=$(now)
  out=$(fio_run "nbd+unix:///$vol?socket=$s3dir/nbd.sock" --rw=write --bs=1m --iodepth=8 --size="$cold_bytes")
  settle "$s3dir" >/dev/null
  read -r u1 mbps_stat <<<"$(stats "$s3dir" bytes_uploaded upload_mb_per_s)"
  stop_daemon "$s3name"
  t1=$(now)
  rm -rf "$s3dir"
  list_keys "$prefix/cold/segments/" | sort | comm -13 "$work/before-$r.keys" - >"$work/cold-$r.keys"
  new_bytes=$(awk '{s += $2} END {print s + 0}' "$work/cold-$r.keys")
  read -r _ wmbps _ <<<"$out"
  rec phase=upload round="$r" bytes="$new_bytes" seconds="$(elapsed "$t0" "$t1")" \
      bytes_uploaded_before_stop=$((u1 - u0)) upload_mb_per_s="$mbps_stat" fio_write_mbps="$wmbps"
}
# cold_seq ROUND QD: a fresh cache, the cold volume read once, 1 MiB at QD.
cold_seq() {
  local r=$1 qd_=$2 name=seq$2-$1 dir=$work/cache-seq$2-$1 f0 f1 c0 c1 out
  new_cache "$name"
  f0=$(stats "$dir" bytes_fetched bytes_read); c0=$(cpus "${dpid[$name]}")
  out=$(fio_run "nbd+unix:///cold$r?socket=$dir/nbd.sock" --rw=read --bs=1m --iodepth="$qd_" --size="$cold_bytes")
  f1=$(stats "$dir" bytes_fetched bytes_read); c1=$(cpus "${dpid[$name]}")
  read -r iops mbps io <<<"$out"; read -r a b <<<"$f0"; read -r x y <<<"$f1"
  # shellcheck disable=SC2046
  rec phase=cold_seq qd="$qd_" round="$r" mbps="$mbps" io_bytes="$io" fetched=$((x - a)) bytes_read=$((y - b)) \
      $(cpu_fields "$c0" "$c1")
  stop_daemon "$name"; rm -rf "$dir"
}
cold_rand() {
  local r=$1 dir=$work/cache-rand-$1 f0 f1 out
  f0=$(stats "$dir" bytes_fetched bytes_read)
  out=$(fio_run "nbd+unix:///cold$r?socket=$dir/nbd.sock" --rw=randread --bs=4k --iodepth="$qd" \
        --size="$cold_bytes" --norandommap --time_based --runtime="$runtime")
  f1=$(stats "$dir" bytes_fetched bytes_read read_hits read_misses)
  read -r iops mbps io <<<"$out"; read -r a b <<<"$f0"; read -r x y h m <<<"$f1"
  rec phase=cold_rand round="$r" iops="$iops" io_bytes="$io" fetched=$((x - a)) bytes_read=$((y - b)) \
      read_hits="$h" read_misses="$m"
}
url=s3://$bucket/$prefix/cold
"$vpool" pool create --s3 "$url" --endpoint "$endpoint" --cache "$work/cache-cold" \
  --cache-size "$cache_size" >"$work/pool-create-cold.out" 2>&1 \
  || { echo "vpool pool create (cold) failed:" >&2; cat "$work/pool-create-cold.out" >&2; exit 1; }
start_daemon cold "$work/cache-cold"
s3dir=$work/cache-cold s3name=cold
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then cold_write "$r"; raw_put "$r"; else raw_put "$r"; cold_write "$r"; fi

  if [ $((r % 2)) = 1 ]; then cold_seq "$r" 8; cold_seq "$r" 1; raw_get "$r"
  else raw_get "$r"; cold_seq "$r" 1; cold_seq "$r" 8; fi

  new_cache "rand-$r"
  cold_rand "$r"
  # This daemon writes the next round's cold volume.
  "$vpool" --home "$work/cache-rand-$r" vol delete "cold$r" >/dev/null
  s3dir=$work/cache-rand-$r s3name=rand-$r
  rgw_gc
  echo "  cold round $r done ($(uptime | sed 's/.*load average/load average/'))" >&2
done

echo "- load at end: $(uptime | sed 's/.*load average/load average/'); object store space free: $(osd_avail)"
# Requests to the object store that failed (each retry counts): an outage
# or restart of radosgw during the run makes its figures meaningless.
store_errors=$(cat "$work"/warm.log "$work"/cold.log "$work"/seq*.log "$work"/rand-*.log 2>/dev/null \
  | grep -c 'object store call failed' || true)
[ "$store_errors" = 0 ] || echo "- WARNING: $store_errors object store requests failed during the run (see the daemons' logs in $work): these figures are not valid"
echo
python3 - "$work/runs.jsonl" "$work/lag.tsv" "$rounds" "$qd" "$lag_runtime" "$rbd" "$store_errors" <<'PY'
import json, statistics as st, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
lag_rows = [l.split() for l in open(sys.argv[2]) if not l.startswith("#") and len(l.split()) == 5]
rounds, qd, lag_runtime, rbd = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
print(f"s3 object_store_errors={sys.argv[7]}")
P = lambda **kw: [r for r in runs if all(r.get(k) == v for k, v in kw.items())]
med = st.median
def spread(v): return f"{min(v):.2f}–{max(v):.2f}"
def fmt(x): return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.2f}"
def verdict(v, t, lower=False):
    ok = v <= t if lower else v >= t
    return f"{'met' if ok else 'MISSED'} ({'≤' if lower else '≥'} {t:g})"
table = []

def per_round(a, b, key="iops"):
    ra = {r["round"]: r[key] for r in a}
    rb = {r["round"]: r[key] for r in b}
    return [ra[k] / rb[k] for k in sorted(ra) if k in rb and rb[k] > 0]

# 1. warm
for wl, name in (("randread", "read"), ("randwrite", "write")):
    s3, loc = P(phase="warm", server="s3", workload=wl), P(phase="warm", server="local", workload=wl)
    rs = per_round(s3, loc)
    si, li = med([r["iops"] for r in s3]), med([r["iops"] for r in loc])
    fetched = sum(r["fetched"] for r in s3)
    cpu = lambda rr, k: med([r[k] for r in rr if r[k] >= 0] or [float("nan")])
    print(f"s3 warm_rand{name}_4k_ratio={med(rs):.2f} min={min(rs):.2f} max={max(rs):.2f} "
          f"s3_iops={si:.0f} local_iops={li:.0f} qd={qd} rounds={len(rs)} fetched_during_runs={fetched}")
    table.append((f"1. warm 4 KiB random {name} qd{qd}, S3 pool / local pool", "ratio of IOPS",
                  f"**{med(rs):.2f}** ({spread(rs)}); {si:,.0f} vs {li:,.0f} IOPS", verdict(med(rs), 0.8)))
    table.append((f"… CPU per run: daemon / radosgw / ceph-osd (S3); daemon (local)", "s",
                  f"{cpu(s3, 'cpu_daemon_s'):.1f} / {cpu(s3, 'cpu_rgw_s'):.1f} / {cpu(s3, 'cpu_osd_s'):.1f}; "
                  f"{cpu(loc, 'cpu_daemon_s'):.1f}", ""))

# 2. cold sequential read
cs, cs1, rg = P(phase="cold_seq", qd=8), P(phase="cold_seq", qd=1), P(phase="raw_get")
for r in rg: r["mbps"] = r["bytes"] / 1e6 / r["seconds"]
mb = [r["mbps"] for r in cs]
rr = per_round(cs, rg, "mbps")
fpr = [r["fetched"] / r["io_bytes"] for r in cs]
print(f"s3 cold_seqread_mbps={med(mb):.1f} min={min(mb):.1f} max={max(mb):.1f} "
      f"raw_get_mbps={med([r['mbps'] for r in rg]):.1f} ratio_to_raw_get={med(rr):.2f} "
      f"fetched_per_read={med(fpr):.2f} rounds={len(mb)}")
table.append(("2. cold sequential read (1 MiB, qd8, empty cache)", "MB/s",
              f"**{med(mb):,.0f}** ({min(mb):,.0f}–{max(mb):,.0f})", verdict(med(mb), 200)))
table.append(("… / plain GETs of the same segments (4 parallel)", "ratio",
              f"**{med(rr):.2f}** ({spread(rr)}); GETs {med([r['mbps'] for r in rg]):,.0f} MB/s", ""))
table.append(("… bytes fetched per byte read (sequential, qd8)", "ratio", f"{med(fpr):.2f} ({spread(fpr)})", ""))
mb1 = [r["mbps"] for r in cs1]
fpr1 = [r["fetched"] / r["io_bytes"] for r in cs1]
rr1 = per_round(cs1, rg, "mbps")
print(f"s3 cold_seqread_qd1_mbps={med(mb1):.1f} min={min(mb1):.1f} max={max(mb1):.1f} "
      f"ratio_to_raw_get={med(rr1):.2f} fetched_per_read={med(fpr1):.2f} rounds={len(mb1)}")
table.append(("2. cold sequential read, qd1 (one request at a time)", "MB/s",
              f"**{med(mb1):,.0f}** ({min(mb1):,.0f}–{max(mb1):,.0f}); / GETs {med(rr1):.2f}; "
              f"fetched per byte read {med(fpr1):.2f}", verdict(med(mb1), 200)))

# 2. cold random read amplification
cr = P(phase="cold_rand")
fr = [r["fetched"] / r["io_bytes"] for r in cr]
fe = [r["fetched"] / r["bytes_read"] for r in cr if r["bytes_read"]]
ci = [r["iops"] for r in cr]
print(f"s3 cold_randread_4k_fetched_per_read={med(fr):.2f} min={min(fr):.2f} max={max(fr):.2f} "
      f"fetched_per_engine_read={med(fe):.2f} iops={med(ci):.0f} qd={qd} rounds={len(fr)}")
table.append((f"2. cold random 4 KiB read qd{qd}: bytes fetched / bytes fio read", "ratio",
              f"**{med(fr):.2f}** ({spread(fr)}); {med(ci):,.0f} IOPS", verdict(med(fr), 2, lower=True)))

# 3a. upload
up, rp = P(phase="upload"), P(phase="raw_put")
for r in up + rp: r["mbps"] = r["bytes"] / 1e6 / r["seconds"]
um = [r["mbps"] for r in up]
ur = per_round(up, rp, "mbps")
ups = [r["upload_mb_per_s"] for r in up]
print(f"s3 upload_wall_mbps={med(um):.1f} min={min(um):.1f} max={max(um):.1f} "
      f"upload_mb_per_s={med(ups):.1f} raw_put_mbps={med([r['mbps'] for r in rp]):.1f} "
      f"ratio_to_raw_put={med(ur):.2f} rounds={len(um)}")
table.append(("3. upload of the cold volume: its segments' bytes / time from the first write until all is in the bucket", "MB/s",
              f"**{med(um):,.0f}** ({min(um):,.0f}–{max(um):,.0f})", ""))
table.append(("… `upload_mb_per_s` (cache stats: while a batch is uploading)", "MB/s",
              f"{med(ups):,.0f} ({min(ups):,.0f}–{max(ups):,.0f})", ""))
table.append(("… / plain PUTs of 32 MiB objects (4 parallel)", "ratio",
              f"**{med(ur):.2f}** ({spread(ur)}); PUTs {med([r['mbps'] for r in rp]):,.0f} MB/s", ""))

# 3b. lag
lg = P(phase="lag")[0]
load = [r for r in lag_rows if float(r[0]) <= lg["load_end_s"]]
lb = [int(r[1]) for r in load] or [0]
ls = [float(r[2]) for r in load] or [0.0]
print(f"s3 upload_lag_bytes_max={max(lb)} upload_lag_bytes_median={med(lb):.0f} "
      f"upload_lag_seconds_max={max(ls):.1f} upload_lag_seconds_median={med(ls):.1f} "
      f"write_iops={lg['iops']:.0f} drain_s={lg['drain_s']} samples={len(load)} runtime={lag_runtime}")
table.append((f"3. upload lag under 4 KiB random writes qd{qd} ({lag_runtime} s, {lg['iops']:,.0f} IOPS), bytes",
              "MiB", f"max **{max(lb) / 2**20:,.0f}**, median {med(lb) / 2**20:,.0f}", ""))
table.append(("… seconds (age of the oldest sealed segment not uploaded)", "s",
              f"max **{max(ls):.1f}**, median {med(ls):.1f}; drained {lg['drain_s']} s after the load", ""))

# 4. rbd
if rbd:
    for wl, name in (("randwrite", "write"), ("randread", "read")):
        s3 = P(phase="warm", server="s3", workload=wl)
        rb = P(phase="rbd", workload=wl)
        rs = per_round(s3, rb)
        ri = med([r["iops"] for r in rb])
        print(f"s3 vs_rbd_rand{name}_4k_ratio={med(rs):.2f} min={min(rs):.2f} max={max(rs):.2f} "
              f"s3_iops={med([r['iops'] for r in s3]):.0f} rbd_iops={ri:.0f} qd={qd} rounds={len(rs)}")
        table.append((f"4. 4 KiB random {name}: vpool S3 pool (fio qd{qd}) / rbd bench (16 threads)", "ratio of IOPS",
                      f"**{med(rs):.2f}** ({spread(rs)}); rbd {ri:,.0f} IOPS", ""))

print()
print("| figure | unit | value: median (min–max over rounds) | target |")
print("|---|---|---|---|")
for row in table:
    print("| " + " | ".join(row) + " |")
print()
print("Ratios are taken within a round (the two sides alternated A B, then B A), then the median "
      "over rounds; spread = min–max over rounds.")
PY
