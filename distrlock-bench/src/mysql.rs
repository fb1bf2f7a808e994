//! MariaDB (or MySQL): the library backend, the raw-driver baseline (the
//! backend's own SQL from [`LockSql`]), the Go original's sequence and
//! `GET_LOCK` / `RELEASE_LOCK`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use distrlock_core::server_clock::ServerClock;
use distrlock_core::{LockBackend, TableName, Ttl};
use distrlock_mysql::{LockSql, MySqlBackend, MySqlConfig};
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Statement, Value};
use tokio::time::Instant;
use uuid::Uuid;

use crate::env::{Connect, Env, Variant};
use crate::go;
use crate::proxy::Wire;
use crate::workload::{Cycle, Waiter};

/// The database the benchmark creates and uses.
const BENCH_DB: &str = "distrlock_bench";

pub(crate) struct MariaDb {
    /// Connection options for the bench database.
    bench: Opts,
    upstream: SocketAddr,
    ttl_us: i64,
}

impl MariaDb {
    pub(crate) async fn connect(url: &str, ttl: Ttl) -> anyhow::Result<Self> {
        let opts = Opts::from_url(url).context("bad MySQL URL")?;
        let mut admin = Conn::new(opts.clone())
            .await
            .context("cannot connect to MariaDB (set --mysql-url)")?;
        admin
            .query_drop(format!("CREATE DATABASE IF NOT EXISTS {BENCH_DB}"))
            .await?;
        admin.disconnect().await?;
        let host = opts.ip_or_hostname().to_owned();
        let upstream = tokio::net::lookup_host((host.as_str(), opts.tcp_port()))
            .await?
            .next()
            .ok_or_else(|| anyhow!("cannot resolve {host}"))?;
        let bench = OptsBuilder::from_opts(opts).db_name(Some(BENCH_DB)).into();
        Ok(Self {
            bench,
            upstream,
            ttl_us: ttl.as_micros(),
        })
    }

    fn opts(&self, via: Option<SocketAddr>) -> Opts {
        match via {
            None => self.bench.clone(),
            Some(via) => OptsBuilder::from_opts(self.bench.clone())
                .ip_or_hostname("127.0.0.1")
                .tcp_port(via.port())
                .prefer_socket(false)
                .into(),
        }
    }

    async fn conn(&self) -> anyhow::Result<Conn> {
        let opts = OptsBuilder::from_opts(self.bench.clone()).prefer_socket(false);
        Ok(Conn::new(opts).await?)
    }
}

fn token_bytes() -> Vec<u8> {
    Uuid::new_v4().as_bytes().to_vec()
}

#[async_trait]
impl Env for MariaDb {
    fn name(&self) -> &'static str {
        "mariadb"
    }

    fn native_name(&self) -> Option<&'static str> {
        Some("GET_LOCK")
    }

    fn upstream(&self) -> Option<(SocketAddr, Wire)> {
        Some((self.upstream, Wire::MySql))
    }

    async fn describe(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut conn = self.conn().await?;
        let mut out = BTreeMap::new();
        let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
        out.insert("version".into(), version.unwrap_or_default());
        for variable in [
            "innodb_flush_log_at_trx_commit",
            "sync_binlog",
            "log_bin",
            "innodb_flush_method",
            "innodb_doublewrite",
            "innodb_buffer_pool_size",
        ] {
            let row: Option<(String, String)> = conn
                .query_first(format!("SHOW GLOBAL VARIABLES LIKE '{variable}'"))
                .await?;
            if let Some((_, value)) = row {
                out.insert(variable.into(), value);
            }
        }
        conn.disconnect().await?;
        Ok(out)
    }

    async fn reset_table(&self, table: &str) -> anyhow::Result<()> {
        self.drop_table(table).await?;
        let backend = self
            .backend(
                table,
                Connect {
                    pool_size: 1,
                    listen: false,
                    via: None,
                },
            )
            .await?;
        backend.create_table().await?;
        Ok(())
    }

    async fn drop_table(&self, table: &str) -> anyhow::Result<()> {
        let t = TableName::new(table)?.quoted('`');
        let mut conn = self.conn().await?;
        conn.query_drop(format!("DROP TABLE IF EXISTS {t}")).await?;
        conn.disconnect().await?;
        Ok(())
    }

    async fn fill(&self, table: &str, rows: u64) -> anyhow::Result<()> {
        let t = TableName::new(table)?.quoted('`');
        let mut conn = self.conn().await?;
        let have: Option<u64> = conn
            .query_first(format!("SELECT COUNT(*) FROM {t}"))
            .await?;
        let have = have.unwrap_or(0);
        if have < rows {
            // MariaDB's SEQUENCE engine: seq_FROM_to_TO is a table of integers.
            conn.query_drop(format!(
                "INSERT IGNORE INTO {t} (lock_key, token, fence, owner, acquired_at, expires_at) \
                 SELECT CONCAT('fill/', seq), UNHEX(MD5(seq)), 1, 'fill', UTC_TIMESTAMP(6), NULL \
                 FROM seq_{}_to_{rows}",
                have + 1
            ))
            .await?;
        }
        conn.query_drop(format!("ANALYZE TABLE {t}")).await?;
        conn.disconnect().await?;
        Ok(())
    }

    async fn backend(&self, table: &str, connect: Connect) -> anyhow::Result<Arc<dyn LockBackend>> {
        // The backend's own pool settings: since the benchmark found that
        // mysql_async closed every returned connection beyond `min_connections`,
        // the backend keeps idle connections for 60 s, so a pool of `max` stays open.
        let config = MySqlConfig::builder()
            .opts(self.opts(connect.via))
            .table(table)
            .pool_size(connect.pool_size.max(1))
            .build()?;
        let backend = MySqlBackend::from_config(config).await?;
        Ok(Arc::new(backend))
    }

    async fn cycles(
        &self,
        variant: Variant,
        table: &str,
        n: usize,
    ) -> anyhow::Result<Vec<Box<dyn Cycle>>> {
        let name = TableName::new(table)?;
        let sql = LockSql::for_table(&name);
        let t = name.quoted('`');
        let mut out: Vec<Box<dyn Cycle>> = Vec::with_capacity(n);
        for _ in 0..n {
            let mut conn = self.conn().await?;
            out.push(match variant {
                Variant::Raw => {
                    // The statements take an estimate of the server's clock
                    // (their bound and the origin of the acquire's reported
                    // offset): one reading now, and each release's after.
                    let reading: Option<i64> = conn.query_first(sql.clock.as_str()).await?;
                    let clock = ServerClock::new();
                    clock.observe(Instant::now(), reading.context("no clock reading")?);
                    Box::new(RawCycle {
                        acquire: conn.prep(&sql.acquire).await?,
                        release: conn.prep(&sql.release).await?,
                        ttl_us: self.ttl_us,
                        clock,
                        conn,
                    })
                }
                Variant::Go => Box::new(GoCycle {
                    init: conn.prep(go::mysql_init(&t)).await?,
                    acquire: conn.prep(go::mysql_acquire(&t)).await?,
                    release: conn.prep(go::mysql_release(&t)).await?,
                    ttl_us: self.ttl_us,
                    conn,
                }),
                Variant::Native => Box::new(GetLockCycle {
                    lock: conn.prep("SELECT GET_LOCK(?, 0)").await?,
                    unlock: conn.prep("SELECT RELEASE_LOCK(?)").await?,
                    conn,
                }),
                Variant::Library => bail!("the library cycle is built from a backend"),
            });
        }
        Ok(out)
    }

    async fn native_waiters(&self, key: &str, n: usize) -> anyhow::Result<Vec<Box<dyn Waiter>>> {
        let mut out: Vec<Box<dyn Waiter>> = Vec::with_capacity(n);
        for _ in 0..n {
            let mut conn = self.conn().await?;
            out.push(Box::new(GetLockWaiter {
                lock: conn.prep("SELECT GET_LOCK(?, 60)").await?,
                unlock: conn.prep("SELECT RELEASE_LOCK(?)").await?,
                key: format!("distrlock-bench/{key}"),
                conn,
            }));
        }
        Ok(out)
    }

    async fn server_counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut conn = self.conn().await?;
        let rows: Vec<(String, String)> = conn
            .query(
                "SHOW GLOBAL STATUS WHERE Variable_name IN \
                 ('Questions', 'Com_stmt_execute', 'Com_update', 'Com_insert', 'Com_select', \
                  'Com_commit', 'Com_begin', 'Handler_commit')",
            )
            .await?;
        conn.disconnect().await?;
        Ok(rows
            .into_iter()
            .filter_map(|(name, value)| Some((name, value.parse().ok()?)))
            .collect())
    }
}

/// The backend's acquire and release statements, prepared on one connection;
/// each reports through the OK packet's insert id.
struct RawCycle {
    conn: Conn,
    acquire: Statement,
    release: Statement,
    ttl_us: i64,
    clock: ServerClock,
}

async fn insert_id(conn: &mut Conn, stmt: &Statement, params: Vec<Value>) -> anyhow::Result<i64> {
    let result = conn.exec_iter(stmt, params).await?;
    let id = result.last_insert_id().unwrap_or(0) as i64;
    result.drop_result().await?;
    Ok(id)
}

#[async_trait]
impl Cycle for RawCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let (k, t) = (key.as_bytes(), token_bytes());
        let now = self
            .clock
            .bound_micros(Instant::now())
            .context("no clock reading")?;
        let params = LockSql::acquire_params(k, &t, "distrlock-bench", self.ttl_us, now);
        if insert_id(&mut self.conn, &self.acquire, params).await? < 1 {
            bail!("raw acquire of {key} was refused");
        }
        let params = LockSql::release_params(k, &t, now);
        let released = insert_id(&mut self.conn, &self.release, params).await?;
        if released < 1 {
            bail!("raw release of {key} found nothing");
        }
        // A release's insert id is its reading of the server's clock.
        self.clock.observe(Instant::now(), released);
        Ok(())
    }
}

struct GoCycle {
    conn: Conn,
    init: Statement,
    acquire: Statement,
    release: Statement,
    ttl_us: i64,
}

#[async_trait]
impl Cycle for GoCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let (k, t) = (Value::from(key.as_bytes()), Value::from(token_bytes()));
        self.conn.exec_drop(&self.init, vec![k.clone()]).await?;
        self.conn.query_drop("BEGIN").await?;
        self.conn
            .exec_drop(
                &self.acquire,
                vec![
                    t.clone(),
                    Value::from("distrlock-bench"),
                    Value::from(self.ttl_us),
                    k.clone(),
                ],
            )
            .await?;
        let taken = self.conn.affected_rows();
        self.conn.query_drop("COMMIT").await?;
        if taken != 1 {
            bail!("Go-sequence acquire of {key} was refused");
        }
        self.conn.query_drop("BEGIN").await?;
        self.conn.exec_drop(&self.release, vec![k, t]).await?;
        let released = self.conn.affected_rows();
        self.conn.query_drop("COMMIT").await?;
        if released != 1 {
            bail!("Go-sequence release of {key} found nothing");
        }
        Ok(())
    }
}

struct GetLockCycle {
    conn: Conn,
    lock: Statement,
    unlock: Statement,
}

#[async_trait]
impl Cycle for GetLockCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let name = format!("distrlock-bench/{key}");
        let got: Option<i64> = self.conn.exec_first(&self.lock, (name.as_str(),)).await?;
        if got != Some(1) {
            bail!("GET_LOCK({name}) was refused");
        }
        let released: Option<i64> = self.conn.exec_first(&self.unlock, (name.as_str(),)).await?;
        if released != Some(1) {
            bail!("RELEASE_LOCK({name}) found nothing");
        }
        Ok(())
    }
}

struct GetLockWaiter {
    conn: Conn,
    lock: Statement,
    unlock: Statement,
    key: String,
}

#[async_trait]
impl Waiter for GetLockWaiter {
    async fn lock(&mut self) -> anyhow::Result<()> {
        let got: Option<i64> = self
            .conn
            .exec_first(&self.lock, (self.key.as_str(),))
            .await?;
        if got != Some(1) {
            bail!("GET_LOCK({}) timed out", self.key);
        }
        Ok(())
    }

    async fn unlock(&mut self) -> anyhow::Result<()> {
        let _: Option<i64> = self
            .conn
            .exec_first(&self.unlock, (self.key.as_str(),))
            .await?;
        Ok(())
    }
}
