//! [`AlreadyRunning`]: a pool directory (or a daemon's home) whose lock
//! another process holds, as the daemon and `pool check` report it.

/// Another process holds the pool's lock.
#[derive(Debug)]
pub struct AlreadyRunning {
    pub pool: String,
    pub lock_file: String,
    pub pid: Option<u32>,
}

impl std::fmt::Display for AlreadyRunning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let who = match self.pid {
            Some(pid) => format!("another vpool process (pid {pid})"),
            None => "another vpool process".to_string(),
        };
        write!(
            f,
            "pool {} is already served by {who}: it holds the lock on {}; stop that daemon first, or use another --home",
            self.pool, self.lock_file
        )
    }
}

impl std::error::Error for AlreadyRunning {}
