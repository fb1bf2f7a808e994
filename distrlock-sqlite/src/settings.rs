//! With the `serde` feature: [`SqliteConfig`] in a config file, through the
//! plain [`Settings`] it is read from and written as.

use std::path::PathBuf;
use std::time::Duration;

use distrlock_core::Error;
use serde::{Deserialize, Serialize};

use crate::config::SqliteConfig;

/// The settings of a config file: `path` or `url` (one of them), and the
/// optional `table`, `lock_timeout` (a humantime string such as `"5s"`, or
/// whole seconds, as everywhere in distrlock), `allow_network_filesystem` and
/// `wake_on_release`.
/// A written config names its file by `path`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(default, skip_serializing)]
    url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    table: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "distrlock_core::serde_option_duration"
    )]
    lock_timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allow_network_filesystem: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wake_on_release: Option<bool>,
}

impl TryFrom<Settings> for SqliteConfig {
    type Error = Error;

    fn try_from(s: Settings) -> Result<Self, Error> {
        let mut b = SqliteConfig::builder();
        match (s.path, s.url) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidConfig {
                    reason: "give the SQLite file as path or as url, not both".into(),
                });
            }
            (Some(path), None) => b = b.path(path),
            (None, Some(url)) => b = b.url(url),
            (None, None) => {}
        }
        if let Some(table) = s.table {
            b = b.table(table);
        }
        if let Some(t) = s.lock_timeout {
            b = b.lock_timeout(t);
        }
        if let Some(allow) = s.allow_network_filesystem {
            b = b.allow_network_filesystem(allow);
        }
        if let Some(on) = s.wake_on_release {
            b = b.wake_on_release(on);
        }
        b.build()
    }
}

impl From<SqliteConfig> for Settings {
    fn from(c: SqliteConfig) -> Self {
        Settings {
            path: Some(c.path),
            url: None,
            table: Some(c.table.to_string()),
            lock_timeout: Some(c.lock_timeout),
            allow_network_filesystem: Some(c.allow_network_filesystem),
            wake_on_release: Some(c.wake_on_release),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_round_trips() {
        let config: SqliteConfig = serde_json::from_str(
            r#"{"url": "sqlite:///var/lib/app/locks.db?allow_network_filesystem=1",
                "table": "app_locks", "lock_timeout": "250ms"}"#,
        )
        .unwrap();
        assert_eq!(config.path().to_str(), Some("/var/lib/app/locks.db"));
        assert!(config.allow_network_filesystem());
        assert_eq!(config.lock_timeout(), Duration::from_millis(250));
        let written = serde_json::to_string(&config).unwrap();
        assert_eq!(
            written,
            r#"{"path":"/var/lib/app/locks.db","table":"app_locks","lock_timeout":"250ms","allow_network_filesystem":true,"wake_on_release":true}"#
        );
        let back: SqliteConfig = serde_json::from_str(&written).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn a_bad_value_is_refused_as_the_builder_refuses_it() {
        for (text, what) in [
            (r#"{}"#, "no database file"),
            (r#"{"path": "x.db", "table": "main.locks"}"#, "schemas"),
            (r#"{"path": "x.db", "lock_timeout": "0s"}"#, "lock_timeout"),
            (r#"{"url": "sqlite:///x.db?journal=off"}"#, "journal"),
            (r#"{"path": "x.db", "url": "sqlite:///y.db"}"#, "not both"),
            (r#"{"path": "x.db", "busy_timeout": "1s"}"#, "busy_timeout"),
        ] {
            let error = serde_json::from_str::<SqliteConfig>(text).unwrap_err();
            assert!(error.to_string().contains(what), "{text}: {error}");
        }
    }
}
