//! Snapshots and clones at scale: many snapshots of one volume, a deep
//! clone chain, and space coming back when they are deleted.

use std::sync::Arc;

use vpool_engine::store::LocalDirStore;
use vpool_engine::{BLOCK_SIZE, Pool, PoolConfig};

fn open(dir: &std::path::Path) -> Pool {
    let config = PoolConfig {
        segment_target_bytes: 1 << 20,
        background: false,
        ..PoolConfig::default()
    };
    Pool::open(Arc::new(LocalDirStore::open(dir).unwrap()), config)
        .unwrap()
        .0
}

fn block(tag: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    for (i, chunk) in b.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(tag ^ (i as u64) << 40).to_le_bytes());
    }
    b
}

#[test]
fn a_thousand_snapshots_of_one_volume() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path());
    pool.create_volume("v", 64 * BLOCK_SIZE).unwrap();
    let vol = pool.volume("v").unwrap();
    for i in 0..1000u64 {
        vol.write((i % 64) * BLOCK_SIZE, &block(i)).unwrap();
        pool.create_snapshot("v", &format!("s{i}")).unwrap();
    }
    let check = |pool: &Pool| {
        assert_eq!(pool.list_snapshots("v").unwrap().len(), 1000);
        for i in (0..1000u64).step_by(37) {
            let snap = pool.snapshot("v", &format!("s{i}")).unwrap();
            let mut buf = vec![0u8; BLOCK_SIZE as usize];
            // The block written just before snapshot i holds write i.
            snap.read((i % 64) * BLOCK_SIZE, &mut buf).unwrap();
            assert_eq!(buf, block(i), "snapshot s{i}");
            // And a block written later still holds what it had then.
            if i >= 64 {
                snap.read(((i + 1) % 64) * BLOCK_SIZE, &mut buf).unwrap();
                assert_eq!(buf, block(i + 1 - 64), "snapshot s{i}, next block");
            }
        }
        pool.self_check();
    };
    check(&pool);
    pool.close().unwrap();
    drop((vol, pool));
    let pool = open(dir.path());
    check(&pool);
    // Deleting them all gives the space back to the cleaner.
    for i in 0..1000u64 {
        pool.delete_snapshot("v", &format!("s{i}")).unwrap();
    }
    while pool.clean().unwrap().segments_deleted > 0 {}
    pool.self_check();
    let stats = pool.stats();
    assert_eq!(stats.live_data_bytes, 64 * BLOCK_SIZE, "{stats:?}");
}

#[test]
fn a_clone_chain_a_hundred_deep() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path());
    pool.create_volume("c0", 128 * BLOCK_SIZE).unwrap();
    pool.volume("c0").unwrap().write(0, &block(1000)).unwrap();
    for i in 0..100u64 {
        let (from, to) = (format!("c{i}"), format!("c{}", i + 1));
        pool.volume(&from)
            .unwrap()
            .write((i + 1) * BLOCK_SIZE, &block(i))
            .unwrap();
        pool.create_snapshot(&from, "base").unwrap();
        pool.clone_volume(&from, "base", &to).unwrap();
    }
    let check = |pool: &Pool| {
        let last = pool.volume("c100").unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE as usize];
        last.read(0, &mut buf).unwrap();
        assert_eq!(buf, block(1000));
        for i in 0..100u64 {
            last.read((i + 1) * BLOCK_SIZE, &mut buf).unwrap();
            assert_eq!(buf, block(i), "block {} of the deepest clone", i + 1);
        }
        // The clone stores nothing of its own until written.
        assert_eq!(
            pool.volume_info("c100").unwrap().allocated_bytes,
            101 * BLOCK_SIZE
        );
        pool.self_check();
    };
    check(&pool);
    // Parents cannot go while clones depend on them.
    let err = pool.delete_snapshot("c50", "base").unwrap_err().to_string();
    assert!(err.contains("c51"), "{err}");
    assert!(pool.delete_volume("c50").is_err());
    pool.close().unwrap();
    drop(pool);
    let pool = open(dir.path());
    check(&pool);
    // Writing to a clone does not change its parent.
    pool.volume("c100").unwrap().write(0, &block(7)).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    pool.volume("c99").unwrap().read(0, &mut buf).unwrap();
    assert_eq!(buf, block(1000));
    // Delete from the deepest up; space comes back.
    for i in (0..=100u64).rev() {
        pool.delete_volume(&format!("c{i}")).unwrap();
    }
    while pool.clean().unwrap().segments_deleted > 0 {}
    pool.self_check();
    assert_eq!(pool.stats().live_data_bytes, 0);
}

#[test]
fn rollback_is_instant_and_keeps_later_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path());
    pool.create_volume("v", 1 << 20).unwrap();
    let vol = pool.volume("v").unwrap();
    vol.write(0, &block(1)).unwrap();
    pool.create_snapshot("v", "a").unwrap();
    vol.write(0, &block(2)).unwrap();
    pool.resize_volume("v", 2 << 20, false).unwrap();
    pool.create_snapshot("v", "b").unwrap();
    pool.rollback("v", "a").unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    vol.read(0, &mut buf).unwrap();
    assert_eq!(buf, block(1));
    assert_eq!(
        vol.size_bytes().unwrap(),
        1 << 20,
        "rollback restores the size"
    );
    pool.rollback("v", "b").unwrap();
    vol.read(0, &mut buf).unwrap();
    assert_eq!(buf, block(2));
    assert!(pool.snapshot("v", "b").unwrap().write(0, &buf).is_err());
    pool.self_check();
}

#[test]
fn ephemeral_volumes_go_at_reopen_and_commit_merges_a_clone() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path());
    pool.create_volume_with(
        "scratch",
        1 << 20,
        vpool_engine::VolumeOptions { ephemeral: true },
    )
    .unwrap();
    assert!(pool.volume_info("scratch").unwrap().ephemeral);
    pool.create_volume("base", 1 << 20).unwrap();
    pool.volume("base").unwrap().write(0, &block(1)).unwrap();
    pool.create_snapshot("base", "s").unwrap();
    let info = pool.clone_volume("base", "s", "overlay").unwrap();
    assert_eq!(info.parent.as_deref(), Some("base@s"));
    pool.volume("overlay")
        .unwrap()
        .write(4096, &block(2))
        .unwrap();
    // Commit: the parent takes the overlay's content, atomically.
    pool.commit("overlay").unwrap();
    let mut buf = vec![0u8; 8192];
    pool.volume("base").unwrap().read(0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &block(1)[..]);
    assert_eq!(&buf[4096..], &block(2)[..]);
    // The snapshot the overlay came from is untouched.
    pool.snapshot("base", "s")
        .unwrap()
        .read(4096, &mut buf[..4096])
        .unwrap();
    assert_eq!(&buf[..4096], &[0u8; 4096][..]);
    // Flatten detaches; then the parent snapshot may go.
    assert!(pool.delete_snapshot("base", "s").is_err());
    assert!(pool.flatten("overlay").unwrap().parent.is_none());
    pool.delete_snapshot("base", "s").unwrap();
    assert!(pool.flatten("base").is_err(), "not a clone");
    pool.self_check();
    pool.close().unwrap();
    drop(pool);
    let pool = open(dir.path());
    assert!(
        pool.volume_info("scratch").is_err(),
        "ephemeral volume survived a reopen"
    );
    pool.volume("overlay")
        .unwrap()
        .read(4096, &mut buf[..4096])
        .unwrap();
    assert_eq!(&buf[..4096], &block(2)[..]);
    pool.self_check();
}

#[test]
fn exclusive_and_shared_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path());
    pool.create_volume("v", 1 << 20).unwrap();
    let vol = pool.volume("v").unwrap();
    for i in 0..4 {
        vol.write(i * BLOCK_SIZE, &block(i)).unwrap();
    }
    let b = BLOCK_SIZE;
    let space = |pool: &Pool| pool.volume_space("v").unwrap();
    let s = space(&pool);
    assert_eq!(
        (
            s.volume.allocated_bytes,
            s.volume.exclusive_bytes,
            s.volume.shared_bytes
        ),
        (4 * b, 4 * b, 0)
    );
    pool.create_snapshot("v", "s1").unwrap();
    let s = space(&pool);
    assert_eq!(
        (s.volume.exclusive_bytes, s.volume.shared_bytes),
        (0, 4 * b)
    );
    assert_eq!(s.snapshots[0].0, "s1");
    assert_eq!(
        (
            s.snapshots[0].1.exclusive_bytes,
            s.snapshots[0].1.shared_bytes
        ),
        (0, 4 * b)
    );
    vol.write(0, &block(9)).unwrap();
    let s = space(&pool);
    assert_eq!(
        (s.volume.exclusive_bytes, s.volume.shared_bytes),
        (b, 3 * b)
    );
    assert_eq!(
        (
            s.snapshots[0].1.exclusive_bytes,
            s.snapshots[0].1.shared_bytes
        ),
        (b, 3 * b)
    );
    // A clone shares the snapshot's copy of block 0.
    pool.clone_volume("v", "s1", "c").unwrap();
    let s = space(&pool);
    assert_eq!(
        (
            s.snapshots[0].1.exclusive_bytes,
            s.snapshots[0].1.shared_bytes
        ),
        (0, 4 * b)
    );
    let c = pool.volume_space("c").unwrap();
    assert_eq!(
        (c.volume.exclusive_bytes, c.volume.shared_bytes),
        (0, 4 * b)
    );
}

/// Space accounting is work a client asks for and may walk away from: it
/// stops when told to, and when the pool closes, instead of running on.
#[test]
fn space_accounting_stops_when_cancelled_or_closing() {
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path());
    pool.create_volume("v", 64 << 20).unwrap();
    let vol = pool.volume("v").unwrap();
    // Every other block: one extent each, thousands of pieces to walk.
    for i in (0..8192).step_by(2) {
        vol.write(i * BLOCK_SIZE, &block(i)).unwrap();
    }
    let cancelled = AtomicBool::new(true);
    assert!(matches!(
        pool.volume_space_until("v", &cancelled),
        Err(vpool_engine::EngineError::Cancelled(_))
    ));
    let go_on = AtomicBool::new(false);
    let s = pool.volume_space_until("v", &go_on).unwrap();
    assert_eq!(s.volume.exclusive_bytes, 4096 * BLOCK_SIZE);
    pool.close().unwrap();
    assert!(matches!(
        pool.volume_space_until("v", &go_on),
        Err(vpool_engine::EngineError::Cancelled(_))
    ));
    assert!(matches!(
        pool.check(false, &go_on),
        Err(vpool_engine::EngineError::Cancelled(_))
    ));
}
