//! The `vpool` binary's parts, as a library so tests can run them in-process.
//!
//! - [`daemon`]: `vpool serve` — open the pool, serve the API and NBD, close cleanly.
//! - [`nbd_export`]: volumes as NBD exports.
//! - [`cli`]: argument definitions and the client commands.
//! - [`transfer`]: sparse `vol import` / `vol export`.
//! - [`vdiff`]: the `.vdiff` incremental backup format, `vol export-diff` /
//!   `vol import-diff`.
//! - [`size`]: parsing and printing sizes (`20G`, `1.5 TiB`).

pub mod cli;
pub mod daemon;
pub mod nbd_export;
pub mod size;
pub mod transfer;
pub mod vdiff;
