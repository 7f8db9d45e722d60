//! Background work: syncs and durable marks, checkpoints, the cleaner, and
//! the way out of a full device.
//!
//! # Durable marks
//! After it has synced the log, the maintenance thread appends a
//! [`LogRecord::Mark`] naming the position up to which the log is known
//! durable, and syncs again. Recovery trusts every byte before the last
//! mark it finds: a bad record there is corruption to report, not a torn
//! tail to cut (see `recovery`). A mark is due when a segment has been
//! sealed, or when records were appended and the last mark is older than
//! [`PoolConfig::durable_mark_interval`](super::PoolConfig::durable_mark_interval).
//!
//! # Checkpoints
//! A checkpoint goes to the older of the two slots ([`CHECKPOINT_SLOTS`]).
//! A segment emptied by the cleaner is deleted only once two checkpoints
//! have been captured after its data was relocated: then neither copy
//! refers to it, and neither replays through it, so recovery can fall back
//! on either copy.
//!
//! # A full device
//! The first ENOSPC puts the pool in its *full* state: the store's reserve
//! is released, data writes fail at once with [`EngineError::PoolFull`],
//! and deletes, trims, snapshots and the cleaner go on (they write little,
//! from the reserve). The maintenance thread then cleans one segment at a
//! time regardless of the garbage threshold, and once the device has room
//! for the reserve twice over it takes the reserve back and lets writes in.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vpool_store::SegmentId;

use super::log::LogSeg;
use super::state::{SegInfo, State};
use super::{CleanReport, Pool};
use crate::checkpoint::{
    CHECKPOINT_SLOTS, Checkpoint, LogPosition, SnapshotCheckpoint, VolumeCheckpoint,
};
use crate::error::{EngineError, Result};
use crate::extent_map::{DataLoc, Target};
use crate::record::{
    self, Blocks, CRC_LEN, LogRecord, RecordHeader, RecordKind, SEGMENT_HEADER_LEN, Scanned,
    data_loc,
};
use crate::types::BLOCK_SIZE;

/// Checkpoints captured after a relocation before its victim is deleted.
const CHECKPOINTS_BEFORE_DELETE: u32 = 2;
/// An emptied segment waits at most about this long for the checkpoints
/// that delete it, however little the log grows.
const VICTIM_MAX_WAIT: Duration = Duration::from_secs(30);

/// A segment the cleaner emptied, waiting for deletion.
#[derive(Clone, Copy, Debug)]
pub(super) struct Victim {
    id: SegmentId,
    /// Checkpoints captured since its live data was relocated.
    checkpoints: u32,
    /// When its live data was relocated.
    since: Instant,
}

impl Pool {
    /// Writes a checkpoint: recovery will start from the current end of log.
    pub fn checkpoint(&self) -> Result<()> {
        let _m = self.inner.maintenance_lock.lock();
        self.checkpoint_locked().map(|_| ())
    }

    /// Writes a checkpoint to the older slot, then deletes the segments the
    /// cleaner emptied that two checkpoints no longer need. Returns
    /// (segments deleted, bytes freed).
    pub(super) fn checkpoint_locked(&self) -> Result<(u64, u64)> {
        // Victims relocated before the capture below: this checkpoint no
        // longer refers to them and its replay starts after them.
        let before = self.waiting_victims();
        let (ckpt, log_bytes) = {
            let mut st = self.inner.state.lock();
            let c = capture(&st);
            (c, std::mem::take(&mut st.log.log_bytes_since_checkpoint))
        };
        let slot = *self.inner.next_checkpoint_slot.lock();
        let encoded = ckpt.encode();
        // The checkpoint refers to log bytes up to its position: they must be
        // durable before the checkpoint is.
        let result = self.flush().and_then(|()| {
            self.inner
                .store
                .put_meta(CHECKPOINT_SLOTS[slot], &encoded)
                .map_err(EngineError::from)
        });
        if let Err(e) = result {
            self.inner.state.lock().log.log_bytes_since_checkpoint += log_bytes;
            if e.is_no_space() {
                self.enter_full(&e);
            }
            return Err(e);
        }
        *self.inner.next_checkpoint_slot.lock() = 1 - slot;
        self.inner
            .last_checkpoint_bytes
            .store(encoded.len() as u64, Ordering::Relaxed);
        self.inner
            .counters
            .checkpoints_written
            .fetch_add(1, Ordering::Relaxed);
        let due: Vec<Victim> = {
            let mut victims = self.inner.relocated_victims.lock();
            for v in victims.iter_mut().filter(|v| before.contains(&v.id)) {
                v.checkpoints += 1;
            }
            victims
                .iter()
                .filter(|v| v.checkpoints >= CHECKPOINTS_BEFORE_DELETE)
                .copied()
                .collect()
        };
        self.delete_victims(&due)
    }

    /// The segments the cleaner emptied that wait for deletion.
    fn waiting_victims(&self) -> Vec<SegmentId> {
        let victims = self.inner.relocated_victims.lock();
        victims.iter().map(|v| v.id).collect()
    }

    /// Deletes emptied segments, waiting for readers that looked up a
    /// location in one of them.
    fn delete_victims(&self, due: &[Victim]) -> Result<(u64, u64)> {
        if due.is_empty() {
            return Ok((0, 0));
        }
        let _gate = self.inner.delete_gate.write();
        let (mut deleted, mut freed) = (0, 0);
        for v in due {
            let s = {
                let mut st = self.inner.state.lock();
                st.table.apply_pending_refs();
                st.table.segments.get(&v.id).copied().unwrap_or_default()
            };
            // New data only ever goes to the open segment, and a snapshot or
            // clone taken since the relocation copied maps that no longer
            // point at the victim: nothing can refer to it now.
            assert_eq!(s.refs, 0, "victim {} is referenced after relocation", v.id);
            self.inner.store.delete_segment(v.id)?;
            self.inner.state.lock().table.segments.remove(&v.id);
            self.inner.relocated_victims.lock().retain(|x| x.id != v.id);
            deleted += 1;
            freed += s.size_bytes;
        }
        self.inner
            .counters
            .segments_cleaned
            .fetch_add(deleted, Ordering::Relaxed);
        Ok((deleted, freed))
    }

    /// Stops the maintenance thread, writes a checkpoint, and closes. Writes
    /// through remaining handles fail afterwards.
    pub fn close(&self) -> Result<()> {
        self.stop_maintenance();
        self.checkpoint()?;
        self.inner.state.lock().log.closed = true;
        Ok(())
    }

    pub(super) fn stop_maintenance(&self) {
        self.inner.shutdown.store(true, Ordering::SeqCst);
        self.wake_maintenance();
        if let Some(h) = self.maintenance.lock().take() {
            let _ = h.join();
        }
    }

    pub(super) fn wake_maintenance(&self) {
        *self.inner.wake_lock.lock() = true;
        self.inner.wake.notify_one();
    }

    pub(super) fn maintenance_loop(&self) {
        let period = self.inner.config.maintenance_period;
        let mut failures = 0u32;
        while !self.inner.shutdown.load(Ordering::SeqCst) {
            {
                let mut woken = self.inner.wake_lock.lock();
                if !*woken {
                    self.inner.wake.wait_for(&mut woken, period);
                }
                *woken = false;
            }
            if self.inner.shutdown.load(Ordering::SeqCst) {
                break;
            }
            match self.maintenance_step() {
                Ok(()) => failures = 0,
                Err(e) => {
                    failures = failures.saturating_add(1);
                    // The same failure repeats every period while it lasts
                    // (a full device): one line now and then, not a flood.
                    if failures.is_power_of_two() {
                        tracing::warn!(error = %e, failures, "background maintenance failed; will retry");
                    }
                    std::thread::sleep(backoff(period, failures));
                }
            }
        }
    }

    /// One round of background work: seal an old open segment, sync and
    /// mark, clean (harder when the device is full), checkpoint when due.
    pub fn maintenance_step(&self) -> Result<()> {
        self.seal_if_old()?;
        self.sync_and_mark()?;
        if self.inner.full.load(Ordering::Acquire) {
            return self.free_space();
        }
        // Clean only when garbage is worth it: a pass costs a read of each
        // victim and a rewrite of its live data.
        if self.inner.state.lock().table.space().2 > self.inner.config.clean_when_garbage_above {
            let _m = self.inner.maintenance_lock.lock();
            self.relocate_pass(self.inner.config.clean_max_segments_per_pass)?;
        }
        // Emptied segments go with the next checkpoints: one is due by log
        // size, or when a pass's worth of segments waits, or any segment has
        // waited a while, or the device is short of space.
        let (waiting, oldest) = {
            let v = self.inner.relocated_victims.lock();
            (v.len(), v.iter().map(|v| v.since).min())
        };
        let short = || {
            let want = self.reserve_target_bytes().saturating_mul(4);
            self.inner.store.free_bytes().is_some_and(|f| f < want)
        };
        let due = self.inner.state.lock().log.log_bytes_since_checkpoint
            >= self.inner.config.checkpoint_interval_bytes
            || waiting >= self.inner.config.clean_max_segments_per_pass
            || oldest.is_some_and(|t| t.elapsed() >= VICTIM_MAX_WAIT)
            || (waiting > 0 && short());
        if due {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Seals the open segment now if it holds any record, and syncs it: a
    /// store that ships sealed segments (S3) ships everything written
    /// before without waiting for its `seal_after`.
    pub fn seal_open_segment(&self) -> Result<()> {
        {
            let mut st = self.writable_state()?;
            if st.log.open_since.is_some() {
                self.roll(&mut st)?;
            }
        }
        self.flush()
    }

    /// Seals the open segment if the store wants it shipped by now.
    fn seal_if_old(&self) -> Result<()> {
        let Some(age) = self.inner.store.seal_after() else {
            return Ok(());
        };
        let mut st = self.inner.state.lock();
        let old = st.log.open_since.is_some_and(|t| t.elapsed() >= age);
        if st.log.failed.is_none()
            && !st.log.closed
            && old
            && let Err(e) = self.roll(&mut st)
        {
            if e.is_no_space() {
                self.enter_full(&e);
            }
            return Err(e);
        }
        Ok(())
    }

    /// Syncs the log and appends a durable mark when one is due (see the
    /// module doc), then syncs the mark.
    fn sync_and_mark(&self) -> Result<()> {
        let (due, records) = {
            let st = self.inner.state.lock();
            let sealed = !st.log.unsynced.is_empty();
            let interval = self.inner.config.durable_mark_interval;
            let old = st.log.last_mark.is_none_or(|t| t.elapsed() >= interval);
            let new = st.log.records_since_mark > 0;
            (
                st.log.failed.is_none() && !st.log.closed && new && (sealed || old),
                st.log.records_since_mark,
            )
        };
        if !due {
            return Ok(());
        }
        self.flush()?;
        {
            let mut st = self.writable_state()?;
            let covers = durable_position(&st);
            if st.log.marked_to.is_some_and(|m| m >= covers) {
                return Ok(());
            }
            match self.append_and_apply(&mut st, LogRecord::Mark { covers }) {
                Ok(()) => {}
                // Full: the mark waits until there is room again.
                Err(e) if e.is_no_space() => return Ok(()),
                Err(e) => return Err(e),
            }
            // Records appended while the flush ran are not vouched for yet.
            st.log.records_since_mark = st.log.records_since_mark.saturating_sub(records);
            st.log.marked_to = Some(covers);
            st.log.last_mark = Some(Instant::now());
        }
        self.flush()
    }

    /// Puts the pool in its full state (see the module doc). Idempotent.
    pub(super) fn enter_full(&self, cause: &EngineError) {
        if self.inner.full.swap(true, Ordering::AcqRel) {
            return;
        }
        let released = self.inner.store.release_reserve();
        tracing::warn!(error = %cause, released_bytes = ?released.as_ref().ok(),
            "the pool's device is full: data writes fail with ENOSPC until space is freed; reads, deletes and trims go on, and the cleaner works from the reserve");
        self.wake_maintenance();
    }

    /// The way out of the full state: clean one segment, delete what two
    /// checkpoints allow, and take the reserve back once there is room.
    fn free_space(&self) -> Result<()> {
        {
            let _m = self.inner.maintenance_lock.lock();
            // One victim a pass: it needs room only for its own live data,
            // and its deletion frees more than that.
            self.relocate_pass(1)?;
            self.checkpoint_until_deleted()?;
        }
        self.leave_full_if_room();
        Ok(())
    }

    /// Writes the checkpoints that let every waiting victim go. Returns
    /// (segments deleted, bytes freed). The caller holds the maintenance lock.
    fn checkpoint_until_deleted(&self) -> Result<(u64, u64)> {
        let (mut deleted, mut freed) = (0, 0);
        for _ in 0..CHECKPOINTS_BEFORE_DELETE {
            if self.inner.relocated_victims.lock().is_empty() {
                break;
            }
            let (d, f) = self.checkpoint_locked()?;
            deleted += d;
            freed += f;
        }
        Ok((deleted, freed))
    }

    /// Takes the reserve back and lets data writes in, if the device has
    /// room for the reserve twice over.
    fn leave_full_if_room(&self) {
        let want = self.reserve_target_bytes();
        if self
            .inner
            .store
            .free_bytes()
            .is_some_and(|f| f < want.saturating_mul(2))
        {
            return;
        }
        if self.inner.store.restore_reserve(want).is_ok() {
            self.inner.full.store(false, Ordering::Release);
            tracing::info!(
                reserve_bytes = want,
                "the pool's device has room again: data writes are accepted"
            );
        }
    }

    /// Grows the reserve to its target when the device can spare it.
    pub(super) fn restore_reserve(&self) {
        let want = self.reserve_target_bytes();
        if self.inner.store.reserve_bytes() >= want {
            return;
        }
        if let Err(e) = self.inner.store.restore_reserve(want) {
            tracing::warn!(error = %e, reserve_bytes = want,
                "could not reserve space for the cleaner; a full device may need space freed by hand");
        }
    }

    /// What the cleaner may need on a full device: room to copy a victim's
    /// live data (two segments) and to write a checkpoint next to the old
    /// copies (twice its size).
    pub(super) fn reserve_target_bytes(&self) -> u64 {
        let ckpt = self.inner.last_checkpoint_bytes.load(Ordering::Relaxed);
        2 * self.inner.config.segment_target_bytes + 2 * ckpt
    }

    /// One cleaner pass, to the end: picks sealed segments whose live
    /// fraction is below the configured threshold, copies their live blocks
    /// to the head of the log, and checkpoints until they are deleted
    /// (with any segments emptied by earlier background passes).
    pub fn clean(&self) -> Result<CleanReport> {
        let _m = self.inner.maintenance_lock.lock();
        let relocated = self.relocate_pass(self.inner.config.clean_max_segments_per_pass)?;
        let (segments_deleted, bytes_freed) = self.checkpoint_until_deleted()?;
        let report = CleanReport {
            bytes_relocated: relocated,
            segments_deleted,
            bytes_freed,
        };
        tracing::debug!(?report, "cleaner pass");
        Ok(report)
    }

    /// Picks up to `max` victims and relocates their live data; they are
    /// deleted by later checkpoints. Returns the bytes relocated. The
    /// caller holds the maintenance lock.
    fn relocate_pass(&self, max: usize) -> Result<u64> {
        let victims = self.pick_victims(max);
        let mut relocated = 0;
        for (id, info) in victims {
            if info.refs > 0 {
                match self.relocate_live(id, info.size_bytes)? {
                    Some(n) => relocated += n,
                    None => continue,
                }
            }
            self.inner.relocated_victims.lock().push(Victim {
                id,
                checkpoints: 0,
                since: Instant::now(),
            });
        }
        self.inner
            .counters
            .bytes_relocated
            .fetch_add(relocated, Ordering::Relaxed);
        Ok(relocated)
    }

    /// Sealed, synced segments whose live fraction is under the threshold,
    /// emptiest first, leaving out damaged ones and those already waiting.
    fn pick_victims(&self, max: usize) -> Vec<(SegmentId, SegInfo)> {
        let waiting = self.waiting_victims();
        let damaged = self.inner.damage.lock().segments.clone();
        let mut st = self.inner.state.lock();
        st.table.apply_pending_refs();
        let open = st.log.open.id();
        let unsynced: Vec<SegmentId> = st.log.unsynced.iter().map(|s| s.id()).collect();
        let threshold = self.inner.config.clean_below_live_fraction;
        let mut v: Vec<(SegmentId, SegInfo, f64)> = st
            .table
            .segments
            .iter()
            .filter(|(id, _)| {
                **id < open
                    && !unsynced.contains(id)
                    && !waiting.contains(id)
                    && !damaged.contains(id)
            })
            .map(|(&id, &s)| {
                // Shared blocks count once per map: sharing makes a
                // segment look fuller than it is, never emptier.
                let live = (s.refs.max(0) as u64 * BLOCK_SIZE) as f64 / s.size_bytes.max(1) as f64;
                (id, s, live)
            })
            .filter(|(_, _, live)| *live < threshold)
            .collect();
        v.sort_by(|a, b| a.2.total_cmp(&b.2));
        v.truncate(max);
        v.into_iter().map(|(id, s, _)| (id, s)).collect()
    }

    /// Copies the blocks of segment `id` that any map (volume or snapshot)
    /// still points at to new `Relocate` records, which repoint every such
    /// map. Returns the bytes copied, or `None` if the segment is damaged
    /// where it is live: it is then left alone (and remembered), since the
    /// engine never writes a record that does not verify.
    fn relocate_live(&self, id: SegmentId, size_bytes: u64) -> Result<Option<u64>> {
        let mut image = vec![0u8; usize::try_from(size_bytes).expect("segment fits memory")];
        self.inner.store.read_at(id, 0, &mut image)?;
        let Some(records) = self.live_records(id, &image) else {
            return Ok(None);
        };
        let mut copied = 0u64;
        for (off, h) in records {
            let here = data_loc(id, off as u64, h.nblocks);
            let mut st = self.writable_state()?;
            let live: Vec<bool> = map_refs(&mut st, &h, here).iter().map(|&n| n > 0).collect();
            let mut i = 0;
            while i < live.len() {
                if !live[i] {
                    i += 1;
                    continue;
                }
                let run = live[i..].iter().take_while(|&&l| l).count();
                let (crcs, data) = run_bytes(&image, here, i, run);
                let rec = LogRecord::Relocate {
                    volume: h.volume,
                    block: h.block + i as u64,
                    blocks: Blocks { crcs, data },
                    old: here.advance(i as u64),
                };
                self.append_and_apply(&mut st, rec)?;
                copied += (run as u64) * BLOCK_SIZE;
                i += run;
            }
        }
        Ok(Some(copied))
    }

    /// The write and relocate records of a sealed segment image, or `None`
    /// (after remembering the segment as damaged) if a map still points
    /// into a record that cannot be read whole. Past bytes that are not a
    /// record, reading resumes where records run in sequence to the end;
    /// the segment can then be cleaned only if the records found hold every
    /// reference the segment counts (nothing live hides in what was not
    /// read).
    fn live_records(&self, id: SegmentId, image: &[u8]) -> Option<Vec<(usize, RecordHeader)>> {
        let mut out = Vec::new();
        let mut broken = None;
        let mut off = SEGMENT_HEADER_LEN as usize;
        while let Some(found) = record::scan_record(image, off) {
            let data =
                |h: &RecordHeader| matches!(h.kind, RecordKind::Write | RecordKind::Relocate);
            match found {
                Scanned::Record { header, .. } => {
                    if data(&header) {
                        out.push((off, header));
                    }
                    off += header.record_len() as usize;
                }
                Scanned::Damaged { header, error, .. } => {
                    let here = data_loc(id, off as u64, header.nblocks);
                    let mut st = self.inner.state.lock();
                    if data(&header) && map_refs(&mut st, &header, here).iter().any(|&n| n > 0) {
                        drop(st);
                        self.note_damaged_segment(id, off, &error.to_string());
                        return None;
                    }
                    off += header.record_len() as usize;
                }
                Scanned::Broken { error } => {
                    broken.get_or_insert((off, error));
                    match super::recovery::resync(image, off + 1, 0) {
                        Some(next) => off = next,
                        None => break,
                    }
                }
            }
        }
        if let Some((at, error)) = broken {
            let mut st = self.inner.state.lock();
            let found: i64 = out
                .iter()
                .map(|(o, h)| {
                    let here = data_loc(id, *o as u64, h.nblocks);
                    map_refs(&mut st, h, here)
                        .iter()
                        .map(|&n| i64::from(n))
                        .sum::<i64>()
                })
                .sum();
            let counted = st.table.segments.get(&id).map_or(0, |s| s.refs);
            drop(st);
            if found != counted {
                self.note_damaged_segment(id, at, &error.to_string());
                return None;
            }
        }
        Some(out)
    }

    /// Moves the live data out of segment `id` and queues it for deletion
    /// (by the next two checkpoints), if that can be done without copying
    /// damage: `pool check --repair` on a segment that holds unreadable
    /// bytes. Returns whether it was queued.
    pub(super) fn evacuate(&self, id: SegmentId) -> Result<bool> {
        let _m = self.inner.maintenance_lock.lock();
        let info = {
            let mut st = self.inner.state.lock();
            st.table.apply_pending_refs();
            let sealed = id < st.log.open.id() && !st.log.unsynced.iter().any(|s| s.id() == id);
            match st.table.segments.get(&id) {
                Some(s) if sealed => *s,
                _ => return Ok(false),
            }
        };
        if self.waiting_victims().contains(&id) {
            return Ok(true);
        }
        self.inner.damage.lock().segments.remove(&id);
        if self.relocate_live(id, info.size_bytes)?.is_none() {
            return Ok(false);
        }
        self.inner.relocated_victims.lock().push(Victim {
            id,
            checkpoints: 0,
            since: Instant::now(),
        });
        self.checkpoint_until_deleted()?;
        Ok(true)
    }

    fn note_damaged_segment(&self, id: SegmentId, off: usize, why: &str) {
        if self.inner.damage.lock().segments.insert(id) {
            tracing::error!(segment = %id, offset = off, error = why,
                "the cleaner found damage in a sealed segment; it keeps the segment (reads of damaged blocks fail) and cleans around it");
        }
    }
}

/// The end of the log: the open segment's length.
fn end_of_log(st: &State) -> LogPosition {
    LogPosition {
        seg: st.log.open.id(),
        offset: st.log.open.appended.load(Ordering::Acquire),
    }
}

/// How far the log is known durable: every segment before the first one
/// with unsynced bytes is synced whole (flushes go in log order).
fn durable_position(st: &State) -> LogPosition {
    let first: &Arc<LogSeg> = st
        .log
        .unsynced
        .iter()
        .find(|s| !s.is_synced())
        .unwrap_or(&st.log.open);
    LogPosition {
        seg: first.id(),
        offset: first.synced.load(Ordering::Acquire),
    }
}

/// The pool's state as a checkpoint: O(volumes + snapshots) under the
/// lock, since maps are persistent (a clone is O(1)).
fn capture(st: &State) -> Checkpoint {
    let volumes = st
        .table
        .volumes
        .iter()
        .map(|(&id, v)| VolumeCheckpoint {
            id,
            name: v.name.clone(),
            size_bytes: v.size_bytes,
            map: v.map.clone(),
            parent: v.parent.clone(),
            ephemeral: v.ephemeral,
            snapshots: v
                .snapshots
                .iter()
                .map(|(name, s)| SnapshotCheckpoint {
                    name: name.clone(),
                    size_bytes: s.size_bytes,
                    seq: s.seq,
                    map: s.map.clone(),
                })
                .collect(),
        })
        .collect();
    Checkpoint {
        position: end_of_log(st),
        next_seq: st.log.next_seq,
        next_volume_id: st.table.next_volume_id,
        next_segment_id: st.log.next_segment_id,
        volumes,
    }
}

/// For each block of a record, how many maps (volumes and snapshots)
/// point at it: a block is live if any does; summed, what the segment's
/// reference count holds for the record.
fn map_refs(st: &mut State, h: &RecordHeader, here: DataLoc) -> Vec<u32> {
    st.table.apply_pending_refs();
    let n = h.nblocks as usize;
    let mut refs = vec![0u32; n];
    for vol in st.table.volumes.values() {
        let maps = std::iter::once(&vol.map).chain(vol.snapshots.values().map(|s| &s.map));
        for map in maps {
            for p in map.lookup(h.block, n as u64) {
                if let Some(Target::Data(d)) = p.target {
                    let k = p.start_block - h.block;
                    if d == here.advance(k) {
                        for r in &mut refs[k as usize..(k + p.len_blocks) as usize] {
                            *r += 1;
                        }
                    }
                }
            }
        }
    }
    refs
}

/// The checksums and data of `run` blocks from block `i` of a record.
fn run_bytes(image: &[u8], here: DataLoc, i: usize, run: usize) -> (&[u8], &[u8]) {
    let crcs = &image[here.crc_off as usize + i * CRC_LEN..][..run * CRC_LEN];
    let bs = BLOCK_SIZE as usize;
    let data = &image[here.data_off as usize + i * bs..][..run * bs];
    (crcs, data)
}

/// Pause after the `failures`-th failure in a row: the period, doubling,
/// at most a minute.
fn backoff(period: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.min(8).saturating_sub(1);
    (period * factor).min(Duration::from_secs(60))
}
