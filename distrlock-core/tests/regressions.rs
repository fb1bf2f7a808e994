//! Regression tests for bugs found in review: static tokens shared by two guards,
//! work run past the deadline, unbounded extends, cancelled releases, cleanup
//! racing an abandoned acquire, and overflowing durations. All on the paused clock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use distrlock_core::{
    AcquireOutcome, Error, ExclusiveError, LockBackend, LockInfo, LockKey, LockManager,
    MemoryBackend, Result, RetryPolicy, Token, Ttl, async_trait,
};
use tokio::time::Instant;

fn manager(backend: Arc<dyn LockBackend>, ttl: Duration) -> LockManager {
    LockManager::builder(backend).ttl(ttl).build().unwrap()
}

/// Delegates to the memory backend. `try_acquire` and `release` reach it after
/// their request latency and run even if the caller stops waiting, as on a real
/// network; `try_acquire` answers arrive `answer_delay` later still; the first
/// `hang_extends` extends never answer.
#[derive(Debug)]
struct Wire {
    inner: Arc<MemoryBackend>,
    acquire_latency: Duration,
    release_latency: Duration,
    answer_delay: Duration,
    hang_extends: AtomicUsize,
}

impl Wire {
    fn new(inner: Arc<MemoryBackend>) -> Self {
        Self {
            inner,
            acquire_latency: Duration::ZERO,
            release_latency: Duration::ZERO,
            answer_delay: Duration::ZERO,
            hang_extends: AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl LockBackend for Wire {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let (inner, key, token, owner, latency) = (
            self.inner.clone(),
            key.clone(),
            *token,
            owner.to_owned(),
            self.acquire_latency,
        );
        let answer = tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            inner
                .try_acquire(&key, &token, ttl, &owner, not_after)
                .await
        })
        .await
        .unwrap();
        tokio::time::sleep(self.answer_delay).await;
        answer
    }
    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let hang = self
            .hang_extends
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if hang {
            std::future::pending::<()>().await;
        }
        self.inner.extend(key, token, ttl, not_after).await
    }
    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let (inner, key, token, latency) = (
            self.inner.clone(),
            key.clone(),
            *token,
            self.release_latency,
        );
        tokio::spawn(async move {
            tokio::time::sleep(latency).await;
            inner.release(&key, &token, not_after).await
        })
        .await
        .unwrap()
    }
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.inner.inspect(key).await
    }
    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.inner.list().await
    }
    async fn create_table(&self) -> Result<()> {
        Ok(())
    }
    fn schema_sql(&self) -> String {
        String::new()
    }
}

#[tokio::test(start_paused = true)]
async fn one_static_token_never_has_two_live_guards() {
    let backend = Arc::new(MemoryBackend::new());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let lock = m.lock("k").unwrap().with_token(Token::new());
    let first = lock.try_acquire().await.unwrap();
    assert!(
        matches!(lock.try_acquire().await, Err(Error::HeldByOther { .. })),
        "a second guard for the same static token is refused while the first lives"
    );
    let waiting = tokio::spawn({
        let lock = lock.clone();
        async move { lock.acquire_timeout(Duration::from_secs(5)).await }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let fence = first.fence();
    drop(first);
    let second = waiting
        .await
        .unwrap()
        .expect("the waiter gets it once the first guard is gone");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_lost());
    assert!(
        second.fence() > fence,
        "released in between, so a new holding"
    );
    let intruder = m.lock("k").unwrap().try_acquire().await;
    assert!(
        matches!(intruder, Err(Error::HeldByOther { .. })),
        "the first guard's background release must not end the second guard's lease"
    );
}

#[tokio::test(start_paused = true)]
async fn a_grant_that_arrives_after_the_deadline_is_not_used() {
    let memory = Arc::new(MemoryBackend::new());
    let wire = Wire {
        answer_delay: Duration::from_millis(1500),
        ..Wire::new(memory.clone())
    };
    let slow = manager(Arc::new(wire), Duration::from_secs(1));
    let ran = Arc::new(AtomicBool::new(false));
    let result = tokio::time::timeout(Duration::from_secs(5), {
        let ran = ran.clone();
        slow.do_exclusively(
            "k",
            |_lease| async move { ran.store(true, Ordering::SeqCst) },
        )
    })
    .await;
    assert!(
        result.is_err(),
        "every grant arrives too late, so the wait goes on"
    );
    assert!(
        !ran.load(Ordering::SeqCst),
        "work must never run on a lease past its deadline"
    );
    let late = slow.lock("k").unwrap().try_acquire().await;
    assert!(
        matches!(late, Err(Error::Unavailable { .. })),
        "got {late:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hung_extend_is_bounded_by_the_call_timeout() {
    let wire = Wire {
        hang_extends: AtomicUsize::new(1),
        ..Wire::new(Arc::new(MemoryBackend::new()))
    };
    let m = LockManager::builder(Arc::new(wire))
        .ttl(Duration::from_secs(600))
        .call_timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1200)).await;
    assert!(
        !guard.is_lost(),
        "one hung extend is abandoned after 10 s and retried"
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_release_still_releases() {
    let memory = Arc::new(MemoryBackend::new());
    let m = manager(memory.clone(), Duration::from_secs(30));
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    memory.set_unreachable(true);
    let cancelled = tokio::time::timeout(Duration::from_millis(10), guard.release()).await;
    assert!(cancelled.is_err());
    memory.set_unreachable(false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let next = m.lock("k").unwrap().try_acquire().await;
    assert!(
        next.is_ok(),
        "the dropped release went on in the background: {next:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn cleanup_of_a_cancelled_acquire_waits_for_its_statement() {
    let memory = Arc::new(MemoryBackend::new());
    let wire = Wire {
        acquire_latency: Duration::from_millis(5),
        release_latency: Duration::from_millis(1),
        ..Wire::new(memory.clone())
    };
    let m = manager(Arc::new(wire), Duration::from_secs(30));
    let cancelled =
        tokio::time::timeout(Duration::from_millis(1), m.lock("k").unwrap().acquire()).await;
    assert!(
        cancelled.is_err(),
        "dropped while its statement is on the wire"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let other = manager(memory, Duration::from_secs(30))
        .lock("k")
        .unwrap()
        .try_acquire()
        .await;
    assert!(
        other.is_ok(),
        "the release must come after the abandoned acquire: {other:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn durations_too_long_to_add_never_panic() {
    let backend: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let guard = m
        .lock("k")
        .unwrap()
        .acquire_timeout(Duration::MAX)
        .await
        .unwrap();
    guard.release().await.unwrap();
    let forever = LockManager::builder(backend.clone())
        .retry_policy(RetryPolicy::default().with_deadline(Some(Duration::MAX)))
        .build()
        .unwrap();
    forever
        .lock("k")
        .unwrap()
        .acquire()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    assert!(matches!(
        LockManager::builder(backend.clone())
            .call_timeout(Duration::MAX)
            .build(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        LockManager::builder(backend.clone())
            .retry_policy(
                RetryPolicy::default()
                    .with_initial_delay(Duration::MAX)
                    .with_max_delay(Duration::MAX)
            )
            .build(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        LockManager::builder(backend)
            .safety_margin(Duration::ZERO)
            .build(),
        Err(Error::InvalidConfig { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn do_exclusively_stops_work_at_the_deadline_even_without_heartbeat_news() {
    let memory = Arc::new(MemoryBackend::new());
    let m = LockManager::builder(memory.clone())
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    let polls_after_deadline = Arc::new(AtomicUsize::new(0));
    let started = tokio::time::Instant::now();
    let result = m
        .do_exclusively("k", {
            let counter = polls_after_deadline.clone();
            |lease| async move {
                let deadline = lease.deadline();
                memory.set_unreachable(true);
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if tokio::time::Instant::now() >= deadline {
                        counter.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
        })
        .await;
    assert!(matches!(
        result,
        Err(ExclusiveError::Lock(Error::LockLost { .. }))
    ));
    assert_eq!(
        polls_after_deadline.load(Ordering::SeqCst),
        0,
        "the work ran past the deadline"
    );
    assert_eq!(started.elapsed().as_secs(), 9);
}
