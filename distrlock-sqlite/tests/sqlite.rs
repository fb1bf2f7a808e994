//! What is particular to SQLite: several backends (as several processes would)
//! sharing one file, typed errors for the file's failure modes, and rows written
//! under another clock.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{AcquireOutcome, Error, LockBackend, LockKey, LockState, Token, Ttl};
use distrlock_sqlite::rusqlite::{Connection, params};
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

async fn fresh() -> (tempfile::TempDir, std::path::PathBuf, SqliteBackend) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("locks.db");
    let backend = SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap())
        .await
        .unwrap();
    backend.create_table().await.unwrap();
    (dir, path, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backends_on_one_file_exclude_each_other_and_share_fences() {
    let (_dir, path, first) = fresh().await;
    // Eight independent connections, as eight processes would have.
    let mut backends = vec![Arc::new(first)];
    for _ in 0..7 {
        backends.push(Arc::new(
            SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap())
                .await
                .unwrap(),
        ));
    }
    let key = LockKey::new("shared").unwrap();
    let mut tasks = Vec::new();
    for backend in &backends {
        let (backend, key) = (backend.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            backend
                .try_acquire(&key, &Token::new(), ttl(LONG), "racer", soon())
                .await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        if let AcquireOutcome::Acquired { .. } = task.await.unwrap().unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1, "exactly one of eight connections wins");

    // Take turns through different connections: fences grow across them.
    let key = LockKey::new("turns").unwrap();
    let mut last = 0;
    for round in 0..24 {
        let backend = &backends[round % backends.len()];
        let token = Token::new();
        let AcquireOutcome::Acquired { fence, .. } = backend
            .try_acquire(&key, &token, ttl(LONG), "turn", soon())
            .await
            .unwrap()
        else {
            panic!("the key was released, so it must be free");
        };
        assert!(fence.get() > last, "fence {fence} after {last}");
        last = fence.get();
        let other = &backends[(round + 1) % backends.len()];
        other
            .release(&key, &token, soon())
            .await
            .expect("any connection releases with the right token");
    }
}

#[tokio::test]
async fn missing_table_is_schema_missing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = SqliteBackend::from_config(
        SqliteConfig::builder()
            .path(dir.path().join("locks.db"))
            .table("no_such_locks")
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let key = LockKey::new("k").unwrap();
    let result = backend
        .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
        .await;
    match result {
        Err(Error::SchemaMissing { table, .. }) => assert_eq!(table, "no_such_locks"),
        other => panic!("expected SchemaMissing, got {other:?}"),
    }
    assert!(matches!(
        backend.list().await,
        Err(Error::SchemaMissing { .. })
    ));
    backend.create_table().await.unwrap();
    backend
        .create_table()
        .await
        .expect("create_table is idempotent");
    assert!(backend.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn unopenable_file_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("locks.db");
    match SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap()).await {
        Err(error @ Error::Unavailable { .. }) => {
            assert!(error.is_transient());
            assert!(
                error.to_string().contains("missing-dir"),
                "the message names the file: {error}"
            );
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn a_file_that_is_not_a_database_is_a_permanent_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notes.txt");
    std::fs::write(
        &path,
        "this is not a database, just some text in a file\n".repeat(100),
    )
    .unwrap();
    match SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap()).await {
        Err(error @ Error::Backend { .. }) => assert!(!error.is_transient(), "{error}"),
        other => panic!("expected a permanent backend error, got {other:?}"),
    }
}

#[tokio::test]
async fn qualified_or_injected_table_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["main.locks", "locks; DROP TABLE x", "", "1locks"] {
        let result = SqliteConfig::builder()
            .path(dir.path().join("locks.db"))
            .table(bad)
            .build();
        assert!(
            matches!(result, Err(Error::InvalidTableName { .. })),
            "{bad:?} must be refused, got {result:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_lock_held_past_the_lock_timeout_is_transient() {
    let (_dir, path, _) = fresh().await;
    let backend = SqliteBackend::from_config(
        SqliteConfig::builder()
            .path(&path)
            .lock_timeout(Duration::from_millis(100))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(backend.config().lock_timeout(), Duration::from_millis(100));
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let key = LockKey::new("busy").unwrap();
    let started = std::time::Instant::now();
    let result = backend
        .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
        .await;
    match result {
        Err(error @ Error::Backend { .. }) => assert!(error.is_transient(), "{error}"),
        other => panic!("expected a transient error, got {other:?}"),
    }
    assert!(
        started.elapsed() >= Duration::from_millis(90),
        "waited the busy timeout"
    );
    blocker.execute_batch("ROLLBACK").unwrap();
    assert!(matches!(
        backend
            .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
}

/// A row written on another clock (an earlier boot, or a sandboxed process that
/// fell back to the wall clock) is judged by its wall-clock expiry: respected while
/// that lies ahead, taken over once it has passed, whatever its `lease_end` says.
#[tokio::test]
async fn a_lease_on_another_clock_lasts_until_its_wall_clock_expiry() {
    let (_dir, path, backend) = fresh().await;
    let key = LockKey::new("other-clock").unwrap();
    let token = Token::new();
    let AcquireOutcome::Acquired { fence, .. } = backend
        .try_acquire(&key, &token, ttl(LONG), "o", soon())
        .await
        .unwrap()
    else {
        panic!("free key");
    };
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    let conn = Connection::open(&path).unwrap();
    let rewrite = |expires_at: i64| {
        // A lease end that means nothing on this process's clock.
        conn.execute(
            "UPDATE distributed_locks SET clock = 'boot:other', lease_end = ?1, expires_at = ?2 \
             WHERE lock_key = ?3",
            params![i64::MAX / 2, expires_at, key.as_str()],
        )
        .unwrap()
    };
    // Still ahead on the wall clock: held.
    assert_eq!(rewrite(wall_now + 30_000_000), 1);
    let info = backend.inspect(&key).await.unwrap().unwrap();
    assert_eq!(info.state, LockState::Held);
    let left = info
        .remaining
        .expect("a held lock reports its remaining lease");
    assert!(
        left > Duration::from_secs(20) && left <= Duration::from_secs(30),
        "{left:?}"
    );
    assert!(matches!(
        backend
            .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { remaining: Some(_) }
    ));
    // Past on the wall clock: expired, and taken over with a greater fence.
    assert_eq!(rewrite(wall_now - 1_000_000), 1);
    let info = backend.inspect(&key).await.unwrap().unwrap();
    assert_eq!(info.state, LockState::Expired);
    assert!(matches!(
        backend.extend(&key, &token, ttl(LONG), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    let AcquireOutcome::Acquired { fence: next, .. } = backend
        .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
        .await
        .unwrap()
    else {
        panic!("a lease whose wall-clock expiry passed must not hold the key");
    };
    assert!(next > fence);
}

#[tokio::test]
async fn an_exhausted_fence_is_refused_without_a_change() {
    let (_dir, path, backend) = fresh().await;
    let key = LockKey::new("exhausted").unwrap();
    let token = Token::new();
    backend
        .try_acquire(&key, &token, ttl(LONG), "o", soon())
        .await
        .unwrap();
    backend.release(&key, &token, soon()).await.unwrap();
    let conn = Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE distributed_locks SET fence = ?1 WHERE lock_key = ?2",
        params![i64::MAX, key.as_str()],
    )
    .unwrap();
    let result = backend
        .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
        .await;
    assert!(
        matches!(&result, Err(error @ Error::Backend { .. }) if !error.is_transient()),
        "got {result:?}"
    );
    let info = backend.inspect(&key).await.unwrap().unwrap();
    assert_eq!(info.fence.get(), i64::MAX);
    assert_eq!(info.state, LockState::Released);
}

#[tokio::test]
async fn connect_parses_sqlite_urls() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("url.db");
    let url = format!("sqlite://{}", path.display());
    let backend = SqliteBackend::connect(&url).await.unwrap();
    assert_eq!(backend.path(), path);
    assert!(matches!(
        SqliteBackend::connect("mysql://root@localhost/test").await,
        Err(Error::InvalidConfig { .. })
    ));
    assert!(backend.schema_sql().contains("\"distributed_locks\""));
}

/// Contract item 8 on the connection thread's queue: requests queued behind a
/// slow one (here, one waiting for another process's write lock) and picked up
/// after their `not_after` change nothing and fail transiently, whether their
/// caller still waits for the answer or has given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_picked_up_after_their_bound_change_nothing() {
    let (_dir, path, backend) = fresh().await;
    let backend = Arc::new(backend);
    let held = LockKey::new("held").unwrap();
    let token = Token::new();
    backend
        .try_acquire(&held, &token, ttl(LONG), "holder", soon())
        .await
        .unwrap();
    let before = backend.inspect(&held).await.unwrap().unwrap();

    // Another process holds the write lock: the next statement waits for it.
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let slow_key = LockKey::new("slow").unwrap();
    let slow = {
        let (backend, key) = (backend.clone(), slow_key.clone());
        tokio::spawn(async move {
            backend
                .try_acquire(&key, &Token::new(), ttl(LONG), "slow", soon())
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Queued behind it, each with a bound long before the slow one finishes.
    let bound = Instant::now() + Duration::from_millis(200);
    let abandoned_key = LockKey::new("abandoned").unwrap();
    let abandoned = {
        let (backend, key) = (backend.clone(), abandoned_key.clone());
        tokio::spawn(async move {
            // The caller gives up at its bound and drops the call.
            tokio::time::timeout_at(
                bound,
                backend.try_acquire(&key, &Token::new(), ttl(LONG), "late", bound),
            )
            .await
            .is_err()
        })
    };
    let late_acquire = {
        let backend = backend.clone();
        tokio::spawn(async move {
            let key = LockKey::new("late").unwrap();
            backend
                .try_acquire(&key, &Token::new(), ttl(LONG), "late", bound)
                .await
        })
    };
    let late_extend = {
        let (backend, key) = (backend.clone(), held.clone());
        tokio::spawn(async move { backend.extend(&key, &token, ttl(LONG), bound).await })
    };
    let late_batch = {
        let (backend, key) = (backend.clone(), held.clone());
        tokio::spawn(async move { backend.extend_many(&[(key, token)], ttl(LONG), bound).await })
    };
    let late_release = {
        let (backend, key) = (backend.clone(), held.clone());
        tokio::spawn(async move { backend.release(&key, &token, bound).await })
    };

    // Let the slow statement through well after the bound.
    tokio::time::sleep_until(bound + Duration::from_millis(300)).await;
    blocker.execute_batch("ROLLBACK").unwrap();
    assert!(
        matches!(
            slow.await.unwrap().unwrap(),
            AcquireOutcome::Acquired { .. }
        ),
        "the slow statement itself was within its bound"
    );
    assert!(abandoned.await.unwrap(), "the caller gave up");

    fn refused<T: std::fmt::Debug>(what: &str, result: distrlock_core::Result<T>) {
        match result {
            Err(error @ Error::Unavailable { .. }) => assert!(error.is_transient()),
            other => panic!("the late {what} must be refused as unavailable, got {other:?}"),
        }
    }
    refused("acquire", late_acquire.await.unwrap());
    refused("extend", late_extend.await.unwrap());
    refused("extend_many", late_batch.await.unwrap());
    refused("release", late_release.await.unwrap());

    // Nothing changed: no row for the late acquires, the lease as it was.
    assert_eq!(backend.inspect(&abandoned_key).await.unwrap(), None);
    let late_key = LockKey::new("late").unwrap();
    assert_eq!(backend.inspect(&late_key).await.unwrap(), None);
    let after = backend.inspect(&held).await.unwrap().unwrap();
    assert_eq!(after.state, LockState::Held, "the late release did nothing");
    assert_eq!(
        after.expires_at, before.expires_at,
        "the late extends did nothing"
    );
    // Requests within their bound still work.
    backend.release(&held, &token, soon()).await.unwrap();
}

/// Item 9: the reading returned with a grant and a renewal matches the stored
/// wall-clock times of that statement, and moves with real time.
#[tokio::test]
async fn grants_and_renewals_return_the_statements_clock_reading() {
    let (_dir, _path, backend) = fresh().await;
    let key = LockKey::new("reading").unwrap();
    let token = Token::new();
    let AcquireOutcome::Acquired { server_time, .. } = backend
        .try_acquire(&key, &token, ttl(LONG), "o", soon())
        .await
        .unwrap()
    else {
        panic!("free key");
    };
    let info = backend.inspect(&key).await.unwrap().unwrap();
    let apart = |a: std::time::SystemTime, b: std::time::SystemTime| match a.duration_since(b) {
        Ok(d) => d,
        Err(e) => e.duration(),
    };
    assert!(apart(server_time, info.acquired_at) < Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let renewed = backend
        .extend(&key, &token, ttl(LONG), soon())
        .await
        .unwrap();
    let moved = renewed.duration_since(server_time).unwrap();
    assert!(
        moved >= Duration::from_millis(45) && moved < Duration::from_secs(5),
        "{moved:?}"
    );
    let info = backend.inspect(&key).await.unwrap().unwrap();
    assert!(apart(renewed + LONG, info.expires_at.unwrap()) < Duration::from_secs(1));
    let batch = backend
        .extend_many(&[(key.clone(), token)], ttl(LONG), soon())
        .await
        .unwrap();
    assert!(*batch[0].as_ref().unwrap() >= renewed);
}

/// A table made before the line of waiters: the lock statements fail with a
/// hint, and `create_table` adds the line's columns, keeping the live lock.
#[tokio::test]
async fn create_table_adds_the_line_to_a_table_made_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let conn = Connection::open(&path).unwrap();
    // The table as the earlier version made it, with a lock held for an hour
    // on the wall clock (another clock's row: its wall-clock expiry decides).
    conn.execute_batch(
        "CREATE TABLE distributed_locks (
            lock_key TEXT NOT NULL PRIMARY KEY, token TEXT NOT NULL,
            fence INTEGER NOT NULL, owner TEXT NOT NULL, acquired_at INTEGER NOT NULL,
            expires_at INTEGER, clock TEXT NOT NULL, lease_end INTEGER
         ) STRICT, WITHOUT ROWID;",
    )
    .unwrap();
    let wall_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    conn.execute(
        "INSERT INTO distributed_locks VALUES ('held-before', 'x', 7, 'old', ?1, ?2, 'elsewhere', 1)",
        params![wall_us, wall_us + 3_600_000_000],
    )
    .unwrap();
    drop(conn);
    let backend = SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap())
        .await
        .unwrap();
    let key = LockKey::new("after").unwrap();
    let error = backend
        .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
        .await
        .expect_err("the lock statements need the line's columns");
    assert!(
        error.to_string().contains("create_table"),
        "no hint in: {error}"
    );
    assert!(!error.is_transient(), "{error:?}");
    backend.create_table().await.unwrap();
    // Twice: the second finds the columns and changes nothing.
    backend.create_table().await.unwrap();
    let token = Token::new();
    assert!(matches!(
        backend
            .try_acquire(&key, &token, ttl(LONG), "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
    backend.release(&key, &token, soon()).await.unwrap();
    let held = LockKey::new("held-before").unwrap();
    assert!(matches!(
        backend
            .try_acquire(&held, &Token::new(), ttl(LONG), "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    let info = backend.inspect(&held).await.unwrap().unwrap();
    assert_eq!((info.fence.get(), info.state), (7, LockState::Held));
}

/// A release recorded later than the clock now reads (the clock went back after
/// it) counts as no time since: a key with nobody in line is free at once.
#[tokio::test]
async fn a_release_after_a_clock_step_back_leaves_the_key_free() {
    let (_dir, path, backend) = fresh().await;
    let key = LockKey::new("stepped").unwrap();
    let token = Token::new();
    backend
        .try_acquire(&key, &token, ttl(LONG), "o", soon())
        .await
        .unwrap();
    backend.release(&key, &token, soon()).await.unwrap();
    // As if the clock stepped back 10 minutes after the release.
    let conn = Connection::open(&path).unwrap();
    conn.execute(
        "UPDATE distributed_locks SET freed_at = freed_at + 600000000 WHERE lock_key = ?1",
        params![key.as_str()],
    )
    .unwrap();
    let outcome = backend
        .try_acquire(&key, &Token::new(), ttl(LONG), "o", soon())
        .await;
    assert!(
        matches!(outcome, Ok(AcquireOutcome::Acquired { .. })),
        "got {outcome:?}"
    );
}

/// A backend on `path`, with or without wake-ups on release.
async fn open(path: &std::path::Path, wake: bool) -> SqliteBackend {
    SqliteBackend::from_config(
        SqliteConfig::builder()
            .path(path)
            .wake_on_release(wake)
            .build()
            .unwrap(),
    )
    .await
    .unwrap()
}

/// A waiter's refused try, which takes a ticket in the key's line: its number.
async fn wait_in_line(backend: &SqliteBackend, key: &LockKey, token: &Token) -> u64 {
    let answer = backend
        .try_acquire_as_waiter(
            key,
            token,
            ttl(LONG),
            "waiter",
            distrlock_core::Place {
                ticket: None,
                fair: true,
            },
            soon(),
        )
        .await
        .unwrap();
    assert!(
        matches!(answer.outcome, AcquireOutcome::Held { .. }) && answer.ticket.is_some(),
        "refused, with a ticket: {answer:?}"
    );
    answer.ticket.unwrap().number
}

/// Whether `backend`'s notifier announces a release of `key` within `within`
/// after `release` runs.
async fn announced<F: std::future::Future<Output = ()>>(
    backend: &SqliteBackend,
    key: &LockKey,
    within: Duration,
    release: F,
) -> bool {
    let mut sub = backend.release_notifier().unwrap().subscribe();
    release.await;
    tokio::time::timeout(within, sub.released(key))
        .await
        .is_ok()
}

#[tokio::test]
async fn a_release_wakes_the_waiters_of_other_processes_only_while_someone_is_in_line() {
    let (_dir, path, holder) = fresh().await;
    // Backends of their own, as other processes would have: nothing but the
    // file (and the wake-up sockets beside it) joins them.
    let first = open(&path, true).await;
    let second = open(&path, true).await;
    let key = LockKey::new("woken").unwrap();
    let (h, f, s) = (Token::new(), Token::new(), Token::new());
    assert!(matches!(
        holder
            .try_acquire(&key, &h, ttl(LONG), "holder", soon())
            .await
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
    let first_ticket = wait_in_line(&first, &key, &f).await;
    let second_ticket = wait_in_line(&second, &key, &s).await;
    assert!(first.release_notifier().unwrap().is_complete());
    // The holder's release reaches both waiters' processes at once.
    let mut sub = second.release_notifier().unwrap().subscribe();
    assert!(
        announced(&first, &key, LONG, async {
            holder.release(&key, &h, soon()).await.unwrap();
        })
        .await,
        "the first waiter's process is woken"
    );
    tokio::time::timeout(LONG, sub.released(&key))
        .await
        .expect("the second waiter's process is woken");
    // The first ticket is served; its release wakes the second, still in line.
    let place = |ticket| distrlock_core::Place {
        ticket: Some(ticket),
        fair: true,
    };
    let got = first
        .try_acquire_as_waiter(&key, &f, ttl(LONG), "waiter", place(first_ticket), soon())
        .await
        .unwrap();
    assert!(
        matches!(got.outcome, AcquireOutcome::Acquired { .. }),
        "{got:?}"
    );
    assert!(
        announced(&second, &key, LONG, async {
            first.release(&key, &f, soon()).await.unwrap();
        })
        .await,
        "a release with a waiter left in line wakes it"
    );
    let got = second
        .try_acquire_as_waiter(&key, &s, ttl(LONG), "waiter", place(second_ticket), soon())
        .await
        .unwrap();
    assert!(
        matches!(got.outcome, AcquireOutcome::Acquired { .. }),
        "{got:?}"
    );
    // The line is empty now: this release sends nothing (the first waiter's
    // process still listens on the key).
    assert!(
        !announced(&first, &key, Duration::from_millis(500), async {
            second.release(&key, &s, soon()).await.unwrap();
        })
        .await,
        "a release nobody waits for wakes nobody"
    );
}

#[tokio::test]
async fn without_wake_ups_nothing_is_sent_or_made_beside_the_file() {
    let (dir, path, _) = fresh().await;
    let holder = open(&path, false).await;
    let waiter = open(&path, false).await;
    let key = LockKey::new("quiet").unwrap();
    let h = Token::new();
    holder
        .try_acquire(&key, &h, ttl(LONG), "holder", soon())
        .await
        .unwrap();
    wait_in_line(&waiter, &key, &Token::new()).await;
    assert!(!waiter.release_notifier().unwrap().is_complete());
    assert!(
        !announced(&waiter, &key, Duration::from_millis(500), async {
            holder.release(&key, &h, soon()).await.unwrap();
        })
        .await
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.ends_with("-wake")),
        "no wake-up directory: {names:?}"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_release_does_not_wait_for_the_wake_ups_it_sends() {
    use std::os::unix::net::UnixDatagram;
    let (_dir, path, holder) = fresh().await;
    let waiter = open(&path, true).await;
    let key = LockKey::new("crowded").unwrap();
    let h = Token::new();
    holder
        .try_acquire(&key, &h, ttl(LONG), "holder", soon())
        .await
        .unwrap();
    wait_in_line(&waiter, &key, &Token::new()).await;
    // The meeting directory beside the file, and the key's directory in it.
    let mut meeting = path.clone().into_os_string();
    meeting.push("-wake");
    let meeting = std::path::PathBuf::from(meeting);
    let key_dir = std::fs::read_dir(&meeting)
        .unwrap()
        .flatten()
        .find(|e| e.path().is_dir())
        .expect("the waiter linked the key")
        .path();
    // 200 processes (sockets here) that wait on the key but read nothing:
    // each one's queue is full, so a send to it waits 2 ms for room.
    const STUCK: usize = 200;
    let mut stuck = Vec::with_capacity(STUCK);
    for i in 0..STUCK {
        let id = format!("{:016x}", 0xdead_0000_u64 + i as u64);
        let socket = UnixDatagram::bind(meeting.join(&id)).unwrap();
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        while filler.send_to(b"x", meeting.join(&id)).is_ok() {}
        std::os::unix::fs::symlink(format!("../{id}"), key_dir.join(&id)).unwrap();
        stuck.push(socket);
    }
    // Sending inline would hold this (single-threaded) runtime for 0.4 s, and
    // sending on the SQLite thread would hold up the backend's next call.
    let started = std::time::Instant::now();
    let woken = announced(&waiter, &key, LONG, async {
        holder.release(&key, &h, soon()).await.unwrap();
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(200),
            "the release returned after {took:?}, waiting for its wake-ups"
        );
        let other = LockKey::new("elsewhere").unwrap();
        holder
            .try_acquire(&other, &Token::new(), ttl(LONG), "holder", soon())
            .await
            .unwrap();
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(200),
            "the next call returned after {took:?}, behind the wake-ups"
        );
    })
    .await;
    assert!(woken, "the waiter whose queue had room is still woken");
    drop(stuck);
}
