//! `.vdiff` files: incremental backups of a volume (`vol export-diff`) and
//! their restore (`vol import-diff`). The format is documented in
//! `docs/vdiff.md`; in short, all integers little-endian:
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
//! bytes, so writer and reader both work in bounded memory: data moves
//! through the API's data plane in chunks of at most 8 MiB.
//!
//! Applying a file to a volume holding the `from` image (resized to
//! `target_size` first) gives the `to` image byte for byte. The reader
//! checks the whole file (structure and checksum) before it changes
//! anything, and checks the checksum again while applying, so a file that
//! changes under it is noticed.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use sha2::{Digest, Sha256};
use vpool_api::Client;
use vpool_engine::{BLOCK_SIZE, MAX_VOLUME_SIZE_BYTES};

use crate::transfer::{nonzero_runs, progress_bar};

/// The first 8 bytes of every `.vdiff` file.
pub const MAGIC: &[u8; 8] = b"VPOOLDIF";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// Record kinds.
pub const KIND_END: u8 = 0;
pub const KIND_DATA: u8 = 1;
pub const KIND_ZERO: u8 = 2;
/// Most bytes one data record carries: one API data request.
pub const MAX_RECORD_DATA: u64 = vpool_api::MAX_DATA_BYTES as u64;
/// Longest name in the header.
const MAX_NAME_BYTES: usize = 4096;
/// Bytes of the SHA-256 trailer.
const TRAILER_BYTES: usize = 32;

/// The header of a `.vdiff` file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
    Data { offset: u64, data: &'a [u8] },
    Zero { offset: u64, len: u64 },
}

/// What a file holds, once checked.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub header: Header,
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub file_bytes: u64,
    /// `sha256:<hex>` of the file's content (its trailer).
    pub checksum: String,
}

// ----- writing -----

/// Writes a `.vdiff` stream: header, records in order, then [`Writer::finish`].
pub struct Writer<W: Write> {
    out: W,
    hash: Sha256,
    bytes: u64,
    records: u64,
    data_bytes: u64,
    zero_bytes: u64,
    /// End of the last record: the next must start at or after it.
    end: u64,
    target_size: u64,
    /// A zero range not written yet, so adjacent zero ranges merge.
    pending_zero: Option<(u64, u64)>,
}

impl<W: Write> Writer<W> {
    pub fn new(mut out: W, h: &Header) -> io::Result<Writer<W>> {
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
            bytes: head.len() as u64,
            records: 0,
            data_bytes: 0,
            zero_bytes: 0,
            end: 0,
            target_size: h.target_size,
            pending_zero: None,
        })
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.hash.update(b);
        self.bytes += b.len() as u64;
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let ok = len > 0
            && offset >= self.end
            && offset
                .checked_add(len)
                .is_some_and(|e| e <= self.target_size);
        if ok {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "record [{offset}, +{len}) out of order or outside the target size {}",
                self.target_size
            )))
        }
    }

    fn record_head(&mut self, offset: u64, len: u64, kind: u8) -> io::Result<()> {
        let mut r = [0u8; 17];
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

    /// A range that reads as zeros in the target image.
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_range(offset, len)?;
        self.end = offset + len;
        match &mut self.pending_zero {
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
        self.check_range(offset, data.len() as u64)?;
        self.flush_zero()?;
        let mut at = offset;
        for chunk in data.chunks(MAX_RECORD_DATA as usize) {
            self.record_head(at, chunk.len() as u64, KIND_DATA)?;
            self.put(chunk)?;
            self.records += 1;
            self.data_bytes += chunk.len() as u64;
            at += chunk.len() as u64;
        }
        self.end = at;
        Ok(())
    }

    /// Writes the end record and the checksum; returns the output and what
    /// was written.
    pub fn finish(mut self) -> io::Result<(W, u64, u64, u64, u64, String)> {
        self.flush_zero()?;
        let (records, data) = (self.records, self.data_bytes);
        self.record_head(records, data, KIND_END)?;
        let digest = std::mem::take(&mut self.hash).finalize();
        self.out.write_all(&digest)?;
        self.out.flush()?;
        Ok((
            self.out,
            self.records,
            self.data_bytes,
            self.zero_bytes,
            self.bytes + TRAILER_BYTES as u64,
            format!("sha256:{}", vpool_api::catalog::hex(&digest)),
        ))
    }
}

// ----- reading -----

/// A reader that hashes what passes through it.
struct Hashing<R: Read> {
    inner: R,
    hash: Sha256,
    bytes: u64,
}

impl<R: Read> Hashing<R> {
    fn exact(&mut self, buf: &mut [u8], what: &str) -> anyhow::Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                anyhow::anyhow!("the file ends inside the {what} (truncated?)")
            } else {
                anyhow::Error::new(e).context(format!("reading the {what}"))
            }
        })?;
        self.hash.update(&*buf);
        self.bytes += buf.len() as u64;
        Ok(())
    }

    fn u16(&mut self, what: &str) -> anyhow::Result<u16> {
        let mut b = [0u8; 2];
        self.exact(&mut b, what)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self, what: &str) -> anyhow::Result<u32> {
        let mut b = [0u8; 4];
        self.exact(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self, what: &str) -> anyhow::Result<u64> {
        let mut b = [0u8; 8];
        self.exact(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn name(&mut self, what: &str) -> anyhow::Result<Option<String>> {
        let n = usize::from(self.u16(what)?);
        if n > MAX_NAME_BYTES {
            bail!("the header's {what} is {n} bytes long; the limit is {MAX_NAME_BYTES}");
        }
        let mut b = vec![0u8; n];
        self.exact(&mut b, what)?;
        let s = String::from_utf8(b).map_err(|_| anyhow::anyhow!("the {what} is not UTF-8"))?;
        Ok((!s.is_empty()).then_some(s))
    }
}

/// Reads and checks the `.vdiff` file at `path` from start to end, handing
/// each record to `visit` in order. Fails on anything malformed: a bad
/// magic, version or flag, a record out of order or outside the target
/// size, a wrong end record, a checksum mismatch, bytes after the trailer.
/// `visit` sees records before the checksum is known: check a file with a
/// no-op `visit` before applying it.
pub fn scan(
    path: &Path,
    mut visit: impl FnMut(&Header, Record<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<Summary> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = Hashing {
        inner: BufReader::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let mut magic = [0u8; 8];
    r.exact(&mut magic, "header")?;
    if &magic != MAGIC {
        bail!(
            "{} is not a .vdiff file (it does not start with {:?})",
            path.display(),
            String::from_utf8_lossy(MAGIC)
        );
    }
    let version = r.u32("header")?;
    if version != VERSION {
        bail!(
            "{} is .vdiff version {version}; this vpool reads version {VERSION}",
            path.display()
        );
    }
    let flags = r.u32("header")?;
    if flags != 0 {
        bail!("{} has unknown header flags {flags:#x}", path.display());
    }
    let target_size = r.u64("header")?;
    let from_size = r.u64("header")?;
    if target_size == 0
        || !target_size.is_multiple_of(BLOCK_SIZE)
        || target_size > MAX_VOLUME_SIZE_BYTES
    {
        bail!(
            "{}: target size {target_size} is not a volume size",
            path.display()
        );
    }
    let header = Header {
        target_size,
        from_size,
        volume: r.name("volume name")?.unwrap_or_default(),
        from: r.name("base image name")?,
        to: r.name("target image name")?,
    };
    let mut buf = Vec::new();
    let (mut records, mut data_bytes, mut zero_bytes, mut end) = (0u64, 0u64, 0u64, 0u64);
    loop {
        let offset = r.u64("record")?;
        let len = r.u64("record")?;
        let mut kind = [0u8; 1];
        r.exact(&mut kind, "record")?;
        match kind[0] {
            KIND_END => {
                if offset != records || len != data_bytes {
                    bail!(
                        "{}: the end record counts {offset} records and {len} data bytes, the file holds {records} and {data_bytes}",
                        path.display()
                    );
                }
                break;
            }
            KIND_DATA | KIND_ZERO => {}
            k => bail!(
                "{}: record {records} at offset {offset} has unknown kind {k}",
                path.display()
            ),
        }
        let in_bounds =
            len > 0 && offset >= end && offset.checked_add(len).is_some_and(|e| e <= target_size);
        if !in_bounds {
            bail!(
                "{}: record {records} [{offset}, +{len}) overlaps the one before it or lies outside the target size {target_size}",
                path.display()
            );
        }
        end = offset + len;
        records += 1;
        if kind[0] == KIND_ZERO {
            zero_bytes += len;
            visit(&header, Record::Zero { offset, len })?;
            continue;
        }
        if len > MAX_RECORD_DATA {
            bail!(
                "{}: data record {records} holds {len} bytes; the limit is {MAX_RECORD_DATA}",
                path.display()
            );
        }
        buf.resize(len as usize, 0);
        r.exact(&mut buf, "record data")?;
        data_bytes += len;
        visit(&header, Record::Data { offset, data: &buf })?;
    }
    let digest = std::mem::take(&mut r.hash).finalize();
    let mut trailer = [0u8; TRAILER_BYTES];
    r.inner
        .read_exact(&mut trailer)
        .with_context(|| format!("{}: the checksum trailer is missing", path.display()))?;
    if trailer[..] != digest[..] {
        bail!(
            "{}: checksum mismatch: the file is damaged (SHA-256 of its content is {}, its trailer says {})",
            path.display(),
            vpool_api::catalog::hex(&digest),
            vpool_api::catalog::hex(&trailer)
        );
    }
    let mut extra = [0u8; 1];
    if r.inner
        .read(&mut extra)
        .context("reading past the trailer")?
        != 0
    {
        bail!("{}: bytes after the checksum trailer", path.display());
    }
    Ok(Summary {
        header,
        records,
        data_bytes,
        zero_bytes,
        file_bytes: r.bytes + TRAILER_BYTES as u64,
        checksum: format!("sha256:{}", vpool_api::catalog::hex(&digest)),
    })
}

// ----- the commands -----

/// What `vol export-diff` did.
#[derive(Clone, Debug, Serialize)]
pub struct ExportDiffReport {
    pub volume: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub file: String,
    pub target_size_bytes: u64,
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub file_bytes: u64,
    pub checksum: String,
}

/// What `vol import-diff` did.
#[derive(Clone, Debug, Serialize)]
pub struct ImportDiffReport {
    pub volume: String,
    pub file: String,
    /// The images the diff was taken between, as its header names them.
    pub diff_volume: String,
    pub diff_from: Option<String>,
    pub diff_to: Option<String>,
    pub size_bytes: u64,
    pub resized: bool,
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

/// Removes a temporary file unless disarmed.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes the changes from `volume@from` to `volume@to` (`None` = the live
/// volume) to a new `.vdiff` file at `path` (replacing one only with
/// `force`). The file appears whole or not at all: it is written beside
/// `path` and renamed into place once synced.
pub fn export_diff(
    client: &Client,
    volume: &str,
    from: Option<&str>,
    to: Option<&str>,
    path: &Path,
    force: bool,
    show_progress: bool,
) -> anyhow::Result<ExportDiffReport> {
    if !force && std::fs::symlink_metadata(path).is_ok() {
        bail!(
            "{} already exists; use --force to overwrite it",
            path.display()
        );
    }
    let first = client.diff_page(volume, from, to, 0)?;
    let header = Header {
        target_size: first.size_bytes,
        from_size: first.from_size_bytes,
        volume: volume.to_string(),
        from: from.map(str::to_string),
        to: to.map(str::to_string),
    };
    let file_name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp_path = path.with_file_name(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let file =
        File::create(&tmp_path).with_context(|| format!("creating {}", tmp_path.display()))?;
    let mut tmp = TempFile(Some(tmp_path.clone()));
    let mut w = Writer::new(BufWriter::with_capacity(1 << 20, file), &header)
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    let bar = progress_bar(header.target_size, show_progress, "export-diff");
    let mut page = first;
    loop {
        for e in &page.extents {
            match e.kind {
                vpool_api::DiffKind::Zero => w.zero(e.offset, e.length)?,
                vpool_api::DiffKind::Data => {
                    let mut at = e.offset;
                    let end = e.offset + e.length;
                    while at < end {
                        let n = (end - at).min(MAX_RECORD_DATA) as usize;
                        let data = client.read_image(volume, to, at, n).with_context(|| {
                            format!("reading {} at offset {at}", image_name(volume, to))
                        })?;
                        // Blocks written as zeros travel as zero records.
                        let mut pos = 0usize;
                        for (s, e) in nonzero_runs(&data) {
                            if s > pos {
                                w.zero(at + pos as u64, (s - pos) as u64)?;
                            }
                            w.data(at + s as u64, &data[s..e])?;
                            pos = e;
                        }
                        if pos < data.len() {
                            w.zero(at + pos as u64, (data.len() - pos) as u64)?;
                        }
                        at += n as u64;
                        bar.set_position(at);
                    }
                }
            }
        }
        match page.next_offset {
            Some(next) => page = client.diff_page(volume, from, to, next)?,
            None => break,
        }
    }
    let (out, records, data_bytes, zero_bytes, file_bytes, checksum) = w
        .finish()
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    let file = out
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", tmp_path.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp_path.display()))?;
    std::fs::rename(&tmp_path, path)
        .with_context(|| format!("renaming {} to {}", tmp_path.display(), path.display()))?;
    tmp.0 = None;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    bar.finish_and_clear();
    Ok(ExportDiffReport {
        volume: volume.to_string(),
        from: header.from,
        to: header.to,
        file: path.display().to_string(),
        target_size_bytes: header.target_size,
        records,
        data_bytes,
        zero_bytes,
        file_bytes,
        checksum,
    })
}

/// `volume` or `volume@snap`.
pub fn image_name(volume: &str, snap: Option<&str>) -> String {
    match snap {
        Some(s) => format!("{volume}@{s}"),
        None => volume.to_string(),
    }
}

/// Applies the `.vdiff` file at `path` to `volume`: checks the whole file
/// first, resizes the volume to the target size (shrinking if need be),
/// zeroes and writes the records, and flushes.
pub fn import_diff(
    client: &Client,
    volume: &str,
    path: &Path,
    force: bool,
    show_progress: bool,
) -> anyhow::Result<ImportDiffReport> {
    let summary = scan(path, |_, _| Ok(()))?;
    let h = &summary.header;
    let info = client.volume_info(volume)?;
    let resized = info.size_bytes != h.target_size;
    // Until the diff is applied whole, the volume is neither image.
    client
        .begin_import(volume, force)
        .with_context(|| format!("marking volume {volume} as being imported into"))?;
    if resized {
        client
            .resize_volume(volume, h.target_size, true, force)
            .with_context(|| format!("resizing {volume} to the diff's target size"))?;
    }
    let bar = progress_bar(h.target_size, show_progress, "import-diff");
    let again = scan(path, |_, rec| {
        match rec {
            Record::Zero { offset, len } => {
                client
                    .zero(volume, offset, len, true, force)
                    .with_context(|| format!("zeroing {volume} at offset {offset}"))?;
                bar.set_position(offset + len);
            }
            Record::Data { offset, data } => {
                client
                    .write(volume, offset, data, force)
                    .with_context(|| format!("writing {volume} at offset {offset}"))?;
                bar.set_position(offset + data.len() as u64);
            }
        }
        Ok(())
    })
    .with_context(|| {
        format!(
            "{} changed while it was applied: volume {volume} is partly updated; apply an intact copy again",
            path.display()
        )
    })?;
    if again.checksum != summary.checksum {
        bail!(
            "{} changed while it was applied: volume {volume} is partly updated; apply an intact copy again",
            path.display()
        );
    }
    client
        .end_import(volume)
        .context("flushing the applied diff")?;
    bar.finish_and_clear();
    Ok(ImportDiffReport {
        volume: volume.to_string(),
        file: path.display().to_string(),
        diff_volume: h.volume.clone(),
        diff_from: h.from.clone(),
        diff_to: h.to.clone(),
        size_bytes: h.target_size,
        resized,
        records: summary.records,
        data_bytes: summary.data_bytes,
        zero_bytes: summary.zero_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(size: u64) -> Header {
        Header {
            target_size: size,
            from_size: size / 2,
            volume: "web1".into(),
            from: Some("a".into()),
            to: None,
        }
    }

    fn write_file(path: &Path, size: u64, f: impl FnOnce(&mut Writer<Vec<u8>>)) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), &header(size)).unwrap();
        f(&mut w);
        let (out, ..) = w.finish().unwrap();
        std::fs::write(path, &out).unwrap();
        out
    }

    #[test]
    fn round_trip_merges_zeros_and_splits_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.vdiff");
        let big = vec![7u8; MAX_RECORD_DATA as usize + 4096];
        write_file(&p, 64 << 20, |w| {
            w.zero(0, 4096).unwrap();
            w.zero(4096, 8192).unwrap();
            w.data(1 << 20, &big).unwrap();
            w.zero(32 << 20, 4096).unwrap();
        });
        let mut seen = Vec::new();
        let s = scan(&p, |h, r| {
            assert_eq!(h.volume, "web1");
            seen.push(match r {
                Record::Zero { offset, len } => (offset, len, 0u8),
                Record::Data { offset, data } => (offset, data.len() as u64, data[0]),
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![
                (0, 12288, 0),
                (1 << 20, MAX_RECORD_DATA, 7),
                ((1 << 20) + MAX_RECORD_DATA, 4096, 7),
                (32 << 20, 4096, 0),
            ]
        );
        assert_eq!(s.records, 4);
        assert_eq!(s.data_bytes, big.len() as u64);
        assert_eq!(s.zero_bytes, 16384);
        assert_eq!(s.header, header(64 << 20));
        assert_eq!(s.file_bytes, std::fs::metadata(&p).unwrap().len());
    }

    #[test]
    fn writer_refuses_disorder_and_overflow() {
        let mut w = Writer::new(Vec::new(), &header(1 << 20)).unwrap();
        w.data(8192, &[1; 4096]).unwrap();
        assert!(w.zero(4096, 4096).is_err(), "out of order");
        assert!(w.data(1 << 20, &[1; 4096]).is_err(), "past the end");
        assert!(w.zero(20480, 0).is_err(), "empty");
    }

    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.vdiff");
        let good = write_file(&p, 1 << 20, |w| {
            w.data(4096, &[9; 8192]).unwrap();
            w.zero(65536, 4096).unwrap();
        });
        scan(&p, |_, _| Ok(())).unwrap();
        let check = |bytes: &[u8], want: &str| {
            std::fs::write(&p, bytes).unwrap();
            let e = format!("{:#}", scan(&p, |_, _| Ok(())).unwrap_err());
            assert!(e.contains(want), "expected {want:?} in {e}");
        };
        // A flipped data byte: the checksum.
        let mut b = good.clone();
        let at = b.len() - 32 - 17 - 17 - 100;
        b[at] ^= 1;
        check(&b, "checksum mismatch");
        // Truncated, and extended.
        check(&good[..good.len() - 10], "checksum trailer is missing");
        check(&good[..40], "ends inside");
        let mut b = good.clone();
        b.push(0);
        check(&b, "after the checksum");
        // Not a vdiff at all; another version.
        check(b"hello world, not a diff at all....", "not a .vdiff file");
        let mut b = good.clone();
        b[8] = 2;
        check(&b, "version 2");
    }

    #[test]
    fn scan_refuses_records_out_of_bounds() {
        // Hand-made, with a valid checksum, so only the structure is wrong.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.vdiff");
        let make = |records: &[(u64, u64, u8)]| {
            let h = header(1 << 20);
            let mut w = Writer::new(Vec::new(), &h).unwrap();
            for &(o, l, k) in records {
                w.record_head(o, l, k).unwrap();
                w.records += 1;
            }
            let (out, ..) = w.finish().unwrap();
            std::fs::write(&p, out).unwrap();
            format!("{:#}", scan(&p, |_, _| Ok(())).unwrap_err())
        };
        assert!(make(&[(1 << 20, 4096, KIND_ZERO)]).contains("outside the target size"));
        assert!(
            make(&[(8192, 4096, KIND_ZERO), (0, 4096, KIND_ZERO)]).contains("overlaps"),
            "out of order"
        );
        assert!(make(&[(0, 4096, 9)]).contains("unknown kind"));
    }
}
