//! Snapshots, templates, clones, diffs and ephemeral volumes against the
//! real daemon (`vpool serve` as a child process), checked with real NBD
//! clients: qemu-img, qemu-io, nbdinfo and nbdsh (libnbd's Python bindings).
//!
//! The client helpers are `vpool-nbd`'s (`crates/vpool-nbd/tests/common/`),
//! shared rather than copied. A missing client binary fails the test with the
//! Debian package to install.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Daemon, run_err, run_json, run_ok};
use nbd_common::clients::{
    nbdinfo, nbdinfo_can, nbdsh_script, qemu_img_compare, qemu_img_convert_to, qemu_io,
};
use nbd_common::pattern;

const MIB: u64 = 1 << 20;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `qemu-img compare` of two NBD exports (the helper's second argument is
/// passed to qemu-img as it is, so a URI works there too).
fn compare_exports(a: &str, b: &str) -> bool {
    qemu_img_compare(a, Path::new(b))
}

fn sha256sum(file: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(file)
        .output()
        .expect("sha256sum (coreutils)");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    format!("sha256:{}", text.split_whitespace().next().unwrap())
}

/// Waits until `cond` holds, failing the test after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An nbdsh client in the background that connects to `URI`, does its
/// `BEFORE` Python, touches `READY`, waits for `GO` to exist, does `AFTER`
/// and disconnects. It lets a test act while a real client holds a volume
/// open.
const HOLDER_SCRIPT: &str = r#"
import os, time, nbd
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
exec(os.environ.get("BEFORE", ""))
open(os.environ["READY"], "w").close()
deadline = time.time() + 60
while not os.path.exists(os.environ["GO"]):
    assert time.time() < deadline, "never told to go"
    time.sleep(0.01)
exec(os.environ.get("AFTER", ""))
h.shutdown()
print("holder done", flush=True)
"#;

struct Holder {
    thread: Option<std::thread::JoinHandle<String>>,
    go: PathBuf,
}

impl Holder {
    /// Starts the holder and waits until it has connected and run `before`.
    fn start(dir: &Path, tag: &str, uri: &str, before: &str, after: &str) -> Holder {
        let ready = dir.join(format!("{tag}.ready"));
        let go = dir.join(format!("{tag}.go"));
        let (uri, before, after) = (uri.to_string(), before.to_string(), after.to_string());
        let (r, g) = (ready.clone(), go.clone());
        let thread = std::thread::spawn(move || {
            nbdsh_script(
                HOLDER_SCRIPT,
                &[
                    ("URI", &uri),
                    ("READY", path_str(&r)),
                    ("GO", path_str(&g)),
                    ("BEFORE", &before),
                    ("AFTER", &after),
                ],
            )
        });
        let mut h = Holder {
            thread: Some(thread),
            go,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if h.thread.as_ref().is_some_and(|t| t.is_finished()) {
                // Surfaces the script's failure.
                h.finish();
                panic!("the holder exited before it was ready");
            }
            assert!(Instant::now() < deadline, "the holder never got ready");
            std::thread::sleep(Duration::from_millis(10));
        }
        h
    }

    /// Lets it run `after` and disconnect; returns its output.
    fn finish(&mut self) -> String {
        std::fs::write(&self.go, b"").unwrap();
        let out = self
            .thread
            .take()
            .expect("finished once")
            .join()
            .expect("the holder script failed");
        assert!(out.contains("holder done"), "{out}");
        out
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // Never leave the client waiting on a failed test.
        let _ = std::fs::write(&self.go, b"");
    }
}

#[test]
fn snapshot_export_is_read_only_and_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let size = 8 * MIB;
    d.client().create_volume("web1", size).unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(size as usize, 5)).unwrap();
    qemu_img_convert_to(&src, &d.nbd_uri("web1"));

    // A snapshot, and a copy exported at the same moment.
    run_ok(&pool, &["snap", "create", "web1@s1"]);
    let copy = dir.path().join("copy.raw");
    run_ok(&pool, &["vol", "export", "web1", path_str(&copy)]);
    // More writes after it, by a real client.
    qemu_io(
        &d.nbd_uri("web1"),
        &["write -P 0x77 1M 64k", "discard 4M 1M", "write -z 6M 64k"],
    );

    let snap = d.nbd_uri("web1@s1");
    assert!(
        qemu_img_compare(&snap, &copy),
        "the snapshot export differs from the copy taken at snapshot time"
    );
    assert!(
        !qemu_img_compare(&d.nbd_uri("web1"), &copy),
        "the live volume should have moved on"
    );
    // A later export of the snapshot itself is that copy too.
    let again = dir.path().join("again.raw");
    run_ok(&pool, &["vol", "export", "web1@s1", path_str(&again)]);
    assert!(std::fs::read(&again).unwrap() == std::fs::read(&copy).unwrap());

    // Read-only: advertised, and enforced by the server.
    assert!(!nbdinfo_can(&snap, "--can", "write"));
    assert!(nbdinfo_can(&snap, "--is", "read-only"));
    assert!(!nbdinfo_can(&d.nbd_uri("web1"), "--is", "read-only"));
    let list = nbdinfo(&["--list", &d.nbd_uri("")]);
    assert!(list.contains("export=\"web1@s1\""), "{list}");
    assert!(
        list.contains("vpool snapshot s1 of volume web1 (read-only)"),
        "{list}"
    );
    let out = nbdsh_script(
        READ_ONLY_SCRIPT,
        &[
            ("URI", &snap),
            ("MISSING", &d.nbd_uri("web1@nope")),
            ("SIZE", &size.to_string()),
        ],
    );
    assert!(out.contains("read-only ok"), "{out}");
    assert!(qemu_img_compare(&snap, &copy), "a refused write changed it");
    assert!(d.terminate().success());
}

/// Against a read-only export: every write-type request fails with EPERM
/// (strict mode off, so the requests reach the server), reads and flushes
/// work; an unknown snapshot export is refused at connect.
const READ_ONLY_SCRIPT: &str = r#"
import errno, os, nbd

def expect_eperm(fn, what):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno in (errno.EPERM, "EPERM"), "%s: got %s (%s)" % (what, e.errno, e)
        return
    raise AssertionError("%s: no error" % what)

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(os.environ["URI"])
assert h.is_read_only()
assert h.get_size() == int(os.environ["SIZE"])
before = h.pread(65536, 1 << 20)
expect_eperm(lambda: h.pwrite(b"\x01" * 4096, 1 << 20), "write")
expect_eperm(lambda: h.zero(4096, 1 << 20), "write zeroes")
expect_eperm(lambda: h.trim(4096, 1 << 20), "trim")
h.flush()
assert h.pread(65536, 1 << 20) == before
h.shutdown()
try:
    g = nbd.NBD()
    g.connect_uri(os.environ["MISSING"])
    raise AssertionError("connected to a missing snapshot")
except nbd.Error:
    pass
print("read-only ok")
"#;

#[test]
fn import_diff_reproduces_the_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let size = 16 * MIB;
    d.client().create_volume("web1", size).unwrap();
    let src = dir.path().join("src.img");
    std::fs::write(&src, pattern(size as usize, 9)).unwrap();
    qemu_img_convert_to(&src, &d.nbd_uri("web1"));
    run_ok(&pool, &["snap", "create", "web1@a"]);
    // Data, a discard, allocated zeros, a partial block, then growth.
    qemu_io(
        &d.nbd_uri("web1"),
        &[
            "write -P 0x42 3M 256k",
            "discard 8M 1M",
            "write -z 12M 64k",
            "write -P 0x43 66048 512",
        ],
    );
    run_ok(&pool, &["vol", "resize", "web1", "--size", "24M"]);
    qemu_io(&d.nbd_uri("web1"), &["write -P 0x44 20M 128k"]);
    run_ok(&pool, &["snap", "create", "web1@b"]);
    // The live volume moves on; the diff is between the snapshots.
    qemu_io(&d.nbd_uri("web1"), &["write -P 0x45 0 64k"]);

    let vdiff = dir.path().join("a-b.vdiff");
    let r = run_json(
        &pool,
        &["vol", "export-diff", "web1@a", "web1@b", path_str(&vdiff)],
    );
    let file_bytes = r["file_bytes"].as_u64().unwrap();
    assert!(
        file_bytes < 2 * MIB,
        "the diff should hold the changes only, not {file_bytes} bytes"
    );

    // An independent copy of web1@a, made by a real client through NBD.
    d.client().create_volume("copy", size).unwrap();
    qemu_img_convert_to(Path::new(&d.nbd_uri("web1@a")), &d.nbd_uri("copy"));
    let b = d.nbd_uri("web1@b");
    assert!(
        !compare_exports(&d.nbd_uri("copy"), &b),
        "nothing to apply?"
    );
    run_ok(&pool, &["vol", "import-diff", "copy", path_str(&vdiff)]);
    assert!(
        compare_exports(&d.nbd_uri("copy"), &b),
        "import-diff onto web1@a did not give web1@b"
    );
    let info = d.client().volume_info("copy").unwrap();
    assert_eq!(info.size_bytes, 24 * MIB);
    // And the same against a raw export of web1@b.
    let braw = dir.path().join("b.raw");
    run_ok(&pool, &["vol", "export", "web1@b", path_str(&braw)]);
    assert!(qemu_img_compare(&d.nbd_uri("copy"), &braw));
    assert!(!qemu_img_compare(&d.nbd_uri("web1"), &braw));
    assert!(d.terminate().success());
}

#[test]
fn ephemeral_volume_goes_with_its_last_client() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(
        &pool,
        &["vol", "create", "scratch", "--size", "8M", "--ephemeral"],
    );
    let uri = d.nbd_uri("scratch");
    let exists = || d.client().volume_info("scratch").is_ok();

    // Probing it (nbdinfo --list asks NBD_OPT_INFO of every export) is not
    // using it: it stays.
    let list = nbdinfo(&["--list", &d.nbd_uri("")]);
    assert!(list.contains("export=\"scratch\""), "{list}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        exists(),
        "an NBD_OPT_INFO probe deleted the ephemeral volume"
    );

    // Two clients: it stays while one is still connected.
    let mut holder = Holder::start(
        dir.path(),
        "h",
        &uri,
        "h.pwrite(b'\\x5a' * 4096, 0)",
        "assert h.pread(4096, 0) == b'\\x5a' * 4096",
    );
    // (The second reads: one client writes a volume at a time.)
    qemu_io(&uri, &["read -P 0 1M 64k", "read -P 0x5a 0 4k"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(exists(), "deleted while a client still had it open");
    holder.finish();
    wait_for(
        "the ephemeral volume to be deleted after its last client left",
        Duration::from_secs(10),
        || !exists(),
    );
    let err = run_err(&pool, &["vol", "info", "scratch"]);
    assert!(err.contains("not found"), "{err}");
    assert!(
        d.log_text()
            .contains("deleted ephemeral volume: its last NBD client disconnected"),
        "{}",
        d.log_text()
    );
    // A plain volume stays after its clients leave.
    d.client().create_volume("plain", MIB).unwrap();
    qemu_io(&d.nbd_uri("plain"), &["write -P 1 0 4k"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.client().volume_info("plain").is_ok());
    assert!(d.terminate().success());
}

#[test]
fn rollback_waits_for_writers_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    d.client().create_volume("web1", 4 * MIB).unwrap();
    qemu_io(&d.nbd_uri("web1"), &["write -P 0x11 0 64k"]);
    run_ok(&pool, &["snap", "create", "web1@s"]);

    // A reader of the snapshot export does not hold up a rollback.
    let mut reader = Holder::start(
        dir.path(),
        "r",
        &d.nbd_uri("web1@s"),
        "assert h.pread(4096, 0) == b'\\x11' * 4096",
        "",
    );
    run_ok(&pool, &["snap", "rollback", "web1@s"]);

    // A writer does: the rollback is refused, naming the flag.
    let mut writer = Holder::start(
        dir.path(),
        "w",
        &d.nbd_uri("web1"),
        "h.pwrite(b'\\x22' * 4096, 0); h.flush()",
        "got = h.pread(4096, 0)\nassert got == b'\\x11' * 4096, 'after the forced rollback: %r' % got[:4]\nprint('saw the rollback')",
    );
    let err = run_err(&pool, &["snap", "rollback", "web1@s"]);
    assert!(
        err.contains("open for writing by 1 NBD client") && err.contains("--force"),
        "{err}"
    );
    let out = common::run(&pool, &["snap", "rollback", "web1@s", "--json"]);
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["error"]["kind"], "in_use");
    assert_eq!(
        d.client().read("web1", 0, 4096).unwrap(),
        vec![0x22; 4096],
        "a refused rollback changed the volume"
    );
    // Forced: the client's disk changes under it.
    run_ok(&pool, &["snap", "rollback", "web1@s", "--force"]);
    let out = writer.finish();
    assert!(out.contains("saw the rollback"), "{out}");
    reader.finish();
    // Once the writer is gone, no force needed.
    qemu_io(&d.nbd_uri("web1"), &["write -P 0x33 0 4k"]);
    wait_for("the writers to be gone", Duration::from_secs(10), || {
        common::run(&pool, &["snap", "rollback", "web1@s"])
            .status
            .success()
    });
    assert_eq!(d.client().read("web1", 0, 4096).unwrap(), vec![0x11; 4096]);
    assert!(d.terminate().success());
}

/// Delete, import (which zeroes and rewrites the disk), import-diff and
/// shrinking under a running VM's writes are refused unless forced, as
/// rollback and commit are.
#[test]
fn destructive_commands_wait_for_writers_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    d.client().create_volume("web1", 4 * MIB).unwrap();
    let img = dir.path().join("img.raw");
    std::fs::write(&img, vec![0x44u8; MIB as usize]).unwrap();
    run_ok(&pool, &["snap", "create", "web1@a"]);
    d.client()
        .write("web1", 8192, &[0x33; 4096], false)
        .unwrap();
    let diff = dir.path().join("d.vdiff");
    run_ok(
        &pool,
        &["vol", "export-diff", "web1@a", "web1", path_str(&diff)],
    );
    let mut writer = Holder::start(
        dir.path(),
        "w",
        &d.nbd_uri("web1"),
        "h.pwrite(b'\\x22' * 4096, 0); h.flush()",
        "",
    );
    let refused: [&[&str]; 4] = [
        &["vol", "delete", "web1"],
        // --force to replace an existing volume's content; the daemon still
        // refuses while a client writes.
        &["vol", "import", "web1", path_str(&img), "--force"],
        &["vol", "import-diff", "web1", path_str(&diff)],
        &["vol", "resize", "web1", "--size", "1M", "--allow-shrink"],
    ];
    for args in refused {
        let err = run_err(&pool, args);
        assert!(
            err.contains("open for writing by 1 NBD client") && err.contains("--force"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(d.client().read("web1", 0, 4096).unwrap(), vec![0x22; 4096]);
    assert_eq!(d.client().volume_info("web1").unwrap().size_bytes, 4 * MIB);
    // Growing changes nothing the VM has: no force needed.
    run_ok(&pool, &["vol", "resize", "web1", "--size", "8M"]);
    run_ok(
        &pool,
        &[
            "vol",
            "import",
            "web1",
            path_str(&img),
            "--force",
            "--force",
        ],
    );
    assert_eq!(d.client().read("web1", 0, 4096).unwrap(), vec![0x44; 4096]);
    run_ok(&pool, &["vol", "delete", "web1", "--force"]);
    writer.finish();
    assert!(d.terminate().success());
}

#[test]
fn template_refuses_nbd_writes_and_clones_work() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let size = 8 * MIB;
    d.client().create_volume("debian12", size).unwrap();
    let src = dir.path().join("gold.img");
    std::fs::write(&src, pattern(size as usize, 12)).unwrap();
    qemu_img_convert_to(&src, &d.nbd_uri("debian12"));

    // Sealing is refused while a client has it open for writing.
    let mut writer = Holder::start(dir.path(), "w", &d.nbd_uri("debian12"), "", "");
    let err = run_err(&pool, &["vol", "template", "debian12"]);
    assert!(err.contains("NBD client"), "{err}");
    writer.finish();
    wait_for("the writer to be gone", Duration::from_secs(10), || {
        common::run(&pool, &["vol", "template", "debian12"])
            .status
            .success()
    });
    let info = run_json(&pool, &["vol", "info", "debian12"]);
    assert_eq!(info["template"]["digest"], sha256sum(&src).as_str());

    // Exported read-only; writes that reach the server get EPERM.
    let t = d.nbd_uri("debian12");
    assert!(nbdinfo_can(&t, "--is", "read-only"));
    assert!(!nbdinfo_can(&t, "--can", "write"));
    let out = nbdsh_script(
        READ_ONLY_SCRIPT,
        &[
            ("URI", &t),
            ("MISSING", &d.nbd_uri("debian12@nope")),
            ("SIZE", &size.to_string()),
        ],
    );
    assert!(out.contains("read-only ok"), "{out}");
    let list = nbdinfo(&["--list", &d.nbd_uri("")]);
    assert!(
        list.contains("vpool template debian12 (read-only)"),
        "{list}"
    );
    assert!(qemu_img_compare(&t, &src), "the template changed");

    // A clone of it: its content, and writable.
    run_ok(&pool, &["vol", "clone", "debian12", "web2"]);
    let w = d.nbd_uri("web2");
    assert!(!nbdinfo_can(&w, "--is", "read-only"));
    assert!(qemu_img_compare(&w, &src));
    qemu_io(&w, &["write -P 0x99 0 64k", "read -P 0x99 0 64k"]);
    assert!(!qemu_img_compare(&w, &src));
    assert!(
        qemu_img_compare(&t, &src),
        "a clone's write reached the template"
    );
    // A clone of the clone.
    run_ok(&pool, &["snap", "create", "web2@s"]);
    run_ok(&pool, &["vol", "clone", "web2@s", "web3"]);
    assert!(compare_exports(&d.nbd_uri("web3"), &w));
    assert!(d.terminate().success());
}

/// One writer at a time: while one client (nbdsh) has written the volume
/// and stays connected, another process's write (qemu-io) waits; reads
/// never do; once the first disconnects the second's write goes through.
/// `vol share` lets both write at once.
#[test]
fn a_second_writer_waits_for_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "web1", "--size", "4M"]);
    let uri = d.nbd_uri("web1");
    let write_a = "h.pwrite(b'\\x11' * 4096, 0); h.flush()";
    let mut a = Holder::start(dir.path(), "a", &uri, write_a, "");
    qemu_io(&uri, &["read -P 0x11 0 4k"]);
    // vol info names the writer.
    let info = run_json(&pool, &["vol", "info", "web1"]);
    let writer = info["writer"].as_str().expect("a writer");
    assert!(writer.starts_with("unix pid "), "{info}");
    let u = uri.clone();
    let started = Instant::now();
    let b = std::thread::spawn(move || qemu_io(&u, &["write -P 0x22 0 4k"]));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!b.is_finished(), "the second writer did not wait");
    a.finish();
    b.join()
        .expect("the second writer failed after the first left");
    let info = run_json(&pool, &["vol", "info", "web1"]);
    assert!(
        info.get("writer").is_none(),
        "the writer outlived its client: {info}"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(d.client().read("web1", 0, 4096).unwrap(), vec![0x22; 4096]);
    let log = d.log_text();
    assert!(log.contains("a second client writes the volume"), "{log}");

    // Shared: both write at once.
    let j = run_json(&pool, &["vol", "share", "web1"]);
    assert_eq!(j["multi_writer"], true);
    let mut a = Holder::start(dir.path(), "a2", &uri, write_a, "");
    let started = Instant::now();
    qemu_io(&uri, &["write -P 0x44 4k 4k"]);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "a shared volume made the writer wait"
    );
    a.finish();
    assert_eq!(
        d.client().read("web1", 0, 8192).unwrap()[4096..],
        [0x44; 4096]
    );
    let j = run_json(&pool, &["vol", "share", "web1", "--off"]);
    assert!(j.get("multi_writer").is_none(), "{j}");
    assert!(d.terminate().success());
}

/// `vol rename`: the data (read by qemu-io under the new name), snapshots
/// and their times, a clone's link to its parent, QoS limits and snapshot
/// schedules go with the volume, and stay after a restart (the log's
/// rename record replayed); the old name is gone. Refused while a client
/// (nbdsh) holds the volume open, onto a name in use, and into another pool.
#[test]
fn rename_keeps_all_but_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "web1", "--size", "4M"]);
    qemu_io(&d.nbd_uri("web1"), &["write -P 0x5a 0 64k"]);
    run_ok(&pool, &["snap", "create", "web1@s1"]);
    run_ok(&pool, &["vol", "clone", "web1@s1", "c1"]);
    run_ok(&pool, &["vol", "qos", "web1", "--iops", "5000"]);
    run_ok(
        &pool,
        &["schedule", "add", "web1", "--every", "1h", "--keep", "3"],
    );
    let created =
        run_json(&pool, &["snap", "list", "web1"])["snapshots"][0]["created_unix_ms"].clone();
    assert!(created.is_u64(), "{created}");

    let mut h = Holder::start(dir.path(), "h", &d.nbd_uri("web1"), "", "");
    let err = run_err(&pool, &["vol", "rename", "web1", "web-prod"]);
    assert!(err.contains("open by 1 NBD client"), "{err}");
    h.finish();
    let err = run_err(&pool, &["vol", "rename", "web1", "c1"]);
    assert!(err.contains("already exists"), "{err}");
    let err = run_err(&pool, &["vol", "rename", "web1", "other/web1"]);
    assert!(err.contains("vpool vol move"), "{err}");
    let err = run_err(&pool, &["vol", "rename", "web1", ".hidden"]);
    assert!(err.contains("volume name"), "{err}");

    assert_eq!(
        run_ok(&pool, &["vol", "rename", "web1", "web-prod"]),
        "renamed volume web1 to web-prod\n"
    );
    // The default pool named on the new name's side is the same pool.
    run_ok(&pool, &["vol", "rename", "web-prod", "local/web-prod"]);
    let check = |d: &Daemon| {
        let info = run_json(&pool, &["vol", "info", "web-prod"]);
        assert_eq!(info["qos"]["iops"], 5000, "{info}");
        let snaps = run_json(&pool, &["snap", "list", "web-prod"]);
        assert_eq!(snaps["snapshots"][0]["name"], "s1", "{snaps}");
        assert_eq!(snaps["snapshots"][0]["created_unix_ms"], created, "{snaps}");
        assert_eq!(
            run_json(&pool, &["vol", "info", "c1"])["parent"],
            "web-prod@s1"
        );
        let s = run_json(&pool, &["schedule", "list"]);
        assert_eq!(s["schedules"][0]["volume"], "local/web-prod", "{s}");
        qemu_io(&d.nbd_uri("web-prod"), &["read -P 0x5a 0 64k"]);
        qemu_io(&d.nbd_uri("c1"), &["read -P 0x5a 0 64k"]);
        let err = run_err(&pool, &["vol", "info", "web1"]);
        assert!(err.contains("not found"), "{err}");
        let old = std::process::Command::new("nbdinfo")
            .arg(d.nbd_uri("web1"))
            .output()
            .expect("nbdinfo");
        assert!(!old.status.success(), "the old name is still served");
        let list = nbdinfo(&["--list", &d.nbd_uri("")]);
        assert!(list.contains("export=\"web-prod\""), "{list}");
    };
    check(&d);
    assert!(d.terminate().success());
    let d = Daemon::start(&pool, &[]);
    check(&d);
    assert!(d.terminate().success());
}

/// `vol trash`: a volume moved there frees its name at once and is served
/// no more, while a clone of its snapshot keeps reading it; `restore`
/// brings it back with its data and records (read by qemu-io), also
/// after a restart and under another name; two of one name need `--id`;
/// `rm` and `purge` keep a volume whose snapshots have clones, and delete
/// the rest. Refused while a client (nbdsh) holds the volume, and while a
/// snapshot schedule names it.
#[test]
fn trash_frees_the_name_and_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "web1", "--size", "4M"]);
    qemu_io(&d.nbd_uri("web1"), &["write -P 0x61 0 64k"]);
    run_ok(&pool, &["snap", "create", "web1@s"]);
    run_ok(&pool, &["vol", "clone", "web1@s", "c1"]);
    run_ok(&pool, &["vol", "qos", "web1", "--iops", "100"]);

    let mut h = Holder::start(dir.path(), "h", &d.nbd_uri("web1"), "", "");
    let err = run_err(&pool, &["vol", "trash", "mv", "web1"]);
    assert!(err.contains("open by 1 NBD client"), "{err}");
    h.finish();
    run_ok(
        &pool,
        &["schedule", "add", "web1", "--every", "1h", "--keep", "1"],
    );
    let err = run_err(&pool, &["vol", "trash", "mv", "web1"]);
    assert!(err.contains("schedule remove"), "{err}");
    let sid = run_json(&pool, &["schedule", "list"])["schedules"][0]["id"].to_string();
    run_ok(&pool, &["schedule", "remove", &sid]);

    let first = run_json(&pool, &["vol", "trash", "mv", "web1"]);
    assert_eq!(first["name"], "web1", "{first}");
    let id1 = first["id"].as_u64().unwrap();
    // Gone from every listing, from NBD and from the API, reserved name
    // included; the clone still reads its parent's blocks.
    assert!(!run_ok(&pool, &["vol", "list"]).contains("web1"));
    let list = nbdinfo(&["--list", &d.nbd_uri("")]);
    assert!(!list.contains("web1") && !list.contains(".trash"), "{list}");
    for name in ["web1".to_string(), format!(".trash.{id1}")] {
        let out = std::process::Command::new("nbdinfo")
            .arg(d.nbd_uri(&name))
            .output()
            .expect("nbdinfo");
        assert!(!out.status.success(), "{name} is served");
        let err = run_err(&pool, &["vol", "info", &name]);
        assert!(
            err.contains("not found") || err.contains("no volume"),
            "{err}"
        );
    }
    qemu_io(&d.nbd_uri("c1"), &["read -P 0x61 0 64k"]);
    let err = run_err(&pool, &["vol", "commit", "c1"]);
    assert!(err.contains("in the trash"), "{err}");
    let trashed = format!(".trash.{id1}");
    let err = run_err(
        &pool,
        &["schedule", "add", &trashed, "--every", "1h", "--keep", "1"],
    );
    assert!(
        err.contains("reserved") || err.contains("not found"),
        "{err}"
    );

    // The name is free: a new web1, trashed too.
    run_ok(&pool, &["vol", "create", "web1", "--size", "4M"]);
    qemu_io(&d.nbd_uri("web1"), &["write -P 0x62 0 64k"]);
    let id2 = run_json(&pool, &["vol", "trash", "mv", "web1"])["id"]
        .as_u64()
        .unwrap();
    let ls = run_ok(&pool, &["vol", "trash", "ls"]);
    assert!(ls.starts_with("ID") && ls.contains("TRASHED (UTC)"), "{ls}");
    let ls = run_json(&pool, &["vol", "trash", "ls"]);
    assert_eq!(ls["trash"][0]["id"], id1, "{ls}");
    assert_eq!(ls["trash"][0]["clones"], serde_json::json!(["c1"]), "{ls}");
    assert_eq!(ls["trash"][1]["id"], id2, "{ls}");

    let err = run_err(&pool, &["vol", "trash", "restore", "web1"]);
    assert!(err.contains("--id"), "{err}");
    let err = run_err(
        &pool,
        &["vol", "trash", "rm", "web1", "--id", &id1.to_string()],
    );
    assert!(err.contains("c1"), "{err}");
    let r = run_json(&pool, &["vol", "trash", "purge"]);
    assert_eq!(r["purged"][0]["id"], id2, "{r}");
    assert_eq!(r["kept"][0]["id"], id1, "{r}");

    // Restore under another name: data, snapshot, clone link and QoS.
    let args = ["vol", "trash", "restore", "web1", "--name", "web-old"];
    assert_eq!(run_json(&pool, &args)["name"], "web-old");
    qemu_io(&d.nbd_uri("web-old"), &["read -P 0x61 0 64k"]);
    assert_eq!(
        run_json(&pool, &["vol", "info", "web-old"])["qos"]["iops"],
        100
    );
    assert_eq!(
        run_json(&pool, &["vol", "info", "c1"])["parent"],
        "web-old@s"
    );

    // In the trash across a restart, then restored under its own name.
    run_ok(&pool, &["vol", "trash", "mv", "web-old"]);
    assert!(d.terminate().success());
    let d = Daemon::start(&pool, &[]);
    let ls = run_json(&pool, &["vol", "trash", "ls"]);
    assert_eq!(ls["trash"][0]["name"], "web-old", "{ls}");
    run_ok(&pool, &["vol", "trash", "restore", "web-old"]);
    qemu_io(&d.nbd_uri("web-old"), &["read -P 0x61 0 64k"]);

    // Purge by age: not yet old enough, then everything.
    run_ok(&pool, &["vol", "delete", "c1"]);
    run_ok(&pool, &["vol", "trash", "mv", "web-old"]);
    let r = run_json(&pool, &["vol", "trash", "purge", "--older-than", "1h"]);
    assert_eq!(r["purged"], serde_json::json!([]), "{r}");
    let r = run_json(&pool, &["vol", "trash", "purge"]);
    assert_eq!(r["purged"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(
        run_ok(&pool, &["vol", "trash", "ls"]),
        "the trash is empty\n"
    );

    // Expiry: the daemon deletes it on its own, once its time has come.
    run_ok(&pool, &["vol", "create", "old1", "--size", "4M"]);
    let e = run_json(&pool, &["vol", "trash", "mv", "old1", "--expire", "2s"]);
    let (at, until) = (
        e["trashed_unix_ms"].as_u64().unwrap(),
        e["expires_unix_ms"].as_u64().unwrap(),
    );
    assert!(until >= at + 2000, "{e}");
    assert!(run_ok(&pool, &["vol", "trash", "ls"]).contains("old1"));
    wait_for("the expired volume to go", Duration::from_secs(20), || {
        run_json(&pool, &["vol", "trash", "ls"])["trash"] == serde_json::json!([])
    });
    assert!(d.log_text().contains("expired: deleted from the trash"));
    assert!(d.terminate().success());
}

/// `vol du`, `vol ls -l` and `vol status`, with data written by qemu-io and
/// clients held open by nbdsh: space per image (exclusive = what deleting
/// it frees), what each volume is, and who has it open.
#[test]
fn du_long_listing_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "web1", "--size", "8M"]);
    let uri = d.nbd_uri("web1");
    qemu_io(&uri, &["write -P 0x11 0 1M"]);
    run_ok(&pool, &["snap", "create", "web1@s1"]);
    // 1 MiB only the volume has, and 64 KiB of the snapshot's it replaced.
    qemu_io(&uri, &["write -P 0x22 1M 1M", "write -P 0x33 0 64k"]);
    run_ok(&pool, &["vol", "clone", "web1@s1", "c1"]);
    run_ok(&pool, &["vol", "create", "gold", "--size", "4M"]);
    run_ok(&pool, &["vol", "template", "gold"]);

    let du = run_json(&pool, &["vol", "du", "web1"]);
    let images = du["images"].as_array().unwrap();
    assert_eq!(images.len(), 2, "{du}");
    assert_eq!(images[0]["name"], "web1@s1");
    assert_eq!(images[0]["used_bytes"], MIB);
    assert_eq!(images[0]["exclusive_bytes"], 0, "the clone shares it: {du}");
    assert_eq!(images[1]["name"], "web1");
    assert_eq!(images[1]["provisioned_bytes"], 8 * MIB);
    assert_eq!(images[1]["used_bytes"], 2 * MIB);
    assert_eq!(images[1]["exclusive_bytes"], MIB + 64 * 1024, "{du}");
    assert!(du.get("total").is_none(), "{du}");
    let all = run_json(&pool, &["vol", "du"]);
    let pool_info = run_json(&pool, &["pool", "info"]);
    assert_eq!(
        all["total"]["provisioned_bytes"],
        8 * MIB + 8 * MIB + 4 * MIB,
        "{all}"
    );
    assert_eq!(
        all["total"]["used_bytes"], pool_info["live_data_bytes"],
        "{all}"
    );
    let text = run_ok(&pool, &["vol", "du"]);
    assert!(
        text.starts_with("NAME") && text.contains("<TOTAL>"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("web1@s1") && l.contains("1 MiB")),
        "{text}"
    );

    // A writer (nbdsh) and a reader of a snapshot (nbdsh) on web1.
    let mut w = Holder::start(dir.path(), "w", &uri, "h.pwrite(b'\\x44' * 4096, 0)", "");
    let mut r = Holder::start(dir.path(), "r", &d.nbd_uri("web1@s1"), "", "");
    let st = run_json(&pool, &["vol", "status", "web1"]);
    let clients = st["clients"].as_array().unwrap();
    assert_eq!(clients.len(), 2, "{st}");
    assert_eq!(clients[0]["image"], "web1");
    assert_eq!(clients[0]["read_only"], false);
    assert!(
        clients[0]["peer"]
            .as_str()
            .unwrap()
            .starts_with("unix pid "),
        "{st}"
    );
    assert_eq!(clients[1]["image"], "web1@s1");
    assert_eq!(clients[1]["read_only"], true);
    assert!(
        st["writer"].as_str().unwrap().starts_with("unix pid "),
        "{st}"
    );
    let text = run_ok(&pool, &["vol", "status", "web1"]);
    assert!(
        text.contains("2 NBD client(s)") && text.contains("read-only"),
        "{text}"
    );
    let long = run_ok(&pool, &["vol", "ls", "-l"]);
    let row = |name: &str| {
        long.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {long}"))
            .to_string()
    };
    assert!(
        long.starts_with("NAME") && long.contains("WRITER"),
        "{long}"
    );
    assert!(row("web1").contains("unix pid"), "{long}");
    let lj = run_json(&pool, &["vol", "ls", "-l"]);
    let web1 = (lj["volumes"].as_array().unwrap().iter())
        .find(|v| v["name"] == "web1")
        .unwrap()
        .clone();
    assert_eq!(web1["clients"].as_array().unwrap().len(), 2, "{lj}");
    assert!(row("c1").contains("web1@s1"), "{long}");
    assert!(row("gold").contains("template"), "{long}");
    w.finish();
    r.finish();
    let st = run_json(&pool, &["vol", "status", "web1"]);
    assert_eq!(st["clients"], serde_json::json!([]), "{st}");
    assert!(run_ok(&pool, &["vol", "status", "web1"]).contains("no NBD clients"));
    assert!(d.terminate().success());
}

/// `vol bench`: a write bench over NBD (its own client, two connections)
/// writes what it says and is durable (counted in the pool), a read bench
/// reads; a write bench over data is refused without --force.
#[test]
fn bench_runs_over_nbd() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "b1", "--size", "16M"]);
    let args = [
        "vol",
        "bench",
        "b1",
        "--io-size",
        "64K",
        "--io-threads",
        "2",
        "--io-total",
        "4M",
        "--io-pattern",
        "seq",
    ];
    let r = run_json(&pool, &args);
    assert_eq!(r["ops"], 64, "{r}");
    assert_eq!(r["bytes"], 4 * MIB, "{r}");
    assert!(r["ops_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["latency_p99_us"].as_u64().unwrap() <= r["latency_max_us"].as_u64().unwrap());
    // Sequential 64 KiB writes over the first 4 MiB: all of it written,
    // and none of it zeros (qemu-img sees data there).
    assert_eq!(
        run_json(&pool, &["vol", "info", "b1"])["allocated_bytes"],
        4 * MIB
    );
    let map = nbd_common::clients::qemu_img_map(&d.nbd_uri("b1"));
    let data: u64 = (map.iter())
        .filter(|(_, _, data, zero)| *data && !*zero)
        .map(|(_, len, _, _)| len)
        .sum();
    assert_eq!(data, 4 * MIB, "{map:?}");
    let err = run_err(&pool, &args);
    assert!(err.contains("--force"), "{err}");
    let mut forced = args.to_vec();
    forced.push("--force");
    assert_eq!(run_json(&pool, &forced)["ops"], 64);
    let text = run_ok(
        &pool,
        &[
            "vol",
            "bench",
            "b1",
            "--io-type",
            "read",
            "--io-total",
            "1M",
        ],
    );
    assert!(text.contains("256 ops") && text.contains("IOPS"), "{text}");
    assert!(d.terminate().success());
}

/// An import writes through its own NBD export (`POST .../import` gives
/// its secret name): it opens the volume NBD refuses to everyone else while
/// the import is under way, is not listed, and closes when the import
/// ends; a wrong token opens nothing. `vol import` of a qcow2 image
/// (made by qemu-img) goes that way: NBD counted the writes.
#[test]
fn imports_write_through_their_own_export() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let c = d.client();
    run_ok(&pool, &["vol", "create", "web1", "--size", "4M"]);
    let export = c
        .begin_import("web1", false)
        .unwrap()
        .expect("an import export");
    assert!(
        export.starts_with(".import-") && export.len() > 40,
        "{export}"
    );
    let list = nbdinfo(&["--list", &d.nbd_uri("")]);
    assert!(!list.contains(".import"), "{list}");
    qemu_io(&d.nbd_uri(&export), &["write -P 0x77 0 64k"]);
    let refused = |name: &str| {
        let out = std::process::Command::new("nbdinfo")
            .arg(d.nbd_uri(name))
            .output()
            .expect("nbdinfo");
        !out.status.success()
    };
    assert!(refused("web1"), "an incomplete volume is served");
    let mut wrong = export.clone();
    let last = if wrong.ends_with('0') { "1" } else { "0" };
    wrong.replace_range(wrong.len() - 1.., last);
    assert!(refused(&wrong), "a wrong token opened the volume");
    // A connection opened during the import writes no more once it ended.
    let after = "try:\n    h.pwrite(b'\\x01' * 4096, 0)\n    print('wrote')\nexcept nbd.Error:\n    print('refused')";
    let mut late = Holder::start(dir.path(), "late", &d.nbd_uri(&export), "", after);
    c.end_import("web1").unwrap();
    assert!(refused(&export), "the import's export outlived it");
    let out = late.finish();
    assert!(out.contains("refused"), "{out}");
    qemu_io(&d.nbd_uri("web1"), &["read -P 0x77 0 64k"]);

    // vol import of a qcow2 image: straight into the export.
    let raw = dir.path().join("src.raw");
    std::fs::write(&raw, vec![0x66u8; 3 * MIB as usize]).unwrap();
    let qcow2 = dir.path().join("src.qcow2");
    let st = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .unwrap();
    assert!(st.success());
    let r = run_json(&pool, &["vol", "import", "web2", path_str(&qcow2)]);
    assert_eq!(r["format"], "qcow2", "{r}");
    assert_eq!(r["data_bytes"], 3 * MIB, "{r}");
    assert!(compare_exports(&d.nbd_uri("web2"), path_str(&raw)));
    // An ephemeral volume outlives its import (the importer is not a
    // client whose leaving deletes it).
    run_ok(
        &pool,
        &["vol", "create", "scratch", "--size", "4M", "--ephemeral"],
    );
    run_ok(
        &pool,
        &["vol", "import", "scratch", path_str(&raw), "--force"],
    );
    assert!(compare_exports(&d.nbd_uri("scratch"), path_str(&raw)));
    let io = c.io_counters().unwrap();
    let web2 = (io.volumes.iter())
        .find(|v| v.volume == "web2")
        .expect("web2 counted");
    assert!(web2.write_bytes >= 3 * MIB, "{web2:?}");
    assert!(
        io.volumes.iter().all(|v| !v.volume.starts_with('.')),
        "{io:?}"
    );
    assert!(d.terminate().success());
}
