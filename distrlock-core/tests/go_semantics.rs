//! The Go original's semantics next to ours: one try, a bounded wait, work that
//! returns a `Result`, and a manager built from any backend.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{Error, ExclusiveError, LockBackend, LockManager, MemoryBackend};

#[tokio::test(start_paused = true)]
async fn try_do_exclusively_tries_once_and_reports_held_by_other() {
    let manager = LockManager::new(MemoryBackend::new());
    let _holder = manager.lock("job").unwrap().try_acquire().await.unwrap();
    let mut ran = false;
    let result = manager
        .try_do_exclusively("job", |_lease| async { ran = true })
        .await;
    assert!(
        matches!(result, Err(ExclusiveError::Lock(Error::HeldByOther { .. }))),
        "{result:?}"
    );
    assert!(!ran, "the work must not run when the lock is busy");
    let free = manager
        .try_do_exclusively("other-job", |lease| async move { lease.fence().get() })
        .await
        .unwrap();
    assert_eq!(free, 1);
}

#[tokio::test(start_paused = true)]
async fn do_exclusively_timeout_gives_up_at_its_timeout() {
    let manager = LockManager::new(MemoryBackend::new());
    let _holder = manager.lock("job").unwrap().try_acquire().await.unwrap();
    let started = tokio::time::Instant::now();
    let result = manager
        .do_exclusively_timeout("job", Duration::from_secs(2), |_lease| async {})
        .await;
    assert!(
        matches!(result, Err(ExclusiveError::Lock(Error::Timeout { .. }))),
        "{result:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn fallible_work_propagates_its_error_and_releases() {
    let manager = LockManager::new(MemoryBackend::new());
    let result = manager
        .do_exclusively_fallible("import", |_lease| async { "x".parse::<u32>() })
        .await;
    match result {
        Err(ExclusiveError::Work(error)) => {
            assert_eq!(error.to_string(), "invalid digit found in string")
        }
        other => panic!("{other:?}"),
    }
    let ok: Result<u32, ExclusiveError<u32, std::num::ParseIntError>> = manager
        .do_exclusively_fallible("import", |_lease| async { "7".parse::<u32>() })
        .await;
    assert_eq!(
        ok.unwrap(),
        7,
        "released after the failed work, so acquirable again"
    );
}

#[tokio::test(start_paused = true)]
async fn exclusive_errors_convert_into_distrlock_errors_with_question_mark() {
    async fn job(manager: &LockManager) -> distrlock_core::Result<i64> {
        let _holder = manager.lock("busy").unwrap().try_acquire().await?;
        let fence: i64 = manager
            .try_do_exclusively("busy", |lease| async move { lease.fence().get() })
            .await?;
        Ok(fence)
    }
    let manager = LockManager::new(MemoryBackend::new());
    assert!(matches!(
        job(&manager).await,
        Err(Error::HeldByOther { .. })
    ));
}

#[test]
fn a_manager_takes_any_backend_without_wrapping_a_shared_one_again() {
    let shared: Arc<dyn LockBackend> = Arc::new(MemoryBackend::new());
    let manager = LockManager::new(shared.clone());
    assert!(Arc::ptr_eq(manager.backend(), &shared));
    let concrete = Arc::new(MemoryBackend::new());
    let _ = LockManager::builder(concrete).build().unwrap();
    let _ = LockManager::new(MemoryBackend::new());
}
