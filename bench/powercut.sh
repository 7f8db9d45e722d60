#!/usr/bin/env bash
# The long power-cut run: vm/powercut.sh with many rounds (default 30) and
# its self-test, work files kept in bench/out/powercut/<date>-seed<N>/, one
# JSON line per run appended to bench/out/powercut/runs.jsonl, and a last
# line `powercut rounds=N result=PASS|FAIL seconds=S seed=N` for the note.
#
#   bench/powercut.sh [--rounds N] [--seed N] [other vm/powercut.sh options]
#
# ~28 s a round on a 2-core machine under TCG (boot, check of the whole
# volume and its snapshots, 2-8 s of workload): 50 rounds took 23 min.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=30
seed=
pass=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds=${2:?}; shift 2 ;;
        --seed) seed=${2:?}; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) pass+=("$1"); shift ;;
    esac
done
[ -n "$seed" ] || seed=$(( (RANDOM << 15) | RANDOM ))

out=$REPO/bench/out/powercut
run=$out/$(date -u +%Y%m%dT%H%M%SZ)-seed$seed
mkdir -p "$run"
start=$(date +%s)
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
git -C "$REPO" diff --quiet HEAD 2>/dev/null || commit="$commit+dirty"
"$REPO/vm/powercut.sh" --rounds "$rounds" --seed "$seed" --self-test --workdir "$run" "${pass[@]}" 2>&1 |
    tee "$run/powercut.log"
rc=${PIPESTATUS[0]}
secs=$(( $(date +%s) - start ))
result=PASS
[ "$rc" = 0 ] || result=FAIL
checked=$(sed -n 's/^powercut: PASS: \([0-9]*\) power cuts checked.*/\1/p' "$run/powercut.log")
checked=${checked:-0}
recovery_cuts=$(grep -c 'power cut during recovery' "$run/powercut.log" || true)
# The image and the nbdkit caches are large and only useful after a failure.
[ "$result" = FAIL ] || rm -f "$run/pool.img" "$run/initramfs.cpio.gz"
printf '{"date":"%s","rounds":%d,"result":"%s","seconds":%d,"seed":%s,"cuts_checked":%d,"recovery_cuts":%d,"commit":"%s","dir":"%s"}\n' \
    "$(date -u +%FT%TZ)" "$rounds" "$result" "$secs" "$seed" "$checked" "$recovery_cuts" \
    "$commit" "$run" >> "$out/runs.jsonl"
echo "powercut rounds=$rounds cuts_checked=$checked recovery_cuts=$recovery_cuts result=$result seconds=$secs seed=$seed (log: $run/powercut.log)"
exit "$rc"
