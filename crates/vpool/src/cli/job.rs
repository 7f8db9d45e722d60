//! `vpool job ...`: the daemon's long operations (`vol copy`), with their
//! progress; and the waiting that commands starting a job do.

use std::time::Duration;

use clap::Subcommand;
use vpool_api::{Client, JobInfo, JobState};

use super::Output;
use crate::size::format_size;
use crate::transfer::progress_bar;

/// How often a wait asks the daemon how a job is doing.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// The daemon's jobs: running, and the latest finished ones (not
    /// across restarts).
    List,
    /// One job: its state, progress, rate and outcome.
    Show {
        /// The job's id (`vpool job list`).
        id: u64,
    },
    /// Ask a job to stop: it stops at its next step and undoes what it did
    /// (a copy deletes what it made).
    Cancel {
        /// The job's id (`vpool job list`).
        id: u64,
    },
    /// Wait for a job to end, showing its progress; fails unless it
    /// succeeded.
    Wait {
        /// The job's id (`vpool job list`).
        id: u64,
    },
}

/// `vpool job ...`.
pub(super) fn run(
    client: &Client,
    out: Output,
    show_progress: bool,
    cmd: &JobCommand,
) -> anyhow::Result<()> {
    match cmd {
        JobCommand::List => {
            let list = client.jobs()?;
            out.emit(&list, |l| render_jobs(&l.jobs))
        }
        JobCommand::Show { id } => {
            let job = client.job(*id)?;
            out.emit(&job, describe)
        }
        JobCommand::Cancel { id } => {
            let job = client.cancel_job(*id)?;
            out.emit(&job, |j| {
                if j.state.finished() {
                    format!("job {} had ended already: {}", j.id, describe(j))
                } else {
                    format!("job {} asked to stop (it undoes what it did); `vpool job wait {}` waits for it", j.id, j.id)
                }
            })
        }
        JobCommand::Wait { id } => {
            let job = wait(client, *id, show_progress)?;
            out.emit(&job, describe)?;
            succeeded(&job)
        }
    }
}

/// Waits for job `id` to end, with a progress bar for a person watching.
/// Interrupting the wait leaves the job running.
pub(super) fn wait(client: &Client, id: u64, show_progress: bool) -> anyhow::Result<JobInfo> {
    let mut job = client.job(id)?;
    let bar = progress_bar(job.total_bytes, show_progress, &job.kind);
    while !job.state.finished() {
        bar.set_length(job.total_bytes);
        bar.set_position(job.done_bytes);
        std::thread::sleep(POLL_INTERVAL);
        job = client.job(id)?;
    }
    bar.finish_and_clear();
    Ok(job)
}

/// After a command started `job`: with `detach`, says which job it is
/// and returns `None`; else waits for it (an error unless it succeeded)
/// and returns it, ended.
pub(super) fn follow(
    client: &Client,
    out: Output,
    show_progress: bool,
    job: JobInfo,
    detach: bool,
) -> anyhow::Result<Option<JobInfo>> {
    if detach {
        out.emit(&job, |j| {
            format!(
                "job {} ({} {}); `vpool job wait {}` follows it, `vpool job cancel {}` stops it",
                j.id, j.kind, j.target, j.id, j.id
            )
        })?;
        return Ok(None);
    }
    let job = wait(client, job.id, show_progress)?;
    succeeded(&job)?;
    Ok(Some(job))
}

/// An error unless `job` succeeded.
pub(super) fn succeeded(job: &JobInfo) -> anyhow::Result<()> {
    match job.state {
        JobState::Succeeded => Ok(()),
        other => anyhow::bail!(
            "job {} ({} {}) {}: {}",
            job.id,
            job.kind,
            job.target,
            state_word(other),
            job.error.as_deref().unwrap_or("no reason given")
        ),
    }
}

fn state_word(s: JobState) -> &'static str {
    match s {
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

fn progress(j: &JobInfo) -> String {
    let pct = (j.done_bytes as f64 * 100.0 / j.total_bytes.max(1) as f64).min(100.0);
    format!(
        "{} of {} ({pct:.0}%)",
        format_size(j.done_bytes),
        format_size(j.total_bytes)
    )
}

/// One job for a person.
fn describe(j: &JobInfo) -> String {
    let mut s = format!(
        "job {}: {} {}\nstate: {}\nprogress: {}, {}/s",
        j.id,
        j.kind,
        j.target,
        state_word(j.state),
        progress(j),
        format_size(j.rate_bytes_per_sec)
    );
    if let Some(eta) = j.eta_secs {
        s.push_str(&format!(", about {eta} s left"));
    }
    if j.cancel_requested && !j.state.finished() {
        s.push_str("\ncancel asked: it stops at its next step");
    }
    if let Some(e) = &j.error {
        s.push_str(&format!("\nerror: {e}"));
    }
    if let Some(r) = &j.result {
        s.push_str(&format!("\nresult: {r}"));
    }
    s
}

fn render_jobs(jobs: &[JobInfo]) -> String {
    if jobs.is_empty() {
        return "no jobs".to_string();
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j.id.to_string(),
                j.kind.clone(),
                state_word(j.state).to_string(),
                progress(j),
                format!("{}/s", format_size(j.rate_bytes_per_sec)),
                j.target.clone(),
            ]
        })
        .collect();
    super::render::render_table(
        &["ID", "KIND", "STATE", "PROGRESS", "RATE", "TARGET"],
        &rows,
    )
}
