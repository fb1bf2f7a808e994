//! The [`LockBackend`] impl of [`SqliteBackend`]: each call one transaction
//! (see `SqliteBackend::write`), and the rows it reads decoded into
//! [`LockInfo`].

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, Owner, Place,
    ReleaseNotifier, Result, Ticket, Token, Ttl, WaiterAnswer, line,
    server_clock::from_unix_micros,
};
use rusqlite::{OptionalExtension, named_params};
use tokio::time::Instant;

use crate::backend::SqliteBackend;
use crate::clock::{HostClock, Now};
use crate::sql::{MAX_FENCE, MODE_FAIR, MODE_PLAIN, MODE_UNFAIR, TURN_US};

/// One row as the read statements return it.
struct Row {
    key: String,
    owner: String,
    fence: i64,
    acquired_at: i64,
    expires_at: Option<i64>,
    clock: String,
    lease_end: Option<i64>,
}

impl Row {
    fn from_sql(row: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            key: row.get(0)?,
            owner: row.get(1)?,
            fence: row.get(2)?,
            acquired_at: row.get(3)?,
            expires_at: row.get(4)?,
            clock: row.get(5)?,
            lease_end: row.get(6)?,
        })
    }

    fn into_info(self, clock: &HostClock, now: Now) -> Result<LockInfo> {
        let key = LockKey::new(self.key).map_err(|e| {
            Error::permanent(
                "the lock table holds a key distrlock cannot represent",
                std::io::Error::other(e.to_string()),
            )
        })?;
        let (state, remaining) = match self.lease_end {
            None => (LockState::Released, None),
            Some(end) => match remaining(&self.clock, end, self.expires_at, clock, now) {
                Some(left) => (LockState::Held, Some(left)),
                None => (LockState::Expired, None),
            },
        };
        Ok(LockInfo {
            key,
            owner: self.owner,
            fence: Fence::new(self.fence),
            acquired_at: from_unix_micros(self.acquired_at),
            expires_at: self.expires_at.map(from_unix_micros),
            state,
            remaining,
        })
    }
}

/// The lease left on a row whose lease ends at `end` on `row_clock` (and at
/// `expires_at` on the wall clock), or `None` if it is not live: the same test as
/// the SQL `LIVE` predicate.
fn remaining(
    row_clock: &str,
    end: i64,
    expires_at: Option<i64>,
    clock: &HostClock,
    now: Now,
) -> Option<Duration> {
    let left = if row_clock == clock.id() {
        end - now.lease
    } else {
        expires_at? - now.wall
    };
    (left > 0).then(|| Duration::from_micros(u64::try_from(left).unwrap_or(0)))
}

/// The holder statement's row: `(fence, clock, lease_end, expires_at,
/// freed_at, line_next, line_head, token)`.
type Holder = (
    i64,
    String,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    i64,
    i64,
    String,
);

/// Reads the holder statement's row.
fn holder_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Holder> {
    Ok((
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(3)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(7)?,
    ))
}

impl SqliteBackend {
    /// Says that this backend waits on `key` (a waiter's try was just
    /// refused); `true` if it was not listening for `key` before (see
    /// [`Wake::waiting`](crate::wake::Wake::waiting)). Registering the first
    /// time binds a socket and makes directories and a link, so that runs on
    /// the connection thread, not on the caller's runtime.
    async fn listen(&self, key: &LockKey) -> bool {
        if !self.wake.needs_listening(key) {
            return false;
        }
        let (wake, key) = (self.wake.clone(), key.clone());
        // If the thread has stopped, the next statement fails anyway.
        self.worker
            .run(move |_| Ok(wake.waiting(&key)))
            .await
            .unwrap_or(false)
    }

    /// A try-acquire, by a waiter at `place` or (`None`) a plain try: the
    /// acquire statement, and after a refusal the holder's row and, for a
    /// waiter not in line, a ticket; one transaction.
    async fn acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Option<Place>,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        let map = self.map();
        let owner = Owner::new(owner)?.into_string();
        let (key, token) = (key.clone(), token.to_string());
        let mode = match place {
            None => MODE_PLAIN,
            Some(p) if p.fair => MODE_FAIR,
            Some(_) => MODE_UNFAIR,
        };
        // A ticket past i64::MAX was never handed out: none.
        let brought = place
            .and_then(|p| p.ticket)
            .and_then(|t| i64::try_from(t).ok());
        if let Some(ticket) = brought {
            // A waiter in line asks often: when the key is plainly held by
            // another token and its ticket is in line but not next, answer
            // from a read, without taking the file's write lock (which the
            // holder's release needs). The next in line asks in a write
            // transaction, as a first try does, so that it takes the key as
            // soon as it is free.
            let (key, token) = (key.clone(), token.clone());
            let map = self.map();
            let refused = self
                .read(move |conn, sql, clock| {
                    let holder: Option<Holder> = conn
                        .prepare_cached(&sql.holder)
                        .and_then(|mut stmt| {
                            stmt.query_row(named_params! { ":key": key.as_str() }, holder_row)
                                .optional()
                        })
                        .map_err(&map)?;
                    let now = clock.now();
                    Ok(holder.and_then(
                        |(_, row_clock, lease_end, expires_at, _, next, head, holder)| {
                            let left = lease_end.and_then(|end| {
                                remaining(&row_clock, end, expires_at, clock, now)
                            })?;
                            (holder != token && ticket > head && ticket < next).then(|| {
                                WaiterAnswer {
                                    outcome: AcquireOutcome::Held {
                                        remaining: Some(left),
                                    },
                                    ticket: Some(Ticket {
                                        number: u64::try_from(ticket).unwrap_or(0),
                                        ahead: u64::try_from(ticket - head).unwrap_or(0),
                                    }),
                                }
                            })
                        },
                    ))
                })
                .await?;
            if let Some(refused) = refused {
                return Ok(refused);
            }
        }
        self.write(Some(not_after), move |tx, sql, clock, now| {
            let fence: Option<i64> = tx
                .prepare_cached(&sql.acquire)
                .and_then(|mut stmt| {
                    stmt.query_row(
                        named_params! {
                            ":key": key.as_str(),
                            ":token": token,
                            ":owner": owner,
                            ":wall_now": now.wall,
                            ":ttl": ttl.as_micros(),
                            ":clock": clock.id(),
                            ":now": now.lease,
                            ":mode": mode,
                            ":ticket": brought,
                        },
                        |row| row.get(0),
                    )
                    .optional()
                })
                .map_err(&map)?;
            if let Some(fence) = fence {
                return Ok(WaiterAnswer {
                    outcome: AcquireOutcome::Acquired {
                        fence: Fence::new(fence),
                        server_time: clock.as_system_time(now),
                    },
                    ticket: None,
                });
            }
            // Refused: nothing was written. Report the holder's remaining lease,
            // or what is left of another ticket's turn.
            let (fence, row_clock, lease_end, expires_at, freed_at, next, head, _): Holder = tx
                .prepare_cached(&sql.holder)
                .and_then(|mut stmt| {
                    stmt.query_row(named_params! { ":key": key.as_str() }, holder_row)
                })
                .map_err(&map)?;
            let live = lease_end.and_then(|end| remaining(&row_clock, end, expires_at, clock, now));
            // The acquire statement's SERVING, for the row as it is.
            let free_at = lease_end.or(freed_at).filter(|_| row_clock == clock.id());
            let serving = match (live, free_at) {
                (Some(_), _) => head,
                (None, Some(at)) => {
                    let since = u64::try_from(now.lease - at).unwrap_or(0);
                    let served = line::serving(
                        u64::try_from(head).unwrap_or(0),
                        Duration::from_micros(since),
                        line::TURN,
                    );
                    i64::try_from(served).unwrap_or(i64::MAX)
                }
                (None, None) => next,
            };
            let remaining = match (live, free_at) {
                (Some(left), _) => Some(left),
                (None, Some(at)) if serving < next => {
                    let turn_ends = at + (serving - head + 1) * TURN_US;
                    Some(Duration::from_micros(
                        u64::try_from(turn_ends - now.lease).unwrap_or(0),
                    ))
                }
                (None, _) if fence == MAX_FENCE => {
                    return Err(Error::permanent(
                        format!("the fence of lock {key} is exhausted"),
                        std::io::Error::other("fence at i64::MAX"),
                    ));
                }
                (None, _) => {
                    return Err(Error::permanent(
                        format!("acquire of {key} was refused although the lease is not live"),
                        std::io::Error::other("inconsistent acquire result"),
                    ));
                }
            };
            let running = live.is_none() && serving < next;
            let ticket = match brought {
                _ if mode == MODE_PLAIN => None,
                Some(t) if t >= serving && t < next => Some(t),
                _ => Some(
                    tx.prepare_cached(&sql.ticket)
                        .and_then(|mut stmt| {
                            stmt.query_row(named_params! { ":key": key.as_str() }, |row| {
                                row.get::<_, i64>(0)
                            })
                        })
                        .map_err(&map)?,
                ),
            };
            Ok(WaiterAnswer {
                outcome: AcquireOutcome::Held { remaining },
                ticket: ticket.map(|number| Ticket {
                    number: u64::try_from(number).unwrap_or(0),
                    // Releases before its turn: less one whose turn runs now
                    // on the free key (that one takes it without a release).
                    ahead: u64::try_from(number - serving - i64::from(running)).unwrap_or(0),
                }),
            })
        })
        .await
    }
}

#[async_trait]
impl LockBackend for SqliteBackend {
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

    async fn try_acquire_as_waiter(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Place,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        let answer = self
            .acquire(key, token, ttl, owner, Some(place), not_after)
            .await?;
        if matches!(answer.outcome, AcquireOutcome::Held { .. }) && self.listen(key).await {
            // We listen for this key's releases only from now on: one
            // committed since the refusal's read sent us nothing. Look once
            // more (with the ticket just taken), rather than sleep through it.
            let place = Place {
                ticket: answer.ticket.map(|t| t.number).or(place.ticket),
                ..place
            };
            // If that look fails, the first answer stands (with its ticket,
            // which the next try brings).
            return Ok(self
                .acquire(key, token, ttl, owner, Some(place), not_after)
                .await
                .unwrap_or(answer));
        }
        Ok(answer)
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let map = self.map();
        let (key, token) = (key.clone(), token.to_string());
        self.write(Some(not_after), move |tx, sql, clock, now| {
            let changed = tx
                .prepare_cached(&sql.extend)
                .and_then(|mut stmt| {
                    stmt.execute(named_params! {
                        ":key": key.as_str(),
                        ":token": token,
                        ":wall_now": now.wall,
                        ":ttl": ttl.as_micros(),
                        ":clock": clock.id(),
                        ":now": now.lease,
                    })
                })
                .map_err(&map)?;
            match changed {
                1 => Ok(clock.as_system_time(now)),
                _ => Err(Error::NotHeld { key }),
            }
        })
        .await
    }

    /// One `BEGIN IMMEDIATE` transaction for the whole batch, with one clock
    /// reading and one check of `not_after`: each lease gets the single
    /// extend's statement and guard.
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let map = self.map();
        let leases: Vec<(LockKey, String)> = leases
            .iter()
            .map(|(key, token)| (key.clone(), token.to_string()))
            .collect();
        self.write(Some(not_after), move |tx, sql, clock, now| {
            let server_time = clock.as_system_time(now);
            let mut stmt = tx.prepare_cached(&sql.extend).map_err(&map)?;
            let mut results = Vec::with_capacity(leases.len());
            for (key, token) in leases {
                let changed = stmt
                    .execute(named_params! {
                        ":key": key.as_str(),
                        ":token": token,
                        ":wall_now": now.wall,
                        ":ttl": ttl.as_micros(),
                        ":clock": clock.id(),
                        ":now": now.lease,
                    })
                    .map_err(&map)?;
                results.push(match changed {
                    1 => Ok(server_time),
                    _ => Err(Error::NotHeld { key }),
                });
            }
            Ok(results)
        })
        .await
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let map = self.map();
        let (owned_key, token) = (key.clone(), token.to_string());
        let in_line = self
            .write(Some(not_after), move |tx, sql, clock, now| {
                let released: Option<bool> = tx
                    .prepare_cached(&sql.release)
                    .and_then(|mut stmt| {
                        stmt.query_row(
                            named_params! {
                                ":key": owned_key.as_str(),
                                ":token": token,
                                ":clock": clock.id(),
                                ":wall_now": now.wall,
                                ":now": now.lease,
                            },
                            |row| row.get(0),
                        )
                        .optional()
                    })
                    .map_err(&map)?;
                released.ok_or(Error::NotHeld { key: owned_key })
            })
            .await?;
        // Committed: wake this process's waiters now instead of at their next
        // poll, and other processes' if someone is in line.
        self.notifier.notify(key);
        if in_line {
            self.wake.released_later(key);
        }
        Ok(())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let map = self.map();
        let key = key.clone();
        self.read(move |conn, sql, clock| {
            let row = conn
                .prepare_cached(&sql.inspect)
                .and_then(|mut stmt| {
                    stmt.query_row(named_params! { ":key": key.as_str() }, Row::from_sql)
                        .optional()
                })
                .map_err(&map)?;
            let now = clock.now();
            row.map(|row| row.into_info(clock, now)).transpose()
        })
        .await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let map = self.map();
        self.read(move |conn, sql, clock| {
            let rows = conn
                .prepare_cached(&sql.list)
                .and_then(|mut stmt| {
                    stmt.query_map([], Row::from_sql)?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(&map)?;
            let now = clock.now();
            rows.into_iter()
                .map(|row| row.into_info(clock, now))
                .collect()
        })
        .await
    }

    async fn create_table(&self) -> Result<()> {
        let map = self.map();
        let (table, upgrades) = (
            self.table.name().to_owned(),
            self.statements.line_columns.clone(),
        );
        self.write(None, move |tx, sql, _, _| {
            tx.execute_batch(&sql.create_table).map_err(&map)?;
            // A table made by an earlier version: add the line's columns it
            // lacks (in this same transaction, so concurrent callers add each
            // once).
            let present: Vec<String> = tx
                .prepare(crate::sql::COLUMNS)
                .and_then(|mut stmt| {
                    stmt.query_map([&table], |row| row.get(0))?
                        .collect::<rusqlite::Result<Vec<String>>>()
                })
                .map_err(&map)?;
            for (column, alter) in &upgrades {
                if !present.iter().any(|p| p == column) {
                    tx.execute_batch(alter).map_err(&map)?;
                }
            }
            Ok(())
        })
        .await
    }

    fn schema_sql(&self) -> String {
        self.statements.create_table.clone()
    }

    /// Every call is a job on the one connection thread, run in the order
    /// sent: a dropped acquire's job still runs, and a release sent after the
    /// drop runs after it.
    fn settles_dropped_acquires(&self) -> bool {
        true
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.notifier)
    }
}
