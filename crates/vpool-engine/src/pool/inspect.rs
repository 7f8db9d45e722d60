//! Looking at the pool: space and log figures, the invariants the tests
//! check after every step, and which log bytes an image reads.

use std::sync::atomic::Ordering;

use vpool_store::SegmentId;

use super::{Pool, PoolStats};
use crate::error::Result;
use crate::extent_map::Target;
use crate::record::CRC_LEN;
use crate::types::BLOCK_SIZE;

impl Pool {
    /// Space and log figures; O(volumes + segments) under the state lock.
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

    /// Checks the pool's invariants, panicking on the first that does not
    /// hold (tests call it after every step): extents never overlap, are
    /// never empty, never run past their image's end nor their segment's;
    /// every volume's and snapshot's block counts equal its map's; every
    /// segment's reference count equals the blocks the maps point into it;
    /// the name index and the volumes agree; a clone's parent snapshot
    /// exists.
    pub fn self_check(&self) {
        self.inner.state.lock().table.self_check();
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
