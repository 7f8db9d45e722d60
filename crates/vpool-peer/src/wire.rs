//! The peer link's bytes: the handshake and the frames of a session, as
//! pure encode and decode functions (the decoders see a peer's bytes and
//! are fuzzed as `peer_frame`).
//!
//! ```text
//! handshake (after TCP connect)
//!   server -> client  "VPPEERS1" | server nonce (32)
//!   client -> server  "VPPEERC1" | pool name len (u8) | pool name | client nonce (32)
//!                     | HMAC-SHA256(secret, "client" | pool | server nonce | client nonce) (32)
//!   server -> client  status (u8: 0 ok, else refused; then it closes)
//!                     | HMAC-SHA256(secret, "server" | pool | server nonce | client nonce) (32)
//!
//! request (client -> server), little endian
//!   0       1       2        4             8          16         24
//!   | op u8 | flag u8| 0 u16 | payload u32 | offset u64| length u64| payload ...
//!
//! reply (server -> client)
//!   0          1        2       4             8
//!   | status u8| 0 u8   | 0 u16 | payload u32 | payload ...
//! ```
//!
//! One request at a time per session: a forwarding host opens several
//! sessions for parallelism (`client`). The payload of a request is the
//! name of `Open`, `Connections`, `Release` and the data of `Write`; of a
//! reply, the data of a `Read`, the figures of `Open` and `Connections`,
//! and an error's message.

use vpool_nbd::{DeviceError, DeviceErrorKind};

/// The server's greeting magic.
pub const SERVER_MAGIC: [u8; 8] = *b"VPPEERS1";
/// The client's answer magic.
pub const CLIENT_MAGIC: [u8; 8] = *b"VPPEERC1";
/// Bytes of each nonce and MAC.
pub const NONCE_BYTES: usize = 32;
pub const MAC_BYTES: usize = 32;
/// Longest pool, volume or export name.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest read or write: the NBD server's own request limit.
pub const MAX_DATA_BYTES: u32 = 32 << 20;
/// Longest error message in a reply.
pub const MAX_MESSAGE_BYTES: u32 = 1024;
/// Bytes of a request header and of a reply header.
pub const REQUEST_HEADER_BYTES: usize = 24;
pub const REPLY_HEADER_BYTES: usize = 8;

/// What a request asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Opens export `payload` (`VOLUME` or `VOLUME@SNAPSHOT` of the pool)
    /// for the rest of the session; the reply is its size (u64) and
    /// whether it is read-only (u8).
    Open = 1,
    Read = 2,
    Write = 3,
    Flush = 4,
    Trim = 5,
    /// `flag` 1: the range may be deallocated.
    WriteZeroes = 6,
    /// Drops the open export and answers once it is dropped (so the owner
    /// counts one client less before the reply).
    Close = 7,
    /// How many clients (its own and forwarded) volume `payload` has on
    /// the owner; the reply is a u64.
    Connections = 8,
    /// Asks the owner to give volume `payload` up (upload, release the
    /// lease); refused while it has clients.
    Release = 9,
}

impl Op {
    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Open,
            2 => Op::Read,
            3 => Op::Write,
            4 => Op::Flush,
            5 => Op::Trim,
            6 => Op::WriteZeroes,
            7 => Op::Close,
            8 => Op::Connections,
            9 => Op::Release,
            _ => return None,
        })
    }

    fn takes_name(self) -> bool {
        matches!(self, Op::Open | Op::Connections | Op::Release)
    }
}

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub op: Op,
    pub flag: u8,
    pub payload_bytes: u32,
    pub offset: u64,
    pub length: u64,
}

/// A peer sent bytes that are not this protocol.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("peer protocol: {0}")]
pub struct WireError(pub String);

fn bad(msg: impl Into<String>) -> WireError {
    WireError(msg.into())
}

impl Request {
    pub fn encode(&self) -> [u8; REQUEST_HEADER_BYTES] {
        let mut b = [0u8; REQUEST_HEADER_BYTES];
        b[0] = self.op as u8;
        b[1] = self.flag;
        b[4..8].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// A header from a peer, checked: a known op, reserved bytes zero, a
    /// payload that fits the op (a name, or a write's data of `length`
    /// bytes), a range whose end does not overflow.
    pub fn decode(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<Request, WireError> {
        let op = Op::from_u8(b[0]).ok_or_else(|| bad(format!("unknown op {}", b[0])))?;
        if b[2] != 0 || b[3] != 0 {
            return Err(bad("reserved bytes set"));
        }
        let r = Request {
            op,
            flag: b[1],
            payload_bytes: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            offset: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
            length: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
        };
        r.check()?;
        Ok(r)
    }

    fn check(&self) -> Result<(), WireError> {
        if self.flag > 1 || (self.flag == 1 && self.op != Op::WriteZeroes) {
            return Err(bad(format!("flag {} on {:?}", self.flag, self.op)));
        }
        if self.offset.checked_add(self.length).is_none() {
            return Err(bad("the range's end overflows"));
        }
        let payload = u64::from(self.payload_bytes);
        let fits = match self.op {
            op if op.takes_name() => payload > 0 && payload <= MAX_NAME_BYTES as u64,
            Op::Write => payload == self.length && self.length <= u64::from(MAX_DATA_BYTES),
            Op::Read => payload == 0 && self.length <= u64::from(MAX_DATA_BYTES),
            _ => payload == 0,
        };
        if !fits {
            return Err(bad(format!(
                "{:?} of {} bytes with a payload of {payload} bytes",
                self.op, self.length
            )));
        }
        Ok(())
    }
}

/// What a reply says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// The request failed on the device or the host; the payload says why.
    Failed(DeviceErrorKind),
    /// `Release` refused: the volume has clients (or is not owned there).
    Busy,
}

impl Status {
    fn to_u8(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Failed(k) => match k {
                DeviceErrorKind::Io => 1,
                DeviceErrorKind::NoSpace => 2,
                DeviceErrorKind::Invalid => 3,
                DeviceErrorKind::ReadOnly => 4,
                DeviceErrorKind::Overflow => 5,
                DeviceErrorKind::NotSupported => 6,
                DeviceErrorKind::NotFound => 7,
            },
            Status::Busy => 8,
        }
    }

    fn from_u8(b: u8) -> Option<Status> {
        Some(match b {
            0 => Status::Ok,
            1 => Status::Failed(DeviceErrorKind::Io),
            2 => Status::Failed(DeviceErrorKind::NoSpace),
            3 => Status::Failed(DeviceErrorKind::Invalid),
            4 => Status::Failed(DeviceErrorKind::ReadOnly),
            5 => Status::Failed(DeviceErrorKind::Overflow),
            6 => Status::Failed(DeviceErrorKind::NotSupported),
            7 => Status::Failed(DeviceErrorKind::NotFound),
            8 => Status::Busy,
            _ => return None,
        })
    }
}

/// A decoded reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    pub payload_bytes: u32,
}

impl Reply {
    pub fn encode(&self) -> [u8; REPLY_HEADER_BYTES] {
        let mut b = [0u8; REPLY_HEADER_BYTES];
        b[0] = self.status.to_u8();
        b[4..8].copy_from_slice(&self.payload_bytes.to_le_bytes());
        b
    }

    /// A reply header from a peer, checked against the request it
    /// answers: an error carries at most [`MAX_MESSAGE_BYTES`]; a success
    /// exactly what the op returns.
    pub fn decode(b: &[u8; REPLY_HEADER_BYTES], asked: &Request) -> Result<Reply, WireError> {
        let status = Status::from_u8(b[0]).ok_or_else(|| bad(format!("status {}", b[0])))?;
        if b[1..4] != [0, 0, 0] {
            return Err(bad("reserved bytes set in a reply"));
        }
        let payload_bytes = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes"));
        let want = match (status, asked.op) {
            (Status::Ok, Op::Read) => Some(u64::from(payload_bytes) == asked.length),
            (Status::Ok, Op::Open) => Some(payload_bytes == 9),
            (Status::Ok, Op::Connections) => Some(payload_bytes == 8),
            (Status::Ok, _) => Some(payload_bytes == 0),
            _ => None,
        };
        let fits = want.unwrap_or(payload_bytes <= MAX_MESSAGE_BYTES);
        if !fits {
            return Err(bad(format!(
                "a reply of {payload_bytes} bytes to {:?}",
                asked.op
            )));
        }
        Ok(Reply {
            status,
            payload_bytes,
        })
    }
}

/// The error a failed reply carries, as the device error the client's
/// NBD connection reports.
pub fn reply_error(status: Status, message: &[u8]) -> DeviceError {
    let msg = String::from_utf8_lossy(message).into_owned();
    match status {
        Status::Failed(kind) => DeviceError::new(kind, msg),
        Status::Busy | Status::Ok => DeviceError::io(msg),
    }
}

/// Splits the client's handshake after its magic: `(pool, client nonce,
/// mac)`, checked. `rest` is everything after the magic and the length
/// byte, exactly `len + 64` bytes.
pub fn decode_client_hello(
    len: u8,
    rest: &[u8],
) -> Result<(String, [u8; NONCE_BYTES], [u8; MAC_BYTES]), WireError> {
    let n = usize::from(len);
    if n == 0 || rest.len() != n + NONCE_BYTES + MAC_BYTES {
        return Err(bad("a malformed hello"));
    }
    let pool = std::str::from_utf8(&rest[..n])
        .map_err(|_| bad("a pool name that is not UTF-8"))?
        .to_string();
    let nonce = rest[n..n + NONCE_BYTES].try_into().expect("32 bytes");
    let mac = rest[n + NONCE_BYTES..].try_into().expect("32 bytes");
    Ok((pool, nonce, mac))
}

/// The payload of a successful `Open` reply.
pub fn encode_open(size_bytes: u64, read_only: bool) -> [u8; 9] {
    let mut b = [0u8; 9];
    b[..8].copy_from_slice(&size_bytes.to_le_bytes());
    b[8] = u8::from(read_only);
    b
}

/// `(size, read-only)` from an `Open` reply's payload.
pub fn decode_open(b: &[u8; 9]) -> Result<(u64, bool), WireError> {
    let size = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    match b[8] {
        0 => Ok((size, false)),
        1 => Ok((size, true)),
        x => Err(bad(format!("read-only flag {x}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn req(op: Op, payload: u32, offset: u64, length: u64) -> Request {
        Request {
            op,
            flag: 0,
            payload_bytes: payload,
            offset,
            length,
        }
    }

    #[test]
    fn requests_that_do_not_fit_their_op_are_refused() {
        for r in [
            req(Op::Write, 10, 0, 11),
            req(Op::Write, 33 << 20, 0, 33 << 20),
            req(Op::Read, 0, 0, 33 << 20),
            req(Op::Open, 0, 0, 0),
            req(Op::Open, 256, 0, 0),
            req(Op::Flush, 1, 0, 0),
            req(Op::Trim, 0, u64::MAX, 1),
        ] {
            assert!(Request::decode(&r.encode()).is_err(), "{r:?}");
        }
        let mut b = req(Op::Flush, 0, 0, 0).encode();
        b[0] = 0;
        assert!(Request::decode(&b).is_err());
        b[0] = Op::Trim as u8;
        b[1] = 1;
        assert!(Request::decode(&b).is_err(), "may-trim on a trim");
        b[1] = 0;
        b[3] = 1;
        assert!(Request::decode(&b).is_err(), "reserved");
    }

    #[test]
    fn replies_carry_what_their_op_returns() {
        let read = req(Op::Read, 0, 0, 4096);
        let ok = |n| Reply {
            status: Status::Ok,
            payload_bytes: n,
        };
        assert!(Reply::decode(&ok(4096).encode(), &read).is_ok());
        assert!(Reply::decode(&ok(4095).encode(), &read).is_err());
        let flush = req(Op::Flush, 0, 0, 0);
        assert!(Reply::decode(&ok(1).encode(), &flush).is_err());
        let failed = Reply {
            status: Status::Failed(DeviceErrorKind::NoSpace),
            payload_bytes: 2000,
        };
        assert!(Reply::decode(&failed.encode(), &flush).is_err());
        assert!(decode_open(&encode_open(7, true)).unwrap() == (7, true));
    }

    proptest! {
        #[test]
        fn a_decoded_request_encodes_to_the_same_bytes(b in proptest::array::uniform24(any::<u8>())) {
            if let Ok(r) = Request::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }

        #[test]
        fn every_status_round_trips(s in 0u8..=255) {
            if let Some(st) = Status::from_u8(s) {
                prop_assert_eq!(st.to_u8(), s);
            }
        }
    }
}
