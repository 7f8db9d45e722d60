//! Exclusive and shared bytes of a volume and its snapshots.
//!
//! A block of an image is *shared* when another image (a snapshot, the
//! volume, a clone or its snapshots) refers to the same stored copy, and
//! *exclusive* otherwise: deleting the image frees its exclusive bytes.
//!
//! Checking every block of every image against every other image costs
//! O(images x extents x images). Instead, images are taken in order
//! (snapshots oldest first, then the volume): a block that an image maps
//! as its neighbour in that order does is shared, and the persistent maps
//! tell where two neighbours differ without walking what they share
//! ([`ExtentMap::changed_ranges`]). Only blocks that differ from both
//! neighbours are looked up in the other images. For the usual history of
//! snapshots that differ by a little, the cost is O(differences x images).
//!
//! The work can still be large (many volumes sharing little), so it stops
//! with [`EngineError::Cancelled`] when the caller's flag is set or the
//! pool is closing.

use std::sync::atomic::{AtomicBool, Ordering};

use super::state::Snap;
use super::{ImageSpace, Pool, VolumeSpace};
use crate::error::{EngineError, Result};
use crate::extent_map::{ExtentMap, Target};
use crate::types::BLOCK_SIZE;

/// How many pieces are examined between looks at the cancel flag.
const CANCEL_CHECK_PIECES: usize = 1024;

/// One image of the volume: its name (`None` for the volume), map and data
/// blocks.
struct Image {
    name: Option<String>,
    map: ExtentMap,
    data_blocks: u64,
}

impl Image {
    /// Adds this image's figures, given its exclusive blocks, to `out`.
    fn record(&self, out: &mut VolumeSpace, exclusive_blocks: u64) {
        let space = ImageSpace {
            allocated_bytes: self.data_blocks * BLOCK_SIZE,
            exclusive_bytes: exclusive_blocks * BLOCK_SIZE,
            shared_bytes: (self.data_blocks - exclusive_blocks) * BLOCK_SIZE,
        };
        match &self.name {
            None => out.volume = space,
            Some(n) => out.snapshots.push((n.clone(), space)),
        }
    }
}

impl Pool {
    /// [`ImageSpace`] of a volume and each of its snapshots (see the module
    /// doc). Runs outside the pool's lock.
    pub fn volume_space(&self, volume: &str) -> Result<VolumeSpace> {
        self.volume_space_until(volume, &AtomicBool::new(false))
    }

    /// [`Pool::volume_space`], giving up with [`EngineError::Cancelled`]
    /// once `cancel` is set (the client left, a deadline passed) or the
    /// pool is closing.
    pub fn volume_space_until(&self, volume: &str, cancel: &AtomicBool) -> Result<VolumeSpace> {
        let (images, others) = self.images_for_space(volume)?;
        let mut out = VolumeSpace::default();
        let mut budget = CANCEL_CHECK_PIECES;
        for k in 0..images.len() {
            let candidates = self.candidates(&images, k);
            let mut exclusive = 0u64;
            for (start, end) in candidates {
                for p in images[k].map.lookup(start, end - start) {
                    budget -= 1;
                    if budget == 0 {
                        budget = CANCEL_CHECK_PIECES;
                        if cancel.load(Ordering::Relaxed)
                            || self.inner.shutdown.load(Ordering::Relaxed)
                        {
                            return Err(EngineError::Cancelled("space accounting"));
                        }
                    }
                    exclusive += exclusive_blocks(&images, k, &others, p);
                }
            }
            images[k].record(&mut out, exclusive);
        }
        Ok(out)
    }

    /// The same figures by brute force, every block of every image against
    /// every other image: the oracle the property tests compare with.
    #[doc(hidden)]
    pub fn volume_space_brute_force(&self, volume: &str) -> Result<VolumeSpace> {
        let (images, others) = self.images_for_space(volume)?;
        let mut out = VolumeSpace::default();
        for (k, img) in images.iter().enumerate() {
            let exclusive: u64 = img
                .map
                .iter()
                .map(|p| exclusive_blocks(&images, k, &others, p))
                .sum();
            img.record(&mut out, exclusive);
        }
        Ok(out)
    }

    /// The volume's images (snapshots oldest first, then the volume) and
    /// every other volume's images, captured under the lock in O(images).
    fn images_for_space(&self, volume: &str) -> Result<(Vec<Image>, Vec<ExtentMap>)> {
        let st = self.inner.state.lock();
        let id = st.table.id_of(volume)?;
        let vol = st.table.vol(id)?;
        let mut snaps: Vec<(&String, &Snap)> = vol.snapshots.iter().collect();
        snaps.sort_by_key(|(_, s)| s.seq);
        let mut images: Vec<Image> = snaps
            .iter()
            .map(|(n, s)| Image {
                name: Some((*n).clone()),
                map: s.map.clone(),
                data_blocks: s.data_blocks,
            })
            .collect();
        images.push(Image {
            name: None,
            map: vol.map.clone(),
            data_blocks: vol.data_blocks,
        });
        let others = st
            .table
            .volumes
            .iter()
            .filter(|(vid, _)| **vid != id)
            .flat_map(|(_, v)| {
                std::iter::once(v.map.clone()).chain(v.snapshots.values().map(|s| s.map.clone()))
            })
            .collect();
        Ok((images, others))
    }

    /// The block ranges where image `k` differs from both its neighbours
    /// (all of it where it has none).
    fn candidates(&self, images: &[Image], k: usize) -> Vec<(u64, u64)> {
        let all = vec![(0, u64::MAX)];
        let before = match k.checked_sub(1) {
            Some(j) => images[j].map.changed_ranges(&images[k].map),
            None => all.clone(),
        };
        let after = match images.get(k + 1) {
            Some(next) => images[k].map.changed_ranges(&next.map),
            None => all,
        };
        let bounded = intersect(&before, &after);
        // Clip "everything" to the image's mapped extent.
        let end = images[k]
            .map
            .iter()
            .last()
            .map_or(0, |p| p.start_block + p.len_blocks);
        bounded
            .into_iter()
            .filter_map(|(s, e)| (s < end).then_some((s, e.min(end))))
            .collect()
    }
}

/// Blocks of piece `p` of image `k` that no other image refers to.
fn exclusive_blocks(
    images: &[Image],
    k: usize,
    others: &[ExtentMap],
    p: crate::extent_map::Piece,
) -> u64 {
    let Some(Target::Data(d)) = p.target else {
        return 0;
    };
    let mut shared = vec![false; p.len_blocks as usize];
    // Neighbours first: they are the likeliest to share.
    let order = [k.checked_sub(1), Some(k + 1)]
        .into_iter()
        .flatten()
        .chain((0..images.len()).filter(|&j| j + 1 != k && j != k && j != k + 1));
    let family = order.filter_map(|j| images.get(j)).map(|i| &i.map);
    for other in family.chain(others.iter()) {
        for q in other.lookup(p.start_block, p.len_blocks) {
            if let Some(Target::Data(e)) = q.target {
                let off = q.start_block - p.start_block;
                if e == d.advance(off) {
                    shared[off as usize..(off + q.len_blocks) as usize].fill(true);
                }
            }
        }
        if shared.iter().all(|&b| b) {
            return 0;
        }
    }
    shared.iter().filter(|&&b| !b).count() as u64
}

/// The intersection of two sorted lists of disjoint ranges.
fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < a.len() && j < b.len() {
        let s = a[i].0.max(b[j].0);
        let e = a[i].1.min(b[j].1);
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::intersect;

    #[test]
    fn intersection_of_ranges() {
        assert_eq!(intersect(&[(0, 10)], &[(5, 20)]), vec![(5, 10)]);
        assert_eq!(
            intersect(&[(0, 3), (5, 9)], &[(2, 6), (8, 12)]),
            vec![(2, 3), (5, 6), (8, 9)]
        );
        assert!(intersect(&[(0, 3)], &[(3, 5)]).is_empty());
        assert_eq!(intersect(&[(0, u64::MAX)], &[(4, 8)]), vec![(4, 8)]);
    }
}
