//! [`CacheStats`]: the figures of an S3 pool's host cache, as
//! [`S3Store::stats`](crate::S3Store::stats) counts them and as the API
//! sends them (`GET /v1/cache`: `vpool_api::CacheInfo` is this type).
//!
//! It is built without the `remote` feature, so the API crate can use it
//! without the object store stack. Its JSON is part of the API: add fields
//! (every field defaults, so old and new clients and daemons read each
//! other), never rename or remove one.

use serde::{Deserialize, Serialize};

/// The host cache of a pool on object storage: `vpool cache stats`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheStats {
    /// Where the pool lives: `s3://bucket/prefix` (never credentials).
    pub remote: String,
    /// The cache directory (the pool directory of this daemon).
    pub cache_dir: String,
    /// The cache's limit: dirty log plus cached copies.
    pub cache_size_bytes: u64,
    /// Bytes of uploaded segments held in the cache.
    pub cached_bytes: u64,
    /// Bytes written here and not yet in the object store.
    pub dirty_bytes: u64,
    /// Writes wait (back-pressure) while dirty bytes are at this limit.
    pub dirty_limit_bytes: u64,
    /// Bytes kept resident for pinned volumes and snapshots.
    pub pinned_bytes: u64,
    /// Pins (`vpool cache pins`). The daemon counts them: the store sees
    /// only the log ranges they keep resident, and leaves 0 here.
    pub pins: u64,
    pub read_hits: u64,
    pub read_misses: u64,
    /// `read_hits / (read_hits + read_misses)`, 0 before any read.
    pub hit_ratio: f64,
    /// Bytes read from the cache by the engine.
    pub bytes_read: u64,
    /// Bytes fetched from the object store to fill the cache.
    pub bytes_fetched: u64,
    pub read_errors: u64,
    pub segments_uploaded: u64,
    pub bytes_uploaded: u64,
    /// Upload throughput while uploading, in MB/s (10^6 bytes).
    pub upload_mb_per_s: f64,
    /// Sealed bytes not yet in the object store.
    pub upload_lag_bytes: u64,
    /// Age of the oldest sealed segment not yet in the object store.
    pub upload_lag_seconds: f64,
    /// Failed object store requests (each retry counts).
    pub remote_errors: u64,
    pub last_error: Option<String>,
    /// The generation of the pool's manifest last committed by this host.
    pub generation: u64,
    pub segments_in_bucket: u64,
    /// This daemon, as the manifest names it: `host:pid`.
    pub holder: String,
    /// Whether the object store enforces the single writer (`atomic`) or
    /// the pool was created with `--unsafe-single-host` (`unsafe`).
    pub fencing: String,
    /// Set once another host took the pool over: this daemon's writes fail.
    pub fenced: Option<String>,
    /// What a FLUSH promises: `host` (durable in this cache) or `remote`
    /// (durable in the bucket, through the flush journal).
    pub durability: String,
    /// Flush-journal entries this daemon wrote, and their bytes.
    pub journal_entries: u64,
    pub journal_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wire shape clients parse: these names, in this order; any of
    /// them may be missing and unknown ones are ignored.
    #[test]
    fn json_shape() {
        let text = serde_json::to_string(&CacheStats::default()).unwrap();
        let want = concat!(
            r#"{"remote":"","cache_dir":"","cache_size_bytes":0,"cached_bytes":0,"#,
            r#""dirty_bytes":0,"dirty_limit_bytes":0,"pinned_bytes":0,"pins":0,"#,
            r#""read_hits":0,"read_misses":0,"hit_ratio":0.0,"bytes_read":0,"#,
            r#""bytes_fetched":0,"read_errors":0,"segments_uploaded":0,"#,
            r#""bytes_uploaded":0,"upload_mb_per_s":0.0,"upload_lag_bytes":0,"#,
            r#""upload_lag_seconds":0.0,"remote_errors":0,"last_error":null,"#,
            r#""generation":0,"segments_in_bucket":0,"holder":"","fencing":"","#,
            r#""fenced":null,"durability":"","journal_entries":0,"journal_bytes":0}"#
        );
        assert_eq!(text, want);
        let c: CacheStats =
            serde_json::from_str(r#"{"dirty_bytes":5,"from_the_future":1}"#).unwrap();
        assert_eq!(
            c,
            CacheStats {
                dirty_bytes: 5,
                ..CacheStats::default()
            }
        );
    }
}
