//! In-process benchmarks of the engine, for `bench/engine.sh`.
//!
//! Each subcommand prints one JSON object on stdout, so the shell driver can
//! put the figures beside fio's from the same run. Nothing here is a test:
//! timings are measured, never asserted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rand::{Rng, SeedableRng, rngs::StdRng};
use vpool_engine::store::LocalDirStore;
use vpool_engine::{BLOCK_SIZE, Pool, PoolConfig};

/// Counts live heap bytes, to measure metadata memory per mapped block.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Writes into a volume of a local pool and reports throughput.
    Write {
        #[arg(long)]
        pool: std::path::PathBuf,
        /// randwrite (4 KiB random) or seqwrite (1 MiB sequential)
        #[arg(long)]
        pattern: String,
        #[arg(long, default_value_t = 1 << 30)]
        size_bytes: u64,
        /// Bytes to write in all.
        #[arg(long, default_value_t = 256 << 20)]
        total_bytes: u64,
        /// Flush after this many writes (0: only at the end).
        #[arg(long, default_value_t = 32)]
        flush_every: u64,
        /// After the last flush, print the result and wait to be killed
        /// (SIGKILL) instead of closing the pool.
        #[arg(long)]
        wait_for_kill: bool,
    },
    /// Opens a pool and reports how long recovery took.
    Recover {
        #[arg(long)]
        pool: std::path::PathBuf,
    },
    /// Heap bytes of metadata per mapped block, for random and sequential data.
    Memory {
        #[arg(long, default_value_t = 1_000_000)]
        blocks: u64,
    },
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Write {
            pool,
            pattern,
            size_bytes,
            total_bytes,
            flush_every,
            wait_for_kill,
        } => write(
            &pool,
            &pattern,
            size_bytes,
            total_bytes,
            flush_every,
            wait_for_kill,
        ),
        Cmd::Recover { pool } => {
            let t = Instant::now();
            let store = LocalDirStore::open(&pool).context("opening the pool")?;
            let (p, report) = Pool::open(Arc::new(store), PoolConfig::default())?;
            let secs = t.elapsed().as_secs_f64();
            let stats = p.stats();
            println!(
                "{{\"recovery_seconds\": {secs:.3}, \"records_replayed\": {}, \"bytes_replayed\": {}, \"torn_tail_bytes\": {}, \"extents\": {}}}",
                report.records_replayed,
                report.bytes_replayed,
                report.torn_tail_bytes,
                stats.extents
            );
            Ok(())
        }
        Cmd::Memory { blocks } => memory(blocks),
    }
}

fn write(
    dir: &std::path::Path,
    pattern: &str,
    size_bytes: u64,
    total_bytes: u64,
    flush_every: u64,
    wait_for_kill: bool,
) -> Result<()> {
    let store = LocalDirStore::open(dir).context("opening the pool")?;
    let (pool, _) = Pool::open(Arc::new(store), PoolConfig::default())?;
    if pool.volume("bench").is_err() {
        pool.create_volume("bench", size_bytes)?;
    }
    let vol = pool.volume("bench")?;
    let (bs, random) = match pattern {
        "randwrite" => (4096u64, true),
        "seqwrite" => (1 << 20, false),
        other => anyhow::bail!("unknown pattern {other}: use randwrite or seqwrite"),
    };
    let mut rng = StdRng::seed_from_u64(7);
    let mut buf = vec![0u8; bs as usize];
    rng.fill(&mut buf[..]);
    let n = total_bytes / bs;
    let slots = size_bytes / bs;
    let t = Instant::now();
    for i in 0..n {
        let off = if random {
            rng.gen_range(0..slots) * bs
        } else {
            (i % slots) * bs
        };
        // Vary the data a little so nothing can be deduplicated.
        buf[..8].copy_from_slice(&i.to_le_bytes());
        vol.write(off, &buf)?;
        if flush_every > 0 && (i + 1) % flush_every == 0 {
            pool.flush()?;
        }
    }
    pool.flush()?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"pattern\": \"{pattern}\", \"ops\": {n}, \"seconds\": {secs:.3}, \"iops\": {:.0}, \"mb_per_s\": {:.1}}}",
        n as f64 / secs,
        (n * bs) as f64 / secs / 1e6
    );
    if wait_for_kill {
        use std::io::Write;
        std::io::stdout().flush()?;
        loop {
            std::thread::park();
        }
    }
    pool.close()?;
    Ok(())
}

fn memory(blocks: u64) -> Result<()> {
    let mut out = Vec::new();
    for (name, random) in [("random_4k", true), ("sequential_1m", false)] {
        // A local pool keeps data on disk, so heap growth is metadata.
        let dir = std::env::temp_dir().join(format!("vpool-mem-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = LocalDirStore::open(&dir)?;
        let config = PoolConfig {
            background: false,
            ..PoolConfig::default()
        };
        let (pool, _) = Pool::open(Arc::new(store), config)?;
        let size = blocks * 4 * BLOCK_SIZE;
        pool.create_volume("m", size)?;
        let vol = pool.volume("m")?;
        let mut rng = StdRng::seed_from_u64(1);
        let block = vec![0x5Au8; BLOCK_SIZE as usize];
        let mib = vec![0x5Au8; 1 << 20];
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        if random {
            for _ in 0..blocks {
                vol.write(rng.gen_range(0..blocks * 4) * BLOCK_SIZE, &block)?;
            }
        } else {
            for i in 0..blocks / 256 {
                vol.write(i * (1 << 20), &mib)?;
            }
        }
        let grown = LIVE_BYTES.load(Ordering::Relaxed) - before;
        let info = pool.volume_info("m")?;
        let mapped_blocks = info.allocated_bytes / BLOCK_SIZE;
        out.push(format!(
            "\"{name}\": {{\"mapped_blocks\": {mapped_blocks}, \"extents\": {}, \"heap_growth_bytes\": {grown}, \"bytes_per_mapped_block\": {:.2}, \"bytes_per_extent\": {:.1}}}",
            info.extents,
            grown as f64 / mapped_blocks.max(1) as f64,
            grown as f64 / info.extents.max(1) as f64
        ));
        drop((vol, pool));
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{{{}}}", out.join(", "));
    Ok(())
}
