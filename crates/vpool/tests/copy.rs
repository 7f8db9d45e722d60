//! `vol copy` and `job`: a volume copied into another pool of the same
//! daemon as a job, checked with qemu-img; a live volume copied as of the
//! copy's start; a cancel that leaves nothing behind; bad requests.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::path::Path;

use common::{Daemon, run_err, run_json, run_ok};
use nbd_common::clients::{qemu_img_compare, qemu_img_convert_to};
use nbd_common::pattern;

const MIB: usize = 1 << 20;

/// A daemon with its home pool and a second local pool `cold`; volume
/// `web1` of `size_mib` MiB whose first `data_mib` MiB hold a pattern, the
/// rest holes. Returns the image file too.
fn setup(home: &Path, size_mib: usize, data_mib: usize) -> (Daemon, std::path::PathBuf) {
    let d = Daemon::start(home, &[]);
    run_ok(home, &["pool", "create", "cold"]);
    let size = format!("{size_mib}M");
    run_ok(home, &["vol", "create", "web1", "--size", &size]);
    let mut img = pattern(data_mib * MIB, 7);
    img.resize(size_mib * MIB, 0);
    let file = home.parent().unwrap().join("web1.raw");
    std::fs::write(&file, &img).unwrap();
    qemu_img_convert_to(&file, &d.nbd_uri("web1"));
    (d, file)
}

#[test]
fn a_copy_into_another_pool_is_the_image_as_it_started() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let (d, file) = setup(&home, 64, 24);

    // A live volume: copied as of a snapshot taken when the copy starts,
    // which goes when it ends.
    let job = run_json(&home, &["vol", "copy", "web1", "cold/web1c"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["volume"], "cold/web1c", "{job}");
    // Holes stay holes: only (some of) the data was written.
    let data = job["result"]["data_bytes"].as_u64().unwrap();
    assert!(data > 0 && data <= 24 * MIB as u64, "{job}");
    assert!(qemu_img_compare(&d.nbd_uri("cold/web1c"), &file));
    let snaps = run_json(&home, &["snap", "list", "web1"]);
    assert!(snaps["snapshots"].as_array().unwrap().is_empty(), "{snaps}");
    let listed = run_json(&home, &["job", "list"]);
    assert_eq!(listed["jobs"][0]["id"], job["id"], "{listed}");

    // After `--detach` returns, the copy's point in time is taken: a write
    // made then is not in the copy.
    let started = run_json(&home, &["vol", "copy", "web1", "cold/web1d", "--detach"]);
    let id = started["id"].as_u64().unwrap().to_string();
    let (err, _) = nbd_common::raw::write_and_flush(&d.nbd_socket(), "web1", 0, 4096, 0xee);
    assert_eq!(err, 0);
    let done = run_json(&home, &["job", "wait", &id]);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(qemu_img_compare(&d.nbd_uri("cold/web1d"), &file));

    // A snapshot, into the same pool.
    run_ok(&home, &["snap", "create", "web1@s1"]);
    run_ok(&home, &["vol", "copy", "web1@s1", "web1e"]);
    let mut now = std::fs::read(&file).unwrap();
    now[..4096].fill(0xee);
    std::fs::write(&file, &now).unwrap();
    assert!(qemu_img_compare(&d.nbd_uri("web1e"), &file));
    assert!(qemu_img_compare(&d.nbd_uri("web1"), &file));

    // Refused at once, with nothing made: a name that exists, a pool or a
    // volume or a snapshot that does not.
    let e = run_err(&home, &["vol", "copy", "web1", "cold/web1c"]);
    assert!(e.contains("exists"), "{e}");
    let e = run_err(&home, &["vol", "copy", "web1", "nowhere/x"]);
    assert!(e.contains("nowhere"), "{e}");
    let e = run_err(&home, &["vol", "copy", "nope", "cold/x"]);
    assert!(e.contains("nope"), "{e}");
    let e = run_err(&home, &["vol", "copy", "web1@nope", "cold/x"]);
    assert!(e.contains("nope"), "{e}");
    let e = run_err(&home, &["job", "show", "999"]);
    assert!(e.contains("no job 999"), "{e}");
    let listed = run_json(&home, &["vol", "list", "--pool", "cold"]);
    assert_eq!(listed["volumes"].as_array().unwrap().len(), 2, "{listed}");
    let snaps = run_json(&home, &["snap", "list", "web1"]);
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1, "{snaps}");
    drop(d);
}

#[test]
fn a_cancelled_copy_leaves_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    // Large enough that the copy (over 1 GB/s here) is still running
    // when the cancel comes.
    let (d, file) = setup(&home, 512, 512);
    let started = run_json(&home, &["vol", "copy", "web1", "cold/big", "--detach"]);
    let id = started["id"].as_u64().unwrap().to_string();
    let asked = run_json(&home, &["job", "cancel", &id]);
    assert_eq!(asked["id"].as_u64(), started["id"].as_u64(), "{asked}");
    let e = run_err(&home, &["job", "wait", &id]);
    assert!(e.contains("cancelled"), "{e}");
    let job = run_json(&home, &["job", "show", &id]);
    assert_eq!(job["state"], "cancelled", "{job}");
    // The destination and the copy's snapshot are gone; the source is as
    // it was.
    let e = run_err(&home, &["vol", "info", "cold/big"]);
    assert!(e.contains("big"), "{e}");
    let snaps = run_json(&home, &["snap", "list", "web1"]);
    assert!(snaps["snapshots"].as_array().unwrap().is_empty(), "{snaps}");
    assert!(qemu_img_compare(&d.nbd_uri("web1"), &file));
}
