#!/usr/bin/env bash
# Writes the upgrade fixture: pool directories made by an earlier vpool
# release, for crates/vpool/tests/upgrade.rs to open with this one.
#
#   scripts/upgrade-fixture.sh OLD_VPOOL_BINARY OUT.tar.gz
#
# OLD_VPOOL_BINARY is the `vpool` of the earlier release (before one daemon
# held many pools: its global option is --pool DIR). Build it with e.g.
#   git worktree add ../old 53d91bd && (cd ../old && cargo build -p vpool)
#
# The archive holds:
#   local/    a local pool: volume web (two writes, snapshot web@s1 between
#             them), template gold and its clone web2
#   cache/    the cache directory of a pool on S3 whose bucket is bucket/
#             (a local directory standing in for one): volume arch and
#             snapshot arch@s1
#   bucket/   that bucket
#   expected  one line per image: its name as this release exports it
#             (the local pool is the default pool; the S3 pool is added as
#             pool "cold") and the SHA-256 of its content
# The data is patterns, so the archive stays small.
set -euo pipefail

old=$(realpath "$1")
out=$(realpath -m "$2")
work=$(mktemp -d)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
export VPOOL_CONFIG_DIR=$work/config VPOOL_LOG=warn

serve() { # DIR
  "$old" --pool "$1" serve 2>>"$work/serve.log" &
  pid=$!
  for _ in $(seq 200); do
    "$old" --pool "$1" vol list >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "the old daemon did not start:" >&2
  cat "$work/serve.log" >&2
  exit 1
}
stop() {
  kill -TERM "$pid"
  wait "$pid"
  pid=
}
uri() { # DIR EXPORT
  echo "nbd+unix:///$2?socket=$work/$1/nbd.sock"
}
io() { # DIR EXPORT qemu-io commands...
  local dir=$1 export=$2
  shift 2
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  qemu-io -f raw "${args[@]}" "$(uri "$dir" "$export")" >/dev/null
}
record() { # DIR EXPORT NAME-IN-THIS-RELEASE
  local sum
  sum=$(nbdcopy "$(uri "$1" "$2")" - | sha256sum | cut -d' ' -f1)
  echo "$3 $sum" >>"$work/expected"
}

serve local
"$old" --pool local vol create web --size 8M
io local web 'write -P 0x11 0 1M' 'write -P 0x22 3M 512K'
"$old" --pool local snap create web@s1
io local web 'write -P 0x33 0 64K' 'write -z 3M 4K' 'write -P 0x34 7M 8K'
"$old" --pool local vol create gold --size 4M
io local gold 'write -P 0x44 0 2M'
"$old" --pool local vol template gold
"$old" --pool local vol clone gold web2
io local web2 'write -P 0x55 1M 4K'
for img in web web@s1 gold web2; do record local "$img" "$img"; done
stop

"$old" --pool cache pool create --s3 "file://$work/bucket" --cache-size 256M --seal-after 0.3 >/dev/null
serve cache
"$old" --pool cache vol create arch --size 8M
io cache arch 'write -P 0x66 0 2M'
"$old" --pool cache snap create arch@s1
io cache arch 'write -P 0x67 4M 1M'
for img in arch arch@s1; do record cache "$img" "cold/$img"; done
stop

rm -f local/*.sock cache/*.sock
tar -czf "$out" --sparse local cache bucket expected
echo "wrote $out ($(du -h "$out" | cut -f1)):"
cat expected
