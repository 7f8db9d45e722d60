//! `vpool-peer`: the link between the daemons (hosts) that attach one
//! shared pool (`docs/multi-host.md`, section 3).
//!
//! A host that does not own a volume serves its NBD clients by
//! *forwarding* their requests to the owner over this link; the owner runs
//! them on the same devices as its own clients', in one engine, so no
//! client sees a stale block and a FLUSH from any host covers every write
//! completed before it. The link also carries what the forwarding host
//! needs to move ownership to itself: how many clients the owner has, and
//! a request to release the volume.
//!
//! - [`wire`]: the handshake and frames, pure encode/decode (fuzzed).
//! - [`auth`]: mutual HMAC challenge-response with the pool's secret.
//! - [`client`]: a [`Session`] with an owner, one request at a time.
//! - [`server`]: the owner's side, generic over a [`PeerBackend`].
//!
//! Blocking I/O on plain threads, as the NBD server: a session is one
//! request at a time, and a forwarding host keeps several sessions for
//! parallelism.

pub mod auth;
pub mod client;
pub mod server;
pub mod wire;

pub use auth::Secret;
pub use client::{PeerError, Session};
pub use server::{PeerBackend, PeerServer, Refusal, spawn};
