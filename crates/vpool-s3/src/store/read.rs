//! The read cache: uploaded segments are read from their cache files,
//! missing sectors fetched from the bucket, evicted ranges punched out.

use super::{S3Store, unavailable};
use crate::manifest::segment_key;
use bytes::Bytes;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;
use vpool_store::{Result, SegmentId, SegmentStore, StoreError};

/// Read-ahead starts at this size for a sequential stream and doubles.
const READAHEAD_INITIAL_BYTES: u64 = 256 << 10;
/// A read this far past the end of the previous one still continues its
/// stream (record headers sit between a volume's consecutive blocks).
const STREAM_GAP_BYTES: u64 = 4096;
/// Sequential-stream trackers kept (one per segment being streamed).
const MAX_STREAMS: usize = 64;
/// Fetch locks, striped by (segment, 4 MiB region).
pub(super) const FETCH_STRIPES: usize = 64;
const FETCH_REGION_SHIFT: u32 = 22;
/// Reads this small (a piece's checksums) do not move a stream's position.
const STREAM_MIN_READ_BYTES: u64 = 512;
/// Writable descriptors of cache files kept open.
const MAX_OPEN_FILES: usize = 128;

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

impl S3Store {
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
    pub(super) fn evict(&self) {
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
    pub(super) fn evict_all_clean(&self) {
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

    pub(super) fn read_uploaded(
        &self,
        id: u64,
        seg_len: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
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

pub(super) fn punch_file(path: &std::path::Path, offset: u64, len: u64) -> Result<()> {
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
