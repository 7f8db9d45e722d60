#!/usr/bin/env bash
# A Ceph micro-cluster for vpool's S3 tests and the RBD benchmark: 1 mon,
# 1 mgr, 1 bluestore OSD on a sparse file and radosgw (S3) on loopback, from
# Debian 12's packages (Ceph 16.2), no systemd, all under one directory.
#
#   scripts/ceph.sh install           apt-get install the Ceph packages (idempotent, quiet)
#   scripts/ceph.sh missing-packages  print the Debian packages still to install (for
#                                     scripts/install-deps.sh: one list, one apt-get)
#   scripts/ceph.sh start [DIR]       start the cluster (or reuse the one up in DIR);
#                                     the last line printed is the path of DIR/env
#   scripts/ceph.sh stop [DIR]        kill its daemons and remove DIR
#   scripts/ceph.sh status [DIR]      say whether it is up (exit 0) or not (exit 1)
#   scripts/ceph.sh check [DIR]       check what vpool relies on: SigV4 PUT/GET, range
#                                     GET, If-None-Match: * (412; one winner of 8),
#                                     radosgw stop/start on the same port
#   scripts/ceph.sh rgw-stop [DIR]    stop only radosgw (SIGKILL: the object store goes
#                                     down at once; connections are refused on return)
#   scripts/ceph.sh rgw-start [DIR]   start radosgw again, on the same port (~1 s; returns
#                                     once it answers)
#
# DIR defaults to $VPOOL_CEPH_DIR, else /tmp/vpool-ceph. For development:
#
#   scripts/ceph.sh start && . /tmp/vpool-ceph/env
#
# DIR/env exports VPOOL_TEST_S3_ENDPOINT (http://127.0.0.1:PORT),
# VPOOL_TEST_S3_BUCKET (vpool-test, created empty), AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY (fixed test keys), AWS_REGION, AWS_ALLOW_HTTP=true,
# VPOOL_TEST_CEPH_CONF (DIR/ceph.conf, for `ceph -c`, `rbd -c`, `rados -c`)
# and VPOOL_CEPH_DIR (DIR, so that rgw-stop/rgw-start find it).
# Requests are signed with SigV4; RGW checks the signature with whatever
# region the client puts in its credential scope.
#
# By hand with curl, add the payload-hash header: Debian 12's curl (7.88)
# leaves it out and RGW then answers SignatureDoesNotMatch:
#
#   curl --aws-sigv4 aws:amz:default:s3 --user "$AWS_ACCESS_KEY_ID:$AWS_SECRET_ACCESS_KEY" \
#        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$VPOOL_TEST_S3_ENDPOINT/vpool-test/KEY"
#
# RGW 16.2: a PUT with `If-None-Match: *` is an atomic create (412 if the key
# exists, one winner among concurrent creates); `If-Match` on a PUT matches
# only the ETag without its quotes.
#
# Auth is off (auth_*_required = none, every ms_*_mode = crc); the daemons
# listen on 127.0.0.1 only. Logs are in DIR/log/, pid files in DIR/pid/.
# Starting takes ~6-10 s and the daemons ~1 GB of RAM. Every step has a
# timeout (CEPH_TIMEOUT_SECS, default 120, per step); on failure the script
# exits non-zero with the tail of the daemon's log.
set -euo pipefail

ACCESS_KEY=VPOOLTESTACCESSKEY01
SECRET_KEY=vpool-test-secret-key-0123456789abcdefgh
BUCKET=vpool-test
REGION=default
MARK="# vpool-ceph micro-cluster (scripts/ceph.sh)"

cmd=${1:-}
dir=${2:-${VPOOL_CEPH_DIR:-/tmp/vpool-ceph}}
timeout_secs=${CEPH_TIMEOUT_SECS:-120}
case "$dir" in /*) ;; *) dir=$PWD/$dir ;; esac
dir=${dir%/}
conf=$dir/ceph.conf

say() { printf 'ceph.sh: %s\n' "$*" >&2; }
# die MSG [LOG...]: fail with the tail of each LOG that exists.
die() {
    local msg=$1 f
    shift
    say "FAILED: $msg"
    for f in "$@"; do
        [ -s "$f" ] || continue
        echo "ceph.sh: last lines of $f:" >&2
        grep -v '^[[:space:]]*$' "$f" | tail -n 30 | sed 's/^/    /' >&2
    done
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }

# ------------------------------------------------------------------ install
pkgs_missing() {
    local m=()
    have ceph-mon || m+=(ceph-mon)
    have ceph-mgr || m+=(ceph-mgr)
    have ceph-osd || m+=(ceph-osd)
    have radosgw || m+=(radosgw)
    { have ceph && have rbd && have rados && have radosgw-admin && have monmaptool &&
        have ceph-authtool; } || m+=(ceph-common)
    have curl || m+=(curl)
    have python3 || m+=(python3)
    have setsid || m+=(util-linux)
    echo "${m[@]}"
}
do_install() {
    local missing still log
    read -r -a missing <<<"$(pkgs_missing)"
    [ ${#missing[@]} -eq 0 ] && return 0
    have apt-get || die "apt-get not found; install by hand: ${missing[*]}"
    local sudo=()
    if [ "$(id -u)" != 0 ]; then sudo=(sudo -n); fi
    log=$(mktemp "${TMPDIR:-/tmp}/ceph-install.XXXXXX.log")
    # shellcheck disable=SC2064
    trap "rm -f '$log'" EXIT
    "${sudo[@]}" apt-get update -q >>"$log" 2>&1 || true
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends \
        -o DPkg::Lock::Timeout=600 -o Dpkg::Options::=--force-confdef \
        -o Dpkg::Options::=--force-confold "${missing[@]}" >>"$log" 2>&1 ||
        die "apt-get install ${missing[*]}" "$log"
    read -r -a still <<<"$(pkgs_missing)"
    [ ${#still[@]} -eq 0 ] || die "still missing after apt-get install: ${still[*]}" "$log"
    echo "ceph.sh: installed ${missing[*]}"
}

# ------------------------------------------------------------------ helpers
need_tools() {
    local missing
    read -r -a missing <<<"$(pkgs_missing)"
    [ ${#missing[@]} -eq 0 ] ||
        die "missing: ${missing[*]} (run scripts/ceph.sh install or scripts/install-deps.sh)"
}
ceph_cli() { timeout 30 ceph -c "$conf" --connect-timeout 10 "$@"; }
conf_get() { sed -n "s/^# $1: //p" "$conf" 2>/dev/null | head -1; }
pidfile() { echo "$dir/pid/$1.pid"; }
logfile() { echo "$dir/log/$1.out"; }
# pid_alive PID: the process exists and is not a zombie (the daemons'
# parent is PID 1 once this script is gone, which may be slow to reap them).
pid_alive() {
    local st
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 1
    st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [ "${st:0:1}" != Z ] && [ "${st:0:1}" != X ]
}
alive() { # NAME
    local p
    p=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
    pid_alive "$p"
}
# spawn NAME CMD...: run CMD in its own session, detached from this script's
# terminal, pipes and process group (CI's timeout kills that group), stdout
# and stderr to DIR/log/NAME.out, pid to DIR/pid/NAME.pid.
spawn() {
    local name=$1
    shift
    (
        # Close inherited descriptors (a pipe held open by a daemon would keep
        # whoever reads this script's output waiting forever).
        for f in "/proc/$BASHPID/fd/"*; do
            fd=${f##*/}
            if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then eval "exec $fd>&-"; fi
        done
        exec setsid "$@"
    ) </dev/null >"$(logfile "$name")" 2>&1 &
    echo $! >"$(pidfile "$name")"
}
# our_pid NAME: the pid of NAME's process if it is alive and ours (its
# command line names this DIR's conf).
our_pid() {
    local p
    p=$(cat "$(pidfile "$1")" 2>/dev/null) || return 1
    pid_alive "$p" || return 1
    tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qF -- "$conf" || return 1
    echo "$p"
}
# kill_daemons SIGNAL NAME...: SIGNAL to each, KILL to any still there after
# 15 s; waits until they are gone and removes their pid files.
kill_daemons() {
    local sig=$1 name p pids=()
    shift
    for name in "$@"; do
        if p=$(our_pid "$name"); then
            kill "-$sig" "$p" 2>/dev/null || true
            pids+=("$p")
        fi
    done
    gone() { local q; for q in "${pids[@]}"; do pid_alive "$q" && return 1; done; return 0; }
    if [ ${#pids[@]} -gt 0 ]; then
        for _ in $(seq 150); do gone && break; sleep 0.1; done
        gone || kill -KILL "${pids[@]}" 2>/dev/null || true
        for _ in $(seq 100); do gone && break; sleep 0.1; done
    fi
    for name in "$@"; do rm -f "$(pidfile "$name")"; done
}
# wait_for DESC NAME CMD...: until CMD succeeds; fails with NAME's logs if
# NAME's process dies or the timeout passes.
wait_for() {
    local desc=$1 name=$2 deadline
    shift 2
    deadline=$((SECONDS + timeout_secs))
    until "$@" >/dev/null 2>&1; do
        alive "$name" || die "$name exited while waiting for $desc" \
            "$(logfile "$name")" "$dir/log/$(daemon_log "$name")"
        [ $SECONDS -lt $deadline ] || die "$desc: not within $timeout_secs s" \
            "$(logfile "$name")" "$dir/log/$(daemon_log "$name")"
        sleep 0.5
    done
}
daemon_log() {
    case "$1" in
        mon) echo mon.a.log ;; mgr) echo mgr.x.log ;; osd) echo osd.0.log ;;
        rgw) echo client.rgw.a.log ;;
    esac
}
free_ports() { # N: N distinct free TCP ports on 127.0.0.1, outside the
    # ephemeral range (so an outgoing connection cannot take one meanwhile)
    # and Ceph's own 6800-7300.
    python3 - "$1" <<'PY'
import random, socket, sys
n, held = int(sys.argv[1]), []
while len(held) < n:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", random.randrange(17000, 30000)))
    except OSError:
        s.close()
        continue
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
PY
}
port_free() {
    python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1])))' "$1" 2>/dev/null
}
rgw_url() { echo "http://127.0.0.1:$(conf_get rgw_port)"; }
# s3 CURL-ARGS...: a SigV4-signed request with the test keys; prints the
# HTTP status code. Debian 12's curl (7.88) does not send the
# x-amz-content-sha256 header that RGW needs (SignatureDoesNotMatch without
# it); given one, curl signs it and uses its value as the payload hash.
# The body goes to $S3_OUT (default /dev/null).
s3() {
    curl -sS -o "${S3_OUT:-/dev/null}" -w '%{http_code}' --max-time 10 \
        --aws-sigv4 "aws:amz:$REGION:s3" --user "$ACCESS_KEY:$SECRET_KEY" \
        -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' "$@"
}
rgw_answers() { curl -s -o /dev/null --max-time 3 "$(rgw_url)/"; }
bucket_ok() { [ "$(s3 -I "$(rgw_url)/$BUCKET")" = 200 ]; }
healthy() {
    [ -f "$conf" ] && [ -f "$dir/env" ] || return 1
    local d
    for d in mon mgr osd rgw; do alive "$d" || return 1; done
    bucket_ok
}

start_rgw() {
    local port
    port=$(conf_get rgw_port)
    alive rgw && rgw_answers && return 0
    kill_daemons KILL rgw
    # The previous radosgw's socket may linger a moment.
    for _ in $(seq 50); do port_free "$port" && break; sleep 0.2; done
    port_free "$port" || die "port $port (radosgw's) is taken by another process"
    spawn rgw radosgw -c "$conf" -n client.rgw.a -f
    wait_for "radosgw to answer on $(rgw_url)" rgw rgw_answers
}

write_conf() { # MON_PORT RGW_PORT
    local fsid
    fsid=$(cat /proc/sys/kernel/random/uuid)
    cat >"$conf" <<EOF
$MARK
# rgw_port: $2
# mon_port: $1
[global]
fsid = $fsid
mon_host = [v2:127.0.0.1:$1]
public_addr = 127.0.0.1
ms_bind_msgr1 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_cluster_mode = crc
ms_service_mode = crc
ms_client_mode = crc
ms_mon_cluster_mode = crc
ms_mon_service_mode = crc
ms_mon_client_mode = crc
keyring = $dir/keyring
run_dir = $dir/run
admin_socket = $dir/run/\$name.asok
pid_file = $dir/run/\$name.pid
log_file = $dir/log/\$name.log
log_to_stderr = false
err_to_stderr = true
crash_dir = $dir/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_max_pg_per_osd = 1000
mon_data_avail_warn = 2
mon_data_avail_crit = 1
paxos_propose_interval = 0.1
paxos_min_wait = 0.01

[mon]
mon_data = $dir/mon/\$id
mon_cluster_log_file = $dir/log/cluster.log

[mgr]
mgr_data = $dir/mgr/\$id

[osd]
osd_data = $dir/osd/\$id
osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = 17179869184
bluestore_fsck_on_mount = false
bluestore_fsck_on_mkfs = false
osd_memory_target = 939524096
osd_scrub_auto_repair = false
osd_scrub_begin_hour = 0
osd_scrub_end_hour = 0

[client.rgw.a]
rgw_frontends = beast endpoint=127.0.0.1:$2 tcp_nodelay=1
rgw_data = $dir/rgw
rgw_thread_pool_size = 64
rgw_dynamic_resharding = false
rgw_enable_usage_log = false
EOF
}

do_start() {
    need_tools
    if healthy; then
        say "reusing the cluster up in $dir ($(rgw_url))"
        echo "$dir/env"
        return 0
    fi
    # Only radosgw down (rgw-stop without rgw-start): start it again.
    if [ -f "$dir/env" ] && alive mon && alive mgr && alive osd; then
        start_rgw
        if healthy; then
            say "restarted radosgw; reusing the cluster in $dir ($(rgw_url))"
            echo "$dir/env"
            return 0
        fi
    fi
    if [ -e "$dir" ]; then
        if [ -f "$conf" ] && head -1 "$conf" | grep -qxF "$MARK"; then
            say "a cluster in $dir is not (fully) up: stopping it and starting anew"
            do_stop
        elif [ -d "$dir" ] && [ -z "$(ls -A "$dir")" ]; then
            :
        else
            die "$dir exists and is not a scripts/ceph.sh cluster directory; remove it or pick another"
        fi
    fi
    local t0=$SECONDS mon_port rgw_port osd_uuid
    mkdir -p "$dir"
    read -r mon_port rgw_port <<<"$(free_ports 2)"
    write_conf "$mon_port" "$rgw_port"
    mkdir -p "$dir"/{pid,log,run,mon/a,mgr/x,osd/0,rgw,crash}

    # mon
    ceph-authtool --create-keyring "$dir/keyring" --gen-key -n mon. --cap mon 'allow *' \
        >"$dir/log/mkfs.out" 2>&1 || die "ceph-authtool" "$dir/log/mkfs.out"
    monmaptool --create --enable-all-features --fsid "$(sed -n 's/^fsid = //p' "$conf")" \
        --addv a "[v2:127.0.0.1:$mon_port]" "$dir/monmap" >>"$dir/log/mkfs.out" 2>&1 ||
        die "monmaptool" "$dir/log/mkfs.out"
    ceph-mon -c "$conf" -i a --mkfs --monmap "$dir/monmap" >>"$dir/log/mkfs.out" 2>&1 ||
        die "ceph-mon --mkfs" "$dir/log/mkfs.out" "$dir/log/mon.a.log"
    spawn mon ceph-mon -c "$conf" -i a -f
    wait_for "the monitor to answer on 127.0.0.1:$mon_port" mon ceph_cli mon stat
    say "mon up ($((SECONDS - t0)) s)"

    # mgr (not waited for here: checked at the end)
    spawn mgr ceph-mgr -c "$conf" -i x -f

    # osd: a sparse bluestore file
    osd_uuid=$(cat /proc/sys/kernel/random/uuid)
    [ "$(ceph_cli osd new "$osd_uuid" 2>>"$dir/log/mkfs.out")" = 0 ] ||
        die "ceph osd new did not give id 0" "$dir/log/mkfs.out"
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$osd_uuid" >>"$dir/log/mkfs.out" 2>&1 ||
        die "ceph-osd --mkfs" "$dir/log/mkfs.out" "$dir/log/osd.0.log"
    spawn osd ceph-osd -c "$conf" -i 0 -f
    osd_up() { ceph_cli osd stat -f json | grep -q '"num_up_osds":1,'; }
    wait_for "osd.0 to be up" osd osd_up
    say "osd up ($((SECONDS - t0)) s)"

    # rgw, its user and the bucket
    start_rgw
    say "rgw up ($((SECONDS - t0)) s)"
    radosgw-admin -c "$conf" user create --uid=vpool-test --display-name="vpool tests" \
        --access-key="$ACCESS_KEY" --secret="$SECRET_KEY" >>"$dir/log/mkfs.out" 2>&1 ||
        die "radosgw-admin user create" "$dir/log/mkfs.out"
    local code
    code=$(s3 -X PUT "$(rgw_url)/$BUCKET") || true
    [ "$code" = 200 ] || die "creating bucket $BUCKET: HTTP $code" "$dir/log/client.rgw.a.log"
    bucket_ok || die "HEAD of bucket $BUCKET failed" "$dir/log/client.rgw.a.log"

    mgr_up() { ceph_cli mgr stat -f json | grep -q '"available": *true'; }
    wait_for "the manager to be available" mgr mgr_up

    {
        echo "# scripts/ceph.sh start $dir"
        printf 'export %s=%q\n' VPOOL_TEST_S3_ENDPOINT "$(rgw_url)" VPOOL_TEST_S3_BUCKET "$BUCKET" \
            AWS_ACCESS_KEY_ID "$ACCESS_KEY" AWS_SECRET_ACCESS_KEY "$SECRET_KEY" \
            AWS_REGION "$REGION" AWS_ALLOW_HTTP true VPOOL_TEST_CEPH_CONF "$conf" \
            VPOOL_CEPH_DIR "$dir"
    } >"$dir/env.tmp"
    mv "$dir/env.tmp" "$dir/env"
    say "up in $((SECONDS - t0)) s: S3 on $(rgw_url), bucket $BUCKET, conf $conf"
    echo "$dir/env"
}

do_stop() {
    [ -e "$dir" ] || return 0
    if ! { [ -f "$conf" ] && head -1 "$conf" | grep -qxF "$MARK"; } &&
        ! { [ -d "$dir" ] && [ -z "$(ls -A "$dir")" ]; }; then
        die "$dir is not a scripts/ceph.sh cluster directory; not removing it"
    fi
    # The data goes with DIR, so no need for a clean shutdown.
    kill_daemons KILL rgw mgr osd mon
    rm -rf "$dir"
}

# check: what vpool relies on, against the running cluster: SigV4 PUT, GET,
# range GET, conditional create (If-None-Match: *) with 412 for the loser,
# exactly one winner among 8 concurrent creates, and radosgw down (connection
# refused) and up again on the same port. Cleans up its objects.
do_check() {
    healthy || die "no cluster up in $dir (scripts/ceph.sh start first)"
    local base key tmp code i n200 n412
    base=$(rgw_url)/$BUCKET/ceph-sh-check/$$-$RANDOM
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/ceph-check.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    printf '0123456789abcdefghijABCDEFGHIJ' >"$tmp/obj"
    expect() { # WHAT WANT GOT
        [ "$2" = "$3" ] || die "check: $1: expected $2, got $3" "$dir/log/client.rgw.a.log"
    }
    expect "PUT" 200 "$(s3 -T "$tmp/obj" "$base/a")"
    expect "GET" 200 "$(S3_OUT=$tmp/got s3 "$base/a")"
    cmp -s "$tmp/obj" "$tmp/got" || die "check: GET returned other bytes than were PUT"
    expect "range GET" 206 "$(S3_OUT=$tmp/range s3 -H 'Range: bytes=10-19' "$base/a")"
    expect "range GET body" abcdefghij "$(cat "$tmp/range")"
    expect "conditional create of a new key" 200 "$(s3 -H 'If-None-Match: *' -T "$tmp/obj" "$base/c")"
    expect "conditional create of an existing key" 412 "$(s3 -H 'If-None-Match: *' -T "$tmp/obj" "$base/c")"
    for i in 1 2 3 4 5 6 7 8; do
        echo "writer $i" >"$tmp/w$i"
        s3 -H 'If-None-Match: *' -T "$tmp/w$i" "$base/race" >"$tmp/code$i" &
    done
    wait
    n200=0 n412=0
    for i in 1 2 3 4 5 6 7 8; do
        case "$(cat "$tmp/code$i")" in
            200) n200=$((n200 + 1)) ;;
            412) n412=$((n412 + 1)) ;;
        esac
    done
    expect "8 concurrent conditional creates: winners,losers" 1,7 "$n200,$n412"
    expect "GET of the raced key" 200 "$(S3_OUT=$tmp/race s3 "$base/race")"
    for i in 1 2 3 4 5 6 7 8; do
        if [ "$(cat "$tmp/code$i")" = 200 ]; then cmp -s "$tmp/w$i" "$tmp/race" ||
            die "check: the object is not the winner's"; fi
    done
    kill_daemons KILL rgw
    code=$(s3 "$base/a" 2>/dev/null) || true
    expect "GET with radosgw stopped" 000 "$code"
    start_rgw
    expect "GET after radosgw restarted" 200 "$(s3 "$base/a")"
    for key in a c race; do
        expect "DELETE" 204 "$(s3 -X DELETE "$base/$key")"
    done
    say "check passed on $(rgw_url): SigV4 PUT, GET, range GET, If-None-Match: * (200 then 412;" \
        "8 concurrent: 1 won, 7 got 412), rgw-stop (refused) and rgw-start"
}

do_status() {
    if healthy; then
        say "up: S3 on $(rgw_url), conf $conf"
        return 0
    fi
    say "not up in $dir"
    return 1
}

case "$cmd" in
    install) do_install ;;
    missing-packages) pkgs_missing ;;
    start) do_start ;;
    stop) do_stop ;;
    status) do_status ;;
    check) do_check ;;
    rgw-stop)
        [ -f "$conf" ] || die "no cluster in $dir"
        kill_daemons KILL rgw ;;
    rgw-start)
        [ -f "$conf" ] || die "no cluster in $dir"
        { alive mon && alive osd; } || die "the cluster in $dir is not up (mon or osd down)"
        start_rgw ;;
    -h|--help|help)
        awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" ;;
    *)
        echo "usage: scripts/ceph.sh install|start|stop|status|check|rgw-stop|rgw-start [DIR] (see --help)" >&2
        exit 2 ;;
esac
