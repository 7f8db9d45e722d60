//! Volume lifecycle: create, resize, rename, delete; listing and handles.
//!
//! Each change is one record, appended and applied under the state lock
//! after the checks that make it valid (so applying it cannot fail), then
//! flushed: a volume operation is durable when it returns.

use super::handle::Volume;
use super::state::Table;
use super::{Pool, VolumeInfo, VolumeOptions};
use crate::error::{EngineError, Result};
use crate::record::LogRecord;
use crate::types::{
    BLOCK_SIZE, VolumeId, validate_reserved_name, validate_volume_name, validate_volume_size,
};

impl Pool {
    /// Creates a thin volume: it takes no space until written. Durable on
    /// return.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size_bytes, VolumeOptions::default())
    }

    /// [`Pool::create_volume`] with options (an ephemeral scratch disk).
    pub fn create_volume_with(
        &self,
        name: &str,
        size_bytes: u64,
        options: VolumeOptions,
    ) -> Result<VolumeInfo> {
        validate_volume_name(name).map_err(|why| EngineError::Invalid {
            what: "volume name",
            why,
        })?;
        validate_volume_size(size_bytes).map_err(|why| EngineError::Invalid {
            what: "volume size",
            why,
        })?;
        self.durable_op(|st| {
            if st.table.names.contains_key(name) {
                return Err(EngineError::VolumeExists(name.to_string()));
            }
            let id = VolumeId(st.table.next_volume_id);
            st.table.next_volume_id += 1;
            let rec = LogRecord::CreateVolume {
                volume: id,
                size_bytes,
                name,
                ephemeral: options.ephemeral,
            };
            self.append_and_apply(st, rec)?;
            info_of(&st.table, id)
        })
    }

    /// Changes a volume's size. Shrinking drops the data past the new end
    /// and is refused unless `allow_shrink`. Durable on return.
    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<VolumeInfo> {
        validate_volume_size(size_bytes).map_err(|why| EngineError::Invalid {
            what: "volume size",
            why,
        })?;
        self.durable_op(|st| {
            let id = st.table.id_of(name)?;
            let old = st.table.vol(id)?.size_bytes;
            if size_bytes < old && !allow_shrink {
                return Err(EngineError::ShrinkRefused {
                    volume: name.to_string(),
                    from_bytes: old,
                    to_bytes: size_bytes,
                });
            }
            if size_bytes != old {
                let rec = LogRecord::ResizeVolume {
                    volume: id,
                    size_bytes,
                };
                self.append_and_apply(st, rec)?;
            }
            info_of(&st.table, id)
        })
    }

    /// Deletes a volume; its space is reclaimed by the cleaner. Durable on
    /// return.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.durable_op(|st| {
            let id = st.table.id_of(name)?;
            let clones = st.table.clones_of(id, None);
            if !clones.is_empty() {
                return Err(EngineError::InUse {
                    what: format!("volume {name} (its snapshots)"),
                    users: clones,
                });
            }
            self.append_and_apply(st, LogRecord::DeleteVolume { volume: id })?;
            Ok(())
        })?;
        self.wake_maintenance();
        Ok(())
    }

    /// Gives volume `name` the name `new_name` (a volume name, or a
    /// [reserved](crate::types::validate_reserved_name) one): its id, data,
    /// snapshots, and the links of its clones stay. Handles opened before
    /// keep working. Durable on return.
    pub fn rename_volume(&self, name: &str, new_name: &str) -> Result<VolumeInfo> {
        validate_volume_name(new_name)
            .or_else(|why| validate_reserved_name(new_name).map_err(|_| why))
            .map_err(|why| EngineError::Invalid {
                what: "volume name",
                why,
            })?;
        self.durable_op(|st| {
            let id = st.table.id_of(name)?;
            if name != new_name {
                if st.table.names.contains_key(new_name) {
                    return Err(EngineError::VolumeExists(new_name.to_string()));
                }
                let rec = LogRecord::RenameVolume {
                    volume: id,
                    name: new_name,
                };
                self.append_and_apply(st, rec)?;
            }
            info_of(&st.table, id)
        })
    }

    /// The volumes cloned from volume `name`'s snapshots (from its
    /// `snapshot` only, if given), by name.
    pub fn clones_of(&self, name: &str, snapshot: Option<&str>) -> Result<Vec<String>> {
        let st = self.inner.state.lock();
        let id = st.table.id_of(name)?;
        Ok(st.table.clones_of(id, snapshot))
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock();
        // In name order, as a user reads a listing.
        st.table
            .names
            .values()
            .map(|&id| info_of(&st.table, id).expect("the name index and the volumes agree"))
            .collect()
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let st = self.inner.state.lock();
        let id = st.table.id_of(name)?;
        info_of(&st.table, id)
    }

    /// A handle for I/O on a volume. It stays valid until the volume is
    /// deleted; after that its calls fail with `VolumeNotFound`.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let st = self.inner.state.lock();
        let id = st.table.id_of(name)?;
        Ok(Volume::new(self.clone(), id, name, None))
    }
}

/// What volume `id` looks like from outside.
pub(super) fn info_of(table: &Table, id: VolumeId) -> Result<VolumeInfo> {
    let v = table.vol(id)?;
    Ok(VolumeInfo {
        parent: v.parent.as_ref().map(|(p, s)| {
            let pname = table
                .volumes
                .get(p)
                .map(|pv| pv.name.as_str())
                .unwrap_or("?");
            format!("{pname}@{s}")
        }),
        snapshots: v.snapshots.len() as u64,
        ephemeral: v.ephemeral,
        id,
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        allocated_bytes: v.data_blocks * BLOCK_SIZE,
        zero_bytes: v.zero_blocks * BLOCK_SIZE,
        extents: v.map.extent_count() as u64,
    })
}
