//! Corruption, full disk, failing device and concurrency, on the real local
//! backend where it matters.

use std::sync::Arc;

use vpool_engine::store::{LocalDirStore, SimStore, StoreError};
use vpool_engine::{EngineError, Pool, PoolConfig};

fn local_pool(dir: &std::path::Path, config: PoolConfig) -> Pool {
    let store = LocalDirStore::open(dir).unwrap();
    Pool::open(Arc::new(store), config).unwrap().0
}

fn segment_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

#[test]
fn flipped_byte_in_a_segment_is_reported_not_returned() {
    let dir = tempfile::tempdir().unwrap();
    let pool = local_pool(dir.path(), PoolConfig::default());
    pool.create_volume("web1", 1 << 20).unwrap();
    let vol = pool.volume("web1").unwrap();
    // Not periodic, so the bytes searched for below occur once.
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let data: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    vol.write(8192, &data).unwrap();
    pool.close().unwrap();
    drop((vol, pool));

    // Find the data in the segment files and flip one bit of it.
    let needle = &data[20000..20064];
    let mut flipped = false;
    for path in segment_files(dir.path()) {
        let mut bytes = std::fs::read(&path).unwrap();
        if let Some(pos) = bytes.windows(needle.len()).position(|w| w == needle) {
            bytes[pos] ^= 0x01;
            std::fs::write(&path, &bytes).unwrap();
            flipped = true;
        }
    }
    assert!(flipped);

    let pool = local_pool(dir.path(), PoolConfig::default());
    let vol = pool.volume("web1").unwrap();
    let mut buf = vec![0u8; data.len()];
    let err = vol.read(8192, &mut buf).unwrap_err();
    match &err {
        EngineError::Corrupt { volume, offset, .. } => {
            assert_eq!(volume, "web1");
            // Byte 20000 of the write lies in block (8192 + 20000) / 4096 = 6.
            assert_eq!(*offset, 6 * 4096);
        }
        other => panic!("expected a corruption error, got {other}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("web1") && msg.contains("seg-"), "{msg}");
    // Blocks untouched by the flip still read fine.
    let mut ok = vec![0u8; 4096];
    vol.read(8192, &mut ok).unwrap();
    assert_eq!(ok, data[..4096]);
}

#[test]
fn second_opener_of_a_local_pool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = LocalDirStore::open(dir.path()).unwrap();
    match LocalDirStore::open(dir.path()) {
        Err(StoreError::Locked { .. }) => {}
        other => panic!("expected Locked, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn full_disk_gives_enospc_and_loses_nothing_acknowledged() {
    let sim = SimStore::new();
    let config = PoolConfig {
        background: false,
        ..PoolConfig::default()
    };
    let (pool, _) = Pool::open(Arc::new(sim.handle()), config.clone()).unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &[1u8; 8192]).unwrap();
    pool.flush().unwrap();
    sim.set_full(true);
    let err = vol.write(8192, &[2u8; 4096]).unwrap_err();
    assert!(err.is_no_space(), "{err}");
    // The pool is full until its maintenance sees space again.
    sim.set_full(false);
    let err = vol.write(8192, &[3u8; 4096]).unwrap_err();
    assert!(matches!(err, EngineError::PoolFull { .. }), "{err}");
    pool.maintenance_step().unwrap();
    vol.write(8192, &[3u8; 4096]).unwrap();
    pool.flush().unwrap();
    let mut buf = vec![0u8; 12288];
    vol.read(0, &mut buf).unwrap();
    assert!(buf[..8192].iter().all(|&b| b == 1));
    assert!(buf[8192..].iter().all(|&b| b == 3));
    // The partial append was cut off cleanly: recovery sees the same.
    drop((vol, pool));
    sim.crash(vpool_engine::store::SimCrashMode::DropUnsynced, 0);
    let (pool, _) = Pool::open(Arc::new(sim.handle()), config).unwrap();
    pool.self_check();
    let mut again = vec![0u8; 12288];
    pool.volume("v").unwrap().read(0, &mut again).unwrap();
    assert_eq!(buf, again);
}

#[test]
fn failed_sync_poisons_writes_but_not_reads() {
    let sim = SimStore::new();
    let config = PoolConfig {
        background: false,
        ..PoolConfig::default()
    };
    let (pool, _) = Pool::open(Arc::new(sim.handle()), config).unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &[5u8; 4096]).unwrap();
    sim.set_down(true);
    assert!(pool.flush().is_err());
    sim.set_down(false);
    // After a failed sync, a later "successful" sync proves nothing.
    assert!(matches!(pool.flush(), Err(EngineError::Failed(_))));
    assert!(matches!(
        vol.write(0, &[6u8; 4096]),
        Err(EngineError::Failed(_))
    ));
    let mut b = vec![0u8; 4096];
    vol.read(0, &mut b).unwrap();
    assert_eq!(b, vec![5u8; 4096]);
}

#[test]
fn concurrent_writers_readers_and_background_cleaner() {
    let dir = tempfile::tempdir().unwrap();
    let config = PoolConfig {
        segment_target_bytes: 256 * 1024,
        checkpoint_interval_bytes: 2 << 20,
        maintenance_period: std::time::Duration::from_millis(5),
        ..PoolConfig::default()
    };
    let pool = local_pool(dir.path(), config.clone());
    pool.create_volume("v", 4 << 20).unwrap();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let vol = pool.volume("v").unwrap();
            std::thread::spawn(move || {
                // Each thread owns a 1 MiB quarter and keeps its own model.
                let base = t << 20;
                let mut model = vec![0u8; 1 << 20];
                let mut x = t + 1;
                for i in 0..3000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = (x % 250) * 4096 + (x % 8) * 512;
                    let len = 512 * (1 + (x >> 20) % 16) as usize;
                    let byte = (i % 251) as u8;
                    let data = vec![byte; len];
                    vol.write(base + off, &data).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    if i % 64 == 0 {
                        vol.flush().unwrap();
                    }
                    if i % 16 == 0 {
                        let mut buf = vec![0u8; 1 << 20];
                        vol.read(base, &mut buf).unwrap();
                        assert!(buf == model, "thread {t} sees wrong data at step {i}");
                    }
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    let stats = pool.stats();
    assert!(
        stats.segments_cleaned > 0,
        "the background cleaner never ran: {stats:?}"
    );
    pool.self_check();
    pool.close().unwrap();
    drop(pool);
    let pool = local_pool(dir.path(), config);
    pool.self_check();
    let vol = pool.volume("v").unwrap();
    for (t, m) in models.iter().enumerate() {
        let mut buf = vec![0u8; 1 << 20];
        vol.read((t as u64) << 20, &mut buf).unwrap();
        assert!(buf == *m, "quarter {t} differs after reopen");
    }
}

#[test]
fn ranges_that_overflow_are_refused_not_panicked_on() {
    let sim = SimStore::new();
    let (pool, _) = Pool::open(Arc::new(sim.handle()), PoolConfig::default()).unwrap();
    pool.create_volume("v", 1 << 20).unwrap();
    let vol = pool.volume("v").unwrap();
    let big = u64::MAX - 100;
    let mut buf = vec![0u8; 4096];
    assert!(matches!(
        vol.read(big, &mut buf),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write(big + 3, &buf),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.trim(big, 4096),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.write_zeroes(big, 4096, true),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.block_status(big, 4096, 10),
        Err(EngineError::OutOfRange { .. })
    ));
    assert!(matches!(
        vol.read(1 << 20, &mut buf),
        Err(EngineError::OutOfRange { .. })
    ));
    pool.close().unwrap();
    assert!(matches!(vol.write(0, &buf), Err(EngineError::Closed)));
}
