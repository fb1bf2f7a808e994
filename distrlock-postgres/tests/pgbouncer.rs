//! The backend behind a private PgBouncer in transaction mode
//! (`distrlock_testkit::PgBouncer`, in front of `DISTRLOCK_TEST_POSTGRES_URL`),
//! with a `default_pool_size` of 2, so that clients really share its server
//! sessions: with [`Pooler::Transaction`] no call fails for a prepared statement
//! another client made or lost, no setting leaks to the pool's other clients,
//! row-lock waits stay bounded, and waiters poll. The whole conformance suite
//! runs through such a PgBouncer too (module `conformance`), each case with a
//! PgBouncer of its own.
//!
//! Without the `pgbouncer` binary (Debian's `pgbouncer` package) or the server,
//! the tests print `SKIPPED`, and fail under `DISTRLOCK_REQUIRE_DB=1`.

mod common;

// Waiters poll behind a transaction pooler (a LISTEN needs a session), so
// there are no release notifications.
distrlock_testkit::conformance_tests!(
    PgBouncerHarness,
    supports = [unreachable, kill_sessions, schema_missing, fair_order]
);

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::counting_proxy::{CountingProxy, Counts};
use common::{RowLock, bouncer_or_skip, fence_of, key, soon, through_port, ttl, unique};
use distrlock_core::{AcquireOutcome, Error, LockBackend, LockManager, RetryPolicy, Token};
use distrlock_postgres::{
    Pooler, PostgresBackend, PostgresConfig, PostgresConfigBuilder, tokio_postgres,
};
use distrlock_testkit::{
    FaultProxy, Faults, Harness, PgBouncer, PoolMode, Setup, Skip, Unsupported,
};
use tokio::time::Instant;

/// The calls one process made, and its failures by SQLSTATE (or the error's
/// first words when it has none).
#[derive(Debug, Default)]
struct Tally {
    calls: u64,
    failures: BTreeMap<String, u64>,
    first: Option<String>,
}

impl Tally {
    fn record<T>(&mut self, result: distrlock_core::Result<T>) {
        self.calls += 1;
        if let Err(error) = result {
            let text = error.to_string();
            let kind = match (&error, text.find("SQLSTATE ")) {
                (Error::NotHeld { .. }, _) => "NotHeld".to_owned(),
                (_, Some(at)) => text[at + 9..].chars().take(5).collect(),
                (_, None) => text.chars().take(40).collect(),
            };
            *self.failures.entry(kind).or_insert(0) += 1;
            self.first.get_or_insert(text);
        }
    }

    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn merge(&mut self, other: Tally) {
        self.calls += other.calls;
        for (kind, n) in other.failures {
            *self.failures.entry(kind).or_insert(0) += n;
        }
        if self.first.is_none() {
            self.first = other.first;
        }
    }

    /// One line, for the worker process to hand its tally to the test.
    fn line(&self) -> String {
        format!(
            "DISTRLOCK-TALLY calls={} failed={} kinds={:?} first={:?}",
            self.calls,
            self.failed(),
            self.failures,
            self.first
        )
    }
}

/// Four tasks, each doing `rounds` rounds of try-acquire, extend, inspect and
/// release on a key of its own: no call may fail.
async fn workload(backend: &PostgresBackend, prefix: &str, rounds: usize) -> Tally {
    let tasks: Vec<_> = (0..4)
        .map(|task| {
            let backend = backend.clone();
            let k = key(&format!("{prefix}/{task}"));
            tokio::spawn(async move {
                let mut tally = Tally::default();
                let lease = ttl(Duration::from_secs(30));
                for _ in 0..rounds {
                    let token = Token::new();
                    tally.record(backend.try_acquire(&k, &token, lease, "w", soon()).await);
                    tally.record(backend.extend(&k, &token, lease, soon()).await);
                    tally.record(backend.inspect(&k).await);
                    tally.record(backend.release(&k, &token, soon()).await);
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for task in tasks {
        tally.merge(task.await.expect("workload task"));
    }
    tally
}

/// Set by the test for the second process it starts: `PORT TABLE PREFIX`.
const WORKER_ENV: &str = "DISTRLOCK_PGBOUNCER_WORKER";
const ROUNDS: usize = 40;

/// The second process of
/// `two_processes_sharing_pgbouncer_sessions_get_no_prepared_statement_errors`:
/// the same workload through the same PgBouncer, configured by the URL
/// parameter, as a `distrlock` command would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the second process of two_processes_sharing_pgbouncer_sessions_get_no_prepared_statement_errors"]
async fn pgbouncer_worker_process() {
    let Ok(spec) = std::env::var(WORKER_ENV) else {
        eprintln!("{WORKER_ENV} is not set: nothing to do outside the two-process test");
        return;
    };
    let mut parts = spec.split(' ');
    let (port, table, prefix) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let server = common::pg_config();
    let url = format!(
        "postgres://{}@127.0.0.1:{port}/{}?distrlock_pooler=transaction",
        server.get_user().unwrap_or("postgres"),
        server.get_dbname().unwrap_or("test")
    );
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .url(url)
            .table(table)
            .pool_size(4)
            .build()
            .unwrap(),
    )
    .await
    .expect("the worker connects through pgbouncer");
    let tally = workload(&backend, prefix, ROUNDS).await;
    println!("{}", tally.line());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_sharing_pgbouncer_sessions_get_no_prepared_statement_errors() {
    let name = "two_processes_sharing_pgbouncer_sessions_get_no_prepared_statement_errors";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some(bouncer) = bouncer_or_skip(name, PoolMode::Transaction, 2).await else {
        return;
    };
    let table = unique("dl_bouncer");
    admin
        .batch_execute(&PostgresBackend::schema_sql_for(
            &distrlock_core::TableName::new(&table).unwrap(),
        ))
        .await
        .unwrap();

    // The other process: this test binary again, running only the worker.
    let mut worker = std::process::Command::new(std::env::current_exe().unwrap());
    worker
        .args([
            "pgbouncer_worker_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(WORKER_ENV, format!("{} {table} other", bouncer.port()))
        .stdin(std::process::Stdio::null());
    let worker = tokio::task::spawn_blocking(move || worker.output());

    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(through_port(bouncer.port()))
            .table(&table)
            .pool_size(4)
            .pooler(Pooler::Transaction)
            .build()
            .unwrap(),
    )
    .await
    .expect("the backend connects through pgbouncer");
    let here = workload(&backend, "this", ROUNDS).await;

    let output = worker.await.unwrap().expect("the worker process runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|line| Some(&line[line.find("DISTRLOCK-TALLY")?..]))
        .unwrap_or_else(|| {
            panic!(
                "the worker process reported no tally ({}):\n{stdout}\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            )
        })
        .to_owned();
    eprintln!("this process:  {}\nother process: {line}", here.line());
    let field = |name: &str| -> u64 {
        line.split(' ')
            .find_map(|part| part.strip_prefix(name)?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    assert_eq!(field("calls="), (4 * ROUNDS * 4) as u64, "{line}");
    assert!(
        here.failed() == 0 && field("failed=") == 0,
        "calls failed through a transaction pooler: this process {} of {} ({:?}, first: {:?}); \
         other process: {line}",
        here.failed(),
        here.calls,
        here.failures,
        here.first
    );
    drop(backend);
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

/// The settings a backend could leave behind, and the session state it must
/// not: `(statement_timeout, lock_timeout, default_transaction_isolation,
/// idle_in_transaction_session_timeout, prepared statements, channels
/// listened on)`, as one session sees them.
const SESSION_STATE: &str = "SELECT current_setting('statement_timeout'), \
    current_setting('lock_timeout'), current_setting('default_transaction_isolation'), \
    current_setting('idle_in_transaction_session_timeout'), \
    (SELECT count(*) FROM pg_prepared_statements)::text, \
    (SELECT count(*) FROM pg_listening_channels())::text, pg_backend_pid()::text";

async fn session_state(client: &tokio_postgres::Client) -> Vec<String> {
    let messages = client.simple_query(SESSION_STATE).await.unwrap();
    let row = messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
            _ => None,
        })
        .expect("one row");
    (0..row.len())
        .map(|i| row.get(i).unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_backend_leaves_no_session_state_to_the_pools_other_clients() {
    let name = "a_pooled_backend_leaves_no_session_state_to_the_pools_other_clients";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some(bouncer) = bouncer_or_skip(name, PoolMode::Transaction, 2).await else {
        return;
    };
    // What a session of the server has when nobody set anything.
    let mut defaults = session_state(&admin).await;
    defaults.pop(); // the pid

    let table = unique("dl_bouncer");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(through_port(bouncer.port()))
            .table(&table)
            .pool_size(4)
            .lock_timeout(Duration::from_millis(1234))
            .statement_timeout(Duration::from_millis(4321))
            .pooler(Pooler::Transaction)
            .build()
            .unwrap(),
    )
    .await
    .expect("the backend connects through pgbouncer");
    // Every kind of call, several at once so that both server sessions serve
    // them. Whether they succeed is another test's business.
    let _ = backend.create_table().await;
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let (k, token) = (key(&format!("leak-{i}")), Token::new());
                let lease = ttl(Duration::from_secs(30));
                let _ = backend.try_acquire(&k, &token, lease, "o", soon()).await;
                let _ = backend.extend(&k, &token, lease, soon()).await;
                let _ = backend
                    .extend_many(&[(k.clone(), token)], lease, soon())
                    .await;
                let _ = backend.inspect(&k).await;
                let _ = backend.list().await;
                let _ = backend.release(&k, &token, soon()).await;
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    drop(backend);

    // Both server sessions, as the pool's next clients get them.
    let seen = lend_both_sessions(&bouncer).await.map(|mut state| {
        let pid = state.pop().unwrap();
        (pid, state)
    });
    assert_ne!(seen[0].0, seen[1].0, "two server sessions");
    for (pid, state) in &seen {
        assert_eq!(
            state, &defaults,
            "server session {pid} through PgBouncer kept what the backend left (statement_timeout, \
             lock_timeout, default_transaction_isolation, idle_in_transaction_session_timeout, \
             prepared statements, channels listened on)"
        );
    }
    admin
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await
        .unwrap();
}

/// A backend on `table` behind `bouncer` in transaction-pooler mode, configured
/// further by `configure`.
async fn pooled(
    bouncer: &distrlock_testkit::PgBouncer,
    table: &str,
    configure: impl FnOnce(PostgresConfigBuilder) -> PostgresConfigBuilder,
) -> PostgresBackend {
    let config = configure(
        PostgresConfig::builder()
            .pg_config(through_port(bouncer.port()))
            .table(table)
            .pool_size(4)
            .pooler(Pooler::Transaction),
    )
    .build()
    .unwrap();
    PostgresBackend::from_config(config)
        .await
        .expect("the backend connects through pgbouncer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_transaction_pooler_lock_timeout_bounds_a_try_on_a_row_another_transaction_locked()
{
    let name =
        "behind_a_transaction_pooler_lock_timeout_bounds_a_try_on_a_row_another_transaction_locked";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some(bouncer) = bouncer_or_skip(name, PoolMode::Transaction, 2).await else {
        return;
    };
    let table = unique("dl_bouncer");
    let bound = Duration::from_millis(800);
    // The server's default lock_timeout and statement_timeout are 0 (none): only
    // the call's own SET LOCAL can bound its wait.
    let backend = pooled(&bouncer, &table, |b| {
        b.lock_timeout(bound)
            .statement_timeout(Duration::from_secs(4))
    })
    .await;
    backend.create_table().await.unwrap();
    let (free, held) = (key("free"), key("held"));
    let (old, holder) = (Token::new(), Token::new());
    let lease = ttl(Duration::from_secs(30));
    fence_of(
        backend
            .try_acquire(&free, &old, lease, "o", soon())
            .await
            .unwrap(),
    );
    backend.release(&free, &old, soon()).await.unwrap();
    fence_of(
        backend
            .try_acquire(&held, &holder, lease, "o", soon())
            .await
            .unwrap(),
    );

    // Someone else's open transaction, straight on the server, locks both rows.
    let mut foreign = common::admin().await.unwrap();
    let tx = foreign.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM \"{table}\" WHERE lock_key IN ($1, $2) FOR UPDATE"),
        &[&free.as_str(), &held.as_str()],
    )
    .await
    .unwrap();

    // A free row, locked: the try waits for the bound, then reports the key busy.
    for _ in 0..2 {
        let started = Instant::now();
        let outcome = backend
            .try_acquire(&free, &Token::new(), lease, "me", soon())
            .await
            .unwrap();
        let took = started.elapsed();
        assert_eq!(outcome, AcquireOutcome::Held { remaining: None });
        assert!(
            took >= bound - Duration::from_millis(100)
                && took < bound + Duration::from_millis(1500),
            "try_acquire took {took:?} with a {bound:?} row-lock bound"
        );
    }
    // A held row is refused from what the statement sees, without waiting.
    let started = Instant::now();
    assert!(matches!(
        backend
            .try_acquire(&held, &Token::new(), lease, "me", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { remaining: Some(_) }
    ));
    assert!(
        started.elapsed() < bound - Duration::from_millis(100),
        "waited for no reason"
    );
    // The holder's extend must lock the row: bounded, and a transient error.
    let started = Instant::now();
    let error = backend
        .extend(&held, &holder, lease, soon())
        .await
        .expect_err("extend cannot lock the row");
    assert!(error.is_transient(), "{error}");
    assert!(started.elapsed() < bound + Duration::from_millis(1500));

    // The refused statements' transactions were rolled back: both pooled
    // sessions are idle, so two plain clients get one each at once (a session
    // stuck in an aborted transaction would not be lent to anyone).
    let states = lend_both_sessions(&bouncer).await;
    assert_ne!(states[0].last(), states[1].last(), "two server sessions");

    tx.rollback().await.unwrap();
    fence_of(
        backend
            .try_acquire(&free, &Token::new(), lease, "me", soon())
            .await
            .unwrap(),
    );
    backend.extend(&held, &holder, lease, soon()).await.unwrap();
    drop(backend);
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

/// Two plain clients through `bouncer`, each inside a transaction at the same
/// time, so that PgBouncer must lend them its two server sessions, one each;
/// what [`SESSION_STATE`] says in each. Fails if a session is not lent within
/// 5 s (one stuck in a transaction would never be).
async fn lend_both_sessions(bouncer: &distrlock_testkit::PgBouncer) -> [Vec<String>; 2] {
    let lend = async {
        let first = common::connect_with(through_port(bouncer.port()))
            .await
            .unwrap();
        let second = common::connect_with(through_port(bouncer.port()))
            .await
            .unwrap();
        first.batch_execute("BEGIN").await.unwrap();
        second.batch_execute("BEGIN").await.unwrap();
        let states = [session_state(&first).await, session_state(&second).await];
        first.batch_execute("COMMIT").await.unwrap();
        second.batch_execute("COMMIT").await.unwrap();
        states
    };
    tokio::time::timeout(Duration::from_secs(5), lend)
        .await
        .expect("PgBouncer lends both server sessions within 5 s")
}

/// A manager on `backend` whose waiters poll every 20 to `max_poll`.
fn manager(backend: &PostgresBackend, max_poll: Duration) -> LockManager {
    LockManager::builder(Arc::new(backend.clone()))
        .ttl(Duration::from_secs(30))
        .retry_policy(
            RetryPolicy::default()
                .with_initial_delay(Duration::from_millis(20).min(max_poll))
                .with_max_delay(max_poll),
        )
        .build()
        .unwrap()
}

/// A waiter in one backend takes the lock after `holder` (another backend)
/// releases it: how long after the release.
async fn handoff(
    holder: &PostgresBackend,
    waiter: &PostgresBackend,
    max_poll: Duration,
) -> Duration {
    let k = format!("handoff-{:x}", fastrand::u64(..));
    let guard = manager(holder, max_poll)
        .lock(&k)
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let waiting = {
        let lock = manager(waiter, max_poll).lock(&k).unwrap();
        tokio::spawn(async move {
            let guard = lock.acquire_timeout(Duration::from_secs(20)).await?;
            let took = Instant::now();
            guard.release().await?;
            Ok::<_, Error>(took)
        })
    };
    // Let the waiter try and go to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    guard.release().await.unwrap();
    waiting.await.unwrap().expect("the waiter takes the lock") - released
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_transaction_pooler_waiters_poll_or_listen_on_a_direct_url() {
    let name = "behind_a_transaction_pooler_waiters_poll_or_listen_on_a_direct_url";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some(bouncer) = bouncer_or_skip(name, PoolMode::Transaction, 2).await else {
        return;
    };
    let table = unique("dl_bouncer");
    let holder = pooled(&bouncer, &table, |b| b).await;
    holder.create_table().await.unwrap();
    assert!(
        !holder.config().listens(),
        "no LISTEN through a transaction pooler"
    );

    // Without a listen URL: the waiter polls, so it takes the lock within about
    // one poll interval of the release.
    let polling = pooled(&bouncer, &table, |b| b).await;
    assert!(!polling.config().listens());
    let took = handoff(&holder, &polling, Duration::from_millis(100)).await;
    assert!(
        took < Duration::from_secs(2),
        "a polling waiter took {took:?}"
    );

    // With a direct listen URL: woken by the release's notification, long before
    // its 60 s poll.
    let listening = pooled(&bouncer, &table, |b| b.listen_url(common::url())).await;
    assert!(listening.config().listens());
    let took = handoff(&holder, &listening, Duration::from_secs(60)).await;
    assert!(
        took < Duration::from_secs(2),
        "a notified waiter took {took:?}"
    );
    drop((holder, polling, listening));
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

/// The conformance harness behind a transaction pooler: each setup starts a
/// PgBouncer of its own in transaction mode with 2 server connections, in
/// front of the test server, and a backend in [`Pooler::Transaction`] mode
/// with 8 connections to it, so its calls (and its managers' waiters and
/// heartbeats) share 2 server sessions. The backend reaches PgBouncer through
/// a `FaultProxy`, which `make_unreachable` freezes; `kill_sessions` kills the
/// server sessions PgBouncer holds for it (PgBouncer passes the client's
/// `application_name` on to them).
#[derive(Debug, Clone, Copy, Default)]
struct PgBouncerHarness;

#[async_trait]
impl Harness for PgBouncerHarness {
    async fn setup(&self) -> Result<Setup, Skip> {
        let admin = common::admin().await.map_err(Skip)?;
        let bouncer = common::bouncer(PoolMode::Transaction, 2)
            .await
            .map_err(Skip)?;
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], bouncer.port()));
        let proxy = FaultProxy::start(upstream)
            .await
            .map_err(|e| Skip(format!("cannot start a fault proxy: {e}")))?;
        let application_name = unique("distrlock-conformance-bouncer");
        let config = PostgresConfig::builder()
            .pg_config(common::through(&proxy))
            .table("distrlock_conformance")
            .pool_size(8)
            .application_name(&application_name)
            .pooler(Pooler::Transaction)
            .build()
            .map_err(|e| Skip(format!("DISTRLOCK_TEST_POSTGRES_URL is not usable: {e}")))?;
        let backend = PostgresBackend::from_config(config)
            .await
            .map_err(|e| Skip(format!("the backend cannot connect through PgBouncer: {e}")))?;
        backend
            .create_table()
            .await
            .expect("create_table on the conformance table, through PgBouncer");
        let backend: Arc<dyn LockBackend> = Arc::new(backend);
        Ok(Setup::with_faults(
            backend,
            Arc::new(BouncerFaults {
                admin,
                application_name,
                proxy,
                _bouncer: bouncer,
            }),
        )
        // A real server on a shared CI machine: a correct call may take this long.
        .with_latency_budget(std::time::Duration::from_millis(1500)))
    }
}

/// The fault hooks of [`PgBouncerHarness`]; it owns the setup's PgBouncer,
/// killed when the case drops its setup.
struct BouncerFaults {
    admin: tokio_postgres::Client,
    application_name: String,
    proxy: FaultProxy,
    _bouncer: PgBouncer,
}

#[async_trait]
impl Faults for BouncerFaults {
    async fn make_unreachable(&self) -> Result<(), Unsupported> {
        self.proxy.set_stalled(true);
        Ok(())
    }

    async fn restore(&self) -> Result<(), Unsupported> {
        self.proxy.heal();
        Ok(())
    }

    async fn kill_sessions(&self) -> Result<(), Unsupported> {
        let killed = common::kill_sessions(&self.admin, &self.application_name).await;
        assert!(
            killed > 0,
            "PgBouncer held no server session for the backend"
        );
        Ok(())
    }

    async fn missing_table(&self) -> Result<Arc<dyn LockBackend>, Unsupported> {
        // Reached through the same PgBouncer.
        Ok(common::missing_table_backend(
            common::through(&self.proxy),
            &self.application_name,
            Pooler::Transaction,
        )
        .await)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_transaction_pooler_each_call_is_one_round_trip() {
    let name = "behind_a_transaction_pooler_each_call_is_one_round_trip";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some(bouncer) = bouncer_or_skip(name, PoolMode::Transaction, 2).await else {
        return;
    };
    // The backend → counting proxy → PgBouncer → server. The proxy adds 50 ms
    // each way, as a network between the application and its pooler would: a
    // round trip is then 100 ms, far longer than the microseconds by which the
    // pipelined requests of one call may leave apart (when the connection task
    // runs on another thread between them, it writes what it has, then the
    // rest), so a call that does not wait for an answer before sending the rest
    // is counted as one round trip.
    let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], bouncer.port()));
    let proxy = CountingProxy::start_with_latency(upstream, Duration::from_millis(50))
        .await
        .unwrap();
    let table = unique("dl_bouncer_counted");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(through_port(proxy.addr.port()))
            .table(&table)
            .pool_size(1)
            .pooler(Pooler::Transaction)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    backend.create_table().await.unwrap();
    assert!(
        backend.server_clock().is_known(),
        "connecting read the server's clock through the pooler"
    );

    let mut report = Vec::new();
    // Each call: BEGIN and its SET LOCALs (one simple query), the statement
    // unnamed (Parse, Bind, Describe, Execute, Sync: parsed every time), COMMIT
    // (a simple query): three sync points, all sent before the first answer.
    let mut expect_one = |what: &str, before: &(Counts, Instant)| {
        let delta = proxy.counts().since(&before.0);
        report.push(format!(
            "{what}: {} round trip(s) in {:?}, {} sync point(s), {:?}",
            delta.round_trips(),
            before.1.elapsed(),
            delta.sync_points(),
            delta.messages
        ));
        assert_eq!(delta.round_trips(), 1, "{what}: {delta:?}");
        assert_eq!(
            (
                delta.get('Q'),
                delta.get('P'),
                delta.get('E'),
                delta.get('S')
            ),
            (2, 1, 1, 1),
            "{what}: {delta:?}"
        );
    };
    let (k, absent, a, b) = (key("counted"), key("absent"), Token::new(), Token::new());
    let lease = ttl(Duration::from_secs(30));
    // No warm-up: nothing is prepared, so the first call costs what every call does.
    let c = (proxy.counts(), Instant::now());
    fence_of(
        backend
            .try_acquire(&k, &a, lease, "o", soon())
            .await
            .unwrap(),
    );
    expect_one("acquire (row absent)", &c);
    let c = (proxy.counts(), Instant::now());
    fence_of(
        backend
            .try_acquire(&k, &a, lease, "o", soon())
            .await
            .unwrap(),
    );
    expect_one("acquire (same token)", &c);
    let c = (proxy.counts(), Instant::now());
    assert!(matches!(
        backend
            .try_acquire(&k, &b, lease, "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    expect_one("acquire (refused)", &c);
    let c = (proxy.counts(), Instant::now());
    backend.extend(&k, &a, lease, soon()).await.unwrap();
    expect_one("extend", &c);
    let c = (proxy.counts(), Instant::now());
    backend
        .extend_many(&[(k.clone(), a), (absent.clone(), b)], lease, soon())
        .await
        .unwrap();
    expect_one("extend_many", &c);
    let c = (proxy.counts(), Instant::now());
    backend.release(&k, &a, soon()).await.unwrap();
    expect_one("release", &c);
    let c = (proxy.counts(), Instant::now());
    fence_of(
        backend
            .try_acquire(&k, &b, lease, "o", soon())
            .await
            .unwrap(),
    );
    expect_one("acquire (row present, free)", &c);
    let c = (proxy.counts(), Instant::now());
    assert!(backend.release(&k, &a, soon()).await.is_err());
    expect_one("release (not held)", &c);
    let c = (proxy.counts(), Instant::now());
    backend.inspect(&k).await.unwrap();
    expect_one("inspect", &c);
    let c = (proxy.counts(), Instant::now());
    backend.list().await.unwrap();
    expect_one("list", &c);
    backend.release(&k, &b, soon()).await.unwrap();

    eprintln!(
        "measured through the counting proxy, in front of PgBouncer:\n  {}",
        report.join("\n  ")
    );
    drop(backend);
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_transaction_pooler_a_missing_table_is_schema_missing_and_the_sessions_stay_idle()
{
    let name =
        "behind_a_transaction_pooler_a_missing_table_is_schema_missing_and_the_sessions_stay_idle";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some(bouncer) = bouncer_or_skip(name, PoolMode::Transaction, 2).await else {
        return;
    };
    let table = unique("dl_bouncer_missing");
    let backend = pooled(&bouncer, &table, |b| b).await;
    let (k, token) = (key("k"), Token::new());
    let lease = ttl(Duration::from_secs(5));
    // The statement fails inside the call's transaction; COMMIT rolls it back.
    let results = [
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .map(|_| ()),
        backend.extend(&k, &token, lease, soon()).await.map(|_| ()),
        backend
            .extend_many(&[(k.clone(), token)], lease, soon())
            .await
            .map(|_| ()),
        backend.release(&k, &token, soon()).await,
        backend.inspect(&k).await.map(|_| ()),
        backend.list().await.map(|_| ()),
    ];
    for result in results {
        match result {
            Err(error @ Error::SchemaMissing { .. }) => {
                assert!(error.to_string().contains(&table), "{error}");
            }
            other => panic!("expected SchemaMissing, got {other:?}"),
        }
    }
    let states = lend_both_sessions(&bouncer).await;
    assert_ne!(states[0].last(), states[1].last(), "two server sessions");
    backend.create_table().await.unwrap();
    fence_of(
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .unwrap(),
    );
    backend.release(&k, &token, soon()).await.unwrap();
    drop(backend);
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

/// Behind a transaction pooler the acquire is BEGIN, the statement and COMMIT
/// on one session: a release of the same token, after its caller gave up on
/// the acquire, still comes after the abandoned acquire's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_transaction_pooler_a_release_waits_for_an_abandoned_acquire() {
    let name = "behind_a_transaction_pooler_a_release_waits_for_an_abandoned_acquire";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let Some(bouncer) = bouncer_or_skip(name, PoolMode::Transaction, 2).await else {
        return;
    };
    let table = unique("dl_bouncer");
    let backend = pooled(&bouncer, &table, |b| b.lock_timeout(Duration::from_secs(3))).await;
    backend.create_table().await.unwrap();
    let k = key("abandoned");
    let lease = ttl(Duration::from_secs(30));
    // A foreign transaction, straight on the server, holds the free row.
    let tx = RowLock::on_free_row(&backend, &table, &k).await;
    let token = Token::new();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        backend.try_acquire(&k, &token, lease, "abandoned", soon()),
    )
    .await;
    assert!(gave_up.is_err(), "the acquire should still be waiting");
    let release = {
        let (backend, k) = (backend.clone(), k.clone());
        tokio::spawn(async move { backend.release(&k, &token, soon()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.rollback().await;
    release
        .await
        .unwrap()
        .expect("the release ran after the abandoned acquire was granted");
    let info = backend.inspect(&k).await.unwrap().unwrap();
    assert_eq!(
        info.state,
        distrlock_core::LockState::Released,
        "the abandoned acquire kept the lock"
    );
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}
