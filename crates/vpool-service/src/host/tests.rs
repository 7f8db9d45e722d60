//! The host's pools opening in the background, with an opener that fails
//! on cue (fault injection; the pools themselves are real local pools).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vpool_engine::{Pool, PoolConfig};
use vpool_store::{LocalDirStore, SegmentStore};

use super::opening::{FIRST_RETRY, START_WAIT};
use super::*;

/// What the opener does for one directory, in turn; when the script is
/// done it opens the pool.
enum Step {
    Fail(ErrorKind),
    /// Blocks until the sender is dropped or sends.
    Block(mpsc::Receiver<()>),
}

#[derive(Default)]
struct ScriptedOpener {
    script: Mutex<HashMap<PathBuf, Vec<Step>>>,
    /// Set when the store of the pool in a directory is closed.
    closed: Mutex<HashMap<PathBuf, Arc<AtomicBool>>>,
    opens: Mutex<Vec<PathBuf>>,
}

impl ScriptedOpener {
    fn then(&self, dir: &Path, step: Step) {
        let mut s = self.script.lock().unwrap();
        s.entry(dir.to_path_buf()).or_default().push(step);
    }

    fn closed(&self, dir: &Path) -> bool {
        self.closed
            .lock()
            .unwrap()
            .get(dir)
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }
}

fn open_local(dir: &Path) -> Result<OpenedPool> {
    let store: Arc<dyn SegmentStore> =
        Arc::new(LocalDirStore::open(dir).map_err(|e| Error::internal(e.to_string()))?);
    let config = PoolConfig {
        background: false,
        ..PoolConfig::default()
    };
    let (pool, _) = Pool::open(Arc::clone(&store), config).map_err(Error::from)?;
    let catalog = Arc::new(Catalog::open(store).map_err(|e| Error::internal(e.to_string()))?);
    Ok(OpenedPool {
        pool,
        catalog,
        kind: PoolKind::Local,
        cache: None,
        close_store: Box::new(|| {}),
    })
}

impl Opener for ScriptedOpener {
    fn open(&self, dir: &Path, _force: bool) -> Result<Opened> {
        self.opens.lock().unwrap().push(dir.to_path_buf());
        let step = {
            let mut s = self.script.lock().unwrap();
            s.get_mut(dir)
                .and_then(|steps| (!steps.is_empty()).then(|| steps.remove(0)))
        };
        match step {
            Some(Step::Fail(kind)) => return Err(Error::new(kind, "scripted failure")),
            Some(Step::Block(rx)) => {
                let _ = rx.recv();
            }
            None => {}
        }
        let mut opened = open_local(dir)?;
        let flag = Arc::new(AtomicBool::new(false));
        self.closed
            .lock()
            .unwrap()
            .insert(dir.to_path_buf(), Arc::clone(&flag));
        opened.close_store = Box::new(move || flag.store(true, Ordering::SeqCst));
        Ok(Opened::Pool(opened))
    }

    fn prepare_s3(&self, _: &str, _: &Path, _: &S3Spec, _: bool, _: bool) -> Result<()> {
        Err(Error::new(ErrorKind::NotSupported, "no S3 here"))
    }

    fn discard_s3(&self, _: &Path) {}
}

/// A home listing pool `other` in `<tmp>/other`, opened with `opener`.
fn host_with(tmp: &Path, opener: &Arc<ScriptedOpener>) -> (Arc<Host>, PathBuf) {
    let home = tmp.join("home");
    let other = tmp.join("other");
    std::fs::create_dir_all(&home).unwrap();
    file::write_host_file(&home, vec![("other".to_string(), other.clone())]).unwrap();
    let default = open_local(&home).unwrap();
    let dyn_opener: Arc<dyn Opener> = Arc::clone(opener) as Arc<dyn Opener>;
    let host = Host::open(&home, "local", default, dyn_opener).unwrap();
    (host, other)
}

fn state_of(host: &Host, name: &str) -> (&'static str, Option<String>) {
    let slot = host.pools().into_iter().find(|s| s.name == name).unwrap();
    let (state, reason) = slot.state.describe();
    (state, reason)
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_pool_that_fails_to_open_is_retried_until_it_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = Arc::new(ScriptedOpener::default());
    opener.then(&tmp.path().join("other"), Step::Fail(ErrorKind::Failed));
    let (host, _) = host_with(tmp.path(), &opener);
    let (state, reason) = state_of(&host, "other");
    assert_eq!(state, "failed");
    assert!(reason.unwrap().contains("scripted failure; retried in"));
    assert!(host.pool(Some("other")).is_err());
    host.pool(None).expect("the default pool serves meanwhile");
    wait_until("the retry", FIRST_RETRY + Duration::from_secs(5), || {
        state_of(&host, "other").0 == "open"
    });
    assert_eq!(opener.opens.lock().unwrap().len(), 2);
    host.close_all().unwrap();
}

#[test]
fn what_waiting_cannot_fix_waits_for_an_operator() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = Arc::new(ScriptedOpener::default());
    opener.then(&tmp.path().join("other"), Step::Fail(ErrorKind::Corrupt));
    let (host, _) = host_with(tmp.path(), &opener);
    let (state, reason) = state_of(&host, "other");
    assert_eq!(
        (state, reason.as_deref()),
        ("failed", Some("scripted failure"))
    );
    std::thread::sleep(FIRST_RETRY + Duration::from_secs(1));
    assert_eq!(state_of(&host, "other").0, "failed", "retried by itself");
    host.open_pool("other", false).expect("opened by hand");
    assert_eq!(state_of(&host, "other").0, "open");
    host.close_all().unwrap();
}

#[test]
fn a_slow_pool_does_not_hold_the_host_back_and_a_detach_closes_it_late() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = Arc::new(ScriptedOpener::default());
    let (release, rx) = mpsc::channel();
    let other = tmp.path().join("other");
    opener.then(&other, Step::Block(rx));
    let started = Instant::now();
    let (host, _) = host_with(tmp.path(), &opener);
    assert!(started.elapsed() < START_WAIT + Duration::from_secs(2));
    assert_eq!(state_of(&host, "other").0, "opening");
    let Err(e) = host.open_pool("other", false) else {
        panic!("opened while an attempt runs")
    };
    assert_eq!(e.kind, ErrorKind::InUse, "{}", e.message);
    host.detach_pool("other", false)
        .expect("a pool being opened detaches");
    assert!(host.pools().iter().all(|s| s.name != "other"));
    release.send(()).unwrap();
    // The attempt ends after the detach: it closes what it opened.
    wait_until("the late close", Duration::from_secs(10), || {
        opener.closed(&other)
    });
    host.close_all().unwrap();
}

#[test]
fn stopping_waits_for_an_attempt_and_closes_what_it_opened() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = Arc::new(ScriptedOpener::default());
    let (release, rx) = mpsc::channel::<()>();
    let other = tmp.path().join("other");
    opener.then(&other, Step::Block(rx));
    let (host, _) = host_with(tmp.path(), &opener);
    assert_eq!(state_of(&host, "other").0, "opening");
    let releaser = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        drop(release);
    });
    let stopping = Instant::now();
    host.close_all().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "close_all waited {:?}",
        stopping.elapsed()
    );
    assert!(
        opener.closed(&other),
        "the pool opened during the stop is closed"
    );
    assert_eq!(state_of(&host, "other").0, "failed");
    releaser.join().unwrap();
}

#[test]
fn a_host_file_that_lists_the_default_pool_or_a_pool_twice_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    let cases = [
        vec![("local", tmp.path().join("a"))],
        vec![("a", tmp.path().join("a")), ("a", tmp.path().join("b"))],
        vec![("a", tmp.path().join("a")), ("b", tmp.path().join("a"))],
        vec![("a", PathBuf::from("relative"))],
        vec![("bad/name", tmp.path().join("a"))],
    ];
    for entries in cases {
        let entries: Vec<(String, PathBuf)> = entries
            .into_iter()
            .map(|(n, d)| (n.to_string(), d))
            .collect();
        file::write_host_file(&home, entries.clone()).unwrap();
        let mut default = open_local(&home).unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&closed);
        default.close_store = Box::new(move || flag.store(true, Ordering::SeqCst));
        let opener: Arc<dyn Opener> = Arc::new(ScriptedOpener::default());
        let Err(e) = Host::open(&home, "local", default, opener) else {
            panic!("{entries:?} accepted")
        };
        assert_eq!(e.kind, ErrorKind::Invalid, "{entries:?}: {}", e.message);
        assert!(e.message.contains(HOST_FILE), "{}", e.message);
        assert!(
            closed.load(Ordering::SeqCst),
            "the home's pool was not closed"
        );
    }
}

#[test]
fn a_pool_added_while_the_host_stops_is_closed_by_the_add() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = Arc::new(ScriptedOpener::default());
    let (host, _) = host_with(tmp.path(), &opener);
    let late = tmp.path().join("late");
    let (release, rx) = mpsc::channel::<()>();
    opener.then(&late, Step::Block(rx));
    let adder = {
        let host = Arc::clone(&host);
        let late = late.clone();
        std::thread::spawn(move || host.add_pool("late", &late).map(|_| ()))
    };
    wait_until("the add to start", Duration::from_secs(5), || {
        opener.opens.lock().unwrap().contains(&late)
    });
    let closer = {
        let host = Arc::clone(&host);
        std::thread::spawn(move || host.close_all())
    };
    std::thread::sleep(Duration::from_millis(300));
    release.send(()).unwrap();
    let added = adder.join().unwrap();
    closer.join().unwrap().unwrap();
    // Either the add finished before the stop took the admin lock (and the
    // stop closed the pool), or it saw the stop and closed it itself.
    assert!(
        opener.closed(&late),
        "the pool added during the stop stays open"
    );
    if let Err(e) = added {
        assert!(e.message.contains("stopping"), "{}", e.message);
    }
}

/// A shared pool's bucket, in memory: volumes exist once attached, and
/// are released when closed, but those in `stuck` (a close that could not
/// upload everything); the names in `unmade` are claimed, without a
/// family.
#[derive(Default)]
struct MemShared {
    unmade: Mutex<Vec<String>>,
    stuck: Mutex<Vec<String>>,
    made: Mutex<Vec<String>>,
}

impl SharedStore for MemShared {
    fn names(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    fn owner(&self, name: &str) -> Result<FamilyOwner> {
        if self.unmade.lock().unwrap().iter().any(|n| n == name) {
            return Ok(FamilyOwner::default());
        }
        if !self.made.lock().unwrap().iter().any(|n| n == name) {
            return Err(Error::new(ErrorKind::NotFound, format!("no volume {name}")));
        }
        let stuck = self.stuck.lock().unwrap().iter().any(|n| n == name);
        Ok(FamilyOwner {
            generation: Some(1),
            holder: stuck.then(|| "this:1".to_string()),
            ..FamilyOwner::default()
        })
    }
    fn create(&self, name: &str, dir: &Path, _: Option<&str>) -> Result<()> {
        self.attach(name, dir)
    }
    fn attach(&self, name: &str, dir: &Path) -> Result<()> {
        self.made.lock().unwrap().push(name.to_string());
        std::fs::create_dir_all(dir).map_err(|e| Error::internal(e.to_string()))
    }
    fn forget(&self, _: &Path) {}
    fn delete_name(&self, name: &str) -> Result<String> {
        self.unmade.lock().unwrap().retain(|n| n != name);
        Ok(name.to_string())
    }
    fn delete_family(&self, _: &str) -> Result<()> {
        Ok(())
    }
    fn peer_secret(&self) -> Result<[u8; 32]> {
        Ok([0; 32])
    }
}

/// A takeover that waits (for a lapsing lease: here an open that blocks)
/// holds up the admin calls on its own volume only: a host that fails
/// over many volumes at once takes them in parallel.
#[test]
fn a_takeover_that_waits_does_not_hold_up_another_volume_s() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = Arc::new(ScriptedOpener::default());
    let sh = Arc::new(SharedCtx::open(
        "shared",
        tmp.path(),
        Arc::new(MemShared::default()),
        &*opener,
    ));
    let slow_dir = tmp.path().join("vols/slow");
    let (release, rx) = mpsc::channel::<()>();
    opener.then(&slow_dir, Step::Block(rx));
    let slow = {
        let (sh, opener) = (Arc::clone(&sh), Arc::clone(&opener));
        std::thread::spawn(move || sh.takeover(&*opener, "slow", false).map(|_| ()))
    };
    wait_until("the slow takeover to start", Duration::from_secs(5), || {
        opener.opens.lock().unwrap().contains(&slow_dir)
    });
    // Another volume: taken over, released, while the slow one waits.
    let fast = {
        let (sh, opener) = (Arc::clone(&sh), Arc::clone(&opener));
        std::thread::spawn(move || {
            sh.takeover(&*opener, "fast", false)?;
            sh.release(&*opener, "fast", false)
        })
    };
    wait_until(
        "another volume's takeover and release",
        Duration::from_secs(5),
        || fast.is_finished(),
    );
    fast.join().unwrap().unwrap();
    // The slow volume's own release waits for its takeover.
    let releasing = {
        let sh = Arc::clone(&sh);
        let opener = Arc::clone(&opener);
        std::thread::spawn(move || sh.release(&*opener, "slow", false))
    };
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !releasing.is_finished(),
        "a release ran during its volume's takeover"
    );
    release.send(()).unwrap();
    slow.join().unwrap().unwrap();
    releasing.join().unwrap().unwrap();
    assert!(sh.owned().is_empty());
}

/// A name whose family was never made (its creation died) is deleted
/// only by force, from any host; a name that does not exist is not found.
#[test]
fn a_name_without_a_family_is_deleted_by_force_only() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = ScriptedOpener::default();
    let store = Arc::new(MemShared::default());
    store.unmade.lock().unwrap().push("half".to_string());
    let sh = SharedCtx::open(
        "shared",
        tmp.path(),
        Arc::clone(&store) as Arc<dyn SharedStore>,
        &opener,
    );
    let e = sh.delete("half", false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InUse, "{}", e.message);
    assert!(e.message.contains("--force"), "{}", e.message);
    sh.delete("half", true).unwrap();
    assert!(store.unmade.lock().unwrap().is_empty());
    assert_eq!(
        sh.delete("half", true).unwrap_err().kind,
        ErrorKind::NotFound
    );
}

/// A release whose close could not get everything into the bucket (the
/// lease is still this host's) fails, and the volume is open here again,
/// served from the cache that holds what the bucket lacks.
#[test]
fn a_release_that_does_not_finish_keeps_the_volume_here() {
    let tmp = tempfile::tempdir().unwrap();
    let opener = ScriptedOpener::default();
    let store = Arc::new(MemShared::default());
    store.stuck.lock().unwrap().push("db1".to_string());
    let sh = SharedCtx::open(
        "shared",
        tmp.path(),
        Arc::clone(&store) as Arc<dyn SharedStore>,
        &opener,
    );
    sh.takeover(&opener, "db1", false).unwrap();
    let e = sh.release(&opener, "db1", false).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Failed, "{}", e.message);
    assert!(e.message.contains("stays on this host"), "{}", e.message);
    assert!(sh.family("db1").is_ok(), "served here again");
    store.stuck.lock().unwrap().clear();
    sh.release(&opener, "db1", false).unwrap();
    assert!(sh.owned().is_empty());
}
