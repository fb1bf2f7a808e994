//! [`MemoryHarness`]: runs the conformance suite on core's in-memory backend.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockInfo, LockKey, MemoryBackend, Place, ReleaseNotifier,
    Result, Token, Ttl, WaiterAnswer,
};
use futures_util::FutureExt;
use tokio::time::Instant;

use crate::harness::{Faults, Harness, Setup, Skip, Unsupported};

/// How long a call to the harness's backend waits for an answer while the
/// "database" is unreachable, as a networked backend's statement timeout would.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// A fresh [`MemoryBackend`] per case, with the `make_unreachable` and `restore`
/// hooks, and release notifications: declare
/// `supports = [unreachable, release_notifications]`.
///
/// [`MemoryBackend::set_unreachable`] stalls every call until the backend is
/// reachable again, as a frozen network path holds packets. A real backend has
/// timeouts of its own, so the harness gives the memory backend one (1 s), as a
/// client would: a call that gets no answer in that time fails with
/// [`Error::Unavailable`], while its request stays held back and reaches the
/// backend once it is reachable again (where `not_after` refuses it if late,
/// contract item 8). Calls answered at once are passed straight through.
///
/// Latency budget 100 ms, fault timeout 3 s.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryHarness;

#[async_trait]
impl Harness for MemoryHarness {
    async fn setup(&self) -> std::result::Result<Setup, Skip> {
        let memory = Arc::new(MemoryBackend::new());
        let backend = Arc::new(WithTimeout(memory.clone()));
        Ok(Setup::with_faults(backend, Arc::new(MemoryFaults(memory)))
            .with_latency_budget(Duration::from_millis(100))
            .with_fault_timeout(Duration::from_secs(3)))
    }
}

struct MemoryFaults(Arc<MemoryBackend>);

#[async_trait]
impl Faults for MemoryFaults {
    async fn make_unreachable(&self) -> std::result::Result<(), Unsupported> {
        self.0.set_unreachable(true);
        Ok(())
    }

    async fn restore(&self) -> std::result::Result<(), Unsupported> {
        self.0.set_unreachable(false);
        Ok(())
    }
}

/// The memory backend with a client's call timeout: see [`MemoryHarness`].
#[derive(Debug)]
struct WithTimeout(Arc<MemoryBackend>);

/// Runs `call` and answers at once if it does; otherwise leaves it running on
/// its own, held back like a request on a frozen network, and gives up on it
/// after [`CALL_TIMEOUT`].
async fn bounded<T, F>(what: &str, call: F) -> Result<T>
where
    F: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut call = Box::pin(call);
    if let Some(answer) = (&mut call).now_or_never() {
        return answer;
    }
    let held_back = tokio::spawn(call);
    match tokio::time::timeout(CALL_TIMEOUT, held_back).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(join_error)) => std::panic::resume_unwind(join_error.into_panic()),
        Err(_) => Err(Error::unavailable(
            format!("{what}: no answer within {CALL_TIMEOUT:?}"),
            None,
        )),
    }
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl LockBackend for WithTimeout {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let (backend, key, token, owner) = (self.0.clone(), key.clone(), *token, owner.to_owned());
        bounded("try_acquire", async move {
            backend
                .try_acquire(&key, &token, ttl, &owner, not_after)
                .await
        })
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
        let (backend, key, token, owner) = (self.0.clone(), key.clone(), *token, owner.to_owned());
        bounded("try_acquire_as_waiter", async move {
            backend
                .try_acquire_as_waiter(&key, &token, ttl, &owner, place, not_after)
                .await
        })
        .await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let (backend, key, token) = (self.0.clone(), key.clone(), *token);
        bounded("extend", async move {
            backend.extend(&key, &token, ttl, not_after).await
        })
        .await
    }

    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let (backend, leases) = (self.0.clone(), leases.to_vec());
        bounded("extend_many", async move {
            backend.extend_many(&leases, ttl, not_after).await
        })
        .await
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let (backend, key, token) = (self.0.clone(), key.clone(), *token);
        bounded("release", async move {
            backend.release(&key, &token, not_after).await
        })
        .await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let (backend, key) = (self.0.clone(), key.clone());
        bounded("inspect", async move { backend.inspect(&key).await }).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let backend = self.0.clone();
        bounded("list", async move { backend.list().await }).await
    }

    async fn create_table(&self) -> Result<()> {
        self.0.create_table().await
    }

    fn schema_sql(&self) -> String {
        self.0.schema_sql()
    }

    fn settles_dropped_acquires(&self) -> bool {
        // A call held back here runs on in a task of its own, which a later
        // release does not wait for.
        false
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        self.0.release_notifier()
    }
}
