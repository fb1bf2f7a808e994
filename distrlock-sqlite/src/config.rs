//! [`SqliteConfig`]: every setting of a [`SqliteBackend`](crate::SqliteBackend),
//! validated in one place by [`SqliteConfigBuilder::build`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use distrlock_core::{Error, Result, TableName};

/// The validated settings of a [`SqliteBackend`](crate::SqliteBackend): the
/// database file, the lock table, how long to wait for another process's
/// write lock, and whether a network filesystem is allowed.
///
/// Made by [`SqliteConfig::builder`]`…`[`build`](SqliteConfigBuilder::build);
/// then [`SqliteBackend::from_config`](crate::SqliteBackend::from_config) opens
/// the file.
///
/// With the `serde` feature it is `Deserialize` (validated as
/// [`build`](SqliteConfigBuilder::build) validates) and `Serialize`: the
/// settings `path` or `url` (read only), `table`, `lock_timeout` (a humantime
/// string such as `"5s"`, or whole seconds), `allow_network_filesystem` and
/// `wake_on_release`.
///
/// ```
/// use std::time::Duration;
/// use distrlock_sqlite::SqliteConfig;
///
/// let config = SqliteConfig::builder()
///     .url("sqlite:///var/lib/app/locks.db")
///     .table("app_locks")
///     .lock_timeout(Duration::from_secs(2))
///     .build()
///     .unwrap();
/// assert_eq!(config.path().to_str(), Some("/var/lib/app/locks.db"));
/// assert_eq!(config.table().name(), "app_locks");
///
/// // SQLite has no schemas; unknown URL parameters are refused.
/// assert!(SqliteConfig::builder().path("x.db").table("main.locks").build().is_err());
/// assert!(SqliteConfig::builder().url("sqlite:///x.db?journal=off").build().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(
        try_from = "crate::settings::Settings",
        into = "crate::settings::Settings"
    )
)]
pub struct SqliteConfig {
    pub(crate) path: PathBuf,
    pub(crate) table: TableName,
    pub(crate) lock_timeout: Duration,
    pub(crate) allow_network_filesystem: bool,
    pub(crate) wake_on_release: bool,
}

impl SqliteConfig {
    /// The default [`lock_timeout`](SqliteConfigBuilder::lock_timeout): 5 s.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
    /// The longest [`lock_timeout`](SqliteConfigBuilder::lock_timeout): one day.
    pub const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
    /// The URL parameter that sets
    /// [`allow_network_filesystem`](SqliteConfigBuilder::allow_network_filesystem).
    pub const ALLOW_NETWORK_FILESYSTEM_PARAM: &'static str = "allow_network_filesystem";

    /// A builder with every default: no file yet, table `distributed_locks`,
    /// 5 s lock timeout, local filesystems only.
    pub fn builder() -> SqliteConfigBuilder {
        SqliteConfigBuilder::default()
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock table (a plain name: SQLite has no schemas).
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// How long one operation waits for another process's write lock (SQLite's
    /// busy timeout).
    pub fn lock_timeout(&self) -> Duration {
        self.lock_timeout
    }

    /// Whether a file on a network filesystem may be opened.
    pub fn allow_network_filesystem(&self) -> bool {
        self.allow_network_filesystem
    }

    /// Whether releases wake other processes' waiters through local sockets
    /// (see [`SqliteConfigBuilder::wake_on_release`]).
    pub fn wake_on_release(&self) -> bool {
        self.wake_on_release
    }
}

/// Builds a [`SqliteConfig`]; see [`SqliteConfig::builder`]. Nothing is checked
/// until [`build`](Self::build).
#[derive(Debug, Clone, Default)]
pub struct SqliteConfigBuilder {
    path: Option<PathBuf>,
    url: Option<String>,
    table: Option<String>,
    lock_timeout: Option<Duration>,
    allow_network_filesystem: Option<bool>,
    wake_on_release: Option<bool>,
}

impl SqliteConfigBuilder {
    /// The database file (created when first opened if missing). Replaces
    /// [`url`](Self::url).
    pub fn path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self.url = None;
        self
    }

    /// The database file as `sqlite://PATH` (or `sqlite:PATH`):
    /// `sqlite:///var/lib/app/locks.db` is an absolute path, `sqlite://locks.db`
    /// a relative one. Everything up to a `?` is the path (a path with a `?` in
    /// it needs [`path`](Self::path)); the query may set
    /// `allow_network_filesystem=true`, which
    /// [`allow_network_filesystem`](Self::allow_network_filesystem) overrides.
    /// Replaces [`path`](Self::path).
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self.path = None;
        self
    }

    /// The table that holds the locks (default `distributed_locks`).
    ///
    /// It must be a plain name: SQLite has no schemas, so `schema.table` is
    /// refused with [`Error::InvalidTableName`] rather than guessed at. Use a
    /// different file to keep locks apart.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = Some(name.into());
        self
    }

    /// How long one operation waits for another process's write lock before it
    /// fails with a transient error (default 5 s, at least 1 ms): SQLite's busy
    /// timeout, the same concept as PostgreSQL's `lock_timeout` and MySQL's
    /// `innodb_lock_wait_timeout` (waiting on a lock another session holds),
    /// for the whole file. The waiting acquire retries such errors; a heartbeat
    /// retries them until the guard's local deadline.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout);
        self
    }

    /// Whether to open a file on a network, cluster or FUSE filesystem (NFS,
    /// SMB/CIFS, Ceph, 9P, sshfs, …), which opening refuses by default (on
    /// Linux, where `statfs` tells). SQLite's locking is not reliable on most
    /// of them, and processes on different hosts do not share a clock: allow it
    /// only for a filesystem whose POSIX locks are known to work, used by
    /// processes of this one host. Default `false`, or the URL's
    /// `allow_network_filesystem`.
    pub fn allow_network_filesystem(mut self, allow: bool) -> Self {
        self.allow_network_filesystem = Some(allow);
        self
    }

    /// Whether a release wakes the waiters of other processes at once
    /// (default `true`).
    ///
    /// A backend that waits on a key binds a Unix datagram socket in a
    /// directory beside the database file, `<file>-wake/` (or, for a path too
    /// long for a socket's, a directory in the temporary directory), and links
    /// it under the key. A release that leaves someone in line sends one
    /// datagram to each process waiting on that key; a release nobody waits
    /// for sends nothing. Waiters in line then rely on these wake-ups and ask
    /// again at least every half turn of the line (125 ms); without them they
    /// poll, every millisecond or so near the head of the line.
    ///
    /// Wake-ups reach the processes that can write to that directory, and are
    /// hints: a lost one (the releaser died between its commit and the send)
    /// delays a waiter, it never costs a lock. Turn it off where the directory
    /// cannot be shared, or to compare.
    pub fn wake_on_release(mut self, on: bool) -> Self {
        self.wake_on_release = Some(on);
        self
    }

    /// Validates every setting.
    ///
    /// Errors: [`Error::InvalidTableName`] for a bad or qualified table name,
    /// [`Error::InvalidConfig`] for no file, a URL of another scheme, with an
    /// empty path or an unknown or malformed parameter, or a lock timeout out
    /// of range.
    pub fn build(self) -> Result<SqliteConfig> {
        let (path, url_allow) = match (self.path, self.url) {
            (Some(path), _) => (path, None),
            (None, Some(url)) => parse_url(&url)?,
            (None, None) => {
                return Err(invalid(
                    "no database file given: set a path or a sqlite:///path/to/locks.db URL".into(),
                ));
            }
        };
        if path.as_os_str().is_empty() {
            return Err(invalid("the SQLite database path is empty".into()));
        }
        let table = table_name(self.table.as_deref().unwrap_or(TableName::DEFAULT))?;
        let lock_timeout = self
            .lock_timeout
            .unwrap_or(SqliteConfig::DEFAULT_LOCK_TIMEOUT);
        if lock_timeout < Duration::from_millis(1) || lock_timeout > SqliteConfig::MAX_LOCK_TIMEOUT
        {
            return Err(invalid(format!(
                "lock_timeout must be between 1 ms and 24 h, got {lock_timeout:?}"
            )));
        }
        Ok(SqliteConfig {
            path,
            table,
            lock_timeout,
            allow_network_filesystem: self.allow_network_filesystem.or(url_allow).unwrap_or(false),
            wake_on_release: self.wake_on_release.unwrap_or(true),
        })
    }
}

fn invalid(reason: String) -> Error {
    Error::InvalidConfig { reason }
}

/// Validates a table name for SQLite: a plain identifier, no schema part.
pub(crate) fn table_name(name: &str) -> Result<TableName> {
    let table = TableName::new(name)?;
    if table.schema().is_some() {
        return Err(Error::InvalidTableName {
            name: name.chars().take(80).collect(),
            reason: "SQLite has no schemas: use a plain table name (or another file)".into(),
        });
    }
    Ok(table)
}

/// The path of `sqlite://PATH` or `sqlite:PATH`, and what its query says of
/// `allow_network_filesystem`.
fn parse_url(url: &str) -> Result<(PathBuf, Option<bool>)> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
        .ok_or_else(|| invalid("a SQLite URL looks like sqlite:///path/to/locks.db".into()))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() {
        return Err(invalid(
            "the SQLite URL has no file path (sqlite:///path/to/locks.db)".into(),
        ));
    }
    let mut allow = None;
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, "true"));
        if name == SqliteConfig::ALLOW_NETWORK_FILESYSTEM_PARAM {
            allow = Some(parse_flag(name, value)?);
        } else {
            return Err(invalid(format!(
                "unknown SQLite URL parameter {:?}; the one parameter is \
                 allow_network_filesystem=true",
                name.chars().take(40).collect::<String>()
            )));
        }
    }
    Ok((PathBuf::from(path), allow))
}

/// A URL parameter's boolean value.
fn parse_flag(name: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(invalid(format!("{name} takes true or false"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_the_path_and_the_network_filesystem_flag() {
        let config = |url: &str| SqliteConfig::builder().url(url).build();
        let c = config("sqlite:///mnt/nfs/locks.db?allow_network_filesystem=1").unwrap();
        assert_eq!(c.path(), Path::new("/mnt/nfs/locks.db"));
        assert!(c.allow_network_filesystem());
        assert_eq!(
            config("sqlite:locks.db").unwrap().path(),
            Path::new("locks.db")
        );
        for bad in [
            "postgres://db/app",
            "sqlite://",
            "sqlite:///x.db?journal=off",
            "sqlite:///x.db?allow_network_filesystem=maybe",
        ] {
            assert!(
                matches!(config(bad), Err(Error::InvalidConfig { .. })),
                "{bad}"
            );
        }
        // The setter wins over the URL.
        let c = SqliteConfig::builder()
            .url("sqlite:///x.db?allow_network_filesystem=true")
            .allow_network_filesystem(false)
            .build()
            .unwrap();
        assert!(!c.allow_network_filesystem());
    }

    #[test]
    fn refuses_bad_settings_with_typed_errors() {
        let b = || SqliteConfig::builder().path("x.db");
        assert!(matches!(
            SqliteConfig::builder().build(),
            Err(Error::InvalidConfig { .. })
        ));
        assert!(matches!(
            b().table("main.locks").build(),
            Err(Error::InvalidTableName { .. })
        ));
        assert!(matches!(
            b().lock_timeout(Duration::ZERO).build(),
            Err(Error::InvalidConfig { .. })
        ));
        assert_eq!(
            b().build().unwrap().lock_timeout(),
            SqliteConfig::DEFAULT_LOCK_TIMEOUT
        );
    }
}
