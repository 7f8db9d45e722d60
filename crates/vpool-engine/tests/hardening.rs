//! A full device, bit rot in durable data and a damaged checkpoint: the
//! pool must report, keep serving and never delete acknowledged data.
//! Real files (and a small tmpfs) where the file system matters, the
//! simulated store where a fault has to hit an exact moment.

#[path = "common/small_fs.rs"]
mod small_fs;
use small_fs::SmallFs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vpool_engine::store::{LocalDirStore, SimCrashMode, SimStore};
use vpool_engine::{DamageKind, EngineError, Pool, PoolConfig};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Bytes that do not repeat, so a needle searched for occurs once.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn open_local(dir: &Path, config: PoolConfig) -> Pool {
    Pool::open(Arc::new(open_store(dir)), config).unwrap().0
}

/// The store of `dir`, waiting a little while its lock is held: another
/// test of this process that forks (`mount`) copies every descriptor into
/// the child until it execs, the flock on `LOCK` of a pool just closed
/// with them.
fn open_store(dir: &Path) -> LocalDirStore {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match LocalDirStore::open(dir) {
            Err(vpool_store::StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.unwrap(),
        }
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn small_config() -> PoolConfig {
    PoolConfig {
        segment_target_bytes: MIB,
        checkpoint_interval_bytes: 4 * MIB,
        maintenance_period: Duration::from_millis(20),
        ..PoolConfig::default()
    }
}

/// Writes 4 KiB blocks of `vol` from block 0 until the device is full.
/// Returns how many were acknowledged.
fn fill(pool: &Pool, vol: &str, seed: u64) -> u64 {
    let v = pool.volume(vol).unwrap();
    let blocks = v.size_bytes().unwrap() / 4096;
    for b in 0..blocks {
        match v.write(b * 4096, &noise(seed + b, 4096)) {
            Ok(()) => {}
            Err(e) if e.is_no_space() => return b,
            Err(e) => panic!("write {b}: {e}"),
        }
    }
    panic!("the device never filled up");
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Item 1 and 2 of the hardening issue, on a real (tmpfs) file system: a
/// full device is a state the pool leaves by itself, through a restart.
#[test]
fn a_full_device_is_a_state_the_pool_leaves_by_itself() {
    let t = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&t.path().join("fs"), 24) else {
        return;
    };
    let dir = fs.0.join("pool");
    let pool = open_local(&dir, small_config());
    pool.create_volume("big", 64 * MIB).unwrap();
    pool.create_volume("keep", 4 * MIB).unwrap();
    let keep = pool.volume("keep").unwrap();
    keep.write(0, &noise(7, 256 * KIB as usize)).unwrap();
    pool.flush().unwrap();
    let written = fill(&pool, "big", 1000);
    assert!(written > 1000, "only {written} blocks before ENOSPC");
    let stats = pool.stats();
    assert!(stats.full, "{stats:?}");
    // Meanwhile: data writes fail at once, reads, trims and deletes work.
    let err = keep.write(512 * KIB, &[1u8; 4096]).unwrap_err();
    assert!(matches!(err, EngineError::PoolFull { .. }), "{err}");
    let mut buf = vec![0u8; 256 * KIB as usize];
    keep.read(0, &mut buf).unwrap();
    assert_eq!(buf, noise(7, buf.len()));
    keep.trim(128 * KIB, 64 * KIB).unwrap();
    pool.create_snapshot("keep", "s").unwrap();
    pool.delete_snapshot("keep", "s").unwrap();
    pool.delete_volume("big").unwrap();
    // A restart in the full state: the pool opens and frees itself.
    let _ = pool.close();
    drop((keep, pool));
    let pool = open_local(&dir, small_config());
    let keep = pool.volume("keep").unwrap();
    wait_until("writes are accepted again", || {
        keep.write(512 * KIB, &[2u8; 4096]).is_ok()
    });
    // The cleaner takes back what the deleted volume held, by itself.
    wait_until("the deleted volume's space is reclaimed", || {
        let s = pool.stats();
        !s.full && s.reserve_bytes > 0 && s.physical_bytes < 8 * MIB
    });
    // The space really is back: 8 MiB more fit.
    let v = pool.create_volume("again", 8 * MIB).unwrap();
    let again = pool.volume(&v.name).unwrap();
    for b in 0..(8 * MIB / 4096) {
        again.write(b * 4096, &noise(5000 + b, 4096)).unwrap();
    }
    pool.flush().unwrap();
    pool.close().unwrap();
    drop((keep, again, pool));
    for f in segment_files(&dir) {
        let len = std::fs::metadata(&f).unwrap().len();
        assert!(
            len >= 64,
            "{} is {len} bytes: a segment without a header",
            f.display()
        );
    }
    let pool = open_local(&dir, small_config());
    pool.self_check();
    let mut first = vec![0u8; 128 * KIB as usize];
    pool.volume("keep").unwrap().read(0, &mut first).unwrap();
    assert_eq!(first, noise(7, 256 * KIB as usize)[..first.len()]);
    let mut b = vec![0u8; 4096];
    pool.volume("again")
        .unwrap()
        .read(4096 * 100, &mut b)
        .unwrap();
    assert_eq!(b, noise(5100, 4096));
    pool.close().unwrap();
    drop(pool);
    drop(fs);
}

/// Item 1, at the exact moment: the device fills up between creating the
/// next segment and writing its header.
#[test]
fn enospc_while_rolling_to_a_new_segment_does_not_wedge_the_pool() {
    let sim = SimStore::new();
    let config = PoolConfig {
        segment_target_bytes: 64 * KIB,
        background: false,
        ..PoolConfig::default()
    };
    let (pool, _) = Pool::open(Arc::new(sim.handle()), config.clone()).unwrap();
    pool.create_volume("v", MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    // 16 blocks fill the 64 KiB segment: the next write rolls.
    for b in 0..16 {
        vol.write(b * 4096, &noise(b, 4096)).unwrap();
    }
    pool.flush().unwrap();
    let segments = sim.segment_images().len();
    sim.set_capacity(Some(sim.used_bytes()));
    let err = vol.write(16 * 4096, &noise(16, 4096)).unwrap_err();
    assert!(err.is_no_space(), "{err}");
    assert_eq!(
        sim.segment_images().len(),
        segments + 1,
        "the roll created its segment before failing"
    );
    // Deletes and trims still work; data writes wait for space.
    vol.trim(0, 4096).unwrap();
    sim.set_capacity(None);
    pool.maintenance_step().unwrap();
    for b in 16..40 {
        vol.write(b * 4096, &noise(b, 4096)).unwrap();
    }
    pool.flush().unwrap();
    assert!(
        sim.segment_images().iter().all(|(_, img)| img.len() >= 64),
        "a segment without a header was left behind"
    );
    drop((vol, pool));
    sim.crash(SimCrashMode::DropUnsynced, 1);
    let (pool, report) = Pool::open(Arc::new(sim.handle()), config).unwrap();
    assert_eq!(report.torn_tail_bytes, 0, "{report:?}");
    pool.self_check();
    let vol = pool.volume("v").unwrap();
    let mut b = vec![0u8; 4096];
    for blk in 1..40 {
        vol.read(blk * 4096, &mut b).unwrap();
        assert_eq!(b, noise(blk, 4096), "block {blk}");
    }
}

/// A pool written through five segments with durable marks, left without
/// a final checkpoint (as after a crash), so that recovery replays them.
/// Returns the data written (block b of the volume is `noise(b)`).
fn written_through_segments(dir: &Path, blocks: u64) -> PoolConfig {
    let config = PoolConfig {
        segment_target_bytes: MIB,
        checkpoint_interval_bytes: 1 << 40,
        background: false,
        ..PoolConfig::default()
    };
    let pool = open_local(dir, config.clone());
    pool.create_volume("v", blocks * 4096).unwrap();
    let vol = pool.volume("v").unwrap();
    for chunk in 0..blocks / 16 {
        let data: Vec<u8> = (0..16).flat_map(|i| noise(chunk * 16 + i, 4096)).collect();
        vol.write(chunk * 16 * 4096, &data).unwrap();
        // The maintenance thread's work, by hand: sync, then a mark.
        pool.maintenance_step().unwrap();
    }
    pool.flush().unwrap();
    pool.maintenance_step().unwrap();
    drop((vol, pool));
    config
}

fn flip(path: &Path, at: usize, len: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    for b in &mut bytes[at..at + len] {
        *b ^= 0x5a;
    }
    std::fs::write(path, &bytes).unwrap();
}

/// Item 3: 16 bytes flipped in the data of the second of five sealed
/// segments after the checkpoint position. Recovery used to take it for
/// a torn tail and delete everything after it.
#[test]
fn a_flipped_block_in_durable_data_is_reported_and_nothing_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 1280; // 5 MiB: five 1 MiB segments
    let config = written_through_segments(dir.path(), blocks);
    let files = segment_files(dir.path());
    assert!(files.len() >= 5, "{files:?}");
    // Block 300 lies in the second segment; find it and damage it.
    let needle = noise(300, 4096);
    let seg2 = std::fs::read(&files[1]).unwrap();
    let at = seg2
        .windows(64)
        .position(|w| w == &needle[..64])
        .expect("block 300 is in the second segment");
    flip(&files[1], at + 1000, 16);

    let store = open_store(dir.path());
    let (pool, report) = Pool::open(Arc::new(store), config).unwrap();
    assert_eq!(report.torn_tail_bytes, 0, "{report:?}");
    assert_eq!(report.segments_discarded, 0, "{report:?}");
    assert!(
        report
            .damage
            .iter()
            .any(|d| matches!(&d.kind, DamageKind::BadBlocks { bad, .. } if bad.len() == 1)),
        "{report:?}"
    );
    pool.self_check();
    let ranges = pool.damaged_ranges();
    assert_eq!(ranges.len(), 1, "{ranges:?}");
    assert_eq!(
        (ranges[0].image.as_str(), ranges[0].offset_bytes),
        ("v", 300 * 4096)
    );
    let vol = pool.volume("v").unwrap();
    let mut b = vec![0u8; 4096];
    for blk in 0..blocks {
        match vol.read(blk * 4096, &mut b) {
            Ok(()) => assert_eq!(b, noise(blk, 4096), "block {blk}"),
            Err(EngineError::Corrupt { offset, .. }) => assert_eq!(offset, 300 * 4096),
            Err(e) => panic!("block {blk}: {e}"),
        }
    }
    // An overwrite heals the range.
    vol.write(300 * 4096, &noise(300, 4096)).unwrap();
    vol.read(300 * 4096, &mut b).unwrap();
    assert_eq!(b, noise(300, 4096));
}

/// Item 3, worse: a record header is damaged, so the records it carried
/// cannot be attributed. The pool refuses to open and changes nothing;
/// opened with repair, it steps over the loss and keeps everything else.
#[test]
fn a_damaged_record_header_refuses_the_open_until_repair_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 1280;
    let config = written_through_segments(dir.path(), blocks);
    let files = segment_files(dir.path());
    // The third segment's first record header.
    flip(&files[2], 64 + 20, 8);
    let before: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();

    let store = open_store(dir.path());
    let err = Pool::open(Arc::new(store), config.clone()).err().unwrap();
    let EngineError::Damaged(report) = &err else {
        panic!("expected Damaged, got {err}");
    };
    assert!(report.needs_repair(), "{report:?}");
    assert!(err.to_string().contains("seg-"), "{err}");
    let after: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    assert!(before == after, "a refused open changed segment files");
    assert_eq!(
        segment_files(dir.path()),
        files,
        "a refused open deleted segments"
    );

    let store = open_store(dir.path());
    let repair = PoolConfig {
        repair_damaged_log: true,
        ..config.clone()
    };
    let (pool, report) = Pool::open(Arc::new(store), repair).unwrap();
    assert!(report.repaired, "{report:?}");
    let lost = report
        .damage
        .iter()
        .find_map(|d| match &d.kind {
            DamageKind::LostRecords { count, .. } => *count,
            _ => None,
        })
        .expect("the loss is reported");
    assert_eq!(lost, 1, "one record was lost: {report:?}");
    pool.self_check();
    // One write record of 16 blocks is gone; every other block is intact.
    let vol = pool.volume("v").unwrap();
    let mut b = vec![0u8; 4096];
    let mut bad = 0;
    for blk in 0..blocks {
        vol.read(blk * 4096, &mut b).unwrap();
        if b != noise(blk, 4096) {
            assert_eq!(
                b,
                vec![0u8; 4096],
                "block {blk} holds neither its data nor zeros"
            );
            bad += 1;
        }
    }
    assert_eq!(bad, 16);
    // The check finds the unreadable bytes; its repair moves what is live
    // out of that segment and deletes it, and the next check is clean.
    let no = std::sync::atomic::AtomicBool::new(false);
    let found = pool.check(false, &no).unwrap();
    assert_eq!(found.bad_records.len(), 1, "{found:?}");
    let repaired = pool.check(true, &no).unwrap();
    assert_eq!(repaired.evacuated.len(), 1, "{repaired:?}");
    let again = pool.check(false, &no).unwrap();
    assert!(again.clean(), "{again:?}");
    for blk in 0..blocks {
        vol.read(blk * 4096, &mut b).unwrap();
        assert!(b == noise(blk, 4096) || b == vec![0u8; 4096], "block {blk}");
    }
    pool.self_check();
    pool.close().unwrap();
    drop((vol, pool));
    // Repaired for good: a plain open works now.
    open_local(dir.path(), config).self_check();
}

/// Item 4: the newest checkpoint copy is damaged: recovery uses the other
/// one, even after the cleaner deleted segments between the two.
#[test]
fn a_damaged_checkpoint_falls_back_to_the_other_copy() {
    let dir = tempfile::tempdir().unwrap();
    let config = PoolConfig {
        segment_target_bytes: 64 * KIB,
        checkpoint_interval_bytes: 1 << 40,
        background: false,
        ..PoolConfig::default()
    };
    let pool = open_local(dir.path(), config.clone());
    pool.create_volume("v", MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut model = vec![0u8; MIB as usize];
    for round in 0..6u64 {
        for b in 0..64u64 {
            let data = noise(round * 1000 + b, 4096);
            vol.write(b * 4096, &data).unwrap();
            model[(b * 4096) as usize..][..4096].copy_from_slice(&data);
        }
        if round == 3 {
            pool.flush().unwrap();
            let report = pool.clean().unwrap();
            assert!(report.segments_deleted > 0, "{report:?}");
        }
    }
    pool.close().unwrap();
    drop((vol, pool));
    let newest = ["checkpoint", "checkpoint.2"]
        .iter()
        .map(|n| dir.path().join("meta").join(n))
        .max_by_key(|p| {
            let bytes = std::fs::read(p).unwrap();
            vpool_engine::checkpoint::Checkpoint::decode(&bytes)
                .unwrap()
                .next_seq
        })
        .unwrap();
    flip(&newest, 40, 1);
    let store = open_store(dir.path());
    let (pool, report) = Pool::open(Arc::new(store), config.clone()).unwrap();
    assert_eq!(report.checkpoints_rejected.len(), 1, "{report:?}");
    pool.self_check();
    let mut buf = vec![0u8; MIB as usize];
    pool.volume("v").unwrap().read(0, &mut buf).unwrap();
    assert!(buf == model, "the volume differs after the fallback");
    pool.close().unwrap();
    drop(pool);

    // Both copies damaged: a clear error, the cause named once.
    for n in ["checkpoint", "checkpoint.2"] {
        flip(&dir.path().join("meta").join(n), 40, 1);
    }
    let store = open_store(dir.path());
    let err = Pool::open(Arc::new(store), config).err().unwrap();
    assert!(matches!(err, EngineError::CorruptMeta { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("checkpoint.2") && msg.contains("checksum"),
        "{msg}"
    );
    assert_eq!(msg.matches("checksum").count(), 2, "{msg}");
}

/// The cleaner meets a segment with a damaged live block: it leaves the
/// segment alone instead of failing every pass (or copying the damage).
#[test]
fn the_cleaner_cleans_around_a_damaged_segment() {
    let sim = SimStore::new();
    let config = PoolConfig {
        segment_target_bytes: 64 * KIB,
        clean_below_live_fraction: 0.9,
        background: false,
        ..PoolConfig::default()
    };
    let (pool, _) = Pool::open(Arc::new(sim.handle()), config).unwrap();
    pool.create_volume("v", MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    for b in 0..64 {
        vol.write(b * 4096, &noise(b, 4096)).unwrap();
    }
    // Overwrite half, so the first segments are cleaner victims.
    for b in (0..64).step_by(2) {
        vol.write(b * 4096, &noise(b + 500, 4096)).unwrap();
    }
    pool.flush().unwrap();
    // Damage block 1 (still live) where it is stored.
    let (seg, img) = sim
        .segment_images()
        .into_iter()
        .find(|(_, img)| img.windows(64).any(|w| w == &noise(1, 4096)[..64]))
        .unwrap();
    let at = img
        .windows(64)
        .position(|w| w == &noise(1, 4096)[..64])
        .unwrap();
    sim.corrupt(seg, (at + 100) as u64);
    for _ in 0..3 {
        pool.clean().unwrap();
    }
    pool.self_check();
    let mut b = vec![0u8; 4096];
    assert!(matches!(
        vol.read(4096, &mut b),
        Err(EngineError::Corrupt { .. })
    ));
    for blk in (2..64).step_by(2) {
        vol.read(blk * 4096, &mut b).unwrap();
        assert_eq!(b, noise(blk + 500, 4096));
    }
    assert!(
        sim.segment_images().iter().any(|(id, _)| *id == seg),
        "the damaged segment was deleted"
    );
}

/// A full device given more room (a bigger file system): the pool takes
/// writes again by itself, nothing deleted, no restart.
#[test]
fn a_full_device_that_grows_takes_writes_again() {
    let t = tempfile::tempdir().unwrap();
    let Some(fs) = SmallFs::mount(&t.path().join("fs"), 16) else {
        return;
    };
    let dir = fs.0.join("pool");
    let pool = open_local(&dir, small_config());
    pool.create_volume("v", 64 * MIB).unwrap();
    let written = fill(&pool, "v", 9);
    assert!(pool.stats().full);
    let grown = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&fs.0)
        .status()
        .unwrap();
    assert!(grown.success());
    let vol = pool.volume("v").unwrap();
    wait_until("writes are accepted again", || {
        vol.write(written * 4096, &noise(9 + written, 4096)).is_ok()
    });
    for b in written + 1..written + 1000 {
        vol.write(b * 4096, &noise(9 + b, 4096)).unwrap();
    }
    pool.flush().unwrap();
    let mut buf = vec![0u8; 4096];
    for b in (0..written + 1000).step_by(97) {
        vol.read(b * 4096, &mut buf).unwrap();
        assert_eq!(buf, noise(9 + b, 4096), "block {b}");
    }
    pool.close().unwrap();
    drop((vol, pool));
    drop(fs);
}
