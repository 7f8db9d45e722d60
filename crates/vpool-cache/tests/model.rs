//! Model-based property test: random sequences of index operations, run
//! against `CacheIndex` and against a plain model (the set of present
//! `(segment, sector)` pairs plus the pin ranges), compared after every step,
//! with `self_check()` after every step.
//!
//! The model has no policy: it learns what was evicted from `evict()`'s
//! answer and checks that the answer is legal (whole chunks that were
//! present, none overlapping a pin, enough to get under the budget, nothing
//! when already under it).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use proptest::prelude::*;
use vpool_cache::{CHUNK_BYTES, CacheIndex, PAGE_BYTES, SECTOR_BYTES};

/// Segment lengths: unaligned ends, a segment shorter than a sector's
/// multiple, one exactly on a chunk boundary.
const SEG_LENS: [u64; 4] = [
    5 * CHUNK_BYTES + 1000,
    3 * CHUNK_BYTES,
    700,
    2 * CHUNK_BYTES + 512,
];
const SECTORS_PER_CHUNK: u64 = CHUNK_BYTES / SECTOR_BYTES;

#[derive(Clone, Debug)]
enum Op {
    /// segment, first sector, sectors
    Insert(u64, u64, u64),
    /// segment, offset, length (bytes, unaligned)
    Lookup(u64, u64, u64),
    Touch(u64, u64, u64),
    Evict,
    /// (segment, offset, length) in bytes
    SetPins(Vec<(u64, u64, u64)>),
    RemoveSegment(u64),
    /// capacity in pages
    SetCapacity(u64),
    Roundtrip,
}

fn seg() -> impl Strategy<Value = u64> {
    0..SEG_LENS.len() as u64
}

/// A byte count up to `max`: arbitrary, or a multiple of a sector, a page
/// or a chunk (edges are where the off-by-ones live).
fn bytes(max: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        0..max,
        (0..=max / SECTOR_BYTES).prop_map(|n| n * SECTOR_BYTES),
        (0..=max / PAGE_BYTES).prop_map(|n| n * PAGE_BYTES),
        (0..=max / CHUNK_BYTES).prop_map(|n| n * CHUNK_BYTES),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let max_sector = SEG_LENS[0].div_ceil(SECTOR_BYTES);
    let max_off = SEG_LENS[0] + 1000;
    prop_oneof![
        10 => (seg(), 0..max_sector, 1u64..300).prop_map(|(s, a, n)| Op::Insert(s, a, n)),
        8 => (seg(), bytes(max_off), bytes(3 * CHUNK_BYTES)).prop_map(|(s, o, l)| Op::Lookup(s, o, l)),
        4 => (seg(), bytes(max_off), bytes(20_000)).prop_map(|(s, o, l)| Op::Touch(s, o, l)),
        5 => Just(Op::Evict),
        2 => prop::collection::vec((seg(), bytes(max_off), bytes(2 * CHUNK_BYTES)), 0..4).prop_map(Op::SetPins),
        1 => seg().prop_map(Op::RemoveSegment),
        2 => prop_oneof![0u64..80, Just(1 << 40)].prop_map(Op::SetCapacity),
        1 => Just(Op::Roundtrip),
    ]
}

#[derive(Default)]
struct Model {
    present: BTreeSet<(u64, u64)>,
    /// (segment, byte range), as given.
    pins: Vec<(u64, Range<u64>)>,
    capacity_bytes: u64,
}

impl Model {
    fn pinned_sectors(&self) -> BTreeSet<(u64, u64)> {
        let mut out = BTreeSet::new();
        for (seg, r) in &self.pins {
            for s in r.start / SECTOR_BYTES..r.end.div_ceil(SECTOR_BYTES) {
                out.insert((*seg, s));
            }
        }
        out
    }

    fn chunk_pinned(&self, seg: u64, chunk: u64) -> bool {
        let lo = chunk * CHUNK_BYTES;
        self.pins
            .iter()
            .any(|(s, r)| *s == seg && r.start < lo + CHUNK_BYTES && r.end > lo)
    }

    /// chunk -> present sectors' pages
    fn chunks(&self) -> BTreeMap<(u64, u64), BTreeSet<u64>> {
        let mut out: BTreeMap<(u64, u64), BTreeSet<u64>> = BTreeMap::new();
        for &(seg, s) in &self.present {
            out.entry((seg, s / SECTORS_PER_CHUNK))
                .or_default()
                .insert(s * SECTOR_BYTES / PAGE_BYTES);
        }
        out
    }

    fn used_bytes(&self, only_pinned: bool) -> u64 {
        self.chunks()
            .iter()
            .filter(|((seg, c), _)| !only_pinned || self.chunk_pinned(*seg, *c))
            .map(|(_, pages)| pages.len() as u64 * PAGE_BYTES)
            .sum()
    }

    fn missing(&self, seg: u64, offset: u64, len: u64) -> Vec<Range<u64>> {
        let seg_len = SEG_LENS[seg as usize];
        let end = offset.saturating_add(len).min(seg_len);
        let mut out: Vec<Range<u64>> = Vec::new();
        if offset >= end {
            return out;
        }
        for s in offset / SECTOR_BYTES..end.div_ceil(SECTOR_BYTES) {
            if self.present.contains(&(seg, s)) {
                continue;
            }
            let r = s * SECTOR_BYTES..((s + 1) * SECTOR_BYTES).min(seg_len);
            match out.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => out.push(r),
            }
        }
        out
    }
}

/// Sectors covered by `ranges`, which must be sector-aligned, sorted,
/// disjoint and not touching within a segment.
fn sectors_of(ranges: &[(u64, Range<u64>)]) -> BTreeSet<(u64, u64)> {
    for w in ranges.windows(2) {
        assert!(
            w[0].0 < w[1].0 || w[0].1.end < w[1].1.start,
            "not sorted/merged: {w:?}"
        );
    }
    let mut out = BTreeSet::new();
    for (seg, r) in ranges {
        assert!(
            r.start < r.end && r.start % SECTOR_BYTES == 0 && r.end % SECTOR_BYTES == 0,
            "{r:?}"
        );
        for s in r.start / SECTOR_BYTES..r.end / SECTOR_BYTES {
            out.insert((*seg, s));
        }
    }
    out
}

fn compare(ix: &CacheIndex, m: &Model) {
    ix.self_check();
    for (seg, &len) in SEG_LENS.iter().enumerate() {
        let seg = seg as u64;
        assert_eq!(
            ix.missing(seg, 0, len, len),
            m.missing(seg, 0, len),
            "segment {seg}"
        );
    }
    let s = ix.stats();
    assert_eq!(s.used_bytes, m.used_bytes(false), "used bytes");
    assert_eq!(s.pinned_bytes, m.used_bytes(true), "pinned bytes");
    assert_eq!(s.entries, m.chunks().len() as u64, "entries");
    assert_eq!(s.capacity_bytes, m.capacity_bytes);
}

fn run(initial_capacity_pages: u64, ops: Vec<Op>) {
    let mut m = Model {
        capacity_bytes: initial_capacity_pages * PAGE_BYTES,
        ..Model::default()
    };
    let mut ix = CacheIndex::new(m.capacity_bytes);
    for op in ops {
        match op {
            Op::Insert(seg, first, n) => {
                let seg_len = SEG_LENS[seg as usize];
                let start = (first * SECTOR_BYTES).min(seg_len / SECTOR_BYTES * SECTOR_BYTES);
                let end = ((first + n) * SECTOR_BYTES).min(seg_len);
                ix.insert(seg, start..end, seg_len);
                for s in start / SECTOR_BYTES..end.div_ceil(SECTOR_BYTES) {
                    m.present.insert((seg, s));
                }
            }
            Op::Lookup(seg, offset, len) => {
                let seg_len = SEG_LENS[seg as usize];
                let want = m.missing(seg, offset, len);
                assert_eq!(ix.missing(seg, offset, len, seg_len), want);
                assert_eq!(ix.lookup(seg, offset, len, seg_len), want);
            }
            Op::Touch(seg, offset, len) => ix.touch(seg, offset, len),
            Op::Evict => {
                let before = m.used_bytes(false);
                let evicted = ix.evict();
                if before <= m.capacity_bytes {
                    assert!(evicted.is_empty(), "evicted under budget: {evicted:?}");
                }
                let mut seen = BTreeSet::new();
                for (seg, r) in &evicted {
                    assert_eq!(r.start % CHUNK_BYTES, 0);
                    assert_eq!(r.end - r.start, CHUNK_BYTES);
                    let chunk = r.start / CHUNK_BYTES;
                    assert!(seen.insert((*seg, chunk)), "chunk evicted twice");
                    assert!(
                        !m.chunk_pinned(*seg, chunk),
                        "evicted a pinned chunk {seg} {r:?}"
                    );
                    let sectors: Vec<_> = m
                        .present
                        .range(
                            (*seg, chunk * SECTORS_PER_CHUNK)
                                ..(*seg, (chunk + 1) * SECTORS_PER_CHUNK),
                        )
                        .copied()
                        .collect();
                    assert!(!sectors.is_empty(), "evicted an absent chunk {seg} {r:?}");
                    for k in sectors {
                        m.present.remove(&k);
                    }
                }
                let used = m.used_bytes(false);
                assert!(
                    used <= m.capacity_bytes || used == m.used_bytes(true),
                    "over budget after evict with unpinned data: {used} > {}",
                    m.capacity_bytes
                );
            }
            Op::SetPins(pins) => {
                let pins: Vec<_> = pins.iter().map(|&(s, o, l)| (s, o..o + l)).collect();
                let missing = ix.set_pins(&pins);
                m.pins = pins.into_iter().filter(|(_, r)| !r.is_empty()).collect();
                let want: BTreeSet<_> =
                    m.pinned_sectors().difference(&m.present).copied().collect();
                assert_eq!(sectors_of(&missing), want, "set_pins' missing sectors");
            }
            Op::RemoveSegment(seg) => {
                ix.remove_segment(seg);
                m.present.retain(|&(s, _)| s != seg);
                m.pins.retain(|(s, _)| *s != seg);
            }
            Op::SetCapacity(pages) => {
                m.capacity_bytes = pages * PAGE_BYTES;
                ix.set_capacity(m.capacity_bytes);
            }
            Op::Roundtrip => {
                let bytes = ix.encode();
                let back =
                    CacheIndex::decode(&bytes, m.capacity_bytes).expect("own encoding decodes");
                back.self_check();
                assert_eq!(back.encode(), bytes, "re-encoding differs");
                assert_eq!(back.pins(), ix.pins());
                let (a, b) = (ix.stats(), back.stats());
                assert_eq!(
                    (
                        a.small_entries,
                        a.main_entries,
                        a.pinned_entries,
                        a.used_bytes
                    ),
                    (
                        b.small_entries,
                        b.main_entries,
                        b.pinned_entries,
                        b.used_bytes
                    )
                );
                ix = back;
            }
        }
        compare(&ix, &m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn index_matches_model(capacity_pages in 0u64..80, ops in prop::collection::vec(op(), 1..60)) {
        run(capacity_pages, ops);
    }
}

#[test]
fn pinned_over_capacity_then_released() {
    run(
        4,
        vec![
            Op::Insert(0, 0, 640),
            Op::SetPins(vec![(0, 0, 3 * CHUNK_BYTES)]),
            Op::Evict,
            Op::Roundtrip,
            Op::SetPins(vec![]),
            Op::Evict,
        ],
    );
}
