//! The built `vpool` binary against a real daemon (`vpool serve` as a child
//! process): every volume command with and without `--json`, sparse import
//! and export, and the daemon's start/stop rules.

mod common;

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::{Daemon, run, run_err, run_json, run_ok, vpool_cmd};
use rand::{Rng, SeedableRng, rngs::StdRng};

const MIB: u64 = 1 << 20;

#[test]
fn volume_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let _d = Daemon::start(&pool, &[]);

    assert_eq!(run_ok(&pool, &["vol", "list"]), "no volumes\n");
    assert_eq!(
        run_json(&pool, &["vol", "list"])["volumes"],
        serde_json::json!([])
    );

    // Create: human and JSON output, binary units.
    let out = run_ok(&pool, &["vol", "create", "web1", "--size", "20G"]);
    assert_eq!(out, "created volume web1 (20 GiB)\n");
    let v = run_json(&pool, &["vol", "create", "db", "--size", "1.5T"]);
    assert_eq!(v["name"], "db");
    assert_eq!(v["size_bytes"], 3u64 << 39);
    assert_eq!(v["allocated_bytes"], 0);

    // Sizes the pool cannot take are refused before asking the daemon.
    let err = run_err(&pool, &["vol", "create", "x", "--size", "1000"]);
    assert!(err.contains("not a multiple of 4096"), "{err}");
    let err = run_err(&pool, &["vol", "create", "x", "--size", "20GB"]);
    assert!(err.contains("binary units"), "{err}");
    // A 512-byte size parses but is not a volume size.
    let err = run_err(&pool, &["vol", "create", "x", "--size", "512"]);
    assert!(err.contains("not a multiple of 4096"), "{err}");
    // A name the engine refuses.
    let err = run_err(&pool, &["vol", "create", "bad@name", "--size", "4K"]);
    assert!(err.contains("volume name"), "{err}");
    // POOL/VOLUME: a pool this daemon does not hold.
    let err = run_err(&pool, &["vol", "create", "nopool/x", "--size", "4K"]);
    assert!(err.contains("no pool named \"nopool\""), "{err}");
    let err = run_err(&pool, &["vol", "create", "web1", "--size", "4K"]);
    assert!(err.contains("already exists"), "{err}");

    // List: a table, and JSON.
    let table = run_ok(&pool, &["vol", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 3, "{table}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].contains("SIZE"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("web1") && l.contains("20 GiB")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("db") && l.contains("1.5 TiB")),
        "{table}"
    );
    let l = run_json(&pool, &["vol", "list"]);
    assert_eq!(l["volumes"].as_array().unwrap().len(), 2);

    // Info.
    let info = run_ok(&pool, &["vol", "info", "web1"]);
    assert!(info.contains("name:       web1"), "{info}");
    assert!(info.contains("20 GiB (21474836480 bytes)"), "{info}");
    assert_eq!(
        run_json(&pool, &["vol", "info", "web1"])["size_bytes"],
        20u64 << 30
    );

    // Resize: grow, refuse to shrink (naming the flag), shrink with it.
    assert_eq!(
        run_ok(&pool, &["vol", "resize", "web1", "--size", "40G"]),
        "volume web1 is now 40 GiB\n"
    );
    let err = run_err(&pool, &["vol", "resize", "web1", "--size", "10G"]);
    assert!(err.contains("--allow-shrink"), "{err}");
    assert_eq!(
        run_json(&pool, &["vol", "info", "web1"])["size_bytes"],
        40u64 << 30
    );
    let v = run_json(
        &pool,
        &["vol", "resize", "web1", "--size", "10G", "--allow-shrink"],
    );
    assert_eq!(v["size_bytes"], 10u64 << 30);

    // Delete, and the errors for a missing volume (JSON errors on stderr).
    assert_eq!(
        run_ok(&pool, &["vol", "delete", "db"]),
        "deleted volume db\n"
    );
    assert_eq!(
        run_json(&pool, &["vol", "delete", "web1"])["deleted"],
        "web1"
    );
    let err = run_err(&pool, &["vol", "info", "web1"]);
    assert!(err.contains("not found"), "{err}");
    let out = run(&pool, &["vol", "info", "web1", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["error"]["kind"], "not_found");
    assert_eq!(run_ok(&pool, &["vol", "list"]), "no volumes\n");
}

#[test]
fn pool_info_command() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let _d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "a", "--size", "1G"]);
    let text = run_ok(&pool, &["pool", "info"]);
    for want in [
        "logical size:   1 GiB",
        "physical size:",
        "garbage:",
        "free space:",
        "segments",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    let p = run_json(&pool, &["pool", "info"]);
    assert_eq!(p["logical_bytes"], 1u64 << 30);
    assert_eq!(p["volumes"], 1);
    assert!(
        p["physical_bytes"].is_u64() && p["garbage_ratio"].is_f64(),
        "{p}"
    );
    assert!(p["free_bytes"].as_u64().unwrap() > 0, "{p}");
    // The cleaner's reserve is held and shown.
    assert!(p["reserve_bytes"].as_u64().unwrap() >= 64 << 20, "{p}");
    assert_eq!(p["full"], false);
    assert!(text.contains("reserve:"), "{text}");
}

/// The pool directory, its metadata and the daemon's sockets are the
/// owner's alone: volume names leak through file names and checkpoints.
#[test]
fn pool_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "secret-name", "--size", "1M"]);
    run_ok(&pool, &["snap", "create", "secret-name@s"]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    for p in [pool.clone(), pool.join("meta"), pool.join("segments")] {
        assert_eq!(mode(&p), 0o700, "{}", p.display());
    }
    for sub in ["meta", "segments"] {
        for e in std::fs::read_dir(pool.join(sub)).unwrap() {
            let p = e.unwrap().path();
            assert_eq!(mode(&p) & 0o077, 0, "{} is readable by others", p.display());
        }
    }
    for s in [d.socket(), d.nbd_socket()] {
        assert_eq!(mode(&s) & 0o077, 0, "{}", s.display());
    }
    assert!(d.terminate().success());
}

/// Writes a sparse test image: random data regions, regions written as
/// explicit zeros (allocated in the file, skipped by import), holes, and
/// a length that is not a multiple of 4 KiB.
fn make_sparse_image(path: &Path, len: u64, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = File::create(path).unwrap();
    f.set_len(len).unwrap();
    for _ in 0..24 {
        let n = rng.gen_range(1..200_000usize);
        let at = rng.gen_range(0..len - n as u64);
        let buf: Vec<u8> = (0..n).map(|_| rng.r#gen()).collect();
        f.write_all_at(&buf, at).unwrap();
    }
    for _ in 0..4 {
        let at = rng.gen_range(0..len - MIB) & !4095;
        f.write_all_at(&vec![0u8; MIB as usize], at).unwrap();
    }
    // The very end: data up to the last byte of a partial block.
    f.write_all_at(b"tail!", len - 5).unwrap();
    f.sync_all().unwrap();
}

/// Bytes in 4 KiB blocks of the file that are not all zeros (the last,
/// partial block counts whole): exactly what a sparse import must send.
fn nonzero_block_bytes(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .count() as u64
        * 4096
}

fn allocated_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn import_export_sparse_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let _d = Daemon::start(&pool, &[]);
    let len = 96 * MIB + 1234;
    let img = dir.path().join("disk.raw");
    make_sparse_image(&img, len, 42);
    let data = nonzero_block_bytes(&img);
    assert!(
        allocated_bytes(&img) < len / 2,
        "the test image should be sparse"
    );

    // Import creates the volume, rounded up to 4 KiB, sending only data.
    let r = run_json(&pool, &["vol", "import", "img", img.to_str().unwrap()]);
    assert_eq!(r["created"], true);
    assert_eq!(r["file_bytes"], len);
    let vsize = len.next_multiple_of(4096);
    assert_eq!(r["volume_size_bytes"], vsize);
    let sent = r["data_bytes"].as_u64().unwrap();
    assert_eq!(sent, data, "import sends exactly the non-zero blocks");
    let info = run_json(&pool, &["vol", "info", "img"]);
    assert_eq!(info["size_bytes"], vsize);
    assert_eq!(
        info["allocated_bytes"], sent,
        "the volume stores only what was sent"
    );

    // Export: same bytes, still sparse.
    let out = dir.path().join("out.raw");
    let text = run_ok(&pool, &["vol", "export", "img", out.to_str().unwrap()]);
    assert!(text.contains("exported volume img"), "{text}");
    assert_files_equal(&img, &out, vsize);
    let alloc = allocated_bytes(&out);
    assert!(
        alloc <= sent + 256 * 1024,
        "export allocates {alloc} bytes for {sent} of data"
    );
    assert!(
        alloc < vsize / 4,
        "export is not sparse: {alloc} of {vsize}"
    );

    // Export refuses to overwrite without --force.
    let err = run_err(&pool, &["vol", "export", "img", out.to_str().unwrap()]);
    assert!(err.contains("--force"), "{err}");
    run_ok(
        &pool,
        &["vol", "export", "img", out.to_str().unwrap(), "--force"],
    );
    assert_files_equal(&img, &out, vsize);

    // Import into an existing volume replaces its content: old data where
    // the new image has holes must be gone.
    run_ok(
        &pool,
        &["vol", "create", "reuse", "--size", &vsize.to_string()],
    );
    let junk = dir.path().join("junk.raw");
    File::create(&junk)
        .unwrap()
        .write_all_at(&vec![0xee; 8 * MIB as usize], 0)
        .unwrap();
    // An import replaces all of a volume's content: only with --force.
    let (kind, msg) = run_json_err(&pool, &["vol", "import", "reuse", junk.to_str().unwrap()]);
    assert_eq!(kind, "already_exists", "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    run_ok(
        &pool,
        &["vol", "import", "reuse", junk.to_str().unwrap(), "--force"],
    );
    let text = run_ok(
        &pool,
        &["vol", "import", "reuse", img.to_str().unwrap(), "--force"],
    );
    assert!(text.contains("existing volume reuse"), "{text}");
    let out2 = dir.path().join("out2.raw");
    run_ok(&pool, &["vol", "export", "reuse", out2.to_str().unwrap()]);
    assert_files_equal(&img, &out2, vsize);

    // Import errors: a --size that differs from the existing volume's, a
    // --size smaller than the file, a missing file.
    let err = run_err(
        &pool,
        &[
            "vol",
            "import",
            "reuse",
            img.to_str().unwrap(),
            "--size",
            "1G",
            "--force",
        ],
    );
    assert!(err.contains("resize"), "{err}");
    let err = run_err(
        &pool,
        &[
            "vol",
            "import",
            "small",
            img.to_str().unwrap(),
            "--size",
            "4K",
        ],
    );
    assert!(err.contains("smaller than"), "{err}");
    let err = run_err(&pool, &["vol", "import", "x", "/nonexistent/disk.raw"]);
    assert!(err.contains("/nonexistent/disk.raw"), "{err}");
    let err = run_err(
        &pool,
        &[
            "vol",
            "export",
            "nope",
            dir.path().join("n.raw").to_str().unwrap(),
        ],
    );
    assert!(err.contains("not found"), "{err}");
}

/// Compares `a` (shorter, zero-padded) with `b` of length `len`.
fn assert_files_equal(a: &Path, b: &Path, len: u64) {
    let fa = File::open(a).unwrap();
    let fb = File::open(b).unwrap();
    assert_eq!(fb.metadata().unwrap().len(), len);
    let alen = fa.metadata().unwrap().len();
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut pos = 0;
    while pos < len {
        let n = (len - pos).min(MIB) as usize;
        ba[..n].fill(0);
        let an = alen.saturating_sub(pos).min(n as u64) as usize;
        fa.read_exact_at(&mut ba[..an], pos).unwrap();
        fb.read_exact_at(&mut bb[..n], pos).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap_or(0);
            panic!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                pos + i as u64
            );
        }
        pos += n as u64;
    }
}

/// Runs `bash -c SCRIPT` (with pipefail) with `$VPOOL` the built binary on the daemon at
/// `pool`; returns (success, stdout, stderr).
fn sh(pool: &Path, script: &str) -> (bool, Vec<u8>, String) {
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("set -o pipefail; {script}"))
        .env("VPOOL", common::vpool_bin())
        .env("VPOOL_HOME", pool)
        .env("VPOOL_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), out.stdout, err)
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `vol import` detects qcow2, VMDK and VHDX files made by `qemu-img` and
/// converts them: exported back, each compares equal to the raw original
/// (`qemu-img compare`). Compressed and stream-only inputs are refused with
/// the fix.
#[test]
fn import_detects_and_converts_image_formats() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let _d = Daemon::start(&pool, &[]);
    let len = 24 * MIB;
    let raw = dir.path().join("src.raw");
    make_sparse_image(&raw, len, 7);
    let raw_s = raw.to_str().unwrap();
    for fmt in ["qcow2", "vmdk", "vhdx"] {
        let img = dir.path().join(format!("src.{fmt}"));
        let img_s = img.to_str().unwrap();
        qemu_img(&["convert", "-f", "raw", "-O", fmt, raw_s, img_s]);
        let r = run_json(&pool, &["vol", "import", fmt, img_s]);
        assert_eq!(r["format"], fmt, "{r}");
        assert_eq!(r["volume_size_bytes"], len, "{r}");
        assert_eq!(r["data_bytes"], nonzero_block_bytes(&raw), "{r}");
        let out = dir.path().join(format!("out-{fmt}.raw"));
        let out_s = out.to_str().unwrap();
        run_ok(&pool, &["vol", "export", fmt, out_s]);
        qemu_img(&["compare", "-f", "raw", "-F", "raw", raw_s, out_s]);
    }
    // An image that reads another file (here a backing file) converts only
    // when its format is named: a guest can write any header into a raw
    // disk.
    let over = dir.path().join("over.qcow2");
    let over_s = over.to_str().unwrap();
    qemu_img(&[
        "create", "-q", "-f", "qcow2", "-b", raw_s, "-F", "raw", over_s,
    ]);
    let err = run_err(&pool, &["vol", "import", "over", over_s]);
    assert!(
        err.contains("reads") && err.contains("--format qcow2"),
        "{err}"
    );
    run_ok(
        &pool,
        &["vol", "import", "over", over_s, "--format", "qcow2"],
    );
    let out = dir.path().join("out-over.raw");
    run_ok(&pool, &["vol", "export", "over", out.to_str().unwrap()]);
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        raw_s,
        out.to_str().unwrap(),
    ]);

    // --format raw stores the container's bytes as they are.
    let q = dir.path().join("src.qcow2");
    let r = run_json(
        &pool,
        &[
            "vol",
            "import",
            "bytes",
            q.to_str().unwrap(),
            "--format",
            "raw",
        ],
    );
    assert_eq!(r["format"], "raw");
    assert_eq!(r["file_bytes"], std::fs::metadata(&q).unwrap().len());

    // What cannot be imported says what to do instead.
    let (ok, _, err) = sh(&pool, &format!("gzip -c {raw_s} > {raw_s}.gz"));
    assert!(ok, "{err}");
    let err = run_err(&pool, &["vol", "import", "gz", &format!("{raw_s}.gz")]);
    assert!(
        err.contains("gzip-compressed") && err.contains("gzip -dc"),
        "{err}"
    );
    let (ok, _, err) = sh(
        &pool,
        &format!("$VPOOL vol import q - --size 24M < {}", q.display()),
    );
    assert!(!ok && err.contains("qcow2 image"), "{err}");
    let (kind, _) = run_json_err(&pool, &["vol", "info", "q"]);
    assert_eq!(kind, "not_found", "a refused stream created its volume");
}

/// Raw images and diffs through pipes: `vol export VOL -`, `vol import VOL
/// -`, `vol export-diff A B - | vol import-diff VOL -`, and a cut diff
/// stream that leaves its volume marked incomplete.
#[test]
fn import_export_and_diffs_through_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let len = 16 * MIB;
    let raw = dir.path().join("src.raw");
    make_sparse_image(&raw, len, 9);
    let raw_s = raw.to_str().unwrap();
    let want = std::fs::read(&raw).unwrap();

    // A new volume from a pipe needs its size.
    let (ok, _, err) = sh(&pool, &format!("cat {raw_s} | $VPOOL vol import p1 -"));
    assert!(!ok && err.contains("--size"), "{err}");
    let (ok, _, err) = sh(
        &pool,
        &format!("cat {raw_s} | $VPOOL --json vol import p1 - --size 16M"),
    );
    assert!(ok, "{err}");
    let (ok, got, err) = sh(&pool, "$VPOOL vol export p1 - | cat");
    assert!(ok, "{err}");
    assert!(
        got == want,
        "the piped export differs from the piped import"
    );
    assert!(
        err.contains("to standard output"),
        "the summary goes to stderr: {err}"
    );
    // Longer than the volume: refused, and the volume is not served.
    let (ok, _, err) = sh(
        &pool,
        &format!("(cat {raw_s}; echo more) | $VPOOL vol import p1 - --force"),
    );
    assert!(!ok && err.contains("longer than volume p1"), "{err}");
    assert_eq!(run_json(&pool, &["vol", "info", "p1"])["incomplete"], true);
    let (ok, _, err) = sh(&pool, &format!("$VPOOL vol import p1 - --force < {raw_s}"));
    assert!(ok, "{err}");
    // Shorter than the volume: a cut stream, unless --allow-short.
    let (ok, _, err) = sh(
        &pool,
        &format!("head -c 1M {raw_s} | $VPOOL vol import p4 - --size 16M"),
    );
    assert!(!ok && err.contains("ended after"), "{err}");
    assert_eq!(run_json(&pool, &["vol", "info", "p4"])["incomplete"], true);
    let script = format!("head -c 1M {raw_s} | $VPOOL vol import p4 - --allow-short");
    let (ok, _, err) = sh(&pool, &script);
    assert!(
        ok,
        "an incomplete volume is imported again without --force: {err}"
    );

    // An incremental backup through a pipe, as `zfs send | zfs receive`.
    run_ok(&pool, &["snap", "create", "p1@a"]);
    run_ok(&pool, &["vol", "import", "p2", raw_s]);
    let c = d.client();
    c.write("p1", 5 * MIB + 4096, &[0x5a; 128 * 4096], false)
        .unwrap();
    c.zero("p1", 0, MIB, true, false).unwrap();
    let (ok, _, err) = sh(
        &pool,
        "$VPOOL vol export-diff p1@a p1 - | $VPOOL vol import-diff p2 -",
    );
    assert!(ok, "{err}");
    let (_, p1, _) = sh(&pool, "$VPOOL vol export p1 - | cat");
    let (_, p2, _) = sh(&pool, "$VPOOL vol export p2 - | cat");
    assert!(
        p1.len() == len as usize && p1 == p2,
        "p2 is not p1 after the diff"
    );
    // A cut stream is found as it is applied; the volume is marked.
    run_ok(&pool, &["vol", "import", "p3", raw_s]);
    let (ok, _, err) = sh(
        &pool,
        "$VPOOL vol export-diff p1@a p1 - | head -c 100000 | $VPOOL vol import-diff p3 -",
    );
    assert!(!ok && err.contains("partly updated"), "{err}");
    assert_eq!(run_json(&pool, &["vol", "info", "p3"])["incomplete"], true);
}

/// A volume that makes its pool promise more than its disk holds is
/// created (thin provisioning) with a warning, and `overcommit` in JSON.
#[test]
fn overcommit_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let _d = Daemon::start(&pool, &[]);
    let small = run(&pool, &["vol", "create", "small", "--size", "1M"]);
    assert!(small.status.success());
    assert!(
        small.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&small.stderr)
    );
    let big = run(&pool, &["vol", "create", "big", "--size", "100T"]);
    assert!(big.status.success());
    let warning = String::from_utf8_lossy(&big.stderr);
    assert!(
        warning.contains("pool local is overcommitted") && warning.contains("100 TiB"),
        "{warning}"
    );
    let j = run_json(&pool, &["vol", "resize", "small", "--size", "2M"]);
    assert!(j["overcommit"]["ratio"].as_f64().unwrap() > 1.0, "{j}");
    assert_eq!(
        j["overcommit"]["provisioned_bytes"],
        (100u64 << 40) + 2 * MIB
    );
}

/// Arguments the parser refuses: exit status 2; with `--json`, a JSON
/// error of kind `usage` on stderr.
#[test]
fn argument_errors_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let out = run(&pool, &["--json", "vol", "create", "x", "--size", "7"]);
    assert_eq!(out.status.code(), Some(2));
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["error"]["kind"], "usage", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("4096"),
        "{e}"
    );
    let out = run(&pool, &["vol", "create", "x", "--size", "7"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    let out = run(&pool, &["--json", "vol", "--help"]);
    assert_eq!(out.status.code(), Some(0), "--help is not an error");
}

#[test]
fn second_daemon_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "v", "--size", "4K"]);

    let out = vpool_cmd(&pool).arg("serve").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already served"), "{err}");
    assert!(err.contains(&format!("pid {}", d.child.id())), "{err}");
    assert!(
        err.contains(&pool.join("LOCK").display().to_string()),
        "{err}"
    );
    // The first daemon is untouched, socket and all.
    assert!(run_ok(&pool, &["vol", "list"]).contains('v'));
    assert!(d.terminate().success());
}

#[test]
fn no_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("nothing-here");
    for args in [
        &["vol", "list"][..],
        &["pool", "info"],
        &["vol", "create", "a", "--size", "4K"],
    ] {
        let err = run_err(&pool, args);
        let sock = pool.join("api.sock");
        assert!(
            err.contains(&format!(
                "no vpool daemon at {}: start one with `vpool serve`",
                sock.display()
            )),
            "{err}"
        );
    }
    let out = run(&pool, &["vol", "list", "--json"]);
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["error"]["kind"], "no_daemon");
    // $VPOOL_HOME finds the pool when --home is not given.
    let out = std::process::Command::new(common::vpool_bin())
        .args(["vol", "list"])
        .env("VPOOL_HOME", &pool)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&pool.join("api.sock").display().to_string())
    );
}

#[test]
fn sigterm_finishes_requests_and_closes_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let c = d.client();
    c.create_volume("v", 64 * MIB).unwrap();

    // A writer keeps going while the daemon is told to stop. Every write it
    // saw acknowledged must survive, with no flush: close checkpoints.
    let writer = std::thread::spawn(move || {
        let mut acked = Vec::new();
        for i in 0..512u64 {
            let block = vec![(i % 251) as u8 + 1; 64 * 1024];
            match c.write("v", i * 64 * 1024, &block, false) {
                Ok(()) => acked.push(i),
                Err(_) => break,
            }
        }
        acked
    });
    std::thread::sleep(std::time::Duration::from_millis(150));
    let log_path = d.log.clone();
    let status = d.terminate();
    let acked = writer.join().unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(status.success(), "exit status {status}; log:\n{log}");
    assert!(log.contains("SIGTERM"), "{log}");
    assert!(log.contains("pool closed"), "{log}");
    assert!(
        !pool.join("api.sock").exists(),
        "the socket is removed on exit"
    );
    assert!(
        !acked.is_empty(),
        "the writer got nothing done before the stop"
    );

    let d = Daemon::start(&pool, &[]);
    let c = d.client();
    for &i in &acked {
        let got = c.read("v", i * 64 * 1024, 64 * 1024).unwrap();
        assert!(
            got.iter().all(|&b| b == (i % 251) as u8 + 1),
            "acknowledged write {i} lost"
        );
    }
    assert!(d.terminate().success());
}

#[test]
fn serve_on_tcp_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let token_file = dir.path().join("token");
    let token = "cli-test-token-0123456789";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    // Find a free port; the tiny race with another process is acceptable.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // A token others can read is refused, not just warned about.
    let private = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    private(0o644);
    let out = vpool_cmd(&pool)
        .args(["serve", "--api-listen", &addr, "--api-token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by others") && err.contains("chmod 600"),
        "{err}"
    );
    private(0o600);
    let d = Daemon::start(
        &pool,
        &[
            "--api-listen",
            &addr,
            "--api-token-file",
            token_file.to_str().unwrap(),
        ],
    );
    let good = vpool_api::Client::tcp(addr.as_str(), token).unwrap();
    good.create_volume("t", 4096).unwrap();
    let bad = vpool_api::Client::tcp(addr.as_str(), "not-the-token-0123456789").unwrap();
    let e = bad.list_volumes().unwrap_err();
    assert_eq!(e.kind(), Some(vpool_api::ErrorKind::Unauthorized), "{e}");
    // The Unix socket still works without a token.
    assert_eq!(d.client().list_volumes().unwrap().len(), 1);
    assert!(d.terminate().success());

    // A token too short to be safe is refused at start.
    std::fs::write(&token_file, "short\n").unwrap();
    let out = vpool_cmd(&pool)
        .args([
            "serve",
            "--api-listen",
            &addr,
            "--api-token-file",
            token_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 16"));
}

/// `vol info` shows how to attach the volume: the NBD URI (Unix socket,
/// absolute even for a relative --home; TCP with --nbd-listen) and a libvirt
/// `<disk>` element.
#[test]
fn vol_info_shows_how_to_attach() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    run_ok(&pool, &["vol", "create", "web1", "--size", "1G"]);
    let sock = std::fs::canonicalize(&pool).unwrap().join("nbd.sock");
    let sock = sock.to_str().unwrap();
    let uri = format!("nbd+unix:///web1?socket={sock}");
    let xml = format!(
        "<disk type='network' device='disk'>\n  \
         <driver name='qemu' type='raw' cache='none' io='native' discard='unmap'/>\n  \
         <source protocol='nbd' name='web1'>\n    \
         <host transport='unix' socket='{sock}'/>\n    \
         <reconnect delay='10'/>\n  \
         </source>\n  \
         <target dev='vda' bus='virtio'/>\n\
         </disk>\n"
    );

    // A relative --home still gives absolute paths.
    let out = std::process::Command::new(common::vpool_bin())
        .current_dir(dir.path())
        .args(["--home", "pool", "vol", "info", "web1"])
        .env_remove("VPOOL_HOME")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("name:       web1"), "{text}");
    assert!(text.contains(&format!("\n  {uri}\n")), "{text}");
    assert!(
        !text.contains("nbd://"),
        "no TCP listener, no TCP URI:\n{text}"
    );
    for line in xml.lines() {
        assert!(
            text.contains(&format!("\n  {line}\n")),
            "missing {line:?}:\n{text}"
        );
    }

    let j = run_json(&pool, &["vol", "info", "web1"]);
    assert_eq!(j["name"], "web1");
    assert_eq!(j["size_bytes"], 1u64 << 30);
    assert_eq!(j["attach"]["nbd_uri"], uri.as_str());
    assert_eq!(j["attach"]["nbd_socket"], sock);
    assert_eq!(j["attach"]["nbd_tcp_uri"], serde_json::Value::Null);
    assert_eq!(j["attach"]["libvirt_xml"], xml.as_str());
    assert_eq!(
        run_json(&pool, &["pool", "info"])["nbd_tcp_addr"],
        serde_json::Value::Null
    );
    // A missing volume is still an error, not attach details.
    assert!(run_err(&pool, &["vol", "info", "nope"]).contains("not found"));
    assert!(d.terminate().success());

    // With --nbd-listen: the TCP URI too, from the address the daemon got.
    let d = Daemon::start(&pool, &["--nbd-listen", "127.0.0.1:0"]);
    let addr = run_json(&pool, &["pool", "info"])["nbd_tcp_addr"]
        .as_str()
        .expect("the pool info reports the NBD TCP address")
        .to_string();
    let port: u16 = addr.strip_prefix("127.0.0.1:").unwrap().parse().unwrap();
    assert_ne!(port, 0);
    let tcp_uri = format!("nbd://127.0.0.1:{port}/web1");
    assert_eq!(
        run_json(&pool, &["vol", "info", "web1"])["attach"]["nbd_tcp_uri"],
        tcp_uri.as_str()
    );
    let text = run_ok(&pool, &["vol", "info", "web1"]);
    assert!(text.contains(&format!("\n  {tcp_uri}\n")), "{text}");
    assert!(text.contains(&format!("\n  {uri}\n")), "{text}");
    // The daemon really listens there.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("NBD TCP listener");
    assert!(d.terminate().success());

    // Listening on every address: the URI names this host, not 0.0.0.0.
    let d = Daemon::start(&pool, &["--nbd-listen", "0.0.0.0:0"]);
    let tcp = run_json(&pool, &["vol", "info", "web1"])["attach"]["nbd_tcp_uri"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        tcp.starts_with("nbd://") && !tcp.contains("0.0.0.0") && tcp.ends_with("/web1"),
        "{tcp}"
    );
    assert!(d.terminate().success());
}

/// `vpool --json ...` that must fail: the JSON error's kind and message.
fn run_json_err(pool: &Path, args: &[&str]) -> (String, String) {
    let mut a = args.to_vec();
    a.push("--json");
    let err = run_err(pool, &a);
    let e: serde_json::Value =
        serde_json::from_str(err.trim()).unwrap_or_else(|e| panic!("bad JSON error ({e}): {err}"));
    (
        e["error"]["kind"].as_str().unwrap().to_string(),
        e["error"]["message"].as_str().unwrap().to_string(),
    )
}

#[test]
fn snapshot_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let c = d.client();
    run_ok(&pool, &["vol", "create", "web1", "--size", "4M"]);
    c.write("web1", 0, &vec![1u8; 1 << 20], false).unwrap();

    // create: text and JSON.
    assert_eq!(
        run_ok(&pool, &["snap", "create", "web1@before-upgrade"]),
        "created snapshot web1@before-upgrade (4 MiB, 1 MiB of data)\n"
    );
    c.write("web1", 0, &[2u8; 4096], false).unwrap();
    let before_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let s = run_json(&pool, &["snap", "create", "web1@b"]);
    assert_eq!(s["volume"], "web1");
    assert_eq!(s["name"], "b");
    assert_eq!(s["size_bytes"], 4 * MIB);
    // Its creation time: in the answer and in the list.
    let at = s["created_unix_ms"].as_u64().expect("a creation time");
    assert!(
        at >= before_ms && at < before_ms + 60_000,
        "{at} vs {before_ms}"
    );
    let l = run_json(&pool, &["snap", "list", "web1"]);
    assert_eq!(l["snapshots"][1]["created_unix_ms"], at, "{l}");
    let text = run_ok(&pool, &["snap", "list", "web1"]);
    assert!(
        text.contains("CREATED (UTC)") && text.contains(" 20"),
        "{text}"
    );
    // Every snapshot of the pool, in the order taken.
    run_ok(&pool, &["vol", "create", "db", "--size", "4M"]);
    run_ok(&pool, &["snap", "create", "db@one"]);
    let all = run_json(&pool, &["snap", "list", "--all"]);
    let names: Vec<String> = all["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}@{}",
                s["volume"].as_str().unwrap(),
                s["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, ["web1@before-upgrade", "web1@b", "db@one"]);
    let text = run_ok(&pool, &["snap", "list", "--all"]);
    assert!(text.starts_with("VOLUME"), "{text}");
    run_ok(&pool, &["vol", "delete", "db"]);
    // One syntax: VOLUME@SNAPSHOT.
    let err = run_err(&pool, &["snap", "create", "web1"]);
    assert!(err.contains("VOLUME@SNAPSHOT"), "{err}");
    let err = run_err(&pool, &["snap", "create", "web1", "x"]);
    assert!(err.contains("unexpected argument"), "{err}");
    let (kind, msg) = run_json_err(&pool, &["snap", "create", "web1@b"]);
    assert_eq!(kind, "already_exists", "{msg}");
    let (kind, _) = run_json_err(&pool, &["snap", "create", "nope@x"]);
    assert_eq!(kind, "not_found");
    let (kind, msg) = run_json_err(&pool, &["snap", "create", "web1@template"]);
    assert_eq!(kind, "invalid");
    assert!(msg.contains("reserved"), "{msg}");

    // list: a table in seq order, and JSON.
    let t = run_ok(&pool, &["snap", "list", "web1"]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    assert!(
        lines[0].starts_with("NAME") && lines[0].ends_with("SEQ  CREATED (UTC)"),
        "{t}"
    );
    assert!(
        lines[1].starts_with("before-upgrade") && lines[1].contains("4 MiB"),
        "{t}"
    );
    assert!(lines[2].starts_with("b "), "{t}");
    let l = run_json(&pool, &["snap", "list", "web1"]);
    let snaps = l["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    assert!(snaps[0]["seq"].as_u64() < snaps[1]["seq"].as_u64());
    assert_eq!(snaps[0]["allocated_bytes"], MIB);
    run_ok(&pool, &["vol", "create", "empty", "--size", "4K"]);
    assert_eq!(
        run_ok(&pool, &["snap", "list", "empty"]),
        "no snapshots of empty\n"
    );

    // rollback: text and JSON.
    assert_eq!(
        run_ok(&pool, &["snap", "rollback", "web1@before-upgrade"]),
        "rolled back volume web1 to web1@before-upgrade (4 MiB)\n"
    );
    assert_eq!(c.read("web1", 0, 4096).unwrap(), vec![1u8; 4096]);
    let v = run_json(&pool, &["snap", "rollback", "web1@b", "--force"]);
    assert_eq!(v["name"], "web1");
    assert_eq!(c.read("web1", 0, 4096).unwrap(), vec![2u8; 4096]);
    let (kind, _) = run_json_err(&pool, &["snap", "rollback", "web1@zz"]);
    assert_eq!(kind, "not_found");

    // delete: refused while a clone depends on it, naming the clone.
    run_ok(&pool, &["vol", "clone", "web1@b", "kid"]);
    let err = run_err(&pool, &["snap", "delete", "web1@b"]);
    assert!(err.contains("in use by kid"), "{err}");
    let (kind, msg) = run_json_err(&pool, &["snap", "delete", "web1@b"]);
    assert_eq!(kind, "in_use");
    assert!(msg.contains("kid"), "{msg}");
    run_ok(&pool, &["vol", "delete", "kid"]);
    assert_eq!(
        run_ok(&pool, &["snap", "delete", "web1@b"]),
        "deleted snapshot web1@b\n"
    );
    assert_eq!(
        run_json(&pool, &["snap", "delete", "web1@before-upgrade"])["deleted"],
        "web1@before-upgrade"
    );
    assert_eq!(
        run_ok(&pool, &["snap", "list", "web1"]),
        "no snapshots of web1\n"
    );
    // Snapshots survive a restart.
    run_ok(&pool, &["snap", "create", "web1@kept"]);
    assert!(d.terminate().success());
    let _d = Daemon::start(&pool, &[]);
    assert_eq!(
        run_json(&pool, &["snap", "list", "web1"])["snapshots"][0]["name"],
        "kept"
    );
}

#[test]
fn template_clone_flatten_commit_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let c = d.client();
    run_ok(&pool, &["vol", "create", "debian12", "--size", "8M"]);
    c.write("debian12", 4096, &vec![0x5au8; 3 << 20], false)
        .unwrap();

    // template: the digest is sha256sum of the exported raw image.
    let out = run_ok(&pool, &["vol", "template", "debian12"]);
    assert!(
        out.starts_with("sealed volume debian12 as a template: read-only from now on"),
        "{out}"
    );
    let raw = dir.path().join("debian12.raw");
    run_ok(&pool, &["vol", "export", "debian12", raw.to_str().unwrap()]);
    let sum = std::process::Command::new("sha256sum")
        .arg(&raw)
        .output()
        .unwrap();
    let sum = String::from_utf8(sum.stdout).unwrap();
    let digest = format!("sha256:{}", sum.split_whitespace().next().unwrap());
    assert!(out.contains(&format!("digest: {digest}")), "{out}");
    let info = run_ok(&pool, &["vol", "info", "debian12"]);
    assert!(info.contains("template:   yes"), "{info}");
    assert!(info.contains(&format!("digest:     {digest}")), "{info}");
    assert!(info.contains("snapshots:  1"), "{info}");
    let j = run_json(&pool, &["vol", "info", "debian12"]);
    assert_eq!(j["template"]["digest"], digest.as_str());
    assert_eq!(j["template"]["snapshot"], "template");
    let (kind, _) = run_json_err(&pool, &["vol", "template", "debian12"]);
    assert_eq!(kind, "already_exists");
    let (kind, _) = run_json_err(&pool, &["vol", "template", "nope"]);
    assert_eq!(kind, "not_found");
    // Read-only from now on: writes, imports, resizes.
    let e = c.write("debian12", 0, &[1; 4096], false).unwrap_err();
    assert_eq!(e.kind(), Some(vpool_api::ErrorKind::ReadOnly), "{e}");
    let (kind, msg) = run_json_err(&pool, &["vol", "import", "debian12", raw.to_str().unwrap()]);
    assert_eq!(kind, "read_only", "{msg}");
    let j = run_json(&pool, &["vol", "info", "debian12"]);
    assert!(
        j.get("incomplete").is_none(),
        "a refused import marked a template: {j}"
    );
    let err = run_err(&pool, &["vol", "resize", "debian12", "--size", "16M"]);
    assert!(err.contains("template"), "{err}");
    // A template's JSON creation output, from another volume.
    run_ok(&pool, &["vol", "create", "other", "--size", "4K"]);
    let j = run_json(&pool, &["vol", "template", "other"]);
    assert!(
        j["template"]["digest"]
            .as_str()
            .unwrap()
            .starts_with("sha256:"),
        "{j}"
    );

    // clone: of a template, of a snapshot, of a clone's snapshot.
    assert_eq!(
        run_ok(&pool, &["vol", "clone", "debian12", "web2"]),
        "created volume web2 (8 MiB) as a copy-on-write clone of template debian12\n"
    );
    assert_eq!(c.read("web2", 4096, 4096).unwrap(), vec![0x5a; 4096]);
    c.write("web2", 0, &[7; 4096], false).unwrap();
    run_ok(&pool, &["snap", "create", "web2@s"]);
    let j = run_json(&pool, &["vol", "clone", "web2@s", "web3"]);
    assert_eq!(j["name"], "web3");
    assert_eq!(j["parent"], "web2@s");
    assert_eq!(c.read("web3", 0, 4096).unwrap(), vec![7; 4096]);
    let info = run_ok(&pool, &["vol", "info", "web3"]);
    assert!(info.contains("parent:     web2@s"), "{info}");
    let err = run_err(&pool, &["vol", "clone", "web2", "x"]);
    assert!(err.contains("not a template"), "{err}");
    let (kind, _) = run_json_err(&pool, &["vol", "clone", "web2@nope", "x"]);
    assert_eq!(kind, "not_found");

    // commit: the parent takes the clone's content.
    c.write("web3", 8192, &[8; 4096], false).unwrap();
    let out = run_ok(&pool, &["vol", "commit", "web3"]);
    assert_eq!(
        out,
        "committed web3 into its parent: volume web2 now holds web3's content (8 MiB)\n"
    );
    assert_eq!(c.read("web2", 8192, 4096).unwrap(), vec![8; 4096]);
    let j = run_json(&pool, &["vol", "commit", "web3"]);
    assert_eq!(j["clone"], "web3");
    assert_eq!(j["parent"]["name"], "web2");
    // Not into a template.
    let (kind, msg) = run_json_err(&pool, &["vol", "commit", "web2"]);
    assert_eq!(kind, "read_only", "{msg}");

    // Deleting a template that clones depend on fails naming them.
    let err = run_err(&pool, &["vol", "delete", "debian12"]);
    assert!(err.contains("in use by web2"), "{err}");

    // flatten: instant, and says so.
    let out = run_ok(&pool, &["vol", "flatten", "web3"]);
    assert!(
        out.contains("flattened web3: it no longer depends on web2@s")
            && out.contains("Instant")
            && out.contains("nothing was copied"),
        "{out}"
    );
    let j = run_json(&pool, &["vol", "flatten", "web2"]);
    assert_eq!(j["instant"], true);
    assert_eq!(j["bytes_copied"], 0);
    assert_eq!(j["detached_from"], "debian12@template");
    assert_eq!(j["volume"]["parent"], serde_json::Value::Null);
    let (kind, _) = run_json_err(&pool, &["vol", "flatten", "web2"]);
    assert_eq!(kind, "invalid");

    // The template survives a restart: still sealed, same digest.
    assert!(d.terminate().success());
    let d = Daemon::start(&pool, &[]);
    let c = d.client();
    let j = run_json(&pool, &["vol", "info", "debian12"]);
    assert_eq!(j["template"]["digest"], digest.as_str());
    let e = c.write("debian12", 0, &[1; 4096], false).unwrap_err();
    assert_eq!(e.kind(), Some(vpool_api::ErrorKind::ReadOnly), "{e}");
    run_ok(&pool, &["vol", "clone", "debian12", "web9"]);
    // Nothing depends on it any more: it can go.
    run_ok(&pool, &["vol", "delete", "web9"]);
    run_ok(&pool, &["vol", "delete", "debian12"]);
    assert!(d.terminate().success());
}

#[test]
fn diff_and_vdiff_commands() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let c = d.client();
    run_ok(&pool, &["vol", "create", "web1", "--size", "16M"]);
    let mut rng = StdRng::seed_from_u64(11);
    let data: Vec<u8> = (0..(4 << 20)).map(|_| rng.r#gen()).collect();
    c.write("web1", 0, &data, false).unwrap();
    run_ok(&pool, &["snap", "create", "web1@a"]);
    c.write("web1", 8192, &data[..65536], false).unwrap();
    c.zero("web1", MIB, 65536, true, false).unwrap();
    // Written zeros travel as zero records.
    c.write("web1", 2 * MIB, &[0u8; 8192], false).unwrap();
    c.resize_volume("web1", 20 * MIB, false, false).unwrap();
    c.write("web1", 18 * MIB, &[9u8; 4096], false).unwrap();
    run_ok(&pool, &["snap", "create", "web1@b"]);

    // diff: text and JSON.
    let t = run_ok(&pool, &["vol", "diff", "web1@a", "web1@b"]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "OFFSET    LENGTH  KIND", "{t}");
    assert_eq!(lines[1], "8192      65536   data", "{t}");
    assert!(
        t.contains("web1@a -> web1@b: 4 changed extents") && t.contains("size 16 MiB -> 20 MiB"),
        "{t}"
    );
    let j = run_json(&pool, &["vol", "diff", "web1@a", "web1@b"]);
    assert_eq!(
        j["extents"][1],
        serde_json::json!({"offset": MIB, "length": 65536, "kind": "zero"})
    );
    assert_eq!(j["size_bytes"], 20 * MIB);
    // Against the live volume.
    c.write("web1", 12 * MIB, &[1u8; 4096], false).unwrap();
    let j = run_json(&pool, &["vol", "diff", "web1@b", "web1"]);
    assert_eq!(
        j["extents"],
        serde_json::json!([{"offset": 12 * MIB, "length": 4096, "kind": "data"}])
    );
    assert_eq!(j["to"], serde_json::Value::Null);
    let err = run_err(&pool, &["vol", "diff", "web1@a", "other@b"]);
    assert!(err.contains("one volume"), "{err}");
    let (kind, _) = run_json_err(&pool, &["vol", "diff", "web1@zz", "web1"]);
    assert_eq!(kind, "not_found");

    // export-diff / import-diff: onto a clone at a, gives b.
    let f = dir.path().join("a-b.vdiff");
    let fs = f.to_str().unwrap();
    let out = run_ok(&pool, &["vol", "export-diff", "web1@a", "web1@b", fs]);
    assert!(
        out.starts_with(&format!("wrote {fs}: web1@a -> web1@b")),
        "{out}"
    );
    let err = run_err(&pool, &["vol", "export-diff", "web1@a", "web1@b", fs]);
    assert!(err.contains("--force"), "{err}");
    let j = run_json(
        &pool,
        &["vol", "export-diff", "web1@a", "web1@b", fs, "--force"],
    );
    assert_eq!(j["data_bytes"], 65536 + 4096);
    assert_eq!(j["zero_bytes"], 65536 + 8192);
    assert_eq!(j["target_size_bytes"], 20 * MIB);
    assert_eq!(j["file_bytes"], std::fs::metadata(&f).unwrap().len());
    run_ok(&pool, &["vol", "clone", "web1@a", "copy"]);
    let out = run_ok(&pool, &["vol", "import-diff", "copy", fs]);
    assert!(
        out.contains("to volume copy") && out.contains("resized to 20 MiB"),
        "{out}"
    );
    let want = c.read_image("web1", Some("b"), 0, 8 << 20).unwrap();
    assert!(want == c.read("copy", 0, 8 << 20).unwrap());
    assert_eq!(
        c.read("copy", 18 * MIB, 4096).unwrap(),
        vec![9u8; 4096],
        "past the old end"
    );
    assert_eq!(c.volume_info("copy").unwrap().size_bytes, 20 * MIB);
    // JSON, onto a fresh volume of another size: resized. (It does not
    // hold web1@a, so it does not become web1@b: which base a diff goes on
    // is the caller's business; only the report is checked here.)
    run_ok(&pool, &["vol", "create", "fresh", "--size", "4K"]);
    let j = run_json(&pool, &["vol", "import-diff", "fresh", fs]);
    assert_eq!(j["resized"], true);
    assert_eq!(j["diff_from"], "a");
    assert_eq!(j["diff_to"], "b");
    assert_eq!(j["records"], 4);

    // A damaged file changes nothing.
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 0xff;
    let bad = dir.path().join("bad.vdiff");
    std::fs::write(&bad, &bytes).unwrap();
    run_ok(&pool, &["vol", "create", "victim", "--size", "4K"]);
    let (kind, msg) = run_json_err(
        &pool,
        &["vol", "import-diff", "victim", bad.to_str().unwrap()],
    );
    assert_eq!(kind, "error");
    assert!(msg.contains("checksum mismatch"), "{msg}");
    assert_eq!(c.volume_info("victim").unwrap().size_bytes, 4096);
    let (kind, _) = run_json_err(&pool, &["vol", "import-diff", "nope", fs]);
    assert_eq!(kind, "not_found");
    assert!(d.terminate().success());
}

#[test]
fn ephemeral_volumes_go_at_restart() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let out = run_ok(
        &pool,
        &["vol", "create", "scratch", "--size", "8G", "--ephemeral"],
    );
    assert_eq!(
        out,
        "created ephemeral volume scratch (8 GiB): deleted when its last NBD client disconnects, or when the daemon restarts\n"
    );
    let j = run_json(
        &pool,
        &["vol", "create", "scratch2", "--size", "1G", "--ephemeral"],
    );
    assert_eq!(j["ephemeral"], true);
    run_ok(&pool, &["vol", "create", "keep", "--size", "1G"]);
    let info = run_ok(&pool, &["vol", "info", "scratch"]);
    assert!(info.contains("ephemeral:  yes"), "{info}");
    assert!(run_ok(&pool, &["vol", "info", "keep"]).contains("ephemeral:  no"));
    assert!(d.terminate().success());
    let _d = Daemon::start(&pool, &[]);
    let names: Vec<String> = run_json(&pool, &["vol", "list"])["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["keep".to_string()]);
}

/// Where QEMU 10's qemu-img and qemu-io are (`scripts/install-deps.sh`
/// unpacks them beside Debian 12's QEMU 7.2); `$VPOOL_QEMU10_DIR` overrides.
fn qemu10_dir() -> std::path::PathBuf {
    std::env::var_os("VPOOL_QEMU10_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/opt/vpool-test/qemu10/usr/bin".into())
}

/// The QEMU versions on this machine: (major version, directory of
/// qemu-img and qemu-io; empty for the ones on PATH). Both 7 and 10 are
/// required: the test command installs them.
fn qemu_versions() -> Vec<(u32, std::path::PathBuf)> {
    let mut found = Vec::new();
    for dir in [std::path::PathBuf::new(), qemu10_dir()] {
        let out = std::process::Command::new(dir.join("qemu-img"))
            .arg("--version")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run scripts/install-deps.sh)",
                    dir.join("qemu-img").display()
                )
            });
        let text = String::from_utf8_lossy(&out.stdout);
        let major: u32 = (text.strip_prefix("qemu-img version "))
            .and_then(|v| v.split('.').next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no version in {text:?}"));
        found.push((major, dir));
    }
    let majors: Vec<u32> = found.iter().map(|(m, _)| *m).collect();
    assert!(
        majors.contains(&7) && majors.contains(&10),
        "QEMU 7 and 10 are needed, found {majors:?} (run scripts/install-deps.sh)"
    );
    found
}

/// `qemu-io -c CMD TARGET` of the QEMU in `dir`; its output, or its error.
fn qemu_io_with(dir: &Path, target: &str, cmd: &str) -> Result<String, String> {
    let out = std::process::Command::new(dir.join("qemu-io"))
        .args(["-r", "-c", cmd, target])
        .output()
        .expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.success() && !text.contains("Pattern verification failed") {
        true => Ok(text),
        false => Err(text),
    }
}

/// What `vol info` prints works as printed with QEMU 7.2 and QEMU 10, for a
/// pool whose path holds a space (URI and JSON form) and one whose path
/// holds `&`, `=` and `;` (the JSON form; the URI works with QEMU 7.2, and
/// `vol info` says QEMU 10 misreads it, which the test shows).
#[test]
fn printed_attach_strings_work_with_qemu_7_and_10() {
    let versions = qemu_versions();
    let dir = tempfile::tempdir().unwrap();
    for (home, uri_everywhere) in [("my pool", true), ("a&b=c;d", false)] {
        let pool = dir.path().join(home);
        let d = Daemon::start(&pool, &[]);
        run_ok(&pool, &["vol", "create", "web1", "--size", "4M"]);
        d.client().write("web1", 0, &[0x5a; 4096], false).unwrap();
        let attach = run_json(&pool, &["vol", "info", "web1"])["attach"].clone();
        let uri = attach["nbd_uri"].as_str().unwrap();
        let json = attach["qemu_json"].as_str().unwrap();
        assert_eq!(
            attach.get("nbd_uri_note").is_none(),
            uri_everywhere,
            "{attach}"
        );
        let read = "read -P 0x5a 0 4k";
        for (major, qemu) in &versions {
            qemu_io_with(qemu, json, read)
                .unwrap_or_else(|e| panic!("QEMU {major}, {home:?}, {json}: {e}"));
            let by_uri = qemu_io_with(qemu, uri, read);
            if uri_everywhere || *major < 9 {
                by_uri.unwrap_or_else(|e| panic!("QEMU {major}, {home:?}, {uri}: {e}"));
            } else {
                // Why the note is there.
                assert!(
                    by_uri.is_err(),
                    "QEMU {major} reads {uri} now: drop the note"
                );
            }
        }
        assert!(d.terminate().success());
    }
}

/// `vpool ARGS` in a pseudo-terminal (util-linux `script`): what the
/// terminal showed, and whether it succeeded.
fn run_in_pty(pool: &Path, args: &[&str]) -> (bool, String) {
    let mut line = format!("exec {}", common::vpool_bin());
    for a in ["--home", pool.to_str().unwrap()].iter().chain(args) {
        line.push(' ');
        line.push_str(&format!("'{}'", a.replace('\'', "'\\''")));
    }
    let out = std::process::Command::new("script")
        .args(["-qefc", &line, "/dev/null"])
        .env_remove("VPOOL_HOME")
        .env("VPOOL_CONFIG", "/dev/null")
        .env("VPOOL_LOG", "warn")
        .env("TERM", "xterm")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("script (util-linux)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// In a terminal, `vol import` and `vol export` draw a progress bar and
/// clear it, leaving the summary; with `--json`, or in a pipe, there is
/// none.
#[test]
fn progress_bars_in_a_terminal_only() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = Daemon::start(&pool, &[]);
    let img = dir.path().join("disk.raw");
    let f = File::create(&img).unwrap();
    // 64 MiB with data in every other MiB: many steps for the bar.
    f.set_len(64 * MIB).unwrap();
    for i in (0..64).step_by(2) {
        f.write_all_at(&vec![0x5a; MIB as usize], i * MIB).unwrap();
    }
    let img_s = img.to_str().unwrap();
    let (ok, screen) = run_in_pty(&pool, &["vol", "import", "web1", img_s]);
    assert!(ok, "{screen}");
    assert!(screen.contains("import ["), "no progress bar:\n{screen}");
    assert!(
        screen.contains("MiB/64 MiB") || screen.contains("MiB/64.00 MiB"),
        "{screen:?}"
    );
    assert!(screen.contains("imported "), "no summary:\n{screen}");
    let out = dir.path().join("out.raw");
    let (ok, screen) = run_in_pty(&pool, &["vol", "export", "web1", out.to_str().unwrap()]);
    assert!(ok, "{screen}");
    assert!(screen.contains("export ["), "no progress bar:\n{screen}");
    let (ok, screen) = run_in_pty(&pool, &["vol", "import", "web2", img_s, "--json"]);
    assert!(ok, "{screen}");
    assert!(!screen.contains("import ["), "a bar with --json:\n{screen}");
    // In a pipe: no bar on stderr.
    let o = run(&pool, &["vol", "import", "web3", img_s]);
    assert!(o.status.success());
    assert!(!String::from_utf8_lossy(&o.stderr).contains('['), "{o:?}");
    assert!(d.terminate().success());
}
