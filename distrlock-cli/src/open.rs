//! Backend selection: one match arm per URL scheme.
//!
//! To add a backend, add its crate to `Cargo.toml`, a scheme to `url.rs`, and
//! an arm to [`open_backend`] and [`schema_sql`]; the rest of the CLI only sees
//! `Arc<dyn LockBackend>`.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{Error, LockBackend, LockManager, TableName};
use distrlock_mysql::MySqlBackend;
use distrlock_postgres::{PostgresBackend, PostgresConfig};
use distrlock_sqlite::SqliteBackend;

use crate::exit::CliError;
use crate::url::DbUrl;

/// The longest any one backend call may take before distrlock stops waiting for
/// it. Calls that change a lock carry `now + CALL_TIMEOUT` as their `not_after`,
/// so one given up on can no longer take effect.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest distrlock waits, before exiting, for the lock manager's
/// background cleanup: the release of whatever an abandoned acquire may have
/// been granted. The manager bounds it by about two call timeouts.
const SETTLE_LIMIT: Duration = Duration::from_secs(2 * CALL_TIMEOUT.as_secs() + 1);

/// An open backend, with what messages about it need.
pub(crate) struct Db {
    pub(crate) url: DbUrl,
    pub(crate) table: TableName,
    pub(crate) backend: Arc<dyn LockBackend>,
}

impl Db {
    /// Opens the backend for `url` (see [`open_backend`]).
    pub(crate) async fn open(url: DbUrl, table: TableName, listen: bool) -> Result<Self, CliError> {
        let backend = open_backend(&url, &table, listen).await?;
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
pub(crate) async fn open_backend(
    url: &DbUrl,
    table: &TableName,
    listen: bool,
) -> Result<Arc<dyn LockBackend>, CliError> {
    let error = |e: Error| CliError::from_lock(e, url, &table.to_string());
    match url {
        DbUrl::Sqlite { path, default } => {
            if *default {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        CliError::unavailable(format!(
                            "cannot create {} for the default SQLite file: {e}; pass --url \
                             sqlite:///path/to/locks.db",
                            dir.display()
                        ))
                    })?;
                }
            }
            let backend = SqliteBackend::builder(path)
                .table(table.to_string())
                .open()
                .await
                .map_err(error)?;
            backend.create_table().await.map_err(error)?;
            Ok(Arc::new(backend))
        }
        DbUrl::Postgres(url) => {
            let config = PostgresConfig::builder()
                .url(url.as_str())
                .table(table.to_string())
                .pool_size(1)
                .listen(listen)
                .application_name("distrlock-cli")
                .build()
                .map_err(error)?;
            Ok(Arc::new(
                PostgresBackend::from_config(config).await.map_err(error)?,
            ))
        }
        DbUrl::MySql(url) => Ok(Arc::new(
            MySqlBackend::builder()
                .table(table.to_string())
                .max_connections(1)
                .connect(url)
                .await
                .map_err(error)?,
        )),
    }
}

/// The DDL of the lock table for `url`'s backend, without touching the database
/// where the backend can say it offline.
pub(crate) fn schema_sql(url: &DbUrl, table: &TableName) -> Result<String, CliError> {
    match url {
        DbUrl::Sqlite { .. } => SqliteBackend::schema_sql_for(&table.to_string())
            .map_err(|e| CliError::from_lock(e, url, &table.to_string())),
        DbUrl::Postgres(_) => Ok(PostgresBackend::schema_sql_for(table)),
        DbUrl::MySql(_) => Ok(MySqlBackend::schema_sql_for(table)),
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
