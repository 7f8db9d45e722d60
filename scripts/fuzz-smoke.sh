#!/usr/bin/env bash
# Short fuzz runs: every target in fuzz/fuzz_targets/*.rs for FUZZ_SECONDS
# (default 20) seconds each. Fails if a target does not build, crashes,
# hangs or leaks past libFuzzer's limits. Skips (exit 0) if there is no
# fuzz/ directory or no target yet.
#
#   scripts/fuzz-smoke.sh [TARGET...]     default: all targets
#   FUZZ_SECONDS=60 scripts/fuzz-smoke.sh
#
# cargo fuzz needs nightly-only rustc flags (-Zsanitizer=address). On the
# stable toolchain they are allowed with RUSTC_BOOTSTRAP=1, which this script
# sets; FUZZ_TOOLCHAIN=nightly runs `cargo +nightly fuzz` instead.
# A crash leaves its input in fuzz/artifacts/TARGET/; reproduce it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...
# Inputs in fuzz/seeds/TARGET/ (if present, committed) seed the corpus;
# fuzz/corpus/TARGET/ (not committed) grows across local runs.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
secs=${FUZZ_SECONDS:-20}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

if [ ! -d fuzz ]; then
    echo "fuzz-smoke: no fuzz/ directory yet: skipping"
    exit 0
fi
shopt -s nullglob
files=(fuzz/fuzz_targets/*.rs)
if [ ${#files[@]} -eq 0 ]; then
    echo "fuzz-smoke: no targets in fuzz/fuzz_targets/ yet: skipping"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: FAIL: cargo-fuzz is not installed (scripts/install-deps.sh installs it)" >&2
    exit 1
fi

if [ -n "${FUZZ_TOOLCHAIN:-}" ]; then
    cargo=(cargo "+$FUZZ_TOOLCHAIN" fuzz)
    repro="cargo +$FUZZ_TOOLCHAIN fuzz"
else
    export RUSTC_BOOTSTRAP=1
    cargo=(cargo fuzz)
    repro="RUSTC_BOOTSTRAP=1 cargo fuzz"
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in "${files[@]}"; do targets+=("$(basename "$f" .rs)"); done
fi

# Every file in fuzz_targets/ must be a [[bin]] of fuzz/Cargo.toml.
listed=$("${cargo[@]}" list 2>/dev/null || true)
for t in "${targets[@]}"; do
    if ! grep -qx "$t" <<<"$listed"; then
        echo "fuzz-smoke: FAIL: $t is not a [[bin]] in fuzz/Cargo.toml (cargo fuzz list: $(echo $listed))" >&2
        exit 1
    fi
done

logdir=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-smoke.XXXXXX")
trap 'rm -rf "$logdir"' EXIT

t=$(now)
echo "fuzz-smoke: building ${#targets[@]} target(s): ${targets[*]}"
build_args=()
[ $# -gt 0 ] && [ ${#targets[@]} -eq 1 ] && build_args=("${targets[0]}")
if ! "${cargo[@]}" build "${build_args[@]}" >"$logdir/build.log" 2>&1; then
    grep -v '^ *[0-9]*: \|^ *at ' "$logdir/build.log" | tail -n 40 >&2
    if grep -q "believes it's in a workspace" "$logdir/build.log"; then
        echo "fuzz-smoke: hint: fuzz/Cargo.toml needs its own '[workspace]' table (members = [\".\"])" >&2
    fi
    echo "fuzz-smoke: FAIL: cargo fuzz build failed" >&2
    exit 1
fi
echo "fuzz-smoke: built in $(elapsed "$t") s"

failed=()
for target in "${targets[@]}"; do
    t=$(now)
    corpus=(fuzz/corpus/"$target")
    mkdir -p "${corpus[0]}"
    [ -d fuzz/seeds/"$target" ] && corpus+=(fuzz/seeds/"$target")
    rc=0
    # The outer timeout is a safety net for a fuzzer that ignores its limit.
    timeout -k 10 $((secs + 120)) "${cargo[@]}" run "$target" "${corpus[@]}" -- \
        -max_total_time="$secs" -timeout=25 -rss_limit_mb=4096 -print_final_stats=1 \
        </dev/null >"$logdir/$target.log" 2>&1 || rc=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logdir/$target.log" | tail -n 1)
    if [ $rc -eq 0 ]; then
        echo "fuzz-smoke: $target ok: ${runs:-?} runs in $(elapsed "$t") s"
    else
        failed+=("$target")
        echo "fuzz-smoke: $target FAILED (exit $rc) after $(elapsed "$t") s; last lines:" >&2
        # The cause (panic message, sanitizer or libFuzzer error) first, then
        # the end of the log without the stack frames.
        grep -a -m 8 -A 1 -E "panicked at|ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|SUMMARY: |==[0-9]+== ?ERROR" \
            "$logdir/$target.log" | sed 's/^/    /' >&2 || true
        echo "    ..." >&2
        grep -a -v -E '^ *#[0-9]+ 0x|^ *[0-9]+: |^ +at |^$' "$logdir/$target.log" | tail -n 20 | sed 's/^/    /' >&2
        for a in fuzz/artifacts/"$target"/*; do
            echo "    reproduce: $repro run $target $a" >&2
        done
    fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "fuzz-smoke: FAIL: ${#failed[@]} of ${#targets[@]} target(s) failed: ${failed[*]}" >&2
    exit 1
fi
echo "fuzz-smoke: all ${#targets[@]} target(s) ran ${secs} s without a crash"
