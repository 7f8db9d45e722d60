//! The `Volume` handle: reads, writes, trims, write-zeroes and block status
//! of one volume, or reads of one of its snapshots.
//!
//! Reads take the state lock only for the map lookup, then read the store
//! while holding the delete gate shared (the cleaner cannot delete a
//! segment under them), and check every block against its checksum.
//! Writes append under the state lock; partial blocks are read, patched and
//! written whole under it, so concurrent partial writes never lose each
//! other.

use vpool_ratelog::{LOG_PERIOD, RateLimitedLog};

use super::Pool;
use super::state::State;
use crate::error::{EngineError, Result};
use crate::extent_map::{DataLoc, ExtentMap, Piece, Target};
use crate::record::{self, Blocks, CRC_LEN, LogRecord, MAX_RECORD_BLOCKS};
use crate::types::{BLOCK_SIZE, VolumeId};

/// NBD `base:allocation` flag: the range is a hole (unallocated).
pub const STATE_HOLE: u32 = 1;
/// NBD `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;

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
    /// A handle on volume `id` named `name`, or on its snapshot `snapshot`.
    pub(super) fn new(pool: Pool, id: VolumeId, name: &str, snapshot: Option<&str>) -> Volume {
        Volume {
            pool,
            id,
            name: name.to_string(),
            snapshot: snapshot.map(str::to_string),
        }
    }

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
            .table
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
        // Holes read as zeros without the store: it is asked first.
        self.pool.inner.store.admit_read()?;
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
        // A change, though it stores no data.
        self.pool.inner.store.admit_write(0)?;
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
        self.pool.inner.store.admit_write(0)?;
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
        self.pool.inner.store.admit_read()?;
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

impl Pool {
    /// Reads `pieces` (a lookup from `first_block`) into `out`, checking
    /// every block against its checksum. `volume` names the image in errors.
    fn read_pieces(
        &self,
        volume: &str,
        first_block: u64,
        pieces: &[Piece],
        out: &mut [u8],
    ) -> Result<()> {
        let mut crcs = Vec::new();
        for p in pieces {
            let at = ((p.start_block - first_block) * BLOCK_SIZE) as usize;
            let dst = &mut out[at..at + (p.len_blocks * BLOCK_SIZE) as usize];
            match p.target {
                None | Some(Target::Zero) => dst.fill(0),
                Some(Target::Data(d)) => {
                    crcs.resize(p.len_blocks as usize * CRC_LEN, 0);
                    self.read_data(d, &mut crcs, dst)?;
                    verify_blocks(volume, p.start_block, d, &crcs, dst)?;
                }
            }
        }
        Ok(())
    }

    /// Reads the blocks at `d` into `dst` and their checksums into `crcs`.
    fn read_data(&self, d: DataLoc, crcs: &mut [u8], dst: &mut [u8]) -> Result<()> {
        let store = &self.inner.store;
        if u64::from(d.crc_off) + crcs.len() as u64 == u64::from(d.data_off) {
            // The piece is a whole record: its checksums sit right before
            // its data, so one read fetches both.
            let mut both = vec![0u8; crcs.len() + dst.len()];
            store.read_at(d.seg, u64::from(d.crc_off), &mut both)?;
            crcs.copy_from_slice(&both[..crcs.len()]);
            dst.copy_from_slice(&both[crcs.len()..]);
        } else {
            store.read_at(d.seg, u64::from(d.crc_off), crcs)?;
            store.read_at(d.seg, u64::from(d.data_off), dst)?;
        }
        Ok(())
    }
}

/// Checks blocks read from `d` (volume blocks from `start_block`) against
/// their checksums: a mismatch is an error naming where, never data.
fn verify_blocks(
    volume: &str,
    start_block: u64,
    d: DataLoc,
    crcs: &[u8],
    data: &[u8],
) -> Result<()> {
    for (i, block) in data.chunks_exact(BLOCK_SIZE as usize).enumerate() {
        let want = u32::from_le_bytes(crcs[i * CRC_LEN..][..CRC_LEN].try_into().expect("4"));
        if crc32c::crc32c(block) == want {
            continue;
        }
        let err = EngineError::Corrupt {
            volume: volume.to_string(),
            offset: (start_block + i as u64) * BLOCK_SIZE,
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
    Ok(())
}
