//! The volume table, and the pure apply of a log record to it.
//!
//! [`Table`] is what the log describes: every volume (its map, size,
//! counters, snapshots and parent link), the name index, and every
//! segment's size and reference count. [`Table::apply`] changes it the way
//! one [`LogRecord`] says and does nothing else: no I/O, no clock, nothing
//! of the log but the record's own place in it. The same function applies
//! a record live (under the state lock, right after its append) and at
//! replay, which is why replaying the log rebuilds exactly the state the
//! pool had.
//!
//! [`State`] is what the pool's one mutex guards: the table and the log's
//! own state ([`LogState`]). Appending and applying under that one lock
//! is what makes the log order the order in which changes took effect.

use std::collections::BTreeMap;

use vpool_store::SegmentId;

use super::log::LogState;
use crate::error::{EngineError, Result};
use crate::extent_map::{DataLoc, ExtentMap, Target};
use crate::record::{self, LogRecord};
use crate::types::{BLOCK_SIZE, VolumeId};

/// Everything the pool's state mutex guards.
pub(super) struct State {
    pub(super) table: Table,
    pub(super) log: LogState,
}

pub(super) struct Vol {
    pub(super) name: String,
    pub(super) size_bytes: u64,
    pub(super) map: ExtentMap,
    pub(super) data_blocks: u64,
    pub(super) zero_blocks: u64,
    /// Frozen copies of the map, by name.
    pub(super) snapshots: BTreeMap<String, Snap>,
    /// For a clone: the volume and snapshot it was cloned from. Kept so that
    /// the snapshot a clone came from is not deleted under it by mistake;
    /// the clone shares blocks with it but does not read through it.
    pub(super) parent: Option<(VolumeId, String)>,
    /// Deleted when the pool is next opened (scratch disks).
    pub(super) ephemeral: bool,
}

/// A snapshot: the volume's map, size and counters when it was taken.
#[derive(Clone)]
pub(super) struct Snap {
    pub(super) size_bytes: u64,
    pub(super) map: ExtentMap,
    pub(super) data_blocks: u64,
    pub(super) zero_blocks: u64,
    /// The log sequence number of the record that took it.
    pub(super) seq: u64,
}

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SegInfo {
    pub(super) size_bytes: u64,
    /// Block references into this segment, summed over every map (volumes
    /// and snapshots). Only exact when `Table::pending_refs` is empty: a new
    /// snapshot's references are counted later, off the caller's path.
    pub(super) refs: i64,
}

/// The volume table: see the module doc.
pub(super) struct Table {
    pub(super) volumes: BTreeMap<VolumeId, Vol>,
    /// Volume names, in the order a listing shows them.
    pub(super) names: BTreeMap<String, VolumeId>,
    /// Every segment of the log, open and sealed.
    pub(super) segments: BTreeMap<SegmentId, SegInfo>,
    pub(super) next_volume_id: u64,
    /// Maps whose references are still to be added (+1) or removed (-1)
    /// from the segments' counts, in order. Taking a snapshot or a clone
    /// costs O(1) because its O(extents) counting waits here until the
    /// maintenance thread (or anything that reads the counts) applies it.
    pub(super) pending_refs: Vec<(ExtentMap, i64)>,
}

/// Where a record lies in the log, and its sequence number.
#[derive(Clone, Copy, Debug)]
pub(super) struct RecordAt {
    pub(super) seg: SegmentId,
    pub(super) off: u64,
    pub(super) seq: u64,
}

impl Table {
    /// No volumes, over the segments `segments` (uncounted).
    pub(super) fn new(segments: BTreeMap<SegmentId, SegInfo>) -> Table {
        Table {
            volumes: BTreeMap::new(),
            names: BTreeMap::new(),
            segments,
            next_volume_id: 1,
            pending_refs: Vec::new(),
        }
    }

    pub(super) fn vol(&self, id: VolumeId) -> Result<&Vol> {
        self.volumes.get(&id).ok_or_else(|| vol_not_found(id))
    }

    fn vol_mut(&mut self, id: VolumeId) -> Result<&mut Vol> {
        self.volumes.get_mut(&id).ok_or_else(|| vol_not_found(id))
    }

    /// The id of the volume named `name`.
    pub(super) fn id_of(&self, name: &str) -> Result<VolumeId> {
        self.names
            .get(name)
            .copied()
            .ok_or_else(|| EngineError::VolumeNotFound(name.to_string()))
    }

    /// Snapshot `snapshot` of volume `id` (named `volume`, for the error).
    pub(super) fn snap(&self, id: VolumeId, volume: &str, snapshot: &str) -> Result<&Snap> {
        self.vol(id)?
            .snapshots
            .get(snapshot)
            .ok_or_else(|| EngineError::SnapshotNotFound {
                volume: volume.to_string(),
                snapshot: snapshot.to_string(),
            })
    }

    /// Names of the volumes cloned from `id`'s snapshot `snapshot` (any of
    /// its snapshots if `None`).
    pub(super) fn clones_of(&self, id: VolumeId, snapshot: Option<&str>) -> Vec<String> {
        self.volumes
            .values()
            .filter(|v| match &v.parent {
                Some((p, s)) => *p == id && snapshot.is_none_or(|want| want == s),
                None => false,
            })
            .map(|v| v.name.clone())
            .collect()
    }

    /// Maps blocks of a volume, keeping every counter in step.
    fn set_blocks(&mut self, id: VolumeId, start: u64, len: u64, target: Option<Target>) {
        let Table {
            volumes, segments, ..
        } = self;
        let vol = volumes
            .get_mut(&id)
            .expect("caller checked the volume exists");
        let mut data_gone = 0u64;
        let mut zero_gone = 0u64;
        vol.map.set(start, len, target, &mut |t, n| match t {
            Target::Zero => zero_gone += n,
            Target::Data(d) => {
                data_gone += n;
                segments
                    .get_mut(&d.seg)
                    .expect("mapped segment is known")
                    .refs -= n as i64;
            }
        });
        vol.data_blocks -= data_gone;
        vol.zero_blocks -= zero_gone;
        match target {
            Some(Target::Data(d)) => {
                vol.data_blocks += len;
                segments.get_mut(&d.seg).expect("segment is known").refs += len as i64;
            }
            Some(Target::Zero) => vol.zero_blocks += len,
            None => {}
        }
    }

    /// Counts (or uncounts) every data block of `map` in its segment.
    fn count_refs(segments: &mut BTreeMap<SegmentId, SegInfo>, map: &ExtentMap, sign: i64) {
        for p in map.iter() {
            if let Some(Target::Data(d)) = p.target {
                segments
                    .get_mut(&d.seg)
                    .expect("mapped segment is known")
                    .refs += sign * p.len_blocks as i64;
            }
        }
    }

    /// Applies the deferred reference counting; afterwards every segment's
    /// count is exact.
    pub(super) fn apply_pending_refs(&mut self) {
        for (map, sign) in std::mem::take(&mut self.pending_refs) {
            Table::count_refs(&mut self.segments, &map, sign);
        }
        debug_assert!(self.segments.values().all(|s| s.refs >= 0));
    }

    /// (live data bytes, segment bytes, garbage ratio) of the pool. A block
    /// shared by several maps (snapshots, clones) counts once per map here:
    /// live bytes are an upper bound.
    pub(super) fn space(&mut self) -> (u64, u64, f64) {
        self.apply_pending_refs();
        let physical: u64 = self.segments.values().map(|s| s.size_bytes).sum();
        let refs: i64 = self.segments.values().map(|s| s.refs).sum();
        let live = refs.max(0) as u64 * BLOCK_SIZE;
        let ratio = if physical == 0 {
            0.0
        } else {
            (1.0 - live as f64 / physical as f64).max(0.0)
        };
        (live, physical, ratio)
    }

    /// Every map of the pool: volumes and their snapshots.
    fn all_maps_mut(&mut self) -> impl Iterator<Item = &mut ExtentMap> {
        self.volumes.values_mut().flat_map(|v| {
            std::iter::once(&mut v.map).chain(v.snapshots.values_mut().map(|s| &mut s.map))
        })
    }

    /// Applies a record (live, right after its append, or replayed) that
    /// lies at `at` in the log: changes volumes, snapshots and reference
    /// counts the way it says, and nothing else.
    pub(super) fn apply(&mut self, at: RecordAt, rec: &LogRecord<'_>) -> Result<()> {
        match *rec {
            LogRecord::Write {
                volume,
                block,
                blocks,
            } => {
                let n = blocks.nblocks();
                self.check_record_range(volume, block, n)?;
                let loc = record::data_loc(at.seg, at.off, n);
                self.set_blocks(volume, block, u64::from(n), Some(Target::Data(loc)));
            }
            LogRecord::Zero {
                volume,
                block,
                nblocks,
            } => {
                self.check_record_range(volume, block, nblocks)?;
                self.set_blocks(volume, block, u64::from(nblocks), Some(Target::Zero));
            }
            LogRecord::Trim {
                volume,
                block,
                nblocks,
            } => {
                self.check_record_range(volume, block, nblocks)?;
                self.set_blocks(volume, block, u64::from(nblocks), None);
            }
            LogRecord::CreateVolume {
                volume,
                size_bytes,
                name,
                ephemeral,
            } => self.create_volume(volume, size_bytes, name, ephemeral)?,
            LogRecord::ResizeVolume { volume, size_bytes } => {
                self.resize_volume(volume, size_bytes)?
            }
            LogRecord::DeleteVolume { volume } => self.delete_volume(volume)?,
            LogRecord::CreateSnapshot { volume, name } => {
                self.create_snapshot(volume, name, at.seq)?
            }
            LogRecord::DeleteSnapshot { volume, name } => self.delete_snapshot(volume, name)?,
            LogRecord::Rollback { volume, snapshot } => self.rollback(volume, snapshot)?,
            LogRecord::CloneVolume {
                volume,
                source,
                name,
                snapshot,
            } => self.clone_volume(volume, source, name, snapshot)?,
            LogRecord::Relocate {
                block, blocks, old, ..
            } => self.apply_relocate(at, block, blocks.nblocks(), old, &[]),
            LogRecord::FlattenVolume { volume } => self.vol_mut(volume)?.parent = None,
            LogRecord::CommitVolume { volume } => self.commit(volume)?,
            LogRecord::RenameVolume { volume, name } => self.rename_volume(volume, name)?,
            // A mark changes no volume: only recovery reads it.
            LogRecord::Mark { .. } => {}
        }
        Ok(())
    }

    fn create_volume(
        &mut self,
        id: VolumeId,
        size_bytes: u64,
        name: &str,
        ephemeral: bool,
    ) -> Result<()> {
        if self.volumes.contains_key(&id) || self.names.contains_key(name) {
            return Err(meta_error("create record", "volume exists"));
        }
        self.names.insert(name.to_string(), id);
        let vol = Vol {
            name: name.to_string(),
            size_bytes,
            map: ExtentMap::new(),
            data_blocks: 0,
            zero_blocks: 0,
            snapshots: BTreeMap::new(),
            parent: None,
            ephemeral,
        };
        self.volumes.insert(id, vol);
        self.next_volume_id = self.next_volume_id.max(id.0 + 1);
        Ok(())
    }

    /// The volume's name changes; everything else (its id, so clones'
    /// links and open handles) stays.
    fn rename_volume(&mut self, id: VolumeId, name: &str) -> Result<()> {
        if self.names.contains_key(name) {
            return Err(meta_error("rename record", "name taken"));
        }
        let vol = self.vol_mut(id)?;
        let old = std::mem::replace(&mut vol.name, name.to_string());
        let removed = self.names.remove(&old);
        assert_eq!(removed, Some(id), "the name index and the volumes agree");
        self.names.insert(name.to_string(), id);
        Ok(())
    }

    fn resize_volume(&mut self, id: VolumeId, size_bytes: u64) -> Result<()> {
        let old = self.vol(id)?.size_bytes;
        if size_bytes < old {
            let start = size_bytes / BLOCK_SIZE;
            self.set_blocks(id, start, old / BLOCK_SIZE - start, None);
        }
        self.vol_mut(id)?.size_bytes = size_bytes;
        Ok(())
    }

    fn delete_volume(&mut self, id: VolumeId) -> Result<()> {
        let size = self.vol(id)?.size_bytes;
        if size > 0 {
            self.set_blocks(id, 0, size / BLOCK_SIZE, None);
        }
        let vol = self.volumes.remove(&id).expect("checked");
        self.names.remove(&vol.name);
        for snap in vol.snapshots.into_values() {
            self.pending_refs.push((snap.map, -1));
        }
        Ok(())
    }

    /// Freezes the volume's map under `name`; `seq` is the record's.
    fn create_snapshot(&mut self, id: VolumeId, name: &str, seq: u64) -> Result<()> {
        let vol = self.vol_mut(id)?;
        if vol.snapshots.contains_key(name) {
            return Err(meta_error("snapshot record", "snapshot exists"));
        }
        let snap = Snap {
            size_bytes: vol.size_bytes,
            map: vol.map.clone(),
            data_blocks: vol.data_blocks,
            zero_blocks: vol.zero_blocks,
            seq,
        };
        vol.snapshots.insert(name.to_string(), snap.clone());
        self.pending_refs.push((snap.map, 1));
        Ok(())
    }

    fn delete_snapshot(&mut self, id: VolumeId, name: &str) -> Result<()> {
        let snap = self
            .vol_mut(id)?
            .snapshots
            .remove(name)
            .ok_or_else(|| meta_error("snapshot record", "no such snapshot"))?;
        self.pending_refs.push((snap.map, -1));
        Ok(())
    }

    /// The volume takes its snapshot's map, size and counters.
    fn rollback(&mut self, id: VolumeId, snapshot: &str) -> Result<()> {
        let vol = self.vol_mut(id)?;
        let snap = vol
            .snapshots
            .get(snapshot)
            .ok_or_else(|| meta_error("rollback record", "no such snapshot"))?
            .clone();
        let old = std::mem::replace(&mut vol.map, snap.map.clone());
        vol.size_bytes = snap.size_bytes;
        vol.data_blocks = snap.data_blocks;
        vol.zero_blocks = snap.zero_blocks;
        // Increments first, so no count dips below zero.
        self.pending_refs.push((snap.map, 1));
        self.pending_refs.push((old, -1));
        Ok(())
    }

    /// A new volume `id` whose map starts as `source`'s snapshot's.
    fn clone_volume(
        &mut self,
        id: VolumeId,
        source: VolumeId,
        name: &str,
        snapshot: &str,
    ) -> Result<()> {
        if self.volumes.contains_key(&id) || self.names.contains_key(name) {
            return Err(meta_error("clone record", "volume exists"));
        }
        let snap = self
            .vol(source)?
            .snapshots
            .get(snapshot)
            .ok_or_else(|| meta_error("clone record", "no such snapshot"))?
            .clone();
        self.pending_refs.push((snap.map.clone(), 1));
        self.names.insert(name.to_string(), id);
        let vol = Vol {
            name: name.to_string(),
            size_bytes: snap.size_bytes,
            map: snap.map,
            data_blocks: snap.data_blocks,
            zero_blocks: snap.zero_blocks,
            snapshots: BTreeMap::new(),
            parent: Some((source, snapshot.to_string())),
            ephemeral: false,
        };
        self.volumes.insert(id, vol);
        self.next_volume_id = self.next_volume_id.max(id.0 + 1);
        Ok(())
    }

    /// The clone's parent volume takes the clone's map, size and counters.
    fn commit(&mut self, id: VolumeId) -> Result<()> {
        let clone = self.vol(id)?;
        let (parent, _) = clone
            .parent
            .clone()
            .ok_or_else(|| meta_error("commit record", "not a clone"))?;
        let (map, size, data, zero) = (
            clone.map.clone(),
            clone.size_bytes,
            clone.data_blocks,
            clone.zero_blocks,
        );
        let p = self.vol_mut(parent)?;
        let old = std::mem::replace(&mut p.map, map.clone());
        p.size_bytes = size;
        p.data_blocks = data;
        p.zero_blocks = zero;
        // Increments first, so no count dips below zero.
        self.pending_refs.push((map, 1));
        self.pending_refs.push((old, -1));
        Ok(())
    }

    /// Applies a relocate record at `at` that copied `nblocks` blocks from
    /// `old` (blocks `block..` of the maps that point there), except the
    /// blocks at the indexes in `skip` (whose copy failed its checksum):
    /// maps pointing at those keep the original.
    pub(super) fn apply_relocate(
        &mut self,
        at: RecordAt,
        block: u64,
        nblocks: u32,
        old: DataLoc,
        skip: &[u32],
    ) {
        // Counts must be exact before maps change under them.
        self.apply_pending_refs();
        let new = record::data_loc(at.seg, at.off, nblocks);
        let (b, n) = (block, u64::from(nblocks));
        let mut moved = 0i64;
        for map in self.all_maps_mut() {
            for p in map.lookup(b, n) {
                let Some(Target::Data(d)) = p.target else {
                    continue;
                };
                let k = p.start_block - b;
                if d != old.advance(k) {
                    continue;
                }
                for (start, len) in runs_without(k, p.len_blocks, skip) {
                    map.set(
                        b + start,
                        len,
                        Some(Target::Data(new.advance(start))),
                        &mut |_, _| {},
                    );
                    moved += len as i64;
                }
            }
        }
        if let Some(s) = self.segments.get_mut(&old.seg) {
            s.refs -= moved;
        }
        self.segments
            .get_mut(&at.seg)
            .expect("segment is known")
            .refs += moved;
    }

    fn check_record_range(&self, volume: VolumeId, block: u64, nblocks: u32) -> Result<()> {
        let vol = self.vol(volume)?;
        let end = block + u64::from(nblocks);
        if end > vol.size_bytes / BLOCK_SIZE {
            return Err(meta_error("record", "block range past the volume's end"));
        }
        Ok(())
    }
}

/// The table's invariants, asserted (the property tests check them after
/// every step, through `Pool::self_check`).
impl Table {
    /// Asserts the invariants listed at `Pool::self_check`.
    pub(super) fn self_check(&mut self) {
        self.apply_pending_refs();
        let mut refs: BTreeMap<SegmentId, i64> = BTreeMap::new();
        for (id, v) in &self.volumes {
            assert_eq!(self.names.get(&v.name), Some(id), "name index");
            let counts = self.check_map(&v.map, v.size_bytes, &v.name, &mut refs);
            let want = (v.data_blocks, v.zero_blocks);
            assert_eq!(want, counts, "block counts of {}", v.name);
            for (name, snap) in &v.snapshots {
                let counts = self.check_map(&snap.map, snap.size_bytes, name, &mut refs);
                let want = (snap.data_blocks, snap.zero_blocks);
                assert_eq!(want, counts, "block counts of {}@{name}", v.name);
            }
            if let Some((parent, snap)) = &v.parent {
                let p = self.volumes.get(parent);
                let p = p.expect("a clone's parent volume exists");
                assert!(
                    p.snapshots.contains_key(snap),
                    "a clone's parent snapshot exists"
                );
            }
        }
        assert_eq!(self.names.len(), self.volumes.len());
        for (id, s) in &self.segments {
            let counted = refs.get(id).copied().unwrap_or(0);
            assert_eq!(s.refs, counted, "reference count of {id}");
        }
    }

    /// Checks one map of an image of `size_bytes` named `what`, adding its
    /// references to `refs`. Returns its (data, zero) block counts.
    fn check_map(
        &self,
        map: &ExtentMap,
        size_bytes: u64,
        what: &str,
        refs: &mut BTreeMap<SegmentId, i64>,
    ) -> (u64, u64) {
        map.self_check();
        let (mut data, mut zero) = (0, 0);
        for p in map.iter() {
            assert!(
                (p.start_block + p.len_blocks) * BLOCK_SIZE <= size_bytes,
                "extent past the end of {what}"
            );
            match p.target.expect("mapped") {
                Target::Zero => zero += p.len_blocks,
                Target::Data(d) => {
                    data += p.len_blocks;
                    *refs.entry(d.seg).or_default() += p.len_blocks as i64;
                    let s = self.segments.get(&d.seg).expect("extent's segment exists");
                    assert!(u64::from(d.data_off) + p.len_blocks * BLOCK_SIZE <= s.size_bytes);
                }
            }
        }
        (data, zero)
    }
}

fn vol_not_found(id: VolumeId) -> EngineError {
    EngineError::VolumeNotFound(id.to_string())
}

/// A record or checkpoint that does not fit the state it is applied to.
pub(super) fn meta_error(what: &str, detail: &'static str) -> EngineError {
    EngineError::CorruptMeta {
        what: what.to_string(),
        source: record::DecodeError::Inconsistent(detail),
    }
}

/// The runs of `[start, start + len)` (record-relative block indexes) that
/// hold no index of `skip`, as (start, len).
fn runs_without(start: u64, len: u64, skip: &[u32]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut run_start = start;
    for i in start..start + len {
        if skip.contains(&(i as u32)) {
            if i > run_start {
                out.push((run_start, i - run_start));
            }
            run_start = i + 1;
        }
    }
    if start + len > run_start {
        out.push((run_start, start + len - run_start));
    }
    out
}

/// (data blocks, zero blocks) of a map.
pub(super) fn block_counts(map: &ExtentMap) -> (u64, u64) {
    let (mut data, mut zero) = (0, 0);
    for p in map.iter() {
        match p.target {
            Some(Target::Data(_)) => data += p.len_blocks,
            _ => zero += p.len_blocks,
        }
    }
    (data, zero)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Blocks, block_crcs};

    fn at(seg: u64, off: u64, seq: u64) -> RecordAt {
        RecordAt {
            seg: SegmentId(seg),
            off,
            seq,
        }
    }

    fn seg(size_bytes: u64) -> SegInfo {
        SegInfo {
            size_bytes,
            refs: 0,
        }
    }

    /// The table takes records with no store and no log at all (what lets
    /// replay rebuild it), keeps every count in step, and refuses a record
    /// that does not fit without changing anything.
    #[test]
    fn apply_needs_no_store_and_keeps_counts() {
        let mut t = Table::new(BTreeMap::from([(SegmentId(1), seg(1 << 20))]));
        let v = VolumeId(1);
        let create = LogRecord::CreateVolume {
            volume: v,
            size_bytes: 16 * BLOCK_SIZE,
            name: "a",
            ephemeral: false,
        };
        t.apply(at(1, 64, 1), &create).unwrap();
        let data = vec![7u8; 2 * BLOCK_SIZE as usize];
        let crcs = block_crcs(&data);
        let blocks = Blocks {
            crcs: &crcs,
            data: &data,
        };
        let write = LogRecord::Write {
            volume: v,
            block: 2,
            blocks,
        };
        t.apply(at(1, 128, 2), &write).unwrap();
        let snap = LogRecord::CreateSnapshot {
            volume: v,
            name: "s",
        };
        t.apply(at(1, 8400, 3), &snap).unwrap();
        let trim = LogRecord::Trim {
            volume: v,
            block: 0,
            nblocks: 16,
        };
        t.apply(at(1, 8500, 4), &trim).unwrap();
        t.self_check();
        assert_eq!(t.segments[&SegmentId(1)].refs, 2, "the snapshot's blocks");

        // The cleaner's copy repoints the snapshot.
        t.segments.insert(SegmentId(2), seg(1 << 20));
        let relocate = LogRecord::Relocate {
            volume: v,
            block: 2,
            blocks,
            old: record::data_loc(SegmentId(1), 128, 2),
        };
        t.apply(at(2, 64, 5), &relocate).unwrap();
        t.self_check();
        assert_eq!(t.segments[&SegmentId(1)].refs, 0);
        assert_eq!(t.segments[&SegmentId(2)].refs, 2);

        let rollback = LogRecord::Rollback {
            volume: v,
            snapshot: "s",
        };
        t.apply(at(2, 8400, 6), &rollback).unwrap();
        t.self_check();
        assert_eq!(t.vol(v).unwrap().data_blocks, 2);

        // Past the volume's end, or a name taken: refused, nothing changed.
        let past_end = LogRecord::Write {
            volume: v,
            block: 15,
            blocks,
        };
        assert!(t.apply(at(2, 8500, 7), &past_end).is_err());
        assert!(t.apply(at(2, 8500, 7), &create).is_err());
        t.self_check();
        assert_eq!(t.vol(v).unwrap().data_blocks, 2);

        t.apply(at(2, 8500, 7), &LogRecord::DeleteVolume { volume: v })
            .unwrap();
        t.self_check();
        assert!(t.volumes.is_empty() && t.names.is_empty());
        assert!(t.segments.values().all(|s| s.refs == 0));
    }
}
