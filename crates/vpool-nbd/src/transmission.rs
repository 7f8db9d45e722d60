//! The transmission phase: reading requests, executing them, writing replies.
//!
//! # Threading model: inline execution with stall takeover
//!
//! Each connection has one *leader* thread that owns the socket's read side.
//! It parses a request and executes it **inline** — for a memory-speed device a
//! READ or WRITE takes microseconds, so handing it to another thread would
//! cost more (a wake-up and a context switch on a 2-core machine) than the
//! work itself. Replies are appended to a per-connection output buffer under
//! a mutex and written whole, so chunks of different replies never
//! interleave; while more requests are already buffered from the socket the
//! leader *corks* replies and writes them in one syscall later (it always
//! flushes before it could block on a read, and before FLUSH/FUA requests).
//!
//! A request may block on a real device (disk, network) for milliseconds.
//! So that one slow request does not stall the connection's other requests,
//! a *watcher* thread samples the leader every
//! [`stall_threshold`](crate::ServerConfig::stall_threshold): if the leader has
//! been inside the same request for a whole period, the watcher takes over
//! reading (an atomic compare-and-swap on a sequence word decides the race
//! with the leader finishing), flushes corked replies, and a new watcher is
//! started. The old leader finishes its request, writes its reply, and then
//! becomes the watcher or exits. Requests are therefore answered out of order
//! whenever some are slow, and at most
//! [`max_in_flight_per_connection`](crate::ServerConfig::max_in_flight_per_connection)
//! execute at once; beyond that the leader simply runs un-watched until a
//! thread frees up, which is back-pressure on the client through TCP. The
//! watcher parks itself when the connection has been quiet for a while, so
//! idle connections cost no CPU; the fast path costs one atomic store and one
//! atomic load per request.
//!
//! # Limits
//!
//! Bytes of READ data and WRITE payloads are taken from the byte budgets of
//! the connection, its client and the server before the buffer is
//! allocated, and given back once the reply is written (see [`Held`]). When
//! one is spent the reading thread waits, so nothing more is read from that
//! connection until its client's (or others') requests are answered. A
//! WRITE payload must arrive within `request_read_timeout` of its header;
//! each reply must be written within `reply_write_timeout` (the socket's
//! send timeout, shortened after a partial write). Between requests a
//! connection may idle forever; its watcher marks it idle in the shared
//! [`Activity`] when it parks, which is what lets the server evict it when a
//! connection cap is reached.
//!
//! # Errors
//!
//! Invalid requests are answered with the protocol's error (see
//! [`wire::decode_request`]) and the connection carries on. A bad request
//! magic, a WRITE payload over `max_request_bytes`, or a socket error ends
//! the connection after in-flight requests are answered; the device is
//! flushed if the connection wrote to it.

use std::io::{self, IoSlice, Read};
use std::net::Shutdown;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, warn};

use crate::config::ServerConfig;
use crate::device::{BlockDevice, DeviceError, DeviceErrorKind};
use crate::limits::{Activity, ByteBudget, Held};
use crate::net::Stream;
use crate::proto::*;
use crate::ratelog::{LOG_PERIOD, RateLimitedLog};
use crate::server::Counters;
use crate::wire::{self, Command, RequestError, TransmissionParams};

/// Bytes read from the socket at a time; many small requests fit in one read.
const INPUT_BUFFER: usize = 256 * 1024;
/// Corked replies are written once this much is pending.
const OUTPUT_FLUSH_AT: usize = 128 * 1024;
/// Replies with more data than this bypass the output buffer (vectored write).
const DIRECT_WRITE_AT: usize = 64 * 1024;
/// Per-thread payload buffers larger than this are released after use, so a
/// single 32 MiB request does not pin 32 MiB per thread forever.
const KEEP_SCRATCH: usize = 4 * 1024 * 1024;
/// Watcher periods without any new request before the watcher parks.
const PARK_AFTER_TICKS: u32 = 200;
/// Rejected requests logged at WARN per connection; later ones at DEBUG, so a
/// misbehaving client cannot flood the log.
const WARN_REJECTIONS: u32 = 10;

/// Socket read side plus a buffer; owned by whichever thread leads.
struct Input {
    stream: Arc<Stream>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// A payload read left a receive timeout on the socket; it must be
    /// cleared before waiting for the next request.
    rcv_timeout_set: bool,
}

enum Fill {
    Ready,
    /// Clean end of stream at a request boundary.
    Eof,
}

impl Input {
    fn buffered(&self) -> usize {
        self.end - self.start
    }

    /// Ensure `n <= INPUT_BUFFER` bytes are buffered, by `deadline` if one
    /// is given (else waiting as long as it takes). Flushes corked replies
    /// before blocking, so the client always sees every answer it can get.
    fn fill(
        &mut self,
        n: usize,
        out: &Mutex<Output>,
        deadline: Option<Instant>,
    ) -> io::Result<Fill> {
        if self.buffered() >= n {
            return Ok(Fill::Ready);
        }
        if self.start + n > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        out.lock().flush()?;
        if deadline.is_none() && self.rcv_timeout_set {
            self.stream.set_read_timeout(None)?;
            self.rcv_timeout_set = false;
        }
        while self.buffered() < n {
            let r = match deadline {
                None => (&*self.stream).read(&mut self.buf[self.end..]),
                Some(d) => {
                    self.rcv_timeout_set = true;
                    self.stream.read_by(&mut self.buf[self.end..], d)
                }
            };
            match r {
                Ok(0) => {
                    return if self.buffered() == 0 {
                        Ok(Fill::Eof)
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "client closed mid-request",
                        ))
                    };
                }
                Ok(r) => self.end += r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(Fill::Ready)
    }

    fn must_fill(&mut self, n: usize, out: &Mutex<Output>, deadline: Instant) -> io::Result<()> {
        match self.fill(n, out, Some(deadline))? {
            Fill::Ready => Ok(()),
            Fill::Eof => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "client closed mid-request",
            )),
        }
    }

    fn take_header(&mut self) -> [u8; REQUEST_HEADER_LEN] {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        h.copy_from_slice(&self.buf[self.start..self.start + REQUEST_HEADER_LEN]);
        self.start += REQUEST_HEADER_LEN;
        h
    }

    /// Read a request payload into `dst`; what is not buffered yet must
    /// arrive within `timeout`.
    fn read_payload(
        &mut self,
        dst: &mut [u8],
        out: &Mutex<Output>,
        timeout: Duration,
    ) -> io::Result<()> {
        let have = self.buffered().min(dst.len());
        dst[..have].copy_from_slice(&self.buf[self.start..self.start + have]);
        self.start += have;
        let mut rest = &mut dst[have..];
        if rest.is_empty() {
            return Ok(());
        }
        // Only a payload that is not all here yet pays for a clock read.
        let deadline = Instant::now() + timeout;
        if rest.len() <= self.buf.len() / 2 {
            // Small remainder: refill the buffer, which also reads ahead.
            self.must_fill(rest.len(), out, deadline)?;
            let n = rest.len();
            rest.copy_from_slice(&self.buf[self.start..self.start + n]);
            self.start += n;
            return Ok(());
        }
        out.lock().flush()?;
        self.rcv_timeout_set = true;
        while !rest.is_empty() {
            match self.stream.read_by(rest, deadline) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => rest = &mut rest[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Discard `n` payload bytes of a rejected WRITE, within `timeout`.
    fn skip(&mut self, mut n: usize, out: &Mutex<Output>, timeout: Duration) -> io::Result<()> {
        let mut deadline = None;
        while n > 0 {
            if self.buffered() == 0 {
                let d = *deadline.get_or_insert_with(|| Instant::now() + timeout);
                self.must_fill(1, out, d)?;
            }
            let k = self.buffered().min(n);
            self.start += k;
            n -= k;
        }
        Ok(())
    }

    fn has_header(&self) -> bool {
        self.buffered() >= REQUEST_HEADER_LEN
    }
}

/// Socket write side plus the cork buffer.
struct Output {
    stream: Arc<Stream>,
    buf: Vec<u8>,
    broken: bool,
    /// `reply_write_timeout`, also the socket's send timeout.
    write_timeout: Duration,
    /// A write failed because the client did not read for `write_timeout`.
    timed_out: bool,
}

impl Output {
    fn flush(&mut self) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection write side failed",
            ));
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self
            .stream
            .write_all_vectored(&mut [IoSlice::new(&self.buf)], self.write_timeout);
        self.buf.clear();
        self.check(r)
    }

    /// Write `header` + `data`, bypassing the buffer (flushes pending first).
    fn write_direct(&mut self, header: &[u8], data: &[u8]) -> io::Result<()> {
        if self.broken {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection write side failed",
            ));
        }
        let pending = std::mem::take(&mut self.buf);
        let r = self.stream.write_all_vectored(
            &mut [
                IoSlice::new(&pending),
                IoSlice::new(header),
                IoSlice::new(data),
            ],
            self.write_timeout,
        );
        self.buf = pending;
        self.buf.clear();
        self.check(r)
    }

    fn check(&mut self, r: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &r {
            self.timed_out |= e.kind() == io::ErrorKind::TimedOut;
            // The client is gone or stuck; wake the reader so the connection
            // winds down instead of executing requests nobody will see.
            self.broken = true;
            self.stream.shutdown(Shutdown::Both);
        }
        r
    }
}

/// Per-thread reusable buffers (no allocation per request on the hot path).
#[derive(Default)]
struct Scratch {
    data: Vec<u8>,
    reply: Vec<u8>,
}

impl Scratch {
    fn data(&mut self, len: usize) -> &mut [u8] {
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        &mut self.data[..len]
    }

    fn trim(&mut self) {
        if self.data.len() > KEEP_SCRATCH {
            self.data = Vec::new();
        }
    }
}

enum Role {
    Leader,
    Watcher,
    /// Finished a request after losing leadership.
    Released,
    Exit,
}

struct Ctl {
    threads: usize,
    watcher: bool,
    /// The current stall at the request cap was counted and logged.
    cap_reported: bool,
}

/// One client connection in transmission phase.
pub(crate) struct Connection {
    id: u64,
    peer: String,
    export: String,
    device: Arc<dyn BlockDevice>,
    params: TransmissionParams,
    stall: Duration,
    max_in_flight: usize,
    /// `request_read_timeout`: how long a WRITE payload may take to arrive.
    payload_timeout: Duration,
    stream: Arc<Stream>,
    input: Mutex<Input>,
    output: Mutex<Output>,
    /// `(sequence << 1) | executing`: the leader bumps the sequence when it
    /// starts executing a request; a watcher that sees the same executing value
    /// twice a period apart steals leadership by CAS.
    state: AtomicU64,
    ctl: Mutex<Ctl>,
    ctl_cv: Condvar,
    watcher_parked: AtomicBool,
    closing: AtomicBool,
    dirty: AtomicBool,
    rejections: AtomicU32,
    /// Bytes this connection's requests hold (READ data, WRITE payloads).
    budget: ByteBudget,
    /// The same, for all connections of this connection's client.
    client_budget: Arc<ByteBudget>,
    /// Idleness, as the server sees it for eviction.
    activity: Arc<Activity>,
    counters: Arc<Counters>,
    on_close: Box<dyn Fn() + Send + Sync>,
}

/// A negotiated connection, handed from the server to [`serve`].
pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) peer: String,
    pub(crate) export: String,
    pub(crate) stream: Arc<Stream>,
    pub(crate) device: Arc<dyn BlockDevice>,
    pub(crate) params: TransmissionParams,
    pub(crate) activity: Arc<Activity>,
    pub(crate) client_budget: Arc<ByteBudget>,
    pub(crate) counters: Arc<Counters>,
    /// Called once, when the connection's last thread is done.
    pub(crate) on_close: Box<dyn Fn() + Send + Sync>,
}

/// Start serving a negotiated connection. The calling thread becomes the
/// first leader and returns when it stops leading; the connection finishes
/// on whichever of its threads exits last, calling `on_close`.
pub(crate) fn serve(session: Session, cfg: &ServerConfig) {
    let Session {
        id,
        peer,
        export,
        stream,
        device,
        params,
        activity,
        client_budget,
        counters,
        on_close,
    } = session;
    let conn = Arc::new(Connection {
        id,
        peer,
        export,
        device,
        params,
        stall: cfg.stall_threshold,
        max_in_flight: cfg.max_in_flight_per_connection,
        payload_timeout: cfg.request_read_timeout,
        input: Mutex::new(Input {
            stream: Arc::clone(&stream),
            buf: vec![0u8; INPUT_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            rcv_timeout_set: false,
        }),
        output: Mutex::new(Output {
            stream: Arc::clone(&stream),
            buf: Vec::with_capacity(OUTPUT_FLUSH_AT),
            broken: false,
            write_timeout: cfg.reply_write_timeout,
            timed_out: false,
        }),
        stream,
        state: AtomicU64::new(0),
        ctl: Mutex::new(Ctl {
            threads: 1,
            watcher: false,
            cap_reported: false,
        }),
        ctl_cv: Condvar::new(),
        watcher_parked: AtomicBool::new(false),
        closing: AtomicBool::new(false),
        dirty: AtomicBool::new(false),
        rejections: AtomicU32::new(0),
        budget: ByteBudget::new(cfg.max_in_flight_bytes_per_connection),
        client_budget,
        activity,
        counters,
        on_close,
    });
    {
        let mut ctl = conn.ctl.lock();
        Connection::spawn_watcher(&conn, &mut ctl);
    }
    Connection::thread_main(conn, Role::Leader);
}

enum Next<'a> {
    Exec {
        cmd: Command,
        handle: u64,
        more: bool,
        /// The request's share of the byte budgets, until it is answered.
        held: Option<Held<'a>>,
    },
    Reject {
        handle: u64,
        typ: u16,
        err: RequestError,
    },
    Close(&'static str),
}

impl Connection {
    fn spawn_watcher(this: &Arc<Self>, ctl: &mut Ctl) {
        let conn = Arc::clone(this);
        let r = std::thread::Builder::new()
            .name(format!("nbd-conn-{}", this.id))
            .spawn(move || Connection::thread_main(conn, Role::Watcher));
        match r {
            Ok(_) => {
                ctl.threads += 1;
                ctl.watcher = true;
            }
            Err(e) => {
                warn!(conn = this.id, error = %e, "cannot spawn watcher thread; continuing without")
            }
        }
    }

    fn thread_main(this: Arc<Self>, mut role: Role) {
        let mut scratch = Scratch::default();
        loop {
            role = match role {
                Role::Leader => this.lead(&mut scratch),
                Role::Watcher => Connection::watch(&this),
                Role::Released => {
                    let mut ctl = this.ctl.lock();
                    if !ctl.watcher && !this.closing.load(Ordering::SeqCst) {
                        ctl.watcher = true;
                        Role::Watcher
                    } else {
                        Role::Exit
                    }
                }
                Role::Exit => break,
            };
        }
        drop(scratch);
        let last = {
            let mut ctl = this.ctl.lock();
            ctl.threads -= 1;
            ctl.threads == 0
        };
        if last {
            this.finish();
        }
    }

    /// Runs on the last thread of the connection.
    fn finish(&self) {
        let (flush_res, timed_out) = {
            let mut out = self.output.lock();
            (out.flush(), out.timed_out)
        };
        if timed_out {
            self.counters
                .io_timeout(self.id, &self.peer, "writing a reply (client not reading)");
        }
        if self.dirty.load(Ordering::SeqCst)
            && let Err(e) = self.device.flush()
        {
            warn!(conn = self.id, export = %self.export, error = %e, "flush on disconnect failed");
        }
        self.stream.shutdown(Shutdown::Both);
        info!(conn = self.id, peer = %self.peer, export = %self.export, clean = flush_res.is_ok(), "connection closed");
        (self.on_close)();
    }

    fn begin_close(&self, reason: &str) {
        if !self.closing.swap(true, Ordering::SeqCst) {
            debug!(conn = self.id, reason, "closing connection");
        }
        let _g = self.ctl.lock();
        self.watcher_parked.store(false, Ordering::SeqCst);
        self.ctl_cv.notify_all();
    }

    /// Read, validate and (for WRITE) receive the next request.
    fn next_request(&self, input: &mut Input, scratch: &mut Scratch) -> Next<'_> {
        match input.fill(REQUEST_HEADER_LEN, &self.output, None) {
            Ok(Fill::Ready) => {}
            Ok(Fill::Eof) => return Next::Close("client disconnected"),
            Err(e) => {
                debug!(conn = self.id, error = %e, "read failed");
                return Next::Close("read error or client vanished mid-request");
            }
        }
        let raw = input.take_header();
        let h = match wire::parse_request_header(&raw) {
            Ok(h) => h,
            Err(magic) => {
                // A client can reconnect and do it again at will.
                static BAD_MAGIC: RateLimitedLog = RateLimitedLog::new(LOG_PERIOD);
                if let Some(suppressed) = BAD_MAGIC.check() {
                    warn!(conn = self.id, peer = %self.peer, magic = format_args!("{magic:#010x}"), suppressed, "bad request magic; disconnecting");
                }
                return Next::Close("bad request magic");
            }
        };
        match wire::decode_request(&h, &self.params) {
            Ok(cmd) => {
                // In flight from here (until `lead` has answered it), so the
                // server never takes this connection for idle while a
                // request waits for memory or runs.
                self.activity.begin_request();
                match self.receive(cmd, input, scratch) {
                    Ok(held) => Next::Exec {
                        cmd,
                        handle: h.handle,
                        more: input.has_header(),
                        held,
                    },
                    Err(close) => {
                        self.activity.end_request();
                        close
                    }
                }
            }
            Err(err) => {
                if !err.disconnect
                    && let Err(e) =
                        input.skip(h.payload_len() as usize, &self.output, self.payload_timeout)
                {
                    return self.payload_failed(&e);
                }
                Next::Reject {
                    handle: h.handle,
                    typ: h.typ,
                    err,
                }
            }
        }
    }

    /// Take the memory a valid request needs from the byte budgets and, for
    /// a WRITE, read its payload.
    fn receive(
        &self,
        cmd: Command,
        input: &mut Input,
        scratch: &mut Scratch,
    ) -> Result<Option<Held<'_>>, Next<'_>> {
        let len = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => len as usize,
            _ => return Ok(None),
        };
        let held = self
            .hold(len)
            .ok_or(Next::Close("closed while waiting for memory"))?;
        if let Command::Write { .. } = cmd {
            let buf = scratch.data(len);
            if let Err(e) = input.read_payload(buf, &self.output, self.payload_timeout) {
                return Err(self.payload_failed(&e));
            }
        }
        Ok(Some(held))
    }

    /// Take `bytes` from the connection's, the client's and the server's
    /// budgets, waiting as long as they are spent (which stops reading from
    /// this client).
    /// Corked replies go out first: the client may be waiting for them.
    fn hold(&self, bytes: usize) -> Option<Held<'_>> {
        let keep_waiting = || {
            let flushed = self.output.lock().flush();
            flushed.is_ok() && !self.closing.load(Ordering::SeqCst)
        };
        let budgets = [
            &self.budget,
            &*self.client_budget,
            &self.counters.total_budget,
        ];
        let on_wait = |i: usize| {
            let which = ["connection", "client", "server"][i];
            self.counters
                .budget_wait(self.id, &self.peer, which, budgets[i].limit_bytes());
        };
        Held::take(budgets, bytes, &keep_waiting, &on_wait)
    }

    fn payload_failed(&self, e: &io::Error) -> Next<'_> {
        if e.kind() == io::ErrorKind::TimedOut {
            self.counters
                .io_timeout(self.id, &self.peer, "reading a request payload");
            return Next::Close("request payload timed out");
        }
        debug!(conn = self.id, error = %e, "reading a request payload failed");
        Next::Close("client vanished mid-payload")
    }

    fn lead(&self, scratch: &mut Scratch) -> Role {
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return Role::Exit;
            }
            let next = {
                let mut input = self.input.lock();
                self.next_request(&mut input, scratch)
            };
            match next {
                Next::Close(reason) => {
                    self.begin_close(reason);
                    return Role::Exit;
                }
                Next::Reject { handle, typ, err } => {
                    self.log_rejection(typ, &err);
                    self.send_error(handle, err.errno, &err.message, false);
                    if err.disconnect {
                        self.begin_close("oversized request");
                        return Role::Exit;
                    }
                }
                Next::Exec {
                    cmd: Command::Disconnect,
                    ..
                } => {
                    self.activity.end_request();
                    self.begin_close("NBD_CMD_DISC");
                    return Role::Exit;
                }
                Next::Exec {
                    cmd,
                    handle,
                    more,
                    held,
                } => {
                    let s = self.state.load(Ordering::Relaxed);
                    let busy = (((s >> 1) + 1) << 1) | 1;
                    self.state.store(busy, Ordering::SeqCst);
                    if self.watcher_parked.load(Ordering::SeqCst) {
                        let _g = self.ctl.lock();
                        self.watcher_parked.store(false, Ordering::SeqCst);
                        self.activity.mark_busy();
                        self.ctl_cv.notify_all();
                    }
                    self.execute(cmd, handle, scratch, more);
                    drop(held);
                    self.activity.end_request();
                    scratch.trim();
                    if self
                        .state
                        .compare_exchange(busy, busy & !1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_err()
                    {
                        // A watcher took over while we were executing; our
                        // reply may be corked, and nobody else knows it.
                        let _ = self.output.lock().flush();
                        return Role::Released;
                    }
                }
            }
        }
    }

    fn watch(this: &Arc<Self>) -> Role {
        let mut ctl = this.ctl.lock();
        let mut last = this.state.load(Ordering::SeqCst);
        let mut quiet = 0u32;
        loop {
            if this.closing.load(Ordering::SeqCst) {
                ctl.watcher = false;
                return Role::Exit;
            }
            this.ctl_cv.wait_for(&mut ctl, this.stall);
            if this.closing.load(Ordering::SeqCst) {
                ctl.watcher = false;
                return Role::Exit;
            }
            let s = this.state.load(Ordering::SeqCst);
            // Threads other than this watcher are all executing requests (the
            // leader and released ones still finishing); after a steal this
            // watcher executes too, so stealing is allowed only while that
            // keeps the count within max_in_flight.
            let stalled = s & 1 == 1 && s == last;
            if stalled && ctl.threads > this.max_in_flight && !ctl.cap_reported {
                // Once per stall: it lasts until the leader's request ends.
                ctl.cap_reported = true;
                this.counters.request_cap_stall(this.id, this.max_in_flight);
            } else if !stalled {
                ctl.cap_reported = false;
            }
            if stalled && ctl.threads <= this.max_in_flight {
                let stolen = ((s >> 1) + 1) << 1;
                if this
                    .state
                    .compare_exchange(s, stolen, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    debug!(
                        conn = this.id,
                        "request stalled; another thread takes over reading"
                    );
                    ctl.watcher = false;
                    Connection::spawn_watcher(this, &mut ctl);
                    drop(ctl);
                    let _ = this.output.lock().flush();
                    return Role::Leader;
                }
            }
            if s == last && s & 1 == 0 {
                quiet += 1;
            } else {
                quiet = 0;
            }
            last = s;
            if quiet >= PARK_AFTER_TICKS {
                // Dekker-style handshake with the leader: publish "parked",
                // then re-check the state; the leader stores the state, then
                // checks "parked". One of the two sees the other.
                this.watcher_parked.store(true, Ordering::SeqCst);
                if this.state.load(Ordering::SeqCst) == s {
                    this.activity.mark_idle();
                    while this.watcher_parked.load(Ordering::SeqCst)
                        && !this.closing.load(Ordering::SeqCst)
                    {
                        this.ctl_cv.wait(&mut ctl);
                    }
                } else {
                    this.watcher_parked.store(false, Ordering::SeqCst);
                }
                quiet = 0;
                last = this.state.load(Ordering::SeqCst);
            }
        }
    }

    fn log_rejection(&self, typ: u16, err: &RequestError) {
        let n = self.rejections.fetch_add(1, Ordering::Relaxed);
        if n < WARN_REJECTIONS {
            warn!(conn = self.id, peer = %self.peer, command = typ, errno = err.errno, reason = %err.message, "request rejected");
        } else {
            debug!(conn = self.id, command = typ, errno = err.errno, reason = %err.message, "request rejected");
        }
    }

    /// Append/flush a reply that is fully in `bytes`.
    fn send(&self, bytes: &[u8], cork: bool) {
        let mut out = self.output.lock();
        if out.broken {
            return;
        }
        out.buf.extend_from_slice(bytes);
        if !cork || out.buf.len() >= OUTPUT_FLUSH_AT {
            let _ = out.flush();
        }
    }

    /// Send an error for `handle`. Reads must get a structured reply when
    /// structured replies were negotiated; other commands also get one then,
    /// because it carries the message.
    fn send_error(&self, handle: u64, errno: u32, msg: &str, cork: bool) {
        let mut b = Vec::with_capacity(64);
        if self.params.structured_replies {
            wire::encode_error_chunk(&mut b, handle, errno, msg);
        } else {
            wire::encode_simple_reply(&mut b, errno, handle);
        }
        self.send(&b, cork);
    }

    fn device_error(&self, handle: u64, cmd: &Command, e: &DeviceError, cork: bool) {
        let errno = match (cmd, e.kind) {
            (Command::WriteZeroes { fast: true, .. }, DeviceErrorKind::NotSupported) => NBD_ENOTSUP,
            _ => e.kind.errno(),
        };
        // A guest retries a failing read (a damaged block) as fast as it
        // likes: one line per period, with the count of the rest.
        static DEVICE_ERRORS: RateLimitedLog = RateLimitedLog::new(LOG_PERIOD);
        if matches!(e.kind, DeviceErrorKind::Io) {
            match DEVICE_ERRORS.check() {
                Some(suppressed) => {
                    warn!(conn = self.id, export = %self.export, ?cmd, error = %e, suppressed, "device error")
                }
                None => {
                    debug!(conn = self.id, export = %self.export, ?cmd, error = %e, "device error")
                }
            }
        } else {
            debug!(conn = self.id, export = %self.export, ?cmd, error = %e, "device refused request");
        }
        self.send_error(handle, errno, &e.message, cork);
    }

    fn execute(&self, cmd: Command, handle: u64, scratch: &mut Scratch, more: bool) {
        let dev = &*self.device;
        // FLUSH and FUA can take long: send corked replies first.
        let slow = matches!(cmd, Command::Flush) || cmd.fua();
        if slow {
            let _ = self.output.lock().flush();
        }
        let cork = more && !slow;
        let result = match cmd {
            Command::Read { offset, len } => {
                let buf = scratch.data(len as usize);
                match dev.read(offset, buf) {
                    Ok(()) => {
                        self.send_read(handle, offset, len as usize, scratch, cork);
                        return;
                    }
                    Err(e) => Err(e),
                }
            }
            Command::Write { offset, len, fua } => dev
                .write(offset, &scratch.data[..len as usize])
                .and_then(|()| if fua { dev.flush() } else { Ok(()) }),
            Command::Flush => dev.flush(),
            Command::Trim { offset, len, fua } => dev
                .trim(offset, u64::from(len))
                .and_then(|()| if fua { dev.flush() } else { Ok(()) }),
            Command::Cache { offset, len } => dev.cache(offset, u64::from(len)),
            Command::WriteZeroes {
                offset,
                len,
                fua,
                may_trim,
                ..
            } => dev
                .write_zeroes(offset, u64::from(len), may_trim)
                .and_then(|()| if fua { dev.flush() } else { Ok(()) }),
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => match dev.block_status(offset, u64::from(len)) {
                Ok(raw) => {
                    let ext = wire::normalize_extents(&raw, len, self.params.min_block, req_one);
                    scratch.reply.clear();
                    wire::encode_block_status(&mut scratch.reply, handle, BASE_ALLOCATION_ID, &ext);
                    self.send(&scratch.reply, cork);
                    return;
                }
                Err(e) => Err(e),
            },
            Command::Disconnect => return,
        };
        match result {
            Ok(()) => {
                if cmd.is_write() {
                    self.dirty.store(true, Ordering::Relaxed);
                }
                let mut b = [0u8; SIMPLE_REPLY_LEN];
                b[..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
                b[8..].copy_from_slice(&handle.to_be_bytes());
                self.send(&b, cork);
            }
            Err(e) => self.device_error(handle, &cmd, &e, cork),
        }
    }

    fn send_read(&self, handle: u64, offset: u64, len: usize, scratch: &mut Scratch, cork: bool) {
        let mut hdr = [0u8; STRUCTURED_REPLY_HEADER_LEN + 8];
        let hlen = if !self.params.structured_replies {
            hdr[..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
            hdr[8..16].copy_from_slice(&handle.to_be_bytes());
            SIMPLE_REPLY_LEN
        } else if len == 0 {
            // OFFSET_DATA needs at least one byte; an empty read is just "done".
            let mut v = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN);
            wire::encode_chunk_header(&mut v, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, handle, 0);
            hdr[..STRUCTURED_REPLY_HEADER_LEN].copy_from_slice(&v);
            STRUCTURED_REPLY_HEADER_LEN
        } else {
            hdr[..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
            hdr[4..6].copy_from_slice(&NBD_REPLY_FLAG_DONE.to_be_bytes());
            hdr[6..8].copy_from_slice(&NBD_REPLY_TYPE_OFFSET_DATA.to_be_bytes());
            hdr[8..16].copy_from_slice(&handle.to_be_bytes());
            // len <= max_block_size <= u32::MAX - 8 is guaranteed by config
            // validation (32 MiB default), so this cannot overflow.
            hdr[16..20].copy_from_slice(&((len as u32) + 8).to_be_bytes());
            hdr[20..28].copy_from_slice(&offset.to_be_bytes());
            STRUCTURED_REPLY_HEADER_LEN + 8
        };
        let data = &scratch.data[..len];
        let mut out = self.output.lock();
        if out.broken {
            return;
        }
        if len >= DIRECT_WRITE_AT {
            let _ = out.write_direct(&hdr[..hlen], data);
            return;
        }
        out.buf.extend_from_slice(&hdr[..hlen]);
        out.buf.extend_from_slice(data);
        if !cork || out.buf.len() >= OUTPUT_FLUSH_AT {
            let _ = out.flush();
        }
    }

    /// Shut the read side so the leader wakes and the connection winds down.
    pub(crate) fn shutdown_read(stream: &Stream) {
        stream.shutdown(Shutdown::Read);
    }
}
