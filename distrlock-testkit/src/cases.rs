//! The conformance cases: each a public async function that takes a [`Setup`] and
//! panics (with a message naming the broken promise) when the backend fails it.
//!
//! Run them all with [`conformance_tests!`](crate::conformance_tests), or call any
//! one directly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use distrlock_core::{AcquireOutcome, Error, Fence, LockKey, LockState, Token, Ttl};
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::delayed::DelayedBackend;
use crate::harness::Setup;

/// The ttl cases use when they do not wait for expiry.
const LONG: Duration = Duration::from_secs(30);
/// The ttl cases use when they wait for expiry: short, but long enough for a
/// database round trip on a loaded CI machine.
const SHORT: Duration = Duration::from_millis(800);

/// A `not_after` for direct backend calls: well after any answer a case expects.
fn soon() -> Instant {
    Instant::now() + LONG
}

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).expect("case ttls are valid")
}

async fn acquire(setup: &Setup, key: &LockKey, token: &Token, d: Duration) -> AcquireOutcome {
    setup
        .backend
        .try_acquire(key, token, ttl(d), "distrlock-conformance", soon())
        .await
        .expect("try_acquire must not fail")
}

fn fence_of(outcome: AcquireOutcome) -> Fence {
    match outcome {
        AcquireOutcome::Acquired { fence, .. } => fence,
        AcquireOutcome::Held { remaining } => {
            panic!("expected the lock to be acquired, it was held (remaining {remaining:?})")
        }
    }
}

/// 1. Acquire, release, acquire again: both succeed and the fence grows.
pub async fn acquire_release_reacquire(setup: &Setup) {
    let manager = setup.manager(LONG);
    let key = setup.key("basic");
    let first = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let f1 = first.fence();
    first
        .release()
        .await
        .expect("release of a held lock succeeds");
    let second = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    assert!(
        second.fence() > f1,
        "fence must grow: {f1} then {}",
        second.fence()
    );
    assert_ne!(second.token(), Token::default(), "tokens are random");
    second.release().await.unwrap();
}

/// 2. While one token holds the lock, another is refused, with the holder's
///    remaining lease when the backend reports it.
pub async fn second_token_refused_while_held(setup: &Setup) {
    let key = setup.key("contended");
    let holder = Token::new();
    fence_of(acquire(setup, &key, &holder, LONG).await);
    match acquire(setup, &key, &Token::new(), LONG).await {
        AcquireOutcome::Held { remaining } => {
            if let Some(remaining) = remaining {
                assert!(remaining <= LONG, "remaining {remaining:?} exceeds the ttl");
                assert!(
                    remaining > LONG - Duration::from_secs(10),
                    "remaining {remaining:?} is far too short"
                );
            }
        }
        other => panic!("a second token must be refused, got {other:?}"),
    }
    let manager = setup.manager(LONG);
    match manager.lock(key.as_str()).unwrap().try_acquire().await {
        Err(Error::HeldByOther { key: k, .. }) => assert_eq!(k, key),
        other => panic!("try_acquire must return HeldByOther, got {other:?}"),
    }
    setup.backend.release(&key, &holder, soon()).await.unwrap();
}

/// 3. The holder's own token re-acquires: same fence, lease renewed, others still
///    refused.
pub async fn same_token_reacquires_idempotently(setup: &Setup) {
    let key = setup.key("idempotent");
    let token = Token::new();
    let f1 = fence_of(acquire(setup, &key, &token, SHORT).await);
    let f2 = fence_of(acquire(setup, &key, &token, LONG).await);
    assert_eq!(
        f1, f2,
        "re-acquiring with the holder's token keeps the fence"
    );
    // The second acquire renewed the lease to LONG: it outlives SHORT.
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    assert!(
        matches!(
            acquire(setup, &key, &Token::new(), LONG).await,
            AcquireOutcome::Held { .. }
        ),
        "the renewed lease must still be held after the first ttl"
    );
    setup.backend.release(&key, &token, soon()).await.unwrap();
}

/// 4. 32 concurrent try-acquires on one key: exactly one wins.
pub async fn concurrent_try_acquires_one_winner(setup: &Setup) {
    let key = setup.key("race");
    let barrier = Arc::new(Barrier::new(32));
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let backend = setup.backend.clone();
        let barrier = barrier.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            backend
                .try_acquire(&key, &Token::new(), ttl(LONG), "racer", soon())
                .await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.expect("racer task") {
            Ok(AcquireOutcome::Acquired { .. }) => winners += 1,
            Ok(AcquireOutcome::Held { .. }) => {}
            Err(error) => panic!("a racing try_acquire failed: {error}"),
        }
    }
    assert_eq!(winners, 1, "exactly one of 32 racers must win");
}

/// 5. Different keys are independent locks.
pub async fn independent_keys(setup: &Setup) {
    let (a, b) = (setup.key("independent-a"), setup.key("independent-b"));
    let (ta, tb) = (Token::new(), Token::new());
    fence_of(acquire(setup, &a, &ta, LONG).await);
    fence_of(acquire(setup, &b, &tb, LONG).await);
    setup.backend.release(&a, &ta, soon()).await.unwrap();
    assert!(
        matches!(
            acquire(setup, &b, &Token::new(), LONG).await,
            AcquireOutcome::Held { .. }
        ),
        "releasing one key must not free another"
    );
    setup.backend.release(&b, &tb, soon()).await.unwrap();
}

/// 6. Keys are exact: case matters, a trailing space matters, and a 255-byte
///    multibyte key is stored and read back unchanged.
pub async fn keys_are_exact(setup: &Setup) {
    let keys = [
        setup.key("a"),
        setup.key("A"),
        setup.key("a "),
        setup.key("å"),
    ];
    let mut fences = Vec::new();
    for key in &keys {
        fences.push(fence_of(acquire(setup, key, &Token::new(), LONG).await));
    }
    for key in &keys {
        let info = setup
            .backend
            .inspect(key)
            .await
            .unwrap()
            .expect("row exists");
        assert_eq!(&info.key, key, "the key must read back exactly");
    }
    // The longest key: prefix plus three-byte characters, padded to 255 bytes.
    let mut long = setup.prefix().to_owned();
    while long.len() + 3 <= LockKey::MAX_LEN {
        long.push('€');
    }
    while long.len() < LockKey::MAX_LEN {
        long.push('x');
    }
    let long = LockKey::new(long).unwrap();
    assert_eq!(long.as_str().len(), 255);
    fence_of(acquire(setup, &long, &Token::new(), LONG).await);
    let info = setup
        .backend
        .inspect(&long)
        .await
        .unwrap()
        .expect("row exists");
    assert_eq!(
        info.key, long,
        "a 255-byte multibyte key must read back exactly"
    );
}

/// 7. A wrong token gets `NotHeld` on release and extend, and changes nothing.
pub async fn wrong_token_not_held(setup: &Setup) {
    let key = setup.key("wrong-token");
    let token = Token::new();
    let fence = fence_of(acquire(setup, &key, &token, LONG).await);
    let before = setup.backend.inspect(&key).await.unwrap().expect("row");
    let wrong = Token::new();
    assert!(matches!(
        setup.backend.release(&key, &wrong, soon()).await,
        Err(Error::NotHeld { .. })
    ));
    assert!(matches!(
        setup.backend.extend(&key, &wrong, ttl(LONG), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    let after = setup.backend.inspect(&key).await.unwrap().expect("row");
    assert_eq!(after.fence, fence);
    assert_eq!(after.state, LockState::Held);
    assert_eq!(
        after.expires_at, before.expires_at,
        "a refused extend must not move the expiry"
    );
    setup
        .backend
        .extend(&key, &token, ttl(LONG), soon())
        .await
        .expect("the holder still extends");
    setup
        .backend
        .release(&key, &token, soon())
        .await
        .expect("the holder still releases");
    assert!(matches!(
        setup.backend.release(&key, &Token::new(), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    let missing = setup.key("never-acquired");
    assert!(matches!(
        setup.backend.release(&missing, &token, soon()).await,
        Err(Error::NotHeld { .. })
    ));
    assert!(matches!(
        setup
            .backend
            .extend(&missing, &token, ttl(LONG), soon())
            .await,
        Err(Error::NotHeld { .. })
    ));
}

/// 8. A second release of the same holding gets `NotHeld`.
pub async fn double_release(setup: &Setup) {
    let key = setup.key("double-release");
    let token = Token::new();
    fence_of(acquire(setup, &key, &token, LONG).await);
    setup.backend.release(&key, &token, soon()).await.unwrap();
    assert!(matches!(
        setup.backend.release(&key, &token, soon()).await,
        Err(Error::NotHeld { .. })
    ));
    assert!(
        matches!(
            setup.backend.extend(&key, &token, ttl(LONG), soon()).await,
            Err(Error::NotHeld { .. })
        ),
        "a released lease cannot be extended"
    );
    let info = setup
        .backend
        .inspect(&key)
        .await
        .unwrap()
        .expect("row is kept");
    assert_eq!(info.state, LockState::Released);
}

/// 9. Extending keeps the lock past the original ttl; extending after expiry
///    fails. Two extends in a row both succeed.
pub async fn extend_keeps_lock_and_fails_after_expiry(setup: &Setup) {
    let key = setup.key("extend");
    let token = Token::new();
    fence_of(acquire(setup, &key, &token, SHORT).await);
    tokio::time::sleep(SHORT / 2).await;
    setup
        .backend
        .extend(&key, &token, ttl(SHORT), soon())
        .await
        .expect("extend while live");
    setup
        .backend
        .extend(&key, &token, ttl(SHORT), soon())
        .await
        .expect("a second extend at once");
    tokio::time::sleep(SHORT / 2 + Duration::from_millis(100)).await;
    // Past the original ttl, still held thanks to the extend.
    assert!(
        matches!(
            acquire(setup, &key, &Token::new(), LONG).await,
            AcquireOutcome::Held { .. }
        ),
        "an extended lease must outlive its original ttl"
    );
    tokio::time::sleep(SHORT).await;
    assert!(
        matches!(
            setup.backend.extend(&key, &token, ttl(SHORT), soon()).await,
            Err(Error::NotHeld { .. })
        ),
        "an expired lease cannot be extended"
    );
}

/// 10. After expiry another token takes the lock with a greater fence, and the
///     old token can neither extend nor release.
pub async fn expiry_hands_over(setup: &Setup) {
    let key = setup.key("expiry");
    let old = Token::new();
    let f1 = fence_of(acquire(setup, &key, &old, SHORT).await);
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    let info = setup.backend.inspect(&key).await.unwrap().expect("row");
    assert_eq!(info.state, LockState::Expired);
    let new = Token::new();
    let f2 = fence_of(acquire(setup, &key, &new, LONG).await);
    assert!(f2 > f1, "a takeover must raise the fence: {f1} then {f2}");
    assert!(matches!(
        setup.backend.release(&key, &old, soon()).await,
        Err(Error::NotHeld { .. })
    ));
    assert!(matches!(
        setup.backend.extend(&key, &old, ttl(LONG), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    // The old holder's same-token acquire is a takeover attempt now: refused.
    assert!(matches!(
        acquire(setup, &key, &old, LONG).await,
        AcquireOutcome::Held { .. }
    ));
    setup
        .backend
        .release(&key, &new, soon())
        .await
        .expect("the new holder releases");
}

/// 11. Over 1,000 acquisitions by 8 clients, the fences seen inside the critical
///     sections strictly increase.
pub async fn fences_strictly_increase(setup: &Setup) {
    const CLIENTS: usize = 8;
    const EACH: usize = 125;
    let manager = setup.manager(LONG);
    let key = setup.key("fences");
    let seen = Arc::new(std::sync::Mutex::new(Vec::with_capacity(CLIENTS * EACH)));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let lock = manager.lock(key.as_str()).unwrap();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..EACH {
                let guard = lock
                    .acquire_timeout(Duration::from_secs(120))
                    .await
                    .expect("acquire");
                // Pushed while holding the lock: the vector is in acquisition order.
                seen.lock().unwrap().push(guard.fence());
                guard.release().await.expect("release");
                // Step back briefly so that one client cannot win every round.
                let pause = fastrand::u64(0..2_000);
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), CLIENTS * EACH);
    for pair in seen.windows(2) {
        assert!(
            pair[1] > pair[0],
            "fence went from {} to {}",
            pair[0],
            pair[1]
        );
    }
}

/// 12. A timed wait gives up near its deadline, and takes the lock when it is
///     released mid-wait.
pub async fn wait_with_timeout(setup: &Setup) {
    let manager = setup.manager(LONG);
    let key = setup.key("wait");
    let holder = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let waiter = manager.lock(key.as_str()).unwrap();

    let started = Instant::now();
    let timeout = Duration::from_millis(400);
    match waiter.acquire_timeout(timeout).await {
        Err(Error::Timeout { waited, .. }) => {
            let elapsed = started.elapsed();
            assert!(elapsed >= timeout, "gave up early, after {elapsed:?}");
            assert!(
                elapsed < timeout + Duration::from_millis(750),
                "gave up late, after {elapsed:?}"
            );
            assert!(waited >= timeout);
        }
        other => panic!("waiting on a held lock must time out, got {other:?}"),
    }

    let release_after = Duration::from_millis(300);
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(release_after).await;
        holder.release().await.expect("release");
    });
    let started = Instant::now();
    let guard = waiter
        .acquire_timeout(Duration::from_secs(10))
        .await
        .expect("a release mid-wait lets the waiter in");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= release_after - Duration::from_millis(50),
        "acquired before the release: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(3),
        "took {elapsed:?} to notice the release"
    );
    releaser.await.unwrap();
    guard.release().await.unwrap();
}

/// 13. `do_exclusively` keeps an occupancy counter at most 1 across 16 concurrent
///     callers, and runs each of them.
pub async fn do_exclusively_is_exclusive(setup: &Setup) {
    let manager = setup.manager(LONG);
    let key = setup.key("exclusive");
    let inside = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (manager, key, inside, ran) =
            (manager.clone(), key.clone(), inside.clone(), ran.clone());
        tasks.push(tokio::spawn(async move {
            manager
                .do_exclusively(key.as_str(), |_lease| async move {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    assert_eq!(now, 1, "two callers inside do_exclusively at once");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .await
                .expect("do_exclusively");
        }));
    }
    for task in tasks {
        task.await.expect("caller task");
    }
    assert_eq!(ran.load(Ordering::SeqCst), 16);
}

/// 14. When the lease runs out under `do_exclusively`, the work is stopped (its
///     future dropped) and the call returns `LockLost`.
pub async fn lost_lock_stops_do_exclusively(setup: &Setup) {
    let manager = setup
        .manager_builder(SHORT)
        .auto_extend(false)
        .build()
        .unwrap();
    let key = setup.key("lost");
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let started = Instant::now();
    let result = manager
        .do_exclusively(key.as_str(), {
            let (dropped, finished) = (dropped.clone(), finished.clone());
            |_lease| async move {
                let _flag = SetOnDrop(dropped);
                tokio::time::sleep(SHORT * 10).await;
                finished.store(true, Ordering::SeqCst);
            }
        })
        .await;
    assert!(
        matches!(
            result,
            Err(distrlock_core::ExclusiveError::Lock(Error::LockLost { .. }))
        ),
        "got {result:?}"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the work's future must be dropped"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the work must not run to completion"
    );
    assert!(
        started.elapsed() <= SHORT + Duration::from_millis(500),
        "stopped late: {:?}",
        started.elapsed()
    );
}

/// 15. With the backend unreachable, a guard reports the lock lost by its local
///     deadline. Needs the `make_unreachable` fault hook.
pub async fn unreachable_backend_loses_lock_by_deadline(setup: &Setup) {
    let manager = setup.manager(SHORT);
    let key = setup.key("unreachable");
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    if setup.faults.make_unreachable().await.is_err() {
        eprintln!(
            "SKIPPED unreachable_backend_loses_lock_by_deadline: the harness cannot make the backend unreachable"
        );
        return;
    }
    let deadline = guard.deadline();
    tokio::time::timeout_at(deadline + Duration::from_millis(300), guard.lost())
        .await
        .expect("the guard must report the lock lost by its local deadline");
    assert!(
        Instant::now() >= deadline - Duration::from_millis(5),
        "lost reported before the deadline"
    );
    assert!(guard.is_lost());
    assert_eq!(guard.time_left(), Duration::ZERO);
    let _ = setup.faults.restore().await;
    drop(guard);
}

/// 16. Dropping a guard frees the lock without waiting for its ttl.
pub async fn dropped_guard_frees_lock(setup: &Setup) {
    let manager = setup.manager(LONG);
    let key = setup.key("dropped");
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    drop(guard);
    let other = manager.lock(key.as_str()).unwrap();
    let guard = other
        .acquire_timeout(Duration::from_secs(5))
        .await
        .expect("a dropped guard must free the lock long before its 30 s ttl");
    guard.release().await.unwrap();
}

/// 17. `inspect` and `list` show the holder: owner, fence, state and remaining
///     lease; then released and expired states.
pub async fn inspect_and_list_show_holder(setup: &Setup) {
    let manager = setup
        .manager_builder(LONG)
        .owner("host-a:42")
        .build()
        .unwrap();
    let key = setup.key("inspect");
    assert!(
        setup.backend.inspect(&key).await.unwrap().is_none(),
        "no row before the first acquire"
    );
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let info = setup.backend.inspect(&key).await.unwrap().expect("row");
    assert_eq!(info.owner, "host-a:42");
    assert_eq!(info.fence, guard.fence());
    assert_eq!(info.state, LockState::Held);
    assert!(info.is_live());
    let remaining = info
        .remaining
        .expect("a held lock reports its remaining lease");
    assert!(
        remaining <= LONG && remaining > LONG - Duration::from_secs(10),
        "remaining {remaining:?}"
    );
    let expires = info.expires_at.expect("a held lock has an expiry");
    assert!(expires > info.acquired_at, "expiry after acquisition");

    let other = setup.key("inspect-other");
    let token = Token::new();
    fence_of(acquire(setup, &other, &token, SHORT).await);
    let listed: Vec<_> = setup
        .backend
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|i| i.key.as_str().starts_with(setup.prefix()))
        .collect();
    let keys: Vec<_> = listed.iter().map(|i| i.key.clone()).collect();
    assert!(
        keys.contains(&key) && keys.contains(&other),
        "list shows both: {keys:?}"
    );
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "list is ordered by key");

    guard.release().await.unwrap();
    let info = setup
        .backend
        .inspect(&key)
        .await
        .unwrap()
        .expect("row kept");
    assert_eq!(info.state, LockState::Released);
    assert_eq!(info.remaining, None);
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    let info = setup
        .backend
        .inspect(&other)
        .await
        .unwrap()
        .expect("row kept");
    assert_eq!(info.state, LockState::Expired);
}

/// 18. Bad input gets its typed error and changes nothing.
pub async fn bad_input_is_refused(setup: &Setup) {
    let manager = setup.manager(LONG);
    assert!(matches!(manager.lock(""), Err(Error::InvalidKey { .. })));
    assert!(matches!(
        manager.lock("k".repeat(256)),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        manager.lock(format!("{}a\0b", setup.prefix())),
        Err(Error::InvalidKey { .. })
    ));
    let lock = manager.lock(setup.key("bad-ttl").as_str()).unwrap();
    assert!(matches!(
        lock.clone().with_ttl(Duration::ZERO),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        lock.clone().with_ttl(Duration::MAX),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        lock.clone().with_ttl(Duration::from_secs(u64::MAX / 2)),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        setup.manager_builder(Duration::ZERO).build(),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        setup.manager_builder(LONG).owner("a\0b").build(),
        Err(Error::InvalidConfig { .. })
    ));
    let touched = setup
        .backend
        .list()
        .await
        .unwrap()
        .into_iter()
        .any(|i| i.key.as_str().starts_with(setup.prefix()));
    assert!(!touched, "refused input must not write a row");
}

/// 19. Dropping an acquire mid-flight never leaves a lease behind that outlives
///     the drop by long: the lock is free again within seconds, not its ttl.
///     Answers are delayed by 20 ms so that drops land after the backend granted
///     the lease but before the caller heard of it.
pub async fn cancelled_acquire_leaves_no_lock(setup: &Setup) {
    let delayed = Arc::new(DelayedBackend::new(
        setup.backend.clone(),
        Duration::from_millis(20),
    ));
    let manager = distrlock_core::LockManager::builder(delayed)
        .ttl(LONG)
        .build()
        .unwrap();
    let key = setup.key("cancelled");
    for cancel_after_ms in [1, 5, 10, 15] {
        let lock = manager.lock(key.as_str()).unwrap();
        let cancelled =
            tokio::time::timeout(Duration::from_millis(cancel_after_ms), lock.acquire()).await;
        assert!(
            cancelled.is_err(),
            "the acquire must still be in flight when dropped"
        );
        let other = setup.manager(LONG).lock(key.as_str()).unwrap();
        let guard = other
            .acquire_timeout(Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| {
                panic!("an acquire dropped after {cancel_after_ms} ms kept the lock: {e}")
            });
        guard.release().await.unwrap();
    }
}

/// 20. With release notifications, a waiter with a long poll interval takes the
///     lock promptly after a release. Skips on backends without notifications.
pub async fn release_wakes_waiter(setup: &Setup) {
    if setup.backend.release_notifier().is_none() {
        eprintln!("SKIPPED release_wakes_waiter: the backend has no release notifications");
        return;
    }
    let manager = setup
        .manager_builder(LONG)
        .retry_policy(
            distrlock_core::RetryPolicy::default()
                .with_initial_delay(Duration::from_secs(60))
                .with_max_delay(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let key = setup.key("notify");
    let holder = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let waiter = manager.lock(key.as_str()).unwrap();
    let waiting = tokio::spawn(async move {
        let guard = waiter.acquire_timeout(Duration::from_secs(20)).await?;
        let woke = Instant::now();
        guard.release().await?;
        Ok::<_, Error>(woke)
    });
    // Let the waiter make its first try and go to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let woke = waiting.await.unwrap().expect("waiter acquires");
    let handoff = woke - released;
    assert!(
        handoff < Duration::from_secs(2),
        "handoff took {handoff:?} despite a notification"
    );
}

/// 21. Killed server sessions cost at most one failed call; the lock stays held.
///     Needs the `kill_sessions` fault hook.
pub async fn killed_sessions_are_recovered(setup: &Setup) {
    let key = setup.key("killed");
    let token = Token::new();
    fence_of(acquire(setup, &key, &token, LONG).await);
    if setup.faults.kill_sessions().await.is_err() {
        eprintln!("SKIPPED killed_sessions_are_recovered: the harness cannot kill sessions");
        return;
    }
    let mut failures = 0;
    for _ in 0..3 {
        match setup.backend.extend(&key, &token, ttl(LONG), soon()).await {
            Ok(_) => break,
            Err(error) => {
                assert!(
                    error.is_transient(),
                    "a killed session must give a transient error, got {error}"
                );
                failures += 1;
            }
        }
    }
    assert!(
        failures <= 1,
        "{failures} calls failed after the sessions were killed"
    );
    setup
        .backend
        .release(&key, &token, soon())
        .await
        .expect("the holder still releases");
}

/// 22. The backend refuses every other token right up to the guard's local
///     deadline: the server's expiry (on its own clock, from when it ran the
///     statement) is never earlier than the client's conservative deadline.
pub async fn held_until_local_deadline(setup: &Setup) {
    let ttl = Duration::from_millis(1500);
    let manager = setup
        .manager_builder(ttl)
        .auto_extend(false)
        .build()
        .unwrap();
    let key = setup.key("deadline");
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    tokio::time::sleep_until(guard.deadline() - Duration::from_millis(50)).await;
    assert!(
        matches!(
            acquire(setup, &key, &Token::new(), LONG).await,
            AcquireOutcome::Held { .. }
        ),
        "the backend let another token in before the holder's local deadline"
    );
    let info = setup.backend.inspect(&key).await.unwrap().expect("row");
    assert_eq!(info.state, LockState::Held);
    drop(guard);
}

/// 23. The same token after its lease was released, or ran out, starts a new
///     holding: a greater fence, not the old one.
pub async fn same_token_after_release_or_expiry_gets_a_new_fence(setup: &Setup) {
    let key = setup.key("same-token-again");
    let token = Token::new();
    let f1 = fence_of(acquire(setup, &key, &token, LONG).await);
    setup.backend.release(&key, &token, soon()).await.unwrap();
    let f2 = fence_of(acquire(setup, &key, &token, SHORT).await);
    assert!(f2 > f1, "after a release: {f1} then {f2}");
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;
    let f3 = fence_of(acquire(setup, &key, &token, LONG).await);
    assert!(f3 > f2, "after expiry: {f2} then {f3}");
    assert_eq!(
        fence_of(acquire(setup, &key, &token, LONG).await),
        f3,
        "while live: the same"
    );
    setup.backend.release(&key, &token, soon()).await.unwrap();
}

/// 24. `extend_many` renews exactly the leases its tokens hold, answers each
///     entry in order, and changes nothing for the others: a wrong token, a key
///     never acquired, a released and an expired lease all get `NotHeld`.
pub async fn extend_many_renews_only_held_leases(setup: &Setup) {
    let backend = &setup.backend;
    assert!(
        backend
            .extend_many(&[], ttl(LONG), soon())
            .await
            .expect("an empty batch succeeds")
            .is_empty(),
        "an empty batch has no results"
    );
    let expired = setup.key("many-expired");
    let expired_token = Token::new();
    fence_of(acquire(setup, &expired, &expired_token, SHORT).await);
    tokio::time::sleep(SHORT + Duration::from_millis(100)).await;

    let (held_a, held_b) = (setup.key("many-held-a"), setup.key("many-held-b"));
    let (token_a, token_b) = (Token::new(), Token::new());
    fence_of(acquire(setup, &held_a, &token_a, SHORT).await);
    fence_of(acquire(setup, &held_b, &token_b, SHORT).await);
    let other = setup.key("many-other");
    fence_of(acquire(setup, &other, &Token::new(), LONG).await);
    let other_before = backend.inspect(&other).await.unwrap().expect("row");
    let released = setup.key("many-released");
    let released_token = Token::new();
    fence_of(acquire(setup, &released, &released_token, LONG).await);
    backend
        .release(&released, &released_token, soon())
        .await
        .unwrap();
    let missing = setup.key("many-missing");

    let leases = [
        (held_a.clone(), token_a),
        (other.clone(), Token::new()),
        (missing.clone(), Token::new()),
        (held_b.clone(), token_b),
        (released.clone(), released_token),
        (expired.clone(), expired_token),
        (held_a.clone(), token_a),
    ];
    let results = backend
        .extend_many(&leases, ttl(LONG), soon())
        .await
        .expect("extend_many must not fail as a whole");
    assert_eq!(results.len(), leases.len(), "one result per entry");
    let renewed: Vec<bool> = results
        .iter()
        .map(|result| match result {
            Ok(_) => true,
            Err(Error::NotHeld { .. }) => false,
            Err(error) => panic!("an entry failed with {error} instead of NotHeld"),
        })
        .collect();
    assert_eq!(
        renewed,
        [true, false, false, true, false, false, true],
        "held leases renewed in their positions, every other entry NotHeld"
    );

    // Past the SHORT ttl the held leases live on, renewed to LONG.
    tokio::time::sleep(SHORT + Duration::from_millis(200)).await;
    for key in [&held_a, &held_b] {
        let info = backend.inspect(key).await.unwrap().expect("row");
        assert_eq!(info.state, LockState::Held, "{key} was renewed");
        if let Some(remaining) = info.remaining {
            assert!(
                remaining > LONG - Duration::from_secs(10),
                "{key} renewed to the batch ttl, has {remaining:?}"
            );
        }
    }
    let other_after = backend.inspect(&other).await.unwrap().expect("row");
    assert_eq!(
        other_after.expires_at, other_before.expires_at,
        "a wrong token must not move the expiry"
    );
    assert_eq!(other_after.fence, other_before.fence);
    assert_eq!(
        backend
            .inspect(&released)
            .await
            .unwrap()
            .expect("row")
            .state,
        LockState::Released
    );
    assert_eq!(
        backend.inspect(&expired).await.unwrap().expect("row").state,
        LockState::Expired
    );
    assert!(
        backend.inspect(&missing).await.unwrap().is_none(),
        "no row is created for a key never acquired"
    );
    backend.release(&held_a, &token_a, soon()).await.unwrap();
    backend.release(&held_b, &token_b, soon()).await.unwrap();
}

/// 25. A try-acquire whose request is held back by an unreachable database, and
///     that its caller gave up on (with the manager's cleanup run while still
///     unreachable), takes no effect when the database is reachable again and
///     the held-back requests arrive (contract item 8, no late effects): no lease
///     that nobody holds appears later. Needs the `make_unreachable` and
///     `restore` fault hooks; `restore` must deliver what the network held back,
///     as a frozen path that heals does.
pub async fn timed_out_try_takes_no_effect_later(setup: &Setup) {
    let key = setup.key("late-delivery");
    let manager = setup
        .manager_builder(LONG)
        .call_timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    if setup.faults.make_unreachable().await.is_err() {
        eprintln!(
            "SKIPPED timed_out_try_takes_no_effect_later: the harness cannot make the backend unreachable"
        );
        return;
    }
    let tried = tokio::time::timeout(
        Duration::from_secs(5),
        manager.lock(key.as_str()).unwrap().try_acquire(),
    )
    .await
    .expect("a try on an unreachable backend must end by its call timeout");
    assert!(
        tried.as_ref().is_err_and(Error::is_transient),
        "a try on an unreachable backend fails transiently, got {tried:?}"
    );
    // The cleanup of the abandoned try runs (and gives up) while unreachable.
    tokio::time::timeout(Duration::from_secs(10), manager.settle())
        .await
        .expect("the manager's cleanup must end within two call timeouts");
    setup
        .faults
        .restore()
        .await
        .expect("a harness that can make the backend unreachable can restore it");
    // Time for the held-back requests to arrive and run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let info = setup.backend.inspect(&key).await.unwrap();
    assert!(
        !info.as_ref().is_some_and(|i| i.is_live()),
        "a try that arrived after its caller gave up took the lock: {info:?}"
    );
    let other = Token::new();
    fence_of(acquire(setup, &key, &other, LONG).await);
    setup.backend.release(&key, &other, soon()).await.unwrap();
}
