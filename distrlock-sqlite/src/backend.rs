//! [`SqliteBackend`] and its builder.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, Owner,
    ReleaseNotifier, Result, TableName, Token, Ttl, server_clock::from_unix_micros,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior, named_params};
use tokio::time::Instant;

use crate::clock::{HostClock, Now};
use crate::driver_error::{Doing, from_sqlite};
use crate::file::FileIdentity;
use crate::sql::{self, MAX_FENCE, Statements};
use crate::worker::Worker;

/// Locks stored in one SQLite database file, shared by every process of this host
/// that opens the same file.
///
/// Every operation is one `BEGIN IMMEDIATE` transaction on a dedicated thread
/// (see the crate documentation for why), in WAL mode with a busy timeout. Leases
/// are measured on the host's monotonic clock on Linux and on its wall clock
/// elsewhere. Releases made through this backend wake this process's waiters at
/// once; waiters in other processes notice by polling.
///
/// The file must be on a local filesystem: SQLite's locking is unreliable on
/// network filesystems, and processes on different hosts would not share a clock.
pub struct SqliteBackend {
    worker: Worker,
    path: PathBuf,
    table: TableName,
    statements: Arc<Statements>,
    clock: Arc<HostClock>,
    file: Arc<FileIdentity>,
    notifier: ReleaseNotifier,
}

/// Settings for a [`SqliteBackend`]; checked in [`open`](Self::open).
#[derive(Debug, Clone)]
pub struct SqliteBackendBuilder {
    path: PathBuf,
    table: String,
    busy_timeout: Duration,
    allow_network_filesystem: bool,
}

impl SqliteBackendBuilder {
    /// The table that holds the locks (default `distributed_locks`).
    ///
    /// It must be a plain name: SQLite has no schemas, so `schema.table` is
    /// refused with [`Error::InvalidTableName`] rather than guessed at. Use a
    /// different file to keep locks apart.
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// How long one operation waits for another process's write lock before it
    /// fails with a transient error (default 5 s). The waiting acquire retries
    /// such errors; a heartbeat retries them until the guard's local deadline.
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// Whether to open a file on a network, cluster or FUSE filesystem (NFS,
    /// SMB/CIFS, Ceph, 9P, sshfs, …), which [`open`](Self::open) refuses by
    /// default (on Linux, where `statfs` tells). SQLite's locking is not
    /// reliable on most of them, and processes on different hosts do not share
    /// a clock: allow it only for a filesystem whose POSIX locks are known to
    /// work, used by processes of this one host. Default `false`; the URL
    /// parameter `allow_network_filesystem=true` sets it too.
    pub fn allow_network_filesystem(mut self, allow: bool) -> Self {
        self.allow_network_filesystem = allow;
        self
    }

    /// Opens (creating if needed) the database file and sets the connection up.
    /// The lock table is not created: call [`SqliteBackend::create_table`].
    ///
    /// Returns [`Error::InvalidTableName`] for a bad or qualified table name,
    /// [`Error::InvalidConfig`] for a file on a network filesystem (see
    /// [`allow_network_filesystem`](Self::allow_network_filesystem)),
    /// [`Error::Unavailable`] if the file cannot be opened (its directory is
    /// missing, or permissions), and a permanent [`Error::Backend`] if the file is
    /// not a SQLite database.
    pub async fn open(self) -> Result<SqliteBackend> {
        let table = sqlite_table_name(&self.table)?;
        let path = self.path;
        if !self.allow_network_filesystem {
            crate::file::check_local_filesystem(&path)?;
        }
        let busy_ms = u64::try_from(self.busy_timeout.as_millis()).unwrap_or(u64::MAX);
        let open_path = path.clone();
        let open_table = table.clone();
        let worker = Worker::start(format!("distrlock-sqlite:{}", table), move || {
            open_connection(&open_path, busy_ms)
                .map_err(|e| from_sqlite(e, &open_table, Doing::Opening))
        })
        .await
        .map_err(|error| name_the_file(error, &path))?;
        Ok(SqliteBackend {
            file: Arc::new(FileIdentity::record(&path)),
            worker,
            statements: Arc::new(Statements::new(&table)),
            path,
            table,
            clock: Arc::new(HostClock::detect()),
            notifier: ReleaseNotifier::new(),
        })
    }
}

/// A URL parameter's boolean value.
fn parse_flag(name: &str, value: &str) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::InvalidConfig {
            reason: format!("{name} takes true or false"),
        }),
    }
}

/// Validates a table name for SQLite: a plain identifier, no schema part.
fn sqlite_table_name(name: &str) -> Result<TableName> {
    let table = TableName::new(name)?;
    if table.schema().is_some() {
        return Err(Error::InvalidTableName {
            name: name.chars().take(80).collect(),
            reason: "SQLite has no schemas: use a plain table name (or another file)".into(),
        });
    }
    Ok(table)
}

fn open_connection(path: &Path, busy_ms: u64) -> rusqlite::Result<Connection> {
    // NO_MUTEX: only the worker thread ever touches this connection.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.execute_batch(&sql::busy_timeout(busy_ms))?;
    let give_up = std::time::Instant::now() + Duration::from_millis(busy_ms);
    loop {
        let mode: String = conn.query_row(sql::JOURNAL_MODE, [], |row| row.get(0))?;
        // `memory` is what an in-memory database reports; it cannot use WAL.
        if mode.eq_ignore_ascii_case("wal") || mode.eq_ignore_ascii_case("memory") {
            break;
        }
        match conn.query_row(sql::SET_WAL, [], |row| row.get::<_, String>(0)) {
            Ok(_) => break,
            Err(error)
                if error.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                    && std::time::Instant::now() < give_up =>
            {
                // 5–20 ms of jitter, so that processes opening a new file at
                // once spread out.
                std::thread::sleep(Duration::from_millis(5 + fastrand::u64(0..16)));
            }
            Err(error) => return Err(error),
        }
    }
    conn.execute_batch(sql::SYNCHRONOUS_FULL)?;
    Ok(conn)
}

/// Adds the file's path to an opening error, so the user knows which file.
fn name_the_file(error: Error, path: &Path) -> Error {
    match error {
        Error::Unavailable { message, source } => Error::Unavailable {
            message: format!("{message}: {}", path.display()),
            source,
        },
        Error::Backend {
            message,
            transient,
            source,
        } => Error::Backend {
            message: format!("{message}: {}", path.display()),
            transient,
            source,
        },
        other => other,
    }
}

impl SqliteBackend {
    /// A builder for the database file at `path`.
    pub fn builder(path: impl Into<PathBuf>) -> SqliteBackendBuilder {
        SqliteBackendBuilder {
            path: path.into(),
            table: TableName::DEFAULT.to_owned(),
            busy_timeout: Duration::from_secs(5),
            allow_network_filesystem: false,
        }
    }

    /// A builder for `sqlite://PATH` (or `sqlite:PATH`), with the settings its
    /// query sets: `?allow_network_filesystem=true` (see
    /// [`allow_network_filesystem`](SqliteBackendBuilder::allow_network_filesystem)).
    ///
    /// Returns [`Error::InvalidConfig`] for another scheme, an empty path, or an
    /// unknown or malformed parameter.
    ///
    /// ```
    /// use distrlock_sqlite::SqliteBackend;
    ///
    /// let builder =
    ///     SqliteBackend::builder_from_url("sqlite:///mnt/nfs/locks.db?allow_network_filesystem=1")
    ///         .unwrap();
    /// # let _ = builder;
    /// assert!(SqliteBackend::builder_from_url("sqlite:///x.db?journal=off").is_err());
    /// ```
    pub fn builder_from_url(url: &str) -> Result<SqliteBackendBuilder> {
        let mut builder = Self::builder(Self::path_from_url(url)?);
        let query = url.split_once('?').map_or("", |(_, query)| query);
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, "true"));
            match name {
                "allow_network_filesystem" => {
                    builder.allow_network_filesystem = parse_flag(name, value)?;
                }
                other => {
                    return Err(Error::InvalidConfig {
                        reason: format!(
                            "unknown SQLite URL parameter {:?}; the one parameter is \
                             allow_network_filesystem=true",
                            other.chars().take(40).collect::<String>()
                        ),
                    });
                }
            }
        }
        Ok(builder)
    }

    /// Opens the database file at `path` with the default table and settings.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        Self::builder(path).open().await
    }

    /// Opens `sqlite://PATH` (or `sqlite:PATH`) with the default table and
    /// settings, and those its query sets (see
    /// [`builder_from_url`](Self::builder_from_url)).
    /// `sqlite:///var/lib/app/locks.db` is an absolute path, `sqlite://locks.db`
    /// a relative one.
    ///
    /// Returns [`Error::InvalidConfig`] for another scheme, an empty path or a
    /// bad parameter.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::builder_from_url(url)?.open().await
    }

    /// The file path in a `sqlite://PATH` or `sqlite:PATH` URL: everything up to
    /// a `?`, which starts the parameters (a path with a `?` in it can be
    /// opened with [`builder`](Self::builder), not by URL).
    ///
    /// ```
    /// use distrlock_sqlite::SqliteBackend;
    ///
    /// let path = SqliteBackend::path_from_url("sqlite:///var/lib/app/locks.db").unwrap();
    /// assert_eq!(path.to_str(), Some("/var/lib/app/locks.db"));
    /// assert!(SqliteBackend::path_from_url("postgres://db/app").is_err());
    /// assert!(SqliteBackend::path_from_url("sqlite://").is_err());
    /// ```
    pub fn path_from_url(url: &str) -> Result<PathBuf> {
        let rest = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .ok_or_else(|| Error::InvalidConfig {
                reason: "a SQLite URL looks like sqlite:///path/to/locks.db".into(),
            })?;
        let rest = rest.split_once('?').map_or(rest, |(path, _)| path);
        if rest.is_empty() {
            return Err(Error::InvalidConfig {
                reason: "the SQLite URL has no file path (sqlite:///path/to/locks.db)".into(),
            });
        }
        Ok(PathBuf::from(rest))
    }

    /// The DDL of the lock table `table`, without opening anything.
    ///
    /// Returns [`Error::InvalidTableName`] for a bad or qualified name.
    ///
    /// ```
    /// let ddl = distrlock_sqlite::SqliteBackend::schema_sql_for("locks").unwrap();
    /// assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS \"locks\""));
    /// assert!(distrlock_sqlite::SqliteBackend::schema_sql_for("main.locks").is_err());
    /// ```
    pub fn schema_sql_for(table: &str) -> Result<String> {
        Ok(sql::create_table(&sqlite_table_name(table)?))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// Runs `job` on the connection thread in one `BEGIN IMMEDIATE` transaction,
    /// with a clock reading taken once the write lock is held.
    ///
    /// IMMEDIATE takes the write lock up front, waiting up to the busy timeout.
    /// A deferred transaction would read first and try to upgrade later; in WAL
    /// mode that upgrade fails at once (SQLITE_BUSY_SNAPSHOT, no busy wait) when
    /// another process wrote in between.
    ///
    /// With a `not_after` (contract item 8), the job runs only if the clock
    /// reading was taken no later than that bound: a request that waited in the
    /// queue behind slow ones, or for another process's write lock, past the
    /// moment its caller stopped waiting, rolls back without running anything
    /// and fails with a transient [`Error::Unavailable`]. See [`LocalBound`].
    ///
    /// Before anything else, with the write lock held, it checks that the path
    /// still names the file that was opened (see [`FileIdentity`]).
    async fn write<T, F>(&self, not_after: Option<Instant>, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>, &Statements, &HostClock, Now) -> Result<T>
            + Send
            + 'static,
    {
        let statements = self.statements.clone();
        let clock = self.clock.clone();
        let table = self.table.clone();
        let file = self.file.clone();
        let bound = not_after.map(LocalBound::new);
        self.worker
            .run(move |conn| {
                let map = |e| from_sqlite(e, &table, Doing::Statement);
                let tx = conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(map)?;
                file.check()?;
                let now = clock.now();
                // Checked after the clock reading, so the reading is never later
                // than the instant compared; the transaction rolls back on drop.
                if let Some(bound) = bound {
                    bound.check()?;
                }
                let value = job(&tx, &statements, &clock, now)?;
                tx.commit().map_err(map)?;
                Ok(value)
            })
            .await
    }

    /// Runs a read on the connection thread with a clock reading, once it has
    /// checked that the path still names the file that was opened.
    async fn read<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Statements, &HostClock) -> Result<T> + Send + 'static,
    {
        let statements = self.statements.clone();
        let clock = self.clock.clone();
        let file = self.file.clone();
        self.worker
            .run(move |conn| {
                file.check()?;
                job(conn, &statements, &clock)
            })
            .await
    }

    fn map(&self) -> impl Fn(rusqlite::Error) -> Error + Send + 'static {
        let table = self.table.clone();
        move |e| from_sqlite(e, &table, Doing::Statement)
    }
}

/// A caller's `not_after`, carried to the connection thread as an instant of
/// the standard library's monotonic clock.
///
/// Outside tests, tokio's [`Instant`] *is* that clock (`CLOCK_MONOTONIC` on
/// Linux, the clock the leases run on there), so the bound is `not_after`
/// itself. It is computed as "now plus the time the caller has left", reading
/// std's clock before tokio's, which rounds toward earlier and stays right
/// under tokio's paused test clock too.
#[derive(Debug, Clone, Copy)]
struct LocalBound(std::time::Instant);

impl LocalBound {
    fn new(not_after: Instant) -> Self {
        let std_now = std::time::Instant::now();
        let left = not_after.saturating_duration_since(Instant::now());
        Self(std_now + left)
    }

    /// Fails with a transient [`Error::Unavailable`] once the bound has passed.
    fn check(self) -> Result<()> {
        let late = std::time::Instant::now().saturating_duration_since(self.0);
        if late.is_zero() {
            Ok(())
        } else {
            Err(Error::unavailable(
                format!(
                    "the SQLite statement would have run {late:?} after its caller stopped \
                     waiting; nothing was changed"
                ),
                None,
            ))
        }
    }
}

/// One row as the read statements return it.
struct Row {
    key: String,
    owner: String,
    fence: i64,
    acquired_at: i64,
    expires_at: Option<i64>,
    clock: String,
    lease_end: Option<i64>,
}

impl Row {
    fn from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            key: row.get(0)?,
            owner: row.get(1)?,
            fence: row.get(2)?,
            acquired_at: row.get(3)?,
            expires_at: row.get(4)?,
            clock: row.get(5)?,
            lease_end: row.get(6)?,
        })
    }

    fn into_info(self, clock: &HostClock, now: Now) -> Result<LockInfo> {
        let key = LockKey::new(self.key).map_err(|e| {
            Error::permanent(
                "the lock table holds a key distrlock cannot represent",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let (state, remaining) = match self.lease_end {
            None => (LockState::Released, None),
            Some(end) => match remaining(&self.clock, end, self.expires_at, clock, now) {
                Some(left) => (LockState::Held, Some(left)),
                None => (LockState::Expired, None),
            },
        };
        Ok(LockInfo {
            key,
            owner: self.owner,
            fence: Fence::new(self.fence),
            acquired_at: from_unix_micros(self.acquired_at),
            expires_at: self.expires_at.map(from_unix_micros),
            state,
            remaining,
        })
    }
}

/// The lease left on a row whose lease ends at `end` on `row_clock` (and at
/// `expires_at` on the wall clock), or `None` if it is not live: the same test as
/// the SQL `LIVE` predicate.
fn remaining(
    row_clock: &str,
    end: i64,
    expires_at: Option<i64>,
    clock: &HostClock,
    now: Now,
) -> Option<Duration> {
    let left = if row_clock == clock.id() {
        end - now.lease
    } else {
        expires_at? - now.wall
    };
    (left > 0).then(|| Duration::from_micros(u64::try_from(left).unwrap_or(0)))
}

#[async_trait]
impl LockBackend for SqliteBackend {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let map = self.map();
        let owner = Owner::new(owner)?.into_string();
        let (key, token) = (key.clone(), token.to_string());
        self.write(Some(not_after), move |tx, sql, clock, now| {
            let fence: Option<i64> = tx
                .prepare_cached(&sql.acquire)
                .and_then(|mut stmt| {
                    stmt.query_row(
                        named_params! {
                            ":key": key.as_str(),
                            ":token": token,
                            ":owner": owner,
                            ":wall_now": now.wall,
                            ":ttl": ttl.as_micros(),
                            ":clock": clock.id(),
                            ":now": now.lease,
                        },
                        |row| row.get(0),
                    )
                    .optional()
                })
                .map_err(&map)?;
            if let Some(fence) = fence {
                return Ok(AcquireOutcome::Acquired {
                    fence: Fence::new(fence),
                    server_time: clock.as_system_time(now),
                });
            }
            // Refused: nothing was written. Report the holder's remaining lease.
            let (fence, row_clock, lease_end, expires_at): (i64, String, Option<i64>, Option<i64>) =
                tx.prepare_cached(&sql.holder)
                    .and_then(|mut stmt| {
                        stmt.query_row(named_params! { ":key": key.as_str() }, |row| {
                            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
                        })
                    })
                    .map_err(&map)?;
            match lease_end.and_then(|end| remaining(&row_clock, end, expires_at, clock, now)) {
                Some(left) => Ok(AcquireOutcome::Held {
                    remaining: Some(left),
                }),
                None if fence == MAX_FENCE => Err(Error::permanent(
                    format!("the fence of lock {key} is exhausted"),
                    std::io::Error::other("fence at i64::MAX"),
                )),
                None => Err(Error::permanent(
                    format!("acquire of {key} was refused although the lease is not live"),
                    std::io::Error::other("inconsistent acquire result"),
                )),
            }
        })
        .await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let map = self.map();
        let (key, token) = (key.clone(), token.to_string());
        self.write(Some(not_after), move |tx, sql, clock, now| {
            let changed = tx
                .prepare_cached(&sql.extend)
                .and_then(|mut stmt| {
                    stmt.execute(named_params! {
                        ":key": key.as_str(),
                        ":token": token,
                        ":wall_now": now.wall,
                        ":ttl": ttl.as_micros(),
                        ":clock": clock.id(),
                        ":now": now.lease,
                    })
                })
                .map_err(&map)?;
            match changed {
                1 => Ok(clock.as_system_time(now)),
                _ => Err(Error::NotHeld { key }),
            }
        })
        .await
    }

    /// One `BEGIN IMMEDIATE` transaction for the whole batch, with one clock
    /// reading and one check of `not_after`: each lease gets the single
    /// extend's statement and guard.
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let map = self.map();
        let leases: Vec<(LockKey, String)> = leases
            .iter()
            .map(|(key, token)| (key.clone(), token.to_string()))
            .collect();
        self.write(Some(not_after), move |tx, sql, clock, now| {
            let server_time = clock.as_system_time(now);
            let mut stmt = tx.prepare_cached(&sql.extend).map_err(&map)?;
            let mut results = Vec::with_capacity(leases.len());
            for (key, token) in leases {
                let changed = stmt
                    .execute(named_params! {
                        ":key": key.as_str(),
                        ":token": token,
                        ":wall_now": now.wall,
                        ":ttl": ttl.as_micros(),
                        ":clock": clock.id(),
                        ":now": now.lease,
                    })
                    .map_err(&map)?;
                results.push(match changed {
                    1 => Ok(server_time),
                    _ => Err(Error::NotHeld { key }),
                });
            }
            Ok(results)
        })
        .await
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let map = self.map();
        let (owned_key, token) = (key.clone(), token.to_string());
        self.write(Some(not_after), move |tx, sql, clock, now| {
            let changed = tx
                .prepare_cached(&sql.release)
                .and_then(|mut stmt| {
                    stmt.execute(named_params! {
                        ":key": owned_key.as_str(),
                        ":token": token,
                        ":clock": clock.id(),
                        ":wall_now": now.wall,
                        ":now": now.lease,
                    })
                })
                .map_err(&map)?;
            match changed {
                1 => Ok(()),
                _ => Err(Error::NotHeld { key: owned_key }),
            }
        })
        .await?;
        // Committed: wake this process's waiters now instead of at their next poll.
        self.notifier.notify(key);
        Ok(())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let map = self.map();
        let key = key.clone();
        self.read(move |conn, sql, clock| {
            let row = conn
                .prepare_cached(&sql.inspect)
                .and_then(|mut stmt| {
                    stmt.query_row(named_params! { ":key": key.as_str() }, Row::from_sql)
                        .optional()
                })
                .map_err(&map)?;
            let now = clock.now();
            row.map(|row| row.into_info(clock, now)).transpose()
        })
        .await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let map = self.map();
        self.read(move |conn, sql, clock| {
            let rows = conn
                .prepare_cached(&sql.list)
                .and_then(|mut stmt| {
                    stmt.query_map([], Row::from_sql)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(&map)?;
            let now = clock.now();
            rows.into_iter()
                .map(|row| row.into_info(clock, now))
                .collect()
        })
        .await
    }

    async fn create_table(&self) -> Result<()> {
        let map = self.map();
        self.write(None, move |tx, sql, _, _| {
            tx.execute_batch(&sql.create_table).map_err(&map)
        })
        .await
    }

    fn schema_sql(&self) -> String {
        self.statements.create_table.clone()
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.notifier)
    }
}

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.path)
            .field("table", &self.table)
            .field("clock", &self.clock.id())
            .finish_non_exhaustive()
    }
}
