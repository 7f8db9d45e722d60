//! `host.json`: the pools a host holds beside its default one, read at
//! start and replaced atomically after every change.
//!
//! ```text
//! {"version": 1, "pools": [{"name": "cold", "dir": "/var/cache/vpool/cold"}]}
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::MAX_POOLS;
use crate::error::{Error, Result};

/// The file in the home that lists the pools besides the default one.
pub const HOST_FILE: &str = "host.json";
/// The version of `host.json` this vpool writes and reads.
const HOST_FILE_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
pub(super) struct HostFile {
    pub(super) version: u32,
    pub(super) pools: Vec<PoolEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct PoolEntry {
    pub(super) name: String,
    pub(super) dir: PathBuf,
}

/// The pools `host.json` in `home` lists beside the default one, as
/// `(name, directory)`: for tools that work on a pool while no daemon runs.
pub fn listed_pools(home: &Path) -> Result<Vec<(String, PathBuf)>> {
    Ok(read_host_file(home)?
        .into_iter()
        .map(|e| (e.name, e.dir))
        .collect())
}

pub(super) fn read_host_file(home: &Path) -> Result<Vec<PoolEntry>> {
    let path = home.join(HOST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::internal(format!("reading {}: {e}", path.display()))),
    };
    let file: HostFile = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("{} is not valid: {e}", path.display())))?;
    if file.version != HOST_FILE_VERSION {
        return Err(Error::invalid(format!(
            "{} has version {} (this vpool reads version {HOST_FILE_VERSION})",
            path.display(),
            file.version
        )));
    }
    check_entries(&file.pools)
        .map_err(|e| Error::invalid(format!("{} is not valid: {}", path.display(), e.message)))?;
    Ok(file.pools)
}

/// What `host.json` may list: at most [`MAX_POOLS`] pools (beside the
/// default one), each with a valid name and an absolute directory, no name
/// or directory twice. A hand-edited file gets a clear refusal rather than
/// two pools on one directory.
fn check_entries(entries: &[PoolEntry]) -> Result<()> {
    if entries.len() >= MAX_POOLS {
        return Err(Error::invalid(format!(
            "it lists {} pools; a host holds at most {MAX_POOLS}",
            entries.len()
        )));
    }
    let mut names = HashSet::new();
    let mut dirs = HashSet::new();
    for e in entries {
        crate::names::check_pool_name(&e.name)?;
        super::check_absolute(&e.dir)?;
        if !names.insert(e.name.as_str()) {
            return Err(Error::invalid(format!("pool {} is listed twice", e.name)));
        }
        if !dirs.insert(e.dir.as_path()) {
            return Err(Error::invalid(format!(
                "the directory {} is listed twice",
                e.dir.display()
            )));
        }
    }
    Ok(())
}

/// Replaces `path` with `bytes`: write a temporary file, sync, rename, sync
/// the directory. A crash leaves the old file or the new one.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let io =
        |what: &str, e: std::io::Error| Error::internal(format!("{what} {}: {e}", path.display()));
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("creating a temporary for", e))?;
    f.write_all(bytes).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("replacing", e))?;
    // The new file is in place: from here on, failing would make the
    // caller undo a change the file already shows. A failed directory sync
    // only means a crash may bring the old file back.
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::warn!(file = %path.display(), error = %e, "syncing the directory failed: a crash may bring the previous file back");
    }
    Ok(())
}

/// Writes `host.json` in `home`: `pools`, `(name, directory)` each.
pub(super) fn write_host_file(home: &Path, pools: Vec<(String, PathBuf)>) -> Result<()> {
    let file = HostFile {
        version: HOST_FILE_VERSION,
        pools: pools
            .into_iter()
            .map(|(name, dir)| PoolEntry { name, dir })
            .collect(),
    };
    let bytes = serde_json::to_vec_pretty(&file)
        .map_err(|e| Error::internal(format!("encoding {HOST_FILE}: {e}")))?;
    write_atomically(&home.join(HOST_FILE), &bytes)
}

/// The records of JSON file `name` of `home` (`moves.json`,
/// `replicas.json`): none if it does not exist.
pub(super) fn read_list<T: serde::de::DeserializeOwned>(home: &Path, name: &str) -> Result<Vec<T>> {
    match std::fs::read(home.join(name)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::new(crate::error::ErrorKind::Corrupt, format!("{name}: {e}"))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::internal(format!("reading {name}: {e}"))),
    }
}

/// Replaces JSON file `name` of `home` with `records`, atomically and
/// durably (a temporary file, synced, renamed, the directory synced).
pub(super) fn write_list<T: Serialize>(home: &Path, name: &str, records: &[T]) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(records).expect("serializes");
    let path = home.join(name);
    let tmp = home.join(format!("{name}.tmp"));
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(home)?.sync_all()
    };
    write().map_err(|e| Error::internal(format!("writing {}: {e}", path.display())))
}
