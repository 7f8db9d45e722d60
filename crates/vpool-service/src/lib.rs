//! vpool's service layer: the rules of the domain, between the engine and
//! its front ends.
//!
//! The engine (`vpool-engine`) keeps volumes, snapshots and their data. What
//! a host promises beyond that lives here, once, for every front end:
//!
//! - [`pool`]: [`PoolService`], one pool and every operation on it with its
//!   checks and effects (templates refuse changes, a running VM's disk is
//!   not changed under it unless forced, imports mark their volume
//!   incomplete), each check and its change under the same lock.
//! - [`catalog`]: what the service keeps beside the engine: templates and
//!   unfinished imports (persisted in the pool), and who has each volume
//!   open over NBD (in memory).
//! - [`writers`]: one NBD client writes a volume at a time (unless it is
//!   shared); a second one's writes wait for the first to go.
//! - [`exports`]: the pool's volumes and snapshots as NBD exports
//!   (`vpool-nbd`'s `ExportRegistry`), registering each connection in the
//!   catalog.
//! - [`error`]: the one error type every operation returns, with a stable
//!   [`ErrorKind`].
//!
//! The API crate (`vpool-api`) keeps the wire types, the routes, thin
//! handlers and the client; the binary keeps `main` and the CLI.

pub mod cache;
pub mod catalog;
pub mod clients;
pub mod error;
pub mod exports;
pub mod host;
pub mod jobs;
pub mod layered;
pub mod metrics;
pub mod names;
pub mod pool;
pub mod qos;
pub mod stripes;
pub mod trash;
pub mod writers;

pub use cache::{CacheControl, CacheInfo, PinInfo};
pub use catalog::{Access, Catalog, TEMPLATE_SNAPSHOT, TemplateRecord};
pub use error::{Error, ErrorKind, Result};
pub use exports::PoolExports;
pub use host::{
    FamilyOwner, ForwardDevice, Host, HostExports, HostPeers, Opened, OpenedPool, Opener, PoolCtx,
    PoolKind, PoolSlot, PoolState, S3Spec, SharedCtx, SharedStore, SharedVolumeStatus,
};
pub use pool::{Flattened, PoolService, VolumeView};
