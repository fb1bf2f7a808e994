//! [`MySqlConfig`]: every setting of a [`MySqlBackend`], validated in one place.

use std::time::Duration;

use distrlock_core::{Error, Result, TableName};
use mysql_async::{Opts, OptsBuilder, Pool, PoolConstraints};

use crate::backend::MySqlBackend;
use crate::sql;

/// The settings of a [`MySqlBackend`], and the builder that makes one.
///
/// Every setter takes and returns the config, so calls chain; nothing is checked
/// until a backend is built ([`connect`](Self::connect), [`build`](Self::build) or
/// [`build_with_pool`](Self::build_with_pool)), which validates everything at once
/// and returns [`Error::InvalidTableName`] or [`Error::InvalidConfig`].
///
/// ```
/// use std::time::Duration;
/// use distrlock_mysql::MySqlConfig;
///
/// let config = MySqlConfig::new()
///     .table("locks.distributed_locks")
///     .max_connections(8)
///     .connect_timeout(Duration::from_secs(3))
///     .statement_timeout(Duration::from_secs(5))
///     .lock_wait_timeout(Duration::from_secs(1));
/// assert_eq!(
///     config.session_setup_sql(),
///     "SET SESSION autocommit = 1, innodb_lock_wait_timeout = 1, lock_wait_timeout = 1 \
///      /*M! , max_statement_time = 5.000 */"
/// );
///
/// // Bad settings are refused when the backend is built, with a typed error.
/// let opts = distrlock_mysql::mysql_async::Opts::from_url("mysql://localhost/test").unwrap();
/// let bad = MySqlConfig::new().table("x`; DROP TABLE y; --").build(opts);
/// assert!(matches!(bad, Err(distrlock_core::Error::InvalidTableName { .. })));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MySqlConfig {
    pub(crate) table: String,
    pub(crate) max_connections: usize,
    pub(crate) min_connections: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) lock_wait_timeout: Duration,
}

impl MySqlConfig {
    /// The default pool limit: at most 10 open connections.
    pub const DEFAULT_MAX_CONNECTIONS: usize = 10;
    /// The default number of idle connections the pool keeps: 1.
    pub const DEFAULT_MIN_CONNECTIONS: usize = 1;
    /// The default connect timeout: 5 seconds.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default statement timeout: 5 seconds.
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default row-lock wait bound: 1 second.
    pub const DEFAULT_LOCK_WAIT_TIMEOUT: Duration = Duration::from_secs(1);
    /// The longest timeout any setting accepts: one day.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
    /// How much longer than the statement timeout the client waits for an answer
    /// before giving up on the connection, so that the server's own timeout (a
    /// clean error on a healthy connection) normally comes first.
    pub const CLIENT_TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

    /// The defaults: table `distributed_locks`, up to 10 connections keeping 1
    /// idle, 5 s connect and statement timeouts, 1 s row-lock wait bound.
    pub fn new() -> Self {
        Self {
            table: TableName::DEFAULT.to_owned(),
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            min_connections: Self::DEFAULT_MIN_CONNECTIONS,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            statement_timeout: Self::DEFAULT_STATEMENT_TIMEOUT,
            lock_wait_timeout: Self::DEFAULT_LOCK_WAIT_TIMEOUT,
        }
    }

    /// The lock table: `table` or `database.table`, each part
    /// `[A-Za-z_][A-Za-z0-9_]*` of at most 63 bytes. It is always backquoted in
    /// SQL, so mixed case is kept. Without a database, the connection's default
    /// database (from the URL) is used.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The most connections the backend's pool opens (default 10). Ignored by
    /// [`build_with_pool`](Self::build_with_pool), whose pool has its own limits.
    pub fn max_connections(mut self, max: usize) -> Self {
        self.max_connections = max;
        self
    }

    /// How many idle connections the pool keeps open (default 1, at most
    /// [`max_connections`](Self::max_connections)). Ignored by
    /// [`build_with_pool`](Self::build_with_pool).
    pub fn min_connections(mut self, min: usize) -> Self {
        self.min_connections = min;
        self
    }

    /// How long getting a connection may take, including opening a new one
    /// (default 5 s). After that the call fails with
    /// [`Error::Unavailable`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one statement may run (default 5 s).
    ///
    /// On MariaDB the server enforces it (`max_statement_time`, error 1969, a
    /// transient error). On every server the client also stops waiting
    /// [`CLIENT_TIMEOUT_MARGIN`](Self::CLIENT_TIMEOUT_MARGIN) later, drops the
    /// connection and returns [`Error::Unavailable`]; that is the bound on MySQL,
    /// whose `max_execution_time` covers only `SELECT`.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout;
        self
    }

    /// How long a statement waits for a row lock held by another transaction
    /// (default 1 s), as the session's `innodb_lock_wait_timeout`. The server
    /// counts whole seconds, so this is rounded up to at least one second. A
    /// try-acquire on a row that another open transaction has locked answers
    /// [`AcquireOutcome::Held`](distrlock_core::AcquireOutcome::Held) with no
    /// remaining lease after this long (the key is busy, the holder unknown);
    /// an extend or release gives a transient [`Error::Backend`] (error 1205:
    /// the statement was rolled back, nothing changed).
    pub fn lock_wait_timeout(mut self, timeout: Duration) -> Self {
        self.lock_wait_timeout = timeout;
        self
    }

    /// The row-lock wait bound in the whole seconds the server uses.
    pub fn lock_wait_timeout_secs(&self) -> u64 {
        let d = self.lock_wait_timeout;
        let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
        secs.max(1)
    }

    /// How far a session's clock may trail the server's real clock before
    /// acquire, extend and release refuse to run: the longer of the statement
    /// timeout and two row-lock wait bounds (one for the table's metadata lock,
    /// one for the row), plus [`CLIENT_TIMEOUT_MARGIN`](Self::CLIENT_TIMEOUT_MARGIN);
    /// 5.5 s with the defaults.
    ///
    /// Every statement's clock (`NOW()`, `UTC_TIMESTAMP()`) is the instant it
    /// started, unless the session pinned it with `SET @@timestamp = …`. Each
    /// write compares it with `SYSDATE()`, which cannot be pinned, and fails with
    /// [`Error::InvalidConfig`] when the statement's clock is ahead of it, or
    /// behind by more than this: a lease on a pinned clock would end at the
    /// wrong time. A session with this config's bounds
    /// ([`session_setup_sql`](Self::session_setup_sql)) spends at most this long
    /// in the server before the comparison, and no answer that comes later is
    /// accepted by the backend's pooled calls, so an unpinned clock is never
    /// refused. A clock pinned less than this far in the past is not detected.
    pub fn clock_tolerance(&self) -> Duration {
        let waits = Duration::from_secs(2 * self.lock_wait_timeout_secs());
        self.statement_timeout.max(waits) + Self::CLIENT_TIMEOUT_MARGIN
    }

    /// The statement that applies this config's row-lock wait bound and (on
    /// MariaDB) statement timeout to a session.
    ///
    /// Backends built by [`connect`](Self::connect) and [`build`](Self::build) run
    /// it on every new connection. For a pool of your own
    /// ([`build_with_pool`](Self::build_with_pool)), add it to the pool's
    /// `OptsBuilder::setup(…)` so its connections get the same bounds. It is the
    /// same text on MySQL and MariaDB (the MariaDB-only part sits in a `/*M! */`
    /// comment that MySQL skips).
    pub fn session_setup_sql(&self) -> String {
        sql::session_setup(
            self.lock_wait_timeout_secs(),
            self.statement_timeout.as_secs_f64(),
        )
    }

    /// Connects to `url` (`mysql://user:password@host:port/database?…`, see
    /// [`mysql_async::Opts`] for the parameters) and checks that a connection can
    /// be opened within the connect timeout.
    ///
    /// Errors: [`Error::InvalidConfig`] for a bad URL or setting,
    /// [`Error::InvalidTableName`], [`Error::Unavailable`] when the server cannot
    /// be reached, [`Error::Backend`] when it refuses (for example wrong
    /// credentials). No error text contains the password.
    pub async fn connect(self, url: &str) -> Result<MySqlBackend> {
        let opts = Opts::from_url(url).map_err(|e| Error::InvalidConfig {
            reason: format!("invalid MySQL URL: {e}"),
        })?;
        let backend = self.build(opts)?;
        backend.check_connection().await?;
        Ok(backend)
    }

    /// [`build`](Self::build)s a backend on a new pool from `opts` (a URL's
    /// options changed in code: a password from elsewhere, TLS settings) and
    /// checks that a connection can be opened within the connect timeout, as
    /// [`connect`](Self::connect) does.
    ///
    /// Errors: as [`connect`](Self::connect)'s.
    pub async fn connect_opts(self, opts: impl Into<Opts>) -> Result<MySqlBackend> {
        let backend = self.build(opts)?;
        backend.check_connection().await?;
        Ok(backend)
    }

    /// Builds a backend on a new pool from `opts`, without connecting yet.
    ///
    /// The backend's pool takes everything from `opts` except: the pool limits
    /// (from this config), idle connections beyond the minimum kept for 60 s
    /// unless `opts` says otherwise, connection reset on return to the pool (off: the pool
    /// runs only this backend's statements, and a reset would drop their prepared
    /// form and cost a round trip), the prepared-statement cache (at least 16 per
    /// connection), and [`session_setup_sql`](Self::session_setup_sql) added to
    /// the setup statements.
    pub fn build(self, opts: impl Into<Opts>) -> Result<MySqlBackend> {
        let settings = self.validate()?;
        let opts: Opts = opts.into();
        let server = describe_server(&opts);
        let constraints = PoolConstraints::new(self.min_connections, self.max_connections)
            .ok_or_else(|| Error::InvalidConfig {
                reason: "min_connections must not exceed max_connections".into(),
            })?;
        let pool_opts = opts
            .pool_opts()
            .clone()
            .with_constraints(constraints)
            .with_reset_connection(false);
        // mysql_async closes every returned connection beyond `min_connections`
        // unless idle connections may live a while: without this, a burst of
        // concurrent calls reconnects for most of them (measured in the benchmark:
        // 13,103 new connections for 21,018 cycles).
        let pool_opts = if pool_opts.inactive_connection_ttl().is_zero() {
            pool_opts.with_inactive_connection_ttl(std::time::Duration::from_secs(60))
        } else {
            pool_opts
        };
        // mysql_async runs the setup statements last to first: put ours first so
        // that it runs last and its settings (autocommit on, the bounds) win over
        // anything in `opts`.
        let mut setup = opts.setup().to_vec();
        setup.insert(0, settings.session_setup.clone());
        let stmt_cache = opts.stmt_cache_size().max(16);
        let builder = OptsBuilder::from_opts(opts)
            .pool_opts(pool_opts)
            .setup(setup)
            .stmt_cache_size(stmt_cache);
        Ok(MySqlBackend::new(
            Pool::new(builder),
            true,
            Some(server),
            settings,
        ))
    }

    /// Builds a backend on `pool`, a pool of your own, without connecting yet.
    ///
    /// The pool keeps its own limits and session settings: add
    /// [`session_setup_sql`](Self::session_setup_sql) to its setup statements to
    /// bound row-lock waits, and prefer `PoolOpts::with_reset_connection(false)`
    /// so prepared statements survive between calls. The client-side connect and
    /// call timeouts of this config apply either way.
    pub fn build_with_pool(self, pool: Pool) -> Result<MySqlBackend> {
        let settings = self.validate()?;
        Ok(MySqlBackend::new(pool, false, None, settings))
    }

    fn validate(&self) -> Result<Settings> {
        let table = TableName::new(&self.table)?;
        if self.max_connections == 0 {
            return Err(invalid("max_connections must be at least 1"));
        }
        if self.min_connections > self.max_connections {
            return Err(invalid("min_connections must not exceed max_connections"));
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("statement_timeout", self.statement_timeout),
            ("lock_wait_timeout", self.lock_wait_timeout),
        ] {
            if value < Duration::from_millis(1) {
                return Err(invalid(&format!(
                    "{name} must be at least 1 ms, got {value:?}"
                )));
            }
            if value > Self::MAX_TIMEOUT {
                return Err(invalid(&format!(
                    "{name} must be at most one day, got {value:?}"
                )));
            }
        }
        Ok(Settings {
            table,
            connect_timeout: self.connect_timeout,
            call_timeout: self.statement_timeout + Self::CLIENT_TIMEOUT_MARGIN,
            clock_tolerance: self.clock_tolerance(),
            session_setup: self.session_setup_sql(),
            config: self.clone(),
        })
    }
}

impl Default for MySqlConfig {
    fn default() -> Self {
        Self::new()
    }
}

/// A validated config, as the backend uses it.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) table: TableName,
    pub(crate) connect_timeout: Duration,
    pub(crate) call_timeout: Duration,
    pub(crate) clock_tolerance: Duration,
    pub(crate) session_setup: String,
    pub(crate) config: MySqlConfig,
}

fn invalid(reason: &str) -> Error {
    Error::InvalidConfig {
        reason: reason.to_owned(),
    }
}

/// `host:port/database` (or the socket path), for `Debug`: never the user or
/// password.
fn describe_server(opts: &Opts) -> String {
    let place = match opts.socket() {
        Some(socket) => socket.to_owned(),
        None => format!("{}:{}", opts.ip_or_hostname(), opts.tcp_port()),
    };
    match opts.db_name() {
        Some(db) => format!("{place}/{db}"),
        None => place,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Opts {
        Opts::from_url("mysql://user:hunter2-secret@db.example:3307/app").unwrap()
    }

    #[test]
    fn refuses_bad_settings_with_typed_errors() {
        let cases: Vec<(MySqlConfig, &str)> = vec![
            (MySqlConfig::new().max_connections(0), "max_connections"),
            (
                MySqlConfig::new().max_connections(2).min_connections(3),
                "min_connections",
            ),
            (
                MySqlConfig::new().connect_timeout(Duration::ZERO),
                "connect_timeout",
            ),
            (
                MySqlConfig::new().statement_timeout(Duration::from_secs(100_000)),
                "statement_timeout",
            ),
            (
                MySqlConfig::new().lock_wait_timeout(Duration::ZERO),
                "lock_wait_timeout",
            ),
            (
                // Would print as 0.000 s, which MariaDB reads as "no limit".
                MySqlConfig::new().statement_timeout(Duration::from_micros(400)),
                "statement_timeout",
            ),
        ];
        for (config, field) in cases {
            match config.build(opts()) {
                Err(Error::InvalidConfig { reason }) => assert!(reason.contains(field), "{reason}"),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
        for bad in ["", "a.b.c", "x`; DROP TABLE y; --", "t;", "1t", "a b"] {
            assert!(
                matches!(
                    MySqlConfig::new().table(bad).build(opts()),
                    Err(Error::InvalidTableName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rounds_the_row_lock_bound_up_to_whole_seconds() {
        let secs = |d| {
            MySqlConfig::new()
                .lock_wait_timeout(d)
                .lock_wait_timeout_secs()
        };
        assert_eq!(secs(Duration::from_millis(1)), 1);
        assert_eq!(secs(Duration::from_secs(1)), 1);
        assert_eq!(secs(Duration::from_millis(1001)), 2);
        assert_eq!(secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn clock_tolerance_covers_the_session_bounds() {
        assert_eq!(
            MySqlConfig::new().clock_tolerance(),
            Duration::from_millis(5500)
        );
        // Two row-lock waits of 3 s (2.5 s rounded up) outlast a 5 s statement.
        assert_eq!(
            MySqlConfig::new()
                .lock_wait_timeout(Duration::from_millis(2500))
                .clock_tolerance(),
            Duration::from_millis(6500)
        );
        assert_eq!(
            MySqlConfig::new()
                .statement_timeout(Duration::from_secs(1))
                .clock_tolerance(),
            Duration::from_millis(2500)
        );
    }

    #[tokio::test]
    async fn debug_never_shows_the_password() {
        let backend = MySqlConfig::new().build(opts()).unwrap();
        let shown = format!("{backend:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db.example:3307/app"), "{shown}");
        let bad = MySqlConfig::new()
            .connect("mysql://user:hunter2-secret@db.example:notaport/app")
            .await
            .unwrap_err();
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
    }
}
