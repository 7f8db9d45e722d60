//! Accept loop, connection bookkeeping and graceful shutdown.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, info, warn};

use crate::config::{ConfigError, ServerConfig};
use crate::device::ExportRegistry;
use crate::handshake::{self, HandshakeError};
use crate::net::{ListenAddr, Listener, Stream};
use crate::transmission;

/// A one-shot, clonable shutdown trigger. [`run`] returns after
/// [`trigger`](Self::trigger) is called (from any thread or signal-handling
/// loop) and all connections have wound down.
#[derive(Clone, Debug)]
pub struct ShutdownSignal {
    inner: Arc<ShutdownInner>,
}

#[derive(Debug)]
struct ShutdownInner {
    fired: AtomicBool,
    // A socketpair makes the trigger pollable next to the listener.
    wake_rx: UnixStream,
    wake_tx: UnixStream,
}

impl ShutdownSignal {
    pub fn new() -> io::Result<Self> {
        let (wake_rx, wake_tx) = UnixStream::pair()?;
        wake_rx.set_nonblocking(true)?;
        wake_tx.set_nonblocking(true)?;
        Ok(ShutdownSignal {
            inner: Arc::new(ShutdownInner {
                fired: AtomicBool::new(false),
                wake_rx,
                wake_tx,
            }),
        })
    }

    /// Fire the signal; idempotent.
    pub fn trigger(&self) {
        if !self.inner.fired.swap(true, Ordering::SeqCst) {
            // A full socket buffer still means "readable", which is all we need.
            let _ = (&self.inner.wake_tx).write(&[1]);
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.inner.fired.load(Ordering::SeqCst)
    }
}

/// Errors from [`run`] / [`spawn`].
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("listener failed: {0}")]
    Io(#[from] io::Error),
}

struct Shared {
    cfg: ServerConfig,
    registry: Arc<dyn ExportRegistry>,
    conns: Mutex<HashMap<u64, Arc<Stream>>>,
    conns_cv: Condvar,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
}

/// Serve NBD on `listener` until `shutdown` fires.
///
/// On shutdown the server stops accepting, closes the read side of every
/// connection (in-flight requests still complete and are answered), waits up
/// to [`ServerConfig::shutdown_grace`] for connections to finish, then forces
/// the remaining sockets closed and waits for their threads. Every connection
/// flushes its device on the way out if it wrote to it.
///
/// Blocking: call it on a dedicated thread, or use [`spawn`].
pub fn run(
    listener: impl Into<Listener>,
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
    shutdown: ShutdownSignal,
) -> Result<(), ServerError> {
    config.validate()?;
    let listener = listener.into();
    // Non-blocking accept so that a client resetting between poll and accept
    // cannot block the loop.
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    info!(?addr, "NBD server listening");
    let shared = Arc::new(Shared {
        cfg: config,
        registry,
        conns: Mutex::new(HashMap::new()),
        conns_cv: Condvar::new(),
        shutting_down: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
    });

    let result = accept_loop(&listener, &shared, &shutdown);
    drop(listener);
    shared.shutting_down.store(true, Ordering::SeqCst);
    drain(&shared);
    info!(?addr, "NBD server stopped");
    result.map_err(ServerError::Io)
}

fn accept_loop(
    listener: &Listener,
    shared: &Arc<Shared>,
    shutdown: &ShutdownSignal,
) -> io::Result<()> {
    let mut fds = [
        libc::pollfd {
            fd: listener.raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: shutdown.inner.wake_rx.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if shutdown.is_triggered() {
            return Ok(());
        }
        fds[0].revents = 0;
        fds[1].revents = 0;
        // SAFETY: `fds` is a valid array of two initialised pollfd structs
        // that outlives the call; the length passed matches.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            let mut b = [0u8; 16];
            let _ = (&shutdown.inner.wake_rx).read(&mut b);
            continue;
        }
        if fds[0].revents == 0 {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => admit(shared, stream, peer),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_transient_accept_error(&e) => {
                // Out of fds or memory, or the client already reset: log,
                // back off briefly, keep serving existing clients.
                warn!(error = %e, "accept failed; retrying");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                error!(error = %e, "accept failed; stopping server");
                return Err(e);
            }
        }
    }
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EPERM
        )
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

fn admit(shared: &Arc<Shared>, stream: Stream, peer: String) {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let stream = Arc::new(stream);
    {
        let mut conns = shared.conns.lock();
        if conns.len() >= shared.cfg.max_connections {
            warn!(peer = %peer, limit = shared.cfg.max_connections, "connection limit reached; refusing client");
            stream.shutdown(Shutdown::Both);
            return;
        }
        conns.insert(id, Arc::clone(&stream));
    }
    debug!(conn = id, peer = %peer, "client connected");
    let sh = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || connection_main(sh, id, stream, peer));
    if let Err(e) = spawned {
        warn!(conn = id, error = %e, "cannot spawn connection thread; dropping client");
        unregister(shared, id);
    }
}

fn unregister(shared: &Shared, id: u64) {
    let mut conns = shared.conns.lock();
    if let Some(s) = conns.remove(&id) {
        s.shutdown(Shutdown::Both);
    }
    shared.conns_cv.notify_all();
}

fn connection_main(shared: Arc<Shared>, id: u64, stream: Arc<Stream>, peer: String) {
    let setup = stream
        .set_blocking()
        .and_then(|()| stream.set_nodelay())
        .and_then(|()| stream.set_read_timeout(Some(shared.cfg.handshake_timeout)));
    if let Err(e) = setup {
        warn!(conn = id, error = %e, "socket setup failed");
        unregister(&shared, id);
        return;
    }
    // Shutdown may have begun between admission and here; the drain loop
    // only shuts down sockets it can see, and this one is registered.
    let sd = Arc::clone(&shared);
    let negotiated = {
        let mut s: &Stream = &stream;
        handshake::negotiate(&mut s, shared.registry.as_ref(), &shared.cfg, &move || {
            sd.shutting_down.load(Ordering::SeqCst)
        })
    };
    let n = match negotiated {
        Ok(n) => n,
        Err(e) => {
            match &e {
                HandshakeError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!(conn = id, peer = %peer, "client left during handshake")
                }
                HandshakeError::Aborted => {
                    debug!(conn = id, peer = %peer, "client aborted handshake")
                }
                HandshakeError::Io(io)
                    if matches!(
                        io.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    warn!(conn = id, peer = %peer, "handshake timed out")
                }
                other => warn!(conn = id, peer = %peer, error = %other, "handshake failed"),
            }
            unregister(&shared, id);
            return;
        }
    };
    if let Err(e) = stream.set_read_timeout(None) {
        warn!(conn = id, error = %e, "socket setup failed");
        unregister(&shared, id);
        return;
    }
    info!(conn = id, peer = %peer, export = %n.export_name, size = n.params.size, flags = n.flags,
          structured = n.params.structured_replies, base_allocation = n.params.base_allocation, "client entered transmission");
    if shared.shutting_down.load(Ordering::SeqCst) {
        stream.shutdown(Shutdown::Read);
    }
    let sh = Arc::clone(&shared);
    let cfg = shared.cfg.clone();
    transmission::serve(
        id,
        peer,
        n.export_name,
        stream,
        n.device,
        n.params,
        &cfg,
        Box::new(move || unregister(&sh, id)),
    );
}

/// Wind down all connections (see [`run`]).
fn drain(shared: &Shared) {
    let mut conns = shared.conns.lock();
    if conns.is_empty() {
        return;
    }
    info!(
        connections = conns.len(),
        "shutting down: finishing in-flight requests"
    );
    for s in conns.values() {
        transmission::Connection::shutdown_read(s);
    }
    let deadline = Instant::now() + shared.cfg.shutdown_grace;
    while !conns.is_empty() {
        if shared.conns_cv.wait_until(&mut conns, deadline).timed_out() {
            break;
        }
    }
    if !conns.is_empty() {
        warn!(
            connections = conns.len(),
            "shutdown grace period over: forcing connections closed"
        );
        for s in conns.values() {
            s.shutdown(Shutdown::Both);
        }
        while !conns.is_empty() {
            // Threads blocked inside a device call finish on their own time.
            if shared
                .conns_cv
                .wait_for(&mut conns, Duration::from_secs(10))
                .timed_out()
            {
                warn!(
                    connections = conns.len(),
                    "still waiting for connections stuck in device calls"
                );
            }
        }
    }
}

/// A server running on its own thread (see [`spawn`]).
#[derive(Debug)]
pub struct ServerHandle {
    addr: ListenAddr,
    shutdown: ShutdownSignal,
    thread: Option<JoinHandle<Result<(), ServerError>>>,
}

impl ServerHandle {
    /// Where the server listens.
    pub fn addr(&self) -> &ListenAddr {
        &self.addr
    }

    /// An NBD URI for `export` on this server.
    pub fn uri(&self, export: &str) -> String {
        self.addr.uri(export)
    }

    /// The signal that stops this server.
    pub fn shutdown_signal(&self) -> ShutdownSignal {
        self.shutdown.clone()
    }

    /// Trigger shutdown and wait for the server to finish.
    pub fn shutdown(mut self) -> Result<(), ServerError> {
        self.shutdown.trigger();
        self.join_inner()
    }

    fn join_inner(&mut self) -> Result<(), ServerError> {
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| {
                Err(ServerError::Io(io::Error::other("server thread panicked")))
            }),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown.trigger();
        let _ = self.join_inner();
    }
}

/// Start [`run`] on a new thread; dropping or calling
/// [`ServerHandle::shutdown`] on the handle stops it.
pub fn spawn(
    listener: impl Into<Listener>,
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
) -> Result<ServerHandle, ServerError> {
    config.validate()?;
    let listener = listener.into();
    let addr = listener.local_addr()?;
    let shutdown = ShutdownSignal::new()?;
    let sd = shutdown.clone();
    let thread = std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || run(listener, registry, config, sd))?;
    Ok(ServerHandle {
        addr,
        shutdown,
        thread: Some(thread),
    })
}
