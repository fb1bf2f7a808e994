//! PostgreSQL: the library backend, the raw-driver baseline (the backend's own
//! SQL from [`LockSql`]), the Go original's sequence and advisory locks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use async_trait::async_trait;
use distrlock_core::{LockBackend, TableName, Ttl};
use distrlock_postgres::{LockSql, PostgresBackend, PostgresConfig};
use tokio_postgres::types::Type;
use tokio_postgres::{Client, NoTls, Statement};
use uuid::Uuid;

use crate::env::{Connect, Env, Variant, key_hash};
use crate::go;
use crate::proxy::Wire;
use crate::workload::{Cycle, Waiter};

/// The database the benchmark creates and uses, so that the server's
/// per-database counters count only its statements.
pub(crate) const BENCH_DB: &str = "distrlock_bench";

pub(crate) struct Postgres {
    /// Connection settings for the bench database.
    bench: tokio_postgres::Config,
    /// A connection to the database named in the URL, for administration and
    /// for reading the bench database's counters without adding to them.
    admin: Client,
    upstream: SocketAddr,
    ttl_us: i64,
}

async fn connect(config: &tokio_postgres::Config) -> anyhow::Result<Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Postgres {
    pub(crate) async fn connect(url: &str, ttl: Ttl) -> anyhow::Result<Self> {
        let config: tokio_postgres::Config = url.parse().context("bad PostgreSQL URL")?;
        let admin = connect(&config)
            .await
            .with_context(|| "cannot connect to PostgreSQL (set --postgres-url)")?;
        let exists = admin
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&BENCH_DB])
            .await?
            .is_some();
        if !exists {
            admin
                .batch_execute(&format!("CREATE DATABASE {BENCH_DB}"))
                .await?;
        }
        let mut bench = config.clone();
        bench.dbname(BENCH_DB);
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => bail!("the benchmark needs PostgreSQL over TCP"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let upstream = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .ok_or_else(|| anyhow!("cannot resolve {host}"))?;
        Ok(Self {
            bench,
            admin,
            upstream,
            ttl_us: ttl.as_micros(),
        })
    }

    fn config(&self, via: Option<SocketAddr>) -> tokio_postgres::Config {
        let Some(via) = via else {
            return self.bench.clone();
        };
        // `host` and `port` add to the lists: build a config with only the proxy.
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(via.port()).dbname(BENCH_DB);
        if let Some(user) = self.bench.get_user() {
            config.user(user);
        }
        if let Some(password) = self.bench.get_password() {
            config.password(password);
        }
        config
    }

    async fn bench_client(&self) -> anyhow::Result<Client> {
        connect(&self.bench).await
    }
}

#[async_trait]
impl Env for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn native_name(&self) -> Option<&'static str> {
        Some("advisory lock")
    }

    fn upstream(&self) -> Option<(SocketAddr, Wire)> {
        Some((self.upstream, Wire::Postgres))
    }

    async fn describe(&self) -> anyhow::Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let version: String = self.admin.query_one("SELECT version()", &[]).await?.get(0);
        out.insert("version".into(), version);
        for setting in [
            "synchronous_commit",
            "fsync",
            "wal_sync_method",
            "full_page_writes",
            "shared_buffers",
            "shared_preload_libraries",
        ] {
            let value: String = self
                .admin
                .query_one(&format!("SHOW {setting}"), &[])
                .await?
                .get(0);
            out.insert(setting.into(), value);
        }
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
        let t = TableName::new(table)?.quoted('"');
        self.bench_client()
            .await?
            .batch_execute(&format!("DROP TABLE IF EXISTS {t}"))
            .await?;
        Ok(())
    }

    async fn fill(&self, table: &str, rows: u64) -> anyhow::Result<()> {
        let t = TableName::new(table)?.quoted('"');
        let client = self.bench_client().await?;
        let have: i64 = client
            .query_one(&format!("SELECT count(*) FROM {t}"), &[])
            .await?
            .get(0);
        let rows = i64::try_from(rows)?;
        if have < rows {
            client
                .execute(
                    &format!(
                        "INSERT INTO {t} (lock_key, token, fence, owner, acquired_at, expires_at) \
                         SELECT 'fill/' || g, gen_random_uuid(), 1, 'fill', clock_timestamp(), NULL \
                         FROM generate_series($1::int8, $2::int8) AS g ON CONFLICT DO NOTHING"
                    ),
                    &[&(have + 1), &rows],
                )
                .await?;
        }
        client.batch_execute(&format!("VACUUM ANALYZE {t}")).await?;
        Ok(())
    }

    async fn backend(&self, table: &str, connect: Connect) -> anyhow::Result<Arc<dyn LockBackend>> {
        let config = PostgresConfig::builder()
            .pg_config(self.config(connect.via))
            .table(table)
            .pool_size(connect.pool_size)
            .listen(connect.listen)
            .application_name("distrlock-bench")
            .build()?;
        Ok(Arc::new(PostgresBackend::from_config(config).await?))
    }

    async fn cycles(
        &self,
        variant: Variant,
        table: &str,
        n: usize,
    ) -> anyhow::Result<Vec<Box<dyn Cycle>>> {
        let table = TableName::new(table)?;
        let sql = LockSql::for_table(&table);
        let t = table.quoted('"');
        let mut out: Vec<Box<dyn Cycle>> = Vec::with_capacity(n);
        for _ in 0..n {
            let client = self.bench_client().await?;
            out.push(match variant {
                Variant::Raw => Box::new(RawCycle {
                    acquire: client
                        .prepare_typed(
                            &sql.acquire,
                            &[
                                Type::TEXT,
                                Type::UUID,
                                Type::INT8,
                                Type::TEXT,
                                Type::INT8,
                                Type::INT8,
                                Type::INT8,
                            ],
                        )
                        .await?,
                    release: client
                        .prepare_typed(
                            &sql.release,
                            &[Type::TEXT, Type::UUID, Type::TEXT, Type::INT8],
                        )
                        .await?,
                    channel: sql.channel.clone(),
                    ttl_us: self.ttl_us,
                    client,
                }),
                Variant::Go => Box::new(GoCycle {
                    init: client.prepare(&go::postgres_init(&t)).await?,
                    acquire: client.prepare(&go::postgres_acquire(&t)).await?,
                    release: client.prepare(&go::postgres_release(&t)).await?,
                    ttl_us: self.ttl_us,
                    client,
                }),
                Variant::Native => Box::new(AdvisoryCycle {
                    lock: client
                        .prepare("SELECT pg_try_advisory_lock($1::int8)")
                        .await?,
                    unlock: client
                        .prepare("SELECT pg_advisory_unlock($1::int8)")
                        .await?,
                    client,
                }),
                Variant::Library => bail!("the library cycle is built from a backend"),
            });
        }
        Ok(out)
    }

    async fn native_waiters(&self, key: &str, n: usize) -> anyhow::Result<Vec<Box<dyn Waiter>>> {
        let mut out: Vec<Box<dyn Waiter>> = Vec::with_capacity(n);
        for _ in 0..n {
            let client = self.bench_client().await?;
            out.push(Box::new(AdvisoryWaiter {
                lock: client.prepare("SELECT pg_advisory_lock($1::int8)").await?,
                unlock: client
                    .prepare("SELECT pg_advisory_unlock($1::int8)")
                    .await?,
                key: key_hash(key),
                client,
            }));
        }
        Ok(out)
    }

    async fn server_counters(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        let row = self
            .admin
            .query_one(
                "SELECT xact_commit, xact_rollback, tup_inserted, tup_updated \
                 FROM pg_stat_database WHERE datname = $1",
                &[&BENCH_DB],
            )
            .await?;
        let mut out = BTreeMap::new();
        for (i, name) in [
            "xact_commit",
            "xact_rollback",
            "tup_inserted",
            "tup_updated",
        ]
        .iter()
        .enumerate()
        {
            let v: i64 = row.get(i);
            out.insert((*name).to_owned(), u64::try_from(v).unwrap_or(0));
        }
        Ok(out)
    }

    async fn free_connections(&self) -> anyhow::Result<Option<usize>> {
        let client = self.bench_client().await?;
        // Less the connections reserved for superusers.
        let row = client
            .query_one(
                "SELECT current_setting('max_connections')::int8 \
                     - current_setting('superuser_reserved_connections')::int8 \
                     - (SELECT count(*) FROM pg_stat_activity)",
                &[],
            )
            .await?;
        Ok(Some(usize::try_from(row.get::<_, i64>(0)).unwrap_or(0)))
    }
}

/// The backend's acquire and release statements, prepared on one connection.
struct RawCycle {
    client: Client,
    acquire: Statement,
    release: Statement,
    channel: String,
    ttl_us: i64,
}

#[async_trait]
impl Cycle for RawCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let token = Uuid::new_v4();
        let row = self
            .client
            .query_one(
                &self.acquire,
                // No not-after bound: the same statement, the same work.
                &[
                    &key,
                    &token,
                    &self.ttl_us,
                    &"distrlock-bench",
                    // A plain try, with no ticket.
                    &0i64,
                    &None::<i64>,
                    &i64::MAX,
                ],
            )
            .await?;
        let fence: Option<i64> = row.get(0);
        if fence.is_none() {
            bail!("raw acquire of {key} was refused");
        }
        let rows = self
            .client
            .query(&self.release, &[&key, &token, &self.channel, &i64::MAX])
            .await?;
        let released = rows.first().and_then(|row| row.get::<_, Option<bool>>(0));
        if released != Some(true) {
            bail!("raw release of {key} found nothing to release");
        }
        Ok(())
    }
}

/// The Go original: initialising insert, then acquire and release each in a
/// transaction of its own: 7 round trips.
struct GoCycle {
    client: Client,
    init: Statement,
    acquire: Statement,
    release: Statement,
    ttl_us: i64,
}

#[async_trait]
impl Cycle for GoCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let token = Uuid::new_v4();
        self.client.execute(&self.init, &[&key]).await?;
        self.client.batch_execute("BEGIN").await?;
        let taken = self
            .client
            .execute(
                &self.acquire,
                &[&key, &token, &"distrlock-bench", &self.ttl_us],
            )
            .await?;
        self.client.batch_execute("COMMIT").await?;
        if taken != 1 {
            bail!("Go-sequence acquire of {key} was refused");
        }
        self.client.batch_execute("BEGIN").await?;
        let released = self.client.execute(&self.release, &[&key, &token]).await?;
        self.client.batch_execute("COMMIT").await?;
        if released != 1 {
            bail!("Go-sequence release of {key} found nothing");
        }
        Ok(())
    }
}

struct AdvisoryCycle {
    client: Client,
    lock: Statement,
    unlock: Statement,
}

#[async_trait]
impl Cycle for AdvisoryCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let id = key_hash(key);
        if !self
            .client
            .query_one(&self.lock, &[&id])
            .await?
            .get::<_, bool>(0)
        {
            bail!("advisory lock {key} was refused");
        }
        if !self
            .client
            .query_one(&self.unlock, &[&id])
            .await?
            .get::<_, bool>(0)
        {
            bail!("advisory unlock {key} found nothing");
        }
        Ok(())
    }
}

struct AdvisoryWaiter {
    client: Client,
    lock: Statement,
    unlock: Statement,
    key: i64,
}

#[async_trait]
impl Waiter for AdvisoryWaiter {
    async fn lock(&mut self) -> anyhow::Result<()> {
        self.client.query_one(&self.lock, &[&self.key]).await?;
        Ok(())
    }

    async fn unlock(&mut self) -> anyhow::Result<()> {
        self.client.query_one(&self.unlock, &[&self.key]).await?;
        Ok(())
    }
}

/// Waits for a fresh server statistics snapshot: backends report their counts
/// when they go idle or exit, at most once a second.
pub(crate) async fn settle_stats() {
    tokio::time::sleep(Duration::from_millis(1_100)).await;
}
