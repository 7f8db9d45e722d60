//! Request and response bodies of the API, and the query strings of the data
//! routes. Request types reject unknown fields so a typo in a field name is an
//! error rather than a silently ignored option.

use serde::{Deserialize, Serialize};

pub use vpool_service::{FamilyOwner, SharedVolumeStatus};

/// A volume as the API shows it (`GET /v1/volumes/{name}` and friends).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub name: String,
    /// The pool-internal id; never reused, so it tells a re-created volume
    /// from the one deleted before it.
    pub id: u64,
    pub size_bytes: u64,
    /// Bytes of data stored for the volume.
    pub allocated_bytes: u64,
    /// Bytes mapped as allocated zeros (they take no space).
    pub zero_bytes: u64,
    /// Extents of the volume's map: a measure of fragmentation.
    pub extents: u64,
    /// For a clone: the `volume@snapshot` it was cloned from (until it is
    /// flattened).
    #[serde(default)]
    pub parent: Option<String>,
    /// How many snapshots the volume has.
    #[serde(default)]
    pub snapshots: u64,
    /// A scratch volume: deleted when its last NBD client disconnects, or
    /// when the daemon next starts.
    #[serde(default)]
    pub ephemeral: bool,
    /// Set when the volume is a sealed template (read-only gold master).
    #[serde(default)]
    pub template: Option<TemplateInfo>,
    /// An import into the volume began and did not finish (the daemon or
    /// the CLI died): its content is partly old, partly new. NBD does not
    /// serve it until an import completes (or it is deleted).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub incomplete: bool,
    /// For a replica (`vpool replica add`): what it replicates,
    /// `POOL/VOLUME`. Its head is not served; its points are snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_of: Option<String>,
    /// For a replica: its newest finished point (a snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_point: Option<String>,
    /// Its QoS limits, if it has any (`vpool vol qos`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<QosLimits>,
    /// Several NBD clients may write it at once (`vpool vol share`);
    /// otherwise one client writes at a time.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub multi_writer: bool,
    /// The NBD client that writes it on this host now (`unix pid P uid U
    /// (for N s)`, or a TCP address): a second client's writes wait for it
    /// to go. In `GET /v1/volumes/{name}` and the volume list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    /// The NBD connections to it and its snapshots on this host, oldest
    /// first (`vpool vol status`). In `GET /v1/volumes/{name}` and the
    /// volume list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<vpool_service::clients::ClientInfo>,
    /// Of `allocated_bytes`: bytes no snapshot or clone shares (freed if the
    /// volume is deleted), and bytes shared. Only in `GET
    /// /v1/volumes/{name}` (they cost a walk of the maps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_bytes: Option<u64>,
}

impl From<vpool_engine::VolumeInfo> for VolumeInfo {
    fn from(v: vpool_engine::VolumeInfo) -> VolumeInfo {
        VolumeInfo {
            name: v.name,
            id: v.id.0,
            size_bytes: v.size_bytes,
            allocated_bytes: v.allocated_bytes,
            zero_bytes: v.zero_bytes,
            extents: v.extents,
            parent: v.parent,
            snapshots: v.snapshots,
            ephemeral: v.ephemeral,
            template: None,
            incomplete: false,
            replica_of: None,
            replica_point: None,
            qos: None,
            multi_writer: false,
            writer: None,
            clients: Vec::new(),
            exclusive_bytes: None,
            shared_bytes: None,
        }
    }
}

impl From<vpool_service::VolumeView> for VolumeInfo {
    fn from(v: vpool_service::VolumeView) -> VolumeInfo {
        VolumeInfo {
            template: v.template.as_ref().map(TemplateInfo::from),
            incomplete: v.incomplete,
            replica_of: v.replica.as_ref().map(|r| r.source.clone()),
            replica_point: v.replica.and_then(|r| r.last_point),
            qos: Some(v.qos).filter(|q| !q.is_empty()),
            multi_writer: v.multi_writer,
            ..VolumeInfo::from(v.info)
        }
    }
}

impl From<&vpool_service::TemplateRecord> for TemplateInfo {
    fn from(t: &vpool_service::TemplateRecord) -> TemplateInfo {
        TemplateInfo {
            snapshot: vpool_service::TEMPLATE_SNAPSHOT.to_string(),
            digest: t.digest.clone(),
            sealed_at_unix: t.sealed_at_unix,
        }
    }
}

/// What makes a volume a template: the snapshot clones are made from, and
/// the digest of its content taken when it was sealed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateInfo {
    /// The reserved snapshot holding the sealed image (`template`).
    pub snapshot: String,
    /// `sha256:<64 hex digits>` over every byte of the sealed image (holes
    /// hashed as zeros): `sha256sum` of `vpool vol export`'s raw file.
    /// `null` only while the daemon is still computing it.
    pub digest: Option<String>,
    /// When it was sealed, in seconds since the Unix epoch.
    pub sealed_at_unix: u64,
}

/// `GET /v1/volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeList {
    /// For a shared pool: the volumes this host owns.
    pub volumes: Vec<VolumeInfo>,
    /// For a shared pool: every volume, with its owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared: Option<Vec<SharedVolumeStatus>>,
}

/// `POST /v1/volumes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    pub name: String,
    pub size_bytes: u64,
    /// A scratch volume: deleted when its last NBD client disconnects (after
    /// doing I/O), or when the daemon next starts.
    #[serde(default)]
    pub ephemeral: bool,
    /// For a volume of a shared pool: what a FLUSH promises (`host` or
    /// `remote`) on whichever host owns it. Other pools' durability is
    /// the pool's (`pool create --durability`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<String>,
}

/// `PATCH /v1/volumes/{name}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolumeRequest {
    pub size_bytes: u64,
    /// Shrinking drops the data past the new end, so it must be asked for.
    #[serde(default)]
    pub allow_shrink: bool,
    /// Shrink even while NBD clients have the volume open for writing.
    #[serde(default)]
    pub force: bool,
}

/// The cleaner's lifetime counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanerCounters {
    pub segments_cleaned: u64,
    pub bytes_relocated: u64,
}

/// `GET /v1/pool`: space and log figures of the pool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub volumes: u64,
    /// Sum of the volumes' sizes (what the pool promised).
    pub logical_bytes: u64,
    /// Bytes the pool's segments take on the backend.
    pub physical_bytes: u64,
    /// Bytes of volume data the maps still refer to.
    pub live_data_bytes: u64,
    pub segments: u64,
    /// Fraction of the physical bytes that are not live data: what the
    /// cleaner can win back.
    pub garbage_ratio: f64,
    /// Free space on the backend's device; `null` when the backend cannot
    /// tell.
    pub free_bytes: Option<u64>,
    pub extents: u64,
    /// Log bytes a recovery would replay right now.
    pub log_bytes_since_checkpoint: u64,
    pub checkpoints_written: u64,
    pub cleaner: CleanerCounters,
    /// Where the daemon serves NBD on TCP (`vpool serve --nbd-listen`);
    /// `null` when it serves NBD only on `<pool>/nbd.sock`.
    #[serde(default)]
    pub nbd_tcp_addr: Option<std::net::SocketAddr>,
    /// Bytes the pool holds back on its device so the cleaner can free
    /// space when the device is full (0 while released).
    #[serde(default)]
    pub reserve_bytes: u64,
    /// The device is full: data writes fail with ENOSPC until space comes
    /// back (deletes, trims and the cleaner go on).
    #[serde(default)]
    pub full: bool,
    /// Blocks known to fail their checksum that a volume or snapshot still
    /// refers to (reads of them fail): see `vpool pool check`.
    #[serde(default)]
    pub damaged_blocks: u64,
}

impl From<vpool_engine::PoolStats> for PoolInfo {
    fn from(s: vpool_engine::PoolStats) -> PoolInfo {
        PoolInfo {
            volumes: s.volumes,
            logical_bytes: s.logical_bytes,
            physical_bytes: s.physical_bytes,
            live_data_bytes: s.live_data_bytes,
            segments: s.segments,
            garbage_ratio: s.garbage_ratio,
            free_bytes: s.free_bytes,
            extents: s.extents,
            log_bytes_since_checkpoint: s.log_bytes_since_checkpoint,
            checkpoints_written: s.checkpoints_written,
            cleaner: CleanerCounters {
                segments_cleaned: s.segments_cleaned,
                bytes_relocated: s.bytes_relocated,
            },
            nbd_tcp_addr: None,
            reserve_bytes: s.reserve_bytes,
            full: s.full,
            damaged_blocks: s.damaged_blocks,
        }
    }
}

/// One pool the daemon holds (`GET /v1/pools`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub name: String,
    /// Its directory: a local pool, or the cache of a pool on S3.
    pub dir: String,
    /// Bare volume names (and NBD exports) mean this pool.
    #[serde(default)]
    pub default: bool,
    /// `local` or `s3`; `null` while the pool is not open.
    #[serde(default)]
    pub kind: Option<vpool_service::PoolKind>,
    /// `open`, `opening` (an attempt runs: at start, a retry, or `pool
    /// open`) or `failed` (see `reason`: why, and when it is retried;
    /// `vpool pool open NAME` tries now).
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub volumes: Option<u64>,
    #[serde(default)]
    pub logical_bytes: Option<u64>,
    #[serde(default)]
    pub physical_bytes: Option<u64>,
    #[serde(default)]
    pub free_bytes: Option<u64>,
}

/// `GET /v1/pools`: the default pool first, then by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolList {
    pub pools: Vec<PoolStatus>,
}

/// `POST /v1/pools`: a pool for the daemon to hold. Without `s3`: the local
/// pool in `dir` (made if the directory is missing or empty; an existing
/// pool directory, local or an S3 cache, is taken over as it is). With
/// `s3`: a new pool on S3 (`attach`: one that exists, from another host),
/// its cache in `dir`. `dir` defaults to `<home>/pools/NAME`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddPoolRequest {
    pub name: String,
    #[serde(default)]
    pub dir: Option<String>,
    #[serde(default)]
    pub s3: Option<vpool_service::S3Spec>,
    #[serde(default)]
    pub attach: bool,
    /// Accept an object store that cannot enforce a single writer.
    #[serde(default)]
    pub unsafe_single_host: bool,
}

/// A range of a volume or snapshot whose data fails its checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedRange {
    /// `volume` or `volume@snapshot`.
    pub image: String,
    pub offset_bytes: u64,
    pub len_bytes: u64,
    /// Where its first block is stored: segment id and byte in it.
    pub segment: u64,
    pub segment_offset: u64,
}

impl From<vpool_engine::DamagedRange> for DamagedRange {
    fn from(r: vpool_engine::DamagedRange) -> DamagedRange {
        DamagedRange {
            image: r.image,
            offset_bytes: r.offset_bytes,
            len_bytes: r.len_bytes,
            segment: r.segment.0,
            segment_offset: r.segment_offset,
        }
    }
}

/// A place in the log that is not a readable record, or damage recovery
/// found there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogDamage {
    pub segment: u64,
    pub offset: u64,
    pub what: String,
    /// Records were lost: the pool opens only with repair, which drops them.
    #[serde(default)]
    pub loses_records: bool,
}

impl From<vpool_engine::Damage> for LogDamage {
    fn from(d: vpool_engine::Damage) -> LogDamage {
        LogDamage {
            segment: d.segment.0,
            offset: d.offset,
            loses_records: d.needs_repair(),
            what: d.to_string(),
        }
    }
}

impl From<vpool_engine::BadRecord> for LogDamage {
    fn from(b: vpool_engine::BadRecord) -> LogDamage {
        LogDamage {
            segment: b.segment.0,
            offset: b.offset,
            what: b.why,
            loses_records: false,
        }
    }
}

/// One copy of the checkpoint, as `pool check` found it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointCopy {
    pub name: String,
    /// The next sequence number it records (newer copies have more).
    pub next_seq: Option<u64>,
    /// Why it cannot be read, if it cannot.
    pub error: Option<String>,
}

/// `POST /v1/pool/check`: what the check found (and with `repair`, did).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Nothing wrong was found.
    pub clean: bool,
    pub segments_checked: u64,
    pub records_checked: u64,
    pub bytes_checked: u64,
    pub blocks_verified: u64,
    /// Damage recovery met when the pool was opened (offline checks).
    #[serde(default)]
    pub recovery: Vec<LogDamage>,
    /// Recovery dropped lost records to open the pool (`--repair`).
    #[serde(default)]
    pub recovery_repaired: bool,
    pub bad_records: Vec<LogDamage>,
    pub damaged_ranges: Vec<DamagedRange>,
    pub map_errors: Vec<String>,
    pub refcount_errors: Vec<String>,
    pub checkpoints: Vec<CheckpointCopy>,
    /// Damaged ranges repair trimmed (they read as zeros now).
    pub repaired: Vec<DamagedRange>,
    /// Segments with damage whose live data repair moved before deleting
    /// them (the damage is gone, not only known).
    #[serde(default)]
    pub evacuated_segments: Vec<u64>,
}

impl From<vpool_engine::CheckReport> for CheckResult {
    fn from(r: vpool_engine::CheckReport) -> CheckResult {
        CheckResult {
            clean: r.clean(),
            segments_checked: r.segments_checked,
            records_checked: r.records_checked,
            bytes_checked: r.bytes_checked,
            blocks_verified: r.blocks_verified,
            recovery: Vec::new(),
            recovery_repaired: false,
            bad_records: r.bad_records.into_iter().map(Into::into).collect(),
            damaged_ranges: r.damaged_ranges.into_iter().map(Into::into).collect(),
            map_errors: r.map_errors,
            refcount_errors: r.refcount_errors,
            checkpoints: r
                .checkpoints
                .into_iter()
                .map(|(name, res)| match res {
                    Ok(seq) => CheckpointCopy {
                        name,
                        next_seq: Some(seq),
                        error: None,
                    },
                    Err(e) => CheckpointCopy {
                        name,
                        next_seq: None,
                        error: Some(e),
                    },
                })
                .collect(),
            repaired: r.repaired.into_iter().map(Into::into).collect(),
            evacuated_segments: r.evacuated.into_iter().map(|s| s.0).collect(),
        }
    }
}

/// Query of `POST /v1/pool/check`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckQuery {
    /// Trim the damaged ranges of volumes (they read as zeros afterwards).
    #[serde(default)]
    pub repair: bool,
}

/// `POST /v1/pool/clean`: what one cleaner pass did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CleanResult {
    pub segments_deleted: u64,
    pub bytes_relocated: u64,
    pub bytes_freed: u64,
}

impl From<vpool_engine::CleanReport> for CleanResult {
    fn from(r: vpool_engine::CleanReport) -> CleanResult {
        CleanResult {
            segments_deleted: r.segments_deleted,
            bytes_relocated: r.bytes_relocated,
            bytes_freed: r.bytes_freed,
        }
    }
}

/// Query of `PUT /v1/volumes/{name}/data`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    pub offset: u64,
    /// Write even while NBD clients have the volume open for writing.
    #[serde(default)]
    pub force: bool,
}

/// Query of `GET /v1/volumes/{name}/data` and `…/allocation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    pub offset: u64,
    pub length: u64,
    /// Read this snapshot of the volume instead of the volume itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

fn default_true() -> bool {
    true
}

/// Query of `POST /v1/volumes/{name}/zero`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZeroQuery {
    pub offset: u64,
    pub length: u64,
    /// Whole blocks become holes (free space) rather than allocated zeros.
    /// On by default: in a thin pool, zeroing is how space is given back.
    #[serde(default = "default_true")]
    pub unmap: bool,
    /// Zero even while NBD clients have the volume open for writing.
    #[serde(default)]
    pub force: bool,
}

/// One run of blocks with the same allocation state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationExtent {
    pub offset: u64,
    pub length: u64,
    /// Not allocated: stores nothing (reads as zeros).
    pub hole: bool,
    /// Reads as zeros (holes and allocated zeros alike).
    pub zero: bool,
}

/// `GET /v1/volumes/{name}/allocation`: the allocation state of a prefix of
/// the asked range, `[offset, offset + length)`. A client wanting the whole
/// range asks again from `offset + length` until it has it all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub offset: u64,
    /// Bytes the extents cover, from `offset`; more than 0 whenever the
    /// asked length was.
    pub length: u64,
    pub extents: Vec<AllocationExtent>,
}

/// A snapshot as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    pub volume: String,
    pub name: String,
    /// The volume's size when the snapshot was taken.
    pub size_bytes: u64,
    /// Bytes of data the snapshot refers to (shared with the volume or not).
    pub allocated_bytes: u64,
    /// Log sequence number at which it was taken: orders the snapshots.
    pub seq: u64,
    /// When it was taken (Unix ms); none for snapshots taken by an earlier
    /// release or copied in from another pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_unix_ms: Option<u64>,
    /// Of `allocated_bytes`: bytes only this snapshot holds (freed if it is
    /// deleted), and bytes it shares with the volume, other snapshots or
    /// clones. Filled in by `GET /v1/volumes/{name}/snapshots`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_bytes: Option<u64>,
}

impl From<vpool_engine::SnapshotInfo> for SnapshotInfo {
    fn from(s: vpool_engine::SnapshotInfo) -> SnapshotInfo {
        SnapshotInfo {
            volume: s.volume,
            name: s.name,
            size_bytes: s.size_bytes,
            allocated_bytes: s.allocated_bytes,
            seq: s.seq,
            created_unix_ms: None,
            exclusive_bytes: None,
            shared_bytes: None,
        }
    }
}

/// `GET /v1/volumes/{name}/snapshots`: oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotList {
    pub snapshots: Vec<SnapshotInfo>,
    /// The volume's own exclusive bytes, from the same space walk as the
    /// snapshots' (`GET /v1/volumes/{name}/snapshots`; `vol du`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_exclusive_bytes: Option<u64>,
}

/// `POST /v1/volumes/{name}/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    pub name: String,
}

/// Query of `POST /v1/volumes/{name}/snapshots/{snap}/rollback`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForceQuery {
    /// Go ahead even while NBD clients have the volume open for writing
    /// (they see their disk change, or go, under them).
    #[serde(default)]
    pub force: bool,
}

/// Query of rollback and commit: see [`ForceQuery`].
pub type RollbackQuery = ForceQuery;

/// `POST /v1/volumes/{name}/copy`: copy the volume, or its `snapshot`,
/// into volume `to` (`POOL/NAME`, or `NAME` in the volume's pool).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CopyRequest {
    pub to: String,
    #[serde(default)]
    pub snapshot: Option<String>,
    /// Bytes a second the copy may write at most (`None`: no limit).
    #[serde(default)]
    pub max_rate_bytes_per_sec: Option<u64>,
}

/// `POST /v1/volumes/{name}/move`: move the volume into pool `to_pool`,
/// as `name` (default: its own name).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    pub to_pool: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Bytes a second the move may copy at most (`None`: no limit).
    #[serde(default)]
    pub max_rate_bytes_per_sec: Option<u64>,
    /// Copy the volume alone: its snapshots are deleted with the source.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub without_snapshots: bool,
}

pub use vpool_service::jobs::{JobInfo, JobState};

/// `POST /v1/volumes/{name}/replica`: replicate the volume into pool
/// `to_pool` as `name` (default: its own name), a run every `every_secs`
/// (`None`: by hand, `POST .../replica/run`), keeping `keep` points.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRequest {
    pub to_pool: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub every_secs: Option<u64>,
    #[serde(default)]
    pub keep: Option<u32>,
    /// Bytes a second a run may copy at most (`None`: no limit).
    #[serde(default)]
    pub max_rate_bytes_per_sec: Option<u64>,
}

pub use vpool_service::host::ReplicaStatus;
pub use vpool_service::metrics::VolumeIo;
pub use vpool_service::qos::QosLimits;

pub use vpool_service::trash::{PurgeReport, TrashEntry};

/// `GET /v1/trash`: the pool's trash, oldest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrashList {
    pub trash: Vec<TrashEntry>,
}

/// `POST /v1/volumes/{name}/trash?expire_secs=N`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrashQuery {
    /// Deleted for good that long after, by the daemon (default: kept
    /// until `rm` or `purge`).
    #[serde(default)]
    pub expire_secs: Option<u64>,
}

/// `POST /v1/trash/{id}/restore`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreRequest {
    /// The name it comes back under (default: the one it had).
    #[serde(default)]
    pub name: Option<String>,
}

/// `POST /v1/trash/purge`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Only what went to the trash at least this long ago (default 0:
    /// everything).
    #[serde(default)]
    pub older_than_secs: u64,
}

/// `POST /v1/volumes/{name}/import`: the volume is marked incomplete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportBegun {
    /// The NBD export (in the volume's pool: `POOL/` goes in front for
    /// another pool than the default) through which the importer writes
    /// the volume while NBD refuses it to everyone else; secret, and good
    /// until the import ends or begins again.
    pub nbd_export: String,
}

/// `POST /v1/volumes/{name}/rename`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenameRequest {
    /// The volume's name from now on (in the same pool).
    pub new_name: String,
}

/// `PUT /v1/volumes/{name}/multi-writer`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiWriterRequest {
    /// Several NBD clients may write the volume at once.
    pub enabled: bool,
}

/// `GET /v1/io`: every volume's NBD I/O counters since the daemon started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IoList {
    pub volumes: Vec<VolumeIo>,
}

/// `POST /v1/schedules`: snapshots of `volume` (`POOL/NAME` or `NAME`)
/// every `every_secs`, the newest `keep` kept, named `PREFIX-<UTC time>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleRequest {
    pub volume: String,
    pub every_secs: u64,
    pub keep: u32,
    #[serde(default)]
    pub prefix: Option<String>,
}

pub use vpool_service::host::ScheduleInfo;

/// `GET /v1/schedules`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleList {
    pub schedules: Vec<ScheduleInfo>,
}

/// `GET /v1/replicas`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplicaList {
    pub replicas: Vec<ReplicaStatus>,
}

/// `GET /v1/jobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobList {
    pub jobs: Vec<JobInfo>,
}

/// What `POST /v1/volumes/{name}/flatten` did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlattenReport {
    /// What the clone no longer depends on: the `volume@snapshot` it was
    /// cloned from in a pool, its template in a shared pool.
    pub detached_from: Option<String>,
    /// Bytes copied into the clone: none in a pool (a clone never reads
    /// through its parent there), its template's blocks it read in a
    /// shared pool.
    pub bytes_copied: u64,
    pub volume: VolumeInfo,
}

impl From<vpool_service::Flattened> for FlattenReport {
    fn from(f: vpool_service::Flattened) -> FlattenReport {
        FlattenReport {
            detached_from: f.detached_from,
            bytes_copied: f.bytes_copied,
            volume: f.volume.into(),
        }
    }
}

/// `POST /v1/volumes/{name}/clone`: a copy-on-write clone of one of the
/// volume's snapshots, or of a template's sealed image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    /// The new volume's name.
    pub name: String,
    /// The snapshot to clone; `null` for a template (its sealed image).
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// Query of `GET /v1/volumes/{name}/diff`: the two images to compare
/// (snapshot names; absent = the volume as it is now) and where to resume.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// Only extents at or past this byte offset (a later page).
    #[serde(default)]
    pub offset: u64,
}

/// What a changed range holds in the newer image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// Data: read it from the newer image.
    Data,
    /// Reads as zeros now.
    Zero,
}

/// One changed range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffExtent {
    pub offset: u64,
    pub length: u64,
    pub kind: DiffKind,
}

impl From<vpool_engine::DiffExtent> for DiffExtent {
    fn from(e: vpool_engine::DiffExtent) -> DiffExtent {
        DiffExtent {
            offset: e.offset,
            length: e.len,
            kind: match e.kind {
                vpool_engine::DiffKind::Data => DiffKind::Data,
                vpool_engine::DiffKind::Zero => DiffKind::Zero,
            },
        }
    }
}

/// `GET /v1/volumes/{name}/diff`: the ranges that differ between `from` and
/// `to`, in offset order. Reading the `data` ranges of `to` and zeroing the
/// `zero` ones turns a copy of `from` (resized to `size_bytes`) into `to`.
/// A long answer comes in pages: ask again with `offset=next_offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diff {
    pub volume: String,
    /// `null`: the volume as it is now.
    pub from: Option<String>,
    pub to: Option<String>,
    /// Size of the `from` image.
    pub from_size_bytes: u64,
    /// Size of the `to` image.
    pub size_bytes: u64,
    /// Where this page starts.
    pub offset: u64,
    pub extents: Vec<DiffExtent>,
    /// Where the next page starts; `null` on the last page.
    pub next_offset: Option<u64>,
}

/// `GET /v1/cache`: the host cache of a pool on object storage (S3). The
/// store's own figures type, so the two cannot drift apart; `vpool-s3`
/// builds it without its object store stack. Every field defaults, so a
/// client reads an answer from a daemon that has fewer.
pub use vpool_s3::CacheStats as CacheInfo;

/// `POST /v1/cache/pins`: keep a volume, or one of its snapshots, resident
/// in the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    pub volume: String,
    /// A snapshot of the volume; `null` for the volume itself (as it is at
    /// each refresh: new writes get pinned too).
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// One pin, as `GET /v1/cache/pins` shows it (the service's type).
pub use vpool_service::PinInfo;

/// `GET /v1/cache/pins`, in the order they were pinned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinList {
    pub pins: Vec<PinInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_defaults_to_no_shrink() {
        let r: ResizeVolumeRequest = serde_json::from_str(r#"{"size_bytes":4096}"#).unwrap();
        assert!(!r.allow_shrink);
    }

    #[test]
    fn requests_reject_unknown_fields() {
        assert!(
            serde_json::from_str::<CreateVolumeRequest>(
                r#"{"name":"a","size_bytes":4096,"sise":1}"#
            )
            .is_err()
        );
        assert!(
            serde_json::from_str::<ResizeVolumeRequest>(
                r#"{"size_bytes":4096,"allowShrink":true}"#
            )
            .is_err()
        );
    }

    #[test]
    fn pin_requests() {
        let r: PinRequest = serde_json::from_str(r#"{"volume":"db1"}"#).unwrap();
        assert_eq!(r.snapshot, None);
        let r: PinRequest =
            serde_json::from_str(r#"{"volume":"db1","snapshot":"suspended"}"#).unwrap();
        assert_eq!(r.snapshot.as_deref(), Some("suspended"));
        assert!(serde_json::from_str::<PinRequest>(r#"{"vol":"db1"}"#).is_err());
        let p = PinInfo {
            volume: "db1".into(),
            snapshot: Some("s".into()),
            bytes: None,
            error: None,
        };
        assert_eq!(p.image(), "db1@s");
        // A cache answer with fields this client does not know, or without
        // some it knows, still parses.
        let c: CacheInfo =
            serde_json::from_str(r#"{"dirty_bytes":5,"from_the_future":1}"#).unwrap();
        assert_eq!(c.dirty_bytes, 5);
    }

    #[test]
    fn pool_info_round_trips() {
        let p = PoolInfo {
            volumes: 1,
            logical_bytes: 2,
            physical_bytes: 3,
            live_data_bytes: 4,
            segments: 5,
            garbage_ratio: 0.25,
            free_bytes: None,
            extents: 6,
            log_bytes_since_checkpoint: 7,
            checkpoints_written: 8,
            cleaner: CleanerCounters {
                segments_cleaned: 9,
                bytes_relocated: 10,
            },
            nbd_tcp_addr: Some("127.0.0.1:10809".parse().unwrap()),
            reserve_bytes: 11,
            full: true,
            damaged_blocks: 12,
        };
        let s = serde_json::to_string(&p).unwrap();
        assert!(s.contains(r#""free_bytes":null"#));
        assert!(s.contains(r#""nbd_tcp_addr":"127.0.0.1:10809""#), "{s}");
        assert_eq!(serde_json::from_str::<PoolInfo>(&s).unwrap(), p);
        // A daemon that predates the field still parses.
        let old = s.replace(r#","nbd_tcp_addr":"127.0.0.1:10809""#, "");
        assert_eq!(
            serde_json::from_str::<PoolInfo>(&old).unwrap().nbd_tcp_addr,
            None
        );
    }
}
