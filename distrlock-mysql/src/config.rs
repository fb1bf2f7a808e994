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
///      /*M! , max_statement_time = 5.000, wsrep_sync_wait = 7 */"
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
    pub(crate) max_clock_skew: Duration,
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
    /// The default [`max_clock_skew`](Self::max_clock_skew): none, right for a
    /// single server (one clock).
    pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::ZERO;
    /// The longest [`max_clock_skew`](Self::max_clock_skew) accepted: one hour.
    pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60 * 60);
    /// The URL parameter that sets [`max_clock_skew`](Self::max_clock_skew) in
    /// [`connect`](Self::connect): `?max_clock_skew=2s` (also `500ms`, `1.5s`,
    /// `0`).
    pub const MAX_CLOCK_SKEW_PARAM: &'static str = "max_clock_skew";
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
            max_clock_skew: Self::DEFAULT_MAX_CLOCK_SKEW,
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

    /// How far apart the clocks of the servers behind this backend may be
    /// (default 0): a lease counts as expired for a *takeover* only this long
    /// after its end, in the manner of CockroachDB's maximum clock offset.
    ///
    /// Every statement judges expiry on the clock of the server that runs it.
    /// On one server that is one clock, and 0 is right. On a Galera cluster
    /// every node has its own: a node whose clock runs 1.5 s ahead sees a
    /// lease written on another node end 1.5 s early, and lets a second
    /// client in while the holder still holds (measured in `tests/galera.rs`
    /// with a 2 s ttl: 9 overlaps of up to 327 ms in 41 handovers). With `max_clock_skew` at least the largest
    /// difference between node clocks, a try-acquire by another token is
    /// refused until the lease's end plus this bound, so it can never begin
    /// before the holder's lease ended on the holder's own clock.
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
    /// [`MAX_CLOCK_SKEW`](Self::MAX_CLOCK_SKEW); also settable in the URL
    /// given to [`connect`](Self::connect) as `?max_clock_skew=500ms`.
    pub fn max_clock_skew(mut self, skew: Duration) -> Self {
        self.max_clock_skew = skew;
        self
    }

    /// The configured [`max_clock_skew`](Self::max_clock_skew).
    pub fn clock_skew(&self) -> Duration {
        self.max_clock_skew
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
    /// MariaDB) statement timeout and Galera causal reads (`wsrep_sync_wait =
    /// 7`: a node first catches up with what the cluster has committed) to a
    /// session.
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
    /// The URL may name several hosts, comma-separated:
    /// `mysql://app:secret@db1:3306,db2:3306,db3:3306/app`. The backend then
    /// keeps a pool per host, uses the first one that accepts connections, and
    /// moves to the next (in order, wrapping around) when getting a connection
    /// from the current one fails, or when its node reports that it is not
    /// part of the cluster's primary component (Galera's 1047/1180); see
    /// "Several hosts" on [`MySqlBackend`]. The other parts of the URL (user,
    /// password, database, parameters) apply to every host.
    ///
    /// Besides mysql_async's parameters, `max_clock_skew=2s` sets
    /// [`max_clock_skew`](Self::max_clock_skew) (the URL's value wins over the
    /// config's).
    ///
    /// Errors: [`Error::InvalidConfig`] for a bad URL or setting,
    /// [`Error::InvalidTableName`], [`Error::Unavailable`] when no host can
    /// be reached, [`Error::Backend`] when it refuses (for example wrong
    /// credentials). No error text contains the password.
    pub async fn connect(self, url: &str) -> Result<MySqlBackend> {
        let (config, hosts) = self.parse_url(url)?;
        let backend = config.build_hosts(hosts)?;
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

    /// Splits `url` into one [`Opts`] per host, taking out (and applying) the
    /// parameters of this crate.
    fn parse_url(mut self, url: &str) -> Result<(Self, Vec<Opts>)> {
        let bad = |e: &dyn std::fmt::Display| Error::InvalidConfig {
            reason: format!("invalid MySQL URL: {e}"),
        };
        let (url, skew) = take_param(url, Self::MAX_CLOCK_SKEW_PARAM);
        if let Some(skew) = skew {
            self.max_clock_skew = parse_duration(&skew).ok_or_else(|| {
                bad(&format!(
                    "{}={skew:?} is not a duration such as 2s, 500ms or 1.5s",
                    Self::MAX_CLOCK_SKEW_PARAM
                ))
            })?;
        }
        let hosts = split_hosts(&url)
            .iter()
            .map(|url| Opts::from_url(url).map_err(|e| bad(&e)))
            .collect::<Result<Vec<_>>>()?;
        Ok((self, hosts))
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
        self.build_hosts(vec![opts.into()])
    }

    /// Builds a backend on several hosts (say, the nodes of a Galera
    /// cluster), one pool per entry of `hosts`, without connecting yet: it
    /// uses the first host that accepts connections and moves to the next on
    /// failure, as for a URL with several hosts ([`connect`](Self::connect)).
    /// Each pool is built from its `Opts` as in [`build`](Self::build).
    pub fn build_hosts(self, hosts: Vec<Opts>) -> Result<MySqlBackend> {
        let settings = self.validate()?;
        if hosts.is_empty() {
            return Err(invalid("at least one host is needed"));
        }
        let servers: Vec<String> = hosts.iter().map(describe_server).collect();
        let pools = hosts
            .into_iter()
            .map(|opts| self.pool(opts, &settings))
            .collect::<Result<Vec<_>>>()?;
        Ok(MySqlBackend::new(
            pools,
            true,
            Some(servers.join(",")),
            settings,
        ))
    }

    fn pool(&self, opts: Opts, settings: &Settings) -> Result<Pool> {
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
        Ok(Pool::new(builder))
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
        Ok(MySqlBackend::new(vec![pool], false, None, settings))
    }

    fn validate(&self) -> Result<Settings> {
        let table = TableName::new(&self.table)?;
        if self.max_connections == 0 {
            return Err(invalid("max_connections must be at least 1"));
        }
        if self.min_connections > self.max_connections {
            return Err(invalid("min_connections must not exceed max_connections"));
        }
        if self.max_clock_skew > Self::MAX_CLOCK_SKEW {
            return Err(invalid(&format!(
                "max_clock_skew must be at most one hour, got {:?}",
                self.max_clock_skew
            )));
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
        let (config, hosts) = MySqlConfig::new()
            .parse_url("mysql://u@a:3306,b:3307/db?max_clock_skew=1500ms&prefer_socket=false")
            .unwrap();
        assert_eq!(config.clock_skew(), Duration::from_millis(1500));
        assert_eq!(hosts.len(), 2);
        assert_eq!(
            (hosts[1].ip_or_hostname(), hosts[1].tcp_port()),
            ("b", 3307)
        );
        assert!(matches!(
            MySqlConfig::new().parse_url("mysql://h/db?max_clock_skew=soon"),
            Err(Error::InvalidConfig { reason }) if reason.contains("max_clock_skew")
        ));
        assert!(matches!(
            MySqlConfig::new()
                .max_clock_skew(Duration::from_secs(7200))
                .build(opts()),
            Err(Error::InvalidConfig { reason }) if reason.contains("max_clock_skew")
        ));
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
