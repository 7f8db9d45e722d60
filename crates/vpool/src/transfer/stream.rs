//! `vol import VOL -` and `vol export VOL -`: raw images through pipes, as
//! `rbd import -`/`rbd export -` and `zfs send | zfs receive` allow.
//!
//! A pipe cannot be sparse and cannot be measured in advance, so:
//! - import reads standard input in chunks and sends only the blocks that
//!   are not all zeros; a volume it creates needs `--size` (the stream's
//!   length is known only at its end), and a stream longer than the volume
//!   is an error, as is one shorter (a sender that died ends its stream as
//!   one that finished does) unless `--allow-short`. Until the last byte is flushed, the volume is marked
//!   incomplete (not served by NBD), so a cut stream never passes for an
//!   image.
//! - export writes every byte, zeros for the holes, and refuses to write
//!   to a terminal.
//!
//! Only raw images travel this way: converting qcow2 and the like needs
//! `qemu-img`, which seeks in its input.

use std::io::{self, BufWriter, IsTerminal, Read, Write};

use anyhow::{Context, bail};
use vpool_api::Client;

use super::{
    BLOCK, CHUNK_BYTES, ExportReport, ImportOptions, ImportReport, Sink, begin, prepare_volume,
    progress_bar,
};
use crate::image_format::{self, Format};
use crate::size::format_size;

const STDIN: &str = "standard input";

/// Imports a raw image from standard input into volume `name`.
pub(super) fn import_stdin(
    client: &Client,
    name: &str,
    opts: &ImportOptions,
) -> anyhow::Result<ImportReport> {
    let mut input = io::stdin().lock();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut got = read_full(&mut input, &mut buf).context("reading standard input")?;
    let format = opts
        .format
        .unwrap_or_else(|| image_format::detect(&buf[..got.min(image_format::PROBE_BYTES)]));
    match format {
        Format::Raw => {}
        Format::Refused(r) => bail!(image_format::refusal_message(r, STDIN, name)),
        Format::Qemu(f) => bail!(
            "{STDIN} holds a {f} image, which qemu-img converts from a file only (it seeks in it): import the file itself, or pipe raw bytes"
        ),
    }
    let (created, volume_size) = prepare_volume(client, name, STDIN, None, opts)?;
    let export = begin(client, name, created, volume_size, opts.in_use)?;
    let mut sink = Sink::open(client, name, export.as_deref(), opts);
    let bar = progress_bar(volume_size, opts.show_progress, "import");
    let (mut pos, mut data_bytes) = (0u64, 0u64);
    while got > 0 {
        let end = pos + got as u64;
        if end > volume_size {
            bail!(
                "{STDIN} is longer than volume {name} ({}): the volume stays marked incomplete until an import finishes; resize it or give a larger --size",
                format_size(volume_size)
            );
        }
        // The last chunk, padded with zeros to a whole block (volume sizes
        // are whole blocks, so this stays inside the volume).
        let padded = got.next_multiple_of(BLOCK);
        buf[got..padded].fill(0);
        data_bytes += sink.write_nonzero(pos, &buf[..padded])?;
        pos = end;
        bar.set_position(pos);
        if got < CHUNK_BYTES {
            break; // read_full stops short only at the end of the stream
        }
        got = read_full(&mut input, &mut buf).context("reading standard input")?;
    }
    if pos < volume_size && !opts.allow_short {
        // A sender that died ends the stream as a finished one does.
        bail!(
            "{STDIN} ended after {} of volume {name}'s {}: a cut stream? The volume stays marked incomplete; import again, or pass --allow-short if the image is shorter than the volume",
            format_size(pos),
            format_size(volume_size)
        );
    }
    sink.finish()?;
    client
        .end_import(name)
        .context("flushing the imported data")?;
    bar.finish_and_clear();
    Ok(ImportReport {
        volume: name.to_string(),
        file: "-".into(),
        format: "raw".into(),
        created,
        file_bytes: pos,
        volume_size_bytes: volume_size,
        data_bytes,
        skipped_bytes: pos.saturating_sub(data_bytes),
    })
}

/// Writes volume `name` (or its `snapshot`) to standard output, every byte.
pub(super) fn export_stdout(
    client: &Client,
    name: &str,
    snapshot: Option<&str>,
    show_progress: bool,
) -> anyhow::Result<ExportReport> {
    let stdout = io::stdout();
    if stdout.is_terminal() {
        bail!(
            "standard output is a terminal: redirect it to a file or a pipe (vpool vol export {name} - | ...)"
        );
    }
    let size = super::image_size(client, name, snapshot)?;
    let mut out = BufWriter::with_capacity(1 << 20, stdout.lock());
    let bar = progress_bar(size, show_progress, "export");
    let mut data_bytes = 0u64;
    // Everything before `pos` is written.
    let mut pos = 0u64;
    while pos < size {
        let map = client
            .allocation_of(name, snapshot, pos, size - pos)
            .with_context(|| format!("reading the allocation map of {name} at offset {pos}"))?;
        if map.offset != pos || map.length == 0 {
            bail!("the daemon answered an allocation query at {pos} with no progress; giving up");
        }
        let map_end = (map.offset + map.length).min(size);
        for extent in map.extents.iter().filter(|e| !e.zero) {
            if extent.offset < pos {
                // What is before `pos` is written already (as zeros, maybe).
                bail!(
                    "the daemon's allocation map goes back to offset {} after {pos}",
                    extent.offset
                );
            }
            let start = extent.offset.min(map_end);
            let end = (extent.offset + extent.length).min(map_end);
            write_zeros(&mut out, start - pos)?;
            pos = start;
            while pos < end {
                let n = usize::try_from(end - pos)
                    .unwrap_or(CHUNK_BYTES)
                    .min(CHUNK_BYTES);
                let data = client
                    .read_image(name, snapshot, pos, n)
                    .with_context(|| format!("reading volume {name} at offset {pos}"))?;
                if data.len() != n {
                    bail!(
                        "the daemon returned {} bytes for {n} at offset {pos}",
                        data.len()
                    );
                }
                out.write_all(&data).context("writing standard output")?;
                data_bytes += n as u64;
                pos += n as u64;
                bar.set_position(pos);
            }
        }
        write_zeros(&mut out, map_end - pos)?;
        pos = map_end;
        bar.set_position(pos);
    }
    out.flush().context("writing standard output")?;
    bar.finish_and_clear();
    Ok(ExportReport {
        volume: crate::vdiff::image_name(name, snapshot),
        file: "-".into(),
        size_bytes: size,
        data_bytes,
    })
}

/// Writes `len` zero bytes.
fn write_zeros(out: &mut impl Write, mut len: u64) -> anyhow::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..n])
            .context("writing standard output")?;
        len -= n as u64;
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn read_full(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}
