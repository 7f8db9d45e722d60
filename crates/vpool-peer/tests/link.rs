//! The link end to end on loopback: a server over `MemDevice` exports and
//! a client session.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use vpool_nbd::{BlockDevice, DeviceError, DeviceErrorKind, MemDevice};
use vpool_peer::{PeerBackend, PeerError, Refusal, Secret, Session};

struct Mem {
    disk: Arc<MemDevice>,
    released: AtomicU64,
}

impl PeerBackend for Mem {
    fn secret(&self, pool: &str) -> Option<Secret> {
        (pool == "shared").then_some(Secret([3; 32]))
    }
    fn open(&self, _pool: &str, image: &str) -> Result<Arc<dyn BlockDevice>, Refusal> {
        match image {
            "db1" => Ok(self.disk.clone()),
            "moved" => Err(Refusal::Busy("not owned here".into())),
            _ => Err(Refusal::Device(DeviceError::not_found(format!(
                "no volume {image}"
            )))),
        }
    }
    fn connections(&self, _pool: &str, _volume: &str) -> Result<u64, DeviceError> {
        Ok(2)
    }
    fn release(&self, _pool: &str, volume: &str) -> Result<(), Refusal> {
        if volume == "busy" {
            return Err(Refusal::Busy("volume busy has 1 client".into()));
        }
        self.released.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

fn server() -> (vpool_peer::PeerServer, Arc<Mem>, String) {
    let backend = Arc::new(Mem {
        disk: Arc::new(MemDevice::new(1 << 20)),
        released: AtomicU64::new(0),
    });
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = vpool_peer::spawn(l, backend.clone()).unwrap();
    let addr = s.addr().to_string();
    (s, backend, addr)
}

#[test]
fn forwarded_io_reaches_the_owner_s_device() {
    let (srv, backend, addr) = server();
    let mut s = Session::connect(&addr, "shared", &Secret([3; 32])).unwrap();
    assert_eq!(s.open("db1").unwrap(), (1 << 20, false));
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    s.write(4096, &data).unwrap();
    s.flush().unwrap();
    let mut back = vec![0u8; 8192];
    s.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(backend.disk.snapshot()[4096..4096 + 8192], data[..]);
    s.write_zeroes(4096, 4096, true).unwrap();
    s.trim(8192, 4096).unwrap();
    s.read(4096, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0));
    assert!(backend.disk.flush_count() >= 1);
    // Out of range: an error for the request, the session goes on.
    match s.read((1 << 20) - 4096, &mut back) {
        Err(PeerError::Device(e)) => assert_eq!(e.kind, DeviceErrorKind::Invalid),
        other => panic!("{other:?}"),
    }
    assert!(
        matches!(s.open("nope"), Err(PeerError::Device(e)) if e.kind == DeviceErrorKind::NotFound)
    );
    assert!(matches!(s.open("moved"), Err(PeerError::Busy(_))));
    assert_eq!(s.connections("db1").unwrap(), 2);
    assert!(matches!(s.release("busy"), Err(PeerError::Busy(m)) if m.contains("1 client")));
    s.release("db1").unwrap();
    assert_eq!(backend.released.load(Ordering::SeqCst), 1);
    s.close().unwrap();
    srv.shutdown();
}

#[test]
fn a_peer_without_the_secret_is_refused() {
    let (srv, _backend, addr) = server();
    assert!(matches!(
        Session::connect(&addr, "shared", &Secret([4; 32])),
        Err(PeerError::Auth { .. })
    ));
    assert!(matches!(
        Session::connect(&addr, "other", &Secret([3; 32])),
        Err(PeerError::Auth { .. })
    ));
    assert_eq!(srv.stats.refused_auth.load(Ordering::Relaxed), 2);
    // Garbage instead of a handshake ends that session only.
    {
        use std::io::{Read, Write};
        let mut raw = std::net::TcpStream::connect(&addr).unwrap();
        let mut hello = [0u8; 40];
        raw.read_exact(&mut hello).unwrap();
        raw.write_all(&[0xff; 200]).unwrap();
        let mut rest = Vec::new();
        let _ = raw.read_to_end(&mut rest);
    }
    let mut s = Session::connect(&addr, "shared", &Secret([3; 32])).unwrap();
    assert_eq!(s.open("db1").unwrap().0, 1 << 20);
    srv.shutdown();
}
