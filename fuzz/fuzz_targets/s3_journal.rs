//! Fuzzes the decoder of a flush-journal entry read from the bucket
//! (`vpool_s3::journal`): refuse or decode, never panic; what decodes
//! re-encodes to the same bytes, and a data piece fits a segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_s3::journal::{EntryKind, JournalEntry, MAX_ENTRY_DATA};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = JournalEntry::decode(data) {
        assert_eq!(e.encode(), data);
        if let EntryKind::Data {
            offset,
            data,
            segment,
            ..
        } = &e.kind
        {
            assert!(*segment != 0 && !data.is_empty());
            assert!(data.len() as u64 <= MAX_ENTRY_DATA);
            assert!(offset.checked_add(data.len() as u64).is_some());
        }
    }
});
