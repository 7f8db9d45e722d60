//! The API end to end: a server started in-process on a temporary pool and
//! a temporary Unix socket (or TCP port 0), driven through the sync client
//! and through raw requests for the malformed cases.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::{Rng, SeedableRng, rngs::StdRng};
use tempfile::TempDir;
use tokio::sync::oneshot;
use vpool_api::{
    Access, ApiLimits, ApiState, AuthToken, Catalog, Client, ClientError, DiffKind, ErrorKind,
    MAX_DATA_BYTES, RawResponse, serve_tcp, serve_unix,
};
use vpool_engine::{Pool, PoolConfig};
use vpool_store::LocalDirStore;

const MIB: u64 = 1 << 20;
const TOKEN: &str = "test-token-0123456789abcdef";

enum Listen {
    Unix,
    Tcp,
}

/// A server on its own thread and runtime, so the test thread can use the
/// blocking client directly. Dropping it shuts the server down gracefully and
/// closes the pool.
struct TestServer {
    /// Shared with the server, as the daemon shares it with its NBD exports:
    /// tests register "NBD clients" through it.
    catalog: Arc<Catalog>,
    _dir: TempDir,
    socket: PathBuf,
    tcp_addr: Option<std::net::SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    fn start(listen: Listen) -> TestServer {
        TestServer::start_with(listen, ApiLimits::default())
    }

    fn start_with(listen: Listen, limits: ApiLimits) -> TestServer {
        TestServer::start_populated(listen, limits, |_| {})
    }

    /// A server whose pool `populate` fills first, in-process (faster than
    /// through the API).
    fn start_populated(
        listen: Listen,
        limits: ApiLimits,
        populate: impl FnOnce(&Pool),
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn vpool_store::SegmentStore> =
            Arc::new(LocalDirStore::open(dir.path().join("pool")).unwrap());
        let config = PoolConfig {
            // Small segments, so the cleaner has something to do in tests.
            segment_target_bytes: MIB,
            // No background cleaner: tests check space figures exactly.
            background: false,
            ..PoolConfig::default()
        };
        let (pool, _) = Pool::open(store.clone(), config).unwrap();
        populate(&pool);
        let catalog = Arc::new(Catalog::open(store).unwrap());
        let socket = dir.path().join("api.sock");
        let (tx, rx) = oneshot::channel::<()>();
        let state = ApiState::new(pool.clone())
            .with_catalog(catalog.clone())
            .with_limits(limits);
        // Bind on this thread so the socket accepts as soon as start returns.
        let (unix, tcp, tcp_addr) = match listen {
            Listen::Unix => {
                let l = std::os::unix::net::UnixListener::bind(&socket).unwrap();
                l.set_nonblocking(true).unwrap();
                (Some(l), None, None)
            }
            Listen::Tcp => {
                let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                l.set_nonblocking(true).unwrap();
                let a = l.local_addr().unwrap();
                (None, Some(l), Some(a))
            }
        };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let shutdown = async {
                    let _ = rx.await;
                };
                if let Some(l) = unix {
                    let l = tokio::net::UnixListener::from_std(l).unwrap();
                    serve_unix(l, state, shutdown).await.unwrap();
                } else if let Some(l) = tcp {
                    let l = tokio::net::TcpListener::from_std(l).unwrap();
                    let token = AuthToken::new(TOKEN).unwrap();
                    serve_tcp(l, state, token, shutdown).await.unwrap();
                }
            });
            pool.close().unwrap();
        });
        TestServer {
            catalog,
            _dir: dir,
            socket,
            tcp_addr,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    fn client(&self) -> Client {
        Client::unix(&self.socket)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.unwrap();
            }
        }
    }
}

fn api_kind(e: ClientError) -> (u16, ErrorKind) {
    match e {
        ClientError::Api { status, kind, .. } => (status, kind),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Checks an error response: status, kind, and that it is the JSON body.
fn assert_error(r: &RawResponse, status: u16, kind: ErrorKind) {
    assert_eq!(
        r.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&r.body)
    );
    let body = r
        .error_body()
        .unwrap_or_else(|| panic!("not an error body: {}", String::from_utf8_lossy(&r.body)));
    assert_eq!(body.error.kind, kind, "{}", body.error.message);
    assert!(!body.error.message.is_empty());
    assert_eq!(r.header("content-type"), Some("application/json"));
}

fn json(s: &str) -> Option<(&'static str, &[u8])> {
    Some(("application/json", s.as_bytes()))
}

#[test]
fn volume_lifecycle() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    assert!(c.list_volumes().unwrap().is_empty());

    let v = c.create_volume("web1", 16 * MIB).unwrap();
    assert_eq!(v.name, "web1");
    assert_eq!(v.size_bytes, 16 * MIB);
    assert_eq!(v.allocated_bytes, 0);
    let v2 = c.create_volume("db.2", 4096).unwrap();
    assert_ne!(v.id, v2.id);

    let names: Vec<String> = c
        .list_volumes()
        .unwrap()
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"web1".to_string()) && names.contains(&"db.2".to_string()));
    assert_eq!(without_space(c.volume_info("web1").unwrap()), v);

    // Grow, refuse to shrink, shrink when allowed.
    assert_eq!(
        c.resize_volume("web1", 32 * MIB, false, false)
            .unwrap()
            .size_bytes,
        32 * MIB
    );
    let (status, kind) = api_kind(c.resize_volume("web1", 8 * MIB, false, false).unwrap_err());
    assert_eq!((status, kind), (409, ErrorKind::ShrinkRefused));
    assert_eq!(c.volume_info("web1").unwrap().size_bytes, 32 * MIB);
    assert_eq!(
        c.resize_volume("web1", 8 * MIB, true, false)
            .unwrap()
            .size_bytes,
        8 * MIB
    );

    // Already exists, not found, bad names and sizes.
    assert_eq!(
        api_kind(c.create_volume("web1", 4096).unwrap_err()),
        (409, ErrorKind::AlreadyExists)
    );
    assert_eq!(
        api_kind(c.volume_info("nope").unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    assert_eq!(
        api_kind(c.delete_volume("nope", false).unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    assert_eq!(
        api_kind(c.resize_volume("nope", 4096, false, false).unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    // `a/b` is volume b of pool a, which this server does not hold.
    assert_eq!(
        api_kind(c.create_volume("a/b", 4096).unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    assert_eq!(
        api_kind(c.create_volume("a@b", 4096).unwrap_err()),
        (400, ErrorKind::Invalid)
    );
    assert_eq!(
        api_kind(c.create_volume("x", 4097).unwrap_err()),
        (400, ErrorKind::Invalid)
    );
    assert_eq!(
        api_kind(c.create_volume("x", 0).unwrap_err()),
        (400, ErrorKind::Invalid)
    );
    assert_eq!(
        api_kind(c.resize_volume("web1", 100, false, false).unwrap_err()),
        (400, ErrorKind::Invalid)
    );

    c.delete_volume("web1", false).unwrap();
    assert_eq!(
        api_kind(c.volume_info("web1").unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    assert_eq!(c.list_volumes().unwrap().len(), 1);
}

#[test]
fn create_answers_201_with_location() {
    let srv = TestServer::start(Listen::Unix);
    let r = srv
        .client()
        .request(
            "POST",
            "/v1/volumes",
            json(r#"{"name":"v","size_bytes":8192}"#),
        )
        .unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.header("location"), Some("/v1/volumes/v"));
}

#[test]
fn data_read_write_zero_allocation() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    c.create_volume("d", 8 * MIB).unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = vec![0u8; 8 * MIB as usize];

    // Aligned, unaligned (512-byte) and odd-length writes all land.
    for (off, len) in [
        (0usize, 4096usize),
        (1 << 20, 3 << 20),
        (12_800, 700),
        (7 * MIB as usize, 512),
    ] {
        let data: Vec<u8> = (0..len).map(|_| rng.r#gen()).collect();
        c.write("d", off as u64, &data, false).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    assert_eq!(c.read("d", 0, MAX_DATA_BYTES).unwrap(), model);
    assert_eq!(c.read("d", 12_801, 10).unwrap(), model[12_801..12_811]);
    assert!(c.read("d", 100, 0).unwrap().is_empty());

    // Zero a range inside the big write: whole blocks become holes.
    c.zero("d", (1 << 20) + 4096, 1 << 20, true, false).unwrap();
    model[(1 << 20) + 4096..(2 << 20) + 4096].fill(0);
    assert_eq!(c.read("d", 0, MAX_DATA_BYTES).unwrap(), model);
    // Allocated zeros (no unmap) read as zeros too.
    c.zero("d", 0, 4096, false, false).unwrap();
    model[..4096].fill(0);
    assert_eq!(c.read("d", 0, 4096).unwrap(), model[..4096]);

    // The allocation map: data where written, zero/hole elsewhere, covering
    // the range exactly and in order.
    let a = c.allocation("d", 0, 8 * MIB).unwrap();
    assert_eq!(a.offset, 0);
    assert_eq!(a.length, 8 * MIB);
    let mut at = 0;
    for e in &a.extents {
        assert_eq!(e.offset, at);
        assert!(e.length > 0);
        at += e.length;
        let bytes = &model[e.offset as usize..(e.offset + e.length) as usize];
        if e.zero {
            assert!(bytes.iter().all(|&b| b == 0), "extent {e:?} claims zeros");
        }
        if e.hole {
            assert!(e.zero, "a hole reads as zeros");
        }
    }
    assert_eq!(at, 8 * MIB);
    let first = &a.extents[0];
    assert!(first.zero && !first.hole, "allocated zeros at 0: {first:?}");
    let data_bytes: u64 = a.extents.iter().filter(|e| !e.zero).map(|e| e.length).sum();
    // 3 MiB written at 1 MiB, 1 MiB of it zeroed, plus one block each for
    // the small writes at 12800 and 7 MiB.
    assert_eq!(data_bytes, 2 * MIB + 2 * 4096);
    // A sub-range starts where asked.
    let a = c.allocation("d", 4096, 8192).unwrap();
    assert_eq!((a.offset, a.length), (4096, 8192));

    // Flush, and volume info counts the data.
    c.flush().unwrap();
    let info = c.volume_info("d").unwrap();
    assert_eq!(info.allocated_bytes, data_bytes, "{info:?}");
    assert_eq!(info.zero_bytes, 4096);
}

#[test]
fn data_errors() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    c.create_volume("d", MIB).unwrap();

    // Out of range: past the end, straddling the end.
    assert_eq!(
        api_kind(c.write("d", MIB, &[1; 512], false).unwrap_err()),
        (416, ErrorKind::OutOfRange)
    );
    assert_eq!(
        api_kind(c.write("d", MIB - 512, &[1; 1024], false).unwrap_err()),
        (416, ErrorKind::OutOfRange)
    );
    assert_eq!(
        api_kind(c.read("d", MIB - 4096, 8192).unwrap_err()),
        (416, ErrorKind::OutOfRange)
    );
    assert_eq!(
        api_kind(c.zero("d", 0, 2 * MIB, true, false).unwrap_err()),
        (416, ErrorKind::OutOfRange)
    );
    assert_eq!(
        api_kind(c.allocation("d", 4096, MIB).unwrap_err()),
        (416, ErrorKind::OutOfRange)
    );
    // Unknown volume.
    assert_eq!(
        api_kind(c.write("zz", 0, &[1; 512], false).unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    assert_eq!(
        api_kind(c.read("zz", 0, 512).unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    assert_eq!(
        api_kind(c.allocation("zz", 0, 512).unwrap_err()),
        (404, ErrorKind::NotFound)
    );
    assert_eq!(
        api_kind(c.zero("zz", 0, 512, true, false).unwrap_err()),
        (404, ErrorKind::NotFound)
    );

    // Overflowing and malformed numbers are invalid, not a panic or a 500.
    let max = u64::MAX;
    for (method, q) in [
        ("GET", format!("/v1/volumes/d/data?offset={max}&length=2")),
        (
            "GET",
            format!("/v1/volumes/d/allocation?offset={max}&length=4096"),
        ),
        (
            "POST",
            format!("/v1/volumes/d/zero?offset={}&length={max}", 4096),
        ),
        (
            "GET",
            "/v1/volumes/d/data?offset=99999999999999999999999&length=1".into(),
        ),
        ("GET", "/v1/volumes/d/data?offset=-1&length=1".into()),
        ("GET", "/v1/volumes/d/data?offset=0".into()),
        ("GET", "/v1/volumes/d/data?offset=0&length=1&bogus=1".into()),
        ("GET", "/v1/volumes/d/data?offset=abc&length=1".into()),
        (
            "GET",
            format!("/v1/volumes/d/data?offset=0&length={}", MAX_DATA_BYTES + 1),
        ),
        (
            "POST",
            "/v1/volumes/d/zero?offset=0&length=4096&unmap=maybe".into(),
        ),
    ] {
        let r = c.request(method, &q, None).unwrap();
        assert_error(&r, 400, ErrorKind::Invalid);
    }
    let r = c
        .request(
            "PUT",
            &format!("/v1/volumes/d/data?offset={max}"),
            Some(("application/octet-stream", &[1; 2])),
        )
        .unwrap();
    assert_error(&r, 400, ErrorKind::Invalid);
    let r = c
        .request(
            "PUT",
            "/v1/volumes/d/data",
            Some(("application/octet-stream", &[1; 2])),
        )
        .unwrap();
    assert_error(&r, 400, ErrorKind::Invalid);

    // An over-limit body is refused with 413 and the JSON body; the limit
    // itself is accepted.
    let big = vec![7u8; MAX_DATA_BYTES + 1];
    let r = c
        .request(
            "PUT",
            "/v1/volumes/d/data?offset=0",
            Some(("application/octet-stream", &big)),
        )
        .unwrap();
    assert_error(&r, 413, ErrorKind::PayloadTooLarge);
    c.create_volume("big", 16 * MIB).unwrap();
    c.write("big", 0, &big[..MAX_DATA_BYTES], false).unwrap();
    assert!(
        c.write("big", 0, &big, false).is_err(),
        "the client refuses over-limit writes itself"
    );
    // The server still works after all that.
    assert_eq!(c.read("big", 0, 16).unwrap(), vec![7u8; 16]);
}

#[test]
fn bad_json_bodies() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    c.create_volume("v", 8192).unwrap();
    for body in [
        "",
        "{",
        "not json",
        "[]",
        r#"{"name":"x"}"#,
        r#"{"size_bytes":4096}"#,
        r#"{"name":"x","size_bytes":-4096}"#,
        r#"{"name":"x","size_bytes":"4096"}"#,
        r#"{"name":"x","size_bytes":184467440737095516150}"#,
        r#"{"name":"x","size_bytes":4096,"extra":true}"#,
        r#"{"name":7,"size_bytes":4096}"#,
    ] {
        let r = c.request("POST", "/v1/volumes", json(body)).unwrap();
        assert_error(&r, 400, ErrorKind::Invalid);
    }
    for body in [
        "{}",
        r#"{"allow_shrink":true}"#,
        r#"{"size_bytes":4096,"allow_shrink":"yes"}"#,
    ] {
        let r = c.request("PATCH", "/v1/volumes/v", json(body)).unwrap();
        assert_error(&r, 400, ErrorKind::Invalid);
    }
    // Over the JSON body limit.
    let huge = format!(
        r#"{{"name":"{}","size_bytes":4096}}"#,
        "a".repeat(vpool_api::MAX_JSON_BODY_BYTES)
    );
    let r = c.request("POST", "/v1/volumes", json(&huge)).unwrap();
    assert_error(&r, 413, ErrorKind::PayloadTooLarge);
    // Nothing was created by any of it.
    assert_eq!(c.list_volumes().unwrap().len(), 1);
}

#[test]
fn unknown_routes_and_methods() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    assert_error(
        &c.request("GET", "/v1/nothing", None).unwrap(),
        404,
        ErrorKind::NotFound,
    );
    assert_error(
        &c.request("GET", "/", None).unwrap(),
        404,
        ErrorKind::NotFound,
    );
    assert_error(
        &c.request("DELETE", "/v1/pool", None).unwrap(),
        405,
        ErrorKind::MethodNotAllowed,
    );
    assert_error(
        &c.request("PUT", "/v1/volumes", None).unwrap(),
        405,
        ErrorKind::MethodNotAllowed,
    );
}

#[test]
fn pool_routes() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    let p0 = c.pool_info().unwrap();
    assert_eq!(p0.volumes, 0);
    c.create_volume("a", 64 * MIB).unwrap();
    // Write 4 MiB twice over: the first copy becomes garbage.
    let data = vec![0x5au8; 4 * MIB as usize];
    c.write("a", 0, &data, false).unwrap();
    c.write("a", 0, &data, false).unwrap();
    c.flush().unwrap();
    let p = c.pool_info().unwrap();
    assert_eq!(p.volumes, 1);
    assert_eq!(p.logical_bytes, 64 * MIB);
    assert_eq!(p.live_data_bytes, 4 * MIB);
    assert!(p.physical_bytes >= 8 * MIB, "{p:?}");
    assert!(p.garbage_ratio > 0.3 && p.garbage_ratio < 1.0, "{p:?}");
    assert!(p.segments >= 2, "{p:?}");
    assert!(p.free_bytes.is_some());

    let before = p.checkpoints_written;
    c.checkpoint().unwrap();
    assert!(c.pool_info().unwrap().checkpoints_written > before);

    // Cleaning frees the overwritten copy.
    let r = c.clean().unwrap();
    let p = c.pool_info().unwrap();
    assert!(r.segments_deleted > 0 && r.bytes_freed > 0, "{r:?}");
    assert_eq!(p.cleaner.segments_cleaned, r.segments_deleted);
    assert!(p.physical_bytes < 8 * MIB, "{p:?}");
    assert_eq!(c.read("a", 0, 4 * MIB as usize).unwrap(), data);

    // The raw JSON has the documented shape.
    let r = c.request("GET", "/v1/pool", None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    for k in [
        "logical_bytes",
        "physical_bytes",
        "live_data_bytes",
        "segments",
        "garbage_ratio",
        "free_bytes",
        "extents",
        "checkpoints_written",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert!(v["cleaner"]["segments_cleaned"].is_u64());
    let r = c.request("GET", "/v1/volumes/a", None).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    for k in [
        "name",
        "id",
        "size_bytes",
        "allocated_bytes",
        "zero_bytes",
        "extents",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
}

#[test]
fn tcp_requires_the_token() {
    let srv = TestServer::start(Listen::Tcp);
    let addr = srv.tcp_addr.unwrap();

    let good = Client::tcp(addr, TOKEN).unwrap();
    good.create_volume("t", 8192).unwrap();
    assert_eq!(good.list_volumes().unwrap().len(), 1);
    good.write("t", 0, &[3; 4096], false).unwrap();
    assert_eq!(good.read("t", 0, 4096).unwrap(), vec![3; 4096]);

    let wrong = Client::tcp(addr, "wrong-token-0123456789abcdef").unwrap();
    assert_eq!(
        api_kind(wrong.list_volumes().unwrap_err()),
        (401, ErrorKind::Unauthorized)
    );
    // A prefix of the right token is wrong too.
    let prefix = Client::tcp(addr, &TOKEN[..TOKEN.len() - 1]).unwrap();
    assert_eq!(
        api_kind(prefix.pool_info().unwrap_err()),
        (401, ErrorKind::Unauthorized)
    );
    // Unauthenticated writes do not happen.
    assert_eq!(
        api_kind(wrong.write("t", 0, &[9; 4096], false).unwrap_err()).1,
        ErrorKind::Unauthorized
    );
    assert_eq!(good.read("t", 0, 4096).unwrap(), vec![3; 4096]);

    // No header at all, on a known route and on an unknown one.
    let raw = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    for path in ["/v1/volumes", "/v1/nothing"] {
        let out = raw(path);
        assert!(out.starts_with("HTTP/1.1 401"), "{out}");
        assert!(
            out.to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{out}"
        );
        assert!(out.contains(r#""kind":"unauthorized""#), "{out}");
    }
}

#[test]
fn concurrent_clients() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    c.create_volume("c", 16 * MIB).unwrap();
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let c = c.clone();
            std::thread::spawn(move || {
                for i in 0..16u64 {
                    let off = (u64::from(t) * 16 + i) * 65536;
                    c.write("c", off, &vec![t + 1; 65536], false).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    c.flush().unwrap();
    for t in 0..4u8 {
        let off = u64::from(t) * 16 * 65536;
        assert_eq!(
            c.read("c", off, 16 * 65536).unwrap(),
            vec![t + 1; 16 * 65536]
        );
    }
}

// ----- snapshots, templates, clones, diffs -----

/// `sha256:<hex>` of `data`, as the daemon reports a template's digest.
fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    format!(
        "sha256:{}",
        vpool_api::catalog::hex(&sha2::Sha256::digest(data))
    )
}

fn read_all(c: &Client, vol: &str, snap: Option<&str>, len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while (out.len() as u64) < len {
        let n = (len - out.len() as u64).min(4 * MIB) as usize;
        out.extend(c.read_image(vol, snap, out.len() as u64, n).unwrap());
    }
    out
}

/// Asserts an API error's status and kind, and that its message names
/// every one of `names`.
fn assert_api_err(e: ClientError, status: u16, kind: ErrorKind, names: &[&str]) {
    let msg = e.to_string();
    assert_eq!(api_kind(e), (status, kind), "{msg}");
    for n in names {
        assert!(msg.contains(n), "{n:?} not named in: {msg}");
    }
}

#[test]
fn snapshot_routes() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    c.create_volume("web1", 4 * MIB).unwrap();
    c.write("web1", 0, &vec![1u8; MIB as usize], false).unwrap();

    // Create: 201 with a Location; the snapshot info.
    let r = c
        .request(
            "POST",
            "/v1/volumes/web1/snapshots",
            json(r#"{"name":"a"}"#),
        )
        .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("location"), Some("/v1/volumes/web1/snapshots/a"));
    let a: vpool_api::SnapshotInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!((a.volume.as_str(), a.name.as_str()), ("web1", "a"));
    assert_eq!((a.size_bytes, a.allocated_bytes), (4 * MIB, MIB));
    c.write("web1", 0, &vec![2u8; 4096], false).unwrap();
    c.resize_volume("web1", 8 * MIB, false, false).unwrap();
    let b = c.create_snapshot("web1", "b").unwrap();
    assert!(b.seq > a.seq);
    assert_eq!(b.size_bytes, 8 * MIB);
    let list = c.list_snapshots("web1").unwrap();
    let names: Vec<(&str, u64)> = list.iter().map(|s| (s.name.as_str(), s.seq)).collect();
    assert_eq!(names, vec![("a", a.seq), ("b", b.seq)]);
    // The list says what each snapshot holds alone: `a` alone has the block
    // overwritten after it; `b` shares everything with the volume.
    assert_eq!(list[0].exclusive_bytes, Some(4096));
    assert_eq!(list[0].shared_bytes, Some(MIB - 4096));
    assert_eq!(
        (list[1].exclusive_bytes, list[1].shared_bytes),
        (Some(0), Some(MIB))
    );
    let vol = c.volume_info("web1").unwrap();
    assert_eq!(
        (vol.exclusive_bytes, vol.shared_bytes),
        (Some(0), Some(MIB))
    );
    assert_eq!(c.snapshot_info("web1", "a").unwrap(), a);
    assert_eq!(c.volume_info("web1").unwrap().snapshots, 2);

    // Reading a snapshot: its content and allocation, not the volume's.
    let got = c.read_image("web1", Some("a"), 0, 8192).unwrap();
    assert_eq!(got, vec![1u8; 8192]);
    assert_eq!(c.read("web1", 0, 4096).unwrap(), vec![2u8; 4096]);
    let alloc = c.allocation_of("web1", Some("a"), 0, 4 * MIB).unwrap();
    assert!(!alloc.extents[0].hole && alloc.extents[0].length == MIB);
    assert_api_err(
        c.read_image("web1", Some("a"), 4 * MIB, 4096).unwrap_err(),
        416,
        ErrorKind::OutOfRange,
        &[],
    );
    assert_api_err(
        c.read_image("web1", Some("zz"), 0, 4096).unwrap_err(),
        404,
        ErrorKind::NotFound,
        &["web1@zz"],
    );

    // Errors: missing volume or snapshot, duplicates, names.
    assert_api_err(
        c.create_snapshot("nope", "x").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &["nope"],
    );
    assert_api_err(
        c.list_snapshots("nope").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    assert_api_err(
        c.snapshot_info("web1", "zz").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &["web1@zz"],
    );
    assert_api_err(
        c.create_snapshot("web1", "a").unwrap_err(),
        409,
        ErrorKind::AlreadyExists,
        &["web1@a"],
    );
    assert_api_err(
        c.create_snapshot("web1", "template").unwrap_err(),
        400,
        ErrorKind::Invalid,
        &["reserved"],
    );
    assert_api_err(
        c.create_snapshot("web1", "bad/name").unwrap_err(),
        400,
        ErrorKind::Invalid,
        &[],
    );
    for body in [r#"{"nam":"x"}"#, r#"{"name":"x","extra":1}"#, "not json"] {
        let r = c
            .request("POST", "/v1/volumes/web1/snapshots", json(body))
            .unwrap();
        assert_error(&r, 400, ErrorKind::Invalid);
    }
    assert_api_err(
        c.delete_snapshot("web1", "zz").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );

    // Rollback: content and size come back; later snapshots stay.
    let v = c.rollback("web1", "a", false).unwrap();
    assert_eq!(v.size_bytes, 4 * MIB);
    assert_eq!(c.read("web1", 0, 4096).unwrap(), vec![1u8; 4096]);
    assert_eq!(c.list_snapshots("web1").unwrap().len(), 2);
    assert_api_err(
        c.rollback("web1", "zz", false).unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    let r = c
        .request(
            "POST",
            "/v1/volumes/web1/snapshots/a/rollback?force=maybe",
            None,
        )
        .unwrap();
    assert_error(&r, 400, ErrorKind::Invalid);

    // Refused while an NBD client has the volume open for writing, unless
    // forced; a reader (of a snapshot export) does not count.
    let id = c.volume_info("web1").unwrap().id;
    assert_eq!(srv.catalog.nbd_open("web1", id, Access::Read), Access::Read);
    c.rollback("web1", "b", false).unwrap();
    assert_eq!(
        srv.catalog.nbd_open("web1", id, Access::Write),
        Access::Write
    );
    assert_api_err(
        c.rollback("web1", "a", false).unwrap_err(),
        409,
        ErrorKind::InUse,
        &["web1", "1 NBD client"],
    );
    assert_eq!(c.volume_info("web1").unwrap().size_bytes, 8 * MIB);
    // A missing snapshot is still a 404 while writers are connected.
    assert_api_err(
        c.rollback("web1", "zz", false).unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    assert_eq!(c.rollback("web1", "a", true).unwrap().size_bytes, 4 * MIB);
    srv.catalog.nbd_close(id, Access::Write, || {});
    srv.catalog.nbd_close(id, Access::Read, || {});
    c.rollback("web1", "b", false).unwrap();

    // Delete: refused while a clone depends on it, naming the clone.
    c.clone_volume("web1", Some("a"), "kid").unwrap();
    assert_api_err(
        c.delete_snapshot("web1", "a").unwrap_err(),
        409,
        ErrorKind::InUse,
        &["web1@a", "kid"],
    );
    c.delete_volume("kid", false).unwrap();
    let r = c
        .request("DELETE", "/v1/volumes/web1/snapshots/a", None)
        .unwrap();
    assert_eq!(r.status, 204);
    let left = c.list_snapshots("web1").unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!((left[0].name.as_str(), left[0].seq), ("b", b.seq));
}

#[test]
fn template_routes() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    let size = 6 * MIB;
    c.create_volume("deb", size).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let data: Vec<u8> = (0..2 * MIB).map(|_| rng.r#gen()).collect();
    c.write("deb", MIB, &data, false).unwrap();
    c.zero("deb", 2 * MIB, 4096, false, false).unwrap();
    let mut image = vec![0u8; size as usize];
    image[MIB as usize..3 * MIB as usize].copy_from_slice(&data);
    image[2 * MIB as usize..2 * MIB as usize + 4096].fill(0);

    // Sealing is refused while an NBD client has it open for writing.
    let id = c.volume_info("deb").unwrap().id;
    srv.catalog.nbd_open("deb", id, Access::Write);
    assert_api_err(
        c.make_template("deb").unwrap_err(),
        409,
        ErrorKind::InUse,
        &["deb", "NBD"],
    );
    srv.catalog.nbd_close(id, Access::Write, || {});
    assert!(c.volume_info("deb").unwrap().template.is_none());

    // Seal: the digest is SHA-256 over every byte, holes as zeros.
    let v = c.make_template("deb").unwrap();
    let t = v.template.clone().expect("template info");
    assert_eq!(t.snapshot, "template");
    assert_eq!(t.digest.as_deref(), Some(sha256(&image).as_str()));
    assert!(t.sealed_at_unix > 1_600_000_000);
    assert_eq!(without_space(c.volume_info("deb").unwrap()), v);
    assert_eq!(
        c.list_volumes().unwrap()[0].template.as_ref(),
        Some(&t),
        "the listing shows it too"
    );
    assert_eq!(c.list_snapshots("deb").unwrap()[0].name, "template");
    // An NBD client now only gets read access.
    assert_eq!(srv.catalog.nbd_open("deb", id, Access::Write), Access::Read);
    srv.catalog.nbd_close(id, Access::Read, || {});

    // Every change is refused with read_only; nothing changed.
    assert_api_err(
        c.write("deb", 0, &[1; 4096], false).unwrap_err(),
        409,
        ErrorKind::ReadOnly,
        &["template"],
    );
    assert_api_err(
        c.zero("deb", 0, 4096, true, false).unwrap_err(),
        409,
        ErrorKind::ReadOnly,
        &[],
    );
    assert_api_err(
        c.resize_volume("deb", 8 * MIB, false, false).unwrap_err(),
        409,
        ErrorKind::ReadOnly,
        &[],
    );
    c.create_snapshot("deb", "extra").unwrap();
    assert_api_err(
        c.rollback("deb", "extra", true).unwrap_err(),
        409,
        ErrorKind::ReadOnly,
        &[],
    );
    assert_api_err(
        c.delete_snapshot("deb", "template").unwrap_err(),
        409,
        ErrorKind::ReadOnly,
        &["deb@template"],
    );
    assert_api_err(
        c.make_template("deb").unwrap_err(),
        409,
        ErrorKind::AlreadyExists,
        &[],
    );
    assert_eq!(read_all(&c, "deb", None, size), image);

    // Clones: of the template (its sealed image), of a clone's snapshot.
    let r = c
        .request("POST", "/v1/volumes/deb/clone", json(r#"{"name":"web2"}"#))
        .unwrap();
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("location"), Some("/v1/volumes/web2"));
    let w2: vpool_api::VolumeInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(w2.parent.as_deref(), Some("deb@template"));
    assert!(w2.template.is_none());
    assert_eq!(read_all(&c, "web2", None, size), image);
    c.write("web2", 0, &[9; 4096], false).unwrap();
    c.create_snapshot("web2", "s").unwrap();
    let w3 = c.clone_volume("web2", Some("s"), "web3").unwrap();
    assert_eq!(w3.parent.as_deref(), Some("web2@s"));
    assert_eq!(c.read("web3", 0, 4096).unwrap(), vec![9; 4096]);
    assert_eq!(read_all(&c, "deb", None, size), image, "the template kept");

    // Clone errors.
    assert_api_err(
        c.clone_volume("web2", None, "x").unwrap_err(),
        400,
        ErrorKind::Invalid,
        &["not a template"],
    );
    assert_api_err(
        c.clone_volume("deb", None, "web2").unwrap_err(),
        409,
        ErrorKind::AlreadyExists,
        &["web2"],
    );
    assert_api_err(
        c.clone_volume("deb", Some("zz"), "x").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    assert_api_err(
        c.clone_volume("nope", None, "x").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    assert_api_err(
        c.clone_volume("deb", None, "bad name").unwrap_err(),
        400,
        ErrorKind::Invalid,
        &[],
    );

    // A clone cannot be committed into a template.
    assert_api_err(
        c.commit("web2", false).unwrap_err(),
        409,
        ErrorKind::ReadOnly,
        &["deb"],
    );
    // Deleting the template (or its image) is refused while clones depend
    // on it, naming them.
    assert_api_err(
        c.delete_volume("deb", false).unwrap_err(),
        409,
        ErrorKind::InUse,
        &["web2"],
    );
    assert_api_err(
        c.delete_snapshot("deb", "template").unwrap_err(),
        409,
        ErrorKind::InUse,
        &["web2"],
    );
    c.flatten("web2").unwrap();
    c.delete_volume("deb", false).unwrap();
    assert_api_err(
        c.volume_info("deb").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    // A new volume of the same name is not a template.
    c.create_volume("deb", 4096).unwrap();
    assert!(c.volume_info("deb").unwrap().template.is_none());
    c.write("deb", 0, &[1; 4096], false).unwrap();
    // Sealing errors: missing, ephemeral.
    assert_api_err(
        c.make_template("nope").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    c.create_volume_with("tmp", 4096, true).unwrap();
    assert_api_err(
        c.make_template("tmp").unwrap_err(),
        400,
        ErrorKind::Invalid,
        &["ephemeral"],
    );
}

/// A crash between writing the template record and taking the snapshot
/// (or hashing) is finished when the daemon next starts; records of
/// deleted volumes are dropped.
#[test]
fn interrupted_seal_is_finished_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn vpool_store::SegmentStore> =
        Arc::new(LocalDirStore::open(dir.path().join("pool")).unwrap());
    let config = PoolConfig {
        background: false,
        ..PoolConfig::default()
    };
    let (pool, _) = Pool::open(store.clone(), config).unwrap();
    let id = pool.create_volume("t", 64 * 1024).unwrap().id.0;
    pool.volume("t").unwrap().write(4096, &[7; 4096]).unwrap();
    let mut image = vec![0u8; 64 * 1024];
    image[4096..8192].fill(7);
    let record = format!(
        r#"{{"version":1,"templates":{{"t":{{"volume_id":{id},"digest":null,"sealed_at_unix":5}},"gone":{{"volume_id":99,"digest":"sha256:00","sealed_at_unix":5}}}}}}"#
    );
    store
        .put_meta(vpool_api::catalog::TEMPLATES_META_NAME, record.as_bytes())
        .unwrap();

    let catalog = Catalog::open(store.clone()).unwrap();
    assert!(
        catalog.template("t", id).is_some(),
        "sealed from the record on"
    );
    catalog.reconcile(&pool).unwrap();
    let t = catalog.template("t", id).unwrap();
    assert_eq!(t.digest.as_deref(), Some(sha256(&image).as_str()));
    assert_eq!(t.sealed_at_unix, 5);
    assert!(
        pool.list_snapshots("t")
            .unwrap()
            .iter()
            .any(|s| s.name == "template")
    );
    assert_eq!(catalog.templates().len(), 1, "the gone volume's record");
    // Saved: a fresh catalog reads the finished record.
    let again = Catalog::open(store).unwrap();
    assert_eq!(again.template("t", id), Some(t));
    // A damaged record blob is an error, not silently no templates.
    let store2: Arc<dyn vpool_store::SegmentStore> =
        Arc::new(LocalDirStore::open(dir.path().join("other")).unwrap());
    store2
        .put_meta(vpool_api::catalog::TEMPLATES_META_NAME, b"{not json")
        .unwrap();
    assert!(Catalog::open(store2).is_err());
    pool.close().unwrap();
}

#[test]
fn clone_flatten_commit_routes() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    c.create_volume("base", 2 * MIB).unwrap();
    c.write("base", 0, &[1; 8192], false).unwrap();
    c.create_snapshot("base", "s").unwrap();
    let k = c.clone_volume("base", Some("s"), "kid").unwrap();
    assert_eq!(k.parent.as_deref(), Some("base@s"));
    assert_eq!(c.read("kid", 0, 8192).unwrap(), vec![1; 8192]);
    c.write("kid", 4096, &[5; 4096], false).unwrap();
    c.resize_volume("kid", 3 * MIB, false, false).unwrap();
    assert_eq!(c.read("base", 4096, 4096).unwrap(), vec![1; 4096]);
    for body in [r#"{}"#, r#"{"name":"x","snap":"s"}"#] {
        let r = c
            .request("POST", "/v1/volumes/base/clone", json(body))
            .unwrap();
        assert_error(&r, 400, ErrorKind::Invalid);
    }

    // Commit: the parent takes the clone's content and size; refused while
    // the parent has NBD writers, unless forced.
    let pid = c.volume_info("base").unwrap().id;
    srv.catalog.nbd_open("base", pid, Access::Write);
    assert_api_err(
        c.commit("kid", false).unwrap_err(),
        409,
        ErrorKind::InUse,
        &["base"],
    );
    srv.catalog.nbd_close(pid, Access::Write, || {});
    let p = c.commit("kid", false).unwrap();
    assert_eq!((p.name.as_str(), p.size_bytes), ("base", 3 * MIB));
    assert_eq!(c.read("base", 0, 8192).unwrap()[4096..], [5; 4096]);
    assert_api_err(
        c.commit("base", false).unwrap_err(),
        400,
        ErrorKind::Invalid,
        &["not a clone"],
    );
    assert_api_err(
        c.commit("nope", false).unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );

    // Flatten: instant, the parent snapshot is free to go.
    let f = c.flatten("kid").unwrap();
    assert_eq!(f.volume.parent, None);
    assert_eq!(f.detached_from.as_deref(), Some("base@s"));
    assert_eq!(f.bytes_copied, 0);
    assert_eq!(c.read("kid", 0, 8192).unwrap()[4096..], [5; 4096]);
    c.delete_snapshot("base", "s").unwrap();
    assert_api_err(
        c.flatten("kid").unwrap_err(),
        400,
        ErrorKind::Invalid,
        &["not a clone"],
    );
    assert_api_err(
        c.flatten("nope").unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
}

#[test]
fn diff_routes() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    c.create_volume("w", 4 * MIB).unwrap();
    c.write("w", 0, &[1; 65536], false).unwrap();
    c.write("w", MIB, &[1; 65536], false).unwrap();
    c.create_snapshot("w", "a").unwrap();
    c.write("w", 8192, &[2; 4096], false).unwrap();
    c.zero("w", MIB, 65536, true, false).unwrap();
    c.create_snapshot("w", "b").unwrap();
    c.resize_volume("w", 8 * MIB, false, false).unwrap();
    c.write("w", 6 * MIB, &[3; 4096], false).unwrap();

    let d = c.diff("w", Some("a"), Some("b")).unwrap();
    let ext: Vec<(u64, u64, DiffKind)> = d
        .extents
        .iter()
        .map(|e| (e.offset, e.length, e.kind))
        .collect();
    assert_eq!(
        ext,
        vec![(8192, 4096, DiffKind::Data), (MIB, 65536, DiffKind::Zero)]
    );
    assert_eq!((d.from_size_bytes, d.size_bytes), (4 * MIB, 4 * MIB));
    assert_eq!(d.next_offset, None);
    // Against the live volume: grown, with data past the old end.
    let d = c.diff("w", Some("b"), None).unwrap();
    assert_eq!(d.to, None);
    assert_eq!(d.size_bytes, 8 * MIB);
    assert_eq!(
        d.extents
            .iter()
            .map(|e| (e.offset, e.length, e.kind))
            .collect::<Vec<_>>(),
        vec![(6 * MIB, 4096, DiffKind::Data)]
    );
    // The JSON as documented.
    let r = c
        .request("GET", "/v1/volumes/w/diff?from=a&to=b", None)
        .unwrap();
    assert_eq!(r.status, 200);
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        v["extents"][0],
        serde_json::json!({"offset": 8192, "length": 4096, "kind": "data"})
    );
    assert_eq!(v["extents"][1]["kind"], "zero");
    // From an offset: later extents only, the first one clipped.
    let p = c.diff_page("w", Some("a"), Some("b"), MIB + 4096).unwrap();
    assert_eq!(p.offset, MIB + 4096);
    assert_eq!(
        p.extents
            .iter()
            .map(|e| (e.offset, e.length))
            .collect::<Vec<_>>(),
        vec![(MIB + 4096, 65536 - 4096)]
    );
    // No change: nothing.
    assert!(
        c.diff("w", Some("a"), Some("a"))
            .unwrap()
            .extents
            .is_empty()
    );
    // Errors.
    assert_api_err(
        c.diff("w", Some("zz"), None).unwrap_err(),
        404,
        ErrorKind::NotFound,
        &["w@zz"],
    );
    assert_api_err(
        c.diff("nope", None, None).unwrap_err(),
        404,
        ErrorKind::NotFound,
        &[],
    );
    for q in ["offset=x", "frm=a", "offset=-1"] {
        let r = c
            .request("GET", &format!("/v1/volumes/w/diff?{q}"), None)
            .unwrap();
        assert_error(&r, 400, ErrorKind::Invalid);
    }
}

#[test]
fn ephemeral_volumes_are_marked() {
    let srv = TestServer::start(Listen::Unix);
    let c = srv.client();
    let r = c
        .request(
            "POST",
            "/v1/volumes",
            json(r#"{"name":"s","size_bytes":8192,"ephemeral":true}"#),
        )
        .unwrap();
    assert_eq!(r.status, 201);
    assert!(c.volume_info("s").unwrap().ephemeral);
    assert!(!c.create_volume("p", 8192).unwrap().ephemeral);
    let r = c
        .request(
            "POST",
            "/v1/volumes",
            json(r#"{"name":"t","size_bytes":8192,"ephemeral":"yes"}"#),
        )
        .unwrap();
    assert_error(&r, 400, ErrorKind::Invalid);
}

/// `GET /v1/volumes/{name}` adds the exclusive/shared split that the other
/// routes leave out; this drops it to compare with their answers.
fn without_space(mut v: vpool_api::VolumeInfo) -> vpool_api::VolumeInfo {
    v.exclusive_bytes = None;
    v.shared_bytes = None;
    v
}

// ----- limits on what a client holds -----

mod limits {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    use super::*;

    fn connect(srv: &TestServer) -> UnixStream {
        let s = UnixStream::connect(&srv.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    /// Reads until the server closes the connection; `None` if it did not
    /// within the socket's read timeout. Returns what was read.
    fn read_until_closed(s: &mut UnixStream) -> Option<Vec<u8>> {
        let mut all = Vec::new();
        let mut b = [0u8; 65536];
        loop {
            match s.read(&mut b) {
                Ok(0) => return Some(all),
                Ok(n) => all.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(all),
                Err(_) => return None,
            }
        }
    }

    /// Writes `bytes` one at a time, `every` apart, on a clone of `s`, until
    /// the socket fails or all are sent.
    fn trickle(s: &UnixStream, bytes: Vec<u8>, every: Duration) -> JoinHandle<()> {
        let mut w = s.try_clone().unwrap();
        std::thread::spawn(move || {
            for b in bytes {
                if w.write_all(&[b]).is_err() {
                    return;
                }
                std::thread::sleep(every);
            }
        })
    }

    fn short(header_ms: u64) -> ApiLimits {
        ApiLimits {
            header_read_timeout: Duration::from_millis(header_ms),
            ..ApiLimits::default()
        }
    }

    #[test]
    fn silent_and_slow_header_connections_are_dropped() {
        let srv = TestServer::start_with(Listen::Unix, short(500));
        // Silent.
        let mut s = connect(&srv);
        let t0 = Instant::now();
        assert_eq!(read_until_closed(&mut s), Some(Vec::new()));
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
        // A request head sent a byte every 50 ms: it would take 3 s.
        let mut s = connect(&srv);
        let head = b"GET /v1/pool HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        let t0 = Instant::now();
        let t = trickle(&s, head.to_vec(), Duration::from_millis(50));
        assert!(
            read_until_closed(&mut s).is_some(),
            "a slow head was waited for"
        );
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
        t.join().unwrap();
        srv.client().pool_info().unwrap();
    }

    #[test]
    fn an_idle_keep_alive_connection_is_closed() {
        let srv = TestServer::start_with(Listen::Unix, short(500));
        let mut s = connect(&srv);
        s.write_all(b"GET /v1/pool HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let t0 = Instant::now();
        let got = read_until_closed(&mut s).expect("an idle keep-alive connection stayed open");
        assert!(
            got.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        assert!(
            t0.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn a_connection_flood_is_capped() {
        let limits = ApiLimits {
            max_connections: 4,
            ..short(1000)
        };
        let srv = TestServer::start_with(Listen::Unix, limits);
        let flood: Vec<UnixStream> = (0..4).map(|_| connect(&srv)).collect();
        // Let the server accept them before the fifth arrives.
        std::thread::sleep(Duration::from_millis(100));
        let mut fifth = connect(&srv);
        let t0 = Instant::now();
        assert_eq!(read_until_closed(&mut fifth), Some(Vec::new()));
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "the fifth connection was not closed at once but after {:?}",
            t0.elapsed()
        );
        // The flood's silent connections go at the header timeout, and the
        // CLI gets in again.
        std::thread::sleep(Duration::from_millis(1200));
        srv.client().pool_info().unwrap();
        drop(flood);
    }

    #[test]
    fn a_slow_body_fails_with_timeout() {
        let limits = ApiLimits {
            body_read_timeout: Duration::from_millis(500),
            ..ApiLimits::default()
        };
        let srv = TestServer::start_with(Listen::Unix, limits);
        srv.client().create_volume("v", MIB).unwrap();
        let heads = [
            "PUT /v1/volumes/v/data?offset=0 HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n",
            "POST /v1/volumes HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        ];
        for head in heads {
            let mut s = connect(&srv);
            s.write_all(head.as_bytes()).unwrap();
            let t0 = Instant::now();
            let t = trickle(&s, vec![b' '; 60], Duration::from_millis(50));
            let got = read_until_closed(&mut s).expect("a slow body was waited for");
            let text = String::from_utf8_lossy(&got);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
            assert!(text.contains(r#""kind":"timeout""#), "{text}");
            assert!(
                t0.elapsed() < Duration::from_millis(2000),
                "{:?}",
                t0.elapsed()
            );
            t.join().unwrap();
        }
        assert_eq!(srv.client().read("v", 0, 4096).unwrap(), vec![0; 4096]);
    }

    #[test]
    fn a_response_the_client_does_not_read_is_abandoned() {
        let limits = ApiLimits {
            response_write_timeout: Duration::from_millis(500),
            ..ApiLimits::default()
        };
        let srv = TestServer::start_with(Listen::Unix, limits);
        let len = MAX_DATA_BYTES;
        srv.client().create_volume("v", len as u64).unwrap();
        let mut s = connect(&srv);
        write!(
            s,
            "GET /v1/volumes/v/data?offset=0&length={len} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        let got = read_until_closed(&mut s).expect("the server kept the connection");
        assert!(got.starts_with(b"HTTP/1.1 200"));
        assert!(
            got.len() < len,
            "the whole response ({} bytes) was kept for a client that did not read",
            got.len()
        );
        srv.client().pool_info().unwrap();
    }
}

/// Space accounting is O(snapshots x extents): past
/// `space_accounting_timeout` the answer comes without its figures (and
/// the work stops) rather than holding the request and a thread.
#[test]
fn space_accounting_past_its_deadline_answers_without_figures() {
    use std::time::{Duration, Instant};
    let limits = ApiLimits {
        space_accounting_timeout: Duration::from_millis(1),
        ..ApiLimits::default()
    };
    // 200 snapshots of a volume of 20,000 scattered extents, each 100
    // blocks apart from the last: accounting takes far over 1 ms (the
    // release build's bench takes 129 ms at 200 x 70k).
    let snapshots = 200u64;
    let srv = TestServer::start_populated(Listen::Unix, limits, |pool| {
        pool.create_volume("d", 256 * MIB).unwrap();
        let vol = pool.volume("d").unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for s in 0..snapshots {
            for _ in 0..100 {
                let block = rng.gen_range(0..(256 * MIB / 4096));
                vol.write(block * 4096, &[s as u8 + 1; 4096]).unwrap();
            }
            pool.create_snapshot("d", &format!("s{s}")).unwrap();
        }
    });
    let c = srv.client();
    let t0 = Instant::now();
    let info = c.volume_info("d").unwrap();
    assert_eq!((info.exclusive_bytes, info.shared_bytes), (None, None));
    let snaps = c.list_snapshots("d").unwrap();
    assert_eq!(snaps.len() as u64, snapshots);
    assert!(snaps.iter().all(|s| s.exclusive_bytes.is_none()));
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // The rest of the answer is there.
    assert_eq!((info.snapshots, info.size_bytes), (snapshots, 256 * MIB));
}
