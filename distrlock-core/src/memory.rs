//! [`MemoryBackend`]: an in-process reference backend with real ttl semantics.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::backend::{AcquireOutcome, LockBackend, LockInfo, LockState};
use crate::error::{Error, Result};
use crate::fence::Fence;
use crate::key::LockKey;
use crate::line::{self, Place, Ticket, WaiterAnswer};
use crate::notify::ReleaseNotifier;
use crate::owner::Owner;
use crate::token::Token;
use crate::ttl::Ttl;

/// Locks kept in this process's memory, with the same semantics as the SQL
/// backends: leases expire on a clock (tokio's, so paused-clock tests work),
/// fences grow per key, rows stay after release, releases are announced.
///
/// Use it in unit tests of code that takes locks, and as the reference the
/// conformance suite is checked against. It coordinates only the tasks of one
/// process.
///
/// [`set_unreachable`](Self::set_unreachable) simulates a database that stops
/// answering: every call stalls until it is reachable again.
#[derive(Debug)]
pub struct MemoryBackend {
    rows: Mutex<BTreeMap<LockKey, Row>>,
    notifier: ReleaseNotifier,
    reachable: watch::Sender<bool>,
    /// The backend's "server clock": wall-clock time at creation, advanced by
    /// tokio's clock, so that readings and expiries follow paused-clock tests.
    epoch: (Instant, SystemTime),
}

#[derive(Debug, Clone)]
struct Row {
    token: Token,
    fence: Fence,
    owner: String,
    acquired_at: SystemTime,
    /// `None` once released.
    expires: Option<(Instant, SystemTime)>,
    /// When the last holding was released (`expires` is then `None`).
    released: Option<Instant>,
    /// The key's line (contract item 14): the next ticket to hand out, and the
    /// first ticket not yet served when the key became free.
    next: u64,
    head: u64,
}

impl Row {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_some_and(|(at, _)| at > now)
    }

    /// The instant the key became (or becomes) free: its release, or its
    /// lease's end.
    fn free_at(&self) -> Instant {
        self.expires
            .map(|(at, _)| at)
            .or(self.released)
            .unwrap_or_else(Instant::now)
    }

    /// The ticket whose turn it is at `now` (the line's head while held).
    fn serving(&self, now: Instant) -> u64 {
        if self.live(now) {
            self.head
        } else {
            line::serving(
                self.head,
                now.saturating_duration_since(self.free_at()),
                line::TURN,
            )
        }
    }

    /// The caller's ticket after a refusal at `now`: the one it brought if
    /// still in line, else a new one at the back.
    fn ticket(&mut self, now: Instant, brought: Option<u64>) -> Ticket {
        let serving = self.serving(now);
        let number = match brought {
            Some(t) if t >= serving && t < self.next => t,
            _ => {
                self.next += 1;
                self.next - 1
            }
        };
        // A ticket whose turn runs now takes the free key without a release:
        // it is not one to wait out.
        let running = u64::from(!self.live(now) && serving < self.next && serving < number);
        Ticket {
            number,
            ahead: number.saturating_sub(serving).saturating_sub(running),
        }
    }

    fn info(&self, key: &LockKey, now: Instant) -> LockInfo {
        let (state, remaining) = match self.expires {
            None => (LockState::Released, None),
            Some((at, _)) if at > now => (LockState::Held, Some(at - now)),
            Some(_) => (LockState::Expired, None),
        };
        LockInfo {
            key: key.clone(),
            owner: self.owner.clone(),
            fence: self.fence,
            acquired_at: self.acquired_at,
            expires_at: self.expires.map(|(_, at)| at),
            state,
            remaining,
        }
    }
}

impl MemoryBackend {
    /// An empty backend.
    pub fn new() -> Self {
        let (reachable, _) = watch::channel(true);
        // Every release happens in this process, and each is announced.
        let notifier = ReleaseNotifier::new();
        notifier.set_complete(true);
        Self {
            rows: Mutex::new(BTreeMap::new()),
            notifier,
            reachable,
            epoch: (Instant::now(), SystemTime::now()),
        }
    }

    /// The backend clock's reading at `now`.
    fn clock(&self, now: Instant) -> SystemTime {
        self.epoch.1 + now.saturating_duration_since(self.epoch.0)
    }

    /// Waits until reachable, then reads the clock; refuses a call that would
    /// take effect after its `not_after` (contract item 8), as a stalled request
    /// that is delivered once the network heals must.
    async fn arrive(&self, not_after: Instant, what: &str, key: &LockKey) -> Result<Instant> {
        self.reachable().await;
        let now = Instant::now();
        if now > not_after {
            return Err(Error::unavailable(
                format!("{what} of {key} arrived after its not_after bound; nothing changed"),
                None,
            ));
        }
        Ok(now)
    }

    /// Makes every call stall (`false`) until reachable again (`true`), as a
    /// database behind a broken network would.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.reachable.send_replace(!unreachable);
    }

    async fn reachable(&self) {
        let mut rx = self.reachable.subscribe();
        // The sender lives as long as `self`, so this only waits for `true`.
        let _ = rx.wait_for(|reachable| *reachable).await;
    }

    /// A try-acquire, by a waiter at `place` or (`None`) a plain try.
    async fn acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Option<Place>,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        Owner::new(owner)?;
        let now = self.arrive(not_after, "acquire", key).await?;
        let server_time = self.clock(now);
        let expires = Some((now + ttl.get(), server_time + ttl.get()));
        let mut rows = self.rows();
        let granted = |fence| WaiterAnswer {
            outcome: AcquireOutcome::Acquired { fence, server_time },
            ticket: None,
        };
        let Some(row) = rows.get_mut(key) else {
            rows.insert(
                key.clone(),
                Row {
                    token: *token,
                    fence: Fence::new(1),
                    owner: owner.to_owned(),
                    acquired_at: server_time,
                    expires,
                    released: None,
                    next: 0,
                    head: 0,
                },
            );
            return Ok(granted(Fence::new(1)));
        };
        if row.live(now) && row.token == *token {
            // The same holding, retried: renew it, line untouched.
            row.expires = expires;
            row.owner = owner.to_owned();
            return Ok(granted(row.fence));
        }
        let refuse = |row: &mut Row, remaining| WaiterAnswer {
            outcome: AcquireOutcome::Held { remaining },
            ticket: place.map(|p| row.ticket(now, p.ticket)),
        };
        if row.live(now) {
            let remaining = row.expires.map(|(at, _)| at - now);
            return Ok(refuse(row, remaining));
        }
        // Free: in turn, or the line is empty, or an unfair waiter.
        let serving = row.serving(now);
        let empty = serving >= row.next;
        let in_turn = !empty && place.and_then(|p| p.ticket) == Some(serving);
        let unfair = place.is_some_and(|p| !p.fair);
        if !(empty || in_turn || unfair) {
            // The turn of ticket `serving` ends (serving - head + 1) turns
            // after the key became free.
            let turns = u32::try_from(serving - row.head + 1).unwrap_or(u32::MAX);
            let turn_ends = row.free_at() + line::TURN.saturating_mul(turns);
            return Ok(refuse(row, Some(turn_ends.saturating_duration_since(now))));
        }
        let fence = Fence::new(row.fence.get().checked_add(1).ok_or_else(|| {
            Error::backend(format!("fence of {key} is exhausted (at i64::MAX)"), false)
        })?);
        // Past the caller's ticket if it is in line (in turn, or an unfair
        // waiter out of turn, so that unfair grants leave no turns behind).
        let brought = place
            .and_then(|p| p.ticket)
            .filter(|&t| t >= serving && t < row.next);
        row.head = match brought {
            _ if empty => row.next,
            Some(t) => t + 1,
            None => serving,
        };
        row.token = *token;
        row.fence = fence;
        row.owner = owner.to_owned();
        row.acquired_at = server_time;
        row.expires = expires;
        row.released = None;
        Ok(granted(fence))
    }

    fn rows(&self) -> std::sync::MutexGuard<'_, BTreeMap<LockKey, Row>> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl LockBackend for MemoryBackend {
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
        let now = self.arrive(not_after, "extend", key).await?;
        let server_time = self.clock(now);
        match self.rows().get_mut(key) {
            Some(row) if row.live(now) && row.token == *token => {
                row.expires = Some((now + ttl.get(), server_time + ttl.get()));
                Ok(server_time)
            }
            _ => Err(Error::NotHeld { key: key.clone() }),
        }
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let now = self.arrive(not_after, "release", key).await?;
        match self.rows().get_mut(key) {
            Some(row) if row.live(now) && row.token == *token => {
                row.expires = None;
                row.released = Some(now);
            }
            _ => return Err(Error::NotHeld { key: key.clone() }),
        }
        self.notifier.notify(key);
        Ok(())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.reachable().await;
        let now = Instant::now();
        Ok(self.rows().get(key).map(|row| row.info(key, now)))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.reachable().await;
        let now = Instant::now();
        Ok(self
            .rows()
            .iter()
            .map(|(key, row)| row.info(key, now))
            .collect())
    }

    async fn create_table(&self) -> Result<()> {
        Ok(())
    }

    fn schema_sql(&self) -> String {
        "-- the in-memory backend has no schema\n".to_owned()
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.notifier)
    }
}
