//! Fuzzes the log decoders: segment headers, record headers and the record
//! walker recovery uses. Any input must decode or be refused, never panic,
//! and the walker must never report a valid length past the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_engine::record::{RecordHeader, RecordIter, decode_segment_header};

fuzz_target!(|data: &[u8]| {
    let _ = decode_segment_header(data);
    if let Ok(h) = RecordHeader::decode(data) {
        // A header that decodes re-encodes to the same bytes.
        assert_eq!(&h.encode()[..], &data[..64]);
    }
    let start = data.first().map(|&b| b as usize).unwrap_or(0);
    let mut it = RecordIter::new(data, start);
    let mut last_end = start.min(data.len());
    for (off, h, payload) in it.by_ref() {
        assert!(off >= last_end);
        assert_eq!(payload.len(), h.payload_len as usize);
        last_end = off + h.record_len() as usize;
    }
    assert!(it.valid_len() <= data.len());
});
