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

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use rand::{Rng, SeedableRng, rngs::StdRng};
use vpool_engine::store::{SimCrashMode, SimStore};
use vpool_engine::{BLOCK_SIZE, EngineError, Pool, PoolConfig};

const BLOCKS: u64 = 24;

fn config() -> PoolConfig {
    PoolConfig {
        segment_target_bytes: 40 * 1024,
        checkpoint_interval_bytes: 1 << 40,
        clean_below_live_fraction: 0.7,
        clean_max_segments_per_pass: 3,
        background: false,
        ..PoolConfig::default()
    }
}

/// Volume contents by name, snapshot contents by `vol@snap`, and each
/// clone's origin by `clone:NAME` (value: `vol@snap`), which is bookkeeping
/// for the test and not part of the compared state.
type Model = BTreeMap<String, Vec<u8>>;

fn digest(m: &Model) -> u64 {
    let mut h = DefaultHasher::new();
    for (k, v) in m.iter().filter(|(k, _)| !k.starts_with("clone:")) {
        (k, v).hash(&mut h);
    }
    h.finish()
}

fn read_all(pool: &Pool) -> Model {
    let mut out = Model::new();
    for v in pool.list_volumes() {
        let mut buf = vec![0u8; v.size_bytes as usize];
        pool.volume(&v.name).unwrap().read(0, &mut buf).unwrap();
        for s in pool.list_snapshots(&v.name).unwrap() {
            let mut sbuf = vec![0u8; s.size_bytes as usize];
            pool.snapshot(&v.name, &s.name)
                .unwrap()
                .read(0, &mut sbuf)
                .unwrap();
            out.insert(format!("{}@{}", v.name, s.name), sbuf);
        }
        out.insert(v.name, buf);
    }
    out
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

fn crash_run(seed: u64, mode: SimCrashMode) {
    let mut rng = StdRng::seed_from_u64(seed);
    let sim = SimStore::new();
    let (pool, _) = Pool::open(Arc::new(sim.handle()), config()).unwrap();
    let mut model = Model::new();
    for v in 0..2 {
        let name = format!("v{v}");
        pool.create_volume(&name, BLOCKS * BLOCK_SIZE).unwrap();
        model.insert(name, vec![0; (BLOCKS * BLOCK_SIZE) as usize]);
    }
    // Digests of the states after each op; the recovered state must be one
    // of those from `durable_from` on.
    let mut history = vec![digest(&model)];
    let mut durable_from = 0;
    let crash_at = rng.gen_range(0..600);
    sim.crash_after_ops(crash_at, mode, seed);
    let mut crashed = false;
    for _ in 0..400 {
        match step(&mut rng, &pool, &mut model) {
            Ok(durable) => {
                history.push(digest(&model));
                if durable {
                    durable_from = history.len() - 1;
                }
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
                history.push(digest(&after));
                crashed = true;
                break;
            }
        }
    }
    if !crashed {
        sim.crash(mode, seed);
    }
    drop(pool);
    // Sometimes crash again during recovery.
    let second_crash = rng.gen_bool(0.3);
    if std::env::var("CRASH_DEBUG").is_ok() {
        eprintln!(
            "crashed in workload: {crashed}, crash during recovery: {second_crash}, durable_from {durable_from} of {}",
            history.len()
        );
    }
    if second_crash {
        sim.crash_after_ops(rng.gen_range(0..20), mode, seed + 1);
        // Recovery changes no volume's content, only where the log ends.
        drop(Pool::open(Arc::new(sim.handle()), config()));
        sim.crash(mode, seed + 2);
    }
    let (pool, report) = Pool::open(Arc::new(sim.handle()), config())
        .unwrap_or_else(|e| panic!("seed {seed}: reopen failed: {e}"));
    pool.self_check();
    let recovered = read_all(&pool);
    let got = digest(&recovered);
    if std::env::var("CRASH_DEBUG").is_ok() && !history[durable_from..].contains(&got) {
        for (n, d) in &recovered {
            let m = model.get(n);
            eprintln!(
                "vol {n}: len {} model len {:?}",
                d.len(),
                m.map(|m| m.len())
            );
            if let Some(m) = m {
                for b in 0..(d.len().min(m.len()) / 4096) {
                    if d[b * 4096..(b + 1) * 4096] != m[b * 4096..(b + 1) * 4096] {
                        let first = (0..4096)
                            .find(|&i| d[b * 4096 + i] != m[b * 4096 + i])
                            .unwrap();
                        eprintln!(
                            "  block {b} differs from byte {first}: got {:?} want {:?}",
                            &d[b * 4096 + first..b * 4096 + first + 4],
                            &m[b * 4096 + first..b * 4096 + first + 4]
                        );
                    }
                }
            }
        }
        eprintln!("model vols {:?}", model.keys().collect::<Vec<_>>());
    }
    assert!(
        history[durable_from..].contains(&got),
        "seed {seed} ({mode:?}): recovered state is not a prefix at or after the last flush \
         (history {} states, durable from {durable_from}, recovery {report:?})",
        history.len()
    );
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

#[test]
fn crash_drop_unsynced_many_seeds() {
    let seeds = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(|s: u64| s..s + 1)
        .unwrap_or(0..300);
    for seed in seeds {
        crash_run(seed, SimCrashMode::DropUnsynced);
    }
}

#[test]
fn crash_random_torn_subset_many_seeds() {
    for seed in 1000..1300 {
        crash_run(seed, SimCrashMode::RandomSubset);
    }
}
