//! What every measured client does, whatever the backend: the [`Cycle`] of
//! scenarios 1 and 4 and the [`Waiter`] of scenario 2, for the library itself.

use std::sync::Arc;

use async_trait::async_trait;
use distrlock_core::{Lock, LockBackend, LockGuard, LockManager};

/// One client of the uncontended scenario: try-acquire then release a key.
#[async_trait]
pub(crate) trait Cycle: Send {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()>;
}

/// One client of the contended scenario: wait for the key, then let it go.
#[async_trait]
pub(crate) trait Waiter: Send {
    async fn lock(&mut self) -> anyhow::Result<()>;
    async fn unlock(&mut self) -> anyhow::Result<()>;
}

/// The library's cycle: `Lock::try_acquire`, then `LockGuard::release`, with
/// the manager's defaults (30 s ttl, heartbeat on).
pub(crate) struct LibraryCycle {
    manager: LockManager,
}

impl LibraryCycle {
    pub(crate) fn new(backend: Arc<dyn LockBackend>) -> anyhow::Result<Self> {
        Ok(Self {
            manager: LockManager::builder(backend)
                .owner("distrlock-bench")
                .build()?,
        })
    }
}

#[async_trait]
impl Cycle for LibraryCycle {
    async fn cycle(&mut self, key: &str) -> anyhow::Result<()> {
        let guard = self.manager.lock(key)?.try_acquire().await?;
        guard.release().await?;
        Ok(())
    }
}

/// The library's waiter: `Lock::acquire` (waiting per the default retry policy,
/// woken by release notifications where the backend has them).
pub(crate) struct LibraryWaiter {
    lock: Lock,
    guard: Option<LockGuard>,
}

impl LibraryWaiter {
    /// A waiter on `key`, fair (served in the key's line) or not.
    pub(crate) fn new(
        backend: Arc<dyn LockBackend>,
        key: &str,
        fair: bool,
    ) -> anyhow::Result<Self> {
        let manager = LockManager::builder(backend)
            .owner("distrlock-bench")
            .fair(fair)
            .build()?;
        Ok(Self {
            lock: manager.lock(key)?,
            guard: None,
        })
    }
}

#[async_trait]
impl Waiter for LibraryWaiter {
    async fn lock(&mut self) -> anyhow::Result<()> {
        self.guard = Some(self.lock.acquire().await?);
        Ok(())
    }

    async fn unlock(&mut self) -> anyhow::Result<()> {
        if let Some(guard) = self.guard.take() {
            guard.release().await?;
        }
        Ok(())
    }
}

/// Counts the renewal calls that reach an embedded backend (which has no server
/// to count them): each `extend` is one transaction of one statement, each
/// `extend_many` one transaction of one statement per lease.
#[derive(Debug)]
pub(crate) struct CountingBackend {
    pub(crate) inner: Arc<dyn LockBackend>,
    pub(crate) transactions: std::sync::atomic::AtomicU64,
    pub(crate) statements: std::sync::atomic::AtomicU64,
}

impl CountingBackend {
    pub(crate) fn new(inner: Arc<dyn LockBackend>) -> Self {
        Self {
            inner,
            transactions: 0.into(),
            statements: 0.into(),
        }
    }

    fn count(&self, statements: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.transactions.fetch_add(1, Relaxed);
        self.statements.fetch_add(statements as u64, Relaxed);
    }
}

#[async_trait]
impl LockBackend for CountingBackend {
    async fn try_acquire(
        &self,
        key: &distrlock_core::LockKey,
        token: &distrlock_core::Token,
        ttl: distrlock_core::Ttl,
        owner: &str,
        not_after: tokio::time::Instant,
    ) -> distrlock_core::Result<distrlock_core::AcquireOutcome> {
        self.count(1);
        self.inner
            .try_acquire(key, token, ttl, owner, not_after)
            .await
    }
    async fn try_acquire_as_waiter(
        &self,
        key: &distrlock_core::LockKey,
        token: &distrlock_core::Token,
        ttl: distrlock_core::Ttl,
        owner: &str,
        place: distrlock_core::Place,
        not_after: tokio::time::Instant,
    ) -> distrlock_core::Result<distrlock_core::WaiterAnswer> {
        self.count(1);
        self.inner
            .try_acquire_as_waiter(key, token, ttl, owner, place, not_after)
            .await
    }
    async fn extend(
        &self,
        key: &distrlock_core::LockKey,
        token: &distrlock_core::Token,
        ttl: distrlock_core::Ttl,
        not_after: tokio::time::Instant,
    ) -> distrlock_core::Result<std::time::SystemTime> {
        self.count(1);
        self.inner.extend(key, token, ttl, not_after).await
    }
    async fn extend_many(
        &self,
        leases: &[(distrlock_core::LockKey, distrlock_core::Token)],
        ttl: distrlock_core::Ttl,
        not_after: tokio::time::Instant,
    ) -> distrlock_core::Result<Vec<distrlock_core::Result<std::time::SystemTime>>> {
        self.count(leases.len());
        self.inner.extend_many(leases, ttl, not_after).await
    }
    async fn release(
        &self,
        key: &distrlock_core::LockKey,
        token: &distrlock_core::Token,
        not_after: tokio::time::Instant,
    ) -> distrlock_core::Result<()> {
        self.count(1);
        self.inner.release(key, token, not_after).await
    }
    async fn inspect(
        &self,
        key: &distrlock_core::LockKey,
    ) -> distrlock_core::Result<Option<distrlock_core::LockInfo>> {
        self.inner.inspect(key).await
    }
    async fn list(&self) -> distrlock_core::Result<Vec<distrlock_core::LockInfo>> {
        self.inner.list().await
    }
    async fn create_table(&self) -> distrlock_core::Result<()> {
        self.inner.create_table().await
    }
    fn schema_sql(&self) -> String {
        self.inner.schema_sql()
    }
    /// Counting adds nothing a dropped call could leave half done.
    fn settles_dropped_acquires(&self) -> bool {
        self.inner.settles_dropped_acquires()
    }
    fn release_notifier(&self) -> Option<&distrlock_core::ReleaseNotifier> {
        self.inner.release_notifier()
    }
}
