//! [`DelayedBackend`]: a wrapper that delays every answer of a real backend.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, LockBackend, LockInfo, LockKey, ReleaseNotifier, Result, Token, Ttl,
};
use tokio::time::Instant;

/// Forwards every call to a real backend, then waits `delay` before returning the
/// answer, like a slow network on the way back.
///
/// Dropping a call during that wait is the hard case for cancel safety: the
/// backend has already acted (say, granted a lease) but the caller never learns
/// of it.
#[derive(Debug, Clone)]
pub struct DelayedBackend {
    inner: Arc<dyn LockBackend>,
    delay: Duration,
}

impl DelayedBackend {
    /// Wraps `inner`, delaying each answer by `delay`.
    pub fn new(inner: Arc<dyn LockBackend>, delay: Duration) -> Self {
        Self { inner, delay }
    }
}

#[async_trait]
impl LockBackend for DelayedBackend {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let answer = self
            .inner
            .try_acquire(key, token, ttl, owner, not_after)
            .await;
        tokio::time::sleep(self.delay).await;
        answer
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let answer = self.inner.extend(key, token, ttl, not_after).await;
        tokio::time::sleep(self.delay).await;
        answer
    }

    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let answer = self.inner.extend_many(leases, ttl, not_after).await;
        tokio::time::sleep(self.delay).await;
        answer
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let answer = self.inner.release(key, token, not_after).await;
        tokio::time::sleep(self.delay).await;
        answer
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

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        self.inner.release_notifier()
    }
}
