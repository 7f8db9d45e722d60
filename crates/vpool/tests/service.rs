//! vpool as a system service: the systemd unit the repository ships
//! (checked by `systemd-analyze verify`), `sd_notify` readiness and stop
//! notices on a real datagram socket as systemd's, the configuration file
//! (home, log filter, serve keys; unknown keys refused), SIGHUP re-reading
//! it without killing the daemon, and management actions logged at INFO
//! with who did them; the Debian package `scripts/build-deb.sh` makes,
//! installed with `dpkg --root` and installed again over itself.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, vpool_bin};

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../packaging/vpool.service");

/// `systemd-analyze verify` finds nothing to say about the unit (it exits 0
/// on unknown keys, so its output must be empty too), with `ExecStart`
/// pointed at the built binary.
#[test]
fn the_systemd_unit_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("systemd-analyze is missing: scripts/install-deps.sh installs systemd");
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(UNIT).unwrap();
    assert!(unit.contains("Type=notify") && unit.contains("ExecReload="));
    let unit = unit.replace("/usr/bin/vpool", vpool_bin());
    let path = dir.path().join("vpool.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}

/// A child process killed when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits up to 20 s for a datagram on `sock`.
fn next_notice(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let n = sock
        .recv(&mut buf)
        .expect("no sd_notify message within 20 s");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Polls `cond` on the daemon's log for up to 10 s.
fn wait_log(path: &Path, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = log_of(path);
        if cond(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {what} in the log:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon as systemd runs it: `--config FILE serve`, no `--home`, no
/// `$VPOOL_LOG`, `$NOTIFY_SOCKET` set.
#[test]
fn configured_daemon_notifies_reloads_and_logs_actions() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let conf = dir.path().join("vpool.toml");
    let write_conf = |log: &str, extra: &str| {
        let text = format!(
            "home = {:?}\nlog = {log:?}\n{extra}",
            home.display().to_string()
        );
        std::fs::write(&conf, text).unwrap();
    };
    write_conf("info", "nbd_listen = \"127.0.0.1:0\"\n");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    let log = dir.path().join("serve.log");
    let child = Command::new(vpool_bin())
        .arg("--config")
        .arg(&conf)
        .arg("serve")
        .env_remove("VPOOL_HOME")
        .env_remove("VPOOL_LOG")
        .env_remove("RUST_LOG")
        .env("NOTIFY_SOCKET", &notify_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Killed if an assertion fails first.
    let mut child = KillOnDrop(child);
    let ready = next_notice(&notify);
    assert!(ready.starts_with("READY=1\n"), "{ready}");
    // The CLI finds the home through the same file.
    let cli = |args: &[&str]| {
        let out = Command::new(vpool_bin())
            .arg("--config")
            .arg(&conf)
            .args(args)
            .env_remove("VPOOL_HOME")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    cli(&["vol", "create", "web1", "--size", "1M"]);
    assert!(home.join("nbd.sock").exists(), "the home is not the file's");
    // A management action: who, what, the result, at INFO.
    let text = wait_log(&log, "logged action", |t| t.contains("api action done"));
    let line = text
        .lines()
        .find(|l| l.contains("api action done"))
        .unwrap();
    assert!(
        line.contains("INFO")
            && line.contains("who=\"uid ")
            && line.contains("path=\"/v1/volumes\""),
        "{line}"
    );
    // Reads are DEBUG: not shown at `info`.
    cli(&["vol", "list"]);
    assert!(!log_of(&log).contains("api request"), "DEBUG lines at info");

    // SIGHUP: the new log filter applies at once; a changed listener is
    // named as needing a restart; the daemon lives on.
    write_conf("debug", "nbd_listen = \"127.0.0.1:1\"\n");
    let pid = child.0.id() as libc::pid_t;
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(next_notice(&notify).starts_with("RELOADING=1\n"));
    assert!(next_notice(&notify).starts_with("READY=1\n"));
    let text = wait_log(&log, "reload", |t| t.contains("log filter applied"));
    assert!(
        text.contains("nbd_listen"),
        "the restart key is not named:\n{text}"
    );
    cli(&["vol", "list"]);
    wait_log(&log, "DEBUG request line", |t| t.contains("api request"));
    // A file that no longer parses changes nothing and kills nothing.
    write_conf("info", "nbd_listn = \"127.0.0.1:1\"\n");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    wait_log(&log, "parse error", |t| {
        t.contains("does not parse") && t.contains("nbd_listn")
    });
    common::run_ok(&home, &["vol", "info", "web1"]);
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "SIGHUP ended the daemon"
    );

    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut notices = vec![next_notice(&notify)];
    while !notices.last().unwrap().starts_with("STOPPING=1") {
        notices.push(next_notice(&notify));
    }
    let status = common::wait_timeout(&mut child.0, Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}

/// A misspelt key stops the start with a message that names it; `--config`
/// must name a file that exists.
#[test]
fn a_bad_configuration_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("vpool.toml");
    std::fs::write(&conf, "home = \"/tmp/x\"\nnbd_max_conections = 5\n").unwrap();
    let pool = dir.path().join("pool");
    let out = common::vpool_cmd(&pool)
        .arg("--config")
        .arg(&conf)
        .arg("serve")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("nbd_max_conections"),
        "{err}"
    );
    assert!(!pool.exists(), "a refused start made the pool");
    let out = common::vpool_cmd(&pool)
        .args(["--config", "/nonexistent/vpool.toml", "vol", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("/nonexistent/vpool.toml"),
        "{err}"
    );
    // And the daemon still starts without one.
    let d = Daemon::start(&pool, &[]);
    assert!(d.terminate().success());
}

/// `scripts/build-deb.sh` (packaging the test's binary): `dpkg -i` into an
/// empty root gives the binary, the unit and the configuration file, and
/// installing it again keeps a locally edited configuration (a conffile).
#[test]
fn the_debian_package_installs_and_keeps_local_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new("bash")
        .arg(format!("{repo}/scripts/build-deb.sh"))
        .args(["--binary", vpool_bin(), "--compress", "none", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build-deb.sh: {err}");
    let deb = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(root.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let dpkg_install = || {
        let out = Command::new("dpkg")
            .arg(format!("--root={}", root.display()))
            .args([
                "--force-script-chrootless",
                "--force-depends",
                "--log=/dev/null",
                "-i",
            ])
            .arg(&deb)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "dpkg -i: {said}");
    };
    dpkg_install();
    let installed = root.join("usr/bin/vpool");
    let v = Command::new(&installed).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("vpool "));
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/vpool.service")).unwrap();
    assert_eq!(unit, std::fs::read_to_string(UNIT).unwrap());
    let conf = root.join("etc/vpool/vpool.toml");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("home = \"/var/lib/vpool\""), "{text}");
    std::fs::write(&conf, text.replace("log = \"info\"", "log = \"warn\"")).unwrap();
    dpkg_install();
    let again = std::fs::read_to_string(&conf).unwrap();
    assert!(
        again.contains("log = \"warn\""),
        "the reinstall replaced the edited conffile"
    );
}
