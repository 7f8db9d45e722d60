//! Crash tests on the simulated store.
//!
//! Each seed runs a random workload (writes, trims, zeroes, flushes,
//! checkpoints, cleaner passes, volume create/resize/delete) and arms a crash
//! at a random store operation, so the power is cut anywhere: mid-append,
//! mid-sync, between a cleaner's relocation and its checkpoint, during a
//! checkpoint, even during the recovery that follows. The crash drops every
//! unsynced write, or a random and possibly torn subset of them.
//!
//! After reopening, the pool must be a *prefix* of its history: equal to the
//! state after some operation at or after the last successful flush. That is
//! stronger than "every flushed write is there": nothing later appears
//! without everything before it, and nothing torn appears at all.
//!
//! Half the seeds also run out of space from a random step for a while
//! (the store's capacity is cut to just above what it holds): ops fail
//! with ENOSPC, each byte they touched must read old or new, and the pool
//! must carry on once space returns. After the crash, 40% of the seeds
//! flip a bit of durable data (bit rot): in a checkpoint copy, or in log
//! bytes a durable mark vouches for. Then blocks that fail their checksum
//! are excused in the comparison, and a pool that refuses to open for lost
//! records must open with repair. 2 x 1000 seeds by default
//! (`CRASH_SEEDS=N` for more, `CRASH_SEED=S` for one).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::{Rng, SeedableRng, rngs::StdRng};
use vpool_engine::checkpoint::CHECKPOINT_SLOTS;
use vpool_engine::record::{self, RecordKind};
use vpool_engine::store::{SegmentId, SegmentStore, SimCrashMode, SimStore};
use vpool_engine::{BLOCK_SIZE, EngineError, Pool, PoolConfig};

const BLOCKS: u64 = 24;

fn config() -> PoolConfig {
    PoolConfig {
        segment_target_bytes: 40 * 1024,
        checkpoint_interval_bytes: 1 << 40,
        clean_below_live_fraction: 0.7,
        clean_max_segments_per_pass: 3,
        // Every maintenance step marks: more of the log is vouched for, so
        // more rot lands where recovery must tell it from a torn tail.
        durable_mark_interval: std::time::Duration::ZERO,
        background: false,
        ..PoolConfig::default()
    }
}

/// Volume contents by name, snapshot contents by `vol@snap`, and each
/// clone's origin by `clone:NAME` (value: `vol@snap`), which is bookkeeping
/// for the test and not part of the compared state.
type Model = BTreeMap<String, Vec<u8>>;

fn read_all(pool: &Pool) -> Result<Model, EngineError> {
    let mut out = Model::new();
    for v in pool.list_volumes() {
        let mut buf = vec![0u8; v.size_bytes as usize];
        pool.volume(&v.name)?.read(0, &mut buf)?;
        for s in pool.list_snapshots(&v.name)? {
            let mut sbuf = vec![0u8; s.size_bytes as usize];
            pool.snapshot(&v.name, &s.name)?.read(0, &mut sbuf)?;
            out.insert(format!("{}@{}", v.name, s.name), sbuf);
        }
        out.insert(v.name, buf);
    }
    Ok(out)
}

/// Runs one op on pool and model. Returns Ok(durable) where durable says
/// the op was a completed flush point; Err if the store crashed under it,
/// with the model as it would be had the op taken effect.
fn step(rng: &mut StdRng, pool: &Pool, model: &mut Model) -> Result<bool, (EngineError, Model)> {
    let names: Vec<String> = model
        .keys()
        .filter(|k| !k.contains('@') && !k.starts_with("clone:"))
        .cloned()
        .collect();
    let has_clones = |m: &Model, prefix: &str| {
        m.iter()
            .any(|(k, v)| k.starts_with("clone:") && v.starts_with(prefix.as_bytes()))
    };
    let pick = |rng: &mut StdRng| names.get(rng.gen_range(0..names.len().max(1))).cloned();
    let mut after = model.clone();
    let result: Result<bool, EngineError> = match rng.gen_range(0..120) {
        0..=49 => match pick(rng) {
            Some(name) => {
                let size = after[&name].len() as u64;
                let sector = 512;
                let off = rng.gen_range(0..size / sector) * sector;
                let len = (rng.gen_range(1..=16) * sector).min(size - off);
                let byte: u8 = rng.r#gen();
                let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8)).collect();
                after.get_mut(&name).unwrap()[off as usize..(off + len) as usize]
                    .copy_from_slice(&data);
                pool.volume(&name)
                    .and_then(|v| v.write(off, &data))
                    .map(|()| false)
            }
            None => Ok(false),
        },
        50..=59 => match pick(rng) {
            Some(name) => {
                let size_blocks = after[&name].len() as u64 / BLOCK_SIZE;
                let b = rng.gen_range(0..size_blocks);
                let n = rng.gen_range(1..=size_blocks - b);
                let unmap = rng.gen_bool(0.5);
                let trim = rng.gen_bool(0.5);
                after.get_mut(&name).unwrap()
                    [(b * BLOCK_SIZE) as usize..((b + n) * BLOCK_SIZE) as usize]
                    .fill(0);
                pool.volume(&name)
                    .and_then(|v| {
                        if trim {
                            v.trim(b * BLOCK_SIZE, n * BLOCK_SIZE)
                        } else {
                            v.write_zeroes(b * BLOCK_SIZE, n * BLOCK_SIZE, unmap)
                        }
                    })
                    .map(|()| false)
            }
            None => Ok(false),
        },
        60..=74 => pool.flush().map(|()| true),
        75..=79 => pool.checkpoint().map(|()| true),
        // A pass with nothing to clean writes nothing: not a flush point.
        80..=84 => pool.clean().map(|r| r.segments_deleted > 0),
        // The background path: relocation now, deletion at a later
        // checkpoint. Not counted as a flush point (conservative).
        85..=87 => pool.maintenance_step().map(|()| false),
        88..=91 => {
            let name = format!("v{}", rng.gen_range(0..4));
            if after.contains_key(&name) {
                Ok(false)
            } else {
                after.insert(name.clone(), vec![0; (BLOCKS * BLOCK_SIZE) as usize]);
                pool.create_volume(&name, BLOCKS * BLOCK_SIZE).map(|_| true)
            }
        }
        92..=95 => match pick(rng) {
            Some(name) => {
                let blocks = rng.gen_range(1..=BLOCKS * 2);
                after
                    .get_mut(&name)
                    .unwrap()
                    .resize((blocks * BLOCK_SIZE) as usize, 0);
                pool.resize_volume(&name, blocks * BLOCK_SIZE, true)
                    .map(|_| true)
            }
            None => Ok(false),
        },
        96..=97 => match pick(rng) {
            Some(name) if !has_clones(&after, &format!("{name}@")) => {
                after.retain(|k, _| *k != name && !k.starts_with(&format!("{name}@")));
                after.remove(&format!("clone:{name}"));
                pool.delete_volume(&name).map(|()| true)
            }
            _ => Ok(false),
        },
        _ => match (pick(rng), rng.gen_range(0..6), rng.gen_range(0..2)) {
            (Some(name), what, s) => {
                let key = format!("{name}@s{s}");
                let exists = after.contains_key(&key);
                match what {
                    0 if !exists => {
                        after.insert(key, after[&name].clone());
                        pool.create_snapshot(&name, &format!("s{s}")).map(|_| true)
                    }
                    1 if exists && !has_clones(&after, &key) => {
                        after.remove(&key);
                        pool.delete_snapshot(&name, &format!("s{s}")).map(|()| true)
                    }
                    2 if exists => {
                        after.insert(name.clone(), after[&key].clone());
                        pool.rollback(&name, &format!("s{s}")).map(|_| true)
                    }
                    3 if exists => {
                        let new = format!("v{}", rng.gen_range(0..4));
                        if after.contains_key(&new) {
                            Ok(false)
                        } else {
                            after.insert(new.clone(), after[&key].clone());
                            after.insert(format!("clone:{new}"), key.clone().into_bytes());
                            pool.clone_volume(&name, &format!("s{s}"), &new)
                                .map(|_| true)
                        }
                    }
                    4 if after.contains_key(&format!("clone:{name}")) => {
                        after.remove(&format!("clone:{name}"));
                        pool.flatten(&name).map(|_| true)
                    }
                    5 if after.contains_key(&format!("clone:{name}")) => {
                        let origin =
                            String::from_utf8(after[&format!("clone:{name}")].clone()).unwrap();
                        let parent = origin.split('@').next().unwrap().to_string();
                        after.insert(parent, after[&name].clone());
                        pool.commit(&name).map(|_| true)
                    }
                    _ => Ok(false),
                }
            }
            _ => Ok(false),
        },
    };
    if std::env::var("CRASH_DEBUG").is_ok() {
        let diff: Vec<_> = after
            .iter()
            .filter(|(k, v)| model.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .collect();
        eprintln!(
            "op -> {:?} changed {:?} vols {:?}",
            result.as_ref().map_err(|e| e.to_string()),
            diff,
            after.keys().collect::<Vec<_>>()
        );
    }
    match result {
        Ok(durable) => {
            *model = after;
            Ok(durable)
        }
        Err(e) => Err((e, after)),
    }
}

/// Data keys of a model (leaving out the clone bookkeeping).
fn data_keys(m: &Model) -> BTreeSet<String> {
    m.keys()
        .filter(|k| !k.starts_with("clone:"))
        .cloned()
        .collect()
}

/// After an op failed for want of space, the pool shows, key by key, the
/// state before it or after it; a write that became several records may
/// have landed in part, but every byte is old or new. Returns the model
/// of what the pool shows now.
fn reconcile(seed: u64, pool: &Pool, before: &Model, after: &Model) -> Option<Model> {
    // The crash may have fired inside the failed op (while it released the
    // reserve, say): then the pool is gone and so is the question.
    let actual = read_all(pool).ok()?;
    let keys = data_keys(&actual);
    let base = if keys == data_keys(after) {
        after
    } else {
        before
    };
    assert_eq!(keys, data_keys(base), "seed {seed}: volumes after ENOSPC");
    let mut out = base.clone();
    for (k, v) in actual {
        let (b, a) = (before.get(&k), after.get(&k));
        assert!(
            [b, a].iter().any(|m| m.is_some_and(|m| m.len() == v.len())),
            "seed {seed}: {k} has a size it never had"
        );
        for (i, byte) in v.iter().enumerate() {
            let old = b.and_then(|b| b.get(i)) == Some(byte);
            let new = a.and_then(|a| a.get(i)) == Some(byte);
            assert!(
                old || new,
                "seed {seed}: {k} byte {i} is neither old nor new after ENOSPC"
            );
        }
        out.insert(k, v);
    }
    Some(out)
}

/// Every image of the pool, block by block; `None` for a block that fails
/// its checksum (reported damage).
fn read_all_blocks(pool: &Pool) -> BTreeMap<String, Vec<Option<Vec<u8>>>> {
    let mut out = BTreeMap::new();
    let read = |v: &vpool_engine::Volume, size: u64| -> Vec<Option<Vec<u8>>> {
        (0..size / BLOCK_SIZE)
            .map(|b| {
                let mut buf = vec![0u8; BLOCK_SIZE as usize];
                match v.read(b * BLOCK_SIZE, &mut buf) {
                    Ok(()) => Some(buf),
                    Err(EngineError::Corrupt { .. }) => None,
                    Err(e) => panic!("read: {e}"),
                }
            })
            .collect()
    };
    for v in pool.list_volumes() {
        for s in pool.list_snapshots(&v.name).unwrap() {
            let h = pool.snapshot(&v.name, &s.name).unwrap();
            out.insert(format!("{}@{}", v.name, s.name), read(&h, s.size_bytes));
        }
        out.insert(
            v.name.clone(),
            read(&pool.volume(&v.name).unwrap(), v.size_bytes),
        );
    }
    out
}

/// Whether the recovered images equal `m`, blocks that fail their
/// checksum aside.
fn matches(got: &BTreeMap<String, Vec<Option<Vec<u8>>>>, m: &Model) -> bool {
    let keys: BTreeSet<String> = got.keys().cloned().collect();
    keys == data_keys(m)
        && got.iter().all(|(k, blocks)| {
            let want = &m[k];
            want.len() == blocks.len() * BLOCK_SIZE as usize
                && blocks.iter().enumerate().all(|(i, b)| {
                    b.as_ref().is_none_or(|b| {
                        b[..] == want[i * BLOCK_SIZE as usize..][..BLOCK_SIZE as usize]
                    })
                })
        })
}

/// The furthest log position a durable mark vouches for, over the store's
/// segments: bytes before it were synced, so damage there is bit rot.
fn last_mark(sim: &SimStore) -> Option<(SegmentId, u64)> {
    let mut best = None;
    for (_, image) in sim.segment_images() {
        let mut off = record::SEGMENT_HEADER_LEN as usize;
        while let Some(h) = record::scan_record(&image, off).and_then(|f| f.header()) {
            if h.kind == RecordKind::Mark {
                best = best.max(Some((SegmentId(h.arg), u64::from(h.arg2))));
            }
            off += h.record_len() as usize;
        }
    }
    best
}

/// Flips a bit of durable data as bit rot would: in a checkpoint copy (when
/// there are two), or in log bytes a durable mark vouches for.
fn rot(rng: &mut StdRng, sim: &SimStore) -> Option<String> {
    let slots: Vec<&str> = CHECKPOINT_SLOTS
        .iter()
        .copied()
        .filter(|n| sim.get_meta(n).ok().flatten().is_some())
        .collect();
    if slots.len() == 2 && rng.gen_bool(0.3) {
        let name = slots[rng.gen_range(0..2)];
        let len = sim.get_meta(name).unwrap().unwrap().len();
        let at = rng.gen_range(0..len);
        sim.corrupt_meta(name, at);
        return Some(format!("{name} byte {at}"));
    }
    let (mseg, moff) = last_mark(sim)?;
    // Mostly where recovery replays (after the newest checkpoint's
    // position), which is what it must tell from a torn tail; else
    // anywhere, where only reads and the cleaner meet the damage.
    let from = newest_checkpoint_position(sim).filter(|_| rng.gen_bool(0.7));
    let candidates: Vec<(SegmentId, u64, u64)> = sim
        .segment_images()
        .into_iter()
        .filter(|(id, _)| *id <= mseg)
        .map(|(id, img)| {
            let end = if id == mseg { moff } else { img.len() as u64 };
            let start = match from {
                Some((fseg, foff)) if id == fseg => foff,
                Some((fseg, _)) if id < fseg => end,
                _ => 0,
            };
            (id, start, end)
        })
        .filter(|(_, start, end)| start < end)
        .collect();
    let (id, start, end) = *candidates.get(rng.gen_range(0..candidates.len().max(1)))?;
    let at = rng.gen_range(start..end);
    sim.corrupt(id, at);
    Some(format!("{id} byte {at}"))
}

/// Where recovery will start replaying: the newest checkpoint's position.
fn newest_checkpoint_position(sim: &SimStore) -> Option<(SegmentId, u64)> {
    CHECKPOINT_SLOTS
        .iter()
        .filter_map(|n| sim.get_meta(n).ok().flatten())
        .filter_map(|b| vpool_engine::checkpoint::Checkpoint::decode(&b).ok())
        .max_by_key(|c| c.next_seq)
        .map(|c| (c.position.seg, c.position.offset))
}

/// What the seeds of one test went through, to show they exercised the
/// paths they are meant to.
#[derive(Debug, Default)]
struct Tally {
    enospc: u64,
    rotted: u64,
    damage_reported: u64,
    repaired: u64,
    checkpoint_fallbacks: u64,
}

fn crash_run(seed: u64, mode: SimCrashMode, tally: &mut Tally) {
    let mut rng = StdRng::seed_from_u64(seed);
    let sim = SimStore::new();
    let (pool, _) = Pool::open(Arc::new(sim.handle()), config()).unwrap();
    let mut model = Model::new();
    for v in 0..2 {
        let name = format!("v{v}");
        pool.create_volume(&name, BLOCKS * BLOCK_SIZE).unwrap();
        model.insert(name, vec![0; (BLOCKS * BLOCK_SIZE) as usize]);
    }
    // The states after each op since the last flush point: the recovered
    // state must be one of them.
    let mut history = vec![model.clone()];
    let crash_at = rng.gen_range(0..600);
    sim.crash_after_ops(crash_at, mode, seed);
    // Half the seeds run out of space for a while, from a random step.
    let full_from = rng.gen_bool(0.5).then(|| rng.gen_range(0..300));
    let full_for = rng.gen_range(1..60);
    let mut crashed = false;
    for i in 0..400 {
        if full_from == Some(i) {
            sim.set_capacity(Some(sim.used_bytes() + rng.gen_range(0..40_000)));
        }
        if full_from.is_some_and(|f| i == f + full_for) {
            sim.set_capacity(None);
        }
        match step(&mut rng, &pool, &mut model) {
            Ok(durable) => {
                if durable {
                    history.clear();
                }
                history.push(model.clone());
            }
            Err((e, after)) if e.is_no_space() => {
                tally.enospc += 1;
                sim.pause_crash_countdown(true);
                let now = reconcile(seed, &pool, &model, &after);
                sim.pause_crash_countdown(false);
                let Some(now) = now else {
                    history.push(after);
                    crashed = true;
                    break;
                };
                model = now;
                history.push(model.clone());
            }
            Err((e, after)) => {
                assert!(
                    matches!(
                        e,
                        EngineError::Store(vpool_engine::store::StoreError::Crashed)
                    ),
                    "seed {seed}: unexpected error {e}"
                );
                // The op that crashed may or may not have taken effect.
                history.push(after);
                crashed = true;
                break;
            }
        }
    }
    if !crashed {
        sim.crash(mode, seed);
    }
    drop(pool);
    // The operator makes room before restarting.
    sim.set_capacity(None);
    let rotted = rng.gen_bool(0.4).then(|| rot(&mut rng, &sim)).flatten();
    tally.rotted += u64::from(rotted.is_some());
    // Sometimes crash again during recovery.
    let second_crash = rng.gen_bool(0.3);
    if std::env::var("CRASH_DEBUG").is_ok() {
        eprintln!(
            "crashed in workload: {crashed}, crash during recovery: {second_crash}, rot: {rotted:?}, {} states since the last flush",
            history.len()
        );
    }
    if second_crash {
        sim.crash_after_ops(rng.gen_range(0..20), mode, seed + 1);
        // Recovery changes no volume's content, only where the log ends.
        drop(Pool::open(Arc::new(sim.handle()), config()));
        sim.crash(mode, seed + 2);
    }
    let pool = match Pool::open(Arc::new(sim.handle()), config()) {
        Ok((pool, report)) => {
            tally.damage_reported += u64::from(!report.damage.is_empty());
            tally.checkpoint_fallbacks += u64::from(!report.checkpoints_rejected.is_empty());
            pool.self_check();
            let got = read_all_blocks(&pool);
            assert!(
                history.iter().any(|m| matches(&got, m)),
                "seed {seed} ({mode:?}, rot {rotted:?}): recovered state is not a prefix at or after the last flush \
                 ({} states since it, recovery {report:?})",
                history.len()
            );
            pool
        }
        // Records lost in durable data: refused, then opened by repair.
        Err(EngineError::Damaged(report)) => {
            assert!(
                rotted.is_some(),
                "seed {seed}: damage without rot: {report:?}"
            );
            let repair = PoolConfig {
                repair_damaged_log: true,
                ..config()
            };
            let (pool, report) = Pool::open(Arc::new(sim.handle()), repair)
                .unwrap_or_else(|e| panic!("seed {seed}: repair failed: {e}"));
            assert!(report.repaired, "{report:?}");
            tally.repaired += 1;
            pool.self_check();
            pool
        }
        Err(e) => panic!("seed {seed} (rot {rotted:?}): reopen failed: {e}"),
    };
    // And the pool keeps working.
    if let Some(v) = pool.list_volumes().first() {
        let vol = pool.volume(&v.name).unwrap();
        vol.write(0, &[7u8; 4096]).unwrap();
        pool.flush().unwrap();
        let mut b = [0u8; 4096];
        vol.read(0, &mut b).unwrap();
        assert_eq!(b, [7u8; 4096]);
    }
}

/// Seeds from `CRASH_SEED` (one) or `first..first + CRASH_SEEDS` (default
/// `count`).
fn seeds(first: u64, count: u64) -> std::ops::Range<u64> {
    if let Some(s) = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return s..s + 1;
    }
    let n = std::env::var("CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(count);
    first..first + n
}

fn run_seeds(seeds: std::ops::Range<u64>, mode: SimCrashMode) {
    let n = seeds.end - seeds.start;
    let mut tally = Tally::default();
    for seed in seeds {
        crash_run(seed, mode, &mut tally);
    }
    eprintln!("{mode:?}, {n} seeds: {tally:?}");
    if n >= 500 {
        // The seeds must have gone where they were meant to: otherwise a
        // change in the workload would quietly stop testing a path.
        assert!(tally.enospc > n / 10, "{tally:?}");
        assert!(tally.damage_reported > n / 50, "{tally:?}");
        assert!(tally.repaired > 0, "{tally:?}");
        assert!(tally.checkpoint_fallbacks > 0, "{tally:?}");
    }
}

#[test]
fn crash_drop_unsynced_many_seeds() {
    run_seeds(seeds(0, 1000), SimCrashMode::DropUnsynced);
}

#[test]
fn crash_random_torn_subset_many_seeds() {
    run_seeds(seeds(100_000, 1000), SimCrashMode::RandomSubset);
}
