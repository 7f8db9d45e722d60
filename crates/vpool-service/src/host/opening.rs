//! Opening the pools a host lists, in the background, and again after they
//! fail.
//!
//! At start every pool `host.json` lists is opened on a thread of its own
//! ("vpool-open-NAME"); the host waits for them up to [`START_WAIT`], so
//! one whose bucket does not answer does not hold the others back (nor the
//! daemon's start). A pool that fails to open is retried by one reopener
//! thread, after [`FIRST_RETRY`], doubling up to [`MAX_RETRY`], unless what
//! failed cannot be fixed by waiting (a damaged log, a directory another
//! process holds locked, settings refused as invalid; see [`retryable`]):
//! those wait for an operator (`vpool pool open NAME [--force]`).
//!
//! Who may record an outcome: each attempt is given the slot's *epoch*
//! when it claims it (the slot goes to [`PoolState::Opening`]); it records
//! its outcome only if the slot still has that epoch and the host is not
//! closing. Otherwise (the pool was detached meanwhile, or the daemon
//! stops) it closes what it opened. So at most one attempt runs per pool,
//! and none leaves an open pool that nobody will close.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::{Host, PoolState};
use crate::error::{Error, ErrorKind, Result};

/// How long [`Host::open`] waits for the pools it lists to open.
pub const START_WAIT: Duration = Duration::from_secs(5);
/// How long [`Host::close_all`] waits for attempts under way.
pub const STOP_WAIT: Duration = Duration::from_secs(10);
/// The wait before the first retry of a pool that failed to open.
pub const FIRST_RETRY: Duration = Duration::from_secs(5);
/// The longest wait between two retries.
pub const MAX_RETRY: Duration = Duration::from_secs(60);
/// How often the reopener looks for pools due a retry.
const TICK: Duration = Duration::from_millis(200);

/// The state of a listed pool before its first attempt: failed, "not
/// opened yet", due now.
pub(super) fn waiting() -> PoolState {
    PoolState::Failed {
        reason: "not opened yet".to_string(),
        kind: ErrorKind::Failed,
        attempts: 0,
        retry_at: Some(Instant::now()),
    }
}

/// What [`claim`] found.
pub(super) enum Claim {
    /// The pool is open already (its state).
    Open(PoolState),
    /// The caller now owns an attempt to open it: it is `Opening`.
    Mine {
        dir: PathBuf,
        epoch: u64,
        attempts: u32,
    },
}

/// Claims pool `name` for an attempt to open it: a failed pool goes to
/// `Opening` under a new epoch. Refused while another attempt runs.
pub(super) fn claim(host: &Host, name: &str) -> Result<Claim> {
    let mut pools = host.write_pools();
    if host.closing.load(Ordering::SeqCst) {
        return Err(Error::new(ErrorKind::Failed, "the daemon is stopping"));
    }
    let slot = pools.get_mut(name).ok_or_else(|| {
        Error::new(
            ErrorKind::NotFound,
            format!("no pool named {name:?} on this host (`vpool pool list`)"),
        )
    })?;
    let (last_error, attempts) = match &slot.state {
        s @ (PoolState::Open(_) | PoolState::Shared(_)) => return Ok(Claim::Open(s.clone())),
        PoolState::Opening { since, .. } => {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "pool {name} is being opened (for {} s); `vpool pool list` shows the outcome",
                    since.elapsed().as_secs()
                ),
            ));
        }
        PoolState::Failed {
            reason, attempts, ..
        } => ((*attempts > 0).then(|| reason.clone()), *attempts),
    };
    slot.epoch = host.next_epoch.fetch_add(1, Ordering::Relaxed);
    slot.state = PoolState::Opening {
        since: Instant::now(),
        last_error,
    };
    Ok(Claim::Mine {
        dir: slot.dir.clone(),
        epoch: slot.epoch,
        attempts,
    })
}

/// Opens pool `name` from `dir` and records the outcome if the claim of
/// `epoch` still holds (see the module doc). Returns the outcome.
/// Blocking: recovery, the object store.
pub(super) fn attempt(
    host: &Host,
    name: &str,
    dir: &Path,
    epoch: u64,
    attempts: u32,
    force: bool,
) -> PoolState {
    let started = Instant::now();
    let outcome = match host.opener.open(dir, force) {
        Ok(opened) => host.state_of(name, dir, opened),
        Err(e) => failed(e, attempts.saturating_add(1)),
    };
    // Under the pools' lock: still ours (no detach, no later attempt)? And
    // is the daemon stopping?
    let (ours, stopping) = {
        let mut pools = host.write_pools();
        match pools.get_mut(name) {
            Some(slot) if slot.epoch == epoch => {
                let stopping = host.closing.load(Ordering::SeqCst);
                if !stopping {
                    slot.state = outcome.clone();
                }
                (true, stopping)
            }
            _ => (false, false),
        }
    };
    let recorded = ours && !stopping;
    log(name, dir, &outcome, started.elapsed(), recorded);
    if !recorded {
        // Nobody else knows of this pool: close it, or its lease and lock
        // would stay held until the process ends.
        if let Err(e) = outcome.close() {
            tracing::warn!(pool = name, error = %e.message, "closing a pool opened too late failed");
        }
    }
    if ours && stopping {
        // Only now, once it is closed, does the slot stop being `Opening`:
        // the daemon's stop waits for that before it ends.
        if let Some(slot) = host.write_pools().get_mut(name)
            && slot.epoch == epoch
        {
            slot.state = PoolState::Failed {
                reason: "the daemon began to stop before the pool opened".to_string(),
                kind: ErrorKind::Failed,
                attempts,
                retry_at: None,
            };
        }
    }
    outcome
}

/// The state of a pool whose attempt number `attempts` failed with `e`.
fn failed(e: Error, attempts: u32) -> PoolState {
    let retry_at = retryable(e.kind).then(|| Instant::now() + backoff(attempts));
    PoolState::Failed {
        reason: e.message,
        kind: e.kind,
        attempts,
        retry_at,
    }
}

/// Whether waiting can fix an error: not a damaged pool, a bad setting or
/// a directory that is another pool's. An unreachable bucket, a lease
/// held elsewhere (its holder may stop) and I/O errors can.
fn retryable(kind: ErrorKind) -> bool {
    !matches!(
        kind,
        ErrorKind::AlreadyExists | ErrorKind::Corrupt | ErrorKind::Invalid
    )
}

/// The wait after `attempts` failures in a row: [`FIRST_RETRY`], doubling,
/// at most [`MAX_RETRY`].
fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    FIRST_RETRY.saturating_mul(1u32 << doublings).min(MAX_RETRY)
}

fn log(name: &str, dir: &Path, outcome: &PoolState, took: Duration, recorded: bool) {
    let took_ms = took.as_millis() as u64;
    match (outcome, recorded) {
        (PoolState::Open(_) | PoolState::Shared(_), true) => {
            tracing::info!(pool = name, dir = %dir.display(), took_ms, "pool opened")
        }
        (
            PoolState::Failed {
                reason,
                attempts,
                retry_at,
                ..
            },
            true,
        ) => {
            let retry_in_s =
                retry_at.map(|at| at.saturating_duration_since(Instant::now()).as_secs());
            tracing::warn!(pool = name, dir = %dir.display(), attempts, ?retry_in_s, error = %reason, "the pool could not be opened")
        }
        (_, false) => {
            tracing::info!(
                pool = name,
                took_ms,
                "an attempt to open the pool ended after it was detached or the daemon began to stop"
            )
        }
        (PoolState::Opening { .. }, true) => {}
    }
}

/// Starts opening every pool that waits (at [`Host::open`]), waits for
/// them up to [`START_WAIT`], and starts the reopener.
pub(super) fn start(host: &Arc<Host>) {
    spawn_due(host, Instant::now());
    let deadline = Instant::now() + START_WAIT;
    while any_opening(host) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let weak = Arc::downgrade(host);
    let spawned = std::thread::Builder::new()
        .name("vpool-reopen".to_string())
        .spawn(move || reopen_loop(weak));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the thread that retries pools: they open only by hand");
    }
}

/// Retries failed pools when they are due, until the host closes or is
/// dropped.
fn reopen_loop(host: Weak<Host>) {
    loop {
        std::thread::sleep(TICK);
        let Some(host) = host.upgrade() else { return };
        if host.closing.load(Ordering::SeqCst) {
            return;
        }
        spawn_due(&host, Instant::now());
    }
}

/// Claims every failed pool whose retry is due at `now` and starts an
/// attempt for each on a thread of its own.
fn spawn_due(host: &Arc<Host>, now: Instant) {
    let due: Vec<String> = host
        .read_pools()
        .values()
        .filter(|s| matches!(&s.state, PoolState::Failed { retry_at: Some(at), .. } if *at <= now))
        .map(|s| s.name.clone())
        .collect();
    for name in due {
        let Ok(Claim::Mine {
            dir,
            epoch,
            attempts,
        }) = claim(host, &name)
        else {
            continue;
        };
        let owner = Arc::clone(host);
        let thread_name = format!("vpool-open-{name}");
        let spawned = std::thread::Builder::new().name(thread_name).spawn({
            let name = name.clone();
            let dir = dir.clone();
            move || {
                attempt(&owner, &name, &dir, epoch, attempts, false);
            }
        });
        if let Err(e) = spawned {
            // Give the slot back, failed, so it is tried again later.
            let state = failed(
                Error::internal(format!("cannot start a thread to open it: {e}")),
                attempts.saturating_add(1),
            );
            if let Some(slot) = host.write_pools().get_mut(&name)
                && slot.epoch == epoch
            {
                slot.state = state;
            }
        }
    }
}

fn any_opening(host: &Host) -> bool {
    host.read_pools()
        .values()
        .any(|s| matches!(s.state, PoolState::Opening { .. }))
}

/// Waits up to `limit` until no attempt to open a pool runs.
pub(super) fn wait_for_attempts(host: &Host, limit: Duration) {
    let deadline = Instant::now() + limit;
    while any_opening(host) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_a_limit() {
        assert_eq!(backoff(1), FIRST_RETRY);
        assert_eq!(backoff(2), FIRST_RETRY * 2);
        assert_eq!(backoff(3), FIRST_RETRY * 4);
        assert_eq!(backoff(50), MAX_RETRY);
        assert_eq!(backoff(u32::MAX), MAX_RETRY);
    }

    #[test]
    fn what_waiting_cannot_fix_is_not_retried() {
        assert!(retryable(ErrorKind::Failed));
        assert!(retryable(ErrorKind::InUse));
        assert!(!retryable(ErrorKind::Corrupt));
        assert!(!retryable(ErrorKind::Invalid));
        assert!(!retryable(ErrorKind::AlreadyExists));
    }
}
