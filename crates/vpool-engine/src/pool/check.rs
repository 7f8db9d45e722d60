//! `pool check`: an fsck of a running pool.
//!
//! It reads every segment and walks its records (what cannot be read is
//! reported with its place), verifies every block that any map (volume or
//! snapshot) points at against its checksum and checks that it lies in a
//! write or relocate record, recounts every segment's references, and
//! decodes both checkpoint copies. Damaged blocks it finds join those
//! recovery found: `pool info` counts them and the cleaner keeps away from
//! their segments.
//!
//! Repair drops what is damaged where that can be done without guessing:
//! damaged blocks of a volume are trimmed (they read as zeros afterwards,
//! instead of failing). Snapshots never change, so their damaged ranges
//! are only reported (deleting the snapshot drops them). Records lost in
//! the log after the checkpoint are recovery's business: see
//! `PoolConfig::repair_damaged_log`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};

use vpool_store::SegmentId;

use super::Pool;
use super::state::State;
use crate::checkpoint::{CHECKPOINT_SLOTS, Checkpoint};
use crate::error::Result;
use crate::extent_map::{DataLoc, ExtentMap, Target};
use crate::record::{self, CRC_LEN, RecordKind, SEGMENT_HEADER_LEN, Scanned, data_loc};
use crate::types::BLOCK_SIZE;

/// A range of a volume or snapshot whose data fails its checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedRange {
    /// `volume` or `volume@snapshot`.
    pub image: String,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// Where the first damaged block is stored.
    pub segment: SegmentId,
    pub segment_offset: u64,
}

/// A place in the log that is not a readable record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRecord {
    pub segment: SegmentId,
    pub offset: u64,
    pub why: String,
}

/// What [`Pool::check`] found (and, with repair, did).
#[derive(Clone, Debug, Default)]
pub struct CheckReport {
    pub segments_checked: u64,
    pub records_checked: u64,
    pub bytes_checked: u64,
    /// Mapped blocks verified against their checksums.
    pub blocks_verified: u64,
    pub bad_records: Vec<BadRecord>,
    pub damaged_ranges: Vec<DamagedRange>,
    /// Extents that do not point into a write or relocate record.
    pub map_errors: Vec<String>,
    /// Segments whose reference count disagrees with the maps.
    pub refcount_errors: Vec<String>,
    /// Each checkpoint copy: its name and `Ok(next_seq)` or why it is bad.
    pub checkpoints: Vec<(String, std::result::Result<u64, String>)>,
    /// Ranges repair trimmed (volumes only).
    pub repaired: Vec<DamagedRange>,
    /// Segments with damage that repair emptied (their live data moved)
    /// and deleted.
    pub evacuated: Vec<SegmentId>,
}

impl CheckReport {
    /// Nothing wrong was found (before any repair).
    pub fn clean(&self) -> bool {
        self.bad_records.is_empty()
            && self.damaged_ranges.is_empty()
            && self.map_errors.is_empty()
            && self.refcount_errors.is_empty()
            && self.checkpoints.iter().all(|(_, r)| r.is_ok())
    }
}

/// One image's map, as captured for the check.
struct Image {
    name: String,
    map: ExtentMap,
}

/// What the check reads, captured at one moment: every image, every
/// segment's (id, length) and (id, reference count).
type Captured = (Vec<Image>, Vec<(SegmentId, u64)>, Vec<(SegmentId, i64)>);

/// A write or relocate record's place in its segment.
#[derive(Clone, Copy)]
struct DataRecord {
    crc_off: u32,
    data_off: u32,
    nblocks: u32,
}

impl Pool {
    /// Checks the whole pool (see the module doc). O(pool bytes) reads,
    /// one segment in memory at a time; the pool keeps serving meanwhile.
    /// Gives up with [`crate::EngineError::Cancelled`] once `cancel` is set
    /// or the pool is closing.
    pub fn check(&self, repair: bool, cancel: &AtomicBool) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        let (images, segments, refs) = self.capture_for_check(&mut report);
        // By segment: (image index, extent start block, blocks, location).
        let mut extents: BTreeMap<SegmentId, Vec<(usize, u64, u64, DataLoc)>> = BTreeMap::new();
        for (i, img) in images.iter().enumerate() {
            for p in img.map.iter() {
                if let Some(Target::Data(d)) = p.target {
                    extents
                        .entry(d.seg)
                        .or_default()
                        .push((i, p.start_block, p.len_blocks, d));
                }
            }
        }
        let mut bad_blocks = BTreeSet::new();
        {
            // Segments stay while the check reads them.
            let _gate = self.inner.delete_gate.read();
            for &(id, len) in &segments {
                if cancel.load(Ordering::Relaxed) || self.inner.shutdown.load(Ordering::Relaxed) {
                    return Err(crate::EngineError::Cancelled("pool check"));
                }
                let empty = Vec::new();
                let ext = extents.get(&id).unwrap_or(&empty);
                self.check_segment(id, len, ext, &images, &mut report, &mut bad_blocks)?;
            }
        }
        for (id, n) in refs {
            let counted: i64 = extents
                .get(&id)
                .map_or(0, |v| v.iter().map(|e| e.2 as i64).sum());
            if counted != n {
                report.refcount_errors.push(format!(
                    "{id}: counted {n} references, the maps hold {counted}"
                ));
            }
        }
        self.check_checkpoints(&mut report)?;
        {
            let mut damage = self.inner.damage.lock();
            damage
                .segments
                .extend(bad_blocks.iter().map(|b: &(SegmentId, u32)| b.0));
            damage
                .segments
                .extend(report.bad_records.iter().map(|b| b.segment));
            damage.bad_blocks.extend(bad_blocks);
        }
        if repair {
            self.repair_ranges(&mut report)?;
        }
        Ok(report)
    }

    /// Images, segments (id, length) and reference counts, as of now.
    fn capture_for_check(&self, report: &mut CheckReport) -> Captured {
        let mut st = self.inner.state.lock();
        st.table.apply_pending_refs();
        let images = images_of(&st);
        let segments: Vec<(SegmentId, u64)> = st
            .table
            .segments
            .iter()
            .map(|(id, s)| (*id, s.size_bytes))
            .collect();
        let refs = st
            .table
            .segments
            .iter()
            .map(|(id, s)| (*id, s.refs))
            .collect();
        report.segments_checked = segments.len() as u64;
        (images, segments, refs)
    }

    /// Walks one segment's records and verifies the extents that point
    /// into it.
    fn check_segment(
        &self,
        id: SegmentId,
        len: u64,
        extents: &[(usize, u64, u64, DataLoc)],
        images: &[Image],
        report: &mut CheckReport,
        bad_blocks: &mut BTreeSet<(SegmentId, u32)>,
    ) -> Result<()> {
        let mut image = vec![0u8; usize::try_from(len).expect("segment fits memory")];
        self.inner.store.read_at(id, 0, &mut image)?;
        report.bytes_checked += len;
        let records = walk(id, &image, report);
        for &(i, start, blocks, d) in extents {
            let img = &images[i];
            if !within_a_record(&records, d, blocks) {
                report.map_errors.push(format!(
                    "{} blocks {start}..{}: {id} at byte {} is not the data of a write",
                    img.name,
                    start + blocks,
                    d.data_off
                ));
            }
            for k in 0..blocks {
                report.blocks_verified += 1;
                let b = d.advance(k);
                if block_ok(&image, b) {
                    continue;
                }
                bad_blocks.insert((id, b.data_off));
                push_range(report, &img.name, (start + k) * BLOCK_SIZE, id, b.data_off);
            }
        }
        Ok(())
    }

    fn check_checkpoints(&self, report: &mut CheckReport) -> Result<()> {
        for name in CHECKPOINT_SLOTS {
            let r = match self.inner.store.get_meta(name)? {
                None => continue,
                Some(bytes) => Checkpoint::decode(&bytes)
                    .map(|c| c.next_seq)
                    .map_err(|e| e.to_string()),
            };
            report.checkpoints.push((name.to_string(), r));
        }
        Ok(())
    }

    /// Trims the damaged ranges of volumes (not snapshots).
    fn repair_ranges(&self, report: &mut CheckReport) -> Result<()> {
        for r in report.damaged_ranges.clone() {
            if r.image.contains('@') {
                continue;
            }
            let vol = self.volume(&r.image)?;
            vol.trim(r.offset_bytes, r.len_bytes)?;
            tracing::warn!(volume = %r.image, offset = r.offset_bytes, len = r.len_bytes,
                "repair: trimmed damaged blocks (they read as zeros now)");
            report.repaired.push(r);
        }
        if !report.repaired.is_empty() {
            self.flush()?;
            let mut damage = self.inner.damage.lock();
            let st = self.inner.state.lock();
            let still = referenced(&st, &damage.bad_blocks);
            damage.bad_blocks = still;
        }
        // Segments holding damage nothing refers to any more (or unreadable
        // bytes with nothing live in them): move what is live and delete
        // them, so that the damage is gone rather than only known.
        let mut damaged: BTreeSet<SegmentId> = self.inner.damage.lock().segments.clone();
        damaged.extend(report.bad_records.iter().map(|b| b.segment));
        damaged.extend(report.damaged_ranges.iter().map(|r| r.segment));
        let still_bad: BTreeSet<SegmentId> = self
            .inner
            .damage
            .lock()
            .bad_blocks
            .iter()
            .map(|b| b.0)
            .collect();
        for id in damaged.into_iter().filter(|id| !still_bad.contains(id)) {
            if self.evacuate(id)? {
                tracing::warn!(segment = %id, "repair: moved the live data out of a damaged segment and deleted it");
                report.evacuated.push(id);
            }
        }
        Ok(())
    }

    /// The ranges of volumes and snapshots whose blocks are known to fail
    /// their checksums (found by recovery or a check), as of now.
    pub fn damaged_ranges(&self) -> Vec<DamagedRange> {
        let damage = self.inner.damage.lock();
        if damage.bad_blocks.is_empty() {
            return Vec::new();
        }
        let st = self.inner.state.lock();
        let mut report = CheckReport::default();
        for img in images_of(&st) {
            for p in img.map.iter() {
                let Some(Target::Data(d)) = p.target else {
                    continue;
                };
                for k in 0..p.len_blocks {
                    let b = d.advance(k);
                    if damage.bad_blocks.contains(&(b.seg, b.data_off)) {
                        let off = (p.start_block + k) * BLOCK_SIZE;
                        push_range(&mut report, &img.name, off, b.seg, b.data_off);
                    }
                }
            }
        }
        report.damaged_ranges
    }
}

/// Every image of the pool: volumes, then their snapshots.
fn images_of(st: &State) -> Vec<Image> {
    let mut out = Vec::new();
    for v in st.table.volumes.values() {
        out.push(Image {
            name: v.name.clone(),
            map: v.map.clone(),
        });
        for (s, snap) in &v.snapshots {
            out.push(Image {
                name: format!("{}@{s}", v.name),
                map: snap.map.clone(),
            });
        }
    }
    out
}

/// The bad blocks some map still points at.
fn referenced(st: &State, bad: &BTreeSet<(SegmentId, u32)>) -> BTreeSet<(SegmentId, u32)> {
    let mut out = BTreeSet::new();
    for img in images_of(st) {
        for p in img.map.iter() {
            if let Some(Target::Data(d)) = p.target {
                for k in 0..p.len_blocks {
                    let b = d.advance(k);
                    if bad.contains(&(b.seg, b.data_off)) {
                        out.insert((b.seg, b.data_off));
                    }
                }
            }
        }
    }
    out
}

/// The data records of a segment image; what cannot be read is reported.
fn walk(id: SegmentId, image: &[u8], report: &mut CheckReport) -> Vec<DataRecord> {
    let mut out = Vec::new();
    if !matches!(record::decode_segment_header(image), Ok(h) if h == id) && !image.is_empty() {
        report.bad_records.push(BadRecord {
            segment: id,
            offset: 0,
            why: "segment header damaged".into(),
        });
    }
    let mut off = SEGMENT_HEADER_LEN as usize;
    while let Some(found) = record::scan_record(image, off) {
        let h = match found {
            Scanned::Record { header, .. } => header,
            Scanned::Damaged { header, error, .. } => {
                if !matches!(header.kind, RecordKind::Write | RecordKind::Relocate) {
                    report.bad_records.push(bad(id, off, &error.to_string()));
                }
                header
            }
            Scanned::Broken { error } => {
                report.bad_records.push(bad(id, off, &error.to_string()));
                // Records after the break are read as recovery reads them
                // (a repaired pool's maps point into them).
                match super::recovery::resync(image, off + 1, 0) {
                    Some(next) => {
                        off = next;
                        continue;
                    }
                    None => break,
                }
            }
        };
        report.records_checked += 1;
        if matches!(h.kind, RecordKind::Write | RecordKind::Relocate) {
            let loc = data_loc(id, off as u64, h.nblocks);
            out.push(DataRecord {
                crc_off: loc.crc_off,
                data_off: loc.data_off,
                nblocks: h.nblocks,
            });
        }
        off += h.record_len() as usize;
    }
    out
}

fn bad(segment: SegmentId, offset: usize, why: &str) -> BadRecord {
    BadRecord {
        segment,
        offset: offset as u64,
        why: why.to_string(),
    }
}

/// Whether `blocks` blocks from `d` are the data of one record, with
/// their checksums where that record keeps them. `records` is in offset
/// order. A location in an unreadable stretch of the segment is reported
/// too: its blocks may still verify, but the cleaner cannot move them.
fn within_a_record(records: &[DataRecord], d: DataLoc, blocks: u64) -> bool {
    let i = records.partition_point(|r| r.data_off <= d.data_off);
    let Some(r) = i.checked_sub(1).map(|i| records[i]) else {
        return false;
    };
    let k = u64::from(d.data_off - r.data_off) / BLOCK_SIZE;
    u64::from(d.data_off - r.data_off) % BLOCK_SIZE == 0
        && k + blocks <= u64::from(r.nblocks)
        && u64::from(d.crc_off) == u64::from(r.crc_off) + k * CRC_LEN as u64
}

/// Whether the block at `b` matches its stored checksum.
fn block_ok(image: &[u8], b: DataLoc) -> bool {
    let (c, d) = (b.crc_off as usize, b.data_off as usize);
    let (Some(crc), Some(data)) = (
        image.get(c..c + CRC_LEN),
        image.get(d..d + BLOCK_SIZE as usize),
    ) else {
        return false;
    };
    crc32c::crc32c(data) == u32::from_le_bytes(crc.try_into().expect("4 bytes"))
}

/// Adds one damaged block to the report, merging with the previous range
/// when it continues it.
fn push_range(report: &mut CheckReport, image: &str, off: u64, seg: SegmentId, data_off: u32) {
    if let Some(last) = report.damaged_ranges.last_mut()
        && last.image == image
        && last.offset_bytes + last.len_bytes == off
    {
        last.len_bytes += BLOCK_SIZE;
        return;
    }
    report.damaged_ranges.push(DamagedRange {
        image: image.to_string(),
        offset_bytes: off,
        len_bytes: BLOCK_SIZE,
        segment: seg,
        segment_offset: u64::from(data_off),
    });
}
