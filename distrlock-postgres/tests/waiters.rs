//! Waiters and the work a lock does for them on PostgreSQL: a refused waiter
//! takes a ticket in the key's line once, without waiting for a row lock or
//! touching the lease; a release notifies only when someone is in line; an
//! older table gains the line's columns; and a waiting acquire runs in no task
//! but the backend's own.

mod common;

use std::time::Duration;

use common::{RowLock, TestBackend, fence_of, key, soon, ttl};
use distrlock_core::{AcquireOutcome, LockBackend, LockManager, Place, Token, WaiterAnswer};
use distrlock_postgres::{PostgresBackend, PostgresConfig};

/// The row's `(line_next, line_head, token, fence, expires_at)`, read behind
/// the backend's back.
async fn row(t: &TestBackend, k: &str) -> (i64, i64, String, i64, Option<String>) {
    let row = t
        .admin
        .query_one(
            &format!(
                "SELECT line_next, line_head, token::text, fence, expires_at::text FROM \"{}\" \
                 WHERE lock_key = $1",
                t.table
            ),
            &[&k],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
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

/// A fair waiter's try at `place`.
async fn wait_try(
    t: &TestBackend,
    k: &distrlock_core::LockKey,
    token: &Token,
    place: Place,
) -> WaiterAnswer {
    t.backend
        .try_acquire_as_waiter(k, token, ttl(Duration::from_secs(30)), "t", place, soon())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_notifies_other_processes_only_when_someone_is_in_line() {
    let name = "a_release_notifies_other_processes_only_when_someone_is_in_line";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    // Another process: its releases reach `t` only through pg_notify.
    let other = t.sibling(|b| b.listen(false)).await;
    let k = key("line");
    let long = ttl(Duration::from_secs(30));

    // Nobody waits: the release announces nothing.
    let holder = Token::new();
    fence_of(
        other
            .try_acquire(&k, &holder, long, "o", soon())
            .await
            .unwrap(),
    );
    // A plain try (its caller does not wait) takes no ticket.
    let version_before = version(&t, "line").await;
    assert!(matches!(
        t.backend
            .try_acquire(&k, &Token::new(), long, "t", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    assert_eq!(
        version(&t, "line").await,
        version_before,
        "a plain refused try wrote the row"
    );
    let mut sub = t.backend.release_notifier().unwrap().subscribe();
    other.release(&k, &holder, soon()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.released(&k))
            .await
            .is_err(),
        "a release nobody waited for was announced"
    );

    // A waiter is refused: it takes ticket 0, and leaves the lease alone.
    let holder = Token::new();
    let fence = fence_of(
        other
            .try_acquire(&k, &holder, long, "o", soon())
            .await
            .unwrap(),
    );
    let before = row(&t, "line").await;
    assert_eq!((before.0, before.1), (0, 0), "the line starts empty");
    let waiter = Token::new();
    let answer = wait_try(&t, &k, &waiter, Place::first()).await;
    assert!(matches!(
        answer.outcome,
        AcquireOutcome::Held { remaining: Some(_) }
    ));
    let ticket = answer.ticket.expect("a refused waiter gets a ticket");
    assert_eq!((ticket.number, ticket.ahead), (0, 0));
    let after = row(&t, "line").await;
    assert_eq!((after.0, after.1), (1, 0), "one ticket handed out");
    assert_eq!(
        (&after.2, after.3, &after.4),
        (&before.2, fence, &before.4),
        "the ticket changed the lease"
    );
    // Asking again with the ticket writes nothing.
    let version_before = version(&t, "line").await;
    let place = Place {
        ticket: Some(ticket.number),
        fair: true,
    };
    for _ in 0..3 {
        let again = wait_try(&t, &k, &waiter, place).await;
        assert_eq!(again.ticket, Some(ticket), "the waiter keeps its ticket");
    }
    assert_eq!(
        version(&t, "line").await,
        version_before,
        "a waiter that brought its ticket wrote the row"
    );
    // Extending keeps the line.
    other.extend(&k, &holder, long, soon()).await.unwrap();
    assert_eq!(row(&t, "line").await.0, 1, "an extend dropped the line");

    let mut sub = t.backend.release_notifier().unwrap().subscribe();
    other.release(&k, &holder, soon()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub.released(&k))
        .await
        .expect("the release of a key with someone in line wakes the other process");

    // The waiter takes its turn; the line is then empty, and the release of
    // the next holding announces nothing.
    fence_of(wait_try(&t, &k, &waiter, place).await.outcome);
    let served = row(&t, "line").await;
    assert_eq!(
        (served.0, served.1),
        (1, 1),
        "served: the line moved past ticket 0"
    );
    t.backend.release(&k, &waiter, soon()).await.unwrap();
    let last = Token::new();
    fence_of(
        other
            .try_acquire(&k, &last, long, "o", soon())
            .await
            .unwrap(),
    );
    let mut sub = t.backend.release_notifier().unwrap().subscribe();
    other.release(&k, &last, soon()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.released(&k))
            .await
            .is_err(),
        "a release with nobody left in line was announced"
    );
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiters_ticket_never_waits_for_the_rows_lock() {
    let name = "a_waiters_ticket_never_waits_for_the_rows_lock";
    // A long lock_timeout: a ticket that waited for the row would take that long.
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
    let answer = wait_try(&t, &k, &Token::new(), Place::first()).await;
    let took = started.elapsed();
    assert!(
        matches!(answer.outcome, AcquireOutcome::Held { .. }),
        "{answer:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "the waiter's try waited {took:?} for the row's lock"
    );
    assert_eq!(
        answer.ticket, None,
        "a ticket from a row another transaction had locked"
    );
    assert_eq!(
        row(&t, "busy").await.0,
        0,
        "wrote a row another transaction had locked"
    );
    tx.commit().await.unwrap();
    // Unlocked: the next refusal hands out a ticket.
    let answer = wait_try(&t, &k, &Token::new(), Place::first()).await;
    assert!(answer.ticket.is_some(), "{answer:?}");
    assert_eq!(row(&t, "busy").await.0, 1);
    t.backend.release(&k, &holder, soon()).await.unwrap();
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_adds_the_line_to_a_table_made_before_it() {
    let name = "create_table_adds_the_line_to_a_table_made_before_it";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    // The lock table as the two earlier versions made it (and a held lock):
    // without, and with, the `waiting` mark that came before the line.
    for (i, waiting) in ["", ", waiting boolean NOT NULL DEFAULT false"]
        .iter()
        .enumerate()
    {
        let table = common::unique(&format!("dl_old{i}"));
        admin
            .batch_execute(&format!(
                "CREATE TABLE \"{table}\" (
                    lock_key text COLLATE \"C\" PRIMARY KEY, token uuid NOT NULL,
                    fence bigint NOT NULL, owner text NOT NULL,
                    acquired_at timestamptz NOT NULL, expires_at timestamptz NULL{waiting});
                 INSERT INTO \"{table}\" (lock_key, token, fence, owner, acquired_at, expires_at)
                    VALUES ('held-before', gen_random_uuid(), 7, 'old',
                    clock_timestamp(), clock_timestamp() + interval '1 hour'),
                    ('released-before', gen_random_uuid(), 3, 'old', clock_timestamp(), NULL)"
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
        fence_of(
            backend
                .try_acquire(&k, &token, ttl(Duration::from_secs(5)), "o", soon())
                .await
                .unwrap(),
        );
        backend.release(&k, &token, soon()).await.unwrap();
        // A key released before the upgrade has an empty line: anyone takes it.
        let old = distrlock_core::LockKey::new("released-before").unwrap();
        let fence = fence_of(
            backend
                .try_acquire(
                    &old,
                    &Token::new(),
                    ttl(Duration::from_secs(5)),
                    "o",
                    soon(),
                )
                .await
                .unwrap(),
        );
        assert_eq!(fence, 4);
        // The lock held before the upgrade is still held, with an empty line.
        let row = admin
            .query_one(
                &format!(
                    "SELECT line_next, line_head, fence, expires_at > clock_timestamp() \
                     FROM \"{table}\" WHERE lock_key = 'held-before'"
                ),
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (
                row.get::<_, i64>(0),
                row.get::<_, i64>(1),
                row.get::<_, i64>(2),
                row.get::<_, bool>(3)
            ),
            (0, 0, 7, true)
        );
        let _ = admin
            .batch_execute(&format!("DROP TABLE \"{table}\""))
            .await;
    }
}

/// A waiting acquire adds no task while it runs (its statement runs in the
/// caller's future), and a caller that goes away mid-statement leaves no lock
/// behind: the release runs after the statement.
#[tokio::test(flavor = "current_thread")]
async fn a_waiting_acquire_runs_in_no_task_of_its_own_and_a_dropped_one_leaves_no_lock() {
    let name = "a_waiting_acquire_runs_in_no_task_of_its_own_and_a_dropped_one_leaves_no_lock";
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
    let tx = RowLock::on_free_row(&t.backend, &t.table, &k).await;

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
            0,
            "tasks alive during one waiting acquire, beyond those before it"
        );
        // The caller goes away with the statement still waiting.
    }
    // The statement now goes through and grants; the cleanup's release must
    // come after it.
    tx.commit().await;
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

/// A release recorded later than the server's clock now reads (the clock went
/// back after it) counts as no time since: a key with nobody in line is free at
/// once, not refused until the clock catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_after_a_clock_step_back_leaves_the_key_free() {
    let name = "a_release_after_a_clock_step_back_leaves_the_key_free";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let k = key("stepped");
    let long = ttl(Duration::from_secs(30));
    let holder = Token::new();
    fence_of(
        t.backend
            .try_acquire(&k, &holder, long, "o", soon())
            .await
            .unwrap(),
    );
    t.backend.release(&k, &holder, soon()).await.unwrap();
    // As if the clock stepped back 10 minutes after the release.
    t.admin
        .execute(
            &format!(
                "UPDATE \"{}\" SET released_at = released_at + interval '10 minutes' \
                 WHERE lock_key = $1",
                t.table
            ),
            &[&k.as_str()],
        )
        .await
        .unwrap();
    fence_of(
        t.backend
            .try_acquire(&k, &Token::new(), long, "o", soon())
            .await
            .unwrap(),
    );
    t.drop_table().await;
}
