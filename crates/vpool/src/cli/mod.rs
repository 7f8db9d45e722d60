//! The command line: argument definitions and the commands that talk to
//! the daemon.
//!
//! Every command but `serve` is a client of the daemon's API socket at
//! `<home>/api.sock`; none of them opens a pool itself, so they work while
//! the daemon holds it and say so plainly when no daemon is running.
//! `--json` switches every command to machine-readable output on stdout.
//!
//! The exceptions: `pool create --s3` and `pool attach` without a NAME set
//! up the home as the cache of a pool on S3 before any daemon runs
//! ([`crate::s3pool`]), and `pool check` checks a pool in this process when
//! no daemon serves it.
//!
//! One module per command group ([`vol`], [`snap`], [`pool`], [`cache`]:
//! its arguments and what it does), the text output in [`render`] and
//! [`attach`] (how a VM attaches a volume).

mod attach;
mod bench;
mod cache;
mod iostat;
mod job;
mod pool;
mod render;
mod replica;
mod schedule;
mod snap;
mod trash;
mod usage;
mod vol;

#[cfg(test)]
mod tests;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use vpool_api::{Client, ClientError, ErrorKind};

use crate::daemon::api_socket_path;

pub use attach::{Attach, LibvirtDisk, VolumeInfoWithAttach, parse_target, render_attach};
pub use cache::CacheCommand;
pub use job::JobCommand;
pub use pool::{PoolCommand, S3PoolArgs};
pub use render::*;
pub use replica::ReplicaCommand;
pub use schedule::ScheduleCommand;
pub use snap::SnapCommand;
pub use vol::VolCommand;

/// vpool: a storage server for virtual machine disks.
#[derive(Debug, Parser)]
#[command(name = "vpool", version, about, propagate_version = true)]
pub struct Cli {
    /// The daemon's home: the directory of its default pool, `local`, and of
    /// its sockets (<home>/api.sock, <home>/nbd.sock) and `host.json` (the
    /// other pools it holds).
    /// Default: `home` in the configuration file, else ./vpool-data.
    #[arg(long, global = true, env = "VPOOL_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,

    /// The configuration file (default: /etc/vpool/vpool.toml, if it
    /// exists): the home, the log filter, and a key for each `serve` flag.
    #[arg(long, global = true, env = "VPOOL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Machine-readable JSON output (for `serve`: JSON log lines).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The home when neither `--home`, `$VPOOL_HOME` nor the configuration file
/// names one.
pub const DEFAULT_HOME: &str = "vpool-data";

impl Cli {
    /// The daemon's home: `--home` (or `$VPOOL_HOME`), else the
    /// configuration file's `home`, else [`DEFAULT_HOME`].
    pub fn home_dir(&self, config: &crate::config::Config) -> PathBuf {
        (self.home.clone())
            .or_else(|| config.file.home.clone())
            .unwrap_or_else(|| DEFAULT_HOME.into())
    }
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
    /// The daemon's long operations (`vol copy`): progress, cancel, wait.
    #[command(subcommand)]
    Job(JobCommand),
    /// Replication of volumes into another pool, as points in time: add,
    /// list, status, run, verify, remove, promote.
    #[command(subcommand)]
    Replica(ReplicaCommand),
    /// Snapshots on a schedule, with retention: add, list, remove.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
}

#[derive(Clone, Debug, Default, Args)]
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

    /// Serve the peer link of shared pools on TCP at this address (e.g.
    /// 0.0.0.0:7071): the other hosts of a shared pool forward their
    /// clients' I/O for the volumes this host owns through it, and
    /// ownership moves to the host whose clients remain. Authenticated
    /// with the pool's secret (in its bucket), not encrypted.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<std::net::SocketAddr>,

    /// Where the other hosts reach this host's peer link (HOST:PORT);
    /// default: the --peer-listen address.
    #[arg(long, value_name = "HOST:PORT", requires = "peer_listen")]
    pub peer_advertise: Option<String>,

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

    /// Do not count NBD requests per volume for `GET /metrics` (the pool
    /// figures stay): what the counting costs is measured against this.
    #[arg(long)]
    pub no_io_metrics: bool,

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
    hint_override(e, "pass --force to do it anyway")
}

/// Adds `hint` (how to override it) to an `in_use` refusal for NBD clients.
fn hint_override(e: ClientError, hint: &str) -> ClientError {
    match e {
        ClientError::Api {
            status,
            kind: kind @ ErrorKind::InUse,
            message,
        } if message.contains("NBD client") => ClientError::Api {
            status,
            kind,
            message: format!(
                "{}; {hint}",
                message.trim_end_matches(" (or ask with force=true)")
            ),
        },
        e => e,
    }
}

/// [`hint_force`] for an error that came back through `anyhow` (import).
fn hint_force_anyhow(e: anyhow::Error) -> anyhow::Error {
    match e.downcast::<ClientError>() {
        Ok(c) => hint_force(c).into(),
        Err(e) => e,
    }
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

/// `path` made absolute against the current directory (without resolving
/// symlinks when the path does not exist; canonical when it does).
pub(crate) fn absolute(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Runs a client command (anything but `serve`).
pub fn run_client_command(home: &Path, json: bool, cmd: &Command) -> anyhow::Result<()> {
    let client = client_for(home);
    // Progress bars only for a person watching: not in JSON mode, not when
    // stderr goes to a file or a pipe.
    let show_progress = !json && std::io::stderr().is_terminal();
    let out = Output {
        json,
        stderr: false,
    };
    match cmd {
        Command::Serve(_) => anyhow::bail!("`serve` is not a client command"),
        Command::Pool(p) => pool::run(&client, home, out, p),
        Command::Cache(c) => cache::run(&client, out, c),
        Command::Vol(v) => vol::run(&client, home, out, show_progress, v),
        Command::Snap(c) => snap::run(&client, out, c),
        Command::Job(c) => job::run(&client, out, show_progress, c),
        Command::Replica(c) => replica::run(&client, out, show_progress, c),
        Command::Schedule(c) => schedule::run(&client, out, c),
    }
}

/// Where a command's result goes: JSON on stdout, or text for a person.
#[derive(Clone, Copy)]
struct Output {
    json: bool,
    /// Print to standard error: standard output carries data (`vol export
    /// VOL -`).
    stderr: bool,
}

impl Output {
    /// This output, on standard error if `cond`.
    fn to_stderr_if(self, cond: bool) -> Output {
        Output {
            stderr: self.stderr || cond,
            ..self
        }
    }

    /// Prints `value` as JSON, or the text `human` makes of it.
    fn emit<T: Serialize>(self, value: &T, human: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
        let mut text = if self.json {
            serde_json::to_string_pretty(value).context("encoding JSON output")?
        } else {
            human(value)
        };
        if !text.ends_with('\n') {
            text.push('\n');
        }
        if self.stderr {
            eprint!("{text}");
        } else {
            print!("{text}");
        }
        Ok(())
    }
}
