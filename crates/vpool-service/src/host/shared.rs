//! Shared pools: one pool on S3 that every host attaches, each volume a
//! *family* (a pool of its own in the bucket, with its own lease) owned
//! by one host at a time (`docs/multi-host.md`).
//!
//! On a host, a shared pool is a [`SharedCtx`]: the pool's bucket (a
//! [`SharedStore`], which the binary implements on `vpool-s3`) and the
//! families this host owns, each an ordinary open pool ([`PoolCtx`]) whose
//! cache is `<pool dir>/vols/<volume>`. A volume is served, and its API
//! routes answer, only on the host that owns it; elsewhere they say who
//! does. Ownership moves with `vol takeover` (the new host takes the
//! family's lease: at once if the owner released it, after it expired if
//! the owner is gone, or by force) and `vol release` (uploads what is
//! left, releases the lease and drops the cache).
//!
//! A host that restarts opens again the families whose caches it kept
//! (those it owned when it stopped); one another host took over meanwhile
//! is left closed, with a warning, and `vol takeover` brings it back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};

use super::{Opened, Opener, PoolCtx};
use crate::error::{Error, ErrorKind, Result};

/// Most volumes one host owns in one shared pool (each is an open pool:
/// threads, descriptors, a cache).
pub const MAX_OWNED: usize = 64;

/// Who owns a volume of a shared pool, as its family's latest manifest
/// says.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyOwner {
    /// The holder, `host:pid`; `None` when nobody holds it (released).
    pub holder: Option<String>,
    /// The holder's host name.
    pub host: Option<String>,
    /// The manifest generation that took the lease (every key the owner
    /// writes carries it; a later epoch fences it).
    pub epoch: Option<u64>,
    /// The latest manifest generation; `None`: no family yet (being
    /// created, or its creation died half way).
    pub generation: Option<u64>,
    /// After how long without renewal another host may take it over.
    pub lease_expire_ms: Option<u64>,
    /// When the owner took it (Unix milliseconds, the owner's clock).
    #[serde(default)]
    pub since_unix_ms: Option<u64>,
    /// Segments in the bucket.
    pub segments: u64,
}

/// A volume of a shared pool, as `vol list` and `vol status` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedVolumeStatus {
    pub name: String,
    #[serde(flatten)]
    pub owner: FamilyOwner,
    /// This host owns it (serves it).
    pub here: bool,
    /// When owned here: its size, NBD connections, and bytes written here
    /// that are not in the bucket yet.
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub nbd_connections: Option<u64>,
    #[serde(default)]
    pub unuploaded_bytes: Option<u64>,
    /// When owned here: what a FLUSH promises (`host` or `remote`).
    #[serde(default)]
    pub durability: Option<String>,
}

/// What a shared pool's bucket does for the host. Blocking.
pub trait SharedStore: Send + Sync {
    /// Every volume name, sorted.
    fn names(&self) -> Result<Vec<String>>;
    /// Who owns volume `name`; `not_found` if there is no such volume.
    fn owner(&self, name: &str) -> Result<FamilyOwner>;
    /// Claims `name` (`already_exists` if taken) and makes its family in
    /// the bucket, with its cache in `dir`; leaves it closed.
    fn create(&self, name: &str, dir: &Path) -> Result<()>;
    /// Makes `dir` the cache of volume `name`'s family (`not_found` if
    /// there is none); takes nothing.
    fn attach(&self, name: &str, dir: &Path) -> Result<()>;
    /// Removes the cache `dir` of a family closed cleanly (everything in
    /// the bucket). Best effort.
    fn forget(&self, dir: &Path);
    /// Deletes volume `name`'s name record: from then on no host finds
    /// it. Returns the family's id, for [`SharedStore::delete_family`].
    fn delete_name(&self, name: &str) -> Result<String>;
    /// Deletes every object of family `id`. Blocking.
    fn delete_family(&self, id: &str) -> Result<()>;
}

/// A shared pool on this host; see the module doc.
pub struct SharedCtx {
    pub name: String,
    pub dir: PathBuf,
    store: Arc<dyn SharedStore>,
    /// The families this host owns, by volume name.
    owned: RwLock<BTreeMap<String, Arc<PoolCtx>>>,
    /// Serializes create, takeover and release.
    admin: Mutex<()>,
}

impl SharedCtx {
    /// The shared pool in `dir`, with the families whose caches are there
    /// opened again (see the module doc). Blocking.
    pub(super) fn open(
        name: &str,
        dir: &Path,
        store: Arc<dyn SharedStore>,
        opener: &dyn Opener,
    ) -> SharedCtx {
        let ctx = SharedCtx {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            store,
            owned: RwLock::new(BTreeMap::new()),
            admin: Mutex::new(()),
        };
        for vol in ctx.cached_families() {
            match ctx.open_family(opener, &vol, false) {
                Ok(f) => {
                    ctx.write_owned().insert(vol, f);
                }
                Err(e) => tracing::warn!(
                    pool = %ctx.name, volume = %vol, error = %e.message,
                    "a volume this host owned could not be opened again; `vpool vol takeover` retries"
                ),
            }
        }
        ctx
    }

    fn families_dir(&self) -> PathBuf {
        self.dir.join("vols")
    }

    fn family_dir(&self, vol: &str) -> PathBuf {
        self.families_dir().join(vol)
    }

    /// The volumes whose caches are in the pool's directory.
    fn cached_families(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.families_dir()) else {
            return Vec::new();
        };
        let mut out: Vec<String> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| crate::names::check_volume_name(n).is_ok())
            .collect();
        out.sort();
        out.truncate(MAX_OWNED);
        out
    }

    fn read_owned(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<PoolCtx>>> {
        self.owned.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_owned(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<PoolCtx>>> {
        self.owned.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_admin(&self) -> std::sync::MutexGuard<'_, ()> {
        self.admin.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The families this host owns.
    pub fn owned(&self) -> Vec<Arc<PoolCtx>> {
        self.read_owned().values().cloned().collect()
    }

    /// The open family of volume `vol` if this host owns it; otherwise an
    /// error that says who does (a GET of its manifest).
    pub fn family(&self, vol: &str) -> Result<Arc<PoolCtx>> {
        if let Some(f) = self.read_owned().get(vol) {
            return Ok(Arc::clone(f));
        }
        let owner = self.store.owner(vol)?;
        let who = match (&owner.holder, owner.epoch) {
            (Some(h), Some(e)) => format!("owned by {h} (epoch {e})"),
            _ => "not owned by any host".to_string(),
        };
        Err(Error::new(
            ErrorKind::NotOwner,
            format!(
                "volume {}/{vol} is {who}, not by this host; `vpool vol takeover {}/{vol}` moves it here",
                self.name, self.name
            ),
        ))
    }

    /// The open family of `vol`, which this host must own, for `what`
    /// (release, delete): refused while NBD clients have it open, unless
    /// `force`.
    fn owned_idle(&self, vol: &str, what: &str, force: bool) -> Result<Arc<PoolCtx>> {
        let family = self.family(vol)?;
        let n = family.service.catalog().nbd_connections_total();
        if n > 0 && !force {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{what} refused: volume {}/{vol} has {n} NBD connection(s); disconnect them first (or ask with force=true)",
                    self.name
                ),
            ));
        }
        Ok(family)
    }

    /// Opens family `vol` from its cache (made by `create` or `attach`).
    fn open_family(&self, opener: &dyn Opener, vol: &str, force: bool) -> Result<Arc<PoolCtx>> {
        let dir = self.family_dir(vol);
        match opener.open(&dir, force)? {
            Opened::Pool(p) => Ok(Arc::new(PoolCtx::new(
                &format!("{}/{vol}", self.name),
                &dir,
                p,
            ))),
            Opened::Shared(_) => Err(Error::internal(format!(
                "{} holds a shared pool, not a volume's family",
                dir.display()
            ))),
        }
    }

    fn check_room(&self) -> Result<()> {
        if self.read_owned().len() >= MAX_OWNED {
            return Err(Error::invalid(format!(
                "this host owns {MAX_OWNED} volumes of pool {} already (the most it opens)",
                self.name
            )));
        }
        Ok(())
    }

    /// Creates volume `vol` of `size_bytes` in the bucket; this host owns
    /// it. Blocking.
    pub fn create_volume(
        &self,
        opener: &dyn Opener,
        vol: &str,
        size_bytes: u64,
    ) -> Result<crate::pool::VolumeView> {
        crate::names::check_volume_name(vol)?;
        let _admin = self.lock_admin();
        self.check_room()?;
        let dir = self.family_dir(vol);
        if dir.exists() {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "{} exists: this host has a cache for a volume {vol}",
                    dir.display()
                ),
            ));
        }
        self.store.create(vol, &dir)?;
        let family = self.open_family(opener, vol, false)?;
        let view = family.service.create_volume(vol, size_bytes, false);
        self.write_owned().insert(vol.to_string(), family);
        view
    }

    /// Makes this host the owner of volume `vol`: takes its family's lease
    /// (at once if nobody holds it; after the holder's lease expired; at
    /// once with `force`, fencing the holder). Blocking: waiting for an
    /// expiry takes up to a minute.
    pub fn takeover(&self, opener: &dyn Opener, vol: &str, force: bool) -> Result<Arc<PoolCtx>> {
        crate::names::check_volume_name(vol)?;
        let _admin = self.lock_admin();
        if let Some(f) = self.read_owned().get(vol) {
            return Ok(Arc::clone(f));
        }
        self.check_room()?;
        let dir = self.family_dir(vol);
        let made = !dir.exists();
        if made {
            self.store.attach(vol, &dir)?;
        }
        match self.open_family(opener, vol, force) {
            Ok(f) => {
                self.write_owned().insert(vol.to_string(), Arc::clone(&f));
                tracing::info!(pool = %self.name, volume = vol, force, "volume taken over");
                Ok(f)
            }
            Err(e) => {
                if made {
                    opener.discard_s3(&dir);
                }
                Err(e)
            }
        }
    }

    /// Gives volume `vol` up: uploads what is left, releases its lease (so
    /// another host's takeover is immediate) and drops its cache. Refused
    /// while NBD clients have it open, unless `force`. Blocking.
    pub fn release(&self, vol: &str, force: bool) -> Result<()> {
        let _admin = self.lock_admin();
        let family = self.owned_idle(vol, "release", force)?;
        self.write_owned().remove(vol);
        family.close()?;
        let clean = self.store.owner(vol).is_ok_and(|o| o.holder.is_none());
        if clean {
            self.store.forget(&family.dir);
        } else {
            tracing::warn!(pool = %self.name, volume = vol, dir = %family.dir.display(), "the volume was not released cleanly: its cache is kept");
        }
        tracing::info!(pool = %self.name, volume = vol, "volume released");
        Ok(())
    }

    /// Deletes volume `vol`, which this host owns: its name first (no
    /// host finds it from then on), then its family (closed, and every
    /// object of it deleted) and its cache. Refused while NBD clients have
    /// it open, unless `force`. Blocking.
    pub fn delete(&self, vol: &str, force: bool) -> Result<()> {
        let _admin = self.lock_admin();
        let family = self.owned_idle(vol, "delete", force)?;
        let id = self.store.delete_name(vol)?;
        self.write_owned().remove(vol);
        // Its data goes with the objects: the close's uploads are wasted
        // work, but the close must end the uploader before the deletion.
        if let Err(e) = family.close() {
            tracing::warn!(pool = %self.name, volume = vol, error = %e.message, "closing a deleted volume failed");
        }
        self.store.delete_family(&id)?;
        self.store.forget(&family.dir);
        tracing::info!(pool = %self.name, volume = vol, family = %id, "volume deleted");
        Ok(())
    }

    /// Every volume of the pool with its owner (a LIST and a GET per
    /// volume). Blocking.
    pub fn list(&self) -> Result<Vec<SharedVolumeStatus>> {
        let mut names = self.store.names()?;
        // A volume owned here whose name is not listed yet (eventual
        // consistency of a LIST) is shown anyway.
        for n in self.read_owned().keys() {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        names.sort();
        names.iter().map(|n| self.status(n)).collect()
    }

    /// Volume `vol`'s owner and, if this host owns it, its figures here.
    pub fn status(&self, vol: &str) -> Result<SharedVolumeStatus> {
        let owner = self.store.owner(vol)?;
        let mut out = SharedVolumeStatus {
            name: vol.to_string(),
            owner,
            here: false,
            size_bytes: None,
            nbd_connections: None,
            unuploaded_bytes: None,
            durability: None,
        };
        if let Some(f) = self.read_owned().get(vol).cloned() {
            out.here = true;
            out.size_bytes = f.service.volume(vol).ok().map(|v| v.info.size_bytes);
            out.nbd_connections = Some(f.service.catalog().nbd_connections_total() as u64);
            let stats = f.cache.as_ref().map(|c| c.stats());
            out.unuploaded_bytes = stats.as_ref().map(|s| s.dirty_bytes);
            out.durability = stats.map(|s| s.durability);
        }
        Ok(out)
    }

    /// Closes every family this host owns (at shutdown or detach): each
    /// uploads and releases its lease, and keeps its cache so the host
    /// opens it again at its next start. Returns the first error.
    pub fn close(&self) -> Result<()> {
        let owned: Vec<_> = std::mem::take(&mut *self.write_owned())
            .into_values()
            .collect();
        let mut first = None;
        for f in owned {
            if let Err(e) = f.close() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}
