//! Replication: a volume copied into another pool (local, on S3) again and
//! again, each run moving only what changed since the last, each run ending
//! in a crash-consistent *point* there, as `rbd mirror` in snapshot mode
//! does it.
//!
//! `vpool replica add local/db1 --to dr --every 15m --keep 96` makes the
//! *replica* `dr/db1`, empty, and marks it in its pool's catalog
//! (`crate::catalog::ReplicaMark`): its head is refused to NBD and to the
//! API (between two points it is half a run); its points are snapshots,
//! served read-only as `dr/db1@POINT`. The daemon keeps the replication in
//! `<home>/replicas.json`, and runs it every `--every` (or by hand,
//! `replica run`), one run of a replica at a time, each run a job
//! (`crate::jobs`: progress, cancel, rate).
//!
//! **A run** (`run.rs`): a snapshot of the source named after the time,
//! `replica-20261207T172300.123Z` (the point); what changed between the
//! last point (the *base*, a snapshot of both sides) and it (the engine's
//! diff; all of it the first time: holes stay holes) written into the
//! replica's head; the head flushed and a snapshot of the same name taken
//! of it; the replica's catalog told (a promote rolls back to it); the
//! oldest points beyond `--keep` deleted; the record's base set; the old
//! base deleted from the source. The source keeps one `replica-` snapshot
//! between runs (the base) and two during one.
//!
//! **Interrupted** (an error, a cancel, a crash, radosgw down): the record
//! keeps the run's point and how far it got (saved every
//! [`PROGRESS_EVERY_BYTES`] after a flush of the replica), and the next
//! run goes on from there with the same point; a daemon that starts finds
//! such a record and runs it at once. If that point is gone (deleted by
//! hand), or the base is, the next run copies the whole volume again
//! (zeros zeroed).
//!
//! **Promote** (`replica promote dr/db1`): the replication stops (its
//! record and the source's `replica-` snapshots go, if this daemon holds
//! them), the replica rolls back to its newest finished point and becomes
//! a volume like any other. It works from the replica's pool alone, so a
//! daemon that attached that pool after the source's host was lost can do
//! it.
//!
//! Not yet: shared pools on either side, replicas in another daemon or
//! cloud reached over the network (the target pool must be one this daemon
//! holds), a schedule per time of day.

mod run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Host, PoolCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::jobs::{JobInfo, JobSpec};

/// The record of the replications, in the home.
const REPLICAS_FILE: &str = "replicas.json";
/// What the names of points start with.
pub const POINT_PREFIX: &str = "replica-";
/// Most replications one daemon runs.
pub const MAX_REPLICAS: usize = 256;
/// Most points a replica keeps.
pub const MAX_KEEP: u32 = 10_000;
/// Points kept when `--keep` is not given.
pub const DEFAULT_KEEP: u32 = 24;
/// Shortest `--every`.
pub const MIN_EVERY_SECS: u64 = 1;
/// How far a run gets between two saves of its progress (each after a
/// flush of the replica): what a crash makes it copy again.
const PROGRESS_EVERY_BYTES: u64 = 64 << 20;
/// How often the scheduler looks for replications that are due.
const TICK: Duration = Duration::from_millis(500);
/// How long the scheduler waits before it tries again to start a run it
/// could not start (its pool not open, too many jobs).
const RETRY_START: Duration = Duration::from_secs(10);
/// How long a remove or a promote waits for a run to stop.
const STOP_WAIT: Duration = Duration::from_secs(60);

/// One replication, as `replicas.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ReplicaRecord {
    pool: String,
    volume: String,
    volume_id: u64,
    to_pool: String,
    to: String,
    to_id: u64,
    /// Seconds between two runs' starts; `None`: by hand only.
    #[serde(default)]
    every_secs: Option<u64>,
    keep: u32,
    #[serde(default)]
    max_rate_bytes_per_sec: Option<u64>,
    /// The newest finished point: a snapshot of both sides.
    #[serde(default)]
    base: Option<Point>,
    /// A run under way, or one that was interrupted.
    #[serde(default)]
    running: Option<Progress>,
}

impl ReplicaRecord {
    fn key(&self) -> String {
        format!("{}/{}", self.pool, self.volume)
    }
}

/// A point: a snapshot's name and when it was taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Point {
    name: String,
    unix_ms: u64,
}

/// How far a run got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Progress {
    point: Point,
    /// Everything below this offset (of the source's image) is in the
    /// replica, flushed.
    done_offset: u64,
    /// The replica read zeros everywhere when the run began (its first
    /// run): zeros need not be written.
    fresh: bool,
    /// The whole image is copied, not what changed since the base (there
    /// is none, or it is gone).
    whole: bool,
}

/// A replication as `replica list` and `replica status` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    /// `POOL/VOLUME` replicated.
    pub volume: String,
    /// The replica, `POOL/VOLUME`.
    pub to: String,
    #[serde(default)]
    pub every_secs: Option<u64>,
    pub keep: u32,
    #[serde(default)]
    pub max_rate_bytes_per_sec: Option<u64>,
    /// The newest finished point (a snapshot on both sides).
    #[serde(default)]
    pub last_point: Option<String>,
    #[serde(default)]
    pub last_point_unix_ms: Option<u64>,
    /// How old the newest point is (what a disaster now would lose).
    #[serde(default)]
    pub lag_secs: Option<u64>,
    /// Points the replica has.
    #[serde(default)]
    pub points: Option<u64>,
    /// A job works on it now (a run or a verify): that one.
    #[serde(default)]
    pub running: bool,
    #[serde(default)]
    pub job: Option<u64>,
    /// An interrupted run waits to go on from this offset.
    #[serde(default)]
    pub resume_offset: Option<u64>,
    /// Since the daemon started: runs finished, failed, bytes written.
    pub runs: u64,
    pub failures: u64,
    pub moved_bytes: u64,
    /// What the last run that finished did (its job's result).
    #[serde(default)]
    pub last_run: Option<serde_json::Value>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What the daemon knows of a replication beyond its record (since it
/// started).
#[derive(Default)]
struct Stats {
    /// Set while a job works on it (one at a time).
    job: Option<u64>,
    busy: bool,
    last_start: Option<Instant>,
    /// A start that failed is tried again then.
    retry_at: Option<Instant>,
    runs: u64,
    failures: u64,
    moved_bytes: u64,
    last_run: Option<serde_json::Value>,
    last_error: Option<String>,
}

/// `replicas.json` and what the daemon knows of each replication.
pub(super) struct Replicas {
    home: PathBuf,
    /// Serializes updates of the file.
    file: Mutex<()>,
    stats: Mutex<BTreeMap<String, Stats>>,
}

impl Replicas {
    pub(super) fn new(home: &Path) -> Replicas {
        Replicas {
            home: home.to_path_buf(),
            file: Mutex::new(()),
            stats: Mutex::new(BTreeMap::new()),
        }
    }

    fn records(&self) -> Result<Vec<ReplicaRecord>> {
        if self.home.as_os_str().is_empty() {
            return Ok(Vec::new());
        }
        let _g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        read_records(&self.home)
    }

    fn find(&self, pool: &str, volume: &str) -> Result<ReplicaRecord> {
        self.records()?
            .into_iter()
            .find(|r| r.pool == pool && r.volume == volume)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!("volume {pool}/{volume} is not replicated (`vpool replica list`)"),
                )
            })
    }

    /// Changes the record of `key` (`POOL/VOLUME`) and saves the file;
    /// gone, it is an error.
    fn update(&self, key: &str, change: impl FnOnce(&mut ReplicaRecord)) -> Result<()> {
        let _g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = read_records(&self.home)?;
        let Some(r) = all.iter_mut().find(|r| r.key() == key) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("the replication of {key} was removed"),
            ));
        };
        change(r);
        write_records(&self.home, &all)
    }

    fn add(&self, r: &ReplicaRecord) -> Result<()> {
        let _g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = read_records(&self.home)?;
        if all.iter().any(|x| x.key() == r.key()) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("volume {} is replicated already", r.key()),
            ));
        }
        if all.len() >= MAX_REPLICAS {
            return Err(Error::new(
                ErrorKind::NoSpace,
                format!("this daemon replicates {MAX_REPLICAS} volumes already"),
            ));
        }
        all.push(r.clone());
        write_records(&self.home, &all)
    }

    fn remove(&self, key: &str) -> Result<()> {
        let _g = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = read_records(&self.home)?;
        all.retain(|r| r.key() != key);
        write_records(&self.home, &all)?;
        self.stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        Ok(())
    }

    /// Whether volume `volume` of `pool` is replicated, or is a replica.
    pub(super) fn names(&self, pool: &str, volume: &str) -> Result<bool> {
        Ok(self.records()?.iter().any(|r| {
            (r.pool == pool && r.volume == volume) || (r.to_pool == pool && r.to == volume)
        }))
    }

    fn with_stats<T>(&self, key: &str, f: impl FnOnce(&mut Stats) -> T) -> T {
        let mut g = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        f(g.entry(key.to_string()).or_default())
    }

    /// Job `id` started for `key` (said by the caller, which may come
    /// before or after the job's own thread says it; a job that ended
    /// already is not recorded).
    fn job_started(&self, key: &str, id: u64) {
        self.with_stats(key, |s| {
            if s.busy && s.job.is_none() {
                s.job = Some(id);
            }
        });
    }

    /// Claims `key` for one job; `None` if a job works on it already.
    fn claim(self: &Arc<Self>, key: &str) -> Option<Claim> {
        self.with_stats(key, |s| {
            if s.busy {
                return None;
            }
            s.busy = true;
            s.last_start = Some(Instant::now());
            Some(Claim {
                replicas: Arc::clone(self),
                key: key.to_string(),
            })
        })
    }
}

/// One job's hold on a replication: released when the job ends (or never
/// started).
struct Claim {
    replicas: Arc<Replicas>,
    key: String,
}

impl Claim {
    fn started(&self, job: u64) {
        self.replicas.with_stats(&self.key, |s| s.job = Some(job));
    }

    fn ended(&self, outcome: &Result<serde_json::Value>, run: bool) {
        self.replicas.with_stats(&self.key, |s| match outcome {
            Ok(v) if run => {
                s.runs += 1;
                s.moved_bytes += v["moved_bytes"].as_u64().unwrap_or(0);
                s.last_run = Some(v.clone());
                s.last_error = None;
            }
            Ok(_) => {}
            Err(e) => {
                s.failures += 1;
                s.last_error = Some(e.message.clone());
            }
        });
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.replicas.with_stats(&self.key, |s| {
            s.busy = false;
            s.job = None;
        });
    }
}

fn read_records(home: &Path) -> Result<Vec<ReplicaRecord>> {
    super::file::read_list(home, REPLICAS_FILE)
}

fn write_records(home: &Path, records: &[ReplicaRecord]) -> Result<()> {
    super::file::write_list(home, REPLICAS_FILE, records)
}

/// What `replica add` asks.
#[derive(Clone, Debug, Default)]
pub struct ReplicaSpec {
    /// The replica's pool.
    pub to_pool: String,
    /// Its name (default: the volume's).
    pub to: Option<String>,
    pub every_secs: Option<u64>,
    pub keep: Option<u32>,
    pub max_rate_bytes_per_sec: Option<u64>,
}

impl Host {
    /// Starts replicating `volume` of `pool` (see the module doc): makes
    /// the replica, records the replication and starts its first run.
    /// Blocking.
    pub fn add_replica(
        &self,
        pool: Option<&str>,
        volume: &str,
        spec: &ReplicaSpec,
    ) -> Result<ReplicaStatus> {
        let to = spec.to.as_deref().unwrap_or(volume);
        crate::names::check_volume_name(to)?;
        check_spec(spec)?;
        if self.home.as_os_str().is_empty() {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "this host has no home to record replications in",
            ));
        }
        let (src, dst) = self.replica_pools(pool, Some(&spec.to_pool))?;
        let view = src.service.volume(volume)?;
        if self.replicas.names(&src.name, volume)? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "volume {}/{volume} is replicated already, or is a replica (`vpool replica list`)",
                    src.name
                ),
            ));
        }
        if self.replicas.names(&dst.name, to)? {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{}/{to} is named by another replication (`vpool replica list`; remove it first)",
                    dst.name
                ),
            ));
        }
        refuse_unreplicable(&src, volume, &view)?;
        if src.name == dst.name && to == volume {
            return Err(Error::invalid(format!(
                "a replica of {}/{volume} goes into another pool, or under another name",
                src.name
            )));
        }
        let made = dst.service.create_volume(to, view.info.size_bytes, false)?;
        let record = ReplicaRecord {
            pool: src.name.clone(),
            volume: volume.to_string(),
            volume_id: view.info.id.0,
            to_pool: dst.name.clone(),
            to: to.to_string(),
            to_id: made.info.id.0,
            every_secs: spec.every_secs,
            keep: spec.keep.unwrap_or(DEFAULT_KEEP),
            max_rate_bytes_per_sec: spec.max_rate_bytes_per_sec,
            base: None,
            running: None,
        };
        let marked = dst
            .service
            .catalog()
            .mark_replica(to, made.info.id.0, &record.key())
            .and_then(|()| self.replicas.add(&record));
        if let Err(e) = marked {
            if let Err(d) = dst.service.delete_volume(to, true) {
                tracing::warn!(pool = %dst.name, volume = to, error = %d.message, "could not delete the replica a failed `replica add` made");
            }
            return Err(e);
        }
        tracing::info!(volume = %record.key(), to = %format!("{}/{}", dst.name, to), every_secs = ?spec.every_secs, keep = record.keep, "replication added");
        let first = match self.start_replica_run(&record) {
            Ok(job) => Some(job.id),
            Err(e) => {
                self.replicas.with_stats(&record.key(), |s| {
                    s.retry_at = Some(Instant::now() + RETRY_START);
                    s.last_error = Some(e.message.clone());
                });
                tracing::warn!(volume = %record.key(), error = %e.message, "the first replication run did not start; the scheduler tries again");
                None
            }
        };
        let mut st = self.replica_status(Some(&src.name), volume)?;
        // (It may have ended already: it is still the one that started.)
        st.job = st.job.or(first);
        Ok(st)
    }

    /// The source and target pools of a replication: open, not shared.
    fn replica_pools(
        &self,
        pool: Option<&str>,
        to_pool: Option<&str>,
    ) -> Result<(Arc<PoolCtx>, Arc<PoolCtx>)> {
        for p in [pool, to_pool] {
            if let Some(sh) = self.shared(p) {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    format!(
                        "pool {} is shared: replication into or out of shared pools is not built yet",
                        sh.name
                    ),
                ));
            }
        }
        Ok((self.pool(pool)?, self.pool(to_pool)?))
    }

    /// Every replication of this daemon.
    pub fn list_replicas(&self) -> Result<Vec<ReplicaStatus>> {
        Ok(self
            .replicas
            .records()?
            .iter()
            .map(|r| self.status_of(r))
            .collect())
    }

    /// The replication of `volume` of `pool`.
    pub fn replica_status(&self, pool: Option<&str>, volume: &str) -> Result<ReplicaStatus> {
        let pool = self.pool_name(pool);
        Ok(self.status_of(&self.replicas.find(&pool, volume)?))
    }

    fn pool_name(&self, pool: Option<&str>) -> String {
        pool.unwrap_or(&self.default).to_string()
    }

    fn status_of(&self, r: &ReplicaRecord) -> ReplicaStatus {
        let points = self.pool(Some(&r.to_pool)).ok().and_then(|ctx| {
            let snaps = ctx.service.list_snapshots(&r.to).ok()?;
            Some(snaps.iter().filter(|s| is_point(&s.name)).count() as u64)
        });
        let now_ms = crate::jobs::unix_ms();
        let mut st = ReplicaStatus {
            volume: r.key(),
            to: format!("{}/{}", r.to_pool, r.to),
            every_secs: r.every_secs,
            keep: r.keep,
            max_rate_bytes_per_sec: r.max_rate_bytes_per_sec,
            last_point: r.base.as_ref().map(|b| b.name.clone()),
            last_point_unix_ms: r.base.as_ref().map(|b| b.unix_ms),
            lag_secs: r
                .base
                .as_ref()
                .map(|b| now_ms.saturating_sub(b.unix_ms) / 1000),
            points,
            running: false,
            job: None,
            resume_offset: r.running.as_ref().map(|p| p.done_offset),
            runs: 0,
            failures: 0,
            moved_bytes: 0,
            last_run: None,
            last_error: None,
        };
        self.replicas.with_stats(&r.key(), |s| {
            st.running = s.busy;
            st.job = s.job;
            st.runs = s.runs;
            st.failures = s.failures;
            st.moved_bytes = s.moved_bytes;
            st.last_run = s.last_run.clone();
            st.last_error = s.last_error.clone();
        });
        st
    }

    /// Starts a run of the replication of `volume` of `pool` now.
    pub fn run_replica(&self, pool: Option<&str>, volume: &str) -> Result<JobInfo> {
        let pool = self.pool_name(pool);
        let r = self.replicas.find(&pool, volume)?;
        self.start_replica_run(&r)
    }

    fn start_replica_run(&self, r: &ReplicaRecord) -> Result<JobInfo> {
        let claim = self.replicas.claim(&r.key()).ok_or_else(|| busy(r))?;
        let (src, dst) = self.replica_pools(Some(&r.pool), Some(&r.to_pool))?;
        let spec = JobSpec::new(
            "replicate",
            format!("{} -> {}/{}", r.key(), r.to_pool, r.to),
        )
        .in_pools(&[&r.pool, &r.to_pool])
        .at_most(r.max_rate_bytes_per_sec);
        let replicas = Arc::clone(&self.replicas);
        let key = r.key();
        let job = self.jobs.start(spec, move |ctl| {
            claim.started(ctl.id());
            let out = run::run(ctl, &replicas, &key, &src, &dst);
            claim.ended(&out, true);
            out
        })?;
        self.replicas.job_started(&r.key(), job.id);
        Ok(job)
    }

    /// Starts comparing the newest point of the replication of `volume`
    /// of `pool` on both sides, a checksum of each piece (a job).
    pub fn verify_replica(&self, pool: Option<&str>, volume: &str) -> Result<JobInfo> {
        let pool = self.pool_name(pool);
        let r = self.replicas.find(&pool, volume)?;
        let Some(base) = r.base.clone() else {
            return Err(Error::new(
                ErrorKind::Failed,
                format!("replica of {} has no finished point yet", r.key()),
            ));
        };
        let claim = self.replicas.claim(&r.key()).ok_or_else(|| busy(&r))?;
        let (src, dst) = self.replica_pools(Some(&r.pool), Some(&r.to_pool))?;
        let spec = JobSpec::new(
            "verify",
            format!(
                "{}@{} = {}/{}@{}",
                r.key(),
                base.name,
                r.to_pool,
                r.to,
                base.name
            ),
        )
        .in_pools(&[&r.pool, &r.to_pool])
        .at_most(r.max_rate_bytes_per_sec);
        let key = r.key();
        let job = self.jobs.start(spec, move |ctl| {
            claim.started(ctl.id());
            let out = run::verify(ctl, &r, &base.name, &src, &dst);
            claim.ended(&out, false);
            out
        })?;
        self.replicas.job_started(&key, job.id);
        Ok(job)
    }

    /// Stops replicating `volume` of `pool`: a run under way is cancelled,
    /// the record and the source's points go. The replica stays, with its
    /// points (promote it, or delete it).
    pub fn remove_replica(&self, pool: Option<&str>, volume: &str) -> Result<()> {
        let pool = self.pool_name(pool);
        let r = self.replicas.find(&pool, volume)?;
        // Held until the record is gone: the scheduler starts nothing.
        let _claim = self.stop_replica(&r)?;
        self.replicas.remove(&r.key())?;
        if let Ok(src) = self.pool(Some(&r.pool)) {
            run::delete_points(&src, &r.volume, r.volume_id, None);
        }
        tracing::info!(volume = %r.key(), to = %format!("{}/{}", r.to_pool, r.to), "replication removed");
        Ok(())
    }

    /// Cancels the job working on `r`, and waits for it to end; no new
    /// one starts until the claim returned is dropped.
    fn stop_replica(&self, r: &ReplicaRecord) -> Result<Claim> {
        let deadline = Instant::now() + STOP_WAIT;
        loop {
            let job = self.replicas.with_stats(&r.key(), |s| s.job);
            if let Some(id) = job {
                let _ = self.jobs.cancel(id);
                let _ = self.jobs.wait(id, STOP_WAIT);
            }
            if let Some(claim) = self.replicas.claim(&r.key()) {
                return Ok(claim);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::InUse,
                    format!("a job on the replica of {} does not stop", r.key()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Makes the replica `volume` of `pool` a volume of its own (see the
    /// module doc). Blocking.
    pub fn promote_replica(
        &self,
        pool: Option<&str>,
        volume: &str,
    ) -> Result<crate::pool::VolumeView> {
        let ctx = self.pool(pool)?;
        // Refused before the replication stops: nothing whole to promote.
        let mark = ctx.service.volume(volume)?.replica.ok_or_else(|| {
            Error::invalid(format!("volume {}/{volume} is not a replica", ctx.name))
        })?;
        let Some(point) = mark
            .last_point
            .filter(|p| ctx.service.snapshot(volume, p).is_ok())
        else {
            return Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "replica {}/{volume} has no finished point (none yet, or it was deleted): there is nothing whole to promote (delete it instead, or run the replication again)",
                    ctx.name
                ),
            ));
        };
        let source = self
            .replicas
            .records()?
            .into_iter()
            .find(|r| r.to_pool == ctx.name && r.to == volume && r.to_id == mark.volume_id);
        // Held until the promote is done: no run starts meanwhile.
        let _claim = match &source {
            Some(r) => {
                let claim = self.stop_replica(r)?;
                self.replicas.remove(&r.key())?;
                if let Ok(src) = self.pool(Some(&r.pool)) {
                    run::delete_points(&src, &r.volume, r.volume_id, None);
                }
                Some(claim)
            }
            None => None,
        };
        let view = ctx.service.promote(volume)?;
        tracing::warn!(pool = %ctx.name, volume, point, source = %mark.source, "replica promoted: it is a volume of its own now, at that point");
        Ok(view)
    }

    /// Starts the runs that are due: those whose `--every` passed since
    /// the last one started, and those a crash or an error interrupted
    /// (with no `--every`, once).
    fn schedule_replicas(&self) {
        let Ok(records) = self.replicas.records() else {
            return;
        };
        for r in records {
            let due = self.replicas.with_stats(&r.key(), |s| {
                if s.busy {
                    return false;
                }
                if let Some(t) = s.retry_at {
                    return Instant::now() >= t;
                }
                match (s.last_start, r.every_secs) {
                    (None, Some(_)) => true,
                    (Some(t), Some(every)) => t.elapsed() >= Duration::from_secs(every),
                    // By hand only: an interrupted run goes on once, at start.
                    (None, None) => r.running.is_some(),
                    (Some(_), None) => false,
                }
            });
            if !due {
                continue;
            }
            match self.start_replica_run(&r) {
                Ok(_) => self.replicas.with_stats(&r.key(), |s| s.retry_at = None),
                Err(e) => {
                    self.replicas.with_stats(&r.key(), |s| {
                        s.retry_at = Some(Instant::now() + RETRY_START);
                        s.last_error = Some(e.message.clone());
                    });
                    tracing::warn!(volume = %r.key(), error = %e.message, "a replication run did not start; tried again in {RETRY_START:?}");
                }
            }
        }
    }
}

/// Runs the scheduler (replications, then snapshot schedules:
/// `super::schedule`) until the host closes (or is dropped).
pub(super) fn schedule(host: std::sync::Weak<Host>) {
    loop {
        std::thread::sleep(TICK);
        let Some(h) = host.upgrade() else {
            return;
        };
        if h.closing.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        h.schedule_replicas();
        h.run_schedules();
        h.purge_expired_trash();
    }
}

fn busy(r: &ReplicaRecord) -> Error {
    Error::new(
        ErrorKind::InUse,
        format!(
            "a job works on the replica of {} already (`vpool replica status {}`)",
            r.key(),
            r.key()
        ),
    )
}

fn check_spec(spec: &ReplicaSpec) -> Result<()> {
    if spec.every_secs.is_some_and(|e| e < MIN_EVERY_SECS) {
        return Err(Error::invalid(format!(
            "--every is at least {MIN_EVERY_SECS} s"
        )));
    }
    if spec.keep.is_some_and(|k| k == 0 || k > MAX_KEEP) {
        return Err(Error::invalid(format!("--keep is 1 to {MAX_KEEP} points")));
    }
    Ok(())
}

/// What replication refuses as a source.
fn refuse_unreplicable(src: &PoolCtx, volume: &str, view: &crate::pool::VolumeView) -> Result<()> {
    let why = if view.template.is_some() {
        Some("it is a template (read-only: copy it once with `vpool vol copy`)")
    } else if view.replica.is_some() {
        Some("it is a replica itself")
    } else if view.info.ephemeral {
        Some("it is ephemeral")
    } else if view.incomplete {
        Some("it is incomplete")
    } else if src.service.catalog().is_moving(view.info.id.0) {
        Some("it is being moved")
    } else {
        None
    };
    match why {
        Some(w) => Err(Error::new(
            ErrorKind::NotSupported,
            format!("volume {}/{volume} cannot be replicated: {w}", src.name),
        )),
        None => Ok(()),
    }
}

/// Whether snapshot `name` is a replication point.
fn is_point(name: &str) -> bool {
    name.starts_with(POINT_PREFIX)
}

/// The name of a point taken at `unix_ms`: `replica-YYYYMMDDTHHMMSS.mmmZ`.
fn point_name(unix_ms: u64) -> String {
    format!("{POINT_PREFIX}{}", utc_stamp(unix_ms))
}

/// `unix_ms` as `YYYYMMDDTHHMMSS.mmmZ` (UTC, 20 characters; they sort as
/// times do, and are valid in snapshot names).
pub(super) fn utc_stamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).expect("u64 days fit");
    let (y, m, d) = civil_from_days(days);
    let s = secs % 86_400;
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        unix_ms % 1000
    )
}

/// `unix_ms` as `YYYY-MM-DD HH:MM:SS` UTC, for people (`snap list`).
pub fn utc_text(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = i64::try_from(secs / 86_400).expect("u64 days fit");
    let (y, m, d) = civil_from_days(days);
    let s = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The date of the `days`th day since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).expect("1..=31");
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).expect("1..=12");
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_text_reads_as_a_date() {
        assert_eq!(utc_text(0), "1970-01-01 00:00:00");
        assert_eq!(utc_text(1_796_672_045_123), "2026-12-07 19:34:05");
    }

    #[test]
    fn point_names_are_utc_times() {
        assert_eq!(point_name(0), "replica-19700101T000000.000Z");
        // 2026-12-07 17:23:00.123 UTC
        assert_eq!(
            point_name(1_796_664_180_123),
            "replica-20261207T172300.123Z"
        );
        assert_eq!(point_name(951_782_400_000), "replica-20000229T000000.000Z");
        assert!(point_name(1_000) < point_name(60_000));
        crate::names::check_volume_name(&point_name(1_796_664_180_123)).unwrap();
    }
}
