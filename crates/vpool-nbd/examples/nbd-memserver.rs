//! Serve in-memory exports, for manual testing and benchmarks.
//!
//! ```text
//! cargo run --release -p vpool-nbd --example nbd-memserver -- unix:/tmp/nbd.sock 1G
//! cargo run --release -p vpool-nbd --example nbd-memserver -- tcp:127.0.0.1:10809 1G
//! ```
//! Exports `disk` (writable, the given size) and `ro` (read-only, 1 MiB).
//! Stops on end of standard input.

use std::sync::Arc;

use vpool_nbd::{MemDevice, MemRegistry, ServerConfig};

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("unix:/tmp/vpool-nbd.sock");
    let size = args.get(2).and_then(|s| parse_size(s)).unwrap_or(1 << 30);
    let registry = Arc::new(MemRegistry::new());
    registry.insert("disk", "in-memory disk", Arc::new(MemDevice::new(size)));
    registry.insert(
        "ro",
        "read-only disk",
        Arc::new(MemDevice::new(1 << 20).with_read_only(true)),
    );
    registry.set_default(Some("disk"));
    let server = if let Some(path) = addr.strip_prefix("unix:") {
        let _ = std::fs::remove_file(path);
        let l = std::os::unix::net::UnixListener::bind(path).expect("bind unix socket");
        vpool_nbd::spawn(l, registry, ServerConfig::default())
    } else {
        let a = addr.strip_prefix("tcp:").unwrap_or(addr);
        let l = std::net::TcpListener::bind(a).expect("bind tcp socket");
        vpool_nbd::spawn(l, registry, ServerConfig::default())
    }
    .expect("start server");
    eprintln!("serving {}", server.uri("disk"));
    let mut sink = String::new();
    while std::io::stdin()
        .read_line(&mut sink)
        .map(|n| n > 0)
        .unwrap_or(false)
    {}
    server.shutdown().expect("shutdown");
}
