//! The engine's error type.

use vpool_store::{SegmentId, StoreError};

use crate::record::DecodeError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("snapshot {volume}@{snapshot} not found")]
    SnapshotNotFound { volume: String, snapshot: String },
    #[error("snapshot {volume}@{snapshot} already exists")]
    SnapshotExists { volume: String, snapshot: String },
    #[error("{what} is in use by {}: delete them first", users.join(", "))]
    InUse { what: String, users: Vec<String> },
    #[error("read-only: {0}")]
    ReadOnly(String),
    #[error("invalid {what}: {why}")]
    Invalid { what: &'static str, why: String },
    #[error(
        "{op} of {len} bytes at offset {offset} is outside volume {volume:?} ({size_bytes} bytes)"
    )]
    OutOfRange {
        op: &'static str,
        volume: String,
        offset: u64,
        len: u64,
        size_bytes: u64,
    },
    #[error(
        "refusing to shrink volume {volume:?} from {from_bytes} to {to_bytes} bytes: data past the new end would be lost (ask for it explicitly to shrink)"
    )]
    ShrinkRefused {
        volume: String,
        from_bytes: u64,
        to_bytes: u64,
    },
    #[error(
        "corrupt data in volume {volume:?} at offset {offset}: {segment} at byte {segment_offset}: {detail}"
    )]
    Corrupt {
        volume: String,
        offset: u64,
        segment: SegmentId,
        segment_offset: u64,
        detail: String,
    },
    // The cause is the error's source, not part of its message: callers
    // that print the chain would show it twice.
    #[error("corrupt pool metadata ({what})")]
    CorruptMeta {
        what: String,
        #[source]
        source: DecodeError,
    },
    #[error(
        "the pool stopped accepting writes after a failed sync ({0}); restart the daemon to recover from the log"
    )]
    Failed(String),
    #[error("the pool is closed")]
    Closed,
    /// Long work given up: its caller left, or the pool is closing.
    #[error("{0} cancelled: the caller left or the pool is closing")]
    Cancelled(&'static str),
    /// Recovery found damage in log data that was durable (not a torn
    /// tail) that it cannot attribute or keep: nothing was changed. Opening
    /// with repair drops what is lost; the report says what that is.
    #[error("{}", damaged_message(.0))]
    Damaged(Box<crate::pool::RecoveryReport>),
    /// The pool's device is full: data writes are refused until the cleaner,
    /// a delete, a trim or a bigger device makes room. Reads, deletes and
    /// trims go on.
    #[error(
        "no space left in the pool: writes are refused until space is freed (delete or trim data, or grow the device); {free_bytes} bytes free, {reserve_bytes} held in reserve for the cleaner"
    )]
    PoolFull { free_bytes: u64, reserve_bytes: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    /// True for "no space left on the device": callers answer ENOSPC.
    pub fn is_no_space(&self) -> bool {
        matches!(
            self,
            EngineError::Store(StoreError::NoSpace { .. }) | EngineError::PoolFull { .. }
        )
    }
}

fn damaged_message(r: &crate::pool::RecoveryReport) -> String {
    let first = r.damage.first().map(|d| d.to_string()).unwrap_or_default();
    format!(
        "the pool's log is damaged in data that was durable ({} problem(s); first: {first}); nothing was changed: a check lists what is affected, and a repair opens the pool without what is lost",
        r.damage.len()
    )
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
