//! Storage backends for vpool pools.
//!
//! The engine sees its backend through two small capability traits:
//!
//! - [`SegmentStore`]: named, append-only *segments* (the log) that become
//!   immutable once sealed, plus a handful of small, atomically replaced
//!   *metadata blobs* (the checkpoint). Reads are positional range reads.
//! - [`OpenSegment`]: the one segment being appended to. `append` makes bytes
//!   readable at once; `sync` makes every byte appended before it durable.
//!
//! This is the whole contract an object store has to meet: whole-object
//! put of sealed segments, range GET, list, delete, and atomic replacement
//! of small blobs. The local directory backend ([`LocalDirStore`]) maps a
//! segment to a file; the simulated backend ([`SimStore`]) keeps bytes in
//! memory and tracks which of them are durable, so crash tests can drop every
//! unsynced byte at any instant.

mod local;
mod sim;

pub use local::LocalDirStore;
pub use sim::{SimCrashMode, SimStore};

use std::fmt;
use std::io;

/// Bytes at the start of every segment that the engine writes when it
/// creates the segment (its header) and that nothing refers to: a segment
/// this long holds nothing yet. A store that holds back metadata until the
/// segments it refers to are shipped (the S3 store) needs to know this,
/// since the engine's checkpoint may be taken at the start of an open
/// segment that receives no record for a long time (an idle pool).
pub const SEGMENT_HEADER_BYTES: u64 = 64;

/// Identifies one segment of the log. Segment ids grow monotonically and are
/// never reused, so a stale file can never be mistaken for a newer segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u64);

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seg-{:016x}", self.0)
    }
}

/// What went wrong in a backend.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{what} already exists")]
    AlreadyExists { what: String },
    #[error("read of {len} bytes at offset {offset} is past the end of {segment} ({size} bytes)")]
    ShortRead {
        segment: SegmentId,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("no space left on the pool's device while {context}")]
    NoSpace {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("I/O error while {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("pool at {path} is in use by another process (lock held on {lock_file})")]
    Locked { path: String, lock_file: String },
    #[error("simulated crash: the store is down")]
    Crashed,
    /// Another host took the pool over (its manifest generation is newer):
    /// this process must never write to the pool again.
    #[error("fenced: {detail}")]
    Fenced { detail: String },
    /// The backing object store did not answer in time, or kept failing.
    #[error("object store unavailable while {context}: {detail}")]
    Unavailable { context: String, detail: String },
}

impl StoreError {
    /// Wraps an `io::Error`, classifying "no space left" so callers can
    /// answer ENOSPC rather than EIO.
    pub fn io(context: impl Into<String>, source: io::Error) -> StoreError {
        let context = context.into();
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.raw_os_error() == Some(libc::EDQUOT)
        {
            StoreError::NoSpace { context, source }
        } else {
            StoreError::Io { context, source }
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The segment currently being appended to.
pub trait OpenSegment: Send + Sync {
    fn id(&self) -> SegmentId;
    /// Writes `bufs` back to back at `offset`. The bytes are readable through
    /// [`SegmentStore::read_at`] as soon as this returns, durable only after
    /// [`OpenSegment::sync`].
    fn append_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()>;
    /// Makes every byte appended before this call durable, including the
    /// segment's existence (directory entry) the first time.
    fn sync(&self) -> Result<()>;
}

/// A pool's backend: the log's segments and its metadata blobs.
pub trait SegmentStore: Send + Sync {
    /// Creates segment `id`, empty, for appending. Fails if it exists.
    fn create_segment(&self, id: SegmentId) -> Result<Box<dyn OpenSegment>>;
    /// Reads exactly `buf.len()` bytes at `offset` of a segment, open or sealed.
    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Every segment with its current length, in id order.
    fn list_segments(&self) -> Result<Vec<(SegmentId, u64)>>;
    /// Cuts a segment to `len` bytes, durably. Used once, at recovery, to drop
    /// the torn tail of the segment that was open when the pool crashed.
    fn truncate_segment(&self, id: SegmentId, len: u64) -> Result<()>;
    /// Removes a sealed segment that nothing refers to any more.
    fn delete_segment(&self, id: SegmentId) -> Result<()>;
    /// Replaces metadata blob `name` atomically and durably: after a crash,
    /// a reader sees either the old or the new content in full.
    fn put_meta(&self, name: &str, data: &[u8]) -> Result<()>;
    /// Reads metadata blob `name`, `None` if it was never written.
    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>>;
    /// Bytes still free on the device or in the quota, if known.
    fn free_bytes(&self) -> Option<u64> {
        None
    }
    /// Called before a write of `bytes` bytes of data, outside the engine's
    /// lock. A store whose write-back space is full blocks here (back-
    /// pressure), so the engine never waits for space while holding its
    /// lock; it fails only after the store's own timeout.
    fn admit_write(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }
    /// Called before a flush, outside the engine's lock. A store that may
    /// not make writes durable right now (an object store's lease that
    /// could not be renewed) refuses here: unlike a failed sync, which
    /// stops the pool's writes for good, the refusal is the flush's alone.
    fn admit_flush(&self) -> Result<()> {
        Ok(())
    }
    /// Called before a read or a block-status query, which may be answered
    /// without the store (holes): a store whose data may be stale (an
    /// object store's lapsed lease) refuses here.
    fn admit_read(&self) -> Result<()> {
        Ok(())
    }
    /// A store that ships sealed segments elsewhere (an object store) asks
    /// the engine to seal the open segment once it has held data this long,
    /// which bounds how far the remote copy lags. `None`: seal by size only.
    fn seal_after(&self) -> Option<std::time::Duration> {
        None
    }
    /// Bytes the store holds back now for the pool's own use on a full
    /// device (see [`SegmentStore::restore_reserve`]); 0 if it keeps none.
    fn reserve_bytes(&self) -> u64 {
        0
    }
    /// Gives the reserve back to the device so that the cleaner, deletes
    /// and trims can write on a full device. Returns the bytes released.
    fn release_reserve(&self) -> Result<u64> {
        Ok(0)
    }
    /// Holds back `bytes` of the device (grows or shrinks the reserve to
    /// it), so that a full device still has room for the pool to free
    /// space. Fails with [`StoreError::NoSpace`] if the device cannot spare
    /// them now.
    fn restore_reserve(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }
    /// Whether every byte the engine synced through this store is still in
    /// the segments it lists, so that the engine's durable marks hold. A
    /// store rebuilt from a remote copy that lags (a pool on S3 whose cache
    /// was lost) answers false: a break in its log is where the remote
    /// copy ends, not damage, and recovery takes it for a torn tail.
    fn durable_marks_hold(&self) -> bool {
        true
    }
    /// Makes the effect of earlier [`SegmentStore::delete_segment`] calls
    /// durable, so that a deleted segment cannot come back after a crash.
    fn sync_deletions(&self) -> Result<()> {
        Ok(())
    }
}
