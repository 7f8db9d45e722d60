//! Finding the real S3 server the test command started (`scripts/ceph.sh`):
//! shared by the S3 tests of `vpool-s3` and of `vpool` (included by path).
//!
//! Without `VPOOL_TEST_S3_ENDPOINT` a test skips, with a message; with
//! `VPOOL_REQUIRE_S3=1` (the test command sets it) that is a failure, so CI
//! cannot pass by skipping.

pub struct RgwEnv {
    pub endpoint: String,
    pub bucket: String,
}

pub fn rgw_env() -> Option<RgwEnv> {
    match std::env::var("VPOOL_TEST_S3_ENDPOINT") {
        Ok(endpoint) => Some(RgwEnv {
            endpoint,
            bucket: std::env::var("VPOOL_TEST_S3_BUCKET").unwrap_or_else(|_| "vpool-test".into()),
        }),
        Err(_) => {
            assert!(
                std::env::var("VPOOL_REQUIRE_S3").as_deref() != Ok("1"),
                "VPOOL_REQUIRE_S3=1 but VPOOL_TEST_S3_ENDPOINT is not set: start RGW with scripts/ceph.sh"
            );
            eprintln!("skipped: no S3 endpoint (scripts/ceph.sh start; . /tmp/vpool-ceph/env)");
            None
        }
    }
}

fn ceph_script() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/ceph.sh")
}

/// Stops radosgw (`scripts/ceph.sh rgw-stop`); starts it again when dropped,
/// even if the test failed. Tests that use it must hold their file's lock.
pub struct RgwDown;

impl RgwDown {
    pub fn stop() -> RgwDown {
        let st = std::process::Command::new(ceph_script())
            .arg("rgw-stop")
            .status()
            .unwrap();
        assert!(st.success(), "scripts/ceph.sh rgw-stop failed");
        RgwDown
    }
}

impl Drop for RgwDown {
    fn drop(&mut self) {
        let st = std::process::Command::new(ceph_script())
            .arg("rgw-start")
            .status();
        let ok = st.as_ref().is_ok_and(|s| s.success());
        if std::thread::panicking() {
            if !ok {
                eprintln!("scripts/ceph.sh rgw-start failed: {st:?}");
            }
        } else {
            assert!(ok, "scripts/ceph.sh rgw-start failed: {st:?}");
        }
    }
}
