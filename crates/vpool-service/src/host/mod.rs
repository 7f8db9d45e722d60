//! [`Host`]: the pools one daemon holds.
//!
//! A host has a *home* directory (`$VPOOL_HOME`), which is also the
//! directory of its default pool (named `local` for a local pool): a home
//! made by an earlier, single-pool vpool opens as it is. The other pools it
//! holds are listed in `<home>/host.json` (`{"version": 1, "pools": [{"name":
//! "cold", "dir": "/var/cache/vpool/cold"}]}`), each a pool directory of its
//! own: a local pool, or the cache of a pool on S3 (with its `pool.json`).
//! They are opened at start, in the order listed; one that cannot be (its
//! bucket unreachable, its lease held elsewhere, its log damaged) is kept
//! with its state and the reason, and its volumes answer with that reason
//! until it is opened by hand ([`Host::open_pool`]). The home's own pool is
//! different: it is the daemon's identity (its lock says which daemon owns
//! the home), so if it cannot be opened the daemon does not start.
//!
//! Pools are added (created or taken over from a directory) and detached
//! at runtime; `host.json` is replaced atomically after each change, under
//! one administrative lock, so the file always lists what the host holds.
//!
//! How a directory becomes an open pool (local or S3, recovery, the cache)
//! is the [`Opener`]'s business.

mod copy;
mod exports;
mod file;
mod forward;
mod moving;
mod opening;
mod peers;
mod replica;
mod route;
mod schedule;
mod scrape;
mod shared;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use vpool_engine::Pool;

use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};
use crate::exports::PoolExports;
use crate::pool::PoolService;

pub use exports::HostExports;
pub use file::{HOST_FILE, listed_pools};
pub use forward::ForwardDevice;
pub use peers::HostPeers;
pub use replica::{ReplicaSpec, ReplicaStatus, utc_text};
pub use schedule::{ScheduleInfo, ScheduleSpec};
pub use shared::{FamilyOwner, MAX_OWNED, SharedCtx, SharedStore, SharedVolumeStatus};
/// Most pools a host holds (each holds a lock, descriptors, threads).
pub const MAX_POOLS: usize = 64;

/// What kind of backend a pool has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    Local,
    S3,
    /// On S3, attached by many hosts, each volume owned by one of them.
    Shared,
}

impl PoolKind {
    /// Its name on the wire and in tables: `local`, `s3`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolKind::Local => "local",
            PoolKind::S3 => "s3",
            PoolKind::Shared => "shared",
        }
    }
}

/// A pool directory, opened: what the [`Opener`] returns.
pub struct OpenedPool {
    pub pool: Pool,
    pub catalog: Arc<Catalog>,
    pub kind: PoolKind,
    /// The host cache of a pool on S3.
    pub cache: Option<Arc<dyn crate::CacheControl>>,
    /// Closes what the engine does not own (an S3 store, a cache
    /// refresher), after the engine's close. Blocking.
    pub close_store: Box<dyn FnOnce() + Send>,
}

/// What an [`Opener`] made of a pool directory.
pub enum Opened {
    /// A pool (local or on S3), open.
    Pool(OpenedPool),
    /// A shared pool: its bucket; the volumes this host owns are opened
    /// from it.
    Shared(Arc<dyn SharedStore>),
}

/// Where a pool on S3 is and how its cache behaves (`pool create --s3`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Spec {
    /// `s3://BUCKET/PREFIX` (or `file:///DIR`).
    pub url: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// A file of `key = value` credentials; without it, the daemon's
    /// environment. Never the secrets themselves.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    pub cache_size_bytes: u64,
    #[serde(default)]
    pub seal_after_secs: Option<f64>,
    #[serde(default)]
    pub backpressure_timeout_secs: Option<f64>,
    #[serde(default)]
    pub read_timeout_secs: Option<f64>,
    /// How long another host waits for this host's lease to be renewed
    /// before it may take the pool over (default 30).
    #[serde(default)]
    pub lease_expire_secs: Option<f64>,
    /// A shared pool (`pool create --shared`): every host attaches it,
    /// each volume is owned by one host at a time. `pool attach` finds
    /// out by itself.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// What a FLUSH promises: `host` (the default: durable in this host's
    /// cache) or `remote` (durable in the bucket).
    #[serde(default)]
    pub durability: Option<String>,
}

/// Turns a pool directory into an open pool, and a directory into the
/// cache of a pool on S3. Blocking (recovery, the object store).
pub trait Opener: Send + Sync {
    /// Opens the pool in `dir`; `force` takes a pool on S3 over from the
    /// host that holds its lease (that host is fenced).
    fn open(&self, dir: &Path, force: bool) -> Result<Opened>;

    /// Makes `dir` the cache of a pool on S3 (writes its `pool.json`): a
    /// new pool, or with `attach` one that exists.
    fn prepare_s3(
        &self,
        name: &str,
        dir: &Path,
        spec: &S3Spec,
        attach: bool,
        unsafe_single_host: bool,
    ) -> Result<()>;

    /// Undoes [`Opener::prepare_s3`] with `attach` for a cache that was
    /// never opened. Best effort.
    fn discard_s3(&self, dir: &Path);

    /// This daemon's peer link address, which the leases it takes record
    /// (`None`: it serves no peer link).
    fn peer_addr(&self) -> Option<String> {
        None
    }

    /// Opens the pool on S3 in `dir` read-only: no lease, nothing written
    /// to the bucket (a sealed template's family).
    fn open_read_only(&self, dir: &Path) -> Result<Opened> {
        Err(Error::new(
            ErrorKind::NotSupported,
            format!("{} cannot be opened read-only here", dir.display()),
        ))
    }
}

/// An open pool and everything served from it.
pub struct PoolCtx {
    pub name: String,
    pub dir: PathBuf,
    pub kind: PoolKind,
    pub service: Arc<PoolService>,
    pub exports: Arc<PoolExports>,
    pub cache: Option<Arc<dyn crate::CacheControl>>,
    close_store: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl PoolCtx {
    /// Whether volume `name` is still the one of id `id` (not deleted, nor
    /// made again under its name): what a record naming it by id asks.
    pub fn has_volume(&self, name: &str, id: u64) -> bool {
        self.service.volume(name).is_ok_and(|v| v.info.id.0 == id)
    }

    fn new(name: &str, dir: &Path, opened: OpenedPool) -> PoolCtx {
        let OpenedPool {
            pool,
            catalog,
            kind,
            cache,
            close_store,
        } = opened;
        let exports = Arc::new(PoolExports::new(pool.clone(), Arc::clone(&catalog)));
        PoolCtx {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            kind,
            service: Arc::new(PoolService::new(pool, catalog)),
            exports,
            cache,
            close_store: Mutex::new(Some(close_store)),
        }
    }

    /// Closes the pool (a final checkpoint), then its store. Blocking;
    /// once only (later calls do nothing).
    pub fn close(&self) -> Result<()> {
        let Some(close_store) = self
            .close_store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return Ok(());
        };
        let closed = self.service.pool().close();
        close_store();
        if closed.is_ok() {
            tracing::info!(pool = %self.name, dir = %self.dir.display(), "pool closed");
        }
        closed.map_err(|e| Error::from(e).context(&format!("closing pool {}", self.name)))
    }
}

/// Where a pool stands.
#[derive(Clone)]
pub enum PoolState {
    Open(Arc<PoolCtx>),
    /// A shared pool, attached: the volumes this host owns are open.
    Shared(Arc<SharedCtx>),
    /// An attempt to open it runs (at start, a retry, or `pool open`).
    /// `last_error`: why the attempt before it failed.
    Opening {
        since: Instant,
        last_error: Option<String>,
    },
    /// Not open: why, the kind of that error, how many attempts failed in
    /// a row, and when the host tries again by itself (`None`: only by
    /// hand, for what retrying cannot fix).
    Failed {
        reason: String,
        kind: ErrorKind,
        attempts: u32,
        retry_at: Option<Instant>,
    },
}

impl PoolState {
    /// `open`, `opening` or `failed`, and what a person needs to know
    /// about a pool that is not open.
    pub fn describe(&self) -> (&'static str, Option<String>) {
        match self {
            PoolState::Open(_) | PoolState::Shared(_) => ("open", None),
            PoolState::Opening { since, last_error } => {
                let secs = since.elapsed().as_secs();
                let why = match last_error {
                    Some(e) => format!("opening for {secs} s; the attempt before failed: {e}"),
                    None => format!("opening for {secs} s"),
                };
                ("opening", Some(why))
            }
            PoolState::Failed {
                reason, retry_at, ..
            } => {
                let next = match retry_at {
                    Some(at) => format!(
                        "; retried in {} s",
                        at.saturating_duration_since(Instant::now()).as_secs()
                    ),
                    None => String::new(),
                };
                ("failed", Some(format!("{reason}{next}")))
            }
        }
    }
}

impl PoolState {
    /// NBD connections to the pool's volumes (those owned here, for a
    /// shared pool); 0 when it is not open.
    pub fn nbd_connections(&self) -> usize {
        match self {
            PoolState::Open(ctx) => ctx.service.catalog().nbd_connections_total(),
            PoolState::Shared(sh) => sh
                .owned()
                .iter()
                .map(|f| f.service.catalog().nbd_connections_total())
                .sum(),
            _ => 0,
        }
    }

    /// Closes what is open (nothing for a pool that is not). Blocking.
    pub fn close(&self) -> Result<()> {
        match self {
            PoolState::Open(ctx) => ctx.close(),
            PoolState::Shared(sh) => sh.close(),
            _ => Ok(()),
        }
    }
}

/// A pool the host holds, open or not.
#[derive(Clone)]
pub struct PoolSlot {
    pub name: String,
    pub dir: PathBuf,
    pub state: PoolState,
    /// Which attempt to open the pool owns its state: an attempt records
    /// its outcome only if no other attempt (or a detach) came since.
    epoch: u64,
}

/// How long a starting daemon waits for its pools to open before it
/// resolves the moves a crash interrupted (those of pools not open by
/// then wait for the next start).
const MOVES_RESOLVE_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a stopping daemon waits for its jobs to stop.
const JOBS_STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The pools one daemon holds; see the module doc.
pub struct Host {
    home: PathBuf,
    default: String,
    opener: Arc<dyn Opener>,
    pools: RwLock<BTreeMap<String, PoolSlot>>,
    /// Serializes adding, detaching and opening pools, and writing
    /// `host.json`.
    admin: Mutex<()>,
    /// The next [`PoolSlot::epoch`].
    next_epoch: AtomicU64,
    /// Set by [`Host::close_all`]: no attempt to open a pool records its
    /// outcome after it, and the retries stop.
    closing: AtomicBool,
    /// The long operations running in the background (`vol copy`).
    pub jobs: Arc<crate::jobs::Jobs>,
    /// Where each served volume's I/O goes (`vol move`).
    routes: Arc<route::Routes>,
    /// The moves under way, and those a crash interrupted (`moves.json`).
    moves: Arc<moving::MovesFile>,
    /// The replications (`replicas.json`).
    replicas: Arc<replica::Replicas>,
    /// The snapshot schedules (`schedules.json`).
    schedules: schedule::Schedules,
    /// The I/O counters of every volume served (`GET /metrics`).
    meters: crate::metrics::Meters,
    /// The QoS buckets of every volume served (`vpool vol qos`).
    throttles: crate::qos::Throttles,
    /// The one writer of each volume served (`crate::writers`).
    writers: Arc<crate::writers::Writers>,
    /// Who has each image open (`crate::clients`).
    clients: Arc<crate::clients::Clients>,
}

impl Host {
    /// The host of `home`, whose own pool `default` is already open (the
    /// caller opened it: if the home's pool cannot be opened, the daemon
    /// does not start), and every pool `host.json` lists, being opened in
    /// the background: this waits for them up to [`opening::START_WAIT`],
    /// so a host with an unreachable bucket starts serving its other pools
    /// anyway. One that cannot be opened is kept with the reason and
    /// retried. Fails only if `host.json` cannot be read. Blocking.
    pub fn open(
        home: &Path,
        default: &str,
        default_pool: OpenedPool,
        opener: Arc<dyn Opener>,
    ) -> Result<Arc<Host>> {
        let checked = crate::names::check_pool_name(default)
            .and_then(|()| file::read_host_file(home))
            .and_then(|entries| match entries.iter().find(|e| e.name == default) {
                Some(e) => Err(Error::invalid(format!(
                    "{HOST_FILE} lists a pool named {default}, the name of the home's own pool ({})",
                    e.dir.display()
                ))),
                None => Ok(entries),
            })
            // Absolute, so the pools' default directories under it stay
            // where they are whatever the daemon's working directory.
            .and_then(|entries| {
                let home = std::path::absolute(home).map_err(|e| {
                    Error::internal(format!("the home directory {}: {e}", home.display()))
                })?;
                Ok((entries, home))
            });
        let (entries, home) = match checked {
            Ok(v) => v,
            Err(e) => {
                // Nobody else will close the home's pool: its final
                // checkpoint, and for a pool on S3 its uploads and lease.
                let _ = default_pool.pool.close();
                (default_pool.close_store)();
                return Err(e);
            }
        };
        let host = Arc::new(Host::new(&home, default, opener));
        let ctx = Arc::new(PoolCtx::new(default, &home, default_pool));
        host.insert(default, &home, PoolState::Open(ctx));
        for e in entries {
            host.insert(&e.name, &e.dir, opening::waiting());
        }
        opening::start(&host);
        let resolving = Arc::downgrade(&host);
        let spawned = std::thread::Builder::new()
            .name("moves-replicas".into())
            .spawn(move || {
                // Once the pools had their chance to open.
                if let Some(h) = resolving.upgrade() {
                    opening::wait_for_attempts(&h, MOVES_RESOLVE_WAIT);
                    h.resolve_moves();
                }
                replica::schedule(resolving);
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to resolve interrupted moves and run replications; moves are resolved at the next start");
        }
        Ok(host)
    }

    fn new(home: &Path, default: &str, opener: Arc<dyn Opener>) -> Host {
        Host {
            home: home.to_path_buf(),
            default: default.to_string(),
            opener,
            pools: RwLock::new(BTreeMap::new()),
            admin: Mutex::new(()),
            next_epoch: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            jobs: Arc::new(crate::jobs::Jobs::new()),
            routes: Arc::new(route::Routes::default()),
            moves: Arc::new(moving::MovesFile::load(home)),
            replicas: Arc::new(replica::Replicas::new(home)),
            schedules: schedule::Schedules::new(home),
            meters: crate::metrics::Meters::default(),
            throttles: crate::qos::Throttles::default(),
            writers: Arc::default(),
            clients: Arc::default(),
        }
    }

    /// A host of one already open pool, with no home and no way to add
    /// pools (tests, and an API served over a single pool).
    pub fn single(
        name: &str,
        pool: Pool,
        catalog: Arc<Catalog>,
        cache: Option<Arc<dyn crate::CacheControl>>,
    ) -> Host {
        let opened = OpenedPool {
            pool,
            catalog,
            kind: if cache.is_some() {
                PoolKind::S3
            } else {
                PoolKind::Local
            },
            cache,
            close_store: Box::new(|| {}),
        };
        let host = Host::new(Path::new(""), name, Arc::new(NoOpener));
        let ctx = Arc::new(PoolCtx::new(name, Path::new(""), opened));
        host.insert(name, Path::new(""), PoolState::Open(ctx));
        host
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Where a pool added without a directory goes: `<home>/pools/NAME`.
    pub fn default_dir(&self, name: &str) -> PathBuf {
        self.home.join("pools").join(name)
    }

    /// Adds a pool on S3 (new, or with `attach` one that exists) with its
    /// cache in `dir`. Blocking.
    pub fn add_s3_pool(
        &self,
        name: &str,
        dir: &Path,
        spec: &S3Spec,
        attach: bool,
        unsafe_single_host: bool,
    ) -> Result<PoolState> {
        crate::names::check_pool_name(name)?;
        check_absolute(dir)?;
        if self.read_pools().contains_key(name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("this host already has a pool named {name}"),
            ));
        }
        self.opener
            .prepare_s3(name, dir, spec, attach, unsafe_single_host)?;
        self.add_pool(name, dir).map_err(|e| {
            if attach {
                // Nothing was taken: leave the directory as it was, so the
                // same command can be run again.
                self.opener.discard_s3(dir);
                return e;
            }
            let dir = dir.display();
            e.context(&format!(
                "the pool was made in the bucket, with its cache in {dir}, but could not be opened; `vpool pool create {name} --dir {dir}` opens it"
            ))
        })
    }

    /// The name of the default pool (bare volume names mean it).
    pub fn default_name(&self) -> &str {
        &self.default
    }

    fn insert(&self, name: &str, dir: &Path, state: PoolState) {
        let slot = self.new_slot(name, dir, state);
        self.write_pools().insert(name.to_string(), slot);
    }

    /// [`Host::insert`], unless the host is closing (checked under the
    /// pools' lock, which `close_all` takes to list what it closes).
    fn insert_unless_closing(&self, name: &str, dir: &Path, state: PoolState) -> bool {
        let mut pools = self.write_pools();
        if self.closing.load(Ordering::SeqCst) {
            return false;
        }
        pools.insert(name.to_string(), self.new_slot(name, dir, state));
        true
    }

    /// A slot for pool `name` in `state`, under a new epoch.
    fn new_slot(&self, name: &str, dir: &Path, state: PoolState) -> PoolSlot {
        PoolSlot {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            state,
            epoch: self.next_epoch.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn read_pools(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, PoolSlot>> {
        self.pools.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_pools(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, PoolSlot>> {
        self.pools.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Every pool the host holds, the default first, then by name.
    pub fn pools(&self) -> Vec<PoolSlot> {
        let pools = self.read_pools();
        let mut out: Vec<PoolSlot> = pools.values().cloned().collect();
        out.sort_by_key(|s| (s.name != self.default, s.name.clone()));
        out
    }

    /// The open pool `name` (`None`: the default pool).
    pub fn pool(&self, name: Option<&str>) -> Result<Arc<PoolCtx>> {
        let name = name.unwrap_or(&self.default);
        let pools = self.read_pools();
        match pools.get(name).map(|s| &s.state) {
            Some(PoolState::Open(ctx)) => Ok(Arc::clone(ctx)),
            Some(PoolState::Shared(_)) => Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "pool {name} is a shared pool: each of its volumes is a pool of its own, addressed as {name}/VOLUME"
                ),
            )),
            Some(PoolState::Failed { reason, .. }) => Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "pool {name} is not open: {reason}; open it with `vpool pool open {name}` (with --force to take a pool on S3 over)"
                ),
            )),
            Some(PoolState::Opening { since, .. }) => Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "pool {name} is not open yet: it has been opening for {} s (`vpool pool list` shows when it is open)",
                    since.elapsed().as_secs()
                ),
            )),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no pool named {name:?} on this host (`vpool pool list`)"),
            )),
        }
    }

    /// The shared pool `name` (`None`: the default pool), if it is one
    /// and attached.
    pub fn shared(&self, name: Option<&str>) -> Option<Arc<SharedCtx>> {
        let name = name.unwrap_or(&self.default);
        match self.read_pools().get(name).map(|s| &s.state) {
            Some(PoolState::Shared(sh)) => Some(Arc::clone(sh)),
            _ => None,
        }
    }

    /// The open pool that holds volume `volume` of pool `pool` (`None`:
    /// the default pool): the pool itself, or for a shared pool the
    /// volume's family if this host owns it (`not_owner` if not).
    pub fn volume_pool(&self, pool: Option<&str>, volume: &str) -> Result<Arc<PoolCtx>> {
        match self.shared(pool) {
            Some(sh) => sh.family(volume),
            None => self.pool(pool),
        }
    }

    /// The shared pool `name`, or an error that says it is not one.
    pub fn need_shared(&self, name: Option<&str>) -> Result<Arc<SharedCtx>> {
        self.shared(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotSupported,
                format!(
                    "pool {} is not a shared pool (or not open); only a shared pool's volumes move between hosts",
                    name.unwrap_or(&self.default)
                ),
            )
        })
    }

    /// Creates volume `volume` in shared pool `pool`; this host owns it.
    /// Blocking.
    pub fn create_shared_volume(
        &self,
        pool: &SharedCtx,
        volume: &str,
        size_bytes: u64,
        durability: Option<&str>,
    ) -> Result<crate::pool::VolumeView> {
        pool.create_volume(&*self.opener, volume, size_bytes, durability)
    }

    /// Makes this host the owner of volume `volume` of shared pool `pool`
    /// (see [`SharedCtx::takeover`]). Blocking.
    pub fn takeover_volume(&self, pool: &str, volume: &str, force: bool) -> Result<()> {
        let sh = self.need_shared(Some(pool))?;
        sh.takeover(&*self.opener, volume, force).map(|_| ())
    }

    /// Gives volume `volume` of shared pool `pool` up (see
    /// [`SharedCtx::release`]). Blocking.
    pub fn release_volume(&self, pool: Option<&str>, volume: &str, force: bool) -> Result<()> {
        let sh = self.need_shared(pool)?;
        sh.release(&*self.opener, volume, force)
    }

    /// A clone `new` of `volume@snapshot` (or of template `volume`'s
    /// image) in the same pool. In a shared pool, only of a sealed
    /// template, as a volume of its own (see [`SharedCtx::clone_volume`]).
    /// Blocking.
    pub fn clone_volume(
        &self,
        pool: Option<&str>,
        volume: &str,
        snapshot: Option<&str>,
        new: &str,
    ) -> Result<crate::pool::VolumeView> {
        let Some(sh) = self.shared(pool) else {
            return self
                .volume_pool(pool, volume)?
                .service
                .clone_volume(volume, snapshot, new);
        };
        if let Some(s) = snapshot.filter(|s| *s != crate::catalog::TEMPLATE_SNAPSHOT) {
            return Err(Error::invalid(format!(
                "a shared pool clones sealed templates only, not snapshots ({volume}@{s}): seal a volume with `vpool vol template` and clone it"
            )));
        }
        sh.clone_volume(&*self.opener, volume, new)
    }

    /// Makes clone `volume` independent of what it was cloned from: in a
    /// shared pool, of its template (see [`SharedCtx::flatten`]), else of
    /// its parent in its pool. Blocking (copies data).
    pub fn flatten_volume(
        &self,
        pool: Option<&str>,
        volume: &str,
    ) -> Result<crate::pool::Flattened> {
        match self.shared(pool) {
            Some(sh) => sh.flatten(volume),
            None => self.volume_pool(pool, volume)?.service.flatten(volume),
        }
    }

    /// Whether `volume` of `pool` is a clone of a shared pool's template
    /// that this host opened.
    pub fn is_shared_clone(&self, pool: Option<&str>, volume: &str) -> bool {
        self.shared(pool).is_some_and(|sh| sh.is_clone(volume))
    }

    /// Seals `volume` as a template: in a shared pool, for every host (see
    /// [`SharedCtx::seal`]), else in its pool. Blocking (hashes the image).
    pub fn make_template(
        &self,
        pool: Option<&str>,
        volume: &str,
    ) -> Result<crate::pool::VolumeView> {
        match self.shared(pool) {
            Some(sh) => sh.seal(&*self.opener, volume),
            None => self.pool(pool)?.service.make_template(volume),
        }
    }

    /// Adds the pool in `dir` (a new local pool is made there if the
    /// directory is empty or missing; an existing pool directory, local or
    /// an S3 cache, opens as it is) under `name`, and records it. Blocking.
    pub fn add_pool(&self, name: &str, dir: &Path) -> Result<PoolState> {
        crate::names::check_pool_name(name)?;
        check_absolute(dir)?;
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        {
            let pools = self.read_pools();
            if pools.contains_key(name) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("this host already has a pool named {name}"),
                ));
            }
            if let Some(other) = pools.values().find(|s| same_dir(&s.dir, dir)) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("{} is already pool {}", dir.display(), other.name),
                ));
            }
            if pools.len() >= MAX_POOLS {
                return Err(Error::invalid(format!(
                    "a host holds at most {MAX_POOLS} pools"
                )));
            }
        }
        if self.closing.load(Ordering::SeqCst) {
            return Err(stopping());
        }
        let state = self.state_of(name, dir, self.opener.open(dir, false)?);
        if !self.insert_unless_closing(name, dir, state.clone()) {
            // The daemon began to stop while the pool opened: close it
            // here, as `close_all` will not see it.
            let _ = state.close();
            return Err(stopping());
        }
        if let Err(e) = self.save() {
            self.write_pools().remove(name);
            let _ = state.close();
            return Err(e);
        }
        tracing::info!(pool = name, dir = %dir.display(), "pool added");
        Ok(state)
    }

    /// What an opened directory becomes in a slot (a shared pool opens the
    /// volumes it owned here again). Blocking.
    fn state_of(&self, name: &str, dir: &Path, opened: Opened) -> PoolState {
        match opened {
            Opened::Pool(p) => PoolState::Open(Arc::new(PoolCtx::new(name, dir, p))),
            Opened::Shared(store) => {
                PoolState::Shared(Arc::new(SharedCtx::open(name, dir, store, &*self.opener)))
            }
        }
    }

    /// Closes pool `name` (for a pool on S3: uploads what is left and
    /// releases its lease) and forgets it; its data stays. The default pool
    /// cannot be detached. Refused while NBD clients have its volumes open,
    /// unless `force` (their I/O fails from then on). Blocking.
    pub fn detach_pool(&self, name: &str, force: bool) -> Result<()> {
        if name == self.default {
            return Err(Error::invalid(format!(
                "{name} is this host's default pool (its home): it cannot be detached"
            )));
        }
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        // The count is taken before the pools' write lock: the catalog's
        // lock can be held across engine work, and every request waits for
        // the pools' lock. An NBD client that connects between the count
        // and the removal gets an error at its first request (the pool is
        // closed under it), as with `force`.
        let state = match self.read_pools().get(name) {
            Some(s) => s.state.clone(),
            None => return Err(no_such_pool(name)),
        };
        // A job's clean-up needs its pools (even with force).
        let jobs = self.jobs.running_in(name);
        if !jobs.is_empty() {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "detach refused: job(s) {jobs:?} work in pool {name}; `vpool job cancel` them or wait for them (`vpool job list`)"
                ),
            ));
        }
        {
            let n = state.nbd_connections();
            if n > 0 && !force {
                return Err(Error::new(
                    ErrorKind::InUse,
                    format!(
                        "detach refused: pool {name} has {n} NBD client connection(s) to its volumes, whose disks would fail; disconnect them first (or ask with force=true)"
                    ),
                ));
            }
        }
        // Opens and adds hold the admin lock too, so the slot is still
        // there (a background attempt may have changed its state).
        let slot = self
            .write_pools()
            .remove(name)
            .ok_or_else(|| no_such_pool(name))?;
        if let Err(e) = self.save() {
            // Put it back. An attempt to open it that ended meanwhile found
            // no slot and closed what it opened: the pool waits for its
            // next attempt rather than stay `Opening` with no owner.
            let state = match slot.state {
                PoolState::Opening { .. } => opening::waiting(),
                s => s,
            };
            self.insert(name, &slot.dir, state);
            return Err(e);
        }
        slot.state.close()?;
        tracing::info!(pool = name, dir = %slot.dir.display(), force, "pool detached");
        Ok(())
    }

    /// Opens pool `name` now, after it failed to open (`force`: take a
    /// pool on S3 over from the host that holds it). An open pool is left
    /// as it is; one being opened is refused (the attempt under way
    /// decides). Blocking.
    pub fn open_pool(&self, name: &str, force: bool) -> Result<PoolState> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let (dir, epoch, attempts) = match opening::claim(self, name)? {
            opening::Claim::Open(state) => return Ok(state),
            opening::Claim::Mine {
                dir,
                epoch,
                attempts,
            } => (dir, epoch, attempts),
        };
        match opening::attempt(self, name, &dir, epoch, attempts, force) {
            s @ (PoolState::Open(_) | PoolState::Shared(_)) => Ok(s),
            PoolState::Failed { reason, kind, .. } => Err(Error::new(kind, reason)),
            PoolState::Opening { .. } => Err(Error::internal(format!(
                "pool {name}: an attempt to open it ended without an outcome"
            ))),
        }
    }

    /// Closes every open pool (at shutdown), after waiting a little for the
    /// attempts to open pools that are under way (one that finishes later
    /// closes what it opened). Blocking. Returns the first error, after
    /// trying them all.
    pub fn close_all(&self) -> Result<()> {
        self.closing.store(true, Ordering::SeqCst);
        // A job stops at its next step and undoes what it did, while its
        // pools are still open.
        self.jobs.cancel_all(JOBS_STOP_WAIT);
        // An add, open or detach under way finishes first (an add that
        // ends after this closes its own pool: see `insert_unless_closing`).
        let _admin = self.lock_admin_for(opening::STOP_WAIT);
        opening::wait_for_attempts(self, opening::STOP_WAIT);
        let mut first = None;
        for slot in self.pools() {
            if let Err(e) = slot.state.close() {
                tracing::error!(pool = %slot.name, error = %e.message, "closing the pool failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Host {
    /// The open pool (for a shared pool, the volume's own) that serves
    /// `volume` of `pool` here.
    pub(crate) fn serving_pool(&self, pool: Option<&str>, volume: &str) -> Result<Arc<PoolCtx>> {
        match self.shared(pool) {
            Some(sh) => sh.family(volume),
            None => self.volume_pool(pool, volume),
        }
    }

    /// The NBD client that writes volume `volume` (id `id`) of pool
    /// `pool` here, and since when, for `vol info`.
    pub fn volume_writer(&self, pool: &str, volume: &str, id: u64) -> Option<String> {
        let (peer, for_) = self.writers.writer_of((pool, volume, id))?;
        Some(format!("{peer} (for {} s)", for_.as_secs()))
    }

    /// The NBD connections to `volume` of `pool` (`None`: the default
    /// pool) and its snapshots on this host, oldest first.
    pub fn volume_clients(
        &self,
        pool: Option<&str>,
        volume: &str,
    ) -> Vec<crate::clients::ClientInfo> {
        self.clients.of(pool.unwrap_or(&self.default), volume)
    }

    /// The NBD connections to every volume of `pool` here, by volume.
    pub fn pool_clients(
        &self,
        pool: Option<&str>,
    ) -> std::collections::HashMap<String, Vec<crate::clients::ClientInfo>> {
        self.clients.of_pool(pool.unwrap_or(&self.default))
    }

    /// Lets several NBD clients write `volume` of `pool` at once (or one at
    /// a time again): kept in its pool; clients waiting to write are let in.
    pub fn set_multi_writer(
        &self,
        pool: Option<&str>,
        volume: &str,
        on: bool,
    ) -> Result<crate::pool::VolumeView> {
        let ctx = self.serving_pool(pool, volume)?;
        let view = ctx.service.set_multi_writer(volume, on)?;
        let name = pool.unwrap_or(&self.default);
        self.writers.set_shared((name, volume, view.info.id.0), on);
        tracing::info!(
            pool = name,
            volume,
            multi_writer = on,
            "several writers {}",
            if on { "allowed" } else { "refused" }
        );
        Ok(view)
    }

    /// Renames `volume` of `pool` to `new` (`vpool vol rename`): its data,
    /// snapshots, clones, records and schedules go with it. Refused while
    /// NBD clients have it open, while it moves, for a volume that is
    /// replicated or is a replica (their records name it: `replica remove`
    /// first), and in a shared pool (its name is its objects' key there).
    pub fn rename_volume(
        &self,
        pool: Option<&str>,
        volume: &str,
        new: &str,
    ) -> Result<crate::pool::VolumeView> {
        let (name, ctx) = self.renamable(pool, volume, "rename")?;
        let view = ctx.service.rename_volume(volume, new)?;
        tracing::info!(pool = name, volume, new, "volume renamed");
        if let Err(e) = self.schedules.rename(name, volume, view.info.id.0, new) {
            // The rename stands; each schedule follows the volume's id at
            // its next run.
            tracing::warn!(pool = name, volume, new, error = %e.message, "renamed, but its snapshot schedules still name the old name until their next run");
        }
        Ok(view)
    }

    /// Moves `volume` of `pool` to the pool's trash (`vpool vol trash mv`;
    /// [`crate::trash`]). Refused as a rename is, and while it has
    /// snapshot schedules (they would snapshot a volume nobody sees).
    pub fn trash_volume(
        &self,
        pool: Option<&str>,
        volume: &str,
        expire_secs: Option<u64>,
    ) -> Result<crate::trash::TrashEntry> {
        let (name, ctx) = self.renamable(pool, volume, "moving to the trash")?;
        if self.schedules.names(name, volume)? {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "volume {name}/{volume} has snapshot schedules: `vpool schedule remove` them first"
                ),
            ));
        }
        let entry = ctx.service.trash_volume(volume, expire_secs)?;
        tracing::info!(
            pool = name,
            volume,
            id = entry.id,
            "volume moved to the trash"
        );
        Ok(entry)
    }

    /// Takes volume `id` out of `pool`'s trash, as `new_name` or its old name.
    pub fn trash_restore(
        &self,
        pool: Option<&str>,
        id: u64,
        new_name: Option<&str>,
    ) -> Result<crate::pool::VolumeView> {
        let view = self.pool(pool)?.service.restore_volume(id, new_name)?;
        let pool = pool.unwrap_or(&self.default);
        tracing::info!(pool, volume = %view.info.name, id, "volume restored from the trash");
        Ok(view)
    }

    /// Deletes volume `id` of `pool`'s trash for good.
    pub fn trash_remove(&self, pool: Option<&str>, id: u64) -> Result<crate::trash::TrashEntry> {
        let entry = self.pool(pool)?.service.remove_trashed(id)?;
        let pool = pool.unwrap_or(&self.default);
        tracing::info!(pool, volume = %entry.name, id, "volume deleted from the trash");
        Ok(entry)
    }

    /// Deletes for good what went to `pool`'s trash at least
    /// `older_than_secs` ago (but volumes whose snapshots have clones).
    pub fn trash_purge(
        &self,
        pool: Option<&str>,
        older_than_secs: u64,
    ) -> Result<crate::trash::PurgeReport> {
        let before = crate::jobs::unix_ms().saturating_sub(older_than_secs.saturating_mul(1000));
        let report = self.pool(pool)?.service.purge_trash(before)?;
        let pool = pool.unwrap_or(&self.default);
        for e in &report.purged {
            tracing::info!(pool, volume = %e.name, id = e.id, "volume purged from the trash");
        }
        Ok(report)
    }

    /// Deletes what expired in the trash of every open pool (the
    /// scheduler's tick runs it).
    pub(super) fn purge_expired_trash(&self) {
        let now = crate::jobs::unix_ms();
        for slot in self.pools() {
            let PoolState::Open(ctx) = slot.state else {
                continue;
            };
            let expired = (ctx.service.catalog().trashed().values())
                .any(|r| r.expires_unix_ms.is_some_and(|e| e <= now));
            if !expired {
                continue;
            }
            match ctx.service.purge_expired(now) {
                Ok(r) => {
                    for e in &r.purged {
                        tracing::info!(pool = %slot.name, volume = %e.name, id = e.id, "expired: deleted from the trash");
                    }
                }
                Err(e) => {
                    tracing::warn!(pool = %slot.name, error = %e.message, "could not purge the trash")
                }
            }
        }
    }

    /// The pool (its name and context) where `volume` may change its name:
    /// not a shared one, and not while replication names it.
    fn renamable<'a>(
        &'a self,
        pool: Option<&'a str>,
        volume: &str,
        what: &str,
    ) -> Result<(&'a str, Arc<PoolCtx>)> {
        if let Some(sh) = self.shared(pool) {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!(
                    "{what} in pool {} is not built: the pool is shared, and a volume's name keys its objects in the bucket",
                    sh.name
                ),
            ));
        }
        let name = pool.unwrap_or(&self.default);
        if self.moves.blocks(name, volume) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{what} refused: volume {name}/{volume} is named by a move a crash interrupted, which is not resolved yet (the daemon's log says more)"
                ),
            ));
        }
        if self.replicas.names(name, volume)? {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{what} refused: volume {name}/{volume} is replicated or is a replica, and the replication names it; `vpool replica remove` it first"
                ),
            ));
        }
        Ok((name, self.volume_pool(pool, volume)?))
    }

    /// Sets (or, empty, clears) the QoS limits of `volume` of `pool`: kept
    /// in its pool, applied at once to the devices open on it here.
    pub fn set_qos(
        &self,
        pool: Option<&str>,
        volume: &str,
        limits: &crate::qos::QosLimits,
    ) -> Result<crate::pool::VolumeView> {
        let ctx = self.serving_pool(pool, volume)?;
        let id = ctx.service.volume(volume)?.info.id.0;
        let name = pool.unwrap_or(&self.default);
        let view = self.throttles.update((name, volume, id), limits, || {
            ctx.service.set_qos(volume, limits)
        })?;
        tracing::info!(pool = name, volume, limits = ?limits, "QoS limits set");
        Ok(view)
    }

    /// The admin lock, waiting for it at most `limit` (`None` after that).
    fn lock_admin_for(&self, limit: std::time::Duration) -> Option<std::sync::MutexGuard<'_, ()>> {
        let deadline = Instant::now() + limit;
        loop {
            match self.admin.try_lock() {
                Ok(g) => return Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    tracing::warn!(
                        "a pool operation still runs after {limit:?}; closing the pools without waiting for it"
                    );
                    return None;
                }
            }
        }
    }
}

fn no_such_pool(name: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no pool named {name:?} on this host"),
    )
}

fn stopping() -> Error {
    Error::new(ErrorKind::Failed, "the daemon is stopping")
}

/// The opener of a [`Host::single`]: it has nothing to open.
struct NoOpener;

impl Opener for NoOpener {
    fn open(&self, dir: &Path, _force: bool) -> Result<Opened> {
        Err(Error::new(
            ErrorKind::NotSupported,
            format!(
                "this server holds one pool and opens no other ({})",
                dir.display()
            ),
        ))
    }

    fn prepare_s3(&self, _: &str, _: &Path, _: &S3Spec, _: bool, _: bool) -> Result<()> {
        Err(Error::new(
            ErrorKind::NotSupported,
            "this server holds one pool and adds no other",
        ))
    }

    fn discard_s3(&self, _: &Path) {}
}

/// Refuses a relative pool directory: it would mean another place when
/// the daemon restarts from another working directory.
fn check_absolute(dir: &Path) -> Result<()> {
    if dir.is_absolute() {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "the pool directory {} is not an absolute path",
            dir.display()
        )))
    }
}

/// Whether two paths name the same directory (after resolving them, when
/// they exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

impl Host {
    /// Writes `host.json`: every pool but the default.
    fn save(&self) -> Result<()> {
        let pools = self
            .pools()
            .into_iter()
            .filter(|s| s.name != self.default)
            .map(|s| (s.name, s.dir))
            .collect();
        file::write_host_file(&self.home, pools)
    }
}

#[cfg(test)]
mod tests;
