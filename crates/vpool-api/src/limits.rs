//! What an API client can hold, and for how long: [`ApiLimits`], and the
//! accept loop that enforces them ([`serve_limited`]).
//!
//! axum's own `serve` has no connection cap and no timeouts (hyper's header
//! timeout needs a timer axum does not give it), and anyone who can reach
//! the TCP listener can connect before any token is checked. So each
//! listener runs this loop instead: a semaphore caps its connections (a
//! connection over the cap is accepted and closed at once, so the backlog
//! never fills), hyper's `header_read_timeout` with a tokio timer drops
//! connections that do not send a request head in time (which also ends
//! idle keep-alive connections), [`TimedIo`] drops connections that do not
//! read their response, and the body extractors bound the time a request
//! body may take.

use std::fmt::Debug;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use crate::ratelog::RateLimitedLog;
use crate::server::ServeError;

/// Limits of one API listener (the Unix socket and the TCP listener each
/// have their own, so a flood on TCP cannot lock the local CLI out). Every
/// time one is hit the server logs a WARN line, at most one per kind per
/// 10 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiLimits {
    /// Most connections open at once. A connection over it is accepted and
    /// closed at once (the client sees the connection reset or closed
    /// before any response). Default 128.
    pub max_connections: usize,
    /// A connection must deliver a complete request head (request line and
    /// headers) within this time of being accepted or of its previous
    /// response being written, or it is closed: this drops slow-header
    /// clients and silent connections, and is also the keep-alive idle
    /// timeout. Default 10 s.
    pub header_read_timeout: Duration,
    /// A request body must arrive within this time of the handler starting
    /// to read it, or the request fails with `408` (`timeout`) and the
    /// connection is closed. Default 60 s (a body is at most 8 MiB).
    pub body_read_timeout: Duration,
    /// Once the server has a response to write, the client must take all of
    /// it within this time, or the connection is closed. Default 60 s (a
    /// response is at most 8 MiB).
    pub response_write_timeout: Duration,
    /// Space accounting (the exclusive and shared bytes in `vol info` and
    /// `snap list`, O(snapshots x extents)) gives up after this long: the
    /// answer then leaves those figures out instead of keeping a thread
    /// busy. Default 10 s.
    pub space_accounting_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_connections: 128,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            response_write_timeout: Duration::from_secs(60),
            space_accounting_timeout: Duration::from_secs(10),
        }
    }
}

impl ApiLimits {
    /// Checks that every limit lets something through.
    pub fn validate(&self) -> Result<(), ServeError> {
        if self.max_connections == 0 {
            return Err(ServeError::BadLimits("max_connections must be >= 1".into()));
        }
        let timeouts = [
            self.header_read_timeout,
            self.body_read_timeout,
            self.response_write_timeout,
            self.space_accounting_timeout,
        ];
        if timeouts.iter().any(Duration::is_zero) {
            return Err(ServeError::BadLimits("timeouts must be > 0".into()));
        }
        Ok(())
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes,
/// then stops accepting and waits for the open connections to finish their
/// requests. `what` names the listener in log lines.
pub(crate) async fn serve_limited<L>(
    mut listener: L,
    app: Router,
    limits: &ApiLimits,
    shutdown: impl Future<Output = ()>,
    what: &'static str,
) where
    L: Listener,
    L::Addr: Debug,
    L::Io: Caller,
{
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let refusals = RateLimitedLog::default();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            if let Some(suppressed) = refusals.check() {
                tracing::warn!(
                    listener = what,
                    ?peer,
                    limit = limits.max_connections,
                    suppressed,
                    "API limit: connection cap reached; closing the new connection"
                );
            }
            drop(io);
            continue;
        };
        // Who is on the other end, for the log line of each action.
        let who = Who(Arc::from(io.caller()));
        let app = app.clone().layer(axum::Extension(who));
        let io = TokioIo::new(TimedIo::new(io, limits.response_write_timeout));
        let conn = http.serve_connection(io, TowerToHyperService::new(app));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log_connection_error(what, &e);
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// Who sent a request, as the daemon's log names them: `uid U pid P` on
/// the Unix socket (the peer's credentials, from the kernel), `ADDR` on TCP
/// (whose clients all hold the one bearer token).
#[derive(Clone, Debug)]
pub struct Who(pub Arc<str>);

/// A connection that can say who is on its other end.
pub trait Caller {
    fn caller(&self) -> String;
}

impl Caller for tokio::net::UnixStream {
    fn caller(&self) -> String {
        match self.peer_cred() {
            Ok(c) => match c.pid() {
                Some(pid) => format!("uid {} pid {pid}", c.uid()),
                None => format!("uid {}", c.uid()),
            },
            Err(_) => "unix peer (credentials unknown)".into(),
        }
    }
}

impl Caller for tokio::net::TcpStream {
    fn caller(&self) -> String {
        match self.peer_addr() {
            Ok(a) => format!("tcp {a}"),
            Err(_) => "tcp peer (address unknown)".into(),
        }
    }
}

/// Connection errors are the client's doing, so they are logged at DEBUG,
/// except the limits' own, which are rate-limited WARN lines.
fn log_connection_error(what: &'static str, e: &hyper::Error) {
    static TIMEOUTS: RateLimitedLog = RateLimitedLog::new(crate::ratelog::LOG_PERIOD);
    let timed_out = e.is_timeout()
        || std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<io::Error>())
            .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut);
    if !timed_out {
        tracing::debug!(listener = what, error = %e, "API connection ended with an error");
    } else if let Some(suppressed) = TIMEOUTS.check() {
        tracing::warn!(listener = what, error = %e, suppressed,
            "API limit: a client was too slow sending its request or reading the response; connection closed");
    }
}

/// A connection whose writes must finish in time: from the first write
/// after a completed flush (the start of a response, in practice) to the
/// next completed flush, at most `timeout` may pass, however the client
/// spaces its reads; then writes fail with `TimedOut` and hyper closes the
/// connection.
pub(crate) struct TimedIo<T> {
    inner: T,
    timeout: Duration,
    /// Armed at the first write after a completed flush.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<T> TimedIo<T> {
    pub(crate) fn new(inner: T, timeout: Duration) -> Self {
        TimedIo {
            inner,
            timeout,
            deadline: None,
        }
    }

    fn arm(&mut self) {
        if self.deadline.is_none() {
            self.deadline = Some(Box::pin(tokio::time::sleep(self.timeout)));
        }
    }

    /// A write or flush that is pending fails once the deadline passes.
    fn check<R>(&mut self, r: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if r.is_pending()
            && let Some(d) = &mut self.deadline
            && d.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not read the response in time",
            )));
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.arm();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.check(r, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.arm();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.check(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            this.deadline = None;
        }
        this.check(r, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.check(r, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        ApiLimits::default().validate().unwrap();
        let bad = ApiLimits {
            max_connections: 0,
            ..ApiLimits::default()
        };
        assert!(bad.validate().is_err());
        let bad = ApiLimits {
            header_read_timeout: Duration::ZERO,
            ..ApiLimits::default()
        };
        assert!(bad.validate().is_err());
    }

    #[tokio::test]
    async fn a_write_the_peer_does_not_read_times_out() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let limit = Duration::from_millis(200);
        let mut io = TimedIo::new(a, limit);
        let chunk = vec![0u8; 64 << 10];
        let t0 = std::time::Instant::now();
        // Fill the socket buffer: the reader never reads.
        let e = loop {
            let r = std::future::poll_fn(|cx| Pin::new(&mut io).poll_write(cx, &chunk)).await;
            match r {
                Ok(n) => assert!(n > 0),
                Err(e) => break e,
            }
        };
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let took = t0.elapsed();
        assert!(took >= limit && took < limit * 10, "{took:?}");
    }
}
