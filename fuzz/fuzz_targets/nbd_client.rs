//! Fuzz the NBD client (`vpool_nbd::client`, what `vpool vol bench`
//! drives): a server's handshake and replies come from the fuzzer's bytes;
//! the client must fail cleanly, never panic or allocate without bound.
#![no_main]

use std::io::{self, Cursor, Read, Write};

use libfuzzer_sys::fuzz_target;
use vpool_nbd::client::Client;

/// The server side: reads come from the input, writes go nowhere.
struct FakeServer(Cursor<Vec<u8>>);

impl Read for FakeServer {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for FakeServer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut c) = Client::over(FakeServer(Cursor::new(data.to_vec())), "disk") else {
        return;
    };
    let mut buf = [0u8; 512];
    if c.size_bytes() >= 512 {
        let _ = c.read(0, &mut buf);
        let _ = c.write(0, &buf, true);
    }
    let _ = c.flush();
});
