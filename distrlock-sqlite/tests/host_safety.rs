//! The embedded backend on its host: a database file deleted or replaced under
//! a holder, processes in another time namespace, and filesystems SQLite's
//! locking does not work on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockKey, LockManager, LossReason, Token, Ttl,
};
use distrlock_sqlite::{SqliteBackend, SqliteConfig};
use tokio::time::Instant;

const LONG: Duration = Duration::from_secs(30);

/// A `not_after` for calls that are expected to answer.
fn soon() -> Instant {
    Instant::now() + LONG
}

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).unwrap()
}

async fn fresh(dir: &Path) -> (PathBuf, SqliteBackend) {
    let path = dir.join("locks.db");
    let backend = SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap())
        .await
        .unwrap();
    backend.create_table().await.unwrap();
    (path, backend)
}

async fn hold(backend: &SqliteBackend, key: &LockKey) -> Token {
    let token = Token::new();
    let outcome = backend
        .try_acquire(key, &token, ttl(LONG), "holder", soon())
        .await
        .unwrap();
    assert!(
        matches!(outcome, AcquireOutcome::Acquired { .. }),
        "{outcome:?}"
    );
    token
}

/// Deletes the file as a tmp cleaner would: the database and its WAL and
/// shared-memory files.
fn delete_database(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_owned();
        name.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(name));
    }
}

fn assert_replaced_error(error: &Error, what: &str) {
    match error {
        Error::Unavailable { message, .. } => {
            assert!(
                message.contains(what),
                "message should say {what:?}: {message}"
            )
        }
        other => panic!("expected Unavailable saying {what:?}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_database_file_fails_the_holders_next_extend() {
    let dir = tempfile::tempdir().unwrap();
    let (path, backend) = fresh(dir.path()).await;
    let key = LockKey::new("deleted").unwrap();
    let token = hold(&backend, &key).await;
    delete_database(&path);
    let error = backend
        .extend(&key, &token, ttl(LONG), soon())
        .await
        .expect_err("an extend in the unlinked file must not succeed");
    assert_replaced_error(&error, "deleted");
    // The next process creates a new file and is granted the key at once; the
    // path now names another file.
    let (_, next) = fresh(dir.path()).await;
    hold(&next, &key).await;
    let error = backend
        .extend(&key, &token, ttl(LONG), soon())
        .await
        .expect_err("an extend in the unlinked file must not succeed");
    assert_replaced_error(&error, "replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_database_file_fails_the_holders_next_extend() {
    let dir = tempfile::tempdir().unwrap();
    let (path, backend) = fresh(dir.path()).await;
    let key = LockKey::new("replaced").unwrap();
    let token = hold(&backend, &key).await;
    // A deploy ships a fresh file, or a backup is restored, over the old one.
    let other = tempfile::tempdir().unwrap();
    let (fresh_path, fresh_backend) = fresh(other.path()).await;
    drop(fresh_backend);
    std::fs::rename(&fresh_path, &path).unwrap();
    let error = backend
        .extend(&key, &token, ttl(LONG), soon())
        .await
        .expect_err("an extend in the replaced file must not succeed");
    assert_replaced_error(&error, "replaced");
    // Every other call says the same, acquire included.
    let error = backend
        .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
        .await
        .unwrap_err();
    assert_replaced_error(&error, "replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guard_on_a_deleted_file_is_lost_by_its_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let (path, backend) = fresh(dir.path()).await;
    let lease = Duration::from_secs(3);
    let manager = LockManager::builder(backend).ttl(lease).build().unwrap();
    let guard = manager
        .lock("guarded")
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let deadline = guard.deadline();
    delete_database(&path);
    tokio::time::timeout_at(deadline + Duration::from_millis(500), guard.lost())
        .await
        .expect("the guard is lost by its deadline");
    assert_eq!(guard.loss_reason(), Some(LossReason::Unreachable));
}

/// The environment variable that turns [`time_namespace_child`] on, naming the
/// database file.
const CHILD_DB: &str = "DISTRLOCK_TEST_TIMENS_DB";

/// Half of [`a_process_in_another_time_namespace_sees_leases_as_they_are`], run
/// by that test in this same binary under `unshare --time`: tries `busy` (held
/// by the parent), acquires `mine` for 30 s and leaves it held, and prints what
/// it saw. Does nothing when run on its own.
#[tokio::test(flavor = "current_thread")]
#[ignore = "run by a_process_in_another_time_namespace_sees_leases_as_they_are"]
async fn time_namespace_child() {
    let Ok(path) = std::env::var(CHILD_DB) else {
        return;
    };
    let backend = SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap())
        .await
        .unwrap();
    let busy = backend
        .try_acquire(
            &LockKey::new("busy").unwrap(),
            &Token::new(),
            ttl(LONG),
            "child",
            soon(),
        )
        .await
        .unwrap();
    let mine = backend
        .try_acquire(
            &LockKey::new("mine").unwrap(),
            &Token::new(),
            ttl(LONG),
            "child",
            soon(),
        )
        .await
        .unwrap();
    let show = |outcome: &AcquireOutcome| match outcome {
        AcquireOutcome::Acquired { .. } => "acquired".to_owned(),
        AcquireOutcome::Held { .. } => "held".to_owned(),
    };
    println!("CHILD busy={} mine={}", show(&busy), show(&mine));
}

/// `unshare --time --monotonic 3600`: a process whose `CLOCK_MONOTONIC` reads an
/// hour ahead, with the same boot id. It must see the parent's live lease as
/// live (not as ended an hour ago), and the lease it takes must last its 30 s
/// for everyone else (not an hour and 30 s).
#[test]
fn a_process_in_another_time_namespace_sees_leases_as_they_are() {
    let test = "a_process_in_another_time_namespace_sees_leases_as_they_are";
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (path, backend) = runtime.block_on(fresh(dir.path()));
    runtime.block_on(hold(&backend, &LockKey::new("busy").unwrap()));
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new("unshare")
        .args(["--time", "--monotonic", "3600", "--"])
        .arg(&exe)
        .args([
            "--exact",
            "time_namespace_child",
            "--ignored",
            "--nocapture",
        ])
        .env(CHILD_DB, &path)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(error) => {
            distrlock_testkit::skip(test, &format!("cannot run unshare(1): {error}"));
            return;
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() && stderr.contains("unshare failed") {
        distrlock_testkit::skip(
            test,
            &format!("time namespaces are not available here: {}", stderr.trim()),
        );
        return;
    }
    assert!(
        output.status.success(),
        "the child failed: {stdout}\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("CHILD "))
        .unwrap_or_else(|| panic!("no report from the child: {stdout}\n{stderr}"));
    assert_eq!(
        line, "CHILD busy=held mine=acquired",
        "the child must not be granted the live lease"
    );
    // The child's lease, seen from here: held, for at most its 30 s.
    let outcome = runtime
        .block_on(backend.try_acquire(
            &LockKey::new("mine").unwrap(),
            &Token::new(),
            ttl(LONG),
            "parent",
            soon(),
        ))
        .unwrap();
    match outcome {
        AcquireOutcome::Held {
            remaining: Some(left),
        } => assert!(
            left <= LONG,
            "the child's 30 s lease has {left:?} left here"
        ),
        other => panic!("the child's lease must be held for at most 30 s, got {other:?}"),
    }
}

/// The refusal of network filesystems lets local ones through: the temporary
/// directory (overlay or ext4 here), and tmpfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_filesystems_open() {
    let dir = tempfile::tempdir().unwrap();
    fresh(dir.path()).await;
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        let dir = tempfile::tempdir_in(shm).unwrap();
        let url = format!("sqlite://{}/locks.db", dir.path().display());
        SqliteBackend::connect(&url).await.unwrap();
        SqliteBackend::connect(&format!("{url}?allow_network_filesystem=false"))
            .await
            .unwrap();
    }
    let url = format!(
        "sqlite://{}/other.db?allow_network_filesystem=true",
        dir.path().display()
    );
    let backend = SqliteBackend::connect(&url).await.unwrap();
    assert_eq!(backend.path(), dir.path().join("other.db"));
    for bad in ["?allow_network_filesystem=maybe", "?journal_mode=off"] {
        let url = format!("sqlite://{}/x.db{bad}", dir.path().display());
        assert!(
            matches!(
                SqliteBackend::connect(&url).await,
                Err(Error::InvalidConfig { .. })
            ),
            "{bad}"
        );
    }
}
