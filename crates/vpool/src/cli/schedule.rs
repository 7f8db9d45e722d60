//! `vpool schedule ...`: snapshots of a volume taken by the daemon on a
//! schedule, the oldest beyond a count deleted (`vpool_service::host`
//! module `schedule`).

use clap::Subcommand;
use vpool_api::{Client, ScheduleInfo, ScheduleRequest};

use super::Output;

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Snapshots of a volume every DURATION, named PREFIX-<UTC time>, the
    /// newest N kept (a run is skipped when nothing changed since the
    /// last snapshot; a snapshot a clone needs is never deleted).
    Add {
        /// [POOL/]VOLUME
        volume: String,
        /// How often (e.g. 30s, 15m, 1h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = super::replica::parse_duration_secs)]
        every: u64,
        /// How many of its snapshots to keep.
        #[arg(long, value_name = "N")]
        keep: u32,
        /// The names' prefix (default `auto`).
        #[arg(long)]
        prefix: Option<String>,
    },
    /// The daemon's schedules: volume, period, kept, last snapshot, runs.
    List,
    /// Remove a schedule (its snapshots stay).
    Remove {
        /// The schedule's id (`vpool schedule list`).
        id: u64,
    },
}

/// `vpool schedule ...`.
pub(super) fn run(client: &Client, out: Output, cmd: &ScheduleCommand) -> anyhow::Result<()> {
    match cmd {
        ScheduleCommand::Add {
            volume,
            every,
            keep,
            prefix,
        } => {
            let req = ScheduleRequest {
                volume: volume.clone(),
                every_secs: *every,
                keep: *keep,
                prefix: prefix.clone(),
            };
            let s = client.add_schedule(&req)?;
            out.emit(&s, |s| {
                format!(
                    "schedule {}: {} every {} s, keeping {} snapshots named {}-<UTC time>",
                    s.id, s.volume, s.every_secs, s.keep, s.prefix
                )
            })
        }
        ScheduleCommand::List => {
            let l = client.schedules()?;
            out.emit(&l, |l| render(&l.schedules))
        }
        ScheduleCommand::Remove { id } => {
            client.remove_schedule(*id)?;
            out.emit(&serde_json::json!({ "removed": id }), |_| {
                format!("schedule {id} removed; its snapshots stay")
            })
        }
    }
}

fn render(list: &[ScheduleInfo]) -> String {
    if list.is_empty() {
        return "no schedules".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.to_string(),
                s.volume.clone(),
                format!("{} s", s.every_secs),
                format!(
                    "{}/{}",
                    s.snapshots.map_or("?".to_string(), |n| n.to_string()),
                    s.keep
                ),
                s.last_snapshot.clone().unwrap_or_else(|| "-".to_string()),
                format!(
                    "{} taken, {} skipped, {} failed",
                    s.taken, s.skipped, s.failures
                ),
                s.last_error.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    super::render::render_table(
        &["ID", "VOLUME", "EVERY", "KEPT", "LAST", "RUNS", "ERROR"],
        &rows,
    )
}
