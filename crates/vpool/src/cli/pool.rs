//! `vpool pool ...`: the pools the daemon holds, and pool-wide figures and
//! checks.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use vpool_api::{Client, ClientError, VolumeInfo};

use super::{
    Output, absolute, hint_force, print_json, render_check, render_pool_info, render_pool_list,
    render_pool_report,
};
use crate::s3pool::{PoolReport, S3PoolSettings};
use crate::size::parse_size;

/// How long adding, opening or detaching a pool may take: recovery of a
/// big pool, or the upload of what a pool on S3 still holds.
const POOL_OP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// `vpool pool ...`.
pub(super) fn run(
    client: &Client,
    home: &Path,
    out: Output,
    cmd: &PoolCommand,
) -> anyhow::Result<()> {
    let json = out.json;
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
pub(super) fn every_pools_volumes(client: &Client) -> anyhow::Result<Vec<VolumeInfo>> {
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
        /// The name the pool gets in this daemon; none: the home itself.
        name: Option<String>,
        #[command(flatten)]
        s3: S3PoolArgs,
    },
    /// Close a pool and forget it (a pool on S3 uploads what is left and
    /// releases its lease first). Its data stays where it is: `pool create
    /// NAME --dir DIR` takes it back. Refused while NBD clients have its
    /// volumes open, unless --force.
    Detach {
        /// The pool.
        name: String,
        /// Even while NBD clients have its volumes open (their disks fail).
        #[arg(long)]
        force: bool,
    },
    /// Open a pool that failed to open (its bucket was down, its lease was
    /// held): `--force` takes a pool on S3 over from the host that holds it,
    /// which is fenced.
    Open {
        /// The pool.
        name: String,
        /// Take a pool on S3 over from the host that holds it (fenced).
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
    /// How long another host must see this host's lease not renewed
    /// before it may take the pool over (default 30; 1 to 3600). This host
    /// stops I/O after two thirds of it without a renewal.
    #[arg(long, value_name = "SECS", value_parser = parse_secs, requires = "url")]
    pub lease_expire: Option<f64>,
    /// A shared pool: attached by every host, each volume owned by one host
    /// at a time and moved with `vol takeover`/`vol release`
    /// (`--cache-size` is then each owned volume's cache). `pool attach`
    /// finds out by itself.
    #[arg(long, requires = "url")]
    pub shared: bool,
    /// What a FLUSH promises: `host` (default; durable in this host's
    /// cache, the bucket lags by the seal interval) or `remote` (durable
    /// in the bucket: a flush writes the flush journal first, so losing
    /// this host loses no flushed write).
    #[arg(long, value_name = "host|remote", requires = "url")]
    pub durability: Option<vpool_s3::Durability>,
}

impl S3PoolArgs {
    /// The settings for a pool whose cache is `--cache`, else `cache_dir`.
    pub(super) fn settings(&self, cache_dir: &Path) -> anyhow::Result<S3PoolSettings> {
        Ok(S3PoolSettings {
            spec: self.spec()?,
            cache_dir: self
                .cache
                .clone()
                .unwrap_or_else(|| cache_dir.to_path_buf()),
        })
    }

    /// Where the pool is and how its cache behaves, as the daemon's API
    /// takes it: paths made absolute (the daemon's working directory is
    /// not this one).
    pub(super) fn spec(&self) -> anyhow::Result<vpool_service::S3Spec> {
        let (Some(url), Some(cache_size_bytes)) = (&self.url, self.cache_size) else {
            anyhow::bail!("give the pool's place on S3: --s3 URL --cache-size SIZE");
        };
        Ok(vpool_service::S3Spec {
            url: url.clone(),
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            credentials_file: self.credentials.as_deref().map(absolute),
            cache_size_bytes,
            seal_after_secs: self.seal_after,
            backpressure_timeout_secs: self.backpressure_timeout,
            read_timeout_secs: self.read_timeout,
            lease_expire_secs: self.lease_expire,
            shared: self.shared,
            durability: self.durability.map(|d| d.to_string()),
        })
    }
}

/// A number of seconds: `5`, `0.5`.
pub(super) fn parse_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (e.g. 5 or 0.5)"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{s:?}: give a number of seconds above 0"));
    }
    Ok(v)
}
