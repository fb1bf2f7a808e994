//! The line of waiters of the in-memory backend (contract item 14), beyond
//! what the conformance suite checks: unfair grants leave no turns behind.

use std::time::Duration;

use distrlock_core::{AcquireOutcome, LockBackend, LockKey, MemoryBackend, Place, Token, Ttl};
use tokio::time::Instant;

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(30)
}

#[tokio::test]
async fn an_unfair_grant_out_of_turn_leaves_no_turn_behind() {
    let backend = MemoryBackend::new();
    let key = LockKey::new("unfair").unwrap();
    let ttl = Ttl::new(Duration::from_secs(30)).unwrap();
    let unfair = |ticket| Place {
        ticket,
        fair: false,
    };
    let holder = Token::new();
    backend
        .try_acquire(&key, &holder, ttl, "h", soon())
        .await
        .unwrap();
    let (b, c) = (Token::new(), Token::new());
    let tb = backend
        .try_acquire_as_waiter(&key, &b, ttl, "b", unfair(None), soon())
        .await
        .unwrap()
        .ticket
        .expect("a ticket");
    let tc = backend
        .try_acquire_as_waiter(&key, &c, ttl, "c", unfair(None), soon())
        .await
        .unwrap()
        .ticket
        .expect("a ticket");
    assert!(tc.number > tb.number);
    backend.release(&key, &holder, soon()).await.unwrap();
    // The later unfair waiter takes the free key in the first one's turn.
    let granted = backend
        .try_acquire_as_waiter(&key, &c, ttl, "c", unfair(Some(tc.number)), soon())
        .await
        .unwrap();
    assert!(matches!(granted.outcome, AcquireOutcome::Acquired { .. }));
    backend.release(&key, &c, soon()).await.unwrap();
    // No turn is left for either ticket: a plain try takes the key at once.
    let plain = backend
        .try_acquire(&key, &Token::new(), ttl, "d", soon())
        .await
        .unwrap();
    assert!(
        matches!(plain, AcquireOutcome::Acquired { .. }),
        "a plain try after unfair grants was refused: {plain:?}"
    );
}
