//! The layered device against a model (a byte image that starts as the
//! base's content), on real engine volumes; and copy-ups racing on one
//! block.

use super::*;
use crate::catalog::Catalog;
use crate::exports::PoolExports;
use proptest::prelude::*;
use vpool_engine::{Pool, PoolConfig};
use vpool_nbd::ExportRegistry;
use vpool_store::{LocalDirStore, SegmentStore};

const BASE_BLOCKS: u64 = 16;
/// The clone is larger than its base: past the base's end it reads zeros.
const TOP_BLOCKS: u64 = 20;
const SECTOR: u64 = 512;

/// A pool in `dir` with volumes `base` (every other block written with
/// `base_byte(block)`, the rest holes) and an empty `top`; their devices.
fn devices(dir: &std::path::Path) -> (Arc<dyn BlockDevice>, Arc<dyn BlockDevice>, Pool) {
    let store: Arc<dyn SegmentStore> = Arc::new(LocalDirStore::open(dir).unwrap());
    let config = PoolConfig {
        background: false,
        ..PoolConfig::default()
    };
    let (pool, _) = Pool::open(Arc::clone(&store), config).unwrap();
    let catalog = Arc::new(Catalog::open(store).unwrap());
    pool.create_volume("base", BASE_BLOCKS * BLOCK_SIZE)
        .unwrap();
    pool.create_volume("top", TOP_BLOCKS * BLOCK_SIZE).unwrap();
    let exports = PoolExports::new(pool.clone(), catalog);
    let base = exports.open("base").unwrap();
    for b in (0..BASE_BLOCKS).step_by(2) {
        base.write(b * BLOCK_SIZE, &[base_byte(b); BLOCK_SIZE as usize])
            .unwrap();
    }
    let top = exports.open("top").unwrap();
    (top, base, pool)
}

fn base_byte(block: u64) -> u8 {
    0x10 + block as u8
}

/// The clone's content before any write: the base's, zeros past it.
fn initial_image() -> Vec<u8> {
    let mut img = vec![0u8; (TOP_BLOCKS * BLOCK_SIZE) as usize];
    for b in (0..BASE_BLOCKS).step_by(2) {
        let s = (b * BLOCK_SIZE) as usize;
        img[s..s + BLOCK_SIZE as usize].fill(base_byte(b));
    }
    img
}

#[derive(Clone, Debug)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        byte: u8,
    },
    Trim {
        sector: u64,
        sectors: u64,
    },
    Zero {
        sector: u64,
        sectors: u64,
        may_trim: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let total = TOP_BLOCKS * BLOCK_SIZE / SECTOR;
    let range = (0..total).prop_flat_map(move |s| (Just(s), 1..=(total - s).min(40)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), byte)| Op::Write { sector, sectors, byte }),
        1 => range.clone().prop_map(|(sector, sectors)| Op::Trim { sector, sectors }),
        1 => (range, any::<bool>()).prop_map(|((sector, sectors), may_trim)| Op::Zero { sector, sectors, may_trim }),
    ]
}

/// Applies `op` to the model: what the device must read afterwards.
fn apply(model: &mut [u8], op: &Op) {
    match *op {
        Op::Write {
            sector,
            sectors,
            byte,
        } => {
            let (s, e) = (
                (sector * SECTOR) as usize,
                ((sector + sectors) * SECTOR) as usize,
            );
            model[s..e].fill(byte);
        }
        Op::Trim { sector, sectors } => {
            // Whole blocks inside the range read as zeros; edges stay.
            let first = (sector * SECTOR).div_ceil(BLOCK_SIZE);
            let end = (sector + sectors) * SECTOR / BLOCK_SIZE;
            for b in first..end.max(first) {
                let s = (b * BLOCK_SIZE) as usize;
                model[s..s + BLOCK_SIZE as usize].fill(0);
            }
        }
        Op::Zero {
            sector, sectors, ..
        } => {
            let (s, e) = (
                (sector * SECTOR) as usize,
                ((sector + sectors) * SECTOR) as usize,
            );
            model[s..e].fill(0);
        }
    }
}

fn run(dev: &LayeredDevice, op: &Op) {
    match *op {
        Op::Write {
            sector,
            sectors,
            byte,
        } => dev
            .write(sector * SECTOR, &vec![byte; (sectors * SECTOR) as usize])
            .unwrap(),
        Op::Trim { sector, sectors } => dev.trim(sector * SECTOR, sectors * SECTOR).unwrap(),
        Op::Zero {
            sector,
            sectors,
            may_trim,
        } => dev
            .write_zeroes(sector * SECTOR, sectors * SECTOR, may_trim)
            .unwrap(),
    }
}

/// The device's block status agrees with the model: a range said to read
/// as zeros does.
fn check_status(dev: &LayeredDevice, model: &[u8]) {
    let mut at = 0u64;
    let size = model.len() as u64;
    while at < size {
        for (n, flags) in dev.block_status(at, size - at).unwrap() {
            assert!(n > 0 && at + n <= size, "extent {n} at {at}");
            if flags & STATE_ZERO != 0 {
                let r = &model[at as usize..(at + n) as usize];
                assert!(r.iter().all(|&b| b == 0), "{n} bytes at {at} said zero");
            }
            at += n;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_clone_reads_as_its_base_with_its_own_writes_over_it(ops in proptest::collection::vec(op(), 1..24)) {
        let t = tempfile::tempdir().unwrap();
        let (top, base, _pool) = devices(t.path());
        let locks = CopyUpLocks::new();
        let dev = LayeredDevice::new(Arc::clone(&top), base, Arc::clone(&locks));
        let mut model = initial_image();
        let mut got = vec![0u8; model.len()];
        dev.read(0, &mut got).unwrap();
        prop_assert!(got == model, "before any write");
        for op in &ops {
            run(&dev, op);
            apply(&mut model, op);
            dev.read(0, &mut got).unwrap();
            prop_assert!(got == model, "after {:?}", op);
            check_status(&dev, &model);
        }
        // Unaligned reads too.
        let mut piece = vec![0u8; 3 * SECTOR as usize];
        dev.read(5 * SECTOR, &mut piece).unwrap();
        prop_assert!(piece[..] == model[(5 * SECTOR) as usize..(8 * SECTOR) as usize]);
        // Flattened, the top alone is the image; and the device goes on
        // as a plain one (a trim unmaps: zeros, not the base).
        dev.copy_up_all().unwrap();
        top.read(0, &mut got).unwrap();
        prop_assert!(got == model, "the top alone after the flatten");
        prop_assert_eq!(dev.copy_up_all().unwrap(), 0, "a second flatten copies nothing");
        locks.set_flattened();
        dev.read(0, &mut got).unwrap();
        prop_assert!(got == model, "through the flattened device");
        dev.trim(0, model.len() as u64).unwrap();
        dev.read(0, &mut got).unwrap();
        prop_assert!(got.iter().all(|&b| b == 0), "a trim of a flattened clone reads zeros");
    }
}

/// A flatten while a client writes parts of unmapped blocks: afterwards
/// the top alone reads as the layered device does. (Repeated: the race is
/// short.)
#[test]
fn a_flatten_racing_writes_leaves_the_top_whole() {
    for _ in 0..10 {
        flatten_racing_writes();
    }
}

fn flatten_racing_writes() {
    let t = tempfile::tempdir().unwrap();
    let (top, base, _pool) = devices(t.path());
    let locks = CopyUpLocks::new();
    let dev = Arc::new(LayeredDevice::new(
        Arc::clone(&top),
        base,
        Arc::clone(&locks),
    ));
    let writer = {
        let dev = Arc::clone(&dev);
        std::thread::spawn(move || {
            for round in 0..4u64 {
                for b in (0..BASE_BLOCKS).rev() {
                    let sector = (b + round) % (BLOCK_SIZE / SECTOR);
                    dev.write(
                        b * BLOCK_SIZE + sector * SECTOR,
                        &[0xe0 + round as u8; SECTOR as usize],
                    )
                    .unwrap();
                }
            }
        })
    };
    let copied = dev.copy_up_all().unwrap();
    writer.join().unwrap();
    assert!(copied <= BASE_BLOCKS / 2 * BLOCK_SIZE, "copied {copied}");
    let size = (TOP_BLOCKS * BLOCK_SIZE) as usize;
    let (mut layered, mut alone) = (vec![0u8; size], vec![0u8; size]);
    // Every write landed, whichever of it and the flatten's copy came
    // first.
    let mut want = initial_image();
    for round in 0..4u64 {
        for b in 0..BASE_BLOCKS {
            let at = (b * BLOCK_SIZE + (b + round) % (BLOCK_SIZE / SECTOR) * SECTOR) as usize;
            want[at..at + SECTOR as usize].fill(0xe0 + round as u8);
        }
    }
    dev.read(0, &mut layered).unwrap();
    assert!(layered == want, "a write was lost");
    top.read(0, &mut alone).unwrap();
    assert!(alone == want, "the top misses what the base gave");
    locks.set_flattened();
    dev.read(0, &mut alone).unwrap();
    assert!(layered == alone);
}

/// Two writers, each on a device of its own (two NBD connections), copy
/// the same unmapped blocks up at once, each its own sectors: both land,
/// and the rest of each block is the base's.
#[test]
fn concurrent_copy_ups_of_one_block_keep_both_writes() {
    let t = tempfile::tempdir().unwrap();
    let (top, base, _pool) = devices(t.path());
    let locks = CopyUpLocks::new();
    let dev = Arc::new(LayeredDevice::new(
        Arc::clone(&top),
        Arc::clone(&base),
        Arc::clone(&locks),
    ));
    let other = Arc::new(LayeredDevice::new(top, base, locks));
    let blocks: Vec<u64> = (0..BASE_BLOCKS).step_by(2).collect();
    let writers: Vec<_> = [(0u64, 0xa1u8, &dev), (3, 0xb2, &other)]
        .into_iter()
        .map(|(sector, byte, dev)| {
            let dev = Arc::clone(dev);
            let blocks = blocks.clone();
            std::thread::spawn(move || {
                for b in blocks {
                    dev.write(b * BLOCK_SIZE + sector * SECTOR, &[byte; SECTOR as usize])
                        .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    for b in blocks {
        let mut got = vec![0u8; BLOCK_SIZE as usize];
        dev.read(b * BLOCK_SIZE, &mut got).unwrap();
        for (i, chunk) in got.chunks(SECTOR as usize).enumerate() {
            let want = match i {
                0 => 0xa1,
                3 => 0xb2,
                _ => base_byte(b),
            };
            assert!(chunk.iter().all(|&x| x == want), "block {b} sector {i}");
        }
    }
}

/// A flatten lets every device of the clone go of the base's device, even
/// one no request came to since (an idle client's), and a device made
/// after it never holds it.
#[test]
fn a_flatten_lets_idle_devices_go_of_the_base() {
    let t = tempfile::tempdir().unwrap();
    let (top, base, _pool) = devices(t.path());
    let locks = CopyUpLocks::new();
    let idle = LayeredDevice::new(Arc::clone(&top), Arc::clone(&base), Arc::clone(&locks));
    let busy = LayeredDevice::new(Arc::clone(&top), Arc::clone(&base), Arc::clone(&locks));
    assert_eq!(Arc::strong_count(&base), 3);
    busy.copy_up_all().unwrap();
    {
        let held = locks.quiesce();
        assert_eq!(busy.copy_up_all_quiesced(&held).unwrap(), 0);
        locks.set_flattened();
    }
    assert_eq!(Arc::strong_count(&base), 1, "a device still holds the base");
    let late = LayeredDevice::new(Arc::clone(&top), Arc::clone(&base), Arc::clone(&locks));
    assert_eq!(Arc::strong_count(&base), 1);
    let mut a = vec![0u8; (TOP_BLOCKS * BLOCK_SIZE) as usize];
    let mut b = a.clone();
    idle.read(0, &mut a).unwrap();
    late.read(0, &mut b).unwrap();
    assert!(a == initial_image() && b == a);
}
