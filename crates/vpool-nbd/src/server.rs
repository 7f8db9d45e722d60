//! Accept loop, connection bookkeeping (caps per client and in total, with
//! eviction of idle connections), the handshake deadline, and graceful
//! shutdown.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, info, warn};

use crate::config::{ConfigError, ServerConfig};
use crate::device::ExportRegistry;
use crate::handshake::{self, HandshakeError};
use crate::limits::{Activity, ByteBudget, Candidate, ClientKey, choose_victim};
use crate::net::{DeadlineStream, ListenAddr, Listener, Stream};
use crate::ratelog::RateLimitedLog;
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

/// What the server has counted since it started; see [`ServerHandle::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerStats {
    /// Connections open now (handshake or transmission, including ones
    /// being closed to make room).
    pub connections: usize,
    /// Bytes of READ replies and WRITE payloads held in memory now, all
    /// connections together (bounded by
    /// [`ServerConfig::max_in_flight_bytes_total`]).
    pub in_flight_bytes: usize,
    /// Connections closed at accept because a connection cap was reached
    /// and no idle connection could make room.
    pub refused_connections: u64,
    /// Idle connections closed to make room for a new one.
    pub evicted_connections: u64,
    /// Handshakes that did not finish within
    /// [`ServerConfig::handshake_timeout`].
    pub handshake_timeouts: u64,
    /// Connections closed because a payload did not arrive within
    /// [`ServerConfig::request_read_timeout`] or a reply could not be
    /// written within [`ServerConfig::reply_write_timeout`].
    pub io_timeouts: u64,
    /// Requests whose reading waited because a byte budget (the
    /// connection's, its client's or the server's) was spent.
    pub budget_waits: u64,
    /// Times a connection's
    /// [`ServerConfig::max_in_flight_per_connection`] requests were all
    /// executing and slow, so its next request was not read until one
    /// finished.
    pub request_cap_stalls: u64,
}

/// Server-wide limit state shared with every connection: the byte budget of
/// all connections, the counters behind [`ServerStats`], and the
/// rate-limited log lines of each kind of limit.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) total_budget: ByteBudget,
    connections: AtomicUsize,
    refused: AtomicU64,
    evicted: AtomicU64,
    handshake_timeouts: AtomicU64,
    io_timeouts: AtomicU64,
    budget_waits: AtomicU64,
    request_cap_stalls: AtomicU64,
    log_refused_total: RateLimitedLog,
    log_refused_client: RateLimitedLog,
    log_evicted: RateLimitedLog,
    log_handshake: RateLimitedLog,
    log_io_timeout: RateLimitedLog,
    log_accept: RateLimitedLog,
    log_budget: RateLimitedLog,
    log_request_cap: RateLimitedLog,
}

impl Counters {
    fn new(cfg: &ServerConfig) -> Self {
        Counters {
            total_budget: ByteBudget::new(cfg.max_in_flight_bytes_total),
            connections: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            handshake_timeouts: AtomicU64::new(0),
            io_timeouts: AtomicU64::new(0),
            budget_waits: AtomicU64::new(0),
            request_cap_stalls: AtomicU64::new(0),
            log_refused_total: RateLimitedLog::default(),
            log_refused_client: RateLimitedLog::default(),
            log_evicted: RateLimitedLog::default(),
            log_handshake: RateLimitedLog::default(),
            log_io_timeout: RateLimitedLog::default(),
            log_accept: RateLimitedLog::default(),
            log_budget: RateLimitedLog::default(),
            log_request_cap: RateLimitedLog::default(),
        }
    }

    fn stats(&self) -> ServerStats {
        ServerStats {
            connections: self.connections.load(Ordering::SeqCst),
            in_flight_bytes: self.total_budget.used_bytes(),
            refused_connections: self.refused.load(Ordering::SeqCst),
            evicted_connections: self.evicted.load(Ordering::SeqCst),
            handshake_timeouts: self.handshake_timeouts.load(Ordering::SeqCst),
            io_timeouts: self.io_timeouts.load(Ordering::SeqCst),
            budget_waits: self.budget_waits.load(Ordering::SeqCst),
            request_cap_stalls: self.request_cap_stalls.load(Ordering::SeqCst),
        }
    }

    /// Count a request that waits for memory because byte budget `which`
    /// is spent, and say so (rate-limited).
    pub(crate) fn budget_wait(&self, conn: u64, peer: &str, which: &str, limit_bytes: usize) {
        self.budget_waits.fetch_add(1, Ordering::SeqCst);
        if let Some(suppressed) = self.log_budget.check() {
            warn!(
                conn,
                peer,
                limit_bytes,
                suppressed,
                "NBD limit: the {which}'s bytes in flight are spent; reading its next request waits"
            );
        }
    }

    /// Count a connection whose every request slot is busy with a slow
    /// request, and say so (rate-limited).
    pub(crate) fn request_cap_stall(&self, conn: u64, limit: usize) {
        self.request_cap_stalls.fetch_add(1, Ordering::SeqCst);
        if let Some(suppressed) = self.log_request_cap.check() {
            warn!(
                conn,
                limit,
                suppressed,
                "NBD limit: every request slot of the connection runs a slow request; reading waits for one to finish"
            );
        }
    }

    /// Count a connection closed by `request_read_timeout` or
    /// `reply_write_timeout`, and say so (rate-limited).
    pub(crate) fn io_timeout(&self, conn: u64, peer: &str, what: &str) {
        self.io_timeouts.fetch_add(1, Ordering::SeqCst);
        if let Some(suppressed) = self.log_io_timeout.check() {
            warn!(
                conn,
                peer, suppressed, "NBD limit: {what} timed out; closing the connection"
            );
        }
    }
}

/// One registered connection.
struct Entry {
    stream: Arc<Stream>,
    client: ClientKey,
    peer: String,
    activity: Arc<Activity>,
    /// Closed to make room; its threads are still winding down.
    evicted: bool,
}

/// What the server keeps per client: its connections (not counting evicted
/// ones) and the byte budget they share.
struct ClientSlot {
    connections: usize,
    budget: Arc<ByteBudget>,
}

/// Every connection, and how many each client holds. Evicted connections
/// stay listed until their threads finish (so shutdown waits for them) but
/// no longer count against either cap.
#[derive(Default)]
struct ConnTable {
    conns: HashMap<u64, Entry>,
    per_client: HashMap<ClientKey, ClientSlot>,
    evicting: usize,
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    ClientCap,
    TotalCap,
}

impl ConnTable {
    fn counted(&self) -> usize {
        self.conns.len() - self.evicting
    }

    fn client_count(&self, client: &ClientKey) -> usize {
        self.per_client.get(client).map_or(0, |c| c.connections)
    }

    /// Register a connection; returns its client's byte budget.
    fn insert(&mut self, id: u64, entry: Entry, client_limit_bytes: usize) -> Arc<ByteBudget> {
        let slot = self
            .per_client
            .entry(entry.client)
            .or_insert_with(|| ClientSlot {
                connections: 0,
                budget: Arc::new(ByteBudget::new(client_limit_bytes)),
            });
        slot.connections += 1;
        let budget = Arc::clone(&slot.budget);
        let old = self.conns.insert(id, entry);
        assert!(old.is_none(), "connection id {id} reused");
        budget
    }

    fn uncount(&mut self, client: &ClientKey) {
        let slot = self
            .per_client
            .get_mut(client)
            .expect("a registered connection's client is counted");
        slot.connections -= 1;
        if slot.connections == 0 {
            // Its connections still hold the budget; a new connection of the
            // client starts a new one.
            self.per_client.remove(client);
        }
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if e.evicted {
            self.evicting -= 1;
        } else {
            self.uncount(&e.client);
        }
        Some(e)
    }

    /// Idle connections that may make room, of `only` client if given.
    fn candidates(&self, only: Option<&ClientKey>) -> Vec<Candidate> {
        self.conns
            .iter()
            .filter(|(_, e)| !e.evicted && only.is_none_or(|c| *c == e.client))
            .filter_map(|(&id, e)| {
                Some(Candidate {
                    id,
                    client_connections: self.client_count(&e.client),
                    idle: e.activity.idle()?,
                })
            })
            .collect()
    }

    /// Close connection `id` to make room; returns its peer and idle time.
    fn evict(&mut self, id: u64) -> (String, Duration) {
        let e = self.conns.get_mut(&id).expect("victim is registered");
        assert!(!e.evicted, "connection {id} evicted twice");
        e.evicted = true;
        e.stream.shutdown(Shutdown::Both);
        let (client, peer) = (e.client, e.peer.clone());
        let idle = e.activity.idle().map_or(Duration::ZERO, |i| i.idle_for);
        self.evicting += 1;
        self.uncount(&client);
        (peer, idle)
    }
}

struct Shared {
    cfg: ServerConfig,
    registry: Arc<dyn ExportRegistry>,
    table: Mutex<ConnTable>,
    conns_cv: Condvar,
    shutting_down: AtomicBool,
    next_id: AtomicU64,
    /// Time origin of every connection's [`Activity`].
    epoch: Instant,
    counters: Arc<Counters>,
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
    let counters = Arc::new(Counters::new(&config));
    run_counted(listener.into(), registry, config, shutdown, counters)
}

fn run_counted(
    listener: Listener,
    registry: Arc<dyn ExportRegistry>,
    config: ServerConfig,
    shutdown: ShutdownSignal,
    counters: Arc<Counters>,
) -> Result<(), ServerError> {
    // Non-blocking accept so that a client resetting between poll and accept
    // cannot block the loop.
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    info!(?addr, "NBD server listening");
    let shared = Arc::new(Shared {
        cfg: config,
        registry,
        table: Mutex::new(ConnTable::default()),
        conns_cv: Condvar::new(),
        shutting_down: AtomicBool::new(false),
        next_id: AtomicU64::new(1),
        epoch: Instant::now(),
        counters,
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
            Ok((stream, client, peer)) => admit(shared, stream, client, peer),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if is_transient_accept_error(&e) => {
                // Out of fds or memory, or the client already reset: log,
                // back off briefly, keep serving existing clients.
                if let Some(suppressed) = shared.counters.log_accept.check() {
                    warn!(error = %e, suppressed, "NBD limit: accept failed (out of file descriptors or memory?); retrying");
                }
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

fn admit(shared: &Arc<Shared>, stream: Stream, client: ClientKey, peer: String) {
    let accepted = Instant::now();
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let stream = Arc::new(stream);
    let activity = Arc::new(Activity::new(shared.epoch));
    let client_budget = {
        let mut table = shared.table.lock();
        if let Err(why) = make_room(shared, &mut table, &client) {
            drop(table);
            refuse(shared, why, &client, &peer);
            stream.shutdown(Shutdown::Both);
            return;
        }
        let entry = Entry {
            stream: Arc::clone(&stream),
            client,
            peer: peer.clone(),
            activity: Arc::clone(&activity),
            evicted: false,
        };
        let budget = table.insert(id, entry, shared.cfg.max_in_flight_bytes_per_client);
        let n = table.conns.len();
        shared.counters.connections.store(n, Ordering::SeqCst);
        budget
    };
    debug!(conn = id, peer = %peer, "client connected");
    let sh = Arc::clone(shared);
    let conn = Admitted {
        id,
        stream,
        client,
        peer,
        activity,
        client_budget,
        accepted,
    };
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || connection_main(sh, conn));
    if let Err(e) = spawned {
        warn!(conn = id, error = %e, "cannot spawn connection thread; dropping client");
        unregister(shared, id);
    }
}

/// Make room for one more connection of `client` under both caps, closing
/// an idle connection if a cap is reached (see
/// [`ServerConfig::evict_idle_after`]).
fn make_room(shared: &Shared, table: &mut ConnTable, client: &ClientKey) -> Result<(), Refusal> {
    let cfg = &shared.cfg;
    let (only, why) = if table.client_count(client) >= cfg.max_connections_per_client {
        (Some(client), Refusal::ClientCap)
    } else if table.counted() >= cfg.max_connections {
        (None, Refusal::TotalCap)
    } else {
        return Ok(());
    };
    let victim = choose_victim(table.candidates(only), cfg.evict_idle_after).ok_or(why)?;
    let (victim_peer, idle) = table.evict(victim);
    let c = &shared.counters;
    c.evicted.fetch_add(1, Ordering::SeqCst);
    if let Some(suppressed) = c.log_evicted.check() {
        warn!(conn = victim, peer = %victim_peer, idle_s = idle.as_secs(), new_client = %client,
              ?why, suppressed, "NBD limit: connection cap reached; closing the idle connection to make room");
    }
    assert!(table.client_count(client) < cfg.max_connections_per_client);
    assert!(table.counted() < cfg.max_connections);
    Ok(())
}

/// Count and log (rate-limited) a connection refused at accept.
fn refuse(shared: &Shared, why: Refusal, client: &ClientKey, peer: &str) {
    let c = &shared.counters;
    c.refused.fetch_add(1, Ordering::SeqCst);
    let (log, limit, what) = match why {
        Refusal::ClientCap => (
            &c.log_refused_client,
            shared.cfg.max_connections_per_client,
            "NBD limit: per-client connection cap reached and none of its connections is idle; refusing",
        ),
        Refusal::TotalCap => (
            &c.log_refused_total,
            shared.cfg.max_connections,
            "NBD limit: connection cap reached and no connection is idle; refusing",
        ),
    };
    if let Some(suppressed) = log.check() {
        warn!(peer, client = %client, limit, suppressed, "{what}");
    }
}

fn unregister(shared: &Shared, id: u64) {
    let mut table = shared.table.lock();
    if let Some(e) = table.remove(id) {
        e.stream.shutdown(Shutdown::Both);
    }
    let n = table.conns.len();
    shared.counters.connections.store(n, Ordering::SeqCst);
    shared.conns_cv.notify_all();
}

/// Socket options for a new connection, before the handshake.
fn setup_socket(shared: &Shared, stream: &Stream) -> io::Result<()> {
    stream.set_blocking()?;
    stream.set_nodelay()?;
    if let Some(idle) = shared.cfg.tcp_keepalive {
        stream.set_keepalive(idle)?;
    }
    Ok(())
}

/// A connection admitted by [`admit`], for its thread.
struct Admitted {
    id: u64,
    stream: Arc<Stream>,
    client: ClientKey,
    peer: String,
    activity: Arc<Activity>,
    client_budget: Arc<ByteBudget>,
    accepted: Instant,
}

fn connection_main(shared: Arc<Shared>, conn: Admitted) {
    let Admitted {
        id,
        stream,
        client,
        peer,
        activity,
        client_budget,
        accepted,
    } = conn;
    if let Err(e) = setup_socket(&shared, &stream) {
        warn!(conn = id, error = %e, "socket setup failed");
        unregister(&shared, id);
        return;
    }
    // Shutdown may have begun between admission and here; the drain loop
    // only shuts down sockets it can see, and this one is registered.
    let sd = Arc::clone(&shared);
    let negotiated = {
        let mut s = DeadlineStream {
            stream: &stream,
            deadline: accepted + shared.cfg.handshake_timeout,
        };
        let opener = crate::device::Opener {
            client,
            peer: peer.clone(),
        };
        handshake::negotiate(
            &mut s,
            shared.registry.as_ref(),
            &opener,
            &shared.cfg,
            &move || sd.shutting_down.load(Ordering::SeqCst),
        )
    };
    let n = match negotiated {
        Ok(n) => n,
        Err(e) => {
            log_handshake_error(&shared, id, &peer, &e);
            unregister(&shared, id);
            return;
        }
    };
    // Transmission: no read timeout between requests (a VM may idle for
    // days); every reply write is bounded.
    let setup = stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(Some(shared.cfg.reply_write_timeout)));
    if let Err(e) = setup {
        warn!(conn = id, error = %e, "socket setup failed");
        unregister(&shared, id);
        return;
    }
    // The export name as logs show it (a secret one's not in full).
    let export = loggable_export(&n.export_name);
    info!(conn = id, peer = %peer, export = %export, size = n.params.size, flags = n.flags,
          structured = n.params.structured_replies, base_allocation = n.params.base_allocation, "client entered transmission");
    if shared.shutting_down.load(Ordering::SeqCst) {
        stream.shutdown(Shutdown::Read);
    }
    activity.enter_transmission();
    let sh = Arc::clone(&shared);
    let session = transmission::Session {
        id,
        peer,
        export,
        stream,
        device: n.device,
        params: n.params,
        activity,
        client_budget,
        counters: Arc::clone(&shared.counters),
        on_close: Box::new(move || unregister(&sh, id)),
    };
    transmission::serve(session, &shared.cfg);
}

/// Log a failed handshake. Clients can fail handshakes at will, so the
/// lines that are not routine are rate-limited.
fn log_handshake_error(shared: &Shared, id: u64, peer: &str, e: &HandshakeError) {
    let c = &shared.counters;
    match e {
        HandshakeError::Io(io) if io.kind() == io::ErrorKind::UnexpectedEof => {
            debug!(conn = id, peer, "client left during handshake")
        }
        HandshakeError::Aborted => debug!(conn = id, peer, "client aborted handshake"),
        HandshakeError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            c.handshake_timeouts.fetch_add(1, Ordering::SeqCst);
            if let Some(suppressed) = c.log_handshake.check() {
                warn!(
                    conn = id,
                    peer,
                    limit_s = shared.cfg.handshake_timeout.as_secs_f64(),
                    suppressed,
                    "NBD limit: handshake not finished by its deadline; closing the connection"
                );
            }
        }
        other => {
            if let Some(suppressed) = c.log_handshake.check() {
                warn!(conn = id, peer, error = %other, suppressed, "handshake failed");
            }
        }
    }
}

/// Wind down all connections (see [`run`]).
fn drain(shared: &Shared) {
    let mut table = shared.table.lock();
    if table.conns.is_empty() {
        return;
    }
    info!(
        connections = table.conns.len(),
        "shutting down: finishing in-flight requests"
    );
    for e in table.conns.values() {
        transmission::Connection::shutdown_read(&e.stream);
    }
    let deadline = Instant::now() + shared.cfg.shutdown_grace;
    while !table.conns.is_empty() {
        if shared.conns_cv.wait_until(&mut table, deadline).timed_out() {
            break;
        }
    }
    if !table.conns.is_empty() {
        warn!(
            connections = table.conns.len(),
            "shutdown grace period over: forcing connections closed"
        );
        for e in table.conns.values() {
            e.stream.shutdown(Shutdown::Both);
        }
        while !table.conns.is_empty() {
            // Threads blocked inside a device call finish on their own time.
            if shared
                .conns_cv
                .wait_for(&mut table, Duration::from_secs(10))
                .timed_out()
            {
                warn!(
                    connections = table.conns.len(),
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
    counters: Arc<Counters>,
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

    /// What the server has counted: connections, bytes in flight, limits hit.
    pub fn stats(&self) -> ServerStats {
        self.counters.stats()
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
    let counters = Arc::new(Counters::new(&config));
    let c = Arc::clone(&counters);
    let thread = std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || run_counted(listener, registry, config, sd, c))?;
    Ok(ServerHandle {
        addr,
        shutdown,
        counters,
        thread: Some(thread),
    })
}

/// Export `name` as the server's logs show it. A name whose last `/`
/// segment starts with `.` is the registry's own (reserved: vpool's
/// import exports carry a secret token) and is cut to its first 8 bytes.
pub fn loggable_export(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if !last.starts_with('.') {
        return name.to_string();
    }
    let keep = name.len() - last.len() + last.floor_char_boundary(8);
    format!("{}…", &name[..keep])
}

#[cfg(test)]
mod loggable_tests {
    use super::loggable_export;

    #[test]
    fn secret_export_names_are_cut_in_logs() {
        assert_eq!(loggable_export("web1"), "web1");
        assert_eq!(loggable_export("cold/web1@s"), "cold/web1@s");
        assert_eq!(loggable_export(".import-0123456789abcdef"), ".import-…");
        assert_eq!(loggable_export("cold/.import-0123456789"), "cold/.import-…");
    }
}
