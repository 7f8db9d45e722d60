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
/// clients; see the field docs for what happens when one is hit. Every time
/// a limit is hit the server logs it at WARN, at most one line per kind of
/// limit per 10 s (with the number of lines suppressed); the counts are in
/// [`ServerStats`](crate::ServerStats).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Most simultaneous client connections (in handshake or transmission).
    /// When a new client arrives at this limit, the connection idle longest
    /// (see [`evict_idle_after`](Self::evict_idle_after)) is closed to make
    /// room; if none is idle enough, the new connection is accepted and
    /// closed at once. Default 256.
    pub max_connections: usize,
    /// Most simultaneous connections of one client: one TCP address, or one
    /// process on the Unix socket (see [`ClientKey`](crate::ClientKey)), so
    /// that one client cannot take every slot. Over it, one of that client's
    /// idle connections is closed to make room, or else the new one is
    /// accepted and closed at once. A value above `max_connections` means no
    /// per-client cap. Default 64.
    pub max_connections_per_client: usize,
    /// Most requests of one connection executing at once. Requests normally
    /// run inline on the connection's reading thread; a request that stalls
    /// longer than [`stall_threshold`](Self::stall_threshold) is left to
    /// finish on its thread while another thread keeps reading, so this also
    /// bounds the threads per connection (plus one watcher). When reached, the
    /// server stops reading from that client until a request completes.
    pub max_in_flight_per_connection: usize,
    /// Most bytes of READ replies and WRITE payloads one connection holds in
    /// memory at once. When the next request would go over, the server stops
    /// reading from that client until earlier requests are answered (a
    /// client that does not read its replies therefore stops being served,
    /// and [`reply_write_timeout`](Self::reply_write_timeout) ends it). One
    /// request is always admitted on an otherwise idle connection. Default
    /// 64 MiB.
    pub max_in_flight_bytes_per_connection: usize,
    /// Most bytes of READ replies and WRITE payloads the connections of one
    /// client (see [`max_connections_per_client`](Self::max_connections_per_client))
    /// hold in memory together. A request that would go over waits until
    /// the client's earlier requests are answered, so one client that does
    /// not read its replies cannot take the whole
    /// [`max_in_flight_bytes_total`](Self::max_in_flight_bytes_total).
    /// Default 128 MiB.
    pub max_in_flight_bytes_per_client: usize,
    /// Most bytes of READ replies and WRITE payloads all connections together
    /// hold in memory. A request that would go over waits (it does not fail)
    /// until other requests are answered. Default 512 MiB.
    pub max_in_flight_bytes_total: usize,
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
    /// The whole handshake, from accept to the start of transmission, must
    /// finish within this time, however the client spaces its bytes; the
    /// connection is closed at the deadline. Default 10 s (real clients
    /// take milliseconds).
    pub handshake_timeout: Duration,
    /// A WRITE's payload (or the payload of a refused request, which is read
    /// and discarded) must arrive within this time of its header, or the
    /// connection is closed. Between requests there is no timeout: a VM may
    /// idle for days. Default 60 s.
    pub request_read_timeout: Duration,
    /// Each reply must be written to the socket within this time, or the
    /// connection is closed (the client is not reading its replies, or is
    /// gone). Default 60 s.
    pub reply_write_timeout: Duration,
    /// A connection in transmission with no request in flight for at least
    /// this long may be closed to make room when a cap on connections is
    /// reached; never otherwise. Connections that never sent a request go
    /// first, then the longest idle, taken from the client holding the most
    /// connections. Idleness is noticed after 200 x
    /// [`stall_threshold`](Self::stall_threshold) of quiet. Default 60 s.
    pub evict_idle_after: Duration,
    /// TCP keepalive on client sockets: probes start after this long without
    /// traffic, so a client host that died (which never closes its
    /// connections) is noticed within about this plus 60 s and its slots
    /// freed. `None` turns keepalive off. Default 60 s.
    pub tcp_keepalive: Option<Duration>,
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
            max_connections_per_client: 64,
            max_in_flight_per_connection: 16,
            max_in_flight_bytes_per_connection: 64 << 20,
            max_in_flight_bytes_per_client: 128 << 20,
            max_in_flight_bytes_total: 512 << 20,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            min_block_size: 1,
            preferred_block_size: 4096,
            max_block_size: DEFAULT_MAX_REQUEST_BYTES,
            handshake_timeout: Duration::from_secs(10),
            request_read_timeout: Duration::from_secs(60),
            reply_write_timeout: Duration::from_secs(60),
            evict_idle_after: Duration::from_secs(60),
            tcp_keepalive: Some(Duration::from_secs(60)),
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
        self.validate_limits()
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let err = |m: &str| Err(ConfigError(m.to_string()));
        if self.max_connections == 0 || self.max_in_flight_per_connection == 0 {
            return err("max_connections and max_in_flight_per_connection must be >= 1");
        }
        if self.max_connections_per_client == 0 {
            return err("max_connections_per_client must be >= 1");
        }
        if self.max_in_flight_bytes_per_connection == 0
            || self.max_in_flight_bytes_per_connection > self.max_in_flight_bytes_per_client
            || self.max_in_flight_bytes_per_client > self.max_in_flight_bytes_total
        {
            return err("in-flight byte limits must be 0 < per connection <= per client <= total");
        }
        let timeouts = [
            self.stall_threshold,
            self.handshake_timeout,
            self.request_read_timeout,
            self.reply_write_timeout,
        ];
        if timeouts.iter().any(Duration::is_zero) || self.tcp_keepalive == Some(Duration::ZERO) {
            return err("timeouts must be > 0");
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
        let bad = ServerConfig {
            max_connections_per_client: 0,
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = ServerConfig {
            max_in_flight_bytes_total: 1 << 20,
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = ServerConfig {
            reply_write_timeout: Duration::ZERO,
            ..ServerConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
