//! One writer per volume: a second NBD client's writes wait for the first
//! client to go, then fail.
//!
//! Two VMs writing one disk corrupt its filesystem (neither knows of the
//! other's caches), so a volume has one *writer*: the first client that
//! writes, trims or zeroes it. Another client's writes wait (up to
//! [`WRITE_WAIT`]) for every connection of the writer to close, and then
//! go on as the new writer; if the wait runs out they fail with `EPERM`,
//! and the daemon logs who holds the volume.
//!
//! Why at the first write and not at open: a live migration's destination
//! QEMU connects when it starts, long before the switchover, and reads;
//! it writes only once it runs, right after the source stopped and just
//! before libvirt ends the source, which keeps its connection until then
//! (docs/multi-host.md, section 3). Refusing a second read-write open
//! would refuse every migration. Waiting at the first write makes the
//! destination pause for the moment between its start and the source's
//! end, and leaves the first VM of two untouched.
//!
//! A *client* is what the NBD server calls one ([`vpool_nbd::ClientKey`]):
//! one process on the Unix socket (its pid, from `SO_PEERCRED`), one
//! address on TCP. The connections of one client (NBD multi-conn, as
//! `nbdcopy` and fio open) write together. Two clients behind one address
//! count as one, which only TLS identities can tell apart.
//!
//! `vpool vol share VOL` lets any number of clients write at once (a
//! cluster filesystem, a shared disk); [`Writers::set_shared`] lets
//! waiting writers in when that changes.
//!
//! Scope: the clients of this daemon. A volume of a shared pool written
//! by clients of two hosts is one engine's (its owner's), which forwards
//! the other host's requests: those are not seen here.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vpool_nbd::{BlockDevice, ClientKey, DeviceError, DeviceErrorKind, Opener};

/// How long a second client's write waits for the writer to go.
pub const WRITE_WAIT: Duration = Duration::from_secs(30);

/// A volume: (pool, volume, volume id).
type Key = (String, String, u64);

/// The writers of every volume with an open NBD device here.
pub struct Writers {
    gates: Mutex<HashMap<Key, Arc<Gate>>>,
    /// How long a second client's write waits ([`WRITE_WAIT`]).
    wait: Duration,
}

impl Default for Writers {
    fn default() -> Writers {
        Writers::with_wait(WRITE_WAIT)
    }
}

/// One volume's clients and its writer.
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// The volume is shared (`vol share`): every client writes at once.
    shared: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct GateState {
    /// Open devices per client.
    open: HashMap<ClientKey, usize>,
    /// The client that writes, its peer, since when.
    writer: Option<(ClientKey, String, Instant)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is one step: a poisoned lock is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Writers {
    /// Writers whose second clients wait `wait` (tests: less than 30 s).
    pub fn with_wait(wait: Duration) -> Writers {
        Writers {
            gates: Mutex::new(HashMap::new()),
            wait,
        }
    }

    /// `dev`, a writable device of volume `key` opened by `by`, with its
    /// writes admitted one client at a time unless the volume is `shared`.
    pub fn wrap(
        self: &Arc<Self>,
        key: (&str, &str, u64),
        by: &Opener,
        shared: bool,
        dev: Arc<dyn BlockDevice>,
    ) -> Arc<dyn BlockDevice> {
        use std::sync::atomic::Ordering;
        let key: Key = (key.0.to_string(), key.1.to_string(), key.2);
        let gate = {
            // Counted under the map's lock: a last device dropping now
            // cannot take the gate out of the map between the two.
            let mut gates = lock(&self.gates);
            let gate = Arc::clone(gates.entry(key.clone()).or_insert_with(|| {
                Arc::new(Gate {
                    state: Mutex::new(GateState::default()),
                    changed: Condvar::new(),
                    shared: std::sync::atomic::AtomicBool::new(false),
                })
            }));
            gate.shared.store(shared, Ordering::Release);
            *lock(&gate.state).open.entry(by.client).or_insert(0) += 1;
            gate
        };
        Arc::new(OneWriter {
            inner: dev,
            writers: Arc::clone(self),
            gate,
            key,
            by: by.clone(),
            writing: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Volume `key` is shared now (or not): writers waiting are let in.
    pub fn set_shared(&self, key: (&str, &str, u64), shared: bool) {
        let key: Key = (key.0.to_string(), key.1.to_string(), key.2);
        if let Some(g) = lock(&self.gates).get(&key) {
            g.shared.store(shared, std::sync::atomic::Ordering::Release);
            let _st = lock(&g.state);
            g.changed.notify_all();
        }
    }

    /// Who writes volume `key` now, and for how long: `None` when no
    /// client has written it since its writer last changed.
    pub fn writer_of(&self, key: (&str, &str, u64)) -> Option<(String, Duration)> {
        let key: Key = (key.0.to_string(), key.1.to_string(), key.2);
        let gate = lock(&self.gates).get(&key).cloned()?;
        let st = lock(&gate.state);
        st.writer
            .as_ref()
            .map(|(_, peer, since)| (peer.clone(), since.elapsed()))
    }

    /// Volumes with open devices here (a bound: the daemon's connections).
    pub fn len(&self) -> usize {
        lock(&self.gates).len()
    }

    /// True when no volume has an open device here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A device whose writes are admitted by its volume's [`Gate`].
struct OneWriter {
    inner: Arc<dyn BlockDevice>,
    writers: Arc<Writers>,
    gate: Arc<Gate>,
    key: Key,
    by: Opener,
    /// This device's client is the writer: it stays so while this device
    /// is open (a writer goes only when its last device closes).
    writing: std::sync::atomic::AtomicBool,
}

impl OneWriter {
    /// Admits a write: at once for the writer (or a shared volume); else
    /// waits for the writer to go, up to [`WRITE_WAIT`].
    fn admit(&self) -> Result<(), DeviceError> {
        use std::sync::atomic::Ordering;
        if self.writing.load(Ordering::Acquire) {
            return Ok(());
        }
        let deadline = Instant::now() + self.writers.wait;
        let mut st = lock(&self.gate.state);
        let mut waited = false;
        loop {
            match &st.writer {
                None => {
                    st.writer = Some((self.by.client, self.by.peer.clone(), Instant::now()));
                    self.writing.store(true, Ordering::Release);
                    if waited {
                        tracing::info!(pool = %self.key.0, volume = %self.key.1, client = %self.by.peer, "the writer disconnected: this client writes now");
                    }
                    return Ok(());
                }
                Some((w, _, _)) if *w == self.by.client => {
                    self.writing.store(true, Ordering::Release);
                    return Ok(());
                }
                Some(_) if self.gate.shared.load(Ordering::Acquire) => return Ok(()),
                Some((_, peer, since)) => {
                    if !waited {
                        tracing::warn!(
                            pool = %self.key.0, volume = %self.key.1, client = %self.by.peer, writer = %peer,
                            writing_for_s = since.elapsed().as_secs(),
                            "a second client writes the volume: its writes wait for the writer to disconnect (a live migration's destination), up to {} s, then fail",
                            self.writers.wait.as_secs()
                        );
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        let message = format!(
                            "volume {}/{} is written by another client, {peer} (for {} s): one writer at a time (`vpool vol share` lets several)",
                            self.key.0,
                            self.key.1,
                            since.elapsed().as_secs()
                        );
                        tracing::warn!(client = %self.by.peer, "write refused: {message}");
                        return Err(DeviceError::new(DeviceErrorKind::ReadOnly, message));
                    }
                    waited = true;
                    st = (self.gate.changed.wait_timeout(st, deadline - now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

impl Drop for OneWriter {
    fn drop(&mut self) {
        let mut gates = lock(&self.writers.gates);
        let mut st = lock(&self.gate.state);
        let left = match st.open.get_mut(&self.by.client) {
            Some(n) => {
                *n -= 1;
                *n
            }
            None => 0,
        };
        if left == 0 {
            st.open.remove(&self.by.client);
            if st
                .writer
                .as_ref()
                .is_some_and(|(w, _, _)| *w == self.by.client)
            {
                st.writer = None;
                self.gate.changed.notify_all();
            }
        }
        // Only this gate: never a newer one of the same key.
        if st.open.is_empty()
            && gates
                .get(&self.key)
                .is_some_and(|g| Arc::ptr_eq(g, &self.gate))
        {
            gates.remove(&self.key);
        }
    }
}

impl BlockDevice for OneWriter {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.inner.read(offset, buf)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.admit()?;
        self.inner.write(offset, data)
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.inner.flush()
    }

    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.admit()?;
        self.inner.trim(offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError> {
        self.admit()?;
        self.inner.write_zeroes(offset, len, may_trim)
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError> {
        self.inner.block_status(offset, len)
    }

    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.cache(offset, len)
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpool_nbd::MemDevice;

    fn opener(pid: i32) -> Opener {
        Opener {
            client: ClientKey::Process { pid, uid: 0 },
            peer: format!("unix pid {pid}"),
        }
    }

    fn dev() -> Arc<dyn BlockDevice> {
        Arc::new(MemDevice::new(1 << 20))
    }

    #[test]
    fn the_first_writer_holds_until_its_last_device_goes() {
        let w = Arc::new(Writers::default());
        let key = ("local", "web1", 1);
        let a1 = w.wrap(key, &opener(1), false, dev());
        let a2 = w.wrap(key, &opener(1), false, dev());
        let b = w.wrap(key, &opener(2), false, dev());
        a1.write(0, &[1; 512]).unwrap();
        a2.write(512, &[1; 512]).unwrap();
        // b waits: a's devices go in another thread after 200 ms.
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(a1);
            std::thread::sleep(Duration::from_millis(100));
            drop(a2);
        });
        let started = Instant::now();
        b.write(0, &[2; 512]).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
        t.join().unwrap();
        drop(b);
        assert!(w.is_empty(), "the gate outlived its devices");
    }

    #[test]
    fn a_second_writer_fails_after_the_wait_and_the_first_goes_on() {
        let w = Arc::new(Writers::with_wait(Duration::from_millis(100)));
        let key = ("local", "web1", 1);
        let a = w.wrap(key, &opener(1), false, dev());
        let b = w.wrap(key, &opener(2), false, dev());
        a.write(0, &[1; 512]).unwrap();
        let e = b.write(0, &[2; 512]).unwrap_err();
        assert_eq!(e.kind, DeviceErrorKind::ReadOnly);
        assert!(e.message.contains("unix pid 1"), "{e}");
        assert!(b.trim(0, 512).is_err() && b.write_zeroes(0, 512, true).is_err());
        a.write(0, &[3; 512]).unwrap();
        // Once a goes, b writes.
        drop(a);
        b.write(0, &[2; 512]).unwrap();
    }

    #[test]
    fn a_shared_volume_takes_several_writers_and_reads_never_wait() {
        let w = Arc::new(Writers::default());
        let key = ("local", "db", 7);
        let a = w.wrap(key, &opener(1), true, dev());
        let b = w.wrap(key, &opener(2), true, dev());
        a.write(0, &[1; 512]).unwrap();
        b.write(0, &[2; 512]).unwrap();
        let c = w.wrap(key, &opener(3), true, dev());
        let mut buf = [0u8; 512];
        c.read(0, &mut buf).unwrap();
        c.flush().unwrap();
    }
}
