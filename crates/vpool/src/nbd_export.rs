//! Volumes as NBD exports: the glue between `vpool-engine` and `vpool-nbd`.
//!
//! Every volume of the pool is an export of the same name. A flush on any
//! connection syncs the whole pool's log, so it covers writes completed on
//! every other connection: the exports advertise `CAN_MULTI_CONN`.

use std::sync::Arc;

use vpool_engine::{EngineError, Pool, Volume};
use vpool_nbd::{BlockDevice, DeviceError, DeviceErrorKind, ExportInfo, ExportRegistry};

/// Most `base:allocation` extents returned for one BLOCK_STATUS request;
/// clients ask again for the rest.
const MAX_BLOCK_STATUS_EXTENTS: usize = 1024;

/// The pool's volumes, by name.
pub struct PoolExports {
    pool: Pool,
}

impl PoolExports {
    pub fn new(pool: Pool) -> PoolExports {
        PoolExports { pool }
    }
}

impl ExportRegistry for PoolExports {
    fn list(&self) -> Vec<ExportInfo> {
        self.pool
            .list_volumes()
            .into_iter()
            .map(|v| ExportInfo {
                description: format!("vpool volume {}", v.name),
                name: v.name,
                size_bytes: v.size_bytes,
                read_only: false,
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        let vol = self.pool.volume(name).map_err(|e| match e {
            EngineError::VolumeNotFound(_) => {
                DeviceError::not_found(format!("no volume named {name:?}"))
            }
            other => to_device_error(other),
        })?;
        let size_bytes = vol.size_bytes().map_err(to_device_error)?;
        Ok(Arc::new(VolumeDevice { vol, size_bytes }))
    }
}

/// One connection's view of a volume. The size is fixed when the client
/// connects (NBD has no resize notification); a resize shows on reconnect.
struct VolumeDevice {
    vol: Volume,
    size_bytes: u64,
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
        false
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.vol.read(offset, buf).map_err(to_device_error)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.vol.write(offset, data).map_err(to_device_error)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.vol.flush().map_err(to_device_error)
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.vol.trim(offset, len).map_err(to_device_error)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.vol
            .write_zeroes(offset, len, may_trim)
            .map_err(to_device_error)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.vol
            .block_status(offset, len, MAX_BLOCK_STATUS_EXTENTS)
            .map_err(to_device_error)
    }

    fn can_multi_conn(&self) -> bool {
        true
    }
}
