//! [`Host::metrics_text`]: what `GET /metrics` answers, built at each
//! scrape from the counters and figures the host has (see
//! `crate::metrics` for what is counted and the bounds).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{Host, PoolCtx, PoolState};
use crate::metrics::{IoStats, Op};

type Labels = Vec<(String, String)>;
type Counters = Family<Labels, Counter>;
type SecondsCounters = Family<Labels, Counter<f64, AtomicU64>>;
type Gauges = Family<Labels, Gauge>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The metric families of one scrape, registered in `registry`.
struct Families {
    requests: Counters,
    bytes: Counters,
    seconds: SecondsCounters,
    errors: Counters,
    clients: Gauges,
    size: Gauges,
    allocated: Gauges,
    pool: Family<Labels, Gauge>,
    pool_open: Gauges,
    cache: Gauges,
    cache_total: Counters,
    jobs_running: Gauge,
    replica_lag: FloatGauges,
}

impl Families {
    fn new(registry: &mut Registry) -> Families {
        let f = Families {
            requests: Counters::default(),
            bytes: Counters::default(),
            seconds: SecondsCounters::default(),
            errors: Counters::default(),
            clients: Gauges::default(),
            size: Gauges::default(),
            allocated: Gauges::default(),
            pool: Gauges::default(),
            pool_open: Gauges::default(),
            cache: Gauges::default(),
            cache_total: Counters::default(),
            jobs_running: Gauge::default(),
            replica_lag: FloatGauges::default(),
        };
        let r = registry;
        r.register(
            "volume_requests",
            "NBD requests served, by kind (op)",
            f.requests.clone(),
        );
        r.register(
            "volume_request_bytes",
            "Bytes of NBD requests, by kind (op)",
            f.bytes.clone(),
        );
        r.register(
            "volume_request_seconds",
            "Time NBD requests took, by kind (op); over the requests' rate, the mean latency",
            f.seconds.clone(),
        );
        r.register(
            "volume_request_errors",
            "NBD requests that failed",
            f.errors.clone(),
        );
        r.register(
            "volume_clients",
            "NBD connections open to the volume",
            f.clients.clone(),
        );
        r.register("volume_size_bytes", "The volume's size", f.size.clone());
        r.register(
            "volume_allocated_bytes",
            "Bytes of data stored for the volume",
            f.allocated.clone(),
        );
        r.register(
            "pool",
            "The pool's figures (figure: volumes, logical_bytes, live_data_bytes, physical_bytes, segments, free_bytes, reserve_bytes, full, damaged_blocks, checkpoints_written, segments_cleaned, bytes_relocated, log_bytes_since_checkpoint)",
            f.pool.clone(),
        );
        r.register(
            "pool_open",
            "1 when the pool is open (state: its state)",
            f.pool_open.clone(),
        );
        r.register(
            "cache",
            "A pool on S3: its host cache (figure: cache_size_bytes, cached_bytes, dirty_bytes, dirty_limit_bytes, pinned_bytes, upload_lag_bytes; volume: a shared pool's volume owned here, else empty)",
            f.cache.clone(),
        );
        r.register(
            "cache_events",
            "A pool on S3: counts since it opened (event: read_hits, read_misses, read_errors, bytes_read, bytes_fetched, segments_uploaded, bytes_uploaded, remote_errors)",
            f.cache_total.clone(),
        );
        r.register("jobs_running", "Jobs running", f.jobs_running.clone());
        r.register(
            "replica_lag_seconds",
            "Age of a replication's newest point",
            f.replica_lag.clone(),
        );
        f
    }

    fn io(&self, pool: &str, volume: &str, s: &IoStats) {
        for op in Op::ALL {
            let l = labels(&[("pool", pool), ("volume", volume), ("op", op.as_str())]);
            let (n, bytes, secs) = s.of(op);
            self.requests.get_or_create(&l).inc_by(n);
            self.bytes.get_or_create(&l).inc_by(bytes);
            self.seconds.get_or_create(&l).inc_by(secs);
        }
        let l = labels(&[("pool", pool), ("volume", volume)]);
        self.errors.get_or_create(&l).inc_by(s.errors());
    }

    /// The figures of open pool `ctx` (named `pool`: a shared pool's
    /// volumes are each a pool of their own) and of its volumes.
    fn pool(&self, pool: &str, ctx: &PoolCtx, figures: bool) {
        let catalog = ctx.service.catalog();
        for v in ctx.service.list_volumes() {
            let l = labels(&[("pool", pool), ("volume", &v.info.name)]);
            let clients = catalog.nbd_connections(v.info.id.0) as u64;
            self.clients.get_or_create(&l).set(to_i64(clients));
            self.size.get_or_create(&l).set(to_i64(v.info.size_bytes));
            self.allocated
                .get_or_create(&l)
                .set(to_i64(v.info.allocated_bytes));
        }
        if figures {
            let s = ctx.service.stats();
            for (name, v) in [
                ("volumes", s.volumes),
                ("logical_bytes", s.logical_bytes),
                ("live_data_bytes", s.live_data_bytes),
                ("physical_bytes", s.physical_bytes),
                ("segments", s.segments),
                ("reserve_bytes", s.reserve_bytes),
                ("full", u64::from(s.full)),
                ("damaged_blocks", s.damaged_blocks),
                ("checkpoints_written", s.checkpoints_written),
                ("segments_cleaned", s.segments_cleaned),
                ("bytes_relocated", s.bytes_relocated),
                ("log_bytes_since_checkpoint", s.log_bytes_since_checkpoint),
            ] {
                let l = labels(&[("pool", pool), ("figure", name)]);
                self.pool.get_or_create(&l).set(to_i64(v));
            }
            // Left out when the store cannot tell (not 0).
            if let Some(free) = s.free_bytes {
                let l = labels(&[("pool", pool), ("figure", "free_bytes")]);
                self.pool.get_or_create(&l).set(to_i64(free));
            }
        }
        if let Some(cache) = &ctx.cache {
            // A shared pool's volumes each have a cache of their own.
            let volume = if figures { "" } else { ctx.name.as_str() };
            self.cache_figures(pool, volume, &cache.stats());
        }
    }

    /// A cache's figures; `volume` is empty for a pool's one cache.
    fn cache_figures(&self, pool: &str, volume: &str, c: &crate::CacheInfo) {
        for (name, v) in [
            ("cache_size_bytes", c.cache_size_bytes),
            ("cached_bytes", c.cached_bytes),
            ("dirty_bytes", c.dirty_bytes),
            ("dirty_limit_bytes", c.dirty_limit_bytes),
            ("pinned_bytes", c.pinned_bytes),
            ("upload_lag_bytes", c.upload_lag_bytes),
        ] {
            let l = labels(&[("pool", pool), ("volume", volume), ("figure", name)]);
            self.cache.get_or_create(&l).set(to_i64(v));
        }
        for (name, v) in [
            ("read_hits", c.read_hits),
            ("read_misses", c.read_misses),
            ("read_errors", c.read_errors),
            ("bytes_read", c.bytes_read),
            ("bytes_fetched", c.bytes_fetched),
            ("segments_uploaded", c.segments_uploaded),
            ("bytes_uploaded", c.bytes_uploaded),
            ("remote_errors", c.remote_errors),
        ] {
            let l = labels(&[("pool", pool), ("volume", volume), ("event", name)]);
            self.cache_total.get_or_create(&l).inc_by(v);
        }
    }
}

impl Host {
    /// Every volume's I/O counters since the daemon started (`GET
    /// /v1/io`, `vol iostat`).
    pub fn io_counters(&self) -> Vec<crate::metrics::VolumeIo> {
        self.meters.all()
    }

    /// The text of `GET /metrics` (OpenMetrics). Blocking (it asks every
    /// pool for its figures).
    pub fn metrics_text(&self) -> String {
        let mut registry = Registry::with_prefix("vpool");
        let f = Families::new(&mut registry);
        let mut live: Vec<(String, String)> = Vec::new();
        for slot in self.pools() {
            let (state, _) = slot.state.describe();
            let open = matches!(slot.state, PoolState::Open(_) | PoolState::Shared(_));
            let l = labels(&[("pool", &slot.name), ("state", state)]);
            f.pool_open.get_or_create(&l).set(i64::from(open));
            match &slot.state {
                PoolState::Open(ctx) => {
                    f.pool(&slot.name, ctx, true);
                    live.extend(volume_names(&slot.name, ctx));
                }
                PoolState::Shared(sh) => {
                    for fam in sh.owned() {
                        f.pool(&slot.name, &fam, false);
                        live.extend(volume_names(&slot.name, &fam));
                    }
                }
                _ => {}
            }
        }
        let pools: std::collections::HashSet<&str> = live.iter().map(|(p, _)| p.as_str()).collect();
        let volumes: std::collections::HashSet<(&str, &str)> =
            live.iter().map(|(p, v)| (p.as_str(), v.as_str())).collect();
        let meters = self.meters.snapshot(|p, v| {
            if v == crate::metrics::OTHER {
                pools.contains(p)
            } else {
                volumes.contains(&(p, v))
            }
        });
        for ((pool, volume), stats) in &meters {
            f.io(pool, volume, stats);
        }
        let running = self
            .jobs
            .list()
            .iter()
            .filter(|j| !j.state.finished())
            .count();
        f.jobs_running.set(to_i64(running as u64));
        for r in self.list_replicas().unwrap_or_default() {
            if let Some(lag_ms) = r
                .last_point_unix_ms
                .map(|t| crate::jobs::unix_ms().saturating_sub(t))
            {
                let l = labels(&[("volume", &r.volume), ("replica", &r.to)]);
                f.replica_lag.get_or_create(&l).set(lag_ms as f64 / 1000.0);
            }
        }
        let mut out = String::new();
        encode(&mut out, &registry).expect("writing to a String does not fail");
        out
    }
}

fn volume_names(pool: &str, ctx: &PoolCtx) -> Vec<(String, String)> {
    ctx.service
        .list_volumes()
        .into_iter()
        .map(|v| (pool.to_string(), v.info.name))
        .collect()
}
