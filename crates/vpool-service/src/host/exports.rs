//! [`HostExports`]: every open pool's volumes as the exports of the one NBD
//! server of a host.

use std::sync::Arc;

use vpool_nbd::ExportRegistry;

use super::{Host, PoolState};
use crate::error::ErrorKind;

/// Every open pool's volumes and snapshots as NBD exports of one server:
/// `POOL/VOLUME` and `POOL/VOLUME@SNAPSHOT`, and for the default pool the
/// bare `VOLUME` and `VOLUME@SNAPSHOT` (so URIs from before pools had names
/// keep working; the listing shows those, and `POOL/` names open them
/// too). Volume names cannot contain `/`, so a name with one is always
/// pool-qualified.
pub struct HostExports {
    host: Arc<Host>,
    /// Count each device's requests for `GET /metrics`.
    count_io: bool,
}

impl HostExports {
    pub fn new(host: Arc<Host>) -> HostExports {
        HostExports {
            host,
            count_io: true,
        }
    }

    /// Whether each device's requests are counted (`serve
    /// --no-io-metrics` turns it off).
    pub fn counting_io(mut self, count_io: bool) -> HostExports {
        self.count_io = count_io;
        self
    }
}

/// The opener of a device opened without a client (in-process callers):
/// they all count as one client.
static IN_PROCESS: std::sync::LazyLock<vpool_nbd::Opener> =
    std::sync::LazyLock::new(|| vpool_nbd::Opener {
        client: vpool_nbd::ClientKey::Unknown,
        peer: "in-process".into(),
    });

impl vpool_nbd::ExportRegistry for HostExports {
    fn list(&self) -> Vec<vpool_nbd::ExportInfo> {
        let mut out = Vec::new();
        for slot in self.host.pools() {
            let exports = match slot.state {
                PoolState::Open(ctx) => ctx.exports.list(),
                // Each family's one volume (and its snapshots) is already
                // named `VOLUME`: the pool's name goes in front below.
                PoolState::Shared(sh) => sh.owned().iter().flat_map(|f| f.exports.list()).collect(),
                _ => continue,
            };
            // The default pool's exports are listed by their bare names
            // (`POOL/NAME` opens them too).
            if slot.name == self.host.default {
                out.extend(exports);
                continue;
            }
            out.extend(exports.into_iter().map(|mut e| {
                e.name = format!("{}/{}", slot.name, e.name);
                e
            }));
        }
        out
    }

    fn open(
        &self,
        name: &str,
    ) -> std::result::Result<Arc<dyn vpool_nbd::BlockDevice>, vpool_nbd::DeviceError> {
        self.open_by(name, &IN_PROCESS)
    }

    fn open_by(
        &self,
        name: &str,
        by: &vpool_nbd::Opener,
    ) -> std::result::Result<Arc<dyn vpool_nbd::BlockDevice>, vpool_nbd::DeviceError> {
        let (pool, image) = crate::names::split_pool(name);
        // An importer's export (`Catalog::begin_import`) is counted and
        // listed under its volume: its name is a secret.
        let (dev, imported) = match image.starts_with(crate::catalog::IMPORT_EXPORT_PREFIX) {
            true => {
                let (volume, dev) = self.open_import(pool, image)?;
                (dev, Some(volume))
            }
            false => (self.open_device(pool, image)?, None),
        };
        let image = imported.as_deref().unwrap_or(image);
        let volume = image.split('@').next().unwrap_or(image);
        // Every device of a volume (not of a snapshot) goes through its
        // buckets, limited or not, so that limits set later apply to it,
        // and through its one-writer gate.
        let dev = match self.host.serving_pool(pool, volume) {
            Ok(ctx) if !image.contains('@') => match ctx.service.volume(volume) {
                Ok(v) => {
                    let name = pool.unwrap_or(&self.host.default);
                    let service = &ctx.service;
                    let read = || service.volume(volume).map(|v| v.qos).unwrap_or_default();
                    let key = (name, volume, v.info.id.0);
                    let dev = self.host.throttles.wrap(key, read, dev);
                    // An importer writes past the gate: the import mark
                    // (with --force --force under writers) is its right.
                    if dev.read_only() || imported.is_some() {
                        dev
                    } else {
                        self.host.writers.wrap(key, by, v.multi_writer, dev)
                    }
                }
                Err(_) => dev,
            },
            _ => dev,
        };
        let pool = pool.unwrap_or(&self.host.default);
        // Listed for `vol status` while the client has it open.
        let dev = self.host.clients.wrap(pool, image, &by.peer, dev);
        if !self.count_io {
            return Ok(dev);
        }
        // Counted for `GET /metrics` (`crate::metrics`).
        Ok(self.host.meters.wrap(pool, image, dev))
    }
}

impl HostExports {
    /// The device an importer writes through, and its volume's name (see
    /// `PoolExports::open_import`). Not in a shared pool (its imports go
    /// through the API).
    fn open_import(
        &self,
        pool: Option<&str>,
        export: &str,
    ) -> std::result::Result<(String, Arc<dyn vpool_nbd::BlockDevice>), vpool_nbd::DeviceError>
    {
        let not_found = || vpool_nbd::DeviceError::not_found("no such import");
        if self.host.shared(pool).is_some() {
            return Err(not_found());
        }
        let ctx = self.host.pool(pool).map_err(|_| not_found())?;
        let (volume, dev) = ctx.exports.open_import(export)?;
        if self.host.moves.blocks(&ctx.name, &volume) {
            return Err(vpool_nbd::DeviceError::not_found(format!(
                "volume {}/{volume} is named by a move a crash interrupted, which is not resolved yet",
                ctx.name
            )));
        }
        Ok((volume, dev))
    }

    /// The device of `image` (`VOLUME` or `VOLUME@SNAPSHOT`) of `pool`
    /// (`None`: the default pool).
    fn open_device(
        &self,
        pool: Option<&str>,
        image: &str,
    ) -> std::result::Result<Arc<dyn vpool_nbd::BlockDevice>, vpool_nbd::DeviceError> {
        if let Some(sh) = self.host.shared(pool) {
            return sh.serve(&self.host.opener, image);
        }
        let volume = image.split('@').next().unwrap_or(image);
        match self.host.volume_pool(pool, volume) {
            Ok(ctx) => {
                if self.host.moves.blocks(&ctx.name, volume) {
                    return Err(vpool_nbd::DeviceError::not_found(format!(
                        "volume {}/{volume} is named by a move a crash interrupted, which is not resolved yet (its pools must both be open; the daemon's log says more)",
                        ctx.name
                    )));
                }
                let dev = ctx.exports.open(image)?;
                if image.contains('@') || dev.read_only() {
                    return Ok(dev);
                }
                // A volume's writable devices go through its route: a move
                // redirects them without the client reconnecting.
                Ok(super::route::MovableDevice::wrap(
                    &self.host.routes,
                    &ctx.name,
                    volume,
                    dev,
                ))
            }
            Err(e) if matches!(e.kind, ErrorKind::NotFound | ErrorKind::NotOwner) => {
                Err(vpool_nbd::DeviceError::not_found(e.message))
            }
            Err(e) => Err(vpool_nbd::DeviceError::new(
                vpool_nbd::DeviceErrorKind::Io,
                e.message,
            )),
        }
    }
}
