//! How often a waiter in line asks again (`Lock::acquire`), on tokio's paused
//! clock: the polling schedule when releases are not all announced, the half
//! turn when they are (which SQLite's wake-ups and PostgreSQL's `LISTEN` rely
//! on), and the quarter-turn cap on the backoff after errors while the waiter
//! holds a ticket. Each promise is what keeps a waiter from missing its turn,
//! which lasts one `line::TURN` (250 ms).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockInfo, LockKey, LockManager, MemoryBackend, Place,
    ReleaseNotifier, Result, RetryPolicy, Token, Ttl, WaiterAnswer, line,
};
use tokio::time::Instant;

/// The in-memory backend, with a notifier of our choosing (or none), that
/// records when each waiter's try came and can fail every try that brings a
/// ticket.
#[derive(Debug)]
struct Recording {
    inner: MemoryBackend,
    notifier: Option<ReleaseNotifier>,
    tries: Mutex<Vec<(String, Instant)>>,
    fail_with_ticket: bool,
}

impl Recording {
    fn new(notifier: Option<ReleaseNotifier>, fail_with_ticket: bool) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryBackend::new(),
            notifier,
            tries: Mutex::new(Vec::new()),
            fail_with_ticket,
        })
    }

    /// The gaps between `owner`'s tries, with the time it had waited at each.
    fn gaps(&self, owner: &str) -> Vec<(Duration, Duration)> {
        let tries = self.tries.lock().unwrap();
        let at: Vec<Instant> = tries
            .iter()
            .filter(|(o, _)| o == owner)
            .map(|(_, t)| *t)
            .collect();
        at.windows(2).map(|w| (w[1] - w[0], w[0] - at[0])).collect()
    }
}

#[async_trait]
impl LockBackend for Recording {
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
    async fn try_acquire_as_waiter(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Place,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        self.tries
            .lock()
            .unwrap()
            .push((owner.to_owned(), Instant::now()));
        if self.fail_with_ticket && place.ticket.is_some() {
            return Err(Error::unavailable("the test's backend fails", None));
        }
        self.inner
            .try_acquire_as_waiter(key, token, ttl, owner, place, not_after)
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
        self.notifier.as_ref()
    }
}

/// Holds `key` for a minute (a plain try, which takes no ticket), then has
/// `waiters` (named `w0`, `w1`, …, in line in that order) wait for it
/// through a manager for `wait`; returns when all gave up.
async fn wait_in_line(backend: Arc<Recording>, waiters: usize, wait: Duration) {
    let key = LockKey::new("scheduled").unwrap();
    let minute = Ttl::new(Duration::from_secs(60)).unwrap();
    let held = backend
        .try_acquire(
            &key,
            &Token::new(),
            minute,
            "holder",
            Instant::now() + wait * 2,
        )
        .await
        .unwrap();
    assert!(matches!(held, AcquireOutcome::Acquired { .. }));
    let mut tasks = Vec::new();
    for i in 0..waiters {
        let manager = LockManager::builder(backend.clone())
            .owner(format!("w{i}"))
            .ttl(Duration::from_secs(60))
            .retry_policy(RetryPolicy::new().with_max_delay(Duration::from_secs(5)))
            .build()
            .unwrap();
        let lock = manager.lock("scheduled").unwrap();
        tasks.push(tokio::spawn(async move {
            matches!(lock.acquire_timeout(wait).await, Err(Error::Timeout { .. }))
        }));
        // In line in this order.
        tokio::time::sleep(Duration::from_micros(100)).await;
    }
    for task in tasks {
        assert!(task.await.unwrap(), "a waiter got a held key");
    }
}

/// A millisecond of slack for the paused clock's rounding.
const SLACK: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn without_announcements_the_head_polls_every_millisecond_and_the_others_later() {
    // An incomplete notifier: only this process's releases are announced.
    let backend = Recording::new(Some(ReleaseNotifier::new()), false);
    wait_in_line(backend.clone(), 3, Duration::from_secs(5)).await;
    for (i, owner) in ["w0", "w1", "w2"].iter().enumerate() {
        let gaps = backend.gaps(owner);
        assert!(gaps.len() > 50, "{owner} asked {} times", gaps.len() + 1);
        let ahead = u32::try_from(i).unwrap();
        // The first gap follows the try without a ticket, the last ends at
        // the deadline.
        let n = gaps.len();
        for &(gap, waited) in &gaps[1..n - 1] {
            // 1 ms per ticket up to and including its own, or 1/64 of its
            // wait, and never more than a quarter turn.
            let due = (Duration::from_millis(1) * (ahead + 1))
                .max(waited / 64)
                .min(line::TURN / 4);
            assert!(
                gap <= due + SLACK,
                "{owner} asked {gap:?} after the last try, due {due:?} (waited {waited:?})"
            );
            assert!(
                gap + SLACK >= due,
                "{owner} asked early: {gap:?}, due {due:?}"
            );
        }
        // Early on, the nearer the head the sooner; a long wait polls at the
        // cap.
        assert!(gaps[1].0 <= Duration::from_millis(1) * (ahead + 1) + SLACK);
        let (late, _) = gaps[n - 2];
        assert!(late + SLACK >= line::TURN / 4, "{owner}: {late:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn with_every_release_announced_a_waiter_asks_every_half_turn() {
    let notifier = ReleaseNotifier::new();
    notifier.set_complete(true);
    let backend = Recording::new(Some(notifier), false);
    wait_in_line(backend.clone(), 2, Duration::from_secs(3)).await;
    for owner in ["w0", "w1"] {
        let gaps = backend.gaps(owner);
        // Its first try, its ticket, then one try per half turn.
        assert!(gaps.len() >= 10, "{owner}: {gaps:?}");
        for &(gap, _) in &gaps[1..gaps.len() - 1] {
            assert!(
                gap <= line::TURN / 2 + SLACK && gap + SLACK >= line::TURN / 2,
                "{owner} asked {gap:?} after its last try"
            );
        }
    }
}

#[tokio::test(start_paused = true)]
async fn failing_tries_back_off_at_most_a_quarter_turn_while_in_line() {
    // Every try that brings the ticket fails: the usual backoff (up to 5 s
    // here) is capped so that the waiter is back within its turn.
    let backend = Recording::new(Some(ReleaseNotifier::new()), true);
    wait_in_line(backend.clone(), 1, Duration::from_secs(10)).await;
    let gaps = backend.gaps("w0");
    assert!(gaps.len() > 30, "asked {} times", gaps.len() + 1);
    for &(gap, waited) in &gaps {
        assert!(
            gap <= line::TURN / 4 + SLACK,
            "{gap:?} between tries after {waited:?} of failures"
        );
    }
}
