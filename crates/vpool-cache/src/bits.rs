//! Presence bitmaps: one `u128` per chunk, bit `i` = sector `i` of the chunk.

use crate::{CHUNK_BYTES, PAGE_BYTES, SECTOR_BYTES};

/// Sectors in one chunk: the width of a presence bitmap.
pub(crate) const SECTORS_PER_CHUNK: u64 = CHUNK_BYTES / SECTOR_BYTES;
/// Sectors in one accounting page.
pub(crate) const SECTORS_PER_PAGE: u64 = PAGE_BYTES / SECTOR_BYTES;

const _: () = assert!(
    SECTORS_PER_CHUNK == 128,
    "a chunk's presence must be one u128"
);
const _: () = assert!(SECTORS_PER_PAGE == 8, "pages_present() folds 8-bit groups");

/// Bits `[lo, hi)` set; `lo <= hi <= 128`.
pub(crate) fn sector_mask(lo: u32, hi: u32) -> u128 {
    debug_assert!(lo <= hi && hi <= 128, "sector_mask({lo}, {hi})");
    if lo == hi {
        return 0;
    }
    let ones = if hi - lo == 128 {
        u128::MAX
    } else {
        (1u128 << (hi - lo)) - 1
    };
    ones << lo
}

/// Number of 4 KiB pages (8-sector groups) with at least one sector present.
pub(crate) fn pages_present(presence: u128) -> u32 {
    // Fold each byte onto its lowest bit: bit 8k ends up as the OR of bits
    // 8k..8k+8. Bits from the next byte leak into the upper bits of each
    // byte, which the final mask drops.
    let mut m = presence;
    m |= m >> 4;
    m |= m >> 2;
    m |= m >> 1;
    (m & 0x0101_0101_0101_0101_0101_0101_0101_0101).count_ones()
}

/// What a chunk with this presence costs on the filesystem.
pub(crate) fn cost_bytes(presence: u128) -> u64 {
    u64::from(pages_present(presence)) * PAGE_BYTES
}

/// Maximal runs `[lo, hi)` of set bits, lowest first.
pub(crate) fn runs(mut bits: u128) -> impl Iterator<Item = (u32, u32)> {
    std::iter::from_fn(move || {
        if bits == 0 {
            return None;
        }
        let lo = bits.trailing_zeros();
        let hi = lo + (bits >> lo).trailing_ones();
        bits &= !sector_mask(lo, hi);
        Some((lo, hi))
    })
}

/// Splits the sector range `[s0, s1)` (absolute sector numbers in a segment)
/// into `(chunk index, mask of the range's sectors in that chunk)`.
pub(crate) fn chunk_masks(s0: u64, s1: u64) -> impl Iterator<Item = (u64, u128)> {
    let chunks = if s0 < s1 {
        s0 / SECTORS_PER_CHUNK..(s1 - 1) / SECTORS_PER_CHUNK + 1
    } else {
        0..0
    };
    chunks.map(move |c| (c, chunk_mask(s0, s1, c)))
}

/// The sectors of `[s0, s1)` that fall in chunk `c`, as a mask.
pub(crate) fn chunk_mask(s0: u64, s1: u64, c: u64) -> u128 {
    let base = c * SECTORS_PER_CHUNK;
    let lo = s0.clamp(base, base + SECTORS_PER_CHUNK) - base;
    let hi = s1.clamp(base, base + SECTORS_PER_CHUNK) - base;
    if lo >= hi {
        return 0;
    }
    sector_mask(lo as u32, hi as u32)
}

/// Appends `r` to sorted ranges, merging it with the last one if they touch
/// or overlap. `r.start` must not be below the last range's start.
pub(crate) fn push_merged(out: &mut Vec<std::ops::Range<u64>>, r: std::ops::Range<u64>) {
    if r.is_empty() {
        return;
    }
    if let Some(last) = out.last_mut() {
        debug_assert!(last.start <= r.start);
        if r.start <= last.end {
            last.end = last.end.max(r.end);
            return;
        }
    }
    out.push(r);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(sector_mask(0, 0), 0);
        assert_eq!(sector_mask(5, 5), 0);
        assert_eq!(sector_mask(0, 128), u128::MAX);
        assert_eq!(sector_mask(0, 1), 1);
        assert_eq!(sector_mask(127, 128), 1 << 127);
        assert_eq!(sector_mask(3, 6), 0b111000);
    }

    #[test]
    fn pages() {
        assert_eq!(pages_present(0), 0);
        assert_eq!(pages_present(u128::MAX), 16);
        assert_eq!(pages_present(1), 1);
        assert_eq!(pages_present(0x80), 1);
        assert_eq!(pages_present(0x180), 2);
        assert_eq!(pages_present(1 << 127), 1);
        assert_eq!(pages_present(sector_mask(7, 17)), 3);
        for p in 0..16 {
            assert_eq!(pages_present(1u128 << (8 * p + 3)), 1);
        }
    }

    #[test]
    fn run_extraction() {
        assert_eq!(runs(0).count(), 0);
        assert_eq!(runs(u128::MAX).collect::<Vec<_>>(), vec![(0, 128)]);
        let bits = sector_mask(0, 2) | sector_mask(5, 9) | sector_mask(127, 128);
        assert_eq!(
            runs(bits).collect::<Vec<_>>(),
            vec![(0, 2), (5, 9), (127, 128)]
        );
    }

    #[test]
    fn chunk_splitting() {
        assert_eq!(chunk_masks(3, 3).count(), 0);
        assert_eq!(chunk_mask(0, 128, 1), 0);
        assert_eq!(chunk_mask(130, 140, 0), 0);
        assert_eq!(chunk_mask(130, 140, 1), sector_mask(2, 12));
        assert_eq!(
            chunk_masks(0, 128).collect::<Vec<_>>(),
            vec![(0, u128::MAX)]
        );
        assert_eq!(
            chunk_masks(126, 258).collect::<Vec<_>>(),
            vec![
                (0, sector_mask(126, 128)),
                (1, u128::MAX),
                (2, sector_mask(0, 2))
            ]
        );
    }

    #[test]
    fn merging() {
        let mut v = Vec::new();
        push_merged(&mut v, 0..10);
        push_merged(&mut v, 10..12);
        push_merged(&mut v, 11..11);
        push_merged(&mut v, 11..20);
        push_merged(&mut v, 30..40);
        assert_eq!(v, vec![0..20, 30..40]);
    }
}
