//! In-memory devices and registry, for tests and benchmarks.
//!
//! [`MemDevice`] stores data in fixed-size chunks allocated on first write, so
//! unwritten and trimmed ranges are real holes that `base:allocation` reports
//! (`qemu-img map`, `nbdinfo --map` and sparse `nbdcopy` see them). Each chunk
//! has its own lock, so requests from many connections proceed in parallel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::device::{BlockDevice, DeviceError, DeviceErrorKind, ExportInfo, ExportRegistry};
use crate::proto::{NBD_STATE_HOLE, NBD_STATE_ZERO};

/// Smallest allocation unit; matches the usual 4 KiB guest block.
const MIN_CHUNK: u64 = 4096;
/// Chunk table entries are capped so a huge sparse device stays cheap; the
/// chunk size grows instead.
const MAX_CHUNKS: u64 = 1 << 20;

/// A sparse in-memory block device.
pub struct MemDevice {
    size: u64,
    chunk: u64,
    read_only: bool,
    multi_conn: bool,
    chunks: Vec<RwLock<Option<Box<[u8]>>>>,
    flushes: AtomicU64,
    writes: AtomicU64,
}

impl std::fmt::Debug for MemDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemDevice")
            .field("size", &self.size)
            .field("chunk", &self.chunk)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl MemDevice {
    /// A writable, all-zero (fully sparse) device of `size` bytes.
    pub fn new(size: u64) -> Self {
        let mut chunk = MIN_CHUNK;
        while size.div_ceil(chunk) > MAX_CHUNKS {
            chunk *= 2;
        }
        let n = size.div_ceil(chunk);
        let mut chunks = Vec::with_capacity(n as usize);
        chunks.resize_with(n as usize, || RwLock::new(None));
        MemDevice {
            size,
            chunk,
            read_only: false,
            multi_conn: true,
            chunks,
            flushes: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        }
    }

    /// A read-only device with the given content (size = `data.len()`).
    pub fn read_only_from(data: &[u8]) -> Self {
        let mut d = MemDevice::new(data.len() as u64);
        d.fill(0, data);
        d.read_only = true;
        d
    }

    /// Builder: mark read-only.
    pub fn with_read_only(mut self, ro: bool) -> Self {
        self.read_only = ro;
        self
    }

    /// Builder: whether to advertise `NBD_FLAG_CAN_MULTI_CONN` (default true:
    /// all connections share the same memory, so a flush covers them all).
    pub fn with_multi_conn(mut self, multi_conn: bool) -> Self {
        self.multi_conn = multi_conn;
        self
    }

    /// Allocation granularity (what `block_status` resolves).
    pub fn chunk_size(&self) -> u64 {
        self.chunk
    }

    /// Number of `flush` calls so far.
    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Number of write-type calls so far.
    pub fn write_count(&self) -> u64 {
        self.writes.load(Ordering::Relaxed)
    }

    /// Write directly, ignoring the read-only flag (test setup).
    pub fn fill(&self, offset: u64, data: &[u8]) {
        let _ = self.do_write(offset, data);
    }

    /// Copy of the whole content (test inspection).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size as usize];
        let _ = self.read(0, &mut v);
        v
    }

    /// Bytes of chunks currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.iter().filter(|c| c.read().is_some()).count() as u64 * self.chunk
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(DeviceError::invalid(format!(
                "range [{offset}, +{len}) beyond size {}",
                self.size
            ))),
        }
    }

    /// Visit the pieces of `[offset, offset+len)`: (chunk index, offset within
    /// chunk, piece length, offset within the range).
    fn pieces(&self, offset: u64, len: u64, mut f: impl FnMut(usize, usize, usize, usize)) {
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let idx = pos / self.chunk;
            let within = pos % self.chunk;
            let n = (self.chunk - within).min(end - pos);
            f(
                idx as usize,
                within as usize,
                n as usize,
                (pos - offset) as usize,
            );
            pos += n;
        }
    }

    fn chunk_len(&self, idx: usize) -> usize {
        let start = idx as u64 * self.chunk;
        (self.size - start).min(self.chunk) as usize
    }

    fn do_write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.check(offset, data.len() as u64)?;
        self.pieces(offset, data.len() as u64, |idx, within, n, at| {
            let mut slot = self.chunks[idx].write();
            let buf = slot.get_or_insert_with(|| vec![0u8; self.chunk_len(idx)].into_boxed_slice());
            buf[within..within + n].copy_from_slice(&data[at..at + n]);
        });
        Ok(())
    }

    /// Zero a range, freeing whole chunks when `dealloc` is set.
    fn zero(&self, offset: u64, len: u64, dealloc: bool) -> Result<(), DeviceError> {
        self.check(offset, len)?;
        self.pieces(offset, len, |idx, within, n, _| {
            let mut slot = self.chunks[idx].write();
            if dealloc && within == 0 && n == self.chunk_len(idx) {
                *slot = None;
            } else if let Some(buf) = slot.as_mut() {
                buf[within..within + n].fill(0);
            } else if !dealloc {
                *slot = Some(vec![0u8; self.chunk_len(idx)].into_boxed_slice());
            }
        });
        Ok(())
    }

    fn ro_check(&self) -> Result<(), DeviceError> {
        if self.read_only {
            Err(DeviceError::new(
                DeviceErrorKind::ReadOnly,
                "device is read-only",
            ))
        } else {
            Ok(())
        }
    }
}

impl BlockDevice for MemDevice {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.check(offset, buf.len() as u64)?;
        self.pieces(offset, buf.len() as u64, |idx, within, n, at| {
            let slot = self.chunks[idx].read();
            match slot.as_ref() {
                Some(data) => buf[at..at + n].copy_from_slice(&data[within..within + n]),
                None => buf[at..at + n].fill(0),
            }
        });
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.ro_check()?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.do_write(offset, data)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.ro_check()?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.zero(offset, len, true)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.ro_check()?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.zero(offset, len, may_trim)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.check(offset, len)?;
        let mut out: Vec<(u64, u32)> = Vec::new();
        self.pieces(offset, len, |idx, _, n, _| {
            let flags = if self.chunks[idx].read().is_some() {
                0
            } else {
                NBD_STATE_HOLE | NBD_STATE_ZERO
            };
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += n as u64,
                _ => out.push((n as u64, flags)),
            }
        });
        Ok(out)
    }

    fn can_multi_conn(&self) -> bool {
        self.multi_conn
    }
}

/// A registered device and its description.
type Export = (Arc<dyn BlockDevice>, String);

/// A fixed set of named in-memory (or any) devices.
///
/// The default export `""` resolves to the export set with
/// [`MemRegistry::set_default`], if any.
#[derive(Default)]
pub struct MemRegistry {
    exports: RwLock<BTreeMap<String, Export>>,
    default: RwLock<Option<String>>,
}

impl MemRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) an export.
    pub fn insert(&self, name: &str, description: &str, device: Arc<dyn BlockDevice>) {
        self.exports
            .write()
            .insert(name.to_string(), (device, description.to_string()));
    }

    /// Remove an export; open connections keep their handle.
    pub fn remove(&self, name: &str) -> bool {
        self.exports.write().remove(name).is_some()
    }

    /// Make `""` an alias of `name`.
    pub fn set_default(&self, name: Option<&str>) {
        *self.default.write() = name.map(str::to_string);
    }

    fn resolve(&self, name: &str) -> String {
        if name.is_empty()
            && let Some(d) = self.default.read().as_ref()
        {
            return d.clone();
        }
        name.to_string()
    }
}

impl ExportRegistry for MemRegistry {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports
            .read()
            .iter()
            .map(|(name, (dev, desc))| ExportInfo {
                name: name.clone(),
                description: desc.clone(),
                size_bytes: dev.size_bytes(),
                read_only: dev.read_only(),
            })
            .collect()
    }

    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        let name = self.resolve(name);
        self.exports
            .read()
            .get(&name)
            .map(|(d, _)| Arc::clone(d))
            .ok_or_else(|| DeviceError::not_found(format!("no export named {name:?}")))
    }

    fn description(&self, name: &str) -> Option<String> {
        let name = self.resolve(name);
        self.exports
            .read()
            .get(&name)
            .map(|(_, d)| d.clone())
            .filter(|d| !d.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_read_write_trim() {
        let d = MemDevice::new(64 * 1024 + 100);
        assert_eq!(
            d.block_status(0, d.size_bytes()).unwrap(),
            vec![(d.size_bytes(), 3)]
        );
        d.write(5000, b"hello").unwrap();
        let mut b = [0u8; 5];
        d.read(5000, &mut b).unwrap();
        assert_eq!(&b, b"hello");
        assert_eq!(
            d.block_status(0, 16384).unwrap(),
            vec![(4096, 3), (4096, 0), (8192, 3)]
        );
        d.trim(4096, 4096).unwrap();
        assert_eq!(d.allocated_bytes(), 0);
        d.write_zeroes(0, 4096, false).unwrap();
        assert_eq!(d.allocated_bytes(), 4096);
        // Tail chunk is short.
        d.write(64 * 1024, &[1u8; 100]).unwrap();
        assert!(d.write(64 * 1024, &[1u8; 101]).is_err());
        assert!(d.read(u64::MAX, &mut b).is_err());
    }

    #[test]
    fn registry_default_export() {
        let r = MemRegistry::new();
        r.insert("a", "disk a", Arc::new(MemDevice::new(4096)));
        assert!(r.open("").is_err());
        r.set_default(Some("a"));
        assert_eq!(r.open("").unwrap().size_bytes(), 4096);
        assert_eq!(r.description("a").as_deref(), Some("disk a"));
        assert_eq!(
            r.open("b").err().map(|e| e.kind),
            Some(DeviceErrorKind::NotFound)
        );
    }
}
