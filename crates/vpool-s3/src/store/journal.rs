//! Remote durability on an [`S3Store`]: the flush journal
//! ([`crate::journal`] has its format and protocol).
//!
//! - **Flush** ([`S3Store::journal_flush`], from `admit_flush` when the
//!   pool's durability is `remote`): every dirty segment's bytes not in the
//!   journal yet, up to where each ended when the flush began, oldest
//!   segment first, go out as create-only entries `journal/<our
//!   epoch>/<seq>` before the flush is acknowledged; the last is flagged
//!   the end of the flush. One writer at a time: a flush that waited for
//!   another finds its bytes sent already (group commit). An entry whose
//!   key holds another entry means a taker's tombstone: this store is
//!   fenced.
//! - **Open** ([`S3Store::replay_journal`], before the cache is reconciled
//!   with the manifest): the last holder's journal is closed with a
//!   tombstone, then every epoch's entries are written, in order, into the
//!   cache's files of segments the manifest does not list, so the engine
//!   recovers them like a local log.
//! - **After a commit** ([`S3Store::collect_journal`]): entries of segments
//!   the manifest now lists are deleted, except this epoch's newest, which
//!   tells a taker where to put its tombstone (a deletion that failed is
//!   tried again after the next commit). Tombstones stay: deleting one
//!   would let a fenced holder whose PUT is still being retried write its
//!   next entry. A clean close deletes what is left of its own epoch.
//!
//! Segments are never forgotten unsent in `remote` mode (`forget_unsent`):
//! a gap in the bucket's history would make recovery cut the journaled
//! segments after it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use vpool_store::{Result, SegmentId, SegmentStore, StoreError};

use super::{OpenError, S3Store, unavailable};
use crate::journal::{
    EntryKind, JOURNAL_DIR, JournalEntry, MAX_ENTRY_DATA, entry_key, parse_entry_key,
};
use crate::manifest::Manifest;
use crate::remote::RemoteError;

/// Most entries a bucket's journal may hold when it is replayed (each is a
/// GET at open): about an hour of flushes at 200 a second with no upload.
const MAX_ENTRIES: usize = 1_000_000;
/// How long one call of the journal's replay may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Tombstone attempts before giving up (each lost one means the old
/// holder wrote an entry meanwhile).
const MAX_TOMBSTONE_ATTEMPTS: u32 = 64;

/// The journal's writer state (one flush at a time holds it).
#[derive(Debug, Default)]
pub(super) struct JournalState {
    /// This epoch's next entry.
    next_seq: u64,
    /// Bytes of each dirty segment that replay found in the journal: they
    /// are in the bucket already.
    pub(super) replayed: BTreeMap<u64, u64>,
}

/// Entries in the bucket that a commit may make useless: (key, segment),
/// of every epoch, oldest first. Apart from [`JournalState`] so that the
/// uploader never waits for a flush's PUTs.
pub(super) type JournalEntries = Vec<(String, u64)>;

/// A piece to journal: (segment, offset, len, last of the flush).
type Piece = (u64, u64, u64, bool);

impl S3Store {
    /// Sends every dirty segment's bytes not yet in the journal, up to
    /// where each ended when the flush began. Called before a flush is
    /// acknowledged; fails with `Fenced` if a taker's tombstone took this
    /// epoch's next key.
    pub(super) fn journal_flush(&self) -> Result<()> {
        self.refuse_if_read_only("journal write")?;
        let inner = &self.inner;
        let mut js = inner.journal.lock();
        // Where each segment ends now: what the flush covers. Appends made
        // later belong to a later flush.
        let targets: Vec<(u64, u64)> = {
            let up = inner.up.lock();
            up.dirty
                .iter()
                .filter(|(_, d)| d.len > d.journaled)
                .map(|(&id, d)| (id, d.len))
                .collect()
        };
        while let Some(piece) = self.next_piece(&targets) {
            let (segment, offset, len, _) = piece;
            let mut data = vec![0u8; usize::try_from(len).expect("an entry fits memory")];
            if let Err(e) = inner.local.read_at(SegmentId(segment), offset, &mut data) {
                // Uploaded and committed meanwhile (its file may be gone,
                // or punched): nothing to journal any more.
                if !inner.up.lock().dirty.contains_key(&segment) {
                    continue;
                }
                return Err(e);
            }
            self.put_entry(&mut js, piece, data)?;
            if let Some(d) = inner.up.lock().dirty.get_mut(&segment) {
                d.journaled = d.journaled.max(offset + len);
            }
        }
        Ok(())
    }

    /// The next piece of `targets` (segment, end) not journaled yet, at
    /// most [`MAX_ENTRY_DATA`]; flagged the last of the flush when nothing
    /// is left after it.
    fn next_piece(&self, targets: &[(u64, u64)]) -> Option<Piece> {
        let up = self.inner.up.lock();
        let left: Vec<(u64, u64, u64)> = targets
            .iter()
            .filter_map(|&(id, end)| {
                let d = up.dirty.get(&id)?;
                (end > d.journaled).then_some((id, d.journaled, end))
            })
            .collect();
        let &(id, from, end) = left.first()?;
        let len = (end - from).min(MAX_ENTRY_DATA);
        let last = left.len() == 1 && from + len == end;
        Some((id, from, len, last))
    }

    /// Writes the next entry of this epoch.
    fn put_entry(&self, js: &mut JournalState, piece: Piece, data: Vec<u8>) -> Result<()> {
        let inner = &self.inner;
        let (segment, offset, _, end_of_flush) = piece;
        let epoch = inner.holder.epoch;
        js.next_seq = js.next_seq.max(1);
        let seq = js.next_seq;
        let bytes = data.len() as u64;
        let body = Bytes::from(
            JournalEntry {
                epoch,
                seq,
                kind: EntryKind::Data {
                    segment,
                    offset,
                    data,
                    end_of_flush,
                },
            }
            .encode(),
        );
        let key = entry_key(epoch, seq);
        // Retries stop with the lease: past it, a taker may have replayed
        // and its tombstone may be gone by the time a late PUT lands.
        let give_up = || inner.stop.load(Ordering::SeqCst) || self.check_lease().is_err();
        let deadline = Instant::now() + inner.opts.lease.valid;
        match inner
            .remote
            .put_create(&key, body.clone(), Some(deadline), &give_up)
        {
            Ok(()) => {}
            // A retry of a PUT that landed finds its own entry.
            Err(RemoteError::AlreadyExists { .. }) if self.holds(&key, &body) => {}
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
        inner.journal_entries.lock().push((key, segment));
        let c = &inner.counters;
        c.journal_entries.fetch_add(1, Ordering::Relaxed);
        c.journal_bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the object at `key` is `body` (an ambiguous PUT landed).
    fn holds(&self, key: &str, body: &Bytes) -> bool {
        let deadline = Instant::now() + CALL_TIMEOUT;
        matches!(self.inner.remote.get(key, deadline), Ok(Some(b)) if b == *body)
    }

    /// At open, before the cache is reconciled with `base` (the latest
    /// manifest): closes the last holder's journal with a tombstone (if the
    /// pool was held), then writes every epoch's entries, in order, into
    /// the cache's files of segments `base` does not list. A listed entry
    /// that is gone was deleted by a commit `base` does not show: the open
    /// starts again (`LostRace`).
    pub(super) fn replay_journal(&self, base: &Manifest) -> std::result::Result<(), OpenError> {
        let inner = &self.inner;
        if let Some(old) = &base.holder {
            self.tombstone(old.epoch)?;
        }
        let max_listed = base.segments.last().map_or(0, |s| s.id);
        let mut replay = Replay::default();
        let mut entries = Vec::new();
        for (epoch, seqs) in self.list_entries()? {
            for seq in seqs {
                let key = entry_key(epoch, seq);
                let Some(bytes) = inner.remote.get(&key, Instant::now() + CALL_TIMEOUT)? else {
                    return Err(OpenError::LostRace {
                        url: inner.remote.display().to_string(),
                    });
                };
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
                    end_of_flush,
                } = e.kind
                else {
                    // A tombstone: nothing of this epoch after it counts.
                    break;
                };
                entries.push((key, segment));
                if segment > max_listed {
                    replay.pending.push((segment, offset, data));
                }
                if end_of_flush {
                    replay.apply(self)?;
                }
            }
            // An epoch that ends without the end of its last flush died
            // between two pieces: that flush was never acknowledged.
            replay.pending.clear();
        }
        if !replay.done.is_empty() {
            let bytes: u64 = replay.done.values().sum();
            tracing::info!(
                segments = replay.done.len(),
                bytes,
                "replayed the flush journal"
            );
        }
        inner.journal.lock().replayed = replay.done;
        *inner.journal_entries.lock() = entries;
        Ok(())
    }

    /// Every entry key in the bucket: seqs by epoch, in order. Gaps are
    /// entries a commit deleted (their segments are in the bucket).
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
    /// The holder never deletes its newest entry, so the last one listed is
    /// where it stands; an entry that wins the race is the old holder's
    /// last flush, and the tombstone goes after it.
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
    /// now (their bytes are in the bucket's segments), except this epoch's
    /// newest (see the module doc). With `all`, at a clean close after
    /// the lease is released, that one too. Best effort: what fails is
    /// tried again next time.
    pub(super) fn collect_journal(&self, max_listed: u64, all: bool) {
        let inner = &self.inner;
        let own = format!("{JOURNAL_DIR}/{:016x}/", inner.holder.epoch);
        let done: Vec<(String, u64)> = {
            let mut entries = inner.journal_entries.lock();
            let newest_own = entries.iter().rposition(|(k, _)| k.starts_with(&own));
            let mut done = Vec::new();
            let mut keep = Vec::new();
            for (i, e) in std::mem::take(&mut *entries).into_iter().enumerate() {
                if e.1 <= max_listed && (all || Some(i) != newest_own) {
                    done.push(e);
                } else {
                    keep.push(e);
                }
            }
            *entries = keep;
            done
        };
        let soon = Instant::now() + Duration::from_secs(10);
        let failed: Vec<(String, u64)> = done
            .into_iter()
            .filter(|(k, _)| inner.remote.delete(k, soon).is_err())
            .collect();
        if !failed.is_empty() {
            let mut entries = inner.journal_entries.lock();
            let rest = std::mem::replace(&mut *entries, failed);
            entries.extend(rest);
        }
    }
}

/// What replay has gathered: the pieces of the flush being read, and what
/// each segment holds so far.
#[derive(Default)]
struct Replay {
    pending: Vec<(u64, u64, Vec<u8>)>,
    /// Bytes of each segment written to the cache, from its start.
    done: BTreeMap<u64, u64>,
}

impl Replay {
    /// Writes the pending pieces (a whole flush) into the cache.
    fn apply(&mut self, store: &S3Store) -> std::result::Result<(), OpenError> {
        for (segment, offset, data) in std::mem::take(&mut self.pending) {
            let have = self.done.get(&segment).copied().unwrap_or(0);
            if offset > have {
                return Err(OpenError::Corrupt(format!(
                    "the flush journal skips bytes {have}..{offset} of segment {segment}"
                )));
            }
            store
                .inner
                .local
                .write_recovered(SegmentId(segment), offset, &data)?;
            self.done
                .insert(segment, have.max(offset + data.len() as u64));
        }
        Ok(())
    }
}
