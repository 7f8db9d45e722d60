//! The manifest: the one object that says what an S3 pool is.
//!
//! ```text
//! <prefix>/manifest/<generation, 20 decimal digits>   one object per commit, never overwritten
//! <prefix>/segments/<id 16 hex>-<epoch 16 hex>.seg    sealed segments, immutable
//! <prefix>/meta/<name>-<epoch 16 hex>-<generation 16 hex>   metadata blobs (the engine's checkpoint)
//! <prefix>/lease/<epoch 16 hex>                      the holder's heartbeat (`store::lease`)
//! ```
//!
//! A manifest object is an 16-byte envelope followed by a JSON body:
//!
//! ```text
//! 0        8          12         16
//! +--------+----------+----------+----------------------+
//! |VPMAN001| body len | crc32c   | JSON body (len bytes) |
//! +--------+----------+----------+----------------------+
//!            u32 LE     u32 LE of the body
//! ```
//!
//! The pool advances by creating manifest `g + 1` with a create-only PUT
//! (`If-None-Match: *`). Only one writer can create a given generation, so
//! a host whose lease was taken over (someone created a later generation)
//! fails its next commit and stops: it is *fenced*. Segment and meta keys
//! carry the writer's *epoch* (the generation at which it took the lease),
//! so a fenced host's late uploads land on keys no manifest names and can
//! never overwrite what the new holder committed.
//!
//! The segments listed are a prefix of the log (every segment is uploaded
//! whole, after it was synced locally, in id order) and the checkpoint
//! named is one whose every segment is listed: the bucket always holds a
//! crash-consistent image of an earlier moment of the pool.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const MAGIC: &[u8; 8] = b"VPMAN001";
const ENVELOPE_LEN: usize = 16;
/// A manifest is read whole into memory; this bounds it (about 20 million
/// segments' worth, far beyond what one pool should hold).
pub const MAX_MANIFEST_BYTES: usize = 1 << 30;

/// The bounds of a holder's `lease_expire_ms`: a lease shorter than a
/// second would expire under ordinary jitter; one longer than an hour
/// would keep a dead host's pool unreachable for too long.
pub const MIN_LEASE_EXPIRE_MS: u64 = 1_000;
pub const MAX_LEASE_EXPIRE_MS: u64 = 3_600_000;

pub const MANIFEST_DIR: &str = "manifest";
pub const LEASE_DIR: &str = "lease";
pub const SEGMENT_DIR: &str = "segments";
pub const META_DIR: &str = "meta";

/// Who holds the pool's write lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// Random, kept in the cache directory: the same cache reopening is the
    /// same holder.
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// The generation of the manifest that took the lease. Part of every
    /// key this holder writes.
    pub epoch: u64,
    /// The holder renews its lease (`lease/<epoch>`, see `store::lease`)
    /// and stops writing if it could not for a while: another host may
    /// take the lease over once it saw no renewal for this long. `None`
    /// (a holder from before leases expired): never, only by force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expire_ms: Option<u64>,
    /// When this holder took the lease (Unix milliseconds, its own clock);
    /// informational (`vol list` shows it), never used to decide anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
    /// Where the holder's daemon serves the peer link (`host:port`), so
    /// that hosts without the volume forward their clients' I/O to it;
    /// `None`: it serves no peer link.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

/// Whether the store's conditional create was found atomic when the pool
/// was created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fencing {
    /// `If-None-Match: *` is enforced atomically: takeover is safe.
    Atomic,
    /// The store ignores it or checks-then-writes: only one host may ever
    /// write this pool, and vpool cannot enforce it.
    Unsafe,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentEntry {
    pub id: u64,
    pub len: u64,
    /// The epoch of the holder that uploaded it (part of its key).
    pub epoch: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRef {
    pub key: String,
    pub len: u64,
    pub crc32c: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Random, set at creation; a cache directory remembers it so it is
    /// never used with another pool.
    pub pool_id: String,
    pub generation: u64,
    pub holder: Option<Holder>,
    pub fencing: Fencing,
    /// Strictly increasing ids.
    pub segments: Vec<SegmentEntry>,
    pub meta: BTreeMap<String, MetaRef>,
    /// Released for good as a sealed template (a family of a shared
    /// pool): hosts open it read-only, none takes it (`OpenMode::Open` is
    /// refused). Set by the release that seals it, so the release and the
    /// seal are one commit. Never with a holder.
    #[serde(default, skip_serializing_if = "is_false")]
    pub sealed: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("not a vpool manifest (bad magic)")]
    BadMagic,
    #[error("manifest truncated: {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("manifest checksum mismatch")]
    BadChecksum,
    #[error("manifest body: {0}")]
    Body(String),
    #[error("manifest invalid: {0}")]
    Invalid(String),
}

pub fn manifest_key(generation: u64) -> String {
    format!("{MANIFEST_DIR}/{generation:020}")
}

/// The generation a manifest key names, if it is one.
pub fn parse_manifest_key(key: &str) -> Option<u64> {
    let name = key.strip_prefix(MANIFEST_DIR)?.strip_prefix('/')?;
    if name.len() != 20 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok()
}

pub fn segment_key(id: u64, epoch: u64) -> String {
    format!("{SEGMENT_DIR}/{id:016x}-{epoch:016x}.seg")
}

pub fn meta_key(name: &str, epoch: u64, generation: u64) -> String {
    format!("{META_DIR}/{name}-{epoch:016x}-{generation:016x}")
}

/// The (id, epoch) a segment key names.
pub fn parse_segment_key(key: &str) -> Option<(u64, u64)> {
    let name = key.strip_prefix(SEGMENT_DIR)?.strip_prefix('/')?;
    let stem = name.strip_suffix(".seg")?;
    let (id, epoch) = stem.split_once('-')?;
    if id.len() != 16 || epoch.len() != 16 {
        return None;
    }
    Some((
        u64::from_str_radix(id, 16).ok()?,
        u64::from_str_radix(epoch, 16).ok()?,
    ))
}

/// The writer's epoch in a segment or meta key.
pub fn key_epoch(key: &str) -> Option<u64> {
    if let Some((_, epoch)) = parse_segment_key(key) {
        return Some(epoch);
    }
    let name = key.strip_prefix(META_DIR)?.strip_prefix('/')?;
    // <name>-<epoch 16 hex>-<generation 16 hex>
    let mut parts = name.rsplitn(3, '-');
    let generation = parts.next()?;
    let epoch = parts.next()?;
    parts.next()?;
    if epoch.len() != 16 || generation.len() != 16 {
        return None;
    }
    u64::from_str_radix(epoch, 16).ok()
}

/// Whether `s` may be a peer link address: `host:port`, at most 255
/// printable ASCII bytes (it is given to the resolver, never to a shell).
pub fn is_peer_address(s: &str) -> bool {
    s.len() <= 255
        && s.bytes().all(|b| b.is_ascii_graphic())
        && s.rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0))
}

impl Holder {
    /// `host:pid`, as messages and `vpool cache stats` name a holder.
    pub fn name(&self) -> String {
        format!("{}:{}", self.host, self.pid)
    }
}

impl Manifest {
    pub fn new(pool_id: String, fencing: Fencing) -> Manifest {
        Manifest {
            format: 1,
            pool_id,
            generation: 0,
            holder: None,
            fencing,
            segments: Vec::new(),
            meta: BTreeMap::new(),
            sealed: false,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("a manifest serializes");
        assert!(body.len() <= MAX_MANIFEST_BYTES, "manifest too large");
        let mut out = Vec::with_capacity(ENVELOPE_LEN + body.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() < ENVELOPE_LEN {
            return Err(ManifestError::Truncated {
                have: bytes.len(),
                need: ENVELOPE_LEN,
            });
        }
        if &bytes[..8] != MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let len = u32::from_le_bytes(bytes[8..12].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(bytes[12..16].try_into().expect("4"));
        let need = ENVELOPE_LEN
            .checked_add(len)
            .ok_or(ManifestError::Invalid("length overflows".into()))?;
        if len > MAX_MANIFEST_BYTES || bytes.len() != need {
            return Err(ManifestError::Truncated {
                have: bytes.len(),
                need,
            });
        }
        let body = &bytes[ENVELOPE_LEN..];
        if crc32c::crc32c(body) != crc {
            return Err(ManifestError::BadChecksum);
        }
        let m: Manifest =
            serde_json::from_slice(body).map_err(|e| ManifestError::Body(e.to_string()))?;
        m.validate()?;
        Ok(m)
    }

    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |s: &str| Err(ManifestError::Invalid(s.to_string()));
        if self.format != 1 {
            return bad("unknown format version");
        }
        if self.generation == 0 {
            return bad("generation 0");
        }
        if self.sealed && self.holder.is_some() {
            return bad("a sealed manifest with a holder");
        }
        if !self.segments.windows(2).all(|w| w[0].id < w[1].id) {
            return bad("segment ids not strictly increasing");
        }
        if self.segments.iter().any(|s| s.epoch > self.generation) {
            return bad("a segment's epoch is after the manifest's generation");
        }
        if let Some(h) = &self.holder
            && h.epoch > self.generation
        {
            return bad("the holder's epoch is after the manifest's generation");
        }
        if let Some(ms) = self.holder.as_ref().and_then(|h| h.lease_expire_ms)
            && !(MIN_LEASE_EXPIRE_MS..=MAX_LEASE_EXPIRE_MS).contains(&ms)
        {
            return bad("the holder's lease expiry is out of range");
        }
        if let Some(p) = self.holder.as_ref().and_then(|h| h.peer.as_deref())
            && !is_peer_address(p)
        {
            return bad("the holder's peer address is not host:port");
        }
        for (name, r) in &self.meta {
            if name.is_empty() || name.contains('/') || !r.key.starts_with(META_DIR) {
                return bad("bad meta entry");
            }
        }
        Ok(())
    }

    /// The length of segment `id`, if listed.
    pub fn segment(&self, id: u64) -> Option<&SegmentEntry> {
        self.segments
            .binary_search_by_key(&id, |s| s.id)
            .ok()
            .map(|i| &self.segments[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::new("abc".into(), Fencing::Atomic);
        m.generation = 7;
        m.holder = Some(Holder {
            id: "h".into(),
            host: "x".into(),
            pid: 1,
            epoch: 3,
            lease_expire_ms: Some(30_000),
            since_unix_ms: Some(1_765_000_000_000),
            peer: Some("127.0.0.1:7000".into()),
        });
        m.segments = vec![
            SegmentEntry {
                id: 1,
                len: 100,
                epoch: 3,
            },
            SegmentEntry {
                id: 4,
                len: 64,
                epoch: 7,
            },
        ];
        m.meta.insert(
            "checkpoint".into(),
            MetaRef {
                key: meta_key("checkpoint", 3, 7),
                len: 10,
                crc32c: 5,
            },
        );
        m
    }

    #[test]
    fn roundtrip_and_corruption() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes).unwrap(), m);
        assert_eq!(m.segment(4).unwrap().len, 64);
        assert!(m.segment(2).is_none());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(Manifest::decode(&b).is_err(), "flip at {i} went unnoticed");
        }
        assert!(Manifest::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut unordered = m.clone();
        unordered.segments.swap(0, 1);
        assert!(Manifest::decode(&unordered.encode()).is_err());
    }

    #[test]
    fn keys() {
        assert_eq!(parse_manifest_key(&manifest_key(42)), Some(42));
        assert_eq!(parse_manifest_key("manifest/42"), None);
        assert_eq!(parse_manifest_key("segments/00000000000000000042"), None);
        assert!(
            manifest_key(9) < manifest_key(10),
            "keys sort by generation"
        );
        assert_eq!(parse_segment_key(&segment_key(5, 9)), Some((5, 9)));
        assert_eq!(key_epoch(&segment_key(5, 9)), Some(9));
        assert_eq!(key_epoch(&meta_key("checkpoint", 3, 7)), Some(3));
        assert_eq!(key_epoch("meta/checkpoint"), None);
        assert_eq!(parse_segment_key("segments/x.seg"), None);
    }
}
