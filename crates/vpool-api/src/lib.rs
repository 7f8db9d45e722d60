//! vpool's management and data-transfer API over HTTP/1.1 with JSON bodies.
//!
//! - [`types`]: the wire types, shared by the server and the client, so the
//!   two cannot drift apart.
//! - [`error`]: the JSON error body, its kinds and their HTTP statuses.
//! - [`catalog`]: re-exported from `vpool-service`, which owns the rules;
//!   the handlers here are thin calls into its `PoolService`.
//! - [`cache`]: [`CacheControl`], the host cache of a pool on object
//!   storage (stats and pins), as the daemon provides it.
//! - [`server`]: the axum server, started on a Unix socket (trusted: file
//!   permissions guard it) or a TCP listener (bearer token required).
//! - [`limits`]: [`ApiLimits`] (connections per listener, header, body and
//!   response timeouts) and the accept loop that enforces them.
//! - [`client`]: a small synchronous client speaking HTTP/1.1 by hand over a
//!   Unix or TCP stream; the CLI uses it.
//! - [`routes`]: every route path, defined once: the patterns the server
//!   routes and the functions that build the client's paths from them.
//!
//! Every route lives under [`API_PREFIX`] so a later, incompatible API can
//! sit beside this one.

pub mod cache;
pub use vpool_service::catalog;
pub mod client;
pub mod error;
pub mod limits;
pub mod routes;
pub use vpool_ratelog as ratelog;
pub mod server;
pub mod types;

pub use cache::CacheControl;
pub use catalog::{Access, Catalog, TEMPLATE_SNAPSHOT};
pub use client::{Client, ClientError, RawResponse};
pub use error::{ApiError, ErrorBody, ErrorDetail, ErrorKind};
pub use limits::ApiLimits;
pub use server::{ApiState, AuthToken, ServeError, router, serve_tcp, serve_unix};
pub use types::*;

/// Prefix of every route of this version of the API.
pub const API_PREFIX: &str = "/v1";

/// Most bytes one data request moves (a `PUT …/data` body or a `GET …/data`
/// response). Bounds the memory a request pins on both ends; clients split
/// larger transfers.
pub const MAX_DATA_BYTES: usize = 8 << 20;

/// Most bytes of a JSON request body. Management requests are tiny; this only
/// stops a client from making the server buffer junk.
pub const MAX_JSON_BODY_BYTES: usize = 64 << 10;

/// Most extents one `allocation` response lists. The answer then covers a
/// prefix of the asked range and the client asks again from where it ends.
pub const MAX_ALLOCATION_EXTENTS: usize = 16 << 10;

/// Most bytes of volume one `allocation` request looks at. The engine
/// builds the list of map pieces for the whole span before trimming it to
/// [`MAX_ALLOCATION_EXTENTS`], so the span bounds that work.
pub const MAX_ALLOCATION_SPAN_BYTES: u64 = 16 << 30;

/// Most extents one `diff` response lists; the client asks again from
/// `next_offset` for the rest.
pub const MAX_DIFF_EXTENTS: usize = 16 << 10;
