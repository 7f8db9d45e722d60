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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use vpool_engine::Pool;

use crate::catalog::Catalog;
use crate::error::{Error, ErrorKind, Result};
use crate::exports::PoolExports;
use crate::pool::PoolService;

/// The file in the home that lists the pools besides the default one.
pub const HOST_FILE: &str = "host.json";
/// Version of `host.json` this code writes and reads.
const HOST_FILE_VERSION: u32 = 1;
/// Most pools a host holds (each holds a lock, descriptors, threads).
pub const MAX_POOLS: usize = 64;

/// What kind of backend a pool has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PoolKind {
    Local,
    S3,
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
}

/// Turns a pool directory into an open pool, and a directory into the
/// cache of a pool on S3. Blocking (recovery, the object store).
pub trait Opener: Send + Sync {
    /// Opens the pool in `dir`; `force` takes a pool on S3 over from the
    /// host that holds its lease (that host is fenced).
    fn open(&self, dir: &Path, force: bool) -> Result<OpenedPool>;

    /// Makes `dir` the cache of a pool on S3 (writes its `pool.json`): a
    /// new pool, or with `attach` one that exists.
    fn prepare_s3(
        &self,
        dir: &Path,
        spec: &S3Spec,
        attach: bool,
        unsafe_single_host: bool,
    ) -> Result<()>;
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
    /// Could not be opened: why, and the kind of that error.
    Failed {
        reason: String,
        kind: ErrorKind,
    },
}

/// A pool the host holds, open or not.
#[derive(Clone)]
pub struct PoolSlot {
    pub name: String,
    pub dir: PathBuf,
    pub state: PoolState,
}

#[derive(Serialize, Deserialize)]
struct HostFile {
    version: u32,
    pools: Vec<PoolEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PoolEntry {
    name: String,
    dir: PathBuf,
}

/// The pools one daemon holds; see the module doc.
pub struct Host {
    home: PathBuf,
    default: String,
    opener: Arc<dyn Opener>,
    pools: RwLock<BTreeMap<String, PoolSlot>>,
    /// Serializes adding, detaching and opening pools, and writing
    /// `host.json`.
    admin: Mutex<()>,
}

impl Host {
    /// The host of `home`, whose own pool `default` is already open (the
    /// caller opened it: if the home's pool cannot be opened, the daemon
    /// does not start), and every pool `host.json` lists, opened now; one
    /// that cannot be is kept with the reason. Fails only if `host.json`
    /// cannot be read. Blocking.
    pub fn open(
        home: &Path,
        default: &str,
        default_pool: OpenedPool,
        opener: Arc<dyn Opener>,
    ) -> Result<Host> {
        crate::names::check_pool_name(default)?;
        let entries = read_host_file(home)?;
        let host = Host {
            home: home.to_path_buf(),
            default: default.to_string(),
            opener,
            pools: RwLock::new(BTreeMap::new()),
            admin: Mutex::new(()),
        };
        let ctx = Arc::new(PoolCtx::new(default, home, default_pool));
        host.insert(default, home, PoolState::Open(ctx));
        for e in entries {
            let state = host.open_dir(&e.name, &e.dir, false);
            host.insert(&e.name, &e.dir, state);
        }
        Ok(host)
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
        let host = Host {
            home: PathBuf::new(),
            default: name.to_string(),
            opener: Arc::new(NoOpener),
            pools: RwLock::new(BTreeMap::new()),
            admin: Mutex::new(()),
        };
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
    ) -> Result<Arc<PoolCtx>> {
        crate::names::check_pool_name(name)?;
        if self.read_pools().contains_key(name) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("this host already has a pool named {name}"),
            ));
        }
        self.opener
            .prepare_s3(dir, spec, attach, unsafe_single_host)?;
        self.add_pool(name, dir)
    }

    /// The name of the default pool (bare volume names mean it).
    pub fn default_name(&self) -> &str {
        &self.default
    }

    fn insert(&self, name: &str, dir: &Path, state: PoolState) {
        let slot = PoolSlot {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            state,
        };
        self.write_pools().insert(name.to_string(), slot);
    }

    fn read_pools(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, PoolSlot>> {
        self.pools.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_pools(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, PoolSlot>> {
        self.pools.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `dir` as pool `name`; a failure becomes the pool's state.
    fn open_dir(&self, name: &str, dir: &Path, force: bool) -> PoolState {
        match self.opener.open(dir, force) {
            Ok(opened) => {
                tracing::info!(pool = name, dir = %dir.display(), "pool open");
                PoolState::Open(Arc::new(PoolCtx::new(name, dir, opened)))
            }
            Err(e) => {
                tracing::error!(pool = name, dir = %dir.display(), error = %e.message, "pool could not be opened; it stays listed with the reason");
                PoolState::Failed {
                    reason: e.message,
                    kind: e.kind,
                }
            }
        }
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
            Some(PoolState::Failed { reason, .. }) => Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "pool {name} is not open: {reason}; open it with `vpool pool open {name}` (with --force to take a pool on S3 over)"
                ),
            )),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no pool named {name:?} on this host (`vpool pool list`)"),
            )),
        }
    }

    /// Adds the pool in `dir` (a new local pool is made there if the
    /// directory is empty or missing; an existing pool directory, local or
    /// an S3 cache, opens as it is) under `name`, and records it. Blocking.
    pub fn add_pool(&self, name: &str, dir: &Path) -> Result<Arc<PoolCtx>> {
        crate::names::check_pool_name(name)?;
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
        let opened = self.opener.open(dir, false)?;
        let ctx = Arc::new(PoolCtx::new(name, dir, opened));
        self.insert(name, dir, PoolState::Open(Arc::clone(&ctx)));
        if let Err(e) = self.save() {
            self.write_pools().remove(name);
            let _ = ctx.close();
            return Err(e);
        }
        tracing::info!(pool = name, dir = %dir.display(), "pool added");
        Ok(ctx)
    }

    /// Closes pool `name` (for a pool on S3: uploads what is left and
    /// releases its lease) and forgets it; its data stays. The default pool
    /// cannot be detached. Blocking.
    pub fn detach_pool(&self, name: &str) -> Result<()> {
        if name == self.default {
            return Err(Error::invalid(format!(
                "{name} is this host's default pool (its home): it cannot be detached"
            )));
        }
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let slot = self.write_pools().remove(name).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no pool named {name:?} on this host"),
            )
        })?;
        if let Err(e) = self.save() {
            self.write_pools().insert(name.to_string(), slot);
            return Err(e);
        }
        if let PoolState::Open(ctx) = slot.state {
            ctx.close()?;
        }
        tracing::info!(pool = name, dir = %slot.dir.display(), "pool detached");
        Ok(())
    }

    /// Opens pool `name` again after it failed to open (`force`: take a
    /// pool on S3 over). An open pool is left as it is. Blocking.
    pub fn open_pool(&self, name: &str, force: bool) -> Result<Arc<PoolCtx>> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let dir = match self.read_pools().get(name) {
            Some(PoolSlot {
                state: PoolState::Open(ctx),
                ..
            }) => return Ok(Arc::clone(ctx)),
            Some(slot) => slot.dir.clone(),
            None => {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("no pool named {name:?} on this host"),
                ));
            }
        };
        let state = self.open_dir(name, &dir, force);
        self.insert(name, &dir, state.clone());
        match state {
            PoolState::Open(ctx) => Ok(ctx),
            PoolState::Failed { reason, kind } => Err(Error::new(kind, reason)),
        }
    }

    /// Closes every open pool (at shutdown). Blocking. Returns the first
    /// error, after trying them all.
    pub fn close_all(&self) -> Result<()> {
        let mut first = None;
        for slot in self.pools() {
            if let PoolState::Open(ctx) = slot.state
                && let Err(e) = ctx.close()
            {
                tracing::error!(pool = %slot.name, error = %e.message, "closing the pool failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Writes `host.json`: every pool but the default.
    fn save(&self) -> Result<()> {
        let pools = self
            .pools()
            .into_iter()
            .filter(|s| s.name != self.default)
            .map(|s| PoolEntry {
                name: s.name,
                dir: s.dir,
            })
            .collect();
        let file = HostFile {
            version: HOST_FILE_VERSION,
            pools,
        };
        let bytes = serde_json::to_vec_pretty(&file)
            .map_err(|e| Error::internal(format!("encoding {HOST_FILE}: {e}")))?;
        write_atomically(&self.home.join(HOST_FILE), &bytes)
    }
}

/// The opener of a [`Host::single`]: it has nothing to open.
struct NoOpener;

impl Opener for NoOpener {
    fn open(&self, dir: &Path, _force: bool) -> Result<OpenedPool> {
        Err(Error::new(
            ErrorKind::NotSupported,
            format!(
                "this server holds one pool and opens no other ({})",
                dir.display()
            ),
        ))
    }

    fn prepare_s3(&self, _: &Path, _: &S3Spec, _: bool, _: bool) -> Result<()> {
        Err(Error::new(
            ErrorKind::NotSupported,
            "this server holds one pool and adds no other",
        ))
    }
}

fn read_host_file(home: &Path) -> Result<Vec<PoolEntry>> {
    let path = home.join(HOST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::internal(format!("reading {}: {e}", path.display()))),
    };
    let file: HostFile = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("{} is not valid: {e}", path.display())))?;
    if file.version != HOST_FILE_VERSION {
        return Err(Error::invalid(format!(
            "{} has version {} (this vpool reads version {HOST_FILE_VERSION})",
            path.display(),
            file.version
        )));
    }
    Ok(file.pools)
}

/// Replaces `path` with `bytes`: write a temporary file, sync, rename, sync
/// the directory. A crash leaves the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io =
        |what: &str, e: std::io::Error| Error::internal(format!("{what} {}: {e}", path.display()));
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating a temporary for", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("replacing", e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the directory of", e))
}

/// Whether two paths name the same directory (after resolving them, when
/// they exist).
fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Every open pool's volumes and snapshots as NBD exports of one server:
/// `POOL/VOLUME` and `POOL/VOLUME@SNAPSHOT`, and for the default pool the
/// bare `VOLUME` and `VOLUME@SNAPSHOT` (so URIs from before pools had names
/// keep working; the listing shows those, and `POOL/` names open them too). Volume names cannot contain `/`, so a name with one
/// is always pool-qualified.
pub struct HostExports {
    host: Arc<Host>,
}

impl HostExports {
    pub fn new(host: Arc<Host>) -> HostExports {
        HostExports { host }
    }
}

impl vpool_nbd::ExportRegistry for HostExports {
    fn list(&self) -> Vec<vpool_nbd::ExportInfo> {
        let mut out = Vec::new();
        for slot in self.host.pools() {
            let PoolState::Open(ctx) = slot.state else {
                continue;
            };
            let exports = ctx.exports.list();
            // The default pool's exports are listed by their bare names
            // (`POOL/NAME` opens them too).
            if slot.name == self.host.default {
                out.extend(exports);
                continue;
            }
            out.extend(exports.into_iter().map(|mut e| {
                e.name = format!("{}/{}", slot.name, e.name);
                e
            }));
        }
        out
    }

    fn open(
        &self,
        name: &str,
    ) -> std::result::Result<Arc<dyn vpool_nbd::BlockDevice>, vpool_nbd::DeviceError> {
        let (pool, image) = crate::names::split_pool(name);
        match self.host.pool(pool) {
            Ok(ctx) => ctx.exports.open(image),
            Err(e) if e.kind == ErrorKind::NotFound => {
                Err(vpool_nbd::DeviceError::not_found(e.message))
            }
            Err(e) => Err(vpool_nbd::DeviceError::new(
                vpool_nbd::DeviceErrorKind::Io,
                e.message,
            )),
        }
    }
}
