//! The lock state machine on tokio's paused clock: heartbeats, local deadlines,
//! waiting and retries, measured to the millisecond without real waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockInfo, LockKey, LockManager, MemoryBackend,
    ReleaseNotifier, Result, RetryPolicy, Token, Ttl, async_trait,
};
use tokio::time::Instant;

fn manager(backend: Arc<dyn LockBackend>, ttl: Duration) -> LockManager {
    LockManager::builder(backend)
        .ttl(ttl)
        .build()
        .expect("valid settings")
}

/// A `not_after` for direct backend calls.
fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn key(name: &str) -> LockKey {
    LockKey::new(name).unwrap()
}

#[tokio::test(start_paused = true)]
async fn heartbeat_keeps_the_lock_for_many_ttls() {
    let backend = Arc::new(MemoryBackend::new());
    let m = manager(backend.clone(), Duration::from_secs(3));
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!guard.is_lost());
    assert!(guard.time_left() > Duration::from_secs(1));
    let refused = backend
        .try_acquire(
            &key("k"),
            &Token::new(),
            Ttl::new(Duration::from_secs(1)).unwrap(),
            "x",
            soon(),
        )
        .await
        .unwrap();
    assert!(
        matches!(refused, AcquireOutcome::Held { .. }),
        "still held after 20 ttls"
    );
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn unreachable_backend_loses_the_lock_exactly_at_the_local_deadline() {
    let backend = Arc::new(MemoryBackend::new());
    let m = LockManager::builder(backend.clone())
        .ttl(Duration::from_secs(10))
        .safety_margin(Duration::from_secs(1))
        .build()
        .unwrap();
    let started = Instant::now();
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    backend.set_unreachable(true);
    guard.lost().await;
    // Sent at `started`, ttl 10 s, margin 1 s: lost at 9 s, not one tick later.
    assert_eq!(started.elapsed().as_millis(), 9_000);
    assert!(guard.is_lost());
    assert!(matches!(guard.extend().await, Err(Error::LockLost { .. })));
    backend.set_unreachable(false);
    assert!(matches!(guard.release().await, Err(Error::LockLost { .. })));
}

#[tokio::test(start_paused = true)]
async fn without_heartbeat_the_lock_is_lost_at_the_deadline() {
    let backend = Arc::new(MemoryBackend::new());
    let m = LockManager::builder(backend)
        .ttl(Duration::from_secs(10))
        .auto_extend(false)
        .build()
        .unwrap();
    let started = Instant::now();
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    guard.lost().await;
    // Default margin: ttl/10 = 1 s.
    assert_eq!(started.elapsed().as_millis(), 9_000);
}

#[tokio::test(start_paused = true)]
async fn manual_extend_moves_the_deadline() {
    let backend = Arc::new(MemoryBackend::new());
    let m = LockManager::builder(backend)
        .ttl(Duration::from_secs(10))
        .auto_extend(false)
        .build()
        .unwrap();
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    let first = guard.deadline();
    tokio::time::sleep(Duration::from_secs(5)).await;
    guard.extend().await.unwrap();
    assert_eq!(guard.deadline() - first, Duration::from_secs(5));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !guard.is_lost(),
        "the extend carried it past the first deadline"
    );
}

#[tokio::test(start_paused = true)]
async fn a_lease_taken_away_is_reported_lost_at_the_next_heartbeat() {
    let backend = Arc::new(MemoryBackend::new());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let started = Instant::now();
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    // Someone with the token (say, an operator) releases it behind the guard's back.
    backend
        .release(&key("k"), &guard.token(), soon())
        .await
        .unwrap();
    guard.lost().await;
    assert_eq!(
        started.elapsed().as_secs(),
        10,
        "the heartbeat at ttl/3 notices"
    );
}

#[tokio::test(start_paused = true)]
async fn waiter_wakes_when_the_holders_lease_ends() {
    let backend = Arc::new(MemoryBackend::new());
    let holder = Token::new();
    backend
        .try_acquire(
            &key("k"),
            &holder,
            Ttl::new(Duration::from_secs(10)).unwrap(),
            "h",
            soon(),
        )
        .await
        .unwrap();
    let m = LockManager::builder(backend)
        .retry_policy(
            RetryPolicy::default()
                .with_initial_delay(Duration::from_secs(600))
                .with_max_delay(Duration::from_secs(600)),
        )
        .build()
        .unwrap();
    let started = Instant::now();
    let guard = m.lock("k").unwrap().acquire().await.unwrap();
    let waited = started.elapsed();
    assert!(
        waited <= Duration::from_millis(10_001),
        "a waiter never sleeps past the holder's expiry: waited {waited:?}"
    );
    assert!(waited >= Duration::from_secs(10));
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn release_notification_wakes_waiter_at_once() {
    let backend = Arc::new(MemoryBackend::new());
    let m = LockManager::builder(backend)
        .retry_policy(
            RetryPolicy::default()
                .with_initial_delay(Duration::from_secs(600))
                .with_max_delay(Duration::from_secs(600)),
        )
        .build()
        .unwrap();
    let holder = m.lock("k").unwrap().try_acquire().await.unwrap();
    let waiter = m.lock("k").unwrap();
    let started = Instant::now();
    let waiting = tokio::spawn(async move { waiter.acquire().await.map(|_| started.elapsed()) });
    tokio::time::sleep(Duration::from_secs(3)).await;
    holder.release().await.unwrap();
    let waited = waiting.await.unwrap().unwrap();
    assert_eq!(
        waited.as_secs(),
        3,
        "woken by the release, not by the 600 s backoff"
    );
}

#[tokio::test(start_paused = true)]
async fn acquire_timeout_gives_up_at_its_deadline() {
    let backend = Arc::new(MemoryBackend::new());
    let m = manager(backend, Duration::from_secs(30));
    let _holder = m.lock("k").unwrap().try_acquire().await.unwrap();
    let started = Instant::now();
    let result = m
        .lock("k")
        .unwrap()
        .acquire_timeout(Duration::from_millis(1500))
        .await;
    match result {
        Err(Error::Timeout { waited, .. }) => assert_eq!(waited.as_millis(), 1500),
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(started.elapsed().as_millis(), 1500);
    // A zero timeout still makes exactly one try.
    let result = m.lock("k").unwrap().acquire_timeout(Duration::ZERO).await;
    assert!(matches!(result, Err(Error::Timeout { .. })));
}

#[tokio::test(start_paused = true)]
async fn policy_deadline_bounds_plain_acquire() {
    let backend = Arc::new(MemoryBackend::new());
    let m = LockManager::builder(backend)
        .retry_policy(RetryPolicy::default().with_deadline(Some(Duration::from_secs(2))))
        .build()
        .unwrap();
    let _holder = m.lock("k").unwrap().try_acquire().await.unwrap();
    let result = m.lock("k").unwrap().acquire().await;
    assert!(
        matches!(result, Err(Error::Timeout { waited, .. }) if waited == Duration::from_secs(2))
    );
}

#[tokio::test(start_paused = true)]
async fn do_exclusively_releases_when_the_work_panics() {
    let backend = Arc::new(MemoryBackend::new());
    let m = manager(backend, Duration::from_secs(30));
    let m2 = m.clone();
    let task = tokio::spawn(async move {
        m2.do_exclusively("k", |_lease| async {
            panic!("the work failed");
        })
        .await
    });
    assert!(task.await.unwrap_err().is_panic());
    let guard = m
        .lock("k")
        .unwrap()
        .acquire_timeout(Duration::from_millis(100))
        .await
        .expect("the panicking holder's guard released the lock");
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn do_exclusively_passes_the_work_output_and_releases() {
    let backend = Arc::new(MemoryBackend::new());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let out: std::result::Result<u32, &str> = m
        .do_exclusively("k", |lease| async move {
            assert_eq!(lease.key().as_str(), "k");
            Err("work error is the caller's")
        })
        .await
        .unwrap();
    assert_eq!(out, Err("work error is the caller's"));
    let info = backend.inspect(&key("k")).await.unwrap().unwrap();
    assert!(!info.is_live(), "released after the work");
}

#[tokio::test(start_paused = true)]
async fn builder_refuses_heartbeat_not_shorter_than_ttl() {
    let backend: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let built = LockManager::builder(backend.clone())
        .ttl(Duration::from_secs(10))
        .heartbeat_interval(Duration::from_secs(9))
        .build();
    assert!(
        matches!(built, Err(Error::InvalidConfig { .. })),
        "9 s >= 10 s - 1 s margin"
    );
    let built = LockManager::builder(backend.clone())
        .ttl(Duration::from_secs(10))
        .safety_margin(Duration::from_secs(10))
        .build();
    assert!(matches!(built, Err(Error::InvalidConfig { .. })));
    let built = LockManager::builder(backend.clone())
        .retry_policy(RetryPolicy::default().with_initial_delay(Duration::ZERO))
        .build();
    assert!(matches!(built, Err(Error::InvalidConfig { .. })));
    let m = LockManager::builder(backend)
        .ttl(Duration::from_secs(30))
        .heartbeat_interval(Duration::from_secs(5))
        .build()
        .unwrap();
    let lock = m.lock("k").unwrap();
    assert!(
        matches!(
            lock.clone().with_ttl(Duration::from_secs(4)),
            Err(Error::InvalidConfig { .. })
        ),
        "a per-lock ttl shorter than the heartbeat interval is refused"
    );
    assert!(lock.with_ttl(Duration::from_secs(10)).is_ok());
}

/// Wraps the memory backend and fails chosen calls, to drive the retry paths.
#[derive(Debug)]
struct Flaky {
    inner: MemoryBackend,
    fail_acquires: AtomicUsize,
    fail_extends: AtomicUsize,
    permanent: bool,
}

impl Flaky {
    fn new(fail_acquires: usize, fail_extends: usize, permanent: bool) -> Self {
        Self {
            inner: MemoryBackend::new(),
            fail_acquires: AtomicUsize::new(fail_acquires),
            fail_extends: AtomicUsize::new(fail_extends),
            permanent,
        }
    }

    fn maybe_fail(&self, counter: &AtomicUsize) -> Result<()> {
        let failing = counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if !failing {
            return Ok(());
        }
        let cause = std::io::Error::other("injected");
        Err(if self.permanent {
            Error::permanent("injected permanent failure", cause)
        } else {
            Error::transient("injected transient failure", cause)
        })
    }
}

#[async_trait]
impl LockBackend for Flaky {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        self.maybe_fail(&self.fail_acquires)?;
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
        self.maybe_fail(&self.fail_extends)?;
        self.inner.extend(key, token, ttl, not_after).await
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
        Ok(())
    }
    fn schema_sql(&self) -> String {
        String::new()
    }
    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        self.inner.release_notifier()
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_acquire_retries_transient_errors() {
    let m = manager(Arc::new(Flaky::new(3, 0, false)), Duration::from_secs(30));
    let guard = m
        .lock("k")
        .unwrap()
        .acquire_timeout(Duration::from_secs(10))
        .await
        .unwrap();
    guard.release().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn waiting_acquire_stops_at_a_permanent_error() {
    let m = manager(Arc::new(Flaky::new(1, 0, true)), Duration::from_secs(30));
    let result = m
        .lock("k")
        .unwrap()
        .acquire_timeout(Duration::from_secs(10))
        .await;
    assert!(matches!(
        result,
        Err(Error::Backend {
            transient: false,
            ..
        })
    ));
}

#[tokio::test(start_paused = true)]
async fn heartbeat_survives_a_failed_extend() {
    let m = manager(Arc::new(Flaky::new(0, 2, false)), Duration::from_secs(3));
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        !guard.is_lost(),
        "two failed extends are retried before the deadline"
    );
    guard.release().await.unwrap();
}
