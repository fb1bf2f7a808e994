//! Backends with a broken line of waiters (contract item 14): the in-memory
//! backend behind a wrapper that breaks one thing about the line.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, LockBackend, LockInfo, LockKey, MemoryBackend, Place, ReleaseNotifier, Result,
    Token, Ttl, WaiterAnswer,
};
use distrlock_testkit::{Harness, Setup, Skip};
use tokio::time::Instant;

/// What the wrapper breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineBug {
    /// Nothing: the in-memory backend's line as it is.
    None,
    /// No line at all: waiters are told nothing and served in no order (the
    /// trait's default `try_acquire_as_waiter`).
    NoLine,
    /// Tickets are handed out, but a free key goes to whoever asks first (every
    /// waiter treated as unfair).
    IgnoresTurns,
}

#[derive(Debug)]
struct Broken {
    inner: Arc<MemoryBackend>,
    bug: LineBug,
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl LockBackend for Broken {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let place = Place {
            ticket: None,
            fair: false,
        };
        match self.bug {
            // Plain tries that ignore the line too.
            LineBug::IgnoresTurns => Ok(self
                .inner
                .try_acquire_as_waiter(key, token, ttl, owner, place, not_after)
                .await?
                .outcome),
            _ => {
                self.inner
                    .try_acquire(key, token, ttl, owner, not_after)
                    .await
            }
        }
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
        match self.bug {
            LineBug::None => {
                self.inner
                    .try_acquire_as_waiter(key, token, ttl, owner, place, not_after)
                    .await
            }
            LineBug::NoLine => Ok(WaiterAnswer {
                outcome: self
                    .inner
                    .try_acquire(key, token, ttl, owner, not_after)
                    .await?,
                ticket: None,
            }),
            LineBug::IgnoresTurns => {
                let unfair = Place {
                    fair: false,
                    ..place
                };
                self.inner
                    .try_acquire_as_waiter(key, token, ttl, owner, unfair, not_after)
                    .await
            }
        }
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        self.inner.extend(key, token, ttl, not_after).await
    }

    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        self.inner.extend_many(leases, ttl, not_after).await
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        self.inner.release(key, token, not_after).await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.inner.inspect(key).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.inner.list().await
    }

    async fn create_table(&self) -> Result<()> {
        self.inner.create_table().await
    }

    fn schema_sql(&self) -> String {
        self.inner.schema_sql()
    }

    fn settles_dropped_acquires(&self) -> bool {
        self.inner.settles_dropped_acquires()
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        self.inner.release_notifier()
    }
}

/// The in-memory backend with `LineBug`.
#[derive(Debug, Clone, Copy)]
pub struct LineHarness(pub LineBug);

#[async_trait]
impl Harness for LineHarness {
    async fn setup(&self) -> std::result::Result<Setup, Skip> {
        let backend = Arc::new(Broken {
            inner: Arc::new(MemoryBackend::new()),
            bug: self.0,
        });
        Ok(Setup::new(backend).with_latency_budget(Duration::from_millis(100)))
    }
}
