//! `vol import` and `vol export`: raw disk images in and out of a volume,
//! sparse both ways.
//!
//! Import reads only the file's data regions (`SEEK_DATA`/`SEEK_HOLE`) and
//! skips all-zero blocks inside them, so a 100 GiB image with 2 GiB of data
//! sends about 2 GiB. Export asks the daemon for the volume's allocation map,
//! reads only the data extents, and writes only blocks that are not zero into
//! a file pre-sized with `set_len`, so holes stay holes.
//!
//! Neither is a snapshot: export a volume that nothing is writing to.
//!
//! `-` for the file is standard input or output ([`stream`]), so images go
//! through pipes (`vol export web1 - | zstd | ssh ...`). Import detects the
//! image's format first ([`crate::image_format`]) and converts what is not
//! raw.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vpool_api::{Client, ClientError, ErrorKind};
use vpool_engine::BLOCK_SIZE;

use crate::image_format::{self, Format};
use crate::size::{format_size, round_up_to_block};

mod stream;

/// Bytes moved per data request. Well under the API's 8 MiB limit, and big
/// enough that per-request overhead is small.
pub const CHUNK_BYTES: usize = 4 << 20;

const BLOCK: usize = BLOCK_SIZE as usize;

/// What an import did.
#[derive(Clone, Debug, Serialize)]
pub struct ImportReport {
    pub volume: String,
    /// The file imported, or `-` for standard input.
    pub file: String,
    /// Its format (`raw`, or what `qemu-img` converted: `qcow2`, `vmdk`...).
    pub format: String,
    pub created: bool,
    pub file_bytes: u64,
    pub volume_size_bytes: u64,
    /// Bytes sent to the volume.
    pub data_bytes: u64,
    /// Bytes of the file skipped as holes or all-zero blocks.
    pub skipped_bytes: u64,
}

/// What an export did.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    pub volume: String,
    pub file: String,
    pub size_bytes: u64,
    /// Bytes written to the file (the rest are holes).
    pub data_bytes: u64,
}

pub(crate) fn progress_bar(total: u64, show: bool, what: &str) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(what.to_string());
    bar
}

/// True if every byte is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    // 16 bytes at a time: the compiler makes this a fast vector loop.
    let mut chunks = buf.chunks_exact(16);
    let words_zero = chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0);
    words_zero && chunks.remainder().iter().all(|&b| b == 0)
}

/// Runs of blocks of `buf` that are not all zeros, as `(start, end)` byte
/// offsets in `buf`, block-aligned (the last may end at `buf.len()`).
pub fn nonzero_runs(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(BLOCK).enumerate() {
        if is_zero(block) {
            continue;
        }
        let start = i * BLOCK;
        let end = start + block.len();
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// The data regions of `file` (length `len`) as `(start, end)`, using
/// `SEEK_DATA`/`SEEK_HOLE`. Where the filesystem cannot tell, the whole
/// file is one region (zero blocks are still skipped later).
pub fn data_regions(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut regions = Vec::new();
    let mut pos: u64 = 0;
    while pos < len {
        let Ok(at) = libc::off_t::try_from(pos) else {
            break;
        };
        // SAFETY: lseek on a descriptor we own; it only moves the offset,
        // and every read here is positional (pread), so that is harmless.
        let start = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if start < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                // No data past `pos`: the rest is a hole.
                Some(libc::ENXIO) => break,
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    regions.push((pos, len));
                    break;
                }
                _ => return Err(e),
            }
        }
        let start = u64::try_from(start).unwrap_or(pos).max(pos);
        // SAFETY: as above.
        let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
        let end = if end < 0 {
            len
        } else {
            u64::try_from(end).unwrap_or(len).min(len)
        };
        if end <= start {
            break;
        }
        regions.push((start, end));
        pos = end;
    }
    Ok(regions)
}

/// Length of a file or block device.
fn file_len(file: &mut File) -> io::Result<u64> {
    let m = file.metadata()?;
    if m.is_file() {
        return Ok(m.len());
    }
    let len = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(len)
}

/// How `vol import` reads its input.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The daemon's NBD server: the data goes there, through the import's
    /// own export (`None`: through the API, slower).
    pub nbd: Option<crate::nbd_target::NbdTarget>,
    /// The volume's size if it is created.
    pub size: Option<u64>,
    /// Replace an existing volume's content...
    pub overwrite: bool,
    /// ... even while NBD clients write it.
    pub in_use: bool,
    /// The input's format; `None` detects it.
    pub format: Option<Format>,
    /// Accept a stream shorter than the volume (the rest reads as zeros).
    pub allow_short: bool,
    pub show_progress: bool,
}

/// Imports the image at `path` (`-`: standard input) into volume `name`,
/// creating it if missing. Raw images go as they are; other formats are
/// converted first (see [`crate::image_format`]).
pub fn import(
    client: &Client,
    name: &str,
    path: &Path,
    opts: &ImportOptions,
) -> anyhow::Result<ImportReport> {
    if path == Path::new("-") {
        return stream::import_stdin(client, name, opts);
    }
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let what = path.display().to_string();
    let format = match opts.format {
        Some(f) => f,
        None => {
            let mut head = vec![0u8; image_format::PROBE_BYTES];
            let got =
                read_full_at(&file, &mut head, 0).with_context(|| format!("reading {what}"))?;
            image_format::detect(&head[..got])
        }
    };
    match format {
        Format::Raw => import_file(client, name, path, file, opts),
        Format::Refused(r) => bail!(image_format::refusal_message(r, &what, name)),
        Format::Qemu(fmt) => {
            image_format::require_qemu_img(fmt, &what)?;
            match &opts.nbd {
                Some(nbd) => import_converted(client, name, path, fmt, nbd, opts),
                None => {
                    // Before the conversion, which can take long.
                    refuse_existing(client, name, opts.overwrite)?;
                    import_via_copy(client, name, path, fmt, opts, None)
                }
            }
        }
    }
}

/// Imports the `fmt` image at `path` by converting it into a private
/// temporary raw file, imported sparsely then removed; into a volume
/// prepared and marked already if `begun` says so.
fn import_via_copy(
    client: &Client,
    name: &str,
    path: &Path,
    fmt: &str,
    opts: &ImportOptions,
    begun: Option<Begun>,
) -> anyhow::Result<ImportReport> {
    let converted = image_format::convert_to_raw(path, fmt, opts.format.is_some())?;
    let mut raw = File::open(&converted.raw)
        .with_context(|| format!("opening {}", converted.raw.display()))?;
    // Read through the descriptor only: nobody finds the copy.
    let size_bytes = converted.size_bytes;
    drop(converted);
    let mut r = match begun {
        Some(b) => {
            let len = file_len(&mut raw).context("reading the size of the converted image")?;
            send_file(client, name, path, raw, len, b, opts)?
        }
        None => import_file(client, name, path, raw, opts)?,
    };
    r.file = path.display().to_string();
    r.format = fmt.to_string();
    r.file_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    r.skipped_bytes = size_bytes.saturating_sub(r.data_bytes);
    Ok(r)
}

/// Imports the `fmt` image at `path` by converting it with `qemu-img`
/// straight into the volume's import export: no temporary copy, no API.
fn import_converted(
    client: &Client,
    name: &str,
    path: &Path,
    fmt: &str,
    nbd: &crate::nbd_target::NbdTarget,
    opts: &ImportOptions,
) -> anyhow::Result<ImportReport> {
    let what = path.display().to_string();
    let named = opts.format.is_some();
    let size_bytes = image_format::checked_size(path, fmt, named)?;
    let (created, volume_size) = prepare_volume(client, name, &what, Some(size_bytes), opts)?;
    // Incomplete from here; all holes (made or cleared), so qemu-img
    // writes only the image's data.
    let export = begin(client, name, created, volume_size, opts.in_use)?;
    // The export may not open (a shared pool's volume, an older daemon):
    // then through a temporary copy and the API, as before.
    let Sink::Nbd(probe) = Sink::open(client, name, export.as_deref(), opts) else {
        let begun = Begun {
            created,
            volume_size,
            export: None,
        };
        return import_via_copy(client, name, path, fmt, opts, Some(begun));
    };
    probe.disconnect()?;
    let export = crate::nbd_target::in_pool_of(name, export.as_deref().unwrap_or_default());
    let target = nbd.qemu_json(&export);
    image_format::convert_into(path, fmt, &target, opts.show_progress)?;
    client
        .end_import(name)
        .context("flushing the imported data")?;
    let data_bytes = client.volume_info(name)?.allocated_bytes;
    Ok(ImportReport {
        volume: name.to_string(),
        file: what,
        format: fmt.to_string(),
        created,
        file_bytes: std::fs::metadata(path).map_or(0, |m| m.len()),
        volume_size_bytes: volume_size,
        data_bytes,
        skipped_bytes: size_bytes.saturating_sub(data_bytes),
    })
}

/// Refuses to import into an existing volume without `force`: an import
/// replaces all of a volume's content. A template is left to the daemon,
/// which refuses it as read-only.
fn refuse_existing(client: &Client, name: &str, overwrite: bool) -> anyhow::Result<()> {
    match client.volume_info(name) {
        // A volume an import left incomplete is retried without --force.
        Ok(info) if !overwrite && info.template.is_none() && !info.incomplete => {
            Err(ClientError::Api {
            status: 409,
            kind: ErrorKind::AlreadyExists,
            message: format!(
                "volume {name} exists ({}); an import replaces all of its content: pass --force to do that",
                format_size(info.size_bytes)
            ),
        }
            .into())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes sure volume `name` can take an image of `len` bytes (`None`: not
/// known in advance, a stream) read from `what`: creates it (of `size`, or
/// `len` rounded up to 4 KiB) or checks the existing one. Returns whether
/// it was created, and its size.
fn prepare_volume(
    client: &Client,
    name: &str,
    what: &str,
    len: Option<u64>,
    opts: &ImportOptions,
) -> anyhow::Result<(bool, u64)> {
    refuse_existing(client, name, opts.overwrite)?;
    match client.volume_info(name) {
        Ok(info) => {
            if let Some(s) = opts.size.filter(|&s| s != info.size_bytes) {
                bail!(
                    "volume {name} exists with size {} ({} bytes), not {} ({s} bytes); resize it first with `vpool vol resize`",
                    format_size(info.size_bytes),
                    info.size_bytes,
                    format_size(s)
                );
            }
            if let Some(len) = len.filter(|&l| l > info.size_bytes) {
                bail!(
                    "volume {name} is {} but {what} is {}; resize the volume first with `vpool vol resize`",
                    format_size(info.size_bytes),
                    format_size(len)
                );
            }
            Ok((false, info.size_bytes))
        }
        Err(e) if e.kind() == Some(ErrorKind::NotFound) => {
            let needed = len
                .map(|l| round_up_to_block(l).context("the image is too large"))
                .transpose()?;
            let vsize = match (opts.size, needed) {
                (Some(s), Some(n)) if s < n => bail!(
                    "--size {} is smaller than {what} ({})",
                    format_size(s),
                    format_size(n)
                ),
                (Some(s), _) => s,
                (None, None) => bail!(
                    "the length of {what} is not known in advance: give the volume's size with --size"
                ),
                (None, Some(0)) => bail!("{what} is empty: give the volume's size with --size"),
                (None, Some(n)) => n,
            };
            client
                .create_volume(name, vsize)
                .with_context(|| format!("creating volume {name}"))?;
            Ok((true, vsize))
        }
        Err(e) => Err(e.into()),
    }
}

/// Imports the raw image `file` (at `path`) into volume `name`, sparsely.
fn import_file(
    client: &Client,
    name: &str,
    path: &Path,
    mut file: File,
    opts: &ImportOptions,
) -> anyhow::Result<ImportReport> {
    let what = path.display().to_string();
    let len = file_len(&mut file).with_context(|| format!("reading the size of {what}"))?;
    let (created, volume_size) = prepare_volume(client, name, &what, Some(len), opts)?;
    // From here until the last byte is flushed, the volume is incomplete.
    let export = begin(client, name, created, volume_size, opts.in_use)?;
    let begun = Begun {
        created,
        volume_size,
        export,
    };
    send_file(client, name, path, file, len, begun, opts)
}

/// A volume made ready for an import and marked incomplete (`begin`).
struct Begun {
    created: bool,
    volume_size: u64,
    /// The import's NBD export (`None`: through the API).
    export: Option<String>,
}

/// Sends the data of the raw image `file` (`len` bytes, read from `path`)
/// into volume `name`, which `begun` prepared, and ends the import.
fn send_file(
    client: &Client,
    name: &str,
    path: &Path,
    file: File,
    len: u64,
    begun: Begun,
    opts: &ImportOptions,
) -> anyhow::Result<ImportReport> {
    let what = path.display().to_string();
    let Begun {
        created,
        volume_size,
        export,
    } = begun;
    let mut sink = Sink::open(client, name, export.as_deref(), opts);
    let regions =
        data_regions(&file, len).with_context(|| format!("finding the data in {what}"))?;
    let bar = progress_bar(len, opts.show_progress, "import");
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut data_bytes = 0u64;
    // End of what was sent so far, so regions rounded out to whole blocks
    // never send a block twice.
    let mut sent_to = 0u64;
    for (start, end) in regions {
        // Whole blocks: the filesystem's regions are block-aligned anyway,
        // and the volume maps 4 KiB blocks.
        let mut pos = (start - start % BLOCK_SIZE).max(sent_to);
        let end = round_up_to_block(end).unwrap_or(end);
        bar.set_position(pos.min(len));
        while pos < end {
            let want = usize::try_from(end - pos)
                .unwrap_or(CHUNK_BYTES)
                .min(CHUNK_BYTES);
            let chunk = &mut buf[..want];
            let got = read_full_at(&file, chunk, pos).with_context(|| format!("reading {what}"))?;
            // Past the end of the file reads as zeros (the volume is
            // rounded up to whole blocks).
            chunk[got..].fill(0);
            data_bytes += sink.write_nonzero(pos, chunk)?;
            pos += want as u64;
            bar.set_position(pos.min(len));
        }
        sent_to = sent_to.max(pos);
    }
    sink.finish()?;
    client
        .end_import(name)
        .context("flushing the imported data")?;
    bar.set_position(len);
    bar.finish_and_clear();
    Ok(ImportReport {
        volume: name.to_string(),
        file: what,
        format: "raw".into(),
        created,
        file_bytes: len,
        volume_size_bytes: volume_size,
        data_bytes,
        skipped_bytes: len.saturating_sub(data_bytes),
    })
}

/// Marks volume `name` as being imported into and, unless it was just
/// `created` (all zeros), clears it: the image replaces its content, so
/// what the image has as holes must not show old data. Returns the
/// import's NBD export (`None` from an older daemon).
fn begin(
    client: &Client,
    name: &str,
    created: bool,
    volume_size: u64,
    force: bool,
) -> anyhow::Result<Option<String>> {
    let export = client
        .begin_import(name, force)
        .with_context(|| format!("marking volume {name} as being imported into"))?;
    if !created {
        client
            .zero(name, 0, volume_size, true, force)
            .with_context(|| format!("clearing volume {name} before the import"))?;
    }
    Ok(export)
}

/// Where an import writes: the import's own NBD export, or the API.
enum Sink<'a> {
    Nbd(vpool_nbd::client::Client),
    Api {
        client: &'a Client,
        name: &'a str,
        force: bool,
    },
}

impl<'a> Sink<'a> {
    /// Over NBD when `opts` names the daemon's server and the import's
    /// `export` opens there; else the API (a shared pool's volume, an
    /// older daemon, NBD out of reach).
    fn open(
        client: &'a Client,
        name: &'a str,
        export: Option<&str>,
        opts: &ImportOptions,
    ) -> Sink<'a> {
        let export = export.map(|e| crate::nbd_target::in_pool_of(name, e));
        if let (Some(nbd), Some(e)) = (&opts.nbd, export) {
            match nbd.connect(&e) {
                Ok(c) => return Sink::Nbd(c),
                Err(err) => {
                    tracing::debug!(error = %err, "the import's NBD export did not open: through the API")
                }
            }
        }
        Sink::Api {
            client,
            name,
            force: opts.in_use,
        }
    }

    /// Everything written is flushed, the connection closed: before the
    /// import is ended (which flushes the pool again, for the API's writes).
    fn finish(self) -> anyhow::Result<()> {
        if let Sink::Nbd(mut c) = self {
            c.flush().context("flushing the imported data")?;
            c.disconnect()?;
        }
        Ok(())
    }

    /// Writes the blocks of `chunk` that are not all zeros at `pos`;
    /// returns the bytes sent.
    fn write_nonzero(&mut self, pos: u64, chunk: &[u8]) -> anyhow::Result<u64> {
        let mut sent = 0u64;
        for (s, e) in nonzero_runs(chunk) {
            let at = pos + s as u64;
            match self {
                Sink::Nbd(c) => c.write(at, &chunk[s..e], false)?,
                Sink::Api {
                    client,
                    name,
                    force,
                } => client.write(name, at, &chunk[s..e], *force)?,
            }
            sent += (e - s) as u64;
        }
        Ok(sent)
    }
}

/// The size of volume `name`, or of its `snapshot`.
fn image_size(client: &Client, name: &str, snapshot: Option<&str>) -> anyhow::Result<u64> {
    Ok(match snapshot {
        Some(s) => client.snapshot_info(name, s)?.size_bytes,
        None => client.volume_info(name)?.size_bytes,
    })
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Exports volume `name` (or its snapshot `snapshot`) to a new sparse file
/// at `path` (replacing an existing file only with `force`).
pub fn export(
    client: &Client,
    name: &str,
    snapshot: Option<&str>,
    path: &Path,
    force: bool,
    show_progress: bool,
) -> anyhow::Result<ExportReport> {
    if path == Path::new("-") {
        return stream::export_stdout(client, name, snapshot, show_progress);
    }
    let size = image_size(client, name, snapshot)?;
    let mut opts = OpenOptions::new();
    opts.write(true);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let file = opts.open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} already exists; use --force to overwrite it",
                path.display()
            )
        } else {
            anyhow::Error::new(e).context(format!("creating {}", path.display()))
        }
    })?;
    let meta = file
        .metadata()
        .with_context(|| format!("checking {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file; export writes sparse regular files only",
            path.display()
        );
    }
    let copied = export_into(client, name, snapshot, path, &file, size, show_progress);
    if copied.is_err() && !force {
        // A file of the volume's size that misses data would pass for an
        // export: remove what this call made.
        let _ = std::fs::remove_file(path);
    }
    let data_bytes = copied?;
    Ok(ExportReport {
        volume: crate::vdiff::image_name(name, snapshot),
        file: path.display().to_string(),
        size_bytes: size,
        data_bytes,
    })
}

/// Writes image `name` (or its `snapshot`), `size` bytes, into `file` at
/// `path`: its data only, the rest holes. Returns the data bytes written.
fn export_into(
    client: &Client,
    name: &str,
    snapshot: Option<&str>,
    path: &Path,
    file: &std::fs::File,
    size: u64,
    show_progress: bool,
) -> anyhow::Result<u64> {
    // A file of the volume's size that is all hole; only data is written.
    file.set_len(size)
        .with_context(|| format!("sizing {} to {}", path.display(), format_size(size)))?;

    let bar = progress_bar(size, show_progress, "export");
    let mut data_bytes = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let map = client
            .allocation_of(name, snapshot, pos, size - pos)
            .with_context(|| format!("reading the allocation map of {name} at offset {pos}"))?;
        if map.offset != pos || map.length == 0 {
            bail!("the daemon answered an allocation query at {pos} with no progress; giving up");
        }
        for extent in map.extents.iter().filter(|e| !e.zero) {
            let mut at = extent.offset;
            let end = extent.offset + extent.length;
            while at < end {
                let n = usize::try_from(end - at)
                    .unwrap_or(CHUNK_BYTES)
                    .min(CHUNK_BYTES);
                let data = client
                    .read_image(name, snapshot, at, n)
                    .with_context(|| format!("reading volume {name} at offset {at}"))?;
                // Data extents can hold zero blocks (written as zeros):
                // leaving them out keeps those holes too.
                for (s, e) in nonzero_runs(&data) {
                    file.write_all_at(&data[s..e], at + s as u64)
                        .with_context(|| format!("writing {}", path.display()))?;
                    data_bytes += (e - s) as u64;
                }
                at += n as u64;
                bar.set_position(at);
            }
        }
        pos = map.offset + map.length;
        bar.set_position(pos);
    }
    file.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    bar.finish_and_clear();
    Ok(data_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 4096]));
        let mut b = vec![0u8; 4099];
        assert!(is_zero(&b));
        b[4098] = 1;
        assert!(!is_zero(&b));
        b[4098] = 0;
        b[17] = 1;
        assert!(!is_zero(&b));
    }

    #[test]
    fn runs_of_nonzero_blocks() {
        let mut b = vec![0u8; 5 * BLOCK + 100];
        assert!(nonzero_runs(&b).is_empty());
        b[BLOCK + 5] = 1;
        b[2 * BLOCK + 4095] = 1;
        b[4 * BLOCK] = 1;
        b[5 * BLOCK + 99] = 1;
        assert_eq!(
            nonzero_runs(&b),
            vec![(BLOCK, 3 * BLOCK), (4 * BLOCK, 5 * BLOCK + 100)]
        );
    }

    #[test]
    fn finds_data_regions_of_a_sparse_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sparse");
        let mut f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[1; 8192], 16 << 20).unwrap();
        f.write_all_at(&[1; 4096], 40 << 20).unwrap();
        f.flush().unwrap();
        let f = File::open(&p).unwrap();
        let regions = data_regions(&f, 64 << 20).unwrap();
        // Filesystems may round regions out, but must cover the data and
        // leave most of the file out.
        let covered: u64 = regions.iter().map(|(s, e)| e - s).sum();
        assert!(
            regions
                .iter()
                .any(|&(s, e)| s <= 16 << 20 && e >= (16 << 20) + 8192),
            "{regions:?}"
        );
        assert!(
            regions
                .iter()
                .any(|&(s, e)| s <= 40 << 20 && e >= (40 << 20) + 4096),
            "{regions:?}"
        );
        assert!(covered < 32 << 20, "{regions:?}");
        // A fully hole file has no data.
        let q = dir.path().join("hole");
        File::create(&q).unwrap().set_len(1 << 20).unwrap();
        let regions = data_regions(&File::open(&q).unwrap(), 1 << 20).unwrap();
        assert!(regions.is_empty(), "{regions:?}");
    }
}
