//! The command line: argument definitions and the commands that talk to
//! the daemon.
//!
//! Every command but `serve` is a client of the daemon's API socket at
//! `<pool>/api.sock`; none of them opens the pool itself, so they work while
//! the daemon owns it and say so plainly when no daemon is running.
//! `--json` switches every command to machine-readable output on stdout.
//!
//! The exceptions: `pool create --s3` and `pool attach` set up a pool on
//! object storage themselves, before any daemon runs ([`crate::s3pool`]).

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use vpool_api::{
    CacheInfo, Client, ClientError, Diff, DiffKind, ErrorKind, PinInfo, PoolInfo, SnapshotInfo,
    VolumeInfo,
};

use crate::daemon::{NBD_SOCKET_NAME, api_socket_path};
use crate::s3pool::{PoolReport, S3PoolSettings};
use crate::size::{format_size, parse_size, parse_volume_size};
use crate::{transfer, vdiff};

/// vpool: a storage server for virtual machine disks.
#[derive(Debug, Parser)]
#[command(name = "vpool", version, about, propagate_version = true)]
pub struct Cli {
    /// The daemon's home: the directory of its default pool, `local`, and of
    /// its sockets (<home>/api.sock, <home>/nbd.sock) and `host.json` (the
    /// other pools it holds).
    #[arg(
        long,
        global = true,
        env = "VPOOL_HOME",
        default_value = "vpool-data",
        value_name = "DIR"
    )]
    pub home: PathBuf,

    /// Machine-readable JSON output (for `serve`: JSON log lines).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: the default pool in the home (created if missing)
    /// and every pool in its host.json.
    Serve(ServeArgs),
    /// Manage volumes.
    #[command(subcommand)]
    Vol(VolCommand),
    /// Manage snapshots (named VOLUME@SNAPSHOT).
    #[command(subcommand)]
    Snap(SnapCommand),
    /// The pools the daemon holds: list, create, attach, detach, open;
    /// pool-wide figures and checks.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// The host cache of a pool on S3: figures, and what it keeps resident.
    #[command(subcommand)]
    Cache(CacheCommand),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Also serve the API on TCP at this address (e.g. 127.0.0.1:7070);
    /// needs --api-token-file.
    #[arg(long, value_name = "ADDR", requires = "api_token_file")]
    pub api_listen: Option<std::net::SocketAddr>,

    /// File holding the bearer token TCP clients must send.
    #[arg(long, value_name = "FILE", requires = "api_listen")]
    pub api_token_file: Option<PathBuf>,

    /// Also serve NBD on TCP at this address (e.g. 0.0.0.0:10809). NBD has
    /// no authentication without TLS: listen only on a trusted network.
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<std::net::SocketAddr>,

    /// For a pool on S3 held by another daemon (on another host, or one
    /// that died without letting go): take the pool over. The other daemon
    /// is fenced: its writes fail from then on.
    #[arg(long)]
    pub force: bool,

    /// Most NBD connections on each NBD listener (default 256). At the cap
    /// a connection idle for a minute is closed to make room, else the new
    /// one is refused.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub nbd_max_connections: Option<u32>,

    /// Most NBD connections of one client: one TCP address, or one process
    /// on the Unix socket (default 64). Raise it for a hypervisor host
    /// that runs more VM disks than that from one address.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub nbd_max_connections_per_client: Option<u32>,

    /// Most API connections on each API listener (default 128); over it a
    /// new connection is closed at once.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub api_max_connections: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum VolCommand {
    /// Create a thin volume (it takes no space until written).
    Create {
        name: String,
        /// Size: 512, 4K, 20G, 1.5T (binary units; a multiple of 4K).
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
        /// A scratch disk: deleted when its last NBD client disconnects,
        /// or when the daemon restarts.
        #[arg(long)]
        ephemeral: bool,
    },
    /// List the volumes of the default pool, of one pool, or of all.
    List {
        /// The pool's volumes (default: the default pool's).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
        /// Every open pool's volumes, named POOL/VOLUME.
        #[arg(long, conflicts_with = "pool")]
        all: bool,
    },
    /// Show one volume, and how to attach it to a VM (NBD URI, libvirt XML).
    Info { name: String },
    /// Change a volume's size.
    Resize {
        name: String,
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
        /// Allow shrinking, which drops the data past the new end.
        #[arg(long)]
        allow_shrink: bool,
        /// Shrink even while NBD clients have the volume open for writing.
        #[arg(long)]
        force: bool,
    },
    /// Delete a volume and its data.
    Delete {
        name: String,
        /// Even while NBD clients have it open for writing (a running VM
        /// loses its disk).
        #[arg(long)]
        force: bool,
    },
    /// Copy a raw disk image into a volume (created if missing); holes and
    /// zero blocks are skipped.
    Import {
        name: String,
        file: PathBuf,
        /// Size of the volume if it is created (default: the file's size,
        /// rounded up to 4K).
        #[arg(long, value_parser = parse_volume_size)]
        size: Option<u64>,
        /// Even while NBD clients have the volume open for writing (its
        /// content is replaced under them).
        #[arg(long)]
        force: bool,
    },
    /// Copy a volume (or a snapshot, VOLUME@SNAPSHOT) into a sparse raw
    /// image file.
    Export {
        name: String,
        file: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Seal a volume as a template (gold master): read-only from then on;
    /// the SHA-256 digest of its content is recorded.
    Template { name: String },
    /// Create a copy-on-write clone of a template, or of a snapshot
    /// (VOLUME@SNAPSHOT). Instant, whatever the size.
    Clone {
        /// A template's name, or VOLUME@SNAPSHOT.
        source: String,
        /// The new volume's name.
        name: String,
    },
    /// Detach a clone from the snapshot it came from (instant in vpool:
    /// clones never read through their parent, so nothing is copied).
    Flatten { name: String },
    /// Merge a clone into its parent volume: the parent takes the clone's
    /// content, atomically. The clone stays.
    Commit {
        name: String,
        /// Even while NBD clients have the parent open for writing.
        #[arg(long)]
        force: bool,
    },
    /// List the extents that changed between two images of a volume:
    /// `web1@a web1@b`, or `web1@a web1` against the live volume.
    Diff { from: String, to: String },
    /// Write the changes between two images of a volume to a .vdiff file
    /// (an incremental backup).
    ExportDiff {
        from: String,
        to: String,
        file: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Apply a .vdiff file to a volume holding its base image: the volume
    /// is resized to the target size and becomes the target image.
    ImportDiff {
        name: String,
        file: PathBuf,
        /// Even while NBD clients have the volume open for writing.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SnapCommand {
    /// Take a snapshot: `vpool snap create web1@before-upgrade`. Instant.
    Create {
        /// VOLUME@SNAPSHOT
        snapshot: String,
    },
    /// List a volume's snapshots, oldest first.
    List { volume: String },
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

/// Splits `VOLUME@SNAPSHOT`.
pub fn parse_snapshot_name(s: &str) -> anyhow::Result<(&str, &str)> {
    match s.split_once('@') {
        Some((v, snap)) if !v.is_empty() && !snap.is_empty() && !snap.contains('@') => {
            Ok((v, snap))
        }
        _ => anyhow::bail!(
            "{s:?} is not a snapshot name: write it VOLUME@SNAPSHOT, e.g. web1@before-upgrade"
        ),
    }
}

/// Splits `VOLUME` or `VOLUME@SNAPSHOT` (an image: a volume now, or one of
/// its snapshots).
pub fn parse_image(s: &str) -> anyhow::Result<(&str, Option<&str>)> {
    if s.contains('@') {
        let (v, snap) = parse_snapshot_name(s)?;
        Ok((v, Some(snap)))
    } else if s.is_empty() {
        anyhow::bail!("an empty image name: write VOLUME or VOLUME@SNAPSHOT")
    } else {
        Ok((s, None))
    }
}

/// The two images of one volume a diff is between.
fn parse_diff_images<'a>(
    from: &'a str,
    to: &'a str,
) -> anyhow::Result<(&'a str, Option<&'a str>, Option<&'a str>)> {
    let (fv, fs) = parse_image(from)?;
    let (tv, ts) = parse_image(to)?;
    if fv != tv {
        anyhow::bail!(
            "a diff is between two images of one volume, not {fv} and {tv}: e.g. `{fv}@a {fv}@b`, or `{fv}@a {fv}` against the live volume"
        );
    }
    Ok((fv, fs, ts))
}

/// Adds the flag that overrides an `in_use` refusal to the daemon's message.
fn hint_force(e: ClientError) -> ClientError {
    match e {
        ClientError::Api {
            status,
            kind: kind @ ErrorKind::InUse,
            message,
        } if message.contains("NBD client") => ClientError::Api {
            status,
            kind,
            message: format!(
                "{}; pass --force to do it anyway",
                message.trim_end_matches(" (or ask with force=true)")
            ),
        },
        e => e,
    }
}

/// How long adding, opening or detaching a pool may take: recovery of a
/// big pool, or the upload of what a pool on S3 still holds.
const POOL_OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// `vpool pool ...`.
fn run_pool_command(
    client: &Client,
    home: &Path,
    json: bool,
    cmd: &PoolCommand,
) -> anyhow::Result<()> {
    let slow = client.clone().with_timeout(POOL_OP_TIMEOUT);
    match cmd {
        PoolCommand::List => {
            let pools = client.list_pools()?;
            if json {
                return print_json(&vpool_api::PoolList { pools });
            }
            print!("{}", render_pool_list(&pools));
            Ok(())
        }
        PoolCommand::Info { pool } => {
            let p = client.clone().in_pool(pool.as_deref()).pool_info()?;
            if json {
                return print_json(&p);
            }
            print!("{}", render_pool_info(&p));
            Ok(())
        }
        PoolCommand::Check { pool, repair } => {
            run_check(client, home, pool.as_deref(), json, *repair)
        }
        PoolCommand::Create {
            name: None,
            dir,
            s3,
            unsafe_single_host,
        } => {
            if dir.is_some() || s3.url.is_none() {
                anyhow::bail!(
                    "name the pool: `vpool pool create NAME [--dir DIR | --s3 URL ...]` adds it to the running daemon"
                );
            }
            let r = crate::s3pool::create(None, &s3.settings(home)?, *unsafe_single_host)?;
            print_pool_report(&r, "created", json)
        }
        PoolCommand::Attach { name: None, s3 } => {
            let r = crate::s3pool::attach(None, &s3.settings(home)?)?;
            print_pool_report(&r, "attached", json)
        }
        PoolCommand::Create {
            name: Some(name),
            dir,
            s3,
            unsafe_single_host,
        } => {
            let dir = dir.as_deref().or(s3.cache.as_deref());
            let s3 = s3.url.is_some().then(|| s3.spec()).transpose()?;
            add_pool(&slow, json, name, dir, s3, false, *unsafe_single_host)
        }
        PoolCommand::Attach {
            name: Some(name),
            s3,
        } => add_pool(
            &slow,
            json,
            name,
            s3.cache.as_deref(),
            Some(s3.spec()?),
            true,
            false,
        ),
        PoolCommand::Detach { name, force } => {
            slow.detach_pool(name, *force)
                .map_err(hint_force)
                .map_err(daemon_needed)?;
            if json {
                return print_json(&serde_json::json!({ "detached": name }));
            }
            println!("detached pool {name}: its data stays where it is");
            Ok(())
        }
        PoolCommand::Open { name, force } => {
            let p = slow.open_pool(name, *force).map_err(daemon_needed)?;
            if json {
                return print_json(&p);
            }
            print!("{}", render_pool_list(std::slice::from_ref(&p)));
            Ok(())
        }
    }
}

/// `pool create NAME` / `pool attach NAME`: the daemon adds the pool.
fn add_pool(
    client: &Client,
    json: bool,
    name: &str,
    dir: Option<&Path>,
    s3: Option<vpool_service::S3Spec>,
    attach: bool,
    unsafe_single_host: bool,
) -> anyhow::Result<()> {
    vpool_service::names::check_pool_name(name)?;
    let dir = match dir {
        Some(d) => Some(
            absolute(d)
                .into_os_string()
                .into_string()
                .map_err(|d| anyhow::anyhow!("the directory {d:?} is not UTF-8"))?,
        ),
        None => None,
    };
    let req = vpool_api::AddPoolRequest {
        name: name.to_string(),
        dir,
        s3,
        attach,
        unsafe_single_host,
    };
    let p = client.add_pool(&req).map_err(daemon_needed)?;
    if json {
        return print_json(&p);
    }
    let done = if attach { "attached" } else { "added" };
    println!(
        "{done} pool {} ({}) in {}; its volumes are {}/VOLUME",
        p.name,
        p.kind.map_or("?", |k| k.as_str()),
        p.dir,
        p.name
    );
    Ok(())
}

/// Says that pools are added to a running daemon, when none runs.
fn daemon_needed(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::NoDaemon { .. } => anyhow::Error::new(e).context(
            "pools are added, opened and detached by the running daemon: start `vpool serve` first",
        ),
        e => e.into(),
    }
}

/// Every open pool's volumes, each named `POOL/VOLUME`.
fn every_pools_volumes(client: &Client) -> anyhow::Result<Vec<VolumeInfo>> {
    let mut all = Vec::new();
    for p in client.list_pools()? {
        if p.state != "open" {
            continue;
        }
        for mut v in client.clone().in_pool(Some(&p.name)).list_volumes()? {
            v.name = format!("{}/{}", p.name, v.name);
            all.push(v);
        }
    }
    Ok(all)
}

fn print_pool_report(r: &PoolReport, done: &str, json: bool) -> anyhow::Result<()> {
    if json {
        return print_json(r);
    }
    print!("{}", render_pool_report(r, done));
    Ok(())
}

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

/// How long a check through the daemon may take: it reads the whole pool.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// `vpool pool check`: through the daemon, or in this process when none
/// runs.
fn run_check(
    client: &Client,
    home: &Path,
    pool: Option<&str>,
    json: bool,
    repair: bool,
) -> anyhow::Result<()> {
    let r = match client
        .clone()
        .with_timeout(CHECK_TIMEOUT)
        .in_pool(pool)
        .pool_check(repair)
    {
        Err(ClientError::NoDaemon { .. }) => {
            let dir = crate::daemon::pool_dir_offline(home, pool)?;
            crate::daemon::check_offline(&dir, repair)?
        }
        r => r?,
    };
    if json {
        print_json(&r)?;
    } else {
        print!("{}", render_check(&r, repair));
    }
    let repaired_all = repair
        && r.bad_records
            .iter()
            .all(|b| r.evacuated_segments.contains(&b.segment))
        && r.map_errors.is_empty()
        && r.refcount_errors.is_empty()
        && r.damaged_ranges.iter().all(|d| r.repaired.contains(d))
        && r.recovery
            .iter()
            .all(|d| !d.loses_records || r.recovery_repaired);
    if r.clean || repaired_all {
        return Ok(());
    }
    let next = if repair {
        "what is left cannot be repaired in place (snapshots never change: delete a damaged one to drop it)"
    } else {
        "`vpool pool check --repair` drops what is damaged"
    };
    anyhow::bail!("the pool has damage (see above); {next}")
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

/// [`hint_force`] for an error that came back through `anyhow` (import).
fn hint_force_anyhow(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<ClientError>() {
        Ok(c) => hint_force(c).into(),
        Err(e) => e,
    }
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Every pool the daemon holds: name, kind, state, size, used, volumes.
    List,
    /// Space and log figures: logical vs physical bytes, garbage, free space.
    Info {
        /// The pool (default: the default pool, `local`).
        pool: Option<String>,
    },
    /// Check the whole pool (an fsck): every record of every segment, every
    /// block a volume or snapshot refers to against its checksum, every
    /// reference count, both checkpoint copies. Through the daemon if one
    /// runs, else in this process. Exits 1 if damage remains.
    Check {
        /// The pool (default: the default pool, `local`).
        pool: Option<String>,
        /// Drop what is damaged: the damaged ranges of volumes are trimmed
        /// (read as zeros afterwards), and a pool that does not open
        /// because records were lost opens without them. The report says
        /// what was dropped.
        #[arg(long)]
        repair: bool,
    },
    /// Add a pool to the running daemon: a local pool in a directory
    /// (`--dir`, default <home>/pools/NAME; an existing pool directory is
    /// taken over as it is), or a new pool on S3-compatible object storage
    /// with its host cache (`--s3`). Without NAME and with `--s3`, the home
    /// itself becomes the cache of a pool on S3 (run that before `serve`).
    Create {
        /// The pool's name on this host: `NAME/VOLUME` then names its
        /// volumes.
        name: Option<String>,
        /// The local pool's directory.
        #[arg(long, value_name = "DIR", conflicts_with = "url")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        s3: S3PoolArgs,
        /// Accept an object store that cannot enforce a single writer
        /// (no atomic create-only PUT): only ever serve this pool from one
        /// host at a time.
        #[arg(long, requires = "url")]
        unsafe_single_host: bool,
    },
    /// Add a pool that is already on S3 (made from another host) to the
    /// running daemon, with a new cache directory. The daemon takes its
    /// lease when no other host holds it; `vpool pool open NAME --force`
    /// takes it over from one that does. Without NAME, the home itself
    /// becomes its cache (run that before `serve`).
    Attach {
        name: Option<String>,
        #[command(flatten)]
        s3: S3PoolArgs,
    },
    /// Close a pool and forget it (a pool on S3 uploads what is left and
    /// releases its lease first). Its data stays where it is: `pool create
    /// NAME --dir DIR` takes it back. Refused while NBD clients have its
    /// volumes open, unless --force.
    Detach {
        name: String,
        /// Even while NBD clients have its volumes open (their disks fail).
        #[arg(long)]
        force: bool,
    },
    /// Open a pool that failed to open (its bucket was down, its lease was
    /// held): `--force` takes a pool on S3 over from the host that holds it,
    /// which is fenced.
    Open {
        name: String,
        #[arg(long)]
        force: bool,
    },
}

/// Where a pool on S3 is and how its cache behaves.
#[derive(Debug, Args)]
pub struct S3PoolArgs {
    /// Where the pool lives: s3://BUCKET/PREFIX (or file:///DIR, a local
    /// directory standing in for a bucket).
    #[arg(long = "s3", value_name = "URL", requires = "cache_size")]
    pub url: Option<String>,
    /// The S3 endpoint, for stores other than AWS (Ceph RGW, MinIO,
    /// Garage): http://127.0.0.1:7480.
    #[arg(long, value_name = "URL", requires = "url")]
    pub endpoint: Option<String>,
    /// The S3 region (default: $AWS_REGION, else us-east-1).
    #[arg(long, requires = "url")]
    pub region: Option<String>,
    /// A file of `key = value` lines (access_key_id, secret_access_key,
    /// and optionally endpoint, region). Without it, credentials come from
    /// the daemon's environment (AWS_ACCESS_KEY_ID, ...). pool.json records
    /// the file's path, never the secrets.
    #[arg(long, value_name = "FILE", requires = "url")]
    pub credentials: Option<PathBuf>,
    /// The cache directory (default: <home>/pools/NAME; without NAME, the
    /// home).
    #[arg(long, value_name = "DIR", requires = "url")]
    pub cache: Option<PathBuf>,
    /// The cache's size limit (write-back log plus cached reads): 20G.
    /// At least 256M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "url")]
    pub cache_size: Option<u64>,
    /// Seal the log segment being written after it held data this long, so
    /// the bucket lags the cache by about that much (default 5).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "url")]
    pub seal_after: Option<f64>,
    /// How long a write waits for uploads to make room in the cache before
    /// it fails (default 120).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "url")]
    pub backpressure_timeout: Option<f64>,
    /// How long a read of data not in the cache may take before it fails
    /// (default 30).
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "url")]
    pub read_timeout: Option<f64>,
}

impl S3PoolArgs {
    /// The settings for a pool whose cache is `--cache`, else `cache_dir`.
    fn settings(&self, cache_dir: &Path) -> anyhow::Result<S3PoolSettings> {
        let (Some(url), Some(cache_size_bytes)) = (&self.url, self.cache_size) else {
            anyhow::bail!("give the pool's place on S3: --s3 URL --cache-size SIZE");
        };
        Ok(S3PoolSettings {
            url: url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials_file: self.credentials.clone(),
            cache_dir: self
                .cache
                .clone()
                .unwrap_or_else(|| cache_dir.to_path_buf()),
            cache_size_bytes,
            seal_after_secs: self.seal_after,
            backpressure_timeout_secs: self.backpressure_timeout,
            read_timeout_secs: self.read_timeout,
        })
    }

    /// The request body for the daemon: paths made absolute (the daemon's
    /// working directory is not this one).
    fn spec(&self) -> anyhow::Result<vpool_service::S3Spec> {
        let s = self.settings(Path::new("."))?;
        Ok(vpool_service::S3Spec {
            url: s.url,
            endpoint: s.endpoint,
            region: s.region,
            credentials_file: s.credentials_file.as_deref().map(absolute),
            cache_size_bytes: s.cache_size_bytes,
            seal_after_secs: s.seal_after_secs,
            backpressure_timeout_secs: s.backpressure_timeout_secs,
            read_timeout_secs: s.read_timeout_secs,
        })
    }
}

/// A number of seconds: `5`, `0.5`.
fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 5 or 0.5)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: give a number of seconds above 0"));
    }
    Ok(v)
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Hit ratio, cached, dirty and pinned bytes, upload lag and speed,
    /// errors, and who holds the pool.
    Stats {
        /// The pool (default: the default pool).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
    /// Keep a volume, or a snapshot (VOLUME@SNAPSHOT, e.g. a suspended
    /// VM's state), resident in the cache; missing parts are fetched now.
    Pin {
        /// VOLUME or VOLUME@SNAPSHOT
        image: String,
    },
    /// Stop keeping a volume or snapshot resident.
    Unpin {
        /// VOLUME or VOLUME@SNAPSHOT
        image: String,
    },
    /// List the pins and how much data each keeps resident.
    Pins {
        /// The pool (default: the default pool).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
}

/// The client of the daemon whose home is `home`.
pub fn client_for(home: &Path) -> Client {
    Client::unix(api_socket_path(home))
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("encoding JSON output")?
    );
    Ok(())
}

/// Runs a client command (anything but `serve`).
pub fn run_client_command(home: &Path, json: bool, cmd: &Command) -> anyhow::Result<()> {
    let client = client_for(home);
    // Progress bars only for a person watching: not in JSON mode, not when
    // stderr goes to a file or a pipe.
    let show_progress = !json && std::io::stderr().is_terminal();
    match cmd {
        Command::Serve(_) => anyhow::bail!("`serve` is not a client command"),
        Command::Pool(p) => run_pool_command(&client, home, json, p),
        Command::Cache(c) => run_cache_command(&client, json, c),
        Command::Vol(v) => match v {
            VolCommand::Create {
                name,
                size,
                ephemeral,
            } => {
                let info = client.create_volume_with(name, *size, *ephemeral)?;
                if json {
                    print_json(&info)
                } else if info.ephemeral {
                    println!(
                        "created ephemeral volume {} ({}): deleted when its last NBD client disconnects, or when the daemon restarts",
                        info.name,
                        format_size(info.size_bytes)
                    );
                    Ok(())
                } else {
                    println!(
                        "created volume {} ({})",
                        info.name,
                        format_size(info.size_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::List { pool, all } => {
                let vols = if *all {
                    every_pools_volumes(&client)?
                } else {
                    client.clone().in_pool(pool.as_deref()).list_volumes()?
                };
                if json {
                    print_json(&vpool_api::VolumeList { volumes: vols })
                } else {
                    print!("{}", render_volume_table(&vols));
                    Ok(())
                }
            }
            VolCommand::Info { name } => {
                let info = client.volume_info(name)?;
                // The pool info says whether the daemon also serves NBD on TCP.
                let nbd_tcp = client.pool_info()?.nbd_tcp_addr;
                // The export is the volume's name as the user wrote it:
                // `POOL/VOLUME`, or bare for the default pool.
                let export = match vpool_api::routes::split_pool(name) {
                    (Some(pool), _) => format!("{pool}/{}", info.name),
                    (None, _) => info.name.clone(),
                };
                let attach = Attach::new(&export, home, nbd_tcp);
                if json {
                    print_json(&VolumeInfoWithAttach { info, attach })
                } else {
                    print!("{}", render_volume_info(&info));
                    print!("{}", render_attach(&attach));
                    Ok(())
                }
            }
            VolCommand::Resize {
                name,
                size,
                allow_shrink,
                force,
            } => {
                let info = client
                    .resize_volume(name, *size, *allow_shrink, *force)
                    .map_err(hint_force)
                    .map_err(|e| match e {
                        // Name the flag; the daemon's message cannot know it.
                        ClientError::Api {
                            status,
                            kind: kind @ ErrorKind::ShrinkRefused,
                            message,
                        } => ClientError::Api {
                            status,
                            kind,
                            message: format!("{message}; pass --allow-shrink to shrink it anyway"),
                        },
                        e => e,
                    })?;
                if json {
                    print_json(&info)
                } else {
                    println!(
                        "volume {} is now {}",
                        info.name,
                        format_size(info.size_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::Delete { name, force } => {
                client.delete_volume(name, *force).map_err(hint_force)?;
                if json {
                    print_json(&serde_json::json!({ "deleted": name }))
                } else {
                    println!("deleted volume {name}");
                    Ok(())
                }
            }
            VolCommand::Import {
                name,
                file,
                size,
                force,
            } => {
                let r = transfer::import(&client, name, file, *size, *force, show_progress)
                    .map_err(hint_force_anyhow)?;
                if json {
                    print_json(&r)
                } else {
                    println!(
                        "imported {} ({}) into {} volume {}: {} of data sent, {} skipped as holes or zeros",
                        r.file,
                        format_size(r.file_bytes),
                        if r.created { "new" } else { "existing" },
                        r.volume,
                        format_size(r.data_bytes),
                        format_size(r.skipped_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::Export { name, file, force } => {
                let (vol, snap) = parse_image(name)?;
                let r = transfer::export(&client, vol, snap, file, *force, show_progress)?;
                if json {
                    print_json(&r)
                } else {
                    println!(
                        "exported volume {} ({}) to {}: {} of data, the rest left as holes",
                        r.volume,
                        format_size(r.size_bytes),
                        r.file,
                        format_size(r.data_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::Template { name } => {
                let info = client.make_template(name)?;
                if json {
                    print_json(&info)
                } else {
                    let digest = info
                        .template
                        .as_ref()
                        .and_then(|t| t.digest.clone())
                        .unwrap_or_else(|| "(pending)".into());
                    println!(
                        "sealed volume {} as a template: read-only from now on; clone it with `vpool vol clone {} NEW`\ndigest: {digest}",
                        info.name, info.name
                    );
                    Ok(())
                }
            }
            VolCommand::Clone { source, name } => {
                let (vol, snap) = parse_image(source)?;
                let info = client.clone_volume(vol, snap, name)?;
                if json {
                    print_json(&info)
                } else {
                    let from = match snap {
                        Some(_) => source.clone(),
                        None => format!("template {vol}"),
                    };
                    println!(
                        "created volume {} ({}) as a copy-on-write clone of {from}",
                        info.name,
                        format_size(info.size_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::Flatten { name } => {
                let before = client.volume_info(name)?;
                let info = client.flatten(name)?;
                let report = FlattenReport {
                    detached_from: before.parent,
                    instant: true,
                    bytes_copied: 0,
                    volume: info,
                };
                if json {
                    print_json(&report)
                } else {
                    println!(
                        "flattened {}: it no longer depends on {}. Instant in vpool: a clone never reads through its parent, so nothing was copied.",
                        report.volume.name,
                        report.detached_from.as_deref().unwrap_or("its parent")
                    );
                    Ok(())
                }
            }
            VolCommand::Commit { name, force } => {
                let parent = client.commit(name, *force).map_err(hint_force)?;
                if json {
                    print_json(&CommitReport {
                        clone: name.clone(),
                        parent,
                    })
                } else {
                    println!(
                        "committed {name} into its parent: volume {} now holds {name}'s content ({})",
                        parent.name,
                        format_size(parent.size_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::Diff { from, to } => {
                let (vol, f, t) = parse_diff_images(from, to)?;
                let d = client.diff(vol, f, t)?;
                if json {
                    print_json(&d)
                } else {
                    print!("{}", render_diff(&d));
                    Ok(())
                }
            }
            VolCommand::ExportDiff {
                from,
                to,
                file,
                force,
            } => {
                let (vol, f, t) = parse_diff_images(from, to)?;
                let r = vdiff::export_diff(&client, vol, f, t, file, *force, show_progress)?;
                if json {
                    print_json(&r)
                } else {
                    println!(
                        "wrote {}: {from} -> {to} ({} target), {} records: {} of data, {} zeroed; file {}",
                        r.file,
                        format_size(r.target_size_bytes),
                        r.records,
                        format_size(r.data_bytes),
                        format_size(r.zero_bytes),
                        format_size(r.file_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::ImportDiff { name, file, force } => {
                let r = vdiff::import_diff(&client, name, file, *force, show_progress)
                    .map_err(hint_force_anyhow)?;
                if json {
                    print_json(&r)
                } else {
                    println!(
                        "applied {} ({} -> {}) to volume {}: {} records, {} of data written, {} zeroed{}",
                        r.file,
                        vdiff::image_name(&r.diff_volume, r.diff_from.as_deref()),
                        vdiff::image_name(&r.diff_volume, r.diff_to.as_deref()),
                        r.volume,
                        r.records,
                        format_size(r.data_bytes),
                        format_size(r.zero_bytes),
                        if r.resized {
                            format!("; resized to {}", format_size(r.size_bytes))
                        } else {
                            String::new()
                        }
                    );
                    Ok(())
                }
            }
        },
        Command::Snap(c) => run_snap_command(&client, json, c),
    }
}

fn run_snap_command(client: &Client, json: bool, cmd: &SnapCommand) -> anyhow::Result<()> {
    match cmd {
        SnapCommand::Create { snapshot } => {
            let (vol, snap) = parse_snapshot_name(snapshot)?;
            let info = client.create_snapshot(vol, snap)?;
            if json {
                print_json(&info)
            } else {
                println!(
                    "created snapshot {}@{} ({}, {} of data)",
                    info.volume,
                    info.name,
                    format_size(info.size_bytes),
                    format_size(info.allocated_bytes)
                );
                Ok(())
            }
        }
        SnapCommand::List { volume } => {
            let snaps = client.list_snapshots(volume)?;
            if json {
                print_json(&vpool_api::SnapshotList { snapshots: snaps })
            } else {
                print!("{}", render_snapshot_table(volume, &snaps));
                Ok(())
            }
        }
        SnapCommand::Delete { snapshot } => {
            let (vol, snap) = parse_snapshot_name(snapshot)?;
            client.delete_snapshot(vol, snap)?;
            if json {
                print_json(&serde_json::json!({ "deleted": snapshot }))
            } else {
                println!("deleted snapshot {snapshot}");
                Ok(())
            }
        }
        SnapCommand::Rollback { snapshot, force } => {
            let (vol, snap) = parse_snapshot_name(snapshot)?;
            let info = client.rollback(vol, snap, *force).map_err(hint_force)?;
            if json {
                print_json(&info)
            } else {
                println!(
                    "rolled back volume {} to {snapshot} ({})",
                    info.name,
                    format_size(info.size_bytes)
                );
                Ok(())
            }
        }
    }
}

fn run_cache_command(client: &Client, json: bool, cmd: &CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Stats { pool } => {
            let c = client.clone().in_pool(pool.as_deref()).cache_stats()?;
            if json {
                print_json(&c)
            } else {
                print!("{}", render_cache_stats(&c));
                Ok(())
            }
        }
        CacheCommand::Pins { pool } => {
            let pins = client.clone().in_pool(pool.as_deref()).cache_pins()?;
            if json {
                print_json(&vpool_api::PinList { pins })
            } else {
                print!("{}", render_pins(&pins));
                Ok(())
            }
        }
        CacheCommand::Pin { image } => {
            let (vol, snap) = parse_image(image)?;
            let p = client.pin(vol, snap)?;
            if json {
                print_json(&p)
            } else {
                println!(
                    "pinned {}: {} of data kept resident in the cache",
                    p.image(),
                    format_size(p.bytes.unwrap_or(0))
                );
                Ok(())
            }
        }
        CacheCommand::Unpin { image } => {
            let (vol, snap) = parse_image(image)?;
            client.unpin(vol, snap)?;
            if json {
                print_json(&serde_json::json!({ "unpinned": image }))
            } else {
                println!("unpinned {image}");
                Ok(())
            }
        }
    }
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
    /// Always true: vpool clones never read through their parent.
    pub instant: bool,
    /// Always 0, for the same reason.
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
    let rows: Vec<Vec<String>> = snaps
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                format_size(s.size_bytes),
                format_size(s.allocated_bytes),
                s.exclusive_bytes
                    .map(format_size)
                    .unwrap_or_else(|| "-".into()),
                s.shared_bytes
                    .map(format_size)
                    .unwrap_or_else(|| "-".into()),
                s.seq.to_string(),
            ]
        })
        .collect();
    render_table(
        &["NAME", "SIZE", "ALLOCATED", "EXCLUSIVE", "SHARED", "SEQ"],
        &rows,
    )
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
fn render_table(header: &[&str], rows: &[Vec<String>]) -> String {
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

/// `vol info --json`: the volume's fields, plus how to attach it.
#[derive(Debug, Serialize)]
pub struct VolumeInfoWithAttach {
    #[serde(flatten)]
    pub info: VolumeInfo,
    pub attach: Attach,
}

/// How a VM attaches a volume: the daemon's NBD export of the same name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attach {
    /// The NBD URI for QEMU (`-drive file=URI` / `-blockdev`), over the
    /// pool's Unix socket.
    pub nbd_uri: String,
    /// The NBD Unix socket, absolute.
    pub nbd_socket: PathBuf,
    /// The NBD URI over TCP when the daemon runs with `--nbd-listen`.
    pub nbd_tcp_uri: Option<String>,
    /// A libvirt `<disk>` element for the volume over the Unix socket.
    pub libvirt_xml: String,
}

impl Attach {
    /// The attach details of export `name` (`VOLUME` of the default pool,
    /// or `POOL/VOLUME`) of the daemon whose home is `home`, which serves
    /// NBD on TCP at `nbd_tcp` if that is set.
    pub fn new(name: &str, home: &Path, nbd_tcp: Option<SocketAddr>) -> Attach {
        let socket = absolute(home).join(NBD_SOCKET_NAME);
        let socket_str = socket.to_string_lossy();
        let nbd_uri = format!(
            "nbd+unix:///{}?socket={}",
            uri_escape(name),
            uri_escape(&socket_str)
        );
        let nbd_tcp_uri = nbd_tcp.map(|addr| {
            let host = if addr.ip().is_unspecified() {
                // Listening on every address: name this machine instead of
                // 0.0.0.0, which a client elsewhere cannot connect to.
                hostname().unwrap_or_else(|| "localhost".to_string())
            } else {
                match addr.ip() {
                    IpAddr::V6(ip) => format!("[{ip}]"),
                    IpAddr::V4(ip) => ip.to_string(),
                }
            };
            format!("nbd://{host}:{}/{}", addr.port(), uri_escape(name))
        });
        let libvirt_xml = format!(
            "<disk type='network' device='disk'>\n  \
               <driver name='qemu' type='raw' cache='none' io='native'/>\n  \
               <source protocol='nbd' name='{}'>\n    \
                 <host transport='unix' socket='{}'/>\n  \
               </source>\n  \
               <target dev='vda' bus='virtio'/>\n\
             </disk>\n",
            xml_escape(name),
            xml_escape(&socket_str)
        );
        Attach {
            nbd_uri,
            nbd_socket: socket,
            nbd_tcp_uri,
            libvirt_xml,
        }
    }
}

/// `path` made absolute against the current directory (without resolving
/// symlinks when the path does not exist; canonical when it does).
fn absolute(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Percent-encodes everything but unreserved characters and `/`, so a socket
/// path with spaces, `&` or `?` survives QEMU's and libnbd's URI parsers.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Escapes text for an XML attribute value.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// This machine's host name, if it has a usable one.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length; gethostname
    // writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The attach part of the `vol info` text.
pub fn render_attach(a: &Attach) -> String {
    let mut out = format!("\nattach with QEMU (NBD):\n  {}\n", a.nbd_uri);
    if let Some(tcp) = &a.nbd_tcp_uri {
        out.push_str(&format!("  {tcp}\n"));
    }
    out.push_str("libvirt disk:\n");
    for line in a.libvirt_xml.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_sizes_and_globals() {
        let c = Cli::try_parse_from([
            "vpool", "vol", "create", "web1", "--size", "20G", "--json", "--home", "/p",
        ])
        .unwrap();
        assert!(c.json);
        assert_eq!(c.home, PathBuf::from("/p"));
        match c.command {
            Command::Vol(VolCommand::Create {
                name,
                size,
                ephemeral,
            }) => {
                assert_eq!(name, "web1");
                assert_eq!(size, 20 << 30);
                assert!(!ephemeral);
            }
            other => panic!("{other:?}"),
        }
        let e = Cli::try_parse_from(["vpool", "vol", "create", "w", "--size", "1000"]).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 4096"), "{e}");
    }

    #[test]
    fn parses_s3_pool_and_cache_commands() {
        let c = Cli::try_parse_from([
            "vpool",
            "pool",
            "create",
            "cold",
            "--s3",
            "s3://vms/pool1",
            "--endpoint",
            "http://127.0.0.1:7480",
            "--cache",
            "/var/cache/vpool",
            "--cache-size",
            "20G",
            "--seal-after",
            "0.5",
        ])
        .unwrap();
        match c.command {
            Command::Pool(PoolCommand::Create {
                name,
                dir,
                s3,
                unsafe_single_host,
            }) => {
                assert_eq!(name.as_deref(), Some("cold"));
                assert_eq!(dir, None);
                assert_eq!(s3.cache_size, Some(20 << 30));
                assert_eq!(s3.seal_after, Some(0.5));
                assert!(!unsafe_single_host);
                let st = s3.settings(Path::new("/p")).unwrap();
                assert_eq!(st.cache_dir, PathBuf::from("/var/cache/vpool"));
                let spec = s3.spec().unwrap();
                assert_eq!(spec.cache_size_bytes, 20 << 30);
                assert_eq!(spec.endpoint.as_deref(), Some("http://127.0.0.1:7480"));
            }
            other => panic!("{other:?}"),
        }
        // A local pool in a directory; --dir and --s3 exclude each other,
        // and S3 options need --s3.
        let c =
            Cli::try_parse_from(["vpool", "pool", "create", "fast", "--dir", "/mnt/nvme"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Pool(PoolCommand::Create { dir: Some(d), .. }) if d == Path::new("/mnt/nvme")
        ));
        for bad in [
            &[
                "vpool",
                "pool",
                "create",
                "x",
                "--dir",
                "/d",
                "--s3",
                "s3://b",
                "--cache-size",
                "1G",
            ][..],
            &["vpool", "pool", "create", "x", "--cache-size", "1G"],
            &["vpool", "pool", "create", "x", "--s3", "s3://b"],
            &["vpool", "vol", "list", "--pool", "a", "--all"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let c = Cli::try_parse_from(["vpool", "vol", "list", "--pool", "cold"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Vol(VolCommand::List { pool: Some(p), all: false }) if p == "cold"
        ));
        // --cache defaults to --home.
        let c = Cli::try_parse_from([
            "vpool",
            "--home",
            "/p",
            "pool",
            "attach",
            "--s3",
            "s3://b",
            "--cache-size",
            "1G",
        ])
        .unwrap();
        match c.command {
            Command::Pool(PoolCommand::Attach { s3, .. }) => {
                assert_eq!(s3.settings(&c.home).unwrap().cache_dir, PathBuf::from("/p"));
            }
            other => panic!("{other:?}"),
        }
        for bad in ["0", "-1", "x", "inf"] {
            assert!(parse_secs(bad).is_err(), "{bad}");
        }
        let c = Cli::try_parse_from(["vpool", "cache", "pin", "db1@suspended"]).unwrap();
        assert!(
            matches!(c.command, Command::Cache(CacheCommand::Pin { image }) if image == "db1@suspended")
        );
        let c = Cli::try_parse_from(["vpool", "serve", "--force"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Serve(ServeArgs { force: true, .. })
        ));
    }

    #[test]
    fn renders_cache_stats_and_pins() {
        let c = CacheInfo {
            remote: "s3://vms/pool1".into(),
            cache_size_bytes: 20 << 30,
            cached_bytes: 5 << 30,
            dirty_bytes: 3 << 20,
            pinned_bytes: 1 << 30,
            pins: 2,
            read_hits: 973,
            read_misses: 27,
            hit_ratio: 0.973,
            upload_lag_bytes: 32 << 20,
            upload_lag_seconds: 3.12,
            upload_mb_per_s: 85.25,
            holder: "host1:42".into(),
            fencing: "atomic".into(),
            ..CacheInfo::default()
        };
        let t = render_cache_stats(&c);
        assert!(
            t.contains("hit ratio:    97.3% (973 hits, 27 misses)\n"),
            "{t}"
        );
        assert!(
            t.contains("cached:       5 GiB (25.0% of the cache)\n"),
            "{t}"
        );
        assert!(t.contains("pinned:       1 GiB (2 pins)\n"), "{t}");
        assert!(t.contains("upload lag:   32 MiB, 3.1 s\n"), "{t}");
        assert!(t.contains("85.2 MB/s"), "{t}");
        assert!(t.ends_with("fenced:       no\n"), "{t}");
        let t = render_cache_stats(&CacheInfo {
            fenced: Some("taken over by host2".into()),
            ..c
        });
        assert!(t.contains("fenced:       YES"), "{t}");
        assert_eq!(render_pins(&[]), "no pins\n");
        let t = render_pins(&[
            PinInfo {
                volume: "db1".into(),
                snapshot: Some("suspended".into()),
                bytes: Some(3 << 30),
                error: None,
            },
            PinInfo {
                volume: "gone".into(),
                snapshot: None,
                bytes: None,
                error: Some("volume \"gone\" not found".into()),
            },
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "IMAGE          DATA   STATUS");
        assert_eq!(lines[1], "db1@suspended  3 GiB  pinned");
        assert!(
            lines[2].starts_with("gone") && lines[2].contains("pins nothing"),
            "{t}"
        );
    }

    #[test]
    fn tcp_listen_needs_a_token_file() {
        assert!(Cli::try_parse_from(["vpool", "serve", "--api-listen", "127.0.0.1:1"]).is_err());
        assert!(
            Cli::try_parse_from([
                "vpool",
                "serve",
                "--api-listen",
                "127.0.0.1:1",
                "--api-token-file",
                "t"
            ])
            .is_ok()
        );
    }

    #[test]
    fn attach_details_escape_and_name_hosts() {
        let a = Attach::new("web1", Path::new("/srv/my pool&x"), None);
        assert_eq!(
            a.nbd_uri,
            "nbd+unix:///web1?socket=/srv/my%20pool%26x/nbd.sock"
        );
        assert_eq!(a.nbd_socket, PathBuf::from("/srv/my pool&x/nbd.sock"));
        assert!(
            a.libvirt_xml
                .contains("<host transport='unix' socket='/srv/my pool&amp;x/nbd.sock'/>"),
            "{}",
            a.libvirt_xml
        );
        assert_eq!(a.nbd_tcp_uri, None);
        let a = Attach::new(
            "db",
            Path::new("/p"),
            Some("10.1.2.3:10809".parse().unwrap()),
        );
        assert_eq!(a.nbd_tcp_uri.as_deref(), Some("nbd://10.1.2.3:10809/db"));
        let a = Attach::new("db", Path::new("/p"), Some("[::1]:10809".parse().unwrap()));
        assert_eq!(a.nbd_tcp_uri.as_deref(), Some("nbd://[::1]:10809/db"));
        let a = Attach::new("db", Path::new("/p"), Some("[::]:10809".parse().unwrap()));
        let tcp = a.nbd_tcp_uri.unwrap();
        assert!(!tcp.contains("[::]") && tcp.ends_with(":10809/db"), "{tcp}");
        let text = render_attach(&Attach::new("db", Path::new("/p"), None));
        assert!(
            text.contains("\n  nbd+unix:///db?socket=/p/nbd.sock\n"),
            "{text}"
        );
        assert!(
            text.contains("\n  <disk type='network' device='disk'>\n"),
            "{text}"
        );
        assert!(
            text.contains("\n    <target dev='vda' bus='virtio'/>\n"),
            "{text}"
        );
    }

    #[test]
    fn renders_a_table() {
        let v = VolumeInfo {
            name: "web1".into(),
            id: 1,
            size_bytes: 20 << 30,
            allocated_bytes: 3 << 29,
            zero_bytes: 0,
            extents: 12,
            parent: None,
            snapshots: 0,
            ephemeral: false,
            template: None,
            incomplete: false,
            exclusive_bytes: Some(1 << 29),
            shared_bytes: Some(1 << 30),
        };
        let t = render_volume_table(std::slice::from_ref(&v));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("NAME"));
        assert!(
            lines[1].starts_with("web1")
                && lines[1].contains("20 GiB")
                && lines[1].contains("1.5 GiB")
        );
        assert_eq!(render_volume_table(&[]), "no volumes\n");
        assert!(render_volume_info(&v).contains("20 GiB (21474836480 bytes)"));
        assert!(render_volume_info(&v).contains("template:   no\n"));
        assert!(
            render_volume_info(&v)
                .contains("exclusive:  512 MiB (freed if deleted)\nshared:     1 GiB")
        );
    }

    #[test]
    fn image_names() {
        assert_eq!(parse_snapshot_name("web1@a").unwrap(), ("web1", "a"));
        for bad in ["web1", "@a", "web1@", "a@b@c", ""] {
            let e = parse_snapshot_name(bad).unwrap_err().to_string();
            assert!(e.contains("VOLUME@SNAPSHOT"), "{bad}: {e}");
        }
        assert_eq!(parse_image("web1").unwrap(), ("web1", None));
        assert_eq!(parse_image("web1@s").unwrap(), ("web1", Some("s")));
        assert_eq!(
            parse_diff_images("w@a", "w").unwrap(),
            ("w", Some("a"), None)
        );
        let e = parse_diff_images("w@a", "x@b").unwrap_err().to_string();
        assert!(e.contains("one volume"), "{e}");
    }

    #[test]
    fn renders_diffs_and_snapshot_tables() {
        let d = Diff {
            volume: "w".into(),
            from: Some("a".into()),
            to: None,
            from_size_bytes: 1 << 20,
            size_bytes: 2 << 20,
            offset: 0,
            extents: vec![
                vpool_api::DiffExtent {
                    offset: 0,
                    length: 4096,
                    kind: DiffKind::Data,
                },
                vpool_api::DiffExtent {
                    offset: 8192,
                    length: 8192,
                    kind: DiffKind::Zero,
                },
            ],
            next_offset: None,
        };
        let t = render_diff(&d);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "OFFSET  LENGTH  KIND");
        assert_eq!(lines[1], "0       4096    data");
        assert_eq!(lines[2], "8192    8192    zero");
        assert!(
            lines[3].starts_with("w@a -> w: 2 changed extents, 4 KiB of data, 8 KiB zeroed"),
            "{t}"
        );
        let s = SnapshotInfo {
            volume: "w".into(),
            name: "a".into(),
            size_bytes: 1 << 30,
            allocated_bytes: 0,
            seq: 17,
            exclusive_bytes: Some(0),
            shared_bytes: None,
        };
        let t = render_snapshot_table("w", &[s]);
        assert!(
            t.starts_with("NAME  SIZE   ALLOCATED  EXCLUSIVE  SHARED  SEQ\n"),
            "{t}"
        );
        assert!(t.contains("0 B        -       17"), "{t}");
        assert_eq!(render_snapshot_table("w", &[]), "no snapshots of w\n");
    }
}
