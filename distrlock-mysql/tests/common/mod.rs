//! Test harness for the MySQL/MariaDB backend: the conformance [`MySqlHarness`],
//! and helpers for the MySQL-specific tests.
//!
//! The server comes from `DISTRLOCK_TEST_MYSQL_URL` (default
//! `mysql://root@127.0.0.1:3306/test`). Without one, tests skip loudly, and fail
//! under `DISTRLOCK_REQUIRE_DB=1`.

#![allow(dead_code, unreachable_pub)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use distrlock_core::LockBackend;
use distrlock_mysql::mysql_async::prelude::Queryable;
use distrlock_mysql::mysql_async::{self, Conn, Opts, OptsBuilder, Pool};
use distrlock_mysql::{MySqlBackend, MySqlConfig, MySqlConfigBuilder};
use distrlock_testkit::{FaultProxy, Faults, Harness, Setup, Skip, Unsupported};

/// The URL of the test server.
pub fn url() -> String {
    std::env::var("DISTRLOCK_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned())
}

/// `prefix` and 16 random hex digits: a table or database name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

/// The session ids of every connection a backend's pool opened, recorded as
/// they open (the hook a test uses to `KILL` exactly this backend's sessions).
pub type SessionIds = Arc<Mutex<Vec<u32>>>;

/// Test-friendly settings: a small pool and short bounds.
pub fn config(table: &str) -> MySqlConfigBuilder {
    MySqlConfig::builder()
        .table(table)
        .pool_size(8)
        .connect_timeout(Duration::from_secs(5))
        .statement_timeout(Duration::from_secs(5))
        .lock_timeout(Duration::from_secs(1))
}

/// A backend on `config` and `opts` that opens its first connection on first
/// use (on a pool set up as the backend's own would be), so that a test can
/// build one before the server, or the proxy to it, answers.
pub fn lazy(
    config: MySqlConfigBuilder,
    opts: impl Into<Opts>,
) -> distrlock_core::Result<MySqlBackend> {
    let config = config.build()?;
    let pool = Pool::new(config.pool_opts(opts.into()));
    MySqlBackend::from_pool(pool, config)
}

/// A backend that builds its own pool from `opts` ([`MySqlBackend::from_config`]),
/// as `connect` does: it keeps connections between calls with their prepared
/// statements, which a backend on a pool of yours does not. `Skip` when the
/// server cannot be reached.
pub async fn owned(
    config: MySqlConfigBuilder,
    opts: impl Into<Opts>,
) -> Result<MySqlBackend, Skip> {
    let config = config.opts(opts).build().expect("test configs are valid");
    match MySqlBackend::from_config(config).await {
        Ok(backend) => Ok(backend),
        Err(e) if e.is_transient() => Err(unreachable(e)),
        Err(e) => panic!("connecting to a reachable server failed: {e}"),
    }
}

/// [`MySqlBackend::from_config`] with `config` and `url`.
pub async fn connect_with(
    config: MySqlConfigBuilder,
    url: &str,
) -> distrlock_core::Result<MySqlBackend> {
    MySqlBackend::from_config(config.url(url).build()?).await
}

/// Connection options for the test server, recording each new session's id.
pub fn recording_opts() -> Result<(Opts, SessionIds), Skip> {
    let opts = Opts::from_url(&url()).map_err(|e| Skip(format!("bad test URL: {e}")))?;
    let ids: SessionIds = Arc::default();
    let record = ids.clone();
    let opts = OptsBuilder::from_opts(opts).after_connect(move |conn| {
        record.lock().unwrap().push(conn.id());
        Box::pin(async { Ok(()) })
    });
    Ok((opts.into(), ids))
}

/// A backend on `config` with a pool of its own ([`owned`]) whose table
/// exists, with its session ids; `Skip` when the server cannot be reached.
pub async fn backend(config: MySqlConfigBuilder) -> Result<(MySqlBackend, SessionIds), Skip> {
    let (opts, ids) = recording_opts()?;
    let backend = owned(config, opts).await?;
    create_or_skip(&backend).await?;
    Ok((backend, ids))
}

/// Creates the backend's table. An unreachable server (a transient error) is a
/// `Skip`; any other error fails the test.
pub async fn create_or_skip(backend: &MySqlBackend) -> Result<(), Skip> {
    match backend.create_table().await {
        Ok(()) => Ok(()),
        Err(e) if e.is_transient() => Err(unreachable(e)),
        Err(e) => panic!("create_table failed on a reachable server: {e}"),
    }
}

/// The `Skip` of a test whose server could not be reached.
fn unreachable(error: impl std::fmt::Display) -> Skip {
    Skip(format!(
        "no MySQL/MariaDB server at {} ({error})",
        redacted(&url())
    ))
}

/// A plain connection of the test's own, or `Skip`.
pub async fn raw_conn() -> Result<Conn, Skip> {
    let opts = Opts::from_url(&url()).map_err(|e| Skip(format!("bad test URL: {e}")))?;
    Conn::new(opts).await.map_err(unreachable)
}

/// Kills each session in `ids` from a connection of its own. Sessions that are
/// already gone are skipped.
pub async fn kill(ids: &[u32]) {
    let mut admin = raw_conn().await.expect("admin connection for KILL");
    for id in ids {
        let _ = admin.query_drop(format!("KILL CONNECTION {id}")).await;
    }
    let _ = admin.disconnect().await;
}

/// Drops a test table or database, best effort.
pub async fn drop_table(name: &str) {
    if let Ok(mut conn) = raw_conn().await {
        let quoted = name
            .split('.')
            .map(|part| format!("`{part}`"))
            .collect::<Vec<_>>()
            .join(".");
        let _ = conn
            .query_drop(format!("DROP TABLE IF EXISTS {quoted}"))
            .await;
        let _ = conn.disconnect().await;
    }
}

fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// Runs the conformance suite on one shared table, `distrlock_conformance`; each
/// case keeps to its own key prefix. The backend reaches the server through a
/// `FaultProxy` of its own: `make_unreachable` freezes it (traffic held, and
/// delivered late by `restore`), and `kill_sessions` kills this setup's pool
/// sessions with `KILL CONNECTION`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MySqlHarness;

/// Connection options that reach the test server through a new `FaultProxy`
/// (over TCP: never the unix socket, which would go around the proxy), with
/// each new session's id recorded; and the proxy.
pub async fn proxied_opts() -> Result<(Opts, SessionIds, FaultProxy), Skip> {
    let (opts, ids) = recording_opts()?;
    let upstream = tokio::net::lookup_host((opts.ip_or_hostname().to_owned(), opts.tcp_port()))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| Skip(format!("cannot resolve {}", redacted(&url()))))?;
    let proxy = FaultProxy::start(upstream)
        .await
        .map_err(|e| Skip(format!("cannot start a fault proxy: {e}")))?;
    let opts = OptsBuilder::from_opts(opts)
        .ip_or_hostname("127.0.0.1")
        .tcp_port(proxy.port())
        // Otherwise mysql_async moves loopback connections to the server's
        // unix socket, around the proxy.
        .prefer_socket(false);
    Ok((opts.into(), ids, proxy))
}

/// A `not_after` far enough away for any single call of these tests.
pub fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(10)
}

#[async_trait::async_trait]
impl Harness for MySqlHarness {
    async fn setup(&self) -> Result<Setup, Skip> {
        let (opts, ids, proxy) = proxied_opts().await?;
        // A pool of its own, as `connect` builds: the common case.
        let backend = owned(config("distrlock_conformance"), opts).await?;
        create_or_skip(&backend).await?;
        warm_up(&backend).await;
        let backend: Arc<dyn LockBackend> = Arc::new(backend);
        Ok(
            Setup::with_faults(backend, Arc::new(MySqlFaults { ids, proxy }))
                // A real server on a shared CI machine: a correct call may take this long.
                .with_latency_budget(std::time::Duration::from_millis(1500)),
        )
    }
}

/// Reads the server's clock and prepares the lock statements on the backend's
/// idle connection, so that a call made while the proxy is frozen sends the
/// statement itself (not a first clock read or a prepare that would hold it
/// back): then a late delivery really runs it.
pub async fn warm_up(backend: &MySqlBackend) {
    let key = distrlock_core::LockKey::new(unique("warm-up")).unwrap();
    let token = distrlock_core::Token::new();
    let ttl = distrlock_core::Ttl::new(Duration::from_secs(5)).unwrap();
    backend
        .try_acquire(&key, &token, ttl, "warm-up", soon())
        .await
        .expect("warm-up acquire");
    backend
        .extend(&key, &token, ttl, soon())
        .await
        .expect("warm-up extend");
    backend
        .release(&key, &token, soon())
        .await
        .expect("warm-up release");
}

struct MySqlFaults {
    ids: SessionIds,
    proxy: FaultProxy,
}

#[async_trait::async_trait]
impl Faults for MySqlFaults {
    async fn make_unreachable(&self) -> Result<(), Unsupported> {
        self.proxy.freeze();
        Ok(())
    }

    async fn restore(&self) -> Result<(), Unsupported> {
        self.proxy.thaw();
        Ok(())
    }

    async fn kill_sessions(&self) -> Result<(), Unsupported> {
        let ids = self.ids.lock().unwrap().clone();
        kill(&ids).await;
        Ok(())
    }

    async fn missing_table(&self) -> Result<Arc<dyn LockBackend>, Unsupported> {
        // A table of its own that nobody created (the case creates it).
        let (opts, _ids) = recording_opts().expect("the test URL parsed before");
        let backend = lazy(config(&unique("dl_missing")), opts).expect("test configs are valid");
        Ok(Arc::new(backend))
    }
}

/// Reads the server's session status counters of `conn` (`SHOW SESSION STATUS`).
pub async fn session_status(conn: &mut Conn) -> std::collections::HashMap<String, u64> {
    let rows: Vec<(String, String)> = conn
        .query(
            "SHOW SESSION STATUS WHERE Variable_name IN \
             ('Questions', 'Com_stmt_execute', 'Com_stmt_prepare', 'Com_insert', 'Com_update', 'Com_select')",
        )
        .await
        .expect("SHOW SESSION STATUS");
    rows.into_iter()
        .map(|(name, value)| (name, value.parse().unwrap_or(0)))
        .collect()
}

/// A server-side instant pinned for one session, in seconds since 1970.
pub async fn server_now_secs(conn: &mut Conn) -> f64 {
    let now: Option<f64> = conn
        .query_first(
            "SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) / 1e6",
        )
        .await
        .expect("server clock");
    now.expect("a row")
}

/// Returns `Err(Skip)` as a test skip (a failure under `DISTRLOCK_REQUIRE_DB=1`).
#[macro_export]
macro_rules! require {
    ($test:expr, $result:expr) => {
        match $result {
            Ok(value) => value,
            Err(distrlock_testkit::Skip(reason)) => {
                distrlock_testkit::skip($test, &reason);
                return;
            }
        }
    };
}

/// Keeps `mysql_async` in scope for the tests' error types.
pub type MyError = mysql_async::Error;
