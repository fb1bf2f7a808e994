//! [`MySqlBackend`]: the type, and how one is built (from a URL, a
//! [`MySqlConfig`] or your own pool). The connection policy is in
//! `connection.rs`, the [`LockBackend`](distrlock_core::LockBackend) impl in `lock_backend.rs`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use distrlock_core::server_clock::ServerClock;
use distrlock_core::{Error, ReleaseNotifier, Result, TableName};
use mysql_async::Pool;

use crate::config::MySqlConfig;
use crate::parked::Parking;
use crate::sql::Statements;

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
/// [`from_config`](Self::from_config) (a [`MySqlConfig`], for every other
/// setting, [`mysql_async::Opts`] and several hosts included) or
/// [`from_pool`](Self::from_pool) (your own [`mysql_async::Pool`]).
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
/// [`LockBackend`](distrlock_core::LockBackend)), even when a network path that froze delivers the
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
/// it can land up to [`MySqlConfig::lock_timeout`] after its check.
///
/// # Rows locked by another transaction
///
/// A statement waits for a row lock held by another transaction (an
/// uncommitted [`try_acquire_in`](Self::try_acquire_in), a `SELECT … FOR
/// UPDATE`) at most [`MySqlConfig::lock_timeout`]; then the server rolls
/// it back (error 1205) and nothing has changed. A
/// [`try_acquire`](distrlock_core::LockBackend::try_acquire) answers that with
/// [`AcquireOutcome::Held`](distrlock_core::AcquireOutcome::Held) and no remaining lease: someone else is busy with
/// the key, as on PostgreSQL, and a waiting acquire backs off and tries again.
/// A deadlock (1213) that is still one after the backend's retry gets the
/// same answer: on Galera that is a certification conflict, another node
/// having committed a write to the same row first.
/// For [`extend`](distrlock_core::LockBackend::extend) and [`release`](distrlock_core::LockBackend::release)
/// it is a transient [`Error::Backend`]: the lease is as it was, and the
/// caller learns nothing about it, so neither "held" nor [`Error::NotHeld`]
/// would be honest. The same goes for a metadata-lock wait (a DDL statement on
/// the table), which fails with the same error.
///
/// [`extend_many`](distrlock_core::LockBackend::extend_many) renews the leases of a whole
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
/// ([`MySqlConfigBuilder::url`](crate::MySqlConfigBuilder::url)) or from
/// [`MySqlConfigBuilder::hosts`](crate::MySqlConfigBuilder::hosts) keeps one
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
/// # Prepared statements
///
/// A backend that built its own pool keeps each connection between calls in a
/// short list of its own (0.1 s at most, then back to the pool), together with
/// the driver `Statement`s it prepared for acquire, release, extend, the
/// waiter's ticket, inspect and list. The next call runs them by id: given
/// only a statement's text, mysql_async scans and hashes all of it on every
/// call to find the prepared form (about 170,000 instructions for the acquire,
/// two thirds of a cycle's client work). A statement never leaves the
/// connection that prepared it, and is never closed while kept: a call of any
/// other text (a batch renewal's, one per batch size) forgets them first, since
/// preparing it may push them out of the driver's cache, and a proxy that
/// reuses statement ids (ProxySQL) could then give a kept id to another
/// statement. A pool of yours ([`from_pool`](Self::from_pool)) may serve your
/// own code, so the backend holds none of its connections back and finds its
/// statements by their text.
///
/// # Release notifications
///
/// [`release_notifier`](distrlock_core::LockBackend::release_notifier) announces the releases
/// made through this backend (and its clones), so waiters in this process wake
/// at once. MySQL has no `LISTEN`; waiters in other processes find a release by
/// polling, and they sleep no longer than the remaining lease a refused acquire
/// reports.
#[derive(Clone)]
pub struct MySqlBackend {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// One pool per host, in the order given; one for a single server.
    pub(crate) pools: Vec<Pool>,
    /// Per host, the connections kept between calls with their prepared
    /// statements (see "Prepared statements"); never any for a pool of yours.
    pub(crate) parking: Vec<Arc<Parking>>,
    /// The index of the host in use (see "Several hosts").
    pub(crate) current: AtomicUsize,
    pub(crate) owns_pool: bool,
    pub(crate) server: Option<String>,
    pub(crate) config: MySqlConfig,
    pub(crate) sql: Statements,
    pub(crate) notifier: ReleaseNotifier,
    /// The latest reading of the server's clock, for the bounds of writes.
    pub(crate) clock: ServerClock,
    /// How many times the server refused a kept statement as unknown (see
    /// "Prepared statements"): never, unless the backend has a bug.
    pub(crate) kept_refused: AtomicU64,
}

impl MySqlBackend {
    /// Connects to `url` with every other setting at its default (table
    /// `distributed_locks`), checking that a connection opens; see
    /// [`MySqlConfigBuilder::url`](crate::MySqlConfigBuilder::url) for the URL,
    /// several hosts included.
    ///
    /// ```no_run
    /// # async fn demo() -> distrlock_core::Result<()> {
    /// let backend = distrlock_mysql::MySqlBackend::connect("mysql://app:secret@db:3306/app").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// Errors: as [`from_config`](Self::from_config)'s.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::from_config(MySqlConfig::builder().url(url).build()?).await
    }

    /// Builds one pool per host of `config` (from
    /// [`MySqlConfig::pool_opts`]) and checks that a connection can be opened
    /// within the connect timeout. Does not create the table: see
    /// [`create_table`](distrlock_core::LockBackend::create_table).
    ///
    /// Errors: [`Error::InvalidConfig`] when the config names no connection,
    /// [`Error::Unavailable`] when no host can be reached, [`Error::Backend`]
    /// when it refuses (for example wrong credentials). No error text contains
    /// the password.
    pub async fn from_config(config: MySqlConfig) -> Result<Self> {
        if config.hosts.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "no connection given: set a URL, Opts or hosts".into(),
            });
        }
        let pools = config
            .hosts
            .iter()
            .map(|opts| Pool::new(config.pool_opts(opts.clone())))
            .collect();
        let server = Some(config.servers());
        let backend = Self::new(pools, true, server, config);
        backend.check_connection().await?;
        Ok(backend)
    }

    /// A backend on `pool`, a pool of your own, without connecting yet; the
    /// hosts of `config`, if any, are not used.
    ///
    /// The pool keeps its own limits and session settings: build it from
    /// [`MySqlConfig::pool_opts`], or add
    /// [`session_settings_sql`](MySqlConfig::session_settings_sql) to its setup
    /// statements, to bound row-lock waits, and prefer
    /// `PoolOpts::with_reset_connection(false)` so prepared statements survive
    /// between calls. The client-side connect and call timeouts of `config`
    /// apply either way. The `Result` is for symmetry with the other
    /// backends: a validated config leaves nothing to refuse.
    pub fn from_pool(pool: Pool, config: MySqlConfig) -> Result<Self> {
        Ok(Self::new(vec![pool], false, None, config))
    }

    /// The DDL that [`create_table`](distrlock_core::LockBackend::create_table) runs for `table`,
    /// without connecting: for migration tools and `distrlock schema`.
    pub fn schema_sql_for(table: &TableName) -> String {
        format!(
            "{};\n",
            Statements::new(
                table,
                MySqlConfig::default().clock_tolerance(),
                Duration::ZERO
            )
            .create_table
        )
    }

    fn new(pools: Vec<Pool>, owns_pool: bool, server: Option<String>, config: MySqlConfig) -> Self {
        assert!(!pools.is_empty(), "a backend has at least one pool");
        let sql = Statements::new(
            &config.table,
            config.clock_tolerance(),
            config.max_clock_skew,
        );
        Self {
            inner: Arc::new(Inner {
                // A pool of the caller's own may serve the caller too: the
                // backend holds none of its connections back.
                parking: pools
                    .iter()
                    .map(|_| Parking::new(config.pool_size, owns_pool))
                    .collect(),
                pools,
                current: AtomicUsize::new(0),
                owns_pool,
                server,
                config,
                sql,
                notifier: ReleaseNotifier::new(),
                clock: ServerClock::new(),
                kept_refused: AtomicU64::new(0),
            }),
        }
    }

    /// The pool the backend takes its connections from: with several hosts,
    /// the one of the host in use now. A backend that built this pool keeps
    /// its connections between its own calls, each for 0.1 s at most (see
    /// "Prepared statements"), so a connection taken from here may wait up to
    /// 0.15 s for one.
    pub fn pool(&self) -> &Pool {
        &self.inner.pools[self.current_host()]
    }

    /// With several hosts, the index (from 0, in the order given) of the host
    /// the backend uses now; 0 for a single server.
    pub fn current_host(&self) -> usize {
        self.inner.current.load(Ordering::Relaxed) % self.inner.pools.len()
    }

    /// How many times the server refused a statement this backend kept on a
    /// connection as unknown (see "Prepared statements"); each was prepared
    /// again. 0 unless the backend has a bug: for its tests.
    #[doc(hidden)]
    pub fn kept_statements_refused(&self) -> u64 {
        self.inner.kept_refused.load(Ordering::Relaxed)
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.inner.config.table
    }

    /// The settings the backend was built with.
    pub fn config(&self) -> &MySqlConfig {
        &self.inner.config
    }

    /// Closes the connections of a pool this backend created, waiting for
    /// borrowed ones to come back; every clone becomes unusable. Does nothing for
    /// a pool passed to [`from_pool`](Self::from_pool): that one is yours to close.
    pub async fn disconnect(&self) -> Result<()> {
        if self.inner.owns_pool {
            for parking in &self.inner.parking {
                parking.close();
            }
            for pool in &self.inner.pools {
                pool.clone()
                    .disconnect()
                    .await
                    .map_err(|e| self.map(e, "disconnect"))?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for MySqlBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.inner.config;
        f.debug_struct("MySqlBackend")
            .field("table", &config.table)
            .field(
                "server",
                &self.inner.server.as_deref().unwrap_or("(external pool)"),
            )
            .field("connect_timeout", &config.connect_timeout)
            .field("statement_timeout", &config.statement_timeout)
            .field("lock_timeout_secs", &config.lock_timeout_secs())
            .finish_non_exhaustive()
    }
}
