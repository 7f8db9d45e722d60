//! [`FaultyStore`]: wraps an object store and injects failures, for tests.
//!
//! Fakes are for fault injection only: the bytes still go to and come from
//! the real store underneath. Every knob is an atomic, so a test flips them
//! while a workload runs:
//!
//! - `down`: every call fails at once, as with a refused connection;
//! - `down_at_call`: from the n-th call on (counting every call since the
//!   store was made), `down` is set: the bucket as a host that crashed
//!   after n - 1 calls left it;
//! - `fail_one_in`: every n-th call fails as a 503 would;
//! - `delay_ms`: every call waits first (a slow store; past the attempt
//!   timeout it is a timeout);
//! - `short_read_one_in`: every n-th GET answers with half the bytes;
//! - `ignore_create_only`: `If-None-Match: *` is ignored (a store whose
//!   conditional create cannot fence).

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

#[derive(Default, Debug)]
pub struct Faults {
    pub down: AtomicBool,
    /// 0: off.
    pub down_at_call: AtomicU64,
    pub fail_one_in: AtomicU64,
    pub delay_ms: AtomicU64,
    pub short_read_one_in: AtomicU64,
    /// Treat create-only PUTs as plain PUTs, as Garage 2.5 does.
    pub ignore_create_only: AtomicBool,
    /// Calls seen, and failures injected.
    pub calls: AtomicU64,
    pub injected: AtomicU64,
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    pub faults: Arc<Faults>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> (Arc<FaultyStore>, Arc<Faults>) {
        let faults = Arc::new(Faults::default());
        (
            Arc::new(FaultyStore {
                inner,
                faults: faults.clone(),
            }),
            faults,
        )
    }

    async fn gate(&self, op: &str) -> object_store::Result<u64> {
        let n = self.faults.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let delay = self.faults.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let at = self.faults.down_at_call.load(Ordering::SeqCst);
        if at > 0 && n >= at {
            self.faults.down.store(true, Ordering::SeqCst);
        }
        let every = self.faults.fail_one_in.load(Ordering::SeqCst);
        if self.faults.down.load(Ordering::SeqCst) || (every > 0 && n.is_multiple_of(every)) {
            self.faults.injected.fetch_add(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic {
                store: "faulty",
                source: format!("injected failure of {op}: 503 Service Unavailable").into(),
            });
        }
        Ok(n)
    }
}

impl std::fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.gate("PUT").await?;
        if self.faults.ignore_create_only.load(Ordering::SeqCst) {
            opts.mode = object_store::PutMode::Overwrite;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.gate("multipart PUT").await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let n = self.gate("GET").await?;
        let r = self.inner.get_opts(location, options).await?;
        let every = self.faults.short_read_one_in.load(Ordering::SeqCst);
        if every == 0 || !n.is_multiple_of(every) {
            return Ok(r);
        }
        self.faults.injected.fetch_add(1, Ordering::SeqCst);
        let GetResult {
            meta,
            range,
            attributes,
            extensions,
            payload,
        } = r;
        let whole = GetResult {
            payload,
            meta: meta.clone(),
            range: range.clone(),
            attributes: attributes.clone(),
            extensions: extensions.clone(),
        }
        .bytes()
        .await?;
        let half: Bytes = whole.slice(..whole.len() / 2);
        Ok(GetResult {
            payload: GetResultPayload::Stream(
                futures::stream::once(async move { Ok(half) }).boxed(),
            ),
            meta,
            range,
            attributes,
            extensions,
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        if self.faults.down.load(Ordering::SeqCst) {
            return futures::stream::once(async {
                Err(object_store::Error::Generic {
                    store: "faulty",
                    source: "injected failure of DELETE".into(),
                })
            })
            .boxed();
        }
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        if self.faults.down.load(Ordering::SeqCst) {
            return futures::stream::once(async {
                Err(object_store::Error::Generic {
                    store: "faulty",
                    source: "injected failure of LIST".into(),
                })
            })
            .boxed();
        }
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.gate("LIST").await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.gate("COPY").await?;
        self.inner.copy_opts(from, to, options).await
    }
}
