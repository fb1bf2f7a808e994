//! PostgreSQL failover (issue 13): what a lock table must guarantee when an
//! asynchronous standby that lagged behind is promoted, and the commits it
//! never received are lost.
//!
//! Each failover test runs on a private [`PostgresPair`] (a primary and a
//! streaming standby whose replication goes through a `FaultProxy`): freeze
//! replication, take or change leases on the primary, crash the primary
//! (SIGKILL), promote the standby. The `synchronous_commit` tests use the shared
//! server (`DISTRLOCK_TEST_POSTGRES_URL`) and a private one with a synchronous
//! standby that never connects.

mod common;

use std::time::Duration;

use common::{fence_of, key, soon, ttl, unique};
use distrlock_core::{AcquireOutcome, Error, LockBackend, LockKey, LockState, Token};
use distrlock_postgres::{PostgresBackend, PostgresConfig};
use distrlock_testkit::{PostgresPair, ThrowawayServer, skip};
use tokio::time::Instant;

/// A private pair, or `None` after reporting the test as skipped (a failure
/// under `DISTRLOCK_REQUIRE_DB=1`).
fn pair_or_skip(test: &str) -> Option<PostgresPair> {
    match PostgresPair::start() {
        Ok(pair) => Some(pair),
        Err(error) => {
            skip(test, &format!("no PostgreSQL pair: {error}"));
            None
        }
    }
}

/// The max_ttl of the failover tests' tables, and so the length of their
/// quarantine after a promotion.
const MAX_TTL: Duration = Duration::from_secs(3);

/// What the quarantine adds to the table's max_ttl, at most: the clock-rate
/// allowance (0.2 %) and the backend's margin of 1 s.
const QUARANTINE_MARGIN: Duration = Duration::from_millis(1100);

/// The settings every backend of these tests uses on `table` at `url`: a table
/// of max_ttl [`MAX_TTL`] (when it creates it), short timeouts, no listener (a
/// promoted standby has no notifications to give).
fn config(url: &str, table: &str) -> distrlock_postgres::PostgresConfigBuilder {
    PostgresConfig::builder()
        .url(url)
        .table(table)
        .pool_size(2)
        .listen(false)
        .max_ttl(MAX_TTL)
        .connect_timeout(Duration::from_secs(2))
        .statement_timeout(Duration::from_secs(2))
}

async fn backend(url: &str, table: &str) -> PostgresBackend {
    PostgresBackend::from_config(config(url, table).build().unwrap())
        .await
        .expect("the backend connects")
}

/// A backend on the pair's primary, on a new table it created.
async fn primary_backend(pair: &PostgresPair) -> (PostgresBackend, String) {
    let table = unique("dl_failover");
    let backend = backend(&pair.primary_url(), &table).await;
    backend.create_table().await.expect("create_table");
    (backend, table)
}

/// Tries to acquire `k` for `token` until it is granted or `within` has
/// passed; transient errors (a server that just became primary) are tried
/// again. Returns the fence and how long it took.
async fn acquire_within(
    backend: &PostgresBackend,
    k: &LockKey,
    token: &Token,
    within: Duration,
) -> (i64, Duration) {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < within {
        match backend
            .try_acquire(k, token, ttl(MAX_TTL), "after", soon())
            .await
        {
            Ok(AcquireOutcome::Acquired { fence, .. }) => return (fence.get(), started.elapsed()),
            Ok(held) => last = Some(format!("{held:?}")),
            Err(e) if e.is_transient() => last = Some(e.to_string()),
            Err(e) => panic!("acquire after the failover failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{k} was not granted within {within:?} of the failover; last answer: {last:?}");
}

/// How long a test waits for a key after a failover: the lost leases' ttls,
/// and the quarantine.
const GRANT_WITHIN: Duration = Duration::from_secs(15);

/// The fence of the first holding on timeline 2: (2 - 1) * 2^40.
const TIMELINE_2: i64 = 1 << 40;

/// On `pair`, a failover that loses a holding: `k` is taken by "first"
/// (replicated), then, with replication frozen, released and taken by "lost"
/// with fence `lost`, ttl [`MAX_TTL`]; then the primary dies and the standby is
/// promoted. Returns the table and `(first, lost)` fences.
async fn lose_a_holding(pair: &mut PostgresPair, k: &LockKey) -> (String, i64, i64) {
    let (primary, table) = primary_backend(pair).await;
    let first = Token::new();
    let lease = ttl(Duration::from_secs(1));
    let f1 = fence_of(
        primary
            .try_acquire(k, &first, lease, "first", soon())
            .await
            .unwrap(),
    );
    pair.wait_caught_up().unwrap();
    pair.replication_proxy().freeze();
    primary.release(k, &first, soon()).await.unwrap();
    let lost = fence_of(
        primary
            .try_acquire(k, &Token::new(), ttl(MAX_TTL), "lost", soon())
            .await
            .unwrap(),
    );
    assert_eq!(lost, f1 + 1);
    pair.kill_primary();
    pair.promote().unwrap();
    (table, f1, lost)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_after_a_lossy_async_failover_is_greater_than_the_lost_one() {
    let name = "a_fence_after_a_lossy_async_failover_is_greater_than_the_lost_one";
    let Some(mut pair) = pair_or_skip(name) else {
        return;
    };
    let (primary, table) = primary_backend(&pair).await;
    let k = key("failover-fence");
    let lease = ttl(Duration::from_secs(1));
    let first = Token::new();
    let f1 = fence_of(
        primary
            .try_acquire(&k, &first, lease, "first", soon())
            .await
            .unwrap(),
    );
    pair.wait_caught_up().unwrap();

    // The standby stops hearing from the primary; the next holding is lost.
    pair.replication_proxy().freeze();
    primary.release(&k, &first, soon()).await.unwrap();
    let f2 = fence_of(
        primary
            .try_acquire(&k, &Token::new(), lease, "lost", soon())
            .await
            .unwrap(),
    );
    assert_eq!(f2, f1 + 1, "one more holder, one more fence");
    pair.kill_primary();
    pair.promote().unwrap();

    let standby = backend(&pair.standby_url(), &table).await;
    let seen = standby.inspect(&k).await.unwrap().expect("the first row");
    assert_eq!(
        (seen.fence.get(), seen.owner.as_str()),
        (f1, "first"),
        "the release and the second holding were lost with the primary"
    );
    let (f3, _) = acquire_within(&standby, &k, &Token::new(), GRANT_WITHIN).await;
    assert!(
        f3 > f2,
        "the fence after the failover ({f3}) must be greater than the one the old primary \
         handed out before it died ({f2}, its commit lost): a storage service that \
         accepted {f2} would refuse the new holder, or (equal fences) take two holders \
         for one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lease_is_granted_to_another_token_right_after_a_lossy_failover() {
    let name = "no_lease_is_granted_to_another_token_right_after_a_lossy_failover";
    let Some(mut pair) = pair_or_skip(name) else {
        return;
    };
    let (primary, table) = primary_backend(&pair).await;
    pair.wait_caught_up().unwrap();

    pair.replication_proxy().freeze();
    let k = key("failover-holder");
    let lease = MAX_TTL;
    let fence = fence_of(
        primary
            .try_acquire(&k, &Token::new(), ttl(lease), "holder", soon())
            .await
            .unwrap(),
    );
    // The holder was told it holds the key for its lease, and goes on working.
    pair.kill_primary();
    pair.promote().unwrap();

    let standby = backend(&pair.standby_url(), &table).await;
    assert!(
        standby.inspect(&k).await.unwrap().is_none(),
        "the holder's lease was lost with the primary"
    );
    let answer = standby
        .try_acquire(&k, &Token::new(), ttl(lease), "other", soon())
        .await;
    assert!(
        matches!(answer, Ok(AcquireOutcome::Held { .. })),
        "right after the failover another token must be refused while the holder's \
         lost lease (fence {fence}, {lease:?}) may still be running; got {answer:?}: two holders"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_writes_raise_synchronous_commit_in_a_caller_transaction_and_never_lower_it() {
    let name = "lock_writes_raise_synchronous_commit_in_a_caller_transaction_and_never_lower_it";
    let Some(t) = common::TestBackend::new(name, |b| b).await else {
        return;
    };
    let mut client = common::admin().await.unwrap();
    let k = key("sync-commit");
    let lease = ttl(Duration::from_secs(5));
    let mut seen = Vec::new();
    for (setting, expected) in [
        ("off", "on"),
        ("local", "on"),
        ("on", "on"),
        ("remote_write", "remote_write"),
        ("remote_apply", "remote_apply"),
    ] {
        let tx = client.transaction().await.unwrap();
        let token = Token::new();
        let set = format!("SET LOCAL synchronous_commit = {setting}");
        let show = "SHOW synchronous_commit";
        tx.batch_execute(&set).await.unwrap();
        fence_of(
            t.backend
                .try_acquire_in(&tx, &k, &token, lease, "in-tx")
                .await
                .unwrap(),
        );
        let after_acquire: String = tx.query_one(show, &[]).await.unwrap().get(0);
        tx.batch_execute(&set).await.unwrap();
        t.backend.extend_in(&tx, &k, &token, lease).await.unwrap();
        let after_extend: String = tx.query_one(show, &[]).await.unwrap().get(0);
        tx.batch_execute(&set).await.unwrap();
        t.backend.release_in(&tx, &k, &token).await.unwrap();
        let after_release: String = tx.query_one(show, &[]).await.unwrap().get(0);
        tx.rollback().await.unwrap();
        seen.push((
            setting,
            [after_acquire, after_extend, after_release],
            expected,
        ));
    }
    let wrong: Vec<_> = seen
        .iter()
        .filter(|(_, shown, expected)| shown.iter().any(|s| s != expected))
        .collect();
    assert!(
        wrong.is_empty(),
        "synchronous_commit after try_acquire_in, extend_in, release_in, as (SET LOCAL, \
         [shown after each], expected): {wrong:?}; a lock write must commit at least \
         with `on` and keep a stronger setting"
    );
    t.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_write_waits_for_the_synchronous_standby_even_when_the_database_says_local() {
    let name = "a_lock_write_waits_for_the_synchronous_standby_even_when_the_database_says_local";
    let server = match ThrowawayServer::postgres() {
        Ok(server) => server,
        Err(error) => return skip(name, &error.to_string()),
    };
    let table = unique("dl_sync");
    let setup = backend(&server.url(), &table).await;
    setup.create_table().await.unwrap();
    drop(setup);
    // A synchronous standby that never connects: a commit that waits for one
    // waits for ever. The database lowers every session to `local`, which does
    // not wait.
    server
        .sql("ALTER DATABASE test SET synchronous_commit = local")
        .unwrap();
    server
        .sql("ALTER SYSTEM SET synchronous_standby_names = 'ghost'")
        .unwrap();
    server.sql("SELECT pg_reload_conf()").unwrap();

    // New sessions, which start with `local`; the statement timeout would
    // cancel the wait (the commit then returns), so it is longer than the check.
    let backend = PostgresBackend::from_config(
        config(&server.url(), &table)
            .statement_timeout(Duration::from_secs(10))
            .application_name("distrlock-sync-check")
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let call = tokio::spawn({
        let backend = backend.clone();
        async move {
            backend
                .try_acquire(
                    &key("sync-wait"),
                    &Token::new(),
                    ttl(MAX_TTL),
                    "waits",
                    soon(),
                )
                .await
        }
    });
    let mut sync_rep = false;
    while started.elapsed() < Duration::from_secs(2) && !call.is_finished() {
        sync_rep |= server
            .sql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = 'distrlock-sync-check' AND wait_event = 'SyncRep'",
            )
            .unwrap()
            != "0";
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if call.is_finished() {
        let answer = call.await.unwrap();
        panic!(
            "the acquire committed after {:?} without waiting for the synchronous standby \
             (the session's synchronous_commit = local was kept, not raised to on): {answer:?}",
            started.elapsed()
        );
    }
    call.abort();
    assert!(
        sync_rep,
        "the acquire hung, but not in the commit's wait for the standby (no SyncRep wait)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quarantine_after_a_promotion_lasts_the_tables_max_ttl_then_grants() {
    let name = "the_quarantine_after_a_promotion_lasts_the_tables_max_ttl_then_grants";
    let Some(mut pair) = pair_or_skip(name) else {
        return;
    };
    let k = key("quarantine");
    let (table, _, lost) = lose_a_holding(&mut pair, &k).await;
    let standby = backend(&pair.standby_url(), &table).await;
    // Another key, which never had a row: the quarantine is the table's.
    let fresh = key("quarantine-fresh");
    let started = Instant::now();
    for k in [&k, &fresh] {
        match standby
            .try_acquire(k, &Token::new(), ttl(MAX_TTL), "early", soon())
            .await
            .unwrap()
        {
            AcquireOutcome::Held {
                remaining: Some(left),
            } => assert!(
                left > MAX_TTL - Duration::from_millis(500) && left <= MAX_TTL + QUARANTINE_MARGIN,
                "{k}: the quarantine has {left:?} left right after the promotion; \
                 expected the table's max_ttl {MAX_TTL:?} (+ at most {QUARANTINE_MARGIN:?})"
            ),
            other => panic!("{k}: right after the promotion: {other:?}"),
        }
    }
    let (fence, _) = acquire_within(&standby, &k, &Token::new(), GRANT_WITHIN).await;
    let waited = started.elapsed();
    assert!(
        waited >= MAX_TTL - Duration::from_millis(200)
            && waited <= MAX_TTL + QUARANTINE_MARGIN + Duration::from_secs(1),
        "granted {waited:?} after the first try; the quarantine is max_ttl {MAX_TTL:?} \
         + at most {QUARANTINE_MARGIN:?}"
    );
    assert!(
        fence >= TIMELINE_2 && fence > lost,
        "fence {fence} on timeline 2"
    );
    let (fresh_fence, _) =
        acquire_within(&standby, &fresh, &Token::new(), Duration::from_secs(1)).await;
    assert_eq!(
        fresh_fence, TIMELINE_2,
        "a new key's first fence on timeline 2"
    );
    let listed: Vec<_> = standby.list().await.unwrap();
    assert!(
        listed.iter().all(|info| !info.key.as_str().is_empty()),
        "the failover marker is not listed: {listed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_during_the_quarantine_is_a_transient_error() {
    let name = "extend_during_the_quarantine_is_a_transient_error";
    let Some(mut pair) = pair_or_skip(name) else {
        return;
    };
    let (primary, table) = primary_backend(&pair).await;
    let (k, token) = (key("extend-quarantined"), Token::new());
    fence_of(
        primary
            .try_acquire(&k, &token, ttl(MAX_TTL), "holder", soon())
            .await
            .unwrap(),
    );
    // The lease survives the failover: the standby has it.
    pair.wait_caught_up().unwrap();
    pair.kill_primary();
    pair.promote().unwrap();

    let standby = backend(&pair.standby_url(), &table).await;
    let info = standby
        .inspect(&k)
        .await
        .unwrap()
        .expect("the replicated lease");
    assert_eq!(info.state, LockState::Held);
    let quarantined = |what: &str, answer: &distrlock_core::Result<_>| match answer {
        Err(Error::Backend {
            message, transient, ..
        }) => assert!(
            *transient && message.contains("failover quarantine"),
            "{what}: a transient error that names the failover quarantine, got {message:?} \
             (transient: {transient})"
        ),
        Err(other) => panic!("{what}: expected a transient Backend error, got {other:?}"),
        Ok(_) => panic!("{what}: renewed during the failover quarantine"),
    };
    let answer = standby.extend(&k, &token, ttl(MAX_TTL), soon()).await;
    quarantined("extend", &answer);
    let many = standby
        .extend_many(&[(k.clone(), token)], ttl(MAX_TTL), soon())
        .await
        .unwrap();
    assert_eq!(many.len(), 1);
    quarantined("extend_many", &many[0]);
    let after = standby.inspect(&k).await.unwrap().unwrap();
    assert_eq!(
        after.expires_at, info.expires_at,
        "the refused extends changed nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ttl_above_the_tables_max_ttl_is_invalid() {
    let name = "a_ttl_above_the_tables_max_ttl_is_invalid";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let table = unique("dl_max_ttl");
    let short = backend(&common::url(), &table).await;
    short.create_table().await.unwrap();
    // A client whose own max_ttl is longer: the table's counts.
    let long = PostgresBackend::from_config(
        config(&common::url(), &table)
            .max_ttl(Duration::from_secs(60))
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let over = ttl(MAX_TTL + Duration::from_millis(1));
    for (who, backend) in [("creator", &short), ("other client", &long)] {
        let (k, token) = (key(&format!("max-ttl-{who}")), Token::new());
        let answer = backend.try_acquire(&k, &token, over, who, soon()).await;
        assert!(
            matches!(answer, Err(Error::InvalidTtl { .. })),
            "{who}: try_acquire with {over:?} on a table of max_ttl {MAX_TTL:?}: {answer:?}"
        );
        assert!(
            backend.inspect(&k).await.unwrap().is_none(),
            "nothing written"
        );
        fence_of(
            backend
                .try_acquire(&k, &token, ttl(MAX_TTL), who, soon())
                .await
                .unwrap(),
        );
        let answer = backend.extend(&k, &token, over, soon()).await;
        assert!(
            matches!(answer, Err(Error::InvalidTtl { .. })),
            "{who}: extend with {over:?}: {answer:?}"
        );
        backend
            .extend(&k, &token, ttl(MAX_TTL), soon())
            .await
            .unwrap();
        backend.release(&k, &token, soon()).await.unwrap();
    }
    let _ = admin
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_quarantine_a_promoted_standby_grants_at_once_with_a_greater_fence() {
    let name = "without_the_quarantine_a_promoted_standby_grants_at_once_with_a_greater_fence";
    let Some(mut pair) = pair_or_skip(name) else {
        return;
    };
    // A key with no row on the standby, and one whose lost holding it never saw.
    let k = key("no-quarantine");
    let (table, _, lost) = lose_a_holding(&mut pair, &k).await;
    let standby = PostgresBackend::from_config(
        config(&pair.standby_url(), &table)
            .failover_quarantine(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let fresh = fence_of(
        standby
            .try_acquire(
                &key("no-quarantine-fresh"),
                &Token::new(),
                ttl(MAX_TTL),
                "at-once",
                soon(),
            )
            .await
            .unwrap(),
    );
    assert_eq!(fresh, TIMELINE_2, "granted at once, on timeline 2");
    // The replicated "first" holding (1 s) must run out; nothing else waits.
    let (fence, waited) = acquire_within(&standby, &k, &Token::new(), Duration::from_secs(3)).await;
    assert!(
        fence >= TIMELINE_2 && fence > lost,
        "fence {fence} after the failover, lost {lost}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "granted only after {waited:?}: no quarantine was asked for"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synchronous_failover_loses_no_lease() {
    let name = "a_synchronous_failover_loses_no_lease";
    let Some(mut pair) = pair_or_skip(name) else {
        return;
    };
    let (primary, table) = primary_backend(&pair).await;
    pair.make_synchronous().unwrap();
    let (k, token) = (key("sync-failover"), Token::new());
    let fence = fence_of(
        primary
            .try_acquire(&k, &token, ttl(MAX_TTL), "holder", soon())
            .await
            .unwrap(),
    );
    // Nothing more reaches the standby once the acquire has returned.
    pair.replication_proxy().freeze();
    pair.kill_primary();
    pair.promote().unwrap();

    let standby = backend(&pair.standby_url(), &table).await;
    let info = standby.inspect(&k).await.unwrap();
    assert!(
        matches!(&info, Some(info) if info.fence.get() == fence
            && info.owner == "holder"
            && info.state == LockState::Held),
        "the lease granted before the crash (fence {fence}) must be on the promoted \
         synchronous standby: {info:?}"
    );
    let answer = standby
        .try_acquire(&k, &Token::new(), ttl(MAX_TTL), "other", soon())
        .await
        .unwrap();
    assert!(
        matches!(answer, AcquireOutcome::Held { remaining: Some(_) }),
        "another token is refused: {answer:?}"
    );
}
