//! Named pools: `vpool pool create cold --s3 ...` records `cold -> DIR` in a
//! small registry file, and `--pool cold` finds DIR through it.
//!
//! The registry is `$VPOOL_CONFIG_DIR/pools.json` (default
//! `$XDG_CONFIG_HOME/vpool/pools.json`, else `~/.config/vpool/pools.json`):
//! `{"pools": {"cold": "/var/cache/vpool"}}`. `--pool X` is looked up there
//! only when X has no `/` and is not an existing directory, so every way of
//! naming a pool by its directory works as before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The registry's file name in the config directory.
pub const REGISTRY_FILE: &str = "pools.json";

/// `name -> pool directory`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    #[serde(default)]
    pub pools: BTreeMap<String, PathBuf>,
}

/// vpool's config directory, if one can be named.
pub fn config_dir() -> Option<PathBuf> {
    let nonempty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    if let Some(d) = std::env::var_os("VPOOL_CONFIG_DIR").and_then(nonempty) {
        return Some(d);
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME").and_then(nonempty) {
        return Some(d.join("vpool"));
    }
    std::env::var_os("HOME")
        .and_then(nonempty)
        .map(|h| h.join(".config").join("vpool"))
}

/// Where the registry is.
pub fn registry_path() -> Option<PathBuf> {
    config_dir().map(|d| d.join(REGISTRY_FILE))
}

/// A pool name: what a volume name may be (letters, digits, `.`, `_`, `-`),
/// not starting with `.` or `-`.
pub fn check_pool_name(name: &str) -> anyhow::Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > 64
        || !name.chars().all(ok_char)
        || name.starts_with(['.', '-'])
    {
        bail!(
            "{name:?} is not a pool name: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        );
    }
    Ok(())
}

impl Registry {
    /// Reads the registry at `path`; a missing file is an empty registry.
    pub fn load_from(path: &Path) -> anyhow::Result<Registry> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("the pool registry {} is not valid", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(e) => {
                Err(e).with_context(|| format!("reading the pool registry {}", path.display()))
            }
        }
    }

    /// Writes the registry to `path` atomically.
    pub fn save_to(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the config directory {}", dir.display()))?;
        }
        let bytes = serde_json::to_vec_pretty(self).context("encoding the pool registry")?;
        crate::s3pool::write_file_atomic(path, &bytes)
    }
}

/// The pool directory `--pool ARG` means: ARG itself, unless it is a bare
/// name (no `/`) that is not an existing directory and is registered.
pub fn resolve_pool(arg: &Path) -> anyhow::Result<PathBuf> {
    let Some(name) = arg.to_str() else {
        return Ok(arg.to_path_buf());
    };
    if name.is_empty() || name.contains('/') || arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    let Some(path) = registry_path() else {
        return Ok(arg.to_path_buf());
    };
    let reg = Registry::load_from(&path)?;
    Ok(reg
        .pools
        .get(name)
        .cloned()
        .unwrap_or_else(|| arg.to_path_buf()))
}

/// Records `name -> dir` (absolute). Registering a name again for the same
/// directory is a no-op; for another directory, an error.
pub fn register(name: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    check_pool_name(name)?;
    let path = registry_path()
        .context("no config directory for the pool registry: set VPOOL_CONFIG_DIR (or HOME)")?;
    let mut reg = Registry::load_from(&path)?;
    match reg.pools.get(name) {
        Some(d) if d == dir => return Ok(path),
        Some(d) => bail!(
            "the pool name {name} is already registered for {} (in {}); choose another name, or remove it from that file",
            d.display(),
            path.display()
        ),
        None => {}
    }
    reg.pools.insert(name.to_string(), dir.to_path_buf());
    reg.save_to(&path)?;
    Ok(path)
}

/// Fails if `name` is registered for a directory other than `dir`; run
/// before creating a pool, so a taken name is refused before anything is
/// made.
pub fn check_available(name: &str, dir: &Path) -> anyhow::Result<()> {
    check_pool_name(name)?;
    let Some(path) = registry_path() else {
        return Ok(());
    };
    match Registry::load_from(&path)?.pools.get(name) {
        Some(d) if d != dir => bail!(
            "the pool name {name} is already registered for {} (in {}); choose another name, or remove it from that file",
            d.display(),
            path.display()
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["cold", "pool-1", "a.b_c"] {
            check_pool_name(ok).unwrap();
        }
        for bad in ["", "a/b", ".x", "-x", "a b", "x@y"] {
            assert!(check_pool_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn registry_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(REGISTRY_FILE);
        assert_eq!(Registry::load_from(&path).unwrap(), Registry::default());
        let mut r = Registry::default();
        r.pools.insert("cold".into(), "/var/cache/vpool".into());
        r.save_to(&path).unwrap();
        assert_eq!(Registry::load_from(&path).unwrap(), r);
        std::fs::write(&path, b"{not json").unwrap();
        let e = Registry::load_from(&path).unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
    }
}
