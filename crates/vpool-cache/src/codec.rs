//! The persisted form of a [`CacheIndex`].
//!
//! ```text
//! offset  size  field
//!      0     8  magic "VPCACHE1"
//!      8     4  version (1)
//!     12     4  reserved, 0
//!     16     8  total length in bytes, checksum included
//!     24     8  entry count E
//!     32     8  pin count P
//!     40  29*E  entries, in queue order: small head..tail, main, pinned
//!                 segment u64, chunk number u32,
//!                 meta u8 (bits 0-1 frequency, bits 2-3 queue: 0 small,
//!                 1 main, 2 pinned; other bits 0),
//!                 presence u128 (bit i = sector i of the chunk), non-zero
//!      .  24*P  pins, sorted by (segment, start), merged:
//!                 segment u64, start u64, end u64
//!    L-4     4  CRC-32C of bytes [0, L-4)
//! ```
//!
//! All integers little-endian. The ghost is not persisted (a restart
//! forgets which chunks were evicted recently, nothing else).
//!
//! The decoder checks, in order: length, magic, version, length field,
//! checksum, counts against the length (before allocating anything), then
//! every entry and pin. It accepts only what `encode` produces: pins sorted
//! and merged, entries grouped by queue in queue order, each key once, an
//! entry on the pinned list exactly when it overlaps a pin. So
//! `encode(decode(x)) == x`.

use std::collections::BTreeMap;
use std::ops::Range;

use crate::ghost::Ghost;
use crate::store::{MAX_ENTRIES, Queue, Store};
use crate::{CacheIndex, Counters, MAX_FREQ, MAX_SEGMENT_BYTES};

/// "VPCACHE1"
pub const CACHE_INDEX_MAGIC: [u8; 8] = *b"VPCACHE1";
pub const CACHE_INDEX_VERSION: u32 = 1;
const HEADER_BYTES: usize = 40;
const ENTRY_BYTES: usize = 8 + 4 + 1 + 16;
const PIN_BYTES: usize = 24;
const CRC_BYTES: usize = 4;

/// Why [`CacheIndex::decode`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("too short: {len_bytes} bytes, a header and checksum take {}", HEADER_BYTES + CRC_BYTES)]
    TooShort { len_bytes: usize },
    #[error("bad magic (not a cache index)")]
    BadMagic,
    #[error("unsupported version {0} (this build reads {CACHE_INDEX_VERSION})")]
    UnsupportedVersion(u32),
    #[error("reserved header field is {0:#x}, not 0")]
    Reserved(u32),
    #[error("length field says {stated_bytes} bytes, input has {actual_bytes}")]
    LengthMismatch {
        stated_bytes: u64,
        actual_bytes: u64,
    },
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("{entries} entries and {pins} pins do not fill {len_bytes} bytes")]
    CountMismatch {
        entries: u64,
        pins: u64,
        len_bytes: u64,
    },
    #[error("{0} entries, more than MAX_ENTRIES ({MAX_ENTRIES})")]
    TooManyEntries(u64),
    #[error("entry {index}: {reason}")]
    BadEntry { index: u64, reason: &'static str },
    #[error("pin {index}: {reason}")]
    BadPin { index: u64, reason: &'static str },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn u128_at(b: &[u8], at: usize) -> u128 {
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(w)
}

fn queue_code(q: Queue) -> u8 {
    match q {
        Queue::Small => 0,
        Queue::Main => 1,
        Queue::Pinned => 2,
        Queue::Free => unreachable!("free slots are not encoded"),
    }
}

impl CacheIndex {
    /// The persisted form (format in the `codec` module doc).
    pub fn encode(&self) -> Vec<u8> {
        let entries = self.store.len();
        let pins = self.pins();
        let len =
            HEADER_BYTES + entries as usize * ENTRY_BYTES + pins.len() * PIN_BYTES + CRC_BYTES;
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&CACHE_INDEX_MAGIC);
        out.extend_from_slice(&CACHE_INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for v in [len as u64, entries, pins.len() as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for q in Queue::LISTS {
            for i in self.store.iter(q) {
                let s = self.store.slot(i);
                out.extend_from_slice(&s.seg.to_le_bytes());
                out.extend_from_slice(&s.chunk.to_le_bytes());
                out.push(s.freq | queue_code(q) << 2);
                out.extend_from_slice(&s.presence().to_le_bytes());
            }
        }
        for (seg, r) in &pins {
            for v in [*seg, r.start, r.end] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(out.len(), len);
        out
    }

    /// Rebuilds an index from [`CacheIndex::encode`]'s output, with budget
    /// `capacity_bytes` (not applied: call [`CacheIndex::evict`]). Refuses
    /// anything else with an error; never panics.
    pub fn decode(bytes: &[u8], capacity_bytes: u64) -> Result<CacheIndex, DecodeError> {
        let len_bytes = bytes.len();
        if len_bytes < HEADER_BYTES + CRC_BYTES {
            return Err(DecodeError::TooShort { len_bytes });
        }
        if bytes[0..8] != CACHE_INDEX_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = u32_at(bytes, 8);
        if version != CACHE_INDEX_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let reserved = u32_at(bytes, 12);
        if reserved != 0 {
            return Err(DecodeError::Reserved(reserved));
        }
        let stated_bytes = u64_at(bytes, 16);
        if stated_bytes != len_bytes as u64 {
            return Err(DecodeError::LengthMismatch {
                stated_bytes,
                actual_bytes: len_bytes as u64,
            });
        }
        let body = &bytes[..len_bytes - CRC_BYTES];
        let stored = u32_at(bytes, len_bytes - CRC_BYTES);
        let computed = crc32c::crc32c(body);
        if stored != computed {
            return Err(DecodeError::Checksum { stored, computed });
        }
        let entries = u64_at(bytes, 24);
        let pins = u64_at(bytes, 32);
        let fits = entries
            .checked_mul(ENTRY_BYTES as u64)
            .and_then(|e| {
                pins.checked_mul(PIN_BYTES as u64)
                    .and_then(|p| e.checked_add(p))
            })
            .and_then(|n| n.checked_add((HEADER_BYTES + CRC_BYTES) as u64));
        if fits != Some(len_bytes as u64) {
            return Err(DecodeError::CountMismatch {
                entries,
                pins,
                len_bytes: len_bytes as u64,
            });
        }
        if entries > MAX_ENTRIES {
            return Err(DecodeError::TooManyEntries(entries));
        }
        // Counts are now bounded by the input's length.
        let entries_at = HEADER_BYTES;
        let pins_at = entries_at + entries as usize * ENTRY_BYTES;

        let mut pin_map: BTreeMap<u64, Vec<Range<u64>>> = BTreeMap::new();
        let mut prev: Option<(u64, u64)> = None;
        for index in 0..pins {
            let at = pins_at + index as usize * PIN_BYTES;
            let (seg, start, end) = (
                u64_at(body, at),
                u64_at(body, at + 8),
                u64_at(body, at + 16),
            );
            let bad = |reason| DecodeError::BadPin { index, reason };
            if start >= end {
                return Err(bad("empty or reversed range"));
            }
            if end > MAX_SEGMENT_BYTES {
                return Err(bad("ends past MAX_SEGMENT_BYTES"));
            }
            if let Some((prev_seg, prev_end)) = prev
                && (seg < prev_seg || (seg == prev_seg && start <= prev_end))
            {
                return Err(bad("not sorted and merged"));
            }
            prev = Some((seg, end));
            pin_map.entry(seg).or_default().push(start..end);
        }

        let mut ix = CacheIndex {
            capacity_bytes,
            store: Store::new(),
            segments: BTreeMap::new(),
            pins: pin_map,
            ghost: Ghost::default(),
            counters: Counters::default(),
        };
        let mut prev_queue = Queue::Small;
        for index in 0..entries {
            let at = entries_at + index as usize * ENTRY_BYTES;
            let bad = |reason| DecodeError::BadEntry { index, reason };
            let seg = u64_at(body, at);
            let chunk = u32_at(body, at + 8);
            let meta = body[at + 12];
            let presence = u128_at(body, at + 13);
            let freq = meta & 3;
            let queue = match (meta >> 2) & 3 {
                0 => Queue::Small,
                1 => Queue::Main,
                2 => Queue::Pinned,
                _ => return Err(bad("unknown queue")),
            };
            if meta >> 4 != 0 {
                return Err(bad("reserved bits set"));
            }
            debug_assert!(freq <= MAX_FREQ);
            if presence == 0 {
                return Err(bad("no sector present"));
            }
            if (queue as u8) < (prev_queue as u8) {
                return Err(bad("queues out of order"));
            }
            prev_queue = queue;
            if (queue == Queue::Pinned) != ix.chunk_pinned(seg, chunk) {
                return Err(bad("pinned flag disagrees with the pins"));
            }
            let chunks = ix.segments.entry(seg).or_default();
            if chunks.contains_key(&chunk) {
                return Err(bad("duplicate chunk"));
            }
            let i = ix.store.alloc(seg, chunk, presence, freq, queue);
            chunks.insert(chunk, i);
        }
        Ok(ix)
    }
}
