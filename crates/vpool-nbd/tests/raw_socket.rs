//! Hostile and edge-case clients written against the raw socket: truncated
//! and garbage input, oversized lengths, limits, ordering, and shutdown. After
//! each abuse a fresh well-behaved client must still be served.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::raw::*;
use common::*;
use vpool_nbd::proto::*;
use vpool_nbd::{MemDevice, MemRegistry, ServerConfig};

const MIB: u64 = 1 << 20;

fn server() -> (TestServer, Arc<MemDevice>) {
    let (reg, dev) = registry_with("disk", 4 * MIB);
    (start_unix(reg, ServerConfig::default()), dev)
}

#[test]
fn half_header_then_disconnect() {
    let (srv, _) = server();
    let path = srv.socket_path().unwrap();
    // Half a request header.
    let mut s = open_export(&path, "disk");
    s.write_all(&request(NBD_CMD_READ, 0, 1, 0, 512)[..13])
        .unwrap();
    drop(s);
    // Half a write payload.
    let mut s = open_export(&path, "disk");
    let mut w = request(NBD_CMD_WRITE, 0, 1, 0, 4096);
    w.extend_from_slice(&[1u8; 100]);
    s.write_all(&w).unwrap();
    drop(s);
    // Half a handshake option.
    let mut s = connect(&path);
    greeting(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    assert_healthy(&path);
}

#[test]
fn garbage_magic_in_handshake_and_transmission() {
    let (srv, _) = server();
    let path = srv.socket_path().unwrap();
    let mut s = connect(&path);
    greeting(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(b"GARBAGE!GARBAGE!").unwrap();
    assert!(closed_by_server(&mut s), "bad option magic must disconnect");

    let mut s = connect(&path);
    greeting(&mut s);
    s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap();
    assert!(
        closed_by_server(&mut s),
        "unknown client flags must disconnect"
    );

    let mut s = open_export(&path, "disk");
    s.write_all(&[0xde; 28]).unwrap();
    assert!(
        closed_by_server(&mut s),
        "bad request magic must disconnect"
    );
    assert_healthy(&path);
}

#[test]
fn oversized_option_and_write() {
    let (srv, _) = server();
    let path = srv.socket_path().unwrap();
    let mut s = connect(&path);
    greeting(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&v).unwrap();
    assert!(
        closed_by_server(&mut s),
        "oversized option length must disconnect"
    );

    // WRITE longer than max_request_bytes: error reply, then disconnect.
    let mut s = open_export(&path, "disk");
    s.write_all(&request(NBD_CMD_WRITE, 0, 9, 0, 64 * 1024 * 1024))
        .unwrap();
    assert_eq!(simple_reply(&mut s), (NBD_EINVAL, 9));
    assert!(closed_by_server(&mut s));

    // READ longer than the maximum block size: EINVAL, connection survives.
    let mut s = open_export(&path, "disk");
    s.write_all(&request(NBD_CMD_READ, 0, 10, 0, 64 * 1024 * 1024))
        .unwrap();
    assert_eq!(simple_reply(&mut s), (NBD_EINVAL, 10));
    s.write_all(&request(NBD_CMD_FLUSH, 0, 11, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 11));
    assert_healthy(&path);
}

#[test]
fn unknown_command_flags_and_ranges() {
    let (srv, _) = server();
    let path = srv.socket_path().unwrap();
    let mut s = open_export(&path, "disk");
    let cases: [(Vec<u8>, u32); 7] = [
        (request(42, 0, 1, 0, 0), NBD_EINVAL),
        (request(NBD_CMD_READ, 1 << 7, 2, 0, 512), NBD_EINVAL),
        (request(NBD_CMD_READ, 0, 3, 4 * MIB, 512), NBD_EINVAL),
        (request(NBD_CMD_TRIM, 0, 4, u64::MAX - 10, 512), NBD_EINVAL),
        (
            request(NBD_CMD_WRITE_ZEROES, 0, 5, 4 * MIB - 512, 1024),
            NBD_ENOSPC,
        ),
        // Block status without a negotiated context.
        (request(NBD_CMD_BLOCK_STATUS, 0, 6, 0, 512), NBD_EINVAL),
        (
            request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_REQ_ONE, 7, 0, 512),
            NBD_EINVAL,
        ),
    ];
    for (req, errno) in &cases {
        s.write_all(req).unwrap();
        let (e, h) = simple_reply(&mut s);
        assert_eq!(e, *errno, "handle {h}");
    }
    // A rejected WRITE's payload is consumed; the stream stays in sync.
    let mut w = request(NBD_CMD_WRITE, 0, 8, 4 * MIB, 512);
    w.extend_from_slice(&[7u8; 512]);
    w.extend(request(NBD_CMD_READ, 0, 9, 0, 512));
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (NBD_ENOSPC, 8));
    assert_eq!(simple_reply(&mut s), (0, 9));
    read_exact(&mut s, 512);
}

#[test]
fn read_only_export_refuses_writes() {
    let reg = Arc::new(MemRegistry::new());
    reg.insert("disk", "", Arc::new(MemDevice::new(MIB)));
    reg.insert("ro", "", Arc::new(MemDevice::read_only_from(&[9u8; 4096])));
    let srv = start_unix(reg, ServerConfig::default());
    let path = srv.socket_path().unwrap();
    let mut s = open_export(&path, "ro");
    let mut w = request(NBD_CMD_WRITE, 0, 1, 0, 512);
    w.extend_from_slice(&[0u8; 512]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (NBD_EPERM, 1));
    s.write_all(&request(NBD_CMD_TRIM, 0, 2, 0, 512)).unwrap();
    assert_eq!(simple_reply(&mut s), (NBD_EPERM, 2));
    s.write_all(&request(NBD_CMD_READ, 0, 3, 0, 16)).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 3));
    assert_eq!(read_exact(&mut s, 16), vec![9u8; 16]);
}

#[test]
fn structured_replies_and_block_status() {
    let (srv, dev) = server();
    let path = srv.socket_path().unwrap();
    dev.fill(8192, &[5u8; 4096]);
    let mut s = connect(&path);
    greeting(&mut s);
    s.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    send_opt(&mut s, NBD_OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ACK);
    let mut meta = 4u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    send_opt(&mut s, NBD_OPT_SET_META_CONTEXT, &meta);
    let (_, t, p) = opt_reply(&mut s);
    assert_eq!(t, NBD_REP_META_CONTEXT);
    let ctx = u32::from_be_bytes(p[..4].try_into().unwrap());
    assert_eq!(&p[4..], b"base:allocation");
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ACK);
    send_opt(&mut s, NBD_OPT_EXPORT_NAME, b"disk");
    let r = read_exact(&mut s, 10);
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 4 * MIB);

    s.write_all(&request(NBD_CMD_BLOCK_STATUS, 0, 1, 0, 16384))
        .unwrap();
    let h = read_exact(&mut s, 20);
    assert_eq!(&h[..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([h[6], h[7]]),
        NBD_REPLY_TYPE_BLOCK_STATUS
    );
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let body = read_exact(&mut s, len);
    assert_eq!(u32::from_be_bytes(body[..4].try_into().unwrap()), ctx);
    let ext: Vec<(u32, u32)> = body[4..]
        .chunks(8)
        .map(|c| {
            (
                u32::from_be_bytes(c[..4].try_into().unwrap()),
                u32::from_be_bytes(c[4..].try_into().unwrap()),
            )
        })
        .collect();
    assert_eq!(ext, vec![(8192, 3), (4096, 0), (4096, 3)]);

    // Structured read: one OFFSET_DATA chunk with DONE; errors are ERROR chunks.
    s.write_all(&request(NBD_CMD_READ, 0, 2, 8192, 16)).unwrap();
    let h = read_exact(&mut s, 20);
    assert_eq!(u16::from_be_bytes([h[4], h[5]]), NBD_REPLY_FLAG_DONE);
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), NBD_REPLY_TYPE_OFFSET_DATA);
    let body = read_exact(&mut s, 24);
    assert_eq!(u64::from_be_bytes(body[..8].try_into().unwrap()), 8192);
    assert_eq!(&body[8..], &[5u8; 16]);
    s.write_all(&request(NBD_CMD_READ, 0, 3, 4 * MIB, 16))
        .unwrap();
    let h = read_exact(&mut s, 20);
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), NBD_REPLY_TYPE_ERROR);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let body = read_exact(&mut s, len);
    assert_eq!(
        u32::from_be_bytes(body[..4].try_into().unwrap()),
        NBD_EINVAL
    );
}

#[test]
fn slow_request_does_not_block_others_and_replies_out_of_order() {
    let reg = Arc::new(MemRegistry::new());
    let inner = Arc::new(MemDevice::new(4 * MIB));
    reg.insert(
        "disk",
        "",
        Arc::new(SlowDevice {
            inner,
            slow_from: 2 * MIB,
            delay: Duration::from_millis(400),
        }),
    );
    let srv = start_unix(reg, ServerConfig::default());
    let path = srv.socket_path().unwrap();
    let mut s = open_export(&path, "disk");
    let mut batch = request(NBD_CMD_READ, 0, 100, 2 * MIB, 512);
    for h in 0..20u64 {
        batch.extend(request(NBD_CMD_READ, 0, h, 0, 512));
    }
    let t0 = Instant::now();
    s.write_all(&batch).unwrap();
    let mut order = Vec::new();
    for _ in 0..21 {
        let (e, h) = simple_reply(&mut s);
        assert_eq!(e, 0);
        read_exact(&mut s, 512);
        order.push((h, t0.elapsed()));
    }
    assert_eq!(
        order.last().unwrap().0,
        100,
        "slow read should be answered last: {order:?}"
    );
    assert!(
        order[19].1 < Duration::from_millis(300),
        "fast reads waited for the slow one: {order:?}"
    );
}

#[test]
fn limits_connections_and_handshake_timeout() {
    let (reg, _) = registry_with("disk", MIB);
    let cfg = ServerConfig {
        max_connections: 2,
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    let mut a = open_export(&path, "disk");
    let mut b = open_export(&path, "disk");
    let mut c = connect(&path);
    assert!(closed_by_server(&mut c), "third connection must be refused");
    drop(b.write_all(&request(NBD_CMD_DISC, 0, 0, 0, 0)));
    assert!(closed_by_server(&mut b));
    // A slot is free again (the server unregisters asynchronously).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut idle = loop {
        let mut s = connect(&path);
        let mut g = [0u8; 18];
        if s.read_exact(&mut g).is_ok() {
            break s;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(20));
    };
    // An idle client in the handshake is dropped after the timeout.
    let t0 = Instant::now();
    assert!(closed_by_server(&mut idle));
    assert!(t0.elapsed() < Duration::from_secs(5));
    a.write_all(&request(NBD_CMD_FLUSH, 0, 5, 0, 0)).unwrap();
    assert_eq!(simple_reply(&mut a), (0, 5));
}

#[test]
fn abort_list_and_unsupported_options() {
    let (srv, _) = server();
    let path = srv.socket_path().unwrap();
    let mut s = connect(&path);
    greeting(&mut s);
    s.write_all(&1u32.to_be_bytes()).unwrap();
    send_opt(&mut s, 0x1234, b"whatever");
    assert_eq!(
        opt_reply(&mut s),
        (0x1234, NBD_REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    send_opt(&mut s, NBD_OPT_STARTTLS, &[]);
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ERR_POLICY);
    send_opt(&mut s, NBD_OPT_LIST, &[]);
    let (_, t, p) = opt_reply(&mut s);
    assert_eq!(t, NBD_REP_SERVER);
    assert_eq!(&p[4..8], b"disk");
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ACK);
    send_opt(&mut s, NBD_OPT_ABORT, &[]);
    assert_eq!(opt_reply(&mut s).1, NBD_REP_ACK);
    assert!(closed_by_server(&mut s));
}

#[test]
fn shutdown_finishes_in_flight_and_flushes() {
    let reg = Arc::new(MemRegistry::new());
    let inner = Arc::new(MemDevice::new(4 * MIB));
    reg.insert(
        "disk",
        "",
        Arc::new(SlowDevice {
            inner: inner.clone(),
            slow_from: 2 * MIB,
            delay: Duration::from_millis(300),
        }),
    );
    let srv = start_unix(reg, ServerConfig::default());
    let path = srv.socket_path().unwrap();
    let mut s = open_export(&path, "disk");
    let mut w = request(NBD_CMD_WRITE, 0, 1, 0, 512);
    w.extend_from_slice(&[3u8; 512]);
    s.write_all(&w).unwrap();
    assert_eq!(simple_reply(&mut s), (0, 1));
    s.write_all(&request(NBD_CMD_READ, 0, 2, 2 * MIB, 512))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let flushes_before = inner.flush_count();
    let t = std::thread::spawn(move || srv.handle.shutdown());
    // The in-flight slow read is still answered.
    assert_eq!(simple_reply(&mut s), (0, 2));
    read_exact(&mut s, 512);
    assert!(closed_by_server(&mut s));
    t.join().unwrap().unwrap();
    assert!(
        inner.flush_count() > flushes_before,
        "device not flushed on shutdown"
    );
    assert!(
        UnixStream::connect(&path).is_err(),
        "server still accepting after shutdown"
    );
}

#[test]
fn tcp_raw_client() {
    let (reg, _) = registry_with("disk", MIB);
    let srv = start_tcp(reg, ServerConfig::default());
    let addr = match srv.handle.addr() {
        vpool_nbd::ListenAddr::Tcp(a) => *a,
        other => panic!("{other:?}"),
    };
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&1u32.to_be_bytes()).unwrap();
    s.write_all(&[0u8; 7]).unwrap();
    drop(s);
    // Still serving.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.read_exact(&mut g).unwrap();
    assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
}
