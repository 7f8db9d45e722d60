//! A clone whose blocks it never wrote come from a read-only *base*: the
//! device of a clone of a sealed template in another family
//! (`docs/multi-host.md`, section 5), as RBD's layering and qcow2's
//! backing files do it.
//!
//! The *top* is the clone's own volume, an ordinary engine volume that
//! starts empty. Its allocation says where each block is:
//!
//! - **unmapped** in the top (`base:allocation` hole): the base's block
//!   (zeros past the base's end, when the clone is larger);
//! - **mapped** (data, or allocated zeros): the top's.
//!
//! So nothing may unmap a block of the top: a TRIM or a WRITE_ZEROES that
//! may punch becomes allocated zeros (whole blocks only: a TRIM leaves its
//! partial edge blocks alone, as the engine's does), and a write of part of
//! an unmapped block first copies the base's block up (read, merge, write
//! the whole block), since the engine would merge it with zeros.
//!
//! **Concurrency.** A copy-up must not overwrite a write that lands on the
//! same block between its read of the base and its own write, from this
//! connection or any other (NBD multi-conn, the forwarding sessions). Every
//! write takes the locks of the blocks it touches (striped, in order: no
//! deadlock) shared, and a copy-up takes its block's exclusively, then
//! looks at the top again. The locks are the volume's ([`CopyUpLocks`]),
//! shared by every device of it. Reads take no lock: a read concurrent
//! with a write of the same bytes may return either content, as on any
//! disk.
//!
//! **Flatten.** [`LayeredDevice::copy_up_all`] copies every block of the
//! base that holds data and that the top does not map, a step of blocks
//! at a time: the base's data read first, then written under the step's
//! stripes held exclusively where the top still does not map it (so it is
//! a copy-up of each, racing nothing). Then the top alone is the clone's
//! image; once that is durable where it must be,
//! [`CopyUpLocks::set_flattened`] makes every device of the clone pass
//! straight to the top (a TRIM may unmap again) and let go of the base,
//! without the clients reconnecting. [`CopyUpLocks::quiesce`] holds every
//! stripe, for the flatten's last pass.
//!
//! Tested against a model (`tests` below) on a real engine volume.

use crate::stripes::{AllHeld, StripeLocks};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use vpool_engine::BLOCK_SIZE;
use vpool_nbd::{BlockDevice, DeviceError};

/// `base:allocation` flag of an unmapped range.
const STATE_HOLE: u32 = 1;
/// `base:allocation` flag of a range that reads as zeros.
const STATE_ZERO: u32 = 2;

/// Most extents one BLOCK_STATUS answer carries (as the engine's).
const MAX_EXTENTS: usize = 1024;

/// Blocks a flatten copies per step, under their stripes (1 MiB: a write
/// waits for at most one step).
const FLATTEN_STEP_BLOCKS: u64 = 256;

/// A device's hold on the base's device (`None` once let go).
type BaseSlot = RwLock<Option<Arc<dyn BlockDevice>>>;

/// The copy-up locks of one clone, whether it was flattened, and its
/// devices' holds on the base: every device of it shares them.
pub struct CopyUpLocks {
    stripes: StripeLocks,
    flattened: AtomicBool,
    /// The live devices' base slots, emptied by the flatten (a device
    /// held open by an idle client would hold the template's device, an
    /// NBD client of it that its deletion counts).
    slots: Mutex<Vec<Weak<BaseSlot>>>,
}

impl CopyUpLocks {
    pub fn new() -> Arc<CopyUpLocks> {
        Arc::new(CopyUpLocks {
            stripes: StripeLocks::default(),
            flattened: AtomicBool::new(false),
            slots: Mutex::new(Vec::new()),
        })
    }

    /// From now on the clone's devices use the top alone, and let go of
    /// the base: call only once the top holds every block of the base it
    /// reads, durably, since a trim through a flattened device unmaps.
    pub fn set_flattened(&self) {
        self.flattened.store(true, Ordering::Release);
        let slots = std::mem::take(&mut *self.slots.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in slots.iter().filter_map(Weak::upgrade) {
            slot.write().unwrap_or_else(|e| e.into_inner()).take();
        }
    }

    fn flattened(&self) -> bool {
        self.flattened.load(Ordering::Acquire)
    }

    /// Every stripe, exclusively: no write through any device of the clone
    /// runs until the guard goes.
    pub fn quiesce(&self) -> Quiesced<'_> {
        self.stripes.all()
    }

    /// Registers a device's base slot (dead ones are dropped: bounded by
    /// the live devices).
    fn register(&self, slot: &Arc<BaseSlot>) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|w| w.strong_count() > 0);
        slots.push(Arc::downgrade(slot));
    }
}

/// Every stripe of a clone held: see [`CopyUpLocks::quiesce`].
pub type Quiesced<'a> = AllHeld<'a>;

/// A clone over a read-only base; see the module doc.
pub struct LayeredDevice {
    top: Arc<dyn BlockDevice>,
    /// `None` once the clone was flattened: the device holds the
    /// template's device no longer.
    base: Arc<BaseSlot>,
    locks: Arc<CopyUpLocks>,
}

impl LayeredDevice {
    /// A device of a clone: `top` its own image, `base` its template's,
    /// `locks` the clone's (the same for every device of it).
    pub fn new(
        top: Arc<dyn BlockDevice>,
        base: Arc<dyn BlockDevice>,
        locks: Arc<CopyUpLocks>,
    ) -> LayeredDevice {
        let flattened = locks.flattened();
        let base = Arc::new(RwLock::new((!flattened).then_some(base)));
        locks.register(&base);
        LayeredDevice { top, base, locks }
    }

    /// Whether the clone was flattened: then every request goes to the
    /// top alone.
    fn flattened(&self) -> bool {
        self.locks.flattened()
    }

    /// The base's device; `None` once the clone was flattened, perhaps
    /// while this request ran: the top alone then holds the clone's image
    /// (a block it does not map reads zeros, as the base's would), and the
    /// caller uses it instead. Asked after the top said "unmapped", so a
    /// trim through a flattened device is never answered with the base.
    fn base(&self) -> Option<Arc<dyn BlockDevice>> {
        if self.locks.flattened() {
            return None;
        }
        self.base.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether block `block` is unmapped in the top (reads the base).
    fn unmapped(&self, block: u64) -> Result<bool, DeviceError> {
        let st = self.top.block_status(block * BLOCK_SIZE, BLOCK_SIZE)?;
        Ok(st.first().is_some_and(|e| e.1 & STATE_HOLE != 0))
    }

    /// Reads `buf.len()` bytes of the base at `offset`: zeros past its end.
    fn read_base(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let Some(base) = self.base() else {
            return self.top.read(offset, buf);
        };
        buf.fill(0);
        let size = base.size_bytes();
        if offset >= size {
            return Ok(());
        }
        let n = usize::try_from((size - offset).min(buf.len() as u64)).expect("fits the buffer");
        base.read(offset, &mut buf[..n])
    }

    /// Writes `data` at `offset` inside block `block`, copying the base's
    /// block up first if the top does not map it. Under the block's stripe,
    /// exclusively.
    fn write_partial(&self, block: u64, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let _g = self.locks.stripes.exclusive(block, block);
        if !self.unmapped(block)? {
            return self.top.write(offset, data);
        }
        let start = block * BLOCK_SIZE;
        let mut whole = vec![0u8; BLOCK_SIZE as usize];
        self.read_base(start, &mut whole)?;
        let at = usize::try_from(offset - start).expect("inside the block");
        whole[at..at + data.len()].copy_from_slice(data);
        self.top.write(start, &whole)
    }

    /// Runs `op` on the whole blocks `first..end` under their stripes,
    /// shared.
    fn on_whole_blocks(
        &self,
        first: u64,
        end: u64,
        op: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        if end <= first {
            return Ok(());
        }
        let _guards = self.locks.stripes.shared(first, end - 1);
        op()
    }

    /// Splits `[offset, offset + len)` into a partial head block, whole
    /// blocks and a partial tail block: (head end, whole blocks, tail start).
    fn split(offset: u64, len: u64) -> (u64, (u64, u64), u64) {
        let end = offset + len;
        let first = offset.div_ceil(BLOCK_SIZE);
        let last = end / BLOCK_SIZE;
        if first >= last {
            // Within one or two partial blocks, no whole one.
            return (end, (first, first), end);
        }
        (first * BLOCK_SIZE, (first, last), last * BLOCK_SIZE)
    }

    /// Writes `data` at `offset` where it covers part of a block only.
    fn write_edges(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut at = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let block = at / BLOCK_SIZE;
            let room = (block + 1) * BLOCK_SIZE - at;
            let n = usize::try_from(room.min(rest.len() as u64)).expect("fits the buffer");
            self.write_partial(block, at, &rest[..n])?;
            at += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }
}

impl BlockDevice for LayeredDevice {
    fn size_bytes(&self) -> u64 {
        self.top.size_bytes()
    }

    fn read_only(&self) -> bool {
        self.top.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        if self.flattened() {
            return self.top.read(offset, buf);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let extents = self.top.block_status(at, (buf.len() - done) as u64)?;
            assert!(!extents.is_empty(), "block status covers a prefix");
            for (len, flags) in extents {
                let n = usize::try_from(len.min((buf.len() - done) as u64)).expect("fits");
                let piece = &mut buf[done..done + n];
                let here = offset + done as u64;
                if flags & STATE_HOLE != 0 {
                    self.read_base(here, piece)?;
                } else {
                    self.top.read(here, piece)?;
                }
                done += n;
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.flattened() {
            return self.top.write(offset, data);
        }
        let (head_end, (first, end), tail_start) = Self::split(offset, data.len() as u64);
        let at = |o: u64| usize::try_from(o - offset).expect("inside the write");
        self.write_edges(offset, &data[..at(head_end)])?;
        self.on_whole_blocks(first, end, || {
            self.top
                .write(head_end, &data[at(head_end)..at(tail_start)])
        })?;
        if tail_start > head_end {
            self.write_edges(tail_start, &data[at(tail_start)..])?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.top.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if self.flattened() {
            return self.top.trim(offset, len);
        }
        // Whole blocks become allocated zeros (unmapped would show the
        // base); partial edges are left as they are, as TRIM allows.
        let (head_end, (first, end), tail_start) = Self::split(offset, len);
        self.on_whole_blocks(first, end, || {
            self.top
                .write_zeroes(head_end, tail_start - head_end, false)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        if self.flattened() {
            return self.top.write_zeroes(offset, len, may_trim);
        }
        let (head_end, (first, end), tail_start) = Self::split(offset, len);
        let zeros = |n: u64| vec![0u8; usize::try_from(n).expect("under a block")];
        self.write_edges(offset, &zeros(head_end - offset))?;
        self.on_whole_blocks(first, end, || {
            self.top
                .write_zeroes(head_end, tail_start - head_end, false)
        })?;
        if tail_start > head_end {
            self.write_edges(tail_start, &zeros(offset + len - tail_start))?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        let top = self.top.block_status(offset, len)?;
        if self.flattened() {
            return Ok(top);
        }
        let mut out: Vec<(u64, u32)> = Vec::with_capacity(top.len());
        let mut at = offset;
        'top: for (n, flags) in top {
            let pieces = if flags & STATE_HOLE == 0 {
                vec![(n, flags)]
            } else {
                self.base_status(at, n)?
            };
            for (m, f) in pieces {
                let full = out.len() == MAX_EXTENTS;
                match out.last_mut() {
                    Some(last) if last.1 == f => last.0 += m,
                    // A prefix is a whole answer; the client asks again.
                    _ if full => break 'top,
                    _ => out.push((m, f)),
                }
            }
            at += n;
        }
        Ok(out)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.top.cache(offset, len)
    }

    fn can_multi_conn(&self) -> bool {
        self.top.can_multi_conn()
    }
}

impl LayeredDevice {
    /// Copies every block of the base that holds data and that the top does
    /// not map into the top (see the module doc): afterwards the top alone
    /// reads as this device. Returns the bytes copied. Clients may write
    /// meanwhile; an error leaves what was copied, which is harmless (a
    /// copy-up a write would have made).
    pub fn copy_up_all(&self) -> Result<u64, DeviceError> {
        self.copy_up(true)
    }

    /// [`LayeredDevice::copy_up_all`] while every stripe is held already.
    pub fn copy_up_all_quiesced(&self, _held: &Quiesced<'_>) -> Result<u64, DeviceError> {
        self.copy_up(false)
    }

    fn copy_up(&self, lock: bool) -> Result<u64, DeviceError> {
        let Some(base) = self.base() else {
            return Ok(0);
        };
        let end = base.size_bytes().min(self.top.size_bytes());
        let step = FLATTEN_STEP_BLOCKS * BLOCK_SIZE;
        let mut copied = 0u64;
        let mut at = 0u64;
        while at < end {
            let len = step.min(end - at);
            copied += self.copy_up_step(&*base, at, len, lock)?;
            at += len;
        }
        Ok(copied)
    }

    /// One step of [`LayeredDevice::copy_up`]. The base never changes, so
    /// its data under the top's holes is read first, without locks (a read
    /// of a cold template may wait for the bucket); then, under the step's
    /// stripes (unless `lock` is false: the caller holds them all), the
    /// pieces the top still does not map are written.
    fn copy_up_step(
        &self,
        base: &dyn BlockDevice,
        offset: u64,
        len: u64,
        lock: bool,
    ) -> Result<u64, DeviceError> {
        let is_hole = |f: u32| f & STATE_HOLE != 0;
        let mut pieces: Vec<(u64, Vec<u8>)> = Vec::new();
        for (at, n) in ranges_where(&*self.top, offset, len, is_hole)? {
            for (from, m) in ranges_where(base, at, n, |f| f & STATE_ZERO == 0)? {
                let mut buf = vec![0u8; usize::try_from(m).expect("at most one step")];
                base.read(from, &mut buf)?;
                pieces.push((from, buf));
            }
        }
        if pieces.is_empty() {
            return Ok(0);
        }
        let _guards = lock.then(|| {
            self.locks
                .stripes
                .exclusive(offset / BLOCK_SIZE, (offset + len - 1) / BLOCK_SIZE)
        });
        let mut copied = 0u64;
        for (at, n) in ranges_where(&*self.top, offset, len, is_hole)? {
            for (from, data) in &pieces {
                let s = at.max(*from);
                let e = (at + n).min(from + data.len() as u64);
                if s < e {
                    let slice = &data[usize::try_from(s - from).expect("in the piece")
                        ..usize::try_from(e - from).expect("in the piece")];
                    self.top.write(s, slice)?;
                    copied += e - s;
                }
            }
        }
        Ok(copied)
    }

    /// The base's status of `[offset, offset + len)`, all of it (past the
    /// base's end: a hole of zeros).
    fn base_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        let Some(base) = self.base() else {
            return self.top.block_status(offset, len);
        };
        let size = base.size_bytes();
        let mut out = Vec::new();
        let mut at = offset;
        let end = offset + len;
        while at < end.min(size) && out.len() < MAX_EXTENTS {
            let got = base.block_status(at, end.min(size) - at)?;
            assert!(!got.is_empty(), "block status covers a prefix");
            for (n, f) in got {
                out.push((n, f));
                at += n;
            }
        }
        if out.len() >= MAX_EXTENTS {
            return Ok(out);
        }
        if at < end {
            out.push((end - at, STATE_HOLE | STATE_ZERO));
        }
        Ok(out)
    }
}

/// The ranges `(offset, len)` of `[offset, offset + len)` whose
/// `base:allocation` flags in `dev` satisfy `want`, merged.
fn ranges_where(
    dev: &dyn BlockDevice,
    offset: u64,
    len: u64,
    want: impl Fn(u32) -> bool,
) -> Result<Vec<(u64, u64)>, DeviceError> {
    let end = offset + len;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = offset;
    while at < end {
        let got = dev.block_status(at, end - at)?;
        if got.is_empty() || got.iter().any(|e| e.0 == 0) {
            return Err(DeviceError::io(format!(
                "block status at {at} answered no progress: {got:?}"
            )));
        }
        for (n, f) in got {
            let n = n.min(end - at);
            if want(f) {
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == at => last.1 += n,
                    _ => out.push((at, n)),
                }
            }
            at += n;
            if at >= end {
                break;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
