//! Fuzzes the checkpoint decoder: refuse or decode, never panic, never
//! allocate from an unchecked count; what decodes re-encodes identically.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_engine::checkpoint::Checkpoint;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Checkpoint::decode(data) {
        assert_eq!(c.encode(), data);
    }
});
