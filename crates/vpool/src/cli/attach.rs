//! How a VM attaches a volume: NBD URIs and a libvirt `<disk>`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Serialize;
use vpool_api::VolumeInfo;

use super::absolute;
use crate::daemon::NBD_SOCKET_NAME;

/// `vol info --json`: the volume's fields, plus how to attach it.
#[derive(Debug, Serialize)]
pub struct VolumeInfoWithAttach {
    #[serde(flatten)]
    pub info: VolumeInfo,
    pub attach: Attach,
}

/// How a VM attaches a volume: the daemon's NBD export of the same name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attach {
    /// The NBD URI for QEMU (`-drive file=URI` / `-blockdev`), over the
    /// pool's Unix socket.
    pub nbd_uri: String,
    /// The same for QEMU in its JSON form (`qemu-img info 'json:...'`),
    /// which needs no URI escaping: QEMU 9.1 and later decode a URI's query
    /// twice, QEMU 7.2 once, so no single URI names a socket path holding
    /// `&`, `=`, `;` or `%` for both.
    pub qemu_json: String,
    /// Set when `nbd_uri` works with QEMU 7.2 and libnbd but not with QEMU
    /// 9.1 and later, because the socket path holds `&`, `=`, `;` or `%`:
    /// what to give those instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd_uri_note: Option<String>,
    /// The NBD Unix socket, absolute.
    pub nbd_socket: PathBuf,
    /// The NBD URI over TCP when the daemon runs with `--nbd-listen`.
    pub nbd_tcp_uri: Option<String>,
    /// A libvirt `<disk>` element for the volume: over the Unix socket, or
    /// over TCP (`--tcp`); reconnecting after a daemon restart.
    pub libvirt_xml: String,
}

/// The choices in the libvirt `<disk>` (`vol info --target --tcp`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibvirtDisk {
    /// The guest device: `vda`, `vdb`, `sda`...
    pub target: String,
    /// Over the daemon's NBD TCP listener instead of its Unix socket.
    pub tcp: bool,
}

impl Default for LibvirtDisk {
    fn default() -> LibvirtDisk {
        LibvirtDisk {
            target: "vda".into(),
            tcp: false,
        }
    }
}

/// How long QEMU holds the guest's requests while it reconnects to a daemon
/// that went away (libvirt's `<reconnect delay>`, QEMU's `reconnect-delay`),
/// before failing them: long enough for a daemon restart (an upgrade) to be
/// a pause, short enough that a daemon that is gone for good shows as I/O
/// errors, not as a guest hung for minutes.
pub const RECONNECT_DELAY_SECS: u32 = 10;

/// The bus libvirt uses for a target device name, by its prefix.
fn bus_of(target: &str) -> Option<&'static str> {
    let (prefix, bus) = [
        ("xvd", "xen"),
        ("vd", "virtio"),
        ("sd", "scsi"),
        ("hd", "ide"),
    ]
    .into_iter()
    .find(|(p, _)| target.starts_with(p))?;
    let rest = &target[prefix.len()..];
    (!rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase())).then_some(bus)
}

/// Checks a `--target` device name: `vd`, `sd`, `hd` or `xvd`, then letters.
pub fn parse_target(s: &str) -> Result<String, String> {
    match bus_of(s) {
        Some(_) => Ok(s.to_string()),
        None => Err(format!(
            "{s:?} is not a disk device name: vda, vdb... (virtio), sda... (scsi), hda... (ide), xvda... (xen)"
        )),
    }
}

impl Attach {
    /// The attach details of export `name` (`VOLUME` of the default pool,
    /// or `POOL/VOLUME`) of the daemon whose home is `home`, which serves
    /// NBD on TCP at `nbd_tcp` if that is set. Errors if `disk.tcp` asks
    /// for TCP without a listener.
    pub fn new(
        name: &str,
        home: &Path,
        nbd_tcp: Option<SocketAddr>,
        disk: &LibvirtDisk,
    ) -> anyhow::Result<Attach> {
        let socket = absolute(home).join(NBD_SOCKET_NAME);
        let socket_str = socket.to_string_lossy();
        let nbd_uri = format!(
            "nbd+unix:///{}?socket={}",
            uri_escape(name),
            uri_escape(&socket_str)
        );
        // Raw over NBD, named: no format probing of a guest's bytes.
        let qemu_json = crate::nbd_target::NbdTarget::Unix(socket.clone()).qemu_json(name);
        let tcp_host = nbd_tcp.map(|addr| (tcp_host_name(addr), addr.port()));
        let nbd_tcp_uri = (tcp_host.as_ref())
            .map(|(host, port)| format!("nbd://{host}:{port}/{}", uri_escape(name)));
        let host_element = match (&tcp_host, disk.tcp) {
            (Some((host, port)), true) => format!(
                "<host name='{}' port='{port}'/>",
                xml_escape(host.trim_start_matches('[').trim_end_matches(']'))
            ),
            (None, true) => anyhow::bail!(
                "the daemon serves NBD on its Unix socket only: start it with --nbd-listen ADDR (or nbd_listen in its configuration file) for --tcp"
            ),
            (_, false) => format!(
                "<host transport='unix' socket='{}'/>",
                xml_escape(&socket_str)
            ),
        };
        let target = &disk.target;
        let bus = bus_of(target).unwrap_or("virtio");
        let libvirt_xml = format!(
            "<disk type='network' device='disk'>\n  \
               <driver name='qemu' type='raw' cache='none' io='native' discard='unmap'/>\n  \
               <source protocol='nbd' name='{}'>\n    \
                 {host_element}\n    \
                 <reconnect delay='{RECONNECT_DELAY_SECS}'/>\n  \
               </source>\n  \
               <target dev='{}' bus='{bus}'/>\n\
             </disk>\n",
            xml_escape(name),
            xml_escape(target),
        );
        let nbd_uri_note = socket_str.contains(['&', '=', ';', '%']).then(|| {
            "the socket path holds '&', '=', ';' or '%', which QEMU 9.1 and later misread in a URI: give them qemu_json (or nbd_tcp_uri)".to_string()
        });
        Ok(Attach {
            nbd_uri,
            nbd_uri_note,
            qemu_json,
            nbd_socket: socket,
            nbd_tcp_uri,
            libvirt_xml,
        })
    }
}

/// The host part of a TCP URI for a listener at `addr`.
fn tcp_host_name(addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        // Listening on every address: name this machine instead of
        // 0.0.0.0, which a client elsewhere cannot connect to.
        return hostname().unwrap_or_else(|| "localhost".to_string());
    }
    match addr.ip() {
        IpAddr::V6(ip) => format!("[{ip}]"),
        IpAddr::V4(ip) => ip.to_string(),
    }
}

/// Percent-encodes everything but unreserved characters and `/`, so a socket
/// path with spaces, `&` or `?` survives QEMU's and libnbd's URI parsers.
fn uri_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Escapes text for an XML attribute value.
fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// This machine's host name, if it has a usable one.
fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for writes of its length; gethostname
    // writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = std::str::from_utf8(&buf[..end]).ok()?.trim();
    (!name.is_empty()).then(|| name.to_string())
}

/// The attach part of the `vol info` text.
pub fn render_attach(a: &Attach) -> String {
    let mut out = format!("\nattach with QEMU (NBD):\n  {}\n", a.nbd_uri);
    if let Some(note) = &a.nbd_uri_note {
        out.push_str(&format!("  (note: {note})\n"));
    }
    if let Some(tcp) = &a.nbd_tcp_uri {
        out.push_str(&format!("  {tcp}\n"));
    }
    out.push_str(&format!(
        "  '{}'   (any socket path, any QEMU)\n",
        a.qemu_json
    ));
    out.push_str("libvirt disk:\n");
    for line in a.libvirt_xml.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}
