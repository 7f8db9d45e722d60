//! The daemon (`vpool serve`, the built binary) on pools in a real object
//! store: the Ceph RGW micro-cluster that the test command starts
//! (`scripts/ceph.sh`; its env file gives the endpoint, bucket and keys).
//! Without `VPOOL_TEST_S3_ENDPOINT` these tests skip, unless
//! `VPOOL_REQUIRE_S3=1` (the test command sets it) makes that a failure.
//!
//! - The NBD client suite of `nbd_clients.rs` (`common/nbd_suite.rs`:
//!   qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh, fio) on S3 pools, each
//!   pool then read back by a second daemon from an empty cache directory.
//! - SIGKILL of the daemon under a libnbd writer, restart on the same cache
//!   (`common/nbd_crash_rounds.rs`, as `nbd_crash.rs` runs it locally).
//! - SIGKILL, then the cache directory deleted: the pool reopened from the
//!   bucket alone (`pool attach`, `serve --force`) is the state after a
//!   prefix of the write log, at least as long as what was known uploaded.
//! - radosgw stopped under an NBD writer and started again: writes go on
//!   into the cache, cold reads fail with EIO in bounded time, the uploads
//!   catch up by themselves and the data verifies.
//!
//! - One daemon holding the default local pool, a second local pool and a
//!   pool on RGW: real clients through the one NBD socket, pools detached
//!   and added under I/O, a restart with radosgw down.
//!
//! The tests share one radosgw, which one of them stops and starts: they
//! take a lock, and each pool has its own key prefix
//! (`s3://BUCKET/test-NAME-RANDOM`).

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;
#[path = "common/nbd_crash_rounds.rs"]
mod nbd_crash_rounds;
#[path = "common/nbd_suite.rs"]
mod nbd_suite;
#[path = "../../vpool-s3/tests/common/rgw_env.rs"]
mod rgw_env;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{Daemon, run, run_err, run_json, run_ok};
use nbd_common::clients::{
    fio_verify, nbdcopy, nbdinfo, nbdsh_script, qemu_img_compare, qemu_img_convert_to,
};
use nbd_common::pattern;
use nbd_suite::{MIB, checksum, path_str};

static SERIAL: Mutex<()> = Mutex::new(());

/// The lock the tests of this file take (a failed test does not poison it
/// for the others).
fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

use rgw_env::{RgwDown, RgwEnv as Rgw, rgw_env as rgw};

impl Rgw {
    /// A new pool's URL, under a key prefix of its own.
    fn url(&self, name: &str) -> String {
        format!(
            "s3://{}/test-{name}-{:x}",
            self.bucket,
            rand::random::<u64>()
        )
    }

    /// `vpool pool create --s3 URL` (or `attach`) with its cache at
    /// `cache`: a 1 GiB cache, segments sealed after 0.5 s.
    fn pool_cmd(&self, verb: &str, url: &str, cache: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec![
            "pool",
            verb,
            "--s3",
            url,
            "--endpoint",
            &self.endpoint,
            "--cache",
            path_str(cache),
            "--cache-size",
            "1G",
            "--seal-after",
            "0.5",
        ];
        args.extend_from_slice(extra);
        run_json(cache, &args)
    }

    fn create(&self, url: &str, cache: &Path, extra: &[&str]) {
        let r = self.pool_cmd("create", url, cache, extra);
        assert_eq!(r["url"], url, "{r}");
    }

    /// Attaches `cache` (a new directory) to the pool; returns who holds it.
    fn attach(&self, url: &str, cache: &Path, extra: &[&str]) -> Option<String> {
        let r = self.pool_cmd("attach", url, cache, extra);
        r["held_by"].as_str().map(str::to_string)
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until everything written so far is in the bucket, as `vpool
/// cache stats --json` tells: no sealed segment waits for upload and the
/// open one holds no data.
fn wait_uploaded(pool: &Path, timeout: Duration) {
    wait_uploaded_of(pool, &["cache", "stats"], timeout)
}

/// [`wait_uploaded`], asking with `stats_cmd` (`cache stats [--pool P]`).
fn wait_uploaded_of(home: &Path, stats_cmd: &[&str], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let s = run_json(home, stats_cmd);
        if s["upload_lag_bytes"] == 0 && s["dirty_bytes"].as_u64().is_some_and(|d| d < 4096) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the uploads did not catch up within {timeout:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a pool holds, as its API shows it: per volume, its size, its
/// allocation (runs of (length, hole, zero), adjacent equal runs merged)
/// and a checksum of each piece (up to 1 MiB) of what is not zero, by
/// offset and length.
#[derive(Debug, PartialEq, Eq)]
struct VolumePrint {
    name: String,
    size: u64,
    runs: Vec<(u64, bool, bool)>,
    data: Vec<(u64, u64, u64)>,
}

fn fingerprint(d: &Daemon) -> Vec<VolumePrint> {
    let c = d.client();
    let mut vols = c.list_volumes().expect("list volumes");
    vols.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Vec::new();
    for v in vols {
        let mut runs: Vec<(u64, bool, bool)> = Vec::new();
        let mut data = Vec::new();
        let mut off = 0;
        while off < v.size_bytes {
            let a = c
                .allocation(&v.name, off, v.size_bytes - off)
                .expect("allocation");
            assert!(a.length > 0, "{a:?}");
            for e in &a.extents {
                match runs.last_mut() {
                    Some(r) if (r.1, r.2) == (e.hole, e.zero) => r.0 += e.length,
                    _ => runs.push((e.length, e.hole, e.zero)),
                }
                if !e.zero {
                    let mut at = e.offset;
                    while at < e.offset + e.length {
                        let n = (e.offset + e.length - at).min(MIB);
                        let bytes = c.read(&v.name, at, n as usize).expect("API read");
                        data.push((at, n, checksum(&bytes)));
                        at += n;
                    }
                }
            }
            off += a.length;
        }
        out.push(VolumePrint {
            name: v.name,
            size: v.size_bytes,
            runs,
            data,
        });
    }
    out
}

/// Stops `d` cleanly (which uploads everything and releases the pool), then
/// serves the pool from a new, empty cache directory `cold` and checks that
/// every volume reads back the same. Returns that second daemon, running.
fn reread_from_a_cold_cache(rgw: &Rgw, url: &str, d: Daemon, cold: &Path) -> Daemon {
    let before = fingerprint(&d);
    let log_file = d.log.clone();
    let status = d.terminate();
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    assert!(status.success(), "{status}; log:\n{log}");
    assert!(
        log.contains("everything is in the object store"),
        "the clean stop did not upload everything; log:\n{log}"
    );
    let held = rgw.attach(url, cold, &[]);
    assert_eq!(held, None, "a clean stop releases the pool");
    let d = Daemon::start(cold, &[]);
    let after = fingerprint(&d);
    let data_bytes: u64 = before.iter().flat_map(|v| v.data.iter().map(|p| p.1)).sum();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b.name, a.name);
        assert_eq!((b.size, &b.runs), (a.size, &a.runs), "volume {}", b.name);
        if let Some((x, y)) = b.data.iter().zip(&a.data).find(|(x, y)| x != y) {
            panic!(
                "volume {}: {x:?} (offset, length, checksum) reads as {y:?} from a cold cache",
                b.name
            );
        }
    }
    assert_eq!(before, after);
    let s = d.client().cache_stats().unwrap();
    if data_bytes > 0 {
        assert!(s.bytes_fetched > 0, "nothing came from the bucket: {s:?}");
    }
    eprintln!(
        "read back {} volumes ({} KiB of data) from a cold cache: {} KiB fetched",
        after.len(),
        data_bytes >> 10,
        s.bytes_fetched >> 10
    );
    d
}

#[test]
fn nbd_client_suite_on_an_rgw_pool() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let started = Instant::now();
    for case in nbd_suite::ALL {
        let t0 = Instant::now();
        eprintln!("--- {} on an S3 pool", case.name);
        let scratch = t.path().join(case.name);
        std::fs::create_dir(&scratch).unwrap();
        let cache = scratch.join(case.pool_dir);
        let url = rgw.url("suite");
        rgw.create(&url, &cache, &[]);
        let d = Daemon::start(&cache, case.serve_args);
        let d = (case.run)(d, &scratch);
        let d = reread_from_a_cold_cache(&rgw, &url, d, &scratch.join("cold"));
        let log = d.log_text();
        assert!(d.terminate().success(), "{}: log:\n{log}", case.name);
        eprintln!("--- {} took {:?}", case.name, t0.elapsed());
    }
    eprintln!("the suite took {:?}", started.elapsed());
}

#[test]
fn sigkill_under_nbd_writes_with_the_cache_intact() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let seed: u64 = std::env::var("VPOOL_NBD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5333_6b69);
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let url = rgw.url("sigkill");
    rgw.create(&url, &cache, &[]);
    let d = Daemon::start(&cache, &[]);
    // Kills from before the first seal (0.5 s) to well after it, so that
    // some land during uploads and commits.
    let d = nbd_crash_rounds::sigkill_rounds(d, t.path(), 3, 200..2500, seed);
    // The crashes left nothing behind that the bucket does not get.
    let d = reread_from_a_cold_cache(&rgw, &url, d, &t.path().join("cold"));
    assert!(d.terminate().success());
}

/// Writes single 4 KiB blocks, one at a time: write `i` (0-based) goes to
/// block `hash(i) % NBLOCKS` and fills it with 16-byte units of
/// (i + 1, block). Flushes after every `FLUSH_EVERY` writes. Writes `START`
/// up to `END`, or until the file `STOP` exists. Logs `A i` when write `i`
/// is acknowledged, `F i` when a flush after it completed, `DONE` at the
/// end, `E ...` on an error.
const LOG_WRITER: &str = r#"
import os, struct, nbd
log = open(os.environ["LOG"], "a", buffering=1)
nblocks = int(os.environ["NBLOCKS"])
end = int(os.environ["END"])
every = int(os.environ["FLUSH_EVERY"])
stop = os.environ.get("STOP", "")
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
log.write("connected\n")
i = int(os.environ["START"])
try:
    while i < end and not (stop and os.path.exists(stop)):
        blk = (((i * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> 40) % nblocks
        h.pwrite(struct.pack("<QQ", i + 1, blk) * 256, blk * 4096)
        log.write("A %d\n" % i)
        i += 1
        if i % every == 0:
            h.flush()
            log.write("F %d\n" % (i - 1))
    h.flush()
    log.write("F %d\nDONE\n" % (i - 1))
except nbd.Error as e:
    log.write("E %s\n" % str(e).replace("\n", " "))
"#;

/// The block write `i` (0-based) of [`LOG_WRITER`] goes to.
fn block_of(i: u64, nblocks: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % nblocks
}

/// The writer's log: the last acknowledged write, the last write a
/// completed flush covers, whether it ended normally, its error line.
#[derive(Debug, Default)]
struct WriterLog {
    acked: Option<u64>,
    flushed: Option<u64>,
    done: bool,
    error: Option<String>,
}

fn read_writer_log(path: &Path) -> WriterLog {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut w = WriterLog::default();
    for l in text.lines() {
        if let Some(i) = l.strip_prefix("A ") {
            w.acked = Some(i.parse().unwrap());
        } else if let Some(i) = l.strip_prefix("F ") {
            w.flushed = Some(i.parse().unwrap());
        } else if l == "DONE" {
            w.done = true;
        } else if let Some(e) = l.strip_prefix("E ") {
            w.error = Some(e.to_string());
        }
    }
    w
}

/// Runs [`LOG_WRITER`] on a thread; returns its handle (the script's
/// output, or a panic if it raised).
fn spawn_writer(
    uri: String,
    log: &Path,
    nblocks: u64,
    range: (u64, u64),
    stop: Option<&Path>,
) -> std::thread::JoinHandle<String> {
    let log = log.to_path_buf();
    let stop = stop.map(|p| path_str(p).to_string()).unwrap_or_default();
    std::thread::spawn(move || {
        nbdsh_script(
            LOG_WRITER,
            &[
                ("URI", &uri),
                ("LOG", path_str(&log)),
                ("NBLOCKS", &nblocks.to_string()),
                ("START", &range.0.to_string()),
                ("END", &range.1.to_string()),
                ("FLUSH_EVERY", "16"),
                ("STOP", &stop),
            ],
        )
    })
}

/// Checks that `image` (the volume, read whole) is the state after the
/// first K writes of [`LOG_WRITER`], for K the largest write found in it,
/// and that the blocks past `nblocks` are zeros. Returns K.
fn check_prefix(image: &[u8], nblocks: u64) -> u64 {
    let blk = 4096usize;
    let mut seen = Vec::with_capacity(nblocks as usize);
    for b in 0..nblocks {
        let data = &image[b as usize * blk..(b as usize + 1) * blk];
        if data.iter().all(|&x| x == 0) {
            seen.push(0);
            continue;
        }
        let index = u64::from_le_bytes(data[..8].try_into().unwrap());
        let mut unit = [0u8; 16];
        unit[..8].copy_from_slice(&index.to_le_bytes());
        unit[8..].copy_from_slice(&b.to_le_bytes());
        assert!(
            data.chunks_exact(16).all(|u| u == unit),
            "block {b} is torn or misplaced (first unit says write {index})"
        );
        seen.push(index);
    }
    assert!(
        image[nblocks as usize * blk..].iter().all(|&x| x == 0),
        "data past the blocks written"
    );
    let k = seen.iter().copied().max().unwrap_or(0);
    let mut expect = vec![0u64; nblocks as usize];
    for i in 0..k {
        expect[block_of(i, nblocks) as usize] = i + 1;
    }
    for b in 0..nblocks as usize {
        assert_eq!(
            seen[b], expect[b],
            "block {b} holds write {} where the state after write {k} has write {}: not a prefix",
            seen[b], expect[b]
        );
    }
    k
}

fn read_volume(d: &Daemon, volume: &str, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    nbdcopy(&d.nbd_uri(volume), path_str(out), &[]);
    std::fs::read(out).unwrap()
}

#[test]
fn cache_lost_after_sigkill_reopens_as_a_prefix_from_the_bucket() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("cache");
    let url = rgw.url("cacheloss");
    // The lease expires 5 s after its holder stops renewing it.
    rgw.create(&url, &cache, &["--lease-expire", "5"]);
    let d = Daemon::start(&cache, &[]);
    let size = 64 * MIB;
    let nblocks = 4096; // the first 16 MiB: writes often hit a block again
    d.client().create_volume("v", size).unwrap();
    let log = t.path().join("writer.log");

    // Phase 1: writes and flushes, then wait until the bucket has them all.
    let phase1 = 3000;
    let out = spawn_writer(d.nbd_uri("v"), &log, nblocks, (0, phase1), None)
        .join()
        .expect("the writer failed");
    let w = read_writer_log(&log);
    assert!(w.done && w.acked == Some(phase1 - 1), "{w:?}\n{out}");
    let t0 = Instant::now();
    wait_uploaded(&cache, Duration::from_secs(60));
    eprintln!(
        "{phase1} writes uploaded ({:?} after the last flush)",
        t0.elapsed()
    );

    // Phase 2: more writes, not waited for, then SIGKILL mid-stream, once
    // a few seals (0.5 s each) have passed.
    let writer = spawn_writer(d.nbd_uri("v"), &log, nblocks, (phase1, u64::MAX), None);
    let t0 = Instant::now();
    wait_for("phase 2 writes", Duration::from_secs(30), || {
        let w = read_writer_log(&log);
        w.flushed.is_some_and(|f| f >= phase1 + 500) && t0.elapsed() > Duration::from_millis(1500)
    });
    let s = d.client().cache_stats().unwrap();
    d.crash();
    writer.join().expect("the writer failed");
    let w = read_writer_log(&log);
    let acked = w.acked.unwrap();
    assert!(w.error.is_some(), "{w:?}");
    eprintln!(
        "killed after {} writes ({} flushed); dirty then: {} bytes, {} sealed not uploaded",
        acked + 1,
        w.flushed.unwrap() + 1,
        s.dirty_bytes,
        s.upload_lag_bytes
    );

    // The cache is lost. A new one on the same directory: the dead daemon
    // still holds the pool, and nobody renews its lease; `serve` watches it
    // and takes the pool over once it expired (no `--force`).
    let killed = Instant::now();
    std::fs::remove_dir_all(&cache).unwrap();
    let held = rgw.attach(&url, &cache, &[]);
    assert!(held.is_some(), "the dead daemon's lease is gone");
    let d = Daemon::start(&cache, &[]);
    assert!(
        killed.elapsed() >= Duration::from_secs(5),
        "served {:?} after the kill, before the lease expired",
        killed.elapsed()
    );
    assert!(d.log_text().contains("lease expired"), "{}", d.log_text());
    let image = read_volume(&d, "v", &t.path().join("v.img"));
    assert_eq!(image.len() as u64, size);
    let k = check_prefix(&image, nblocks);
    eprintln!(
        "the bucket holds the state after write {k}: {phase1} were known uploaded, {} acknowledged",
        acked + 1
    );
    assert!(
        k >= phase1,
        "writes known to be in the bucket are lost: prefix {k} < {phase1}"
    );
    // Write `acked + 1` may have reached the daemon without its reply.
    assert!(
        k <= acked + 2,
        "a write from the future: {k} > {}",
        acked + 2
    );

    // The pool goes on from there.
    d.client().write("v", 0, &[7u8; 4096], false).unwrap();
    d.client().flush().unwrap();
    assert!(d.terminate().success());
}

/// Reads 64 KiB at `OFF` of the export, expecting an error; prints the
/// errno's name and how long it took.
const COLD_READ: &str = r#"
import os, time, nbd
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
t = time.monotonic()
try:
    h.pread(65536, int(os.environ["OFF"]))
    print("read OK")
except nbd.Error as e:
    print("errno %s after %.2f s: %s" % (e.errno, time.monotonic() - t, e))
h.shutdown()
"#;

#[test]
fn rgw_outage_under_an_nbd_writer() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let url = rgw.url("outage");
    let read_timeout = ["--read-timeout", "3"];

    // A volume written, uploaded, and left cold for the next daemon.
    let a = t.path().join("cache-a");
    rgw.create(&url, &a, &read_timeout);
    let d = Daemon::start(&a, &[]);
    let size = 64 * MIB;
    let src = t.path().join("src.img");
    std::fs::write(&src, pattern(size as usize, 77)).unwrap();
    d.client().create_volume("cold", size).unwrap();
    d.client().create_volume("hot", size).unwrap();
    nbdcopy(path_str(&src), &d.nbd_uri("cold"), &["--flush"]);
    assert!(d.terminate().success());

    let b = t.path().join("cache-b");
    rgw.attach(&url, &b, &read_timeout);
    let d = Daemon::start(&b, &[]);
    let c = d.client();
    let log = t.path().join("writer.log");
    let stop = t.path().join("stop");
    let nblocks = 4096;
    let writer = spawn_writer(d.nbd_uri("hot"), &log, nblocks, (0, u64::MAX), Some(&stop));
    wait_for("the writer", Duration::from_secs(30), || {
        read_writer_log(&log).flushed.is_some_and(|f| f > 200)
    });

    let outage = Instant::now();
    let (at_stop, uploaded_before) = {
        let _down = RgwDown::stop();
        let at_stop = read_writer_log(&log);
        // A read of data not in the cache fails, with EIO, in bounded time
        // (--read-timeout 3).
        let t0 = Instant::now();
        let out = nbdsh_script(COLD_READ, &[("URI", &d.nbd_uri("cold")), ("OFF", "0")]);
        let took = t0.elapsed();
        eprintln!("cold read with radosgw down: {}", out.trim());
        assert!(out.starts_with("errno EIO"), "{out}");
        assert!(took < Duration::from_secs(15), "took {took:?}: {out}");
        // Writes and flushes went on meanwhile, into the cache; the uploads
        // are stuck.
        std::thread::sleep(Duration::from_secs(1));
        let w = read_writer_log(&log);
        assert!(w.error.is_none() && !w.done, "{w:?}");
        assert!(
            w.acked > at_stop.acked.map(|a| a + 100) && w.flushed > at_stop.flushed,
            "the writes stalled: {w:?}, before the outage {at_stop:?}"
        );
        let s = c.cache_stats().unwrap();
        assert!(
            s.upload_lag_bytes > 0 && s.dirty_bytes > 0 && s.remote_errors > 0,
            "{s:?}"
        );
        eprintln!(
            "radosgw down for {:?}: {} writes acknowledged meanwhile, {} bytes sealed and waiting",
            outage.elapsed(),
            w.acked.unwrap() - at_stop.acked.unwrap(),
            s.upload_lag_bytes
        );
        (at_stop, s.segments_uploaded)
    }; // radosgw starts again here

    // The uploads resume by themselves, the writer still going; once it
    // stops, they catch up.
    let t0 = Instant::now();
    wait_for("the uploads to resume", Duration::from_secs(60), || {
        c.cache_stats().unwrap().segments_uploaded > uploaded_before
    });
    let resumed = t0.elapsed();
    std::fs::write(&stop, b"").unwrap();
    let out = writer.join().expect("the writer failed");
    let w = read_writer_log(&log);
    assert!(w.done && w.error.is_none(), "{w:?}\n{out}");
    wait_uploaded(&b, Duration::from_secs(60));
    let last = w.acked.unwrap();
    eprintln!(
        "uploads resumed {resumed:?} after radosgw came back, caught up after {:?}; {} writes in all ({} before the outage)",
        t0.elapsed(),
        last + 1,
        at_stop.acked.unwrap() + 1
    );

    // Every write is there, and the cold volume reads now.
    let image = read_volume(&d, "hot", &t.path().join("hot.img"));
    assert_eq!(check_prefix(&image, nblocks), last + 1);
    assert!(qemu_img_compare(&d.nbd_uri("cold"), &src));
    let s = c.cache_stats().unwrap();
    eprintln!("after the outage: {s:?}");
    assert!(s.read_errors > 0 && s.last_error.is_none(), "{s:?}");

    // And from the bucket alone, through a third cache directory.
    let d = reread_from_a_cold_cache(&rgw, &url, d, &t.path().join("cache-c"));
    let image = read_volume(&d, "hot", &t.path().join("hot.img"));
    assert_eq!(check_prefix(&image, nblocks), last + 1);
    assert!(qemu_img_compare(&d.nbd_uri("cold"), &src));
    assert!(d.terminate().success());
}

/// The pools `vpool pool list --json` shows, as (name, kind, state).
fn pool_states(home: &Path) -> Vec<(String, String, String)> {
    let l = run_json(home, &["pool", "list"]);
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    l["pools"]
        .as_array()
        .expect("a list of pools")
        .iter()
        .map(|p| (s(&p["name"]), s(&p["kind"]), s(&p["state"])))
        .collect()
}

fn pools_are(home: &Path, want: &[(&str, &str, &str)]) {
    let got = pool_states(home);
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want);
}

/// A thread running fio verify rounds on `uri` until `stop` (at least
/// one); it returns how many it ran.
fn fio_until(
    uri: String,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    let stop = std::sync::Arc::clone(stop);
    std::thread::spawn(move || {
        let mut rounds = 0;
        while rounds == 0 || !stop.load(std::sync::atomic::Ordering::SeqCst) {
            fio_verify(&uri, "8M", "4k", 8);
            rounds += 1;
        }
        rounds
    })
}

/// Waits until pool `pool` of the daemon at `home` is in `state`.
fn wait_for_state(home: &Path, pool: &str, state: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let states = pool_states(home);
        if states.iter().any(|(n, _, s)| n == pool && s == state) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pool {pool} was not {state} within {timeout:?}: {}",
            run_json(home, &["pool", "list"])
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One daemon holds the default local pool, a second local pool and a pool
/// on RGW at once; real clients reach volumes of all three through the one
/// NBD socket. Pools are detached, re-added and added while fio verifies
/// on the others; the S3 pool is detached (its lease released) and
/// attached from a new cache directory. After a restart with radosgw down, the S3 pool is listed
/// as not open with its reason while the others serve, and it opens by
/// itself once radosgw is back.
#[test]
fn one_daemon_serves_two_local_pools_and_an_rgw_pool() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let fast = t.path().join("fast");
    let cold_cache = t.path().join("cold-cache");
    let url = rgw.url("multi");
    let d = Daemon::start(&home, &[]);
    run_ok(&home, &["pool", "create", "fast", "--dir", path_str(&fast)]);
    run_ok(
        &home,
        &[
            "pool",
            "create",
            "cold",
            "--s3",
            &url,
            "--endpoint",
            &rgw.endpoint,
            "--cache",
            path_str(&cold_cache),
            "--cache-size",
            "1G",
            "--seal-after",
            "0.5",
        ],
    );
    pools_are(
        &home,
        &[
            ("local", "local", "open"),
            ("cold", "s3", "open"),
            ("fast", "local", "open"),
        ],
    );

    // A volume in each pool, written by qemu-img and read back by nbdcopy
    // through the one socket, which lists them all.
    let vols = ["web", "fast/db", "cold/arch"];
    let mut images = Vec::new();
    for (i, v) in vols.iter().enumerate() {
        run_ok(&home, &["vol", "create", v, "--size", "24M"]);
        let img = t.path().join(format!("image{i}"));
        std::fs::write(&img, pattern((24 * MIB) as usize, i as u64 + 1)).unwrap();
        qemu_img_convert_to(&img, &d.nbd_uri(v));
        let back = t.path().join(format!("back{i}"));
        nbdcopy(&d.nbd_uri(v), path_str(&back), &[]);
        assert!(
            std::fs::read(&back).unwrap() == std::fs::read(&img).unwrap(),
            "{v}: nbdcopy read back something else"
        );
        images.push(img);
    }
    // `vol copy` between the local pool and the S3 pool, both ways.
    for (from, to, img) in [
        ("fast/db", "cold/db2", &images[1]),
        ("cold/arch", "fast/arch2", &images[2]),
    ] {
        let job = run_json(&home, &["vol", "copy", from, to]);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(qemu_img_compare(&d.nbd_uri(to), img), "{from} -> {to}");
        run_ok(&home, &["vol", "delete", to]);
    }
    // `vol move` into the S3 pool and back, a client connected throughout.
    let held = nbd_common::raw::open_export(&d.nbd_socket(), "fast/db");
    for (from, to, now) in [
        ("fast/db", "cold", "cold/db"),
        ("cold/db", "fast", "fast/db"),
    ] {
        let job = run_json(&home, &["vol", "move", from, to]);
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(
            qemu_img_compare(&d.nbd_uri(now), &images[1]),
            "{from} -> {to}"
        );
    }
    drop(held);
    let list = nbdinfo(&["--list", "--json", &d.nbd_uri("")]);
    for v in vols {
        assert!(list.contains(&format!("\"{v}\"")), "{v} not listed: {list}");
    }
    assert!(
        run_ok(&home, &["vol", "list", "--all"]).contains("cold/arch"),
        "vol list --all"
    );

    // Detach is refused while an NBD client has a volume of the pool open.
    let held = nbd_common::raw::open_export(&d.nbd_socket(), "fast/db");
    let e = run_err(&home, &["pool", "detach", "fast"]);
    assert!(e.contains("NBD client") && e.contains("--force"), "{e}");
    drop(held);

    // fio verifies on the default pool and on the S3 pool, round after
    // round, while the second local pool is detached, re-added, and a new
    // pool is added and detached.
    for v in ["fio", "cold/fio"] {
        run_ok(&home, &["vol", "create", v, "--size", "32M"]);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = ["fio", "cold/fio"]
        .into_iter()
        .map(|v| fio_until(d.nbd_uri(v), &stop))
        .collect();
    wait_for(
        "the NBD client of fast/db to go",
        Duration::from_secs(10),
        || run(&home, &["pool", "detach", "fast"]).status.success(),
    );
    let e = run_err(&home, &["vol", "info", "fast/db"]);
    assert!(e.contains("no pool named \"fast\""), "{e}");
    assert!(!nbdinfo(&["--list", &d.nbd_uri("")]).contains("fast/db"));
    run_ok(&home, &["pool", "create", "fast", "--dir", path_str(&fast)]);
    assert!(qemu_img_compare(&d.nbd_uri("fast/db"), &images[1]));
    run_ok(&home, &["pool", "create", "extra"]);
    run_ok(&home, &["vol", "create", "extra/x", "--size", "4M"]);
    assert!(home.join("pools/extra/segments").is_dir());
    run_ok(&home, &["pool", "detach", "extra"]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        assert!(w.join().expect("fio worker") >= 1);
    }
    wait_uploaded_in(&home, "cold", Duration::from_secs(60));

    // The S3 pool is detached (its lease released) and attached again from
    // a new cache directory, as another host would, while fio verifies on
    // the second local pool.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    run_ok(&home, &["vol", "create", "fast/fio", "--size", "32M"]);
    let worker = fio_until(d.nbd_uri("fast/fio"), &stop);
    run_ok(&home, &["pool", "detach", "cold"]);
    let e = run_err(&home, &["vol", "info", "cold/arch"]);
    assert!(e.contains("no pool named \"cold\""), "{e}");
    let cold_cache2 = t.path().join("cold-cache2");
    run_ok(
        &home,
        &[
            "pool",
            "attach",
            "cold",
            "--s3",
            &url,
            "--endpoint",
            &rgw.endpoint,
            "--cache",
            path_str(&cold_cache2),
            "--cache-size",
            "1G",
            "--seal-after",
            "0.5",
        ],
    );
    assert!(qemu_img_compare(&d.nbd_uri("cold/arch"), &images[2]));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(worker.join().expect("fio worker") >= 1);
    assert!(d.terminate().success());

    // Restart with radosgw down: the daemon starts, the S3 pool is listed
    // as failed with the reason, its volumes answer with a clear error,
    // and the local pools serve.
    let down = RgwDown::stop();
    let started = Instant::now();
    let d = Daemon::start(&home, &[]);
    eprintln!(
        "the daemon started in {:?} with radosgw down",
        started.elapsed()
    );
    // Opening the S3 pool runs in the background: the daemon does not wait
    // for the bucket's timeouts.
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "the daemon waited {:?} for the unreachable bucket",
        started.elapsed()
    );
    let states = pool_states(&home);
    assert_eq!(states[0], ("local".into(), "local".into(), "open".into()));
    assert_eq!(states[2], ("fast".into(), "local".into(), "open".into()));
    assert_eq!((states[1].0.as_str(), states[1].1.as_str()), ("cold", "-"));
    assert!(
        ["opening", "failed"].contains(&states[1].2.as_str()),
        "{states:?}"
    );
    let l = run_json(&home, &["pool", "list"]);
    assert!(l["pools"][1]["reason"].as_str().is_some(), "{l}");
    let e = run_err(&home, &["vol", "list", "--pool", "cold"]);
    assert!(e.contains("pool cold is not open"), "{e}");
    assert!(qemu_img_compare(&d.nbd_uri("web"), &images[0]));
    assert!(qemu_img_compare(&d.nbd_uri("fast/db"), &images[1]));
    let out = run(&home, &["vol", "info", "cold/arch"]);
    assert!(!out.status.success());
    // Once it has failed, it is retried by itself: bring radosgw back and
    // the pool opens without an operator.
    wait_for_state(&home, "cold", "failed", Duration::from_secs(120));
    drop(down);
    wait_for_state(&home, "cold", "open", Duration::from_secs(150));
    // `pool open` on an open pool leaves it as it is.
    run_ok(&home, &["pool", "open", "cold"]);
    assert!(qemu_img_compare(&d.nbd_uri("cold/arch"), &images[2]));
    assert!(d.terminate().success());
}

/// The status of the replication of `volume` once it has at least `runs`
/// runs and no job running.
fn wait_replica_runs(home: &Path, volume: &str, runs: u64, timeout: Duration) -> serde_json::Value {
    let mut st = serde_json::Value::Null;
    wait_for("replication runs", timeout, || {
        st = run_json(home, &["replica", "status", volume]);
        st["runs"].as_u64().unwrap() >= runs && st["running"] == false
    });
    st
}

/// `vpool replica` into a pool on RGW every 2 s while fio writes and
/// verifies the volume, radosgw stopped for a while in the middle (runs go
/// on into the host cache); the last point equals its source snapshot;
/// then a second daemon attaches the pool from an empty cache, as after
/// the loss of the first host, and promotes the replica there.
#[test]
fn replication_into_rgw_rides_out_a_radosgw_outage_and_promotes_on_another_host() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let url = rgw.url("replica");
    let d = Daemon::start(&home, &[]);
    let dr = |cache: &Path| {
        [
            "--s3".to_string(),
            url.clone(),
            "--endpoint".to_string(),
            rgw.endpoint.clone(),
            "--cache".to_string(),
            path_str(cache).to_string(),
            "--cache-size".to_string(),
            "1G".to_string(),
            "--seal-after".to_string(),
            "0.5".to_string(),
        ]
    };
    let args = dr(&t.path().join("dr-cache"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&home, &[&["pool", "create", "dr"][..], &args].concat());
    run_ok(&home, &["vol", "create", "web1", "--size", "64M"]);
    let img = t.path().join("web1.raw");
    let mut data = pattern(32 * MIB as usize, 5);
    data.resize(64 * MIB as usize, 0);
    std::fs::write(&img, &data).unwrap();
    qemu_img_convert_to(&img, &d.nbd_uri("web1"));

    // fio writes and verifies the first 8 MiB again and again until the
    // scheduled runs are done.
    let uri = d.nbd_uri("web1");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_fio = std::sync::Arc::clone(&stop);
    let fio = std::thread::spawn(move || {
        let mut rounds = 0u32;
        while !stop_fio.load(std::sync::atomic::Ordering::SeqCst) {
            let out = fio_verify(&uri, "8M", "4k", 4);
            assert!(out.contains("err= 0"), "{out}");
            rounds += 1;
        }
        rounds
    });
    run_ok(
        &home,
        &[
            "replica", "add", "web1", "--to", "dr", "--every", "2s", "--keep", "4",
        ],
    );
    let before = wait_replica_runs(&home, "web1", 2, Duration::from_secs(60));
    {
        let _down = RgwDown::stop();
        let at_stop = before["runs"].as_u64().unwrap();
        let st = wait_replica_runs(&home, "web1", at_stop + 2, Duration::from_secs(60));
        eprintln!("replication with radosgw down: {st}");
    }
    let runs = run_json(&home, &["replica", "status", "web1"])["runs"]
        .as_u64()
        .unwrap();
    let st = wait_replica_runs(&home, "web1", runs + 2, Duration::from_secs(90));
    assert_eq!(st["points"], 4, "{st}");
    assert!(!fio.is_finished(), "fio failed");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = fio.join().expect("fio");
    eprintln!("fio wrote and verified 8 MiB {rounds} times during the runs");
    assert!(rounds >= 2, "{rounds}");

    // Stop the schedule, then one last run by hand: its point equals the
    // source's snapshot.
    run_ok(&home, &["replica", "remove", "web1"]);
    let e = run_err(&home, &["replica", "status", "web1"]);
    assert!(e.contains("not replicated"), "{e}");
    run_ok(
        &home,
        &["replica", "add", "web1", "--to", "dr/web1b", "--keep", "2"],
    );
    let st = wait_replica_runs(&home, "web1", 1, Duration::from_secs(60));
    let p = st["last_point"].as_str().unwrap().to_string();
    let want = t.path().join("point.raw");
    nbd_common::clients::qemu_img_convert_from(&d.nbd_uri(&format!("web1@{p}")), &want);
    assert!(qemu_img_compare(
        &d.nbd_uri(&format!("dr/web1b@{p}")),
        &want
    ));
    let job = run_json(&home, &["replica", "verify", "web1"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    wait_uploaded_in(&home, "dr", Duration::from_secs(120));
    assert!(d.terminate().success());

    // Another host: the pool attached from an empty cache; the replica is
    // promoted there and served writable, at its newest point.
    let home2 = t.path().join("home2");
    let d2 = Daemon::start(&home2, &[]);
    let args = dr(&t.path().join("dr-cache2"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ok(&home2, &[&["pool", "attach", "dr"][..], &args].concat());
    let v = run_json(&home2, &["replica", "promote", "dr/web1b"]);
    assert!(v["replica_of"].is_null(), "{v}");
    assert!(qemu_img_compare(&d2.nbd_uri("dr/web1b"), &want));
    let (err, flush_err) = nbd_write_and_flush(&d2.nbd_socket(), "dr/web1b", 0, 4096, 0x42);
    assert_eq!((err, flush_err), (0, 0));
    assert!(d2.terminate().success());
}

/// [`wait_uploaded`] for pool `pool` of the daemon at `home`.
fn wait_uploaded_in(home: &Path, pool: &str, timeout: Duration) {
    wait_uploaded_of(home, &["cache", "stats", "--pool", pool], timeout)
}

/// `pool create|attach NAME --s3 URL` through the daemon at `home`, with
/// its cache at `cache` and a lease that expires after `lease_s`.
fn pool_through(
    rgw: &Rgw,
    home: &Path,
    verb: &str,
    name: &str,
    url: &str,
    cache: &Path,
    lease_s: &str,
) -> std::process::Output {
    run(
        home,
        &[
            "pool",
            verb,
            name,
            "--s3",
            url,
            "--endpoint",
            &rgw.endpoint,
            "--cache",
            path_str(cache),
            "--cache-size",
            "1G",
            "--seal-after",
            "0.5",
            "--lease-expire",
            lease_s,
        ],
    )
}

/// One NBD write and flush; see [`nbd_common::raw::write_and_flush`].
fn nbd_write_and_flush(socket: &Path, export: &str, offset: u64, len: u32, byte: u8) -> (u32, u32) {
    nbd_common::raw::write_and_flush(socket, export, offset, len, byte)
}

/// A pool on RGW whose holder dies (SIGKILL) is taken over by another
/// host's daemon without `--force` once the holder's lease expired, and
/// serves everything the bucket had; while the holder lived, the other
/// host was refused.
#[test]
fn a_dead_holder_s_pool_is_taken_over_once_its_lease_expired() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    let url = rgw.url("expiry");
    // `pool VERB shared` with its cache in CACHE and a 3 s lease.
    let shared = |home: &Path, verb: &str, cache: &str| {
        pool_through(&rgw, home, verb, "shared", &url, &t.path().join(cache), "3")
    };
    let a = Daemon::start(&home_a, &[]);
    let b = Daemon::start(&home_b, &[]);
    let out = shared(&home_a, "create", "ca");
    assert!(out.status.success(), "{out:?}");
    run_ok(&home_a, &["vol", "create", "shared/v", "--size", "16M"]);
    let img = t.path().join("image");
    std::fs::write(&img, pattern((16 * MIB) as usize, 7)).unwrap();
    qemu_img_convert_to(&img, &a.nbd_uri("shared/v"));
    wait_uploaded_in(&home_a, "shared", Duration::from_secs(60));

    // While A lives, B is refused: A renews its lease.
    let out = shared(&home_b, "attach", "cb1");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("held by") && e.contains("renewed"),
        "{e}"
    );
    // The refused attach left nothing behind: the same command works later.
    assert!(!t.path().join("cb1").exists());
    assert!(
        run_ok(&home_b, &["pool", "list"])
            .lines()
            .all(|l| !l.starts_with("shared"))
    );

    a.crash();
    let killed = Instant::now();
    let out = shared(&home_b, "attach", "cb1");
    assert!(out.status.success(), "{out:?}");
    assert!(qemu_img_compare(&b.nbd_uri("shared/v"), &img));
    eprintln!(
        "FIGURE takeover: the pool served on host B {:.1} s after SIGKILL of its holder (lease expiry 3 s)",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(3),
        "taken before expiry"
    );
    assert!(b.terminate().success());
}

/// A holder paused (SIGSTOP) past its lease is taken over; when it wakes
/// (SIGCONT) its writes and flushes fail, it finds itself fenced, and
/// nothing it writes reaches what the bucket's manifests list.
#[test]
fn a_paused_holder_wakes_fenced() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let (home_a, home_b, home_c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
    let url = rgw.url("paused");
    // `pool VERB shared` with its cache in CACHE and a 3 s lease.
    let shared = |home: &Path, verb: &str, cache: &str| {
        pool_through(&rgw, home, verb, "shared", &url, &t.path().join(cache), "3")
    };
    let a = Daemon::start(&home_a, &[]);
    let out = shared(&home_a, "create", "ca");
    assert!(out.status.success(), "{out:?}");
    run_ok(&home_a, &["vol", "create", "shared/v", "--size", "8M"]);
    assert_eq!(
        nbd_write_and_flush(&a.nbd_socket(), "shared/v", 0, 65536, 0xaa),
        (0, 0)
    );
    wait_uploaded_in(&home_a, "shared", Duration::from_secs(60));

    a.signal(libc::SIGSTOP);
    let b = Daemon::start(&home_b, &[]);
    let out = shared(&home_b, "attach", "cb");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        nbd_write_and_flush(&b.nbd_socket(), "shared/v", 0, 65536, 0xbb),
        (0, 0)
    );
    wait_uploaded_in(&home_b, "shared", Duration::from_secs(60));

    a.signal(libc::SIGCONT);
    // At once: the lease lapsed while A slept, so I/O is refused before A
    // has even asked the bucket.
    let (w, f) = nbd_write_and_flush(&a.nbd_socket(), "shared/v", 65536, 65536, 0xcc);
    assert!(
        w != 0 && f != 0,
        "A wrote ({w}) or flushed ({f}) after it woke"
    );
    // Then its renewal finds B's manifest: fenced for good.
    wait_for("A to find itself fenced", Duration::from_secs(30), || {
        run_json(&home_a, &["cache", "stats", "--pool", "shared"])["fenced"].is_string()
    });
    let (w, f) = nbd_write_and_flush(&a.nbd_socket(), "shared/v", 65536, 65536, 0xdd);
    assert!(
        w != 0 && f != 0,
        "A wrote ({w}) or flushed ({f}) once fenced"
    );
    let log = a.log_text();
    assert!(
        log.contains("not renewed") && log.contains("taken over"),
        "A's log does not say why it stopped:\n{log}"
    );
    // A fenced daemon stops with an error: what it held never reached the
    // bucket.
    a.terminate();

    // What the bucket holds is B's: a third host reads 0xbb, never A's.
    assert!(b.terminate().success());
    let c = Daemon::start(&home_c, &[]);
    let out = shared(&home_c, "attach", "cc");
    assert!(out.status.success(), "{out:?}");
    let back = t.path().join("back");
    nbdcopy(&c.nbd_uri("shared/v"), path_str(&back), &[]);
    let data = std::fs::read(&back).unwrap();
    assert!(
        data[..65536].iter().all(|&x| x == 0xbb),
        "B's write is not there"
    );
    assert!(
        data[65536..131072].iter().all(|&x| x == 0),
        "A's writes reached the bucket"
    );
    assert!(c.terminate().success());
}

/// `pool open NAME --force` takes a pool another host holds and renews:
/// without `--force` the open is refused naming the holder; with it, this
/// host serves the pool and the old holder is fenced (its writes and
/// flushes fail, `cache stats` says so).
#[test]
fn pool_open_force_takes_a_held_pool_over_and_fences_the_holder() {
    let Some(rgw) = rgw() else { return };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    let url = rgw.url("forced");
    // `pool VERB p` with its cache in CACHE and a 30 s lease (it never
    // expires during the test: only --force takes it).
    let p = |home: &Path, verb: &str, cache: &str| {
        let out = pool_through(&rgw, home, verb, "p", &url, &t.path().join(cache), "30");
        assert!(out.status.success(), "{out:?}");
    };
    let a = Daemon::start(&home_a, &[]);
    p(&home_a, "create", "ca");
    run_ok(&home_a, &["vol", "create", "p/v", "--size", "8M"]);
    assert_eq!(
        nbd_write_and_flush(&a.nbd_socket(), "p/v", 0, 65536, 0xaa),
        (0, 0)
    );
    wait_uploaded_in(&home_a, "p", Duration::from_secs(60));
    run_ok(&home_a, &["pool", "detach", "p"]);

    // B holds it once, so its host.json lists it; then A takes it back.
    let b = Daemon::start(&home_b, &[]);
    p(&home_b, "attach", "cb");
    assert!(b.terminate().success());
    p(&home_a, "attach", "ca2");

    // B restarts: its pool is held by A, which renews the lease.
    let b = Daemon::start(&home_b, &[]);
    wait_for_state(&home_b, "p", "failed", Duration::from_secs(60));
    let e = run_err(&home_b, &["pool", "open", "p"]);
    assert!(e.contains("held by"), "{e}");
    run_ok(&home_b, &["pool", "open", "p", "--force"]);
    assert_eq!(pool_states(&home_b)[1].2, "open");
    let back = t.path().join("back");
    nbdcopy(&b.nbd_uri("p/v"), path_str(&back), &[]);
    assert!(
        std::fs::read(&back).unwrap()[..65536]
            .iter()
            .all(|&x| x == 0xaa)
    );
    assert_eq!(
        nbd_write_and_flush(&b.nbd_socket(), "p/v", 0, 65536, 0xbb),
        (0, 0)
    );

    // A is fenced: at its next renewal or commit, for good.
    wait_for("A to find itself fenced", Duration::from_secs(60), || {
        run_json(&home_a, &["cache", "stats", "--pool", "p"])["fenced"].is_string()
    });
    let (w, f) = nbd_write_and_flush(&a.nbd_socket(), "p/v", 65536, 65536, 0xcc);
    assert!(
        w != 0 && f != 0,
        "A wrote ({w}) or flushed ({f}) once fenced"
    );
    a.terminate();
    assert!(b.terminate().success());
}
