//! Opening and closing an [`S3Store`]: taking the lease, bringing the
//! cache directory in line with the bucket, and giving the lease back.

use super::read::{FETCH_STRIPES, punch_file};
use super::{
    Counters, Dirty, INDEX_META, Inner, Op, OpenError, OpenMode, S3PoolOptions, S3Store,
    STATE_META, Up, hostname, random_id,
};
use crate::manifest::{Fencing, Holder, MANIFEST_DIR, Manifest, manifest_key, parse_manifest_key};
use crate::remote::{Remote, RemoteError};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use vpool_cache::CacheIndex;
use vpool_store::{LocalDirStore, Result, SegmentId, SegmentStore, StoreError};

/// Opening retries this often when another host commits in between.
const MAX_OPEN_ATTEMPTS: u32 = 8;

/// What this cache directory remembers about its pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LocalState {
    pool_id: String,
    holder_id: String,
    /// The last generation this cache committed.
    generation: u64,
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

    pub(super) fn save_state(&self, generation: u64) -> Result<()> {
        let st = LocalState {
            pool_id: self.inner.up.lock().manifest.pool_id.clone(),
            holder_id: self.inner.holder.id.clone(),
            generation,
        };
        self.inner
            .local
            .put_meta(STATE_META, &serde_json::to_vec(&st).expect("serializes"))
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
