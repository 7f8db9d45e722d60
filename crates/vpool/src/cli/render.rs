//! The text of each command's output (`--json` prints the values
//! themselves).

use serde::Serialize;
use vpool_api::{CacheInfo, Diff, DiffKind, PinInfo, PoolInfo, SnapshotInfo, VolumeInfo};

use crate::s3pool::PoolReport;
use crate::size::format_size;
use crate::vdiff;

/// The `pool list` table.
pub fn render_pool_list(pools: &[vpool_api::PoolStatus]) -> String {
    let mut out = format!(
        "{:<16} {:<6} {:<7} {:>7} {:>10} {:>10}  {}\n",
        "NAME", "KIND", "STATE", "VOLUMES", "SIZE", "USED", "DIR"
    );
    let size = |b: Option<u64>| b.map_or_else(|| "-".to_string(), format_size);
    for p in pools {
        let name = if p.default {
            format!("{} *", p.name)
        } else {
            p.name.clone()
        };
        out.push_str(&format!(
            "{:<16} {:<6} {:<7} {:>7} {:>10} {:>10}  {}\n",
            name,
            p.kind.map_or("-", |k| k.as_str()),
            p.state,
            p.volumes.map_or_else(|| "-".to_string(), |n| n.to_string()),
            size(p.logical_bytes),
            size(p.physical_bytes),
            p.dir
        ));
        if let Some(r) = &p.reason {
            out.push_str(&format!("  {}: {r}\n", p.name));
        }
    }
    out.push_str("(* the default pool: bare volume names mean it)\n");
    out
}

/// The text of a check's report.
pub fn render_check(r: &vpool_api::CheckResult, repair: bool) -> String {
    let mut out = format!(
        "checked {} segments ({}), {} records, {} mapped blocks\n",
        r.segments_checked,
        format_size(r.bytes_checked),
        r.records_checked,
        r.blocks_verified
    );
    if r.segments_checked == 0 && !r.recovery.is_empty() {
        out.push_str(
            "the pool does not open: recovery found records lost in data that was durable\n",
        );
    }
    for d in &r.recovery {
        let what = if d.loses_records && r.recovery_repaired {
            "dropped by repair"
        } else if d.loses_records {
            "records lost: opens only with --repair"
        } else {
            "kept; reads of damaged blocks fail"
        };
        out.push_str(&format!("recovery: {} ({what})\n", d.what));
    }
    for b in &r.bad_records {
        out.push_str(&format!(
            "unreadable log: seg-{:016x} at byte {}: {}\n",
            b.segment, b.offset, b.what
        ));
    }
    for d in &r.damaged_ranges {
        let done = if r.repaired.contains(d) {
            " (trimmed: reads zeros now)"
        } else if repair && d.image.contains('@') {
            " (a snapshot: not changed; delete it to drop this)"
        } else {
            ""
        };
        out.push_str(&format!(
            "damaged: {} bytes {}..{} (stored in seg-{:016x} at byte {}){done}\n",
            d.image,
            d.offset_bytes,
            d.offset_bytes + d.len_bytes,
            d.segment,
            d.segment_offset
        ));
    }
    for s in &r.evacuated_segments {
        out.push_str(&format!(
            "repaired: seg-{s:016x}: its live data moved, the damaged segment deleted\n"
        ));
    }
    for e in r.map_errors.iter().chain(&r.refcount_errors) {
        out.push_str(&format!("inconsistent: {e}\n"));
    }
    for c in &r.checkpoints {
        match (&c.error, c.next_seq) {
            (Some(e), _) => out.push_str(&format!(
                "checkpoint {}: unreadable ({e}); the next checkpoint rewrites it\n",
                c.name
            )),
            (None, Some(seq)) => {
                out.push_str(&format!("checkpoint {}: ok (next seq {seq})\n", c.name))
            }
            (None, None) => {}
        }
    }
    if r.clean {
        out.push_str("no damage found\n");
    }
    out
}

/// The `pool create` / `pool attach` text.
pub fn render_pool_report(r: &PoolReport, done: &str) -> String {
    let c = &r.config;
    let mut out = format!(
        "{done} pool {} on {}
cache:       {} ({})
",
        c.name.as_deref().unwrap_or("(unnamed)"),
        c.url,
        r.pool_dir.display(),
        format_size(c.cache_size_bytes)
    );
    if let Some(ep) = &c.endpoint {
        out.push_str(&format!(
            "endpoint:    {ep}
"
        ));
    }
    out.push_str(&format!(
        "credentials: {}
",
        match &c.credentials_file {
            Some(f) => f.display().to_string(),
            None => "from the environment".to_string(),
        }
    ));
    if let Some(h) = &r.held_by {
        out.push_str(&format!(
            "held by:     {h} (serving it here needs that daemon stopped, or `serve --force`)
"
        ));
    }
    out.push_str(&format!(
        "serve it:    vpool --home {} serve
",
        r.pool_dir.display()
    ));
    out
}

/// The `cache stats` text.
pub fn render_cache_stats(c: &CacheInfo) -> String {
    let pct = |used: u64, of: u64| {
        if of == 0 {
            0.0
        } else {
            used as f64 * 100.0 / of as f64
        }
    };
    format!(
        "remote:       {}\n\
         cache:        {} ({})\n\
         hit ratio:    {:.1}% ({} hits, {} misses)\n\
         cached:       {} ({:.1}% of the cache)\n\
         dirty:        {} (writes wait at {})\n\
         pinned:       {} ({} pins)\n\
         read:         {} read, {} fetched from the object store\n\
         upload:       {} segments, {}, {:.1} MB/s\n\
         upload lag:   {}, {:.1} s\n\
         errors:       {} object store, {} read{}\n\
         generation:   {} ({} segments in the bucket)\n\
         holder:       {} (fencing: {})\n\
         fenced:       {}\n\
         durability:   {}\n\
",
        c.remote,
        c.cache_dir,
        format_size(c.cache_size_bytes),
        c.hit_ratio * 100.0,
        c.read_hits,
        c.read_misses,
        format_size(c.cached_bytes),
        pct(c.cached_bytes, c.cache_size_bytes),
        format_size(c.dirty_bytes),
        format_size(c.dirty_limit_bytes),
        format_size(c.pinned_bytes),
        c.pins,
        format_size(c.bytes_read),
        format_size(c.bytes_fetched),
        c.segments_uploaded,
        format_size(c.bytes_uploaded),
        c.upload_mb_per_s,
        format_size(c.upload_lag_bytes),
        c.upload_lag_seconds,
        c.remote_errors,
        c.read_errors,
        match &c.last_error {
            Some(e) => format!("; last: {e}"),
            None => String::new(),
        },
        c.generation,
        c.segments_in_bucket,
        c.holder,
        c.fencing,
        match &c.fenced {
            Some(why) => format!("YES: another host took the pool over; writes fail ({why})"),
            None => "no".to_string(),
        },
        if c.durability == "remote" {
            format!(
                "remote: a flush is in the bucket when acknowledged ({} journal entries, {})",
                c.journal_entries,
                format_size(c.journal_bytes)
            )
        } else {
            "host: a flush is in this cache; the bucket lags by the seal interval".to_string()
        },
    )
}

/// The `cache pins` table.
pub fn render_pins(pins: &[PinInfo]) -> String {
    if pins.is_empty() {
        return "no pins
"
        .to_string();
    }
    let rows: Vec<Vec<String>> = pins
        .iter()
        .map(|p| {
            vec![
                p.image(),
                p.bytes.map(format_size).unwrap_or_else(|| "-".into()),
                match &p.error {
                    Some(e) => format!("pins nothing: {e}"),
                    None if p.bytes.is_some() => "pinned".to_string(),
                    None => "pending".to_string(),
                },
            ]
        })
        .collect();
    render_table(&["IMAGE", "DATA", "STATUS"], &rows)
}

/// `vol flatten --json`.
#[derive(Debug, Serialize)]
pub struct FlattenReport {
    /// The `volume@snapshot` the clone no longer depends on.
    pub detached_from: Option<String>,
    /// Nothing was copied: a clone in a pool never reads through its
    /// parent (a clone of a shared pool's template does).
    pub instant: bool,
    /// Bytes of the template copied into a shared pool's clone.
    pub bytes_copied: u64,
    pub volume: VolumeInfo,
}

/// `vol commit --json`.
#[derive(Debug, Serialize)]
pub struct CommitReport {
    pub clone: String,
    /// The parent volume, now holding the clone's content.
    pub parent: VolumeInfo,
}

/// The `snap list` table.
pub fn render_snapshot_table(volume: &str, snaps: &[SnapshotInfo]) -> String {
    if snaps.is_empty() {
        return format!("no snapshots of {volume}\n");
    }
    let rows: Vec<Vec<String>> = snaps.iter().map(snapshot_row).collect();
    render_table(&SNAPSHOT_COLUMNS, &rows)
}

/// `snap list --all`: every snapshot of a pool, with its volume.
pub fn render_pool_snapshots(pool: &str, snaps: &[SnapshotInfo]) -> String {
    if snaps.is_empty() {
        return format!("no snapshots in {pool}\n");
    }
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            let mut row = vec![s.volume.clone()];
            row.extend(snapshot_row(s));
            row
        })
        .collect();
    let mut columns = vec!["VOLUME"];
    columns.extend(SNAPSHOT_COLUMNS);
    render_table(&columns, &rows)
}

/// The columns of [`snapshot_row`].
const SNAPSHOT_COLUMNS: [&str; 7] = [
    "NAME",
    "SIZE",
    "ALLOCATED",
    "EXCLUSIVE",
    "SHARED",
    "SEQ",
    "CREATED (UTC)",
];

/// A snapshot's cells: name, sizes, sequence, creation time (`-` when not
/// known: taken by an earlier release or copied in).
fn snapshot_row(s: &SnapshotInfo) -> Vec<String> {
    let size_or_dash = |b: Option<u64>| b.map(format_size).unwrap_or_else(|| "-".into());
    vec![
        s.name.clone(),
        format_size(s.size_bytes),
        format_size(s.allocated_bytes),
        size_or_dash(s.exclusive_bytes),
        size_or_dash(s.shared_bytes),
        s.seq.to_string(),
        s.created_unix_ms
            .map(vpool_service::host::utc_text)
            .unwrap_or_else(|| "-".into()),
    ]
}

/// The `vol diff` text: one line per changed extent and a summary.
pub fn render_diff(d: &Diff) -> String {
    let show = |s: &Option<String>| vdiff::image_name(&d.volume, s.as_deref());
    let (mut data, mut zero) = (0u64, 0u64);
    let rows: Vec<Vec<String>> = d
        .extents
        .iter()
        .map(|e| {
            let kind = match e.kind {
                DiffKind::Data => {
                    data += e.length;
                    "data"
                }
                DiffKind::Zero => {
                    zero += e.length;
                    "zero"
                }
            };
            vec![e.offset.to_string(), e.length.to_string(), kind.to_string()]
        })
        .collect();
    let mut out = String::new();
    if !rows.is_empty() {
        out.push_str(&render_table(&["OFFSET", "LENGTH", "KIND"], &rows));
    }
    out.push_str(&format!(
        "{} -> {}: {} changed extents, {} of data, {} zeroed",
        show(&d.from),
        show(&d.to),
        d.extents.len(),
        format_size(data),
        format_size(zero)
    ));
    if d.size_bytes != d.from_size_bytes {
        out.push_str(&format!(
            "; size {} -> {}",
            format_size(d.from_size_bytes),
            format_size(d.size_bytes)
        ));
    }
    out.push('\n');
    out
}

/// A left-aligned table with a header row, columns two spaces apart.
pub(super) fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (c, w) in cells.zip(&widths) {
            l.push_str(&format!("{c:<w$}  ", w = *w));
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for r in rows {
        line(&mut r.iter().map(String::as_str));
    }
    out
}

/// Who owns a volume of a shared pool, in a few words.
pub fn owner_text(s: &vpool_api::SharedVolumeStatus) -> String {
    match (&s.owner.holder, s.owner.epoch, s.owner.generation) {
        (Some(h), Some(e), _) => format!("{h}, epoch {e}"),
        (_, _, None) => "no family yet: being created, or its creation failed".to_string(),
        _ => "released: no owner".to_string(),
    }
}

/// How long ago `since_unix_ms` was, roughly: `42s`, `5m`, `3h`, `12d`
/// (`-` if unknown; clocks of two hosts may disagree a little).
fn age_text(since_unix_ms: Option<u64>) -> String {
    let Some(since) = since_unix_ms else {
        return "-".into();
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let s = now_ms.saturating_sub(since) / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `vol list` of a shared pool: every volume with its owner.
pub fn render_shared_table(vols: &[vpool_api::SharedVolumeStatus]) -> String {
    if vols.is_empty() {
        return "no volumes\n".to_string();
    }
    let rows: Vec<Vec<String>> = vols
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.owner.holder.clone().unwrap_or_else(|| "-".into()),
                v.owner.epoch.map_or("-".into(), |e| e.to_string()),
                match v.owner.holder {
                    Some(_) => age_text(v.owner.since_unix_ms),
                    None => "-".into(),
                },
                if v.here { "yes" } else { "no" }.to_string(),
                v.size_bytes.map_or("-".into(), format_size),
                v.unuploaded_bytes.map_or("-".into(), format_size),
            ]
        })
        .collect();
    render_table(
        &[
            "NAME",
            "OWNER",
            "EPOCH",
            "SINCE",
            "HERE",
            "SIZE",
            "NOT_IN_BUCKET",
        ],
        &rows,
    )
}

/// `vol status` of a volume of a shared pool.
pub fn render_shared_status(s: &vpool_api::SharedVolumeStatus) -> String {
    let mut out = format!(
        "volume:         {}\nowner:          {}\n",
        s.name,
        owner_text(s)
    );
    if s.owner.holder.is_some() && s.owner.since_unix_ms.is_some() {
        out.push_str(&format!(
            "owned for:      {}\n",
            age_text(s.owner.since_unix_ms)
        ));
    }
    if let Some(ms) = s.owner.lease_expire_ms {
        out.push_str(&format!(
            "lease expires:  {} s without renewal\n",
            ms / 1000
        ));
    }
    out.push_str(&format!("in the bucket:  {} segments\n", s.owner.segments));
    out.push_str(&format!(
        "owned here:     {}\n",
        if s.here { "yes" } else { "no" }
    ));
    if let Some(b) = s.size_bytes {
        out.push_str(&format!("size:           {}\n", format_size(b)));
    }
    if let Some(n) = s.nbd_connections {
        out.push_str(&format!("NBD clients:    {n} (its own and forwarded)\n"));
    }
    if let Some(n) = s.forwarded_clients {
        out.push_str(&format!(
            "NBD clients:    {n} here, forwarded to the owner\n"
        ));
    }
    if let Some(b) = s.unuploaded_bytes {
        out.push_str(&format!("not in bucket:  {}\n", format_size(b)));
    }
    if let Some(t) = &s.owner.base {
        out.push_str(&format!(
            "clone of:       {t} (its blocks where this volume wrote none)\n"
        ));
    }
    if s.owner.sealed {
        out.push_str("sealed:         yes: a template, served read-only by every host\n");
    }
    if let Some(b) = s.cache_size_bytes {
        out.push_str(&format!(
            "cache here:     {} (its share of the pool's --cache-size)\n",
            format_size(b)
        ));
    }
    if let Some(d) = &s.durability {
        out.push_str(&format!("durability:     {d}\n"));
    }
    out
}

/// The `vol list` table.
pub fn render_volume_table(vols: &[VolumeInfo]) -> String {
    if vols.is_empty() {
        return "no volumes\n".to_string();
    }
    let rows: Vec<[String; 5]> = vols
        .iter()
        .map(|v| {
            [
                if v.incomplete {
                    format!("{} (INCOMPLETE)", v.name)
                } else if v.replica_of.is_some() {
                    format!("{} (replica)", v.name)
                } else {
                    v.name.clone()
                },
                format_size(v.size_bytes),
                format_size(v.allocated_bytes),
                format_size(v.zero_bytes),
                v.extents.to_string(),
            ]
        })
        .collect();
    let header = ["NAME", "SIZE", "ALLOCATED", "ZEROED", "EXTENTS"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |cells: [&str; 5], out: &mut String| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                l.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header, &mut out);
    for r in &rows {
        line(
            [&r[0], &r[1], &r[2], &r[3], &r[4]].map(String::as_str),
            &mut out,
        );
    }
    out
}

/// The `vol info` text.
pub fn render_volume_info(v: &VolumeInfo) -> String {
    let mut out = format!(
        "name:       {}\nid:         {}\nsize:       {} ({} bytes)\nallocated:  {} ({} bytes)\nzeroed:     {}\nextents:    {}\nparent:     {}\nsnapshots:  {}\nephemeral:  {}\n",
        v.name,
        v.id,
        format_size(v.size_bytes),
        v.size_bytes,
        format_size(v.allocated_bytes),
        v.allocated_bytes,
        format_size(v.zero_bytes),
        v.extents,
        v.parent.as_deref().unwrap_or("-"),
        v.snapshots,
        if v.ephemeral {
            "yes (deleted when its last NBD client disconnects, or at daemon restart)"
        } else {
            "no"
        },
    );
    if v.incomplete {
        out.push_str(
            "INCOMPLETE: an import into it did not finish; NBD does not serve it until it is imported again or deleted\n",
        );
    }
    if v.multi_writer {
        out.push_str("writers:    several at once (vpool vol share --off: one)\n");
    }
    if let Some(w) = &v.writer {
        out.push_str(&format!("writer:     {w}\n"));
    }
    if let Some(q) = &v.qos {
        out.push_str(&format!(
            "qos:        {}\n",
            serde_json::to_string(q).unwrap_or_default()
        ));
    }
    if let Some(src) = &v.replica_of {
        out.push_str(&format!(
            "replica of: {src} (newest point: {}; its head is not served: read VOLUME@POINT, or `vpool replica promote`)\n",
            v.replica_point.as_deref().unwrap_or("none yet")
        ));
    }
    if let (Some(x), Some(sh)) = (v.exclusive_bytes, v.shared_bytes) {
        out.push_str(&format!(
            "exclusive:  {} (freed if deleted)\nshared:     {} (with snapshots or clones)\n",
            format_size(x),
            format_size(sh)
        ));
    }
    match &v.template {
        Some(t) => {
            out.push_str(&format!(
                "template:   yes (sealed, read-only; clones come from {}@{})\ndigest:     {}\n",
                v.name,
                t.snapshot,
                t.digest.as_deref().unwrap_or("(being computed)")
            ));
        }
        None => out.push_str("template:   no\n"),
    }
    out
}

/// The `pool info` text.
pub fn render_pool_info(p: &PoolInfo) -> String {
    let free = match p.free_bytes {
        Some(b) => format_size(b),
        None => "unknown".to_string(),
    };
    let mut state = String::new();
    if p.full {
        state.push_str("state:          FULL: data writes fail with ENOSPC until space is freed (delete or trim data, or grow the device); the cleaner works from the reserve\n");
    }
    if p.damaged_blocks > 0 {
        state.push_str(&format!(
            "damage:         {} blocks fail their checksum (reads of them fail): see `vpool pool check`\n",
            p.damaged_blocks
        ));
    }
    let reserve = format!(
        "reserve:        {} held back so the cleaner can free space on a full device\n",
        format_size(p.reserve_bytes)
    );
    state
        + &reserve
        + &format!(
            "volumes:        {}\n\
         logical size:   {} (sum of volume sizes)\n\
         physical size:  {} in {} segments\n\
         live data:      {}\n\
         garbage:        {:.1}% of physical (the cleaner reclaims it)\n\
         free space:     {}\n\
         extents:        {}\n\
         checkpoints:    {} written; {} of log since the last\n\
         cleaner:        {} segments cleaned, {} relocated\n",
            p.volumes,
            format_size(p.logical_bytes),
            format_size(p.physical_bytes),
            p.segments,
            format_size(p.live_data_bytes),
            p.garbage_ratio * 100.0,
            free,
            p.extents,
            p.checkpoints_written,
            format_size(p.log_bytes_since_checkpoint),
            p.cleaner.segments_cleaned,
            format_size(p.cleaner.bytes_relocated),
        )
}
