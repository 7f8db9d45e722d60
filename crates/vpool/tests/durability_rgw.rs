//! Remote durability on RGW (`docs/multi-host.md` section 4): with
//! `--durability remote` a FLUSH is in the bucket when it is acknowledged
//! (the flush journal), so a host lost with its cache loses no flushed
//! write; with `host` the same loss costs what was not uploaded. Several
//! daemons, each with its own home, stand in for hosts; writes go over the
//! daemon's NBD socket, each followed by a FLUSH whose answer is recorded.
//!
//! Needs the Ceph RGW micro-cluster of the test command (as `s3_rgw.rs`);
//! skipped without `VPOOL_TEST_S3_ENDPOINT` unless `VPOOL_REQUIRE_S3=1`.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;
#[path = "../../vpool-s3/tests/common/rgw_env.rs"]
#[allow(dead_code)]
mod rgw_env;

use std::path::Path;
use std::time::Instant;

use common::{Daemon, pool_on_s3, run_json, run_ok};
use nbd_common::clients::nbdcopy;
use nbd_common::raw::write_and_flush;
use rgw_env::{RgwEnv as Rgw, rgw_env as rgw};

const KIB: usize = 1024;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// `pool VERB p --s3 URL` through the daemon at `home`: its cache in
/// `cache`, a 3 s lease, segments sealed only after 10 minutes (so nothing
/// reaches the bucket but through the journal), durability `durability`.
fn pool(rgw: &Rgw, home: &Path, verb: &str, url: &str, cache: &Path, durability: &str) {
    let extra = [
        "--seal-after",
        "600",
        "--lease-expire",
        "3",
        "--durability",
        durability,
    ];
    pool_on_s3(home, verb, "p", url, &rgw.endpoint, cache, &extra);
}

/// The byte written at the `i`th place.
fn byte_of(i: usize) -> u8 {
    (i % 250) as u8 + 1
}

/// 40 writes of 64 KiB, each at a place of its own and followed by a
/// FLUSH, on host `a`'s daemon; returns the places whose FLUSH succeeded.
fn write_flushed(a: &Daemon) -> Vec<usize> {
    let mut flushed = Vec::new();
    for i in 0..40 {
        let (w, f) = write_and_flush(
            &a.nbd_socket(),
            "p/v",
            (i * 192 * KIB) as u64,
            (64 * KIB) as u32,
            byte_of(i),
        );
        assert_eq!(w, 0, "write {i}");
        if f == 0 {
            flushed.push(i);
        }
    }
    flushed
}

/// Host A writes and flushes, then dies (SIGKILL) and its cache is
/// deleted; host B takes the pool over once A's lease expired. Returns
/// the places A flushed, and the volume as B reads it (`None`: B has no
/// such volume).
fn lose_the_holder(rgw: &Rgw, durability: &str) -> (Vec<usize>, Option<Vec<u8>>) {
    let t = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    let url = format!(
        "s3://{}/test-durability-{durability}-{:x}",
        rgw.bucket,
        rand::random::<u64>()
    );
    let a = Daemon::start(&home_a, &[]);
    let cache_a = t.path().join("ca");
    pool(rgw, &home_a, "create", &url, &cache_a, durability);
    run_ok(&home_a, &["vol", "create", "p/v", "--size", "8M"]);
    let flushed = write_flushed(&a);
    let stats = run_json(&home_a, &["cache", "stats", "--pool", "p"]);
    assert_eq!(stats["durability"], durability, "{stats}");
    if durability == "remote" {
        assert!(stats["journal_entries"].as_u64().unwrap() >= 40, "{stats}");
    }
    a.crash();
    let killed = Instant::now();
    std::fs::remove_dir_all(&cache_a).unwrap();

    let b = Daemon::start(&home_b, &[]);
    pool(
        rgw,
        &home_b,
        "attach",
        &url,
        &t.path().join("cb"),
        durability,
    );
    eprintln!(
        "FIGURE {durability} durability: host B serves the pool {:.1} s after SIGKILL of A (lease 3 s)",
        killed.elapsed().as_secs_f64()
    );
    let listed = run_json(&home_b, &["vol", "list", "--pool", "p"]);
    let has_v = listed["volumes"]
        .as_array()
        .is_some_and(|v| v.iter().any(|x| x["name"] == "v"));
    let data = has_v.then(|| {
        let back = t.path().join("back");
        nbdcopy(&b.nbd_uri("p/v"), path_str(&back), &[]);
        std::fs::read(&back).unwrap()
    });
    assert!(b.terminate().success());
    (flushed, data)
}

/// With remote durability every flushed write survives the loss of its
/// host and of that host's cache.
#[test]
fn remote_durability_loses_no_flushed_write_with_the_host() {
    let Some(rgw) = rgw() else { return };
    let (flushed, data) = lose_the_holder(&rgw, "remote");
    assert_eq!(flushed.len(), 40, "every flush succeeded");
    let data = data.expect("host B has the volume");
    for i in flushed {
        let at = i * 192 * KIB;
        assert!(
            data[at..at + 64 * KIB].iter().all(|&b| b == byte_of(i)),
            "flushed write {i} is missing on host B"
        );
    }
}

/// The control: with host durability (and nothing uploaded yet) the same
/// loss costs the flushed writes, so the test above can fail.
#[test]
fn host_durability_loses_what_was_not_uploaded() {
    let Some(rgw) = rgw() else { return };
    let (flushed, data) = lose_the_holder(&rgw, "host");
    assert_eq!(flushed.len(), 40);
    let lost = match data {
        None => true,
        Some(d) => (0..40).any(|i| d[i * 192 * KIB] != byte_of(i)),
    };
    assert!(
        lost,
        "host durability kept everything: the control shows nothing"
    );
}
