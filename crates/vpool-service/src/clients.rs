//! Who has each image open over NBD on this host, for `vpool vol status`
//! (as `rbd status` lists an image's watchers).
//!
//! [`Clients::wrap`] puts each device the NBD server opens in a
//! [`ClientDevice`] that registers the connection (peer, image, read-only
//! or not, since when) and unregisters it when the server drops the
//! device, that is when the client disconnects. The registry holds one
//! entry per open device, so it is bounded by the NBD server's connection
//! limit; [`MAX_CLIENTS`] is a second bound in case a caller opens devices
//! without one (a device past it is served but not listed, and a warning
//! is logged).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vpool_nbd::{BlockDevice, DeviceError};

/// Most connections listed at once.
pub const MAX_CLIENTS: usize = 65_536;

/// One NBD connection to an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientInfo {
    /// Who: `unix pid P uid U` or a TCP address.
    pub peer: String,
    /// What it opened: `VOLUME` or `VOLUME@SNAPSHOT`.
    pub image: String,
    pub read_only: bool,
    /// When it opened it (Unix ms).
    pub since_unix_ms: u64,
}

/// (pool, volume): the key an entry is found by.
type Key = (String, String);

/// The open NBD connections of every image of this host.
#[derive(Default)]
pub struct Clients {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, (Key, ClientInfo)>>,
}

impl Clients {
    /// `dev`, image `image` of pool `pool` opened by `peer`, registered
    /// until it is dropped.
    pub fn wrap(
        self: &Arc<Self>,
        pool: &str,
        image: &str,
        peer: &str,
        dev: Arc<dyn BlockDevice>,
    ) -> Arc<dyn BlockDevice> {
        let volume = image.split('@').next().unwrap_or(image);
        let info = ClientInfo {
            peer: peer.to_string(),
            image: image.to_string(),
            read_only: dev.read_only(),
            since_unix_ms: crate::jobs::unix_ms(),
        };
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut open = self.lock();
        if open.len() >= MAX_CLIENTS {
            tracing::warn!(
                pool,
                image,
                peer,
                "{MAX_CLIENTS} NBD connections are listed already: this one is served but not listed"
            );
            return dev;
        }
        open.insert(id, ((pool.to_string(), volume.to_string()), info));
        drop(open);
        Arc::new(ClientDevice {
            inner: dev,
            clients: Arc::clone(self),
            id,
        })
    }

    /// The connections to volume `volume` of `pool` and its snapshots,
    /// oldest first.
    pub fn of(&self, pool: &str, volume: &str) -> Vec<ClientInfo> {
        let open = self.lock();
        let mut out: Vec<ClientInfo> = (open.values())
            .filter(|((p, v), _)| p == pool && v == volume)
            .map(|(_, c)| c.clone())
            .collect();
        out.sort_by_key(|c| c.since_unix_ms);
        out
    }

    /// The connections to every volume of `pool`, by volume: one pass.
    pub fn of_pool(&self, pool: &str) -> std::collections::HashMap<String, Vec<ClientInfo>> {
        let open = self.lock();
        let mut out: std::collections::HashMap<String, Vec<ClientInfo>> = Default::default();
        for ((p, v), c) in open.values().filter(|((p, _), _)| p == pool) {
            debug_assert_eq!(p, pool);
            out.entry(v.clone()).or_default().push(c.clone());
        }
        for list in out.values_mut() {
            list.sort_by_key(|c| c.since_unix_ms);
        }
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, (Key, ClientInfo)>> {
        // Every update is one insert or remove: a poisoned map is whole.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A device listed in [`Clients`] while it lives; I/O passes through.
struct ClientDevice {
    inner: Arc<dyn BlockDevice>,
    clients: Arc<Clients>,
    id: u64,
}

impl Drop for ClientDevice {
    fn drop(&mut self) {
        self.clients.lock().remove(&self.id);
    }
}

impl BlockDevice for ClientDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.inner.write(offset, data)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.trim(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.inner.write_zeroes(offset, len, may_trim)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.cache(offset, len)
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_is_listed_while_its_device_lives() {
        let clients = Arc::new(Clients::default());
        let mem: Arc<dyn BlockDevice> = Arc::new(vpool_nbd::MemDevice::new(4096));
        let a = clients.wrap("local", "web1", "unix pid 1 uid 0", Arc::clone(&mem));
        let b = clients.wrap("local", "web1@s", "10.0.0.2:5000", Arc::clone(&mem));
        let _other = clients.wrap("cold", "web1", "unix pid 2 uid 0", mem);
        let of = clients.of("local", "web1");
        assert_eq!(of.len(), 2, "{of:?}");
        assert_eq!(of[0].peer, "unix pid 1 uid 0");
        assert_eq!(of[1].image, "web1@s");
        drop(a);
        drop(b);
        assert!(clients.of("local", "web1").is_empty());
        assert_eq!(clients.of("cold", "web1").len(), 1);
    }
}
