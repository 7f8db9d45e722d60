//! The device side of the server: what an export must implement.
//!
//! [`BlockDevice`] is a byte-addressed device with the operations NBD can ask
//! for; [`ExportRegistry`] maps export names to devices. Both are plain
//! blocking traits: the server calls them from its connection threads (see
//! the crate docs for the threading model), so an implementation may block on
//! disk or network I/O, but should keep the common case fast because short
//! requests are executed inline on the thread that reads the socket.

use std::fmt;
use std::sync::Arc;

use crate::limits::ClientKey;
use crate::proto;

/// Category of a device failure; decides which NBD errno the client sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceErrorKind {
    /// Generic I/O failure (`NBD_EIO`).
    Io,
    /// Out of space, quota exceeded, file too big (`NBD_ENOSPC`).
    NoSpace,
    /// Invalid argument, e.g. an unaligned or out-of-range request (`NBD_EINVAL`).
    Invalid,
    /// Write to something read-only (`NBD_EPERM`).
    ReadOnly,
    /// Value too large (`NBD_EOVERFLOW`).
    Overflow,
    /// Operation not supported (`NBD_ENOTSUP` for fast-zero requests, `NBD_EINVAL` elsewhere,
    /// since the protocol reserves `ENOTSUP` for `NBD_CMD_FLAG_FAST_ZERO`).
    NotSupported,
    /// Returned by [`ExportRegistry::open`] for an export that does not exist
    /// (`NBD_REP_ERR_UNKNOWN` during the handshake; `NBD_EIO` if ever returned by a device).
    NotFound,
}

impl DeviceErrorKind {
    /// The NBD error value for this kind in a transmission-phase reply.
    pub fn errno(self) -> u32 {
        match self {
            DeviceErrorKind::Io | DeviceErrorKind::NotFound => proto::NBD_EIO,
            DeviceErrorKind::NoSpace => proto::NBD_ENOSPC,
            DeviceErrorKind::Invalid | DeviceErrorKind::NotSupported => proto::NBD_EINVAL,
            DeviceErrorKind::ReadOnly => proto::NBD_EPERM,
            DeviceErrorKind::Overflow => proto::NBD_EOVERFLOW,
        }
    }
}

/// An error returned by a [`BlockDevice`] or [`ExportRegistry`].
///
/// The message is shown to the client (structured replies carry a string) and
/// logged, so it should be short and must not contain secrets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError {
    pub kind: DeviceErrorKind,
    pub message: String,
}

impl DeviceError {
    pub fn new(kind: DeviceErrorKind, message: impl Into<String>) -> Self {
        DeviceError {
            kind,
            message: message.into(),
        }
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::Io, message)
    }
    pub fn no_space(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::NoSpace, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::Invalid, message)
    }
    pub fn read_only(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::ReadOnly, message)
    }
    pub fn overflow(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::Overflow, message)
    }
    pub fn not_supported(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::NotSupported, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(DeviceErrorKind::NotFound, message)
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for DeviceError {}

impl From<std::io::Error> for DeviceError {
    fn from(e: std::io::Error) -> Self {
        use std::io::ErrorKind as K;
        let kind = match e.kind() {
            K::StorageFull | K::QuotaExceeded | K::FileTooLarge => DeviceErrorKind::NoSpace,
            K::InvalidInput => DeviceErrorKind::Invalid,
            K::PermissionDenied | K::ReadOnlyFilesystem => DeviceErrorKind::ReadOnly,
            K::Unsupported => DeviceErrorKind::NotSupported,
            K::NotFound => DeviceErrorKind::NotFound,
            _ => DeviceErrorKind::Io,
        };
        DeviceError::new(kind, e.to_string())
    }
}

/// A block device served over NBD.
///
/// The server validates every request before calling the device: offsets and
/// lengths are within `size_bytes()` (no overflow), aligned to the configured
/// minimum block size, and reads/writes are at most
/// [`ServerConfig::max_request_bytes`](crate::ServerConfig::max_request_bytes)
/// long. Write-type calls are never made on a device whose `read_only()` is
/// true. Calls arrive concurrently from several threads and connections.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes; fixed for the life of a connection.
    fn size_bytes(&self) -> u64;
    /// Whether the export must refuse writes (advertised as `NBD_FLAG_READ_ONLY`).
    fn read_only(&self) -> bool;
    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Write `data` at `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// durable: every write completed before this call (on ANY connection to the device) is durable on return
    fn flush(&self) -> Result<(), DeviceError>;
    /// Discard hint: the range's content becomes unspecified (zero is fine).
    fn trim(&self, offset: u64, len: u64) -> Result<(), DeviceError>;
    /// Make the range read as zeroes.
    /// may_trim = !NBD_CMD_FLAG_NO_HOLE
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), DeviceError>;
    /// base:allocation extents covering a prefix (at least one extent) of [offset, offset+len): (length, flags) with flags NBD_STATE_HOLE=1 / NBD_STATE_ZERO=2
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<(u64, u32)>, DeviceError>;
    /// NBD_CMD_CACHE hint; default Ok(())
    fn cache(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        let _ = (offset, len);
        Ok(())
    }
    /// whether flush on one connection covers writes completed on others (true for vpool volumes)
    fn can_multi_conn(&self) -> bool;
}

/// What `NBD_OPT_LIST` and `NBD_OPT_INFO` show about an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    pub description: String,
    pub size_bytes: u64,
    pub read_only: bool,
}

/// Who opens an export: the NBD client as the server knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opener {
    /// The client: one TCP address, or one process on the Unix socket
    /// (the connections of one client, `multi-conn`, share it).
    pub client: ClientKey,
    /// The connection's peer, for messages.
    pub peer: String,
}

/// Maps export names to devices.
pub trait ExportRegistry: Send + Sync + 'static {
    /// Exports shown to `NBD_OPT_LIST` (`nbdinfo --list`).
    fn list(&self) -> Vec<ExportInfo>;
    /// Called on NBD_OPT_GO/EXPORT_NAME; the returned handle is dropped when the client disconnects (used later for ephemeral volumes / open-for-write tracking). Default export name "" may map to an error or a configured default.
    ///
    /// Return a [`DeviceErrorKind::NotFound`] error for unknown names.
    ///
    /// `NBD_OPT_INFO` also calls this and drops the handle at once (as nbdkit
    /// does): the spec requires an INFO reply to match a following GO exactly,
    /// and the transmission flags depend on the device.
    fn open(&self, name: &str) -> Result<Arc<dyn BlockDevice>, DeviceError>;
    /// [`open`](Self::open) for the client `by`: what the server calls. A
    /// registry that treats clients differently (one writer per volume)
    /// overrides it.
    fn open_by(&self, name: &str, by: &Opener) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        let _ = by;
        self.open(name)
    }
    /// Description for `NBD_INFO_DESCRIPTION` on `NBD_OPT_GO`; the default
    /// takes it from [`list`](Self::list).
    fn description(&self, name: &str) -> Option<String> {
        self.list()
            .into_iter()
            .find(|e| e.name == name)
            .map(|e| e.description)
            .filter(|d| !d.is_empty())
    }
}
