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
pub struct PostgresConfig {
    pub(crate) pg: Option<tokio_postgres::Config>,
    pub(crate) table: TableName,
    pub(crate) pool_size: usize,
    pub(crate) connect_timeout: Duration,
    pub(crate) statement_timeout: Duration,
    pub(crate) lock_timeout: Duration,
    pub(crate) application_name: String,
    pub(crate) listen: bool,
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

    /// Whether the backend keeps a `LISTEN` connection for release notifications.
    pub fn listens(&self) -> bool {
        self.listen
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
    pub fn session_settings_sql(&self) -> String {
        sql::session_settings(
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
    pub fn post_create_hook(&self) -> deadpool_postgres::Hook {
        let setup = format!("{}; {}", self.session_settings_sql(), sql::CLOCK_READING);
        let clock = self.server_clock.clone();
        deadpool_postgres::Hook::async_fn(move |client, _metrics| {
            let (setup, clock) = (setup.clone(), clock.clone());
            Box::pin(async move {
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
            .field("listen", &self.listen);
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
    #[cfg(feature = "tls")]
    tls: Option<crate::tls::TlsConfig>,
}

impl PostgresConfigBuilder {
    /// Connects with a `postgres://user:password@host:port/dbname?…` URL or a
    /// `host=… user=…` key-value string. Replaces [`pg_config`](Self::pg_config).
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
    /// wake this process's waiters).
    pub fn listen(mut self, on: bool) -> Self {
        self.listen = Some(on);
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
        let mut pg = match (self.url, self.pg) {
            (Some(url), _) => Some(parse_url(&url)?),
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
        if let Some(pg) = pg.as_mut() {
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
        Ok(PostgresConfig {
            pg,
            table,
            pool_size,
            connect_timeout,
            statement_timeout,
            lock_timeout,
            application_name,
            listen: self.listen.unwrap_or(defaults.listen),
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
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
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
