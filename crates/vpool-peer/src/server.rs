//! The owner's side: [`spawn`] serves the link on a TCP listener, one
//! thread per session, executing forwarded requests on the devices a
//! [`PeerBackend`] opens (the same devices its own NBD clients get, so
//! forwarded and local I/O meet in one engine).
//!
//! Everything a peer sends is checked before it is used: the handshake
//! within [`HANDSHAKE_TIMEOUT`], each header by [`Request::decode`], each
//! range against the open device's size with checked arithmetic.
//! Sessions are capped at [`MAX_SESSIONS`]; one idle for
//! [`IDLE_TIMEOUT`] is closed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vpool_nbd::{BlockDevice, DeviceError, DeviceErrorKind};

use crate::auth::{self, Secret, Side};
use crate::wire::{
    self, CLIENT_MAGIC, MAC_BYTES, NONCE_BYTES, Op, REPLY_HEADER_BYTES, REQUEST_HEADER_BYTES,
    Reply, Request, SERVER_MAGIC, Status,
};

/// Most sessions at once (each a thread and a descriptor); more are
/// closed at once, and the forwarding host retries.
pub const MAX_SESSIONS: usize = 256;
/// How long a peer may take over its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections in their handshake at once: strangers that connect
/// and say nothing fill these, not the sessions of authenticated peers.
pub const MAX_HANDSHAKES: u64 = 32;
/// A session with no request for this long is closed (forwarding hosts
/// open a new one when they need it, and drop theirs idle for half of
/// this): sessions of a forwarding host that died stop counting as
/// clients of the volume within a minute.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the owner does for its peers. Blocking.
pub trait PeerBackend: Send + Sync + 'static {
    /// Shared pool `pool`'s secret; `None` if this host does not attach
    /// such a pool (the handshake fails).
    fn secret(&self, pool: &str) -> Option<Secret>;
    /// Export `image` of `pool`, which this host must own (a host never
    /// forwards what was forwarded to it): [`Refusal::Busy`] if it does
    /// not (the forwarding host asks the bucket again and retries). A
    /// device whose volume stops being served here (released, fenced)
    /// answers its requests with a [`DeviceErrorKind::NotFound`] error
    /// before doing anything, which the session turns into "busy": the
    /// request was not run, and the forwarding host retries it at the new
    /// owner.
    fn open(&self, pool: &str, image: &str) -> Result<Arc<dyn BlockDevice>, Refusal>;
    /// Clients of `volume` of `pool` on this host, forwarded ones included.
    fn connections(&self, pool: &str, volume: &str) -> Result<u64, DeviceError>;
    /// Gives `volume` up (upload, release its lease); `Err` with the
    /// reason if it has clients or is not owned here.
    fn release(&self, pool: &str, volume: &str) -> Result<(), Refusal>;
}

/// What the server counts.
#[derive(Debug, Default)]
pub struct PeerStats {
    pub sessions: AtomicU64,
    pub refused_auth: AtomicU64,
    pub requests: AtomicU64,
    /// Connections in their handshake now (at most [`MAX_HANDSHAKES`]).
    pub handshaking: AtomicU64,
}

/// A running peer server.
pub struct PeerServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    streams: Arc<Mutex<BTreeMap<u64, TcpStream>>>,
    accept: Option<JoinHandle<()>>,
    pub stats: Arc<PeerStats>,
}

impl PeerServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and closes every session (their threads end on
    /// their own; requests running finish first).
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for s in self
            .streams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Serves the link on `listener` for `backend`.
pub fn spawn(listener: TcpListener, backend: Arc<dyn PeerBackend>) -> std::io::Result<PeerServer> {
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let streams = Arc::new(Mutex::new(BTreeMap::new()));
    let stats = Arc::new(PeerStats::default());
    let accept = {
        let (stop, streams, stats) = (stop.clone(), streams.clone(), stats.clone());
        std::thread::Builder::new()
            .name("peer-accept".into())
            .spawn(move || accept_loop(listener, backend, stop, streams, stats))?
    };
    Ok(PeerServer {
        addr,
        stop,
        streams,
        accept: Some(accept),
        stats,
    })
}

type Streams = Arc<Mutex<BTreeMap<u64, TcpStream>>>;

fn accept_loop(
    listener: TcpListener,
    backend: Arc<dyn PeerBackend>,
    stop: Arc<AtomicBool>,
    streams: Streams,
    stats: Arc<PeerStats>,
) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "peer link: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let peer = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        if stats.handshaking.load(Ordering::SeqCst) >= MAX_HANDSHAKES {
            tracing::warn!(%peer, max = MAX_HANDSHAKES, "peer link: too many connections in their handshake; closing a new one");
            continue;
        }
        {
            let mut all = streams.lock().unwrap_or_else(|e| e.into_inner());
            if all.len() >= MAX_SESSIONS {
                tracing::warn!(%peer, max = MAX_SESSIONS, "peer link: too many sessions; closing a new one");
                continue;
            }
            next_id += 1;
            all.insert(next_id, registered);
        }
        stats.handshaking.fetch_add(1, Ordering::SeqCst);
        let (id, backend, streams, session_stats) =
            (next_id, backend.clone(), streams.clone(), stats.clone());
        let spawned = std::thread::Builder::new()
            .name("peer-session".into())
            .spawn(move || {
                if let Err(e) = serve_session(stream, &*backend, &session_stats) {
                    tracing::debug!(%peer, error = %e, "peer session ended");
                }
                streams
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
            });
        if let Err(e) = spawned {
            stats.handshaking.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(error = %e, "peer link: no thread for a session");
        }
    }
}

/// Why a session ended early.
#[derive(Debug, thiserror::Error)]
enum SessionEnd {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] wire::WireError),
    #[error("authentication failed for pool {0:?}")]
    Auth(String),
}

/// The handshake: the pool the peer proved it belongs to.
fn handshake(
    stream: &mut TcpStream,
    backend: &dyn PeerBackend,
) -> Result<(String, Secret), SessionEnd> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let server_nonce = auth::nonce();
    let mut hello = Vec::with_capacity(8 + NONCE_BYTES);
    hello.extend_from_slice(&SERVER_MAGIC);
    hello.extend_from_slice(&server_nonce);
    stream.write_all(&hello)?;
    let mut head = [0u8; 9];
    stream.read_exact(&mut head)?;
    if head[..8] != CLIENT_MAGIC {
        return Err(wire::WireError("not a vpool peer".into()).into());
    }
    let mut rest = vec![0u8; usize::from(head[8]) + NONCE_BYTES + MAC_BYTES];
    stream.read_exact(&mut rest)?;
    let (pool, client_nonce, mac) = wire::decode_client_hello(head[8], &rest)?;
    let secret = backend.secret(&pool);
    let proven = secret
        .as_ref()
        .is_some_and(|s| auth::verify(s, Side::Client, &pool, &server_nonce, &client_nonce, &mac));
    let Some(secret) = secret.filter(|_| proven) else {
        // The caller counts the refusal, then answers it.
        return Err(SessionEnd::Auth(pool));
    };
    let mut answer = [0u8; 1 + MAC_BYTES];
    answer[1..].copy_from_slice(&auth::mac(
        &secret,
        Side::Server,
        &pool,
        &server_nonce,
        &client_nonce,
    ));
    stream.write_all(&answer)?;
    Ok((pool, secret))
}

fn serve_session(
    mut stream: TcpStream,
    backend: &dyn PeerBackend,
    stats: &PeerStats,
) -> Result<(), SessionEnd> {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let shaken = stream
        .set_nodelay(true)
        .map_err(SessionEnd::from)
        .and_then(|()| handshake(&mut stream, backend));
    stats.handshaking.fetch_sub(1, Ordering::SeqCst);
    let pool = match shaken {
        Ok((pool, _)) => pool,
        Err(SessionEnd::Auth(pool)) => {
            stats.refused_auth.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, %pool, "peer link: a peer failed authentication");
            let _ = stream.write_all(&[1u8; 1 + MAC_BYTES]);
            return Err(SessionEnd::Auth(pool));
        }
        Err(e) => return Err(e),
    };
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut s = Served {
        backend,
        pool,
        device: None,
        buf: Vec::new(),
    };
    loop {
        let mut h = [0u8; REQUEST_HEADER_BYTES];
        match stream.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let req = Request::decode(&h)?;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut payload = vec![0u8; req.payload_bytes as usize];
        stream.read_exact(&mut payload)?;
        let (status, out) = s.execute(&req, &payload);
        let reply = Reply {
            status,
            payload_bytes: out.len() as u32,
        };
        let mut frame = Vec::with_capacity(REPLY_HEADER_BYTES + out.len());
        frame.extend_from_slice(&reply.encode());
        frame.extend_from_slice(out);
        stream.write_all(&frame)?;
    }
}

/// A session's state: its pool and the export it opened.
struct Served<'a> {
    backend: &'a dyn PeerBackend,
    pool: String,
    device: Option<Arc<dyn BlockDevice>>,
    buf: Vec<u8>,
}

fn failed(e: DeviceError, buf: &mut Vec<u8>) -> Status {
    buf.clear();
    let msg = e.message.as_bytes();
    buf.extend_from_slice(&msg[..msg.len().min(wire::MAX_MESSAGE_BYTES as usize)]);
    Status::Failed(e.kind)
}

impl Served<'_> {
    /// Runs `req`: the reply's status and payload (in `self.buf`).
    fn execute(&mut self, req: &Request, payload: &[u8]) -> (Status, &[u8]) {
        self.buf.clear();
        let status = match self.run(req, payload) {
            Ok(()) => Status::Ok,
            Err(Refusal::Device(e)) => failed(e, &mut self.buf),
            Err(Refusal::Busy(why)) => {
                self.buf
                    .extend_from_slice(&why.as_bytes()[..why.len().min(1024)]);
                Status::Busy
            }
        };
        (status, &self.buf)
    }

    fn name(payload: &[u8]) -> Result<&str, Refusal> {
        std::str::from_utf8(payload)
            .map_err(|_| Refusal::Device(DeviceError::invalid("a name that is not UTF-8")))
    }

    fn run(&mut self, req: &Request, payload: &[u8]) -> Result<(), Refusal> {
        match req.op {
            Op::Open => {
                let dev = self.backend.open(&self.pool, Self::name(payload)?)?;
                self.buf
                    .extend_from_slice(&wire::encode_open(dev.size_bytes(), dev.read_only()));
                self.device = Some(dev);
                Ok(())
            }
            Op::Close => {
                self.device = None;
                Ok(())
            }
            Op::Connections => {
                let n = self.backend.connections(&self.pool, Self::name(payload)?)?;
                self.buf.extend_from_slice(&n.to_le_bytes());
                Ok(())
            }
            Op::Release => self.backend.release(&self.pool, Self::name(payload)?),
            _ => self.io(req, payload),
        }
    }

    /// A read, write, flush, trim or zeroing on the open export; a device
    /// that says its volume is not served here any more (`NotFound`) is
    /// "busy": the request was not run.
    fn io(&mut self, req: &Request, payload: &[u8]) -> Result<(), Refusal> {
        match self.run_io(req, payload) {
            Err(Refusal::Device(e)) if e.kind == DeviceErrorKind::NotFound => {
                self.device = None;
                Err(Refusal::Busy(e.message))
            }
            other => other,
        }
    }

    fn run_io(&mut self, req: &Request, payload: &[u8]) -> Result<(), Refusal> {
        let dev = self
            .device
            .as_ref()
            .ok_or_else(|| DeviceError::invalid("no export open in this session"))?;
        let end = req.offset.checked_add(req.length);
        if end.is_none_or(|e| e > dev.size_bytes()) {
            return Err(DeviceError::invalid(format!(
                "{} bytes at {} are beyond the export's {} bytes",
                req.length,
                req.offset,
                dev.size_bytes()
            ))
            .into());
        }
        let writes = !matches!(req.op, Op::Read | Op::Flush);
        if writes && dev.read_only() {
            return Err(DeviceError::read_only("the export is read-only").into());
        }
        match req.op {
            Op::Read => {
                let n = usize::try_from(req.length).expect("at most MAX_DATA_BYTES");
                self.buf.resize(n, 0);
                if let Err(e) = dev.read(req.offset, &mut self.buf) {
                    self.buf.clear();
                    return Err(e.into());
                }
                Ok(())
            }
            Op::Write => Ok(dev.write(req.offset, payload)?),
            Op::Flush => Ok(dev.flush()?),
            Op::Trim => Ok(dev.trim(req.offset, req.length)?),
            Op::WriteZeroes => Ok(dev.write_zeroes(req.offset, req.length, req.flag == 1)?),
            _ => unreachable!("io() is only called for I/O ops"),
        }
    }
}

/// Why the owner did not do what a peer asked.
#[derive(Debug)]
pub enum Refusal {
    /// It failed: the forwarding host's client gets this error.
    Device(DeviceError),
    /// Not now (a release with clients, an open of a volume this host no
    /// longer owns): the forwarding host may ask again.
    Busy(String),
}

impl From<DeviceError> for Refusal {
    fn from(e: DeviceError) -> Self {
        Refusal::Device(e)
    }
}
