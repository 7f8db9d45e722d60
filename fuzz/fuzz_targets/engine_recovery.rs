//! Fuzzes recovery on crafted logs: up to three segments of records whose
//! fields come from the input (their checksums are computed, so they get
//! past the decoder and into replay), then damaged at fuzz-chosen places,
//! with or without a checkpoint blob from the input, opened with and
//! without repair. Recovery must refuse or succeed, never panic, and a pool
//! it opens must pass its own self-check and `pool check`.
#![no_main]

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use libfuzzer_sys::fuzz_target;
use vpool_engine::record::{
    RecordHeader, RecordKind, block_crcs, encode_segment_header, write_payload_len,
};
use vpool_engine::store::{SegmentId, SegmentStore, SimStore};
use vpool_engine::{Pool, PoolConfig, VolumeId};

/// Bytes of the input, read front to back; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
}

/// One record built from the input, with valid checksums.
fn record(inp: &mut Input, seq: u64, segs: u64) -> Vec<u8> {
    let volume = VolumeId(1 + u64::from(inp.byte() % 2));
    let block = u64::from(inp.byte() % 64);
    let mut h = RecordHeader {
        kind: RecordKind::Write,
        seq,
        volume,
        block,
        nblocks: 1,
        payload_len: 0,
        arg: 0,
        payload_crc: crc32c::crc32c(&[]),
        arg2: 0,
        arg3: 0,
    };
    let payload = match inp.byte() % 6 {
        0 | 1 => {
            let data = vec![inp.byte(); 4096];
            let crcs = block_crcs(&data);
            h.payload_len = write_payload_len(1) as u32;
            h.payload_crc = crc32c::crc32c(&crcs);
            [crcs, data].concat()
        }
        2 => {
            h.kind = if inp.byte() % 2 == 0 { RecordKind::Trim } else { RecordKind::Zero };
            h.nblocks = 1 + u32::from(inp.byte() % 8);
            Vec::new()
        }
        3 => {
            let name = if volume.0 == 1 { b"v1".to_vec() } else { b"v2".to_vec() };
            h.kind = RecordKind::CreateVolume;
            h.nblocks = 0;
            h.arg = 1 << 20;
            h.payload_len = name.len() as u32;
            h.payload_crc = crc32c::crc32c(&name);
            name
        }
        4 => {
            h.kind = RecordKind::Mark;
            h.nblocks = 0;
            h.arg = 1 + u64::from(inp.byte()) % segs;
            h.arg2 = u32::from(inp.u16());
            Vec::new()
        }
        _ => {
            h.kind = RecordKind::DeleteVolume;
            h.nblocks = 0;
            Vec::new()
        }
    };
    [h.encode().to_vec(), payload].concat()
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let sim = SimStore::new();
    let segs = 1 + u64::from(inp.byte() % 3);
    let mut seq = 1u64;
    for s in 1..=segs {
        let mut img = encode_segment_header(SegmentId(s)).to_vec();
        for _ in 0..inp.byte() % 8 {
            // Now and then a gap or a repeat in the sequence.
            seq = match inp.byte() % 16 {
                0 => seq + 1,
                1 => seq.saturating_sub(1).max(1),
                _ => seq,
            };
            img.extend(record(&mut inp, seq, segs));
            seq += 1;
        }
        // Damage: a flipped byte, a cut, or nothing.
        match inp.byte() % 4 {
            0 if !img.is_empty() => {
                let at = usize::from(inp.u16()) % img.len();
                img[at] ^= 1 << (inp.byte() % 8);
            }
            1 => img.truncate(usize::from(inp.u16()) % (img.len() + 1)),
            _ => {}
        }
        if inp.byte() % 8 != 0 {
            sim.put_segment(SegmentId(s), img);
        }
    }
    if inp.byte() % 2 == 0 {
        let _ = sim.put_meta("checkpoint", inp.0);
    }
    let config = PoolConfig {
        background: false,
        repair_damaged_log: inp.byte() % 2 == 0,
        ..PoolConfig::default()
    };
    if let Ok((pool, _)) = Pool::open(Arc::new(sim.handle()), config) {
        pool.self_check();
        let _ = pool.check(false, &AtomicBool::new(false));
        let _ = pool.close();
    }
});
