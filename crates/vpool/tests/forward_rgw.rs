//! Forwarding and handover on RGW (`docs/multi-host.md`, section 3): two
//! daemons with a peer link attach one shared pool; a client of either
//! host reads and writes any volume (the host that does not own it
//! forwards to the owner), both at once (a shared disk, checked with
//! fio's verify), and ownership moves to the host whose client remains
//! once the owner has none.
//!
//! Needs the Ceph RGW micro-cluster of the test command (as `s3_rgw.rs`);
//! skipped without `VPOOL_TEST_S3_ENDPOINT` unless `VPOOL_REQUIRE_S3=1`.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;
#[path = "../../vpool-s3/tests/common/rgw_env.rs"]
#[allow(dead_code)]
mod rgw_env;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use common::{Daemon, pool_on_s3, run_err, run_json, run_ok, test_url};
use nbd_common::clients::{
    qemu_img_compare, qemu_img_convert_from, qemu_img_convert_to, qemu_io, require_tool,
};
use nbd_common::pattern;
use rgw_env::rgw_env as rgw;

const MIB: usize = 1 << 20;
const PEER: [&str; 2] = ["--peer-listen", "127.0.0.1:0"];
/// Creates `shared/db1`, 16 MiB, with its own `remote` durability.
const REMOTE_DB1: [&str; 7] = [
    "vol",
    "create",
    "shared/db1",
    "--size",
    "16M",
    "--durability",
    "remote",
];

fn status(home: &Path, vol: &str) -> serde_json::Value {
    run_json(home, &["vol", "status", vol])
}

/// fio's nbd engine with crc32c verification over `size` bytes at
/// `offset` of the export.
fn fio_verify_at(uri: &str, offset: &str, size: &str) -> std::process::Output {
    Command::new(require_tool("fio"))
        .args([
            "--name=shared",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            &format!("--offset={offset}"),
            &format!("--size={size}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .output()
        .expect("fio runs")
}

/// `qemu_io` on a thread of its own.
fn qemu_io_in_background(uri: String, cmds: &[&str]) -> std::thread::JoinHandle<String> {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    std::thread::spawn(move || {
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io(&uri, &cmds)
    })
}

/// Waits (up to 15 s) for `vol status` on `home` to say the volume is
/// owned there.
fn wait_owned(home: &Path, vol: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let st = status(home, vol);
        if st["here"] == true {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "never moved: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn any_host_serves_a_volume_and_ownership_follows_the_clients() {
    let Some(rgw) = rgw() else { return };
    let (t, a, b) = two_hosts(&rgw, "forward", "0.5");
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    run_ok(&home_a, &["vol", "create", "shared/db1", "--size", "32M"]);
    let st = status(&home_b, "shared/db1");
    assert!(
        st["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{st}"
    );

    // Written on A, the owner; read through B, which forwards.
    let img = t.path().join("image");
    std::fs::write(&img, pattern(32 * MIB, 5)).unwrap();
    qemu_img_convert_to(&img, &a.nbd_uri("shared/db1"));
    assert!(qemu_img_compare(&b.nbd_uri("shared/db1"), &img));
    // Written and flushed through B, read on A at once.
    qemu_io(&b.nbd_uri("shared/db1"), &["write -P 0x5b 1M 1M", "flush"]);
    qemu_io(&a.nbd_uri("shared/db1"), &["read -P 0x5b 1M 1M"]);
    assert_eq!(status(&home_a, "shared/db1")["here"], true);

    // A shared disk: clients on both hosts at once, each verifying what
    // it wrote (ownership may move meanwhile, if one finishes first);
    // then both hosts read the same bytes.
    let (uri_a, uri_b) = (a.nbd_uri("shared/db1"), b.nbd_uri("shared/db1"));
    let on_b = std::thread::spawn(move || fio_verify_at(&uri_b, "16M", "16M"));
    let out_a = fio_verify_at(&uri_a, "0", "16M");
    let out_b = on_b.join().unwrap();
    for out in [&out_a, &out_b] {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("err= 0"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (via_a, via_b) = (t.path().join("via-a"), t.path().join("via-b"));
    qemu_img_convert_from(&a.nbd_uri("shared/db1"), &via_a);
    qemu_img_convert_from(&b.nbd_uri("shared/db1"), &via_b);
    assert!(std::fs::read(&via_a).unwrap() == std::fs::read(&via_b).unwrap());

    // Handover: a client stays on the host that does not own the volume
    // and the owner has none; the volume moves to it within seconds,
    // while that client's I/O goes on.
    let (owner, other, other_home, from) = if status(&home_a, "shared/db1")["here"] == true {
        (&a, &b, &home_b, "A")
    } else {
        (&b, &a, &home_a, "B")
    };
    let client = qemu_io_in_background(
        other.nbd_uri("shared/db1"),
        &[
            "write -P 0x77 4M 1M",
            "sleep 6000",
            "read -P 0x77 4M 1M",
            "write -P 0x78 5M 1M",
            "flush",
        ],
    );
    let moved = wait_owned(other_home, "shared/db1");
    client.join().unwrap();
    eprintln!(
        "FIGURE handover: the volume moved from {from} to its client's host {:.1} s after that client came",
        moved.as_secs_f64()
    );
    let log = other.log_text();
    let pause = log
        .lines()
        .rev()
        .find(|l| l.contains("volume handed over"))
        .expect("the new owner logs the handover");
    eprintln!("FIGURE handover log: {pause}");
    // The old owner forwards now, and reads everything.
    qemu_io(
        &owner.nbd_uri("shared/db1"),
        &["read -P 0x77 4M 1M", "read -P 0x78 5M 1M"],
    );
    qemu_img_convert_from(&owner.nbd_uri("shared/db1"), &via_a);
    let mut want = std::fs::read(&via_b).unwrap();
    want[4 * MIB..5 * MIB].fill(0x77);
    want[5 * MIB..6 * MIB].fill(0x78);
    assert!(
        std::fs::read(&via_a).unwrap() == want,
        "the old owner reads what the new one has"
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// Two daemons with a peer link each, homes `t/a` and `t/b` (the
/// returned temporary directory), attaching shared pool `shared` at a new
/// URL: created on A, attached on B, caches in `t/ca` and `t/cb`, a 3 s
/// lease, segments sealed after `seal_after_s`.
fn two_hosts(rgw: &rgw_env::RgwEnv, what: &str, seal_after_s: &str) -> (TempDir, Daemon, Daemon) {
    let (t, mut hosts) = hosts(rgw, what, seal_after_s, 2);
    let b = hosts.pop().expect("two hosts");
    let a = hosts.pop().expect("two hosts");
    (t, a, b)
}

/// `n` daemons as [`two_hosts`] makes two: homes `t/a`, `t/b`, `t/c`...,
/// the pool created on the first and attached on the others.
fn hosts(rgw: &rgw_env::RgwEnv, what: &str, seal_after_s: &str, n: u8) -> (TempDir, Vec<Daemon>) {
    let t = tempfile::tempdir().unwrap();
    let url = test_url(&rgw.bucket, what);
    let mut daemons = Vec::new();
    for i in 0..n {
        let name = char::from(b'a' + i).to_string();
        let home = t.path().join(&name);
        daemons.push(Daemon::start(&home, &PEER));
        let verb = if i == 0 { "create" } else { "attach" };
        let mut args = vec!["--seal-after", seal_after_s, "--lease-expire", "3"];
        if i == 0 {
            args.push("--shared");
        }
        let cache = t.path().join(format!("c{name}"));
        pool_on_s3(&home, verb, "shared", &url, &rgw.endpoint, &cache, &args);
    }
    (t, daemons)
}

/// A client on B, forwarded to A, goes on when A dies with its cache:
/// B takes the volume over once A's lease lapsed, by itself, and with the
/// volume's `remote` durability has every write flushed through A.
#[test]
fn a_forwarded_client_survives_the_owner_s_death() {
    let Some(rgw) = rgw() else { return };
    // Nothing is uploaded but through the flush journal (sealed after
    // 10 minutes): only the volume's own `remote` durability saves what
    // A acknowledged.
    let (t, a, b) = two_hosts(&rgw, "failover", "600");
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    run_ok(&home_a, &REMOTE_DB1);
    assert_eq!(status(&home_b, "shared/db1")["durability"], "remote");
    let e = run_err(
        &home_a,
        &[
            "vol",
            "create",
            "x",
            "--size",
            "1M",
            "--durability",
            "remote",
        ],
    );
    assert!(e.contains("only in a shared pool"), "{e}");
    // A client of A's own keeps the volume there.
    let mut pin = Command::new(require_tool("qemu-io"))
        .args(["-f", "raw", "-c", "sleep 600000", &a.nbd_uri("shared/db1")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    qemu_io(&b.nbd_uri("shared/db1"), &["write -P 0x31 0 1M", "flush"]);
    let client = qemu_io_in_background(
        b.nbd_uri("shared/db1"),
        &[
            "write -P 0x33 2M 1M",
            "flush",
            "sleep 3000",
            "read -P 0x31 0 1M",
            "read -P 0x33 2M 1M",
        ],
    );
    // (After that client's flush, which covers every write before it.)
    std::thread::sleep(Duration::from_millis(1000));
    // A write A acknowledges but nothing flushes before A dies: the flush
    // after the failover cannot cover it, and says so.
    let unflushed = {
        use std::io::Write;
        let socket = b.nbd_socket();
        std::thread::spawn(move || {
            let mut s = nbd_common::raw::open_export(&socket, "shared/db1");
            let mut req = nbd_common::raw::request(1, 0, 1, 3 << 20, 65536);
            req.extend(std::iter::repeat_n(0x35u8, 65536));
            s.write_all(&req).unwrap();
            let written = nbd_common::raw::simple_reply(&mut s).0;
            std::thread::sleep(Duration::from_millis(7000));
            s.write_all(&nbd_common::raw::request(3, 0, 2, 0, 0))
                .unwrap();
            (written, nbd_common::raw::simple_reply(&mut s).0)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let st = status(&home_b, "shared/db1");
    assert_eq!(st["here"], false, "still on A: {st}");
    assert_eq!(st["forwarded_clients"], 2, "{st}");
    let st = status(&home_a, "shared/db1");
    // B's clients share its sessions to A (one per request in flight).
    let n = st["nbd_connections"].as_u64().unwrap_or(0);
    assert!(
        (2..=3).contains(&n),
        "A's own client and B's sessions: {st}"
    );
    a.crash();
    let killed = Instant::now();
    let _ = pin.kill();
    let _ = pin.wait();
    std::fs::remove_dir_all(t.path().join("ca")).unwrap();
    let served = wait_owned(&home_b, "shared/db1");
    client.join().unwrap();
    let (written, flushed) = unflushed.join().unwrap();
    assert_eq!(written, 0, "the write was acknowledged");
    assert_ne!(flushed, 0, "the flush after the failover must fail");

    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "not before A's lease lapsed"
    );
    eprintln!(
        "FIGURE failover: a client forwarded from B went on, B serving the volume {:.1} s after SIGKILL of its owner (lease 3 s)",
        served.as_secs_f64()
    );
    // A new client after the failover writes and flushes as usual.
    qemu_io(
        &b.nbd_uri("shared/db1"),
        &[
            "write -P 0x32 1M 1M",
            "flush",
            "read -P 0x31 0 1M",
            "read -P 0x32 1M 1M",
            "read -P 0x33 2M 1M",
        ],
    );
    assert!(b.terminate().success());
}

/// The owner is paused (SIGSTOP) past its lease, as a partition would:
/// the other host's forwarded client goes on once that host took the
/// volume over; when the owner wakes (SIGCONT) it finds itself fenced, its
/// own client's writes fail, nothing of them reaches the volume, and a new
/// client of the woken host is forwarded to the new owner.
#[test]
fn a_paused_owner_wakes_fenced_and_forwards_its_new_clients() {
    let Some(rgw) = rgw() else { return };
    let (t, a, b) = two_hosts(&rgw, "paused", "0.5");
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    run_ok(&home_a, &REMOTE_DB1);
    // A's own client: a write and flush now, then one more write after A
    // woke up, which must fail.
    let uri_a = a.nbd_uri("shared/db1");
    let own = std::thread::spawn(move || {
        Command::new(require_tool("qemu-io"))
            .args([
                "-f",
                "raw",
                "-c",
                "write -P 0x41 0 64k",
                "-c",
                "flush",
                "-c",
                "sleep 9000",
            ])
            .args(["-c", "write -P 0x42 0 64k", "-c", "flush", &uri_a])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1000));
    let forwarded = qemu_io_in_background(
        b.nbd_uri("shared/db1"),
        &[
            "write -P 0x51 1M 64k",
            "flush",
            "sleep 2500",
            "read -P 0x51 1M 64k",
            "read -P 0x41 0 64k",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    a.signal(libc::SIGSTOP);
    let moved = wait_owned(&home_b, "shared/db1");
    forwarded.join().unwrap();
    eprintln!(
        "FIGURE paused owner: B serves the volume {:.1} s after A stopped (lease 3 s)",
        moved.as_secs_f64()
    );
    a.signal(libc::SIGCONT);
    let out = own.join().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("failed"),
        "A's write after it woke must fail:\n{text}"
    );
    // A finds out at its next lease renewal (every 0.5 s with a 3 s
    // lease), and drops the volume.
    let t0 = Instant::now();
    while status(&home_a, "shared/db1")["here"] != false {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "A never saw it was fenced"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // A new client of A is forwarded to B and sees B's volume, without
    // A's failed write.
    qemu_io(
        &a.nbd_uri("shared/db1"),
        &["read -P 0x41 0 64k", "read -P 0x51 1M 64k"],
    );
    assert!(
        a.log_text().contains("another host took this volume over"),
        "{}",
        a.log_text()
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// A volume with clients on two hosts other than its owner stays with the
/// owner (each forwards); once one of them is gone, it moves to the host
/// whose client remains.
#[test]
fn a_volume_used_from_two_hosts_moves_only_when_one_is_left() {
    let Some(rgw) = rgw() else { return };
    let (t, hosts) = hosts(&rgw, "three", "0.5", 3);
    let (home_a, home_c) = (t.path().join("a"), t.path().join("c"));
    run_ok(&home_a, &["vol", "create", "shared/db1", "--size", "16M"]);
    run_ok(&home_a, &["vol", "create", "shared/db2", "--size", "16M"]);
    // A's two volumes run on the shared pool's S3 runtime (2 threads).
    let io_threads = std::fs::read_dir(format!("/proc/{}/task", hosts[0].child.id()))
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "vpool-s3-io")
        .count();
    assert_eq!(io_threads, 2, "one runtime for the shared pool");
    let on_b = qemu_io_in_background(
        hosts[1].nbd_uri("shared/db1"),
        &["write -P 0x61 0 64k", "sleep 4000", "read -P 0x61 0 64k"],
    );
    let on_c = qemu_io_in_background(
        hosts[2].nbd_uri("shared/db1"),
        &[
            "write -P 0x62 1M 64k",
            "sleep 9000",
            "read -P 0x62 1M 64k",
            "read -P 0x61 0 64k",
        ],
    );
    // Both forward for 4 s: A keeps it (its watchers ask every second).
    std::thread::sleep(Duration::from_millis(3000));
    let st = status(&home_a, "shared/db1");
    assert_eq!(st["here"], true, "{st}");
    assert_eq!(
        st["nbd_connections"], 2,
        "a session from B and one from C: {st}"
    );
    on_b.join().unwrap();
    let moved = wait_owned(&home_c, "shared/db1");
    on_c.join().unwrap();
    eprintln!(
        "FIGURE three hosts: moved to C {:.1} s after B's client left",
        moved.as_secs_f64()
    );
    assert_eq!(status(&home_a, "shared/db1")["here"], false);
    for d in hosts {
        assert!(d.terminate().success());
    }
}

/// A client whose host took the volume over while it was idle still
/// counts there: a client that comes to the old owner meanwhile is
/// forwarded, the volume does not move back under the idle one, whose
/// next reads and writes go on.
#[test]
fn an_idle_client_of_the_new_owner_keeps_the_volume_there() {
    let Some(rgw) = rgw() else { return };
    let (t, a, b) = two_hosts(&rgw, "idle", "0.5");
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    run_ok(&home_a, &["vol", "create", "shared/db1", "--size", "16M"]);
    let on_b = qemu_io_in_background(
        b.nbd_uri("shared/db1"),
        &[
            "write -P 0x71 0 64k",
            "sleep 6000",
            "read -P 0x71 0 64k",
            "write -P 0x72 64k 64k",
            "flush",
        ],
    );
    wait_owned(&home_b, "shared/db1");
    let on_a = qemu_io_in_background(
        a.nbd_uri("shared/db1"),
        &["read -P 0x71 0 64k", "sleep 5000", "read -P 0x72 64k 64k"],
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        status(&home_b, "shared/db1")["here"],
        true,
        "B keeps it for its idle client"
    );
    on_b.join().unwrap();
    on_a.join().unwrap();
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// A clone of a sealed template reads its template's blocks on every path:
/// through the host that forwards to its owner, and through that same
/// client's device once the volume moved to the client's host (the
/// forwarding device turned local).
#[test]
fn a_clone_reads_its_template_on_every_path() {
    let Some(rgw) = rgw() else { return };
    let (t, a, b) = two_hosts(&rgw, "clone", "0.5");
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    run_ok(
        &home_a,
        &["vol", "create", "shared/golden", "--size", "16M"],
    );
    qemu_io(
        &a.nbd_uri("shared/golden"),
        &["write -P 0x33 0 16M", "flush"],
    );
    run_ok(&home_a, &["vol", "template", "shared/golden"]);
    run_ok(&home_b, &["vol", "clone", "shared/golden", "shared/web1"]);
    assert_eq!(status(&home_b, "shared/web1")["here"], true);

    // A forwards to B, the owner, which layers the clone.
    qemu_io(
        &a.nbd_uri("shared/web1"),
        &["read -P 0x33 0 16M", "write -P 0x44 1M 512", "flush"],
    );
    // A client stays on A; B has none: the clone moves to A while the
    // client's device goes on, now local, and still layered.
    let client = qemu_io_in_background(
        a.nbd_uri("shared/web1"),
        &[
            "read -P 0x33 2M 4k",
            "sleep 6000",
            "read -P 0x33 8M 1M",
            "read -P 0x44 1M 512",
            "read -P 0x33 1049088 3584",
            "write -P 0x55 10M 512",
            "read -P 0x33 10486272 3584",
            "flush",
        ],
    );
    wait_owned(&home_a, "shared/web1");
    client.join().unwrap();
    qemu_io(
        &b.nbd_uri("shared/web1"),
        &["read -P 0x55 10M 512", "read -P 0x33 12M 4M"],
    );
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}
