//! `vpool cache ...`: the host cache of a pool on S3.

use clap::Subcommand;
use vpool_api::Client;

use super::{Output, parse_image, render_cache_stats, render_pins};
use crate::size::format_size;

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Hit ratio, cached, dirty and pinned bytes, upload lag and speed,
    /// errors, and who holds the pool.
    Stats {
        /// The pool (default: the default pool).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
    /// Keep a volume, or a snapshot (VOLUME@SNAPSHOT, e.g. a suspended
    /// VM's state), resident in the cache; missing parts are fetched now.
    Pin {
        /// VOLUME or VOLUME@SNAPSHOT
        image: String,
    },
    /// Stop keeping a volume or snapshot resident.
    Unpin {
        /// VOLUME or VOLUME@SNAPSHOT
        image: String,
    },
    /// List the pins and how much data each keeps resident.
    Pins {
        /// The pool (default: the default pool).
        #[arg(long, value_name = "POOL")]
        pool: Option<String>,
    },
}

/// `vpool cache ...`.
pub(super) fn run(client: &Client, out: Output, cmd: &CacheCommand) -> anyhow::Result<()> {
    match cmd {
        CacheCommand::Stats { pool } => {
            let c = client.clone().in_pool(pool.as_deref()).cache_stats()?;
            out.emit(&c, render_cache_stats)
        }
        CacheCommand::Pins { pool } => {
            let pins = client.clone().in_pool(pool.as_deref()).cache_pins()?;
            out.emit(&vpool_api::PinList { pins }, |l| render_pins(&l.pins))
        }
        CacheCommand::Pin { image } => {
            let (vol, snap) = parse_image(image)?;
            let p = client.pin(vol, snap)?;
            out.emit(&p, |p| {
                format!(
                    "pinned {}: {} of data kept resident in the cache",
                    p.image(),
                    format_size(p.bytes.unwrap_or(0))
                )
            })
        }
        CacheCommand::Unpin { image } => {
            let (vol, snap) = parse_image(image)?;
            client.unpin(vol, snap)?;
            out.emit(&serde_json::json!({ "unpinned": image }), |_| {
                format!("unpinned {image}")
            })
        }
    }
}
