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
    /// Snapshot and clone costs: creation latency (p50/p99) on a volume
    /// with data written, reads through a deep clone chain and after many
    /// snapshots as a ratio to a plain volume, and 100 clones of a template.
    Snapshots {
        #[arg(long)]
        pool: std::path::PathBuf,
        /// GiB written (1 MiB sequential) before timing snapshot creation.
        #[arg(long, default_value_t = 1)]
        written_gib: u64,
        /// Also write this many random 4 KiB blocks (more extents).
        #[arg(long, default_value_t = 100_000)]
        random_writes: u64,
        /// Snapshots to take (timed), then read through.
        #[arg(long, default_value_t = 1000)]
        snapshots: u64,
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
        Cmd::Snapshots {
            pool,
            written_gib,
            random_writes,
            snapshots: count,
        } => snapshots(&pool, written_gib, random_writes, count),
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// 4 KiB random reads of `vol` for a fixed count; returns reads per second.
fn random_read_rate(vol: &vpool_engine::Volume, size: u64, count: u64) -> Result<f64> {
    let mut rng = StdRng::seed_from_u64(3);
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    let t = Instant::now();
    for _ in 0..count {
        vol.read(rng.gen_range(0..size / BLOCK_SIZE) * BLOCK_SIZE, &mut buf)?;
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

fn snapshots(
    dir: &std::path::Path,
    written_gib: u64,
    random_writes: u64,
    count: u64,
) -> Result<()> {
    let store = LocalDirStore::open(dir).context("opening the pool")?;
    let (pool, _) = Pool::open(Arc::new(store), PoolConfig::default())?;
    let size = (written_gib.max(1)) << 30;
    pool.create_volume("big", size)?;
    let vol = pool.volume("big")?;
    let mib = vec![0x6Bu8; 1 << 20];
    for i in 0..(written_gib << 10) {
        vol.write(i << 20, &mib)?;
    }
    let mut rng = StdRng::seed_from_u64(5);
    let block = vec![0x3Cu8; BLOCK_SIZE as usize];
    // Every offset written, so the plain twin gets the very same layout.
    let mut offsets = Vec::new();
    for _ in 0..random_writes {
        let off = rng.gen_range(0..size / BLOCK_SIZE) * BLOCK_SIZE;
        vol.write(off, &block)?;
        offsets.push(off);
    }
    pool.flush()?;
    let extents = pool.volume_info("big")?.extents;
    // Snapshot creation: the call returns when the snapshot is durable.
    let mut lat_us = Vec::new();
    for i in 0..count {
        let off = rng.gen_range(0..size / BLOCK_SIZE) * BLOCK_SIZE;
        vol.write(off, &block)?;
        offsets.push(off);
        let t = Instant::now();
        pool.create_snapshot("big", &format!("s{i}"))?;
        lat_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat_us.sort_by(f64::total_cmp);
    // Space accounting (`vol info`, `snap list`): exclusive and shared bytes
    // of the volume and every snapshot, beside the brute-force oracle (the
    // algorithm before, O(images^2 x extents); only where it ends soon).
    let t = Instant::now();
    pool.volume_space("big")?;
    let space_ms = t.elapsed().as_secs_f64() * 1e3;
    let brute_ms = if count * extents <= 50_000_000 {
        let t = Instant::now();
        pool.volume_space_brute_force("big")?;
        t.elapsed().as_secs_f64() * 1e3
    } else {
        f64::NAN
    };
    // Reads after `count` snapshots vs a plain volume of the same layout.
    pool.create_volume("plain", 64 << 20)?;
    pool.create_volume("c0", 64 << 20)?;
    for name in ["plain", "c0"] {
        let v = pool.volume(name)?;
        for i in 0..64u64 {
            v.write(i << 20, &mib)?;
        }
    }
    let mut parent = "c0".to_string();
    for depth in 1..=100 {
        let child = format!("c{depth}");
        pool.create_snapshot(&parent, "base")?;
        pool.clone_volume(&parent, "base", &child)?;
        parent = child;
    }
    let plain = pool.volume("plain")?;
    let deep = pool.volume("c100")?;
    let n = 200_000;
    let (mut plain_r, mut deep_r) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        plain_r.push(random_read_rate(&plain, 64 << 20, n)?);
        deep_r.push(random_read_rate(&deep, 64 << 20, n)?);
    }
    // The plain twin doubles the disk used: only for small runs.
    let snapshots_vs_plain = if written_gib <= 4 {
        pool.create_volume("plainbig", size)?;
        let v = pool.volume("plainbig")?;
        for i in 0..(written_gib << 10) {
            v.write(i << 20, &mib)?;
        }
        for &off in &offsets {
            v.write(off, &block)?;
        }
        // Alternate the two (A B A B A B): this machine drifts.
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            a.push(random_read_rate(&vol, size, n)?);
            b.push(random_read_rate(&v, size, n)?);
        }
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        a[1] / b[1]
    } else {
        f64::NAN
    };
    // 100 clones of a template (a sealed snapshot of a 64 MiB image).
    pool.create_snapshot("plain", "template")?;
    let before = pool.stats().physical_bytes;
    let t = Instant::now();
    for i in 0..100 {
        pool.clone_volume("plain", "template", &format!("vm{i}"))?;
    }
    let clone_secs = t.elapsed().as_secs_f64();
    let after = pool.stats().physical_bytes;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{{\"written_gib\": {written_gib}, \"extents\": {extents}, \"snapshot_create_us_p50\": {:.0}, \"snapshot_create_us_p99\": {:.0}, \"read_ratio_clone_depth_100_vs_plain\": {:.2}, \"snapshots\": {count}, \"read_ratio_after_snapshots_vs_plain\": {:.2}, \"clones_100_seconds\": {clone_secs:.3}, \"clones_100_new_bytes\": {}, \"space_ms\": {space_ms:.1}, \"space_brute_force_ms\": {brute_ms:.1}}}",
        percentile(&lat_us, 0.5),
        percentile(&lat_us, 0.99),
        median(&mut deep_r) / median(&mut plain_r),
        snapshots_vs_plain,
        after.saturating_sub(before)
    );
    pool.close()?;
    Ok(())
}
