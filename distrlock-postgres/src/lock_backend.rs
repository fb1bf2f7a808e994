//! [`LockBackend`] for [`PostgresBackend`]: each call's statement, and what its
//! answer means.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::server_clock::from_unix_micros;
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, Owner, Place,
    ReleaseNotifier, Result, Ticket, Token, Ttl, WaiterAnswer,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use crate::backend::{Inner, PostgresBackend};
use crate::calls::{Answer, Failure};
use crate::error::{from_pool, is_lock_not_available};
use crate::sql::{
    ACQUIRE_TYPES, EXTEND_MANY_TYPES, EXTEND_TYPES, INSPECT_TYPES, MODE_FAIR, MODE_PLAIN,
    MODE_UNFAIR, RELEASE_TYPES, answer,
};

impl PostgresBackend {
    /// A `create_table` error. CREATE TABLE IF NOT EXISTS leaves a table of that
    /// name alone whatever its columns; the failover marker's INSERT that follows
    /// then fails with undefined_column or datatype_mismatch, which says the
    /// table is not a lock table.
    pub(crate) fn foreign_table(&self, error: tokio_postgres::Error) -> Error {
        match error.code().map(|c| c.code()) {
            Some("42703" | "42804") => Error::backend(
                format!(
                    "the table {} exists but is not a distrlock lock table: {}",
                    self.inner.table,
                    error
                        .as_db_error()
                        .map(|db| db.message().to_owned())
                        .unwrap_or_else(|| error.to_string())
                ),
                false,
            ),
            _ => self.error(error),
        }
    }

    pub(crate) async fn acquire_once(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Option<Place>,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        let ttl_us = ttl.as_micros();
        let (mode, ticket) = line_params(place);
        let params: [&(dyn ToSql + Sync); 6] = [
            &key.as_str(),
            token.as_uuid(),
            &ttl_us,
            &owner,
            &mode,
            &ticket,
        ];
        // A waiter refused without the ticket it needed (the row was locked by
        // the holder's extend or release, or another waiter's ticket) asks once
        // more at once: without a ticket it would back off like a waiter with
        // no line, and lose its place to those who came later.
        let mut asked_again = false;
        loop {
            let answer = match self
                .run_marked(
                    &self.inner.sql.acquire,
                    ACQUIRE_TYPES,
                    &params,
                    Some(not_after),
                    Some((key, token)),
                )
                .await
            {
                Ok(answer) => answer,
                // Waited past lock_timeout on a row another transaction is
                // writing: the statement rolled back, nothing changed, and the
                // key is busy.
                Err(Failure::Pg(e)) if is_lock_not_available(&e) => {
                    return Ok(WaiterAnswer {
                        outcome: AcquireOutcome::Held { remaining: None },
                        ticket: None,
                    });
                }
                Err(failure) => return Err(failure.into_error(self)),
            };
            // Only a waiter can need a ticket: a plain try decodes its answer
            // once, below.
            let skipped = place.is_some()
                && answer
                    .row()
                    .ok()
                    .and_then(|row| answer::Acquire::decode(row).ok())
                    .is_some_and(|row| row.ticket_skipped);
            if skipped && !asked_again && Instant::now() < not_after {
                asked_again = true;
                continue;
            }
            return self.acquire_outcome(&answer, ttl);
        }
    }

    /// The outcome of an acquire statement's one row, with the waiter's ticket
    /// when refused.
    pub(crate) fn acquire_outcome(&self, answer: &Answer, ttl: Ttl) -> Result<WaiterAnswer> {
        let row = answer::Acquire::decode(answer.row()?).map_err(|e| self.error(e))?;
        if let Some(fence) = row.fence {
            return Ok(WaiterAnswer {
                outcome: AcquireOutcome::Acquired {
                    fence: Fence::new(fence),
                    server_time: answer.server_time(),
                },
                ticket: None,
            });
        }
        let remaining_us = row.remaining_us;
        let gate = self.gate(row.gate, ttl)?;
        // Tickets are never negative: the line starts at 0 and only grows.
        let ticket = match (row.ticket, row.ahead) {
            (Some(number), Some(ahead)) => Some(Ticket {
                number: u64::try_from(number).unwrap_or(0),
                ahead: u64::try_from(ahead).unwrap_or(0),
            }),
            _ => None,
        };
        Ok(WaiterAnswer {
            outcome: AcquireOutcome::Held {
                // Refused; no remaining lease when the row was free (or absent)
                // and a concurrent acquirer took it first. In a failover
                // quarantine, the later of its end and the holder's.
                remaining: match (remaining_us, gate) {
                    (Some(a), Some(b)) => Some(micros(a.max(b))),
                    (a, b) => a.or(b).map(micros),
                },
            },
            ticket,
        })
    }

    /// The outcome of an extend statement's one row.
    pub(crate) fn extend_outcome(
        &self,
        key: &LockKey,
        answer: &Answer,
        ttl: Ttl,
    ) -> Result<SystemTime> {
        let row = answer::Extend::decode(answer.row()?).map_err(|e| self.error(e))?;
        if row.renewed {
            return Ok(answer.server_time());
        }
        match self.gate(row.gate, ttl)? {
            Some(left) => Err(quarantined(key, left)),
            None => Err(Error::NotHeld { key: key.clone() }),
        }
    }

    /// Reads a refused statement's failover gate: the µs a failover quarantine
    /// has left, if one runs; [`Error::InvalidTtl`] if `ttl` is above the
    /// table's max_ttl.
    pub(crate) fn gate(&self, gate: answer::Gate, ttl: Ttl) -> Result<Option<i64>> {
        let quarantine_us = gate.quarantine_us;
        if let Some(max_ttl_us) = gate.max_ttl_us
            && ttl.as_micros() > max_ttl_us
        {
            return Err(Error::InvalidTtl {
                reason: format!(
                    "{:?} is longer than the max_ttl of table {} ({:?}); raise it with \
                     PostgresConfig's max_ttl and create_table",
                    ttl.get(),
                    self.inner.table,
                    micros(max_ttl_us),
                ),
            });
        }
        if quarantine_us.is_none() && gate.unrecorded {
            // Recorded and asked again, and still not: a concurrent promotion
            // record, or the bound passed. Refused for now; nothing changed.
            return Ok(Some(0));
        }
        if let Some(left) = quarantine_us {
            tracing::warn!(
                table = %self.inner.table,
                left_ms = left / 1000,
                "PostgreSQL was promoted (a new timeline): no lock is granted or extended \
                 until the failover quarantine ends"
            );
        }
        Ok(quarantine_us)
    }

    /// The outcome of a release statement's one row.
    pub(crate) fn release_outcome(&self, answer: &Answer) -> Result<Released> {
        let released = answer::released(answer.row()?).map_err(|e| self.error(e))?;
        Ok(match released {
            Some(true) => Released::Now,
            Some(false) => Released::Before,
            None => Released::NotHeld,
        })
    }

    pub(crate) fn lock_info(&self, row: &Row) -> Result<LockInfo> {
        let answer::Lock {
            key,
            owner,
            fence,
            acquired_us,
            expires_us,
            held,
            remaining_us,
        } = answer::Lock::decode(row).map_err(|e| self.error(e))?;
        let key = LockKey::new(key).map_err(|e| Error::Backend {
            message: format!("the lock table holds a key distrlock cannot use: {e}"),
            transient: false,
            source: None,
        })?;
        let state = match (expires_us, held) {
            (None, _) => LockState::Released,
            (Some(_), true) => LockState::Held,
            (Some(_), false) => LockState::Expired,
        };
        Ok(LockInfo {
            key,
            owner,
            fence: Fence::new(fence),
            acquired_at: from_unix_micros(acquired_us),
            expires_at: expires_us.map(from_unix_micros),
            state,
            remaining: if held { remaining_us.map(micros) } else { None },
        })
    }
}

/// Marks one abandoned acquire of (key, token) as still in the server until
/// dropped, so a release of the same token can wait for it (see `acquire`).
pub(crate) struct InFlight {
    inner: Arc<Inner>,
    slot: (LockKey, Token),
}

impl InFlight {
    pub(crate) fn start(inner: &Arc<Inner>, key: &LockKey, token: Token) -> Self {
        let slot = (key.clone(), token);
        let mut map = inner
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(slot.clone())
            .or_insert_with(|| watch::channel(0).0)
            .send_modify(|running| *running += 1);
        Self {
            inner: inner.clone(),
            slot,
        }
    }

    /// Waits (within the call timeout) until no acquire of (key, token) runs.
    pub(crate) async fn wait(inner: &Inner, key: &LockKey, token: &Token) {
        let running = {
            let map = inner
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            map.get(&(key.clone(), *token))
                .map(watch::Sender::subscribe)
        };
        if let Some(mut running) = running {
            // An error means the count reached zero and the entry is gone.
            let _ = tokio::time::timeout(inner.call_timeout, running.wait_for(|n| *n == 0)).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut map = self
            .inner
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(running) = map.get(&self.slot) {
            running.send_modify(|n| *n = n.saturating_sub(1));
            if *running.borrow() == 0 {
                map.remove(&self.slot);
            }
        }
    }
}

pub(crate) enum Released {
    Now,
    Before,
    NotHeld,
}

/// The owner rule is [`Owner::new`]'s (one place for every backend).
pub(crate) fn check_owner(owner: &str) -> Result<()> {
    Owner::new(owner).map(drop)
}

/// Extend refused in a failover quarantine: transient, since the quarantine
/// ends, though not within the lease (a lease never outlives it).
pub(crate) fn quarantined(key: &LockKey, left_us: i64) -> Error {
    Error::backend(
        format!(
            "lock {key} not renewed: PostgreSQL was promoted, and the failover quarantine \
             has {:?} left",
            micros(left_us)
        ),
        true,
    )
}

/// `$5` and `$6` of the acquire statement: the caller's mode, and its ticket.
pub(crate) fn line_params(place: Option<Place>) -> (i64, Option<i64>) {
    match place {
        None => (MODE_PLAIN, None),
        Some(place) => (
            if place.fair { MODE_FAIR } else { MODE_UNFAIR },
            // A ticket past i64::MAX was never handed out: ask for a new one.
            place.ticket.and_then(|t| i64::try_from(t).ok()),
        ),
    }
}

pub(crate) fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

impl PostgresBackend {
    /// A try-acquire, run in the caller's future: no task of its own.
    ///
    /// It is cancel safe all the same. A caller may drop this future while the
    /// statement is still in the server (waiting for a row lock, or for its
    /// commit on a slow disk or a synchronous standby), and then release the
    /// token, as core's cleanup does once the acquire's `not_after` has passed.
    /// That release, on another connection, must not run before the abandoned
    /// acquire has committed or failed: the server cannot order it after it.
    /// The release's WHERE (this token, live) is false on the row version its
    /// snapshot sees (the previous holder's, or no row at all for a key's first
    /// acquisition; an UPDATE never waits for an uncommitted insert), so it
    /// would answer NotHeld at once, and the acquire would then commit a lease
    /// nobody holds, until its ttl.
    ///
    /// So the connection of an acquire dropped mid-statement is not simply
    /// closed: it is marked in flight for its key and token (`InFlight`),
    /// synchronously, before the drop returns, and a small task sends one more
    /// query on it. The connection answers in order, so that query's answer
    /// comes after the acquire's end; then the mark goes and the connection is
    /// closed. A release of the same token waits for the mark first (within
    /// the call timeout). Only this backend's own acquires are ordered this
    /// way; another process's rely on the `not_after` bound alone. An acquire
    /// dropped before its statement went out never sends it. The mark is made
    /// when the future is dropped: a release must come after that drop (a
    /// task's `abort()` only asks for it). Tests:
    /// release_waits_for_an_abandoned_acquire_of_the_same_token and
    /// release_after_the_bound_waits_for_an_abandoned_first_acquire_still_committing
    /// both fail without the wait.
    async fn acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Option<Place>,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        check_owner(owner)?;
        self.acquire_once(key, token, ttl, owner, place, not_after)
            .await
    }
}

#[async_trait]
impl LockBackend for PostgresBackend {
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

    /// A refusal hands out a ticket in the key's line, which also makes the
    /// holder's release notify.
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
        let ttl_us = ttl.as_micros();
        let params: [&(dyn ToSql + Sync); 3] = [&key.as_str(), token.as_uuid(), &ttl_us];
        match self
            .run(
                &self.inner.sql.extend,
                EXTEND_TYPES,
                &params,
                Some(not_after),
            )
            .await
        {
            Ok(answer) => self.extend_outcome(key, &answer, ttl),
            Err(failure) => Err(failure.into_error(self)),
        }
    }

    /// One statement for the whole batch (see the type's docs: safe to run twice,
    /// like `extend`).
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = leases.iter().map(|(key, _)| key.as_str()).collect();
        let tokens: Vec<uuid::Uuid> = leases.iter().map(|(_, token)| *token.as_uuid()).collect();
        let ttl_us = ttl.as_micros();
        let params: [&(dyn ToSql + Sync); 3] = [&keys, &tokens, &ttl_us];
        let answer = self
            .run(
                &self.inner.sql.extend_many,
                EXTEND_MANY_TYPES,
                &params,
                Some(not_after),
            )
            .await
            .map_err(|f| f.into_error(self))?;
        // Every row carries the same gate; refused by it, no lease was renewed:
        // each entry gets the gate's answer.
        if let Some(row) = answer.rows.first() {
            let gate = answer::Gate::decode(row).map_err(|e| self.error(e))?;
            match self.gate(gate, ttl) {
                Ok(None) => {}
                Ok(Some(left)) => {
                    return Ok(leases
                        .iter()
                        .map(|(key, _)| Err(quarantined(key, left)))
                        .collect());
                }
                Err(Error::InvalidTtl { reason }) => {
                    return Ok(leases
                        .iter()
                        .map(|_| {
                            Err(Error::InvalidTtl {
                                reason: reason.clone(),
                            })
                        })
                        .collect());
                }
                Err(other) => return Err(other),
            }
        }
        let mut renewed: HashSet<(&str, uuid::Uuid)> = HashSet::with_capacity(answer.rows.len());
        let mut busy: HashSet<(&str, uuid::Uuid)> = HashSet::new();
        for row in &answer.rows {
            let entry = answer::BatchEntry::decode(row).map_err(|e| self.error(e))?;
            // One row of NULLs when nothing was renewed (or nothing was busy).
            if let Some(lease) = entry.lease {
                if entry.busy {
                    busy.insert(lease);
                } else {
                    renewed.insert(lease);
                }
            }
        }
        let server_time = answer.server_time();
        Ok(leases
            .iter()
            .map(|(key, token)| {
                let pair = (key.as_str(), *token.as_uuid());
                if renewed.contains(&pair) {
                    Ok(server_time)
                } else if busy.contains(&pair) {
                    // Neither renewed nor gone: the manager retries it alone.
                    Err(Error::backend(
                        format!("the row of {key} is locked by another transaction; not renewed"),
                        true,
                    ))
                } else {
                    Err(Error::NotHeld { key: key.clone() })
                }
            })
            .collect())
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        InFlight::wait(&self.inner, key, token).await;
        let channel = self.inner.sql.channel.as_str();
        let params: [&(dyn ToSql + Sync); 3] = [&key.as_str(), token.as_uuid(), &channel];
        let answer = self
            .run(
                &self.inner.sql.release,
                RELEASE_TYPES,
                &params,
                Some(not_after),
            )
            .await
            .map_err(|f| f.into_error(self))?;
        match self.release_outcome(&answer)? {
            Released::Now => {}
            // The first run's session was lost before it answered, so it may have
            // released the lease and committed. Then the retry finds this token's
            // row released (`Before`), or, once a waiter woken by that release's
            // NOTIFY has taken the key, another token's lease (`NotHeld`): both
            // are the first run's success, and NotHeld would tell the caller that
            // it lost a lock it held to the end. If the first run did not go
            // through, the retry's NotHeld means the lease had already run out;
            // the retry cannot tell the two apart, and Ok still states what the
            // caller needs: no live lease of this token is left. (Nor can the
            // first run take effect later: its not_after bounds it.)
            Released::Before | Released::NotHeld if answer.retried => {}
            Released::Before | Released::NotHeld => {
                return Err(Error::NotHeld { key: key.clone() });
            }
        }
        // Waiters in this process need not wait for the LISTEN round trip.
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let params: [&(dyn ToSql + Sync); 1] = [&key.as_str()];
        let answer = self
            .run(&self.inner.sql.inspect, INSPECT_TYPES, &params, None)
            .await
            .map_err(|f| f.into_error(self))?;
        answer
            .rows
            .first()
            .map(|row| self.lock_info(row))
            .transpose()
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let answer = self
            .run(&self.inner.sql.list, &[], &[], None)
            .await
            .map_err(|f| f.into_error(self))?;
        answer.rows.iter().map(|row| self.lock_info(row)).collect()
    }

    async fn create_table(&self) -> Result<()> {
        let ddl = &self.inner.create_table;
        let call = async {
            let conn = self
                .inner
                .pool
                .get()
                .await
                .map_err(|e| from_pool(e, &self.inner.table))?;
            match conn.batch_execute(ddl).await {
                Ok(()) => Ok(()),
                // duplicate_table / unique_violation on the catalog: someone without
                // our advisory lock (another tool) created it at the same moment. It
                // exists now, so IF NOT EXISTS makes the second run a no-op.
                Err(e) if matches!(e.code().map(|c| c.code()), Some("42P07" | "23505")) => conn
                    .batch_execute(ddl)
                    .await
                    .map_err(|e| self.foreign_table(e)),
                Err(e) => Err(self.foreign_table(e)),
            }
        };
        tokio::time::timeout(self.inner.call_timeout, call)
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }

    fn schema_sql(&self) -> String {
        format!("{};\n", self.inner.sql.create_table)
    }

    /// An acquire dropped mid-statement marks its connection in flight until
    /// the statement has ended, and a release of the same token waits for the
    /// mark (`InFlight`; see `acquire`).
    fn settles_dropped_acquires(&self) -> bool {
        true
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.inner.notifier)
    }
}
