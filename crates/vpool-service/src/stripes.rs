//! [`StripeLocks`]: range locks over a volume's blocks, striped. A request
//! takes the stripes of the blocks it touches (sorted, so two requests
//! never wait for each other in a cycle), shared or exclusive; all of
//! them at once ([`StripeLocks::all`]) holds every request of the volume.
//! Used by a clone's copy-ups (`crate::layered`) and a volume's moves
//! (`crate::host` `moving`).

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Stripes: a request of up to 1 MiB touches at most 256 blocks, so a few
/// dozen stripes keep unrelated requests apart.
const STRIPES: u64 = 64;

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
        let blocks: Vec<u64> = if last - first + 1 >= STRIPES {
            (0..STRIPES).collect()
        } else {
            (first..=last).map(|b| b % STRIPES).collect()
        };
        let mut s: Vec<usize> = blocks
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
        assert_eq!(StripeLocks::of(3, 3), vec![3]);
        assert_eq!(StripeLocks::of(62, 65), vec![0, 1, 62, 63]);
        assert_eq!(StripeLocks::of(0, 300).len(), 64);
    }
}
