//! Routes: where a volume's NBD I/O goes, so that a move (`super::moving`)
//! redirects the clients of a volume without their reconnecting.
//!
//! Every writable NBD device of a volume of a (non-shared) pool is a
//! [`MovableDevice`]: its own device of the source volume, and the
//! volume's [`Route`], shared by every device of it, which says where I/O
//! goes:
//!
//! - `Direct`: to the source (no move);
//! - `Mirror(dst)`: reads from the source; writes, trims, zeroes and
//!   FLUSHes to both (while a move copies). A failure of the destination
//!   does not fail the client (the source answers): it fails the move;
//! - `Moved(dst)`: everything to the destination (itself a device on the
//!   destination's own route, so that it can move again).
//!
//! Every request takes the stripes of its range shared (a flush or a
//! cache hint, one stripe), and a change of state takes them all
//! exclusively ([`Route::quiesce`]): no request is in flight across a
//! change, so a request goes where the state said when it started, and a
//! move's copy of a range (under its stripes, exclusively) never
//! overwrites a mirrored write of it. Changes compare and set: a move
//! mirrors only a route that is direct, and commits or undoes only its own
//! mirror.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use vpool_engine::BLOCK_SIZE;
use vpool_nbd::{BlockDevice, DeviceError};

use crate::error::{Error, ErrorKind, Result};
use crate::stripes::{AllHeld, StripeLocks};

/// Where a volume's I/O goes; see the module doc.
#[derive(Clone)]
enum State {
    Direct,
    Mirror(Arc<dyn BlockDevice>),
    Moved(Arc<dyn BlockDevice>),
}

/// A device's own device of the source volume (`None` once moved).
type SourceSlot = RwLock<Option<Arc<dyn BlockDevice>>>;

/// Every stripe of a route held.
pub(super) type Quiesced<'a> = AllHeld<'a>;

/// One volume's route, shared by its devices and a move of it.
pub(super) struct Route {
    stripes: StripeLocks,
    state: RwLock<State>,
    /// A mirrored request failed on the destination: the move must not
    /// commit (reset when a mirror starts).
    mirror_failed: AtomicBool,
    /// The devices' source slots, emptied when the volume moved (bounded
    /// by the live devices).
    sources: Mutex<Vec<Weak<SourceSlot>>>,
}

impl Route {
    fn new() -> Route {
        Route {
            stripes: StripeLocks::default(),
            state: RwLock::new(State::Direct),
            mirror_failed: AtomicBool::new(false),
            sources: Mutex::new(Vec::new()),
        }
    }

    fn state(&self) -> State {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, _held: &Quiesced<'_>, s: State) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// Direct → mirror to `dst`; refused unless direct (another move).
    pub(super) fn start_mirror(
        &self,
        held: &Quiesced<'_>,
        dst: Arc<dyn BlockDevice>,
    ) -> Result<()> {
        if !matches!(self.state(), State::Direct) {
            return Err(Error::new(
                ErrorKind::InUse,
                "the volume is being moved already",
            ));
        }
        self.mirror_failed.store(false, Ordering::SeqCst);
        self.set(held, State::Mirror(dst));
        Ok(())
    }

    /// Whether this route mirrors to `dst` (the caller's move).
    fn mirrors_to(&self, dst: &Arc<dyn BlockDevice>) -> bool {
        matches!(self.state(), State::Mirror(d) if Arc::ptr_eq(&d, dst))
    }

    /// The move's mirror to `dst` fails no longer: an error if a mirrored
    /// request failed on the destination.
    pub(super) fn check_mirror(&self) -> Result<()> {
        if self.mirror_failed.load(Ordering::SeqCst) {
            return Err(Error::new(
                ErrorKind::Failed,
                "a write mirrored to the destination failed there (the daemon's log says why); the volume stays where it was",
            ));
        }
        Ok(())
    }

    /// An error unless this route mirrors to `dst` without a failure:
    /// what [`Route::commit`] needs.
    pub(super) fn check_commit(&self, dst: &Arc<dyn BlockDevice>) -> Result<()> {
        if !self.mirrors_to(dst) {
            return Err(Error::internal(
                "the route does not mirror to this move's destination",
            ));
        }
        self.check_mirror()
    }

    /// Mirror → moved to `moved`, and every device lets go of the source.
    /// Call under the same hold as a [`Route::check_commit`] that passed.
    pub(super) fn commit(&self, held: &Quiesced<'_>, moved: Arc<dyn BlockDevice>) {
        assert!(
            matches!(self.state(), State::Mirror(_)),
            "a route commits only from a checked mirror"
        );
        self.set(held, State::Moved(moved));
        let slots = std::mem::take(&mut *self.sources.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in slots.iter().filter_map(Weak::upgrade) {
            slot.write().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    /// Mirror to `dst` → direct (the move did not finish); a route that
    /// does not mirror to `dst` is left alone.
    pub(super) fn undo(&self, held: &Quiesced<'_>, dst: &Arc<dyn BlockDevice>) {
        if self.mirrors_to(dst) {
            self.set(held, State::Direct);
        }
    }

    /// The blocks of `[offset, offset + len)` (one, for an empty range).
    fn blocks(offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK_SIZE, (offset + len.max(1) - 1) / BLOCK_SIZE)
    }

    fn shared(&self, offset: u64, len: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        let (first, last) = Self::blocks(offset, len);
        self.stripes.shared(first, last)
    }

    pub(super) fn exclusive(&self, offset: u64, len: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        let (first, last) = Self::blocks(offset, len);
        self.stripes.exclusive(first, last)
    }

    /// Every stripe: no request of any device of the volume runs until the
    /// guard goes.
    pub(super) fn quiesce(&self) -> Quiesced<'_> {
        self.stripes.all()
    }

    fn register(&self, slot: &Arc<SourceSlot>) {
        let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|w| w.strong_count() > 0);
        s.push(Arc::downgrade(slot));
    }

    /// Runs a mirrored request on the destination: a failure is the
    /// move's, not the client's (the source answered).
    fn mirror(
        &self,
        dst: &dyn BlockDevice,
        op: impl Fn(&dyn BlockDevice) -> Result<(), DeviceError>,
    ) {
        if let Err(e) = op(dst)
            && !self.mirror_failed.swap(true, Ordering::SeqCst)
        {
            tracing::error!(error = %e, "a write mirrored to a moving volume's destination failed: the move will fail, the volume stays where it was");
        }
    }
}

/// The routes of the volumes with devices or a move, by (pool, volume).
#[derive(Default)]
pub(super) struct Routes {
    map: Mutex<BTreeMap<(String, String), Weak<Route>>>,
}

impl Routes {
    /// The route of `volume` of `pool`, made if none is live.
    pub(super) fn get(&self, pool: &str, volume: &str) -> Arc<Route> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        let key = (pool.to_string(), volume.to_string());
        if let Some(r) = map.get(&key).and_then(Weak::upgrade) {
            return r;
        }
        let r = Arc::new(Route::new());
        map.insert(key, Arc::downgrade(&r));
        r
    }

    /// Forgets the route of `volume` of `pool` (its devices keep it).
    pub(super) fn forget(&self, pool: &str, volume: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(pool.to_string(), volume.to_string()));
    }
}

/// A writable device of a volume that may move; see the module doc.
pub(super) struct MovableDevice {
    route: Arc<Route>,
    src: Arc<SourceSlot>,
    size_bytes: u64,
}

impl MovableDevice {
    /// `src`, a writable device of volume `volume` of `pool`, on its route.
    pub(super) fn wrap(
        routes: &Routes,
        pool: &str,
        volume: &str,
        src: Arc<dyn BlockDevice>,
    ) -> Arc<dyn BlockDevice> {
        let route = routes.get(pool, volume);
        let size_bytes = src.size_bytes();
        let slot = Arc::new(RwLock::new(Some(src)));
        route.register(&slot);
        Arc::new(MovableDevice {
            route,
            src: slot,
            size_bytes,
        })
    }

    /// This device's source. Under a stripe, the state is not `Moved`
    /// whenever this is asked, and a source is let go only on the change
    /// to `Moved`: it is there.
    fn source(&self) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        self.src
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| DeviceError::io("the volume moved: this connection's source is gone"))
    }

    /// Runs the changing request `op` where the state sends it: the
    /// source, the destination, or both, under the stripes of `[offset,
    /// offset + len)`.
    fn change(
        &self,
        offset: u64,
        len: u64,
        op: impl Fn(&dyn BlockDevice) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let _g = self.route.shared(offset, len);
        match self.route.state() {
            State::Direct => op(&*self.source()?),
            State::Mirror(dst) => {
                op(&*self.source()?)?;
                self.route.mirror(&*dst, op);
                Ok(())
            }
            State::Moved(dst) => op(&*dst),
        }
    }

    /// Runs the reading request `op` on where reads go, under the stripes
    /// of `[offset, offset + len)`.
    fn look<T>(
        &self,
        offset: u64,
        len: u64,
        op: impl FnOnce(&dyn BlockDevice) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let _g = self.route.shared(offset, len);
        match self.route.state() {
            State::Direct | State::Mirror(_) => op(&*self.source()?),
            State::Moved(dst) => op(&*dst),
        }
    }
}

impl BlockDevice for MovableDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.look(offset, buf.len() as u64, |d| d.read(offset, buf))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.change(offset, data.len() as u64, |d| d.write(offset, data))
    }

    fn flush(&self) -> Result<(), DeviceError> {
        // One stripe: no change of state runs during the flush.
        self.change(0, 0, |d| d.flush())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.change(offset, len, |d| d.trim(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.change(offset, len, |d| d.write_zeroes(offset, len, may_trim))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.look(offset, len, |d| d.block_status(offset, len))
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.look(offset, len, |d| d.cache(offset, len))
    }

    fn can_multi_conn(&self) -> bool {
        // A flush of any device flushes where every device writes.
        true
    }
}
