//! Opens the backend a URL names, for the worker and the test.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{LockBackend, Result};
use distrlock_mysql::{MySqlBackend, MySqlConfig};
use distrlock_postgres::{PostgresBackend, PostgresConfig};

/// Opens `url` (`postgres://…` or `mysql://…`) with the lock table `table`, with
/// timeouts short enough for fault tests. `application_name` names the sessions
/// on PostgreSQL.
pub async fn open(url: &str, table: &str, application_name: &str) -> Result<Arc<dyn LockBackend>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let config = PostgresConfig::builder()
            .url(url)
            .table(table)
            .pool_size(4)
            .application_name(application_name)
            .connect_timeout(Duration::from_secs(2))
            .statement_timeout(Duration::from_secs(2))
            .lock_timeout(Duration::from_millis(500))
            .build()?;
        return Ok(Arc::new(PostgresBackend::from_config(config).await?));
    }
    if url.starts_with("mysql://") {
        let config = MySqlConfig::builder()
            .url(url)
            .table(table)
            .pool_size(4)
            .connect_timeout(Duration::from_secs(2))
            .statement_timeout(Duration::from_secs(2))
            .lock_timeout(Duration::from_secs(1))
            .build()?;
        return Ok(Arc::new(MySqlBackend::from_config(config).await?));
    }
    Err(distrlock_core::Error::InvalidConfig {
        reason: format!("unsupported URL scheme in {url:?}"),
    })
}
