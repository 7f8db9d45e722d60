//! vpool pools on S3-compatible object storage, behind a crash-consistent
//! host-side cache.
//!
//! - [`remote`]: the object store with deadlines and retries, blocking.
//! - [`manifest`]: the pool's root object, its key layout and the commit and
//!   fencing protocol.
//! - [`bucket`]: what a bucket says without opening its pool: the latest
//!   manifest, a pool's summary, the probe of the store's create-only PUT.
//! - [`store`]: [`S3Store`], the engine's [`vpool_store::SegmentStore`] on an
//!   object store: write-back log, ordered upload, read cache, back-pressure.
//! - [`journal`]: the flush journal of a pool with remote durability.
//! - [`shared`]: shared pools (many hosts, a family per volume): the
//!   pool's identity, its volume names, who owns each family.
//! - [`stats`]: [`CacheStats`], the cache's figures, also the API's wire
//!   type for them.
//! - [`faults`]: an object store wrapper that injects failures, for tests.
//!
//! Where the bytes come from is [`object_store`]'s business, so the same
//! code runs on S3 (AWS, Ceph RGW, MinIO, Garage), on a local directory
//! (`file://`) and in memory (`memory://`, tests).
//!
//! Without the default `remote` feature only [`manifest`], [`journal`],
//! [`shared`] and [`stats`] are built: the fuzzer needs their decoders and
//! the API crate the figures, neither an HTTP stack.

#[cfg(feature = "remote")]
pub mod bucket;
#[cfg(feature = "remote")]
pub mod faults;
pub mod journal;
pub mod manifest;
#[cfg(feature = "remote")]
pub mod remote;
pub mod shared;
pub mod stats;
#[cfg(feature = "remote")]
pub mod store;

#[cfg(feature = "remote")]
pub use bucket::{PoolSummary, pool_summary, probe_fencing};
pub use journal::Durability;
pub use manifest::Fencing;
#[cfg(feature = "remote")]
pub use remote::{Remote, RemoteError, RetryPolicy};
pub use stats::CacheStats;
#[cfg(feature = "remote")]
pub use store::{
    CacheBudget, LeaseTiming, OpenError, OpenMode, S3PoolOptions, S3Store, STATE_META, is_cache_dir,
};

#[cfg(feature = "remote")]
use object_store::ObjectStore;
#[cfg(feature = "remote")]
use std::sync::Arc;

/// Where a pool lives, parsed from a URL: `s3://bucket/prefix`,
/// `gs://bucket/prefix`, `az://container/prefix`, `file:///abs/dir`, or
/// `memory://` (tests only: gone with the process).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUrl {
    pub scheme: Scheme,
    /// Bucket for S3, directory for `file`.
    pub container: String,
    pub prefix: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    S3,
    /// Google Cloud Storage (`gs://bucket/prefix`); credentials from the
    /// environment (`GOOGLE_SERVICE_ACCOUNT`, ...). Built, not tested here.
    Gcs,
    /// Azure Blob Storage (`az://container/prefix`); credentials from the
    /// environment (`AZURE_STORAGE_ACCOUNT_NAME`, ...). Built, not tested here.
    Azure,
    File,
    Memory,
}

#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("bad pool URL {url:?}: {why}")]
    Bad { url: String, why: String },
    #[error("cannot reach object store {url}: {detail}")]
    Build { url: String, detail: String },
}

impl PoolUrl {
    pub fn parse(url: &str) -> Result<PoolUrl, UrlError> {
        let bad = |why: &str| UrlError::Bad {
            url: url.to_string(),
            why: why.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("expected SCHEME://..."))?;
        match scheme {
            "s3" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket"));
                }
                Ok(PoolUrl {
                    scheme: Scheme::S3,
                    container: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                })
            }
            "gs" | "az" => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket or container"));
                }
                Ok(PoolUrl {
                    scheme: if scheme == "gs" {
                        Scheme::Gcs
                    } else {
                        Scheme::Azure
                    },
                    container: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                })
            }
            "file" => {
                if !rest.starts_with('/') {
                    return Err(bad("file URLs need an absolute path: file:///dir"));
                }
                Ok(PoolUrl {
                    scheme: Scheme::File,
                    container: rest.trim_end_matches('/').to_string(),
                    prefix: String::new(),
                })
            }
            "memory" => Ok(PoolUrl {
                scheme: Scheme::Memory,
                container: String::new(),
                prefix: rest.trim_matches('/').to_string(),
            }),
            _ => Err(bad("scheme must be s3, gs, az, file or memory")),
        }
    }

    /// For logs and errors: never carries credentials.
    pub fn display(&self) -> String {
        match self.scheme {
            Scheme::S3 => format!("s3://{}/{}", self.container, self.prefix),
            Scheme::Gcs => format!("gs://{}/{}", self.container, self.prefix),
            Scheme::Azure => format!("az://{}/{}", self.container, self.prefix),
            Scheme::File => format!("file://{}", self.container),
            Scheme::Memory => format!("memory://{}", self.prefix),
        }
    }
}

/// How to reach an S3 endpoint. Credentials are read from the environment
/// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
/// `AWS_REGION`, ...) or given here from a credentials file; they are never
/// logged or printed.
#[derive(Clone, Default)]
pub struct S3Access {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Access")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("credentials", &"<redacted>")
            .finish()
    }
}

impl S3Access {
    /// Reads `key = value` lines (`access_key_id`, `secret_access_key`,
    /// `endpoint`, `region`; `#` comments) from a credentials file.
    pub fn from_file(path: &std::path::Path) -> std::io::Result<S3Access> {
        let text = std::fs::read_to_string(path)?;
        let mut a = S3Access::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((k, v)) = line.split_once('=') else {
                return Err(std::io::Error::other(format!(
                    "{}: expected key = value",
                    path.display()
                )));
            };
            let v = Some(v.trim().to_string());
            match k.trim() {
                "access_key_id" | "aws_access_key_id" => a.access_key_id = v,
                "secret_access_key" | "aws_secret_access_key" => a.secret_access_key = v,
                "endpoint" => a.endpoint = v,
                "region" => a.region = v,
                other => {
                    return Err(std::io::Error::other(format!(
                        "{}: unknown key {other:?}",
                        path.display()
                    )));
                }
            }
        }
        Ok(a)
    }
}

/// Builds the object store a URL names.
#[cfg(feature = "remote")]
pub fn build_object_store(
    url: &PoolUrl,
    access: &S3Access,
) -> Result<Arc<dyn ObjectStore>, UrlError> {
    let err = |e: object_store::Error| UrlError::Build {
        url: url.display(),
        detail: e.to_string(),
    };
    match url.scheme {
        Scheme::S3 => {
            use object_store::aws::AmazonS3Builder;
            use object_store::{ClientOptions, RetryConfig};
            let mut b = AmazonS3Builder::from_env().with_bucket_name(&url.container);
            if let Some(ep) = &access.endpoint {
                b = b
                    .with_endpoint(ep)
                    .with_allow_http(ep.starts_with("http://"));
            }
            if let Some(r) = &access.region {
                b = b.with_region(r);
            } else if std::env::var_os("AWS_REGION").is_none()
                && std::env::var_os("AWS_DEFAULT_REGION").is_none()
            {
                b = b.with_region("us-east-1");
            }
            if let Some(k) = &access.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(s) = &access.secret_access_key {
                b = b.with_secret_access_key(s);
            }
            // Our own retry loop has the deadline; keep object_store's short.
            let retry = RetryConfig {
                max_retries: 2,
                retry_timeout: std::time::Duration::from_secs(5),
                ..Default::default()
            };
            let client = ClientOptions::new()
                .with_connect_timeout(std::time::Duration::from_secs(3))
                .with_timeout(std::time::Duration::from_secs(120))
                .with_allow_http(
                    access
                        .endpoint
                        .as_deref()
                        .is_some_and(|e| e.starts_with("http://")),
                );
            // SigV4 without hashing each payload (UNSIGNED-PAYLOAD, what
            // AWS's own SDKs send over TLS): the hash cost 17% of the
            // daemon's CPU in uploads, and vpool checks what it reads
            // anyway: every record, the manifest and each metadata blob
            // carry CRC-32C checksums.
            b = b.with_unsigned_payload(true);
            Ok(Arc::new(
                b.with_retry(retry)
                    .with_client_options(client)
                    .build()
                    .map_err(err)?,
            ))
        }
        Scheme::File => {
            std::fs::create_dir_all(&url.container).map_err(|e| UrlError::Build {
                url: url.display(),
                detail: e.to_string(),
            })?;
            Ok(Arc::new(
                object_store::local::LocalFileSystem::new_with_prefix(&url.container)
                    .map_err(err)?,
            ))
        }
        Scheme::Gcs => Ok(Arc::new(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&url.container)
                .build()
                .map_err(err)?,
        )),
        Scheme::Azure => Ok(Arc::new(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_container_name(&url.container)
                .build()
                .map_err(err)?,
        )),
        Scheme::Memory => Ok(Arc::new(object_store::memory::InMemory::new())),
    }
}

/// [`build_object_store`] and a [`Remote`] on it.
#[cfg(feature = "remote")]
pub fn connect(url: &str, access: &S3Access) -> Result<Remote, UrlError> {
    let u = PoolUrl::parse(url)?;
    let store = build_object_store(&u, access)?;
    Remote::new(store, &u.prefix, u.display()).map_err(|e| UrlError::Build {
        url: u.display(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = PoolUrl::parse("s3://vms/pool1").unwrap();
        assert_eq!(
            (u.scheme, &*u.container, &*u.prefix),
            (Scheme::S3, "vms", "pool1")
        );
        assert_eq!(PoolUrl::parse("s3://vms").unwrap().prefix, "");
        assert!(PoolUrl::parse("s3:///x").is_err());
        assert!(PoolUrl::parse("file://relative").is_err());
        assert!(PoolUrl::parse("ftp://x").is_err());
        let g = PoolUrl::parse("gs://b/p/q").unwrap();
        assert_eq!(
            (g.scheme, &*g.container, &*g.prefix),
            (Scheme::Gcs, "b", "p/q")
        );
        assert_eq!(PoolUrl::parse("az://c").unwrap().scheme, Scheme::Azure);
        assert_eq!(
            PoolUrl::parse("file:///tmp/x/").unwrap().container,
            "/tmp/x"
        );
    }

    #[test]
    fn credentials_are_not_printed() {
        let a = S3Access {
            access_key_id: Some("AKIDSECRET".into()),
            secret_access_key: Some("verysecret".into()),
            ..Default::default()
        };
        let s = format!("{a:?}");
        assert!(!s.contains("SECRET") && !s.contains("verysecret"), "{s}");
    }
}
