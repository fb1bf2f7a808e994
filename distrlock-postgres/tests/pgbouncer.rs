//! The backend behind a private PgBouncer in transaction mode
//! (`distrlock_testkit::PgBouncer`, in front of `DISTRLOCK_TEST_POSTGRES_URL`),
//! with a `default_pool_size` of 2, so that clients really share its server
//! sessions: with [`Pooler::Transaction`] no call fails for a prepared statement
//! another client made or lost, no setting leaks to the pool's other clients,
//! row-lock waits stay bounded, and waiters poll.
//!
//! Without the `pgbouncer` binary (Debian's `pgbouncer` package) or the server,
//! the tests print `SKIPPED`, and fail under `DISTRLOCK_REQUIRE_DB=1`.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{bouncer_or_skip, soon, through_port, unique};
use distrlock_core::{LockBackend, LockKey, Token, Ttl};
use distrlock_postgres::{Pooler, PostgresBackend, PostgresConfig, tokio_postgres};
use distrlock_testkit::PoolMode;

fn key(name: &str) -> LockKey {
    LockKey::new(name).unwrap()
}

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).unwrap()
}

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
                (distrlock_core::Error::NotHeld { .. }, _) => "NotHeld".to_owned(),
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

    // Two plain clients, each inside a transaction at the same time: PgBouncer
    // must lend them its two server sessions, one each.
    let first = common::connect_with(through_port(bouncer.port()))
        .await
        .unwrap();
    let second = common::connect_with(through_port(bouncer.port()))
        .await
        .unwrap();
    first.batch_execute("BEGIN").await.unwrap();
    second.batch_execute("BEGIN").await.unwrap();
    let mut seen = Vec::new();
    for client in [&first, &second] {
        let mut state = session_state(client).await;
        let pid = state.pop().unwrap();
        seen.push((pid, state));
    }
    assert_ne!(seen[0].0, seen[1].0, "two server sessions");
    for (pid, state) in &seen {
        assert_eq!(
            state, &defaults,
            "server session {pid} through PgBouncer kept what the backend left (statement_timeout, \
             lock_timeout, default_transaction_isolation, idle_in_transaction_session_timeout, \
             prepared statements, channels listened on)"
        );
    }
    first.batch_execute("COMMIT").await.unwrap();
    second.batch_execute("COMMIT").await.unwrap();
    admin
        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
        .await
        .unwrap();
}
