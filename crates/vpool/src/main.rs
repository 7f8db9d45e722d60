//! `vpool`: the daemon (`vpool serve`) and the command-line client.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use vpool::cli::{Cli, Command, ServeArgs, run_client_command};
use vpool::daemon::{AlreadyRunning, DaemonConfig, TcpApiConfig, run_daemon};
use vpool::s3pool::PoolHeld;
use vpool_api::{AuthToken, ClientError};

/// Log filter when neither `VPOOL_LOG` nor `RUST_LOG` is set.
const DEFAULT_LOG_FILTER: &str = "info";

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `--home` is a directory (or the name of a pool registered by an
    // earlier release).
    let result = vpool::registry::resolve_home(&cli.home).and_then(|home| match &cli.command {
        Command::Serve(args) => serve(&cli, &home, args),
        cmd => run_client_command(&home, cli.json, cmd),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report_error(&e, cli.json);
            ExitCode::FAILURE
        }
    }
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

fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("VPOOL_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn serve(cli: &Cli, pool: &std::path::Path, args: &ServeArgs) -> anyhow::Result<()> {
    init_logging(cli.json);
    // Everything the daemon creates (pool files, sockets, pool.json) is
    // its owner's alone: volume names and data are nobody else's business.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let mut config = DaemonConfig::new(pool);
    config.nbd_tcp = args.nbd_listen;
    config.peer_listen = args.peer_listen;
    config.peer_advertise = args.peer_advertise.clone();
    config.takeover = args.force;
    config.io_metrics = !args.no_io_metrics;
    if let Some(n) = args.nbd_max_connections {
        config.nbd_config.max_connections = n as usize;
    }
    if let Some(n) = args.nbd_max_connections_per_client {
        config.nbd_config.max_connections_per_client = n as usize;
    }
    if let Some(n) = args.api_max_connections {
        config.api_limits.max_connections = n as usize;
    }
    if let (Some(listen), Some(token_file)) = (args.api_listen, &args.api_token_file) {
        config.tcp = Some(TcpApiConfig {
            listen,
            token: read_token(token_file)?,
        });
    }
    vpool::daemon::raise_fd_limit(config.fds_needed());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("vpool-rt")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        run_daemon(config, shutdown).await
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

/// Completes on the first SIGTERM or SIGINT. The handlers are installed
/// here, before the daemon starts, so a signal that arrives while the pool
/// is recovering is not lost.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}
