//! S3-FIFO's ghost FIFO: fingerprints of chunks recently evicted from the
//! small queue, without their data.
//!
//! A fingerprint is 32 bits of a fixed hash of `(segment, chunk)`, so a ghost
//! costs 4 bytes in the FIFO plus one hash-table bucket, and the index stays
//! deterministic (no random hasher seed). Two keys can share a fingerprint;
//! the only effect is that a chunk that was not recently evicted enters the
//! main queue instead of the small one, with odds of about
//! `ghosts / 2^32` per insert.
//!
//! A ghost hit does not remove the fingerprint: it ages out of the FIFO like
//! the others (the FIFO and the counts stay a plain multiset, no tombstones).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

/// The fingerprint of a chunk key.
pub(crate) fn fingerprint(seg: u64, chunk: u32) -> u32 {
    (mix64(mix64(seg) ^ u64::from(chunk)) >> 32) as u32
}

/// SplitMix64's step and finalizer.
fn mix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fingerprints are already uniformly spread; this hasher just widens them
/// (hashbrown takes its control byte from the top 7 bits of the hash).
#[derive(Default)]
pub(crate) struct FingerprintHasher(u64);

impl Hasher for FingerprintHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, fp: u32) {
        self.0 = (u64::from(fp) << 32) | u64::from(fp);
    }
}

#[derive(Default)]
pub(crate) struct Ghost {
    fifo: VecDeque<u32>,
    /// How many times each fingerprint is in `fifo`.
    counts: HashMap<u32, u32, BuildHasherDefault<FingerprintHasher>>,
}

/// Heap bytes per ghost entry, for the estimate in stats: 4 in the FIFO plus a
/// hash bucket of 8 bytes and a control byte, at the tables' typical load
/// (`tests/memory.rs` measures 24).
pub(crate) const GHOST_ENTRY_BYTES_ESTIMATE: u64 = 22;

impl Ghost {
    pub(crate) fn len(&self) -> usize {
        self.fifo.len()
    }

    pub(crate) fn contains(&self, fp: u32) -> bool {
        self.counts.contains_key(&fp)
    }

    /// Adds a fingerprint at the tail, then drops from the head down to
    /// `max_len`.
    pub(crate) fn push(&mut self, fp: u32, max_len: usize) {
        self.fifo.push_back(fp);
        *self.counts.entry(fp).or_insert(0) += 1;
        self.trim(max_len);
    }

    pub(crate) fn trim(&mut self, max_len: usize) {
        while self.fifo.len() > max_len {
            let Some(fp) = self.fifo.pop_front() else {
                break;
            };
            match self.counts.get_mut(&fp) {
                Some(n) if *n > 1 => *n -= 1,
                _ => {
                    self.counts.remove(&fp);
                }
            }
        }
        // Give memory back after a capacity cut or a mass removal.
        if self.fifo.capacity() > 64 && self.fifo.capacity() > 4 * self.fifo.len() {
            self.fifo.shrink_to(2 * self.fifo.len());
            self.counts.shrink_to(2 * self.counts.len());
        }
    }

    pub(crate) fn check(&self, max_len: usize) {
        assert!(
            self.fifo.len() <= max_len,
            "ghost {} > bound {max_len}",
            self.fifo.len()
        );
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &fp in &self.fifo {
            *counts.entry(fp).or_insert(0) += 1;
        }
        assert_eq!(counts.len(), self.counts.len(), "ghost counts: keys");
        for (fp, n) in counts {
            assert_eq!(self.counts.get(&fp), Some(&n), "ghost count of {fp:#x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_multiset() {
        let mut g = Ghost::default();
        g.push(1, 3);
        g.push(2, 3);
        g.push(1, 3);
        assert!(g.contains(1) && g.contains(2));
        g.push(3, 3); // drops the first 1
        assert!(g.contains(1));
        g.push(4, 3); // drops 2
        assert!(!g.contains(2));
        g.push(5, 3); // drops the second 1
        assert!(!g.contains(1));
        g.check(3);
        g.trim(0);
        assert_eq!(g.len(), 0);
        g.check(0);
    }

    #[test]
    fn fingerprints_spread() {
        let mut seen = std::collections::HashSet::new();
        for seg in 0..64 {
            for chunk in 0..512 {
                seen.insert(fingerprint(seg, chunk));
            }
        }
        // 32768 keys into 2^32 values: collisions are possible but rare.
        assert!(seen.len() > 32768 - 4);
    }
}
