//! Remote durability on an [`S3Store`]: the flush journal
//! ([`crate::journal`] has its format and protocol).
//!
//! - **Flush** ([`S3Store::journal_flush`], from `admit_flush` when the
//!   pool's durability is `remote`): every dirty segment's bytes not in the
//!   journal yet, oldest segment first, go out as create-only entries
//!   `journal/<our epoch>/<seq>` before the flush is acknowledged. One
//!   writer at a time: a flush that waited for another finds its bytes sent
//!   already (group commit). An entry whose key exists means a taker's
//!   tombstone: this store is fenced.
//! - **Open** ([`S3Store::replay_journal`], before the cache is reconciled
//!   with the manifest): the last holder's journal is closed with a
//!   tombstone, then every epoch's entries are written, in order, into the
//!   cache's files of segments the manifest does not list, so the engine
//!   recovers them like a local log.
//! - **After a commit** ([`S3Store::collect_journal`]): entries of segments
//!   the manifest now lists are deleted. Tombstones stay: deleting one would
//!   let a fenced holder that wakes write its next entry.
//!
//! Segments are never forgotten unsent in `remote` mode (`forget_unsent`):
//! a gap in the bucket's history would make recovery cut the journaled
//! segments after it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use vpool_store::{Result, SegmentId, SegmentStore, StoreError};

use super::{OpenError, S3Store, unavailable};
use crate::journal::{
    EntryKind, JOURNAL_DIR, JournalEntry, MAX_ENTRY_DATA, entry_key, parse_entry_key,
};
use crate::manifest::Manifest;
use crate::remote::RemoteError;

/// Most entries a bucket's journal may hold when it is replayed.
const MAX_ENTRIES: usize = 100_000;
/// How long one call of the journal's replay may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Tombstone attempts before giving up (each lost one means the old
/// holder wrote an entry meanwhile).
const MAX_TOMBSTONE_ATTEMPTS: u32 = 64;

/// The journal's state in a store.
#[derive(Debug, Default)]
pub(super) struct JournalState {
    /// This epoch's next entry.
    next_seq: u64,
    /// Entries in the bucket that a commit may make useless: (key,
    /// segment), of every epoch.
    entries: Vec<(String, u64)>,
    /// Bytes of each dirty segment that replay found in the journal: they
    /// are in the bucket already.
    pub(super) replayed: BTreeMap<u64, u64>,
    /// Tombstones found or made at open, and when: deleted once no holder
    /// they fenced can still write (see [`S3Store::collect_journal`]).
    tombstones: Vec<String>,
    opened: Option<Instant>,
}

impl S3Store {
    /// Sends every dirty segment's bytes not yet in the journal. Called
    /// before a flush is acknowledged; fails with `Fenced` if a taker's
    /// tombstone took this epoch's next key.
    pub(super) fn journal_flush(&self) -> Result<()> {
        let inner = &self.inner;
        let mut js = inner.journal.lock();
        loop {
            let piece = {
                let up = inner.up.lock();
                up.dirty
                    .iter()
                    .find(|(_, d)| d.len > d.journaled)
                    .map(|(&id, d)| (id, d.journaled, (d.len - d.journaled).min(MAX_ENTRY_DATA)))
            };
            let Some((segment, offset, len)) = piece else {
                return Ok(());
            };
            let mut data = vec![0u8; usize::try_from(len).expect("an entry fits memory")];
            inner.local.read_at(SegmentId(segment), offset, &mut data)?;
            self.put_entry(&mut js, segment, offset, data)?;
            if let Some(d) = inner.up.lock().dirty.get_mut(&segment) {
                d.journaled = d.journaled.max(offset + len);
            }
        }
    }

    /// Writes the next entry of this epoch.
    fn put_entry(
        &self,
        js: &mut JournalState,
        segment: u64,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<()> {
        let inner = &self.inner;
        let epoch = inner.holder.epoch;
        js.next_seq = js.next_seq.max(1);
        let seq = js.next_seq;
        let bytes = data.len() as u64;
        let entry = JournalEntry {
            epoch,
            seq,
            kind: EntryKind::Data {
                segment,
                offset,
                data,
            },
        };
        let key = entry_key(epoch, seq);
        let give_up = || {
            inner.fenced.lock().is_some() || inner.stop.load(std::sync::atomic::Ordering::SeqCst)
        };
        let deadline = Instant::now() + inner.opts.backpressure_timeout;
        match inner
            .remote
            .put_create(&key, Bytes::from(entry.encode()), Some(deadline), &give_up)
        {
            Ok(()) => {}
            Err(RemoteError::AlreadyExists { .. }) => {
                let why = format!(
                    "another host took the pool over: its tombstone holds {key}, this holder's next flush journal entry"
                );
                tracing::error!(key = %key, "fenced: {why}");
                *inner.fenced.lock() = Some(why.clone());
                return Err(StoreError::Fenced { detail: why });
            }
            Err(e) => return Err(unavailable("writing the flush journal", e)),
        }
        js.next_seq = seq + 1;
        js.entries.push((key, segment));
        let c = &inner.counters;
        c.journal_entries
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c.journal_bytes
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// At open, before the cache is reconciled with `base` (the latest
    /// manifest): closes the last holder's journal with a tombstone (if the
    /// pool was held), then writes every epoch's entries, in order, into
    /// the cache's files of segments `base` does not list.
    pub(super) fn replay_journal(&self, base: &Manifest) -> std::result::Result<(), OpenError> {
        let inner = &self.inner;
        if let Some(old) = &base.holder {
            self.tombstone(old.epoch)?;
        }
        let by_epoch = self.list_entries()?;
        let max_listed = base.segments.last().map_or(0, |s| s.id);
        let mut replayed: BTreeMap<u64, u64> = BTreeMap::new();
        let mut entries = Vec::new();
        let mut tombstones = Vec::new();
        for (epoch, seqs) in by_epoch {
            let mut expect = None;
            for seq in seqs {
                // Entries are deleted oldest first: an epoch starts at its
                // lowest entry left, and ends at its first gap.
                if expect.is_some_and(|e| e != seq) {
                    tracing::warn!(
                        epoch,
                        seq,
                        "gap in the flush journal; later entries of this epoch ignored"
                    );
                    break;
                }
                expect = Some(seq + 1);
                let key = entry_key(epoch, seq);
                let bytes = inner
                    .remote
                    .get(&key, Instant::now() + CALL_TIMEOUT)?
                    .ok_or_else(|| OpenError::Corrupt(format!("{key} is listed but missing")))?;
                let e = JournalEntry::decode(&bytes)
                    .map_err(|why| OpenError::Corrupt(format!("{key}: {why}")))?;
                if (e.epoch, e.seq) != (epoch, seq) {
                    return Err(OpenError::Corrupt(format!(
                        "{key} holds entry {}/{}",
                        e.epoch, e.seq
                    )));
                }
                let EntryKind::Data {
                    segment,
                    offset,
                    data,
                } = e.kind
                else {
                    tombstones.push(key);
                    break;
                };
                entries.push((key, segment));
                if segment <= max_listed {
                    continue;
                }
                let have = replayed.get(&segment).copied().unwrap_or(0);
                if offset > have {
                    return Err(OpenError::Corrupt(format!(
                        "the flush journal skips bytes {have}..{offset} of segment {segment}"
                    )));
                }
                inner
                    .local
                    .write_recovered(SegmentId(segment), offset, &data)?;
                replayed.insert(segment, have.max(offset + data.len() as u64));
            }
        }
        if !replayed.is_empty() {
            let bytes: u64 = replayed.values().sum();
            tracing::info!(
                segments = replayed.len(),
                bytes,
                "replayed the flush journal"
            );
        }
        let mut js = inner.journal.lock();
        js.entries = entries;
        js.replayed = replayed;
        js.tombstones = tombstones;
        js.opened = Some(Instant::now());
        Ok(())
    }

    /// Every entry key in the bucket: seqs by epoch, in order.
    fn list_entries(&self) -> std::result::Result<BTreeMap<u64, Vec<u64>>, OpenError> {
        let keys = self
            .inner
            .remote
            .list(JOURNAL_DIR, Instant::now() + CALL_TIMEOUT)?;
        if keys.len() > MAX_ENTRIES {
            return Err(OpenError::Corrupt(format!(
                "the flush journal holds {} entries (at most {MAX_ENTRIES})",
                keys.len()
            )));
        }
        let mut by_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (key, _) in keys {
            if let Some((e, s)) = parse_entry_key(&key) {
                by_epoch.entry(e).or_default().push(s);
            }
        }
        for seqs in by_epoch.values_mut() {
            seqs.sort_unstable();
        }
        Ok(by_epoch)
    }

    /// Ends epoch `epoch`'s journal: creates its next entry as a tombstone.
    /// An entry that won the race is the old holder's last flush: the
    /// tombstone goes after it.
    fn tombstone(&self, epoch: u64) -> std::result::Result<(), OpenError> {
        let inner = &self.inner;
        let mut next = self
            .list_entries()?
            .get(&epoch)
            .and_then(|s| s.last().copied())
            .map_or(1, |s| s + 1);
        for _ in 0..MAX_TOMBSTONE_ATTEMPTS {
            let key = entry_key(epoch, next);
            let body = JournalEntry {
                epoch,
                seq: next,
                kind: EntryKind::Tombstone,
            }
            .encode();
            match inner.remote.put_create(
                &key,
                Bytes::from(body),
                Some(Instant::now() + CALL_TIMEOUT),
                &|| false,
            ) {
                Ok(()) => return Ok(()),
                Err(RemoteError::AlreadyExists { .. }) => {
                    let got = inner.remote.get(&key, Instant::now() + CALL_TIMEOUT)?;
                    match got.map(|b| JournalEntry::decode(&b)) {
                        Some(Ok(JournalEntry {
                            kind: EntryKind::Tombstone,
                            ..
                        })) => return Ok(()),
                        _ => next += 1,
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(OpenError::Corrupt(format!(
            "could not end the journal of epoch {epoch}: its holder keeps writing"
        )))
    }

    /// After a commit: deletes the entries of segments the manifest lists
    /// now (their bytes are in the bucket's segments), and the tombstones
    /// found at open once every holder they fenced is past its lease: such
    /// a holder refuses flushes by itself once its lease lapsed (it could
    /// not renew it after this store's first commit), so it can no longer
    /// write the entry a tombstone kept it from. Best effort.
    pub(super) fn collect_journal(&self, max_listed: u64) {
        let inner = &self.inner;
        let safe_after = inner.opts.lease.expire * 2;
        let done: Vec<String> = {
            let mut js = inner.journal.lock();
            let (done, keep) = std::mem::take(&mut js.entries)
                .into_iter()
                .partition(|(_, seg)| *seg <= max_listed);
            js.entries = keep;
            let mut done: Vec<String> = done.into_iter().map(|(k, _)| k).collect();
            if js.opened.is_some_and(|t| t.elapsed() > safe_after) {
                done.append(&mut js.tombstones);
            }
            done
        };
        let soon = Instant::now() + Duration::from_secs(10);
        for k in done {
            let _ = inner.remote.delete(&k, soon);
        }
    }
}
