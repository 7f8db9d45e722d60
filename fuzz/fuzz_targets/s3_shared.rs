//! Fuzzes the decoders of a shared pool's records read from the bucket
//! (`vpool_s3::shared`: the pool's identity, a volume's name record):
//! refuse or decode, never panic; what decodes has an id that is safe in
//! a key and re-encodes to something that decodes the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_s3::shared::{NameRecord, SharedIdentity};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = NameRecord::decode(data) {
        assert!(r.id.len() == 32 && r.id.bytes().all(|b| b.is_ascii_hexdigit()));
        if let Some(b) = &r.base {
            assert!(b.id.len() == 32 && !b.volume.is_empty() && !b.volume.contains('/'));
        }
        let again = NameRecord::decode(&serde_json::to_vec(&r).unwrap()).unwrap();
        assert_eq!(again, r);
    }
    if let Ok(s) = SharedIdentity::decode(data) {
        let again = SharedIdentity::decode(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(again, s);
    }
});
