#!/usr/bin/env bash
# vpool over NBD beside qemu-nbd (qcow2, O_DIRECT) and nbdkit's memory plugin
# (the protocol's ceiling on this machine), all three on the same disk and
# driven by the same fio jobs through fio's nbd engine (libnbd).
#
# For each workload the servers are alternated (vpool, qemu-nbd, nbdkit,
# vpool, ...) for --rounds rounds, because this machine drifts; the table
# shows per-server medians and the median of the per-round ratios with their
# min-max spread. Every device is prefilled once with a sequential write of
# the whole test region, so reads hit data and random writes are overwrites
# (the steady state of a VM disk; qcow2 does not allocate during the runs).
#
#   bench/nbd.sh [--rounds N] [--runtime SEC] [--ramp SEC] [--size SIZE]
#                [--only LIST] [--keep]
#
#   --rounds N     rounds per workload (default 4)
#   --runtime SEC  fio --runtime of each measured run (default 10)
#   --ramp SEC     fio --ramp_time before each run, not measured (default 1)
#   --size SIZE    device size and test region, fio syntax (default 1g)
#   --only LIST    comma-separated workload numbers to run (default all: 1-6)
#   --keep         keep the devices' data (vpool pool, qcow2) afterwards
#
# Default settings take ~15 minutes. The per-run fio results stay in
# bench/out/nbd/runs.jsonl, the servers' logs beside them. The vpool binary is
# built first (cargo build --release -p vpool). Figures are measured, never
# asserted; see BENCHMARKS.md for the latest table.
set -euo pipefail
cd "$(dirname "$0")/.."
cmdline="bench/nbd.sh $*"
rounds=4 runtime=10 ramp=1 size=1g only=1,2,3,4,5,6 keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --runtime) runtime=$2; shift 2 ;;
    --ramp) ramp=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

missing=()
for tool in fio nbdkit nbdinfo qemu-nbd qemu-img python3 cargo; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "missing tools: ${missing[*]} (Debian: apt-get install fio nbdkit libnbd-bin qemu-utils python3; cargo from rustup)" >&2
  exit 1
fi
fio --enghelp=nbd >/dev/null 2>&1 || { echo "this fio has no nbd engine (Debian's fio package does)" >&2; exit 1; }
nbdkit memory --version >/dev/null 2>&1 || { echo "nbdkit's memory plugin is missing" >&2; exit 1; }

cargo build -q --release -p vpool
vpool=$PWD/target/release/vpool
work=${BENCH_DIR:-$PWD/bench/out/nbd}
size_bytes=$(python3 - "$size" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)([kmgt]?)i?b?", sys.argv[1].lower())
if not m: sys.exit(f"bad --size {sys.argv[1]!r}")
print(int(m[1]) << (10 * " kmgt".index(m[2] or " ")))
PY
)
[ $((size_bytes % 4096)) -eq 0 ] && [ "$size_bytes" -ge $((1 << 20)) ] \
  || { echo "--size must be a multiple of 4 KiB and at least 1 MiB" >&2; exit 2; }

pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  # The data (GiBs) goes unless --keep; logs and runs.jsonl stay for inspection.
  if [ "$keep" = 0 ]; then rm -rf "$work/pool" "$work/x.qcow2"; fi
  [ "$rc" = 0 ] || echo "bench/nbd.sh failed (exit $rc); logs in $work" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rm -rf "$work"; mkdir -p "$work"

# wait_nbd NAME PID URI: until the server answers, or fail with its log.
wait_nbd() {
  local name=$1 pid=$2 uri=$3
  for _ in $(seq 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited during startup; its log:" >&2; cat "$work/$name.log" >&2; return 1
    fi
    nbdinfo --size "$uri" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "$name did not answer NBD on $uri within 30 s; its log:" >&2; cat "$work/$name.log" >&2; return 1
}

# --- vpool ---
VPOOL_HOME=$work/pool "$vpool" serve >"$work/vpool.log" 2>&1 &
vpool_pid=$!; pids+=("$vpool_pid")
for _ in $(seq 300); do [ -S "$work/pool/api.sock" ] && break; kill -0 "$vpool_pid" || break; sleep 0.1; done
VPOOL_HOME=$work/pool "$vpool" vol create bench --size "$size_bytes" >/dev/null
uri_vpool="nbd+unix:///bench?socket=$work/pool/nbd.sock"
wait_nbd vpool "$vpool_pid" "$uri_vpool"

# --- qemu-nbd: qcow2, O_DIRECT, io_uring (native AIO if io_uring fails) ---
qemu-img create -q -f qcow2 "$work/x.qcow2" "$size_bytes"
uri_qemu="nbd+unix:///?socket=$work/qemu.sock"
qemu_aio=""
for aio in io_uring native; do
  qemu-nbd --cache=none --aio=$aio --persistent --shared=8 -f qcow2 \
      --socket "$work/qemu.sock" "$work/x.qcow2" >"$work/qemu-nbd.log" 2>&1 &
  qemu_pid=$!
  if wait_nbd qemu-nbd "$qemu_pid" "$uri_qemu" 2>/dev/null; then
    pids+=("$qemu_pid"); qemu_aio=$aio; break
  fi
  kill "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" 2>/dev/null || true
  echo "note: qemu-nbd --aio=$aio failed: $(tr '\n' ' ' <"$work/qemu-nbd.log")" >&2
done
[ -n "$qemu_aio" ] || { echo "qemu-nbd would not start with --aio=io_uring or --aio=native" >&2; exit 1; }

# --- nbdkit memory plugin ---
nbdkit --unix "$work/nbdkit.sock" --foreground memory "$size_bytes" >"$work/nbdkit.log" 2>&1 &
nbdkit_pid=$!; pids+=("$nbdkit_pid")
uri_nbdkit="nbd+unix:///?socket=$work/nbdkit.sock"
wait_nbd nbdkit "$nbdkit_pid" "$uri_nbdkit"

servers=(vpool qemu-nbd nbdkit)
declare -A uri=([vpool]=$uri_vpool [qemu-nbd]=$uri_qemu [nbdkit]=$uri_nbdkit)

echo "# vpool over NBD vs qemu-nbd (qcow2) vs nbdkit memory"
echo
echo "- command: \`$cmdline\` (rounds=$rounds runtime=${runtime}s ramp=${ramp}s region=$size_bytes bytes)"
echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
echo "- vpool: $("$vpool" --version) ($(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- crates 2>/dev/null || echo '+dirty'))"
echo "- qemu-nbd: $(qemu-nbd --version | head -1), --cache=none --aio=$qemu_aio --persistent --shared=8 -f qcow2"
[ "$qemu_aio" = io_uring ] || echo "  (io_uring was unavailable: fell back to --aio=native)"
echo "- nbdkit: $(nbdkit --version | head -1), memory plugin"
echo "- fio: $(fio --version), --ioengine=nbd"
echo "- machine: $(nproc) cores, $(free -g | awk '/^Mem:/{print $2}') GiB RAM, kernel $(uname -r), work dir on $(df --output=source "$work" | tail -1)"
echo "- load at start: $(uptime | sed 's/.*load average/load average/')"
echo

# fio_run SERVER WORKLOAD-NAME FIO-ARGS... -> one JSON line {server, workload, iops, mbps, p50_us, p99_us}
fio_run() {
  local server=$1 wl=$2; shift 2
  fio --name="$wl" --ioengine=nbd --uri="${uri[$server]}" --size="$size_bytes" \
      --norandommap --output-format=json "$@" 2>"$work/fio.err" \
    | python3 -c '
import json, sys
server, wl = sys.argv[1:3]
text = sys.stdin.read()  # fio prints "fio: connected to NBD server" before the JSON
j = json.loads(text[text.index("{"):])["jobs"][0]
if j["error"]:
    sys.exit("fio error %s on %s %s" % (j["error"], server, wl))
d = j["write"] if j["write"]["io_bytes"] > 0 else j["read"]
pct = d["clat_ns"].get("percentile", {})
print(json.dumps({"server": server, "workload": wl, "iops": d["iops"],
    "mbps": d["bw_bytes"] / 1e6,
    "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3}))
' "$server" "$wl" || { echo "fio failed on $server ($wl):" >&2; cat "$work/fio.err" >&2; return 1; }
}

# Prefill: every device gets the whole region written once, sequentially.
for s in "${servers[@]}"; do
  fio_run "$s" prefill --rw=write --bs=1m --iodepth=8 >>"$work/prefill.jsonl"
done

timed=(--time_based --runtime="$runtime" --ramp_time="$ramp")
workload_args() {
  case "$1" in
    1) echo "--rw=randwrite --bs=4k --iodepth=32" ;;
    2) echo "--rw=randread --bs=4k --iodepth=32" ;;
    3) echo "--rw=randread --bs=4k --iodepth=1" ;;
    4) echo "--rw=write --bs=1m --iodepth=8" ;;
    5) echo "--rw=read --bs=1m --iodepth=8" ;;
    6) echo "--rw=randwrite --bs=4k --iodepth=1 --fsync=1" ;;
  esac
}
: >"$work/runs.jsonl"
for wl in ${only//,/ }; do
  args=$(workload_args "$wl")
  [ -n "$args" ] || { echo "unknown workload $wl (1-6)" >&2; exit 2; }
  for r in $(seq "$rounds"); do
    for s in "${servers[@]}"; do
      # shellcheck disable=SC2086
      fio_run "$s" "$wl" $args "${timed[@]}" | sed "s/}\$/, \"round\": $r}/" >>"$work/runs.jsonl"
    done
  done
  echo "  workload $wl done ($(uptime | sed 's/.*load average/load average/'))" >&2
done

echo "- load at end: $(uptime | sed 's/.*load average/load average/')"
echo
python3 - "$work/runs.jsonl" <<'PY'
import json, statistics as st, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
names = {
    "1": ("4 KiB random write, qd32", "IOPS", "iops"),
    "2": ("4 KiB random read, qd32", "IOPS", "iops"),
    "3": ("4 KiB random read, qd1", "IOPS", "iops"),
    "4": ("1 MiB sequential write, qd8", "MB/s", "mbps"),
    "5": ("1 MiB sequential read, qd8", "MB/s", "mbps"),
    "6": ("4 KiB random write + flush each, qd1", "IOPS", "iops"),
}
# target on vpool/qemu-nbd (higher is better), on vpool/nbdkit
targets = {"1": (1.5, 0.7), "2": (1.0, 0.7), "3": (1.0, 0.7), "4": (1.0, None),
           "5": (1.0, None), "6": (1.0, 0.7)}

def by(wl, server, key):
    return {r["round"]: r[key] for r in runs if r["workload"] == wl and r["server"] == server}

def ratio(wl, key, other, invert=False):
    a, b = by(wl, "vpool", key), by(wl, other, key)
    rs = [(b[k] / a[k] if invert else a[k] / b[k]) for k in a if k in b and (b[k] if not invert else a[k]) > 0]
    return st.median(rs), min(rs), max(rs)

def verdict(v, target, lower_better=False):
    if target is None:
        return ""
    ok = v <= target if lower_better else v >= target
    return f" {'met' if ok else 'MISSED'} ({'≤' if lower_better else '≥'}{target})"

fmt = lambda x: f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
print("| workload | unit | vpool | qemu-nbd | nbdkit memory | vpool/qemu-nbd (spread) | vpool/nbdkit (spread) |")
print("|---|---|---|---|---|---|---|")
wls = sorted({r["workload"] for r in runs})
for wl in wls:
    title, unit, key = names[wl]
    med = [fmt(st.median(by(wl, s, key).values())) for s in ("vpool", "qemu-nbd", "nbdkit")]
    tq, tn = targets[wl]
    rq, rn = ratio(wl, key, "qemu-nbd"), ratio(wl, key, "nbdkit")
    print(f"| {wl}. {title} | {unit} | {' | '.join(med)} | "
          f"**{rq[0]:.2f}** ({rq[1]:.2f}–{rq[2]:.2f}){verdict(rq[0], tq)} | "
          f"**{rn[0]:.2f}** ({rn[1]:.2f}–{rn[2]:.2f}){verdict(rn[0], tn)} |")
    if wl == "3":
        for p, tgt in (("p50", None), ("p99", 1.2)):
            key2 = f"{p}_us"
            med = [f"{st.median(by(wl, s, key2).values()):.1f}" for s in ("vpool", "qemu-nbd", "nbdkit")]
            rq = ratio(wl, key2, "qemu-nbd")
            rn = ratio(wl, key2, "nbdkit")
            print(f"| 3. … {p} completion latency (lower is better) | µs | {' | '.join(med)} | "
                  f"**{rq[0]:.2f}** ({rq[1]:.2f}–{rq[2]:.2f}){verdict(rq[0], tgt, True)} | "
                  f"**{rn[0]:.2f}** ({rn[1]:.2f}–{rn[2]:.2f}) |")
print()
print("Ratios are vpool divided by the other server, per round, then the median over rounds "
      "(spread = min–max over rounds); for throughput >1 means vpool is faster, for latency <1 "
      "means vpool is faster.")
PY
