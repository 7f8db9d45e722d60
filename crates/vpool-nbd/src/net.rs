//! Listener and stream types covering TCP and Unix-domain sockets, who is
//! at the other end ([`ClientKey`]), and socket I/O with deadlines.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::limits::ClientKey;

/// TCP keepalive probes: interval and count after the idle time, so a dead
/// peer is noticed `KEEPALIVE_INTERVAL * KEEPALIVE_PROBES` after probing
/// starts.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_PROBES: u32 = 6;

/// A listening socket the server accepts NBD clients on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

/// Where a [`Listener`] is bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(Option<PathBuf>),
}

impl ListenAddr {
    /// An NBD URI (as understood by libnbd, qemu and fio) for `export` on this address.
    pub fn uri(&self, export: &str) -> String {
        match self {
            ListenAddr::Tcp(a) => format!("nbd://{a}/{export}"),
            ListenAddr::Unix(Some(p)) => format!("nbd+unix:///{export}?socket={}", p.display()),
            ListenAddr::Unix(None) => format!("nbd+unix:///{export}"),
        }
    }
}

impl Listener {
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => Ok(ListenAddr::Tcp(l.local_addr()?)),
            Listener::Unix(l) => Ok(ListenAddr::Unix(
                l.local_addr()?.as_pathname().map(|p| p.to_path_buf()),
            )),
        }
    }

    /// Accept a client: its socket, who it is, and a name for logs.
    pub(crate) fn accept(&self) -> io::Result<(Stream, ClientKey, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let key = ClientKey::Ip(peer.ip().to_canonical());
                Ok((Stream::Tcp(s), key, peer.to_string()))
            }
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                let key = unix_peer(&s);
                Ok((Stream::Unix(s), key, key.to_string()))
            }
        }
    }

    pub(crate) fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }

    pub(crate) fn set_nonblocking(&self, nb: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(nb),
            Listener::Unix(l) => l.set_nonblocking(nb),
        }
    }
}

/// The process at the other end of a Unix socket (as of its `connect`).
fn unix_peer(s: &UnixStream) -> ClientKey {
    match rustix::net::sockopt::socket_peercred(s) {
        Ok(c) => ClientKey::Process {
            pid: c.pid.as_raw_nonzero().get(),
            uid: c.uid.as_raw(),
        },
        Err(_) => ClientKey::Unknown,
    }
}

/// A connected client socket. Reads and writes go through `&Stream`, so one
/// thread can read while another writes on the same socket.
#[derive(Debug)]
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn shutdown(&self, how: Shutdown) {
        // ENOTCONN after the peer left is expected and harmless.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        };
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    /// Turn on TCP keepalive, probing after `idle` without traffic (see
    /// [`KEEPALIVE_INTERVAL`]). A no-op on Unix sockets, whose peer cannot
    /// vanish without the kernel noticing.
    pub fn set_keepalive(&self, idle: Duration) -> io::Result<()> {
        use rustix::net::sockopt;
        let Stream::Tcp(s) = self else {
            return Ok(());
        };
        sockopt::set_socket_keepalive(s, true)?;
        sockopt::set_tcp_keepidle(s, idle)?;
        sockopt::set_tcp_keepintvl(s, KEEPALIVE_INTERVAL)?;
        sockopt::set_tcp_keepcnt(s, KEEPALIVE_PROBES)?;
        Ok(())
    }

    pub fn set_blocking(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(false),
            Stream::Unix(s) => s.set_nonblocking(false),
        }
    }

    /// Disable Nagle: replies are written whole and must leave at once.
    pub fn set_nodelay(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nodelay(true),
            Stream::Unix(_) => Ok(()),
        }
    }

    /// Write all of `bufs` with as few syscalls as possible, within
    /// `timeout`. The socket's send timeout must already be `timeout` (set
    /// once per connection): the common case, one `writev` that takes
    /// everything, then costs no extra syscall. Only after a partial write is
    /// the send timeout shortened to what is left (and restored at the end).
    /// Fails with `TimedOut` at the deadline.
    pub fn write_all_vectored(
        &self,
        bufs: &mut [IoSlice<'_>],
        timeout: Duration,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut bufs = bufs;
        IoSlice::advance_slices(&mut bufs, 0);
        let mut shortened = false;
        let r = loop {
            if bufs.is_empty() {
                break Ok(());
            }
            let r = match self {
                Stream::Tcp(s) => (&*s).write_vectored(bufs),
                Stream::Unix(s) => (&*s).write_vectored(bufs),
            };
            match r {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(timed_out(e)),
            }
            if !bufs.is_empty() {
                match remaining(deadline) {
                    Ok(left) => {
                        shortened = true;
                        if let Err(e) = self.set_write_timeout(Some(left)) {
                            break Err(e);
                        }
                    }
                    Err(e) => break Err(e),
                }
            }
        };
        if shortened {
            self.set_write_timeout(Some(timeout))?;
        }
        r
    }

    /// One `read` that fails with `TimedOut` if nothing arrives by
    /// `deadline`. Leaves the socket's receive timeout set; the caller
    /// clears it before blocking without a deadline.
    pub fn read_by(&self, buf: &mut [u8], deadline: Instant) -> io::Result<usize> {
        self.set_read_timeout(Some(remaining(deadline)?))?;
        let mut s = self;
        s.read(buf).map_err(timed_out)
    }
}

/// Time left until `deadline`, or a `TimedOut` error if none is.
pub(crate) fn remaining(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(io::ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(left)
}

/// A blocking socket whose timeout expired reports `WouldBlock`; say what
/// it means.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "socket timeout")
    } else {
        e
    }
}

/// A stream whose every read and write must finish by one deadline: the
/// handshake runs over it, so a client trickling a byte at a time cannot
/// stretch the handshake past the deadline.
pub(crate) struct DeadlineStream<'a> {
    pub(crate) stream: &'a Stream,
    pub(crate) deadline: Instant,
}

impl Read for DeadlineStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read_by(buf, self.deadline)
    }
}

impl Write for DeadlineStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream
            .set_write_timeout(Some(remaining(self.deadline)?))?;
        let mut s = self.stream;
        s.write(buf).map_err(timed_out)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match *self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
