//! Fuzzes the decoders of the peer link (`vpool_peer::wire`), which read
//! another host's bytes: request and reply headers, the client's hello,
//! an open reply. Refuse or decode, never panic; a decoded request
//! re-encodes to the same bytes and fits its limits.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vpool_peer::wire::{self, REPLY_HEADER_BYTES, REQUEST_HEADER_BYTES, Reply, Request};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = data.get(..REQUEST_HEADER_BYTES) {
        let h: &[u8; REQUEST_HEADER_BYTES] = h.try_into().unwrap();
        if let Ok(r) = Request::decode(h) {
            assert_eq!(&r.encode(), h);
            assert!(r.offset.checked_add(r.length).is_some());
            assert!(r.payload_bytes <= wire::MAX_DATA_BYTES);
            let rest = &data[REQUEST_HEADER_BYTES..];
            if let Some(rh) = rest.get(..REPLY_HEADER_BYTES) {
                let rh: &[u8; REPLY_HEADER_BYTES] = rh.try_into().unwrap();
                if let Ok(reply) = Reply::decode(rh, &r) {
                    assert_eq!(&reply.encode(), rh);
                }
            }
        }
    }
    if let Some((&len, rest)) = data.split_first() {
        if let Ok((pool, _, _)) = wire::decode_client_hello(len, rest) {
            assert_eq!(pool.len(), usize::from(len));
        }
    }
    if let Some(b) = data.get(..9) {
        let _ = wire::decode_open(b.try_into().unwrap());
    }
});
