//! `run_daemon` in-process: start, serve, refuse a second daemon on the same
//! pool, shut down on the shutdown future, and reopen with the data intact.

use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;
use vpool::daemon::{
    AlreadyRunning, DaemonConfig, Ready, TcpApiConfig, run_daemon, run_daemon_notify,
};
use vpool_api::{ApiLimits, AuthToken, Client};

/// A daemon on its own thread and runtime.
struct InProcess {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
    ready: Ready,
}

impl InProcess {
    fn start(pool: &Path) -> InProcess {
        InProcess::start_with(DaemonConfig::new(pool))
    }

    fn start_with(config: DaemonConfig) -> InProcess {
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Ready>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(run_daemon_notify(
                config,
                async {
                    let _ = stop_rx.await;
                },
                move |r| {
                    let _ = ready_tx.send(r.clone());
                },
            ))
        });
        let ready = match ready_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(r) => r,
            Err(_) => {
                let r = thread.join().expect("daemon thread panicked");
                panic!("daemon did not start: {r:?}");
            }
        };
        InProcess {
            stop: Some(stop_tx),
            thread: Some(thread),
            ready,
        }
    }

    fn stop(mut self) -> anyhow::Result<()> {
        self.stop.take().map(|s| s.send(()));
        self.thread
            .take()
            .map(|t| t.join().expect("daemon thread panicked"))
            .unwrap_or(Ok(()))
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.stop.take().map(|s| s.send(()));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn in_process_daemon_lifecycle() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let d = InProcess::start(&pool);
    assert_eq!(d.ready.api_socket, pool.join("api.sock"));
    let c = Client::unix(&d.ready.api_socket);
    c.create_volume("v", 1 << 20).unwrap();
    c.write("v", 4096, b"in-process", false).unwrap();

    // A second daemon on the same pool fails with AlreadyRunning, and the
    // first keeps serving.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(run_daemon(DaemonConfig::new(&pool), std::future::pending()))
        .unwrap_err();
    let already = err
        .downcast_ref::<AlreadyRunning>()
        .unwrap_or_else(|| panic!("expected AlreadyRunning, got {err:#}"));
    assert_eq!(already.pid, Some(std::process::id()));
    assert!(already.lock_file.ends_with("LOCK"), "{already}");
    assert_eq!(c.read("v", 4096, 10).unwrap(), b"in-process");

    // Shutdown is clean and closes the pool; the socket goes away.
    d.stop().unwrap();
    assert!(!pool.join("api.sock").exists());
    assert!(c.list_volumes().is_err());

    // Reopen: the unflushed write survived, since close checkpoints.
    let d = InProcess::start(&pool);
    let c = Client::unix(&d.ready.api_socket);
    assert_eq!(c.read("v", 4096, 10).unwrap(), b"in-process");
    d.stop().unwrap();
}

#[test]
fn stale_socket_is_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    // A socket left behind by a daemon that died.
    let stale = std::os::unix::net::UnixListener::bind(pool.join("api.sock")).unwrap();
    drop(stale);
    let d = InProcess::start(&pool);
    Client::unix(&d.ready.api_socket).pool_info().unwrap();
    d.stop().unwrap();

    // A regular file where the socket goes is not deleted.
    std::fs::write(pool.join("api.sock"), b"precious").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(run_daemon(DaemonConfig::new(&pool), std::future::pending()))
        .unwrap_err();
    assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
    assert_eq!(std::fs::read(pool.join("api.sock")).unwrap(), b"precious");
}

#[test]
fn too_long_socket_path_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("p".repeat(120));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(run_daemon(DaemonConfig::new(&pool), std::future::pending()))
        .unwrap_err();
    assert!(format!("{err:#}").contains("shorter --home"), "{err:#}");
}

#[test]
fn an_api_flood_on_tcp_leaves_the_unix_socket_and_nbd_alone() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let mut config = DaemonConfig::new(dir.path().join("pool"));
    let token = "flood-test-token-0123456789";
    config.tcp = Some(TcpApiConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: AuthToken::new(token).unwrap(),
    });
    config.api_limits = ApiLimits {
        max_connections: 4,
        ..ApiLimits::default()
    };
    let d = InProcess::start_with(config);
    let addr = d.ready.tcp_addr.unwrap();
    // Silent connections: no token needed to hold one.
    let flood: Vec<_> = (0..4)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut fifth = std::net::TcpStream::connect(addr).unwrap();
    fifth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let t0 = std::time::Instant::now();
    let closed = match fifth.read(&mut [0u8; 64]) {
        Ok(n) => n == 0,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed && t0.elapsed() < Duration::from_secs(1),
        "the fifth TCP connection was not closed at once"
    );
    // The unix socket has its own cap: the CLI is served meanwhile, and so
    // are NBD clients.
    let c = Client::unix(&d.ready.api_socket);
    c.create_volume("v", 1 << 20).unwrap();
    let nbd = std::os::unix::net::UnixStream::connect(&d.ready.nbd_socket).unwrap();
    nbd.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 18];
    (&nbd).read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    drop(flood);
    d.stop().unwrap();
}
