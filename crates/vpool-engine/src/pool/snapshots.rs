//! Snapshots and clones: create, list, delete, rollback, clone, flatten,
//! commit, and the diff between two images of a volume.
//!
//! A snapshot is an O(1) clone of the volume's persistent map; a clone is
//! a new volume whose map starts as a snapshot's. Nothing reads through a
//! parent and no operation here copies data: each is one record (see
//! `state`), flushed before it returns.

use super::handle::Volume;
use super::state::Snap;
use super::volumes::info_of;
use super::{DiffExtent, DiffKind, Pool, SnapshotInfo, VolumeInfo};
use crate::error::{EngineError, Result};
use crate::extent_map::{ExtentMap, Target};
use crate::record::LogRecord;
use crate::types::{BLOCK_SIZE, VolumeId, validate_volume_name};

impl Pool {
    /// Takes snapshot `snapshot` of `volume`: it holds exactly the writes
    /// completed before this call. O(1) whatever the volume's size (the map
    /// is a persistent tree); durable on return.
    pub fn create_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        validate_volume_name(snapshot).map_err(|why| EngineError::Invalid {
            what: "snapshot name",
            why,
        })?;
        self.durable_op(|st| {
            let id = st.table.id_of(volume)?;
            if st.table.vol(id)?.snapshots.contains_key(snapshot) {
                return Err(EngineError::SnapshotExists {
                    volume: volume.to_string(),
                    snapshot: snapshot.to_string(),
                });
            }
            let rec = LogRecord::CreateSnapshot {
                volume: id,
                name: snapshot,
            };
            self.append_and_apply(st, rec)?;
            Ok(snapshot_info(
                volume,
                snapshot,
                &st.table.vol(id)?.snapshots[snapshot],
            ))
        })
    }

    /// The snapshots of `volume`, oldest first.
    pub fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        let st = self.inner.state.lock();
        let id = st.table.id_of(volume)?;
        let mut v: Vec<SnapshotInfo> = st
            .table
            .vol(id)?
            .snapshots
            .iter()
            .map(|(n, s)| snapshot_info(volume, n, s))
            .collect();
        v.sort_by_key(|s| s.seq);
        Ok(v)
    }

    /// A read-only handle on a snapshot (served over NBD as `VOL@SNAP`).
    pub fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        let st = self.inner.state.lock();
        let id = st.table.id_of(volume)?;
        st.table.snap(id, volume, snapshot)?;
        Ok(Volume::new(self.clone(), id, volume, Some(snapshot)))
    }

    /// Deletes a snapshot; its blocks that nothing else uses are reclaimed by
    /// the cleaner. Refused while a clone was made from it.
    pub fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        self.durable_op(|st| {
            let id = st.table.id_of(volume)?;
            st.table.snap(id, volume, snapshot)?;
            let clones = st.table.clones_of(id, Some(snapshot));
            if !clones.is_empty() {
                return Err(EngineError::InUse {
                    what: format!("snapshot {volume}@{snapshot}"),
                    users: clones,
                });
            }
            let rec = LogRecord::DeleteSnapshot {
                volume: id,
                name: snapshot,
            };
            self.append_and_apply(st, rec)?;
            Ok(())
        })?;
        self.wake_maintenance();
        Ok(())
    }

    /// Makes `volume` equal to its snapshot (content and size). A metadata
    /// operation: no data is copied. Durable on return. Later snapshots are
    /// kept. Whether clients have the volume open is the caller's concern.
    pub fn rollback(&self, volume: &str, snapshot: &str) -> Result<VolumeInfo> {
        self.durable_op(|st| {
            let id = st.table.id_of(volume)?;
            st.table.snap(id, volume, snapshot)?;
            self.append_and_apply(
                st,
                LogRecord::Rollback {
                    volume: id,
                    snapshot,
                },
            )?;
            info_of(&st.table, id)
        })
    }

    /// Creates `new_name` as a copy-on-write clone of `volume@snapshot`: it
    /// shares every block and stores only what it changes. O(1); nothing
    /// reads through the parent, so clones of clones cost nothing extra.
    /// Durable on return.
    pub fn clone_volume(&self, volume: &str, snapshot: &str, new_name: &str) -> Result<VolumeInfo> {
        validate_volume_name(new_name).map_err(|why| EngineError::Invalid {
            what: "volume name",
            why,
        })?;
        self.durable_op(|st| {
            let source = st.table.id_of(volume)?;
            st.table.snap(source, volume, snapshot)?;
            if st.table.names.contains_key(new_name) {
                return Err(EngineError::VolumeExists(new_name.to_string()));
            }
            let id = VolumeId(st.table.next_volume_id);
            st.table.next_volume_id += 1;
            let rec = LogRecord::CloneVolume {
                volume: id,
                source,
                name: new_name,
                snapshot,
            };
            self.append_and_apply(st, rec)?;
            info_of(&st.table, id)
        })
    }

    /// Detaches a clone from its parent snapshot. Instant: a clone shares
    /// blocks with its parent but never reads through it, so there is
    /// nothing to copy; afterwards the parent snapshot may be deleted.
    pub fn flatten(&self, volume: &str) -> Result<VolumeInfo> {
        self.durable_op(|st| {
            let id = st.table.id_of(volume)?;
            if st.table.vol(id)?.parent.is_none() {
                return Err(EngineError::Invalid {
                    what: "flatten",
                    why: format!("volume {volume} is not a clone"),
                });
            }
            self.append_and_apply(st, LogRecord::FlattenVolume { volume: id })?;
            info_of(&st.table, id)
        })
    }

    /// Makes a clone's parent volume equal to the clone's current content
    /// (and size), atomically: one record, so a crash leaves the old parent
    /// or the new one. The clone stays until deleted. Returns the parent.
    pub fn commit(&self, volume: &str) -> Result<VolumeInfo> {
        self.durable_op(|st| {
            let id = st.table.id_of(volume)?;
            let Some((parent, _)) = st.table.vol(id)?.parent.clone() else {
                return Err(EngineError::Invalid {
                    what: "commit",
                    why: format!("volume {volume} is not a clone"),
                });
            };
            self.append_and_apply(st, LogRecord::CommitVolume { volume: id })?;
            info_of(&st.table, parent)
        })
    }

    /// The ranges that differ between two images of `volume`: `from` and
    /// `to` name snapshots, `None` the volume as it is now. Reading the
    /// `Data` ranges of `to` and zeroing the `Zero` ones turns a copy of
    /// `from` into `to` (resize to `to`'s size first). O(extents).
    pub fn diff(
        &self,
        volume: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<DiffExtent>> {
        let st = self.inner.state.lock();
        let id = st.table.id_of(volume)?;
        let image = |snap: Option<&str>| -> Result<(ExtentMap, u64)> {
            match snap {
                None => {
                    let v = st.table.vol(id)?;
                    Ok((v.map.clone(), v.size_bytes))
                }
                Some(s) => {
                    let s = st.table.snap(id, volume, s)?;
                    Ok((s.map.clone(), s.size_bytes))
                }
            }
        };
        let (a, a_size) = image(from)?;
        let (b, b_size) = image(to)?;
        drop(st);
        Ok(diff_images(
            &a,
            a_size / BLOCK_SIZE,
            &b,
            b_size / BLOCK_SIZE,
        ))
    }
}

/// What snapshot `name` of `volume` looks like from outside.
fn snapshot_info(volume: &str, name: &str, s: &Snap) -> SnapshotInfo {
    SnapshotInfo {
        volume: volume.to_string(),
        name: name.to_string(),
        size_bytes: s.size_bytes,
        allocated_bytes: s.data_blocks * BLOCK_SIZE,
        seq: s.seq,
    }
}

/// The ranges where image `b` (of `b_blocks` blocks) differs from image
/// `a` (of `a_blocks`), walking both maps' pieces side by side.
fn diff_images(a: &ExtentMap, a_blocks: u64, b: &ExtentMap, b_blocks: u64) -> Vec<DiffExtent> {
    let (pa, pb) = (a.lookup(0, b_blocks), b.lookup(0, b_blocks));
    let mut out: Vec<DiffExtent> = Vec::new();
    let (mut i, mut j, mut pos) = (0usize, 0usize, 0u64);
    while pos < b_blocks {
        let (x, y) = (&pa[i], &pb[j]);
        let end = (x.start_block + x.len_blocks).min(y.start_block + y.len_blocks);
        let tx = x.target.map(|t| t.advance(pos - x.start_block));
        let ty = y.target.map(|t| t.advance(pos - y.start_block));
        let zero = |t: Option<Target>| matches!(t, None | Some(Target::Zero));
        // Past the old image's end everything written counts as new.
        let mut pieces = vec![(pos, end)];
        if pos < a_blocks && end > a_blocks {
            pieces = vec![(pos, a_blocks), (a_blocks, end)];
        }
        for (s, e) in pieces {
            let changed = if s >= a_blocks {
                !zero(ty)
            } else {
                tx != ty && !(zero(tx) && zero(ty))
            };
            if changed {
                let kind = if zero(ty) {
                    DiffKind::Zero
                } else {
                    DiffKind::Data
                };
                push_change(&mut out, s, e, kind);
            }
        }
        pos = end;
        if pos == x.start_block + x.len_blocks {
            i += 1;
        }
        if pos == y.start_block + y.len_blocks {
            j += 1;
        }
    }
    out
}

/// Adds blocks `s..e` to the diff, merged with the last range when it
/// continues it with the same kind.
fn push_change(out: &mut Vec<DiffExtent>, s: u64, e: u64, kind: DiffKind) {
    match out.last_mut() {
        Some(l) if l.kind == kind && l.offset + l.len == s * BLOCK_SIZE => {
            l.len += (e - s) * BLOCK_SIZE
        }
        _ => out.push(DiffExtent {
            offset: s * BLOCK_SIZE,
            len: (e - s) * BLOCK_SIZE,
            kind,
        }),
    }
}
