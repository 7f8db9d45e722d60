//! The API's error body and how errors map to HTTP statuses.
//!
//! Every failed request answers
//! `{"error": {"kind": "...", "message": "..."}}`. `kind` is the stable,
//! machine-readable part (clients branch on it); `message` is for people and
//! may change wording at any time.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use vpool_engine::EngineError;
use vpool_store::StoreError;

/// The class of a failure. Serialized in `snake_case`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such volume (or no such route).
    NotFound,
    /// A volume with that name exists.
    AlreadyExists,
    /// The request is malformed: bad JSON, a missing or unknown field, a bad
    /// query string, a name or size the pool does not accept.
    Invalid,
    /// The byte range lies (partly) outside the volume.
    OutOfRange,
    /// Shrinking a volume needs `allow_shrink`.
    ShrinkRefused,
    /// Something depends on what was to be deleted (clones on a snapshot).
    InUse,
    /// A write-type request to something read-only (a snapshot).
    ReadOnly,
    /// Stored data failed its checksum.
    Corrupt,
    /// The pool's device is full.
    NoSpace,
    /// The pool stopped taking writes (a sync failed, or it is closing).
    Failed,
    /// A bug or an unexpected backend error.
    Internal,
    /// The request body is over the route's limit.
    PayloadTooLarge,
    /// A TCP request without the right bearer token.
    Unauthorized,
    /// The route exists but not with this method.
    MethodNotAllowed,
    /// This pool cannot do that: cache commands on a local pool (it has no
    /// cache).
    NotSupported,
    /// The client took too long to send its request body.
    Timeout,
    /// A kind this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::AlreadyExists
            | ErrorKind::ShrinkRefused
            | ErrorKind::InUse
            | ErrorKind::ReadOnly
            | ErrorKind::NotSupported => StatusCode::CONFLICT,
            ErrorKind::Invalid => StatusCode::BAD_REQUEST,
            ErrorKind::OutOfRange => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorKind::Corrupt | ErrorKind::Internal | ErrorKind::Unknown => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            ErrorKind::Failed => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::Timeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Invalid => "invalid",
            ErrorKind::OutOfRange => "out_of_range",
            ErrorKind::ShrinkRefused => "shrink_refused",
            ErrorKind::InUse => "in_use",
            ErrorKind::ReadOnly => "read_only",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Failed => "failed",
            ErrorKind::Internal => "internal",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::NotSupported => "not_supported",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub kind: ErrorKind,
    pub message: String,
}

/// A failed request on the server side; turns into the JSON error body.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Invalid, message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorKind::Internal, message)
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(mut self, what: &str) -> ApiError {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// Maps an axum extractor's rejection: over-limit bodies keep their 413,
    /// everything else the client sent wrong is `invalid`.
    pub(crate) fn from_rejection(status: StatusCode, what: &str, text: String) -> ApiError {
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorKind::PayloadTooLarge, format!("{what}: {text}"))
        } else if status.is_server_error() {
            ApiError::internal(format!("{what}: {text}"))
        } else {
            ApiError::invalid(format!("{what}: {text}"))
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let kind = match &e {
            EngineError::VolumeNotFound(_) | EngineError::SnapshotNotFound { .. } => {
                ErrorKind::NotFound
            }
            EngineError::VolumeExists(_) | EngineError::SnapshotExists { .. } => {
                ErrorKind::AlreadyExists
            }
            EngineError::InUse { .. } => ErrorKind::InUse,
            EngineError::ReadOnly(_) => ErrorKind::ReadOnly,
            EngineError::Invalid { .. } => ErrorKind::Invalid,
            EngineError::OutOfRange { .. } => ErrorKind::OutOfRange,
            EngineError::ShrinkRefused { .. } => ErrorKind::ShrinkRefused,
            EngineError::Corrupt { .. }
            | EngineError::CorruptMeta { .. }
            | EngineError::Damaged(_) => ErrorKind::Corrupt,
            EngineError::Failed(_) | EngineError::Closed | EngineError::Cancelled(_) => {
                ErrorKind::Failed
            }
            EngineError::Store(StoreError::NoSpace { .. }) | EngineError::PoolFull { .. } => {
                ErrorKind::NoSpace
            }
            // Another host took the pool over, or the object store behind
            // the cache does not answer: nothing this request can fix.
            EngineError::Store(
                StoreError::Crashed | StoreError::Fenced { .. } | StoreError::Unavailable { .. },
            ) => ErrorKind::Failed,
            EngineError::Store(_) => ErrorKind::Internal,
        };
        // The full chain, so "I/O error while X" also says what the OS said.
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        ApiError { kind, message }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.kind.status();
        // Server faults are the operator's business; client mistakes are
        // logged quieter, but logged, so a misbehaving client can be found.
        if status.is_server_error() {
            tracing::error!(kind = %self.kind, status = status.as_u16(), "request failed: {}", self.message);
        } else if matches!(
            self.kind,
            ErrorKind::Invalid | ErrorKind::PayloadTooLarge | ErrorKind::Unauthorized
        ) {
            tracing::warn!(kind = %self.kind, status = status.as_u16(), "bad request: {}", self.message);
        } else {
            tracing::debug!(kind = %self.kind, status = status.as_u16(), "request refused: {}", self.message);
        }
        let unauthorized = self.kind == ErrorKind::Unauthorized;
        let body = ErrorBody {
            error: ErrorDetail {
                kind: self.kind,
                message: self.message,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if unauthorized {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_serialize_as_documented() {
        for (kind, s) in [
            (ErrorKind::NotFound, "not_found"),
            (ErrorKind::AlreadyExists, "already_exists"),
            (ErrorKind::ShrinkRefused, "shrink_refused"),
            (ErrorKind::InUse, "in_use"),
            (ErrorKind::ReadOnly, "read_only"),
            (ErrorKind::NoSpace, "no_space"),
            (ErrorKind::OutOfRange, "out_of_range"),
            (ErrorKind::NotSupported, "not_supported"),
        ] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{s}\""));
            assert_eq!(kind.as_str(), s);
        }
        let k: ErrorKind = serde_json::from_str("\"from_the_future\"").unwrap();
        assert_eq!(k, ErrorKind::Unknown);
    }

    #[test]
    fn engine_errors_map_to_statuses() {
        let e: ApiError = EngineError::VolumeNotFound("x".into()).into();
        assert_eq!(e.kind.status(), StatusCode::NOT_FOUND);
        let e: ApiError = EngineError::ShrinkRefused {
            volume: "x".into(),
            from_bytes: 8192,
            to_bytes: 4096,
        }
        .into();
        assert_eq!(e.kind.status(), StatusCode::CONFLICT);
        let e: ApiError = EngineError::Store(StoreError::NoSpace {
            context: "appending".into(),
            source: std::io::Error::from_raw_os_error(28),
        })
        .into();
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert_eq!(e.kind.status(), StatusCode::INSUFFICIENT_STORAGE);
        assert!(e.message.contains("appending"), "{}", e.message);
        let e: ApiError = EngineError::Store(StoreError::Fenced {
            detail: "host b took the pool over".into(),
        })
        .into();
        assert_eq!(e.kind, ErrorKind::Failed);
        assert!(e.message.contains("fenced"), "{}", e.message);
    }
}
