//! `vpool snap ...`: snapshots, named `VOLUME@SNAPSHOT`.

use clap::Subcommand;
use vpool_api::Client;

use super::{
    Output, hint_force, parse_snapshot_name, render_pool_snapshots, render_snapshot_table,
};
use crate::size::format_size;

#[derive(Debug, Subcommand)]
pub enum SnapCommand {
    /// Take a snapshot: `vpool snap create web1@before-upgrade`. Instant.
    Create {
        /// VOLUME@SNAPSHOT
        snapshot: String,
    },
    /// List a volume's snapshots, oldest first, with their creation times;
    /// `--all`: every snapshot of a pool.
    List {
        /// [POOL/]VOLUME.
        #[arg(required_unless_present = "all")]
        volume: Option<String>,
        /// Every snapshot of the pool (`--pool`, or the default pool),
        /// with its volume, oldest first.
        #[arg(long, conflicts_with = "volume")]
        all: bool,
        /// With --all: the pool.
        #[arg(long, value_name = "POOL", requires = "all")]
        pool: Option<String>,
    },
    /// Delete a snapshot (refused while clones were made from it).
    Delete {
        /// VOLUME@SNAPSHOT
        snapshot: String,
    },
    /// Make a volume equal to one of its snapshots (content and size).
    Rollback {
        /// VOLUME@SNAPSHOT
        snapshot: String,
        /// Even while NBD clients have the volume open for writing (their
        /// disk changes under them).
        #[arg(long)]
        force: bool,
    },
}

/// `vpool snap ...`.
pub(super) fn run(client: &Client, out: Output, cmd: &SnapCommand) -> anyhow::Result<()> {
    match cmd {
        SnapCommand::Create { snapshot } => {
            let (vol, snap) = parse_snapshot_name(snapshot)?;
            let info = client.create_snapshot(vol, snap)?;
            out.emit(&info, |info| {
                format!(
                    "created snapshot {}@{} ({}, {} of data)",
                    info.volume,
                    info.name,
                    format_size(info.size_bytes),
                    format_size(info.allocated_bytes)
                )
            })
        }
        SnapCommand::List { volume, all, pool } => {
            let Some(volume) = volume.as_deref().filter(|_| !all) else {
                return list_pool(client, out, pool.as_deref());
            };
            let snaps = client.list_snapshots(volume)?;
            out.emit(
                &vpool_api::SnapshotList {
                    snapshots: snaps,
                    volume_exclusive_bytes: None,
                },
                |l| render_snapshot_table(volume, &l.snapshots),
            )
        }
        SnapCommand::Delete { snapshot } => {
            let (vol, snap) = parse_snapshot_name(snapshot)?;
            client.delete_snapshot(vol, snap)?;
            out.emit(&serde_json::json!({ "deleted": snapshot }), |_| {
                format!("deleted snapshot {snapshot}")
            })
        }
        SnapCommand::Rollback { snapshot, force } => {
            let (vol, snap) = parse_snapshot_name(snapshot)?;
            let info = client.rollback(vol, snap, *force).map_err(hint_force)?;
            out.emit(&info, |info| {
                format!(
                    "rolled back volume {} to {snapshot} ({})",
                    info.name,
                    format_size(info.size_bytes)
                )
            })
        }
    }
}

/// `snap list --all`: every snapshot of `pool` (`None`: the default
/// pool's), in the order they were taken. Of a shared pool: the volumes
/// this host owns (as `vol list` shows them).
fn list_pool(client: &Client, out: Output, pool: Option<&str>) -> anyhow::Result<()> {
    let in_pool = client.clone().in_pool(pool);
    let mut snapshots = Vec::new();
    for v in in_pool.list_volumes()?.iter().filter(|v| v.snapshots > 0) {
        match in_pool.list_snapshots(&v.name) {
            Ok(s) => snapshots.extend(s),
            // Deleted since the volume list.
            Err(e) if e.kind() == Some(vpool_api::ErrorKind::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // By time where known (the volumes of a shared pool have logs of
    // their own), then by the log's order.
    snapshots.sort_by_key(|s| (s.created_unix_ms.unwrap_or(0), s.seq));
    let name = pool.unwrap_or("the default pool").to_string();
    out.emit(
        &vpool_api::SnapshotList {
            snapshots,
            volume_exclusive_bytes: None,
        },
        |l| render_pool_snapshots(&name, &l.snapshots),
    )
}
