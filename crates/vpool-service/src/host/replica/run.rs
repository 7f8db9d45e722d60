//! One replication run, and a verify of a point; see the parent module's
//! doc for what a run does and how it survives an interruption.

use std::sync::Arc;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::{PROGRESS_EVERY_BYTES, Point, Progress, ReplicaRecord, Replicas, is_point, point_name};
use crate::error::{Error, ErrorKind, Result};
use crate::host::PoolCtx;
use crate::host::copy::copy_exact;
use crate::jobs::JobCtl;

/// Bytes of the source's image per step: the unit of pace, cancel and
/// progress.
const STEP_BYTES: u64 = 8 << 20;
/// Bytes a verify reads of each side at a time.
const VERIFY_CHUNK_BYTES: usize = 4 << 20;

/// The run job of the replication `key`: see the parent module doc.
pub(super) fn run(
    ctl: &JobCtl,
    replicas: &Replicas,
    key: &str,
    src: &Arc<PoolCtx>,
    dst: &Arc<PoolCtx>,
) -> Result<serde_json::Value> {
    let started = Instant::now();
    let r = replicas
        .records()?
        .into_iter()
        .find(|r| r.key() == key)
        .ok_or_else(|| Error::new(ErrorKind::NotFound, format!("{key} is not replicated")))?;
    check_sides(&r, src, dst)?;
    let (mut progress, resumed) = begin(replicas, &r, src)?;
    let ranges = plan(replicas, &r, &mut progress, src)?;
    let changed_bytes: u64 = ranges.iter().map(|&(_, len)| len).sum();
    let moved_bytes = copy_ranges(ctl, replicas, &r, &progress, &ranges, (src, dst))?;
    finish(replicas, &r, &progress.point, src, dst)?;
    ctl.set_all_done();
    let out = serde_json::json!({
        "point": progress.point.name,
        "to": format!("{}/{}", r.to_pool, r.to),
        "changed_bytes": changed_bytes,
        "moved_bytes": moved_bytes,
        "whole": progress.whole,
        "resumed": resumed,
        "took_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    });
    tracing::info!(volume = %key, point = %progress.point.name, changed_bytes, moved_bytes, resumed, "replication run finished");
    Ok(out)
}

/// Both volumes are still the replication's: the source that id, the
/// replica that id and still marked one.
fn check_sides(r: &ReplicaRecord, src: &PoolCtx, dst: &PoolCtx) -> Result<()> {
    if !src.has_volume(&r.volume, r.volume_id) {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "the replicated volume {} is gone (deleted or moved): `vpool replica remove {}`",
                r.key(),
                r.key()
            ),
        ));
    }
    if !dst
        .service
        .volume(&r.to)
        .is_ok_and(|v| v.info.id.0 == r.to_id && v.replica.is_some() && v.template.is_none())
    {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!(
                "the replica {}/{} is gone or was promoted: `vpool replica remove {}`",
                r.to_pool,
                r.to,
                r.key()
            ),
        ));
    }
    Ok(())
}

/// The run's point: the interrupted run's if its snapshot is still there
/// (resumed: `true`), else a new snapshot of the source, recorded before
/// anything is copied.
fn begin(replicas: &Replicas, r: &ReplicaRecord, src: &PoolCtx) -> Result<(Progress, bool)> {
    let snaps = src.service.list_snapshots(&r.volume)?;
    let has = |name: &str| snaps.iter().any(|s| s.name == name);
    if let Some(p) = r.running.as_ref().filter(|p| has(&p.point.name)) {
        return Ok((p.clone(), true));
    }
    // An interrupted run whose point is gone left part of that point in
    // the replica, where the next diff may not look: all of it again.
    let lost = r.running.is_some();
    let base = r.base.as_ref().map(|b| b.name.as_str());
    // Points a crash left between taking and recording them.
    delete_points(src, &r.volume, r.volume_id, base);
    let unix_ms = crate::jobs::unix_ms();
    let point = Point {
        name: point_name(unix_ms),
        unix_ms,
    };
    src.service.create_snapshot(&r.volume, &point.name)?;
    let p = Progress {
        point,
        done_offset: 0,
        fresh: r.base.is_none() && !lost,
        whole: r.base.is_none() || lost,
    };
    if let Err(e) = replicas.update(&r.key(), |x| x.running = Some(p.clone())) {
        let _ = src.service.delete_snapshot(&r.volume, &p.point.name);
        return Err(e);
    }
    Ok((p, false))
}

/// The ranges of the source's point to copy: what changed since the base,
/// or all of it for a whole run (one whose base is gone on either side
/// becomes one, from the start). In pieces of at most [`STEP_BYTES`].
fn plan(
    replicas: &Replicas,
    r: &ReplicaRecord,
    p: &mut Progress,
    src: &PoolCtx,
) -> Result<Vec<(u64, u64)>> {
    let from = src.service.pool();
    let size_bytes = src.service.snapshot(&r.volume, &p.point.name)?.size_bytes;
    if !p.whole {
        let base = r.base.as_ref().map(|b| b.name.as_str()).unwrap_or("");
        match from.diff(&r.volume, Some(base), Some(&p.point.name)) {
            Ok(changes) => {
                return Ok(changes
                    .iter()
                    .flat_map(|e| split(e.offset, e.len, STEP_BYTES))
                    .collect());
            }
            Err(e) => {
                tracing::warn!(volume = %r.key(), base, error = %e, "the base point is gone: copying the whole volume");
                *p = Progress {
                    done_offset: 0,
                    fresh: false,
                    whole: true,
                    ..p.clone()
                };
                replicas.update(&r.key(), |x| x.running = Some(p.clone()))?;
            }
        }
    }
    Ok(split(0, size_bytes, STEP_BYTES).collect())
}

/// Copies `ranges` of the point into the replica's head (resized to the
/// point's size first), from where an interrupted run got to, saving how
/// far it got every [`PROGRESS_EVERY_BYTES`] after a flush. Returns the
/// bytes of data written.
fn copy_ranges(
    ctl: &JobCtl,
    replicas: &Replicas,
    r: &ReplicaRecord,
    p: &Progress,
    ranges: &[(u64, u64)],
    (src, dst): (&PoolCtx, &PoolCtx),
) -> Result<u64> {
    let image = src.service.image(&r.volume, Some(&p.point.name))?;
    let into = dst.service.pool();
    into.resize_volume(&r.to, image.size_bytes()?, true)?;
    let head = into.volume(&r.to)?;
    ctl.set_total(ranges.iter().map(|&(_, len)| len).sum());
    let mut buf = Vec::new();
    let (mut moved, mut done, mut unsaved) = (0u64, 0u64, 0u64);
    for &(at, len) in ranges {
        done += len;
        let end = at + len;
        if end <= p.done_offset {
            continue;
        }
        ctl.pace(moved)?;
        let start = at.max(p.done_offset);
        moved += copy_exact(&image, &head, start, end - start, p.fresh, &mut buf)?;
        unsaved += end - start;
        ctl.set_done(done);
        if unsaved >= PROGRESS_EVERY_BYTES {
            dst.service.flush()?;
            replicas.update(&r.key(), |x| {
                if let Some(run) = x.running.as_mut() {
                    run.done_offset = end;
                }
            })?;
            unsaved = 0;
        }
    }
    Ok(moved)
}

/// The point is in the replica: flushed, a snapshot of it taken, the
/// replica's catalog told, old points beyond `--keep` deleted, the record's
/// base moved on, the source's old base deleted. Each step is safe to
/// repeat, in this order, after a crash.
fn finish(
    replicas: &Replicas,
    r: &ReplicaRecord,
    point: &Point,
    src: &PoolCtx,
    dst: &PoolCtx,
) -> Result<()> {
    dst.service.flush()?;
    let into = dst.service.pool();
    if !into
        .list_snapshots(&r.to)?
        .iter()
        .any(|s| s.name == point.name)
    {
        into.create_snapshot(&r.to, &point.name)?;
    }
    dst.service
        .catalog()
        .set_replica_point(&r.to, r.to_id, &point.name)?;
    prune(r, dst);
    replicas.update(&r.key(), |x| {
        x.base = Some(point.clone());
        x.running = None;
    })?;
    if let Some(old) = r.base.as_ref().filter(|b| b.name != point.name)
        && let Err(e) = src.service.delete_snapshot(&r.volume, &old.name)
    {
        tracing::warn!(volume = %r.key(), point = %old.name, error = %e.message, "could not delete the source's previous point; the next run does");
    }
    Ok(())
}

/// Deletes the replica's oldest points beyond its `keep` (the newest is
/// never deleted).
fn prune(r: &ReplicaRecord, dst: &PoolCtx) {
    let into = dst.service.pool();
    let Ok(snaps) = into.list_snapshots(&r.to) else {
        return;
    };
    // Oldest first by the log's order, not by name: a clock stepped back
    // names a new point before old ones.
    let mut points: Vec<(u64, &str)> = snaps
        .iter()
        .filter(|s| is_point(&s.name))
        .map(|s| (s.seq, s.name.as_str()))
        .collect();
    points.sort_unstable();
    let keep = usize::try_from(r.keep.max(1)).unwrap_or(usize::MAX);
    let extra = points.len().saturating_sub(keep);
    for (_, name) in &points[..extra] {
        if let Err(e) = into.delete_snapshot(&r.to, name) {
            tracing::warn!(replica = %format!("{}/{}", r.to_pool, r.to), point = name, error = %e, "could not delete an old point");
        }
    }
}

/// Deletes the replication points of `volume` of `src` (that id), all but
/// `except`.
pub(super) fn delete_points(src: &PoolCtx, volume: &str, id: u64, except: Option<&str>) {
    if !src.has_volume(volume, id) {
        return;
    }
    let Ok(snaps) = src.service.list_snapshots(volume) else {
        return;
    };
    for s in snaps
        .iter()
        .filter(|s| is_point(&s.name) && Some(s.name.as_str()) != except)
    {
        if let Err(e) = src.service.delete_snapshot(volume, &s.name) {
            tracing::warn!(pool = %src.name, volume, point = %s.name, error = %e.message, "could not delete a replication point; delete it with `vpool snap delete`");
        }
    }
}

/// The verify job: point `point` of the source and of the replica read a
/// piece at a time, each piece's SHA-256 compared. Fails at the first
/// difference; says the image's digest when they are equal.
pub(super) fn verify(
    ctl: &JobCtl,
    r: &ReplicaRecord,
    point: &str,
    src: &PoolCtx,
    dst: &PoolCtx,
) -> Result<serde_json::Value> {
    let a = src.service.image(&r.volume, Some(point))?;
    let b = dst.service.image(&r.to, Some(point))?;
    let size_bytes = a.size_bytes()?;
    if b.size_bytes()? != size_bytes {
        return Err(Error::new(
            ErrorKind::Failed,
            format!(
                "{}@{point} is {size_bytes} bytes, the replica's {} bytes",
                r.key(),
                b.size_bytes()?
            ),
        ));
    }
    ctl.set_total(size_bytes);
    let (mut x, mut y) = (vec![0u8; VERIFY_CHUNK_BYTES], vec![0u8; VERIFY_CHUNK_BYTES]);
    let mut whole = Sha256::new();
    let mut at = 0u64;
    while at < size_bytes {
        ctl.pace(at.saturating_mul(2))?;
        let n = usize::try_from((size_bytes - at).min(VERIFY_CHUNK_BYTES as u64))
            .expect("at most a chunk");
        a.read(at, &mut x[..n])?;
        b.read(at, &mut y[..n])?;
        if Sha256::digest(&x[..n]) != Sha256::digest(&y[..n]) {
            return Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "the replica {}/{}@{point} differs from {}@{point} in the {n} bytes at offset {at}",
                    r.to_pool,
                    r.to,
                    r.key()
                ),
            ));
        }
        whole.update(&x[..n]);
        at += n as u64;
        ctl.set_done(at);
    }
    Ok(serde_json::json!({
        "point": point,
        "compared_bytes": size_bytes,
        "equal": true,
        "digest": format!("sha256:{}", crate::catalog::hex(&whole.finalize())),
    }))
}

/// `[offset, offset + len)` in pieces of at most `step` bytes.
fn split(offset: u64, len: u64, step: u64) -> impl Iterator<Item = (u64, u64)> {
    (0..len.div_ceil(step)).map(move |i| (offset + i * step, step.min(len - i * step)))
}
