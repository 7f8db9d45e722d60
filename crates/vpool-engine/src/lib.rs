//! vpool's storage engine: volumes as extent maps over a log of immutable
//! segments.
//!
//! - [`record`]: the log's on-disk format (segment headers, records).
//! - [`extent_map`]: a volume's map from blocks to segment bytes.
//! - [`checkpoint`]: the whole metadata as of one log position.
//! - [`pool`]: the pool, its volumes, flush and the write path; its
//!   submodules `recovery` (checkpoint fallback, replay, torn tail vs
//!   corruption), `maintenance` (durable marks, checkpoints, the cleaner,
//!   a full device) and `check` (the fsck behind `vpool pool check`).
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
