//! [`CacheControl`]: what the API needs from a pool that has a host cache
//! (a pool on object storage), so that this crate does not depend on the
//! object store backend. The daemon implements it for its S3 pools; a local
//! pool has none, and the cache routes answer `not_supported`.
//!
//! The methods are synchronous and may do engine work (computing a pin's
//! ranges walks the image's map) or write a file: the server calls them on
//! the blocking pool.

use crate::error::ApiError;
use crate::types::{CacheInfo, PinInfo};

/// The cache of the pool a daemon serves.
pub trait CacheControl: Send + Sync + 'static {
    /// The cache's figures (`GET /v1/cache`).
    fn stats(&self) -> CacheInfo;

    /// The pins, in the order they were made (`GET /v1/cache/pins`).
    fn pins(&self) -> Vec<PinInfo>;

    /// Pins `volume` (or its `snapshot`): keeps its data resident from now
    /// on. Returns the pin and whether it is new (pinning twice is not an
    /// error). A missing volume or snapshot is `not_found`.
    fn pin(&self, volume: &str, snapshot: Option<&str>) -> Result<(PinInfo, bool), ApiError>;

    /// Removes a pin; `not_found` if there is no such pin.
    fn unpin(&self, volume: &str, snapshot: Option<&str>) -> Result<(), ApiError>;
}
