//! The engine's view: [`SegmentStore`] and [`OpenSegment`] on an [`S3Store`].

use super::{Dirty, Op, S3Store, unavailable};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use vpool_store::{OpenSegment, Result, SegmentId, SegmentStore, StoreError};

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
