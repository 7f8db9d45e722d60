//! Snapshot schedules: `vpool schedule add db1 --every 1h --keep 24`, as
//! Longhorn's recurring snapshot jobs and ZFS's auto-snapshot do it.
//!
//! A schedule names a volume (by pool, name and id), a period, how many of
//! its snapshots to keep and their name prefix. The daemon keeps them in
//! `<home>/schedules.json` and looks at them on the tick of the replication
//! scheduler (`super::replica`): one that is due takes a snapshot
//! `<prefix>-20261207T172300.123Z` (UTC; names sort as times do), unless
//! nothing changed since its last one (the engine's diff of that snapshot
//! and the volume is empty: skipped, and counted), then deletes its oldest
//! snapshots beyond `--keep`. A snapshot a clone needs is never deleted
//! (the engine refuses; it is kept beside `--keep` others). Only snapshots
//! with the schedule's prefix and a time are its own: the user's are never
//! touched. A run that fails is tried again after at most 10 s. A volume
//! with a schedule is not moved (its id changes: remove the schedule
//! first).
//!
//! A snapshot is a metadata operation (one record in the pool's log), so a
//! schedule's run is not a job: it runs on the scheduler's thread.
//!
//! Not yet: `--cron` (times of day), events for each run (the daemon's log
//! has a line), schedules of shared pools' volumes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Host;
use crate::error::{Error, ErrorKind, Result};

/// The record of the schedules, in the home.
const SCHEDULES_FILE: &str = "schedules.json";
/// Most schedules one daemon runs.
pub const MAX_SCHEDULES: usize = 1024;
/// Most snapshots a schedule keeps.
pub const MAX_KEEP: u32 = 10_000;
/// Shortest period.
pub const MIN_EVERY_SECS: u64 = 1;
/// How long a schedule whose run failed waits before it tries again (at
/// most its period).
const RETRY_FAILED: Duration = Duration::from_secs(10);
/// The prefix of a schedule's snapshots when none is given.
pub const DEFAULT_PREFIX: &str = "auto";

/// One schedule, as `schedules.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleRecord {
    id: u64,
    pool: String,
    volume: String,
    volume_id: u64,
    every_secs: u64,
    keep: u32,
    prefix: String,
}

/// What `schedule add` asks.
#[derive(Clone, Debug)]
pub struct ScheduleSpec {
    pub every_secs: u64,
    pub keep: u32,
    /// Default [`DEFAULT_PREFIX`].
    pub prefix: Option<String>,
}

/// A schedule as `schedule list` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleInfo {
    pub id: u64,
    /// `POOL/VOLUME`.
    pub volume: String,
    pub every_secs: u64,
    pub keep: u32,
    pub prefix: String,
    /// Its snapshots the volume has now.
    #[serde(default)]
    pub snapshots: Option<u64>,
    /// Its newest snapshot.
    #[serde(default)]
    pub last_snapshot: Option<String>,
    /// Since the daemon started: snapshots taken, runs skipped (nothing
    /// had changed), runs failed.
    pub taken: u64,
    pub skipped: u64,
    pub failures: u64,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What the daemon knows of a schedule beyond its record.
#[derive(Default)]
struct Stats {
    last_run: Option<Instant>,
    /// A run that failed is tried again then.
    retry_at: Option<Instant>,
    taken: u64,
    skipped: u64,
    failures: u64,
    last_error: Option<String>,
}

/// `schedules.json` and what the daemon knows of each schedule.
pub(super) struct Schedules {
    home: std::path::PathBuf,
    /// Serializes updates of the file.
    file: Mutex<()>,
    stats: Mutex<BTreeMap<u64, Stats>>,
}

impl Schedules {
    pub(super) fn new(home: &std::path::Path) -> Schedules {
        Schedules {
            home: home.to_path_buf(),
            file: Mutex::new(()),
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    fn records(&self) -> Result<Vec<ScheduleRecord>> {
        if self.home.as_os_str().is_empty() {
            return Ok(Vec::new());
        }
        let _g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        super::file::read_list(&self.home, SCHEDULES_FILE)
    }

    fn change<T>(&self, f: impl FnOnce(&mut Vec<ScheduleRecord>) -> Result<T>) -> Result<T> {
        let _g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = super::file::read_list(&self.home, SCHEDULES_FILE)?;
        let out = f(&mut all)?;
        super::file::write_list(&self.home, SCHEDULES_FILE, &all)?;
        Ok(out)
    }

    /// Whether volume `volume` of `pool` has a schedule.
    pub(super) fn names(&self, pool: &str, volume: &str) -> Result<bool> {
        Ok(self
            .records()?
            .iter()
            .any(|r| r.pool == pool && r.volume == volume))
    }

    /// Volume `volume` (id `id`) of `pool` is called `new` now: its
    /// schedules follow it.
    pub(super) fn rename(&self, pool: &str, volume: &str, id: u64, new: &str) -> Result<()> {
        if self.home.as_os_str().is_empty() || !self.names(pool, volume)? {
            return Ok(());
        }
        self.change(|all| {
            for r in all.iter_mut() {
                if r.pool == pool && r.volume == volume && r.volume_id == id {
                    r.volume = new.to_string();
                }
            }
            Ok(())
        })
    }

    fn with_stats<T>(&self, id: u64, f: impl FnOnce(&mut Stats) -> T) -> T {
        let mut g = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(g.entry(id).or_default())
    }
}

fn check_spec(spec: &ScheduleSpec) -> Result<()> {
    if spec.every_secs < MIN_EVERY_SECS {
        return Err(Error::invalid(format!(
            "--every is at least {MIN_EVERY_SECS} s"
        )));
    }
    if spec.keep == 0 || spec.keep > MAX_KEEP {
        return Err(Error::invalid(format!("--keep is 1 to {MAX_KEEP}")));
    }
    if let Some(p) = &spec.prefix {
        // The snapshot names it makes must be valid (a name's length
        // included), and not the replication's.
        let name = format!("{p}-{}", super::replica::utc_stamp(0));
        if p.is_empty()
            || p.starts_with(super::replica::POINT_PREFIX.trim_end_matches('-'))
            || crate::names::check_volume_name(&name).is_err()
        {
            return Err(Error::invalid(format!(
                "{p:?} is not a schedule prefix: the snapshot names it makes ({name}) must be valid snapshot names, and it may not start with `replica`"
            )));
        }
    }
    Ok(())
}

impl Host {
    /// Adds a snapshot schedule for `volume` of `pool`; see the module doc.
    pub fn add_schedule(
        &self,
        pool: Option<&str>,
        volume: &str,
        spec: &ScheduleSpec,
    ) -> Result<ScheduleInfo> {
        check_spec(spec)?;
        if self.home.as_os_str().is_empty() {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "this host has no home to record schedules in",
            ));
        }
        if let Some(sh) = self.shared(pool) {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "pool {} is shared: schedules of its volumes are not built yet",
                    sh.name
                ),
            ));
        }
        let ctx = self.pool(pool)?;
        let view = ctx.service.volume(volume)?;
        if ctx.service.catalog().is_moving(view.info.id.0) {
            return Err(crate::catalog::moving(
                &format!("{}/{volume}", ctx.name),
                "a schedule",
            ));
        }
        if view.template.is_some() || view.replica.is_some() || view.info.ephemeral {
            return Err(Error::invalid(format!(
                "volume {}/{volume} is a template, a replica or ephemeral: no schedule for it",
                ctx.name
            )));
        }
        let prefix = spec
            .prefix
            .clone()
            .unwrap_or_else(|| DEFAULT_PREFIX.to_string());
        let rec = self.schedules.change(|all| {
            if all.len() >= MAX_SCHEDULES {
                return Err(Error::new(
                    ErrorKind::NoSpace,
                    format!("this daemon runs {MAX_SCHEDULES} schedules already"),
                ));
            }
            if all
                .iter()
                .any(|r| r.pool == ctx.name && r.volume == volume && r.prefix == prefix)
            {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "volume {}/{volume} has a schedule with prefix {prefix:?} already (give another --prefix)",
                        ctx.name
                    ),
                ));
            }
            let rec = ScheduleRecord {
                id: all.iter().map(|r| r.id).max().unwrap_or(0) + 1,
                pool: ctx.name.clone(),
                volume: volume.to_string(),
                volume_id: view.info.id.0,
                every_secs: spec.every_secs,
                keep: spec.keep,
                prefix: prefix.clone(),
            };
            all.push(rec.clone());
            Ok(rec)
        })?;
        tracing::info!(id = rec.id, volume = %format!("{}/{volume}", ctx.name), every_secs = rec.every_secs, keep = rec.keep, prefix = %rec.prefix, "snapshot schedule added");
        Ok(self.schedule_info(&rec))
    }

    /// Every snapshot schedule of the daemon.
    pub fn list_schedules(&self) -> Result<Vec<ScheduleInfo>> {
        Ok(self
            .schedules
            .records()?
            .iter()
            .map(|r| self.schedule_info(r))
            .collect())
    }

    /// Removes schedule `id` (its snapshots stay).
    pub fn remove_schedule(&self, id: u64) -> Result<()> {
        self.schedules.change(|all| {
            let before = all.len();
            all.retain(|r| r.id != id);
            if all.len() == before {
                return Err(Error::new(ErrorKind::NotFound, format!("no schedule {id}")));
            }
            Ok(())
        })?;
        self.schedules
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        tracing::info!(id, "snapshot schedule removed");
        Ok(())
    }

    fn schedule_info(&self, r: &ScheduleRecord) -> ScheduleInfo {
        let own = self
            .pool(Some(&r.pool))
            .ok()
            .and_then(|ctx| own_snapshots(&ctx, r).ok());
        let mut info = ScheduleInfo {
            id: r.id,
            volume: format!("{}/{}", r.pool, r.volume),
            every_secs: r.every_secs,
            keep: r.keep,
            prefix: r.prefix.clone(),
            snapshots: own.as_ref().map(|n| n.len() as u64),
            last_snapshot: own.and_then(|n| n.last().cloned()),
            taken: 0,
            skipped: 0,
            failures: 0,
            last_error: None,
        };
        self.schedules.with_stats(r.id, |s| {
            info.taken = s.taken;
            info.skipped = s.skipped;
            info.failures = s.failures;
            info.last_error = s.last_error.clone();
        });
        info
    }

    /// Runs the schedules that are due (on the scheduler's tick).
    pub(super) fn run_schedules(&self) {
        let Ok(records) = self.schedules.records() else {
            return;
        };
        for r in records {
            if self.closing.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            let due = self.schedules.with_stats(r.id, |s| match s.retry_at {
                Some(t) => Instant::now() >= t,
                None => s
                    .last_run
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(r.every_secs)),
            });
            if !due {
                continue;
            }
            let outcome = self.run_schedule(&r);
            self.schedules.with_stats(r.id, |s| match &outcome {
                Ok(taken) => {
                    s.last_run = Some(Instant::now());
                    s.retry_at = None;
                    s.last_error = None;
                    match taken {
                        Some(_) => s.taken += 1,
                        None => s.skipped += 1,
                    }
                }
                Err(e) => {
                    // Soon again (a pool still opening), not a whole period
                    // later; a volume that is gone stays gone.
                    let wait = match e.kind {
                        ErrorKind::NotFound => Duration::from_secs(r.every_secs),
                        _ => Duration::from_secs(r.every_secs).min(RETRY_FAILED),
                    };
                    s.retry_at = Some(Instant::now() + wait);
                    s.failures += 1;
                    s.last_error = Some(e.message.clone());
                }
            });
            if let Err(e) = outcome {
                tracing::warn!(id = r.id, volume = %format!("{}/{}", r.pool, r.volume), error = %e.message, "a scheduled snapshot failed");
            }
        }
    }

    /// One run of schedule `r`: the snapshot it took (`None`: nothing had
    /// changed), its old ones pruned.
    fn run_schedule(&self, r: &ScheduleRecord) -> Result<Option<String>> {
        let ctx = self.pool(Some(&r.pool))?;
        if !ctx.has_volume(&r.volume, r.volume_id) {
            // Renamed without its schedule following (a crash between the
            // two): follow it now, by its id.
            let now = (ctx.service.list_volumes().into_iter())
                .find(|v| v.info.id.0 == r.volume_id)
                .map(|v| v.info.name);
            if let Some(now) = now {
                tracing::info!(id = r.id, pool = %r.pool, was = %r.volume, volume = %now, "a schedule follows its renamed volume");
                self.schedules
                    .rename(&r.pool, &r.volume, r.volume_id, &now)?;
                let moved = ScheduleRecord {
                    volume: now,
                    ..r.clone()
                };
                return self.run_schedule(&moved);
            }
            return Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "volume {}/{} is gone: `vpool schedule remove {}`",
                    r.pool, r.volume, r.id
                ),
            ));
        }
        let mut own = own_snapshots(&ctx, r)?;
        if let Some(last) = own.last()
            && ctx
                .service
                .pool()
                .diff(&r.volume, Some(last), None)?
                .is_empty()
        {
            return Ok(None);
        }
        let name = format!(
            "{}-{}",
            r.prefix,
            super::replica::utc_stamp(crate::jobs::unix_ms())
        );
        ctx.service.create_snapshot(&r.volume, &name)?;
        own.push(name.clone());
        let extra = own.len().saturating_sub(r.keep as usize);
        for old in &own[..extra] {
            // A snapshot a clone needs is refused by the engine: kept.
            if let Err(e) = ctx.service.delete_snapshot(&r.volume, old) {
                tracing::info!(id = r.id, snapshot = %old, error = %e.message, "a scheduled snapshot is kept past --keep");
            }
        }
        tracing::info!(id = r.id, volume = %format!("{}/{}", r.pool, r.volume), snapshot = %name, "scheduled snapshot taken");
        Ok(Some(name))
    }
}

/// The snapshots of schedule `r`'s volume that are its own (its prefix
/// and a time), oldest first by the log's order (not by name: a clock
/// stepped back names a new one before old ones).
fn own_snapshots(ctx: &super::PoolCtx, r: &ScheduleRecord) -> Result<Vec<String>> {
    let head = format!("{}-", r.prefix);
    let mut own: Vec<(u64, String)> = ctx
        .service
        .list_snapshots(&r.volume)?
        .into_iter()
        .filter(|s| {
            s.name
                .strip_prefix(&head)
                .is_some_and(|t| t.len() == 20 && t.as_bytes()[8] == b'T' && t.ends_with('Z'))
        })
        .map(|s| (s.seq, s.name))
        .collect();
    own.sort_unstable();
    Ok(own.into_iter().map(|(_, n)| n).collect())
}
