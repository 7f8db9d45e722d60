//! A small synchronous client for the API, for the CLI and for tests.
//!
//! It speaks just enough HTTP/1.1, by hand, over a `UnixStream` or
//! `TcpStream`: one request per connection (`Connection: close`), bodies
//! framed by `Content-Length` only. That is all the server ever sends, and a
//! strict parser that refuses anything else fails loudly instead of
//! misreading a response. Every socket operation has a timeout, so a wedged
//! daemon cannot hang the CLI forever.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{ErrorBody, ErrorKind};
use crate::routes::{self, escape};
use crate::types::{
    AddPoolRequest, Allocation, CacheInfo, CheckResult, CleanResult, CloneRequest, CopyRequest,
    CreateSnapshotRequest, CreateVolumeRequest, Diff, DiffExtent, FlattenReport, IoList, JobInfo,
    JobList, MoveRequest, PinInfo, PinList, PinRequest, PoolInfo, PoolList, PoolStatus, QosLimits,
    ReplicaList, ReplicaRequest, ReplicaStatus, ResizeVolumeRequest, ScheduleInfo, ScheduleList,
    ScheduleRequest, SharedVolumeStatus, SnapshotInfo, SnapshotList, VolumeInfo, VolumeList,
};
use crate::{MAX_DATA_BYTES, MAX_JSON_BODY_BYTES};

/// How long a connect, or one read or write on the socket, may take by
/// default. Generous: a flush or a cleaner pass on a slow disk takes a while.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest status or header line accepted in a response.
const MAX_LINE_BYTES: usize = 8 << 10;
/// Most header lines accepted in a response.
const MAX_HEADERS: usize = 64;
/// Largest response body accepted: a full data read plus slack; JSON
/// answers (an allocation map, a long volume list) stay far below.
const MAX_RESPONSE_BODY_BYTES: usize = MAX_DATA_BYTES + (1 << 20);

/// What went wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket. The connect error is kept but not
    /// chained as a source: "no such file" would only distract from the fix.
    #[error("no vpool daemon at {}: start one with `vpool serve`", socket.display())]
    NoDaemon { socket: PathBuf, reason: io::Error },
    #[error("cannot connect to the vpool API at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to the vpool daemon ({context}): {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed response from the vpool daemon: {0}")]
    Protocol(String),
    /// The daemon answered with an error body.
    #[error("{message}")]
    Api {
        status: u16,
        kind: ErrorKind,
        message: String,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl ClientError {
    /// The API's error kind, if the daemon answered with one.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> ClientError {
    move |source| ClientError::Io { context, source }
}

/// A response as received, for callers that want the status and body as
/// they are (tests of error handling do).
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The error body, if this is an error response carrying one.
    pub fn error_body(&self) -> Option<ErrorBody> {
        serde_json::from_slice(&self.body).ok()
    }
}

#[derive(Clone, Debug)]
enum Endpoint {
    Unix(PathBuf),
    Tcp {
        addrs: Vec<SocketAddr>,
        shown: String,
    },
}

/// A client of one daemon. Cheap to clone; holds no connection between calls.
#[derive(Clone, Debug)]
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
    timeout: Duration,
    /// The pool that pool-level calls and bare volume names address
    /// (`None`: the daemon's default pool). A `POOL/VOLUME` name always
    /// says its own pool.
    pool: Option<String>,
}

impl Client {
    /// A client of the daemon listening on the Unix socket at `path`.
    pub fn unix(path: impl AsRef<Path>) -> Client {
        Client {
            endpoint: Endpoint::Unix(path.as_ref().to_path_buf()),
            token: None,
            timeout: DEFAULT_TIMEOUT,
            pool: None,
        }
    }

    /// A client of a daemon's TCP listener, sending `token` as a bearer token.
    pub fn tcp(
        addr: impl ToSocketAddrs + std::fmt::Display,
        token: &str,
    ) -> Result<Client, ClientError> {
        let shown = addr.to_string();
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| ClientError::Connect {
                addr: shown.clone(),
                source,
            })?
            .collect();
        if addrs.is_empty() {
            return Err(ClientError::Invalid(format!(
                "{shown} resolves to no address"
            )));
        }
        let token = token.trim();
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClientError::Invalid(
                "the API token must be printable ASCII without spaces".into(),
            ));
        }
        Ok(Client {
            endpoint: Endpoint::Tcp { addrs, shown },
            token: Some(token.to_string()),
            timeout: DEFAULT_TIMEOUT,
            pool: None,
        })
    }

    /// Sets the connect/read/write timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The same client, addressing pool `pool` for pool-level calls and
    /// bare volume names (`None`: the daemon's default pool).
    pub fn in_pool(mut self, pool: Option<&str>) -> Client {
        self.pool = pool.map(str::to_string);
        self
    }

    /// `name` with this client's pool in front when it names none.
    fn qualify(&self, name: &str) -> String {
        match (&self.pool, name.contains('/')) {
            (Some(p), false) => format!("{p}/{name}"),
            _ => name.to_string(),
        }
    }

    /// A pool-level path of this client's pool.
    fn at_pool(&self, pattern: &str) -> String {
        routes::pool_path(pattern, self.pool.as_deref())
    }

    // ----- the pools of the host -----

    /// Every pool the daemon holds.
    pub fn list_pools(&self) -> Result<Vec<PoolStatus>, ClientError> {
        let l: PoolList = self.json_call("GET", routes::POOLS, None::<&()>)?;
        Ok(l.pools)
    }

    /// Adds a pool to the daemon (see [`AddPoolRequest`]).
    pub fn add_pool(&self, req: &AddPoolRequest) -> Result<PoolStatus, ClientError> {
        self.json_call("POST", routes::POOLS, Some(req))
    }

    /// Closes pool `name` and forgets it (its data stays); `force`: even
    /// while NBD clients have its volumes open.
    pub fn detach_pool(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let path = format!("{}?force={force}", routes::pool_detach(name));
        self.empty_call("POST", &path, &[])
    }

    /// Opens pool `name` again (`force`: take a pool on S3 over).
    pub fn open_pool(&self, name: &str, force: bool) -> Result<PoolStatus, ClientError> {
        let path = format!("{}?force={force}", routes::pool_open(name));
        self.json_call("POST", &path, None::<&()>)
    }

    // ----- pool -----

    pub fn pool_info(&self) -> Result<PoolInfo, ClientError> {
        self.json_call("GET", &self.at_pool(routes::POOL), None::<&()>)
    }

    /// Checks the whole pool (`repair`: trims damaged volume ranges). Reads
    /// every segment: give the client a timeout to match the pool's size.
    pub fn pool_check(&self, repair: bool) -> Result<CheckResult, ClientError> {
        let path = format!("{}?repair={repair}", self.at_pool(routes::POOL_CHECK));
        self.json_call("POST", &path, None::<&()>)
    }

    pub fn flush(&self) -> Result<(), ClientError> {
        self.empty_call("POST", &self.at_pool(routes::FLUSH), &[])
    }

    pub fn clean(&self) -> Result<CleanResult, ClientError> {
        self.json_call("POST", &self.at_pool(routes::POOL_CLEAN), None::<&()>)
    }

    pub fn checkpoint(&self) -> Result<(), ClientError> {
        self.empty_call("POST", &self.at_pool(routes::POOL_CHECKPOINT), &[])
    }

    // ----- the host cache (pools on S3) -----

    /// The cache's figures; `not_supported` on a local pool.
    pub fn cache_stats(&self) -> Result<CacheInfo, ClientError> {
        self.json_call("GET", &self.at_pool(routes::CACHE), None::<&()>)
    }

    /// The pins, in the order they were made.
    pub fn cache_pins(&self) -> Result<Vec<PinInfo>, ClientError> {
        let l: PinList = self.json_call("GET", &self.at_pool(routes::CACHE_PINS), None::<&()>)?;
        Ok(l.pins)
    }

    /// Keeps `volume` (`POOL/VOLUME` or `VOLUME`, or its `snapshot`)
    /// resident in the cache.
    pub fn pin(&self, volume: &str, snapshot: Option<&str>) -> Result<PinInfo, ClientError> {
        let volume = self.qualify(volume);
        let (pool, bare) = routes::split_pool(&volume);
        let req = PinRequest {
            volume: bare.to_string(),
            snapshot: snapshot.map(str::to_string),
        };
        let path = routes::pool_path(routes::CACHE_PINS, pool);
        self.json_call("POST", &path, Some(&req))
    }

    /// Removes the pin of `volume` (or of its `snapshot`).
    pub fn unpin(&self, volume: &str, snapshot: Option<&str>) -> Result<(), ClientError> {
        let path = routes::cache_pin(&self.qualify(volume), snapshot);
        self.empty_call("DELETE", &path, &[])
    }

    // ----- volumes -----

    pub fn list_volumes(&self) -> Result<Vec<VolumeInfo>, ClientError> {
        let path = routes::volumes(self.pool.as_deref());
        let l: VolumeList = self.json_call("GET", &path, None::<&()>)?;
        Ok(l.volumes)
    }

    /// The volumes of a pool with, for a shared pool, every volume's
    /// owner.
    pub fn list_volumes_full(&self) -> Result<VolumeList, ClientError> {
        let path = routes::volumes(self.pool.as_deref());
        self.json_call("GET", &path, None::<&()>)
    }

    /// Who owns volume `name` of a shared pool (`POOL/VOLUME`).
    pub fn volume_owner(&self, name: &str) -> Result<SharedVolumeStatus, ClientError> {
        let path = routes::volume_owner(&self.qualify(name));
        self.json_call("GET", &path, None::<&()>)
    }

    /// Makes this host the owner of volume `name` of a shared pool
    /// (`force`: without waiting for the owner's lease to expire; it is
    /// fenced). Waits up to a minute for an expiry: give the client a
    /// timeout to match.
    pub fn takeover_volume(
        &self,
        name: &str,
        force: bool,
    ) -> Result<SharedVolumeStatus, ClientError> {
        let path = format!(
            "{}?force={force}",
            routes::volume_takeover(&self.qualify(name))
        );
        self.json_call("POST", &path, None::<&()>)
    }

    /// Gives volume `name` of a shared pool up (`force`: even with NBD
    /// clients).
    pub fn release_volume(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let path = format!(
            "{}?force={force}",
            routes::volume_release(&self.qualify(name))
        );
        self.empty_call("POST", &path, &[])
    }

    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo, ClientError> {
        self.create_volume_with(name, size_bytes, false)
    }

    /// Creates a volume; an `ephemeral` one is deleted when its last NBD
    /// client disconnects, or when the daemon next starts.
    pub fn create_volume_with(
        &self,
        name: &str,
        size_bytes: u64,
        ephemeral: bool,
    ) -> Result<VolumeInfo, ClientError> {
        self.create_volume_durable(name, size_bytes, ephemeral, None)
    }

    /// [`Client::create_volume_with`], and for a shared pool's volume its
    /// own `durability` (`host` or `remote`).
    pub fn create_volume_durable(
        &self,
        name: &str,
        size_bytes: u64,
        ephemeral: bool,
        durability: Option<&str>,
    ) -> Result<VolumeInfo, ClientError> {
        let name = self.qualify(name);
        let (pool, bare) = routes::split_pool(&name);
        let req = CreateVolumeRequest {
            name: bare.to_string(),
            size_bytes,
            ephemeral,
            durability: durability.map(str::to_string),
        };
        self.json_call("POST", &routes::volumes(pool), Some(&req))
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo, ClientError> {
        self.json_call("GET", &routes::volume(&self.qualify(name)), None::<&()>)
    }

    /// `force`: shrink even while NBD clients write to the volume.
    pub fn resize_volume(
        &self,
        name: &str,
        size_bytes: u64,
        allow_shrink: bool,
        force: bool,
    ) -> Result<VolumeInfo, ClientError> {
        let req = ResizeVolumeRequest {
            size_bytes,
            allow_shrink,
            force,
        };
        self.json_call("PATCH", &routes::volume(&self.qualify(name)), Some(&req))
    }

    /// Marks `name` as being imported into (incomplete until
    /// [`Client::end_import`]). `force`: even under NBD writers.
    /// Returns the NBD export through which the importer writes it (see
    /// [`crate::types::ImportBegun`]); `None` from a daemon older than that
    /// (it answers 204), which takes the data through the API only.
    pub fn begin_import(&self, name: &str, force: bool) -> Result<Option<String>, ClientError> {
        let path = format!(
            "{}?force={force}",
            routes::volume_import(&self.qualify(name))
        );
        let resp = self.checked("POST", &path, None)?;
        if resp.body.is_empty() {
            return Ok(None);
        }
        let b: crate::types::ImportBegun = serde_json::from_slice(&resp.body).map_err(|e| {
            ClientError::Protocol(format!(
                "POST {path}: response is not the expected JSON: {e}"
            ))
        })?;
        Ok(Some(b.nbd_export))
    }

    /// The import into `name` is done: the daemon flushes and unmarks it.
    pub fn end_import(&self, name: &str) -> Result<(), ClientError> {
        self.empty_call("DELETE", &routes::volume_import(&self.qualify(name)), &[])
    }

    /// `force`: delete even while NBD clients write to the volume.
    pub fn delete_volume(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let path = format!("{}?force={force}", routes::volume(&self.qualify(name)));
        self.empty_call("DELETE", &path, &[])
    }

    // ----- snapshots, templates, clones -----

    pub fn create_snapshot(&self, volume: &str, name: &str) -> Result<SnapshotInfo, ClientError> {
        let req = CreateSnapshotRequest {
            name: name.to_string(),
        };
        self.json_call(
            "POST",
            &routes::volume_snapshots(&self.qualify(volume)),
            Some(&req),
        )
    }

    /// The volume's snapshots, oldest first.
    /// The snapshot list with the volume's own exclusive bytes.
    pub fn list_snapshots_full(&self, volume: &str) -> Result<SnapshotList, ClientError> {
        self.json_call(
            "GET",
            &routes::volume_snapshots(&self.qualify(volume)),
            None::<&()>,
        )
    }

    pub fn list_snapshots(&self, volume: &str) -> Result<Vec<SnapshotInfo>, ClientError> {
        let l: SnapshotList = self.json_call(
            "GET",
            &routes::volume_snapshots(&self.qualify(volume)),
            None::<&()>,
        )?;
        Ok(l.snapshots)
    }

    pub fn snapshot_info(&self, volume: &str, name: &str) -> Result<SnapshotInfo, ClientError> {
        self.json_call(
            "GET",
            &routes::snapshot(&self.qualify(volume), name),
            None::<&()>,
        )
    }

    pub fn delete_snapshot(&self, volume: &str, name: &str) -> Result<(), ClientError> {
        self.empty_call(
            "DELETE",
            &routes::snapshot(&self.qualify(volume), name),
            &[],
        )
    }

    /// Makes `volume` equal to its snapshot `name`. Refused while NBD
    /// clients have the volume open for writing, unless `force`.
    pub fn rollback(
        &self,
        volume: &str,
        name: &str,
        force: bool,
    ) -> Result<VolumeInfo, ClientError> {
        let path = format!(
            "{}?force={force}",
            routes::snapshot_rollback(&self.qualify(volume), name)
        );
        self.json_call("POST", &path, None::<&()>)
    }

    /// Seals `volume` as a template (read-only from then on).
    pub fn make_template(&self, volume: &str) -> Result<VolumeInfo, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_template(&self.qualify(volume)),
            None::<&()>,
        )
    }

    /// Creates `new_name` as a clone of `volume@snapshot`, or of template
    /// `volume` when `snapshot` is `None`.
    pub fn clone_volume(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        new_name: &str,
    ) -> Result<VolumeInfo, ClientError> {
        // A clone lives in its source's pool: `POOL/NEW` must name that one.
        let source = self.qualify(volume);
        let (pool, _) = routes::split_pool(&source);
        let (new_pool, new_bare) = routes::split_pool(new_name);
        if new_pool.is_some() && new_pool != pool {
            return Err(ClientError::Invalid(format!(
                "a clone is made in its source's pool: {new_name} is not in the pool of {source}"
            )));
        }
        let req = CloneRequest {
            name: new_bare.to_string(),
            snapshot: snapshot.map(str::to_string),
        };
        self.json_call("POST", &routes::volume_clone(&source), Some(&req))
    }

    /// Starts copying `volume` (`POOL/NAME` or `NAME`), or its
    /// `snapshot`, into `to` (`POOL/NAME`, or `NAME` in the same pool):
    /// a job, whose id the answer has.
    pub fn copy_volume(
        &self,
        volume: &str,
        snapshot: Option<&str>,
        to: &str,
        max_rate_bytes_per_sec: Option<u64>,
    ) -> Result<JobInfo, ClientError> {
        let req = CopyRequest {
            to: to.to_string(),
            snapshot: snapshot.map(str::to_string),
            max_rate_bytes_per_sec,
        };
        self.json_call(
            "POST",
            &routes::volume_copy(&self.qualify(volume)),
            Some(&req),
        )
    }

    /// Starts moving `volume` (`POOL/NAME` or `NAME`) as `req` says,
    /// while its clients run: a job.
    pub fn move_volume(&self, volume: &str, req: &MoveRequest) -> Result<JobInfo, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_move(&self.qualify(volume)),
            Some(req),
        )
    }

    /// Starts replicating `volume` (`POOL/NAME` or `NAME`) as `req` says;
    /// its first run starts at once.
    pub fn add_replica(
        &self,
        volume: &str,
        req: &ReplicaRequest,
    ) -> Result<ReplicaStatus, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_replica(&self.qualify(volume)),
            Some(req),
        )
    }

    /// The replication of `volume`.
    pub fn replica(&self, volume: &str) -> Result<ReplicaStatus, ClientError> {
        self.json_call(
            "GET",
            &routes::volume_replica(&self.qualify(volume)),
            None::<&()>,
        )
    }

    /// Every replication of the daemon.
    pub fn replicas(&self) -> Result<ReplicaList, ClientError> {
        self.json_call("GET", routes::REPLICAS, None::<&()>)
    }

    /// Stops replicating `volume` (the replica stays, with its points).
    pub fn remove_replica(&self, volume: &str) -> Result<(), ClientError> {
        self.empty_call(
            "DELETE",
            &routes::volume_replica(&self.qualify(volume)),
            &[],
        )
    }

    /// Starts a replication run of `volume` now: a job.
    pub fn run_replica(&self, volume: &str) -> Result<JobInfo, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_replica_run(&self.qualify(volume)),
            None::<&()>,
        )
    }

    /// Starts comparing the newest point of `volume`'s replication on both
    /// sides: a job.
    pub fn verify_replica(&self, volume: &str) -> Result<JobInfo, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_replica_verify(&self.qualify(volume)),
            None::<&()>,
        )
    }

    /// Moves `volume` to its pool's trash (deleted for good `expire_secs`
    /// later, if given); its trash entry.
    pub fn trash_volume(
        &self,
        volume: &str,
        expire_secs: Option<u64>,
    ) -> Result<crate::types::TrashEntry, ClientError> {
        let mut path = routes::volume_trash(&self.qualify(volume));
        if let Some(s) = expire_secs {
            path.push_str(&format!("?expire_secs={s}"));
        }
        self.json_call("POST", &path, None::<&()>)
    }

    /// The volumes in the trash of this client's pool.
    pub fn trash_list(&self) -> Result<Vec<crate::types::TrashEntry>, ClientError> {
        let l: crate::types::TrashList =
            self.json_call("GET", &self.at_pool(routes::TRASH), None::<&()>)?;
        Ok(l.trash)
    }

    /// Takes volume `id` out of the trash, as `name` (default: its old
    /// name); the volume.
    pub fn trash_restore(&self, id: u64, name: Option<&str>) -> Result<VolumeInfo, ClientError> {
        let path = routes::trash_restore(self.pool.as_deref(), id);
        let req = crate::types::RestoreRequest {
            name: name.map(str::to_string),
        };
        self.json_call("POST", &path, Some(&req))
    }

    /// Deletes volume `id` of the trash for good; what it was.
    pub fn trash_remove(&self, id: u64) -> Result<crate::types::TrashEntry, ClientError> {
        let path = routes::trash_entry(self.pool.as_deref(), id);
        self.json_call("DELETE", &path, None::<&()>)
    }

    /// Deletes what went to the trash at least `older_than_secs` ago.
    pub fn trash_purge(
        &self,
        older_than_secs: u64,
    ) -> Result<crate::types::PurgeReport, ClientError> {
        let req = crate::types::PurgeRequest { older_than_secs };
        self.json_call("POST", &self.at_pool(routes::TRASH_PURGE), Some(&req))
    }

    /// Renames `volume` to `new_name` (in its pool); the volume.
    pub fn rename_volume(&self, volume: &str, new_name: &str) -> Result<VolumeInfo, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_rename(&self.qualify(volume)),
            Some(&crate::types::RenameRequest {
                new_name: new_name.to_string(),
            }),
        )
    }

    /// Lets several NBD clients write `volume` at once (`enabled`), or one
    /// at a time; the volume.
    pub fn set_multi_writer(&self, volume: &str, enabled: bool) -> Result<VolumeInfo, ClientError> {
        self.json_call(
            "PUT",
            &routes::volume_multi_writer(&self.qualify(volume)),
            Some(&crate::types::MultiWriterRequest { enabled }),
        )
    }

    /// Sets (empty: clears) the QoS limits of `volume`; the volume.
    pub fn set_qos(&self, volume: &str, limits: &QosLimits) -> Result<VolumeInfo, ClientError> {
        self.json_call(
            "PUT",
            &routes::volume_qos(&self.qualify(volume)),
            Some(limits),
        )
    }

    /// Makes replica `volume` a volume of its own, at its newest point.
    pub fn promote(&self, volume: &str) -> Result<VolumeInfo, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_promote(&self.qualify(volume)),
            None::<&()>,
        )
    }

    /// Adds a snapshot schedule.
    pub fn add_schedule(&self, req: &ScheduleRequest) -> Result<ScheduleInfo, ClientError> {
        let req = ScheduleRequest {
            volume: self.qualify(&req.volume),
            ..req.clone()
        };
        self.json_call("POST", routes::SCHEDULES, Some(&req))
    }

    /// The daemon's snapshot schedules.
    pub fn schedules(&self) -> Result<ScheduleList, ClientError> {
        self.json_call("GET", routes::SCHEDULES, None::<&()>)
    }

    /// Removes schedule `id` (its snapshots stay).
    pub fn remove_schedule(&self, id: u64) -> Result<(), ClientError> {
        self.empty_call("DELETE", &routes::schedule(id), &[])
    }

    /// Every volume's I/O counters since the daemon started.
    pub fn io_counters(&self) -> Result<IoList, ClientError> {
        self.json_call("GET", routes::IO, None::<&()>)
    }

    /// The daemon's metrics (`GET /metrics`), as the OpenMetrics text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let resp = self.checked("GET", routes::METRICS, None)?;
        String::from_utf8(resp.body)
            .map_err(|e| ClientError::Protocol(format!("the metrics are not UTF-8: {e}")))
    }

    /// The daemon's jobs: running, and the latest finished ones.
    pub fn jobs(&self) -> Result<JobList, ClientError> {
        self.json_call("GET", routes::JOBS, None::<&()>)
    }

    /// Job `id`.
    pub fn job(&self, id: u64) -> Result<JobInfo, ClientError> {
        self.json_call("GET", &routes::job(id), None::<&()>)
    }

    /// Asks job `id` to stop; its state then.
    pub fn cancel_job(&self, id: u64) -> Result<JobInfo, ClientError> {
        self.json_call("POST", &routes::job_cancel(id), None::<&()>)
    }

    /// Detaches clone `volume` from what it was cloned from.
    pub fn flatten(&self, volume: &str) -> Result<FlattenReport, ClientError> {
        self.json_call(
            "POST",
            &routes::volume_flatten(&self.qualify(volume)),
            None::<&()>,
        )
    }

    /// Merges clone `volume` into its parent volume; returns the parent.
    pub fn commit(&self, volume: &str, force: bool) -> Result<VolumeInfo, ClientError> {
        let path = format!(
            "{}?force={force}",
            routes::volume_commit(&self.qualify(volume))
        );
        self.json_call("POST", &path, None::<&()>)
    }

    /// One page of the diff between two images of `volume` (`None` = the
    /// volume now), from byte `offset` on.
    pub fn diff_page(
        &self,
        volume: &str,
        from: Option<&str>,
        to: Option<&str>,
        offset: u64,
    ) -> Result<Diff, ClientError> {
        let mut path = format!(
            "{}?offset={offset}",
            routes::volume_diff(&self.qualify(volume))
        );
        if let Some(f) = from {
            path.push_str(&format!("&from={}", escape(f)));
        }
        if let Some(t) = to {
            path.push_str(&format!("&to={}", escape(t)));
        }
        self.json_call("GET", &path, None::<&()>)
    }

    /// The whole diff, every page joined (`next_offset` is then `None`).
    pub fn diff(
        &self,
        volume: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<Diff, ClientError> {
        let mut d = self.diff_page(volume, from, to, 0)?;
        while let Some(next) = d.next_offset {
            let page = self.diff_page(volume, from, to, next)?;
            if page.offset != next || (page.extents.is_empty() && page.next_offset.is_some()) {
                return Err(ClientError::Protocol(format!(
                    "diff page at {next} does not advance"
                )));
            }
            append_extents(&mut d.extents, page.extents);
            d.next_offset = page.next_offset;
        }
        Ok(d)
    }

    // ----- data -----

    /// Writes `data` (at most [`MAX_DATA_BYTES`]) at `offset`. Not durable
    /// until [`Client::flush`].
    /// `force`: write even while NBD clients write to the volume.
    pub fn write(
        &self,
        name: &str,
        offset: u64,
        data: &[u8],
        force: bool,
    ) -> Result<(), ClientError> {
        if data.len() > MAX_DATA_BYTES {
            return Err(ClientError::Invalid(format!(
                "a write carries at most {MAX_DATA_BYTES} bytes, not {}",
                data.len()
            )));
        }
        let path = format!(
            "{}?offset={offset}&force={force}",
            routes::volume_data(&self.qualify(name))
        );
        self.empty_call("PUT", &path, data)
    }

    /// Reads `length` bytes (at most [`MAX_DATA_BYTES`]) at `offset`.
    pub fn read(&self, name: &str, offset: u64, length: usize) -> Result<Vec<u8>, ClientError> {
        self.read_image(name, None, offset, length)
    }

    /// [`Client::read`] of volume `name`, or of its snapshot `snapshot`.
    pub fn read_image(
        &self,
        name: &str,
        snapshot: Option<&str>,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>, ClientError> {
        if length > MAX_DATA_BYTES {
            return Err(ClientError::Invalid(format!(
                "a read returns at most {MAX_DATA_BYTES} bytes, not {length}"
            )));
        }
        let mut path = format!(
            "{}?offset={offset}&length={length}",
            routes::volume_data(&self.qualify(name))
        );
        if let Some(s) = snapshot {
            path.push_str(&format!("&snapshot={}", escape(s)));
        }
        let resp = self.checked("GET", &path, None)?;
        if resp.body.len() != length {
            return Err(ClientError::Protocol(format!(
                "asked for {length} bytes, got {}",
                resp.body.len()
            )));
        }
        Ok(resp.body)
    }

    /// Makes `[offset, offset + length)` read as zeros; with `unmap`, whole
    /// blocks are freed.
    /// `force`: zero even while NBD clients write to the volume.
    pub fn zero(
        &self,
        name: &str,
        offset: u64,
        length: u64,
        unmap: bool,
        force: bool,
    ) -> Result<(), ClientError> {
        let path = format!(
            "{}?offset={offset}&length={length}&unmap={unmap}&force={force}",
            routes::volume_zero(&self.qualify(name))
        );
        self.empty_call("POST", &path, &[])
    }

    /// The allocation state of a prefix of `[offset, offset + length)`; see
    /// [`Allocation`].
    pub fn allocation(
        &self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Allocation, ClientError> {
        self.allocation_of(name, None, offset, length)
    }

    /// [`Client::allocation`] of volume `name`, or of its snapshot.
    pub fn allocation_of(
        &self,
        name: &str,
        snapshot: Option<&str>,
        offset: u64,
        length: u64,
    ) -> Result<Allocation, ClientError> {
        let mut path = format!(
            "{}?offset={offset}&length={length}",
            routes::volume_allocation(&self.qualify(name))
        );
        if let Some(s) = snapshot {
            path.push_str(&format!("&snapshot={}", escape(s)));
        }
        self.json_call("GET", &path, None::<&()>)
    }

    // ----- plumbing -----

    fn json_call<T: DeserializeOwned, B: Serialize>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let bytes = match body {
            Some(b) => Some(
                serde_json::to_vec(b)
                    .map_err(|e| ClientError::Invalid(format!("encoding the request: {e}")))?,
            ),
            None => None,
        };
        if bytes
            .as_ref()
            .is_some_and(|b| b.len() > MAX_JSON_BODY_BYTES)
        {
            return Err(ClientError::Invalid("request body too large".into()));
        }
        let resp = self.checked(
            method,
            path,
            bytes.as_deref().map(|b| ("application/json", b)),
        )?;
        serde_json::from_slice(&resp.body).map_err(|e| {
            ClientError::Protocol(format!(
                "{method} {path}: response is not the expected JSON: {e}"
            ))
        })
    }

    fn empty_call(&self, method: &str, path: &str, body: &[u8]) -> Result<(), ClientError> {
        let ct = if body.is_empty() {
            None
        } else {
            Some(("application/octet-stream", body))
        };
        self.checked(method, path, ct).map(|_| ())
    }

    /// Sends a request; a non-2xx answer becomes [`ClientError::Api`].
    fn checked(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<RawResponse, ClientError> {
        let resp = self.request(method, path, body)?;
        if (200..300).contains(&resp.status) {
            return Ok(resp);
        }
        match resp.error_body() {
            Some(b) => Err(ClientError::Api {
                status: resp.status,
                kind: b.error.kind,
                message: b.error.message,
            }),
            None => Err(ClientError::Api {
                status: resp.status,
                kind: ErrorKind::Unknown,
                message: format!(
                    "HTTP {} from the daemon: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
                ),
            }),
        }
    }

    /// Sends one request as given and returns the response whatever its
    /// status. `body` is `(content type, bytes)`.
    pub fn request(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<RawResponse, ClientError> {
        let mut head = Vec::with_capacity(256);
        self.write_head(&mut head, method, path_and_query, body)?;
        let payload = body.map(|(_, b)| b).unwrap_or(&[]);
        match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = UnixStream::connect(path).map_err(|source| {
                    if matches!(
                        source.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) {
                        ClientError::NoDaemon {
                            socket: path.clone(),
                            reason: source,
                        }
                    } else {
                        ClientError::Connect {
                            addr: path.display().to_string(),
                            source,
                        }
                    }
                })?;
                stream
                    .set_read_timeout(Some(self.timeout))
                    .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
                    .map_err(io_err("setting socket timeouts"))?;
                exchange(stream, &head, payload)
            }
            Endpoint::Tcp { addrs, shown } => {
                let mut last = None;
                let mut stream = None;
                for a in addrs {
                    match TcpStream::connect_timeout(a, self.timeout) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let stream = stream.ok_or_else(|| ClientError::Connect {
                    addr: shown.clone(),
                    source: last.unwrap_or_else(|| io::Error::other("no address to connect to")),
                })?;
                stream
                    .set_read_timeout(Some(self.timeout))
                    .and_then(|()| stream.set_write_timeout(Some(self.timeout)))
                    .map_err(io_err("setting socket timeouts"))?;
                // Requests are small and answered at once: do not let Nagle
                // hold back the tail of a request.
                stream
                    .set_nodelay(true)
                    .map_err(io_err("setting TCP_NODELAY"))?;
                exchange(stream, &head, payload)
            }
        }
    }

    fn write_head(
        &self,
        out: &mut Vec<u8>,
        method: &str,
        path_and_query: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<(), ClientError> {
        let token_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !token_ok(method) || !path_and_query.starts_with('/') || !token_ok(path_and_query) {
            return Err(ClientError::Invalid(format!(
                "bad request line {method:?} {path_and_query:?}"
            )));
        }
        let len = body.map(|(_, b)| b.len()).unwrap_or(0);
        // `write!` to a Vec cannot fail.
        let _ = write!(
            out,
            "{method} {path_and_query} HTTP/1.1\r\nHost: vpool\r\nUser-Agent: vpool-client/{}\r\nAccept: application/json\r\nConnection: close\r\nContent-Length: {len}\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some((ct, _)) = body {
            if ct.is_empty() || !ct.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return Err(ClientError::Invalid(format!("bad content type {ct:?}")));
            }
            let _ = write!(out, "Content-Type: {ct}\r\n");
        }
        if let Some(t) = &self.token {
            let _ = write!(out, "Authorization: Bearer {t}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Ok(())
    }
}

/// Appends a page of diff extents, merging a range split at the page
/// boundary back into one.
fn append_extents(into: &mut Vec<DiffExtent>, page: Vec<DiffExtent>) {
    for e in page {
        match into.last_mut() {
            Some(l) if l.kind == e.kind && l.offset + l.length == e.offset => l.length += e.length,
            _ => into.push(e),
        }
    }
}

/// Writes the request and reads the response on a fresh connection.
fn exchange<S: Read + Write>(
    mut stream: S,
    head: &[u8],
    body: &[u8],
) -> Result<RawResponse, ClientError> {
    let sent = stream
        .write_all(head)
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush());
    if let Err(e) = sent {
        // The server may answer early and close, e.g. 413 for an over-limit
        // body; that answer says more than the broken pipe does.
        return match read_response(&mut stream) {
            Ok(r) => Ok(r),
            Err(_) => Err(ClientError::Io {
                context: "sending the request",
                source: e,
            }),
        };
    }
    read_response(&mut stream)
}

fn read_response<S: Read>(stream: S) -> Result<RawResponse, ClientError> {
    let mut r = BufReader::new(stream);
    let status_line = read_line(&mut r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let code = parts.next().unwrap_or_default();
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(ClientError::Protocol(format!(
            "bad status line {status_line:?}"
        )));
    }
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..600).contains(c))
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let line = read_line(&mut r)?;
        if line.is_empty() {
            break;
        }
        if headers.len() == MAX_HEADERS {
            return Err(ClientError::Protocol(format!(
                "more than {MAX_HEADERS} headers"
            )));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| ClientError::Protocol(format!("bad header line {line:?}")))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    if headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && !v.eq_ignore_ascii_case("identity"))
    {
        return Err(ClientError::Protocol(
            "chunked responses are not supported by this client".into(),
        ));
    }
    let mut lengths = headers.iter().filter(|(n, _)| n == "content-length");
    let length = match (lengths.next(), lengths.next()) {
        (Some((_, v)), None) => Some(
            v.parse::<usize>()
                .map_err(|_| ClientError::Protocol(format!("bad Content-Length {v:?}")))?,
        ),
        (None, _) => None,
        (Some(_), Some(_)) => {
            return Err(ClientError::Protocol("two Content-Length headers".into()));
        }
    };
    let no_body = status == 204 || status == 304 || (100..200).contains(&status);
    let body = match (no_body, length) {
        (true, _) => Vec::new(),
        (false, Some(n)) => {
            if n > MAX_RESPONSE_BODY_BYTES {
                return Err(ClientError::Protocol(format!(
                    "response body of {n} bytes is too large"
                )));
            }
            let mut body = vec![0u8; n];
            r.read_exact(&mut body)
                .map_err(io_err("reading the response body"))?;
            body
        }
        (false, None) => {
            // Framed by the end of the connection (we asked it to close).
            let mut body = Vec::new();
            r.by_ref()
                .take(MAX_RESPONSE_BODY_BYTES as u64 + 1)
                .read_to_end(&mut body)
                .map_err(io_err("reading the response body"))?;
            if body.len() > MAX_RESPONSE_BODY_BYTES {
                return Err(ClientError::Protocol("response body is too large".into()));
            }
            body
        }
    };
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

/// One CRLF-terminated line, without the CRLF.
fn read_line<R: BufRead>(r: &mut R) -> Result<String, ClientError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(MAX_LINE_BYTES as u64 + 2)
        .read_until(b'\n', &mut line)
        .map_err(io_err("reading the response"))?;
    if n == 0 {
        return Err(ClientError::Protocol(
            "the daemon closed the connection without answering".into(),
        ));
    }
    if !line.ends_with(b"\r\n") {
        return Err(ClientError::Protocol(if line.len() > MAX_LINE_BYTES {
            "response line too long".into()
        } else {
            "response line not terminated by CRLF".into()
        }));
    }
    line.truncate(line.len() - 2);
    String::from_utf8(line)
        .map_err(|_| ClientError::Protocol("response header is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response() {
        let raw =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 2\r\n\r\n{}";
        let r = read_response(&raw[..]).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.body, b"{}");
    }

    #[test]
    fn no_content_has_no_body() {
        let raw = b"HTTP/1.1 204 No Content\r\n\r\n";
        let r = read_response(&raw[..]).unwrap();
        assert_eq!(r.status, 204);
        assert!(r.body.is_empty());
    }

    #[test]
    fn refuses_malformed_responses() {
        for raw in [
            &b""[..],
            b"garbage\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno-colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        ] {
            assert!(
                read_response(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn body_until_close_without_length() {
        let raw = b"HTTP/1.1 200 OK\r\n\r\nhello";
        assert_eq!(read_response(&raw[..]).unwrap().body, b"hello");
    }

    #[test]
    fn missing_socket_says_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let err = Client::unix(&sock).pool_info().unwrap_err();
        assert!(matches!(err, ClientError::NoDaemon { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("no vpool daemon at") && msg.contains("vpool serve"),
            "{msg}"
        );
    }
}
