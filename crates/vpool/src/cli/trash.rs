//! `vpool vol trash ...`: a pool's trash (`vpool_service::trash`), as
//! `rbd trash` works: `mv` frees the name at once and keeps the data,
//! `restore` brings it back, `rm` and `purge` delete for good.
//!
//! A volume in the trash is named here by its old name (`[POOL/]NAME`), or
//! by `--id` when several of that name are there.

use clap::Subcommand;
use vpool_api::{Client, TrashEntry};

use super::Output;
use crate::size::format_size;

#[derive(Debug, Subcommand)]
pub enum TrashCommand {
    /// Move a volume to its pool's trash: its name is free at once, its
    /// data, snapshots and clones stay until it is removed or purged.
    Mv {
        /// [POOL/]VOLUME.
        name: String,
        /// Delete it for good that long after (e.g. 7d, 12h), unless its
        /// snapshots have clones then (default: kept until rm or purge).
        #[arg(long, value_name = "DURATION", value_parser = super::replica::parse_duration_secs)]
        expire: Option<u64>,
    },
    /// The volumes in a pool's trash, oldest first.
    Ls {
        /// The pool's trash (default: the default pool's).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
    /// Take a volume out of the trash, under its old name or --name.
    Restore {
        /// [POOL/]NAME it had when it went to the trash.
        name: String,
        /// Which one, when several of that name are in the trash.
        #[arg(long)]
        id: Option<u64>,
        /// The name it comes back under (default: its old one).
        #[arg(long = "name", value_name = "NEW")]
        new_name: Option<String>,
    },
    /// Delete a volume of the trash for good (refused while its snapshots
    /// have clones).
    Rm {
        /// [POOL/]NAME it had when it went to the trash.
        name: String,
        /// Which one, when several of that name are in the trash.
        #[arg(long)]
        id: Option<u64>,
    },
    /// Delete for good what went to the trash long enough ago (volumes
    /// whose snapshots have clones stay, and are listed).
    Purge {
        /// Only what went there at least this long ago (e.g. 7d, 12h;
        /// default: everything).
        #[arg(long, value_name = "DURATION", value_parser = super::replica::parse_duration_secs)]
        older_than: Option<u64>,
        /// The pool's trash (default: the default pool's).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
}

/// `vpool vol trash ...`.
pub(super) fn run(client: &Client, out: Output, cmd: &TrashCommand) -> anyhow::Result<()> {
    match cmd {
        TrashCommand::Mv { name, expire } => {
            let e = client.trash_volume(name, *expire)?;
            out.emit(&e, |e| {
                format!(
                    "moved volume {name} to the trash (id {}); `vpool vol trash restore {name}` brings it back",
                    e.id
                )
            })
        }
        TrashCommand::Ls { pool } => {
            let list = client.clone().in_pool(pool.as_deref()).trash_list()?;
            out.emit(&serde_json::json!({ "trash": list }), |_| render(&list))
        }
        TrashCommand::Restore { name, id, new_name } => {
            let (c, e) = find(client, name, *id)?;
            let info = c.trash_restore(e.id, new_name.as_deref())?;
            out.emit(&info, |i| {
                format!("restored volume {} (id {}) from the trash", i.name, i.id)
            })
        }
        TrashCommand::Rm { name, id } => {
            let (c, e) = find(client, name, *id)?;
            let gone = c.trash_remove(e.id)?;
            out.emit(&gone, |g| {
                format!("deleted volume {} (id {}) from the trash", g.name, g.id)
            })
        }
        TrashCommand::Purge { older_than, pool } => {
            let c = client.clone().in_pool(pool.as_deref());
            let r = c.trash_purge(older_than.unwrap_or(0))?;
            out.emit(&r, |r| {
                let mut text = format!("purged {} volume(s) from the trash", r.purged.len());
                for k in &r.kept {
                    text.push_str(&format!(
                        "\nkept {} (id {}): {} cloned from its snapshots",
                        k.name,
                        k.id,
                        k.clones.join(", ")
                    ));
                }
                text
            })
        }
    }
}

/// The trash entry `[POOL/]NAME` names (the one with `id` if given), and a
/// client for its pool.
fn find(client: &Client, name: &str, id: Option<u64>) -> anyhow::Result<(Client, TrashEntry)> {
    let (pool, name) = vpool_service::names::split_pool(name);
    let c = client.clone().in_pool(pool);
    let all = c.trash_list()?;
    let mut matching: Vec<TrashEntry> = all
        .into_iter()
        .filter(|e| e.name == name && id.is_none_or(|id| e.id == id))
        .collect();
    match matching.len() {
        1 => Ok((c, matching.remove(0))),
        0 => Err(vpool_api::ClientError::Api {
            status: 404,
            kind: vpool_api::ErrorKind::NotFound,
            message: format!(
                "no volume {name}{} in the trash (`vpool vol trash ls`)",
                id.map_or(String::new(), |id| format!(" with id {id}"))
            ),
        }
        .into()),
        _ => {
            let ids: Vec<String> = matching.iter().map(|e| e.id.to_string()).collect();
            Err(vpool_api::ClientError::Api {
                status: 409,
                kind: vpool_api::ErrorKind::Invalid,
                message: format!(
                    "{} volumes named {name} are in the trash (ids {}): say which with --id",
                    matching.len(),
                    ids.join(", ")
                ),
            }
            .into())
        }
    }
}

fn render(list: &[TrashEntry]) -> String {
    if list.is_empty() {
        return "the trash is empty".to_string();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|e| {
            vec![
                e.id.to_string(),
                e.name.clone(),
                vpool_service::host::utc_text(e.trashed_unix_ms),
                e.expires_unix_ms
                    .map_or("-".to_string(), vpool_service::host::utc_text),
                format_size(e.size_bytes),
                format_size(e.allocated_bytes),
                e.snapshots.to_string(),
                if e.clones.is_empty() {
                    "-".to_string()
                } else {
                    e.clones.join(",")
                },
            ]
        })
        .collect();
    super::render::render_table(
        &[
            "ID",
            "NAME",
            "TRASHED (UTC)",
            "EXPIRES (UTC)",
            "SIZE",
            "ALLOCATED",
            "SNAPSHOTS",
            "CLONES",
        ],
        &rows,
    )
}
