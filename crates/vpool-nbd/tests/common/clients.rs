//! Real NBD clients driven as subprocesses, each taking an NBD URI
//! (`nbd+unix:///EXPORT?socket=PATH` or `nbd://HOST:PORT/EXPORT`), so the same
//! checks can run against any server (this crate in-process, or the full vpool
//! daemon).
//!
//! A missing client binary is a test FAILURE with the package to install,
//! never a silent skip: CI installs qemu-utils, libnbd-bin, nbdkit, fio and
//! python3-libnbd.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// Debian package that provides each client.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-img" | "qemu-io" | "qemu-nbd" => "qemu-utils",
        "nbdinfo" | "nbdcopy" => "libnbd-bin",
        "nbdsh" => "python3-libnbd",
        "fio" => "fio",
        "nbdkit" => "nbdkit",
        _ => "?",
    }
}

/// Locate a required client binary or fail the test with instructions.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in
        std::env::split_paths(&path).chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
    {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required NBD client `{tool}` not found on PATH; install it with `apt-get install -y {}` \
         (these tests drive real clients and must not be skipped)",
        package_of(tool)
    );
}

/// A directory whose `python3` can `import nbd` (python3-libnbd), to put
/// first on PATH for `nbdsh` (which runs `python3 -m nbd`). A pyenv or venv
/// python earlier on PATH usually lacks the system module.
pub fn python_with_libnbd_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut candidates: Vec<PathBuf> = vec![PathBuf::from("/usr/bin/python3")];
        let path = std::env::var_os("PATH").unwrap_or_default();
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("python3")));
        for c in candidates {
            if !c.is_file() {
                continue;
            }
            let ok = Command::new(&c)
                .args(["-c", "import nbd"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return c.parent().map(Path::to_path_buf).unwrap_or_default();
            }
        }
        panic!("no python3 can `import nbd`; install it with `apt-get install -y python3-libnbd`");
    })
    .clone()
}

fn path_with(dir: &Path) -> std::ffi::OsString {
    let old = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![dir.to_path_buf()];
    dirs.extend(std::env::split_paths(&old));
    std::env::join_paths(dirs).unwrap_or(old)
}

/// Run a command with a timeout; returns its output. Panics (fails the test)
/// if it cannot start or runs too long.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{desc} failed: {e}"),
        Err(_) => {
            // Kill only the child we started, by pid.
            let _ = Command::new("kill").arg("-9").arg(id.to_string()).status();
            panic!("{desc} timed out after {timeout:?}");
        }
    }
}

/// Run and require success; returns stdout.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, timeout);
    assert!(
        out.status.success(),
        "{desc} failed with {}:\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

const T: Duration = Duration::from_secs(120);

// ---- qemu-img / qemu-io ------------------------------------------------------

pub fn qemu_img_info(uri: &str) -> String {
    run_ok(
        Command::new(require_tool("qemu-img")).args(["info", "--output=json", uri]),
        T,
    )
}

/// Copy a raw local image into the export (which must be at least as big).
pub fn qemu_img_convert_to(file: &Path, uri: &str) {
    run_ok(
        Command::new(require_tool("qemu-img"))
            .args(["convert", "-n", "-f", "raw", "-O", "raw"])
            .arg(file)
            .arg(uri),
        T,
    );
}

/// Copy the export into a new raw local image.
pub fn qemu_img_convert_from(uri: &str, file: &Path) {
    run_ok(
        Command::new(require_tool("qemu-img"))
            .args(["convert", "-f", "raw", "-O", "raw", uri])
            .arg(file),
        T,
    );
}

/// `qemu-img compare`: true when the contents are identical.
pub fn qemu_img_compare(uri: &str, file: &Path) -> bool {
    let out = run(
        Command::new(require_tool("qemu-img"))
            .args(["compare", "-f", "raw", "-F", "raw", uri])
            .arg(file),
        T,
    );
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!(
            "qemu-img compare failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `qemu-img map --output=json`: list of (start, length, data, zero).
pub fn qemu_img_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let json = run_ok(
        Command::new(require_tool("qemu-img")).args(["map", "--output=json", "-f", "raw", uri]),
        T,
    );
    // Tiny parser for qemu's flat JSON array of objects; avoids a JSON dependency.
    let mut v = Vec::new();
    for obj in json.split('{').skip(1) {
        let field = |name: &str| -> Option<&str> {
            let i = obj.find(&format!("\"{name}\":"))?;
            let rest = obj[i + name.len() + 3..].trim_start();
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            Some(rest[..end].trim())
        };
        let num = |n: &str| {
            field(n)
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("bad map json: {json}"))
        };
        v.push((
            num("start"),
            num("length"),
            field("data") == Some("true"),
            field("zero") == Some("true"),
        ));
    }
    v
}

/// Run qemu-io commands (`-c` each) on the export; returns stdout. Fails the
/// test on a non-zero exit or on any reported failure (qemu-io exits 0 even
/// when a pattern check fails, so the output is checked too).
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new(require_tool("qemu-io"));
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(uri);
    let out = run_ok(&mut c, T);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io reported a failure for {cmds:?}:\n{out}"
    );
    out
}

// ---- libnbd tools ------------------------------------------------------------

pub fn nbdinfo(args: &[&str]) -> String {
    run_ok(Command::new(require_tool("nbdinfo")).args(args), T)
}

/// `nbdinfo --can FEATURE` / `--is FEATURE`: true (exit 0) or false (exit 2).
pub fn nbdinfo_can(uri: &str, flag: &str, feature: &str) -> bool {
    let out = run(
        Command::new(require_tool("nbdinfo"))
            .arg(flag)
            .arg(feature)
            .arg(uri),
        T,
    );
    match out.status.code() {
        Some(0) => true,
        Some(2) => false,
        _ => panic!(
            "nbdinfo {flag} {feature} {uri} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// `nbdinfo --map`: lines of (offset, length, type-number, description).
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u32, String)> {
    let out = nbdinfo(&["--map", uri]);
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let off = it.next()?.parse().ok()?;
            let len = it.next()?.parse().ok()?;
            let typ = it.next()?.parse().ok()?;
            Some((off, len, typ, it.collect::<Vec<_>>().join(" ")))
        })
        .collect()
}

/// `nbdcopy SRC DST` with extra flags (e.g. `--connections=4`).
pub fn nbdcopy(src: &str, dst: &str, extra: &[&str]) {
    run_ok(
        Command::new(require_tool("nbdcopy"))
            .args(extra)
            .arg(src)
            .arg(dst),
        T,
    );
}

/// Run a Python script under `nbdsh -n` with the given environment
/// variables; fails the test if the script raises. Returns stdout.
pub fn nbdsh_script(script: &str, env: &[(&str, &str)]) -> String {
    let nbdsh = require_tool("nbdsh");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("script.py");
    std::fs::write(&path, script).expect("write script");
    let mut c = Command::new(nbdsh);
    c.env("PATH", path_with(&python_with_libnbd_dir()));
    c.arg("-n").arg("-c").arg(format!(
        "exec(open({:?}).read())",
        path.display().to_string()
    ));
    for (k, v) in env {
        c.env(k, v);
    }
    run_ok(&mut c, T)
}

// ---- fio -----------------------------------------------------------------------

/// fio's nbd engine: random writes with crc32c verification at queue depth
/// `iodepth` over the first `size` bytes of the export.
pub fn fio_verify(uri: &str, size: &str, bs: &str, iodepth: u32) -> String {
    let out = run_ok(
        Command::new(require_tool("fio")).args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            &format!("--size={size}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would otherwise drop a verify-state file into the cwd.
            "--verify_state_save=0",
            "--output-format=normal",
        ]),
        T,
    );
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
    out
}

/// fio's nbd engine for `secs` seconds: random 4 KiB writes over the
/// first `size` bytes at queue depth `iodepth`, each read back and checked
/// (crc32c) while the run goes on (`verify_backlog`). Asserts no error.
pub fn fio_verify_for(uri: &str, size: &str, iodepth: u32, secs: u32) -> String {
    let out = run_ok(
        Command::new(require_tool("fio")).args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            &format!("--iodepth={iodepth}"),
            &format!("--size={size}"),
            "--time_based",
            &format!("--runtime={secs}"),
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ]),
        Duration::from_secs(u64::from(secs) + 60),
    );
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
    out
}

/// fio random I/O benchmark; returns IOPS.
pub fn fio_iops(uri: &str, rw: &str, bs: &str, iodepth: u32, size: &str, seconds: u32) -> f64 {
    let out = run_ok(
        Command::new(require_tool("fio")).args([
            "--name=bench",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            &format!("--size={size}"),
            &format!("--runtime={seconds}"),
            "--time_based",
            "--output-format=terse",
            "--terse-version=3",
        ]),
        T + Duration::from_secs(u64::from(seconds)),
    );
    // Terse v3: field 8 is read IOPS, field 49 write IOPS (1-based).
    let line = out
        .lines()
        .find(|l| l.starts_with("3;"))
        .unwrap_or_else(|| panic!("no terse output:\n{out}"));
    let f: Vec<&str> = line.split(';').collect();
    let read: f64 = f.get(7).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    let write: f64 = f.get(48).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    read + write
}
