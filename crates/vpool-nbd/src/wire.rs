//! Pure (I/O-free) parsing and encoding of NBD messages.
//!
//! Everything a client sends passes through the functions here before the
//! server acts on it, so they are written to be total over arbitrary bytes:
//! no panics, no unchecked arithmetic, no allocation sized by an untrusted
//! length beyond what the caller already bounded. The fuzz targets in
//! `fuzz/fuzz_targets/nbd_{option,request}.rs` and the property tests below
//! drive them with random input.

use crate::proto::*;

// ---- Small big-endian cursor -----------------------------------------------

/// Reads big-endian integers off a byte slice; every read is bounds-checked.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Cursor { data }
    }
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
    pub fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| {
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            u64::from_be_bytes(a)
        })
    }
}

// ---- Handshake options -------------------------------------------------------

/// Fixed 16-byte header of a client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub code: u32,
    pub len: u32,
}

/// Errors that end the handshake with a hard disconnect (no reply possible).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeViolation {
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    #[error("option {code} declares {len} bytes of data, limit is {MAX_OPTION_LEN}")]
    OptionTooLong { code: u32, len: u32 },
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
}

/// Parse the 16-byte option header: magic, option code, data length.
pub fn parse_option_header(buf: &[u8; 16]) -> Result<OptionHeader, HandshakeViolation> {
    let mut c = Cursor::new(buf);
    let (Some(magic), Some(code), Some(len)) = (c.u64(), c.u32(), c.u32()) else {
        unreachable!("16 bytes always hold u64+u32+u32")
    };
    if magic != IHAVEOPT {
        return Err(HandshakeViolation::BadOptionMagic(magic));
    }
    if len > MAX_OPTION_LEN {
        return Err(HandshakeViolation::OptionTooLong { code, len });
    }
    Ok(OptionHeader { code, len })
}

/// Check the client flags word sent after the server greeting.
/// Returns whether `NBD_FLAG_C_NO_ZEROES` was set.
pub fn parse_client_flags(flags: u32) -> Result<ClientFlags, HandshakeViolation> {
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if flags & !known != 0 {
        return Err(HandshakeViolation::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        fixed_newstyle: flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// `NBD_INFO_*` codes the client asked for (unknown ones kept, then ignored).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    pub fn wants(&self, info: u16) -> bool {
        self.requests.contains(&info)
    }
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A decoded handshake option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Any option code this server does not implement (answered `NBD_REP_ERR_UNSUP`).
    Unsupported(u32),
}

/// Why an option's payload was rejected (answered with the given reply type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// `NBD_REP_ERR_INVALID`
    #[error("invalid option: {0}")]
    Invalid(String),
    /// `NBD_REP_ERR_TOO_BIG`
    #[error("option too big: {0}")]
    TooBig(String),
}

impl OptionError {
    pub fn reply_type(&self) -> u32 {
        match self {
            OptionError::Invalid(_) => NBD_REP_ERR_INVALID,
            OptionError::TooBig(_) => NBD_REP_ERR_TOO_BIG,
        }
    }
    pub fn message(&self) -> &str {
        match self {
            OptionError::Invalid(m) | OptionError::TooBig(m) => m,
        }
    }
}

fn invalid(msg: impl Into<String>) -> OptionError {
    OptionError::Invalid(msg.into())
}

/// Validate an NBD string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
pub fn parse_string(bytes: &[u8], what: &str) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(invalid(format!(
            "{what} longer than {MAX_STRING_LEN} bytes"
        )));
    }
    if bytes.contains(&0) {
        return Err(invalid(format!("{what} contains NUL")));
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(s.to_string()),
        Err(_) => Err(invalid(format!("{what} is not UTF-8"))),
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, OptionError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32().ok_or_else(|| invalid("truncated name length"))?;
    let name_len = usize::try_from(name_len).map_err(|_| invalid("name length overflow"))?;
    let name = c
        .take(name_len)
        .ok_or_else(|| invalid("name length exceeds option data"))?;
    let name = parse_string(name, "export name")?;
    let n = c
        .u16()
        .ok_or_else(|| invalid("truncated information request count"))?;
    if c.remaining() != usize::from(n) * 2 {
        return Err(invalid(
            "information request count does not match option length",
        ));
    }
    let mut requests = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let r = c
            .u16()
            .ok_or_else(|| invalid("truncated information request"))?;
        requests.push(r);
    }
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, OptionError> {
    let mut c = Cursor::new(data);
    let len = c
        .u32()
        .ok_or_else(|| invalid("truncated export name length"))?;
    let len = usize::try_from(len).map_err(|_| invalid("length overflow"))?;
    let export = c
        .take(len)
        .ok_or_else(|| invalid("export name exceeds option data"))?;
    let export = parse_string(export, "export name")?;
    let n = c.u32().ok_or_else(|| invalid("truncated query count"))?;
    if n > MAX_META_QUERIES {
        return Err(OptionError::TooBig(format!(
            "more than {MAX_META_QUERIES} queries"
        )));
    }
    let mut queries = Vec::new();
    for _ in 0..n {
        let qlen = c.u32().ok_or_else(|| invalid("truncated query length"))?;
        let qlen = usize::try_from(qlen).map_err(|_| invalid("length overflow"))?;
        let q = c
            .take(qlen)
            .ok_or_else(|| invalid("query exceeds option data"))?;
        queries.push(parse_string(q, "query")?);
    }
    if c.remaining() != 0 {
        return Err(invalid("trailing bytes after queries"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Decode one option's data. `data.len()` was already bounded by
/// [`parse_option_header`]. `NBD_OPT_EXPORT_NAME` errors must end the session
/// (the option has no error reply); all other errors are answered.
pub fn parse_option(code: u32, data: &[u8]) -> Result<ClientOption, OptionError> {
    let no_data = |opt: ClientOption, name: &str| {
        if data.is_empty() {
            Ok(opt)
        } else {
            Err(invalid(format!("{name} takes no data")))
        }
    };
    match code {
        NBD_OPT_EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data, "export name")?)),
        // The spec says to ignore data sent with ABORT.
        NBD_OPT_ABORT => Ok(ClientOption::Abort),
        NBD_OPT_LIST => no_data(ClientOption::List, "NBD_OPT_LIST"),
        NBD_OPT_STARTTLS => no_data(ClientOption::StartTls, "NBD_OPT_STARTTLS"),
        NBD_OPT_INFO => Ok(ClientOption::Info(parse_info_request(data)?)),
        NBD_OPT_GO => Ok(ClientOption::Go(parse_info_request(data)?)),
        NBD_OPT_STRUCTURED_REPLY => {
            no_data(ClientOption::StructuredReply, "NBD_OPT_STRUCTURED_REPLY")
        }
        NBD_OPT_LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_request(data)?)),
        NBD_OPT_SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_request(data)?)),
        other => Ok(ClientOption::Unsupported(other)),
    }
}

/// Whether a metadata-context query selects `base:allocation`.
/// `list` is true for `NBD_OPT_LIST_META_CONTEXT`, where the `base:` wildcard
/// also matches (for SET the spec says to ignore the wildcard).
pub fn query_selects_base_allocation(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

/// Append an option reply (magic, option, type, length, payload).
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Payloads are built by us and bounded well below 4 GiB.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

// ---- Transmission requests ---------------------------------------------------

/// A parsed 28-byte request header, not yet validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub typ: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.typ == NBD_CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// Parse a request header; only a bad magic is fatal here (the stream cannot
/// be resynchronised after it).
pub fn parse_request_header(buf: &[u8; REQUEST_HEADER_LEN]) -> Result<RequestHeader, u32> {
    let mut c = Cursor::new(buf);
    let (Some(magic), Some(flags), Some(typ), Some(handle), Some(offset), Some(length)) =
        (c.u32(), c.u16(), c.u16(), c.u64(), c.u64(), c.u32())
    else {
        unreachable!("28 bytes always hold a request header")
    };
    if magic != NBD_REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(RequestHeader {
        flags,
        typ,
        handle,
        offset,
        length,
    })
}

/// What was negotiated for this connection; the context for validating requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransmissionParams {
    pub size: u64,
    pub read_only: bool,
    pub structured_replies: bool,
    /// `base:allocation` was selected with `NBD_OPT_SET_META_CONTEXT`.
    pub base_allocation: bool,
    /// Minimum block size (power of two, 1 = byte granular).
    pub min_block: u32,
    /// Largest READ/WRITE length accepted (the advertised maximum block
    /// size); longer ones fail with `NBD_EINVAL`.
    pub max_payload: u32,
    /// Largest WRITE payload the server will read off the wire at all; a
    /// longer one ends the connection (the spec allows a hard disconnect).
    pub max_buffered: u32,
}

/// A validated command; offsets and lengths are in range and aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Disconnect,
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache {
        offset: u64,
        len: u32,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        may_trim: bool,
        fast: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

impl Command {
    /// Whether the command must be followed by a flush before replying.
    pub fn fua(&self) -> bool {
        matches!(
            self,
            Command::Write { fua: true, .. }
                | Command::Trim { fua: true, .. }
                | Command::WriteZeroes { fua: true, .. }
        )
    }
    /// Whether the command modifies the device.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
        )
    }
}

/// A request the server answers with an error instead of executing it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// `NBD_E*` value for the reply.
    pub errno: u32,
    pub message: String,
    /// The connection cannot continue (payload too large to consume): reply,
    /// then disconnect.
    pub disconnect: bool,
}

fn reject(errno: u32, message: impl Into<String>) -> RequestError {
    RequestError {
        errno,
        message: message.into(),
        disconnect: false,
    }
}

/// Validate a request header against the negotiated parameters.
///
/// On error, the caller must still consume [`RequestHeader::payload_len`]
/// bytes of payload unless `disconnect` is set.
pub fn decode_request(h: &RequestHeader, p: &TransmissionParams) -> Result<Command, RequestError> {
    let allowed_flags = match h.typ {
        NBD_CMD_READ => {
            NBD_CMD_FLAG_FUA
                | if p.structured_replies {
                    NBD_CMD_FLAG_DF
                } else {
                    0
                }
        }
        NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_FLUSH | NBD_CMD_DISC | NBD_CMD_CACHE => {
            NBD_CMD_FLAG_FUA
        }
        NBD_CMD_WRITE_ZEROES => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        NBD_CMD_BLOCK_STATUS => NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_REQ_ONE,
        other => {
            // A WRITE is the only command with payload, so an unknown command
            // has none and the stream stays in sync.
            return Err(reject(NBD_EINVAL, format!("unknown command {other}")));
        }
    };
    if h.flags & !allowed_flags != 0 {
        let e = reject(
            NBD_EINVAL,
            format!("invalid flags {:#x} for command {}", h.flags, h.typ),
        );
        return Err(RequestError {
            disconnect: h.typ == NBD_CMD_WRITE && h.length > p.max_buffered,
            ..e
        });
    }
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    match h.typ {
        NBD_CMD_DISC => return Ok(Command::Disconnect),
        // Offset and length are reserved for FLUSH; tolerate junk there.
        NBD_CMD_FLUSH => return Ok(Command::Flush),
        _ => {}
    }
    let (offset, len) = (h.offset, h.length);

    // A WRITE payload we refuse to buffer cannot be skipped cheaply: the spec
    // allows a hard disconnect for oversized payloads.
    if h.typ == NBD_CMD_WRITE && len > p.max_buffered {
        return Err(RequestError {
            errno: NBD_EINVAL,
            message: format!(
                "write of {len} bytes exceeds the request size limit {}",
                p.max_buffered
            ),
            disconnect: true,
        });
    }
    if matches!(h.typ, NBD_CMD_READ | NBD_CMD_WRITE) && len > p.max_payload {
        return Err(reject(
            NBD_EINVAL,
            format!(
                "request of {len} bytes exceeds maximum block size {}",
                p.max_payload
            ),
        ));
    }
    let writes = matches!(h.typ, NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES);
    if writes && p.read_only {
        return Err(reject(NBD_EPERM, "export is read-only"));
    }
    let in_range = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= p.size);
    if !in_range {
        let errno = if matches!(h.typ, NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES) {
            NBD_ENOSPC
        } else {
            NBD_EINVAL
        };
        return Err(reject(
            errno,
            format!(
                "request [{offset}, +{len}) is beyond the export size {}",
                p.size
            ),
        ));
    }
    let mb = u64::from(p.min_block.max(1));
    if offset % mb != 0 || u64::from(len) % mb != 0 {
        return Err(reject(
            NBD_EINVAL,
            format!("request [{offset}, +{len}) is not aligned to {mb} bytes"),
        ));
    }
    Ok(match h.typ {
        NBD_CMD_READ => Command::Read { offset, len },
        NBD_CMD_WRITE => Command::Write { offset, len, fua },
        NBD_CMD_TRIM => Command::Trim { offset, len, fua },
        NBD_CMD_CACHE => Command::Cache { offset, len },
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset,
            len,
            fua,
            may_trim: h.flags & NBD_CMD_FLAG_NO_HOLE == 0,
            fast: h.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
        },
        NBD_CMD_BLOCK_STATUS => {
            if !p.base_allocation {
                return Err(reject(NBD_EINVAL, "no metadata context was negotiated"));
            }
            // Every descriptor must have a nonzero length, so an empty range
            // has no valid answer.
            if len == 0 {
                return Err(reject(NBD_EINVAL, "zero-length block status request"));
            }
            Command::BlockStatus {
                offset,
                len,
                req_one: h.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            }
        }
        _ => unreachable!("command types were matched above"),
    })
}

// ---- Transmission replies ---------------------------------------------------

/// Append a simple reply header (no data).
pub fn encode_simple_reply(out: &mut Vec<u8>, errno: u32, handle: u64) {
    out.extend_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// Append a structured reply chunk header.
pub fn encode_chunk_header(out: &mut Vec<u8>, flags: u16, typ: u16, handle: u64, len: u32) {
    out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Truncate an error message to what the protocol allows, at a char boundary.
pub fn truncate_message(msg: &str) -> &str {
    if msg.len() <= MAX_STRING_LEN {
        return msg;
    }
    let mut end = MAX_STRING_LEN;
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    &msg[..end]
}

/// Append a final `NBD_REPLY_TYPE_ERROR` chunk.
pub fn encode_error_chunk(out: &mut Vec<u8>, handle: u64, errno: u32, msg: &str) {
    let msg = truncate_message(msg);
    // msg.len() <= 4096, so both conversions are lossless.
    let mlen = msg.len() as u16;
    encode_chunk_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        handle,
        6 + u32::from(mlen),
    );
    out.extend_from_slice(&errno.to_be_bytes());
    out.extend_from_slice(&mlen.to_be_bytes());
    out.extend_from_slice(msg.as_bytes());
}

/// Append a final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    handle: u64,
    context_id: u32,
    extents: &[(u32, u32)],
) {
    let len = 4 + 8 * extents.len().min(MAX_BLOCK_STATUS_EXTENTS);
    encode_chunk_header(
        out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_BLOCK_STATUS,
        handle,
        len as u32,
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(l, f) in extents.iter().take(MAX_BLOCK_STATUS_EXTENTS) {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

/// Turn a device's `block_status` answer into protocol-valid descriptors for
/// the request `[offset, offset+len)`:
/// zero-length extents are dropped, the total is clipped to `len`, flags are
/// masked to the `base:allocation` bits, boundaries are rounded to `min_block`
/// (a block straddling two extents gets the flags both agree on), adjacent
/// equal extents are merged, and the count is capped (one for `req_one`).
///
/// Never returns an empty list: if the device reported nothing usable, a
/// single extent of the whole range with status 0 ("allocated, contents
/// unknown") is returned, which the spec allows for any region.
pub fn normalize_extents(
    raw: &[(u64, u32)],
    len: u32,
    min_block: u32,
    req_one: bool,
) -> Vec<(u32, u32)> {
    let len = u64::from(len);
    let mb = u64::from(min_block.max(1));
    let max_out = if req_one { 1 } else { MAX_BLOCK_STATUS_EXTENTS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut emitted_end = 0u64; // relative end of what is in `out`
    // Flags of a partially covered block [emitted_end, emitted_end + mb).
    let mut partial: Option<u32> = None;
    let mut pos = 0u64;

    let emit = |out: &mut Vec<(u32, u32)>, end: u64, flags: u32, emitted_end: &mut u64| -> bool {
        let l = end - *emitted_end;
        match out.last_mut() {
            Some(last) if last.1 == flags => {
                // Sum stays <= len <= u32::MAX.
                last.0 = (u64::from(last.0) + l) as u32;
            }
            _ => {
                if out.len() >= max_out {
                    return false;
                }
                out.push((l as u32, flags));
            }
        }
        *emitted_end = end;
        true
    };

    'outer: for &(elen, eflags) in raw {
        if pos >= len {
            break;
        }
        if elen == 0 {
            continue;
        }
        let flags = eflags & (NBD_STATE_HOLE | NBD_STATE_ZERO);
        let end = pos.saturating_add(elen).min(len);
        let mut p = pos;
        if !p.is_multiple_of(mb) {
            // Inside a block that started in an earlier extent.
            let acc = partial.unwrap_or(flags) & flags;
            let boundary = (p / mb + 1) * mb;
            if end < boundary {
                partial = Some(acc);
                pos = end;
                continue;
            }
            partial = None;
            if !emit(&mut out, boundary, acc, &mut emitted_end) {
                break 'outer;
            }
            p = boundary;
        }
        let aligned_end = end / mb * mb;
        if aligned_end > p {
            if !emit(&mut out, aligned_end, flags, &mut emitted_end) {
                break 'outer;
            }
            p = aligned_end;
        }
        if p < end {
            partial = Some(flags);
        }
        pos = end;
    }
    // A final partial block is only complete if it reaches the end of the
    // request (possible when the export size is not a multiple of min_block).
    if let Some(flags) = partial
        && pos == len
        && emitted_end < len
    {
        let _ = emit(&mut out, len, flags, &mut emitted_end);
    }
    if req_one {
        out.truncate(1);
    }
    if out.is_empty() {
        out.push((len as u32, 0));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> TransmissionParams {
        TransmissionParams {
            size: 1 << 20,
            read_only: false,
            structured_replies: true,
            base_allocation: true,
            min_block: 512,
            max_payload: 65536,
            max_buffered: 65536,
        }
    }

    fn hdr(typ: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            typ,
            handle: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_header_roundtrip() {
        let mut b = [0u8; 28];
        b[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        b[6..8].copy_from_slice(&NBD_CMD_WRITE.to_be_bytes());
        b[8..16].copy_from_slice(&0xdead_beefu64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let h = parse_request_header(&b).unwrap();
        assert_eq!(
            h,
            hdr(NBD_CMD_WRITE, 1, 4096, 512).clone_with_handle(0xdead_beef)
        );
        assert_eq!(h.payload_len(), 512);
        b[0] = 0;
        assert!(parse_request_header(&b).is_err());
    }

    impl RequestHeader {
        fn clone_with_handle(mut self, handle: u64) -> Self {
            self.handle = handle;
            self
        }
    }

    #[test]
    fn request_validation() {
        let p = params();
        assert_eq!(
            decode_request(&hdr(NBD_CMD_READ, 0, 0, 512), &p),
            Ok(Command::Read {
                offset: 0,
                len: 512
            })
        );
        // Unknown command and flags.
        assert_eq!(
            decode_request(&hdr(99, 0, 0, 0), &p).unwrap_err().errno,
            NBD_EINVAL
        );
        assert_eq!(
            decode_request(&hdr(NBD_CMD_READ, 1 << 9, 0, 512), &p)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        assert_eq!(
            decode_request(&hdr(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 512), &p)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        // Past the end: EINVAL for reads, ENOSPC for writes; overflow too.
        assert_eq!(
            decode_request(&hdr(NBD_CMD_READ, 0, 1 << 20, 512), &p)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        assert_eq!(
            decode_request(&hdr(NBD_CMD_WRITE, 0, 1 << 20, 512), &p)
                .unwrap_err()
                .errno,
            NBD_ENOSPC
        );
        assert_eq!(
            decode_request(&hdr(NBD_CMD_READ, 0, u64::MAX - 100, 512), &p)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        // Misaligned.
        assert_eq!(
            decode_request(&hdr(NBD_CMD_READ, 0, 1, 512), &p)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        assert_eq!(
            decode_request(&hdr(NBD_CMD_TRIM, 0, 0, 100), &p)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        // Oversized.
        let e = decode_request(&hdr(NBD_CMD_WRITE, 0, 0, 1 << 17), &p).unwrap_err();
        assert!(e.disconnect);
        let e = decode_request(&hdr(NBD_CMD_READ, 0, 0, 1 << 17), &p).unwrap_err();
        assert!(!e.disconnect);
        // Read-only.
        let ro = TransmissionParams {
            read_only: true,
            ..p
        };
        assert_eq!(
            decode_request(&hdr(NBD_CMD_WRITE, 0, 0, 512), &ro)
                .unwrap_err()
                .errno,
            NBD_EPERM
        );
        assert_eq!(
            decode_request(&hdr(NBD_CMD_WRITE_ZEROES, 0, 0, 512), &ro)
                .unwrap_err()
                .errno,
            NBD_EPERM
        );
        // Block status needs a context.
        let nometa = TransmissionParams {
            base_allocation: false,
            ..p
        };
        assert_eq!(
            decode_request(&hdr(NBD_CMD_BLOCK_STATUS, 0, 0, 512), &nometa)
                .unwrap_err()
                .errno,
            NBD_EINVAL
        );
        assert_eq!(
            decode_request(
                &hdr(
                    NBD_CMD_WRITE_ZEROES,
                    NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                    512,
                    512
                ),
                &p
            ),
            Ok(Command::WriteZeroes {
                offset: 512,
                len: 512,
                fua: false,
                may_trim: false,
                fast: true
            })
        );
        assert_eq!(
            decode_request(&hdr(NBD_CMD_DISC, 0, 5, 5), &p),
            Ok(Command::Disconnect)
        );
    }

    fn info_payload(name: &[u8], reqs: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(name.len() as u32).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }

    #[test]
    fn option_parsing() {
        let go = parse_option(NBD_OPT_GO, &info_payload(b"disk", &[NBD_INFO_BLOCK_SIZE])).unwrap();
        assert_eq!(
            go,
            ClientOption::Go(InfoRequest {
                name: "disk".into(),
                requests: vec![NBD_INFO_BLOCK_SIZE]
            })
        );
        let mut bad = info_payload(b"disk", &[1]);
        bad.push(0);
        assert!(parse_option(NBD_OPT_INFO, &bad).is_err());
        assert!(parse_option(NBD_OPT_INFO, &info_payload(b"a\0b", &[])).is_err());
        assert!(parse_option(NBD_OPT_INFO, &[0xff, 0xff, 0xff, 0xff, 0, 0]).is_err());
        assert!(parse_option(NBD_OPT_LIST, b"x").is_err());
        assert_eq!(parse_option(NBD_OPT_ABORT, b"x"), Ok(ClientOption::Abort));
        assert_eq!(
            parse_option(1234, b"x"),
            Ok(ClientOption::Unsupported(1234))
        );

        let mut meta = Vec::new();
        meta.extend_from_slice(&4u32.to_be_bytes());
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            meta.extend_from_slice(&(q.len() as u32).to_be_bytes());
            meta.extend_from_slice(q.as_bytes());
        }
        match parse_option(NBD_OPT_SET_META_CONTEXT, &meta).unwrap() {
            ClientOption::SetMetaContext(m) => {
                assert_eq!(m.export, "disk");
                assert_eq!(m.queries.len(), 2);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(parse_option(NBD_OPT_SET_META_CONTEXT, &meta[..meta.len() - 1]).is_err());
    }

    #[test]
    fn option_header_limits() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&NBD_OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(
            parse_option_header(&b),
            Err(HandshakeViolation::OptionTooLong { .. })
        ));
        b[12..16].copy_from_slice(&10u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                code: NBD_OPT_GO,
                len: 10
            })
        );
        b[0] = b'X';
        assert!(matches!(
            parse_option_header(&b),
            Err(HandshakeViolation::BadOptionMagic(_))
        ));
        assert!(parse_client_flags(4).is_err());
        assert!(parse_client_flags(3).unwrap().no_zeroes);
    }

    #[test]
    fn extents_basic() {
        // Unaligned device answer rounded to 512-byte blocks.
        let raw = [(100, 3), (924, 0), (1024, 3)];
        assert_eq!(
            normalize_extents(&raw, 2048, 512, false),
            vec![(1024, 0), (1024, 3)]
        );
        assert_eq!(
            normalize_extents(&raw, 2048, 1, false),
            vec![(100, 3), (924, 0), (1024, 3)]
        );
        assert_eq!(normalize_extents(&raw, 2048, 1, true), vec![(100, 3)]);
        // Nothing usable: whole range, status 0.
        assert_eq!(normalize_extents(&[], 4096, 512, false), vec![(4096, 0)]);
        assert_eq!(
            normalize_extents(&[(0, 1)], 4096, 512, false),
            vec![(4096, 0)]
        );
        // Clipped to the request and merged.
        assert_eq!(
            normalize_extents(&[(4096, 3), (u64::MAX, 3)], 8192, 512, false),
            vec![(8192, 3)]
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn request_parsing_is_total(bytes in proptest::collection::vec(any::<u8>(), 28),
                                    size in any::<u64>(), ro in any::<bool>(), sr in any::<bool>(),
                                    ba in any::<bool>(), mb_shift in 0u32..17, max in any::<u32>()) {
            let buf: [u8; 28] = bytes.try_into().unwrap();
            let mut buf = buf;
            if ba { buf[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes()); }
            if let Ok(h) = parse_request_header(&buf) {
                let p = TransmissionParams { size, read_only: ro, structured_replies: sr, base_allocation: ba,
                                             min_block: 1 << mb_shift, max_payload: max, max_buffered: max };
                match decode_request(&h, &p) {
                    Ok(cmd) => {
                        let (off, len) = match cmd {
                            Command::Read { offset, len } | Command::Write { offset, len, .. }
                            | Command::Trim { offset, len, .. } | Command::Cache { offset, len }
                            | Command::WriteZeroes { offset, len, .. } | Command::BlockStatus { offset, len, .. } => (offset, len),
                            Command::Disconnect | Command::Flush => (0, 0),
                        };
                        prop_assert!(off.checked_add(u64::from(len)).is_some_and(|e| e <= size) || matches!(cmd, Command::Disconnect | Command::Flush));
                        if let Command::BlockStatus { len, .. } = cmd { prop_assert!(len > 0); }
                        if cmd.is_write() { prop_assert!(!ro); }
                    }
                    Err(e) => { prop_assert!(e.errno != 0); }
                }
            }
        }

        #[test]
        fn option_parsing_is_total(code in 0u32..16, data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_option(code, &data);
            let mut hdr = [0u8; 16];
            for (i, b) in data.iter().take(16).enumerate() { hdr[i] = *b; }
            let _ = parse_option_header(&hdr);
        }

        #[test]
        fn extents_are_valid(raw in proptest::collection::vec((0u64..5000, 0u32..8), 0..20),
                             blocks in 1u32..32, mb_shift in 0u32..10, req_one in any::<bool>()) {
            let mb = 1u32 << mb_shift;
            let len = blocks * mb;
            let out = normalize_extents(&raw, len, mb, req_one);
            prop_assert!(!out.is_empty());
            if req_one { prop_assert_eq!(out.len(), 1); }
            let mut total = 0u64;
            for &(l, f) in &out {
                prop_assert!(l > 0);
                prop_assert_eq!(l % mb, 0);
                prop_assert_eq!(f & !3, 0);
                total += u64::from(l);
            }
            prop_assert!(total <= u64::from(len));
        }
    }
}
