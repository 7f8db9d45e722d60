//! Reading and checking a `.vdiff` stream.

use std::io::{self, Read};

use sha2::{Digest, Sha256};

use crate::{
    Error, Header, KIND_DATA, KIND_END, KIND_ZERO, MAGIC, MAX_NAME_BYTES, MAX_RECORD_DATA, Record,
    Summary, TRAILER_BYTES, VERSION, hex, is_target_size,
};

/// Reads a `.vdiff` stream and checks it as it goes.
///
/// [`Reader::new`] reads and checks the header; [`Reader::next_record`]
/// hands out the records in order, checking each (kind, order, bounds, data
/// length) before reading its data, and returns `None` at an end record
/// whose counts match; [`Reader::finish`] reads whatever records are left,
/// then checks the SHA-256 trailer and that nothing follows it.
///
/// Records are handed out before the checksum is known: check a whole file
/// (e.g. with [`check`]) before acting on what it says. After an error the
/// reader refuses every further call ([`Error::Refused`]).
///
/// It holds at most one record's data in memory ([`MAX_RECORD_DATA`]), and
/// no more than the input actually provides: a length field alone never
/// makes it allocate. Reads go straight to `R`: give it a buffered reader.
pub struct Reader<R: Read> {
    inner: R,
    hash: Sha256,
    /// Bytes read, trailer excluded.
    bytes: u64,
    header: Header,
    records: u64,
    data_bytes: u64,
    zero_bytes: u64,
    /// End of the last record: the next must start at or after it.
    end: u64,
    /// The last data record's bytes.
    pub(crate) buf: Vec<u8>,
    state: State,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Records,
    /// The end record was read and matched.
    Ended,
    /// Something was refused; every further call fails.
    Refused,
}

/// `read_exact` that names what it was reading, and tells a short file from
/// a failing read.
fn read_exact(r: &mut impl Read, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::Truncated { what }
        } else {
            Error::Io { what, source: e }
        }
    })
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header: magic, version, flags, a target size
    /// that is a volume size, names within [`MAX_NAME_BYTES`] and UTF-8.
    pub fn new(inner: R) -> Result<Reader<R>, Error> {
        let mut r = Reader {
            inner,
            hash: Sha256::new(),
            bytes: 0,
            header: Header {
                target_size: 0,
                from_size: 0,
                volume: String::new(),
                from: None,
                to: None,
            },
            records: 0,
            data_bytes: 0,
            zero_bytes: 0,
            end: 0,
            buf: Vec::new(),
            state: State::Records,
        };
        let mut magic = [0u8; 8];
        r.exact(&mut magic, "header")?;
        if &magic != MAGIC {
            return Err(Error::NotVdiff);
        }
        let version = r.u32("header")?;
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let flags = r.u32("header")?;
        if flags != 0 {
            return Err(Error::Flags(flags));
        }
        let target_size = r.u64("header")?;
        let from_size = r.u64("header")?;
        if !is_target_size(target_size) {
            return Err(Error::TargetSize(target_size));
        }
        r.header = Header {
            target_size,
            from_size,
            volume: r.name("volume name")?.unwrap_or_default(),
            from: r.name("base image name")?,
            to: r.name("target image name")?,
        };
        Ok(r)
    }

    /// The header, as read by [`Reader::new`].
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn exact(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), Error> {
        read_exact(&mut self.inner, buf, what)?;
        self.hash.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn name(&mut self, what: &'static str) -> Result<Option<String>, Error> {
        let mut n = [0u8; 2];
        self.exact(&mut n, what)?;
        let len = usize::from(u16::from_le_bytes(n));
        if len > MAX_NAME_BYTES {
            return Err(Error::NameTooLong { what, len });
        }
        let mut b = vec![0u8; len];
        self.exact(&mut b, what)?;
        let s = String::from_utf8(b).map_err(|_| Error::NameNotUtf8 { what })?;
        Ok((!s.is_empty()).then_some(s))
    }

    /// The next record, or `None` once the end record is read (and its
    /// counts match the records before it). Fails on a record of unknown
    /// kind, empty, out of order, overlapping the one before it, past the
    /// target size, or a data record over [`MAX_RECORD_DATA`] bytes.
    pub fn next_record(&mut self) -> Result<Option<Record<'_>>, Error> {
        match self.state {
            State::Records => {}
            State::Ended => return Ok(None),
            State::Refused => return Err(Error::Refused),
        }
        match self.advance() {
            Ok(None) => Ok(None),
            Ok(Some((offset, len, kind))) => Ok(Some(if kind == KIND_ZERO {
                Record::Zero { offset, len }
            } else {
                Record::Data {
                    offset,
                    data: &self.buf,
                }
            })),
            Err(e) => {
                self.state = State::Refused;
                Err(e)
            }
        }
    }

    /// Reads one record (a data record's bytes into `buf`): its offset,
    /// length and kind, or `None` at the end record.
    fn advance(&mut self) -> Result<Option<(u64, u64, u8)>, Error> {
        let offset = self.u64("record")?;
        let len = self.u64("record")?;
        let mut kind = [0u8; 1];
        self.exact(&mut kind, "record")?;
        let kind = kind[0];
        let index = self.records;
        match kind {
            KIND_END => {
                if offset != self.records || len != self.data_bytes {
                    return Err(Error::EndMismatch {
                        claimed_records: offset,
                        claimed_data_bytes: len,
                        records: self.records,
                        data_bytes: self.data_bytes,
                    });
                }
                self.state = State::Ended;
                return Ok(None);
            }
            KIND_DATA | KIND_ZERO => {}
            kind => {
                return Err(Error::UnknownKind {
                    index,
                    offset,
                    kind,
                });
            }
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| len > 0 && offset >= self.end && e <= self.header.target_size)
            .ok_or(Error::OutOfBounds {
                index,
                offset,
                len,
                target_size: self.header.target_size,
            })?;
        self.end = end;
        // Counted before the data is read: a refused data record's message
        // names the count including it.
        self.records += 1;
        if kind == KIND_ZERO {
            // Bounded by the target size (at most 2^50) per record, and
            // records do not overlap: the sum stays within the target size.
            self.zero_bytes += len;
            return Ok(Some((offset, len, kind)));
        }
        if len > MAX_RECORD_DATA {
            return Err(Error::DataTooLong {
                index: self.records,
                len,
            });
        }
        // Read what is there, up to `len`: a length field alone never
        // allocates.
        self.buf.clear();
        let got = (&mut self.inner)
            .take(len)
            .read_to_end(&mut self.buf)
            .map_err(|source| Error::Io {
                what: "record data",
                source,
            })?;
        if got as u64 != len {
            return Err(Error::Truncated {
                what: "record data",
            });
        }
        self.hash.update(&self.buf);
        self.bytes += len;
        self.data_bytes += len;
        Ok(Some((offset, len, kind)))
    }

    /// Reads the records not read yet, then checks the trailer (the SHA-256
    /// of every byte before it) and that the input ends there. Returns what
    /// the file holds, and the input.
    pub fn finish(mut self) -> Result<(Summary, R), Error> {
        while self.next_record()?.is_some() {}
        if self.state != State::Ended {
            return Err(Error::Refused);
        }
        let digest = std::mem::take(&mut self.hash).finalize();
        let mut trailer = [0u8; TRAILER_BYTES];
        read_exact(&mut self.inner, &mut trailer, "checksum trailer").map_err(|e| match e {
            Error::Truncated { .. } => Error::TrailerMissing,
            e => e,
        })?;
        if trailer[..] != digest[..] {
            return Err(Error::ChecksumMismatch {
                computed: hex(&digest),
                trailer: hex(&trailer),
            });
        }
        let mut extra = [0u8; 1];
        loop {
            match self.inner.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(Error::TrailingBytes),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        what: "end of the file",
                        source,
                    });
                }
            }
        }
        let summary = Summary {
            header: self.header,
            records: self.records,
            data_bytes: self.data_bytes,
            zero_bytes: self.zero_bytes,
            file_bytes: self.bytes + TRAILER_BYTES as u64,
            checksum: format!("sha256:{}", hex(&digest)),
        };
        Ok((summary, self.inner))
    }
}

/// Reads and checks a whole `.vdiff` stream; returns what it holds.
pub fn check(input: impl Read) -> Result<Summary, Error> {
    Reader::new(input)?.finish().map(|(s, _)| s)
}

/// Reads and checks a whole `.vdiff` stream, handing each record to `visit`
/// in order. `visit` sees records before the checksum is known: [`check`]
/// a file before applying it. The first error, the reader's or `visit`'s,
/// stops the scan.
pub fn scan<R: Read, E: From<Error>>(
    input: R,
    mut visit: impl FnMut(&Header, Record<'_>) -> Result<(), E>,
) -> Result<Summary, E> {
    let mut r = Reader::new(input)?;
    let header = r.header().clone();
    while let Some(rec) = r.next_record()? {
        visit(&header, rec)?;
    }
    Ok(r.finish()?.0)
}
