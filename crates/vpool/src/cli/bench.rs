//! `vpool vol bench`: I/O against a volume through the daemon's NBD server,
//! the path a VM's I/O takes, as `rbd bench` measures an image. Each of
//! `--io-threads` threads holds its own NBD connection and keeps one
//! request in flight; writes end with a FLUSH on every connection, counted
//! in the time, so the figure is for data that is durable.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::Serialize;
use vpool_api::Client;
use vpool_nbd::client::Client as NbdClient;

use crate::nbd_target::NbdTarget;

use super::Output;
use crate::size::format_size;

/// Most threads (connections) a bench runs.
pub const MAX_THREADS: u32 = 64;
/// Largest request.
pub const MAX_IO_SIZE: u64 = 4 << 20;

/// What `vol bench` runs.
#[derive(Clone, Debug)]
pub struct BenchSpec {
    /// `read`, `write` or `readwrite`.
    pub io_type: String,
    pub io_size: u64,
    pub io_threads: u32,
    pub io_total: u64,
    /// `rand` or `seq`.
    pub io_pattern: String,
    /// Percent of reads for `readwrite`.
    pub rw_mix_read: u32,
}

/// What it measured.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub volume: String,
    pub io_type: String,
    pub io_pattern: String,
    pub io_size: u64,
    pub io_threads: u32,
    pub ops: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub bytes_per_sec: f64,
    pub latency_mean_us: f64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
}

/// `vpool vol bench VOLUME ...`.
pub(super) fn run(
    client: &Client,
    home: &Path,
    out: Output,
    name: &str,
    spec: &BenchSpec,
    force: bool,
) -> anyhow::Result<()> {
    check(spec)?;
    let info = client.volume_info(name)?;
    if spec.io_type != "read" && info.allocated_bytes > 0 && !force {
        anyhow::bail!(
            "volume {name} holds data ({}), which a write bench overwrites: bench a new volume, or give --force",
            format_size(info.allocated_bytes)
        );
    }
    let target = NbdTarget::find(client, home)?;
    let report = bench(&target, name, info.size_bytes, spec)?;
    out.emit(&report, render)
}

fn check(spec: &BenchSpec) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(spec.io_type.as_str(), "read" | "write" | "readwrite"),
        "--io-type is read, write or readwrite"
    );
    anyhow::ensure!(
        matches!(spec.io_pattern.as_str(), "rand" | "seq"),
        "--io-pattern is rand or seq"
    );
    anyhow::ensure!(
        spec.io_size >= 512 && spec.io_size <= MAX_IO_SIZE && spec.io_size.is_multiple_of(512),
        "--io-size is a multiple of 512 from 512 to {}",
        format_size(MAX_IO_SIZE)
    );
    anyhow::ensure!(
        (1..=MAX_THREADS).contains(&spec.io_threads),
        "--io-threads is 1 to {MAX_THREADS}"
    );
    anyhow::ensure!(
        spec.io_total >= spec.io_size,
        "--io-total is at least --io-size"
    );
    anyhow::ensure!(spec.rw_mix_read <= 100, "--rw-mix-read is a percentage");
    Ok(())
}

fn bench(
    target: &NbdTarget,
    name: &str,
    size: u64,
    spec: &BenchSpec,
) -> anyhow::Result<BenchReport> {
    let slots = size / spec.io_size;
    anyhow::ensure!(slots > 0, "the volume is smaller than --io-size");
    let ops_total = spec.io_total / spec.io_size;
    let next = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for _ in 0..spec.io_threads {
        conns.push(target.connect(name)?);
    }
    let started = Instant::now();
    let threads: Vec<_> = (conns.into_iter().enumerate())
        .map(|(t, conn)| {
            let (next, spec) = (Arc::clone(&next), spec.clone());
            std::thread::spawn(move || worker(conn, t as u64, &next, ops_total, slots, &spec))
        })
        .collect();
    let mut hist = Histogram::default();
    for t in threads {
        let h = t
            .join()
            .map_err(|_| anyhow::anyhow!("a bench thread panicked"))??;
        hist.merge(&h);
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    let bytes = hist.count * spec.io_size;
    Ok(BenchReport {
        volume: name.to_string(),
        io_type: spec.io_type.clone(),
        io_pattern: spec.io_pattern.clone(),
        io_size: spec.io_size,
        io_threads: spec.io_threads,
        ops: hist.count,
        bytes,
        seconds,
        ops_per_sec: hist.count as f64 / seconds,
        bytes_per_sec: bytes as f64 / seconds,
        latency_mean_us: hist.mean(),
        latency_p50_us: hist.quantile(0.50),
        latency_p99_us: hist.quantile(0.99),
        latency_max_us: hist.max,
    })
}

/// One connection's share: requests until `ops_total` are taken, then a
/// FLUSH if it wrote.
fn worker(
    mut conn: NbdClient,
    seed: u64,
    next: &AtomicU64,
    ops_total: u64,
    slots: u64,
    spec: &BenchSpec,
) -> anyhow::Result<Histogram> {
    let mut rng = StdRng::seed_from_u64(0x5eed ^ seed);
    let len = usize::try_from(spec.io_size).expect("at most MAX_IO_SIZE");
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf[..]);
    let mut hist = Histogram::default();
    let mut wrote = false;
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= ops_total {
            break;
        }
        let slot = match spec.io_pattern.as_str() {
            "seq" => i % slots,
            _ => rng.gen_range(0..slots),
        };
        let offset = slot * spec.io_size;
        let read = match spec.io_type.as_str() {
            "read" => true,
            "write" => false,
            _ => rng.gen_range(0..100) < spec.rw_mix_read,
        };
        let t = Instant::now();
        if read {
            conn.read(offset, &mut buf)?;
        } else {
            // Not all the same bytes from one write to the next.
            buf[..8].copy_from_slice(&i.to_le_bytes());
            conn.write(offset, &buf, false)?;
            wrote = true;
        }
        hist.record(t.elapsed());
    }
    if wrote {
        conn.flush()?;
    }
    conn.disconnect()?;
    Ok(hist)
}

/// Latencies in microseconds, in buckets of 1/8 of a power of two (a
/// bounded HDR histogram: 12.5 % resolution, 256 counters).
struct Histogram {
    buckets: [u64; 256],
    count: u64,
    sum_us: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            buckets: [0; 256],
            count: 0,
            sum_us: 0,
            max: 0,
        }
    }
}

impl Histogram {
    fn index(us: u64) -> usize {
        if us < 8 {
            return us as usize;
        }
        let e = 63 - u64::from(us.leading_zeros());
        let sub = (us >> (e - 3)) & 7;
        (8 + (e - 3) * 8 + sub).min(255) as usize
    }

    /// The smallest value of bucket `i`.
    fn low(i: usize) -> u64 {
        if i < 8 {
            return i as u64;
        }
        let (e, sub) = ((i - 8) / 8 + 3, (i - 8) % 8);
        (8 + sub as u64) << (e - 3)
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.max = self.max.max(us);
    }

    fn merge(&mut self, o: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
        self.count += o.count;
        self.sum_us = self.sum_us.saturating_add(o.sum_us);
        self.max = self.max.max(o.max);
    }

    fn mean(&self) -> f64 {
        self.sum_us as f64 / self.count.max(1) as f64
    }

    /// A value at or above a fraction `q` of the samples: the top of the
    /// bucket where that fraction is reached (so at most 12.5 % high,
    /// never above the largest sample).
    fn quantile(&self, q: f64) -> u64 {
        let want = ((self.count as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= want.max(1) {
                let top = match i {
                    255 => u64::MAX,
                    _ => Self::low(i + 1) - 1,
                };
                return top.min(self.max);
            }
        }
        self.max
    }
}

fn render(r: &BenchReport) -> String {
    format!(
        "bench {} {} {} x {} threads on {}: {} ops, {} in {:.2} s\n  {:.0} IOPS, {}/s\n  latency (us): mean {:.0}, p50 {}, p99 {}, max {}",
        r.io_type,
        r.io_pattern,
        format_size(r.io_size),
        r.io_threads,
        r.volume,
        r.ops,
        format_size(r.bytes),
        r.seconds,
        r.ops_per_sec,
        format_size(r.bytes_per_sec as u64),
        r.latency_mean_us,
        r.latency_p50_us,
        r.latency_p99_us,
        r.latency_max_us,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_their_values() {
        for us in [0u64, 1, 7, 8, 9, 15, 16, 100, 1000, 123_456, 60_000_000] {
            let i = Histogram::index(us);
            assert!(Histogram::low(i) <= us, "{us} in bucket {i}");
            assert!(us < Histogram::low(i + 1) || i == 255, "{us} in bucket {i}");
        }
        let mut h = Histogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        assert_eq!(h.count, 100);
        assert!((h.mean() - 50.5).abs() < 1e-9);
        let p50 = h.quantile(0.5);
        assert!((50..=56).contains(&p50), "{p50}");
        let mut same = Histogram::default();
        same.record(Duration::from_micros(100));
        assert_eq!(same.quantile(0.5), 100, "never below every sample");
        assert_eq!(h.max, 100);
    }
}
