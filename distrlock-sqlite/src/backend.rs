//! [`SqliteBackend`]: the type, how one is opened, and the transaction every
//! call runs in. The `LockBackend` impl is in `lock_backend.rs`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{Error, ReleaseNotifier, Result, TableName};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::time::Instant;

use crate::clock::{HostClock, Now};
use crate::config::SqliteConfig;
use crate::driver_error::{Doing, from_sqlite};
use crate::file::FileIdentity;
use crate::sql::{self, Statements};
use crate::wake::Wake;
use crate::worker::Worker;

/// Locks stored in one SQLite database file, shared by every process of this host
/// that opens the same file.
///
/// Every operation is one `BEGIN IMMEDIATE` transaction on a dedicated thread
/// (see the crate documentation for why), in WAL mode, waiting for other processes' write locks up to the lock
/// timeout. Leases
/// are measured on the host's monotonic clock on Linux and on its wall clock
/// elsewhere. A release that leaves someone in line wakes the waiters at once:
/// this process's through its [`ReleaseNotifier`], other processes' through a
/// Unix datagram socket per waiting process, in a directory beside the file
/// (see [`wake_on_release`](crate::SqliteConfigBuilder::wake_on_release)).
///
/// The file must be on a local filesystem: SQLite's locking is unreliable on
/// network filesystems, and processes on different hosts would not share a clock.
pub struct SqliteBackend {
    pub(crate) worker: Worker,
    pub(crate) path: PathBuf,
    pub(crate) table: TableName,
    pub(crate) config: SqliteConfig,
    pub(crate) statements: Arc<Statements>,
    pub(crate) clock: Arc<HostClock>,
    pub(crate) file: Arc<FileIdentity>,
    pub(crate) notifier: ReleaseNotifier,
    /// Wake-ups on release to and from the other processes using the file.
    pub(crate) wake: Wake,
}

fn open_connection(path: &Path, busy_ms: u64) -> rusqlite::Result<Connection> {
    // NO_MUTEX: only the worker thread ever touches this connection.
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)?;
    // First, so that switching to WAL below (which needs a lock) already
    // waits for other processes instead of failing.
    crate::busy::install(&mut conn, Duration::from_millis(busy_ms))?;
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
    /// Opens `sqlite://PATH` (or `sqlite:PATH`) with every other setting at
    /// its default, and those its query sets; see
    /// [`SqliteConfigBuilder::url`](crate::SqliteConfigBuilder::url).
    ///
    /// Errors: [`Error::InvalidConfig`] for another scheme, an empty path or a
    /// bad parameter; otherwise as [`from_config`](Self::from_config)'s.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::from_config(SqliteConfig::builder().url(url).build()?).await
    }

    /// Opens (creating if needed) the database file of `config` and sets the
    /// connection up, on the backend's own thread (opening blocks). The lock
    /// table is not created: call
    /// [`create_table`](distrlock_core::LockBackend::create_table).
    ///
    /// Returns [`Error::InvalidConfig`] for a file on a network filesystem (see
    /// [`allow_network_filesystem`](crate::SqliteConfigBuilder::allow_network_filesystem)),
    /// [`Error::Unavailable`] if the file cannot be opened (its directory is
    /// missing, or permissions), and a permanent [`Error::Backend`] if the file is
    /// not a SQLite database.
    pub async fn from_config(config: SqliteConfig) -> Result<Self> {
        let SqliteConfig {
            path,
            table,
            lock_timeout,
            allow_network_filesystem,
            wake_on_release,
        } = config.clone();
        if !allow_network_filesystem {
            let checked = path.clone();
            tokio::task::spawn_blocking(move || crate::file::check_local_filesystem(&checked))
                .await
                .map_err(|e| {
                    Error::unavailable(
                        "checking the SQLite file's filesystem failed",
                        Some(Box::new(e)),
                    )
                })??;
        }
        let busy_ms = u64::try_from(lock_timeout.as_millis()).unwrap_or(u64::MAX);
        let open_path = path.clone();
        let open_table = table.clone();
        let worker = Worker::start(format!("distrlock-sqlite:{}", table), move || {
            open_connection(&open_path, busy_ms)
                .map_err(|e| from_sqlite(e, &open_table, Doing::Opening))
        })
        .await
        .map_err(|error| name_the_file(error, &path))?;
        let notifier = ReleaseNotifier::new();
        let wake = if wake_on_release {
            Wake::new(&path, &table, notifier.clone())
        } else {
            Wake::off()
        };
        Ok(SqliteBackend {
            file: Arc::new(FileIdentity::record(&path)),
            worker,
            statements: Arc::new(Statements::new(&table)),
            path,
            table,
            config,
            clock: Arc::new(HostClock::detect()),
            notifier,
            wake,
        })
    }

    /// The DDL of the lock table `table`, without opening anything.
    ///
    /// ```
    /// use distrlock_core::TableName;
    ///
    /// let ddl = distrlock_sqlite::SqliteBackend::schema_sql_for(&TableName::new("locks").unwrap());
    /// assert!(ddl.starts_with("CREATE TABLE IF NOT EXISTS \"locks\""));
    /// ```
    ///
    /// SQLite has no schemas: a qualified name is written with its qualifier
    /// (`"main"."locks"`), which SQLite reads as the database `main`; a
    /// [`SqliteConfig`] refuses one.
    pub fn schema_sql_for(table: &TableName) -> String {
        sql::create_table(table)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The lock table.
    pub fn table(&self) -> &TableName {
        &self.table
    }

    /// The settings the backend was opened with.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
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
    pub(crate) async fn write<T, F>(&self, not_after: Option<Instant>, job: F) -> Result<T>
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
    pub(crate) async fn read<T, F>(&self, job: F) -> Result<T>
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

    pub(crate) fn map(&self) -> impl Fn(rusqlite::Error) -> Error + Send + 'static {
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

impl fmt::Debug for SqliteBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteBackend")
            .field("path", &self.path)
            .field("table", &self.table)
            .field("clock", &self.clock.id())
            .finish_non_exhaustive()
    }
}
