//! [`PoolService`]: one pool and every operation on it, with its rules.
//!
//! The engine knows volumes, snapshots and data; the rules that need more
//! than the engine live here, once, whatever the front end (the API, the
//! NBD exports, the CLI through the API):
//!
//! - a template (sealed volume) refuses every change, and its image
//!   snapshot cannot be deleted on its own;
//! - a change under a running VM's feet (delete, shrink, rollback, commit,
//!   import, data written through the API) is refused while NBD clients
//!   have the volume open for writing, unless forced; the check and the
//!   change happen under the catalog's lock, which NBD opens take too, so
//!   no writer can attach in between;
//! - an import marks its volume incomplete until its last byte is flushed;
//! - the template snapshot name is reserved.
//!
//! Every method is blocking (engine work, syncs): async front ends call
//! them on a blocking thread.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use vpool_engine::{
    CheckReport, CleanReport, DiffExtent, EngineError, Pool, PoolStats, SnapshotInfo, Volume,
    VolumeInfo, VolumeOptions, VolumeSpace,
};

use crate::catalog::{
    ApiWriteGuard, Catalog, TEMPLATE_SNAPSHOT, TemplateRecord, read_only_template,
};
use crate::error::{Error, ErrorKind, Result};

/// A volume as the service sees it: the engine's figures and what the
/// catalog adds.
#[derive(Clone, Debug)]
pub struct VolumeView {
    pub info: VolumeInfo,
    /// Set when the volume is a sealed template.
    pub template: Option<TemplateRecord>,
    /// An import into it began and did not finish.
    pub incomplete: bool,
    /// Set when the volume is a replica (`vpool replica add`).
    pub replica: Option<crate::catalog::ReplicaMark>,
    /// Its QoS limits (empty: none).
    pub qos: crate::qos::QosLimits,
    /// Several NBD clients may write it at once (`vpool vol share`).
    pub multi_writer: bool,
}

/// What a flatten did.
#[derive(Clone, Debug)]
pub struct Flattened {
    /// What the clone no longer depends on: `volume@snapshot` in a pool,
    /// the template's name in a shared pool.
    pub detached_from: Option<String>,
    /// Bytes copied into the clone (none in a pool: a clone there never
    /// reads through its parent).
    pub bytes_copied: u64,
    pub volume: VolumeView,
}

/// One pool and the operations on it; see the module doc. Cheap to share
/// (`Arc`), safe to call from any thread.
pub struct PoolService {
    pool: Pool,
    catalog: Arc<Catalog>,
}

impl PoolService {
    /// The service over `pool`, whose catalog (templates, imports, NBD
    /// users) is `catalog`, shared with its NBD exports.
    pub fn new(pool: Pool, catalog: Arc<Catalog>) -> PoolService {
        PoolService { pool, catalog }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    fn view(&self, info: VolumeInfo) -> VolumeView {
        let template = self.catalog.template(&info.name, info.id.0);
        let incomplete = self.catalog.import_incomplete(&info.name, info.id.0);
        let replica = self.catalog.replica(&info.name, info.id.0);
        let qos = self.catalog.qos(&info.name, info.id.0);
        let multi_writer = self.catalog.multi_writer(&info.name, info.id.0);
        VolumeView {
            info,
            template,
            incomplete,
            replica,
            qos,
            multi_writer,
        }
    }

    fn id_of(&self, name: &str) -> Result<u64> {
        Ok(self.pool.volume_info(name)?.id.0)
    }

    /// Admits a change of volume `name`'s content or size: refused for a
    /// template; sealing waits while the guard lives.
    fn admit_write(&self, name: &str, what: &str) -> Result<ApiWriteGuard> {
        let id = self.id_of(name)?;
        self.catalog.api_write(name, id, what)
    }

    /// Runs `change` on volume `name` with no NBD writer attached (unless
    /// `force`), the check and the change under one lock.
    fn without_writers<T>(
        &self,
        name: &str,
        force: bool,
        what: &str,
        change: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let id = self.id_of(name)?;
        self.catalog
            .change_without_writers(name, id, force, what, change)
    }

    // ----- pool -----

    pub fn stats(&self) -> PoolStats {
        self.pool.stats()
    }

    pub fn clean(&self) -> Result<CleanReport> {
        Ok(self.pool.clean()?)
    }

    pub fn checkpoint(&self) -> Result<()> {
        Ok(self.pool.checkpoint()?)
    }

    pub fn flush(&self) -> Result<()> {
        Ok(self.pool.flush()?)
    }

    /// `pool check`; stops once `cancel` is set.
    pub fn check(&self, repair: bool, cancel: &AtomicBool) -> Result<CheckReport> {
        Ok(self.pool.check(repair, cancel)?)
    }

    // ----- volumes -----

    /// The volumes users see: not those in the trash.
    pub fn list_volumes(&self) -> Vec<VolumeView> {
        let vols = self.pool.list_volumes().into_iter();
        vols.filter(|v| !crate::catalog::is_reserved(&v.name))
            .map(|v| self.view(v))
            .collect()
    }

    /// A volume users may name: not one in the trash (a reserved name).
    pub fn volume(&self, name: &str) -> Result<VolumeView> {
        if crate::catalog::is_reserved(name) {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("no volume named {name:?} (names starting with '.' are reserved)"),
            ));
        }
        Ok(self.view(self.pool.volume_info(name)?))
    }

    /// Exclusive and shared bytes of `name` and its snapshots; stops once
    /// `cancel` is set.
    pub fn volume_space(&self, name: &str, cancel: &AtomicBool) -> Result<VolumeSpace> {
        Ok(self.pool.volume_space_until(name, cancel)?)
    }

    pub fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        ephemeral: bool,
    ) -> Result<VolumeView> {
        let options = VolumeOptions { ephemeral };
        let info = self.pool.create_volume_with(name, size_bytes, options)?;
        Ok(self.view(info))
    }

    /// Growing never needs `force`; shrinking (with `allow_shrink`) does
    /// while NBD writers are attached.
    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
        force: bool,
    ) -> Result<VolumeView> {
        let _w = self.admit_write(name, "resize")?;
        let resize = || Ok(self.pool.resize_volume(name, size_bytes, allow_shrink)?);
        let shrinks = size_bytes < self.pool.volume_info(name)?.size_bytes;
        let info = if shrinks && allow_shrink {
            self.without_writers(name, force, "shrinking", resize)?
        } else {
            resize()?
        };
        Ok(self.view(info))
    }

    /// Gives volume `name` the name `new`: its data, snapshots, clones,
    /// template seal, QoS limits and other records go with it. Refused
    /// while it moves or any NBD client has it open (see
    /// [`Catalog::rename`]).
    pub fn rename_volume(&self, name: &str, new: &str) -> Result<VolumeView> {
        crate::names::check_volume_name(new)?;
        let id = self.id_of(name)?;
        let info = self.catalog.rename(name, id, new, || {
            // The check and the rename under the catalog's lock, which a
            // delete (and so a new volume of this name) waits for.
            self.same_volume(name, id)?;
            Ok(self.pool.rename_volume(name, new)?)
        })?;
        Ok(self.view(info))
    }

    /// Errors unless `name` is still volume `id` (it was deleted and made
    /// again since the caller looked).
    pub(crate) fn same_volume(&self, name: &str, id: u64) -> Result<()> {
        if self.id_of(name)? != id {
            return Err(Error::new(
                ErrorKind::InUse,
                format!("volume {name} was deleted and made again meanwhile: try again"),
            ));
        }
        Ok(())
    }

    pub fn delete_volume(&self, name: &str, force: bool) -> Result<()> {
        let id = self.id_of(name)?;
        self.refuse_moving(name, id, "delete")?;
        self.without_writers(name, force, "delete", || {
            Ok(self.pool.delete_volume(name)?)
        })?;
        self.catalog.forget(name, id);
        Ok(())
    }

    // ----- data -----

    /// The volume, or its snapshot `snapshot`, for reading.
    pub fn image(&self, name: &str, snapshot: Option<&str>) -> Result<Volume> {
        Ok(match snapshot {
            Some(s) => self.pool.snapshot(name, s)?,
            None => self.pool.volume(name)?,
        })
    }

    pub fn read(
        &self,
        name: &str,
        snapshot: Option<&str>,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.image(name, snapshot)?.read(offset, &mut buf)?;
        Ok(buf)
    }

    pub fn write(&self, name: &str, offset: u64, data: &[u8], force: bool) -> Result<()> {
        let _w = self.admit_write(name, "write")?;
        self.without_writers(name, force, "write through the API", || {
            Ok(self.pool.volume(name)?.write(offset, data)?)
        })
    }

    pub fn zero(&self, name: &str, offset: u64, len: u64, unmap: bool, force: bool) -> Result<()> {
        let _w = self.admit_write(name, "zero")?;
        self.without_writers(name, force, "zeroing through the API", || {
            Ok(self.pool.volume(name)?.write_zeroes(offset, len, unmap)?)
        })
    }

    /// An import is about to replace the volume's content: it is
    /// incomplete until [`PoolService::end_import`].
    /// Returns the import's NBD export name, which opens the volume while
    /// it is incomplete (see [`Catalog::begin_import`]).
    pub fn begin_import(&self, name: &str, force: bool) -> Result<String> {
        // A template refuses it before it is marked.
        let _w = self.admit_write(name, "import")?;
        let id = self.id_of(name)?;
        self.catalog.begin_import(name, id, force)
    }

    /// The import finished: its data is flushed and the mark goes.
    pub fn end_import(&self, name: &str) -> Result<()> {
        self.pool.flush()?;
        let id = self.id_of(name)?;
        self.catalog.end_import(name, id)
    }

    // ----- snapshots -----

    pub fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        Ok(self.pool.list_snapshots(volume)?)
    }

    pub fn snapshot(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        self.pool
            .list_snapshots(volume)?
            .into_iter()
            .find(|i| i.name == name)
            .ok_or_else(|| {
                EngineError::SnapshotNotFound {
                    volume: volume.to_string(),
                    snapshot: name.to_string(),
                }
                .into()
            })
    }

    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<SnapshotInfo> {
        if name == TEMPLATE_SNAPSHOT {
            return Err(Error::invalid(format!(
                "the snapshot name {TEMPLATE_SNAPSHOT:?} is reserved for templates (vpool vol template {volume})"
            )));
        }
        // A move copies the snapshots there were when it began.
        let id = self.id_of(volume)?;
        self.refuse_moving(volume, id, "a snapshot")?;
        let info = self.pool.create_snapshot(volume, name)?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.catalog.note_snapshot(id, name, now_ms);
        Ok(info)
    }

    /// When the snapshots of `volume` were taken, by name (snapshots taken
    /// by an earlier release, or copied in by a move, have none).
    pub fn snapshot_times(&self, volume: &str) -> Result<std::collections::BTreeMap<String, u64>> {
        Ok(self.catalog.snapshot_times(self.id_of(volume)?))
    }

    /// Refused for a template's image snapshot (delete the template).
    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<()> {
        let id = self.id_of(volume)?;
        self.refuse_moving(volume, id, "deleting a snapshot")?;
        if name == TEMPLATE_SNAPSHOT && self.catalog.template(volume, id).is_some() {
            return Err(self.template_snapshot_refusal(volume, name));
        }
        if let Some(mark) = self.catalog.replica(volume, id)
            && mark.last_point.as_deref() == Some(name)
        {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "{volume}@{name} is the newest point of replica {volume}, which a promote rolls back to: it goes when a newer one is made, or with the volume (`vpool replica promote` first to keep the data)"
                ),
            ));
        }
        self.pool.delete_snapshot(volume, name)?;
        self.catalog.forget_snapshot(id, name);
        Ok(())
    }

    /// Refuses `what` on volume `volume` (id `id`) while a move works on
    /// it (its snapshots and clones go, or come, with it).
    fn refuse_moving(&self, volume: &str, id: u64, what: &str) -> Result<()> {
        if self.catalog.is_moving(id) {
            return Err(crate::catalog::moving(volume, what));
        }
        Ok(())
    }

    fn template_snapshot_refusal(&self, volume: &str, name: &str) -> Error {
        // The engine names the clones if there are any; that says more.
        let parent = format!("{volume}@{name}");
        let clones: Vec<String> = self
            .pool
            .list_volumes()
            .into_iter()
            .filter(|v| v.parent.as_deref() == Some(parent.as_str()))
            .map(|v| v.name)
            .collect();
        if !clones.is_empty() {
            return EngineError::InUse {
                what: format!("snapshot {parent}"),
                users: clones,
            }
            .into();
        }
        Error::new(
            ErrorKind::ReadOnly,
            format!(
                "{parent} holds the sealed image of template {volume}; delete the template itself (vpool vol delete {volume})"
            ),
        )
    }

    /// The volume takes the snapshot's content, refused under NBD writers
    /// unless `force`.
    pub fn rollback(&self, volume: &str, snapshot: &str, force: bool) -> Result<VolumeView> {
        let _w = self.admit_write(volume, "rollback")?;
        // Say which error comes first: a missing snapshot.
        self.pool.snapshot(volume, snapshot)?;
        let info = self.without_writers(volume, force, "rollback", || {
            Ok(self.pool.rollback(volume, snapshot)?)
        })?;
        Ok(self.view(info))
    }

    /// Lets several NBD clients write `volume` at once (or not).
    pub fn set_multi_writer(&self, volume: &str, on: bool) -> Result<VolumeView> {
        let id = self.id_of(volume)?;
        self.catalog.set_multi_writer(volume, id, on)?;
        self.volume(volume)
    }

    /// Sets (or, empty, clears) the volume's QoS limits, kept in the
    /// catalog; the host applies them to its devices.
    pub fn set_qos(&self, volume: &str, limits: &crate::qos::QosLimits) -> Result<VolumeView> {
        limits.check()?;
        let id = self.id_of(volume)?;
        self.catalog.set_qos(volume, id, limits)?;
        self.volume(volume)
    }

    /// A replica becomes a volume of its own: rolled back to its newest
    /// finished point (a run may have been half way), its mark dropped.
    /// Refused while NBD clients have it open for writing (they cannot:
    /// its head is not served) and before any point finished.
    pub fn promote(&self, volume: &str) -> Result<VolumeView> {
        let id = self.id_of(volume)?;
        self.catalog.unmark_replica(volume, id, |mark| {
            let Some(point) = &mark.last_point else {
                return Err(Error::new(
                    ErrorKind::Failed,
                    format!(
                        "replica {volume} has no finished point yet: there is nothing whole to promote (delete it instead)"
                    ),
                ));
            };
            self.pool.rollback(volume, point)?;
            Ok(())
        })?;
        self.pool.flush()?;
        self.volume(volume)
    }

    // ----- templates and clones -----

    /// Seals `volume` as a template (blocking: it hashes the image).
    pub fn make_template(&self, volume: &str) -> Result<VolumeView> {
        self.refuse_moving(volume, self.id_of(volume)?, "sealing")?;
        self.catalog.seal(&self.pool, volume)?;
        self.volume(volume)
    }

    /// A clone of `volume@snapshot`, or of the template `volume`'s image.
    pub fn clone_volume(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        new: &str,
    ) -> Result<VolumeView> {
        self.refuse_moving(volume, self.id_of(volume)?, "a clone")?;
        let snapshot = match snapshot {
            Some(s) => s.to_string(),
            None => {
                if self.catalog.template(volume, self.id_of(volume)?).is_none() {
                    return Err(Error::invalid(format!(
                        "volume {volume} is not a template: clone one of its snapshots (VOLUME@SNAPSHOT), or seal it first (vpool vol template {volume})"
                    )));
                }
                TEMPLATE_SNAPSHOT.to_string()
            }
        };
        let info = self.pool.clone_volume(volume, &snapshot, new)?;
        Ok(self.view(info))
    }

    pub fn flatten(&self, volume: &str) -> Result<Flattened> {
        let detached_from = self.pool.volume_info(volume)?.parent;
        Ok(Flattened {
            detached_from,
            bytes_copied: 0,
            volume: self.view(self.pool.flatten(volume)?),
        })
    }

    /// The clone's parent takes its content: refused for a template parent,
    /// and under the parent's NBD writers unless `force`.
    pub fn commit(&self, clone: &str, force: bool) -> Result<VolumeView> {
        let info = self.pool.volume_info(clone)?;
        let Some(parent) = info.parent.as_deref() else {
            // The engine's own words.
            return Ok(self.view(self.pool.commit(clone)?));
        };
        let parent = parent
            .split_once('@')
            .map_or(parent, |(v, _)| v)
            .to_string();
        if crate::catalog::is_reserved(&parent) {
            return Err(Error::new(
                ErrorKind::InUse,
                format!(
                    "commit of {clone} refused: its parent is in the trash (`vpool vol trash ls`); restore it first"
                ),
            ));
        }
        if self
            .catalog
            .template(&parent, self.id_of(&parent)?)
            .is_some()
        {
            let what = format!("commit of {clone} into its parent refused");
            return Err(read_only_template(&parent, &what));
        }
        let _w = self.admit_write(&parent, "commit")?;
        let info =
            self.without_writers(&parent, force, "commit", || Ok(self.pool.commit(clone)?))?;
        Ok(self.view(info))
    }

    /// The changed ranges between two images of `volume` (`None`: the
    /// volume as it is), with the two images' sizes.
    pub fn diff(
        &self,
        volume: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<(Vec<DiffExtent>, u64, u64)> {
        let size_of = |snap: Option<&str>| -> Result<u64> {
            Ok(match snap {
                Some(s) => self.pool.snapshot(volume, s)?.size_bytes()?,
                None => self.pool.volume_info(volume)?.size_bytes,
            })
        };
        let from_size = size_of(from)?;
        let all = self.pool.diff(volume, from, to)?;
        Ok((all, from_size, size_of(to)?))
    }
}
