//! `vol copy`, `vol move` and `job`: a volume copied into another pool of
//! the same daemon as a job, checked with qemu-img; a live volume copied as
//! of the copy's start; a volume moved there and back while fio writes and
//! verifies it through one NBD connection; cancels that leave nothing
//! behind; a daemon killed during a move rolls it back; bad requests.

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
    // At 8 MB/s the copy of 64 MiB is still running when the cancel
    // comes.
    let (d, file) = setup(&home, 64, 64);
    let started = run_json(
        &home,
        &[
            "vol",
            "copy",
            "web1",
            "cold/big",
            "--detach",
            "--max-rate",
            "8M",
        ],
    );
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

/// fio for 8 s over the first `size` of `uri`, verifying as it goes.
fn fio_verify_for(uri: &str, size: &str, iodepth: u32) -> String {
    nbd_common::clients::fio_verify_for(uri, size, iodepth, 8)
}

#[test]
fn a_volume_moves_there_and_back_while_fio_verifies_it() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let (d, _file) = setup(&home, 256, 128);
    // fio writes and verifies the first 48 MiB over one connection that
    // stays up across both moves.
    let uri = d.nbd_uri("web1");
    let fio = std::thread::spawn(move || fio_verify_for(&uri, "48M", 8));
    std::thread::sleep(std::time::Duration::from_millis(500));
    // Slowed down, so that fio's writes meet the mirror.
    let job = run_json(&home, &["vol", "move", "web1", "cold", "--max-rate", "64M"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["volume"], "cold/web1", "{job}");
    let e = run_err(&home, &["vol", "info", "web1"]);
    assert!(e.contains("web1"), "{e}");
    let job = run_json(
        &home,
        &["vol", "move", "cold/web1", "local", "--name", "web2"],
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        !fio.is_finished(),
        "fio ended before the moves did: they were not tested under I/O"
    );
    let out = fio.join().expect("fio failed");
    assert!(out.contains("err= 0"), "{out}");
    // Past fio's range, the data it did not touch came along.
    let back = t.path().join("back.raw");
    nbd_common::clients::qemu_img_convert_from(&d.nbd_uri("web2"), &back);
    let got = std::fs::read(&back).unwrap();
    let want = std::fs::read(&_file).unwrap();
    assert!(
        got[48 * MIB..] == want[48 * MIB..],
        "the data past fio's range changed"
    );
    // Refused: into a pool that does not exist, onto a name that exists.
    let e = run_err(&home, &["vol", "move", "web2", "nowhere"]);
    assert!(e.contains("nowhere"), "{e}");
    run_ok(&home, &["vol", "create", "cold/web2", "--size", "1M"]);
    let e = run_err(&home, &["vol", "move", "web2", "cold"]);
    assert!(e.contains("exists"), "{e}");
    run_ok(&home, &["vol", "delete", "cold/web2"]);
    assert!(
        run_json(&home, &["vol", "info", "web2"])["size_bytes"].as_u64() == Some(256 * MIB as u64)
    );

    // Snapshots move with the volume, each with its own content: data
    // written and zeroes between them, a resize too.
    let save = |image: &str, name: &str| {
        let f = t.path().join(name);
        let _ = std::fs::remove_file(&f);
        nbd_common::clients::qemu_img_convert_from(&d.nbd_uri(image), &f);
        f
    };
    run_ok(&home, &["snap", "create", "web2@s"]);
    let s_img = save("web2@s", "s.raw");
    nbd_common::clients::qemu_io(
        &d.nbd_uri("web2"),
        &[
            "write -P 0x42 4M 1M",
            "write -z 64M 2M",
            "write -P 0x44 250M 1M",
        ],
    );
    run_ok(&home, &["vol", "resize", "web2", "--size", "288M"]);
    run_ok(&home, &["snap", "create", "web2@t"]);
    let t_img = save("web2@t", "t.raw");
    nbd_common::clients::qemu_io(
        &d.nbd_uri("web2"),
        &["write -P 0x43 8M 64k", "write -z 100M 1M"],
    );
    // Shrunk past 0x44's data and grown again: zeros there now.
    let shrink = ["vol", "resize", "web2", "--size", "240M", "--allow-shrink"];
    run_ok(&home, &shrink);
    run_ok(&home, &["vol", "resize", "web2", "--size", "272M"]);
    let head = save("web2", "head.raw");
    let job = run_json(&home, &["vol", "move", "web2", "cold"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        qemu_img_compare(&d.nbd_uri("cold/web2@s"), &s_img),
        "snapshot s"
    );
    assert!(
        qemu_img_compare(&d.nbd_uri("cold/web2@t"), &t_img),
        "snapshot t"
    );
    assert!(
        qemu_img_compare(&d.nbd_uri("cold/web2"), &head),
        "the volume"
    );
    let snaps = run_json(&home, &["snap", "list", "cold/web2"]);
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 2, "{snaps}");
    // --without-snapshots: the volume alone; its snapshots go with the
    // source.
    let job = run_json(
        &home,
        &[
            "vol",
            "move",
            "cold/web2",
            "local",
            "--name",
            "web3",
            "--without-snapshots",
        ],
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(qemu_img_compare(&d.nbd_uri("web3"), &head), "the volume");
    let snaps = run_json(&home, &["snap", "list", "web3"]);
    assert!(snaps["snapshots"].as_array().unwrap().is_empty(), "{snaps}");
    let e = run_err(&home, &["vol", "info", "cold/web2"]);
    assert!(e.contains("web2"), "{e}");
    let job = run_json(&home, &["vol", "move", "web3", "cold", "--name", "web2"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    run_ok(&home, &["snap", "create", "cold/web2@s"]);
    // A volume whose snapshot has a clone stays (the clone needs it).
    run_ok(&home, &["vol", "clone", "cold/web2@s", "cold/kid"]);
    let e = run_err(&home, &["vol", "move", "cold/web2", "local"]);
    assert!(e.contains("clones"), "{e}");
}

#[test]
fn a_cancelled_or_interrupted_move_leaves_the_volume_where_it_was() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let (d, file) = setup(&home, 64, 64);
    let slow = ["--detach", "--max-rate", "8M"];
    let started = run_json(
        &home,
        &[&["vol", "move", "web1", "cold"][..], &slow].concat(),
    );
    let id = started["id"].as_u64().unwrap().to_string();
    // While it moves, neither side is changed but over NBD.
    for args in [
        &["vol", "delete", "web1", "--force"][..],
        &["vol", "delete", "cold/web1", "--force"],
        &["snap", "create", "web1@x"],
        &["vol", "move", "web1", "cold", "--name", "again"],
        &["vol", "template", "web1"],
    ] {
        let e = run_err(&home, args);
        assert!(e.contains("being moved"), "{args:?}: {e}");
    }
    let e = run_err(&home, &["pool", "detach", "cold", "--force"]);
    assert!(e.contains("job"), "{e}");
    run_ok(&home, &["job", "cancel", &id]);
    let e = run_err(&home, &["job", "wait", &id]);
    assert!(e.contains("cancelled"), "{e}");
    let e = run_err(&home, &["vol", "info", "cold/web1"]);
    assert!(e.contains("web1"), "{e}");
    assert!(qemu_img_compare(&d.nbd_uri("web1"), &file));
    assert!(
        !home.join("moves.json").exists()
            || std::fs::read_to_string(home.join("moves.json"))
                .unwrap()
                .trim()
                == "[]"
    );

    // Killed during a move: the next start rolls it back.
    let started = run_json(
        &home,
        &[&["vol", "move", "web1", "cold"][..], &slow].concat(),
    );
    let id = started["id"].as_u64().unwrap().to_string();
    // Mirroring: a write now goes to both sides.
    let (err, flush_err) =
        nbd_common::raw::write_and_flush(&d.nbd_socket(), "web1", 4096, 4096, 0x77);
    assert_eq!((err, flush_err), (0, 0));
    let job = run_json(&home, &["job", "show", &id]);
    assert_eq!(job["state"], "running", "{job}");
    d.crash();
    let mut img = std::fs::read(&file).unwrap();
    img[4096..8192].fill(0x77);
    std::fs::write(&file, &img).unwrap();
    let d = Daemon::start(&home, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::run(&home, &["vol", "info", "cold/web1"])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the interrupted move was not rolled back"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(qemu_img_compare(&d.nbd_uri("web1"), &file));
    // And it moves, then.
    let job = run_json(&home, &["vol", "move", "web1", "cold"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(qemu_img_compare(&d.nbd_uri("cold/web1"), &file));
}

/// A crash after a move's commit and before its source was deleted: the
/// next start rolls it forward (the source of that id deleted, the
/// destination kept); a record whose ids name other volumes touches
/// nothing. The record is written by hand, as the move leaves it.
#[test]
fn an_interrupted_move_past_its_commit_is_rolled_forward() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let (d, file) = setup(&home, 16, 16);
    run_ok(&home, &["vol", "copy", "web1", "cold/web1"]);
    run_ok(&home, &["vol", "create", "other", "--size", "1M"]);
    let id = |v: &str| run_json(&home, &["vol", "info", v])["id"].as_u64().unwrap();
    let (src, dst, other) = (id("web1"), id("cold/web1"), id("other"));
    assert!(d.terminate().success());
    let records = serde_json::json!([
        {"pool": "local", "volume": "web1", "volume_id": src,
         "to_pool": "cold", "to": "web1", "to_id": dst},
        {"pool": "local", "volume": "other", "volume_id": other,
         "to_pool": "cold", "to": "nothing", "to_id": 12345},
    ]);
    std::fs::write(home.join("moves.json"), records.to_string()).unwrap();
    let d = Daemon::start(&home, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while common::run(&home, &["vol", "info", "web1"])
        .status
        .success()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the committed move was not rolled forward"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(qemu_img_compare(&d.nbd_uri("cold/web1"), &file));
    run_ok(&home, &["vol", "info", "other"]);
    let left = std::fs::read_to_string(home.join("moves.json")).unwrap();
    assert_eq!(left.trim().replace([' ', '\n'], ""), "[]", "{left}");
}
