//! `vpool`: the daemon (`vpool serve`) and the command-line client.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};
use vpool::cli::{Cli, Command, ServeArgs, run_client_command};
use vpool::config::{Config, ConfigFile, restart_keys};
use vpool::daemon::{AlreadyRunning, DaemonConfig, TcpApiConfig, run_daemon_notify};
use vpool::s3pool::PoolHeld;
use vpool::systemd;
use vpool_api::{AuthToken, ClientError};

/// Log filter when neither `VPOOL_LOG` nor `RUST_LOG` is set.
const DEFAULT_LOG_FILTER: &str = "info";

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    // A client command told its home reads no default configuration file:
    // a broken /etc/vpool/vpool.toml does not stop `vpool --home X ...`.
    let serving = matches!(cli.command, Command::Serve(_));
    let config = if !serving && cli.home.is_some() && cli.config.is_none() {
        Ok(Config::default())
    } else {
        Config::load(cli.config.as_deref())
    };
    let result = config.and_then(|config| {
        // `--home` is a directory (or the name of a pool registered by an
        // earlier release).
        let home = vpool::registry::resolve_home(&cli.home_dir(&config))?;
        match &cli.command {
            Command::Serve(args) => serve(&cli, &config, &home, args),
            cmd => run_client_command(&home, cli.json, cmd),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e, cli.json);
            ExitCode::FAILURE
        }
    }
}

/// Arguments the parser refused: its message, as JSON when `--json` is
/// among them (a script asked for JSON, even if the rest is wrong); exit
/// status 2. `--help` and `--version` print as usual.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    let json = std::env::args_os().any(|a| a == "--json");
    if !json
        || matches!(
            e.kind(),
            ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        )
    {
        e.exit();
    }
    let rendered = e.render().to_string();
    let message = rendered.trim_end().trim_start_matches("error: ");
    let body = serde_json::json!({ "error": { "kind": "usage", "message": message } });
    eprintln!("{body}");
    ExitCode::from(2)
}

/// Prints a failed command's error to stderr, as JSON with `--json`.
fn report_error(e: &anyhow::Error, json: bool) {
    if json {
        let kind = match e.downcast_ref::<ClientError>() {
            Some(ClientError::Api { kind, .. }) => kind.as_str(),
            Some(ClientError::NoDaemon { .. }) => "no_daemon",
            _ if e.downcast_ref::<AlreadyRunning>().is_some() => "already_running",
            _ if e.downcast_ref::<PoolHeld>().is_some() => "held",
            _ => "error",
        };
        let body = serde_json::json!({ "error": { "kind": kind, "message": format!("{e:#}") } });
        eprintln!("{body}");
    } else {
        eprintln!("error: {e:#}");
    }
}

/// Changes the log filter of the running daemon.
type LogReload = reload::Handle<EnvFilter, Registry>;

/// The log filter: `$VPOOL_LOG`, else `$RUST_LOG`, else the configuration
/// file's `log`, else [`DEFAULT_LOG_FILTER`].
fn log_filter(file: &ConfigFile) -> anyhow::Result<EnvFilter> {
    if let Ok(f) =
        EnvFilter::try_from_env("VPOOL_LOG").or_else(|_| EnvFilter::try_from_default_env())
    {
        return Ok(f);
    }
    let text = file.log.as_deref().unwrap_or(DEFAULT_LOG_FILTER);
    EnvFilter::try_new(text).with_context(|| format!("the log filter {text:?}"))
}

fn init_logging(json: bool, filter: EnvFilter) -> LogReload {
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    handle
}

fn serve(
    cli: &Cli,
    config: &Config,
    pool: &std::path::Path,
    args: &ServeArgs,
) -> anyhow::Result<()> {
    let args = config.serve_args(args)?;
    let log = init_logging(
        cli.json || config.file.json_log == Some(true),
        log_filter(&config.file)?,
    );
    if let Some(p) = &config.path {
        tracing::info!(config = %p.display(), "configuration file read");
    }
    // Everything the daemon creates (pool files, sockets, pool.json) is
    // its owner's alone: volume names and data are nobody else's business.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let mut config_d = DaemonConfig::new(pool);
    config_d.nbd_tcp = args.nbd_listen;
    config_d.peer_listen = args.peer_listen;
    config_d.peer_advertise = args.peer_advertise.clone();
    config_d.takeover = args.force;
    config_d.io_metrics = !args.no_io_metrics;
    if let Some(n) = args.nbd_max_connections {
        config_d.nbd_config.max_connections = n as usize;
    }
    if let Some(n) = args.nbd_max_connections_per_client {
        config_d.nbd_config.max_connections_per_client = n as usize;
    }
    if let Some(n) = args.api_max_connections {
        config_d.api_limits.max_connections = n as usize;
    }
    if let (Some(listen), Some(token_file)) = (args.api_listen, &args.api_token_file) {
        config_d.tcp = Some(TcpApiConfig {
            listen,
            token: read_token(token_file)?,
        });
    }
    vpool::daemon::raise_fd_limit(config_d.fds_needed());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vpool-rt")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = signals(config.clone(), log)?;
        run_daemon_notify(config_d, shutdown, |_| {
            systemd::notify(systemd::READY, "serving")
        })
        .await
    })
}

fn read_token(path: &std::path::Path) -> anyhow::Result<AuthToken> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API token from {}", path.display()))?;
    let mode = std::fs::metadata(path)
        .with_context(|| format!("reading the mode of {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        // Anyone who can read the token can drive the API over TCP.
        anyhow::bail!(
            "the API token file {} is readable by others (mode {:o}): chmod 600 it",
            path.display(),
            mode & 0o777
        );
    }
    AuthToken::new(&text).with_context(|| format!("the token in {}", path.display()))
}

/// Completes on the first SIGTERM or SIGINT; meanwhile each SIGHUP re-reads
/// the configuration file ([`reload`]). The handlers are installed here,
/// before the daemon starts, so a signal that arrives while the pool is
/// recovering is neither lost nor fatal (SIGHUP's default action would end
/// the process).
fn signals(
    config: Config,
    log: LogReload,
) -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM received"); break }
                _ = int.recv() => { tracing::info!("SIGINT received"); break }
                _ = hup.recv() => reload(&config, &log),
            }
        }
        systemd::notify(
            systemd::STOPPING,
            "stopping: finishing requests, closing pools",
        );
    })
}

/// SIGHUP: re-reads the configuration file, applies its log filter, and
/// names the keys that changed but need a restart. A file that no longer
/// parses changes nothing.
fn reload(config: &Config, log: &LogReload) {
    systemd::notify(systemd::RELOADING, "reloading the configuration");
    let file = match config.reread() {
        None => {
            tracing::info!("SIGHUP received: no configuration file to re-read");
            ConfigFile::default()
        }
        Some(Err(e)) => {
            tracing::error!(error = %format!("{e:#}"), "SIGHUP: the configuration file does not parse; keeping the running configuration");
            systemd::notify(systemd::READY, "serving");
            return;
        }
        Some(Ok(f)) => f,
    };
    match log_filter(&file).map(|f| log.reload(f)) {
        Ok(Ok(())) => tracing::info!(
            log = file.log.as_deref().unwrap_or(DEFAULT_LOG_FILTER),
            "SIGHUP: configuration re-read, log filter applied"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "SIGHUP: could not change the log filter"),
        Err(e) => tracing::error!(error = %format!("{e:#}"), "SIGHUP: keeping the log filter"),
    }
    let restart = restart_keys(&config.file, &file);
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "SIGHUP: these keys changed; they take effect at the next start");
    }
    systemd::notify(systemd::READY, "serving");
}
