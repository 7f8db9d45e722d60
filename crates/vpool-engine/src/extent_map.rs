//! A volume's extent map: which segment bytes hold each block.
//!
//! Keys are the first block of each extent; extents never overlap. Blocks
//! with no extent are unmapped (read as zeros). The map is a persistent
//! B-tree (`imbl::OrdMap`), so `clone()` is O(1) and later changes copy
//! only the path they touch: a snapshot of a volume is a clone of its map.

use imbl::OrdMap;
use vpool_store::SegmentId;

use crate::record::CRC_LEN;
use crate::types::BLOCK_SIZE;

/// Where the data of an extent's first block lives. Block `i` of the extent
/// is at `data_off + i * BLOCK_SIZE`, its checksum at `crc_off + i * 4`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataLoc {
    pub seg: SegmentId,
    pub data_off: u32,
    pub crc_off: u32,
}

impl DataLoc {
    /// The location of the block `blocks` further on.
    pub fn advance(self, blocks: u64) -> DataLoc {
        let data_off = u64::from(self.data_off) + blocks * BLOCK_SIZE;
        let crc_off = u64::from(self.crc_off) + blocks * CRC_LEN as u64;
        DataLoc {
            seg: self.seg,
            data_off: u32::try_from(data_off).expect("segments are smaller than 4 GiB"),
            crc_off: u32::try_from(crc_off).expect("segments are smaller than 4 GiB"),
        }
    }
}

/// What an extent's blocks hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Allocated zeros: nothing stored.
    Zero,
    /// Data in a segment.
    Data(DataLoc),
}

impl Target {
    /// The target of the block `blocks` further on.
    pub fn advance(self, blocks: u64) -> Target {
        match self {
            Target::Zero => Target::Zero,
            Target::Data(d) => Target::Data(d.advance(blocks)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    len_blocks: u32,
    target: Target,
}

/// One piece of a lookup: `len_blocks` blocks from `start_block`, mapped to
/// `target` or unmapped (`None`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub start_block: u64,
    pub len_blocks: u64,
    pub target: Option<Target>,
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct ExtentMap {
    map: OrdMap<u64, Extent>,
}

impl ExtentMap {
    pub fn new() -> ExtentMap {
        ExtentMap::default()
    }

    /// Number of extents (what the map's memory grows with).
    pub fn extent_count(&self) -> usize {
        self.map.len()
    }

    /// Pieces covering exactly `[start, start + len)`, in order, unmapped
    /// gaps included.
    pub fn lookup(&self, start: u64, len: u64) -> Vec<Piece> {
        let end = start + len;
        let mut out = Vec::new();
        let mut pos = start;
        // An extent that begins before `start` may cover it.
        if let Some((&k, e)) = self.map.get_prev(&start) {
            let e_end = k + u64::from(e.len_blocks);
            if k < start && e_end > start {
                let piece_end = e_end.min(end);
                out.push(Piece {
                    start_block: start,
                    len_blocks: piece_end - start,
                    target: Some(e.target.advance(start - k)),
                });
                pos = piece_end;
            }
        }
        if pos < end {
            for (&k, e) in self.map.range(pos..end) {
                if k > pos {
                    out.push(Piece {
                        start_block: pos,
                        len_blocks: k - pos,
                        target: None,
                    });
                }
                let e_end = (k + u64::from(e.len_blocks)).min(end);
                out.push(Piece {
                    start_block: k,
                    len_blocks: e_end - k,
                    target: Some(e.target),
                });
                pos = e_end;
            }
        }
        if pos < end {
            out.push(Piece {
                start_block: pos,
                len_blocks: end - pos,
                target: None,
            });
        }
        out
    }

    /// Maps `[start, start + len)` to `target` (`None` unmaps), calling
    /// `displaced(target, blocks)` for every mapped run it replaces.
    pub fn set(
        &mut self,
        start: u64,
        len: u64,
        target: Option<Target>,
        displaced: &mut dyn FnMut(Target, u64),
    ) {
        assert!(len > 0, "empty extents are never set");
        let end = start.checked_add(len).expect("block range fits u64");
        // Fast path: an exact overwrite of one extent (the common random
        // write) is one lookup and one insert.
        if let Some(&e) = self.map.get(&start)
            && u64::from(e.len_blocks) == len
        {
            displaced(e.target, len);
            match target {
                Some(t) => {
                    self.map.insert(
                        start,
                        Extent {
                            len_blocks: e.len_blocks,
                            target: t,
                        },
                    );
                }
                None => {
                    self.map.remove(&start);
                }
            }
            return;
        }
        // Split an extent that straddles `start`.
        if let Some((&k, &e)) = self.map.get_prev(&start) {
            let e_end = k + u64::from(e.len_blocks);
            if k < start && e_end > start {
                self.map.insert(
                    k,
                    Extent {
                        len_blocks: (start - k) as u32,
                        target: e.target,
                    },
                );
                self.map.insert(
                    start,
                    Extent {
                        len_blocks: (e_end - start) as u32,
                        target: e.target.advance(start - k),
                    },
                );
            }
        }
        // Remove everything starting inside the range; keep the tail of the
        // last one if it runs past `end`.
        let inside: Vec<(u64, Extent)> =
            self.map.range(start..end).map(|(&k, &e)| (k, e)).collect();
        for (k, e) in inside {
            self.map.remove(&k);
            let e_end = k + u64::from(e.len_blocks);
            let covered = e_end.min(end) - k;
            displaced(e.target, covered);
            if e_end > end {
                self.map.insert(
                    end,
                    Extent {
                        len_blocks: (e_end - end) as u32,
                        target: e.target.advance(end - k),
                    },
                );
            }
        }
        if let Some(t) = target {
            // Extents are at most u32::MAX blocks: split longer ranges.
            let mut pos = start;
            while pos < end {
                let n = (end - pos).min(u64::from(u32::MAX));
                self.map.insert(
                    pos,
                    Extent {
                        len_blocks: n as u32,
                        target: t.advance(pos - start),
                    },
                );
                pos += n;
            }
        }
    }

    /// Every extent in order, as pieces (no gaps).
    pub fn iter(&self) -> impl Iterator<Item = Piece> + '_ {
        self.map.iter().map(|(&k, e)| Piece {
            start_block: k,
            len_blocks: u64::from(e.len_blocks),
            target: Some(e.target),
        })
    }

    /// Block ranges `[start, end)` outside which `self` and `other` map
    /// every block the same, sorted and merged (they may cover blocks that
    /// are the same too). Costs O(differing extents x log n), not O(n):
    /// subtrees the two maps share (a snapshot and its volume) are skipped.
    pub fn changed_ranges(&self, other: &ExtentMap) -> Vec<(u64, u64)> {
        use imbl::ordmap::DiffItem;
        let range = |k: &u64, e: &Extent| (*k, k + u64::from(e.len_blocks));
        let mut out: Vec<(u64, u64)> = Vec::new();
        for item in self.map.diff(&other.map) {
            let (a, b) = match item {
                DiffItem::Add(k, e) | DiffItem::Remove(k, e) => (range(k, e), None),
                DiffItem::Update { old, new } => (range(old.0, old.1), Some(range(new.0, new.1))),
            };
            for r in std::iter::once(a).chain(b) {
                out.push(r);
            }
        }
        out.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
        for (s, e) in out {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        merged
    }

    /// Checks the invariants: extents are non-empty and do not overlap.
    pub fn self_check(&self) {
        let mut prev_end = 0u64;
        for (&k, e) in self.map.iter() {
            assert!(e.len_blocks > 0, "empty extent at {k}");
            assert!(k >= prev_end, "extent at {k} overlaps the previous one");
            prev_end = k + u64::from(e.len_blocks);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loc(seg: u64, data_off: u32) -> Target {
        Target::Data(DataLoc {
            seg: SegmentId(seg),
            data_off,
            crc_off: data_off / 1024,
        })
    }

    /// The model: one entry per block.
    fn model_lookup(model: &[Option<Target>], b: u64) -> Option<Target> {
        model[b as usize]
    }

    proptest! {
        #[test]
        fn matches_a_per_block_model(ops in proptest::collection::vec((0u64..64, 1u64..16, 0u8..3), 1..60)) {
            let mut map = ExtentMap::new();
            let mut model: Vec<Option<Target>> = vec![None; 80];
            let mut mapped = 0i64;
            for (i, (start, len, kind)) in ops.into_iter().enumerate() {
                let target = match kind {
                    0 => None,
                    1 => Some(Target::Zero),
                    _ => Some(loc(i as u64, (i as u32) * 1_000_000 / 4096 * 4096)),
                };
                let mut displaced = 0u64;
                map.set(start, len, target, &mut |_, n| displaced += n);
                let before: i64 = (start..start + len).filter(|&b| model[b as usize].is_some()).count() as i64;
                prop_assert_eq!(displaced as i64, before);
                for b in start..start + len {
                    model[b as usize] = target.map(|t| t.advance(b - start));
                }
                let added = if target.is_some() { len as i64 } else { 0 };
                mapped += added - before;
                map.self_check();
                let total: u64 = map.iter().map(|p| p.len_blocks).sum();
                prop_assert_eq!(total as i64, mapped);
                for s in [0u64, 3, 17, 40] {
                    let pieces = map.lookup(s, 30);
                    let mut b = s;
                    for p in pieces {
                        prop_assert_eq!(p.start_block, b);
                        for i in 0..p.len_blocks {
                            prop_assert_eq!(p.target.map(|t| t.advance(i)), model_lookup(&model, b + i));
                        }
                        b += p.len_blocks;
                    }
                    prop_assert_eq!(b, s + 30);
                }
            }
        }
    }

    #[test]
    fn clone_is_independent() {
        let mut a = ExtentMap::new();
        a.set(0, 10, Some(Target::Zero), &mut |_, _| {});
        let b = a.clone();
        a.set(5, 10, None, &mut |_, _| {});
        assert_eq!(b.lookup(0, 10).len(), 1);
        assert_eq!(a.lookup(0, 10).len(), 2);
    }
}
