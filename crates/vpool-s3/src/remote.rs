//! The object store as the rest of the crate sees it: blocking calls with a
//! deadline and retries, on a private tokio runtime.
//!
//! Everything else in vpool is threads and blocking I/O, so this module is
//! the one place that touches async. Each call is spawned on the runtime
//! and waited for on a std channel, which is safe from any thread, even a
//! worker of another runtime (the HTTP API's), where `block_on` would panic.
//!
//! Retries: transient failures (5xx, timeouts, refused connections, short
//! bodies) are retried with exponential backoff until the call's deadline;
//! "not found" and "already exists" are answers, not failures, and return
//! at once. `object_store`'s own retry loop is cut down to a couple of quick
//! attempts so that our deadline, not its three-minute default, bounds a call.

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest attempt a call with a deadline makes, even when the
/// deadline is closer: one round trip.
const MIN_ATTEMPT: Duration = Duration::from_millis(100);

/// What a remote call can end with, besides success.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{key} not found in the object store")]
    NotFound { key: String },
    #[error("{key} already exists in the object store")]
    AlreadyExists { key: String },
    /// Kept failing until the deadline; `last` is the last failure.
    #[error("{op} {key}: gave up after {attempts} attempts in {elapsed_ms} ms: {last}")]
    GaveUp {
        op: &'static str,
        key: String,
        attempts: u32,
        elapsed_ms: u64,
        last: String,
    },
    /// A failure that retrying will not fix (bad credentials, a bad request).
    #[error("{op} {key}: {detail}")]
    Permanent {
        op: &'static str,
        key: String,
        detail: String,
    },
}

/// Counters of remote traffic, for `vpool cache stats` and the benchmarks.
#[derive(Default, Debug)]
pub struct RemoteCounters {
    pub gets: AtomicU64,
    pub get_bytes: AtomicU64,
    pub puts: AtomicU64,
    pub put_bytes: AtomicU64,
    pub deletes: AtomicU64,
    pub lists: AtomicU64,
    /// Failed attempts (each retry counts).
    pub errors: AtomicU64,
}

/// Timeouts and backoff of remote calls.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// One attempt of a small request (GET of a range, a manifest PUT).
    pub attempt_timeout: Duration,
    /// One attempt of a whole-segment PUT.
    pub upload_attempt_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            attempt_timeout: Duration::from_secs(10),
            upload_attempt_timeout: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

/// One pool's view of an object store: keys are relative to `prefix`.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    /// Always `Some` until drop, which shuts it down without blocking: the
    /// last handle may go away on an async thread, where a blocking
    /// runtime drop panics.
    /// Shared with the [`Remote::child`]ren of this remote.
    rt: Option<Arc<tokio::runtime::Runtime>>,
    pub policy: RetryPolicy,
    pub counters: RemoteCounters,
    /// For messages: `s3://bucket/prefix`, never credentials.
    display: String,
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take().and_then(|rt| Arc::try_unwrap(rt).ok()) {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.display)
    }
}

enum Verdict {
    Answer(RemoteError),
    Retry(String),
}

fn classify(op: &'static str, key: &str, e: object_store::Error) -> Verdict {
    use object_store::Error as E;
    match e {
        E::NotFound { .. } => Verdict::Answer(RemoteError::NotFound {
            key: key.to_string(),
        }),
        E::AlreadyExists { .. } | E::Precondition { .. } => {
            Verdict::Answer(RemoteError::AlreadyExists {
                key: key.to_string(),
            })
        }
        E::NotImplemented { .. } | E::NotSupported { .. } | E::InvalidPath { .. } => {
            Verdict::Answer(RemoteError::Permanent {
                op,
                key: key.to_string(),
                detail: e.to_string(),
            })
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            Verdict::Answer(RemoteError::Permanent {
                op,
                key: key.to_string(),
                detail: e.to_string(),
            })
        }
        other => Verdict::Retry(other.to_string()),
    }
}

/// A body shorter than asked for is a failure to retry, not data.
fn whole(b: Bytes, want: u64) -> Result<Bytes, object_store::Error> {
    if b.len() as u64 != want {
        return Err(object_store::Error::Generic {
            store: "vpool",
            source: format!("short read: {} of {want} bytes", b.len()).into(),
        });
    }
    Ok(b)
}

impl Remote {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        display: String,
    ) -> std::io::Result<Remote> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("vpool-s3-io")
            .enable_all()
            .build()?;
        Ok(Remote {
            store,
            prefix: prefix.trim_matches('/').to_string(),
            rt: Some(Arc::new(rt)),
            policy: RetryPolicy::default(),
            counters: RemoteCounters::default(),
            display,
        })
    }

    /// The same object store under `<prefix>/<sub>`, on this remote's
    /// runtime (a shared pool reads its volumes' families this way),
    /// with counters of its own.
    pub fn child(&self, sub: &str) -> Remote {
        let sub = sub.trim_matches('/');
        let join = |a: &str| match a.is_empty() {
            true => sub.to_string(),
            false => format!("{a}/{sub}"),
        };
        Remote {
            store: Arc::clone(&self.store),
            prefix: join(&self.prefix),
            rt: self.rt.clone(),
            policy: self.policy.clone(),
            counters: RemoteCounters::default(),
            display: format!("{}/{sub}", self.display.trim_end_matches('/')),
        }
    }

    pub fn display(&self) -> &str {
        &self.display
    }

    pub fn path(&self, key: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(key)
        } else {
            Path::from(format!("{}/{key}", self.prefix))
        }
    }

    /// Runs a future on the private runtime and waits for it, from any thread.
    pub fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let rt = self.rt.as_ref().expect("the runtime lives until drop");
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("the remote runtime dropped a task")
    }

    /// Retries `attempt` until it succeeds, gives a definite answer, or the
    /// deadline passes. `give_up` is polled between attempts (shutdown).
    fn retry<T: Send + 'static, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        per_attempt: Duration,
        deadline: Option<Instant>,
        give_up: &dyn Fn() -> bool,
        attempt: F,
    ) -> Result<T, RemoteError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, object_store::Error>> + Send + 'static,
    {
        let started = Instant::now();
        let mut backoff = self.policy.backoff_initial;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let fut = attempt();
            // No attempt outlives the deadline.
            let per_attempt = match deadline {
                Some(d) => per_attempt
                    .min(d.saturating_duration_since(Instant::now()))
                    .max(MIN_ATTEMPT),
                None => per_attempt,
            };
            let result = self.block(async move { tokio::time::timeout(per_attempt, fut).await });
            let last = match result {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => match classify(op, key, e) {
                    Verdict::Answer(a) => return Err(a),
                    Verdict::Retry(msg) => msg,
                },
                Err(_) => format!("no answer within {} ms", per_attempt.as_millis()),
            };
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let out_of_time = deadline.is_some_and(|d| now + backoff >= d);
            if out_of_time || give_up() {
                tracing::warn!(op, key, attempts, error = %last, store = %self.display, "object store call failed; giving up");
                return Err(RemoteError::GaveUp {
                    op,
                    key: key.to_string(),
                    attempts,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    last,
                });
            }
            if attempts == 1 || attempts.is_power_of_two() {
                tracing::warn!(op, key, attempts, error = %last, store = %self.display, "object store call failed; retrying");
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(self.policy.backoff_max);
        }
    }

    /// Range GET of exactly `range`. A short answer is retried.
    pub fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        deadline: Instant,
    ) -> Result<Bytes, RemoteError> {
        let path = self.path(key);
        let store = self.store.clone();
        let want = range.end - range.start;
        let bytes = self.retry(
            "GET",
            key,
            self.policy.attempt_timeout,
            Some(deadline),
            &|| false,
            || {
                let (store, path, range) = (store.clone(), path.clone(), range.clone());
                async move {
                    let b = store.get_range(&path, range).await?;
                    whole(b, want)
                }
            },
        )?;
        self.counters.gets.fetch_add(1, Ordering::Relaxed);
        self.counters
            .get_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(bytes)
    }

    /// GET of a whole (small) object; `None` if it does not exist.
    pub fn get(&self, key: &str, deadline: Instant) -> Result<Option<Bytes>, RemoteError> {
        let path = self.path(key);
        let store = self.store.clone();
        let r = self.retry(
            "GET",
            key,
            self.policy.upload_attempt_timeout,
            Some(deadline),
            &|| false,
            || {
                let (store, path) = (store.clone(), path.clone());
                async move {
                    let r = store.get(&path).await?;
                    let want = r.meta.size;
                    let b = r.bytes().await?;
                    whole(b, want)
                }
            },
        );
        match r {
            Ok(b) => {
                self.counters.gets.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .get_bytes
                    .fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Some(b))
            }
            Err(RemoteError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// PUT, replacing any object at `key`. With no deadline it retries until
    /// `give_up()` says stop: uploads wait out an outage.
    pub fn put(
        &self,
        key: &str,
        data: Bytes,
        deadline: Option<Instant>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), RemoteError> {
        self.put_mode(key, data, PutMode::Overwrite, deadline, give_up)
    }

    /// PUT with `If-None-Match: *`: fails with [`RemoteError::AlreadyExists`]
    /// if anything is at `key`. This is the commit and fencing primitive.
    pub fn put_create(
        &self,
        key: &str,
        data: Bytes,
        deadline: Option<Instant>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), RemoteError> {
        self.put_mode(key, data, PutMode::Create, deadline, give_up)
    }

    fn put_mode(
        &self,
        key: &str,
        data: Bytes,
        mode: PutMode,
        deadline: Option<Instant>,
        give_up: &dyn Fn() -> bool,
    ) -> Result<(), RemoteError> {
        let path = self.path(key);
        let store = self.store.clone();
        let len = data.len() as u64;
        let per_attempt = if len > 1 << 20 {
            self.policy.upload_attempt_timeout
        } else {
            self.policy.attempt_timeout
        };
        self.retry("PUT", key, per_attempt, deadline, give_up, || {
            let (store, path, data, mode) =
                (store.clone(), path.clone(), data.clone(), mode.clone());
            async move {
                let opts = PutOptions {
                    mode,
                    ..Default::default()
                };
                store
                    .put_opts(&path, PutPayload::from_bytes(data), opts)
                    .await
                    .map(|_| ())
            }
        })?;
        self.counters.puts.fetch_add(1, Ordering::Relaxed);
        self.counters.put_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Keys (relative to the pool prefix) and sizes of every object under
    /// `dir/`.
    pub fn list(&self, dir: &str, deadline: Instant) -> Result<Vec<(String, u64)>, RemoteError> {
        let path = self.path(dir);
        let store = self.store.clone();
        let strip = format!("{}/", self.path("").as_ref().trim_end_matches('/'));
        let strip = if strip == "/" { String::new() } else { strip };
        let out = self.retry(
            "LIST",
            dir,
            self.policy.attempt_timeout,
            Some(deadline),
            &|| false,
            || {
                let (store, path) = (store.clone(), path.clone());
                async move {
                    let metas: Vec<object_store::ObjectMeta> =
                        store.list(Some(&path)).try_collect().await?;
                    Ok(metas)
                }
            },
        )?;
        self.counters.lists.fetch_add(1, Ordering::Relaxed);
        Ok(out
            .into_iter()
            .map(|m| {
                let full = m.location.to_string();
                let rel = full.strip_prefix(&strip).unwrap_or(&full).to_string();
                (rel, m.size)
            })
            .collect())
    }

    /// DELETE; deleting a missing object is not an error.
    pub fn delete(&self, key: &str, deadline: Instant) -> Result<(), RemoteError> {
        let path = self.path(key);
        let store = self.store.clone();
        let r = self.retry(
            "DELETE",
            key,
            self.policy.attempt_timeout,
            Some(deadline),
            &|| false,
            || {
                let (store, path) = (store.clone(), path.clone());
                async move { store.delete(&path).await }
            },
        );
        self.counters.deletes.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) | Err(RemoteError::NotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
