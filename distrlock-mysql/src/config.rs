//! [`MySqlConfig`]: every setting of a [`MySqlBackend`](crate::MySqlBackend),
//! validated in one place by [`MySqlConfigBuilder::build`].

use std::fmt;
use std::time::Duration;

use distrlock_core::{Error, Result, TableName};
use mysql_async::{Opts, OptsBuilder, PoolConstraints};

use crate::sql;

/// The validated settings of a [`MySqlBackend`](crate::MySqlBackend): where
/// to connect (one host or several), the lock table, the pool's size and the
/// session's bounds.
///
/// Made by [`MySqlConfig::builder`]`…`[`build`](MySqlConfigBuilder::build),
/// which checks everything at once; then
/// [`MySqlBackend::from_config`](crate::MySqlBackend::from_config) connects,
/// or [`MySqlBackend::from_pool`](crate::MySqlBackend::from_pool) uses your
/// own pool. `Debug` never shows the password.
///
/// With the `serde` feature it is `Deserialize` (validated as
/// [`build`](MySqlConfigBuilder::build) validates) and `Serialize` (never the
/// password): the settings `url`, `password` (read only), `table`,
/// `pool_size`, `min_pool_size`, `connect_timeout`, `statement_timeout`,
/// `lock_timeout` and `max_clock_skew`, durations as humantime strings
/// (`"5s"`) or whole seconds.
///
/// ```
/// use std::time::Duration;
/// use distrlock_mysql::MySqlConfig;
///
/// let config = MySqlConfig::builder()
///     .url("mysql://app:s3cret@db.internal:3306/app")
///     .table("locks.distributed_locks")
///     .pool_size(8)
///     .connect_timeout(Duration::from_secs(3))
///     .statement_timeout(Duration::from_secs(5))
///     .lock_timeout(Duration::from_secs(1))
///     .build()
///     .unwrap();
/// assert_eq!(config.table().to_string(), "locks.distributed_locks");
/// assert_eq!(
///     config.session_settings_sql(),
///     "SET SESSION autocommit = 1, innodb_lock_wait_timeout = 1, lock_wait_timeout = 1 \
///      /*M! , max_statement_time = 5.000, wsrep_sync_wait = 7 */"
/// );
/// assert!(!format!("{config:?}").contains("s3cret"));
///
/// // Bad settings are refused with a typed error.
/// let bad = MySqlConfig::builder().table("x`; DROP TABLE y; --").build();
/// assert!(matches!(bad, Err(distrlock_core::Error::InvalidTableName { .. })));
/// ```
#[derive(Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(
        try_from = "crate::settings::Settings",
        into = "crate::settings::Settings"
    )
)]
pub struct MySqlConfig {
    /// One entry per host, in the order given; none when no connection was given.
    pub(crate) hosts: Vec<Opts>,
    pub(crate) table: TableName,
    pub(crate) pool_size: usize,
    pub(crate) min_pool_size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) max_clock_skew: Duration,
}

impl MySqlConfig {
    /// The default pool size: at most 10 open connections per host.
    pub const DEFAULT_POOL_SIZE: usize = 10;
    /// The default number of idle connections the pool keeps: 1.
    pub const DEFAULT_MIN_POOL_SIZE: usize = 1;
    /// The default connect timeout: 5 seconds.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default statement timeout: 5 seconds.
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default row-lock wait bound: 1 second.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
    /// The default [`max_clock_skew`](Self::max_clock_skew): none, right for a
    /// single server (one clock).
    pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::ZERO;
    /// The longest [`max_clock_skew`](Self::max_clock_skew) accepted: one hour.
    pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);
    /// The URL parameter that sets [`max_clock_skew`](Self::max_clock_skew):
    /// `?max_clock_skew=2s` (also `500ms`, `1.5s`, `0`).
    pub const MAX_CLOCK_SKEW_PARAM: &'static str = "max_clock_skew";
    /// The longest timeout any setting accepts: one day.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
    /// How much longer than the statement timeout the client waits for an answer
    /// before giving up on the connection, so that the server's own timeout (a
    /// clean error on a healthy connection) normally comes first.
    pub const CLIENT_TIMEOUT_MARGIN: Duration = Duration::from_millis(500);

    /// A builder with every default: no connection yet, table
    /// `distributed_locks`, up to 10 connections keeping 1 idle, 5 s connect
    /// and statement timeouts, 1 s row-lock wait bound, no clock skew.
    pub fn builder() -> MySqlConfigBuilder {
        MySqlConfigBuilder::default()
    }

    /// The connection options of each host, in order (empty when no
    /// connection was given, as for a backend on your own pool).
    pub fn hosts(&self) -> &[Opts] {
        &self.hosts
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The most connections the backend's pool opens per host.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// How many idle connections the pool keeps open per host.
    pub fn min_pool_size(&self) -> usize {
        self.min_pool_size
    }

    /// How long getting a connection may take, including opening a new one.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// How long one statement may run (see
    /// [`MySqlConfigBuilder::statement_timeout`]).
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// How long a statement waits for a row lock held by another transaction
    /// (see [`MySqlConfigBuilder::lock_timeout`]).
    pub fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// How far apart the clocks of the servers behind this backend may be (see
    /// [`MySqlConfigBuilder::max_clock_skew`]).
    pub fn max_clock_skew(&self) -> Duration {
        self.max_clock_skew
    }

    /// The row-lock wait bound in the whole seconds the server uses: the
    /// [`lock_timeout`](Self::lock_timeout) rounded up, at least 1.
    pub fn lock_timeout_secs(&self) -> u64 {
        lock_timeout_secs(self.lock_timeout)
    }

    /// How long the client waits for one statement's answer: the statement
    /// timeout plus [`CLIENT_TIMEOUT_MARGIN`](Self::CLIENT_TIMEOUT_MARGIN).
    pub fn call_timeout(&self) -> Duration {
        self.statement_timeout + Self::CLIENT_TIMEOUT_MARGIN
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
    /// ([`session_settings_sql`](Self::session_settings_sql)) spends at most this long
    /// in the server before the comparison, and no answer that comes later is
    /// accepted by the backend's pooled calls, so an unpinned clock is never
    /// refused. A clock pinned less than this far in the past is not detected.
    pub fn clock_tolerance(&self) -> Duration {
        clock_tolerance(self.statement_timeout, self.lock_timeout)
    }

    /// The statement that applies this config's row-lock wait bound and (on
    /// MariaDB) statement timeout and Galera causal reads (`wsrep_sync_wait =
    /// 7`: a node first catches up with what the cluster has committed) to a
    /// session.
    ///
    /// Backends built by [`MySqlBackend::from_config`](crate::MySqlBackend::from_config)
    /// run it on every new connection. For a pool of your own
    /// ([`MySqlBackend::from_pool`](crate::MySqlBackend::from_pool)), build the
    /// pool from [`pool_opts`](Self::pool_opts), or add this to its
    /// `OptsBuilder::setup(…)`, so its connections get the same bounds. It is the
    /// same text on MySQL and MariaDB (the MariaDB-only part sits in a `/*M! */`
    /// comment that MySQL skips).
    pub fn session_settings_sql(&self) -> String {
        sql::session_setup(
            self.lock_timeout_secs(),
            self.statement_timeout.as_secs_f64(),
        )
    }

    /// The options a backend's pool for `opts` is built from: everything from
    /// `opts` except the pool limits (from this config), idle connections beyond
    /// the minimum kept for 60 s unless `opts` says otherwise, connection reset
    /// on return to the pool (off: the pool runs only this backend's statements,
    /// and a reset would drop their prepared form and cost a round trip), the
    /// prepared-statement cache (at least 16 per connection), and
    /// [`session_settings_sql`](Self::session_settings_sql) added to the setup
    /// statements.
    pub fn pool_opts(&self, opts: Opts) -> Opts {
        let constraints = PoolConstraints::new(self.min_pool_size, self.pool_size)
            .expect("build() checked min_pool_size <= pool_size");
        let pool_opts = opts
            .pool_opts()
            .clone()
            .with_constraints(constraints)
            .with_reset_connection(false);
        // mysql_async closes every returned connection beyond the minimum
        // unless idle connections may live a while: without this, a burst of
        // concurrent calls reconnects for most of them (measured in the benchmark:
        // 13,103 new connections for 21,018 cycles).
        let pool_opts = if pool_opts.inactive_connection_ttl().is_zero() {
            pool_opts.with_inactive_connection_ttl(Duration::from_secs(60))
        } else {
            pool_opts
        };
        // mysql_async runs the setup statements last to first: put ours first so
        // that it runs last and its settings (autocommit on, the bounds) win over
        // anything in `opts`.
        let mut setup = opts.setup().to_vec();
        setup.insert(0, self.session_settings_sql());
        let stmt_cache = opts.stmt_cache_size().max(16);
        OptsBuilder::from_opts(opts)
            .pool_opts(pool_opts)
            .setup(setup)
            .stmt_cache_size(stmt_cache)
            .into()
    }

    /// `host:port/database` of each host, comma-separated, for `Debug` and
    /// logs: never the user or password.
    pub(crate) fn servers(&self) -> String {
        self.hosts
            .iter()
            .map(describe_server)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Default for MySqlConfig {
    fn default() -> Self {
        MySqlConfig::builder()
            .build()
            .expect("the defaults are valid")
    }
}

impl fmt::Debug for MySqlConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlConfig")
            .field("servers", &self.servers())
            .field("table", &self.table)
            .field("pool_size", &self.pool_size)
            .field("min_pool_size", &self.min_pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("max_clock_skew", &self.max_clock_skew)
            .finish()
    }
}

/// Builds a [`MySqlConfig`]; see [`MySqlConfig::builder`]. Every setter takes
/// and returns the builder, so calls chain; nothing is checked until
/// [`build`](Self::build).
#[derive(Clone, Default)]
pub struct MySqlConfigBuilder {
    url: Option<String>,
    hosts: Option<Vec<Opts>>,
    password: Option<String>,
    table: Option<String>,
    pool_size: Option<usize>,
    min_pool_size: Option<usize>,
    connect_timeout: Option<Duration>,
    statement_timeout: Option<Duration>,
    lock_timeout: Option<Duration>,
    max_clock_skew: Option<Duration>,
}

impl MySqlConfigBuilder {
    /// Connects with `url` (`mysql://user:password@host:port/database?…`, see
    /// [`mysql_async::Opts`] for the parameters). Replaces [`opts`](Self::opts)
    /// and [`hosts`](Self::hosts).
    ///
    /// The URL may name several hosts, comma-separated:
    /// `mysql://app:secret@db1:3306,db2:3306,db3:3306/app`. The backend then
    /// keeps a pool per host, uses the first one that accepts connections, and
    /// moves to the next (in order, wrapping around) when getting a connection
    /// from the current one fails, or when its node reports that it is not
    /// part of the cluster's primary component (Galera's 1047/1180); see
    /// "Several hosts" on [`MySqlBackend`](crate::MySqlBackend). The other parts
    /// of the URL (user, password, database, parameters) apply to every host.
    ///
    /// Besides mysql_async's parameters, it takes distrlock's own
    /// `max_clock_skew=2s`, which sets [`max_clock_skew`](Self::max_clock_skew)
    /// unless that is called too, and is taken out before the rest goes to the
    /// driver.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self.hosts = None;
        self
    }

    /// Connects with driver options (a URL's options changed in code: TLS
    /// settings, a socket). Replaces [`url`](Self::url) and
    /// [`hosts`](Self::hosts).
    pub fn opts(self, opts: impl Into<Opts>) -> Self {
        self.hosts(vec![opts.into()])
    }

    /// Connects to several hosts (say, the nodes of a Galera cluster), one pool
    /// per entry, used in turn as for a URL with several hosts
    /// ([`url`](Self::url)). Replaces [`url`](Self::url) and
    /// [`opts`](Self::opts).
    pub fn hosts(mut self, hosts: Vec<Opts>) -> Self {
        self.hosts = Some(hosts);
        self.url = None;
        self
    }

    /// The password for every host, replacing the one in the URL or options:
    /// for a password kept apart from the rest of the settings.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// The lock table: `table` or `database.table`, each part
    /// `[A-Za-z_][A-Za-z0-9_]*` of at most 63 bytes. It is always backquoted in
    /// SQL, so mixed case is kept. Without a database, the connection's default
    /// database (from the URL) is used. Default `distributed_locks`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// The most connections the backend's pool opens per host (default 10).
    /// Ignored by [`MySqlBackend::from_pool`](crate::MySqlBackend::from_pool),
    /// whose pool has its own limits.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size);
        self
    }

    /// How many idle connections the pool keeps open per host (default 1, at
    /// most [`pool_size`](Self::pool_size)). Ignored by
    /// [`MySqlBackend::from_pool`](crate::MySqlBackend::from_pool).
    pub fn min_pool_size(mut self, size: usize) -> Self {
        self.min_pool_size = Some(size);
        self
    }

    /// How long getting a connection may take, including opening a new one
    /// (default 5 s). After that the call fails with [`Error::Unavailable`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// How long one statement may run (default 5 s).
    ///
    /// On MariaDB the server enforces it (`max_statement_time`, error 1969, a
    /// transient error). On every server the client also stops waiting
    /// [`CLIENT_TIMEOUT_MARGIN`](MySqlConfig::CLIENT_TIMEOUT_MARGIN) later, drops
    /// the connection and returns [`Error::Unavailable`]; that is the bound on
    /// MySQL, whose `max_execution_time` covers only `SELECT`.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// How long a statement waits for a row lock held by another transaction
    /// (default 1 s), as the session's `innodb_lock_wait_timeout` (and
    /// `lock_wait_timeout`, for the table's metadata lock): the same concept as
    /// PostgreSQL's `lock_timeout`. The server counts whole seconds, so this is
    /// rounded up to at least one second. A try-acquire on a row that another
    /// open transaction has locked answers
    /// [`AcquireOutcome::Held`](distrlock_core::AcquireOutcome::Held) with no
    /// remaining lease after this long (the key is busy, the holder unknown);
    /// an extend or release gives a transient [`Error::Backend`] (error 1205:
    /// the statement was rolled back, nothing changed).
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// How far apart the clocks of the servers behind this backend may be
    /// (default 0, or the URL's `max_clock_skew`; this call wins over the URL):
    /// a lease counts as expired for a *takeover* only this long after its end,
    /// in the manner of CockroachDB's maximum clock offset.
    ///
    /// Every statement judges expiry on the clock of the server that runs it.
    /// On one server that is one clock, and 0 is right. On a Galera cluster
    /// every node has its own: a node whose clock runs 1.5 s ahead sees a
    /// lease written on another node end 1.5 s early, and lets a second
    /// client in while the holder still holds (measured in `tests/galera.rs`
    /// with a 2 s ttl: 9 overlaps of up to 327 ms in 41 handovers). With
    /// `max_clock_skew` at least the largest difference between node clocks, a
    /// try-acquire by another token is refused until the lease's end plus this
    /// bound, so it can never begin before the holder's lease ended on the
    /// holder's own clock.
    ///
    /// - The holder's own extend and release are unchanged: they need the lease
    ///   live by their node's clock, as before.
    /// - A takeover waits longer: the lease of a holder that died blocks the key
    ///   for `ttl + max_clock_skew` (contract item 4 of
    ///   [`LockBackend`](distrlock_core::LockBackend)); a refused try reports
    ///   the remaining lease including this bound. The same token acquiring
    ///   again after its own lease ran out waits out the bound too.
    /// - [`inspect`](distrlock_core::LockBackend::inspect) and `list` still
    ///   report the lease as expired from its end on.
    ///
    /// A safe value for a cluster: the largest clock difference NTP lets your
    /// nodes reach, with a margin — 500 ms for nodes kept in sync by NTP or
    /// chrony on one network (they normally agree within a few milliseconds),
    /// and more across regions or where NTP may be down for a while. Nodes whose
    /// clocks differ by more than this can still overlap by the excess. At most
    /// [`MAX_CLOCK_SKEW`](MySqlConfig::MAX_CLOCK_SKEW).
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = Some(skew);
        self
    }

    /// Validates every setting.
    ///
    /// Errors: [`Error::InvalidTableName`] for a bad table name,
    /// [`Error::InvalidConfig`] for anything else out of range or an
    /// unparsable URL (its message never contains the password).
    pub fn build(self) -> Result<MySqlConfig> {
        let (hosts, url_skew) = match (self.url, self.hosts) {
            (Some(url), _) => parse_url(&url)?,
            (None, Some(hosts)) => {
                if hosts.is_empty() {
                    return Err(invalid("at least one host is needed"));
                }
                (hosts, None)
            }
            (None, None) => (Vec::new(), None),
        };
        let hosts = match self.password {
            Some(password) => hosts
                .into_iter()
                .map(|opts| {
                    OptsBuilder::from_opts(opts)
                        .pass(Some(password.clone()))
                        .into()
                })
                .collect(),
            None => hosts,
        };
        let table = match self.table {
            Some(name) => TableName::new(&name)?,
            None => TableName::default(),
        };
        let pool_size = self.pool_size.unwrap_or(MySqlConfig::DEFAULT_POOL_SIZE);
        let min_pool_size = self
            .min_pool_size
            .unwrap_or(MySqlConfig::DEFAULT_MIN_POOL_SIZE.min(pool_size));
        if pool_size == 0 {
            return Err(invalid("pool_size must be at least 1"));
        }
        if min_pool_size > pool_size {
            return Err(invalid(&format!(
                "min_pool_size ({min_pool_size}) must not exceed pool_size ({pool_size})"
            )));
        }
        let max_clock_skew = self
            .max_clock_skew
            .or(url_skew)
            .unwrap_or(MySqlConfig::DEFAULT_MAX_CLOCK_SKEW);
        if max_clock_skew > MySqlConfig::MAX_CLOCK_SKEW {
            return Err(invalid(&format!(
                "max_clock_skew must be at most one hour, got {max_clock_skew:?}"
            )));
        }
        let connect_timeout = self
            .connect_timeout
            .unwrap_or(MySqlConfig::DEFAULT_CONNECT_TIMEOUT);
        let statement_timeout = self
            .statement_timeout
            .unwrap_or(MySqlConfig::DEFAULT_STATEMENT_TIMEOUT);
        let lock_timeout = self
            .lock_timeout
            .unwrap_or(MySqlConfig::DEFAULT_LOCK_TIMEOUT);
        for (name, value) in [
            ("connect_timeout", connect_timeout),
            ("statement_timeout", statement_timeout),
            ("lock_timeout", lock_timeout),
        ] {
            // A statement timeout under 1 ms would print as 0.000 s, which
            // MariaDB reads as "no limit".
            if value < Duration::from_millis(1) {
                return Err(invalid(&format!(
                    "{name} must be at least 1 ms, got {value:?}"
                )));
            }
            if value > MySqlConfig::MAX_TIMEOUT {
                return Err(invalid(&format!(
                    "{name} must be at most one day, got {value:?}"
                )));
            }
        }
        Ok(MySqlConfig {
            hosts,
            table,
            pool_size,
            min_pool_size,
            connect_timeout,
            statement_timeout,
            lock_timeout,
            max_clock_skew,
        })
    }
}

impl fmt::Debug for MySqlConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MySqlConfigBuilder")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field(
                "hosts",
                &self
                    .hosts
                    .as_ref()
                    .map(|hosts| hosts.iter().map(describe_server).collect::<Vec<_>>()),
            )
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn lock_timeout_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

fn clock_tolerance(statement_timeout: Duration, lock_timeout: Duration) -> Duration {
    let waits = Duration::from_secs(2 * lock_timeout_secs(lock_timeout));
    statement_timeout.max(waits) + MySqlConfig::CLIENT_TIMEOUT_MARGIN
}

/// Splits `url` into one [`Opts`] per host, taking out distrlock's own
/// parameter (the clock skew).
fn parse_url(url: &str) -> Result<(Vec<Opts>, Option<Duration>)> {
    let bad = |e: &dyn fmt::Display| Error::InvalidConfig {
        reason: format!("invalid MySQL URL: {e}"),
    };
    let (url, skew) = take_param(url, MySqlConfig::MAX_CLOCK_SKEW_PARAM);
    let skew = skew
        .map(|skew| {
            parse_duration(&skew).ok_or_else(|| {
                bad(&format!(
                    "{}={skew:?} is not a duration such as 2s, 500ms or 1.5s",
                    MySqlConfig::MAX_CLOCK_SKEW_PARAM
                ))
            })
        })
        .transpose()?;
    let hosts = split_hosts(&url)
        .iter()
        .map(|url| Opts::from_url(url).map_err(|e| bad(&e)))
        .collect::<Result<Vec<_>>>()?;
    Ok((hosts, skew))
}

fn invalid(reason: &str) -> Error {
    Error::InvalidConfig {
        reason: reason.to_owned(),
    }
}

/// `url` without its parameter `name`, and that parameter's value (the last
/// one, if it appears several times).
fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None);
    };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if k == name {
                value = Some(v.to_owned());
                false
            } else {
                true
            }
        })
        .collect();
    if kept.is_empty() {
        (base.to_owned(), value)
    } else {
        (format!("{base}?{}", kept.join("&")), value)
    }
}

/// `2s`, `500ms`, `1.5s`, `250us`, `0`: a duration of at most a day.
fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let secs = match unit {
        "s" => number,
        "ms" => number / 1e3,
        "us" | "µs" => number / 1e6,
        "m" | "min" => number * 60.0,
        _ => return None,
    };
    (secs.is_finite() && (0.0..=86_400.0).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

/// One URL per host of a URL that names several, comma-separated, between the
/// user information and the path: `mysql://u:p@h1:1,h2:2/db?x` gives
/// `mysql://u:p@h1:1/db?x` and `mysql://u:p@h2:2/db?x`. A URL with one host
/// comes back as it is.
fn split_hosts(url: &str) -> Vec<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return vec![url.to_owned()];
    };
    // The host list ends at the path or the query; the user information ends at
    // the last `@` before that (a password's own `@` must be percent-encoded,
    // but the last one is the separator either way).
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hosts) = match authority.rfind('@') {
        Some(at) => (&authority[..=at], &authority[at + 1..]),
        None => ("", authority),
    };
    if !hosts.contains(',') {
        return vec![url.to_owned()];
    }
    hosts
        .split(',')
        .map(|host| format!("{scheme}://{userinfo}{}{tail}", host.trim()))
        .collect()
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

    const URL: &str = "mysql://user:hunter2-secret@db.example:3307/app";

    #[test]
    fn refuses_bad_settings_with_typed_errors() {
        let b = || MySqlConfig::builder().url(URL);
        let cases: Vec<(MySqlConfigBuilder, &str)> = vec![
            (b().pool_size(0), "pool_size"),
            (b().pool_size(2).min_pool_size(3), "min_pool_size"),
            (b().connect_timeout(Duration::ZERO), "connect_timeout"),
            (
                b().statement_timeout(Duration::from_secs(100_000)),
                "statement_timeout",
            ),
            (b().lock_timeout(Duration::ZERO), "lock_timeout"),
            (
                // Would print as 0.000 s, which MariaDB reads as "no limit".
                b().statement_timeout(Duration::from_micros(400)),
                "statement_timeout",
            ),
            (b().hosts(Vec::new()), "host"),
        ];
        for (builder, field) in cases {
            match builder.build() {
                Err(Error::InvalidConfig { reason }) => assert!(reason.contains(field), "{reason}"),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
        for bad in ["", "a.b.c", "x`; DROP TABLE y; --", "t;", "1t", "a b"] {
            assert!(
                matches!(b().table(bad).build(), Err(Error::InvalidTableName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn rounds_the_row_lock_bound_up_to_whole_seconds() {
        assert_eq!(lock_timeout_secs(Duration::from_millis(1)), 1);
        assert_eq!(lock_timeout_secs(Duration::from_secs(1)), 1);
        assert_eq!(lock_timeout_secs(Duration::from_millis(1001)), 2);
        assert_eq!(lock_timeout_secs(Duration::from_secs(30)), 30);
    }

    #[test]
    fn clock_tolerance_covers_the_session_bounds() {
        let config = |b: MySqlConfigBuilder| b.build().unwrap().clock_tolerance();
        assert_eq!(config(MySqlConfig::builder()), Duration::from_millis(5500));
        // Two row-lock waits of 3 s (2.5 s rounded up) outlast a 5 s statement.
        assert_eq!(
            config(MySqlConfig::builder().lock_timeout(Duration::from_millis(2500))),
            Duration::from_millis(6500)
        );
        assert_eq!(
            config(MySqlConfig::builder().statement_timeout(Duration::from_secs(1))),
            Duration::from_millis(2500)
        );
    }

    #[test]
    fn urls_with_several_hosts_and_our_parameters() {
        assert_eq!(
            split_hosts("mysql://u:p@h1:1,h2:2/db?x=1"),
            ["mysql://u:p@h1:1/db?x=1", "mysql://u:p@h2:2/db?x=1"]
        );
        assert_eq!(split_hosts("mysql://u@h/db"), ["mysql://u@h/db"]);
        assert_eq!(split_hosts("mysql://h1,h2"), ["mysql://h1", "mysql://h2"]);
        assert_eq!(
            take_param("mysql://h/db?a=1&max_clock_skew=2s&b=2", "max_clock_skew"),
            ("mysql://h/db?a=1&b=2".to_owned(), Some("2s".to_owned()))
        );
        assert_eq!(
            take_param("mysql://h/db?max_clock_skew=2s", "max_clock_skew"),
            ("mysql://h/db".to_owned(), Some("2s".to_owned()))
        );
        for (text, ms) in [("2s", 2000), ("500ms", 500), ("1.5s", 1500), ("0", 0)] {
            assert_eq!(
                parse_duration(text),
                Some(Duration::from_millis(ms)),
                "{text}"
            );
        }
        for bad in ["", "2", "x", "-1s", "2h", "1e9s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
        let config = MySqlConfig::builder()
            .url("mysql://u@a:3306,b:3307/db?max_clock_skew=1500ms&prefer_socket=false")
            .build()
            .unwrap();
        assert_eq!(config.max_clock_skew(), Duration::from_millis(1500));
        assert_eq!(config.hosts().len(), 2);
        assert_eq!(
            (
                config.hosts()[1].ip_or_hostname(),
                config.hosts()[1].tcp_port()
            ),
            ("b", 3307)
        );
        // A setter wins over the URL.
        let config = MySqlConfig::builder()
            .url("mysql://u@a/db?max_clock_skew=1500ms")
            .max_clock_skew(Duration::from_secs(2))
            .build()
            .unwrap();
        assert_eq!(config.max_clock_skew(), Duration::from_secs(2));
        assert!(matches!(
            MySqlConfig::builder().url("mysql://h/db?max_clock_skew=soon").build(),
            Err(Error::InvalidConfig { reason }) if reason.contains("max_clock_skew")
        ));
        assert!(matches!(
            MySqlConfig::builder()
                .max_clock_skew(Duration::from_secs(7200))
                .build(),
            Err(Error::InvalidConfig { reason }) if reason.contains("max_clock_skew")
        ));
    }

    #[test]
    fn debug_never_shows_the_password() {
        let config = MySqlConfig::builder().url(URL).build().unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("db.example:3307/app"), "{shown}");
        let builder = MySqlConfig::builder().url(URL).password("hunter3");
        let shown = format!("{builder:?}");
        assert!(!shown.contains("hunter"), "{shown}");
        let bad = MySqlConfig::builder()
            .url("mysql://user:hunter2-secret@db.example:notaport/app")
            .build()
            .unwrap_err();
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
    }

    #[test]
    fn a_password_set_apart_replaces_the_urls() {
        let config = MySqlConfig::builder()
            .url("mysql://user:old@a,b/app")
            .password("new")
            .build()
            .unwrap();
        assert!(config.hosts().iter().all(|o| o.pass() == Some("new")));
    }
}
