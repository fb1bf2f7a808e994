//! [`PostgresBackend`]: the [`LockBackend`] on a deadpool of tokio-postgres
//! connections.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use distrlock_core::server_clock::{ServerClock, from_unix_micros};
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, MAX_OWNER_LEN,
    ReleaseNotifier, Result, TableName, Token, Ttl,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row};

use crate::config::{Pooler, PostgresConfig, Redacted, clock_reading};
use crate::error::{from_pg, from_pool, is_lock_not_available, is_session_lost};
use crate::listener::Listener;
use crate::sql::{
    ACQUIRE_TYPES, CLOCK_READING, COMMIT, EXTEND_MANY_TYPES, EXTEND_TYPES, Failover, INSPECT_TYPES,
    RELEASE_TYPES, Statements,
};

/// Locks stored as rows of one PostgreSQL table, reached through a deadpool of
/// tokio-postgres connections.
///
/// Cheap to clone: clones share the pool, the statements and the listening
/// connection, which closes when the last clone is dropped.
///
/// # How each call behaves
///
/// - `try_acquire`, `extend` and `release` each run **one statement in one round
///   trip**, prepared once per pooled connection (deadpool's statement cache).
///   Expiry is computed on the server with `clock_timestamp()`.
/// - **Behind a transaction pooler** (PgBouncer's `pool_mode = transaction`),
///   set [`Pooler::Transaction`](crate::Pooler::Transaction) (or
///   `?distrlock_pooler=transaction` in the URL): each call then runs
///   `BEGIN; SET LOCAL lock_timeout …, statement_timeout …, transaction_isolation
///   …, idle_in_transaction_session_timeout …`, its statement unnamed (parsed
///   every time), and `COMMIT`, all pipelined in **one round trip**, and leaves
///   nothing on the pooled session: no `SET`, no prepared statement, no
///   `LISTEN`. Waiters in other processes poll, unless a direct
///   [`listen_url`](crate::PostgresConfigBuilder::listen_url) is given. The
///   server's clock is read once when connecting, then from every answer.
///   Without the setting, a transaction pooler hands a named statement to
///   another client's session, or runs another client's statement of the same
///   name, and passes the backend's session settings on to the pool's other
///   clients.
/// - **No late effects.** Each of these statements carries the caller's
///   `not_after` mapped onto the server's clock (contract item 8): from the
///   latest clock reading any session reported (every answer carries one; a new
///   pooled session reads the clock in its setup, without an extra round trip),
///   rounded toward earlier. A statement that reaches the server later, say
///   because a frozen network path delivered it after the caller gave up and
///   closed the connection, changes nothing; the call returns
///   [`Error::Unavailable`]. Nor is a statement sent once its `not_after` has
///   passed, whether before the call or while it waited for a connection or for
///   the statement's first preparation on it.
/// - **Bounded.** Each pooled session runs with `lock_timeout` and
///   `statement_timeout` from the [`PostgresConfig`] (behind a transaction
///   pooler, each call's own transaction does), and each call as a whole is
///   bounded by [`PostgresConfig::call_timeout`]. A try-acquire that waits past
///   `lock_timeout` for a row locked by another transaction (an uncommitted
///   [`try_acquire_in`](Self::try_acquire_in), a hand-written `SELECT … FOR UPDATE`)
///   returns [`AcquireOutcome::Held`] with no remaining lease: the statement was
///   rolled back, so nothing changed, and another writer is busy with the key. The
///   waiting acquire then backs off and tries again. Extend and release report that
///   case as a transient [`Error::Backend`].
/// - **A killed session costs at most one call, usually none.** When the pooled
///   session under a call is gone (`pg_terminate_backend`, failover, broken
///   socket), the connection is discarded and the statement runs once more on
///   another one; only if that one is dead too does the call fail, with a
///   transient error. All three are safe to run twice: acquire with the same token
///   is idempotent (a live lease of the same token keeps its fence and is
///   renewed), extend only renews the same token's lease, and a retried release
///   reports success whenever it finds no live lease of this token: its first run
///   may have released it, and a waiter woken by that release may already hold
///   the key (reporting [`Error::NotHeld`] then would be a false "lock lost").
///   Inspect and list only read.
/// - **Cancel safety.** A try-acquire runs to its end even when its future is
///   dropped (the statement runs in a task of its own), and a release of the same
///   token waits for it first (within the call timeout). So the background release
///   that core sends for a cancelled acquire cannot overtake the acquire on another
///   connection and leave the lock held until its ttl: not even one whose
///   statement read its clock before its `not_after` and is still committing when
///   the release comes, which the server alone would not order after it. Other
///   calls whose future is dropped part-way discard their connection rather than
///   return it to the pool with an answer still in flight.
#[derive(Clone)]
pub struct PostgresBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    table: TableName,
    sql: Statements,
    notifier: ReleaseNotifier,
    listener: Option<tokio::task::AbortHandle>,
    call_timeout: Duration,
    /// Behind a transaction pooler, what opens each call's own transaction
    /// (`BEGIN; SET LOCAL …`); `None` otherwise.
    begin: Option<String>,
    /// What `create_table` sends: the DDL under its advisory lock, behind a
    /// transaction pooler after the `SET LOCAL`s.
    create_table: String,
    config: PostgresConfig,
    /// Acquires still running, by key and token (see [`InFlight`]).
    in_flight: Mutex<HashMap<(LockKey, Token), watch::Sender<usize>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

/// How the backend's own connections are opened.
#[derive(Clone)]
pub(crate) enum Connector {
    Plain,
    #[cfg(feature = "tls")]
    Rustls(tokio_postgres_rustls::MakeRustlsConnect),
}

impl Connector {
    /// The connector for `pg`, one of `config`'s connections.
    fn for_config(config: &PostgresConfig, pg: &tokio_postgres::Config) -> Result<Self> {
        #[cfg(feature = "tls")]
        {
            if let Some(tls) = &config.tls {
                return Ok(Connector::Rustls(tls.connector()?));
            }
            if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                return Ok(Connector::Rustls(
                    crate::tls::TlsConfig::webpki_roots().connector()?,
                ));
            }
        }
        let _ = (config, pg);
        Ok(Connector::Plain)
    }
}

impl PostgresBackend {
    /// The DDL that [`create_table`](LockBackend::create_table) runs for `table`,
    /// without connecting: for migration tools and `distrlock schema`.
    pub fn schema_sql_for(table: &TableName) -> String {
        format!(
            "{};\n",
            Statements::new(table, Failover::DEFAULT).create_table
        )
    }

    /// Connects with a `postgres://…` URL (or a `host=… user=…` string) and every
    /// other setting at its default.
    ///
    /// Opens one pooled connection at once, so a wrong address or password is
    /// reported here ([`Error::Unavailable`] or [`Error::Backend`]), and starts the
    /// listening connection. Does not create the table: see
    /// [`create_table`](LockBackend::create_table).
    pub async fn connect(url: &str) -> Result<Self> {
        Self::from_config(PostgresConfig::builder().url(url).build()?).await
    }

    /// Connects with a driver config and every other setting at its default.
    pub async fn from_pg_config(pg: tokio_postgres::Config) -> Result<Self> {
        Self::from_config(PostgresConfig::builder().pg_config(pg).build()?).await
    }

    /// Connects with a full [`PostgresConfig`], which must name a connection
    /// ([`url`](crate::PostgresConfigBuilder::url) or
    /// [`pg_config`](crate::PostgresConfigBuilder::pg_config)).
    pub async fn from_config(config: PostgresConfig) -> Result<Self> {
        let pg = config.pg.clone().ok_or_else(|| Error::InvalidConfig {
            reason: "no connection given: set a URL or a tokio_postgres::Config".into(),
        })?;
        let connector = Connector::for_config(&config, &pg)?;
        let manager_config = ManagerConfig {
            // Fast: only checks that the connection is open. Verified or Clean would
            // add a round trip to every call; a session that died unnoticed is
            // handled by the one retry instead.
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &connector {
            Connector::Plain => Manager::from_config(pg, tokio_postgres::NoTls, manager_config),
            #[cfg(feature = "tls")]
            Connector::Rustls(tls) => Manager::from_config(pg, tls.clone(), manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .post_create(config.post_create_hook())
            .build()
            .map_err(|e| Error::InvalidConfig {
                reason: format!("building the connection pool failed: {e}"),
            })?;
        // Fail now, not at the first lock, when the server or the login is wrong.
        let conn = pool.get().await.map_err(|e| from_pool(e, &config.table))?;
        if config.pooler() == Pooler::Transaction {
            // A pooler may let us in before it has reached the server: ask the
            // database itself, and read its clock while at it (behind a
            // transaction pooler the session setup does not).
            let messages =
                tokio::time::timeout(config.connect_timeout, conn.simple_query(CLOCK_READING))
                    .await
                    .map_err(|_| {
                        Error::unavailable(
                            format!(
                                "PostgreSQL did not answer through the pooler within {:?}",
                                config.connect_timeout
                            ),
                            None,
                        )
                    })?
                    .map_err(|e| from_pg(e, &config.table))?;
            if let Some(server_us) = clock_reading(&messages) {
                config.server_clock().observe(Instant::now(), server_us);
            }
        }
        drop(conn);
        let connect_timeout = config.connect_timeout;
        let (backend, ready) = Self::assemble(pool, config)?;
        if let Some(ready) = ready {
            // Waiters that start right away should already be woken by releases
            // elsewhere; if listening takes longer, it keeps trying in the background.
            if tokio::time::timeout(connect_timeout, ready).await.is_err() {
                tracing::warn!("release listener not connected yet; waiters poll meanwhile");
            }
        }
        Ok(backend)
    }

    /// Uses your own deadpool-postgres pool.
    ///
    /// Nothing is sent yet. The pool's sessions keep their own settings: build the
    /// pool with [`PostgresConfig::post_create_hook`] so they get the config's
    /// `lock_timeout` and `statement_timeout`, and with `RecyclingMethod::Fast` or
    /// `Verified` (`Clean` resets them; see
    /// [`session_settings_sql`](PostgresConfig::session_settings_sql)). The hook
    /// also reads the server's clock for the backends built with that same config
    /// (or a clone of it), which bound every lock statement on that clock; without
    /// it the backend reads the clock itself once, with one more round trip before
    /// its first lock statement. Release notifications from other processes need a
    /// connection of their own outside the pool; the backend opens
    /// one only if the config names a connection to listen on
    /// ([`url`](crate::PostgresConfigBuilder::url) or
    /// [`pg_config`](crate::PostgresConfigBuilder::pg_config), or a
    /// [`listen_url`](crate::PostgresConfigBuilder::listen_url)) and listening is
    /// on (see [`PostgresConfig::listens`]).
    ///
    /// With a config for a transaction pooler
    /// ([`Pooler::Transaction`](crate::Pooler::Transaction)) the pool's sessions
    /// need no setup (the hook sends nothing then): every call brings its own
    /// settings, and the backend reads the server's clock once, with one more
    /// round trip before its first lock statement.
    ///
    /// Must be called within a tokio runtime when it starts a listener; returns
    /// [`Error::InvalidConfig`] otherwise.
    pub fn from_pool(pool: Pool, config: PostgresConfig) -> Result<Self> {
        Ok(Self::assemble(pool, config)?.0)
    }

    /// The backend, and a receiver that fires once its listener is `LISTEN`ing.
    fn assemble(
        pool: Pool,
        config: PostgresConfig,
    ) -> Result<(Self, Option<tokio::sync::oneshot::Receiver<()>>)> {
        let sql = Statements::new(&config.table, config.failover());
        let notifier = ReleaseNotifier::new();
        let mut listener = None;
        let mut ready = None;
        let listen_pg = config.listen_pg_config().filter(|_| config.listen).cloned();
        if let Some(pg) = listen_pg {
            let connector = Connector::for_config(&config, &pg)?;
            if tokio::runtime::Handle::try_current().is_err() {
                return Err(Error::InvalidConfig {
                    reason: "the release listener needs a tokio runtime: create the backend \
                             inside one"
                        .into(),
                });
            }
            let (handle, ready_rx) = Listener {
                pg,
                connector,
                listen_sql: sql.listen.clone(),
                notifier: notifier.clone(),
                connect_timeout: config.connect_timeout,
            }
            .spawn();
            listener = Some(handle);
            ready = Some(ready_rx);
        }
        let (begin, create_table) = match config.pooler() {
            Pooler::Session => (None, sql.create_table_locked.clone()),
            Pooler::Transaction => (
                Some(config.begin_sql()),
                format!(
                    "{}; {}",
                    config.local_settings_sql(),
                    sql.create_table_locked
                ),
            ),
        };
        let backend = Self {
            inner: Arc::new(Inner {
                pool,
                table: config.table.clone(),
                sql,
                notifier,
                listener,
                call_timeout: config.call_timeout(),
                begin,
                create_table,
                config,
                in_flight: Mutex::new(HashMap::new()),
            }),
        };
        Ok((backend, ready))
    }

    /// The pool the backend runs its statements on.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The config the backend was built with.
    pub fn config(&self) -> &PostgresConfig {
        &self.inner.config
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// The `NOTIFY` channel releases are announced on (`distrlock:<table>`, or a
    /// hash of it for long names); the payload is the key.
    pub fn channel(&self) -> &str {
        &self.inner.sql.channel
    }

    /// Like [`try_acquire`](LockBackend::try_acquire), inside your own transaction
    /// (or on any client), with the same SQL text.
    ///
    /// Take a lock and insert a job row atomically: if the transaction rolls back,
    /// the lock was never taken. The lease starts when this statement runs (on
    /// `clock_timestamp()`), not when the transaction began, and the row stays
    /// locked by your transaction until it ends, so keep it short.
    ///
    /// **The fence counts only once the transaction commits.** A rolled-back
    /// acquire never happened: its fence is not kept anywhere, and the next
    /// acquisition of the key may be handed the same fence number. Present the
    /// fence to anything outside the transaction (a storage service that rejects
    /// stale fences) only after the commit succeeded; if the commit's outcome is
    /// unknown (the connection broke during `COMMIT`),
    /// [`inspect`](LockBackend::inspect) the key first.
    ///
    /// One round trip (an unnamed statement, parsed each time), so it works
    /// through a transaction pooler too: your transaction holds its server
    /// session until it ends. Your session's own
    /// settings apply: a row-lock wait past your `lock_timeout` is an error here
    /// (your transaction is aborted), not [`AcquireOutcome::Held`].
    ///
    /// With deadpool, pass the driver's transaction: `&*transaction` or
    /// `&**client`.
    ///
    /// # No late effects
    ///
    /// The `*_in` calls carry the same bound as the backend's own calls
    /// (contract item 8), fixed at `Instant::now() + `[`call_timeout`](PostgresConfig::call_timeout)
    /// when the call starts: a statement that reaches the server later than that
    /// changes nothing and the call returns [`Error::Unavailable`] (your
    /// transaction is not aborted: the statement ran and did nothing). If you stop
    /// waiting for the answer earlier and clean up, wait until that instant first.
    /// Inside an explicit transaction nothing takes effect before your `COMMIT`
    /// anyway; the bound matters for a client in autocommit, or a `COMMIT` sent
    /// together with the statement.
    pub async fn try_acquire_in<C>(
        &self,
        client: &C,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
    ) -> Result<AcquireOutcome>
    where
        C: GenericClient + Sync,
    {
        check_owner(owner)?;
        let ttl_us = ttl.as_micros();
        let params: [&(dyn ToSql + Sync); 4] = [&key.as_str(), token.as_uuid(), &ttl_us, &owner];
        let answer = self
            .run_in(client, &self.inner.sql.acquire, ACQUIRE_TYPES, &params)
            .await
            .map_err(|f| f.into_error(self))?;
        self.acquire_outcome(&answer, ttl)
    }

    /// Like [`extend`](LockBackend::extend), inside your own transaction, with the
    /// same SQL text.
    ///
    /// Returns the server clock's reading at which the lease was renewed. Bounded
    /// like [`try_acquire_in`](Self::try_acquire_in).
    pub async fn extend_in<C>(
        &self,
        client: &C,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
    ) -> Result<SystemTime>
    where
        C: GenericClient + Sync,
    {
        let ttl_us = ttl.as_micros();
        let params: [&(dyn ToSql + Sync); 3] = [&key.as_str(), token.as_uuid(), &ttl_us];
        let answer = self
            .run_in(client, &self.inner.sql.extend, EXTEND_TYPES, &params)
            .await
            .map_err(|f| f.into_error(self))?;
        self.extend_outcome(key, &answer, ttl)
    }

    /// Like [`release`](LockBackend::release), inside your own transaction, with
    /// the same SQL text.
    ///
    /// The release takes effect, and waiters are notified, when your transaction
    /// commits; a rollback keeps the lock held. Bounded like
    /// [`try_acquire_in`](Self::try_acquire_in).
    pub async fn release_in<C>(&self, client: &C, key: &LockKey, token: &Token) -> Result<()>
    where
        C: GenericClient + Sync,
    {
        let channel = self.inner.sql.channel.as_str();
        let params: [&(dyn ToSql + Sync); 3] = [&key.as_str(), token.as_uuid(), &channel];
        let answer = self
            .run_in(client, &self.inner.sql.release, RELEASE_TYPES, &params)
            .await
            .map_err(|f| f.into_error(self))?;
        match self.release_outcome(&answer)? {
            Released::Now => Ok(()),
            Released::Before | Released::NotHeld => Err(Error::NotHeld { key: key.clone() }),
        }
    }

    /// What the backend knows of the server's clock. Not a stable API: tests feed
    /// it readings.
    #[doc(hidden)]
    pub fn server_clock(&self) -> &ServerClock {
        self.inner.config.server_clock()
    }

    fn error(&self, error: tokio_postgres::Error) -> Error {
        from_pg(error, &self.inner.table)
    }

    /// Runs one statement on a pooled connection, once more on another
    /// connection if the session died under it (see the type's docs for why that
    /// is safe for every statement here), all within the call timeout.
    ///
    /// On a direct connection (or behind a session pooler) the statement is
    /// prepared once per connection and runs under the session's settings;
    /// behind a transaction pooler it runs unnamed in a transaction of its own
    /// (see [`in_own_transaction`]).
    ///
    /// With `not_after`, the statement is one of the lock statements: its bound on
    /// the server's clock is appended to `params` (see [`bound_for`](Self::bound_for)),
    /// and its answer carries the server's clock reading, which is observed. One
    /// that ran too late is [`Failure::Late`], unless only our estimate of the
    /// server's clock was wrong: then it runs once more (see [`Answer::rerun`]).
    async fn run(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
        not_after: Option<Instant>,
    ) -> std::result::Result<Answer, Failure> {
        if let Some(not_after) = not_after {
            check_not_passed(not_after)?;
        }
        let call = async {
            let mut retried = false;
            let mut reran = false;
            loop {
                let conn = self
                    .inner
                    .pool
                    .get()
                    .await
                    .map_err(|e| Failure::Mapped(from_pool(e, &self.inner.table)))?;
                let conn = DiscardUnlessDone(Some(conn));
                let client: &tokio_postgres::Client = conn.get();
                let result = async {
                    let bound = match not_after {
                        Some(not_after) => Some(self.bound_for(client, not_after).await?),
                        None => None,
                    };
                    let rows = match &self.inner.begin {
                        None => {
                            let statement = conn
                                .get()
                                .prepare_typed_cached(sql, types)
                                .await
                                .map_err(Failure::Pg)?;
                            if let Some(not_after) = not_after {
                                check_not_passed(not_after)?;
                            }
                            let mut all = params.to_vec();
                            all.extend(bound.as_ref().map(|b| b as &(dyn ToSql + Sync)));
                            client.query(&statement, &all).await.map_err(Failure::Pg)?
                        }
                        Some(begin) => {
                            if let Some(not_after) = not_after {
                                check_not_passed(not_after)?;
                            }
                            let typed = with_types(params, types, bound.as_ref());
                            in_own_transaction(client, begin, sql, &typed)
                                .await
                                .map_err(Failure::Pg)?
                        }
                    };
                    Ok((rows, bound))
                }
                .await;
                match result {
                    Ok((rows, bound)) => {
                        conn.done();
                        let answer = self.answer(rows, retried, bound)?;
                        if answer.rerun(not_after, &mut reran) {
                            continue;
                        }
                        return answer.in_time();
                    }
                    Err(Failure::Pg(error)) => {
                        let lost = is_session_lost(&error) || conn.get().is_closed();
                        if lost && !retried {
                            tracing::debug!(%error, "session lost under a call; retrying once");
                            retried = true;
                            continue; // `conn` is dropped, so discarded.
                        }
                        if !lost {
                            conn.done();
                        }
                        return Err(Failure::Pg(error));
                    }
                    // Nothing was sent, and the session is fine.
                    Err(Failure::Passed) => {
                        conn.done();
                        return Err(Failure::Passed);
                    }
                    Err(failure) => return Err(failure),
                }
            }
        };
        match tokio::time::timeout(self.inner.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Mapped(self.timed_out())),
        }
    }

    /// Runs one lock statement on the caller's client (unnamed, parsed each time),
    /// bounded at the call timeout from now (see
    /// [`try_acquire_in`](Self::try_acquire_in)).
    async fn run_in<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Answer, Failure>
    where
        C: GenericClient + Sync,
    {
        let not_after = Instant::now() + self.inner.call_timeout;
        let mut reran = false;
        loop {
            let bound = self.bound_for(client, not_after).await?;
            let typed = with_types(params, types, Some(&bound));
            check_not_passed(not_after)?;
            let rows = client.query_typed(sql, &typed).await.map_err(Failure::Pg)?;
            let answer = self.answer(rows, false, Some(bound))?;
            if !answer.rerun(Some(not_after), &mut reran) {
                return answer.in_time();
            }
        }
    }

    /// `not_after` on the server's clock, in µs since the epoch, rounded toward
    /// earlier (contract item 8): from the latest reading any session reported.
    ///
    /// A backend's own sessions report one when they are set up (the config's
    /// post_create hook) and with every answer. Only a session of a pool built
    /// without the hook, before any statement answered, has none: then this reads
    /// the clock once on `client`, the connection the statement is about to run on.
    async fn bound_for<C>(
        &self,
        client: &C,
        not_after: Instant,
    ) -> std::result::Result<i64, Failure>
    where
        C: GenericClient + Sync,
    {
        let clock = self.server_clock();
        if let Some(bound) = clock.bound_micros(not_after) {
            return Ok(bound);
        }
        let messages = client
            .simple_query(CLOCK_READING)
            .await
            .map_err(Failure::Pg)?;
        if let Some(server_us) = clock_reading(&messages) {
            clock.observe(Instant::now(), server_us);
        }
        clock.bound_micros(not_after).ok_or_else(|| {
            Failure::Mapped(Error::Backend {
                message: "PostgreSQL did not tell its clock".into(),
                transient: true,
                source: None,
            })
        })
    }

    /// The rows of a statement that just answered; for a lock statement (sent with
    /// `bound`), with its clock reading observed.
    fn answer(
        &self,
        rows: Vec<Row>,
        retried: bool,
        bound: Option<i64>,
    ) -> std::result::Result<Answer, Failure> {
        let arrived = Instant::now();
        let clock = match bound {
            None => None,
            Some(bound) => {
                let server_us = rows
                    .first()
                    .map(|row| row.try_get::<_, i64>("server_us"))
                    .transpose()
                    .map_err(Failure::Pg)?
                    .ok_or_else(|| {
                        Failure::Mapped(Error::Backend {
                            message: "a lock statement returned no clock reading".into(),
                            transient: false,
                            source: None,
                        })
                    })?;
                self.server_clock().observe(arrived, server_us);
                Some(Reading { server_us, bound })
            }
        };
        Ok(Answer {
            rows,
            retried,
            arrived,
            clock,
        })
    }

    fn timed_out(&self) -> Error {
        Error::unavailable(
            format!(
                "PostgreSQL did not answer within {:?}",
                self.inner.call_timeout
            ),
            None,
        )
    }

    async fn acquire_once(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let ttl_us = ttl.as_micros();
        let params: [&(dyn ToSql + Sync); 4] = [&key.as_str(), token.as_uuid(), &ttl_us, &owner];
        match self
            .run(
                &self.inner.sql.acquire,
                ACQUIRE_TYPES,
                &params,
                Some(not_after),
            )
            .await
        {
            Ok(answer) => self.acquire_outcome(&answer, ttl),
            // Waited past lock_timeout on a row another transaction is writing: the
            // statement rolled back, nothing changed, and the key is busy.
            Err(Failure::Pg(e)) if is_lock_not_available(&e) => {
                Ok(AcquireOutcome::Held { remaining: None })
            }
            Err(failure) => Err(failure.into_error(self)),
        }
    }

    /// The outcome of an acquire statement's one row.
    fn acquire_outcome(&self, answer: &Answer, ttl: Ttl) -> Result<AcquireOutcome> {
        let row = answer.row()?;
        let fence: Option<i64> = row.try_get("fence").map_err(|e| self.error(e))?;
        let remaining_us: Option<i64> = row.try_get("remaining_us").map_err(|e| self.error(e))?;
        if fence.is_some() {
            return Ok(AcquireOutcome::Acquired {
                fence: Fence::new(fence.unwrap_or_default()),
                server_time: answer.server_time(),
            });
        }
        let gate = self.gate(row, ttl)?;
        Ok(AcquireOutcome::Held {
            // Refused; no remaining lease when the row was free (or absent) and a
            // concurrent acquirer took it first. In a failover quarantine, the
            // later of its end and the holder's.
            remaining: match (remaining_us, gate) {
                (Some(a), Some(b)) => Some(micros(a.max(b))),
                (a, b) => a.or(b).map(micros),
            },
        })
    }

    /// The outcome of an extend statement's one row.
    fn extend_outcome(&self, key: &LockKey, answer: &Answer, ttl: Ttl) -> Result<SystemTime> {
        let row = answer.row()?;
        let renewed: bool = row.try_get("renewed").map_err(|e| self.error(e))?;
        if renewed {
            return Ok(answer.server_time());
        }
        match self.gate(row, ttl)? {
            Some(left) => Err(quarantined(key, left)),
            None => Err(Error::NotHeld { key: key.clone() }),
        }
    }

    /// Reads a refused statement's failover gate: the µs a failover quarantine
    /// has left, if one runs; [`Error::InvalidTtl`] if `ttl` is above the
    /// table's max_ttl.
    fn gate(&self, row: &Row, ttl: Ttl) -> Result<Option<i64>> {
        let quarantine_us: Option<i64> = row.try_get("quarantine_us").map_err(|e| self.error(e))?;
        let max_ttl_us: Option<i64> = row.try_get("max_ttl_us").map_err(|e| self.error(e))?;
        if let Some(max_ttl_us) = max_ttl_us
            && ttl.as_micros() > max_ttl_us
        {
            return Err(Error::InvalidTtl {
                reason: format!(
                    "{:?} is longer than the max_ttl of table {} ({:?}); raise it with \
                     PostgresConfig's max_ttl and create_table",
                    ttl.get(),
                    self.inner.table,
                    micros(max_ttl_us),
                ),
            });
        }
        if let Some(left) = quarantine_us {
            tracing::warn!(
                table = %self.inner.table,
                left_ms = left / 1000,
                "PostgreSQL was promoted (a new timeline): no lock is granted or extended \
                 until the failover quarantine ends"
            );
        }
        Ok(quarantine_us)
    }

    /// The outcome of a release statement's one row.
    fn release_outcome(&self, answer: &Answer) -> Result<Released> {
        let released: Option<bool> = answer
            .row()?
            .try_get("released")
            .map_err(|e| self.error(e))?;
        Ok(match released {
            Some(true) => Released::Now,
            Some(false) => Released::Before,
            None => Released::NotHeld,
        })
    }

    fn lock_info(&self, row: &Row) -> Result<LockInfo> {
        let key: String = row.try_get("lock_key").map_err(|e| self.error(e))?;
        let key = LockKey::new(key).map_err(|e| Error::Backend {
            message: format!("the lock table holds a key distrlock cannot use: {e}"),
            transient: false,
            source: None,
        })?;
        let owner: String = row.try_get("owner").map_err(|e| self.error(e))?;
        let fence: i64 = row.try_get("fence").map_err(|e| self.error(e))?;
        let acquired_us: i64 = row.try_get("acquired_us").map_err(|e| self.error(e))?;
        let expires_us: Option<i64> = row.try_get("expires_us").map_err(|e| self.error(e))?;
        let held: bool = row.try_get("held").map_err(|e| self.error(e))?;
        let remaining_us: Option<i64> = row.try_get("remaining_us").map_err(|e| self.error(e))?;
        let state = match (expires_us, held) {
            (None, _) => LockState::Released,
            (Some(_), true) => LockState::Held,
            (Some(_), false) => LockState::Expired,
        };
        Ok(LockInfo {
            key,
            owner,
            fence: Fence::new(fence),
            acquired_at: from_unix_micros(acquired_us),
            expires_at: expires_us.map(from_unix_micros),
            state,
            remaining: if held { remaining_us.map(micros) } else { None },
        })
    }
}

/// The rows of one statement, whether it ran a second time, and for a lock
/// statement its clock reading.
struct Answer {
    rows: Vec<Row>,
    retried: bool,
    /// When the answer arrived.
    arrived: Instant,
    clock: Option<Reading>,
}

/// A lock statement's clock reading and the bound it was sent with, both in µs
/// since the epoch on the server's clock.
#[derive(Debug, Clone, Copy)]
struct Reading {
    server_us: i64,
    bound: i64,
}

impl Reading {
    /// Whether the statement ran at or after its bound, so that it changed
    /// nothing: its writes all require `clock.at_us < bound`.
    fn late(&self) -> bool {
        self.server_us >= self.bound
    }
}

impl Answer {
    /// The one row every lock statement but `extend_many` returns.
    fn row(&self) -> Result<&Row> {
        self.rows.first().ok_or_else(|| Error::Backend {
            message: "a lock statement returned no row".into(),
            transient: false,
            source: None,
        })
    }

    /// The statement's clock reading (the epoch for a statement without one).
    fn server_time(&self) -> SystemTime {
        from_unix_micros(self.clock.map_or(0, |c| c.server_us))
    }

    /// Whether to run a statement refused as late once more (at most once per
    /// call, `reran` tells): when its answer arrived before `not_after`, the
    /// statement did not run late on our clock, so the bound was wrong, not the
    /// statement: the estimate of the server's clock (say the server's clock
    /// stepped forward since the reading it came from, or the reading was so old
    /// that the rate allowance alone moved the bound past the server's now). The
    /// refusal's own reading, just observed, has corrected it, and the statement
    /// changed nothing, so running it again is safe. Its new bound still rounds
    /// toward earlier, so the rerun cannot take effect after `not_after` either.
    fn rerun(&self, not_after: Option<Instant>, reran: &mut bool) -> bool {
        let (Some(reading), Some(not_after)) = (self.clock, not_after) else {
            return false;
        };
        if !reading.late() || *reran || self.arrived >= not_after {
            return false;
        }
        tracing::debug!(
            server_us = reading.server_us,
            bound_us = reading.bound,
            "refused as late before not_after: the server clock estimate was wrong; retrying once"
        );
        *reran = true;
        true
    }

    /// `self`, or [`Failure::Late`] if the statement ran too late to act.
    fn in_time(self) -> std::result::Result<Self, Failure> {
        match self.clock {
            Some(reading) if reading.late() => Err(Failure::Late(reading)),
            _ => Ok(self),
        }
    }
}

enum Failure {
    /// A driver error, still to be classified by the caller.
    Pg(tokio_postgres::Error),
    /// Already mapped (pool or timeout).
    Mapped(Error),
    /// The statement ran at or after its not-after bound, so it changed nothing.
    Late(Reading),
    /// The call's not_after passed before its statement was sent, so nothing was
    /// sent.
    Passed,
}

impl Failure {
    fn into_error(self, backend: &PostgresBackend) -> Error {
        match self {
            Failure::Pg(e) => backend.error(e),
            Failure::Mapped(e) => e,
            Failure::Late(reading) => Error::unavailable(
                format!(
                    "the statement reached PostgreSQL after its not_after bound (server clock \
                     {} µs, bound {} µs since the epoch); nothing changed",
                    reading.server_us, reading.bound
                ),
                None,
            ),
            Failure::Passed => Error::unavailable(
                "the call's not_after passed before its statement was sent; nothing changed",
                None,
            ),
        }
    }
}

/// `params` paired with their `types`, and the not-after `bound` (an int8) last
/// if there is one: the parameters of an unnamed statement.
fn with_types<'a>(
    params: &[&'a (dyn ToSql + Sync)],
    types: &[Type],
    bound: Option<&'a i64>,
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .zip(types)
        .map(|(param, ty)| (*param, ty.clone()))
        .chain(bound.map(|b| (b as &(dyn ToSql + Sync), Type::INT8)))
        .collect()
}

/// Runs one statement in a transaction of its own, for a session that a
/// transaction pooler lends us for that transaction only: `begin` (`BEGIN; SET
/// LOCAL …`, one simple query), the statement unnamed (Parse, Bind, Describe,
/// Execute, Sync: nothing named outlives it), and `COMMIT`, **all sent before
/// the first answer**, so the call still costs one round trip. The settings end
/// with the transaction, so no other client of the pooled session sees them,
/// yet they bound the statement: `statement_timeout` is armed when a statement
/// starts, and it starts after the `SET LOCAL`.
///
/// tokio-postgres pipelines the requests of one client: each of these futures
/// hands its messages to the connection when first polled, and
/// `join!(biased; …)` polls them first in this order, in one poll, so they
/// leave in this order (the connection task writes all it has queued, then
/// flushes). The pooler keeps the three on one server session: the session
/// leaves the transaction (ReadyForQuery idle) only after `COMMIT`.
///
/// A statement that fails (a row-lock wait past `lock_timeout`, say) aborts the
/// transaction; `COMMIT` then rolls it back without an error, and the
/// statement's error is returned. A failed `COMMIT` after a statement that
/// succeeded is returned too: the statement's effect is then unknown, as with a
/// lost answer.
async fn in_own_transaction(
    client: &tokio_postgres::Client,
    begin: &str,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
    let (begun, rows, committed) = tokio::join!(
        biased;
        client.batch_execute(begin),
        client.query_typed(sql, params),
        client.batch_execute(COMMIT),
    );
    begun?;
    let rows = rows?;
    committed?;
    Ok(rows)
}

/// Refuses to send a lock statement once its `not_after` has passed: the server
/// would refuse it (or, were the bound wrong, let it act late), and the caller
/// has stopped waiting. Checked when the call starts and again just before the
/// statement goes out, since waiting for a connection, a clock reading or the
/// statement's first Parse round trip can take it past not_after; the backend's
/// acquire task, which outlives a caller who gave up, would otherwise send it
/// once a frozen path thawed.
fn check_not_passed(not_after: Instant) -> std::result::Result<(), Failure> {
    if Instant::now() >= not_after {
        return Err(Failure::Passed);
    }
    Ok(())
}

/// A pooled connection that goes back to the pool only through [`done`](Self::done):
/// dropped any other way (the call failed with a lost session, timed out, or its
/// future was dropped) it is closed, so no later call inherits a dead session or
/// an answer still in flight.
struct DiscardUnlessDone(Option<Object>);

impl DiscardUnlessDone {
    fn get(&self) -> &Object {
        self.0.as_ref().expect("present until done or dropped")
    }

    fn done(mut self) {
        drop(self.0.take());
    }
}

impl Drop for DiscardUnlessDone {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(Object::take(conn));
        }
    }
}

/// Marks one acquire of (key, token) as running until dropped, so a release of
/// the same token can wait for it (see `try_acquire`).
struct InFlight {
    inner: Arc<Inner>,
    slot: (LockKey, Token),
}

impl InFlight {
    fn start(inner: &Arc<Inner>, key: &LockKey, token: Token) -> Self {
        let slot = (key.clone(), token);
        let mut map = inner
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(slot.clone())
            .or_insert_with(|| watch::channel(0).0)
            .send_modify(|running| *running += 1);
        Self {
            inner: inner.clone(),
            slot,
        }
    }

    /// Waits (within the call timeout) until no acquire of (key, token) runs.
    async fn wait(inner: &Inner, key: &LockKey, token: &Token) {
        let running = {
            let map = inner
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            map.get(&(key.clone(), *token))
                .map(watch::Sender::subscribe)
        };
        if let Some(mut running) = running {
            // An error means the count reached zero and the entry is gone.
            let _ = tokio::time::timeout(inner.call_timeout, running.wait_for(|n| *n == 0)).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = map.get(&self.slot) {
            running.send_modify(|n| *n = n.saturating_sub(1));
            if *running.borrow() == 0 {
                map.remove(&self.slot);
            }
        }
    }
}

enum Released {
    Now,
    Before,
    NotHeld,
}

fn check_owner(owner: &str) -> Result<()> {
    if owner.len() > MAX_OWNER_LEN || owner.contains('\0') {
        return Err(Error::InvalidConfig {
            reason: format!("owner text must be at most {MAX_OWNER_LEN} bytes without NUL"),
        });
    }
    Ok(())
}

/// Extend refused in a failover quarantine: transient, since the quarantine
/// ends, though not within the lease (a lease never outlives it).
fn quarantined(key: &LockKey, left_us: i64) -> Error {
    Error::backend(
        format!(
            "lock {key} not renewed: PostgreSQL was promoted, and the failover quarantine \
             has {:?} left",
            micros(left_us)
        ),
        true,
    )
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

#[async_trait]
impl LockBackend for PostgresBackend {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        check_owner(owner)?;
        // The statement runs in a task of its own, so dropping this future does not
        // abandon it half-way: it commits or fails, and a release of the same token
        // (such as the background release of a cancelled acquire) waits for it
        // first (`InFlight`). Otherwise that release could run on another
        // connection before the abandoned acquire commits, find nothing to release,
        // and leave the lock held until its ttl.
        //
        // The not_after bound does not make this unnecessary. It stops an acquire
        // that reaches the server late, but not one that read its clock in time and
        // is still waiting, for a row lock or for its commit (a slow disk, a
        // synchronous standby), when the release runs: core's cleanup once the
        // acquire's not_after has passed, or a caller who dropped this future. The
        // server cannot order that release after it: the release's WHERE (this
        // token, live) is false on the row version its snapshot sees (the previous
        // holder's, or no row at all for a key's first acquisition; an UPDATE never
        // waits for an uncommitted insert), so it answers NotHeld at once without
        // waiting for the row lock, and the acquire then commits a lease nobody
        // holds. Tests: release_waits_for_an_abandoned_acquire_of_the_same_token
        // and release_after_the_bound_waits_for_an_abandoned_first_acquire_still_
        // committing both fail without the wait. Only this backend's own acquires
        // are ordered this way; another process's rely on the bound alone.
        let pending = InFlight::start(&self.inner, key, *token);
        let backend = self.clone();
        let (key, token, owner) = (key.clone(), *token, owner.to_owned());
        let task = tokio::spawn(async move {
            let _pending = pending;
            backend
                .acquire_once(&key, &token, ttl, &owner, not_after)
                .await
        });
        task.await.unwrap_or_else(|e| {
            Err(Error::Backend {
                message: format!("the acquire task failed: {e}"),
                transient: false,
                source: None,
            })
        })
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let ttl_us = ttl.as_micros();
        let params: [&(dyn ToSql + Sync); 3] = [&key.as_str(), token.as_uuid(), &ttl_us];
        match self
            .run(
                &self.inner.sql.extend,
                EXTEND_TYPES,
                &params,
                Some(not_after),
            )
            .await
        {
            Ok(answer) => self.extend_outcome(key, &answer, ttl),
            Err(failure) => Err(failure.into_error(self)),
        }
    }

    /// One statement for the whole batch (see the type's docs: safe to run twice,
    /// like `extend`).
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = leases.iter().map(|(key, _)| key.as_str()).collect();
        let tokens: Vec<uuid::Uuid> = leases.iter().map(|(_, token)| *token.as_uuid()).collect();
        let ttl_us = ttl.as_micros();
        let params: [&(dyn ToSql + Sync); 3] = [&keys, &tokens, &ttl_us];
        let answer = self
            .run(
                &self.inner.sql.extend_many,
                EXTEND_MANY_TYPES,
                &params,
                Some(not_after),
            )
            .await
            .map_err(|f| f.into_error(self))?;
        // Every row carries the same gate; refused by it, no lease was renewed.
        if let Some(row) = answer.rows.first()
            && let Some(left) = self.gate(row, ttl)?
        {
            return Ok(leases
                .iter()
                .map(|(key, _)| Err(quarantined(key, left)))
                .collect());
        }
        let mut renewed: HashSet<(&str, uuid::Uuid)> = HashSet::with_capacity(answer.rows.len());
        let mut busy: HashSet<(&str, uuid::Uuid)> = HashSet::new();
        for row in &answer.rows {
            let key: Option<&str> = row.try_get("lock_key").map_err(|e| self.error(e))?;
            let token: Option<uuid::Uuid> = row.try_get("token").map_err(|e| self.error(e))?;
            let locked: bool = row.try_get("busy").map_err(|e| self.error(e))?;
            // One row of NULLs when nothing was renewed.
            if let (Some(key), Some(token)) = (key, token) {
                if locked {
                    busy.insert((key, token));
                } else {
                    renewed.insert((key, token));
                }
            }
        }
        let server_time = answer.server_time();
        Ok(leases
            .iter()
            .map(|(key, token)| {
                let pair = (key.as_str(), *token.as_uuid());
                if renewed.contains(&pair) {
                    Ok(server_time)
                } else if busy.contains(&pair) {
                    // Neither renewed nor gone: the manager retries it alone.
                    Err(Error::backend(
                        format!("the row of {key} is locked by another transaction; not renewed"),
                        true,
                    ))
                } else {
                    Err(Error::NotHeld { key: key.clone() })
                }
            })
            .collect())
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        InFlight::wait(&self.inner, key, token).await;
        let channel = self.inner.sql.channel.as_str();
        let params: [&(dyn ToSql + Sync); 3] = [&key.as_str(), token.as_uuid(), &channel];
        let answer = self
            .run(
                &self.inner.sql.release,
                RELEASE_TYPES,
                &params,
                Some(not_after),
            )
            .await
            .map_err(|f| f.into_error(self))?;
        match self.release_outcome(&answer)? {
            Released::Now => {}
            // The first run's session was lost before it answered, so it may have
            // released the lease and committed. Then the retry finds this token's
            // row released (`Before`), or, once a waiter woken by that release's
            // NOTIFY has taken the key, another token's lease (`NotHeld`): both
            // are the first run's success, and NotHeld would tell the caller that
            // it lost a lock it held to the end. If the first run did not go
            // through, the retry's NotHeld means the lease had already run out;
            // the retry cannot tell the two apart, and Ok still states what the
            // caller needs: no live lease of this token is left. (Nor can the
            // first run take effect later: its not_after bounds it.)
            Released::Before | Released::NotHeld if answer.retried => {}
            Released::Before | Released::NotHeld => {
                return Err(Error::NotHeld { key: key.clone() });
            }
        }
        // Waiters in this process need not wait for the LISTEN round trip.
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let params: [&(dyn ToSql + Sync); 1] = [&key.as_str()];
        let answer = self
            .run(&self.inner.sql.inspect, INSPECT_TYPES, &params, None)
            .await
            .map_err(|f| f.into_error(self))?;
        answer
            .rows
            .first()
            .map(|row| self.lock_info(row))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let answer = self
            .run(&self.inner.sql.list, &[], &[], None)
            .await
            .map_err(|f| f.into_error(self))?;
        answer.rows.iter().map(|row| self.lock_info(row)).collect()
    }

    async fn create_table(&self) -> Result<()> {
        let ddl = &self.inner.create_table;
        let call = async {
            let conn = self
                .inner
                .pool
                .get()
                .await
                .map_err(|e| from_pool(e, &self.inner.table))?;
            match conn.batch_execute(ddl).await {
                Ok(()) => Ok(()),
                // duplicate_table / unique_violation on the catalog: someone without
                // our advisory lock (another tool) created it at the same moment. It
                // exists now, so IF NOT EXISTS makes the second run a no-op.
                Err(e) if matches!(e.code().map(|c| c.code()), Some("42P07" | "23505")) => {
                    conn.batch_execute(ddl).await.map_err(|e| self.error(e))
                }
                Err(e) => Err(self.error(e)),
            }
        };
        tokio::time::timeout(self.inner.call_timeout, call)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }

    fn schema_sql(&self) -> String {
        format!("{};\n", self.inner.sql.create_table)
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.inner.notifier)
    }
}

impl fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = self.inner.pool.status();
        f.debug_struct("PostgresBackend")
            .field("table", &self.inner.table)
            .field("connection", &self.inner.config.pg.as_ref().map(Redacted))
            .field("pool_size", &status.max_size)
            .field("pool_open", &status.size)
            .field("listening", &self.inner.listener.is_some())
            .field("pooler", &self.inner.config.pooler())
            .finish()
    }
}
