//! Model-based property tests: random sequences of volume operations, run
//! against the engine and against a plain in-memory model (a `Vec<u8>` per
//! volume), compared after every step, with `Pool::self_check()` after every
//! step. Reopen (clean close), crash-free recovery, checkpoints and cleaner
//! passes are mixed in, with tiny segments so rolls and cleaning happen often.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use vpool_engine::store::SimStore;
use vpool_engine::{BLOCK_SIZE, Pool, PoolConfig};

const VOLUME_BLOCKS: u64 = 48;
const SECTOR: u64 = 512;

#[derive(Clone, Debug)]
enum Op {
    Create(u8),
    Delete(u8),
    /// volume, new name
    Rename(u8, u8),
    Resize(u8, u64),
    /// volume, offset in sectors, length in sectors, fill seed
    Write(u8, u64, u64, u8),
    Trim(u8, u64, u64),
    Zero(u8, u64, u64, bool),
    Read(u8, u64, u64),
    Flush,
    Checkpoint,
    Clean,
    Reopen,
    Snapshot(u8, u8),
    DeleteSnapshot(u8, u8),
    Rollback(u8, u8),
    /// source volume, snapshot, new volume
    Clone(u8, u8, u8),
    Flatten(u8),
    Commit(u8),
    /// Checks diff(snapshot -> volume) and back against the model.
    Diff(u8, u8),
}

fn op() -> impl Strategy<Value = Op> {
    let sectors = VOLUME_BLOCKS * BLOCK_SIZE / SECTOR;
    let vol = 0u8..3;
    prop_oneof![
        1 => vol.clone().prop_map(Op::Create),
        1 => vol.clone().prop_map(Op::Delete),
        1 => (vol.clone(), vol.clone()).prop_map(|(v, n)| Op::Rename(v, n)),
        1 => (vol.clone(), 1u64..=VOLUME_BLOCKS).prop_map(|(v, b)| Op::Resize(v, b)),
        12 => (vol.clone(), 0..sectors, 1u64..40, any::<u8>()).prop_map(|(v, o, l, s)| Op::Write(v, o, l, s)),
        2 => (vol.clone(), 0..sectors, 1u64..64).prop_map(|(v, o, l)| Op::Trim(v, o, l)),
        2 => (vol.clone(), 0..sectors, 1u64..64, any::<bool>()).prop_map(|(v, o, l, u)| Op::Zero(v, o, l, u)),
        4 => (vol.clone(), 0..sectors, 1u64..64).prop_map(|(v, o, l)| Op::Read(v, o, l)),
        2 => Just(Op::Flush),
        1 => Just(Op::Checkpoint),
        2 => Just(Op::Clean),
        1 => Just(Op::Reopen),
        3 => (vol.clone(), 0u8..3).prop_map(|(v, s)| Op::Snapshot(v, s)),
        1 => (vol.clone(), 0u8..3).prop_map(|(v, s)| Op::DeleteSnapshot(v, s)),
        1 => (vol.clone(), 0u8..3).prop_map(|(v, s)| Op::Rollback(v, s)),
        2 => (vol.clone(), 0u8..3, vol.clone()).prop_map(|(v, s, c)| Op::Clone(v, s, c)),
        1 => vol.clone().prop_map(Op::Flatten),
        1 => vol.clone().prop_map(Op::Commit),
        2 => (vol.clone(), 0u8..3).prop_map(|(v, s)| Op::Diff(v, s)),
    ]
}

fn config() -> PoolConfig {
    PoolConfig {
        segment_target_bytes: 48 * 1024,
        checkpoint_interval_bytes: 1 << 40,
        clean_below_live_fraction: 0.6,
        clean_max_segments_per_pass: 4,
        background: false,
        ..PoolConfig::default()
    }
}

fn fill(seed: u8, len: usize, offset: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            seed.wrapping_mul(31)
                .wrapping_add((offset as usize + i) as u8 ^ seed)
        })
        .collect()
}

/// Clamps a request to the volume, as a well-behaved client would; the
/// out-of-range cases are checked separately below.
fn clamp(size: u64, off_sectors: u64, len_sectors: u64) -> Option<(u64, u64)> {
    let off = off_sectors * SECTOR;
    if off >= size {
        return None;
    }
    let len = (len_sectors * SECTOR).min(size - off);
    Some((off, len))
}

/// The model after volume `old` became `new`: its content, its snapshots,
/// its own parent link, and its clones' links to it move to the new name.
fn rename_in_model(
    old: &str,
    new: &str,
    model: &mut BTreeMap<String, Vec<u8>>,
    snaps: &mut BTreeMap<(String, String), Vec<u8>>,
    parents: &mut BTreeMap<String, (String, String)>,
) {
    let content = model.remove(old).expect("checked");
    model.insert(new.to_string(), content);
    let own: Vec<(String, String)> = snaps.keys().filter(|(v, _)| v == old).cloned().collect();
    for key in own {
        let content = snaps.remove(&key).expect("listed");
        snaps.insert((new.to_string(), key.1), content);
    }
    if let Some(link) = parents.remove(old) {
        parents.insert(new.to_string(), link);
    }
    for (parent, _) in parents.values_mut() {
        if parent == old {
            *parent = new.to_string();
        }
    }
}

/// Runs `ops`; returns the bytes the cleaner relocated in all.
fn run(ops: Vec<Op>) -> u64 {
    let mut relocated = 0u64;
    let sim = SimStore::new();
    let (mut pool, _) = Pool::open(Arc::new(sim.handle()), config()).unwrap();
    let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    // Snapshots by (volume, snapshot), and each clone's (volume, snapshot).
    let mut snaps: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    let mut parents: BTreeMap<String, (String, String)> = BTreeMap::new();
    for op in ops {
        match op {
            Op::Create(v) => {
                let name = format!("v{v}");
                let r = pool.create_volume(&name, VOLUME_BLOCKS * BLOCK_SIZE);
                assert_eq!(r.is_ok(), !model.contains_key(&name), "{r:?}");
                model
                    .entry(name)
                    .or_insert_with(|| vec![0; (VOLUME_BLOCKS * BLOCK_SIZE) as usize]);
            }
            Op::Delete(v) => {
                let name = format!("v{v}");
                let r = pool.delete_volume(&name);
                let has_clones = parents.values().any(|(p, _)| *p == name);
                let ok = model.contains_key(&name) && !has_clones;
                assert_eq!(r.is_ok(), ok, "delete {name}: {r:?}");
                if ok {
                    model.remove(&name);
                    snaps.retain(|(vol, _), _| *vol != name);
                    parents.remove(&name);
                }
            }
            Op::Rename(v, n) => {
                let (name, new) = (format!("v{v}"), format!("v{n}"));
                let r = pool.rename_volume(&name, &new);
                let ok = model.contains_key(&name) && (name == new || !model.contains_key(&new));
                assert_eq!(r.is_ok(), ok, "rename {name} to {new}: {r:?}");
                if ok && name != new {
                    rename_in_model(&name, &new, &mut model, &mut snaps, &mut parents);
                }
            }
            Op::Snapshot(v, sn) => {
                let (name, snap) = (format!("v{v}"), format!("s{sn}"));
                let r = pool.create_snapshot(&name, &snap);
                let key = (name.clone(), snap.clone());
                let ok = model.contains_key(&name) && !snaps.contains_key(&key);
                assert_eq!(r.is_ok(), ok, "snapshot {name}@{snap}: {r:?}");
                if ok {
                    snaps.insert(key, model[&name].clone());
                }
            }
            Op::DeleteSnapshot(v, sn) => {
                let (name, snap) = (format!("v{v}"), format!("s{sn}"));
                let r = pool.delete_snapshot(&name, &snap);
                let key = (name.clone(), snap.clone());
                let used = parents.values().any(|p| *p == key);
                let ok = snaps.contains_key(&key) && !used;
                assert_eq!(r.is_ok(), ok, "delete snapshot {name}@{snap}: {r:?}");
                if ok {
                    snaps.remove(&key);
                }
            }
            Op::Rollback(v, sn) => {
                let (name, snap) = (format!("v{v}"), format!("s{sn}"));
                let r = pool.rollback(&name, &snap);
                match snaps.get(&(name.clone(), snap.clone())) {
                    Some(content) => {
                        r.unwrap();
                        model.insert(name, content.clone());
                    }
                    None => assert!(r.is_err()),
                }
            }
            Op::Clone(v, sn, c) => {
                let (name, snap, new) = (format!("v{v}"), format!("s{sn}"), format!("v{c}"));
                let r = pool.clone_volume(&name, &snap, &new);
                let key = (name.clone(), snap.clone());
                match snaps.get(&key) {
                    Some(content) if !model.contains_key(&new) => {
                        r.unwrap();
                        model.insert(new.clone(), content.clone());
                        parents.insert(new, key);
                    }
                    _ => assert!(r.is_err()),
                }
            }
            Op::Resize(v, blocks) => {
                let name = format!("v{v}");
                let r = pool.resize_volume(&name, blocks * BLOCK_SIZE, true);
                if let Some(m) = model.get_mut(&name) {
                    r.unwrap();
                    m.resize((blocks * BLOCK_SIZE) as usize, 0);
                } else {
                    assert!(r.is_err());
                }
            }
            Op::Write(v, o, l, seed) => {
                let name = format!("v{v}");
                let Some(m) = model.get_mut(&name) else {
                    continue;
                };
                let Some((off, len)) = clamp(m.len() as u64, o, l) else {
                    // Past the end: refused, nothing changes.
                    let vol = pool.volume(&name).unwrap();
                    assert!(vol.write(m.len() as u64, &[1; 512]).is_err());
                    continue;
                };
                let data = fill(seed, len as usize, off);
                pool.volume(&name).unwrap().write(off, &data).unwrap();
                m[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
            Op::Trim(v, o, l) => {
                let name = format!("v{v}");
                let Some(m) = model.get_mut(&name) else {
                    continue;
                };
                let Some((off, len)) = clamp(m.len() as u64, o, l) else {
                    continue;
                };
                pool.volume(&name).unwrap().trim(off, len).unwrap();
                // Whole blocks inside the range read as zeros after a trim.
                let first = off.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
                let end = (off + len) / BLOCK_SIZE * BLOCK_SIZE;
                if end > first {
                    m[first as usize..end as usize].fill(0);
                }
            }
            Op::Zero(v, o, l, unmap) => {
                let name = format!("v{v}");
                let Some(m) = model.get_mut(&name) else {
                    continue;
                };
                let Some((off, len)) = clamp(m.len() as u64, o, l) else {
                    continue;
                };
                pool.volume(&name)
                    .unwrap()
                    .write_zeroes(off, len, unmap)
                    .unwrap();
                m[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read(v, o, l) => {
                let name = format!("v{v}");
                let Some(m) = model.get(&name) else { continue };
                let Some((off, len)) = clamp(m.len() as u64, o, l) else {
                    continue;
                };
                let mut buf = vec![0xEE; len as usize];
                pool.volume(&name).unwrap().read(off, &mut buf).unwrap();
                assert_eq!(
                    buf,
                    &m[off as usize..(off + len) as usize],
                    "read {name} at {off}+{len}"
                );
                // Block status agrees with content: ranges reported as zero read as zero.
                let st = pool
                    .volume(&name)
                    .unwrap()
                    .block_status(off, len, 1000)
                    .unwrap();
                let mut pos = off;
                for (n, flags) in st {
                    if flags & vpool_engine::STATE_ZERO != 0 {
                        assert!(m[pos as usize..(pos + n) as usize].iter().all(|&b| b == 0));
                    }
                    pos += n;
                }
                assert_eq!(pos, off + len);
            }
            Op::Flatten(v) => {
                let name = format!("v{v}");
                let r = pool.flatten(&name);
                assert_eq!(
                    r.is_ok(),
                    parents.remove(&name).is_some(),
                    "flatten {name}: {r:?}"
                );
            }
            Op::Commit(v) => {
                let name = format!("v{v}");
                let r = pool.commit(&name);
                match parents.get(&name) {
                    Some((parent, _)) => {
                        let info = r.unwrap();
                        assert_eq!(&info.name, parent);
                        let content = model[&name].clone();
                        model.insert(parent.clone(), content);
                    }
                    None => assert!(r.is_err()),
                }
            }
            Op::Diff(v, sn) => {
                let (name, snap) = (format!("v{v}"), format!("s{sn}"));
                let Some(old) = snaps.get(&(name.clone(), snap.clone())) else {
                    continue;
                };
                let new = &model[&name];
                let apply = |base: &[u8], target: &[u8], d: &[vpool_engine::DiffExtent]| {
                    let mut img = base.to_vec();
                    img.resize(target.len(), 0);
                    for e in d {
                        let r = e.offset as usize..(e.offset + e.len) as usize;
                        match e.kind {
                            vpool_engine::DiffKind::Data => {
                                img[r.clone()].copy_from_slice(&target[r])
                            }
                            vpool_engine::DiffKind::Zero => img[r].fill(0),
                        }
                    }
                    img
                };
                let fwd = pool.diff(&name, Some(&snap), None).unwrap();
                assert!(
                    apply(old, new, &fwd) == *new,
                    "diff {name}@{snap} -> {name}"
                );
                let back = pool.diff(&name, None, Some(&snap)).unwrap();
                assert!(
                    apply(new, old, &back) == *old,
                    "diff {name} -> {name}@{snap}"
                );
                // A diff of an image with itself is empty.
                assert!(
                    pool.diff(&name, Some(&snap), Some(&snap))
                        .unwrap()
                        .is_empty()
                );
            }
            Op::Flush => pool.flush().unwrap(),
            Op::Checkpoint => pool.checkpoint().unwrap(),
            Op::Clean => {
                pool.clean().unwrap();
            }
            Op::Reopen => {
                relocated += pool.stats().bytes_relocated;
                pool.close().unwrap();
                drop(pool);
                pool = Pool::open(Arc::new(sim.handle()), config()).unwrap().0;
            }
        }
        pool.self_check();
        // Every volume matches the model in full after every step.
        let vols = pool.list_volumes();
        assert_eq!(
            vols.iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
            model.keys().cloned().collect::<Vec<_>>()
        );
        for (name, m) in &model {
            let vol = pool.volume(name).unwrap();
            assert_eq!(vol.size_bytes().unwrap(), m.len() as u64);
            let mut buf = vec![0xEE; m.len()];
            vol.read(0, &mut buf).unwrap();
            assert!(buf == *m, "volume {name} differs from the model");
        }
        // And every snapshot matches what the volume held when it was taken.
        for ((name, snap), m) in &snaps {
            let view = pool.snapshot(name, snap).unwrap();
            assert_eq!(view.size_bytes().unwrap(), m.len() as u64);
            let mut buf = vec![0xEE; m.len()];
            view.read(0, &mut buf).unwrap();
            assert!(buf == *m, "snapshot {name}@{snap} differs from the model");
            assert!(view.write(0, &[1; 512]).is_err(), "snapshots are read-only");
        }
        for name in model.keys() {
            let space = pool.volume_space(name).unwrap();
            assert_eq!(
                space,
                pool.volume_space_brute_force(name).unwrap(),
                "space of {name}"
            );
            let info = pool.volume_info(name).unwrap();
            assert_eq!(space.volume.allocated_bytes, info.allocated_bytes);
            let images = std::iter::once(space.volume).chain(space.snapshots.iter().map(|s| s.1));
            for img in images {
                assert_eq!(img.exclusive_bytes + img.shared_bytes, img.allocated_bytes);
            }
        }
        let listed: usize = model
            .keys()
            .map(|n| pool.list_snapshots(n).unwrap().len())
            .sum();
        assert_eq!(listed, snaps.len());
    }
    relocated += pool.stats().bytes_relocated;
    // Space comes back: delete everything (clones before their parents),
    // clean, and the live data is zero.
    while !model.is_empty() {
        let name = model
            .keys()
            .find(|n| !parents.values().any(|(p, _)| p == *n))
            .expect("the clone graph has no cycles")
            .clone();
        pool.delete_volume(&name).unwrap();
        model.remove(&name);
        parents.remove(&name);
    }
    while pool.clean().unwrap().segments_deleted > 0 {}
    pool.self_check();
    let stats = pool.stats();
    assert_eq!(stats.live_data_bytes, 0);
    assert!(stats.segments <= 2, "{stats:?}");
    relocated
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

#[test]
fn long_fixed_sequence() {
    // A deterministic long run that is sure to roll, checkpoint and clean.
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut ops = vec![Op::Create(0), Op::Create(1)];
    for _ in 0..2000 {
        let v = rng.gen_range(0..2);
        let o = rng.gen_range(0..VOLUME_BLOCKS * 8);
        ops.push(match rng.gen_range(0..27) {
            20 => Op::Snapshot(v, rng.gen_range(0..3)),
            21 => Op::Clone(v, rng.gen_range(0..3), rng.gen_range(0..3)),
            22 => Op::Rollback(v, rng.gen_range(0..3)),
            23 => Op::DeleteSnapshot(v, rng.gen_range(0..3)),
            24 => Op::Flatten(rng.gen_range(0..3)),
            25 => Op::Commit(rng.gen_range(0..3)),
            26 => Op::Diff(v, rng.gen_range(0..3)),
            0 => Op::Clean,
            1 => Op::Flush,
            2 => Op::Trim(v, o, rng.gen_range(1..64)),
            3 => Op::Reopen,
            _ => Op::Write(v, o, rng.gen_range(1..40), rng.r#gen()),
        });
    }
    let relocated = run(ops);
    assert!(relocated > 0, "the cleaner never relocated live data");
}
