//! [`StripeLocks`]: range locks over a volume's blocks, striped. A request
//! takes the stripes of the blocks it touches (sorted, so two requests
//! never wait for each other in a cycle), shared or exclusive; all of
//! them at once ([`StripeLocks::all`]) holds every request of the volume.
//! Used by a clone's copy-ups (`crate::layered`) and a volume's moves
//! (`crate::host` `moving`).

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Stripes: requests in different regions rarely share one.
const STRIPES: u64 = 64;
/// Blocks of a region (1 MiB of 4 KiB blocks), the unit a stripe covers: a
/// request of up to 1 MiB, or a 1 MiB step of a copy, takes one or two
/// stripes, not all of them.
const REGION_BLOCKS: u64 = 256;

/// Striped block locks of one volume; see the module doc.
pub struct StripeLocks {
    stripes: Vec<RwLock<()>>,
}

/// Every stripe held: see [`StripeLocks::all`].
pub struct AllHeld<'a>(#[allow(dead_code)] Vec<RwLockWriteGuard<'a, ()>>);

impl Default for StripeLocks {
    fn default() -> Self {
        StripeLocks {
            stripes: (0..STRIPES).map(|_| RwLock::new(())).collect(),
        }
    }
}

impl StripeLocks {
    /// The stripes of blocks `first..=last`, sorted and deduplicated.
    fn of(first: u64, last: u64) -> Vec<usize> {
        assert!(first <= last, "blocks {first}..={last}");
        let (first, last) = (first / REGION_BLOCKS, last / REGION_BLOCKS);
        let regions: Vec<u64> = if last - first + 1 >= STRIPES {
            (0..STRIPES).collect()
        } else {
            (first..=last).map(|r| r % STRIPES).collect()
        };
        let mut s: Vec<usize> = regions
            .into_iter()
            .map(|b| usize::try_from(b).expect("below STRIPES"))
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }

    /// The stripes of blocks `first..=last`, shared.
    pub fn shared(&self, first: u64, last: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        Self::of(first, last)
            .into_iter()
            .map(|s| self.stripes[s].read().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// The stripes of blocks `first..=last`, exclusively.
    pub fn exclusive(&self, first: u64, last: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        Self::of(first, last)
            .into_iter()
            .map(|s| self.stripes[s].write().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// Every stripe, exclusively: no request runs until the guard goes.
    pub fn all(&self) -> AllHeld<'_> {
        AllHeld(
            self.stripes
                .iter()
                .map(|s| s.write().unwrap_or_else(|e| e.into_inner()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_are_sorted_and_cover_wide_ranges_whole() {
        assert_eq!(StripeLocks::of(3, 3), vec![0]);
        assert_eq!(StripeLocks::of(255, 256), vec![0, 1]);
        assert_eq!(StripeLocks::of(63 * 256, 64 * 256 + 1), vec![0, 63]);
        assert_eq!(StripeLocks::of(0, 64 * 256).len(), 64);
    }
}
