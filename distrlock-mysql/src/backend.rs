//! [`MySqlBackend`]: the [`LockBackend`] on MySQL and MariaDB.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::server_clock::{ServerClock, from_unix_micros};
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, Owner,
    ReleaseNotifier, Result, TableName, Token, Ttl,
};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Error as MyError, Opts, Pool, Row, Value};
use tokio::time::Instant;

use crate::config::{MySqlConfig, Settings};
use crate::error::{
    self, is_busy_for_try, is_connection_error, is_deadlock, is_lock_wait_timeout,
    is_node_not_ready,
};
use crate::sql::{
    self, AcquireAnswer, BatchAnswer, GuardedAnswer, LockWait, Refusal, Stamp, Statements, Verdict,
};

/// Locks stored as rows of one table in MySQL 5.7/8.x or MariaDB ≥ 10.5, through a
/// [`mysql_async`] connection pool.
///
/// Acquire, extend and release are each one prepared statement and one round trip
/// (see "Statements" in the crate docs), which also returns the statement's
/// reading of the server's clock; the backend's very first write reads that
/// clock once beforehand. Cloning is cheap and clones share the pool (and the
/// clock reading).
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
/// # No late effects
///
/// Acquire, extend (single and batched) and release change nothing if they
/// would take effect after their `not_after` (contract item 8 of
/// [`LockBackend`]), even when a network path that froze delivers the
/// statement long after the backend gave up on it. Each attempt, the retry
/// after a broken connection included, stops waiting shortly before
/// `not_after` (or at the call timeout, if that comes first), and sends that
/// instant on the server's clock as its bound, estimated from the latest
/// reading (rounded toward earlier, [`ServerClock`]): the statement compares
/// its own clock, as it reaches the row after any lock wait, with the bound.
/// A statement refused that way returns a transient [`Error::Unavailable`];
/// if the refusal came before our own clock reached `not_after`, the estimate
/// was off (the server's clock stepped), and the call is tried once more with
/// the reading the refusal brought. So once `not_after` has passed, a call
/// that has not answered never will take effect. One gap: an acquire of a key
/// *without a row* that waits for another transaction's lock on that key (an
/// uncommitted insert of the same key that is then rolled back, or a gap lock
/// of a range read) inserts with the values it computed before the wait, so
/// it can land up to [`MySqlConfig::lock_wait_timeout`] after its check.
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
/// A deadlock (1213) that is still one after the backend's retry gets the
/// same answer: on Galera that is a certification conflict, another node
/// having committed a write to the same row first.
/// For [`extend`](LockBackend::extend) and [`release`](LockBackend::release)
/// it is a transient [`Error::Backend`]: the lease is as it was, and the
/// caller learns nothing about it, so neither "held" nor [`Error::NotHeld`]
/// would be honest. The same goes for a metadata-lock wait (a DDL statement on
/// the table), which fails with the same error.
///
/// [`extend_many`](LockBackend::extend_many) renews the leases of a whole
/// manager at once, so one locked row must not cost the others: when a batch
/// meets a lock (at once on MariaDB for a ttl under 10 s; after waiting up to
/// one second for longer ones), the backend renews it again in quarters,
/// each without waiting on MariaDB (`SET STATEMENT innodb_lock_wait_timeout =
/// 0`), splitting only the quarters that hit a lock, down to the leases whose
/// rows are locked; those get the transient error, all others their answer.
/// One locked row among 1,000 leases costs about 20 statements. MySQL has no
/// per-statement lock wait below one second, so there each split level that
/// hits the lock waits the session's bound, and leases still unresolved at
/// `not_after` get a transient error (the manager tries them again soon, in a
/// smaller batch).
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
/// # Several hosts
///
/// A backend built from a URL with several hosts
/// ([`MySqlConfig::connect`]) or from [`MySqlConfig::build_hosts`] keeps one
/// pool per host and uses one host at a time, the first that accepts
/// connections. When getting a connection from it fails with a transient
/// error (refused, timed out, too many connections), the next hosts are tried
/// in turn, each within an equal share of the connect timeout left, and the
/// first that answers becomes the host in use. A statement that fails because
/// its node is not in the primary component (Galera's 1047/1180) moves the
/// backend to the next host too, and is retried there once, like a statement
/// whose connection broke. The backend never kills sessions by id, so no call
/// has to reach a particular node. On a Galera cluster set
/// [`MySqlConfig::max_clock_skew`]: the hosts have clocks of their own, and a
/// client that moves to another node sees its clock readings jump by their
/// difference (the manager's step detection notices a large one). Until the
/// new node's first answer brings its reading, the backend's estimate of the
/// server clock is the old node's: on a node whose clock trails it, a write
/// can take effect up to the difference after its `not_after` (contract item
/// 8 holds to within the nodes' clock difference); the lease it writes is
/// still bounded by its ttl, so at worst a key stays blocked that long.
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
    /// One pool per host, in the order given; one for a single server.
    pools: Vec<Pool>,
    /// The index of the host in use (see "Several hosts").
    current: AtomicUsize,
    owns_pool: bool,
    server: Option<String>,
    settings: Settings,
    sql: Statements,
    notifier: ReleaseNotifier,
    /// The latest reading of the server's clock, for the bounds of writes.
    clock: ServerClock,
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
            Statements::new(table, MySqlConfig::new().clock_tolerance(), Duration::ZERO)
                .create_table
        )
    }

    /// A config to build a backend with other settings.
    pub fn builder() -> MySqlConfig {
        MySqlConfig::new()
    }

    pub(crate) fn new(
        pools: Vec<Pool>,
        owns_pool: bool,
        server: Option<String>,
        settings: Settings,
    ) -> Self {
        assert!(!pools.is_empty(), "a backend has at least one pool");
        let sql = Statements::new(
            &settings.table,
            settings.clock_tolerance,
            settings.config.max_clock_skew,
        );
        Self {
            inner: Arc::new(Inner {
                pools,
                current: AtomicUsize::new(0),
                owns_pool,
                server,
                settings,
                sql,
                notifier: ReleaseNotifier::new(),
                clock: ServerClock::new(),
            }),
        }
    }

    /// The pool the backend takes its connections from: with several hosts,
    /// the one of the host in use now.
    pub fn pool(&self) -> &Pool {
        &self.inner.pools[self.current_host()]
    }

    /// With several hosts, the index (from 0, in the order given) of the host
    /// the backend uses now; 0 for a single server.
    pub fn current_host(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed) % self.inner.pools.len()
    }

    /// Moves from host `from` to host `to`, unless another call moved already.
    fn switch_host(&self, from: usize, to: usize, why: &dyn fmt::Display) {
        if from != to
            && self
                .inner
                .current
                .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                table = %self.table(),
                from = from,
                to = to,
                "moving to another MySQL host: {why}"
            );
        }
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.inner.settings.table
    }

    /// A `not_after` for calls without one (inspect, list, create table): both
    /// attempts within their connect and call timeouts.
    fn read_deadline(&self) -> Instant {
        let settings = &self.inner.settings;
        Instant::now() + 2 * (settings.connect_timeout + settings.call_timeout)
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
            for pool in &self.inner.pools {
                pool.clone()
                    .disconnect()
                    .await
                    .map_err(|e| self.map(e, "disconnect"))?;
            }
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
    /// - the lease is counted from the statement, not from the commit, and the
    ///   clock reading it returns is the statement's;
    /// - a *refused* try also locks the holder's row until your transaction ends
    ///   (InnoDB locks the duplicate row of every `INSERT … ON DUPLICATE KEY
    ///   UPDATE`): the holder's extends wait on it and fail after their
    ///   `innodb_lock_wait_timeout`, so on `Held` roll back or commit at once;
    /// - like any statement that calls `LAST_INSERT_ID(expr)`, it sets the
    ///   session's `LAST_INSERT_ID()`: read your own generated ids before calling it.
    ///
    /// There is no `not_after` here: when the statement takes effect is up to
    /// your commit. It still runs only within about 12 s of the backend's
    /// estimate of the server's clock (see "No late effects" on the type); if the estimate
    /// was off it retries once with a fresh one. The backend's first call of all
    /// reads the server's clock first, on `conn`.
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
        let mut refused = None;
        for _ in 0..2 {
            let reply = self
                .execute_in(conn, &call)
                .await
                .map_err(|e| self.map(e, "acquire"))?;
            match self.acquire_answer(key, reply)? {
                Answered::Done(outcome) => return Ok(outcome),
                Answered::Late(stamp, reading) => refused = Some((stamp, reading)),
            }
        }
        let (stamp, reading) = refused.expect("two refusals");
        Err(late("acquire", key, stamp, reading))
    }

    /// Releases `key` on `conn`: your own connection, or a transaction on it.
    ///
    /// The same statement as [`LockBackend::release`], without retries,
    /// client-side timeouts or a `not_after` bound. Inside a transaction the
    /// release takes effect at commit, and a rollback keeps the lease and its
    /// fence as they were (the fence of an acquisition made in the same
    /// transaction counts only if that transaction commits, see
    /// [`try_acquire_in`](Self::try_acquire_in)). It is not announced on the
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
        let reply = self
            .execute_in(conn, &call)
            .await
            .map_err(|e| self.map(e, "release"))?;
        match self.guarded_answer(key, reply, "release")? {
            Answered::Done(_) => Ok(()),
            // Only a bound can refuse it, and a release on your connection has none.
            Answered::Late(stamp, reading) => Err(late("release", key, stamp, reading)),
        }
    }

    /// Opens (or borrows) one connection within the connect timeout, to check
    /// that the server can be reached.
    pub(crate) async fn check_connection(&self) -> Result<()> {
        let deadline = Instant::now() + self.inner.settings.connect_timeout;
        let (conn, _) = self.checkout(false, deadline).await?;
        drop(conn);
        Ok(())
    }

    fn map(&self, error: MyError, what: &str) -> Error {
        error::map(error, &self.inner.settings.table, what)
    }

    fn pinned_clock(&self, what: &str) -> Error {
        error::pinned_clock(what, self.inner.settings.clock_tolerance)
    }

    /// Reads the acquire statement's answer (see `sql` for the encoding), and
    /// observes its clock reading.
    fn acquire_answer(&self, key: &LockKey, reply: Reply) -> Result<Answered<AcquireOutcome>> {
        let (affected, id, stamp, arrived) = reply.written("acquire")?;
        let answer = sql::decode_acquire(affected, id, stamp.reference)
            .ok_or_else(|| unexpected("acquire", key, affected, id))?;
        match answer {
            AcquireAnswer::Granted { fence, reading } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Done(AcquireOutcome::Acquired {
                    fence: Fence::new(fence),
                    server_time: from_unix_micros(reading),
                }))
            }
            AcquireAnswer::Held {
                remaining_us,
                reading,
            } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Done(AcquireOutcome::Held {
                    remaining: Some(Duration::from_micros(remaining_us.unsigned_abs())),
                }))
            }
            AcquireAnswer::Refused(refusal) => {
                self.refused(key, refusal, stamp, arrived, "acquire")
            }
        }
    }

    /// Reads the answer of extend or release (see `sql`), and observes its
    /// clock reading.
    fn guarded_answer(
        &self,
        key: &LockKey,
        reply: Reply,
        what: &str,
    ) -> Result<Answered<SystemTime>> {
        let (affected, id, stamp, arrived) = reply.written(what)?;
        let answer =
            sql::decode_guarded(affected, id).ok_or_else(|| unexpected(what, key, affected, id))?;
        match answer {
            GuardedAnswer::Matched { reading } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Done(from_unix_micros(reading)))
            }
            GuardedAnswer::NotHeld => Err(Error::NotHeld { key: key.clone() }),
            GuardedAnswer::Refused(refusal) => self.refused(key, refusal, stamp, arrived, what),
        }
    }

    /// A refusal: a late one is for the caller to retry or report; the others
    /// are errors.
    fn refused<T>(
        &self,
        key: &LockKey,
        refusal: Refusal,
        stamp: Stamp,
        arrived: Instant,
        what: &str,
    ) -> Result<Answered<T>> {
        match refusal {
            Refusal::Clock { reading } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Late(stamp, reading))
            }
            // A pinned clock's reading says nothing about the server's clock.
            Refusal::Pinned { .. } => Err(self.pinned_clock(what)),
            Refusal::FenceExhausted { reading } => {
                self.inner.clock.observe(arrived, reading);
                Err(Error::permanent(
                    format!(
                        "{what} of {key} refused: its next fence would exceed {}, the largest \
                         this backend can report; nothing was changed",
                        sql::MAX_FENCE
                    ),
                    std::io::Error::other("fence space exhausted"),
                ))
            }
        }
    }

    fn acquire_call(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
    ) -> Result<Call<'_>> {
        let owner = Owner::new(owner)?;
        let (key, token, owner, ttl) = (
            key_value(key),
            token_value(token),
            Value::from(owner.into_string()),
            Value::from(ttl.as_micros()),
        );
        Ok(Call::Write {
            sql: &self.inner.sql.acquire,
            params: Box::new(move |stamp| {
                sql::acquire_params(
                    key.clone(),
                    token.clone(),
                    owner.clone(),
                    ttl.clone(),
                    stamp,
                )
            }),
            window: true,
        })
    }

    fn extend_call(&self, key: &LockKey, token: &Token, ttl: Ttl) -> Call<'_> {
        let (key, token, ttl) = (
            key_value(key),
            token_value(token),
            Value::from(ttl.as_micros()),
        );
        Call::Write {
            sql: &self.inner.sql.extend,
            params: Box::new(move |stamp| {
                sql::extend_params(ttl.clone(), key.clone(), token.clone(), stamp)
            }),
            window: false,
        }
    }

    fn release_call(&self, key: &LockKey, token: &Token) -> Call<'_> {
        let (key, token) = (key_value(key), token_value(token));
        Call::Write {
            sql: &self.inner.sql.release,
            params: Box::new(move |stamp| sql::release_params(key.clone(), token.clone(), stamp)),
            window: false,
        }
    }

    /// The clock parameters of a write sent now that may take effect until
    /// `deadline` (`None`: whenever), within the offset window when `window`
    /// (see `sql`); `None` before any reading of the server's clock.
    fn stamp(&self, deadline: Option<Instant>, window: bool) -> Option<Stamp> {
        let clock = &self.inner.clock;
        let estimate = clock.bound_micros(Instant::now())?;
        let bound = match deadline {
            Some(deadline) => clock.bound_micros(deadline)?,
            None => i64::MAX,
        };
        Some(Stamp::new(estimate, bound, window))
    }

    /// Reads the server's clock on `conn` if the backend has no reading yet
    /// (once per backend: afterwards every write's answer carries one).
    async fn ensure_clock<Q: Queryable>(&self, conn: &mut Q) -> mysql_async::Result<()> {
        if self.inner.clock.is_known() {
            return Ok(());
        }
        let reading: Option<i64> = conn.query_first(sql::CLOCK).await?;
        if let Some(reading) = reading {
            self.inner.clock.observe(Instant::now(), reading);
        }
        Ok(())
    }

    /// Runs `call` on the caller's connection, without timeouts or a bound.
    async fn execute_in<Q: Queryable>(
        &self,
        conn: &mut Q,
        call: &Call<'_>,
    ) -> mysql_async::Result<Reply> {
        if matches!(call, Call::Write { .. }) {
            self.ensure_clock(conn).await?;
        }
        let window = matches!(call, Call::Write { window: true, .. });
        execute(conn, call, self.stamp(None, window)).await
    }

    /// Runs `call` on a pooled connection, retrying once after a broken
    /// connection or a deadlock (see the type's docs), each attempt ending by
    /// `not_after` (see "No late effects").
    async fn run(&self, what: &'static str, call: &Call<'_>, not_after: Instant) -> Result<Ran> {
        self.run_unmapped(what, call, not_after)
            .await
            .map_err(|failed| failed.into_error(self, what))
    }

    /// [`run`](Self::run), leaving the last failure unmapped for callers that
    /// read some server errors as an answer.
    async fn run_unmapped(
        &self,
        what: &'static str,
        call: &Call<'_>,
        not_after: Instant,
    ) -> Result<Ran, Failed> {
        match self.attempt(call, false, not_after).await {
            Ok(reply) => Ok(Ran {
                reply,
                retried_after: None,
            }),
            Err(Failed::Statement(e))
                if is_connection_error(&e)
                    || is_deadlock(&e)
                    || (self.inner.pools.len() > 1 && is_node_not_ready(&e)) =>
            {
                let first = self.map(e, what);
                tracing::debug!(table = %self.table(), %first, "{what} failed; retrying once on a verified connection");
                self.attempt(call, true, not_after).await.map(|reply| Ran {
                    reply,
                    retried_after: Some(first),
                })
            }
            Err(failed) => Err(failed),
        }
    }

    /// One attempt of `call`: a connection within the connect timeout, then the
    /// statement within the call timeout, both ending before `not_after`. A
    /// write carries the bound of the instant this attempt stops waiting, so it
    /// can never take effect after it.
    async fn attempt(
        &self,
        call: &Call<'_>,
        verify: bool,
        not_after: Instant,
    ) -> Result<Reply, Failed> {
        let settings = &self.inner.settings;
        // Answer a little before `not_after`, so that a caller who stops
        // waiting then still gets this answer rather than dropping the call.
        let stop = not_after.checked_sub(ANSWER_RESERVE).unwrap_or(not_after);
        let started = Instant::now();
        let (mut conn, host) = self
            .checkout(verify, stop.min(started + settings.connect_timeout))
            .await
            .map_err(Failed::Checkout)?;
        let deadline = stop.min(Instant::now() + settings.call_timeout);
        let work = async {
            if let Call::Write { window, .. } = call {
                self.ensure_clock(&mut conn).await?;
                let stamp = self.stamp(Some(deadline), *window);
                return execute(&mut conn, call, stamp).await;
            }
            execute(&mut conn, call, None).await
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                let e = if is_lock_wait_timeout(&e) {
                    node_not_ready_instead(&mut conn, e, deadline).await
                } else {
                    e
                };
                // The driver already drops connections after I/O errors; a server
                // that reports the session gone needs the same.
                if is_connection_error(&e) {
                    discard(conn);
                }
                // A Galera node outside the primary component: with several
                // hosts, the next calls go to the next one.
                if self.inner.pools.len() > 1 && is_node_not_ready(&e) {
                    let next = (host + 1) % self.inner.pools.len();
                    self.switch_host(host, next, &e);
                }
                Err(Failed::Statement(e))
            }
            Err(_) => {
                // The answer may still come: this connection can never be reused.
                discard(conn);
                Err(Failed::TimedOut(started.elapsed()))
            }
        }
    }

    /// A connection by `deadline`, and the index of the host it is to: from
    /// the host in use, or, when that one fails with a transient error, from
    /// the next ones in turn, each given an equal share of the time left (see
    /// "Several hosts"). The first host that gives one becomes the host in use.
    async fn checkout(&self, verify: bool, deadline: Instant) -> Result<(Conn, usize)> {
        let pools = &self.inner.pools;
        let first = self.current_host();
        let mut failed = None;
        for step in 0..pools.len() {
            let host = (first + step) % pools.len();
            let now = Instant::now();
            if step > 0 && now >= deadline {
                break;
            }
            let share = deadline.saturating_duration_since(now) / (pools.len() - step) as u32;
            match self.checkout_from(&pools[host], verify, now + share).await {
                Ok(conn) => {
                    if let Some(error) = &failed {
                        self.switch_host(first, host, error);
                    }
                    return Ok((conn, host));
                }
                Err(error) if pools.len() > 1 && error.is_transient() => {
                    tracing::debug!(table = %self.table(), host, %error, "MySQL host failed");
                    failed = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(failed.expect("at least one host was tried"))
    }

    /// A connection from `pool` by `deadline`. With `verify`, each one must
    /// answer a ping first; dead ones (as after the server killed the pool's
    /// sessions) are discarded, at most the pool's size of them.
    async fn checkout_from(&self, pool: &Pool, verify: bool, deadline: Instant) -> Result<Conn> {
        let started = Instant::now();
        let timed_out = || {
            Error::unavailable(
                format!(
                    "no connection to the MySQL server within {:?} (connect timeout {:?})",
                    started.elapsed(),
                    self.inner.settings.connect_timeout
                ),
                None,
            )
        };
        let mut discarded = 0;
        loop {
            let mut conn = match tokio::time::timeout_at(deadline, pool.get_conn()).await {
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

    /// Runs one write that its answer may refuse on the server's clock: if the
    /// server says the statement ran past its bound while our clock has not
    /// reached `not_after`, the estimate of the server's clock was off (the
    /// clock stepped forward, or drifted past the rate allowance); the refusal
    /// brought a new reading, so try once more with it. A refusal at or after
    /// `not_after` is the late statement item 8 is about: a transient error.
    async fn write_in_time<T>(
        &self,
        what: &'static str,
        key: &LockKey,
        call: &Call<'_>,
        not_after: Instant,
        read: impl Fn(&Self, Ran) -> Result<Answered<T>>,
    ) -> Result<T> {
        let mut refused = None;
        for _ in 0..2 {
            if refused.is_some() && Instant::now() >= not_after {
                break;
            }
            let ran = self.run(what, call, not_after).await?;
            match read(self, ran)? {
                Answered::Done(value) => return Ok(value),
                Answered::Late(stamp, reading) => refused = Some((stamp, reading)),
            }
        }
        let (stamp, reading) = refused.expect("a refusal");
        Err(late(what, key, stamp, reading))
    }

    /// Renews `distinct` leases in batches (see "Batch renewal" in `sql`), and
    /// answers each one.
    async fn renew_batches(
        &self,
        distinct: &[&(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let stop = not_after.checked_sub(ANSWER_RESERVE).unwrap_or(not_after);
        let values: Vec<(Value, Value)> = distinct
            .iter()
            .map(|(key, token)| (key_value(key), token_value(token)))
            .collect();
        let mut answers: Vec<Option<Result<SystemTime>>> =
            (0..distinct.len()).map(|_| None).collect();
        let mut work: Vec<Part> = (0..distinct.len())
            .collect::<Vec<_>>()
            .chunks(sql::EXTEND_MANY_SLOTS)
            .rev()
            .map(|chunk| Part {
                leases: chunk.to_vec(),
                wait: if ttl.get() >= sql::FIRST_BATCH_WAIT_MIN_TTL {
                    LockWait::Short
                } else {
                    LockWait::None
                },
                clock_retried: false,
            })
            .collect();
        // Leases whose batch did not report them all renewed, with its reading.
        let mut to_verify: Vec<(usize, i64)> = Vec::new();
        let mut learned = false;
        let ttl_us = ttl.as_micros();
        while let Some(part) = work.pop() {
            if Instant::now() >= stop {
                let error = no_time("extend", part.leases.len());
                fill(&mut answers, &part.leases, &error);
                continue;
            }
            let slots = part.leases.len().next_power_of_two();
            let sql = sql::extend_many(
                &self.inner.sql.table,
                slots,
                &self.inner.sql.real_clock,
                part.wait,
            );
            let leases: Vec<(Value, Value)> =
                part.leases.iter().map(|&i| values[i].clone()).collect();
            let call = Call::Write {
                sql: &sql,
                params: Box::new(move |stamp| {
                    sql::extend_many_params(Value::from(ttl_us), &leases, slots, stamp)
                }),
                window: false,
            };
            let ran = match self.run_unmapped("extend", &call, not_after).await {
                Ok(ran) => ran,
                // Another transaction holds one of these rows: nothing was
                // renewed. Renew the batch in quarters, without waiting (on
                // MariaDB), down to the leases whose rows are locked.
                Err(Failed::Statement(e)) if is_lock_wait_timeout(&e) => {
                    learned = true;
                    if let [lease] = part.leases[..] {
                        answers[lease] = Some(Err(self.map(e, "extend")));
                    } else {
                        let quarter = part.leases.len().div_ceil(4);
                        for leases in part.leases.chunks(quarter).rev() {
                            work.push(Part {
                                leases: leases.to_vec(),
                                wait: LockWait::None,
                                clock_retried: part.clock_retried,
                            });
                        }
                    }
                    continue;
                }
                Err(failed) => {
                    let error = failed.into_error(self, "extend");
                    if !learned {
                        // Nothing is known about any lease yet.
                        return Err(error);
                    }
                    fill(&mut answers, &part.leases, &error);
                    continue;
                }
            };
            let (affected, id, stamp, arrived) = ran.reply.written("extend")?;
            let n = part.leases.len();
            let answer = sql::decode_batch(affected, id, n)
                .ok_or_else(|| unexpected("extend", &distinct[part.leases[0]].0, affected, id))?;
            learned = true;
            match answer {
                BatchAnswer::Renewed { reading, affected } => {
                    self.inner.clock.observe(arrived, reading);
                    if affected == n as u64 {
                        for &i in &part.leases {
                            answers[i] = Some(Ok(from_unix_micros(reading)));
                        }
                    } else {
                        to_verify.extend(part.leases.iter().map(|&i| (i, reading)));
                    }
                }
                BatchAnswer::NoneHeld => {
                    for &i in &part.leases {
                        answers[i] = Some(Err(Error::NotHeld {
                            key: distinct[i].0.clone(),
                        }));
                    }
                }
                // A pinned session clock: a property of the session, not of a
                // lease, so the whole call fails.
                BatchAnswer::Refused {
                    refusal: Refusal::Pinned { .. },
                    ..
                } => return Err(self.pinned_clock("extend")),
                BatchAnswer::Refused {
                    refusal: Refusal::Clock { reading },
                    affected,
                } => {
                    self.inner.clock.observe(arrived, reading);
                    if affected > 0 {
                        // Some renewed before the bound passed: read them back.
                        to_verify.extend(part.leases.iter().map(|&i| (i, reading)));
                    } else if !part.clock_retried && Instant::now() < not_after {
                        // The estimate was off (see `write_in_time`): once more.
                        work.push(Part {
                            clock_retried: true,
                            ..part
                        });
                    } else {
                        let error = late("extend", &distinct[part.leases[0]].0, stamp, reading);
                        fill(&mut answers, &part.leases, &error);
                    }
                }
                BatchAnswer::Refused {
                    refusal: Refusal::FenceExhausted { .. },
                    ..
                } => {
                    return Err(unexpected(
                        "extend",
                        &distinct[part.leases[0]].0,
                        affected,
                        id,
                    ));
                }
            }
        }
        for group in to_verify.chunks(sql::EXTEND_MANY_SLOTS) {
            self.verify(distinct, group, ttl_us, not_after, &mut answers)
                .await;
        }
        Ok(answers
            .into_iter()
            .map(|answer| answer.expect("every lease is answered"))
            .collect())
    }

    /// Reads back the rows of leases that a batch did not report all renewed
    /// (`group`: each lease with its batch's reading) and answers each from
    /// what its row shows ([`sql::verdict`]); a lease that cannot be read back
    /// in time gets a transient error.
    async fn verify(
        &self,
        distinct: &[&(LockKey, Token)],
        group: &[(usize, i64)],
        ttl_us: i64,
        not_after: Instant,
        answers: &mut [Option<Result<SystemTime>>],
    ) {
        let slots = group.len().next_power_of_two();
        let sql = sql::verify(&self.inner.sql.table, slots);
        let last = group[group.len() - 1].0;
        let params = group
            .iter()
            .map(|&(i, _)| i)
            .chain(std::iter::repeat(last))
            .take(slots)
            .map(|i| key_value(&distinct[i].0))
            .collect();
        let call = Call::Read { sql: &sql, params };
        let rows = match self.run("extend", &call, not_after).await {
            Ok(ran) => ran.reply.rows("extend"),
            Err(error) => Err(error),
        };
        let rows: Vec<(Vec<u8>, Vec<u8>, Option<i64>)> = match rows.and_then(|rows| {
            rows.into_iter()
                .map(|row| {
                    mysql_async::from_row_opt(row)
                        .map_err(|e| corrupt(self.table(), &e.to_string()))
                })
                .collect()
        }) {
            Ok(rows) => rows,
            Err(error) => {
                let leases: Vec<usize> = group.iter().map(|&(i, _)| i).collect();
                fill(answers, &leases, &error);
                return;
            }
        };
        let by_key: HashMap<&[u8], (&[u8], Option<i64>)> = rows
            .iter()
            .map(|(key, token, expires)| (key.as_slice(), (token.as_slice(), *expires)))
            .collect();
        for &(i, reading) in group {
            let (key, token) = distinct[i];
            let row = by_key.get(key.as_str().as_bytes()).copied();
            answers[i] = Some(
                match sql::verdict(row, token.as_uuid().as_bytes(), reading, ttl_us) {
                    Verdict::Renewed => Ok(from_unix_micros(reading)),
                    Verdict::NotHeld => Err(Error::NotHeld { key: key.clone() }),
                    Verdict::Unknown => Err(Error::unavailable(
                        format!(
                            "extend of {key}: the batch did not renew it although it was live, \
                             and it has changed since (refused as late, or renewed by another \
                             call); its outcome is unknown"
                        ),
                        None,
                    )),
                },
            );
        }
    }
}

/// A lock-wait timeout (1205) as Galera's "not ready" (1047) when the node
/// that sent it is a Galera node (a provider is loaded) that is not ready
/// (`wsrep_ready = OFF`), read on the same connection before `deadline`;
/// otherwise `error` as it is.
///
/// A Galera node outside the primary component answers a prepared statement
/// whose causality wait (`wsrep_sync_wait`) cannot complete with 1205, the
/// code of a row-lock wait, which would make a try-acquire answer "busy" and
/// keep a client with several hosts on a node that cannot serve. The extra
/// round trip is spent only on a 1205, and `SHOW` is outside the causality
/// wait. A server without Galera reports `wsrep_ready = OFF` too, but no
/// provider.
async fn node_not_ready_instead(conn: &mut Conn, error: MyError, deadline: Instant) -> MyError {
    let status = tokio::time::timeout_at(
        deadline,
        conn.query::<(String, String), _>(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_provider_name')",
        ),
    )
    .await;
    let Ok(Ok(rows)) = status else {
        return error;
    };
    let value = |name: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let galera = value("wsrep_provider_name").is_some_and(|v| !v.is_empty());
    match value("wsrep_ready") {
        Some(ready) if galera && ready.eq_ignore_ascii_case("OFF") => {
            MyError::Server(mysql_async::ServerError {
                code: error::code::WSREP_NOT_PREPARED,
                message: format!(
                    "WSREP has not yet prepared node for application use (wsrep_ready = OFF; \
                     the statement answered: {error})"
                ),
                state: "08S01".into(),
            })
        }
        _ => error,
    }
}

/// How long before a call's `not_after` the backend stops waiting, so that its
/// answer (with whatever results arrived) reaches a caller who stops waiting at
/// `not_after`.
const ANSWER_RESERVE: Duration = Duration::from_millis(2);

/// What a write's answer comes to: done, or refused because it ran past its
/// bound (or outside the offset window), with the stamp it ran with and its
/// reading.
enum Answered<T> {
    Done(T),
    Late(Stamp, i64),
}

/// The transient error of a write that the server refused on its clock.
fn late(what: &str, key: &LockKey, stamp: Stamp, reading: i64) -> Error {
    Error::unavailable(
        format!(
            "{what} of {key} refused by the server: it ran at {reading} µs on the server's clock, \
             outside [{}, {}], the window of the call's not_after on this backend's estimate of \
             that clock (the statement arrived late, or the server's clock stepped); nothing was \
             changed",
            stamp.reference, stamp.bound
        ),
        None,
    )
}

/// The error of leases that no statement could be sent for before `not_after`.
fn no_time(what: &str, leases: usize) -> Error {
    Error::unavailable(
        format!("{what}: no time left before the call's not_after for {leases} lease(s)"),
        None,
    )
}

/// Gives each of `leases` (that has no answer yet) a copy of `error`.
fn fill(answers: &mut [Option<Result<SystemTime>>], leases: &[usize], error: &Error) {
    for &i in leases {
        if answers[i].is_none() {
            answers[i] = Some(Err(copy_error(error)));
        }
    }
}

/// An error with the same kind and text as `error`, for one more lease of a
/// batch (errors are not `Clone`; the source stays with the first).
fn copy_error(error: &Error) -> Error {
    match error {
        Error::NotHeld { key } => Error::NotHeld { key: key.clone() },
        Error::Unavailable { message, .. } => Error::unavailable(message.clone(), None),
        other => Error::Backend {
            message: other.to_string(),
            transient: other.is_transient(),
            source: None,
        },
    }
}

/// A part of a batch renewal still to send.
struct Part {
    /// Indices into the distinct leases.
    leases: Vec<usize>,
    wait: LockWait,
    /// Whether this part was already sent again after a clock refusal.
    clock_retried: bool,
}

/// The parameters of a write, built for each attempt from its clock stamp.
type Params<'a> = Box<dyn Fn(Stamp) -> Vec<Value> + Send + Sync + 'a>;

/// One statement and its parameters, kept so that it can run again.
enum Call<'a> {
    /// An `INSERT`/`UPDATE` whose OK packet is the answer; `window`: its stamp's
    /// bound stays within the offset window of its reference (the acquire).
    Write {
        sql: &'a str,
        params: Params<'a>,
        window: bool,
    },
    /// A `SELECT`.
    Read { sql: &'a str, params: Vec<Value> },
    /// DDL, sent as text (it is run once, so preparing it would only cost).
    Ddl { sql: &'a str },
}

enum Reply {
    /// Affected rows and the insert id, as a signed number (see `sql`), of a
    /// write run with `stamp`, whose answer arrived at `arrived`.
    Written {
        affected: u64,
        id: i64,
        stamp: Stamp,
        arrived: Instant,
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
/// writes, so each is one round trip once the connection has prepared it. A
/// write needs its `stamp`.
async fn execute<Q: Queryable>(
    conn: &mut Q,
    call: &Call<'_>,
    stamp: Option<Stamp>,
) -> mysql_async::Result<Reply> {
    match call {
        Call::Write { sql, params, .. } => {
            let stamp = stamp.ok_or_else(|| {
                MyError::Other("no reading of the server's clock to bound the statement".into())
            })?;
            let result = conn.exec_iter(*sql, params(stamp)).await?;
            let arrived = Instant::now();
            let affected = result.affected_rows();
            // The server sends the insert id as an unsigned 64-bit number; our
            // statements put signed values in it (see `sql`).
            let id = result.last_insert_id().unwrap_or(0) as i64;
            result.drop_result().await?;
            Ok(Reply::Written {
                affected,
                id,
                stamp,
                arrived,
            })
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

impl Reply {
    /// The OK packet of a write. `execute` answers every write call with one;
    /// anything else is reported as an error rather than trusted.
    fn written(self, what: &str) -> Result<(u64, i64, Stamp, Instant)> {
        match self {
            Reply::Written {
                affected,
                id,
                stamp,
                arrived,
            } => Ok((affected, id, stamp, arrived)),
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

fn corrupt(table: &TableName, reason: &str) -> Error {
    Error::permanent(
        format!("lock table {table} holds a row this backend cannot read: {reason}"),
        std::io::Error::other("unreadable row"),
    )
}

type InfoRow = (Vec<u8>, String, i64, i64, Option<i64>, Option<i64>);

fn lock_info(row: Row, table: &TableName) -> Result<LockInfo> {
    let corrupt = |reason: String| corrupt(table, &reason);
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
    /// One statement (two, if the server refuses the first on its clock while
    /// ours has not reached `not_after`, see "No late effects"), each retried
    /// once after a broken connection; every attempt carries the bound of
    /// `not_after` (or earlier), so none can take effect after it.
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let call = self.acquire_call(key, token, ttl, owner)?;
        let mut refused = None;
        for _ in 0..2 {
            if refused.is_some() && Instant::now() >= not_after {
                break;
            }
            match self.run_unmapped("acquire", &call, not_after).await {
                Ok(ran) => match self.acquire_answer(key, ran.reply)? {
                    Answered::Done(outcome) => return Ok(outcome),
                    Answered::Late(stamp, reading) => refused = Some((stamp, reading)),
                },
                // Waited out the row-lock bound on a row another transaction holds
                // (an uncommitted acquire, a `SELECT … FOR UPDATE`): the statement
                // was rolled back, so nothing changed, and someone else is busy
                // with the key. The same answer as PostgreSQL's for its
                // `lock_timeout`.
                Err(Failed::Statement(e)) if is_busy_for_try(&e) => {
                    return Ok(AcquireOutcome::Held { remaining: None });
                }
                Err(failed) => return Err(failed.into_error(self, "acquire")),
            }
        }
        let (stamp, reading) = refused.expect("a refusal");
        Err(late("acquire", key, stamp, reading))
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let call = self.extend_call(key, token, ttl);
        self.write_in_time("extend", key, &call, not_after, |b, ran| {
            b.guarded_answer(key, ran.reply, "extend")
        })
        .await
    }

    /// One `UPDATE` per 1,024 distinct leases when every lease is renewed (the
    /// usual case); when the affected-rows count shows that some were not, one
    /// `SELECT` reads that batch's rows back and answers each lease. A row
    /// locked by another transaction costs that lease only (see "Rows locked by
    /// another transaction" on the type). Every statement ends before
    /// `not_after`, and leases it leaves unanswered get a transient error.
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let mut position: HashMap<&(LockKey, Token), usize> = HashMap::with_capacity(leases.len());
        let mut distinct: Vec<&(LockKey, Token)> = Vec::with_capacity(leases.len());
        let slots: Vec<usize> = leases
            .iter()
            .map(|lease| {
                *position.entry(lease).or_insert_with(|| {
                    distinct.push(lease);
                    distinct.len() - 1
                })
            })
            .collect();
        if distinct.is_empty() {
            return Ok(Vec::new());
        }
        let mut answers: Vec<Option<Result<SystemTime>>> = self
            .renew_batches(&distinct, ttl, not_after)
            .await?
            .into_iter()
            .map(Some)
            .collect();
        // An entry that appears twice gets the same answer in both positions.
        let mut results = Vec::with_capacity(slots.len());
        for i in slots {
            let answer = answers[i].take().expect("every lease is answered");
            answers[i] = Some(match &answer {
                Ok(at) => Ok(*at),
                Err(e) => Err(copy_error(e)),
            });
            results.push(answer);
        }
        Ok(results)
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let call = self.release_call(key, token);
        let result = self
            .write_in_time("release", key, &call, not_after, |b, ran| {
                match (
                    b.guarded_answer(key, ran.reply, "release"),
                    ran.retried_after,
                ) {
                    // The first attempt may have released it before its
                    // connection broke: "not held" would be a guess, the first
                    // error is the honest answer.
                    (Err(Error::NotHeld { .. }), Some(first)) => Err(first),
                    (answer, _) => answer,
                }
            })
            .await;
        if result.is_ok() {
            self.inner.notifier.notify(key);
        }
        result.map(|_| ())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let call = Call::Read {
            sql: &self.inner.sql.inspect,
            params: vec![key_value(key)],
        };
        let rows = self
            .run("inspect", &call, self.read_deadline())
            .await?
            .reply
            .rows("inspect")?;
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
        let rows = self
            .run("list", &call, self.read_deadline())
            .await?
            .reply
            .rows("list")?;
        rows.into_iter()
            .map(|row| lock_info(row, self.table()))
            .collect()
    }

    async fn create_table(&self) -> Result<()> {
        let call = Call::Ddl {
            sql: &self.inner.sql.create_table,
        };
        self.run("create table", &call, self.read_deadline())
            .await?;
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

    #[test]
    fn copies_of_errors_keep_their_kind() {
        let key = LockKey::new("k").unwrap();
        let not_held = copy_error(&Error::NotHeld { key: key.clone() });
        assert!(matches!(not_held, Error::NotHeld { key: k } if k == key));
        let unavailable = copy_error(&Error::unavailable("gone", None));
        assert!(matches!(&unavailable, Error::Unavailable { message, .. } if message == "gone"));
        let transient = copy_error(&Error::transient("busy", std::io::Error::other("x")));
        assert!(transient.is_transient());
        let permanent = copy_error(&Error::permanent("bad", std::io::Error::other("x")));
        assert!(!permanent.is_transient());
    }
}
