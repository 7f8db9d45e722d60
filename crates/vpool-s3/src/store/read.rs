//! The read cache: an uploaded segment's cache file holds what of it was
//! read lately; the rest is fetched from the bucket when it is read.
//!
//! A read whose bytes are all present (the index, [`CacheIndex`], says
//! which 512-byte sectors are) is a `pread`. Otherwise the missing sectors
//! are range-GET, written into the file, named in the index, and the read
//! tried again. Three locks keep the index honest:
//!
//! - `punch`, a RwLock: shared by a reader from "present?" to its `pread`
//!   and by a fill from its `pwrite` to its index entry; exclusive while
//!   eviction picks victims and punches them. So a hole is never punched
//!   under bytes the index names, nor under a read that trusted them.
//! - a fetch lock per (segment, 4 MiB region), striped: concurrent misses
//!   on the same bytes (a stream read at queue depth 8) fetch them once;
//!   the others wait, then find them present.
//! - `index` itself, held only between I/O.
//!
//! A read that starts where the last read of its segment ended is a
//! stream: its fetch is stretched by a read-ahead window that doubles up
//! to `readahead_max_bytes`. Eviction (S3-FIFO, in the index) gives chunks
//! back by punching holes in the files. Pinned ranges are never evicted,
//! and what of them is missing is prefetched in the background.
//!
//! [`CacheIndex`]: vpool_cache::CacheIndex

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
/// Bytes a prefetch of pinned data reads at a time.
const PREFETCH_BYTES: u64 = 4 << 20;

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// A read of an uploaded segment, through its cache file.
struct CacheRead {
    file: Arc<File>,
    id: u64,
    /// The segment's length in the bucket.
    seg_len: u64,
    range: Range<u64>,
    deadline: Instant,
}

/// How a fetch for a read ended.
enum Fetched {
    /// Someone else's fetch brought the bytes first.
    AlreadyThere,
    /// The bytes are in the cache file and the index.
    Filled,
    /// The cache file could not take them; the read was served from the
    /// bucket directly.
    ReadAround,
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
        let missing = self.in_bucket(missing);
        if missing.is_empty() {
            return;
        }
        let s = self.clone();
        let mut slot = self.inner.prefetcher.lock();
        // One prefetcher at a time (the last one finishes first): repeated
        // pin refreshes must not pile up fetches.
        if let Some(h) = slot.take() {
            let _ = h.join();
        }
        *slot = std::thread::Builder::new()
            .name("vpool-s3-prefetch".into())
            .spawn(move || s.prefetch(missing))
            .ok();
    }

    /// Of ranges missing from the cache, those to fetch. Only uploaded
    /// segments are ever missing (dirty ones are whole in the cache), and
    /// pins are sector-rounded: clipped to the object's end.
    fn in_bucket(&self, ranges: Vec<(u64, Range<u64>)>) -> Vec<(u64, Range<u64>)> {
        let up = self.inner.up.lock();
        ranges
            .into_iter()
            .filter(|(s, _)| !up.hidden.contains(s) && !up.dirty.contains_key(s))
            .filter_map(|(s, r)| {
                let len = up.manifest.segment(s)?.len;
                (r.start < len).then(|| (s, r.start..r.end.min(len)))
            })
            .collect()
    }

    /// Reads `ranges` through the cache, which fills it. A range is given up
    /// at its first failure (the next refresh tries again); all stop when
    /// the store closes.
    fn prefetch(&self, ranges: Vec<(u64, Range<u64>)>) {
        let mut buf = Vec::new();
        for (seg, r) in ranges {
            let mut at = r.start;
            while at < r.end && !self.inner.stop.load(Ordering::Relaxed) {
                let n = (r.end - at).min(PREFETCH_BYTES);
                buf.resize(n as usize, 0);
                if let Err(e) = self.read_at(SegmentId(seg), at, &mut buf) {
                    tracing::warn!(segment = seg, error = %e, "prefetch of pinned data failed");
                    break;
                }
                at += n;
            }
        }
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

    /// Reads `buf` at `offset` of uploaded segment `id` (`seg_len` bytes in
    /// the bucket): from the cache file once every byte is present, fetching
    /// what is missing first, within `read_timeout`.
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
        let r = CacheRead {
            file: self.cache_file(id)?,
            id,
            seg_len,
            range: offset..end,
            deadline: Instant::now() + inner.opts.read_timeout,
        };
        // Until this read fetches, finding its bytes is a hit.
        let mut first = true;
        loop {
            if self.read_if_present(&r, buf, first)? {
                return Ok(());
            }
            // Filled, then evicted before this read got to it: a cache far
            // too small for the reads in flight. Not forever.
            if Instant::now() >= r.deadline {
                inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                return Err(unavailable(
                    format!("reading segment {id} at {offset}"),
                    "the data kept being evicted before it could be read",
                ));
            }
            let stretch = if first { ahead } else { 0 };
            match self.fetch_missing(&r, stretch, buf)? {
                Fetched::AlreadyThere => {}
                Fetched::Filled => first = false,
                Fetched::ReadAround => return Ok(()),
            }
        }
    }

    /// Serves the read from the cache file if the index has all of it
    /// (true). On the first try, counts the hit or the miss; a hit also
    /// tells eviction the bytes were used again.
    fn read_if_present(&self, r: &CacheRead, buf: &mut [u8], first: bool) -> Result<bool> {
        let inner = &self.inner;
        let c = &inner.counters;
        let (id, offset, len) = (r.id, r.range.start, buf.len() as u64);
        let _g = inner.punch.read();
        let missing = inner.index.lock().missing(id, offset, len, r.seg_len);
        if !missing.is_empty() {
            if first {
                c.read_misses.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(false);
        }
        r.file
            .read_exact_at(buf, offset)
            .map_err(|e| StoreError::io(format!("reading cached segment {id}"), e))?;
        if first {
            // Only a read that found its data counts as a hit for
            // eviction: a scan that fills the cache must not promote what
            // it filled.
            inner.index.lock().touch(id, offset, len);
            c.read_hits.fetch_add(1, Ordering::Relaxed);
        }
        c.bytes_read.fetch_add(len, Ordering::Relaxed);
        Ok(true)
    }

    /// Fetches what of the read is missing, the last run stretched by
    /// `ahead` bytes of read-ahead, and fills the cache file with it, under
    /// the fetch lock of the read's region. If the file cannot take the
    /// bytes (its disk is full), serves `buf` from the bucket directly.
    fn fetch_missing(&self, r: &CacheRead, ahead: u64, buf: &mut [u8]) -> Result<Fetched> {
        let inner = &self.inner;
        let (id, offset) = (r.id, r.range.start);
        let stripe = (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (offset >> FETCH_REGION_SHIFT))
            as usize
            % FETCH_STRIPES;
        let _fetching = inner.fetching[stripe].lock();
        let len = r.range.end - offset;
        let mut missing = inner.index.lock().missing(id, offset, len, r.seg_len);
        if missing.is_empty() {
            return Ok(Fetched::AlreadyThere);
        }
        if ahead > 0 {
            self.stretch(r, r.range.end + ahead, &mut missing);
        }
        let key = self.object_key(id)?;
        let fetched = self.fetch(r, &key, &missing)?;
        if let Err(e) = self.fill(r, &fetched) {
            // The cache's disk is full (or failing): give back clean
            // copies and serve this read straight from the store. What
            // was half written is not in the index, so never read.
            tracing::warn!(segment = id, error = %e, "could not fill the cache; reading around it");
            self.evict_all_clean();
            let b = inner
                .remote
                .get_range(&key, r.range.clone(), r.deadline)
                .map_err(|e| unavailable(format!("reading segment {id} at {offset}"), e))?;
            inner
                .counters
                .bytes_fetched
                .fetch_add(b.len() as u64, Ordering::Relaxed);
            buf.copy_from_slice(&b);
            return Ok(Fetched::ReadAround);
        }
        self.evict();
        Ok(Fetched::Filled)
    }

    /// Read-ahead: stretches the last missing run to `to` (sector-rounded,
    /// within the segment), keeping only what of the stretch is missing.
    fn stretch(&self, r: &CacheRead, to: u64, missing: &mut Vec<Range<u64>>) {
        let Some(last) = missing.pop() else {
            return;
        };
        let stop = round_up(to, vpool_cache::SECTOR_BYTES).min(r.seg_len);
        let more = self
            .inner
            .index
            .lock()
            .missing(r.id, last.start, stop - last.start, r.seg_len);
        missing.extend(more);
    }

    /// The bucket key of uploaded segment `id`.
    fn object_key(&self, id: u64) -> Result<String> {
        match self.inner.up.lock().manifest.segment(id) {
            Some(s) => Ok(segment_key(id, s.epoch)),
            None => Err(StoreError::NotFound {
                what: format!("segment {id}"),
            }),
        }
    }

    /// Range-GETs `ranges` of object `key` for the read.
    fn fetch(&self, r: &CacheRead, key: &str, ranges: &[Range<u64>]) -> Result<Vec<(u64, Bytes)>> {
        let inner = &self.inner;
        let mut fetched: Vec<(u64, Bytes)> = Vec::with_capacity(ranges.len());
        for range in ranges {
            match inner.remote.get_range(key, range.clone(), r.deadline) {
                Ok(b) => {
                    inner
                        .counters
                        .bytes_fetched
                        .fetch_add(b.len() as u64, Ordering::Relaxed);
                    fetched.push((range.start, b));
                }
                Err(e) => {
                    let (segment, offset) = (r.id, r.range.start);
                    let len = r.range.end - offset;
                    inner.counters.read_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(segment, offset, len, error = %e, "read of uncached data failed");
                    inner.up.lock().last_error = Some(e.to_string());
                    return Err(unavailable(
                        format!("reading segment {segment} at {offset}"),
                        e,
                    ));
                }
            }
        }
        Ok(fetched)
    }

    /// Writes fetched bytes into the cache file and then names them in the
    /// index, both under `punch` (shared): eviction punches between fills,
    /// never between a fill's write and its index entry.
    fn fill(&self, r: &CacheRead, fetched: &[(u64, Bytes)]) -> std::io::Result<()> {
        let _g = self.inner.punch.read();
        fetched
            .iter()
            .try_for_each(|(at, b)| r.file.write_all_at(b, *at))?;
        let mut ix = self.inner.index.lock();
        for (at, b) in fetched {
            ix.insert(r.id, *at..*at + b.len() as u64, r.seg_len);
        }
        Ok(())
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
