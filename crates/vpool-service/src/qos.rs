//! QoS: per-volume limits on NBD requests a second and bytes a second,
//! with bursts, enforced by token buckets in the NBD path and changed at
//! runtime without the clients reconnecting (`vpool vol qos`), as QEMU's
//! throttle groups and RBD's per-image QoS do it.
//!
//! Each limit is a bucket that fills at the limit's rate up to its size:
//! a tenth of a second's worth, or for a burst (`--burst-iops B
//! --burst-secs T`) what running at B instead of the limit for T seconds
//! takes, `(B - limit) × T`. It starts empty. A request takes one token
//! (`iops`) and its bytes (`bps`: reads and writes only) and may drive a
//! bucket below zero; it then waits until the bucket is back at zero, so
//! requests queue behind each other's debt and the long-run rate is the
//! limit. Waiting is a sleep on the connection's thread (the NBD server
//! runs each request on one).
//!
//! The limits are kept in the pool's catalog (`crate::catalog`), so they
//! survive restarts; the buckets live with the host (`Throttles`), one per
//! volume that has a device, shared by all its connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vpool_nbd::{BlockDevice, DeviceError};

use crate::error::{Error, Result};

/// Most volumes with buckets of their own (beyond it, devices of new
/// volumes get buckets of their own, not shared).
pub const MAX_THROTTLED: usize = 4096;
/// Longest a single request waits (a huge request under a tiny limit);
/// a bucket's debt never exceeds this much of its rate, so what a request
/// cannot wait for is forgiven, not carried on.
const MAX_WAIT_SECS: f64 = 30.0;

/// A volume's limits; `None` is no limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_bps: Option<u64>,
    /// How long a burst may last (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst_secs: Option<u64>,
}

impl QosLimits {
    /// No limit at all.
    pub fn is_empty(&self) -> bool {
        self.iops.is_none() && self.bps.is_none()
    }

    /// Refuses limits of 0, a burst below its limit or without one, and a
    /// burst longer than an hour.
    pub fn check(&self) -> Result<()> {
        let pairs = [
            ("iops", self.iops, self.burst_iops),
            ("bps", self.bps, self.burst_bps),
        ];
        for (name, limit, burst) in pairs {
            if limit == Some(0) {
                return Err(Error::invalid(format!(
                    "a {name} limit of 0 would stop the volume"
                )));
            }
            match (limit, burst) {
                (None, Some(_)) => {
                    return Err(Error::invalid(format!(
                        "a {name} burst needs a {name} limit"
                    )));
                }
                (Some(l), Some(b)) if b < l => {
                    return Err(Error::invalid(format!(
                        "the {name} burst ({b}) is below its limit ({l})"
                    )));
                }
                _ => {}
            }
        }
        if self.burst_secs.is_some_and(|s| s == 0 || s > 3600) {
            return Err(Error::invalid("--burst-secs is 1 to 3600"));
        }
        if self.burst_secs.is_some() && self.burst_iops.is_none() && self.burst_bps.is_none() {
            return Err(Error::invalid(
                "--burst-secs needs a burst (--burst-iops or --burst-bps); each call sets every limit",
            ));
        }
        Ok(())
    }
}

/// One limit's bucket.
#[derive(Debug)]
struct Bucket {
    rate_per_sec: f64,
    size: f64,
    tokens: f64,
}

impl Bucket {
    fn new(limit: Option<u64>, burst: Option<u64>, burst_secs: u64) -> Option<Bucket> {
        // (0 is refused by `check`; one read from a damaged catalog is no
        // limit rather than a division by zero.)
        let rate = limit.filter(|&l| l > 0)? as f64;
        let burst_size = burst.map_or(0.0, |b| (b as f64 - rate) * burst_secs as f64);
        Some(Bucket {
            rate_per_sec: rate,
            size: (rate / 10.0).max(burst_size).max(1.0),
            tokens: 0.0,
        })
    }

    /// Fills for `elapsed_secs`, takes `n`; how long to wait for the debt.
    fn take(&mut self, n: f64, elapsed_secs: f64) -> f64 {
        self.tokens = (self.tokens + elapsed_secs * self.rate_per_sec).min(self.size);
        self.tokens = (self.tokens - n).max(-self.rate_per_sec * MAX_WAIT_SECS);
        if self.tokens >= 0.0 {
            0.0
        } else {
            -self.tokens / self.rate_per_sec
        }
    }
}

#[derive(Debug)]
struct State {
    limits: QosLimits,
    iops: Option<Bucket>,
    bps: Option<Bucket>,
    last: Instant,
}

/// The buckets of one volume; see the module doc.
#[derive(Debug)]
pub struct Throttle {
    /// Any limit set: without one, a request does not take the lock.
    limited: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

impl Throttle {
    fn new(limits: QosLimits) -> Throttle {
        let t = Throttle {
            limited: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State {
                limits: QosLimits::default(),
                iops: None,
                bps: None,
                last: Instant::now(),
            }),
        };
        t.set(limits);
        t
    }

    /// New limits, at once (a bucket keeps what it holds, up to its new
    /// size).
    pub fn set(&self, limits: QosLimits) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.limits == limits {
            return;
        }
        let secs = limits.burst_secs.unwrap_or(1);
        let keep = |old: &Option<Bucket>, mut new: Option<Bucket>| {
            if let (Some(o), Some(n)) = (old, new.as_mut()) {
                n.tokens = o.tokens.min(n.size);
            }
            new
        };
        s.iops = keep(&s.iops, Bucket::new(limits.iops, limits.burst_iops, secs));
        s.bps = keep(&s.bps, Bucket::new(limits.bps, limits.burst_bps, secs));
        self.limited
            .store(!limits.is_empty(), std::sync::atomic::Ordering::Relaxed);
        s.limits = limits;
    }

    /// Waits until a request of `bytes` (counted against `bps` when
    /// `counts_bytes`) is within the limits.
    fn admit(&self, bytes: u64, counts_bytes: bool) {
        if !self.limited.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let wait = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.iops.is_none() && s.bps.is_none() {
                return;
            }
            let now = Instant::now();
            let elapsed = now.duration_since(s.last).as_secs_f64();
            s.last = now;
            let a = s.iops.as_mut().map_or(0.0, |b| b.take(1.0, elapsed));
            let n = if counts_bytes { bytes as f64 } else { 0.0 };
            let b = s.bps.as_mut().map_or(0.0, |b| b.take(n, elapsed));
            a.max(b)
        };
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait.min(MAX_WAIT_SECS)));
        }
    }
}

/// The buckets of every volume with a device, by pool, volume name and
/// volume id (a volume made again under a name has buckets of its own).
#[derive(Default)]
pub struct Throttles {
    volumes: Mutex<HashMap<(String, String, u64), Arc<Throttle>>>,
}

impl Throttles {
    /// The buckets of volume `id` named `volume` of `pool`; made on first
    /// use with the limits `read_limits` gives, read under the map's lock
    /// so that a [`Throttles::update`] cannot slip in between.
    fn of(
        &self,
        key: (String, String, u64),
        read_limits: impl FnOnce() -> QosLimits,
    ) -> Arc<Throttle> {
        let mut g = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = g.get(&key) {
            return Arc::clone(t);
        }
        if g.len() >= MAX_THROTTLED {
            g.retain(|_, t| Arc::strong_count(t) > 1);
        }
        let t = Arc::new(Throttle::new(read_limits()));
        if g.len() < MAX_THROTTLED {
            g.insert(key, Arc::clone(&t));
        }
        t
    }

    /// Runs `save` (which stores `limits` for volume `id` named `volume`
    /// of `pool`) and applies them to its buckets, both under the map's
    /// lock.
    pub fn update<T>(
        &self,
        (pool, volume, id): (&str, &str, u64),
        limits: &QosLimits,
        save: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let g = self.volumes.lock().unwrap_or_else(|e| e.into_inner());
        let out = save()?;
        if let Some(t) = g.get(&(pool.to_string(), volume.to_string(), id)) {
            t.set(limits.clone());
        }
        Ok(out)
    }

    /// `dev`, its requests held to the limits of volume `id` named
    /// `volume` of `pool` (`read_limits` gives them for new buckets).
    pub fn wrap(
        &self,
        (pool, volume, id): (&str, &str, u64),
        read_limits: impl FnOnce() -> QosLimits,
        dev: Arc<dyn BlockDevice>,
    ) -> Arc<dyn BlockDevice> {
        let key = (pool.to_string(), volume.to_string(), id);
        Arc::new(QosDevice {
            inner: dev,
            throttle: self.of(key, read_limits),
        })
    }
}

/// A device whose requests wait for their volume's buckets.
pub struct QosDevice {
    inner: Arc<dyn BlockDevice>,
    throttle: Arc<Throttle>,
}

impl BlockDevice for QosDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), DeviceError> {
        self.throttle.admit(buf.len() as u64, true);
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), DeviceError> {
        self.throttle.admit(data.len() as u64, true);
        self.inner.write(offset, data)
    }

    fn flush(&self) -> std::result::Result<(), DeviceError> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> std::result::Result<(), DeviceError> {
        self.throttle.admit(0, false);
        self.inner.trim(offset, len)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
    ) -> std::result::Result<(), DeviceError> {
        self.throttle.admit(0, false);
        self.inner.write_zeroes(offset, len, may_trim)
    }

    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Vec<(u64, u32)>, DeviceError> {
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> std::result::Result<(), DeviceError> {
        self.inner.cache(offset, len)
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_the_rate_and_its_burst() {
        // 100/s, no burst: starts empty, so the first takes wait.
        let mut b = Bucket::new(Some(100), None, 1).unwrap();
        assert!((b.take(1.0, 0.0) - 0.01).abs() < 1e-9);
        // A second later: 10 tokens at most (a tenth of a second).
        assert_eq!(b.take(1.0, 1.0), 0.0);
        assert!(b.tokens <= 9.0 + 1e-9);
        // A burst of 300/s for 2 s: 400 tokens fit.
        let mut b = Bucket::new(Some(100), Some(300), 2).unwrap();
        assert_eq!(b.take(400.0, 100.0), 0.0);
        assert!(b.take(1.0, 0.0) > 0.0);
        // A debt never passes 30 s of the rate: what a request cannot wait
        // for is forgiven.
        let mut b = Bucket::new(Some(10), None, 1).unwrap();
        for _ in 0..10 {
            assert!(b.take(1000.0, 0.0) <= MAX_WAIT_SECS);
        }
        assert!(b.tokens >= -300.0);
    }

    #[test]
    fn limits_are_checked() {
        let ok = QosLimits {
            iops: Some(100),
            burst_iops: Some(200),
            ..Default::default()
        };
        ok.check().unwrap();
        for bad in [
            QosLimits {
                iops: Some(0),
                ..Default::default()
            },
            QosLimits {
                burst_iops: Some(10),
                ..Default::default()
            },
            QosLimits {
                iops: Some(100),
                burst_iops: Some(50),
                ..Default::default()
            },
            QosLimits {
                iops: Some(1),
                burst_secs: Some(0),
                ..Default::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
