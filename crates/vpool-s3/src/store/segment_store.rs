//! The engine's view of an [`S3Store`]: [`SegmentStore`] and
//! [`OpenSegment`].
//!
//! Where each call goes:
//!
//! - appends and syncs go to the cache's local copy of the open segment,
//!   and the dirty figures follow (`writeback`);
//! - a read of a dirty segment is a local read (the cache holds all of it);
//!   a read of an uploaded one goes through the read cache (`read`); a
//!   segment the engine deleted and the bucket still holds is not found;
//! - deletions and metadata blobs are queued for the uploader (`upload`),
//!   which commits them in order;
//! - once the store is fenced, creating, appending, syncing, truncating and
//!   metadata updates fail with `StoreError::Fenced`;
//! - while its lease is not renewed (`lease`), writes, flushes and reads
//!   are refused (`StoreError::Unavailable`), until it is;
//! - with remote durability, a flush is admitted once the flush journal
//!   holds every byte appended before it (`journal`).

use super::S3Store;
use crate::journal::Durability;
use std::sync::atomic::Ordering;
use std::time::Duration;
use vpool_store::{OpenSegment, Result, SegmentId, SegmentStore, StoreError};

/// The open segment: the cache's local one, with the store's bookkeeping.
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
        self.store.append_making_room(&*self.local, offset, bufs)?;
        let id = self.local.id().0;
        self.store.inner.up.lock().appended(id, offset + total);
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.store.check_fenced()?;
        let id = self.local.id().0;
        // Only what was written before the sync is known durable after it.
        let len = self.store.inner.up.lock().dirty.get(&id).map(|d| d.len);
        self.local.sync()?;
        if let Some(len) = len {
            self.store.inner.up.lock().synced(id, len);
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
        let local = self.making_room(|| self.inner.local.create_segment(id))?;
        self.inner.up.lock().opened(id.0);
        self.inner.up_cv.notify_all();
        Ok(Box::new(S3OpenSegment {
            store: self.clone(),
            local,
        }))
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_lease()?;
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
            Some(len) => {
                self.read_uploaded(id.0, len, offset, buf)?;
                // A fetch may have outlasted the lease.
                self.check_lease()
            }
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
        up.truncated(id.0, len);
        Ok(())
    }

    fn delete_segment(&self, id: SegmentId) -> Result<()> {
        let mut up = self.inner.up.lock();
        // With remote durability a segment is uploaded even if deleted: a
        // gap in the bucket's history would cut the journaled log after it.
        let may_forget = self.inner.opts.durability == Durability::Host;
        if may_forget && up.forget_unsent(id.0) {
            drop(up);
            self.inner.up_cv.notify_all();
            self.inner.files.lock().remove(&id.0);
            return self.inner.local.delete_segment(id);
        }
        up.queue_delete(id.0);
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
        self.making_room(|| self.inner.local.put_meta(name, data))?;
        self.inner.up.lock().queue_meta(name, data);
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
        self.refuse_if_read_only("write")?;
        self.check_lease()?;
        self.admit(bytes)?;
        // The wait for write-back space may have outlasted the lease.
        self.check_lease()
    }

    fn admit_flush(&self) -> Result<()> {
        if self.read_only() {
            // The engine's own flush (its new open segment), to the
            // cache: nothing for the bucket, no journal.
            return self.check_fenced();
        }
        self.check_lease()?;
        if self.inner.opts.durability == Durability::Remote {
            self.check_fenced()?;
            self.journal_flush()?;
            // The journal's PUTs may have outlasted the lease.
            self.check_lease()?;
        }
        Ok(())
    }

    fn admit_read(&self) -> Result<()> {
        self.check_lease()
    }

    fn seal_after(&self) -> Option<Duration> {
        Some(self.inner.opts.seal_after)
    }

    fn durable_marks_hold(&self) -> bool {
        self.inner.marks_hold.load(Ordering::Acquire)
    }
}
