//! `.vdiff` files: the incremental backups of a volume that `vpool vol
//! export-diff` writes and `vpool vol import-diff` applies. This crate is
//! the codec only: it reads from any [`Read`](std::io::Read) and writes to
//! any [`Write`](std::io::Write), and knows nothing of the API that moves
//! the data (that is `crates/vpool/src/vdiff.rs`). The format is documented
//! in `docs/vdiff.md`; in short, all integers little-endian:
//!
//! ```text
//! header   magic "VPOOLDIF" | version u32 = 1 | flags u32 = 0
//!          | target_size u64 | from_size u64
//!          | volume, from, to: each u16 length + UTF-8 bytes ("" = live volume)
//! records  offset u64 | len u64 | kind u8 (1 data, 2 zero) | data (len bytes, data only)
//! end      offset = record count u64 | len = data bytes u64 | kind u8 = 0
//! trailer  SHA-256 of every byte before it (32 bytes)
//! ```
//!
//! Records are in increasing offset order, do not overlap, lie inside
//! `target_size`, and a data record carries at most [`MAX_RECORD_DATA`]
//! bytes, so writer and reader both work in bounded memory.
//!
//! - [`Writer`] writes a file: header, records in order (adjacent zero
//!   ranges merged, data split into records of at most
//!   [`MAX_RECORD_DATA`]), end record and trailer.
//! - [`Reader`] reads one, checking as it goes: it hands out records one at
//!   a time and, at [`Reader::finish`], checks the end record, the checksum
//!   and that nothing follows. [`check`] and [`scan`] wrap it.
//!
//! Nothing read is trusted: every length is bounded before it is used
//! (names, record ranges, data), arithmetic on read values is checked, and
//! memory grows only with bytes actually read, never with a length field.
//! Any input either decodes or is refused with an [`Error`]; the reader
//! never panics (`fuzz/fuzz_targets/vdiff_reader.rs`).

mod read;
mod write;

pub use read::{Reader, check, scan};
pub use write::Writer;

/// The first 8 bytes of every `.vdiff` file.
pub const MAGIC: &[u8; 8] = b"VPOOLDIF";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Record kind of the end record.
pub const KIND_END: u8 = 0;
/// Record kind of a data record.
pub const KIND_DATA: u8 = 1;
/// Record kind of a zero record.
pub const KIND_ZERO: u8 = 2;
/// Most bytes one data record carries: one request of the API's data plane
/// (`vpool_api::MAX_DATA_BYTES`, checked where both are in scope).
pub const MAX_RECORD_DATA: u64 = 8 << 20;
/// Longest name in the header.
pub const MAX_NAME_BYTES: usize = 4096;
/// Bytes of the SHA-256 trailer.
pub const TRAILER_BYTES: usize = 32;
/// The target size is a whole number of these (the engine's block size,
/// `vpool_engine::BLOCK_SIZE`).
pub const SIZE_UNIT: u64 = 4096;
/// Largest target size (the engine's `MAX_VOLUME_SIZE_BYTES`, 1 PiB).
pub const MAX_TARGET_SIZE: u64 = 1 << 50;
/// Bytes of a record head (and of the end record): offset, len, kind.
pub const RECORD_HEAD_BYTES: usize = 17;

/// Whether `size` can be a file's `target_size`: a volume size.
pub fn is_target_size(size: u64) -> bool {
    size != 0 && size.is_multiple_of(SIZE_UNIT) && size <= MAX_TARGET_SIZE
}

/// The header of a `.vdiff` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Size of the `to` image: the volume is resized to it before applying.
    pub target_size: u64,
    /// Size of the `from` image (informational).
    pub from_size: u64,
    /// The volume the diff was taken of (informational).
    pub volume: String,
    /// The base snapshot; `None` = the live volume.
    pub from: Option<String>,
    /// The target snapshot; `None` = the live volume.
    pub to: Option<String>,
}

/// One record, as a reader hands it out.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// `data` is the target image's content at `offset`.
    Data { offset: u64, data: &'a [u8] },
    /// `[offset, offset + len)` reads as zeros in the target image.
    Zero { offset: u64, len: u64 },
}

impl Record<'_> {
    /// Where the record starts.
    pub fn offset(&self) -> u64 {
        match *self {
            Record::Data { offset, .. } | Record::Zero { offset, .. } => offset,
        }
    }

    /// How many bytes of the image it covers.
    pub fn len(&self) -> u64 {
        match *self {
            Record::Data { data, .. } => data.len() as u64,
            Record::Zero { len, .. } => len,
        }
    }

    /// Always false for a record that was read or written: records are
    /// never empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a file holds, once checked (or written).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    pub header: Header,
    /// Data and zero records, not counting the end record.
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    /// The file's length, trailer included.
    pub file_bytes: u64,
    /// `sha256:<hex>` of the file's content (its trailer).
    pub checksum: String,
}

/// Why a file was refused. The messages do not name the file: the caller
/// knows it and adds it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the file ends inside the {what} (truncated?)")]
    Truncated { what: &'static str },
    #[error("reading the {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("not a .vdiff file (it does not start with \"VPOOLDIF\")")]
    NotVdiff,
    #[error(".vdiff version {0}; this vpool reads version {VERSION}")]
    Version(u32),
    #[error("unknown header flags {0:#x}")]
    Flags(u32),
    #[error("target size {0} is not a volume size")]
    TargetSize(u64),
    #[error("the header's {what} is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    NameTooLong { what: &'static str, len: usize },
    #[error("the {what} is not UTF-8")]
    NameNotUtf8 { what: &'static str },
    #[error("record {index} at offset {offset} has unknown kind {kind}")]
    UnknownKind { index: u64, offset: u64, kind: u8 },
    #[error(
        "record {index} [{offset}, +{len}) overlaps the one before it or lies outside the target size {target_size}"
    )]
    OutOfBounds {
        index: u64,
        offset: u64,
        len: u64,
        target_size: u64,
    },
    #[error("data record {index} holds {len} bytes; the limit is {MAX_RECORD_DATA}")]
    DataTooLong { index: u64, len: u64 },
    #[error(
        "the end record counts {claimed_records} records and {claimed_data_bytes} data bytes, the file holds {records} and {data_bytes}"
    )]
    EndMismatch {
        claimed_records: u64,
        claimed_data_bytes: u64,
        records: u64,
        data_bytes: u64,
    },
    #[error("the checksum trailer is missing")]
    TrailerMissing,
    #[error(
        "checksum mismatch: the file is damaged (SHA-256 of its content is {computed}, its trailer says {trailer})"
    )]
    ChecksumMismatch { computed: String, trailer: String },
    #[error("bytes after the checksum trailer")]
    TrailingBytes,
    #[error("the reader already refused this file")]
    Refused,
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests;
