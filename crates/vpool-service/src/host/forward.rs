//! Forwarding: how a host serves a shared pool's volume that another host
//! owns, and how ownership then moves to it (`docs/multi-host.md`,
//! section 3).
//!
//! A client's NBD connection to a host that does not own the volume gets
//! a [`ForwardDevice`]: each request goes over the peer link
//! (`vpool-peer`) to the owner, which runs it on its own engine. All the
//! devices of one volume on this host share one [`Forward`]: its
//! *route* (remote, or local once this host owns the volume), its idle
//! sessions to the owner, and a watcher thread that moves ownership here
//! when the owner has no client of its own left:
//!
//! 1. every [`HANDOVER_CHECK`], ask the owner how many clients the volume
//!    has; if no more than this host's sessions (so none of its own, and
//!    no other host's),
//! 2. stop admitting requests (the route's write lock waits for those in
//!    flight), close every session (the owner drops their devices before
//!    it answers),
//! 3. ask the owner to release the volume: it refuses if a client came
//!    meanwhile; otherwise it uploads what the bucket lacks, releases the
//!    lease and drops its cache,
//! 4. take the volume over (the lease is free: at once) and route the
//!    queued and later requests to the local family.
//!
//! The pause a client sees is steps 2 to 4: the owner's upload of what
//! its cache holds beyond the bucket, plus opening the family here.
//! Safety does not depend on timing: at every moment exactly one engine
//! (the owner's) runs the volume's requests, whichever host they came
//! from, and the release happens only with no request in flight anywhere.
//!
//! A request whose link breaks is retried on a new session (to the owner
//! the bucket names then) for up to [`RETRY_FOR`]; reads, writes and
//! flushes not yet answered may run twice, which NBD allows (a client
//! does not depend on the order of requests in flight).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use vpool_nbd::{BlockDevice, DeviceError};
use vpool_peer::{PeerError, Session};

use super::shared::SharedCtx;
use super::{Opener, PoolCtx};

/// How often a forwarding host asks whether it may take the volume over.
pub const HANDOVER_CHECK: Duration = Duration::from_secs(1);
/// How long a request keeps retrying while the link to the owner fails
/// (an owner restarting, a handover between other hosts, a dead owner
/// whose lease must lapse before this host takes the volume over: longer
/// than the default lease of 30 s and the watch of its heartbeat).
pub const RETRY_FOR: Duration = Duration::from_secs(90);
/// After a failed attempt to take over a volume whose owner does not
/// answer, how long before the next.
pub const FAILOVER_BACKOFF: Duration = Duration::from_secs(5);
/// An idle session older than this is closed, not used: half the owner's
/// idle timeout (`vpool_peer::server::IDLE_TIMEOUT`).
pub const MAX_IDLE: Duration = Duration::from_secs(30);
/// Most sessions (requests in flight) one volume has open to its owner.
pub const MAX_SESSIONS: usize = 16;

/// Where a volume's requests go.
pub(super) enum Route {
    /// To the owner, over the link.
    Remote,
    /// To the family this host owns now.
    Local(Arc<PoolCtx>),
}

/// Where the bucket says the volume is.
pub(super) enum Owner {
    /// This host owns it.
    Here,
    /// Nobody holds it: this host may take it at once.
    Free,
    /// Another host, at this peer link address, holding the lease of
    /// this epoch.
    Peer(String, u64),
    /// The bucket names this host's address, but the volume is not open
    /// here: released here just now, or held by this daemon before it
    /// restarted. Taken over once that lease lapsed (at once if released).
    Gone(String),
}

/// Why a try on the link did not answer.
enum Hop {
    Peer(PeerError),
    /// The link broke after the request may have been sent to `engine`,
    /// which may still run it.
    Lost {
        engine: String,
        error: PeerError,
    },
    /// The volume is here or free now: switch the route (`clean`: free,
    /// its last owner released it with everything in the bucket).
    GoLocal {
        clean: bool,
    },
}

impl From<PeerError> for Hop {
    fn from(e: PeerError) -> Self {
        Hop::Peer(e)
    }
}

/// A session to the owner with its export open; counted while it lives.
struct Held {
    session: Session,
    /// When it last answered: the owner closes a session idle for
    /// `IDLE_TIMEOUT`, and a request sent on one it closed meanwhile would
    /// be a write of unknown fate, so idle sessions are dropped well
    /// before ([`MAX_IDLE`]).
    used: Instant,
    image: String,
    /// The owner's engine: `ADDR#EPOCH`.
    engine: String,
    live: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One volume's forwarding on this host; see the module doc.
pub(super) struct Forward {
    shared: Arc<SharedCtx>,
    opener: Arc<dyn Opener>,
    volume: String,
    route: RwLock<Route>,
    idle: Mutex<Vec<Held>>,
    /// Sessions open to the owner, idle or busy.
    live: Arc<AtomicUsize>,
    /// Sessions busy, at most [`MAX_SESSIONS`].
    busy: Mutex<usize>,
    freed: Condvar,
    /// No takeover of an unreachable owner's volume before this.
    next_failover: Mutex<Instant>,
    /// Devices (NBD clients of this host) alive on this volume.
    clients: AtomicUsize,
    /// The engine that acknowledged writes of this host's clients that no
    /// flush covered yet, and whether writes went to more than one: a
    /// flush answered by another engine (after a failover) cannot cover
    /// them, and fails once, as a disk that lost its cache would.
    unflushed: Mutex<Unflushed>,
    /// How many times writes were lost that way; each device fails one
    /// flush per loss it has not reported yet.
    lost: AtomicU64,
    /// The sockets of the sessions running a request, by a serial: a
    /// failover shuts them down, so that requests waiting for an owner
    /// that stopped answering give up their share of the route lock.
    in_flight: Mutex<(u64, BTreeMap<u64, TcpStream>)>,
}

/// See [`Forward::unflushed`].
#[derive(Default)]
struct Unflushed {
    engine: Option<String>,
    mixed: bool,
}

/// What a request does to the volume: whether its retry is safe, and what
/// a flush must cover.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    /// A write, trim or zeroing: not sent again to an engine that may
    /// still run it.
    Write,
    Flush,
}

/// Removes a session's socket from [`Forward::in_flight`] when its request
/// ends.
struct InFlight<'a>(&'a Forward, u64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut all = self.0.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        all.1.remove(&self.1);
    }
}

impl Forward {
    /// Forwarding of `volume`, with its watcher started.
    pub(super) fn start(
        shared: Arc<SharedCtx>,
        opener: Arc<dyn Opener>,
        volume: &str,
    ) -> Arc<Forward> {
        let f = Arc::new(Forward {
            shared,
            opener,
            volume: volume.to_string(),
            route: RwLock::new(Route::Remote),
            idle: Mutex::new(Vec::new()),
            live: Arc::new(AtomicUsize::new(0)),
            busy: Mutex::new(0),
            freed: Condvar::new(),
            next_failover: Mutex::new(Instant::now()),
            clients: AtomicUsize::new(0),
            unflushed: Mutex::new(Unflushed::default()),
            lost: AtomicU64::new(0),
            in_flight: Mutex::new((0, BTreeMap::new())),
        });
        f.spawn_watcher();
        f
    }

    fn spawn_watcher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || watch(weak));
        if let Err(e) = spawned {
            tracing::warn!(volume = %self.volume, error = %e, "no thread to watch for a handover; the volume stays forwarded");
        }
    }

    /// The family the route points at is no longer the one owned here
    /// (released to another host, dropped when fenced): route to the
    /// owner again, and watch for a handover again.
    fn back_to_remote(self: &Arc<Self>, stale: &Arc<PoolCtx>) {
        let mut route = self.write_route();
        if let Route::Local(f) = &*route
            && Arc::ptr_eq(f, stale)
        {
            *route = Route::Remote;
            drop(route);
            tracing::info!(pool = %self.shared.name, volume = %self.volume, "the volume is no longer owned here: its clients here are forwarded again");
            self.spawn_watcher();
        }
    }

    fn read_route(&self) -> std::sync::RwLockReadGuard<'_, Route> {
        self.route.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_route(&self) -> std::sync::RwLockWriteGuard<'_, Route> {
        self.route.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes acknowledged by an owner that was lost (a failover, or the
    /// volume found at another engine) may be lost: every device of the
    /// volume on this host fails its next flush once (with multi-conn a
    /// flush on one connection answers for the writes of all).
    fn lose_unflushed(&self) {
        let u = std::mem::take(&mut *self.unflushed.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(engine) = u.engine {
            tracing::warn!(pool = %self.shared.name, volume = %self.volume, acknowledged_by = %engine, "writes acknowledged by an owner lost since may be lost: each client's next flush fails");
            self.lost.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// `engine` acknowledged a write.
    fn note_write(&self, engine: &str) {
        let mut u = self.unflushed.lock().unwrap_or_else(|e| e.into_inner());
        match &u.engine {
            None => u.engine = Some(engine.to_string()),
            Some(e) if e != engine => u.mixed = true,
            Some(_) => {}
        }
    }

    /// A flush answered by `engine` covered every write since the last
    /// one, unless some went to another engine: those are lost.
    fn flushed_on(&self, engine: &str) {
        let mixed = {
            let u = self.unflushed.lock().unwrap_or_else(|e| e.into_inner());
            u.mixed || u.engine.as_deref().is_some_and(|e| e != engine)
        };
        if mixed {
            self.lose_unflushed();
        } else {
            self.forget_unflushed();
        }
    }

    fn forget_unflushed(&self) {
        *self.unflushed.lock().unwrap_or_else(|e| e.into_inner()) = Unflushed::default();
    }

    /// This host's clients of the volume that go through forwarding.
    pub(super) fn clients(&self) -> usize {
        self.clients.load(Ordering::SeqCst)
    }

    pub(super) fn is_local(&self) -> bool {
        matches!(*self.read_route(), Route::Local(_))
    }

    /// A device for export `image` (`VOLUME` or `VOLUME@SNAPSHOT`): the
    /// local one if this host owns the volume, else one that forwards.
    pub(super) fn device(
        self: &Arc<Self>,
        image: &str,
    ) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            let opened = {
                let route = self.read_route();
                if let Route::Local(fam) = &*route {
                    if let Some(dev) = self.shared.open_owned(fam, &self.volume, image) {
                        return dev;
                    }
                    let stale = Arc::clone(fam);
                    drop(route);
                    self.back_to_remote(&stale);
                    continue;
                }
                self.with_session(image, None, &mut |s: &mut Session| s.open(image))
            };
            match self.settle(opened, deadline)? {
                Some(((size_bytes, read_only), _)) => {
                    self.clients.fetch_add(1, Ordering::SeqCst);
                    return Ok(Arc::new(ForwardDevice {
                        fwd: Arc::clone(self),
                        image: image.to_string(),
                        size_bytes,
                        read_only,
                        local: Mutex::new(None),
                        seen_lost: AtomicU64::new(self.lost.load(Ordering::SeqCst)),
                    }));
                }
                None => continue,
            }
        }
    }

    /// What to do with the outcome of a try: `Some` answer, `None` to try
    /// again (after switching to local, or a pause), or the error.
    fn settle<T>(
        &self,
        tried: Result<T, Hop>,
        deadline: Instant,
    ) -> Result<Option<T>, DeviceError> {
        match tried {
            Ok(v) => Ok(Some(v)),
            // Free when asked, but another host may take it first: then
            // the next try forwards to that host.
            Err(Hop::GoLocal { clean }) => match self.go_local(clean) {
                Ok(()) => Ok(None),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(volume = %self.volume, error = %e.message, "taking the volume here failed: asking the bucket again");
                    std::thread::sleep(Duration::from_millis(200));
                    Ok(None)
                }
                Err(e) => Err(e),
            },
            Err(Hop::Peer(PeerError::Device(e))) => Err(e),
            Err(Hop::Lost { error: e, .. } | Hop::Peer(e)) => {
                if Instant::now() >= deadline {
                    tracing::warn!(pool = %self.shared.name, volume = %self.volume, error = %e, "forwarding failed for {} s", RETRY_FOR.as_secs());
                    return Err(DeviceError::io(format!(
                        "volume {}/{} is owned by another host that cannot be reached: {e}",
                        self.shared.name, self.volume
                    )));
                }
                tracing::debug!(volume = %self.volume, error = %e, "forwarding: retrying");
                std::thread::sleep(Duration::from_millis(200));
                Ok(None)
            }
        }
    }

    /// Runs `f` on a session to the owner with `image` open (an idle one,
    /// or a new one); returns its answer and the engine that gave it. The
    /// session goes back to the idle list unless the link broke or the
    /// owner said the volume moved. A session to engine `avoid` is not
    /// used (a write whose fate there is unknown is not sent there again).
    /// Call with the route read-locked as remote.
    fn with_session<T>(
        &self,
        image: &str,
        avoid: Option<&str>,
        f: &mut dyn FnMut(&mut Session) -> Result<T, PeerError>,
    ) -> Result<(T, String), Hop> {
        let _slot = self.slot();
        let idle = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            idle.retain(|h| Some(h.engine.as_str()) != avoid && h.used.elapsed() < MAX_IDLE);
            let at = idle.iter().position(|h| h.image == image);
            at.map(|i| idle.swap_remove(i))
        };
        let mut held = match idle {
            Some(h) => h,
            None => self.connect(image)?,
        };
        if Some(held.engine.as_str()) == avoid {
            return Err(Hop::Peer(PeerError::Link {
                addr: held.engine.clone(),
                message: "waiting for the volume's owner to change".into(),
            }));
        }
        let tracked = self.track(&held.session);
        let out = f(&mut held.session);
        drop(tracked);
        match out {
            Ok(v) => {
                let engine = held.engine.clone();
                self.put_idle(held);
                Ok((v, engine))
            }
            Err(e @ PeerError::Device(_)) => {
                self.put_idle(held);
                Err(Hop::Peer(e))
            }
            Err(e @ (PeerError::Link { .. } | PeerError::Auth { .. })) => Err(Hop::Lost {
                engine: held.engine.clone(),
                error: e,
            }),
            Err(e) => Err(Hop::Peer(e)),
        }
    }

    fn put_idle(&self, mut held: Held) {
        held.used = Instant::now();
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(held);
    }

    /// Records the socket of a session about to run a request.
    fn track(&self, session: &Session) -> Option<InFlight<'_>> {
        let socket = session.socket().ok()?;
        let mut all = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        all.0 += 1;
        let id = all.0;
        all.1.insert(id, socket);
        Some(InFlight(self, id))
    }

    /// Ends every request waiting on the owner (see [`Forward::in_flight`]).
    fn cut_in_flight(&self) {
        let all = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        for socket in all.1.values() {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Waits for a free session slot.
    fn slot(&self) -> SlotGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy >= MAX_SESSIONS {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy += 1;
        SlotGuard(self)
    }

    /// A new session to the owner the bucket names, with `image` open.
    fn connect(&self, image: &str) -> Result<Held, Hop> {
        let (addr, epoch) = match self.shared.owner_route(&self.volume)? {
            Owner::Peer(addr, epoch) => (addr, epoch),
            Owner::Here => return Err(Hop::GoLocal { clean: false }),
            Owner::Free => return Err(Hop::GoLocal { clean: true }),
            Owner::Gone(addr) => {
                return Err(Hop::Peer(PeerError::Link {
                    addr,
                    message: "held by this host's address, not open here".into(),
                }));
            }
        };
        let secret = self.shared.peer_secret()?;
        let session = Session::connect(&addr, &self.shared.name, &secret)?;
        self.live.fetch_add(1, Ordering::SeqCst);
        let mut held = Held {
            session,
            used: Instant::now(),
            image: image.to_string(),
            engine: format!("{addr}#{epoch}"),
            live: Arc::clone(&self.live),
        };
        let tracked = self.track(&held.session);
        held.session.open(image)?;
        drop(tracked);
        Ok(held)
    }

    /// Routes the volume here: it is owned here already, or free (taken
    /// over at once), or (a failover) its silent owner's lease lapsed. An
    /// error if another host got it first. `clean`: the last owner let
    /// it go with everything in the bucket, so the writes it acknowledged
    /// are all there; after a failover they may not be (see
    /// [`Forward::unflushed`]).
    fn go_local(&self, clean: bool) -> Result<(), DeviceError> {
        let mut route = self.write_route();
        if matches!(*route, Route::Local(_)) {
            return Ok(());
        }
        let fam = self
            .shared
            .takeover(&*self.opener, &self.volume, false)
            .map_err(|e| DeviceError::io(e.message))?;
        self.drop_sessions();
        if clean {
            self.forget_unflushed();
        }
        *route = Route::Local(fam);
        tracing::info!(pool = %self.shared.name, volume = %self.volume, "volume taken by this host, which serves its clients");
        Ok(())
    }

    fn drop_sessions(&self) {
        let all: Vec<Held> =
            std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for mut h in all {
            let _ = h.session.close();
        }
    }

    /// One handover attempt (see the module doc). Returns whether the
    /// volume is local now.
    fn try_handover(&self) -> bool {
        let addr = match self.shared.owner_route(&self.volume) {
            Ok(Owner::Peer(addr, _)) => addr,
            Ok(Owner::Here) => return self.go_local(false).is_ok(),
            Ok(Owner::Free) => return self.go_local(true).is_ok(),
            Ok(Owner::Gone(addr)) => {
                let why = PeerError::Link {
                    addr: addr.clone(),
                    message: "held by this host's address, not open here".into(),
                };
                return self.failover(&addr, &why);
            }
            Err(e) => {
                tracing::debug!(volume = %self.volume, error = %e, "handover: owner unknown");
                return false;
            }
        };
        if !self.shared.has_room() {
            // It would be released and then owned by nobody.
            return false;
        }
        let attempt = || -> Result<bool, PeerError> {
            let secret = self.shared.peer_secret()?;
            let mut ctl = Session::connect(&addr, &self.shared.name, &secret)?;
            let theirs = ctl.connections(&self.volume)?;
            if theirs > self.live.load(Ordering::SeqCst) as u64 {
                return Ok(false);
            }
            let started = Instant::now();
            let mut route = self.write_route();
            self.drop_sessions();
            if let Err(e) = ctl.release(&self.volume) {
                tracing::info!(pool = %self.shared.name, volume = %self.volume, owner = %addr, error = %e, "handover refused; forwarding goes on");
                return Ok(false);
            }
            // Released: every write the owner acknowledged is in the bucket.
            self.forget_unflushed();
            match self.shared.takeover(&*self.opener, &self.volume, false) {
                Ok(fam) => *route = Route::Local(fam),
                Err(e) => {
                    tracing::warn!(pool = %self.shared.name, volume = %self.volume, error = %e.message, "handover: released by its owner but not taken here; forwarding to whoever took it");
                    return Ok(false);
                }
            }
            tracing::info!(pool = %self.shared.name, volume = %self.volume, from = %addr, pause_ms = started.elapsed().as_millis() as u64, "volume handed over to this host: its owner had no client left");
            Ok(true)
        };
        match attempt() {
            Ok(moved) => moved,
            Err(e @ PeerError::Link { .. }) => self.failover(&addr, &e),
            Err(e) => {
                tracing::debug!(volume = %self.volume, error = %e, "handover attempt failed");
                false
            }
        }
    }

    /// The owner at `addr` does not answer: takes the volume over if its
    /// lease lapsed. The takeover watches the owner's heartbeat (up to the
    /// lease's expiry): a dead or cut-off owner stops renewing and fences
    /// itself, so the takeover succeeds; one that renews keeps the volume,
    /// and forwarding retries. Returns whether the volume is local now.
    fn failover(&self, addr: &str, why: &PeerError) -> bool {
        {
            let mut next = self.next_failover.lock().unwrap_or_else(|e| e.into_inner());
            if Instant::now() < *next {
                return false;
            }
            *next = Instant::now() + FAILOVER_BACKOFF;
        }
        tracing::warn!(pool = %self.shared.name, volume = %self.volume, owner = addr, error = %why, "the owner does not answer the peer link: taking the volume over once its lease lapses");
        // The takeover first, without the route's lock: against an owner
        // that is alive (it renews its lease) it is refused, and nothing
        // here stalls or is cut.
        if let Err(e) = self.shared.takeover(&*self.opener, &self.volume, false) {
            tracing::warn!(pool = %self.shared.name, volume = %self.volume, error = %e.message, "takeover refused: forwarding goes on");
            return false;
        }
        // The old owner is fenced now: what it acknowledged and nothing
        // flushed may be lost (recorded before any request can route
        // here). Requests stuck on it would hold the route's read lock for
        // their whole timeout: they fail now and are retried here (writes
        // too: the fenced owner cannot land them).
        self.lose_unflushed();
        self.cut_in_flight();
        match self.go_local(false) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(pool = %self.shared.name, volume = %self.volume, error = %e.message, "takeover refused: forwarding goes on");
                false
            }
        }
    }
}

impl From<crate::error::Error> for Hop {
    /// A volume that does not exist, or whose owner cannot be forwarded
    /// to, fails the request at once; anything else is retried.
    fn from(e: crate::error::Error) -> Self {
        use crate::error::ErrorKind;
        Hop::Peer(match e.kind {
            ErrorKind::NotFound => PeerError::Device(DeviceError::not_found(e.message)),
            ErrorKind::NotOwner => PeerError::Device(DeviceError::io(e.message)),
            _ => PeerError::Link {
                addr: String::new(),
                message: e.message,
            },
        })
    }
}

impl From<crate::error::Error> for PeerError {
    fn from(e: crate::error::Error) -> Self {
        PeerError::Link {
            addr: String::new(),
            message: e.message,
        }
    }
}

struct SlotGuard<'a>(&'a Forward);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let mut busy = self.0.busy.lock().unwrap_or_else(|e| e.into_inner());
        *busy -= 1;
        self.0.freed.notify_one();
    }
}

/// The watcher: tries a handover every [`HANDOVER_CHECK`] while devices
/// forward the volume; ends once it is local or no device is left.
fn watch(weak: Weak<Forward>) {
    loop {
        std::thread::sleep(HANDOVER_CHECK);
        let Some(f) = weak.upgrade() else { return };
        if f.is_local() || f.try_handover() {
            return;
        }
    }
}

/// A client's device for a volume another host owns; see the module doc.
pub struct ForwardDevice {
    fwd: Arc<Forward>,
    image: String,
    size_bytes: u64,
    read_only: bool,
    /// The local device, once the volume is owned here, with the family
    /// it was opened on.
    local: Mutex<Option<LocalDevice>>,
    /// The losses of [`Forward::lost`] this device reported (or that came
    /// before it was opened).
    seen_lost: AtomicU64,
}

/// A device opened on an owned family, with that family.
type LocalDevice = (Arc<PoolCtx>, Arc<dyn BlockDevice>);

impl ForwardDevice {
    /// Runs a request: on the local device once the volume is here, else
    /// over the link, retrying a broken link for up to [`RETRY_FOR`] (a
    /// write whose link broke after it may have been sent is retried only
    /// at another engine than the one that may still run it: after a
    /// failover, or a handover).
    fn run<T>(
        &self,
        kind: Kind,
        local: impl Fn(&dyn BlockDevice) -> Result<T, DeviceError>,
        mut remote: impl FnMut(&mut Session) -> Result<T, PeerError>,
    ) -> Result<T, DeviceError> {
        let deadline = Instant::now() + RETRY_FOR;
        let mut avoid: Option<String> = None;
        loop {
            let tried = {
                let route = self.fwd.read_route();
                if let Route::Local(fam) = &*route {
                    if self.fwd.shared.still_owned(&self.fwd.volume, fam) {
                        let dev = self.local_device(fam)?;
                        let v = local(&*dev)?;
                        let engine = format!("local#{:p}", Arc::as_ptr(fam));
                        return self.done(kind, &engine, v);
                    }
                    let stale = Arc::clone(fam);
                    drop(route);
                    *self.local.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    self.fwd.back_to_remote(&stale);
                    continue;
                }
                self.fwd
                    .with_session(&self.image, avoid.as_deref(), &mut remote)
            };
            let tried = match tried {
                Err(Hop::Lost { engine, error }) if kind == Kind::Write => {
                    avoid = Some(engine);
                    Err(Hop::Peer(error))
                }
                other => other,
            };
            if let Some((v, engine)) = self.fwd.settle(tried, deadline)? {
                return self.done(kind, &engine, v);
            }
        }
    }

    /// Records what an answered request means for later flushes.
    fn done<T>(&self, kind: Kind, engine: &str, v: T) -> Result<T, DeviceError> {
        match kind {
            Kind::Read => {}
            Kind::Write => self.fwd.note_write(engine),
            Kind::Flush => {
                self.fwd.flushed_on(engine);
                let lost = self.fwd.lost.load(Ordering::SeqCst);
                if self.seen_lost.swap(lost, Ordering::SeqCst) < lost {
                    return Err(DeviceError::io(format!(
                        "volume {}/{}: writes acknowledged before this flush went to an owner lost since; they may be lost",
                        self.fwd.shared.name, self.fwd.volume
                    )));
                }
            }
        }
        Ok(v)
    }

    fn local_device(&self, fam: &Arc<PoolCtx>) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        let mut local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((f, d)) = &*local
            && Arc::ptr_eq(f, fam)
        {
            return Ok(Arc::clone(d));
        }
        // Layered if the volume is a clone, as every local device.
        let d = self
            .fwd
            .shared
            .device_of(fam, &self.fwd.volume, &self.image)?;
        *local = Some((Arc::clone(fam), Arc::clone(&d)));
        Ok(d)
    }
}

impl Drop for ForwardDevice {
    fn drop(&mut self) {
        self.fwd.clients.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BlockDevice for ForwardDevice {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let len = buf.len();
        let cell = std::cell::RefCell::new(buf);
        self.run(
            Kind::Read,
            |d| d.read(offset, &mut cell.borrow_mut()[..len]),
            |s| s.read(offset, &mut cell.borrow_mut()[..len]),
        )
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.run(
            Kind::Write,
            |d| d.write(offset, data),
            |s| s.write(offset, data),
        )
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.run(Kind::Flush, |d| d.flush(), |s| s.flush())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.run(
            Kind::Write,
            |d| d.trim(offset, len),
            |s| s.trim(offset, len),
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.run(
            Kind::Write,
            |d| d.write_zeroes(offset, len, may_trim),
            |s| s.write_zeroes(offset, len, may_trim),
        )
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        // The link does not carry allocation: forwarded, everything reads
        // as data (what a server may always say).
        self.run(
            Kind::Read,
            |d| d.block_status(offset, len),
            |_| Ok(vec![(len, 0)]),
        )
    }

    fn can_multi_conn(&self) -> bool {
        // The owner's flush covers every write it completed, whichever
        // host or connection it came from.
        true
    }
}
