//! A small blocking NBD client: one export, one request at a time, simple
//! replies. It is what `vpool vol bench` drives the daemon's NBD server
//! with (several clients on several threads for concurrency), so the bench
//! measures the path a VM's I/O takes.
//!
//! The server's bytes are distrusted as a server's would distrust a
//! client's: every length is checked against a limit before anything is
//! allocated, magics and handles are checked, and the read timeout bounds
//! every wait.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::proto::*;

/// Longest option reply payload accepted (an `NBD_REP_INFO` is 12 bytes; a
/// server's error message is text).
const MAX_OPTION_REPLY_LEN: u32 = 64 * 1024;
/// Option replies accepted before the `NBD_REP_ACK` of `NBD_OPT_GO`.
const MAX_OPTION_REPLIES: usize = 64;
/// Largest read or write one request may carry.
pub const MAX_REQUEST_BYTES: u32 = 32 << 20;

/// Why the client failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD connection: {0}")]
    Io(#[from] io::Error),
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("the NBD server refused export {export:?} (reply {reply:#x}): {message}")]
    Refused {
        export: String,
        reply: u32,
        message: String,
    },
    #[error("NBD request failed with errno {0}")]
    Errno(u32),
    #[error("{0}")]
    Invalid(String),
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A connection to one export, after `NBD_OPT_GO`.
pub struct Client {
    stream: Box<dyn Stream>,
    size_bytes: u64,
    flags: u16,
    next_handle: u64,
}

impl Client {
    /// Opens `export` on the server at Unix socket `path`.
    pub fn connect_unix(
        path: &Path,
        export: &str,
        timeout: Duration,
    ) -> Result<Client, ClientError> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Client::handshake(Box::new(s), export)
    }

    /// Opens `export` on the server at TCP address `addr`.
    pub fn connect_tcp(addr: &str, export: &str, timeout: Duration) -> Result<Client, ClientError> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Client::handshake(Box::new(s), export)
    }

    /// Opens `export` over a connected `stream` (another transport; the
    /// fuzz target feeds it a server's bytes this way).
    pub fn over<S: Read + Write + Send + 'static>(
        stream: S,
        export: &str,
    ) -> Result<Client, ClientError> {
        Client::handshake(Box::new(stream), export)
    }

    /// The export's size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Whether the server exports it read-only.
    pub fn read_only(&self) -> bool {
        self.flags & NBD_FLAG_READ_ONLY != 0
    }

    fn handshake(mut stream: Box<dyn Stream>, export: &str) -> Result<Client, ClientError> {
        let export_len = u32::try_from(export.len())
            .ok()
            .filter(|n| *n <= MAX_STRING_LEN as u32)
            .ok_or_else(|| {
                ClientError::Invalid(format!("export name of {} bytes", export.len()))
            })?;
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        if greeting[..8] != NBD_MAGIC.to_be_bytes() || greeting[8..16] != IHAVEOPT.to_be_bytes() {
            return Err(ClientError::Protocol(
                "not a fixed-newstyle greeting".into(),
            ));
        }
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if server_flags & NBD_FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "the server is not fixed-newstyle".into(),
            ));
        }
        let mut client_flags = NBD_FLAG_C_FIXED_NEWSTYLE;
        if server_flags & NBD_FLAG_NO_ZEROES != 0 {
            client_flags |= NBD_FLAG_C_NO_ZEROES;
        }
        stream.write_all(&client_flags.to_be_bytes())?;
        let mut go = Vec::with_capacity(export.len() + 6);
        go.extend_from_slice(&export_len.to_be_bytes());
        go.extend_from_slice(export.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(go.len() as u32).to_be_bytes());
        opt.extend_from_slice(&go);
        stream.write_all(&opt)?;
        let mut export_info: Option<(u64, u16)> = None;
        for _ in 0..MAX_OPTION_REPLIES {
            let (reply, payload) = read_option_reply(&mut stream)?;
            match reply {
                NBD_REP_ACK => {
                    let (size_bytes, flags) = export_info.ok_or_else(|| {
                        ClientError::Protocol("GO acknowledged without NBD_INFO_EXPORT".into())
                    })?;
                    return Ok(Client {
                        stream,
                        size_bytes,
                        flags,
                        next_handle: 1,
                    });
                }
                NBD_REP_INFO => {
                    if payload.len() == 12 && payload[..2] == NBD_INFO_EXPORT.to_be_bytes() {
                        let size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([payload[10], payload[11]]);
                        export_info = Some((size, flags));
                    }
                }
                r if r & (1 << 31) != 0 => {
                    return Err(ClientError::Refused {
                        export: export.to_string(),
                        reply: r,
                        message: String::from_utf8_lossy(&payload).into_owned(),
                    });
                }
                r => return Err(ClientError::Protocol(format!("option reply type {r:#x}"))),
            }
        }
        Err(ClientError::Protocol(format!(
            "more than {MAX_OPTION_REPLIES} replies to NBD_OPT_GO"
        )))
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let len = self.check_range(offset, buf.len())?;
        let handle = self.send(NBD_CMD_READ, 0, offset, len, &[])?;
        self.reply(handle)?;
        self.stream.read_exact(buf)?;
        Ok(())
    }

    /// Writes `data` at `offset` (durable on return with `fua`).
    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        if self.read_only() {
            return Err(ClientError::Invalid("the export is read-only".into()));
        }
        let len = self.check_range(offset, data.len())?;
        let flags = if fua { NBD_CMD_FLAG_FUA } else { 0 };
        let handle = self.send(NBD_CMD_WRITE, flags, offset, len, data)?;
        self.reply(handle)
    }

    /// Makes every write completed before it durable.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        let handle = self.send(NBD_CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(handle)
    }

    /// Ends the connection politely (`NBD_CMD_DISC`: no reply).
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(NBD_CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<u32, ClientError> {
        let len32 = u32::try_from(len)
            .ok()
            .filter(|n| *n <= MAX_REQUEST_BYTES)
            .ok_or_else(|| ClientError::Invalid(format!("a request of {len} bytes")))?;
        match offset.checked_add(u64::from(len32)) {
            Some(end) if end <= self.size_bytes => Ok(len32),
            _ => Err(ClientError::Invalid(format!(
                "{len} bytes at {offset} are past the export's end ({} bytes)",
                self.size_bytes
            ))),
        }
    }

    fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<u64, ClientError> {
        let handle = self.next_handle;
        self.next_handle = self.next_handle.wrapping_add(1);
        let mut h = [0u8; REQUEST_HEADER_LEN];
        h[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&command.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&h)?;
        self.stream.write_all(data)?;
        Ok(handle)
    }

    /// Reads the simple reply to `handle`: an error if the request failed.
    fn reply(&mut self, handle: u64) -> Result<(), ClientError> {
        let mut r = [0u8; SIMPLE_REPLY_LEN];
        self.stream.read_exact(&mut r)?;
        if r[..4] != NBD_SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(ClientError::Protocol("not a simple reply".into()));
        }
        let errno = u32::from_be_bytes(r[4..8].try_into().expect("4 bytes"));
        let got = u64::from_be_bytes(r[8..16].try_into().expect("8 bytes"));
        if got != handle {
            return Err(ClientError::Protocol(format!(
                "a reply to request {got} while {handle} was the one in flight"
            )));
        }
        match errno {
            0 => Ok(()),
            e => Err(ClientError::Errno(e)),
        }
    }
}

/// One option reply: its type and payload.
fn read_option_reply(stream: &mut dyn Stream) -> Result<(u32, Vec<u8>), ClientError> {
    let mut h = [0u8; 20];
    stream.read_exact(&mut h)?;
    if h[..8] != OPT_REPLY_MAGIC.to_be_bytes() {
        return Err(ClientError::Protocol("bad option reply magic".into()));
    }
    let reply = u32::from_be_bytes(h[12..16].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(h[16..20].try_into().expect("4 bytes"));
    if len > MAX_OPTION_REPLY_LEN {
        return Err(ClientError::Protocol(format!(
            "an option reply of {len} bytes"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload)?;
    Ok((reply, payload))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{MemDevice, MemRegistry, ServerConfig};

    /// Against this crate's own server over a Unix socket: write, flush,
    /// read back; a request past the end is refused before it is sent; an
    /// unknown export is a refusal naming it.
    #[test]
    fn talks_to_the_server() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let registry = Arc::new(MemRegistry::new());
        registry.insert("disk", "d", Arc::new(MemDevice::new(1 << 20)));
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = crate::spawn(listener, registry, ServerConfig::default()).unwrap();
        let t = Duration::from_secs(10);
        let mut c = Client::connect_unix(&path, "disk", t).unwrap();
        assert_eq!(c.size_bytes(), 1 << 20);
        assert!(!c.read_only());
        c.write(4096, &[7u8; 8192], false).unwrap();
        c.flush().unwrap();
        let mut buf = vec![0u8; 8192];
        c.read(4096, &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 8192]);
        assert!(matches!(
            c.read((1 << 20) - 512, &mut buf),
            Err(ClientError::Invalid(_))
        ));
        c.disconnect().unwrap();
        let err = Client::connect_unix(&path, "nope", t).err().unwrap();
        assert!(matches!(err, ClientError::Refused { .. }), "{err}");
        server.shutdown().unwrap();
    }
}
