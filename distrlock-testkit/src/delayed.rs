//! [`DelayedBackend`]: a wrapper that delays the calls of a real backend, and
//! [`DelayedHarness`], which runs a harness's setups through it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, LockBackend, LockInfo, LockKey, Place, ReleaseNotifier, Result, Token, Ttl,
    WaiterAnswer,
};
use tokio::time::Instant;

use crate::harness::{Harness, Setup, Skip};

/// Forwards every call to a real backend, and delays it.
///
/// [`new`](Self::new) delays only the answers of the mutating calls, like a slow
/// network on the way back: dropping a call during that wait is the hard case
/// for cancel safety, since the backend has already acted (say, granted a
/// lease) but the caller never learns of it.
///
/// [`round_trip`](Self::round_trip) makes every call, `inspect`, `list` and
/// `create_table` included, take `delay` more: half on the way to the backend,
/// half on the way back, like a database far away.
#[derive(Debug, Clone)]
pub struct DelayedBackend {
    inner: Arc<dyn LockBackend>,
    /// Before the call reaches `inner`.
    there: Duration,
    /// After `inner` answered.
    back: Duration,
    /// Whether `inspect`, `list` and `create_table` are delayed too.
    all_calls: bool,
}

impl DelayedBackend {
    /// Wraps `inner`, delaying each answer of `try_acquire`, `extend`,
    /// `extend_many` and `release` by `delay`.
    pub fn new(inner: Arc<dyn LockBackend>, delay: Duration) -> Self {
        Self {
            inner,
            there: Duration::ZERO,
            back: delay,
            all_calls: false,
        }
    }

    /// Wraps `inner`, making every call take `delay` longer: `delay / 2` before it
    /// reaches `inner`, the rest after `inner` answered.
    pub fn round_trip(inner: Arc<dyn LockBackend>, delay: Duration) -> Self {
        Self {
            inner,
            there: delay / 2,
            back: delay - delay / 2,
            all_calls: true,
        }
    }

    async fn mutating<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        tokio::time::sleep(self.there).await;
        let answer = call.await;
        tokio::time::sleep(self.back).await;
        answer
    }

    async fn reading<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        if self.all_calls {
            self.mutating(call).await
        } else {
            call.await
        }
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
        self.mutating(self.inner.try_acquire(key, token, ttl, owner, not_after))
            .await
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
        self.mutating(
            self.inner
                .try_acquire_as_waiter(key, token, ttl, owner, place, not_after),
        )
        .await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        self.mutating(self.inner.extend(key, token, ttl, not_after))
            .await
    }

    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        self.mutating(self.inner.extend_many(leases, ttl, not_after))
            .await
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        self.mutating(self.inner.release(key, token, not_after))
            .await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.reading(self.inner.inspect(key)).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.reading(self.inner.list()).await
    }

    async fn create_table(&self) -> Result<()> {
        self.reading(self.inner.create_table()).await
    }

    fn schema_sql(&self) -> String {
        self.inner.schema_sql()
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        self.inner.release_notifier()
    }
}

/// Runs the setups of another harness through a [`DelayedBackend::round_trip`]
/// of `delay`, and adds `delay` and a quarter (for the two timers a call now
/// waits on) to their latency budget and fault timeout: the whole suite then runs
/// as against a database `delay` away. The fault hooks are the inner harness's.
///
/// ```
/// use std::time::Duration;
/// use distrlock_testkit::{DelayedHarness, MemoryHarness};
///
/// // Every call of the memory backend takes 200 ms more.
/// let slow = DelayedHarness::new(MemoryHarness, Duration::from_millis(200));
/// # let _ = slow;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct DelayedHarness<H> {
    inner: H,
    delay: Duration,
}

impl<H> DelayedHarness<H> {
    /// `inner`'s setups, with every call `delay` slower.
    pub fn new(inner: H, delay: Duration) -> Self {
        Self { inner, delay }
    }
}

#[async_trait]
impl<H: Harness> Harness for DelayedHarness<H> {
    async fn setup(&self) -> std::result::Result<Setup, Skip> {
        let mut setup = self.inner.setup().await?;
        setup.backend = Arc::new(DelayedBackend::round_trip(
            setup.backend.clone(),
            self.delay,
        ));
        let slower = self.delay + self.delay / 4;
        let budget = setup.latency_budget() + slower;
        let fault_timeout = setup.fault_timeout() + slower;
        Ok(setup
            .with_latency_budget(budget)
            .with_fault_timeout(fault_timeout))
    }
}
