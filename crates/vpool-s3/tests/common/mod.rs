//! Shared pieces of the S3 pool tests: a bucket (a directory behind
//! object_store's LocalFileSystem, or the real RGW when the test command
//! started one), the engine on an [`S3Store`], and a write log that checks
//! prefix consistency.

#![allow(dead_code)]

use object_store::ObjectStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use vpool_engine::{Pool, PoolConfig, Volume};
use vpool_s3::faults::{Faults, FaultyStore};
use vpool_s3::{OpenMode, Remote, S3PoolOptions, S3Store};

pub const BLOCK: u64 = 4096;

/// A bucket in a directory, reached through the fault injector.
pub struct Bucket {
    pub dir: PathBuf,
    pub faults: Arc<Faults>,
    store: Arc<dyn ObjectStore>,
}

impl Bucket {
    /// Copies the bucket as it stands into `to`: calls in flight finish
    /// (300 ms), new ones fail meanwhile, so the copy is one moment's
    /// bucket, as a host that died then left it.
    pub fn frozen_copy(&self, to: &Path) {
        use std::sync::atomic::Ordering;
        self.faults.down.store(true, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_millis(300));
        copy_tree(&self.dir, to);
        self.faults.down.store(false, Ordering::SeqCst);
    }

    pub fn new(dir: &Path) -> Bucket {
        std::fs::create_dir_all(dir).unwrap();
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
        let (faulty, faults) = FaultyStore::new(Arc::new(fs));
        Bucket {
            dir: dir.to_path_buf(),
            faults,
            store: faulty,
        }
    }

    pub fn remote(&self) -> Remote {
        let mut r = Remote::new(
            self.store.clone(),
            "pool",
            format!("file://{}", self.dir.display()),
        )
        .unwrap();
        r.policy.attempt_timeout = Duration::from_secs(2);
        r.policy.backoff_max = Duration::from_millis(200);
        r
    }
}

impl Bucket {
    /// The same bucket through a fault injector of its own: a host that
    /// can be cut off (`down`) while the others reach the bucket.
    #[allow(dead_code)]
    pub fn own_remote(&self) -> (Remote, Arc<Faults>) {
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&self.dir).unwrap();
        let (faulty, faults) = FaultyStore::new(Arc::new(fs));
        let mut r = Remote::new(faulty, "pool", format!("file://{}", self.dir.display())).unwrap();
        r.policy.attempt_timeout = Duration::from_secs(2);
        r.policy.backoff_max = Duration::from_millis(200);
        (r, faults)
    }
}

pub fn opts(cache: &Path, cache_size_bytes: u64, mode: OpenMode) -> S3PoolOptions {
    let mut o = S3PoolOptions::new(cache, cache_size_bytes, mode);
    o.seal_after = Duration::from_millis(100);
    o.backpressure_timeout = Duration::from_secs(30);
    o.read_timeout = Duration::from_secs(3);
    o.drain_timeout = Duration::from_secs(30);
    o
}

pub fn engine_config() -> PoolConfig {
    PoolConfig {
        segment_target_bytes: 1 << 20,
        checkpoint_interval_bytes: 4 << 20,
        maintenance_period: Duration::from_millis(20),
        ..PoolConfig::default()
    }
}

pub fn open(remote: Remote, o: S3PoolOptions) -> (Pool, S3Store) {
    let store = S3Store::open(remote, o).expect("open the S3 store");
    let (pool, _) = Pool::open(Arc::new(store.clone()), engine_config()).expect("open the pool");
    store.start().unwrap();
    (pool, store)
}

pub fn close(pool: Pool, store: S3Store) {
    pool.close().unwrap();
    assert!(store.close(), "everything reached the bucket at close");
}

/// The content of block `block` written by write number `index` (1-based):
/// both numbers repeated, so any block of an image tells who wrote it.
pub fn block_data(index: u64, block: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(BLOCK as usize);
    while v.len() < BLOCK as usize {
        v.extend_from_slice(&index.to_le_bytes());
        v.extend_from_slice(&block.to_le_bytes());
    }
    v
}

/// Which write produced this block (0: never written).
pub fn writer_of(data: &[u8], block: u64) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let index = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(
        data,
        &block_data(index, block)[..],
        "block {block} is torn or misplaced"
    );
    index
}

/// Single-block writes, in order: `writes[i]` is the block write `i + 1` hit.
#[derive(Default, Clone)]
pub struct WriteLog {
    pub writes: Vec<u64>,
}

impl WriteLog {
    pub fn write(&mut self, vol: &Volume, block: u64) {
        self.writes.push(block);
        let index = self.writes.len() as u64;
        vol.write(block * BLOCK, &block_data(index, block)).unwrap();
    }

    /// Checks that `vol` holds exactly the state after some prefix of the
    /// log, and returns that prefix's length.
    pub fn check_prefix(&self, vol: &Volume, blocks: u64) -> u64 {
        let mut buf = vec![0u8; BLOCK as usize];
        let mut seen = Vec::with_capacity(blocks as usize);
        for b in 0..blocks {
            vol.read(b * BLOCK, &mut buf).unwrap();
            seen.push(writer_of(&buf, b));
        }
        let k = seen.iter().copied().max().unwrap_or(0);
        assert!(k as usize <= self.writes.len(), "a write from the future");
        let mut expect = vec![0u64; blocks as usize];
        for (i, &b) in self.writes[..k as usize].iter().enumerate() {
            expect[b as usize] = i as u64 + 1;
        }
        for b in 0..blocks as usize {
            assert_eq!(
                seen[b], expect[b],
                "block {b}: the image is not the state after write {k}: not a prefix"
            );
        }
        k
    }
}

/// Disk space the cache's segment files really take.
pub fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().blocks() * 512)
        .sum()
}

/// Copies a directory tree (a frozen bucket).
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
