//! [`MySqlBackend`]: the [`LockBackend`] on MySQL and MariaDB.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::server_clock::from_unix_micros;
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, MAX_OWNER_LEN,
    ReleaseNotifier, Result, TableName, Token, Ttl,
};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Error as MyError, Opts, Pool, Row, Value};
use tokio::time::Instant;

use crate::config::{MySqlConfig, Settings};
use crate::error::{
    self, is_connection_error, is_deadlock, is_lock_wait_timeout, is_pinned_clock_refusal,
};
use crate::sql::{self, Statements};

/// Locks stored as rows of one table in MySQL 5.7/8.x or MariaDB ≥ 10.5, through a
/// [`mysql_async`] connection pool.
///
/// Acquire, extend and release are each one prepared statement and one round trip
/// (see "Statements" in the crate docs). Cloning is cheap and clones
/// share the pool.
///
/// Build one with [`connect`](Self::connect) (a URL),
/// [`from_opts`](Self::from_opts) ([`mysql_async::Opts`]),
/// [`from_pool`](Self::from_pool) (your own [`mysql_async::Pool`]), or
/// [`MySqlConfig`] for every other setting.
///
/// # Connections that break
///
/// When a statement fails because its connection broke (the server killed the
/// session, restarted, or the network reset it) or because the server chose it as
/// a deadlock victim, the backend retries it once on a connection that has just
/// answered a ping, discarding dead pooled connections on the way. This is safe
/// because every statement is idempotent for its caller: a same-token acquire
/// renews and reports the same fence, and extend is guarded by the token. A
/// release whose retry finds nothing to release may have succeeded the first
/// time, so it reports the first error (transient) instead of
/// [`Error::NotHeld`]. Statements that ran into a timeout are not retried, so
/// every call stays bounded.
///
/// # Rows locked by another transaction
///
/// A statement waits for a row lock held by another transaction (an
/// uncommitted [`try_acquire_in`](Self::try_acquire_in), a `SELECT … FOR
/// UPDATE`) at most [`MySqlConfig::lock_wait_timeout`]; then the server rolls
/// it back (error 1205) and nothing has changed. A
/// [`try_acquire`](LockBackend::try_acquire) answers that with
/// [`AcquireOutcome::Held`] and no remaining lease: someone else is busy with
/// the key, as on PostgreSQL, and a waiting acquire backs off and tries again.
/// For [`extend`](LockBackend::extend), [`extend_many`](LockBackend::extend_many)
/// (the whole batch) and [`release`](LockBackend::release) it is a transient
/// [`Error::Backend`]: the lease is as it was, and the caller learns nothing
/// about it, so neither "held" nor [`Error::NotHeld`] would be honest. The same
/// goes for a metadata-lock wait (a DDL statement on the table), which fails
/// with the same error.
///
/// # A pinned session clock
///
/// Leases run on the server's clock as each statement reads it
/// (`UTC_TIMESTAMP(6)`), which a session can pin with `SET @@timestamp = …`:
/// then every lease it writes ends at the wrong time, and it judges other
/// leases on the wrong clock. Acquire, extend (single and batched) and release
/// check in the same statement that the session's clock is the server's real
/// one (`SYSDATE()`, which cannot be pinned), within
/// [`MySqlConfig::clock_tolerance`]; otherwise they change nothing and fail with
/// [`Error::InvalidConfig`], on the pool (whose sessions a setup statement of
/// yours may have pinned) and on your own connection alike. `InvalidConfig`,
/// because the cause is the session's setting, not the database, and no retry
/// helps until `SET @@timestamp = DEFAULT`. See "A pinned session clock" in
/// the source of `sql.rs` for how, and for what it cannot detect (a clock
/// pinned within the tolerance, servers started with `--sysdate-is-now`).
///
/// # Release notifications
///
/// [`release_notifier`](LockBackend::release_notifier) announces the releases
/// made through this backend (and its clones), so waiters in this process wake
/// at once. MySQL has no `LISTEN`; waiters in other processes find a release by
/// polling, and they sleep no longer than the remaining lease a refused acquire
/// reports.
#[derive(Clone)]
pub struct MySqlBackend {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    owns_pool: bool,
    server: Option<String>,
    settings: Settings,
    sql: Statements,
    notifier: ReleaseNotifier,
}

impl MySqlBackend {
    /// Connects to `url` with the default [`MySqlConfig`] (table
    /// `distributed_locks`), checking that a connection opens.
    ///
    /// ```no_run
    /// # async fn demo() -> distrlock_core::Result<()> {
    /// let backend = distrlock_mysql::MySqlBackend::connect("mysql://app:secret@db:3306/app").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<Self> {
        MySqlConfig::new().connect(url).await
    }

    /// A backend on a new pool from `opts`, with the default [`MySqlConfig`]; it
    /// connects on first use. See [`MySqlConfig::build`].
    pub fn from_opts(opts: impl Into<Opts>) -> Result<Self> {
        MySqlConfig::new().build(opts)
    }

    /// A backend on your own `pool`, with the default [`MySqlConfig`]. See
    /// [`MySqlConfig::build_with_pool`] for what the pool should be set up with.
    pub fn from_pool(pool: Pool) -> Result<Self> {
        MySqlConfig::new().build_with_pool(pool)
    }

    /// The DDL that [`create_table`](LockBackend::create_table) runs for `table`,
    /// without connecting: for migration tools and `distrlock schema`.
    pub fn schema_sql_for(table: &TableName) -> String {
        format!(
            "{};\n",
            Statements::new(table, MySqlConfig::new().clock_tolerance()).create_table
        )
    }

    /// A config to build a backend with other settings.
    pub fn builder() -> MySqlConfig {
        MySqlConfig::new()
    }

    pub(crate) fn new(
        pool: Pool,
        owns_pool: bool,
        server: Option<String>,
        settings: Settings,
    ) -> Self {
        let sql = Statements::new(&settings.table, settings.clock_tolerance);
        Self {
            inner: Arc::new(Inner {
                pool,
                owns_pool,
                server,
                settings,
                sql,
                notifier: ReleaseNotifier::new(),
            }),
        }
    }

    /// The pool the backend takes its connections from.
    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.inner.settings.table
    }

    /// The settings the backend was built with.
    pub fn config(&self) -> &MySqlConfig {
        &self.inner.settings.config
    }

    /// Closes the connections of a pool this backend created, waiting for
    /// borrowed ones to come back; every clone becomes unusable. Does nothing for
    /// a pool passed to [`from_pool`](Self::from_pool): that one is yours to close.
    pub async fn disconnect(&self) -> Result<()> {
        if self.inner.owns_pool {
            self.inner
                .pool
                .clone()
                .disconnect()
                .await
                .map_err(|e| self.map(e, "disconnect"))?;
        }
        Ok(())
    }

    /// Tries once to acquire `key`, on `conn`: your own connection, or a
    /// transaction you opened on it ([`mysql_async::Transaction`]).
    ///
    /// It runs the same statement as [`LockBackend::try_acquire`], with the same
    /// outcomes, but without the backend's retries and client-side timeouts: the
    /// connection's own session settings bound it (see
    /// [`MySqlConfig::session_setup_sql`]). A row-lock wait past your session's
    /// `innodb_lock_wait_timeout` is an error here (1205, transient), not
    /// [`AcquireOutcome::Held`]: with `innodb_rollback_on_timeout` the server
    /// rolls back your whole transaction, which you need to know. Inside a
    /// transaction:
    ///
    /// - the acquisition is undone if the transaction rolls back, and other
    ///   sessions see it only once it commits; until then they wait on the row
    ///   lock (up to their `innodb_lock_wait_timeout`), so commit promptly;
    /// - **the fence counts only once the transaction commits.** A rolled-back
    ///   acquire never happened: its fence is not kept anywhere, and the next
    ///   acquisition of the key may be handed the same fence number. Present
    ///   the fence to anything outside the transaction (a storage service that
    ///   rejects stale fences) only after the commit succeeded; if the commit's
    ///   outcome is unknown (the connection broke during `COMMIT`),
    ///   [`inspect`](LockBackend::inspect) the key first;
    /// - the lease is counted from the statement, not from the commit;
    /// - a *refused* try also locks the holder's row until your transaction ends
    ///   (InnoDB locks the duplicate row of every `INSERT … ON DUPLICATE KEY
    ///   UPDATE`): the holder's extends wait on it and fail after their
    ///   `innodb_lock_wait_timeout`, so on `Held` roll back or commit at once;
    /// - like any statement that calls `LAST_INSERT_ID(expr)`, it sets the
    ///   session's `LAST_INSERT_ID()`: read your own generated ids before calling it.
    ///
    /// A session whose clock is pinned (`SET @@timestamp = …`) gets
    /// [`Error::InvalidConfig`] and nothing changes (see "A pinned session
    /// clock" on the type). So do sessions that wait longer than
    /// [`MySqlConfig::clock_tolerance`] for the table's metadata lock: bound
    /// `lock_wait_timeout` with [`MySqlConfig::session_setup_sql`].
    pub async fn try_acquire_in<Q: Queryable>(
        &self,
        conn: &mut Q,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
    ) -> Result<AcquireOutcome> {
        let call = self.acquire_call(key, token, ttl, owner)?;
        let reply = execute(conn, &call)
            .await
            .map_err(|e| self.map(e, "acquire"))?;
        acquire_outcome(key, reply)
    }

    /// Releases `key` on `conn`: your own connection, or a transaction on it.
    ///
    /// The same statement as [`LockBackend::release`], without retries or
    /// client-side timeouts. Inside a transaction the release takes effect at
    /// commit, and a rollback keeps the lease and its fence as they were (the
    /// fence of an acquisition made in the same transaction counts only if that
    /// transaction commits, see [`try_acquire_in`](Self::try_acquire_in)). It is
    /// not announced on the
    /// [`release_notifier`](LockBackend::release_notifier), since the backend
    /// cannot tell when (or whether) you commit.
    ///
    /// A session whose clock is pinned (`SET @@timestamp = …`) gets
    /// [`Error::InvalidConfig`] and the lease stays as it is (see "A pinned
    /// session clock" on the type); so does a release that waited longer than
    /// [`MySqlConfig::clock_tolerance`] for locks, which
    /// [`MySqlConfig::session_setup_sql`] rules out.
    pub async fn release_in<Q: Queryable>(
        &self,
        conn: &mut Q,
        key: &LockKey,
        token: &Token,
    ) -> Result<()> {
        let call = self.release_call(key, token);
        let reply = execute(conn, &call)
            .await
            .map_err(|e| self.map(e, "release"))?;
        self.guarded_outcome(key, reply, "release")
    }

    /// Opens (or borrows) one connection within the connect timeout, to check
    /// that the server can be reached.
    pub(crate) async fn check_connection(&self) -> Result<()> {
        let conn = self.checkout(false).await?;
        drop(conn);
        Ok(())
    }

    fn map(&self, error: MyError, what: &str) -> Error {
        if is_pinned_clock_refusal(&error) {
            return self.pinned_clock(what);
        }
        error::map(error, &self.inner.settings.table, what)
    }

    fn pinned_clock(&self, what: &str) -> Error {
        error::pinned_clock(what, self.inner.settings.clock_tolerance)
    }

    /// Reads the answer of extend or release (see [`guarded_outcome`]).
    fn guarded_outcome(&self, key: &LockKey, reply: Reply, what: &str) -> Result<()> {
        match guarded_outcome(key, reply, what)? {
            Guarded::Matched => Ok(()),
            Guarded::NotHeld => Err(Error::NotHeld { key: key.clone() }),
            Guarded::PinnedClock => Err(self.pinned_clock(what)),
        }
    }

    fn acquire_call(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
    ) -> Result<Call<'_>> {
        if owner.len() > MAX_OWNER_LEN || owner.contains('\0') {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "an owner text is at most {MAX_OWNER_LEN} bytes without NUL, this one has {} bytes",
                    owner.len()
                ),
            });
        }
        let (key, token, owner, ttl) = (
            key_value(key),
            token_value(token),
            Value::from(owner),
            Value::from(ttl.as_micros()),
        );
        Ok(Call::Write {
            sql: &self.inner.sql.acquire,
            // The order of the placeholders in `sql::acquire`.
            params: vec![
                key,
                token.clone(),
                owner.clone(),
                ttl.clone(),
                token.clone(),
                token.clone(),
                owner,
                token.clone(),
                token,
                ttl,
            ],
        })
    }

    fn release_call(&self, key: &LockKey, token: &Token) -> Call<'_> {
        Call::Write {
            sql: &self.inner.sql.release,
            params: vec![key_value(key), token_value(token)],
        }
    }

    /// Runs `call` on a pooled connection, retrying once after a broken
    /// connection or a deadlock (see the type's docs).
    async fn run(&self, what: &'static str, call: &Call<'_>) -> Result<Ran> {
        self.run_unmapped(what, call)
            .await
            .map_err(|failed| failed.into_error(self, what))
    }

    /// [`run`](Self::run), leaving the last failure unmapped for callers that
    /// read some server errors as an answer.
    async fn run_unmapped(&self, what: &'static str, call: &Call<'_>) -> Result<Ran, Failed> {
        match self.attempt(call, false).await {
            Ok(reply) => Ok(Ran {
                reply,
                retried_after: None,
            }),
            Err(Failed::Statement(e)) if is_connection_error(&e) || is_deadlock(&e) => {
                let first = self.map(e, what);
                tracing::debug!(table = %self.table(), %first, "{what} failed; retrying once on a verified connection");
                self.attempt(call, true).await.map(|reply| Ran {
                    reply,
                    retried_after: Some(first),
                })
            }
            Err(failed) => Err(failed),
        }
    }

    async fn attempt(&self, call: &Call<'_>, verify: bool) -> Result<Reply, Failed> {
        let mut conn = self.checkout(verify).await.map_err(Failed::Checkout)?;
        let timeout = self.inner.settings.call_timeout;
        match tokio::time::timeout(timeout, execute(&mut conn, call)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                // The driver already drops connections after I/O errors; a server
                // that reports the session gone needs the same.
                if is_connection_error(&e) {
                    discard(conn);
                }
                Err(Failed::Statement(e))
            }
            Err(_) => {
                // The answer may still come: this connection can never be reused.
                discard(conn);
                Err(Failed::TimedOut(timeout))
            }
        }
    }

    /// A connection from the pool within the connect timeout. With `verify`,
    /// each one must answer a ping first; dead ones (as after the server killed
    /// the pool's sessions) are discarded, at most the pool's size of them.
    async fn checkout(&self, verify: bool) -> Result<Conn> {
        let settings = &self.inner.settings;
        let deadline = Instant::now() + settings.connect_timeout;
        let timed_out = || {
            Error::unavailable(
                format!(
                    "no connection to the MySQL server within the connect timeout ({:?})",
                    settings.connect_timeout
                ),
                None,
            )
        };
        let mut discarded = 0;
        loop {
            let mut conn = match tokio::time::timeout_at(deadline, self.inner.pool.get_conn()).await
            {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(error::map_connect(e)),
                Err(_) => return Err(timed_out()),
            };
            if !verify {
                return Ok(conn);
            }
            let pool_size = conn.opts().pool_opts().constraints().max();
            match tokio::time::timeout_at(deadline, conn.ping()).await {
                Ok(Ok(())) => return Ok(conn),
                Ok(Err(e)) if is_connection_error(&e) && discarded < pool_size => {
                    discard(conn);
                    discarded += 1;
                }
                Ok(Err(e)) => {
                    discard(conn);
                    return Err(error::map_connect(e));
                }
                Err(_) => {
                    discard(conn);
                    return Err(timed_out());
                }
            }
        }
    }
}

/// One statement and its parameters, kept so that it can run again.
enum Call<'a> {
    /// An `INSERT`/`UPDATE` whose OK packet is the answer.
    Write { sql: &'a str, params: Vec<Value> },
    /// A `SELECT`.
    Read { sql: &'a str, params: Vec<Value> },
    /// DDL, sent as text (it is run once, so preparing it would only cost).
    Ddl { sql: &'a str },
}

enum Reply {
    /// Affected rows and the insert id, as a signed number (see `sql`).
    Written {
        affected: u64,
        id: i64,
    },
    Rows(Vec<Row>),
    Done,
}

struct Ran {
    reply: Reply,
    /// The error of a first attempt that was retried.
    retried_after: Option<Error>,
}

enum Failed {
    Checkout(Error),
    Statement(MyError),
    TimedOut(Duration),
}

impl Failed {
    fn into_error(self, backend: &MySqlBackend, what: &str) -> Error {
        match self {
            Failed::Checkout(error) => error,
            Failed::Statement(error) => backend.map(error, what),
            Failed::TimedOut(after) => Error::unavailable(
                format!("{what}: no answer from the MySQL server within {after:?}"),
                None,
            ),
        }
    }
}

/// Runs one call: prepared (cached per connection by the driver) for reads and
/// writes, so each is one round trip once the connection has prepared it.
async fn execute<Q: Queryable>(conn: &mut Q, call: &Call<'_>) -> mysql_async::Result<Reply> {
    match call {
        Call::Write { sql, params } => {
            let result = conn.exec_iter(*sql, params.clone()).await?;
            let affected = result.affected_rows();
            // The server sends the insert id as an unsigned 64-bit number; our
            // statements put signed values in it (see `sql`).
            let id = result.last_insert_id().unwrap_or(0) as i64;
            result.drop_result().await?;
            Ok(Reply::Written { affected, id })
        }
        Call::Read { sql, params } => {
            let rows = conn.exec(*sql, params.clone()).await?;
            Ok(Reply::Rows(rows))
        }
        Call::Ddl { sql } => {
            conn.query_drop(*sql).await?;
            Ok(Reply::Done)
        }
    }
}

/// Closes a connection that must not go back to the pool, in the background.
fn discard(conn: Conn) {
    tokio::spawn(async move {
        // `disconnect` marks the connection dead before writing, so even if this
        // times out the pool drops it instead of reusing it.
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.disconnect()).await;
    });
}

fn key_value(key: &LockKey) -> Value {
    Value::Bytes(key.as_str().as_bytes().to_vec())
}

fn token_value(token: &Token) -> Value {
    Value::Bytes(token.as_uuid().as_bytes().to_vec())
}

fn unexpected(what: &str, key: &LockKey, affected: u64, id: i64) -> Error {
    Error::permanent(
        format!(
            "{what} of {key}: unexpected answer from the server (affected rows {affected}, insert id {id}); \
             is something between the client and the server rewriting OK packets?"
        ),
        std::io::Error::other("unexpected OK packet"),
    )
}

/// Reads the acquire statement's answer (see `sql` for the encoding).
fn acquire_outcome(key: &LockKey, reply: Reply) -> Result<AcquireOutcome> {
    let (affected, id) = reply.written("acquire")?;
    match id {
        // 1: inserted; 2: taken over or renewed; 0: renewed to the same expiry.
        1.. if affected <= 2 => Ok(AcquireOutcome::Acquired {
            fence: Fence::new(id),
            // Not yet the statement's own reading: this process's clock, for now.
            server_time: SystemTime::now(),
        }),
        // 0 without found-rows, 1 with it.
        ..=-2 if affected <= 1 => {
            let micros = u64::try_from(-1 - i128::from(id)).unwrap_or(u64::MAX);
            Ok(AcquireOutcome::Held {
                remaining: Some(Duration::from_micros(micros)),
            })
        }
        _ => Err(unexpected("acquire", key, affected, id)),
    }
}

/// What extend or release found (see `sql` for the encoding).
#[derive(Debug, PartialEq, Eq)]
enum Guarded {
    /// The token's live lease: extended or released.
    Matched,
    /// No live lease of the token; nothing changed.
    NotHeld,
    /// The session's clock is pinned; nothing changed.
    PinnedClock,
}

/// Reads the answer of extend or release: the fence when the token's live lease
/// matched, 0 when nothing did, −1 when the session's clock is pinned.
fn guarded_outcome(key: &LockKey, reply: Reply, what: &str) -> Result<Guarded> {
    let (affected, id) = reply.written(what)?;
    match id {
        1.. if affected <= 1 => Ok(Guarded::Matched),
        0 if affected == 0 => Ok(Guarded::NotHeld),
        -1 if affected == 0 => Ok(Guarded::PinnedClock),
        _ => Err(unexpected(what, key, affected, id)),
    }
}

impl Reply {
    /// The OK packet of a write. `execute` answers every write call with one;
    /// anything else is reported as an error rather than trusted.
    fn written(self, what: &str) -> Result<(u64, i64)> {
        match self {
            Reply::Written { affected, id } => Ok((affected, id)),
            _ => Err(mismatched(what)),
        }
    }

    /// The rows of a read.
    fn rows(self, what: &str) -> Result<Vec<Row>> {
        match self {
            Reply::Rows(rows) => Ok(rows),
            _ => Err(mismatched(what)),
        }
    }
}

fn mismatched(what: &str) -> Error {
    Error::permanent(
        format!("{what}: the statement answered in an unexpected form"),
        std::io::Error::other("unexpected reply"),
    )
}

type InfoRow = (Vec<u8>, String, i64, i64, Option<i64>, Option<i64>);

fn lock_info(row: Row, table: &TableName) -> Result<LockInfo> {
    let corrupt = |reason: String| {
        Error::permanent(
            format!("lock table {table} holds a row this backend cannot read: {reason}"),
            std::io::Error::other("unreadable row"),
        )
    };
    let (key, owner, fence, acquired, expires, remaining): InfoRow =
        mysql_async::from_row_opt(row).map_err(|e| corrupt(e.to_string()))?;
    let key = String::from_utf8(key).map_err(|_| corrupt("a key is not UTF-8".into()))?;
    let key = LockKey::new(key).map_err(|e| corrupt(e.to_string()))?;
    let (state, remaining) = match (expires, remaining) {
        (None, _) => (LockState::Released, None),
        (Some(_), Some(left)) if left > 0 => (
            LockState::Held,
            Some(Duration::from_micros(left.unsigned_abs())),
        ),
        (Some(_), _) => (LockState::Expired, None),
    };
    Ok(LockInfo {
        key,
        owner,
        fence: Fence::new(fence),
        acquired_at: from_unix_micros(acquired),
        expires_at: expires.map(from_unix_micros),
        state,
        remaining,
    })
}

#[async_trait]
impl LockBackend for MySqlBackend {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        _not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let call = self.acquire_call(key, token, ttl, owner)?;
        match self.run_unmapped("acquire", &call).await {
            Ok(ran) => acquire_outcome(key, ran.reply),
            // Waited out the row-lock bound on a row another transaction holds
            // (an uncommitted acquire, a `SELECT … FOR UPDATE`): the statement was
            // rolled back, so nothing changed, and someone else is busy with the
            // key. The same answer as PostgreSQL's for its `lock_timeout`.
            Err(Failed::Statement(e)) if is_lock_wait_timeout(&e) => {
                Ok(AcquireOutcome::Held { remaining: None })
            }
            Err(failed) => Err(failed.into_error(self, "acquire")),
        }
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        _not_after: Instant,
    ) -> Result<SystemTime> {
        let call = Call::Write {
            sql: &self.inner.sql.extend,
            params: vec![
                Value::from(ttl.as_micros()),
                key_value(key),
                token_value(token),
            ],
        };
        let ran = self.run("extend", &call).await?;
        self.guarded_outcome(key, ran.reply, "extend")?;
        // Not yet the statement's own reading: this process's clock, for now.
        Ok(SystemTime::now())
    }

    /// One `UPDATE` per 1,024 distinct leases when every lease is renewed (the
    /// usual case); when the affected-rows count shows that some were not, each
    /// lease of the batch is asked again with [`extend`](LockBackend::extend),
    /// which renews the live ones once more and reports the others as not held.
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let mut seen = std::collections::HashSet::with_capacity(leases.len());
        let distinct: Vec<&(LockKey, Token)> =
            leases.iter().filter(|lease| seen.insert(*lease)).collect();
        let table = self.table().quoted('`');
        let mut all_renewed = true;
        for chunk in distinct.chunks(sql::EXTEND_MANY_SLOTS) {
            let slots = chunk.len().next_power_of_two();
            let padded = || {
                chunk
                    .iter()
                    .chain(std::iter::repeat(&chunk[chunk.len() - 1]))
            };
            let mut params = Vec::with_capacity(1 + 3 * slots);
            params.push(Value::from(ttl.as_micros()));
            params.extend(padded().take(slots).map(|(key, _)| key_value(key)));
            for (key, token) in padded().take(slots) {
                params.push(key_value(key));
                params.push(token_value(token));
            }
            let sql = sql::extend_many(&table, slots, &self.inner.sql.real_clock);
            let ran = self
                .run("extend", &Call::Write { sql: &sql, params })
                .await?;
            let (affected, id) = ran.reply.written("extend")?;
            if id == -1 {
                // A pinned session clock: a property of the session, not of a
                // lease, so the whole call fails.
                return Err(self.pinned_clock("extend"));
            }
            all_renewed &= affected == chunk.len() as u64;
        }
        if all_renewed {
            let now = SystemTime::now();
            return Ok(leases.iter().map(|_| Ok(now)).collect());
        }
        let mut results = Vec::with_capacity(leases.len());
        for (key, token) in leases {
            results.push(self.extend(key, token, ttl, not_after).await);
        }
        Ok(results)
    }

    async fn release(&self, key: &LockKey, token: &Token, _not_after: Instant) -> Result<()> {
        let call = self.release_call(key, token);
        let ran = self.run("release", &call).await?;
        match (
            self.guarded_outcome(key, ran.reply, "release"),
            ran.retried_after,
        ) {
            (Ok(()), _) => {
                self.inner.notifier.notify(key);
                Ok(())
            }
            // The first attempt may have released it before its connection broke:
            // "not held" would be a guess, the first error is the honest answer.
            (Err(Error::NotHeld { .. }), Some(first)) => Err(first),
            (Err(error), _) => Err(error),
        }
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let call = Call::Read {
            sql: &self.inner.sql.inspect,
            params: vec![key_value(key)],
        };
        let rows = self.run("inspect", &call).await?.reply.rows("inspect")?;
        rows.into_iter()
            .next()
            .map(|row| lock_info(row, self.table()))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let call = Call::Read {
            sql: &self.inner.sql.list,
            params: Vec::new(),
        };
        let rows = self.run("list", &call).await?.reply.rows("list")?;
        rows.into_iter()
            .map(|row| lock_info(row, self.table()))
            .collect()
    }

    async fn create_table(&self) -> Result<()> {
        let call = Call::Ddl {
            sql: &self.inner.sql.create_table,
        };
        self.run("create table", &call).await?;
        Ok(())
    }

    fn schema_sql(&self) -> String {
        format!("{};\n", self.inner.sql.create_table)
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.inner.notifier)
    }
}

impl fmt::Debug for MySqlBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.inner.settings;
        f.debug_struct("MySqlBackend")
            .field("table", &settings.table)
            .field(
                "server",
                &self.inner.server.as_deref().unwrap_or("(external pool)"),
            )
            .field("connect_timeout", &settings.connect_timeout)
            .field("statement_timeout", &settings.config.statement_timeout)
            .field(
                "lock_wait_timeout_secs",
                &settings.config.lock_wait_timeout_secs(),
            )
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> LockKey {
        LockKey::new("k").unwrap()
    }

    fn written(affected: u64, id: i64) -> Reply {
        Reply::Written { affected, id }
    }

    #[test]
    fn reads_acquire_answers() {
        for (affected, id) in [(1, 1), (2, 7), (0, 7)] {
            assert!(matches!(
                acquire_outcome(&key(), written(affected, id)).unwrap(),
                AcquireOutcome::Acquired { fence, .. } if fence == Fence::new(id)
            ));
        }
        // Refused, with and without found-rows: remaining = -1 - id µs.
        for affected in [0, 1] {
            assert_eq!(
                acquire_outcome(&key(), written(affected, -1_500_001)).unwrap(),
                AcquireOutcome::Held {
                    remaining: Some(Duration::from_millis(1500))
                }
            );
        }
        for (affected, id) in [(0, 0), (0, -1), (3, 5), (2, -5)] {
            assert!(
                acquire_outcome(&key(), written(affected, id)).is_err(),
                "{affected} {id}"
            );
        }
    }

    #[test]
    fn reads_extend_and_release_answers() {
        let read = |affected, id| guarded_outcome(&key(), written(affected, id), "extend");
        assert_eq!(read(1, 3).unwrap(), Guarded::Matched);
        // Matched but unchanged (same expiry within one clock tick): still held.
        assert_eq!(read(0, 3).unwrap(), Guarded::Matched);
        assert_eq!(read(0, 0).unwrap(), Guarded::NotHeld);
        assert_eq!(read(0, -1).unwrap(), Guarded::PinnedClock);
        for (affected, id) in [(1, 0), (1, -1), (0, -2)] {
            assert!(read(affected, id).is_err(), "{affected} {id}");
        }
    }
}
