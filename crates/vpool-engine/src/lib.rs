//! vpool's storage engine: volumes as extent maps over a log of immutable
//! segments.
//!
//! - [`record`]: the log's on-disk format (segment headers, records) and
//!   [`record::LogRecord`], the typed form the engine builds and applies.
//! - [`extent_map`]: a volume's map from blocks to segment bytes.
//! - [`checkpoint`]: the whole metadata as of one log position.
//! - [`pool`]: the pool; its module doc says where each part lives (the
//!   volume table and the apply of a record, the log, volumes, snapshots,
//!   the `Volume` handle, recovery, maintenance, the fsck, space).
//!
//! A panic aborts a release build (see `pool`'s module doc): the state
//! lock does not poison, so unwinding could leave a half-applied record
//! for other threads to serve.
//!
//! The engine talks to its backend only through
//! [`vpool_store::SegmentStore`], so the same engine runs on a local
//! directory, an object store, or the crash-simulating store in tests.

pub mod checkpoint;
pub mod error;
pub mod extent_map;
pub mod pool;
pub mod record;
pub mod types;

pub use error::{EngineError, Result};
pub use pool::{
    BadRecord, CheckReport, CleanReport, Damage, DamageKind, DamagedRange, DiffExtent, DiffKind,
    ImageSpace, Pool, PoolConfig, PoolStats, RecoveryReport, STATE_HOLE, STATE_ZERO, SnapshotInfo,
    Volume, VolumeInfo, VolumeOptions, VolumeSpace,
};
pub use types::{BLOCK_SIZE, MAX_VOLUME_SIZE_BYTES, VolumeId};
pub use vpool_store as store;
