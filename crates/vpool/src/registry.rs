//! The pool names of earlier releases, read so their directories keep
//! working: before one daemon held many pools, `vpool pool create cold
//! --s3 ...` recorded `cold -> DIR` in a small registry file, and `--pool
//! cold` (now `--home cold`) found DIR through it. Nothing writes the
//! registry any more: a daemon's pools are in its `host.json`
//! ([`vpool_service::Host`]).
//!
//! The registry is `$VPOOL_CONFIG_DIR/pools.json` (default
//! `$XDG_CONFIG_HOME/vpool/pools.json`, else `~/.config/vpool/pools.json`):
//! `{"pools": {"cold": "/var/cache/vpool"}}`. `--home X` is looked up there
//! only when X has no `/` and is not an existing directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
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
}

/// The directory `--home ARG` means: ARG itself, unless it is a bare name
/// (no `/`) that is not an existing directory and is registered.
pub fn resolve_home(arg: &Path) -> anyhow::Result<PathBuf> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join(REGISTRY_FILE);
        assert_eq!(Registry::load_from(&path).unwrap(), Registry::default());
        let mut r = Registry::default();
        r.pools.insert("cold".into(), "/var/cache/vpool".into());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, br#"{"pools": {"cold": "/var/cache/vpool"}}"#).unwrap();
        assert_eq!(Registry::load_from(&path).unwrap(), r);
        std::fs::write(&path, b"{not json").unwrap();
        let e = Registry::load_from(&path).unwrap_err().to_string();
        assert!(e.contains("not valid"), "{e}");
    }
}
