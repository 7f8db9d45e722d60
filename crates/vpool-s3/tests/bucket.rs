//! The S3 pool end to end on a directory bucket (object_store's
//! LocalFileSystem, which does create-only PUTs atomically), with faults
//! injected by [`vpool_s3::faults::FaultyStore`]. The same properties are
//! checked against a real Ceph RGW in `rgw.rs`.

#[path = "../../vpool-engine/tests/common/small_fs.rs"]
mod small_fs;
use small_fs::SmallFs;

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vpool_s3::{Durability, OpenError, OpenMode, S3Store};
use vpool_store::StoreError;

const MIB: u64 = 1 << 20;

fn create() -> OpenMode {
    OpenMode::Create {
        allow_unsafe_fencing: false,
    }
}

fn open_mode(force: bool) -> OpenMode {
    OpenMode::Open { force }
}

/// A new pool in `bucket` (cache `t/c1`) with volume `v` of `blocks`
/// blocks and `writes` random writes to it (from `seed`), flushed.
fn written_pool(
    t: &std::path::Path,
    bucket: &Bucket,
    blocks: u64,
    writes: usize,
    seed: u64,
) -> (vpool_engine::Pool, S3Store, vpool_engine::Volume, WriteLog) {
    let (pool, store) = open(bucket.remote(), opts(&t.join("c1"), 64 * MIB, create()));
    pool.create_volume("v", blocks * BLOCK).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..writes {
        log.write(&vol, rng.gen_range(0..blocks));
    }
    pool.flush().unwrap();
    (pool, store, vol, log)
}

#[test]
fn data_survives_the_loss_of_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store, vol, log) = written_pool(t.path(), &bucket, 4096, 1500, 1);
    let k = log.check_prefix(&vol, 4096);
    assert_eq!(k, 1500);
    close(pool, store);

    // A new host with an empty cache: everything comes from the bucket.
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c2"), 64 * MIB, open_mode(false)),
    );
    let vol = pool.volume("v").unwrap();
    assert_eq!(
        log.check_prefix(&vol, 4096),
        1500,
        "a cleanly closed pool is whole in the bucket"
    );
    let s = store.stats();
    assert!(s.bytes_fetched > 0 && s.read_misses > 0, "{s:?}");
    close(pool, store);
}

#[test]
fn the_bucket_is_always_a_prefix_of_the_history() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c1"), 256 * MIB, create()),
    );
    let blocks = 1024; // 4 MiB: lots of overwrites, so the cleaner deletes segments
    pool.create_volume("v", blocks * BLOCK).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut frozen = Vec::new();
    for round in 0..6 {
        for i in 0..1500 {
            log.write(&vol, rng.gen_range(0..blocks));
            if i % 64 == 0 {
                pool.flush().unwrap();
            }
        }
        let copy = t.path().join(format!("frozen{round}"));
        bucket.frozen_copy(&copy);
        frozen.push(copy);
    }
    pool.flush().unwrap();
    // Uploads the freezes failed retry with a backoff: on a loaded machine
    // (CI) the last ones take a while.
    assert!(store.wait_uploaded(Duration::from_secs(120)));
    let stats = pool.stats();
    assert!(stats.segments_cleaned > 0, "the cleaner ran: {stats:?}");
    let mut ks = Vec::new();
    for (i, copy) in frozen.iter().enumerate() {
        // Each frozen bucket, opened by a new host (the old one "died").
        let b = Bucket::new(copy);
        let (p, s) = open(
            b.remote(),
            opts(&t.path().join(format!("cc{i}")), 64 * MIB, open_mode(true)),
        );
        ks.push(log.check_prefix(&p.volume("v").unwrap(), blocks));
        p.close().unwrap();
        s.close();
    }
    eprintln!(
        "prefixes recovered from the frozen buckets: {ks:?} of {}",
        log.writes.len()
    );
    assert!(
        ks.last().copied().unwrap_or(0) > 0,
        "uploads happened during the run"
    );
    close(pool, store);
}

/// A checkpoint taken while the open segment holds nothing but its header
/// (an idle pool: the last data was sealed and shipped) is committed
/// without waiting for more writes, and a new host recovers from it. (It
/// used to wait for the open segment to be sealed, which needs data: an
/// idle pool's last checkpoint, and the deletions queued behind it, stayed
/// out of the bucket until the next write.)
#[test]
fn an_idle_pool_s_checkpoint_reaches_the_bucket() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store, _vol, log) = written_pool(t.path(), &bucket, 256, 300, 3);
    assert!(store.wait_uploaded(Duration::from_secs(30)));
    // Idle: the seal after `seal_after` and its durable mark settle.
    std::thread::sleep(Duration::from_millis(600));
    assert!(store.wait_uploaded(Duration::from_secs(30)));
    let generation = store.stats().generation;
    pool.checkpoint().unwrap();
    assert!(
        store.wait_uploaded(Duration::from_secs(10)),
        "the checkpoint was committed: {:?}",
        store.stats()
    );
    assert!(store.stats().generation > generation, "{:?}", store.stats());
    let copy = t.path().join("frozen");
    bucket.frozen_copy(&copy);
    let b = Bucket::new(&copy);
    let s = S3Store::open(
        b.remote(),
        opts(&t.path().join("c2"), 64 * MIB, open_mode(true)),
    )
    .unwrap();
    let (p, report) =
        vpool_engine::Pool::open(std::sync::Arc::new(s.clone()), engine_config()).unwrap();
    assert!(
        report.checkpoints_rejected.is_empty() && report.checkpoint_loaded,
        "{report:?}"
    );
    assert_eq!(log.check_prefix(&p.volume("v").unwrap(), 256), 300);
    p.close().unwrap();
    s.close();
    close(pool, store);
}

/// A pool sealed by its release (a shared pool's template) opens
/// read-only only: a writer's open is refused, forced too, and a reader
/// sees everything the sealing host wrote.
#[test]
fn a_sealed_pool_opens_read_only_only() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store, vol, log) = written_pool(t.path(), &bucket, 256, 200, 5);
    store.seal_at_close();
    drop(vol);
    close(pool, store);
    for force in [false, true] {
        match S3Store::open(
            bucket.remote(),
            opts(&t.path().join("w"), 64 * MIB, open_mode(force)),
        ) {
            Err(OpenError::Sealed { .. }) => {}
            other => panic!("a sealed pool opened for writing: {:?}", other.map(|_| ())),
        }
    }
    let (p, s) = open_read_only(bucket.remote(), &t.path().join("r"));
    assert_eq!(log.check_prefix(&p.volume("v").unwrap(), 256), 200);
    let _ = p.close();
    assert!(s.close());
}

/// Stores on one host budget (the families of a shared pool that a host
/// owns) get equal shares of it: the one that filled the whole budget
/// before the other opened gives back its clean bytes at once, and reads
/// them again from the bucket; when the other closes, it has the whole
/// budget again.
#[test]
fn stores_on_one_budget_share_it() {
    let t = tempfile::tempdir().unwrap();
    let budget = vpool_s3::CacheBudget::new(64 * MIB, 8 * MIB);
    let on_budget = |dir: &str, mode| {
        let mut o = opts(&t.path().join(dir), 64 * MIB, mode);
        o.budget = Some(budget.clone());
        o
    };
    let (bucket_a, bucket_b) = (
        Bucket::new(&t.path().join("a")),
        Bucket::new(&t.path().join("b")),
    );
    let (pool_a, store_a) = open(bucket_a.remote(), on_budget("ca", create()));
    assert_eq!(store_a.stats().cache_size_bytes, 64 * MIB);
    let blocks = 40 * MIB / BLOCK;
    pool_a.create_volume("v", blocks * BLOCK).unwrap();
    let vol = pool_a.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..blocks {
        log.write(&vol, b);
    }
    pool_a.flush().unwrap();
    assert!(store_a.wait_uploaded(Duration::from_secs(60)));
    let filled = store_a.stats();
    assert!(filled.cached_bytes > 32 * MIB, "{filled:?}");

    let (pool_b, store_b) = open(bucket_b.remote(), on_budget("cb", create()));
    assert_eq!(budget.members(), 2);
    let (a, b) = (store_a.stats(), store_b.stats());
    assert_eq!(
        (a.cache_size_bytes, b.cache_size_bytes),
        (32 * MIB, 32 * MIB)
    );
    assert!(
        a.cached_bytes + a.dirty_bytes <= 32 * MIB,
        "A gave back what is over its share: {a:?}"
    );
    assert_eq!(log.check_prefix(&vol, blocks), blocks);
    assert!(
        store_a.stats().bytes_fetched > 0,
        "read back from the bucket"
    );

    close(pool_b, store_b);
    assert_eq!(budget.members(), 1);
    assert_eq!(store_a.stats().cache_size_bytes, 64 * MIB);
    close(pool_a, store_a);
    assert_eq!(budget.members(), 0);
}

/// A read-only view of the pool at `remote`, its cache in `cache`: the
/// store and an engine that runs no maintenance, as a daemon opens one.
fn open_read_only(
    remote: vpool_s3::Remote,
    cache: &std::path::Path,
) -> (vpool_engine::Pool, S3Store) {
    let s = S3Store::open(remote, opts(cache, 64 * MIB, OpenMode::ReadOnly)).unwrap();
    let config = vpool_engine::PoolConfig {
        background: false,
        ..engine_config()
    };
    let (p, _) = vpool_engine::Pool::open(std::sync::Arc::new(s.clone()), config).unwrap();
    s.start().unwrap();
    (p, s)
}

/// Every file under `dir`, relative, sorted: what a bucket directory holds.
fn listing(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A pool nobody holds (its owner released it: a sealed template's
/// family) is read by several hosts at once, read-only: no lease, nothing
/// written to the bucket, writes refused. A held pool is refused, and a
/// writer opens the pool afterwards as if nobody had read it.
#[test]
fn a_released_pool_is_read_by_many_hosts_at_once() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store, vol, log) = written_pool(t.path(), &bucket, 256, 400, 4);
    let r0 = opts(&t.path().join("r0"), 64 * MIB, OpenMode::ReadOnly);
    match S3Store::open(bucket.remote(), r0) {
        Err(OpenError::Held { .. }) => {}
        other => panic!("a held pool opened read-only: {:?}", other.map(|_| ())),
    }
    drop(vol);
    close(pool, store);

    let before = listing(&bucket.dir);
    let readers: Vec<_> = ["r1", "r2"]
        .iter()
        .map(|dir| open_read_only(bucket.remote(), &t.path().join(dir)))
        .collect();
    for (p, s) in &readers {
        let v = p.volume("v").unwrap();
        assert_eq!(log.check_prefix(&v, 256), 400);
        assert!(v.write(0, &block_data(9, 0)).is_err(), "a write was taken");
        assert!(s.stats().bytes_fetched > 0, "read from the bucket");
    }
    for (p, s) in readers {
        let _ = p.close();
        assert!(s.close());
    }
    assert_eq!(
        listing(&bucket.dir),
        before,
        "the readers wrote to the bucket"
    );

    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c1"), 64 * MIB, open_mode(false)),
    );
    assert_eq!(log.check_prefix(&pool.volume("v").unwrap(), 256), 400);
    close(pool, store);
}

/// Options of a pool with remote durability whose segments are sealed
/// after `seal_after_ms` (the journal carries what is not uploaded).
fn remote_opts(
    cache: &std::path::Path,
    mode: OpenMode,
    seal_after_ms: u64,
) -> vpool_s3::S3PoolOptions {
    let mut o = opts(cache, 256 * MIB, mode);
    o.durability = Durability::Remote;
    o.seal_after = Duration::from_millis(seal_after_ms);
    o
}

/// A release (the first half of a handover) crashed at every step: the
/// bucket as the owner left it after each number of its calls (from one
/// to all of them), opened by a new host, holds every flushed write
/// (remote durability) and is a prefix of the history.
#[test]
fn a_release_crashed_at_every_step_keeps_every_flushed_write() {
    let steps = release_cut_after(None);
    assert!(steps > 3, "a release makes several calls: {steps}");
    for n in 1..=steps {
        release_cut_after(Some(n));
    }
}

/// Writes and flushes with remote durability, then closes (releases) the
/// pool with the bucket going down at the `cut`-th call of the close (the
/// owner crashed there), and checks a new host's view. Returns how many
/// calls the close made.
fn release_cut_after(cut: Option<u64>) -> u64 {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    // Short waits: a close cut from its bucket gives up quickly.
    let mut o = short_lease(remote_opts(&t.path().join("c1"), create(), 60_000));
    o.drain_timeout = Duration::from_millis(300);
    o.read_timeout = Duration::from_secs(1);
    o.backpressure_timeout = Duration::from_secs(1);
    let (pool, store) = open(bucket.remote(), o);
    let blocks = 512;
    pool.create_volume("v", blocks * BLOCK).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for i in 0..600 {
        log.write(&vol, rng.gen_range(0..blocks));
        if i % 100 == 99 {
            pool.flush().unwrap();
        }
    }
    let flushed = log.writes.len() as u64;
    drop(vol);
    let before = bucket.faults.calls.load(Ordering::SeqCst);
    if let Some(n) = cut {
        bucket
            .faults
            .down_at_call
            .store(before + n, Ordering::SeqCst);
    }
    let started = Instant::now();
    let _ = pool.close();
    store.close();
    let calls = bucket.faults.calls.load(Ordering::SeqCst) - before;
    let closed_in = started.elapsed();
    let b = Bucket::new(&bucket.dir);
    let (p, st) = open(
        b.remote(),
        remote_opts(&t.path().join("c2"), open_mode(true), 60_000),
    );
    let k = log.check_prefix(&p.volume("v").unwrap(), blocks);
    assert!(
        k >= flushed,
        "cut at call {cut:?}: {k} writes recovered, {flushed} flushed"
    );
    p.close().unwrap();
    st.close();
    eprintln!("release cut at call {cut:?}: closed in {closed_in:?}");
    calls
}

/// A handover (`vol release` on the owner, then a takeover elsewhere)
/// crashed at any moment of the release: copies of the bucket frozen at
/// random moments while the owner closes (seals, uploads, commits the
/// manifest without a holder, deletes its journal), each opened by a new
/// host, hold every write flushed before the release (remote durability)
/// and are prefixes of the history. Several seeds; 503s meanwhile.
#[test]
fn a_release_crashed_at_any_moment_keeps_every_flushed_write() {
    for seed in 0..3u64 {
        let t = tempfile::tempdir().unwrap();
        let bucket = Bucket::new(&t.path().join("bucket"));
        let (pool, store) = open(
            bucket.remote(),
            remote_opts(&t.path().join("c1"), create(), 60_000),
        );
        let blocks = 1024;
        pool.create_volume("v", blocks * BLOCK).unwrap();
        let vol = pool.volume("v").unwrap();
        let mut log = WriteLog::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..rng.gen_range(500..3000) {
            log.write(&vol, rng.gen_range(0..blocks));
            if rng.gen_ratio(1, 64) {
                pool.flush().unwrap();
            }
        }
        pool.flush().unwrap();
        let flushed = log.writes.len() as u64;
        drop(vol);
        bucket.faults.fail_one_in.store(8, Ordering::SeqCst);
        let closing = std::thread::spawn(move || close(pool, store));
        let mut copies = Vec::new();
        for i in 0..4 {
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..200)));
            let copy = t.path().join(format!("frozen{i}"));
            bucket.frozen_copy(&copy);
            copies.push(copy);
        }
        closing.join().unwrap();
        bucket.faults.fail_one_in.store(0, Ordering::SeqCst);
        copies.push(bucket.dir.clone());
        for (i, copy) in copies.iter().enumerate() {
            let b = Bucket::new(copy);
            let (p, st) = open(
                b.remote(),
                remote_opts(&t.path().join(format!("cc{i}")), open_mode(true), 60_000),
            );
            let k = log.check_prefix(&p.volume("v").unwrap(), blocks);
            assert!(
                k >= flushed,
                "seed {seed}, copy {i}: {k} writes recovered, {flushed} were flushed"
            );
            p.close().unwrap();
            st.close();
        }
    }
}

/// Remote durability, crashed at random moments: a copy of the bucket
/// frozen at any moment, opened by a new host (the writer and its cache
/// lost), holds every write flushed before the copy began, and is a
/// prefix of the history. Uploads, the cleaner and the journal's deletion
/// run meanwhile.
#[test]
fn remote_durability_keeps_every_flushed_write_in_the_bucket() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store) = open(
        bucket.remote(),
        remote_opts(&t.path().join("c1"), create(), 400),
    );
    let blocks = 1024;
    pool.create_volume("v", blocks * BLOCK).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut frozen = Vec::new();
    for round in 0..10 {
        for _ in 0..rng.gen_range(100..900) {
            log.write(&vol, rng.gen_range(0..blocks));
            if rng.gen_ratio(1, 32) {
                pool.flush().unwrap();
            }
        }
        pool.flush().unwrap();
        let flushed = log.writes.len() as u64;
        // Writes after the last flush may or may not be there.
        for _ in 0..rng.gen_range(0..40) {
            log.write(&vol, rng.gen_range(0..blocks));
        }
        let copy = t.path().join(format!("frozen{round}"));
        bucket.frozen_copy(&copy);
        frozen.push((copy, flushed));
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..600)));
    }
    let s = store.stats();
    assert!(s.journal_entries > 0 && s.segments_uploaded > 0, "{s:?}");
    for (i, (copy, flushed)) in frozen.iter().enumerate() {
        let b = Bucket::new(copy);
        let (p, st) = open(
            b.remote(),
            remote_opts(&t.path().join(format!("cc{i}")), open_mode(true), 400),
        );
        let k = log.check_prefix(&p.volume("v").unwrap(), blocks);
        assert!(
            k >= *flushed,
            "copy {i}: {k} writes recovered, {flushed} were flushed"
        );
        p.close().unwrap();
        st.close();
    }
    close(pool, store);
    // A clean close leaves no journal behind (only the bucket's segments).
    let left: Vec<_> = std::fs::read_dir(bucket.dir.join("journal"))
        .map(|d| {
            d.flatten()
                .flat_map(|e| std::fs::read_dir(e.path()).unwrap().flatten())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "journal entries left after a clean close: {left:?}"
    );
}

/// After B took the pool over from A (each a (pool, store)): A's next
/// write or flush fails, fenced, and B holds the first `n` writes of `log`
/// and none of A's later ones. Closes both.
fn old_holder_is_fenced(
    a: (vpool_engine::Pool, S3Store),
    b: (vpool_engine::Pool, S3Store),
    log: &WriteLog,
    n: u64,
) {
    let (pool_a, store_a) = a;
    let (pool_b, store_b) = b;
    // Its maintenance thread's own flush may meet the tombstone first.
    let e = pool_a
        .volume("v")
        .and_then(|v| v.write(0, &block_data(999, 0)))
        .and_then(|()| pool_a.flush())
        .expect_err("the old holder must be fenced");
    assert!(
        e.to_string().contains("fenced") || e.to_string().contains("tombstone"),
        "{e}"
    );
    assert!(store_a.fenced().is_some());
    assert_eq!(log.check_prefix(&pool_b.volume("v").unwrap(), 1024), n);
    let _ = pool_a.close();
    assert!(!store_a.close());
    close(pool_b, store_b);
}

/// A takeover closes the old holder's journal with a tombstone: the new
/// holder has every write the old one flushed before, and the old one is
/// fenced by its next flush, before its lease is even renewed.
#[test]
fn a_takeover_s_tombstone_fences_the_old_holder_s_next_flush() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    // Nothing is sealed by time: only the journal holds A's writes.
    let (pool_a, store_a) = open(
        bucket.remote(),
        remote_opts(&t.path().join("a"), create(), 600_000),
    );
    pool_a.create_volume("v", 4 * MIB).unwrap();
    let vol_a = pool_a.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..100 {
        log.write(&vol_a, b);
    }
    pool_a.flush().unwrap();
    assert_eq!(store_a.stats().segments_uploaded, 0);

    let (pool_b, store_b) = open(
        bucket.remote(),
        remote_opts(&t.path().join("b"), open_mode(true), 600_000),
    );
    assert_eq!(log.check_prefix(&pool_b.volume("v").unwrap(), 1024), 100);
    old_holder_is_fenced((pool_a, store_a), (pool_b, store_b), &log, 100);
}

/// The tombstone must land above the old holder's next entry even when
/// commits deleted its journal (its segments uploaded): the holder keeps
/// its newest entry, so a taker knows where it stands, and the old
/// holder's next flush fails instead of being acknowledged unseen.
#[test]
fn a_takeover_after_uploads_still_fences_the_old_holder_s_journal() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool_a, store_a) = open(
        bucket.remote(),
        remote_opts(&t.path().join("a"), create(), 100),
    );
    pool_a.create_volume("v", 4 * MIB).unwrap();
    let vol_a = pool_a.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..100 {
        log.write(&vol_a, b);
        if b % 10 == 9 {
            pool_a.flush().unwrap();
        }
    }
    assert!(store_a.wait_uploaded(Duration::from_secs(20)));
    // Commits deleted every entry of A but its newest.
    let epoch_dir = std::fs::read_dir(bucket.dir.join("pool/journal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(&epoch_dir).unwrap().count() > 1 {
        assert!(Instant::now() < deadline, "A's journal was not collected");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_dir(&epoch_dir).unwrap().count(), 1);

    let (pool_b, store_b) = open(
        bucket.remote(),
        remote_opts(&t.path().join("b"), open_mode(true), 100),
    );
    assert_eq!(log.check_prefix(&pool_b.volume("v").unwrap(), 1024), 100);
    old_holder_is_fenced((pool_a, store_a), (pool_b, store_b), &log, 100);
}

/// A holder that died between two pieces of one flush (the flush was never
/// acknowledged) leaves a piece without the end-of-flush flag: replay must
/// not apply it, or the next recovery would find a torn record and cut
/// what follows. Here the torn piece claims a new segment: it must not
/// appear, and everything flushed before is there.
#[test]
fn a_flush_torn_between_its_pieces_is_not_replayed() {
    use vpool_s3::journal::{EntryKind, JournalEntry, entry_key};
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool_a, store_a) = open(
        bucket.remote(),
        remote_opts(&t.path().join("a"), create(), 600_000),
    );
    pool_a.create_volume("v", 4 * MIB).unwrap();
    let vol_a = pool_a.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..50 {
        log.write(&vol_a, b);
    }
    pool_a.flush().unwrap();
    // A dies: its bucket as it stands, frozen.
    let copy = t.path().join("frozen");
    bucket.frozen_copy(&copy);
    let frozen = Bucket::new(&copy);
    // A's next entry, as if A died after sending the first piece of a
    // flush: garbage for a segment far ahead, no end-of-flush flag.
    let epoch = store_a.epoch();
    let epoch_dir = copy.join(format!("pool/journal/{epoch:016x}"));
    let next = std::fs::read_dir(&epoch_dir).unwrap().count() as u64 + 1;
    let torn = JournalEntry {
        epoch,
        seq: next,
        kind: EntryKind::Data {
            segment: 9999,
            offset: 0,
            data: vec![0xee; 4096],
            end_of_flush: false,
        },
    };
    frozen
        .remote()
        .put_create(&entry_key(epoch, next), torn.encode().into(), None, &|| {
            false
        })
        .unwrap();
    let (pool_b, store_b) = open(
        frozen.remote(),
        remote_opts(&t.path().join("b"), open_mode(true), 600_000),
    );
    assert_eq!(log.check_prefix(&pool_b.volume("v").unwrap(), 1024), 50);
    let seg = t
        .path()
        .join("b/segments")
        .join(format!("{:016x}.seg", 9999));
    assert!(!seg.exists(), "the torn piece was replayed");
    close(pool_b, store_b);
    close(pool_a, store_a);
}

#[test]
fn a_second_host_is_refused_and_a_takeover_fences_the_first() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool_a, store_a) = open(
        bucket.remote(),
        opts(&t.path().join("a"), 64 * MIB, create()),
    );
    pool_a.create_volume("v", 4 * MIB).unwrap();
    let vol_a = pool_a.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..100 {
        log.write(&vol_a, b);
    }
    pool_a.flush().unwrap();
    assert!(store_a.wait_uploaded(Duration::from_secs(20)));

    let err = S3Store::open(
        bucket.remote(),
        opts(&t.path().join("b"), 64 * MIB, open_mode(false)),
    )
    .expect_err("a second host must be refused");
    assert!(matches!(err, OpenError::Held { .. }), "{err}");
    assert!(err.to_string().contains("--force"), "{err}");

    let (pool_b, store_b) = open(
        bucket.remote(),
        opts(&t.path().join("b"), 64 * MIB, open_mode(true)),
    );
    assert_eq!(log.check_prefix(&pool_b.volume("v").unwrap(), 1024), 100);

    // A keeps writing; its next commit finds the generation taken.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failed = None;
    while Instant::now() < deadline {
        if let Err(e) = vol_a
            .write(0, &block_data(999, 0))
            .and_then(|()| pool_a.flush())
        {
            failed = Some(e);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = failed.expect("the old holder must be fenced");
    assert!(store_a.fenced().is_some());
    assert!(
        matches!(
            &e,
            vpool_engine::EngineError::Store(StoreError::Fenced { .. })
        ) || e.to_string().contains("fenced")
            || e.to_string().contains("failed sync"),
        "{e}"
    );
    // B, the holder now, never sees A's late writes.
    assert_eq!(log.check_prefix(&pool_b.volume("v").unwrap(), 1024), 100);
    let _ = pool_a.close();
    assert!(!store_a.close());
    close(pool_b, store_b);
}

#[test]
fn an_outage_delays_uploads_fails_cold_reads_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c1"), 64 * MIB, create()),
    );
    pool.create_volume("v", 32 * MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..2048 {
        log.write(&vol, b);
    }
    close(pool, store);

    // A cold cache, 16 MiB: 12 MiB of write-back space.
    let mut o = opts(&t.path().join("c2"), 16 * MIB, open_mode(false));
    o.read_timeout = Duration::from_secs(2);
    let (pool, store) = open(bucket.remote(), o);
    let vol = pool.volume("v").unwrap();
    bucket.faults.down.store(true, Ordering::SeqCst);

    // Reads of uncached data fail, in bounded time, with a clear error.
    let started = Instant::now();
    let mut buf = vec![0u8; BLOCK as usize];
    let err = vol.read(0, &mut buf).expect_err("the store is down");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        err.to_string().contains("object store unavailable"),
        "{err}"
    );

    // Writes go on into the cache, past the write-back limit: they wait
    // (no error) until the store is back.
    let writer = {
        let vol = pool.volume("v").unwrap();
        let mut log = log.clone();
        std::thread::spawn(move || {
            for b in 2048..(2048 + 5000) {
                log.write(&vol, b % 8192);
            }
            log
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    let st = store.stats();
    assert!(st.dirty_bytes > 0 && st.remote_errors > 0, "{st:?}");
    bucket.faults.down.store(false, Ordering::SeqCst);
    let log = writer.join().unwrap();
    pool.flush().unwrap();
    assert_eq!(log.check_prefix(&vol, 8192), log.writes.len() as u64);
    let st = store.stats();
    assert!(st.cached_bytes + st.dirty_bytes <= 16 * MIB + MIB, "{st:?}");
    close(pool, store);

    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c3"), 64 * MIB, open_mode(false)),
    );
    assert_eq!(
        log.check_prefix(&pool.volume("v").unwrap(), 8192),
        log.writes.len() as u64
    );
    close(pool, store);
}

#[test]
fn transient_failures_and_short_reads_are_retried() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    bucket.faults.fail_one_in.store(4, Ordering::SeqCst);
    bucket.faults.short_read_one_in.store(3, Ordering::SeqCst);
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c1"), 64 * MIB, create()),
    );
    pool.create_volume("v", 8 * MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    for _ in 0..3000 {
        log.write(&vol, rng.gen_range(0..2048));
    }
    close(pool, store);
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c2"), 64 * MIB, open_mode(false)),
    );
    assert_eq!(log.check_prefix(&pool.volume("v").unwrap(), 2048), 3000);
    assert!(bucket.faults.injected.load(Ordering::SeqCst) > 10);
    close(pool, store);
}

#[test]
fn cold_random_reads_fetch_little_and_the_cache_stays_in_its_budget() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c1"), 256 * MIB, create()),
    );
    let blocks = 8192; // 32 MiB
    pool.create_volume("v", blocks * BLOCK).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..blocks {
        log.write(&vol, b);
    }
    close(pool, store);

    let cache = t.path().join("c2");
    let (pool, store) = open(bucket.remote(), opts(&cache, 16 * MIB, open_mode(false)));
    let vol = pool.volume("v").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut buf = vec![0u8; BLOCK as usize];
    for _ in 0..1000 {
        let b = rng.gen_range(0..blocks);
        vol.read(b * BLOCK, &mut buf).unwrap();
        assert_eq!(writer_of(&buf, b), b + 1);
    }
    let s = store.stats();
    let ratio = s.bytes_fetched as f64 / (1000 * BLOCK) as f64;
    eprintln!("random 4 KiB reads, cold: {ratio:.3} bytes fetched per byte read");
    assert!(ratio <= 2.0, "{s:?}");
    // A full scan, twice the cache: the data is right and the cache holds
    // no more than its budget, on disk too.
    assert_eq!(log.check_prefix(&vol, blocks), blocks);
    let s = store.stats();
    assert!(s.cached_bytes <= 16 * MIB, "{s:?}");
    let on_disk = allocated_bytes(&cache);
    assert!(
        on_disk <= 16 * MIB + 2 * MIB,
        "the cache files take {on_disk} bytes"
    );
    close(pool, store);
}

#[test]
fn pinned_images_stay_resident_through_a_scan() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c1"), 256 * MIB, create()),
    );
    pool.create_volume("hot", 2 * MIB).unwrap();
    pool.create_volume("big", 32 * MIB).unwrap();
    let (hot, big) = (pool.volume("hot").unwrap(), pool.volume("big").unwrap());
    for b in 0..512 {
        hot.write(b * BLOCK, &block_data(1, b)).unwrap();
    }
    for b in 0..8192 {
        big.write(b * BLOCK, &block_data(2, b)).unwrap();
    }
    pool.create_snapshot("hot", "suspended").unwrap();
    close(pool, store);

    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c2"), 16 * MIB, open_mode(false)),
    );
    store.set_pins(pool.data_ranges("hot", Some("suspended")).unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.stats().pinned_bytes < 2 * MIB && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("pinned: {:?}", store.stats());
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..2 {
        for at in (0..32 * MIB).step_by(1 << 20) {
            pool.volume("big").unwrap().read(at, &mut buf).unwrap();
        }
    }
    let before = store.stats().bytes_fetched;
    eprintln!("after the scan: {:?}", store.stats());
    let snap = pool.snapshot("hot", "suspended").unwrap();
    let mut one = vec![0u8; BLOCK as usize];
    for b in 0..512 {
        snap.read(b * BLOCK, &mut one).unwrap();
        assert_eq!(writer_of(&one, b), 1);
    }
    let after = store.stats();
    assert_eq!(
        after.bytes_fetched - before,
        0,
        "pinned data was fetched again: {after:?}"
    );
    close(pool, store);
}

#[test]
fn a_store_that_cannot_fence_is_refused_unless_asked() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    bucket
        .faults
        .ignore_create_only
        .store(true, Ordering::SeqCst);
    let err = S3Store::open(
        bucket.remote(),
        opts(&t.path().join("c1"), 64 * MIB, create()),
    )
    .expect_err("refused");
    assert!(matches!(err, OpenError::UnsafeFencing { .. }), "{err}");
    assert!(err.to_string().contains("If-None-Match"), "{err}");
    let (pool, store) = open(
        bucket.remote(),
        opts(
            &t.path().join("c2"),
            64 * MIB,
            OpenMode::Create {
                allow_unsafe_fencing: true,
            },
        ),
    );
    assert_eq!(store.stats().fencing, "unsafe");
    close(pool, store);
}

#[test]
fn reopening_the_same_cache_after_a_clean_close_is_warm() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let cache = t.path().join("c1");
    let (pool, store) = open(bucket.remote(), opts(&cache, 64 * MIB, create()));
    pool.create_volume("v", 4 * MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..1024 {
        log.write(&vol, b);
    }
    drop(vol); // the last handle on the pool: its cache directory's lock goes with it
    close(pool, store);
    let (pool, store) = open(bucket.remote(), opts(&cache, 64 * MIB, open_mode(false)));
    assert_eq!(log.check_prefix(&pool.volume("v").unwrap(), 1024), 1024);
    assert_eq!(store.stats().bytes_fetched, 0, "the cache was kept");
    close(pool, store);
}

#[test]
fn objects_no_manifest_names_are_collected_at_open() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c1"), 64 * MIB, create()),
    );
    pool.create_volume("v", 4 * MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..512 {
        log.write(&vol, b);
    }
    drop(vol);
    close(pool, store);
    // What a crashed upload or a fenced host leaves: keys of an old epoch
    // that no manifest names.
    let root = bucket.dir.join("pool");
    let orphans = [
        root.join("segments/00000000000000ff-0000000000000001.seg"),
        root.join("meta/checkpoint-0000000000000001-00000000000000aa"),
    ];
    for o in &orphans {
        std::fs::write(o, b"left behind").unwrap();
    }
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c2"), 64 * MIB, open_mode(false)),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while orphans.iter().any(|o| o.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        orphans.iter().all(|o| !o.exists()),
        "orphans were not collected"
    );
    assert_eq!(log.check_prefix(&pool.volume("v").unwrap(), 1024), 512);
    close(pool, store);
}

#[test]
fn a_full_cache_disk_waits_for_uploads_and_loses_nothing() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    // The cache's disk (24 MiB) is much smaller than its configured size.
    let Some(fs) = SmallFs::mount(&t.path().join("smallfs"), 24) else {
        return;
    };
    let cache = fs.0.join("cache");
    let (pool, store) = open(bucket.remote(), opts(&cache, 256 * MIB, create()));
    pool.create_volume("v", 64 * MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    // 64 MiB of writes through a 24 MiB disk, and the store down for a
    // while in the middle: appends wait for space, no write fails.
    for b in 0..16384u64 {
        if b == 6000 {
            bucket.faults.down.store(true, Ordering::SeqCst);
        }
        if b == 6100 {
            let faults = bucket.faults.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_secs(2));
                faults.down.store(false, Ordering::SeqCst);
            });
        }
        log.write(&vol, b);
        if b % 256 == 0 {
            pool.flush().unwrap();
        }
    }
    pool.flush().unwrap();
    assert_eq!(log.check_prefix(&vol, 16384), 16384);
    drop(vol);
    close(pool, store);
    let (pool, store) = open(
        bucket.remote(),
        opts(&t.path().join("c2"), 256 * MIB, open_mode(false)),
    );
    assert_eq!(log.check_prefix(&pool.volume("v").unwrap(), 16384), 16384);
    close(pool, store);
    drop(fs);
}

/// The lease of these tests: short, yet long enough that a loaded
/// machine renews it in time (renewed every 0.5 s, valid 2 s).
const TEST_LEASE: Duration = Duration::from_secs(3);

fn short_lease(mut o: vpool_s3::S3PoolOptions) -> vpool_s3::S3PoolOptions {
    o.lease = vpool_s3::LeaseTiming::expiring_after(TEST_LEASE);
    o
}

#[test]
fn a_holder_cut_off_from_the_bucket_stops_its_io_and_resumes_with_it() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (pool, store) = open(
        bucket.remote(),
        short_lease(opts(&t.path().join("c1"), 64 * MIB, create())),
    );
    pool.create_volume("v", 4 * MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..64 {
        log.write(&vol, b);
    }
    pool.flush().unwrap();

    bucket.faults.down.store(true, Ordering::SeqCst);
    // Past `valid` (2 s), short of the expiry.
    std::thread::sleep(Duration::from_millis(2500));
    let data = block_data(999, 0);
    let e = vol.write(0, &data).expect_err("a write past the lease");
    assert!(e.to_string().contains("not renewed"), "{e}");
    let e = pool.flush().expect_err("a flush past the lease");
    assert!(e.to_string().contains("not renewed"), "{e}");
    let mut buf = vec![0u8; BLOCK as usize];
    let e = vol.read(0, &mut buf).expect_err("a read past the lease");
    assert!(e.to_string().contains("not renewed"), "{e}");

    // The bucket answers again: the next renewal lets I/O go on, and the
    // pool did not take the refused flush for a failed sync.
    bucket.faults.down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while vol.write(0, &block_data(1000, 0)).is_err() {
        assert!(Instant::now() < deadline, "I/O did not resume");
        std::thread::sleep(Duration::from_millis(50));
    }
    for b in 64..128 {
        log.write(&vol, b);
    }
    pool.flush().unwrap();
    assert!(store.fenced().is_none());
    drop(vol);
    close(pool, store);
}

#[test]
fn a_partitioned_holder_is_taken_over_after_its_lease_and_finds_itself_fenced() {
    let t = tempfile::tempdir().unwrap();
    let bucket = Bucket::new(&t.path().join("bucket"));
    let (remote_a, cut_a) = bucket.own_remote();
    let (pool_a, store_a) = open(
        remote_a,
        short_lease(opts(&t.path().join("a"), 64 * MIB, create())),
    );
    pool_a.create_volume("v", 4 * MIB).unwrap();
    let vol_a = pool_a.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..100 {
        log.write(&vol_a, b);
    }
    pool_a.flush().unwrap();
    assert!(store_a.wait_uploaded(Duration::from_secs(20)));

    // While A renews, B is refused.
    let err = S3Store::open(
        bucket.remote(),
        short_lease(opts(&t.path().join("b0"), 64 * MIB, open_mode(false))),
    )
    .expect_err("A renews its lease");
    assert!(err.to_string().contains("being renewed"), "{err}");

    // A is cut off: B watches its lease expire and takes over.
    cut_a.down.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let (pool_b, store_b) = open(
        bucket.remote(),
        short_lease(opts(&t.path().join("b"), 64 * MIB, open_mode(false))),
    );
    assert!(started.elapsed() >= TEST_LEASE);
    let vol_b = pool_b.volume("v").unwrap();
    assert_eq!(log.check_prefix(&vol_b, 100), 100);
    vol_b.write(0, &block_data(7777, 0)).unwrap();
    pool_b.flush().unwrap();
    assert!(store_b.wait_uploaded(Duration::from_secs(20)));
    // B commits on, until its clean-up has deleted the manifest that took
    // the lease: A must not be able to create that generation as its own.
    let took = store_b.epoch();
    for i in 0..8 {
        vol_b
            .write((8 + i) * BLOCK, &block_data(9000 + i, 8 + i))
            .unwrap();
        pool_b.flush().unwrap();
        assert!(store_b.wait_uploaded(Duration::from_secs(20)));
    }
    let taking_manifest = bucket.dir.join("pool/manifest").join(format!("{took:020}"));
    assert!(
        store_b.generation() > took + 6 && !taking_manifest.exists(),
        "B's clean-up kept manifest {took} (now at {})",
        store_b.generation()
    );

    // A already refused I/O (its lease lapsed); back in touch, it finds
    // B's manifest and is fenced for good.
    assert!(vol_a.write(4096, &block_data(8888, 1)).is_err());
    cut_a.down.store(false, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(10);
    while store_a.fenced().is_none() {
        assert!(Instant::now() < deadline, "A never found itself fenced");
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = vol_a.write(4096, &block_data(8888, 1)).expect_err("fenced");
    assert!(e.to_string().contains("taken over"), "{e}");
    assert!(pool_a.flush().is_err());
    drop(vol_a);
    let _ = pool_a.close();
    assert!(!store_a.close(), "a fenced store releases nothing");

    // The bucket holds B's write, never A's.
    let mut buf = vec![0u8; BLOCK as usize];
    vol_b.read(4096, &mut buf).unwrap();
    assert_eq!(writer_of(&buf, 1), 2, "block 1 is still A's write number 2");
    vol_b.read(0, &mut buf).unwrap();
    assert_eq!(writer_of(&buf, 0), 7777, "block 0 is B's");
    drop(vol_b);
    close(pool_b, store_b);
}
