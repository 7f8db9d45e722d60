#!/usr/bin/env bash
# Compare vpool-nbd (MemDevice, example nbd-memserver) with `nbdkit memory`
# using fio's nbd engine, 4 KiB random read/write. Runs alternate between the
# two servers so background load affects both alike.
#
#   crates/vpool-nbd/bench/fio-vs-nbdkit.sh [rounds] [seconds] [iodepth] [size]
set -euo pipefail
ROUNDS=${1:-3}; SECS=${2:-10}; QD=${3:-32}; SIZE=${4:-1G}
ROOT=$(cd "$(dirname "$0")/../../.." && pwd)
cargo build --release -q -p vpool-nbd --example nbd-memserver --manifest-path "$ROOT/Cargo.toml"
DIR=$(mktemp -d)
VP_SOCK=$DIR/vpool.sock; KIT_SOCK=$DIR/nbdkit.sock
mkfifo "$DIR/stdin"
"$ROOT/target/release/examples/nbd-memserver" "unix:$VP_SOCK" "$SIZE" < "$DIR/stdin" 2>"$DIR/vpool.log" &
VP_PID=$!
exec 3>"$DIR/stdin"   # keep the server's stdin open; closing it stops the server
nbdkit --exit-with-parent -f -U "$KIT_SOCK" memory "$SIZE" &
KIT_PID=$!
cleanup() { exec 3>&-; kill "$KIT_PID" 2>/dev/null || true; wait "$VP_PID" 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
for _ in $(seq 50); do [[ -S $VP_SOCK && -S $KIT_SOCK ]] && break; sleep 0.1; done

iops() { # uri rw
  fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs=4k --iodepth="$QD" --size="$SIZE" \
      --runtime="$SECS" --time_based --output-format=terse --terse-version=3 \
    | awk -F';' '/^3;/ { print $8 + $49 }'
}
# Prefill both so reads hit allocated memory.
for u in "nbd+unix:///disk?socket=$VP_SOCK" "nbd+unix:///?socket=$KIT_SOCK"; do
  fio --name=fill --ioengine=nbd --uri="$u" --rw=write --bs=1M --iodepth=8 --size="$SIZE" >/dev/null
done
for rw in randread randwrite; do
  vs=(); ks=()
  for r in $(seq "$ROUNDS"); do
    v=$(iops "nbd+unix:///disk?socket=$VP_SOCK" "$rw"); k=$(iops "nbd+unix:///?socket=$KIT_SOCK" "$rw")
    vs+=("$v"); ks+=("$k")
    printf '%s round %d: vpool-nbd %.0f IOPS, nbdkit memory %.0f IOPS, ratio %.2f\n' "$rw" "$r" "$v" "$k" "$(echo "$v / $k" | bc -l)"
  done
  printf '%s mean ratio: %.2f\n' "$rw" "$(printf '%s\n' "${vs[@]}" | paste -sd+ | bc -l | xargs -I{} echo "{} / $(printf '%s\n' "${ks[@]}" | paste -sd+ | bc -l)" | bc -l)"
done
