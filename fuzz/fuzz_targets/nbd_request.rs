//! Fuzz the transmission-phase decoders: request header parsing, request
//! validation against arbitrary negotiated parameters, and extent
//! normalisation of arbitrary device answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_nbd::wire::{self, TransmissionParams};

fuzz_target!(|data: &[u8]| {
    if data.len() < 28 + 16 {
        return;
    }
    let (hdr, rest) = data.split_at(28);
    let hdr: &[u8; 28] = hdr.try_into().expect("28 bytes");
    let u64_at = |i: usize| u64::from_be_bytes(rest[i..i + 8].try_into().expect("8 bytes"));
    let size = u64_at(0);
    let knobs = u64_at(8);
    let params = TransmissionParams {
        size,
        read_only: knobs & 1 != 0,
        structured_replies: knobs & 2 != 0,
        base_allocation: knobs & 4 != 0,
        min_block: 1 << ((knobs >> 3) % 17),
        max_payload: (knobs >> 8) as u32,
        max_buffered: (knobs >> 40) as u32,
    };
    if let Ok(h) = wire::parse_request_header(hdr) {
        if let Ok(cmd) = wire::decode_request(&h, &params) {
            if let wire::Command::BlockStatus { len, req_one, .. } = cmd {
                let raw: Vec<(u64, u32)> = rest[16..]
                    .chunks_exact(12)
                    .map(|c| {
                        (
                            u64::from_be_bytes(c[..8].try_into().expect("8")),
                            u32::from_be_bytes(c[8..].try_into().expect("4")),
                        )
                    })
                    .collect();
                let ext = wire::normalize_extents(&raw, len, params.min_block, req_one);
                assert!(!ext.is_empty());
                let total: u64 = ext.iter().map(|e| u64::from(e.0)).sum();
                assert!(total <= u64::from(len));
            }
        }
    }
});
