//! [`HostPeers`]: what this host does for the other hosts of its shared
//! pools over the peer link (`vpool-peer`): run their clients' requests on
//! the volumes it owns, say how many clients a volume has, release one.

use std::sync::Arc;

use vpool_nbd::{BlockDevice, DeviceError};
use vpool_peer::{PeerBackend, Refusal, Secret};

use super::Host;
use super::shared::SharedCtx;
use crate::error::ErrorKind;

/// The host as its peers see it.
pub struct HostPeers {
    host: Arc<Host>,
}

impl HostPeers {
    pub fn new(host: Arc<Host>) -> HostPeers {
        HostPeers { host }
    }

    fn shared(&self, pool: &str) -> Result<Arc<SharedCtx>, Refusal> {
        self.host.shared(Some(pool)).ok_or_else(|| {
            Refusal::Device(DeviceError::not_found(format!(
                "this host has no shared pool {pool} open"
            )))
        })
    }
}

/// An error of the service as the peer sees it: a volume this host does
/// not own (any more) is "busy", so the peer asks the bucket again.
fn refusal(e: crate::Error) -> Refusal {
    match e.kind {
        ErrorKind::NotOwner => Refusal::Busy(e.message),
        ErrorKind::NotFound => Refusal::Device(DeviceError::not_found(e.message)),
        _ => Refusal::Device(DeviceError::io(e.message)),
    }
}

impl PeerBackend for HostPeers {
    fn secret(&self, pool: &str) -> Option<Secret> {
        let sh = self.host.shared(Some(pool))?;
        sh.peer_secret()
            .inspect_err(|e| tracing::warn!(pool, error = %e.message, "peer link: the pool's secret cannot be read"))
            .ok()
    }

    fn open(&self, pool: &str, image: &str) -> Result<Arc<dyn BlockDevice>, Refusal> {
        let vol = image.split('@').next().unwrap_or(image);
        // Only what this host owns: it never forwards what was forwarded.
        let sh = self.shared(pool)?;
        let family = sh.family(vol).map_err(refusal)?;
        match sh.open_owned(&family, vol, image) {
            Some(dev) => Ok(Arc::new(Served {
                dev: dev.map_err(Refusal::Device)?,
                sh,
                volume: vol.to_string(),
                family,
            })),
            None => Err(Refusal::Busy(format!(
                "volume {pool}/{vol} is being released by this host"
            ))),
        }
    }

    fn connections(&self, pool: &str, volume: &str) -> Result<u64, DeviceError> {
        let sh = self.shared(pool).map_err(|r| match r {
            Refusal::Device(e) => e,
            Refusal::Busy(m) => DeviceError::io(m),
        })?;
        let family = sh.family(volume).map_err(|e| DeviceError::io(e.message))?;
        Ok(family.service.catalog().nbd_connections_total() as u64)
    }

    fn release(&self, pool: &str, volume: &str) -> Result<(), Refusal> {
        let sh = self.shared(pool)?;
        match sh.release(&*self.host.opener, volume, false) {
            Ok(()) => {
                tracing::info!(
                    pool,
                    volume,
                    "volume released to the peer whose clients use it"
                );
                Ok(())
            }
            Err(e) if matches!(e.kind, ErrorKind::InUse | ErrorKind::Failed) => {
                Err(Refusal::Busy(e.message))
            }
            Err(e) => Err(refusal(e)),
        }
    }
}

/// A device a peer forwards to: each request first checks that its family
/// is still the one this host owns (an `RwLock` read), and refuses with
/// `NotFound` (the link's "moved", run nowhere) once it was released or
/// dropped, so no forwarded request runs on a closed or fenced family.
struct Served {
    dev: Arc<dyn BlockDevice>,
    sh: Arc<SharedCtx>,
    volume: String,
    family: Arc<super::PoolCtx>,
}

impl Served {
    fn check(&self) -> Result<(), DeviceError> {
        if self.sh.still_owned(&self.volume, &self.family) {
            return Ok(());
        }
        Err(DeviceError::not_found(format!(
            "volume {}/{} is not served by this host any more",
            self.sh.name, self.volume
        )))
    }
}

impl BlockDevice for Served {
    fn size_bytes(&self) -> u64 {
        self.dev.size_bytes()
    }
    fn read_only(&self) -> bool {
        self.dev.read_only()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check()?;
        self.dev.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.check()?;
        self.dev.write(offset, data)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.check()?;
        self.dev.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check()?;
        self.dev.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.check()?;
        self.dev.write_zeroes(offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.check()?;
        self.dev.block_status(offset, len)
    }
    fn can_multi_conn(&self) -> bool {
        self.dev.can_multi_conn()
    }
}
