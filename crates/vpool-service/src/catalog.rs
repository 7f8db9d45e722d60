//! What the daemon knows about volumes that the engine does not keep.
//!
//! - **Templates** (persisted): a template is a volume sealed as a gold
//!   master. The engine has no read-only flag, so sealing is a snapshot with
//!   the reserved name [`TEMPLATE_SNAPSHOT`] (clones are made from it) plus a
//!   record here saying the volume is sealed, with the SHA-256 digest of its
//!   content. The records live in the pool's metadata blob
//!   [`TEMPLATES_META_NAME`], replaced atomically and durably by the store, so
//!   they survive restarts and crashes and travel with the pool. Writes to a
//!   sealed volume are refused: over the API with `409 read_only`, over NBD
//!   by exporting it read-only (`EPERM`).
//! - **Imports in progress** (persisted, in the same blob): a volume whose
//!   content an import (or an incremental import) is replacing is marked
//!   before the first byte is written and unmarked after the last one is
//!   flushed, so a volume half-imported when the daemon or the CLI died is
//!   shown as incomplete, and NBD refuses to serve it, instead of passing
//!   for a whole disk.
//! - **Users** (in memory): per volume id, how many NBD connections have it
//!   open for writing or reading, and how many API requests are changing it
//!   right now. Rollback is refused while NBD writers are connected, sealing
//!   while anything writes, and an ephemeral volume is deleted when its last
//!   NBD connection that did I/O goes away.
//!
//! # Sealing and crashes
//! The record is written (digest pending) *before* the snapshot is taken,
//! and writers are refused from that moment, so whatever a crash interrupts,
//! the volume's content has not changed since the record became durable.
//! [`Catalog::reconcile`], run when the daemon starts, finishes the job:
//! takes the snapshot if it is missing, computes a missing digest, and drops
//! records of volumes that no longer exist.
//!
//! # Lock order
//! The catalog's lock is taken before any engine call made under it (never
//! the other way round): the ephemeral delete and the seal checks call the
//! engine while holding it, so an NBD open cannot slip in between.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vpool_engine::{EngineError, Pool, STATE_ZERO, Volume};
use vpool_store::SegmentStore;

use crate::error::{Error, ErrorKind};

/// The snapshot that holds a template's sealed image. The name is reserved:
/// users cannot create a snapshot of that name on any volume.
pub const TEMPLATE_SNAPSHOT: &str = "template";

/// The pool metadata blob holding the template records.
pub const TEMPLATES_META_NAME: &str = "vpool-templates.json";

/// Version of the templates blob this code writes and reads.
const TEMPLATES_VERSION: u32 = 1;

/// Bytes read at a time when hashing an image.
const DIGEST_CHUNK: usize = 8 << 20;

/// One sealed volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// The engine's id of the volume, so a volume deleted and re-created
    /// under the same name is not taken for the template.
    pub volume_id: u64,
    /// `sha256:<hex>`; `None` while it is being computed (or a crash cut
    /// that short: [`Catalog::reconcile`] computes it).
    pub digest: Option<String>,
    pub sealed_at_unix: u64,
}

#[derive(Default, Serialize, Deserialize)]
struct TemplatesFile {
    version: u32,
    templates: BTreeMap<String, TemplateRecord>,
    /// Volumes an import is writing into (name: volume id).
    #[serde(default)]
    importing: BTreeMap<String, u64>,
    /// Volumes that are replicas of another pool's volume (`replica add`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    replicas: BTreeMap<String, ReplicaMark>,
    /// Volumes with QoS limits (`vpool vol qos`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    qos: BTreeMap<String, QosRecord>,
    /// Volumes several NBD clients may write at once (`vpool vol share`):
    /// name, volume id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    multi_writer: BTreeMap<String, u64>,
    /// When each snapshot was taken (volume id: snapshot name: Unix ms);
    /// the engine's records carry no wall-clock time. Snapshots taken by
    /// an earlier release have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    snapshot_times: BTreeMap<u64, BTreeMap<String, u64>>,
    /// Volumes in the trash (volume id: what it was), each renamed to
    /// [`trash_name`] of its id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    trash: BTreeMap<u64, TrashRecord>,
}

/// A volume in the trash (`vpool vol trash mv`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashRecord {
    /// Its name before it went to the trash.
    pub name: String,
    /// When it went there (Unix ms).
    pub trashed_unix_ms: u64,
    /// When the daemon deletes it for good on its own (`trash mv
    /// --expire`); `None`: kept until `rm` or `purge`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
}

/// The name a volume in the trash has in the engine: reserved (it starts
/// with `.`), so no user can create or open it, and unique (the id is).
pub fn trash_name(id: u64) -> String {
    format!(".trash.{id}")
}

/// Whether `name` is a reserved name (the trash's): not a volume any
/// client or API route may address.
pub fn is_reserved(name: &str) -> bool {
    name.starts_with('.')
}

/// A volume's QoS limits (`crate::qos`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosRecord {
    pub volume_id: u64,
    pub limits: crate::qos::QosLimits,
}

/// A volume that replication writes (`vpool replica add`): its head is
/// refused to NBD and to the API (it is half a run between two points);
/// its points are snapshots, read as `VOLUME@POINT`, until it is promoted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMark {
    pub volume_id: u64,
    /// What it replicates: `POOL/VOLUME`.
    pub source: String,
    /// The newest point a run finished (a snapshot of the volume), the one
    /// a promote rolls back to; `None` until the first run finished.
    #[serde(default)]
    pub last_point: Option<String>,
}

/// How an NBD connection holds a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Write,
    Read,
}

#[derive(Debug, Default)]
struct Users {
    nbd_writers: usize,
    nbd_readers: usize,
    api_writes: usize,
    /// An NBD connection did I/O on the volume since the count of NBD
    /// connections was last zero: the next time it drops to zero, an
    /// ephemeral volume is deleted. (Handles opened for `NBD_OPT_INFO`,
    /// e.g. by `nbdinfo --list`, do no I/O and so delete nothing.)
    armed: bool,
}

impl Users {
    fn idle(&self) -> bool {
        self.nbd_writers == 0 && self.nbd_readers == 0 && self.api_writes == 0
    }
}

#[derive(Default)]
struct Inner {
    templates: BTreeMap<String, TemplateRecord>,
    importing: BTreeMap<String, u64>,
    users: HashMap<u64, Users>,
    /// Volumes (ids) being moved to another pool: their data changes over
    /// NBD only, which mirrors it (not kept: a restart ends a move).
    moving: std::collections::BTreeSet<u64>,
    replicas: BTreeMap<String, ReplicaMark>,
    qos: BTreeMap<String, QosRecord>,
    multi_writer: BTreeMap<String, u64>,
    snapshot_times: BTreeMap<u64, BTreeMap<String, u64>>,
    trash: BTreeMap<u64, TrashRecord>,
    /// Volumes (ids) a copy reads now, and how many copies: not renamed
    /// or trashed under them (not kept: a restart ends a copy).
    copying: HashMap<u64, usize>,
    /// The secret NBD export name of each import under way (volume id:
    /// token), through which its importer writes the volume that NBD
    /// otherwise refuses while it is incomplete (not kept: an importer
    /// that outlives a restart begins again).
    import_tokens: HashMap<u64, ImportToken>,
}

/// An import's secret, and whether it is still the live one: the flag its
/// devices check on every request (without this lock), cleared when the
/// import ends or begins again.
struct ImportToken {
    token: String,
    live: Arc<std::sync::atomic::AtomicBool>,
}

impl Inner {
    /// Ends the import token of volume `id`, if it has one: its devices'
    /// requests fail from now on.
    fn drop_import_token(&mut self, id: u64) {
        if let Some(t) = self.import_tokens.remove(&id) {
            t.live.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Moves the records of volume `id` from name `old` to `new` (replacing
    /// any under `new`: stale, since `new` is this volume's); true if there
    /// were any.
    fn rekey(&mut self, old: &str, id: u64, new: &str) -> bool {
        fn take<V>(
            map: &mut BTreeMap<String, V>,
            old: &str,
            new: &str,
            mine: impl Fn(&V) -> bool,
        ) -> bool {
            match map.get(old) {
                Some(v) if mine(v) => {
                    let v = map.remove(old).expect("just seen");
                    map.insert(new.to_string(), v);
                    true
                }
                _ => false,
            }
        }
        let mut moved = take(&mut self.templates, old, new, |t| t.volume_id == id);
        moved |= take(&mut self.importing, old, new, |i| *i == id);
        moved |= take(&mut self.replicas, old, new, |r| r.volume_id == id);
        moved |= take(&mut self.qos, old, new, |q| q.volume_id == id);
        moved |= take(&mut self.multi_writer, old, new, |i| *i == id);
        moved
    }

    /// Refuses `what` (a rename, a move to the trash) of volume `volume`
    /// (id `id`) while it moves or any NBD client has it open: a client
    /// asks for a volume by name when it reconnects, and would find none
    /// (or another).
    fn refuse_busy(&self, volume: &str, id: u64, what: &str) -> Result<(), Error> {
        if self.moving.contains(&id) {
            return Err(moving(volume, what));
        }
        if self.copying.contains_key(&id) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("{what} refused: a copy reads volume {volume} (`vpool job list`)"),
            ));
        }
        if self.importing.get(volume) == Some(&id) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{what} refused: volume {volume} is incomplete (an import or a copy into it is under way, or did not finish): finish it, or delete the volume"
                ),
            ));
        }
        let open = self
            .users
            .get(&id)
            .map_or(0, |u| u.nbd_writers + u.nbd_readers);
        if open > 0 {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{what} refused: volume {volume} is open by {open} NBD client(s), which ask for it by name when they reconnect; disconnect them (stop the VM) first"
                ),
            ));
        }
        Ok(())
    }

    /// The (name, id) of every record keyed by name.
    fn named_records(&self) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = Vec::new();
        all.extend(self.templates.iter().map(|(n, t)| (n.clone(), t.volume_id)));
        all.extend(self.importing.iter().map(|(n, i)| (n.clone(), *i)));
        all.extend(self.replicas.iter().map(|(n, r)| (n.clone(), r.volume_id)));
        all.extend(self.qos.iter().map(|(n, q)| (n.clone(), q.volume_id)));
        all.extend(self.multi_writer.iter().map(|(n, i)| (n.clone(), *i)));
        all
    }

    fn sealed(&self, volume: &str, id: u64) -> Option<&TemplateRecord> {
        self.templates.get(volume).filter(|t| t.volume_id == id)
    }

    fn replica(&self, volume: &str, id: u64) -> Option<&ReplicaMark> {
        self.replicas.get(volume).filter(|r| r.volume_id == id)
    }
}

/// Why the catalog could not be loaded or saved.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("reading the template records ({TEMPLATES_META_NAME}): {0}")]
    Store(#[from] vpool_store::StoreError),
    #[error("the template records ({TEMPLATES_META_NAME}) are not valid: {0}")]
    Corrupt(String),
}

/// The daemon's bookkeeping; see the module docs. Shared by the API server
/// and the NBD exports.
pub struct Catalog {
    inner: Mutex<Inner>,
    /// Where template records persist; `None` keeps them in memory only.
    store: Option<Arc<dyn SegmentStore>>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("persistent", &self.store.is_some())
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Catalog {
    /// A catalog whose template records are lost when it is dropped (tests,
    /// and a pool service built without a store for them).
    pub fn in_memory() -> Catalog {
        Catalog {
            inner: Mutex::new(Inner::default()),
            store: None,
        }
    }

    /// Loads the template records from the pool's store; they are saved
    /// back there on every change.
    pub fn open(store: Arc<dyn SegmentStore>) -> Result<Catalog, CatalogError> {
        let f = match store.get_meta(TEMPLATES_META_NAME)? {
            None => TemplatesFile::default(),
            Some(bytes) => {
                let f: TemplatesFile = serde_json::from_slice(&bytes)
                    .map_err(|e| CatalogError::Corrupt(e.to_string()))?;
                if f.version != TEMPLATES_VERSION {
                    return Err(CatalogError::Corrupt(format!(
                        "version {} (this vpool reads version {TEMPLATES_VERSION})",
                        f.version
                    )));
                }
                f
            }
        };
        Ok(Catalog {
            inner: Mutex::new(Inner {
                templates: f.templates,
                importing: f.importing,
                users: HashMap::new(),
                moving: Default::default(),
                replicas: f.replicas,
                qos: f.qos,
                multi_writer: f.multi_writer,
                snapshot_times: f.snapshot_times,
                trash: f.trash,
                copying: HashMap::new(),
                import_tokens: HashMap::new(),
            }),
            store: Some(store),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent counters (every
        // update is a single step), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn persist(&self, inner: &Inner) -> Result<(), Error> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let f = TemplatesFile {
            version: TEMPLATES_VERSION,
            templates: inner.templates.clone(),
            importing: inner.importing.clone(),
            replicas: inner.replicas.clone(),
            qos: inner.qos.clone(),
            multi_writer: inner.multi_writer.clone(),
            snapshot_times: inner.snapshot_times.clone(),
            trash: inner.trash.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&f)
            .map_err(|e| Error::internal(format!("encoding the template records: {e}")))?;
        store
            .put_meta(TEMPLATES_META_NAME, &bytes)
            .map_err(|e| Error::from(EngineError::Store(e)).context("saving the template records"))
    }

    // ----- templates -----

    /// The template record of `volume` (whose id is `id`), if it is sealed.
    pub fn template(&self, volume: &str, id: u64) -> Option<TemplateRecord> {
        self.lock().sealed(volume, id).cloned()
    }

    /// Every template record, by volume name.
    pub fn templates(&self) -> BTreeMap<String, TemplateRecord> {
        self.lock().templates.clone()
    }

    /// Seals `volume` as a template: refuses writers from now on, takes the
    /// [`TEMPLATE_SNAPSHOT`], and records the SHA-256 digest of its content
    /// (reading the whole image). Blocking: run it off the async runtime.
    ///
    /// Calling it again on a template whose digest is missing (a failed or
    /// interrupted seal) completes it; on a complete template it is refused
    /// with `already_exists`.
    pub fn seal(&self, pool: &Pool, volume: &str) -> Result<TemplateRecord, Error> {
        let info = pool.volume_info(volume)?;
        let id = info.id.0;
        if info.ephemeral {
            return Err(Error::invalid(format!(
                "volume {volume} is ephemeral (deleted at the next restart); a template must last"
            )));
        }
        let resume = {
            let mut g = self.lock();
            if let Some(r) = g.replica(volume, id) {
                return Err(read_only_replica(volume, &r.source, "sealing"));
            }
            if let Some(t) = g.sealed(volume, id) {
                if t.digest.is_some() {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!("volume {volume} is already a template"),
                    ));
                }
                true
            } else {
                let u = g.users.get(&id);
                let nbd = u.map_or(0, |u| u.nbd_writers);
                let api = u.map_or(0, |u| u.api_writes);
                if nbd > 0 || api > 0 {
                    return Err(Error::new(
                        ErrorKind::InUse,
                        format!(
                            "volume {volume} is being written ({nbd} NBD client(s) with it open for writing, {api} API request(s) in flight); disconnect them before sealing it"
                        ),
                    ));
                }
                if pool
                    .list_snapshots(volume)?
                    .iter()
                    .any(|s| s.name == TEMPLATE_SNAPSHOT)
                {
                    return Err(Error::new(
                        ErrorKind::AlreadyExists,
                        format!(
                            "volume {volume} already has a snapshot named {TEMPLATE_SNAPSHOT:?}, the name a template's image takes; delete it first (vpool snap delete {volume}@{TEMPLATE_SNAPSHOT})"
                        ),
                    ));
                }
                g.templates.insert(
                    volume.to_string(),
                    TemplateRecord {
                        volume_id: id,
                        digest: None,
                        sealed_at_unix: now_unix(),
                    },
                );
                if let Err(e) = self.persist(&g) {
                    g.templates.remove(volume);
                    return Err(e);
                }
                false
            }
        };
        // Sealed from here: every writer is refused.
        if (!resume || !has_template_snapshot(pool, volume)?)
            && let Err(e) = pool.create_snapshot(volume, TEMPLATE_SNAPSHOT)
        {
            if !resume {
                // Only the record this seal made: the volume, its QoS,
                // sharing and snapshot times stay.
                let mut g = self.lock();
                if g.sealed(volume, id).is_some() {
                    g.templates.remove(volume);
                    if let Err(e) = self.persist(&g) {
                        tracing::warn!(volume, error = %e, "could not save the template records");
                    }
                }
            }
            return Err(e.into());
        }
        let digest = image_digest(&pool.snapshot(volume, TEMPLATE_SNAPSHOT)?)?;
        let mut g = self.lock();
        let Some(rec) = g.templates.get_mut(volume).filter(|t| t.volume_id == id) else {
            // Deleted while it was being hashed.
            return Err(EngineError::VolumeNotFound(volume.to_string()).into());
        };
        rec.digest = Some(digest);
        let rec = rec.clone();
        self.persist(&g)?;
        Ok(rec)
    }

    /// Drops the template record of `volume` (id `id`), after the volume
    /// was deleted or a seal failed.
    pub fn forget(&self, volume: &str, id: u64) {
        let mut g = self.lock();
        let importing = g.importing.get(volume) == Some(&id);
        if importing {
            g.importing.remove(volume);
        }
        let replica = g.replicas.get(volume).is_some_and(|r| r.volume_id == id);
        if replica {
            g.replicas.remove(volume);
        }
        let qos = g.qos.get(volume).is_some_and(|r| r.volume_id == id);
        if qos {
            g.qos.remove(volume);
        }
        let shared = g.multi_writer.get(volume) == Some(&id);
        if shared {
            g.multi_writer.remove(volume);
        }
        let timed = g.snapshot_times.remove(&id).is_some();
        let trashed = g.trash.remove(&id).is_some();
        g.drop_import_token(id);
        if g.sealed(volume, id).is_some()
            || importing
            || replica
            || qos
            || shared
            || timed
            || trashed
        {
            g.templates
                .retain(|n, t| !(n == volume && t.volume_id == id));
            if let Err(e) = self.persist(&g) {
                // The stale record names a volume id that no longer exists;
                // the next start drops it.
                tracing::warn!(volume, error = %e, "could not save the template records");
            }
        }
    }

    /// Renames volume `volume` (id `id`) to `new` with `rename` (the
    /// engine's rename; it must not call the catalog), then moves the
    /// volume's records to the new name. Refused while the volume moves or
    /// any NBD client has it open: a client asks for a volume by name when
    /// it reconnects, and would find none (or another). The check and the
    /// rename run under the lock an NBD open takes. If saving the records
    /// fails, the rename stands and [`Catalog::reconcile`] moves them at
    /// the next start (they keep the volume's id).
    pub fn rename<T>(
        &self,
        volume: &str,
        id: u64,
        new: &str,
        rename: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut g = self.lock();
        g.refuse_busy(volume, id, "rename")?;
        let out = rename()?;
        if g.rekey(volume, id, new)
            && let Err(e) = self.persist(&g)
        {
            tracing::warn!(volume, new, error = %e, "renamed, but could not save the volume's records under the new name; the next start moves them");
        }
        Ok(out)
    }

    /// Brings the records in line with the pool, at daemon start: drops
    /// those of volumes that are gone, finishes seals a crash interrupted.
    /// Blocking.
    pub fn reconcile(&self, pool: &Pool) -> Result<(), Error> {
        // Each volume's name now, by id.
        let names: HashMap<u64, String> = (pool.list_volumes().into_iter())
            .map(|v| (v.id.0, v.name))
            .collect();
        let mut changed = self.follow_renames(&names);
        changed |= self.reconcile_trash(&names);
        let records = self.templates();
        for (name, rec) in records {
            match pool.volume_info(&name) {
                Ok(i) if i.id.0 == rec.volume_id => {}
                _ => {
                    tracing::info!(volume = %name, "dropping the template record of a volume that is gone");
                    let mut g = self.lock();
                    g.templates.remove(&name);
                    changed = true;
                    continue;
                }
            }
            if !has_template_snapshot(pool, &name)? {
                tracing::info!(volume = %name, "finishing an interrupted seal: taking the template snapshot");
                pool.create_snapshot(&name, TEMPLATE_SNAPSHOT)?;
            }
            if rec.digest.is_none() {
                tracing::info!(volume = %name, "finishing an interrupted seal: computing the digest");
                let d = image_digest(&pool.snapshot(&name, TEMPLATE_SNAPSHOT)?)?;
                let mut g = self.lock();
                if let Some(r) = g.templates.get_mut(&name) {
                    r.digest = Some(d);
                    changed = true;
                }
            }
        }
        let marks: Vec<(String, u64)> = self.lock().importing.clone().into_iter().collect();
        for (name, id) in marks {
            if pool.volume_info(&name).is_ok_and(|i| i.id.0 == id) {
                tracing::warn!(volume = %name, "an import into this volume did not finish: it is incomplete until imported again or deleted");
                continue;
            }
            self.lock().importing.remove(&name);
            changed = true;
        }
        let replicas: Vec<(String, u64)> = (self.lock().replicas.iter())
            .map(|(n, r)| (n.clone(), r.volume_id))
            .collect();
        for (name, id) in replicas {
            if !pool.volume_info(&name).is_ok_and(|i| i.id.0 == id) {
                self.lock().replicas.remove(&name);
                changed = true;
            }
        }
        let limited: Vec<(String, u64)> = (self.lock().qos.iter())
            .map(|(n, r)| (n.clone(), r.volume_id))
            .collect();
        for (name, id) in limited {
            if !pool.volume_info(&name).is_ok_and(|i| i.id.0 == id) {
                self.lock().qos.remove(&name);
                changed = true;
            }
        }
        let shared: Vec<(String, u64)> = (self.lock().multi_writer.iter())
            .map(|(n, id)| (n.clone(), *id))
            .collect();
        for (name, id) in shared {
            if !pool.volume_info(&name).is_ok_and(|i| i.id.0 == id) {
                self.lock().multi_writer.remove(&name);
                changed = true;
            }
        }
        // Times of volumes gone without a `forget` (ephemeral ones go at
        // their last close, and at a restart).
        let ids: std::collections::HashSet<u64> =
            pool.list_volumes().iter().map(|v| v.id.0).collect();
        let mut g = self.lock();
        let before = g.snapshot_times.len();
        g.snapshot_times.retain(|id, _| ids.contains(id));
        changed |= g.snapshot_times.len() != before;
        drop(g);
        if changed {
            let g = self.lock();
            self.persist(&g)?;
        }
        Ok(())
    }

    // ----- the trash -----

    /// Moves volume `volume` (id `id`) to the trash with `rename` (the
    /// engine's rename to [`trash_name`]; it must not call the catalog).
    /// The trash record is saved first, so a crash leaves either the
    /// volume where it was (the record is dropped at the next start) or in
    /// the trash with its record. Refused as [`Catalog::rename`] is.
    /// `applied` says, after a failed `rename`, whether the engine renamed
    /// the volume anyway (a flush that failed after the record was
    /// applied): its record then stays, and the next start decides.
    /// `expire_secs`: deleted for good that long after (see
    /// [`TrashRecord::expires_unix_ms`]).
    pub fn trash<T>(
        &self,
        volume: &str,
        id: u64,
        expire_secs: Option<u64>,
        rename: impl FnOnce() -> Result<T, Error>,
        applied: impl FnOnce() -> bool,
    ) -> Result<TrashRecord, Error> {
        let mut g = self.lock();
        g.refuse_busy(volume, id, "moving to the trash")?;
        let now = crate::jobs::unix_ms();
        let rec = TrashRecord {
            name: volume.to_string(),
            trashed_unix_ms: now,
            expires_unix_ms: expire_secs.map(|s| now.saturating_add(s.saturating_mul(1000))),
        };
        g.trash.insert(id, rec.clone());
        if let Err(e) = self.persist(&g).and_then(|()| rename().map(drop)) {
            if applied() {
                return Err(e);
            }
            g.trash.remove(&id);
            if let Err(p) = self.persist(&g) {
                tracing::warn!(volume, error = %p, "could not drop the trash record of a failed move to the trash; the next start drops it");
            }
            return Err(e);
        }
        if g.rekey(volume, id, &trash_name(id))
            && let Err(e) = self.persist(&g)
        {
            tracing::warn!(volume, error = %e, "in the trash, but could not save its records there; the next start moves them");
        }
        Ok(rec)
    }

    /// Takes volume `id` out of the trash under the name `new`, with
    /// `rename` (the engine's rename; it must not call the catalog). The
    /// engine's rename comes first: a crash after it leaves a stale trash
    /// record, dropped at the next start.
    pub fn restore<T>(
        &self,
        id: u64,
        new: &str,
        rename: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let mut g = self.lock();
        if !g.trash.contains_key(&id) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no volume with id {id} in the trash (`vpool vol trash ls`)"),
            ));
        }
        let out = rename()?;
        g.trash.remove(&id);
        g.rekey(&trash_name(id), id, new);
        if let Err(e) = self.persist(&g) {
            tracing::warn!(volume = new, error = %e, "restored from the trash, but could not save its records; the next start mends them");
        }
        Ok(out)
    }

    /// Marks volume `id` as read by a copy until the guard goes.
    pub fn hold_for_copy(self: &Arc<Self>, id: u64) -> CopyHold {
        *self.lock().copying.entry(id).or_default() += 1;
        CopyHold {
            catalog: Arc::clone(self),
            id,
        }
    }

    /// The volumes in the trash: id, what they were.
    pub fn trashed(&self) -> BTreeMap<u64, TrashRecord> {
        self.lock().trash.clone()
    }

    /// Trash records in line with the pool: dropped where the volume is
    /// not (or no longer) at its trash name, made up (named after the id)
    /// for a volume at a trash name without one. True if any changed.
    fn reconcile_trash(&self, names: &HashMap<u64, String>) -> bool {
        let mut g = self.lock();
        let before = g.trash.clone();
        g.trash
            .retain(|id, _| names.get(id).is_some_and(|n| *n == trash_name(*id)));
        for (id, name) in names {
            if *name == trash_name(*id) && !g.trash.contains_key(id) {
                tracing::warn!(volume = %name, "a volume in the trash without its record: listed as volume-{id}");
                let rec = TrashRecord {
                    name: format!("volume-{id}"),
                    trashed_unix_ms: crate::jobs::unix_ms(),
                    expires_unix_ms: None,
                };
                g.trash.insert(*id, rec);
            }
        }
        g.trash != before
    }

    /// Moves records whose volume (by id) now has another name: a rename
    /// whose records were not saved. True if any moved.
    fn follow_renames(&self, names: &HashMap<u64, String>) -> bool {
        let mut g = self.lock();
        let mut changed = false;
        for (old, id) in g.named_records() {
            // A record under the new name with another id is stale (that
            // name is this volume's now): replaced.
            if let Some(now) = names.get(&id).filter(|now| **now != old) {
                tracing::info!(volume = %now, was = %old, "moving the records of a renamed volume to its name");
                changed |= g.rekey(&old, id, now);
            }
        }
        changed
    }

    // ----- imports -----

    /// Marks volume `volume` (id `id`) as being imported into, durably,
    /// before the import writes anything.
    /// Refused while NBD clients have it open for writing, unless `force`
    /// (checked under the same lock an NBD open takes).
    /// Returns the import's NBD export name ([`IMPORT_EXPORT_PREFIX`] and
    /// a random token), which opens the volume while it is incomplete.
    pub fn begin_import(&self, volume: &str, id: u64, force: bool) -> Result<String, Error> {
        let mut g = self.lock();
        if g.moving.contains(&id) {
            return Err(moving(volume, "an import"));
        }
        let writers = g.users.get(&id).map_or(0, |u| u.nbd_writers);
        if writers > 0 && !force {
            return Err(open_for_writing(volume, writers, "import"));
        }
        if g.importing.get(volume) != Some(&id) {
            g.importing.insert(volume.to_string(), id);
            self.persist(&g)?;
        }
        // A new token each time: an importer that began earlier (and died)
        // writes no more.
        let token = hex(&vpool_peer::auth::nonce());
        g.drop_import_token(id);
        let live = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let entry = ImportToken {
            token: token.clone(),
            live,
        };
        g.import_tokens.insert(id, entry);
        Ok(format!("{IMPORT_EXPORT_PREFIX}{token}"))
    }

    /// The volume (name, id) whose import export is `export`
    /// ([`IMPORT_EXPORT_PREFIX`] and its token), if an import is under way,
    /// with the flag that says it still is: checked by every request on a
    /// device opened through it, so a connection of an import that ended
    /// (or began again) writes no more.
    pub fn import_export(
        &self,
        export: &str,
    ) -> Option<(String, u64, Arc<std::sync::atomic::AtomicBool>)> {
        let token = export.strip_prefix(IMPORT_EXPORT_PREFIX)?;
        let g = self.lock();
        // Compared without an early exit at the first byte that differs.
        let (&id, t) = (g.import_tokens.iter()).find(|(_, t)| same_secret(&t.token, token))?;
        let name = (g.importing.iter()).find(|(_, i)| **i == id)?.0.clone();
        Some((name, id, Arc::clone(&t.live)))
    }

    /// The import into `volume` finished (its data is flushed).
    pub fn end_import(&self, volume: &str, id: u64) -> Result<(), Error> {
        let mut g = self.lock();
        g.drop_import_token(id);
        if g.importing.get(volume) != Some(&id) {
            return Ok(());
        }
        g.importing.remove(volume);
        self.persist(&g)
    }

    /// True if an import into `volume` (id `id`) began and never finished.
    pub fn import_incomplete(&self, volume: &str, id: u64) -> bool {
        self.lock().importing.get(volume) == Some(&id)
    }

    // ----- users -----

    /// Registers an NBD connection to volume `volume` (id `id`) that wants
    /// `want`; a sealed volume is only ever granted [`Access::Read`]. Pair
    /// with [`Catalog::nbd_close`].
    pub fn nbd_open(&self, volume: &str, id: u64, want: Access) -> Access {
        let mut g = self.lock();
        let access = if want == Access::Write && g.sealed(volume, id).is_none() {
            Access::Write
        } else {
            Access::Read
        };
        let u = g.users.entry(id).or_default();
        match access {
            Access::Write => u.nbd_writers += 1,
            Access::Read => u.nbd_readers += 1,
        }
        access
    }

    /// Notes that an NBD connection to volume `id` did I/O.
    pub fn nbd_used(&self, id: u64) {
        if let Some(u) = self.lock().users.get_mut(&id) {
            u.armed = true;
        }
    }

    /// Unregisters an NBD connection. If it was the last NBD connection to
    /// the volume and one of them did I/O, `on_last_used` runs, with the
    /// catalog locked so no new connection can register meanwhile.
    pub fn nbd_close(&self, id: u64, access: Access, on_last_used: impl FnOnce()) {
        let mut g = self.lock();
        let Some(u) = g.users.get_mut(&id) else {
            return;
        };
        match access {
            Access::Write => u.nbd_writers = u.nbd_writers.saturating_sub(1),
            Access::Read => u.nbd_readers = u.nbd_readers.saturating_sub(1),
        }
        if u.nbd_writers + u.nbd_readers > 0 {
            return;
        }
        let armed = std::mem::take(&mut u.armed);
        if u.idle() {
            g.users.remove(&id);
        }
        if armed {
            on_last_used();
        }
    }

    /// Runs `change` (an engine operation that changes volume `volume`,
    /// id `id`, under its users' feet; it must not call the catalog, whose
    /// lock it runs under) with the catalog locked, after
    /// checking that no NBD client has the volume open for writing unless
    /// `force`. An NBD open registers under the same lock, so no writer can
    /// attach between the check and the change.
    pub fn change_without_writers<T>(
        &self,
        volume: &str,
        id: u64,
        force: bool,
        what: &str,
        change: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        let g = self.lock();
        let writers = g.users.get(&id).map_or(0, |u| u.nbd_writers);
        if writers > 0 && !force {
            return Err(open_for_writing(volume, writers, what));
        }
        #[cfg(test)]
        tests::hook::between_check_and_change();
        let out = change();
        drop(g);
        out
    }

    /// NBD connections that have volume `id` open for writing.
    pub fn nbd_writers(&self, id: u64) -> usize {
        self.lock().users.get(&id).map_or(0, |u| u.nbd_writers)
    }

    /// NBD connections that have volume `id` open, for writing or reading.
    pub fn nbd_connections(&self, id: u64) -> usize {
        self.lock()
            .users
            .get(&id)
            .map_or(0, |u| u.nbd_writers + u.nbd_readers)
    }

    /// NBD connections open to any volume of the pool.
    pub fn nbd_connections_total(&self) -> usize {
        self.lock()
            .users
            .values()
            .map(|u| u.nbd_writers + u.nbd_readers)
            .sum()
    }

    /// Marks volume `volume` (id `id`) as being moved, or no longer:
    /// refused while an API change of it is in flight.
    pub fn set_moving(&self, volume: &str, id: u64, moving: bool) -> Result<(), Error> {
        let mut g = self.lock();
        if !moving {
            g.moving.remove(&id);
            return Ok(());
        }
        if g.users.get(&id).is_some_and(|u| u.api_writes > 0) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("volume {volume} is being changed through the API; try the move again"),
            ));
        }
        if !g.moving.insert(id) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("volume {volume} is being moved already (`vpool job list`)"),
            ));
        }
        Ok(())
    }

    /// Whether volume `id` is being moved (see [`Catalog::set_moving`]).
    pub fn is_moving(&self, id: u64) -> bool {
        self.lock().moving.contains(&id)
    }

    // ----- snapshot times -----

    /// Records that snapshot `name` of volume id `id` was taken at
    /// `unix_ms`. A failure to save is logged, not returned: the snapshot
    /// exists either way, and only its time would be missing.
    pub fn note_snapshot(&self, id: u64, name: &str, unix_ms: u64) {
        let mut g = self.lock();
        g.snapshot_times
            .entry(id)
            .or_default()
            .insert(name.to_string(), unix_ms);
        if let Err(e) = self.persist(&g) {
            tracing::warn!(snapshot = name, error = %e, "could not save the snapshot's time");
        }
    }

    /// Forgets the time of snapshot `name` of volume id `id` (deleted).
    pub fn forget_snapshot(&self, id: u64, name: &str) {
        let mut g = self.lock();
        let Some(times) = g.snapshot_times.get_mut(&id) else {
            return;
        };
        if times.remove(name).is_some() {
            if times.is_empty() {
                g.snapshot_times.remove(&id);
            }
            if let Err(e) = self.persist(&g) {
                tracing::warn!(snapshot = name, error = %e, "could not save the snapshot times");
            }
        }
    }

    /// When the snapshots of volume id `id` were taken (those known).
    pub fn snapshot_times(&self, id: u64) -> BTreeMap<String, u64> {
        self.lock()
            .snapshot_times
            .get(&id)
            .cloned()
            .unwrap_or_default()
    }

    // ----- several writers -----

    /// Whether several NBD clients may write `volume` (id `id`) at once.
    pub fn multi_writer(&self, volume: &str, id: u64) -> bool {
        self.lock().multi_writer.get(volume) == Some(&id)
    }

    /// Lets several NBD clients write `volume` (id `id`) at once, or (off)
    /// one at a time again, durably.
    pub fn set_multi_writer(&self, volume: &str, id: u64, on: bool) -> Result<(), Error> {
        let mut g = self.lock();
        let before = g.multi_writer.get(volume).copied();
        if on {
            g.multi_writer.insert(volume.to_string(), id);
        } else {
            g.multi_writer.remove(volume);
        }
        if let Err(e) = self.persist(&g) {
            match before {
                Some(b) => g.multi_writer.insert(volume.to_string(), b),
                None => g.multi_writer.remove(volume),
            };
            return Err(e);
        }
        Ok(())
    }

    // ----- QoS -----

    /// The QoS limits of `volume` (id `id`); empty when it has none.
    pub fn qos(&self, volume: &str, id: u64) -> crate::qos::QosLimits {
        (self.lock().qos.get(volume))
            .filter(|r| r.volume_id == id)
            .map(|r| r.limits.clone())
            .unwrap_or_default()
    }

    /// Sets (or, empty, clears) the QoS limits of `volume` (id `id`),
    /// durably.
    pub fn set_qos(
        &self,
        volume: &str,
        id: u64,
        limits: &crate::qos::QosLimits,
    ) -> Result<(), Error> {
        let mut g = self.lock();
        let before = g.qos.get(volume).cloned();
        if limits.is_empty() {
            g.qos.remove(volume);
        } else {
            let rec = QosRecord {
                volume_id: id,
                limits: limits.clone(),
            };
            g.qos.insert(volume.to_string(), rec);
        }
        if let Err(e) = self.persist(&g) {
            match before {
                Some(b) => g.qos.insert(volume.to_string(), b),
                None => g.qos.remove(volume),
            };
            return Err(e);
        }
        Ok(())
    }

    // ----- replicas -----

    /// The replica mark of `volume` (id `id`), if it is a replica.
    pub fn replica(&self, volume: &str, id: u64) -> Option<ReplicaMark> {
        self.lock().replica(volume, id).cloned()
    }

    /// Marks `volume` (id `id`) a replica of `source`, durably, before
    /// replication writes it. Refused while NBD clients have it open for
    /// writing, or it is a template, or it is moving.
    pub fn mark_replica(&self, volume: &str, id: u64, source: &str) -> Result<(), Error> {
        let mut g = self.lock();
        if g.sealed(volume, id).is_some() {
            return Err(read_only_template(volume, "replicating into it"));
        }
        if g.moving.contains(&id) {
            return Err(moving(volume, "replicating into it"));
        }
        let writers = g.users.get(&id).map_or(0, |u| u.nbd_writers);
        if writers > 0 {
            return Err(open_for_writing(volume, writers, "replicating into it"));
        }
        g.replicas.insert(
            volume.to_string(),
            ReplicaMark {
                volume_id: id,
                source: source.to_string(),
                last_point: None,
            },
        );
        self.persist(&g)
    }

    /// Records `point` as the replica's newest finished point.
    pub fn set_replica_point(&self, volume: &str, id: u64, point: &str) -> Result<(), Error> {
        let mut g = self.lock();
        let Some(r) = g.replicas.get_mut(volume).filter(|r| r.volume_id == id) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("volume {volume} is no longer a replica"),
            ));
        };
        r.last_point = Some(point.to_string());
        self.persist(&g)
    }

    /// Runs `change` (the promote's rollback: it must not call the
    /// catalog) with no NBD writer attached, then drops the replica mark;
    /// both under the catalog's lock. Returns the mark it dropped.
    pub fn unmark_replica(
        &self,
        volume: &str,
        id: u64,
        change: impl FnOnce(&ReplicaMark) -> Result<(), Error>,
    ) -> Result<ReplicaMark, Error> {
        let mut g = self.lock();
        let Some(mark) = g.replica(volume, id).cloned() else {
            return Err(Error::invalid(format!("volume {volume} is not a replica")));
        };
        let writers = g.users.get(&id).map_or(0, |u| u.nbd_writers);
        if writers > 0 {
            return Err(open_for_writing(volume, writers, "promoting"));
        }
        change(&mark)?;
        g.replicas.remove(volume);
        if let Err(e) = self.persist(&g) {
            // Still a replica, on disk and here: nobody writes it.
            g.replicas.insert(volume.to_string(), mark);
            return Err(e);
        }
        Ok(mark)
    }

    /// Admits an API request that changes volume `volume` (id `id`): refused
    /// with `read_only` for a template. Sealing waits for none of these to
    /// be in flight. The guard ends it.
    pub fn api_write(
        self: &Arc<Self>,
        volume: &str,
        id: u64,
        what: &str,
    ) -> Result<ApiWriteGuard, Error> {
        let mut g = self.lock();
        if g.sealed(volume, id).is_some() {
            return Err(read_only_template(volume, what));
        }
        if let Some(r) = g.replica(volume, id) {
            return Err(read_only_replica(volume, &r.source, what));
        }
        if g.moving.contains(&id) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{what} refused: volume {volume} is being moved to another pool (`vpool job list`); its data changes over NBD only until the move ends"
                ),
            ));
        }
        g.users.entry(id).or_default().api_writes += 1;
        Ok(ApiWriteGuard {
            catalog: Arc::clone(self),
            id,
        })
    }
}

/// The error for a change refused because `volume` is a replica.
pub fn read_only_replica(volume: &str, source: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        format!(
            "{what}: volume {volume} is a replica of {source}, which only replication writes; read its points (VOLUME@POINT), or `vpool replica promote {volume}` to make it a volume of its own"
        ),
    )
}

/// The refusal of `what` on a volume a move is working on.
pub fn moving(volume: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::InUse,
        format!(
            "{what} refused: volume {volume} is being moved (`vpool job list`, `vpool job cancel`)"
        ),
    )
}

/// The refusal for changing a volume under its NBD writers.
pub fn open_for_writing(volume: &str, writers: usize, what: &str) -> Error {
    Error::new(
        ErrorKind::InUse,
        format!(
            "{what} refused: volume {volume} is open for writing by {writers} NBD client(s), whose disk would change under them; disconnect them first (or ask with force=true)"
        ),
    )
}

/// The error for a change refused because `volume` is a template.
pub fn read_only_template(volume: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::ReadOnly,
        format!(
            "{what}: volume {volume} is a template (sealed, read-only); clone it (vpool vol clone {volume} NEW) and change the clone"
        ),
    )
}

/// A copy reading a volume; see [`Catalog::hold_for_copy`].
#[must_use]
pub struct CopyHold {
    catalog: Arc<Catalog>,
    id: u64,
}

impl Drop for CopyHold {
    fn drop(&mut self) {
        let mut g = self.catalog.lock();
        if let Some(n) = g.copying.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                g.copying.remove(&self.id);
            }
        }
    }
}

/// The start of an import's NBD export name (see
/// [`Catalog::begin_import`]): reserved (a volume name never starts with
/// `.`), never listed.
pub const IMPORT_EXPORT_PREFIX: &str = ".import-";

/// `a == b` in a time that does not depend on where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// An API request changing a volume; see [`Catalog::api_write`].
#[must_use]
pub struct ApiWriteGuard {
    catalog: Arc<Catalog>,
    id: u64,
}

impl Drop for ApiWriteGuard {
    fn drop(&mut self) {
        let mut g = self.catalog.lock();
        if let Some(u) = g.users.get_mut(&self.id) {
            u.api_writes = u.api_writes.saturating_sub(1);
            if u.idle() && !u.armed {
                g.users.remove(&self.id);
            }
        }
    }
}

fn has_template_snapshot(pool: &Pool, volume: &str) -> Result<bool, EngineError> {
    Ok(pool
        .list_snapshots(volume)?
        .iter()
        .any(|s| s.name == TEMPLATE_SNAPSHOT))
}

/// `sha256:<hex>` over every byte of the image `vol` reads (holes as
/// zeros), as `sha256sum` of a raw export of it gives. Ranges that read as
/// zeros are hashed without reading them.
pub fn image_digest(vol: &Volume) -> Result<String, EngineError> {
    let size = vol.size_bytes()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; DIGEST_CHUNK];
    let zeros = vec![0u8; DIGEST_CHUNK];
    let mut pos = 0u64;
    while pos < size {
        let n = (size - pos).min(DIGEST_CHUNK as u64);
        let status = vol.block_status(pos, n, 1)?;
        match status.first() {
            Some(&(len, flags)) if flags & STATE_ZERO != 0 && len > 0 => {
                let len = len.min(n);
                h.update(&zeros[..len as usize]);
                pos += len;
            }
            Some(&(len, _)) if len > 0 => {
                let len = len.min(n) as usize;
                vol.read(pos, &mut buf[..len])?;
                h.update(&buf[..len]);
                pos += len as u64;
            }
            _ => {
                vol.read(pos, &mut buf[..n as usize])?;
                h.update(&buf[..n as usize]);
                pos += n;
            }
        }
    }
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test's foot in the door between a check and the change it guards.
    pub(super) mod hook {
        use std::cell::RefCell;

        thread_local! {
            static HOOK: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
        }

        pub fn set(f: impl FnMut() + 'static) {
            HOOK.with(|h| *h.borrow_mut() = Some(Box::new(f)));
        }

        pub fn between_check_and_change() {
            HOOK.with(|h| {
                if let Some(f) = h.borrow_mut().as_mut() {
                    f();
                }
            });
        }
    }

    /// The race the issue names: a writer attaching between "no NBD
    /// writers" and the rollback. Checking with one call and changing after
    /// it (what the API did) lets it in; `change_without_writers` does not.
    #[test]
    fn no_writer_attaches_between_the_check_and_the_change() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;
        // Starts a thread that attaches a writer, and gives it time to.
        fn attach_a_writer(c: &Arc<Catalog>, attached: &Arc<AtomicBool>) {
            let (c, attached) = (Arc::clone(c), Arc::clone(attached));
            std::thread::spawn(move || {
                c.nbd_open("v", 1, Access::Write);
                attached.store(true, Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(200));
        }
        let c = Arc::new(Catalog::in_memory());
        let attached = Arc::new(AtomicBool::new(false));
        // The old way: check, then change.
        assert_eq!(c.nbd_writers(1), 0);
        attach_a_writer(&c, &attached);
        assert!(
            attached.load(Ordering::SeqCst),
            "the test cannot show the race: the writer never got in"
        );
        c.nbd_close(1, Access::Write, || {});
        // The service's way: the change runs with the writer kept out.
        let attached = Arc::new(AtomicBool::new(false));
        let (c2, a2) = (Arc::clone(&c), Arc::clone(&attached));
        hook::set(move || attach_a_writer(&c2, &a2));
        let saw = c
            .change_without_writers("v", 1, false, "rollback", || {
                Ok(attached.load(Ordering::SeqCst))
            })
            .unwrap();
        assert!(!saw, "a writer attached between the check and the change");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(c.nbd_writers(1), 1, "the writer attaches after the change");
        let e = c
            .change_without_writers("v", 1, false, "rollback", || Ok(()))
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InUse);
    }

    #[test]
    fn hex_digits() {
        assert_eq!(hex(&[0x00, 0x9f, 0xff]), "009fff");
    }

    #[test]
    fn nbd_users_and_ephemeral_arming() {
        let c = Catalog::in_memory();
        // An INFO probe: open and close without I/O deletes nothing.
        assert_eq!(c.nbd_open("v", 1, Access::Write), Access::Write);
        let mut fired = false;
        c.nbd_close(1, Access::Write, || fired = true);
        assert!(!fired);
        // Two connections, one does I/O: fires when the last goes.
        c.nbd_open("v", 1, Access::Write);
        c.nbd_open("v", 1, Access::Read);
        assert_eq!(c.nbd_writers(1), 1);
        assert_eq!(c.nbd_connections(1), 2);
        c.nbd_used(1);
        c.nbd_close(1, Access::Write, || fired = true);
        assert!(!fired);
        c.nbd_close(1, Access::Read, || fired = true);
        assert!(fired);
        assert_eq!(c.nbd_connections(1), 0);
    }

    /// A crash after the engine's rename and before the records were saved
    /// under the new name: the next start moves them (they keep the id),
    /// and a stale record already under the new name gives way.
    #[test]
    fn records_follow_a_rename_they_missed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SegmentStore> =
            Arc::new(vpool_store::LocalDirStore::open(dir.path()).unwrap());
        let config = vpool_engine::PoolConfig {
            background: false,
            ..Default::default()
        };
        let (pool, _) = Pool::open(Arc::clone(&store), config).unwrap();
        let id = pool.create_volume("a", 4096).unwrap().id.0;
        let c = Catalog::open(Arc::clone(&store)).unwrap();
        let limits = crate::qos::QosLimits {
            iops: Some(10),
            ..Default::default()
        };
        c.set_qos("a", id, &limits).unwrap();
        c.set_multi_writer("a", id, true).unwrap();
        let stale = crate::qos::QosLimits {
            iops: Some(99),
            ..Default::default()
        };
        c.set_qos("b", id + 100, &stale).unwrap();
        pool.rename_volume("a", "b").unwrap();
        drop(c);
        let c = Catalog::open(Arc::clone(&store)).unwrap();
        c.reconcile(&pool).unwrap();
        assert_eq!(c.qos("b", id), limits);
        assert!(c.multi_writer("b", id));
        assert!(!c.lock().qos.contains_key("a"));
        // Saved: a second start finds them there.
        let c = Catalog::open(store).unwrap();
        assert_eq!(c.qos("b", id), limits);
    }

    /// The two crash windows of the trash, mended at start: a record
    /// saved before a rename that never happened is dropped; a volume in
    /// the trash without its record is listed under a made-up name.
    #[test]
    fn trash_records_are_mended_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn SegmentStore> =
            Arc::new(vpool_store::LocalDirStore::open(dir.path()).unwrap());
        let config = vpool_engine::PoolConfig {
            background: false,
            ..Default::default()
        };
        let (pool, _) = Pool::open(Arc::clone(&store), config).unwrap();
        let a = pool.create_volume("a", 4096).unwrap().id.0;
        let b = pool.create_volume("b", 4096).unwrap().id.0;
        let c = Catalog::open(Arc::clone(&store)).unwrap();
        // a: the record made it, the rename did not.
        let rec = TrashRecord {
            name: "a".into(),
            trashed_unix_ms: 1,
            expires_unix_ms: None,
        };
        c.lock().trash.insert(a, rec);
        c.persist(&c.lock()).unwrap();
        // b: renamed, its record lost.
        pool.rename_volume("b", &trash_name(b)).unwrap();
        let c = Catalog::open(Arc::clone(&store)).unwrap();
        c.reconcile(&pool).unwrap();
        let trash = c.trashed();
        assert_eq!(trash.len(), 1, "{trash:?}");
        assert_eq!(trash[&b].name, format!("volume-{b}"));
        assert!(pool.volume_info("a").is_ok());
        // Saved.
        assert_eq!(Catalog::open(store).unwrap().trashed().len(), 1);
    }

    #[test]
    fn sealed_volumes_get_read_access_and_refuse_api_writes() {
        let c = Arc::new(Catalog::in_memory());
        c.lock().templates.insert(
            "t".into(),
            TemplateRecord {
                volume_id: 7,
                digest: None,
                sealed_at_unix: 0,
            },
        );
        assert_eq!(c.nbd_open("t", 7, Access::Write), Access::Read);
        assert_eq!(c.nbd_writers(7), 0);
        // Another volume of the same name (re-created) is not sealed.
        assert_eq!(c.nbd_open("t", 8, Access::Write), Access::Write);
        let e = c.api_write("t", 7, "write").err().unwrap();
        assert_eq!(e.kind, ErrorKind::ReadOnly);
        let g = c.api_write("t", 8, "write").unwrap();
        drop(g);
    }
}
