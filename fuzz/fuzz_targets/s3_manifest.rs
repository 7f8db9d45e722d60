//! Fuzzes the S3 pool manifest decoder: refuse or decode, never panic; what
//! decodes is valid and re-encodes to something that decodes the same.
//! Inputs are also tried with their envelope (length, CRC) patched, so the
//! fuzzer reaches the JSON body and the validation behind the checksum.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_s3::manifest::Manifest;

fn check(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        m.validate().expect("decoded manifests are valid");
        let again = Manifest::decode(&m.encode()).expect("re-encoded manifest decodes");
        assert_eq!(again, m);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() >= 16 {
        let mut patched = data.to_vec();
        let body_len = (data.len() - 16) as u32;
        patched[8..12].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c::crc32c(&data[16..]);
        patched[12..16].copy_from_slice(&crc.to_le_bytes());
        check(&patched);
    }
});
