//! The log's on-disk format: segment headers and records.
//!
//! See `docs/on-disk-format.md` for the byte diagrams and the crash analysis.
//! Everything here is pure (no I/O) so the decoders can be fuzzed; every
//! decoder distrusts its input and returns [`DecodeError`] rather than
//! panicking.

use crate::types::{BLOCK_SIZE, VolumeId};
use vpool_store::SegmentId;

/// "VPSEG001": the first 8 bytes of every segment.
pub const SEGMENT_MAGIC: [u8; 8] = *b"VPSEG001";
/// Bytes taken by the segment header; records follow.
pub const SEGMENT_HEADER_LEN: u64 = 64;
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
            | RecordKind::Rollback => {
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

    #[test]
    fn decoders_reject_garbage_without_panicking() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for len in 0..200 {
            let buf: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
            let _ = RecordHeader::decode(&buf);
            let _ = decode_segment_header(&buf);
            let _ = RecordIter::new(&buf, 0).count();
        }
    }
}
