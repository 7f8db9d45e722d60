//! Jobs: the long operations a daemon runs in the background (a copy of a
//! volume into another pool, a shared clone's flatten), each listed with
//! its progress, cancellable, and kept with its outcome for a while
//! (`vpool job list`), as `rbd task` and Ceph's progress module do.
//!
//! A job is a thread running a closure that gets a [`JobCtl`]: the closure
//! reports its progress (bytes done of a total) and asks between steps
//! whether it was cancelled ([`JobCtl::check`]), and must leave things as
//! they were when it stops on a cancel or an error (its own rule: a copy
//! deletes what it made). The daemon's log has a line when each job starts
//! and one with its outcome.
//!
//! **Bounded**: at most [`MAX_RUNNING`] jobs run at once (another is
//! refused `in_use`), and the [`MAX_KEPT`] most recent finished ones are
//! kept (older ones go first). Jobs live in memory: a restart forgets them
//! (what a job left half done is its own to clean up at the next open).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, Result};

/// Most jobs running at once (each is a thread doing I/O).
pub const MAX_RUNNING: usize = 16;
/// Most finished jobs kept for `job list`.
pub const MAX_KEPT: usize = 64;

/// What a job is doing, or how it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn finished(self) -> bool {
        self != JobState::Running
    }
}

/// A job as `job list` and `job show` see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Unique in this daemon's run, counting from 1.
    pub id: u64,
    /// `copy`, `flatten`.
    pub kind: String,
    /// What it works on, for people (`local/db1@nightly -> cold/db1`).
    pub target: String,
    pub state: JobState,
    pub done_bytes: u64,
    pub total_bytes: u64,
    /// Mean rate since it started.
    pub rate_bytes_per_sec: u64,
    /// At the mean rate, while it runs (`None`: no progress yet).
    #[serde(default)]
    pub eta_secs: Option<u64>,
    pub started_unix_ms: u64,
    #[serde(default)]
    pub finished_unix_ms: Option<u64>,
    /// A cancel was asked (it takes effect at the job's next step).
    pub cancel_requested: bool,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// What it made, when it succeeded (the copy's volume).
    #[serde(default)]
    pub result: Option<serde_json::Value>,
}

/// What a job is, before it starts.
pub struct JobSpec {
    kind: String,
    target: String,
    pools: Vec<String>,
    max_rate_bytes_per_sec: Option<u64>,
}

impl JobSpec {
    /// Job `kind` (`copy`, `move`) on `target` (for people).
    pub fn new(kind: &str, target: String) -> JobSpec {
        JobSpec {
            kind: kind.to_string(),
            target,
            pools: Vec::new(),
            max_rate_bytes_per_sec: None,
        }
    }

    /// The pools it works in: none of them is detached while it runs.
    pub fn in_pools(mut self, pools: &[&str]) -> JobSpec {
        self.pools = pools.iter().map(|p| p.to_string()).collect();
        self
    }

    /// At most this many bytes a second (`None`: no limit).
    pub fn at_most(mut self, max_rate_bytes_per_sec: Option<u64>) -> JobSpec {
        self.max_rate_bytes_per_sec = max_rate_bytes_per_sec;
        self
    }
}

/// One job's shared state.
struct Job {
    id: u64,
    kind: String,
    target: String,
    pools: Vec<String>,
    started: Instant,
    started_unix_ms: u64,
    done_bytes: AtomicU64,
    total_bytes: AtomicU64,
    cancel: AtomicBool,
    end: Mutex<Option<End>>,
}

/// How a job ended.
struct End {
    state: JobState,
    finished_unix_ms: u64,
    took: Duration,
    error: Option<String>,
    result: Option<serde_json::Value>,
}

impl Job {
    fn info(&self) -> JobInfo {
        let end = self.end.lock().unwrap_or_else(|e| e.into_inner());
        let done = self.done_bytes.load(Ordering::Relaxed);
        let total = self.total_bytes.load(Ordering::Relaxed);
        let took = end
            .as_ref()
            .map_or_else(|| self.started.elapsed(), |e| e.took);
        let rate = rate(done, took);
        let running = end.is_none();
        JobInfo {
            id: self.id,
            kind: self.kind.clone(),
            target: self.target.clone(),
            state: end.as_ref().map_or(JobState::Running, |e| e.state),
            done_bytes: done,
            total_bytes: total,
            rate_bytes_per_sec: rate,
            eta_secs: (running && rate > 0).then(|| total.saturating_sub(done) / rate),
            started_unix_ms: self.started_unix_ms,
            finished_unix_ms: end.as_ref().map(|e| e.finished_unix_ms),
            cancel_requested: self.cancel.load(Ordering::Relaxed),
            error: end.as_ref().and_then(|e| e.error.clone()),
            result: end.as_ref().and_then(|e| e.result.clone()),
        }
    }
}

fn rate(done_bytes: u64, took: Duration) -> u64 {
    let ms = took.as_millis().max(1);
    u64::try_from(u128::from(done_bytes) * 1000 / ms).unwrap_or(u64::MAX)
}

/// The time now, in Unix milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// What a job's closure holds: its progress, its cancel and its pace.
pub struct JobCtl {
    job: Arc<Job>,
    /// Bytes a second the job may move at most (`None`: as fast as it
    /// can).
    max_rate_bytes_per_sec: Option<u64>,
}

impl JobCtl {
    /// Waits until `moved_bytes` (moved since the job started) are within
    /// the job's rate; an error of kind `cancelled` if a cancel comes
    /// meanwhile. Call between steps, holding nothing others wait for.
    pub fn pace(&self, moved_bytes: u64) -> Result<()> {
        self.check()?;
        let Some(rate) = self.max_rate_bytes_per_sec.filter(|r| *r > 0) else {
            return Ok(());
        };
        let due = Duration::from_secs_f64(moved_bytes as f64 / rate as f64);
        loop {
            let ahead = due.saturating_sub(self.job.started.elapsed());
            if ahead.is_zero() {
                return Ok(());
            }
            std::thread::sleep(ahead.min(Duration::from_millis(50)));
            self.check()?;
        }
    }

    /// Sets the total the progress counts towards.
    pub fn set_total(&self, total_bytes: u64) {
        self.job.total_bytes.store(total_bytes, Ordering::Relaxed);
    }

    /// Sets the bytes done so far.
    pub fn set_done(&self, done_bytes: u64) {
        self.job.done_bytes.store(done_bytes, Ordering::Relaxed);
    }

    /// All of the total is done (what a job skipped, it had nothing to do
    /// for).
    pub fn set_all_done(&self) {
        let total = self.job.total_bytes.load(Ordering::Relaxed);
        self.job.done_bytes.store(total, Ordering::Relaxed);
    }

    /// Whether a cancel was asked.
    pub fn cancelled(&self) -> bool {
        self.job.cancel.load(Ordering::Relaxed)
    }

    /// An error of kind `cancelled` if a cancel was asked: the job stops
    /// at its next step (`?`) and cleans up.
    pub fn check(&self) -> Result<()> {
        if self.cancelled() {
            return Err(Error::new(
                ErrorKind::Cancelled,
                format!("job {} was cancelled", self.job.id),
            ));
        }
        Ok(())
    }

    /// The job's id.
    pub fn id(&self) -> u64 {
        self.job.id
    }
}

/// The jobs of one daemon; see the module doc.
#[derive(Default)]
pub struct Jobs {
    /// Set when the daemon stops: no job starts from then on.
    closed: AtomicBool,
    next_id: AtomicU64,
    /// Running and finished, oldest first.
    jobs: Mutex<VecDeque<Arc<Job>>>,
    finished: Condvar,
}

impl Jobs {
    pub fn new() -> Jobs {
        Jobs::default()
    }

    /// Starts job `kind` on `target`: `work` runs on a thread of its own
    /// and returns what it made. Refused `in_use` while [`MAX_RUNNING`]
    /// jobs run.
    pub fn start(
        self: &Arc<Self>,
        spec: JobSpec,
        work: impl FnOnce(&JobCtl) -> Result<serde_json::Value> + Send + 'static,
    ) -> Result<JobInfo> {
        let JobSpec {
            kind,
            target,
            pools,
            max_rate_bytes_per_sec,
        } = spec;
        let (kind, target) = (kind.as_str(), target.as_str());
        let job = {
            let mut jobs = self.lock();
            if self.closed.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::Failed,
                    "the daemon is stopping: no job starts",
                ));
            }
            let running = jobs.iter().filter(|j| !j.is_finished()).count();
            if running >= MAX_RUNNING {
                return Err(Error::new(
                    ErrorKind::InUse,
                    format!(
                        "{running} jobs are running (at most {MAX_RUNNING}); wait for one to end"
                    ),
                ));
            }
            let job = Arc::new(Job {
                id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
                kind: kind.to_string(),
                target: target.to_string(),
                pools,
                started: Instant::now(),
                started_unix_ms: unix_ms(),
                done_bytes: AtomicU64::new(0),
                total_bytes: AtomicU64::new(0),
                cancel: AtomicBool::new(false),
                end: Mutex::new(None),
            });
            jobs.push_back(Arc::clone(&job));
            prune(&mut jobs);
            job
        };
        tracing::info!(job = job.id, kind, target, "job started");
        let jobs = Arc::clone(self);
        let ctl = JobCtl {
            job: Arc::clone(&job),
            max_rate_bytes_per_sec,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("job-{}", job.id))
            .spawn(move || {
                let outcome = work(&ctl);
                jobs.finish(&ctl.job, outcome);
            });
        if let Err(e) = spawned {
            let err = Error::internal(format!("no thread for a job: {e}"));
            self.finish(&job, Err(err.clone()));
            return Err(err);
        }
        Ok(job.info())
    }

    /// Records how `job` ended.
    fn finish(&self, job: &Job, outcome: Result<serde_json::Value>) {
        let (state, error, result) = match outcome {
            Ok(v) => (JobState::Succeeded, None, Some(v)),
            Err(e) if e.kind == ErrorKind::Cancelled => {
                (JobState::Cancelled, Some(e.message), None)
            }
            Err(e) => (JobState::Failed, Some(e.to_string()), None),
        };
        let took = job.started.elapsed();
        match &error {
            None => {
                tracing::info!(job = job.id, kind = %job.kind, target = %job.target, took_ms = took.as_millis() as u64, "job succeeded")
            }
            Some(e) => {
                tracing::warn!(job = job.id, kind = %job.kind, target = %job.target, state = ?state, error = %e, took_ms = took.as_millis() as u64, "job did not succeed")
            }
        }
        *job.end.lock().unwrap_or_else(|e| e.into_inner()) = Some(End {
            state,
            finished_unix_ms: unix_ms(),
            took,
            error,
            result,
        });
        let mut jobs = self.lock();
        prune(&mut jobs);
        self.finished.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn find(&self, id: u64) -> Result<Arc<Job>> {
        self.lock()
            .iter()
            .find(|j| j.id == id)
            .cloned()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::NotFound,
                    format!(
                        "no job {id} (finished jobs are kept for a while, not across restarts)"
                    ),
                )
            })
    }

    /// The running jobs that work in pool `pool`.
    pub fn running_in(&self, pool: &str) -> Vec<u64> {
        self.lock()
            .iter()
            .filter(|j| !j.is_finished() && j.pools.iter().any(|p| p == pool))
            .map(|j| j.id)
            .collect()
    }

    /// Every job kept, oldest first.
    pub fn list(&self) -> Vec<JobInfo> {
        self.lock().iter().map(|j| j.info()).collect()
    }

    /// Job `id`.
    pub fn get(&self, id: u64) -> Result<JobInfo> {
        Ok(self.find(id)?.info())
    }

    /// Asks job `id` to stop (it does at its next step, and undoes what
    /// it did); a finished job is left as it is.
    pub fn cancel(&self, id: u64) -> Result<JobInfo> {
        let job = self.find(id)?;
        if !job.is_finished() {
            job.cancel.store(true, Ordering::Relaxed);
            tracing::info!(job = id, "job cancel asked");
        }
        Ok(job.info())
    }

    /// Asks every running job to stop (the daemon is stopping) and waits
    /// up to `limit` for them to end.
    pub fn cancel_all(&self, limit: Duration) {
        // Under the list's lock: a start after this sees it.
        let jobs = self.lock();
        self.closed.store(true, Ordering::SeqCst);
        drop(jobs);
        for j in self.lock().iter().filter(|j| !j.is_finished()) {
            j.cancel.store(true, Ordering::Relaxed);
        }
        self.wait_until(limit, |jobs| jobs.iter().all(|j| j.is_finished()));
    }

    /// Waits up to `limit` for job `id` to end; its state then.
    pub fn wait(&self, id: u64, limit: Duration) -> Result<JobInfo> {
        let job = self.find(id)?;
        self.wait_until(limit, |_| job.is_finished());
        Ok(job.info())
    }

    /// Waits, for at most `limit`, until `done` holds (looked at each time
    /// a job ends).
    fn wait_until(&self, limit: Duration, done: impl Fn(&VecDeque<Arc<Job>>) -> bool) {
        let deadline = Instant::now() + limit;
        let mut jobs = self.lock();
        while !done(&jobs) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            jobs = self
                .finished
                .wait_timeout(jobs, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Job {
    fn is_finished(&self) -> bool {
        self.end.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

/// Drops the oldest finished jobs past [`MAX_KEPT`].
fn prune(jobs: &mut VecDeque<Arc<Job>>) {
    let mut finished = jobs.iter().filter(|j| j.is_finished()).count();
    while finished > MAX_KEPT {
        let Some(i) = jobs.iter().position(|j| j.is_finished()) else {
            break;
        };
        jobs.remove(i);
        finished -= 1;
    }
    assert!(
        jobs.len() <= MAX_KEPT + MAX_RUNNING,
        "jobs are bounded: {} kept",
        jobs.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_reports_progress_and_its_outcome() {
        let jobs = Arc::new(Jobs::new());
        let (go, gate) = std::sync::mpsc::channel::<()>();
        let started = jobs
            .start(JobSpec::new("copy", "a -> b".into()), move |ctl| {
                ctl.set_total(100);
                ctl.set_done(40);
                gate.recv().unwrap();
                ctl.set_done(100);
                Ok(serde_json::json!({"made": "b"}))
            })
            .unwrap();
        assert_eq!((started.id, started.state), (1, JobState::Running));
        std::thread::sleep(Duration::from_millis(50));
        let mid = jobs.get(1).unwrap();
        assert_eq!((mid.done_bytes, mid.total_bytes), (40, 100));
        go.send(()).unwrap();
        let end = jobs.wait(1, Duration::from_secs(10)).unwrap();
        assert_eq!(end.state, JobState::Succeeded);
        assert_eq!(end.result, Some(serde_json::json!({"made": "b"})));
        assert!(end.finished_unix_ms.is_some() && end.eta_secs.is_none());
        assert_eq!(jobs.get(9).unwrap_err().kind, ErrorKind::NotFound);
    }

    #[test]
    fn a_cancel_stops_a_job_at_its_next_step() {
        let jobs = Arc::new(Jobs::new());
        jobs.start(JobSpec::new("copy", "x".into()), |ctl| {
            loop {
                ctl.check()?;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
        .unwrap();
        jobs.start(JobSpec::new("copy", "y".into()), |_| {
            Err(Error::new(ErrorKind::NoSpace, "full"))
        })
        .unwrap();
        assert!(jobs.cancel(1).unwrap().cancel_requested);
        assert_eq!(
            jobs.wait(1, Duration::from_secs(10)).unwrap().state,
            JobState::Cancelled
        );
        let failed = jobs.wait(2, Duration::from_secs(10)).unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert!(failed.error.unwrap().contains("full"));
    }

    #[test]
    fn a_job_keeps_to_its_rate_and_a_stopping_daemon_starts_none() {
        let jobs = Arc::new(Jobs::new());
        let j = jobs
            .start(
                JobSpec::new("copy", "x".into()).at_most(Some(1000)),
                |ctl| {
                    ctl.pace(100)?;
                    Ok(serde_json::Value::Null)
                },
            )
            .unwrap();
        let started = Instant::now();
        assert_eq!(
            jobs.wait(j.id, Duration::from_secs(10)).unwrap().state,
            JobState::Succeeded
        );
        assert!(
            started.elapsed() >= Duration::from_millis(80),
            "100 bytes at 1000/s take 0.1 s"
        );
        jobs.cancel_all(Duration::from_secs(1));
        let e = jobs
            .start(JobSpec::new("copy", "x".into()), |_| {
                Ok(serde_json::Value::Null)
            })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::Failed);
    }

    #[test]
    fn jobs_are_bounded() {
        let jobs = Arc::new(Jobs::new());
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..MAX_RUNNING {
            let rx = Arc::clone(&rx);
            jobs.start(JobSpec::new("copy", "x".into()), move |_| {
                let _ = rx.lock().unwrap().recv();
                Ok(serde_json::Value::Null)
            })
            .unwrap();
        }
        let e = jobs
            .start(JobSpec::new("copy", "x".into()), |_| {
                Ok(serde_json::Value::Null)
            })
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InUse);
        for _ in 0..MAX_RUNNING {
            tx.send(()).unwrap();
        }
        for id in 1..=MAX_RUNNING as u64 {
            jobs.wait(id, Duration::from_secs(10)).unwrap();
        }
        for _ in 0..MAX_KEPT + 5 {
            let j = jobs
                .start(JobSpec::new("copy", "x".into()), |_| {
                    Ok(serde_json::Value::Null)
                })
                .unwrap();
            jobs.wait(j.id, Duration::from_secs(10)).unwrap();
        }
        assert_eq!(jobs.list().len(), MAX_KEPT);
    }
}
