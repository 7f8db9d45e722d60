//! Pools on S3-compatible object storage, as the `vpool` binary sets them up
//! and opens them.
//!
//! vpool keeps one daemon per pool directory. For a pool on S3, the pool
//! directory *is* the host cache: `vpool-s3` keeps its write-back log and
//! read cache there (an ordinary local pool layout, flock'ed), and this
//! module adds `pool.json`, which says where the pool lives:
//!
//! ```json
//! {"backend": "s3", "name": "cold", "url": "s3://vms/pool1",
//!  "endpoint": "http://127.0.0.1:7480", "region": null,
//!  "credentials_file": "/etc/vpool/s3.cred", "cache_size_bytes": 21474836480,
//!  "seal_after_secs": 5.0, "backpressure_timeout_secs": 120.0,
//!  "read_timeout_secs": 30.0, "lease_expire_secs": 30.0,
//!  "unsafe_single_host": false}
//! ```
//!
//! Credentials are never written there, nor logged or printed: they come
//! from the credentials file named (`key = value` lines, read when the pool
//! is opened) or from the environment (`AWS_ACCESS_KEY_ID`, ...).
//!
//! - [`create`] (`vpool pool create --s3`): writes `pool.json` and makes the
//!   pool in the bucket (its first manifest), then lets it go. No daemon.
//! - [`attach`] (`vpool pool attach --s3`): a new cache directory for a pool
//!   that exists (another host's, or after losing a cache): writes
//!   `pool.json` only; `vpool serve` then opens it.
//! - [`open_store`] (`vpool serve`): opens the store and takes the pool's
//!   write lease; [`PoolHeld`] when another daemon holds it and `--force`
//!   was not given.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use vpool_s3::{Fencing, OpenError, OpenMode, PoolUrl, S3Access, S3PoolOptions, S3Store};
use vpool_store::StoreError;

use crate::atomic_file::write_file_atomic;
use crate::lock::AlreadyRunning;
use crate::size::format_size;

/// The pool's configuration file in the pool (cache) directory.
pub const POOL_FILE: &str = "pool.json";

/// The only backend `pool.json` names so far (a directory without the file
/// is a local pool).
pub const BACKEND_S3: &str = "s3";

/// Smallest cache accepted: a few segments of write-back log plus room to
/// read.
pub const MIN_CACHE_SIZE_BYTES: u64 = 256 << 20;

/// Longest timeout or seal interval accepted, in seconds (a day).
const MAX_SECS: f64 = 86_400.0;

fn default_options() -> S3PoolOptions {
    S3PoolOptions::new(
        PathBuf::new(),
        MIN_CACHE_SIZE_BYTES,
        OpenMode::Open { force: false },
    )
}

fn default_seal_after() -> f64 {
    default_options().seal_after.as_secs_f64()
}

fn default_backpressure_timeout() -> f64 {
    default_options().backpressure_timeout.as_secs_f64()
}

fn default_read_timeout() -> f64 {
    default_options().read_timeout.as_secs_f64()
}

fn default_lease_expire() -> f64 {
    default_options().lease.expire.as_secs_f64()
}

/// The shortest and longest lease expiry accepted, in seconds (the bounds
/// the manifest's decoder enforces).
const MIN_LEASE_EXPIRE_SECS: f64 = (vpool_s3::manifest::MIN_LEASE_EXPIRE_MS / 1000) as f64;
const MAX_LEASE_EXPIRE_SECS: f64 = (vpool_s3::manifest::MAX_LEASE_EXPIRE_MS / 1000) as f64;

/// `pool.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolFile {
    /// `s3`.
    pub backend: String,
    /// The host's name for the pool when it was created or attached
    /// (informational: the daemon's `host.json` is what names its pools).
    #[serde(default)]
    pub name: Option<String>,
    /// `s3://bucket/prefix` (or `file:///dir`).
    pub url: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    /// Where the credentials are read from; `null`: the environment.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    pub cache_size_bytes: u64,
    /// The engine seals its open segment after it held data this long,
    /// bounding how far the bucket lags behind.
    #[serde(default = "default_seal_after")]
    pub seal_after_secs: f64,
    /// How long a write waits for the upload to catch up before it fails.
    #[serde(default = "default_backpressure_timeout")]
    pub backpressure_timeout_secs: f64,
    /// How long a read of data not in the cache may take before it fails.
    #[serde(default = "default_read_timeout")]
    pub read_timeout_secs: f64,
    /// Another host may take the pool over once it saw this host's lease
    /// not renewed for this long; this host stops I/O after two thirds
    /// of it without a renewal.
    #[serde(default = "default_lease_expire")]
    pub lease_expire_secs: f64,
    /// Created with `--unsafe-single-host` (the object store cannot fence
    /// a second writer).
    #[serde(default)]
    pub unsafe_single_host: bool,
    /// A shared pool (`docs/multi-host.md`): the directory holds the
    /// caches of the volumes this host owns, each in `vols/<volume>`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
    /// What a FLUSH promises: `host` or `remote` (the flush journal).
    #[serde(default)]
    pub durability: vpool_s3::Durability,
}

/// Secrets must not ride in URLs, where they would land in `pool.json`,
/// in logs and in error messages.
fn check_no_userinfo(what: &str, url: &str) -> anyhow::Result<()> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        bail!(
            "the {what} must not carry credentials (user:secret@...); give them with --credentials FILE or in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"
        );
    }
    Ok(())
}

fn check_secs(flag: &str, secs: f64) -> anyhow::Result<()> {
    if !(secs.is_finite() && secs > 0.0 && secs <= MAX_SECS) {
        bail!("{flag} must be a number of seconds above 0 and at most {MAX_SECS}, not {secs}");
    }
    Ok(())
}

impl PoolFile {
    /// Reads `DIR/pool.json`; `None` when there is none (a local pool).
    pub fn load(dir: &Path) -> anyhow::Result<Option<PoolFile>> {
        let path = dir.join(POOL_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let f: PoolFile = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a valid pool file", path.display()))?;
        if f.backend != BACKEND_S3 {
            bail!(
                "{} names backend {:?}; this vpool knows {BACKEND_S3:?} (a local pool has no pool.json)",
                path.display(),
                f.backend
            );
        }
        f.validate()
            .with_context(|| format!("in {}", path.display()))?;
        Ok(Some(f))
    }

    /// Writes `DIR/pool.json` atomically and durably.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).context("encoding pool.json")?;
        write_file_atomic(&dir.join(POOL_FILE), &bytes)
    }

    /// Checks what the command line or the file says.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_no_userinfo("pool URL", &self.url)?;
        PoolUrl::parse(&self.url)?;
        if let Some(ep) = &self.endpoint {
            check_no_userinfo("endpoint URL", ep)?;
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                bail!("the endpoint {ep:?} must be an http:// or https:// URL");
            }
        }
        if self.cache_size_bytes < MIN_CACHE_SIZE_BYTES {
            bail!(
                "the cache size {} is below the minimum of {}: it holds the write-back log as well as cached reads",
                format_size(self.cache_size_bytes),
                format_size(MIN_CACHE_SIZE_BYTES)
            );
        }
        check_secs("--seal-after", self.seal_after_secs)?;
        check_secs("--backpressure-timeout", self.backpressure_timeout_secs)?;
        check_secs("--read-timeout", self.read_timeout_secs)?;
        if !(MIN_LEASE_EXPIRE_SECS..=MAX_LEASE_EXPIRE_SECS).contains(&self.lease_expire_secs) {
            bail!(
                "--lease-expire must be between {MIN_LEASE_EXPIRE_SECS} and {MAX_LEASE_EXPIRE_SECS} seconds, not {}",
                self.lease_expire_secs
            );
        }
        Ok(())
    }

    /// How to reach the object store: the credentials file's content if one
    /// is named (this file's endpoint and region win over its), else the
    /// endpoint and region here and credentials from the environment.
    pub fn access(&self) -> anyhow::Result<S3Access> {
        let mut a = match &self.credentials_file {
            Some(path) => S3Access::from_file(path)
                .with_context(|| format!("reading the credentials file {}", path.display()))?,
            None => S3Access::default(),
        };
        if self.endpoint.is_some() {
            a.endpoint = self.endpoint.clone();
        }
        if self.region.is_some() {
            a.region = self.region.clone();
        }
        if let Some(ep) = &a.endpoint {
            check_no_userinfo("endpoint URL", ep)?;
        }
        Ok(a)
    }

    /// The store's options for a cache at `dir`.
    pub fn options(&self, dir: &Path, mode: OpenMode) -> S3PoolOptions {
        let mut o = S3PoolOptions::new(dir, self.cache_size_bytes, mode);
        o.seal_after = Duration::from_secs_f64(self.seal_after_secs);
        o.backpressure_timeout = Duration::from_secs_f64(self.backpressure_timeout_secs);
        o.read_timeout = Duration::from_secs_f64(self.read_timeout_secs);
        o.lease =
            vpool_s3::LeaseTiming::expiring_after(Duration::from_secs_f64(self.lease_expire_secs));
        o.durability = self.durability;
        o
    }

    /// The object store, connected (no request made yet).
    pub fn connect(&self) -> anyhow::Result<vpool_s3::Remote> {
        let access = self.access()?;
        Ok(vpool_s3::connect(&self.url, &access)?)
    }
}

/// What `pool create` and `pool attach` were given (beside the name):
/// where the pool is on S3 and how its cache behaves (what the daemon's
/// API takes), and the cache directory.
#[derive(Clone, Debug)]
pub struct S3PoolSettings {
    pub spec: vpool_service::S3Spec,
    pub cache_dir: PathBuf,
}

/// What `pool create` / `pool attach` did (`--json`). Never secrets.
#[derive(Clone, Debug, Serialize)]
pub struct PoolReport {
    /// The pool directory (the cache): `--home` takes it, or the name.
    pub pool_dir: PathBuf,
    /// For `attach`: who holds the pool now (`host:pid`), if anyone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_by: Option<String>,
    #[serde(flatten)]
    pub config: PoolFile,
}

/// `pool.json` from the command line, checked; the cache directory made
/// absolute.
fn pool_file(
    name: Option<&str>,
    settings: &S3PoolSettings,
    unsafe_single_host: bool,
) -> anyhow::Result<(PoolFile, PathBuf)> {
    let s = &settings.spec;
    let credentials_file = match &s.credentials_file {
        Some(p) => Some(
            std::fs::canonicalize(p)
                .with_context(|| format!("the credentials file {}", p.display()))?,
        ),
        None => None,
    };
    let f = PoolFile {
        backend: BACKEND_S3.to_string(),
        name: name.map(str::to_string),
        url: s.url.clone(),
        endpoint: s.endpoint.clone(),
        region: s.region.clone(),
        credentials_file,
        cache_size_bytes: s.cache_size_bytes,
        seal_after_secs: s.seal_after_secs.unwrap_or_else(default_seal_after),
        backpressure_timeout_secs: s
            .backpressure_timeout_secs
            .unwrap_or_else(default_backpressure_timeout),
        read_timeout_secs: s.read_timeout_secs.unwrap_or_else(default_read_timeout),
        lease_expire_secs: s.lease_expire_secs.unwrap_or_else(default_lease_expire),
        unsafe_single_host,
        shared: s.shared,
        durability: match &s.durability {
            Some(d) => d.parse().map_err(|e: String| anyhow::anyhow!(e))?,
            None => vpool_s3::Durability::Host,
        },
    };
    if f.shared && unsafe_single_host {
        bail!(
            "a shared pool is for many hosts: it needs an object store that fences (no --unsafe-single-host)"
        );
    }
    f.validate()?;
    let dir = std::path::absolute(&settings.cache_dir)
        .with_context(|| format!("the cache directory {}", settings.cache_dir.display()))?;
    Ok((f, dir))
}

/// Checks what `pool create` / `pool attach` were given, before anything
/// is made: a bad value is the caller's mistake, not a failure.
pub fn check_settings(settings: &S3PoolSettings) -> anyhow::Result<()> {
    pool_file(None, settings, false).map(|_| ())
}

/// Refuses a directory that already holds a pool (S3 or local) or a
/// daemon's socket; creates it if missing. Returns whether it was created.
fn prepare_cache_dir(dir: &Path) -> anyhow::Result<bool> {
    if dir.join(POOL_FILE).exists() {
        bail!(
            "{} already holds a pool ({} is there); use another --cache directory, or serve this one with `vpool --home {} serve`",
            dir.display(),
            POOL_FILE,
            dir.display()
        );
    }
    let nonempty = |p: PathBuf| std::fs::read_dir(p).is_ok_and(|mut d| d.next().is_some());
    if nonempty(dir.join("segments")) || nonempty(dir.join("meta")) || dir.join("api.sock").exists()
    {
        bail!(
            "{} holds a local vpool pool; an S3 pool's cache needs a directory of its own",
            dir.display()
        );
    }
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} exists and is not a directory", dir.display());
        }
        return Ok(false);
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the cache directory {}", dir.display()))?;
    Ok(true)
}

/// Undoes what a failed create or attach made in the cache directory.
fn undo(dir: &Path, created_dir: bool) {
    if created_dir {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        let _ = std::fs::remove_file(dir.join(POOL_FILE));
    }
}

/// Undoes [`attach`] on a cache directory whose pool never opened (no
/// store state in it): its `pool.json`, the empty layout an attempt to
/// open it made, and the directory if that leaves it empty. Best effort.
pub fn discard_attach(dir: &Path) {
    if vpool_s3::is_cache_dir(dir) {
        return;
    }
    let _ = std::fs::remove_file(dir.join(POOL_FILE));
    // Only empty directories go: anything with data in it stays.
    for sub in ["segments", "meta"] {
        let _ = std::fs::remove_dir(dir.join(sub));
    }
    if !dir.join("segments").exists() && !dir.join("meta").exists() {
        let _ = std::fs::remove_file(dir.join("LOCK"));
    }
    let _ = std::fs::remove_dir(dir);
}

/// `vpool pool create [NAME] --s3 URL ...`: a new pool in the bucket, with
/// its cache at `settings.cache_dir`.
pub fn create(
    name: Option<&str>,
    settings: &S3PoolSettings,
    unsafe_single_host: bool,
) -> anyhow::Result<PoolReport> {
    let (file, dir) = pool_file(name, settings, unsafe_single_host)?;
    let remote = file.connect()?;
    let created_dir = prepare_cache_dir(&dir)?;
    // pool.json first: a crash after the bucket has its pool leaves a cache
    // directory that `serve` can open.
    if let Err(e) = file.save(&dir) {
        undo(&dir, created_dir);
        return Err(e);
    }
    if file.shared {
        if let Err(e) = vpool_s3::shared::create_shared(&remote) {
            undo(&dir, created_dir);
            return Err(open_error(e, &file, &dir));
        }
        return Ok(PoolReport {
            pool_dir: dir,
            held_by: None,
            config: file,
        });
    }
    let opts = file.options(
        &dir,
        OpenMode::Create {
            allow_unsafe_fencing: unsafe_single_host,
        },
    );
    let store = match S3Store::open(remote, opts) {
        Ok(s) => s,
        Err(e) => {
            // Nothing was made in the bucket: leave no trace here either.
            let e = open_error(e, &file, &dir);
            undo(&dir, created_dir);
            return Err(e);
        }
    };
    let released = store.close();
    drop(store);
    if !released {
        bail!(
            "the pool was created in {} but could not be released cleanly; `vpool --home {} serve` will finish",
            file.url,
            dir.display()
        );
    }
    Ok(PoolReport {
        pool_dir: dir,
        held_by: None,
        config: file,
    })
}

/// `vpool pool attach [NAME] --s3 URL ...`: a cache directory for a pool
/// that is already in the bucket. Checks the pool is there and says who
/// holds it; takes nothing (`vpool serve` takes the lease).
pub fn attach(name: Option<&str>, settings: &S3PoolSettings) -> anyhow::Result<PoolReport> {
    let (file, dir) = pool_file(name, settings, false)?;
    let remote = file.connect()?;
    // A shared pool says so (its identity object); `--shared` need not.
    match vpool_s3::shared::check_shared(&remote) {
        Ok(_) => {
            return attach_shared(
                PoolFile {
                    shared: true,
                    ..file
                },
                dir,
            );
        }
        Err(OpenError::NoPool { .. }) if !file.shared => {}
        Err(OpenError::NoPool { url }) => bail!(
            "no shared vpool pool at {url}; make one with `vpool pool create NAME --shared --s3 {}`",
            file.url
        ),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("reading the pool at {}", file.url)));
        }
    }
    let pool = match vpool_s3::pool_summary(&remote) {
        Ok(p) => p,
        Err(OpenError::NoPool { url }) => bail!(
            "no vpool pool at {url} (no manifest); make one with `vpool pool create --s3 {}`",
            file.url
        ),
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!("reading the pool at {}", file.url)));
        }
    };
    let held_by = pool.held_by;
    let file = PoolFile {
        unsafe_single_host: pool.fencing == Fencing::Unsafe,
        ..file
    };
    save_attached(file, dir, held_by)
}

/// [`attach`] of a shared pool: its cache directory, which will hold the
/// caches of the volumes this host owns.
fn attach_shared(file: PoolFile, dir: PathBuf) -> anyhow::Result<PoolReport> {
    save_attached(file, dir, None)
}

/// Makes the cache directory with its `pool.json` (undone if that fails).
fn save_attached(
    file: PoolFile,
    dir: PathBuf,
    held_by: Option<String>,
) -> anyhow::Result<PoolReport> {
    let created_dir = prepare_cache_dir(&dir)?;
    if let Err(e) = file.save(&dir) {
        undo(&dir, created_dir);
        return Err(e);
    }
    Ok(PoolReport {
        pool_dir: dir,
        held_by,
        config: file,
    })
}

/// Another daemon (on this host or another) holds the pool's write lease.
#[derive(Debug)]
pub struct PoolHeld {
    pub url: String,
    pub host: String,
    pub pid: u32,
    pub generation: u64,
    /// Whether its lease is renewed, or for how long it has not been.
    pub lease: String,
}

impl std::fmt::Display for PoolHeld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pool {} is held by {} (pid {}) since manifest generation {}: {}; stop that daemon first, or pass --force to take the pool over now (that daemon is then fenced: its writes fail from then on)",
            self.url, self.host, self.pid, self.generation, self.lease
        )
    }
}

impl std::error::Error for PoolHeld {}

/// An [`OpenError`] as the user should see it.
fn open_error(e: OpenError, file: &PoolFile, dir: &Path) -> anyhow::Error {
    match e {
        OpenError::Held {
            url,
            host,
            pid,
            epoch,
            lease,
        } => PoolHeld {
            url,
            host,
            pid,
            generation: epoch,
            lease,
        }
        .into(),
        OpenError::Store(StoreError::Locked { path, lock_file }) => {
            let pid = std::fs::read_to_string(&lock_file)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            AlreadyRunning {
                pool: path,
                lock_file,
                pid,
            }
            .into()
        }
        OpenError::PoolExists { url } => anyhow::anyhow!(
            "a vpool pool already exists at {url}; to use it from this host with a new cache directory: `vpool pool attach --s3 {} --cache DIR --cache-size SIZE`",
            file.url
        ),
        e => anyhow::Error::new(e).context(format!(
            "opening the pool at {} with its cache at {}",
            file.url,
            dir.display()
        )),
    }
}

/// Opens the S3 pool whose cache is `dir` for `vpool serve`, taking its
/// write lease (from another holder too with `force`). A family of a
/// shared pool comes with its `parent`: the pool's connection (a child of
/// it) and the host's cache budget for the pool. Blocking.
pub fn open_store(
    dir: &Path,
    file: &PoolFile,
    mode: OpenMode,
    peer: Option<&str>,
    parent: Option<(vpool_s3::Remote, Arc<vpool_s3::CacheBudget>)>,
) -> anyhow::Result<S3Store> {
    let (remote, budget) = match parent {
        Some((r, b)) => (r, Some(b)),
        None => (file.connect()?, None),
    };
    let mut opts = file.options(dir, mode);
    opts.peer = peer.map(str::to_string);
    opts.budget = budget;
    S3Store::open(remote, opts).map_err(|e| open_error(e, file, dir))
}

/// The marker `vpool-s3` leaves in a cache directory (`meta/s3-state`): a
/// directory with it but without `pool.json` must not be served as a local
/// pool (its segments are placeholders and holes).
pub fn looks_like_s3_cache(dir: &Path) -> bool {
    vpool_s3::is_cache_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(url: &str) -> S3PoolSettings {
        S3PoolSettings {
            spec: vpool_service::S3Spec {
                url: url.into(),
                endpoint: None,
                region: None,
                credentials_file: None,
                cache_size_bytes: 1 << 30,
                seal_after_secs: None,
                backpressure_timeout_secs: None,
                read_timeout_secs: None,
                lease_expire_secs: None,
                shared: false,
                durability: None,
            },
            cache_dir: "/tmp/x".into(),
        }
    }

    #[test]
    fn validation() {
        let (f, dir) = pool_file(None, &settings("s3://vms/pool1"), false).unwrap();
        assert_eq!(dir, PathBuf::from("/tmp/x"));
        assert_eq!(f.seal_after_secs, default_seal_after());
        let mut s = settings("s3://vms/pool1");
        s.spec.cache_size_bytes = 255 << 20;
        let e = pool_file(None, &s, false).unwrap_err().to_string();
        assert!(e.contains("below the minimum of 256 MiB"), "{e}");
        let e = pool_file(None, &settings("s3://AKID:hush@vms/p"), false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("must not carry credentials") && !e.contains("hush"),
            "{e}"
        );
        let mut s = settings("s3://vms/p");
        s.spec.endpoint = Some("http://a:b@host:7480".into());
        assert!(pool_file(None, &s, false).is_err());
        let mut s = settings("s3://vms/p");
        s.spec.seal_after_secs = Some(0.0);
        let e = pool_file(None, &s, false).unwrap_err().to_string();
        assert!(e.contains("--seal-after"), "{e}");
        assert!(pool_file(None, &settings("ftp://x"), false).is_err());
    }

    #[test]
    fn pool_file_round_trips_without_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("cred");
        std::fs::write(
            &cred,
            "access_key_id = AKIDEXAMPLE\nsecret_access_key = hush-hush\nregion = eu-1\n",
        )
        .unwrap();
        let mut s = settings("s3://vms/p");
        s.spec.credentials_file = Some(cred.clone());
        s.spec.endpoint = Some("http://127.0.0.1:7480".into());
        let (f, _) = pool_file(Some("cold"), &s, false).unwrap();
        f.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(POOL_FILE)).unwrap();
        assert!(
            !text.contains("AKIDEXAMPLE") && !text.contains("hush"),
            "{text}"
        );
        let back = PoolFile::load(dir.path()).unwrap().unwrap();
        assert_eq!(back, f);
        let a = back.access().unwrap();
        assert_eq!(a.secret_access_key.as_deref(), Some("hush-hush"));
        assert_eq!(a.region.as_deref(), Some("eu-1"));
        assert_eq!(a.endpoint.as_deref(), Some("http://127.0.0.1:7480"));
        assert!(PoolFile::load(&dir.path().join("none")).unwrap().is_none());
    }
}
