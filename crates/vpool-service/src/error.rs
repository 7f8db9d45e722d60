//! The service's one error type: a stable, machine-readable [`ErrorKind`]
//! and a message for people. Every front end maps it: the API to an HTTP
//! status and a JSON body, NBD to an errno, the CLI to its exit status.

use serde::{Deserialize, Serialize};
use vpool_engine::EngineError;
use vpool_store::StoreError;

/// The class of a failure. Serialized in `snake_case` (the API's `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// No such volume, snapshot or pool (or no such route).
    NotFound,
    /// A volume (or snapshot, or pool) with that name exists.
    AlreadyExists,
    /// The request is malformed: bad JSON, a missing or unknown field, a bad
    /// query string, a name or size the pool does not accept.
    Invalid,
    /// The byte range lies (partly) outside the volume.
    OutOfRange,
    /// Shrinking a volume needs `allow_shrink`.
    ShrinkRefused,
    /// Something depends on what was to be changed or deleted (clones on a
    /// snapshot, NBD writers on a volume).
    InUse,
    /// A write-type request to something read-only (a snapshot, a template).
    ReadOnly,
    /// Stored data failed its checksum.
    Corrupt,
    /// The pool's device is full.
    NoSpace,
    /// The pool stopped taking writes (a sync failed, or it is closing), or
    /// cannot serve (fenced, its object store unreachable).
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
    /// The request did not arrive in time (a body sent too slowly).
    Timeout,
    /// A volume of a shared pool that another host owns (or none does):
    /// it is served, and changed, only by its owner.
    NotOwner,
    /// A job was cancelled before it finished (`vpool job cancel`).
    Cancelled,
    /// A kind this client does not know (sent by a newer server).
    #[serde(other)]
    Unknown,
}

impl ErrorKind {
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
            ErrorKind::NotOwner => "not_owner",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed operation: what kind, and what happened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Invalid, message)
    }

    pub fn internal(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Internal, message)
    }

    /// The same error, its message prefixed with what was being done.
    pub fn context(mut self, what: &str) -> Error {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl From<EngineError> for Error {
    fn from(e: EngineError) -> Error {
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
        Error { kind, message }
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
    fn engine_errors_map_to_kinds() {
        let e: Error = EngineError::VolumeNotFound("x".into()).into();
        assert_eq!(e.kind, ErrorKind::NotFound);
        let e: Error = EngineError::Store(StoreError::NoSpace {
            context: "appending".into(),
            source: std::io::Error::from_raw_os_error(28),
        })
        .into();
        assert_eq!(e.kind, ErrorKind::NoSpace);
        assert!(e.message.contains("appending"), "{}", e.message);
        let e: Error = EngineError::Store(StoreError::Fenced {
            detail: "host b took the pool over".into(),
        })
        .into();
        assert_eq!(e.kind, ErrorKind::Failed);
        assert!(e.message.contains("fenced"), "{}", e.message);
    }
}
