//! [`S3Store`]: a [`SegmentStore`] whose segments live in an object store,
//! behind a write-back log and a read cache on local disk.
//!
//! The cache directory is an ordinary local pool directory
//! ([`LocalDirStore`]), so the engine's durability story is unchanged: a
//! write is appended to a local segment file, FLUSH is an `fdatasync` of
//! it, and a daemon crash with the cache intact recovers from it exactly as
//! a local pool does. What this module adds:
//!
//! - **Upload, in order.** A segment is *dirty* until it is in the bucket.
//!   Once sealed (the engine started the next one, or asked to after
//!   [`S3PoolOptions::seal_after`]) and synced, the uploader thread PUTs it
//!   whole, a few at a time, and commits a new manifest (see
//!   [`crate::manifest`]) listing it. Metadata blobs (the checkpoint) are
//!   committed only once every segment they may refer to is listed, and
//!   segment deletions only after the metadata that stopped referring to
//!   them: every committed manifest is a crash-consistent prefix.
//! - **Read cache.** An uploaded segment's local file becomes a cache copy;
//!   eviction punches holes in it. A read of bytes not present range-GETs
//!   exactly the missing 512-byte sectors (plus read-ahead for a sequential
//!   stream), writes them into the file and serves from it. The index of
//!   what is present and the eviction policy are [`vpool_cache::CacheIndex`].
//! - **Back-pressure.** Dirty bytes are bounded (a share of the cache
//!   size). A write that would exceed it waits in [`SegmentStore::admit_write`],
//!   outside the engine's lock, until uploads catch up, up to
//!   [`S3PoolOptions::backpressure_timeout`]; then it fails.
//! - **Fencing.** The store opens by committing a manifest that names it as
//!   holder. If a later commit finds its generation taken, another host took
//!   the pool over: every write, sync and metadata update fails from then on.
//!
//! Where the code is:
//!
//! - this file: the options, the errors, the state the parts share
//!   (`Inner`, and `Up`, the upload queue and the dirty segments, under one
//!   mutex) and the figures;
//! - `open`: opening (the lease, bringing the cache directory in line with
//!   the bucket, emptying a stale one) and closing (draining, releasing);
//! - `upload`: the uploader thread: ordered uploads, commits, deletions,
//!   orphans;
//! - `read`: the read cache: fetches, read-ahead, eviction by punching
//!   holes, pins;
//! - `writeback`: dirty bytes and their bound;
//! - `segment_store`: the engine's view, `SegmentStore` and `OpenSegment`;
//! - `journal`: remote durability: a FLUSH writes the flush journal
//!   (`crate::journal`) before it is acknowledged; opening fences the old
//!   holder's journal and replays it; commits drop what they cover.
//!
//! Lock order: `punch` (RwLock) before `index`; `up` is never held across
//! I/O to the remote.
//!
//! [`SegmentStore`]: vpool_store::SegmentStore
//! [`SegmentStore::admit_write`]: vpool_store::SegmentStore::admit_write

mod budget;
mod journal;
mod lease;
mod open;
mod read;
mod segment_store;
mod upload;
mod writeback;

pub use budget::CacheBudget;
pub use lease::{
    DEFAULT_LEASE_EXPIRE, LeaseTiming, MAX_WATCH, Watch, heartbeat_is, lease_key, wait_for_expiry,
};
pub use open::is_cache_dir;

use crate::journal::Durability;
use crate::manifest::{Holder, Manifest};
use crate::remote::{Remote, RemoteError};
use crate::stats::CacheStats;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vpool_cache::CacheIndex;
use vpool_store::{LocalDirStore, Result, StoreError};

/// The store's own blobs in the cache directory; never uploaded. A
/// directory with `meta/s3-state` is an S3 pool's cache.
pub const STATE_META: &str = "s3-state";
const INDEX_META: &str = "s3-cache-index";

/// How the pool is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenMode {
    /// Make a new pool at the URL; fails if one is there.
    Create {
        /// Accept a store whose conditional create is not atomic (one host
        /// only, unenforced).
        allow_unsafe_fencing: bool,
    },
    /// Open the pool at the URL.
    Open {
        /// Take the lease from another holder. The old holder is fenced: its
        /// next commit fails and it stops writing.
        force: bool,
    },
    /// Open the pool as its latest manifest left it, to read it: no lease,
    /// no uploader, nothing written to the bucket, any number of hosts at
    /// once. For a pool that nobody writes (a sealed template's family,
    /// released by its owner): one with a holder is refused, since the
    /// holder's clean-up deletes what this view would read. The engine's
    /// own bookkeeping (its new open segment, a checkpoint) stays in the
    /// cache, which is emptied at every open; writes are
    /// refused.
    ReadOnly,
}

#[derive(Clone, Debug)]
pub struct S3PoolOptions {
    pub cache_dir: PathBuf,
    /// Hard limit on the cache's data: dirty log plus cached copies.
    pub cache_size_bytes: u64,
    /// Segments uploaded at once.
    pub upload_parallelism: usize,
    /// The engine seals the open segment after it has held data this long,
    /// which bounds how far the bucket lags behind the cache.
    pub seal_after: Duration,
    /// How long a write waits for dirty space before it fails.
    pub backpressure_timeout: Duration,
    /// How long a read of uncached data may take before it fails with EIO.
    pub read_timeout: Duration,
    /// How long closing waits for the last uploads.
    pub drain_timeout: Duration,
    pub readahead_max_bytes: u64,
    pub mode: OpenMode,
    /// How the lease is renewed, and when it expires.
    pub lease: LeaseTiming,
    /// What a FLUSH promises (`journal`).
    pub durability: Durability,
    /// This daemon's peer link address, recorded in the lease it takes
    /// (`Holder::peer`).
    pub peer: Option<String>,
    /// The host's cache budget this store shares with others (the
    /// families of a shared pool): while open, its cache size is its
    /// share, not `cache_size_bytes` (`budget`).
    pub budget: Option<Arc<CacheBudget>>,
}

impl S3PoolOptions {
    pub fn new(cache_dir: impl Into<PathBuf>, cache_size_bytes: u64, mode: OpenMode) -> Self {
        S3PoolOptions {
            cache_dir: cache_dir.into(),
            cache_size_bytes,
            upload_parallelism: 4,
            seal_after: Duration::from_secs(5),
            backpressure_timeout: Duration::from_secs(120),
            read_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(60),
            readahead_max_bytes: 4 << 20,
            mode,
            lease: LeaseTiming::default(),
            durability: Durability::Host,
            peer: None,
            budget: None,
        }
    }
}

/// Why an S3 pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no vpool pool at {url} (no manifest); create it first")]
    NoPool { url: String },
    #[error("a vpool pool already exists at {url}")]
    PoolExists { url: String },
    #[error(
        "pool {url} is held by {host} (pid {pid}, since manifest generation {epoch}): {lease}; \
         pass --force to take it over now (the other host is fenced and stops writing)"
    )]
    Held {
        url: String,
        host: String,
        pid: u32,
        epoch: u64,
        /// Whether its lease is renewed, or for how long it has not been.
        lease: String,
    },
    #[error(
        "the object store at {url} does not enforce create-only PUTs (If-None-Match: *) atomically: \
         {detail}. vpool cannot keep a second host from writing; pass --unsafe-single-host \
         to use it from this host only"
    )]
    UnsafeFencing { url: String, detail: String },
    #[error("cache directory {dir} belongs to another pool ({other}); use a new one")]
    ForeignCache { dir: String, other: String },
    #[error("another host committed to {url} while this one was opening it; retry")]
    LostRace { url: String },
    #[error("pool {url} is sealed (a template): it opens read-only, and no host writes it")]
    Sealed { url: String },
    #[error("corrupt pool state: {0}")]
    Corrupt(String),
    #[error("object store: {0}")]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A segment not in the bucket yet: the open one, or sealed and waiting for
/// its upload.
#[derive(Debug)]
struct Dirty {
    /// Bytes written.
    len: u64,
    /// Bytes known durable in the cache: an upload waits for all of them.
    synced: u64,
    /// When the engine moved on to the next segment; `None` while open.
    sealed_at: Option<Instant>,
    /// In the uploader's current round: a deletion then waits for a commit.
    uploading: bool,
    /// Bytes in the flush journal (remote durability); from the start.
    journaled: u64,
}

/// An operation waiting to be committed, in queue order.
enum Op {
    /// Upload a metadata blob (the checkpoint) and name it.
    Meta {
        name: String,
        data: Arc<Vec<u8>>,
        /// Every segment up to this one must be in the bucket first.
        needs: u64,
    },
    /// Stop naming a segment.
    Delete(u64),
}

/// The write-back and upload state, under one mutex: what the bucket
/// holds, what it does not yet, and what is to be committed.
struct Up {
    /// The manifest last committed.
    manifest: Manifest,
    /// Segments not in the bucket yet, by id.
    dirty: BTreeMap<u64, Dirty>,
    /// The segment the engine appends to.
    open: Option<u64>,
    ops: VecDeque<Op>,
    /// Deleted by the engine, still in the bucket until a commit drops it.
    hidden: BTreeSet<u64>,
    /// The sum of the dirty segments' lengths.
    dirty_bytes: u64,
    /// Closing: the engine is done, the open segment counts as sealed.
    draining: bool,
    /// The last upload or commit failure, for the stats; a commit clears it.
    last_error: Option<String>,
    /// The uploader took work off the queue and has not committed it yet.
    in_round: bool,
}

impl Up {
    /// Sealed bytes not yet in the bucket, and the age in seconds of the
    /// oldest sealed segment among them.
    fn upload_lag(&self) -> (u64, f64) {
        let sealed: Vec<&Dirty> = self
            .dirty
            .iter()
            .filter(|(id, _)| self.open != Some(**id))
            .map(|(_, d)| d)
            .collect();
        let age = sealed
            .iter()
            .filter_map(|d| d.sealed_at)
            .min()
            .map(|t| t.elapsed().as_secs_f64())
            .unwrap_or(0.0);
        (sealed.iter().map(|d| d.len).sum(), age)
    }
}

#[derive(Default)]
struct Counters {
    read_hits: AtomicU64,
    read_misses: AtomicU64,
    bytes_read: AtomicU64,
    bytes_fetched: AtomicU64,
    read_errors: AtomicU64,
    segments_uploaded: AtomicU64,
    bytes_uploaded: AtomicU64,
    upload_nanos: AtomicU64,
    journal_entries: AtomicU64,
    journal_bytes: AtomicU64,
}

/// What every handle of an [`S3Store`] shares.
struct Inner {
    /// The cache directory, an ordinary local pool.
    local: LocalDirStore,
    remote: Arc<Remote>,
    opts: S3PoolOptions,
    /// This store, as the manifests it commits name it.
    holder: Holder,
    up: Mutex<Up>,
    /// The cache's hard limit now: `opts.cache_size_bytes`, or the share
    /// of the host's budget.
    cache_size_bytes: AtomicU64,
    /// Signalled when `up` changes: the uploader and waiting writers wake.
    up_cv: Condvar,
    /// Which sectors of uploaded segments the cache holds; eviction.
    index: Mutex<CacheIndex>,
    /// Readers hold it shared from "is it present" to "read it"; eviction
    /// holds it exclusive from choosing victims to punching them.
    punch: RwLock<()>,
    /// Writable descriptors of cache files, by segment.
    files: Mutex<HashMap<u64, Arc<File>>>,
    /// Read-ahead, by segment: where the last read ended, and the window.
    streams: Mutex<HashMap<u64, (u64, u64)>>,
    /// One fetch at a time per 4 MiB region (striped): concurrent misses on
    /// the same bytes (a sequential stream read at queue depth 8) wait for
    /// the first fetch and find the data present, instead of each fetching
    /// it again.
    fetching: Vec<Mutex<()>>,
    /// Set, with the reason, once another host took the pool over.
    fenced: Mutex<Option<String>>,
    /// Closing: the uploader and the prefetcher end.
    stop: AtomicBool,
    /// The release at close seals the pool ([`S3Store::seal_at_close`]).
    seal_at_close: AtomicBool,
    /// The engine's durable marks hold for this cache: it held this host's
    /// latest log when opened (see `SegmentStore::durable_marks_hold`).
    marks_hold: AtomicBool,
    counters: Counters,
    uploader: Mutex<Option<JoinHandle<()>>>,
    prefetcher: Mutex<Option<JoinHandle<()>>>,
    renewer: Mutex<Option<JoinHandle<()>>>,
    /// When the heartbeat of the last renewal that succeeded was sent
    /// (`clock_ns`); the lease taken at open counts as one.
    renewed_at_ns: AtomicU64,
    /// The flush journal: one writer at a time (group commit).
    journal: Mutex<journal::JournalState>,
    /// The journal's entries a commit may make useless.
    journal_entries: Mutex<journal::JournalEntries>,
}

impl Inner {
    fn new(
        local: LocalDirStore,
        remote: Arc<Remote>,
        opts: S3PoolOptions,
        holder: Holder,
        manifest: Manifest,
    ) -> Inner {
        Inner {
            local,
            remote,
            holder,
            index: Mutex::new(CacheIndex::new(opts.cache_size_bytes)),
            cache_size_bytes: AtomicU64::new(opts.cache_size_bytes),
            opts,
            up: Mutex::new(Up {
                manifest,
                dirty: BTreeMap::new(),
                open: None,
                ops: VecDeque::new(),
                hidden: BTreeSet::new(),
                dirty_bytes: 0,
                draining: false,
                last_error: None,
                in_round: false,
            }),
            up_cv: Condvar::new(),
            punch: RwLock::new(()),
            files: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
            fetching: (0..read::FETCH_STRIPES).map(|_| Mutex::new(())).collect(),
            fenced: Mutex::new(None),
            stop: AtomicBool::new(false),
            seal_at_close: AtomicBool::new(false),
            marks_hold: AtomicBool::new(true),
            counters: Counters::default(),
            uploader: Mutex::new(None),
            prefetcher: Mutex::new(None),
            renewer: Mutex::new(None),
            renewed_at_ns: AtomicU64::new(lease::boottime_ns()),
            journal: Mutex::new(journal::JournalState::default()),
            journal_entries: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds on `CLOCK_BOOTTIME`, which runs while the process is
    /// stopped (SIGSTOP) and while the machine is suspended, so a paused
    /// holder wakes knowing how long it slept.
    fn clock_ns(&self) -> u64 {
        lease::boottime_ns()
    }
}

/// A pool backend on an object store with a local cache. Cheap to clone.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

fn now_unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// A fresh random id (pool ids, holder ids, probe keys).
pub(crate) fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>() ^ now_unix_nanos())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn unavailable(context: impl Into<String>, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable {
        context: context.into(),
        detail: e.to_string(),
    }
}

impl S3Store {
    pub fn fenced(&self) -> Option<String> {
        self.inner.fenced.lock().clone()
    }

    fn check_fenced(&self) -> Result<()> {
        match &*self.inner.fenced.lock() {
            Some(detail) => Err(StoreError::Fenced {
                detail: detail.clone(),
            }),
            None => Ok(()),
        }
    }

    /// This holder's epoch: the generation of the manifest that took the
    /// lease, in every key it writes.
    pub fn epoch(&self) -> u64 {
        self.inner.holder.epoch
    }

    /// Makes the release at [`S3Store::close`] seal the pool: its
    /// manifest says so, and from then on it opens read-only only. The
    /// release and the seal are one commit; a close that cannot release
    /// seals nothing.
    pub fn seal_at_close(&self) {
        self.inner.seal_at_close.store(true, Ordering::SeqCst);
    }

    /// Opened with [`OpenMode::ReadOnly`].
    pub fn read_only(&self) -> bool {
        self.inner.opts.mode == OpenMode::ReadOnly
    }

    /// Refuses `what` (a write) on a read-only view.
    fn refuse_if_read_only(&self, what: &str) -> Result<()> {
        if !self.read_only() {
            return Ok(());
        }
        Err(StoreError::Io {
            context: format!("a {what} to {}", self.inner.remote.display()),
            source: std::io::Error::new(
                std::io::ErrorKind::ReadOnlyFilesystem,
                "the pool is open read-only",
            ),
        })
    }

    /// The manifest generation last committed.
    pub fn generation(&self) -> u64 {
        self.inner.up.lock().manifest.generation
    }

    /// The cache's figures, for `vpool cache stats`.
    pub fn stats(&self) -> CacheStats {
        let inner = &self.inner;
        let c = &inner.counters;
        let (dirty_bytes, (lag_bytes, lag_s), gen_, nsegs, fencing, last_error) = {
            let up = inner.up.lock();
            (
                up.dirty_bytes,
                up.upload_lag(),
                up.manifest.generation,
                up.manifest.segments.len() as u64,
                format!("{:?}", up.manifest.fencing).to_lowercase(),
                up.last_error.clone(),
            )
        };
        let ix = inner.index.lock().stats();
        let hits = c.read_hits.load(Ordering::Relaxed);
        let misses = c.read_misses.load(Ordering::Relaxed);
        let up_bytes = c.bytes_uploaded.load(Ordering::Relaxed);
        let up_ns = c.upload_nanos.load(Ordering::Relaxed);
        CacheStats {
            remote: inner.remote.display().to_string(),
            cache_dir: inner.opts.cache_dir.display().to_string(),
            cache_size_bytes: self.cache_size(),
            cached_bytes: ix.used_bytes,
            dirty_bytes,
            dirty_limit_bytes: self.dirty_limit(),
            pinned_bytes: ix.pinned_bytes,
            pins: 0,
            read_hits: hits,
            read_misses: misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            bytes_read: c.bytes_read.load(Ordering::Relaxed),
            bytes_fetched: c.bytes_fetched.load(Ordering::Relaxed),
            read_errors: c.read_errors.load(Ordering::Relaxed),
            segments_uploaded: c.segments_uploaded.load(Ordering::Relaxed),
            bytes_uploaded: up_bytes,
            upload_mb_per_s: if up_ns == 0 {
                0.0
            } else {
                up_bytes as f64 / 1e6 / (up_ns as f64 / 1e9)
            },
            upload_lag_bytes: lag_bytes,
            upload_lag_seconds: lag_s,
            remote_errors: inner.remote.counters.errors.load(Ordering::Relaxed),
            last_error,
            generation: gen_,
            segments_in_bucket: nsegs,
            holder: inner.holder.name(),
            fencing,
            fenced: self.fenced(),
            durability: inner.opts.durability.to_string(),
            journal_entries: c.journal_entries.load(Ordering::Relaxed),
            journal_bytes: c.journal_bytes.load(Ordering::Relaxed),
        }
    }
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Store({})", self.inner.remote.display())
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<S3Store>();
}
