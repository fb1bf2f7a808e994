//! [`PostgresPair`]: a private PostgreSQL primary with a streaming standby, for
//! tests that fail over.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::proxy::FaultProxy;
use crate::throwaway::{ServerError, ThrowawayServer};

type Result<T> = std::result::Result<T, ServerError>;

/// What the primary runs with, on top of [`ThrowawayServer::postgres`]'s
/// settings. `wal_keep_size` keeps the WAL a frozen standby still needs (there
/// is no replication slot, which would outlive a failed test).
const PRIMARY_CONF: &str = "\
wal_level = replica
max_wal_senders = 10
wal_keep_size = 256MB
wal_sender_timeout = 60s
";

/// The line of `pg_hba.conf` that lets the standby in. `initdb --auth=trust`
/// writes one like it already; this one is here so that the pair does not
/// depend on that default.
const PRIMARY_HBA: &str = "host replication all 127.0.0.1/32 trust";

/// What the standby runs with: it reports its position every second, and after
/// a broken replication connection it tries again soon.
const STANDBY_CONF: &str = "\
hot_standby = on
wal_receiver_status_interval = 1s
wal_retrieve_retry_interval = 500ms
wal_receiver_timeout = 60s
";

/// How long the pair waits for replication to reach a state.
const WAIT: Duration = Duration::from_secs(30);

/// A private PostgreSQL primary and a streaming, **asynchronous** standby of it,
/// both [`ThrowawayServer`]s from the installed binaries (the standby made with
/// `pg_basebackup -R`), each with a `test` database and passwordless access for
/// `postgres`.
///
/// The standby's replication connection goes through a [`FaultProxy`]
/// ([`replication_proxy`](Self::replication_proxy)), so a test can make the
/// standby lag and then lose what it lagged behind by:
///
/// ```no_run
/// use distrlock_testkit::PostgresPair;
///
/// let mut pair = PostgresPair::start()?;
/// pair.wait_caught_up()?;
/// pair.replication_proxy().freeze();
/// pair.primary().sql("CREATE TABLE lost (x int)")?; // committed on the primary only
/// pair.kill_primary();
/// pair.promote()?; // the standby is the primary now, without `lost`
/// assert_eq!(pair.standby().sql("SELECT to_regclass('lost') IS NULL")?, "t");
/// # Ok::<(), distrlock_testkit::ServerError>(())
/// ```
///
/// [`make_synchronous`](Self::make_synchronous) turns it into a synchronous pair
/// (`synchronous_standby_names` names the standby), where a commit returns only
/// once the standby has it.
///
/// The replication proxy runs on a runtime of the pair's own, so it relays
/// whatever the caller's runtime does. The calls block (they wait for the
/// servers), like [`ThrowawayServer`]'s; from async code, accept a short block
/// of one worker thread or use `tokio::task::spawn_blocking`. Dropping the pair
/// kills both servers and deletes their directories.
pub struct PostgresPair {
    // Dropped in this order: the proxy, then the servers.
    replication: FaultProxy,
    standby: ThrowawayServer,
    primary: ThrowawayServer,
    /// Runs the replication proxy; shut down in `drop`.
    runtime: Option<tokio::runtime::Runtime>,
}

impl PostgresPair {
    /// The `application_name` the standby replicates as: the name to put in
    /// the primary's `synchronous_standby_names`.
    pub const STANDBY_NAME: &'static str = "distrlock_standby";

    /// Starts the primary, the replication proxy and the standby, and waits
    /// until the standby streams from the primary.
    ///
    /// [`ServerError::MissingBinary`] when `initdb`, `postgres` or
    /// `pg_basebackup` is not installed.
    pub fn start() -> Result<Self> {
        let primary = ThrowawayServer::postgres_with_conf(PRIMARY_CONF)?;
        primary.prepend_hba(PRIMARY_HBA)?;
        primary.sql("SELECT pg_reload_conf()")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("distrlock-replication-proxy")
            .enable_all()
            .build()
            .map_err(|e| ServerError::Failed(format!("a runtime for the proxy: {e}")))?;
        let upstream: SocketAddr = ([127, 0, 0, 1], primary.port()).into();
        // Started on the pair's runtime, and handed over through a channel: the
        // caller may be inside a runtime of its own, where `block_on` panics.
        let (sent, received) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = sent.send(FaultProxy::start(upstream).await);
        });
        let replication = received
            .recv()
            .map_err(|e| ServerError::Failed(format!("starting the replication proxy: {e}")))?
            .map_err(|e| ServerError::Failed(format!("starting the replication proxy: {e}")))?;
        let standby = ThrowawayServer::postgres_standby(
            replication.port(),
            Self::STANDBY_NAME,
            STANDBY_CONF,
        )?;
        let pair = Self {
            replication,
            standby,
            primary,
            runtime: Some(runtime),
        };
        pair.wait_until("the standby streams from the primary", || {
            Ok(pair.primary.sql(&format!(
                "SELECT count(*) FROM pg_stat_replication \
                 WHERE application_name = '{}' AND state = 'streaming'",
                Self::STANDBY_NAME
            ))? == "1")
        })?;
        Ok(pair)
    }

    /// The primary. After [`promote`](Self::promote) it is the old primary
    /// (killed, unless the test started it again).
    pub fn primary(&self) -> &ThrowawayServer {
        &self.primary
    }

    /// The standby, which is the primary after [`promote`](Self::promote).
    pub fn standby(&self) -> &ThrowawayServer {
        &self.standby
    }

    /// The primary's `test` database: `postgres://postgres@127.0.0.1:PORT/test`.
    pub fn primary_url(&self) -> String {
        self.primary.url()
    }

    /// The standby's `test` database (read-only until promoted).
    pub fn standby_url(&self) -> String {
        self.standby.url()
    }

    /// The primary's address, for a client-side proxy.
    pub fn primary_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.primary.port()).into()
    }

    /// The standby's address, for a client-side proxy to move to after a
    /// failover ([`FaultProxy::set_upstream`]).
    pub fn standby_addr(&self) -> SocketAddr {
        ([127, 0, 0, 1], self.standby.port()).into()
    }

    /// The proxy the standby's replication connection goes through: freeze it
    /// to make the standby lag (commits on the primary then reach it only after
    /// the thaw, or never, if the primary dies first).
    pub fn replication_proxy(&self) -> &FaultProxy {
        &self.replication
    }

    /// Waits (up to 30 s) until the standby has replayed everything the
    /// primary had written when the call began: `pg_last_wal_replay_lsn()` on
    /// the standby reaches `pg_current_wal_lsn()` of the primary.
    pub fn wait_caught_up(&self) -> Result<()> {
        let target = self.primary.sql("SELECT pg_current_wal_lsn()")?;
        self.wait_until("the standby catches up", || {
            Ok(self.standby.sql(&format!(
                "SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
            ))? == "t")
        })
    }

    /// Sets the primary's `synchronous_standby_names` to `names` (a list as
    /// PostgreSQL takes it; `''` for none) and reloads its configuration. A
    /// name no standby has (`'ghost'`) makes every commit that waits for a
    /// synchronous standby wait for ever.
    pub fn set_synchronous_standby_names(&self, names: &str) -> Result<()> {
        let quoted = names.replace('\'', "''");
        self.primary.sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = '{quoted}'"
        ))?;
        self.primary.sql("SELECT pg_reload_conf()")?;
        Ok(())
    }

    /// Makes the pair synchronous: `synchronous_standby_names` names the
    /// standby ([`STANDBY_NAME`](Self::STANDBY_NAME)), and this waits until
    /// the primary reports it as `sync`. From then on a commit with
    /// `synchronous_commit` at `on` (or `remote_write`, `remote_apply`) returns
    /// only once the standby has it.
    pub fn make_synchronous(&self) -> Result<()> {
        self.set_synchronous_standby_names(Self::STANDBY_NAME)?;
        self.wait_until("the standby becomes synchronous", || {
            Ok(self.primary.sql(&format!(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = '{}'",
                Self::STANDBY_NAME
            ))? == "sync")
        })
    }

    /// Crashes the primary: SIGKILL for it and every process it started
    /// ([`ThrowawayServer::crash`]). What the standby had not received is lost.
    pub fn kill_primary(&mut self) {
        self.primary.crash();
    }

    /// Promotes the standby to primary (`pg_promote(wait => true)`, what
    /// `pg_ctl promote -w` does) and waits until it accepts writes, on a new
    /// timeline. First cuts the replication proxy, so that nothing a freeze
    /// still holds reaches the standby later.
    pub fn promote(&mut self) -> Result<()> {
        self.replication.cut();
        let promoted = self
            .standby
            .sql("SELECT pg_promote(wait => true, wait_seconds => 30)")?;
        if promoted != "t" {
            return Err(ServerError::Failed(format!(
                "pg_promote answered {promoted:?}; see {}",
                self.standby.dir().join("server.log").display()
            )));
        }
        self.wait_until("the promoted standby accepts writes", || {
            Ok(self.standby.sql("SELECT pg_is_in_recovery()")? == "f")
        })
    }

    /// The timeline the standby is on (1 before any promotion, 2 after).
    pub fn standby_timeline(&self) -> Result<u32> {
        // A promoted server's last checkpoint may still be on the old
        // timeline; the WAL it writes now names the new one.
        let timeline = self.standby.sql(
            "SELECT CASE WHEN pg_is_in_recovery() \
                 THEN (SELECT timeline_id FROM pg_control_checkpoint()) \
                 ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int \
             END",
        )?;
        timeline
            .parse()
            .map_err(|e| ServerError::Failed(format!("timeline {timeline:?}: {e}")))
    }

    fn wait_until(&self, what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            match done() {
                Ok(true) => return Ok(()),
                Ok(false) => last = None,
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(ServerError::Failed(format!(
            "{what} did not happen within {WAIT:?}{}; see {} and {}",
            last.map(|e| format!(" (last error: {e})"))
                .unwrap_or_default(),
            self.primary.dir().join("server.log").display(),
            self.standby.dir().join("server.log").display(),
        )))
    }
}

impl Drop for PostgresPair {
    fn drop(&mut self) {
        // Allowed inside the caller's runtime, where dropping a runtime is not.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl fmt::Debug for PostgresPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresPair")
            .field("primary", &self.primary)
            .field("standby", &self.standby)
            .field("replication_proxy", &self.replication.addr())
            .finish()
    }
}
