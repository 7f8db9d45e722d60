//! `vpool vol iostat`: per-volume NBD I/O rates from two samples of the
//! daemon's counters (`GET /v1/io`), as `rbd perf image iostat` shows
//! them.

use std::time::{Duration, Instant};

use serde::Serialize;
use vpool_api::{Client, VolumeIo};

use super::Output;

/// One volume over one interval.
#[derive(Debug, Serialize)]
struct Rates {
    volume: String,
    read_iops: f64,
    write_iops: f64,
    read_bytes_per_sec: f64,
    write_bytes_per_sec: f64,
    /// Mean latency of the interval's reads and writes (`None`: none).
    read_latency_ms: Option<f64>,
    write_latency_ms: Option<f64>,
}

/// Prints a table (or a JSON line) per interval, `count` times (or until
/// interrupted). `volume` is `[POOL/]NAME`; a bare name is in any pool.
pub(super) fn run(
    client: &Client,
    out: Output,
    volume: Option<&str>,
    interval_secs: f64,
    count: Option<u64>,
) -> anyhow::Result<()> {
    let interval = Duration::from_secs_f64(interval_secs);
    let mut before = (Instant::now(), client.io_counters()?.volumes);
    let mut printed = 0u64;
    while count.is_none_or(|c| printed < c) {
        std::thread::sleep(interval);
        let now = (Instant::now(), client.io_counters()?.volumes);
        let secs = now.0.duration_since(before.0).as_secs_f64().max(1e-3);
        let rates: Vec<Rates> = now
            .1
            .iter()
            .filter(|v| volume.is_none_or(|want| matches(v, want)))
            .filter_map(|v| {
                let old = before
                    .1
                    .iter()
                    .find(|o| o.pool == v.pool && o.volume == v.volume);
                rates_of(v, old, secs)
            })
            .collect();
        out.emit(&rates, |r| render(r))?;
        printed += 1;
        before = now;
    }
    Ok(())
}

fn matches(v: &VolumeIo, want: &str) -> bool {
    match want.split_once('/') {
        Some((pool, name)) => v.pool == pool && v.volume == name,
        None => v.volume == want,
    }
}

/// The rates of `v` since `old` (none: since 0), `None` without I/O.
fn rates_of(v: &VolumeIo, old: Option<&VolumeIo>, secs: f64) -> Option<Rates> {
    let d = |now: u64, was: fn(&VolumeIo) -> u64| now.saturating_sub(old.map_or(0, was));
    let df = |now: f64, was: fn(&VolumeIo) -> f64| (now - old.map_or(0.0, was)).max(0.0);
    let (reads, writes) = (d(v.reads, |o| o.reads), d(v.writes, |o| o.writes));
    if reads == 0 && writes == 0 {
        return None;
    }
    let latency = |n: u64, s: f64| (n > 0).then(|| s * 1000.0 / n as f64);
    Some(Rates {
        volume: format!("{}/{}", v.pool, v.volume),
        read_iops: reads as f64 / secs,
        write_iops: writes as f64 / secs,
        read_bytes_per_sec: d(v.read_bytes, |o| o.read_bytes) as f64 / secs,
        write_bytes_per_sec: d(v.write_bytes, |o| o.write_bytes) as f64 / secs,
        read_latency_ms: latency(reads, df(v.read_secs, |o| o.read_secs)),
        write_latency_ms: latency(writes, df(v.write_secs, |o| o.write_secs)),
    })
}

fn render(rates: &[Rates]) -> String {
    let ms = |l: Option<f64>| l.map_or("-".to_string(), |l| format!("{l:.2} ms"));
    let rows: Vec<Vec<String>> = rates
        .iter()
        .map(|r| {
            vec![
                r.volume.clone(),
                format!("{:.0}", r.write_iops),
                format!("{:.0}", r.read_iops),
                format!("{:.1} MB/s", r.write_bytes_per_sec / 1e6),
                format!("{:.1} MB/s", r.read_bytes_per_sec / 1e6),
                ms(r.write_latency_ms),
                ms(r.read_latency_ms),
            ]
        })
        .collect();
    super::render::render_table(
        &[
            "VOLUME", "WR", "RD", "WR_BYTES", "RD_BYTES", "WR_LAT", "RD_LAT",
        ],
        &rows,
    )
}
