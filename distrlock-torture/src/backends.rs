//! Opens the backend a URL names, for the worker and the test.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{LockBackend, Result};
use distrlock_mysql::{MySqlBackend, MySqlConfig};
use distrlock_postgres::{PostgresBackend, PostgresConfig};

/// What a torture run sets on top of [`open`]'s defaults (PostgreSQL only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendOptions {
    /// [`PostgresConfigBuilder::failover_quarantine`](distrlock_postgres::PostgresConfigBuilder::failover_quarantine):
    /// `false` to measure what the quarantine after a failover prevents.
    pub failover_quarantine: bool,
    /// [`PostgresConfigBuilder::max_ttl`](distrlock_postgres::PostgresConfigBuilder::max_ttl),
    /// the longest ttl of a table that `create_table` creates; `None` for the
    /// default.
    pub max_ttl: Option<Duration>,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            failover_quarantine: true,
            max_ttl: None,
        }
    }
}

impl BackendOptions {
    /// The options as one command-line argument of the worker:
    /// `quarantine=on|off,max_ttl_ms=N`.
    pub fn to_arg(&self) -> String {
        let mut arg = format!(
            "quarantine={}",
            if self.failover_quarantine {
                "on"
            } else {
                "off"
            }
        );
        if let Some(max_ttl) = self.max_ttl {
            arg.push_str(&format!(",max_ttl_ms={}", max_ttl.as_millis()));
        }
        arg
    }

    /// Reads what [`to_arg`](Self::to_arg) wrote; `None` for anything else.
    pub fn from_arg(arg: &str) -> Option<Self> {
        let mut options = Self::default();
        for item in arg.split(',').filter(|item| !item.is_empty()) {
            match item.split_once('=')? {
                ("quarantine", "on") => options.failover_quarantine = true,
                ("quarantine", "off") => options.failover_quarantine = false,
                ("max_ttl_ms", ms) => {
                    options.max_ttl = Some(Duration::from_millis(ms.parse().ok()?));
                }
                _ => return None,
            }
        }
        Some(options)
    }
}

/// Opens `url` (`postgres://…` or `mysql://…`) with the lock table `table`, with
/// timeouts short enough for fault tests. `application_name` names the sessions
/// on PostgreSQL.
pub async fn open(url: &str, table: &str, application_name: &str) -> Result<Arc<dyn LockBackend>> {
    open_with(url, table, application_name, &BackendOptions::default()).await
}

/// [`open`], with `options`.
pub async fn open_with(
    url: &str,
    table: &str,
    application_name: &str,
    options: &BackendOptions,
) -> Result<Arc<dyn LockBackend>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let config = PostgresConfig::builder()
            .url(url)
            .table(table)
            .pool_size(4)
            .application_name(application_name)
            .connect_timeout(Duration::from_secs(2))
            .statement_timeout(Duration::from_secs(2))
            .lock_timeout(Duration::from_millis(500))
            .failover_quarantine(options.failover_quarantine);
        let config = match options.max_ttl {
            Some(max_ttl) => config.max_ttl(max_ttl),
            None => config,
        }
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
