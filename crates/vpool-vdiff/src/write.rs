//! Writing a `.vdiff` stream.

use std::io::{self, Write};

use sha2::{Digest, Sha256};

use crate::{
    Header, KIND_DATA, KIND_END, KIND_ZERO, MAGIC, MAX_NAME_BYTES, MAX_RECORD_DATA,
    RECORD_HEAD_BYTES, Summary, TRAILER_BYTES, VERSION, hex, is_target_size,
};

/// Writes a `.vdiff` stream: [`Writer::new`] (the header), records in
/// increasing offset order ([`Writer::zero`], [`Writer::data`]), then
/// [`Writer::finish`] (end record and trailer). It refuses what a
/// [`Reader`](crate::Reader) would refuse: a target size that is not a
/// volume size, a name over [`MAX_NAME_BYTES`], a record out of order, empty
/// or past the target size.
pub struct Writer<W: Write> {
    pub(crate) out: W,
    hash: Sha256,
    header: Header,
    bytes: u64,
    pub(crate) records: u64,
    data_bytes: u64,
    zero_bytes: u64,
    /// End of the last record: the next must start at or after it.
    end: u64,
    /// A zero range not written yet, so adjacent zero ranges merge.
    pending_zero: Option<(u64, u64)>,
}

impl<W: Write> Writer<W> {
    /// Writes the header of a file described by `h`.
    pub fn new(mut out: W, h: &Header) -> io::Result<Writer<W>> {
        if !is_target_size(h.target_size) {
            return Err(io::Error::other(format!(
                "target size {} is not a volume size",
                h.target_size
            )));
        }
        let mut head = Vec::with_capacity(64);
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&VERSION.to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        head.extend_from_slice(&h.target_size.to_le_bytes());
        head.extend_from_slice(&h.from_size.to_le_bytes());
        for name in [
            h.volume.as_str(),
            h.from.as_deref().unwrap_or(""),
            h.to.as_deref().unwrap_or(""),
        ] {
            let n = u16::try_from(name.len())
                .ok()
                .filter(|&n| usize::from(n) <= MAX_NAME_BYTES)
                .ok_or_else(|| io::Error::other("name too long for a .vdiff header"))?;
            head.extend_from_slice(&n.to_le_bytes());
            head.extend_from_slice(name.as_bytes());
        }
        out.write_all(&head)?;
        let mut hash = Sha256::new();
        hash.update(&head);
        Ok(Writer {
            out,
            hash,
            header: h.clone(),
            bytes: head.len() as u64,
            records: 0,
            data_bytes: 0,
            zero_bytes: 0,
            end: 0,
            pending_zero: None,
        })
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.hash.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<u64> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && offset >= self.end && end <= self.header.target_size => Ok(end),
            _ => Err(io::Error::other(format!(
                "record [{offset}, +{len}) out of order or outside the target size {}",
                self.header.target_size
            ))),
        }
    }

    /// Writes a record head as is: the tests make malformed files with it.
    pub(crate) fn record_head(&mut self, offset: u64, len: u64, kind: u8) -> io::Result<()> {
        let mut r = [0u8; RECORD_HEAD_BYTES];
        r[..8].copy_from_slice(&offset.to_le_bytes());
        r[8..16].copy_from_slice(&len.to_le_bytes());
        r[16] = kind;
        self.put(&r)
    }

    fn flush_zero(&mut self) -> io::Result<()> {
        if let Some((offset, len)) = self.pending_zero.take() {
            self.record_head(offset, len, KIND_ZERO)?;
            self.records += 1;
            self.zero_bytes += len;
        }
        Ok(())
    }

    /// A range that reads as zeros in the target image. Adjacent zero
    /// ranges become one record.
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.end = self.check_range(offset, len)?;
        match &mut self.pending_zero {
            // In bounds (checked when it was added), so the sum fits.
            Some((o, l)) if *o + *l == offset => *l += len,
            _ => {
                self.flush_zero()?;
                self.pending_zero = Some((offset, len));
            }
        }
        Ok(())
    }

    /// Data of the target image at `offset`, split into records of at most
    /// [`MAX_RECORD_DATA`] bytes.
    pub fn data(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        let end = self.check_range(offset, data.len() as u64)?;
        self.flush_zero()?;
        let mut at = offset;
        for chunk in data.chunks(MAX_RECORD_DATA as usize) {
            self.record_head(at, chunk.len() as u64, KIND_DATA)?;
            self.put(chunk)?;
            self.records += 1;
            self.data_bytes += chunk.len() as u64;
            at += chunk.len() as u64;
        }
        self.end = end;
        Ok(())
    }

    /// Writes the end record and the checksum, flushes, and returns the
    /// output and what was written.
    pub fn finish(mut self) -> io::Result<(W, Summary)> {
        self.flush_zero()?;
        let (records, data) = (self.records, self.data_bytes);
        self.record_head(records, data, KIND_END)?;
        let digest = std::mem::take(&mut self.hash).finalize();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        let summary = Summary {
            header: self.header,
            records: self.records,
            data_bytes: self.data_bytes,
            zero_bytes: self.zero_bytes,
            file_bytes: self.bytes + TRAILER_BYTES as u64,
            checksum: format!("sha256:{}", hex(&digest)),
        };
        Ok((self.out, summary))
    }
}
