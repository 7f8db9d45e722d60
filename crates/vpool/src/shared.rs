//! Shared pools on S3 as the binary opens them: [`BucketShared`], the
//! host's [`SharedStore`] on `vpool-s3` (the layout and why are in
//! `vpool_s3::shared` and `docs/multi-host.md`).
//!
//! The shared pool's directory holds its `pool.json` (`"shared": true`)
//! and, in `vols/<volume>/`, the cache of each volume this host owns: an
//! ordinary S3 pool cache whose `pool.json` names the family's prefix
//! (`<pool URL>/vols/<id>`) and repeats the shared pool's settings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use vpool_s3::shared::{self, FamilyOwner as BucketOwner};
use vpool_s3::{OpenError, Remote};
use vpool_service::{ErrorKind, FamilyOwner, S3Spec, SharedStore};

use crate::s3pool::{PoolFile, S3PoolSettings};

/// A shared pool's bucket; see the module doc.
pub struct BucketShared {
    name: String,
    file: PoolFile,
    remote: Arc<Remote>,
    /// Clone families known flattened (the mark is never removed): not
    /// asked again. Bounded by the pool's families.
    flattened: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl BucketShared {
    /// The shared pool whose directory's `pool.json` is `file`: connects
    /// and checks the bucket holds a shared pool. Blocking.
    pub fn open(name: &str, file: PoolFile) -> anyhow::Result<BucketShared> {
        let remote = file.connect()?;
        shared::check_shared(&remote)
            .with_context(|| format!("opening the shared pool at {}", file.url))?;
        Ok(BucketShared {
            flattened: std::sync::Mutex::new(std::collections::BTreeSet::new()),
            name: name.to_string(),
            file,
            remote: Arc::new(remote),
        })
    }

    /// The pool's URL, its connection to the bucket, on whose runtime
    /// the families this host opens run too (`DirOpener`), and its cache
    /// size, which those families share.
    pub fn connection(&self) -> (String, Arc<Remote>, u64) {
        (
            self.file.url.clone(),
            Arc::clone(&self.remote),
            self.file.cache_size_bytes,
        )
    }

    /// What `pool create`/`attach` of family `id` are given: the shared
    /// pool's settings at the family's URL, its cache in `dir`.
    fn family_settings(&self, id: &str, dir: &Path, durability: Option<&str>) -> S3PoolSettings {
        let f = &self.file;
        let durability = durability.map_or_else(|| f.durability.to_string(), str::to_string);
        S3PoolSettings {
            spec: S3Spec {
                url: format!(
                    "{}/{}",
                    f.url.trim_end_matches('/'),
                    shared::family_prefix(id)
                ),
                endpoint: f.endpoint.clone(),
                region: f.region.clone(),
                credentials_file: f.credentials_file.clone(),
                cache_size_bytes: f.cache_size_bytes,
                seal_after_secs: Some(f.seal_after_secs),
                backpressure_timeout_secs: Some(f.backpressure_timeout_secs),
                read_timeout_secs: Some(f.read_timeout_secs),
                lease_expire_secs: Some(f.lease_expire_secs),
                shared: false,
                durability: Some(durability),
            },
            cache_dir: dir.to_path_buf(),
        }
    }

    fn record_of(&self, vol: &str) -> vpool_service::Result<shared::NameRecord> {
        shared::lookup_record(&self.remote, vol)
            .map_err(bucket_error)?
            .ok_or_else(|| {
                vpool_service::Error::new(
                    ErrorKind::NotFound,
                    format!("shared pool {} has no volume {vol}", self.name),
                )
            })
    }

    /// Claims `vol` (a clone of `base` if given) and makes its family in
    /// the bucket, with its cache in `dir`.
    fn claim_and_make(
        &self,
        vol: &str,
        dir: &Path,
        durability: Option<&str>,
        base: Option<shared::BaseRef>,
    ) -> vpool_service::Result<()> {
        let parsed = durability
            .map(str::parse::<vpool_s3::Durability>)
            .transpose()
            .map_err(vpool_service::Error::invalid)?;
        let claimed = shared::claim_name(&self.remote, vol, parsed, base).map_err(bucket_error)?;
        let Some(id) = claimed else {
            return Err(vpool_service::Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "shared pool {} has a volume {vol} already (`vpool vol status {}/{vol}` says who owns it)",
                    self.name, self.name
                ),
            ));
        };
        let settings = self.family_settings(&id, dir, durability);
        crate::s3pool::create(Some(&self.family_name(vol)), &settings, false)
            .map(|_| ())
            .map_err(|e| {
                failed(e.context(format!(
                    "the name {vol} is claimed (family {id}) but its family could not be made"
                )))
            })
    }

    /// Whether clone family `id` was flattened (asked of the bucket until
    /// it says yes).
    fn is_flattened(&self, id: &str) -> vpool_service::Result<bool> {
        let known = || self.flattened.lock().unwrap_or_else(|e| e.into_inner());
        if known().contains(id) {
            return Ok(true);
        }
        let family = self.remote.child(&shared::family_prefix(id));
        let yes = shared::is_flattened(&family).map_err(bucket_error)?;
        if yes {
            known().insert(id.to_string());
        }
        Ok(yes)
    }

    fn family_name(&self, vol: &str) -> String {
        format!("{}/{vol}", self.name)
    }
}

fn bucket_error(e: OpenError) -> vpool_service::Error {
    let kind = match &e {
        OpenError::Corrupt(_) => ErrorKind::Corrupt,
        _ => ErrorKind::Failed,
    };
    vpool_service::Error::new(kind, e.to_string())
}

fn failed(e: anyhow::Error) -> vpool_service::Error {
    vpool_service::Error::new(ErrorKind::Failed, format!("{e:#}"))
}

impl SharedStore for BucketShared {
    fn names(&self) -> vpool_service::Result<Vec<String>> {
        shared::list_names(&self.remote).map_err(bucket_error)
    }

    fn owner(&self, vol: &str) -> vpool_service::Result<FamilyOwner> {
        let mut rec = self.record_of(vol)?;
        let family = self.remote.child(&shared::family_prefix(&rec.id));
        let o: BucketOwner = shared::family_owner(&family).map_err(bucket_error)?;
        if rec.base.is_some() && self.is_flattened(&rec.id)? {
            rec.base = None;
        }
        Ok(FamilyOwner {
            holder: o.holder,
            host: o.host,
            epoch: o.epoch,
            generation: o.generation,
            lease_expire_ms: o.lease_expire_ms,
            since_unix_ms: o.since_unix_ms,
            segments: o.segments,
            peer: o.peer,
            volume_durability: rec.durability,
            base_family: rec.base.as_ref().map(|b| b.id.clone()),
            base: rec.base.map(|b| b.volume),
            family: Some(rec.id),
            sealed: o.sealed,
        })
    }

    fn create(&self, vol: &str, dir: &Path, durability: Option<&str>) -> vpool_service::Result<()> {
        self.claim_and_make(vol, dir, durability, None)
    }

    fn create_clone(&self, vol: &str, dir: &Path, base: &str) -> vpool_service::Result<()> {
        let rec = self.record_of(base)?;
        let base = shared::BaseRef {
            volume: base.to_string(),
            id: rec.id,
        };
        self.claim_and_make(vol, dir, None, Some(base))
    }

    fn attach(&self, vol: &str, dir: &Path) -> vpool_service::Result<()> {
        let rec = self.record_of(vol)?;
        let settings = self.family_settings(&rec.id, dir, rec.durability.as_deref());
        crate::s3pool::attach(Some(&self.family_name(vol)), &settings)
            .map(|_| ())
            .map_err(failed)
    }

    fn delete_name(&self, vol: &str) -> vpool_service::Result<String> {
        shared::delete_name(&self.remote, vol)
            .map_err(bucket_error)?
            .ok_or_else(|| {
                vpool_service::Error::new(
                    ErrorKind::NotFound,
                    format!("shared pool {} has no volume {vol}", self.name),
                )
            })
    }

    fn delete_family(&self, id: &str) -> vpool_service::Result<()> {
        let n = shared::delete_family(&self.remote, id).map_err(bucket_error)?;
        tracing::info!(pool = %self.name, family = id, objects = n, "family deleted from the bucket");
        Ok(())
    }

    fn peer_secret(&self) -> vpool_service::Result<[u8; 32]> {
        shared::peer_secret(&self.remote).map_err(bucket_error)
    }

    fn drop_ref(&self, vol: &str, clone_id: &str) -> vpool_service::Result<()> {
        let id = self.record_of(vol)?.id;
        let family = self.remote.child(&shared::family_prefix(&id));
        shared::drop_ref(&family, clone_id).map_err(bucket_error)
    }

    fn clones_of(&self, vol: &str) -> vpool_service::Result<(Vec<String>, usize)> {
        let id = self.record_of(vol)?.id;
        let family = self.remote.child(&shared::family_prefix(&id));
        let mut refs = shared::list_refs(&family).map_err(bucket_error)?;
        let mut clones = Vec::new();
        for name in self.names()? {
            let Ok(rec) = self.record_of(&name) else {
                continue;
            };
            if rec.base.is_some_and(|b| b.id == id) {
                // A flattened clone's ref names a volume too (its drop
                // may have failed), but the clone reads nothing of it.
                refs.retain(|r| *r != rec.id);
                if !self.is_flattened(&rec.id)? {
                    clones.push(name);
                }
            }
        }
        Ok((clones, refs.len()))
    }

    fn mark_flattened(&self, vol: &str) -> vpool_service::Result<()> {
        let rec = self.record_of(vol)?;
        let Some(base) = rec.base else {
            return Err(vpool_service::Error::invalid(format!(
                "volume {}/{vol} is not a clone of a template",
                self.name
            )));
        };
        let family = self.remote.child(&shared::family_prefix(&rec.id));
        shared::mark_flattened(&family, &base.id).map_err(bucket_error)
    }

    fn forget(&self, dir: &Path) {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a released volume's cache");
        }
    }
}

/// Whether `dir` is a shared pool's directory (its `pool.json` says so).
pub fn is_shared_dir(dir: &Path) -> anyhow::Result<Option<PoolFile>> {
    Ok(PoolFile::load(dir)?.filter(|f| f.shared))
}

/// The name a shared pool's directory had when it was attached (for
/// messages), else its directory's name.
pub fn pool_name(dir: &Path, file: &PoolFile) -> String {
    file.name.clone().unwrap_or_else(|| {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| PathBuf::from(dir).display().to_string())
    })
}
