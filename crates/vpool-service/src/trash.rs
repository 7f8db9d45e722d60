//! The trash of a pool (`vpool vol trash mv | ls | restore | rm | purge`),
//! as `rbd trash` keeps images: a volume moved there keeps its data,
//! snapshots and clones, but has no name a user or an NBD client can use,
//! so the name is free at once; it comes back with `restore` (under its
//! old name or another), and goes for good with `rm` or `purge`.
//!
//! A volume in the trash is the same engine volume renamed to the reserved
//! name [`trash_name`]`(id)` (`.trash.17`: a volume name never starts with
//! `.`), plus a [`TrashRecord`] in the pool's catalog saying what it was
//! called and since when. Every listing of volumes and exports leaves
//! reserved names out, and the API and NBD refuse them as names.
//!
//! A volume whose snapshots have clones can go to the trash (the clones
//! keep reading it, which is what RBD's trash is for: retiring a parent);
//! `rm` and `purge` keep it until its clones are gone or flattened, and say
//! so. Crashes: see [`Catalog::trash`] and [`Catalog::restore`]; the
//! daemon's start mends a record without a volume or a volume without a
//! record.

use serde::{Deserialize, Serialize};
use vpool_engine::EngineError;

use crate::catalog::{TrashRecord, trash_name};
use crate::error::{Error, ErrorKind, Result};
use crate::pool::{PoolService, VolumeView};

/// A volume in the trash, as `trash ls` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashEntry {
    /// The volume's id: what tells two trashed volumes of one name apart.
    pub id: u64,
    /// Its name before it went to the trash.
    pub name: String,
    pub trashed_unix_ms: u64,
    /// When the daemon deletes it on its own, if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub snapshots: u64,
    /// Volumes cloned from its snapshots: it stays until they are gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<String>,
}

/// What a purge did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeReport {
    /// Deleted for good.
    pub purged: Vec<TrashEntry>,
    /// Old enough, but kept: their snapshots have clones.
    pub kept: Vec<TrashEntry>,
}

impl PoolService {
    /// Moves volume `name` to the trash: its name is free at once; with
    /// `expire_secs`, the daemon deletes it that long after (unless its
    /// snapshots have clones then). Refused for an ephemeral volume
    /// (delete it), and as a rename is (NBD clients, a move).
    pub fn trash_volume(&self, name: &str, expire_secs: Option<u64>) -> Result<TrashEntry> {
        let view = self.volume(name)?;
        if view.info.ephemeral {
            return Err(Error::new(
                ErrorKind::Invalid,
                format!("volume {name} is ephemeral (a scratch disk): delete it instead"),
            ));
        }
        let id = view.info.id.0;
        let to = trash_name(id);
        let rec = self.catalog().trash(
            name,
            id,
            expire_secs,
            || {
                // The check and the rename under the catalog's lock, which
                // a delete (and so a new volume of this name) waits for.
                self.same_volume(name, id)?;
                Ok(self.pool().rename_volume(name, &to)?)
            },
            || self.pool().volume_info(&to).is_ok_and(|i| i.id.0 == id),
        )?;
        self.entry(id, &rec)
    }

    /// The volumes in the trash, oldest first.
    pub fn trash_list(&self) -> Result<Vec<TrashEntry>> {
        let mut out = Vec::new();
        for (id, rec) in self.catalog().trashed() {
            match self.entry(id, &rec) {
                Ok(e) => out.push(e),
                // Purged meanwhile.
                Err(e) if e.kind == ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by_key(|e| (e.trashed_unix_ms, e.id));
        Ok(out)
    }

    /// Takes volume `id` out of the trash as `new_name` (default: its old
    /// name), which must be free.
    pub fn restore_volume(&self, id: u64, new_name: Option<&str>) -> Result<VolumeView> {
        let rec = self.trashed(id)?;
        let new = new_name.unwrap_or(&rec.name);
        crate::names::check_volume_name(new)?;
        let from = trash_name(id);
        let info = self.catalog().restore(id, new, || {
            self.pool().rename_volume(&from, new).map_err(|e| match e {
                EngineError::VolumeExists(_) => Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "a volume named {new} exists: restore it under another name (--name NEW)"
                    ),
                ),
                e => e.into(),
            })
        })?;
        self.volume(&info.name)
    }

    /// Deletes volume `id` of the trash for good. Refused while its
    /// snapshots have clones.
    pub fn remove_trashed(&self, id: u64) -> Result<TrashEntry> {
        let rec = self.trashed(id)?;
        let entry = self.entry(id, &rec)?;
        self.remove_entry(&entry)?;
        Ok(entry)
    }

    /// Deletes for good the volumes that went to the trash at or before
    /// `before_unix_ms`, but those whose snapshots have clones.
    pub fn purge_trash(&self, before_unix_ms: u64) -> Result<PurgeReport> {
        Ok(self.purge(|r| r.trashed_unix_ms <= before_unix_ms))
    }

    /// Deletes for good the volumes whose expiry has come (but those whose
    /// snapshots have clones: kept, tried again later).
    pub fn purge_expired(&self, now_unix_ms: u64) -> Result<PurgeReport> {
        Ok(self.purge(|r| r.expires_unix_ms.is_some_and(|e| e <= now_unix_ms)))
    }

    /// Deletes for good the volumes of the trash whose record `due` picks;
    /// those whose snapshots have clones, or that cannot go now, are kept
    /// (one does not stop the others).
    fn purge(&self, due: impl Fn(&TrashRecord) -> bool) -> PurgeReport {
        let mut report = PurgeReport::default();
        let mut records: Vec<(u64, TrashRecord)> = (self.catalog().trashed().into_iter())
            .filter(|(_, r)| due(r))
            .collect();
        records.sort_by_key(|(id, r)| (r.trashed_unix_ms, *id));
        for (id, rec) in records {
            // Gone meanwhile (removed, restored): nothing to do.
            let Ok(e) = self.entry(id, &rec) else {
                continue;
            };
            match self.remove_entry(&e) {
                Ok(()) => report.purged.push(e),
                Err(err) => {
                    if e.clones.is_empty() {
                        tracing::warn!(volume = %e.name, id, error = %err.message, "could not delete a volume from the trash");
                    }
                    report.kept.push(e);
                }
            }
        }
        report
    }

    /// Deletes the volume of trash entry `e`: refused while its snapshots
    /// have clones.
    fn remove_entry(&self, e: &TrashEntry) -> Result<()> {
        if !e.clones.is_empty() {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "volume {} (id {}) stays in the trash: {} cloned from its snapshots (flatten or delete them first)",
                    e.name,
                    e.id,
                    e.clones.join(", ")
                ),
            ));
        }
        self.delete_volume(&trash_name(e.id), true)
    }

    fn trashed(&self, id: u64) -> Result<TrashRecord> {
        self.catalog().trashed().remove(&id).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!("no volume with id {id} in the trash (`vpool vol trash ls`)"),
            )
        })
    }

    fn entry(&self, id: u64, rec: &TrashRecord) -> Result<TrashEntry> {
        let at = trash_name(id);
        let info = self.pool().volume_info(&at)?;
        let clones = self.pool().clones_of(&at, None)?;
        Ok(TrashEntry {
            id,
            name: rec.name.clone(),
            trashed_unix_ms: rec.trashed_unix_ms,
            expires_unix_ms: rec.expires_unix_ms,
            size_bytes: info.size_bytes,
            allocated_bytes: info.allocated_bytes,
            snapshots: info.snapshots,
            clones,
        })
    }
}
