//! Volumes as NBD exports: the glue between `vpool-engine` and `vpool-nbd`.
//!
//! - Every volume is an export of the same name, writable, except a
//!   template (sealed volume), which is exported read-only.
//! - Every snapshot is a read-only export named `VOLUME@SNAPSHOT` (names
//!   cannot contain `@`, so this is unambiguous).
//!
//! Read-only exports carry `NBD_FLAG_READ_ONLY`; the server answers writes
//! to them with `EPERM` before the device sees them, and the device refuses
//! them too.
//!
//! Each open device is registered in the daemon's [`Catalog`] as a writer or
//! reader of its volume, and unregistered when the client disconnects (the
//! server drops the device): that is how rollback knows whether clients have
//! a volume open for writing, and how an ephemeral volume is deleted when
//! the last client that did I/O on it goes away.
//!
//! A flush on any connection syncs the whole pool's log, so it covers writes
//! completed on every other connection: the exports advertise
//! `CAN_MULTI_CONN`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::catalog::{Access, Catalog};
use vpool_engine::{EngineError, Pool, Volume};
use vpool_nbd::{BlockDevice, DeviceError, DeviceErrorKind, ExportInfo, ExportRegistry};

/// Most `base:allocation` extents returned for one BLOCK_STATUS request;
/// clients ask again for the rest.
const MAX_BLOCK_STATUS_EXTENTS: usize = 1024;

/// The pool's volumes and snapshots, by name.
pub struct PoolExports {
    pool: Pool,
    catalog: Arc<Catalog>,
}

impl PoolExports {
    /// Exports over `pool`, registering open devices in `catalog` (shared
    /// with the API server).
    pub fn new(pool: Pool, catalog: Arc<Catalog>) -> PoolExports {
        PoolExports { pool, catalog }
    }
}

fn open_error(name: &str, e: EngineError) -> DeviceError {
    match e {
        EngineError::VolumeNotFound(_) => {
            DeviceError::not_found(format!("no volume named {name:?}"))
        }
        EngineError::SnapshotNotFound { .. } => {
            DeviceError::not_found(format!("no snapshot named {name:?}"))
        }
        other => to_device_error(other),
    }
}

impl ExportRegistry for PoolExports {
    fn list(&self) -> Vec<ExportInfo> {
        let templates = self.catalog.templates();
        let mut out = Vec::new();
        let vols = self.pool.list_volumes().into_iter();
        // Volumes in the trash are not served.
        for v in vols.filter(|v| !crate::catalog::is_reserved(&v.name)) {
            let sealed = templates
                .get(&v.name)
                .is_some_and(|t| t.volume_id == v.id.0);
            // A replica's head is not served at all (its points are), nor
            // an incomplete volume (listed, it would fail `nbdinfo --list`
            // as a whole).
            if self.catalog.replica(&v.name, v.id.0).is_some()
                || self.catalog.import_incomplete(&v.name, v.id.0)
            {
                out.extend(self.snapshot_exports(&v.name));
                continue;
            }
            out.push(ExportInfo {
                description: if sealed {
                    format!("vpool template {} (read-only)", v.name)
                } else {
                    format!("vpool volume {}", v.name)
                },
                name: v.name.clone(),
                size_bytes: v.size_bytes,
                read_only: sealed,
            });
            out.extend(self.snapshot_exports(&v.name));
        }
        out
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        self.open_image(name, false, true)
    }
}

impl PoolExports {
    /// The read-only exports of `volume`'s snapshots (none for a volume
    /// deleted since the listing began).
    fn snapshot_exports(&self, volume: &str) -> Vec<ExportInfo> {
        let snaps = self.pool.list_snapshots(volume).unwrap_or_default();
        snaps
            .into_iter()
            .map(|s| ExportInfo {
                name: format!("{volume}@{}", s.name),
                description: format!("vpool snapshot {} of volume {volume} (read-only)", s.name),
                size_bytes: s.size_bytes,
                read_only: true,
            })
            .collect()
    }

    /// The device of volume `name` while it is marked incomplete: the
    /// destination of a move, which writes it before anyone may open it.
    pub(crate) fn open_incomplete(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        self.open_image(name, true, true)
    }

    /// The device an importer writes through (`export` is its secret
    /// export name, `Catalog::begin_import`), with the volume's name. Its
    /// requests fail once the import ends or begins again; its I/O never
    /// arms an ephemeral volume's deletion (the importer is not its user).
    pub fn open_import(&self, export: &str) -> Result<(String, Arc<dyn BlockDevice>), DeviceError> {
        let gone = || DeviceError::not_found("no such import (it ended, or began again)");
        let (volume, id, live) = self.catalog.import_export(export).ok_or_else(gone)?;
        let dev = self.open_image(&volume, true, false)?;
        if !self.pool.volume_info(&volume).is_ok_and(|i| i.id.0 == id) {
            return Err(gone());
        }
        let dev = Arc::new(ImportDevice { inner: dev, live });
        Ok((volume, dev))
    }

    /// Opens image `name` (`VOLUME` or `VOLUME@SNAPSHOT`), refusing a
    /// volume marked incomplete unless `incomplete_ok`. The device's I/O
    /// `arms` an ephemeral volume's deletion at its last close (not an
    /// importer's).
    fn open_image(
        &self,
        name: &str,
        incomplete_ok: bool,
        arms: bool,
    ) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        if crate::catalog::is_reserved(name) {
            return Err(DeviceError::not_found(format!("no volume named {name:?}")));
        }
        let (volume, vol, want) = match name.split_once('@') {
            Some((v, s)) => {
                let handle = self.pool.snapshot(v, s).map_err(|e| open_error(name, e))?;
                (v, handle, Access::Read)
            }
            None => {
                let handle = self.pool.volume(name).map_err(|e| open_error(name, e))?;
                (name, handle, Access::Write)
            }
        };
        let info = self
            .pool
            .volume_info(volume)
            .map_err(|e| open_error(name, e))?;
        let id = info.id.0;
        if !incomplete_ok && self.catalog.import_incomplete(volume, id) {
            return Err(DeviceError::not_found(format!(
                "volume {volume} is incomplete: an import into it did not finish; import it again (vpool vol import {volume} FILE --force) or delete it"
            )));
        }
        if want == Access::Write
            && let Some(r) = self.catalog.replica(volume, id)
        {
            // Between two points its head is half a run.
            return Err(DeviceError::not_found(format!(
                "volume {volume} is a replica of {}: serve one of its points ({volume}@POINT, `vpool snap list {volume}`), or `vpool replica promote {volume}` first",
                r.source
            )));
        }
        let access = self.catalog.nbd_open(volume, id, want);
        let guard = Registration {
            pool: self.pool.clone(),
            catalog: Arc::clone(&self.catalog),
            volume: volume.to_string(),
            id,
            access,
            ephemeral: info.ephemeral,
        };
        // The volume may have been deleted (say, an ephemeral one by its
        // last client) between the lookup and the registration; dropping
        // the guard then unregisters.
        match self.pool.volume_info(volume) {
            Ok(now) if now.id.0 == id => {}
            _ => return Err(DeviceError::not_found(format!("no volume named {name:?}"))),
        }
        let size_bytes = vol.size_bytes().map_err(to_device_error)?;
        Ok(Arc::new(VolumeDevice {
            vol,
            size_bytes,
            read_only: access == Access::Read,
            // Not `arms`: as if it had done I/O already (nothing to arm).
            used: AtomicBool::new(!arms),
            guard,
        }))
    }
}

/// An importer's device: every request first checks that its import is
/// still the live one.
struct ImportDevice {
    inner: Arc<dyn BlockDevice>,
    /// Cleared when the import ends or begins again (`Catalog`).
    live: Arc<AtomicBool>,
}

impl ImportDevice {
    fn live(&self) -> Result<(), DeviceError> {
        if self.live.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(DeviceError::new(
            DeviceErrorKind::ReadOnly,
            "the import this connection was opened for ended, or began again",
        ))
    }
}

impl BlockDevice for ImportDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.live()?;
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.live()?;
        self.inner.write(offset, data)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.live()?;
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.live()?;
        self.inner.trim(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.live()?;
        self.inner.write_zeroes(offset, len, may_trim)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.live()?;
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.cache(offset, len)
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
}

/// A device's entry in the catalog; dropping it unregisters, and deletes
/// an ephemeral volume when this was its last NBD connection and one of
/// them did I/O.
struct Registration {
    pool: Pool,
    catalog: Arc<Catalog>,
    volume: String,
    id: u64,
    access: Access,
    ephemeral: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let ephemeral = self.ephemeral;
        let pool = &self.pool;
        let volume = &self.volume;
        let id = self.id;
        self.catalog.nbd_close(self.id, self.access, || {
            if !ephemeral {
                return;
            }
            // Only the volume this device was opened on, not a new one of
            // the same name.
            if !matches!(pool.volume_info(volume), Ok(i) if i.id.0 == id) {
                return;
            }
            match pool.delete_volume(volume) {
                Ok(()) => tracing::info!(
                    volume = %volume,
                    "deleted ephemeral volume: its last NBD client disconnected"
                ),
                Err(e) => tracing::warn!(
                    volume = %volume,
                    error = %e,
                    "could not delete ephemeral volume after its last NBD client disconnected"
                ),
            }
        });
    }
}

/// One connection's view of a volume or snapshot. The size is fixed when
/// the client connects (NBD has no resize notification); a resize shows on
/// reconnect.
struct VolumeDevice {
    vol: Volume,
    size_bytes: u64,
    read_only: bool,
    /// This connection did I/O (noted once in the catalog).
    used: AtomicBool,
    guard: Registration,
}

impl VolumeDevice {
    fn note_use(&self) {
        if !self.used.load(Ordering::Relaxed) && !self.used.swap(true, Ordering::Relaxed) {
            self.guard.catalog.nbd_used(self.guard.id);
        }
    }

    fn check_write(&self) -> Result<(), DeviceError> {
        self.note_use();
        if self.read_only {
            return Err(DeviceError::read_only(match self.vol.snapshot_name() {
                Some(s) => format!("{}@{s} is a snapshot", self.vol.name()),
                None => format!("volume {} is a template (read-only)", self.vol.name()),
            }));
        }
        Ok(())
    }
}

fn to_device_error(e: EngineError) -> DeviceError {
    let kind = match &e {
        _ if e.is_no_space() => DeviceErrorKind::NoSpace,
        EngineError::OutOfRange { .. } | EngineError::Invalid { .. } => DeviceErrorKind::Invalid,
        EngineError::ReadOnly(_) => DeviceErrorKind::ReadOnly,
        _ => DeviceErrorKind::Io,
    };
    DeviceError::new(kind, e.to_string())
}

impl BlockDevice for VolumeDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.note_use();
        self.vol.read(offset, buf).map_err(to_device_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.check_write()?;
        self.vol.write(offset, data).map_err(to_device_error)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.note_use();
        if self.read_only {
            // Nothing of this connection's to make durable.
            return Ok(());
        }
        self.vol.flush().map_err(to_device_error)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check_write()?;
        self.vol.trim(offset, len).map_err(to_device_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.check_write()?;
        self.vol
            .write_zeroes(offset, len, may_trim)
            .map_err(to_device_error)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.note_use();
        self.vol
            .block_status(offset, len, MAX_BLOCK_STATUS_EXTENTS)
            .map_err(to_device_error)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _ = (offset, len);
        self.note_use();
        Ok(())
    }

    fn can_multi_conn(&self) -> bool {
        true
    }
}
