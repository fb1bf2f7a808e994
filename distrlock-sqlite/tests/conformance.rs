//! The whole conformance suite against `SqliteBackend`, each case on a fresh
//! database file.

use std::sync::{Arc, Mutex, PoisonError};

use distrlock_core::{LockBackend, async_trait};
use distrlock_sqlite::rusqlite::Connection;
use distrlock_sqlite::{SqliteBackend, SqliteConfig};
use distrlock_testkit::{Faults, Harness, Setup, Skip, Unsupported};
use tempfile::TempDir;

/// A fresh database file in a temporary directory per case.
struct SqliteHarness;

#[async_trait]
impl Harness for SqliteHarness {
    async fn setup(&self) -> Result<Setup, Skip> {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("locks.db");
        let backend =
            SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap())
                .await
                .expect("open the database");
        backend.create_table().await.expect("create the table");
        let faults = WriteLockFaults {
            path,
            holder: Mutex::new(None),
            _dir: dir,
        };
        Ok(Setup::with_faults(Arc::new(backend), Arc::new(faults))
            // A real server on a shared CI machine: a correct call may take this long.
            .with_latency_budget(std::time::Duration::from_millis(1500)))
    }
}

/// Makes the database "unreachable" the way it happens to a local file: another
/// connection holds the write lock, so every write waits out the busy timeout
/// and then fails with a transient error. Also keeps the temporary directory
/// alive for as long as the setup.
struct WriteLockFaults {
    path: std::path::PathBuf,
    holder: Mutex<Option<Connection>>,
    _dir: TempDir,
}

#[async_trait]
impl Faults for WriteLockFaults {
    async fn make_unreachable(&self) -> Result<(), Unsupported> {
        let conn = Connection::open(&self.path).expect("a second connection");
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .expect("busy timeout");
        conn.execute_batch("BEGIN IMMEDIATE")
            .expect("take the write lock");
        *self.holder.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
        Ok(())
    }

    async fn restore(&self) -> Result<(), Unsupported> {
        if let Some(conn) = self
            .holder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            conn.execute_batch("ROLLBACK")
                .expect("let go of the write lock");
        }
        Ok(())
    }

    async fn missing_table(&self) -> Result<Arc<dyn LockBackend>, Unsupported> {
        // A fresh database file in the same directory, without the table.
        let path = self.path.with_file_name("missing.db");
        let backend =
            SqliteBackend::from_config(SqliteConfig::builder().path(&path).build().unwrap())
                .await
                .expect("open a second database file");
        Ok(Arc::new(backend))
    }
}

distrlock_testkit::conformance_tests!(
    SqliteHarness,
    supports = [
        unreachable,
        release_notifications,
        schema_missing,
        fair_order
    ]
);
