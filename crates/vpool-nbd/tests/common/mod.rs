//! Shared test support: in-process servers over test devices, and the
//! real-client helpers in [`clients`].

#![allow(dead_code)]

pub mod clients;
pub mod raw;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use vpool_nbd::{BlockDevice, DeviceError, MemDevice, MemRegistry, ServerConfig, ServerHandle};

/// A server on a temporary Unix socket (or TCP) plus its registry.
pub struct TestServer {
    pub handle: ServerHandle,
    pub registry: Arc<MemRegistry>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub fn uri(&self, export: &str) -> String {
        self.handle.uri(export)
    }

    pub fn socket_path(&self) -> Option<PathBuf> {
        match self.handle.addr() {
            vpool_nbd::ListenAddr::Unix(p) => p.clone(),
            vpool_nbd::ListenAddr::Tcp(_) => None,
        }
    }
}

/// Start a server on a fresh Unix socket in a temp dir.
pub fn start_unix(registry: Arc<MemRegistry>, cfg: ServerConfig) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("nbd.sock");
    let l = std::os::unix::net::UnixListener::bind(&path).expect("bind unix socket");
    let handle = vpool_nbd::spawn(
        l,
        registry.clone() as Arc<dyn vpool_nbd::ExportRegistry>,
        cfg,
    )
    .expect("spawn server");
    TestServer {
        handle,
        registry,
        _dir: dir,
    }
}

/// Start a server on 127.0.0.1 with an ephemeral port.
pub fn start_tcp(registry: Arc<MemRegistry>, cfg: ServerConfig) -> TestServer {
    let dir = tempfile::tempdir().expect("tempdir");
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    let handle = vpool_nbd::spawn(
        l,
        registry.clone() as Arc<dyn vpool_nbd::ExportRegistry>,
        cfg,
    )
    .expect("spawn server");
    TestServer {
        handle,
        registry,
        _dir: dir,
    }
}

/// Registry with one writable MemDevice export.
pub fn registry_with(name: &str, size: u64) -> (Arc<MemRegistry>, Arc<MemDevice>) {
    let r = Arc::new(MemRegistry::new());
    let d = Arc::new(MemDevice::new(size));
    r.insert(name, &format!("test export {name}"), d.clone());
    (r, d)
}

/// Deterministic pseudo-random bytes (xorshift), with zero runs so that
/// sparse copies have something to detect.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    // Every fourth 64 KiB block is zero.
    for (i, chunk) in v.chunks_mut(64 * 1024).enumerate() {
        if i % 4 == 1 {
            chunk.fill(0);
        }
    }
    v
}

/// Wraps a MemDevice; reads at or past `slow_from` sleep `delay` first.
/// Used to show stall takeover and out-of-order replies.
pub struct SlowDevice {
    pub inner: Arc<MemDevice>,
    pub slow_from: u64,
    pub delay: Duration,
}

impl BlockDevice for SlowDevice {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        if offset >= self.slow_from {
            std::thread::sleep(self.delay);
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.inner.write(offset, data)
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.trim(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.inner.write_zeroes(offset, len, may_trim)
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.inner.block_status(offset, len)
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
}
