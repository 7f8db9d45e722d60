//! `vpool vol du` and `vpool vol ls -l`: what volumes and their snapshots
//! take, and what each volume is, as `rbd du` and `rbd ls -l` show them.

use serde::Serialize;
use vpool_api::{Client, VolumeInfo};

use super::Output;
use super::render::render_table;
use crate::size::format_size;

/// One line of `vol du`: a volume or one of its snapshots.
#[derive(Debug, Serialize)]
pub struct DuImage {
    /// `VOLUME` or `VOLUME@SNAPSHOT`.
    pub name: String,
    /// Its size.
    pub provisioned_bytes: u64,
    /// Data bytes it refers to, shared with others or not.
    pub used_bytes: u64,
    /// Of those, the bytes only it holds: what deleting it frees. `None`
    /// where the daemon could not say (the space walk timed out).
    pub exclusive_bytes: Option<u64>,
}

/// `vol du`.
#[derive(Debug, Serialize)]
pub struct DuReport {
    pub images: Vec<DuImage>,
    /// For a whole pool: the volumes' sizes added up, and the data the pool
    /// stores for them all (each shared block once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total: Option<DuTotal>,
}

#[derive(Debug, Serialize)]
pub struct DuTotal {
    pub provisioned_bytes: u64,
    pub used_bytes: u64,
}

/// `vpool vol du [VOL] [--pool P]`.
pub(super) fn du(
    client: &Client,
    out: Output,
    name: Option<&str>,
    pool: Option<&str>,
) -> anyhow::Result<()> {
    // The volume list's figures need no space walk: one walk per volume
    // below, for its exclusive bytes.
    let (c, volumes) = match name {
        Some(n) => {
            let (p, v) = vpool_service::names::split_pool(n);
            let c = client.clone().in_pool(p.or(pool));
            let Some(info) = c.list_volumes()?.into_iter().find(|i| i.name == v) else {
                // The daemon's own words for a volume that is not there.
                c.volume_info(v)?;
                anyhow::bail!("no volume named {n}");
            };
            (c, vec![info])
        }
        None => {
            let c = client.clone().in_pool(pool);
            let vols = c.list_volumes()?;
            (c, vols)
        }
    };
    let mut images = Vec::new();
    for v in &volumes {
        match du_volume(&c, v) {
            Ok(mut rows) => images.append(&mut rows),
            // Deleted since the list.
            Err(e) if name.is_none() && e.kind() == Some(vpool_api::ErrorKind::NotFound) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // A shared pool has no pool-wide figures (each volume is a pool of
    // its own): no total there.
    let total = match (name, c.pool_info()) {
        (None, Ok(info)) => Some(DuTotal {
            provisioned_bytes: images
                .iter()
                .filter(|i| !i.name.contains('@'))
                .map(|i| i.provisioned_bytes)
                .sum(),
            used_bytes: info.live_data_bytes,
        }),
        _ => None,
    };
    let report = DuReport { images, total };
    out.emit(&report, render_du)
}

/// The snapshots of volume `info` (a line of the volume list), oldest
/// first, then the volume: one space walk (the snapshot list's, which has
/// the volume's exclusive bytes too, or the volume's).
fn du_volume(c: &Client, info: &VolumeInfo) -> Result<Vec<DuImage>, vpool_api::ClientError> {
    let name = info.name.as_str();
    let mut rows: Vec<DuImage> = Vec::new();
    let exclusive_bytes = if info.snapshots > 0 {
        let list = c.list_snapshots_full(name)?;
        let mut snaps = list.snapshots;
        snaps.sort_by_key(|s| s.seq);
        rows.extend(snaps.into_iter().map(|s| DuImage {
            name: format!("{}@{}", info.name, s.name),
            provisioned_bytes: s.size_bytes,
            used_bytes: s.allocated_bytes,
            exclusive_bytes: s.exclusive_bytes,
        }));
        list.volume_exclusive_bytes
    } else {
        c.volume_info(name)?.exclusive_bytes
    };
    rows.push(DuImage {
        name: info.name.clone(),
        provisioned_bytes: info.size_bytes,
        used_bytes: info.allocated_bytes,
        exclusive_bytes,
    });
    Ok(rows)
}

fn render_du(r: &DuReport) -> String {
    if r.images.is_empty() {
        return "no volumes".to_string();
    }
    let mut rows: Vec<Vec<String>> = r
        .images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                format_size(i.provisioned_bytes),
                format_size(i.used_bytes),
                i.exclusive_bytes.map_or("?".to_string(), format_size),
            ]
        })
        .collect();
    if let Some(t) = &r.total {
        rows.push(vec![
            "<TOTAL>".to_string(),
            format_size(t.provisioned_bytes),
            format_size(t.used_bytes),
            String::new(),
        ]);
    }
    render_table(&["NAME", "PROVISIONED", "USED", "EXCLUSIVE"], &rows)
}

/// `vol ls -l`: each volume with what it is and who writes it.
pub(super) fn render_long(vols: &[VolumeInfo]) -> String {
    if vols.is_empty() {
        return "no volumes".to_string();
    }
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format_size(v.size_bytes),
                format_size(v.allocated_bytes),
                v.snapshots.to_string(),
                v.parent.clone().unwrap_or_else(|| "-".to_string()),
                flags(v),
                v.clients.len().to_string(),
                v.writer.clone().unwrap_or_else(|| "-".to_string()),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME", "SIZE", "USED", "SNAPS", "PARENT", "FLAGS", "CLIENTS", "WRITER",
        ],
        &rows,
    )
}

/// `vol status` of a volume of a pool that is not shared.
pub(super) fn render_status(name: &str, v: &VolumeInfo) -> String {
    let mut text = match v.clients.len() {
        0 => format!("volume {name}: no NBD clients on this host\n"),
        n => format!("volume {name}: {n} NBD client(s) on this host\n"),
    };
    if let Some(w) = &v.writer {
        text.push_str(&format!("writer: {w}\n"));
    }
    if v.clients.is_empty() {
        return text;
    }
    let rows: Vec<Vec<String>> = (v.clients.iter())
        .map(|c| {
            vec![
                c.peer.clone(),
                c.image.clone(),
                if c.read_only {
                    "read-only"
                } else {
                    "read-write"
                }
                .to_string(),
                vpool_service::host::utc_text(c.since_unix_ms),
            ]
        })
        .collect();
    text.push_str(&render_table(
        &["CLIENT", "IMAGE", "ACCESS", "SINCE (UTC)"],
        &rows,
    ));
    text
}

/// What a volume is, in words joined by commas (`-` for a plain volume).
fn flags(v: &VolumeInfo) -> String {
    let mut f: Vec<&str> = Vec::new();
    if v.template.is_some() {
        f.push("template");
    }
    if v.replica_of.is_some() {
        f.push("replica");
    }
    if v.ephemeral {
        f.push("ephemeral");
    }
    if v.incomplete {
        f.push("incomplete");
    }
    if v.multi_writer {
        f.push("shared");
    }
    if v.qos.is_some() {
        f.push("qos");
    }
    if f.is_empty() {
        "-".to_string()
    } else {
        f.join(",")
    }
}
