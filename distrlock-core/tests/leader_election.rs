//! Leader election: three contenders, one leader at a time; when the leader's
//! process is cut off (as if killed), another takes over within about a ttl.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use distrlock_core::{
    AcquireOutcome, LockBackend, LockInfo, LockKey, LockManager, MemoryBackend, Result, Token, Ttl,
    async_trait,
};
use tokio::time::Instant;

/// One contender's way to the shared backend, which the test can cut: then every
/// call of that contender hangs, as if its process had died mid-call.
#[derive(Debug)]
struct Link {
    inner: Arc<MemoryBackend>,
    cut: AtomicBool,
}

impl Link {
    async fn pass(&self) {
        if self.cut.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[async_trait]
impl LockBackend for Link {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        self.pass().await;
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
        self.pass().await;
        self.inner.extend(key, token, ttl, not_after).await
    }
    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        self.pass().await;
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

/// Counts leaders working right now; remembers the most ever at once.
#[derive(Default)]
struct Leaders {
    now: AtomicUsize,
    most: AtomicUsize,
    terms: AtomicUsize,
}

struct Term(Arc<Leaders>);

impl Term {
    fn start(leaders: &Arc<Leaders>) -> Self {
        let now = leaders.now.fetch_add(1, Ordering::SeqCst) + 1;
        leaders.most.fetch_max(now, Ordering::SeqCst);
        leaders.terms.fetch_add(1, Ordering::SeqCst);
        Term(leaders.clone())
    }
}

impl Drop for Term {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(start_paused = true)]
async fn three_contenders_one_leader_and_a_takeover_when_the_leader_dies() {
    let shared = Arc::new(MemoryBackend::new());
    let leaders = Arc::new(Leaders::default());
    let mut links = Vec::new();
    let mut campaigns = Vec::new();
    for i in 0..3 {
        let link = Arc::new(Link {
            inner: shared.clone(),
            cut: AtomicBool::new(false),
        });
        let manager = LockManager::builder(link.clone())
            .ttl(Duration::from_secs(3))
            .owner(format!("contender-{i}"))
            .build()
            .unwrap();
        let leaders = leaders.clone();
        let campaign = manager
            .leader_election("leader")
            .unwrap()
            .spawn(move |_lease| {
                let leaders = leaders.clone();
                async move {
                    let _term = Term::start(&leaders);
                    std::future::pending::<()>().await;
                }
            });
        links.push(link);
        campaigns.push(campaign);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leading: Vec<usize> = (0..3).filter(|&i| campaigns[i].is_leader()).collect();
    assert_eq!(leading.len(), 1, "exactly one leader: {leading:?}");
    let first = leading[0];
    let first_fence = campaigns[first].lease().unwrap().fence();

    // The leader's process dies: its calls never answer again.
    links[first].cut.store(true, Ordering::SeqCst);
    let died = Instant::now();
    let mut next = None;
    while died.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some(i) = (0..3).find(|&i| i != first && campaigns[i].is_leader()) {
            next = Some(i);
            break;
        }
    }
    let next = next.expect("another contender takes over");
    let took = died.elapsed();
    assert!(
        took <= Duration::from_secs(3) + Duration::from_millis(500),
        "takeover within about a ttl: {took:?}"
    );
    assert!(
        !campaigns[first].is_leader(),
        "the dead leader's work was stopped"
    );
    assert!(campaigns[next].lease().unwrap().fence() > first_fence);
    assert_eq!(
        leaders.most.load(Ordering::SeqCst),
        1,
        "never two leaders working at once"
    );

    // A clean shutdown of the new leader hands over at once.
    let handed = Instant::now();
    let leader = campaigns.remove(next);
    leader.shutdown().await.unwrap();
    let third = loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Some(c) = campaigns.iter().find(|c| c.is_leader()) {
            break c;
        }
        assert!(
            handed.elapsed() < Duration::from_secs(2),
            "no handover after shutdown"
        );
    };
    assert!(third.lease().is_some());
    assert_eq!(leaders.terms.load(Ordering::SeqCst), 3);
    assert_eq!(leaders.most.load(Ordering::SeqCst), 1);
}
