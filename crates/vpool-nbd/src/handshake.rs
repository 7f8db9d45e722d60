//! The fixed-newstyle handshake (option haggling).
//!
//! [`negotiate`] runs over any `Read + Write` stream, so it serves TCP and Unix
//! sockets alike, is the place a TLS upgrade will hook in (see
//! [`TlsMode`](crate::TlsMode)), and can be driven by a fuzzer with an
//! in-memory stream. Message decoding is in [`crate::wire`].
//!
//! Supported options: `EXPORT_NAME`, `ABORT`, `LIST`, `STARTTLS` (refused with
//! `NBD_REP_ERR_POLICY`), `INFO`, `GO` (with `NBD_INFO_EXPORT`, `NAME`,
//! `DESCRIPTION`, `BLOCK_SIZE`), `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (`base:allocation`). Everything else gets
//! `NBD_REP_ERR_UNSUP` (including `EXTENDED_HEADERS`).

use std::io::{self, Read, Write};
use std::sync::Arc;

use tracing::debug;

use crate::config::ServerConfig;
use crate::device::{BlockDevice, DeviceError, DeviceErrorKind, ExportRegistry, Opener};
use crate::proto::*;
use crate::wire::{self, ClientOption, HandshakeViolation, InfoRequest, TransmissionParams};

/// The outcome of a successful handshake.
pub struct Negotiated {
    /// The export name the client asked for.
    pub export_name: String,
    pub device: Arc<dyn BlockDevice>,
    pub params: TransmissionParams,
    /// Transmission flags sent to the client.
    pub flags: u16,
}

impl std::fmt::Debug for Negotiated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Negotiated")
            .field("export_name", &self.export_name)
            .field("params", &self.params)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

/// Why a handshake ended without entering transmission.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client closed the connection, or a socket error/timeout.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    /// A protocol violation that forces a hard disconnect.
    #[error("protocol violation: {0}")]
    Violation(#[from] HandshakeViolation),
    /// `NBD_OPT_EXPORT_NAME` for an export that could not be opened (the
    /// option has no error reply, so the session ends).
    #[error("NBD_OPT_EXPORT_NAME {name:?} failed: {error}")]
    ExportName { name: String, error: String },
    /// The client sent more than [`MAX_OPTIONS_PER_HANDSHAKE`] options.
    #[error("too many options")]
    TooManyOptions,
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE` and sent an option
    /// other than `NBD_OPT_EXPORT_NAME`, which plain newstyle cannot answer.
    #[error("option {0} sent without fixed newstyle")]
    NotFixedNewstyle(u32),
    /// The client sent `NBD_OPT_ABORT`.
    #[error("client aborted the handshake")]
    Aborted,
    /// The server is shutting down.
    #[error("server is shutting down")]
    Shutdown,
}

/// Transmission flags for a device.
pub fn transmission_flags(dev: &dyn BlockDevice, structured: bool) -> u16 {
    let mut f = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_CACHE;
    if dev.read_only() {
        f |= NBD_FLAG_READ_ONLY;
    } else {
        // Zeroing is a metadata operation for vpool volumes and MemDevice, so
        // fast-zero requests can always succeed.
        f |= NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_TRIM
            | NBD_FLAG_SEND_WRITE_ZEROES
            | NBD_FLAG_SEND_FAST_ZERO;
    }
    if structured {
        // Reads are always answered with a single data chunk.
        f |= NBD_FLAG_SEND_DF;
    }
    if dev.can_multi_conn() {
        f |= NBD_FLAG_CAN_MULTI_CONN;
    }
    f
}

fn open_error_reply(e: &DeviceError) -> u32 {
    match e.kind {
        DeviceErrorKind::NotFound => NBD_REP_ERR_UNKNOWN,
        DeviceErrorKind::ReadOnly => NBD_REP_ERR_POLICY,
        DeviceErrorKind::Invalid => NBD_REP_ERR_INVALID,
        DeviceErrorKind::NotSupported => NBD_REP_ERR_UNSUP,
        DeviceErrorKind::Io | DeviceErrorKind::NoSpace | DeviceErrorKind::Overflow => {
            NBD_REP_ERR_UNKNOWN
        }
    }
}

struct State<'a> {
    cfg: &'a ServerConfig,
    registry: &'a dyn ExportRegistry,
    opener: &'a Opener,
    structured: bool,
    /// Export named in the last successful `NBD_OPT_SET_META_CONTEXT`, and
    /// whether it selected `base:allocation`.
    meta: Option<(String, bool)>,
    out: Vec<u8>,
}

impl State<'_> {
    fn reply(&mut self, option: u32, reply_type: u32, payload: &[u8]) {
        wire::encode_option_reply(&mut self.out, option, reply_type, payload);
    }

    fn error(&mut self, option: u32, reply_type: u32, msg: &str) {
        debug!(option, reply_type, msg, "option refused");
        self.reply(option, reply_type, wire::truncate_message(msg).as_bytes());
    }

    fn params_for(&self, name: &str, dev: &dyn BlockDevice) -> TransmissionParams {
        let base_allocation = self.structured && matches!(&self.meta, Some((n, true)) if n == name);
        TransmissionParams {
            size: dev.size_bytes(),
            read_only: dev.read_only(),
            structured_replies: self.structured,
            base_allocation,
            min_block: self.cfg.min_block_size,
            max_payload: self.cfg.max_block_size,
            max_buffered: self.cfg.max_request_bytes,
        }
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`; returns the device on success.
    fn info(&mut self, option: u32, req: &InfoRequest) -> Option<Arc<dyn BlockDevice>> {
        let dev = match self.registry.open_by(&req.name, self.opener) {
            Ok(d) => d,
            Err(e) => {
                self.error(option, open_error_reply(&e), &e.message);
                return None;
            }
        };
        let flags = transmission_flags(dev.as_ref(), self.structured);
        let mut p = Vec::with_capacity(32);
        p.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
        p.extend_from_slice(&dev.size_bytes().to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        self.reply(option, NBD_REP_INFO, &p);
        if req.wants(NBD_INFO_NAME) {
            p.clear();
            p.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
            p.extend_from_slice(wire::truncate_message(&req.name).as_bytes());
            self.reply(option, NBD_REP_INFO, &p);
        }
        if req.wants(NBD_INFO_DESCRIPTION)
            && let Some(desc) = self.registry.description(&req.name)
        {
            p.clear();
            p.extend_from_slice(&NBD_INFO_DESCRIPTION.to_be_bytes());
            p.extend_from_slice(wire::truncate_message(&desc).as_bytes());
            self.reply(option, NBD_REP_INFO, &p);
        }
        // Always sent: harmless to clients that did not ask, and required for
        // those that did when constraints differ from the defaults.
        p.clear();
        p.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&self.cfg.min_block_size.to_be_bytes());
        p.extend_from_slice(&self.cfg.preferred_block_size.to_be_bytes());
        p.extend_from_slice(&self.cfg.max_block_size.to_be_bytes());
        self.reply(option, NBD_REP_INFO, &p);
        self.reply(option, NBD_REP_ACK, &[]);
        Some(dev)
    }

    fn meta_context_reply(&mut self, option: u32, id: u32) {
        let mut p = Vec::with_capacity(4 + BASE_ALLOCATION.len());
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(BASE_ALLOCATION.as_bytes());
        self.reply(option, NBD_REP_META_CONTEXT, &p);
    }
}

/// Read exactly `buf.len()` bytes.
fn read_full<S: Read>(s: &mut S, buf: &mut [u8]) -> io::Result<()> {
    s.read_exact(buf)
}

/// Run the server side of the handshake. Returns the negotiated export when
/// the client enters transmission (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`).
///
/// `shutting_down` is polled between options; once it returns true, further
/// options are refused with `NBD_REP_ERR_SHUTDOWN`.
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    registry: &dyn ExportRegistry,
    opener: &Opener,
    cfg: &ServerConfig,
    shutting_down: &dyn Fn() -> bool,
) -> Result<Negotiated, HandshakeError> {
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting)?;
    stream.flush()?;

    let mut b4 = [0u8; 4];
    read_full(stream, &mut b4)?;
    let client = wire::parse_client_flags(u32::from_be_bytes(b4))?;

    let mut st = State {
        cfg,
        registry,
        opener,
        structured: false,
        meta: None,
        out: Vec::with_capacity(256),
    };
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS_PER_HANDSHAKE {
        let mut hdr = [0u8; 16];
        read_full(stream, &mut hdr)?;
        let h = wire::parse_option_header(&hdr)?;
        // h.len <= MAX_OPTION_LEN (64 KiB), checked by parse_option_header.
        data.resize(h.len as usize, 0);
        read_full(stream, &mut data)?;

        if !client.fixed_newstyle && h.code != NBD_OPT_EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(h.code));
        }
        st.out.clear();
        let parsed = wire::parse_option(h.code, &data);
        if shutting_down() && !matches!(parsed, Ok(ClientOption::Abort)) {
            if h.code == NBD_OPT_EXPORT_NAME {
                return Err(HandshakeError::Shutdown);
            }
            st.error(h.code, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
            stream.write_all(&st.out)?;
            continue;
        }
        let mut done: Option<Negotiated> = None;
        match parsed {
            Err(e) => {
                if h.code == NBD_OPT_EXPORT_NAME {
                    return Err(HandshakeError::ExportName {
                        name: String::new(),
                        error: e.to_string(),
                    });
                }
                st.error(h.code, e.reply_type(), e.message());
            }
            Ok(ClientOption::ExportName(name)) => {
                let dev =
                    registry
                        .open_by(&name, opener)
                        .map_err(|e| HandshakeError::ExportName {
                            name: name.clone(),
                            error: e.to_string(),
                        })?;
                let flags = transmission_flags(dev.as_ref(), st.structured);
                st.out.extend_from_slice(&dev.size_bytes().to_be_bytes());
                st.out.extend_from_slice(&flags.to_be_bytes());
                if !client.no_zeroes {
                    st.out.extend_from_slice(&[0u8; 124]);
                }
                let params = st.params_for(&name, dev.as_ref());
                done = Some(Negotiated {
                    export_name: name,
                    device: dev,
                    params,
                    flags,
                });
            }
            Ok(ClientOption::Abort) => {
                st.reply(h.code, NBD_REP_ACK, &[]);
                // The client may already have closed; the ACK is best effort.
                let _ = stream.write_all(&st.out);
                let _ = stream.flush();
                return Err(HandshakeError::Aborted);
            }
            Ok(ClientOption::List) => {
                let mut p = Vec::new();
                for e in registry.list() {
                    p.clear();
                    let name = wire::truncate_message(&e.name);
                    p.extend_from_slice(&(name.len() as u32).to_be_bytes());
                    p.extend_from_slice(name.as_bytes());
                    p.extend_from_slice(wire::truncate_message(&e.description).as_bytes());
                    st.reply(h.code, NBD_REP_SERVER, &p);
                }
                st.reply(h.code, NBD_REP_ACK, &[]);
            }
            Ok(ClientOption::StartTls) => match cfg.tls {
                crate::config::TlsMode::Disabled => {
                    st.error(
                        h.code,
                        NBD_REP_ERR_POLICY,
                        "TLS is not enabled on this server",
                    );
                }
            },
            Ok(ClientOption::Info(req)) => {
                let _ = st.info(h.code, &req);
            }
            Ok(ClientOption::Go(req)) => {
                if let Some(dev) = st.info(h.code, &req) {
                    let flags = transmission_flags(dev.as_ref(), st.structured);
                    let params = st.params_for(&req.name, dev.as_ref());
                    done = Some(Negotiated {
                        export_name: req.name,
                        device: dev,
                        params,
                        flags,
                    });
                }
            }
            Ok(ClientOption::StructuredReply) => {
                st.structured = true;
                st.reply(h.code, NBD_REP_ACK, &[]);
            }
            Ok(ClientOption::ListMetaContext(m)) => {
                if !st.structured {
                    st.error(
                        h.code,
                        NBD_REP_ERR_INVALID,
                        "structured replies must be negotiated first",
                    );
                } else {
                    let all = m.queries.is_empty();
                    if all
                        || m.queries
                            .iter()
                            .any(|q| wire::query_selects_base_allocation(q, true))
                    {
                        st.meta_context_reply(h.code, 0);
                    }
                    st.reply(h.code, NBD_REP_ACK, &[]);
                }
            }
            Ok(ClientOption::SetMetaContext(m)) => {
                // Replaces the selection even when it fails.
                st.meta = None;
                if !st.structured {
                    st.error(
                        h.code,
                        NBD_REP_ERR_INVALID,
                        "structured replies must be negotiated first",
                    );
                } else {
                    let sel = m
                        .queries
                        .iter()
                        .any(|q| wire::query_selects_base_allocation(q, false));
                    if sel {
                        st.meta_context_reply(h.code, BASE_ALLOCATION_ID);
                    }
                    st.meta = Some((m.export, sel));
                    st.reply(h.code, NBD_REP_ACK, &[]);
                }
            }
            Ok(ClientOption::Unsupported(code)) => {
                st.error(code, NBD_REP_ERR_UNSUP, "option not supported");
            }
        }
        stream.write_all(&st.out)?;
        stream.flush()?;
        if let Some(n) = done {
            return Ok(n);
        }
    }
    Err(HandshakeError::TooManyOptions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::{MemDevice, MemRegistry};

    /// Reads from a script, records writes.
    struct Scripted {
        input: io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Scripted {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Scripted {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn opt(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn registry() -> MemRegistry {
        let r = MemRegistry::new();
        r.insert("disk", "a disk", Arc::new(MemDevice::new(1 << 20)));
        r
    }

    fn run(input: Vec<u8>) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let r = registry();
        let mut s = Scripted {
            input: io::Cursor::new(input),
            output: Vec::new(),
        };
        let opener = Opener {
            client: crate::ClientKey::Unknown,
            peer: "test".into(),
        };
        let res = negotiate(&mut s, &r, &opener, &ServerConfig::default(), &|| false);
        (res, s.output)
    }

    /// Split option replies after the 18-byte greeting: (option, type, payload).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut c = wire::Cursor::new(&out[18..]);
        let mut v = Vec::new();
        while c.remaining() >= 20 {
            assert_eq!(c.u64(), Some(OPT_REPLY_MAGIC));
            let o = c.u32().unwrap();
            let t = c.u32().unwrap();
            let l = c.u32().unwrap() as usize;
            v.push((o, t, c.take(l).unwrap().to_vec()));
        }
        v
    }

    #[test]
    fn go_with_structured_and_meta() {
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(opt(NBD_OPT_STRUCTURED_REPLY, &[]));
        let mut meta = 4u32.to_be_bytes().to_vec();
        meta.extend_from_slice(b"disk");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        input.extend(opt(NBD_OPT_SET_META_CONTEXT, &meta));
        input.extend(opt(99, b"junk"));
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"disk");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&NBD_INFO_NAME.to_be_bytes());
        go.extend_from_slice(&NBD_INFO_DESCRIPTION.to_be_bytes());
        input.extend(opt(NBD_OPT_GO, &go));
        let (res, out) = run(input);
        let n = res.unwrap();
        assert!(n.params.structured_replies && n.params.base_allocation);
        assert_eq!(n.params.size, 1 << 20);
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            vec![
                NBD_REP_ACK,
                NBD_REP_META_CONTEXT,
                NBD_REP_ACK,
                NBD_REP_ERR_UNSUP,
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_INFO,
                NBD_REP_ACK
            ]
        );
    }

    #[test]
    fn unknown_export_and_bad_input() {
        let mut input = 1u32.to_be_bytes().to_vec();
        let mut go = 4u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"nope");
        go.extend_from_slice(&0u16.to_be_bytes());
        input.extend(opt(NBD_OPT_GO, &go));
        input.extend(opt(NBD_OPT_LIST, b"x"));
        input.extend(opt(NBD_OPT_STARTTLS, &[]));
        input.extend(opt(NBD_OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]));
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"nope"));
        let (res, out) = run(input);
        assert!(matches!(res, Err(HandshakeError::ExportName { .. })));
        let types: Vec<u32> = replies(&out).iter().map(|x| x.1).collect();
        assert_eq!(
            types,
            vec![
                NBD_REP_ERR_UNKNOWN,
                NBD_REP_ERR_INVALID,
                NBD_REP_ERR_POLICY,
                NBD_REP_ERR_INVALID
            ]
        );

        let (res, _) = run(vec![0, 0, 0, 8]);
        assert!(matches!(res, Err(HandshakeError::Violation(_))));
        let (res, _) = run(vec![0, 0, 0]);
        assert!(matches!(res, Err(HandshakeError::Io(_))));
    }

    #[test]
    fn export_name_legacy() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(opt(NBD_OPT_EXPORT_NAME, b"disk"));
        let (res, out) = run(input);
        assert!(res.is_ok());
        assert_eq!(out.len(), 18 + 8 + 2 + 124);
    }
}
