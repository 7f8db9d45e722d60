//! What a disk image file holds, told by its first bytes, and the
//! conversion of the formats vpool does not read itself.
//!
//! `vol import` stores raw bytes. Storing a qcow2 file's container bytes as
//! a disk (what it did before) gives a VM a disk it cannot boot, without a
//! word; so an import first looks at the file's header, as `qemu-img`'s
//! probes do (`block/*.c` `*_probe`), and:
//!
//! - raw (no known magic) is imported as it is, sparsely;
//! - qcow2, qcow, QED, VMDK, VHDX, VDI, VHD (dynamic) and Parallels images
//!   are converted with `qemu-img convert -O raw` into a sparse temporary
//!   file beside the system's temporary directory, which is then imported
//!   (so the conversion needs free space for the image's *data*, not its
//!   virtual size); `qemu-img` is what every host running QEMU has, and
//!   it reads every variant (compressed clusters, backing files, streamOptimized
//!   VMDK) that a hand-written reader would get wrong;
//! - LUKS, compressed streams (gzip, xz, zstd, bzip2) and `.vdiff` files
//!   are refused with what to do instead.
//!
//! A header cannot tell a fixed VHD (a raw image with a footer) from raw:
//! like `qemu-img`, it is imported as raw, footer included. `--format`
//! overrides the detection.

use std::fmt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// Bytes of a file's start that [`detect`] looks at.
pub const PROBE_BYTES: usize = 512;

/// What an image file holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Raw,
    /// Formats `qemu-img` converts; the name is its `-f` name.
    Qemu(&'static str),
    /// Content that is not a disk image vpool can import.
    Refused(Refusal),
}

/// Content an import refuses, with the fix in its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Luks,
    Compressed(&'static str),
    Vdiff,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Format::Raw => f.write_str("raw"),
            Format::Qemu(name) => f.write_str(name),
            Format::Refused(Refusal::Luks) => f.write_str("LUKS"),
            Format::Refused(Refusal::Compressed(c)) => write!(f, "{c}-compressed"),
            Format::Refused(Refusal::Vdiff) => f.write_str("vdiff"),
        }
    }
}

/// Formats `--format` accepts: raw, and what `qemu-img` converts.
pub const QEMU_FORMATS: [&str; 8] = [
    "qcow2",
    "qcow",
    "qed",
    "vmdk",
    "vhdx",
    "vdi",
    "vpc",
    "parallels",
];

/// The format named by `--format`.
pub fn parse_format(name: &str) -> Result<Format, String> {
    if name == "raw" {
        return Ok(Format::Raw);
    }
    QEMU_FORMATS
        .iter()
        .find(|f| **f == name)
        .map(|f| Format::Qemu(f))
        .ok_or_else(|| format!("unknown format {name:?}: raw, {}", QEMU_FORMATS.join(", ")))
}

/// The format of an image whose first bytes are `head` (up to
/// [`PROBE_BYTES`]; fewer if the image is shorter).
pub fn detect(head: &[u8]) -> Format {
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        // The version (big-endian u32 at 4) tells qcow (1) from qcow2.
        return Format::Qemu(if at(4, &[0, 0, 0, 1]) {
            "qcow"
        } else {
            "qcow2"
        });
    }
    let qemu = [
        (0, &b"QED\0"[..], "qed"),
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        // VDI's signature 0xbeda107f, little-endian, after a 64-byte text.
        (0x40, b"\x7f\x10\xda\xbe", "vdi"),
        (0, b"conectix", "vpc"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
    ];
    if let Some((_, _, name)) = qemu.iter().find(|(o, m, _)| at(*o, m)) {
        return Format::Qemu(name);
    }
    let refused = [
        (&b"LUKS\xba\xbe"[..], Refusal::Luks),
        (b"\x1f\x8b", Refusal::Compressed("gzip")),
        (b"\xfd7zXZ\0", Refusal::Compressed("xz")),
        (b"\x28\xb5\x2f\xfd", Refusal::Compressed("zstd")),
        (b"BZh", Refusal::Compressed("bzip2")),
        (vpool_vdiff::MAGIC, Refusal::Vdiff),
    ];
    match refused.iter().find(|(m, _)| at(0, m)) {
        Some((_, r)) => Format::Refused(*r),
        None => Format::Raw,
    }
}

/// Why content of format `r` at `what` cannot be imported, and the fix.
pub fn refusal_message(r: Refusal, what: &str, volume: &str) -> String {
    match r {
        Refusal::Luks => format!(
            "{what} is a LUKS-encrypted image; open it (cryptsetup open) and import the mapped device, or import it as raw bytes with --format raw"
        ),
        Refusal::Compressed(c) => format!(
            "{what} is {c}-compressed; decompress it into the import: `{c} -dc FILE | vpool vol import {volume} - --size SIZE`"
        ),
        Refusal::Vdiff => format!(
            "{what} is a .vdiff incremental backup; apply it with `vpool vol import-diff {volume} FILE`"
        ),
    }
}

/// A sparse raw copy of a `format` image, made by `qemu-img`, removed when
/// dropped.
pub struct Converted {
    dir: PathBuf,
    pub raw: PathBuf,
    /// The image's virtual size.
    pub size_bytes: u64,
}

impl Drop for Converted {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Converts `path` (an image of `format`) into a sparse raw file in a new
/// private directory under the system's temporary directory, with
/// `qemu-img`. Unless the format was `named` by the user, an image that
/// reads other files (a backing file, a qcow2 data file, VMDK extents
/// elsewhere) is refused: the header of a raw disk that a guest wrote could
/// otherwise make the host read any file into the volume.
pub fn convert_to_raw(path: &Path, format: &str, named: bool) -> anyhow::Result<Converted> {
    let size_bytes = checked_size(path, format, named)?;
    let dir = std::env::temp_dir().join(format!(
        "vpool-import-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    // Private: the copy is a guest's disk.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let converted = Converted {
        raw: dir.join("image.raw"),
        dir,
        size_bytes,
    };
    // -S 4k: runs of zeros of a block or more stay holes.
    let out = qemu_img()
        .args(["convert", "-q", "-f", format, "-O", "raw", "-S", "4k"])
        .arg(path)
        .arg(&converted.raw)
        .output()
        .context("running qemu-img convert")?;
    if !out.status.success() {
        bail!(
            "qemu-img could not convert {} from {format}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(converted)
}

/// The virtual size of the `format` image at `path`, after the check
/// [`convert_to_raw`] makes (unless `named`, an image that reads other
/// files is refused).
pub fn checked_size(path: &Path, format: &str, named: bool) -> anyhow::Result<u64> {
    let info = inspect(path, format)?;
    if !named && let Some(other) = info.reads_elsewhere {
        bail!(
            "{} is a {format} image that reads {other}: pass --format {format} to convert it with what it names (or --format raw to store its bytes as they are)",
            path.display()
        );
    }
    Ok(info.size_bytes)
}

/// Converts the `format` image at `path` with `qemu-img` into `target`
/// (an existing raw image all of zeros, named as QEMU takes it: a
/// `json:` NBD export), writing only its data; qemu-img's own progress
/// goes to standard error with `show_progress`.
pub fn convert_into(
    path: &Path,
    format: &str,
    target: &str,
    show_progress: bool,
) -> anyhow::Result<()> {
    let mut cmd = qemu_img();
    cmd.args([
        "convert",
        "-n",
        "--target-is-zero",
        "-f",
        format,
        "-O",
        "raw",
        "-S",
        "4k",
    ]);
    if show_progress {
        cmd.arg("-p").stdout(std::io::stderr());
    } else {
        cmd.arg("-q");
    }
    let out = cmd
        .arg(path)
        .arg(target)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|c| c.wait_with_output())
        .context("running qemu-img convert")?;
    if !out.status.success() {
        bail!(
            "qemu-img could not convert {} from {format} into the volume: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// What `qemu-img info` says of an image.
struct Inspected {
    size_bytes: u64,
    /// A file other than the image that reading it reads, if any.
    reads_elsewhere: Option<String>,
}

/// `qemu-img info` of `path`, read as `format`.
fn inspect(path: &Path, format: &str) -> anyhow::Result<Inspected> {
    let out = qemu_img()
        .args(["info", "--output=json", "-f", format])
        .arg(path)
        .output()
        .context("running qemu-img info")?;
    if !out.status.success() {
        bail!(
            "qemu-img cannot read {} as {format}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading qemu-img info's JSON")?;
    let size_bytes = info["virtual-size"]
        .as_u64()
        .context("qemu-img info gave no virtual-size")?;
    let data = &info["format-specific"]["data"];
    let me = path.to_string_lossy();
    let extents = data["extents"].as_array().into_iter().flatten();
    let reads_elsewhere = (info["backing-filename"].as_str())
        .or(data["data-file"].as_str())
        .or_else(|| {
            extents
                .filter_map(|e| e["filename"].as_str())
                .find(|f| *f != me)
        })
        .map(str::to_string);
    Ok(Inspected {
        size_bytes,
        reads_elsewhere,
    })
}

/// `qemu-img` from `PATH` ([`require_qemu_img`] says when it is missing).
fn qemu_img() -> Command {
    Command::new("qemu-img")
}

/// Checks that `qemu-img` runs, for a `format` image at `what`.
pub fn require_qemu_img(format: &str, what: &str) -> anyhow::Result<()> {
    match qemu_img().arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => bail!(
            "{what} is a {format} image; converting it needs qemu-img (Debian: apt-get install qemu-utils), which is not on PATH"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(offset: usize, magic: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; PROBE_BYTES];
        h[offset..offset + magic.len()].copy_from_slice(magic);
        h
    }

    #[test]
    fn detects_each_format_by_its_magic() {
        let qcow2 = with(0, b"QFI\xfb\0\0\0\x03");
        assert_eq!(detect(&qcow2), Format::Qemu("qcow2"));
        assert_eq!(detect(&with(0, b"QFI\xfb\0\0\0\x01")), Format::Qemu("qcow"));
        assert_eq!(detect(&with(0, b"KDMV")), Format::Qemu("vmdk"));
        assert_eq!(detect(&with(0, b"vhdxfile")), Format::Qemu("vhdx"));
        assert_eq!(
            detect(&with(0x40, b"\x7f\x10\xda\xbe")),
            Format::Qemu("vdi")
        );
        assert_eq!(detect(&with(0, b"conectix")), Format::Qemu("vpc"));
        assert_eq!(
            detect(&with(0, b"\x1f\x8b\x08")),
            Format::Refused(Refusal::Compressed("gzip"))
        );
        assert_eq!(
            detect(&with(0, b"LUKS\xba\xbe")),
            Format::Refused(Refusal::Luks)
        );
        assert_eq!(
            detect(&with(0, vpool_vdiff::MAGIC)),
            Format::Refused(Refusal::Vdiff)
        );
    }

    #[test]
    fn anything_else_is_raw_even_when_short() {
        assert_eq!(detect(&[]), Format::Raw);
        assert_eq!(detect(b"QFI"), Format::Raw);
        assert_eq!(detect(&[0u8; PROBE_BYTES]), Format::Raw);
        // An MBR: boot code, then the 0x55aa signature.
        assert_eq!(detect(&with(510, b"\x55\xaa")), Format::Raw);
    }

    #[test]
    fn format_names_parse() {
        assert_eq!(parse_format("raw"), Ok(Format::Raw));
        assert_eq!(parse_format("vmdk"), Ok(Format::Qemu("vmdk")));
        assert!(parse_format("iso").unwrap_err().contains("qcow2"));
    }
}
