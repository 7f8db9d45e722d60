//! Leases that expire: the holder renews its lease, stops writing when it
//! could not, and another host takes over only after it saw no renewal for
//! the lease's expiry. The design and its safety argument are in
//! `docs/multi-host.md` (section 2); in short:
//!
//! - **Renewal.** Every [`LeaseTiming::renew`] the holder overwrites
//!   `lease/<epoch>` (its own key: a holder that was taken over can only
//!   write a key nobody reads) with a counter, then checks that no manifest
//!   after its last commit exists that is not its own (a taker creates the
//!   next generation). Both done, the lease is *renewed as of the moment
//!   the heartbeat was sent*.
//! - **Self-fencing.** From [`LeaseTiming::valid`] after the last renewal
//!   the store refuses writes, flushes and reads ([`S3Store::check_lease`])
//!   until a renewal succeeds; a later manifest of another holder fences it
//!   for good.
//! - **Expiry, seen by the taker** ([`wait_for_expiry`]): the heartbeat
//!   unchanged for the holder's `lease_expire_ms`, by the taker's own
//!   clock, watched over one or more attempts to open. `valid` is two
//!   thirds of the expiry, so the holder has stopped before a taker starts
//!   unless the two clocks' rates differ by half. Just before it commits,
//!   the taker reads the heartbeat once more, and once more after: a
//!   holder that renewed in between is given its `valid` to find out.
//!
//! The holder's clock is `CLOCK_BOOTTIME`, which keeps running while the
//! process is stopped (SIGSTOP) and while the machine is suspended; the
//! taker's is `Instant` (monotonic), which can only make it wait longer. A virtual
//! machine paused by its hypervisor is another matter: its clock may not
//! run while paused; vpool on a VM that can be paused must rely on the
//! fencing by generation alone (see `docs/multi-host.md`).
//!
//! The heartbeat's content is opaque: a taker only compares it with what it
//! read before, so nothing here decodes bytes from the bucket.

use super::{Inner, S3Store, unavailable};
use crate::bucket::latest_generation;
use crate::manifest::{Holder, LEASE_DIR, Manifest, manifest_key};
use crate::remote::{Remote, RemoteError};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use vpool_store::{Result, StoreError};

/// The default expiry of a lease.
pub const DEFAULT_LEASE_EXPIRE: Duration = Duration::from_secs(30);
/// How often a taker reads the heartbeat while it waits for it to expire.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// How a holder keeps its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    /// Between two renewals.
    pub renew: Duration,
    /// How long after a renewal the holder still writes.
    pub valid: Duration,
    /// How long a taker must see no renewal before it takes over.
    pub expire: Duration,
}

impl LeaseTiming {
    /// The timing of a lease that expires after `expire`: renewed six times
    /// in it, valid for two thirds of it.
    pub fn expiring_after(expire: Duration) -> LeaseTiming {
        let t = LeaseTiming {
            renew: expire / 6,
            valid: expire * 2 / 3,
            expire,
        };
        assert!(t.renew < t.valid && t.valid < t.expire, "{t:?}");
        t
    }
}

impl Default for LeaseTiming {
    fn default() -> Self {
        LeaseTiming::expiring_after(DEFAULT_LEASE_EXPIRE)
    }
}

/// The key of the heartbeat of the holder of `epoch`.
pub fn lease_key(epoch: u64) -> String {
    format!("{LEASE_DIR}/{epoch:016x}")
}

/// What a taker learned from watching a holder's heartbeat.
#[derive(Debug, PartialEq, Eq)]
pub enum Watch {
    /// It changed: the holder is alive.
    Renewed,
    /// Not renewed for this long so far (less than the expiry): try again
    /// later; the watch goes on from where it was.
    Unchanged(Duration),
    /// Unchanged for the whole expiry: the lease may be taken. The
    /// heartbeat as it stood (`None`: absent), to check again just before
    /// and after the taking.
    Expired(Option<Bytes>),
}

/// The longest one call of [`wait_for_expiry`] watches: a lease of the
/// default expiry (30 s) is watched in one open; a longer one over several
/// attempts (the host retries), so that no open blocks for the whole of it.
pub const MAX_WATCH: Duration = Duration::from_secs(60);
/// Most heartbeats watched at once in this process (a bound on
/// [`WATCHED`]; beyond it one watch is dropped, and starts over if that
/// pool is opened again).
const MAX_WATCHED: usize = 1024;

/// A heartbeat as last seen: its content (`None`: absent) and since when
/// it has not changed, by this process's clock.
struct Seen {
    content: Option<Bytes>,
    since: Instant,
}

/// The heartbeats this process watched, by (store, holder epoch): a watch
/// spans attempts to open the pool.
static WATCHED: std::sync::Mutex<BTreeMap<(String, u64), Seen>> =
    std::sync::Mutex::new(BTreeMap::new());

/// Watches the heartbeat of `holder` for at most [`MAX_WATCH`], going on
/// from what earlier calls saw of it. A holder that does not renew (from
/// before leases expired) never expires.
pub fn wait_for_expiry(
    remote: &Remote,
    holder: &Holder,
) -> std::result::Result<Watch, RemoteError> {
    let Some(ms) = holder.lease_expire_ms else {
        return Ok(Watch::Renewed);
    };
    let expire = Duration::from_millis(ms);
    let key = lease_key(holder.epoch);
    let watch_key = (remote.display().to_string(), holder.epoch);
    let started = Instant::now();
    tracing::info!(store = %remote.display(), holder = %holder.name(), expire_s = expire.as_secs_f64(), "the pool is held: watching its holder's lease");
    loop {
        // What a GET answers was true at some moment after it was sent:
        // "unchanged" is known only up to the sending.
        let asked = Instant::now();
        let content = remote.get(&key, asked + MAX_WATCH)?;
        let unchanged_for = {
            let mut watched = WATCHED.lock().unwrap_or_else(|e| e.into_inner());
            let seen = watched.get(&watch_key);
            match seen {
                Some(s) if s.content == content => asked.saturating_duration_since(s.since),
                _ => {
                    let first = seen.is_none();
                    if watched.len() >= MAX_WATCHED
                        && let Some(k) = watched.keys().next().cloned()
                    {
                        watched.remove(&k);
                    }
                    // Changed (or first seen): the holder may have renewed
                    // as late as the answer came.
                    watched.insert(
                        watch_key.clone(),
                        Seen {
                            content: content.clone(),
                            since: Instant::now(),
                        },
                    );
                    if !first {
                        return Ok(Watch::Renewed);
                    }
                    Duration::ZERO
                }
            }
        };
        if unchanged_for >= expire {
            WATCHED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&watch_key);
            return Ok(Watch::Expired(content));
        }
        if started.elapsed() >= MAX_WATCH {
            return Ok(Watch::Unchanged(unchanged_for));
        }
        std::thread::sleep(WATCH_INTERVAL);
    }
}

/// Whether the heartbeat of `holder` still reads `seen` (the lease the
/// taker is taking is still the expired one).
pub fn heartbeat_is(
    remote: &Remote,
    holder: &Holder,
    seen: &Option<Bytes>,
) -> std::result::Result<bool, RemoteError> {
    let now = remote.get(&lease_key(holder.epoch), Instant::now() + MAX_WATCH)?;
    Ok(&now == seen)
}

/// Nanoseconds on `CLOCK_BOOTTIME`.
pub(super) fn boottime_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let ns = i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec);
    u64::try_from(ns).unwrap_or(0)
}

impl S3Store {
    /// Refuses I/O once the lease has not been renewed for
    /// [`LeaseTiming::valid`]: another host may take it over soon, and
    /// what this one wrote or read from then on could fork the volume.
    pub(super) fn check_lease(&self) -> Result<()> {
        self.check_fenced()?;
        if self.read_only() {
            // No lease: nobody writes the pool (`OpenMode::ReadOnly`).
            return Ok(());
        }
        let inner = &self.inner;
        let since_ns = inner
            .clock_ns()
            .saturating_sub(inner.renewed_at_ns.load(Ordering::Acquire));
        let valid = inner.opts.lease.valid;
        if since_ns <= valid.as_nanos() as u64 {
            return Ok(());
        }
        Err(unavailable(
            "the pool's lease",
            format!(
                "not renewed for {:.1} s (valid {} s): the object store did not answer, or this host was paused; I/O waits for a renewal so that another host taking the pool over cannot fork it",
                since_ns as f64 / 1e9,
                valid.as_secs_f64()
            ),
        ))
    }

    /// Starts the thread that renews the lease, as soon as the lease is
    /// taken (recovery may take longer than the lease is valid). It holds
    /// the store weakly: it ends when the store is closed, fenced, or
    /// dropped.
    pub(super) fn start_renewer(&self) -> Result<()> {
        let weak = Arc::downgrade(&self.inner);
        let h = std::thread::Builder::new()
            .name("vpool-s3-lease".into())
            .spawn(move || renew_loop(weak))
            .map_err(|e| StoreError::io("spawning the lease renewer", e))?;
        *self.inner.renewer.lock() = Some(h);
        Ok(())
    }

    /// One renewal: the heartbeat, then the check that nobody took over.
    fn renew_once(&self, counter: u64) -> std::result::Result<(), String> {
        let inner = &self.inner;
        let timing = inner.opts.lease;
        let deadline = Instant::now() + timing.renew.max(Duration::from_secs(1));
        let body = format!("{} {counter}\n", inner.holder.id);
        let stop = || inner.stop.load(Ordering::SeqCst);
        inner
            .remote
            .put(
                &lease_key(inner.holder.epoch),
                Bytes::from(body),
                Some(deadline),
                &stop,
            )
            .map_err(|e| format!("writing the heartbeat: {e}"))?;
        self.check_not_taken(deadline)
    }

    /// Fails, and fences the store, if the latest manifest is after the
    /// last one this store committed and is not its own: only a taker
    /// creates one. (The latest, listed, not `g + 1`, which the taker's
    /// clean-up deletes after a few commits.)
    fn check_not_taken(&self, deadline: Instant) -> std::result::Result<(), String> {
        let inner = &self.inner;
        let ours = inner.up.lock().manifest.generation;
        let latest = latest_generation(&inner.remote, deadline)
            .map_err(|e| format!("listing manifests: {e}"))?
            .ok_or_else(|| "the bucket lists no manifest".to_string())?;
        if latest <= ours {
            return Ok(());
        }
        let bytes = inner
            .remote
            .get(&manifest_key(latest), deadline)
            .map_err(|e| format!("reading manifest {latest}: {e}"))?
            .ok_or_else(|| format!("manifest {latest} vanished"))?;
        // Our uploader may have committed it just now.
        let theirs = Manifest::decode(&bytes).ok().and_then(|m| m.holder);
        if theirs.as_ref().is_some_and(|h| h.id == inner.holder.id) {
            return Ok(());
        }
        let who = theirs.map_or_else(|| "another host".to_string(), |h| h.name());
        self.fence(format!(
            "pool {} was taken over by {who} (manifest generation {latest}; this host's lease had expired); this host stopped writing to it",
            inner.remote.display()
        ));
        Err("taken over".to_string())
    }

    /// Fences the store for good, with `detail` as the reason.
    pub(super) fn fence(&self, detail: String) {
        tracing::error!(%detail, "fenced");
        *self.inner.fenced.lock() = Some(detail);
        self.inner.up_cv.notify_all();
    }
}

/// The renewer: one renewal every [`LeaseTiming::renew`] until the store
/// stops, is fenced, or is gone.
fn renew_loop(weak: Weak<Inner>) {
    let mut counter: u64 = 0;
    let mut lapsed = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::SeqCst) || inner.fenced.lock().is_some() {
            return;
        }
        let renew = inner.opts.lease.renew;
        let store = S3Store { inner };
        counter += 1;
        let sent_ns = store.inner.clock_ns();
        let sent_at = Instant::now();
        let renewed = store.renew_once(counter);
        match &renewed {
            Ok(()) => {
                store
                    .inner
                    .renewed_at_ns
                    .fetch_max(sent_ns, Ordering::AcqRel);
                if lapsed {
                    tracing::info!(store = %store.inner.remote.display(), "the pool's lease is renewed again; I/O resumes");
                }
                lapsed = false;
            }
            Err(e) => {
                let stale = store.check_lease().is_err();
                if stale && !lapsed {
                    tracing::error!(store = %store.inner.remote.display(), error = %e, "the pool's lease could not be renewed in time: I/O is refused until it is");
                    lapsed = true;
                } else if !stale {
                    tracing::warn!(store = %store.inner.remote.display(), error = %e, "renewing the pool's lease failed; retrying");
                }
            }
        }
        drop(store);
        // From the send time, not the end of the attempt: a slow attempt
        // does not push the next one back. After a failure, sooner.
        let next = sent_at + if renewed.is_ok() { renew } else { renew / 4 };
        // Not on `up_cv`: every append signals it. Holding no reference
        // while asleep, so a dropped store ends this thread.
        while Instant::now() < next {
            std::thread::sleep(Duration::from_millis(20).min(renew));
            match weak.upgrade() {
                Some(inner) if !inner.stop.load(Ordering::SeqCst) => {}
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_holder_stops_before_a_taker_starts() {
        for secs in [1, 6, 30, 3600] {
            let t = LeaseTiming::expiring_after(Duration::from_secs(secs));
            assert!(t.renew * 3 <= t.valid, "{t:?}: two renewals may fail");
            // The margin that clock rates and a slow acknowledgement share.
            assert!(t.valid * 3 <= t.expire * 2, "{t:?}");
        }
    }
}
