//! [`PostgresConfig`] and its builder: where to connect and how to bound each call.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use distrlock_core::server_clock::ServerClock;
use distrlock_core::{Error, Result, TableName};
use tokio::time::Instant;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::config::Host;

use crate::sql;

/// Everything a [`PostgresBackend`](crate::PostgresBackend) needs besides its pool:
/// the connection settings, the lock table, and the bounds on every call.
///
/// Build one with [`PostgresConfig::builder`]; every setting is validated in
/// [`PostgresConfigBuilder::build`]. Its `Debug` output never shows the password.
///
/// ```
/// use std::time::Duration;
/// use distrlock_postgres::PostgresConfig;
///
/// let config = PostgresConfig::builder()
///     .url("postgres://app:s3cret@db.internal:5432/app")
///     .table("locks.Distributed_Locks")
///     .pool_size(8)
///     .lock_timeout(Duration::from_millis(500))
///     .build()
///     .unwrap();
/// assert_eq!(config.table().to_string(), "locks.Distributed_Locks");
/// assert!(!format!("{config:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(
        try_from = "crate::settings::Settings",
        into = "crate::settings::Settings"
    )
)]
pub struct PostgresConfig {
    pub(crate) pg: Option<tokio_postgres::Config>,
    pub(crate) table: TableName,
    pub(crate) pool_size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) application_name: String,
    pub(crate) listen: bool,
    /// The listening connection's own settings, if it does not use `pg`.
    pub(crate) listen_pg: Option<tokio_postgres::Config>,
    pub(crate) pooler: Pooler,
    pub(crate) max_ttl: Duration,
    pub(crate) failover_quarantine: bool,
    #[cfg(feature = "tls")]
    pub(crate) tls: Option<crate::tls::TlsConfig>,
    /// What the sessions have told of the server's clock: shared by the
    /// [`post_create_hook`](Self::post_create_hook), which reads it when a session
    /// is set up, and the backends built with this config (or a clone of it), whose
    /// every statement reads it again.
    pub(crate) server_clock: Arc<ServerClock>,
}

impl PostgresConfig {
    /// The default pool size.
    pub const DEFAULT_POOL_SIZE: usize = 16;
    /// The default bound on connecting (and on waiting for a pooled connection).
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default `statement_timeout` of the backend's sessions.
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
    /// The default `lock_timeout` of the backend's sessions: how long a statement
    /// may wait on a row lock held by another transaction.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(1);
    /// The default `application_name` of the backend's sessions.
    pub const DEFAULT_APPLICATION_NAME: &'static str = "distrlock";
    /// The default [`max_ttl`](PostgresConfigBuilder::max_ttl) of a new table:
    /// 5 minutes.
    pub const DEFAULT_MAX_TTL: Duration = sql::DEFAULT_MAX_TTL;

    /// A builder with every default: table `distributed_locks`, 16 connections,
    /// 5 s connect and statement timeouts, 1 s row-lock wait, release notifications
    /// on.
    pub fn builder() -> PostgresConfigBuilder {
        PostgresConfigBuilder::default()
    }

    /// The connection settings, if given (a backend made with
    /// [`from_pool`](crate::PostgresBackend::from_pool) may have none).
    pub fn pg_config(&self) -> Option<&tokio_postgres::Config> {
        self.pg.as_ref()
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The most connections the backend's own pool opens (not counting the one
    /// listening connection).
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// The bound on opening a connection and on waiting for a pooled one.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// The `statement_timeout` of each session.
    pub fn statement_timeout(&self) -> Duration {
        self.statement_timeout
    }

    /// The `lock_timeout` of each session: the bound on waiting for a row lock held
    /// by another transaction.
    pub fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// The `application_name` of each session (shown in `pg_stat_activity`).
    pub fn application_name(&self) -> &str {
        &self.application_name
    }

    /// Whether the backend keeps a `LISTEN` connection for release notifications:
    /// when [`listen`](PostgresConfigBuilder::listen) is on and there is a
    /// connection to listen on: the [`listen_url`](PostgresConfigBuilder::listen_url),
    /// or else the main connection, except behind a transaction pooler (a
    /// `LISTEN` needs a session of its own).
    pub fn listens(&self) -> bool {
        self.listen && self.listen_pg_config().is_some()
    }

    /// The connection the release listener uses: the
    /// [`listen_url`](PostgresConfigBuilder::listen_url) if one was given, else
    /// the main connection unless [`pooler`](Self::pooler) is
    /// [`Pooler::Transaction`]; `None` if there is none.
    pub fn listen_pg_config(&self) -> Option<&tokio_postgres::Config> {
        match (&self.listen_pg, self.pooler) {
            (Some(listen), _) => Some(listen),
            (None, Pooler::Session) => self.pg.as_ref(),
            (None, Pooler::Transaction) => None,
        }
    }

    /// What sits between the backend and PostgreSQL, as far as sessions go
    /// (see [`Pooler`]).
    pub fn pooler(&self) -> Pooler {
        self.pooler
    }

    /// The max_ttl that [`create_table`](distrlock_core::LockBackend::create_table)
    /// gives the table (see [`PostgresConfigBuilder::max_ttl`]).
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Whether a server on a new timeline grants nothing for the table's
    /// max_ttl (see [`PostgresConfigBuilder::failover_quarantine`]).
    pub fn failover_quarantine(&self) -> bool {
        self.failover_quarantine
    }

    /// What the statements are built with.
    pub(crate) fn failover(&self) -> sql::Failover {
        sql::Failover {
            max_ttl_us: i64::try_from(self.max_ttl.as_micros()).unwrap_or(i64::MAX),
            quarantine: self.failover_quarantine,
        }
    }

    /// The longest a single backend call may take, client side: waiting for a
    /// connection, running the statement, and one retry on a lost session all fit
    /// in it. Past it the call returns [`Error::Unavailable`].
    pub fn call_timeout(&self) -> Duration {
        self.connect_timeout + self.statement_timeout + Duration::from_millis(500)
    }

    /// The `SET` commands that give a session this config's bounds:
    /// `SET lock_timeout = …; SET statement_timeout = …; SET
    /// default_transaction_isolation = 'read committed'`.
    ///
    /// The backend runs them on every connection its own pool opens. With
    /// [`from_pool`](crate::PostgresBackend::from_pool), add
    /// [`post_create_hook`](Self::post_create_hook) to your pool so your sessions
    /// get them too, and recycle connections with `RecyclingMethod::Fast` or
    /// `Verified`: `Clean` runs `RESET ALL` when a connection returns to the pool,
    /// which drops these settings (calls would then wait on row locks without
    /// bound). Alternatively put them in the connection's startup options
    /// (`options=-c lock_timeout=…`), which survive `RESET ALL`.
    ///
    /// Behind a transaction pooler ([`Pooler::Transaction`]) the backend never
    /// sends them: each call sets the same bounds with `SET LOCAL` in its own
    /// transaction instead. An operator may still give the pooler's login role the
    /// same defaults (`ALTER ROLE … SET lock_timeout = …`), for the pooler's
    /// other clients and as a second line.
    pub fn session_settings_sql(&self) -> String {
        sql::session_settings(
            millis_ceil(self.lock_timeout),
            millis_ceil(self.statement_timeout),
        )
    }

    /// How each call opens its own transaction behind a transaction pooler:
    /// `BEGIN; SET LOCAL lock_timeout = …; SET LOCAL statement_timeout = …; SET
    /// LOCAL transaction_isolation = 'read committed'; SET LOCAL
    /// idle_in_transaction_session_timeout = …`.
    pub(crate) fn begin_sql(&self) -> String {
        sql::begin_with_settings(
            millis_ceil(self.lock_timeout),
            millis_ceil(self.statement_timeout),
        )
    }

    /// The `SET LOCAL` commands of [`begin_sql`](Self::begin_sql) without the
    /// `BEGIN`, to put first in a simple-query message that runs as one implicit
    /// transaction.
    pub(crate) fn local_settings_sql(&self) -> String {
        sql::transaction_settings(
            millis_ceil(self.lock_timeout),
            millis_ceil(self.statement_timeout),
        )
    }

    /// A deadpool `post_create` hook that runs
    /// [`session_settings_sql`](Self::session_settings_sql) on each new connection,
    /// for pools you build yourself and hand to
    /// [`from_pool`](crate::PostgresBackend::from_pool).
    ///
    /// In the same simple-query message (one round trip) it reads the server's
    /// clock, and hands the reading to the backends built with this config (or a
    /// clone of it): a backend needs one before its first lock statement, to bound
    /// it on the server's clock (see [`PostgresBackend`](crate::PostgresBackend)).
    /// Without the hook the backend reads the clock itself once, with one more
    /// round trip before its first statement.
    ///
    /// Behind a transaction pooler ([`Pooler::Transaction`]) the hook sends
    /// nothing: a pooled connection is no session of ours to set up, and every
    /// call brings its settings along. The backend then reads the server's clock
    /// once, before its first lock statement, and from every answer after that.
    pub fn post_create_hook(&self) -> deadpool_postgres::Hook {
        let setup = format!("{}; {}", self.session_settings_sql(), sql::CLOCK_READING);
        let clock = self.server_clock.clone();
        let pooler = self.pooler;
        deadpool_postgres::Hook::async_fn(move |client, _metrics| {
            let (setup, clock) = (setup.clone(), clock.clone());
            Box::pin(async move {
                if pooler == Pooler::Transaction {
                    return Ok(());
                }
                let messages = client
                    .simple_query(&setup)
                    .await
                    .map_err(deadpool_postgres::HookError::Backend)?;
                if let Some(server_us) = clock_reading(&messages) {
                    clock.observe(Instant::now(), server_us);
                }
                Ok(())
            })
        })
    }

    /// The clock the config's sessions report to.
    pub(crate) fn server_clock(&self) -> &Arc<ServerClock> {
        &self.server_clock
    }
}

/// What sits between the backend and PostgreSQL, as far as sessions go: set it
/// with [`PostgresConfigBuilder::pooler`] or the URL parameter
/// `distrlock_pooler=transaction`. The backend cannot tell reliably, so it never
/// guesses.
///
/// ```
/// use distrlock_postgres::{PostgresConfig, Pooler};
///
/// let config = PostgresConfig::builder()
///     .url("postgres://app@pgbouncer.internal:6432/app?distrlock_pooler=transaction")
///     .build()
///     .unwrap();
/// assert_eq!(config.pooler(), Pooler::Transaction);
/// assert!(!config.listens(), "no LISTEN through a transaction pooler");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Pooler {
    /// Each connection is one server session for its whole life: a direct
    /// connection, or a pooler in session mode (PgBouncer's `pool_mode =
    /// session`). Sessions are set up once (`SET lock_timeout`, …), statements
    /// are prepared once per connection, and one connection `LISTEN`s. The
    /// default.
    #[default]
    Session,
    /// A transaction pooler (PgBouncer's `pool_mode = transaction`, and poolers
    /// like it): each transaction of a connection may run on another server
    /// session, one that other clients use too. So the backend leaves no session
    /// state behind: no named prepared statements (each statement is sent
    /// unnamed, parsed every time), no `SET` (every call runs `BEGIN; SET LOCAL
    /// …; statement; COMMIT`, pipelined in one round trip), no `LISTEN` (waiters
    /// poll, unless a direct [`listen_url`](PostgresConfigBuilder::listen_url)
    /// is given). PgBouncer's statement mode, which refuses transactions, is not
    /// supported.
    Transaction,
}

impl Pooler {
    /// The value of the URL parameter: `session` or `transaction`.
    pub fn as_str(self) -> &'static str {
        match self {
            Pooler::Session => "session",
            Pooler::Transaction => "transaction",
        }
    }
}

impl fmt::Display for Pooler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Pooler {
    type Err = Error;

    /// `session` or `transaction`, in any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "session" => Ok(Pooler::Session),
            "transaction" => Ok(Pooler::Transaction),
            _ => Err(invalid(format!(
                "{POOLER_PARAM} must be `session` or `transaction`, got {s:?}"
            ))),
        }
    }
}

/// distrlock's own connection-string parameter, taken out before the driver
/// sees the rest (it refuses parameters it does not know).
const POOLER_PARAM: &str = "distrlock_pooler";

/// `conn` without its [`POOLER_PARAM`] parameters, and the last one's value, for
/// both forms of connection string tokio-postgres reads: a `postgres://…?a=b&…`
/// URL (split as the driver splits it: the parameters start at the first `?`
/// after the credentials' `@`) and a `key=value …` string (values bare or
/// single-quoted, with backslash escapes). A string the driver would not parse
/// comes back unchanged, for the driver to report.
fn split_pooler_param(conn: &str) -> (String, Option<String>) {
    let url_body = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|prefix| conn.strip_prefix(prefix).map(|body| (prefix.len(), body)));
    match url_body {
        Some((prefix_len, body)) => {
            let after_credentials = body.find('@').map_or(0, |at| at + 1);
            let Some(question) = body[after_credentials..].find('?') else {
                return (conn.to_owned(), None);
            };
            let params_at = prefix_len + after_credentials + question;
            let mut value = None;
            let kept: Vec<&str> = conn[params_at + 1..]
                .split('&')
                .filter(|param| {
                    let (key, v) = param.split_once('=').unwrap_or((param, ""));
                    if percent_decode(key) == POOLER_PARAM {
                        value = Some(percent_decode(v));
                        false
                    } else {
                        true
                    }
                })
                .collect();
            let mut rest = conn[..params_at].to_owned();
            if !kept.is_empty() {
                rest.push('?');
                rest.push_str(&kept.join("&"));
            }
            (rest, value)
        }
        None => split_key_value(conn).unwrap_or_else(|| (conn.to_owned(), None)),
    }
}

/// [`split_pooler_param`] for a `key=value …` string; `None` if it does not parse.
fn split_key_value(conn: &str) -> Option<(String, Option<String>)> {
    let mut chars = conn.char_indices().peekable();
    let mut rest = String::with_capacity(conn.len());
    let mut value_found = None;
    let mut kept_from = 0;
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            break;
        };
        let mut key_end = start;
        while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace() && *c != '=') {
            key_end = i + c.len_utf8();
        }
        let key = &conn[start..key_end];
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        chars.next_if(|(_, c)| *c == '=')?;
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        let end = if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next()? {
                    (i, '\'') => break i + 1,
                    (_, '\\') => value.push(chars.next()?.1),
                    (_, c) => value.push(c),
                }
            }
        } else {
            let mut end = None;
            while let Some((i, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                end = Some(i + c.len_utf8());
                if c == '\\' {
                    let (j, escaped) = chars.next()?;
                    end = Some(j + escaped.len_utf8());
                    value.push(escaped);
                } else {
                    value.push(c);
                }
            }
            end?
        };
        if key == POOLER_PARAM {
            rest.push_str(&conn[kept_from..start]);
            kept_from = end;
            value_found = Some(value);
        }
    }
    rest.push_str(&conn[kept_from..]);
    Some((rest, value_found))
}

/// `%XX` escapes decoded (anything malformed kept as it is).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The µs reading in the answer of a simple query ending with
/// [`sql::CLOCK_READING`], if it has one.
pub(crate) fn clock_reading(messages: &[SimpleQueryMessage]) -> Option<i64> {
    messages.iter().rev().find_map(|message| match message {
        SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
        _ => None,
    })
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self {
            pg: None,
            table: TableName::default(),
            pool_size: Self::DEFAULT_POOL_SIZE,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            statement_timeout: Self::DEFAULT_STATEMENT_TIMEOUT,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
            application_name: Self::DEFAULT_APPLICATION_NAME.to_owned(),
            listen: true,
            listen_pg: None,
            pooler: Pooler::Session,
            max_ttl: Self::DEFAULT_MAX_TTL,
            failover_quarantine: true,
            #[cfg(feature = "tls")]
            tls: None,
            server_clock: Arc::new(ServerClock::new()),
        }
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("PostgresConfig");
        d.field("connection", &self.pg.as_ref().map(Redacted));
        d.field("table", &self.table)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("application_name", &self.application_name)
            .field("listen", &self.listen)
            .field("listen_connection", &self.listen_pg.as_ref().map(Redacted))
            .field("pooler", &self.pooler)
            .field("max_ttl", &self.max_ttl)
            .field("failover_quarantine", &self.failover_quarantine);
        #[cfg(feature = "tls")]
        d.field("tls", &self.tls);
        d.finish()
    }
}

/// A connection config shown without its password.
pub(crate) struct Redacted<'a>(pub(crate) &'a tokio_postgres::Config);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pg = self.0;
        let hosts: Vec<String> = pg
            .get_hosts()
            .iter()
            .map(|h| match h {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        f.debug_struct("Connection")
            .field("hosts", &hosts)
            .field("ports", &pg.get_ports())
            .field("dbname", &pg.get_dbname())
            .field("user", &pg.get_user())
            .field(
                "password",
                &pg.get_password().map(|_| format_args!("<redacted>")),
            )
            .field("ssl_mode", &pg.get_ssl_mode())
            .finish_non_exhaustive()
    }
}

/// Builds a [`PostgresConfig`]; see [`PostgresConfig::builder`].
#[derive(Default)]
pub struct PostgresConfigBuilder {
    url: Option<String>,
    pg: Option<tokio_postgres::Config>,
    table: Option<String>,
    pool_size: Option<usize>,
    connect_timeout: Option<Duration>,
    statement_timeout: Option<Duration>,
    lock_timeout: Option<Duration>,
    application_name: Option<String>,
    listen: Option<bool>,
    listen_url: Option<String>,
    listen_pg: Option<tokio_postgres::Config>,
    pooler: Option<Pooler>,
    password: Option<String>,
    max_ttl: Option<Duration>,
    failover_quarantine: Option<bool>,
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsConfig>,
}

impl PostgresConfigBuilder {
    /// Connects with a `postgres://user:password@host:port/dbname?…` URL or a
    /// `host=… user=…` key-value string. Replaces [`pg_config`](Self::pg_config).
    ///
    /// Besides the driver's parameters it takes distrlock's own
    /// `distrlock_pooler=transaction` (or `=session`, the default), which sets
    /// [`pooler`](Self::pooler) unless that is called too, and is taken out
    /// before the rest goes to tokio-postgres:
    /// `postgres://app@pgbouncer.internal:6432/app?distrlock_pooler=transaction`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self.pg = None;
        self
    }

    /// Connects with an already built driver config. Replaces [`url`](Self::url).
    pub fn pg_config(mut self, pg: tokio_postgres::Config) -> Self {
        self.pg = Some(pg);
        self.url = None;
        self
    }

    /// The lock table: `table` or `schema.table`, letters, digits and `_` only,
    /// always quoted in SQL (so case is kept). Default `distributed_locks`.
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = Some(table.into());
        self
    }

    /// The most connections the backend's own pool opens. Default 16.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size);
        self
    }

    /// The bound on opening a connection and on waiting for a pooled one.
    /// Default 5 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// The `statement_timeout` of each session. Default 5 s.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = Some(timeout);
        self
    }

    /// The `lock_timeout` of each session: how long a statement may wait on a row
    /// lock held by another transaction. Default 1 s; at most the statement
    /// timeout.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// The `application_name` of each session. Default: the one in the URL or
    /// driver config, else `distrlock`. Printable ASCII, at most 63 bytes.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Whether to keep one `LISTEN` connection for release notifications. Default
    /// on. Off, waiters in other processes poll (releases in this process still
    /// wake this process's waiters). Behind a transaction pooler it listens only
    /// on a [`listen_url`](Self::listen_url).
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = Some(on);
        self
    }

    /// Listens for release notifications on this connection instead of the main
    /// one: a direct (unpooled) URL to the same database, for a backend behind a
    /// transaction pooler, whose pooled sessions cannot `LISTEN`. One connection,
    /// outside the pool. Replaces [`listen_pg_config`](Self::listen_pg_config).
    pub fn listen_url(mut self, url: impl Into<String>) -> Self {
        self.listen_url = Some(url.into());
        self.listen_pg = None;
        self
    }

    /// Like [`listen_url`](Self::listen_url), with a driver config. Replaces
    /// [`listen_url`](Self::listen_url).
    pub fn listen_pg_config(mut self, pg: tokio_postgres::Config) -> Self {
        self.listen_pg = Some(pg);
        self.listen_url = None;
        self
    }

    /// What sits between the backend and PostgreSQL (see [`Pooler`]). Default
    /// [`Pooler::Session`], or what the URL's `distrlock_pooler` says; this call
    /// wins over the URL.
    pub fn pooler(mut self, pooler: Pooler) -> Self {
        self.pooler = Some(pooler);
        self
    }

    /// The password, replacing the one of the [`url`](Self::url) and the
    /// [`listen_url`](Self::listen_url) (or of a [`pg_config`](Self::pg_config)),
    /// so that it can be kept apart from them (a secrets file, an environment
    /// variable). Never shown by `Debug` or written by `Serialize`.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.password = Some(password.into());
        self
    }

    /// The table's max_ttl: the longest ttl any lock on it may have, and how long
    /// a server grants and extends nothing after a promotion (the failover
    /// quarantine). Default [`PostgresConfig::DEFAULT_MAX_TTL`], 5 minutes; at
    /// most [`Ttl::MAX`](distrlock_core::Ttl::MAX).
    ///
    /// It is a setting of the table, not of one client, so that every client of
    /// a table waits out the same quarantine: it lives in the table's failover
    /// marker (the row of the empty key), which
    /// [`create_table`](distrlock_core::LockBackend::create_table) writes with
    /// this value, and raises to it on a table whose max_ttl is shorter. It never
    /// lowers it (leases that long may be live); to lower it, run
    /// `UPDATE <table> SET expires_at = acquired_at + interval '…' WHERE lock_key = ''`
    /// when no longer lease is live. A lock statement on a table that has no
    /// marker yet (made by hand from an older DDL) writes one with this value.
    /// A ttl above the table's max_ttl fails with [`Error::InvalidTtl`].
    pub fn max_ttl(mut self, max_ttl: Duration) -> Self {
        self.max_ttl = Some(max_ttl);
        self
    }

    /// Whether a server that was promoted (it is on a new timeline) grants and
    /// extends nothing until the table's max_ttl has passed since the first lock
    /// statement it ran on the new timeline. Default on.
    ///
    /// With asynchronous replication a promotion can lose the last commits, and
    /// with them leases that the old primary granted and its clients still hold:
    /// without the quarantine the new primary could grant those keys again at
    /// once, and two holders would run. Turn it off only when no promotion can
    /// lose a commit: synchronous replication (`synchronous_commit` `on` or
    /// `remote_apply` with `synchronous_standby_names`) and a failover tool that
    /// promotes only a synchronous standby (Patroni's `synchronous_mode: true`).
    /// Fences grow across a promotion either way.
    pub fn failover_quarantine(mut self, on: bool) -> Self {
        self.failover_quarantine = Some(on);
        self
    }

    /// Connects over TLS with these root certificates and this verification
    /// ([`TlsVerify::Full`](crate::TlsVerify::Full), the certificate and the host
    /// name, unless [`TlsConfig::verify`](crate::TlsConfig::verify) says
    /// otherwise), as the connection string's `sslmode` asks: `prefer` (the
    /// driver's default) uses TLS when the server offers it, `require` insists
    /// on it, `disable` never uses it. Without it, TLS is used only when the
    /// connection string says `sslmode=require`, with the Mozilla roots and full
    /// verification.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, tls: crate::tls::TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Validates every setting.
    ///
    /// Errors: [`Error::InvalidTableName`] for a bad table name,
    /// [`Error::InvalidConfig`] for anything else out of range or an unparsable
    /// connection string (its message never contains the password).
    pub fn build(self) -> Result<PostgresConfig> {
        let defaults = PostgresConfig::default();
        let (mut pg, url_pooler) = match (self.url, self.pg) {
            (Some(url), _) => {
                let (pg, pooler) = parse_url(&url)?;
                (Some(pg), pooler)
            }
            (None, pg) => (pg, None),
        };
        let pooler = self.pooler.or(url_pooler).unwrap_or(defaults.pooler);
        let mut listen_pg = match (self.listen_url, self.listen_pg) {
            (Some(url), _) => match parse_url(&url)? {
                (_, Some(Pooler::Transaction)) => {
                    return Err(invalid(
                        "the listen URL must reach PostgreSQL directly (a LISTEN needs a \
                         session): it cannot say distrlock_pooler=transaction"
                            .into(),
                    ));
                }
                (pg, _) => Some(pg),
            },
            (None, pg) => pg,
        };
        let table = match self.table {
            Some(name) => TableName::new(&name)?,
            None => TableName::default(),
        };
        let pool_size = self.pool_size.unwrap_or(defaults.pool_size);
        if !(1..=10_000).contains(&pool_size) {
            return Err(invalid(format!(
                "pool size must be 1..=10000, got {pool_size}"
            )));
        }
        let connect_timeout = self.connect_timeout.unwrap_or(defaults.connect_timeout);
        let statement_timeout = self.statement_timeout.unwrap_or(defaults.statement_timeout);
        let lock_timeout = self.lock_timeout.unwrap_or(defaults.lock_timeout);
        for (name, value) in [
            ("connect timeout", connect_timeout),
            ("statement timeout", statement_timeout),
            ("lock timeout", lock_timeout),
        ] {
            // PostgreSQL reads 0 as "no limit"; the upper bound keeps the
            // millisecond values well inside its int range.
            if value < Duration::from_millis(1) || value > Duration::from_secs(24 * 60 * 60) {
                return Err(invalid(format!(
                    "{name} must be between 1 ms and 24 h, got {value:?}"
                )));
            }
        }
        if lock_timeout > statement_timeout {
            return Err(invalid(format!(
                "lock timeout ({lock_timeout:?}) must not exceed the statement timeout \
                 ({statement_timeout:?})"
            )));
        }
        let application_name = match self.application_name {
            Some(name) => name,
            None => pg
                .as_ref()
                .and_then(|pg| pg.get_application_name())
                .unwrap_or(PostgresConfig::DEFAULT_APPLICATION_NAME)
                .to_owned(),
        };
        if application_name.len() > 63
            || !application_name.bytes().all(|b| (b' '..=b'~').contains(&b))
        {
            return Err(invalid(
                "application name must be printable ASCII of at most 63 bytes".into(),
            ));
        }
        for pg in pg.iter_mut().chain(listen_pg.iter_mut()) {
            if let Some(password) = &self.password {
                pg.password(password.as_bytes());
            }
            pg.application_name(&application_name);
            if pg.get_connect_timeout().is_none() {
                pg.connect_timeout(connect_timeout);
            }
            #[cfg(not(feature = "tls"))]
            if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
                return Err(invalid(
                    "sslmode=require needs the `tls` feature of distrlock-postgres".into(),
                ));
            }
        }
        let max_ttl = self.max_ttl.unwrap_or(defaults.max_ttl);
        if let Err(e) = distrlock_core::Ttl::new(max_ttl) {
            return Err(invalid(format!("max_ttl: {e}")));
        }
        Ok(PostgresConfig {
            pg,
            table,
            pool_size,
            connect_timeout,
            statement_timeout,
            lock_timeout,
            application_name,
            listen: self.listen.unwrap_or(defaults.listen),
            listen_pg,
            pooler,
            max_ttl,
            failover_quarantine: self
                .failover_quarantine
                .unwrap_or(defaults.failover_quarantine),
            #[cfg(feature = "tls")]
            tls: self.tls,
            server_clock: defaults.server_clock,
        })
    }
}

impl fmt::Debug for PostgresConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfigBuilder")
            .field("url", &self.url.as_ref().map(|_| "<redacted>"))
            .field("connection", &self.pg.as_ref().map(Redacted))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// A connection string's driver config, and what its `distrlock_pooler` says.
fn parse_url(url: &str) -> Result<(tokio_postgres::Config, Option<Pooler>)> {
    let (rest, pooler) = split_pooler_param(url);
    let pooler = pooler.map(|value| value.parse::<Pooler>()).transpose()?;
    Ok((parse_driver_url(&rest)?, pooler))
}

fn parse_driver_url(url: &str) -> Result<tokio_postgres::Config> {
    url.parse::<tokio_postgres::Config>().map_err(|e| {
        // The driver names the offending option, never its value; the URL itself
        // is not repeated because it may hold a password.
        let detail = match std::error::Error::source(&e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        };
        invalid(format!("invalid PostgreSQL connection string ({detail})"))
    })
}

fn invalid(reason: String) -> Error {
    Error::InvalidConfig { reason }
}

/// Whole milliseconds, rounded up so a sub-millisecond bound never becomes 0
/// ("no limit" to PostgreSQL).
fn millis_ceil(d: Duration) -> u64 {
    let ms = d.as_micros().div_ceil(1000);
    u64::try_from(ms).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_errors_never_show_the_password() {
        let config = PostgresConfig::builder()
            .url("postgres://app:hunter2-pw@db.example:5433/appdb")
            .build()
            .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2-pw"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
        assert!(shown.contains("db.example"), "{shown}");
        let builder = PostgresConfig::builder().url("postgres://app:hunter2-pw@db/x");
        assert!(!format!("{builder:?}").contains("hunter2-pw"));

        for bad in [
            "postgres://app:hunter2-pw@db.example:notaport/appdb",
            "postgres://app:hunter2-pw@db.example/appdb?sslmode=bogus",
            "postgres://app:hunter2-pw@db.example/appdb?nonsense=1",
            "host=db user=app password=hunter2-pw port=x",
            "postgres://app:hunter2-pw@db:99999999/appdb",
            "postgres://app:hunter2-pw@db/appdb?target_session_attrs=bogus",
        ] {
            match PostgresConfig::builder().url(bad).build() {
                Err(Error::InvalidConfig { reason }) => {
                    assert!(!reason.contains("hunter2"), "{reason}")
                }
                other => panic!("{bad}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn validates_settings() {
        let table = PostgresConfig::builder()
            .table("x\"; DROP TABLE y; --")
            .build();
        assert!(matches!(table, Err(Error::InvalidTableName { .. })));
        for builder in [
            PostgresConfig::builder().pool_size(0),
            PostgresConfig::builder().lock_timeout(Duration::ZERO),
            PostgresConfig::builder().statement_timeout(Duration::from_micros(10)),
            PostgresConfig::builder()
                .statement_timeout(Duration::from_secs(1))
                .lock_timeout(Duration::from_secs(2)),
            PostgresConfig::builder().application_name("a\u{e9}"),
            PostgresConfig::builder().application_name("x".repeat(64)),
        ] {
            assert!(
                matches!(builder.build(), Err(Error::InvalidConfig { .. })),
                "should be refused"
            );
        }
    }

    #[test]
    fn the_pooler_parameter_is_taken_out_of_both_forms_of_connection_string() {
        let split = |conn: &str| split_pooler_param(conn);
        let t = Some("transaction".to_owned());
        assert_eq!(
            split("postgres://u:p@h:6432/db?distrlock_pooler=transaction"),
            ("postgres://u:p@h:6432/db".to_owned(), t.clone())
        );
        assert_eq!(
            split(
                "postgresql://u@h/db?sslmode=disable&distrlock_pooler=transaction&connect_timeout=3"
            ),
            (
                "postgresql://u@h/db?sslmode=disable&connect_timeout=3".to_owned(),
                t.clone()
            )
        );
        // A `?` in the password is not where the parameters start.
        assert_eq!(
            split("postgres://u:pa?ss@h/db?distrlock%5Fpooler=session"),
            (
                "postgres://u:pa?ss@h/db".to_owned(),
                Some("session".to_owned())
            )
        );
        assert_eq!(
            split("postgres://u:pa?ss@h/db"),
            ("postgres://u:pa?ss@h/db".to_owned(), None)
        );
        assert_eq!(
            split("host=h user=u distrlock_pooler=transaction dbname=db"),
            ("host=h user=u  dbname=db".to_owned(), t.clone())
        );
        assert_eq!(
            split("distrlock_pooler = 'transaction' password='a b\\' distrlock_pooler=x c'"),
            (
                " password='a b\\' distrlock_pooler=x c'".to_owned(),
                t.clone()
            )
        );
        assert_eq!(split("host=h"), ("host=h".to_owned(), None));
        // Unparsable: left for the driver to report.
        assert_eq!(
            split("host=h distrlock_pooler"),
            ("host=h distrlock_pooler".to_owned(), None)
        );

        for (conn, pooler) in [
            ("postgres://u@localhost/db", Pooler::Session),
            (
                "postgres://u@localhost/db?distrlock_pooler=transaction",
                Pooler::Transaction,
            ),
            (
                "postgres://u@localhost/db?distrlock_pooler=Session",
                Pooler::Session,
            ),
            (
                "host=localhost user=u distrlock_pooler=transaction",
                Pooler::Transaction,
            ),
        ] {
            let config = PostgresConfig::builder().url(conn).build().unwrap();
            assert_eq!(config.pooler(), pooler, "{conn}");
            assert_eq!(config.pg_config().unwrap().get_hosts().len(), 1);
            assert_eq!(config.listens(), pooler == Pooler::Session, "{conn}");
        }
        // The builder wins over the URL.
        let config = PostgresConfig::builder()
            .url("postgres://u@localhost/db?distrlock_pooler=transaction")
            .pooler(Pooler::Session)
            .build()
            .unwrap();
        assert_eq!(config.pooler(), Pooler::Session);
        match PostgresConfig::builder()
            .url("postgres://u:hunter2-pw@localhost/db?distrlock_pooler=statement")
            .build()
        {
            Err(Error::InvalidConfig { reason }) => {
                assert!(reason.contains("distrlock_pooler"), "{reason}");
                assert!(!reason.contains("hunter2"), "{reason}");
            }
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
    }

    #[test]
    fn behind_a_transaction_pooler_it_listens_only_on_a_listen_url() {
        let pooled = "postgres://app@pgbouncer:6432/db?distrlock_pooler=transaction";
        let config = PostgresConfig::builder().url(pooled).build().unwrap();
        assert!(!config.listens());
        assert!(config.listen_pg_config().is_none());
        let config = PostgresConfig::builder()
            .url(pooled)
            .listen_url("postgres://app:s3cret@db:5432/db")
            .application_name("billing")
            .build()
            .unwrap();
        assert!(config.listens());
        let listen = config.listen_pg_config().unwrap();
        assert_eq!(listen.get_ports(), [5432]);
        assert_eq!(listen.get_application_name(), Some("billing"));
        assert!(listen.get_connect_timeout().is_some());
        assert!(!format!("{config:?}").contains("s3cret"));
        let off = PostgresConfig::builder()
            .url(pooled)
            .listen_url("postgres://app@db/db")
            .listen(false)
            .build()
            .unwrap();
        assert!(!off.listens());
        assert!(matches!(
            PostgresConfig::builder()
                .url("postgres://app@db/db")
                .listen_url("postgres://app@pgbouncer/db?distrlock_pooler=transaction")
                .build(),
            Err(Error::InvalidConfig { .. })
        ));
    }

    #[test]
    fn defaults_and_session_settings() {
        let config = PostgresConfig::builder()
            .url("postgres://u@localhost/db")
            .lock_timeout(Duration::from_micros(1500))
            .build()
            .unwrap();
        assert_eq!(config.table().to_string(), "distributed_locks");
        assert_eq!(config.pool_size(), 16);
        assert_eq!(config.application_name(), "distrlock");
        assert_eq!(
            config.pg_config().unwrap().get_application_name(),
            Some("distrlock")
        );
        assert_eq!(
            config.session_settings_sql(),
            "SET lock_timeout = 2; SET statement_timeout = 5000; \
             SET default_transaction_isolation = 'read committed'"
        );
        let named = PostgresConfig::builder()
            .url("postgres://u@localhost/db?application_name=billing")
            .build()
            .unwrap();
        assert_eq!(named.application_name(), "billing");
    }
}
