//! The bad-input sweep: every kind of bad input, against each real backend, gets
//! its typed error, with no row changed and no held lock lost.
//!
//! Each case runs inside [`Sweep::run`], which opens the backend under test on a
//! table of its own and lets a *second* manager hold a sentinel lock in that table.
//! After the case it proves the three promises:
//!
//! - (a) the exact [`Error`] variant: each case asserts it where the error arises;
//! - (b) no row changed: the sentinel's row (fence, owner, state, acquired and
//!   expiry instants) is as before, and the table has exactly the rows it had plus
//!   those the case added on purpose;
//! - (c) no held lock lost: the sentinel's guard is not lost, the backend refuses
//!   another token on its key, and the guard's release succeeds (which it does only
//!   if the lease was still its own).
//!
//! The shared servers come from `DISTRLOCK_TEST_POSTGRES_URL` and
//! `DISTRLOCK_TEST_MYSQL_URL`; a case that needs a password or restarts a server
//! runs on a [`ThrowawayServer`]. Unreachable servers skip loudly (a failure under
//! `DISTRLOCK_REQUIRE_DB=1`).

use std::collections::BTreeSet;
use std::future::Future;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockGuard, LockInfo, LockKey, LockManager,
    LockState, Result, Token, Ttl,
};
use distrlock_mysql::mysql_async::prelude::Queryable;
use distrlock_mysql::{MySqlBackend, MySqlConfig, mysql_async};
use distrlock_postgres::{PostgresBackend, PostgresConfig, tokio_postgres};
use distrlock_testkit::{FaultProxy, ServerError, ThrowawayServer, skip};

/// Each case's own deadline, so a hang fails the test instead of stalling CI.
const CASE_DEADLINE: Duration = Duration::from_secs(120);
/// Slack allowed on top of a configured bound (scheduling on a busy machine).
const SLACK: Duration = Duration::from_secs(1);
/// The sentinel's lease: far longer than any case, and never extended.
const SENTINEL_TTL: Duration = Duration::from_secs(300);

// ---------------------------------------------------------------------------
// The backends
// ---------------------------------------------------------------------------

/// Which real backend a case runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Db {
    Postgres,
    MariaDb,
}

/// The timeouts a backend is opened with.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    connect: Duration,
    statement: Duration,
    row_lock: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(2),
            statement: Duration::from_secs(5),
            row_lock: Duration::from_secs(1),
        }
    }
}

impl Db {
    /// The shared server's URL.
    fn shared_url(self) -> String {
        let (var, default) = match self {
            Db::Postgres => (
                "DISTRLOCK_TEST_POSTGRES_URL",
                "postgres://postgres@127.0.0.1:5432/test",
            ),
            Db::MariaDb => (
                "DISTRLOCK_TEST_MYSQL_URL",
                "mysql://root@127.0.0.1:3306/test",
            ),
        };
        std::env::var(var).unwrap_or_else(|_| default.to_owned())
    }

    /// The port a URL of this backend names when it names none.
    fn default_port(self) -> u16 {
        match self {
            Db::Postgres => 5432,
            Db::MariaDb => 3306,
        }
    }

    /// `url`, reaching the server through `127.0.0.1:port` instead.
    fn via_port(self, url: &str, port: u16) -> String {
        let url = rewrite_url(url, Some(&format!("127.0.0.1:{port}")), None);
        match self {
            Db::Postgres => url,
            // mysql_async would otherwise ask the server for its Unix socket and
            // switch to it, around whatever sits on `port`.
            Db::MariaDb => with_option(&url, "prefer_socket=false"),
        }
    }

    /// Opens the backend on `url` with the lock table `table`. Connects at once,
    /// so a wrong address or password fails here.
    async fn open(self, url: &str, table: &str, bounds: Bounds) -> Result<Arc<dyn LockBackend>> {
        match self {
            Db::Postgres => {
                let config = self.postgres_config(url, table, bounds)?;
                Ok(Arc::new(PostgresBackend::from_config(config).await?))
            }
            Db::MariaDb => {
                let config = MySqlConfig::builder()
                    .url(url)
                    .table(table)
                    .pool_size(4)
                    // Keep them, as the PostgreSQL pool does, so that calls
                    // stalled in the network stall on established sessions.
                    .min_pool_size(4)
                    .connect_timeout(bounds.connect)
                    .statement_timeout(bounds.statement)
                    .lock_timeout(bounds.row_lock)
                    .build()?;
                Ok(Arc::new(MySqlBackend::from_config(config).await?))
            }
        }
    }

    fn postgres_config(self, url: &str, table: &str, bounds: Bounds) -> Result<PostgresConfig> {
        PostgresConfig::builder()
            .url(url)
            .table(table)
            .pool_size(4)
            .application_name("distrlock-bad-input")
            .connect_timeout(bounds.connect)
            .statement_timeout(bounds.statement)
            .lock_timeout(bounds.row_lock)
            // The sweep takes leases of up to Ttl::MAX, so its tables allow them.
            .max_ttl(Ttl::MAX)
            .build()
    }

    /// The longest one call may take with `bounds`, by the backend's own reckoning.
    fn call_timeout(self, bounds: Bounds) -> Duration {
        match self {
            Db::Postgres => self
                .postgres_config("postgres://x@127.0.0.1/x", "t", bounds)
                .expect("valid bounds")
                .call_timeout(),
            // Waiting for a connection, then the statement and the client's
            // margin over the server's own statement timeout.
            Db::MariaDb => bounds.connect + bounds.statement + MySqlConfig::CLIENT_TIMEOUT_MARGIN,
        }
    }

    /// A private server of this kind.
    fn start_private(
        self,
        password: Option<&str>,
    ) -> std::result::Result<ThrowawayServer, ServerError> {
        match (self, password) {
            (Db::Postgres, None) => ThrowawayServer::postgres(),
            (Db::Postgres, Some(password)) => ThrowawayServer::postgres_with_password(password),
            (Db::MariaDb, None) => ThrowawayServer::mariadb(),
            (Db::MariaDb, Some(_)) => {
                unreachable!("no case needs a private MariaDB with a password")
            }
        }
    }
}

/// Starts a private server off the async threads, or reports the test skipped.
async fn throwaway(
    db: Db,
    test: &str,
    password: Option<&str>,
) -> Option<Arc<Mutex<ThrowawayServer>>> {
    let password = password.map(str::to_owned);
    let started = tokio::task::spawn_blocking(move || db.start_private(password.as_deref()))
        .await
        .expect("starting the server does not panic");
    match started {
        Ok(server) => Some(Arc::new(Mutex::new(server))),
        Err(error) => {
            skip(test, &error.to_string());
            None
        }
    }
}

/// `url` with its `host:port` and its password replaced by those given.
fn rewrite_url(url: &str, host_port: Option<&str>, password: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL has a scheme");
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((userinfo, hostport)) => (Some(userinfo), hostport),
        None => (None, authority),
    };
    let user = userinfo.map(|u| u.split_once(':').map_or(u, |(user, _)| user));
    let userinfo = match (user, password, userinfo) {
        (Some(user), Some(password), _) => format!("{user}:{password}@"),
        (None, Some(password), _) => format!("root:{password}@"),
        (_, None, Some(userinfo)) => format!("{userinfo}@"),
        (_, None, None) => String::new(),
    };
    let hostport = host_port.unwrap_or(hostport);
    format!("{scheme}://{userinfo}{hostport}{tail}")
}

/// `url` with `option` (`name=value`) added to its query.
fn with_option(url: &str, option: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{option}")
}

/// The server address `url` names.
fn server_addr(db: Db, url: &str) -> SocketAddr {
    let rest = url.split_once("://").expect("a URL has a scheme").1;
    let authority = &rest[..rest.find(['/', '?']).unwrap_or(rest.len())];
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match hostport.rsplit_once(':') {
        Some((host, port)) => (host, port.parse().expect("a numeric port")),
        None => (hostport, db.default_port()),
    };
    (host, port)
        .to_socket_addrs()
        .expect("the server's host resolves")
        .next()
        .expect("the server's host has an address")
}

/// A loopback port nothing listens on.
fn refused_port() -> u16 {
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind a free port");
    listener.local_addr().expect("its address").port()
}

/// A name no other test or run uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", fastrand::u64(..))
}

// ---------------------------------------------------------------------------
// Looking behind the backend's back
// ---------------------------------------------------------------------------

/// Plain SQL on the server, outside the backend: one connection per call, so it
/// survives a server restart.
#[derive(Debug, Clone)]
struct Admin {
    db: Db,
    url: String,
}

/// A connection whose open transaction holds row locks until it is dropped.
enum RowLockHolder {
    Postgres(#[allow(dead_code)] tokio_postgres::Client),
    MariaDb(#[allow(dead_code)] mysql_async::Conn),
}

impl Admin {
    async fn postgres(&self) -> std::result::Result<tokio_postgres::Client, String> {
        let connect = tokio_postgres::connect(&self.url, tokio_postgres::NoTls);
        match tokio::time::timeout(Duration::from_secs(5), connect).await {
            Ok(Ok((client, connection))) => {
                tokio::spawn(connection);
                Ok(client)
            }
            Ok(Err(e)) => Err(format!("cannot connect to PostgreSQL: {e}")),
            Err(_) => Err("connecting to PostgreSQL timed out".to_owned()),
        }
    }

    async fn mariadb(&self) -> std::result::Result<mysql_async::Conn, String> {
        let opts = mysql_async::Opts::from_url(&self.url).map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(5), mysql_async::Conn::new(opts)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(format!("cannot connect to MariaDB: {e}")),
            Err(_) => Err("connecting to MariaDB timed out".to_owned()),
        }
    }

    /// Whether the server answers.
    async fn reachable(&self) -> std::result::Result<(), String> {
        match self.db {
            Db::Postgres => self.postgres().await.map(drop),
            Db::MariaDb => {
                let conn = self.mariadb().await?;
                conn.disconnect().await.map_err(|e| e.to_string())
            }
        }
    }

    /// One number from `sql` (PostgreSQL text, MariaDB text) with `params`.
    async fn number(&self, postgres: &str, mariadb: &str, params: &[Option<&str>]) -> i64 {
        match self.db {
            Db::Postgres => {
                let client = self.postgres().await.expect("admin connection");
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                    .iter()
                    .map(|p| p as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let row = client.query_one(postgres, &params).await.expect(postgres);
                row.get(0)
            }
            Db::MariaDb => {
                let mut conn = self.mariadb().await.expect("admin connection");
                let params: Vec<mysql_async::Value> = params.iter().map(|p| (*p).into()).collect();
                let n: Option<i64> = conn.exec_first(mariadb, params).await.expect(mariadb);
                conn.disconnect().await.expect("disconnect");
                n.expect("one row")
            }
        }
    }

    /// The lock rows of `table`: PostgreSQL's failover marker (the row of the
    /// empty key) is no lock.
    async fn row_count(&self, table: &str) -> i64 {
        self.number(
            &format!("SELECT count(*) FROM \"{table}\" WHERE lock_key <> ''"),
            &format!("SELECT count(*) FROM `{table}`"),
            &[],
        )
        .await
    }

    /// Whether `table` (or `schema.table`) exists.
    async fn table_exists(&self, table: &str) -> bool {
        let (schema, name) = match table.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, table),
        };
        let found = self
            .number(
                "SELECT count(*) FROM information_schema.tables \
                 WHERE table_schema = coalesce($1, current_schema()) AND table_name = $2",
                "SELECT count(*) FROM information_schema.tables \
                 WHERE table_schema = coalesce(?, database()) AND table_name = ?",
                &[schema, Some(name)],
            )
            .await;
        found > 0
    }

    /// How many statements on `table` wait for a row lock now.
    async fn lock_waiters(&self, table: &str) -> i64 {
        self.number(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND strpos(query, $1) > 0",
            "SELECT count(*) FROM information_schema.innodb_trx \
             WHERE trx_state = 'LOCK WAIT' AND locate(?, trx_query) > 0",
            &[Some(table)],
        )
        .await
    }

    /// Every key in the table, as the server stores it.
    async fn stored_keys(&self, table: &str) -> BTreeSet<String> {
        match self.db {
            Db::Postgres => {
                let client = self.postgres().await.expect("admin connection");
                let rows = client
                    // The failover marker (the empty key) is no lock.
                    .query(
                        &format!("SELECT lock_key FROM \"{table}\" WHERE lock_key <> ''"),
                        &[],
                    )
                    .await
                    .expect("read the stored keys");
                rows.iter().map(|row| row.get(0)).collect()
            }
            Db::MariaDb => {
                let mut conn = self.mariadb().await.expect("admin connection");
                let keys: Vec<Vec<u8>> = conn
                    .query(format!("SELECT lock_key FROM `{table}`"))
                    .await
                    .expect("read the stored keys");
                conn.disconnect().await.expect("disconnect");
                keys.into_iter()
                    .map(|k| String::from_utf8(k).expect("stored keys are UTF-8"))
                    .collect()
            }
        }
    }

    async fn drop_table(&self, table: &str) {
        match self.db {
            Db::Postgres => {
                if let Ok(client) = self.postgres().await {
                    let _ = client
                        .batch_execute(&format!("DROP TABLE IF EXISTS \"{table}\""))
                        .await;
                }
            }
            Db::MariaDb => {
                if let Ok(mut conn) = self.mariadb().await {
                    let _ = conn
                        .query_drop(format!("DROP TABLE IF EXISTS `{table}`"))
                        .await;
                    let _ = conn.disconnect().await;
                }
            }
        }
    }

    /// Opens a transaction that locks the rows of `keys`, as a foreign writer
    /// would.
    async fn hold_row_locks(&self, table: &str, keys: &[&LockKey]) -> RowLockHolder {
        match self.db {
            Db::Postgres => {
                let client = self.postgres().await.expect("admin connection");
                client.batch_execute("BEGIN").await.expect("BEGIN");
                for key in keys {
                    let locked = client
                        .execute(
                            &format!("SELECT 1 FROM \"{table}\" WHERE lock_key = $1 FOR UPDATE"),
                            &[&key.as_str()],
                        )
                        .await
                        .expect("lock the row");
                    assert_eq!(locked, 1, "the row of {key:?} exists");
                }
                RowLockHolder::Postgres(client)
            }
            Db::MariaDb => {
                let mut conn = self.mariadb().await.expect("admin connection");
                conn.query_drop("BEGIN").await.expect("BEGIN");
                for key in keys {
                    let locked: Vec<i64> = conn
                        .exec(
                            format!("SELECT 1 FROM `{table}` WHERE lock_key = ? FOR UPDATE"),
                            (key.as_str(),),
                        )
                        .await
                        .expect("lock the row");
                    assert_eq!(locked.len(), 1, "the row of {key:?} exists");
                }
                RowLockHolder::MariaDb(conn)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The sweep: setup, sentinel, and the three promises
// ---------------------------------------------------------------------------

/// Rows a case added to the table on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct NewRows(i64);

/// One case's world: the backend under test on a fresh table, with a sentinel
/// lock held by another manager in the same table.
struct Sweep {
    db: Db,
    url: String,
    table: String,
    bounds: Bounds,
    /// The backend under test.
    backend: Arc<dyn LockBackend>,
    admin: Admin,
    sentinel: LockGuard,
    /// The sentinel's row when the case began.
    sentinel_row: LockInfo,
    rows_before: i64,
}

impl Sweep {
    /// A sweep on the shared server; `None` (reported as skipped) when it cannot be
    /// reached.
    async fn shared(db: Db, test: &str) -> Option<Self> {
        Self::open(db, test, &db.shared_url(), Bounds::default()).await
    }

    /// A sweep on the server at `url`, with `bounds`.
    async fn open(db: Db, test: &str, url: &str, bounds: Bounds) -> Option<Self> {
        let admin = Admin {
            db,
            url: url.to_owned(),
        };
        if let Err(reason) = admin.reachable().await {
            skip(test, &reason);
            return None;
        }
        let table = unique("dl_sweep");
        let backend = db
            .open(url, &table, bounds)
            .await
            .expect("the server answers, so the backend connects");
        backend.create_table().await.expect("create_table");
        // The sentinel's holder is another backend instance and another manager,
        // as another process would be.
        let holder = db
            .open(url, &table, bounds)
            .await
            .expect("the sentinel's backend connects");
        let manager = LockManager::builder(holder)
            .ttl(SENTINEL_TTL)
            .auto_extend(false)
            .owner("bad-input-sentinel")
            .build()
            .expect("sentinel manager");
        let sentinel = manager
            .lock("sentinel")
            .expect("valid key")
            .try_acquire()
            .await
            .expect("the sentinel is free in a fresh table");
        let sentinel_row = backend
            .inspect(sentinel.key())
            .await
            .expect("inspect the sentinel")
            .expect("the sentinel has a row");
        assert_eq!(sentinel_row.state, LockState::Held);
        assert_eq!(sentinel_row.fence, sentinel.fence());
        let rows_before = admin.row_count(&table).await;
        assert_eq!(rows_before, 1);
        Some(Self {
            db,
            url: url.to_owned(),
            table,
            bounds,
            backend,
            admin,
            sentinel,
            sentinel_row,
            rows_before,
        })
    }

    /// Runs `case`, then proves that no row changed but the rows it reports, and
    /// that the sentinel is still held; releases the sentinel and drops the table.
    async fn run(self, case: impl AsyncFnOnce(&Sweep) -> NewRows) {
        let sweep = async {
            let NewRows(added) = case(&self).await;
            self.check_promises(added).await;
            self.finish().await;
        };
        tokio::time::timeout(CASE_DEADLINE, sweep)
            .await
            .expect("the case finished within its deadline");
    }

    async fn check_promises(&self, added: i64) {
        let key = self.sentinel.key();
        let row = self
            .backend
            .inspect(key)
            .await
            .expect("inspect the sentinel after the case")
            .expect("the sentinel's row is still there");
        assert_eq!(
            unchanging(&row),
            unchanging(&self.sentinel_row),
            "(b) the sentinel's row changed"
        );
        assert_eq!(
            self.admin.row_count(&self.table).await,
            self.rows_before + added,
            "(b) the table has rows it should not have, or lost some"
        );
        assert!(!self.sentinel.is_lost(), "(c) the sentinel's guard is lost");
        let intruder = self
            .backend
            .try_acquire(
                key,
                &Token::new(),
                ttl(Duration::from_secs(5)),
                "intruder",
                soon(),
            )
            .await
            .expect("try the sentinel with another token");
        assert!(
            matches!(intruder, AcquireOutcome::Held { remaining: Some(_) }),
            "(c) another token got the sentinel: {intruder:?}"
        );
    }

    async fn finish(self) {
        self.sentinel
            .release()
            .await
            .expect("(c) the sentinel's lease was still its own");
        self.admin.drop_table(&self.table).await;
    }

    /// Another backend on the server under test, with the lock table `table`.
    async fn open_backend(&self, table: &str, bounds: Bounds) -> Result<Arc<dyn LockBackend>> {
        self.db.open(&self.url, table, bounds).await
    }

    /// A manager on the backend under test.
    fn manager(&self) -> LockManager {
        LockManager::builder(self.backend.clone())
            .ttl(Duration::from_secs(30))
            .owner("bad-input")
            .build()
            .expect("valid manager")
    }
}

/// A row without its remaining lease, which changes as time passes.
fn unchanging(info: &LockInfo) -> LockInfo {
    LockInfo {
        remaining: None,
        ..info.clone()
    }
}

/// Runs `case` on the shared server of `db`.
async fn on_shared(db: Db, test: &str, case: impl AsyncFnOnce(&Sweep) -> NewRows) {
    if let Some(sweep) = Sweep::shared(db, test).await {
        sweep.run(case).await;
    }
}

/// A `not_after` for direct backend calls: later than any answer a case expects.
fn soon() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(30)
}

fn key(text: &str) -> LockKey {
    LockKey::new(text).expect("a valid key")
}

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).expect("a valid ttl")
}

fn fence(outcome: AcquireOutcome) -> Fence {
    match outcome {
        AcquireOutcome::Acquired { fence, .. } => fence,
        held => panic!("expected to acquire, got {held:?}"),
    }
}

/// Runs `call`, returning its output and how long it took.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let started = Instant::now();
    let output = call.await;
    (output, started.elapsed())
}

// ---------------------------------------------------------------------------
// Shared checks
// ---------------------------------------------------------------------------

/// `text` is refused with `InvalidKey` by every way in, before anything is sent.
async fn assert_invalid_key(manager: &LockManager, text: &str) {
    let shown: String = format!("{text:?}").chars().take(60).collect();
    assert!(
        matches!(LockKey::new(text), Err(Error::InvalidKey { .. })),
        "LockKey::new({shown})"
    );
    assert!(
        matches!(text.parse::<LockKey>(), Err(Error::InvalidKey { .. })),
        "parse({shown})"
    );
    assert!(
        matches!(
            LockKey::try_from(text.to_owned()),
            Err(Error::InvalidKey { .. })
        ),
        "try_from({shown})"
    );
    assert!(
        matches!(manager.lock(text), Err(Error::InvalidKey { .. })),
        "manager.lock({shown})"
    );
    let ran = AtomicBool::new(false);
    let result = manager
        .do_exclusively(text, |_| async { ran.store(true, Ordering::SeqCst) })
        .await;
    assert!(
        matches!(
            result,
            Err(distrlock_core::ExclusiveError::Lock(
                Error::InvalidKey { .. }
            ))
        ),
        "do_exclusively({shown}): {result:?}"
    );
    assert!(!ran.load(Ordering::SeqCst), "work ran under an invalid key");
}

/// Holds every key in `texts` at once, each with its own token, and proves each
/// round-trips exactly: inspect and list give the very text back, the server
/// stores it byte for byte, no two keys collide, and another token is refused on
/// each. Releases them all; returns the rows added.
async fn assert_round_trip(s: &Sweep, texts: &[String]) -> NewRows {
    let mut held = Vec::new();
    for text in texts {
        let k = key(text);
        let token = Token::new();
        let outcome = s
            .backend
            .try_acquire(
                &k,
                &token,
                ttl(Duration::from_secs(60)),
                "round-trip",
                soon(),
            )
            .await
            .unwrap_or_else(|e| panic!("acquire {text:?}: {e}"));
        assert_eq!(
            fence(outcome),
            Fence::new(1),
            "{text:?} is a new key, not another key's row"
        );
        held.push((k, token));
    }
    for (k, _) in &held {
        let info = s.backend.inspect(k).await.expect("inspect").expect("a row");
        assert_eq!(info.key.as_str(), k.as_str(), "inspect gives the key back");
        assert_eq!(info.state, LockState::Held);
        assert_eq!(info.owner, "round-trip");
        let other = s
            .backend
            .try_acquire(
                k,
                &Token::new(),
                ttl(Duration::from_secs(60)),
                "other",
                soon(),
            )
            .await
            .expect("try with another token");
        assert!(
            matches!(other, AcquireOutcome::Held { .. }),
            "{k:?}: another token got it"
        );
    }
    let expected: BTreeSet<String> = texts
        .iter()
        .cloned()
        .chain([s.sentinel.key().to_string()])
        .collect();
    let listed: Vec<String> = s
        .backend
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|info| info.key.into_string())
        .collect();
    assert!(
        listed.windows(2).all(|w| w[0] < w[1]),
        "list is ordered byte for byte without duplicates: {listed:?}"
    );
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        expected,
        "list gives exactly the keys back"
    );
    assert_eq!(
        s.admin.stored_keys(&s.table).await,
        expected,
        "the server stores exactly the keys"
    );
    for (k, token) in &held {
        s.backend
            .release(k, token, soon())
            .await
            .unwrap_or_else(|e| panic!("release {k:?}: {e}"));
        let info = s.backend.inspect(k).await.expect("inspect").expect("a row");
        assert_eq!(info.state, LockState::Released, "{k:?}");
    }
    NewRows(i64::try_from(texts.len()).expect("few keys"))
}

/// `error`'s Display, Debug and source chain never show `secret`.
fn assert_hides(error: &Error, secret: &str) {
    let mut shown = format!("{error}\n{error:?}\n{error:#?}");
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        shown.push_str(&format!("\n{cause}\n{cause:?}"));
        source = cause.source();
    }
    assert!(
        !shown.contains(secret),
        "the error shows the password: {shown}"
    );
}

// ---------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------

async fn empty_key_is_invalid_key(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        assert_invalid_key(&s.manager(), "").await;
        // Only emptiness is refused: the shortest keys, blank ones included, work.
        assert_round_trip(s, &[" ".into(), "a".into(), "\t".into()]).await
    })
    .await;
}

async fn oversized_key_is_invalid_key(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let manager = s.manager();
        // 256 bytes, in one-, two-, three- and four-byte characters.
        for text in [
            "k".repeat(256),
            "é".repeat(128),
            format!("a{}", "€".repeat(85)),
            "😀".repeat(64),
            "k".repeat(100_000),
        ] {
            assert!(text.len() > LockKey::MAX_LEN);
            assert_invalid_key(&manager, &text).await;
        }
        // 255 bytes is the limit, whatever the characters: each is a key.
        let longest = [
            "k".repeat(255),
            "€".repeat(85),
            format!("{}abc", "😀".repeat(63)),
            format!("{}{}", "é".repeat(127), "x"),
        ];
        assert!(longest.iter().all(|t| t.len() == LockKey::MAX_LEN));
        assert_round_trip(s, &longest).await
    })
    .await;
}

async fn nul_in_key_is_invalid_key(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let manager = s.manager();
        for text in [
            "\0".to_owned(),
            "\0lead".to_owned(),
            "trail\0".to_owned(),
            "mid\0dle".to_owned(),
            format!("{}\0", "k".repeat(254)),
        ] {
            assert_invalid_key(&manager, &text).await;
        }
        // Its look-alikes and the other control characters are ordinary keys.
        let neighbours = ["\\0", "%00", "\\u0000", "\u{1}", "\u{7f}", "a\u{1}b"];
        assert_round_trip(s, &neighbours.map(String::from)).await
    })
    .await;
}

async fn escape_text_keys_round_trip_exactly(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        // Invalid UTF-8 cannot become a key at all: it is not a `str`.
        assert!(String::from_utf8(vec![0xff, 0xfe]).is_err());
        let manager = s.manager();
        // What invalid UTF-8 turns into when escaped or decoded lossily is text,
        // and a key only within the usual limits.
        assert_invalid_key(&manager, "\\xff\\xfe\0").await;
        assert_invalid_key(&manager, &String::from_utf8_lossy(&[0xff; 86])).await;
        let keys = [
            "\\xff\\xfe".to_owned(),
            "\\xFF\\xFE".to_owned(),
            "\\\\xff".to_owned(),
            "\u{FFFD}".to_owned(),
            String::from_utf8_lossy(&[0xff, 0xfe, b'k']).into_owned(),
            "%FF%FE".to_owned(),
            "&#xFFFE;".to_owned(),
            "\u{FEFF}bom".to_owned(),
            // Composed and decomposed é: different bytes, different locks.
            "caf\u{e9}".to_owned(),
            "cafe\u{301}".to_owned(),
            // Case and trailing blanks matter too.
            "Key".to_owned(),
            "key".to_owned(),
            "key ".to_owned(),
        ];
        assert_round_trip(s, &keys).await
    })
    .await;
}

async fn sql_in_keys_is_harmless(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let t = &s.table;
        let keys = [
            format!("'; DROP TABLE \"{t}\"; --"),
            format!("'); DELETE FROM {t}; --"),
            format!("`; DROP TABLE `{t}`; --"),
            "\" OR 1=1 --".to_owned(),
            "' OR '1'='1".to_owned(),
            "'".to_owned(),
            "''".to_owned(),
            "\\".to_owned(),
            "\\\\".to_owned(),
            "\\'".to_owned(),
            "\\'; SELECT 1; --".to_owned(),
            "$1".to_owned(),
            "?".to_owned(),
            ":key".to_owned(),
            "/* comment */".to_owned(),
            "--".to_owned(),
            "%".to_owned(),
            "_".to_owned(),
            "a%".to_owned(),
            "a_".to_owned(),
            "ab".to_owned(),
            "%%".to_owned(),
            "sentinel%".to_owned(),
            "sentinel_".to_owned(),
            "sentine_".to_owned(),
            "*".to_owned(),
        ];
        let added = assert_round_trip(s, &keys).await;
        assert!(s.admin.table_exists(t).await, "the table is still there");
        added
    })
    .await;
}

async fn sql_in_table_names_is_refused_before_connecting(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let proxy = FaultProxy::start(server_addr(db, &s.url))
            .await
            .expect("start a proxy");
        let through_proxy = db.via_port(&s.url, proxy.port());
        let t = &s.table;
        let names = [
            format!("{t}; DROP TABLE {t}"),
            format!("{t}\"; DROP TABLE \"{t}\"; --"),
            format!("{t}`; DROP TABLE `{t}`; --"),
            format!("{t}' OR '1'='1"),
            format!("\"{t}\""),
            format!("`{t}`"),
            format!("[{t}]"),
            format!("{t} "),
            format!("{t}--"),
            format!("{t}/**/"),
            format!("{t}\0"),
            format!("{t}\n"),
            format!("public.{t}.x"),
            format!("public..{t}"),
            format!(".{t}"),
            "".to_owned(),
            " ".to_owned(),
            "1table".to_owned(),
            "t-1".to_owned(),
            "tä".to_owned(),
            "t".repeat(64),
        ];
        for name in &names {
            let opened = db.open(&through_proxy, name, s.bounds).await;
            assert!(
                matches!(opened, Err(Error::InvalidTableName { .. })),
                "{name:?}: {opened:?}"
            );
        }
        assert_eq!(
            proxy.accepted_connections(),
            0,
            "a refused table name sent nothing to the server"
        );
        // The same path with a good name does reach the server.
        let good = db
            .open(&through_proxy, &unique("dl_unused"), s.bounds)
            .await;
        assert!(good.is_ok(), "{good:?}");
        assert!(proxy.accepted_connections() > 0);
        assert!(s.admin.table_exists(t).await, "the table is still there");
        NewRows(0)
    })
    .await;
}

async fn zero_and_huge_ttl_are_invalid_ttl(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let too_short = [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_micros(999),
        ];
        let too_long = [
            Ttl::MAX + Duration::from_nanos(1),
            Duration::from_secs(u64::from(u32::MAX)),
            Duration::from_secs(i64::MAX as u64),
            Duration::MAX,
        ];
        let manager = s.manager();
        for bad in too_short.into_iter().chain(too_long) {
            assert!(
                matches!(Ttl::new(bad), Err(Error::InvalidTtl { .. })),
                "Ttl::new({bad:?})"
            );
            assert!(matches!(Ttl::try_from(bad), Err(Error::InvalidTtl { .. })));
            let built = LockManager::builder(s.backend.clone()).ttl(bad).build();
            assert!(
                matches!(built, Err(Error::InvalidTtl { .. })),
                "manager ttl {bad:?}"
            );
            let lock = manager.lock("ttl").expect("valid key").with_ttl(bad);
            assert!(
                matches!(lock, Err(Error::InvalidTtl { .. })),
                "with_ttl({bad:?})"
            );
        }
        // The bounds themselves reach the server without overflowing its
        // arithmetic: 365 days is stored exactly, 1 ms expires at once.
        let longest = key("ttl-max");
        let token = Token::new();
        let max = ttl(Ttl::MAX);
        fence(
            s.backend
                .try_acquire(&longest, &token, max, "max", soon())
                .await
                .expect("acquire"),
        );
        s.backend
            .extend(&longest, &token, max, soon())
            .await
            .expect("extend by the longest ttl");
        let info = s.backend.inspect(&longest).await.unwrap().unwrap();
        let lease = info
            .expires_at
            .unwrap()
            .duration_since(info.acquired_at)
            .unwrap();
        assert!(
            lease >= Ttl::MAX && lease < Ttl::MAX + Duration::from_secs(60),
            "a 365-day lease, got {lease:?}"
        );
        assert!(info.remaining.unwrap() > Ttl::MAX - Duration::from_secs(60));
        s.backend
            .release(&longest, &token, soon())
            .await
            .expect("release");

        let shortest = key("ttl-min");
        let token = Token::new();
        fence(
            s.backend
                .try_acquire(&shortest, &token, ttl(Ttl::MIN), "min", soon())
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let info = s.backend.inspect(&shortest).await.unwrap().unwrap();
        assert_eq!(info.state, LockState::Expired);
        let late = s
            .backend
            .extend(&shortest, &token, ttl(Ttl::MIN), soon())
            .await;
        assert!(matches!(late, Err(Error::NotHeld { .. })), "{late:?}");
        NewRows(2)
    })
    .await;
}

async fn wrong_and_stale_tokens_are_not_held(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let b = &s.backend;
        let long = ttl(Duration::from_secs(60));
        let brief = ttl(Duration::from_millis(20));

        // A live lease, a released one, an expired one and one taken over.
        let (held, holder) = (key("held"), Token::new());
        fence(
            b.try_acquire(&held, &holder, long, "holder", soon())
                .await
                .unwrap(),
        );
        let (released, gone) = (key("released"), Token::new());
        fence(
            b.try_acquire(&released, &gone, long, "gone", soon())
                .await
                .unwrap(),
        );
        b.release(&released, &gone, soon()).await.unwrap();
        let (expired, late) = (key("expired"), Token::new());
        fence(
            b.try_acquire(&expired, &late, brief, "late", soon())
                .await
                .unwrap(),
        );
        let (taken, old, new) = (key("taken"), Token::new(), Token::new());
        let first = fence(
            b.try_acquire(&taken, &old, brief, "old", soon())
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        let second = fence(
            b.try_acquire(&taken, &new, long, "new", soon())
                .await
                .unwrap(),
        );
        assert!(second > first, "fences increase on takeover");
        let never = key("never-acquired");

        let sentinel_token = s.sentinel.token();
        let wrong = [
            (&held, Token::new()),
            (&held, sentinel_token),
            (&released, gone),
            (&released, Token::new()),
            (&expired, late),
            (&taken, old),
            (&taken, Token::new()),
            (&never, Token::new()),
            (&never, holder),
        ];
        let rows = [&held, &released, &expired, &taken, &never];
        let mut before = Vec::new();
        for k in rows {
            before.push(b.inspect(k).await.unwrap().as_ref().map(unchanging));
        }
        for (k, token) in wrong {
            let extended = b.extend(k, &token, long, soon()).await;
            assert!(
                matches!(&extended, Err(Error::NotHeld { key }) if key == k),
                "extend {k:?} with a wrong token: {extended:?}"
            );
            let released = b.release(k, &token, soon()).await;
            assert!(
                matches!(&released, Err(Error::NotHeld { key }) if key == k),
                "release {k:?} with a wrong token: {released:?}"
            );
        }
        for (k, before) in rows.into_iter().zip(before) {
            let after = b.inspect(k).await.unwrap().as_ref().map(unchanging);
            assert_eq!(after, before, "{k:?} changed");
        }
        assert_eq!(b.inspect(&never).await.unwrap(), None, "no row was made");

        // Through a guard: a lease taken over is reported lost, not extended.
        let manager = LockManager::builder(b.clone())
            .ttl(Duration::from_millis(100))
            .auto_extend(false)
            .build()
            .unwrap();
        let guard = manager
            .lock("guarded")
            .unwrap()
            .try_acquire()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        let successor = Token::new();
        fence(
            b.try_acquire(guard.key(), &successor, long, "successor", soon())
                .await
                .unwrap(),
        );
        let taken_over = b.inspect(guard.key()).await.unwrap().unwrap();
        let extended = guard.extend().await;
        assert!(
            matches!(extended, Err(Error::LockLost { .. })),
            "{extended:?}"
        );
        let guarded = guard.key().clone();
        let released = guard.release().await;
        assert!(
            matches!(released, Err(Error::LockLost { .. })),
            "{released:?}"
        );
        let after = b.inspect(&guarded).await.unwrap().unwrap();
        assert_eq!(
            unchanging(&after),
            unchanging(&taken_over),
            "the successor's lease changed"
        );

        b.release(&held, &holder, soon())
            .await
            .expect("the holder still holds its lock");
        b.release(&taken, &new, soon())
            .await
            .expect("the new holder still holds its lock");
        b.release(&guarded, &successor, soon())
            .await
            .expect("the successor still holds its lock");
        NewRows(5)
    })
    .await;
}

async fn missing_table_is_schema_missing_with_a_hint(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let missing_schema = format!("{}.locks", unique("no_such_schema"));
        for table in [unique("dl_missing"), missing_schema.clone()] {
            let backend = s.open_backend(&table, s.bounds).await.expect("connects");
            let (k, token, long) = (key("k"), Token::new(), ttl(Duration::from_secs(30)));
            let calls = [
                (
                    "try_acquire",
                    backend
                        .try_acquire(&k, &token, long, "o", soon())
                        .await
                        .map(drop),
                ),
                (
                    "extend",
                    backend.extend(&k, &token, long, soon()).await.map(drop),
                ),
                ("release", backend.release(&k, &token, soon()).await),
                ("inspect", backend.inspect(&k).await.map(drop)),
                ("list", backend.list().await.map(drop)),
            ];
            for (call, result) in calls {
                match result {
                    Err(Error::SchemaMissing { table: named, hint }) => {
                        assert_eq!(named, table, "{call} names the table");
                        assert!(hint.contains("create"), "{call}: no hint: {hint}");
                    }
                    other => panic!("{call} on {table}: expected SchemaMissing, got {other:?}"),
                }
            }
            // The waiting acquire does not retry it as if it were transient.
            let manager = LockManager::new(backend.clone());
            let (waited, took) = timed(
                manager
                    .lock("k")
                    .unwrap()
                    .acquire_timeout(Duration::from_secs(5)),
            )
            .await;
            assert!(
                matches!(waited, Err(Error::SchemaMissing { .. })),
                "{waited:?}"
            );
            assert!(
                took < Duration::from_secs(2),
                "gave up at once, took {took:?}"
            );
            assert!(
                !s.admin.table_exists(&table).await,
                "nothing made the table"
            );
        }
        // Creating a table in a schema that does not exist says so too.
        let backend = s
            .open_backend(&missing_schema, s.bounds)
            .await
            .expect("connects");
        let created = backend.create_table().await;
        assert!(
            matches!(&created, Err(Error::SchemaMissing { table, .. }) if *table == missing_schema),
            "{created:?}"
        );
        NewRows(0)
    })
    .await;
}

async fn wrong_password_is_a_typed_error_without_the_password(db: Db, test: &str) {
    const RIGHT: &str = "right-Pass-5b1e";
    const WRONG: &str = "wrong-Pass-c7a9";
    // The shared PostgreSQL trusts every login, so a private one needs a password;
    // the shared MariaDB's root has one (empty), and refuses any other.
    let server = match db {
        Db::Postgres => match throwaway(db, test, Some(RIGHT)).await {
            Some(server) => Some(server),
            None => return,
        },
        Db::MariaDb => None,
    };
    let url = match &server {
        Some(server) => server.lock().unwrap().url(),
        None => db.shared_url(),
    };
    let Some(sweep) = Sweep::open(db, test, &url, Bounds::default()).await else {
        return;
    };
    sweep
        .run(async |s| {
            let mut bad_urls = vec![
                rewrite_url(&s.url, None, Some(WRONG)),
                rewrite_url(&s.url, None, Some("wrong%20pass%2F%40")),
            ];
            if s.url.contains(RIGHT) {
                bad_urls.push(s.url.replace(&format!(":{RIGHT}@"), "@"));
            }
            for bad_url in bad_urls {
                assert!(!bad_url.contains(RIGHT));
                let opened = s.db.open(&bad_url, &s.table, s.bounds).await;
                let error = opened.expect_err("a wrong password is refused");
                assert!(
                    matches!(
                        error,
                        Error::Backend {
                            transient: false,
                            ..
                        }
                    ),
                    "expected a permanent Backend error, got {error:?}"
                );
                for secret in [WRONG, "wrong pass", "wrong%20pass", RIGHT] {
                    assert_hides(&error, secret);
                }
            }
            // A URL the driver cannot even parse is refused before connecting,
            // and its error does not quote the password either.
            for broken in [
                rewrite_url(&s.url, Some("127.0.0.1:notaport"), Some(WRONG)),
                rewrite_url(&s.url, Some("127.0.0.1:99999999"), Some(WRONG)),
                with_option(&rewrite_url(&s.url, None, Some(WRONG)), "no_such_option=1"),
            ] {
                let opened = s.db.open(&broken, &s.table, s.bounds).await;
                let error = opened.expect_err("a malformed URL is refused");
                assert!(
                    matches!(error, Error::InvalidConfig { .. }),
                    "expected InvalidConfig, got {error:?}"
                );
                assert_hides(&error, WRONG);
            }
            NewRows(0)
        })
        .await;
}

async fn unreachable_host_is_unavailable_within_the_connect_timeout(db: Db, test: &str) {
    const SECRET: &str = "unreachable-Pass-0d2f";
    on_shared(db, test, async |s| {
        let bounds = Bounds {
            connect: Duration::from_secs(1),
            ..s.bounds
        };
        // A port nothing listens on, and a name no resolver knows (RFC 2606).
        let refused = db.via_port(&s.url, refused_port());
        let unknown_host = format!("no-such-host.invalid:{}", db.default_port());
        let unknown = rewrite_url(&s.url, Some(&unknown_host), None);
        for url in [refused, unknown] {
            let url = rewrite_url(&url, None, Some(SECRET));
            let (opened, took) = timed(s.db.open(&url, &s.table, bounds)).await;
            let error = opened.expect_err("nothing answers there");
            assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
            assert!(error.is_transient());
            assert!(took <= bounds.connect + SLACK, "took {took:?}");
            assert_hides(&error, SECRET);
        }
        NewRows(0)
    })
    .await;
}

async fn stalled_handshake_is_unavailable_within_the_connect_timeout(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let proxy = FaultProxy::start(server_addr(db, &s.url)).await.unwrap();
        proxy.set_stalled(true);
        let bounds = Bounds {
            connect: Duration::from_secs(1),
            ..s.bounds
        };
        let url = db.via_port(&s.url, proxy.port());
        let (opened, took) = timed(s.db.open(&url, &s.table, bounds)).await;
        let error = opened.expect_err("the handshake never completes");
        assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
        assert!(took <= bounds.connect + SLACK, "took {took:?}");
        assert!(
            proxy.accepted_connections() > 0,
            "the TCP connection was made; the handshake stalled"
        );
        NewRows(0)
    })
    .await;
}

async fn stalled_calls_are_unavailable_within_the_call_timeout(db: Db, test: &str) {
    on_shared(db, test, async |s| {
        let proxy = FaultProxy::start(server_addr(db, &s.url)).await.unwrap();
        let bounds = Bounds {
            connect: Duration::from_secs(1),
            statement: Duration::from_secs(1),
            row_lock: Duration::from_millis(500),
        };
        let url = db.via_port(&s.url, proxy.port());
        let backend =
            s.db.open(&url, &s.table, bounds)
                .await
                .expect("connects through the proxy");
        let (mine, token, long) = (key("mine"), Token::new(), ttl(Duration::from_secs(60)));
        fence(
            backend
                .try_acquire(&mine, &token, long, "me", soon())
                .await
                .unwrap(),
        );
        let mine_before = unchanging(&backend.inspect(&mine).await.unwrap().unwrap());
        // Open the whole pool, so that the calls below stall on established
        // sessions, not only on new ones.
        let warm = tokio::join!(
            backend.list(),
            backend.list(),
            backend.list(),
            backend.list()
        );
        assert!(warm.0.is_ok() && warm.1.is_ok() && warm.2.is_ok() && warm.3.is_ok());

        proxy.set_stalled(true);
        let sentinel = s.sentinel.key();
        let limit = s.db.call_timeout(bounds) + SLACK;
        let intruder = Token::new();
        let (acquire, extend, release, inspect, list) = tokio::join!(
            timed(backend.try_acquire(sentinel, &intruder, long, "stalled", soon())),
            timed(backend.extend(&mine, &token, long, soon())),
            timed(backend.release(&mine, &token, soon())),
            timed(backend.inspect(&mine)),
            timed(backend.list()),
        );
        let results = [
            ("try_acquire", acquire.0.map(drop), acquire.1),
            ("extend", extend.0.map(drop), extend.1),
            ("release", release.0, release.1),
            ("inspect", inspect.0.map(drop), inspect.1),
            ("list", list.0.map(drop), list.1),
        ];
        for (call, result, took) in results {
            assert!(
                matches!(result, Err(Error::Unavailable { .. })),
                "{call}: {result:?}"
            );
            assert!(took <= limit, "{call} took {took:?}, limit {limit:?}");
        }
        // Whatever the proxy still holds back is never delivered.
        drop(proxy);
        let mine_after = unchanging(&s.backend.inspect(&mine).await.unwrap().unwrap());
        assert_eq!(mine_after, mine_before, "a stalled call changed the row");
        s.backend
            .release(&mine, &token, soon())
            .await
            .expect("still held by its token");
        NewRows(1)
    })
    .await;
}

async fn server_restarted_mid_call_is_transient_and_recovers(db: Db, test: &str) {
    let Some(server) = throwaway(db, test, None).await else {
        return;
    };
    let url = server.lock().unwrap().url();
    // Long row-lock and statement bounds, so the calls are still waiting when the
    // server goes down.
    let bounds = Bounds {
        connect: Duration::from_secs(2),
        statement: Duration::from_secs(10),
        row_lock: Duration::from_secs(8),
    };
    let Some(sweep) = Sweep::open(db, test, &url, bounds).await else {
        return;
    };
    sweep
        .run(async |s| {
            let long = ttl(Duration::from_secs(60));
            // A free (released) row, and a row held by `holder`.
            let (free, first) = (key("free"), Token::new());
            let before = fence(
                s.backend
                    .try_acquire(&free, &first, long, "o", soon())
                    .await
                    .unwrap(),
            );
            s.backend.release(&free, &first, soon()).await.unwrap();
            let (held, holder) = (key("held"), Token::new());
            fence(
                s.backend
                    .try_acquire(&held, &holder, long, "holder", soon())
                    .await
                    .unwrap(),
            );
            let held_before = unchanging(&s.backend.inspect(&held).await.unwrap().unwrap());

            // A foreign transaction locks both rows, so a try-acquire of the free
            // key and the holder's extend both wait on a row lock. (A try-acquire
            // of a *held* key is refused without waiting.)
            let foreign = s.admin.hold_row_locks(&s.table, &[&free, &held]).await;
            let acquirer = Token::new();
            let acquire = tokio::spawn({
                let (backend, k) = (s.backend.clone(), free.clone());
                timed(async move {
                    backend
                        .try_acquire(&k, &acquirer, long, "mid-call", soon())
                        .await
                })
            });
            let extend = tokio::spawn({
                let (backend, k) = (s.backend.clone(), held.clone());
                timed(async move { backend.extend(&k, &holder, long, soon()).await })
            });
            let waiting = Instant::now();
            while s.admin.lock_waiters(&s.table).await < 2 {
                assert!(
                    waiting.elapsed() < Duration::from_secs(5),
                    "the calls never waited on the rows"
                );
                // Not more often: InnoDB refreshes its INNODB_TRX view only when it
                // was last read over 100 ms ago.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }

            let restart = tokio::task::spawn_blocking({
                let server = server.clone();
                move || server.lock().unwrap().restart()
            });
            // Each call ends within its bound, with a transient error or, if it
            // got through before the server went down, its ordinary answer; never
            // a refusal or a NotHeld, since the rows were free or ours.
            let limit = s.db.call_timeout(bounds) + SLACK;
            let (acquired, took) = acquire.await.unwrap();
            match acquired {
                Err(error) => assert!(error.is_transient(), "try_acquire: {error:?}"),
                Ok(outcome) => assert_eq!(fence(outcome), Fence::new(before.get() + 1)),
            }
            assert!(took <= limit, "try_acquire took {took:?}");
            let (extended, took) = extend.await.unwrap();
            if let Err(error) = extended {
                assert!(error.is_transient(), "extend: {error:?}");
            }
            assert!(took <= limit, "extend took {took:?}");
            restart.await.unwrap().expect("the server restarts");
            drop(foreign);

            // A transient error may hide a commit (the server can let the waiting
            // statement finish as it kills the foreign transaction, then drop the
            // connection before answering). Retrying with the same token settles
            // it, as the waiting acquire does: one holder change, one fence more.
            let settled = s
                .backend
                .try_acquire(&free, &acquirer, long, "mid-call", soon())
                .await
                .expect("the first call after the restart works");
            assert_eq!(fence(settled), Fence::new(before.get() + 1));
            // The holder's row is intact, its lease at most extended by itself.
            let held_after = unchanging(&s.backend.inspect(&held).await.unwrap().unwrap());
            assert_eq!(
                LockInfo {
                    expires_at: held_before.expires_at,
                    ..held_after.clone()
                },
                held_before
            );
            assert!(held_after.expires_at >= held_before.expires_at);
            s.backend
                .extend(&held, &holder, long, soon())
                .await
                .expect("still the holder's");

            // A new client comes next, with a strictly greater fence.
            s.backend
                .release(&free, &acquirer, soon())
                .await
                .expect("release");
            let next = s
                .backend
                .try_acquire(&free, &Token::new(), long, "after", soon())
                .await
                .unwrap();
            assert_eq!(fence(next), Fence::new(before.get() + 2));
            s.backend
                .release(&held, &holder, soon())
                .await
                .expect("release");
            NewRows(2)
        })
        .await;
}

// ---------------------------------------------------------------------------
// One test per case per backend
// ---------------------------------------------------------------------------

/// `case => test(db), …;`: one multi-thread tokio test per backend, each running
/// `case` against `db`.
macro_rules! sweep_tests {
    ($($case:ident => $($test:ident($db:expr)),+;)*) => {$($(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $test() {
            $case($db, stringify!($test)).await;
        }
    )+)*};
}

sweep_tests! {
    empty_key_is_invalid_key =>
        postgres_empty_key_is_invalid_key(Db::Postgres),
        mariadb_empty_key_is_invalid_key(Db::MariaDb);
    oversized_key_is_invalid_key =>
        postgres_oversized_key_is_invalid_key(Db::Postgres),
        mariadb_oversized_key_is_invalid_key(Db::MariaDb);
    nul_in_key_is_invalid_key =>
        postgres_nul_in_key_is_invalid_key(Db::Postgres),
        mariadb_nul_in_key_is_invalid_key(Db::MariaDb);
    escape_text_keys_round_trip_exactly =>
        postgres_escape_text_keys_round_trip_exactly(Db::Postgres),
        mariadb_escape_text_keys_round_trip_exactly(Db::MariaDb);
    sql_in_keys_is_harmless =>
        postgres_sql_in_keys_is_harmless(Db::Postgres),
        mariadb_sql_in_keys_is_harmless(Db::MariaDb);
    sql_in_table_names_is_refused_before_connecting =>
        postgres_sql_in_table_names_is_refused_before_connecting(Db::Postgres),
        mariadb_sql_in_table_names_is_refused_before_connecting(Db::MariaDb);
    zero_and_huge_ttl_are_invalid_ttl =>
        postgres_zero_and_huge_ttl_are_invalid_ttl(Db::Postgres),
        mariadb_zero_and_huge_ttl_are_invalid_ttl(Db::MariaDb);
    wrong_and_stale_tokens_are_not_held =>
        postgres_wrong_and_stale_tokens_are_not_held(Db::Postgres),
        mariadb_wrong_and_stale_tokens_are_not_held(Db::MariaDb);
    missing_table_is_schema_missing_with_a_hint =>
        postgres_missing_table_is_schema_missing_with_a_hint(Db::Postgres),
        mariadb_missing_table_is_schema_missing_with_a_hint(Db::MariaDb);
    wrong_password_is_a_typed_error_without_the_password =>
        postgres_wrong_password_is_a_typed_error_without_the_password(Db::Postgres),
        mariadb_wrong_password_is_a_typed_error_without_the_password(Db::MariaDb);
    unreachable_host_is_unavailable_within_the_connect_timeout =>
        postgres_unreachable_host_is_unavailable_within_the_connect_timeout(Db::Postgres),
        mariadb_unreachable_host_is_unavailable_within_the_connect_timeout(Db::MariaDb);
    stalled_handshake_is_unavailable_within_the_connect_timeout =>
        postgres_stalled_handshake_is_unavailable_within_the_connect_timeout(Db::Postgres),
        mariadb_stalled_handshake_is_unavailable_within_the_connect_timeout(Db::MariaDb);
    stalled_calls_are_unavailable_within_the_call_timeout =>
        postgres_stalled_calls_are_unavailable_within_the_call_timeout(Db::Postgres),
        mariadb_stalled_calls_are_unavailable_within_the_call_timeout(Db::MariaDb);
    server_restarted_mid_call_is_transient_and_recovers =>
        postgres_server_restarted_mid_call_is_transient_and_recovers(Db::Postgres),
        mariadb_server_restarted_mid_call_is_transient_and_recovers(Db::MariaDb);
}
