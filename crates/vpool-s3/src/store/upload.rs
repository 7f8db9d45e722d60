//! The uploader: sealed segments go up in order, and each batch is
//! committed in a new manifest with the metadata and deletions it allows.

use super::{Dirty, Op, S3Store, Up};
use crate::manifest::{
    Manifest, MetaRef, SEGMENT_DIR, SegmentEntry, manifest_key, meta_key, segment_key,
};
use crate::remote::RemoteError;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vpool_store::{Result, SegmentId, SegmentStore, StoreError};

/// Old manifests kept behind the current one, for inspection.
const MANIFESTS_KEPT: u64 = 4;

impl Up {
    fn sealed_ready(&self, id: u64, d: &Dirty) -> bool {
        (d.sealed_at.is_some() || (self.draining && self.open == Some(id))) && d.synced >= d.len
    }
}

impl S3Store {
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
}
