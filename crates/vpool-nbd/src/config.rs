//! Server configuration and its documented limits.

use std::time::Duration;

use crate::proto::{DEFAULT_MAX_REQUEST_BYTES, MAX_MIN_BLOCK_SIZE};

/// TLS policy. Only `Disabled` exists today: `NBD_OPT_STARTTLS` is answered
/// with `NBD_REP_ERR_POLICY` (NOTLS mode of the spec).
///
/// Seam for TLS: the handshake is written over any `Read + Write` stream, so a
/// future `Required(acceptor)` / `Optional(acceptor)` variant can answer
/// STARTTLS with `NBD_REP_ACK`, wrap the socket, reset negotiated state as the
/// spec demands, and continue option haggling over the TLS stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsMode {
    #[default]
    Disabled,
}

/// Tunables and limits of the server. All limits protect the server from
/// clients; see the field docs for what happens when one is hit.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most simultaneous client connections (in handshake or transmission).
    /// A connection beyond it is accepted and closed at once, with a log line.
    pub max_connections: usize,
    /// Most requests of one connection executing at once. Requests normally
    /// run inline on the connection's reading thread; a request that stalls
    /// longer than [`stall_threshold`](Self::stall_threshold) is left to
    /// finish on its thread while another thread keeps reading, so this also
    /// bounds the threads per connection (plus one watcher). When reached, the
    /// server stops reading from that client until a request completes.
    pub max_in_flight_per_connection: usize,
    /// Largest WRITE payload the server reads into memory. A WRITE declaring
    /// more is answered `NBD_EINVAL` and the connection is closed (the payload
    /// cannot be skipped cheaply; the spec allows the disconnect). Must be at
    /// least `max_block_size`. 32 MiB by default (the spec says lengths below
    /// 2^25 should never be considered a denial of service).
    pub max_request_bytes: u32,
    /// Advertised minimum block size (power of two, 1..=64 KiB). Requests not
    /// aligned to it fail with `NBD_EINVAL`. Default 1 (byte-granular).
    pub min_block_size: u32,
    /// Advertised preferred block size (power of two, >= max(min, 512)).
    pub preferred_block_size: u32,
    /// Advertised maximum block size: READ/WRITE longer than this fail with
    /// `NBD_EINVAL`. Multiple of `min_block_size`, <= `max_request_bytes`.
    pub max_block_size: u32,
    /// The handshake must make progress: each read from a client during option
    /// haggling waits at most this long before the connection is dropped.
    /// (Transmission has no idle timeout: a VM may idle for days.)
    pub handshake_timeout: Duration,
    /// A request that has been executing inline on the reading thread for
    /// longer than this is "stalled": a watcher thread takes over reading so
    /// that the connection's other requests keep flowing. Lower values help
    /// devices with slow I/O, at the cost of more frequent watcher wake-ups
    /// (one per threshold period on each busy connection).
    pub stall_threshold: Duration,
    /// On shutdown, how long to wait for connections to finish their in-flight
    /// requests before their sockets are forced closed.
    pub shutdown_grace: Duration,
    /// TLS policy (see [`TlsMode`]).
    pub tls: TlsMode,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 256,
            max_in_flight_per_connection: 16,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            min_block_size: 1,
            preferred_block_size: 4096,
            max_block_size: DEFAULT_MAX_REQUEST_BYTES,
            handshake_timeout: Duration::from_secs(30),
            stall_threshold: Duration::from_millis(1),
            shutdown_grace: Duration::from_secs(10),
            tls: TlsMode::Disabled,
        }
    }
}

/// A [`ServerConfig`] that violates the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD server config: {0}")]
pub struct ConfigError(pub String);

impl ServerConfig {
    /// Check the block-size rules of the spec and the limits' consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_string()));
        let (min, pref, max) = (
            self.min_block_size,
            self.preferred_block_size,
            self.max_block_size,
        );
        if !min.is_power_of_two() || min > MAX_MIN_BLOCK_SIZE {
            return err("min_block_size must be a power of two <= 65536");
        }
        if !pref.is_power_of_two() || pref < min.max(512) {
            return err("preferred_block_size must be a power of two >= max(min_block_size, 512)");
        }
        if max % min != 0 || max < pref {
            return err(
                "max_block_size must be a multiple of min_block_size and >= preferred_block_size",
            );
        }
        if self.max_request_bytes > 1 << 30 {
            return err("max_request_bytes must be <= 1 GiB");
        }
        if max > self.max_request_bytes {
            return err("max_block_size must be <= max_request_bytes");
        }
        if self.max_connections == 0 || self.max_in_flight_per_connection == 0 {
            return err("max_connections and max_in_flight_per_connection must be >= 1");
        }
        if self.stall_threshold.is_zero() {
            return err("stall_threshold must be > 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        ServerConfig::default().validate().unwrap();
        let bad = ServerConfig {
            min_block_size: 3,
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = ServerConfig {
            max_block_size: 1000,
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
