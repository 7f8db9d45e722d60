//! The pool: volumes on a log of segments.
//!
//! # Write path
//! A write becomes one record per 1 MiB (header, per-block CRC-32C, data)
//! appended to the open segment with one `pwritev`, then the volume's extent
//! map points at the new bytes. Appends and map updates happen under one
//! mutex, so the log order is the order in which writes took effect; that is
//! what makes replay reproduce the state exactly. Checksums of aligned writes
//! are computed before the lock is taken.
//!
//! # Durability
//! A write returns once its bytes are in the open segment (the OS page cache
//! for a local pool): acknowledged, not durable, like a disk's write cache.
//! [`Pool::flush`] syncs every segment that has bytes appended since its last
//! sync, so when it returns every write that returned before it was called
//! is durable. A failed sync poisons the pool for writes (the kernel may have
//! dropped the dirty pages, so a later sync that succeeds proves nothing).
//!
//! # Recovery
//! Load the checkpoint, replay records after its position in log order,
//! stop at the first record that is torn, fails a checksum, or breaks the
//! sequence-number chain; cut the log there, unless a durable mark proves
//! those bytes were synced (then it is damage, reported and kept: see
//! `recovery`). Everything flushed lies before the cut, because a flush
//! syncs the segments in log order before it returns.
//!
//! # Cleaning
//! Each segment counts its live blocks. The cleaner copies the live blocks
//! of mostly-dead sealed segments to the head of the log (conditionally,
//! under the lock, only where the map still points at the old copy), writes
//! a checkpoint, and only then deletes the old segments, waiting for readers
//! that looked up an old location to finish (`delete_gate`).
//!
//! # Where things are
//! - this file: [`PoolConfig`], the types the pool shows outside, the
//!   shared `Inner` and [`Pool::open`];
//! - `state`: the volume table and the pure apply of a log record to it
//!   (the one place a record takes effect, live or at replay);
//! - `log`: appending a record and applying it, rolling segments, flushing;
//! - `volumes`, `snapshots`: the volume and snapshot operations, each one
//!   record;
//! - `handle`: the [`Volume`] handle (reads, writes, trims, block status);
//! - `inspect`: statistics, the self-check, an image's log ranges;
//! - `recovery`, `maintenance` (durable marks, checkpoints, the cleaner, a
//!   full device), `check` (the fsck), `space` (exclusive and shared bytes).
//!
//! # Panics
//! A panic between a record's append and its apply would leave a log that
//! the state does not reflect, and `parking_lot` mutexes do not poison:
//! other threads would go on serving that state. Release builds therefore
//! abort on panic (`panic = "abort"` in the workspace's release profile):
//! the process dies, and the next open rebuilds the state from the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use vpool_store::{SegmentId, SegmentStore};

use crate::checkpoint::LogPosition;
use crate::error::{EngineError, Result};
use crate::record::SEGMENT_HEADER_LEN;
use crate::types::VolumeId;

mod check;
mod handle;
mod inspect;
mod log;
mod maintenance;
mod recovery;
mod snapshots;
mod space;
mod state;
mod volumes;

pub use check::{BadRecord, CheckReport, DamagedRange};
pub use handle::{STATE_HOLE, STATE_ZERO, Volume};
pub use recovery::{Damage, DamageKind, RecoveryReport};

use log::{LogSeg, open_first_segment};
use maintenance::Victim;
use state::State;

/// Tunables of a pool. The defaults suit a local pool.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// A segment is sealed once it holds this many bytes (it may exceed it
    /// by one record). Also the unit the cleaner frees space in.
    pub segment_target_bytes: u64,
    /// A checkpoint is written after this many bytes of log; recovery
    /// replays at most about this much.
    pub checkpoint_interval_bytes: u64,
    /// The cleaner rewrites sealed segments whose live fraction is below this.
    pub clean_below_live_fraction: f64,
    /// The cleaner rewrites at most this many segments a pass, so one pass
    /// is bounded in time and in the new log it writes.
    pub clean_max_segments_per_pass: usize,
    /// The background cleaner runs only while the pool's garbage ratio is
    /// above this: cleaning costs a read and a rewrite of live data, so it
    /// waits until there is space worth taking back.
    pub clean_when_garbage_above: f64,
    /// Run the maintenance thread (background sync, checkpoints, cleaner).
    /// Tests that drive those by hand turn it off.
    pub background: bool,
    /// How often the maintenance thread wakes when there is nothing to do.
    pub maintenance_period: Duration,
    /// The maintenance thread syncs the log and appends a durable mark at
    /// least this often while records are appended (and at every sealed
    /// segment): bit rot in the log before the last mark is reported as
    /// corruption at recovery, only what came after it can pass for a
    /// torn tail. Costs two syncs per period under writes.
    pub durable_mark_interval: Duration,
    /// Open a log whose durable part is damaged (records lost, see
    /// [`DamageKind::LostRecords`]) by stepping over the loss, instead of
    /// refusing with [`EngineError::Damaged`]. For `pool check --repair`.
    pub repair_damaged_log: bool,
}

impl Default for PoolConfig {
    fn default() -> PoolConfig {
        PoolConfig {
            segment_target_bytes: 32 << 20,
            checkpoint_interval_bytes: 256 << 20,
            clean_below_live_fraction: 0.5,
            clean_max_segments_per_pass: 8,
            clean_when_garbage_above: 0.25,
            background: true,
            maintenance_period: Duration::from_millis(200),
            durable_mark_interval: Duration::from_secs(2),
            repair_damaged_log: false,
        }
    }
}

/// What a volume looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    /// Bytes of data stored for this volume (blocks mapped to data).
    pub allocated_bytes: u64,
    /// Bytes mapped as allocated zeros (store nothing).
    pub zero_bytes: u64,
    pub extents: u64,
    /// For a clone: `volume@snapshot` it was cloned from (until flattened).
    pub parent: Option<String>,
    pub snapshots: u64,
    pub ephemeral: bool,
}

/// Options of a new volume.
#[derive(Clone, Copy, Debug, Default)]
pub struct VolumeOptions {
    /// A scratch disk: deleted when the pool is next opened (the daemon also
    /// deletes it when its last NBD client disconnects).
    pub ephemeral: bool,
}

/// What a range of a diff holds in the newer image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiffKind {
    /// Changed data: read it from the newer image.
    Data,
    /// Now reads as zeros (trimmed, zeroed, or past the older image's end).
    Zero,
}

/// One changed range between two images of a volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiffExtent {
    pub offset: u64,
    pub len: u64,
    pub kind: DiffKind,
}

/// Space of one image (a volume or a snapshot): of its data bytes, which
/// no other image refers to (freed if it is deleted) and which it shares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ImageSpace {
    pub allocated_bytes: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
}

/// [`ImageSpace`] of a volume and of each of its snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VolumeSpace {
    pub volume: ImageSpace,
    /// By snapshot name, oldest first.
    pub snapshots: Vec<(String, ImageSpace)>,
}

/// What a snapshot looks like from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    pub size_bytes: u64,
    /// Bytes of data the snapshot refers to (shared with the volume or not).
    pub allocated_bytes: u64,
    /// Log sequence number at which it was taken: orders snapshots.
    pub seq: u64,
}

/// Space and log figures of the whole pool.
#[derive(Clone, Debug, Default)]
pub struct PoolStats {
    pub volumes: u64,
    /// Sum of volume sizes.
    pub logical_bytes: u64,
    /// Bytes of volume data the maps refer to.
    pub live_data_bytes: u64,
    /// Bytes of all segments (what the pool takes on its backend).
    pub physical_bytes: u64,
    pub segments: u64,
    /// Fraction of segment bytes that are not live data (overwritten,
    /// trimmed, deleted, or record overhead).
    pub garbage_ratio: f64,
    /// Free space on the backend's device, if known.
    pub free_bytes: Option<u64>,
    pub extents: u64,
    pub log_bytes_since_checkpoint: u64,
    pub checkpoints_written: u64,
    pub segments_cleaned: u64,
    pub bytes_relocated: u64,
    /// Bytes the store holds back so the cleaner can work on a full device
    /// (0 while released, or for a store that keeps none).
    pub reserve_bytes: u64,
    /// The device is full: data writes fail with ENOSPC until space returns.
    pub full: bool,
    /// Blocks known to fail their checksum that some map points at.
    pub damaged_blocks: u64,
}

/// What one cleaner pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CleanReport {
    pub segments_deleted: u64,
    pub bytes_relocated: u64,
    pub bytes_freed: u64,
}

/// Most damaged ranges named one by one in the log when a pool opens.
const MAX_DAMAGE_LINES: usize = 32;

/// What is known to be damaged (from recovery or a check).
#[derive(Default)]
struct DamageState {
    /// Blocks that fail their checksum: (segment, data offset).
    bad_blocks: std::collections::BTreeSet<(SegmentId, u32)>,
    /// Segments the cleaner leaves alone: relocating them would copy
    /// damage or fail. Kept as evidence until nothing refers to them.
    segments: std::collections::BTreeSet<SegmentId>,
}

/// Figures for [`PoolStats`], counted as things happen.
struct Counters {
    checkpoints_written: AtomicU64,
    segments_cleaned: AtomicU64,
    bytes_relocated: AtomicU64,
}

struct Inner {
    store: Arc<dyn SegmentStore>,
    config: PoolConfig,
    state: Mutex<State>,
    /// Readers hold it shared from map lookup to the end of their reads;
    /// the cleaner holds it exclusively to delete segments.
    delete_gate: RwLock<()>,
    /// One checkpoint or cleaner pass at a time.
    maintenance_lock: Mutex<()>,
    /// Segments whose live data the cleaner has relocated, with the number
    /// of checkpoints captured since. One is deleted once two have been:
    /// then neither checkpoint copy refers to it or replays through it.
    relocated_victims: Mutex<Vec<Victim>>,
    /// Which of [`CHECKPOINT_SLOTS`](crate::checkpoint::CHECKPOINT_SLOTS)
    /// the next checkpoint goes to: never the
    /// one holding the newest good copy.
    next_checkpoint_slot: Mutex<usize>,
    /// The device ran out of space: data writes are refused until the
    /// maintenance thread has freed room and taken the reserve back.
    full: AtomicBool,
    /// Damage known in durable data.
    damage: Mutex<DamageState>,
    /// Size of the last checkpoint written (sizes the reserve).
    last_checkpoint_bytes: AtomicU64,
    shutdown: AtomicBool,
    wake: Condvar,
    wake_lock: Mutex<bool>,
    counters: Counters,
}

/// A pool of volumes on one backend. Cheap to clone; all clones share it.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
    maintenance: Arc<Mutex<Option<JoinHandle<()>>>>,
}

impl Pool {
    /// Opens the pool on `store`, recovering from the checkpoint and the log
    /// (see the `recovery` module). A new, empty store becomes an empty
    /// pool. Damage in durable data that loses records is refused with
    /// [`EngineError::Damaged`] unless `config.repair_damaged_log`.
    pub fn open(
        store: Arc<dyn SegmentStore>,
        config: PoolConfig,
    ) -> Result<(Pool, RecoveryReport)> {
        let started = Instant::now();
        let mut report = RecoveryReport::default();
        let listed = store.list_segments()?;
        let loaded = recovery::load_checkpoint(&*store, &listed, &mut report)?;
        let from = match &loaded.checkpoint {
            Some(c) => c.position,
            None => LogPosition {
                seg: listed.first().map_or(SegmentId(1), |s| s.0),
                offset: SEGMENT_HEADER_LEN,
            },
        };
        let from_checkpoint = loaded.checkpoint.is_some();
        let mut st = recovery::state_from(loaded.checkpoint, &listed, LogSeg::not_open())?;
        let repair = config.repair_damaged_log;
        let mut replay =
            recovery::Replay::new(&*store, &listed, from, from_checkpoint, repair, report);
        replay.run(&mut st)?;
        if replay.refused() {
            return Err(EngineError::Damaged(Box::new(replay.report)));
        }
        let mut full = false;
        with_reserve(&*store, &mut full, || replay.cut_tail(&mut st))?;
        with_reserve(&*store, &mut full, || open_first_segment(&*store, &mut st))?;
        let cut = replay.was_cut();
        let mut report = replay.report;
        report.repaired = repair && report.needs_repair();
        report.duration = started.elapsed();
        st.log.log_bytes_since_checkpoint = report.bytes_replayed;
        let damage = DamageState {
            segments: replay.bad_blocks.iter().map(|b| b.0).collect(),
            bad_blocks: replay.bad_blocks,
        };
        // The slot after the one used; after a cut, both are rewritten so
        // that neither describes the log as it was before the cut.
        let both = cut || report.repaired;
        let slot = loaded.slot.map_or(0, |s| 1 - s);
        let pool = Pool::start(store, config, st, slot, damage, full);
        pool.after_open(both)?;
        tracing::info!(
            records = report.records_replayed,
            bytes = report.bytes_replayed,
            torn_tail_bytes = report.torn_tail_bytes,
            damage = report.damage.len(),
            checkpoint = report.checkpoint_slot.unwrap_or("none"),
            ms = report.duration.as_millis() as u64,
            "pool recovered"
        );
        pool.log_damaged_ranges();
        Ok((pool, report))
    }

    /// Names, after recovery, each volume and snapshot range whose data
    /// fails its checksum (recovery's own lines name segments and internal
    /// volume ids, which an operator cannot act on). At most
    /// [`MAX_DAMAGE_LINES`] lines.
    fn log_damaged_ranges(&self) {
        let ranges = self.damaged_ranges();
        for r in ranges.iter().take(MAX_DAMAGE_LINES) {
            tracing::error!(image = %r.image, offset_bytes = r.offset_bytes, len_bytes = r.len_bytes,
                segment = %r.segment, "damaged data: reads of this range fail until it is rewritten (`vpool pool check --repair` trims it)");
        }
        if ranges.len() > MAX_DAMAGE_LINES {
            let more = ranges.len() - MAX_DAMAGE_LINES;
            tracing::error!(
                more,
                "more damaged ranges: `vpool pool check` lists them all"
            );
        }
    }

    fn start(
        store: Arc<dyn SegmentStore>,
        config: PoolConfig,
        st: State,
        slot: usize,
        damage: DamageState,
        full: bool,
    ) -> Pool {
        let inner = Arc::new(Inner {
            store,
            config,
            state: Mutex::new(st),
            delete_gate: RwLock::new(()),
            maintenance_lock: Mutex::new(()),
            relocated_victims: Mutex::new(Vec::new()),
            next_checkpoint_slot: Mutex::new(slot),
            full: AtomicBool::new(full),
            damage: Mutex::new(damage),
            last_checkpoint_bytes: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
            counters: Counters {
                checkpoints_written: AtomicU64::new(0),
                segments_cleaned: AtomicU64::new(0),
                bytes_relocated: AtomicU64::new(0),
            },
        });
        Pool {
            inner,
            maintenance: Arc::new(Mutex::new(None)),
        }
    }

    /// The rest of opening, on a running pool: scratch disks go, a
    /// checkpoint makes the next recovery start here, the reserve is taken
    /// and the maintenance thread starts.
    fn after_open(&self, both_checkpoint_slots: bool) -> Result<()> {
        let ephemeral: Vec<String> = {
            let st = self.inner.state.lock();
            let eph = st.table.volumes.values().filter(|v| v.ephemeral);
            eph.map(|v| v.name.clone()).collect()
        };
        for name in ephemeral {
            match self.delete_volume(&name) {
                Ok(()) => tracing::info!(volume = %name, "deleted ephemeral volume at open"),
                Err(e) => {
                    tracing::warn!(volume = %name, error = %e, "could not delete ephemeral volume")
                }
            }
        }
        let rounds = if both_checkpoint_slots { 2 } else { 1 };
        for _ in 0..rounds {
            match self.checkpoint() {
                Ok(()) => {}
                // Recovery needs no checkpoint to be right, only to be short:
                // a full device must not keep the pool from opening.
                Err(e) if e.is_no_space() => {
                    self.enter_full(&e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if !self.inner.full.load(Ordering::Acquire) {
            self.restore_reserve();
        }
        if self.inner.config.background {
            let p = self.clone();
            let h = std::thread::Builder::new()
                .name("vpool-maintenance".into())
                .spawn(move || p.maintenance_loop())
                .map_err(|e| {
                    EngineError::Store(vpool_store::StoreError::io(
                        "spawning the maintenance thread",
                        e,
                    ))
                })?;
            *self.maintenance.lock() = Some(h);
        }
        Ok(())
    }
}

/// Runs `op`; if the device is full, gives the store's reserve back and
/// runs it once more (setting `full`). Opening must work on a full device.
fn with_reserve<T>(
    store: &dyn SegmentStore,
    full: &mut bool,
    mut op: impl FnMut() -> Result<T>,
) -> Result<T> {
    match op() {
        Err(e) if e.is_no_space() && store.reserve_bytes() > 0 => {
            let freed = store.release_reserve()?;
            tracing::warn!(freed_bytes = freed, error = %e, "device full while opening the pool; released the reserve");
            *full = true;
            op()
        }
        r => r,
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
}
