//! [`Lock`]: a handle on one key, with try-acquire and waiting acquire.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::backend::{AcquireOutcome, LockBackend};
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::key::LockKey;
use crate::manager::LockManager;
use crate::token::Token;
use crate::ttl::Ttl;

/// A handle on the lock named by one key, made by [`LockManager::lock`].
///
/// Creating it sends nothing. Each acquire returns a [`LockGuard`] that holds the
/// lock until it is released, dropped or lost.
#[derive(Debug, Clone)]
pub struct Lock {
    manager: LockManager,
    key: LockKey,
    ttl: Ttl,
    token: Option<Token>,
}

impl Lock {
    pub(crate) fn new(manager: LockManager, key: LockKey) -> Self {
        let ttl = manager.inner.ttl;
        Self {
            manager,
            key,
            ttl,
            token: None,
        }
    }

    /// The key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// The lease length this lock asks for.
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    /// Uses `ttl` instead of the manager's default.
    ///
    /// Returns [`Error::InvalidTtl`] when out of range, or [`Error::InvalidConfig`]
    /// when it leaves no room for the manager's heartbeat interval and margin.
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self> {
        let ttl = Ttl::new(ttl)?;
        self.manager.inner.check_ttl(ttl)?;
        self.ttl = ttl;
        Ok(self)
    }

    /// Acquires with this fixed token instead of a fresh random one each time (the
    /// Go original's static token). Acquiring again while this token holds the
    /// lock succeeds and keeps the fence.
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// Tries once. Returns [`Error::HeldByOther`], with the holder's remaining lease
    /// when known, if another token holds the lock.
    pub async fn try_acquire(&self) -> Result<LockGuard> {
        let mut attempt = Attempt::new(self);
        let sent = Instant::now();
        match attempt.try_once().await? {
            AcquireOutcome::Acquired { fence } => Ok(attempt.into_guard(fence, sent)),
            AcquireOutcome::Held { remaining } => Err(Error::HeldByOther {
                key: self.key.clone(),
                remaining,
            }),
        }
    }

    /// Waits until acquired, within the manager's [`RetryPolicy`](crate::RetryPolicy)
    /// deadline if it has one (else without limit).
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.acquire_until(self.manager.inner.retry.deadline())
            .await
    }

    /// Waits at most `timeout`, then returns [`Error::Timeout`]. A zero timeout
    /// tries exactly once.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        self.acquire_until(Some(timeout)).await
    }

    async fn acquire_until(&self, timeout: Option<Duration>) -> Result<LockGuard> {
        let config = &self.manager.inner;
        let started = Instant::now();
        let deadline = timeout.map(|t| started + t);
        let mut attempt = Attempt::new(self);
        let mut tries: u32 = 0;
        loop {
            // Subscribe before trying, so a release between the try and the sleep
            // still wakes us.
            let mut released = config.backend.release_notifier().map(|n| n.subscribe());
            let sent = Instant::now();
            let remaining = match attempt.try_once_bounded(deadline).await {
                Ok(AcquireOutcome::Acquired { fence }) => {
                    return Ok(attempt.into_guard(fence, sent));
                }
                Ok(AcquireOutcome::Held { remaining }) => remaining,
                Err(error) if error.is_transient() => {
                    tracing::debug!(key = %self.key, %error, "acquire failed transiently; retrying");
                    None
                }
                Err(error) => return Err(error),
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout {
                    key: self.key.clone(),
                    waited: now - started,
                });
            }
            let mut wake = now + config.retry.delay(tries, remaining);
            if let Some(deadline) = deadline {
                wake = wake.min(deadline);
            }
            tries = tries.saturating_add(1);
            match released.as_mut() {
                Some(subscription) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(wake) => {}
                        () = subscription.released(&self.key) => {
                            tracing::trace!(key = %self.key, "woken by a release notification");
                        }
                    }
                }
                None => tokio::time::sleep_until(wake).await,
            }
        }
    }
}

/// One acquire call: its token, and what must be cleaned up if it is abandoned.
///
/// Once a request has been sent, the server may have granted the lease even if we
/// never see the answer (the future was dropped, or the call timed out). Until the
/// attempt either turns into a guard or gets a definite refusal, dropping it
/// releases the token's lease in the background, so a cancelled acquire never
/// leaves behind a lock its process does not know it holds.
///
/// A fixed token ([`Lock::with_token`]) may be shared with a live guard, so an
/// abandoned attempt with one is left to expire instead.
struct Attempt<'a> {
    lock: &'a Lock,
    token: Token,
    maybe_granted: bool,
}

impl<'a> Attempt<'a> {
    fn new(lock: &'a Lock) -> Self {
        Self {
            lock,
            token: lock.token.unwrap_or_default(),
            maybe_granted: false,
        }
    }

    fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.lock.manager.inner.backend
    }

    async fn try_once(&mut self) -> Result<AcquireOutcome> {
        self.try_once_bounded(None).await
    }

    /// One try, bounded by the call timeout and by `deadline` (but always given at
    /// least a short time, so a zero timeout still gets its one try).
    async fn try_once_bounded(&mut self, deadline: Option<Instant>) -> Result<AcquireOutcome> {
        let config = &self.lock.manager.inner;
        let mut limit = Instant::now() + config.call_timeout;
        if let Some(deadline) = deadline {
            limit = limit.min(deadline.max(Instant::now() + Duration::from_millis(250)));
        }
        let lock = self.lock;
        self.maybe_granted = lock.token.is_none();
        let call = self
            .backend()
            .try_acquire(&lock.key, &self.token, lock.ttl, &config.owner);
        match tokio::time::timeout_at(limit, call).await {
            Ok(Ok(outcome)) => {
                self.maybe_granted &= matches!(outcome, AcquireOutcome::Acquired { .. });
                Ok(outcome)
            }
            // A transient error may hide a grant; a permanent one did not grant.
            Ok(Err(error)) => {
                self.maybe_granted &= error.is_transient();
                Err(error)
            }
            Err(_) => Err(Error::unavailable(
                format!("acquire of {} did not answer in time", lock.key),
                None,
            )),
        }
    }

    fn into_guard(mut self, fence: crate::Fence, sent: Instant) -> LockGuard {
        self.maybe_granted = false;
        let lock = self.lock;
        tracing::debug!(key = %lock.key, fence = %fence, "lock acquired");
        LockGuard::start(
            lock.manager.inner.clone(),
            lock.key.clone(),
            self.token,
            fence,
            lock.ttl,
            sent,
        )
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.maybe_granted {
            crate::guard::release_in_background(
                self.backend().clone(),
                self.lock.key.clone(),
                self.token,
                self.lock.manager.inner.call_timeout,
            );
        }
    }
}
