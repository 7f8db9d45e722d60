//! Chunk entries in a slab, threaded on intrusive doubly-linked FIFO lists.
//!
//! Entries live in fixed blocks of [`BLOCK_SLOTS`] slots, so growing never
//! copies the whole slab and never leaves more than one block unused (a
//! `Vec` that doubles would waste up to half). Freed slots go on a free list
//! and are reused; the slab does not shrink below its high-water mark.
//! Slot numbers are `u32`, which bounds the index to [`MAX_ENTRIES`].

use crate::bits::cost_bytes;

/// "No slot": list ends and the free list's end.
pub(crate) const NIL: u32 = u32::MAX;
/// Slots per slab block (40 KiB blocks).
const BLOCK_SLOTS: usize = 1024;
/// Most chunk entries one index holds (slot numbers are `u32`, `NIL` excluded).
pub const MAX_ENTRIES: u64 = 1 << 31;

/// Which list a slot is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Queue {
    /// S3-FIFO's small FIFO: new chunks.
    Small = 0,
    /// S3-FIFO's main FIFO: chunks that were hit while in small, or came back
    /// soon after being evicted (ghost hits).
    Main = 1,
    /// Out of the eviction queues: chunks overlapping a pin.
    Pinned = 2,
    /// On the free list.
    Free = 3,
}

impl Queue {
    pub(crate) const LISTS: [Queue; 3] = [Queue::Small, Queue::Main, Queue::Pinned];
}

/// One chunk entry: 40 bytes (asserted below).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slot {
    pub(crate) seg: u64,
    /// Presence bitmap as two words (a `u128` field would force 16-byte
    /// alignment and a 48-byte slot).
    presence: [u64; 2],
    pub(crate) chunk: u32,
    prev: u32,
    next: u32,
    /// S3-FIFO access frequency, 0..=[`MAX_FREQ`](crate::MAX_FREQ).
    pub(crate) freq: u8,
    pub(crate) queue: Queue,
}

pub(crate) const SLOT_BYTES: usize = std::mem::size_of::<Slot>();
const _: () = assert!(
    SLOT_BYTES == 40,
    "the memory figures in the crate doc assume 40-byte slots"
);

impl Slot {
    const FREE: Slot = Slot {
        seg: 0,
        presence: [0, 0],
        chunk: 0,
        prev: NIL,
        next: NIL,
        freq: 0,
        queue: Queue::Free,
    };

    pub(crate) fn presence(&self) -> u128 {
        (u128::from(self.presence[1]) << 64) | u128::from(self.presence[0])
    }

    fn set_presence_bits(&mut self, p: u128) {
        self.presence = [p as u64, (p >> 64) as u64];
    }

    pub(crate) fn cost_bytes(&self) -> u64 {
        cost_bytes(self.presence())
    }
}

/// A FIFO list's ends and totals.
#[derive(Clone, Copy, Debug)]
pub(crate) struct List {
    pub(crate) head: u32,
    tail: u32,
    pub(crate) len: u64,
    /// Sum of the entries' `cost_bytes()`.
    pub(crate) bytes: u64,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
        bytes: 0,
    };
}

pub(crate) struct Store {
    blocks: Vec<Box<[Slot]>>,
    /// Slots ever handed out; every slot below is live or free.
    high_water: u32,
    free_head: u32,
    free_len: u64,
    lists: [List; 3],
}

impl Store {
    pub(crate) fn new() -> Store {
        Store {
            blocks: Vec::new(),
            high_water: 0,
            free_head: NIL,
            free_len: 0,
            lists: [List::EMPTY; 3],
        }
    }

    pub(crate) fn slot(&self, i: u32) -> &Slot {
        &self.blocks[i as usize / BLOCK_SLOTS][i as usize % BLOCK_SLOTS]
    }

    fn slot_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.blocks[i as usize / BLOCK_SLOTS][i as usize % BLOCK_SLOTS]
    }

    pub(crate) fn list(&self, q: Queue) -> &List {
        &self.lists[q as usize]
    }

    /// Live entries.
    pub(crate) fn len(&self) -> u64 {
        self.lists.iter().map(|l| l.len).sum()
    }

    /// Heap bytes held by the slab (blocks plus the block table).
    pub(crate) fn heap_bytes(&self) -> usize {
        self.blocks.len() * BLOCK_SLOTS * SLOT_BYTES
            + self.blocks.capacity() * std::mem::size_of::<Box<[Slot]>>()
    }

    /// A new entry at the tail of `q`.
    pub(crate) fn alloc(
        &mut self,
        seg: u64,
        chunk: u32,
        presence: u128,
        freq: u8,
        q: Queue,
    ) -> u32 {
        assert!(q != Queue::Free);
        assert!(presence != 0, "an entry with no sector present");
        assert!(
            self.len() < MAX_ENTRIES,
            "cache index full: {MAX_ENTRIES} entries"
        );
        let i = if self.free_head != NIL {
            let i = self.free_head;
            self.free_head = self.slot(i).next;
            self.free_len -= 1;
            i
        } else {
            let i = self.high_water;
            if i as usize / BLOCK_SLOTS == self.blocks.len() {
                self.blocks
                    .push(vec![Slot::FREE; BLOCK_SLOTS].into_boxed_slice());
            }
            self.high_water += 1;
            i
        };
        let s = self.slot_mut(i);
        *s = Slot::FREE;
        s.seg = seg;
        s.chunk = chunk;
        s.freq = freq;
        s.set_presence_bits(presence);
        self.push_back(q, i);
        i
    }

    /// Unlinks entry `i` and puts its slot on the free list.
    pub(crate) fn release(&mut self, i: u32) {
        self.unlink(i);
        let free_head = self.free_head;
        let s = self.slot_mut(i);
        *s = Slot::FREE;
        s.next = free_head;
        self.free_head = i;
        self.free_len += 1;
    }

    /// Moves entry `i` to the tail of `q` (from wherever it is).
    pub(crate) fn move_to_tail(&mut self, i: u32, q: Queue) {
        self.unlink(i);
        self.push_back(q, i);
    }

    pub(crate) fn set_freq(&mut self, i: u32, freq: u8) {
        debug_assert!(self.slot(i).queue != Queue::Free);
        self.slot_mut(i).freq = freq;
    }

    /// ORs `mask` into entry `i`'s presence, keeping its list's byte total.
    pub(crate) fn add_presence(&mut self, i: u32, mask: u128) {
        let s = self.slot_mut(i);
        let old_cost = s.cost_bytes();
        s.set_presence_bits(s.presence() | mask);
        let new_cost = s.cost_bytes();
        let q = s.queue;
        assert!(q != Queue::Free);
        self.lists[q as usize].bytes += new_cost - old_cost;
    }

    fn push_back(&mut self, q: Queue, i: u32) {
        assert!(q != Queue::Free);
        let list = self.lists[q as usize];
        let cost = {
            let s = self.slot_mut(i);
            s.queue = q;
            s.prev = list.tail;
            s.next = NIL;
            s.cost_bytes()
        };
        if list.tail == NIL {
            self.lists[q as usize].head = i;
        } else {
            self.slot_mut(list.tail).next = i;
        }
        let list = &mut self.lists[q as usize];
        list.tail = i;
        list.len += 1;
        list.bytes += cost;
    }

    fn unlink(&mut self, i: u32) {
        let Slot {
            prev, next, queue, ..
        } = *self.slot(i);
        assert!(queue != Queue::Free, "unlinking a free slot");
        let cost = self.slot(i).cost_bytes();
        if prev == NIL {
            self.lists[queue as usize].head = next;
        } else {
            self.slot_mut(prev).next = next;
        }
        if next == NIL {
            self.lists[queue as usize].tail = prev;
        } else {
            self.slot_mut(next).prev = prev;
        }
        let list = &mut self.lists[queue as usize];
        list.len -= 1;
        list.bytes -= cost;
        let s = self.slot_mut(i);
        s.prev = NIL;
        s.next = NIL;
    }

    /// Entries of `q`, head (oldest) first.
    pub(crate) fn iter(&self, q: Queue) -> impl Iterator<Item = u32> + '_ {
        let mut i = self.lists[q as usize].head;
        std::iter::from_fn(move || {
            if i == NIL {
                return None;
            }
            let cur = i;
            i = self.slot(cur).next;
            Some(cur)
        })
    }

    /// Walks every list and the free list; panics on any inconsistency.
    /// Returns the live slots.
    pub(crate) fn check(&self) -> Vec<u32> {
        assert!(self.high_water as usize <= self.blocks.len() * BLOCK_SLOTS);
        assert!(self.blocks.len() <= (self.high_water as usize).div_ceil(BLOCK_SLOTS));
        let mut seen = vec![false; self.high_water as usize];
        let mut live = Vec::new();
        for q in Queue::LISTS {
            let list = self.lists[q as usize];
            let (mut len, mut bytes, mut prev) = (0u64, 0u64, NIL);
            let mut i = list.head;
            while i != NIL {
                assert!(i < self.high_water, "slot {i} past the high-water mark");
                assert!(!seen[i as usize], "slot {i} on two lists or in a cycle");
                seen[i as usize] = true;
                let s = self.slot(i);
                assert_eq!(s.queue, q, "slot {i} on the {q:?} list says {:?}", s.queue);
                assert_eq!(s.prev, prev, "slot {i}: broken prev link");
                assert!(s.presence() != 0, "slot {i}: entry with no sector present");
                assert!(s.freq <= crate::MAX_FREQ, "slot {i}: freq {}", s.freq);
                len += 1;
                bytes += s.cost_bytes();
                live.push(i);
                prev = i;
                i = s.next;
            }
            assert_eq!(list.tail, prev, "{q:?}: tail");
            assert_eq!(list.len, len, "{q:?}: length");
            assert_eq!(list.bytes, bytes, "{q:?}: byte total");
        }
        let mut free = 0u64;
        let mut i = self.free_head;
        while i != NIL {
            assert!(i < self.high_water);
            assert!(!seen[i as usize], "slot {i} both free and listed");
            seen[i as usize] = true;
            assert_eq!(self.slot(i).queue, Queue::Free);
            free += 1;
            i = self.slot(i).next;
        }
        assert_eq!(free, self.free_len);
        assert!(seen.iter().all(|&s| s), "a slot is neither listed nor free");
        assert!(self.len() <= MAX_ENTRIES);
        live
    }
}
