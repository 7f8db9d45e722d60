//! Metrics: what the daemon counts, and the text `GET /metrics` answers
//! (OpenMetrics, which Prometheus scrapes; the `prometheus-client` crate
//! encodes it).
//!
//! - Per volume (labels `pool`, `volume`): NBD requests by kind (`read`,
//!   `write`, `flush`, `trim`, `zero`), their bytes, the time they took
//!   (`vpool_volume_request_seconds_total`: its rate over the requests'
//!   rate is the mean latency, as Ceph's `avgtime`), failed requests, NBD
//!   clients; size and allocated bytes.
//! - Per pool: the engine's figures (volumes, data and physical bytes,
//!   segments, the cleaner's and checkpoints' work, full); for a pool on
//!   S3 its cache's (hits, misses, dirty bytes, upload lag, store errors;
//!   for a shared pool, per volume owned here).
//! - Jobs running; per replication the age of its newest point.
//!
//! I/O is counted by [`MeteredDevice`], which wraps every device the NBD
//! server opens (a few atomic adds and two clock reads per request).
//! **Bounded**: one [`IoStats`] per volume that had a device since the
//! daemon started, at most [`MAX_METERED`] (more share one entry per pool
//! labelled `volume="@other"`); at each scrape the entries of volumes that
//! are gone (or of pools that are) and have no device open are dropped.
//! Labels are pool and volume names only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vpool_nbd::{BlockDevice, DeviceError};

/// Most volumes counted apart.
pub const MAX_METERED: usize = 4096;
/// The volume label of the entry the volumes past [`MAX_METERED`] share
/// (a name no volume can have).
pub const OTHER: &str = "@other";

/// The kinds of request counted.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Read = 0,
    Write = 1,
    Flush = 2,
    Trim = 3,
    Zero = 4,
}

impl Op {
    pub const ALL: [Op; 5] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::Zero];

    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::Zero => "zero",
        }
    }
}

/// One volume's I/O since the daemon started.
#[derive(Debug, Default)]
pub struct IoStats {
    requests: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
    nanos: [AtomicU64; 5],
    errors: AtomicU64,
}

impl IoStats {
    fn record(&self, op: Op, bytes: u64, started: Instant, ok: bool) {
        let i = op as usize;
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        self.nanos[i].fetch_add(ns, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Requests of kind `op`, their bytes, and the seconds they took.
    pub fn of(&self, op: Op) -> (u64, u64, f64) {
        let i = op as usize;
        (
            self.requests[i].load(Ordering::Relaxed),
            self.bytes[i].load(Ordering::Relaxed),
            self.nanos[i].load(Ordering::Relaxed) as f64 / 1e9,
        )
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }
}

/// One volume's counters as `GET /v1/io` answers them (`vol iostat`
/// turns two of them into rates).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeIo {
    pub pool: String,
    pub volume: String,
    pub reads: u64,
    pub read_bytes: u64,
    pub read_secs: f64,
    pub writes: u64,
    pub write_bytes: u64,
    pub write_secs: f64,
    /// Flushes, trims and zeroes.
    pub other: u64,
    pub errors: u64,
}

impl VolumeIo {
    fn of(pool: &str, volume: &str, s: &IoStats) -> VolumeIo {
        let (reads, read_bytes, read_secs) = s.of(Op::Read);
        let (writes, write_bytes, write_secs) = s.of(Op::Write);
        let other = [Op::Flush, Op::Trim, Op::Zero]
            .iter()
            .map(|&op| s.of(op).0)
            .sum();
        VolumeIo {
            pool: pool.to_string(),
            volume: volume.to_string(),
            reads,
            read_bytes,
            read_secs,
            writes,
            write_bytes,
            write_secs,
            other,
            errors: s.errors(),
        }
    }
}

/// The [`IoStats`] of every volume, by pool and volume name.
#[derive(Default)]
pub struct Meters {
    volumes: Mutex<HashMap<(String, String), Arc<IoStats>>>,
}

impl Meters {
    /// The counters of `volume` of `pool` (made on first use).
    pub fn of(&self, pool: &str, volume: &str) -> Arc<IoStats> {
        let mut g = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        let key = (pool.to_string(), volume.to_string());
        if let Some(s) = g.get(&key) {
            return Arc::clone(s);
        }
        let key = if g.len() < MAX_METERED {
            key
        } else {
            (pool.to_string(), OTHER.to_string())
        };
        Arc::clone(g.entry(key).or_default())
    }

    /// `dev`, counted as I/O of `volume` (`VOLUME` or `VOLUME@SNAPSHOT`:
    /// a snapshot's reads count as its volume's) of `pool`.
    pub fn wrap(&self, pool: &str, image: &str, dev: Arc<dyn BlockDevice>) -> Arc<dyn BlockDevice> {
        let volume = image.split('@').next().unwrap_or(image);
        Arc::new(MeteredDevice {
            inner: dev,
            stats: self.of(pool, volume),
        })
    }

    /// The counters of every volume counted so far, by pool and name.
    pub fn all(&self) -> Vec<VolumeIo> {
        let g = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<VolumeIo> = g.iter().map(|((p, n), s)| VolumeIo::of(p, n, s)).collect();
        v.sort_by(|a, b| (&a.pool, &a.volume).cmp(&(&b.pool, &b.volume)));
        v
    }

    /// Every entry, after dropping those no device holds and `keep` says
    /// no to (a volume gone; `keep` is asked of [`OTHER`] too).
    pub fn snapshot(
        &self,
        keep: impl Fn(&str, &str) -> bool,
    ) -> Vec<((String, String), Arc<IoStats>)> {
        let mut g = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|(p, v), s| Arc::strong_count(s) > 1 || keep(p, v));
        g.iter().map(|(k, s)| (k.clone(), Arc::clone(s))).collect()
    }
}

/// A device whose requests are counted in an [`IoStats`].
pub struct MeteredDevice {
    inner: Arc<dyn BlockDevice>,
    stats: Arc<IoStats>,
}

impl MeteredDevice {
    fn count<T>(
        &self,
        op: Op,
        bytes: u64,
        f: impl FnOnce() -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let started = Instant::now();
        let out = f();
        self.stats.record(op, bytes, started, out.is_ok());
        out
    }
}

impl BlockDevice for MeteredDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let n = buf.len() as u64;
        self.count(Op::Read, n, || self.inner.read(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.count(Op::Write, data.len() as u64, || {
            self.inner.write(offset, data)
        })
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.count(Op::Flush, 0, || self.inner.flush())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.count(Op::Trim, len, || self.inner.trim(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.count(Op::Zero, len, || {
            self.inner.write_zeroes(offset, len, may_trim)
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.cache(offset, len)
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
}
