//! How each call reaches the server: a pooled connection (or the caller's
//! own client), the not-after bound, one retry on a lost session, the
//! transaction-pooler form, the failover marker's timeline record, and the
//! answer with its clock reading.

use deadpool_postgres::Object;
use distrlock_core::server_clock::from_unix_micros;
use distrlock_core::{Error, LockKey, Result, Token};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row};

use crate::backend::{Inner, PostgresBackend};
use crate::config::clock_reading;
use crate::error::{from_pg, from_pool, is_session_lost, is_statement_gone};
use crate::lock_backend::InFlight;
use crate::sql::{CLOCK_READING, COMMIT, RECORD_TIMELINE_TYPES, answer};

impl PostgresBackend {
    pub(crate) fn error(&self, error: tokio_postgres::Error) -> Error {
        from_pg(error, &self.inner.table)
    }

    /// Runs one statement on a pooled connection, once more on another
    /// connection if the session died under it (see the type's docs for why that
    /// is safe for every statement here), all within the call timeout.
    ///
    /// On a direct connection (or behind a session pooler) the statement is
    /// prepared once per connection and runs under the session's settings;
    /// behind a transaction pooler it runs unnamed in a transaction of its own
    /// (see [`in_own_transaction`]).
    ///
    /// With `not_after`, the statement is one of the lock statements: its bound on
    /// the server's clock is appended to `params` (see [`bound_for`](Self::bound_for)),
    /// and its answer carries the server's clock reading, which is observed. One
    /// that ran too late is [`Failure::Late`], unless only our estimate of the
    /// server's clock was wrong: then it runs once more (see [`Answer::rerun`]).
    ///
    /// `sql` is one of the backend's [`Statements`](crate::sql::Statements)
    /// (`&self.inner.sql.…`): its prepared form is found by its address (see
    /// [`Prepared`](crate::prepared::Prepared)).
    pub(crate) async fn run(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
        not_after: Option<Instant>,
    ) -> std::result::Result<Answer, Failure> {
        self.run_marked(sql, types, params, not_after, None).await
    }

    /// [`run`](Self::run), for an acquire of `acquire_of` (key, token): if the
    /// call is dropped or times out with its statement still in the server,
    /// a release of that token waits for the statement's end (see
    /// [`DiscardUnlessDone`]).
    pub(crate) async fn run_marked(
        &self,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
        not_after: Option<Instant>,
        acquire_of: Option<(&LockKey, &Token)>,
    ) -> std::result::Result<Answer, Failure> {
        if let Some(not_after) = not_after {
            check_not_passed(not_after)?;
        }
        let call = async {
            let mut retried = false;
            let mut reran = false;
            let mut recorded = false;
            let mut reprepared = false;
            loop {
                let conn = self
                    .inner
                    .pool
                    .get()
                    .await
                    .map_err(|e| Failure::Mapped(from_pool(e, &self.inner.table)))?;
                let conn = DiscardUnlessDone(
                    Some(conn),
                    acquire_of.map(|(key, token)| (&self.inner, key, token)),
                );
                let client: &tokio_postgres::Client = conn.get();
                let result = async {
                    let bound = match not_after {
                        Some(not_after) => Some(self.bound_for(client, not_after).await?),
                        None => None,
                    };
                    let rows = match &self.inner.begin {
                        None => {
                            let statement = self
                                .inner
                                .prepared
                                .get(conn.get(), sql, types)
                                .await
                                .map_err(Failure::Pg)?;
                            if let Some(not_after) = not_after {
                                check_not_passed(not_after)?;
                            }
                            let mut all = params.to_vec();
                            all.extend(bound.as_ref().map(|b| b as &(dyn ToSql + Sync)));
                            client.query(&statement, &all).await.map_err(Failure::Pg)?
                        }
                        Some(begin) => {
                            if let Some(not_after) = not_after {
                                check_not_passed(not_after)?;
                            }
                            let typed = with_types(params, types, bound.as_ref());
                            in_own_transaction(client, begin, sql, &typed)
                                .await
                                .map_err(Failure::Pg)?
                        }
                    };
                    Ok((rows, bound))
                }
                .await;
                match result {
                    Ok((rows, bound)) => {
                        let answer = self.answer(rows, retried, bound)?;
                        if let Some(bound) = bound
                            && !recorded
                            && answer.unrecorded()
                        {
                            // The first statement on a new timeline: record it
                            // (which starts the failover quarantine), then ask
                            // again. Once per call at most.
                            recorded = true;
                            self.record_timeline(conn.get(), bound).await?;
                            conn.done();
                            continue;
                        }
                        conn.done();
                        if answer.rerun(not_after, &mut reran) {
                            continue;
                        }
                        return answer.in_time();
                    }
                    Err(Failure::Pg(error)) => {
                        // Someone ran DEALLOCATE ALL or DISCARD ALL on this
                        // session: our statements are gone (and with DISCARD,
                        // the session's settings too). Nothing ran: once more
                        // on a new connection, which the pool makes with the
                        // settings; this one is closed.
                        if is_statement_gone(&error) && !reprepared {
                            tracing::warn!(%error, "a prepared statement of the backend was deallocated on its session; that connection is closed");
                            reprepared = true;
                            continue; // `conn` is dropped, so discarded.
                        }
                        let lost = is_session_lost(&error) || conn.get().is_closed();
                        if lost && !retried {
                            tracing::debug!(%error, "session lost under a call; retrying once");
                            retried = true;
                            continue; // `conn` is dropped, so discarded.
                        }
                        // A session whose statements are gone twice in one
                        // call is not given back to the pool either.
                        if !lost && !is_statement_gone(&error) {
                            conn.done();
                        }
                        return Err(Failure::Pg(error));
                    }
                    // Nothing was sent, and the session is fine.
                    Err(Failure::Passed) => {
                        conn.done();
                        return Err(Failure::Passed);
                    }
                    Err(failure) => return Err(failure),
                }
            }
        };
        // Boxed: the call's state (the pool's, the driver's futures) is a few
        // KB, which every future that awaits this one would otherwise carry
        // and copy as it is moved (into its task, its timeout, …).
        match tokio::time::timeout(self.inner.call_timeout, Box::pin(call)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Mapped(self.timed_out())),
        }
    }

    /// Runs one lock statement on the caller's client (unnamed, parsed each time),
    /// bounded at the call timeout from now (see
    /// [`try_acquire_in`](Self::try_acquire_in)).
    pub(crate) async fn run_in<C>(
        &self,
        client: &C,
        sql: &str,
        types: &[Type],
        params: &[&(dyn ToSql + Sync)],
    ) -> std::result::Result<Answer, Failure>
    where
        C: GenericClient + Sync,
    {
        let not_after = Instant::now() + self.inner.call_timeout;
        let mut reran = false;
        let mut recorded = false;
        loop {
            let bound = self.bound_for(client, not_after).await?;
            let typed = with_types(params, types, Some(&bound));
            check_not_passed(not_after)?;
            let rows = client.query_typed(sql, &typed).await.map_err(Failure::Pg)?;
            let answer = self.answer(rows, false, Some(bound))?;
            if !recorded && answer.unrecorded() {
                // Recorded on a pooled connection, in a transaction of its own:
                // in the caller's, the marker's row lock would be held until the
                // caller commits, and every other client's first statement would
                // wait for it.
                recorded = true;
                let conn = self
                    .inner
                    .pool
                    .get()
                    .await
                    .map_err(|e| Failure::Mapped(from_pool(e, &self.inner.table)))?;
                let conn = DiscardUnlessDone(Some(conn), None);
                self.record_timeline(conn.get(), bound).await?;
                conn.done();
                continue;
            }
            if !answer.rerun(Some(not_after), &mut reran) {
                return answer.in_time();
            }
        }
    }

    /// Runs [`Statements::record_timeline`](crate::sql::Statements::record_timeline) on `client`, as `run` runs a lock
    /// statement, with the bound the statement that asked for it was sent with.
    pub(crate) async fn record_timeline(
        &self,
        client: &Object,
        bound: i64,
    ) -> std::result::Result<(), Failure> {
        let sql = &self.inner.sql.record_timeline;
        tracing::info!(
            table = %self.inner.table,
            "recording PostgreSQL's timeline in the failover marker (a promotion, or a \
             table without a marker)"
        );
        match &self.inner.begin {
            None => {
                let statement = client
                    .prepare_typed_cached(sql, RECORD_TIMELINE_TYPES)
                    .await
                    .map_err(Failure::Pg)?;
                client
                    .execute(&statement, &[&bound])
                    .await
                    .map_err(Failure::Pg)?;
            }
            Some(begin) => {
                let typed = with_types(&[], &[], Some(&bound));
                in_own_transaction(client, begin, sql, &typed)
                    .await
                    .map_err(Failure::Pg)?;
            }
        }
        Ok(())
    }

    /// `not_after` on the server's clock, in µs since the epoch, rounded toward
    /// earlier (contract item 8): from the latest reading any session reported.
    ///
    /// A backend's own sessions report one when they are set up (the config's
    /// post_create hook) and with every answer. Only a session of a pool built
    /// without the hook, before any statement answered, has none: then this reads
    /// the clock once on `client`, the connection the statement is about to run on.
    pub(crate) async fn bound_for<C>(
        &self,
        client: &C,
        not_after: Instant,
    ) -> std::result::Result<i64, Failure>
    where
        C: GenericClient + Sync,
    {
        let clock = self.server_clock();
        if let Some(bound) = clock.bound_micros(not_after) {
            return Ok(bound);
        }
        let messages = client
            .simple_query(CLOCK_READING)
            .await
            .map_err(Failure::Pg)?;
        if let Some(server_us) = clock_reading(&messages) {
            clock.observe(Instant::now(), server_us);
        }
        clock.bound_micros(not_after).ok_or_else(|| {
            Failure::Mapped(Error::Backend {
                message: "PostgreSQL did not tell its clock".into(),
                transient: true,
                source: None,
            })
        })
    }

    /// The rows of a statement that just answered; for a lock statement (sent with
    /// `bound`), with its clock reading observed.
    pub(crate) fn answer(
        &self,
        rows: Vec<Row>,
        retried: bool,
        bound: Option<i64>,
    ) -> std::result::Result<Answer, Failure> {
        let arrived = Instant::now();
        let clock = match bound {
            None => None,
            Some(bound) => {
                let server_us = rows
                    .first()
                    .map(answer::server_us)
                    .transpose()
                    .map_err(Failure::Pg)?
                    .ok_or_else(|| {
                        Failure::Mapped(Error::Backend {
                            message: "a lock statement returned no clock reading".into(),
                            transient: false,
                            source: None,
                        })
                    })?;
                self.server_clock().observe(arrived, server_us);
                Some(Reading { server_us, bound })
            }
        };
        Ok(Answer {
            rows,
            retried,
            arrived,
            clock,
        })
    }

    pub(crate) fn timed_out(&self) -> Error {
        Error::unavailable(
            format!(
                "PostgreSQL did not answer within {:?}",
                self.inner.call_timeout
            ),
            None,
        )
    }
}

/// The rows of one statement, whether it ran a second time, and for a lock
/// statement its clock reading.
pub(crate) struct Answer {
    pub(crate) rows: Vec<Row>,
    pub(crate) retried: bool,
    /// When the answer arrived.
    pub(crate) arrived: Instant,
    pub(crate) clock: Option<Reading>,
}

/// A lock statement's clock reading and the bound it was sent with, both in µs
/// since the epoch on the server's clock.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    server_us: i64,
    bound: i64,
}

impl Reading {
    /// Whether the statement ran at or after its bound, so that it changed
    /// nothing: its writes all require `clock.at_us < bound`.
    pub(crate) fn late(&self) -> bool {
        self.server_us >= self.bound
    }
}

impl Answer {
    /// Whether the statement was refused because the failover marker has not
    /// recorded the server's timeline yet (see [`Statements::record_timeline`](crate::sql::Statements::record_timeline)).
    pub(crate) fn unrecorded(&self) -> bool {
        self.rows.first().is_some_and(answer::Gate::says_unrecorded)
    }

    /// The one row every lock statement but `extend_many` returns.
    pub(crate) fn row(&self) -> Result<&Row> {
        self.rows.first().ok_or_else(|| Error::Backend {
            message: "a lock statement returned no row".into(),
            transient: false,
            source: None,
        })
    }

    /// The statement's clock reading (the epoch for a statement without one).
    pub(crate) fn server_time(&self) -> SystemTime {
        from_unix_micros(self.clock.map_or(0, |c| c.server_us))
    }

    /// Whether to run a statement refused as late once more (at most once per
    /// call, `reran` tells): when its answer arrived before `not_after`, the
    /// statement did not run late on our clock, so the bound was wrong, not the
    /// statement: the estimate of the server's clock (say the server's clock
    /// stepped forward since the reading it came from, or the reading was so old
    /// that the rate allowance alone moved the bound past the server's now). The
    /// refusal's own reading, just observed, has corrected it, and the statement
    /// changed nothing, so running it again is safe. Its new bound still rounds
    /// toward earlier, so the rerun cannot take effect after `not_after` either.
    pub(crate) fn rerun(&self, not_after: Option<Instant>, reran: &mut bool) -> bool {
        let (Some(reading), Some(not_after)) = (self.clock, not_after) else {
            return false;
        };
        if !reading.late() || *reran || self.arrived >= not_after {
            return false;
        }
        tracing::debug!(
            server_us = reading.server_us,
            bound_us = reading.bound,
            "refused as late before not_after: the server clock estimate was wrong; retrying once"
        );
        *reran = true;
        true
    }

    /// `self`, or [`Failure::Late`] if the statement ran too late to act.
    pub(crate) fn in_time(self) -> std::result::Result<Self, Failure> {
        match self.clock {
            Some(reading) if reading.late() => Err(Failure::Late(reading)),
            _ => Ok(self),
        }
    }
}

pub(crate) enum Failure {
    /// A driver error, still to be classified by the caller.
    Pg(tokio_postgres::Error),
    /// Already mapped (pool or timeout).
    Mapped(Error),
    /// The statement ran at or after its not-after bound, so it changed nothing.
    Late(Reading),
    /// The call's not_after passed before its statement was sent, so nothing was
    /// sent.
    Passed,
}

impl Failure {
    pub(crate) fn into_error(self, backend: &PostgresBackend) -> Error {
        match self {
            Failure::Pg(e) => backend.error(e),
            Failure::Mapped(e) => e,
            Failure::Late(reading) => Error::unavailable(
                format!(
                    "the statement reached PostgreSQL after its not_after bound (server clock \
                     {} µs, bound {} µs since the epoch); nothing changed",
                    reading.server_us, reading.bound
                ),
                None,
            ),
            Failure::Passed => Error::unavailable(
                "the call's not_after passed before its statement was sent; nothing changed",
                None,
            ),
        }
    }
}

/// `params` paired with their `types`, and the not-after `bound` (an int8) last
/// if there is one: the parameters of an unnamed statement.
pub(crate) fn with_types<'a>(
    params: &[&'a (dyn ToSql + Sync)],
    types: &[Type],
    bound: Option<&'a i64>,
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    params
        .iter()
        .zip(types)
        .map(|(param, ty)| (*param, ty.clone()))
        .chain(bound.map(|b| (b as &(dyn ToSql + Sync), Type::INT8)))
        .collect()
}

/// Runs one statement in a transaction of its own, for a session that a
/// transaction pooler lends us for that transaction only: `begin` (`BEGIN; SET
/// LOCAL …`, one simple query), the statement unnamed (Parse, Bind, Describe,
/// Execute, Sync: nothing named outlives it), and `COMMIT`, **all sent before
/// the first answer**, so the call still costs one round trip. The settings end
/// with the transaction, so no other client of the pooled session sees them,
/// yet they bound the statement: `statement_timeout` is armed when a statement
/// starts, and it starts after the `SET LOCAL`.
///
/// tokio-postgres pipelines the requests of one client: each of these futures
/// hands its messages to the connection when first polled, and
/// `join!(biased; …)` polls them first in this order, in one poll, so they
/// leave in this order (the connection task writes all it has queued, then
/// flushes). The pooler keeps the three on one server session: the session
/// leaves the transaction (ReadyForQuery idle) only after `COMMIT`.
///
/// A statement that fails (a row-lock wait past `lock_timeout`, say) aborts the
/// transaction; `COMMIT` then rolls it back without an error, and the
/// statement's error is returned. A failed `COMMIT` after a statement that
/// succeeded is returned too: the statement's effect is then unknown, as with a
/// lost answer.
pub(crate) async fn in_own_transaction(
    client: &tokio_postgres::Client,
    begin: &str,
    sql: &str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> std::result::Result<Vec<Row>, tokio_postgres::Error> {
    let (begun, rows, committed) = tokio::join!(
        biased;
        client.batch_execute(begin),
        client.query_typed(sql, params),
        client.batch_execute(COMMIT),
    );
    begun?;
    let rows = rows?;
    committed?;
    Ok(rows)
}

/// Refuses to send a lock statement once its `not_after` has passed: the server
/// would refuse it (or, were the bound wrong, let it act late), and the caller
/// has stopped waiting. Checked when the call starts and again just before the
/// statement goes out, since waiting for a connection, a clock reading or the
/// statement's first Parse round trip can take it past not_after.
pub(crate) fn check_not_passed(not_after: Instant) -> std::result::Result<(), Failure> {
    if Instant::now() >= not_after {
        return Err(Failure::Passed);
    }
    Ok(())
}

/// A pooled connection that goes back to the pool only through [`done`](Self::done):
/// dropped any other way (the call failed with a lost session, timed out, or its
/// future was dropped) it is closed, so no later call inherits a dead session or
/// an answer still in flight.
///
/// The connection of an acquire (the second field: the backend, the key and
/// the token, borrowed from the call so that the uncontended path copies
/// nothing) that is still open when dropped may have its statement in the
/// server. Then, before the drop returns, the acquire is marked in flight
/// ([`InFlight`]), and a task sends an empty query on the connection and closes
/// it once that is answered: the connection answers in order, so by then the
/// acquire has committed or failed, and the mark goes. Until then the
/// connection counts against the pool's size. Outside a runtime (nothing could
/// be spawned) it is only closed.
pub(crate) struct DiscardUnlessDone<'a>(
    Option<Object>,
    Option<(&'a Arc<Inner>, &'a LockKey, &'a Token)>,
);

impl DiscardUnlessDone<'_> {
    pub(crate) fn get(&self) -> &Object {
        self.0.as_ref().expect("present until done or dropped")
    }

    pub(crate) fn done(mut self) {
        drop(self.0.take());
    }
}

impl Drop for DiscardUnlessDone<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.0.take() else {
            return;
        };
        let (Some((inner, key, token)), Ok(runtime)) =
            (self.1.take(), tokio::runtime::Handle::try_current())
        else {
            drop(Object::take(conn));
            return;
        };
        if conn.is_closed() {
            drop(Object::take(conn));
            return;
        }
        let pending = InFlight::start(inner, key, *token);
        let inner = inner.clone();
        runtime.spawn(async move {
            // Any answer (an error too: the session may be in a failed
            // transaction) comes after the acquire's. The connection keeps
            // its place in the pool until then, so abandoned acquires never
            // open more sessions than the pool's size.
            let _ = tokio::time::timeout(inner.call_timeout, conn.batch_execute("")).await;
            drop(pending);
            drop(Object::take(conn));
        });
    }
}
