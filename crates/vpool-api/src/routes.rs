//! Every route path of the API, defined once.
//!
//! The constants are the patterns the server's [`router`](crate::router)
//! matches (axum syntax: `{name}` captures one path segment). The functions
//! build the concrete paths the [`Client`](crate::Client) sends, by filling
//! a pattern's captures in order with percent-encoded names, so a path and
//! its pattern cannot drift apart. Valid names need no encoding; an invalid
//! one still makes a well-formed request line and stays one segment, and
//! the server answers it with an error rather than a wrong route.
//!
//! Query strings are not part of a route: the client writes them from the
//! fields of the query types in [`crate::types`].
//!
//! # Pools
//! A daemon holds several pools. Every pattern below that starts `/v1/`
//! addresses its default pool; the same pattern under `/v1/pools/{pool}`
//! ([`scoped`]) addresses pool `pool` (`/v1/pool` itself becomes
//! `/v1/pools/{pool}`). The builders take a volume as `POOL/VOLUME` or a
//! bare `VOLUME` (the default pool) and build the matching form, as `rbd`
//! names `POOL/IMAGE`.

/// `GET`: pool figures.
pub const POOL: &str = "/v1/pool";
/// `POST`: a cleaner pass.
pub const POOL_CLEAN: &str = "/v1/pool/clean";
/// `POST`: a checkpoint.
pub const POOL_CHECKPOINT: &str = "/v1/pool/checkpoint";
/// `POST`: check the whole pool.
pub const POOL_CHECK: &str = "/v1/pool/check";
/// `POST`: sync the log.
pub const FLUSH: &str = "/v1/flush";
/// `GET`: list; `POST`: create.
pub const VOLUMES: &str = "/v1/volumes";
/// `GET`: info; `PATCH`: resize; `DELETE`: delete. See [`volume`].
pub const VOLUME: &str = "/v1/volumes/{name}";
/// `GET`: read; `PUT`: write. See [`volume_data`].
pub const VOLUME_DATA: &str = "/v1/volumes/{name}/data";
/// `POST`: zero a range. See [`volume_zero`].
pub const VOLUME_ZERO: &str = "/v1/volumes/{name}/zero";
/// `POST`: an import begins; `DELETE`: it ended. See [`volume_import`].
pub const VOLUME_IMPORT: &str = "/v1/volumes/{name}/import";
/// `GET`: allocation map. See [`volume_allocation`].
pub const VOLUME_ALLOCATION: &str = "/v1/volumes/{name}/allocation";
/// `GET`: list; `POST`: create. See [`volume_snapshots`].
pub const VOLUME_SNAPSHOTS: &str = "/v1/volumes/{name}/snapshots";
/// `GET`: info; `DELETE`: delete. See [`snapshot`].
pub const SNAPSHOT: &str = "/v1/volumes/{name}/snapshots/{snap}";
/// `POST`: roll the volume back. See [`snapshot_rollback`].
pub const SNAPSHOT_ROLLBACK: &str = "/v1/volumes/{name}/snapshots/{snap}/rollback";
/// `POST`: seal as a template. See [`volume_template`].
pub const VOLUME_TEMPLATE: &str = "/v1/volumes/{name}/template";
/// `POST`: clone. See [`volume_clone`].
pub const VOLUME_CLONE: &str = "/v1/volumes/{name}/clone";
/// `POST`: drop the parent link. See [`volume_flatten`].
pub const VOLUME_FLATTEN: &str = "/v1/volumes/{name}/flatten";
/// `POST`: start copying into another pool (a job). See [`volume_copy`].
pub const VOLUME_COPY: &str = "/v1/volumes/{name}/copy";
/// `POST`: start moving into another pool, live (a job). See
/// [`volume_move`].
pub const VOLUME_MOVE: &str = "/v1/volumes/{name}/move";
/// `GET`: the volume's replication; `POST`: start replicating it;
/// `DELETE`: stop. See [`volume_replica`].
pub const VOLUME_REPLICA: &str = "/v1/volumes/{name}/replica";
/// `POST`: a replication run now (a job). See [`volume_replica_run`].
pub const VOLUME_REPLICA_RUN: &str = "/v1/volumes/{name}/replica/run";
/// `POST`: compare the newest point on both sides (a job). See
/// [`volume_replica_verify`].
pub const VOLUME_REPLICA_VERIFY: &str = "/v1/volumes/{name}/replica/verify";
/// `PUT`: the volume's QoS limits. See [`volume_qos`].
pub const VOLUME_QOS: &str = "/v1/volumes/{name}/qos";
/// `PUT`: whether several NBD clients may write the volume at once. See
/// [`volume_multi_writer`].
pub const VOLUME_MULTI_WRITER: &str = "/v1/volumes/{name}/multi-writer";
/// `POST`: give the volume another name. See [`volume_rename`].
pub const VOLUME_RENAME: &str = "/v1/volumes/{name}/rename";
/// `POST`: move the volume to the pool's trash. See [`volume_trash`].
pub const VOLUME_TRASH: &str = "/v1/volumes/{name}/trash";
/// `GET`: the volumes in the pool's trash.
pub const TRASH: &str = "/v1/trash";
/// `POST`: delete what went to the trash long enough ago.
pub const TRASH_PURGE: &str = "/v1/trash/purge";
/// `DELETE`: delete a volume of the trash (by id) for good. See
/// [`trash_entry`].
pub const TRASH_ENTRY: &str = "/v1/trash/{id}";
/// `POST`: take a volume (by id) out of the trash. See [`trash_restore`].
pub const TRASH_RESTORE: &str = "/v1/trash/{id}/restore";
/// `POST`: make a replica a volume of its own. See [`volume_promote`].
pub const VOLUME_PROMOTE: &str = "/v1/volumes/{name}/promote";
/// `POST`: merge into the parent. See [`volume_commit`].
pub const VOLUME_COMMIT: &str = "/v1/volumes/{name}/commit";
/// `GET`: diff between two images. See [`volume_diff`].
pub const VOLUME_DIFF: &str = "/v1/volumes/{name}/diff";
/// `GET`: who owns a volume of a shared pool. See [`volume_owner`].
pub const VOLUME_OWNER: &str = "/v1/volumes/{name}/owner";
/// `POST`: this host takes a volume of a shared pool over (`?force=true`:
/// without waiting for the owner's lease to expire). See
/// [`volume_takeover`].
pub const VOLUME_TAKEOVER: &str = "/v1/volumes/{name}/takeover";
/// `POST`: this host gives a volume of a shared pool up (`?force=true`:
/// even with NBD clients). See [`volume_release`].
pub const VOLUME_RELEASE: &str = "/v1/volumes/{name}/release";
/// `GET`: cache figures.
pub const CACHE: &str = "/v1/cache";
/// `GET`: list; `POST`: pin.
pub const CACHE_PINS: &str = "/v1/cache/pins";
/// `DELETE`: unpin; the image is `VOLUME` or `VOLUME@SNAPSHOT`. See
/// [`cache_pin`].
pub const CACHE_PIN: &str = "/v1/cache/pins/{image}";

/// `GET`: the pools the daemon holds; `POST`: add one.
pub const POOLS: &str = "/v1/pools";
/// `POST`: close a pool and forget it (its data stays).
pub const POOL_DETACH: &str = "/v1/pools/{pool}/detach";
/// `POST`: open a pool that could not be opened (`?force=true` takes a pool
/// on S3 over).
pub const POOL_OPEN: &str = "/v1/pools/{pool}/open";

/// `GET`: the daemon's jobs (running, and the latest finished ones).
pub const JOBS: &str = "/v1/jobs";
/// `GET`: one job. See [`job`].
pub const JOB: &str = "/v1/jobs/{id}";
/// `POST`: ask a job to stop. See [`job_cancel`].
pub const JOB_CANCEL: &str = "/v1/jobs/{id}/cancel";

/// `GET`: the daemon's metrics, in the OpenMetrics text format that
/// Prometheus scrapes (outside `/v1`, where Prometheus looks).
pub const METRICS: &str = "/metrics";

/// `GET`: every volume's I/O counters (`vpool vol iostat`).
pub const IO: &str = "/v1/io";

/// `GET`: every replication of the daemon.
pub const REPLICAS: &str = "/v1/replicas";
/// `GET`: the snapshot schedules; `POST`: add one.
pub const SCHEDULES: &str = "/v1/schedules";
/// `DELETE`: remove a schedule. See [`schedule`].
pub const SCHEDULE: &str = "/v1/schedules/{id}";

/// Every pattern above that addresses the default pool, and has a
/// [`scoped`] twin.
pub const ALL: &[&str] = &[
    POOL,
    POOL_CLEAN,
    POOL_CHECKPOINT,
    POOL_CHECK,
    FLUSH,
    VOLUMES,
    VOLUME,
    VOLUME_DATA,
    VOLUME_ZERO,
    VOLUME_IMPORT,
    VOLUME_ALLOCATION,
    VOLUME_SNAPSHOTS,
    SNAPSHOT,
    SNAPSHOT_ROLLBACK,
    VOLUME_TEMPLATE,
    VOLUME_CLONE,
    VOLUME_FLATTEN,
    VOLUME_COPY,
    VOLUME_MOVE,
    VOLUME_REPLICA,
    VOLUME_REPLICA_RUN,
    VOLUME_REPLICA_VERIFY,
    VOLUME_PROMOTE,
    VOLUME_QOS,
    VOLUME_MULTI_WRITER,
    VOLUME_RENAME,
    VOLUME_TRASH,
    TRASH,
    TRASH_PURGE,
    TRASH_ENTRY,
    TRASH_RESTORE,
    VOLUME_COMMIT,
    VOLUME_DIFF,
    VOLUME_OWNER,
    VOLUME_TAKEOVER,
    VOLUME_RELEASE,
    CACHE,
    CACHE_PINS,
    CACHE_PIN,
];

/// The pattern `pattern` (one of [`ALL`]) for pool `{pool}`.
pub fn scoped(pattern: &str) -> String {
    let rest = pattern
        .strip_prefix("/v1")
        .expect("every route is under /v1");
    match rest.strip_prefix("/pool") {
        Some(tail) if tail.is_empty() || tail.starts_with('/') => {
            format!("/v1/pools/{{pool}}{tail}")
        }
        _ => format!("/v1/pools/{{pool}}{rest}"),
    }
}

/// `path` (a default-pool path) for `pool`, or as it is for `None`.
pub fn in_pool(pool: Option<&str>, path: String) -> String {
    let Some(pool) = pool else {
        return path;
    };
    let rest = &path["/v1".len()..];
    match rest.strip_prefix("/pool") {
        Some(tail) if tail.is_empty() || tail.starts_with('/') || tail.starts_with('?') => {
            format!("/v1/pools/{}{tail}", escape(pool))
        }
        _ => format!("/v1/pools/{}{rest}", escape(pool)),
    }
}

/// A pool-level path (`pattern` without captures, e.g. [`POOL`]) of pool
/// `pool` (`None`: the default pool).
pub fn pool_path(pattern: &str, pool: Option<&str>) -> String {
    in_pool(pool, pattern.to_string())
}

/// `pattern` for volume `name` (`POOL/VOLUME` or `VOLUME`), its other
/// captures filled with `more`.
fn for_volume(pattern: &str, name: &str, more: &[&str]) -> String {
    let (pool, volume) = split_pool(name);
    let mut segments = vec![escape(volume)];
    segments.extend(more.iter().map(|s| escape(s)));
    let refs: Vec<&str> = segments.iter().map(String::as_str).collect();
    in_pool(pool, fill(pattern, &refs))
}

/// `POOL/NAME` as (`Some(POOL)`, `NAME`), `NAME` as (`None`, `NAME`).
pub fn split_pool(name: &str) -> (Option<&str>, &str) {
    match name.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, name),
    }
}

/// [`VOLUME_OWNER`] of `POOL/VOLUME`.
pub fn volume_owner(name: &str) -> String {
    for_volume(VOLUME_OWNER, name, &[])
}

/// [`VOLUME_TAKEOVER`] of `POOL/VOLUME`.
pub fn volume_takeover(name: &str) -> String {
    for_volume(VOLUME_TAKEOVER, name, &[])
}

/// [`VOLUME_RELEASE`] of `POOL/VOLUME`.
pub fn volume_release(name: &str) -> String {
    for_volume(VOLUME_RELEASE, name, &[])
}

/// [`POOL_DETACH`] of pool `pool`.
pub fn pool_detach(pool: &str) -> String {
    fill(POOL_DETACH, &[&escape(pool)])
}

/// [`POOL_OPEN`] of pool `pool`.
pub fn pool_open(pool: &str) -> String {
    fill(POOL_OPEN, &[&escape(pool)])
}

/// [`VOLUME`] of volume `name`.
pub fn volume(name: &str) -> String {
    for_volume(VOLUME, name, &[])
}

/// [`VOLUMES`] of pool `pool` (`None`: the default pool).
pub fn volumes(pool: Option<&str>) -> String {
    pool_path(VOLUMES, pool)
}

/// [`VOLUME_DATA`] of volume `name`.
pub fn volume_data(name: &str) -> String {
    for_volume(VOLUME_DATA, name, &[])
}

/// [`VOLUME_ZERO`] of volume `name`.
pub fn volume_zero(name: &str) -> String {
    for_volume(VOLUME_ZERO, name, &[])
}

/// [`VOLUME_IMPORT`] of volume `name`.
pub fn volume_import(name: &str) -> String {
    for_volume(VOLUME_IMPORT, name, &[])
}

/// [`VOLUME_ALLOCATION`] of volume `name`.
pub fn volume_allocation(name: &str) -> String {
    for_volume(VOLUME_ALLOCATION, name, &[])
}

/// [`VOLUME_SNAPSHOTS`] of volume `name`.
pub fn volume_snapshots(name: &str) -> String {
    for_volume(VOLUME_SNAPSHOTS, name, &[])
}

/// [`SNAPSHOT`]: snapshot `snap` of volume `volume`.
pub fn snapshot(volume: &str, snap: &str) -> String {
    for_volume(SNAPSHOT, volume, &[snap])
}

/// [`SNAPSHOT_ROLLBACK`]: rolls `volume` back to its snapshot `snap`.
pub fn snapshot_rollback(volume: &str, snap: &str) -> String {
    for_volume(SNAPSHOT_ROLLBACK, volume, &[snap])
}

/// [`VOLUME_TEMPLATE`] of volume `name`.
pub fn volume_template(name: &str) -> String {
    for_volume(VOLUME_TEMPLATE, name, &[])
}

/// [`VOLUME_CLONE`] of volume `name`.
pub fn volume_clone(name: &str) -> String {
    for_volume(VOLUME_CLONE, name, &[])
}

/// [`VOLUME_FLATTEN`] of volume `name`.
pub fn volume_flatten(name: &str) -> String {
    for_volume(VOLUME_FLATTEN, name, &[])
}

/// [`VOLUME_COPY`] of volume `name`.
pub fn volume_copy(name: &str) -> String {
    for_volume(VOLUME_COPY, name, &[])
}

/// [`VOLUME_MOVE`] of volume `name`.
pub fn volume_move(name: &str) -> String {
    for_volume(VOLUME_MOVE, name, &[])
}

/// [`VOLUME_REPLICA`] of volume `name`.
pub fn volume_replica(name: &str) -> String {
    for_volume(VOLUME_REPLICA, name, &[])
}

/// [`VOLUME_REPLICA_RUN`] of volume `name`.
pub fn volume_replica_run(name: &str) -> String {
    for_volume(VOLUME_REPLICA_RUN, name, &[])
}

/// [`VOLUME_REPLICA_VERIFY`] of volume `name`.
pub fn volume_replica_verify(name: &str) -> String {
    for_volume(VOLUME_REPLICA_VERIFY, name, &[])
}

/// [`VOLUME_QOS`] of volume `name`.
pub fn volume_qos(name: &str) -> String {
    for_volume(VOLUME_QOS, name, &[])
}

/// [`VOLUME_MULTI_WRITER`] of volume `name`.
pub fn volume_multi_writer(name: &str) -> String {
    for_volume(VOLUME_MULTI_WRITER, name, &[])
}

/// [`VOLUME_RENAME`] of volume `name`.
pub fn volume_rename(name: &str) -> String {
    for_volume(VOLUME_RENAME, name, &[])
}

/// [`VOLUME_TRASH`] of volume `name`.
pub fn volume_trash(name: &str) -> String {
    for_volume(VOLUME_TRASH, name, &[])
}

/// [`TRASH_ENTRY`] of volume `id` in the trash of `pool`.
pub fn trash_entry(pool: Option<&str>, id: u64) -> String {
    in_pool(pool, fill(TRASH_ENTRY, &[&id.to_string()]))
}

/// [`TRASH_RESTORE`] of volume `id` in the trash of `pool`.
pub fn trash_restore(pool: Option<&str>, id: u64) -> String {
    in_pool(pool, fill(TRASH_RESTORE, &[&id.to_string()]))
}

/// [`VOLUME_PROMOTE`] of volume `name`.
pub fn volume_promote(name: &str) -> String {
    for_volume(VOLUME_PROMOTE, name, &[])
}

/// [`JOB`] of job `id`.
pub fn job(id: u64) -> String {
    fill(JOB, &[&id.to_string()])
}

/// [`SCHEDULE`] of schedule `id`.
pub fn schedule(id: u64) -> String {
    fill(SCHEDULE, &[&id.to_string()])
}

/// [`JOB_CANCEL`] of job `id`.
pub fn job_cancel(id: u64) -> String {
    fill(JOB_CANCEL, &[&id.to_string()])
}

/// [`VOLUME_COMMIT`] of volume `name`.
pub fn volume_commit(name: &str) -> String {
    for_volume(VOLUME_COMMIT, name, &[])
}

/// [`VOLUME_DIFF`] of volume `name`.
pub fn volume_diff(name: &str) -> String {
    for_volume(VOLUME_DIFF, name, &[])
}

/// [`CACHE_PIN`] of `volume` (`POOL/VOLUME` or `VOLUME`), or of its
/// `snapshot`: the image segment is `VOLUME` or `VOLUME@SNAPSHOT`, each
/// name encoded, the `@` not.
pub fn cache_pin(volume: &str, snapshot: Option<&str>) -> String {
    let (pool, volume) = split_pool(volume);
    let image = match snapshot {
        Some(s) => format!("{}@{}", escape(volume), escape(s)),
        None => escape(volume),
    };
    in_pool(pool, fill(CACHE_PIN, &[&image]))
}

/// `pattern` with its captures replaced, in order, by `segments` (already
/// encoded). Every builder above passes one segment per capture (tested).
fn fill(pattern: &str, segments: &[&str]) -> String {
    let mut out =
        String::with_capacity(pattern.len() + segments.iter().map(|s| s.len()).sum::<usize>());
    let mut segments = segments.iter();
    let mut rest = pattern;
    while let Some((literal, capture)) = rest.split_once('{') {
        out.push_str(literal);
        out.push_str(segments.next().copied().unwrap_or_default());
        rest = capture.split_once('}').map_or("", |(_, tail)| tail);
    }
    out.push_str(rest);
    out
}

/// Percent-encodes all but unreserved characters, for a path segment or a
/// query value.
pub fn escape(s: &str) -> String {
    let mut p = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            p.push(b as char);
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request};
    use axum::middleware::{self, Next};
    use axum::response::Response;

    use super::*;
    use crate::{ApiState, Client, router};

    /// Percent-decoding, as the server does it.
    fn unescape(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%' {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8(out).unwrap()
    }

    /// The captures of `path` under `pattern`, decoded, or `None` if it
    /// does not match: as many segments, literals equal, captures
    /// non-empty.
    fn captures(pattern: &str, path: &str) -> Option<Vec<String>> {
        let (p, s): (Vec<&str>, Vec<&str>) =
            (pattern.split('/').collect(), path.split('/').collect());
        if p.len() != s.len() {
            return None;
        }
        let mut out = Vec::new();
        for (p, s) in p.iter().zip(&s) {
            if p.starts_with('{') && p.ends_with('}') {
                if s.is_empty() {
                    return None;
                }
                out.push(unescape(s));
            } else if p != s {
                return None;
            }
        }
        Some(out)
    }

    const ODD: &[&str] = &["web-1.a_b~", "a b/c", "x@y?z#", "100%", "ü/..", "{name}"];

    #[test]
    fn every_builder_fills_its_pattern() {
        type One = fn(&str) -> String;
        let one: &[(&str, One)] = &[
            (VOLUME, volume),
            (VOLUME_DATA, volume_data),
            (VOLUME_ZERO, volume_zero),
            (VOLUME_IMPORT, volume_import),
            (VOLUME_ALLOCATION, volume_allocation),
            (VOLUME_SNAPSHOTS, volume_snapshots),
            (VOLUME_TEMPLATE, volume_template),
            (VOLUME_CLONE, volume_clone),
            (VOLUME_FLATTEN, volume_flatten),
            (VOLUME_COPY, volume_copy),
            (VOLUME_MOVE, volume_move),
            (VOLUME_REPLICA, volume_replica),
            (VOLUME_REPLICA_RUN, volume_replica_run),
            (VOLUME_REPLICA_VERIFY, volume_replica_verify),
            (VOLUME_PROMOTE, volume_promote),
            (VOLUME_QOS, volume_qos),
            (VOLUME_MULTI_WRITER, volume_multi_writer),
            (VOLUME_RENAME, volume_rename),
            (VOLUME_TRASH, volume_trash),
            (VOLUME_COMMIT, volume_commit),
            (VOLUME_DIFF, volume_diff),
        ];
        type Two = fn(&str, &str) -> String;
        let two: &[(&str, Two)] = &[(SNAPSHOT, snapshot), (SNAPSHOT_ROLLBACK, snapshot_rollback)];
        // A volume name with `/` names its pool first (`POOL/VOLUME`).
        for &a in ODD.iter().filter(|n| !n.contains('/')) {
            for &(pattern, build) in one {
                assert_eq!(
                    captures(pattern, &build(a)),
                    Some(vec![a.to_string()]),
                    "{pattern} {a:?}"
                );
                assert_eq!(
                    captures(&scoped(pattern), &build(&format!("p q/{a}"))),
                    Some(vec!["p q".to_string(), a.to_string()]),
                    "{pattern} p q/{a:?}"
                );
            }
            for &b in ODD {
                for &(pattern, build) in two {
                    let want = vec![a.to_string(), b.to_string()];
                    assert_eq!(
                        captures(pattern, &build(a, b)),
                        Some(want),
                        "{pattern} {a:?} {b:?}"
                    );
                }
                let pin = cache_pin(a, Some(b));
                assert_eq!(
                    captures(CACHE_PIN, &pin),
                    Some(vec![format!("{a}@{b}")]),
                    "{pin}"
                );
            }
            assert_eq!(
                captures(CACHE_PIN, &cache_pin(a, None)),
                Some(vec![a.to_string()])
            );
        }
        // Valid names travel as they are.
        assert_eq!(volume_data("web-1.a_b"), "/v1/volumes/web-1.a_b/data");
        assert_eq!(
            snapshot_rollback("web1", "mon"),
            "/v1/volumes/web1/snapshots/mon/rollback"
        );
        assert_eq!(cache_pin("web1", Some("mon")), "/v1/cache/pins/web1@mon");
        assert_eq!(volume("a b"), "/v1/volumes/a%20b");
        assert_eq!(volume("cold/a b"), "/v1/pools/cold/volumes/a%20b");
        assert_eq!(pool_path(POOL, Some("cold")), "/v1/pools/cold");
        assert_eq!(pool_path(POOL_CHECK, Some("cold")), "/v1/pools/cold/check");
        assert_eq!(scoped(POOL), "/v1/pools/{pool}");
        assert_eq!(scoped(CACHE_PIN), "/v1/pools/{pool}/cache/pins/{image}");
    }

    #[test]
    fn patterns_are_distinct_and_versioned() {
        for (i, p) in ALL.iter().enumerate() {
            assert!(
                p.starts_with(crate::API_PREFIX) && p[crate::API_PREFIX.len()..].starts_with('/'),
                "{p}"
            );
            assert!(!ALL[..i].contains(p), "{p} twice");
            // Captures are whole segments.
            for seg in p.split('/') {
                assert!(
                    !seg.contains('{') || (seg.starts_with('{') && seg.ends_with('}')),
                    "{p}"
                );
            }
        }
    }

    /// One request as the router saw it.
    #[derive(Clone, Debug)]
    struct Seen {
        method: String,
        matched: Option<String>,
        captures: Vec<String>,
        status: u16,
    }

    /// Every client method against the real router: each sends one request,
    /// which must reach the route it means (the pattern matched, the method
    /// allowed, the names decoded back to what the client was given), and
    /// together they reach every route.
    #[test]
    fn every_client_call_is_routed_to_its_handler() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn vpool_store::SegmentStore> =
            Arc::new(vpool_store::LocalDirStore::open(dir.path().join("pool")).unwrap());
        let config = vpool_engine::PoolConfig {
            background: false,
            ..vpool_engine::PoolConfig::default()
        };
        let (pool, _) = vpool_engine::Pool::open(store, config).unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        let app = router(ApiState::new(pool.clone())).layer(middleware::from_fn(
            move |req: Request, next: Next| {
                let log = log.clone();
                async move {
                    let method = req.method().to_string();
                    let matched = req
                        .extensions()
                        .get::<MatchedPath>()
                        .map(|m| m.as_str().to_string());
                    let (mut parts, body) = req.into_parts();
                    let captures = match RawPathParams::from_request_parts(&mut parts, &()).await {
                        Ok(p) => p.iter().map(|(_, v)| v.to_string()).collect(),
                        Err(_) => Vec::new(),
                    };
                    let resp: Response = next.run(Request::from_parts(parts, body)).await;
                    log.lock().unwrap().push(Seen {
                        method,
                        matched,
                        captures,
                        status: resp.status().as_u16(),
                    });
                    resp
                }
            },
        ));
        let socket = dir.path().join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = tokio::net::UnixListener::from_std(listener).unwrap();
                let shutdown = async {
                    let _ = stopped.await;
                };
                crate::limits::serve_limited(
                    l,
                    app,
                    &crate::ApiLimits::default(),
                    shutdown,
                    "test",
                )
                .await;
            });
        });

        let c = Client::unix(&socket);
        type Call = Box<dyn Fn(&Client, &str, &str)>;
        // (method, pattern, captures as names: "V" the volume, "S" the
        // snapshot, "V@S" both, the call).
        let calls: Vec<(&str, &str, &[&str], Call)> = vec![
            ("GET", POOL, &[], Box::new(|c, _, _| drop(c.pool_info()))),
            (
                "POST",
                POOL_CHECK,
                &[],
                Box::new(|c, _, _| drop(c.pool_check(false))),
            ),
            ("POST", FLUSH, &[], Box::new(|c, _, _| drop(c.flush()))),
            ("POST", POOL_CLEAN, &[], Box::new(|c, _, _| drop(c.clean()))),
            (
                "POST",
                POOL_CHECKPOINT,
                &[],
                Box::new(|c, _, _| drop(c.checkpoint())),
            ),
            ("GET", CACHE, &[], Box::new(|c, _, _| drop(c.cache_stats()))),
            (
                "GET",
                CACHE_PINS,
                &[],
                Box::new(|c, _, _| drop(c.cache_pins())),
            ),
            (
                "POST",
                CACHE_PINS,
                &[],
                Box::new(|c, v, s| drop(c.pin(v, Some(s)))),
            ),
            (
                "DELETE",
                CACHE_PIN,
                &["V@S"],
                Box::new(|c, v, s| drop(c.unpin(v, Some(s)))),
            ),
            (
                "DELETE",
                CACHE_PIN,
                &["V"],
                Box::new(|c, v, _| drop(c.unpin(v, None))),
            ),
            (
                "GET",
                VOLUMES,
                &[],
                Box::new(|c, _, _| drop(c.list_volumes())),
            ),
            (
                "POST",
                VOLUMES,
                &[],
                Box::new(|c, v, _| drop(c.create_volume(v, 1 << 20))),
            ),
            (
                "GET",
                VOLUME,
                &["V"],
                Box::new(|c, v, _| drop(c.volume_info(v))),
            ),
            (
                "PATCH",
                VOLUME,
                &["V"],
                Box::new(|c, v, _| drop(c.resize_volume(v, 2 << 20, false, false))),
            ),
            (
                "POST",
                VOLUME_IMPORT,
                &["V"],
                Box::new(|c, v, _| drop(c.begin_import(v, false))),
            ),
            (
                "DELETE",
                VOLUME_IMPORT,
                &["V"],
                Box::new(|c, v, _| drop(c.end_import(v))),
            ),
            (
                "PUT",
                VOLUME_DATA,
                &["V"],
                Box::new(|c, v, _| drop(c.write(v, 0, &[1; 4096], false))),
            ),
            (
                "POST",
                VOLUME_ZERO,
                &["V"],
                Box::new(|c, v, _| drop(c.zero(v, 4096, 4096, true, false))),
            ),
            (
                "POST",
                VOLUME_SNAPSHOTS,
                &["V"],
                Box::new(|c, v, s| drop(c.create_snapshot(v, s))),
            ),
            (
                "GET",
                VOLUME_SNAPSHOTS,
                &["V"],
                Box::new(|c, v, _| drop(c.list_snapshots(v))),
            ),
            (
                "GET",
                SNAPSHOT,
                &["V", "S"],
                Box::new(|c, v, s| drop(c.snapshot_info(v, s))),
            ),
            (
                "GET",
                VOLUME_DATA,
                &["V"],
                Box::new(|c, v, s| drop(c.read_image(v, Some(s), 0, 4096))),
            ),
            (
                "GET",
                VOLUME_ALLOCATION,
                &["V"],
                Box::new(|c, v, s| drop(c.allocation_of(v, Some(s), 0, 4096))),
            ),
            (
                "GET",
                VOLUME_DIFF,
                &["V"],
                Box::new(|c, v, s| drop(c.diff_page(v, Some(s), None, 0))),
            ),
            (
                "POST",
                SNAPSHOT_ROLLBACK,
                &["V", "S"],
                Box::new(|c, v, s| drop(c.rollback(v, s, false))),
            ),
            (
                "POST",
                VOLUME_CLONE,
                &["V"],
                Box::new(|c, v, s| drop(c.clone_volume(v, Some(s), "copy"))),
            ),
            (
                "POST",
                VOLUME_FLATTEN,
                &["V"],
                Box::new(|c, _, _| drop(c.flatten("copy"))),
            ),
            (
                "POST",
                VOLUME_COMMIT,
                &["V"],
                Box::new(|c, _, _| drop(c.commit("copy", false))),
            ),
            (
                "POST",
                VOLUME_COPY,
                &["V"],
                Box::new(|c, v, s| drop(c.copy_volume(v, Some(s), "copy2", None))),
            ),
            (
                "POST",
                VOLUME_MOVE,
                &["V"],
                Box::new(|c, v, _| {
                    let req = crate::types::MoveRequest {
                        to_pool: "elsewhere".into(),
                        name: None,
                        max_rate_bytes_per_sec: None,
                        without_snapshots: false,
                    };
                    drop(c.move_volume(v, &req))
                }),
            ),
            (
                "POST",
                VOLUME_REPLICA,
                &["V"],
                Box::new(|c, v, _| {
                    let req = crate::types::ReplicaRequest {
                        to_pool: "dr".into(),
                        name: None,
                        every_secs: Some(60),
                        keep: None,
                        max_rate_bytes_per_sec: None,
                    };
                    drop(c.add_replica(v, &req))
                }),
            ),
            (
                "GET",
                VOLUME_REPLICA,
                &["V"],
                Box::new(|c, v, _| drop(c.replica(v))),
            ),
            (
                "DELETE",
                VOLUME_REPLICA,
                &["V"],
                Box::new(|c, v, _| drop(c.remove_replica(v))),
            ),
            (
                "POST",
                VOLUME_REPLICA_RUN,
                &["V"],
                Box::new(|c, v, _| drop(c.run_replica(v))),
            ),
            (
                "POST",
                VOLUME_REPLICA_VERIFY,
                &["V"],
                Box::new(|c, v, _| drop(c.verify_replica(v))),
            ),
            (
                "POST",
                VOLUME_PROMOTE,
                &["V"],
                Box::new(|c, v, _| drop(c.promote(v))),
            ),
            (
                "PUT",
                VOLUME_QOS,
                &["V"],
                Box::new(|c, v, _| drop(c.set_qos(v, &crate::types::QosLimits::default()))),
            ),
            (
                "PUT",
                VOLUME_MULTI_WRITER,
                &["V"],
                Box::new(|c, v, _| drop(c.set_multi_writer(v, true))),
            ),
            (
                "POST",
                VOLUME_RENAME,
                &["V"],
                Box::new(|c, v, _| drop(c.rename_volume(v, "renamed"))),
            ),
            (
                "POST",
                VOLUME_TRASH,
                &["V"],
                Box::new(|c, v, _| drop(c.trash_volume(v, None))),
            ),
            (
                "POST",
                VOLUME_TEMPLATE,
                &["V"],
                Box::new(|c, v, _| drop(c.make_template(v))),
            ),
            (
                "GET",
                VOLUME_OWNER,
                &["V"],
                Box::new(|c, v, _| drop(c.volume_owner(v))),
            ),
            (
                "POST",
                VOLUME_TAKEOVER,
                &["V"],
                Box::new(|c, v, _| drop(c.takeover_volume(v, false))),
            ),
            (
                "POST",
                VOLUME_RELEASE,
                &["V"],
                Box::new(|c, v, _| drop(c.release_volume(v, false))),
            ),
            ("GET", TRASH, &[], Box::new(|c, _, _| drop(c.trash_list()))),
            (
                "POST",
                TRASH_RESTORE,
                &["I"],
                Box::new(|c, _, _| drop(c.trash_restore(7, None))),
            ),
            (
                "DELETE",
                TRASH_ENTRY,
                &["I"],
                Box::new(|c, _, _| drop(c.trash_remove(7))),
            ),
            (
                "POST",
                TRASH_PURGE,
                &[],
                Box::new(|c, _, _| drop(c.trash_purge(0))),
            ),
            (
                "DELETE",
                SNAPSHOT,
                &["V", "S"],
                Box::new(|c, v, s| drop(c.delete_snapshot(v, s))),
            ),
            (
                "DELETE",
                VOLUME,
                &["V"],
                Box::new(|c, v, _| drop(c.delete_volume(v, true))),
            ),
        ];
        let mut reached = std::collections::BTreeSet::new();
        // Valid names (the calls mostly succeed), then names the client
        // must encode (the server refuses them, after routing).
        for (v, s) in [("web1", "mon"), ("a b", "x@y?z#"), ("100%", "ü/..")] {
            for (method, pattern, names, call) in &calls {
                let before = seen.lock().unwrap().len();
                call(&c, v, s);
                let got = seen.lock().unwrap()[before..].to_vec();
                let what = format!("{method} {pattern} with {v:?}, {s:?}: {got:?}");
                assert_eq!(got.len(), 1, "one request: {what}");
                let got = &got[0];
                assert_eq!(got.method, *method, "{what}");
                assert_eq!(got.matched.as_deref(), Some(*pattern), "{what}");
                assert_ne!(got.status, 405, "method not allowed: {what}");
                let want: Vec<String> = names
                    .iter()
                    .map(|n| match *n {
                        "V" if *pattern == VOLUME_FLATTEN || *pattern == VOLUME_COMMIT => {
                            "copy".to_string()
                        }
                        "V" => v.to_string(),
                        "S" => s.to_string(),
                        "I" => "7".to_string(),
                        _ => format!("{v}@{s}"),
                    })
                    .collect();
                assert_eq!(got.captures, want, "{what}");
                reached.insert(*pattern);
            }
        }
        let all: std::collections::BTreeSet<&str> = ALL.iter().copied().collect();
        assert_eq!(reached, all, "routes no client call reaches");
        // The valid-name pass did real work: the routes reached their handlers.
        let ok = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| (200..300).contains(&s.status))
            .count();
        assert!(ok >= 15, "{ok} successful calls");

        stop.send(()).unwrap();
        server.join().unwrap();
        pool.close().unwrap();
    }
}
