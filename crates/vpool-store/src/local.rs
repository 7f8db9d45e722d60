//! The embedded local pool: a directory on a local filesystem.
//!
//! ```text
//! <pool>/LOCK                 flock(2) held by the one process that owns the pool
//! <pool>/segments/<id>.seg    one file a segment, named by its 16-hex-digit id
//! <pool>/meta/<name>          metadata blobs, replaced by write-temp + fsync + rename + fsync(dir)
//! <pool>/reserve              space held back for the pool itself (see below)
//! ```
//!
//! The directory and everything in it is private to the owner (0700 and
//! 0600): volume names and data are nobody else's business.
//!
//! # The reserve
//! A full device must not wedge the pool: deleting a volume or trimming
//! writes a small record, and the cleaner needs room to copy live data out
//! of mostly-dead segments before it can delete them. So the store keeps
//! `reserve`, a file of allocated blocks (`fallocate`), that the engine
//! releases when it first meets ENOSPC and takes back once space has
//! returned ([`SegmentStore::release_reserve`]).
//!
//! Assumptions about the media (the same as redb's and SQLite's): `fdatasync`
//! returning means the file's data and size are durable; `rename` is atomic;
//! a directory entry is durable once the directory is fsynced. Bytes written
//! but not synced may be lost, reordered or torn at any granularity, which is
//! why every record in a segment carries checksums.

use crate::{OpenSegment, Result, SegmentId, SegmentStore, StoreError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// At most this many segment files are kept open for reads; the rest are
/// reopened on demand. Bounds file descriptors whatever the pool's size.
const MAX_OPEN_SEGMENT_FILES: usize = 256;
/// The file that holds the reserve, in the pool directory.
const RESERVE_FILE: &str = "reserve";

pub struct LocalDirStore {
    root: PathBuf,
    segments_dir: PathBuf,
    meta_dir: PathBuf,
    /// Held for the life of the store: the flock on `LOCK`.
    _lock_file: File,
    read_files: Mutex<HashMap<SegmentId, Arc<File>>>,
    /// Bytes allocated to the reserve file now.
    reserve_bytes: AtomicU64,
}

impl LocalDirStore {
    /// Opens (creating if needed) the pool directory at `root` and takes its
    /// lock. A second process opening the same directory gets
    /// [`StoreError::Locked`].
    pub fn open(root: impl AsRef<Path>) -> Result<LocalDirStore> {
        let root = root.as_ref().to_path_buf();
        let segments_dir = root.join("segments");
        let meta_dir = root.join("meta");
        for dir in [&root, &segments_dir, &meta_dir] {
            fs::create_dir_all(dir)
                .map_err(|e| StoreError::io(format!("creating {}", dir.display()), e))?;
            make_private(dir, 0o700)?;
        }
        let lock_path = root.join("LOCK");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| StoreError::io(format!("opening {}", lock_path.display()), e))?;
        // SAFETY: flock on a valid, owned descriptor.
        let rc = unsafe { libc::flock(lock_file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Locked {
                    path: root.display().to_string(),
                    lock_file: lock_path.display().to_string(),
                });
            }
            return Err(StoreError::io("locking the pool", err));
        }
        let _ = lock_file.set_len(0);
        let _ = lock_file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0);
        sync_dir(&root)?;
        let reserve_bytes = fs::metadata(root.join(RESERVE_FILE)).map_or(0, |m| m.len());
        Ok(LocalDirStore {
            root,
            segments_dir,
            meta_dir,
            _lock_file: lock_file,
            read_files: Mutex::new(HashMap::new()),
            reserve_bytes: AtomicU64::new(reserve_bytes),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The file that holds segment `id`.
    pub fn segment_path(&self, id: SegmentId) -> PathBuf {
        self.segments_dir.join(format!("{:016x}.seg", id.0))
    }

    /// Creates segment `id` as a sparse file of `len_bytes` with no data: a
    /// placeholder for a segment whose bytes live elsewhere (an object store)
    /// and are filled in on demand. Durable on return.
    pub fn create_placeholder(&self, id: SegmentId, len_bytes: u64) -> Result<()> {
        let path = self.segment_path(id);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| StoreError::io(format!("creating {}", path.display()), e))?;
        file.set_len(len_bytes)
            .and_then(|()| file.sync_all())
            .map_err(|e| StoreError::io(format!("sizing {}", path.display()), e))?;
        self.read_files.lock().remove(&id);
        sync_dir(&self.segments_dir)
    }

    /// Writes `data` at `offset` of segment `id`, creating its file if
    /// missing: bytes recovered from elsewhere (an object store's flush
    /// journal) for a segment this directory does not hold whole. Durable
    /// on return.
    pub fn write_recovered(&self, id: SegmentId, offset: u64, data: &[u8]) -> Result<()> {
        let path = self.segment_path(id);
        let existed = path.exists();
        let file = open_for_write(&path)?;
        file.write_all_at(data, offset)
            .and_then(|()| file.sync_data())
            .map_err(|e| StoreError::io(format!("writing {}", path.display()), e))?;
        self.read_files.lock().remove(&id);
        if existed {
            Ok(())
        } else {
            sync_dir(&self.segments_dir)
        }
    }

    fn read_file(&self, id: SegmentId) -> Result<Arc<File>> {
        if let Some(f) = self.read_files.lock().get(&id) {
            return Ok(f.clone());
        }
        let path = self.segment_path(id);
        let file = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::NotFound {
                    what: format!("segment {id} ({})", path.display()),
                }
            } else {
                StoreError::io(format!("opening {}", path.display()), e)
            }
        })?;
        let file = Arc::new(file);
        let mut files = self.read_files.lock();
        if files.len() >= MAX_OPEN_SEGMENT_FILES {
            // Evict an arbitrary entry: the cache only bounds descriptors,
            // the page cache does the real caching.
            if let Some(k) = files.keys().next().copied() {
                files.remove(&k);
            }
        }
        files.insert(id, file.clone());
        Ok(file)
    }
}

/// Sets `path`'s mode to `mode` unless it is already that (a pool made by
/// an older version was world-readable).
fn make_private(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta =
        fs::metadata(path).map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?;
    if meta.permissions().mode() & 0o777 != mode {
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| StoreError::io(format!("chmod {}", path.display()), e))?;
    }
    Ok(())
}

/// Allocates `len` bytes to `file` (it grows to that size). A filesystem
/// without `fallocate` gets zeros written instead.
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    match fallocate(file, FallocateFlags::empty(), 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            const CHUNK: u64 = 1 << 20;
            let zeros = vec![0u8; CHUNK as usize];
            let mut at = file.metadata()?.len();
            while at < len {
                let n = (len - at).min(CHUNK);
                file.write_all_at(&zeros[..n as usize], at)?;
                at += n;
            }
            file.sync_data()
        }
        Err(e) => Err(e.into()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(|e| StoreError::io(format!("opening {}", dir.display()), e))?;
    f.sync_all()
        .map_err(|e| StoreError::io(format!("syncing directory {}", dir.display()), e))
}

struct LocalOpenSegment {
    id: SegmentId,
    file: File,
    path: PathBuf,
    dir: PathBuf,
    dir_synced: AtomicBool,
}

impl OpenSegment for LocalOpenSegment {
    fn id(&self) -> SegmentId {
        self.id
    }

    fn append_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        pwritev_all(&self.file, offset, bufs)
            .map_err(|e| StoreError::io(format!("appending to {}", self.path.display()), e))
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| StoreError::io(format!("syncing {}", self.path.display()), e))?;
        if !self.dir_synced.load(Ordering::Acquire) {
            sync_dir(&self.dir)?;
            self.dir_synced.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// `pwritev` that retries short writes, so a record goes down in one system
/// call in the common case.
fn pwritev_all(file: &File, mut offset: u64, bufs: &[&[u8]]) -> std::io::Result<()> {
    // At most this many iovecs a call, well under IOV_MAX (1024).
    const MAX_IOV: usize = 64;
    let mut owned: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
    let mut start = 0;
    while start < owned.len() {
        let end = (start + MAX_IOV).min(owned.len());
        let iov: Vec<libc::iovec> = owned[start..end]
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let off = libc::off_t::try_from(offset)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: every iovec points into a live borrowed slice.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::WriteZero));
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let first = owned[start];
            if n >= first.len() {
                n -= first.len();
                start += 1;
            } else {
                owned[start] = &first[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

impl SegmentStore for LocalDirStore {
    fn create_segment(&self, id: SegmentId) -> Result<Box<dyn OpenSegment>> {
        let path = self.segment_path(id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    StoreError::AlreadyExists {
                        what: format!("segment {id} ({})", path.display()),
                    }
                } else {
                    StoreError::io(format!("creating {}", path.display()), e)
                }
            })?;
        Ok(Box::new(LocalOpenSegment {
            id,
            file,
            path,
            dir: self.segments_dir.clone(),
            dir_synced: AtomicBool::new(false),
        }))
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let file = self.read_file(id)?;
        match file.read_exact_at(buf, offset) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                Err(StoreError::ShortRead {
                    segment: id,
                    offset,
                    len: buf.len(),
                    size,
                })
            }
            Err(e) => Err(StoreError::io(format!("reading {id} at {offset}"), e)),
        }
    }

    fn list_segments(&self) -> Result<Vec<(SegmentId, u64)>> {
        let mut out = Vec::new();
        let rd =
            fs::read_dir(&self.segments_dir).map_err(|e| StoreError::io("listing segments", e))?;
        for entry in rd {
            let entry = entry.map_err(|e| StoreError::io("listing segments", e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(hex) = name.strip_suffix(".seg") else {
                continue;
            };
            let Ok(id) = u64::from_str_radix(hex, 16) else {
                continue;
            };
            let len = entry
                .metadata()
                .map_err(|e| StoreError::io(format!("stat {name}"), e))?
                .len();
            out.push((SegmentId(id), len));
        }
        out.sort();
        Ok(out)
    }

    fn truncate_segment(&self, id: SegmentId, len: u64) -> Result<()> {
        let path = self.segment_path(id);
        let f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))?;
        f.set_len(len)
            .map_err(|e| StoreError::io(format!("truncating {}", path.display()), e))?;
        f.sync_all()
            .map_err(|e| StoreError::io(format!("syncing {}", path.display()), e))?;
        self.read_files.lock().remove(&id);
        Ok(())
    }

    fn delete_segment(&self, id: SegmentId) -> Result<()> {
        self.read_files.lock().remove(&id);
        let path = self.segment_path(id);
        fs::remove_file(&path)
            .map_err(|e| StoreError::io(format!("deleting {}", path.display()), e))
        // The directory is synced by the next checkpoint or segment sync; a
        // deleted segment that comes back after a crash is unreferenced and
        // is deleted again at the next clean.
    }

    fn put_meta(&self, name: &str, data: &[u8]) -> Result<()> {
        assert!(
            !name.contains('/') && !name.starts_with('.'),
            "metadata names are plain"
        );
        let path = self.meta_dir.join(name);
        let tmp = self.meta_dir.join(format!(".{name}.tmp"));
        {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| StoreError::io(format!("creating {}", tmp.display()), e))?;
            f.write_all_at(data, 0)
                .map_err(|e| StoreError::io(format!("writing {}", tmp.display()), e))?;
            f.sync_all()
                .map_err(|e| StoreError::io(format!("syncing {}", tmp.display()), e))?;
        }
        fs::rename(&tmp, &path)
            .map_err(|e| StoreError::io(format!("renaming {}", tmp.display()), e))?;
        sync_dir(&self.meta_dir)
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let path = self.meta_dir.join(name);
        match fs::read(&path) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(format!("reading {}", path.display()), e)),
        }
    }

    fn free_bytes(&self) -> Option<u64> {
        let c = std::ffi::CString::new(self.root.as_os_str().as_encoded_bytes()).ok()?;
        // SAFETY: statvfs fills a plain struct; c is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }

    fn reserve_bytes(&self) -> u64 {
        self.reserve_bytes.load(Ordering::Acquire)
    }

    fn release_reserve(&self) -> Result<u64> {
        let path = self.root.join(RESERVE_FILE);
        let held = self.reserve_bytes.swap(0, Ordering::AcqRel);
        match fs::remove_file(&path) {
            Ok(()) => Ok(held),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(StoreError::io(format!("deleting {}", path.display()), e)),
        }
    }

    fn restore_reserve(&self, bytes: u64) -> Result<()> {
        let path = self.root.join(RESERVE_FILE);
        let file = open_for_write(&path)?;
        let had = file
            .metadata()
            .map_err(|e| StoreError::io(format!("stat {}", path.display()), e))?
            .len();
        let result = if bytes < had {
            file.set_len(bytes)
        } else {
            allocate(&file, bytes)
        };
        if let Err(e) = result {
            // A failed fallocate may leave part of the range allocated:
            // give it back, the device is short of space as it is.
            let _ = file.set_len(had);
            return Err(StoreError::io(
                format!("reserving {bytes} bytes in {}", path.display()),
                e,
            ));
        }
        self.reserve_bytes.store(bytes, Ordering::Release);
        Ok(())
    }

    fn sync_deletions(&self) -> Result<()> {
        sync_dir(&self.segments_dir)
    }
}

/// Opens `path` for writing, creating it (owner-only) if it is missing,
/// keeping what it holds.
fn open_for_write(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(format!("opening {}", path.display()), e))
}
