//! Looking at the pool: space and log figures, the invariants the tests
//! check after every step, and which log bytes an image reads.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use vpool_store::SegmentId;

use super::{Pool, PoolStats};
use crate::error::Result;
use crate::extent_map::{ExtentMap, Target};
use crate::record::CRC_LEN;
use crate::types::BLOCK_SIZE;

impl Pool {
    pub fn stats(&self) -> PoolStats {
        let mut st = self.inner.state.lock();
        let (live, physical, garbage_ratio) = st.table.space();
        PoolStats {
            volumes: st.table.volumes.len() as u64,
            logical_bytes: st.table.volumes.values().map(|v| v.size_bytes).sum(),
            live_data_bytes: live,
            physical_bytes: physical,
            segments: st.table.segments.len() as u64,
            garbage_ratio,
            free_bytes: self.inner.store.free_bytes(),
            extents: st
                .table
                .volumes
                .values()
                .map(|v| v.map.extent_count() as u64)
                .sum(),
            log_bytes_since_checkpoint: st.log.log_bytes_since_checkpoint,
            checkpoints_written: self
                .inner
                .counters
                .checkpoints_written
                .load(Ordering::Relaxed),
            segments_cleaned: self.inner.counters.segments_cleaned.load(Ordering::Relaxed),
            bytes_relocated: self.inner.counters.bytes_relocated.load(Ordering::Relaxed),
            reserve_bytes: self.inner.store.reserve_bytes(),
            full: self.inner.full.load(Ordering::Acquire),
            damaged_blocks: self.inner.damage.lock().bad_blocks.len() as u64,
        }
    }

    /// Checks the pool's invariants (tests call it after every step).
    pub fn self_check(&self) {
        let mut st = self.inner.state.lock();
        st.table.apply_pending_refs();
        let mut refs: BTreeMap<SegmentId, i64> = BTreeMap::new();
        let mut check_map = |map: &ExtentMap, size_bytes: u64, what: &str| -> (u64, u64) {
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
                        let s = st
                            .table
                            .segments
                            .get(&d.seg)
                            .expect("extent's segment exists");
                        assert!(u64::from(d.data_off) + p.len_blocks * BLOCK_SIZE <= s.size_bytes);
                    }
                }
            }
            (data, zero)
        };
        for (id, v) in &st.table.volumes {
            assert_eq!(st.table.names.get(&v.name), Some(id), "name index");
            let counts = check_map(&v.map, v.size_bytes, &v.name);
            assert_eq!(
                (v.data_blocks, v.zero_blocks),
                counts,
                "block counts of {}",
                v.name
            );
            for (name, snap) in &v.snapshots {
                let counts = check_map(&snap.map, snap.size_bytes, name);
                assert_eq!(
                    (snap.data_blocks, snap.zero_blocks),
                    counts,
                    "block counts of {}@{name}",
                    v.name
                );
            }
            if let Some((parent, snap)) = &v.parent {
                let p = st
                    .table
                    .volumes
                    .get(parent)
                    .expect("a clone's parent volume exists");
                assert!(
                    p.snapshots.contains_key(snap),
                    "a clone's parent snapshot exists"
                );
            }
        }
        assert_eq!(st.table.names.len(), st.table.volumes.len());
        for (id, s) in &st.table.segments {
            assert_eq!(
                s.refs,
                refs.get(id).copied().unwrap_or(0),
                "reference count of {id}"
            );
        }
    }

    /// The byte ranges of the log that reading all of `volume` (or of its
    /// snapshot) touches, per segment, sorted and merged: what a host cache
    /// must keep resident to serve the image without the backend (pinning).
    /// O(extents) in time and in the result.
    pub fn data_ranges(
        &self,
        volume: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<(SegmentId, std::ops::Range<u64>)>> {
        let map = {
            let st = self.inner.state.lock();
            let id = st.table.id_of(volume)?;
            match snapshot {
                None => st.table.vol(id)?.map.clone(),
                Some(s) => st.table.snap(id, volume, s)?.map.clone(),
            }
        };
        let mut ranges: Vec<(SegmentId, std::ops::Range<u64>)> = Vec::new();
        for p in map.iter() {
            let Some(Target::Data(d)) = p.target else {
                continue;
            };
            let crc = u64::from(d.crc_off)..u64::from(d.crc_off) + p.len_blocks * CRC_LEN as u64;
            let data = u64::from(d.data_off)..u64::from(d.data_off) + p.len_blocks * BLOCK_SIZE;
            ranges.push((d.seg, crc));
            ranges.push((d.seg, data));
        }
        ranges.sort_by_key(|(seg, r)| (*seg, r.start));
        let mut merged: Vec<(SegmentId, std::ops::Range<u64>)> = Vec::with_capacity(ranges.len());
        for (seg, r) in ranges {
            match merged.last_mut() {
                Some((s, last)) if *s == seg && r.start <= last.end => {
                    last.end = last.end.max(r.end);
                }
                _ => merged.push((seg, r)),
            }
        }
        Ok(merged)
    }
}
