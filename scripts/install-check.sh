#!/usr/bin/env bash
# `cargo install --locked --path crates/vpool` gives a working vpool: the
# install (under a temporary root, from the lockfile), then the installed
# binary runs a daemon on a temporary home, creates a volume, writes it
# over NBD with qemu-io, reads it back, and stops on SIGTERM.
#
# The install is a debug build into the workspace's target directory, so
# it reuses what `cargo test` built (seconds, not a second release build);
# `--locked` is what is checked: the lockfile is complete and honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(mktemp -d "${TMPDIR:-/tmp}/vpool-install.XXXXXX")
pid=
trap '[ -z "$pid" ] || kill -TERM "$pid" 2>/dev/null; rm -rf "$root"' EXIT
cargo install -q --locked --debug --path crates/vpool --root "$root/prefix" --target-dir target
bin=$root/prefix/bin/vpool
[ -x "$bin" ] || { echo "install-check: no $bin" >&2; exit 1; }
"$bin" --version
export VPOOL_CONFIG=/dev/null
home=$root/home
"$bin" --home "$home" serve >"$root/serve.log" 2>&1 &
pid=$!
for _ in $(seq 100); do "$bin" --home "$home" pool list >/dev/null 2>&1 && break; sleep 0.1; done
"$bin" --home "$home" vol create web1 --size 64M
uri=$("$bin" --home "$home" vol info web1 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["attach"]["nbd_uri"])')
qemu-io -f raw -c 'write -P 0x5a 0 1M' -c 'flush' "$uri" >/dev/null
qemu-io -f raw -c 'read -P 0x5a 0 1M' "$uri" | grep -q 'read 1048576/1048576'
kill -TERM "$pid"
wait "$pid" || { echo "install-check: the daemon did not stop cleanly" >&2; cat "$root/serve.log" >&2; exit 1; }
pid=
echo "install-check: cargo install --locked gave a working vpool"
