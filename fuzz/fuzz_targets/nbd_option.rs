//! Fuzz the handshake: the whole option-haggling state machine runs over an
//! in-memory stream fed with the fuzzer's bytes, against a small registry.
#![no_main]

use std::io::{self, Read, Write};
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use vpool_nbd::{MemDevice, MemRegistry, ServerConfig, handshake, wire};

struct FuzzStream<'a> {
    input: &'a [u8],
}

impl Read for FuzzStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for FuzzStream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn registry() -> &'static MemRegistry {
    static R: OnceLock<MemRegistry> = OnceLock::new();
    R.get_or_init(|| {
        let r = MemRegistry::new();
        r.insert("disk", "fuzz disk", Arc::new(MemDevice::new(1 << 20)));
        r.insert(
            "ro",
            "",
            Arc::new(MemDevice::new(4096).with_read_only(true)),
        );
        r.set_default(Some("disk"));
        r
    })
}

fuzz_target!(|data: &[u8]| {
    // Option payload decoder on its own (first byte picks the option code).
    if let Some((&code, rest)) = data.split_first() {
        let _ = wire::parse_option(u32::from(code % 16), rest);
    }
    // The full handshake: client flags + options, as a client would send them.
    let mut s = FuzzStream { input: data };
    let cfg = ServerConfig::default();
    let opener = vpool_nbd::Opener {
        client: vpool_nbd::ClientKey::Unknown,
        peer: "fuzz".into(),
    };
    let _ = handshake::negotiate(&mut s, registry(), &opener, &cfg, &|| false);
});
