//! The write-back side: bytes not yet in the bucket, and their bound.

use super::S3Store;

/// Dirty (not yet uploaded) bytes may take at most this share of the cache.
const DIRTY_SHARE: f64 = 0.75;

impl S3Store {
    pub(super) fn dirty_limit(&self) -> u64 {
        (self.inner.opts.cache_size_bytes as f64 * DIRTY_SHARE) as u64
    }

    pub(super) fn clean_capacity(&self, dirty_bytes: u64) -> u64 {
        self.inner.opts.cache_size_bytes.saturating_sub(dirty_bytes)
    }
}
