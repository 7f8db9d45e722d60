//! Fuzzes the cache index decoder: refuse or decode, never panic, never
//! allocate from an unchecked count; what decodes passes `self_check()`,
//! re-encodes identically and survives an eviction pass.
//!
//! Each input is tried twice: as is (exercising the header, length and
//! checksum checks) and with its length field and CRC-32C patched to match
//! (so the fuzzer reaches the entry and pin checks behind the checksum).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_cache::CacheIndex;

/// Length field at bytes 16..24, CRC-32C in the last 4 bytes.
fn reseal(data: &[u8]) -> Option<Vec<u8>> {
    if data.len() < 44 {
        return None;
    }
    let mut v = data.to_vec();
    let n = v.len();
    v[16..24].copy_from_slice(&(n as u64).to_le_bytes());
    let crc = crc32c::crc32c(&v[..n - 4]);
    v[n - 4..].copy_from_slice(&crc.to_le_bytes());
    Some(v)
}

fn check(data: &[u8]) {
    // A budget derived from the input: sometimes tiny, sometimes ample.
    let capacity_bytes = u64::from(data.get(44).copied().unwrap_or(0)) * 4096;
    if let Ok(mut ix) = CacheIndex::decode(data, capacity_bytes) {
        ix.self_check();
        assert_eq!(ix.encode(), data, "decode(x).encode() != x");
        let pinned_before = ix.pinned_bytes();
        ix.evict();
        ix.self_check();
        assert_eq!(
            ix.pinned_bytes(),
            pinned_before,
            "evict() dropped pinned data"
        );
        assert!(ix.used_bytes() <= capacity_bytes || ix.used_bytes() == pinned_before);
        let again = CacheIndex::decode(&ix.encode(), capacity_bytes).expect("own encoding decodes");
        again.self_check();
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(sealed) = reseal(data) {
        check(&sealed);
    }
});
