//! The uploader: one thread that moves sealed segments into the bucket in
//! log order and commits each batch in a new manifest.
//!
//! A round:
//!
//! 1. **Pick** the sealed, synced segments at the front of the dirty list
//!    (at most `upload_parallelism`) and the operations at the front of the
//!    queue that may be committed with them: a metadata blob once every
//!    segment up to the one that was open when it was written is listed or
//!    goes up in this round; a deletion likewise for its segment, and only
//!    behind everything queued before it (the checkpoint that dropped it).
//! 2. **Upload** the segments in parallel, then PUT each metadata blob under
//!    a new key. PUTs retry until they succeed or the store stops or is
//!    fenced: an outage only makes the round longer.
//! 3. **Commit**: create the next manifest generation. Finding it taken
//!    means another host took the pool over: the store is fenced for good.
//! 4. **Apply**: the segments are clean now (their files join the read
//!    index), deleted segments leave the cache, and what no manifest names
//!    any more is deleted from the bucket, best effort.
//!
//! Nothing is listed before it is in the bucket, and nothing leaves the
//! bucket before a commit stops naming it: every committed manifest is a
//! prefix of the log (`docs/s3-pools.md`, "The commit protocol"). The
//! queue's ordering rules are all here, including how the engine's calls
//! fill it (`Up::queue_meta`, `Up::queue_delete`).

use super::{Dirty, Op, S3Store, Up};
use crate::bucket::latest_generation;
use crate::manifest::{
    Manifest, MetaRef, SEGMENT_DIR, SegmentEntry, manifest_key, meta_key, segment_key,
};
use crate::remote::RemoteError;
use bytes::Bytes;
use std::collections::BTreeSet;
use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vpool_store::{Result, SEGMENT_HEADER_BYTES, SegmentId, SegmentStore, StoreError};

/// Old manifests kept behind the current one, for inspection.
const MANIFESTS_KEPT: u64 = 4;

/// What one round uploads and commits.
struct Work {
    /// (id, length) of each segment, in id order.
    segments: Vec<(u64, u64)>,
    ops: Vec<Op>,
}

/// A manifest ready to be committed, and what it no longer names (deleted
/// from the bucket once it is committed).
struct Commit {
    manifest: Manifest,
    dropped_segments: Vec<SegmentEntry>,
    dropped_meta: Vec<String>,
}

impl Up {
    /// Whether dirty segment `id` may go up: sealed (or the store is closing
    /// and it is the last one) and synced to its end, because the bucket
    /// must never hold bytes a crash of this host could still lose.
    fn sealed_ready(&self, id: u64, d: &Dirty) -> bool {
        (d.sealed_at.is_some() || (self.draining && self.open == Some(id))) && d.synced >= d.len
    }

    /// Takes the next round's work off the queue; `None` if nothing is
    /// ready. The segments taken are marked uploading: from now on the
    /// engine's deletion of one is queued behind the commit that lists it.
    fn take_work(&mut self, parallelism: usize) -> Option<Work> {
        let mut segments: Vec<(u64, u64)> = Vec::new();
        for (&id, d) in &self.dirty {
            if segments.len() >= parallelism || !self.sealed_ready(id, d) {
                break;
            }
            segments.push((id, d.len));
        }
        // Every dirty segment up to `id` goes up in this round.
        let after_batch = |id: u64| {
            self.dirty
                .range(..=id)
                .all(|(k, _)| segments.iter().any(|(b, _)| b == k))
        };
        // In queue order: an operation that must wait holds back the rest.
        let n_ops = self
            .ops
            .iter()
            .take_while(|op| match op {
                Op::Meta { needs, .. } => after_batch(*needs),
                Op::Delete(id) => after_batch(*id),
            })
            .count();
        if segments.is_empty() && n_ops == 0 {
            return None;
        }
        for (id, _) in &segments {
            self.dirty.get_mut(id).expect("dirty").uploading = true;
        }
        let ops = self.ops.drain(..n_ops).collect();
        self.in_round = true;
        Some(Work { segments, ops })
    }

    /// Gives a failed round's work back, in its place at the front.
    fn put_back(&mut self, work: Work, error: String) {
        self.last_error = Some(error);
        self.in_round = false;
        for (id, _) in &work.segments {
            if let Some(d) = self.dirty.get_mut(id) {
                d.uploading = false;
            }
        }
        for op in work.ops.into_iter().rev() {
            self.ops.push_front(op);
        }
    }

    /// Queues metadata blob `name` (the engine's checkpoint) for upload. It
    /// is committed only once every segment up to the one open now is in
    /// the bucket: its maps may point anywhere up to there.
    pub(super) fn queue_meta(&mut self, name: &str, data: &[u8]) {
        let needs = match self.open {
            // An open segment with nothing but its header: the blob may
            // name it as where the log goes on, but refers to nothing in
            // it, and the engine's recovery accepts it missing (the log
            // ends there). Waiting for it would wait for the next write.
            Some(open) if self.holds_nothing(open) => open.saturating_sub(1),
            Some(open) => open,
            None => self.dirty.keys().next_back().copied().unwrap_or(0),
        };
        let data = Arc::new(data.to_vec());
        // A newer version of a blob that is still queued replaces it in
        // place: it refers to no segment deleted after the older one did.
        let queued = self.ops.iter_mut().find_map(|op| match op {
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
            None => self.ops.push_back(Op::Meta {
                name: name.to_string(),
                data,
                needs,
            }),
        }
    }

    /// Whether dirty segment `id` holds its header only (or is not dirty).
    fn holds_nothing(&self, id: u64) -> bool {
        self.dirty
            .get(&id)
            .is_none_or(|d| d.len <= SEGMENT_HEADER_BYTES)
    }

    /// Queues the deletion of a segment that is (or is going) in the bucket.
    /// The engine stops seeing it now; the bucket keeps it until a commit
    /// after every metadata blob queued before, which no longer refer to it.
    pub(super) fn queue_delete(&mut self, id: u64) {
        self.hidden.insert(id);
        self.ops.push_back(Op::Delete(id));
    }
}

impl S3Store {
    /// Starts the uploader. Call after the engine opened the pool.
    pub fn start(&self) -> Result<()> {
        if self.read_only() {
            // No uploads, and above all no collection of objects the
            // manifest does not name: a read-only view owns nothing.
            return Ok(());
        }
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

    /// Waits until nothing sealed is waiting for upload or for the commit
    /// of its round, or `timeout`.
    pub fn wait_uploaded(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let up = self.inner.up.lock();
                let pending = up.ops.len()
                    + usize::from(up.in_round)
                    + up.dirty
                        .iter()
                        .filter(|(id, _)| up.open != Some(**id) || !up.holds_nothing(**id))
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

    /// The uploader thread: rounds until the store stops or is fenced.
    fn upload_loop(&self) {
        let inner = &self.inner;
        let give_up = || inner.stop.load(Ordering::SeqCst) || inner.fenced.lock().is_some();
        let epoch = inner.holder.epoch;
        while let Some(work) = self.next_work() {
            let started = Instant::now();
            if let Err(e) = self.upload_segments(&work.segments, epoch, &give_up) {
                // PUTs retry until stop or fencing; what else fails here is
                // reading the cache's own file. Put everything back, in
                // order, and try again (or leave it to the next open).
                inner.up.lock().put_back(work, e.clone());
                if give_up() {
                    return;
                }
                tracing::error!(error = %e, "upload failed; retrying in a second");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            if work.segments.iter().any(|&(_, len)| len > 0) {
                inner
                    .counters
                    .upload_nanos
                    .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            let Some(commit) = self.prepare_commit(&work, epoch, &give_up) else {
                return;
            };
            if !self.commit(&commit.manifest, &give_up) {
                return;
            }
            let generation = commit.manifest.generation;
            let _ = self.save_state(generation);
            let Commit {
                manifest,
                dropped_segments,
                dropped_meta,
            } = commit;
            let max_listed = manifest.segments.last().map_or(0, |s| s.id);
            self.apply_commit(&work.segments, manifest, &dropped_segments);
            self.collect_journal(max_listed, false);
            self.evict();
            self.delete_unlisted(&dropped_segments, &dropped_meta, generation);
        }
    }

    /// Waits for the next round's work; `None` once the store stops or is
    /// fenced.
    fn next_work(&self) -> Option<Work> {
        let inner = &self.inner;
        let mut up = inner.up.lock();
        loop {
            if inner.stop.load(Ordering::SeqCst) || inner.fenced.lock().is_some() {
                return None;
            }
            if let Some(work) = up.take_work(inner.opts.upload_parallelism) {
                return Some(work);
            }
            inner.up_cv.wait_for(&mut up, Duration::from_millis(500));
        }
    }

    /// PUTs the segments, one thread each; the first failure, in id order.
    fn upload_segments(
        &self,
        segments: &[(u64, u64)],
        epoch: u64,
        give_up: &(impl Fn() -> bool + Sync),
    ) -> std::result::Result<(), String> {
        let results: Vec<std::result::Result<(), String>> = std::thread::scope(|s| {
            let handles: Vec<_> = segments
                .iter()
                .map(|&(id, len)| s.spawn(move || self.upload_segment(id, len, epoch, give_up)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("upload thread panicked".into()))
                })
                .collect()
        });
        results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
    }

    /// The manifest that commits a round: the current one with the round's
    /// segments listed in id order, each metadata blob PUT under a key of
    /// this epoch and generation (never over a key a manifest names) and
    /// each deleted segment dropped. `None` if a PUT gave up: the store is
    /// stopping or fenced, and the uploader ends.
    fn prepare_commit(
        &self,
        work: &Work,
        epoch: u64,
        give_up: &dyn Fn() -> bool,
    ) -> Option<Commit> {
        let inner = &self.inner;
        let mut m = inner.up.lock().manifest.clone();
        let generation = m.generation + 1;
        for &(id, len) in &work.segments {
            m.segments.push(SegmentEntry { id, len, epoch });
        }
        m.segments.sort_by_key(|s| s.id);
        let mut dropped_segments: Vec<SegmentEntry> = Vec::new();
        let mut dropped_meta: Vec<String> = Vec::new();
        for op in &work.ops {
            match op {
                Op::Meta { name, data, .. } => {
                    let key = meta_key(name, epoch, generation);
                    let body = Bytes::from(data.to_vec());
                    if let Err(e) = inner.remote.put(&key, body, None, give_up) {
                        inner.up.lock().last_error = Some(e.to_string());
                        return None;
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
        m.generation = generation;
        m.holder = Some(inner.holder.clone());
        Some(Commit {
            manifest: m,
            dropped_segments,
            dropped_meta,
        })
    }

    /// After a commit: the round's segments are clean, and their cache
    /// files, whole, join the read index; deleted segments leave the cache.
    fn apply_commit(&self, segments: &[(u64, u64)], m: Manifest, dropped: &[SegmentEntry]) {
        let inner = &self.inner;
        {
            let mut up = inner.up.lock();
            for &(id, len) in segments {
                if up.dirty.remove(&id).is_some() {
                    up.dirty_bytes -= len;
                }
            }
            for s in dropped {
                up.hidden.remove(&s.id);
            }
            up.manifest = m;
            up.in_round = false;
            up.last_error = None;
        }
        inner.up_cv.notify_all();
        let c = &inner.counters;
        let bytes: u64 = segments.iter().map(|(_, l)| l).sum();
        c.segments_uploaded
            .fetch_add(segments.len() as u64, Ordering::Relaxed);
        c.bytes_uploaded.fetch_add(bytes, Ordering::Relaxed);
        {
            let _g = inner.punch.write();
            let mut ix = inner.index.lock();
            for &(id, len) in segments {
                if len > 0 {
                    ix.insert(id, 0..len, len);
                }
            }
            for s in dropped {
                ix.remove_segment(s.id);
            }
        }
        for s in dropped {
            inner.files.lock().remove(&s.id);
            if let Err(e) = inner.local.delete_segment(SegmentId(s.id)) {
                tracing::warn!(segment = s.id, error = %e, "could not delete a cached segment");
            }
        }
    }

    /// Best effort, after a commit: deletes from the bucket what no manifest
    /// names any more, and the manifests older than the few kept.
    fn delete_unlisted(&self, segments: &[SegmentEntry], meta: &[String], generation: u64) {
        let remote = &self.inner.remote;
        let soon = Instant::now() + Duration::from_secs(10);
        for s in segments {
            let _ = remote.delete(&segment_key(s.id, s.epoch), soon);
        }
        for k in meta {
            let _ = remote.delete(k, soon);
        }
        if generation > MANIFESTS_KEPT {
            let _ = remote.delete(&manifest_key(generation - MANIFESTS_KEPT - 1), soon);
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
        deleted += self.collect_old_heartbeats(epoch);
        if deleted > 0 {
            tracing::info!(
                objects = deleted,
                "deleted objects no manifest names (left by a crash or a takeover)"
            );
        }
        deleted
    }

    /// Deletes the heartbeats of earlier holders (`lease/<epoch>` before
    /// ours): nobody reads them once their holder was succeeded.
    fn collect_old_heartbeats(&self, epoch: u64) -> u64 {
        let inner = &self.inner;
        let deadline = || Instant::now() + Duration::from_secs(30);
        let Ok(keys) = inner.remote.list(crate::manifest::LEASE_DIR, deadline()) else {
            return 0;
        };
        let mut deleted = 0;
        for (key, _) in keys {
            let old = key
                .strip_prefix(crate::manifest::LEASE_DIR)
                .and_then(|k| k.strip_prefix('/'))
                .and_then(|k| u64::from_str_radix(k, 16).ok())
                .is_some_and(|e| e < epoch);
            if old
                && !inner.stop.load(Ordering::SeqCst)
                && inner.remote.delete(&key, deadline()).is_ok()
            {
                deleted += 1;
            }
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

    /// Creates manifest `m.generation`, once the lease is known valid.
    /// False if fenced or stopping.
    fn commit(&self, m: &Manifest, give_up: &dyn Fn() -> bool) -> bool {
        let inner = &self.inner;
        if !self.may_commit(m.generation, give_up) {
            return false;
        }
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
                self.fence(detail);
                false
            }
            Err(e) => {
                inner.up.lock().last_error = Some(e.to_string());
                false
            }
        }
    }

    /// Before creating manifest `generation`: waits until the lease is
    /// valid (a holder that was paused past it finds out from its renewal
    /// first) and checks that no later manifest exists: a taker's
    /// generations are after ours, and the one right after ours may
    /// already be deleted by the taker's clean-up, so the create-only PUT
    /// alone would not fence us. False once fenced or stopping.
    fn may_commit(&self, generation: u64, give_up: &dyn Fn() -> bool) -> bool {
        let inner = &self.inner;
        loop {
            if give_up() {
                return false;
            }
            let checked = self
                .check_lease()
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    latest_generation(&inner.remote, Instant::now() + Duration::from_secs(30))
                        .map_err(|e| e.to_string())
                });
            match checked {
                Ok(Some(latest)) if latest > generation => {
                    self.fence(format!(
                        "pool {} was taken over: manifest generation {latest} exists, after this host's {}; this host stopped writing to it",
                        inner.remote.display(),
                        generation - 1
                    ));
                    return false;
                }
                Ok(_) => return true,
                Err(e) => {
                    // A lapsed lease or an unreachable bucket: wait, as
                    // the uploads do.
                    inner.up.lock().last_error = Some(e);
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}
