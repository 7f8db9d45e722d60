//! `vpool snap ...`: snapshots, named `VOLUME@SNAPSHOT`.

use clap::Subcommand;
use vpool_api::Client;

use super::{Output, hint_force, parse_snapshot_name, render_snapshot_table};
use crate::size::format_size;

#[derive(Debug, Subcommand)]
pub enum SnapCommand {
    /// Take a snapshot: `vpool snap create web1@before-upgrade`. Instant.
    Create {
        /// VOLUME@SNAPSHOT
        snapshot: String,
    },
    /// List a volume's snapshots, oldest first.
    List {
        /// [POOL/]VOLUME.
        volume: String,
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
        SnapCommand::List { volume } => {
            let snaps = client.list_snapshots(volume)?;
            out.emit(&vpool_api::SnapshotList { snapshots: snaps }, |l| {
                render_snapshot_table(volume, &l.snapshots)
            })
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
