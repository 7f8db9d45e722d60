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
//! sequence-number chain; cut the log there. Everything flushed lies before
//! that point, because a flush syncs the segments in log order before it
//! returns.
//!
//! # Cleaning
//! Each segment counts its live blocks. The cleaner copies the live blocks
//! of mostly-dead sealed segments to the head of the log (conditionally,
//! under the lock, only where the map still points at the old copy), writes
//! a checkpoint, and only then deletes the old segments, waiting for readers
//! that looked up an old location to finish (`delete_gate`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, RwLock};
use vpool_ratelog::{LOG_PERIOD, RateLimitedLog};
use vpool_store::{OpenSegment, SegmentId, SegmentStore};

use crate::checkpoint::{Checkpoint, LogPosition, SnapshotCheckpoint, VolumeCheckpoint};
use crate::error::{EngineError, Result};
use crate::extent_map::{DataLoc, ExtentMap, Piece, Target};
use crate::record::{self, Blocks, CRC_LEN, LogRecord, MAX_RECORD_BLOCKS, SEGMENT_HEADER_LEN};
use crate::types::{BLOCK_SIZE, VolumeId, validate_volume_name, validate_volume_size};

mod check;
mod maintenance;
mod recovery;
mod space;

pub use check::{BadRecord, CheckReport, DamagedRange};
pub use recovery::{Damage, DamageKind, RecoveryReport};

/// NBD `base:allocation` flag: the range is a hole (unallocated).
pub const STATE_HOLE: u32 = 1;
/// NBD `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;

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

/// A segment of the log that may still need syncing.
struct LogSeg {
    handle: Box<dyn OpenSegment>,
    /// Bytes appended (set under the state lock after each append).
    appended: AtomicU64,
    /// Bytes known durable.
    synced: AtomicU64,
}

impl LogSeg {
    fn id(&self) -> SegmentId {
        self.handle.id()
    }

    fn sync_if_needed(&self) -> Result<()> {
        let target = self.appended.load(Ordering::Acquire);
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        self.handle.sync()?;
        self.synced.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire) >= self.appended.load(Ordering::Acquire)
    }
}

struct Vol {
    name: String,
    size_bytes: u64,
    map: ExtentMap,
    data_blocks: u64,
    zero_blocks: u64,
    /// Frozen copies of the map, by name.
    snapshots: BTreeMap<String, Snap>,
    /// For a clone: the volume and snapshot it was cloned from. Kept so that
    /// snapshot a clone came from is not deleted under it by mistake; the
    /// clone shares blocks with it but does not read through it.
    parent: Option<(VolumeId, String)>,
    /// Deleted when the pool is next opened (scratch disks).
    ephemeral: bool,
}

/// A snapshot: the volume's map, size and counters when it was taken.
#[derive(Clone)]
struct Snap {
    size_bytes: u64,
    map: ExtentMap,
    data_blocks: u64,
    zero_blocks: u64,
    /// The log sequence number of the record that took it.
    seq: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct SegInfo {
    size_bytes: u64,
    /// Block references into this segment, summed over every map (volumes
    /// and snapshots). Only exact when `State::pending_refs` is empty: a new
    /// snapshot's references are counted later, off the caller's path.
    refs: i64,
}

struct State {
    volumes: BTreeMap<VolumeId, Vol>,
    names: BTreeMap<String, VolumeId>,
    open: Arc<LogSeg>,
    /// Sealed segments not yet known durable, oldest first.
    unsynced: Vec<Arc<LogSeg>>,
    segments: BTreeMap<SegmentId, SegInfo>,
    next_seq: u64,
    next_volume_id: u64,
    next_segment_id: u64,
    log_bytes_since_checkpoint: u64,
    /// Set when a sync failed: writes are refused from then on.
    failed: Option<String>,
    /// Set by [`Pool::close`]: every later write or flush fails with
    /// [`EngineError::Closed`].
    closed: bool,
    /// Set when an append failed: the open segment may hold a partial
    /// record past its end, so the next append starts a new segment.
    roll_before_next_append: bool,
    /// A segment created by a roll whose header could not be written (a
    /// full device): the next roll writes its header instead of creating
    /// another, so no id is skipped and nothing is left behind.
    half_rolled: Option<Box<dyn OpenSegment>>,
    /// When the open segment got its first record; the store may ask for it
    /// to be sealed after a while ([`SegmentStore::seal_after`]).
    open_since: Option<Instant>,
    /// Records other than marks appended since the last durable mark was
    /// (a mark is due only when there is something new to vouch for:
    /// rolls and marks alone never call for one, or an idle pool on an
    /// object store would seal and ship a segment holding one mark after
    /// another).
    records_since_mark: u64,
    /// The position the last durable mark vouched for.
    marked_to: Option<LogPosition>,
    /// When the last durable mark was appended.
    last_mark: Option<Instant>,
    /// Maps whose references are still to be added (+1) or removed (-1)
    /// from the segments' counts, in order. Taking a snapshot or a clone
    /// costs O(1) because its O(extents) counting waits here until the
    /// maintenance thread (or anything that reads the counts) applies it.
    pending_refs: Vec<(ExtentMap, i64)>,
}

/// Where a record lies in the log, and its sequence number.
#[derive(Clone, Copy, Debug)]
struct RecordAt {
    seg: SegmentId,
    off: u64,
    seq: u64,
}

/// A segment the cleaner emptied, waiting for deletion.
#[derive(Clone, Copy, Debug)]
struct Victim {
    id: SegmentId,
    /// Checkpoints captured since its live data was relocated.
    checkpoints: u32,
    /// When its live data was relocated.
    since: Instant,
}

/// What is known to be damaged (from recovery or a check).
#[derive(Default)]
struct DamageState {
    /// Blocks that fail their checksum: (segment, data offset).
    bad_blocks: std::collections::BTreeSet<(SegmentId, u32)>,
    /// Segments the cleaner leaves alone: relocating them would copy
    /// damage or fail. Kept as evidence until nothing refers to them.
    segments: std::collections::BTreeSet<SegmentId>,
}

/// Stands in for the open segment while recovery rebuilds the state.
struct NotOpen;

impl OpenSegment for NotOpen {
    fn id(&self) -> SegmentId {
        SegmentId(0)
    }
    fn append_at(&self, _offset: u64, _bufs: &[&[u8]]) -> vpool_store::Result<()> {
        unreachable!("recovery appends nothing before the log is open")
    }
    fn sync(&self) -> vpool_store::Result<()> {
        Ok(())
    }
}

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
    /// Which of [`CHECKPOINT_SLOTS`] the next checkpoint goes to: never the
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

fn vol_not_found(id: VolumeId) -> EngineError {
    EngineError::VolumeNotFound(id.to_string())
}

impl State {
    fn check_writable(&self) -> Result<()> {
        if self.closed {
            return Err(EngineError::Closed);
        }
        if let Some(f) = &self.failed {
            return Err(EngineError::Failed(f.clone()));
        }
        Ok(())
    }

    fn vol(&self, id: VolumeId) -> Result<&Vol> {
        self.volumes.get(&id).ok_or_else(|| vol_not_found(id))
    }

    fn vol_mut(&mut self, id: VolumeId) -> Result<&mut Vol> {
        self.volumes.get_mut(&id).ok_or_else(|| vol_not_found(id))
    }

    /// Maps blocks of a volume, keeping every counter in step.
    fn set_blocks(&mut self, id: VolumeId, start: u64, len: u64, target: Option<Target>) {
        let State {
            volumes, segments, ..
        } = self;
        let vol = volumes
            .get_mut(&id)
            .expect("caller checked the volume exists");
        let mut data_gone = 0u64;
        let mut zero_gone = 0u64;
        vol.map.set(start, len, target, &mut |t, n| match t {
            Target::Zero => zero_gone += n,
            Target::Data(d) => {
                data_gone += n;
                segments
                    .get_mut(&d.seg)
                    .expect("mapped segment is known")
                    .refs -= n as i64;
            }
        });
        vol.data_blocks -= data_gone;
        vol.zero_blocks -= zero_gone;
        match target {
            Some(Target::Data(d)) => {
                vol.data_blocks += len;
                segments.get_mut(&d.seg).expect("segment is known").refs += len as i64;
            }
            Some(Target::Zero) => vol.zero_blocks += len,
            None => {}
        }
    }

    /// Counts (or uncounts) every data block of `map` in its segment.
    fn count_refs(segments: &mut BTreeMap<SegmentId, SegInfo>, map: &ExtentMap, sign: i64) {
        for p in map.iter() {
            if let Some(Target::Data(d)) = p.target {
                segments
                    .get_mut(&d.seg)
                    .expect("mapped segment is known")
                    .refs += sign * p.len_blocks as i64;
            }
        }
    }

    /// Applies the deferred reference counting; afterwards every segment's
    /// count is exact.
    fn apply_pending_refs(&mut self) {
        for (map, sign) in std::mem::take(&mut self.pending_refs) {
            State::count_refs(&mut self.segments, &map, sign);
        }
        debug_assert!(self.segments.values().all(|s| s.refs >= 0));
    }

    /// (live data bytes, segment bytes, garbage ratio) of the pool. A block
    /// shared by several maps (snapshots, clones) counts once per map here:
    /// live bytes are an upper bound.
    fn space(&mut self) -> (u64, u64, f64) {
        self.apply_pending_refs();
        let physical: u64 = self.segments.values().map(|s| s.size_bytes).sum();
        let refs: i64 = self.segments.values().map(|s| s.refs).sum();
        let live = refs.max(0) as u64 * BLOCK_SIZE;
        let ratio = if physical == 0 {
            0.0
        } else {
            (1.0 - live as f64 / physical as f64).max(0.0)
        };
        (live, physical, ratio)
    }

    /// Every map of the pool: volumes and their snapshots.
    fn all_maps_mut(&mut self) -> impl Iterator<Item = &mut ExtentMap> {
        self.volumes.values_mut().flat_map(|v| {
            std::iter::once(&mut v.map).chain(v.snapshots.values_mut().map(|s| &mut s.map))
        })
    }

    /// Applies a record (live, right after its append, or replayed) that
    /// lies at `at` in the log: changes volumes, snapshots and reference
    /// counts the way it says, and nothing else.
    fn apply(&mut self, at: RecordAt, rec: &LogRecord<'_>) -> Result<()> {
        match *rec {
            LogRecord::Write {
                volume,
                block,
                blocks,
            } => {
                let n = blocks.nblocks();
                self.check_record_range(volume, block, n)?;
                let loc = record::data_loc(at.seg, at.off, n);
                self.set_blocks(volume, block, u64::from(n), Some(Target::Data(loc)));
            }
            LogRecord::Zero {
                volume,
                block,
                nblocks,
            } => {
                self.check_record_range(volume, block, nblocks)?;
                self.set_blocks(volume, block, u64::from(nblocks), Some(Target::Zero));
            }
            LogRecord::Trim {
                volume,
                block,
                nblocks,
            } => {
                self.check_record_range(volume, block, nblocks)?;
                self.set_blocks(volume, block, u64::from(nblocks), None);
            }
            LogRecord::CreateVolume {
                volume,
                size_bytes,
                name,
                ephemeral,
            } => self.create_volume(volume, size_bytes, name, ephemeral)?,
            LogRecord::ResizeVolume { volume, size_bytes } => {
                self.resize_volume(volume, size_bytes)?
            }
            LogRecord::DeleteVolume { volume } => self.delete_volume(volume)?,
            LogRecord::CreateSnapshot { volume, name } => {
                self.create_snapshot(volume, name, at.seq)?
            }
            LogRecord::DeleteSnapshot { volume, name } => self.delete_snapshot(volume, name)?,
            LogRecord::Rollback { volume, snapshot } => self.rollback(volume, snapshot)?,
            LogRecord::CloneVolume {
                volume,
                source,
                name,
                snapshot,
            } => self.clone_volume(volume, source, name, snapshot)?,
            LogRecord::Relocate {
                block, blocks, old, ..
            } => self.apply_relocate(at, block, blocks.nblocks(), old, &[]),
            LogRecord::FlattenVolume { volume } => self.vol_mut(volume)?.parent = None,
            LogRecord::CommitVolume { volume } => self.commit(volume)?,
            // A mark changes no volume: only recovery reads it.
            LogRecord::Mark { .. } => {}
        }
        Ok(())
    }

    fn create_volume(
        &mut self,
        id: VolumeId,
        size_bytes: u64,
        name: &str,
        ephemeral: bool,
    ) -> Result<()> {
        if self.volumes.contains_key(&id) || self.names.contains_key(name) {
            return Err(meta_error("create record", "volume exists"));
        }
        self.names.insert(name.to_string(), id);
        let vol = Vol {
            name: name.to_string(),
            size_bytes,
            map: ExtentMap::new(),
            data_blocks: 0,
            zero_blocks: 0,
            snapshots: BTreeMap::new(),
            parent: None,
            ephemeral,
        };
        self.volumes.insert(id, vol);
        self.next_volume_id = self.next_volume_id.max(id.0 + 1);
        Ok(())
    }

    fn resize_volume(&mut self, id: VolumeId, size_bytes: u64) -> Result<()> {
        let old = self.vol(id)?.size_bytes;
        if size_bytes < old {
            let start = size_bytes / BLOCK_SIZE;
            self.set_blocks(id, start, old / BLOCK_SIZE - start, None);
        }
        self.vol_mut(id)?.size_bytes = size_bytes;
        Ok(())
    }

    fn delete_volume(&mut self, id: VolumeId) -> Result<()> {
        let size = self.vol(id)?.size_bytes;
        if size > 0 {
            self.set_blocks(id, 0, size / BLOCK_SIZE, None);
        }
        let vol = self.volumes.remove(&id).expect("checked");
        self.names.remove(&vol.name);
        for snap in vol.snapshots.into_values() {
            self.pending_refs.push((snap.map, -1));
        }
        Ok(())
    }

    /// Freezes the volume's map under `name`; `seq` is the record's.
    fn create_snapshot(&mut self, id: VolumeId, name: &str, seq: u64) -> Result<()> {
        let vol = self.vol_mut(id)?;
        if vol.snapshots.contains_key(name) {
            return Err(meta_error("snapshot record", "snapshot exists"));
        }
        let snap = Snap {
            size_bytes: vol.size_bytes,
            map: vol.map.clone(),
            data_blocks: vol.data_blocks,
            zero_blocks: vol.zero_blocks,
            seq,
        };
        vol.snapshots.insert(name.to_string(), snap.clone());
        self.pending_refs.push((snap.map, 1));
        Ok(())
    }

    fn delete_snapshot(&mut self, id: VolumeId, name: &str) -> Result<()> {
        let snap = self
            .vol_mut(id)?
            .snapshots
            .remove(name)
            .ok_or_else(|| meta_error("snapshot record", "no such snapshot"))?;
        self.pending_refs.push((snap.map, -1));
        Ok(())
    }

    /// The volume takes its snapshot's map, size and counters.
    fn rollback(&mut self, id: VolumeId, snapshot: &str) -> Result<()> {
        let vol = self.vol_mut(id)?;
        let snap = vol
            .snapshots
            .get(snapshot)
            .ok_or_else(|| meta_error("rollback record", "no such snapshot"))?
            .clone();
        let old = std::mem::replace(&mut vol.map, snap.map.clone());
        vol.size_bytes = snap.size_bytes;
        vol.data_blocks = snap.data_blocks;
        vol.zero_blocks = snap.zero_blocks;
        // Increments first, so no count dips below zero.
        self.pending_refs.push((snap.map, 1));
        self.pending_refs.push((old, -1));
        Ok(())
    }

    /// A new volume `id` whose map starts as `source`'s snapshot's.
    fn clone_volume(
        &mut self,
        id: VolumeId,
        source: VolumeId,
        name: &str,
        snapshot: &str,
    ) -> Result<()> {
        if self.volumes.contains_key(&id) || self.names.contains_key(name) {
            return Err(meta_error("clone record", "volume exists"));
        }
        let snap = self
            .vol(source)?
            .snapshots
            .get(snapshot)
            .ok_or_else(|| meta_error("clone record", "no such snapshot"))?
            .clone();
        self.pending_refs.push((snap.map.clone(), 1));
        self.names.insert(name.to_string(), id);
        let vol = Vol {
            name: name.to_string(),
            size_bytes: snap.size_bytes,
            map: snap.map,
            data_blocks: snap.data_blocks,
            zero_blocks: snap.zero_blocks,
            snapshots: BTreeMap::new(),
            parent: Some((source, snapshot.to_string())),
            ephemeral: false,
        };
        self.volumes.insert(id, vol);
        self.next_volume_id = self.next_volume_id.max(id.0 + 1);
        Ok(())
    }

    /// The clone's parent volume takes the clone's map, size and counters.
    fn commit(&mut self, id: VolumeId) -> Result<()> {
        let clone = self.vol(id)?;
        let (parent, _) = clone
            .parent
            .clone()
            .ok_or_else(|| meta_error("commit record", "not a clone"))?;
        let (map, size, data, zero) = (
            clone.map.clone(),
            clone.size_bytes,
            clone.data_blocks,
            clone.zero_blocks,
        );
        let p = self.vol_mut(parent)?;
        let old = std::mem::replace(&mut p.map, map.clone());
        p.size_bytes = size;
        p.data_blocks = data;
        p.zero_blocks = zero;
        // Increments first, so no count dips below zero.
        self.pending_refs.push((map, 1));
        self.pending_refs.push((old, -1));
        Ok(())
    }

    /// Applies a relocate record at `at` that copied `nblocks` blocks from
    /// `old` (blocks `block..` of the maps that point there), except the
    /// blocks at the indexes in `skip` (whose copy failed its checksum):
    /// maps pointing at those keep the original.
    fn apply_relocate(
        &mut self,
        at: RecordAt,
        block: u64,
        nblocks: u32,
        old: DataLoc,
        skip: &[u32],
    ) {
        // Counts must be exact before maps change under them.
        self.apply_pending_refs();
        let new = record::data_loc(at.seg, at.off, nblocks);
        let (b, n) = (block, u64::from(nblocks));
        let mut moved = 0i64;
        for map in self.all_maps_mut() {
            for p in map.lookup(b, n) {
                let Some(Target::Data(d)) = p.target else {
                    continue;
                };
                let k = p.start_block - b;
                if d != old.advance(k) {
                    continue;
                }
                for (start, len) in runs_without(k, p.len_blocks, skip) {
                    map.set(
                        b + start,
                        len,
                        Some(Target::Data(new.advance(start))),
                        &mut |_, _| {},
                    );
                    moved += len as i64;
                }
            }
        }
        if let Some(s) = self.segments.get_mut(&old.seg) {
            s.refs -= moved;
        }
        self.segments
            .get_mut(&at.seg)
            .expect("segment is known")
            .refs += moved;
    }

    fn check_record_range(&self, volume: VolumeId, block: u64, nblocks: u32) -> Result<()> {
        let vol = self.vol(volume)?;
        let end = block + u64::from(nblocks);
        if end > vol.size_bytes / BLOCK_SIZE {
            return Err(meta_error("record", "block range past the volume's end"));
        }
        Ok(())
    }
}

fn meta_error(what: &str, detail: &'static str) -> EngineError {
    EngineError::CorruptMeta {
        what: what.to_string(),
        source: record::DecodeError::Inconsistent(detail),
    }
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
        let placeholder = Arc::new(LogSeg {
            handle: Box::new(NotOpen),
            appended: AtomicU64::new(0),
            synced: AtomicU64::new(0),
        });
        let mut st = recovery::state_from(loaded.checkpoint, &listed, placeholder)?;
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
        st.log_bytes_since_checkpoint = report.bytes_replayed;
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
        Ok((pool, report))
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
            let eph = st.volumes.values().filter(|v| v.ephemeral);
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

    // ----- volumes -----

    /// Creates a thin volume: it takes no space until written. Durable on
    /// return.
    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        self.create_volume_with(name, size_bytes, VolumeOptions::default())
    }

    /// [`Pool::create_volume`] with options (an ephemeral scratch disk).
    pub fn create_volume_with(
        &self,
        name: &str,
        size_bytes: u64,
        options: VolumeOptions,
    ) -> Result<VolumeInfo> {
        validate_volume_name(name).map_err(|why| EngineError::Invalid {
            what: "volume name",
            why,
        })?;
        validate_volume_size(size_bytes).map_err(|why| EngineError::Invalid {
            what: "volume size",
            why,
        })?;
        self.durable_op(|st| {
            if st.names.contains_key(name) {
                return Err(EngineError::VolumeExists(name.to_string()));
            }
            let id = VolumeId(st.next_volume_id);
            st.next_volume_id += 1;
            let rec = LogRecord::CreateVolume {
                volume: id,
                size_bytes,
                name,
                ephemeral: options.ephemeral,
            };
            self.append_and_apply(st, rec)?;
            Ok(info_of(st, id, st.vol(id)?))
        })
    }

    /// Changes a volume's size. Shrinking drops the data past the new end
    /// and is refused unless `allow_shrink`. Durable on return.
    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
    ) -> Result<VolumeInfo> {
        validate_volume_size(size_bytes).map_err(|why| EngineError::Invalid {
            what: "volume size",
            why,
        })?;
        self.durable_op(|st| {
            let id = lookup_name(st, name)?;
            let old = st.vol(id)?.size_bytes;
            if size_bytes < old && !allow_shrink {
                return Err(EngineError::ShrinkRefused {
                    volume: name.to_string(),
                    from_bytes: old,
                    to_bytes: size_bytes,
                });
            }
            if size_bytes != old {
                let rec = LogRecord::ResizeVolume {
                    volume: id,
                    size_bytes,
                };
                self.append_and_apply(st, rec)?;
            }
            Ok(info_of(st, id, st.vol(id)?))
        })
    }

    /// Deletes a volume; its space is reclaimed by the cleaner. Durable on
    /// return.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        self.durable_op(|st| {
            let id = lookup_name(st, name)?;
            let clones = clones_of(st, id, None);
            if !clones.is_empty() {
                return Err(EngineError::InUse {
                    what: format!("volume {name} (its snapshots)"),
                    users: clones,
                });
            }
            self.append_and_apply(st, LogRecord::DeleteVolume { volume: id })?;
            Ok(())
        })?;
        self.wake_maintenance();
        Ok(())
    }

    /// Takes snapshot `snapshot` of `volume`: it holds exactly the writes
    /// completed before this call. O(1) whatever the volume's size (the map
    /// is a persistent tree); durable on return.
    pub fn create_snapshot(&self, volume: &str, snapshot: &str) -> Result<SnapshotInfo> {
        validate_volume_name(snapshot).map_err(|why| EngineError::Invalid {
            what: "snapshot name",
            why,
        })?;
        self.durable_op(|st| {
            let id = lookup_name(st, volume)?;
            if st.vol(id)?.snapshots.contains_key(snapshot) {
                return Err(EngineError::SnapshotExists {
                    volume: volume.to_string(),
                    snapshot: snapshot.to_string(),
                });
            }
            let rec = LogRecord::CreateSnapshot {
                volume: id,
                name: snapshot,
            };
            self.append_and_apply(st, rec)?;
            Ok(snapshot_info(
                volume,
                snapshot,
                &st.vol(id)?.snapshots[snapshot],
            ))
        })
    }

    /// The snapshots of `volume`, oldest first.
    pub fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>> {
        let st = self.inner.state.lock();
        let id = lookup_name(&st, volume)?;
        let mut v: Vec<SnapshotInfo> = st
            .vol(id)?
            .snapshots
            .iter()
            .map(|(n, s)| snapshot_info(volume, n, s))
            .collect();
        v.sort_by_key(|s| s.seq);
        Ok(v)
    }

    /// Deletes a snapshot; its blocks that nothing else uses are reclaimed by
    /// the cleaner. Refused while a clone was made from it.
    pub fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        self.durable_op(|st| {
            let id = lookup_name(st, volume)?;
            snap_of(st, id, volume, snapshot)?;
            let clones = clones_of(st, id, Some(snapshot));
            if !clones.is_empty() {
                return Err(EngineError::InUse {
                    what: format!("snapshot {volume}@{snapshot}"),
                    users: clones,
                });
            }
            let rec = LogRecord::DeleteSnapshot {
                volume: id,
                name: snapshot,
            };
            self.append_and_apply(st, rec)?;
            Ok(())
        })?;
        self.wake_maintenance();
        Ok(())
    }

    /// Makes `volume` equal to its snapshot (content and size). A metadata
    /// operation: no data is copied. Durable on return. Later snapshots are
    /// kept. Whether clients have the volume open is the caller's concern.
    pub fn rollback(&self, volume: &str, snapshot: &str) -> Result<VolumeInfo> {
        self.durable_op(|st| {
            let id = lookup_name(st, volume)?;
            snap_of(st, id, volume, snapshot)?;
            self.append_and_apply(
                st,
                LogRecord::Rollback {
                    volume: id,
                    snapshot,
                },
            )?;
            Ok(info_of(st, id, st.vol(id)?))
        })
    }

    /// Creates `new_name` as a copy-on-write clone of `volume@snapshot`: it
    /// shares every block and stores only what it changes. O(1); nothing
    /// reads through the parent, so clones of clones cost nothing extra.
    /// Durable on return.
    pub fn clone_volume(&self, volume: &str, snapshot: &str, new_name: &str) -> Result<VolumeInfo> {
        validate_volume_name(new_name).map_err(|why| EngineError::Invalid {
            what: "volume name",
            why,
        })?;
        self.durable_op(|st| {
            let source = lookup_name(st, volume)?;
            snap_of(st, source, volume, snapshot)?;
            if st.names.contains_key(new_name) {
                return Err(EngineError::VolumeExists(new_name.to_string()));
            }
            let id = VolumeId(st.next_volume_id);
            st.next_volume_id += 1;
            let rec = LogRecord::CloneVolume {
                volume: id,
                source,
                name: new_name,
                snapshot,
            };
            self.append_and_apply(st, rec)?;
            Ok(info_of(st, id, st.vol(id)?))
        })
    }

    /// Detaches a clone from its parent snapshot. Instant: a clone shares
    /// blocks with its parent but never reads through it, so there is
    /// nothing to copy; afterwards the parent snapshot may be deleted.
    pub fn flatten(&self, volume: &str) -> Result<VolumeInfo> {
        self.durable_op(|st| {
            let id = lookup_name(st, volume)?;
            if st.vol(id)?.parent.is_none() {
                return Err(EngineError::Invalid {
                    what: "flatten",
                    why: format!("volume {volume} is not a clone"),
                });
            }
            self.append_and_apply(st, LogRecord::FlattenVolume { volume: id })?;
            Ok(info_of(st, id, st.vol(id)?))
        })
    }

    /// Makes a clone's parent volume equal to the clone's current content
    /// (and size), atomically: one record, so a crash leaves the old parent
    /// or the new one. The clone stays until deleted. Returns the parent.
    pub fn commit(&self, volume: &str) -> Result<VolumeInfo> {
        self.durable_op(|st| {
            let id = lookup_name(st, volume)?;
            let Some((parent, _)) = st.vol(id)?.parent.clone() else {
                return Err(EngineError::Invalid {
                    what: "commit",
                    why: format!("volume {volume} is not a clone"),
                });
            };
            self.append_and_apply(st, LogRecord::CommitVolume { volume: id })?;
            Ok(info_of(st, parent, st.vol(parent)?))
        })
    }

    /// The ranges that differ between two images of `volume`: `from` and
    /// `to` name snapshots, `None` the volume as it is now. Reading the
    /// `Data` ranges of `to` and zeroing the `Zero` ones turns a copy of
    /// `from` into `to` (resize to `to`'s size first). O(extents).
    pub fn diff(
        &self,
        volume: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Vec<DiffExtent>> {
        let st = self.inner.state.lock();
        let id = lookup_name(&st, volume)?;
        let image = |snap: Option<&str>| -> Result<(ExtentMap, u64)> {
            match snap {
                None => {
                    let v = st.vol(id)?;
                    Ok((v.map.clone(), v.size_bytes))
                }
                Some(s) => {
                    let s = snap_of(&st, id, volume, s)?;
                    Ok((s.map.clone(), s.size_bytes))
                }
            }
        };
        let (a, a_size) = image(from)?;
        let (b, b_size) = image(to)?;
        drop(st);
        let blocks = b_size / BLOCK_SIZE;
        let (pa, pb) = (a.lookup(0, blocks), b.lookup(0, blocks));
        let a_blocks = a_size / BLOCK_SIZE;
        let mut out: Vec<DiffExtent> = Vec::new();
        let (mut i, mut j, mut pos) = (0usize, 0usize, 0u64);
        while pos < blocks {
            let (x, y) = (&pa[i], &pb[j]);
            let end = (x.start_block + x.len_blocks).min(y.start_block + y.len_blocks);
            let tx = x.target.map(|t| t.advance(pos - x.start_block));
            let ty = y.target.map(|t| t.advance(pos - y.start_block));
            let zero = |t: Option<Target>| matches!(t, None | Some(Target::Zero));
            // Past the old image's end everything written counts as new.
            let mut pieces = vec![(pos, end)];
            if pos < a_blocks && end > a_blocks {
                pieces = vec![(pos, a_blocks), (a_blocks, end)];
            }
            for (s, e) in pieces {
                let beyond_old = s >= a_blocks;
                let changed = if beyond_old {
                    !zero(ty)
                } else {
                    tx != ty && !(zero(tx) && zero(ty))
                };
                if changed {
                    let kind = if zero(ty) {
                        DiffKind::Zero
                    } else {
                        DiffKind::Data
                    };
                    match out.last_mut() {
                        Some(l) if l.kind == kind && l.offset + l.len == s * BLOCK_SIZE => {
                            l.len += (e - s) * BLOCK_SIZE
                        }
                        _ => out.push(DiffExtent {
                            offset: s * BLOCK_SIZE,
                            len: (e - s) * BLOCK_SIZE,
                            kind,
                        }),
                    }
                }
            }
            pos = end;
            if pos == x.start_block + x.len_blocks {
                i += 1;
            }
            if pos == y.start_block + y.len_blocks {
                j += 1;
            }
        }
        Ok(out)
    }

    /// The byte ranges of the log that reading all of `volume` (or of its
    /// snapshot) touches, per segment, sorted and merged: what a host cache
    /// must keep resident to serve the image without the backend (pinning).
    /// O(extents) in time and in the result.
    pub fn data_ranges(
        &self,
        volume: &str,
        snapshot: Option<&str>,
    ) -> Result<Vec<(SegmentId, std::ops::Range<u64>)>> {
        let map = {
            let st = self.inner.state.lock();
            let id = lookup_name(&st, volume)?;
            match snapshot {
                None => st.vol(id)?.map.clone(),
                Some(s) => snap_of(&st, id, volume, s)?.map.clone(),
            }
        };
        let mut ranges: Vec<(SegmentId, std::ops::Range<u64>)> = Vec::new();
        for p in map.iter() {
            let Some(Target::Data(d)) = p.target else {
                continue;
            };
            let crc = u64::from(d.crc_off)..u64::from(d.crc_off) + p.len_blocks * CRC_LEN as u64;
            let data = u64::from(d.data_off)..u64::from(d.data_off) + p.len_blocks * BLOCK_SIZE;
            ranges.push((d.seg, crc));
            ranges.push((d.seg, data));
        }
        ranges.sort_by_key(|(seg, r)| (*seg, r.start));
        let mut merged: Vec<(SegmentId, std::ops::Range<u64>)> = Vec::with_capacity(ranges.len());
        for (seg, r) in ranges {
            match merged.last_mut() {
                Some((s, last)) if *s == seg && r.start <= last.end => {
                    last.end = last.end.max(r.end);
                }
                _ => merged.push((seg, r)),
            }
        }
        Ok(merged)
    }

    /// A read-only handle on a snapshot (served over NBD as `VOL@SNAP`).
    pub fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        let st = self.inner.state.lock();
        let id = lookup_name(&st, volume)?;
        snap_of(&st, id, volume, snapshot)?;
        Ok(Volume {
            pool: self.clone(),
            id,
            name: volume.to_string(),
            snapshot: Some(snapshot.to_string()),
        })
    }

    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let st = self.inner.state.lock();
        // In name order, as a user reads a listing.
        st.names
            .values()
            .map(|&id| info_of(&st, id, &st.volumes[&id]))
            .collect()
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
        let st = self.inner.state.lock();
        let id = lookup_name(&st, name)?;
        Ok(info_of(&st, id, st.vol(id)?))
    }

    /// A handle for I/O on a volume. It stays valid until the volume is
    /// deleted; after that its calls fail with `VolumeNotFound`.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let st = self.inner.state.lock();
        let id = lookup_name(&st, name)?;
        Ok(Volume {
            pool: self.clone(),
            id,
            name: name.to_string(),
            snapshot: None,
        })
    }

    // ----- durability -----

    /// Makes every write that completed before this call durable.
    pub fn flush(&self) -> Result<()> {
        let segs: Vec<Arc<LogSeg>> = {
            let st = self.inner.state.lock();
            st.check_writable()?;
            st.unsynced
                .iter()
                .cloned()
                .chain([st.open.clone()])
                .collect()
        };
        // In log order: a later segment is never durable before an earlier one
        // is, which recovery relies on when it cuts at the first bad record.
        for s in &segs {
            if let Err(e) = s.sync_if_needed() {
                let msg = format!("syncing {}: {e}", s.id());
                tracing::error!(error = %msg, "sync failed; the pool refuses writes from now on");
                self.inner.state.lock().failed = Some(msg);
                return Err(e);
            }
        }
        let mut st = self.inner.state.lock();
        st.unsynced.retain(|s| !s.is_synced());
        Ok(())
    }

    // ----- statistics -----

    pub fn stats(&self) -> PoolStats {
        let mut st = self.inner.state.lock();
        let (live, physical, garbage_ratio) = st.space();
        PoolStats {
            volumes: st.volumes.len() as u64,
            logical_bytes: st.volumes.values().map(|v| v.size_bytes).sum(),
            live_data_bytes: live,
            physical_bytes: physical,
            segments: st.segments.len() as u64,
            garbage_ratio,
            free_bytes: self.inner.store.free_bytes(),
            extents: st
                .volumes
                .values()
                .map(|v| v.map.extent_count() as u64)
                .sum(),
            log_bytes_since_checkpoint: st.log_bytes_since_checkpoint,
            checkpoints_written: self
                .inner
                .counters
                .checkpoints_written
                .load(Ordering::Relaxed),
            segments_cleaned: self.inner.counters.segments_cleaned.load(Ordering::Relaxed),
            bytes_relocated: self.inner.counters.bytes_relocated.load(Ordering::Relaxed),
            reserve_bytes: self.inner.store.reserve_bytes(),
            full: self.inner.full.load(Ordering::Acquire),
            damaged_blocks: self.inner.damage.lock().bad_blocks.len() as u64,
        }
    }

    /// Checks the pool's invariants (tests call it after every step).
    pub fn self_check(&self) {
        let mut st = self.inner.state.lock();
        st.apply_pending_refs();
        let mut refs: BTreeMap<SegmentId, i64> = BTreeMap::new();
        let mut check_map = |map: &ExtentMap, size_bytes: u64, what: &str| -> (u64, u64) {
            map.self_check();
            let (mut data, mut zero) = (0, 0);
            for p in map.iter() {
                assert!(
                    (p.start_block + p.len_blocks) * BLOCK_SIZE <= size_bytes,
                    "extent past the end of {what}"
                );
                match p.target.expect("mapped") {
                    Target::Zero => zero += p.len_blocks,
                    Target::Data(d) => {
                        data += p.len_blocks;
                        *refs.entry(d.seg).or_default() += p.len_blocks as i64;
                        let s = st.segments.get(&d.seg).expect("extent's segment exists");
                        assert!(u64::from(d.data_off) + p.len_blocks * BLOCK_SIZE <= s.size_bytes);
                    }
                }
            }
            (data, zero)
        };
        for (id, v) in &st.volumes {
            assert_eq!(st.names.get(&v.name), Some(id), "name index");
            let counts = check_map(&v.map, v.size_bytes, &v.name);
            assert_eq!(
                (v.data_blocks, v.zero_blocks),
                counts,
                "block counts of {}",
                v.name
            );
            for (name, snap) in &v.snapshots {
                let counts = check_map(&snap.map, snap.size_bytes, name);
                assert_eq!(
                    (snap.data_blocks, snap.zero_blocks),
                    counts,
                    "block counts of {}@{name}",
                    v.name
                );
            }
            if let Some((parent, snap)) = &v.parent {
                let p = st
                    .volumes
                    .get(parent)
                    .expect("a clone's parent volume exists");
                assert!(
                    p.snapshots.contains_key(snap),
                    "a clone's parent snapshot exists"
                );
            }
        }
        assert_eq!(st.names.len(), st.volumes.len());
        for (id, s) in &st.segments {
            assert_eq!(
                s.refs,
                refs.get(id).copied().unwrap_or(0),
                "reference count of {id}"
            );
        }
    }

    // ----- internals -----

    /// Runs a metadata operation under the state lock, then flushes: its
    /// record is durable when this returns.
    fn durable_op<T>(&self, op: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let out = {
            let mut st = self.writable_state()?;
            op(&mut st)?
        };
        self.flush()?;
        Ok(out)
    }

    /// Data writes are refused at once while the device is full.
    fn check_room(&self) -> Result<()> {
        if !self.inner.full.load(Ordering::Acquire) {
            return Ok(());
        }
        Err(EngineError::PoolFull {
            free_bytes: self.inner.store.free_bytes().unwrap_or(0),
            reserve_bytes: self.inner.store.reserve_bytes(),
        })
    }

    fn writable_state(&self) -> Result<parking_lot::MutexGuard<'_, State>> {
        let st = self.inner.state.lock();
        st.check_writable()?;
        Ok(st)
    }

    /// Appends a record to the log and applies it to the state. A device
    /// that is out of space puts the pool in its full state.
    fn append_and_apply(&self, st: &mut State, rec: LogRecord<'_>) -> Result<()> {
        let result = self.append_and_apply_inner(st, rec);
        if let Err(e) = &result
            && e.is_no_space()
        {
            self.enter_full(e);
        }
        result
    }

    fn append_and_apply_inner(&self, st: &mut State, rec: LogRecord<'_>) -> Result<()> {
        if st.roll_before_next_append
            || st.open.appended.load(Ordering::Acquire) >= self.inner.config.segment_target_bytes
        {
            self.roll(st)?;
        }
        let seq = st.next_seq;
        let h = rec.header(seq);
        let hdr = h.encode();
        let off = st.open.appended.load(Ordering::Acquire);
        let mut bufs: Vec<&[u8]> = Vec::with_capacity(4);
        bufs.push(&hdr);
        bufs.extend(rec.payload().into_iter().filter(|p| !p.is_empty()));
        if let Err(e) = st.open.handle.append_at(off, &bufs) {
            // Part of the record may be on disk past the segment's end: never
            // append after it (recovery stops at it anyway).
            st.roll_before_next_append = true;
            return Err(e.into());
        }
        let len = h.record_len();
        let seg = st.open.id();
        st.open.appended.store(off + len, Ordering::Release);
        let now = Instant::now();
        st.open_since.get_or_insert(now);
        if !matches!(rec, LogRecord::Mark { .. }) {
            st.records_since_mark += 1;
        }
        st.segments
            .get_mut(&seg)
            .expect("open segment is known")
            .size_bytes = off + len;
        st.next_seq += 1;
        st.log_bytes_since_checkpoint += len;
        st.apply(RecordAt { seg, off, seq }, &rec)
    }

    /// Seals the open segment and starts the next one. A segment created
    /// whose header could not be written (a full device) is kept for the
    /// next try: the id is not skipped and no empty file is left behind.
    fn roll(&self, st: &mut State) -> Result<()> {
        if st.roll_before_next_append {
            // A failed append may have left part of a record past the end:
            // cut it, durably, before a durable mark can vouch for the
            // segment (recovery would take the fragment for corruption).
            // Until that succeeds, nothing is appended anywhere.
            let (old, len) = (st.open.id(), st.open.appended.load(Ordering::Acquire));
            self.inner.store.truncate_segment(old, len)?;
        }
        let id = SegmentId(st.next_segment_id);
        let handle = match st.half_rolled.take() {
            Some(h) => h,
            None => self.inner.store.create_segment(id)?,
        };
        debug_assert_eq!(handle.id(), id);
        let header = record::encode_segment_header(id);
        if let Err(e) = handle.append_at(0, &[&header]) {
            st.half_rolled = Some(handle);
            return Err(e.into());
        }
        st.next_segment_id += 1;
        let new = Arc::new(LogSeg {
            handle,
            appended: AtomicU64::new(SEGMENT_HEADER_LEN),
            synced: AtomicU64::new(0),
        });
        let old = std::mem::replace(&mut st.open, new);
        st.unsynced.push(old);
        st.segments.insert(
            id,
            SegInfo {
                size_bytes: SEGMENT_HEADER_LEN,
                refs: 0,
            },
        );
        st.roll_before_next_append = false;
        st.open_since = None;
        self.wake_maintenance();
        Ok(())
    }

    fn read_pieces(
        &self,
        volume: &str,
        first_block: u64,
        pieces: &[Piece],
        out: &mut [u8],
    ) -> Result<()> {
        let mut crc_buf = Vec::new();
        for p in pieces {
            let at = ((p.start_block - first_block) * BLOCK_SIZE) as usize;
            let dst = &mut out[at..at + (p.len_blocks * BLOCK_SIZE) as usize];
            match p.target {
                None | Some(Target::Zero) => dst.fill(0),
                Some(Target::Data(d)) => {
                    let n = p.len_blocks as usize;
                    crc_buf.resize(n * CRC_LEN, 0);
                    if u64::from(d.crc_off) + (n * CRC_LEN) as u64 == u64::from(d.data_off) {
                        // The piece is a whole record: its checksums sit right
                        // before its data, so one read fetches both.
                        let mut both = vec![0u8; n * CRC_LEN + dst.len()];
                        self.inner
                            .store
                            .read_at(d.seg, u64::from(d.crc_off), &mut both)?;
                        crc_buf.copy_from_slice(&both[..n * CRC_LEN]);
                        dst.copy_from_slice(&both[n * CRC_LEN..]);
                    } else {
                        self.inner
                            .store
                            .read_at(d.seg, u64::from(d.crc_off), &mut crc_buf)?;
                        self.inner
                            .store
                            .read_at(d.seg, u64::from(d.data_off), dst)?;
                    }
                    for (i, block) in dst.chunks_exact(BLOCK_SIZE as usize).enumerate() {
                        let want = u32::from_le_bytes(
                            crc_buf[i * CRC_LEN..][..CRC_LEN].try_into().expect("4"),
                        );
                        if crc32c::crc32c(block) != want {
                            let err = EngineError::Corrupt {
                                volume: volume.to_string(),
                                offset: (p.start_block + i as u64) * BLOCK_SIZE,
                                segment: d.seg,
                                segment_offset: u64::from(d.data_off) + i as u64 * BLOCK_SIZE,
                                detail: "block checksum mismatch".into(),
                            };
                            // A guest retries such a read at will.
                            static CORRUPT: RateLimitedLog = RateLimitedLog::new(LOG_PERIOD);
                            if let Some(suppressed) = CORRUPT.check() {
                                tracing::error!(error = %err, suppressed, "corruption detected");
                            }
                            return Err(err);
                        }
                    }
                }
            }
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

/// Creates the segment the log continues in after recovery.
fn open_first_segment(store: &dyn SegmentStore, st: &mut State) -> Result<()> {
    let id = SegmentId(st.next_segment_id);
    let handle = match st.half_rolled.take() {
        Some(h) => h,
        None => store.create_segment(id)?,
    };
    let header = record::encode_segment_header(id);
    if let Err(e) = handle.append_at(0, &[&header]) {
        st.half_rolled = Some(handle);
        return Err(e.into());
    }
    st.next_segment_id += 1;
    st.open = Arc::new(LogSeg {
        handle,
        appended: AtomicU64::new(SEGMENT_HEADER_LEN),
        synced: AtomicU64::new(0),
    });
    st.segments.insert(
        id,
        SegInfo {
            size_bytes: SEGMENT_HEADER_LEN,
            refs: 0,
        },
    );
    Ok(())
}

fn lookup_name(st: &State, name: &str) -> Result<VolumeId> {
    st.names
        .get(name)
        .copied()
        .ok_or_else(|| EngineError::VolumeNotFound(name.to_string()))
}

fn snap_of<'a>(st: &'a State, id: VolumeId, volume: &str, snapshot: &str) -> Result<&'a Snap> {
    st.vol(id)?
        .snapshots
        .get(snapshot)
        .ok_or_else(|| EngineError::SnapshotNotFound {
            volume: volume.to_string(),
            snapshot: snapshot.to_string(),
        })
}

/// Names of the volumes cloned from `id`'s snapshot `snapshot` (any of its
/// snapshots if `None`).
fn clones_of(st: &State, id: VolumeId, snapshot: Option<&str>) -> Vec<String> {
    st.volumes
        .values()
        .filter(|v| match &v.parent {
            Some((p, s)) => *p == id && snapshot.is_none_or(|want| want == s),
            None => false,
        })
        .map(|v| v.name.clone())
        .collect()
}

fn snapshot_info(volume: &str, name: &str, s: &Snap) -> SnapshotInfo {
    SnapshotInfo {
        volume: volume.to_string(),
        name: name.to_string(),
        size_bytes: s.size_bytes,
        allocated_bytes: s.data_blocks * BLOCK_SIZE,
        seq: s.seq,
    }
}

/// The runs of `[start, start + len)` (record-relative block indexes) that
/// hold no index of `skip`, as (start, len).
fn runs_without(start: u64, len: u64, skip: &[u32]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut run_start = start;
    for i in start..start + len {
        if skip.contains(&(i as u32)) {
            if i > run_start {
                out.push((run_start, i - run_start));
            }
            run_start = i + 1;
        }
    }
    if start + len > run_start {
        out.push((run_start, start + len - run_start));
    }
    out
}

/// (data blocks, zero blocks) of a map.
fn block_counts(map: &ExtentMap) -> (u64, u64) {
    let (mut data, mut zero) = (0, 0);
    for p in map.iter() {
        match p.target {
            Some(Target::Data(_)) => data += p.len_blocks,
            _ => zero += p.len_blocks,
        }
    }
    (data, zero)
}

fn info_of(st: &State, id: VolumeId, v: &Vol) -> VolumeInfo {
    VolumeInfo {
        parent: v.parent.as_ref().map(|(p, s)| {
            let pname = st.volumes.get(p).map(|pv| pv.name.as_str()).unwrap_or("?");
            format!("{pname}@{s}")
        }),
        snapshots: v.snapshots.len() as u64,
        ephemeral: v.ephemeral,
        id,
        name: v.name.clone(),
        size_bytes: v.size_bytes,
        allocated_bytes: v.data_blocks * BLOCK_SIZE,
        zero_bytes: v.zero_blocks * BLOCK_SIZE,
        extents: v.map.extent_count() as u64,
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
}

/// A handle for I/O on one volume. Offsets and lengths are in bytes; any
/// 512-byte alignment works (partial blocks are read-modify-written under
/// the pool lock, so concurrent partial writes never lose each other).
#[derive(Clone)]
pub struct Volume {
    pool: Pool,
    id: VolumeId,
    name: String,
    /// Set for a read-only view of one of the volume's snapshots.
    snapshot: Option<String>,
}

impl Volume {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// The snapshot this handle reads, if it is a snapshot's.
    pub fn snapshot_name(&self) -> Option<&str> {
        self.snapshot.as_deref()
    }

    pub fn size_bytes(&self) -> Result<u64> {
        Ok(self.view(&self.pool.inner.state.lock())?.1)
    }

    /// The map and size this handle sees: the volume's, or its snapshot's.
    fn view<'a>(&self, st: &'a State) -> Result<(&'a ExtentMap, u64)> {
        let vol = st
            .vol(self.id)
            .map_err(|_| EngineError::VolumeNotFound(self.name.clone()))?;
        match &self.snapshot {
            None => Ok((&vol.map, vol.size_bytes)),
            Some(s) => vol
                .snapshots
                .get(s)
                .map(|snap| (&snap.map, snap.size_bytes))
                .ok_or_else(|| EngineError::SnapshotNotFound {
                    volume: self.name.clone(),
                    snapshot: s.clone(),
                }),
        }
    }

    /// Write-type calls on a snapshot's handle are refused.
    fn check_writable_view(&self) -> Result<()> {
        match &self.snapshot {
            None => Ok(()),
            Some(s) => Err(EngineError::ReadOnly(format!(
                "{}@{s} is a snapshot",
                self.name
            ))),
        }
    }

    fn check_range(&self, st: &State, op: &'static str, offset: u64, len: u64) -> Result<()> {
        let size = self.view(st)?.1;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                op,
                volume: self.name.clone(),
                offset,
                len,
                size_bytes: size,
            }),
        }
    }

    /// Refuses a range whose end does not fit in a u64, before any
    /// arithmetic on it: the callers then compute `offset + len` freely.
    fn check_overflow(&self, op: &'static str, offset: u64, len: u64) -> Result<()> {
        if offset.checked_add(len).is_some() {
            return Ok(());
        }
        Err(EngineError::OutOfRange {
            op,
            volume: self.name.clone(),
            offset,
            len,
            size_bytes: self.size_bytes().unwrap_or(0),
        })
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_overflow("read", offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let nblocks = last - first + 1;
        let _gate = self.pool.inner.delete_gate.read();
        let pieces = {
            let st = self.pool.inner.state.lock();
            self.check_range(&st, "read", offset, len)?;
            self.view(&st)?.0.lookup(first, nblocks)
        };
        if offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE) {
            self.pool.read_pieces(&self.name, first, &pieces, buf)
        } else {
            let mut tmp = vec![0u8; (nblocks * BLOCK_SIZE) as usize];
            self.pool
                .read_pieces(&self.name, first, &pieces, &mut tmp)?;
            let skip = (offset - first * BLOCK_SIZE) as usize;
            buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
            Ok(())
        }
    }

    /// Writes `data` at `offset`. Acknowledged, not durable: see [`Pool::flush`].
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check_writable_view()?;
        self.check_overflow("write", offset, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        self.pool.check_room()?;
        // Back-pressure happens here, before the lock, so reads go on while
        // a write waits for the store's write-back space.
        self.pool.inner.store.admit_write(len)?;
        if offset.is_multiple_of(BLOCK_SIZE) && len.is_multiple_of(BLOCK_SIZE) {
            let crcs = record::block_crcs(data);
            let mut st = self.pool.writable_state()?;
            self.check_range(&st, "write", offset, len)?;
            return self.write_blocks_locked(&mut st, offset / BLOCK_SIZE, data, &crcs);
        }
        // Partial blocks: read the edges, patch, write whole blocks, all
        // under the lock so a concurrent write cannot slip in between.
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let nblocks = last - first + 1;
        let mut st = self.pool.writable_state()?;
        self.check_range(&st, "write", offset, len)?;
        let mut buf = vec![0u8; (nblocks * BLOCK_SIZE) as usize];
        let bs = BLOCK_SIZE as usize;
        let head_partial = !offset.is_multiple_of(BLOCK_SIZE);
        let tail_partial = !(offset + len).is_multiple_of(BLOCK_SIZE);
        {
            let map = self.view(&st)?.0;
            if head_partial {
                let pieces = map.lookup(first, 1);
                self.pool
                    .read_pieces(&self.name, first, &pieces, &mut buf[..bs])?;
            }
            if tail_partial && (last != first || !head_partial) {
                let pieces = map.lookup(last, 1);
                let at = ((last - first) * BLOCK_SIZE) as usize;
                self.pool
                    .read_pieces(&self.name, last, &pieces, &mut buf[at..at + bs])?;
            }
        }
        let skip = (offset - first * BLOCK_SIZE) as usize;
        buf[skip..skip + data.len()].copy_from_slice(data);
        let crcs = record::block_crcs(&buf);
        self.write_blocks_locked(&mut st, first, &buf, &crcs)
    }

    fn write_blocks_locked(
        &self,
        st: &mut State,
        first_block: u64,
        data: &[u8],
        crcs: &[u8],
    ) -> Result<()> {
        let bs = BLOCK_SIZE as usize;
        let max = MAX_RECORD_BLOCKS as usize;
        for (i, (chunk, chunk_crcs)) in data
            .chunks(max * bs)
            .zip(crcs.chunks(max * CRC_LEN))
            .enumerate()
        {
            let rec = LogRecord::Write {
                volume: self.id,
                block: first_block + (i * max) as u64,
                blocks: Blocks {
                    crcs: chunk_crcs,
                    data: chunk,
                },
            };
            self.pool.append_and_apply(st, rec)?;
        }
        Ok(())
    }

    /// Discards `[offset, offset + len)`: whole blocks inside it become
    /// unmapped (read as zeros, store nothing); partial blocks at the edges
    /// are left as they are, as TRIM allows.
    pub fn trim(&self, offset: u64, len: u64) -> Result<()> {
        self.check_writable_view()?;
        self.check_overflow("trim", offset, len)?;
        let mut st = self.pool.writable_state()?;
        self.check_range(&st, "trim", offset, len)?;
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        if end > first {
            self.zero_blocks_locked(&mut st, first, end - first, true)?;
        }
        Ok(())
    }

    /// Makes `[offset, offset + len)` read as zeros. Whole blocks store
    /// nothing: unmapped if `may_unmap`, else mapped as allocated zeros;
    /// partial edge blocks are written.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.check_writable_view()?;
        self.check_overflow("write_zeroes", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let first = offset.div_ceil(BLOCK_SIZE);
        let end = (offset + len) / BLOCK_SIZE;
        {
            let st = self.pool.inner.state.lock();
            self.check_range(&st, "write_zeroes", offset, len)?;
        }
        if end <= first {
            return self.write(offset, &vec![0u8; len as usize]);
        }
        let head = first * BLOCK_SIZE - offset;
        if head > 0 {
            self.write(offset, &vec![0u8; head as usize])?;
        }
        let tail_start = end * BLOCK_SIZE;
        if tail_start < offset + len {
            self.write(tail_start, &vec![0u8; (offset + len - tail_start) as usize])?;
        }
        let mut st = self.pool.writable_state()?;
        self.check_range(&st, "write_zeroes", offset, len)?;
        self.zero_blocks_locked(&mut st, first, end - first, may_unmap)
    }

    /// Appends `Trim` records (`unmap`) or `Zero` records for blocks
    /// `first..first + n`.
    fn zero_blocks_locked(&self, st: &mut State, first: u64, n: u64, unmap: bool) -> Result<()> {
        // One record covers up to u32::MAX blocks (16 TiB).
        let mut pos = first;
        let end = first + n;
        while pos < end {
            let chunk = (end - pos).min(u64::from(u32::MAX));
            let (volume, block, nblocks) = (self.id, pos, chunk as u32);
            let rec = if unmap {
                LogRecord::Trim {
                    volume,
                    block,
                    nblocks,
                }
            } else {
                LogRecord::Zero {
                    volume,
                    block,
                    nblocks,
                }
            };
            self.pool.append_and_apply(st, rec)?;
            pos += chunk;
        }
        Ok(())
    }

    /// Makes every completed write durable (of every volume of the pool).
    pub fn flush(&self) -> Result<()> {
        self.pool.flush()
    }

    /// Allocation status of `[offset, offset + len)` as NBD `base:allocation`
    /// extents `(length in bytes, STATE_* flags)`, merged, at most
    /// `max_extents` of them (covering a prefix of the range).
    pub fn block_status(
        &self,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Result<Vec<(u64, u32)>> {
        self.check_overflow("block_status", offset, len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let first = offset / BLOCK_SIZE;
        let last = (offset + len - 1) / BLOCK_SIZE;
        let pieces = {
            let st = self.pool.inner.state.lock();
            self.check_range(&st, "block_status", offset, len)?;
            self.view(&st)?.0.lookup(first, last - first + 1)
        };
        let mut out: Vec<(u64, u32)> = Vec::new();
        let end = offset + len;
        for p in pieces {
            let flags = match p.target {
                None => STATE_HOLE | STATE_ZERO,
                Some(Target::Zero) => STATE_ZERO,
                Some(Target::Data(_)) => 0,
            };
            let s = (p.start_block * BLOCK_SIZE).max(offset);
            let e = ((p.start_block + p.len_blocks) * BLOCK_SIZE).min(end);
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += e - s,
                _ => {
                    if out.len() == max_extents.max(1) {
                        break;
                    }
                    out.push((e - s, flags));
                }
            }
        }
        Ok(out)
    }
}
