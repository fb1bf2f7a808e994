//! PostgreSQL-specific behaviour, against the real server
//! (`DISTRLOCK_TEST_POSTGRES_URL`). Each test uses tables and sessions of its own.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::{
    RowLock, TestBackend, counting_proxy::CountingProxy, fence_of, key, soon, ttl, unique, url,
};
use distrlock_core::{AcquireOutcome, Error, LockBackend, LockKey, LockState, Place, Token};
use distrlock_postgres::{PostgresBackend, PostgresConfig, deadpool_postgres, tokio_postgres};
use tokio::time::Instant;

fn micros_since_epoch(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// The server's clock now, in µs since the epoch.
async fn server_now_us(client: &tokio_postgres::Client) -> i64 {
    client
        .query_one(
            "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::int8",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// A driver config for the test server with extra session `options`.
fn pg_with_options(options: &str) -> tokio_postgres::Config {
    let mut pg = common::pg_config();
    pg.options(options);
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_in_a_transaction_begun_seconds_earlier_gets_the_full_ttl() {
    let name = "acquire_in_a_transaction_begun_seconds_earlier_gets_the_full_ttl";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let mut client = common::admin().await.unwrap();
    let k = key("late-in-tx");
    let token = Token::new();
    let lease = Duration::from_secs(5);

    let tx = client.transaction().await.unwrap();
    let tx_start: i64 = tx
        .query_one("SELECT (EXTRACT(EPOCH FROM now()) * 1000000)::int8", &[])
        .await
        .unwrap()
        .get(0);
    tx.batch_execute("SELECT pg_sleep(2)").await.unwrap();
    fence_of(
        t.backend
            .try_acquire_in(&tx, &k, &token, ttl(lease), "in-tx")
            .await
            .unwrap(),
    );
    let row = tx
        .query_one(
            &format!(
                "SELECT (EXTRACT(EPOCH FROM acquired_at) * 1000000)::int8, \
                        (EXTRACT(EPOCH FROM expires_at) * 1000000)::int8 \
                 FROM \"{}\" WHERE lock_key = $1",
                t.table
            ),
            &[&k.as_str()],
        )
        .await
        .unwrap();
    let (acquired, expires): (i64, i64) = (row.get(0), row.get(1));
    tx.commit().await.unwrap();

    assert_eq!(
        expires - acquired,
        5_000_000,
        "the lease is exactly the ttl"
    );
    assert!(
        acquired - tx_start >= 1_900_000,
        "the lease must start when the statement ran, not when the transaction began \
         ({} µs after BEGIN)",
        acquired - tx_start
    );
    let info = t.backend.inspect(&k).await.unwrap().expect("row");
    assert_eq!(info.state, LockState::Held);
    let remaining = info.remaining.expect("held");
    // With now() the lease would have ended 2 s early: about 3 s left here.
    assert!(
        remaining > Duration::from_secs(4),
        "remaining {remaining:?}: the transaction's sleep was taken off the lease"
    );
    t.backend.release(&k, &token, soon()).await.unwrap();
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_different_time_zones_and_date_styles_contend_correctly() {
    let name = "sessions_with_different_time_zones_and_date_styles_contend_correctly";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    // UTC+14 and UTC-10 (-9 in summer), with every date and interval style changed.
    let east = t
        .sibling(|b| {
            b.pg_config(pg_with_options(
                "-c TimeZone=Pacific/Kiritimati -c DateStyle=SQL,DMY -c IntervalStyle=sql_standard",
            ))
        })
        .await;
    let west = t
        .sibling(|b| {
            b.pg_config(pg_with_options(
                "-c TimeZone=America/Adak -c DateStyle=German -c IntervalStyle=iso_8601",
            ))
        })
        .await;
    for (backend, zone, style) in [
        (&east, "Pacific/Kiritimati", "SQL, DMY"),
        (&west, "America/Adak", "German, DMY"),
    ] {
        let conn = backend.pool().get().await.unwrap();
        let shown: String = conn.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
        assert_eq!(shown, zone, "the session settings must really differ");
        let shown: String = conn.query_one("SHOW DateStyle", &[]).await.unwrap().get(0);
        assert_eq!(shown, style);
    }

    // A long lease taken in the east is refused in the west with its true remainder.
    let k = key("zones-long");
    let (te, tw) = (Token::new(), Token::new());
    let lease = Duration::from_secs(30);
    let fence = fence_of(
        east.try_acquire(&k, &te, ttl(lease), "east", soon())
            .await
            .unwrap(),
    );
    match west
        .try_acquire(&k, &tw, ttl(lease), "west", soon())
        .await
        .unwrap()
    {
        AcquireOutcome::Held {
            remaining: Some(remaining),
        } => assert!(
            remaining <= lease && remaining > lease - Duration::from_secs(5),
            "remaining {remaining:?} is off by a time zone"
        ),
        other => panic!("the west must be refused with a remaining lease, got {other:?}"),
    }
    let (ie, iw) = (
        east.inspect(&k).await.unwrap().unwrap(),
        west.inspect(&k).await.unwrap().unwrap(),
    );
    assert_eq!(ie.acquired_at, iw.acquired_at, "same instant in every zone");
    assert_eq!(ie.expires_at, iw.expires_at);
    let expires = micros_since_epoch(ie.expires_at.unwrap());
    assert_eq!(expires - micros_since_epoch(ie.acquired_at), 30_000_000);
    let server_now = server_now_us(&t.admin).await;
    assert!(
        (expires - server_now - 30_000_000).abs() < 5_000_000,
        "expiry {expires} is not 30 s after the server's now {server_now}"
    );

    // A short lease taken in the west expires for the east on time.
    let k2 = key("zones-short");
    let f1 = fence_of(
        west.try_acquire(&k2, &tw, ttl(Duration::from_millis(1000)), "west", soon())
            .await
            .unwrap(),
    );
    assert!(matches!(
        east.try_acquire(&k2, &te, ttl(lease), "east", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let f2 = fence_of(
        east.try_acquire(&k2, &te, ttl(lease), "east", soon())
            .await
            .unwrap(),
    );
    assert!(f2 > f1);
    assert!(matches!(
        west.extend(&k2, &tw, ttl(lease), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    east.extend(&k2, &te, ttl(lease), soon()).await.unwrap();
    assert!(matches!(
        west.release(&k, &tw, soon()).await,
        Err(Error::NotHeld { .. })
    ));
    east.release(&k, &te, soon()).await.unwrap();
    east.release(&k2, &te, soon()).await.unwrap();
    assert_eq!(fence, 1);
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_locked_by_a_foreign_transaction_bounds_try_acquire() {
    let name = "row_locked_by_a_foreign_transaction_bounds_try_acquire";
    let bound = Duration::from_millis(800);
    let Some(t) = TestBackend::new(name, |b| b.lock_timeout(bound)).await else {
        return;
    };
    let (free, held, fresh) = (key("free"), key("held"), key("fresh"));
    let holder = Token::new();
    let old = Token::new();
    fence_of(
        t.backend
            .try_acquire(&free, &old, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    t.backend.release(&free, &old, soon()).await.unwrap();
    fence_of(
        t.backend
            .try_acquire(&held, &holder, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );

    // Someone else's open transaction locks both rows and inserts a third.
    let mut foreign = common::admin().await.unwrap();
    let tx = foreign.transaction().await.unwrap();
    tx.execute(
        &format!(
            "SELECT 1 FROM \"{}\" WHERE lock_key IN ($1, $2) FOR UPDATE",
            t.table
        ),
        &[&free.as_str(), &held.as_str()],
    )
    .await
    .unwrap();
    tx.execute(
        &format!(
            "INSERT INTO \"{}\" VALUES ($1, gen_random_uuid(), 1, 'foreign', \
             clock_timestamp(), clock_timestamp() + interval '1 minute')",
            t.table
        ),
        &[&fresh.as_str()],
    )
    .await
    .unwrap();

    // A free row, locked: waits for the bound, then reports the key busy.
    for k in [&free, &fresh] {
        let started = Instant::now();
        let outcome = t
            .backend
            .try_acquire(k, &Token::new(), ttl(Duration::from_secs(30)), "me", soon())
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(outcome, AcquireOutcome::Held { remaining: None }, "{k}");
        assert!(
            took >= bound - Duration::from_millis(100)
                && took < bound + Duration::from_millis(1500),
            "{k}: try_acquire took {took:?} with a {bound:?} row-lock bound"
        );
    }
    // A held row is refused from what the statement sees, without waiting.
    let started = Instant::now();
    let outcome = t
        .backend
        .try_acquire(
            &held,
            &Token::new(),
            ttl(Duration::from_secs(30)),
            "me",
            soon(),
        )
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        AcquireOutcome::Held { remaining: Some(_) }
    ));
    assert!(
        started.elapsed() < bound - Duration::from_millis(100),
        "waited for no reason"
    );
    // The holder's extend must lock the row: bounded, and a transient error.
    let started = Instant::now();
    let error = t
        .backend
        .extend(&held, &holder, ttl(Duration::from_secs(30)), soon())
        .await
        .expect_err("extend cannot lock the row");
    assert!(error.is_transient(), "{error}");
    assert!(started.elapsed() < bound + Duration::from_millis(1500));

    tx.rollback().await.unwrap();
    fence_of(
        t.backend
            .try_acquire(
                &free,
                &Token::new(),
                ttl(Duration::from_secs(30)),
                "me",
                soon(),
            )
            .await
            .unwrap(),
    );
    assert_eq!(
        fence_of(
            t.backend
                .try_acquire(
                    &fresh,
                    &Token::new(),
                    ttl(Duration::from_secs(30)),
                    "me",
                    soon()
                )
                .await
                .unwrap()
        ),
        1
    );
    t.backend
        .extend(&held, &holder, ttl(Duration::from_secs(30)), soon())
        .await
        .unwrap();
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pool_sessions_fail_at_most_one_call() {
    let name = "killed_pool_sessions_fail_at_most_one_call";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let k = key("killed");
    let token = Token::new();
    let lease = ttl(Duration::from_secs(30));
    let fence = fence_of(
        t.backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .unwrap(),
    );
    // Open every pooled connection, so every one of them is killed.
    let results = concurrently(8, || {
        let (backend, k) = (t.backend.clone(), k.clone());
        async move { backend.inspect(&k).await }
    })
    .await;
    for result in results {
        result.unwrap();
    }
    let killed = t.kill_sessions().await;
    assert!(
        killed >= 3,
        "expected the pool and the listener killed, got {killed}"
    );

    let mut failures = Vec::new();
    for step in 0..6 {
        let result = match step {
            0 => t
                .backend
                .extend(&k, &token, lease, soon())
                .await
                .map(|_| ()),
            1 => t.backend.inspect(&k).await.map(|_| ()),
            2 => t.backend.list().await.map(|_| ()),
            3 => match t.backend.try_acquire(&k, &token, lease, "o", soon()).await {
                Ok(outcome) => {
                    assert_eq!(fence_of(outcome), fence, "same token keeps the fence");
                    Ok(())
                }
                Err(e) => Err(e),
            },
            4 => t
                .backend
                .extend(&k, &token, lease, soon())
                .await
                .map(|_| ()),
            _ => t.backend.inspect(&k).await.map(|_| ()),
        };
        if let Err(error) = result {
            assert!(error.is_transient(), "a killed session gave {error}");
            failures.push(error.to_string());
        }
    }
    assert!(
        failures.len() <= 1,
        "more than one call failed: {failures:?}"
    );
    t.backend.release(&k, &token, soon()).await.unwrap();
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_killed_under_a_call_is_retried_on_another_connection() {
    let name = "session_killed_under_a_call_is_retried_on_another_connection";
    let Some(t) = TestBackend::new(name, |b| b.lock_timeout(Duration::from_secs(4))).await else {
        return;
    };
    let lease = ttl(Duration::from_secs(30));
    for op in ["extend", "release", "acquire"] {
        let k = key(op);
        let token = Token::new();
        fence_of(
            t.backend
                .try_acquire(&k, &token, lease, "o", soon())
                .await
                .unwrap(),
        );
        // A foreign transaction holds the row, so the call waits inside the server.
        let mut foreign = common::admin().await.unwrap();
        let tx = foreign.transaction().await.unwrap();
        tx.execute(
            &format!(
                "SELECT 1 FROM \"{}\" WHERE lock_key = $1 FOR UPDATE",
                t.table
            ),
            &[&k.as_str()],
        )
        .await
        .unwrap();
        let call = {
            let (backend, k) = (t.backend.clone(), k.clone());
            tokio::spawn(async move {
                match op {
                    "extend" => backend.extend(&k, &token, lease, soon()).await.map(|_| ()),
                    "release" => backend.release(&k, &token, soon()).await,
                    // Same token: the retried acquire is idempotent.
                    _ => backend
                        .try_acquire(&k, &token, lease, "o", soon())
                        .await
                        .map(|_| ()),
                }
            })
        };
        // Kill the session while its statement waits on the row lock.
        let mut killed = false;
        for _ in 0..100 {
            let n: i64 = t
                .admin
                .query_one(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE application_name = $1 AND wait_event_type = 'Lock'",
                    &[&t.application_name],
                )
                .await
                .unwrap()
                .get(0);
            if n > 0 {
                killed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(killed, "{op}: never saw the call waiting on the row lock");
        // Let the retry start waiting too, then free the row.
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.rollback().await.unwrap();
        call.await
            .unwrap()
            .unwrap_or_else(|e| panic!("{op}: the killed call was not retried: {e}"));
    }
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_waits_for_an_abandoned_acquire_of_the_same_token() {
    let name = "release_waits_for_an_abandoned_acquire_of_the_same_token";
    let Some(t) = TestBackend::new(name, |b| b.lock_timeout(Duration::from_secs(3))).await else {
        return;
    };
    let k = key("abandoned");
    let lease = ttl(Duration::from_secs(30));
    // A foreign transaction holds the free row, so the acquire waits in the server.
    let tx = RowLock::on_free_row(&t.backend, &t.table, &k).await;
    let token = Token::new();
    // The caller gives up on the acquire while its statement is still waiting...
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        t.backend
            .try_acquire(&k, &token, lease, "abandoned", soon()),
    )
    .await;
    assert!(gave_up.is_err(), "the acquire should still be waiting");
    // ...and releases the token in case it was granted, as core's cancel safety does.
    let release = {
        let (backend, k) = (t.backend.clone(), k.clone());
        tokio::spawn(async move { backend.release(&k, &token, soon()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.rollback().await;
    // The abandoned acquire lands after the rollback; the release must come after it.
    release
        .await
        .unwrap()
        .expect("the release ran after the abandoned acquire was granted");
    let info = t.backend.inspect(&k).await.unwrap().unwrap();
    assert_eq!(
        info.state,
        LockState::Released,
        "the abandoned acquire kept the lock"
    );
    t.drop_table().await;
}

/// Runs `n` copies of a call at once (each on its own task), so they hold
/// separate pooled connections at the same time.
async fn concurrently<T, F, Fut>(n: usize, call: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|_| tokio::spawn(call())).collect();
    let mut out = Vec::with_capacity(n);
    for task in tasks {
        out.push(task.await.expect("task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_reconnects_after_its_session_is_killed_and_wakes_everyone() {
    let name = "listener_reconnects_after_its_session_is_killed_and_wakes_everyone";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let notifier = t.backend.release_notifier().expect("notifications");
    let mut sub = notifier.subscribe();
    assert!(t.kill_sessions().await >= 1);
    // Nobody releases this key: only the reconnect's wake-everyone resolves this.
    tokio::time::timeout(
        Duration::from_secs(10),
        sub.released(&key("nobody-releases")),
    )
    .await
    .expect("after reconnecting, the listener wakes every waiter");

    // Listening again: a release by another backend reaches this one.
    let other = t.sibling(|b| b.listen(false)).await;
    let k = key("after-reconnect");
    let token = Token::new();
    fence_of(
        other
            .try_acquire(&k, &token, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    // This backend waits for it (its refusal marks the holding, so that its
    // release notifies).
    assert!(matches!(
        t.backend
            .try_acquire_as_waiter(
                &k,
                &Token::new(),
                ttl(Duration::from_secs(30)),
                "w",
                Place::first(),
                soon()
            )
            .await
            .unwrap()
            .outcome,
        AcquireOutcome::Held { .. }
    ));
    let mut sub = notifier.subscribe();
    other.release(&k, &token, soon()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub.released(&k))
        .await
        .expect("a release elsewhere is announced through LISTEN");
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_elsewhere_wakes_this_backend_only_for_its_key() {
    let name = "release_elsewhere_wakes_this_backend_only_for_its_key";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let other = t.sibling(|b| b.listen(false)).await;
    let (a, b) = (key("wake-a"), key("wake-b"));
    let (ta, tb) = (Token::new(), Token::new());
    fence_of(
        other
            .try_acquire(&a, &ta, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    fence_of(
        other
            .try_acquire(&b, &tb, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    // This backend waits for both (its refusals mark the holdings, so that
    // their releases notify).
    for k in [&a, &b] {
        assert!(matches!(
            t.backend
                .try_acquire_as_waiter(
                    k,
                    &Token::new(),
                    ttl(Duration::from_secs(30)),
                    "w",
                    Place::first(),
                    soon()
                )
                .await
                .unwrap()
                .outcome,
            AcquireOutcome::Held { .. }
        ));
    }
    let mut sub = t.backend.release_notifier().unwrap().subscribe();
    other.release(&b, &tb, soon()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.released(&a))
            .await
            .is_err(),
        "a release of b must not wake a waiter on a"
    );
    other.release(&a, &ta, soon()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub.released(&a))
        .await
        .expect("the release of a, by another backend, wakes this one");
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_listening_connection_per_backend_and_none_when_off() {
    let name = "one_listening_connection_per_backend_and_none_when_off";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let quiet_name = unique("distrlock-test");
    let quiet = t
        .sibling(|b| b.listen(false).application_name(&quiet_name))
        .await;
    let count = |app: String| {
        let admin = &t.admin;
        async move {
            admin
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                    &[&app],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(count(t.application_name.clone()).await, 1);
    assert_eq!(count(quiet_name.clone()).await, 0);
    // Still announces its own releases to its own waiters.
    let k = key("quiet");
    let token = Token::new();
    fence_of(
        quiet
            .try_acquire(&k, &token, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    let mut sub = quiet.release_notifier().unwrap().subscribe();
    quiet.release(&k, &token, soon()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(1), sub.released(&k))
        .await
        .expect("own releases wake own waiters");
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_in_a_transaction_takes_effect_and_notifies_at_commit() {
    let name = "release_in_a_transaction_takes_effect_and_notifies_at_commit";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let other = t.sibling(|b| b).await;
    let k = key("release-in-tx");
    let token = Token::new();
    fence_of(
        t.backend
            .try_acquire(&k, &token, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    let mut client = common::admin().await.unwrap();

    // Rolled back: still held.
    let tx = client.transaction().await.unwrap();
    t.backend.release_in(&tx, &k, &token).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        t.backend.inspect(&k).await.unwrap().unwrap().state,
        LockState::Held
    );

    // Committed: released, and announced only then (to a waiter, whose
    // refusal marked the holding).
    assert!(matches!(
        other
            .try_acquire_as_waiter(
                &k,
                &Token::new(),
                ttl(Duration::from_secs(30)),
                "w",
                Place::first(),
                soon()
            )
            .await
            .unwrap()
            .outcome,
        AcquireOutcome::Held { .. }
    ));
    let mut sub = other.release_notifier().unwrap().subscribe();
    let tx = client.transaction().await.unwrap();
    t.backend.release_in(&tx, &k, &token).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(500), sub.released(&k))
            .await
            .is_err(),
        "announced before commit"
    );
    assert!(
        matches!(
            other
                .try_acquire(&k, &Token::new(), ttl(Duration::from_secs(30)), "x", soon())
                .await
                .unwrap(),
            AcquireOutcome::Held { .. }
        ),
        "released before commit"
    );
    tx.commit().await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub.released(&k))
        .await
        .expect("announced at commit");
    assert_eq!(
        t.backend.inspect(&k).await.unwrap().unwrap().state,
        LockState::Released
    );
    assert!(matches!(
        t.backend.release_in(&client, &k, &token).await,
        Err(Error::NotHeld { .. })
    ));
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_in_a_transaction_is_atomic_with_the_callers_writes() {
    let name = "acquire_in_a_transaction_is_atomic_with_the_callers_writes";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let jobs = unique("dl_jobs");
    t.admin
        .batch_execute(&format!("CREATE TABLE \"{jobs}\" (id text PRIMARY KEY)"))
        .await
        .unwrap();
    let k = key("job-7");
    let token = Token::new();
    let lease = ttl(Duration::from_secs(30));
    let insert_job = format!("INSERT INTO \"{jobs}\" VALUES ($1)");

    // Through the backend's own deadpool: the driver's transaction is `&*tx`.
    let mut conn = t.backend.pool().get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    fence_of(
        t.backend
            .try_acquire_in(&*tx, &k, &token, lease, "job")
            .await
            .unwrap(),
    );
    tx.execute(&insert_job, &[&"job-7"]).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(
        t.backend.inspect(&k).await.unwrap().is_none(),
        "rolled back with the job"
    );

    let tx = conn.transaction().await.unwrap();
    let fence = fence_of(
        t.backend
            .try_acquire_in(&*tx, &k, &token, lease, "job")
            .await
            .unwrap(),
    );
    tx.execute(&insert_job, &[&"job-7"]).await.unwrap();
    // Same token inside the transaction: idempotent, same fence.
    assert_eq!(
        fence_of(
            t.backend
                .try_acquire_in(&*tx, &k, &token, lease, "job")
                .await
                .unwrap()
        ),
        fence
    );
    t.backend.extend_in(&*tx, &k, &token, lease).await.unwrap();
    tx.commit().await.unwrap();
    drop(conn);
    let info = t
        .backend
        .inspect(&k)
        .await
        .unwrap()
        .expect("committed with the job");
    assert_eq!(
        (info.state, info.owner.as_str(), info.fence.get()),
        (LockState::Held, "job", fence)
    );
    let n: i64 = t
        .admin
        .query_one(&format!("SELECT count(*) FROM \"{jobs}\""), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    t.backend.release(&k, &token, soon()).await.unwrap();
    t.admin
        .batch_execute(&format!("DROP TABLE \"{jobs}\""))
        .await
        .unwrap();
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_qualified_mixed_case_table_works() {
    let name = "schema_qualified_mixed_case_table_works";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let schema = unique("dl_Schema");
    let table = unique("Locks");
    admin
        .batch_execute(&format!("CREATE SCHEMA \"{schema}\""))
        .await
        .unwrap();
    let qualified = format!("{schema}.{table}");
    let config = PostgresConfig::builder()
        .url(url())
        .table(&qualified)
        .pool_size(2)
        .build()
        .unwrap();
    let backend = PostgresBackend::from_config(config.clone()).await.unwrap();
    backend.create_table().await.unwrap();
    backend.create_table().await.unwrap();
    let found: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = $2",
            &[&schema, &table],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        found, 1,
        "the table keeps its exact mixed-case name in its schema"
    );
    let lower: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE tablename = $1",
            &[&table.to_lowercase()],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(lower, 0, "no case-folded twin was created");

    let waiter = PostgresBackend::from_config(config).await.unwrap();
    let k = key("qualified");
    let token = Token::new();
    assert_eq!(
        fence_of(
            backend
                .try_acquire(&k, &token, ttl(Duration::from_secs(30)), "o", soon())
                .await
                .unwrap()
        ),
        1
    );
    backend
        .extend(&k, &token, ttl(Duration::from_secs(30)), soon())
        .await
        .unwrap();
    assert_eq!(backend.list().await.unwrap().len(), 1);
    // The waiter's refusal gives it a ticket, so that the release notifies.
    let waiting = Token::new();
    let refused = waiter
        .try_acquire_as_waiter(
            &k,
            &waiting,
            ttl(Duration::from_secs(30)),
            "w",
            Place::first(),
            soon(),
        )
        .await
        .unwrap();
    assert!(matches!(refused.outcome, AcquireOutcome::Held { .. }));
    let ticket = refused.ticket.expect("a refused waiter gets a ticket");
    let mut sub = waiter.release_notifier().unwrap().subscribe();
    backend.release(&k, &token, soon()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), sub.released(&k))
        .await
        .expect("the qualified table's channel carries the release");
    // The waiter takes its turn.
    let place = Place {
        ticket: Some(ticket.number),
        fair: true,
    };
    assert_eq!(
        fence_of(
            waiter
                .try_acquire_as_waiter(
                    &k,
                    &waiting,
                    ttl(Duration::from_secs(30)),
                    "w",
                    place,
                    soon()
                )
                .await
                .unwrap()
                .outcome
        ),
        2
    );
    admin
        .batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
        .await
        .unwrap();
}

#[test]
fn table_names_carrying_sql_are_refused() {
    for bad in [
        "x\"; DROP TABLE y; --",
        "x; DROP TABLE y",
        "locks' OR '1'='1",
        "a.b.c",
        "\"quoted\"",
        "public.",
        "",
    ] {
        assert!(
            matches!(
                PostgresConfig::builder().table(bad).build(),
                Err(Error::InvalidTableName { .. })
            ),
            "{bad:?} must be refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_or_schema_gives_schema_missing_with_a_hint() {
    let name = "missing_table_or_schema_gives_schema_missing_with_a_hint";
    let Some(_admin) = common::admin_or_skip(name).await else {
        return;
    };
    let table = unique("dl_missing");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .url(url())
            .table(&table)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let k = key("k");
    let token = Token::new();
    let lease = ttl(Duration::from_secs(5));
    let results = [
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .map(|_| ()),
        backend.extend(&k, &token, lease, soon()).await.map(|_| ()),
        backend.release(&k, &token, soon()).await,
        backend.inspect(&k).await.map(|_| ()),
        backend.list().await.map(|_| ()),
    ];
    for result in results {
        match result {
            Err(error @ Error::SchemaMissing { .. }) => {
                let text = error.to_string();
                assert!(
                    text.contains(&table) && text.contains("create_table"),
                    "{text}"
                );
            }
            other => panic!("expected SchemaMissing, got {other:?}"),
        }
    }

    let schema = unique("dl_noschema");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .url(url())
            .table(format!("{schema}.locks"))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    for result in [
        backend.create_table().await,
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .map(|_| ()),
    ] {
        match result {
            Err(error @ Error::SchemaMissing { .. }) => {
                assert!(error.to_string().contains("CREATE SCHEMA"), "{error}")
            }
            other => panic!("expected SchemaMissing, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_is_idempotent_and_safe_concurrently() {
    let name = "create_table_is_idempotent_and_safe_concurrently";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let table = unique("dl_concurrent");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .url(url())
            .table(&table)
            .pool_size(8)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    // Eight sessions at once, each running CREATE TABLE IF NOT EXISTS.
    let results = concurrently(8, || {
        let backend = backend.clone();
        async move { backend.create_table().await }
    })
    .await;
    for result in results {
        result.expect("concurrent create_table succeeds");
    }
    backend.create_table().await.expect("and again");
    fence_of(
        backend
            .try_acquire(
                &key("k"),
                &Token::new(),
                ttl(Duration::from_secs(5)),
                "o",
                soon(),
            )
            .await
            .unwrap(),
    );
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_sql_creates_the_documented_columns_with_timestamptz() {
    let name = "schema_sql_creates_the_documented_columns_with_timestamptz";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let table = unique("dl_migrated");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .url(url())
            .table(&table)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    // As a user's migration tool would: run the DDL text itself.
    admin.batch_execute(&backend.schema_sql()).await.unwrap();
    let rows = admin
        .query(
            "SELECT column_name::text, data_type::text, is_nullable::text \
             FROM information_schema.columns WHERE table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap();
    let columns: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let expected = [
        ("lock_key", "text", "NO"),
        ("token", "uuid", "NO"),
        ("fence", "bigint", "NO"),
        ("owner", "text", "NO"),
        ("acquired_at", "timestamp with time zone", "NO"),
        ("expires_at", "timestamp with time zone", "YES"),
        ("released_at", "timestamp with time zone", "YES"),
        ("line_next", "bigint", "NO"),
        ("line_head", "bigint", "NO"),
    ];
    let expected: Vec<(String, String, String)> = expected
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(columns, expected);
    let k = key("migrated");
    let token = Token::new();
    fence_of(
        backend
            .try_acquire(&k, &token, ttl(Duration::from_secs(5)), "o", soon())
            .await
            .unwrap(),
    );
    backend.release(&k, &token, soon()).await.unwrap();
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_acquire_and_stale_token_calls_write_nothing() {
    let name = "refused_acquire_and_stale_token_calls_write_nothing";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let k = key("contended");
    let holder = Token::new();
    fence_of(
        t.backend
            .try_acquire(&k, &holder, ttl(Duration::from_secs(30)), "o", soon())
            .await
            .unwrap(),
    );
    // ctid moves with every new row version; xmin names the writer; xmax is set by
    // any row lock (FOR UPDATE, ON CONFLICT DO UPDATE) or delete.
    let version_sql = format!(
        "SELECT ctid::text, xmin::text, xmax::text FROM \"{}\" WHERE lock_key = $1",
        t.table
    );
    let version = || async {
        let row = t
            .admin
            .query_one(&version_sql, &[&k.as_str()])
            .await
            .unwrap();
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2),
        )
    };
    let before = version().await;
    for _ in 0..5 {
        assert!(matches!(
            t.backend
                .try_acquire(&k, &Token::new(), ttl(Duration::from_secs(30)), "x", soon())
                .await
                .unwrap(),
            AcquireOutcome::Held { remaining: Some(_) }
        ));
    }
    let stale = Token::new();
    assert!(
        t.backend
            .extend(&k, &stale, ttl(Duration::from_secs(30)), soon())
            .await
            .is_err()
    );
    assert!(t.backend.release(&k, &stale, soon()).await.is_err());
    assert_eq!(version().await, before, "a refused call touched the row");

    // The check can see a write: the upsert the backend avoids locks the row even
    // when its WHERE refuses the update.
    t.admin
        .execute(
            &format!(
                "INSERT INTO \"{}\" VALUES ($1, gen_random_uuid(), 1, 'x', clock_timestamp(), \
                 clock_timestamp()) ON CONFLICT (lock_key) DO UPDATE SET owner = 'x' WHERE false",
                t.table
            ),
            &[&k.as_str()],
        )
        .await
        .unwrap();
    let after = version().await;
    assert_ne!(
        after.2, before.2,
        "ON CONFLICT DO UPDATE … WHERE false set xmax"
    );
    t.backend.release(&k, &holder, soon()).await.unwrap();
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_and_one_round_trip_per_operation() {
    let name = "one_statement_and_one_round_trip_per_operation";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let real = common::pg_config();
    let host = match &real.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => {
            distrlock_testkit::skip(
                name,
                "the test server is on a Unix socket; the counting proxy needs TCP",
            );
            return;
        }
    };
    let port = real.get_ports().first().copied().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = CountingProxy::start(upstream).await.unwrap();
    let mut via_proxy = tokio_postgres::Config::new();
    via_proxy.host("127.0.0.1").port(proxy.addr.port());
    if let Some(user) = real.get_user() {
        via_proxy.user(user);
    }
    if let Some(password) = real.get_password() {
        via_proxy.password(password);
    }
    if let Some(db) = real.get_dbname() {
        via_proxy.dbname(db);
    }
    let table = unique("dl_counted");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(via_proxy.clone())
            .table(&table)
            .pool_size(1)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    backend.create_table().await.unwrap();

    let (k, absent, a, b) = (key("counted"), key("absent"), Token::new(), Token::new());
    let lease = ttl(Duration::from_secs(30));
    // Warm up: the first use of each statement on the connection prepares it.
    fence_of(
        backend
            .try_acquire(&k, &a, lease, "o", soon())
            .await
            .unwrap(),
    );
    backend.extend(&k, &a, lease, soon()).await.unwrap();
    backend
        .extend_many(&[(k.clone(), a)], lease, soon())
        .await
        .unwrap();
    backend.release(&k, &a, soon()).await.unwrap();

    let mut report = Vec::new();
    let mut measure = |what: &str, before: &common::counting_proxy::Counts| {
        let delta = proxy.counts().since(before);
        report.push(format!(
            "{what}: {} statement(s), {} round trip(s), {:?}",
            delta.statements(),
            delta.round_trips(),
            delta.messages
        ));
        delta
    };
    let expect_one = |what: &str, delta: &common::counting_proxy::Counts, parses: u64| {
        assert_eq!(delta.statements(), 1, "{what}: {delta:?}");
        assert_eq!(delta.round_trips(), 1, "{what}: {delta:?}");
        assert_eq!(delta.get('P'), parses, "{what}: {delta:?}");
        assert_eq!(delta.get('Q'), 0, "{what}: {delta:?}");
    };

    let c = proxy.counts();
    fence_of(
        backend
            .try_acquire(&k, &a, lease, "o", soon())
            .await
            .unwrap(),
    );
    expect_one(
        "acquire, row present and free",
        &measure("acquire (present, free)", &c),
        0,
    );
    let c = proxy.counts();
    fence_of(
        backend
            .try_acquire(&k, &a, lease, "o", soon())
            .await
            .unwrap(),
    );
    expect_one(
        "acquire, same token",
        &measure("acquire (same token)", &c),
        0,
    );
    let c = proxy.counts();
    assert!(matches!(
        backend
            .try_acquire(&k, &b, lease, "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    expect_one("acquire, refused", &measure("acquire (refused)", &c), 0);
    let c = proxy.counts();
    fence_of(
        backend
            .try_acquire(&absent, &b, lease, "o", soon())
            .await
            .unwrap(),
    );
    expect_one("acquire, row absent", &measure("acquire (absent)", &c), 0);
    let c = proxy.counts();
    backend.extend(&k, &a, lease, soon()).await.unwrap();
    expect_one("extend", &measure("extend", &c), 0);
    let c = proxy.counts();
    backend.release(&k, &a, soon()).await.unwrap();
    expect_one("release", &measure("release", &c), 0);
    let c = proxy.counts();
    assert!(backend.release(&k, &a, soon()).await.is_err());
    expect_one("release, not held", &measure("release (not held)", &c), 0);

    // A batch of 100 held leases and one stale token: one statement.
    let mut batch = Vec::new();
    for i in 0..100 {
        let (bk, bt) = (key(&format!("batch-{i}")), Token::new());
        fence_of(
            backend
                .try_acquire(&bk, &bt, lease, "o", soon())
                .await
                .unwrap(),
        );
        batch.push((bk, bt));
    }
    batch.push((key("batch-0"), Token::new()));
    let c = proxy.counts();
    let results = backend.extend_many(&batch, lease, soon()).await.unwrap();
    expect_one("extend_many", &measure("extend_many (101 leases)", &c), 0);
    assert!(results[..100].iter().all(Result::is_ok));
    assert!(matches!(results[100], Err(Error::NotHeld { .. })));

    // Inside the caller's transaction: one unnamed statement, parsed each time.
    let mut client = common::connect_with(via_proxy).await.unwrap();
    let tx = client.transaction().await.unwrap();
    let c = proxy.counts();
    fence_of(
        backend
            .try_acquire_in(&tx, &k, &a, lease, "o")
            .await
            .unwrap(),
    );
    expect_one("try_acquire_in", &measure("try_acquire_in", &c), 1);
    let c = proxy.counts();
    backend.release_in(&tx, &k, &a).await.unwrap();
    expect_one("release_in", &measure("release_in", &c), 1);
    tx.commit().await.unwrap();

    eprintln!(
        "measured through the counting proxy:\n  {}",
        report.join("\n  ")
    );
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_pool_gets_the_session_bounds_through_the_hook() {
    let name = "callers_pool_gets_the_session_bounds_through_the_hook";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let table = unique("dl_own_pool");
    let config = PostgresConfig::builder()
        .url(url())
        .table(&table)
        .lock_timeout(Duration::from_millis(1234))
        .statement_timeout(Duration::from_millis(4321))
        .build()
        .unwrap();
    let manager = deadpool_postgres::Manager::new(common::pg_config(), tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(2)
        .post_create(config.post_create_hook())
        .build()
        .unwrap();
    let backend = PostgresBackend::from_pool(pool.clone(), config).unwrap();
    backend.create_table().await.unwrap();
    let conn = pool.get().await.unwrap();
    let lock_timeout: String = conn
        .query_one("SHOW lock_timeout", &[])
        .await
        .unwrap()
        .get(0);
    let statement_timeout: String = conn
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        (lock_timeout.as_str(), statement_timeout.as_str()),
        ("1234ms", "4321ms")
    );
    drop(conn);
    let k = key("own-pool");
    let token = Token::new();
    fence_of(
        backend
            .try_acquire(&k, &token, ttl(Duration::from_secs(5)), "o", soon())
            .await
            .unwrap(),
    );
    backend.release(&k, &token, soon()).await.unwrap();
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_unavailable_and_errors_hide_the_password() {
    // Port 1 on loopback: nothing listens there, so the connection is refused.
    let result = PostgresBackend::connect("postgres://app:pw-not-to-leak@127.0.0.1:1/db").await;
    match result {
        Err(error @ Error::Unavailable { .. }) => {
            assert!(error.is_transient());
            let shown = format!("{error} / {error:?}");
            assert!(!shown.contains("pw-not-to-leak"), "{shown}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_renewals_return_the_statements_clock_reading() {
    let name = "grants_and_renewals_return_the_statements_clock_reading";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    assert!(
        t.backend.server_clock().is_known(),
        "the pool's session setup read the server's clock"
    );
    let (k, token) = (key("reading"), Token::new());
    let lease = Duration::from_secs(30);
    let before = server_now_us(&t.admin).await;
    let granted = match t
        .backend
        .try_acquire(&k, &token, ttl(lease), "o", soon())
        .await
        .unwrap()
    {
        AcquireOutcome::Acquired { server_time, .. } => server_time,
        other => panic!("expected Acquired, got {other:?}"),
    };
    let after = server_now_us(&t.admin).await;
    let granted_us = micros_since_epoch(granted);
    assert!(
        (before..=after).contains(&granted_us),
        "the grant's reading {granted_us} is not between {before} and {after}"
    );
    // The very reading the lease was computed from: exact to the microsecond.
    let info = t.backend.inspect(&k).await.unwrap().unwrap();
    assert_eq!(info.acquired_at, granted);
    assert_eq!(info.expires_at, Some(granted + lease));

    let renewed = t
        .backend
        .extend(&k, &token, ttl(lease), soon())
        .await
        .unwrap();
    assert!(renewed > granted);
    let info = t.backend.inspect(&k).await.unwrap().unwrap();
    assert_eq!(info.expires_at, Some(renewed + lease));

    let batch = t
        .backend
        .extend_many(
            &[(k.clone(), token), (key("reading-absent"), token)],
            ttl(lease),
            soon(),
        )
        .await
        .unwrap();
    let renewed_in_batch = *batch[0].as_ref().unwrap();
    assert!(matches!(batch[1], Err(Error::NotHeld { .. })));
    let info = t.backend.inspect(&k).await.unwrap().unwrap();
    assert_eq!(info.expires_at, Some(renewed_in_batch + lease));
    // A batch that renews nothing still answers (one row of NULLs).
    let none = t
        .backend
        .extend_many(&[(key("reading-absent"), token)], ttl(lease), soon())
        .await
        .unwrap();
    assert!(matches!(none[..], [Err(Error::NotHeld { .. })]));
    t.backend.release(&k, &token, soon()).await.unwrap();
    t.drop_table().await;
}

/// A counting proxy in front of the test server, and a driver config through it;
/// `None` after reporting the test skipped when the server is not on TCP.
async fn counting_proxy(test: &str) -> Option<(CountingProxy, tokio_postgres::Config)> {
    let real = common::pg_config();
    let Some(tokio_postgres::config::Host::Tcp(host)) = real.get_hosts().first().cloned() else {
        distrlock_testkit::skip(test, "the counting proxy needs a TCP server");
        return None;
    };
    let port = real.get_ports().first().copied().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let proxy = CountingProxy::start(upstream).await.unwrap();
    let mut via_proxy = tokio_postgres::Config::new();
    via_proxy.host("127.0.0.1").port(proxy.addr.port());
    if let Some(user) = real.get_user() {
        via_proxy.user(user);
    }
    if let Some(password) = real.get_password() {
        via_proxy.password(password);
    }
    if let Some(db) = real.get_dbname() {
        via_proxy.dbname(db);
    }
    Some((proxy, via_proxy))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_without_the_hook_reads_the_clock_once_before_the_first_lock_statement() {
    let name = "a_pool_without_the_hook_reads_the_clock_once_before_the_first_lock_statement";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some((proxy, via_proxy)) = counting_proxy(name).await else {
        return;
    };
    let table = unique("dl_no_hook");
    let manager = deadpool_postgres::Manager::new(via_proxy, tokio_postgres::NoTls);
    let pool = deadpool_postgres::Pool::builder(manager)
        .max_size(1)
        .build()
        .unwrap();
    let config = PostgresConfig::builder()
        .table(&table)
        .listen(false)
        .build()
        .unwrap();
    let backend = PostgresBackend::from_pool(pool, config).unwrap();
    backend.create_table().await.unwrap();
    assert!(
        !backend.server_clock().is_known(),
        "no hook, no reading yet"
    );

    let (k, token) = (key("no-hook"), Token::new());
    let lease = ttl(Duration::from_secs(30));
    let c = proxy.counts();
    fence_of(
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .unwrap(),
    );
    let first = proxy.counts().since(&c);
    // One simple query for the clock, then the statement (parsed on first use).
    assert_eq!(
        (first.get('Q'), first.get('E'), first.round_trips()),
        (1, 1, 3),
        "{first:?}"
    );
    assert!(backend.server_clock().is_known());
    let c = proxy.counts();
    fence_of(
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .unwrap(),
    );
    let again = proxy.counts().since(&c);
    assert_eq!(
        (again.statements(), again.round_trips(), again.get('Q')),
        (1, 1, 0),
        "{again:?}"
    );
    backend.release(&k, &token, soon()).await.unwrap();
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_not_after_has_passed_sends_nothing() {
    let name = "a_call_whose_not_after_has_passed_sends_nothing";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let (k, token) = (key("passed"), Token::new());
    let lease = ttl(Duration::from_secs(30));
    let passed = Instant::now();
    let results = [
        t.backend
            .try_acquire(&k, &token, lease, "o", passed)
            .await
            .map(|_| ()),
        t.backend
            .extend(&k, &token, lease, passed)
            .await
            .map(|_| ()),
        t.backend
            .extend_many(&[(k.clone(), token)], lease, passed)
            .await
            .map(|_| ()),
        t.backend.release(&k, &token, passed).await,
    ];
    for result in results {
        match result {
            Err(error @ Error::Unavailable { .. }) => assert!(error.is_transient()),
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
    assert!(t.backend.inspect(&k).await.unwrap().is_none());
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_clock_estimate_is_corrected_from_the_refusal_and_retried_once() {
    let name = "a_wrong_clock_estimate_is_corrected_from_the_refusal_and_retried_once";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some((proxy, via_proxy)) = counting_proxy(name).await else {
        return;
    };
    let table = unique("dl_estimate");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(via_proxy.clone())
            .table(&table)
            .pool_size(1)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    backend.create_table().await.unwrap();
    let (k, token) = (key("estimate"), Token::new());
    let lease = ttl(Duration::from_secs(30));
    // Prepare the statements, so the counts below are of executions only.
    fence_of(
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .unwrap(),
    );
    backend.extend(&k, &token, lease, soon()).await.unwrap();
    backend
        .extend_many(&[(k.clone(), token)], lease, soon())
        .await
        .unwrap();
    backend.release(&k, &token, soon()).await.unwrap();

    // What a server clock that stepped forward by an hour since the last reading
    // looks like from here: every bound is an hour early, so the server refuses
    // each statement as late although our clock is far from not_after. The
    // refusal's own reading corrects the estimate and the statement runs again.
    let an_hour_behind = || {
        let now_us = distrlock_core::server_clock::unix_micros(SystemTime::now());
        backend
            .server_clock()
            .observe(Instant::now(), now_us - 3_600_000_000);
    };
    let expect_two = |what: &str, before: &common::counting_proxy::Counts| {
        let delta = proxy.counts().since(before);
        assert_eq!(
            (delta.get('E'), delta.round_trips()),
            (2, 2),
            "{what}: refused once, run once more: {delta:?}"
        );
    };
    an_hour_behind();
    let c = proxy.counts();
    let outcome = backend
        .try_acquire(&k, &token, lease, "o", soon())
        .await
        .expect("acquire after the estimate was corrected");
    fence_of(outcome);
    expect_two("acquire", &c);
    // Corrected: the next call runs once.
    let c = proxy.counts();
    backend.extend(&k, &token, lease, soon()).await.unwrap();
    assert_eq!(proxy.counts().since(&c).get('E'), 1);

    an_hour_behind();
    let c = proxy.counts();
    backend
        .extend(&k, &token, lease, soon())
        .await
        .expect("extend after the estimate was corrected");
    expect_two("extend", &c);
    an_hour_behind();
    let c = proxy.counts();
    let results = backend
        .extend_many(&[(k.clone(), token)], lease, soon())
        .await
        .expect("extend_many after the estimate was corrected");
    assert!(results[0].is_ok(), "{results:?}");
    expect_two("extend_many", &c);
    an_hour_behind();
    let c = proxy.counts();
    backend
        .release(&k, &token, soon())
        .await
        .expect("release after the estimate was corrected");
    expect_two("release", &c);

    // The caller's own client too.
    let client = common::connect_with(via_proxy).await.unwrap();
    an_hour_behind();
    let c = proxy.counts();
    fence_of(
        backend
            .try_acquire_in(&client, &k, &token, lease, "o")
            .await
            .expect("try_acquire_in after the estimate was corrected"),
    );
    expect_two("try_acquire_in", &c);

    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_answer_was_lost_is_ok_even_after_a_waiter_took_the_key() {
    let name = "a_release_whose_answer_was_lost_is_ok_even_after_a_waiter_took_the_key";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let proxy = match common::proxy_to_server().await {
        Ok(proxy) => proxy,
        Err(skip) => {
            distrlock_testkit::skip(name, &skip.0);
            return;
        }
    };
    let table = unique("dl_lost_answer");
    let holder = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(common::through(&proxy))
            .table(&table)
            .pool_size(1)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    holder.create_table().await.unwrap();
    let waiter = PostgresBackend::from_config(
        PostgresConfig::builder()
            .url(url())
            .table(&table)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let lease = ttl(Duration::from_secs(30));
    let (k, mine, theirs) = (key("lost-answer"), Token::new(), Token::new());
    // Prepared on the one pooled connection, so the release is one chunk each way.
    fence_of(
        holder
            .try_acquire(&k, &mine, lease, "holder", soon())
            .await
            .unwrap(),
    );
    holder.release(&k, &mine, soon()).await.unwrap();
    fence_of(
        holder
            .try_acquire(&k, &mine, lease, "holder", soon())
            .await
            .unwrap(),
    );

    // Every chunk waits 500 ms in the proxy: the release reaches the server after
    // 500 ms, and its answer would reach us 500 ms later.
    proxy.set_latency(Duration::from_millis(500));
    let release = {
        let (holder, k) = (holder.clone(), k.clone());
        tokio::spawn(async move { holder.release(&k, &mine, soon()).await })
    };
    let released_by = Instant::now() + Duration::from_secs(5);
    while waiter.inspect(&k).await.unwrap().unwrap().state != LockState::Released {
        assert!(Instant::now() < released_by, "the release never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Woken by the release's NOTIFY, a waiter takes the key at once...
    fence_of(
        waiter
            .try_acquire(&k, &theirs, lease, "waiter", soon())
            .await
            .unwrap(),
    );
    // ...and the answer is lost with the connection: the holder's release runs
    // again on a new one, and finds another token's lease.
    proxy.set_latency(Duration::ZERO);
    proxy.cut();
    let result = release.await.unwrap();
    assert!(
        result.is_ok(),
        "the release went through; its retry must not report {result:?}"
    );
    let info = waiter.inspect(&k).await.unwrap().unwrap();
    assert_eq!(
        (info.state, info.owner.as_str()),
        (LockState::Held, "waiter"),
        "the retry must not touch the waiter's lease"
    );
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_after_the_bound_waits_for_an_abandoned_first_acquire_still_committing() {
    let name = "release_after_the_bound_waits_for_an_abandoned_first_acquire_still_committing";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    // A commit that takes a second (as behind a slow disk or a synchronous
    // standby): a deferred trigger on this test's table sleeps at commit.
    let function = unique("dl_slow_commit");
    t.admin
        .batch_execute(&format!(
            "CREATE FUNCTION \"{function}\"() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN PERFORM pg_sleep(1); RETURN NULL; END $$; \
             CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON \"{}\" \
             DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION \"{function}\"()",
            t.table
        ))
        .await
        .unwrap();
    let (k, token) = (key("first-insert"), Token::new());
    // The statement reads its clock well before the bound and inserts the key's
    // first row; the caller gives up at not_after, while the commit is pending.
    let not_after = Instant::now() + Duration::from_millis(300);
    let gave_up = tokio::time::timeout_at(
        not_after,
        t.backend.try_acquire(
            &k,
            &token,
            ttl(Duration::from_secs(30)),
            "abandoned",
            not_after,
        ),
    )
    .await;
    assert!(gave_up.is_err(), "the commit should still be pending");
    // As core's cleanup does: release once not_after has passed. Its snapshot
    // cannot see the uncommitted row, and an UPDATE does not wait for an
    // uncommitted insert, so only the backend can order it after the acquire.
    let released = t.backend.release(&k, &token, soon()).await;
    let info = t.backend.inspect(&k).await.unwrap();
    assert!(
        released.is_ok()
            && info
                .as_ref()
                .is_some_and(|i| i.state == LockState::Released),
        "the abandoned acquire kept the lock: release {released:?}, row {info:?}"
    );
    let _ = t
        .admin
        .batch_execute(&format!(
            "DROP TABLE \"{}\"; DROP FUNCTION \"{function}\"()",
            t.table
        ))
        .await;
}

/// One row locked by another transaction must not cost the manager's other
/// locks: the batch renews every other lease, reports the locked one as unknown
/// (a transient error, not NotHeld), and through a manager no other guard is lost.
#[tokio::test]
async fn a_row_locked_by_another_transaction_does_not_stall_the_batch() {
    let name = "a_row_locked_by_another_transaction_does_not_stall_the_batch";
    let Some(t) = TestBackend::new(name, |b| b.lock_timeout(Duration::from_millis(500))).await
    else {
        return;
    };
    let manager = distrlock_core::LockManager::builder(t.backend.clone())
        .ttl(Duration::from_secs(3))
        .build()
        .unwrap();
    let mut guards = Vec::new();
    for i in 0..5 {
        let k = format!("k{i}");
        guards.push(manager.lock(&k).unwrap().try_acquire().await.unwrap());
    }
    // Another transaction holds the row of k0 for 10 s (3 ttls).
    let mut foreign = common::admin().await.unwrap();
    let tx = foreign.transaction().await.unwrap();
    tx.execute(
        &format!(
            "SELECT 1 FROM \"{}\" WHERE lock_key = 'k0' FOR UPDATE",
            t.table
        ),
        &[],
    )
    .await
    .unwrap();
    // One batch, directly: the other four are renewed.
    let leases: Vec<(LockKey, Token)> = guards
        .iter()
        .map(|g| (g.key().clone(), g.token()))
        .collect();
    let started = Instant::now();
    let answers = t
        .backend
        .extend_many(&leases, ttl(Duration::from_secs(3)), soon())
        .await
        .expect("the batch answers even with one row locked");
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "it did not wait on the lock"
    );
    assert!(
        answers[0].as_ref().is_err_and(Error::is_transient),
        "the locked lease is unknown, not gone: {:?}",
        answers[0]
    );
    for answer in &answers[1..] {
        assert!(answer.is_ok(), "{answer:?}");
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    for guard in &guards[1..] {
        assert!(
            !guard.is_lost(),
            "{} was lost because another key's row was locked",
            guard.key()
        );
    }
    tx.rollback().await.unwrap();
    for guard in guards {
        let _ = guard.release().await;
    }
    t.drop_table().await;
}

/// Makes the table's failover marker say it last saw timeline 0: to the next lock
/// statement this server looks promoted (it is on timeline 1 or later), as after a
/// failover to a standby.
async fn pretend_promoted(t: &TestBackend) {
    let changed = t
        .admin
        .execute(
            &format!("UPDATE \"{}\" SET fence = 0 WHERE lock_key = ''", t.table),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1, "create_table wrote the failover marker");
}

/// The failover marker's (timeline, max_ttl µs, quarantine start µs).
async fn marker(t: &TestBackend) -> Option<(i64, i64, i64)> {
    t.admin
        .query_opt(
            &format!(
                "SELECT fence, \
                        (EXTRACT(EPOCH FROM (expires_at - acquired_at)) * 1000000)::int8, \
                        (EXTRACT(EPOCH FROM acquired_at) * 1000000)::int8 \
                 FROM \"{}\" WHERE lock_key = ''",
                t.table
            ),
            &[],
        )
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_timeline_starts_a_failover_quarantine_of_max_ttl() {
    let name = "a_new_timeline_starts_a_failover_quarantine_of_max_ttl";
    let max_ttl = Duration::from_secs(3);
    let Some(t) = TestBackend::new(name, |b| b.max_ttl(max_ttl)).await else {
        return;
    };
    let (timeline, max_ttl_us, start_us) = marker(&t).await.expect("a marker");
    assert!(timeline >= 1);
    assert_eq!(max_ttl_us, 3_000_000);
    assert_eq!(start_us, 0, "no quarantine: it starts at the epoch");
    let held = key("held-across");
    let held_token = Token::new();
    fence_of(
        t.backend
            .try_acquire(&held, &held_token, ttl(Duration::from_secs(2)), "a", soon())
            .await
            .unwrap(),
    );

    pretend_promoted(&t).await;
    let started = Instant::now();
    let k = key("after-promotion");
    let token = Token::new();
    match t
        .backend
        .try_acquire(&k, &token, ttl(Duration::from_secs(1)), "b", soon())
        .await
        .unwrap()
    {
        AcquireOutcome::Held { remaining } => {
            let remaining = remaining.expect("the quarantine's end");
            assert!(
                remaining >= max_ttl && remaining <= max_ttl + Duration::from_millis(1100),
                "{remaining:?}"
            );
        }
        other => panic!("granted in the quarantine: {other:?}"),
    }
    // The first statement recorded the new timeline, the next fence epoch and
    // the quarantine's start.
    let (seen, max_ttl_us, start_us) = marker(&t).await.unwrap();
    assert_eq!(seen & 0xffff_ffff, timeline & 0xffff_ffff);
    assert_eq!(
        seen >> 32,
        1,
        "the epoch grew by the timeline's step, 0 to 1"
    );
    assert_eq!(max_ttl_us, 3_000_000, "the quarantine keeps the max_ttl");
    assert!(start_us > 0);
    // No extend either: the old timeline may have granted this key to another
    // token in a commit the promotion lost.
    match t
        .backend
        .extend(&held, &held_token, ttl(Duration::from_secs(2)), soon())
        .await
    {
        Err(e) => {
            assert!(e.is_transient(), "{e:?}");
            assert!(e.to_string().contains("failover quarantine"), "{e}");
        }
        Ok(at) => panic!("extended in the quarantine at {at:?}"),
    }
    let batch = t
        .backend
        .extend_many(
            &[(held.clone(), held_token)],
            ttl(Duration::from_secs(2)),
            soon(),
        )
        .await
        .unwrap();
    assert!(
        matches!(&batch[0], Err(e) if e.is_transient() && e.to_string().contains("failover quarantine")),
        "{batch:?}"
    );
    // Nor does a second statement restart it, and the marker is never listed.
    let listed = t.backend.list().await.unwrap();
    assert!(listed.iter().all(|info| !info.key.as_str().is_empty()));
    assert_eq!(listed.len(), 1, "{listed:?}");

    // Granted once max_ttl (+ 0.2 % + 1 s) has passed since the first statement.
    let fence = loop {
        match t
            .backend
            .try_acquire(&k, &token, ttl(Duration::from_secs(1)), "b", soon())
            .await
            .unwrap()
        {
            AcquireOutcome::Acquired { fence, .. } => break fence.get(),
            AcquireOutcome::Held { .. } => {
                assert!(started.elapsed() < Duration::from_secs(6), "still refused");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert!(
        started.elapsed() >= max_ttl,
        "granted after {:?}",
        started.elapsed()
    );
    assert_eq!(fence, 1 << 40, "the new epoch's first fence");
    assert_eq!(marker(&t).await.unwrap().2, start_us, "one quarantine");
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_quarantine_a_new_timeline_grants_at_once() {
    let name = "without_the_quarantine_a_new_timeline_grants_at_once";
    let Some(t) = TestBackend::new(name, |b| b.failover_quarantine(false)).await else {
        return;
    };
    pretend_promoted(&t).await;
    fence_of(
        t.backend
            .try_acquire(
                &key("k"),
                &Token::new(),
                ttl(Duration::from_secs(1)),
                "a",
                soon(),
            )
            .await
            .unwrap(),
    );
    // The new timeline is recorded all the same.
    assert!(marker(&t).await.unwrap().0 >= 1);
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ttl_is_the_tables_and_create_table_only_raises_it() {
    let name = "max_ttl_is_the_tables_and_create_table_only_raises_it";
    let Some(t) = TestBackend::new(name, |b| b.max_ttl(Duration::from_secs(10))).await else {
        return;
    };
    let k = key("long");
    let long = ttl(Duration::from_secs(11));
    match t
        .backend
        .try_acquire(&k, &Token::new(), long, "a", soon())
        .await
    {
        Err(Error::InvalidTtl { reason }) => assert!(reason.contains("max_ttl"), "{reason}"),
        other => panic!("expected InvalidTtl, got {other:?}"),
    }
    // Held by another token, a too-long ttl is still the caller's error.
    let holder = Token::new();
    fence_of(
        t.backend
            .try_acquire(&k, &holder, ttl(Duration::from_secs(5)), "a", soon())
            .await
            .unwrap(),
    );
    assert!(matches!(
        t.backend
            .try_acquire(&k, &Token::new(), long, "b", soon())
            .await,
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        t.backend.extend(&k, &holder, long, soon()).await,
        Err(Error::InvalidTtl { .. })
    ));
    // Another client's longer max_ttl raises the table's; its shorter one does not
    // lower it.
    let raiser = t.sibling(|b| b.max_ttl(Duration::from_secs(20))).await;
    raiser.create_table().await.unwrap();
    assert_eq!(marker(&t).await.unwrap().1, 20_000_000);
    let lowerer = t.sibling(|b| b.max_ttl(Duration::from_secs(5))).await;
    lowerer.create_table().await.unwrap();
    assert_eq!(marker(&t).await.unwrap().1, 20_000_000);
    t.backend.extend(&k, &holder, long, soon()).await.unwrap();
    // Every client reads the table's max_ttl, whatever its own config says.
    let other = Token::new();
    t.backend.release(&k, &holder, soon()).await.unwrap();
    fence_of(
        lowerer
            .try_acquire(&k, &other, ttl(Duration::from_secs(15)), "c", soon())
            .await
            .unwrap(),
    );
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_failover_marker_gets_one_on_first_use() {
    let name = "a_table_without_a_failover_marker_gets_one_on_first_use";
    let Some(t) = TestBackend::new(name, |b| b.max_ttl(Duration::from_secs(42))).await else {
        return;
    };
    // As a table made from an older DDL.
    t.admin
        .batch_execute(&format!("DELETE FROM \"{}\" WHERE lock_key = ''", t.table))
        .await
        .unwrap();
    assert_eq!(marker(&t).await, None);
    let outcome = t
        .backend
        .try_acquire(
            &key("k"),
            &Token::new(),
            ttl(Duration::from_secs(1)),
            "a",
            soon(),
        )
        .await
        .unwrap();
    let (timeline, max_ttl_us, start_us) = marker(&t).await.expect("written on first use");
    assert_eq!(max_ttl_us, 42_000_000);
    // The epoch starts at the timeline minus one. On the first timeline there
    // can have been no failover: no quarantine. On a later one the missing
    // marker may have been lost in a failover: a quarantine.
    let (on, epoch) = (timeline & 0xffff_ffff, timeline >> 32);
    assert_eq!(epoch, on - 1);
    if on == 1 {
        assert_eq!(start_us, 0);
        fence_of(outcome);
    } else {
        assert!(start_us > 0, "a quarantine on timeline {on}");
        assert!(
            matches!(outcome, AcquireOutcome::Held { .. }),
            "{outcome:?}"
        );
    }
    t.drop_table().await;
}

/// Sets the table's failover marker to `fence` (epoch << 32 | timeline).
async fn set_marker(t: &TestBackend, fence: i64) {
    let changed = t
        .admin
        .execute(
            &format!("UPDATE \"{}\" SET fence = $1 WHERE lock_key = ''", t.table),
            &[&fence],
        )
        .await
        .unwrap();
    assert_eq!(changed, 1);
}

/// Waits out a quarantine: tries `k` until granted, within `limit`.
async fn acquire_after_quarantine(t: &TestBackend, k: &LockKey, limit: Duration) -> i64 {
    let started = Instant::now();
    loop {
        match t
            .backend
            .try_acquire(k, &Token::new(), ttl(Duration::from_secs(1)), "w", soon())
            .await
            .unwrap()
        {
            AcquireOutcome::Acquired { fence, .. } => return fence.get(),
            AcquireOutcome::Held { .. } => {
                assert!(started.elapsed() < limit, "still refused after {limit:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// pg_upgrade and pg_resetwal start a cluster on timeline 1 again: the marker
/// (copied with the data) then names a later timeline than the server's. That
/// is a change of timeline all the same: a quarantine, and a new fence epoch
/// above every fence before, even those of the later timeline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeline_that_goes_back_starts_a_quarantine_and_a_new_fence_epoch() {
    let name = "a_timeline_that_goes_back_starts_a_quarantine_and_a_new_fence_epoch";
    let Some(t) = TestBackend::new(name, |b| b.max_ttl(Duration::from_secs(2))).await else {
        return;
    };
    // Whatever the test server's timeline: the marker is made to name two
    // timelines later, with an epoch two higher, as if the data came from a
    // cluster further along than this one.
    let (current, _, _) = marker(&t).await.unwrap();
    let (timeline, epoch) = (current & 0xffff_ffff, current >> 32);
    let k = key("upgraded");
    // Fences of that cluster reached its epoch's floor + 5.
    fence_of(
        t.backend
            .try_acquire(
                &k,
                &Token::new(),
                ttl(Duration::from_secs(1)),
                "old",
                soon(),
            )
            .await
            .unwrap(),
    );
    t.admin
        .execute(
            &format!(
                "UPDATE \"{}\" SET fence = $1, expires_at = NULL WHERE lock_key = $2",
                t.table
            ),
            &[&(((epoch + 2) << 40) + 5), &k.as_str()],
        )
        .await
        .unwrap();
    set_marker(&t, ((epoch + 2) << 32) | (timeline + 2)).await;
    match t
        .backend
        .try_acquire(
            &k,
            &Token::new(),
            ttl(Duration::from_secs(1)),
            "new",
            soon(),
        )
        .await
        .unwrap()
    {
        AcquireOutcome::Held { remaining } => assert!(remaining.unwrap() >= Duration::from_secs(2)),
        other => panic!("granted right after the timeline went back: {other:?}"),
    }
    let (recorded, _, _) = marker(&t).await.unwrap();
    assert_eq!(
        recorded,
        ((epoch + 3) << 32) | timeline,
        "one epoch more, on the server's own timeline"
    );
    let fence = acquire_after_quarantine(&t, &k, Duration::from_secs(5)).await;
    assert_eq!(fence, (epoch + 3) << 40);
    assert!(fence > ((epoch + 2) << 40) + 5);
    t.drop_table().await;
}

/// A token whose lease is still live after a change of timeline (its server's
/// clock ran ahead) gets a fence of the new epoch when it acquires again, not
/// its old one: every fence handed out on the new timeline is above the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_token_gets_a_fence_of_the_new_epoch() {
    let name = "the_same_token_gets_a_fence_of_the_new_epoch";
    let Some(t) = TestBackend::new(name, |b| b.failover_quarantine(false)).await else {
        return;
    };
    let k = key("kept");
    let token = Token::new();
    let long = ttl(Duration::from_secs(30));
    let old = fence_of(
        t.backend
            .try_acquire(&k, &token, long, "a", soon())
            .await
            .unwrap(),
    );
    assert!(old < 1 << 40);
    pretend_promoted(&t).await;
    let new = fence_of(
        t.backend
            .try_acquire(&k, &token, long, "a", soon())
            .await
            .unwrap(),
    );
    assert_eq!(new, 1 << 40);
    // And the retry after that is idempotent again.
    let again = fence_of(
        t.backend
            .try_acquire(&k, &token, long, "a", soon())
            .await
            .unwrap(),
    );
    assert_eq!(again, new);
    t.drop_table().await;
}

/// Raising max_ttl after a quarantine has ended does not start another one;
/// the quarantine itself lasts the longer of the table's max_ttl and the
/// client's (a raise that a failover lost still counts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_max_ttl_after_a_quarantine_starts_none_and_a_longer_client_max_ttl_counts() {
    let name = "raising_max_ttl_after_a_quarantine_starts_none_and_a_longer_client_max_ttl_counts";
    let Some(t) = TestBackend::new(name, |b| b.max_ttl(Duration::from_secs(1))).await else {
        return;
    };
    pretend_promoted(&t).await;
    acquire_after_quarantine(&t, &key("a"), Duration::from_secs(4)).await;
    let raiser = t.sibling(|b| b.max_ttl(Duration::from_secs(30))).await;
    raiser.create_table().await.unwrap();
    let (_, max_ttl_us, start_us) = marker(&t).await.unwrap();
    assert_eq!(max_ttl_us, 30_000_000);
    assert_eq!(start_us, 0, "no quarantine: back at the epoch");
    fence_of(
        raiser
            .try_acquire(
                &key("b"),
                &Token::new(),
                ttl(Duration::from_secs(20)),
                "r",
                soon(),
            )
            .await
            .unwrap(),
    );

    // Table max_ttl 1 s again, but a client that allows 4 s quarantines 4 s.
    t.admin
        .batch_execute(&format!(
            "UPDATE \"{}\" SET acquired_at = 'epoch', \
             expires_at = timestamptz 'epoch' + interval '1 second' WHERE lock_key = ''",
            t.table
        ))
        .await
        .unwrap();
    pretend_promoted(&t).await;
    let longer = t.sibling(|b| b.max_ttl(Duration::from_secs(4))).await;
    match longer
        .try_acquire(
            &key("c"),
            &Token::new(),
            ttl(Duration::from_secs(1)),
            "l",
            soon(),
        )
        .await
        .unwrap()
    {
        AcquireOutcome::Held { remaining } => {
            assert!(
                remaining.unwrap() >= Duration::from_secs(4),
                "{remaining:?}"
            )
        }
        other => panic!("granted in the quarantine: {other:?}"),
    }
    t.drop_table().await;
}

/// The first statement on a new timeline inside a caller's transaction
/// (`try_acquire_in`) records the timeline on a pooled connection of its own:
/// the record is visible to everyone before the caller commits, so the
/// marker's row lock is never held for the caller's transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_timeline_is_recorded_outside_the_callers_transaction() {
    let name = "the_timeline_is_recorded_outside_the_callers_transaction";
    let Some(t) = TestBackend::new(name, |b| b.max_ttl(Duration::from_secs(2))).await else {
        return;
    };
    let (before, _, _) = marker(&t).await.unwrap();
    pretend_promoted(&t).await;
    let mut client = common::admin().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let outcome = t
        .backend
        .try_acquire_in(
            &tx,
            &key("in-tx"),
            &Token::new(),
            ttl(Duration::from_secs(1)),
            "tx",
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome, AcquireOutcome::Held { remaining: Some(_) }),
        "{outcome:?}"
    );
    // The caller's transaction is still open, and the record is committed.
    let (recorded, _, start_us) = marker(&t).await.unwrap();
    assert_eq!(recorded & 0xffff_ffff, before & 0xffff_ffff);
    assert!(start_us > 0, "the quarantine started");
    // Another client's first statement does not wait for the caller's commit.
    let started = Instant::now();
    let other = t
        .backend
        .try_acquire(
            &key("other"),
            &Token::new(),
            ttl(Duration::from_secs(1)),
            "o",
            soon(),
        )
        .await
        .unwrap();
    assert!(
        matches!(other, AcquireOutcome::Held { remaining: Some(_) }),
        "{other:?}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    tx.rollback().await.unwrap();
    t.drop_table().await;
}

/// `synchronous_commit` as the transaction `tx` will commit with.
async fn commit_level(tx: &tokio_postgres::Transaction<'_>) -> String {
    tx.query_one("SHOW synchronous_commit", &[])
        .await
        .unwrap()
        .get(0)
}

/// The backend's own acquire statement `sql` for `token`, in a transaction
/// of ours: whether it granted, and the level its commit would use.
async fn own_acquire(
    client: &mut tokio_postgres::Client,
    sql: &str,
    k: &LockKey,
    token: Token,
) -> (bool, String) {
    let tx = client.transaction().await.unwrap();
    let bound = server_now_us(tx.client()).await + 10_000_000;
    let no_ticket: Option<i64> = None;
    let row = tx
        .query_one(
            sql,
            &[
                &k.as_str(),
                token.as_uuid(),
                &30_000_000i64,
                &"o",
                &0i64,
                &no_ticket,
                &bound,
            ],
        )
        .await
        .unwrap();
    let granted = row.get::<_, Option<i64>>("fence").is_some();
    let level = commit_level(&tx).await;
    tx.commit().await.unwrap();
    (granted, level)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_refusals_skip_the_flush_grants_releases_and_callers_transactions_do_not() {
    let name = "own_refusals_skip_the_flush_grants_releases_and_callers_transactions_do_not";
    let Some(t) = TestBackend::new(name, |b| b).await else {
        return;
    };
    let sql =
        distrlock_postgres::LockSql::for_table(&distrlock_core::TableName::new(&t.table).unwrap());
    let mut client = common::admin().await.unwrap();
    let k = key("commit-levels");
    let (mine, other) = (Token::new(), Token::new());
    // The backend's own statements, each in a transaction of ours, so that
    // the level its commit would use can be read before committing.
    let (granted, level) = own_acquire(&mut client, &sql.acquire, &k, mine).await;
    assert!(granted);
    assert_eq!(level, "on", "a grant is flushed before it is reported");
    let (granted, level) = own_acquire(&mut client, &sql.acquire, &k, other).await;
    assert!(!granted);
    assert_eq!(level, "off", "a refusal's commit is not waited for");
    let tx = client.transaction().await.unwrap();
    let bound = server_now_us(tx.client()).await + 10_000_000;
    let row = tx
        .query_one(
            &sql.release,
            &[&k.as_str(), mine.as_uuid(), &sql.channel, &bound],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<bool>>("released"), Some(true));
    // Flushed like a grant: a release a crash lost would let a static token
    // be granted the key again at the same fence.
    assert_eq!(commit_level(&tx).await, "on", "a release is flushed");
    tx.rollback().await.unwrap();

    // A caller's transaction keeps its level, raised to 'on' at least, for a
    // refusal and a release too: the caller's own writes share the commit.
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL synchronous_commit = local")
        .await
        .unwrap();
    assert!(matches!(
        t.backend
            .try_acquire_in(&tx, &k, &other, ttl(Duration::from_secs(30)), "o")
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    assert_eq!(commit_level(&tx).await, "on");
    tx.rollback().await.unwrap();
    let tx = client.transaction().await.unwrap();
    tx.batch_execute("SET LOCAL synchronous_commit = remote_apply")
        .await
        .unwrap();
    t.backend.release_in(&tx, &k, &mine).await.unwrap();
    assert_eq!(commit_level(&tx).await, "remote_apply", "never lowered");
    tx.rollback().await.unwrap();
    t.drop_table().await;
}

/// Someone runs `DEALLOCATE ALL` (or `DISCARD ALL`) on a connection of the
/// backend's pool, say through `pool()`: the statements the backend prepared
/// there are gone. Its next calls on that connection prepare them again,
/// rather than fail with "prepared statement does not exist" for as long as
/// the connection lives.
#[tokio::test]
async fn statements_deallocated_behind_the_backends_back_are_prepared_again() {
    let name = "statements_deallocated_behind_the_backends_back_are_prepared_again";
    let Some(t) = TestBackend::new(name, |b| b.pool_size(1)).await else {
        return;
    };
    let k = key("deallocated");
    let lease = ttl(Duration::from_secs(30));
    for reset in ["DEALLOCATE ALL", "DISCARD ALL"] {
        let token = Token::new();
        // Every statement is prepared on the pool's one connection.
        fence_of(
            t.backend
                .try_acquire(&k, &token, lease, "o", soon())
                .await
                .unwrap(),
        );
        t.backend.extend(&k, &token, lease, soon()).await.unwrap();
        t.backend.inspect(&k).await.unwrap();
        t.backend.release(&k, &token, soon()).await.unwrap();
        t.backend.list().await.unwrap();
        {
            let conn = t.backend.pool().get().await.unwrap();
            conn.batch_execute(reset).await.unwrap();
        }
        let token = Token::new();
        let acquired = t.backend.try_acquire(&k, &token, lease, "o", soon()).await;
        assert!(
            matches!(acquired, Ok(AcquireOutcome::Acquired { .. })),
            "after {reset}: {acquired:?}"
        );
        t.backend
            .extend(&k, &token, lease, soon())
            .await
            .unwrap_or_else(|e| panic!("extend after {reset}: {e}"));
        t.backend
            .inspect(&k)
            .await
            .unwrap_or_else(|e| panic!("inspect after {reset}: {e}"));
        t.backend
            .list()
            .await
            .unwrap_or_else(|e| panic!("list after {reset}: {e}"));
        t.backend
            .release(&k, &token, soon())
            .await
            .unwrap_or_else(|e| panic!("release after {reset}: {e}"));
    }
    t.drop_table().await;
}

/// Acquires abandoned while their statements wait in the server keep their
/// connections in the pool until the statements end: however many callers
/// give up, the backend never opens more sessions than its pool's size (and
/// its listener's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_acquires_never_open_more_sessions_than_the_pool() {
    let name = "abandoned_acquires_never_open_more_sessions_than_the_pool";
    let Some(t) = TestBackend::new(name, |b| {
        b.pool_size(2).lock_timeout(Duration::from_secs(5))
    })
    .await
    else {
        return;
    };
    let k = key("crowded");
    let lease = ttl(Duration::from_secs(30));
    // A foreign transaction holds the free row: every acquire waits in the
    // server until its caller gives up.
    let tx = RowLock::on_free_row(&t.backend, &t.table, &k).await;
    for _ in 0..6 {
        let gave_up = tokio::time::timeout(
            Duration::from_millis(150),
            t.backend
                .try_acquire(&k, &Token::new(), lease, "impatient", soon()),
        )
        .await;
        assert!(gave_up.is_err(), "the acquire should still be waiting");
    }
    let sessions: i64 = t
        .admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&t.application_name],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        sessions <= 3,
        "{sessions} sessions for a pool of 2 and a listener"
    );
    tx.rollback().await;
    t.drop_table().await;
}
