//! Unit tests: missing()/insert() edge cases, the S3-FIFO transitions, pins,
//! and the codec's refusals. The model test is `tests/model.rs`.

use super::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// A segment length that is not a multiple of a sector.
const SEG_LEN: u64 = 32 * MIB + 1000;

fn big() -> CacheIndex {
    CacheIndex::new(u64::MAX)
}

#[test]
fn empty_index_misses_everything_rounded_out() {
    let ix = big();
    assert_eq!(ix.missing(1, 0, 4096, SEG_LEN), vec![0..4096]);
    assert_eq!(ix.missing(1, 100, 4100, SEG_LEN), vec![0..4608]);
    assert_eq!(ix.missing(1, 511, 2, SEG_LEN), vec![0..1024]);
    assert_eq!(ix.missing(1, 512, 512, SEG_LEN), vec![512..1024]);
    // A read across chunk boundaries is one merged run.
    assert_eq!(
        ix.missing(1, CHUNK_BYTES - 100, 3 * CHUNK_BYTES, SEG_LEN),
        vec![CHUNK_BYTES - 512..4 * CHUNK_BYTES]
    );
}

#[test]
fn empty_and_out_of_range_reads() {
    let ix = big();
    assert!(ix.missing(1, 0, 0, SEG_LEN).is_empty());
    assert!(ix.missing(1, 4096, 0, SEG_LEN).is_empty());
    assert!(ix.missing(1, SEG_LEN, 10, SEG_LEN).is_empty());
    assert!(ix.missing(1, SEG_LEN + 4096, 10, SEG_LEN).is_empty());
    assert!(ix.missing(1, 0, 4096, 0).is_empty());
    // offset + len overflowing u64 is clipped, not a panic.
    assert_eq!(
        ix.missing(1, SEG_LEN - 10, u64::MAX, SEG_LEN),
        vec![32 * MIB + 512..SEG_LEN]
    );
}

#[test]
fn clipping_at_an_unaligned_segment_end() {
    let mut ix = big();
    let tail_sector = SEG_LEN / 512 * 512;
    assert_eq!(
        ix.missing(7, SEG_LEN - 4096, 8192, SEG_LEN),
        vec![32 * MIB - 3584..SEG_LEN]
    );
    assert_eq!(
        ix.missing(7, SEG_LEN - 1, 1, SEG_LEN),
        vec![tail_sector..SEG_LEN]
    );
    // The last partial sector can be inserted up to the segment's end and
    // then counts as present.
    ix.insert(7, tail_sector..SEG_LEN, SEG_LEN);
    ix.self_check();
    assert!(ix.missing(7, SEG_LEN - 1, 1, SEG_LEN).is_empty());
    assert!(ix.missing(7, tail_sector, 4096, SEG_LEN).is_empty());
    assert_eq!(ix.used_bytes(), PAGE_BYTES);
}

#[test]
fn insert_then_missing_is_the_complement() {
    let mut ix = big();
    ix.insert(3, 4096..8192, SEG_LEN);
    ix.insert(3, 8192..8704, SEG_LEN);
    ix.self_check();
    assert_eq!(ix.missing(3, 0, 16384, SEG_LEN), vec![0..4096, 8704..16384]);
    assert!(ix.missing(3, 4096, 4608, SEG_LEN).is_empty());
    assert!(ix.missing(3, 4097, 100, SEG_LEN).is_empty());
    // Another segment is unaffected.
    assert_eq!(ix.missing(4, 4096, 4096, SEG_LEN), vec![4096..8192]);
    // Two pages have sectors present.
    assert_eq!(ix.used_bytes(), 2 * PAGE_BYTES);
    assert_eq!(ix.stats().entries, 1);
}

#[test]
fn multi_chunk_insert() {
    let mut ix = big();
    let start = CHUNK_BYTES - 1024;
    let end = 3 * CHUNK_BYTES + 1024;
    ix.insert(9, start..end, SEG_LEN);
    ix.self_check();
    let s = ix.stats();
    assert_eq!(s.entries, 4);
    // 1 page + 16 + 16 + 1 page.
    assert_eq!(s.used_bytes, 34 * PAGE_BYTES);
    assert_eq!(
        ix.missing(9, 0, 4 * CHUNK_BYTES, SEG_LEN),
        vec![0..start, end..4 * CHUNK_BYTES]
    );
}

#[test]
fn empty_insert_is_a_no_op() {
    let mut ix = big();
    ix.insert(1, 4096..4096, SEG_LEN);
    ix.insert(1, SEG_LEN..SEG_LEN, SEG_LEN);
    ix.self_check();
    assert_eq!(ix.stats().entries, 0);
}

#[test]
#[should_panic(expected = "not sector-aligned")]
fn unaligned_insert_start_panics() {
    big().insert(1, 100..4096, SEG_LEN);
}

#[test]
#[should_panic(expected = "not sector-aligned")]
fn unaligned_insert_end_inside_the_segment_panics() {
    big().insert(1, 0..4000, SEG_LEN);
}

#[test]
#[should_panic(expected = "outside")]
fn insert_past_the_segment_end_panics() {
    big().insert(1, 0..SEG_LEN + 24, SEG_LEN);
}

#[test]
fn reads_fetch_at_most_len_plus_1022() {
    let ix = big();
    let mut x = 12345u64;
    for _ in 0..10_000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 20) % (SEG_LEN - 8192);
        for len in [1, 511, 512, 513, 600, 1022, 1024, 4096, 4100, 8192] {
            let fetched: u64 = ix
                .missing(1, off, len, SEG_LEN)
                .iter()
                .map(|r| r.end - r.start)
                .sum();
            assert!(
                fetched <= len + 1022,
                "read {len} at {off} fetched {fetched}"
            );
            if len >= 1022 {
                assert!(fetched <= 2 * len, "read {len} at {off} fetched {fetched}");
            }
        }
        let fetched: u64 = ix
            .missing(1, off, 4100, SEG_LEN)
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        assert!(fetched <= 5 * 1024);
    }
    // The worst cases, exactly.
    assert_eq!(ix.missing(1, 511, 4100, SEG_LEN), vec![0..5120]);
    assert_eq!(ix.missing(1, 511, 600, SEG_LEN), vec![0..1536]);
}

#[test]
fn touch_counts_only_hits() {
    let mut ix = big();
    ix.insert(1, 0..4096, SEG_LEN);
    // Part of the read is missing in chunk 0: not a hit.
    ix.touch(1, 0, 8192);
    assert_eq!(ix.store.slot(ix.segments[&1][&0]).freq, 0);
    for _ in 0..5 {
        ix.touch(1, 100, 200);
    }
    assert_eq!(ix.store.slot(ix.segments[&1][&0]).freq, MAX_FREQ);
    ix.touch(2, 0, 4096);
    ix.touch(1, 0, 0);
    // A huge range costs what the segment's entries cost, not its length.
    ix.insert(1, 5 * CHUNK_BYTES..6 * CHUNK_BYTES, SEG_LEN);
    let freq = |ix: &CacheIndex, c: u32| ix.store.slot(ix.segments[&1][&c]).freq;
    ix.touch(1, 0, u64::MAX);
    assert_eq!((freq(&ix, 0), freq(&ix, 5)), (MAX_FREQ, 1));
    ix.touch(1, u64::MAX - 1, u64::MAX);
    assert_eq!(freq(&ix, 5), 1);
    ix.touch(1, 5 * CHUNK_BYTES + 4096, u64::MAX);
    assert_eq!(freq(&ix, 5), 2);
    ix.self_check();
}

#[test]
fn lookup_judges_hits_before_the_fetch() {
    let mut ix = big();
    let missing = ix.lookup(1, 0, 4096, SEG_LEN);
    assert_eq!(missing, vec![0..4096]);
    for r in missing {
        ix.insert(1, r, SEG_LEN);
    }
    assert_eq!(ix.store.slot(ix.segments[&1][&0]).freq, 0);
    assert!(ix.lookup(1, 0, 4096, SEG_LEN).is_empty());
    assert_eq!(ix.store.slot(ix.segments[&1][&0]).freq, 1);
    let s = ix.stats();
    assert_eq!(
        (s.lookups, s.lookup_hits, s.read_bytes, s.missing_bytes),
        (2, 1, 8192, 4096)
    );
}

/// Fills `n` full chunks of segment `seg`, starting at chunk `first`.
fn fill(ix: &mut CacheIndex, seg: u64, first: u64, n: u64) {
    for c in first..first + n {
        ix.insert(seg, c * CHUNK_BYTES..(c + 1) * CHUNK_BYTES, SEG_LEN);
    }
}

#[test]
fn evict_small_head_goes_to_ghost_then_main() {
    // 10 chunks of budget: small's share is one chunk.
    let mut ix = CacheIndex::new(10 * CHUNK_BYTES);
    fill(&mut ix, 1, 0, 11);
    let evicted = ix.evict();
    assert_eq!(evicted, vec![(1, 0..CHUNK_BYTES)]);
    assert_eq!(ix.stats().ghost_entries, 1);
    ix.self_check();
    // Chunk 0 comes back: it is a ghost, so it goes to main.
    fill(&mut ix, 1, 0, 1);
    assert_eq!(ix.store.slot(ix.segments[&1][&0]).queue, Queue::Main);
    assert_eq!(ix.stats().ghost_hits, 1);
    ix.evict();
    ix.self_check();
    assert!(ix.used_bytes() <= 10 * CHUNK_BYTES);
}

#[test]
fn evict_promotes_hit_chunks_and_gives_main_second_chances() {
    let mut ix = CacheIndex::new(4 * CHUNK_BYTES);
    fill(&mut ix, 1, 0, 4);
    ix.touch(1, 0, 4096); // chunk 0 hit once
    fill(&mut ix, 1, 4, 1);
    // Small is over its share: chunk 0 (hit) moves to main, chunk 1 goes.
    assert_eq!(ix.evict(), vec![(1, CHUNK_BYTES..2 * CHUNK_BYTES)]);
    assert_eq!(ix.stats().promoted_chunks, 1);
    assert_eq!(ix.store.slot(ix.segments[&1][&0]).queue, Queue::Main);
    assert_eq!(ix.store.slot(ix.segments[&1][&0]).freq, 0);
    ix.self_check();
}

#[test]
fn main_head_with_frequency_rotates() {
    let mut ix = CacheIndex::new(3 * CHUNK_BYTES);
    fill(&mut ix, 1, 0, 3);
    for c in 0..3 {
        ix.touch(1, c * CHUNK_BYTES, 512);
    }
    fill(&mut ix, 1, 3, 1);
    // Chunks 0..3 promoted to main in order, chunk 3 evicted from small
    // (small is over its share of 0.3 chunk).
    let ev = ix.evict();
    assert_eq!(ev, vec![(1, 3 * CHUNK_BYTES..4 * CHUNK_BYTES)]);
    // Now make small empty and force eviction from main: bump chunk 0 so the
    // second chance skips it.
    ix.touch(1, 0, 512);
    ix.set_capacity(2 * CHUNK_BYTES);
    assert_eq!(ix.evict(), vec![(1, CHUNK_BYTES..2 * CHUNK_BYTES)]);
    ix.self_check();
}

#[test]
fn page_accounting() {
    let mut ix = big();
    ix.insert(1, 0..512, SEG_LEN);
    assert_eq!(ix.used_bytes(), 4096);
    ix.insert(1, 3584..4608, SEG_LEN);
    assert_eq!(ix.used_bytes(), 8192);
    ix.insert(1, 0..CHUNK_BYTES, SEG_LEN);
    assert_eq!(ix.used_bytes(), CHUNK_BYTES);
    ix.self_check();
}

#[test]
fn pins_block_eviction_and_report_missing() {
    let mut ix = CacheIndex::new(2 * CHUNK_BYTES);
    fill(&mut ix, 1, 0, 4);
    let missing = ix.set_pins(&[
        (1, 100..CHUNK_BYTES + 1),
        (1, 3 * CHUNK_BYTES..5 * CHUNK_BYTES),
        (2, 0..1000),
    ]);
    assert_eq!(
        missing,
        vec![(1, 4 * CHUNK_BYTES..5 * CHUNK_BYTES), (2, 0..1024)]
    );
    ix.self_check();
    let s = ix.stats();
    assert_eq!(s.pinned_entries, 3);
    assert_eq!(s.pinned_bytes, 3 * CHUNK_BYTES);
    assert!(s.pinned_over_capacity);
    let ev = ix.evict();
    assert_eq!(ev, vec![(1, 2 * CHUNK_BYTES..3 * CHUNK_BYTES)]);
    assert_eq!(ix.stats().evictions_blocked_by_pins, 1);
    assert_eq!(ix.used_bytes(), 3 * CHUNK_BYTES);
    ix.self_check();
    // A new chunk inside a pin is pinned on arrival.
    ix.insert(1, 4 * CHUNK_BYTES..4 * CHUNK_BYTES + 4096, SEG_LEN);
    assert_eq!(ix.stats().pinned_entries, 4);
    // Unpinning puts them back in main; eviction then reaches the budget.
    assert!(ix.set_pins(&[]).is_empty());
    ix.self_check();
    assert_eq!(ix.stats().main_entries, 4);
    ix.evict();
    assert!(ix.used_bytes() <= 2 * CHUNK_BYTES);
    ix.self_check();
}

#[test]
fn pins_are_normalized() {
    let mut ix = big();
    ix.set_pins(&[
        (1, 10..20),
        (1, 0..5),
        (1, 5..10),
        (1, 30..30),
        (0, 7..8),
        (1, 25..40),
    ]);
    assert_eq!(ix.pins(), vec![(0, 7..8), (1, 0..20), (1, 25..40)]);
    ix.self_check();
}

#[test]
fn remove_segment_drops_entries_and_pins() {
    let mut ix = CacheIndex::new(CHUNK_BYTES);
    fill(&mut ix, 1, 0, 3);
    fill(&mut ix, 2, 0, 2);
    ix.set_pins(&[(1, 0..10), (2, 0..10)]);
    ix.remove_segment(1);
    ix.self_check();
    let s = ix.stats();
    assert_eq!((s.entries, s.segments, s.pin_ranges), (2, 1, 1));
    assert_eq!(ix.missing(1, 0, 4096, SEG_LEN), vec![0..4096]);
    ix.remove_segment(1);
    ix.remove_segment(99);
    ix.self_check();
}

#[test]
fn everything_pinned_terminates() {
    let mut ix = CacheIndex::new(0);
    fill(&mut ix, 1, 0, 50);
    ix.set_pins(&[(1, 0..50 * CHUNK_BYTES)]);
    assert!(ix.evict().is_empty());
    assert_eq!(ix.stats().entries, 50);
    ix.set_pins(&[(1, 0..CHUNK_BYTES)]);
    assert_eq!(ix.evict().len(), 49);
    ix.self_check();
}

#[test]
fn zero_capacity_evicts_all_unpinned() {
    let mut ix = CacheIndex::new(0);
    fill(&mut ix, 1, 0, 20);
    for c in 0..20 {
        for _ in 0..3 {
            ix.touch(1, c * CHUNK_BYTES, 4096);
        }
    }
    assert_eq!(ix.evict().len(), 20);
    assert_eq!(ix.used_bytes(), 0);
    ix.self_check();
}

#[test]
fn encode_decode_roundtrip() {
    let mut ix = CacheIndex::new(8 * CHUNK_BYTES);
    fill(&mut ix, 1, 0, 10);
    ix.insert(2, 4096..8192, SEG_LEN);
    ix.touch(1, 0, 512);
    ix.set_pins(&[(2, 0..100), (5, 0..CHUNK_BYTES)]);
    ix.evict();
    ix.touch(1, 0, 512);
    let bytes = ix.encode();
    let back = CacheIndex::decode(&bytes, 8 * CHUNK_BYTES).expect("decodes");
    back.self_check();
    assert_eq!(back.encode(), bytes);
    assert_eq!(back.pins(), ix.pins());
    assert_eq!(back.used_bytes(), ix.used_bytes());
    let (a, b) = (ix.stats(), back.stats());
    assert_eq!(
        (a.small_entries, a.main_entries, a.pinned_entries),
        (b.small_entries, b.main_entries, b.pinned_entries)
    );
    let empty = CacheIndex::new(0).encode();
    assert_eq!(empty.len(), 44);
    CacheIndex::decode(&empty, 0)
        .expect("empty decodes")
        .self_check();
}

/// Re-seals `bytes` (length field and checksum) after a structural edit.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = bytes.len();
    bytes[16..24].copy_from_slice(&(n as u64).to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..n - 4]);
    bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn decode_refuses_corruption() {
    let mut ix = CacheIndex::new(u64::MAX);
    fill(&mut ix, 1, 0, 3);
    ix.set_pins(&[(1, 0..10), (1, 2 * CHUNK_BYTES..2 * CHUNK_BYTES + 10)]);
    let good = ix.encode();
    // 40 header + 3 * 29 entries + 2 * 24 pins + 4.
    assert_eq!(good.len(), 40 + 87 + 48 + 4);
    let dec = |b: &[u8]| CacheIndex::decode(b, 0).map(|_| ());

    assert!(matches!(
        dec(&good[..10]),
        Err(DecodeError::TooShort { .. })
    ));
    let mut b = good.clone();
    b[0] ^= 1;
    assert_eq!(dec(&b), Err(DecodeError::BadMagic));
    let mut b = good.clone();
    b[8] = 2;
    assert_eq!(dec(&b), Err(DecodeError::UnsupportedVersion(2)));
    assert!(matches!(
        dec(&good[..good.len() - 1]),
        Err(DecodeError::LengthMismatch { .. })
    ));
    // Every single-bit flip after the header's fixed fields is refused.
    for byte in 16..good.len() {
        for bit in 0..8 {
            let mut b = good.clone();
            b[byte] ^= 1 << bit;
            assert!(dec(&b).is_err(), "flip of byte {byte} bit {bit} accepted");
        }
    }
    // Structural errors behind a valid checksum.
    let entry = |k: usize| 40 + 29 * k;
    let mut b = good.clone();
    b[24] = 4; // 4 entries claimed
    assert!(matches!(
        dec(&reseal(b)),
        Err(DecodeError::CountMismatch { .. })
    ));
    let mut b = good.clone();
    b[entry(1) + 13..entry(1) + 29].fill(0);
    assert_eq!(
        dec(&reseal(b)),
        Err(DecodeError::BadEntry {
            index: 1,
            reason: "no sector present"
        })
    );
    let mut b = good.clone();
    b[entry(0) + 12] |= 0x30;
    assert!(matches!(
        dec(&reseal(b)),
        Err(DecodeError::BadEntry { index: 0, .. })
    ));
    let mut b = good.clone();
    b[entry(2) + 8] = 1; // chunk 2 -> chunk 1, twice; chunk 1 is not pinned
    assert!(matches!(
        dec(&reseal(b)),
        Err(DecodeError::BadEntry { index: 2, .. })
    ));
    let mut b = good.clone();
    let pin1 = entry(3) + 24;
    b[pin1 + 8..pin1 + 16].copy_from_slice(&5u64.to_le_bytes()); // overlaps pin 0
    assert_eq!(
        dec(&reseal(b)),
        Err(DecodeError::BadPin {
            index: 1,
            reason: "not sorted and merged"
        })
    );
    let mut b = good.clone();
    b[pin1 + 8..pin1 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        dec(&reseal(b)),
        Err(DecodeError::BadPin { index: 1, .. })
    ));
    // Huge counts are refused before any allocation.
    let mut b = good.clone();
    b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        dec(&reseal(b)),
        Err(DecodeError::CountMismatch { .. })
    ));
}
