//! The command line: argument definitions and the commands that talk to
//! the daemon.
//!
//! Every command but `serve` is a client of the daemon's API socket at
//! `<pool>/api.sock`; none of them opens the pool itself, so they work while
//! the daemon owns it and say so plainly when no daemon is running.
//! `--json` switches every command to machine-readable output on stdout.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use vpool_api::{Client, ClientError, ErrorKind, PoolInfo, VolumeInfo};

use crate::daemon::api_socket_path;
use crate::size::{format_size, parse_volume_size};
use crate::transfer;

/// vpool: a storage server for virtual machine disks.
#[derive(Debug, Parser)]
#[command(name = "vpool", version, about, propagate_version = true)]
pub struct Cli {
    /// The pool directory; the daemon's API socket is <pool>/api.sock.
    #[arg(
        long,
        global = true,
        env = "VPOOL_HOME",
        default_value = "vpool-data",
        value_name = "DIR"
    )]
    pub pool: PathBuf,

    /// Machine-readable JSON output (for `serve`: JSON log lines).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon on the pool (created if missing).
    Serve(ServeArgs),
    /// Manage volumes.
    #[command(subcommand)]
    Vol(VolCommand),
    /// Pool-wide information.
    #[command(subcommand)]
    Pool(PoolCommand),
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
}

#[derive(Debug, Subcommand)]
pub enum VolCommand {
    /// Create a thin volume (it takes no space until written).
    Create {
        name: String,
        /// Size: 512, 4K, 20G, 1.5T (binary units; a multiple of 4K).
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
    },
    /// List the volumes.
    List,
    /// Show one volume.
    Info { name: String },
    /// Change a volume's size.
    Resize {
        name: String,
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
        /// Allow shrinking, which drops the data past the new end.
        #[arg(long)]
        allow_shrink: bool,
    },
    /// Delete a volume and its data.
    Delete { name: String },
    /// Copy a raw disk image into a volume (created if missing); holes and
    /// zero blocks are skipped.
    Import {
        name: String,
        file: PathBuf,
        /// Size of the volume if it is created (default: the file's size,
        /// rounded up to 4K).
        #[arg(long, value_parser = parse_volume_size)]
        size: Option<u64>,
    },
    /// Copy a volume into a sparse raw image file.
    Export {
        name: String,
        file: PathBuf,
        /// Overwrite the file if it exists.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Space and log figures: logical vs physical bytes, garbage, free space.
    Info,
}

/// The client of the daemon serving `pool_dir`.
pub fn client_for(pool_dir: &Path) -> Client {
    Client::unix(api_socket_path(pool_dir))
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(v).context("encoding JSON output")?
    );
    Ok(())
}

/// Runs a client command (anything but `serve`).
pub fn run_client_command(pool_dir: &Path, json: bool, cmd: &Command) -> anyhow::Result<()> {
    let client = client_for(pool_dir);
    // Progress bars only for a person watching: not in JSON mode, not when
    // stderr goes to a file or a pipe.
    let show_progress = !json && std::io::stderr().is_terminal();
    match cmd {
        Command::Serve(_) => anyhow::bail!("`serve` is not a client command"),
        Command::Pool(PoolCommand::Info) => {
            let p = client.pool_info()?;
            if json {
                print_json(&p)
            } else {
                print!("{}", render_pool_info(&p));
                Ok(())
            }
        }
        Command::Vol(v) => match v {
            VolCommand::Create { name, size } => {
                let info = client.create_volume(name, *size)?;
                if json {
                    print_json(&info)
                } else {
                    println!(
                        "created volume {} ({})",
                        info.name,
                        format_size(info.size_bytes)
                    );
                    Ok(())
                }
            }
            VolCommand::List => {
                let vols = client.list_volumes()?;
                if json {
                    print_json(&vpool_api::VolumeList { volumes: vols })
                } else {
                    print!("{}", render_volume_table(&vols));
                    Ok(())
                }
            }
            VolCommand::Info { name } => {
                let info = client.volume_info(name)?;
                if json {
                    print_json(&info)
                } else {
                    print!("{}", render_volume_info(&info));
                    Ok(())
                }
            }
            VolCommand::Resize {
                name,
                size,
                allow_shrink,
            } => {
                let info =
                    client
                        .resize_volume(name, *size, *allow_shrink)
                        .map_err(|e| match e {
                            // Name the flag; the daemon's message cannot know it.
                            ClientError::Api {
                                status,
                                kind: kind @ ErrorKind::ShrinkRefused,
                                message,
                            } => ClientError::Api {
                                status,
                                kind,
                                message: format!(
                                    "{message}; pass --allow-shrink to shrink it anyway"
                                ),
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
            VolCommand::Delete { name } => {
                client.delete_volume(name)?;
                if json {
                    print_json(&serde_json::json!({ "deleted": name }))
                } else {
                    println!("deleted volume {name}");
                    Ok(())
                }
            }
            VolCommand::Import { name, file, size } => {
                let r = transfer::import(&client, name, file, *size, show_progress)?;
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
                let r = transfer::export(&client, name, file, *force, show_progress)?;
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
        },
    }
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
                v.name.clone(),
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
    format!(
        "name:       {}\nid:         {}\nsize:       {} ({} bytes)\nallocated:  {} ({} bytes)\nzeroed:     {}\nextents:    {}\n",
        v.name,
        v.id,
        format_size(v.size_bytes),
        v.size_bytes,
        format_size(v.allocated_bytes),
        v.allocated_bytes,
        format_size(v.zero_bytes),
        v.extents
    )
}

/// The `pool info` text.
pub fn render_pool_info(p: &PoolInfo) -> String {
    let free = match p.free_bytes {
        Some(b) => format_size(b),
        None => "unknown".to_string(),
    };
    format!(
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
            "vpool", "vol", "create", "web1", "--size", "20G", "--json", "--pool", "/p",
        ])
        .unwrap();
        assert!(c.json);
        assert_eq!(c.pool, PathBuf::from("/p"));
        match c.command {
            Command::Vol(VolCommand::Create { name, size }) => {
                assert_eq!(name, "web1");
                assert_eq!(size, 20 << 30);
            }
            other => panic!("{other:?}"),
        }
        let e = Cli::try_parse_from(["vpool", "vol", "create", "w", "--size", "1000"]).unwrap_err();
        assert!(e.to_string().contains("not a multiple of 4096"), "{e}");
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
    fn renders_a_table() {
        let v = VolumeInfo {
            name: "web1".into(),
            id: 1,
            size_bytes: 20 << 30,
            allocated_bytes: 3 << 29,
            zero_bytes: 0,
            extents: 12,
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
    }
}
