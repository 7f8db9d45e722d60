//! Names: of pools, and of the images a host serves (`POOL/VOLUME`,
//! `POOL/VOLUME@SNAPSHOT`, or without `POOL/` for the default pool), as
//! `rbd` names `POOL/IMAGE`. Volume and snapshot names cannot contain `/`
//! or `@`, so the split is unambiguous.

use crate::error::{Error, Result};

/// Longest pool name.
pub const MAX_POOL_NAME_LEN: usize = 64;

/// A pool name: 1 to 64 letters, digits, `.`, `_`, `-`, not starting with
/// `.` or `-` (what a volume name may be).
pub fn check_pool_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty()
        || name.len() > MAX_POOL_NAME_LEN
        || !name.chars().all(ok_char)
        || name.starts_with(['.', '-'])
    {
        return Err(Error::invalid(format!(
            "{name:?} is not a pool name: use 1 to {MAX_POOL_NAME_LEN} letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )));
    }
    Ok(())
}

/// A volume name (what the engine accepts), checked before it names
/// anything outside the engine: a shared pool's key, a cache directory.
pub fn check_volume_name(name: &str) -> Result<()> {
    vpool_engine::types::validate_volume_name(name).map_err(Error::invalid)
}

/// Splits `POOL/REST` into the pool and the rest; a name without `/` is in
/// the default pool (`None`).
pub fn split_pool(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((pool, rest)) => (Some(pool), rest),
        None => (None, name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_names() {
        for ok in ["local", "cold", "a.b_c-d", "x"] {
            check_pool_name(ok).unwrap();
        }
        for bad in ["", ".x", "-x", "a/b", "a@b", "a b", &"x".repeat(65)] {
            assert!(check_pool_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn splitting() {
        assert_eq!(split_pool("db1"), (None, "db1"));
        assert_eq!(split_pool("cold/db1"), (Some("cold"), "db1"));
        assert_eq!(split_pool("cold/db1@s"), (Some("cold"), "db1@s"));
    }
}
