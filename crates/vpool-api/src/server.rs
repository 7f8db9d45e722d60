//! The API server: axum routes over a [`Host`] (every pool this daemon
//! holds; `/v1/pools/{pool}/...` addresses one, the bare routes the
//! default pool). Handlers only parse and answer: the rules are the
//! service layer's ([`Host`], `PoolService`, `SharedCtx`).
//!
//! Service calls are synchronous and may wait on fsync or the object
//! store, so every handler runs them on tokio's blocking pool
//! ([`blocking`]); a panic there becomes a 500, never a dead server.
//!
//! Request bodies and query strings go through the `Api*` extractors below,
//! which turn every rejection (bad JSON, missing fields, a number that does
//! not fit in a `u64`, an over-limit body) into the JSON error body instead of
//! axum's plain-text one.
//!
//! Two ways in: [`serve_unix`] trusts whoever can open the socket (its file
//! mode guards it); [`serve_tcp`] requires `Authorization: Bearer <token>` on
//! every request. Both run under the state's [`ApiLimits`] (see
//! [`crate::limits`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{
    DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path, Query, RawPathParams,
    Request, State,
};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, UnixListener};
use vpool_engine::{EngineError, Pool, STATE_HOLE, STATE_ZERO};

use vpool_service::{Catalog, Host, PoolCtx, PoolService};

use crate::cache::CacheControl;
use crate::error::{ApiError, ErrorKind};
use crate::limits::{ApiLimits, Who, serve_limited};
use crate::routes;
use crate::types::{
    AddPoolRequest, Allocation, AllocationExtent, CacheInfo, CheckQuery, CheckResult, CleanResult,
    CloneRequest, CopyRequest, CreateSnapshotRequest, CreateVolumeRequest, Diff, DiffExtent,
    DiffQuery, FlattenReport, ForceQuery, IoList, JobInfo, JobList, MoveRequest, PinList,
    PinRequest, PoolInfo, PoolList, PoolStatus, QosLimits, RangeQuery, ReplicaList, ReplicaRequest,
    ReplicaStatus, ResizeVolumeRequest, RollbackQuery, ScheduleList, ScheduleRequest, SnapshotInfo,
    SnapshotList, VolumeInfo, VolumeList, WriteQuery, ZeroQuery,
};
use crate::{
    MAX_ALLOCATION_EXTENTS, MAX_ALLOCATION_SPAN_BYTES, MAX_DATA_BYTES, MAX_DIFF_EXTENTS,
    MAX_JSON_BODY_BYTES,
};

/// Shortest bearer token [`AuthToken::new`] accepts: 16 characters of a
/// random token are enough that guessing over the network is hopeless.
pub const MIN_TOKEN_LEN: usize = 16;

/// Longest bearer token accepted; a header line has to fit in a request.
pub const MAX_TOKEN_LEN: usize = 1024;

/// What the handlers share: the [`Host`] (the pools the daemon holds, each
/// with its service, catalog and cache), where the daemon serves NBD on TCP
/// (reported by the pool info), and the limits.
#[derive(Clone)]
pub struct ApiState {
    host: Arc<Host>,
    nbd_tcp_addr: Option<std::net::SocketAddr>,
    limits: ApiLimits,
}

impl ApiState {
    /// State over one pool, `local`, with an in-memory catalog (templates
    /// are not persisted; see [`ApiState::with_catalog`]).
    pub fn new(pool: Pool) -> ApiState {
        let host = Host::single("local", pool, Arc::new(Catalog::in_memory()), None);
        ApiState::for_host(Arc::new(host))
    }

    /// State over the pools of `host`.
    pub fn for_host(host: Arc<Host>) -> ApiState {
        ApiState {
            host,
            nbd_tcp_addr: None,
            limits: ApiLimits::default(),
        }
    }

    /// Serves under `limits` instead of [`ApiLimits::default`].
    pub fn with_limits(mut self, limits: ApiLimits) -> ApiState {
        self.limits = limits;
        self
    }

    pub fn limits(&self) -> &ApiLimits {
        &self.limits
    }

    /// For a one-pool state ([`ApiState::new`]): serves the cache routes
    /// from `cache` (without one, they answer `not_supported`).
    pub fn with_cache(self, cache: Option<Arc<dyn CacheControl>>) -> ApiState {
        let ctx = self.default_ctx();
        let catalog = Arc::clone(ctx.service.catalog());
        self.rebuilt(ctx.service.pool().clone(), catalog, cache)
    }

    /// For a one-pool state ([`ApiState::new`]): uses `catalog`, shared
    /// with the NBD exports.
    pub fn with_catalog(self, catalog: Arc<Catalog>) -> ApiState {
        let ctx = self.default_ctx();
        self.rebuilt(ctx.service.pool().clone(), catalog, ctx.cache.clone())
    }

    fn rebuilt(
        mut self,
        pool: Pool,
        catalog: Arc<Catalog>,
        cache: Option<Arc<dyn CacheControl>>,
    ) -> ApiState {
        let name = self.host.default_name().to_string();
        self.host = Arc::new(Host::single(&name, pool, catalog, cache));
        self
    }

    fn default_ctx(&self) -> Arc<PoolCtx> {
        self.host
            .pool(None)
            .expect("a one-pool state's pool is open")
    }

    /// The default pool's catalog.
    pub fn catalog(&self) -> Arc<Catalog> {
        Arc::clone(self.default_ctx().service.catalog())
    }

    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// Reports `addr` as the daemon's NBD TCP listener in the pool info.
    pub fn with_nbd_tcp_addr(mut self, addr: Option<std::net::SocketAddr>) -> ApiState {
        self.nbd_tcp_addr = addr;
        self
    }

    /// The default pool's engine.
    pub fn pool(&self) -> Pool {
        self.default_ctx().service.pool().clone()
    }
}

/// The `{pool}` capture of a host route (`detach`, `open`), whether that
/// pool is open or not.
struct PoolName(String);

impl FromRequestParts<ApiState> for PoolName {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let Named { pool, .. } = Named::from_request_parts(parts, state).await?;
        pool.map(PoolName)
            .ok_or_else(|| ApiError::internal("a host route without a {pool} capture"))
    }
}

/// A route's path captures (`{pool}`, `{name}`, ...), decoded.
struct Captures(RawPathParams);

impl Captures {
    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, ApiError> {
        let params = RawPathParams::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::from_rejection(r.status(), "path", r.body_text()))?;
        // A reserved name (a volume in the trash) is no route's volume.
        if let Some((_, v)) = (params.iter())
            .find(|(k, v)| matches!(*k, "name" | "image") && vpool_service::catalog::is_reserved(v))
        {
            return Err(vpool_service::Error::new(
                vpool_service::ErrorKind::NotFound,
                format!("no volume named {v:?} (names starting with '.' are reserved)"),
            )
            .into());
        }
        Ok(Captures(params))
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.to_string())
    }
}

/// What a request addresses: the open pool its `{pool}` capture names (the
/// default pool on routes without one), and its other captures (empty
/// where the route has none).
struct At {
    ctx: Arc<PoolCtx>,
    name: String,
    snap: String,
    image: String,
    /// The volume is a clone of a shared pool's template: its engine
    /// volume holds only what it wrote (`vpool_service::layered`).
    layered: bool,
}

impl At {
    /// Refuses `what` (a data route) on a clone of a shared pool's
    /// template: the engine volume behind the API has only the clone's own
    /// blocks; NBD serves the whole image.
    fn refuse_layered(&self, what: &str) -> Result<(), ApiError> {
        if !self.layered {
            return Ok(());
        }
        Err(vpool_service::Error::new(
            vpool_service::ErrorKind::NotSupported,
            format!(
                "{what} of {} is not built: it is a clone of a template of a shared pool, whose blocks it never wrote are the template's; NBD serves it whole",
                self.name
            ),
        )
        .into())
    }
}

impl FromRequestParts<ApiState> for At {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let captures = Captures::from_request_parts(parts, state).await?;
        let pool = captures.get("pool");
        // A volume route of a shared pool addresses the volume's family.
        let ctx = match captures.get("name") {
            Some(volume) => state.host.volume_pool(pool.as_deref(), &volume)?,
            None => state.host.pool(pool.as_deref())?,
        };
        let name = captures.get("name").unwrap_or_default();
        Ok(At {
            ctx,
            layered: state.host.is_shared_clone(pool.as_deref(), &name),
            name,
            snap: captures.get("snap").unwrap_or_default(),
            image: captures.get("image").unwrap_or_default(),
        })
    }
}

/// A route's `{pool}` (`None`: the default pool) and `{name}` captures,
/// for the routes that handle a shared pool themselves.
struct Named {
    pool: Option<String>,
    name: String,
}

impl FromRequestParts<ApiState> for Named {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let captures = Captures::from_request_parts(parts, state).await?;
        Ok(Named {
            pool: captures.get("pool"),
            name: captures.get("name").unwrap_or_default(),
        })
    }
}

/// Why a server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("API server I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid API token: {0}")]
    BadToken(String),
    #[error("invalid API limits: {0}")]
    BadLimits(String),
}

/// A bearer token for the TCP listener, checked in constant time.
#[derive(Clone)]
pub struct AuthToken(Arc<str>);

impl std::fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret, even in debug logs.
        f.write_str("AuthToken(..)")
    }
}

impl AuthToken {
    /// Accepts `MIN_TOKEN_LEN..=MAX_TOKEN_LEN` visible ASCII characters (what
    /// can travel in a header unchanged). Surrounding whitespace, such as the
    /// newline at the end of a token file, is ignored.
    pub fn new(token: &str) -> Result<AuthToken, ServeError> {
        let t = token.trim();
        if t.len() < MIN_TOKEN_LEN {
            return Err(ServeError::BadToken(format!(
                "the token has {} characters; use at least {MIN_TOKEN_LEN}",
                t.len()
            )));
        }
        if t.len() > MAX_TOKEN_LEN {
            return Err(ServeError::BadToken(format!(
                "the token has {} characters; the limit is {MAX_TOKEN_LEN}",
                t.len()
            )));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ServeError::BadToken(
                "the token must be printable ASCII without spaces".into(),
            ));
        }
        Ok(AuthToken(t.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Compares in time that depends only on the lengths, not on where the
    /// first difference is, so response timing does not leak the token
    /// byte by byte.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate)
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    // Walk the longer length so a short guess costs as much as a long one.
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    // Keep the compiler from turning the loop into an early-exit compare.
    std::hint::black_box(diff) == 0
}

/// The routes of one pool: each pattern of [`routes::ALL`] with its
/// handlers, to be mounted as it is (the default pool) and
/// [`routes::scoped`] (any pool).
fn pool_routes() -> Vec<(&'static str, MethodRouter<ApiState>)> {
    vec![
        (routes::POOL, get(pool_info)),
        (routes::POOL_CLEAN, post(pool_clean)),
        (routes::POOL_CHECKPOINT, post(pool_checkpoint)),
        (routes::POOL_CHECK, post(pool_check)),
        (routes::FLUSH, post(flush)),
        (routes::VOLUMES, get(list_volumes).post(create_volume)),
        (
            routes::VOLUME,
            get(volume_info).patch(resize_volume).delete(delete_volume),
        ),
        (routes::VOLUME_ZERO, post(zero_range)),
        (routes::VOLUME_IMPORT, post(begin_import).delete(end_import)),
        (routes::VOLUME_ALLOCATION, get(allocation)),
        (
            routes::VOLUME_SNAPSHOTS,
            get(list_snapshots).post(create_snapshot),
        ),
        (routes::SNAPSHOT, get(snapshot_info).delete(delete_snapshot)),
        (routes::SNAPSHOT_ROLLBACK, post(rollback)),
        (routes::VOLUME_TEMPLATE, post(make_template)),
        (routes::VOLUME_CLONE, post(clone_volume)),
        (routes::VOLUME_FLATTEN, post(flatten)),
        (routes::VOLUME_COPY, post(copy_volume)),
        (routes::VOLUME_MOVE, post(move_volume)),
        (
            routes::VOLUME_REPLICA,
            get(replica_status).post(add_replica).delete(remove_replica),
        ),
        (routes::VOLUME_REPLICA_RUN, post(run_replica)),
        (routes::VOLUME_REPLICA_VERIFY, post(verify_replica)),
        (routes::VOLUME_PROMOTE, post(promote)),
        (routes::VOLUME_QOS, put(set_qos)),
        (routes::VOLUME_MULTI_WRITER, put(set_multi_writer)),
        (routes::VOLUME_RENAME, post(rename_volume)),
        (routes::VOLUME_TRASH, post(trash_volume)),
        (routes::TRASH, get(trash_list)),
        (routes::TRASH_PURGE, post(trash_purge)),
        (routes::TRASH_ENTRY, delete(trash_remove)),
        (routes::TRASH_RESTORE, post(trash_restore)),
        (routes::VOLUME_COMMIT, post(commit)),
        (routes::VOLUME_DIFF, get(diff)),
        (routes::VOLUME_OWNER, get(volume_owner)),
        (routes::VOLUME_TAKEOVER, post(volume_takeover)),
        (routes::VOLUME_RELEASE, post(volume_release)),
        (routes::CACHE, get(cache_stats)),
        (routes::CACHE_PINS, get(list_pins).post(add_pin)),
        (routes::CACHE_PIN, delete(remove_pin)),
    ]
}

/// The API's routes over `state`, without authentication.
pub fn router(state: ApiState) -> Router {
    let data_get = get(read_data).put(write_data);
    let data = Router::new()
        .route(routes::VOLUME_DATA, data_get.clone())
        .route(&routes::scoped(routes::VOLUME_DATA), data_get)
        .layer(DefaultBodyLimit::max(MAX_DATA_BYTES));
    let mut r = Router::new()
        .route(routes::POOLS, get(list_pools).post(add_pool))
        .route(routes::POOL_DETACH, post(detach_pool))
        .route(routes::POOL_OPEN, post(open_pool))
        .route(routes::JOBS, get(list_jobs))
        .route(routes::JOB, get(job_info))
        .route(routes::JOB_CANCEL, post(cancel_job))
        .route(routes::METRICS, get(metrics))
        .route(routes::IO, get(io_counters))
        .route(routes::REPLICAS, get(list_replicas))
        .route(routes::SCHEDULES, get(list_schedules).post(add_schedule))
        .route(routes::SCHEDULE, delete(remove_schedule));
    for (pattern, handlers) in pool_routes() {
        r = r
            .route(pattern, handlers.clone())
            .route(&routes::scoped(pattern), handlers);
    }
    r.layer(DefaultBodyLimit::max(MAX_JSON_BODY_BYTES))
        .merge(data)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn(log_request))
        .with_state(state)
}

/// Serves the API on a Unix socket until `shutdown` completes, then stops
/// accepting and returns once the requests in flight are answered.
pub async fn serve_unix(
    listener: UnixListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let limits = state.limits.clone();
    limits.validate()?;
    serve_limited(listener, router(state), &limits, shutdown, "unix").await;
    Ok(())
}

/// Like [`serve_unix`] on TCP, where every request must carry
/// `Authorization: Bearer <token>`.
pub async fn serve_tcp(
    listener: TcpListener,
    state: ApiState,
    token: AuthToken,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let limits = state.limits.clone();
    limits.validate()?;
    let app = router(state).layer(middleware::from_fn_with_state(token, require_token));
    serve_limited(listener, app, &limits, shutdown, "tcp").await;
    Ok(())
}

async fn require_token(State(token): State<AuthToken>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(t) if token.matches(t) => next.run(req).await,
        Some(_) => ApiError::new(ErrorKind::Unauthorized, "wrong bearer token").into_response(),
        None => ApiError::new(
            ErrorKind::Unauthorized,
            "this listener needs an `Authorization: Bearer <token>` header",
        )
        .into_response(),
    }
}

/// Logs every request at DEBUG, and every management action (a request
/// that changes something, but not the data plane's reads, writes and
/// zeroes, which an import sends by the thousand) at INFO: who, what, and
/// the result.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let who = req.extensions().get::<Who>().cloned();
    // By route, not by path: a volume may be named `data`.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let started = Instant::now();
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let us = started.elapsed().as_micros() as u64;
    let data_plane = route.is_some_and(|r| {
        [routes::VOLUME_DATA, routes::VOLUME_ZERO]
            .iter()
            .any(|d| r == *d || r == routes::scoped(d))
    });
    if matches!(method, Method::GET | Method::HEAD) || data_plane {
        tracing::debug!(%method, path, status, us, "api request");
    } else {
        let who = who.as_ref().map_or("in-process", |w| &w.0);
        let result = if resp.status().is_success() {
            "done"
        } else {
            "refused"
        };
        tracing::info!(who, %method, path, status, us, "api action {result}");
    }
    resp
}

async fn no_route(req: Request) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no API route {} {}", req.method(), req.uri().path()),
    )
}

async fn wrong_method(req: Request) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

// ----- extractors that answer with the JSON error body -----

/// A JSON body. Content-Type is not checked: the route fixes the format, and
/// `curl -d` sends form encoding by default.
struct ApiJson<T>(T);

impl<T: DeserializeOwned> FromRequest<ApiState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        let limit = state.limits.body_read_timeout;
        let bytes = read_body_by(limit, Bytes::from_request(req, state))
            .await?
            .map_err(|r| ApiError::from_rejection(r.status(), "request body", r.body_text()))?;
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            ApiError::invalid(format!(
                "request body is not valid JSON for this route: {e}"
            ))
        })
    }
}

/// A raw body, within the route's [`DefaultBodyLimit`].
struct ApiBytes(Bytes);

impl FromRequest<ApiState> for ApiBytes {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &ApiState) -> Result<Self, Self::Rejection> {
        let limit = state.limits.body_read_timeout;
        read_body_by(limit, Bytes::from_request(req, state))
            .await?
            .map(ApiBytes)
            .map_err(|r| {
                let text = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    format!(
                        "a data request carries at most {MAX_DATA_BYTES} bytes; split the transfer"
                    )
                } else {
                    r.body_text()
                };
                ApiError::from_rejection(r.status(), "request body", text)
            })
    }
}

/// Runs `read` (the reading of a request body) within `limit`
/// ([`ApiLimits::body_read_timeout`]). A body that does not arrive in time
/// fails the request; the rest of it is never read, so hyper closes the
/// connection after the response.
async fn read_body_by<R>(limit: Duration, read: impl Future<Output = R>) -> Result<R, ApiError> {
    static TIMEOUTS: crate::ratelog::RateLimitedLog =
        crate::ratelog::RateLimitedLog::new(crate::ratelog::LOG_PERIOD);
    tokio::time::timeout(limit, read).await.map_err(|_| {
        if let Some(suppressed) = TIMEOUTS.check() {
            tracing::warn!(
                limit_s = limit.as_secs_f64(),
                suppressed,
                "API limit: a request body did not arrive in time; failing the request"
            );
        }
        ApiError::new(
            ErrorKind::Timeout,
            format!(
                "the request body did not arrive within {} s",
                limit.as_secs_f64()
            ),
        )
    })
}

struct ApiQuery<T>(T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|r| ApiError::from_rejection(r.status(), "query string", r.body_text()))
    }
}

/// `offset + length`, or `invalid` if it does not fit in a `u64`. Checked
/// here because the engine computes range ends before it range-checks.
fn range_end(offset: u64, length: u64) -> Result<u64, ApiError> {
    offset.checked_add(length).ok_or_else(|| {
        ApiError::invalid(format!(
            "offset {offset} + length {length} overflows a 64-bit byte address"
        ))
    })
}

// ----- host routes: the pools -----

fn pool_status(host: &Host, slot: vpool_service::PoolSlot) -> PoolStatus {
    let default = slot.name == host.default_name();
    let mut out = PoolStatus {
        name: slot.name,
        dir: slot.dir.display().to_string(),
        default,
        kind: None,
        state: "open".into(),
        reason: None,
        volumes: None,
        logical_bytes: None,
        physical_bytes: None,
        free_bytes: None,
    };
    let (state, reason) = slot.state.describe();
    out.state = state.into();
    out.reason = reason;
    match slot.state {
        vpool_service::PoolState::Open(ctx) => {
            let stats = ctx.service.stats();
            out.kind = Some(ctx.kind);
            out.volumes = Some(stats.volumes);
            out.logical_bytes = Some(stats.logical_bytes);
            out.physical_bytes = Some(stats.physical_bytes);
            out.free_bytes = stats.free_bytes;
        }
        vpool_service::PoolState::Shared(sh) => {
            // Figures of the volumes this host owns (the pool's other
            // volumes are other hosts' business).
            out.kind = Some(vpool_service::PoolKind::Shared);
            let owned = sh.owned();
            out.volumes = Some(owned.len() as u64);
            let stats: Vec<_> = owned.iter().map(|f| f.service.stats()).collect();
            out.logical_bytes = Some(stats.iter().map(|s| s.logical_bytes).sum());
            out.physical_bytes = Some(stats.iter().map(|s| s.physical_bytes).sum());
        }
        _ => {}
    }
    out
}

async fn list_pools(State(s): State<ApiState>) -> Result<Json<PoolList>, ApiError> {
    let host = Arc::clone(&s.host);
    let pools = service(move || {
        Ok(host
            .pools()
            .into_iter()
            .map(|slot| pool_status(&host, slot))
            .collect())
    })
    .await?;
    Ok(Json(PoolList { pools }))
}

/// `POST /v1/pools`: a new local pool, an existing pool directory taken
/// over, or a pool on S3 (created, or attached from another host).
async fn add_pool(
    State(s): State<ApiState>,
    ApiJson(req): ApiJson<AddPoolRequest>,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let status = service(move || {
        let dir = match &req.dir {
            Some(d) => std::path::PathBuf::from(d),
            None => host.default_dir(&req.name),
        };
        match &req.s3 {
            Some(spec) => {
                host.add_s3_pool(&req.name, &dir, spec, req.attach, req.unsafe_single_host)?
            }
            None => host.add_pool(&req.name, &dir)?,
        };
        let slot = host
            .pools()
            .into_iter()
            .find(|p| p.name == req.name)
            .ok_or_else(|| {
                vpool_service::Error::new(
                    ErrorKind::NotFound,
                    format!("pool {} was detached as it was added", req.name),
                )
            })?;
        Ok(pool_status(&host, slot))
    })
    .await?;
    let loc = routes::pool_path(routes::POOL, Some(&status.name));
    Ok(created(&status, &loc))
}

async fn detach_pool(
    State(s): State<ApiState>,
    PoolName(name): PoolName,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<StatusCode, ApiError> {
    let host = Arc::clone(&s.host);
    service(move || host.detach_pool(&name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn open_pool(
    State(s): State<ApiState>,
    PoolName(name): PoolName,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<Json<PoolStatus>, ApiError> {
    let host = Arc::clone(&s.host);
    let status = service(move || {
        host.open_pool(&name, q.force)?;
        let slot = host
            .pools()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                vpool_service::Error::new(
                    ErrorKind::NotFound,
                    format!("pool {name} was detached as it was opened"),
                )
            })?;
        Ok(pool_status(&host, slot))
    })
    .await?;
    Ok(Json(status))
}

// ----- pool routes -----

async fn pool_info(
    State(s): State<ApiState>,
    At { ctx, .. }: At,
) -> Result<Json<PoolInfo>, ApiError> {
    let svc = ctx.service.clone();
    let stats = service(move || Ok(svc.stats())).await?;
    Ok(Json(PoolInfo {
        nbd_tcp_addr: s.nbd_tcp_addr,
        ..stats.into()
    }))
}

async fn pool_clean(At { ctx, .. }: At) -> Result<Json<CleanResult>, ApiError> {
    let r = service(move || ctx.service.clean()).await?;
    Ok(Json(r.into()))
}

/// `POST /v1/pool/check`: reads the whole pool; stops if the client
/// leaves (see [`CancelOnDrop`]).
async fn pool_check(
    At { ctx, .. }: At,
    ApiQuery(q): ApiQuery<CheckQuery>,
) -> Result<Json<CheckResult>, ApiError> {
    let cancel = CancelOnDrop(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let flag = cancel.0.clone();
    let r = service(move || ctx.service.check(q.repair, &flag)).await?;
    Ok(Json(r.into()))
}

async fn pool_checkpoint(At { ctx, .. }: At) -> Result<StatusCode, ApiError> {
    service(move || ctx.service.checkpoint()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn flush(At { ctx, .. }: At) -> Result<StatusCode, ApiError> {
    service(move || ctx.service.flush()).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- cache routes -----

/// The pool's cache, or the refusal of a pool without one.
fn need_cache(ctx: &PoolCtx) -> Result<Arc<dyn CacheControl>, ApiError> {
    ctx.cache.clone().ok_or_else(|| {
        ApiError::new(
            ErrorKind::NotSupported,
            format!(
                "pool {} is a local pool: it has no cache (cache commands are for pools on S3, \
                 made with `vpool pool create NAME --s3 ...`)",
                ctx.name
            ),
        )
    })
}

/// Checks a volume or snapshot name of a pin request: the engine checks the
/// rest (a name it does not know is `not_found`).
fn check_pin_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid(format!("the {what} name is empty")));
    }
    if vpool_service::catalog::is_reserved(name) {
        return Err(ApiError::invalid(format!(
            "the {what} name {name:?} starts with '.': reserved"
        )));
    }
    if name.contains('@') || name.contains('/') {
        return Err(ApiError::invalid(format!(
            "the {what} name {name:?} contains '@' or '/'; give the volume and the snapshot \
             separately ({{\"volume\": \"db1\", \"snapshot\": \"suspended\"}})"
        )));
    }
    Ok(())
}

async fn cache_stats(At { ctx, .. }: At) -> Result<Json<CacheInfo>, ApiError> {
    let cache = need_cache(&ctx)?;
    let info = service(move || Ok(cache.stats())).await?;
    Ok(Json(info))
}

async fn list_pins(At { ctx, .. }: At) -> Result<Json<PinList>, ApiError> {
    let cache = need_cache(&ctx)?;
    let pins = service(move || Ok(cache.pins())).await?;
    Ok(Json(PinList { pins }))
}

async fn add_pin(
    At { ctx, .. }: At,
    ApiJson(req): ApiJson<PinRequest>,
) -> Result<Response, ApiError> {
    let cache = need_cache(&ctx)?;
    check_pin_name("volume", &req.volume)?;
    if let Some(snap) = &req.snapshot {
        check_pin_name("snapshot", snap)?;
    }
    let (pin, new) = service(move || cache.pin(&req.volume, req.snapshot.as_deref())).await?;
    if new {
        let loc = routes::cache_pin(&pin.volume, pin.snapshot.as_deref());
        Ok(created(&pin, &loc))
    } else {
        Ok(Json(pin).into_response())
    }
}

/// `DELETE /v1/cache/pins/{image}`, the image being `VOLUME` or
/// `VOLUME@SNAPSHOT` (as NBD exports name snapshots).
async fn remove_pin(At { ctx, image, .. }: At) -> Result<StatusCode, ApiError> {
    let cache = need_cache(&ctx)?;
    let (volume, snapshot) = match image.split_once('@') {
        Some((v, snap)) => (v.to_string(), Some(snap.to_string())),
        None => (image.clone(), None),
    };
    check_pin_name("volume", &volume)?;
    if let Some(snap) = &snapshot {
        check_pin_name("snapshot", snap)?;
    }
    service(move || cache.unpin(&volume, snapshot.as_deref())).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- volume routes -----

/// Runs service work (blocking: engine calls, syncs) on the blocking pool.
async fn service<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> vpool_service::Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => Err(ApiError::internal(format!("engine task failed: {e}"))),
    }
}

fn created(body: impl serde::Serialize, location: &str) -> Response {
    let mut resp = (StatusCode::CREATED, Json(body)).into_response();
    // The route builders percent-encode names (valid names need none).
    if let Ok(loc) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(header::LOCATION, loc);
    }
    resp
}

async fn list_volumes(
    State(s): State<ApiState>,
    Named { pool, .. }: Named,
) -> Result<Json<VolumeList>, ApiError> {
    let host = Arc::clone(&s.host);
    let list = service(move || {
        let Some(sh) = host.shared(pool.as_deref()) else {
            let ctx = host.pool(pool.as_deref())?;
            let vols = ctx.service.list_volumes();
            let mut clients = host.pool_clients(Some(&ctx.name));
            let volumes = (vols.into_iter().map(VolumeInfo::from))
                .map(|mut v| {
                    v.writer = host.volume_writer(&ctx.name, &v.name, v.id);
                    v.clients = clients.remove(&v.name).unwrap_or_default();
                    v
                })
                .collect();
            return Ok(VolumeList {
                volumes,
                shared: None,
            });
        };
        let volumes = sh
            .owned()
            .iter()
            .flat_map(|f| f.service.list_volumes())
            .map(VolumeInfo::from)
            .collect();
        Ok(VolumeList {
            volumes,
            shared: Some(sh.list()?),
        })
    })
    .await?;
    Ok(Json(list))
}

async fn create_volume(
    State(s): State<ApiState>,
    Named { pool, .. }: Named,
    ApiJson(req): ApiJson<CreateVolumeRequest>,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let at = pool.clone();
    let info = service(move || match host.shared(pool.as_deref()) {
        Some(sh) if req.ephemeral => Err(vpool_service::Error::invalid(format!(
            "pool {} is shared: its volumes are not ephemeral",
            sh.name
        ))),
        Some(sh) => {
            host.create_shared_volume(&sh, &req.name, req.size_bytes, req.durability.as_deref())
        }
        None if req.durability.is_some() => Err(vpool_service::Error::invalid(
            "durability is set per volume only in a shared pool; other pools have the pool's (`pool create --durability`)",
        )),
        None => host.pool(pool.as_deref())?.service.create_volume(
            &req.name,
            req.size_bytes,
            req.ephemeral,
        ),
    })
    .await?;
    let info = VolumeInfo::from(info);
    let loc = match at {
        Some(p) => routes::volume(&format!("{p}/{}", info.name)),
        None => routes::volume(&info.name),
    };
    Ok(created(&info, &loc))
}

/// `GET .../volumes/{name}/owner`: who owns a volume of a shared pool.
async fn volume_owner(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<Json<vpool_service::SharedVolumeStatus>, ApiError> {
    let host = Arc::clone(&s.host);
    let status = service(move || host.need_shared(pool.as_deref())?.status(&name)).await?;
    Ok(Json(status))
}

/// `POST .../volumes/{name}/takeover`: this host owns the volume from now.
async fn volume_takeover(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<Json<vpool_service::SharedVolumeStatus>, ApiError> {
    let host = Arc::clone(&s.host);
    let status = service(move || {
        let sh = host.need_shared(pool.as_deref())?;
        host.takeover_volume(&sh.name, &name, q.force)?;
        sh.status(&name)
    })
    .await?;
    Ok(Json(status))
}

/// `POST .../volumes/{name}/release`: this host gives the volume up.
async fn volume_release(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<StatusCode, ApiError> {
    let host = Arc::clone(&s.host);
    service(move || host.release_volume(pool.as_deref(), &name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Sets its flag when dropped: when the request's future is dropped (the
/// client left, or the server is shutting down), the blocking work that
/// watches the flag stops.
struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Exclusive and shared bytes of `name` and its snapshots, or `None` if
/// that took longer than `deadline`
/// ([`ApiLimits::space_accounting_timeout`]). Stops working when the
/// request is dropped.
async fn space_of(
    svc: &Arc<PoolService>,
    name: &str,
    deadline: std::time::Duration,
) -> Result<Option<vpool_engine::VolumeSpace>, ApiError> {
    let cancel = CancelOnDrop(Arc::new(std::sync::atomic::AtomicBool::new(false)));
    let (svc, owned, flag) = (svc.clone(), name.to_string(), cancel.0.clone());
    let work = service(move || svc.volume_space(&owned, &flag));
    match tokio::time::timeout(deadline, work).await {
        Ok(r) => r.map(Some),
        Err(_) => {
            // The work stops too: `cancel` is dropped on return.
            tracing::warn!(
                volume = name,
                "API limit: space accounting took over {} ms; answered without exclusive and shared bytes",
                deadline.as_millis()
            );
            Ok(None)
        }
    }
}

async fn volume_info(
    State(s): State<ApiState>,
    At { ctx, name, .. }: At,
) -> Result<Json<VolumeInfo>, ApiError> {
    let (svc, n) = (ctx.service.clone(), name.clone());
    let view = service(move || svc.volume(&n)).await?;
    let deadline = s.limits.space_accounting_timeout;
    let space = space_of(&ctx.service, &name, deadline).await?;
    let mut info = VolumeInfo::from(view);
    info.exclusive_bytes = space.as_ref().map(|sp| sp.volume.exclusive_bytes);
    info.shared_bytes = space.as_ref().map(|sp| sp.volume.shared_bytes);
    info.writer = s.host.volume_writer(&ctx.name, &info.name, info.id);
    info.clients = s.host.volume_clients(Some(&ctx.name), &info.name);
    Ok(Json(info))
}

async fn resize_volume(
    at: At,
    ApiJson(req): ApiJson<ResizeVolumeRequest>,
) -> Result<Json<VolumeInfo>, ApiError> {
    if req.allow_shrink {
        // Shrunk, then grown, it would show its template past the cut.
        at.refuse_layered("shrinking")?;
    }
    let At { ctx, name, .. } = at;
    let info = service(move || {
        ctx.service
            .resize_volume(&name, req.size_bytes, req.allow_shrink, req.force)
    })
    .await?;
    Ok(Json(info.into()))
}

async fn delete_volume(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<StatusCode, ApiError> {
    let host = Arc::clone(&s.host);
    // A shared pool's volume may be deleted from a host that does not own
    // it (a template, a name without a family): no family to resolve.
    service(move || match host.shared(pool.as_deref()) {
        Some(sh) => sh.delete(&name, q.force),
        None => host
            .volume_pool(pool.as_deref(), &name)?
            .service
            .delete_volume(&name, q.force),
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- snapshots -----

async fn list_snapshots(
    State(s): State<ApiState>,
    At { ctx, name, .. }: At,
) -> Result<Json<SnapshotList>, ApiError> {
    let (svc, n) = (ctx.service.clone(), name.clone());
    let (snaps, times) =
        service(move || Ok((svc.list_snapshots(&n)?, svc.snapshot_times(&n)?))).await?;
    let walk = space_of(&ctx.service, &name, s.limits.space_accounting_timeout).await?;
    let volume_exclusive_bytes = walk.as_ref().map(|sp| sp.volume.exclusive_bytes);
    let space: std::collections::HashMap<String, vpool_engine::ImageSpace> = match walk {
        Some(sp) => sp.snapshots.into_iter().collect(),
        None => Default::default(),
    };
    Ok(Json(SnapshotList {
        volume_exclusive_bytes,
        snapshots: snaps
            .into_iter()
            .map(|e| {
                let sp = space.get(&e.name).copied();
                let created = times.get(&e.name).copied();
                let mut out = SnapshotInfo::from(e);
                out.created_unix_ms = created;
                out.exclusive_bytes = sp.map(|x| x.exclusive_bytes);
                out.shared_bytes = sp.map(|x| x.shared_bytes);
                out
            })
            .collect(),
    }))
}

async fn create_snapshot(
    At { ctx, name, .. }: At,
    ApiJson(req): ApiJson<CreateSnapshotRequest>,
) -> Result<Response, ApiError> {
    let (snap, at) = service(move || {
        let snap = ctx.service.create_snapshot(&name, &req.name)?;
        let at = ctx.service.snapshot_times(&name)?.get(&snap.name).copied();
        Ok((snap, at))
    })
    .await?;
    let loc = routes::snapshot(&snap.volume, &snap.name);
    let mut info = SnapshotInfo::from(snap);
    info.created_unix_ms = at;
    Ok(created(info, &loc))
}

async fn snapshot_info(
    At {
        ctx, name, snap, ..
    }: At,
) -> Result<Json<SnapshotInfo>, ApiError> {
    let (info, at) = service(move || {
        let at = ctx.service.snapshot_times(&name)?.get(&snap).copied();
        Ok((ctx.service.snapshot(&name, &snap)?, at))
    })
    .await?;
    let mut info = SnapshotInfo::from(info);
    info.created_unix_ms = at;
    Ok(Json(info))
}

async fn delete_snapshot(
    At {
        ctx, name, snap, ..
    }: At,
) -> Result<StatusCode, ApiError> {
    service(move || ctx.service.delete_snapshot(&name, &snap)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rollback(
    At {
        ctx, name, snap, ..
    }: At,
    ApiQuery(q): ApiQuery<RollbackQuery>,
) -> Result<Json<VolumeInfo>, ApiError> {
    let info = service(move || ctx.service.rollback(&name, &snap, q.force)).await?;
    Ok(Json(info.into()))
}

// ----- templates and clones -----

async fn make_template(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<Json<VolumeInfo>, ApiError> {
    let host = Arc::clone(&s.host);
    let info = service(move || host.make_template(pool.as_deref(), &name)).await?;
    Ok(Json(info.into()))
}

async fn clone_volume(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiJson(req): ApiJson<CloneRequest>,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let info = service(move || {
        host.clone_volume(pool.as_deref(), &name, req.snapshot.as_deref(), &req.name)
    })
    .await?;
    let info = VolumeInfo::from(info);
    let loc = routes::volume(&info.name);
    Ok(created(&info, &loc))
}

async fn flatten(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<Json<FlattenReport>, ApiError> {
    let host = Arc::clone(&s.host);
    let done = service(move || host.flatten_volume(pool.as_deref(), &name)).await?;
    Ok(Json(done.into()))
}

/// Starts a copy job: 202 with the job, `Location` its route.
async fn copy_volume(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiJson(req): ApiJson<CopyRequest>,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let job = service(move || {
        // `POOL/NAME`, or `NAME` in the source's pool.
        let (to_pool, to) = vpool_service::names::split_pool(&req.to);
        host.copy_volume(
            pool.as_deref(),
            &name,
            req.snapshot.as_deref(),
            to_pool.or(pool.as_deref()),
            to,
            req.max_rate_bytes_per_sec,
        )
    })
    .await?;
    Ok(accepted(&job))
}

/// Starts a move job: 202 with the job, `Location` its route.
async fn move_volume(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let job = service(move || {
        host.move_volume(
            pool.as_deref(),
            &name,
            &req.to_pool,
            req.name.as_deref(),
            req.max_rate_bytes_per_sec,
            req.without_snapshots,
        )
    })
    .await?;
    Ok(accepted(&job))
}

// ----- replication -----

/// Starts replicating: 201 with the replication's status (its first run
/// started).
async fn add_replica(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiJson(req): ApiJson<ReplicaRequest>,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let path = routes::volume_replica(&match &pool {
        Some(p) => format!("{p}/{name}"),
        None => name.clone(),
    });
    let status = service(move || {
        let spec = vpool_service::host::ReplicaSpec {
            to_pool: req.to_pool,
            to: req.name,
            every_secs: req.every_secs,
            keep: req.keep,
            max_rate_bytes_per_sec: req.max_rate_bytes_per_sec,
        };
        host.add_replica(pool.as_deref(), &name, &spec)
    })
    .await?;
    Ok(created(&status, &path))
}

async fn replica_status(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<Json<ReplicaStatus>, ApiError> {
    let host = Arc::clone(&s.host);
    Ok(Json(
        service(move || host.replica_status(pool.as_deref(), &name)).await?,
    ))
}

async fn list_replicas(State(s): State<ApiState>) -> Result<Json<ReplicaList>, ApiError> {
    let host = Arc::clone(&s.host);
    let replicas = service(move || host.list_replicas()).await?;
    Ok(Json(ReplicaList { replicas }))
}

async fn remove_replica(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<StatusCode, ApiError> {
    let host = Arc::clone(&s.host);
    service(move || host.remove_replica(pool.as_deref(), &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Starts a run: 202 with the job.
async fn run_replica(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let job = service(move || host.run_replica(pool.as_deref(), &name)).await?;
    Ok(accepted(&job))
}

/// Starts a verify: 202 with the job.
async fn verify_replica(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let job = service(move || host.verify_replica(pool.as_deref(), &name)).await?;
    Ok(accepted(&job))
}

/// Gives the volume another name (in its pool); the volume.
async fn rename_volume(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiJson(req): ApiJson<crate::types::RenameRequest>,
) -> Result<Json<VolumeInfo>, ApiError> {
    let host = Arc::clone(&s.host);
    let view = service(move || host.rename_volume(pool.as_deref(), &name, &req.new_name)).await?;
    Ok(Json(view.into()))
}

// ----- the trash -----

/// Moves the volume to its pool's trash; the trash entry.
async fn trash_volume(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiQuery(q): ApiQuery<crate::types::TrashQuery>,
) -> Result<Json<crate::types::TrashEntry>, ApiError> {
    let host = Arc::clone(&s.host);
    let entry = service(move || host.trash_volume(pool.as_deref(), &name, q.expire_secs)).await?;
    Ok(Json(entry))
}

async fn trash_list(At { ctx, .. }: At) -> Result<Json<crate::types::TrashList>, ApiError> {
    let trash = service(move || ctx.service.trash_list()).await?;
    Ok(Json(crate::types::TrashList { trash }))
}

async fn trash_restore(
    State(s): State<ApiState>,
    Named { pool, .. }: Named,
    TrashId(id): TrashId,
    ApiJson(req): ApiJson<crate::types::RestoreRequest>,
) -> Result<Json<VolumeInfo>, ApiError> {
    let host = Arc::clone(&s.host);
    let view =
        service(move || host.trash_restore(pool.as_deref(), id, req.name.as_deref())).await?;
    Ok(Json(view.into()))
}

async fn trash_remove(
    State(s): State<ApiState>,
    Named { pool, .. }: Named,
    TrashId(id): TrashId,
) -> Result<Json<crate::types::TrashEntry>, ApiError> {
    let host = Arc::clone(&s.host);
    let entry = service(move || host.trash_remove(pool.as_deref(), id)).await?;
    Ok(Json(entry))
}

async fn trash_purge(
    State(s): State<ApiState>,
    Named { pool, .. }: Named,
    ApiJson(req): ApiJson<crate::types::PurgeRequest>,
) -> Result<Json<crate::types::PurgeReport>, ApiError> {
    let host = Arc::clone(&s.host);
    let report = service(move || host.trash_purge(pool.as_deref(), req.older_than_secs)).await?;
    Ok(Json(report))
}

/// Lets several NBD clients write the volume at once, or one; the volume.
async fn set_multi_writer(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiJson(req): ApiJson<crate::types::MultiWriterRequest>,
) -> Result<Json<VolumeInfo>, ApiError> {
    let host = Arc::clone(&s.host);
    let view = service(move || host.set_multi_writer(pool.as_deref(), &name, req.enabled)).await?;
    Ok(Json(view.into()))
}

/// Sets (an empty body: clears) the volume's QoS limits; the volume.
async fn set_qos(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
    ApiJson(limits): ApiJson<QosLimits>,
) -> Result<Json<VolumeInfo>, ApiError> {
    let host = Arc::clone(&s.host);
    let view = service(move || host.set_qos(pool.as_deref(), &name, &limits)).await?;
    Ok(Json(view.into()))
}

async fn promote(
    State(s): State<ApiState>,
    Named { pool, name }: Named,
) -> Result<Json<VolumeInfo>, ApiError> {
    let host = Arc::clone(&s.host);
    let view = service(move || host.promote_replica(pool.as_deref(), &name)).await?;
    Ok(Json(view.into()))
}

/// `GET /metrics`: OpenMetrics text.
async fn metrics(State(s): State<ApiState>) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let text = service(move || Ok(host.metrics_text())).await?;
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    Ok(resp)
}

async fn io_counters(State(s): State<ApiState>) -> Json<IoList> {
    Json(IoList {
        volumes: s.host.io_counters(),
    })
}

// ----- snapshot schedules -----

async fn list_schedules(State(s): State<ApiState>) -> Result<Json<ScheduleList>, ApiError> {
    let host = Arc::clone(&s.host);
    let schedules = service(move || host.list_schedules()).await?;
    Ok(Json(ScheduleList { schedules }))
}

/// Adds a schedule: 201 with it, `Location` its route.
async fn add_schedule(
    State(s): State<ApiState>,
    ApiJson(req): ApiJson<ScheduleRequest>,
) -> Result<Response, ApiError> {
    let host = Arc::clone(&s.host);
    let info = service(move || {
        let (pool, volume) = vpool_service::names::split_pool(&req.volume);
        let spec = vpool_service::host::ScheduleSpec {
            every_secs: req.every_secs,
            keep: req.keep,
            prefix: req.prefix.clone(),
        };
        host.add_schedule(pool, volume, &spec)
    })
    .await?;
    let loc = routes::schedule(info.id);
    Ok(created(&info, &loc))
}

async fn remove_schedule(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = id.parse().map_err(|_| {
        ApiError::from(vpool_service::Error::invalid(format!(
            "{id:?} is not a schedule id (a number)"
        )))
    })?;
    let host = Arc::clone(&s.host);
    service(move || host.remove_schedule(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `202 Accepted` with job `job`, `Location` its route.
fn accepted(job: &JobInfo) -> Response {
    let mut resp = created(job, &routes::job(job.id));
    *resp.status_mut() = StatusCode::ACCEPTED;
    resp
}

// ----- jobs -----

async fn list_jobs(State(s): State<ApiState>) -> Json<JobList> {
    Json(JobList {
        jobs: s.host.jobs.list(),
    })
}

/// A route's `{id}` capture: a job id, checked.
struct JobId(u64);

impl FromRequestParts<ApiState> for JobId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        id_capture(parts, state, "job").await.map(JobId)
    }
}

/// The `{id}` capture of a trash route: a volume id.
struct TrashId(u64);

impl FromRequestParts<ApiState> for TrashId {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        id_capture(parts, state, "volume").await.map(TrashId)
    }
}

/// The `{id}` capture, a number (`what` id).
async fn id_capture(parts: &mut Parts, state: &ApiState, what: &str) -> Result<u64, ApiError> {
    let captures = Captures::from_request_parts(parts, state).await?;
    let raw = captures.get("id").unwrap_or_default();
    raw.parse().map_err(|_| {
        ApiError::from(vpool_service::Error::invalid(format!(
            "{raw:?} is not a {what} id (a number)"
        )))
    })
}

async fn job_info(State(s): State<ApiState>, JobId(id): JobId) -> Result<Json<JobInfo>, ApiError> {
    Ok(Json(s.host.jobs.get(id)?))
}

async fn cancel_job(
    State(s): State<ApiState>,
    JobId(id): JobId,
) -> Result<Json<JobInfo>, ApiError> {
    Ok(Json(s.host.jobs.cancel(id)?))
}

async fn commit(
    At { ctx, name, .. }: At,
    ApiQuery(q): ApiQuery<RollbackQuery>,
) -> Result<Json<VolumeInfo>, ApiError> {
    let info = service(move || ctx.service.commit(&name, q.force)).await?;
    Ok(Json(info.into()))
}

async fn diff(at: At, ApiQuery(q): ApiQuery<DiffQuery>) -> Result<Json<Diff>, ApiError> {
    at.refuse_layered("a diff")?;
    let At { ctx, name, .. } = at;
    let (svc, n, from, to) = (
        ctx.service.clone(),
        name.clone(),
        q.from.clone(),
        q.to.clone(),
    );
    let (all, from_size, size) =
        service(move || svc.diff(&n, from.as_deref(), to.as_deref())).await?;
    let mut extents = Vec::new();
    let mut next_offset = None;
    for e in all {
        let end = e.offset + e.len;
        if end <= q.offset {
            continue;
        }
        if extents.len() == MAX_DIFF_EXTENTS {
            next_offset = Some(e.offset.max(q.offset));
            break;
        }
        let mut x = DiffExtent::from(e);
        if x.offset < q.offset {
            x.length = end - q.offset;
            x.offset = q.offset;
        }
        extents.push(x);
    }
    Ok(Json(Diff {
        volume: name,
        from: q.from,
        to: q.to,
        from_size_bytes: from_size,
        size_bytes: size,
        offset: q.offset,
        extents,
        next_offset,
    }))
}

// ----- data routes -----

async fn write_data(
    at: At,
    ApiQuery(q): ApiQuery<WriteQuery>,
    ApiBytes(body): ApiBytes,
) -> Result<StatusCode, ApiError> {
    at.refuse_layered("writing data over the API")?;
    let At { ctx, name, .. } = at;
    range_end(q.offset, body.len() as u64)?;
    service(move || ctx.service.write(&name, q.offset, &body, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn read_data(at: At, ApiQuery(q): ApiQuery<RangeQuery>) -> Result<Response, ApiError> {
    at.refuse_layered("reading data over the API")?;
    let At { ctx, name, .. } = at;
    range_end(q.offset, q.length)?;
    let len = usize::try_from(q.length)
        .ok()
        .filter(|&l| l <= MAX_DATA_BYTES)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "length {} is over the limit of {MAX_DATA_BYTES} bytes a request; split the read",
                q.length
            ))
        })?;
    let buf = service(move || {
        ctx.service
            .read(&name, q.snapshot.as_deref(), q.offset, len)
    })
    .await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        buf,
    )
        .into_response())
}

async fn zero_range(at: At, ApiQuery(q): ApiQuery<ZeroQuery>) -> Result<StatusCode, ApiError> {
    at.refuse_layered("zeroing over the API")?;
    let At { ctx, name, .. } = at;
    range_end(q.offset, q.length)?;
    service(move || {
        ctx.service
            .zero(&name, q.offset, q.length, q.unmap, q.force)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/volumes/{name}/import`: an import is about to replace the
/// volume's content; until `DELETE` says it finished, the volume is
/// incomplete (see the catalog).
async fn begin_import(
    at: At,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> Result<Json<crate::types::ImportBegun>, ApiError> {
    at.refuse_layered("an import")?;
    let At { ctx, name, .. } = at;
    let nbd_export = service(move || ctx.service.begin_import(&name, q.force)).await?;
    Ok(Json(crate::types::ImportBegun { nbd_export }))
}

/// `DELETE /v1/volumes/{name}/import`: the import finished, its data is
/// flushed.
async fn end_import(At { ctx, name, .. }: At) -> Result<StatusCode, ApiError> {
    service(move || ctx.service.end_import(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn allocation(
    at: At,
    ApiQuery(q): ApiQuery<RangeQuery>,
) -> Result<Json<Allocation>, ApiError> {
    at.refuse_layered("the allocation map")?;
    let At { ctx, name, .. } = at;
    range_end(q.offset, q.length)?;
    let offset = q.offset;
    let asked = q.length;
    let raw = service(move || {
        let vol = ctx.service.image(&name, q.snapshot.as_deref())?;
        // Range-check the whole asked range, so a bad request fails the same
        // way whatever part of it this answer would cover.
        let size = vol.size_bytes()?;
        if offset.saturating_add(asked) > size {
            return Err(EngineError::OutOfRange {
                op: "allocation",
                volume: name,
                offset,
                len: asked,
                size_bytes: size,
            }
            .into());
        }
        let span = asked.min(MAX_ALLOCATION_SPAN_BYTES);
        Ok(vol.block_status(offset, span, MAX_ALLOCATION_EXTENTS)?)
    })
    .await?;
    let mut extents = Vec::with_capacity(raw.len());
    let mut at = offset;
    for (length, flags) in raw {
        extents.push(AllocationExtent {
            offset: at,
            length,
            hole: flags & STATE_HOLE != 0,
            zero: flags & STATE_ZERO != 0,
        });
        at += length;
    }
    Ok(Json(Allocation {
        offset,
        length: at - offset,
        extents,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"abc", b""));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn token_rules() {
        assert!(AuthToken::new("short").is_err());
        assert!(AuthToken::new("has a space in it, long enough").is_err());
        let t = AuthToken::new("0123456789abcdef0123\n").unwrap();
        assert_eq!(t.as_str(), "0123456789abcdef0123");
        assert!(t.matches(b"0123456789abcdef0123"));
        assert!(!t.matches(b"0123456789abcdef0124"));
        assert_eq!(format!("{t:?}"), "AuthToken(..)");
    }

    #[test]
    fn range_end_overflow_is_invalid() {
        assert_eq!(range_end(1, 2).unwrap(), 3);
        assert_eq!(range_end(u64::MAX, 1).unwrap_err().kind, ErrorKind::Invalid);
    }
}
