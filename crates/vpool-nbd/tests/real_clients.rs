//! The server driven by real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy,
//! nbdsh, fio) as subprocesses. A missing client fails the test.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::clients::*;
use common::*;
use vpool_nbd::{BlockDevice, MemDevice, MemRegistry, ServerConfig};

const MIB: u64 = 1 << 20;

#[test]
fn qemu_img_info_convert_compare_map() {
    let (reg, dev) = registry_with("disk", 8 * MIB);
    let srv = start_unix(reg, ServerConfig::default());
    let uri = srv.uri("disk");

    let info = qemu_img_info(&uri);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 8 * MIB)),
        "{info}"
    );

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = pattern(8 * MIB as usize, 42);
    std::fs::write(&src, &data).unwrap();
    qemu_img_convert_to(&src, &uri);
    assert_eq!(
        dev.snapshot(),
        data,
        "device content after qemu-img convert"
    );
    assert!(qemu_img_compare(&uri, &src));

    let out = dir.path().join("out.img");
    qemu_img_convert_from(&uri, &out);
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // A change must make compare fail (the test can fail).
    dev.fill(4096, b"changed");
    assert!(!qemu_img_compare(&uri, &src));

    // Holes: trim the second MiB and check qemu-img map sees it.
    dev.trim(MIB, MIB).unwrap();
    let map = qemu_img_map(&uri);
    let covers_hole = map
        .iter()
        .any(|&(s, l, data, zero)| s <= MIB && s + l >= 2 * MIB && !data && zero);
    assert!(
        covers_hole,
        "qemu-img map did not report the hole at 1 MiB: {map:?}"
    );
    assert!(map.iter().any(|&(s, _, data, _)| s == 0 && data), "{map:?}");
}

#[test]
fn qemu_io_patterns_discard_zero() {
    let (reg, dev) = registry_with("disk", 4 * MIB);
    let srv = start_unix(reg, ServerConfig::default());
    let uri = srv.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0x5a 0 64k",
            "read -P 0x5a 0 64k",
            "write -P 0x11 1M 128k",
            "discard 1M 64k",
            "write -z 1088k 64k",
            "read -P 0 1088k 64k",
            "write -P 0x22 2M 4k",
            "write -z -u 2M 4k",
            "read -P 0 2M 4k",
            "flush",
        ],
    );
    let snap = dev.snapshot();
    assert!(snap[..65536].iter().all(|&b| b == 0x5a));
    assert!(snap[1088 * 1024..1152 * 1024].iter().all(|&b| b == 0));
    assert!(
        snap[2 * MIB as usize..2 * MIB as usize + 4096]
            .iter()
            .all(|&b| b == 0)
    );
    assert!(dev.flush_count() >= 1);
    // Pattern mismatch is detected (guards against a helper that never fails).
    let r = std::panic::catch_unwind(|| qemu_io(&uri, &["read -P 0x77 0 4k"]));
    assert!(r.is_err(), "qemu-io pattern mismatch went unnoticed");
}

#[test]
fn nbdinfo_list_map_and_flags() {
    let reg = Arc::new(MemRegistry::new());
    let disk = Arc::new(MemDevice::new(4 * MIB));
    reg.insert("disk", "the disk", disk.clone());
    reg.insert(
        "ro",
        "read only",
        Arc::new(MemDevice::new(MIB).with_read_only(true)),
    );
    reg.insert(
        "single",
        "no multi-conn",
        Arc::new(MemDevice::new(MIB).with_multi_conn(false)),
    );
    let srv = start_unix(reg, ServerConfig::default());

    let list = nbdinfo(&["--list", &srv.uri("")]);
    for needle in [
        "export=\"disk\"",
        "export=\"ro\"",
        "the disk",
        "read only",
        "export=\"single\"",
    ] {
        assert!(list.contains(needle), "missing {needle} in:\n{list}");
    }

    let uri = srv.uri("disk");
    for f in [
        "flush",
        "fua",
        "trim",
        "zero",
        "multi-conn",
        "cache",
        "fast-zero",
        "df",
    ] {
        assert!(nbdinfo_can(&uri, "--can", f), "disk should support {f}");
    }
    assert!(!nbdinfo_can(&uri, "--is", "read-only"));
    let ro = srv.uri("ro");
    assert!(nbdinfo_can(&ro, "--is", "read-only"));
    assert!(!nbdinfo_can(&ro, "--can", "trim"));
    assert!(!nbdinfo_can(&srv.uri("single"), "--can", "multi-conn"));

    disk.fill(MIB, &vec![1u8; 65536]);
    let map = nbdinfo_map(&uri);
    assert!(
        map.iter()
            .any(|(o, l, t, d)| *o == 0 && *l == MIB && *t == 3 && d.contains("hole")),
        "{map:?}"
    );
    assert!(
        map.iter()
            .any(|(o, l, t, d)| *o == MIB && *l == 65536 && *t == 0 && d.contains("data")),
        "{map:?}"
    );
    let total: u64 = map.iter().map(|m| m.1).sum();
    assert_eq!(total, 4 * MIB);
}

#[test]
fn nbdcopy_both_ways_multi_conn_sparse() {
    let (reg, dev) = registry_with("disk", 16 * MIB);
    let srv = start_unix(reg, ServerConfig::default());
    let uri = srv.uri("disk");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let data = pattern(16 * MIB as usize, 7);
    std::fs::write(&src, &data).unwrap();

    nbdcopy(
        src.to_str().unwrap(),
        &uri,
        &["--connections=4", "--requests=16", "--flush"],
    );
    assert_eq!(
        crc(&dev.snapshot()),
        crc(&data),
        "checksum after nbdcopy file -> nbd"
    );
    // A quarter of the source is zero; nbdcopy writes zeroes as holes.
    assert!(
        dev.allocated_bytes() < 16 * MIB,
        "zero blocks were written as data: {}",
        dev.allocated_bytes()
    );
    assert!(dev.flush_count() >= 1);

    let out = dir.path().join("out.img");
    nbdcopy(&uri, out.to_str().unwrap(), &["--connections=4"]);
    assert_eq!(
        crc(&std::fs::read(&out).unwrap()),
        crc(&data),
        "checksum after nbdcopy nbd -> file"
    );
}

/// CRC-32 (IEEE), enough to compare copies.
fn crc(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

const EDGE_SCRIPT: &str = r#"
import errno, os, nbd

def expect_err(fn, code, what):
    try:
        fn()
    except nbd.Error as e:
        # libnbd reports errno as a symbolic name ("EINVAL"); accept numbers too.
        assert e.errno in (code, errno.errorcode[code]), "%s: got errno %s (%s), expected %s" % (what, e.errno, e, errno.errorcode[code])
        return
    raise AssertionError("%s: no error" % what)

def connect(uri):
    h = nbd.NBD()
    h.set_strict_mode(0)          # let invalid requests reach the server
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h

h = connect(os.environ["URI"])
size = h.get_size()
expect_err(lambda: h.pread(4096, size), errno.EINVAL, "read past end")
expect_err(lambda: h.pread(4096, size - 2048), errno.EINVAL, "read straddling end")
expect_err(lambda: h.pwrite(b"x" * 4096, size), errno.ENOSPC, "write past end")
expect_err(lambda: h.trim(4096, size), errno.EINVAL, "trim past end")
expect_err(lambda: h.pread(512, 2**64 - 256), errno.EINVAL, "offset+length overflow")
expect_err(lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL, "block status past end")
# The connection still works after the errors.
h.pwrite(b"\xab" * 4096, 0)
assert h.pread(4096, 0) == b"\xab" * 4096
# Block status with REQ_ONE returns a single extent.
seen = []
def cb(metacontext, offset, entries, err):
    seen.append(list(entries))
    return 0
h.block_status(65536, 0, cb, flags=nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 1 and len(seen[0]) == 2, seen
h.zero(4096, 0, flags=nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == bytes(4096)
h.cache(4096, 0)
h.flush()

# Many requests in flight at once: 64 writes then 64 reads, verified.
N = 64
bufs = []
for i in range(N):
    b = nbd.Buffer.from_bytearray(bytearray([i]) * 4096)
    bufs.append(b)
    h.aio_pwrite(b, i * 8192)
while h.aio_in_flight() > 0:
    h.poll(-1)
rbufs = [nbd.Buffer(4096) for _ in range(N)]
cookies = [h.aio_pread(rbufs[i], i * 8192) for i in range(N)]
while h.aio_in_flight() > 0:
    h.poll(-1)
for i in range(N):
    assert h.aio_command_completed(cookies[i])
    assert rbufs[i].to_bytearray() == bytearray([i]) * 4096, i
h.shutdown()

# Read-only export: writes, trims and zeroes fail with EPERM.
r = connect(os.environ["RO_URI"])
assert r.is_read_only()
expect_err(lambda: r.pwrite(b"x" * 512, 0), errno.EPERM, "write to read-only")
expect_err(lambda: r.trim(512, 0), errno.EPERM, "trim on read-only")
expect_err(lambda: r.zero(512, 0), errno.EPERM, "zero on read-only")
assert r.pread(512, 0) == bytes(512)
r.shutdown()

# Server with a 512-byte minimum block size: misaligned requests get EINVAL.
a = connect(os.environ["ALIGNED_URI"])
assert a.get_block_size(nbd.SIZE_MINIMUM) == 512
expect_err(lambda: a.pread(512, 1), errno.EINVAL, "misaligned offset")
expect_err(lambda: a.pread(100, 0), errno.EINVAL, "misaligned length")
a.pread(512, 512)
a.shutdown()

# Out-of-order replies: a slow read (at SLOW_OFFSET) is sent first, a fast
# one second; the fast one completes while the slow one is still running.
s = connect(os.environ["SLOW_URI"])
slow = s.aio_pread(nbd.Buffer(4096), int(os.environ["SLOW_OFFSET"]))
fast = s.aio_pread(nbd.Buffer(4096), 0)
while not s.aio_command_completed(fast):
    s.poll(-1)
assert not s.aio_command_completed(slow), "slow request finished before the fast one"
while s.aio_in_flight() > 0:
    s.poll(-1)
assert s.aio_command_completed(slow)
s.shutdown()
print("edge cases ok")
"#;

#[test]
fn nbdsh_edge_cases() {
    let reg = Arc::new(MemRegistry::new());
    reg.insert("disk", "", Arc::new(MemDevice::new(4 * MIB)));
    reg.insert("ro", "", Arc::new(MemDevice::new(MIB).with_read_only(true)));
    let slow_inner = Arc::new(MemDevice::new(4 * MIB));
    reg.insert(
        "slow",
        "",
        Arc::new(SlowDevice {
            inner: slow_inner,
            slow_from: 2 * MIB,
            delay: Duration::from_millis(500),
        }),
    );
    let srv = start_unix(reg.clone(), ServerConfig::default());
    let aligned = start_unix(
        reg,
        ServerConfig {
            min_block_size: 512,
            ..ServerConfig::default()
        },
    );
    let out = nbdsh_script(
        EDGE_SCRIPT,
        &[
            ("URI", &srv.uri("disk")),
            ("RO_URI", &srv.uri("ro")),
            ("ALIGNED_URI", &aligned.uri("disk")),
            ("SLOW_URI", &srv.uri("slow")),
            ("SLOW_OFFSET", &(2 * MIB).to_string()),
        ],
    );
    assert!(out.contains("edge cases ok"), "{out}");
}

#[test]
fn fio_nbd_engine_verify() {
    let (reg, _dev) = registry_with("disk", 64 * MIB);
    let srv = start_unix(reg, ServerConfig::default());
    fio_verify(&srv.uri("disk"), "32M", "4k", 32);
    fio_verify(&srv.uri("disk"), "32M", "64k", 8);
}

#[test]
fn several_clients_on_several_exports() {
    let reg = Arc::new(MemRegistry::new());
    let devs: Vec<Arc<MemDevice>> = (0..3).map(|_| Arc::new(MemDevice::new(4 * MIB))).collect();
    for (i, d) in devs.iter().enumerate() {
        reg.insert(&format!("e{i}"), "", d.clone());
    }
    let srv = start_unix(reg, ServerConfig::default());
    std::thread::scope(|s| {
        for i in 0..3 {
            for j in 0..2u64 {
                let uri = srv.uri(&format!("e{i}"));
                s.spawn(move || {
                    let pat = format!("0x{:x}", 0x10 * (i + 1) + j as usize);
                    let off = j * 2 * MIB;
                    let w = format!("write -P {pat} {off} 1M");
                    let r = format!("read -P {pat} {off} 1M");
                    qemu_io(&uri, &[&w, &r]);
                });
            }
        }
    });
    for (i, d) in devs.iter().enumerate() {
        let snap = d.snapshot();
        for j in 0..2usize {
            let want = (0x10 * (i + 1) + j) as u8;
            let off = j * 2 * MIB as usize;
            assert!(
                snap[off..off + MIB as usize].iter().all(|&b| b == want),
                "export e{i} part {j}"
            );
        }
    }
}

#[test]
fn tcp_listener_works() {
    let (reg, dev) = registry_with("disk", 4 * MIB);
    let srv = start_tcp(reg, ServerConfig::default());
    let uri = srv.uri("disk");
    assert!(uri.starts_with("nbd://127.0.0.1:"), "{uri}");
    let info = qemu_img_info(&uri);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", 4 * MIB)),
        "{info}"
    );
    qemu_io(&uri, &["write -P 0x33 0 1M", "read -P 0x33 0 1M"]);
    assert!(nbdinfo_can(&uri, "--can", "multi-conn"));
    assert_eq!(
        dev.snapshot()[..MIB as usize],
        vec![0x33u8; MIB as usize][..]
    );
}

#[test]
fn default_export_and_unknown_export() {
    let (reg, _dev) = registry_with("disk", MIB);
    reg.set_default(Some("disk"));
    let srv = start_unix(reg, ServerConfig::default());
    let info = qemu_img_info(&srv.uri(""));
    assert!(info.contains(&format!("\"virtual-size\": {MIB}")), "{info}");
    let out = run(
        std::process::Command::new(require_tool("nbdinfo")).arg(srv.uri("nope")),
        Duration::from_secs(30),
    );
    assert!(!out.status.success(), "unknown export must fail");
    // The server still serves after the refused client.
    assert!(nbdinfo_can(&srv.uri("disk"), "--can", "flush"));
}
