//! With the `serde` feature: [`MySqlConfig`] in a config file, through the
//! plain [`Settings`] it is read from and written as.
//!
//! ```
//! use distrlock_mysql::MySqlConfig;
//!
//! let config: MySqlConfig = serde_json::from_str(
//!     r#"{"url": "mysql://app@db1:3306,db2:3306/app", "password": "s3cret",
//!         "table": "app_locks", "pool_size": 4, "lock_timeout": "2s"}"#,
//! )
//! .unwrap();
//! assert_eq!(config.hosts().len(), 2);
//! let written = serde_json::to_string(&config).unwrap();
//! assert!(!written.contains("s3cret"));
//! ```

use std::time::Duration;

use distrlock_core::Error;
use distrlock_core::backend::encode_url_part;
use mysql_async::Opts;
use serde::{Deserialize, Serialize};

use crate::config::MySqlConfig;

/// The settings of a config file, every one optional (a missing one keeps its
/// default). Durations are humantime strings (`"5s"`, `"500ms"`) or whole
/// seconds, as everywhere in distrlock
/// ([`serde_duration`](distrlock_core::serde_duration)).
///
/// `url` may name several hosts and carry `max_clock_skew` (see
/// [`MySqlConfigBuilder::url`](crate::MySqlConfigBuilder::url)); `password`
/// replaces the URL's, so that a file can keep it apart. Both are read, never
/// written: a written config's URL has the user, hosts and database but no
/// password, and driver options set in code ([`MySqlConfigBuilder::opts`](crate::MySqlConfigBuilder::opts):
/// TLS, a socket) are left out.
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    min_pool_size: Option<usize>,
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
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "distrlock_core::serde_option_duration"
    )]
    max_clock_skew: Option<Duration>,
}

impl TryFrom<Settings> for MySqlConfig {
    type Error = Error;

    fn try_from(s: Settings) -> Result<Self, Error> {
        let mut b = MySqlConfig::builder();
        if let Some(url) = s.url {
            b = b.url(url);
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
        if let Some(size) = s.min_pool_size {
            b = b.min_pool_size(size);
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
        if let Some(skew) = s.max_clock_skew {
            b = b.max_clock_skew(skew);
        }
        b.build()
    }
}

impl From<MySqlConfig> for Settings {
    fn from(c: MySqlConfig) -> Self {
        Settings {
            url: url_without_password(&c.hosts),
            password: None,
            table: Some(c.table.to_string()),
            pool_size: Some(c.pool_size),
            min_pool_size: Some(c.min_pool_size),
            connect_timeout: Some(c.connect_timeout),
            statement_timeout: Some(c.statement_timeout),
            lock_timeout: Some(c.lock_timeout),
            max_clock_skew: Some(c.max_clock_skew),
        }
    }
}

/// `mysql://user@host:port,host:port/database`: the user and database of the
/// first host (every host of a URL shares them), never a password.
fn url_without_password(hosts: &[Opts]) -> Option<String> {
    let first = hosts.first()?;
    let user = first
        .user()
        .map(|user| format!("{}@", encode_url_part(user)))
        .unwrap_or_default();
    let places = hosts
        .iter()
        .map(|o| format!("{}:{}", o.ip_or_hostname(), o.tcp_port()))
        .collect::<Vec<_>>()
        .join(",");
    let db = first.db_name().map(encode_url_part).unwrap_or_default();
    Some(format!("mysql://{user}{places}/{db}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips_without_its_password() {
        let text = r#"{"url": "mysql://app@db1:3306,db2:3307/app?max_clock_skew=500ms",
            "password": "hunter2-secret", "table": "locks.app_locks", "pool_size": 4,
            "min_pool_size": 2, "connect_timeout": "3s", "statement_timeout": 7,
            "lock_timeout": "2s"}"#;
        let config: MySqlConfig = serde_json::from_str(text).unwrap();
        assert_eq!(config.hosts().len(), 2);
        assert_eq!(config.hosts()[0].pass(), Some("hunter2-secret"));
        assert_eq!(config.max_clock_skew(), Duration::from_millis(500));
        assert_eq!(config.statement_timeout(), Duration::from_secs(7));
        let written = serde_json::to_string(&config).unwrap();
        assert!(!written.contains("hunter2"), "{written}");
        assert!(written.contains(r#""lock_timeout":"2s""#), "{written}");
        assert!(
            written.contains(r#""url":"mysql://app@db1:3306,db2:3307/app""#),
            "{written}"
        );
        let back: MySqlConfig = serde_json::from_str(&written).unwrap();
        // Everything but the password, which is never written.
        let without: MySqlConfig =
            serde_json::from_str(&text.replace(r#""password": "hunter2-secret","#, "")).unwrap();
        assert_eq!(back, without);
        let defaults: MySqlConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(defaults, MySqlConfig::default());
    }

    #[test]
    fn a_bad_value_is_refused_as_the_builder_refuses_it() {
        for (text, what) in [
            (r#"{"pool_size": 0}"#, "pool_size"),
            (r#"{"lock_timeout": "soon"}"#, "soon"),
            (r#"{"table": "x; DROP TABLE y"}"#, "table"),
            (
                r#"{"url": "mysql://h/db?max_clock_skew=2h"}"#,
                "max_clock_skew",
            ),
            (r#"{"pool_sise": 4}"#, "pool_sise"),
        ] {
            let error = serde_json::from_str::<MySqlConfig>(text).unwrap_err();
            assert!(error.to_string().contains(what), "{text}: {error}");
        }
    }
}
