//! What the server needs to enforce its per-client limits: who a client is
//! ([`ClientKey`]), how many request bytes are held in memory
//! ([`ByteBudget`]), whether a connection is idle ([`Activity`]), and which
//! idle connection gives up its slot when a cap is reached
//! ([`choose_victim`]). The limits themselves are [`ServerConfig`] fields.
//!
//! [`ServerConfig`]: crate::ServerConfig

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

/// Who a connection belongs to, for the per-client connection cap.
///
/// TCP clients are told apart by address. Unix-socket clients by process:
/// the daemon's socket is owner-only, so every client has the same uid and a
/// per-uid cap would only be a lower total; one QEMU process is one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A TCP peer (IPv4-mapped IPv6 addresses are folded to IPv4).
    Ip(IpAddr),
    /// A Unix-socket peer, from `SO_PEERCRED` at connect time.
    Process { pid: i32, uid: u32 },
    /// A Unix-socket peer whose credentials could not be read. All such
    /// peers count as one client.
    Unknown,
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientKey::Ip(ip) => write!(f, "{ip}"),
            ClientKey::Process { pid, uid } => write!(f, "unix pid {pid} uid {uid}"),
            ClientKey::Unknown => f.write_str("unix (unknown peer)"),
        }
    }
}

/// A count of bytes held in memory for requests, with a limit; taking more
/// than is left waits. One per connection, per client and for the server
/// (see [`ServerConfig::max_in_flight_bytes_per_connection`] and the fields
/// after it).
///
/// [`ServerConfig::max_in_flight_bytes_per_connection`]: crate::ServerConfig::max_in_flight_bytes_per_connection
#[derive(Debug)]
pub(crate) struct ByteBudget {
    limit_bytes: usize,
    used_bytes: AtomicUsize,
    waiters: AtomicUsize,
    lock: Mutex<()>,
    cv: Condvar,
}

/// Waiters re-check their give-up condition this often, so a connection
/// that is closed (evicted, shut down) while waiting stops waiting.
const BUDGET_RECHECK: Duration = Duration::from_millis(50);

impl ByteBudget {
    pub(crate) fn new(limit_bytes: usize) -> Self {
        assert!(limit_bytes > 0, "a byte budget needs a positive limit");
        ByteBudget {
            limit_bytes,
            used_bytes: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        }
    }

    pub(crate) fn limit_bytes(&self) -> usize {
        self.limit_bytes
    }

    pub(crate) fn used_bytes(&self) -> usize {
        self.used_bytes.load(Ordering::SeqCst)
    }

    fn try_take(&self, n: usize) -> bool {
        let mut cur = self.used_bytes.load(Ordering::SeqCst);
        loop {
            // An empty budget always admits one request, so a request larger
            // than the limit is slow, never stuck.
            if cur != 0 && cur.saturating_add(n) > self.limit_bytes {
                return false;
            }
            match self.used_bytes.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
    }

    /// Take `n` bytes, waiting while they do not fit. `on_wait` is called
    /// once if it must wait. `keep_waiting` is called (without any lock
    /// held) before each wait, and every [`BUDGET_RECHECK`] while waiting;
    /// when it returns false nothing is taken and `take` returns false.
    pub(crate) fn take(
        &self,
        n: usize,
        keep_waiting: &dyn Fn() -> bool,
        on_wait: &dyn Fn(),
    ) -> bool {
        if self.try_take(n) {
            return true;
        }
        on_wait();
        // Announce before re-checking: a release either sees the waiter and
        // notifies under the lock, or happened before the re-check.
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let taken = loop {
            if !keep_waiting() {
                break false;
            }
            let mut g = self.lock.lock();
            if self.try_take(n) {
                break true;
            }
            self.cv.wait_for(&mut g, BUDGET_RECHECK);
            drop(g);
            if self.try_take(n) {
                break true;
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        taken
    }

    pub(crate) fn release(&self, n: usize) {
        let before = self.used_bytes.fetch_sub(n, Ordering::SeqCst);
        assert!(before >= n, "byte budget released more than was taken");
        if self.waiters.load(Ordering::SeqCst) > 0 {
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }
}

/// Bytes taken from the budgets of a connection, its client and the
/// server; given back on drop, when the request's data buffer is no longer
/// needed.
pub(crate) struct Held<'a> {
    budgets: [&'a ByteBudget; 3],
    bytes: usize,
}

impl<'a> Held<'a> {
    /// Take `bytes` from each of `budgets` (connection, client, server), in
    /// that order: waiting on the connection's is what stops reading from a
    /// client over its limit. `on_wait` is called with the index of each
    /// budget it has to wait for. `None` if `keep_waiting` returns false
    /// while waiting.
    pub(crate) fn take(
        budgets: [&'a ByteBudget; 3],
        bytes: usize,
        keep_waiting: &dyn Fn() -> bool,
        on_wait: &dyn Fn(usize),
    ) -> Option<Held<'a>> {
        for (i, b) in budgets.iter().enumerate() {
            if !b.take(bytes, keep_waiting, &|| on_wait(i)) {
                for taken in &budgets[..i] {
                    taken.release(bytes);
                }
                return None;
            }
        }
        Some(Held { budgets, bytes })
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        for b in self.budgets.iter().rev() {
            b.release(self.bytes);
        }
    }
}

/// Whether a connection in transmission is idle, and since when; shared by
/// the connection (which updates it) and the server (which picks eviction
/// victims from it).
///
/// Updated off the fast path: the connection's watcher thread marks the
/// connection idle when it parks after a quiet period, and the reading
/// thread marks it busy again when it wakes the watcher. Requests are
/// counted so that a request still running on a released thread is seen.
#[derive(Debug)]
pub(crate) struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch`, plus one, at which the connection went
    /// quiet; 0 while it is not known to be idle.
    idle_since_ms: AtomicU64,
    started: AtomicU64,
    finished: AtomicU64,
    in_transmission: AtomicBool,
}

/// What [`Activity::idle`] reports about an idle connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Idle {
    pub(crate) idle_for: Duration,
    /// Whether the client ever sent a request on this connection.
    pub(crate) used: bool,
}

impl Activity {
    pub(crate) fn new(epoch: Instant) -> Self {
        Activity {
            epoch,
            idle_since_ms: AtomicU64::new(0),
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            in_transmission: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// The handshake is over; until then a connection is never idle (the
    /// handshake deadline bounds it instead).
    pub(crate) fn enter_transmission(&self) {
        self.in_transmission.store(true, Ordering::SeqCst);
    }

    pub(crate) fn begin_request(&self) {
        self.started.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn end_request(&self) {
        self.finished.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn mark_idle(&self) {
        let _ = self.idle_since_ms.compare_exchange(
            0,
            self.now_ms(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    pub(crate) fn mark_busy(&self) {
        self.idle_since_ms.store(0, Ordering::SeqCst);
    }

    /// `Some` if the connection is in transmission, quiet and has no request
    /// executing.
    pub(crate) fn idle(&self) -> Option<Idle> {
        if !self.in_transmission.load(Ordering::SeqCst) {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::SeqCst);
        let finished = self.finished.load(Ordering::SeqCst);
        let started = self.started.load(Ordering::SeqCst);
        if since == 0 || started != finished {
            return None;
        }
        Some(Idle {
            idle_for: Duration::from_millis(self.now_ms().saturating_sub(since)),
            used: started > 0,
        })
    }
}

/// A connection that could give up its slot.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    pub(crate) id: u64,
    /// How many connections its client holds.
    pub(crate) client_connections: usize,
    pub(crate) idle: Idle,
}

/// The connection to evict so that a new one can have its slot: among those
/// idle for at least `min_idle`, one of the client holding the most
/// connections (so a flood pays before a VM with one disk does), preferring
/// connections that never sent a request, then the longest idle.
pub(crate) fn choose_victim(
    candidates: impl IntoIterator<Item = Candidate>,
    min_idle: Duration,
) -> Option<u64> {
    candidates
        .into_iter()
        .filter(|c| c.idle.idle_for >= min_idle)
        .max_by_key(|c| (c.client_connections, !c.idle.used, c.idle.idle_for))
        .map(|c| c.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: u64, conns: usize, used: bool, idle_s: u64) -> Candidate {
        Candidate {
            id,
            client_connections: conns,
            idle: Idle {
                idle_for: Duration::from_secs(idle_s),
                used,
            },
        }
    }

    #[test]
    fn victim_order() {
        let min = Duration::from_secs(60);
        // Nobody idle long enough.
        assert_eq!(choose_victim([cand(1, 5, false, 59)], min), None);
        // The biggest client pays first, even if a VM idled longer.
        let c = [cand(1, 1, true, 86_400), cand(2, 3, true, 61)];
        assert_eq!(choose_victim(c, min), Some(2));
        // Within a client: never-used first, then the longest idle.
        let c = [
            cand(1, 3, true, 500),
            cand(2, 3, false, 70),
            cand(3, 3, true, 900),
        ];
        assert_eq!(choose_victim(c, min), Some(2));
        let c = [cand(1, 3, true, 500), cand(3, 3, true, 900)];
        assert_eq!(choose_victim(c, min), Some(3));
    }

    #[test]
    fn budget_admits_one_oversized_request_and_waits() {
        let b = ByteBudget::new(10);
        let waits = AtomicUsize::new(0);
        let on_wait = || {
            waits.fetch_add(1, Ordering::SeqCst);
        };
        assert!(
            b.take(25, &|| false, &on_wait),
            "an idle budget admits anything"
        );
        assert!(
            !b.take(1, &|| false, &on_wait),
            "a full budget makes callers wait"
        );
        b.release(25);
        assert!(b.take(6, &|| false, &on_wait));
        assert!(b.take(4, &|| false, &on_wait));
        assert_eq!(b.used_bytes(), 10);
        assert_eq!(
            waits.load(Ordering::SeqCst),
            1,
            "only the refused take waited"
        );
        std::thread::scope(|s| {
            let waiter = s.spawn(|| b.take(5, &|| true, &on_wait));
            std::thread::sleep(Duration::from_millis(20));
            b.release(6);
            assert!(waiter.join().unwrap());
        });
        assert_eq!(b.used_bytes(), 9);
        assert_eq!(waits.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn held_takes_all_or_nothing() {
        let (conn, client, total) = (ByteBudget::new(8), ByteBudget::new(8), ByteBudget::new(8));
        let first = Held::take([&conn, &client, &total], 6, &|| false, &|_| {}).unwrap();
        let other = ByteBudget::new(8);
        // The server's budget is spent: nothing stays taken from the others.
        let waited = Mutex::new(Vec::new());
        let taken = Held::take([&other, &client, &total], 4, &|| false, &|i| {
            waited.lock().push(i)
        });
        assert!(taken.is_none());
        assert_eq!(*waited.lock(), vec![1], "the client's budget was spent");
        assert_eq!((other.used_bytes(), client.used_bytes()), (0, 6));
        drop(first);
        assert_eq!((conn.used_bytes(), total.used_bytes()), (0, 0));
    }

    #[test]
    fn activity_idle_only_in_transmission_without_requests() {
        let a = Activity::new(Instant::now());
        a.mark_idle();
        assert_eq!(a.idle(), None, "handshaking connections are not idle");
        a.enter_transmission();
        assert!(!a.idle().unwrap().used);
        a.mark_busy();
        a.begin_request();
        a.mark_idle();
        assert_eq!(a.idle(), None, "a request is executing");
        a.end_request();
        assert!(a.idle().unwrap().used);
    }
}
