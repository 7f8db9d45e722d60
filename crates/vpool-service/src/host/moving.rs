//! `vol move`: a volume moved into another pool while its clients keep
//! their NBD connections, as a job (`crate::jobs`), the way QEMU's
//! `drive-mirror` and `rbd migration` do it.
//!
//! **Routes.** Every writable NBD device of a volume of a (non-shared)
//! pool is a [`MovableDevice`]: its own device of the source volume, and
//! the volume's [`Route`], shared by every device of it, which says where
//! I/O goes:
//!
//! - `Direct`: to the source (no move);
//! - `Mirror(dst)`: reads from the source, writes, trims, zeroes to both,
//!   a FLUSH to both (while the move copies);
//! - `Moved(dst)`: everything to the destination.
//!
//! Every request takes the stripes of its range shared (reads too), and a
//! change of state takes them all exclusively ([`Route::quiesce`]): no
//! request is in flight across a change, so a write lands on what the
//! state says when it starts, and the copy of a range (under its stripes,
//! exclusively) never overwrites a mirrored write of it.
//!
//! **The move**, a job:
//! 1. a record in `<home>/moves.json` (for a crash, below), the
//!    destination made, empty, and marked incomplete (NBD refuses it);
//! 2. `Direct` → `Mirror`, then every data extent of the source copied, a
//!    range at a time under its stripes;
//! 3. with every request held: the source's size and snapshots checked,
//!    both flushed, the destination's incomplete mark removed (the commit
//!    point), `Mirror` → `Moved`, and every device lets go of the source;
//! 4. the source deleted, the record removed.
//!
//! A cancel or an error before 3 goes back to `Direct` and deletes the
//! destination. **A crash**: at the next start, a record whose destination
//! is still marked incomplete is rolled back (the destination deleted:
//! the source has every write, mirrored ones too), one whose destination is
//! complete is rolled forward (the source deleted: the destination has
//! every write since the switch). Between the two nothing is served that
//! was not flushed to the side that survives.
//!
//! Not yet: snapshots moving with the volume (a volume with snapshots is
//! refused), shared pools on either side, templates and clones.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use serde::{Deserialize, Serialize};
use vpool_engine::{BLOCK_SIZE, STATE_ZERO};
use vpool_nbd::{BlockDevice, DeviceError};

use super::{Host, PoolCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobCtl, JobInfo};
use crate::stripes::{AllHeld, StripeLocks};

/// Bytes a move copies per step, under the step's stripes.
const MOVE_STEP_BYTES: u64 = 1 << 20;
/// Most extents asked of the source at a time.
const MAX_EXTENTS: usize = 1024;
/// The record of the moves under way, in the home.
const MOVES_FILE: &str = "moves.json";

/// Where a volume's I/O goes; see the module doc.
#[derive(Clone)]
enum State {
    Direct,
    Mirror(Arc<dyn BlockDevice>),
    Moved(Arc<dyn BlockDevice>),
}

/// One volume's route, shared by its devices and a move of it.
pub(super) struct Route {
    stripes: StripeLocks,
    state: RwLock<State>,
    /// The devices' source slots, emptied when the volume moved (bounded
    /// by the live devices).
    sources: Mutex<Vec<Weak<SourceSlot>>>,
}

/// A device's own device of the source volume (`None` once moved).
type SourceSlot = RwLock<Option<Arc<dyn BlockDevice>>>;

/// Every stripe of a route held.
type Quiesced<'a> = AllHeld<'a>;

impl Route {
    fn new() -> Route {
        Route {
            stripes: StripeLocks::default(),
            state: RwLock::new(State::Direct),
            sources: Mutex::new(Vec::new()),
        }
    }

    fn state(&self) -> State {
        self.state.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_state(&self, _held: &Quiesced<'_>, s: State) {
        *self.state.write().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The blocks of `[offset, offset + len)` (one, for an empty range).
    fn blocks(offset: u64, len: u64) -> (u64, u64) {
        (offset / BLOCK_SIZE, (offset + len.max(1) - 1) / BLOCK_SIZE)
    }

    fn shared(&self, offset: u64, len: u64) -> Vec<RwLockReadGuard<'_, ()>> {
        let (first, last) = Self::blocks(offset, len);
        self.stripes.shared(first, last)
    }

    fn exclusive(&self, offset: u64, len: u64) -> Vec<RwLockWriteGuard<'_, ()>> {
        let (first, last) = Self::blocks(offset, len);
        self.stripes.exclusive(first, last)
    }

    /// Every stripe: no request of any device of the volume runs until the
    /// guard goes.
    fn quiesce(&self) -> Quiesced<'_> {
        self.stripes.all()
    }

    fn register(&self, slot: &Arc<SourceSlot>) {
        let mut s = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        s.retain(|w| w.strong_count() > 0);
        s.push(Arc::downgrade(slot));
    }

    /// Every device lets go of the source (it moved).
    fn drop_sources(&self, _held: &Quiesced<'_>) {
        let slots = std::mem::take(&mut *self.sources.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in slots.iter().filter_map(Weak::upgrade) {
            slot.write().unwrap_or_else(|e| e.into_inner()).take();
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
    fn get(&self, pool: &str, volume: &str) -> Arc<Route> {
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
    fn forget(&self, pool: &str, volume: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(pool.to_string(), volume.to_string()));
    }

    /// Whether a move of `volume` of `pool` runs.
    fn moving(&self, pool: &str, volume: &str) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(pool.to_string(), volume.to_string()))
            .and_then(Weak::upgrade)
            .is_some_and(|r| !matches!(r.state(), State::Direct))
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

    fn source(&self) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        self.src
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| DeviceError::io("the volume moved: this connection's source is gone"))
    }

    /// Runs `op` on where the state sends a request of `[offset, offset +
    /// len)`: the source, the destination, or (`mirror`) both, under the
    /// range's stripes.
    fn route(
        &self,
        offset: u64,
        len: u64,
        mirror: bool,
        op: impl Fn(&dyn BlockDevice) -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let _g = self.route.shared(offset, len);
        match self.route.state() {
            State::Direct => op(&*self.source()?),
            State::Mirror(dst) => {
                op(&*self.source()?)?;
                if mirror { op(&*dst) } else { Ok(()) }
            }
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
        let _g = self.route.shared(offset, buf.len() as u64);
        match self.route.state() {
            State::Direct | State::Mirror(_) => self.source()?.read(offset, buf),
            State::Moved(dst) => dst.read(offset, buf),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.route(offset, data.len() as u64, true, |d| d.write(offset, data))
    }

    fn flush(&self) -> Result<(), DeviceError> {
        match self.route.state() {
            State::Direct => self.source()?.flush(),
            State::Mirror(dst) => {
                self.source()?.flush()?;
                dst.flush()
            }
            State::Moved(dst) => dst.flush(),
        }
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.route(offset, len, true, |d| d.trim(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.route(offset, len, true, |d| d.write_zeroes(offset, len, may_trim))
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        let _g = self.route.shared(offset, len);
        match self.route.state() {
            State::Direct | State::Mirror(_) => self.source()?.block_status(offset, len),
            State::Moved(dst) => dst.block_status(offset, len),
        }
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match self.route.state() {
            State::Direct | State::Mirror(_) => self.source()?.cache(offset, len),
            State::Moved(dst) => dst.cache(offset, len),
        }
    }

    fn can_multi_conn(&self) -> bool {
        // A flush of any device flushes where every device writes.
        true
    }
}

/// A move under way, as `moves.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MoveRecord {
    pool: String,
    volume: String,
    to_pool: String,
    to: String,
}

fn read_records(home: &Path) -> Result<Vec<MoveRecord>> {
    match std::fs::read(home.join(MOVES_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::new(ErrorKind::Corrupt, format!("{MOVES_FILE}: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::internal(format!("reading {MOVES_FILE}: {e}"))),
    }
}

/// Replaces `moves.json` atomically (a temporary file, synced, renamed).
fn write_records(home: &Path, records: &[MoveRecord]) -> Result<()> {
    let path = home.join(MOVES_FILE);
    let tmp = home.join(format!("{MOVES_FILE}.tmp"));
    let bytes = serde_json::to_vec_pretty(records).expect("serializes");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(home)?.sync_all()
    };
    write().map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))
}

/// A move's side of the world: what it made and holds.
struct Move {
    src: Arc<PoolCtx>,
    /// The source volume's id (its catalog marks it moving).
    src_id: u64,
    dst: Arc<PoolCtx>,
    record: MoveRecord,
    route: Arc<Route>,
    size_bytes: u64,
}

impl Host {
    /// Starts moving `volume` of `pool` into pool `to_pool` as `to`
    /// (default: the same name); see the module doc. Returns the job.
    pub fn move_volume(
        &self,
        pool: Option<&str>,
        volume: &str,
        to_pool: &str,
        to: Option<&str>,
        max_rate_bytes_per_sec: Option<u64>,
    ) -> Result<JobInfo> {
        let to = to.unwrap_or(volume);
        crate::names::check_volume_name(to)?;
        if self.home.as_os_str().is_empty() {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "this host has no home to record moves in",
            ));
        }
        for p in [pool, Some(to_pool)] {
            if let Some(sh) = self.shared(p) {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    format!(
                        "pool {} is shared: moving volumes into or out of shared pools is not built yet",
                        sh.name
                    ),
                ));
            }
        }
        let src = self.pool(pool)?;
        let dst = self.pool(Some(to_pool))?;
        let view = src.service.volume(volume)?;
        refuse_unmovable(&src, volume, &view)?;
        if src.name == dst.name && to == volume {
            return Err(Error::invalid(format!(
                "volume {}/{volume} is in pool {} already",
                src.name, dst.name
            )));
        }
        if self.routes.moving(&src.name, volume) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("volume {}/{volume} is being moved already", src.name),
            ));
        }
        let record = MoveRecord {
            pool: src.name.clone(),
            volume: volume.to_string(),
            to_pool: dst.name.clone(),
            to: to.to_string(),
        };
        let size_bytes = view.info.size_bytes;
        let src_id = view.info.id.0;
        src.service.catalog().set_moving(volume, src_id, true)?;
        let made = dst
            .service
            .create_volume(to, size_bytes, false)
            .and_then(|_| self.add_record(&record))
            .and_then(|()| dst.service.begin_import(to, false));
        if let Err(e) = made {
            if e.kind != ErrorKind::AlreadyExists {
                let _ = dst.service.delete_volume(to, true);
            }
            let _ = self.remove_record(&record);
            src.service.catalog().set_moving(volume, src_id, false)?;
            return Err(e);
        }
        let mv = Move {
            route: self.routes.get(&src.name, volume),
            src,
            src_id,
            dst,
            record,
            size_bytes,
        };
        let what = format!(
            "{}/{} -> {}/{}",
            mv.record.pool, mv.record.volume, mv.record.to_pool, mv.record.to
        );
        let home = self.home.clone();
        let routes = Arc::clone(&self.routes);
        let mut guard = MoveGuard { mv: Some(mv), home };
        self.jobs
            .start("move", &what, max_rate_bytes_per_sec, move |ctl| {
                let mv = guard.mv.as_ref().expect("until the job ends");
                let out = run(ctl, mv, &routes);
                if out.is_ok() {
                    guard.done();
                }
                out
            })
    }

    fn add_record(&self, r: &MoveRecord) -> Result<()> {
        let _g = self.moves_file.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = read_records(&self.home)?;
        all.push(r.clone());
        write_records(&self.home, &all)
    }

    fn remove_record(&self, r: &MoveRecord) -> Result<()> {
        let _g = self.moves_file.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = read_records(&self.home)?;
        all.retain(|x| x != r);
        write_records(&self.home, &all)
    }

    /// Finishes or undoes the moves a crash interrupted, once their pools
    /// are open (see the module doc); the others wait for the next start.
    pub(super) fn resolve_moves(&self) {
        let Ok(records) = read_records(&self.home) else {
            tracing::error!("{MOVES_FILE} cannot be read: interrupted moves are left as they are");
            return;
        };
        for r in records {
            let (Ok(src), Ok(dst)) = (self.pool(Some(&r.pool)), self.pool(Some(&r.to_pool))) else {
                continue;
            };
            let outcome = resolve(&src, &dst, &r);
            match outcome {
                Ok(what) => {
                    tracing::warn!(pool = %r.pool, volume = %r.volume, to = %format!("{}/{}", r.to_pool, r.to), what, "a move interrupted by a crash");
                    let _ = self.remove_record(&r);
                }
                Err(e) => {
                    tracing::error!(pool = %r.pool, volume = %r.volume, error = %e.message, "an interrupted move could not be resolved; it is tried again at the next start")
                }
            }
        }
    }
}

/// Rolls an interrupted move back or forward; says which.
fn resolve(src: &PoolCtx, dst: &PoolCtx, r: &MoveRecord) -> Result<&'static str> {
    match dst.service.volume(&r.to) {
        Ok(v) if v.incomplete => {
            dst.service.delete_volume(&r.to, true)?;
            Ok("rolled back: the destination is deleted, the source has every write")
        }
        Ok(_) => match src.service.volume(&r.volume) {
            Ok(_) => {
                src.service.delete_volume(&r.volume, true)?;
                Ok("rolled forward: the source is deleted, the destination has every write")
            }
            Err(e) if e.kind == ErrorKind::NotFound => Ok("finished already"),
            Err(e) => Err(e),
        },
        Err(e) if e.kind == ErrorKind::NotFound => Ok("nothing was made"),
        Err(e) => Err(e),
    }
}

/// What a move refuses: templates, clones, ephemeral volumes, snapshots.
fn refuse_unmovable(src: &PoolCtx, volume: &str, view: &crate::pool::VolumeView) -> Result<()> {
    let why = if view.template.is_some() {
        Some("it is a template (clone it into the other pool instead)")
    } else if view.info.parent.is_some() {
        Some("it is a clone (flatten it first)")
    } else if view.info.ephemeral {
        Some("it is ephemeral")
    } else if view.incomplete {
        Some("it is incomplete")
    } else if view.info.snapshots > 0 {
        Some(
            "it has snapshots, and moving snapshots is not built yet (delete them, or `vpool vol copy VOLUME@SNAPSHOT` each)",
        )
    } else {
        None
    };
    match why {
        Some(w) => Err(Error::new(
            ErrorKind::NotSupported,
            format!("volume {}/{volume} cannot move: {w}", src.name),
        )),
        None => Ok(()),
    }
}

/// Undoes a move that did not finish when it goes (a cancel, an error, a
/// refused start), and removes its record.
struct MoveGuard {
    mv: Option<Move>,
    home: std::path::PathBuf,
}

impl MoveGuard {
    fn done(&mut self) {
        if let Some(mv) = self.mv.take() {
            let _ = mv
                .src
                .service
                .catalog()
                .set_moving(&mv.record.volume, mv.src_id, false);
            forget(&self.home, &mv.record);
        }
    }
}

impl Drop for MoveGuard {
    fn drop(&mut self) {
        let Some(mv) = self.mv.take() else {
            return;
        };
        {
            let held = mv.route.quiesce();
            if matches!(mv.route.state(), State::Mirror(_)) {
                mv.route.set_state(&held, State::Direct);
            }
        }
        let _ = mv
            .src
            .service
            .catalog()
            .set_moving(&mv.record.volume, mv.src_id, false);
        if let Err(e) = mv.dst.service.delete_volume(&mv.record.to, true) {
            tracing::warn!(pool = %mv.record.to_pool, volume = %mv.record.to, error = %e.message, "could not delete an unfinished move's destination; it is deleted at the next start");
            return;
        }
        forget(&self.home, &mv.record);
    }
}

/// Removes a move's record (a failure leaves it for the next start, which
/// finds the move finished or undone).
fn forget(home: &Path, r: &MoveRecord) {
    let removed = read_records(home).and_then(|mut all| {
        all.retain(|x| x != r);
        write_records(home, &all)
    });
    if let Err(e) = removed {
        tracing::warn!(error = %e.message, "could not update {MOVES_FILE}");
    }
}

/// The job; see the module doc.
fn run(ctl: &JobCtl, mv: &Move, routes: &Routes) -> Result<serde_json::Value> {
    ctl.set_total(mv.size_bytes);
    let device = |e: DeviceError| Error::new(ErrorKind::Failed, e.to_string());
    let dst = mv
        .dst
        .exports
        .open_incomplete(&mv.record.to)
        .map_err(device)?;
    {
        let held = mv.route.quiesce();
        mv.route.set_state(&held, State::Mirror(Arc::clone(&dst)));
    }
    let copied = copy_all(ctl, mv, &*dst)?;
    // Where the moved devices go: the destination on its own route, so
    // that a later move of it takes them along.
    let moved = MovableDevice::wrap(routes, &mv.record.to_pool, &mv.record.to, Arc::clone(&dst));
    switch(mv, &dst, moved)?;
    // New devices of a volume made again under the old name get a route
    // of their own; the moved devices keep theirs.
    routes.forget(&mv.record.pool, &mv.record.volume);
    if let Err(e) = mv.src.service.delete_volume(&mv.record.volume, true) {
        tracing::warn!(pool = %mv.record.pool, volume = %mv.record.volume, error = %e.message, "the volume moved but its source could not be deleted; it is deleted at the next start");
    }
    Ok(serde_json::json!({
        "volume": format!("{}/{}", mv.record.to_pool, mv.record.to),
        "size_bytes": mv.size_bytes,
        "data_bytes": copied,
    }))
}

/// Copies every data extent of the source, a step at a time under the
/// step's stripes. Returns the bytes written.
fn copy_all(ctl: &JobCtl, mv: &Move, dst: &dyn BlockDevice) -> Result<u64> {
    let src = mv.src.service.pool().volume(&mv.record.volume)?;
    let mut buf = vec![0u8; usize::try_from(MOVE_STEP_BYTES).expect("1 MiB")];
    let mut written = 0u64;
    let mut at = 0u64;
    while at < mv.size_bytes {
        // Before the step's stripes: a pause holds no client up.
        ctl.pace(written)?;
        let end = (at + MOVE_STEP_BYTES).min(mv.size_bytes);
        let _g = mv.route.exclusive(at, end - at);
        let mut pos = at;
        while pos < end {
            let extents = src.block_status(pos, end - pos, MAX_EXTENTS)?;
            if extents.is_empty() || extents.iter().any(|e| e.0 == 0) {
                return Err(Error::internal(format!(
                    "block status of {}/{} at {pos} made no progress",
                    mv.record.pool, mv.record.volume
                )));
            }
            for (n, flags) in extents {
                let n = n.min(end - pos);
                if flags & STATE_ZERO == 0 {
                    let piece = &mut buf[..usize::try_from(n).expect("at most a step")];
                    src.read(pos, piece)?;
                    if piece.iter().any(|&b| b != 0) {
                        dst.write(pos, piece)
                            .map_err(|e| Error::new(ErrorKind::Failed, e.to_string()))?;
                        written += n;
                    }
                }
                pos += n;
                if pos >= end {
                    break;
                }
            }
        }
        at = end;
        ctl.set_done(at);
    }
    Ok(written)
}

/// The commit: with every request held, the checks, both sides flushed,
/// the destination complete, then every device on it.
fn switch(mv: &Move, dst: &Arc<dyn BlockDevice>, moved: Arc<dyn BlockDevice>) -> Result<()> {
    let held = mv.route.quiesce();
    let now = mv.src.service.volume(&mv.record.volume)?;
    if now.info.size_bytes != mv.size_bytes || now.info.snapshots > 0 {
        return Err(Error::new(
            ErrorKind::InUse,
            format!(
                "volume {}/{} was resized or snapshotted during its move; move it again",
                mv.record.pool, mv.record.volume
            ),
        ));
    }
    mv.src.service.flush()?;
    dst.flush()
        .map_err(|e| Error::new(ErrorKind::Failed, e.to_string()))?;
    mv.dst.service.end_import(&mv.record.to)?;
    mv.route.set_state(&held, State::Moved(moved));
    mv.route.drop_sources(&held);
    Ok(())
}
