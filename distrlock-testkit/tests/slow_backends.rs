//! The suite never fails a correct backend for being slow, within its latency
//! budget, and fails clearly one that is slower than its budget or hangs.
//!
//! `DelayedHarness` makes every call of the memory backend (inspect and list
//! included) take 200 ms or 2 s more, and raises the latency budget by as much.
//! At 200 ms the whole suite runs, every case at once (they mostly sleep). At 2 s
//! a case takes up to a minute or two, so `at_2s_the_cases_that_used_to_fail`
//! runs only the cases that failed or never finished at that speed before the
//! suite scaled its waits by the budget, and `at_2s_the_whole_suite` (ignored:
//! a few minutes) runs them all.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use common::{Limiter, run_case, run_cases};
use distrlock_core::{
    AcquireOutcome, LockBackend, LockInfo, LockKey, MemoryBackend, Result, Token, Ttl,
};
use distrlock_testkit::{
    CASES, Capabilities, Capability, DelayedHarness, Harness, MemoryHarness, Setup, Skip,
};
use tokio::time::Instant;

const MEMORY: Capabilities = Capabilities::none()
    .with(Capability::Unreachable)
    .with(Capability::ReleaseNotifications);

fn at_200ms() -> DelayedHarness<MemoryHarness> {
    DelayedHarness::new(MemoryHarness, Duration::from_millis(200))
}

fn at_2s() -> DelayedHarness<MemoryHarness> {
    DelayedHarness::new(MemoryHarness, Duration::from_secs(2))
}

static ALL_AT_ONCE: Limiter = Limiter::new(64);

fn all_pass(harness: DelayedHarness<MemoryHarness>, names: &[&str]) {
    let verdicts = run_cases(&harness, MEMORY, names, &ALL_AT_ONCE);
    let failed: Vec<String> = verdicts
        .into_iter()
        .filter_map(|(name, verdict)| verdict.err().map(|message| format!("{name}: {message}")))
        .collect();
    assert!(
        failed.is_empty(),
        "failed on a slow backend:\n{}",
        failed.join("\n")
    );
}

/// The names of every case the memory harness can run.
fn every_case() -> Vec<&'static str> {
    CASES
        .iter()
        .filter(|case| MEMORY.missing(case.needs).is_empty())
        .map(|case| case.name)
        .collect()
}

#[test]
fn at_200ms_the_whole_suite() {
    // All at once: the cases mostly sleep, and one by one they take minutes.
    all_pass(at_200ms(), &every_case());
}

#[test]
fn at_2s_the_cases_that_used_to_fail() {
    all_pass(
        at_2s(),
        &[
            "lost_lock_stops_do_exclusively",
            "do_exclusively_is_exclusive",
            "wait_with_timeout",
            "cancelled_acquire_leaves_no_lock",
            "unreachable_backend_loses_lock_by_deadline",
            // Not `timed_out_try_takes_no_effect_later`: at 2 s it fails, on a
            // bug of the manager (see `at_2s_the_whole_suite`).
        ],
    );
}

/// Every case at 2 s per call. All pass, but `timed_out_try_takes_no_effect_later`
/// fails when it runs into a bug of distrlock-core's manager (reproduced at full
/// speed by `manager_bug_a_transiently_failed_try_lands_after_its_cleanup`).
#[test]
#[ignore = "about two minutes, every case with every call 2 s slower; timed_out_try_takes_no_effect_later may fail on a manager bug"]
fn at_2s_the_whole_suite() {
    all_pass(at_2s(), &every_case());
}

/// The memory backend 300 ms slower, but still claiming the memory harness's
/// budget of 100 ms.
#[derive(Clone, Copy)]
struct Overbudget;

#[async_trait]
impl Harness for Overbudget {
    async fn setup(&self) -> std::result::Result<Setup, Skip> {
        let setup = DelayedHarness::new(MemoryHarness, Duration::from_millis(300))
            .setup()
            .await?;
        Ok(setup.with_latency_budget(Duration::from_millis(100)))
    }
}

#[test]
fn a_backend_slower_than_its_budget_fails_saying_so() {
    let failure = run_case(Overbudget, MEMORY, "acquire_release_reacquire")
        .expect_err("calls of 300 ms fail a budget of 100 ms");
    assert!(
        failure.contains("over the latency budget of 100ms") && failure.contains("try_acquire("),
        "the failure names the call and the budget: {failure}"
    );
}

/// A backend whose `extend` never returns.
#[derive(Debug, Default)]
struct Hanging(MemoryBackend);

#[async_trait]
impl LockBackend for Hanging {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        self.0.try_acquire(key, token, ttl, owner, not_after).await
    }
    async fn extend(&self, _: &LockKey, _: &Token, _: Ttl, _: Instant) -> Result<SystemTime> {
        std::future::pending().await
    }
    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        self.0.release(key, token, not_after).await
    }
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.0.inspect(key).await
    }
    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.0.list().await
    }
    async fn create_table(&self) -> Result<()> {
        Ok(())
    }
    fn schema_sql(&self) -> String {
        String::new()
    }
}

#[derive(Clone, Copy)]
struct HangingHarness;

#[async_trait]
impl Harness for HangingHarness {
    async fn setup(&self) -> std::result::Result<Setup, Skip> {
        Ok(Setup::new(Arc::new(Hanging::default()))
            .with_latency_budget(Duration::from_millis(100))
            .with_fault_timeout(Duration::from_secs(1)))
    }
}

#[test]
fn a_hanging_call_fails_naming_the_call() {
    let started = std::time::Instant::now();
    let failure = run_case(HangingHarness, Capabilities::none(), "wrong_token_not_held")
        .expect_err("a backend whose extend hangs fails");
    assert!(
        failure.contains("extend(") && failure.contains("did not return within 1s"),
        "the failure names the call that hung: {failure}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "and comes within the fault timeout, not never"
    );
}

/// A backend whose try-acquire answers `Unavailable` at once (a connection
/// reset) while its request is still on the way and lands 300 ms later, before
/// its `not_after`: correct, since a transient error leaves the outcome unknown
/// until `not_after` (contract item 8).
#[derive(Debug, Default)]
struct LateLander(Arc<MemoryBackend>);

#[async_trait]
impl LockBackend for LateLander {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let (inner, key, token, owner) = (self.0.clone(), key.clone(), *token, owner.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = inner
                .try_acquire(&key, &token, ttl, &owner, not_after)
                .await;
        });
        Err(distrlock_core::Error::unavailable("connection reset", None))
    }
    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        self.0.extend(key, token, ttl, not_after).await
    }
    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        self.0.release(key, token, not_after).await
    }
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.0.inspect(key).await
    }
    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.0.list().await
    }
    async fn create_table(&self) -> Result<()> {
        Ok(())
    }
    fn schema_sql(&self) -> String {
        String::new()
    }
}

/// distrlock-core's manager, when a try fails with a transient error before its
/// `not_after` (a connection reset, or the backend's own timeout while a frozen
/// network still holds the request back), releases the token's lease at once in
/// the background instead of after that try's `not_after` (`Attempt`'s drop
/// waits only for tries still in flight). The request then lands after the
/// release and takes the lock, and nobody holds it until its ttl runs out. At
/// 2 s per call the conformance case `timed_out_try_takes_no_effect_later` runs
/// into this, depending on which of the held-back try and release the backend
/// runs first; this test makes the order certain.
#[test]
#[ignore = "fails until distrlock-core's Attempt waits for the not_after of tries that failed transiently before releasing"]
fn manager_bug_a_transiently_failed_try_lands_after_its_cleanup() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let memory = Arc::new(MemoryBackend::new());
        let manager = distrlock_core::LockManager::builder(Arc::new(LateLander(memory.clone())))
            .ttl(Duration::from_secs(30))
            .build()
            .unwrap();
        let tried = manager.lock("k").unwrap().try_acquire().await;
        assert!(
            tried.is_err_and(|e| e.is_transient()),
            "the try fails transiently"
        );
        manager.settle().await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let key = LockKey::new("k").unwrap();
        let info = memory.inspect(&key).await.unwrap();
        assert!(
            !info.as_ref().is_some_and(LockInfo::is_live),
            "the try landed after the manager's cleanup, and nobody holds the lease: {info:?}"
        );
    });
}
