//! The flush journal of a pool with remote durability: what a FLUSH sends
//! to the bucket so that losing the host loses no flushed write
//! (`docs/multi-host.md`, section 4).
//!
//! A FLUSH in `remote` mode writes, before it is acknowledged, the log
//! bytes appended since the last one as *journal entries*, each a piece of
//! one segment that is not in the bucket yet:
//!
//! ```text
//! journal/<epoch:016x>/<seq:016x>      create-only; seq 1, 2, 3, ... per epoch
//!
//!  0        8       16      24        32       40      48        52     56      60      64
//!  +--------+-------+-------+---------+--------+-------+---------+------+-------+-------+----------+
//!  | magic  | epoch |  seq  | segment | offset |  len  |data_crc | kind | flags |h_crc  | data ... |
//!  |VPJNL001|  u64  |  u64  |   u64   |  u64   |  u64  |   u32   | u32  |  u32  | u32   | len bytes|
//!  +--------+-------+-------+---------+--------+-------+---------+------+-------+-------+----------+
//!  little-endian; h_crc = CRC-32C of bytes 0..60; data_crc = CRC-32C of the data
//!  kind 1: data (segment's bytes [offset, offset + len)); kind 2: tombstone (no data)
//!  flags bit 0 (data only): the last piece of a flush
//! ```
//!
//! A flush may need several pieces (several segments, or more than
//! [`MAX_ENTRY_DATA`]); only its last ends where a record ends. Replay
//! applies the pieces of a flush only once it has its last one, so a host
//! that died between two pieces leaves no torn record behind (which a
//! later recovery would take for the log's end, and cut what follows).
//!
//! **Fencing.** A host that takes a volume over first creates the old
//! holder's next entry as a *tombstone*. Create-only decides the race: an
//! entry the old holder created before it is replayed by the taker; once the
//! tombstone exists, the old holder's next journal write fails, and it knows
//! it was fenced. So a flush the old holder acknowledged is one whose entry
//! exists, and the taker has it.
//!
//! **Replay.** Opening replays, after the manifest's segments, every
//! epoch's entries in (epoch, seq) order up to its tombstone, a whole flush
//! at a time (the pieces of a flush whose end-of-flush piece is missing
//! are dropped; missing seqs are entries that commits deleted, not an
//! end), writing the data of segments the bucket does not hold into the
//! cache.
//! **Deletion.** Once a commit lists a segment, its entries are dropped.
//!
//! Everything here comes from the bucket and is checked
//! ([`JournalEntry::decode`], fuzzed as `s3_journal`).

/// Where the entries are.
pub const JOURNAL_DIR: &str = "journal";
/// The header's length.
pub const HEADER_LEN: usize = 64;
/// Most data bytes in one entry: a flush that covers more writes several.
pub const MAX_ENTRY_DATA: u64 = 16 << 20;
const MAGIC: &[u8; 8] = b"VPJNL001";
const KIND_DATA: u32 = 1;
const KIND_TOMBSTONE: u32 = 2;
const FLAG_END_OF_FLUSH: u32 = 1;

/// What a FLUSH of a pool on S3 promises.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Durable in this host's cache: losing the host loses what the bucket
    /// does not have yet (the bucket stays a prefix of the history).
    #[default]
    Host,
    /// Durable in the bucket (the flush journal): losing the host loses no
    /// flushed write.
    Remote,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Durability, String> {
        match s {
            "host" => Ok(Durability::Host),
            "remote" => Ok(Durability::Remote),
            other => Err(format!("durability is host or remote, not {other:?}")),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Durability::Host => "host",
            Durability::Remote => "remote",
        })
    }
}

/// What an entry says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// Bytes `[offset, offset + data.len())` of a segment.
    Data {
        segment: u64,
        offset: u64,
        data: Vec<u8>,
        /// The last piece of its flush: the bytes up to here end where a
        /// record ends.
        end_of_flush: bool,
    },
    /// The holder of this epoch was fenced here: nothing after it counts.
    Tombstone,
}

/// One journal object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JournalEntry {
    pub epoch: u64,
    pub seq: u64,
    pub kind: EntryKind,
}

/// `journal/<epoch>/<seq>`.
pub fn entry_key(epoch: u64, seq: u64) -> String {
    format!("{JOURNAL_DIR}/{epoch:016x}/{seq:016x}")
}

/// The (epoch, seq) an entry key names, if it is one.
pub fn parse_entry_key(key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix(JOURNAL_DIR)?.strip_prefix('/')?;
    let (e, s) = rest.split_once('/')?;
    let hex16 = |x: &str| x.len() == 16 && x.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex16(e) || !hex16(s) {
        return None;
    }
    Some((
        u64::from_str_radix(e, 16).ok()?,
        u64::from_str_radix(s, 16).ok()?,
    ))
}

impl JournalEntry {
    /// The object's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, segment, offset, data, flags): (u32, u64, u64, &[u8], u32) = match &self.kind {
            EntryKind::Data {
                segment,
                offset,
                data,
                end_of_flush,
            } => (
                KIND_DATA,
                *segment,
                *offset,
                data,
                if *end_of_flush { FLAG_END_OF_FLUSH } else { 0 },
            ),
            EntryKind::Tombstone => (KIND_TOMBSTONE, 0, 0, &[], 0),
        };
        let mut out = Vec::with_capacity(HEADER_LEN + data.len());
        out.extend_from_slice(MAGIC);
        for v in [self.epoch, self.seq, segment, offset, data.len() as u64] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        let h_crc = crc32c::crc32c(&out[..60]);
        out.extend_from_slice(&h_crc.to_le_bytes());
        debug_assert_eq!(out.len(), HEADER_LEN);
        out.extend_from_slice(data);
        out
    }

    /// Decodes an object read from the bucket, checking everything: the
    /// magic, both checksums, the length, the kind, and that a data piece
    /// fits a segment.
    pub fn decode(bytes: &[u8]) -> Result<JournalEntry, String> {
        if bytes.len() < HEADER_LEN {
            return Err(format!("{} bytes: shorter than a header", bytes.len()));
        }
        let (h, data) = bytes.split_at(HEADER_LEN);
        if &h[..8] != MAGIC {
            return Err("not a journal entry (bad magic)".into());
        }
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
        if crc32c::crc32c(&h[..60]) != u32_at(60) {
            return Err("header checksum mismatch".into());
        }
        let (epoch, seq, segment, offset, len) =
            (u64_at(8), u64_at(16), u64_at(24), u64_at(32), u64_at(40));
        if len != data.len() as u64 {
            return Err(format!("says {len} data bytes, holds {}", data.len()));
        }
        if crc32c::crc32c(data) != u32_at(48) {
            return Err("data checksum mismatch".into());
        }
        let flags = u32_at(56);
        if flags & !FLAG_END_OF_FLUSH != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let kind = match u32_at(52) {
            KIND_DATA => {
                if len == 0 || len > MAX_ENTRY_DATA {
                    return Err(format!("a data piece of {len} bytes"));
                }
                if offset.checked_add(len).is_none() || segment == 0 {
                    return Err(format!("segment {segment} offset {offset}: out of range"));
                }
                EntryKind::Data {
                    segment,
                    offset,
                    data: data.to_vec(),
                    end_of_flush: flags == FLAG_END_OF_FLUSH,
                }
            }
            KIND_TOMBSTONE if len == 0 && segment == 0 && offset == 0 && flags == 0 => {
                EntryKind::Tombstone
            }
            k => return Err(format!("unknown kind {k} (or a tombstone with data)")),
        };
        Ok(JournalEntry { epoch, seq, kind })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_refused() {
        let e = JournalEntry {
            epoch: 7,
            seq: 3,
            kind: EntryKind::Data {
                segment: 12,
                offset: 4096,
                data: vec![5; 1000],
                end_of_flush: true,
            },
        };
        let bytes = e.encode();
        assert_eq!(JournalEntry::decode(&bytes).unwrap(), e);
        for i in [0, 9, 30, 50, 61, 100, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(JournalEntry::decode(&bad).is_err(), "byte {i} flipped");
        }
        assert!(JournalEntry::decode(&bytes[..bytes.len() - 1]).is_err());
        let t = JournalEntry {
            epoch: 7,
            seq: 4,
            kind: EntryKind::Tombstone,
        };
        assert_eq!(JournalEntry::decode(&t.encode()).unwrap(), t);
    }

    #[test]
    fn keys_round_trip_and_strangers_are_not_keys() {
        assert_eq!(parse_entry_key(&entry_key(0x1f, 2)), Some((0x1f, 2)));
        for k in [
            "journal/1/2",
            "journal/000000000000001f",
            "segments/000000000000001f/0000000000000002",
            "journal/000000000000001g/0000000000000002",
        ] {
            assert_eq!(parse_entry_key(k), None, "{k}");
        }
    }
}
