//! Rate-limited logging for events a client can trigger at will.
//!
//! When a limit is hit the operator must hear about it, but a client that
//! hits it thousands of times a second must not be able to flood the log
//! (or the disk under it). [`RateLimitedLog`] lets one line through per
//! period and counts the rest, so the next line says how many were
//! suppressed.
//!
//! Shared by the NBD server, the API and the engine (a VM retrying a read
//! of a damaged block, a full device).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The period of the limiters the server uses: at most one line per limit
/// kind per 10 s.
pub const LOG_PERIOD: Duration = Duration::from_secs(10);

/// Lets one log line through per period; see the module docs.
#[derive(Debug)]
pub struct RateLimitedLog {
    period: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimitedLog {
    /// A limiter that lets one line through every `period`.
    pub const fn new(period: Duration) -> Self {
        RateLimitedLog {
            period,
            state: Mutex::new(State {
                last: None,
                suppressed: 0,
            }),
        }
    }

    /// Records one event. Returns `Some(suppressed)` when the caller should
    /// log it now, `suppressed` being how many events were not logged since
    /// the previous line; `None` when this one is to be suppressed.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    fn check_at(&self, now: Instant) -> Option<u64> {
        // A poisoned lock only means a panic elsewhere while counting; the
        // counters are still usable.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match st.last {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                st.suppressed += 1;
                None
            }
            _ => {
                st.last = Some(now);
                Some(std::mem::take(&mut st.suppressed))
            }
        }
    }
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        RateLimitedLog::new(LOG_PERIOD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_suppressed_count() {
        let log = RateLimitedLog::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(log.check_at(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.check_at(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(log.check_at(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(log.check_at(t0 + Duration::from_secs(11)), None);
        assert_eq!(log.check_at(t0 + Duration::from_secs(30)), Some(1));
    }
}
