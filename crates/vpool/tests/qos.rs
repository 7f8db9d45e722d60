//! `vpool vol qos`: fio held to a volume's IOPS limit (within 10% over its
//! run), a limit raised while fio stays connected taking effect at once, a
//! bytes-a-second limit, limits cleared, kept across a restart; bad limits
//! refused.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::time::{Duration, Instant};

use common::{Daemon, run_err, run_json, run_ok};
use nbd_common::clients::fio_iops;

#[test]
fn qos_holds_fio_to_its_limits_and_changes_while_it_runs() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let d = Daemon::start(&home, &[]);
    run_ok(&home, &["vol", "create", "web1", "--size", "64M"]);
    let uri = d.nbd_uri("web1");

    let v = run_json(&home, &["vol", "qos", "web1", "--iops", "200"]);
    assert_eq!(v["qos"]["iops"], 200, "{v}");
    let iops = fio_iops(&uri, "randwrite", "4k", 4, "32M", 6);
    eprintln!("limit 200 IOPS: fio 4k randwrite qd4 got {iops:.1} IOPS");
    assert!(
        (180.0..=220.0).contains(&iops),
        "{iops} IOPS under a limit of 200"
    );

    // Raised while fio runs: its rate follows (3 s at 200, then 5 s at up
    // to 2000).
    let u = uri.clone();
    let fio = std::thread::spawn(move || fio_iops(&u, "randread", "4k", 4, "32M", 8));
    std::thread::sleep(Duration::from_secs(3));
    let raised = Instant::now();
    run_ok(&home, &["vol", "qos", "web1", "--iops", "2000"]);
    let took = raised.elapsed();
    let iops = fio.join().unwrap();
    eprintln!("200 IOPS for 3 s, then 2000: fio got {iops:.1} IOPS over 8 s");
    assert!(iops > 400.0, "{iops} IOPS: the raised limit did not apply");
    assert!(
        took < Duration::from_secs(5),
        "setting the limit took {took:?}"
    );

    // Bytes a second: 4 MB/s of 64 KiB writes is 61 IOPS.
    run_ok(&home, &["vol", "qos", "web1", "--bps", "4000000"]);
    let iops = fio_iops(&uri, "randwrite", "64k", 4, "32M", 5);
    let mbs = iops * 65536.0 / 1e6;
    eprintln!("limit 4 MB/s: fio 64k randwrite qd4 got {mbs:.2} MB/s");
    assert!((3.6..=4.4).contains(&mbs), "{mbs} MB/s under a limit of 4");

    // Kept across a restart; cleared, fio runs free.
    drop(d);
    let d = Daemon::start(&home, &[]);
    let v = run_json(&home, &["vol", "info", "web1"]);
    assert_eq!(v["qos"]["bps"], 4000000, "{v}");
    let v = run_json(&home, &["vol", "qos", "web1", "--clear"]);
    assert!(v["qos"].is_null(), "{v}");
    let iops = fio_iops(&d.nbd_uri("web1"), "randwrite", "4k", 4, "32M", 3);
    eprintln!("no limit: fio 4k randwrite qd4 got {iops:.1} IOPS");
    assert!(iops > 400.0, "{iops} IOPS with no limit");

    for (args, says) in [
        (&["vol", "qos", "web1", "--iops", "0"][..], "0"),
        (&["vol", "qos", "web1", "--burst-iops", "100"], "burst"),
        (
            &["vol", "qos", "web1", "--iops", "100", "--burst-iops", "50"],
            "below",
        ),
        (&["vol", "qos", "nope", "--iops", "100"], "nope"),
        (&["vol", "qos", "web1", "--burst-secs", "5"], "burst"),
    ] {
        let e = run_err(&home, args);
        assert!(e.contains(says), "{args:?}: {e}");
    }
    drop(d);
}
