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
}

impl Row {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_some_and(|(at, _)| at > now)
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
        Self {
            rows: Mutex::new(BTreeMap::new()),
            notifier: ReleaseNotifier::new(),
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
        Owner::new(owner)?;
        let now = self.arrive(not_after, "acquire", key).await?;
        let server_time = self.clock(now);
        let expires = Some((now + ttl.get(), server_time + ttl.get()));
        let mut rows = self.rows();
        let row = rows.get_mut(key);
        let fence = match row {
            Some(row) if row.live(now) && row.token == *token => {
                row.expires = expires;
                row.owner = owner.to_owned();
                return Ok(AcquireOutcome::Acquired {
                    fence: row.fence,
                    server_time,
                });
            }
            Some(row) if row.live(now) => {
                let remaining = row.expires.map(|(at, _)| at - now);
                return Ok(AcquireOutcome::Held { remaining });
            }
            Some(row) => Fence::new(row.fence.get().checked_add(1).ok_or_else(|| {
                Error::backend(format!("fence of {key} is exhausted (at i64::MAX)"), false)
            })?),
            None => Fence::new(1),
        };
        rows.insert(
            key.clone(),
            Row {
                token: *token,
                fence,
                owner: owner.to_owned(),
                acquired_at: server_time,
                expires,
            },
        );
        Ok(AcquireOutcome::Acquired { fence, server_time })
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
            Some(row) if row.live(now) && row.token == *token => row.expires = None,
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
