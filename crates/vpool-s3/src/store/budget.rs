//! A cache budget that several stores of one host share: the families of a
//! shared pool that this host owns (`docs/multi-host.md`, step 5).
//!
//! Each family is an S3 pool of its own, with its own cache directory; the
//! operator gives the shared pool one `--cache-size`, for the host. The
//! budget splits it in equal shares among the stores open on it, each at
//! least `min_share_bytes` (a share must hold a few segments of write-back
//! for the store to make progress), and shares it again whenever a store
//! opens or closes. A store whose share shrinks evicts clean bytes at once
//! and holds its writes back until its uploads bring its dirty bytes under
//! the new limit; one whose share grows takes the room as it needs it.
//!
//! Equal shares, not one LRU across the families: each store keeps its own
//! index (and its own punch lock), so a read never takes a host-wide lock,
//! and a busy volume cannot evict an idle one's working set. The cost: a
//! busy volume gets no more than its share while idle ones hold theirs
//! (an owned family stays open until it is released or moves to another
//! host: closing families that have no client is not built).
//!
//! Bound: the host's cache for the pool is at most
//! `max(total_bytes, members × min_share_bytes)`; the members are the
//! volumes the host owns and the read-only views of sealed templates it
//! opened, each at most the service's `MAX_OWNED` (64). A store whose
//! pool failed to open after it joined is dropped without leaving: the
//! others' shares grow back at the next join or leave.

use std::sync::{Arc, Mutex, Weak};

use super::{Inner, S3Store};

/// A host's cache budget for the stores that join it.
#[derive(Debug)]
pub struct CacheBudget {
    total_bytes: u64,
    min_share_bytes: u64,
    /// The stores open on the budget (weak: a store dropped without a
    /// close leaves, too).
    members: Mutex<Vec<Weak<Inner>>>,
}

impl CacheBudget {
    /// A budget of `total_bytes`, each share at least `min_share_bytes`.
    pub fn new(total_bytes: u64, min_share_bytes: u64) -> Arc<CacheBudget> {
        assert!(min_share_bytes > 0, "a share must hold something");
        Arc::new(CacheBudget {
            total_bytes,
            min_share_bytes,
            members: Mutex::new(Vec::new()),
        })
    }

    /// The host's total for the stores on this budget.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// How many stores are open on the budget now.
    pub fn members(&self) -> usize {
        let mut m = self.lock();
        m.retain(live);
        m.len()
    }

    /// The share of each of `members` stores.
    pub fn share_bytes(&self, members: usize) -> u64 {
        let n = u64::try_from(members.max(1)).unwrap_or(u64::MAX);
        (self.total_bytes / n).max(self.min_share_bytes)
    }

    /// `store` opens on the budget: every member's share shrinks.
    pub(super) fn join(&self, store: &S3Store) {
        let mut m = self.lock();
        m.retain(live);
        if !m
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(&store.inner)))
        {
            m.push(Arc::downgrade(&store.inner));
        }
        self.share_out(&m);
    }

    /// `store` closes: the others' shares grow.
    pub(super) fn leave(&self, store: &S3Store) {
        let mut m = self.lock();
        m.retain(|w| live(w) && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&store.inner)));
        self.share_out(&m);
    }

    /// Gives every member its share. Lock order: the budget's list, then
    /// a store's own locks (a store never calls the budget holding them).
    fn share_out(&self, members: &[Weak<Inner>]) {
        let share = self.share_bytes(members.len());
        for inner in members.iter().filter_map(Weak::upgrade) {
            S3Store { inner }.set_cache_size(share);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Inner>>> {
        self.members.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A member still open (not dropped, not closing).
fn live(w: &Weak<Inner>) -> bool {
    w.upgrade()
        .is_some_and(|i| !i.stop.load(std::sync::atomic::Ordering::SeqCst))
}
