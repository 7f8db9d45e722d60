//! The S3 pool against a real object store: the Ceph RGW micro-cluster that
//! the test command starts (`scripts/ceph.sh`; its env file gives the
//! endpoint and keys). Without `VPOOL_TEST_S3_ENDPOINT` these tests skip,
//! unless `VPOOL_REQUIRE_S3=1` (the test command sets it) makes that a
//! failure, so CI cannot pass by skipping them.
//!
//! The tests share one radosgw, which one of them stops and starts: they
//! take a lock and each works under its own key prefix.

mod common;
#[path = "common/rgw_env.rs"]
mod rgw_env;

use common::*;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};
use vpool_s3::manifest::Fencing;
use vpool_s3::{OpenError, OpenMode, Remote, S3Access, S3Store};

const MIB: u64 = 1 << 20;
static SERIAL: Mutex<()> = Mutex::new(());

use rgw_env::{RgwDown, RgwEnv as Rgw, rgw_env as rgw};

impl Rgw {
    fn remote(&self, prefix: &str) -> Remote {
        let access = S3Access {
            endpoint: Some(self.endpoint.clone()),
            ..Default::default()
        };
        let mut r = vpool_s3::connect(&format!("s3://{}/{prefix}", self.bucket), &access).unwrap();
        r.policy.attempt_timeout = Duration::from_secs(2);
        r.policy.backoff_max = Duration::from_millis(250);
        r
    }
}

fn unique(name: &str) -> String {
    format!("test-{name}-{:x}", rand::random::<u64>())
}

#[test]
fn rgw_enforces_create_only_puts() {
    let Some(rgw) = rgw() else { return };
    let _g = SERIAL.lock();
    let remote = rgw.remote(&unique("probe"));
    assert_eq!(vpool_s3::probe_fencing(&remote), Ok(Fencing::Atomic));
}

#[test]
fn rgw_pool_survives_cache_loss_and_fences_the_old_host() {
    let Some(rgw) = rgw() else { return };
    let _g = SERIAL.lock();
    let t = tempfile::tempdir().unwrap();
    let prefix = unique("pool");
    let create = OpenMode::Create {
        allow_unsafe_fencing: false,
    };
    let (pool, store) = open(
        rgw.remote(&prefix),
        opts(&t.path().join("a"), 64 * MIB, create),
    );
    let blocks = 2048;
    pool.create_volume("v", blocks * BLOCK).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..4000 {
        log.write(&vol, rng.gen_range(0..blocks));
        if i % 100 == 0 {
            pool.flush().unwrap();
        }
    }
    pool.flush().unwrap();
    assert!(store.wait_uploaded(Duration::from_secs(60)));
    let uploaded = log.writes.len() as u64;
    // More writes the bucket may or may not have yet when the host "dies".
    for _ in 0..1000 {
        log.write(&vol, rng.gen_range(0..blocks));
    }
    pool.flush().unwrap();

    // Host A is lost with its cache: B opens the bucket with an empty cache.
    let err = S3Store::open(
        rgw.remote(&prefix),
        opts(
            &t.path().join("b"),
            64 * MIB,
            OpenMode::Open { force: false },
        ),
    )
    .expect_err("held by A");
    assert!(matches!(err, OpenError::Held { .. }), "{err}");
    let (pool_b, store_b) = open(
        rgw.remote(&prefix),
        opts(
            &t.path().join("b"),
            64 * MIB,
            OpenMode::Open { force: true },
        ),
    );
    let k = log.check_prefix(&pool_b.volume("v").unwrap(), blocks);
    assert!(
        k >= uploaded,
        "the bucket lost uploaded writes: prefix {k} < {uploaded}"
    );
    eprintln!(
        "recovered prefix {k} of {} writes ({uploaded} known uploaded)",
        log.writes.len()
    );

    // A, if it still runs, is fenced at its next commit.
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.fenced().is_none() && Instant::now() < deadline {
        let _ = vol.write(0, &block_data(u64::MAX, 0));
        let _ = pool.flush();
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(store.fenced().is_some(), "A was not fenced");
    assert_eq!(log.check_prefix(&pool_b.volume("v").unwrap(), blocks), k);
    drop(vol);
    let _ = pool.close();
    store.close();
    close(pool_b, store_b);
}

#[test]
fn rgw_outage_mid_workload_recovers_by_itself() {
    let Some(rgw) = rgw() else { return };
    let _g = SERIAL.lock();
    let t = tempfile::tempdir().unwrap();
    let prefix = unique("outage");
    let create = OpenMode::Create {
        allow_unsafe_fencing: false,
    };
    let (pool, store) = open(
        rgw.remote(&prefix),
        opts(&t.path().join("a"), 64 * MIB, create),
    );
    pool.create_volume("v", 16 * MIB).unwrap();
    let vol = pool.volume("v").unwrap();
    let mut log = WriteLog::default();
    for b in 0..2048 {
        log.write(&vol, b);
    }
    drop(vol);
    close(pool, store);

    let mut o = opts(
        &t.path().join("b"),
        32 * MIB,
        OpenMode::Open { force: false },
    );
    o.read_timeout = Duration::from_secs(3);
    let (pool, store) = open(rgw.remote(&prefix), o);
    let vol = pool.volume("v").unwrap();
    {
        let _down = RgwDown::stop();
        // Writes and flushes go on into the cache.
        for b in 2048..3072 {
            log.write(&vol, b);
        }
        pool.flush().unwrap();
        // A cold read fails in bounded time with a clear error.
        let started = Instant::now();
        let mut buf = vec![0u8; BLOCK as usize];
        let err = vol.read(0, &mut buf).expect_err("RGW is down");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        assert!(
            err.to_string().contains("object store unavailable"),
            "{err}"
        );
        std::thread::sleep(Duration::from_secs(1));
        assert!(store.stats().dirty_bytes > 0);
    } // radosgw starts again here
    assert!(
        store.wait_uploaded(Duration::from_secs(60)),
        "{:?}",
        store.stats()
    );
    assert_eq!(log.check_prefix(&vol, 4096), 3072);
    drop(vol);
    close(pool, store);
    let (pool, store) = open(
        rgw.remote(&prefix),
        opts(
            &t.path().join("c"),
            64 * MIB,
            OpenMode::Open { force: false },
        ),
    );
    assert_eq!(log.check_prefix(&pool.volume("v").unwrap(), 4096), 3072);
    close(pool, store);
}
