//! The connection policy of [`MySqlBackend`]: which host, which pooled
//! connection (verified after a broken one), the one retry, the timeouts and
//! the bound every write carries (see "No late effects", "Connections that
//! break" and "Several hosts" on the type).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use distrlock_core::{Error, Result};
use mysql_async::prelude::{Queryable, StatementLike};
use mysql_async::{Conn, Error as MyError, Pool, Row, Value};
use tokio::time::Instant;

use crate::backend::MySqlBackend;
use crate::error::{
    self, is_connection_error, is_deadlock, is_lock_wait_timeout, is_node_not_ready,
    is_unknown_statement,
};
use crate::parked::Pooled;
use crate::sql::{self, OkPacket, Stamp, WriteParams};

impl MySqlBackend {
    /// Moves from host `from` to host `to`, unless another call moved already.
    fn switch_host(&self, from: usize, to: usize, why: &dyn fmt::Display) {
        if from != to
            && self
                .inner
                .current
                .compare_exchange(from, to, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                table = %self.table(),
                from = from,
                to = to,
                "moving to another MySQL host: {why}"
            );
        }
    }

    /// A `not_after` for calls without one (inspect, list, create table): both
    /// attempts within their connect and call timeouts.
    pub(crate) fn read_deadline(&self) -> Instant {
        let config = &self.inner.config;
        Instant::now() + 2 * (config.connect_timeout + config.call_timeout())
    }

    /// Opens (or borrows) one connection within the connect timeout, to check
    /// that the server can be reached.
    pub(crate) async fn check_connection(&self) -> Result<()> {
        let deadline = Instant::now() + self.inner.config.connect_timeout;
        let (pooled, host) = self.checkout(false, deadline).await?;
        self.inner.parking[host].park(pooled);
        Ok(())
    }

    pub(crate) fn map(&self, error: MyError, what: &str) -> Error {
        error::map(error, &self.inner.config.table, what)
    }

    pub(crate) fn pinned_clock(&self, what: &str) -> Error {
        error::pinned_clock(what, self.inner.config.clock_tolerance())
    }

    /// The clock parameters of a write sent now that may take effect until
    /// `deadline` (`None`: whenever), within the offset window when `window`
    /// (see `sql`); `None` before any reading of the server's clock.
    fn stamp(&self, deadline: Option<Instant>, window: bool) -> Option<Stamp> {
        let clock = &self.inner.clock;
        let estimate = clock.bound_micros(Instant::now())?;
        let bound = match deadline {
            Some(deadline) => clock.bound_micros(deadline)?,
            None => i64::MAX,
        };
        Some(Stamp::new(estimate, bound, window))
    }

    /// Reads the server's clock on `conn` if the backend has no reading yet
    /// (once per backend: afterwards every write's answer carries one).
    async fn ensure_clock<Q: Queryable>(&self, conn: &mut Q) -> mysql_async::Result<()> {
        if self.inner.clock.is_known() {
            return Ok(());
        }
        let reading: Option<i64> = conn.query_first(sql::CLOCK).await?;
        if let Some(reading) = reading {
            self.inner.clock.observe(Instant::now(), reading);
        }
        Ok(())
    }

    /// Runs `call` on the caller's connection, without timeouts or a bound.
    pub(crate) async fn execute_in<Q: Queryable>(
        &self,
        conn: &mut Q,
        call: &Call<'_>,
    ) -> mysql_async::Result<Reply> {
        if matches!(call, Call::Write { .. }) {
            self.ensure_clock(conn).await?;
        }
        let window = matches!(call, Call::Write { window: true, .. });
        execute(conn, call, call.sql(), self.stamp(None, window)).await
    }

    /// Runs `call` on a pooled connection, retrying once after a broken
    /// connection or a deadlock (see the type's docs), each attempt ending by
    /// `not_after` (see "No late effects").
    pub(crate) async fn run(
        &self,
        what: &'static str,
        call: &Call<'_>,
        not_after: Instant,
    ) -> Result<Ran> {
        self.run_unmapped(what, call, not_after)
            .await
            .map_err(|failed| failed.into_error(self, what))
    }

    /// [`run`](Self::run), leaving the last failure unmapped for callers that
    /// read some server errors as an answer.
    pub(crate) async fn run_unmapped(
        &self,
        what: &'static str,
        call: &Call<'_>,
        not_after: Instant,
    ) -> Result<Ran, Failed> {
        match self.attempt(call, false, not_after).await {
            Ok(reply) => Ok(Ran {
                reply,
                retried_after: None,
            }),
            Err(Failed::Statement(e))
                if is_connection_error(&e)
                    || is_deadlock(&e)
                    || (self.inner.pools.len() > 1 && is_node_not_ready(&e)) =>
            {
                let first = self.map(e, what);
                tracing::debug!(table = %self.table(), %first, "{what} failed; retrying once on a verified connection");
                self.attempt(call, true, not_after).await.map(|reply| Ran {
                    reply,
                    retried_after: Some(first),
                })
            }
            Err(failed) => Err(failed),
        }
    }

    /// One attempt of `call`: a connection within the connect timeout, then the
    /// statement within the call timeout, both ending before `not_after`. A
    /// write carries the bound of the instant this attempt stops waiting, so it
    /// can never take effect after it.
    async fn attempt(
        &self,
        call: &Call<'_>,
        verify: bool,
        not_after: Instant,
    ) -> Result<Reply, Failed> {
        let config = &self.inner.config;
        // Answer a little before `not_after`, so that a caller who stops
        // waiting then still gets this answer rather than dropping the call.
        let stop = not_after.checked_sub(ANSWER_RESERVE).unwrap_or(not_after);
        let started = Instant::now();
        let (mut pooled, host) = self
            .checkout(verify, stop.min(started + config.connect_timeout))
            .await
            .map_err(Failed::Checkout)?;
        let deadline = stop.min(Instant::now() + config.call_timeout());
        let slot = self.inner.sql.kept(call.sql());
        let work = async {
            let stamp = if let Call::Write { window, .. } = call {
                self.ensure_clock(&mut pooled.conn).await?;
                self.stamp(Some(deadline), *window)
            } else {
                None
            };
            execute_kept(&mut pooled, slot, call, stamp, &self.inner.kept_refused).await
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(Ok(reply)) => {
                self.inner.parking[host].park(pooled);
                Ok(reply)
            }
            Ok(Err(e)) => {
                let mut conn = pooled.conn;
                let e = if is_lock_wait_timeout(&e) {
                    node_not_ready_instead(&mut conn, e, deadline).await
                } else {
                    e
                };
                // The driver already drops connections after I/O errors; a server
                // that reports the session gone needs the same.
                if is_connection_error(&e) {
                    discard(conn);
                }
                // A Galera node outside the primary component: with several
                // hosts, the next calls go to the next one.
                if self.inner.pools.len() > 1 && is_node_not_ready(&e) {
                    let next = (host + 1) % self.inner.pools.len();
                    self.switch_host(host, next, &e);
                }
                Err(Failed::Statement(e))
            }
            Err(_) => {
                // The answer may still come: this connection can never be reused.
                discard(pooled.conn);
                Err(Failed::TimedOut(started.elapsed()))
            }
        }
    }

    /// A connection by `deadline`, and the index of the host it is to: from
    /// the host in use, or, when that one fails with a transient error, from
    /// the next ones in turn, each given an equal share of the time left (see
    /// "Several hosts"). The first host that gives one becomes the host in use.
    async fn checkout(&self, verify: bool, deadline: Instant) -> Result<(Pooled, usize)> {
        let pools = &self.inner.pools;
        let first = self.current_host();
        let mut failed = None;
        for step in 0..pools.len() {
            let host = (first + step) % pools.len();
            let now = Instant::now();
            if step > 0 && now >= deadline {
                break;
            }
            let share = deadline.saturating_duration_since(now) / (pools.len() - step) as u32;
            match self.checkout_from(host, verify, now + share).await {
                Ok(conn) => {
                    if let Some(error) = &failed {
                        self.switch_host(first, host, error);
                    }
                    return Ok((conn, host));
                }
                Err(error) if pools.len() > 1 && error.is_transient() => {
                    tracing::debug!(table = %self.table(), host, %error, "MySQL host failed");
                    failed = Some(error);
                }
                Err(error) => return Err(error),
            }
        }
        Err(failed.expect("at least one host was tried"))
    }

    /// A connection to host `host` by `deadline`: the one parked last (see
    /// [`crate::parked`]), else one from the pool. With `verify`, every parked
    /// one goes back to the pool, and each from the pool must answer a ping
    /// first; dead ones (as after the server killed the pool's sessions) are
    /// discarded, at most the pool's size of them.
    async fn checkout_from(&self, host: usize, verify: bool, deadline: Instant) -> Result<Pooled> {
        let parking = &self.inner.parking[host];
        if verify {
            parking.clear();
        } else if let Some(pooled) = parking.take() {
            return Ok(pooled);
        }
        let pool: &Pool = &self.inner.pools[host];
        let started = Instant::now();
        let timed_out = || {
            Error::unavailable(
                format!(
                    "no connection to the MySQL server within {:?} (connect timeout {:?})",
                    started.elapsed(),
                    self.inner.config.connect_timeout
                ),
                None,
            )
        };
        let mut discarded = 0;
        loop {
            let mut conn = match tokio::time::timeout_at(deadline, pool.get_conn()).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => return Err(error::map_connect(e)),
                Err(_) => return Err(timed_out()),
            };
            if !verify {
                return Ok(Pooled::new(conn));
            }
            let pool_size = conn.opts().pool_opts().constraints().max();
            match tokio::time::timeout_at(deadline, conn.ping()).await {
                Ok(Ok(())) => return Ok(Pooled::new(conn)),
                Ok(Err(e)) if is_connection_error(&e) && discarded < pool_size => {
                    discard(conn);
                    discarded += 1;
                }
                Ok(Err(e)) => {
                    discard(conn);
                    return Err(error::map_connect(e));
                }
                Err(_) => {
                    discard(conn);
                    return Err(timed_out());
                }
            }
        }
    }
}

/// A lock-wait timeout (1205) as Galera's "not ready" (1047) when the node
/// that sent it is a Galera node (a provider is loaded) that is not ready
/// (`wsrep_ready = OFF`), read on the same connection before `deadline`;
/// otherwise `error` as it is.
///
/// A Galera node outside the primary component answers a prepared statement
/// whose causality wait (`wsrep_sync_wait`) cannot complete with 1205, the
/// code of a row-lock wait, which would make a try-acquire answer "busy" and
/// keep a client with several hosts on a node that cannot serve. The extra
/// round trip is spent only on a 1205, and `SHOW` is outside the causality
/// wait. A server without Galera reports `wsrep_ready = OFF` too, but no
/// provider.
async fn node_not_ready_instead(conn: &mut Conn, error: MyError, deadline: Instant) -> MyError {
    let status = tokio::time::timeout_at(
        deadline,
        conn.query::<(String, String), _>(
            "SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_ready', 'wsrep_provider_name')",
        ),
    )
    .await;
    let Ok(Ok(rows)) = status else {
        return error;
    };
    let value = |name: &str| {
        rows.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let galera = value("wsrep_provider_name").is_some_and(|v| !v.is_empty());
    match value("wsrep_ready") {
        Some(ready) if galera && ready.eq_ignore_ascii_case("OFF") => {
            MyError::Server(mysql_async::ServerError {
                code: error::code::WSREP_NOT_PREPARED,
                message: format!(
                    "WSREP has not yet prepared node for application use (wsrep_ready = OFF; \
                     the statement answered: {error})"
                ),
                state: "08S01".into(),
            })
        }
        _ => error,
    }
}

/// How long before a call's `not_after` the backend stops waiting, so that its
/// answer (with whatever results arrived) reaches a caller who stops waiting at
/// `not_after`.
pub(crate) const ANSWER_RESERVE: Duration = Duration::from_millis(2);

/// One statement and its parameters, kept so that it can run again.
pub(crate) enum Call<'a> {
    /// An `INSERT`/`UPDATE` whose OK packet is the answer; `window`: its stamp's
    /// bound stays within the offset window of its reference (the acquire).
    Write {
        sql: &'a str,
        params: WriteParams,
        window: bool,
    },
    /// A `SELECT`.
    Read { sql: &'a str, params: Vec<Value> },
    /// DDL, sent as text (it is run once, so preparing it would only cost).
    Ddl { sql: &'a str },
}

pub(crate) enum Reply {
    /// The OK packet of a write run with `stamp`, whose answer arrived at
    /// `arrived`.
    Written {
        packet: OkPacket,
        stamp: Stamp,
        arrived: Instant,
    },
    Rows(Vec<Row>),
    Done,
}

pub(crate) struct Ran {
    pub(crate) reply: Reply,
    /// The error of a first attempt that was retried.
    pub(crate) retried_after: Option<Error>,
}

pub(crate) enum Failed {
    Checkout(Error),
    Statement(MyError),
    TimedOut(Duration),
}

impl Failed {
    pub(crate) fn into_error(self, backend: &MySqlBackend, what: &str) -> Error {
        match self {
            Failed::Checkout(error) => error,
            Failed::Statement(error) => backend.map(error, what),
            Failed::TimedOut(after) => Error::unavailable(
                format!("{what}: no answer from the MySQL server within {after:?}"),
                None,
            ),
        }
    }
}

/// Runs one call on `pooled`: a statement the connection keeps at `slot` by
/// its id, preparing and keeping it first if need be (see [`crate::parked`]);
/// any other by its text.
async fn execute_kept(
    pooled: &mut Pooled,
    slot: Option<usize>,
    call: &Call<'_>,
    stamp: Option<Stamp>,
    refused: &AtomicU64,
) -> mysql_async::Result<Reply> {
    let Some(slot) = slot else {
        // Preparing this text may push kept statements out of the driver's
        // cache, which closes them.
        pooled.forget();
        return execute(&mut pooled.conn, call, call.sql(), stamp).await;
    };
    if let Some(statement) = pooled.kept(slot) {
        match execute(&mut pooled.conn, call, statement.clone(), stamp).await {
            // The server does not know it: nothing ran. Forget every kept
            // statement, drop this one from the driver's cache too (which
            // would hand it out again), and prepare it again below.
            Err(e) if is_unknown_statement(&e) => {
                refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "the server refused a kept statement as unknown ({e}); preparing it again"
                );
                pooled.forget();
                pooled.conn.close(statement).await?;
            }
            answer => return answer,
        }
    }
    let statement = pooled.conn.prep(call.sql()).await?;
    pooled.keep(slot, statement.clone());
    execute(&mut pooled.conn, call, statement, stamp).await
}

/// Runs one call as `statement` (its text, or a statement prepared on `conn`):
/// prepared (cached per connection by the driver) for reads and writes, so
/// each is one round trip once the connection has prepared it. A write needs
/// its `stamp`.
async fn execute<Q: Queryable, S: StatementLike>(
    conn: &mut Q,
    call: &Call<'_>,
    statement: S,
    stamp: Option<Stamp>,
) -> mysql_async::Result<Reply> {
    match call {
        Call::Write { params, .. } => {
            let stamp = stamp.ok_or_else(|| {
                MyError::Other("no reading of the server's clock to bound the statement".into())
            })?;
            let result = conn.exec_iter(statement, params.values(stamp)).await?;
            let arrived = Instant::now();
            let packet = OkPacket::from_driver(result.affected_rows(), result.last_insert_id());
            result.drop_result().await?;
            Ok(Reply::Written {
                packet,
                stamp,
                arrived,
            })
        }
        Call::Read { params, .. } => {
            let rows = conn.exec(statement, params.clone()).await?;
            Ok(Reply::Rows(rows))
        }
        Call::Ddl { sql } => {
            conn.query_drop(*sql).await?;
            Ok(Reply::Done)
        }
    }
}

/// Closes a connection that must not go back to the pool, in the background.
fn discard(conn: Conn) {
    tokio::spawn(async move {
        // `disconnect` marks the connection dead before writing, so even if this
        // times out the pool drops it instead of reusing it.
        let _ = tokio::time::timeout(Duration::from_millis(500), conn.disconnect()).await;
    });
}

impl Call<'_> {
    /// The statement's text.
    pub(crate) fn sql(&self) -> &str {
        match self {
            Call::Write { sql, .. } | Call::Read { sql, .. } | Call::Ddl { sql } => sql,
        }
    }
}

impl Reply {
    /// The OK packet of a write. `execute` answers every write call with one;
    /// anything else is reported as an error rather than trusted.
    pub(crate) fn written(self, what: &str) -> Result<(u64, i64, Stamp, Instant)> {
        match self {
            Reply::Written {
                packet,
                stamp,
                arrived,
            } => Ok((packet.affected, packet.id, stamp, arrived)),
            _ => Err(mismatched(what)),
        }
    }

    /// The rows of a read.
    pub(crate) fn rows(self, what: &str) -> Result<Vec<Row>> {
        match self {
            Reply::Rows(rows) => Ok(rows),
            _ => Err(mismatched(what)),
        }
    }
}

fn mismatched(what: &str) -> Error {
    Error::backend(
        format!("{what}: the statement answered in an unexpected form"),
        false,
    )
}
