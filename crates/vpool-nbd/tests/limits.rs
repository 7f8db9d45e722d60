//! What one client can hold is bounded: connections (per client and in
//! total, with idle connections making room), the handshake's duration, the
//! memory its requests pin, and the time its payloads and replies may take.
//! Each test abuses one limit with a raw socket, short timeouts keeping it
//! fast, and checks that a well-behaved client (often a real one) is still
//! served.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::clients::qemu_io;
use common::raw::*;
use common::*;
use vpool_nbd::proto::*;
use vpool_nbd::{ServerConfig, ServerHandle, ServerStats};

const MIB: u32 = 1 << 20;

/// True if the server closed `s` at once, without even a greeting: what a
/// refused connection sees.
fn refused(s: &mut impl Read) -> bool {
    let mut b = [0u8; 18];
    match s.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

fn tcp_addr(h: &ServerHandle) -> SocketAddr {
    match h.addr() {
        vpool_nbd::ListenAddr::Tcp(a) => *a,
        other => panic!("not TCP: {other:?}"),
    }
}

/// A TCP connection to `to` from the loopback address `from` (any of
/// 127.0.0.0/8), so one test can be several clients.
pub fn tcp_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    bind(&fd, &SocketAddrV4::new(from, 0)).expect("bind source address");
    connect(&fd, &to).expect("connect");
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

fn client_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// Connects with `connect` until the server admits the connection (instead
/// of closing it at once), then opens export `disk` on it. For connections
/// that need an idle one to make room: a connection counts as idle some
/// 200 watcher ticks after its last request, which a loaded machine
/// stretches.
fn admitted<S: Read + Write>(connect: impl Fn() -> S) -> S {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect();
        let mut g = [0u8; 18];
        if s.read_exact(&mut g).is_ok() {
            assert_eq!(&g[..8], &NBD_MAGIC.to_be_bytes());
            return go_after_greeting(s, "disk");
        }
        assert!(Instant::now() < deadline, "never admitted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One request that must succeed (the connection is alive and served).
fn flush_ok(s: &mut (impl Read + Write), handle: u64) {
    s.write_all(&request(NBD_CMD_FLUSH, 0, handle, 0, 0))
        .unwrap();
    assert_eq!(simple_reply(s), (0, handle));
}

/// Keeps writing one byte every `every` on a clone of `s` until the socket
/// fails or `for_at_most` passes.
fn trickle(s: &UnixStream, every: Duration, for_at_most: Duration) -> std::thread::JoinHandle<()> {
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        while t0.elapsed() < for_at_most && w.write_all(&[0]).is_ok() {
            std::thread::sleep(every);
        }
    })
}

#[test]
fn slow_loris_handshake_is_dropped_at_the_deadline() {
    let (reg, _) = registry_with("disk", u64::from(MIB));
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    let mut s = connect(&path);
    greeting(&mut s);
    s.write_all(&NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
        .unwrap();
    // An option that announces 1000 bytes of data, sent a byte at a time:
    // every read makes progress, but the handshake never ends.
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&1000u32.to_be_bytes());
    s.write_all(&hdr).unwrap();
    let t0 = Instant::now();
    let trickler = trickle(&s, Duration::from_millis(100), Duration::from_secs(8));
    assert!(
        closed_by_server(&mut s),
        "a trickling client was not dropped"
    );
    let took = t0.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "dropped after {took:?}, deadline 1 s"
    );
    trickler.join().unwrap();
    assert_eq!(srv.handle.stats().handshake_timeouts, 1);
    assert_healthy(&path);
}

#[test]
fn one_clients_flood_does_not_lock_out_another() {
    let (reg, _) = registry_with("disk", u64::from(MIB));
    let cfg = ServerConfig {
        max_connections: 8,
        max_connections_per_client: 4,
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    // This test process is one client (one pid): it gets four connections,
    // idle in transmission, and its fifth is closed at accept.
    let mut held: Vec<UnixStream> = (0..4).map(|_| open_export(&path, "disk")).collect();
    let mut fifth = connect(&path);
    assert!(refused(&mut fifth), "a fifth connection was accepted");
    // qemu-io is another process, so another client: it is served.
    let out = qemu_io(
        &srv.uri("disk"),
        &["write -P 0x5a 0 4k", "read -P 0x5a 0 4k"],
    );
    assert!(out.contains("read 4096/4096"), "{out}");
    for (i, s) in held.iter_mut().enumerate() {
        flush_ok(s, i as u64);
    }
    let st = srv.handle.stats();
    assert_eq!((st.refused_connections, st.evicted_connections), (1, 0));
}

#[test]
fn tcp_clients_are_told_apart_by_address_and_the_total_is_capped() {
    let (reg, _) = registry_with("disk", u64::from(MIB));
    let cfg = ServerConfig {
        max_connections: 6,
        max_connections_per_client: 3,
        ..ServerConfig::default()
    };
    let srv = start_tcp(reg, cfg);
    let addr = tcp_addr(&srv.handle);
    let a: Vec<TcpStream> = (0..3)
        .map(|_| go(tcp_from(client_ip(2), addr), "disk"))
        .collect();
    assert!(refused(&mut tcp_from(client_ip(2), addr)));
    // Another address is another client.
    let b: Vec<TcpStream> = (0..3)
        .map(|_| go(tcp_from(client_ip(3), addr), "disk"))
        .collect();
    // The server is full, and nobody has been idle for a minute.
    assert!(refused(&mut tcp_from(client_ip(4), addr)));
    assert_eq!(srv.handle.stats().refused_connections, 2);
    drop(a);
    // Slots come back when clients leave (unregistration is asynchronous).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut c = loop {
        let mut s = tcp_from(client_ip(4), addr);
        let mut g = [0u8; 18];
        if s.read_exact(&mut g).is_ok() {
            break s;
        }
        assert!(Instant::now() < deadline, "slots never freed");
        std::thread::sleep(Duration::from_millis(20));
    };
    c.write_all(&(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes())
        .unwrap();
    drop(b);
}

#[test]
fn a_full_server_evicts_an_idle_connection_of_the_biggest_client() {
    let (reg, disk) = registry_with("disk", u64::from(MIB));
    let slow = SlowDevice {
        inner: disk,
        slow_from: 0,
        delay: Duration::from_secs(2),
    };
    reg.insert("slow", "reads take 2 s", Arc::new(slow));
    let cfg = ServerConfig {
        max_connections: 4,
        max_connections_per_client: 3,
        evict_idle_after: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = start_tcp(reg, cfg);
    let addr = tcp_addr(&srv.handle);
    // Client .2 holds three idle connections; client .3 one with a request
    // in flight, which is never taken for idle.
    let mut a: Vec<TcpStream> = (0..3)
        .map(|_| go(tcp_from(client_ip(2), addr), "disk"))
        .collect();
    let mut b = go(tcp_from(client_ip(3), addr), "slow");
    b.write_all(&request(NBD_CMD_READ, 0, 7, 0, 512)).unwrap();
    // Nobody has been idle long enough yet: a newcomer is refused.
    assert!(refused(&mut tcp_from(client_ip(4), addr)));
    // Idle is noticed after 200 ms of quiet, and must last 300 ms.
    std::thread::sleep(Duration::from_millis(500));
    let mut c = admitted(|| tcp_from(client_ip(4), addr));
    flush_ok(&mut c, 3);
    // One of .2's connections made room (which one is
    // `limits::tests::victim_order`'s business).
    let closed: Vec<bool> = a
        .iter_mut()
        .map(|s| {
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            closed_by_server(s)
        })
        .collect();
    assert_eq!(
        closed.iter().filter(|&&c| c).count(),
        1,
        "exactly one connection of the biggest client goes: {closed:?}"
    );
    // The slow read in flight is answered.
    assert_eq!(simple_reply(&mut b), (0, 7));
    read_exact(&mut b, 512);
    let st = srv.handle.stats();
    assert!(st.refused_connections >= 1);
    assert_eq!(st.evicted_connections, 1);
}

#[test]
fn a_client_at_its_cap_replaces_its_own_idle_connection() {
    let (reg, _) = registry_with("disk", u64::from(MIB));
    let cfg = ServerConfig {
        max_connections_per_client: 2,
        evict_idle_after: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    let mut old = open_export(&path, "disk");
    let mut busy = open_export(&path, "disk");
    assert!(refused(&mut connect(&path)));
    std::thread::sleep(Duration::from_millis(500));
    // `busy` is used just now; `old` has been idle and goes.
    flush_ok(&mut busy, 1);
    let mut new = admitted(|| connect(&path));
    assert!(closed_by_server(&mut old));
    flush_ok(&mut new, 2);
    flush_ok(&mut busy, 3);
}

#[test]
fn a_client_that_never_reads_replies_holds_bounded_memory() {
    let (reg, _) = registry_with("disk", 64 * u64::from(MIB));
    let per_conn = 4 * MIB as usize;
    let per_client = 6 * MIB as usize;
    let cfg = ServerConfig {
        max_in_flight_bytes_per_connection: per_conn,
        max_in_flight_bytes_per_client: per_client,
        max_in_flight_bytes_total: 7 * MIB as usize,
        reply_write_timeout: Duration::from_secs(6),
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    // 64 one-MiB reads, and never a reply read.
    let mut batch = Vec::new();
    for h in 0..64u64 {
        batch.extend(request(NBD_CMD_READ, 0, h, h * u64::from(MIB), MIB));
    }
    let mut a = open_export(&path, "disk");
    a.write_all(&batch).unwrap();
    let peak = peak_in_flight(&srv.handle, 0);
    assert!(
        peak > 0 && peak <= per_conn,
        "one connection holds {peak} bytes"
    );
    // A second connection of the same client (this process) adds to what
    // the first holds (which it never gives back: nothing is read), within
    // the client's budget. How much each holds depends on how many of its
    // requests were read before its replies blocked, so the first need
    // not have filled its own budget.
    let one = srv.handle.stats().in_flight_bytes;
    let mut b = open_export(&path, "disk");
    b.write_all(&batch).unwrap();
    let peak = peak_in_flight(&srv.handle, one);
    assert!(
        peak > one && peak <= per_client,
        "the client holds {peak} bytes, its first connection {one}"
    );
    // Another client (a real one) still has memory to be served at once,
    // not after the write timeout.
    let t0 = Instant::now();
    let out = qemu_io(&srv.uri("disk"), &["read -P 0 0 1M"]);
    assert!(out.contains("read 1048576/1048576"), "{out}");
    assert!(
        t0.elapsed() < Duration::from_millis(4500),
        "{:?}",
        t0.elapsed()
    );
    // A read that does not fit in what is left of the total (when the two
    // hold more than 5 MiB) waits, and does not fail, until the
    // never-reading connections are dropped at the write timeout.
    let out = qemu_io(&srv.uri("disk"), &["read -P 0 0 2M"]);
    assert!(out.contains("read 2097152/2097152"), "{out}");
    // Both are dropped (reading from one before would make it a client
    // that reads its replies, and keep it served).
    let st = wait_for_stats(&srv.handle, |st| st.io_timeouts == 2 && st.connections == 0);
    assert_eq!(st.in_flight_bytes, 0);
    assert!(closed_by_server(&mut a) && closed_by_server(&mut b));
}

/// Polls the server's stats until `done` holds (or fails after 10 s).
fn wait_for_stats(h: &ServerHandle, done: impl Fn(&ServerStats) -> bool) -> ServerStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = h.stats();
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "stats never got there: {st:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The most bytes in flight seen: sampled until more than `above` is held
/// (at most 5 s: a loaded machine can be slow to read the requests), then
/// 300 ms more to catch an overshoot.
fn peak_in_flight(h: &ServerHandle, above: usize) -> usize {
    let t0 = Instant::now();
    let mut peak = 0;
    while peak <= above && t0.elapsed() < Duration::from_secs(5) {
        peak = peak.max(h.stats().in_flight_bytes);
        std::thread::sleep(Duration::from_millis(1));
    }
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_millis(300) {
        peak = peak.max(h.stats().in_flight_bytes);
        std::thread::sleep(Duration::from_millis(1));
    }
    peak
}

#[test]
fn a_write_payload_must_arrive_in_time() {
    let (reg, _) = registry_with("disk", u64::from(MIB));
    let cfg = ServerConfig {
        request_read_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    for len in [1000, MIB] {
        // A WRITE whose payload trickles in: it holds memory meanwhile.
        let mut s = open_export(&path, "disk");
        s.write_all(&request(NBD_CMD_WRITE, 0, 1, 0, len)).unwrap();
        s.write_all(&[7u8; 100]).unwrap();
        let t0 = Instant::now();
        let trickler = trickle(&s, Duration::from_millis(100), Duration::from_secs(8));
        assert!(
            closed_by_server(&mut s),
            "a trickled payload was waited for"
        );
        let took = t0.elapsed();
        assert!(took < Duration::from_millis(2500), "dropped after {took:?}");
        trickler.join().unwrap();
    }
    let st = srv.handle.stats();
    assert_eq!((st.io_timeouts, st.in_flight_bytes), (2, 0));
    assert_healthy(&path);
}

#[test]
fn a_connection_s_slow_requests_are_capped_and_the_stall_is_reported() {
    let reg = Arc::new(vpool_nbd::MemRegistry::new());
    let inner = Arc::new(vpool_nbd::MemDevice::new(4 * u64::from(MIB)));
    let delay = Duration::from_millis(400);
    reg.insert(
        "disk",
        "",
        Arc::new(SlowDevice {
            inner,
            slow_from: 0,
            delay,
        }),
    );
    let cap = 4;
    let cfg = ServerConfig {
        max_in_flight_per_connection: cap,
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    let mut s = open_export(&path, "disk");
    let mut batch = Vec::new();
    for h in 0..(2 * cap as u64) {
        batch.extend(request(NBD_CMD_READ, 0, h, h * 4096, 512));
    }
    let t0 = Instant::now();
    s.write_all(&batch).unwrap();
    for _ in 0..2 * cap {
        let (e, _) = simple_reply(&mut s);
        assert_eq!(e, 0);
        read_exact(&mut s, 512);
    }
    let took = t0.elapsed();
    // Concurrent up to the cap: two rounds of the delay, not eight.
    assert!(took < delay * 6, "8 slow reads at a cap of 4 took {took:?}");
    let st = srv.handle.stats();
    assert!(
        st.request_cap_stalls >= 1,
        "the cap was reached but not reported: {st:?}"
    );
    // Counted once per stall, not once per watcher tick.
    assert!(st.request_cap_stalls <= 2 * cap as u64, "{st:?}");
    flush_ok(&mut s, 99);
}

#[test]
fn a_connection_over_its_byte_budget_waits_and_it_is_reported() {
    let reg = Arc::new(vpool_nbd::MemRegistry::new());
    let inner = Arc::new(vpool_nbd::MemDevice::new(16 * u64::from(MIB)));
    reg.insert(
        "disk",
        "",
        Arc::new(SlowDevice {
            inner,
            slow_from: 0,
            delay: Duration::from_millis(300),
        }),
    );
    let cfg = ServerConfig {
        max_in_flight_bytes_per_connection: 2 * MIB as usize,
        ..ServerConfig::default()
    };
    let srv = start_unix(reg, cfg);
    let path = srv.socket_path().unwrap();
    let mut s = open_export(&path, "disk");
    // Six slow 1 MiB reads: two fit the budget, the rest wait for them.
    let mut batch = Vec::new();
    for h in 0..6u64 {
        batch.extend(request(NBD_CMD_READ, 0, h, h * u64::from(MIB), MIB));
    }
    s.write_all(&batch).unwrap();
    let mut peak = 0;
    for _ in 0..6 {
        peak = peak.max(srv.handle.stats().in_flight_bytes);
        let (e, _) = simple_reply(&mut s);
        assert_eq!(e, 0);
        read_exact(&mut s, MIB as usize);
    }
    assert!(peak <= 2 * MIB as usize, "{peak} bytes in flight");
    let st = srv.handle.stats();
    assert!(
        st.budget_waits >= 1,
        "the budget was spent but no wait reported: {st:?}"
    );
    flush_ok(&mut s, 99);
}
