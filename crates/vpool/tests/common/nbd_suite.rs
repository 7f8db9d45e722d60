//! The real-client workloads of `nbd_clients.rs` (qemu-img, qemu-io,
//! nbdinfo, nbdcopy, nbdsh, fio), each a function of a running daemon, so
//! that the same suite runs on a local pool (`nbd_clients.rs`) and on a pool
//! on S3 (`s3_rgw.rs`, against Ceph RGW).
//!
//! A workload gets the daemon, already serving its pool (a directory named
//! [`Case::pool_dir`], started with [`Case::serve_args`]), and a scratch
//! directory; it may restart the daemon on the same pool directory (clean
//! stop or SIGKILL, then `Daemon::start(&pool, &[])`), and returns the
//! daemon running, for the caller to check further and stop. Declared by the
//! test files that use it (`#[path = "common/nbd_suite.rs"] mod nbd_suite;`)
//! beside `mod common;` and `mod nbd_common;` (`vpool-nbd`'s client helpers).

#![allow(dead_code)] // Each test file uses a different subset.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{self, Daemon, run_json, run_ok};
use crate::nbd_common::clients::{
    fio_verify, nbdcopy, nbdinfo, nbdinfo_can, nbdinfo_map, nbdsh_script, qemu_img_compare,
    qemu_img_convert_from, qemu_img_convert_to, qemu_img_info, qemu_img_map, qemu_io,
};
use crate::nbd_common::pattern;

/// One workload and how its daemon is started.
pub struct Case {
    pub name: &'static str,
    /// The pool directory's name under the scratch directory (one case
    /// needs a name that URIs must escape).
    pub pool_dir: &'static str,
    /// Extra `vpool serve` arguments.
    pub serve_args: &'static [&'static str],
    /// The workload: takes the running daemon and a scratch directory,
    /// returns the daemon running.
    pub run: fn(Daemon, &Path) -> Daemon,
}

pub const MIB: u64 = 1 << 20;

/// FNV-1a, enough to compare copies and to print something short.
pub fn checksum(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Asserts `got == want` naming the first differing byte, not dumping MiBs.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    panic!(
        "{what}: {} bytes (checksum {:#x}) differ from the expected {} bytes (checksum {:#x}) first at byte {at}",
        got.len(),
        checksum(got),
        want.len(),
        checksum(want)
    );
}

/// Reads a whole volume over the API (a path independent of NBD).
pub fn api_read(d: &Daemon, volume: &str, len: u64) -> Vec<u8> {
    let c = d.client();
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let n = (len - out.len() as u64).min(4 * MIB) as usize;
        out.extend(c.read(volume, out.len() as u64, n).expect("API read"));
    }
    out
}

pub fn create(d: &Daemon, name: &str, size: u64) {
    d.client().create_volume(name, size).expect("create volume");
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

pub fn qemu_img_info_convert_compare_map(d: Daemon, dir: &Path) -> Daemon {
    create(&d, "disk", 8 * MIB);
    let uri = d.nbd_uri("disk");

    let info = qemu_img_info(&uri);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 8 * MIB)),
        "{info}"
    );

    // File -> volume, then compare, and the volume's content over the API.
    let src = dir.join("src.img");
    let data = pattern(8 * MIB as usize, 42);
    std::fs::write(&src, &data).unwrap();
    qemu_img_convert_to(&src, &uri);
    assert!(qemu_img_compare(&uri, &src));
    assert_same(
        "volume after qemu-img convert",
        &api_read(&d, "disk", 8 * MIB),
        &data,
    );

    // Volume -> file.
    let out = dir.join("out.img");
    qemu_img_convert_from(&uri, &out);
    assert_same(
        "qemu-img convert from the volume",
        &std::fs::read(&out).unwrap(),
        &data,
    );

    // A change makes compare fail (the helper can fail).
    d.client().write("disk", 4096, b"changed!", false).unwrap();
    assert!(!qemu_img_compare(&uri, &src));

    // Holes: discard the second MiB; qemu-img map shows it as a hole.
    qemu_io(&uri, &["discard 1M 1M"]);
    let map = qemu_img_map(&uri);
    assert!(
        map.iter()
            .any(|&(s, l, data, zero)| s <= MIB && s + l >= 2 * MIB && !data && zero),
        "qemu-img map does not show the hole at 1 MiB: {map:?}"
    );
    assert!(map.iter().any(|&(s, _, data, _)| s == 0 && data), "{map:?}");
    // Every fourth 64 KiB chunk of the pattern is zeros, which qemu-img
    // convert writes as zeros: none of them is mapped as data.
    for &(s, l, data, zero) in &map {
        if data && !zero {
            let chunk = &api_read(&d, "disk", 8 * MIB)[s as usize..(s + l) as usize];
            assert!(
                chunk.chunks(64 * 1024).all(|c| c.iter().any(|&b| b != 0)),
                "a zero chunk in [{s}, +{l}) is mapped as data: {map:?}"
            );
        }
    }
    let total: u64 = map.iter().map(|m| m.1).sum();
    assert_eq!(total, 8 * MIB, "{map:?}");
    d
}

pub fn qemu_io_write_read_discard_zero(d: Daemon, _dir: &Path) -> Daemon {
    create(&d, "disk", 4 * MIB);
    let uri = d.nbd_uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 64k",
            "read -P 0x5a 0 64k",
            // 512-byte pieces inside a 4 KiB block (read-modify-write).
            "write -P 0x66 66048 512",
            "read -P 0 65536 512",
            "read -P 0x66 66048 512",
            "read -P 0 66560 3584",
            "write -P 0x11 1M 128k",
            "discard 1M 64k",
            "read -P 0 1M 64k",
            "read -P 0x11 1088k 64k",
            // Zeroes without -u: NO_HOLE, allocated zeros.
            "write -P 0x22 2M 64k",
            "write -z 2M 64k",
            "read -P 0 2M 64k",
            // Zeroes with -u: may punch a hole.
            "write -P 0x33 3M 64k",
            "write -z -u 3M 64k",
            "read -P 0 3M 64k",
            "write -P 0x44 3584k 4k -f",
            "flush",
        ],
    );
    let vol = api_read(&d, "disk", 4 * MIB);
    let at = |off: u64, len: u64| &vol[off as usize..(off + len) as usize];
    assert!(at(0, 65536).iter().all(|&b| b == 0x5a));
    assert!(at(66048, 512).iter().all(|&b| b == 0x66));
    assert!(at(65536, 512).iter().all(|&b| b == 0));
    assert!(at(MIB, 65536).iter().all(|&b| b == 0));
    assert!(at(MIB + 65536, 65536).iter().all(|&b| b == 0x11));
    assert!(at(2 * MIB, 65536).iter().all(|&b| b == 0));
    assert!(at(3 * MIB, 65536).iter().all(|&b| b == 0));
    assert!(at(3584 * 1024, 4096).iter().all(|&b| b == 0x44));

    // nbdinfo --map: the discarded range and the unmapped zeroes are holes,
    // the NO_HOLE zeroes are allocated zeros (type 2), the rest data.
    let map = nbdinfo_map(&uri);
    let kind_at = |off: u64| {
        map.iter()
            .find(|(o, l, _, _)| *o <= off && off < o + l)
            .map(|m| m.2)
            .unwrap_or_else(|| panic!("offset {off} not in the map: {map:?}"))
    };
    assert_eq!(kind_at(0), 0, "{map:?}");
    assert_eq!(kind_at(MIB), 3, "discarded: {map:?}");
    assert_eq!(kind_at(MIB + 65536), 0, "{map:?}");
    assert_eq!(kind_at(2 * MIB), 2, "write -z (NO_HOLE): {map:?}");
    assert_eq!(kind_at(3 * MIB), 3, "write -z -u: {map:?}");
    assert_eq!(kind_at(3 * MIB + 65536), 3, "never written: {map:?}");
    assert_eq!(map.iter().map(|m| m.1).sum::<u64>(), 4 * MIB);
    let v = d.client().volume_info("disk").unwrap();
    assert_eq!(v.zero_bytes, 65536, "{v:?}");

    // A pattern mismatch is noticed (the helper can fail).
    let r = std::panic::catch_unwind(|| qemu_io(&uri, &["read -P 0x77 0 4k"]));
    assert!(r.is_err(), "qemu-io pattern mismatch went unnoticed");
    d
}

/// `nbdinfo --list` output: (export name, export-size) pairs.
fn parse_list(out: &str) -> Vec<(String, u64)> {
    let mut v = Vec::new();
    let mut name = None;
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("export=\"") {
            name = rest.strip_suffix("\":").map(str::to_string);
        } else if let Some(rest) = line.trim().strip_prefix("export-size: ") {
            let size = rest.split_whitespace().next().unwrap().parse().unwrap();
            v.push((name.take().expect("export-size before export="), size));
        }
    }
    v
}

pub fn nbdinfo_list_map_and_flags_unix_and_tcp(d: Daemon, _dir: &Path) -> Daemon {
    let pool = d.pool.clone();
    let vols = [
        ("web1", 20u64 << 30),
        ("db", 4 * MIB),
        ("a.b_c-d", 4096),
        ("big", 1 << 40),
    ];
    for (n, s) in vols {
        create(&d, n, s);
    }

    // Every volume is listed with its size, on the Unix socket and on TCP
    // (whose port `vol info --json` reports).
    let mut want: Vec<(String, u64)> = vols.iter().map(|(n, s)| (n.to_string(), *s)).collect();
    want.sort();
    let list = nbdinfo(&["--list", &d.nbd_uri("")]);
    let mut got = parse_list(&list);
    got.sort();
    assert_eq!(got, want, "{list}");
    let info = run_json(&pool, &["vol", "info", "db"]);
    let tcp_uri = info["attach"]["nbd_tcp_uri"].as_str().unwrap().to_string();
    assert!(tcp_uri.starts_with("nbd://127.0.0.1:"), "{info}");
    let tcp_root = tcp_uri.strip_suffix("db").unwrap();
    let mut got = parse_list(&nbdinfo(&["--list", tcp_root]));
    got.sort();
    assert_eq!(got, want);
    // A volume created while the daemon runs is an export at once, and a
    // deleted one is gone.
    create(&d, "late", 8192);
    d.client().delete_volume("a.b_c-d", false).unwrap();
    let names: Vec<String> = parse_list(&nbdinfo(&["--list", &d.nbd_uri("")]))
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.contains(&"late".to_string()), "{names:?}");
    assert!(!names.contains(&"a.b_c-d".to_string()), "{names:?}");

    for uri in [d.nbd_uri("db"), tcp_uri.clone()] {
        for f in ["flush", "fua", "trim", "zero", "multi-conn", "cache"] {
            assert!(nbdinfo_can(&uri, "--can", f), "{uri} should support {f}");
        }
        assert!(!nbdinfo_can(&uri, "--is", "read-only"));
    }

    // --map: data where written, holes elsewhere, the whole size covered.
    // (nbdinfo has exited, but the server may not have let go of its
    // device yet: the write is refused while a writer is connected.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match d.client().write("db", MIB, &vec![7u8; 65536], false) {
            Ok(()) => break,
            Err(e)
                if e.to_string().contains("open for writing")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    }
    let map = nbdinfo_map(&d.nbd_uri("db"));
    assert!(
        map.iter()
            .any(|(o, l, t, desc)| *o == 0 && *l == MIB && *t == 3 && desc.contains("hole")),
        "{map:?}"
    );
    assert!(
        map.iter()
            .any(|(o, l, t, desc)| *o == MIB && *l == 65536 && *t == 0 && desc.contains("data")),
        "{map:?}"
    );
    assert_eq!(map.iter().map(|m| m.1).sum::<u64>(), 4 * MIB);
    // A 1 TiB volume maps as one hole, quickly.
    let map = nbdinfo_map(&d.nbd_uri("big"));
    assert_eq!(map.len(), 1, "{map:?}");
    assert_eq!((map[0].0, map[0].1, map[0].2), (0, 1 << 40, 3));
    d
}

pub fn nbdcopy_both_ways_sparse_multi_conn(d: Daemon, dir: &Path) -> Daemon {
    let size = 16 * MIB;
    create(&d, "disk", size);
    // Garbage first, so zero regions must really be written as zeros.
    d.client()
        .write("disk", 0, &vec![0xee; 4 * MIB as usize], false)
        .unwrap();
    let uri = d.nbd_uri("disk");
    let src = dir.join("src.img");
    let data = pattern(size as usize, 7);
    std::fs::write(&src, &data).unwrap();

    nbdcopy(
        path_str(&src),
        &uri,
        &["--connections=4", "--requests=16", "--flush"],
    );
    assert_same(
        "volume after nbdcopy file -> nbd",
        &api_read(&d, "disk", size),
        &data,
    );
    // A quarter of the source is zeros (every fourth 64 KiB): they arrive
    // as holes, not data.
    let v = d.client().volume_info("disk").unwrap();
    assert_eq!(
        v.allocated_bytes,
        size / 4 * 3,
        "zero regions were stored as data: {v:?}"
    );
    let map = nbdinfo_map(&uri);
    for chunk in 0..size / (64 * 1024) {
        let off = chunk * 64 * 1024;
        let t = map
            .iter()
            .find(|(o, l, _, _)| *o <= off && off < o + l)
            .map(|m| m.2)
            .unwrap();
        let want = if chunk % 4 == 1 { 3 } else { 0 };
        assert_eq!(t, want, "64 KiB chunk {chunk}: {map:?}");
    }

    // nbd -> file, with four connections too.
    let out = dir.join("out.img");
    nbdcopy(&uri, path_str(&out), &["--connections=4"]);
    let got = std::fs::read(&out).unwrap();
    assert_eq!(checksum(&got), checksum(&data));
    assert_same("nbdcopy nbd -> file", &got, &data);

    // nbd -> nbd between two volumes of the same daemon.
    create(&d, "copy", size);
    nbdcopy(&uri, &d.nbd_uri("copy"), &["--connections=2", "--flush"]);
    assert_same("nbdcopy nbd -> nbd", &api_read(&d, "copy", size), &data);
    assert_eq!(
        d.client().volume_info("copy").unwrap().allocated_bytes,
        size / 4 * 3
    );
    d
}

/// Edge cases against an engine-backed volume. Run by nbdsh (Python).
const EDGE_SCRIPT: &str = r#"
import errno, os, subprocess, nbd

SOCK = os.environ["SOCK"]
VPOOL = [os.environ["VPOOL"], "--home", os.environ["POOL"]]

def uri(name):
    return "nbd+unix:///%s?socket=%s" % (name, SOCK)

def expect_err(fn, code, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd reports errno as a name ("EINVAL"); accept numbers too.
        assert e.errno in (code, errno.errorcode[code]), "%s: got errno %s (%s), expected %s" % (what, e.errno, e, errno.errorcode[code])
        return
    raise AssertionError("%s: no error" % what)

def connect(name):
    h = nbd.NBD()
    h.set_strict_mode(0)          # let invalid requests reach the server
    h.add_meta_context("base:allocation")
    h.connect_uri(uri(name))
    return h

def extents(h, off, length):
    """base:allocation as a list of (offset, length, flags) covering the range."""
    out = []
    pos = off
    while pos < off + length:
        got = []
        def cb(meta, o, entries, err):
            got.extend(entries)
            return 0
        h.block_status(off + length - pos, pos, cb)
        assert got, "empty block status"
        for i in range(0, len(got), 2):
            n = min(got[i], off + length - pos)
            out.append((pos, n, got[i + 1]))
            pos += n
            if pos >= off + length:
                break
    return out

def flags_at(h, off):
    return extents(h, off, 4096)[0][2]

h = connect("disk")
size = h.get_size()
assert size == int(os.environ["SIZE"]), size
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim() and h.can_zero()

# Never written: reads as zeros, maps as a hole.
assert h.pread(65536, 0) == bytes(65536)
assert flags_at(h, 0) == nbd.STATE_HOLE | nbd.STATE_ZERO

# Past the end.
expect_err(lambda: h.pread(4096, size), errno.EINVAL, "read past end")
expect_err(lambda: h.pread(4096, size - 2048), errno.EINVAL, "read straddling end")
expect_err(lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC, "write past end")
expect_err(lambda: h.pwrite(b"x" * 4096, size - 512), errno.ENOSPC, "write straddling end")
expect_err(lambda: h.zero(4096, size), errno.ENOSPC, "zero past end")
expect_err(lambda: h.trim(4096, size), errno.EINVAL, "trim past end")
expect_err(lambda: h.pread(512, 2**64 - 512), errno.EINVAL, "offset+length overflow")
expect_err(lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL, "block status past end")
# The last sector is fine.
h.pwrite(b"\xee" * 512, size - 512)
assert h.pread(512, size - 512) == b"\xee" * 512

# Misaligned (below the 512-byte minimum block size): EINVAL, nothing written.
expect_err(lambda: h.pread(100, 0), errno.EINVAL, "misaligned read length")
expect_err(lambda: h.pread(512, 1), errno.EINVAL, "misaligned read offset")
expect_err(lambda: h.pwrite(b"x" * 100, 0), errno.EINVAL, "misaligned write length")
expect_err(lambda: h.pwrite(b"x" * 512, 256), errno.EINVAL, "misaligned write offset")
expect_err(lambda: h.zero(100, 4096), errno.EINVAL, "misaligned zero")
expect_err(lambda: h.trim(512, 100), errno.EINVAL, "misaligned trim")
assert h.pread(8192, 0) == bytes(8192), "a refused write changed data"

# 512-byte writes inside a 4 KiB block keep the rest of the block.
h.pwrite(b"\x11" * 4096, 8192)
h.pwrite(b"\x22" * 512, 8192 + 1024)
assert h.pread(4096, 8192) == b"\x11" * 1024 + b"\x22" * 512 + b"\x11" * 2560
assert h.pread(512, 8192 + 1024) == b"\x22" * 512
# A zero of a partial block range: only those sectors.
h.zero(1024, 8192 + 2048, flags=nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 8192) == b"\x11" * 1024 + b"\x22" * 512 + b"\x11" * 512 + bytes(1024) + b"\x11" * 1024

# Concurrent 512-byte writes to the sectors of the same blocks, all in
# flight at once: none may lose another (read-modify-write under a lock).
BASE = 1 << 20
NB = 32
cookies = []
bufs = []
for blk in range(NB):
    for sec in range(8):
        v = (blk * 8 + sec) % 251 + 1
        b = nbd.Buffer.from_bytearray(bytearray([v]) * 512)
        bufs.append(b)
        cookies.append(h.aio_pwrite(b, BASE + blk * 4096 + sec * 512))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
for blk in range(NB):
    got = h.pread(4096, BASE + blk * 4096)
    for sec in range(8):
        v = (blk * 8 + sec) % 251 + 1
        assert got[sec * 512:(sec + 1) * 512] == bytes([v]) * 512, "block %d sector %d lost its write" % (blk, sec)

# Many requests in flight: 128 writes of 64 KiB, then 128 reads, verified.
N = 128
BASE2 = 2 << 20
bufs = []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray([i % 255 + 1]) * 65536)
    bufs.append(b)
    h.aio_pwrite(b, BASE2 + i * 65536)
while h.aio_in_flight() > 0:
    h.poll(-1)
rbufs = [nbd.Buffer(65536) for _ in range(N)]
cookies = [h.aio_pread(rbufs[i], BASE2 + i * 65536) for i in range(N)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(N):
    assert h.aio_command_completed(cookies[i])
    assert rbufs[i].to_bytearray() == bytearray([i % 255 + 1]) * 65536, i

# Block status after each kind of write.
h.pwrite(b"\x01" * 65536, 12 << 20, flags=nbd.CMD_FLAG_FUA)
assert flags_at(h, 12 << 20) == 0
h.zero(65536, 12 << 20, flags=nbd.CMD_FLAG_NO_HOLE)
assert flags_at(h, 12 << 20) == nbd.STATE_ZERO
h.zero(65536, 12 << 20)
assert flags_at(h, 12 << 20) == nbd.STATE_HOLE | nbd.STATE_ZERO
h.pwrite(b"\x01" * 65536, 12 << 20)
h.trim(65536, 12 << 20, flags=nbd.CMD_FLAG_FUA)
assert flags_at(h, 12 << 20) == nbd.STATE_HOLE | nbd.STATE_ZERO
assert h.pread(65536, 12 << 20) == bytes(65536)
h.zero(65536, 13 << 20, flags=nbd.CMD_FLAG_FAST_ZERO)
# REQ_ONE: a single extent.
seen = []
h.block_status(1 << 20, 0, lambda m, o, e, err: seen.append(list(e)) or 0, flags=nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and len(seen[0]) == 2, seen
h.cache(65536, 0)
h.flush()

# An unknown export is refused at connect.
try:
    connect("nope")
    raise AssertionError("connected to an unknown export")
except nbd.Error as e:
    pass

# A volume deleted under a connected client: its requests fail, the
# connection never reaches a new volume of the same name, the server lives.
g = connect("gone")
g.pwrite(b"\x55" * 4096, 0)
subprocess.run(VPOOL + ["vol", "delete", "gone", "--force"], check=True, stdout=subprocess.DEVNULL)
expect_err(lambda: g.pread(4096, 0), errno.EIO, "read of a deleted volume")
subprocess.run(VPOOL + ["vol", "create", "gone", "--size", "1M"], check=True, stdout=subprocess.DEVNULL)
expect_err(lambda: g.pwrite(b"\x66" * 4096, 0), errno.EIO, "write to a deleted volume")
g2 = connect("gone")
assert g2.pread(4096, 0) == bytes(4096), "the old connection wrote into the new volume"
g2.shutdown()
g.shutdown()

# The first connection still works after all of that.
assert h.pread(4096, 8192)[:1024] == b"\x11" * 1024
h.shutdown()
print("edge cases ok")
"#;

pub fn nbdsh_edge_cases(d: Daemon, _dir: &Path) -> Daemon {
    let pool = d.pool.clone();
    let size = 16 * MIB;
    create(&d, "disk", size);
    create(&d, "gone", MIB);
    let out = nbdsh_script(
        EDGE_SCRIPT,
        &[
            ("SOCK", path_str(&d.nbd_socket())),
            ("SIZE", &size.to_string()),
            ("VPOOL", common::vpool_bin()),
            ("POOL", path_str(&pool)),
        ],
    );
    assert!(out.contains("edge cases ok"), "{out}");
    // What the script wrote is what the API reads.
    let c = d.client();
    let b = c.read("disk", 8192, 4096).unwrap();
    assert_eq!(&b[1024..1536], &[0x22u8; 512][..]);
    assert_eq!(&b[2048..3072], &[0u8; 1024][..]);
    d
}

pub fn fio_randwrite_verify(d: Daemon, _dir: &Path) -> Daemon {
    create(&d, "disk", 64 * MIB);
    let uri = d.nbd_uri("disk");
    fio_verify(&uri, "16M", "4k", 16);
    fio_verify(&uri, "16M", "64k", 8);
    // 512-byte random writes: concurrent read-modify-writes of shared blocks.
    fio_verify(&uri, "2M", "512", 16);
    d
}

pub fn several_clients_on_several_volumes(d: Daemon, dir: &Path) -> Daemon {
    for i in 0..3 {
        create(&d, &format!("v{i}"), 8 * MIB);
    }
    let src = dir.join("src.img");
    let data = pattern(2 * MIB as usize, 99);
    std::fs::write(&src, &data).unwrap();
    std::thread::scope(|s| {
        for i in 0..3usize {
            // Three qemu-io clients per volume, all at once.
            for j in 0..2u64 {
                let uri = d.nbd_uri(&format!("v{i}"));
                s.spawn(move || {
                    let pat = format!("0x{:x}", 0x10 * (i + 1) + j as usize);
                    let off = j * 2 * MIB;
                    let w = format!("write -P {pat} {off} 2M");
                    let r = format!("read -P {pat} {off} 2M");
                    qemu_io(&uri, &[&w, "flush", &r]);
                });
            }
            // A third client copies a file into another window.
            let uri = d.nbd_uri(&format!("v{i}"));
            let w = format!("write -s {} 4M 2M", path_str(&src));
            s.spawn(move || {
                qemu_io(&uri, &[&w, "flush"]);
            });
        }
    });
    for i in 0..3usize {
        let vol = api_read(&d, &format!("v{i}"), 8 * MIB);
        for j in 0..2usize {
            let want = (0x10 * (i + 1) + j) as u8;
            let off = j * 2 * MIB as usize;
            assert!(
                vol[off..off + 2 * MIB as usize].iter().all(|&b| b == want),
                "volume v{i} part {j}"
            );
        }
        assert_same(
            &format!("v{i} window written by qemu-io -s"),
            &vol[4 * MIB as usize..6 * MIB as usize],
            &data,
        );
        assert!(vol[6 * MIB as usize..].iter().all(|&b| b == 0));
    }
    d
}

/// Two connections to one volume: each sees the other's completed writes,
/// and a flush on one covers writes completed on the other (multi-conn).
const MULTI_CONN_SCRIPT: &str = r#"
import os, nbd
uri = os.environ["URI"]
a = nbd.NBD(); a.connect_uri(uri)
b = nbd.NBD(); b.connect_uri(uri)
assert a.can_multi_conn() and b.can_multi_conn()
for i in range(64):
    w, r = (a, b) if i % 2 == 0 else (b, a)
    data = bytes([i + 1]) * 4096
    w.pwrite(data, i * 4096)
    assert r.pread(4096, i * 4096) == data, "connection did not see the other's write %d" % i
# Writes completed on `a` only, then a flush on `b` only.
a.pwrite(b"\xaa" * 65536, 1 << 20)
b.flush()
print("flushed", flush=True)
a.shutdown()
b.shutdown()
"#;

pub fn multi_conn_one_volume(d: Daemon, _dir: &Path) -> Daemon {
    let pool = d.pool.clone();
    create(&d, "disk", 16 * MIB);
    let uri = d.nbd_uri("disk");
    assert!(nbdinfo_can(&uri, "--can", "multi-conn"));
    let out = nbdsh_script(MULTI_CONN_SCRIPT, &[("URI", &uri)]);
    assert!(out.contains("flushed"), "{out}");
    // A crash right after: the write flushed through the other connection
    // is there. (With SIGKILL the page cache survives, so this shows the
    // flush path works, not that fdatasync reached the disk.)
    d.crash();
    let d = Daemon::start(&pool, &[]);
    let got = d.client().read("disk", MIB, 65536).unwrap();
    assert!(got.iter().all(|&b| b == 0xaa), "write lost after the crash");
    for i in 0..64u64 {
        let got = d.client().read("disk", i * 4096, 4096).unwrap();
        assert!(got.iter().all(|&b| b == i as u8 + 1), "block {i}");
    }
    d
}

pub fn data_survives_restart_over_nbd_and_export(d: Daemon, dir: &Path) -> Daemon {
    let pool = d.pool.clone();
    let size = 8 * MIB;
    create(&d, "disk", size);
    let src = dir.join("src.img");
    let data = pattern(size as usize, 1234);
    std::fs::write(&src, &data).unwrap();
    nbdcopy(path_str(&src), &d.nbd_uri("disk"), &["--connections=2"]);
    // No flush: a clean stop must keep every acknowledged write.
    qemu_io(&d.nbd_uri("disk"), &["write -P 0x77 5M 12k"]);
    let mut want = data.clone();
    want[5 * MIB as usize..5 * MIB as usize + 12288].fill(0x77);
    let t = Instant::now();
    let status = d.terminate();
    assert!(status.success(), "{status}");
    eprintln!("clean stop took {:?}", t.elapsed());

    let d = Daemon::start(&pool, &[]);
    let out = dir.join("nbd.img");
    nbdcopy(&d.nbd_uri("disk"), path_str(&out), &[]);
    assert_same(
        "read back over NBD after restart",
        &std::fs::read(&out).unwrap(),
        &want,
    );
    let exported = dir.join("export.img");
    run_ok(&pool, &["vol", "export", "disk", path_str(&exported)]);
    assert_same(
        "vpool vol export after restart",
        &std::fs::read(&exported).unwrap(),
        &want,
    );
    assert!(qemu_img_compare(&d.nbd_uri("disk"), &exported));
    d
}

/// Writes 4 KiB blocks (each naming its write: 16-byte units of (i, block))
/// one at a time, flushing every 8th, logging each acknowledgement ("A i")
/// and completed flush ("F i"), until the connection breaks.
const WRITER_SCRIPT: &str = r#"
import os, struct, nbd
log = open(os.environ["LOG"], "w", buffering=1)
nblocks = int(os.environ["NBLOCKS"])
h = nbd.NBD()
h.connect_uri(os.environ["URI"])
log.write("connected\n")
i = 0
try:
    while i < 1000000:
        blk = i % nblocks
        h.pwrite(struct.pack("<QQ", i + 1, blk) * 256, blk * 4096)
        log.write("A %d\n" % i)
        if i % 8 == 7:
            h.flush()
            log.write("F %d\n" % i)
        i += 1
except nbd.Error as e:
    log.write("E %s\n" % e)
log.write("END\n")
"#;

pub fn sigterm_with_a_connected_writer(d: Daemon, dir: &Path) -> Daemon {
    let pool = d.pool.clone();
    let nblocks: u64 = 4096;
    create(&d, "disk", nblocks * 4096);
    let log = dir.join("writer.log");
    let writer = {
        let uri = d.nbd_uri("disk");
        let log = log.clone();
        std::thread::spawn(move || {
            nbdsh_script(
                WRITER_SCRIPT,
                &[
                    ("URI", &uri),
                    ("LOG", path_str(&log)),
                    ("NBLOCKS", &nblocks.to_string()),
                ],
            )
        })
    };
    // Let it get going, then stop the daemon under it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().filter(|l| l.starts_with("F ")).count() >= 20 {
            break;
        }
        assert!(
            Instant::now() < deadline && !text.contains("END"),
            "the writer did not get going:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    d.signal(libc::SIGTERM);
    let mut d = d;
    let status = common::wait_timeout(&mut d.child, Duration::from_secs(20))
        .unwrap_or_else(|| panic!("daemon ignored SIGTERM; log:\n{}", d.log_text()));
    let took = t.elapsed();
    assert!(status.success(), "exit {status}; log:\n{}", d.log_text());
    // The client is told to go (its socket's read side is shut), it does
    // not hold the daemon up for the NBD grace period.
    assert!(
        took < Duration::from_secs(5),
        "stopping with a client connected took {took:?}"
    );
    writer.join().expect("writer thread");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("END"), "{text}");
    let mut acked = None;
    let mut flushed = None;
    for l in text.lines() {
        if let Some(i) = l.strip_prefix("A ") {
            acked = Some(i.parse::<u64>().unwrap());
        } else if let Some(i) = l.strip_prefix("F ") {
            flushed = Some(i.parse::<u64>().unwrap());
        }
    }
    let acked = acked.expect("no acknowledged write");
    let flushed = flushed.expect("no completed flush");
    eprintln!("SIGTERM after {acked} acknowledged writes ({flushed} flushed); stop took {took:?}");

    let d = Daemon::start(&pool, &[]);
    let vol = api_read(&d, "disk", nblocks * 4096);
    // Block b's last acknowledged write is the largest i <= acked with
    // i % nblocks == b; the next one (i + nblocks) may have landed too if it
    // was in flight. A clean stop keeps every acknowledged write, flushed
    // or not (close checkpoints); flushed ones are the contract.
    let mut unflushed_kept = 0;
    for b in 0..nblocks {
        let got = &vol[(b * 4096) as usize..((b + 1) * 4096) as usize];
        let tag = u64::from_le_bytes(got[..8].try_into().unwrap());
        let last_acked = (b <= acked).then(|| acked - (acked - b) % nblocks);
        let ok = match last_acked {
            None => tag == 0 || tag == b + 1,
            Some(i) => tag == i + 1 || tag == i + nblocks + 1,
        };
        let mut unit = [0u8; 16];
        unit[..8].copy_from_slice(&tag.to_le_bytes());
        unit[8..].copy_from_slice(&b.to_le_bytes());
        let whole =
            (tag == 0 && got.iter().all(|&x| x == 0)) || got.chunks_exact(16).all(|u| u == unit);
        assert!(
            ok && whole,
            "block {b}: holds write {} (torn: {}), last acknowledged {last_acked:?}, flushed up to {flushed}",
            tag as i64 - 1,
            !whole
        );
        if let Some(i) = last_acked
            && i > flushed
        {
            unflushed_kept += 1;
        }
    }
    eprintln!("{unflushed_kept} acknowledged but unflushed writes kept by the clean stop");
    d
}

/// The URIs `vol info` prints work as they are with QEMU and libnbd, even
/// for a pool path that needs escaping.
pub fn vol_info_uris_work_with_real_clients(d: Daemon, _dir: &Path) -> Daemon {
    let pool = d.pool.clone();
    create(&d, "web1", 4 * MIB);
    let info = run_json(&pool, &["vol", "info", "web1"]);
    let unix = info["attach"]["nbd_uri"].as_str().unwrap();
    let tcp = info["attach"]["nbd_tcp_uri"].as_str().unwrap();
    assert!(unix.contains("my%20pool%261"), "{unix}");
    for uri in [unix, tcp] {
        let i = qemu_img_info(uri);
        assert!(i.contains(&format!("\"virtual-size\": {}", 4 * MIB)), "{i}");
        assert!(nbdinfo_can(uri, "--can", "flush"), "{uri}");
    }
    qemu_io(unix, &["write -P 0x61 0 64k"]);
    qemu_io(tcp, &["read -P 0x61 0 64k", "write -P 0x62 64k 64k"]);
    qemu_io(unix, &["read -P 0x62 64k 64k"]);
    // The JSON form, which no QEMU version parses as a URI.
    let json = info["attach"]["qemu_json"].as_str().unwrap();
    assert!(json.contains("my pool&1"), "{json}");
    let i = qemu_img_info(json);
    assert!(i.contains(&format!("\"virtual-size\": {}", 4 * MIB)), "{i}");
    qemu_io(json, &["read -P 0x62 64k 64k"]);
    // The libvirt disk over TCP names the listener's address.
    let xml = run_ok(
        &pool,
        &[
            "vol",
            "info",
            "web1",
            "--libvirt",
            "--tcp",
            "--target",
            "vdc",
        ],
    );
    let port = tcp.rsplit(':').next().unwrap().trim_end_matches("/web1");
    assert!(
        xml.contains(&format!("<host name='127.0.0.1' port='{port}'/>")),
        "{xml}"
    );
    assert!(
        xml.starts_with("<disk ") && xml.contains("dev='vdc'"),
        "{xml}"
    );
    d
}

// ---- the suite -----------------------------------------------------------

pub const QEMU_IMG_INFO_CONVERT_COMPARE_MAP: Case = Case {
    name: "qemu_img_info_convert_compare_map",
    pool_dir: "pool",
    serve_args: &[],
    run: qemu_img_info_convert_compare_map,
};

pub const QEMU_IO_WRITE_READ_DISCARD_ZERO: Case = Case {
    name: "qemu_io_write_read_discard_zero",
    pool_dir: "pool",
    serve_args: &[],
    run: qemu_io_write_read_discard_zero,
};

pub const NBDINFO_LIST_MAP_AND_FLAGS_UNIX_AND_TCP: Case = Case {
    name: "nbdinfo_list_map_and_flags_unix_and_tcp",
    pool_dir: "pool",
    serve_args: &["--nbd-listen", "127.0.0.1:0"],
    run: nbdinfo_list_map_and_flags_unix_and_tcp,
};

pub const NBDCOPY_BOTH_WAYS_SPARSE_MULTI_CONN: Case = Case {
    name: "nbdcopy_both_ways_sparse_multi_conn",
    pool_dir: "pool",
    serve_args: &[],
    run: nbdcopy_both_ways_sparse_multi_conn,
};

pub const NBDSH_EDGE_CASES: Case = Case {
    name: "nbdsh_edge_cases",
    pool_dir: "pool",
    serve_args: &[],
    run: nbdsh_edge_cases,
};

pub const FIO_RANDWRITE_VERIFY: Case = Case {
    name: "fio_randwrite_verify",
    pool_dir: "pool",
    serve_args: &[],
    run: fio_randwrite_verify,
};

pub const SEVERAL_CLIENTS_ON_SEVERAL_VOLUMES: Case = Case {
    name: "several_clients_on_several_volumes",
    pool_dir: "pool",
    serve_args: &[],
    run: several_clients_on_several_volumes,
};

pub const MULTI_CONN_ONE_VOLUME: Case = Case {
    name: "multi_conn_one_volume",
    pool_dir: "pool",
    serve_args: &[],
    run: multi_conn_one_volume,
};

pub const DATA_SURVIVES_RESTART_OVER_NBD_AND_EXPORT: Case = Case {
    name: "data_survives_restart_over_nbd_and_export",
    pool_dir: "pool",
    serve_args: &[],
    run: data_survives_restart_over_nbd_and_export,
};

pub const SIGTERM_WITH_A_CONNECTED_WRITER: Case = Case {
    name: "sigterm_with_a_connected_writer",
    pool_dir: "pool",
    serve_args: &[],
    run: sigterm_with_a_connected_writer,
};

pub const VOL_INFO_URIS_WORK_WITH_REAL_CLIENTS: Case = Case {
    name: "vol_info_uris_work_with_real_clients",
    pool_dir: "my pool&1",
    serve_args: &["--nbd-listen", "127.0.0.1:0"],
    run: vol_info_uris_work_with_real_clients,
};

pub const ALL: [&Case; 11] = [
    &QEMU_IMG_INFO_CONVERT_COMPARE_MAP,
    &QEMU_IO_WRITE_READ_DISCARD_ZERO,
    &NBDINFO_LIST_MAP_AND_FLAGS_UNIX_AND_TCP,
    &NBDCOPY_BOTH_WAYS_SPARSE_MULTI_CONN,
    &NBDSH_EDGE_CASES,
    &FIO_RANDWRITE_VERIFY,
    &SEVERAL_CLIENTS_ON_SEVERAL_VOLUMES,
    &MULTI_CONN_ONE_VOLUME,
    &DATA_SURVIVES_RESTART_OVER_NBD_AND_EXPORT,
    &SIGTERM_WITH_A_CONNECTED_WRITER,
    &VOL_INFO_URIS_WORK_WITH_REAL_CLIENTS,
];
