//! Write-back: a segment the engine writes is *dirty* (in the cache only)
//! until a commit lists it, and dirty bytes are bounded.
//!
//! - The bound is [`DIRTY_SHARE`] of the cache size. A write that would pass
//!   it waits in `SegmentStore::admit_write`, which the engine calls before
//!   taking its own lock: reads go on while writes wait for uploads, up to
//!   `backpressure_timeout`, after which the write fails (EIO) rather than
//!   hang a VM forever on a dead store.
//! - Dirty and clean (cached) bytes share the cache size: what dirty bytes
//!   take, the read cache's budget gives up ([`S3Store::clean_capacity`]).
//! - If the cache's own disk fills anyway (a filesystem smaller than the
//!   cache size, or shared), an append gives back every clean byte and waits
//!   for uploads to turn dirty bytes clean.
//!
//! Each dirty segment's figures (bytes written, bytes synced, when it was
//! sealed) live in `Up`, under its mutex, kept by the methods at the end of
//! this file; the uploader reads them to know what may go up.

use super::{Dirty, S3Store, Up, unavailable};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vpool_store::{OpenSegment, Result, StoreError};

/// Dirty (not yet uploaded) bytes may take at most this share of the cache:
/// the rest keeps room for reads while the store is slow or down.
const DIRTY_SHARE: f64 = 0.75;

impl S3Store {
    pub(super) fn dirty_limit(&self) -> u64 {
        (self.cache_size() as f64 * DIRTY_SHARE) as u64
    }

    /// The cache's hard limit now (see [`super::CacheBudget`]).
    pub(super) fn cache_size(&self) -> u64 {
        self.inner.cache_size_bytes.load(Ordering::Acquire)
    }

    /// Sets the cache's hard limit: clean bytes over it are evicted at
    /// once, dirty bytes over its dirty share hold writes back until they
    /// are uploaded. Writes waiting for room look again.
    pub fn set_cache_size(&self, bytes: u64) {
        let old = self.inner.cache_size_bytes.swap(bytes, Ordering::AcqRel);
        if old != bytes {
            tracing::info!(
                cache = %self.inner.opts.cache_dir.display(),
                from_bytes = old,
                to_bytes = bytes,
                "cache size changed"
            );
        }
        self.evict();
        self.inner.up_cv.notify_all();
    }

    /// The read cache's budget while `dirty_bytes` are dirty.
    pub(super) fn clean_capacity(&self, dirty_bytes: u64) -> u64 {
        self.cache_size().saturating_sub(dirty_bytes)
    }

    /// `SegmentStore::admit_write`: waits until `bytes` more dirty bytes fit
    /// under the bound, up to the back-pressure timeout, then makes room for
    /// them among the clean bytes.
    pub(super) fn admit(&self, bytes: u64) -> Result<()> {
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
        if dirty + self.inner.index.lock().used_bytes() > self.cache_size() {
            self.evict();
        }
        Ok(())
    }

    /// Appends to the cache's copy of the open segment, making room on a
    /// full cache disk ([`S3Store::making_room`]).
    pub(super) fn append_making_room(
        &self,
        local: &dyn OpenSegment,
        offset: u64,
        bufs: &[&[u8]],
    ) -> Result<()> {
        self.making_room(|| local.append_at(offset, bufs))
    }

    /// Runs `op`, a write to the cache disk; a full disk is waited out
    /// until the back-pressure timeout: clean copies are given back at
    /// once, and uploads turn dirty bytes clean. Appends, new segments and
    /// metadata (the checkpoint) all go through here: on a pool whose
    /// cache can make room, a full disk is a wait, not the engine's full
    /// state.
    pub(super) fn making_room<T>(&self, mut op: impl FnMut() -> Result<T>) -> Result<T> {
        let deadline = Instant::now() + self.inner.opts.backpressure_timeout;
        loop {
            match op() {
                Err(StoreError::NoSpace { context, source }) => {
                    if Instant::now() >= deadline {
                        return Err(StoreError::NoSpace { context, source });
                    }
                    tracing::warn!("cache disk full; evicting clean data and waiting for uploads");
                    self.evict_all_clean();
                    std::thread::sleep(Duration::from_millis(200));
                }
                other => return other,
            }
        }
    }
}

impl Up {
    /// The engine started segment `id`: the one open before is sealed (the
    /// engine never appends to it again), and `id` is dirty and empty.
    pub(super) fn opened(&mut self, id: u64) {
        if let Some(prev) = self.open.replace(id)
            && let Some(d) = self.dirty.get_mut(&prev)
        {
            d.sealed_at = Some(Instant::now());
        }
        self.dirty.insert(
            id,
            Dirty {
                len: 0,
                synced: 0,
                sealed_at: None,
                uploading: false,
                journaled: 0,
            },
        );
    }

    /// Dirty segment `id` holds data up to `end` now.
    pub(super) fn appended(&mut self, id: u64, end: u64) {
        if let Some(d) = self.dirty.get_mut(&id) {
            let new_len = d.len.max(end);
            let grew = new_len - d.len;
            d.len = new_len;
            self.dirty_bytes += grew;
        }
    }

    /// Dirty segment `id` is durable up to `len` at least: that much of it
    /// may go up.
    pub(super) fn synced(&mut self, id: u64, len: u64) {
        if let Some(d) = self.dirty.get_mut(&id) {
            d.synced = d.synced.max(len);
        }
    }

    /// Dirty segment `id` was cut to `len` (recovery cut a torn tail).
    pub(super) fn truncated(&mut self, id: u64, len: u64) {
        if let Some(d) = self.dirty.get_mut(&id)
            && d.len > len
        {
            let cut = d.len - len;
            d.len = len;
            d.synced = d.synced.min(len);
            d.journaled = d.journaled.min(len);
            self.dirty_bytes -= cut;
        }
    }

    /// Forgets dirty segment `id` if no upload of it has begun, and says so.
    /// Nothing in the bucket needs it: a commit's checkpoint never refers to
    /// a segment the engine deleted, and a gap only shortens the prefix the
    /// bucket recovers to.
    pub(super) fn forget_unsent(&mut self, id: u64) -> bool {
        match self.dirty.get(&id) {
            Some(d) if !d.uploading => {
                self.dirty_bytes -= d.len;
                self.dirty.remove(&id);
                true
            }
            _ => false,
        }
    }
}
