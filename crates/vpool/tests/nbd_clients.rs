//! The real daemon (`vpool serve` as a child process) driven by real NBD
//! clients: qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh (libnbd's Python
//! bindings) and fio's nbd engine, against engine-backed volumes on a local
//! pool.
//!
//! The workloads are in `common/nbd_suite.rs`, shared with `s3_rgw.rs`,
//! which runs them on a pool on S3. The client helpers are `vpool-nbd`'s
//! (`crates/vpool-nbd/tests/common/`), shared rather than copied. A missing
//! client binary fails the test with the Debian package to install.

mod common;
#[path = "../../vpool-nbd/tests/common/mod.rs"]
mod nbd_common;
#[path = "common/nbd_suite.rs"]
mod nbd_suite;

use common::Daemon;
use nbd_suite::Case;

/// Runs `case` on a new local pool and stops the daemon cleanly.
fn on_a_local_pool(case: &Case) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(&dir.path().join(case.pool_dir), case.serve_args);
    let d = (case.run)(d, dir.path());
    let log = d.log_text();
    assert!(d.terminate().success(), "{}: log:\n{log}", case.name);
}

#[test]
fn qemu_img_info_convert_compare_map() {
    on_a_local_pool(&nbd_suite::QEMU_IMG_INFO_CONVERT_COMPARE_MAP);
}

#[test]
fn qemu_io_write_read_discard_zero() {
    on_a_local_pool(&nbd_suite::QEMU_IO_WRITE_READ_DISCARD_ZERO);
}

#[test]
fn nbdinfo_list_map_and_flags_unix_and_tcp() {
    on_a_local_pool(&nbd_suite::NBDINFO_LIST_MAP_AND_FLAGS_UNIX_AND_TCP);
}

#[test]
fn nbdcopy_both_ways_sparse_multi_conn() {
    on_a_local_pool(&nbd_suite::NBDCOPY_BOTH_WAYS_SPARSE_MULTI_CONN);
}

#[test]
fn nbdsh_edge_cases() {
    on_a_local_pool(&nbd_suite::NBDSH_EDGE_CASES);
}

#[test]
fn fio_randwrite_verify() {
    on_a_local_pool(&nbd_suite::FIO_RANDWRITE_VERIFY);
}

#[test]
fn several_clients_on_several_volumes() {
    on_a_local_pool(&nbd_suite::SEVERAL_CLIENTS_ON_SEVERAL_VOLUMES);
}

#[test]
fn multi_conn_one_volume() {
    on_a_local_pool(&nbd_suite::MULTI_CONN_ONE_VOLUME);
}

#[test]
fn data_survives_restart_over_nbd_and_export() {
    on_a_local_pool(&nbd_suite::DATA_SURVIVES_RESTART_OVER_NBD_AND_EXPORT);
}

#[test]
fn sigterm_with_a_connected_writer() {
    on_a_local_pool(&nbd_suite::SIGTERM_WITH_A_CONNECTED_WRITER);
}

#[test]
fn vol_info_uris_work_with_real_clients() {
    on_a_local_pool(&nbd_suite::VOL_INFO_URIS_WORK_WITH_REAL_CLIENTS);
}
