//! [`PostgresBackend`]: the type, how it is built (a pool, its session setup,
//! the release listener) and its inherent calls. How each call reaches the
//! server is in `calls`, the [`LockBackend`](distrlock_core::LockBackend) impl in
//! `lock_backend`.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use distrlock_core::server_clock::ServerClock;
use distrlock_core::{
    AcquireOutcome, Error, LockKey, ReleaseNotifier, Result, TableName, Token, Ttl,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::GenericClient;
use tokio_postgres::types::ToSql;

use crate::config::{Pooler, PostgresConfig, Redacted, clock_reading};
use crate::connect::Connector;
use crate::error::{from_pg, from_pool};
use crate::listener::Listener;
use crate::lock_backend::{Released, check_owner};
use crate::sql::{ACQUIRE_TYPES, CLOCK_READING, EXTEND_TYPES, Failover, RELEASE_TYPES, Statements};

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
///   Expiry is computed on the server with `clock_timestamp()`. A connection
///   whose statements someone deallocated (`DEALLOCATE ALL` or `DISCARD ALL`
///   on it, through [`pool`](Self::pool) say) is closed at the first call that
///   finds one gone, and that call runs once more on a new connection (nothing
///   ran: the server refused the statement's name).
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
/// - **Cancel safety.** A try-acquire whose future is dropped with its statement
///   in the server leaves its connection marked in flight until the statement
///   has ended (a task sends one more query on it and waits for the answer), and
///   a release of the same token waits for that first (within the call timeout).
///   One dropped before its statement went out never sends it. So the background release
///   that core sends for a cancelled acquire cannot overtake the acquire on another
///   connection and leave the lock held until its ttl: not even one whose
///   statement read its clock before its `not_after` and is still committing when
///   the release comes, which the server alone would not order after it. Other
///   calls whose future is dropped part-way discard their connection rather than
///   return it to the pool with an answer still in flight.
#[derive(Clone)]
pub struct PostgresBackend {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) table: TableName,
    pub(crate) sql: Statements,
    pub(crate) notifier: ReleaseNotifier,
    pub(crate) listener: Option<tokio::task::AbortHandle>,
    pub(crate) call_timeout: Duration,
    /// Behind a transaction pooler, what opens each call's own transaction
    /// (`BEGIN; SET LOCAL …`); `None` otherwise.
    pub(crate) begin: Option<String>,
    /// What `create_table` sends: the DDL under its advisory lock, behind a
    /// transaction pooler after the `SET LOCAL`s.
    pub(crate) create_table: String,
    pub(crate) config: PostgresConfig,
    /// Acquires still running, by key and token (see [`InFlight`](crate::lock_backend::InFlight)).
    pub(crate) in_flight: Mutex<HashMap<(LockKey, Token), watch::Sender<usize>>>,
    /// The statements prepared on each pooled connection.
    pub(crate) prepared: crate::prepared::Prepared,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

impl PostgresBackend {
    /// The DDL that [`create_table`](distrlock_core::LockBackend::create_table) runs for `table`,
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
    /// [`create_table`](distrlock_core::LockBackend::create_table).
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
                prepared: Default::default(),
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

    /// Like [`try_acquire`](distrlock_core::LockBackend::try_acquire), inside your own transaction
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
    /// [`inspect`](distrlock_core::LockBackend::inspect) the key first.
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
        // A plain try: it never takes a ticket, since the ticket's write would
        // hold its row's lock until your transaction ends, and the holder's
        // extend with it. It keeps to the line like any plain try.
        let (mode, ticket) = crate::lock_backend::line_params(None);
        let params: [&(dyn ToSql + Sync); 6] = [
            &key.as_str(),
            token.as_uuid(),
            &ttl_us,
            &owner,
            &mode,
            &ticket,
        ];
        let answer = self
            .run_in(client, &self.inner.sql.acquire_in, ACQUIRE_TYPES, &params)
            .await
            .map_err(|f| f.into_error(self))?;
        Ok(self.acquire_outcome(&answer, ttl)?.outcome)
    }

    /// Like [`extend`](distrlock_core::LockBackend::extend), inside your own transaction, with the
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

    /// Like [`release`](distrlock_core::LockBackend::release), inside your own transaction, with
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
