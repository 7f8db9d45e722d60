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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock, Weak};

use serde::{Deserialize, Serialize};
use vpool_nbd::{BlockDevice, DeviceError, ExportRegistry};
use vpool_peer::Secret;

use super::forward::{Forward, Owner};
use super::{Opened, Opener, PoolCtx};
use crate::error::{Error, ErrorKind, Result};
use crate::layered::{CopyUpLocks, LayeredDevice};

/// Most volumes one host owns in one shared pool (each is an open pool:
/// threads, descriptors, a cache).
pub const MAX_OWNED: usize = 64;

/// Bytes a flatten leaves to upload while its clone's writes are held
/// (the rest goes up while they run).
const FLATTEN_LAG_BYTES: u64 = 64 << 20;
/// How long a flatten holds its clone's writes, at most, for the last of
/// its upload.
const FLATTEN_HELD_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long the upload may make no progress before a flatten gives up.
const FLATTEN_STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

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
    /// Where the holder serves the peer link; `None`: it serves none, so
    /// other hosts cannot forward to it.
    #[serde(default)]
    pub peer: Option<String>,
    /// The volume's own durability (`vol create --durability`), whichever
    /// host owns it; `None`: the owner's setting for the pool.
    #[serde(default)]
    pub volume_durability: Option<String>,
    /// A clone: the sealed template it reads where it wrote nothing.
    #[serde(default)]
    pub base: Option<String>,
    /// The family of that template when the clone was made: a template
    /// deleted and made again under its name is another family, which
    /// the clone must not read.
    #[serde(default, skip_serializing)]
    pub base_family: Option<String>,
    /// This volume's family id (`None`: not known to the store).
    #[serde(default, skip_serializing)]
    pub family: Option<String>,
    /// A sealed template: every host serves it read-only, none owns it
    /// (the release that sealed it says so).
    #[serde(default)]
    pub sealed: bool,
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
    /// When owned here: its share of the host's cache for the pool (the
    /// pool's `--cache-size` split among the volumes this host owns).
    #[serde(default)]
    pub cache_size_bytes: Option<u64>,
    /// What a FLUSH promises (`host` or `remote`): as the family runs
    /// when owned here; elsewhere the volume's own setting, if it has one.
    #[serde(default)]
    pub durability: Option<String>,
    /// When another host owns it: this host's NBD clients of the volume,
    /// whose I/O it forwards to the owner (the owner counts them among its
    /// `nbd_connections`, one per session).
    #[serde(default)]
    pub forwarded_clients: Option<u64>,
}

/// What a shared pool's bucket does for the host. Blocking.
pub trait SharedStore: Send + Sync {
    /// Every volume name, sorted.
    fn names(&self) -> Result<Vec<String>>;
    /// Who owns volume `name`; `not_found` if there is no such volume.
    fn owner(&self, name: &str) -> Result<FamilyOwner>;
    /// Claims `name` (`already_exists` if taken) and makes its family in
    /// the bucket, with its cache in `dir`; leaves it closed. `durability`
    /// (`host` or `remote`) is the volume's own, recorded with its name
    /// for every host that will own it; `None`: each owner's pool setting.
    fn create(&self, name: &str, dir: &Path, durability: Option<&str>) -> Result<()>;
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
    /// The pool's peer link secret (made by the first host that asks).
    fn peer_secret(&self) -> Result<[u8; 32]>;
    /// The clones of template `name` (their names), and how many of its
    /// refs name no volume (a clone being created, or whose creation
    /// died).
    fn clones_of(&self, _name: &str) -> Result<(Vec<String>, usize)> {
        Ok((Vec::new(), 0))
    }
    /// Removes the ref of clone family `clone_id` from template `name`
    /// (the clone was deleted).
    fn drop_ref(&self, _name: &str, _clone_id: &str) -> Result<()> {
        Ok(())
    }
    /// Claims `name` for a clone of sealed template `base` and makes its
    /// family, with its cache in `dir` (as [`SharedStore::create`]); the
    /// template's family records the clone first.
    fn create_clone(&self, name: &str, _dir: &Path, base: &str) -> Result<()> {
        Err(Error::new(
            ErrorKind::NotSupported,
            format!("this pool cannot make {name} a clone of {base}"),
        ))
    }
    /// Records that clone `name` holds all its template's blocks that it
    /// reads: from then on [`SharedStore::owner`] names no base for it, and
    /// [`SharedStore::clones_of`] does not count it.
    fn mark_flattened(&self, name: &str) -> Result<()> {
        Err(Error::new(
            ErrorKind::NotSupported,
            format!("this pool cannot flatten {name}"),
        ))
    }
}

/// A shared pool on this host; see the module doc.
pub struct SharedCtx {
    pub name: String,
    pub dir: PathBuf,
    store: Arc<dyn SharedStore>,
    /// The families this host owns, by volume name.
    owned: RwLock<BTreeMap<String, Arc<PoolCtx>>>,
    /// The volumes a create, takeover, release or delete runs on: one at
    /// a time per volume, so a takeover that waits for a lapsing lease
    /// does not hold up another volume's (a failover of many volumes).
    admin: Mutex<BTreeSet<String>>,
    admin_done: Condvar,
    /// Volumes being opened here (create, takeover): with the owned ones,
    /// at most [`MAX_OWNED`].
    opening: Mutex<usize>,
    /// This host's peer link address (`None`: it serves none, and does
    /// not forward either).
    my_peer: Option<String>,
    secret: OnceLock<Secret>,
    /// The volumes this host forwards to their owners, while clients use
    /// them.
    forwards: Mutex<BTreeMap<String, Weak<Forward>>>,
    /// The sealed templates open here, read-only, by volume name: one
    /// view per host however many clients read it (its cache is the
    /// host's copy of the template's blocks).
    sealed: Mutex<BTreeMap<String, Arc<PoolCtx>>>,
    /// The clones this host owns, by volume name: their template's name,
    /// its read-only view here, which their devices read through, and the
    /// clone's copy-up locks, which all its devices share
    /// (`crate::layered`). An entry goes with its family (release,
    /// delete), so there are at most [`MAX_OWNED`].
    bases: Mutex<BTreeMap<String, Base>>,
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
            admin: Mutex::new(BTreeSet::new()),
            admin_done: Condvar::new(),
            opening: Mutex::new(0),
            my_peer: opener.peer_addr(),
            secret: OnceLock::new(),
            forwards: Mutex::new(BTreeMap::new()),
            sealed: Mutex::new(BTreeMap::new()),
            bases: Mutex::new(BTreeMap::new()),
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

    /// Waits until no create, takeover, release or delete runs on `vol`,
    /// and runs this one: until the guard is dropped.
    fn lock_volume(&self, vol: &str) -> AdminGuard<'_> {
        let mut busy = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        while busy.contains(vol) {
            busy = self
                .admin_done
                .wait(busy)
                .unwrap_or_else(|e| e.into_inner());
        }
        busy.insert(vol.to_string());
        AdminGuard(self, vol.to_string())
    }

    /// The families this host owns.
    pub fn owned(&self) -> Vec<Arc<PoolCtx>> {
        self.read_owned().values().cloned().collect()
    }

    /// The family of `vol` if this host owns it and was not fenced. A
    /// fenced one (another host took the volume over while this one was
    /// paused or cut off) is dropped from the owned ones and closed in the
    /// background, so that this host's new clients are forwarded to the
    /// new owner; its old clients' I/O keeps failing.
    fn owned_family(&self, vol: &str) -> Option<Arc<PoolCtx>> {
        let f = self.read_owned().get(vol).cloned()?;
        let fenced = f.cache.as_ref().and_then(|c| c.stats().fenced);
        let Some(why) = fenced else {
            return Some(f);
        };
        let removed = {
            let mut owned = self.write_owned();
            match owned.get(vol) {
                Some(g) if Arc::ptr_eq(g, &f) => owned.remove(vol),
                _ => None,
            }
        };
        if let Some(f) = removed {
            tracing::warn!(pool = %self.name, volume = vol, fenced = %why, "another host took this volume over: this host closes it and forwards its new clients");
            let closing = std::thread::Builder::new()
                .name("close-fenced".into())
                .spawn(move || {
                    let _ = f.close();
                });
            if let Err(e) = closing {
                tracing::warn!(volume = vol, error = %e, "no thread to close a fenced volume");
            }
        }
        None
    }

    /// The open family of volume `vol` if this host owns it; otherwise an
    /// error that says who does (a GET of its manifest).
    pub fn family(&self, vol: &str) -> Result<Arc<PoolCtx>> {
        if let Some(f) = self.owned_family(vol) {
            return Ok(f);
        }
        let owner = self.store.owner(vol)?;
        let who = match (&owner.holder, owner.epoch) {
            (Some(h), Some(e)) => format!("owned by {h} (epoch {e})"),
            _ if owner.sealed => {
                return Err(Error::new(
                    ErrorKind::ReadOnly,
                    format!(
                        "volume {}/{vol} is a sealed template: every host serves it read-only over NBD, and no host owns it to change it (`vpool vol status {}/{vol}` describes it)",
                        self.name, self.name
                    ),
                ));
            }
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

    /// The open family of `vol`, which this host must own, taken out of
    /// the owned ones for `what` (release, delete): refused while NBD
    /// clients have it open, unless `force`. Taken out before the count,
    /// so a client that comes meanwhile is forwarded (and waits for the
    /// new owner) instead of opening a family being closed.
    fn take_idle(&self, vol: &str, what: &str, force: bool) -> Result<Arc<PoolCtx>> {
        let family = self.family(vol)?;
        self.write_owned().remove(vol);
        // Clients whose forwarding device turned local count even before
        // their first request opens the local device (some count twice:
        // refusing is the safe side).
        let n = family.service.catalog().nbd_connections_total() + self.local_forward_clients(vol);
        if n > 0 && !force {
            self.write_owned()
                .insert(vol.to_string(), Arc::clone(&family));
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
        let f = match opener.open(&dir, force)? {
            Opened::Pool(p) => Arc::new(PoolCtx::new(&format!("{}/{vol}", self.name), &dir, p)),
            Opened::Shared(_) => {
                return Err(Error::internal(format!(
                    "{} holds a shared pool, not a volume's family",
                    dir.display()
                )));
            }
        };
        if let Err(e) = self.resolve_base(opener, vol) {
            let _ = f.close();
            return Err(e);
        }
        Ok(f)
    }

    /// If `vol` is a clone, opens its template's view here (its device
    /// reads through it) and remembers it.
    fn resolve_base(&self, opener: &dyn Opener, vol: &str) -> Result<()> {
        let owner = self.store.owner(vol)?;
        let Some(template) = owner.base else {
            // Not a clone (any more: a volume of that name was deleted and
            // made again).
            self.forget_base(vol);
            return Ok(());
        };
        let of_template = self.store.owner(&template);
        let now = of_template.as_ref().ok().and_then(|o| o.family.clone());
        if owner.base_family.is_some() && now != owner.base_family {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!(
                    "volume {}/{vol} is a clone of a template {template} that was deleted (the volume of that name now is another one)",
                    self.name
                ),
            ));
        }
        let view = self.view_of(opener, &template, of_template)?.ok_or_else(|| {
            Error::new(
                ErrorKind::Corrupt,
                format!(
                    "volume {}/{vol} is a clone of {template}, which is not a sealed template (any more)",
                    self.name
                ),
            )
        })?;
        let base = Base {
            template,
            view,
            locks: CopyUpLocks::new(),
        };
        self.bases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(vol.to_string(), base);
        Ok(())
    }

    /// The template of clone `vol` as this host reads it, if `vol` is a
    /// clone this host owns.
    fn base_of(&self, vol: &str) -> Option<Base> {
        self.bases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vol)
            .cloned()
    }

    /// Forgets `vol`'s template (its family is gone from this host).
    fn forget_base(&self, vol: &str) {
        self.bases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vol);
    }

    /// Device of export `image` of family `f` (volume `vol`): layered over
    /// its template if `vol` is a clone. Every NBD path to a volume this
    /// host owns comes here.
    pub(super) fn device_of(
        &self,
        f: &PoolCtx,
        vol: &str,
        image: &str,
    ) -> std::result::Result<Arc<dyn BlockDevice>, DeviceError> {
        let top = f.exports.open(image)?;
        match self.base_of(vol) {
            Some(b) => {
                let base = b.view.exports.open(&b.template)?;
                Ok(Arc::new(LayeredDevice::new(top, base, b.locks)) as Arc<dyn BlockDevice>)
            }
            None => Ok(top),
        }
    }

    /// Whether `vol` is a clone of a template (its data is the template's
    /// where it wrote none), as far as this host knows.
    pub fn is_clone(&self, vol: &str) -> bool {
        self.base_of(vol).is_some()
    }

    /// Whether this host may own one more volume of the pool now (a
    /// forwarding host does not ask an owner to let go of a volume it
    /// could not take).
    pub(super) fn has_room(&self) -> bool {
        let opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        self.read_owned().len() + *opening < MAX_OWNED
    }

    /// Reserves room for one more owned volume (given back when the guard
    /// goes, by then counted among the owned ones if it was opened).
    fn check_room(&self) -> Result<RoomGuard<'_>> {
        let mut opening = self.opening.lock().unwrap_or_else(|e| e.into_inner());
        if self.read_owned().len() + *opening >= MAX_OWNED {
            return Err(Error::invalid(format!(
                "this host owns {MAX_OWNED} volumes of pool {} already (the most it opens)",
                self.name
            )));
        }
        *opening += 1;
        Ok(RoomGuard(self))
    }

    /// Creates volume `vol` of `size_bytes` in the bucket; this host owns
    /// it. Blocking.
    pub fn create_volume(
        &self,
        opener: &dyn Opener,
        vol: &str,
        size_bytes: u64,
        durability: Option<&str>,
    ) -> Result<crate::pool::VolumeView> {
        crate::names::check_volume_name(vol)?;
        if let Some(d) = durability
            && !matches!(d, "host" | "remote")
        {
            return Err(Error::invalid(format!(
                "durability is host or remote, not {d:?}"
            )));
        }
        self.make_owned(opener, vol, size_bytes, |dir| {
            self.store.create(vol, dir, durability)
        })
    }

    /// Makes volume `vol` of `size_bytes` in a family that `make` creates
    /// in the bucket with its cache in the directory given, opens it and
    /// owns it. Under `vol`'s admin lock, with room reserved.
    fn make_owned(
        &self,
        opener: &dyn Opener,
        vol: &str,
        size_bytes: u64,
        make: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<crate::pool::VolumeView> {
        let _admin = self.lock_volume(vol);
        let _room = self.check_room()?;
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
        make(&dir)?;
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
        let _admin = self.lock_volume(vol);
        if let Some(f) = self.owned_family(vol) {
            return Ok(f);
        }
        // (An unreadable owner is left to the open, which refuses a sealed
        // pool itself.)
        if self.store.owner(vol).is_ok_and(|o| o.sealed) {
            return Err(Error::new(
                ErrorKind::ReadOnly,
                format!(
                    "volume {}/{vol} is a sealed template: every host serves it read-only, none takes it",
                    self.name
                ),
            ));
        }
        let _room = self.check_room()?;
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
    pub fn release(&self, opener: &dyn Opener, vol: &str, force: bool) -> Result<()> {
        let _admin = self.lock_volume(vol);
        self.release_locked(opener, vol, force, false)
    }

    /// [`SharedCtx::release`] under the volume's admin lock.
    /// `seal`: the release seals the volume (`SharedCtx::seal`), asked only
    /// once no client is left (a refused release seals nothing later).
    fn release_locked(
        &self,
        opener: &dyn Opener,
        vol: &str,
        force: bool,
        seal: bool,
    ) -> Result<()> {
        let family = self.take_idle(vol, "release", force)?;
        if seal {
            let asked = match family.cache.as_ref() {
                Some(c) => c.seal_at_close(),
                None => Err(Error::internal(format!(
                    "volume {vol}'s family has no S3 cache"
                ))),
            };
            if let Err(e) = asked {
                self.write_owned()
                    .insert(vol.to_string(), Arc::clone(&family));
                return Err(e);
            }
        }
        let unuploaded_bytes = family.cache.as_ref().map_or(0, |c| c.stats().dirty_bytes);
        let started = std::time::Instant::now();
        let closed = family.close();
        let released = self.store.owner(vol).is_ok_and(|o| o.holder.is_none());
        if closed.is_err() || !released {
            // Its directory's lock goes with the last handle.
            drop(family);
            return Err(self.keep_after_failed_release(
                opener,
                vol,
                unuploaded_bytes,
                closed.err(),
            ));
        }
        self.store.forget(&family.dir);
        self.forget_base(vol);
        tracing::info!(pool = %self.name, volume = vol, unuploaded_bytes, close_ms = started.elapsed().as_millis() as u64, "volume released");
        Ok(())
    }

    /// A release whose close did not get everything into the bucket (a
    /// slow or failing bucket past the drain timeout) did not release the
    /// lease either: the cache holds acknowledged writes the bucket lacks,
    /// so this host opens the volume again from it (its own lease: no
    /// wait) and goes on serving it, instead of leaving it to a taker that
    /// would, once the lease lapsed, open the bucket without them.
    fn keep_after_failed_release(
        &self,
        opener: &dyn Opener,
        vol: &str,
        unuploaded_bytes: u64,
        closed: Option<Error>,
    ) -> Error {
        let why = closed.map_or_else(
            || "the bucket does not have everything yet".to_string(),
            |e| e.message,
        );
        tracing::warn!(pool = %self.name, volume = vol, unuploaded_bytes, reason = %why, "release did not finish: opening the volume again here");
        let kept = match self.open_family(opener, vol, false) {
            Ok(f) => {
                self.write_owned().insert(vol.to_string(), f);
                "it stays on this host"
            }
            Err(e) => {
                tracing::error!(pool = %self.name, volume = vol, error = %e.message, "reopening after a failed release failed: `vpool vol takeover` on this host retries (its cache holds what the bucket lacks)");
                "reopening it failed; `vpool vol takeover` on this host retries"
            }
        };
        Error::new(
            ErrorKind::Failed,
            format!(
                "release of volume {}/{vol} did not finish ({why}; {unuploaded_bytes} bytes were still to upload): {kept}",
                self.name
            ),
        )
    }

    /// Creates volume `new`, a clone of sealed template `template`: a
    /// family of its own, owned here, with an empty volume of the
    /// template's size whose device reads the template's blocks where it
    /// wrote none (`crate::layered`). The template records the clone
    /// first (`refs/`). Blocking.
    pub fn clone_volume(
        &self,
        opener: &dyn Opener,
        template: &str,
        new: &str,
    ) -> Result<crate::pool::VolumeView> {
        crate::names::check_volume_name(new)?;
        let view = self.sealed_family(opener, template)?.ok_or_else(|| {
            Error::invalid(format!(
                "volume {}/{template} is not a sealed template: seal it first (`vpool vol template {}/{template}` on its owner)",
                self.name, self.name
            ))
        })?;
        let size_bytes = view.service.volume(template)?.info.size_bytes;
        let out = self.make_owned(opener, new, size_bytes, |dir| {
            self.store.create_clone(new, dir, template)
        })?;
        tracing::info!(pool = %self.name, volume = new, template, "clone created");
        Ok(out)
    }

    /// Flattens clone `vol`, which this host owns, while its clients run:
    /// copies every block of its template that it reads into its own
    /// volume, waits until that is in the bucket, then records in its
    /// family that it has no template any more (its name record is
    /// create-only) and drops its ref from the template. Its devices pass
    /// straight to its own volume from then on. Refused for a clone with
    /// snapshots (they hold its own blocks only, so they would read zeros
    /// where the template's data was). Blocking: copies the template's
    /// data, then waits for its upload.
    pub fn flatten(&self, vol: &str) -> Result<crate::pool::Flattened> {
        let _admin = self.lock_volume(vol);
        let family = self.family(vol)?;
        let base = self.base_of(vol).ok_or_else(|| {
            Error::invalid(format!(
                "volume {}/{vol} is not a clone of a template: it has nothing to flatten",
                self.name
            ))
        })?;
        self.refuse_snapshots(&family, vol)?;
        let cache = family
            .cache
            .as_ref()
            .ok_or_else(|| Error::internal(format!("volume {}/{vol} has no bucket", self.name)))?;
        let started = std::time::Instant::now();
        let device = |e: DeviceError| Error::new(ErrorKind::Failed, e.to_string());
        let top = family.exports.open(vol).map_err(device)?;
        let template = base.view.exports.open(&base.template).map_err(device)?;
        let layered = LayeredDevice::new(Arc::clone(&top), template, Arc::clone(&base.locks));
        // While the clients run: the copy, and most of its upload.
        let mut copied_bytes = layered.copy_up_all().map_err(device)?;
        top.flush().map_err(device)?;
        wait_for_upload_lag(&**cache, FLATTEN_LAG_BYTES)?;
        // Then with their writes held: what is left to copy (blocks a
        // rollback to a snapshot taken meanwhile unmapped again), sealed
        // and in the bucket, listed by a manifest, before the mark that
        // makes every later owner read the clone's volume alone.
        {
            let held = base.locks.quiesce();
            self.refuse_snapshots(&family, vol)?;
            copied_bytes += layered.copy_up_all_quiesced(&held).map_err(device)?;
            // A snapshot taken since the check above holds a whole image.
            self.refuse_snapshots(&family, vol)?;
            family.service.pool().seal_open_segment()?;
            cache.wait_in_bucket(FLATTEN_HELD_LIMIT)?;
            self.store.mark_flattened(vol)?;
            base.locks.set_flattened();
        }
        drop((layered, top));
        self.forget_base(vol);
        if let Some(id) = self.store.owner(vol).ok().and_then(|o| o.family)
            && let Err(e) = self.store.drop_ref(&base.template, &id)
        {
            // Harmless: a flattened clone's ref is not counted.
            tracing::warn!(pool = %self.name, volume = vol, template = %base.template, error = %e.message, "could not drop a flattened clone's ref from its template");
        }
        tracing::info!(pool = %self.name, volume = vol, template = %base.template, copied_bytes, took_ms = started.elapsed().as_millis() as u64, "clone flattened");
        Ok(crate::pool::Flattened {
            detached_from: Some(base.template),
            bytes_copied: copied_bytes,
            volume: family.service.volume(vol)?,
        })
    }

    /// Refuses to flatten clone `vol` while it has snapshots.
    fn refuse_snapshots(&self, family: &PoolCtx, vol: &str) -> Result<()> {
        let snaps = family.service.list_snapshots(vol)?;
        if snaps.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = snaps.iter().map(|s| s.name.as_str()).collect();
        Err(Error::new(
            ErrorKind::InUse,
            format!(
                "clone {}/{vol} has snapshots ({}): they hold its own blocks only and would lose its template's; delete them first",
                self.name,
                names.join(", ")
            ),
        ))
    }

    /// Seals volume `vol`, which this host owns, as a template, for every
    /// host: seals it here (the template snapshot and the record of its
    /// digest, in the family), then releases it with a manifest that says
    /// it is sealed (everything in the bucket, no holder; one commit). From
    /// then on every host serves it read-only from the bucket and no host
    /// opens it for writing. A crash before that commit leaves a volume
    /// sealed in its own records but not released: `vol takeover` (once its
    /// lease lapsed) then `vol template` finish. Refused while NBD clients
    /// have it open. Blocking (hashes the image).
    pub fn seal(&self, opener: &dyn Opener, vol: &str) -> Result<crate::pool::VolumeView> {
        let _admin = self.lock_volume(vol);
        let family = self.family(vol)?;
        if self.is_clone(vol) {
            return Err(Error::invalid(format!(
                "volume {}/{vol} is a clone: its blocks are partly its template's, so it cannot be sealed (`vpool vol flatten` it first)",
                self.name
            )));
        }
        let current = family.service.volume(vol)?;
        let view = if current.template.is_some() {
            current
        } else {
            family.service.make_template(vol)?
        };
        drop(family);
        // The release is the seal: one commit in the bucket.
        let released = self.release_locked(opener, vol, false, true);
        let owner = self.store.owner(vol)?;
        if let Err(e) = released {
            if !(owner.sealed && owner.holder.is_none()) {
                return Err(e);
            }
            // Sealed all the same (the engine's close failed after the
            // store's release committed): the cache is of no more use.
            tracing::warn!(pool = %self.name, volume = vol, error = %e.message, "the release reported an error but sealed the volume");
            self.write_owned().remove(vol);
            self.store.forget(&self.family_dir(vol));
        }
        if !owner.sealed {
            return Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "volume {}/{vol} was released but its release did not seal it; `vpool vol takeover` then `vpool vol template` again",
                    self.name
                ),
            ));
        }
        tracing::info!(pool = %self.name, volume = vol, "volume sealed: every host serves it read-only");
        Ok(view)
    }

    /// The read-only view of sealed template `vol` on this host, opened
    /// at its first use (`None`: `vol` is not sealed). Blocking.
    pub fn sealed_family(&self, opener: &dyn Opener, vol: &str) -> Result<Option<Arc<PoolCtx>>> {
        // Asked every time, without the lock (a lookup of another volume
        // does not wait for the bucket): a template deleted from another
        // host is not served from this host's view any more.
        self.view_of(opener, vol, self.store.owner(vol))
    }

    /// [`SharedCtx::sealed_family`], with `owner` read from the bucket.
    fn view_of(
        &self,
        opener: &dyn Opener,
        vol: &str,
        owner: Result<FamilyOwner>,
    ) -> Result<Option<Arc<PoolCtx>>> {
        if matches!(&owner, Err(e) if e.kind == ErrorKind::NotFound) {
            self.drop_view(vol);
        }
        if !owner?.sealed {
            return Ok(None);
        }
        // The open below holds the lock, so that one view per template
        // opens; a template's first open is rare.
        let mut views = self.sealed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = views.get(vol) {
            return Ok(Some(Arc::clone(f)));
        }
        if views.len() >= MAX_OWNED {
            return Err(Error::invalid(format!(
                "this host has {MAX_OWNED} templates of pool {} open already (the most it opens)",
                self.name
            )));
        }
        let dir = self.dir.join("templates").join(vol);
        // Its cache is emptied at every open anyway; a pool.json from an
        // earlier run is made again.
        let _ = std::fs::remove_dir_all(&dir);
        self.store.attach(vol, &dir)?;
        let opened = match opener.open_read_only(&dir)? {
            Opened::Pool(p) => p,
            Opened::Shared(_) => {
                return Err(Error::internal(format!(
                    "{} holds a shared pool, not a template's family",
                    dir.display()
                )));
            }
        };
        let f = Arc::new(PoolCtx::new(&format!("{}/{vol}", self.name), &dir, opened));
        views.insert(vol.to_string(), Arc::clone(&f));
        tracing::info!(pool = %self.name, volume = vol, "sealed template opened read-only");
        Ok(Some(f))
    }

    /// Closes this host's view of template `vol`, if it has one.
    fn drop_view(&self, vol: &str) -> Option<Arc<PoolCtx>> {
        let view = self
            .sealed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(vol)?;
        if let Err(e) = view.close() {
            tracing::warn!(pool = %self.name, volume = vol, error = %e.message, "closing a template's view failed");
        }
        Some(view)
    }

    /// Deletes sealed template `vol` (from any host: nobody owns it):
    /// refused while a clone of it exists, and, unless `force`, while a
    /// clone's creation may be under way (a ref naming no volume) or this
    /// host's NBD clients read it. Another host's clients of it fail from
    /// then on. Blocking.
    fn delete_template(&self, vol: &str, force: bool) -> Result<()> {
        let (clones, pending) = self.store.clones_of(vol)?;
        if !clones.is_empty() {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "template {}/{vol} has clones ({}): delete or flatten them first",
                    self.name,
                    clones.join(", ")
                ),
            ));
        }
        let readers = self
            .sealed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(vol)
            .map_or(0, |v| v.service.catalog().nbd_connections_total());
        if (pending > 0 || readers > 0) && !force {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "template {}/{vol}: {pending} clone(s) of it being created (or whose creation died) and {readers} NBD client(s) here",
                    self.name
                ),
            ));
        }
        if let Some(view) = self.drop_view(vol) {
            self.store.forget(&view.dir);
        }
        let id = self.store.delete_name(vol)?;
        self.store.delete_family(&id)?;
        tracing::info!(pool = %self.name, volume = vol, family = %id, "template deleted");
        Ok(())
    }

    /// Deletes volume `vol`, which this host owns: its name first (no
    /// host finds it from then on), then its family (closed, and every
    /// object of it deleted) and its cache. A sealed template, which
    /// nobody owns, is deleted from any host (`delete_template`). Refused
    /// while NBD clients have it open, unless `force`. Blocking.
    pub fn delete(&self, vol: &str, force: bool) -> Result<()> {
        let _admin = self.lock_volume(vol);
        if self.owned_family(vol).is_none() {
            let owner = self.store.owner(vol)?;
            if owner.sealed {
                return self.delete_template(vol, force);
            }
            return self.delete_unmade(vol, &owner, force);
        }
        let family = self.take_idle(vol, "delete", force)?;
        let id = match self.store.delete_name(vol) {
            Ok(id) => id,
            Err(e) => {
                self.write_owned().insert(vol.to_string(), family);
                return Err(e);
            }
        };
        // Its data goes with the objects: the close's uploads are wasted
        // work, but the close must end the uploader before the deletion.
        if let Err(e) = family.close() {
            tracing::warn!(pool = %self.name, volume = vol, error = %e.message, "closing a deleted volume failed");
        }
        self.store.delete_family(&id)?;
        self.store.forget(&family.dir);
        if let Some(b) = self.base_of(vol) {
            // Its template no longer counts it (best effort: a ref left
            // behind only makes the template's deletion ask for --force).
            if let Err(e) = self.store.drop_ref(&b.template, &id) {
                tracing::warn!(pool = %self.name, volume = vol, error = %e.message, "could not remove a deleted clone's ref");
            }
        }
        self.forget_base(vol);
        tracing::info!(pool = %self.name, volume = vol, family = %id, "volume deleted");
        Ok(())
    }

    /// Deletes volume `vol`, which this host does not own: only a name
    /// whose family was never made (its creation died half way, or runs
    /// on another host now: hence `force`), with whatever objects the
    /// creation left. A volume with a family is deleted by its owner.
    fn delete_unmade(&self, vol: &str, owner: &FamilyOwner, force: bool) -> Result<()> {
        if owner.generation.is_some() {
            return Err(self.family(vol).err().unwrap_or_else(|| {
                Error::new(
                    ErrorKind::NotOwner,
                    format!("volume {}/{vol} moved here meanwhile; ask again", self.name),
                )
            }));
        }
        if !force {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "volume {}/{vol} has no family yet: its creation is under way on a host, or died half way; `vpool vol delete --force {}/{vol}` removes its name",
                    self.name, self.name
                ),
            ));
        }
        let id = self.store.delete_name(vol)?;
        self.store.delete_family(&id)?;
        tracing::warn!(pool = %self.name, volume = vol, family = %id, "name without a family deleted (by force)");
        Ok(())
    }

    /// A device for export `image` (`VOLUME` or `VOLUME@SNAPSHOT`) of this
    /// pool: the local one where this host owns the volume, else one that
    /// forwards to its owner (`host::forward`), or takes the volume here
    /// if nobody holds it. Blocking.
    pub fn serve(
        self: &Arc<Self>,
        opener: &Arc<dyn Opener>,
        image: &str,
    ) -> std::result::Result<Arc<dyn BlockDevice>, DeviceError> {
        let vol = image.split('@').next().unwrap_or(image);
        crate::names::check_volume_name(vol).map_err(|e| DeviceError::not_found(e.message))?;
        if let Some(f) = self.owned_family(vol)
            && let Some(dev) = self.open_owned(&f, vol, image)
        {
            return dev;
        }
        match self.sealed_family(opener.as_ref(), vol) {
            Ok(Some(f)) => return f.exports.open(image),
            Ok(None) => {}
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(DeviceError::not_found(e.message));
            }
            Err(e) => return Err(DeviceError::io(e.message)),
        }
        if self.my_peer.is_none() {
            let e = self.family(vol).err().map(|e| e.message);
            return Err(DeviceError::not_found(format!(
                "{}; this daemon runs without --peer-listen, so it does not forward",
                e.unwrap_or_default()
            )));
        }
        let fwd = {
            let mut map = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(vol).and_then(Weak::upgrade) {
                Some(f) => f,
                None => {
                    let f = Forward::start(Arc::clone(self), Arc::clone(opener), vol);
                    map.insert(vol.to_string(), Arc::downgrade(&f));
                    f
                }
            }
        };
        fwd.device(image)
    }

    /// Opens export `image` of family `f` (volume `vol`), if `f` is still
    /// the owned family once the device is registered: a release or
    /// delete takes the family out of the owned ones before it counts
    /// the clients, so a device registered after that count sees it gone
    /// (and is dropped: `None`, the caller forwards or says busy).
    pub(super) fn open_owned(
        &self,
        f: &Arc<PoolCtx>,
        vol: &str,
        image: &str,
    ) -> Option<std::result::Result<Arc<dyn BlockDevice>, DeviceError>> {
        let dev = self.device_of(f, vol, image);
        self.still_owned(vol, f).then_some(dev)
    }

    /// Whether `f` is the family of `vol` this host owns (a cheap check:
    /// no figures, no bucket).
    pub(super) fn still_owned(&self, vol: &str, f: &Arc<PoolCtx>) -> bool {
        self.read_owned()
            .get(vol)
            .is_some_and(|g| Arc::ptr_eq(g, f))
    }

    /// Where volume `vol` is: here, free, or at another host's peer
    /// address (a GET of its manifest).
    pub(super) fn owner_route(&self, vol: &str) -> Result<Owner> {
        if self.owned_family(vol).is_some() {
            return Ok(Owner::Here);
        }
        let o = self.store.owner(vol)?;
        match (&o.holder, o.peer.clone()) {
            (None, _) if o.generation.is_some() => Ok(Owner::Free),
            (None, _) => Err(Error::new(
                ErrorKind::NotFound,
                format!(
                    "volume {}/{vol} has no family yet (being created, or its creation died)",
                    self.name
                ),
            )),
            // This host's address but not owned here: a release under way
            // here, or a holder from before this daemon restarted.
            (Some(_), Some(p)) if Some(&p) == self.my_peer.as_ref() => Ok(Owner::Gone(p)),
            (Some(_), Some(p)) => Ok(Owner::Peer(p, o.epoch.unwrap_or(0))),
            (Some(h), None) => Err(Error::new(
                ErrorKind::NotOwner,
                format!(
                    "volume {}/{vol} is owned by {h}, which serves no peer link (its daemon runs without --peer-listen); `vpool vol takeover` moves it here",
                    self.name
                ),
            )),
        }
    }

    /// This host's clients of `vol` whose forwarding devices now route to
    /// the family owned here.
    fn local_forward_clients(&self, vol: &str) -> usize {
        let fwd = {
            let map = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
            map.get(vol).and_then(Weak::upgrade)
        };
        fwd.filter(|f| f.is_local()).map_or(0, |f| f.clients())
    }

    /// This host's NBD clients of `vol` that it forwards to the owner.
    fn forwarded_clients(&self, vol: &str) -> u64 {
        let map = self.forwards.lock().unwrap_or_else(|e| e.into_inner());
        map.get(vol)
            .and_then(Weak::upgrade)
            .map_or(0, |f| f.clients() as u64)
    }

    /// The pool's peer link secret, read once from the bucket.
    pub fn peer_secret(&self) -> Result<Secret> {
        if let Some(s) = self.secret.get() {
            return Ok(s.clone());
        }
        let s = Secret(self.store.peer_secret()?);
        Ok(self.secret.get_or_init(|| s).clone())
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
            cache_size_bytes: None,
            durability: None,
            forwarded_clients: None,
        };
        if let Some(f) = self.owned_family(vol) {
            out.here = true;
            out.size_bytes = f.service.volume(vol).ok().map(|v| v.info.size_bytes);
            out.nbd_connections = Some(f.service.catalog().nbd_connections_total() as u64);
            let stats = f.cache.as_ref().map(|c| c.stats());
            out.unuploaded_bytes = stats.as_ref().map(|s| s.dirty_bytes);
            out.cache_size_bytes = stats.as_ref().map(|s| s.cache_size_bytes);
            out.durability = stats.map(|s| s.durability);
        } else {
            out.durability = out.owner.volume_durability.clone();
            out.forwarded_clients = Some(self.forwarded_clients(vol));
        }
        Ok(out)
    }

    /// Closes every family this host owns (at shutdown or detach): each
    /// uploads and releases its lease, and keeps its cache so the host
    /// opens it again at its next start. Returns the first error.
    pub fn close(&self) -> Result<()> {
        let mut owned: Vec<_> = std::mem::take(&mut *self.write_owned())
            .into_values()
            .collect();
        let views = std::mem::take(&mut *self.sealed.lock().unwrap_or_else(|e| e.into_inner()));
        owned.extend(views.into_values());
        let mut first = None;
        for f in owned {
            if let Err(e) = f.close() {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Waits until at most `lag_bytes` written here are not in the bucket:
/// an error if this host is fenced, or if the upload makes no progress
/// for [`FLATTEN_STALL_LIMIT`].
fn wait_for_upload_lag(cache: &dyn crate::CacheControl, lag_bytes: u64) -> Result<()> {
    let mut best = u64::MAX;
    let mut progress_at = std::time::Instant::now();
    loop {
        let stats = cache.stats();
        if let Some(why) = stats.fenced {
            return Err(Error::new(ErrorKind::NotOwner, why));
        }
        if stats.dirty_bytes <= lag_bytes {
            return Ok(());
        }
        if stats.dirty_bytes < best {
            best = stats.dirty_bytes;
            progress_at = std::time::Instant::now();
        } else if progress_at.elapsed() >= FLATTEN_STALL_LIMIT {
            return Err(Error::new(
                ErrorKind::Failed,
                format!(
                    "the upload made no progress for {} s ({} bytes left); is the bucket reachable?",
                    FLATTEN_STALL_LIMIT.as_secs(),
                    stats.dirty_bytes
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A clone's template, as this host reads it (`SharedCtx::bases`).
#[derive(Clone)]
struct Base {
    template: String,
    view: Arc<PoolCtx>,
    locks: Arc<CopyUpLocks>,
}

/// A create, takeover, release or delete running on one volume.
struct AdminGuard<'a>(&'a SharedCtx, String);

impl Drop for AdminGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.0.admin.lock().unwrap_or_else(|e| e.into_inner());
        busy.remove(&self.1);
        self.0.admin_done.notify_all();
    }
}

/// Room reserved for a volume being opened.
struct RoomGuard<'a>(&'a SharedCtx);

impl Drop for RoomGuard<'_> {
    fn drop(&mut self) {
        let mut opening = self.0.opening.lock().unwrap_or_else(|e| e.into_inner());
        *opening -= 1;
    }
}
