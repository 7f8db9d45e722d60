//! An in-memory backend for crash and fault-injection tests.
//!
//! Like redb's crash-consistency backend, it keeps for every segment the bytes
//! a reader sees now (*live*) apart from the bytes that would survive a power
//! cut (*durable*). [`SimStore::crash`] throws away what was not synced,
//! either all of it or a random, possibly torn subset of it, and invalidates
//! every handle from before the crash, as a real crash kills the process.
//! It is a fake for fault injection only: the real clients test the real
//! backends.

use crate::{OpenSegment, Result, SegmentId, SegmentStore, StoreError};
use parking_lot::Mutex;
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a crash keeps of the writes that were not synced.
#[derive(Clone, Copy, Debug)]
pub enum SimCrashMode {
    /// Every unsynced byte is lost.
    DropUnsynced,
    /// Each unsynced write survives, is lost, or survives torn (a random
    /// prefix), independently: the page cache writes back in any order.
    RandomSubset,
}

#[derive(Default, Clone)]
struct SimSegment {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last sync, in order.
    pending: Vec<(u64, Vec<u8>)>,
    /// The directory entry is durable (a sync happened since creation).
    created_durably: bool,
}

#[derive(Default)]
struct SimState {
    segments: BTreeMap<SegmentId, SimSegment>,
    meta: BTreeMap<String, Vec<u8>>,
    /// Fail every append with ENOSPC while set.
    full: bool,
    /// Bytes the device holds, if limited: segments, metadata blobs and the
    /// reserve count against it, and writes past it fail with ENOSPC.
    capacity_bytes: Option<u64>,
    /// The store's reserve ([`SegmentStore::restore_reserve`]).
    reserve_bytes: u64,
    /// Fail every operation while set (the device is gone).
    down: bool,
    syncs: u64,
    /// Crash when this many more operations have been attempted.
    crash_in_ops: Option<(u64, SimCrashMode, u64)>,
    /// Operations do not count towards the armed crash while set.
    countdown_paused: bool,
}

/// See the module documentation.
#[derive(Clone, Default)]
pub struct SimStore {
    state: Arc<Mutex<SimState>>,
    generation: Arc<AtomicU64>,
    /// Set on a [`SimStore::handle`]: the generation it belongs to.
    bound: Option<u64>,
}

impl SimStore {
    pub fn new() -> SimStore {
        SimStore::default()
    }

    /// A view of the store for one "process": after the next crash every
    /// call through it fails, as the process it stands for is dead.
    pub fn handle(&self) -> SimStore {
        SimStore {
            state: self.state.clone(),
            generation: self.generation.clone(),
            bound: Some(self.generation.load(Ordering::SeqCst)),
        }
    }

    /// Arms a crash: the `ops`-th store operation from now (appends, syncs,
    /// reads, metadata writes...) crashes the store instead of running, as
    /// with [`SimStore::crash`], and fails.
    pub fn crash_after_ops(&self, ops: u64, mode: SimCrashMode, seed: u64) {
        self.state.lock().crash_in_ops = Some((ops, mode, seed));
    }

    /// While `paused`, operations do not count towards an armed crash (a
    /// test inspecting the pool mid-run).
    pub fn pause_crash_countdown(&self, paused: bool) {
        self.state.lock().countdown_paused = paused;
    }

    /// Counts one operation towards an armed crash; fails if it fires.
    fn tick(&self) -> Result<()> {
        let fire = {
            let mut st = self.state.lock();
            if st.countdown_paused {
                return Ok(());
            }
            match &mut st.crash_in_ops {
                Some((0, mode, seed)) => {
                    let r = (*mode, *seed);
                    st.crash_in_ops = None;
                    Some(r)
                }
                Some((n, _, _)) => {
                    *n -= 1;
                    None
                }
                None => None,
            }
        };
        if let Some((mode, seed)) = fire {
            self.crash(mode, seed);
            return Err(StoreError::Crashed);
        }
        Ok(())
    }

    fn check_bound(&self) -> Result<()> {
        self.tick()?;
        match self.bound {
            Some(g) => self.check(g),
            None => Ok(()),
        }
    }

    /// Simulates a power cut: unsynced writes are dropped according to
    /// `mode` (randomness from `seed`), and every handle from before the
    /// crash fails from now on with [`StoreError::Crashed`].
    pub fn crash(&self, mode: SimCrashMode, seed: u64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut st = self.state.lock();
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut gone = Vec::new();
        for (id, seg) in st.segments.iter_mut() {
            let mut image = seg.durable.clone();
            if let SimCrashMode::RandomSubset = mode {
                for (off, data) in &seg.pending {
                    match rng.gen_range(0..3) {
                        0 => {}
                        1 => write_into(&mut image, *off, data),
                        _ => {
                            let keep = rng.gen_range(0..=data.len());
                            write_into(&mut image, *off, &data[..keep]);
                        }
                    }
                }
            }
            let keep_entry = seg.created_durably
                || matches!(mode, SimCrashMode::RandomSubset) && rng.gen_bool(0.5);
            if !keep_entry {
                gone.push(*id);
                continue;
            }
            seg.live = image.clone();
            seg.durable = image;
            seg.pending.clear();
            seg.created_durably = true;
        }
        for id in gone {
            st.segments.remove(&id);
        }
        st.full = false;
        st.down = false;
        st.crash_in_ops = None;
    }

    /// While set, every append fails with "no space left".
    pub fn set_full(&self, full: bool) {
        self.state.lock().full = full;
    }

    /// Limits the device to `bytes` (`None`: unlimited). Takes effect for
    /// the next write; what is stored already stays.
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state.lock().capacity_bytes = bytes;
    }

    /// Bytes the device holds now: segments, metadata blobs, the reserve.
    pub fn used_bytes(&self) -> u64 {
        self.state.lock().used_bytes()
    }

    /// Every segment's id and current (live) bytes, in id order.
    pub fn segment_images(&self) -> Vec<(SegmentId, Vec<u8>)> {
        let st = self.state.lock();
        st.segments
            .iter()
            .map(|(id, s)| (*id, s.live.clone()))
            .collect()
    }

    /// Puts segment `id` with `bytes` in the store, durable, as if a pool
    /// had written and synced it (fuzzing recovery on crafted logs).
    pub fn put_segment(&self, id: SegmentId, bytes: Vec<u8>) {
        let seg = SimSegment {
            live: bytes.clone(),
            durable: bytes,
            pending: Vec::new(),
            created_durably: true,
        };
        self.state.lock().segments.insert(id, seg);
    }

    /// Flips one bit of metadata blob `name` (corruption tests).
    pub fn corrupt_meta(&self, name: &str, offset: usize) {
        let mut st = self.state.lock();
        let blob = st.meta.get_mut(name).expect("blob exists");
        blob[offset] ^= 0x10;
    }

    /// While set, every operation fails with an I/O error.
    pub fn set_down(&self, down: bool) {
        self.state.lock().down = down;
    }

    /// How many syncs the engine asked for (to check group commit).
    pub fn sync_count(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Flips one bit of a segment's live and durable bytes (corruption tests).
    pub fn corrupt(&self, id: SegmentId, offset: u64) {
        let mut st = self.state.lock();
        let seg = st.segments.get_mut(&id).expect("segment exists");
        let i = offset as usize;
        seg.live[i] ^= 0x10;
        if i < seg.durable.len() {
            seg.durable[i] ^= 0x10;
        }
    }

    fn check(&self, generation: u64) -> Result<()> {
        if self.generation.load(Ordering::SeqCst) != generation {
            return Err(StoreError::Crashed);
        }
        Ok(())
    }
}

impl SimState {
    fn used_bytes(&self) -> u64 {
        let segs: u64 = self.segments.values().map(|s| s.live.len() as u64).sum();
        let meta: u64 = self.meta.values().map(|m| m.len() as u64).sum();
        segs + meta + self.reserve_bytes
    }

    /// Bytes that may still be added, if the device is limited.
    fn room_bytes(&self) -> Option<u64> {
        self.capacity_bytes
            .map(|c| c.saturating_sub(self.used_bytes()))
    }
}

fn no_space(context: String) -> StoreError {
    StoreError::io(context, std::io::Error::from_raw_os_error(libc::ENOSPC))
}

fn write_into(image: &mut Vec<u8>, off: u64, data: &[u8]) {
    let off = off as usize;
    if image.len() < off + data.len() {
        image.resize(off + data.len(), 0);
    }
    image[off..off + data.len()].copy_from_slice(data);
}

fn down_error() -> StoreError {
    StoreError::io(
        "talking to the simulated device",
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

struct SimOpenSegment {
    id: SegmentId,
    store: SimStore,
    generation: u64,
}

impl OpenSegment for SimOpenSegment {
    fn id(&self) -> SegmentId {
        self.id
    }

    fn append_at(&self, offset: u64, bufs: &[&[u8]]) -> Result<()> {
        self.store.tick()?;
        self.store.check(self.generation)?;
        let mut st = self.store.state.lock();
        if st.down {
            return Err(down_error());
        }
        if st.full {
            return Err(no_space(format!("appending to {}", self.id)));
        }
        let room = st.room_bytes();
        let seg = st.segments.get_mut(&self.id).ok_or(StoreError::NotFound {
            what: format!("segment {}", self.id),
        })?;
        let mut data: Vec<u8> = bufs.concat();
        let grows_by = (offset + data.len() as u64).saturating_sub(seg.live.len() as u64);
        let short = room.is_some_and(|r| grows_by > r);
        if short {
            // As a real file system does: what fits is written, then ENOSPC.
            let fits = room.unwrap_or(0) + (seg.live.len() as u64).saturating_sub(offset);
            data.truncate(fits.min(data.len() as u64) as usize);
        }
        write_into(&mut seg.live, offset, &data);
        seg.pending.push((offset, data));
        if short {
            return Err(no_space(format!("appending to {}", self.id)));
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.store.tick()?;
        self.store.check(self.generation)?;
        let mut st = self.store.state.lock();
        if st.down {
            return Err(down_error());
        }
        st.syncs += 1;
        let seg = st.segments.get_mut(&self.id).ok_or(StoreError::NotFound {
            what: format!("segment {}", self.id),
        })?;
        seg.durable = seg.live.clone();
        seg.pending.clear();
        seg.created_durably = true;
        Ok(())
    }
}

impl SegmentStore for SimStore {
    fn create_segment(&self, id: SegmentId) -> Result<Box<dyn OpenSegment>> {
        self.check_bound()?;
        let generation = self.generation.load(Ordering::SeqCst);
        let mut st = self.state.lock();
        if st.down {
            return Err(down_error());
        }
        if st.segments.contains_key(&id) {
            return Err(StoreError::AlreadyExists {
                what: format!("segment {id}"),
            });
        }
        st.segments.insert(id, SimSegment::default());
        Ok(Box::new(SimOpenSegment {
            id,
            store: self.clone(),
            generation,
        }))
    }

    fn read_at(&self, id: SegmentId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_bound()?;
        let st = self.state.lock();
        if st.down {
            return Err(down_error());
        }
        let seg = st.segments.get(&id).ok_or(StoreError::NotFound {
            what: format!("segment {id}"),
        })?;
        let size = seg.live.len() as u64;
        let end = offset.checked_add(buf.len() as u64);
        match end {
            Some(end) if end <= size => {
                buf.copy_from_slice(&seg.live[offset as usize..end as usize]);
                Ok(())
            }
            _ => Err(StoreError::ShortRead {
                segment: id,
                offset,
                len: buf.len(),
                size,
            }),
        }
    }

    fn list_segments(&self) -> Result<Vec<(SegmentId, u64)>> {
        self.check_bound()?;
        let st = self.state.lock();
        if st.down {
            return Err(down_error());
        }
        Ok(st
            .segments
            .iter()
            .map(|(id, s)| (*id, s.live.len() as u64))
            .collect())
    }

    fn truncate_segment(&self, id: SegmentId, len: u64) -> Result<()> {
        self.check_bound()?;
        let mut st = self.state.lock();
        let seg = st.segments.get_mut(&id).ok_or(StoreError::NotFound {
            what: format!("segment {id}"),
        })?;
        seg.live.truncate(len as usize);
        seg.durable = seg.live.clone();
        seg.pending.clear();
        seg.created_durably = true;
        Ok(())
    }

    fn delete_segment(&self, id: SegmentId) -> Result<()> {
        self.check_bound()?;
        let mut st = self.state.lock();
        if st.down {
            return Err(down_error());
        }
        st.segments.remove(&id);
        Ok(())
    }

    fn put_meta(&self, name: &str, data: &[u8]) -> Result<()> {
        self.check_bound()?;
        let mut st = self.state.lock();
        if st.down {
            return Err(down_error());
        }
        // The new copy is written beside the old one before it replaces it.
        if st.room_bytes().is_some_and(|r| (data.len() as u64) > r) {
            return Err(no_space(format!("writing metadata {name}")));
        }
        st.meta.insert(name.to_string(), data.to_vec());
        Ok(())
    }

    fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.check_bound()?;
        let st = self.state.lock();
        if st.down {
            return Err(down_error());
        }
        Ok(st.meta.get(name).cloned())
    }

    fn free_bytes(&self) -> Option<u64> {
        self.state.lock().room_bytes()
    }

    fn reserve_bytes(&self) -> u64 {
        self.state.lock().reserve_bytes
    }

    fn release_reserve(&self) -> Result<u64> {
        self.check_bound()?;
        let mut st = self.state.lock();
        Ok(std::mem::take(&mut st.reserve_bytes))
    }

    fn restore_reserve(&self, bytes: u64) -> Result<()> {
        self.check_bound()?;
        let mut st = self.state.lock();
        let had = st.reserve_bytes;
        let room = st.room_bytes().map(|r| r + had);
        if room.is_some_and(|r| bytes > r) {
            return Err(no_space(format!("reserving {bytes} bytes")));
        }
        st.reserve_bytes = bytes;
        Ok(())
    }
}
