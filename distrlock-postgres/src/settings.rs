//! With the `serde` feature: [`PostgresConfig`] in a config file, through the
//! plain [`Settings`] it is read from and written as.
//!
//! ```
//! use distrlock_postgres::{Pooler, PostgresConfig};
//!
//! let config: PostgresConfig = serde_json::from_str(
//!     r#"{"url": "postgres://app@db.internal:6432/app", "password": "s3cret",
//!         "table": "app_locks", "pool_size": 4, "lock_timeout": "2s",
//!         "pooler": "transaction", "max_ttl": "2m"}"#,
//! )
//! .unwrap();
//! assert_eq!(config.pooler(), Pooler::Transaction);
//! let written = serde_json::to_string(&config).unwrap();
//! assert!(!written.contains("s3cret"));
//! ```

use std::time::Duration;

use distrlock_core::Error;
use distrlock_core::backend::encode_url_part;
use serde::{Deserialize, Serialize};
use tokio_postgres::config::Host;

use crate::config::{Pooler, PostgresConfig};

/// The settings of a config file, every one optional (a missing one keeps its
/// default). Durations are humantime strings (`"5s"`, `"500ms"`) or whole
/// seconds, as everywhere in distrlock
/// ([`serde_duration`](distrlock_core::serde_duration)).
///
/// `url` and `listen_url` take what
/// [`PostgresConfigBuilder::url`](crate::PostgresConfigBuilder::url) takes
/// (`distrlock_pooler` included); `password` replaces the URLs', so that a file
/// can keep it apart. Both are read, never written: a written config's URL has
/// the user, hosts, ports and database but no password, and TLS set in code is
/// left out.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    url: Option<String>,
    #[serde(default, skip_serializing)]
    password: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pool_size: Option<usize>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "distrlock_core::serde_option_duration"
    )]
    connect_timeout: Option<Duration>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "distrlock_core::serde_option_duration"
    )]
    statement_timeout: Option<Duration>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "distrlock_core::serde_option_duration"
    )]
    lock_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    application_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    listen: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    listen_url: Option<String>,
    /// `session` or `transaction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pooler: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "distrlock_core::serde_option_duration"
    )]
    max_ttl: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failover_quarantine: Option<bool>,
}

impl TryFrom<Settings> for PostgresConfig {
    type Error = Error;

    fn try_from(s: Settings) -> Result<Self, Error> {
        let mut b = PostgresConfig::builder();
        if let Some(url) = s.url {
            b = b.url(url);
        }
        if let Some(url) = s.listen_url {
            b = b.listen_url(url);
        }
        if let Some(password) = s.password {
            b = b.password(password);
        }
        if let Some(table) = s.table {
            b = b.table(table);
        }
        if let Some(size) = s.pool_size {
            b = b.pool_size(size);
        }
        if let Some(t) = s.connect_timeout {
            b = b.connect_timeout(t);
        }
        if let Some(t) = s.statement_timeout {
            b = b.statement_timeout(t);
        }
        if let Some(t) = s.lock_timeout {
            b = b.lock_timeout(t);
        }
        if let Some(name) = s.application_name {
            b = b.application_name(name);
        }
        if let Some(on) = s.listen {
            b = b.listen(on);
        }
        if let Some(pooler) = s.pooler {
            b = b.pooler(pooler.parse::<Pooler>()?);
        }
        if let Some(max_ttl) = s.max_ttl {
            b = b.max_ttl(max_ttl);
        }
        if let Some(on) = s.failover_quarantine {
            b = b.failover_quarantine(on);
        }
        b.build()
    }
}

impl From<PostgresConfig> for Settings {
    fn from(c: PostgresConfig) -> Self {
        Settings {
            url: c.pg.as_ref().map(url_without_password),
            password: None,
            table: Some(c.table.to_string()),
            pool_size: Some(c.pool_size),
            connect_timeout: Some(c.connect_timeout),
            statement_timeout: Some(c.statement_timeout),
            lock_timeout: Some(c.lock_timeout),
            application_name: Some(c.application_name.clone()),
            listen: Some(c.listen),
            listen_url: c.listen_pg.as_ref().map(url_without_password),
            pooler: Some(c.pooler.as_str().to_owned()),
            max_ttl: Some(c.max_ttl),
            failover_quarantine: Some(c.failover_quarantine),
        }
    }
}

/// `postgres://user@host:port,host:port/dbname`, never a password; `sslmode`
/// when it is not the driver's default.
fn url_without_password(pg: &tokio_postgres::Config) -> String {
    let user = pg
        .get_user()
        .map(|user| format!("{}@", encode_url_part(user)))
        .unwrap_or_default();
    let ports = pg.get_ports();
    let places = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(name) => encode_url_part(name),
                // A socket directory: percent-encoded, as libpq reads it.
                #[cfg(unix)]
                Host::Unix(path) => encode_url_part(&path.to_string_lossy()),
            };
            let port = ports.get(i).or(ports.first());
            match port {
                Some(port) => format!("{host}:{port}"),
                None => host,
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    let db = pg.get_dbname().map(encode_url_part).unwrap_or_default();
    let ssl = match pg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => "?sslmode=disable",
        tokio_postgres::config::SslMode::Require => "?sslmode=require",
        _ => "",
    };
    format!("postgres://{user}{places}/{db}{ssl}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips_without_its_password() {
        let text = r#"{"url": "postgres://app@db1:5432,db2:5433/app?distrlock_pooler=transaction",
            "password": "hunter2-secret", "table": "locks.app_locks", "pool_size": 4,
            "connect_timeout": "3s", "statement_timeout": 7, "lock_timeout": "2s",
            "application_name": "billing", "listen": false, "max_ttl": "90s",
            "failover_quarantine": false}"#;
        let config: PostgresConfig = serde_json::from_str(text).unwrap();
        let pg = config.pg_config().unwrap();
        assert_eq!(pg.get_password(), Some(&b"hunter2-secret"[..]));
        assert_eq!(pg.get_hosts().len(), 2);
        assert_eq!(config.pooler(), Pooler::Transaction);
        assert_eq!(config.statement_timeout(), Duration::from_secs(7));
        assert_eq!(config.max_ttl(), Duration::from_secs(90));
        assert!(!config.failover_quarantine());
        let written = serde_json::to_string(&config).unwrap();
        assert!(!written.contains("hunter2"), "{written}");
        assert!(
            written.contains(r#""url":"postgres://app@db1:5432,db2:5433/app""#),
            "{written}"
        );
        assert!(written.contains(r#""pooler":"transaction""#), "{written}");
        assert!(written.contains(r#""max_ttl":"1m 30s""#), "{written}");
        let back: PostgresConfig = serde_json::from_str(&written).unwrap();
        assert_eq!(back.table(), config.table());
        assert_eq!(back.pool_size(), 4);
        assert_eq!(back.lock_timeout(), Duration::from_secs(2));
        assert_eq!(back.application_name(), "billing");
        assert_eq!(back.pooler(), Pooler::Transaction);
        assert_eq!(back.pg_config().unwrap().get_password(), None);
        assert_eq!(back.pg_config().unwrap().get_ports(), &[5432, 5433]);
        let defaults: PostgresConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(defaults.max_ttl(), PostgresConfig::DEFAULT_MAX_TTL);
        assert!(defaults.pg_config().is_none());
    }

    #[test]
    fn a_bad_value_is_refused_as_the_builder_refuses_it() {
        for (text, what) in [
            (r#"{"pool_size": 0}"#, "pool size"),
            (r#"{"lock_timeout": "soon"}"#, "soon"),
            (r#"{"table": "x; DROP TABLE y"}"#, "table"),
            (r#"{"pooler": "statement"}"#, "distrlock_pooler"),
            (r#"{"max_ttl": "0s"}"#, "max_ttl"),
            (r#"{"poolsize": 3}"#, "poolsize"),
        ] {
            let error = serde_json::from_str::<PostgresConfig>(text)
                .err()
                .unwrap_or_else(|| panic!("{text} was accepted"));
            assert!(error.to_string().contains(what), "{text}: {error}");
        }
    }
}
