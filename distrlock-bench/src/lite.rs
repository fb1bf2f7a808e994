//! SQLite: the library backend and, on one connection per client, the raw
//! baseline (the backend's own SQL from [`LockSql`]) and the Go sequence.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::bail;
use async_trait::async_trait;
use distrlock_core::{LockBackend, TableName, Ttl};
use distrlock_sqlite::{LeaseClock, LockSql, SqliteBackend, SqliteConfig};
use rusqlite::{Connection, TransactionBehavior, named_params};

use crate::env::{Connect, Env, Variant};
use crate::go;
use crate::proxy::Wire;
use crate::workload::{Cycle, Waiter};

pub(crate) struct Sqlite {
    dir: PathBuf,
    ttl_us: i64,
    clock: Arc<LeaseClock>,
}

impl Sqlite {
    pub(crate) fn new(dir: PathBuf, ttl: Ttl) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            ttl_us: ttl.as_micros(),
            clock: Arc::new(LeaseClock::detect()),
        })
    }

    fn path(&self, table: &str) -> PathBuf {
        self.dir.join(format!("{table}.db"))
    }

    /// A connection set up as the backend sets up its own: WAL, a busy
    /// timeout, every commit synced.
    fn open(&self, table: &str) -> anyhow::Result<Connection> {
        let conn = Connection::open(self.path(table))?;
        conn.execute_batch("PRAGMA busy_timeout = 5000")?;
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))?;
        conn.execute_batch("PRAGMA synchronous = FULL")?;
        Ok(conn)
    }
}

#[async_trait]
impl Env for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn native_name(&self) -> Option<&'static str> {
        None
    }

    fn upstream(&self) -> Option<(SocketAddr, Wire)> {
        None
    }

    async fn describe(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let conn = Connection::open_in_memory()?;
        let version: String = conn.query_row("SELECT sqlite_version()", [], |r| r.get(0))?;
        let mut out = BTreeMap::new();
        out.insert("version".into(), version);
        out.insert(
            "durability".into(),
            "journal_mode=WAL, synchronous=FULL (the backend's settings)".into(),
        );
        out.insert("file".into(), self.dir.display().to_string());
        Ok(out)
    }

    async fn reset_table(&self, table: &str) -> anyhow::Result<()> {
        self.drop_table(table).await?;
        let backend = SqliteBackend::from_config(
            SqliteConfig::builder()
                .path(self.path(table))
                .table(table)
                .build()?,
        )
        .await?;
        backend.create_table().await?;
        Ok(())
    }

    async fn drop_table(&self, table: &str) -> anyhow::Result<()> {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.path(table).into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    async fn fill(&self, table: &str, rows: u64) -> anyhow::Result<()> {
        let conn = self.open(table)?;
        let t = TableName::new(table)?.quoted('"');
        let now = self.clock.now();
        conn.execute(
            &format!(
                "WITH RECURSIVE g(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM g WHERE n < :rows) \
                 INSERT OR IGNORE INTO {t} \
                 (lock_key, token, fence, owner, acquired_at, expires_at, clock, lease_end) \
                 SELECT 'fill/' || n, lower(hex(randomblob(16))), 1, 'fill', :wall, NULL, :clock, NULL \
                 FROM g"
            ),
            named_params! { ":rows": i64::try_from(rows)?, ":wall": now.wall, ":clock": self.clock.id() },
        )?;
        conn.execute_batch("ANALYZE")?;
        Ok(())
    }

    async fn backend(&self, table: &str, connect: Connect) -> anyhow::Result<Arc<dyn LockBackend>> {
        Ok(Arc::new(
            SqliteBackend::from_config(
                SqliteConfig::builder()
                    .path(self.path(table))
                    .table(table)
                    .wake_on_release(connect.listen)
                    .build()?,
            )
            .await?,
        ))
    }

    async fn cycles(
        &self,
        variant: Variant,
        table: &str,
        n: usize,
    ) -> anyhow::Result<Vec<Box<dyn Cycle>>> {
        let name = TableName::new(table)?;
        let t = name.quoted('"');
        let statements = match variant {
            Variant::Raw => {
                let sql = LockSql::for_table(&name);
                Statements::Raw {
                    acquire: sql.acquire,
                    release: sql.release,
                }
            }
            Variant::Go => Statements::Go {
                init: go::sqlite_init(&t),
                acquire: go::sqlite_acquire(&t),
                release: go::sqlite_release(&t),
            },
            Variant::Library | Variant::Native => bail!("no such SQLite client"),
        };
        let statements = Arc::new(statements);
        let mut out: Vec<Box<dyn Cycle>> = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(Box::new(SqliteCycle {
                conn: Arc::new(Mutex::new(self.open(table)?)),
                statements: statements.clone(),
                clock: self.clock.clone(),
                ttl_us: self.ttl_us,
            }));
        }
        Ok(out)
    }

    async fn native_waiters(&self, _key: &str, _n: usize) -> anyhow::Result<Vec<Box<dyn Waiter>>> {
        bail!("SQLite has no native lock")
    }

    async fn server_counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(BTreeMap::new())
    }
}

enum Statements {
    Raw {
        acquire: String,
        release: String,
    },
    Go {
        init: String,
        acquire: String,
        release: String,
    },
}

/// One client with its own connection. Each transaction runs in a blocking task
/// of its own, as an async caller of the raw driver would run each operation
/// (the backend, likewise, sends each operation to its connection thread).
struct SqliteCycle {
    conn: Arc<Mutex<Connection>>,
    statements: Arc<Statements>,
    clock: Arc<LeaseClock>,
    ttl_us: i64,
}

impl SqliteCycle {
    /// Runs `job` on the connection in a blocking task.
    async fn blocking<T, F>(&self, job: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection, &Statements, &LeaseClock) -> anyhow::Result<T> + Send + 'static,
    {
        let (conn, statements, clock) = (
            self.conn.clone(),
            self.statements.clone(),
            self.clock.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let mut conn = conn
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            job(&mut conn, &statements, &clock)
        })
        .await?
    }
}

#[async_trait]
impl Cycle for SqliteCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let ttl = self.ttl_us;
        let token = uuid::Uuid::new_v4().to_string();
        let (k, t) = (key.to_owned(), token.clone());
        match &*self.statements {
            Statements::Raw { .. } => {
                // As the backend does: each operation one BEGIN IMMEDIATE
                // transaction with one clock reading.
                let fence: Option<i64> = self
                    .blocking(move |conn, statements, clock| {
                        let Statements::Raw { acquire, .. } = statements else {
                            unreachable!("raw statements")
                        };
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let now = clock.now();
                        let fence = tx.prepare_cached(acquire)?.query_row(
                            named_params! {
                                ":key": k, ":token": t, ":owner": "distrlock-bench",
                                ":wall_now": now.wall, ":ttl": ttl, ":clock": clock.id(),
                                ":now": now.lease,
                            },
                            |row| row.get(0),
                        )?;
                        tx.commit()?;
                        Ok(fence)
                    })
                    .await?;
                if fence.is_none() {
                    bail!("raw acquire of {key} was refused");
                }
                let (k, t) = (key.to_owned(), token);
                let released = self
                    .blocking(move |conn, statements, clock| {
                        let Statements::Raw { release, .. } = statements else {
                            unreachable!("raw statements")
                        };
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let now = clock.now();
                        // The library's release returns a row (whether
                        // someone is in line), which `execute` refuses: step
                        // through it and count the changed rows.
                        let mut stmt = tx.prepare_cached(release)?;
                        let mut rows = stmt.query(named_params! {
                            ":key": k, ":token": t, ":clock": clock.id(), ":now": now.lease,
                        })?;
                        while rows.next()?.is_some() {}
                        drop(rows);
                        drop(stmt);
                        let n = tx.changes();
                        tx.commit()?;
                        Ok(n)
                    })
                    .await?;
                if released != 1 {
                    bail!("raw release of {key} found nothing");
                }
            }
            Statements::Go { .. } => {
                // The initialising insert and the acquire transaction, then the
                // release transaction: one blocking task per operation.
                let taken = self
                    .blocking(move |conn, statements, clock| {
                        let Statements::Go { init, acquire, .. } = statements else {
                            unreachable!("Go statements")
                        };
                        let now = clock.now();
                        conn.prepare_cached(init)?.execute(named_params! {
                            ":key": k, ":wall_now": now.wall, ":clock": clock.id(),
                        })?;
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let now = clock.now();
                        let n = tx.prepare_cached(acquire)?.execute(named_params! {
                            ":key": k, ":token": t, ":owner": "distrlock-bench",
                            ":wall_now": now.wall, ":ttl": ttl, ":clock": clock.id(),
                            ":now": now.lease,
                        })?;
                        tx.commit()?;
                        Ok(n)
                    })
                    .await?;
                if taken != 1 {
                    bail!("Go-sequence acquire of {key} was refused");
                }
                let (k, t) = (key.to_owned(), token);
                let released = self
                    .blocking(move |conn, statements, _| {
                        let Statements::Go { release, .. } = statements else {
                            unreachable!("Go statements")
                        };
                        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                        let n = tx
                            .prepare_cached(release)?
                            .execute(named_params! { ":key": k, ":token": t })?;
                        tx.commit()?;
                        Ok(n)
                    })
                    .await?;
                if released != 1 {
                    bail!("Go-sequence release of {key} found nothing");
                }
            }
        }
        Ok(())
    }
}
