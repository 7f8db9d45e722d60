//! Crash consistency of the real daemon: `vpool serve` as a child process,
//! a write/trim/flush workload through the API, SIGKILL at a random moment,
//! restart, and check, for every block:
//!
//! - every write followed by a completed flush is there (or a later write
//!   to the same block is), and
//! - the block holds something that was actually written to it (or zeros
//!   from a trim or its initial state): never garbage, never a torn mix of
//!   two writes, never another block's data.
//!
//! Several rounds on the same pool, so later rounds also recover on top of
//! earlier recoveries. Seeded: set `VPOOL_CRASH_SEED` to replay a failure.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Daemon;
use rand::{Rng, SeedableRng, rngs::StdRng};
use vpool_api::{Client, MAX_DATA_BYTES};

const ROUNDS: u64 = 5;
const BLOCK: usize = 4096;
const VOLUME_BLOCKS: u64 = 8192; // 32 MiB
const MAX_WRITE_BLOCKS: u64 = 32;
/// The workload stops by itself after this long if the kill has not come.
const MAX_WORKLOAD_TIME: Duration = Duration::from_secs(15);
const VOLUME: &str = "crash";

/// Tag 0 means "zeros"; writes have tags from 1 up.
type Tag = u64;

/// A block written with `tag`: 16-byte units of (tag, block number), so a
/// block read back names the write it came from and where it belongs.
fn block_pattern(tag: Tag, block: u64, out: &mut [u8]) {
    for unit in out.chunks_exact_mut(16) {
        unit[..8].copy_from_slice(&tag.to_le_bytes());
        unit[8..].copy_from_slice(&block.to_le_bytes());
    }
}

/// The tag of a block read back, or a description of what is wrong with it.
fn decode_block(data: &[u8], block: u64) -> Result<Tag, String> {
    if data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let tag = u64::from_le_bytes(data[..8].try_into().unwrap());
    let mut want = vec![0u8; BLOCK];
    block_pattern(tag, block, &mut want);
    if data != want {
        let at = (0..BLOCK).find(|&i| data[i] != want[i]).unwrap_or(0);
        return Err(format!(
            "block {block} is neither zeros nor a whole write (first unit says tag {tag}; differs at byte {at})"
        ));
    }
    Ok(tag)
}

/// What each block may hold after a crash.
struct Model {
    /// What the block held at the start of the round (after the previous
    /// recovery, which made it durable).
    base: Vec<Tag>,
    /// Writes (tags) to each block this round, in order.
    writes: Vec<Vec<Tag>>,
    /// Per block, how many of `writes` a completed flush covered.
    flushed: Vec<usize>,
}

impl Model {
    fn new(base: Vec<Tag>) -> Model {
        let n = base.len();
        Model {
            base,
            writes: vec![Vec::new(); n],
            flushed: vec![0; n],
        }
    }

    /// The block's acceptable values: the last flushed write and anything
    /// after it; with no flushed write, also the round's starting value.
    fn acceptable(&self, block: usize) -> Vec<Tag> {
        let w = &self.writes[block];
        match self.flushed[block] {
            0 => std::iter::once(self.base[block])
                .chain(w.iter().copied())
                .collect(),
            n => w[n - 1..].to_vec(),
        }
    }
}

/// Runs writes, trims and flushes until an error (the daemon died) or the
/// stop flag. Every operation is put in the model *before* it is sent: a
/// request cut off by the crash may or may not have happened.
fn workload(
    client: &Client,
    model: &mut Model,
    rng: &mut StdRng,
    round: u64,
    stop: &AtomicBool,
) -> (u64, u64) {
    let mut next_tag: Tag = (round << 32) | 1;
    let (mut ops, mut flushes) = (0u64, 0u64);
    let started = Instant::now();
    let mut buf = vec![0u8; (MAX_WRITE_BLOCKS as usize) * BLOCK];
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_WORKLOAD_TIME {
        let choice = rng.gen_range(0..100);
        let result = if choice < 15 {
            let r = client.flush();
            if r.is_ok() {
                // Everything sent before the flush completed before it.
                for (f, w) in model.flushed.iter_mut().zip(&model.writes) {
                    *f = w.len();
                }
                flushes += 1;
            }
            r
        } else if choice < 20 {
            // Trim: whole blocks become zeros.
            let n = rng.gen_range(1..=MAX_WRITE_BLOCKS);
            let start = rng.gen_range(0..VOLUME_BLOCKS - n);
            for b in start..start + n {
                model.writes[b as usize].push(0);
            }
            client.zero(VOLUME, start * BLOCK as u64, n * BLOCK as u64, true, false)
        } else if choice < 21 {
            client.checkpoint()
        } else {
            let n = rng.gen_range(1..=MAX_WRITE_BLOCKS);
            let start = rng.gen_range(0..VOLUME_BLOCKS - n);
            let tag = next_tag;
            next_tag += 1;
            let data = &mut buf[..n as usize * BLOCK];
            for (i, chunk) in data.chunks_exact_mut(BLOCK).enumerate() {
                let b = start + i as u64;
                block_pattern(tag, b, chunk);
                model.writes[b as usize].push(tag);
            }
            client.write(VOLUME, start * BLOCK as u64, data, false)
        };
        if result.is_err() {
            break;
        }
        ops += 1;
    }
    (ops, flushes)
}

fn read_volume(client: &Client) -> Vec<u8> {
    let total = VOLUME_BLOCKS as usize * BLOCK;
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let n = (total - out.len()).min(MAX_DATA_BYTES);
        out.extend(
            client
                .read(VOLUME, out.len() as u64, n)
                .expect("reading the volume back"),
        );
    }
    out
}

#[test]
fn flushed_writes_survive_sigkill() {
    let seed: u64 = std::env::var("VPOOL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    eprintln!("crash test seed {seed} (set VPOOL_CRASH_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");

    let d = Daemon::start(&pool, &[]);
    d.client()
        .create_volume(VOLUME, VOLUME_BLOCKS * BLOCK as u64)
        .unwrap();
    let mut model = Model::new(vec![0; VOLUME_BLOCKS as usize]);
    let mut daemon = Some(d);

    for round in 1..=ROUNDS {
        let d = daemon.take().expect("a running daemon");
        let client = d.client().with_timeout(Duration::from_secs(10));
        let stop = Arc::new(AtomicBool::new(false));
        let kill_after = Duration::from_millis(rng.gen_range(150..1500));
        let mut wl_rng = StdRng::seed_from_u64(rng.r#gen());

        // The workload runs on its own thread; this one kills the daemon.
        let (model_back, ops, flushes) = std::thread::scope(|s| {
            let stop2 = stop.clone();
            let h = s.spawn(move || {
                let r = workload(&client, &mut model, &mut wl_rng, round, &stop2);
                (model, r.0, r.1)
            });
            std::thread::sleep(kill_after);
            d.crash();
            stop.store(true, Ordering::SeqCst);
            let (m, ops, flushes) = h.join().expect("workload thread panicked");
            (m, ops, flushes)
        });
        model = model_back;
        eprintln!(
            "round {round}: killed after {kill_after:?}, {ops} operations, {flushes} flushes"
        );
        assert!(
            ops > 0,
            "round {round}: the workload did nothing before the kill"
        );

        let d = Daemon::start(&pool, &[]);
        let c = d.client();
        let info = c
            .volume_info(VOLUME)
            .expect("the volume survives the crash");
        assert_eq!(info.size_bytes, VOLUME_BLOCKS * BLOCK as u64);
        let data = read_volume(&c);
        let mut now = Vec::with_capacity(VOLUME_BLOCKS as usize);
        let mut errors = Vec::new();
        for (b, chunk) in data.chunks_exact(BLOCK).enumerate() {
            match decode_block(chunk, b as u64) {
                Ok(tag) => {
                    let ok = model.acceptable(b);
                    if !ok.contains(&tag) {
                        errors.push(format!(
                            "block {b}: holds tag {tag:#x}, acceptable {:x?} (flushed {} of {} writes this round)",
                            ok,
                            model.flushed[b],
                            model.writes[b].len()
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
            "round {round} (seed {seed}): {} bad blocks; first ones:\n{}\ndaemon log:\n{}",
            errors.len(),
            errors
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
            d.log_text()
        );
        // What recovery produced is durable now (opening checkpoints), so it
        // is the next round's starting point.
        model = Model::new(now);
        daemon = Some(d);
    }
    let d = daemon.take().expect("a running daemon");
    assert!(d.terminate().success());
}
