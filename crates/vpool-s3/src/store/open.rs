//! Opening and closing an [`S3Store`].
//!
//! Opening, in order:
//!
//! 1. read what the cache directory remembers (`meta/s3-state`: the pool,
//!    this cache's holder id, the last generation it committed) and the
//!    bucket's latest manifest;
//! 2. decide whether this cache may take the pool: a new pool needs an
//!    unused cache directory and a store whose create-only PUT fences; an
//!    existing one must be the same pool, and not held by another holder
//!    unless `force` takes it over;
//! 3. if the cache's content is not from the pool's current history (this
//!    host was taken over and the pool written since), empty it;
//! 4. `reconcile`: bring the cache directory in line with the manifest
//!    (placeholders, dirty segments, metadata, the read index);
//! 5. take the lease: create the next manifest generation, naming this
//!    host. Losing that race to another host's commit starts over.
//!
//! Closing drains the uploads, commits a manifest with no holder (the
//! next open, from any host, needs no `force`) and saves the read index.

use super::lease::{LeaseTiming, Watch, heartbeat_is, wait_for_expiry};
use super::read::punch_file;
use super::{
    Dirty, INDEX_META, Inner, Op, OpenError, OpenMode, S3PoolOptions, S3Store, STATE_META,
    hostname, random_id,
};
use crate::bucket::{latest_generation, probe_fencing, read_manifest};
use crate::manifest::{Fencing, Holder, Manifest, MetaRef, manifest_key};
use crate::remote::{Remote, RemoteError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vpool_cache::CacheIndex;
use vpool_store::{LocalDirStore, Result, SegmentId, SegmentStore, StoreError};

/// Opening retries this often when another host commits in between.
const MAX_OPEN_ATTEMPTS: u32 = 8;
/// How long each call to the bucket while opening may take.
const OPEN_CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long fetching a metadata blob (the checkpoint) may take.
const META_FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the manifest that releases the lease may take to commit.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// What this cache directory remembers about its pool.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LocalState {
    pool_id: String,
    holder_id: String,
    /// The last generation this cache committed.
    generation: u64,
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
                Ok(store) => {
                    if let Some(budget) = &store.inner.opts.budget {
                        budget.join(&store);
                    }
                    return Ok(store);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One attempt at [`S3Store::open`].
    fn open_once(
        remote: Arc<Remote>,
        opts: S3PoolOptions,
    ) -> std::result::Result<S3Store, OpenError> {
        assert!(opts.upload_parallelism >= 1 && opts.upload_parallelism <= 64);
        let lease = opts.lease;
        assert!(
            lease.renew < lease.valid
                && lease.valid < lease.expire
                && (crate::manifest::MIN_LEASE_EXPIRE_MS..=crate::manifest::MAX_LEASE_EXPIRE_MS)
                    .contains(&u64::try_from(lease.expire.as_millis()).unwrap_or(u64::MAX)),
            "a lease the manifest cannot carry: {lease:?}"
        );
        let url = remote.display().to_string();
        let local = LocalDirStore::open(&opts.cache_dir)?;
        let dir = opts.cache_dir.display().to_string();
        let state = read_state(&local, &dir)?;
        let latest = latest_generation(&remote, Instant::now() + OPEN_CALL_TIMEOUT)?;
        let holder_id = state
            .as_ref()
            .map(|s| s.holder_id.clone())
            .unwrap_or_else(random_id);
        // The holder whose lease expired, and its heartbeat as it stood.
        let mut expired = None;
        let (base, fresh_pool) = match (opts.mode, latest) {
            (OpenMode::Create { .. }, Some(_)) => return Err(OpenError::PoolExists { url }),
            (OpenMode::Open { .. } | OpenMode::ReadOnly, None) => {
                return Err(OpenError::NoPool { url });
            }
            (OpenMode::ReadOnly, Some(g)) => {
                return Self::open_read_only(remote, opts, local, state.as_ref(), g);
            }
            (
                OpenMode::Create {
                    allow_unsafe_fencing,
                },
                None,
            ) => {
                let m = new_pool(&remote, &local, &dir, state.as_ref(), allow_unsafe_fencing)?;
                (m, true)
            }
            (OpenMode::Open { force }, Some(g)) => {
                let (m, lapsed) =
                    existing_pool(&remote, g, &dir, state.as_ref(), &holder_id, force)?;
                expired = lapsed;
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
        let holder = Holder {
            id: holder_id,
            host: hostname(),
            pid: std::process::id(),
            epoch: base.generation + 1,
            lease_expire_ms: Some(u64::try_from(opts.lease.expire.as_millis()).unwrap_or(u64::MAX)),
            since_unix_ms: Some(u64::try_from(super::now_unix_nanos() / 1_000_000).unwrap_or(0)),
            peer: opts.peer.clone(),
        };
        if let Some((old, seen)) = &expired {
            // Before the journal's tombstone fences the old holder.
            check_still_expired(&remote, old, seen)?;
        }
        let store = S3Store {
            inner: Arc::new(Inner::new(local, remote, opts, holder, base.clone())),
        };
        store.replay_journal(&base)?;
        store.reconcile(stale)?;
        if let Some((old, seen)) = &expired {
            check_still_expired(&store.inner.remote, old, seen)?;
        }
        store.take_lease()?;
        if let Some((old, seen)) = &expired {
            wait_if_renewed_meanwhile(&store.inner.remote, old, seen);
        }
        store.start_renewer()?;
        Ok(store)
    }

    /// [`OpenMode::ReadOnly`]: the pool as manifest `g` left it, in an
    /// emptied cache (what the engine wrote there last time is not the
    /// bucket's); no lease taken, no thread started.
    fn open_read_only(
        remote: Arc<Remote>,
        opts: S3PoolOptions,
        local: LocalDirStore,
        state: Option<&LocalState>,
        g: u64,
    ) -> std::result::Result<S3Store, OpenError> {
        let url = remote.display().to_string();
        let m = read_manifest(&remote, g, Instant::now() + OPEN_CALL_TIMEOUT)?;
        check_same_pool(state, &m, &opts.cache_dir.display().to_string())?;
        if let Some(h) = &m.holder {
            let why = "a pool opened read-only must have no holder: the holder's clean-up deletes what this view would read";
            return Err(held(&url, h, why.to_string()));
        }
        clear_cache(&local)?;
        // Nothing it does is a flush the bucket must keep.
        let opts = S3PoolOptions {
            durability: crate::Durability::Host,
            ..opts
        };
        let holder = Holder {
            id: random_id(),
            host: hostname(),
            pid: std::process::id(),
            epoch: m.generation,
            lease_expire_ms: None,
            since_unix_ms: None,
            peer: None,
        };
        let generation = m.generation;
        let store = S3Store {
            inner: Arc::new(Inner::new(local, remote, opts, holder, m)),
        };
        store.reconcile(true)?;
        store.save_state(generation)?;
        tracing::info!(store = %url, generation, "pool opened read-only");
        Ok(store)
    }

    /// Commits the next generation naming this store as holder: from now on
    /// a commit of another host's fails, and fences it.
    fn take_lease(&self) -> std::result::Result<(), OpenError> {
        let inner = &self.inner;
        let generation = inner.holder.epoch;
        let mut m = inner.up.lock().manifest.clone();
        m.generation = generation;
        m.holder = Some(inner.holder.clone());
        // Taking the lease is its first renewal, as of when it was sent.
        let sent_ns = inner.clock_ns();
        match inner.remote.put_create(
            &manifest_key(generation),
            Bytes::from(m.encode()),
            Some(Instant::now() + OPEN_CALL_TIMEOUT),
            &|| false,
        ) {
            Ok(()) => {}
            Err(RemoteError::AlreadyExists { .. }) => {
                return Err(OpenError::LostRace {
                    url: inner.remote.display().to_string(),
                });
            }
            Err(e) => return Err(e.into()),
        }
        inner.up.lock().manifest = m;
        inner.renewed_at_ns.store(sent_ns, Ordering::Release);
        self.save_state(generation)?;
        tracing::info!(store = %inner.remote.display(), generation, "pool lease taken");
        Ok(())
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
        self.make_placeholders(&m, &local_segs)?;
        let dirty = self.find_dirty(&m, &local_segs)?;
        // A blob the cache sends may refer to any of its dirty segments.
        let needs = dirty.keys().next_back().copied().unwrap_or(0);
        let ops = self.reconcile_meta(&m, stale, needs)?;
        let mut index = self.load_index(&m, &local_segs, stale)?;
        let mut up = inner.up.lock();
        up.dirty_bytes = dirty.values().map(|d| d.len).sum();
        up.dirty = dirty;
        up.ops = ops;
        index.set_capacity(self.clean_capacity(up.dirty_bytes));
        *inner.index.lock() = index;
        Ok(())
    }

    /// A placeholder (the right length, no data) for each listed segment the
    /// cache does not hold whole; reads fetch its bytes on demand.
    fn make_placeholders(
        &self,
        m: &Manifest,
        local_segs: &BTreeMap<u64, u64>,
    ) -> std::result::Result<(), OpenError> {
        for s in &m.segments {
            match local_segs.get(&s.id) {
                Some(&len) if len == s.len => {}
                Some(&len) if len > s.len => {
                    return Err(OpenError::Corrupt(format!(
                        "cached segment {} is longer ({len}) than in the bucket ({})",
                        s.id, s.len
                    )));
                }
                _ => self
                    .inner
                    .local
                    .create_placeholder(SegmentId(s.id), s.len)?,
            }
        }
        Ok(())
    }

    /// The cache's segments the manifest does not list: those after the
    /// last one listed are dirty (sealed, synced: the engine recovers them
    /// before it writes again); those before were dropped from the bucket
    /// by a commit, and the local delete was still to come.
    fn find_dirty(
        &self,
        m: &Manifest,
        local_segs: &BTreeMap<u64, u64>,
    ) -> std::result::Result<BTreeMap<u64, Dirty>, OpenError> {
        let max_uploaded = m.segments.last().map(|s| s.id).unwrap_or(0);
        let replayed = self.inner.journal.lock().replayed.clone();
        let mut dirty = BTreeMap::new();
        for (&id, &len) in local_segs {
            if m.segment(id).is_some() {
                continue;
            }
            if id <= max_uploaded {
                self.inner.local.delete_segment(SegmentId(id))?;
                continue;
            }
            dirty.insert(
                id,
                Dirty {
                    len,
                    synced: len,
                    sealed_at: Some(Instant::now()),
                    uploading: false,
                    journaled: replayed.get(&id).copied().unwrap_or(0).min(len),
                },
            );
        }
        Ok(dirty)
    }

    /// Metadata: the bucket's, unless the cache has a newer one to send (it
    /// is queued). Blobs only the cache has are queued too.
    fn reconcile_meta(
        &self,
        m: &Manifest,
        stale: bool,
        needs: u64,
    ) -> std::result::Result<VecDeque<Op>, OpenError> {
        let inner = &self.inner;
        let mut ops = VecDeque::new();
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
                    self.fetch_meta(name, r)?;
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
        Ok(ops)
    }

    /// Copies metadata blob `name` from the bucket into the cache, checked.
    fn fetch_meta(&self, name: &str, r: &MetaRef) -> std::result::Result<(), OpenError> {
        let inner = &self.inner;
        let d = inner
            .remote
            .get(&r.key, Instant::now() + META_FETCH_TIMEOUT)?
            .ok_or_else(|| OpenError::Corrupt(format!("{} is missing", r.key)))?;
        if d.len() as u64 != r.len || crc32c::crc32c(&d) != r.crc32c {
            return Err(OpenError::Corrupt(format!(
                "{} does not match its checksum",
                r.key
            )));
        }
        inner.local.put_meta(name, &d)?;
        Ok(())
    }

    /// The read index: exact after a clean close, empty after a crash (the
    /// cached copies of uploaded segments are then punched out, not
    /// trusted). Leaves the open marker in its place.
    fn load_index(
        &self,
        m: &Manifest,
        local_segs: &BTreeMap<u64, u64>,
        stale: bool,
    ) -> std::result::Result<CacheIndex, OpenError> {
        let inner = &self.inner;
        let capacity = self.cache_size();
        // An empty blob is the marker left while a store is open.
        let saved = if stale {
            None
        } else {
            inner.local.get_meta(INDEX_META)?.filter(|b| !b.is_empty())
        };
        let mut index = match saved.map(|b| CacheIndex::decode(&b, capacity)) {
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
                CacheIndex::new(capacity)
            }
        };
        // A crash from here on must not trust the saved index.
        inner.local.put_meta(INDEX_META, b"")?;
        for seg in index.segment_ids() {
            if m.segment(seg).is_none() {
                index.remove_segment(seg);
            }
        }
        Ok(index)
    }

    /// Remembers, in the cache directory, the pool, this holder and the
    /// last generation committed: the next open knows the cache is current.
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
        if let Some(budget) = &self.inner.opts.budget {
            budget.leave(self);
        }
        if self.read_only() {
            // Nothing of it is the bucket's to upload.
            self.stop_threads();
            return true;
        }
        self.drain();
        self.stop_threads();
        let (drained, m) = {
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
            self.release(m);
            // Released: no taker needs this epoch's newest entry to place
            // a tombstone, and every segment is in the bucket.
            self.collect_journal(u64::MAX, true);
        } else {
            tracing::warn!(
                "closing with data not yet in the object store; it stays in the cache and is uploaded when the pool is next opened"
            );
        }
        self.save_index();
        drained
    }

    /// Lets the uploader take the open segment too, and waits until it has
    /// emptied the queue, the drain timeout passes, or the store is fenced.
    fn drain(&self) {
        self.inner.up.lock().draining = true;
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
    }

    /// Stops the uploader and the prefetcher, and waits for them.
    fn stop_threads(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.up_cv.notify_all();
        if let Some(h) = self.inner.uploader.lock().take() {
            let _ = h.join();
        }
        if let Some(h) = self.inner.prefetcher.lock().take() {
            let _ = h.join();
        }
        if let Some(h) = self.inner.renewer.lock().take() {
            let _ = h.join();
        }
    }

    /// Commits `m`'s successor with no holder. Best effort: if it fails,
    /// the next open of another host needs `--force`.
    fn release(&self, mut m: Manifest) {
        m.generation += 1;
        m.holder = None;
        m.sealed = self.inner.seal_at_close.load(Ordering::SeqCst);
        match self.inner.remote.put_create(
            &manifest_key(m.generation),
            Bytes::from(m.encode()),
            Some(Instant::now() + RELEASE_TIMEOUT),
            &|| false,
        ) {
            Ok(()) => {
                let _ = self.save_state(m.generation);
                tracing::info!(generation = m.generation, "pool released");
            }
            Err(e) => tracing::warn!(error = %e, "could not release the pool's lease"),
        }
    }

    /// Saves the read index for the next open, once every cache file written
    /// to is synced: the saved index may only name data that is on disk.
    fn save_index(&self) {
        let files: Vec<Arc<File>> = self.inner.files.lock().drain().map(|(_, f)| f).collect();
        if files.iter().all(|f| f.sync_data().is_ok()) {
            let bytes = self.inner.index.lock().encode();
            if let Err(e) = self.inner.local.put_meta(INDEX_META, &bytes) {
                tracing::warn!(error = %e, "could not save the cache index");
            }
        }
    }
}

/// What the cache directory remembers of its pool; `None` for a new one.
fn read_state(
    local: &LocalDirStore,
    dir: &str,
) -> std::result::Result<Option<LocalState>, OpenError> {
    match local.get_meta(STATE_META)? {
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| OpenError::Corrupt(format!("{dir}/meta/{STATE_META}: {e}"))),
        None => Ok(None),
    }
}

/// The first manifest of a new pool, once the cache directory is found
/// unused and the store's create-only PUT found to fence (or accepted
/// without, with `allow_unsafe_fencing`).
fn new_pool(
    remote: &Remote,
    local: &LocalDirStore,
    dir: &str,
    state: Option<&LocalState>,
    allow_unsafe_fencing: bool,
) -> std::result::Result<Manifest, OpenError> {
    let url = remote.display().to_string();
    if !local.list_segments()?.is_empty() || state.is_some() {
        return Err(OpenError::ForeignCache {
            dir: dir.to_string(),
            other: "a cache directory in use".into(),
        });
    }
    let fencing = match probe_fencing(remote) {
        Ok(f) => f,
        Err(detail) if allow_unsafe_fencing => {
            tracing::warn!(store = %url, %detail, "conditional create is not atomic: this pool must only ever be written from one host");
            Fencing::Unsafe
        }
        Err(detail) => return Err(OpenError::UnsafeFencing { url, detail }),
    };
    Ok(Manifest::new(random_id(), fencing))
}

/// The holder whose lease a taker watched expire, and its heartbeat as it
/// stood then.
type Expired = Option<(Holder, Option<Bytes>)>;

/// The latest manifest (generation `g`) of an existing pool, once this
/// cache may open it: it is this cache's pool, and no other holder has it
/// (or `force` takes it over, or its lease expired: the old holder is
/// fenced at its next commit or renewal).
fn existing_pool(
    remote: &Remote,
    g: u64,
    dir: &str,
    state: Option<&LocalState>,
    holder_id: &str,
    force: bool,
) -> std::result::Result<(Manifest, Expired), OpenError> {
    let url = remote.display().to_string();
    let m = read_manifest(remote, g, Instant::now() + OPEN_CALL_TIMEOUT)?;
    check_same_pool(state, &m, dir)?;
    if m.sealed {
        // Forced too: a sealed template's readers rely on nobody writing.
        return Err(OpenError::Sealed { url });
    }
    let Some(h) = m.holder.clone().filter(|h| h.id != holder_id) else {
        return Ok((m, None));
    };
    if force {
        tracing::warn!(store = %url, host = %h.host, pid = h.pid, epoch = h.epoch, "taking the pool over (forced); the old holder is fenced");
        return Ok((m, None));
    }
    let lease = match wait_for_expiry(remote, &h)? {
        Watch::Expired(seen) => {
            tracing::warn!(store = %url, host = %h.host, pid = h.pid, epoch = h.epoch, "the holder's lease expired (no renewal seen): taking the pool over; the old holder is fenced");
            return Ok((m, Some((h, seen))));
        }
        Watch::Renewed => match h.lease_expire_ms {
            Some(_) => "its lease is being renewed".to_string(),
            None => "its lease does not expire (a vpool from before leases expired)".to_string(),
        },
        Watch::Unchanged(d) => format!(
            "its lease has not been renewed for {} s; it expires after {} s without renewal, and a later open takes it over",
            d.as_secs(),
            h.lease_expire_ms.unwrap_or(0) / 1000
        ),
    };
    Err(held(&url, &h, lease))
}

/// Refuses a cache directory (`dir`, which remembers `state`) of another
/// pool than `m`'s.
fn check_same_pool(
    state: Option<&LocalState>,
    m: &Manifest,
    dir: &str,
) -> std::result::Result<(), OpenError> {
    match state {
        Some(s) if s.pool_id != m.pool_id => Err(OpenError::ForeignCache {
            dir: dir.to_string(),
            other: s.pool_id.clone(),
        }),
        _ => Ok(()),
    }
}

fn held(url: &str, h: &Holder, lease: String) -> OpenError {
    OpenError::Held {
        url: url.to_string(),
        host: h.host.clone(),
        pid: h.pid,
        epoch: h.epoch,
        lease,
    }
}

/// Just before the commit that takes an expired lease: refuses if the old
/// holder renewed since (it woke while this cache was being brought in
/// line).
fn check_still_expired(
    remote: &Remote,
    old: &Holder,
    seen: &Option<Bytes>,
) -> std::result::Result<(), OpenError> {
    if heartbeat_is(remote, old, seen)? {
        return Ok(());
    }
    let url = remote.display().to_string();
    Err(held(&url, old, "it renewed its lease just now".to_string()))
}

/// Just after that commit: if the old holder renewed between the check
/// and the commit, it may acknowledge I/O until its next renewal finds
/// this commit, at most its `valid` time: wait that long before serving.
fn wait_if_renewed_meanwhile(remote: &Remote, old: &Holder, seen: &Option<Bytes>) {
    if let Ok(true) = heartbeat_is(remote, old, seen) {
        return;
    }
    let expire = Duration::from_millis(old.lease_expire_ms.unwrap_or(0));
    let valid = LeaseTiming::expiring_after(expire.max(Duration::from_secs(1))).valid;
    tracing::warn!(store = %remote.display(), holder = %old.name(), wait_s = valid.as_secs_f64(), "the old holder renewed its lease as this host took it over; waiting for it to stop");
    std::thread::sleep(valid);
}

/// True if `dir` is (or was) the cache directory of an S3 pool: serving it
/// as a local pool would fork its history.
pub fn is_cache_dir(dir: &std::path::Path) -> bool {
    dir.join("meta").join(STATE_META).exists()
}

/// The engine's metadata blobs in the cache directory (not the store's
/// own, `s3-*`, nor temporary files).
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
    clear_cache(local)
}

/// Removes every segment and engine metadata blob from the cache.
fn clear_cache(local: &LocalDirStore) -> Result<()> {
    for (id, _) in local.list_segments()? {
        local.delete_segment(id)?;
    }
    for name in engine_meta_names(local)? {
        let p = local.root().join("meta").join(&name);
        std::fs::remove_file(&p)
            .map_err(|e| StoreError::io(format!("removing {}", p.display()), e))?;
    }
    Ok(())
}
