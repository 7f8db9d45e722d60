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

pub use vpool_service::ErrorKind;

/// The HTTP status an error kind answers with.
pub trait HttpStatus {
    fn status(self) -> StatusCode;
}

impl HttpStatus for ErrorKind {
    fn status(self) -> StatusCode {
        match self {
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::AlreadyExists
            | ErrorKind::ShrinkRefused
            | ErrorKind::InUse
            | ErrorKind::ReadOnly
            | ErrorKind::NotSupported
            | ErrorKind::NotOwner
            | ErrorKind::Cancelled => StatusCode::CONFLICT,
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

impl From<vpool_service::Error> for ApiError {
    fn from(e: vpool_service::Error) -> ApiError {
        ApiError {
            kind: e.kind,
            message: e.message,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        vpool_service::Error::from(e).into()
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
    use vpool_store::StoreError;

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
