//! Where the CLI reaches the daemon's NBD server, for the commands that
//! move data over NBD rather than the API (`vol bench`, `vol import`):
//! its Unix socket in the home, else its TCP listener.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use vpool_api::Client;
use vpool_nbd::client::Client as NbdClient;

/// How long one NBD request may take before the CLI gives up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's NBD server.
#[derive(Clone, Debug)]
pub enum NbdTarget {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl NbdTarget {
    /// The NBD server of the daemon whose home is `home` (reached through
    /// `client`): its Unix socket if it is there, else its TCP listener.
    pub fn find(client: &Client, home: &Path) -> anyhow::Result<NbdTarget> {
        let socket = crate::cli::absolute(home).join(crate::daemon::NBD_SOCKET_NAME);
        if socket.exists() {
            return Ok(NbdTarget::Unix(socket));
        }
        match client.pool_info()?.nbd_tcp_addr {
            Some(addr) => Ok(NbdTarget::Tcp(addr)),
            None => anyhow::bail!(
                "no NBD socket at {} and the daemon serves no NBD on TCP",
                socket.display()
            ),
        }
    }

    /// A connection to `export`.
    pub fn connect(&self, export: &str) -> anyhow::Result<NbdClient> {
        let c = match self {
            NbdTarget::Unix(p) => NbdClient::connect_unix(p, export, REQUEST_TIMEOUT),
            NbdTarget::Tcp(a) => NbdClient::connect_tcp(&a.to_string(), export, REQUEST_TIMEOUT),
        };
        c.with_context(|| format!("opening export {export} over NBD"))
    }

    /// `export` for QEMU in its JSON form (any socket path, any QEMU), raw.
    pub fn qemu_json(&self, export: &str) -> String {
        let server = match self {
            NbdTarget::Unix(p) => {
                serde_json::json!({"type": "unix", "path": p.to_string_lossy()})
            }
            NbdTarget::Tcp(a) => {
                serde_json::json!({"type": "inet", "host": a.ip().to_string(), "port": a.port().to_string()})
            }
        };
        let spec = serde_json::json!({
            "driver": "raw",
            "file": {"driver": "nbd", "server": server, "export": export},
        });
        format!("json:{spec}")
    }
}

/// Export `export` in the pool of volume `volume` (`POOL/VOLUME` or a bare
/// `VOLUME` of the default pool).
pub fn in_pool_of(volume: &str, export: &str) -> String {
    match vpool_service::names::split_pool(volume) {
        (Some(pool), _) => format!("{pool}/{export}"),
        (None, _) => export.to_string(),
    }
}
