//! Backend selection: one match arm per URL scheme.
//!
//! To add a backend, add its crate to `Cargo.toml`, a scheme to `url.rs`, and
//! an arm to [`open_backend`] and [`schema_sql`]; the rest of the CLI only sees
//! `Arc<dyn LockBackend>`.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{Error, LockBackend, LockManager, TableName};
use distrlock_mysql::mysql_async::{self, Opts, OptsBuilder};
use distrlock_mysql::{MySqlBackend, MySqlConfig};
use distrlock_postgres::tokio_postgres::config::{Host, SslMode};
use distrlock_postgres::{PostgresBackend, PostgresConfig, tokio_postgres};
use distrlock_sqlite::{SqliteBackend, SqliteConfig};

use crate::exit::CliError;
use crate::server::{self, ServerUrl, TlsMode};
use crate::url::{DbUrl, redact};

/// The longest any one backend call may take before distrlock stops waiting for
/// it. Calls that change a lock carry `now + CALL_TIMEOUT` as their `not_after`,
/// so one given up on can no longer take effect.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest distrlock waits, before exiting, for the lock manager's
/// background cleanup: the release of whatever an abandoned acquire may have
/// been granted. The manager bounds it by about two call timeouts.
const SETTLE_LIMIT: Duration = Duration::from_secs(2 * CALL_TIMEOUT.as_secs() + 1);

/// PostgreSQL's default table-wide max_ttl (see `distrlock init --max-ttl`).
pub(crate) const DEFAULT_MAX_TTL: Duration = PostgresConfig::DEFAULT_MAX_TTL;

/// An open backend, with what messages about it need.
pub(crate) struct Db {
    pub(crate) url: DbUrl,
    pub(crate) table: TableName,
    pub(crate) backend: Arc<dyn LockBackend>,
}

impl Db {
    /// Opens the backend for `url` (see [`open_backend`]).
    pub(crate) async fn open(
        url: DbUrl,
        table: TableName,
        listen: bool,
        max_ttl: Duration,
    ) -> Result<Self, CliError> {
        let backend = open_backend(&url, &table, listen, max_ttl).await?;
        Ok(Self {
            url,
            table,
            backend,
        })
    }

    /// A lock manager on this database for leases of `ttl` written with
    /// `owner`, extending them in the background only if `auto_extend`.
    pub(crate) fn manager(
        &self,
        ttl: Duration,
        owner: String,
        auto_extend: bool,
    ) -> Result<LockManager, CliError> {
        LockManager::builder(self.backend.clone())
            .ttl(ttl)
            .owner(owner)
            .auto_extend(auto_extend)
            .call_timeout(CALL_TIMEOUT)
            .build()
            .map_err(|e| self.error(e))
    }

    /// Maps a lock error to an exit code and a message naming this database.
    pub(crate) fn error(&self, error: Error) -> CliError {
        CliError::from_lock(error, &self.url, &self.table.to_string())
    }
}

/// Opens the backend named by `url`, storing locks in `table`.
///
/// SQLite files are local and private to this host, so their table is created
/// on first use: `distrlock run` works from a clean checkout with no setup. A
/// server database needs `distrlock init` (or the DDL from `distrlock schema`)
/// once, by someone allowed to create tables.
///
/// One pooled connection is enough for one command holding one lock, and costs
/// one connection setup; PostgreSQL's release listener (a second connection)
/// is opened only when `listen`, for a command that waits.
///
/// `max_ttl` is PostgreSQL's table-wide longest ttl, which `init` writes (and
/// raises), and which a table without one gets on first use.
pub(crate) async fn open_backend(
    url: &DbUrl,
    table: &TableName,
    listen: bool,
    max_ttl: Duration,
) -> Result<Arc<dyn LockBackend>, CliError> {
    let error = |e: Error| CliError::from_lock(e, url, &table.to_string());
    match url {
        DbUrl::Sqlite {
            path,
            default,
            allow_network_filesystem,
        } => {
            if *default && let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    CliError::unavailable(format!(
                        "cannot create {} for the default SQLite file: {e}; pass --url \
                             sqlite:///path/to/locks.db",
                        dir.display()
                    ))
                })?;
            }
            let backend = SqliteBackend::from_config(
                SqliteConfig::builder()
                    .path(path)
                    .table(table.to_string())
                    .allow_network_filesystem(*allow_network_filesystem)
                    .build()
                    .map_err(error)?,
            )
            .await
            .map_err(error)?;
            backend.create_table().await.map_err(error)?;
            Ok(Arc::new(backend))
        }
        DbUrl::Postgres { url: raw, ca_file } => {
            let server = ServerUrl::parse(raw, ca_file.as_deref())?;
            let pg = postgres_connection(raw, &server)?;
            let builder = PostgresConfig::builder()
                .pg_config(pg)
                .table(table.to_string())
                .pool_size(1)
                .max_ttl(max_ttl)
                .listen(listen)
                .application_name("distrlock-cli");
            let builder = tls::postgres(builder, raw, &server)?;
            let config = builder.build().map_err(error)?;
            let backend = PostgresBackend::from_config(config)
                .await
                .map_err(|e| with_tls_hint(error(e), &server))?;
            Ok(Arc::new(backend))
        }
        DbUrl::MySql { url: raw, ca_file } => {
            let server = ServerUrl::parse(raw, ca_file.as_deref())?;
            // The backend's own URL parsing: several hosts, `max_clock_skew`.
            let parsed = MySqlConfig::builder()
                .url(server.url.as_str())
                .build()
                .map_err(|e| match e {
                    Error::InvalidConfig { reason } => {
                        CliError::usage(format!("--url {}: {reason}", redact(raw)))
                    }
                    other => CliError::usage(format!("--url {}: {other}", redact(raw))),
                })?;
            let password = parsed
                .hosts()
                .iter()
                .all(|opts| opts.pass().is_none())
                .then(server::mysql_password)
                .flatten();
            let hosts = |ssl: Option<&mysql_async::SslOpts>| -> Vec<Opts> {
                parsed
                    .hosts()
                    .iter()
                    .map(|opts| {
                        let mut host = OptsBuilder::from_opts(opts.clone());
                        if let Some(password) = &password {
                            host = host.pass(Some(password.clone()));
                        }
                        if let Some(ssl) = ssl {
                            host = host.ssl_opts(ssl.clone());
                        }
                        host.into()
                    })
                    .collect()
            };
            let connect = |hosts: Vec<Opts>| {
                let config = MySqlConfig::builder()
                    .hosts(hosts)
                    .max_clock_skew(parsed.max_clock_skew())
                    .table(table.to_string())
                    .pool_size(1)
                    .build();
                async move { MySqlBackend::from_config(config?).await }
            };
            let backend = match tls::mysql(raw, &server)? {
                None => connect(hosts(None)).await,
                Some(ssl) => match connect(hosts(Some(&ssl))).await {
                    // `prefer`: a server without TLS is used without it.
                    Err(e) if server.tls == TlsMode::Prefer && offers_no_tls(&e) => {
                        connect(hosts(None)).await
                    }
                    other => other,
                },
            };
            Ok(Arc::new(
                backend.map_err(|e| with_tls_hint(error(e), &server))?,
            ))
        }
    }
}

/// The driver's connection settings for a PostgreSQL URL: the URL less its TLS
/// parameters, the TLS mode, and the password from `PGPASSWORD` or the
/// password file when the URL has none.
fn postgres_connection(raw: &str, server: &ServerUrl) -> Result<tokio_postgres::Config, CliError> {
    let mut pg: tokio_postgres::Config =
        server.url.parse().map_err(|e: tokio_postgres::Error| {
            // The driver names the offending option, never its value.
            let detail = match std::error::Error::source(&e) {
                Some(source) => format!("{e}: {source}"),
                None => e.to_string(),
            };
            CliError::usage(format!(
                "--url {}: invalid PostgreSQL connection string ({detail})",
                redact(raw)
            ))
        })?;
    pg.ssl_mode(match server.tls {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        TlsMode::Require | TlsMode::VerifyCa | TlsMode::VerifyFull => SslMode::Require,
    });
    if pg.get_password().is_none()
        && let Some(user) = pg.get_user().map(|user| user.to_owned())
    {
        let host = match pg.get_hosts().first() {
            Some(Host::Tcp(host)) => host.clone(),
            // libpq matches a socket connection as `localhost`.
            _ => "localhost".to_owned(),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let database = pg.get_dbname().unwrap_or(&user).to_owned();
        let mut warn = |warning: String| say!("distrlock: warning: {warning}");
        if let Some(password) = server::postgres_password(&host, port, &database, &user, &mut warn)
        {
            pg.password(password);
        }
    }
    Ok(pg)
}

/// Whether a MySQL connection failed because the server offers no TLS.
fn offers_no_tls(error: &Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(mysql_async::Error::Driver(
            mysql_async::DriverError::NoClientSslFlagFromServer,
        )) = cause.downcast_ref::<mysql_async::Error>()
        {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Says what to do when the connection failed over TLS: the certificate was
/// not trusted, or the server offers no TLS.
fn with_tls_hint(mut error: CliError, server: &ServerUrl) -> CliError {
    let text = error.message.to_ascii_lowercase();
    let mode = server.tls.name();
    let hint = if text.contains("certificate") || text.contains("unknownissuer") {
        format!(
            "the server's certificate is not trusted (TLS mode {mode}): name the CA that signed \
             it with --ca-file (or sslrootcert= / ssl-ca= in the URL), or use sslmode=require to \
             encrypt without verifying"
        )
    } else if text.contains("does not support tls")
        || text.contains("server does not have this capability")
    {
        format!(
            "the server offers no TLS, and TLS mode {mode} requires it: turn TLS on in the \
             server, or use sslmode=prefer"
        )
    } else {
        return error;
    };
    // The server is running and reachable: the generic advice does not apply.
    let generic = "; check --url (or DISTRLOCK_URL) and that the database is running";
    if let Some(at) = error.message.find(generic) {
        error.message.truncate(at);
    }
    error.message = format!("{}; {hint}", error.message);
    error
}

/// Turning the TLS mode into the drivers' settings, with TLS built in.
#[cfg(feature = "tls")]
mod tls {
    use distrlock_mysql::mysql_async::SslOpts;
    use distrlock_postgres::{PostgresConfigBuilder, TlsConfig, TlsVerify};

    use crate::exit::CliError;
    use crate::server::{Roots, ServerUrl, TlsMode};
    use crate::url::redact;

    /// Adds the TLS settings of `server` to a PostgreSQL config. Root
    /// certificates are loaded only for a mode that verifies.
    pub(super) fn postgres(
        builder: PostgresConfigBuilder,
        raw: &str,
        server: &ServerUrl,
    ) -> Result<PostgresConfigBuilder, CliError> {
        let verify = match server.tls {
            TlsMode::Disable => return Ok(builder),
            TlsMode::Prefer | TlsMode::Require => return Ok(builder.tls(TlsConfig::unverified())),
            TlsMode::VerifyCa => TlsVerify::Chain,
            TlsMode::VerifyFull => TlsVerify::Full,
        };
        let roots = match &server.roots {
            Roots::Default => TlsConfig::webpki_roots().with_system_roots(),
            Roots::File(path, pem) => TlsConfig::from_pem(pem).map_err(|e| {
                CliError::usage(format!(
                    "--url {}: the CA file {}: {e}",
                    redact(raw),
                    path.display()
                ))
            })?,
        };
        Ok(builder.tls(roots.verify(verify)))
    }

    /// The mysql_async TLS settings of `server`, or `None` without TLS. Root
    /// certificates are loaded only for a mode that verifies.
    pub(super) fn mysql(_raw: &str, server: &ServerUrl) -> Result<Option<SslOpts>, CliError> {
        let ssl = SslOpts::default();
        let ssl = match server.tls {
            TlsMode::Disable => return Ok(None),
            TlsMode::Prefer | TlsMode::Require => ssl.with_danger_accept_invalid_certs(true),
            mode => {
                let ssl = match &server.roots {
                    Roots::File(_, pem) => ssl
                        .with_root_certs(vec![pem.clone().into()])
                        .with_disable_built_in_roots(true),
                    // The bundled roots stay on; the system's are added.
                    Roots::Default => {
                        ssl.with_root_certs(system_roots().into_iter().map(Into::into).collect())
                    }
                };
                ssl.with_danger_skip_domain_validation(mode == TlsMode::VerifyCa)
            }
        };
        Ok(Some(ssl))
    }

    /// The system's root certificates that rustls can use (the driver refuses
    /// the whole set for one it cannot parse).
    fn system_roots() -> Vec<Vec<u8>> {
        rustls_native_certs::load_native_certs()
            .certs
            .into_iter()
            .filter(|cert| rustls::RootCertStore::empty().add(cert.clone()).is_ok())
            .map(|cert| cert.to_vec())
            .collect()
    }
}

/// Without TLS built in: only `disable` and `prefer` (which then never uses
/// TLS) can be honoured.
#[cfg(not(feature = "tls"))]
mod tls {
    use distrlock_mysql::mysql_async::SslOpts;
    use distrlock_postgres::PostgresConfigBuilder;

    use crate::exit::CliError;
    use crate::server::{ServerUrl, TlsMode};
    use crate::url::redact;

    fn refuse(raw: &str, server: &ServerUrl) -> Result<(), CliError> {
        match server.tls {
            TlsMode::Disable | TlsMode::Prefer => Ok(()),
            mode => Err(CliError::usage(format!(
                "--url {}: TLS mode {} needs TLS, and this distrlock was built without it \
                 (the `tls` feature)",
                redact(raw),
                mode.name()
            ))),
        }
    }

    pub(super) fn postgres(
        builder: PostgresConfigBuilder,
        raw: &str,
        server: &ServerUrl,
    ) -> Result<PostgresConfigBuilder, CliError> {
        refuse(raw, server).map(|()| builder)
    }

    pub(super) fn mysql(raw: &str, server: &ServerUrl) -> Result<Option<SslOpts>, CliError> {
        refuse(raw, server).map(|()| None)
    }
}

/// The DDL of the lock table for `url`'s backend, without touching the database
/// where the backend can say it offline.
pub(crate) fn schema_sql(url: &DbUrl, table: &TableName) -> Result<String, CliError> {
    match url {
        DbUrl::Sqlite { .. } => {
            // SQLite has no schemas: the same check as at open.
            SqliteConfig::builder()
                .path("schema.db")
                .table(table.to_string())
                .build()
                .map_err(|e| CliError::from_lock(e, url, &table.to_string()))?;
            Ok(SqliteBackend::schema_sql_for(table))
        }
        DbUrl::Postgres { .. } => Ok(PostgresBackend::schema_sql_for(table)),
        DbUrl::MySql { .. } => Ok(MySqlBackend::schema_sql_for(table)),
    }
}

/// Waits (at most [`SETTLE_LIMIT`]) until `manager` has finished its background
/// work, so that nothing an abandoned acquire was granted, and no release of a
/// dropped guard, is cut off when distrlock exits. Call it before returning from
/// a command that used a manager.
///
/// Past the limit the database is not answering; whatever is left frees itself
/// when its lease runs out, as the messages about unreachable databases say.
pub(crate) async fn settle(manager: &LockManager) {
    let _ = tokio::time::timeout(SETTLE_LIMIT, manager.settle()).await;
}
