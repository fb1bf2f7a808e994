//! Late packets, stale releases and wrong answers: each test is a scenario from
//! the review in which a call that the caller had given up on, or an answer that
//! was lost, made two holders, a lease that nobody holds, or a false result.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockInfo, LockKey, LockManager, MemoryBackend, Result,
    Token, Ttl, async_trait,
};
use tokio::time::Instant;

fn key(name: &str) -> LockKey {
    LockKey::new(name).unwrap()
}

/// A `not_after` for direct backend calls.
fn soon() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// A network in front of a memory backend that can hold requests back and
/// deliver them later (as a frozen path that heals does), lose the answer of a
/// release that went through, or block the thread while granting.
#[derive(Debug)]
struct Network {
    inner: Arc<MemoryBackend>,
    /// Each release reaches the backend this long after it was sent.
    release_delay: Duration,
    /// Releases whose answer is lost after they took effect, reported as
    /// NotHeld (a retry on a new connection that finds the key taken).
    lose_release_answers: AtomicUsize,
    /// While set, a try-acquire blocks its thread this long before it answers.
    block_acquires: AtomicBool,
    /// When set, a try-acquire answers a transient error at once (its own
    /// timeout, shorter than the manager's), while its request still reaches
    /// the backend this much later.
    acquire_lands_after_error: Option<Duration>,
}

impl Network {
    fn new(inner: Arc<MemoryBackend>) -> Self {
        Self {
            inner,
            release_delay: Duration::ZERO,
            lose_release_answers: AtomicUsize::new(0),
            block_acquires: AtomicBool::new(false),
            acquire_lands_after_error: None,
        }
    }
}

#[async_trait]
impl LockBackend for Network {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        if self.block_acquires.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(400));
        }
        if let Some(delay) = self.acquire_lands_after_error {
            let (inner, key, token, owner) =
                (self.inner.clone(), key.clone(), *token, owner.to_owned());
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = inner
                    .try_acquire(&key, &token, ttl, &owner, not_after)
                    .await;
            });
            return Err(Error::unavailable("the backend's own timeout", None));
        }
        self.inner
            .try_acquire(key, token, ttl, owner, not_after)
            .await
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
    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        // Delivered late, in a task of its own: the caller may stop waiting, the
        // request still arrives.
        let (inner, k, token, delay) =
            (self.inner.clone(), key.clone(), *token, self.release_delay);
        let delivered = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            inner.release(&k, &token, not_after).await
        });
        let answer = delivered.await.unwrap();
        let lose = self
            .lose_release_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        match answer {
            Ok(()) if lose => Err(Error::NotHeld { key: key.clone() }),
            other => other,
        }
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

/// Item 1 of the review: a try whose request is held back by a frozen network
/// times out; core's cleanup runs while the path is still frozen; then the path
/// heals and the held request reaches the backend. It must change nothing: a
/// lease that nobody holds would block the key for a whole ttl.
#[tokio::test(start_paused = true)]
async fn a_timed_out_try_delivered_after_cleanup_leaves_no_lease() {
    let backend = Arc::new(MemoryBackend::new());
    let manager = LockManager::builder(backend.clone())
        .ttl(Duration::from_secs(120))
        .call_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    backend.set_unreachable(true);
    let tried = manager.lock("k").unwrap().try_acquire().await;
    assert!(matches!(tried, Err(Error::Unavailable { .. })), "{tried:?}");
    // The cleanup's own release is held back too and gives up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    backend.set_unreachable(false);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let info = backend.inspect(&key("k")).await.unwrap();
    assert!(
        !info.as_ref().is_some_and(LockInfo::is_live),
        "a try delivered after its caller gave up took the lock: {info:?}"
    );
    let other = backend
        .try_acquire(
            &key("k"),
            &Token::new(),
            Ttl::new(Duration::from_secs(5)).unwrap(),
            "other",
            soon(),
        )
        .await
        .unwrap();
    assert!(
        matches!(other, AcquireOutcome::Acquired { .. }),
        "{other:?}"
    );
}

/// Item 2: a static token's release times out on a partitioned connection, the
/// same token acquires again as a new guard, then the stale release lands. It
/// must not end the new guard's lease, or another process gets the key while the
/// new guard still claims it.
#[tokio::test(start_paused = true)]
async fn a_stale_release_of_a_static_token_never_ends_its_next_holding() {
    let memory = Arc::new(MemoryBackend::new());
    let network = Network {
        release_delay: Duration::from_secs(2),
        ..Network::new(memory.clone())
    };
    let manager = LockManager::builder(Arc::new(network))
        .ttl(Duration::from_secs(30))
        .call_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let static_token = Token::new();
    let lock = manager.lock("k").unwrap().with_token(static_token);
    let first = lock.try_acquire().await.unwrap();
    let released = first.release().await;
    assert!(released.is_err(), "the release times out: {released:?}");
    let second = lock
        .acquire_timeout(Duration::from_secs(10))
        .await
        .expect("the same token acquires again");
    // The stale release has had time to land.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!second.is_lost(), "the new guard still claims the lock");
    let intruder = memory
        .try_acquire(
            &key("k"),
            &Token::new(),
            Ttl::new(Duration::from_secs(5)).unwrap(),
            "intruder",
            soon(),
        )
        .await
        .unwrap();
    assert!(
        matches!(intruder, AcquireOutcome::Held { .. }),
        "two holders: the stale release ended the new guard's lease ({intruder:?})"
    );
}

/// Item 3: a release whose answer is lost is retried and the retry finds the key
/// already taken by a waiter its own notification woke. The lock was held until
/// the release was sent, so the release succeeded: `Ok`, not `LockLost` (the CLI
/// would exit 70 and a script would run the job twice).
#[tokio::test(start_paused = true)]
async fn a_release_sent_while_live_is_ok_even_if_its_answer_says_not_held() {
    let memory = Arc::new(MemoryBackend::new());
    let network = Network::new(memory.clone());
    network.lose_release_answers.store(1, Ordering::SeqCst);
    let manager = LockManager::builder(Arc::new(network))
        .ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let guard = manager.lock("k").unwrap().try_acquire().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let released = guard.release().await;
    assert!(
        released.is_ok(),
        "held until the release was sent: {released:?}"
    );
}

/// Item 3: a grant that arrives after its local deadline loops straight back
/// with no backoff and no deadline check: `acquire_timeout(100ms)` must still
/// give up at about its deadline, not keep trying.
#[tokio::test(flavor = "current_thread")]
async fn a_late_grant_still_respects_the_wait_deadline() {
    let memory = Arc::new(MemoryBackend::new());
    let network = Arc::new(Network::new(memory.clone()));
    network.block_acquires.store(true, Ordering::SeqCst);
    let manager = LockManager::builder(network.clone())
        .ttl(Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let lock = manager.lock("k").unwrap();
    let started = std::time::Instant::now();
    let waited = tokio::time::timeout(
        Duration::from_secs(5),
        lock.acquire_timeout(Duration::from_millis(100)),
    )
    .await;
    network.block_acquires.store(false, Ordering::SeqCst);
    let elapsed = started.elapsed();
    assert!(
        matches!(waited, Ok(Err(Error::Timeout { .. }))),
        "every grant came after its deadline, so the wait ends in Timeout: {waited:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1200),
        "acquire_timeout(100ms) took {elapsed:?}"
    );
}

/// A try that failed transiently (its backend gave up sooner than the manager)
/// may still land before its `not_after`: the cleanup must not release before
/// that instant, or the late grant outlives it as a lease nobody holds.
#[tokio::test(start_paused = true)]
async fn the_cleanup_of_a_transiently_failed_try_waits_for_its_bound() {
    let memory = Arc::new(MemoryBackend::new());
    let network = Network {
        acquire_lands_after_error: Some(Duration::from_millis(300)),
        ..Network::new(memory.clone())
    };
    let manager = LockManager::builder(Arc::new(network))
        .ttl(Duration::from_secs(60))
        .call_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let tried = manager.lock("k").unwrap().try_acquire().await;
    assert!(matches!(tried, Err(Error::Unavailable { .. })), "{tried:?}");
    manager.settle().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let info = memory.inspect(&key("k")).await.unwrap();
    assert!(
        !info.as_ref().is_some_and(LockInfo::is_live),
        "the grant landed after the cleanup's release: {info:?}"
    );
}
