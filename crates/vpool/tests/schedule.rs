//! `vpool schedule`: snapshots every second while fio writes and verifies
//! the volume; retention holds the count, keeps a snapshot a clone needs
//! and never touches the user's own; idle runs are skipped; bad requests.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, run_err, run_json, run_ok};
use nbd_common::clients::qemu_img_info;

/// The names of `volume`'s snapshots that start with `prefix`, sorted.
fn snapshots(home: &Path, volume: &str, prefix: &str) -> Vec<String> {
    let l = run_json(home, &["snap", "list", volume]);
    let mut v: Vec<String> = l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

fn schedule(home: &Path) -> serde_json::Value {
    run_json(home, &["schedule", "list"])["schedules"][0].clone()
}

#[test]
fn a_schedule_snapshots_under_fio_holds_its_count_and_skips_idle_runs() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let d = Daemon::start(&home, &[]);
    run_ok(&home, &["vol", "create", "web1", "--size", "64M"]);
    run_ok(&home, &["snap", "create", "web1@mine-1"]);
    let s = run_json(
        &home,
        &[
            "schedule", "add", "web1", "--every", "1s", "--keep", "3", "--prefix", "mine",
        ],
    );
    assert_eq!(s["volume"], "local/web1", "{s}");
    let id = s["id"].as_u64().unwrap().to_string();

    let uri = d.nbd_uri("web1");
    let fio = std::thread::spawn(move || nbd_common::clients::fio_verify_for(&uri, "16M", 4, 8));
    // A clone of the first scheduled snapshot, as soon as it is there
    // (the next 3 runs would delete it): retention must keep it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(s) = snapshots(&home, "web1", "mine-2").pop() {
            break s;
        }
        assert!(Instant::now() < deadline, "no scheduled snapshot");
        std::thread::sleep(Duration::from_millis(50));
    };
    run_ok(&home, &["vol", "clone", &format!("web1@{first}"), "kid"]);
    let out = fio.join().expect("fio");
    assert!(out.contains("err= 0"), "{out}");
    // Idle from now on: wait for a skipped run.
    let deadline = Instant::now() + Duration::from_secs(20);
    while schedule(&home)["skipped"].as_u64().unwrap() == 0 {
        assert!(Instant::now() < deadline, "no run was skipped");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Three of its own and the one the clone needs; the user's untouched.
    let own = snapshots(&home, "web1", "mine-2");
    assert_eq!(own.len(), 4, "{own:?}");
    assert_eq!(own[0], first);
    assert!(snapshots(&home, "web1", "mine-1") == ["mine-1"]);
    let s = schedule(&home);
    assert!(s["taken"].as_u64().unwrap() >= 5, "{s}");
    assert_eq!(s["snapshots"], 4, "{s}");
    assert!(s["last_error"].is_null(), "{s}");
    let newest = own.last().unwrap().clone();
    let info = qemu_img_info(&d.nbd_uri(&format!("web1@{newest}")));
    assert!(info.contains("67108864"), "{info}");

    // Idle: runs are skipped, nothing is taken.
    let (taken, skipped) = (s["taken"].as_u64().unwrap(), s["skipped"].as_u64().unwrap());
    std::thread::sleep(Duration::from_millis(2500));
    let s = schedule(&home);
    assert_eq!(s["taken"].as_u64().unwrap(), taken, "{s}");
    assert!(s["skipped"].as_u64().unwrap() > skipped, "{s}");
    assert_eq!(s["last_snapshot"].as_str(), Some(newest.as_str()), "{s}");

    // Bad requests.
    for (args, says) in [
        (
            &["schedule", "add", "web1", "--every", "1s", "--keep", "0"][..],
            "keep",
        ),
        (
            &["schedule", "add", "nope", "--every", "1m", "--keep", "3"],
            "nope",
        ),
        (
            &[
                "schedule", "add", "web1", "--every", "1m", "--keep", "3", "--prefix", "replica",
            ],
            "prefix",
        ),
        (
            &[
                "schedule", "add", "web1", "--every", "1m", "--keep", "3", "--prefix", "mine",
            ],
            "already",
        ),
        (
            &["schedule", "add", "web1", "--every", "0s", "--keep", "3"],
            "above 0",
        ),
        (&["schedule", "remove", "99"], "no schedule 99"),
        (
            &[
                "schedule",
                "add",
                "web1",
                "--every",
                "1m",
                "--keep",
                "3",
                "--prefix",
                &"p".repeat(50),
            ],
            "prefix",
        ),
        (
            &["vol", "move", "web1", "local", "--name", "w2"],
            "schedule",
        ),
    ] {
        let e = run_err(&home, args);
        assert!(e.contains(says), "{args:?}: {e}");
    }

    // Removed: its snapshots stay, no more are taken.
    run_ok(&home, &["schedule", "remove", &id]);
    let l = run_json(&home, &["schedule", "list"]);
    assert!(l["schedules"].as_array().unwrap().is_empty(), "{l}");
    let (err, _) = nbd_common::raw::write_and_flush(&d.nbd_socket(), "web1", 0, 4096, 0xab);
    assert_eq!(err, 0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(snapshots(&home, "web1", "mine-2"), own);
    drop(d);
}
