//! The embedded backend on its host: a database file deleted or replaced under
//! a holder, processes in another time namespace, and filesystems SQLite's
//! locking does not work on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockKey, LockManager, LossReason, Token, Ttl,
};
use distrlock_sqlite::SqliteBackend;
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
    let backend = SqliteBackend::open(&path).await.unwrap();
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
