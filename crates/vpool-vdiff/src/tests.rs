use super::*;

fn header(size: u64) -> Header {
    Header {
        target_size: size,
        from_size: size / 2,
        volume: "web1".into(),
        from: Some("a".into()),
        to: None,
    }
}

fn write_file(size: u64, f: impl FnOnce(&mut Writer<Vec<u8>>)) -> Vec<u8> {
    let mut w = Writer::new(Vec::new(), &header(size)).unwrap();
    f(&mut w);
    let (out, _) = w.finish().unwrap();
    out
}

fn refusal(bytes: &[u8]) -> String {
    check(bytes).unwrap_err().to_string()
}

#[test]
fn round_trip_merges_zeros_and_splits_data() {
    let big = vec![7u8; MAX_RECORD_DATA as usize + 4096];
    let mut w = Writer::new(Vec::new(), &header(64 << 20)).unwrap();
    w.zero(0, 4096).unwrap();
    w.zero(4096, 8192).unwrap();
    w.data(1 << 20, &big).unwrap();
    w.zero(32 << 20, 4096).unwrap();
    let (file, written) = w.finish().unwrap();
    let mut seen = Vec::new();
    let s = scan(&file[..], |h, r| {
        assert_eq!(h.volume, "web1");
        seen.push(match r {
            Record::Zero { offset, len } => (offset, len, 0u8),
            Record::Data { offset, data } => (offset, data.len() as u64, data[0]),
        });
        Ok::<(), Error>(())
    })
    .unwrap();
    assert_eq!(
        seen,
        vec![
            (0, 12288, 0),
            (1 << 20, MAX_RECORD_DATA, 7),
            ((1 << 20) + MAX_RECORD_DATA, 4096, 7),
            (32 << 20, 4096, 0),
        ]
    );
    assert_eq!(s.records, 4);
    assert_eq!(s.data_bytes, big.len() as u64);
    assert_eq!(s.zero_bytes, 16384);
    assert_eq!(s.header, header(64 << 20));
    assert_eq!(s.file_bytes, file.len() as u64);
    assert_eq!(s, written, "the reader's summary is the writer's");
}

/// The bytes of a small file, spelled out from `docs/vdiff.md`: the format
/// must not change by a bit.
#[test]
fn bytes_are_the_documented_layout() {
    let h = Header {
        target_size: 3 * 4096,
        from_size: 4096,
        volume: "v".into(),
        from: None,
        to: Some("b".into()),
    };
    let mut w = Writer::new(Vec::new(), &h).unwrap();
    w.zero(0, 512).unwrap();
    w.data(4096, b"hi").unwrap();
    let (file, s) = w.finish().unwrap();

    let mut want = Vec::new();
    want.extend_from_slice(b"VPOOLDIF");
    want.extend_from_slice(&1u32.to_le_bytes());
    want.extend_from_slice(&0u32.to_le_bytes());
    want.extend_from_slice(&12288u64.to_le_bytes());
    want.extend_from_slice(&4096u64.to_le_bytes());
    want.extend_from_slice(&[1, 0, b'v', 0, 0, 1, 0, b'b']);
    want.extend_from_slice(&0u64.to_le_bytes());
    want.extend_from_slice(&512u64.to_le_bytes());
    want.push(2);
    want.extend_from_slice(&4096u64.to_le_bytes());
    want.extend_from_slice(&2u64.to_le_bytes());
    want.push(1);
    want.extend_from_slice(b"hi");
    want.extend_from_slice(&2u64.to_le_bytes());
    want.extend_from_slice(&2u64.to_le_bytes());
    want.push(0);
    let digest = {
        use sha2::Digest;
        sha2::Sha256::digest(&want)
    };
    assert_eq!(s.checksum, format!("sha256:{}", hex(&digest)));
    want.extend_from_slice(&digest);
    assert_eq!(file, want);
    assert_eq!(s.file_bytes, want.len() as u64);
    assert_eq!(check(&want[..]).unwrap(), s);
}

#[test]
fn writer_refuses_disorder_and_overflow() {
    let mut w = Writer::new(Vec::new(), &header(1 << 20)).unwrap();
    w.data(8192, &[1; 4096]).unwrap();
    assert!(w.zero(4096, 4096).is_err(), "out of order");
    assert!(w.data(1 << 20, &[1; 4096]).is_err(), "past the end");
    assert!(w.zero(20480, 0).is_err(), "empty");
    assert!(w.zero(u64::MAX - 10, 100).is_err(), "wraps around");
}

#[test]
fn writer_refuses_what_a_reader_would() {
    for size in [0, 4095, MAX_TARGET_SIZE + 4096] {
        assert!(Writer::new(Vec::new(), &header(size)).is_err(), "{size}");
    }
    let mut h = header(4096);
    h.volume = "x".repeat(MAX_NAME_BYTES + 1);
    assert!(Writer::new(Vec::new(), &h).is_err());
    h.volume = "x".repeat(MAX_NAME_BYTES);
    let (file, _) = Writer::new(Vec::new(), &h).unwrap().finish().unwrap();
    assert_eq!(check(&file[..]).unwrap().header, h);
}

#[test]
fn damage_is_detected() {
    let good = write_file(1 << 20, |w| {
        w.data(4096, &[9; 8192]).unwrap();
        w.zero(65536, 4096).unwrap();
    });
    check(&good[..]).unwrap();
    let refused = |bytes: &[u8], want: &str| {
        let e = refusal(bytes);
        assert!(e.contains(want), "expected {want:?} in {e}");
    };
    // A flipped data byte: the checksum.
    let mut b = good.clone();
    let at = b.len() - 32 - 17 - 17 - 100;
    b[at] ^= 1;
    refused(&b, "checksum mismatch");
    // Truncated, and extended.
    refused(&good[..good.len() - 10], "checksum trailer is missing");
    refused(&good[..40], "ends inside");
    let mut b = good.clone();
    b.push(0);
    refused(&b, "after the checksum");
    // Not a vdiff at all; another version; unknown flags.
    refused(b"hello world, not a diff at all....", "not a .vdiff file");
    let mut b = good.clone();
    b[8] = 2;
    refused(&b, "version 2");
    let mut b = good.clone();
    b[12] = 1;
    refused(&b, "unknown header flags 0x1");
    // Every proper prefix is refused, never accepted or a panic.
    for n in 0..good.len() {
        assert!(check(&good[..n]).is_err(), "prefix of {n} bytes");
    }
}

#[test]
fn header_fields_are_checked() {
    let good = write_file(1 << 20, |_| {});
    let patched = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        refusal(&b)
    };
    // target_size at 16..24.
    for size in [0u64, 4097, MAX_TARGET_SIZE + 4096, u64::MAX] {
        assert!(
            patched(16, &size.to_le_bytes()).contains("not a volume size"),
            "{size}"
        );
    }
    // The volume name's length at 32..34, its bytes from 34.
    assert!(patched(32, &[0x01, 0x10]).contains("the limit is 4096"));
    assert!(patched(34, &[0xff]).contains("not UTF-8"));
}

#[test]
fn scan_refuses_records_out_of_bounds() {
    // Hand-made, with a valid checksum, so only the structure is wrong.
    let make = |records: &[(u64, u64, u8)], end: Option<(u64, u64)>| {
        let mut w = Writer::new(Vec::new(), &header(64 << 20)).unwrap();
        for &(o, l, k) in records {
            w.record_head(o, l, k).unwrap();
            w.records += 1;
        }
        let out = match end {
            // A wrong end record, then a valid checksum of it all.
            Some((n, d)) => {
                use sha2::Digest;
                w.record_head(n, d, KIND_END).unwrap();
                let mut out = w.out;
                let digest = sha2::Sha256::digest(&out);
                out.extend_from_slice(&digest);
                out
            }
            None => w.finish().unwrap().0,
        };
        refusal(&out)
    };
    assert!(make(&[(64 << 20, 4096, KIND_ZERO)], None).contains("outside the target size"));
    assert!(
        make(&[(8192, 4096, KIND_ZERO), (0, 4096, KIND_ZERO)], None).contains("overlaps"),
        "out of order"
    );
    assert!(
        make(&[(0, 0, KIND_ZERO)], None).contains("[0, +0)"),
        "empty"
    );
    assert!(
        make(&[(u64::MAX, 2, KIND_ZERO)], None).contains("outside the target size"),
        "wraps around"
    );
    assert!(make(&[(0, 4096, 9)], None).contains("unknown kind 9"));
    assert!(
        make(&[(0, MAX_RECORD_DATA + 1, KIND_DATA)], None).contains("the limit is 8388608"),
        "too much data"
    );
    assert!(
        make(&[(0, 4096, KIND_ZERO)], Some((2, 0))).contains("counts 2 records"),
        "end record miscounts"
    );
    assert!(make(&[], Some((0, 1))).contains("1 data bytes"));
}

/// A data record that claims more bytes than the input has is refused as
/// truncated, after reading only what is there.
#[test]
fn a_length_field_does_not_allocate() {
    let mut w = Writer::new(Vec::new(), &header(16 << 20)).unwrap();
    w.record_head(0, MAX_RECORD_DATA, KIND_DATA).unwrap();
    let mut file = w.finish().unwrap().0;
    file.extend_from_slice(&[1; 100]);
    let mut r = Reader::new(&file[..]).unwrap();
    let e = r.next_record().unwrap_err();
    assert!(matches!(e, Error::Truncated { .. }), "{e}");
    assert!(r.buf.capacity() < 1 << 20, "{}", r.buf.capacity());
    // Refused once, refused for good.
    assert!(matches!(r.next_record(), Err(Error::Refused)));
    assert!(matches!(r.finish(), Err(Error::Refused)));
}

#[test]
fn reader_hands_out_records_then_checks_the_trailer() {
    let file = write_file(1 << 20, |w| {
        w.data(0, &[5; 100]).unwrap();
        w.zero(4096, 4096).unwrap();
    });
    let mut r = Reader::new(&file[..]).unwrap();
    assert_eq!(r.header(), &header(1 << 20));
    assert_eq!(
        r.next_record().unwrap(),
        Some(Record::Data {
            offset: 0,
            data: &[5; 100]
        })
    );
    let z = r.next_record().unwrap().unwrap();
    assert_eq!((z.offset(), z.len(), z.is_empty()), (4096, 4096, false));
    assert_eq!(r.next_record().unwrap(), None);
    assert_eq!(r.next_record().unwrap(), None, "stays at the end");
    let (s, rest) = r.finish().unwrap();
    assert!(rest.is_empty());
    assert_eq!((s.records, s.data_bytes, s.zero_bytes), (2, 100, 4096));
    // finish() reads the records nobody asked for.
    assert_eq!(Reader::new(&file[..]).unwrap().finish().unwrap().0, s);
}

#[test]
fn scan_stops_at_the_visitors_error() {
    let file = write_file(1 << 20, |w| {
        w.zero(0, 4096).unwrap();
        w.zero(8192, 4096).unwrap();
    });
    #[derive(Debug)]
    enum Stop {
        Visitor,
        Vdiff(Error),
    }
    impl From<Error> for Stop {
        fn from(e: Error) -> Stop {
            Stop::Vdiff(e)
        }
    }
    let mut n = 0;
    let e = scan(&file[..], |_, _| {
        n += 1;
        Err(Stop::Visitor)
    })
    .unwrap_err();
    assert!(matches!(e, Stop::Visitor), "{e:?}");
    assert_eq!(n, 1);
    let e = scan(&file[..file.len() - 1], |_, _| Ok::<(), Stop>(())).unwrap_err();
    assert!(matches!(e, Stop::Vdiff(Error::TrailerMissing)), "{e:?}");
}
