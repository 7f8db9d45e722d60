//! Checkpoints: the pool's whole metadata as of one position in the log.
//!
//! Recovery loads the newest checkpoint and replays only the log after its
//! position, so recovery time is bounded by the checkpoint interval, not by
//! the size of the log. The encoding is a flat little-endian stream closed
//! by a CRC-32C of everything before it (byte diagram in
//! `docs/on-disk-format.md`). The decoder distrusts every length.

use crate::extent_map::{DataLoc, ExtentMap, Target};
use crate::record::{DecodeError, MAX_NAME_LEN};
use crate::types::VolumeId;
use vpool_store::SegmentId;

/// "VPCKPT01"
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"VPCKPT01";
/// The two metadata blobs that checkpoints alternate between. Recovery
/// takes the newest copy that decodes and fits the log, so losing one copy
/// costs a longer replay, not the pool. The first is the name older pools
/// kept their only copy under.
pub const CHECKPOINT_SLOTS: [&str; 2] = ["checkpoint", "checkpoint.2"];
/// Version 2 added snapshots and parent links.
const CHECKPOINT_VERSION: u32 = 2;
/// Bytes of one encoded extent.
const EXTENT_LEN: usize = 8 + 4 + 1 + 8 + 4 + 4;

/// A place in the log: records at or after it are replayed at recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogPosition {
    pub seg: SegmentId,
    pub offset: u64,
}

#[derive(Clone)]
pub struct VolumeCheckpoint {
    pub id: VolumeId,
    pub name: String,
    pub size_bytes: u64,
    pub map: ExtentMap,
    /// For a clone: the volume and snapshot it came from.
    pub parent: Option<(VolumeId, String)>,
    pub ephemeral: bool,
    pub snapshots: Vec<SnapshotCheckpoint>,
}

#[derive(Clone)]
pub struct SnapshotCheckpoint {
    pub name: String,
    pub size_bytes: u64,
    pub seq: u64,
    pub map: ExtentMap,
}

#[derive(Clone)]
pub struct Checkpoint {
    pub position: LogPosition,
    pub next_seq: u64,
    pub next_volume_id: u64,
    pub next_segment_id: u64,
    pub volumes: Vec<VolumeCheckpoint>,
}

impl Checkpoint {
    /// Every segment a map of the checkpoint points into.
    pub fn referenced_segments(&self) -> std::collections::BTreeSet<SegmentId> {
        let maps = self
            .volumes
            .iter()
            .flat_map(|v| std::iter::once(&v.map).chain(v.snapshots.iter().map(|s| &s.map)));
        let mut out = std::collections::BTreeSet::new();
        for map in maps {
            for p in map.iter() {
                if let Some(Target::Data(d)) = p.target {
                    out.insert(d.seg);
                }
            }
        }
        out
    }

    pub fn encode(&self) -> Vec<u8> {
        let extents: usize = self.volumes.iter().map(|v| v.map.extent_count()).sum();
        let mut out = Vec::with_capacity(64 + self.volumes.len() * 100 + extents * EXTENT_LEN);
        out.extend_from_slice(&CHECKPOINT_MAGIC);
        out.extend_from_slice(&CHECKPOINT_VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for v in [
            self.position.seg.0,
            self.position.offset,
            self.next_seq,
            self.next_volume_id,
            self.next_segment_id,
            self.volumes.len() as u64,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for vol in &self.volumes {
            out.extend_from_slice(&vol.id.0.to_le_bytes());
            out.extend_from_slice(&vol.size_bytes.to_le_bytes());
            put_name(&mut out, &vol.name);
            put_map(&mut out, &vol.map);
            match &vol.parent {
                None => out.push(0),
                Some((id, snap)) => {
                    out.push(1);
                    out.extend_from_slice(&id.0.to_le_bytes());
                    put_name(&mut out, snap);
                }
            }
            out.push(u8::from(vol.ephemeral));
            out.extend_from_slice(&(vol.snapshots.len() as u64).to_le_bytes());
            for snap in &vol.snapshots {
                put_name(&mut out, &snap.name);
                out.extend_from_slice(&snap.size_bytes.to_le_bytes());
                out.extend_from_slice(&snap.seq.to_le_bytes());
                put_map(&mut out, &snap.map);
            }
        }
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub fn decode(b: &[u8]) -> Result<Checkpoint, DecodeError> {
        if b.len() < 8 + 8 + 6 * 8 + 4 {
            return Err(DecodeError::Short {
                need: 68,
                have: b.len(),
            });
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(DecodeError::PayloadChecksum);
        }
        let mut r = Reader { b: body, pos: 0 };
        if r.take(8)? != CHECKPOINT_MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if r.u32()? != CHECKPOINT_VERSION {
            return Err(DecodeError::Inconsistent("unknown checkpoint version"));
        }
        r.u32()?;
        let position = LogPosition {
            seg: SegmentId(r.u64()?),
            offset: r.u64()?,
        };
        let next_seq = r.u64()?;
        let next_volume_id = r.u64()?;
        let next_segment_id = r.u64()?;
        let nvolumes = r.u64()?;
        let mut volumes = Vec::new();
        for _ in 0..nvolumes {
            let id = VolumeId(r.u64()?);
            let size_bytes = r.u64()?;
            let name = r.name()?;
            let map = r.map(size_bytes)?;
            let parent = match r.u8()? {
                0 => None,
                1 => Some((VolumeId(r.u64()?), r.name()?)),
                _ => return Err(DecodeError::Inconsistent("parent flag")),
            };
            let ephemeral = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Inconsistent("ephemeral flag")),
            };
            let nsnapshots = r.u64()?;
            // Each snapshot takes at least 27 bytes: bound the count first.
            if nsnapshots > (r.remaining() / 27) as u64 {
                return Err(DecodeError::Inconsistent("snapshot count"));
            }
            let mut snapshots = Vec::new();
            for _ in 0..nsnapshots {
                let name = r.name()?;
                let size_bytes = r.u64()?;
                let seq = r.u64()?;
                let map = r.map(size_bytes)?;
                snapshots.push(SnapshotCheckpoint {
                    name,
                    size_bytes,
                    seq,
                    map,
                });
            }
            volumes.push(VolumeCheckpoint {
                id,
                name,
                size_bytes,
                map,
                parent,
                ephemeral,
                snapshots,
            });
        }
        if r.remaining() != 0 {
            return Err(DecodeError::Inconsistent("trailing bytes"));
        }
        Ok(Checkpoint {
            position,
            next_seq,
            next_volume_id,
            next_segment_id,
            volumes,
        })
    }
}

fn put_name(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(name.as_bytes());
}

fn put_map(out: &mut Vec<u8>, map: &ExtentMap) {
    out.extend_from_slice(&(map.extent_count() as u64).to_le_bytes());
    for p in map.iter() {
        out.extend_from_slice(&p.start_block.to_le_bytes());
        out.extend_from_slice(&(p.len_blocks as u32).to_le_bytes());
        let (kind, d) = match p.target.expect("iter yields mapped pieces") {
            Target::Zero => (
                0u8,
                DataLoc {
                    seg: SegmentId(0),
                    data_off: 0,
                    crc_off: 0,
                },
            ),
            Target::Data(d) => (1u8, d),
        };
        out.push(kind);
        out.extend_from_slice(&d.seg.0.to_le_bytes());
        out.extend_from_slice(&d.data_off.to_le_bytes());
        out.extend_from_slice(&d.crc_off.to_le_bytes());
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Short {
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.b[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn name(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()? as usize;
        if len == 0 || len > MAX_NAME_LEN {
            return Err(DecodeError::Inconsistent("name length"));
        }
        std::str::from_utf8(self.take(len)?)
            .map(str::to_string)
            .map_err(|_| DecodeError::Inconsistent("name is not UTF-8"))
    }

    /// An extent map of a volume (or snapshot) of `size_bytes`.
    fn map(&mut self, size_bytes: u64) -> Result<ExtentMap, DecodeError> {
        let nextents = self.u64()?;
        // Bound the count by the bytes left before trusting it.
        if nextents > (self.remaining() / EXTENT_LEN) as u64 {
            return Err(DecodeError::Inconsistent("extent count"));
        }
        let mut map = ExtentMap::new();
        let mut prev_end = 0u64;
        for _ in 0..nextents {
            let start = self.u64()?;
            let len = u64::from(self.u32()?);
            let kind = self.u8()?;
            let seg = SegmentId(self.u64()?);
            let data_off = self.u32()?;
            let crc_off = self.u32()?;
            let end = start
                .checked_add(len)
                .ok_or(DecodeError::Inconsistent("extent overflows"))?;
            let end_bytes = end
                .checked_mul(crate::types::BLOCK_SIZE)
                .ok_or(DecodeError::Inconsistent("extent overflows"))?;
            if len == 0 || start < prev_end || end_bytes > size_bytes {
                return Err(DecodeError::Inconsistent("extent out of order or range"));
            }
            prev_end = end;
            let target = match kind {
                0 => Target::Zero,
                1 => Target::Data(DataLoc {
                    seg,
                    data_off,
                    crc_off,
                }),
                _ => return Err(DecodeError::Inconsistent("extent kind")),
            };
            map.set(start, len, Some(target), &mut |_, _| {
                unreachable!("extents were checked not to overlap")
            });
        }
        Ok(map)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let mut map = ExtentMap::new();
        map.set(3, 5, Some(Target::Zero), &mut |_, _| {});
        map.set(
            100,
            2,
            Some(Target::Data(DataLoc {
                seg: SegmentId(9),
                data_off: 4096,
                crc_off: 64,
            })),
            &mut |_, _| {},
        );
        let c = Checkpoint {
            position: LogPosition {
                seg: SegmentId(9),
                offset: 12345,
            },
            next_seq: 77,
            next_volume_id: 3,
            next_segment_id: 10,
            volumes: vec![VolumeCheckpoint {
                id: VolumeId(2),
                name: "web1".into(),
                size_bytes: 1 << 30,
                map: map.clone(),
                parent: Some((VolumeId(1), "gold".into())),
                ephemeral: true,
                snapshots: vec![SnapshotCheckpoint {
                    name: "s1".into(),
                    size_bytes: 1 << 29,
                    seq: 5,
                    map,
                }],
            }],
        };
        let bytes = c.encode();
        let d = Checkpoint::decode(&bytes).unwrap();
        assert_eq!(d.position, c.position);
        assert_eq!(d.volumes[0].name, "web1");
        assert_eq!(
            d.volumes[0].map.lookup(0, 200),
            c.volumes[0].map.lookup(0, 200)
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Checkpoint::decode(&bad).is_err(), "flip at {i} not caught");
        }
        for n in 0..bytes.len() {
            assert!(Checkpoint::decode(&bytes[..n]).is_err());
        }
    }
}
