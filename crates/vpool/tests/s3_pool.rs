//! Pools on object storage through the built `vpool` binary, with a
//! `file://` directory standing in for the bucket (object_store's local
//! backend does create-only PUTs atomically, so fencing works as on S3), so
//! no server is needed: `pool create --s3` and `pool attach`, serving
//! volumes from the cache (over the API, and over NBD to qemu-img, from a
//! warm and from a cold cache), `cache stats`, pins, the write lease (a second
//! daemon is refused, naming the holder, and takes over with `--force`,
//! fencing the first), named pools, and what a local pool answers to cache
//! commands.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, vpool_cmd};
use nbd_common::clients::{qemu_img_compare, qemu_img_convert_to};
use rand::{RngCore, SeedableRng, rngs::StdRng};
use vpool_api::{CacheInfo, Client, ErrorKind};

const MIB: u64 = 1 << 20;

/// A temporary world: the bucket, the config directory (pool registry) and
/// room for cache directories.
struct World {
    dir: tempfile::TempDir,
}

impl World {
    fn new() -> World {
        World {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bucket_url(&self) -> String {
        format!("file://{}", self.path("bucket").display())
    }

    /// `vpool --pool <pool> ...` with this world's config directory.
    fn cmd(&self, pool: &Path) -> Command {
        let mut c = vpool_cmd(pool);
        c.env("VPOOL_CONFIG_DIR", self.path("config"));
        c
    }

    fn run(&self, pool: &Path, args: &[&str]) -> Output {
        self.cmd(pool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running the vpool binary")
    }

    fn ok(&self, pool: &Path, args: &[&str]) -> String {
        let out = self.run(pool, args);
        assert!(
            out.status.success(),
            "vpool {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn err(&self, pool: &Path, args: &[&str]) -> String {
        let out = self.run(pool, args);
        assert!(
            !out.status.success(),
            "vpool {args:?} should have failed:\nstdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        String::from_utf8(out.stderr).unwrap()
    }

    fn json(&self, pool: &Path, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(pool, &a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{a:?}: bad JSON ({e}): {out}"))
    }

    /// The `{"error": ...}` of a failed `--json` command.
    fn json_err(&self, pool: &Path, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let e = self.err(pool, &a);
        serde_json::from_str(&e).unwrap_or_else(|x| panic!("{a:?}: bad JSON error ({x}): {e}"))
    }

    /// `pool create --s3 <bucket> --cache <cache>` with short timings.
    fn create(&self, cache: &Path, extra: &[&str]) -> serde_json::Value {
        let url = self.bucket_url();
        let mut args = vec![
            "pool",
            "create",
            "--s3",
            &url,
            "--cache",
            cache.to_str().unwrap(),
            "--cache-size",
            "256M",
            "--seal-after",
            "0.3",
        ];
        args.extend_from_slice(extra);
        self.json(cache, &args)
    }

    fn attach(&self, cache: &Path) -> serde_json::Value {
        let url = self.bucket_url();
        self.json(
            cache,
            &[
                "pool",
                "attach",
                "--s3",
                &url,
                "--cache-size",
                "256M",
                "--seal-after",
                "0.3",
            ],
        )
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until everything written so far is in the bucket.
fn wait_uploaded(c: &Client) {
    wait_for("the uploads", Duration::from_secs(30), || {
        let s = c.cache_stats().unwrap();
        s.upload_lag_bytes == 0 && s.dirty_bytes < 4096 && s.segments_uploaded > 0
    });
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn stats(c: &Client) -> CacheInfo {
    c.cache_stats().unwrap()
}

#[test]
fn s3_pool_serves_volumes_caches_and_pins() {
    let w = World::new();
    let a = w.path("cache-a");

    // Create: no daemon; pool.json says where the pool is.
    let r = w.create(&a, &[]);
    assert_eq!(r["backend"], "s3");
    assert_eq!(r["url"], w.bucket_url());
    assert_eq!(r["cache_size_bytes"], 256 * MIB);
    assert_eq!(r["seal_after_secs"], 0.3);
    assert_eq!(r["pool_dir"], a.display().to_string());
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("pool.json")).unwrap()).unwrap();
    assert_eq!(file["url"], w.bucket_url());
    assert!(w.path("bucket").join("manifest").is_dir());
    // The bucket has its pool now: a second create is refused, and names
    // the way to use it.
    let other = w.path("cache-other");
    let e = w.err(
        &other,
        &[
            "pool",
            "create",
            "--s3",
            &w.bucket_url(),
            "--cache-size",
            "256M",
        ],
    );
    assert!(
        e.contains("already exists") && e.contains("pool attach"),
        "{e}"
    );
    assert!(!other.exists(), "a failed create leaves no cache directory");

    // Serve: volumes work exactly as on a local pool.
    let d = Daemon::start(&a, &[]);
    let c = d.client();
    w.ok(&a, &["vol", "create", "db1", "--size", "64M"]);
    let data = random(3 << 20, 1);
    c.write("db1", 0, &data, false).unwrap();
    c.write("db1", 32 * MIB, &data[..MIB as usize], false)
        .unwrap();
    c.flush().unwrap();
    assert_eq!(c.read("db1", 0, data.len()).unwrap(), data);
    w.ok(&a, &["snap", "create", "db1@suspended"]);

    // Stats: JSON and text.
    wait_uploaded(&c);
    let s = w.json(&a, &["cache", "stats"]);
    assert_eq!(s["remote"], w.bucket_url());
    assert_eq!(s["cache_size_bytes"], 256 * MIB);
    assert!(s["bytes_uploaded"].as_u64().unwrap() >= 4 * MIB, "{s}");
    assert!(s["cached_bytes"].as_u64().unwrap() >= 4 * MIB, "{s}");
    assert_eq!(s["fenced"], serde_json::Value::Null);
    assert_eq!(s["fencing"], "atomic");
    let text = w.ok(&a, &["cache", "stats"]);
    for want in [
        "hit ratio:",
        "cached:",
        "dirty:",
        "pinned:",
        "upload lag:",
        "MB/s",
        "fetched from the object store",
        "generation:",
        "holder:",
        "fenced:       no",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }

    // Pins: pin, list, twice is fine, missing images are not found.
    assert_eq!(w.ok(&a, &["cache", "pins"]), "no pins\n");
    let p = w.json(&a, &["cache", "pin", "db1@suspended"]);
    assert_eq!(p["volume"], "db1");
    assert_eq!(p["snapshot"], "suspended");
    assert!(p["bytes"].as_u64().unwrap() >= 4 * MIB, "{p}");
    let out = w.ok(&a, &["cache", "pin", "db1@suspended"]);
    assert!(
        out.starts_with("pinned db1@suspended: 4") && out.contains("MiB of data kept resident"),
        "{out}"
    );
    let e = w.json_err(&a, &["cache", "pin", "db1@nope"]);
    assert_eq!(e["error"]["kind"], "not_found", "{e}");
    let e = w.json_err(&a, &["cache", "pin", "nope"]);
    assert_eq!(e["error"]["kind"], "not_found", "{e}");
    w.ok(&a, &["cache", "pin", "db1"]);
    let pins = w.json(&a, &["cache", "pins"]);
    let names: Vec<String> = pins["pins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| match p["snapshot"].as_str() {
            Some(s) => format!("{}@{s}", p["volume"].as_str().unwrap()),
            None => p["volume"].as_str().unwrap().to_string(),
        })
        .collect();
    assert_eq!(names, ["db1@suspended", "db1"]);
    let table = w.ok(&a, &["cache", "pins"]);
    assert!(table.starts_with("IMAGE"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("db1@suspended") && l.contains("pinned")),
        "{table}"
    );
    wait_for("pinned bytes", Duration::from_secs(20), || {
        let s = stats(&c);
        s.pins == 2 && s.pinned_bytes >= 4 * MIB
    });

    // Unpin; unpinning what is not pinned is not found.
    assert_eq!(w.ok(&a, &["cache", "unpin", "db1"]), "unpinned db1\n");
    let e = w.json_err(&a, &["cache", "unpin", "db1"]);
    assert_eq!(e["error"]["kind"], "not_found", "{e}");
    assert_eq!(stats(&c).pins, 1);

    // The API: malformed bodies are 400 with a clear message; DELETE takes
    // VOLUME@SNAPSHOT.
    for body in [
        &b"not json"[..],
        br#"{"vol":"db1"}"#,
        br#"{"volume":""}"#,
        br#"{"volume":"db1@suspended"}"#,
    ] {
        let r = c
            .request("POST", "/v1/cache/pins", Some(("application/json", body)))
            .unwrap();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(body));
        let e = r.error_body().unwrap();
        assert_eq!(e.error.kind, ErrorKind::Invalid);
        assert!(!e.error.message.is_empty());
    }
    let r = c
        .request(
            "POST",
            "/v1/cache/pins",
            Some(("application/json", br#"{"volume":"db1","snapshot":null}"#)),
        )
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location"), Some("/v1/cache/pins/db1"));
    let r = c.request("DELETE", "/v1/cache/pins/db1", None).unwrap();
    assert_eq!(r.status, 204);
    let r = c.request("GET", "/v1/cache/pins", None).unwrap();
    assert_eq!(r.status, 200);

    // Pins survive a restart; so does the data. A clean stop uploads
    // everything and releases the pool.
    assert!(d.terminate().success());
    let saved = std::fs::read_to_string(a.join("pins.json")).unwrap();
    assert!(saved.contains("suspended"), "{saved}");
    let d = Daemon::start(&a, &[]);
    let c = d.client();
    assert_eq!(
        w.json(&a, &["cache", "pins"])["pins"][0]["snapshot"],
        "suspended"
    );
    assert_eq!(c.read("db1", 0, data.len()).unwrap(), data);
    assert!(d.terminate().success());

    // A damaged pin list does not keep the pool from starting: it is moved
    // aside and the daemon starts with no pins.
    std::fs::write(a.join("pins.json"), b"{damaged").unwrap();
    let d = Daemon::start(&a, &[]);
    assert_eq!(w.ok(&a, &["cache", "pins"]), "no pins\n");
    assert!(a.join("pins.json.bad").exists());
    assert!(d.log_text().contains("the pin list is not valid"));
    assert!(d.terminate().success());

    // Another cache directory on the same bucket, after the first daemon
    // stopped: no --force needed; reads come from the object store.
    let b = w.path("cache-b");
    let r = w.attach(&b);
    assert_eq!(r["pool_dir"], b.display().to_string());
    assert!(r.get("held_by").is_none(), "{r}");
    let d = Daemon::start(&b, &[]);
    let c = d.client();
    assert_eq!(c.read("db1", 0, data.len()).unwrap(), data);
    assert_eq!(
        c.read("db1", 32 * MIB, MIB as usize).unwrap(),
        &data[..MIB as usize]
    );
    assert_eq!(
        c.read_image("db1", Some("suspended"), 0, data.len())
            .unwrap(),
        data
    );
    let s = stats(&c);
    assert!(s.bytes_fetched >= 4 * MIB, "{s:?}");
    assert!(s.read_misses > 0, "{s:?}");
    // The pins belong to a cache directory, not to the pool.
    assert_eq!(w.ok(&b, &["cache", "pins"]), "no pins\n");
    assert!(d.terminate().success());
}

/// Over NBD, as QEMU sees it: an image written with qemu-img, compared
/// from the writing host's cache, then from a cold cache on another
/// directory (every byte fetched from the object store).
#[test]
fn nbd_clients_on_an_s3_pool() {
    let w = World::new();
    let a = w.path("cache-a");
    w.create(&a, &[]);
    let d = Daemon::start(&a, &[]);
    w.ok(&a, &["vol", "create", "disk", "--size", "8M"]);
    let src = w.path("src.img");
    let mut data = random(8 << 20, 4);
    data[2 << 20..3 << 20].fill(0);
    std::fs::write(&src, &data).unwrap();
    qemu_img_convert_to(&src, &d.nbd_uri("disk"));
    assert!(qemu_img_compare(&d.nbd_uri("disk"), &src));
    assert!(d.terminate().success());

    let b = w.path("cache-b");
    w.attach(&b);
    let d = Daemon::start(&b, &[]);
    assert!(qemu_img_compare(&d.nbd_uri("disk"), &src));
    let s = stats(&d.client());
    assert!(s.bytes_fetched >= 6 << 20, "{s:?}");
    assert!(d.terminate().success());
}

#[test]
fn a_second_daemon_is_refused_then_takes_over_with_force() {
    let w = World::new();
    let a = w.path("cache-a");
    let b = w.path("cache-b");
    w.create(&a, &[]);
    let da = Daemon::start(&a, &[]);
    let ca = da.client();
    w.ok(&a, &["vol", "create", "v", "--size", "16M"]);
    let data = random(MIB as usize, 2);
    ca.write("v", 0, &data, false).unwrap();
    ca.flush().unwrap();
    wait_uploaded(&ca);

    // The same cache directory twice: its lock refuses the second daemon.
    let e = w.err(&a, &["serve"]);
    assert!(e.contains("already served"), "{e}");

    // Attach a second cache directory: it says who holds the pool.
    let r = w.attach(&b);
    let held_by = r["held_by"].as_str().unwrap().to_string();
    assert!(held_by.ends_with(&format!(":{}", da.child.id())), "{r}");

    // Serving it is refused, naming the holder.
    let e = w.err(&b, &["serve"]);
    assert!(e.contains("is held by"), "{e}");
    assert!(e.contains(&format!("pid {}", da.child.id())), "{e}");
    assert!(e.contains("--force"), "{e}");
    let out = w.run(&b, &["serve", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let last = String::from_utf8_lossy(&out.stderr)
        .lines()
        .last()
        .unwrap()
        .to_string();
    let e: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(e["error"]["kind"], "held", "{e}");
    // The first daemon did not notice.
    ca.write("v", 0, &data, false).unwrap();
    ca.flush().unwrap();
    wait_uploaded(&ca);

    // --force takes the pool over while the first daemon runs.
    let db = Daemon::start(&b, &["--force"]);
    let cb = db.client();
    assert_eq!(cb.read("v", 0, data.len()).unwrap(), data);

    // The first daemon is fenced at its next upload commit: its writes fail
    // from then on, and its log says why.
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        let r = ca.write("v", 0, &data, false).and_then(|()| ca.flush());
        if let Err(e) = r {
            break e;
        }
        assert!(Instant::now() < deadline, "the old holder was never fenced");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(err.kind(), Some(ErrorKind::Failed), "{err}");
    assert!(err.to_string().contains("fenced"), "{err}");
    assert!(ca.write("v", 0, &data, false).is_err());
    wait_for("the fenced log line", Duration::from_secs(10), || {
        da.log_text().contains("fenced")
    });
    let s = stats(&ca);
    assert!(s.fenced.is_some(), "{s:?}");
    assert!(w.ok(&a, &["cache", "stats"]).contains("fenced:       YES"));

    // The new holder writes and reads.
    let new = random(MIB as usize, 3);
    cb.write("v", MIB, &new, false).unwrap();
    cb.flush().unwrap();
    assert_eq!(cb.read("v", MIB, new.len()).unwrap(), new);
    assert_eq!(cb.read("v", 0, data.len()).unwrap(), data);
    // The fenced daemon still stops (it cannot checkpoint: its exit says
    // so); the new holder stops cleanly.
    da.terminate();
    assert!(db.terminate().success());
}

#[test]
fn local_pool_has_no_cache() {
    let w = World::new();
    let pool = w.path("local");
    let d = Daemon::start(&pool, &[]);
    for args in [
        &["cache", "stats"][..],
        &["cache", "pins"],
        &["cache", "pin", "v"],
        &["cache", "unpin", "v"],
    ] {
        let e = w.err(&pool, args);
        assert!(
            e.contains("pool local is a local pool: it has no cache"),
            "{args:?}: {e}"
        );
        let e = w.json_err(&pool, args);
        assert_eq!(e["error"]["kind"], "not_supported", "{args:?}: {e}");
    }
    let c = d.client();
    let r = c.request("GET", "/v1/cache", None).unwrap();
    assert_eq!(r.status, 409);
    assert_eq!(r.error_body().unwrap().error.kind, ErrorKind::NotSupported);
    assert!(d.terminate().success());
}

#[test]
fn pool_create_checks_names_and_keeps_secrets_out() {
    let w = World::new();
    let url = w.bucket_url();
    let cache = w.path("cold-cache");
    let cache_s = cache.to_str().unwrap().to_string();
    let nowhere = w.path("nowhere");

    // Arguments checked before anything is made.
    let e = w.err(
        &nowhere,
        &["pool", "create", "--s3", &url, "--cache-size", "255M"],
    );
    assert!(e.contains("below the minimum of 256 MiB"), "{e}");
    let e = w.err(
        &nowhere,
        &["pool", "create", "--s3", "ftp://x", "--cache-size", "1G"],
    );
    assert!(e.contains("bad pool URL"), "{e}");
    let e = w.err(
        &nowhere,
        &[
            "pool",
            "create",
            "--s3",
            "s3://AKID:topsecret@vms/p",
            "--cache-size",
            "1G",
        ],
    );
    assert!(e.contains("must not carry credentials"), "{e}");
    assert!(!e.contains("topsecret"), "{e}");
    // (A usage error, caught by the argument parser: exit status 2.)
    let out = w.run(
        &nowhere,
        &[
            "pool",
            "create",
            "--s3",
            &url,
            "--cache-size",
            "1G",
            "--seal-after",
            "0",
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("--seal-after") && e.contains("above 0"), "{e}");
    let e = w.err(
        &nowhere,
        &[
            "pool",
            "create",
            "bad/name",
            "--s3",
            &url,
            "--cache-size",
            "1G",
        ],
    );
    assert!(e.contains("not a pool name"), "{e}");
    let e = w.err(
        &nowhere,
        &["pool", "attach", "--s3", &url, "--cache-size", "1G"],
    );
    assert!(e.contains("no vpool pool at"), "{e}");
    assert!(!nowhere.exists());

    // A named pool is added by the running daemon; with a credentials
    // file, the file's path is recorded, its secrets are not, anywhere.
    let home = w.path("home");
    let cred = w.path("s3.cred");
    std::fs::write(
        &cred,
        "access_key_id = AKIDEXAMPLE\nsecret_access_key = wJalrXUtnFEMI\n",
    )
    .unwrap();
    let create_cold = [
        "pool",
        "create",
        "cold",
        "--s3",
        &url,
        "--cache",
        &cache_s,
        "--cache-size",
        "1G",
        "--credentials",
        cred.to_str().unwrap(),
        "--seal-after",
        "0.3",
    ];
    let e = w.err(&home, &create_cold);
    assert!(e.contains("start `vpool serve` first"), "{e}");
    let d = Daemon::start(&home, &[]);
    let out = w.ok(&home, &create_cold);
    assert!(out.contains("added pool cold (s3)"), "{out}");
    let file = std::fs::read_to_string(cache.join("pool.json")).unwrap();
    assert!(file.contains("s3.cred"), "{file}");
    for text in [&out, &file] {
        assert!(
            !text.contains("AKIDEXAMPLE") && !text.contains("wJalrXUtnFEMI"),
            "{text}"
        );
    }
    // Its volumes are cold/VOLUME; its cache answers by the pool's name.
    w.ok(&home, &["vol", "create", "cold/v", "--size", "4M"]);
    assert!(
        w.ok(&home, &["vol", "list", "--pool", "cold"])
            .contains('v')
    );
    assert_eq!(w.ok(&home, &["vol", "list"]), "no volumes\n");
    let s = w.json(&home, &["cache", "stats", "--pool", "cold"]);
    assert_eq!(s["cache_dir"], cache_s);
    let l = w.json(&home, &["pool", "list"]);
    assert_eq!(l["pools"][1]["name"], "cold", "{l}");
    assert_eq!(l["pools"][1]["kind"], "s3", "{l}");
    assert_eq!(l["pools"][1]["state"], "open", "{l}");
    // The name is taken; bad settings are the caller's mistake, and leave
    // nothing behind.
    let bucket2 = format!("file://{}", w.path("bucket2").display());
    let e = w.err(
        &home,
        &[
            "pool",
            "create",
            "cold",
            "--s3",
            &bucket2,
            "--cache-size",
            "1G",
        ],
    );
    assert!(e.contains("already has a pool named cold"), "{e}");
    let e = w.json_err(
        &home,
        &[
            "pool",
            "create",
            "c2",
            "--s3",
            &bucket2,
            "--cache-size",
            "255M",
        ],
    );
    assert_eq!(e["error"]["kind"], "invalid", "{e}");
    assert!(!home.join("pools").join("c2").exists());
    let log = d.log_text();
    assert!(
        !log.contains("AKIDEXAMPLE") && !log.contains("wJalrXUtnFEMI"),
        "{log}"
    );
    assert!(d.terminate().success());

    // A cache directory without its pool.json is not served as a local
    // pool by mistake.
    std::fs::rename(cache.join("pool.json"), w.path("pool.json.saved")).unwrap();
    let e = w.err(&cache, &["serve"]);
    assert!(e.contains("pool.json is missing"), "{e}");
}
