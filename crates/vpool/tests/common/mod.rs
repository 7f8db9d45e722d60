//! Helpers shared by the binary's integration tests: running the built
//! `vpool` binary, and a daemon child process on a temporary pool.

#![allow(dead_code)] // Each test file uses a different subset.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use vpool_api::Client;

/// How long a daemon may take to start answering.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon may take to exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(20);

pub fn vpool_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vpool")
}

/// A `vpool` command on the daemon whose home is `pool`, isolated from the
/// caller's environment.
pub fn vpool_cmd(pool: &Path) -> Command {
    let mut c = Command::new(vpool_bin());
    c.arg("--home").arg(pool);
    c.env_remove("VPOOL_HOME");
    // Not this machine's /etc/vpool/vpool.toml: an empty configuration.
    c.env("VPOOL_CONFIG", "/dev/null");
    c.env("VPOOL_LOG", "warn");
    c
}

/// Runs `vpool --home <pool> <args>` to completion.
pub fn run(pool: &Path, args: &[&str]) -> Output {
    vpool_cmd(pool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running the vpool binary")
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(pool: &Path, args: &[&str]) -> String {
    let out = run(pool, args);
    assert!(
        out.status.success(),
        "vpool {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs a command that must fail; returns its stderr.
pub fn run_err(pool: &Path, args: &[&str]) -> String {
    let out = run(pool, args);
    assert!(
        !out.status.success(),
        "vpool {args:?} should have failed:\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stderr).expect("stderr is UTF-8")
}

/// A URL no other test run uses: `s3://BUCKET/test-WHAT-<random>`.
pub fn test_url(bucket: &str, what: &str) -> String {
    format!("s3://{bucket}/test-{what}-{:x}", rand::random::<u64>())
}

/// `pool VERB NAME --s3 URL --endpoint ENDPOINT --cache CACHE
/// --cache-size 256M EXTRA...` through the daemon at `home` (`create` or
/// `attach`; `--shared`, `--lease-expire`, `--durability` go in `extra`,
/// and `--cache-size` there replaces the 256M).
pub fn pool_on_s3(
    home: &Path,
    verb: &str,
    name: &str,
    url: &str,
    endpoint: &str,
    cache: &Path,
    extra: &[&str],
) -> String {
    let cache = cache.to_str().expect("test paths are UTF-8");
    let mut args = vec!["pool", verb, name, "--s3", url, "--endpoint", endpoint];
    args.extend(["--cache", cache]);
    if !extra.contains(&"--cache-size") {
        args.extend(["--cache-size", "256M"]);
    }
    args.extend_from_slice(extra);
    run_ok(home, &args)
}

pub fn run_json(pool: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = run_ok(pool, &a);
    serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("vpool {a:?} printed bad JSON ({e}): {out}"))
}

/// `vpool serve` as a child process.
pub struct Daemon {
    pub child: Child,
    pub pool: PathBuf,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `vpool serve` on `pool` and waits until its API answers.
    pub fn start(pool: &Path, extra_args: &[&str]) -> Daemon {
        let mut cmd = vpool_cmd(pool);
        cmd.arg("serve").args(extra_args);
        Daemon::start_cmd(pool, cmd)
    }

    /// Starts `cmd`, a prepared `vpool ... serve` (its own `--home`,
    /// environment), whose pool directory is `pool`, and waits until its API
    /// answers.
    pub fn start_cmd(pool: &Path, mut cmd: Command) -> Daemon {
        let log = pool.with_extension(format!("log.{}", std::process::id()));
        let log_file = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("opening the daemon log");
        let child = cmd
            .env("VPOOL_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("starting vpool serve");
        let mut d = Daemon {
            child,
            pool: pool.to_path_buf(),
            log,
        };
        d.wait_ready();
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.pool.join("api.sock")
    }

    /// The NBD Unix socket (`<pool>/nbd.sock`).
    pub fn nbd_socket(&self) -> PathBuf {
        self.pool.join("nbd.sock")
    }

    /// The NBD URI of `volume` over the Unix socket (for pool paths that
    /// need no URI escaping, as temporary directories do not).
    pub fn nbd_uri(&self, volume: &str) -> String {
        format!(
            "nbd+unix:///{volume}?socket={}",
            self.nbd_socket().display()
        )
    }

    /// Sends `signal` without waiting.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: signalling our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    pub fn client(&self) -> Client {
        Client::unix(self.socket()).with_timeout(Duration::from_secs(30))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        let client = self.client();
        loop {
            if let Some(status) = self.child.try_wait().expect("polling the daemon") {
                panic!(
                    "vpool serve exited early ({status}); log:\n{}",
                    self.log_text()
                );
            }
            if client.pool_info().is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "vpool serve did not answer within {START_TIMEOUT:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits");
        // SAFETY: signalling our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        wait_timeout(&mut self.child, STOP_TIMEOUT)
            .unwrap_or_else(|| panic!("daemon ignored SIGTERM; log:\n{}", self.log_text()))
    }

    /// SIGKILL, as a crash: nothing gets to run.
    pub fn crash(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reaping the daemon");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A test that panicked mid-way must not leave a daemon behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("polling the child") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
