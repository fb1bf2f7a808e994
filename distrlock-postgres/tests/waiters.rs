//! Waiters and the work a lock does for them on PostgreSQL: a release notifies
//! only when a waiter marked its holding, the mark never waits for a row lock
//! nor touches the lease, an older table gains the mark's column, and a
//! waiting acquire runs in no task but the backend's own.

mod common;

use std::time::Duration;

use common::{TestBackend, fence_of, key, soon, ttl};
use distrlock_core::{AcquireOutcome, LockBackend, LockManager, Token};
use distrlock_postgres::{PostgresBackend, PostgresConfig};

/// The row's `(waiting, token, fence, expires_at)` as text, read behind the
/// backend's back.
async fn row(t: &TestBackend, k: &str) -> (bool, String, i64, Option<String>) {
    let row = t
        .admin
        .query_one(
            &format!(
                "SELECT waiting, token::text, fence, expires_at::text FROM \"{}\" \
                 WHERE lock_key = $1",
                t.table
            ),
            &[&k],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3))
}

/// The row version's `(ctid, xmin, xmax)`: any write or row lock changes it.
async fn version(t: &TestBackend, k: &str) -> (String, String, String) {
    let row = t
        .admin
        .query_one(
            &format!(
                "SELECT ctid::text, xmin::text, xmax::text FROM \"{}\" WHERE lock_key = $1",
                t.table
            ),
            &[&k],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_notifies_other_processes_only_when_a_waiter_marked_the_holding() {
    let name = "a_release_notifies_other_processes_only_when_a_waiter_marked_the_holding";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    // Another process: its releases reach `t` only through pg_notify.
    let other = t.sibling(|b| b.listen(false)).await;
    let k = key("marked");
    let long = ttl(Duration::from_secs(30));

    // Nobody waits: the release announces nothing.
    let holder = Token::new();
    fence_of(
        other
            .try_acquire(&k, &holder, long, "o", soon())
            .await
            .unwrap(),
    );
    // A plain try (its caller does not wait) leaves no mark.
    assert!(matches!(
        t.backend
            .try_acquire(&k, &Token::new(), long, "t", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    assert!(
        !row(&t, "marked").await.0,
        "a plain refused try marked the row"
    );
    let mut sub = t.backend.release_notifier().unwrap().subscribe();
    other.release(&k, &holder, soon()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.released(&k))
            .await
            .is_err(),
        "a release nobody waited for was announced"
    );

    // A waiter is refused: it marks the holding, and leaves the lease alone.
    let holder = Token::new();
    let fence = fence_of(
        other
            .try_acquire(&k, &holder, long, "o", soon())
            .await
            .unwrap(),
    );
    let before = row(&t, "marked").await;
    assert!(!before.0, "a new holding starts unmarked");
    assert!(matches!(
        t.backend
            .try_acquire_as_waiter(&k, &Token::new(), long, "t", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { remaining: Some(_) }
    ));
    let marked = row(&t, "marked").await;
    assert!(marked.0, "the waiter's refusal did not mark the holding");
    assert_eq!(
        (&marked.1, marked.2, &marked.3),
        (&before.1, fence, &before.3),
        "the mark changed the lease"
    );
    // Marked once: the next waiter's refusal writes nothing.
    let version_before = version(&t, "marked").await;
    for _ in 0..3 {
        t.backend
            .try_acquire_as_waiter(&k, &Token::new(), long, "t", soon())
            .await
            .unwrap();
    }
    assert_eq!(
        version(&t, "marked").await,
        version_before,
        "a refusal of an already marked holding wrote"
    );
    // Extending keeps the mark.
    other.extend(&k, &holder, long, soon()).await.unwrap();
    assert!(row(&t, "marked").await.0, "an extend dropped the mark");

    let mut sub = t.backend.release_notifier().unwrap().subscribe();
    other.release(&k, &holder, soon()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub.released(&k))
        .await
        .expect("the release of a marked holding wakes the other process");

    // The next holding starts unmarked again.
    fence_of(
        t.backend
            .try_acquire(&k, &Token::new(), long, "t", soon())
            .await
            .unwrap(),
    );
    assert!(
        !row(&t, "marked").await.0,
        "a new holding kept the old mark"
    );
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiters_mark_never_waits_for_the_rows_lock() {
    let name = "a_waiters_mark_never_waits_for_the_rows_lock";
    // A long lock_timeout: a mark that waited for the row would take that long.
    let Some(t) = TestBackend::new(name, |b| b.lock_timeout(Duration::from_secs(4))).await else {
        return;
    };
    let k = key("busy");
    let long = ttl(Duration::from_secs(30));
    let holder = Token::new();
    fence_of(
        t.backend
            .try_acquire(&k, &holder, long, "o", soon())
            .await
            .unwrap(),
    );
    // Another transaction has the row locked, as the holder's extend or release
    // would while it commits.
    let mut locker = common::admin().await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        &format!(
            "SELECT 1 FROM \"{}\" WHERE lock_key = $1 FOR UPDATE",
            t.table
        ),
        &[&k.as_str()],
    )
    .await
    .unwrap();
    let started = tokio::time::Instant::now();
    let outcome = t
        .backend
        .try_acquire_as_waiter(&k, &Token::new(), long, "t", soon())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        matches!(outcome, AcquireOutcome::Held { .. }),
        "{outcome:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "the waiter's try waited {took:?} for the row's lock"
    );
    assert!(
        !row(&t, "busy").await.0,
        "marked a row another transaction had locked"
    );
    tx.commit().await.unwrap();
    // Unlocked: the next refusal marks it.
    t.backend
        .try_acquire_as_waiter(&k, &Token::new(), long, "t", soon())
        .await
        .unwrap();
    assert!(row(&t, "busy").await.0);
    t.backend.release(&k, &holder, soon()).await.unwrap();
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_adds_the_waiting_column_to_a_table_made_before_it() {
    let name = "create_table_adds_the_waiting_column_to_a_table_made_before_it";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let table = common::unique("dl_old");
    // The lock table as earlier versions made it (and its failover marker).
    admin
        .batch_execute(&format!(
            "CREATE TABLE \"{table}\" (
                lock_key text COLLATE \"C\" PRIMARY KEY, token uuid NOT NULL,
                fence bigint NOT NULL, owner text NOT NULL,
                acquired_at timestamptz NOT NULL, expires_at timestamptz NULL);
             INSERT INTO \"{table}\" VALUES ('held-before', gen_random_uuid(), 7, 'old',
                clock_timestamp(), clock_timestamp() + interval '1 hour')"
        ))
        .await
        .unwrap();
    let config = PostgresConfig::builder()
        .url(common::url())
        .table(&table)
        .build()
        .unwrap();
    let backend = PostgresBackend::from_config(config).await.unwrap();
    let k = key("after");
    let error = backend
        .try_acquire(&k, &Token::new(), ttl(Duration::from_secs(5)), "o", soon())
        .await
        .expect_err("the lock statements need the waiting column");
    assert!(
        error.to_string().contains("create_table"),
        "no hint in: {error}"
    );
    assert!(!error.is_transient(), "{error:?}");
    backend.create_table().await.unwrap();
    // Twice: the second finds the column and changes nothing.
    backend.create_table().await.unwrap();
    let token = Token::new();
    fence_of(
        backend
            .try_acquire(&k, &token, ttl(Duration::from_secs(5)), "o", soon())
            .await
            .unwrap(),
    );
    backend.release(&k, &token, soon()).await.unwrap();
    // The lock held before the upgrade is still held, and unmarked.
    let row = admin
        .query_one(
            &format!(
                "SELECT waiting, fence, expires_at > clock_timestamp() FROM \"{table}\" \
                 WHERE lock_key = 'held-before'"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, bool>(0),
            row.get::<_, i64>(1),
            row.get::<_, bool>(2)
        ),
        (false, 7, true)
    );
    let _ = admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await;
}

/// A waiting acquire adds one task while it runs (the backend's, which finishes
/// the statement if the caller goes away), and a caller that goes away
/// mid-statement leaves no lock behind: the release runs after the statement.
#[tokio::test(flavor = "current_thread")]
async fn a_waiting_acquire_runs_in_one_task_and_a_dropped_one_leaves_no_lock() {
    let name = "a_waiting_acquire_runs_in_one_task_and_a_dropped_one_leaves_no_lock";
    let Some(t) = TestBackend::new(name, |b| {
        b.lock_timeout(Duration::from_secs(4)).pool_size(1)
    })
    .await
    else {
        return;
    };
    let k = key("tasks");
    // The row exists and is free; another transaction holds its lock, so the
    // acquire's statement waits for it.
    let first = Token::new();
    fence_of(
        t.backend
            .try_acquire(&k, &first, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    t.backend.release(&k, &first, soon()).await.unwrap();
    let mut locker = common::admin().await.unwrap();
    let tx = locker.transaction().await.unwrap();
    tx.execute(
        &format!(
            "SELECT 1 FROM \"{}\" WHERE lock_key = $1 FOR UPDATE",
            t.table
        ),
        &[&k.as_str()],
    )
    .await
    .unwrap();

    let manager = LockManager::builder(t.backend.clone())
        .ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let lock = manager.lock(k.as_str()).unwrap();
    // Warm: the pool's one connection exists before we count.
    t.backend.inspect(&k).await.unwrap();
    let metrics = tokio::runtime::Handle::current().metrics();
    let before = metrics.num_alive_tasks();
    {
        let acquire = lock.acquire_timeout(Duration::from_secs(20));
        tokio::pin!(acquire);
        let during = tokio::select! {
            result = &mut acquire => panic!("answered while the row was locked: {:?}", result.map(|g| g.fence())),
            () = tokio::time::sleep(Duration::from_millis(300)) => metrics.num_alive_tasks(),
        };
        assert_eq!(
            during - before,
            1,
            "tasks alive during one waiting acquire, beyond those before it"
        );
        // The caller goes away with the statement still waiting.
    }
    // The statement now goes through and grants; the cleanup's release must
    // come after it.
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let info = t.backend.inspect(&k).await.unwrap().unwrap();
        if !info.is_live() && info.fence.get() > 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dropped acquire left the lock held: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(manager);
    t.drop_table().await;
}
