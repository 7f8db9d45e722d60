//! `sd_notify`: tells systemd (a `Type=notify` unit, `packaging/vpool.service`)
//! that the daemon is ready, reloading, or stopping.
//!
//! The protocol is one datagram of `KEY=VALUE` lines to the Unix socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for an abstract socket).
//! Without the variable (not started by systemd) every call does nothing.
//! A failure to notify is logged, never fatal: the daemon serves either
//! way, and systemd's start timeout reports a readiness that never came.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The daemon serves: every listener accepts.
pub const READY: &str = "READY=1";
/// SIGHUP received: the configuration is being re-read.
pub const RELOADING: &str = "RELOADING=1";
/// SIGTERM or SIGINT received: finishing requests, closing pools.
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` (with a STATUS line) to systemd, if it is listening.
pub fn notify(state: &str, status: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let mut message = format!("{state}\nSTATUS={status}\n");
    if state == RELOADING {
        // systemd 253 and later match a reload by this clock reading.
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
        message.push_str(&format!("MONOTONIC_USEC={usec}\n"));
    }
    if let Err(e) = send(&target, message.as_bytes()) {
        tracing::warn!(socket = ?target, error = %e, "could not notify systemd");
    }
}

fn send(target: &std::ffi::OsStr, message: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = target.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None => SocketAddr::from_pathname(std::path::Path::new(target))?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(message, &addr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), b"READY=1\n").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }
}
