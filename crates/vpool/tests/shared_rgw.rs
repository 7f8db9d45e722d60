//! Shared pools on RGW (`docs/multi-host.md`): several daemons, each with
//! its own home standing in for a host, attach one pool; each volume is
//! owned by one of them at a time and moves with `vol release` and `vol
//! takeover`, or is taken over once its dead owner's lease expired.
//! Real clients (qemu-img, nbdinfo, raw NBD) read and write through each
//! daemon's one NBD socket.
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
use std::time::{Duration, Instant};

use common::{Daemon, pool_on_s3, run_err, run_json, run_ok};
use nbd_common::clients::{qemu_img_compare, qemu_img_convert_to};
use nbd_common::pattern;
use rgw_env::{RgwEnv as Rgw, rgw_env as rgw};

const MIB: usize = 1 << 20;

/// `pool VERB shared --s3 URL` through the daemon at `home` (`--shared`
/// for `create`; `attach` finds out by itself), its cache in `cache` (1
/// GiB for the host), a lease that expires after `lease_s`.
fn shared_pool(rgw: &Rgw, home: &Path, verb: &str, url: &str, cache: &Path, lease_s: &str) {
    let mut extra = vec![
        "--seal-after",
        "0.5",
        "--lease-expire",
        lease_s,
        "--cache-size",
        "1G",
    ];
    if verb == "create" {
        extra.push("--shared");
    }
    pool_on_s3(home, verb, "shared", url, &rgw.endpoint, cache, &extra);
}

/// `vol status POOL/VOL --json` on `home`.
fn status(home: &Path, vol: &str) -> serde_json::Value {
    run_json(home, &["vol", "status", vol])
}

/// Waits (up to a minute) until what volume `vol` of a shared pool holds
/// on its owner `home` is in the bucket: `vol status` counts no bytes
/// but an open segment's header.
fn wait_uploaded(home: &Path, vol: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = status(home, vol);
        if st["unuploaded_bytes"].as_u64().is_some_and(|b| b < 4096) {
            return;
        }
        assert!(Instant::now() < deadline, "not uploaded in time: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One NBD write and flush; see [`nbd_common::raw::write_and_flush`].
fn nbd_write_and_flush(socket: &Path, export: &str, offset: u64, len: u32, byte: u8) -> (u32, u32) {
    nbd_common::raw::write_and_flush(socket, export, offset, len, byte)
}

/// An NBD client that reads a volume over and over, in 64 KiB reads, until
/// stopped, each read checked against `want` (a failed or wrong read
/// panics the test when it stops); with `write_at`, it also writes the 64
/// KiB of `want` there before each read.
struct NbdReader {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl NbdReader {
    /// Connected when this returns.
    fn start(socket: &Path, export: &str, want: Vec<u8>, write_at: Option<usize>) -> NbdReader {
        use nbd_common::raw::{read_exact, request, simple_reply};
        use std::io::Write;
        use vpool_nbd::proto::{NBD_CMD_READ, NBD_CMD_WRITE};
        const LEN: usize = 65536;
        let mut s = nbd_common::raw::open_export(socket, export);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut reads = 0u64;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(w) = write_at {
                    let mut req = request(NBD_CMD_WRITE, 0, u64::MAX, w as u64, LEN as u32);
                    req.extend_from_slice(&want[w..w + LEN]);
                    s.write_all(&req).unwrap();
                    assert_eq!(simple_reply(&mut s), (0, u64::MAX), "write at {w}");
                }
                let at = (reads as usize * LEN) % want.len();
                s.write_all(&request(NBD_CMD_READ, 0, reads, at as u64, LEN as u32))
                    .unwrap();
                assert_eq!(simple_reply(&mut s), (0, reads), "read at {at}");
                let got = read_exact(&mut s, LEN);
                assert!(got == want[at..at + LEN], "a wrong read at {at}");
                reads += 1;
            }
            reads
        });
        NbdReader { stop, thread }
    }

    /// Stops it; how many reads it made.
    fn stop(self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().expect("the reader failed")
    }
}

/// Two hosts attach one shared pool; each creates a volume; each lists
/// both with their owners; a volume is served only by its owner; it moves
/// by release and takeover with its data; a dead owner's volume is taken
/// over once its lease expired, with every flushed write; a restarted
/// owner serves its volumes again.
#[test]
fn a_shared_pool_s_volumes_move_between_hosts() {
    let Some(rgw) = rgw() else { return };
    let t = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    let url = format!(
        "s3://{}/test-shared-{:x}",
        rgw.bucket,
        rand::random::<u64>()
    );
    let a = Daemon::start(&home_a, &[]);
    let b = Daemon::start(&home_b, &[]);
    shared_pool(&rgw, &home_a, "create", &url, &t.path().join("ca"), "3");
    shared_pool(&rgw, &home_b, "attach", &url, &t.path().join("cb"), "3");
    let pools = run_json(&home_b, &["pool", "list"]);
    let kind = pools["pools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "shared")
        .map(|p| p["kind"].clone());
    assert_eq!(kind, Some("shared".into()), "{pools}");

    // A volume from each host; a name is won once.
    run_ok(&home_a, &["vol", "create", "shared/db1", "--size", "16M"]);
    run_ok(&home_b, &["vol", "create", "shared/web", "--size", "8M"]);
    let e = run_err(&home_b, &["vol", "create", "shared/db1", "--size", "8M"]);
    assert!(e.contains("already"), "{e}");

    // The pool's --cache-size is the host's: the volumes A owns share it,
    // again when one goes.
    const GIB: u64 = 1 << 30;
    let share = |vol: &str| status(&home_a, vol)["cache_size_bytes"].as_u64();
    assert_eq!(share("shared/db1"), Some(GIB));
    run_ok(&home_a, &["vol", "create", "shared/tmp", "--size", "8M"]);
    assert_eq!(
        (share("shared/db1"), share("shared/tmp")),
        (Some(GIB / 2), Some(GIB / 2))
    );
    assert_eq!(
        status(&home_b, "shared/db1")["cache_size_bytes"],
        serde_json::Value::Null
    );
    run_ok(&home_a, &["vol", "delete", "shared/tmp"]);
    assert_eq!(share("shared/db1"), Some(GIB));

    // Both hosts list both volumes, each with its owner.
    for (home, mine) in [(&home_a, "db1"), (&home_b, "web")] {
        let l = run_json(home, &["vol", "list", "--pool", "shared"]);
        let vols = l["shared"].as_array().expect("a shared listing");
        let names: Vec<_> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["db1", "web"], "{l}");
        for v in vols {
            assert_eq!(v["here"], v["name"] == mine, "{l}");
            assert!(v["holder"].is_string() && v["epoch"].is_u64(), "{l}");
            // Taken within the last minutes, by this machine's clock.
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let since = v["since_unix_ms"].as_u64().expect("since when");
            assert!(since <= now_ms && now_ms - since < 600_000, "{l}");
            let durability = if v["here"] == true { "host" } else { "null" };
            assert_eq!(
                v["durability"].to_string().trim_matches('"'),
                durability,
                "{l}"
            );
        }
        assert_eq!(l["volumes"].as_array().unwrap().len(), 1, "{l}");
    }
    let table = run_ok(&home_a, &["vol", "list", "--pool", "shared"]);
    assert!(
        table.contains("OWNER")
            && table.contains("SINCE")
            && table.contains("db1")
            && table.contains("web"),
        "{table}"
    );

    // Written on A, its owner; B does not serve it and says who does.
    let img = t.path().join("image");
    std::fs::write(&img, pattern(16 * MIB, 11)).unwrap();
    qemu_img_convert_to(&img, &a.nbd_uri("shared/db1"));
    let out = std::process::Command::new("nbdinfo")
        .arg(b.nbd_uri("shared/db1"))
        .output()
        .unwrap();
    // (The refusal's text goes in the NBD error reply; nbdinfo shows
    // only its kind.)
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("shared/db1"), "{e}");
    let e = run_err(&home_b, &["vol", "info", "shared/db1"]);
    assert!(e.contains("owned by") && e.contains("takeover"), "{e}");

    // Handover by release: the takeover is at once, the data comes along.
    run_ok(&home_a, &["vol", "release", "shared/db1"]);
    assert!(!t.path().join("ca/vols/db1").exists(), "the cache stays");
    let t0 = Instant::now();
    let st = run_json(&home_b, &["vol", "takeover", "shared/db1"]);
    let took = t0.elapsed();
    assert_eq!(st["here"], true, "{st}");
    assert!(qemu_img_compare(&b.nbd_uri("shared/db1"), &img));
    eprintln!(
        "FIGURE handover: `vol takeover` after `vol release` took {:.2} s",
        took.as_secs_f64()
    );
    assert_eq!(status(&home_a, "shared/db1")["here"], false);

    // A write on B that reached the bucket, then B dies: A takes over
    // once B's lease expired, not before, and has the write. (A write
    // flushed on B but not uploaded yet dies with B under the `host`
    // durability the pools have today: the flush journal of
    // docs/multi-host.md section 4 is not built.)
    assert_eq!(
        nbd_write_and_flush(&b.nbd_socket(), "shared/db1", 0, 65536, 0xbb),
        (0, 0)
    );
    wait_uploaded(&home_b, "shared/db1");
    let holder_b = status(&home_a, "shared/db1")["holder"].clone();
    b.crash();
    let killed = Instant::now();
    let st = run_json(&home_a, &["vol", "takeover", "shared/db1"]);
    assert_eq!(st["here"], true, "{st}");
    assert_ne!(st["holder"], holder_b, "{st}");
    assert!(killed.elapsed() >= Duration::from_secs(3), "before expiry");
    eprintln!(
        "FIGURE takeover: shared/db1 served on A {:.1} s after SIGKILL of its owner (lease 3 s)",
        killed.elapsed().as_secs_f64()
    );
    let mut want = pattern(16 * MIB, 11);
    want[..65536].fill(0xbb);
    std::fs::write(&img, &want).unwrap();
    assert!(qemu_img_compare(&a.nbd_uri("shared/db1"), &img));

    // A restarted owner opens the volumes it owned again.
    assert!(a.terminate().success());
    let a = Daemon::start(&home_a, &[]);
    let st = status(&home_a, "shared/db1");
    assert_eq!(st["here"], true, "{st}");
    assert!(qemu_img_compare(&a.nbd_uri("shared/db1"), &img));
    // Not a shared pool: no takeover.
    let e = run_err(&home_a, &["vol", "takeover", "local/x"]);
    assert!(e.contains("not a shared pool"), "{e}");

    // B comes back with the cache it had of db1, which A owns now: B does
    // not serve it (A renews its lease), and still owns web.
    let b = Daemon::start(&home_b, &[]);
    assert_eq!(status(&home_b, "shared/db1")["here"], false);
    assert_eq!(status(&home_b, "shared/web")["here"], true);
    assert!(
        b.log_text().contains("could not be opened again"),
        "{}",
        b.log_text()
    );
    // A writes more and hands db1 to B, whose stale cache must not win:
    // B serves what A wrote.
    assert_eq!(
        nbd_write_and_flush(&a.nbd_socket(), "shared/db1", 65536, 65536, 0xaa),
        (0, 0)
    );
    run_ok(&home_a, &["vol", "release", "shared/db1"]);
    run_ok(&home_b, &["vol", "takeover", "shared/db1"]);
    want[65536..131072].fill(0xaa);
    std::fs::write(&img, &want).unwrap();
    assert!(qemu_img_compare(&b.nbd_uri("shared/db1"), &img));

    // Snapshots live in the volume's family; a shared pool clones sealed
    // templates only.
    run_ok(&home_b, &["snap", "create", "shared/db1@s1"]);
    assert!(qemu_img_compare(&b.nbd_uri("shared/db1@s1"), &img));
    let e = run_err(&home_b, &["vol", "clone", "shared/db1@s1", "c1"]);
    assert!(e.contains("sealed templates only"), "{e}");

    // Deleting a volume deletes its name, its family and its cache.
    run_ok(&home_b, &["vol", "delete", "shared/web"]);
    assert!(!t.path().join("cb/vols/web").exists());
    let l = run_json(&home_a, &["vol", "list", "--pool", "shared"]);
    let names: Vec<_> = l["shared"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["db1"], "{l}");
    let e = run_err(&home_a, &["vol", "takeover", "shared/web"]);
    assert!(e.contains("no volume web"), "{e}");
    assert!(a.terminate().success());
    assert!(b.terminate().success());
}

/// A template sealed on one host is served read-only by every host from
/// the bucket, with no owner: `vol template` seals the volume, releases it
/// and marks its family sealed; each host reads it through a read-only
/// view of its own (its cache is the host's copy of the template's
/// blocks); writes are refused, nobody takes it over, and a restarted
/// host reads it again. A clone of it is a volume of its own that reads
/// the template where it wrote nothing, and moves between hosts. The
/// template is deleted once its clone is.
#[test]
fn a_sealed_template_is_read_by_every_host() {
    let Some(rgw) = rgw() else { return };
    let t = tempfile::tempdir().unwrap();
    let (home_a, home_b) = (t.path().join("a"), t.path().join("b"));
    let url = common::test_url(&rgw.bucket, "template");
    let a = Daemon::start(&home_a, &[]);
    let b = Daemon::start(&home_b, &[]);
    shared_pool(&rgw, &home_a, "create", &url, &t.path().join("ca"), "3");
    shared_pool(&rgw, &home_b, "attach", &url, &t.path().join("cb"), "3");
    run_ok(
        &home_a,
        &["vol", "create", "shared/golden", "--size", "16M"],
    );
    let img = t.path().join("image");
    std::fs::write(&img, pattern(16 * MIB, 23)).unwrap();
    qemu_img_convert_to(&img, &a.nbd_uri("shared/golden"));
    assert_eq!(status(&home_a, "shared/golden")["sealed"], false);
    // vol import into a shared pool: an import's own NBD export is not
    // served there, so the CLI goes through the API (raw), or a
    // temporary copy and the API (qcow2).
    run_ok(
        &home_a,
        &["vol", "import", "shared/imp", img.to_str().unwrap()],
    );
    assert!(qemu_img_compare(&a.nbd_uri("shared/imp"), &img));
    let qcow2 = t.path().join("image.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&img)
        .arg(&qcow2)
        .status()
        .unwrap();
    assert!(st.success());
    let r = run_json(
        &home_a,
        &["vol", "import", "shared/imp2", qcow2.to_str().unwrap()],
    );
    assert_eq!(r["format"], "qcow2", "{r}");
    assert!(qemu_img_compare(&a.nbd_uri("shared/imp2"), &img));
    for v in ["shared/imp", "shared/imp2"] {
        run_ok(&home_a, &["vol", "delete", v]);
    }

    let info = run_json(&home_a, &["vol", "template", "shared/golden"]);
    assert!(info["template"].is_object(), "{info}");
    for home in [&home_a, &home_b] {
        let st = status(home, "shared/golden");
        assert!(
            st["sealed"] == true && st["here"] == false && st["holder"].is_null(),
            "{st}"
        );
    }
    for d in [&a, &b] {
        assert!(qemu_img_compare(&d.nbd_uri("shared/golden"), &img));
        let (write_err, _) = nbd_write_and_flush(&d.nbd_socket(), "shared/golden", 0, 4096, 1);
        assert_ne!(write_err, 0, "a write to a sealed template was taken");
    }
    let e = run_err(&home_b, &["vol", "takeover", "shared/golden"]);
    assert!(e.contains("sealed template"), "{e}");
    let e = run_err(&home_b, &["vol", "takeover", "shared/golden", "--force"]);
    assert!(e.contains("sealed template"), "{e}");
    // Its API routes have no owner to answer them.
    let e = run_err(&home_a, &["vol", "info", "shared/golden"]);
    assert!(e.contains("sealed template"), "{e}");

    // A clone made on B: a volume of its own, owned by B, that reads the
    // template's blocks where it wrote none.
    run_ok(&home_b, &["vol", "clone", "shared/golden", "shared/web1"]);
    let st = status(&home_b, "shared/web1");
    assert!(st["here"] == true && st["base"] == "golden", "{st}");
    assert!(qemu_img_compare(&b.nbd_uri("shared/web1"), &img));
    // Part of a block (copied up from the template first), whole blocks.
    let sock = b.nbd_socket();
    assert_eq!(
        nbd_write_and_flush(&sock, "shared/web1", 512, 1024, 0xcc),
        (0, 0)
    );
    let at = 8 * MIB;
    assert_eq!(
        nbd_write_and_flush(&sock, "shared/web1", at as u64, 65536, 0xdd),
        (0, 0)
    );
    let mut want = pattern(16 * MIB, 23);
    want[512..1536].fill(0xcc);
    want[at..at + 65536].fill(0xdd);
    let clone_img = t.path().join("clone");
    std::fs::write(&clone_img, &want).unwrap();
    assert!(qemu_img_compare(&b.nbd_uri("shared/web1"), &clone_img));
    assert!(
        qemu_img_compare(&a.nbd_uri("shared/golden"), &img),
        "the template changed"
    );
    let e = run_err(&home_b, &["vol", "template", "shared/web1"]);
    assert!(e.contains("clone"), "{e}");
    // The API's data routes would see only the clone's own blocks.
    let out = t.path().join("export.raw");
    let out = out.to_str().unwrap();
    let e = run_err(&home_b, &["vol", "export", "shared/web1", out]);
    assert!(e.contains("clone of a template"), "{e}");
    assert!(!Path::new(out).exists(), "a failed export left its file");
    let e = run_err(
        &home_b,
        &[
            "vol",
            "resize",
            "shared/web1",
            "--size",
            "8M",
            "--allow-shrink",
        ],
    );
    assert!(e.contains("shrinking"), "{e}");
    let e = run_err(&home_b, &["vol", "clone", "shared/web1", "shared/web2"]);
    assert!(e.contains("not a sealed template"), "{e}");
    // It moves like any volume; A reads it through its own view.
    run_ok(&home_b, &["vol", "release", "shared/web1"]);
    run_ok(&home_a, &["vol", "takeover", "shared/web1"]);
    assert!(qemu_img_compare(&a.nbd_uri("shared/web1"), &clone_img));

    // A restarted host opens its view again; the template is unchanged.
    assert!(b.terminate().success());
    let b = Daemon::start(&home_b, &[]);
    assert!(qemu_img_compare(&b.nbd_uri("shared/golden"), &img));
    assert!(qemu_img_compare(&a.nbd_uri("shared/golden"), &img));
    assert!(status(&home_b, "shared/golden")["holder"].is_null());
    assert!(qemu_img_compare(&a.nbd_uri("shared/web1"), &clone_img));

    // Deleting the template: refused while a clone of it exists; once
    // the clone is flattened or gone, from any host (nobody owns it). The
    // other host's view goes at its next open.
    let e = run_err(&home_b, &["vol", "delete", "shared/golden"]);
    assert!(e.contains("has clones") && e.contains("web1"), "{e}");
    run_ok(&home_b, &["vol", "clone", "shared/golden", "shared/web2"]);
    let e = run_err(&home_b, &["vol", "flatten", "shared/web1"]);
    assert!(e.contains("owned by"), "{e}");
    // Flattened on its owner while a client writes and reads it: it holds
    // every block it reads, so the API's data routes see the whole image.
    let w = 12 * MIB;
    want[w..w + 65536].fill(0x5a);
    std::fs::write(&clone_img, &want).unwrap();
    let reader = NbdReader::start(&a.nbd_socket(), "shared/web1", want.clone(), Some(w));
    let flat = run_json(&home_a, &["vol", "flatten", "shared/web1"]);
    assert!(
        flat["volume"]["name"] == "web1"
            && flat["detached_from"] == "golden"
            && flat["bytes_copied"].as_u64() > Some(0),
        "{flat}"
    );
    assert!(status(&home_a, "shared/web1")["base"].is_null());
    assert!(
        reader.stop() > 0,
        "the client read nothing during the flatten"
    );
    run_ok(&home_a, &["vol", "export", "shared/web1", out]);
    assert!(
        std::fs::read(out).unwrap() == want,
        "the flattened volume misses blocks"
    );
    let e = run_err(&home_a, &["vol", "flatten", "shared/web1"]);
    assert!(e.contains("not a clone"), "{e}");
    let e = run_err(&home_b, &["vol", "delete", "shared/golden"]);
    assert!(
        e.contains("has clones") && e.contains("web2") && !e.contains("web1"),
        "{e}"
    );
    run_ok(&home_b, &["vol", "delete", "shared/web2"]);
    run_ok(&home_b, &["vol", "delete", "shared/golden"]);
    // The flattened clone reads the same without its template, on any
    // host; what the flatten copied was in the bucket when it returned,
    // so its owner may die with its cache at once.
    assert!(qemu_img_compare(&a.nbd_uri("shared/web1"), &clone_img));
    a.crash();
    std::fs::remove_dir_all(t.path().join("ca")).unwrap();
    run_ok(&home_b, &["vol", "takeover", "shared/web1"]);
    assert!(qemu_img_compare(&b.nbd_uri("shared/web1"), &clone_img));
    run_ok(&home_b, &["vol", "delete", "shared/web1"]);
    let l = run_json(&home_b, &["vol", "list", "--pool", "shared"]);
    assert!(l["shared"].as_array().unwrap().is_empty(), "{l}");
    let out = std::process::Command::new("nbdinfo")
        .arg(b.nbd_uri("shared/golden"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "a deleted template was served");
}
