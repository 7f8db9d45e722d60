//! `vpool replica ...`: replication of volumes into another pool, as
//! points in time (`vpool_service::host` module `replica`).

use clap::Subcommand;
use vpool_api::{Client, ReplicaRequest, ReplicaStatus};

use super::Output;
use crate::size::format_size;

#[derive(Debug, Subcommand)]
pub enum ReplicaCommand {
    /// Replicate a volume into another pool: the replica POOL/NAME is made
    /// and its first run starts at once; each run copies what changed
    /// since the last and ends in a point (a snapshot of the replica).
    Add {
        /// [POOL/]VOLUME
        volume: String,
        /// POOL or POOL/NAME (default name: the volume's).
        #[arg(long)]
        to: String,
        /// A run this often (e.g. 30s, 15m, 1h); without it, runs only by
        /// hand (`vpool replica run`).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration_secs)]
        every: Option<u64>,
        /// Points the replica keeps (default 24); the oldest go first.
        #[arg(long, value_name = "N")]
        keep: Option<u32>,
        /// Copy at most this many bytes a second in a run (e.g. 100M).
        #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
        max_rate: Option<u64>,
    },
    /// Every replication of the daemon: last point, lag, runs.
    List,
    /// One replication: its last point, lag, bytes moved, errors.
    Status {
        /// [POOL/]VOLUME (the replicated volume)
        volume: String,
    },
    /// A run now; waits for it unless --detach.
    Run {
        /// [POOL/]VOLUME (the replicated volume)
        volume: String,
        /// Print the job and return at once (`vpool job wait ID`).
        #[arg(long)]
        detach: bool,
    },
    /// Compare the newest point on both sides, piece by piece (SHA-256);
    /// waits unless --detach, fails at the first difference.
    Verify {
        /// [POOL/]VOLUME (the replicated volume)
        volume: String,
        /// Print the job and return at once (`vpool job wait ID`).
        #[arg(long)]
        detach: bool,
    },
    /// Stop replicating (a run under way is cancelled). The replica stays
    /// with its points: promote it, or delete it.
    Remove {
        /// [POOL/]VOLUME (the replicated volume)
        volume: String,
    },
    /// Make a replica a volume of its own, at its newest point (after a
    /// disaster, or to switch over). Replication into it stops.
    Promote {
        /// [POOL/]NAME of the replica
        replica: String,
    },
}

/// `vpool replica ...`.
pub(super) fn run(
    client: &Client,
    out: Output,
    show_progress: bool,
    cmd: &ReplicaCommand,
) -> anyhow::Result<()> {
    match cmd {
        ReplicaCommand::Add {
            volume,
            to,
            every,
            keep,
            max_rate,
        } => {
            let (to_pool, name) = match to.split_once('/') {
                Some((p, n)) => (p.to_string(), Some(n.to_string())),
                None => (to.clone(), None),
            };
            let req = ReplicaRequest {
                to_pool,
                name,
                every_secs: *every,
                keep: *keep,
                max_rate_bytes_per_sec: *max_rate,
            };
            let st = client.add_replica(volume, &req)?;
            out.emit(&st, |s| {
                format!(
                    "replicating {} into {}; first run: job {} (`vpool replica status {}`)",
                    s.volume,
                    s.to,
                    s.job.map_or("-".to_string(), |j| j.to_string()),
                    s.volume
                )
            })
        }
        ReplicaCommand::List => {
            let list = client.replicas()?;
            out.emit(&list, |l| render_list(&l.replicas))
        }
        ReplicaCommand::Status { volume } => {
            let st = client.replica(volume)?;
            out.emit(&st, describe)
        }
        ReplicaCommand::Run { volume, detach } => {
            let job = client.run_replica(volume)?;
            follow(client, out, show_progress, job, *detach)
        }
        ReplicaCommand::Verify { volume, detach } => {
            let job = client.verify_replica(volume)?;
            follow(client, out, show_progress, job, *detach)
        }
        ReplicaCommand::Remove { volume } => {
            client.remove_replica(volume)?;
            out.emit(&serde_json::json!({"removed": volume}), |_| {
                format!("{volume} is no longer replicated; its replica stays with its points (promote or delete it)")
            })
        }
        ReplicaCommand::Promote { replica } => {
            let info = client.promote(replica)?;
            out.emit(&info, |v| {
                format!(
                    "{} is a volume of its own now, at its newest point; serve it over NBD as any other",
                    v.name
                )
            })
        }
    }
}

/// Waits for `job` unless `detach`, and says how it went.
fn follow(
    client: &Client,
    out: Output,
    show_progress: bool,
    job: vpool_api::JobInfo,
    detach: bool,
) -> anyhow::Result<()> {
    let Some(job) = super::job::follow(client, out, show_progress, job, detach)? else {
        return Ok(());
    };
    out.emit(&job, |j| {
        let r = j.result.clone().unwrap_or_default();
        match j.kind.as_str() {
            "verify" => format!(
                "point {} is the same on both sides ({} compared, {})",
                r["point"].as_str().unwrap_or("?"),
                format_size(r["compared_bytes"].as_u64().unwrap_or(0)),
                r["digest"].as_str().unwrap_or("?")
            ),
            _ => format!(
                "point {}: {} changed, {} of data written, in {} ms",
                r["point"].as_str().unwrap_or("?"),
                format_size(r["changed_bytes"].as_u64().unwrap_or(0)),
                format_size(r["moved_bytes"].as_u64().unwrap_or(0)),
                r["took_ms"].as_u64().unwrap_or(0)
            ),
        }
    })
}

fn every(s: &ReplicaStatus) -> String {
    s.every_secs
        .map_or("by hand".to_string(), |e| format!("every {e} s"))
}

fn describe(s: &ReplicaStatus) -> String {
    let mut t = format!(
        "{} -> {} ({}, keeping {} points)\nlast point: {}{}\npoints: {}\nruns: {} ({} failed), {} written since the daemon started\n",
        s.volume,
        s.to,
        every(s),
        s.keep,
        s.last_point.as_deref().unwrap_or("none yet"),
        s.lag_secs
            .map_or(String::new(), |l| format!(" ({l} s ago)")),
        s.points.map_or("?".to_string(), |p| p.to_string()),
        s.runs,
        s.failures,
        format_size(s.moved_bytes)
    );
    if let Some(j) = s.job {
        t.push_str(&format!("running: job {j}\n"));
    }
    if let Some(o) = s.resume_offset {
        t.push_str(&format!("an interrupted run goes on from offset {o}\n"));
    }
    if let Some(r) = &s.last_run {
        t.push_str(&format!("last run: {r}\n"));
    }
    if let Some(e) = &s.last_error {
        t.push_str(&format!("last error: {e}\n"));
    }
    t
}

fn render_list(list: &[ReplicaStatus]) -> String {
    if list.is_empty() {
        return "no replications".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.volume.clone(),
                s.to.clone(),
                every(s),
                s.last_point.clone().unwrap_or_else(|| "-".to_string()),
                s.lag_secs.map_or("-".to_string(), |l| format!("{l} s")),
                s.job.map_or("-".to_string(), |j| format!("job {j}")),
                s.last_error.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    super::render::render_table(
        &[
            "VOLUME",
            "REPLICA",
            "SCHEDULE",
            "LAST POINT",
            "LAG",
            "RUNNING",
            "ERROR",
        ],
        &rows,
    )
}

/// A duration: `90`, `90s`, `15m`, `1h`, `2d` (whole seconds).
pub(super) fn parse_duration_secs(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 15m, 1h)"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    n.checked_mul(unit_secs)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("{s:?}: give a duration above 0"))
}

#[cfg(test)]
mod tests {
    use super::parse_duration_secs;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("90"), Ok(90));
        assert_eq!(parse_duration_secs("30s"), Ok(30));
        assert_eq!(parse_duration_secs("15m"), Ok(900));
        assert_eq!(parse_duration_secs("1h"), Ok(3600));
        for bad in ["", "0", "m", "5x", "1.5h", "-3s"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad:?}");
        }
    }
}
