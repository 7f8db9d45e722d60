//! Recovery: the pool's state rebuilt from a checkpoint and the log.
//!
//! 1. **Checkpoint.** Checkpoints alternate between two metadata blobs
//!    ([`CHECKPOINT_SLOTS`]). Recovery takes the newest copy that decodes
//!    and fits the log (every segment it refers to exists, its position
//!    lies inside its segment); a copy that does not is reported and
//!    skipped, and the next checkpoint overwrites it.
//! 2. **Replay.** Records after the checkpoint's position are applied in
//!    log order. The log must be a chain: segment ids one after another,
//!    sequence numbers one after another, every record whole.
//! 3. **Torn tail or corruption.** Where the chain breaks, recovery asks
//!    whether the bytes there were durable. A *durable mark* (a
//!    [`LogRecord::Mark`] record, written by the maintenance thread after
//!    a sync) vouches that every byte of the log before its position was
//!    synced; so does the checkpoint's position. A break that no mark
//!    vouches for is a torn tail: the log ends there, as it ended when the
//!    power went (the tail is cut and later segments deleted). A break in
//!    vouched-for bytes is corruption, and nothing is cut:
//!    - a write whose data fails its checksum is applied as it is, so
//!      reads of its bad blocks fail (EIO) and the rest of the pool is
//!      served; a relocated copy that fails is not applied, so its maps
//!      keep the intact original;
//!    - anything else (a record that cannot be read, a missing segment, a
//!      gap in the sequence) loses records whose volumes and ranges are
//!      unknown. The pool does not open (`EngineError::Damaged`, with the
//!      report) unless opened with `repair_damaged_log`, which steps over
//!      the loss and says what was dropped.
//!
//! Recovery changes nothing in the store until it has decided: a refused
//! open leaves every byte as it found it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use vpool_store::{SegmentId, SegmentStore};

use super::log::{LogSeg, LogState};
use super::state::{RecordAt, SegInfo, Snap, State, Table, Vol, block_counts, meta_error};
use crate::checkpoint::{CHECKPOINT_SLOTS, Checkpoint, LogPosition, VolumeCheckpoint};
use crate::error::{EngineError, Result};
use crate::extent_map::Target;
use crate::record::{self, LogRecord, RecordHeader, SEGMENT_HEADER_LEN, Scanned};
use crate::types::VolumeId;

/// How recovery went (for logs, `pool check` and the recovery benchmark).
#[derive(Clone, Debug, Default)]
pub struct RecoveryReport {
    pub checkpoint_loaded: bool,
    /// The copy of the checkpoint recovery started from.
    pub checkpoint_slot: Option<&'static str>,
    /// Copies that could not be used, and why.
    pub checkpoints_rejected: Vec<String>,
    pub records_replayed: u64,
    pub bytes_replayed: u64,
    /// Bytes after the end of the log (never durable) that were cut.
    pub torn_tail_bytes: u64,
    pub segments_discarded: u64,
    /// Damage found in durable log data.
    pub damage: Vec<Damage>,
    /// Opened in repair mode: what `damage` says is lost was stepped over.
    pub repaired: bool,
    pub duration: Duration,
}

impl RecoveryReport {
    /// True if some damage keeps the pool from opening without repair.
    pub fn needs_repair(&self) -> bool {
        self.damage.iter().any(Damage::needs_repair)
    }
}

/// One piece of damage in durable log data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub segment: SegmentId,
    /// Byte offset in the segment where it starts.
    pub offset: u64,
    pub kind: DamageKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DamageKind {
    /// Blocks of a write (or relocated copy) whose data fails its
    /// checksum. For a write, the maps point at them and reads fail (EIO);
    /// a relocated copy is `healed`: its maps keep the original.
    BadBlocks {
        volume: VolumeId,
        first_block: u64,
        /// Indexes of the bad blocks within the record.
        bad: Vec<u32>,
        healed: bool,
    },
    /// Records that cannot be read or applied: what they did is lost, and
    /// which volumes they touched is unknown. `count` is `None` when the
    /// loss runs to the end of the log.
    LostRecords {
        first_seq: u64,
        count: Option<u64>,
        why: String,
    },
    /// A segment the log runs through is missing.
    MissingSegment,
    /// A segment's header is damaged; its records were read anyway.
    BadSegmentHeader,
}

impl Damage {
    /// Damage that the pool cannot open with: records are lost.
    pub fn needs_repair(&self) -> bool {
        matches!(self.kind, DamageKind::LostRecords { .. })
    }
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at byte {}: ", self.segment, self.offset)?;
        match &self.kind {
            DamageKind::BadBlocks {
                volume,
                first_block,
                bad,
                healed,
            } => {
                let what = if *healed {
                    "relocated copy skipped, the original is used"
                } else {
                    "reads of them fail"
                };
                write!(
                    f,
                    "{} block(s) of a write to volume {volume} at block {first_block} fail their checksum ({what})",
                    bad.len()
                )
            }
            DamageKind::LostRecords {
                first_seq,
                count,
                why,
            } => match count {
                Some(n) => write!(f, "{n} record(s) from seq {first_seq} lost: {why}"),
                None => write!(
                    f,
                    "records from seq {first_seq} to the end of the log lost: {why}"
                ),
            },
            DamageKind::MissingSegment => write!(f, "segment missing"),
            DamageKind::BadSegmentHeader => write!(f, "segment header damaged"),
        }
    }
}

/// The checkpoint recovery starts from, and the slot it came from.
pub(super) struct Loaded {
    pub checkpoint: Option<Checkpoint>,
    /// Index into [`CHECKPOINT_SLOTS`] of the copy used.
    pub slot: Option<usize>,
}

/// Reads both checkpoint copies and returns the newest that fits the log.
pub(super) fn load_checkpoint(
    store: &dyn SegmentStore,
    listed: &[(SegmentId, u64)],
    report: &mut RecoveryReport,
) -> Result<Loaded> {
    let sizes: BTreeMap<SegmentId, u64> = listed.iter().copied().collect();
    let mut candidates = Vec::new();
    let mut errors = Vec::new();
    for (slot, name) in CHECKPOINT_SLOTS.iter().enumerate() {
        let Some(bytes) = store.get_meta(name)? else {
            continue;
        };
        match Checkpoint::decode(&bytes) {
            Ok(c) => match fits_log(&c, &sizes) {
                Ok(()) => candidates.push((slot, c)),
                Err(why) => errors.push(format!("{name}: {why}")),
            },
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    for e in &errors {
        tracing::error!(checkpoint = %e, "a checkpoint copy is unusable; using the other");
    }
    report.checkpoints_rejected = errors;
    candidates.sort_by_key(|(_, c)| std::cmp::Reverse(c.next_seq));
    match candidates.into_iter().next() {
        Some((slot, c)) => {
            report.checkpoint_loaded = true;
            report.checkpoint_slot = Some(CHECKPOINT_SLOTS[slot]);
            Ok(Loaded {
                checkpoint: Some(c),
                slot: Some(slot),
            })
        }
        None if !report.checkpoints_rejected.is_empty() => Err(EngineError::CorruptMeta {
            what: format!(
                "every checkpoint copy: {}",
                report.checkpoints_rejected.join("; ")
            ),
            source: record::DecodeError::Inconsistent("no usable checkpoint"),
        }),
        None => Ok(Loaded {
            checkpoint: None,
            slot: None,
        }),
    }
}

/// Why a decoded checkpoint cannot be the start of recovery, if it cannot.
fn fits_log(c: &Checkpoint, sizes: &BTreeMap<SegmentId, u64>) -> Result<(), String> {
    match sizes.get(&c.position.seg) {
        Some(&len) if c.position.offset <= len => {}
        Some(&len) => {
            return Err(format!(
                "its position {}:{} is past the segment's end ({len} bytes)",
                c.position.seg, c.position.offset
            ));
        }
        // Taken at the start of a segment that held nothing yet, and the
        // log ends there: a store that ships only sealed segments (S3)
        // commits such a checkpoint before that segment, which it would
        // otherwise hold back until the next write. Nothing is lost: no
        // record was after the position, and no map points into it.
        None if c.position.offset == SEGMENT_HEADER_LEN
            && sizes.range(c.position.seg..).next().is_none() => {}
        None => return Err(format!("its position's {} is missing", c.position.seg)),
    }
    match c
        .referenced_segments()
        .into_iter()
        .find(|s| !sizes.contains_key(s))
    {
        Some(s) => Err(format!("it refers to {s}, which is missing")),
        None => Ok(()),
    }
}

/// The state a checkpoint describes (or an empty pool), with every
/// segment's reference count. `open` is a stand-in until recovery is done.
pub(super) fn state_from(
    checkpoint: Option<Checkpoint>,
    listed: &[(SegmentId, u64)],
    open: std::sync::Arc<LogSeg>,
) -> Result<State> {
    let segments: BTreeMap<SegmentId, SegInfo> = listed
        .iter()
        .map(|&(id, size_bytes)| {
            (
                id,
                SegInfo {
                    size_bytes,
                    refs: 0,
                },
            )
        })
        .collect();
    let mut st = State {
        table: Table::new(segments),
        log: LogState::new(open),
    };
    if let Some(c) = checkpoint {
        st.log.next_seq = c.next_seq;
        st.table.next_volume_id = c.next_volume_id;
        st.log.next_segment_id = c.next_segment_id;
        if !listed.iter().any(|s| s.0 == c.position.seg) {
            // A checkpoint at the start of a segment that never reached
            // the store (`fits_log`): the next segment is that one, so
            // the position names where the log goes on. (Skipping it
            // would leave a gap that makes this checkpoint unusable, and
            // a recovery from the older one would take the segments after
            // the gap for a torn tail.)
            st.log.next_segment_id = c.position.seg.0;
        }
        for v in c.volumes {
            let (id, vol) = vol_from(v);
            st.table.names.insert(vol.name.clone(), id);
            st.table.volumes.insert(id, vol);
        }
    }
    if let Some(&(last, _)) = listed.last() {
        st.log.next_segment_id = st.log.next_segment_id.max(last.0 + 1);
    }
    let maps: Vec<_> = st
        .table
        .volumes
        .values()
        .flat_map(|v| {
            std::iter::once(v.map.clone()).chain(v.snapshots.values().map(|s| s.map.clone()))
        })
        .collect();
    for map in &maps {
        for p in map.iter() {
            if let Some(Target::Data(d)) = p.target {
                let s = st.table.segments.get_mut(&d.seg).ok_or_else(|| {
                    meta_error("checkpoint", "an extent refers to a missing segment")
                })?;
                s.refs += p.len_blocks as i64;
            }
        }
    }
    Ok(st)
}

fn vol_from(v: VolumeCheckpoint) -> (VolumeId, Vol) {
    let VolumeCheckpoint {
        id,
        name,
        size_bytes,
        map,
        parent,
        ephemeral,
        snapshots,
    } = v;
    let snapshots = snapshots
        .into_iter()
        .map(|s| {
            let (data_blocks, zero_blocks) = block_counts(&s.map);
            let snap = Snap {
                size_bytes: s.size_bytes,
                map: s.map,
                data_blocks,
                zero_blocks,
                seq: s.seq,
            };
            (s.name, snap)
        })
        .collect();
    let (data_blocks, zero_blocks) = block_counts(&map);
    let vol = Vol {
        name,
        size_bytes,
        map,
        data_blocks,
        zero_blocks,
        snapshots,
        parent,
        ephemeral,
    };
    (id, vol)
}

/// Replays the log after a checkpoint's position; see the module doc.
pub(super) struct Replay<'a> {
    store: &'a dyn SegmentStore,
    /// Listed segments from the checkpoint's position on, in id order.
    window: Vec<(SegmentId, u64)>,
    from: LogPosition,
    repair: bool,
    /// Whether durable marks count (see [`SegmentStore::durable_marks_hold`]).
    trust_marks: bool,
    /// Every byte of the log before this was durable: the checkpoint's
    /// position, then each durable mark replayed.
    proven_to: LogPosition,
    /// The position the marks in `window[i]` vouch for, once read ahead.
    ahead: BTreeMap<usize, Option<LogPosition>>,
    /// Index into `report.damage` of a loss whose end is not known yet.
    open_loss: Option<usize>,
    /// Where the log ends, if it ends before the last listed byte.
    cut: Option<LogPosition>,
    pub report: RecoveryReport,
    /// Blocks that fail their checksum and that maps point at:
    /// (segment, data offset of the block).
    pub bad_blocks: BTreeSet<(SegmentId, u32)>,
}

/// The rest of the current segment, where proof may be looked for.
#[derive(Clone, Copy)]
enum Rest<'i> {
    /// Nothing to read (the next segments only).
    None,
    /// Records from this offset on: the break had a known length.
    Parse(&'i [u8], usize, SegmentId),
    /// Bytes from this offset on, scanned for mark headers: where the next
    /// record starts is unknown. A header-like pattern inside data could
    /// pass for a mark there; the worst it can do is make a torn tail look
    /// like damage (a refused open), never cut durable data.
    Scan(&'i [u8], usize, SegmentId),
}

/// What to do with a record after its sequence number was checked.
enum Seq {
    Apply,
    Skip,
    /// The log ends here (a torn tail).
    End,
}

impl<'a> Replay<'a> {
    pub(super) fn new(
        store: &'a dyn SegmentStore,
        listed: &[(SegmentId, u64)],
        from: LogPosition,
        from_checkpoint: bool,
        repair: bool,
        report: RecoveryReport,
    ) -> Replay<'a> {
        let window = listed.iter().copied().filter(|s| s.0 >= from.seg).collect();
        let proven_to = if from_checkpoint {
            from
        } else {
            LogPosition {
                seg: SegmentId(0),
                offset: 0,
            }
        };
        Replay {
            trust_marks: store.durable_marks_hold(),
            store,
            window,
            from,
            repair,
            proven_to,
            ahead: BTreeMap::new(),
            open_loss: None,
            cut: None,
            report,
            bad_blocks: BTreeSet::new(),
        }
    }

    /// Replays the whole window into `st`. Changes nothing in the store.
    pub(super) fn run(&mut self, st: &mut State) -> Result<()> {
        let mut expected = self.from.seg;
        for i in 0..self.window.len() {
            let (id, size) = self.window[i];
            if id != expected && !self.missing_segments(st, i, expected, id)? {
                return Ok(());
            }
            expected = SegmentId(id.0 + 1);
            let mut image = vec![0u8; usize::try_from(size).expect("segment fits memory")];
            self.store.read_at(id, 0, &mut image)?;
            let start = if id == self.from.seg {
                usize::try_from(self.from.offset).expect("checked against the segment's size")
            } else {
                SEGMENT_HEADER_LEN as usize
            };
            if !matches!(record::decode_segment_header(&image), Ok(h) if h == id) {
                let at = pos(id, SEGMENT_HEADER_LEN as usize);
                if !self.is_proven(
                    at,
                    i + 1,
                    Rest::Parse(&image, start.max(SEGMENT_HEADER_LEN as usize), id),
                )? {
                    tracing::warn!(segment = %id, "segment header missing or torn; the log ends here");
                    self.cut = Some(pos(id, 0));
                    return Ok(());
                }
                self.damage(id, 0, DamageKind::BadSegmentHeader);
            }
            if !self.replay_segment(st, i, &image, start)? {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Segments `expected..found` are missing before `window[i]`. Returns
    /// false if that is where the log ends.
    fn missing_segments(
        &mut self,
        st: &State,
        i: usize,
        expected: SegmentId,
        found: SegmentId,
    ) -> Result<bool> {
        let at = pos(expected, SEGMENT_HEADER_LEN as usize);
        if !self.is_proven(at, i, Rest::None)? {
            tracing::warn!(segment = %found, expected = %expected, "gap in the log; later segments were never flushed");
            self.cut = Some(pos(expected, 0));
            return Ok(false);
        }
        for id in expected.0..found.0 {
            self.damage(SegmentId(id), 0, DamageKind::MissingSegment);
        }
        // If the next record continues the chain, nothing was lost.
        self.begin_loss(expected, 0, st.log.next_seq, "a segment is missing");
        Ok(true)
    }

    /// Replays one segment image from `off`. Returns false where the log
    /// ends (a torn tail).
    fn replay_segment(
        &mut self,
        st: &mut State,
        i: usize,
        image: &[u8],
        mut off: usize,
    ) -> Result<bool> {
        let id = self.window[i].0;
        while let Some(found) = record::scan_record(image, off) {
            match found {
                Scanned::Record { header, payload } => {
                    let next = off + header.record_len() as usize;
                    match self.sequence(st, i, image, off, &header, next)? {
                        Seq::End => return Ok(false),
                        Seq::Skip => {}
                        Seq::Apply => self.apply(st, id, off, &header, payload),
                    }
                    off = next;
                }
                Scanned::Damaged {
                    header,
                    payload,
                    error,
                } => {
                    let next = off + header.record_len() as usize;
                    if !self.is_proven(pos(id, next), i + 1, Rest::Parse(image, next, id))? {
                        self.end_at(id, off, &error.to_string());
                        return Ok(false);
                    }
                    if let Seq::Apply = self.sequence(st, i, image, off, &header, next)? {
                        self.apply_damaged(st, id, off, &header, payload, &error.to_string());
                    }
                    off = next;
                }
                Scanned::Broken { error } => {
                    let at = pos(id, off + record::RECORD_HEADER_LEN);
                    if !self.is_proven(at, i + 1, Rest::Scan(image, off + 1, id))? {
                        self.end_at(id, off, &error.to_string());
                        return Ok(false);
                    }
                    let why = format!("unreadable record: {error}");
                    self.begin_loss(id, off as u64, st.log.next_seq, &why);
                    match resync(image, off + 1, st.log.next_seq) {
                        Some(y) => off = y,
                        None => break,
                    }
                }
            }
        }
        Ok(true)
    }

    /// Checks a record's sequence number against the chain.
    fn sequence(
        &mut self,
        st: &mut State,
        i: usize,
        image: &[u8],
        off: usize,
        h: &RecordHeader,
        next: usize,
    ) -> Result<Seq> {
        let id = self.window[i].0;
        if h.seq == st.log.next_seq {
            self.close_loss(h.seq);
            return Ok(Seq::Apply);
        }
        if !self.is_proven(pos(id, off), i + 1, Rest::Parse(image, next, id))? {
            tracing::warn!(segment = %id, offset = off, seq = h.seq, expected = st.log.next_seq,
                "sequence break; the log ends here");
            self.end_at(id, off, "sequence break");
            return Ok(Seq::End);
        }
        if h.seq < st.log.next_seq {
            let why = format!("out of sequence (expected {})", st.log.next_seq);
            self.damage(id, off as u64, lost(h.seq, Some(1), &why));
            return Ok(Seq::Skip);
        }
        if self.open_loss.is_none() {
            self.begin_loss(
                id,
                off as u64,
                st.log.next_seq,
                "records missing before this one",
            );
        }
        self.close_loss(h.seq);
        st.log.next_seq = h.seq;
        Ok(Seq::Apply)
    }

    /// Applies a valid record; one that does not fit the state is lost.
    fn apply(
        &mut self,
        st: &mut State,
        id: SegmentId,
        off: usize,
        h: &RecordHeader,
        payload: &[u8],
    ) {
        let at = record_at(id, off, h);
        let applied = decode(h, payload).and_then(|rec| st.table.apply(at, &rec).map(|()| rec));
        match applied {
            Err(e) => self.damage(id, off as u64, lost(h.seq, Some(1), &e.to_string())),
            Ok(LogRecord::Mark { covers }) if self.trust_marks => {
                self.proven_to = self.proven_to.max(covers);
            }
            Ok(_) => {}
        }
        st.log.next_seq = h.seq + 1;
        self.report.records_replayed += 1;
        self.report.bytes_replayed += h.record_len();
    }

    /// Applies a durable record whose payload fails its checks.
    fn apply_damaged(
        &mut self,
        st: &mut State,
        id: SegmentId,
        off: usize,
        h: &RecordHeader,
        payload: &[u8],
        why: &str,
    ) {
        st.log.next_seq = h.seq + 1;
        let rec = match decode(h, payload) {
            Ok(rec @ (LogRecord::Write { .. } | LogRecord::Relocate { .. })) => rec,
            Ok(_) => return self.damage(id, off as u64, lost(h.seq, Some(1), why)),
            Err(e) => return self.damage(id, off as u64, lost(h.seq, Some(1), &e.to_string())),
        };
        let at = record_at(id, off, h);
        let bad = record::bad_blocks(h, payload);
        tracing::error!(segment = %id, offset = off, volume = %h.volume, block = h.block,
            bad_blocks = bad.len(), "durable data fails its checksum");
        let healed = if let LogRecord::Relocate {
            block, blocks, old, ..
        } = rec
        {
            st.table
                .apply_relocate(at, block, blocks.nblocks(), old, &bad);
            true
        } else {
            // Maps point at the record: reads of its bad blocks fail.
            if let Err(e) = st.table.apply(at, &rec) {
                self.damage(id, off as u64, lost(h.seq, Some(1), &e.to_string()));
                return;
            }
            let loc = record::data_loc(id, off as u64, h.nblocks);
            for &b in &bad {
                self.bad_blocks
                    .insert((id, loc.advance(u64::from(b)).data_off));
            }
            false
        };
        let kind = DamageKind::BadBlocks {
            volume: h.volume,
            first_block: h.block,
            bad,
            healed,
        };
        self.damage(id, off as u64, kind);
        self.report.records_replayed += 1;
        self.report.bytes_replayed += h.record_len();
    }

    /// Whether every byte before `at` was durable. Reads ahead for durable
    /// marks: the rest of the current segment's image from an offset (when
    /// the record at the break has a known length), then the whole of
    /// every segment from `window[ahead_from]` on.
    fn is_proven(&mut self, at: LogPosition, ahead_from: usize, rest: Rest<'_>) -> Result<bool> {
        if self.proven_to >= at {
            return Ok(true);
        }
        if !self.trust_marks {
            return Ok(false);
        }
        let here = match rest {
            Rest::None => None,
            Rest::Parse(image, from, id) => marks_in(image, from, Some(id)),
            Rest::Scan(image, from, id) => marks_scanned(image, from, id),
        };
        if here.is_some_and(|m| m >= at) {
            return Ok(true);
        }
        for j in ahead_from..self.window.len() {
            if self.marks_ahead(j)?.is_some_and(|m| m >= at) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The position the durable marks of `window[j]` vouch for.
    fn marks_ahead(&mut self, j: usize) -> Result<Option<LogPosition>> {
        if let Some(m) = self.ahead.get(&j) {
            return Ok(*m);
        }
        let (id, size) = self.window[j];
        let mut image = vec![0u8; usize::try_from(size).expect("segment fits memory")];
        self.store.read_at(id, 0, &mut image)?;
        let m = marks_in(&image, SEGMENT_HEADER_LEN as usize, Some(id));
        self.ahead.insert(j, m);
        Ok(m)
    }

    /// The log ends at byte `off` of `id`: a torn tail.
    fn end_at(&mut self, id: SegmentId, off: usize, why: &str) {
        tracing::warn!(segment = %id, offset = off, reason = why,
            "torn or invalid record after the last durable mark; the log ends here");
        self.cut = Some(pos(id, off));
    }

    fn damage(&mut self, segment: SegmentId, offset: u64, kind: DamageKind) {
        let d = Damage {
            segment,
            offset,
            kind,
        };
        tracing::error!(damage = %d, "damage in durable log data");
        self.report.damage.push(d);
    }

    /// Starts a loss of records from `first_seq`; the next readable record
    /// tells how many.
    fn begin_loss(&mut self, seg: SegmentId, off: u64, first_seq: u64, why: &str) {
        if self.open_loss.is_some() {
            return;
        }
        self.damage(seg, off, lost(first_seq, None, why));
        self.open_loss = Some(self.report.damage.len() - 1);
    }

    /// The record with `seq` is readable: a loss open before it ends there
    /// (and was no loss at all if `seq` continues the chain).
    fn close_loss(&mut self, seq: u64) {
        let Some(i) = self.open_loss.take() else {
            return;
        };
        let DamageKind::LostRecords {
            first_seq, count, ..
        } = &mut self.report.damage[i].kind
        else {
            unreachable!("open_loss indexes a loss");
        };
        match seq.saturating_sub(*first_seq) {
            0 => {
                self.report.damage.remove(i);
            }
            n => *count = Some(n),
        }
    }

    /// After [`Replay::run`]: true if the pool cannot open without repair.
    pub(super) fn refused(&self) -> bool {
        self.report.needs_repair() && !self.repair
    }

    /// Cuts the torn tail: truncates the segment it is in and deletes every
    /// later one, durably. Only after the replay has decided.
    pub(super) fn cut_tail(&mut self, st: &mut State) -> Result<()> {
        let Some(cut) = self.cut else {
            return Ok(());
        };
        st.table.apply_pending_refs();
        if let Some(s) = st.table.segments.get_mut(&cut.seg) {
            self.store.truncate_segment(cut.seg, cut.offset)?;
            self.report.torn_tail_bytes += s.size_bytes.saturating_sub(cut.offset);
            s.size_bytes = s.size_bytes.min(cut.offset);
        }
        for &(id, size) in self.window.iter().filter(|w| w.0 > cut.seg) {
            if st.table.segments.get(&id).is_some_and(|s| s.refs > 0) {
                return Err(meta_error("log", "a discarded segment holds live data"));
            }
            tracing::warn!(segment = %id, bytes = size, "discarding segment after the end of the log");
            self.store.delete_segment(id)?;
            st.table.segments.remove(&id);
            self.report.segments_discarded += 1;
            self.report.torn_tail_bytes += size;
        }
        // A deleted segment that came back after a crash would sit in the
        // log's way: make the deletions durable before anything follows.
        self.store.sync_deletions()?;
        Ok(())
    }

    /// Whether the log was cut (the caller then rewrites both checkpoint
    /// copies, so neither predates the cut).
    pub(super) fn was_cut(&self) -> bool {
        self.cut.is_some()
    }
}

fn lost(first_seq: u64, count: Option<u64>, why: &str) -> DamageKind {
    DamageKind::LostRecords {
        first_seq,
        count,
        why: why.to_string(),
    }
}

fn pos(seg: SegmentId, offset: usize) -> LogPosition {
    LogPosition {
        seg,
        offset: offset as u64,
    }
}

/// Where a record whose header `h` is at byte `off` of segment `id` lies.
fn record_at(id: SegmentId, off: usize, h: &RecordHeader) -> RecordAt {
    RecordAt {
        seg: id,
        off: off as u64,
        seq: h.seq,
    }
}

/// The typed form of a replayed record. One that cannot be read as one
/// (a name that is not UTF-8, a clone record without its '/') is lost
/// like a record that does not fit the state.
fn decode<'p>(h: &RecordHeader, payload: &'p [u8]) -> Result<LogRecord<'p>> {
    LogRecord::decode(h, payload).map_err(|source| EngineError::CorruptMeta {
        what: format!("{:?} record", h.kind),
        source,
    })
}

/// The position a mark record vouches for; `None` for other records.
fn mark_covers(h: &RecordHeader) -> Option<LogPosition> {
    match LogRecord::decode(h, &[]) {
        Ok(LogRecord::Mark { covers }) => Some(covers),
        _ => None,
    }
}

/// The furthest position the durable marks of a segment image vouch for,
/// reading records from `from` and stepping over damaged payloads. A mark
/// vouches only for bytes before itself, so one claiming more is ignored.
fn marks_in(image: &[u8], mut from: usize, seg: Option<SegmentId>) -> Option<LogPosition> {
    let mut best = None;
    while let Some(h) = record::scan_record(image, from).and_then(|f| f.header()) {
        if let Some(m) = mark_covers(&h) {
            let here = seg.map(|s| pos(s, from));
            if here.is_none_or(|here| m <= here) {
                best = best.max(Some(m));
            }
        }
        from += h.record_len() as usize;
    }
    best
}

/// The furthest position that mark headers found anywhere in `image` from
/// `from` on vouch for (see [`Rest::Scan`]).
fn marks_scanned(image: &[u8], mut from: usize, seg: SegmentId) -> Option<LogPosition> {
    let mut best = None;
    while let Some((at, h)) = record::find_next_header(image, from, 0) {
        if let Some(m) = mark_covers(&h).filter(|&m| m <= pos(seg, at)) {
            best = best.max(Some(m));
        }
        from = at + 1;
    }
    best
}

/// Where reading can resume after unreadable bytes at `from - 1`: the
/// first record header with a sequence number at or past `min_seq` from
/// which the records run in sequence to the exact end of the image. Data
/// can hold header-like bytes (a guest may write anything); a chain that
/// must end exactly where the segment ends, in sequence, is not found
/// inside a payload by chance. If none is found, the rest of the segment
/// is lost (repair mode reports it so).
pub(super) fn resync(image: &[u8], mut from: usize, min_seq: u64) -> Option<usize> {
    while let Some((at, h)) = record::find_next_header(image, from, min_seq) {
        if chains_to_end(image, at, h.seq) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

fn chains_to_end(image: &[u8], mut at: usize, mut seq: u64) -> bool {
    while let Some(found) = record::scan_record(image, at) {
        let Some(h) = found.header() else {
            return false;
        };
        if h.seq != seq {
            return false;
        }
        seq += 1;
        at += h.record_len() as usize;
    }
    at == image.len()
}
