//! What a pool's bucket says, read without opening the pool: the latest
//! manifest and a summary of it (`vpool pool attach` shows who holds the
//! pool before making a cache for it), and the probe of the store's
//! create-only PUT that a new pool must pass before vpool trusts it to
//! fence a second writer.
//!
//! Opening a pool ([`S3Store::open`](crate::S3Store::open)) and
//! [`pool_summary`] find the latest manifest the same way:
//! [`latest_generation`], then [`read_manifest`], which also checks that
//! the manifest is the generation its key says.

use crate::manifest::{Fencing, MANIFEST_DIR, Manifest, manifest_key, parse_manifest_key};
use crate::remote::{Remote, RemoteError};
use crate::store::{OpenError, random_id};
use bytes::Bytes;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long each call of [`pool_summary`] may take.
const SUMMARY_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A pool as its latest manifest describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSummary {
    /// Where it lives, for messages (`s3://bucket/prefix`, no credentials).
    pub url: String,
    pub pool_id: String,
    /// The latest manifest's generation.
    pub generation: u64,
    /// Who holds the write lease, as `host:pid`; `None` once released by a
    /// clean close.
    pub held_by: Option<String>,
    /// [`Fencing::Unsafe`]: the store cannot fence a second writer, and the
    /// pool was made with `--unsafe-single-host`.
    pub fencing: Fencing,
    /// Segments in the bucket.
    pub segments: u64,
}

/// The generation of the bucket's latest manifest; `None`: no pool there.
pub fn latest_generation(remote: &Remote, deadline: Instant) -> Result<Option<u64>, RemoteError> {
    Ok(remote
        .list(MANIFEST_DIR, deadline)?
        .iter()
        .filter_map(|(k, _)| parse_manifest_key(k))
        .max())
}

/// Manifest `generation`, read and checked: its envelope, its body, and
/// that it is the generation its key says.
pub fn read_manifest(
    remote: &Remote,
    generation: u64,
    deadline: Instant,
) -> Result<Manifest, OpenError> {
    let g = generation;
    let bytes = remote
        .get(&manifest_key(g), deadline)?
        .ok_or_else(|| OpenError::Corrupt(format!("manifest {g} vanished")))?;
    let m =
        Manifest::decode(&bytes).map_err(|e| OpenError::Corrupt(format!("manifest {g}: {e}")))?;
    if m.generation != g {
        return Err(OpenError::Corrupt(format!(
            "manifest {g} says it is generation {}",
            m.generation
        )));
    }
    Ok(m)
}

/// The pool at `remote`, from its latest manifest; takes nothing (no lease,
/// no cache). [`OpenError::NoPool`] if the bucket holds none.
pub fn pool_summary(remote: &Remote) -> Result<PoolSummary, OpenError> {
    let url = remote.display().to_string();
    let Some(g) = latest_generation(remote, Instant::now() + SUMMARY_CALL_TIMEOUT)? else {
        return Err(OpenError::NoPool { url });
    };
    let m = read_manifest(remote, g, Instant::now() + SUMMARY_CALL_TIMEOUT)?;
    Ok(PoolSummary {
        url,
        pool_id: m.pool_id,
        generation: m.generation,
        held_by: m.holder.map(|h| h.name()),
        fencing: m.fencing,
        segments: m.segments.len() as u64,
    })
}

/// Checks that the store's create-only PUT is atomic: a repeat create must
/// fail, and of several racing creates of one key exactly one may win.
pub fn probe_fencing(remote: &Remote) -> Result<Fencing, String> {
    let key = format!("probe/{}", random_id());
    let deadline = || Some(Instant::now() + Duration::from_secs(30));
    remote
        .put_create(&key, Bytes::from_static(b"1"), deadline(), &|| false)
        .map_err(|e| format!("a create-only PUT failed: {e}"))?;
    let verdict = match remote.put_create(&key, Bytes::from_static(b"2"), deadline(), &|| false) {
        Err(RemoteError::AlreadyExists { .. }) => {
            // Race: every thread creates the same fresh key.
            let race_key = format!("probe/{}", random_id());
            let wins = AtomicU64::new(0);
            std::thread::scope(|s| {
                for i in 0..8u8 {
                    let (race_key, wins) = (&race_key, &wins);
                    s.spawn(move || {
                        if remote
                            .put_create(race_key, Bytes::from(vec![i]), deadline(), &|| false)
                            .is_ok()
                        {
                            wins.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
            });
            let _ = remote.delete(&race_key, Instant::now() + Duration::from_secs(10));
            match wins.load(Ordering::SeqCst) {
                1 => Ok(Fencing::Atomic),
                n => Err(format!(
                    "{n} of 8 racing create-only PUTs of one key succeeded"
                )),
            }
        }
        Ok(()) => Err("a second create-only PUT of an existing key succeeded".into()),
        Err(e) => Err(format!("a create-only PUT failed: {e}")),
    };
    let _ = remote.delete(&key, Instant::now() + Duration::from_secs(10));
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{OpenMode, S3PoolOptions, S3Store};
    use object_store::ObjectStore;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    #[test]
    fn a_summary_says_who_holds_the_pool() {
        let bucket: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let remote = || Remote::new(bucket.clone(), "pool", "memory://pool".into()).unwrap();
        assert!(matches!(
            pool_summary(&remote()),
            Err(OpenError::NoPool { .. })
        ));
        let cache = tempfile::tempdir().unwrap();
        let mode = OpenMode::Create {
            allow_unsafe_fencing: false,
        };
        let store =
            S3Store::open(remote(), S3PoolOptions::new(cache.path(), 256 << 20, mode)).unwrap();
        let held = pool_summary(&remote()).unwrap();
        let by = held.held_by.clone().expect("the opener holds the pool");
        assert!(by.ends_with(&format!(":{}", std::process::id())), "{by}");
        assert_eq!(held.generation, store.generation());
        assert_eq!(held.fencing, Fencing::Atomic);
        assert_eq!((held.url.as_str(), held.segments), ("memory://pool", 0));
        assert!(store.close(), "nothing to upload");
        let released = pool_summary(&remote()).unwrap();
        assert_eq!(released.held_by, None);
        assert_eq!(released.generation, held.generation + 1);
        assert_eq!(released.pool_id, held.pool_id);
    }
}
