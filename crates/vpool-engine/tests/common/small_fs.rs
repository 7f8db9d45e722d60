//! A small file system for full-disk tests: a tmpfs of a given size,
//! unmounted when dropped. Shared by the engine's, the daemon's and the S3
//! store's tests (`#[path = ".../small_fs.rs"] mod small_fs;`).

use std::path::{Path, PathBuf};

pub struct SmallFs(pub PathBuf);

impl SmallFs {
    /// Mounts a tmpfs of `size_mib` MiB at `path` (created if missing).
    /// `None` (the test skips) only when not root: CI runs as root, where a
    /// failed mount fails the test.
    pub fn mount(path: &Path, size_mib: u64) -> Option<SmallFs> {
        std::fs::create_dir_all(path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                unsafe { libc::geteuid() } != 0,
                "root could not mount a tmpfs for the full-disk test"
            );
            eprintln!("skipped: mounting a tmpfs needs root");
            return None;
        }
        Some(SmallFs(path.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
