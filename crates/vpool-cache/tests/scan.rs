//! Scan resistance: a hot set of 20% of the cache, read over and over with
//! 4 KiB reads at arbitrary offsets, while a one-time sequential scan of 10x
//! the cache streams through. S3-FIFO must keep the hot set (hit ratio over
//! 90%); the same trace through plain FIFO and LRU caches of the same size
//! (models below) loses it, which shows the test would fail if the policy
//! degenerated to either.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use vpool_cache::{CHUNK_BYTES, CacheIndex};

const CAPACITY_CHUNKS: u64 = 1024; // 64 MiB
const HOT_CHUNKS: u64 = CAPACITY_CHUNKS / 5; // 20%
const SCAN_CHUNKS: u64 = 10 * CAPACITY_CHUNKS;
/// Scan chunks read between two hot reads: a hot chunk's reuse distance is
/// then about HOT_CHUNKS * 8 = 1.6x the cache.
const SCAN_PER_HOT_READ: u64 = 8;
const SEG_LEN: u64 = 32 * 1024 * 1024;
const SEG_CHUNKS: u64 = SEG_LEN / CHUNK_BYTES;
const HOT_SEG: u64 = 1;
const FIRST_SCAN_SEG: u64 = 100;
const HOT_READ_BYTES: u64 = 4100;

#[derive(Clone, Copy, Debug)]
struct Read {
    seg: u64,
    offset: u64,
    len: u64,
    /// Counted in the hit ratio (hot reads after the warm-up).
    measured: bool,
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Warm-up: the hot set read twice in 64 KiB reads (what a VM's working set
/// looks like once established). Then the scan, with one hot read every
/// SCAN_PER_HOT_READ scan chunks; hot reads go round the hot set in a fresh
/// random order each round, at a random offset in the chunk.
fn trace() -> Vec<Read> {
    let mut rng = Rng(0x5eed_cafe_f00d_0001);
    let mut out = Vec::new();
    for _ in 0..2 {
        for c in 0..HOT_CHUNKS {
            out.push(Read {
                seg: HOT_SEG,
                offset: c * CHUNK_BYTES,
                len: CHUNK_BYTES,
                measured: false,
            });
        }
    }
    let mut round: Vec<u64> = Vec::new();
    for n in 0..SCAN_CHUNKS {
        out.push(Read {
            seg: FIRST_SCAN_SEG + n / SEG_CHUNKS,
            offset: n % SEG_CHUNKS * CHUNK_BYTES,
            len: CHUNK_BYTES,
            measured: false,
        });
        if n % SCAN_PER_HOT_READ == SCAN_PER_HOT_READ - 1 {
            if round.is_empty() {
                round = (0..HOT_CHUNKS).collect();
                for i in (1..round.len()).rev() {
                    round.swap(i, rng.below(i as u64 + 1) as usize);
                }
            }
            let c = round.pop().expect("refilled above");
            let hot_end = HOT_CHUNKS * CHUNK_BYTES;
            let offset = (c * CHUNK_BYTES + rng.below(CHUNK_BYTES)).min(hot_end - HOT_READ_BYTES);
            out.push(Read {
                seg: HOT_SEG,
                offset,
                len: HOT_READ_BYTES,
                measured: true,
            });
        }
    }
    out
}

/// Hit ratio of the measured reads: (hits, reads).
fn s3fifo_hits(trace: &[Read]) -> (u64, u64, CacheIndex) {
    let capacity_bytes = CAPACITY_CHUNKS * CHUNK_BYTES;
    let mut ix = CacheIndex::new(capacity_bytes);
    let (mut hits, mut reads) = (0, 0);
    for r in trace {
        let missing = ix.lookup(r.seg, r.offset, r.len, SEG_LEN);
        if r.measured {
            reads += 1;
            hits += u64::from(missing.is_empty());
        }
        for m in missing {
            ix.insert(r.seg, m, SEG_LEN);
        }
        ix.evict();
        assert!(ix.used_bytes() <= capacity_bytes);
    }
    ix.self_check();
    (hits, reads, ix)
}

/// A chunk-granular cache model: `access` returns whether every chunk was
/// resident, and makes them resident.
trait Model {
    fn access(&mut self, key: (u64, u64)) -> bool;
}

#[derive(Default)]
struct Fifo {
    queue: VecDeque<(u64, u64)>,
    resident: HashSet<(u64, u64)>,
}

impl Model for Fifo {
    fn access(&mut self, key: (u64, u64)) -> bool {
        if self.resident.contains(&key) {
            return true;
        }
        if self.queue.len() as u64 == CAPACITY_CHUNKS {
            let old = self.queue.pop_front().expect("full");
            self.resident.remove(&old);
        }
        self.queue.push_back(key);
        self.resident.insert(key);
        false
    }
}

#[derive(Default)]
struct Lru {
    tick: u64,
    by_age: BTreeMap<u64, (u64, u64)>,
    last_use: HashMap<(u64, u64), u64>,
}

impl Model for Lru {
    fn access(&mut self, key: (u64, u64)) -> bool {
        self.tick += 1;
        let hit = match self.last_use.insert(key, self.tick) {
            Some(old) => {
                self.by_age.remove(&old);
                true
            }
            None => false,
        };
        self.by_age.insert(self.tick, key);
        if self.last_use.len() as u64 > CAPACITY_CHUNKS {
            let (_, old) = self.by_age.pop_first().expect("non-empty");
            self.last_use.remove(&old);
        }
        hit
    }
}

fn model_hits(trace: &[Read], model: &mut dyn Model) -> (u64, u64) {
    let (mut hits, mut reads) = (0, 0);
    for r in trace {
        let mut all = true;
        for c in r.offset / CHUNK_BYTES..=(r.offset + r.len - 1) / CHUNK_BYTES {
            all &= model.access((r.seg, c));
        }
        if r.measured {
            reads += 1;
            hits += u64::from(all);
        }
    }
    (hits, reads)
}

#[test]
fn hot_set_survives_a_scan_of_ten_times_the_cache() {
    let trace = trace();
    let (hits, reads, ix) = s3fifo_hits(&trace);
    let s3 = hits as f64 / reads as f64;
    let (fifo_hits, fifo_reads) = model_hits(&trace, &mut Fifo::default());
    let fifo = fifo_hits as f64 / fifo_reads as f64;
    let (lru_hits, lru_reads) = model_hits(&trace, &mut Lru::default());
    let lru = lru_hits as f64 / lru_reads as f64;
    let stats = ix.stats();
    println!(
        "hot-set hit ratio over {reads} reads: S3-FIFO {s3:.3}, FIFO {fifo:.3}, LRU {lru:.3}; {stats:?}"
    );
    assert!(s3 > 0.90, "S3-FIFO hot-set hit ratio {s3:.3}");
    assert!(
        fifo < 0.5,
        "FIFO model hit ratio {fifo:.3}: the trace does not separate policies"
    );
    assert!(
        lru < 0.5,
        "LRU model hit ratio {lru:.3}: the trace does not separate policies"
    );
    // The scan went through the small queue: nothing of it was promoted.
    assert!(stats.promoted_chunks <= 2 * HOT_CHUNKS, "{stats:?}");
    assert!(stats.main_entries <= HOT_CHUNKS + 1, "{stats:?}");
}
