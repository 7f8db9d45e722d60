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
    /// The NBD Unix socket, absolute.
    pub nbd_socket: PathBuf,
    /// The NBD URI over TCP when the daemon runs with `--nbd-listen`.
    pub nbd_tcp_uri: Option<String>,
    /// A libvirt `<disk>` element for the volume over the Unix socket.
    pub libvirt_xml: String,
}

impl Attach {
    /// The attach details of export `name` (`VOLUME` of the default pool,
    /// or `POOL/VOLUME`) of the daemon whose home is `home`, which serves
    /// NBD on TCP at `nbd_tcp` if that is set.
    pub fn new(name: &str, home: &Path, nbd_tcp: Option<SocketAddr>) -> Attach {
        let socket = absolute(home).join(NBD_SOCKET_NAME);
        let socket_str = socket.to_string_lossy();
        let nbd_uri = format!(
            "nbd+unix:///{}?socket={}",
            uri_escape(name),
            uri_escape(&socket_str)
        );
        let nbd_tcp_uri = nbd_tcp.map(|addr| {
            let host = if addr.ip().is_unspecified() {
                // Listening on every address: name this machine instead of
                // 0.0.0.0, which a client elsewhere cannot connect to.
                hostname().unwrap_or_else(|| "localhost".to_string())
            } else {
                match addr.ip() {
                    IpAddr::V6(ip) => format!("[{ip}]"),
                    IpAddr::V4(ip) => ip.to_string(),
                }
            };
            format!("nbd://{host}:{}/{}", addr.port(), uri_escape(name))
        });
        let libvirt_xml = format!(
            "<disk type='network' device='disk'>\n  \
               <driver name='qemu' type='raw' cache='none' io='native'/>\n  \
               <source protocol='nbd' name='{}'>\n    \
                 <host transport='unix' socket='{}'/>\n  \
               </source>\n  \
               <target dev='vda' bus='virtio'/>\n\
             </disk>\n",
            xml_escape(name),
            xml_escape(&socket_str)
        );
        Attach {
            nbd_uri,
            nbd_socket: socket,
            nbd_tcp_uri,
            libvirt_xml,
        }
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
    if let Some(tcp) = &a.nbd_tcp_uri {
        out.push_str(&format!("  {tcp}\n"));
    }
    out.push_str("libvirt disk:\n");
    for line in a.libvirt_xml.lines() {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
    out
}
