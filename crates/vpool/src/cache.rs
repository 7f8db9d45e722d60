//! The daemon's side of `vpool cache`: the host cache of an S3 pool, its
//! figures and its pins ([`vpool_api::CacheControl`]).
//!
//! A pin names an image (`db1`, or `db1@suspended`); what it keeps resident
//! is the log byte ranges that image's data lives in
//! ([`vpool_engine::Pool::data_ranges`]). Those move: the volume is written,
//! the cleaner relocates data. So the ranges of every pin are recomputed
//! every [`REFRESH_INTERVAL`] by a background thread, and at once after a
//! pin or unpin, and the union is handed to [`S3Store::set_pins`].
//!
//! The pin list is kept in `<pool>/pins.json` (replaced atomically), so pins
//! survive restarts. A pin whose volume or snapshot is later deleted stays
//! listed, with the reason it pins nothing, until it is unpinned.
//!
//! The same thread watches for fencing: once another host takes the pool
//! over, the daemon says so in its log (every write fails from then on).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use vpool_engine::Pool;
use vpool_s3::S3Store;
use vpool_service::{CacheControl, CacheInfo, Error, ErrorKind, PinInfo};
use vpool_store::SegmentId;

/// The pin list's file in the pool directory.
pub const PINS_FILE: &str = "pins.json";

/// How often the pins' ranges are recomputed.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(10);

/// How often the background thread looks at the fencing state.
const TICK: Duration = Duration::from_secs(1);

/// `pins.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PinsFile {
    pins: Vec<PinKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PinKey {
    volume: String,
    #[serde(default)]
    snapshot: Option<String>,
}

impl PinKey {
    fn is(&self, volume: &str, snapshot: Option<&str>) -> bool {
        self.volume == volume && self.snapshot.as_deref() == snapshot
    }
}

/// A pin and what its last refresh found.
#[derive(Clone, Debug)]
struct Pin {
    key: PinKey,
    bytes: Option<u64>,
    error: Option<String>,
}

impl Pin {
    fn info(&self) -> PinInfo {
        PinInfo {
            volume: self.key.volume.clone(),
            snapshot: self.key.snapshot.clone(),
            bytes: self.bytes,
            error: self.error.clone(),
        }
    }
}

/// The cache of the S3 pool a daemon serves.
pub struct S3Cache {
    pool: Pool,
    store: S3Store,
    pins_path: PathBuf,
    pins: Mutex<Vec<Pin>>,
    /// Held across a whole change or refresh, so the ranges handed to the
    /// store are never those of an older pin list than the newest one.
    refresh: Mutex<()>,
    stop: Mutex<bool>,
    wake: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not take the cache commands down with it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn image(volume: &str, snapshot: Option<&str>) -> String {
    match snapshot {
        Some(s) => format!("{volume}@{s}"),
        None => volume.to_string(),
    }
}

/// Sorts and merges ranges of the same segment that touch or overlap.
fn merge(mut ranges: Vec<(SegmentId, Range<u64>)>) -> Vec<(SegmentId, Range<u64>)> {
    ranges.sort_by_key(|(seg, r)| (*seg, r.start));
    let mut out: Vec<(SegmentId, Range<u64>)> = Vec::with_capacity(ranges.len());
    for (seg, r) in ranges {
        match out.last_mut() {
            Some((s, last)) if *s == seg && r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push((seg, r)),
        }
    }
    out
}

impl S3Cache {
    /// The cache of `pool` on `store`, with the pins saved in `pool_dir`.
    /// Call [`S3Cache::refresh`] (or start the refresher) to apply them.
    pub fn open(pool: Pool, store: S3Store, pool_dir: &Path) -> anyhow::Result<S3Cache> {
        let pins_path = pool_dir.join(PINS_FILE);
        let file: PinsFile = match std::fs::read(&pins_path) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(f) => f,
                Err(e) => {
                    // Pins are an optimization: a damaged list must not keep
                    // the pool's VMs from starting. Keep it for inspection.
                    let aside = pins_path.with_extension("json.bad");
                    tracing::error!(
                        file = %pins_path.display(),
                        moved_to = %aside.display(),
                        error = %e,
                        "the pin list is not valid; starting with no pins (pin again)"
                    );
                    std::fs::rename(&pins_path, &aside).with_context(|| {
                        format!("moving the invalid {} aside", pins_path.display())
                    })?;
                    PinsFile::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PinsFile::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", pins_path.display()));
            }
        };
        let pins = file
            .pins
            .into_iter()
            .map(|key| Pin {
                key,
                bytes: None,
                error: None,
            })
            .collect();
        Ok(S3Cache {
            pool,
            store,
            pins_path,
            pins: Mutex::new(pins),
            refresh: Mutex::new(()),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        })
    }

    fn save(&self, pins: &[Pin]) -> anyhow::Result<()> {
        let file = PinsFile {
            pins: pins.iter().map(|p| p.key.clone()).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&file).context("encoding the pin list")?;
        crate::atomic_file::write_file_atomic(&self.pins_path, &bytes)
    }

    /// Recomputes every pin's ranges and hands their union to the store.
    pub fn refresh(&self) {
        let _r = lock(&self.refresh);
        self.refresh_locked();
    }

    fn refresh_locked(&self) {
        let keys: Vec<PinKey> = lock(&self.pins).iter().map(|p| p.key.clone()).collect();
        let mut all = Vec::new();
        let mut found: Vec<(Option<u64>, Option<String>)> = Vec::with_capacity(keys.len());
        for k in &keys {
            match self.pool.data_ranges(&k.volume, k.snapshot.as_deref()) {
                Ok(ranges) => {
                    found.push((
                        Some(ranges.iter().map(|(_, r)| r.end - r.start).sum()),
                        None,
                    ));
                    all.extend(ranges);
                }
                Err(e) => {
                    tracing::debug!(pin = %image(&k.volume, k.snapshot.as_deref()), error = %e, "pin refresh");
                    found.push((None, Some(e.to_string())));
                }
            }
        }
        self.store.set_pins(merge(all));
        // Only this function and the changes (all under `refresh`) touch the
        // list, so it is still the one the ranges were computed for.
        let mut pins = lock(&self.pins);
        for (p, (bytes, error)) in pins.iter_mut().zip(found) {
            p.bytes = bytes;
            p.error = error;
        }
    }

    /// Starts the background thread: refreshes the pins every
    /// [`REFRESH_INTERVAL`] and reports fencing. Stop it with
    /// [`Refresher::stop`] before the pool closes.
    pub fn start_refresher(self: &Arc<Self>) -> anyhow::Result<Refresher> {
        let cache = self.clone();
        let thread = std::thread::Builder::new()
            .name("vpool-pins".into())
            .spawn(move || cache.background())
            .context("starting the pin refresher")?;
        Ok(Refresher {
            cache: self.clone(),
            thread: Some(thread),
        })
    }

    fn background(&self) {
        let mut last = Instant::now();
        let mut fence_reported = false;
        loop {
            {
                let stop = lock(&self.stop);
                let (stop, _) = self
                    .wake
                    .wait_timeout_while(stop, TICK, |s| !*s)
                    .unwrap_or_else(|p| p.into_inner());
                if *stop {
                    return;
                }
            }
            if !fence_reported && let Some(detail) = self.store.fenced() {
                tracing::error!(
                    %detail,
                    "this daemon is fenced: another host took the pool over (vpool serve --force); every write fails from now on; stop this daemon"
                );
                fence_reported = true;
            }
            if last.elapsed() >= REFRESH_INTERVAL {
                self.refresh();
                last = Instant::now();
            }
        }
    }
}

/// The running background thread of an [`S3Cache`].
pub struct Refresher {
    cache: Arc<S3Cache>,
    thread: Option<JoinHandle<()>>,
}

impl Refresher {
    /// Stops the thread and waits for it (at most one refresh).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        *lock(&self.cache.stop) = true;
        self.cache.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Refresher {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

impl CacheControl for S3Cache {
    fn wait_in_bucket(&self, timeout: Duration) -> vpool_service::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Fenced, the queue never empties; and a store fenced after its
            // last commit must not let the caller go on as the owner.
            if let Some(why) = self.store.fenced() {
                return Err(vpool_service::Error::new(ErrorKind::NotOwner, why));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self
                .store
                .wait_uploaded(left.min(Duration::from_millis(200)))
            {
                if let Some(why) = self.store.fenced() {
                    return Err(vpool_service::Error::new(ErrorKind::NotOwner, why));
                }
                return Ok(());
            }
            if left.is_zero() {
                return Err(vpool_service::Error::new(
                    ErrorKind::Failed,
                    format!(
                        "what was written is not all in the bucket after {} s (`vpool vol status` shows the bytes left to upload)",
                        timeout.as_secs()
                    ),
                ));
            }
        }
    }

    fn seal_at_close(&self) -> vpool_service::Result<()> {
        self.store.seal_at_close();
        Ok(())
    }

    fn stats(&self) -> CacheInfo {
        CacheInfo {
            pins: lock(&self.pins).len() as u64,
            ..self.store.stats()
        }
    }

    fn pins(&self) -> Vec<PinInfo> {
        lock(&self.pins).iter().map(Pin::info).collect()
    }

    fn pin(&self, volume: &str, snapshot: Option<&str>) -> vpool_service::Result<(PinInfo, bool)> {
        let _r = lock(&self.refresh);
        // A missing volume or snapshot is refused now (not_found), not
        // found out at the next refresh.
        self.pool.data_ranges(volume, snapshot)?;
        {
            let mut pins = lock(&self.pins);
            if let Some(p) = pins.iter().find(|p| p.key.is(volume, snapshot)) {
                return Ok((p.info(), false));
            }
            pins.push(Pin {
                key: PinKey {
                    volume: volume.to_string(),
                    snapshot: snapshot.map(str::to_string),
                },
                bytes: None,
                error: None,
            });
            if let Err(e) = self.save(&pins) {
                pins.pop();
                return Err(Error::internal(format!("saving the pin list: {e:#}")));
            }
        }
        tracing::info!(pin = %image(volume, snapshot), "pinned");
        self.refresh_locked();
        let pins = lock(&self.pins);
        let p = pins
            .iter()
            .find(|p| p.key.is(volume, snapshot))
            .expect("the pin was just added under the refresh lock");
        Ok((p.info(), true))
    }

    fn unpin(&self, volume: &str, snapshot: Option<&str>) -> vpool_service::Result<()> {
        let _r = lock(&self.refresh);
        {
            let mut pins = lock(&self.pins);
            let Some(i) = pins.iter().position(|p| p.key.is(volume, snapshot)) else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("{} is not pinned", image(volume, snapshot)),
                ));
            };
            let removed = pins.remove(i);
            if let Err(e) = self.save(&pins) {
                pins.insert(i, removed);
                return Err(Error::internal(format!("saving the pin list: {e:#}")));
            }
        }
        tracing::info!(pin = %image(volume, snapshot), "unpinned");
        self.refresh_locked();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_ranges() {
        let s = SegmentId;
        let m = merge(vec![
            (s(2), 0..10),
            (s(1), 5..8),
            (s(1), 0..5),
            (s(2), 20..30),
            (s(2), 25..40),
            (s(1), 9..12),
        ]);
        assert_eq!(
            m,
            vec![(s(1), 0..8), (s(1), 9..12), (s(2), 0..10), (s(2), 20..40)]
        );
    }

    #[test]
    fn pin_file_format() {
        let f = PinsFile {
            pins: vec![
                PinKey {
                    volume: "db1".into(),
                    snapshot: Some("suspended".into()),
                },
                PinKey {
                    volume: "web".into(),
                    snapshot: None,
                },
            ],
        };
        let s = serde_json::to_string(&f).unwrap();
        assert_eq!(
            s,
            r#"{"pins":[{"volume":"db1","snapshot":"suspended"},{"volume":"web","snapshot":null}]}"#
        );
        assert_eq!(serde_json::from_str::<PinsFile>(&s).unwrap(), f);
    }
}
