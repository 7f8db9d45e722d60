//! The upgrade from the previous release: pool directories it wrote
//! (`tests/fixtures/pools-53d91bd.tar.gz`, made by
//! `scripts/upgrade-fixture.sh` with the `vpool` of commit 53d91bd, which
//! served one pool per daemon) are taken over as they are. The local pool
//! becomes a daemon's home and default pool; the cache directory of the
//! pool on S3 is added to it as pool `cold`. Every image reads back, over
//! NBD, with the SHA-256 the old release recorded, and both pools check
//! clean and take new writes across a restart.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::path::Path;
use std::process::Command;

use common::{Daemon, run_json, run_ok};
use nbd_common::clients::{nbdcopy, qemu_io, require_tool};
use sha2::{Digest, Sha256};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/pools-53d91bd.tar.gz"
);

/// The SHA-256 of what export `name` reads, in hex.
fn export_sha256(d: &Daemon, scratch: &Path, name: &str) -> String {
    let out = scratch.join("image.raw");
    let _ = std::fs::remove_file(&out);
    nbdcopy(&d.nbd_uri(name), out.to_str().unwrap(), &[]);
    let bytes = std::fs::read(&out).unwrap();
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `(export name, sha256)` as the old release recorded them.
fn expected(dir: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(dir.join("expected"))
        .unwrap()
        .lines()
        .map(|l| {
            let (n, s) = l.split_once(' ').expect("NAME SHA256");
            (n.to_string(), s.to_string())
        })
        .collect()
}

fn check_images(d: &Daemon, dir: &Path, want: &[(String, String)]) {
    for (name, sum) in want {
        assert_eq!(&export_sha256(d, dir, name), sum, "{name}");
    }
}

#[test]
fn pools_of_the_previous_release_are_taken_over_as_they_are() {
    require_tool("nbdcopy");
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(FIXTURE)
        .arg("-C")
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "extracting {FIXTURE}");
    // The bucket moved with the fixture: point the pool at where it is now.
    let pool_file = dir.join("cache/pool.json");
    let mut pf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&pool_file).unwrap()).unwrap();
    pf["url"] = format!("file://{}", dir.join("bucket").display()).into();
    std::fs::write(&pool_file, serde_json::to_vec_pretty(&pf).unwrap()).unwrap();
    let want = expected(dir);
    let home = dir.join("local");

    let d = Daemon::start(&home, &[]);
    let out = run_ok(
        &home,
        &[
            "pool",
            "create",
            "cold",
            "--dir",
            dir.join("cache").to_str().unwrap(),
        ],
    );
    assert!(out.contains("added pool cold (s3)"), "{out}");
    check_images(&d, dir, &want);
    // The template is still a template, its clone still a clone.
    let c = d.client();
    assert!(c.volume_info("gold").unwrap().template.is_some());
    let web2 = c.volume_info("web2").unwrap();
    assert!(
        web2.parent
            .as_deref()
            .is_some_and(|p| p.starts_with("gold@")),
        "{web2:?}"
    );
    for pool in ["local", "cold"] {
        let r = run_json(&home, &["pool", "check", pool]);
        assert_eq!(r["clean"], true, "{pool}: {r}");
    }

    // New writes in both pools, then a restart: the pools come back.
    qemu_io(&d.nbd_uri("web"), &["write -P 0x77 5M 4K", "flush"]);
    qemu_io(&d.nbd_uri("cold/arch"), &["write -P 0x78 6M 4K", "flush"]);
    assert!(d.terminate().success());
    let d = Daemon::start(&home, &[]);
    let pools = run_json(&home, &["pool", "list"]);
    assert_eq!(pools["pools"][1]["name"], "cold", "{pools}");
    assert_eq!(pools["pools"][1]["state"], "open", "{pools}");
    let out = qemu_io(
        &d.nbd_uri("web"),
        &["read -P 0x77 5M 4K", "read -P 0x11 512K 4K"],
    );
    assert!(!out.contains("Pattern verification failed"), "{out}");
    let out = qemu_io(&d.nbd_uri("cold/arch"), &["read -P 0x78 6M 4K"]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // The snapshots did not move.
    let snaps: Vec<(String, String)> = want
        .iter()
        .filter(|(n, _)| n.contains('@'))
        .cloned()
        .collect();
    check_images(&d, dir, &snaps);
    assert!(d.terminate().success());
}
