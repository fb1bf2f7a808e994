//! Renewal that must keep running whatever runtime the first guard came from, and
//! work whose lease lapsed before it was released.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{ExclusiveError, LockManager, MemoryBackend};

/// A manager's first guard was taken on a `current_thread` runtime that then
/// stops being driven (its `block_on` returned). Guards taken later on another
/// runtime must still be renewed.
#[test]
fn guards_on_a_driven_runtime_are_renewed_when_the_first_runtime_stops() {
    let backend = Arc::new(MemoryBackend::new());
    let manager = LockManager::builder(backend)
        .ttl(Duration::from_millis(600))
        .build()
        .unwrap();
    let idle = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let first = idle
        .block_on(manager.lock("first").unwrap().try_acquire())
        .unwrap();
    let driven = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    driven.block_on(async {
        let second = manager.lock("second").unwrap().try_acquire().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(
            !second.is_lost(),
            "a guard on a running runtime was lost because the first guard's runtime stopped"
        );
    });
    drop(first);
}

/// The work's last poll blocks the thread past the lease's local deadline: the
/// lock may be someone else's by the time the work returns, so
/// `do_exclusively` must not report success.
#[tokio::test(flavor = "current_thread")]
async fn work_that_outlives_its_lease_is_not_ok() {
    let backend = Arc::new(MemoryBackend::new());
    let manager = LockManager::builder(backend)
        .ttl(Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let result = manager
        .do_exclusively("k", |_lease| async {
            // A synchronous write, a CPU loop: nothing can interrupt it.
            std::thread::sleep(Duration::from_millis(600));
            42
        })
        .await;
    match result {
        Err(ExclusiveError::LostAfterWork { output, .. }) => {
            assert_eq!(output, 42, "the error carries the work's output")
        }
        other => panic!("the lease lapsed during the work, yet do_exclusively returned {other:?}"),
    }
}
