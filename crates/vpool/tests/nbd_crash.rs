//! Crash consistency through NBD on a local pool: `vpool serve` as a child
//! process, a libnbd client keeping up to 16 writes, write-zeroes and
//! flushes in flight on one volume, SIGKILL at a random moment, restart, and
//! check every sector (`common/nbd_crash_rounds.rs` says what exactly; it is
//! shared with `s3_rgw.rs`, which runs it on a pool on S3). Seeded: set
//! `VPOOL_NBD_CRASH_SEED` to replay a failure.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;
#[path = "common/nbd_crash_rounds.rs"]
mod nbd_crash_rounds;

use common::Daemon;

const ROUNDS: u64 = 4;

#[test]
fn flushed_writes_survive_sigkill_through_nbd() {
    let seed: u64 = std::env::var("VPOOL_NBD_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6e62_6463);
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join("pool"), &[]);
    let d = nbd_crash_rounds::sigkill_rounds(d, dir.path(), ROUNDS, 50..1200, seed);
    assert!(d.terminate().success());
}
