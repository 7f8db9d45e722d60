//! The log: appending a record and applying it, rolling to a new segment,
//! flushing.
//!
//! Every change to the pool is one [`LogRecord`] appended at the open
//! segment's end with one vectored write, then applied to the volume table
//! ([`Table::apply`](super::state::Table::apply)), both under the state
//! lock: the log order is the order changes took effect, and replay
//! reproduces the state exactly. An append returns once the bytes are in
//! the store (the page cache, for a local pool): acknowledged, not
//! durable. [`Pool::flush`] syncs, in log order, every segment with bytes
//! appended since its last sync.
//!
//! Two failures leave marks here. A failed sync poisons the pool for
//! writes (`LogState::failed`): the kernel may have dropped the dirty
//! pages, so a later sync that succeeds would prove nothing. A failed
//! append may leave part of a record past the segment's end, so the next
//! append starts a new segment, and first cuts the fragment durably
//! (`LogState::roll_before_next_append`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use vpool_store::{OpenSegment, SegmentId, SegmentStore};

use super::Pool;
use super::state::{RecordAt, SegInfo, State};
use crate::checkpoint::LogPosition;
use crate::error::{EngineError, Result};
use crate::record::{self, LogRecord, SEGMENT_HEADER_LEN};

/// A segment of the log that may still need syncing.
pub(super) struct LogSeg {
    pub(super) handle: Box<dyn OpenSegment>,
    /// Bytes appended (set under the state lock after each append).
    pub(super) appended: AtomicU64,
    /// Bytes known durable.
    pub(super) synced: AtomicU64,
}

impl LogSeg {
    /// A segment with `len` bytes appended, none of them synced yet.
    fn new(handle: Box<dyn OpenSegment>, len: u64) -> LogSeg {
        LogSeg {
            handle,
            appended: AtomicU64::new(len),
            synced: AtomicU64::new(0),
        }
    }

    /// Stands in for the open segment while recovery rebuilds the state.
    pub(super) fn not_open() -> Arc<LogSeg> {
        Arc::new(LogSeg::new(Box::new(NotOpen), 0))
    }

    pub(super) fn id(&self) -> SegmentId {
        self.handle.id()
    }

    fn sync_if_needed(&self) -> Result<()> {
        let target = self.appended.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.handle.sync()?;
        self.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    pub(super) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.appended.load(Ordering::Acquire)
    }
}

/// The placeholder behind [`LogSeg::not_open`].
struct NotOpen;

impl OpenSegment for NotOpen {
    fn id(&self) -> SegmentId {
        SegmentId(0)
    }
    fn append_at(&self, _offset: u64, _bufs: &[&[u8]]) -> vpool_store::Result<()> {
        unreachable!("recovery appends nothing before the log is open")
    }
    fn sync(&self) -> vpool_store::Result<()> {
        Ok(())
    }
}

/// The log's part of the state (the other is the volume table).
pub(super) struct LogState {
    pub(super) open: Arc<LogSeg>,
    /// Sealed segments not yet known durable, oldest first.
    pub(super) unsynced: Vec<Arc<LogSeg>>,
    pub(super) next_seq: u64,
    pub(super) next_segment_id: u64,
    pub(super) log_bytes_since_checkpoint: u64,
    /// Set when a sync failed: writes are refused from then on.
    pub(super) failed: Option<String>,
    /// Set by [`Pool::close`]: every later write or flush fails with
    /// [`EngineError::Closed`].
    pub(super) closed: bool,
    /// Set when an append failed: the open segment may hold a partial
    /// record past its end, so the next append starts a new segment.
    pub(super) roll_before_next_append: bool,
    /// A segment created by a roll whose header could not be written (a
    /// full device): the next roll writes its header instead of creating
    /// another, so no id is skipped and nothing is left behind.
    pub(super) half_rolled: Option<Box<dyn OpenSegment>>,
    /// When the open segment got its first record; the store may ask for it
    /// to be sealed after a while ([`SegmentStore::seal_after`]).
    pub(super) open_since: Option<Instant>,
    /// Records other than marks appended since the last durable mark was
    /// (a mark is due only when there is something new to vouch for:
    /// rolls and marks alone never call for one, or an idle pool on an
    /// object store would seal and ship a segment holding one mark after
    /// another).
    pub(super) records_since_mark: u64,
    /// The position the last durable mark vouched for.
    pub(super) marked_to: Option<LogPosition>,
    /// When the last durable mark was appended.
    pub(super) last_mark: Option<Instant>,
}

impl LogState {
    /// The state of an empty log whose open segment is `open`.
    pub(super) fn new(open: Arc<LogSeg>) -> LogState {
        LogState {
            open,
            unsynced: Vec::new(),
            next_seq: 1,
            next_segment_id: 1,
            log_bytes_since_checkpoint: 0,
            failed: None,
            closed: false,
            roll_before_next_append: false,
            half_rolled: None,
            open_since: None,
            records_since_mark: 0,
            marked_to: None,
            last_mark: None,
        }
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.closed {
            return Err(EngineError::Closed);
        }
        if let Some(f) = &self.failed {
            return Err(EngineError::Failed(f.clone()));
        }
        Ok(())
    }
}

impl Pool {
    /// Makes every write that completed before this call durable.
    pub fn flush(&self) -> Result<()> {
        self.inner.store.admit_flush()?;
        let segs: Vec<Arc<LogSeg>> = {
            let st = self.inner.state.lock();
            st.log.check_writable()?;
            let sealed = st.log.unsynced.iter().cloned();
            sealed.chain([st.log.open.clone()]).collect()
        };
        // In log order: a later segment is never durable before an earlier one
        // is, which recovery relies on when it cuts at the first bad record.
        for s in &segs {
            if let Err(e) = s.sync_if_needed() {
                let msg = format!("syncing {}: {e}", s.id());
                tracing::error!(error = %msg, "sync failed; the pool refuses writes from now on");
                self.inner.state.lock().log.failed = Some(msg);
                return Err(e);
            }
        }
        let mut st = self.inner.state.lock();
        st.log.unsynced.retain(|s| !s.is_synced());
        Ok(())
    }

    /// Runs a metadata operation under the state lock, then flushes: its
    /// record is durable when this returns.
    pub(super) fn durable_op<T>(&self, op: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let out = {
            let mut st = self.writable_state()?;
            op(&mut st)?
        };
        self.flush()?;
        Ok(out)
    }

    /// Data writes are refused at once while the device is full.
    pub(super) fn check_room(&self) -> Result<()> {
        if !self.inner.full.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(EngineError::PoolFull {
            free_bytes: self.inner.store.free_bytes().unwrap_or(0),
            reserve_bytes: self.inner.store.reserve_bytes(),
        })
    }

    /// The state lock, unless the pool refuses writes (closed, or a sync
    /// failed).
    pub(super) fn writable_state(&self) -> Result<parking_lot::MutexGuard<'_, State>> {
        let st = self.inner.state.lock();
        st.log.check_writable()?;
        Ok(st)
    }

    /// Appends a record to the log and applies it to the state. A device
    /// that is out of space puts the pool in its full state.
    pub(super) fn append_and_apply(&self, st: &mut State, rec: LogRecord<'_>) -> Result<()> {
        let result = self.append_and_apply_inner(st, rec);
        if let Err(e) = &result
            && e.is_no_space()
        {
            self.enter_full(e);
        }
        result
    }

    fn append_and_apply_inner(&self, st: &mut State, rec: LogRecord<'_>) -> Result<()> {
        let log = &mut st.log;
        if log.roll_before_next_append
            || log.open.appended.load(Ordering::Acquire) >= self.inner.config.segment_target_bytes
        {
            self.roll(st)?;
        }
        let log = &mut st.log;
        let seq = log.next_seq;
        let h = rec.header(seq);
        let hdr = h.encode();
        let off = log.open.appended.load(Ordering::Acquire);
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(4);
        bufs.push(&hdr);
        bufs.extend(rec.payload().into_iter().filter(|p| !p.is_empty()));
        if let Err(e) = log.open.handle.append_at(off, &bufs) {
            // Part of the record may be on disk past the segment's end: never
            // append after it (recovery stops at it anyway).
            log.roll_before_next_append = true;
            return Err(e.into());
        }
        // The record is in the log: from here on the state must take it.
        // Callers check under this lock all that apply checks, so it does
        // not fail; a panic aborts the process (see "Panics" in
        // ARCHITECTURE.md), and recovery then applies the record.
        let len = h.record_len();
        let seg = log.open.id();
        log.open.appended.store(off + len, Ordering::Release);
        log.open_since.get_or_insert(Instant::now());
        if !matches!(rec, LogRecord::Mark { .. }) {
            log.records_since_mark += 1;
        }
        log.next_seq += 1;
        log.log_bytes_since_checkpoint += len;
        let info = st.table.segments.get_mut(&seg);
        info.expect("open segment is known").size_bytes = off + len;
        st.table.apply(RecordAt { seg, off, seq }, &rec)
    }

    /// Seals the open segment and starts the next one. A segment created
    /// whose header could not be written (a full device) is kept for the
    /// next try: the id is not skipped and no empty file is left behind.
    pub(super) fn roll(&self, st: &mut State) -> Result<()> {
        if st.log.roll_before_next_append {
            // A failed append may have left part of a record past the end:
            // cut it, durably, before a durable mark can vouch for the
            // segment (recovery would take the fragment for corruption).
            // Until that succeeds, nothing is appended anywhere.
            let open = &st.log.open;
            let (old, len) = (open.id(), open.appended.load(Ordering::Acquire));
            self.inner.store.truncate_segment(old, len)?;
        }
        let new = new_segment(&*self.inner.store, st)?;
        let old = std::mem::replace(&mut st.log.open, new);
        st.log.unsynced.push(old);
        st.log.roll_before_next_append = false;
        st.log.open_since = None;
        self.wake_maintenance();
        Ok(())
    }
}

/// Creates the segment the log continues in after recovery.
pub(super) fn open_first_segment(store: &dyn SegmentStore, st: &mut State) -> Result<()> {
    st.log.open = new_segment(store, st)?;
    Ok(())
}

/// Starts segment `next_segment_id`: creates it (or takes the one a failed
/// roll left, see `LogState::half_rolled`), writes its header and adds it
/// to the table.
fn new_segment(store: &dyn SegmentStore, st: &mut State) -> Result<Arc<LogSeg>> {
    let id = SegmentId(st.log.next_segment_id);
    let handle = match st.log.half_rolled.take() {
        Some(h) => h,
        None => store.create_segment(id)?,
    };
    debug_assert_eq!(handle.id(), id);
    let header = record::encode_segment_header(id);
    if let Err(e) = handle.append_at(0, &[&header]) {
        st.log.half_rolled = Some(handle);
        return Err(e.into());
    }
    st.log.next_segment_id += 1;
    let seg = SegInfo {
        size_bytes: SEGMENT_HEADER_LEN,
        refs: 0,
    };
    st.table.segments.insert(id, seg);
    Ok(Arc::new(LogSeg::new(handle, SEGMENT_HEADER_LEN)))
}
