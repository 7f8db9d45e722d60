//! The log's on-disk format: segment headers and records.
//!
//! See `docs/on-disk-format.md` for the byte diagrams and the crash analysis.
//! Everything here is pure (no I/O) so the decoders can be fuzzed; every
//! decoder distrusts its input and returns [`DecodeError`] rather than
//! panicking.
//!
//! Two levels: [`RecordHeader`] is the 64 bytes as they lie on disk (with
//! the generic `arg`, `arg2`, `arg3` whose meaning depends on the kind), and
//! [`LogRecord`] is what a record means, in typed fields. The engine only
//! ever builds and applies [`LogRecord`]s; the conversion both ways is here.

use crate::checkpoint::LogPosition;
use crate::extent_map::DataLoc;
use crate::types::{BLOCK_SIZE, VolumeId};
use vpool_store::SegmentId;

/// "VPSEG001": the first 8 bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"VPSEG001";
/// Bytes taken by the segment header; records follow.
pub const SEGMENT_HEADER_LEN: u64 = vpool_store::SEGMENT_HEADER_BYTES;
/// Magic at the start of every record.
pub const RECORD_MAGIC: u32 = 0x5650_5231; // "VPR1" read little-endian
/// Bytes taken by a record header.
pub const RECORD_HEADER_LEN: usize = 64;
/// Bytes of checksum per data block in a write record.
pub const CRC_LEN: usize = 4;
/// The most blocks one write record carries (1 MiB). Larger writes become
/// several records; this bounds the memory one record needs at recovery.
pub const MAX_RECORD_BLOCKS: u32 = 256;
/// Longest volume name a create record may carry.
pub const MAX_NAME_LEN: usize = 64;

/// What a record does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordKind {
    /// Data for `nblocks` blocks starting at `block`.
    Write = 1,
    /// Blocks read as zeros and stay allocated (WRITE_ZEROES with NO_HOLE).
    Zero = 2,
    /// Blocks are unmapped (TRIM, or WRITE_ZEROES that may punch holes).
    Trim = 3,
    /// Volume `volume` is created with size `arg` and the name in the payload.
    CreateVolume = 4,
    /// Volume `volume` gets size `arg`; blocks past the new end are dropped.
    ResizeVolume = 5,
    /// Volume `volume` is deleted with all its blocks and snapshots.
    DeleteVolume = 6,
    /// Snapshot named in the payload freezes volume `volume`'s current map.
    CreateSnapshot = 7,
    /// Snapshot named in the payload of volume `volume` is deleted.
    DeleteSnapshot = 8,
    /// Volume `volume` takes the content and size of the snapshot named in
    /// the payload.
    Rollback = 9,
    /// Volume `volume` is created as a copy-on-write clone of volume `arg`'s
    /// snapshot; the payload is `new-name/snapshot-name`.
    CloneVolume = 10,
    /// The cleaner moved `nblocks` blocks from segment `arg` at data offset
    /// `arg2` (checksums at `arg3`) here: every map pointing at the old
    /// location now points at this record. Payload as for `Write`.
    Relocate = 11,
    /// Clone `volume` forgets its parent (it never read through it).
    FlattenVolume = 12,
    /// Clone `volume`'s parent volume takes the clone's content and size.
    CommitVolume = 13,
    /// Durable mark: every byte of the log before segment `arg`, offset
    /// `arg2` was durable (synced) before this record was appended. Changes
    /// no volume; recovery uses it to tell corruption (before a mark) from
    /// a torn tail (after the last one).
    Mark = 14,
    /// Volume `volume` takes the new name in the payload (its id, data,
    /// snapshots and clones' links stay).
    RenameVolume = 15,
}

/// `arg2` bit of a `CreateVolume` record: the volume is ephemeral (deleted
/// when the pool is next opened).
pub const CREATE_EPHEMERAL: u32 = 1;

impl RecordKind {
    fn from_u8(v: u8) -> Option<RecordKind> {
        Some(match v {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::Trim,
            4 => RecordKind::CreateVolume,
            5 => RecordKind::ResizeVolume,
            6 => RecordKind::DeleteVolume,
            7 => RecordKind::CreateSnapshot,
            8 => RecordKind::DeleteSnapshot,
            9 => RecordKind::Rollback,
            10 => RecordKind::CloneVolume,
            11 => RecordKind::Relocate,
            12 => RecordKind::FlattenVolume,
            13 => RecordKind::CommitVolume,
            14 => RecordKind::Mark,
            15 => RecordKind::RenameVolume,
            _ => return None,
        })
    }
}

/// A decoded record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub seq: u64,
    pub volume: VolumeId,
    pub block: u64,
    pub nblocks: u32,
    pub payload_len: u32,
    pub arg: u64,
    pub payload_crc: u32,
    /// Relocate only: the old data offset and checksum offset (else 0).
    pub arg2: u32,
    pub arg3: u32,
}

/// Why bytes are not a valid header or record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("too short: need {need} bytes, have {have}")]
    Short { need: usize, have: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("data checksum mismatch in block {index} of the record")]
    DataChecksum { index: u32 },
    #[error("unknown record kind {0}")]
    UnknownKind(u8),
    #[error("inconsistent field: {0}")]
    Inconsistent(&'static str),
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Encodes a segment header for segment `id`.
pub fn encode_segment_header(id: SegmentId) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&1u32.to_le_bytes()); // format version
    h[16..24].copy_from_slice(&id.0.to_le_bytes());
    let crc = crc32c::crc32c(&h[..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header and returns the segment id it names.
pub fn decode_segment_header(b: &[u8]) -> Result<SegmentId, DecodeError> {
    let need = SEGMENT_HEADER_LEN as usize;
    if b.len() < need {
        return Err(DecodeError::Short {
            need,
            have: b.len(),
        });
    }
    if b[0..8] != SEGMENT_MAGIC {
        return Err(DecodeError::BadMagic);
    }
    if crc32c::crc32c(&b[..60]) != le_u32(b, 60) {
        return Err(DecodeError::HeaderChecksum);
    }
    if le_u32(b, 8) != 1 {
        return Err(DecodeError::Inconsistent("unknown segment format version"));
    }
    Ok(SegmentId(le_u64(b, 16)))
}

impl RecordHeader {
    /// Serializes the header, computing its own checksum.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut h = [0u8; RECORD_HEADER_LEN];
        h[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        h[4] = self.kind as u8;
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.volume.0.to_le_bytes());
        h[24..32].copy_from_slice(&self.block.to_le_bytes());
        h[32..36].copy_from_slice(&self.nblocks.to_le_bytes());
        h[36..40].copy_from_slice(&self.payload_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.arg.to_le_bytes());
        h[48..52].copy_from_slice(&self.payload_crc.to_le_bytes());
        h[52..56].copy_from_slice(&self.arg2.to_le_bytes());
        h[56..60].copy_from_slice(&self.arg3.to_le_bytes());
        let crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header: magic, checksum, kind, and that the
    /// payload length agrees with the kind.
    pub fn decode(b: &[u8]) -> Result<RecordHeader, DecodeError> {
        if b.len() < RECORD_HEADER_LEN {
            return Err(DecodeError::Short {
                need: RECORD_HEADER_LEN,
                have: b.len(),
            });
        }
        if le_u32(b, 0) != RECORD_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if crc32c::crc32c(&b[..60]) != le_u32(b, 60) {
            return Err(DecodeError::HeaderChecksum);
        }
        let kind = RecordKind::from_u8(b[4]).ok_or(DecodeError::UnknownKind(b[4]))?;
        // The flags byte and the two after it are written as zeros (no flag
        // is defined): anything else is not a header this format wrote.
        if b[5..8] != [0, 0, 0] {
            return Err(DecodeError::Inconsistent(
                "reserved header bytes are not zero",
            ));
        }
        let h = RecordHeader {
            kind,
            seq: le_u64(b, 8),
            volume: VolumeId(le_u64(b, 16)),
            block: le_u64(b, 24),
            nblocks: le_u32(b, 32),
            payload_len: le_u32(b, 36),
            arg: le_u64(b, 40),
            payload_crc: le_u32(b, 48),
            arg2: le_u32(b, 52),
            arg3: le_u32(b, 56),
        };
        let expected_payload = match kind {
            RecordKind::Write | RecordKind::Relocate => {
                if h.nblocks == 0 || h.nblocks > MAX_RECORD_BLOCKS {
                    return Err(DecodeError::Inconsistent("write record block count"));
                }
                write_payload_len(h.nblocks)
            }
            RecordKind::Zero | RecordKind::Trim => {
                if h.nblocks == 0 {
                    return Err(DecodeError::Inconsistent("zero/trim record block count"));
                }
                0
            }
            RecordKind::CreateVolume
            | RecordKind::CreateSnapshot
            | RecordKind::DeleteSnapshot
            | RecordKind::Rollback
            | RecordKind::RenameVolume => {
                let n = h.payload_len as usize;
                if n == 0 || n > MAX_NAME_LEN {
                    return Err(DecodeError::Inconsistent("name length"));
                }
                n
            }
            RecordKind::CloneVolume => {
                let n = h.payload_len as usize;
                if !(3..=2 * MAX_NAME_LEN + 1).contains(&n) {
                    return Err(DecodeError::Inconsistent("clone names length"));
                }
                n
            }
            RecordKind::ResizeVolume
            | RecordKind::DeleteVolume
            | RecordKind::FlattenVolume
            | RecordKind::CommitVolume
            | RecordKind::Mark => 0,
        };
        if h.payload_len as usize != expected_payload {
            return Err(DecodeError::Inconsistent("payload length"));
        }
        if h.block.checked_add(u64::from(h.nblocks)).is_none() {
            return Err(DecodeError::Inconsistent("block range overflows"));
        }
        Ok(h)
    }

    /// Bytes of the whole record: header plus payload.
    pub fn record_len(&self) -> u64 {
        RECORD_HEADER_LEN as u64 + u64::from(self.payload_len)
    }
}

/// The blocks a `Write` or `Relocate` record carries, as they follow its
/// header on disk: one CRC-32C per block (little-endian), then the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocks<'a> {
    pub crcs: &'a [u8],
    pub data: &'a [u8],
}

impl Blocks<'_> {
    /// Blocks carried: one checksum each.
    pub fn nblocks(&self) -> u32 {
        u32::try_from(self.crcs.len() / CRC_LEN).expect("at most MAX_RECORD_BLOCKS")
    }
}

/// A log record as the engine means it: what each kind does, in typed
/// fields rather than the header's `arg`, `arg2` and `arg3`.
///
/// The engine builds records only as `LogRecord`s and applies only
/// `LogRecord`s. [`LogRecord::header`] and [`LogRecord::payload`] are the
/// one place that lays a record out on disk, and [`LogRecord::decode`] the
/// one place that reads it back, so the two cannot drift apart; a unit test
/// pins the bytes to the format of `docs/on-disk-format.md`. Names and data
/// are borrowed (from the caller when appending, from the segment image
/// when replaying): appending a write copies nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogRecord<'a> {
    /// Data for `blocks.nblocks()` blocks of `volume` from `block`.
    Write {
        volume: VolumeId,
        block: u64,
        blocks: Blocks<'a>,
    },
    /// Blocks read as zeros and stay allocated.
    Zero {
        volume: VolumeId,
        block: u64,
        nblocks: u32,
    },
    /// Blocks become unmapped.
    Trim {
        volume: VolumeId,
        block: u64,
        nblocks: u32,
    },
    /// A new volume (`ephemeral`: deleted when the pool is next opened).
    CreateVolume {
        volume: VolumeId,
        size_bytes: u64,
        name: &'a str,
        ephemeral: bool,
    },
    /// The volume's new size; blocks past it are dropped.
    ResizeVolume {
        volume: VolumeId,
        size_bytes: u64,
    },
    /// The volume goes, with its blocks and snapshots.
    DeleteVolume {
        volume: VolumeId,
    },
    /// The volume's current map is frozen under `name`.
    CreateSnapshot {
        volume: VolumeId,
        name: &'a str,
    },
    DeleteSnapshot {
        volume: VolumeId,
        name: &'a str,
    },
    /// The volume takes the content and size of its snapshot.
    Rollback {
        volume: VolumeId,
        snapshot: &'a str,
    },
    /// `volume` (a new id) named `name` starts as a copy-on-write clone of
    /// `source`'s snapshot `snapshot`.
    CloneVolume {
        volume: VolumeId,
        source: VolumeId,
        name: &'a str,
        snapshot: &'a str,
    },
    /// The cleaner's copy of blocks that were at `old` (a block run of a
    /// write or relocate record of `volume`): every map that points at
    /// `old` then points here.
    Relocate {
        volume: VolumeId,
        block: u64,
        blocks: Blocks<'a>,
        old: DataLoc,
    },
    /// The clone forgets its parent link.
    FlattenVolume {
        volume: VolumeId,
    },
    /// The clone's parent volume takes the clone's content and size.
    CommitVolume {
        volume: VolumeId,
    },
    /// Durable mark: every byte of the log before `covers` was synced
    /// before this record was appended.
    Mark {
        covers: LogPosition,
    },
    /// The volume is called `name` from now on.
    RenameVolume {
        volume: VolumeId,
        name: &'a str,
    },
}

impl<'a> LogRecord<'a> {
    pub fn kind(&self) -> RecordKind {
        match self {
            LogRecord::Write { .. } => RecordKind::Write,
            LogRecord::Zero { .. } => RecordKind::Zero,
            LogRecord::Trim { .. } => RecordKind::Trim,
            LogRecord::CreateVolume { .. } => RecordKind::CreateVolume,
            LogRecord::ResizeVolume { .. } => RecordKind::ResizeVolume,
            LogRecord::DeleteVolume { .. } => RecordKind::DeleteVolume,
            LogRecord::CreateSnapshot { .. } => RecordKind::CreateSnapshot,
            LogRecord::DeleteSnapshot { .. } => RecordKind::DeleteSnapshot,
            LogRecord::Rollback { .. } => RecordKind::Rollback,
            LogRecord::CloneVolume { .. } => RecordKind::CloneVolume,
            LogRecord::Relocate { .. } => RecordKind::Relocate,
            LogRecord::FlattenVolume { .. } => RecordKind::FlattenVolume,
            LogRecord::CommitVolume { .. } => RecordKind::CommitVolume,
            LogRecord::Mark { .. } => RecordKind::Mark,
            LogRecord::RenameVolume { .. } => RecordKind::RenameVolume,
        }
    }

    /// The payload as it follows the header, in up to three parts (empty
    /// parts are unused): they go to the store as they are, with the header,
    /// in one vectored write.
    pub fn payload(&self) -> [&'a [u8]; 3] {
        match *self {
            LogRecord::Write { blocks, .. } | LogRecord::Relocate { blocks, .. } => {
                [blocks.crcs, blocks.data, &[]]
            }
            LogRecord::CreateVolume { name, .. }
            | LogRecord::CreateSnapshot { name, .. }
            | LogRecord::DeleteSnapshot { name, .. }
            | LogRecord::RenameVolume { name, .. }
            | LogRecord::Rollback { snapshot: name, .. } => [name.as_bytes(), &[], &[]],
            LogRecord::CloneVolume { name, snapshot, .. } => {
                [name.as_bytes(), b"/", snapshot.as_bytes()]
            }
            LogRecord::Zero { .. }
            | LogRecord::Trim { .. }
            | LogRecord::ResizeVolume { .. }
            | LogRecord::DeleteVolume { .. }
            | LogRecord::FlattenVolume { .. }
            | LogRecord::CommitVolume { .. }
            | LogRecord::Mark { .. } => [&[], &[], &[]],
        }
    }

    /// The header of this record with sequence number `seq`: payload length
    /// and checksum included. Fields a kind does not use are zero.
    pub fn header(&self, seq: u64) -> RecordHeader {
        let mut h = RecordHeader {
            kind: self.kind(),
            seq,
            volume: VolumeId(0),
            block: 0,
            nblocks: 0,
            payload_len: 0,
            arg: 0,
            payload_crc: 0,
            arg2: 0,
            arg3: 0,
        };
        self.fill_fields(&mut h);
        let parts = self.payload();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        h.payload_len = u32::try_from(len).expect("a record's payload is under 4 GiB");
        h.payload_crc = match self {
            // A data record's checksum covers its checksum array; each block
            // is covered by its own entry there.
            LogRecord::Write { blocks, .. } | LogRecord::Relocate { blocks, .. } => {
                crc32c::crc32c(blocks.crcs)
            }
            _ => parts.iter().fold(0, |c, p| crc32c::crc32c_append(c, p)),
        };
        h
    }

    /// Sets the header fields that carry this record's own arguments.
    fn fill_fields(&self, h: &mut RecordHeader) {
        match *self {
            LogRecord::Write {
                volume,
                block,
                blocks,
            } => {
                debug_assert_eq!(
                    blocks.data.len(),
                    blocks.nblocks() as usize * BLOCK_SIZE as usize
                );
                (h.volume, h.block, h.nblocks) = (volume, block, blocks.nblocks());
            }
            LogRecord::Zero {
                volume,
                block,
                nblocks,
            }
            | LogRecord::Trim {
                volume,
                block,
                nblocks,
            } => (h.volume, h.block, h.nblocks) = (volume, block, nblocks),
            LogRecord::CreateVolume {
                volume,
                size_bytes,
                ephemeral,
                ..
            } => {
                (h.volume, h.arg) = (volume, size_bytes);
                h.arg2 = if ephemeral { CREATE_EPHEMERAL } else { 0 };
            }
            LogRecord::ResizeVolume { volume, size_bytes } => {
                (h.volume, h.arg) = (volume, size_bytes)
            }
            LogRecord::CloneVolume { volume, source, .. } => (h.volume, h.arg) = (volume, source.0),
            LogRecord::Relocate {
                volume,
                block,
                blocks,
                old,
            } => {
                (h.volume, h.block, h.nblocks) = (volume, block, blocks.nblocks());
                (h.arg, h.arg2, h.arg3) = (old.seg.0, old.data_off, old.crc_off);
            }
            LogRecord::Mark { covers } => {
                h.arg = covers.seg.0;
                h.arg2 = u32::try_from(covers.offset).expect("segments are under 4 GiB");
            }
            LogRecord::DeleteVolume { volume }
            | LogRecord::CreateSnapshot { volume, .. }
            | LogRecord::DeleteSnapshot { volume, .. }
            | LogRecord::RenameVolume { volume, .. }
            | LogRecord::Rollback { volume, .. }
            | LogRecord::FlattenVolume { volume }
            | LogRecord::CommitVolume { volume } => h.volume = volume,
        }
    }

    /// The whole record, header then payload (for tests and tools; the
    /// engine writes the parts without joining them).
    pub fn encode(&self, seq: u64) -> Vec<u8> {
        let mut out = self.header(seq).encode().to_vec();
        for part in self.payload() {
            out.extend_from_slice(part);
        }
        out
    }

    /// Reads a record back from its header and payload. The header is one
    /// [`RecordHeader::decode`] accepted (so its lengths agree with its
    /// kind); checksums are [`verify_payload`]'s business, not this: a
    /// write whose data is damaged still decodes, so that recovery can say
    /// which blocks are bad. Fields the kind does not use are ignored.
    pub fn decode(h: &RecordHeader, payload: &'a [u8]) -> Result<LogRecord<'a>, DecodeError> {
        if payload.len() != h.payload_len as usize {
            return Err(DecodeError::Short {
                need: h.payload_len as usize,
                have: payload.len(),
            });
        }
        let (volume, block, nblocks) = (h.volume, h.block, h.nblocks);
        Ok(match h.kind {
            RecordKind::Write => LogRecord::Write {
                volume,
                block,
                blocks: blocks_of(h, payload)?,
            },
            RecordKind::Relocate => LogRecord::Relocate {
                volume,
                block,
                blocks: blocks_of(h, payload)?,
                old: DataLoc {
                    seg: SegmentId(h.arg),
                    data_off: h.arg2,
                    crc_off: h.arg3,
                },
            },
            RecordKind::Zero => LogRecord::Zero {
                volume,
                block,
                nblocks,
            },
            RecordKind::Trim => LogRecord::Trim {
                volume,
                block,
                nblocks,
            },
            RecordKind::ResizeVolume => LogRecord::ResizeVolume {
                volume,
                size_bytes: h.arg,
            },
            RecordKind::DeleteVolume => LogRecord::DeleteVolume { volume },
            RecordKind::FlattenVolume => LogRecord::FlattenVolume { volume },
            RecordKind::CommitVolume => LogRecord::CommitVolume { volume },
            RecordKind::Mark => LogRecord::Mark {
                covers: LogPosition {
                    seg: SegmentId(h.arg),
                    offset: u64::from(h.arg2),
                },
            },
            RecordKind::CreateVolume
            | RecordKind::CreateSnapshot
            | RecordKind::DeleteSnapshot
            | RecordKind::Rollback
            | RecordKind::RenameVolume
            | RecordKind::CloneVolume => {
                let name = std::str::from_utf8(payload)
                    .map_err(|_| DecodeError::Inconsistent("name is not UTF-8"))?;
                LogRecord::decode_named(h, name)?
            }
        })
    }

    /// [`LogRecord::decode`] of the kinds whose payload is a name.
    fn decode_named(h: &RecordHeader, name: &'a str) -> Result<LogRecord<'a>, DecodeError> {
        let volume = h.volume;
        Ok(match h.kind {
            RecordKind::CreateVolume => LogRecord::CreateVolume {
                volume,
                size_bytes: h.arg,
                name,
                ephemeral: h.arg2 & CREATE_EPHEMERAL != 0,
            },
            RecordKind::CreateSnapshot => LogRecord::CreateSnapshot { volume, name },
            RecordKind::DeleteSnapshot => LogRecord::DeleteSnapshot { volume, name },
            RecordKind::RenameVolume => LogRecord::RenameVolume { volume, name },
            RecordKind::Rollback => LogRecord::Rollback {
                volume,
                snapshot: name,
            },
            RecordKind::CloneVolume => {
                let (name, snapshot) = name
                    .split_once('/')
                    .ok_or(DecodeError::Inconsistent("no '/' between names"))?;
                LogRecord::CloneVolume {
                    volume,
                    source: VolumeId(h.arg),
                    name,
                    snapshot,
                }
            }
            // `decode` passes only the kinds above; a decoder never panics.
            _ => return Err(DecodeError::Inconsistent("not a record with a name")),
        })
    }
}

/// A data record's payload split into its checksums and its blocks.
fn blocks_of<'a>(h: &RecordHeader, payload: &'a [u8]) -> Result<Blocks<'a>, DecodeError> {
    let n = h.nblocks as usize;
    match payload.split_at_checked(n * CRC_LEN) {
        Some((crcs, data)) if data.len() == n * BLOCK_SIZE as usize => Ok(Blocks { crcs, data }),
        _ => Err(DecodeError::Inconsistent("write record block count")),
    }
}

/// Where the data of a write or relocate record of `nblocks` blocks at
/// byte `rec_off` of segment `seg` lies: its checksums follow the header,
/// its blocks follow them.
pub fn data_loc(seg: SegmentId, rec_off: u64, nblocks: u32) -> DataLoc {
    let crc_off = rec_off + RECORD_HEADER_LEN as u64;
    let data_off = crc_off + u64::from(nblocks) * CRC_LEN as u64;
    DataLoc {
        seg,
        data_off: u32::try_from(data_off).expect("segment under 4 GiB"),
        crc_off: u32::try_from(crc_off).expect("segment under 4 GiB"),
    }
}

/// Payload bytes of a write record of `nblocks` blocks: checksums, then data.
pub fn write_payload_len(nblocks: u32) -> usize {
    nblocks as usize * (CRC_LEN + BLOCK_SIZE as usize)
}

/// Checksums of each block of `data` (a whole number of blocks), laid out
/// as they go to disk.
pub fn block_crcs(data: &[u8]) -> Vec<u8> {
    debug_assert_eq!(data.len() % BLOCK_SIZE as usize, 0);
    let mut out = Vec::with_capacity(data.len() / BLOCK_SIZE as usize * CRC_LEN);
    for block in data.chunks_exact(BLOCK_SIZE as usize) {
        out.extend_from_slice(&crc32c::crc32c(block).to_le_bytes());
    }
    out
}

/// Checks a record's payload against its header. For a write record the
/// payload is the checksum array then the data, and every block is checked,
/// so a record torn anywhere is rejected.
pub fn verify_payload(h: &RecordHeader, payload: &[u8]) -> Result<(), DecodeError> {
    if payload.len() != h.payload_len as usize {
        return Err(DecodeError::Short {
            need: h.payload_len as usize,
            have: payload.len(),
        });
    }
    match h.kind {
        RecordKind::Write | RecordKind::Relocate => {
            let crc_bytes = h.nblocks as usize * CRC_LEN;
            let (crcs, data) = payload.split_at(crc_bytes);
            if crc32c::crc32c(crcs) != h.payload_crc {
                return Err(DecodeError::PayloadChecksum);
            }
            for (i, block) in data.chunks_exact(BLOCK_SIZE as usize).enumerate() {
                if crc32c::crc32c(block) != le_u32(crcs, i * CRC_LEN) {
                    return Err(DecodeError::DataChecksum { index: i as u32 });
                }
            }
            Ok(())
        }
        _ => {
            if crc32c::crc32c(payload) != h.payload_crc {
                return Err(DecodeError::PayloadChecksum);
            }
            Ok(())
        }
    }
}

/// What [`scan_record`] found at an offset of a segment image.
#[derive(Debug)]
pub enum Scanned<'a> {
    /// A valid record.
    Record {
        header: RecordHeader,
        payload: &'a [u8],
    },
    /// A record whose header is valid and whose whole length lies in the
    /// image, but whose payload fails its checks. Its length is known, so
    /// what follows it can still be read.
    Damaged {
        header: RecordHeader,
        payload: &'a [u8],
        error: DecodeError,
    },
    /// No record starts here: the header is invalid, or the record runs
    /// past the end of the image. Where the next record starts is unknown.
    Broken { error: DecodeError },
}

impl Scanned<'_> {
    /// The header of a record whose length is known (valid or damaged):
    /// what a walk steps over. `None` where no record starts.
    pub fn header(&self) -> Option<RecordHeader> {
        match self {
            Scanned::Record { header, .. } | Scanned::Damaged { header, .. } => Some(*header),
            Scanned::Broken { .. } => None,
        }
    }
}

/// Reads the record at `pos` of a segment image; `None` at the image's end.
pub fn scan_record(image: &[u8], pos: usize) -> Option<Scanned<'_>> {
    let rest = image.get(pos..).filter(|r| !r.is_empty())?;
    let header = match RecordHeader::decode(rest) {
        Ok(h) => h,
        Err(error) => return Some(Scanned::Broken { error }),
    };
    let total = header.record_len() as usize;
    if rest.len() < total {
        let error = DecodeError::Short {
            need: total,
            have: rest.len(),
        };
        return Some(Scanned::Broken { error });
    }
    let payload = &rest[RECORD_HEADER_LEN..total];
    Some(match verify_payload(&header, payload) {
        Ok(()) => Scanned::Record { header, payload },
        Err(error) => Scanned::Damaged {
            header,
            payload,
            error,
        },
    })
}

/// Indexes of the blocks of a write or relocate record whose data does not
/// match the checksum stored for it (a damaged checksum counts against its
/// block). `payload` is the record's whole payload.
pub fn bad_blocks(h: &RecordHeader, payload: &[u8]) -> Vec<u32> {
    debug_assert!(matches!(h.kind, RecordKind::Write | RecordKind::Relocate));
    let crc_bytes = h.nblocks as usize * CRC_LEN;
    if payload.len() != write_payload_len(h.nblocks) {
        return (0..h.nblocks).collect();
    }
    let (crcs, data) = payload.split_at(crc_bytes);
    data.chunks_exact(BLOCK_SIZE as usize)
        .enumerate()
        .filter(|(i, block)| crc32c::crc32c(block) != le_u32(crcs, i * CRC_LEN))
        .map(|(i, _)| i as u32)
        .collect()
}

/// The offset of the first record header at or after `from` that decodes
/// and has sequence number `seq` or more: where reading can resume after
/// bytes that are not a record. Candidates are only trusted together with
/// what follows them (see recovery), since data can hold a valid header.
pub fn find_next_header(image: &[u8], from: usize, min_seq: u64) -> Option<(usize, RecordHeader)> {
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut at = from;
    while at + RECORD_HEADER_LEN <= image.len() {
        let i = image[at..].windows(4).position(|w| w == magic)?;
        at += i;
        if let Ok(h) = RecordHeader::decode(&image[at..])
            && h.seq >= min_seq
        {
            return Some((at, h));
        }
        at += 1;
    }
    None
}

/// Walks the records of a segment image, yielding each valid record with its
/// offset, and stopping at the first invalid or incomplete one. Returns the
/// offset just past the last valid record in [`RecordIter::valid_len`].
pub struct RecordIter<'a> {
    image: &'a [u8],
    pos: usize,
    error: Option<(usize, DecodeError)>,
}

impl<'a> RecordIter<'a> {
    /// `start` is the offset of the first record to read (after the segment
    /// header, or a checkpoint's position inside the segment).
    pub fn new(image: &'a [u8], start: usize) -> RecordIter<'a> {
        RecordIter {
            image,
            pos: start.min(image.len()),
            error: None,
        }
    }

    /// Offset just past the last valid record returned so far.
    pub fn valid_len(&self) -> usize {
        self.pos
    }

    /// Why iteration stopped early, if it did (and at which offset).
    pub fn error(&self) -> Option<&(usize, DecodeError)> {
        self.error.as_ref()
    }
}

impl<'a> Iterator for RecordIter<'a> {
    /// (record offset, header, payload)
    type Item = (usize, RecordHeader, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.error.is_some() {
            return None;
        }
        match scan_record(self.image, self.pos)? {
            Scanned::Record { header, payload } => {
                let at = self.pos;
                self.pos += header.record_len() as usize;
                Some((at, header, payload))
            }
            Scanned::Damaged { error, .. } | Scanned::Broken { error } => {
                self.error = Some((self.pos, error));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_record(seq: u64, data: &[u8]) -> Vec<u8> {
        let crcs = block_crcs(data);
        let nblocks = (data.len() / BLOCK_SIZE as usize) as u32;
        let h = RecordHeader {
            kind: RecordKind::Write,
            seq,
            volume: VolumeId(7),
            block: 10,
            nblocks,
            payload_len: write_payload_len(nblocks) as u32,
            arg: 0,
            payload_crc: crc32c::crc32c(&crcs),
            arg2: 0,
            arg3: 0,
        };
        let mut out = h.encode().to_vec();
        out.extend_from_slice(&crcs);
        out.extend_from_slice(data);
        out
    }

    /// Found by the fuzzer: a header with its flags or reserved bytes set
    /// (and a checksum that covers them) decoded, and re-encoded to other
    /// bytes.
    #[test]
    fn reserved_header_bytes_must_be_zero() {
        let rec = write_record(1, &[1u8; 4096]);
        assert!(RecordHeader::decode(&rec).is_ok());
        for i in 5..8 {
            let mut h = rec[..RECORD_HEADER_LEN].to_vec();
            h[i] = 1;
            let crc = crc32c::crc32c(&h[..60]);
            h[60..64].copy_from_slice(&crc.to_le_bytes());
            assert!(RecordHeader::decode(&h).is_err(), "byte {i}");
        }
    }

    #[test]
    fn roundtrip_and_torn_tail() {
        let mut image = encode_segment_header(SegmentId(3)).to_vec();
        assert_eq!(decode_segment_header(&image).unwrap(), SegmentId(3));
        image.extend(write_record(1, &[1u8; 8192]));
        let good = image.len();
        image.extend(write_record(2, &[2u8; 4096]));
        // Tear the last record in its data.
        let n = image.len();
        image[n - 100] ^= 1;
        let mut it = RecordIter::new(&image, SEGMENT_HEADER_LEN as usize);
        let recs: Vec<_> = it.by_ref().collect();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].1.seq, 1);
        assert_eq!(it.valid_len(), good);
        assert!(matches!(
            it.error(),
            Some((_, DecodeError::DataChecksum { index: 0 }))
        ));
    }

    /// One record of every kind, with every field set to something that
    /// shows up in the bytes.
    fn every_kind<'a>(crcs: &'a [u8], data: &'a [u8]) -> Vec<LogRecord<'a>> {
        let v = VolumeId(7);
        let blocks = Blocks { crcs, data };
        vec![
            LogRecord::Write {
                volume: v,
                block: 10,
                blocks,
            },
            LogRecord::Zero {
                volume: v,
                block: 11,
                nblocks: 3,
            },
            LogRecord::Trim {
                volume: v,
                block: 12,
                nblocks: u32::MAX,
            },
            LogRecord::CreateVolume {
                volume: v,
                size_bytes: 1 << 30,
                name: "disk-0",
                ephemeral: false,
            },
            LogRecord::CreateVolume {
                volume: VolumeId(8),
                size_bytes: 4096,
                name: "scratch",
                ephemeral: true,
            },
            LogRecord::ResizeVolume {
                volume: v,
                size_bytes: 2 << 30,
            },
            LogRecord::DeleteVolume { volume: v },
            LogRecord::CreateSnapshot {
                volume: v,
                name: "s1",
            },
            LogRecord::DeleteSnapshot {
                volume: v,
                name: "s1",
            },
            LogRecord::Rollback {
                volume: v,
                snapshot: "s2",
            },
            LogRecord::RenameVolume {
                volume: v,
                name: ".trash.7",
            },
            LogRecord::CloneVolume {
                volume: VolumeId(9),
                source: v,
                name: "clone",
                snapshot: "s2",
            },
            LogRecord::Relocate {
                volume: v,
                block: 13,
                blocks,
                old: DataLoc {
                    seg: SegmentId(5),
                    data_off: 4096 + 64,
                    crc_off: 64 + 64,
                },
            },
            LogRecord::FlattenVolume { volume: v },
            LogRecord::CommitVolume { volume: v },
            LogRecord::Mark {
                covers: LogPosition {
                    seg: SegmentId(6),
                    offset: 123_456,
                },
            },
        ]
    }

    #[test]
    fn every_kind_round_trips_through_the_log_format() {
        let data = [[3u8; 4096], [4u8; 4096]].concat();
        let crcs = block_crcs(&data);
        let records = every_kind(&crcs, &data);
        let kinds: std::collections::BTreeSet<u8> =
            records.iter().map(|r| r.kind() as u8).collect();
        assert_eq!(kinds.len(), 15, "every kind is covered");
        for (i, rec) in records.iter().enumerate() {
            let seq = 100 + i as u64;
            let bytes = rec.encode(seq);
            let found = scan_record(&bytes, 0).expect("a record");
            let Scanned::Record { header, payload } = found else {
                panic!("{rec:?} does not verify: {found:?}");
            };
            assert_eq!(header, rec.header(seq));
            assert_eq!(header.seq, seq);
            assert_eq!(header.record_len(), bytes.len() as u64);
            assert_eq!(LogRecord::decode(&header, payload).as_ref(), Ok(rec));
        }
    }

    // The hand-built headers the engine wrote before records were typed,
    // kept verbatim: the typed form must write the very same bytes.
    fn old_meta_header(kind: RecordKind, volume: VolumeId, arg: u64) -> RecordHeader {
        RecordHeader {
            kind,
            seq: 0,
            volume,
            block: 0,
            nblocks: 0,
            payload_len: 0,
            arg,
            payload_crc: crc32c::crc32c(&[]),
            arg2: 0,
            arg3: 0,
        }
    }

    fn old_named_header(
        kind: RecordKind,
        volume: VolumeId,
        arg: u64,
        payload: &[u8],
    ) -> RecordHeader {
        RecordHeader {
            kind,
            seq: 0,
            volume,
            block: 0,
            nblocks: 0,
            payload_len: payload.len() as u32,
            arg,
            payload_crc: crc32c::crc32c(payload),
            arg2: 0,
            arg3: 0,
        }
    }

    /// The old encoding of each record of [`every_kind`], in order.
    fn old_encodings(crcs: &[u8], data: &[u8]) -> Vec<(RecordHeader, Vec<u8>)> {
        let v = VolumeId(7);
        let n = (crcs.len() / CRC_LEN) as u32;
        let write = RecordHeader {
            kind: RecordKind::Write,
            seq: 0,
            volume: v,
            block: 10,
            nblocks: n,
            payload_len: write_payload_len(n) as u32,
            arg: 0,
            payload_crc: crc32c::crc32c(crcs),
            arg2: 0,
            arg3: 0,
        };
        let zero = |kind, block, nblocks| RecordHeader {
            kind,
            seq: 0,
            volume: v,
            block,
            nblocks,
            payload_len: 0,
            arg: 0,
            payload_crc: crc32c::crc32c(&[]),
            arg2: 0,
            arg3: 0,
        };
        let create = |volume, size, name: &str, ephemeral| RecordHeader {
            kind: RecordKind::CreateVolume,
            seq: 0,
            volume,
            block: 0,
            nblocks: 0,
            payload_len: name.len() as u32,
            arg: size,
            payload_crc: crc32c::crc32c(name.as_bytes()),
            arg2: if ephemeral { CREATE_EPHEMERAL } else { 0 },
            arg3: 0,
        };
        let relocate = RecordHeader {
            kind: RecordKind::Relocate,
            seq: 0,
            volume: v,
            block: 13,
            nblocks: n,
            payload_len: write_payload_len(n) as u32,
            arg: 5,
            payload_crc: crc32c::crc32c(crcs),
            arg2: 4096 + 64,
            arg3: 64 + 64,
        };
        let mark = RecordHeader {
            kind: RecordKind::Mark,
            seq: 0,
            volume: VolumeId(0),
            block: 0,
            nblocks: 0,
            payload_len: 0,
            arg: 6,
            payload_crc: crc32c::crc32c(&[]),
            arg2: u32::try_from(123_456u64).unwrap(),
            arg3: 0,
        };
        let named = |kind, name: &str| (old_named_header(kind, v, 0, name.as_bytes()), name.into());
        let clone = format!("{}/{}", "clone", "s2");
        let none = Vec::new;
        vec![
            (write, [crcs, data].concat()),
            (zero(RecordKind::Zero, 11, 3), none()),
            (zero(RecordKind::Trim, 12, u32::MAX), none()),
            (create(v, 1 << 30, "disk-0", false), b"disk-0".to_vec()),
            (
                create(VolumeId(8), 4096, "scratch", true),
                b"scratch".to_vec(),
            ),
            (
                old_meta_header(RecordKind::ResizeVolume, v, 2 << 30),
                none(),
            ),
            (old_meta_header(RecordKind::DeleteVolume, v, 0), none()),
            named(RecordKind::CreateSnapshot, "s1"),
            named(RecordKind::DeleteSnapshot, "s1"),
            named(RecordKind::Rollback, "s2"),
            named(RecordKind::RenameVolume, ".trash.7"),
            (
                old_named_header(RecordKind::CloneVolume, VolumeId(9), v.0, clone.as_bytes()),
                clone.into_bytes(),
            ),
            (relocate, [crcs, data].concat()),
            (old_meta_header(RecordKind::FlattenVolume, v, 0), none()),
            (old_meta_header(RecordKind::CommitVolume, v, 0), none()),
            (mark, none()),
        ]
    }

    #[test]
    fn typed_records_write_the_bytes_hand_built_headers_did() {
        let data = [[3u8; 4096], [4u8; 4096]].concat();
        let crcs = block_crcs(&data);
        let records = every_kind(&crcs, &data);
        let old = old_encodings(&crcs, &data);
        assert_eq!(records.len(), old.len());
        for (rec, (mut h, payload)) in records.iter().zip(old) {
            h.seq = 42;
            let mut want = h.encode().to_vec();
            want.extend_from_slice(&payload);
            assert_eq!(rec.encode(42), want, "{rec:?}");
        }
    }

    #[test]
    fn decode_refuses_what_no_engine_wrote() {
        let clone = old_named_header(RecordKind::CloneVolume, VolumeId(2), 1, b"no-slash");
        assert_eq!(
            LogRecord::decode(&clone, b"no-slash"),
            Err(DecodeError::Inconsistent("no '/' between names"))
        );
        let snap = old_named_header(RecordKind::CreateSnapshot, VolumeId(2), 0, &[0xff, 0xfe]);
        assert_eq!(
            LogRecord::decode(&snap, &[0xff, 0xfe]),
            Err(DecodeError::Inconsistent("name is not UTF-8"))
        );
        assert!(matches!(
            LogRecord::decode(&snap, b"x"),
            Err(DecodeError::Short { need: 2, have: 1 })
        ));
    }

    #[test]
    fn decoders_reject_garbage_without_panicking() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for len in 0..200 {
            let buf: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            if let Ok(h) = RecordHeader::decode(&buf) {
                let payload = buf.get(RECORD_HEADER_LEN..).unwrap_or_default();
                let _ = LogRecord::decode(&h, payload);
            }
            let _ = decode_segment_header(&buf);
            let _ = RecordIter::new(&buf, 0).count();
        }
    }
}
