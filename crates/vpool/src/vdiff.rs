//! `vol export-diff` and `vol import-diff`: `.vdiff` files (incremental
//! backups of a volume) made from and applied to a volume through the API.
//! The format and its codec are the `vpool-vdiff` crate; the format is
//! documented in `docs/vdiff.md`.
//!
//! Data moves through the API's data plane in chunks of at most 8 MiB (a
//! data record's limit), so both commands work in bounded memory. Applying
//! a file to a volume holding the `from` image (resized to `target_size`
//! first) gives the `to` image byte for byte. The importer checks the whole
//! file (structure and checksum) before it changes anything, and checks the
//! checksum again while applying, so a file that changes under it is
//! noticed. `-` is standard output or input (`vol export-diff a b - | ssh
//! host vpool vol import-diff v -`); a stream is read once, so a cut or
//! corrupt one is found as it is applied and leaves the volume marked
//! incomplete, as `zfs receive` discards a partial stream.

use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use serde::Serialize;
use vpool_api::{Client, Diff as DiffPage};
use vpool_vdiff::{Header, MAX_RECORD_DATA, Reader, Record, Summary, Writer};

use crate::transfer::{nonzero_runs, progress_bar};

// The codec's limits are the engine's and the API's.
const _: () = {
    assert!(vpool_vdiff::MAX_RECORD_DATA == vpool_api::MAX_DATA_BYTES as u64);
    assert!(vpool_vdiff::SIZE_UNIT == vpool_engine::BLOCK_SIZE);
    assert!(vpool_vdiff::MAX_TARGET_SIZE == vpool_engine::MAX_VOLUME_SIZE_BYTES);
};

/// Reads and checks the `.vdiff` file at `path` from start to end, handing
/// each record to `visit` in order. Fails on anything malformed, naming the
/// file; `visit`'s errors come back as they are. `visit` sees records
/// before the checksum is known: check a file with a no-op `visit` before
/// applying it.
pub fn scan(
    path: &Path,
    mut visit: impl FnMut(&Header, Record<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<Summary> {
    let refused = |e: vpool_vdiff::Error| anyhow::Error::new(e).context(path.display().to_string());
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut r = Reader::new(BufReader::with_capacity(1 << 20, file)).map_err(refused)?;
    let header = r.header().clone();
    while let Some(rec) = r.next_record().map_err(refused)? {
        visit(&header, rec)?;
    }
    Ok(r.finish().map_err(refused)?.0)
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
    if !force && path != Path::new("-") && std::fs::symlink_metadata(path).is_ok() {
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
    let bar = progress_bar(header.target_size, show_progress, "export-diff");
    let written = if path == Path::new("-") {
        let stdout = std::io::stdout();
        if stdout.is_terminal() {
            bail!("standard output is a terminal: redirect it to a file or a pipe");
        }
        let out = BufWriter::with_capacity(1 << 20, stdout.lock());
        let (mut out, written) = write_diff(client, volume, to, first, &header, out, &bar)
            .context("writing standard output")?;
        out.flush().context("writing standard output")?;
        written
    } else {
        write_diff_file(client, volume, to, first, &header, path, &bar)?
    };
    bar.finish_and_clear();
    Ok(ExportDiffReport {
        volume: volume.to_string(),
        from: header.from,
        to: header.to,
        file: path.display().to_string(),
        target_size_bytes: header.target_size,
        records: written.records,
        data_bytes: written.data_bytes,
        zero_bytes: written.zero_bytes,
        file_bytes: written.file_bytes,
        checksum: written.checksum,
    })
}

/// Writes the diff whose first page is `first` into a new file at `path`,
/// whole or not at all: beside it first, renamed into place once synced.
fn write_diff_file(
    client: &Client,
    volume: &str,
    to: Option<&str>,
    first: DiffPage,
    header: &Header,
    path: &Path,
    bar: &ProgressBar,
) -> anyhow::Result<Summary> {
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
    let out = BufWriter::with_capacity(1 << 20, file);
    let (out, written) = write_diff(client, volume, to, first, header, out, bar)
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
    Ok(written)
}

/// Encodes the diff whose first page is `first` (the rest asked of the
/// daemon page by page, data read from `volume@to`) into `out`.
fn write_diff<W: Write>(
    client: &Client,
    volume: &str,
    to: Option<&str>,
    first: DiffPage,
    header: &Header,
    out: W,
    bar: &ProgressBar,
) -> anyhow::Result<(W, Summary)> {
    let mut w = Writer::new(out, header)?;
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
            Some(next) => page = client.diff_page(volume, header.from.as_deref(), to, next)?,
            None => break,
        }
    }
    Ok(w.finish()?)
}

/// `volume` or `volume@snap`.
pub fn image_name(volume: &str, snap: Option<&str>) -> String {
    match snap {
        Some(s) => format!("{volume}@{s}"),
        None => volume.to_string(),
    }
}

/// Applies the `.vdiff` file at `path` (`-`: standard input) to `volume`:
/// checks the whole file first (a stream cannot be read twice: its check is
/// the import mark, which stays if it turns out cut or corrupt), resizes
/// the volume to the target size (shrinking if need be), zeroes and writes
/// the records, and flushes.
pub fn import_diff(
    client: &Client,
    volume: &str,
    path: &Path,
    force: bool,
    show_progress: bool,
) -> anyhow::Result<ImportDiffReport> {
    let stdin = path == Path::new("-");
    let what = if stdin {
        "standard input".to_string()
    } else {
        path.display().to_string()
    };
    let checked = if stdin {
        None
    } else {
        Some(scan(path, |_, _| Ok(()))?)
    };
    let input: Box<dyn Read> = if stdin {
        Box::new(std::io::stdin().lock())
    } else {
        let file = File::open(path).with_context(|| format!("opening {what}"))?;
        Box::new(BufReader::with_capacity(1 << 20, file))
    };
    let refused = |e: vpool_vdiff::Error| anyhow::Error::new(e).context(what.clone());
    let mut r = Reader::new(input).map_err(refused)?;
    let h = r.header().clone();
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
    let partly = || {
        format!(
            "{what} changed or ended while it was applied: volume {volume} is partly updated (marked incomplete); apply an intact copy again"
        )
    };
    while let Some(rec) = r.next_record().map_err(refused).with_context(partly)? {
        let end = rec.offset() + rec.len();
        apply(client, volume, rec, force)?;
        bar.set_position(end);
    }
    let summary = r.finish().map_err(refused).with_context(partly)?.0;
    if checked.is_some_and(|c| c.checksum != summary.checksum) {
        bail!(partly());
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

/// Applies one record of a diff to `volume`.
fn apply(client: &Client, volume: &str, rec: Record<'_>, force: bool) -> anyhow::Result<()> {
    match rec {
        Record::Zero { offset, len } => client
            .zero(volume, offset, len, true, force)
            .with_context(|| format!("zeroing {volume} at offset {offset}")),
        Record::Data { offset, data } => client
            .write(volume, offset, data, force)
            .with_context(|| format!("writing {volume} at offset {offset}")),
    }
}
