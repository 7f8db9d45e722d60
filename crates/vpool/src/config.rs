//! The configuration file, `/etc/vpool/vpool.toml` (or `--config FILE`,
//! `$VPOOL_CONFIG`): the daemon's home and log filter, and a key for each
//! `vpool serve` flag, so a system service needs no command line.
//!
//! Precedence, highest first: the command line (and `$VPOOL_HOME`,
//! `$VPOOL_LOG`), the file, the built-in defaults. The default file is read
//! only if it exists; a file named with `--config` must exist. Unknown keys
//! are errors, so a misspelt key stops the start instead of being ignored.
//! `serve --force` (take a held pool over) has no key on purpose: it is a
//! one-off decision, not a setting to repeat at every start.
//!
//! SIGHUP re-reads the file: the log filter changes at once; the other keys
//! take effect at the next start, and the daemon logs which ones changed.
//! (QoS limits are not in the file: they live in each pool's catalog and
//! change at once through `vpool vol qos`.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::cli::ServeArgs;

/// Where the system service's configuration is looked for by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vpool/vpool.toml";

/// Bytes a configuration file may have: it is a few lines.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The keys of the configuration file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The daemon's home (`--home`).
    pub home: Option<PathBuf>,
    /// The log filter (as `$VPOOL_LOG`: `info`, `vpool=debug,info`...).
    pub log: Option<String>,
    /// JSON log lines (`--json` on `serve`).
    pub json_log: Option<bool>,
    pub api_listen: Option<SocketAddr>,
    pub api_token_file: Option<PathBuf>,
    pub nbd_listen: Option<SocketAddr>,
    pub peer_listen: Option<SocketAddr>,
    pub peer_advertise: Option<String>,
    pub nbd_max_connections: Option<u32>,
    pub nbd_max_connections_per_client: Option<u32>,
    pub api_max_connections: Option<u32>,
    /// `false` is `--no-io-metrics`.
    pub io_metrics: Option<bool>,
}

/// A configuration file as read: where from (`None`: no file), and what it
/// says.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub path: Option<PathBuf>,
    pub file: ConfigFile,
}

impl Config {
    /// Reads `explicit` (which must exist), or the default file if it
    /// exists, or nothing.
    pub fn load(explicit: Option<&Path>) -> anyhow::Result<Config> {
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if Path::new(DEFAULT_CONFIG_PATH).exists() => DEFAULT_CONFIG_PATH.into(),
            None => return Ok(Config::default()),
        };
        let file = read(&path)?;
        Ok(Config {
            path: Some(path),
            file,
        })
    }

    /// Reads the file again (for SIGHUP); `None` if there is none.
    pub fn reread(&self) -> Option<anyhow::Result<ConfigFile>> {
        self.path.as_deref().map(read)
    }

    /// `args` with what the command line left out taken from the file.
    pub fn serve_args(&self, args: &ServeArgs) -> anyhow::Result<ServeArgs> {
        let f = &self.file;
        let merged = ServeArgs {
            api_listen: args.api_listen.or(f.api_listen),
            api_token_file: args.api_token_file.clone().or(f.api_token_file.clone()),
            nbd_listen: args.nbd_listen.or(f.nbd_listen),
            peer_listen: args.peer_listen.or(f.peer_listen),
            peer_advertise: args.peer_advertise.clone().or(f.peer_advertise.clone()),
            force: args.force,
            nbd_max_connections: args.nbd_max_connections.or(f.nbd_max_connections),
            no_io_metrics: args.no_io_metrics || f.io_metrics == Some(false),
            nbd_max_connections_per_client: (args.nbd_max_connections_per_client)
                .or(f.nbd_max_connections_per_client),
            api_max_connections: args.api_max_connections.or(f.api_max_connections),
        };
        let what = self.what();
        if merged.api_listen.is_some() != merged.api_token_file.is_some() {
            bail!("api_listen and api_token_file go together ({what})");
        }
        if merged.peer_advertise.is_some() && merged.peer_listen.is_none() {
            bail!("peer_advertise needs peer_listen ({what})");
        }
        let counts = [
            ("nbd_max_connections", merged.nbd_max_connections),
            (
                "nbd_max_connections_per_client",
                merged.nbd_max_connections_per_client,
            ),
            ("api_max_connections", merged.api_max_connections),
        ];
        if let Some((key, _)) = counts.iter().find(|(_, v)| *v == Some(0)) {
            bail!("{key} must be at least 1 ({what})");
        }
        Ok(merged)
    }

    /// Where the settings came from, for messages.
    fn what(&self) -> String {
        match &self.path {
            Some(p) => format!("the command line and {}", p.display()),
            None => "the command line".into(),
        }
    }
}

/// Reads and parses the configuration file at `path`.
fn read(path: &Path) -> anyhow::Result<ConfigFile> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading {}", path.display()))?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        bail!("{} is over {MAX_CONFIG_BYTES} bytes", path.display());
    }
    toml::from_str(&text).with_context(|| format!("in {}", path.display()))
}

/// The keys whose values differ between `old` and `new`, but `log`, which
/// SIGHUP applies: they need a restart.
pub fn restart_keys(old: &ConfigFile, new: &ConfigFile) -> Vec<&'static str> {
    let differs = [
        ("home", old.home != new.home),
        ("json_log", old.json_log != new.json_log),
        ("api_listen", old.api_listen != new.api_listen),
        ("api_token_file", old.api_token_file != new.api_token_file),
        ("nbd_listen", old.nbd_listen != new.nbd_listen),
        ("peer_listen", old.peer_listen != new.peer_listen),
        ("peer_advertise", old.peer_advertise != new.peer_advertise),
        (
            "nbd_max_connections",
            old.nbd_max_connections != new.nbd_max_connections,
        ),
        (
            "nbd_max_connections_per_client",
            old.nbd_max_connections_per_client != new.nbd_max_connections_per_client,
        ),
        (
            "api_max_connections",
            old.api_max_connections != new.api_max_connections,
        ),
        ("io_metrics", old.io_metrics != new.io_metrics),
    ];
    differs
        .iter()
        .filter(|(_, d)| *d)
        .map(|(k, _)| *k)
        .collect()
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;
    use crate::cli::Cli;

    /// The example configuration the repository ships, with every key.
    const SHIPPED: &str = include_str!("../../../packaging/vpool.toml");

    /// Uncomments the shipped file's `# key = value` lines.
    fn every_key_set() -> String {
        SHIPPED
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = "))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_shipped_file_parses_with_every_key_set() {
        let f: ConfigFile = toml::from_str(SHIPPED).unwrap();
        assert_eq!(f.home.as_deref(), Some(Path::new("/var/lib/vpool")));
        let all: ConfigFile = toml::from_str(&every_key_set()).unwrap();
        assert!(
            all.nbd_listen.is_some() && all.api_token_file.is_some(),
            "{all:?}"
        );
        assert!(
            all.io_metrics.is_some() && all.peer_advertise.is_some(),
            "{all:?}"
        );
    }

    /// Every `serve` flag has a key (but `--force`, on purpose), documented
    /// in the shipped file.
    #[test]
    fn every_serve_flag_has_a_key() {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        let keys = every_key_set();
        for arg in serve.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "force" | "home" | "json" | "config" | "help") {
                continue;
            }
            let key = match long {
                "no-io-metrics" => "io_metrics".to_string(),
                l => l.replace('-', "_"),
            };
            assert!(
                keys.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "--{long} has no key {key} in packaging/vpool.toml"
            );
        }
    }

    #[test]
    fn unknown_keys_and_half_pairs_are_refused() {
        let e = toml::from_str::<ConfigFile>("nbd_listn = \"0.0.0.0:10809\"").unwrap_err();
        assert!(e.to_string().contains("nbd_listn"), "{e}");
        let c = Config {
            path: Some("/x.toml".into()),
            file: toml::from_str("api_listen = \"127.0.0.1:7070\"").unwrap(),
        };
        let args = ServeArgs::default();
        let e = c.serve_args(&args).unwrap_err().to_string();
        assert!(e.contains("api_token_file") && e.contains("/x.toml"), "{e}");
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let c = Config {
            path: None,
            file: toml::from_str("nbd_listen = \"0.0.0.0:10809\"\nio_metrics = false").unwrap(),
        };
        let args = ServeArgs {
            nbd_listen: Some("127.0.0.1:1".parse().unwrap()),
            ..ServeArgs::default()
        };
        let m = c.serve_args(&args).unwrap();
        assert_eq!(m.nbd_listen, Some("127.0.0.1:1".parse().unwrap()));
        assert!(m.no_io_metrics);
        let old = c.file.clone();
        let new = ConfigFile {
            log: Some("debug".into()),
            nbd_listen: None,
            ..old.clone()
        };
        assert_eq!(restart_keys(&old, &new), ["nbd_listen"]);
    }
}
