//! `GET /metrics`: the daemon's OpenMetrics text, parsed by Prometheus'
//! own Python parser (`prometheus_client.openmetrics.parser`, Debian's
//! python3-prometheus-client), its values checked against known I/O: raw
//! NBD writes and flushes, qemu-io reads; a deleted volume leaves the next
//! scrape.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;

use std::collections::HashMap;
use std::path::Path;

use common::{Daemon, run_ok};
use nbd_common::clients::{qemu_io, run_ok as run_tool};

/// The samples of the metrics text `text`, as Prometheus' parser reads
/// it: `name{label="value",...}` (labels sorted) to value. The parser
/// fails on anything that is not valid OpenMetrics.
fn parse(text: &str, dir: &Path) -> HashMap<String, f64> {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let out = run_tool(
        std::process::Command::new("/usr/bin/python3")
            .args(["-c", script])
            .arg(&file),
        std::time::Duration::from_secs(60),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {:#?}", m.keys().collect::<Vec<_>>()))
}

#[test]
fn metrics_count_what_clients_did() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let d = Daemon::start(&home, &[]);
    run_ok(&home, &["vol", "create", "web1", "--size", "8M"]);
    run_ok(&home, &["vol", "create", "gone", "--size", "1M"]);
    // 10 writes of 4 KiB, each followed by a flush, on new connections.
    for i in 0..10u64 {
        let (err, flush_err) =
            nbd_common::raw::write_and_flush(&d.nbd_socket(), "web1", i * 4096, 4096, 0x11);
        assert_eq!((err, flush_err), (0, 0));
    }
    qemu_io(&d.nbd_uri("web1"), &["read 0 64k"]);
    let (err, _) = nbd_common::raw::write_and_flush(&d.nbd_socket(), "gone", 0, 4096, 1);
    assert_eq!(err, 0);

    let m = parse(&d.client().metrics().unwrap(), t.path());
    let v = |op: &str| format!(r#"op="{op}",pool="local",volume="web1""#);
    assert_eq!(
        get(
            &m,
            &format!("vpool_volume_requests_total{{{}}}", v("write"))
        ),
        10.0
    );
    assert_eq!(
        get(
            &m,
            &format!("vpool_volume_request_bytes_total{{{}}}", v("write"))
        ),
        40960.0
    );
    assert!(
        get(
            &m,
            &format!("vpool_volume_requests_total{{{}}}", v("flush"))
        ) >= 10.0
    );
    assert!(
        get(
            &m,
            &format!("vpool_volume_request_bytes_total{{{}}}", v("read"))
        ) >= 65536.0
    );
    assert!(
        get(
            &m,
            &format!("vpool_volume_request_seconds_total{{{}}}", v("write"))
        ) > 0.0
    );
    assert_eq!(
        get(
            &m,
            r#"vpool_volume_request_errors_total{pool="local",volume="web1"}"#
        ),
        0.0
    );
    assert_eq!(
        get(&m, r#"vpool_volume_size_bytes{pool="local",volume="web1"}"#),
        8.0 * 1024.0 * 1024.0
    );
    assert!(
        get(
            &m,
            r#"vpool_volume_allocated_bytes{pool="local",volume="web1"}"#
        ) >= 40960.0
    );
    assert_eq!(get(&m, r#"vpool_pool{figure="volumes",pool="local"}"#), 2.0);
    assert!(get(&m, r#"vpool_pool{figure="free_bytes",pool="local"}"#) > 0.0);
    assert_eq!(
        get(&m, r#"vpool_pool_open{pool="local",state="open"}"#),
        1.0
    );
    assert_eq!(get(&m, "vpool_jobs_running{}"), 0.0);

    // A client connected shows; a deleted volume's figures go.
    let held = nbd_common::raw::open_export(&d.nbd_socket(), "web1");
    run_ok(&home, &["vol", "delete", "gone"]);
    let m = parse(&d.client().metrics().unwrap(), t.path());
    assert_eq!(
        get(&m, r#"vpool_volume_clients{pool="local",volume="web1"}"#),
        1.0
    );
    assert!(
        !m.keys().any(|k| k.contains(r#"volume="gone""#)),
        "a deleted volume is still reported"
    );
    drop(held);
    drop(d);
}

/// `vpool vol iostat` while fio writes: the volume's write rate is there,
/// with a latency; an idle volume is left out.
#[test]
fn iostat_shows_a_writer() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let d = Daemon::start(&home, &[]);
    run_ok(&home, &["vol", "create", "busy", "--size", "16M"]);
    run_ok(&home, &["vol", "create", "idle", "--size", "16M"]);
    nbd_common::raw::write_and_flush(&d.nbd_socket(), "idle", 0, 4096, 1);
    let uri = d.nbd_uri("busy");
    let fio = std::thread::spawn(move || nbd_common::clients::fio_verify_for(&uri, "8M", 2, 5));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let out = run_ok(
        &home,
        &["vol", "iostat", "--interval", "1", "--count", "2", "--json"],
    );
    fio.join().expect("fio");
    let samples: Vec<serde_json::Value> = serde_json::Deserializer::from_str(&out)
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(samples.len(), 2, "{out}");
    for s in &samples {
        let rows = s.as_array().unwrap();
        assert_eq!(rows.len(), 1, "only the busy volume: {s}");
        assert_eq!(rows[0]["volume"], "local/busy", "{s}");
        assert!(rows[0]["write_iops"].as_f64().unwrap() > 10.0, "{s}");
        assert!(rows[0]["write_latency_ms"].as_f64().unwrap() > 0.0, "{s}");
    }
    drop(d);
}
