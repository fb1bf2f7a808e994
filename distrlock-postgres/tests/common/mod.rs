//! Shared helpers of the PostgreSQL test crates: the server URL, an admin
//! connection, unique names, the conformance harness and its fault hooks.
//!
//! Each test crate uses only part of this module.
#![allow(dead_code)]

pub(crate) mod counting_proxy;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distrlock_core::LockBackend;
use distrlock_postgres::{
    Pooler, PostgresBackend, PostgresConfig, PostgresConfigBuilder, tokio_postgres,
};
use distrlock_testkit::{
    FaultProxy, Faults, Harness, PgBouncer, PoolMode, Setup, Skip, Unsupported,
};

/// A key from a test's literal.
pub(crate) fn key(name: &str) -> distrlock_core::LockKey {
    distrlock_core::LockKey::new(name).unwrap()
}

/// A ttl from a test's literal.
pub(crate) fn ttl(d: Duration) -> distrlock_core::Ttl {
    distrlock_core::Ttl::new(d).unwrap()
}

/// The fence of a granted acquire; panics on a refusal.
pub(crate) fn fence_of(outcome: distrlock_core::AcquireOutcome) -> i64 {
    match outcome {
        distrlock_core::AcquireOutcome::Acquired { fence, .. } => fence.get(),
        other => panic!("expected Acquired, got {other:?}"),
    }
}

/// The test server, from `DISTRLOCK_TEST_POSTGRES_URL`.
pub(crate) fn url() -> String {
    std::env::var("DISTRLOCK_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The test server's driver config.
pub(crate) fn pg_config() -> tokio_postgres::Config {
    url()
        .parse()
        .expect("DISTRLOCK_TEST_POSTGRES_URL is a valid connection string")
}

/// A `not_after` for direct backend calls: well after any answer a test expects.
pub(crate) fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(30)
}

/// A name no other test (or run) uses: `prefix_<16 hex>`.
pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// A plain connection for setting up and checking behind the backend's back, or
/// why there is none.
pub(crate) async fn admin() -> Result<tokio_postgres::Client, String> {
    connect_with(pg_config()).await
}

/// A plain connection with `config`, its connection task spawned.
pub(crate) async fn connect_with(
    mut config: tokio_postgres::Config,
) -> Result<tokio_postgres::Client, String> {
    if config.get_application_name().is_none() {
        config.application_name("distrlock-test-admin");
    }
    let connect = config.connect(tokio_postgres::NoTls);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(format!(
            "cannot connect to PostgreSQL at {}: {e}",
            safe_url()
        )),
        Err(_) => Err(format!(
            "connecting to PostgreSQL at {} timed out",
            safe_url()
        )),
    }
}

/// The URL's host and port, for messages (never the password).
fn safe_url() -> String {
    let config = pg_config();
    format!("{:?}:{:?}", config.get_hosts(), config.get_ports())
}

/// The admin connection, or `None` after reporting the test as skipped (a failure
/// under `DISTRLOCK_REQUIRE_DB=1`).
pub(crate) async fn admin_or_skip(test: &str) -> Option<tokio_postgres::Client> {
    match admin().await {
        Ok(client) => Some(client),
        Err(reason) => {
            distrlock_testkit::skip(test, &reason);
            None
        }
    }
}

/// A backend on a fresh table of its own (created), with a unique
/// `application_name`, configured further by `configure`.
pub(crate) struct TestBackend {
    pub(crate) backend: PostgresBackend,
    pub(crate) admin: tokio_postgres::Client,
    pub(crate) table: String,
    pub(crate) application_name: String,
}

impl TestBackend {
    /// `None` (the test skipped) when the server cannot be reached.
    pub(crate) async fn new(
        test: &str,
        configure: impl FnOnce(PostgresConfigBuilder) -> PostgresConfigBuilder,
    ) -> Option<Self> {
        let admin = admin_or_skip(test).await?;
        let table = unique("dl_test");
        let application_name = unique("distrlock-test");
        let config = configure(
            PostgresConfig::builder()
                .url(url())
                .table(&table)
                .pool_size(4)
                .application_name(&application_name),
        )
        .build()
        .expect("test config is valid");
        let backend = PostgresBackend::from_config(config)
            .await
            .expect("the server answered the admin connection, so the backend connects");
        backend.create_table().await.expect("create_table");
        Some(Self {
            backend,
            admin,
            table,
            application_name,
        })
    }

    /// Another backend on the same table, configured by `configure`.
    pub(crate) async fn sibling(
        &self,
        configure: impl FnOnce(PostgresConfigBuilder) -> PostgresConfigBuilder,
    ) -> PostgresBackend {
        let config = configure(
            PostgresConfig::builder()
                .url(url())
                .table(self.backend.table().to_string())
                .pool_size(4)
                .application_name(unique("distrlock-test")),
        )
        .build()
        .expect("test config is valid");
        PostgresBackend::from_config(config)
            .await
            .expect("sibling backend connects")
    }

    /// Kills every session of this backend (pool and listener).
    pub(crate) async fn kill_sessions(&self) -> u64 {
        kill_sessions(&self.admin, &self.application_name).await
    }

    /// Drops the table (best effort; a failed test leaves it behind).
    pub(crate) async fn drop_table(self) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{}\"", self.table))
            .await;
    }
}

/// Terminates the sessions named `application_name`, waiting (up to 5 s each) until
/// they are gone. Returns how many were killed.
pub(crate) async fn kill_sessions(admin: &tokio_postgres::Client, application_name: &str) -> u64 {
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 5000)) \
             FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&application_name],
        )
        .await
        .expect("pg_terminate_backend");
    row.get::<_, i64>(0) as u64
}

/// The conformance harness: one shared table (`distrlock_conformance`, created
/// idempotently by every setup, which also exercises concurrent `create_table`)
/// with the setup's unique key prefix, and a unique `application_name` per setup so
/// `kill_sessions` kills exactly this backend's sessions. The backend reaches the
/// server through a `FaultProxy` of its own, which `make_unreachable` freezes
/// (traffic held, and delivered late by `restore`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PostgresHarness;

#[async_trait]
impl Harness for PostgresHarness {
    async fn setup(&self) -> Result<Setup, Skip> {
        let admin = admin().await.map_err(Skip)?;
        let application_name = unique("distrlock-conformance");
        let proxy = proxy_to_server().await?;
        let config = PostgresConfig::builder()
            .pg_config(through(&proxy))
            .table("distrlock_conformance")
            .pool_size(8)
            .application_name(&application_name)
            .build()
            .map_err(|e| Skip(format!("DISTRLOCK_TEST_POSTGRES_URL is not usable: {e}")))?;
        let backend = PostgresBackend::from_config(config)
            .await
            .map_err(|e| Skip(format!("the backend cannot connect: {e}")))?;
        backend
            .create_table()
            .await
            .expect("create_table on the conformance table");
        let backend: Arc<dyn LockBackend> = Arc::new(backend);
        Ok(Setup::with_faults(
            backend,
            Arc::new(PostgresFaults {
                admin,
                application_name,
                proxy,
            }),
        )
        // A real server on a shared CI machine: a correct call may take this long.
        .with_latency_budget(std::time::Duration::from_millis(1500)))
    }
}

/// A fault proxy in front of the test server.
pub(crate) async fn proxy_to_server() -> Result<FaultProxy, Skip> {
    let config = pg_config();
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        _ => return Err(Skip("the test server is not reached over TCP".into())),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let upstream = tokio::net::lookup_host((host, port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Skip(format!("cannot resolve {}", safe_url())))?;
    FaultProxy::start(upstream)
        .await
        .map_err(|e| Skip(format!("cannot start a fault proxy: {e}")))
}

/// A private PgBouncer in front of the test server, lending at most `pool`
/// server connections in `mode`, or why there is none (no TCP server, no
/// `pgbouncer` binary).
pub(crate) async fn bouncer(mode: PoolMode, pool: u32) -> Result<PgBouncer, String> {
    let server = pg_config();
    let Some(tokio_postgres::config::Host::Tcp(host)) = server.get_hosts().first().cloned() else {
        return Err("the test server is not reached over TCP, as PgBouncer needs".into());
    };
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let user = server.get_user().unwrap_or("postgres").to_owned();
    let password = server
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    tokio::task::spawn_blocking(move || {
        PgBouncer::builder(host, port)
            .pool_mode(mode)
            .default_pool_size(pool)
            .user(user, password.as_deref())
            .start()
            .map_err(|e| format!("cannot start a private PgBouncer: {e}"))
    })
    .await
    .expect("starting PgBouncer does not panic")
}

/// [`bouncer`], or `None` after reporting the test as skipped (a failure under
/// `DISTRLOCK_REQUIRE_DB=1`).
pub(crate) async fn bouncer_or_skip(test: &str, mode: PoolMode, pool: u32) -> Option<PgBouncer> {
    match bouncer(mode, pool).await {
        Ok(bouncer) => Some(bouncer),
        Err(reason) => {
            distrlock_testkit::skip(test, &reason);
            None
        }
    }
}

/// The test server's driver config, pointed at `proxy` instead.
pub(crate) fn through(proxy: &FaultProxy) -> tokio_postgres::Config {
    through_port(proxy.port())
}

/// The test server's driver config, pointed at a proxy on loopback's `port`.
pub(crate) fn through_port(port: u16) -> tokio_postgres::Config {
    let server = pg_config();
    let mut config = tokio_postgres::Config::new();
    config.host("127.0.0.1").port(port);
    if let Some(user) = server.get_user() {
        config.user(user);
    }
    if let Some(password) = server.get_password() {
        config.password(password);
    }
    if let Some(dbname) = server.get_dbname() {
        config.dbname(dbname);
    }
    config
}

struct PostgresFaults {
    admin: tokio_postgres::Client,
    application_name: String,
    proxy: FaultProxy,
}

#[async_trait]
impl Faults for PostgresFaults {
    async fn make_unreachable(&self) -> Result<(), Unsupported> {
        self.proxy.set_stalled(true);
        Ok(())
    }

    async fn restore(&self) -> Result<(), Unsupported> {
        self.proxy.heal();
        Ok(())
    }

    async fn kill_sessions(&self) -> Result<(), Unsupported> {
        let killed = kill_sessions(&self.admin, &self.application_name).await;
        assert!(killed > 0, "the backend had no session to kill");
        Ok(())
    }

    async fn missing_table(&self) -> Result<Arc<dyn LockBackend>, Unsupported> {
        Ok(missing_table_backend(pg_config(), &self.application_name, Pooler::Session).await)
    }
}

/// A backend on a table of its own that nobody created, for the
/// `schema_missing` cases: the case creates it, and it stays behind like the
/// other tests' tables (each has a unique name).
pub(crate) async fn missing_table_backend(
    pg: tokio_postgres::Config,
    application_name: &str,
    pooler: Pooler,
) -> Arc<dyn LockBackend> {
    let config = PostgresConfig::builder()
        .pg_config(pg)
        .table(unique("dl_missing"))
        .pool_size(2)
        .application_name(application_name)
        .pooler(pooler)
        .listen(false)
        .build()
        .expect("a valid config");
    let backend = PostgresBackend::from_config(config)
        .await
        .expect("the server accepts a second backend");
    Arc::new(backend)
}

/// A foreign session, straight on the server, holding the row lock of a free
/// key in an open transaction: the backend's statements on that key wait in
/// the server until [`commit`](Self::commit) or [`rollback`](Self::rollback)
/// (or until this is dropped, which ends the session).
pub(crate) struct RowLock(tokio_postgres::Client);

impl RowLock {
    /// Makes `key`'s row in `table` exist and free (taken and released once
    /// through `backend`), then locks it.
    pub(crate) async fn on_free_row(
        backend: &PostgresBackend,
        table: &str,
        key: &distrlock_core::LockKey,
    ) -> Self {
        let old = distrlock_core::Token::new();
        let lease = ttl(Duration::from_secs(30));
        fence_of(
            backend
                .try_acquire(key, &old, lease, "o", soon())
                .await
                .unwrap(),
        );
        backend.release(key, &old, soon()).await.unwrap();
        let foreign = admin().await.unwrap();
        foreign.batch_execute("BEGIN").await.unwrap();
        foreign
            .execute(
                &format!("SELECT 1 FROM \"{table}\" WHERE lock_key = $1 FOR UPDATE"),
                &[&key.as_str()],
            )
            .await
            .unwrap();
        Self(foreign)
    }

    /// Commits the foreign transaction: the row is free again, unchanged.
    pub(crate) async fn commit(self) {
        self.0.batch_execute("COMMIT").await.unwrap();
    }

    /// Rolls the foreign transaction back.
    pub(crate) async fn rollback(self) {
        self.0.batch_execute("ROLLBACK").await.unwrap();
    }
}
