//! `vol move`: a volume moved into another pool while its clients keep
//! their NBD connections, as a job (`crate::jobs`), the way QEMU's
//! `drive-mirror` and `rbd migration` do it.
//!
//! Every writable NBD device of a volume goes through the volume's route
//! (`super::route`: direct, mirror, moved). **The move**, a job:
//! 1. the destination made, empty, and marked incomplete (NBD refuses
//!    it), both volumes marked moving in their catalogs (the API refuses
//!    to change, snapshot, import into or delete them), then a record in
//!    `<home>/moves.json` with both volumes' ids (for a crash, below);
//! 2. the snapshots, oldest first, each as what changed since the one
//!    before (they never change); then the route mirrors to the
//!    destination, and the volume is copied (every data extent, or with
//!    snapshots what changed since the last, taken once the mirror runs),
//!    a range at a time under its stripes;
//! 3. with every request held: the source's size checked, both sides
//!    flushed, the destination's incomplete mark removed (the commit
//!    point), the route moved to the destination, and every device lets
//!    go of the source;
//! 4. the source deleted, its route forgotten, the record removed.
//!
//! A cancel or an error before 3 (a failed mirrored write among them)
//! goes back to direct and deletes the destination. **A crash**: the
//! records are read when the daemon starts, and until each is resolved NBD
//! refuses both its volumes; once both pools are open, a record whose
//! destination (that id) is still marked incomplete is rolled back (the
//! destination deleted: the source has every write, mirrored ones too),
//! one whose destination is complete is rolled forward (the source, that
//! id, deleted: the destination has every write since the commit). A
//! crash before the record leaves an incomplete destination and nothing
//! else: delete it.
//!
//! `--without-snapshots`: step 2 copies the volume alone, and its
//! snapshots go with the source in step 4 (a volume's snapshots live with
//! it: `vol copy VOLUME@SNAPSHOT` one first to keep it).
//!
//! Not yet: shared pools on either side, templates and clones, volumes
//! whose snapshots have clones.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vpool_engine::Volume;
use vpool_nbd::{BlockDevice, DeviceError};

use super::copy::copy_exact;
use super::route::{MovableDevice, Route, Routes};
use super::{Host, PoolCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobCtl, JobInfo, JobSpec};

/// Bytes a move copies per step, under the step's stripes.
const MOVE_STEP_BYTES: u64 = 1 << 20;
/// Bytes of a first snapshot copied between two looks at the job's pace
/// and cancel (it is read a MiB at a time).
const WHOLE_STEP_BYTES: u64 = 64 << 20;
/// The record of the moves under way, in the home.
const MOVES_FILE: &str = "moves.json";

/// A move under way, as `moves.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MoveRecord {
    pool: String,
    volume: String,
    volume_id: u64,
    to_pool: String,
    to: String,
    to_id: u64,
}

impl MoveRecord {
    /// Whether volume `volume` of `pool` is this move's source or
    /// destination.
    fn names(&self, pool: &str, volume: &str) -> bool {
        (self.pool == pool && self.volume == volume) || (self.to_pool == pool && self.to == volume)
    }
}

/// `moves.json`: the moves under way, and those a crash interrupted that
/// are not resolved yet.
pub(super) struct MovesFile {
    home: PathBuf,
    /// Serializes its updates.
    lock: Mutex<()>,
    /// The records found at start, until each is resolved.
    pending: Mutex<Vec<MoveRecord>>,
}

impl MovesFile {
    /// The file of `home` (none for a host without one), its records read
    /// now: their volumes are refused until resolved.
    pub(super) fn load(home: &Path) -> MovesFile {
        let pending = if home.as_os_str().is_empty() {
            Vec::new()
        } else {
            read_records(home).unwrap_or_else(|e| {
                tracing::error!(error = %e.message, "{MOVES_FILE} cannot be read: interrupted moves are not resolved (fix or remove it)");
                Vec::new()
            })
        };
        MovesFile {
            home: home.to_path_buf(),
            lock: Mutex::new(()),
            pending: Mutex::new(pending),
        }
    }

    /// Whether volume `volume` of `pool` is named by a move a crash
    /// interrupted and that is not resolved yet (it must not be served).
    pub(super) fn blocks(&self, pool: &str, volume: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .any(|r| r.names(pool, volume))
    }

    fn update(&self, change: impl FnOnce(&mut Vec<MoveRecord>)) -> Result<()> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = read_records(&self.home)?;
        change(&mut all);
        write_records(&self.home, &all)
    }

    fn add(&self, r: &MoveRecord) -> Result<()> {
        self.update(|all| all.push(r.clone()))
    }

    /// Removes `r` (a failure leaves it for the next start, which finds
    /// the move finished or undone).
    fn remove(&self, r: &MoveRecord) {
        if let Err(e) = self.update(|all| all.retain(|x| x != r)) {
            tracing::warn!(error = %e.message, "could not update {MOVES_FILE}");
        }
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|x| x != r);
    }
}

fn read_records(home: &Path) -> Result<Vec<MoveRecord>> {
    super::file::read_list(home, MOVES_FILE)
}

fn write_records(home: &Path, records: &[MoveRecord]) -> Result<()> {
    super::file::write_list(home, MOVES_FILE, records)
}

/// A move's side of the world: what it made and holds.
struct Move {
    src: Arc<PoolCtx>,
    dst: Arc<PoolCtx>,
    record: MoveRecord,
    route: Arc<Route>,
    size_bytes: u64,
    /// `--without-snapshots`: they are not copied, and go with the source.
    without_snapshots: bool,
}

impl Move {
    /// Marks both volumes moving, or no longer.
    fn mark(&self, moving: bool) -> Result<()> {
        let r = &self.record;
        self.src
            .service
            .catalog()
            .set_moving(&r.volume, r.volume_id, moving)?;
        if let Err(e) = self
            .dst
            .service
            .catalog()
            .set_moving(&r.to, r.to_id, moving)
        {
            let _ = self
                .src
                .service
                .catalog()
                .set_moving(&r.volume, r.volume_id, false);
            return Err(e);
        }
        Ok(())
    }
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
        without_snapshots: bool,
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
        if self.moves.blocks(&src.name, volume) || self.moves.blocks(&dst.name, to) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "an interrupted move of {}/{volume} is being resolved",
                    src.name
                ),
            ));
        }
        let view = src.service.volume(volume)?;
        if self.schedules.names(&src.name, volume)? {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "volume {}/{volume} has a snapshot schedule: `vpool schedule remove` it first (and add it again once moved)",
                    src.name
                ),
            ));
        }
        if self.replicas.names(&src.name, volume)? {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "volume {}/{volume} is replicated: `vpool replica remove` it first (and add it again once moved)",
                    src.name
                ),
            ));
        }
        refuse_unmovable(&src, volume, &view)?;
        if src.name == dst.name && to == volume {
            return Err(Error::invalid(format!(
                "volume {}/{volume} is in pool {} already",
                src.name, dst.name
            )));
        }
        let made = dst.service.create_volume(to, view.info.size_bytes, false)?;
        let mv = Move {
            route: self.routes.get(&src.name, volume),
            record: MoveRecord {
                pool: src.name.clone(),
                volume: volume.to_string(),
                volume_id: view.info.id.0,
                to_pool: dst.name.clone(),
                to: to.to_string(),
                to_id: made.info.id.0,
            },
            size_bytes: view.info.size_bytes,
            without_snapshots,
            src,
            dst,
        };
        // The order matters for a crash: a record names a destination
        // that is marked incomplete already.
        // A failure undoes only what this call did (the marks of a move
        // already running stay).
        let begun = mv
            .dst
            .service
            .begin_import(to, false)
            .and_then(|_| mv.mark(true))
            .and_then(|()| {
                self.moves.add(&mv.record).inspect_err(|_| {
                    let _ = mv.mark(false);
                })
            });
        if let Err(e) = begun {
            delete_own(&mv.dst, &mv.record.to, mv.record.to_id);
            return Err(e);
        }
        let what = format!(
            "{}/{} -> {}/{}",
            mv.record.pool, mv.record.volume, mv.record.to_pool, mv.record.to
        );
        let spec = JobSpec::new("move", what)
            .in_pools(&[&mv.record.pool, &mv.record.to_pool])
            .at_most(max_rate_bytes_per_sec);
        let mut guard = MoveGuard {
            mv: Some(mv),
            moves: Arc::clone(&self.moves),
            routes: Arc::clone(&self.routes),
        };
        self.jobs.start(spec, move |ctl| {
            let out = guard.run(ctl);
            if out.is_ok() {
                guard.done();
            }
            out
        })
    }

    /// Finishes or undoes the moves a crash interrupted, once their pools
    /// are open (see the module doc); the others wait for the next start.
    pub(super) fn resolve_moves(&self) {
        let pending = self
            .moves
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for r in pending {
            let (Ok(src), Ok(dst)) = (self.pool(Some(&r.pool)), self.pool(Some(&r.to_pool))) else {
                tracing::warn!(pool = %r.pool, volume = %r.volume, "an interrupted move waits for its pools to open (its volumes are not served until the next start)");
                continue;
            };
            match resolve(&src, &dst, &r) {
                Ok(what) => {
                    tracing::warn!(pool = %r.pool, volume = %r.volume, to = %format!("{}/{}", r.to_pool, r.to), what, "a move interrupted by a crash");
                    self.moves.remove(&r);
                }
                Err(e) => {
                    tracing::error!(pool = %r.pool, volume = %r.volume, error = %e.message, "an interrupted move could not be resolved; it is tried again at the next start")
                }
            }
        }
    }
}

/// Whether volume `name` of `ctx` is still the one of id `id`.
fn is_own(ctx: &PoolCtx, name: &str, id: u64) -> Option<crate::pool::VolumeView> {
    ctx.service.volume(name).ok().filter(|v| v.info.id.0 == id)
}

/// Deletes volume `name` of `ctx` if it is still the one of id `id`.
fn delete_own(ctx: &PoolCtx, name: &str, id: u64) {
    if is_own(ctx, name, id).is_none() {
        return;
    }
    if let Err(e) = ctx.service.delete_volume(name, true) {
        tracing::warn!(pool = %ctx.name, volume = name, error = %e.message, "could not delete what a move made or left; delete it with `vpool vol delete`");
    }
}

/// Rolls an interrupted move back or forward; says which.
fn resolve(src: &PoolCtx, dst: &PoolCtx, r: &MoveRecord) -> Result<&'static str> {
    let Some(to) = is_own(dst, &r.to, r.to_id) else {
        return Ok("nothing to do: its destination is gone");
    };
    if to.incomplete {
        dst.service.delete_volume(&r.to, true)?;
        return Ok("rolled back: the destination is deleted, the source has every write");
    }
    if is_own(src, &r.volume, r.volume_id).is_some() {
        src.service.delete_volume(&r.volume, true)?;
        return Ok("rolled forward: the source is deleted, the destination has every write");
    }
    Ok("finished already")
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
    } else if view.replica.is_some() {
        Some("it is a replica (`vpool replica promote` it first)")
    } else if !(src.service.pool().clones_of(volume, None))
        .unwrap_or_default()
        .is_empty()
    {
        Some("clones were made from its snapshots (flatten or delete them first)")
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

/// A move's job: runs it, and undoes it if it did not finish when it goes
/// (a cancel, an error, a refused start).
struct MoveGuard {
    mv: Option<Move>,
    moves: Arc<MovesFile>,
    routes: Arc<Routes>,
}

impl MoveGuard {
    fn done(&mut self) {
        if let Some(mv) = self.mv.take() {
            let _ = mv.mark(false);
            self.moves.remove(&mv.record);
        }
    }

    /// The job; see the module doc.
    fn run(&self, ctl: &JobCtl) -> Result<serde_json::Value> {
        let mv = self.mv.as_ref().expect("until the job ends");
        ctl.set_total(mv.size_bytes);
        let device = |e: DeviceError| Error::new(ErrorKind::Failed, e.to_string());
        let dst = mv
            .dst
            .exports
            .open_incomplete(&mv.record.to)
            .map_err(device)?;
        // The copies write the destination's volume itself; the mirror, its
        // device. The snapshots first, oldest first, each as what changed
        // since the one before; then the volume, from the last of them on.
        let into = mv.dst.service.pool().volume(&mv.record.to)?;
        let (snapshot_bytes, last) = if mv.without_snapshots {
            (0, None)
        } else {
            copy_snapshots(ctl, mv, &into)?
        };
        let snapshots = mv
            .src
            .service
            .pool()
            .list_snapshots(&mv.record.volume)?
            .len() as u64;
        mv.dst
            .service
            .pool()
            .resize_volume(&mv.record.to, mv.size_bytes, true)?;
        mv.route
            .start_mirror(&mv.route.quiesce(), Arc::clone(&dst))?;
        // The changes since the last snapshot, taken once the mirror runs:
        // a write before it is among them, one after it is mirrored.
        let copied = match &last {
            None => copy_all(ctl, mv, &into),
            Some(s) => mv
                .src
                .service
                .pool()
                .diff(&mv.record.volume, Some(s), None)
                .map_err(Error::from)
                .and_then(|changes| {
                    copy_changes(ctl, mv, &into, &changes, (snapshot_bytes, snapshots))
                }),
        }
        .map(|n| n + snapshot_bytes);
        let copied = match copied {
            Ok(n) => n,
            Err(e) => {
                mv.route.undo(&mv.route.quiesce(), &dst);
                return Err(e);
            }
        };
        // Where the moved devices go: the destination on its own route, so
        // that a later move of it takes them along.
        let moved = MovableDevice::wrap(
            &self.routes,
            &mv.record.to_pool,
            &mv.record.to,
            Arc::clone(&dst),
        );
        if let Err(e) = commit(mv, &dst, moved) {
            mv.route.undo(&mv.route.quiesce(), &dst);
            return Err(e);
        }
        // Committed: nothing below may fail the job (its guard would delete
        // the destination). The source goes before its route, so that no
        // new device reaches it directly.
        let _ = mv
            .src
            .service
            .catalog()
            .set_moving(&mv.record.volume, mv.record.volume_id, false);
        if let Err(e) = mv.src.service.delete_volume(&mv.record.volume, true) {
            tracing::warn!(pool = %mv.record.pool, volume = %mv.record.volume, error = %e.message, "the volume moved but its source could not be deleted; it is deleted at the next start");
        }
        self.routes.forget(&mv.record.pool, &mv.record.volume);
        ctl.set_all_done();
        Ok(serde_json::json!({
            "volume": format!("{}/{}", mv.record.to_pool, mv.record.to),
            "size_bytes": mv.size_bytes,
            "data_bytes": copied,
        }))
    }
}

impl Drop for MoveGuard {
    fn drop(&mut self) {
        let Some(mv) = self.mv.take() else {
            return;
        };
        let _ = mv.mark(false);
        if is_own(&mv.dst, &mv.record.to, mv.record.to_id).is_some()
            && let Err(e) = mv.dst.service.delete_volume(&mv.record.to, true)
        {
            tracing::warn!(pool = %mv.record.to_pool, volume = %mv.record.to, error = %e.message, "could not delete an unfinished move's destination; it is deleted at the next start");
            return;
        }
        self.moves.remove(&mv.record);
    }
}

/// Copies every data extent of the source, a step at a time under the
/// step's stripes. Returns the bytes written.
fn copy_all(ctl: &JobCtl, mv: &Move, dst: &Volume) -> Result<u64> {
    let src = mv.src.service.pool().volume(&mv.record.volume)?;
    let mut buf = Vec::new();
    let mut written = 0u64;
    let mut at = 0u64;
    while at < mv.size_bytes {
        // Before the step's stripes: a pause holds no client up.
        ctl.pace(written)?;
        mv.route.check_mirror()?;
        let end = (at + MOVE_STEP_BYTES).min(mv.size_bytes);
        let _g = mv.route.exclusive(at, end - at);
        written += copy_exact(&src, dst, at, end - at, true, &mut buf)?;
        at = end;
        ctl.set_done(at);
    }
    Ok(written)
}

/// Copies the source's snapshots into the destination, oldest first: for
/// each, what changed since the one before (all of it for the first)
/// written into the destination's volume, resized to the snapshot's size,
/// then a snapshot of the same name taken of it. Returns the bytes
/// written and the last snapshot's name.
fn copy_snapshots(ctl: &JobCtl, mv: &Move, dst: &Volume) -> Result<(u64, Option<String>)> {
    let from = mv.src.service.pool();
    let into = mv.dst.service.pool();
    let snaps = from.list_snapshots(&mv.record.volume)?;
    ctl.set_total(mv.size_bytes.saturating_mul(snaps.len() as u64 + 1));
    let mut buf = Vec::new();
    let mut written = 0u64;
    let mut last: Option<String> = None;
    for (i, snap) in snaps.iter().enumerate() {
        into.resize_volume(&mv.record.to, snap.size_bytes, true)?;
        let image = from.snapshot(&mv.record.volume, &snap.name)?;
        let base = mv.size_bytes.saturating_mul(i as u64);
        // The first whole (the engine's diff has no empty image to start
        // from), a step at a time; the others as their diffs.
        let ranges: Vec<(u64, u64)> = match &last {
            None => split(0, snap.size_bytes, WHOLE_STEP_BYTES).collect(),
            // (Split: one range may be the whole disk rewritten.)
            Some(prev) => from
                .diff(&mv.record.volume, Some(prev), Some(&snap.name))?
                .into_iter()
                .flat_map(|e| split(e.offset, e.len, WHOLE_STEP_BYTES))
                .collect(),
        };
        for (at, len) in ranges {
            ctl.pace(written)?;
            written += copy_exact(&image, dst, at, len, last.is_none(), &mut buf)?;
            ctl.set_done(base + (at + len).min(mv.size_bytes));
        }
        into.create_snapshot(&mv.record.to, &snap.name)?;
        last = Some(snap.name.clone());
    }
    Ok((written, last))
}

/// Copies the volume's changes since its last snapshot (`changes`, a
/// diff taken before the mirror began) while the mirror runs: each range,
/// a step at a time under the step's stripes, made equal to what the
/// source holds now (a mirrored write of it since is there already).
/// Returns the bytes written; `before` were written by the job already.
fn copy_changes(
    ctl: &JobCtl,
    mv: &Move,
    dst: &Volume,
    changes: &[vpool_engine::DiffExtent],
    (before, snapshots): (u64, u64),
) -> Result<u64> {
    let src = mv.src.service.pool().volume(&mv.record.volume)?;
    let base = mv.size_bytes.saturating_mul(snapshots);
    let mut buf = Vec::new();
    let mut written = 0u64;
    for e in changes {
        let mut at = e.offset;
        let end = (e.offset + e.len).min(mv.size_bytes);
        while at < end {
            ctl.pace(before + written)?;
            mv.route.check_mirror()?;
            let step_end = (at + MOVE_STEP_BYTES).min(end);
            let _g = mv.route.exclusive(at, step_end - at);
            written += copy_exact(&src, dst, at, step_end - at, false, &mut buf)?;
            at = step_end;
            ctl.set_done(base + at);
        }
    }
    Ok(written)
}

/// `[offset, offset + len)` in pieces of at most `step` bytes.
fn split(offset: u64, len: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(step)).map(move |i| (offset + i * step, step.min(len - i * step)))
}

/// The commit: with every request held, the check, both sides flushed,
/// the destination complete, then every device on it.
fn commit(mv: &Move, dst: &Arc<dyn BlockDevice>, moved: Arc<dyn BlockDevice>) -> Result<()> {
    let held = mv.route.quiesce();
    let now = mv.src.service.volume(&mv.record.volume)?;
    if now.info.size_bytes != mv.size_bytes {
        return Err(Error::new(
            ErrorKind::InUse,
            format!(
                "volume {}/{} was resized during its move; move it again",
                mv.record.pool, mv.record.volume
            ),
        ));
    }
    mv.route.check_commit(dst)?;
    mv.src.service.flush()?;
    dst.flush()
        .map_err(|e| Error::new(ErrorKind::Failed, e.to_string()))?;
    // The commit point. No request runs (all held), so the route is as
    // checked: the switch below cannot fail.
    mv.dst.service.end_import(&mv.record.to)?;
    mv.route.commit(&held, moved);
    Ok(())
}
