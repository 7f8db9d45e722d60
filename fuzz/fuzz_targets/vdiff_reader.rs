//! Fuzzes the `.vdiff` reader: any input decodes or is refused, never a
//! panic, never an allocation from an unchecked length. What decodes obeys
//! the format's rules (records in order, in bounds, counted right) and
//! re-encodes through the writer to the same bytes, or, where the writer
//! merges adjacent zero records, to a file that decodes to the same image.
//!
//! Each input is tried twice: as is (exercising the structure checks and
//! the checksum) and with its last 32 bytes replaced by the SHA-256 of the
//! rest (so the fuzzer reaches files that pass the checksum).
#![no_main]

use libfuzzer_sys::fuzz_target;
use sha2::{Digest, Sha256};
use vpool_vdiff::{Header, MAX_RECORD_DATA, Reader, Record, Summary, TRAILER_BYTES, Writer};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Owned {
    Data(u64, Vec<u8>),
    Zero(u64, u64),
}

fn decode(data: &[u8]) -> Option<(Header, Vec<Owned>, Summary)> {
    let mut r = Reader::new(data).ok()?;
    let header = r.header().clone();
    let mut records = Vec::new();
    loop {
        match r.next_record() {
            Ok(Some(Record::Data { offset, data })) => {
                records.push(Owned::Data(offset, data.to_vec()))
            }
            Ok(Some(Record::Zero { offset, len })) => records.push(Owned::Zero(offset, len)),
            Ok(None) => break,
            Err(_) => {
                assert!(r.next_record().is_err(), "a refused file stays refused");
                return None;
            }
        }
    }
    let (summary, rest) = r.finish().ok()?;
    assert!(rest.is_empty(), "finish() accepted bytes after the trailer");
    Some((header, records, summary))
}

/// Adjacent zero records as the writer merges them.
fn merged(records: &[Owned]) -> Vec<Owned> {
    let mut out: Vec<Owned> = Vec::new();
    for r in records {
        match (out.last_mut(), r) {
            (Some(Owned::Zero(o, l)), Owned::Zero(offset, len)) if *o + *l == *offset => *l += len,
            _ => out.push(r.clone()),
        }
    }
    out
}

fn check(data: &[u8]) {
    let Some((header, records, summary)) = decode(data) else {
        return;
    };
    // What the reader let through obeys the format.
    assert_eq!(summary.header, header);
    assert_eq!(summary.file_bytes, data.len() as u64);
    assert_eq!(summary.records, records.len() as u64);
    let (mut end, mut data_bytes, mut zero_bytes) = (0u64, 0u64, 0u64);
    for r in &records {
        let (offset, len) = match r {
            Owned::Data(o, d) => {
                assert!(d.len() as u64 <= MAX_RECORD_DATA);
                data_bytes += d.len() as u64;
                (*o, d.len() as u64)
            }
            Owned::Zero(o, l) => {
                zero_bytes += l;
                (*o, *l)
            }
        };
        assert!(len > 0 && offset >= end, "record out of order or empty");
        end = offset + len;
        assert!(end <= header.target_size, "record past the target size");
    }
    assert_eq!(
        (summary.data_bytes, summary.zero_bytes),
        (data_bytes, zero_bytes)
    );

    // Re-encode.
    let mut w = Writer::new(Vec::new(), &header).expect("a decoded header re-encodes");
    for r in &records {
        match r {
            Owned::Data(o, d) => w.data(*o, d),
            Owned::Zero(o, l) => w.zero(*o, *l),
        }
        .expect("a decoded record re-encodes");
    }
    let (out, written) = w.finish().expect("finish");
    let want = merged(&records);
    if want == records {
        assert_eq!(out, data, "decode(x) re-encodes to other bytes");
        assert_eq!(written, summary);
    } else {
        let (h2, r2, s2) = decode(&out).expect("the writer's output decodes");
        assert_eq!(h2, header);
        assert_eq!(r2, want);
        assert_eq!((s2.data_bytes, s2.zero_bytes), (data_bytes, zero_bytes));
        assert_eq!(s2, written);
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() > TRAILER_BYTES {
        let mut sealed = data.to_vec();
        let n = sealed.len() - TRAILER_BYTES;
        let digest = Sha256::digest(&sealed[..n]);
        sealed[n..].copy_from_slice(&digest);
        check(&sealed);
    }
});
