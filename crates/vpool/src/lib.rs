//! The `vpool` binary's parts, as a library so tests can run them in-process.
//!
//! - [`daemon`]: `vpool serve` — open the pool, serve the API and NBD, close cleanly.
//! - [`s3pool`]: pools on S3: `pool.json`, `pool create --s3`, `pool attach`,
//!   opening the store for `serve`.
//! - [`cache`]: the host cache of an S3 pool as the API serves it: stats and
//!   pins.
//! - [`registry`]: pool names of earlier releases (`--home NAME`).
//! - [`cli`]: argument definitions and the client commands.
//! - [`transfer`]: sparse `vol import` / `vol export`, files or pipes.
//! - [`image_format`]: what an imported image holds (qcow2, vmdk...), and
//!   its conversion with `qemu-img`.
//! - [`vdiff`]: the `.vdiff` incremental backup format, `vol export-diff` /
//!   `vol import-diff`.
//! - [`config`]: the configuration file (`/etc/vpool/vpool.toml`).
//! - [`systemd`]: readiness and stop notices to systemd (`Type=notify`).
//! - [`size`]: parsing and printing sizes (`20G`, `1.5 TiB`).
//! - [`lock`], [`atomic_file`]: a pool directory locked by another process;
//!   replacing a small file atomically.

pub mod atomic_file;
pub mod cache;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod image_format;
pub mod lock;
pub mod nbd_target;
pub mod registry;
pub mod s3pool;
pub mod shared;
pub mod size;
pub mod systemd;
pub mod transfer;
pub mod vdiff;
