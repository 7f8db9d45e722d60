//! `vpool-cache`: the in-memory index and eviction policy of the host-side
//! cache of an object-store (S3) backed pool.
//!
//! Sealed log segments are immutable objects in the bucket. The cache keeps,
//! per segment, a sparse local file at the same offsets as the object; this
//! crate remembers which bytes of those files are present and decides which
//! to drop when the cache is over budget. It does no I/O: the caller asks
//! [`CacheIndex::lookup`] which sectors of a read are missing, range-GETs
//! them, writes them to the sparse file, reports them with
//! [`CacheIndex::insert`], and when [`CacheIndex::used_bytes`] exceeds the
//! budget punches holes where [`CacheIndex::evict`] says.
//!
//! # Units
//!
//! * **Sector** ([`SECTOR_BYTES`] = 512): presence granularity. A read fetches
//!   only its missing sectors, rounded out to whole sectors at both ends: at
//!   most `len + 1022` bytes. A 4 KiB read at an arbitrary offset (4100
//!   bytes, say) fetches at most 10 sectors (5 KiB, 1.25x); any read of
//!   1 KiB or more fetches at most 2x what it reads.
//! * **Chunk** ([`CHUNK_BYTES`] = 64 KiB): the unit of eviction and of the
//!   index. A chunk entry holds its 128 sectors' presence as one `u128`.
//! * **Page** ([`PAGE_BYTES`] = 4 KiB): the unit of accounting. A chunk costs
//!   4 KiB per page with any sector present, which is what the filesystem
//!   allocates for the sparse file; [`CacheIndex::used_bytes`] is their sum.
//!
//! # Policy: S3-FIFO
//!
//! S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction",
//! SOSP 2023): three FIFO queues of chunk entries.
//!
//! * **small** (about 10% of the budget): every new chunk enters here;
//! * **main** (the rest): chunks that proved themselves;
//! * **ghost**: fingerprints (no data) of chunks recently evicted from small,
//!   at most as many as main holds entries (or as many full chunks as main's
//!   share of the budget, whichever is more).
//!
//! Each entry has a 2-bit frequency, bumped (saturating at [`MAX_FREQ`]) when
//! a read *hits* it. To evict: while small is over its share, take its head:
//! if it was hit since it came in, it moves to main's tail with frequency 0,
//! otherwise it is evicted and its key goes to the ghost. Otherwise take
//! main's head: if its frequency is non-zero, decrement it and move it to
//! the tail (a second chance), otherwise evict it. A new chunk whose key is
//! in the ghost goes straight to main: it was evicted too early once.
//!
//! Why: much of what passes through the cache is read once (a backup, a
//! boot, a `dd`, a copy). Such chunks pass through the small queue and leave
//! after a short stay, so a sequential scan of any size flushes at most the
//! small queue and leaves main (the chunks read again) alone. LRU and plain FIFO
//! would flush everything (`tests/scan.rs` compares them). S3-FIFO also
//! needs no per-hit list update (a hit is a saturating increment), and its
//! queues are plain FIFOs.
//!
//! **Hits are per chunk and only count what was already there**: a lookup
//! bumps a chunk only if every sector the read touches in it is present. The
//! reads of a sequential scan that land in the chunk it fetched a moment ago
//! need other sectors, so they are misses, not hits, and the scan does not
//! promote itself. (A caller that reads ahead turns a scan's later reads
//! into hits on the readahead data; for reads it recognizes as sequential it
//! should call [`CacheIndex::missing`] and not [`CacheIndex::touch`].)
//!
//! **Pins**: [`CacheIndex::set_pins`] names byte ranges that must stay
//! resident (a suspended VM's volume, a snapshot being exported). A chunk
//! overlapping a pin leaves the eviction queues for a third list that
//! eviction never looks at, so no eviction pass scans pinned entries and
//! [`CacheIndex::evict`] terminates when only pinned data is left (it stops
//! there, over budget, and counts it in
//! [`CacheIndexStats::evictions_blocked_by_pins`]). When unpinned, a chunk
//! goes to main's tail, keeping its frequency. The small queue's share is
//! 10% of the *evictable* budget (capacity minus pinned bytes).
//!
//! # Memory
//!
//! Per chunk entry: a 40-byte slab slot (segment, chunk number, presence,
//! two `u32` list links, frequency, queue) plus its place in the segment's
//! `BTreeMap<u32, u32>` (chunk number to slot), 12 to 20 bytes depending on
//! how full the B-tree nodes are. Measured by `tests/memory.rs` with a
//! counting allocator over 100k entries: 56 bytes per entry inserted in
//! random order, 59 in sequential order (the test asserts at most 64). Per
//! ghost key: 4 bytes in the FIFO plus a hash-table bucket, 24 bytes measured
//! (asserted at most 32); ghost keys are at most max(main entries, main's
//! share / 64 KiB). Per segment with entries: about 100 bytes. Per pin
//! range: 16 bytes. [`CacheIndexStats::memory_bytes_estimate`] adds these up.
//!
//! Entries are bounded: each costs at least one page, so after
//! [`CacheIndex::evict`] there are at most `capacity / 4096` unpinned entries
//! (a 100 GiB cache: 1.6 M full chunks, about 90 MB of index; 26 M single-page
//! chunks in the worst case, about 1.4 GB). Slot numbers are `u32`:
//! [`MAX_ENTRIES`] is asserted. Chunk numbers are `u32` too, so segments and
//! pins are limited to [`MAX_SEGMENT_BYTES`] (256 TiB), also asserted.
//!
//! # Persistence
//!
//! [`CacheIndex::encode`] / [`CacheIndex::decode`]: a flat little-endian
//! encoding with a magic, a version, its total length and a trailing CRC-32C;
//! the entries in queue order (so a restart resumes the same policy state,
//! ghost aside) and the pins. The decoder distrusts everything and accepts
//! only the canonical encoding, so `encode(decode(x)) == x`; it is fuzzed
//! (`fuzz/fuzz_targets/cache_index.rs`).
//!
//! # Invariants
//!
//! [`CacheIndex::self_check`] asserts them all: every entry is on exactly one
//! of the three lists and in the segment index, and vice versa; list lengths
//! and byte totals match their entries; no entry is empty; an entry is on the
//! pinned list exactly when it overlaps a pin; pins are sorted, merged and
//! within limits; the ghost is within its bound. [`CacheIndex::evict`]
//! asserts its postcondition: at or under capacity, or only pinned entries
//! left.

mod bits;
mod codec;
mod ghost;
mod store;

use std::collections::BTreeMap;
use std::ops::Range;

use bits::{SECTORS_PER_CHUNK, chunk_mask, chunk_masks, push_merged, runs};
use ghost::{GHOST_ENTRY_BYTES_ESTIMATE, Ghost, fingerprint};
use store::{Queue, Store};

pub use codec::{CACHE_INDEX_MAGIC, CACHE_INDEX_VERSION, DecodeError};
pub use store::MAX_ENTRIES;

/// Presence granularity: a read fetches only the sectors it lacks.
pub const SECTOR_BYTES: u64 = 512;
/// Unit of eviction and of the index: one entry (and one punched hole) per chunk.
pub const CHUNK_BYTES: u64 = 64 * 1024;
/// Unit of accounting: a chunk costs this much per page with any sector present.
pub const PAGE_BYTES: u64 = 4096;
/// Largest segment the index handles (chunk numbers are `u32`): 256 TiB.
pub const MAX_SEGMENT_BYTES: u64 = (u32::MAX as u64 + 1) * CHUNK_BYTES;
/// S3-FIFO's frequency saturates here (two bits).
pub const MAX_FREQ: u8 = 3;
/// The small queue's share of the evictable budget, in percent.
pub const SMALL_QUEUE_PERCENT: u64 = 10;

/// Estimated heap bytes of one entry's place in its segment's chunk map
/// (see the crate doc; `tests/memory.rs` measures the total).
const INDEX_ENTRY_BYTES_ESTIMATE: u64 = 16;
/// Estimated heap bytes per segment with entries (outer map entry, the inner
/// map's first node).
const SEGMENT_BYTES_ESTIMATE: u64 = 100;

/// The cache's index: which sectors of which segments are present, and the
/// S3-FIFO queues that decide what to evict. See the crate doc.
pub struct CacheIndex {
    /// Budget for the bytes `used_bytes()` counts.
    capacity_bytes: u64,
    store: Store,
    /// segment -> chunk number -> slot.
    segments: BTreeMap<u64, BTreeMap<u32, u32>>,
    /// segment -> byte ranges, sorted, non-empty, neither overlapping nor
    /// touching.
    pins: BTreeMap<u64, Vec<Range<u64>>>,
    ghost: Ghost,
    counters: Counters,
}

#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    evicted_chunks: u64,
    evicted_bytes: u64,
    promoted_chunks: u64,
    ghost_hits: u64,
    evictions_blocked_by_pins: u64,
    lookups: u64,
    lookup_hits: u64,
    read_bytes: u64,
    missing_bytes: u64,
}

/// A snapshot of the index's sizes and counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheIndexStats {
    pub capacity_bytes: u64,
    /// Sum of every entry's cost (4 KiB per page with a sector present).
    pub used_bytes: u64,
    /// The part of `used_bytes` in chunks overlapping a pin.
    pub pinned_bytes: u64,
    /// Pinned bytes alone exceed the capacity: eviction cannot reach it.
    pub pinned_over_capacity: bool,
    pub entries: u64,
    pub segments: u64,
    pub small_entries: u64,
    pub small_bytes: u64,
    pub main_entries: u64,
    pub main_bytes: u64,
    pub pinned_entries: u64,
    pub ghost_entries: u64,
    pub pin_ranges: u64,
    /// Chunks evict() returned, and what they cost.
    pub evicted_chunks: u64,
    pub evicted_bytes: u64,
    /// Chunks moved from small to main because they were hit.
    pub promoted_chunks: u64,
    /// New chunks that went to main because their key was a ghost.
    pub ghost_hits: u64,
    /// evict() calls that stopped over capacity with only pinned data left.
    pub evictions_blocked_by_pins: u64,
    /// lookup() calls, those that found everything present, the bytes they
    /// asked for and the bytes they reported missing.
    pub lookups: u64,
    pub lookup_hits: u64,
    pub read_bytes: u64,
    pub missing_bytes: u64,
    /// Estimated heap bytes of the index (slab, maps, ghost, pins).
    pub memory_bytes_estimate: u64,
}

impl CacheIndex {
    /// An empty index with a budget of `capacity_bytes` of clean cached data.
    pub fn new(capacity_bytes: u64) -> CacheIndex {
        CacheIndex {
            capacity_bytes,
            store: Store::new(),
            segments: BTreeMap::new(),
            pins: BTreeMap::new(),
            ghost: Ghost::default(),
            counters: Counters::default(),
        }
    }

    /// Changes the budget (the caller gives the cache's size minus its dirty
    /// bytes). Does not evict: call [`CacheIndex::evict`].
    pub fn set_capacity(&mut self, capacity_bytes: u64) {
        self.capacity_bytes = capacity_bytes;
        self.trim_ghost();
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// Bytes the cached data occupies: 4 KiB per page with any sector present.
    pub fn used_bytes(&self) -> u64 {
        Queue::LISTS.iter().map(|&q| self.store.list(q).bytes).sum()
    }

    /// The part of [`CacheIndex::used_bytes`] in pinned chunks.
    pub fn pinned_bytes(&self) -> u64 {
        self.store.list(Queue::Pinned).bytes
    }

    /// The parts of `[offset_bytes, offset_bytes + len_bytes)` that are not
    /// present: sector-aligned (rounded out), merged into maximal runs, in
    /// order, the last one clipped to `segment_len_bytes` (the object's
    /// length). Empty if the range is empty or past the segment's end.
    pub fn missing(
        &self,
        seg: u64,
        offset_bytes: u64,
        len_bytes: u64,
        segment_len_bytes: u64,
    ) -> Vec<Range<u64>> {
        assert!(
            segment_len_bytes <= MAX_SEGMENT_BYTES,
            "segment {seg}: length {segment_len_bytes} over MAX_SEGMENT_BYTES"
        );
        let end = offset_bytes
            .saturating_add(len_bytes)
            .min(segment_len_bytes);
        let mut out = Vec::new();
        if offset_bytes >= end {
            return out;
        }
        self.missing_sectors(
            seg,
            offset_bytes / SECTOR_BYTES,
            end.div_ceil(SECTOR_BYTES),
            &mut out,
        );
        if let Some(last) = out.last_mut() {
            last.end = last.end.min(segment_len_bytes);
        }
        out
    }

    /// Appends the absent sectors of `[s0, s1)` as byte ranges (unclipped).
    fn missing_sectors(&self, seg: u64, s0: u64, s1: u64, out: &mut Vec<Range<u64>>) {
        let chunks = self.segments.get(&seg);
        for (chunk, mask) in chunk_masks(s0, s1) {
            let present = chunks
                .and_then(|m| m.get(&(chunk as u32)))
                .map_or(0, |&i| self.store.slot(i).presence());
            let base = chunk * SECTORS_PER_CHUNK;
            for (lo, hi) in runs(mask & !present) {
                push_merged(
                    out,
                    (base + u64::from(lo)) * SECTOR_BYTES..(base + u64::from(hi)) * SECTOR_BYTES,
                );
            }
        }
    }

    /// A read of `[offset_bytes, offset_bytes + len_bytes)`: bumps the
    /// frequency (saturating at [`MAX_FREQ`]) of every chunk in which all
    /// the sectors the read touches are present. Call it before inserting
    /// what the read fetched (or use [`CacheIndex::lookup`]), otherwise every
    /// miss counts as a hit.
    pub fn touch(&mut self, seg: u64, offset_bytes: u64, len_bytes: u64) {
        let end = offset_bytes
            .saturating_add(len_bytes)
            .min(MAX_SEGMENT_BYTES);
        if offset_bytes >= end {
            return;
        }
        let Some(chunks) = self.segments.get(&seg) else {
            return;
        };
        // Only the chunks present: a huge range costs no more than the
        // segment's entries.
        let (s0, s1) = (offset_bytes / SECTOR_BYTES, end.div_ceil(SECTOR_BYTES));
        let (first, last) = (s0 / SECTORS_PER_CHUNK, (s1 - 1) / SECTORS_PER_CHUNK);
        for (&chunk, &i) in chunks.range(first as u32..=last as u32) {
            let mask = chunk_mask(s0, s1, u64::from(chunk));
            let s = self.store.slot(i);
            if s.presence() & mask == mask && s.freq < MAX_FREQ {
                let freq = s.freq + 1;
                self.store.set_freq(i, freq);
            }
        }
    }

    /// The read path's one call: [`CacheIndex::missing`], then
    /// [`CacheIndex::touch`] (hits are judged before anything is fetched),
    /// and the read counted in the stats. Fetch the returned ranges, then
    /// [`CacheIndex::insert`] them.
    pub fn lookup(
        &mut self,
        seg: u64,
        offset_bytes: u64,
        len_bytes: u64,
        segment_len_bytes: u64,
    ) -> Vec<Range<u64>> {
        let missing = self.missing(seg, offset_bytes, len_bytes, segment_len_bytes);
        let end = offset_bytes
            .saturating_add(len_bytes)
            .min(segment_len_bytes);
        let read_bytes = end.saturating_sub(offset_bytes);
        self.touch(seg, offset_bytes, read_bytes);
        let c = &mut self.counters;
        c.lookups += 1;
        c.read_bytes += read_bytes;
        c.missing_bytes += missing.iter().map(|r| r.end - r.start).sum::<u64>();
        if missing.is_empty() {
            c.lookup_hits += 1;
        }
        missing
    }

    /// The bytes `range` of segment `seg` are now in the cache file. `range`
    /// must start on a sector boundary and end on one or at the segment's
    /// end (`segment_len_bytes`), as [`CacheIndex::missing`]'s ranges do; a
    /// partial last sector counts as present. New chunks enter the small
    /// queue, or main if their key is a ghost, or the pinned list if they
    /// overlap a pin. Does not evict: call [`CacheIndex::evict`].
    pub fn insert(&mut self, seg: u64, range: Range<u64>, segment_len_bytes: u64) {
        assert!(
            segment_len_bytes <= MAX_SEGMENT_BYTES,
            "segment {seg}: length {segment_len_bytes} over MAX_SEGMENT_BYTES"
        );
        assert!(
            range.start <= range.end && range.end <= segment_len_bytes,
            "segment {seg}: insert {range:?} outside its {segment_len_bytes} bytes"
        );
        if range.is_empty() {
            return;
        }
        assert!(
            range.start.is_multiple_of(SECTOR_BYTES)
                && (range.end.is_multiple_of(SECTOR_BYTES) || range.end == segment_len_bytes),
            "segment {seg}: insert {range:?} not sector-aligned"
        );
        let (s0, s1) = (range.start / SECTOR_BYTES, range.end.div_ceil(SECTOR_BYTES));
        for (chunk, mask) in chunk_masks(s0, s1) {
            self.insert_chunk(seg, chunk as u32, mask);
        }
    }

    fn insert_chunk(&mut self, seg: u64, chunk: u32, mask: u128) {
        if let Some(&i) = self.segments.get(&seg).and_then(|m| m.get(&chunk)) {
            self.store.add_presence(i, mask);
            return;
        }
        let queue = if self.chunk_pinned(seg, chunk) {
            Queue::Pinned
        } else if self.ghost.contains(fingerprint(seg, chunk)) {
            self.counters.ghost_hits += 1;
            Queue::Main
        } else {
            Queue::Small
        };
        let i = self.store.alloc(seg, chunk, mask, 0, queue);
        self.segments.entry(seg).or_default().insert(chunk, i);
    }

    /// Evicts until [`CacheIndex::used_bytes`] is at most the capacity, or
    /// only pinned chunks are left. Returns the evicted chunks as
    /// `(segment, the chunk's byte range)`, in eviction order, for the caller
    /// to punch; they are already gone from the index. Never returns a
    /// chunk overlapping a pin.
    pub fn evict(&mut self) -> Vec<(u64, Range<u64>)> {
        let mut out = Vec::new();
        while self.used_bytes() > self.capacity_bytes {
            let small = *self.store.list(Queue::Small);
            let main = *self.store.list(Queue::Main);
            if small.len == 0 && main.len == 0 {
                self.counters.evictions_blocked_by_pins += 1;
                break;
            }
            if main.len == 0 || small.bytes > self.small_target_bytes() {
                let i = small.head;
                let s = *self.store.slot(i);
                if s.freq > 0 {
                    self.store.set_freq(i, 0);
                    self.store.move_to_tail(i, Queue::Main);
                    self.counters.promoted_chunks += 1;
                } else {
                    let bound = self.ghost_bound();
                    self.ghost.push(fingerprint(s.seg, s.chunk), bound);
                    out.push(self.remove_entry(i));
                }
            } else {
                // Terminates: every pass over main decrements every
                // frequency, so within MAX_FREQ + 1 passes the head is 0.
                let i = main.head;
                let s = *self.store.slot(i);
                if s.freq > 0 {
                    self.store.set_freq(i, s.freq - 1);
                    self.store.move_to_tail(i, Queue::Main);
                } else {
                    out.push(self.remove_entry(i));
                }
            }
        }
        self.trim_ghost();
        assert!(
            self.used_bytes() <= self.capacity_bytes || self.used_bytes() == self.pinned_bytes(),
            "evict() stopped over capacity with unpinned data left"
        );
        out
    }

    /// Drops entry `i` from the index; returns what to punch.
    fn remove_entry(&mut self, i: u32) -> (u64, Range<u64>) {
        let s = *self.store.slot(i);
        self.counters.evicted_chunks += 1;
        self.counters.evicted_bytes += s.cost_bytes();
        let chunks = self
            .segments
            .get_mut(&s.seg)
            .expect("an entry's segment is indexed");
        let removed = chunks.remove(&s.chunk);
        assert_eq!(removed, Some(i), "index and slab disagree");
        if chunks.is_empty() {
            self.segments.remove(&s.seg);
        }
        self.store.release(i);
        let start = u64::from(s.chunk) * CHUNK_BYTES;
        (s.seg, start..start + CHUNK_BYTES)
    }

    /// The segments with anything cached, in order.
    pub fn segment_ids(&self) -> Vec<u64> {
        self.segments.keys().copied().collect()
    }

    /// The segment was deleted: drops its chunks (no punching needed, the
    /// caller deletes the file) and its pins.
    pub fn remove_segment(&mut self, seg: u64) {
        if let Some(chunks) = self.segments.remove(&seg) {
            for i in chunks.into_values() {
                self.store.release(i);
            }
        }
        self.pins.remove(&seg);
        self.trim_ghost();
    }

    /// Replaces the pin set: byte ranges that must stay resident. Chunks
    /// overlapping a pin are never evicted; chunks no longer pinned go to
    /// main's tail. Returns the sectors within the pins that are missing, as
    /// sector-aligned byte ranges (rounded out), merged, by segment, for the
    /// caller to prefetch. A range may run past the segment's end when the
    /// segment's length is not a multiple of 512: insert what the GET
    /// returned.
    pub fn set_pins(&mut self, pins: &[(u64, Range<u64>)]) -> Vec<(u64, Range<u64>)> {
        self.pins = normalize_pins(pins);
        let was_pinned: Vec<u32> = self.store.iter(Queue::Pinned).collect();
        for i in was_pinned {
            let s = *self.store.slot(i);
            if !self.chunk_pinned(s.seg, s.chunk) {
                self.store.move_to_tail(i, Queue::Main);
            }
        }
        for (seg, ranges) in &self.pins {
            let Some(chunks) = self.segments.get(seg) else {
                continue;
            };
            for r in ranges {
                let first = (r.start / CHUNK_BYTES) as u32;
                let last = ((r.end - 1) / CHUNK_BYTES) as u32;
                for (_, &i) in chunks.range(first..=last) {
                    if self.store.slot(i).queue != Queue::Pinned {
                        self.store.move_to_tail(i, Queue::Pinned);
                    }
                }
            }
        }
        self.trim_ghost();
        let mut out = Vec::new();
        for (&seg, ranges) in &self.pins {
            let mut missing = Vec::new();
            for r in ranges {
                self.missing_sectors(
                    seg,
                    r.start / SECTOR_BYTES,
                    r.end.div_ceil(SECTOR_BYTES),
                    &mut missing,
                );
            }
            out.extend(missing.into_iter().map(|r| (seg, r)));
        }
        out
    }

    /// The pin set, normalized: by segment, sorted, merged.
    pub fn pins(&self) -> Vec<(u64, Range<u64>)> {
        self.pins
            .iter()
            .flat_map(|(&seg, rs)| rs.iter().map(move |r| (seg, r.clone())))
            .collect()
    }

    fn chunk_pinned(&self, seg: u64, chunk: u32) -> bool {
        let Some(ranges) = self.pins.get(&seg) else {
            return false;
        };
        let lo = u64::from(chunk) * CHUNK_BYTES;
        let k = ranges.partition_point(|r| r.end <= lo);
        k < ranges.len() && ranges[k].start < lo + CHUNK_BYTES
    }

    /// S3-FIFO's small queue share: 10% of what pins leave of the budget.
    fn small_target_bytes(&self) -> u64 {
        let evictable = self.capacity_bytes.saturating_sub(self.pinned_bytes());
        (u128::from(evictable) * u128::from(SMALL_QUEUE_PERCENT) / 100) as u64
    }

    /// Ghost keys: as many as main holds entries, or as many full chunks as
    /// main's share of the budget, whichever is more.
    fn ghost_bound(&self) -> usize {
        let main_share_bytes =
            self.capacity_bytes - self.capacity_bytes / 100 * SMALL_QUEUE_PERCENT;
        let bound = (main_share_bytes / CHUNK_BYTES)
            .max(self.store.list(Queue::Main).len)
            .min(MAX_ENTRIES);
        bound as usize
    }

    fn trim_ghost(&mut self) {
        let bound = self.ghost_bound();
        self.ghost.trim(bound);
    }

    pub fn stats(&self) -> CacheIndexStats {
        let c = self.counters;
        let small = self.store.list(Queue::Small);
        let main = self.store.list(Queue::Main);
        let pinned = self.store.list(Queue::Pinned);
        let pin_ranges: usize = self.pins.values().map(Vec::len).sum();
        let entries = self.store.len();
        let memory_bytes_estimate = self.store.heap_bytes() as u64
            + entries * INDEX_ENTRY_BYTES_ESTIMATE
            + self.segments.len() as u64 * SEGMENT_BYTES_ESTIMATE
            + self.ghost.len() as u64 * GHOST_ENTRY_BYTES_ESTIMATE
            + pin_ranges as u64 * std::mem::size_of::<Range<u64>>() as u64;
        CacheIndexStats {
            capacity_bytes: self.capacity_bytes,
            used_bytes: self.used_bytes(),
            pinned_bytes: pinned.bytes,
            pinned_over_capacity: pinned.bytes > self.capacity_bytes,
            entries,
            segments: self.segments.len() as u64,
            small_entries: small.len,
            small_bytes: small.bytes,
            main_entries: main.len,
            main_bytes: main.bytes,
            pinned_entries: pinned.len,
            ghost_entries: self.ghost.len() as u64,
            pin_ranges: pin_ranges as u64,
            evicted_chunks: c.evicted_chunks,
            evicted_bytes: c.evicted_bytes,
            promoted_chunks: c.promoted_chunks,
            ghost_hits: c.ghost_hits,
            evictions_blocked_by_pins: c.evictions_blocked_by_pins,
            lookups: c.lookups,
            lookup_hits: c.lookup_hits,
            read_bytes: c.read_bytes,
            missing_bytes: c.missing_bytes,
            memory_bytes_estimate,
        }
    }

    /// Asserts every invariant (see the crate doc). Panics on the first one
    /// broken. Cost: linear in entries, ghost keys and pins.
    pub fn self_check(&self) {
        let live = self.store.check();
        let mut indexed = 0u64;
        for (&seg, chunks) in &self.segments {
            assert!(!chunks.is_empty(), "segment {seg}: empty chunk map kept");
            for (&chunk, &i) in chunks {
                let s = self.store.slot(i);
                assert!(
                    s.queue != Queue::Free,
                    "segment {seg} chunk {chunk}: free slot {i}"
                );
                assert_eq!(
                    (s.seg, s.chunk),
                    (seg, chunk),
                    "slot {i} indexed under another key"
                );
                assert_eq!(
                    s.queue == Queue::Pinned,
                    self.chunk_pinned(seg, chunk),
                    "segment {seg} chunk {chunk}: on {:?}, pins disagree",
                    s.queue
                );
                indexed += 1;
            }
        }
        // Distinct keys map to slots carrying those keys, so distinct slots:
        // equal counts make index and lists a bijection.
        assert_eq!(
            indexed,
            live.len() as u64,
            "index and lists disagree on the entries"
        );
        for (&seg, ranges) in &self.pins {
            assert!(!ranges.is_empty(), "segment {seg}: empty pin list kept");
            for r in ranges {
                assert!(
                    r.start < r.end && r.end <= MAX_SEGMENT_BYTES,
                    "segment {seg}: pin {r:?}"
                );
            }
            for w in ranges.windows(2) {
                assert!(
                    w[0].end < w[1].start,
                    "segment {seg}: pins {w:?} not merged"
                );
            }
        }
        assert_eq!(
            self.used_bytes(),
            self.store.list(Queue::Small).bytes
                + self.store.list(Queue::Main).bytes
                + self.store.list(Queue::Pinned).bytes
        );
        assert!(self.store.len() <= MAX_ENTRIES);
        self.ghost.check(self.ghost_bound());
    }
}

impl std::fmt::Debug for CacheIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheIndex")
            .field("stats", &self.stats())
            .finish()
    }
}

/// Groups pins by segment, drops empty ones, sorts and merges overlapping or
/// touching ones.
fn normalize_pins(pins: &[(u64, Range<u64>)]) -> BTreeMap<u64, Vec<Range<u64>>> {
    let mut by_seg: BTreeMap<u64, Vec<Range<u64>>> = BTreeMap::new();
    for (seg, r) in pins {
        assert!(
            r.end <= MAX_SEGMENT_BYTES,
            "segment {seg}: pin {r:?} past MAX_SEGMENT_BYTES"
        );
        if r.start < r.end {
            by_seg.entry(*seg).or_default().push(r.clone());
        }
    }
    for ranges in by_seg.values_mut() {
        ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
        for r in ranges.drain(..) {
            push_merged(&mut merged, r);
        }
        *ranges = merged;
    }
    by_seg
}

#[cfg(test)]
mod tests;
