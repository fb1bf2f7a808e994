//! The guards of one manager renew through one task, in `extend_many` batches:
//! few calls for many guards, each guard's answer on its own, and the same
//! deadlines as a single extend. On tokio's paused clock.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockInfo, LockKey, LockManager, MAX_EXTEND_BATCH,
    MemoryBackend, Result, Token, Ttl, async_trait,
};
use tokio::time::Instant;

/// Counts the calls that reach the memory backend; can fail or delay batches.
#[derive(Debug, Default)]
struct Counting {
    inner: MemoryBackend,
    extends: AtomicUsize,
    batches: Mutex<Vec<usize>>,
    fail_batches: AtomicUsize,
    batch_delay: Mutex<Duration>,
}

#[async_trait]
impl LockBackend for Counting {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
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
        self.extends.fetch_add(1, Ordering::SeqCst);
        self.inner.extend(key, token, ttl, not_after).await
    }
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        self.batches.lock().unwrap().push(leases.len());
        let delay = *self.batch_delay.lock().unwrap();
        tokio::time::sleep(delay).await;
        let failing = self
            .fail_batches
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(Error::transient(
                "injected batch failure",
                std::io::Error::other("injected"),
            ));
        }
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
        Ok(())
    }
    fn schema_sql(&self) -> String {
        String::new()
    }
}

/// A `not_after` for direct backend calls.
fn soon() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

fn manager(backend: Arc<Counting>, ttl: Duration) -> LockManager {
    LockManager::builder(backend).ttl(ttl).build().unwrap()
}

#[tokio::test(start_paused = true)]
async fn many_guards_share_a_few_batched_extends() {
    let backend = Arc::new(Counting::default());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let mut guards = Vec::new();
    // 2,500 guards acquired over the first 9 s, so their own schedules differ.
    for i in 0..2_500 {
        guards.push(
            m.lock(format!("k{i}"))
                .unwrap()
                .try_acquire()
                .await
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_micros(3_600)).await;
    }
    tokio::time::sleep(Duration::from_secs(65)).await;
    assert!(guards.iter().all(|g| !g.is_lost()), "every lease is kept");
    assert_eq!(
        backend.extends.load(Ordering::SeqCst),
        0,
        "renewal goes through extend_many only"
    );
    let batches = backend.batches.lock().unwrap().clone();
    assert!(
        batches.iter().all(|&n| n <= MAX_EXTEND_BATCH),
        "{batches:?}"
    );
    // About 74 s of holding at one heartbeat per 10 s is 8 rounds of 3 batches;
    // the first rounds align the guards' schedules.
    assert!(
        batches.len() <= 30,
        "{} batches for 2,500 guards in 74 s: {batches:?}",
        batches.len()
    );
    let renewed: usize = batches.iter().sum();
    assert!(
        renewed >= 2_500 * 6,
        "each guard renewed about every 10 s: {renewed}"
    );
    for guard in guards {
        guard.release().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_lease_gone_from_a_batch_loses_only_its_guard_at_the_next_heartbeat() {
    let backend = Arc::new(Counting::default());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let started = Instant::now();
    let a = m.lock("a").unwrap().try_acquire().await.unwrap();
    let b = m.lock("b").unwrap().try_acquire().await.unwrap();
    let c = m.lock("c").unwrap().try_acquire().await.unwrap();
    backend
        .inner
        .release(&LockKey::new("b").unwrap(), &b.token(), soon())
        .await
        .unwrap();
    b.lost().await;
    assert_eq!(started.elapsed().as_secs(), 10, "noticed at the heartbeat");
    assert!(!a.is_lost() && !c.is_lost());
    assert_eq!(
        backend.batches.lock().unwrap().as_slice(),
        &[3],
        "one batch for the three"
    );
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(!a.is_lost() && !c.is_lost(), "the others keep their leases");
}

#[tokio::test(start_paused = true)]
async fn a_failed_batch_is_retried_for_each_guard_in_it() {
    let backend = Arc::new(Counting::default());
    backend.fail_batches.store(1, Ordering::SeqCst);
    let m = manager(backend.clone(), Duration::from_secs(30));
    let a = m.lock("a").unwrap().try_acquire().await.unwrap();
    let b = m.lock("b").unwrap().try_acquire().await.unwrap();
    let first_deadline = a.deadline();
    tokio::time::sleep(Duration::from_millis(10_500)).await;
    // Failed at 10 s, retried 1 s later (interval/4, at most 1 s).
    assert_eq!(backend.batches.lock().unwrap().as_slice(), &[2]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(backend.batches.lock().unwrap().as_slice(), &[2, 2]);
    assert!(!a.is_lost() && !b.is_lost());
    assert_eq!(
        a.deadline() - first_deadline,
        Duration::from_secs(11),
        "the deadline moved by the retry's send time"
    );
}

#[tokio::test(start_paused = true)]
async fn the_deadline_moves_by_the_batch_requests_send_time() {
    let backend = Arc::new(Counting::default());
    *backend.batch_delay.lock().unwrap() = Duration::from_millis(200);
    let m = manager(backend.clone(), Duration::from_secs(3));
    let started = Instant::now();
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Sent at 1 s (ttl/3), answered at 1.2 s: 1 s + 3 s − 0.3 s margin.
    assert_eq!((guard.deadline() - started).as_millis(), 3_700);
}

#[tokio::test(start_paused = true)]
async fn a_batch_answering_after_the_deadline_does_not_revive_the_lock() {
    let backend = Arc::new(Counting::default());
    *backend.batch_delay.lock().unwrap() = Duration::from_secs(5);
    let m = manager(backend.clone(), Duration::from_secs(3));
    let started = Instant::now();
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    guard.lost().await;
    assert_eq!(started.elapsed().as_millis(), 2_700, "lost at the deadline");
    *backend.batch_delay.lock().unwrap() = Duration::ZERO;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(guard.is_lost(), "once lost, always lost");
    assert_eq!(
        backend.batches.lock().unwrap().len(),
        1,
        "no renewal after loss"
    );
}

#[tokio::test(start_paused = true)]
async fn guards_with_different_ttls_are_renewed_in_separate_batches() {
    let backend = Arc::new(Counting::default());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let a = m.lock("a").unwrap().try_acquire().await.unwrap();
    let b = m
        .lock("b")
        .unwrap()
        .with_ttl(Duration::from_secs(60))
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert!(!a.is_lost() && !b.is_lost());
    let info = backend
        .inner
        .inspect(&LockKey::new("b").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        info.remaining.unwrap() > Duration::from_secs(35),
        "b is renewed with its own 60 s ttl: {:?}",
        info.remaining
    );
}

#[tokio::test(start_paused = true)]
async fn the_renewal_task_does_not_keep_a_dropped_managers_backend() {
    let backend = Arc::new(Counting::default());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    tokio::time::sleep(Duration::from_secs(15)).await;
    guard.release().await.unwrap();
    drop(m);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        Arc::strong_count(&backend),
        1,
        "the backend (and its connections) must go with the manager"
    );
}

/// A caller that takes and frees one lock after another does not start a
/// renewal task for each: the task stays a second after it first finds its
/// last guard gone.
#[tokio::test(start_paused = true)]
async fn the_renewal_task_outlives_its_last_guard_for_a_while() {
    let backend = Arc::new(Counting::default());
    let m = manager(backend.clone(), Duration::from_secs(30));
    let metrics = tokio::runtime::Handle::current().metrics();
    let alive = || async {
        // Let spawned tasks run (and finished ones go) before counting.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        metrics.num_alive_tasks()
    };
    assert_eq!(alive().await, 0);
    // One lock after another: the first guard starts the task, the others
    // find it still there.
    for _ in 0..20 {
        // Released before the task first looks, as in a tight loop.
        let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
        guard.release().await.unwrap();
        assert_eq!(alive().await, 1, "the task stays after the guard went");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    assert_eq!(alive().await, 1, "one renewal task while a guard lives");
    drop(guard);
    // It looks again at the last guard's first heartbeat (10 s), finds
    // nobody, and ends a second later.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(alive().await, 0, "gone once idle");
    // The next guard starts it again, and is renewed.
    let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
    assert_eq!(alive().await, 1);
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert!(backend.extends.load(Ordering::SeqCst) + backend.batches.lock().unwrap().len() > 0);
    assert!(!guard.is_lost());
    guard.release().await.unwrap();
}
