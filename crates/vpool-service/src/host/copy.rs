//! `vol copy`: a volume, or one of its snapshots, copied under a new name
//! into any pool the daemon holds (local, on S3, shared), as a job
//! (`crate::jobs`) with progress and cancel.
//!
//! What is copied is one point in time: a snapshot given, a sealed
//! template (read-only), or else a snapshot the copy takes of the live
//! volume when it starts (`copy-<unix ms>-<n>`, deleted when the job
//! ends), so
//! a VM may keep writing the source. Holes stay holes: only the source's
//! data extents are read, and blocks of zeros in them are not written.
//!
//! The destination is made before the job starts (a name that exists, a
//! pool that does not, are refused at once) and marked incomplete (as an
//! import: NBD refuses it, `vol list` says so) until its last byte is
//! flushed; a cancel or an error deletes it. A daemon killed during a copy
//! leaves it marked incomplete: `vol delete` it (or copy again under
//! another name).
//!
//! Not yet: clones of a shared pool's template as a source (their own
//! volume holds only what they wrote: flatten them first).

use std::sync::Arc;

use vpool_engine::{STATE_ZERO, Volume};

use super::shared::SharedCtx;
use super::{Host, PoolCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobCtl, JobInfo, JobSpec};

/// Bytes read and written per step (the job's memory, and how often it
/// looks for a cancel).
const COPY_CHUNK_BYTES: usize = 1 << 20;
/// Most extents asked of the source at a time.
const MAX_EXTENTS: usize = 1024;

/// Numbers the snapshots copies take (with the time, unique across
/// restarts: one a crash left does not stand in the way).
static NEXT_POINT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Where a copy reads.
struct Source {
    ctx: Arc<PoolCtx>,
    volume: String,
    /// The snapshot read; `None`: the volume itself (a sealed template).
    snapshot: Option<String>,
    /// A snapshot this copy took, deleted when it ends.
    temporary: bool,
    /// The volume is not renamed or trashed while the copy reads it.
    _hold: crate::catalog::CopyHold,
}

/// A copy under way: when it goes, the source's temporary snapshot is
/// deleted, and the destination too unless the copy finished.
struct Copy {
    src: Source,
    dst: Destination,
    finished: bool,
}

impl Copy {
    /// The copy finished: its destination stays.
    fn keep(&mut self) {
        self.finished = true;
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        self.src.end();
        if !self.finished {
            self.dst.delete();
        }
    }
}

/// Where a copy writes: a volume it made, which it deletes unless it
/// finishes.
struct Destination {
    ctx: Arc<PoolCtx>,
    /// Set when the pool is shared (the volume is deleted through it).
    shared: Option<Arc<SharedCtx>>,
    volume: String,
    /// The volume's id: a volume made again under its name (the copy's
    /// deleted meanwhile) is not the copy's to delete.
    id: u64,
    pool: String,
}

impl Host {
    /// Starts copying `volume` of `pool` (or its `snapshot`) into pool
    /// `to_pool` as volume `to`; see the module doc. Returns the job.
    /// Blocking (makes the destination and the source's snapshot).
    pub fn copy_volume(
        &self,
        pool: Option<&str>,
        volume: &str,
        snapshot: Option<&str>,
        to_pool: Option<&str>,
        to: &str,
        max_rate_bytes_per_sec: Option<u64>,
    ) -> Result<JobInfo> {
        crate::names::check_volume_name(to)?;
        let (ctx, template) = self.copy_source_pool(pool, volume)?;
        let view = ctx.service.volume(volume)?;
        if view.replica.is_some() && snapshot.is_none() {
            return Err(Error::invalid(format!(
                "volume {}/{volume} is a replica, whose head is half a run between two points: copy one of its points ({volume}@POINT)",
                ctx.name
            )));
        }
        if view.incomplete {
            return Err(Error::invalid(format!(
                "volume {}/{volume} is incomplete (an import or a copy into it did not finish): there is nothing whole to copy",
                ctx.name
            )));
        }
        // The point in time first, and the size from it: a resize
        // meanwhile changes neither.
        let src = self.copy_point(&ctx, volume, snapshot, template)?;
        let size_bytes = match src.image().and_then(|i| Ok(i.size_bytes()?)) {
            Ok(n) => n,
            Err(e) => {
                src.end();
                return Err(e);
            }
        };
        let dst = match self.copy_destination(to_pool, to, size_bytes) {
            Ok(d) => d,
            Err(e) => {
                src.end();
                return Err(e);
            }
        };
        let what = format!(
            "{}/{} -> {}/{}",
            src.ctx.name,
            image(volume, snapshot),
            dst.pool,
            dst.volume
        );
        let mut copy = Copy {
            src,
            dst,
            finished: false,
        };
        // Refused (too many jobs), the closure is dropped unrun, and the
        // copy's drop cleans up.
        let spec = JobSpec::new("copy", what)
            .in_pools(&[&copy.src.ctx.name, &copy.dst.pool])
            .at_most(max_rate_bytes_per_sec);
        self.jobs.start(spec, move |ctl| {
            let outcome = run(ctl, &copy.src, &copy.dst, size_bytes);
            if outcome.is_ok() {
                copy.keep();
            }
            outcome
        })
    }

    /// The open pool that holds `volume`, and whether `volume` is a
    /// sealed template (read as it is).
    fn copy_source_pool(&self, pool: Option<&str>, volume: &str) -> Result<(Arc<PoolCtx>, bool)> {
        let Some(sh) = self.shared(pool) else {
            let ctx = self.pool(pool)?;
            let template = ctx.service.volume(volume)?.template.is_some();
            return Ok((ctx, template));
        };
        if sh.is_clone(volume) {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "volume {}/{volume} is a clone of a template, whose own volume holds only what it wrote: `vpool vol flatten` it first",
                    sh.name
                ),
            ));
        }
        match sh.family(volume) {
            Ok(f) => Ok((f, false)),
            Err(e) if e.kind == ErrorKind::ReadOnly => {
                let view = sh.sealed_family(&*self.opener, volume)?.ok_or(e)?;
                Ok((view, true))
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the destination volume, empty, of `size_bytes`, marked
    /// incomplete.
    fn copy_destination(
        &self,
        pool: Option<&str>,
        to: &str,
        size_bytes: u64,
    ) -> Result<Destination> {
        let dst = match self.shared(pool) {
            Some(sh) => {
                let view = sh.create_volume(&*self.opener, to, size_bytes, None)?;
                let ctx = match sh.family(to) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = sh.delete(to, true);
                        return Err(e);
                    }
                };
                Destination {
                    ctx,
                    pool: sh.name.clone(),
                    shared: Some(sh),
                    volume: to.to_string(),
                    id: view.info.id.0,
                }
            }
            None => {
                let ctx = self.pool(pool)?;
                let view = ctx.service.create_volume(to, size_bytes, false)?;
                Destination {
                    pool: ctx.name.clone(),
                    ctx,
                    shared: None,
                    volume: to.to_string(),
                    id: view.info.id.0,
                }
            }
        };
        if let Err(e) = dst.ctx.service.begin_import(to, false).map(drop) {
            dst.delete();
            return Err(e);
        }
        Ok(dst)
    }

    /// The point in time a copy reads: `snapshot`, the template itself, or
    /// a snapshot taken now.
    fn copy_point(
        &self,
        ctx: &Arc<PoolCtx>,
        volume: &str,
        snapshot: Option<&str>,
        template: bool,
    ) -> Result<Source> {
        let id = ctx.service.volume(volume)?.info.id.0;
        let hold = ctx.service.catalog().hold_for_copy(id);
        let (snapshot, temporary) = match snapshot {
            Some(s) => (Some(s.to_string()), false),
            None if template => (None, false),
            None => {
                let unix_ms = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let n = NEXT_POINT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let name = format!("copy-{unix_ms}-{n}");
                ctx.service.create_snapshot(volume, &name)?;
                (Some(name), true)
            }
        };
        Ok(Source {
            ctx: Arc::clone(ctx),
            volume: volume.to_string(),
            snapshot,
            temporary,
            _hold: hold,
        })
    }
}

fn image(volume: &str, snapshot: Option<&str>) -> String {
    match snapshot {
        Some(s) => format!("{volume}@{s}"),
        None => volume.to_string(),
    }
}

impl Source {
    fn image(&self) -> Result<Volume> {
        self.ctx
            .service
            .image(&self.volume, self.snapshot.as_deref())
    }

    /// Deletes the snapshot the copy took, if it took one.
    fn end(&self) {
        let Some(s) = self.snapshot.as_deref().filter(|_| self.temporary) else {
            return;
        };
        if let Err(e) = self.ctx.service.delete_snapshot(&self.volume, s) {
            tracing::warn!(pool = %self.ctx.name, volume = %self.volume, snapshot = s, error = %e.message, "could not delete a copy's snapshot");
        }
    }
}

impl Destination {
    /// Deletes the volume the copy made (it did not finish).
    fn delete(&self) {
        match self.ctx.service.volume(&self.volume) {
            Ok(v) if v.info.id.0 == self.id => {}
            // Gone, or another volume of that name now.
            _ => return,
        }
        let deleted = match &self.shared {
            Some(sh) => sh.delete(&self.volume, true),
            None => self.ctx.service.delete_volume(&self.volume, true),
        };
        if let Err(e) = deleted {
            tracing::warn!(pool = %self.pool, volume = %self.volume, error = %e.message, "could not delete what an unfinished copy made; delete it with `vpool vol delete`");
        }
    }
}

/// The job: every data extent of the source into the destination, then a
/// flush, then the incomplete mark goes.
fn run(
    ctl: &JobCtl,
    src: &Source,
    dst: &Destination,
    size_bytes: u64,
) -> Result<serde_json::Value> {
    ctl.set_total(size_bytes);
    let from = src.image()?;
    let into = dst.ctx.service.pool().volume(&dst.volume)?;
    let mut buf = Vec::new();
    let mut data_bytes = 0u64;
    let step = COPY_CHUNK_BYTES as u64;
    let mut at = 0u64;
    while at < size_bytes {
        ctl.pace(data_bytes)?;
        let len = step.min(size_bytes - at);
        data_bytes += copy_exact(&from, &into, at, len, true, &mut buf)?;
        at += len;
        ctl.set_done(at);
    }
    into.flush()?;
    dst.ctx.service.end_import(&dst.volume)?;
    Ok(serde_json::json!({
        "volume": format!("{}/{}", dst.pool, dst.volume),
        "size_bytes": size_bytes,
        "data_bytes": data_bytes,
    }))
}

/// Makes `[offset, offset + len)` of `dst` what it is in `src`: data
/// copied, zeros zeroed; into a `fresh` destination, which reads zeros
/// already, ranges and chunks of zeros are left alone (holes stay holes).
/// Reads and writes at most [`COPY_CHUNK_BYTES`] at a time, in `buf`.
/// Returns the bytes of data written. Shared by copies and moves.
pub(super) fn copy_exact(
    src: &Volume,
    dst: &Volume,
    offset: u64,
    len: u64,
    fresh: bool,
    buf: &mut Vec<u8>,
) -> Result<u64> {
    let mut written = 0u64;
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let extents = src.block_status(pos, end - pos, MAX_EXTENTS)?;
        if extents.is_empty() || extents.iter().any(|e| e.0 == 0) {
            return Err(Error::internal(format!(
                "block status of {} at {pos} made no progress",
                src.name()
            )));
        }
        for (n, flags) in extents {
            let n = n.min(end - pos);
            if flags & STATE_ZERO != 0 {
                if !fresh {
                    dst.write_zeroes(pos, n, true)?;
                }
            } else {
                let mut at = pos;
                while at < pos + n {
                    let m = (pos + n - at).min(COPY_CHUNK_BYTES as u64);
                    buf.resize(usize::try_from(m).expect("at most a chunk"), 0);
                    src.read(at, buf)?;
                    if !(fresh && buf.iter().all(|&b| b == 0)) {
                        dst.write(at, buf)?;
                        written += m;
                    }
                    at += m;
                }
            }
            pos += n;
            if pos >= end {
                break;
            }
        }
    }
    Ok(written)
}
