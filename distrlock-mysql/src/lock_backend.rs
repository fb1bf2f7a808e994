//! The [`LockBackend`] impl of [`MySqlBackend`], and the same statements on
//! your own connection (`try_acquire_in`, `extend_in`, `release_in`).

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::server_clock::from_unix_micros;
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, Owner, Place, ReleaseNotifier,
    Result, Ticket, Token, Ttl, WaiterAnswer,
};
use mysql_async::Value;
use mysql_async::prelude::Queryable;
use tokio::time::Instant;

use crate::backend::MySqlBackend;
use crate::connection::{ANSWER_RESERVE, Call, Failed, Ran, Reply};
use crate::error::{is_busy_for_try, is_lock_wait_timeout};
use crate::sql::{
    self, AcquireAnswer, BatchAnswer, GuardedAnswer, LockWait, Refusal, Stamp, Verdict, WriteParams,
};

impl MySqlBackend {
    /// Tries once to acquire `key`, on `conn`: your own connection, or a
    /// transaction you opened on it ([`mysql_async::Transaction`]).
    ///
    /// It runs the same statement as [`LockBackend::try_acquire`], with the same
    /// outcomes, but without the backend's retries and client-side timeouts: the
    /// connection's own session settings bound it (see
    /// [`MySqlConfig::session_settings_sql`](crate::MySqlConfig::session_settings_sql)). A row-lock wait past your session's
    /// `innodb_lock_wait_timeout` is an error here (1205, transient), not
    /// [`AcquireOutcome::Held`]: with `innodb_rollback_on_timeout` the server
    /// rolls back your whole transaction, which you need to know. Inside a
    /// transaction:
    ///
    /// - the acquisition is undone if the transaction rolls back, and other
    ///   sessions see it only once it commits; until then they wait on the row
    ///   lock (up to their `innodb_lock_wait_timeout`), so commit promptly;
    /// - **the fence counts only once the transaction commits.** A rolled-back
    ///   acquire never happened: its fence is not kept anywhere, and the next
    ///   acquisition of the key may be handed the same fence number. Present
    ///   the fence to anything outside the transaction (a storage service that
    ///   rejects stale fences) only after the commit succeeded; if the commit's
    ///   outcome is unknown (the connection broke during `COMMIT`),
    ///   [`inspect`](LockBackend::inspect) the key first;
    /// - the lease is counted from the statement, not from the commit, and the
    ///   clock reading it returns is the statement's;
    /// - a *refused* try also locks the holder's row until your transaction ends
    ///   (InnoDB locks the duplicate row of every `INSERT … ON DUPLICATE KEY
    ///   UPDATE`): the holder's extends wait on it and fail after their
    ///   `innodb_lock_wait_timeout`, so on `Held` roll back or commit at once;
    /// - like any statement that calls `LAST_INSERT_ID(expr)`, it sets the
    ///   session's `LAST_INSERT_ID()`: read your own generated ids before calling it.
    ///
    /// There is no `not_after` here: when the statement takes effect is up to
    /// your commit. It still runs only within about 12 s of the backend's
    /// estimate of the server's clock (see "No late effects" on the type); if the estimate
    /// was off it retries once with a fresh one. The backend's first call of all
    /// reads the server's clock first, on `conn`.
    ///
    /// A session whose clock is pinned (`SET @@timestamp = …`) gets
    /// [`Error::InvalidConfig`] and nothing changes (see "A pinned session
    /// clock" on the type). So do sessions that wait longer than
    /// [`MySqlConfig::clock_tolerance`](crate::MySqlConfig::clock_tolerance) for the table's metadata lock: bound
    /// `lock_wait_timeout` with [`MySqlConfig::session_settings_sql`](crate::MySqlConfig::session_settings_sql).
    pub async fn try_acquire_in<Q: Queryable>(
        &self,
        conn: &mut Q,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
    ) -> Result<AcquireOutcome> {
        let call = self.acquire_call(key, token, ttl, owner, None)?;
        let mut refused = None;
        for _ in 0..2 {
            let reply = self
                .execute_in(conn, &call)
                .await
                .map_err(|e| self.map(e, "acquire"))?;
            match self.acquire_answer(key, reply)? {
                Answered::Done((outcome, _)) => return Ok(outcome),
                Answered::Late(stamp, reading) => refused = Some((stamp, reading)),
            }
        }
        let (stamp, reading) = refused.expect("two refusals");
        Err(late("acquire", key, stamp, reading))
    }

    /// Renews `token`'s live lease on `key` to end `ttl` from now, on `conn`:
    /// your own connection, or a transaction on it.
    ///
    /// The same statement as [`LockBackend::extend`], with the same outcomes
    /// (the server clock's reading at which the lease was renewed, or
    /// [`Error::NotHeld`]), without retries, client-side timeouts or a
    /// `not_after` bound, like [`try_acquire_in`](Self::try_acquire_in). Inside
    /// a transaction the new expiry takes effect at commit (other sessions'
    /// statements on the row wait for it meanwhile), and a rollback keeps the
    /// lease as it was; the expiry is counted from the statement.
    ///
    /// A session whose clock is pinned (`SET @@timestamp = …`) gets
    /// [`Error::InvalidConfig`] and the lease stays as it is (see "A pinned
    /// session clock" on the type).
    pub async fn extend_in<Q: Queryable>(
        &self,
        conn: &mut Q,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
    ) -> Result<SystemTime> {
        let call = self.extend_call(key, token, ttl);
        let reply = self
            .execute_in(conn, &call)
            .await
            .map_err(|e| self.map(e, "extend"))?;
        match self.guarded_answer(key, reply, "extend")? {
            Answered::Done(at) => Ok(at),
            // Only a bound can refuse it, and an extend on your connection has none.
            Answered::Late(stamp, reading) => Err(late("extend", key, stamp, reading)),
        }
    }

    /// Releases `key` on `conn`: your own connection, or a transaction on it.
    ///
    /// The same statement as [`LockBackend::release`], without retries,
    /// client-side timeouts or a `not_after` bound. Inside a transaction the
    /// release takes effect at commit, and a rollback keeps the lease and its
    /// fence as they were (the fence of an acquisition made in the same
    /// transaction counts only if that transaction commits, see
    /// [`try_acquire_in`](Self::try_acquire_in)). It is not announced on the
    /// [`release_notifier`](LockBackend::release_notifier), since the backend
    /// cannot tell when (or whether) you commit.
    ///
    /// A session whose clock is pinned (`SET @@timestamp = …`) gets
    /// [`Error::InvalidConfig`] and the lease stays as it is (see "A pinned
    /// session clock" on the type); so does a release that waited longer than
    /// [`MySqlConfig::clock_tolerance`](crate::MySqlConfig::clock_tolerance) for locks, which
    /// [`MySqlConfig::session_settings_sql`](crate::MySqlConfig::session_settings_sql) rules out.
    pub async fn release_in<Q: Queryable>(
        &self,
        conn: &mut Q,
        key: &LockKey,
        token: &Token,
    ) -> Result<()> {
        let call = self.release_call(key, token);
        let reply = self
            .execute_in(conn, &call)
            .await
            .map_err(|e| self.map(e, "release"))?;
        match self.guarded_answer(key, reply, "release")? {
            Answered::Done(_) => Ok(()),
            // Only a bound can refuse it, and a release on your connection has none.
            Answered::Late(stamp, reading) => Err(late("release", key, stamp, reading)),
        }
    }

    /// Reads the acquire statement's answer (see `sql` for the encoding), and
    /// observes its clock reading; a refusal comes with the caller's place in
    /// the key's line (`sql::LINE_BITS`).
    fn acquire_answer(
        &self,
        key: &LockKey,
        reply: Reply,
    ) -> Result<Answered<(AcquireOutcome, Option<i64>)>> {
        let (affected, id, stamp, arrived) = reply.written("acquire")?;
        let answer = sql::decode_acquire(affected, id, stamp.reference)
            .ok_or_else(|| unexpected("acquire", key, affected, id))?;
        match answer {
            AcquireAnswer::Granted { fence, reading } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Done((
                    AcquireOutcome::Acquired {
                        fence: Fence::new(fence),
                        server_time: from_unix_micros(reading),
                    },
                    None,
                )))
            }
            AcquireAnswer::Held {
                remaining_us,
                line,
                reading,
            } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Done((
                    AcquireOutcome::Held {
                        remaining: Some(Duration::from_micros(remaining_us.unsigned_abs())),
                    },
                    Some(line),
                )))
            }
            AcquireAnswer::Refused(refusal) => {
                self.refused(key, refusal, stamp, arrived, "acquire")
            }
        }
    }

    /// Reads the answer of extend or release (see `sql`), and observes its
    /// clock reading.
    fn guarded_answer(
        &self,
        key: &LockKey,
        reply: Reply,
        what: &str,
    ) -> Result<Answered<SystemTime>> {
        let (affected, id, stamp, arrived) = reply.written(what)?;
        let answer =
            sql::decode_guarded(affected, id).ok_or_else(|| unexpected(what, key, affected, id))?;
        match answer {
            GuardedAnswer::Matched { reading } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Done(from_unix_micros(reading)))
            }
            GuardedAnswer::NotHeld => Err(Error::NotHeld { key: key.clone() }),
            GuardedAnswer::Refused(refusal) => self.refused(key, refusal, stamp, arrived, what),
        }
    }

    /// A refusal: a late one is for the caller to retry or report; the others
    /// are errors.
    fn refused<T>(
        &self,
        key: &LockKey,
        refusal: Refusal,
        stamp: Stamp,
        arrived: Instant,
        what: &str,
    ) -> Result<Answered<T>> {
        match refusal {
            Refusal::Clock { reading } => {
                self.inner.clock.observe(arrived, reading);
                Ok(Answered::Late(stamp, reading))
            }
            // A pinned clock's reading says nothing about the server's clock.
            Refusal::Pinned { .. } => Err(self.pinned_clock(what)),
            Refusal::FenceExhausted { reading } => {
                self.inner.clock.observe(arrived, reading);
                Err(Error::backend(
                    format!(
                        "{what} of {key} refused: its next fence would exceed {}, the largest \
                         this backend can report; nothing was changed",
                        sql::MAX_FENCE
                    ),
                    false,
                ))
            }
        }
    }

    fn acquire_call(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Option<Place>,
    ) -> Result<Call<'_>> {
        let owner = Owner::new(owner)?;
        Ok(Call::Write {
            sql: &self.inner.sql.acquire,
            params: WriteParams::acquire(key, token, owner, ttl, place),
            window: true,
        })
    }

    /// The lock table's column names (`create_table`'s upgrade).
    async fn columns(&self) -> Result<Vec<String>> {
        let table = self.table();
        let call = Call::Read {
            sql: sql::COLUMNS,
            params: vec![
                table.schema().map_or(Value::NULL, Value::from),
                Value::from(table.name()),
            ],
        };
        let rows = self
            .run("create table", &call, self.read_deadline())
            .await?
            .reply
            .rows("create table")?;
        Ok(rows
            .into_iter()
            .filter_map(|row| row.get_opt::<String, _>(0).and_then(|name| name.ok()))
            .collect())
    }

    /// A try-acquire, by a waiter at `place` or (`None`) a plain try: the
    /// acquire statement (see `try_acquire`), and after a refusal that says
    /// the waiter's ticket is not in the line, the statement that takes one.
    async fn acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Option<Place>,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        let call = self.acquire_call(key, token, ttl, owner, place)?;
        let mut refused = None;
        for _ in 0..2 {
            if refused.is_some() && Instant::now() >= not_after {
                break;
            }
            match self.run_unmapped("acquire", &call, not_after).await {
                Ok(ran) => match self.acquire_answer(key, ran.reply)? {
                    Answered::Done((outcome, line)) => {
                        let ticket = match (place, line) {
                            (Some(place), Some(line)) => {
                                self.place_in_line(key, place, line, not_after).await?
                            }
                            _ => None,
                        };
                        return Ok(WaiterAnswer { outcome, ticket });
                    }
                    Answered::Late(stamp, reading) => refused = Some((stamp, reading)),
                },
                // Waited out the row-lock bound on a row another transaction holds
                // (an uncommitted acquire, a `SELECT … FOR UPDATE`): the statement
                // was rolled back, so nothing changed, and someone else is busy
                // with the key. The same answer as PostgreSQL's for its
                // `lock_timeout`.
                Err(Failed::Statement(e)) if is_busy_for_try(&e) => {
                    return Ok(WaiterAnswer {
                        outcome: AcquireOutcome::Held { remaining: None },
                        ticket: None,
                    });
                }
                Err(failed) => return Err(failed.into_error(self, "acquire")),
            }
        }
        let (stamp, reading) = refused.expect("a refusal");
        Err(late("acquire", key, stamp, reading))
    }

    /// A refused waiter's ticket: the one it brought, if the refusal's `line`
    /// says it is in the line; else a new one from `take_ticket` (or none if
    /// that found no row or ran past the bound: the waiter asks again).
    async fn place_in_line(
        &self,
        key: &LockKey,
        place: Place,
        line: i64,
        not_after: Instant,
    ) -> Result<Option<Ticket>> {
        if line & sql::LINE_IN != 0
            && let Some(number) = place.ticket
        {
            return Ok(Some(Ticket {
                number,
                ahead: u64::try_from(line & sql::LINE_MAX_AHEAD).unwrap_or(0),
            }));
        }
        let call = Call::Write {
            sql: &self.inner.sql.take_ticket,
            params: WriteParams::ticket(key),
            window: false,
        };
        let ran = self.run("ticket", &call, not_after).await?;
        let (_, id, _, _) = ran.reply.written("ticket")?;
        // The new line_next; the ticket is one less. How many come before it
        // is learnt at the next try: until then it counts as next in line, so
        // that it asks again soon.
        Ok(u64::try_from(id)
            .ok()
            .filter(|&next| next > 0)
            .map(|next| Ticket {
                number: next - 1,
                ahead: 0,
            }))
    }

    fn extend_call(&self, key: &LockKey, token: &Token, ttl: Ttl) -> Call<'_> {
        Call::Write {
            sql: &self.inner.sql.extend,
            params: WriteParams::extend(key, token, ttl),
            window: false,
        }
    }

    fn release_call(&self, key: &LockKey, token: &Token) -> Call<'_> {
        Call::Write {
            sql: &self.inner.sql.release,
            params: WriteParams::release(key, token),
            window: false,
        }
    }

    /// Runs one write that its answer may refuse on the server's clock: if the
    /// server says the statement ran past its bound while our clock has not
    /// reached `not_after`, the estimate of the server's clock was off (the
    /// clock stepped forward, or drifted past the rate allowance); the refusal
    /// brought a new reading, so try once more with it. A refusal at or after
    /// `not_after` is the late statement item 8 is about: a transient error.
    async fn write_in_time<T>(
        &self,
        what: &'static str,
        key: &LockKey,
        call: &Call<'_>,
        not_after: Instant,
        read: impl Fn(&Self, Ran) -> Result<Answered<T>>,
    ) -> Result<T> {
        let mut refused = None;
        for _ in 0..2 {
            if refused.is_some() && Instant::now() >= not_after {
                break;
            }
            let ran = self.run(what, call, not_after).await?;
            match read(self, ran)? {
                Answered::Done(value) => return Ok(value),
                Answered::Late(stamp, reading) => refused = Some((stamp, reading)),
            }
        }
        let (stamp, reading) = refused.expect("a refusal");
        Err(late(what, key, stamp, reading))
    }

    /// Renews `distinct` leases in batches (see "Batch renewal" in `sql`), and
    /// answers each one.
    async fn renew_batches(
        &self,
        distinct: &[&(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let stop = not_after.checked_sub(ANSWER_RESERVE).unwrap_or(not_after);
        let values: Vec<(Value, Value)> = distinct
            .iter()
            .map(|(key, token)| (sql::key_value(key), sql::token_value(token)))
            .collect();
        let mut answers: Vec<Option<Result<SystemTime>>> =
            (0..distinct.len()).map(|_| None).collect();
        let mut work: Vec<Part> = (0..distinct.len())
            .collect::<Vec<_>>()
            .chunks(sql::EXTEND_MANY_SLOTS)
            .rev()
            .map(|chunk| Part {
                leases: chunk.to_vec(),
                wait: if ttl.get() >= sql::FIRST_BATCH_WAIT_MIN_TTL {
                    LockWait::Short
                } else {
                    LockWait::None
                },
                clock_retried: false,
            })
            .collect();
        // Leases whose batch did not report them all renewed, with its reading.
        let mut to_verify: Vec<(usize, i64)> = Vec::new();
        let mut learned = false;
        let ttl_us = ttl.as_micros();
        while let Some(part) = work.pop() {
            if Instant::now() >= stop {
                let error = no_time("extend", part.leases.len());
                fill(&mut answers, &part.leases, &error);
                continue;
            }
            let slots = part.leases.len().next_power_of_two();
            let sql = sql::extend_many(
                &self.inner.sql.table,
                slots,
                &self.inner.sql.real_clock,
                part.wait,
            );
            let leases: Vec<(Value, Value)> =
                part.leases.iter().map(|&i| values[i].clone()).collect();
            let call = Call::Write {
                sql: &sql,
                params: WriteParams::ExtendMany {
                    ttl_us: Value::from(ttl_us),
                    leases,
                    slots,
                },
                window: false,
            };
            let ran = match self.run_unmapped("extend", &call, not_after).await {
                Ok(ran) => ran,
                // Another transaction holds one of these rows: nothing was
                // renewed. Renew the batch in quarters, without waiting (on
                // MariaDB), down to the leases whose rows are locked.
                Err(Failed::Statement(e)) if is_lock_wait_timeout(&e) => {
                    learned = true;
                    if let [lease] = part.leases[..] {
                        answers[lease] = Some(Err(self.map(e, "extend")));
                    } else {
                        let quarter = part.leases.len().div_ceil(4);
                        for leases in part.leases.chunks(quarter).rev() {
                            work.push(Part {
                                leases: leases.to_vec(),
                                wait: LockWait::None,
                                clock_retried: part.clock_retried,
                            });
                        }
                    }
                    continue;
                }
                Err(failed) => {
                    let error = failed.into_error(self, "extend");
                    if !learned {
                        // Nothing is known about any lease yet.
                        return Err(error);
                    }
                    fill(&mut answers, &part.leases, &error);
                    continue;
                }
            };
            let (affected, id, stamp, arrived) = ran.reply.written("extend")?;
            let n = part.leases.len();
            let answer = sql::decode_batch(affected, id, n)
                .ok_or_else(|| unexpected("extend", &distinct[part.leases[0]].0, affected, id))?;
            learned = true;
            match answer {
                BatchAnswer::Renewed { reading, affected } => {
                    self.inner.clock.observe(arrived, reading);
                    if affected == n as u64 {
                        for &i in &part.leases {
                            answers[i] = Some(Ok(from_unix_micros(reading)));
                        }
                    } else {
                        to_verify.extend(part.leases.iter().map(|&i| (i, reading)));
                    }
                }
                BatchAnswer::NoneHeld => {
                    for &i in &part.leases {
                        answers[i] = Some(Err(Error::NotHeld {
                            key: distinct[i].0.clone(),
                        }));
                    }
                }
                // A pinned session clock: a property of the session, not of a
                // lease, so the whole call fails.
                BatchAnswer::Refused {
                    refusal: Refusal::Pinned { .. },
                    ..
                } => return Err(self.pinned_clock("extend")),
                BatchAnswer::Refused {
                    refusal: Refusal::Clock { reading },
                    affected,
                } => {
                    self.inner.clock.observe(arrived, reading);
                    if affected > 0 {
                        // Some renewed before the bound passed: read them back.
                        to_verify.extend(part.leases.iter().map(|&i| (i, reading)));
                    } else if !part.clock_retried && Instant::now() < not_after {
                        // The estimate was off (see `write_in_time`): once more.
                        work.push(Part {
                            clock_retried: true,
                            ..part
                        });
                    } else {
                        let error = late("extend", &distinct[part.leases[0]].0, stamp, reading);
                        fill(&mut answers, &part.leases, &error);
                    }
                }
                BatchAnswer::Refused {
                    refusal: Refusal::FenceExhausted { .. },
                    ..
                } => {
                    return Err(unexpected(
                        "extend",
                        &distinct[part.leases[0]].0,
                        affected,
                        id,
                    ));
                }
            }
        }
        for group in to_verify.chunks(sql::EXTEND_MANY_SLOTS) {
            self.verify(distinct, group, ttl_us, not_after, &mut answers)
                .await;
        }
        Ok(answers
            .into_iter()
            .map(|answer| answer.expect("every lease is answered"))
            .collect())
    }

    /// Reads back the rows of leases that a batch did not report all renewed
    /// (`group`: each lease with its batch's reading) and answers each from
    /// what its row shows ([`sql::verdict`]); a lease that cannot be read back
    /// in time gets a transient error.
    async fn verify(
        &self,
        distinct: &[&(LockKey, Token)],
        group: &[(usize, i64)],
        ttl_us: i64,
        not_after: Instant,
        answers: &mut [Option<Result<SystemTime>>],
    ) {
        let slots = group.len().next_power_of_two();
        let sql = sql::verify(&self.inner.sql.table, slots);
        let last = group[group.len() - 1].0;
        let params = group
            .iter()
            .map(|&(i, _)| i)
            .chain(std::iter::repeat(last))
            .take(slots)
            .map(|i| sql::key_value(&distinct[i].0))
            .collect();
        let call = Call::Read { sql: &sql, params };
        let rows = match self.run("extend", &call, not_after).await {
            Ok(ran) => ran.reply.rows("extend"),
            Err(error) => Err(error),
        };
        let rows: Vec<(Vec<u8>, Vec<u8>, Option<i64>)> = match rows.and_then(|rows| {
            rows.into_iter()
                .map(|row| {
                    mysql_async::from_row_opt(row)
                        .map_err(|e| sql::corrupt(self.table(), &e.to_string()))
                })
                .collect()
        }) {
            Ok(rows) => rows,
            Err(error) => {
                let leases: Vec<usize> = group.iter().map(|&(i, _)| i).collect();
                fill(answers, &leases, &error);
                return;
            }
        };
        let by_key: HashMap<&[u8], (&[u8], Option<i64>)> = rows
            .iter()
            .map(|(key, token, expires)| (key.as_slice(), (token.as_slice(), *expires)))
            .collect();
        for &(i, reading) in group {
            let (key, token) = distinct[i];
            let row = by_key.get(key.as_str().as_bytes()).copied();
            answers[i] = Some(
                match sql::verdict(row, token.as_uuid().as_bytes(), reading, ttl_us) {
                    Verdict::Renewed => Ok(from_unix_micros(reading)),
                    Verdict::NotHeld => Err(Error::NotHeld { key: key.clone() }),
                    Verdict::Unknown => Err(Error::unavailable(
                        format!(
                            "extend of {key}: the batch did not renew it although it was live, \
                             and it has changed since (refused as late, or renewed by another \
                             call); its outcome is unknown"
                        ),
                        None,
                    )),
                },
            );
        }
    }
}

/// What a write's answer comes to: done, or refused because it ran past its
/// bound (or outside the offset window), with the stamp it ran with and its
/// reading.
enum Answered<T> {
    Done(T),
    Late(Stamp, i64),
}

/// The transient error of a write that the server refused on its clock.
fn late(what: &str, key: &LockKey, stamp: Stamp, reading: i64) -> Error {
    Error::unavailable(
        format!(
            "{what} of {key} refused by the server: it ran at {reading} µs on the server's clock, \
             outside [{}, {}], the window of the call's not_after on this backend's estimate of \
             that clock (the statement arrived late, or the server's clock stepped); nothing was \
             changed",
            stamp.reference, stamp.bound
        ),
        None,
    )
}

/// The error of leases that no statement could be sent for before `not_after`.
fn no_time(what: &str, leases: usize) -> Error {
    Error::unavailable(
        format!("{what}: no time left before the call's not_after for {leases} lease(s)"),
        None,
    )
}

/// Gives each of `leases` (that has no answer yet) a copy of `error`.
fn fill(answers: &mut [Option<Result<SystemTime>>], leases: &[usize], error: &Error) {
    for &i in leases {
        if answers[i].is_none() {
            answers[i] = Some(Err(copy_error(error)));
        }
    }
}

/// An error with the same kind and text as `error`, for one more lease of a
/// batch (errors are not `Clone`; the source stays with the first).
fn copy_error(error: &Error) -> Error {
    match error {
        Error::NotHeld { key } => Error::NotHeld { key: key.clone() },
        Error::Unavailable { message, .. } => Error::unavailable(message.clone(), None),
        other => Error::Backend {
            message: other.to_string(),
            transient: other.is_transient(),
            source: None,
        },
    }
}

/// A part of a batch renewal still to send.
struct Part {
    /// Indices into the distinct leases.
    leases: Vec<usize>,
    wait: LockWait,
    /// Whether this part was already sent again after a clock refusal.
    clock_retried: bool,
}

fn unexpected(what: &str, key: &LockKey, affected: u64, id: i64) -> Error {
    Error::backend(
        format!(
            "{what} of {key}: unexpected answer from the server (affected rows {affected}, insert id {id}); \
             is something between the client and the server rewriting OK packets?"
        ),
        false,
    )
}

#[async_trait]
impl LockBackend for MySqlBackend {
    /// One statement (two, if the server refuses the first on its clock while
    /// ours has not reached `not_after`, see "No late effects"), each retried
    /// once after a broken connection; every attempt carries the bound of
    /// `not_after` (or earlier), so none can take effect after it.
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let answer = self
            .acquire(key, token, ttl, owner, None, not_after)
            .await?;
        Ok(answer.outcome)
    }

    /// As `try_acquire`; a refusal that finds the caller's ticket out of the
    /// line takes a new one, with a second statement.
    async fn try_acquire_as_waiter(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Place,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        self.acquire(key, token, ttl, owner, Some(place), not_after)
            .await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let call = self.extend_call(key, token, ttl);
        self.write_in_time("extend", key, &call, not_after, |b, ran| {
            b.guarded_answer(key, ran.reply, "extend")
        })
        .await
    }

    /// One `UPDATE` per 1,024 distinct leases when every lease is renewed (the
    /// usual case); when the affected-rows count shows that some were not, one
    /// `SELECT` reads that batch's rows back and answers each lease. A row
    /// locked by another transaction costs that lease only (see "Rows locked by
    /// another transaction" on the type). Every statement ends before
    /// `not_after`, and leases it leaves unanswered get a transient error.
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let mut position: HashMap<&(LockKey, Token), usize> = HashMap::with_capacity(leases.len());
        let mut distinct: Vec<&(LockKey, Token)> = Vec::with_capacity(leases.len());
        let slots: Vec<usize> = leases
            .iter()
            .map(|lease| {
                *position.entry(lease).or_insert_with(|| {
                    distinct.push(lease);
                    distinct.len() - 1
                })
            })
            .collect();
        if distinct.is_empty() {
            return Ok(Vec::new());
        }
        let mut answers: Vec<Option<Result<SystemTime>>> = self
            .renew_batches(&distinct, ttl, not_after)
            .await?
            .into_iter()
            .map(Some)
            .collect();
        // An entry that appears twice gets the same answer in both positions.
        let mut results = Vec::with_capacity(slots.len());
        for i in slots {
            let answer = answers[i].take().expect("every lease is answered");
            answers[i] = Some(match &answer {
                Ok(at) => Ok(*at),
                Err(e) => Err(copy_error(e)),
            });
            results.push(answer);
        }
        Ok(results)
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let call = self.release_call(key, token);
        let result = self
            .write_in_time("release", key, &call, not_after, |b, ran| {
                match (
                    b.guarded_answer(key, ran.reply, "release"),
                    ran.retried_after,
                ) {
                    // The first attempt may have released it before its
                    // connection broke: "not held" would be a guess, the first
                    // error is the honest answer.
                    (Err(Error::NotHeld { .. }), Some(first)) => Err(first),
                    (answer, _) => answer,
                }
            })
            .await;
        if result.is_ok() {
            self.inner.notifier.notify(key);
        }
        result.map(|_| ())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let call = Call::Read {
            sql: &self.inner.sql.inspect,
            params: vec![sql::key_value(key)],
        };
        let rows = self
            .run("inspect", &call, self.read_deadline())
            .await?
            .reply
            .rows("inspect")?;
        rows.into_iter()
            .next()
            .map(|row| sql::decode_lock_info(row, self.table()))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let call = Call::Read {
            sql: &self.inner.sql.list,
            params: Vec::new(),
        };
        let rows = self
            .run("list", &call, self.read_deadline())
            .await?
            .reply
            .rows("list")?;
        rows.into_iter()
            .map(|row| sql::decode_lock_info(row, self.table()))
            .collect()
    }

    async fn create_table(&self) -> Result<()> {
        let call = Call::Ddl {
            sql: &self.inner.sql.create_table,
        };
        self.run("create table", &call, self.read_deadline())
            .await?;
        // A table made by an earlier version: add the line's columns it lacks.
        // Two processes may race here; an ALTER that fails because the other
        // added the column first is fine.
        let present = self.columns().await?;
        for (column, alter) in &self.inner.sql.line_columns {
            if present.iter().any(|p| p.eq_ignore_ascii_case(column)) {
                continue;
            }
            let call = Call::Ddl { sql: alter };
            if let Err(error) = self.run("create table", &call, self.read_deadline()).await {
                let now = self.columns().await?;
                if !now.iter().any(|p| p.eq_ignore_ascii_case(column)) {
                    return Err(error);
                }
            }
        }
        Ok(())
    }

    fn schema_sql(&self) -> String {
        format!("{};\n", self.inner.sql.create_table)
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.inner.notifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_of_errors_keep_their_kind() {
        let key = LockKey::new("k").unwrap();
        let not_held = copy_error(&Error::NotHeld { key: key.clone() });
        assert!(matches!(not_held, Error::NotHeld { key: k } if k == key));
        let unavailable = copy_error(&Error::unavailable("gone", None));
        assert!(matches!(&unavailable, Error::Unavailable { message, .. } if message == "gone"));
        let transient = copy_error(&Error::transient("busy", std::io::Error::other("x")));
        assert!(transient.is_transient());
        let permanent = copy_error(&Error::permanent("bad", std::io::Error::other("x")));
        assert!(!permanent.is_transient());
    }
}
