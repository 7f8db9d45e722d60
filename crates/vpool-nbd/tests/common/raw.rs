//! A raw-socket NBD client: just enough of the protocol, written out by
//! hand, to misbehave in every way a test needs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vpool_nbd::proto::*;

pub fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

pub fn read_exact(s: &mut impl Read, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).expect("read");
    v
}

/// True if the server closed the connection (EOF or reset) within the timeout.
pub fn closed_by_server(s: &mut impl Read) -> bool {
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

pub fn greeting(s: &mut impl Read) {
    let g = read_exact(s, 18);
    assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
    assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
}

pub fn send_opt(s: &mut impl Write, code: u32, data: &[u8]) {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

/// Read one option reply: (option, type, payload).
pub fn opt_reply(s: &mut impl Read) -> (u32, u32, Vec<u8>) {
    let h = read_exact(s, 20);
    assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
    let o = u32::from_be_bytes(h[8..12].try_into().unwrap());
    let t = u32::from_be_bytes(h[12..16].try_into().unwrap());
    let l = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    (o, t, read_exact(s, l))
}

/// Handshake with NBD_OPT_GO (no structured replies); returns the socket.
pub fn open_export(path: &Path, name: &str) -> UnixStream {
    go(connect(path), name)
}

/// The client side of a handshake with NBD_OPT_GO on a connected socket.
pub fn go<S: Read + Write>(mut s: S, name: &str) -> S {
    greeting(&mut s);
    go_after_greeting(s, name)
}

/// [`go`] on a socket whose greeting was read already.
pub fn go_after_greeting<S: Read + Write>(mut s: S, name: &str) -> S {
    s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend_from_slice(name.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    send_opt(&mut s, NBD_OPT_GO, &go);
    loop {
        let (_, t, _) = opt_reply(&mut s);
        if t == NBD_REP_ACK {
            return s;
        }
        assert_eq!(t, NBD_REP_INFO, "GO failed with reply type {t:#x}");
    }
}

pub fn request(typ: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = NBD_REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&typ.to_be_bytes());
    v.extend_from_slice(&handle.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Simple reply header: (errno, handle).
pub fn simple_reply(s: &mut impl Read) -> (u32, u64) {
    let r = read_exact(s, 16);
    assert_eq!(&r[..4], &NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    (
        u32::from_be_bytes(r[4..8].try_into().unwrap()),
        u64::from_be_bytes(r[8..16].try_into().unwrap()),
    )
}

/// A fresh client can write and read back.
pub fn assert_healthy(path: &Path) {
    let mut s = open_export(path, "disk");
    let mut w = request(NBD_CMD_WRITE, 0, 1, 0, 512);
    w.extend_from_slice(&[0x42; 512]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 1));
    s.write_all(&request(NBD_CMD_READ, 0, 2, 0, 512)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 2));
    assert_eq!(read_exact(&mut s, 512), vec![0x42; 512]);
    s.write_all(&request(NBD_CMD_DISC, 0, 3, 0, 0)).unwrap();
    assert!(closed_by_server(&mut s));
}

/// One WRITE of `len` bytes of `byte` at `offset`, then a FLUSH, over a
/// fresh connection to export `name`: the errno of each (0: done).
pub fn write_and_flush(path: &Path, name: &str, offset: u64, len: u32, byte: u8) -> (u32, u32) {
    let mut s = open_export(path, name);
    let mut req = request(NBD_CMD_WRITE, 0, 1, offset, len);
    req.extend(std::iter::repeat_n(byte, len as usize));
    s.write_all(&req).unwrap();
    let (write_err, _) = simple_reply(&mut s);
    s.write_all(&request(NBD_CMD_FLUSH, 0, 2, 0, 0)).unwrap();
    let (flush_err, _) = simple_reply(&mut s);
    (write_err, flush_err)
}
