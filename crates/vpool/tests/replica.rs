//! `vpool replica`: a volume replicated into another local pool of the same
//! daemon while fio writes it, each point read back over NBD and compared
//! with the source's snapshot it came from; retention; a schedule that
//! runs by itself; a run cancelled, then one cut by SIGKILL, each going on
//! where it stopped; promote; bad requests. (Into a pool on Ceph RGW, with
//! radosgw stopped during the runs: `s3_rgw.rs`.)

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, run_err, run_json, run_ok};
use nbd_common::clients::{
    qemu_img_compare, qemu_img_convert_from, qemu_img_convert_to, require_tool,
};
use nbd_common::pattern;

const MIB: usize = 1 << 20;

/// A daemon with its home pool and a second local pool `dr`; volume
/// `web1` of `size_mib` MiB whose first `data_mib` MiB hold a pattern.
fn setup(home: &Path, size_mib: usize, data_mib: usize) -> Daemon {
    let d = Daemon::start(home, &[]);
    run_ok(home, &["pool", "create", "dr"]);
    run_ok(
        home,
        &["vol", "create", "web1", "--size", &format!("{size_mib}M")],
    );
    let mut img = pattern(data_mib * MIB, 7);
    img.resize(size_mib * MIB, 0);
    let file = home.parent().unwrap().join("web1.raw");
    std::fs::write(&file, &img).unwrap();
    qemu_img_convert_to(&file, &d.nbd_uri("web1"));
    d
}

/// The bytes of NBD export `uri`, through qemu-img.
fn image(uri: &str, dir: &Path) -> Vec<u8> {
    let f = dir.join("image.raw");
    let _ = std::fs::remove_file(&f);
    qemu_img_convert_from(uri, &f);
    std::fs::read(&f).unwrap()
}

/// The names of `volume`'s replication points.
fn points(home: &Path, volume: &str) -> Vec<String> {
    let l = run_json(home, &["snap", "list", volume]);
    l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with("replica-"))
        .collect()
}

/// Waits for the replication of `volume` to have no job running and at
/// least `runs` runs, up to `limit`; its status then.
fn wait_runs(home: &Path, volume: &str, runs: u64, limit: Duration) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    loop {
        let st = run_json(home, &["replica", "status", volume]);
        if st["runs"].as_u64().unwrap() >= runs && st["running"] == false {
            return st;
        }
        assert!(Instant::now() < deadline, "runs did not happen: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// fio for `secs` seconds over the first `size` of `uri`, verifying as
/// it goes, on a thread.
fn fio_writer(uri: String, size: &'static str, secs: u32) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || nbd_common::clients::fio_verify_for(&uri, size, 4, secs))
}

#[test]
fn replicas_follow_a_writer_point_by_point_and_promote() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let d = setup(&home, 64, 40);

    let st = run_json(
        &home,
        &["replica", "add", "web1", "--to", "dr", "--keep", "3"],
    );
    assert_eq!(st["to"], "dr/web1", "{st}");
    let first = st["job"]
        .as_u64()
        .expect("the first run started")
        .to_string();
    let job = run_json(&home, &["job", "wait", &first]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["whole"], true, "{job}");
    // Holes stay holes: at most the data was written.
    assert!(
        job["result"]["moved_bytes"].as_u64().unwrap() <= 40 * MIB as u64,
        "{job}"
    );

    // Runs while fio writes the first 8 MiB: each point equals the
    // source's snapshot of the same name, and moves what changed only.
    let fio = fio_writer(d.nbd_uri("web1"), "8M", 20);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..4 {
        let job = run_json(&home, &["replica", "run", "web1"]);
        assert_eq!(job["state"], "succeeded", "{job}");
        let r = &job["result"];
        assert_eq!(r["whole"], false, "{job}");
        assert!(
            r["changed_bytes"].as_u64().unwrap() <= 16 * MIB as u64,
            "{job}"
        );
        let p = r["point"].as_str().unwrap();
        let src = image(&d.nbd_uri(&format!("web1@{p}")), t.path());
        let dst = image(&d.nbd_uri(&format!("dr/web1@{p}")), t.path());
        assert!(src == dst, "point {p} differs from its source");
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(!fio.is_finished(), "fio ended before the runs did");
    fio.join().expect("fio");

    // Retention: 3 points in the replica; one (the base) in the source.
    assert_eq!(points(&home, "dr/web1").len(), 3);
    assert_eq!(points(&home, "web1").len(), 1);
    let st = run_json(&home, &["replica", "status", "web1"]);
    assert_eq!(st["points"], 3, "{st}");
    assert!(st["lag_secs"].as_u64().unwrap() < 60, "{st}");
    let l = run_json(&home, &["replica", "list"]);
    assert_eq!(l["replicas"][0]["volume"], "local/web1", "{l}");
    let job = run_json(&home, &["replica", "verify", "web1"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["result"]["equal"], true, "{job}");

    // The replica's head is not served nor changed; its points are read.
    let e = run_err(&home, &["vol", "resize", "dr/web1", "--size", "128M"]);
    assert!(e.contains("replica"), "{e}");
    let out = std::process::Command::new(require_tool("qemu-img"))
        .args(["info", &d.nbd_uri("dr/web1")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the replica's head was served");
    let info = run_json(&home, &["vol", "info", "dr/web1"]);
    assert_eq!(info["replica_of"], "local/web1", "{info}");

    // Bad requests, refused with nothing made.
    for (args, says) in [
        (
            &["replica", "add", "web1", "--to", "nowhere"][..],
            "nowhere",
        ),
        (&["replica", "add", "web1", "--to", "dr/other"], "already"),
        (&["replica", "add", "nope", "--to", "dr"], "nope"),
        (&["replica", "status", "nope"], "not replicated"),
        (
            &["vol", "move", "web1", "dr", "--name", "moved"],
            "replicated",
        ),
        (
            &["replica", "add", "dr/web1", "--to", "local/again"],
            "replica",
        ),
    ] {
        let e = run_err(&home, args);
        assert!(e.contains(says), "{args:?}: {e}");
    }
    run_ok(&home, &["vol", "create", "other", "--size", "1M"]);
    let e = run_err(&home, &["replica", "add", "other", "--to", "dr/web1"]);
    assert!(e.contains("another replication"), "{e}");
    run_ok(&home, &["vol", "create", "dr/taken", "--size", "1M"]);
    let e = run_err(&home, &["replica", "add", "other", "--to", "dr/taken"]);
    assert!(e.contains("exists"), "{e}");
    run_ok(&home, &["vol", "delete", "dr/taken"]);
    let e = run_err(
        &home,
        &["replica", "add", "other", "--to", "dr", "--keep", "0"],
    );
    assert!(e.contains("keep"), "{e}");
    assert_eq!(
        run_json(&home, &["vol", "list", "--pool", "dr"])["volumes"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Promote: the replica is its newest point, writable; a write to the
    // source after that point is not in it; replication is over.
    let last = run_json(&home, &["replica", "status", "web1"])["last_point"]
        .as_str()
        .unwrap()
        .to_string();
    let at_last = image(&d.nbd_uri(&format!("web1@{last}")), t.path());
    let (err, _) = nbd_common::raw::write_and_flush(&d.nbd_socket(), "web1", 0, 4096, 0xee);
    assert_eq!(err, 0);
    let v = run_json(&home, &["replica", "promote", "dr/web1"]);
    assert!(v["replica_of"].is_null(), "{v}");
    assert!(image(&d.nbd_uri("dr/web1"), t.path()) == at_last);
    let (err, flush_err) =
        nbd_common::raw::write_and_flush(&d.nbd_socket(), "dr/web1", 4096, 4096, 0x55);
    assert_eq!((err, flush_err), (0, 0));
    let l = run_json(&home, &["replica", "list"]);
    assert!(l["replicas"].as_array().unwrap().is_empty(), "{l}");
    assert!(points(&home, "web1").is_empty());
    drop(d);
}

#[test]
fn a_schedule_runs_by_itself_and_keeps_its_points() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let d = setup(&home, 32, 8);
    run_ok(
        &home,
        &[
            "replica",
            "add",
            "web1",
            "--to",
            "dr/web1-dr",
            "--every",
            "1s",
            "--keep",
            "2",
        ],
    );
    for i in 0..4u8 {
        let (err, _) = nbd_common::raw::write_and_flush(
            &d.nbd_socket(),
            "web1",
            u64::from(i) * 65536,
            4096,
            0x10 + i,
        );
        assert_eq!(err, 0);
        wait_runs(&home, "web1", u64::from(i) + 2, Duration::from_secs(30));
    }
    let st = run_json(&home, &["replica", "status", "web1"]);
    assert_eq!(st["every_secs"], 1, "{st}");
    assert!(st["last_error"].is_null(), "{st}");
    // Removed: no more runs; the replica stays with its points.
    run_ok(&home, &["replica", "remove", "web1"]);
    assert!(points(&home, "web1").is_empty());
    let kept = points(&home, "dr/web1-dr");
    assert_eq!(kept.len(), 2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(points(&home, "dr/web1-dr"), kept);
    let e = run_err(&home, &["replica", "run", "web1"]);
    assert!(e.contains("not replicated"), "{e}");
    drop(d);
}

#[test]
fn an_interrupted_run_goes_on_where_it_stopped() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let d = setup(&home, 256, 256);
    let want = image(&d.nbd_uri("web1"), t.path());

    // Cancelled: the next run goes on from where it got (a progress save
    // every 64 MiB), with the same point. At 32 MB/s the whole run would
    // take 8 s.
    let st = run_json(
        &home,
        &["replica", "add", "web1", "--to", "dr", "--max-rate", "32M"],
    );
    let id = st["job"].as_u64().expect("the first run's job").to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while run_json(&home, &["replica", "status", "web1"])["resume_offset"]
        .as_u64()
        .unwrap_or(0)
        < 64 * MIB as u64
    {
        assert!(Instant::now() < deadline, "no progress saved");
        std::thread::sleep(Duration::from_millis(100));
    }
    run_ok(&home, &["job", "cancel", &id]);
    let e = run_err(&home, &["job", "wait", &id]);
    assert!(e.contains("cancelled"), "{e}");
    let st = run_json(&home, &["replica", "status", "web1"]);
    let resumed_at = st["resume_offset"].as_u64().unwrap();
    assert!(resumed_at >= 64 * MIB as u64, "{st}");
    assert!(st["last_point"].is_null(), "{st}");

    // Killed during the resumed run (after its first progress save): the
    // daemon goes on at its start.
    let job = run_json(&home, &["replica", "run", "web1", "--detach"]);
    let id = job["id"].as_u64().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = run_json(&home, &["replica", "status", "web1"]);
        if st["resume_offset"].as_u64().unwrap() > resumed_at {
            break;
        }
        assert!(Instant::now() < deadline, "no progress saved: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let job = run_json(&home, &["job", "show", &id]);
    assert_eq!(
        job["state"], "running",
        "the run ended before the kill: {job}"
    );
    d.crash();
    let d = Daemon::start(&home, &[]);
    let st = wait_runs(&home, "web1", 1, Duration::from_secs(60));
    let r = &st["last_run"];
    assert_eq!(r["resumed"], true, "{st}");
    assert!(
        r["moved_bytes"].as_u64().unwrap() <= 128 * MIB as u64,
        "the run did not go on where it stopped: {st}"
    );
    assert!(st["last_error"].is_null(), "{st}");
    let p = st["last_point"].as_str().unwrap();
    assert!(image(&d.nbd_uri(&format!("dr/web1@{p}")), t.path()) == want);
    let job = run_json(&home, &["replica", "verify", "web1"]);
    assert_eq!(job["state"], "succeeded", "{job}");
    // The source holds its one point, nothing a crash left.
    assert_eq!(points(&home, "web1"), vec![p.to_string()]);
    assert!(qemu_img_compare(
        &d.nbd_uri("web1"),
        &home.parent().unwrap().join("web1.raw")
    ));
    drop(d);
}
