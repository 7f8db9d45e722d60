//! The forwarding side: a [`Session`] with the owner's peer server, one
//! request at a time.
//!
//! A session that fails with [`PeerError::Link`] is dead (its stream may
//! hold half a frame): the caller drops it and may retry on a new one.
//! Every other error leaves the session usable.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use vpool_nbd::DeviceError;

use crate::auth::{self, Secret, Side};
use crate::wire::{
    self, CLIENT_MAGIC, MAC_BYTES, MAX_NAME_BYTES, NONCE_BYTES, Op, REPLY_HEADER_BYTES, Reply,
    Request, SERVER_MAGIC, Status,
};

/// How long connecting and the handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take on the owner (a write waits at most
/// the cache's backpressure timeout there; a release uploads what the
/// bucket does not have yet).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request over the link failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The link broke (connect, I/O, a frame that is not the protocol):
    /// the session is dead; a retry on a new one may succeed.
    #[error("the link to peer {addr} failed: {message}")]
    Link { addr: String, message: String },
    /// The peer does not know the pool's secret, or refused ours.
    #[error("peer {addr} failed authentication for pool {pool}")]
    Auth { addr: String, pool: String },
    /// The owner answered with an error.
    #[error("{0}")]
    Device(DeviceError),
    /// A release refused: the owner has clients, or does not own it.
    #[error("peer refused: {0}")]
    Busy(String),
}

/// A session with one peer, authenticated for one pool.
pub struct Session {
    stream: TcpStream,
    addr: String,
}

impl Session {
    /// Connects to the peer server at `addr` and authenticates both sides
    /// for `pool` with `secret`.
    pub fn connect(addr: &str, pool: &str, secret: &Secret) -> Result<Session, PeerError> {
        let link = |e: std::io::Error| PeerError::Link {
            addr: addr.to_string(),
            message: e.to_string(),
        };
        if pool.is_empty() || pool.len() > MAX_NAME_BYTES {
            return Err(PeerError::Link {
                addr: addr.to_string(),
                message: format!("a pool name of {} bytes", pool.len()),
            });
        }
        let sa = addr
            .to_socket_addrs()
            .map_err(link)?
            .next()
            .ok_or_else(|| link(std::io::Error::other("the address resolves to nothing")))?;
        let stream = TcpStream::connect_timeout(&sa, CONNECT_TIMEOUT).map_err(link)?;
        stream.set_nodelay(true).map_err(link)?;
        stream
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .map_err(link)?;
        stream
            .set_write_timeout(Some(CONNECT_TIMEOUT))
            .map_err(link)?;
        let mut s = Session {
            stream,
            addr: addr.to_string(),
        };
        s.handshake(pool, secret)?;
        s.stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .map_err(link)?;
        s.stream
            .set_write_timeout(Some(REQUEST_TIMEOUT))
            .map_err(link)?;
        Ok(s)
    }

    /// A handle on the session's socket: shutting it down ends a request
    /// that waits for an owner that stopped answering (its call then
    /// fails with [`PeerError::Link`]).
    pub fn socket(&self) -> std::io::Result<TcpStream> {
        self.stream.try_clone()
    }

    fn handshake(&mut self, pool: &str, secret: &Secret) -> Result<(), PeerError> {
        let mut hello = [0u8; 8 + NONCE_BYTES];
        self.read_exact(&mut hello)?;
        if hello[..8] != SERVER_MAGIC {
            return Err(self.broken("the peer is not a vpool peer server"));
        }
        let server_nonce: [u8; NONCE_BYTES] = hello[8..].try_into().expect("32 bytes");
        let client_nonce = auth::nonce();
        let mut out = Vec::with_capacity(8 + 1 + pool.len() + NONCE_BYTES + MAC_BYTES);
        out.extend_from_slice(&CLIENT_MAGIC);
        out.push(u8::try_from(pool.len()).expect("checked by connect"));
        out.extend_from_slice(pool.as_bytes());
        out.extend_from_slice(&client_nonce);
        out.extend_from_slice(&auth::mac(
            secret,
            Side::Client,
            pool,
            &server_nonce,
            &client_nonce,
        ));
        self.write_all(&out)?;
        let mut answer = [0u8; 1 + MAC_BYTES];
        let addr = self.addr.clone();
        let auth_failed = || PeerError::Auth {
            addr: addr.clone(),
            pool: pool.to_string(),
        };
        self.read_exact(&mut answer).map_err(|_| auth_failed())?;
        let mac: [u8; MAC_BYTES] = answer[1..].try_into().expect("32 bytes");
        let proven = auth::verify(
            secret,
            Side::Server,
            pool,
            &server_nonce,
            &client_nonce,
            &mac,
        );
        if answer[0] != 0 || !proven {
            return Err(auth_failed());
        }
        Ok(())
    }

    fn broken(&self, message: impl Into<String>) -> PeerError {
        PeerError::Link {
            addr: self.addr.clone(),
            message: message.into(),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), PeerError> {
        self.stream
            .read_exact(buf)
            .map_err(|e| self.broken(e.to_string()))
    }

    fn write_all(&mut self, buf: &[u8]) -> Result<(), PeerError> {
        self.stream
            .write_all(buf)
            .map_err(|e| self.broken(e.to_string()))
    }

    /// Sends `req` with `payload`, reads the reply header; on success the
    /// reply's payload goes to `out` (sized by the caller to what the op
    /// returns).
    fn call(&mut self, req: Request, payload: &[u8], out: &mut [u8]) -> Result<(), PeerError> {
        debug_assert_eq!(req.payload_bytes as usize, payload.len());
        let header = req.encode();
        if payload.len() <= 4096 {
            let mut buf = Vec::with_capacity(header.len() + payload.len());
            buf.extend_from_slice(&header);
            buf.extend_from_slice(payload);
            self.write_all(&buf)?;
        } else {
            self.write_all(&header)?;
            self.write_all(payload)?;
        }
        let mut rh = [0u8; REPLY_HEADER_BYTES];
        self.read_exact(&mut rh)?;
        let reply = Reply::decode(&rh, &req).map_err(|e| self.broken(e.0))?;
        if reply.status == Status::Ok {
            if reply.payload_bytes as usize != out.len() {
                return Err(self.broken("a reply of the wrong length"));
            }
            return self.read_exact(out);
        }
        let mut msg = vec![0u8; reply.payload_bytes as usize];
        self.read_exact(&mut msg)?;
        match reply.status {
            Status::Busy => Err(PeerError::Busy(String::from_utf8_lossy(&msg).into_owned())),
            s => Err(PeerError::Device(wire::reply_error(s, &msg))),
        }
    }

    fn named(&mut self, op: Op, name: &str, out: &mut [u8]) -> Result<(), PeerError> {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(PeerError::Device(DeviceError::invalid(format!(
                "a name of {} bytes",
                name.len()
            ))));
        }
        let req = request(op, name.len() as u32, 0, 0);
        self.call(req, name.as_bytes(), out)
    }

    /// Opens export `image` of the pool on the owner: `(size, read-only)`.
    pub fn open(&mut self, image: &str) -> Result<(u64, bool), PeerError> {
        let mut out = [0u8; 9];
        self.named(Op::Open, image, &mut out)?;
        wire::decode_open(&out).map_err(|e| self.broken(e.0))
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), PeerError> {
        let req = request(Op::Read, 0, offset, buf.len() as u64);
        self.call(req, &[], buf)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), PeerError> {
        let req = request(Op::Write, data.len() as u32, offset, data.len() as u64);
        self.call(req, data, &mut [])
    }

    pub fn flush(&mut self) -> Result<(), PeerError> {
        self.call(request(Op::Flush, 0, 0, 0), &[], &mut [])
    }

    pub fn trim(&mut self, offset: u64, len: u64) -> Result<(), PeerError> {
        self.call(request(Op::Trim, 0, offset, len), &[], &mut [])
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64, may_trim: bool) -> Result<(), PeerError> {
        let mut req = request(Op::WriteZeroes, 0, offset, len);
        req.flag = u8::from(may_trim);
        self.call(req, &[], &mut [])
    }

    /// Drops the open export on the owner; returns once it is dropped.
    pub fn close(&mut self) -> Result<(), PeerError> {
        self.call(request(Op::Close, 0, 0, 0), &[], &mut [])
    }

    /// Clients of `volume` on the owner, its own and forwarded ones.
    pub fn connections(&mut self, volume: &str) -> Result<u64, PeerError> {
        let mut out = [0u8; 8];
        self.named(Op::Connections, volume, &mut out)?;
        Ok(u64::from_le_bytes(out))
    }

    /// Asks the owner to give `volume` up; [`PeerError::Busy`] if it will
    /// not (it has clients).
    pub fn release(&mut self, volume: &str) -> Result<(), PeerError> {
        self.named(Op::Release, volume, &mut [])
    }
}

fn request(op: Op, payload_bytes: u32, offset: u64, length: u64) -> Request {
    Request {
        op,
        flag: 0,
        payload_bytes,
        offset,
        length,
    }
}
