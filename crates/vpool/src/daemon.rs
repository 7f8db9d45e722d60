//! The daemon: opens the pool, serves the API until told to stop, then
//! closes the pool cleanly.
//!
//! [`run_daemon`] is the whole of `vpool serve` minus argument parsing,
//! logging setup and signal handling, so tests run it in-process with any
//! future as the shutdown signal.
//!
//! Order matters at both ends. At start, the pool's lock is taken *before*
//! the socket is touched, so a second daemon on the same pool fails without
//! disturbing the first one's socket. At the end, the listeners stop and the
//! requests in flight finish *before* the pool is closed (checkpointed), so
//! no acknowledged request races the close.
//!
//! A pool directory with a `pool.json` is the cache of a pool on S3
//! ([`crate::s3pool`]): the store is opened (taking the pool's write lease)
//! before the engine recovers on it, its uploader starts after, the API
//! gets the cache's stats and pins ([`crate::cache`]), and at the end the
//! store is closed after the engine (uploading what is left and releasing
//! the lease). Everything else is the same as for a local pool.

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use vpool_api::{ApiLimits, ApiState, AuthToken, serve_tcp, serve_unix};
use vpool_engine::{EngineError, Pool, PoolConfig, RecoveryReport};
use vpool_s3::S3Store;
use vpool_service::{
    CacheControl, Catalog, Host, HostExports, Opened, OpenedPool, Opener, PoolKind, S3Spec,
};
use vpool_store::{LocalDirStore, SegmentStore, StoreError};

use crate::cache::S3Cache;
pub use crate::lock::AlreadyRunning;
use crate::s3pool::PoolFile;

/// The API socket's file name inside the pool directory.
pub const API_SOCKET_NAME: &str = "api.sock";

/// The NBD socket's file name inside the pool directory.
pub const NBD_SOCKET_NAME: &str = "nbd.sock";

/// The NBD socket serves every volume without authentication, like the API
/// socket: owner only. QEMU running as another user needs TCP or a group.
const NBD_SOCKET_MODE: u32 = 0o600;

/// How long shutdown waits for requests in flight before closing the pool
/// anyway. A data request moves at most 8 MiB, so this is plenty unless the
/// disk is wedged, and then waiting longer would not help.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_SOCKET_PATH_BYTES: usize = 107;

/// The API socket is only for the pool's owner: it carries no other
/// authentication.
const API_SOCKET_MODE: u32 = 0o600;

/// Where the daemon's API socket for a pool directory is.
pub fn api_socket_path(pool_dir: &Path) -> PathBuf {
    pool_dir.join(API_SOCKET_NAME)
}

/// The optional TCP listener of the API.
#[derive(Clone, Debug)]
pub struct TcpApiConfig {
    pub listen: SocketAddr,
    pub token: AuthToken,
}

/// What the daemon serves and where.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub pool_dir: PathBuf,
    pub api_socket: PathBuf,
    pub tcp: Option<TcpApiConfig>,
    pub pool_config: PoolConfig,
    /// NBD on this unix socket (every volume is an export).
    pub nbd_socket: PathBuf,
    /// NBD also on TCP at this address (`--nbd-listen`).
    pub nbd_tcp: Option<SocketAddr>,
    pub nbd_config: vpool_nbd::ServerConfig,
    /// Limits of each API listener (connections, header/body/response
    /// timeouts).
    pub api_limits: ApiLimits,
    /// For a pool on S3: take its write lease even from another daemon
    /// (`vpool serve --force`), which is fenced.
    pub takeover: bool,
    /// Serve the peer link of shared pools here (`--peer-listen`): other
    /// hosts forward their clients' I/O for the volumes this host owns.
    pub peer_listen: Option<SocketAddr>,
    /// The address other hosts reach the peer link at (`--peer-advertise`;
    /// default: the bound address, which must then not be unspecified).
    pub peer_advertise: Option<String>,
    /// Count every NBD request per volume for `GET /metrics` (off:
    /// `--no-io-metrics`).
    pub io_metrics: bool,
}

impl DaemonConfig {
    /// The defaults for a pool directory: socket at `<pool>/api.sock`, no
    /// TCP listener, the engine's default tuning.
    pub fn new(pool_dir: impl Into<PathBuf>) -> DaemonConfig {
        let pool_dir = pool_dir.into();
        DaemonConfig {
            api_socket: api_socket_path(&pool_dir),
            nbd_socket: pool_dir.join(NBD_SOCKET_NAME),
            pool_dir,
            tcp: None,
            pool_config: PoolConfig::default(),
            nbd_tcp: None,
            nbd_config: nbd_server_config(),
            api_limits: ApiLimits::default(),
            takeover: false,
            peer_listen: None,
            peer_advertise: None,
            io_metrics: true,
        }
    }

    /// File descriptors the daemon may need with every connection cap
    /// reached: each NBD and API listener has its own cap, plus the store's
    /// open segment files and some slack.
    pub fn fds_needed(&self) -> u64 {
        let nbd_listeners = 1 + u64::from(self.nbd_tcp.is_some());
        let api_listeners = 1 + u64::from(self.tcp.is_some());
        nbd_listeners * self.nbd_config.max_connections as u64
            + api_listeners * self.api_limits.max_connections as u64
            + STORE_FDS
    }
}

/// Descriptors the store and the rest of the daemon may hold besides
/// client connections: `vpool-store` caches up to 256 open segment files;
/// the rest covers listeners, the cache of an S3 pool, logs and slack.
const STORE_FDS: u64 = 512;

/// Raises the soft limit on open files to the hard limit (Linux's default
/// soft limit, 1024, is below what the connection caps allow), and warns if
/// even the hard limit is below `needed`: then a flood of clients could use
/// up descriptors the pool needs, and a VM's write would fail with EIO.
pub fn raise_fd_limit(needed: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit the call writes into.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit the call reads.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    if lim.rlim_cur < needed {
        tracing::warn!(
            limit = lim.rlim_cur,
            needed,
            "the open-file limit is below what the connection caps allow: raise it (LimitNOFILE=) or lower the caps"
        );
    }
}

/// The NBD server's tuning for engine-backed volumes.
pub fn nbd_server_config() -> vpool_nbd::ServerConfig {
    vpool_nbd::ServerConfig {
        // Volumes take any 512-byte-aligned request (the engine
        // read-modify-writes partial blocks); 4 KiB is what it maps.
        min_block_size: 512,
        preferred_block_size: 4096,
        ..vpool_nbd::ServerConfig::default()
    }
}

/// Where a started daemon listens (the TCP ports may have been 0).
#[derive(Clone, Debug)]
pub struct Ready {
    pub api_socket: PathBuf,
    pub tcp_addr: Option<SocketAddr>,
    pub nbd_socket: PathBuf,
    pub nbd_tcp_addr: Option<SocketAddr>,
    /// The peer link's advertised address.
    pub peer_addr: Option<String>,
}

/// Runs the daemon until `shutdown` completes; see the module docs.
pub async fn run_daemon(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_daemon_notify(config, shutdown, |_| {}).await
}

/// [`run_daemon`], calling `on_ready` once every listener accepts.
pub async fn run_daemon_notify(
    config: DaemonConfig,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&Ready),
) -> anyhow::Result<()> {
    let socket_len = config.api_socket.as_os_str().len();
    if socket_len > MAX_UNIX_SOCKET_PATH_BYTES {
        bail!(
            "the API socket path {} is {socket_len} bytes; Unix sockets allow {MAX_UNIX_SOCKET_PATH_BYTES}: use a shorter --home path",
            config.api_socket.display()
        );
    }
    // Bound before the pools open: the leases they take record where it is.
    let peer = bind_peer(&config)?;
    let host = open_host(&config, peer.as_ref().map(|(_, a)| a.clone())).await?;
    let peer_server = match peer {
        Some((listener, addr)) => {
            let backend = Arc::new(vpool_service::HostPeers::new(Arc::clone(&host)));
            let server = vpool_peer::spawn(listener, backend).context("starting the peer link")?;
            tracing::info!(listen = %server.addr(), advertised = %addr, "peer link serving");
            Some((server, addr))
        }
        None => None,
    };
    let peer_addr = peer_server.as_ref().map(|(_, a)| a.clone());
    let served = serve_host(&config, &host, shutdown, |ready: &Ready| {
        let mut ready = ready.clone();
        ready.peer_addr = peer_addr;
        on_ready(&ready)
    })
    .await;
    if let Some((server, _)) = peer_server {
        server.shutdown();
    }
    let closed = tokio::task::spawn_blocking(move || host.close_all()).await;
    served?;
    closed
        .context("the close task failed")?
        .map_err(|e| anyhow::anyhow!("{}", e.message))
        .context("closing the pools (final checkpoints)")?;
    tracing::info!(home = %config.pool_dir.display(), "pools closed; daemon stopped");
    Ok(())
}

/// The name of the pool in the daemon's home.
pub const DEFAULT_POOL: &str = "local";

/// Binds the peer link's listener (`--peer-listen`): the listener and the
/// address other hosts reach it at.
fn bind_peer(config: &DaemonConfig) -> anyhow::Result<Option<(std::net::TcpListener, String)>> {
    let Some(listen) = config.peer_listen else {
        return Ok(None);
    };
    let l = std::net::TcpListener::bind(listen)
        .with_context(|| format!("listening for the peer link on {listen}"))?;
    let bound = l
        .local_addr()
        .context("reading the peer listener's address")?;
    let addr = match &config.peer_advertise {
        Some(a) => a.clone(),
        None if bound.ip().is_unspecified() => bail!(
            "--peer-listen {listen} binds every address: say with --peer-advertise HOST:PORT where the other hosts reach this one"
        ),
        None => bound.to_string(),
    };
    if !vpool_s3::manifest::is_peer_address(&addr) {
        bail!("the peer link address {addr:?} is not HOST:PORT");
    }
    Ok(Some((l, addr)))
}

/// Opens the host: the pool in the home and every pool `host.json` lists.
/// The home held by another daemon is [`AlreadyRunning`].
async fn open_host(config: &DaemonConfig, peer: Option<String>) -> anyhow::Result<Arc<Host>> {
    let home = config.pool_dir.clone();
    let opener = DirOpener {
        pool_config: config.pool_config.clone(),
        peer,
        shared: std::sync::Mutex::new(Vec::new()),
    };
    let force = config.takeover;
    // Everything, including the drop on failure, on a blocking thread: an
    // S3 store owns a runtime that must not be dropped on this one's.
    tokio::task::spawn_blocking(move || {
        let default = opener.open_dir(&home, force, false)?;
        Host::open(&home, DEFAULT_POOL, default, Arc::new(opener))
            .map_err(|e| anyhow::anyhow!("{}", e.message))
    })
    .await
    .context("the host-open task failed")?
}

/// Opens pool directories for the [`Host`]: a local pool, or the cache of a
/// pool on S3 (with its store, uploader and cache), and prepares S3 caches.
struct DirOpener {
    pool_config: PoolConfig,
    /// The peer link's address, recorded in the leases this host takes.
    peer: Option<String>,
    /// The shared pools opened, by URL, with their connection to the
    /// bucket: the families of a shared pool run on its runtime, so a
    /// host's S3 threads grow with its shared pools, not with the volumes
    /// it owns. At most one entry per pool URL (`MAX_POOLS`).
    shared: std::sync::Mutex<Vec<SharedConn>>,
}

/// A shared pool as the families this host opens from it see it.
#[derive(Clone)]
struct SharedConn {
    url: String,
    remote: Arc<vpool_s3::Remote>,
    /// The pool's `--cache-size`, which the families this host owns share
    /// (`vpool_s3::CacheBudget`).
    budget: Arc<vpool_s3::CacheBudget>,
}

impl DirOpener {
    /// Opens the pool in `dir` with the error as the binary reports it
    /// (another daemon's home, a pool on S3 held elsewhere, a damaged log).
    /// `read_only`: a pool on S3 opened without its lease, whose engine
    /// runs no maintenance (a sealed template's family).
    fn open_dir(&self, dir: &Path, force: bool, read_only: bool) -> anyhow::Result<OpenedPool> {
        if crate::shared::is_shared_dir(dir)?.is_some() {
            bail!(
                "{} holds a shared pool, which cannot be a daemon's home pool: attach it to a daemon with `vpool pool attach NAME --s3 URL`",
                dir.display()
            );
        }
        let on = S3Parts {
            peer: self.peer.as_deref(),
            shared: &self
                .shared
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
            read_only,
        };
        let config = PoolConfig {
            // Nothing to clean or checkpoint in a pool nobody writes.
            background: self.pool_config.background && !read_only,
            ..self.pool_config.clone()
        };
        let (pool, _report, store, s3) = open_blocking(dir, config, force, on)?;
        let finish = || -> anyhow::Result<OpenedPool> {
            let catalog =
                Catalog::open(Arc::clone(&store)).context("loading the template records")?;
            catalog
                .reconcile(&pool)
                .map_err(|e| anyhow::anyhow!("{}", e.message))
                .context("reconciling the template records with the pool")?;
            let (cache, refresher) = match &s3 {
                Some(s) => {
                    let cache = Arc::new(S3Cache::open(pool.clone(), s.clone(), dir)?);
                    cache.refresh();
                    let r = cache.start_refresher()?;
                    (Some(cache as Arc<dyn CacheControl>), Some(r))
                }
                None => (None, None),
            };
            Ok(OpenedPool {
                pool: pool.clone(),
                catalog: Arc::new(catalog),
                kind: if s3.is_some() {
                    PoolKind::S3
                } else {
                    PoolKind::Local
                },
                cache,
                close_store: close_store(dir, s3.clone(), refresher),
            })
        };
        finish().inspect_err(|_| {
            let _ = pool.close();
            if let Some(s) = &s3 {
                s.close();
            }
        })
    }
}

impl Opener for DirOpener {
    fn open(&self, dir: &Path, force: bool) -> vpool_service::Result<Opened> {
        let shared = crate::shared::is_shared_dir(dir).map_err(service_error)?;
        match shared {
            Some(file) => {
                let name = crate::shared::pool_name(dir, &file);
                let store =
                    crate::shared::BucketShared::open(&name, file).map_err(service_error)?;
                let (url, remote, cache_size_bytes) = store.connection();
                let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
                // Families still open on a budget keep it: a pool opened
                // again shares the same host budget.
                let budget = shared
                    .iter()
                    .find(|c| c.url == url && c.budget.total_bytes() == cache_size_bytes)
                    .map(|c| Arc::clone(&c.budget))
                    .unwrap_or_else(|| {
                        vpool_s3::CacheBudget::new(
                            cache_size_bytes,
                            crate::s3pool::MIN_CACHE_SIZE_BYTES,
                        )
                    });
                shared.retain(|c| c.url != url);
                shared.push(SharedConn {
                    url,
                    remote,
                    budget,
                });
                Ok(Opened::Shared(Arc::new(store)))
            }
            None => self
                .open_dir(dir, force, false)
                .map(Opened::Pool)
                .map_err(service_error),
        }
    }

    fn open_read_only(&self, dir: &Path) -> vpool_service::Result<Opened> {
        self.open_dir(dir, false, true)
            .map(Opened::Pool)
            .map_err(service_error)
    }

    fn prepare_s3(
        &self,
        name: &str,
        dir: &Path,
        spec: &S3Spec,
        attach: bool,
        unsafe_single_host: bool,
    ) -> vpool_service::Result<()> {
        let settings = crate::s3pool::S3PoolSettings {
            spec: spec.clone(),
            cache_dir: dir.to_path_buf(),
        };
        crate::s3pool::check_settings(&settings)
            .map_err(|e| vpool_service::Error::invalid(format!("{e:#}")))?;
        let made = if attach {
            crate::s3pool::attach(Some(name), &settings)
        } else {
            crate::s3pool::create(Some(name), &settings, unsafe_single_host)
        };
        made.map(|_| ()).map_err(service_error)
    }

    fn discard_s3(&self, dir: &Path) {
        crate::s3pool::discard_attach(dir);
    }

    fn peer_addr(&self) -> Option<String> {
        self.peer.clone()
    }
}

/// What closes a pool's store after its engine: the cache's refresher
/// (it reads the pool), then for a pool on S3 the store, which uploads what
/// is left and releases the lease.
fn close_store(
    dir: &Path,
    s3: Option<S3Store>,
    refresher: Option<crate::cache::Refresher>,
) -> Box<dyn FnOnce() + Send> {
    let dir = dir.to_path_buf();
    Box::new(move || {
        if let Some(r) = refresher {
            r.stop();
        }
        match s3.as_ref().map(S3Store::close) {
            Some(true) => tracing::info!(
                pool = %dir.display(),
                "everything is in the object store; the pool's lease is released"
            ),
            Some(false) => tracing::warn!(
                pool = %dir.display(),
                "not everything reached the object store (or this daemon was fenced): what is left stays in the cache and goes up when the pool is next served from this directory"
            ),
            None => {}
        }
    })
}

/// An error of the binary's open path, as the service reports it: its kind
/// says what the host does with it (another daemon's home stops the host).
fn service_error(e: anyhow::Error) -> vpool_service::Error {
    use vpool_service::ErrorKind;
    let kind = if e.downcast_ref::<AlreadyRunning>().is_some() {
        ErrorKind::AlreadyExists
    } else if matches!(
        e.downcast_ref::<EngineError>(),
        Some(EngineError::Damaged(_))
    ) {
        ErrorKind::Corrupt
    } else {
        ErrorKind::Failed
    };
    vpool_service::Error::new(kind, format!("{e:#}"))
}

/// What [`open_blocking`] returns: the engine, its recovery report, the
/// store under it, and for a pool on S3 the store's own handle.
type OpenedParts = (Pool, RecoveryReport, Arc<dyn SegmentStore>, Option<S3Store>);

/// Opens the pool in `dir` (local, or on S3 by its pool.json) and recovers
/// it. Blocking: an S3 store owns a runtime that must not be dropped on an
/// async runtime's threads, including on failure.
/// What opening a pool on S3 takes from the host: its peer link address
/// (recorded in the lease) and the connections of its shared pools (a
/// family under one of their URLs runs on that pool's runtime).
#[derive(Default)]
struct S3Parts<'a> {
    peer: Option<&'a str>,
    shared: &'a [SharedConn],
    /// Open it read-only (`vpool_s3::OpenMode::ReadOnly`): a sealed
    /// template's family.
    read_only: bool,
}

fn open_blocking(
    dir: &Path,
    pool_config: PoolConfig,
    takeover: bool,
    on: S3Parts<'_>,
) -> anyhow::Result<OpenedParts> {
    let s3 = match PoolFile::load(dir)? {
        Some(file) => {
            tracing::info!(pool = %dir.display(), remote = %file.url, force = takeover, "opening the pool on object storage");
            let parent = on.shared.iter().find_map(|c| {
                let sub = file
                    .url
                    .strip_prefix(c.url.trim_end_matches('/'))?
                    .strip_prefix('/')?;
                Some((c.remote.child(sub), Arc::clone(&c.budget)))
            });
            let mode = if on.read_only {
                vpool_s3::OpenMode::ReadOnly
            } else {
                vpool_s3::OpenMode::Open { force: takeover }
            };
            Some(crate::s3pool::open_store(
                dir, &file, mode, on.peer, parent,
            )?)
        }
        None => {
            if takeover {
                tracing::warn!(pool = %dir.display(), "--force only applies to pools on S3; ignored for this local pool");
            }
            if crate::s3pool::looks_like_s3_cache(dir) {
                bail!(
                    "{} is the cache of a pool on S3 but its {} is missing; restore it (or `vpool pool attach` a new cache directory)",
                    dir.display(),
                    crate::s3pool::POOL_FILE
                );
            }
            None
        }
    };
    let store: Arc<dyn SegmentStore> = match &s3 {
        Some(s) => Arc::new(s.clone()),
        None => Arc::new(open_local_store(dir)?),
    };
    let (pool, report) = Pool::open(store.clone(), pool_config).map_err(|e| {
        let hint = matches!(e, EngineError::Damaged(_)).then_some(
            "; `vpool pool check` lists the damage, `vpool pool check --repair` opens the pool without what is lost",
        );
        anyhow::Error::new(e).context(format!(
            "recovering the pool at {}{}",
            dir.display(),
            hint.unwrap_or("")
        ))
    })?;
    if let Some(s) = &s3 {
        // Uploads start only now that recovery has cut any torn tail.
        if let Err(e) = s.start() {
            let _ = pool.close();
            let _ = s.close();
            return Err(anyhow::Error::new(e).context("starting the uploader"));
        }
    }
    Ok((pool, report, store, s3))
}

/// The directory of pool `pool` of the daemon whose home is `home`, read
/// from its `host.json` (for work on a pool while no daemon runs). The
/// default pool, or none named, is the home itself.
pub fn pool_dir_offline(home: &Path, pool: Option<&str>) -> anyhow::Result<PathBuf> {
    let Some(name) = pool.filter(|p| *p != DEFAULT_POOL) else {
        return Ok(home.to_path_buf());
    };
    vpool_service::host::listed_pools(home)
        .map_err(|e| anyhow::anyhow!("{}", e.message))?
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, dir)| dir)
        .ok_or_else(|| anyhow::anyhow!("no pool named {name} in {}", home.display()))
}

/// `vpool pool check` without a daemon: opens the pool in this process
/// (taking its lock, as `serve` does), checks it and closes it. A pool
/// whose recovery refuses to open (records lost in durable data) is
/// reported as such, unchanged, unless `repair`.
pub fn check_offline(dir: &Path, repair: bool) -> anyhow::Result<vpool_api::CheckResult> {
    if !dir.join("segments").is_dir() && PoolFile::load(dir)?.is_none() {
        bail!("no pool at {} (and no daemon serving one)", dir.display());
    }
    let config = PoolConfig {
        repair_damaged_log: repair,
        background: false,
        ..PoolConfig::default()
    };
    let (pool, report, _store, s3) = match open_blocking(dir, config, false, S3Parts::default()) {
        Ok(o) => o,
        Err(e) => match e.downcast_ref::<EngineError>() {
            Some(EngineError::Damaged(report)) => {
                return Ok(vpool_api::CheckResult {
                    recovery: report.damage.iter().cloned().map(Into::into).collect(),
                    ..Default::default()
                });
            }
            _ => return Err(e),
        },
    };
    let checked = pool.check(repair, &std::sync::atomic::AtomicBool::new(false));
    let closed = pool.close();
    drop(pool);
    if let Some(s) = &s3 {
        s.close();
    }
    let mut result: vpool_api::CheckResult = checked.context("checking the pool")?.into();
    closed.context("closing the pool")?;
    result.recovery = report.damage.into_iter().map(Into::into).collect();
    result.recovery_repaired = report.repaired;
    result.clean = result.clean && result.recovery.is_empty();
    Ok(result)
}

/// Opens the local pool directory `dir` (created if missing), taking its
/// lock.
fn open_local_store(dir: &Path) -> anyhow::Result<LocalDirStore> {
    match LocalDirStore::open(dir) {
        Ok(s) => Ok(s),
        Err(StoreError::Locked { path, lock_file }) => {
            let pid = std::fs::read_to_string(&lock_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            Err(AlreadyRunning {
                pool: path,
                lock_file,
                pid,
            }
            .into())
        }
        Err(e) => Err(anyhow::Error::new(e))
            .with_context(|| format!("opening the pool directory {}", dir.display())),
    }
}

/// Removes a socket file left by a daemon that died. Only called with the
/// pool's lock held, so no live daemon can own it. Anything that is not a
/// socket is left alone: deleting a user's file by mistake is worse than
/// failing to start.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            tracing::info!(socket = %path.display(), "removing the stale socket of a previous daemon");
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; move it away so the API socket can be created",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// Removes the API socket file when dropped: created by this daemon, it
/// goes with it on every way out of [`serve_pool`], so clients see "no
/// daemon" rather than "connection refused" once it is gone.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, socket = %self.0.display(), "could not remove the API socket");
        }
    }
}

/// The daemon's bound listeners, and the socket files that go with them.
struct Listeners {
    api_unix: UnixListener,
    api_tcp: Option<(TcpListener, AuthToken)>,
    nbd: Vec<(&'static str, vpool_nbd::Listener)>,
    ready: Ready,
    _socket_files: [SocketFile; 2],
}

/// Binds the API and NBD listeners. NBD listeners are bound before the API
/// answers, so a client that saw the API up (or the pool info's NBD
/// address) can connect at once.
async fn bind_listeners(config: &DaemonConfig) -> anyhow::Result<Listeners> {
    remove_stale_socket(&config.api_socket)?;
    let api_unix = UnixListener::bind(&config.api_socket)
        .with_context(|| format!("listening on {}", config.api_socket.display()))?;
    let api_file = SocketFile(config.api_socket.clone());
    std::fs::set_permissions(
        &config.api_socket,
        std::fs::Permissions::from_mode(API_SOCKET_MODE),
    )
    .with_context(|| format!("restricting {}", config.api_socket.display()))?;
    let mut api_tcp = None;
    let mut tcp_addr = None;
    if let Some(t) = &config.tcp {
        let l = TcpListener::bind(t.listen)
            .await
            .with_context(|| format!("listening on {}", t.listen))?;
        tcp_addr = Some(
            l.local_addr()
                .context("reading the TCP listener's address")?,
        );
        api_tcp = Some((l, t.token.clone()));
    }

    remove_stale_socket(&config.nbd_socket)?;
    let nbd_unix = std::os::unix::net::UnixListener::bind(&config.nbd_socket)
        .with_context(|| format!("listening for NBD on {}", config.nbd_socket.display()))?;
    let nbd_file = SocketFile(config.nbd_socket.clone());
    std::fs::set_permissions(
        &config.nbd_socket,
        std::fs::Permissions::from_mode(NBD_SOCKET_MODE),
    )
    .with_context(|| format!("restricting {}", config.nbd_socket.display()))?;
    let mut nbd: Vec<(&'static str, vpool_nbd::Listener)> =
        vec![("NBD (unix socket)", nbd_unix.into())];
    let mut nbd_tcp_addr = None;
    if let Some(addr) = config.nbd_tcp {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("listening for NBD on {addr}"))?;
        nbd_tcp_addr = Some(
            l.local_addr()
                .context("reading the NBD listener's address")?,
        );
        nbd.push(("NBD (tcp)", l.into()));
    }
    let ready = Ready {
        api_socket: config.api_socket.clone(),
        tcp_addr,
        nbd_socket: config.nbd_socket.clone(),
        nbd_tcp_addr,
        peer_addr: None,
    };
    Ok(Listeners {
        api_unix,
        api_tcp,
        nbd,
        ready,
        _socket_files: [api_file, nbd_file],
    })
}

/// The servers' tasks, each naming its listener when it ends.
type Servers = JoinSet<(&'static str, anyhow::Result<()>)>;

/// Starts one NBD server per listener: the vpool-nbd server runs on plain
/// threads, so each gets a blocking task and a shutdown signal fired when
/// `stop_rx` flips.
fn spawn_nbd(
    servers: &mut Servers,
    listeners: Vec<(&'static str, vpool_nbd::Listener)>,
    host: &Arc<Host>,
    (nbd_config, io_metrics): (&vpool_nbd::ServerConfig, bool),
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let exports = HostExports::new(Arc::clone(host)).counting_io(io_metrics);
    let registry: Arc<dyn vpool_nbd::ExportRegistry> = Arc::new(exports);
    for (name, listener) in listeners {
        let signal =
            vpool_nbd::ShutdownSignal::new().context("creating the NBD shutdown signal")?;
        let trigger = signal.clone();
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = rx.wait_for(|stop| *stop).await;
            trigger.trigger();
        });
        let registry = registry.clone();
        let nbd_config = nbd_config.clone();
        servers.spawn(async move {
            let r = tokio::task::spawn_blocking(move || {
                vpool_nbd::run(listener, registry, nbd_config, signal)
            })
            .await;
            let r = match r {
                Ok(r) => r.map_err(anyhow::Error::new),
                Err(e) => Err(anyhow::Error::new(e)),
            };
            (name, r)
        });
    }
    Ok(())
}

async fn serve_host(
    config: &DaemonConfig,
    host: &Arc<Host>,
    shutdown: impl Future<Output = ()>,
    on_ready: impl FnOnce(&Ready),
) -> anyhow::Result<()> {
    let listeners = bind_listeners(config).await?;
    // Every listener waits on this; flipping it to true starts a graceful
    // shutdown of all of them at once.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut servers = Servers::new();
    let state = ApiState::for_host(Arc::clone(host))
        .with_nbd_tcp_addr(listeners.ready.nbd_tcp_addr)
        .with_limits(config.api_limits.clone());
    servers.spawn({
        let fut = serve_unix(listeners.api_unix, state.clone(), stopped(stop_rx.clone()));
        async move { ("API (unix socket)", fut.await.map_err(anyhow::Error::new)) }
    });
    if let Some((listener, token)) = listeners.api_tcp {
        let fut = serve_tcp(listener, state.clone(), token, stopped(stop_rx.clone()));
        servers.spawn(async move { ("API (tcp)", fut.await.map_err(anyhow::Error::new)) });
    }
    spawn_nbd(
        &mut servers,
        listeners.nbd,
        host,
        (&config.nbd_config, config.io_metrics),
        &stop_rx,
    )?;

    let ready = &listeners.ready;
    tracing::info!(
        pool = %config.pool_dir.display(),
        socket = %ready.api_socket.display(),
        tcp = ?ready.tcp_addr,
        nbd = %ready.nbd_socket.display(),
        nbd_tcp = ?ready.nbd_tcp_addr,
        "vpool daemon ready"
    );
    on_ready(ready);
    let result = run_until_stopped(&mut servers, shutdown).await;
    let _ = stop_tx.send(true);
    drain(servers).await;
    result
}

/// Waits for `shutdown`, or for a server to end (which none does on its
/// own: that is a failure, and the others are stopped too).
async fn run_until_stopped(
    servers: &mut Servers,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutting down: no new connections; finishing requests in flight");
            Ok(())
        }
        Some(ended) = servers.join_next() => {
            let err = match ended {
                Ok((name, Ok(()))) => anyhow::anyhow!("the {name} server stopped unexpectedly"),
                Ok((name, Err(e))) => e.context(format!("the {name} server failed")),
                Err(e) => anyhow::Error::new(e).context("a server task failed"),
            };
            tracing::error!(error = format!("{err:#}"), "shutting down");
            Err(err)
        }
    }
}

/// Lets the stopping servers finish the requests in flight, for at most
/// [`SHUTDOWN_GRACE`].
async fn drain(mut servers: Servers) {
    let all = async {
        while let Some(ended) = servers.join_next().await {
            match ended {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(e))) => {
                    tracing::error!(error = %e, "the {name} server failed while stopping")
                }
                Err(e) => tracing::error!(error = %e, "a server task failed while stopping"),
            }
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, all).await.is_err() {
        tracing::warn!(
            grace_s = SHUTDOWN_GRACE.as_secs(),
            "requests still in flight after the grace period; closing the pool anyway"
        );
        servers.abort_all();
    }
}
