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
//! Lock order: `punch` (RwLock) before `index`; `up` is never held across
//! I/O to the remote.

use crate::manifest::{
    Fencing, Holder, MANIFEST_DIR, Manifest, MetaRef, SEGMENT_DIR, SegmentEntry, manifest_key,
    meta_key, parse_manifest_key, segment_key,
};
use crate::remote::{Remote, RemoteError};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use vpool_cache::CacheIndex;
use vpool_store::{LocalDirStore, OpenSegment, Result, SegmentId, SegmentStore, StoreError};

/// The store's own blobs in the cache directory; never uploaded. A
/// directory with `meta/s3-state` is an S3 pool's cache.
pub const STATE_META: &str = "s3-state";
const INDEX_META: &str = "s3-cache-index";
/// Dirty (not yet uploaded) bytes may take at most this share of the cache.
const DIRTY_SHARE: f64 = 0.75;
/// Read-ahead starts at this size for a sequential stream and doubles.
const READAHEAD_INITIAL_BYTES: u64 = 256 << 10;
/// A read this far past the end of the previous one still continues its
/// stream (record headers sit between a volume's consecutive blocks).
const STREAM_GAP_BYTES: u64 = 4096;
/// Sequential-stream trackers kept (one per segment being streamed).
const MAX_STREAMS: usize = 64;
/// Fetch locks, striped by (segment, 4 MiB region).
const FETCH_STRIPES: usize = 64;
const FETCH_REGION_SHIFT: u32 = 22;
/// Reads this small (a piece's checksums) do not move a stream's position.
const STREAM_MIN_READ_BYTES: u64 = 512;
/// Writable descriptors of cache files kept open.
const MAX_OPEN_FILES: usize = 128;
/// Opening retries this often when another host commits in between.
const MAX_OPEN_ATTEMPTS: u32 = 8;
/// Old manifests kept behind the current one, for inspection.
const MANIFESTS_KEPT: u64 = 4;

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
        "pool {url} is held by {host} (pid {pid}, since manifest generation {epoch}); \
         pass --force to take it over (the other host is fenced and stops writing)"
    )]
    Held {
        url: String,
        host: String,
        pid: u32,
        epoch: u64,
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
    #[error("corrupt pool state: {0}")]
    Corrupt(String),
    #[error("object store: {0}")]
    Remote(#[from] RemoteError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What this cache directory remembers about its pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LocalState {
    pool_id: String,
    holder_id: String,
    /// The last generation this cache committed.
    generation: u64,
}

#[derive(Debug)]
struct Dirty {
    len: u64,
    synced: u64,
    sealed_at: Option<Instant>,
    uploading: bool,
}

enum Op {
    Meta {
        name: String,
        data: Arc<Vec<u8>>,
        /// Every segment up to this one must be in the bucket first.
        needs: u64,
    },
    Delete(u64),
}

struct Up {
    manifest: Manifest,
    dirty: BTreeMap<u64, Dirty>,
    open: Option<u64>,
    ops: VecDeque<Op>,
    /// Deleted by the engine, still in the bucket until a commit drops it.
    hidden: BTreeSet<u64>,
    dirty_bytes: u64,
    /// Closing: the engine is done, the open segment counts as sealed.
    draining: bool,
    last_error: Option<String>,
}

impl Up {
    fn sealed_ready(&self, id: u64, d: &Dirty) -> bool {
        (d.sealed_at.is_some() || (self.draining && self.open == Some(id))) && d.synced >= d.len
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
}

struct Inner {
    local: LocalDirStore,
    remote: Arc<Remote>,
    opts: S3PoolOptions,
    holder: Holder,
    up: Mutex<Up>,
    up_cv: Condvar,
    index: Mutex<CacheIndex>,
    /// Readers hold it shared from "is it present" to "read it"; eviction
    /// holds it exclusive from choosing victims to punching them.
    punch: RwLock<()>,
    files: Mutex<HashMap<u64, Arc<File>>>,
    streams: Mutex<HashMap<u64, (u64, u64)>>,
    /// One fetch at a time per 4 MiB region (striped): concurrent misses on
    /// the same bytes (a sequential stream read at queue depth 8) wait for
    /// the first fetch and find the data present, instead of each fetching
    /// it again.
    fetching: Vec<Mutex<()>>,
    fenced: Mutex<Option<String>>,
    stop: AtomicBool,
    /// The engine's durable marks hold for this cache: it held this host's
    /// latest log when opened (see `SegmentStore::durable_marks_hold`).
    marks_hold: AtomicBool,
    counters: Counters,
    uploader: Mutex<Option<JoinHandle<()>>>,
    prefetcher: Mutex<Option<JoinHandle<()>>>,
}

/// A pool backend on an object store with a local cache. Cheap to clone.
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

/// What `vpool cache stats` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheStats {
    pub remote: String,
    pub cache_dir: String,
    pub cache_size_bytes: u64,
    pub cached_bytes: u64,
    pub dirty_bytes: u64,
    pub dirty_limit_bytes: u64,
    pub pinned_bytes: u64,
    pub read_hits: u64,
    pub read_misses: u64,
    pub hit_ratio: f64,
    pub bytes_read: u64,
    pub bytes_fetched: u64,
    pub read_errors: u64,
    pub segments_uploaded: u64,
    pub bytes_uploaded: u64,
    pub upload_mb_per_s: f64,
    /// Sealed bytes not yet in the bucket.
    pub upload_lag_bytes: u64,
    /// Age of the oldest sealed segment not yet in the bucket.
    pub upload_lag_seconds: f64,
    pub remote_errors: u64,
    pub last_error: Option<String>,
    pub generation: u64,
    pub segments_in_bucket: u64,
    pub holder: String,
    pub fencing: String,
    pub fenced: Option<String>,
}

fn now_unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn random_id() -> String {
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

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Checks that the store's create-only PUT is atomic: a repeat create must
/// fail, and of several racing creates of one key exactly one may win.
pub fn probe_fencing(remote: &Remote) -> std::result::Result<Fencing, String> {
    let key = format!("probe/{}", random_id());
    let deadline = || Some(Instant::now() + Duration::from_secs(30));
    remote
        .put_create(&key, Bytes::from_static(b"1"), deadline(), &|| false)
        .map_err(|e| format!("a create-only PUT failed: {e}"))?;
    let verdict = match remote.put_create(&key, Bytes::from_static(b"2"), deadline(), &|| false) {
        Err(RemoteError::AlreadyExists { .. }) => {
            // Race: every thread creates the same fresh key.
            let race_key = format!("probe/{}", random_id());
            let wins = AtomicU64::new(0);
            std::thread::scope(|s| {
                for i in 0..8u8 {
                    let (race_key, wins) = (&race_key, &wins);
                    s.spawn(move || {
                        if remote
                            .put_create(race_key, Bytes::from(vec![i]), deadline(), &|| false)
                            .is_ok()
                        {
                            wins.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            });
            let _ = remote.delete(&race_key, Instant::now() + Duration::from_secs(10));
            match wins.load(Ordering::SeqCst) {
                1 => Ok(Fencing::Atomic),
                n => Err(format!(
                    "{n} of 8 racing create-only PUTs of one key succeeded"
                )),
            }
        }
        Ok(()) => Err("a second create-only PUT of an existing key succeeded".into()),
        Err(e) => Err(format!("a create-only PUT failed: {e}")),
    };
    let _ = remote.delete(&key, Instant::now() + Duration::from_secs(10));
    verdict
}

impl S3Store {
    /// Opens (or creates) the pool at `remote` with its cache at
    /// `opts.cache_dir`. Call [`S3Store::start`] once the engine has opened
    /// the pool on it: uploads must not begin before recovery has cut any
    /// torn tail.
    pub fn open(remote: Remote, opts: S3PoolOptions) -> std::result::Result<S3Store, OpenError> {
        let remote = Arc::new(remote);
        // Another host may commit between our read of the latest manifest
        // and our commit of the next one (the holder we take over from is
        // still uploading): read again and retry.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::open_once(remote.clone(), opts.clone()) {
                Err(OpenError::LostRace { .. }) if attempt < MAX_OPEN_ATTEMPTS => {
                    tracing::info!(attempt, "another host committed while opening; retrying");
                    std::thread::sleep(Duration::from_millis(50 * attempt as u64));
                }
                other => return other,
            }
        }
    }

    fn open_once(
        remote: Arc<Remote>,
        opts: S3PoolOptions,
    ) -> std::result::Result<S3Store, OpenError> {
        assert!(opts.upload_parallelism >= 1 && opts.upload_parallelism <= 64);
        let url = remote.display().to_string();
        let local = LocalDirStore::open(&opts.cache_dir)?;
        let dir = opts.cache_dir.display().to_string();
        let state: Option<LocalState> = match local.get_meta(STATE_META)? {
            Some(b) => Some(
                serde_json::from_slice(&b)
                    .map_err(|e| OpenError::Corrupt(format!("{dir}/meta/{STATE_META}: {e}")))?,
            ),
            None => None,
        };
        let deadline = || Instant::now() + Duration::from_secs(60);
        let latest = remote
            .list(MANIFEST_DIR, deadline())?
            .iter()
            .filter_map(|(k, _)| parse_manifest_key(k))
            .max();
        let holder_id = state
            .as_ref()
            .map(|s| s.holder_id.clone())
            .unwrap_or_else(random_id);
        let (base, fresh_pool) = match (opts.mode, latest) {
            (OpenMode::Create { .. }, Some(_)) => return Err(OpenError::PoolExists { url }),
            (OpenMode::Open { .. }, None) => return Err(OpenError::NoPool { url }),
            (
                OpenMode::Create {
                    allow_unsafe_fencing,
                },
                None,
            ) => {
                if !local.list_segments()?.is_empty() || state.is_some() {
                    return Err(OpenError::ForeignCache {
                        dir,
                        other: "a cache directory in use".into(),
                    });
                }
                let fencing = match probe_fencing(&remote) {
                    Ok(f) => f,
                    Err(detail) if allow_unsafe_fencing => {
                        tracing::warn!(store = %url, %detail, "conditional create is not atomic: this pool must only ever be written from one host");
                        Fencing::Unsafe
                    }
                    Err(detail) => return Err(OpenError::UnsafeFencing { url, detail }),
                };
                (Manifest::new(random_id(), fencing), true)
            }
            (OpenMode::Open { force }, Some(g)) => {
                let bytes = remote
                    .get(&manifest_key(g), deadline())?
                    .ok_or_else(|| OpenError::Corrupt(format!("manifest {g} vanished")))?;
                let m = Manifest::decode(&bytes)
                    .map_err(|e| OpenError::Corrupt(format!("manifest {g}: {e}")))?;
                if m.generation != g {
                    return Err(OpenError::Corrupt(format!(
                        "manifest {g} says it is generation {}",
                        m.generation
                    )));
                }
                if let Some(s) = &state
                    && s.pool_id != m.pool_id
                {
                    return Err(OpenError::ForeignCache {
                        dir,
                        other: s.pool_id.clone(),
                    });
                }
                if let Some(h) = &m.holder
                    && h.id != holder_id
                {
                    if !force {
                        return Err(OpenError::Held {
                            url,
                            host: h.host.clone(),
                            pid: h.pid,
                            epoch: h.epoch,
                        });
                    }
                    tracing::warn!(store = %url, host = %h.host, pid = h.pid, epoch = h.epoch, "taking the pool over; the old holder is fenced");
                }
                (m, false)
            }
        };
        // Is the cache's content from this pool's current history?
        let ours_last = base.holder.as_ref().is_some_and(|h| h.id == holder_id)
            || state
                .as_ref()
                .is_some_and(|s| s.generation == base.generation);
        let stale = !fresh_pool && !ours_last;
        if stale {
            wipe_cache(&local, &base)?;
        }
        let generation = base.generation + 1;
        let holder = Holder {
            id: holder_id,
            host: hostname(),
            pid: std::process::id(),
            epoch: generation,
        };
        let store = S3Store {
            inner: Arc::new(Inner {
                local,
                remote,
                holder,
                index: Mutex::new(CacheIndex::new(opts.cache_size_bytes)),
                opts,
                up: Mutex::new(Up {
                    manifest: base,
                    dirty: BTreeMap::new(),
                    open: None,
                    ops: VecDeque::new(),
                    hidden: BTreeSet::new(),
                    dirty_bytes: 0,
                    draining: false,
                    last_error: None,
                }),
                up_cv: Condvar::new(),
                punch: RwLock::new(()),
                files: Mutex::new(HashMap::new()),
                streams: Mutex::new(HashMap::new()),
                fetching: (0..FETCH_STRIPES).map(|_| Mutex::new(())).collect(),
                fenced: Mutex::new(None),
                stop: AtomicBool::new(false),
                marks_hold: AtomicBool::new(true),
                counters: Counters::default(),
                uploader: Mutex::new(None),
                prefetcher: Mutex::new(None),
            }),
        };
        store.reconcile(stale)?;
        // Take the lease: our commit of the next generation.
        let mut m = store.inner.up.lock().manifest.clone();
        m.generation = generation;
        m.holder = Some(store.inner.holder.clone());
        match store.inner.remote.put_create(
            &manifest_key(generation),
            Bytes::from(m.encode()),
            Some(deadline()),
            &|| false,
        ) {
            Ok(()) => {}
            Err(RemoteError::AlreadyExists { .. }) => {
                return Err(OpenError::LostRace {
                    url: store.inner.remote.display().to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        store.inner.up.lock().manifest = m;
        store.save_state(generation)?;
        tracing::info!(store = %store.inner.remote.display(), generation, "pool lease taken");
        Ok(store)
    }

    /// Brings the cache directory in line with the manifest: placeholders
    /// for segments only in the bucket, metadata fetched or queued, dirty
    /// segments found, the read index loaded (after a clean close) or
    /// rebuilt empty (after a crash, the cached copies are dropped).
    fn reconcile(&self, stale: bool) -> std::result::Result<(), OpenError> {
        let inner = &self.inner;
        let m = inner.up.lock().manifest.clone();
        let local_segs: BTreeMap<u64, u64> = inner
            .local
            .list_segments()?
            .into_iter()
            .map(|(id, len)| (id.0, len))
            .collect();
        let max_uploaded = m.segments.last().map(|s| s.id).unwrap_or(0);
        for s in &m.segments {
            match local_segs.get(&s.id) {
                Some(&len) if len == s.len => {}
                Some(&len) if len > s.len => {
                    return Err(OpenError::Corrupt(format!(
                        "cached segment {} is longer ({len}) than in the bucket ({})",
                        s.id, s.len
                    )));
                }
                _ => inner.local.create_placeholder(SegmentId(s.id), s.len)?,
            }
        }
        let mut dirty = BTreeMap::new();
        for (&id, &len) in &local_segs {
            if m.segment(id).is_some() {
                continue;
            }
            if id <= max_uploaded {
                // Dropped from the bucket by a commit; the local delete was
                // still to come.
                inner.local.delete_segment(SegmentId(id))?;
                continue;
            }
            dirty.insert(
                id,
                Dirty {
                    len,
                    synced: len,
                    sealed_at: Some(Instant::now()),
                    uploading: false,
                },
            );
        }
        // Metadata: the bucket's, unless the cache has a newer one to send.
        let mut ops = VecDeque::new();
        let needs = dirty.keys().next_back().copied().unwrap_or(0);
        let mut from_bucket = false;
        for (name, r) in &m.meta {
            let local = inner.local.get_meta(name)?;
            let same = local
                .as_ref()
                .is_some_and(|d| d.len() as u64 == r.len && crc32c::crc32c(d) == r.crc32c);
            if same {
                continue;
            }
            match local {
                Some(d) if !stale => ops.push_back(Op::Meta {
                    name: name.clone(),
                    data: Arc::new(d),
                    needs,
                }),
                _ => {
                    let d = inner
                        .remote
                        .get(&r.key, Instant::now() + Duration::from_secs(120))?
                        .ok_or_else(|| OpenError::Corrupt(format!("{} is missing", r.key)))?;
                    if d.len() as u64 != r.len || crc32c::crc32c(&d) != r.crc32c {
                        return Err(OpenError::Corrupt(format!(
                            "{} does not match its checksum",
                            r.key
                        )));
                    }
                    inner.local.put_meta(name, &d)?;
                    from_bucket = true;
                }
            }
        }
        // The engine's metadata came from the bucket: the cache did not hold
        // this host's latest log, and the bucket's copy may end earlier.
        inner.marks_hold.store(!from_bucket, Ordering::Release);
        for name in engine_meta_names(&inner.local)? {
            if !m.meta.contains_key(&name)
                && let Some(d) = inner.local.get_meta(&name)?
            {
                ops.push_back(Op::Meta {
                    name,
                    data: Arc::new(d),
                    needs,
                });
            }
        }
        // The read index: exact after a clean close, empty after a crash.
        // An empty blob is the marker left while a store is open.
        let saved = if stale {
            None
        } else {
            inner.local.get_meta(INDEX_META)?.filter(|b| !b.is_empty())
        };
        let mut index = match saved.map(|b| CacheIndex::decode(&b, inner.opts.cache_size_bytes)) {
            Some(Ok(ix)) => ix,
            other => {
                if let Some(Err(e)) = other {
                    tracing::warn!(error = %e, "cache index unreadable; starting cold");
                }
                for s in &m.segments {
                    if local_segs.get(&s.id) == Some(&s.len) {
                        punch_file(&inner.local.segment_path(SegmentId(s.id)), 0, s.len)?;
                    }
                }
                CacheIndex::new(inner.opts.cache_size_bytes)
            }
        };
        // A crash from here on must not trust the saved index.
        inner.local.put_meta(INDEX_META, b"")?;
        for seg in index.segment_ids() {
            if m.segment(seg).is_none() {
                index.remove_segment(seg);
            }
        }
        let mut up = inner.up.lock();
        up.dirty_bytes = dirty.values().map(|d| d.len).sum();
        up.dirty = dirty;
        up.ops = ops;
        index.set_capacity(self.clean_capacity(up.dirty_bytes));
        *inner.index.lock() = index;
        Ok(())
    }

    fn dirty_limit(&self) -> u64 {
        (self.inner.opts.cache_size_bytes as f64 * DIRTY_SHARE) as u64
    }

    fn clean_capacity(&self, dirty_bytes: u64) -> u64 {
        self.inner.opts.cache_size_bytes.saturating_sub(dirty_bytes)
    }

    fn save_state(&self, generation: u64) -> Result<()> {
        let st = LocalState {
            pool_id: self.inner.up.lock().manifest.pool_id.clone(),
            holder_id: self.inner.holder.id.clone(),
            generation,
        };
        self.inner
            .local
            .put_meta(STATE_META, &serde_json::to_vec(&st).expect("serializes"))
    }

    /// Starts the uploader. Call after the engine opened the pool.
    pub fn start(&self) -> Result<()> {
        let s = self.clone();
        let h = std::thread::Builder::new()
            .name("vpool-s3-upload".into())
            .spawn(move || {
                s.collect_orphans();
                s.upload_loop()
            })
            .map_err(|e| StoreError::io("spawning the uploader", e))?;
        *self.inner.uploader.lock() = Some(h);
        Ok(())
    }

    /// Uploads what is left (the open segment too: the engine must be closed
    /// first), commits a manifest that releases the lease, and saves the read
    /// index. Returns false if the store could not take everything in time:
    /// the rest stays in the cache and goes up when the pool is next opened.
    pub fn close(&self) -> bool {
        {
            let mut up = self.inner.up.lock();
            up.draining = true;
        }
        self.inner.up_cv.notify_all();
        let deadline = Instant::now() + self.inner.opts.drain_timeout;
        loop {
            let done = {
                let up = self.inner.up.lock();
                up.dirty.is_empty() && up.ops.is_empty()
            };
            if done || Instant::now() >= deadline || self.fenced().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.up_cv.notify_all();
        if let Some(h) = self.inner.uploader.lock().take() {
            let _ = h.join();
        }
        if let Some(h) = self.inner.prefetcher.lock().take() {
            let _ = h.join();
        }
        let (drained, mut m) = {
            let up = self.inner.up.lock();
            (
                up.dirty.is_empty() && up.ops.is_empty(),
                up.manifest.clone(),
            )
        };
        if self.fenced().is_some() {
            return false;
        }
        if drained {
            m.generation += 1;
            m.holder = None;
            match self.inner.remote.put_create(
                &manifest_key(m.generation),
                Bytes::from(m.encode()),
                Some(Instant::now() + Duration::from_secs(10)),
                &|| false,
            ) {
                Ok(()) => {
                    let _ = self.save_state(m.generation);
                    tracing::info!(generation = m.generation, "pool released");
                }
                Err(e) => tracing::warn!(error = %e, "could not release the pool's lease"),
            }
        } else {
            tracing::warn!(
                "closing with data not yet in the object store; it stays in the cache and is uploaded when the pool is next opened"
            );
        }
        // The saved index may only name data that is on disk.
        let files: Vec<Arc<File>> = self.inner.files.lock().drain().map(|(_, f)| f).collect();
        if files.iter().all(|f| f.sync_data().is_ok()) {
            let bytes = self.inner.index.lock().encode();
            if let Err(e) = self.inner.local.put_meta(INDEX_META, &bytes) {
                tracing::warn!(error = %e, "could not save the cache index");
            }
        }
        drained
    }

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

    /// Waits until nothing sealed is waiting for upload, or `timeout`.
    pub fn wait_uploaded(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let up = self.inner.up.lock();
                let pending = up.ops.len()
                    + up.dirty
                        .iter()
                        .filter(|(id, d)| up.open != Some(**id) || d.len > 64)
                        .count();
                if pending == 0 {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The manifest generation last committed.
    pub fn generation(&self) -> u64 {
        self.inner.up.lock().manifest.generation
    }

    pub fn stats(&self) -> CacheStats {
        let inner = &self.inner;
        let c = &inner.counters;
        let (dirty_bytes, lag_bytes, lag_s, gen_, nsegs, fencing, last_error) = {
            let up = inner.up.lock();
            let sealed: Vec<&Dirty> = up
                .dirty
                .iter()
                .filter(|(id, _)| up.open != Some(**id))
                .map(|(_, d)| d)
                .collect();
            (
                up.dirty_bytes,
                sealed.iter().map(|d| d.len).sum(),
                sealed
                    .iter()
                    .filter_map(|d| d.sealed_at)
                    .min()
                    .map(|t| t.elapsed().as_secs_f64())
                    .unwrap_or(0.0),
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
            cache_size_bytes: inner.opts.cache_size_bytes,
            cached_bytes: ix.used_bytes,
            dirty_bytes,
            dirty_limit_bytes: self.dirty_limit(),
            pinned_bytes: ix.pinned_bytes,
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
            holder: format!("{}:{}", inner.holder.host, inner.holder.pid),
            fencing,
            fenced: self.fenced(),
        }
    }

    /// Keeps these log ranges resident (a pinned volume or snapshot) and
    /// fetches what of them is missing, in the background.
    pub fn set_pins(&self, pins: Vec<(SegmentId, Range<u64>)>) {
        let pins: Vec<(u64, Range<u64>)> = pins.into_iter().map(|(s, r)| (s.0, r)).collect();
        let missing = {
            let _g = self.inner.punch.write();
            self.inner.index.lock().set_pins(&pins)
        };
        // Only uploaded segments are ever missing; dirty ones are whole.
        let missing: Vec<(u64, Range<u64>)> = {
            let up = self.inner.up.lock();
            missing
                .into_iter()
                .filter(|(s, _)| !up.hidden.contains(s) && !up.dirty.contains_key(s))
                .filter_map(|(s, r)| {
                    // Pins are sector-rounded: clip to the object's end.
                    let len = up.manifest.segment(s)?.len;
                    (r.start < len).then(|| (s, r.start..r.end.min(len)))
                })
                .collect()
        };
        if missing.is_empty() {
            return;
        }
        let s = self.clone();
        let mut slot = self.inner.prefetcher.lock();
        if let Some(h) = slot.take() {
            let _ = h.join();
        }
        *slot = std::thread::Builder::new()
            .name("vpool-s3-prefetch".into())
            .spawn(move || {
                let mut buf = Vec::new();
                for (seg, r) in missing {
                    let mut at = r.start;
                    while at < r.end && !s.inner.stop.load(Ordering::Relaxed) {
                        let n = (r.end - at).min(4 << 20);
                        buf.resize(n as usize, 0);
                        if let Err(e) = s.read_at(SegmentId(seg), at, &mut buf) {
                            tracing::warn!(segment = seg, error = %e, "prefetch of pinned data failed");
                            break;
                        }
                        at += n;
                    }
                }
            })
            .ok();
    }

    // ----- the uploader -----

    fn upload_loop(&self) {
        let inner = &self.inner;
        loop {
            // Phase 1: pick work.
            let (batch, ops, epoch) = {
                let mut up = inner.up.lock();
                loop {
                    if inner.stop.load(Ordering::SeqCst) || inner.fenced.lock().is_some() {
                        return;
                    }
                    let mut batch: Vec<(u64, u64)> = Vec::new();
                    for (&id, d) in &up.dirty {
                        if batch.len() >= inner.opts.upload_parallelism || !up.sealed_ready(id, d) {
                            break;
                        }
                        batch.push((id, d.len));
                    }
                    let after_batch = |id: u64| {
                        up.dirty
                            .range(..=id)
                            .all(|(k, _)| batch.iter().any(|(b, _)| b == k))
                    };
                    let mut n_ops = 0;
                    for op in &up.ops {
                        let ready = match op {
                            Op::Meta { needs, .. } => after_batch(*needs),
                            Op::Delete(id) => after_batch(*id),
                        };
                        if !ready {
                            break;
                        }
                        n_ops += 1;
                    }
                    if !batch.is_empty() || n_ops > 0 {
                        for (id, _) in &batch {
                            up.dirty.get_mut(id).expect("dirty").uploading = true;
                        }
                        let ops: Vec<Op> = up.ops.drain(..n_ops).collect();
                        break (batch, ops, inner.holder.epoch);
                    }
                    inner.up_cv.wait_for(&mut up, Duration::from_millis(500));
                }
            };
            // Phase 2: upload segments and metadata blobs.
            let give_up = || inner.stop.load(Ordering::SeqCst) || inner.fenced.lock().is_some();
            let started = Instant::now();
            let results: Vec<std::result::Result<(), String>> = std::thread::scope(|s| {
                let handles: Vec<_> = batch
                    .iter()
                    .map(|&(id, len)| {
                        s.spawn(move || self.upload_segment(id, len, epoch, &give_up))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| Err("upload thread panicked".into()))
                    })
                    .collect()
            });
            if let Some(Err(e)) = results.iter().find(|r| r.is_err()) {
                // PUTs retry until stop or fencing; what else fails here is
                // reading the cache's own file. Put everything back, in
                // order, and try again (or leave it to the next open).
                {
                    let mut up = inner.up.lock();
                    up.last_error = Some(e.clone());
                    for (id, _) in &batch {
                        if let Some(d) = up.dirty.get_mut(id) {
                            d.uploading = false;
                        }
                    }
                    for op in ops.into_iter().rev() {
                        up.ops.push_front(op);
                    }
                }
                if give_up() {
                    return;
                }
                tracing::error!(error = %e, "upload failed; retrying in a second");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            let batch_bytes: u64 = batch.iter().map(|(_, l)| l).sum();
            if batch_bytes > 0 {
                inner
                    .counters
                    .upload_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            let mut m = inner.up.lock().manifest.clone();
            let generation = m.generation + 1;
            for &(id, len) in &batch {
                m.segments.push(SegmentEntry { id, len, epoch });
            }
            m.segments.sort_by_key(|s| s.id);
            let mut dropped_segments: Vec<SegmentEntry> = Vec::new();
            let mut dropped_meta: Vec<String> = Vec::new();
            for op in &ops {
                match op {
                    Op::Meta { name, data, .. } => {
                        let key = meta_key(name, epoch, generation);
                        if let Err(e) =
                            inner
                                .remote
                                .put(&key, Bytes::from(data.to_vec()), None, &give_up)
                        {
                            inner.up.lock().last_error = Some(e.to_string());
                            return;
                        }
                        let r = MetaRef {
                            key,
                            len: data.len() as u64,
                            crc32c: crc32c::crc32c(data),
                        };
                        if let Some(old) = m.meta.insert(name.clone(), r) {
                            dropped_meta.push(old.key);
                        }
                    }
                    Op::Delete(id) => {
                        if let Ok(i) = m.segments.binary_search_by_key(id, |s| s.id) {
                            dropped_segments.push(m.segments.remove(i));
                        }
                    }
                }
            }
            // Phase 3: commit.
            m.generation = generation;
            m.holder = Some(inner.holder.clone());
            if !self.commit(&m, &give_up) {
                return;
            }
            let _ = self.save_state(generation);
            // Phase 4: the bucket has it; update the cache.
            {
                let mut up = inner.up.lock();
                for &(id, len) in &batch {
                    if up.dirty.remove(&id).is_some() {
                        up.dirty_bytes -= len;
                    }
                }
                for s in &dropped_segments {
                    up.hidden.remove(&s.id);
                }
                up.manifest = m;
                up.last_error = None;
            }
            inner.up_cv.notify_all();
            inner
                .counters
                .segments_uploaded
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            inner
                .counters
                .bytes_uploaded
                .fetch_add(batch_bytes, Ordering::Relaxed);
            {
                let _g = inner.punch.write();
                let mut ix = inner.index.lock();
                for &(id, len) in &batch {
                    if len > 0 {
                        ix.insert(id, 0..len, len);
                    }
                }
                for s in &dropped_segments {
                    ix.remove_segment(s.id);
                }
            }
            for s in &dropped_segments {
                inner.files.lock().remove(&s.id);
                if let Err(e) = inner.local.delete_segment(SegmentId(s.id)) {
                    tracing::warn!(segment = s.id, error = %e, "could not delete a cached segment");
                }
            }
            self.evict();
            // Best effort: what no manifest names any more.
            let soon = Instant::now() + Duration::from_secs(10);
            for s in &dropped_segments {
                let _ = inner.remote.delete(&segment_key(s.id, s.epoch), soon);
            }
            for k in &dropped_meta {
                let _ = inner.remote.delete(k, soon);
            }
            if generation > MANIFESTS_KEPT {
                let _ = inner
                    .remote
                    .delete(&manifest_key(generation - MANIFESTS_KEPT - 1), soon);
            }
        }
    }

    /// Deletes objects that no manifest names and that an earlier holder
    /// wrote (uploads a crash or a takeover left uncommitted). Keys of this
    /// holder's own epoch are never touched: they may be about to be
    /// committed. Best effort: an error only leaves garbage behind.
    fn collect_orphans(&self) -> u64 {
        let inner = &self.inner;
        let epoch = inner.holder.epoch;
        let deadline = || Instant::now() + Duration::from_secs(30);
        let m = inner.up.lock().manifest.clone();
        let listed_meta: BTreeSet<&str> = m.meta.values().map(|r| r.key.as_str()).collect();
        let mut deleted = 0;
        for dir in [SEGMENT_DIR, crate::manifest::META_DIR] {
            let Ok(keys) = inner.remote.list(dir, deadline()) else {
                return deleted;
            };
            for (key, _) in keys {
                let Some(key_epoch) = crate::manifest::key_epoch(&key) else {
                    continue;
                };
                let referenced = if dir == SEGMENT_DIR {
                    crate::manifest::parse_segment_key(&key)
                        .and_then(|(id, e)| m.segment(id).map(|s| s.epoch == e))
                        .unwrap_or(false)
                } else {
                    listed_meta.contains(key.as_str())
                };
                if !referenced
                    && key_epoch < epoch
                    && !inner.stop.load(Ordering::SeqCst)
                    && inner.remote.delete(&key, deadline()).is_ok()
                {
                    deleted += 1;
                }
            }
        }
        if deleted > 0 {
            tracing::info!(
                objects = deleted,
                "deleted objects no manifest names (left by a crash or a takeover)"
            );
        }
        deleted
    }

    fn upload_segment(
        &self,
        id: u64,
        len: u64,
        epoch: u64,
        give_up: &dyn Fn() -> bool,
    ) -> std::result::Result<(), String> {
        let path = self.inner.local.segment_path(SegmentId(id));
        // Only durable bytes go up: the bucket must never hold more than a
        // crash of this host could leave in the cache.
        let data = (|| -> std::io::Result<Vec<u8>> {
            let mut f = File::open(&path)?;
            f.sync_data()?;
            // read_to_end fills spare capacity without zeroing it first.
            let mut buf = Vec::with_capacity(len as usize);
            std::io::Read::read_to_end(&mut std::io::Read::take(&mut f, len), &mut buf)?;
            if buf.len() as u64 != len {
                return Err(std::io::Error::other(format!(
                    "{} bytes where {len} were sealed",
                    buf.len()
                )));
            }
            Ok(buf)
        })()
        .map_err(|e| format!("reading {} for upload: {e}", path.display()))?;
        self.inner
            .remote
            .put(&segment_key(id, epoch), Bytes::from(data), None, give_up)
            .map_err(|e| e.to_string())
    }

    /// Creates manifest `m.generation`. False if fenced or stopping.
    fn commit(&self, m: &Manifest, give_up: &dyn Fn() -> bool) -> bool {
        let inner = &self.inner;
        let key = manifest_key(m.generation);
        let bytes = m.encode();
        match inner
            .remote
            .put_create(&key, Bytes::from(bytes.clone()), None, give_up)
        {
            Ok(()) => true,
            Err(RemoteError::AlreadyExists { .. }) => {
                // Our own earlier attempt may have landed with its answer lost.
                let theirs = inner
                    .remote
                    .get(&key, Instant::now() + Duration::from_secs(30))
                    .ok()
                    .flatten();
                if theirs.as_deref() == Some(&bytes[..]) {
                    return true;
                }
                let who = theirs
                    .and_then(|b| Manifest::decode(&b).ok())
                    .and_then(|m| m.holder)
                    .map(|h| format!("{} (pid {})", h.host, h.pid))
                    .unwrap_or_else(|| "another host".into());
                let detail = format!(
                    "pool {} was taken over by {who} at manifest generation {}; this host stopped writing to it",
                    inner.remote.display(),
                    m.generation
                );
                tracing::error!(%detail, "fenced");
                *inner.fenced.lock() = Some(detail);
                inner.up_cv.notify_all();
                false
            }
            Err(e) => {
                inner.up.lock().last_error = Some(e.to_string());
                false
            }
        }
    }

    // ----- the read cache -----

    fn cache_file(&self, id: u64) -> Result<Arc<File>> {
        if let Some(f) = self.inner.files.lock().get(&id) {
            return Ok(f.clone());
        }
        let path = self.inner.local.segment_path(SegmentId(id));
        let f = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?,
        );
        let mut files = self.inner.files.lock();
        if files.len() >= MAX_OPEN_FILES
            && let Some(k) = files.keys().next().copied()
            && let Some(old) = files.remove(&k)
        {
            // Fills are clean data, but a saved index may only name durable bytes.
            let _ = old.sync_data();
        }
        files.insert(id, f.clone());
        Ok(f)
    }

    /// Punches out what the index gives up to fit its capacity.
    fn evict(&self) {
        let dirty = self.inner.up.lock().dirty_bytes;
        let _g = self.inner.punch.write();
        let victims = {
            let mut ix = self.inner.index.lock();
            ix.set_capacity(self.clean_capacity(dirty));
            ix.evict()
        };
        for (seg, r) in victims {
            if let Ok(f) = self.cache_file(seg)
                && let Err(e) = punch_fd(&f, r.start, r.end - r.start)
            {
                tracing::warn!(segment = seg, error = %e, "could not punch an evicted cache range");
            }
        }
    }

    /// Gives back every clean, unpinned cached byte (the cache's disk is
    /// full). The budget comes back with the next ordinary eviction.
    fn evict_all_clean(&self) {
        let _g = self.inner.punch.write();
        let victims = {
            let mut ix = self.inner.index.lock();
            ix.set_capacity(0);
            ix.evict()
        };
        for (seg, r) in victims {
            if let Ok(f) = self.cache_file(seg) {
                let _ = punch_fd(&f, r.start, r.end - r.start);
            }
        }
    }

    /// Read-ahead: a read that starts where the last one of this segment
    /// ended is a stream, and fetches grow to `readahead_max_bytes`.
    fn readahead(&self, id: u64, offset: u64, len: u64) -> u64 {
        if len < STREAM_MIN_READ_BYTES {
            // The checksums of a piece, read apart from its data: not part
            // of the stream, and must not break it.
            return 0;
        }
        let mut streams = self.inner.streams.lock();
        // Consecutive blocks of a volume sit a record header apart in the
        // log, so "starts where the last read ended" allows a small gap.
        let window = match streams.get(&id) {
            Some(&(next, w)) if offset >= next && offset - next <= STREAM_GAP_BYTES => {
                (w * 2).min(self.inner.opts.readahead_max_bytes)
            }
            _ => 0,
        };
        if streams.len() >= MAX_STREAMS && !streams.contains_key(&id) {
            streams.clear();
        }
        streams.insert(id, (offset + len, window.max(READAHEAD_INITIAL_BYTES / 2)));
        window
    }

    fn read_uploaded(&self, id: u64, seg_len: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let inner = &self.inner;
        let len = buf.len() as u64;
        let end =
            offset
                .checked_add(len)
                .filter(|&e| e <= seg_len)
                .ok_or(StoreError::ShortRead {
                    segment: SegmentId(id),
                    offset,
                    len: buf.len(),
                    size: seg_len,
                })?;
        let ahead = self.readahead(id, offset, len);
        let file = self.cache_file(id)?;
        let deadline = Instant::now() + inner.opts.read_timeout;
        let mut first = true;
        loop {
            {
                let _g = inner.punch.read();
                let missing = inner.index.lock().missing(id, offset, len, seg_len);
                if missing.is_empty() {
                    file.read_exact_at(buf, offset)
                        .map_err(|e| StoreError::io(format!("reading cached segment {id}"), e))?;
                    let c = &inner.counters;
                    if first {
                        // Only a read that found its data counts as a hit
                        // for eviction: a scan that fills the cache must
                        // not promote what it filled.
                        inner.index.lock().touch(id, offset, len);
                        c.read_hits.fetch_add(1, Ordering::Relaxed);
                    }
                    c.bytes_read.fetch_add(len, Ordering::Relaxed);
                    return Ok(());
                }
                if first {
                    inner.counters.read_misses.fetch_add(1, Ordering::Relaxed);
                }
            }
            if Instant::now() >= deadline {
                inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                return Err(unavailable(
                    format!("reading segment {id} at {offset}"),
                    "the data kept being evicted before it could be read",
                ));
            }
            // Fetch the missing runs (the last one stretched for read-ahead),
            // unless a concurrent fetch of the same region brought them.
            let stripe = (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (offset >> FETCH_REGION_SHIFT))
                as usize
                % FETCH_STRIPES;
            let _fetching = inner.fetching[stripe].lock();
            let mut missing = inner.index.lock().missing(id, offset, len, seg_len);
            if missing.is_empty() {
                continue;
            }
            if first
                && ahead > 0
                && let Some(last) = missing.last_mut()
            {
                last.end = round_up(end + ahead, vpool_cache::SECTOR_BYTES).min(seg_len);
                let more =
                    inner
                        .index
                        .lock()
                        .missing(id, last.start, last.end - last.start, seg_len);
                missing.pop();
                missing.extend(more);
            }
            first = false;
            let key = {
                let up = inner.up.lock();
                match up.manifest.segment(id) {
                    Some(s) => segment_key(id, s.epoch),
                    None => {
                        return Err(StoreError::NotFound {
                            what: format!("segment {id}"),
                        });
                    }
                }
            };
            let mut fetched: Vec<(u64, Bytes)> = Vec::with_capacity(missing.len());
            for r in &missing {
                match inner.remote.get_range(&key, r.clone(), deadline) {
                    Ok(b) => {
                        inner
                            .counters
                            .bytes_fetched
                            .fetch_add(b.len() as u64, Ordering::Relaxed);
                        fetched.push((r.start, b));
                    }
                    Err(e) => {
                        inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(segment = id, offset, len, error = %e, "read of uncached data failed");
                        inner.up.lock().last_error = Some(e.to_string());
                        return Err(unavailable(format!("reading segment {id} at {offset}"), e));
                    }
                }
            }
            let filled = {
                let _g = inner.punch.read();
                let written = fetched
                    .iter()
                    .try_for_each(|(at, b)| file.write_all_at(b, *at));
                if written.is_ok() {
                    let mut ix = inner.index.lock();
                    for (at, b) in &fetched {
                        ix.insert(id, *at..*at + b.len() as u64, seg_len);
                    }
                }
                written
            };
            if let Err(e) = filled {
                // The cache's disk is full (or failing): give back clean
                // copies and serve this read straight from the store. What
                // was half written is not in the index, so never read.
                tracing::warn!(segment = id, error = %e, "could not fill the cache; reading around it");
                self.evict_all_clean();
                let b = inner
                    .remote
                    .get_range(&key, offset..end, deadline)
                    .map_err(|e| unavailable(format!("reading segment {id} at {offset}"), e))?;
                inner
                    .counters
                    .bytes_fetched
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                buf.copy_from_slice(&b);
                return Ok(());
            }
            self.evict();
        }
    }
}

/// True if `dir` is (or was) the cache directory of an S3 pool: serving it
/// as a local pool would fork its history.
pub fn is_cache_dir(dir: &std::path::Path) -> bool {
    dir.join("meta").join(STATE_META).exists()
}

fn engine_meta_names(local: &LocalDirStore) -> Result<Vec<String>> {
    let dir = local.root().join("meta");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).map_err(|e| StoreError::io("listing cache metadata", e))? {
        let e = e.map_err(|e| StoreError::io("listing cache metadata", e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("s3-") && !name.starts_with('.') && !name.ends_with(".tmp") {
            out.push(name);
        }
    }
    Ok(out)
}

/// Empties a cache directory whose content is not this pool's history any
/// more (another host wrote since): its un-uploaded writes were fenced out.
fn wipe_cache(local: &LocalDirStore, m: &Manifest) -> Result<()> {
    let segs = local.list_segments()?;
    let unsent: u64 = segs
        .iter()
        .filter(|(id, _)| m.segment(id.0).is_none())
        .map(|(_, l)| l)
        .sum();
    if !segs.is_empty() {
        tracing::warn!(
            segments = segs.len(),
            unsent_bytes = unsent,
            "the cache is from before another host wrote to the pool; discarding it (writes that never reached the bucket are lost to the takeover)"
        );
    }
    for (id, _) in segs {
        local.delete_segment(id)?;
    }
    for name in engine_meta_names(local)? {
        let p = local.root().join("meta").join(&name);
        std::fs::remove_file(&p)
            .map_err(|e| StoreError::io(format!("removing {}", p.display()), e))?;
    }
    Ok(())
}

fn punch_file(path: &std::path::Path, offset: u64, len: u64) -> Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
    punch_fd(&f, offset, len).map_err(|e| StoreError::io(format!("punching {}", path.display()), e))
}

fn punch_fd(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: fallocate on an owned, valid descriptor.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

// ----- the engine's view -----

struct S3OpenSegment {
    store: S3Store,
    local: Box<dyn OpenSegment>,
}

impl OpenSegment for S3OpenSegment {
    fn id(&self) -> SegmentId {
        self.local.id()
    }

    fn append_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        self.store.check_fenced()?;
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        let deadline = Instant::now() + self.store.inner.opts.backpressure_timeout;
        loop {
            match self.local.append_at(offset, bufs) {
                Ok(()) => break,
                Err(StoreError::NoSpace { context, source }) => {
                    // The cache's disk is full: give back clean copies and
                    // wait for uploads to turn dirty bytes clean.
                    if Instant::now() >= deadline {
                        return Err(StoreError::NoSpace { context, source });
                    }
                    tracing::warn!("cache disk full; evicting clean data and waiting for uploads");
                    self.store.evict_all_clean();
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
        let id = self.local.id().0;
        let mut up = self.store.inner.up.lock();
        if let Some(d) = up.dirty.get_mut(&id) {
            let new_len = d.len.max(offset + total);
            let grew = new_len - d.len;
            d.len = new_len;
            up.dirty_bytes += grew;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.store.check_fenced()?;
        let id = self.local.id().0;
        let len = self.store.inner.up.lock().dirty.get(&id).map(|d| d.len);
        self.local.sync()?;
        if let Some(len) = len {
            let mut up = self.store.inner.up.lock();
            if let Some(d) = up.dirty.get_mut(&id) {
                d.synced = d.synced.max(len);
            }
        }
        self.store.inner.up_cv.notify_all();
        Ok(())
    }
}

impl SegmentStore for S3Store {
    fn create_segment(&self, id: SegmentId) -> Result<Box<dyn OpenSegment>> {
        self.check_fenced()?;
        {
            let up = self.inner.up.lock();
            if up.manifest.segment(id.0).is_some() {
                return Err(StoreError::AlreadyExists {
                    what: format!("segment {id} (in the bucket)"),
                });
            }
        }
        let local = self.inner.local.create_segment(id)?;
        let mut up = self.inner.up.lock();
        if let Some(prev) = up.open.replace(id.0)
            && let Some(d) = up.dirty.get_mut(&prev)
        {
            d.sealed_at = Some(Instant::now());
        }
        up.dirty.insert(
            id.0,
            Dirty {
                len: 0,
                synced: 0,
                sealed_at: None,
                uploading: false,
            },
        );
        drop(up);
        self.inner.up_cv.notify_all();
        Ok(Box::new(S3OpenSegment {
            store: self.clone(),
            local,
        }))
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let seg_len = {
            let up = self.inner.up.lock();
            if up.hidden.contains(&id.0) {
                return Err(StoreError::NotFound {
                    what: format!("segment {id}"),
                });
            }
            if up.dirty.contains_key(&id.0) {
                None
            } else {
                up.manifest.segment(id.0).map(|s| s.len)
            }
        };
        match seg_len {
            // Not uploaded yet: the cache holds all of it.
            None => self.inner.local.read_at(id, offset, buf),
            Some(len) => self.read_uploaded(id.0, len, offset, buf),
        }
    }

    fn list_segments(&self) -> Result<Vec<(SegmentId, u64)>> {
        let hidden = self.inner.up.lock().hidden.clone();
        Ok(self
            .inner
            .local
            .list_segments()?
            .into_iter()
            .filter(|(id, _)| !hidden.contains(&id.0))
            .collect())
    }

    fn truncate_segment(&self, id: SegmentId, len: u64) -> Result<()> {
        self.check_fenced()?;
        let mut up = self.inner.up.lock();
        if let Some(s) = up.manifest.segment(id.0) {
            if len >= s.len {
                // Recovery "cutting" a segment at its end (an empty one is
                // cut to 0): nothing to do.
                return Ok(());
            }
            return Err(StoreError::Io {
                context: format!("truncating {id}"),
                source: std::io::Error::other("the segment is already in the object store"),
            });
        }
        self.inner.local.truncate_segment(id, len)?;
        if let Some(d) = up.dirty.get_mut(&id.0)
            && d.len > len
        {
            let cut = d.len - len;
            d.len = len;
            d.synced = d.synced.min(len);
            up.dirty_bytes -= cut;
        }
        Ok(())
    }

    fn delete_segment(&self, id: SegmentId) -> Result<()> {
        let mut up = self.inner.up.lock();
        if let Some(d) = up.dirty.get(&id.0)
            && !d.uploading
        {
            // Never reached the bucket: nothing there needs it (a commit's
            // checkpoint never refers to a segment the engine deleted, and a
            // gap only shortens the prefix the bucket recovers to).
            let len = d.len;
            up.dirty.remove(&id.0);
            up.dirty_bytes -= len;
            drop(up);
            self.inner.up_cv.notify_all();
            self.inner.files.lock().remove(&id.0);
            return self.inner.local.delete_segment(id);
        }
        up.hidden.insert(id.0);
        up.ops.push_back(Op::Delete(id.0));
        drop(up);
        self.inner.up_cv.notify_all();
        Ok(())
    }

    fn put_meta(&self, name: &str, data: &[u8]) -> Result<()> {
        self.check_fenced()?;
        assert!(
            !name.starts_with("s3-"),
            "meta names starting s3- are the store's"
        );
        self.inner.local.put_meta(name, data)?;
        let mut up = self.inner.up.lock();
        let needs = up
            .open
            .or_else(|| up.dirty.keys().next_back().copied())
            .unwrap_or(0);
        let data = Arc::new(data.to_vec());
        // A newer version of a blob that is still queued replaces it in
        // place: it refers to no segment deleted after the older one did.
        let queued = up.ops.iter_mut().find_map(|op| match op {
            Op::Meta {
                name: n,
                data: d,
                needs: w,
            } if n == name => Some((d, w)),
            _ => None,
        });
        match queued {
            Some((d, w)) => {
                *d = data;
                *w = (*w).max(needs);
            }
            None => up.ops.push_back(Op::Meta {
                name: name.to_string(),
                data,
                needs,
            }),
        }
        drop(up);
        self.inner.up_cv.notify_all();
        Ok(())
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.local.get_meta(name)
    }

    fn free_bytes(&self) -> Option<u64> {
        self.inner.local.free_bytes()
    }

    fn admit_write(&self, bytes: u64) -> Result<()> {
        let limit = self.dirty_limit();
        let deadline = Instant::now() + self.inner.opts.backpressure_timeout;
        let mut up = self.inner.up.lock();
        let mut warned = false;
        while up.dirty_bytes + bytes > limit {
            self.check_fenced()?;
            if Instant::now() >= deadline {
                return Err(unavailable(
                    "waiting for write-back space",
                    format!(
                        "{} dirty bytes of a {limit}-byte limit have not reached the object store in {} s",
                        up.dirty_bytes,
                        self.inner.opts.backpressure_timeout.as_secs()
                    ),
                ));
            }
            if !warned {
                tracing::warn!(
                    dirty_bytes = up.dirty_bytes,
                    limit,
                    "write-back cache full; writes wait for uploads"
                );
                warned = true;
            }
            self.inner
                .up_cv
                .wait_for(&mut up, Duration::from_millis(100));
        }
        // Dirty and clean bytes share the cache's hard limit: growing the
        // one shrinks the other.
        let dirty = up.dirty_bytes + bytes;
        drop(up);
        if dirty + self.inner.index.lock().used_bytes() > self.inner.opts.cache_size_bytes {
            self.evict();
        }
        Ok(())
    }

    fn seal_after(&self) -> Option<Duration> {
        Some(self.inner.opts.seal_after)
    }

    fn durable_marks_hold(&self) -> bool {
        self.inner.marks_hold.load(Ordering::Acquire)
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
