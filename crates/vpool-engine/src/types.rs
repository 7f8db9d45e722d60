//! Units and identifiers shared by the engine's modules.

use std::fmt;

/// The engine maps volumes in blocks of this many bytes. Clients may read and
/// write at any 512-byte boundary; partial blocks are read-modify-written.
pub const BLOCK_SIZE: u64 = 4096;

/// Identifies a volume inside a pool for its whole life; never reused, so a
/// record of a deleted volume cannot be mistaken for a new volume's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeId(pub u64);

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vol-{}", self.0)
    }
}

/// Largest volume: 1 PiB. Keeps every block number and byte offset far from
/// overflow.
pub const MAX_VOLUME_SIZE_BYTES: u64 = 1 << 50;

/// Checks a volume name: 1 to 64 characters from `[A-Za-z0-9._-]`, not
/// starting with `.` or `-`. `@` and `/` are reserved (snapshots, paths).
pub fn validate_volume_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a volume name cannot be empty".into());
    }
    if name.len() > crate::record::MAX_NAME_LEN {
        return Err(format!(
            "volume name is {} bytes; the limit is {}",
            name.len(),
            crate::record::MAX_NAME_LEN
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err("a volume name cannot start with '.' or '-'".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "volume name {name:?} has {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// Checks a reserved volume name: `.` then a volume name. Users cannot
/// create one (a volume name never starts with `.`), so the daemon renames
/// a volume to such a name to keep it out of their way (its trash) without
/// taking a name they might use.
pub fn validate_reserved_name(name: &str) -> Result<(), String> {
    match name.strip_prefix('.') {
        Some(rest) if name.len() <= crate::record::MAX_NAME_LEN => validate_volume_name(rest),
        _ => Err(format!("{name:?} is not a reserved volume name")),
    }
}

/// Checks a volume size: a positive multiple of [`BLOCK_SIZE`] up to
/// [`MAX_VOLUME_SIZE_BYTES`].
pub fn validate_volume_size(size_bytes: u64) -> Result<(), String> {
    if size_bytes == 0 {
        return Err("a volume size must be more than 0".into());
    }
    if !size_bytes.is_multiple_of(BLOCK_SIZE) {
        return Err(format!(
            "volume size {size_bytes} is not a multiple of {BLOCK_SIZE} bytes"
        ));
    }
    if size_bytes > MAX_VOLUME_SIZE_BYTES {
        return Err(format!(
            "volume size {size_bytes} is over the limit of {MAX_VOLUME_SIZE_BYTES} bytes (1 PiB)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_volume_name("web-1.disk_0").is_ok());
        assert!(validate_volume_name("").is_err());
        assert!(validate_volume_name("-x").is_err());
        assert!(validate_volume_name("a@b").is_err());
        assert!(validate_volume_name("a/b").is_err());
        assert!(validate_volume_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn sizes() {
        assert!(validate_volume_size(4096).is_ok());
        assert!(validate_volume_size(0).is_err());
        assert!(validate_volume_size(4097).is_err());
        assert!(validate_volume_size(MAX_VOLUME_SIZE_BYTES + 4096).is_err());
    }
}
