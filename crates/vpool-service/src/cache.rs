//! [`CacheControl`]: the host cache of a pool on object storage (stats and
//! pins), as the pool's owner provides it, so that the service (and the
//! API over it) need not know the object store. A local pool has none, and
//! cache requests answer `not_supported`.
//!
//! The methods are synchronous and may do engine work (computing a pin's
//! ranges walks the image's map) or write a file: callers run them on a
//! blocking thread.

use serde::{Deserialize, Serialize};
pub use vpool_s3::CacheStats as CacheInfo;

use crate::error::Result;

/// One pin: an image kept resident in the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinInfo {
    pub volume: String,
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Bytes of the pool's log the image's data lives in, as of the last
    /// refresh (every 10 s); `null` before the first one.
    #[serde(default)]
    pub bytes: Option<u64>,
    /// Why the last refresh could not pin it (the volume or snapshot is
    /// gone); `null` when it is pinned.
    #[serde(default)]
    pub error: Option<String>,
}

impl PinInfo {
    /// `VOLUME` or `VOLUME@SNAPSHOT`.
    pub fn image(&self) -> String {
        match &self.snapshot {
            Some(s) => format!("{}@{s}", self.volume),
            None => self.volume.clone(),
        }
    }
}

/// The cache of a pool on object storage.
pub trait CacheControl: Send + Sync + 'static {
    /// The cache's figures.
    fn stats(&self) -> CacheInfo;

    /// The pins, in the order they were made.
    fn pins(&self) -> Vec<PinInfo>;

    /// Pins `volume` (or its `snapshot`): keeps its data resident from now
    /// on. Returns the pin and whether it is new (pinning twice is not an
    /// error). A missing volume or snapshot is `not_found`.
    fn pin(&self, volume: &str, snapshot: Option<&str>) -> Result<(PinInfo, bool)>;

    /// Removes a pin; `not_found` if there is no such pin.
    fn unpin(&self, volume: &str, snapshot: Option<&str>) -> Result<()>;

    /// Waits until nothing written here is missing from the bucket: every
    /// segment sealed and synced before is uploaded and listed by a
    /// committed manifest that any later owner reads, with every
    /// checkpoint queued (seal the open segment first, or it waits for the
    /// pool's `--seal-after`). It waits for *everything*, so writes that go
    /// on meanwhile can keep it waiting: hold them. An error if that takes
    /// longer than `timeout` or this host is fenced.
    fn wait_in_bucket(&self, timeout: std::time::Duration) -> Result<()> {
        let _ = timeout;
        Err(crate::error::Error::new(
            crate::error::ErrorKind::NotSupported,
            "this pool has no bucket".to_string(),
        ))
    }

    /// Makes the release when the pool closes seal it (a shared pool's
    /// template): it opens read-only from then on, on every host.
    fn seal_at_close(&self) -> Result<()> {
        Err(crate::error::Error::new(
            crate::error::ErrorKind::NotSupported,
            "this pool cannot be sealed".to_string(),
        ))
    }
}
