//! Crash consistency through NBD, as a function of a running daemon
//! ([`sigkill_rounds`]), so that it runs on a local pool (`nbd_crash.rs`)
//! and on a pool on S3 with its cache intact (`s3_rgw.rs`): `vpool serve` as
//! a child process, a libnbd client (an nbdsh Python script) keeping up to
//! 16 writes, write-zeroes and flushes in flight on one volume, SIGKILL at a
//! random moment, restart on the same pool directory, and check, for every
//! 512-byte sector:
//!
//! - every write acknowledged before a completed flush was sent (or written
//!   with FUA) is there, or a later write to the same sector is;
//! - the sector holds something that was written to it (or zeros from a
//!   write-zeroes or its initial state): never garbage, never another
//!   sector's data, never half of one write and half of another.
//!
//! Writes are 512-byte aligned, many of them smaller than the engine's 4 KiB
//! block, and writes in flight at once may share a block (never a sector), so
//! the engine's read-modify-write of partial blocks is part of what is tested.
//!
//! While it runs, the client also reads back sectors no write is in flight
//! on and checks them against the last write it saw acknowledged there.
//!
//! The client logs to a file, before sending, each request it sends, and
//! after completion each acknowledgement and completed flush; the test reads
//! the log once the client has exited. Seeded: the tests take the seed from
//! `VPOOL_NBD_CRASH_SEED` when it is set, to replay a failure.
//!
//! SIGKILL leaves the kernel's page cache alone, so it cannot tell a write
//! that was fdatasync'ed from one that was merely written; what it does test
//! is recovery of the log the daemon left, at any point of any request.

#![allow(dead_code)] // Each test file uses a different subset.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::Daemon;
use crate::nbd_common::clients::nbdsh_script;
use rand::{Rng, SeedableRng, rngs::StdRng};

pub const SECTOR: usize = 512;
pub const SECTORS: u64 = 32768; // 16 MiB
pub const VOLUME: &str = "crash";

/// Tag 0 means "zeros"; writes have tags from 1 up.
type Tag = u64;

/// The client: random writes (mostly 4 KiB-aligned, some sector-sized and
/// misaligned to the block, many in a hot spot of 16 blocks, some FUA),
/// write-zeroes (with and without NO_HOLE), flushes and reads, at most 16 in
/// flight, never two in flight on the same sector. Reads are checked as
/// they complete against the last acknowledged write of each sector (a lost
/// update shows there at once, crash or not); a mismatch ends the client
/// with a `BUG` line. Log lines:
///
/// - `W tag start n` / `Z start n`: about to send (a zero's tag is 0; it
///   is identified by its line number);
/// - `A id` / `AF id`: acknowledged (`AF`: written with FUA), where `id` is
///   the line number of the `W`/`Z` line;
/// - `FS k` / `FD k`: flush `k` sent / completed.
const CLIENT_SCRIPT: &str = r#"
import os, random, struct, time, nbd

SECTORS = int(os.environ["SECTORS"])
HOT = 128
rng = random.Random(int(os.environ["SEED"]))
tag = int(os.environ["ROUND"]) << 32
log = open(os.environ["LOG"], "w")
lineno = 0
def L(s):
    global lineno
    log.write(s + "\n")
    log.flush()
    lineno += 1
    return lineno - 1

h = nbd.NBD()
h.connect_uri(os.environ["URI"])
L("ready")
busy = bytearray(SECTORS)
inflight = {}   # cookie -> (kind, id, start, n, buffer)
flushes = 0
deadline = time.monotonic() + float(os.environ["MAX_SECONDS"])

expect = {}     # sector -> tag of its last acknowledged write (0: zeroes)

def sector_bytes(t, s):
    return struct.pack("<QQ", t, s) * 32 if t else bytes(512)

def reap():
    for c in list(inflight):
        kind, i, start, n, buf = inflight[c]
        if h.aio_command_completed(c):   # raises if the command failed
            del inflight[c]
            if kind == "F":
                L("FD %d" % i)
                continue
            for s in range(start, start + n):
                busy[s] = 0
            if kind == "R":
                # No write was in flight on these sectors during the read:
                # each must hold its last acknowledged write.
                got = buf.to_bytearray()
                for s in range(start, start + n):
                    if s in expect:
                        o = (s - start) * 512
                        if got[o:o + 512] != sector_bytes(expect[s], s):
                            raise AssertionError("read of sector %d does not return its last acknowledged write %#x (got tag %#x)" % (s, expect[s], struct.unpack("<Q", got[o:o + 8])[0]))
                continue
            L(("AF %d" if kind == "WF" else "A %d") % i)
            for s in range(start, start + n):
                expect[s] = tag_of[i]
            del tag_of[i]

tag_of = {}

try:
    while time.monotonic() < deadline:
        while len(inflight) >= 16:
            h.poll(-1)
            reap()
        r = rng.random()
        if r >= 0.9:
            # A read, checked against what the client knows it wrote.
            if rng.random() < 0.5:
                n = rng.randrange(1, 32)
                start = rng.randrange(0, HOT - n + 1)
            else:
                n = rng.choice([8, 64])
                start = rng.randrange(0, SECTORS - n + 1, 8)
            if any(busy[start:start + n]):
                h.poll(0)
                reap()
                continue
            for s in range(start, start + n):
                busy[s] = 1
            buf = nbd.Buffer(n * 512)
            c = h.aio_pread(buf, start * 512)
            inflight[c] = ("R", 0, start, n, buf)
        elif r < 0.08:
            c = h.aio_flush()
            inflight[c] = ("F", flushes, 0, 0, None)
            L("FS %d" % flushes)
            # The log line goes after the send here, which is fine: what a
            # flush covers is decided by the acknowledgements logged before
            # it, and none can be logged in between.
            flushes += 1
        else:
            shape = rng.random()
            if shape < 0.5:
                n = rng.choice([8, 8, 16, 32, 64, 128])
                start = rng.randrange(0, SECTORS - n + 1, 8)
            elif shape < 0.7:
                n = rng.randrange(1, 24)
                start = rng.randrange(0, SECTORS - n + 1)
            else:
                # A hot spot of 16 blocks: sector-sized requests in flight
                # together often share a block.
                n = rng.randrange(1, 8)
                start = rng.randrange(0, HOT - n + 1)
            if any(busy[start:start + n]):
                h.poll(0)
                reap()
                continue
            for s in range(start, start + n):
                busy[s] = 1
            if r < 0.16:
                no_hole = rng.random() < 0.5
                i = L("Z %d %d" % (start, n))
                tag_of[i] = 0
                c = h.aio_zero(n * 512, start * 512, flags=nbd.CMD_FLAG_NO_HOLE if no_hole else 0)
                inflight[c] = ("Z", i, start, n, None)
            else:
                tag += 1
                data = b"".join(struct.pack("<QQ", tag, s) * 32 for s in range(start, start + n))
                buf = nbd.Buffer.from_bytearray(bytearray(data))
                fua = rng.random() < 0.1
                i = L("W %d %d %d" % (tag, start, n))
                tag_of[i] = tag
                c = h.aio_pwrite(buf, start * 512, flags=nbd.CMD_FLAG_FUA if fua else 0)
                inflight[c] = ("WF" if fua else "W", i, start, n, buf)
        h.poll(0)
        reap()
    L("timeout")
except nbd.Error as e:
    L("error %s" % str(e).replace("\n", " "))
except Exception as e:
    L("BUG %r" % e)
"#;

/// A sector written with `tag`: 16-byte units of (tag, sector number), so a
/// sector read back names the write it came from and where it belongs.
fn decode_sector(data: &[u8], sector: u64) -> Result<Tag, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let tag = u64::from_le_bytes(data[..8].try_into().unwrap());
    let mut unit = [0u8; 16];
    unit[..8].copy_from_slice(&tag.to_le_bytes());
    unit[8..].copy_from_slice(&sector.to_le_bytes());
    if let Some(at) = data.chunks_exact(16).position(|u| u != unit) {
        return Err(format!(
            "sector {sector} is neither zeros nor one whole write (first unit says tag {tag:#x}, sector {}; unit {at} differs)",
            u64::from_le_bytes(data[8..16].try_into().unwrap())
        ));
    }
    Ok(tag)
}

/// What each sector may hold after the crash.
struct Model {
    /// The sector's content at the start of the round.
    base: Vec<Tag>,
    /// Writes (tags; 0 for zeroes) sent to each sector this round, in order.
    writes: Vec<Vec<Tag>>,
    /// Per sector, how many of `writes` are known durable.
    durable: Vec<usize>,
}

impl Model {
    /// Replays the client's log into the model. Returns the model, (requests
    /// sent, acknowledged, flushes completed) and the client's last line.
    fn from_log(base: Vec<Tag>, log: &str) -> (Model, [usize; 3], String) {
        let n = base.len();
        let mut m = Model {
            base,
            writes: vec![Vec::new(); n],
            durable: vec![0; n],
        };
        // Request (its line number) -> (first sector, index of its write in
        // `writes[s]` for each of its sectors).
        let mut sent: HashMap<usize, (u64, Vec<usize>)> = HashMap::new();
        // Acknowledged requests in order, and how many of them each flush
        // covers (those logged before it was sent).
        let mut acked: Vec<usize> = Vec::new();
        let mut flush_mark: HashMap<u64, usize> = HashMap::new();
        let mut covered = 0usize;
        let mut flushes = 0;
        let mut end = String::from("(no end line: the client died)");
        let make_durable = |m: &mut Model, req: &(u64, Vec<usize>)| {
            for (i, &idx) in req.1.iter().enumerate() {
                let d = &mut m.durable[req.0 as usize + i];
                *d = (*d).max(idx + 1);
            }
        };
        for (lineno, line) in log.lines().enumerate() {
            let f: Vec<&str> = line.split_whitespace().collect();
            let num = |i: usize| -> u64 { f[i].parse().unwrap() };
            match f.first().copied() {
                Some("ready") => {}
                Some(kind @ ("W" | "Z")) => {
                    let (tag, start, len) = if kind == "W" {
                        (num(1), num(2), num(3))
                    } else {
                        (0, num(1), num(2))
                    };
                    assert!(
                        start + len <= n as u64,
                        "the client logged a request past the end: {line}"
                    );
                    let idx = (start..start + len)
                        .map(|s| {
                            let w = &mut m.writes[s as usize];
                            w.push(tag);
                            w.len() - 1
                        })
                        .collect();
                    sent.insert(lineno, (start, idx));
                }
                Some("A") => acked.push(num(1) as usize),
                Some("AF") => {
                    // FUA: durable when acknowledged.
                    acked.push(num(1) as usize);
                    make_durable(&mut m, &sent[&(num(1) as usize)]);
                }
                Some("FS") => {
                    flush_mark.insert(num(1), acked.len());
                }
                Some("FD") => {
                    let upto = flush_mark[&num(1)];
                    if upto > covered {
                        for id in &acked[covered..upto] {
                            make_durable(&mut m, &sent[id]);
                        }
                        covered = upto;
                    }
                    flushes += 1;
                }
                _ => end = line.to_string(),
            }
        }
        (m, [sent.len(), acked.len(), flushes], end)
    }

    /// The sector's acceptable values: the last durable write and anything
    /// after it; with none durable, also the round's starting value.
    fn acceptable(&self, sector: usize) -> Vec<Tag> {
        let w = &self.writes[sector];
        match self.durable[sector] {
            0 => std::iter::once(self.base[sector])
                .chain(w.iter().copied())
                .collect(),
            n => w[n - 1..].to_vec(),
        }
    }
}

pub fn read_volume_over_nbd(d: &Daemon, dir: &Path) -> Vec<u8> {
    let out = dir.join("readback.img");
    let _ = std::fs::remove_file(&out);
    crate::nbd_common::clients::nbdcopy(&d.nbd_uri(VOLUME), out.to_str().unwrap(), &[]);
    std::fs::read(&out).unwrap()
}

/// Creates the volume [`VOLUME`] on the daemon's pool and runs `rounds`
/// rounds of the client, each SIGKILLing the daemon a random time in
/// `kill_after_ms` into its run (`seed` decides), restarting it on the same
/// pool directory and checking every sector. `dir` is scratch space.
/// Returns the daemon running.
pub fn sigkill_rounds(
    d: Daemon,
    dir: &Path,
    rounds: u64,
    kill_after_ms: Range<u64>,
    seed: u64,
) -> Daemon {
    eprintln!("NBD crash test seed {seed} (set VPOOL_NBD_CRASH_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = d.pool.clone();
    let started = Instant::now();

    d.client()
        .create_volume(VOLUME, SECTORS * SECTOR as u64)
        .unwrap();
    let mut base: Vec<Tag> = vec![0; SECTORS as usize];
    let mut daemon = Some(d);

    for round in 1..=rounds {
        let d = daemon.take().expect("a running daemon");
        let log = dir.join(format!("client.{round}.log"));
        let client_seed: u64 = rng.r#gen();
        let kill_after = Duration::from_millis(rng.gen_range(kill_after_ms.clone()));
        let uri = d.nbd_uri(VOLUME);
        let client = {
            let log = log.clone();
            std::thread::spawn(move || {
                nbdsh_script(
                    CLIENT_SCRIPT,
                    &[
                        ("URI", &uri),
                        ("LOG", log.to_str().unwrap()),
                        ("SECTORS", &SECTORS.to_string()),
                        ("SEED", &client_seed.to_string()),
                        ("ROUND", &round.to_string()),
                        ("MAX_SECONDS", "20"),
                    ],
                )
            })
        };
        // Kill once the client is connected and `kill_after` into its run.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .starts_with("ready")
        {
            assert!(
                Instant::now() < deadline && !client.is_finished(),
                "round {round}: the client did not connect; log:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(kill_after);
        d.crash();
        client.join().expect("the client script failed");
        let text = std::fs::read_to_string(&log).unwrap();
        let (model, [sent, acked, flushes], end) = Model::from_log(base, &text);
        eprintln!(
            "round {round}: killed {kill_after:?} in: {sent} requests sent, {acked} acknowledged, {flushes} flushes; client ended with: {end}"
        );
        assert!(
            !end.starts_with("BUG"),
            "round {round}: client script error: {end}"
        );
        assert!(
            acked > 0 && flushes > 0,
            "round {round}: the client got nothing done before the kill ({end})"
        );

        let d = Daemon::start(&pool, &[]);
        let data = read_volume_over_nbd(&d, dir);
        assert_eq!(data.len(), SECTORS as usize * SECTOR);
        let mut now = Vec::with_capacity(SECTORS as usize);
        let mut errors = Vec::new();
        for (s, chunk) in data.chunks_exact(SECTOR).enumerate() {
            match decode_sector(chunk, s as u64) {
                Ok(tag) => {
                    let ok = model.acceptable(s);
                    if !ok.contains(&tag) {
                        errors.push(format!(
                            "sector {s}: holds tag {tag:#x}, acceptable {ok:x?} ({} of {} writes this round durable)",
                            model.durable[s],
                            model.writes[s].len()
                        ));
                    }
                    now.push(tag);
                }
                Err(e) => {
                    errors.push(e);
                    now.push(u64::MAX);
                }
            }
        }
        assert!(
            errors.is_empty(),
            "round {round} (seed {seed}): {} bad sectors; first ones:\n{}\ndaemon log:\n{}",
            errors.len(),
            errors
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            d.log_text()
        );
        base = now;
        daemon = Some(d);
    }
    eprintln!("{rounds} rounds in {:?}", started.elapsed());
    daemon.take().expect("a running daemon")
}
