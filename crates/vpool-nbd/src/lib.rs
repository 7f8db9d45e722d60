//! `vpool-nbd`: an NBD (Network Block Device) server library, generic over a
//! [`BlockDevice`] trait, serving exports named by an [`ExportRegistry`].
//!
//! The protocol is `doc/proto.md` of NetworkBlockDevice/nbd. Implemented:
//!
//! * fixed-newstyle handshake with `NBD_FLAG_NO_ZEROES`; options `GO`, `INFO`
//!   (`NBD_INFO_EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE`), `LIST`,
//!   `EXPORT_NAME`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//!   `SET_META_CONTEXT` with `base:allocation`; `STARTTLS` is refused with
//!   `NBD_REP_ERR_POLICY` (see [`TlsMode`] for the seam); unknown options get
//!   `NBD_REP_ERR_UNSUP`;
//! * commands `READ` (simple or structured `OFFSET_DATA` replies), `WRITE`
//!   (with FUA = flush after the write), `FLUSH`, `TRIM`, `WRITE_ZEROES`
//!   (`NO_HOLE`, `FAST_ZERO`), `BLOCK_STATUS` (`REQ_ONE`), `CACHE`, `DISC`;
//! * many requests in flight per connection, answered out of order, and many
//!   connections per export (`NBD_FLAG_CAN_MULTI_CONN` when the device says
//!   so).
//!
//! Not implemented: extended headers (64-bit), TLS, `OFFSET_HOLE` read
//! chunks, `NBD_CMD_RESIZE`, oldstyle negotiation.
//!
//! # Design
//!
//! Blocking I/O on plain threads, no async runtime: one accept thread
//! ([`run`]), and per connection a leader thread that reads requests and runs
//! them inline plus a watcher thread that takes over reading when a request
//! stalls (details and rationale in the `transmission` module). Handshake and
//! request decoding are pure functions in [`wire`], fuzzed by the targets in
//! `fuzz/`.
//!
//! # Limits
//!
//! Everything a client sends is distrusted, and everything a client can hold
//! has a limit and a timeout, all [`ServerConfig`] fields with their defaults
//! and consequences documented there (and tabulated in the workspace's
//! `ARCHITECTURE.md`): connections in total and per client
//! ([`ClientKey`]: a TCP address or a Unix-socket process), with eviction
//! of idle connections when a cap is reached; a deadline for the whole
//! handshake; requests and bytes in flight per connection and in total;
//! deadlines for receiving a payload and writing a reply; TCP keepalive.
//! Hitting a limit logs a WARN line, at most one per kind per 10 s
//! ([`ratelog`]), and counts it in [`ServerStats`]. Parsing limits are
//! constants in [`proto`] ([`proto::MAX_OPTION_LEN`],
//! [`proto::MAX_OPTIONS_PER_HANDSHAKE`], [`proto::MAX_STRING_LEN`],
//! [`proto::MAX_META_QUERIES`], [`proto::MAX_BLOCK_STATUS_EXTENTS`]).
//!
//! # Benchmarks and fuzzing
//!
//! `examples/nbd-memserver.rs` serves [`MemDevice`] exports;
//! `bench/fio-vs-nbdkit.sh` compares it with `nbdkit memory` using fio's nbd
//! engine. Fuzz targets `nbd_request` and `nbd_option` live in the
//! workspace's `fuzz/` directory (`cargo +nightly fuzz run nbd_option`).
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use vpool_nbd::{MemDevice, MemRegistry, ServerConfig};
//!
//! let registry = Arc::new(MemRegistry::new());
//! registry.insert("disk", "scratch disk", Arc::new(MemDevice::new(1 << 30)));
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809").unwrap();
//! let server = vpool_nbd::spawn(listener, registry, ServerConfig::default()).unwrap();
//! println!("serving {}", server.uri("disk"));
//! server.shutdown().unwrap();
//! ```

pub mod client;
pub mod config;
pub mod device;
pub mod handshake;
mod limits;
pub mod mem;
pub mod net;
pub mod proto;
pub use vpool_ratelog as ratelog;
pub mod server;
mod transmission;
pub mod wire;

pub use config::{ConfigError, ServerConfig, TlsMode};
pub use device::{BlockDevice, DeviceError, DeviceErrorKind, ExportInfo, ExportRegistry, Opener};
pub use limits::ClientKey;
pub use mem::{MemDevice, MemRegistry};
pub use net::{ListenAddr, Listener};
pub use server::{ServerError, ServerHandle, ServerStats, ShutdownSignal, run, spawn};
