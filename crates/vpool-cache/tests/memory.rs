//! What the index costs in memory, measured with a counting allocator (this
//! test binary's global allocator). The crate doc quotes these figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};

use vpool_cache::{CHUNK_BYTES, CacheIndex};

struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
/// Tests in this binary measure one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SEG_LEN: u64 = 32 * 1024 * 1024;
const SEG_CHUNKS: u64 = SEG_LEN / CHUNK_BYTES;
const ENTRIES: u64 = 100_000;

/// Heap bytes per entry of an index holding ENTRIES single-page chunks,
/// inserted in the order `key(i)` gives.
fn bytes_per_entry(key: impl Fn(u64) -> (u64, u64)) -> f64 {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let mut ix = CacheIndex::new(u64::MAX);
    for i in 0..ENTRIES {
        let (seg, chunk) = key(i);
        ix.insert(
            seg,
            chunk * CHUNK_BYTES..chunk * CHUNK_BYTES + 4096,
            SEG_LEN,
        );
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    assert_eq!(ix.stats().entries, ENTRIES);
    let per_entry = (after - before) as f64 / ENTRIES as f64;
    let estimate = ix.stats().memory_bytes_estimate as f64 / ENTRIES as f64;
    println!("{per_entry:.1} bytes per entry measured, {estimate:.1} estimated by stats()");
    assert!(
        (estimate - per_entry).abs() < 0.25 * per_entry,
        "stats() estimate {estimate:.1} far from measured {per_entry:.1}"
    );
    drop(ix);
    per_entry
}

#[test]
fn entry_cost_sequential() {
    let per_entry = bytes_per_entry(|i| (i / SEG_CHUNKS, i % SEG_CHUNKS));
    assert!(per_entry <= 64.0, "{per_entry:.1} bytes per entry");
}

#[test]
fn entry_cost_random_order() {
    // Every chunk of 200 segments once, in a scrambled order (a bijection
    // of 0..ENTRIES: multiply by a unit mod ENTRIES).
    let per_entry = bytes_per_entry(|i| {
        let j = (i * 7919 + 13) % ENTRIES;
        (j % 200, j / 200)
    });
    assert!(per_entry <= 64.0, "{per_entry:.1} bytes per entry");
}

#[test]
fn ghost_cost() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A budget of 10k full chunks: the ghost holds up to 9000 keys.
    let mut ix = CacheIndex::new(10_000 * CHUNK_BYTES);
    let insert = |ix: &mut CacheIndex, i: u64| {
        let c = i % SEG_CHUNKS;
        ix.insert(
            1 + i / SEG_CHUNKS,
            c * CHUNK_BYTES..(c + 1) * CHUNK_BYTES,
            SEG_LEN,
        );
        ix.evict();
    };
    for i in 0..10_000 {
        insert(&mut ix, i);
    }
    assert_eq!(ix.stats().ghost_entries, 0);
    // Entries stay at 10k (freed slots are reused), the ghost fills up.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 10_000..19_000 {
        insert(&mut ix, i);
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    assert_eq!(ix.stats().ghost_entries, 9000);
    let per_ghost = (after - before) as f64 / 9000.0;
    println!("{per_ghost:.1} bytes per ghost key");
    assert!(per_ghost <= 32.0, "{per_ghost:.1} bytes per ghost key");
    // Steady state: entries and ghost keys stay constant, so memory must not
    // grow (beyond a slab block or a map node).
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for i in 19_000..40_000 {
        insert(&mut ix, i);
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let s = ix.stats();
    assert_eq!((s.entries, s.ghost_entries), (10_000, 9000), "{s:?}");
    assert!(
        after - before < 64 * 1024,
        "grew by {} bytes in steady state",
        after - before
    );
    ix.self_check();
}
