//! What a backend provides to run the conformance suite: a [`Harness`] that makes
//! fresh [`Setup`]s, and optional [`Faults`].

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distrlock_core::{LockBackend, LockKey, LockManager, LockManagerBuilder, RetryPolicy};

/// Makes a fresh, isolated backend for each conformance case.
///
/// "Isolated" means no other case sees its keys: use a table of its own, or share a
/// table and rely on [`Setup::key`], which prefixes every key with a name unique
/// to the setup.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A backend whose table exists, or [`Skip`] when its server cannot be reached.
    async fn setup(&self) -> Result<Setup, Skip>;
}

/// One case's backend, with its fault hooks and a unique key prefix.
pub struct Setup {
    /// The backend under test.
    pub backend: Arc<dyn LockBackend>,
    /// Ways to break the backend on purpose; [`NoFaults`] if it has none.
    pub faults: Arc<dyn Faults>,
    prefix: String,
}

impl Setup {
    /// A setup without fault hooks.
    pub fn new(backend: Arc<dyn LockBackend>) -> Self {
        Self::with_faults(backend, Arc::new(NoFaults))
    }

    /// A setup with fault hooks.
    pub fn with_faults(backend: Arc<dyn LockBackend>, faults: Arc<dyn Faults>) -> Self {
        Self {
            backend,
            faults,
            prefix: format!("conformance-{:016x}/", fastrand::u64(..)),
        }
    }

    /// `name` under this setup's unique prefix.
    pub fn key(&self, name: &str) -> LockKey {
        LockKey::new(format!("{}{name}", self.prefix)).expect("conformance keys are valid")
    }

    /// The unique prefix of this setup's keys.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A manager builder on this backend with test-friendly waits: short
    /// backoff (5–50 ms) and the given ttl.
    pub fn manager_builder(&self, ttl: Duration) -> LockManagerBuilder {
        LockManager::builder(self.backend.clone())
            .ttl(ttl)
            .owner("distrlock-conformance")
            .retry_policy(
                RetryPolicy::default()
                    .with_initial_delay(Duration::from_millis(5))
                    .with_max_delay(Duration::from_millis(50)),
            )
    }

    /// [`manager_builder`](Self::manager_builder), built.
    pub fn manager(&self, ttl: Duration) -> LockManager {
        self.manager_builder(ttl)
            .build()
            .expect("conformance manager settings are valid")
    }
}

impl fmt::Debug for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Setup")
            .field("backend", &self.backend)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Ways to break a backend on purpose. Every hook defaults to [`Unsupported`], and
/// the cases that need an absent hook skip, saying so.
#[async_trait]
pub trait Faults: Send + Sync {
    /// Makes the backend's database unreachable: calls stall or fail, as behind a
    /// broken network.
    async fn make_unreachable(&self) -> Result<(), Unsupported> {
        Err(Unsupported)
    }

    /// Undoes [`make_unreachable`](Self::make_unreachable).
    async fn restore(&self) -> Result<(), Unsupported> {
        Err(Unsupported)
    }

    /// Kills the backend's current server sessions (`pg_terminate_backend`,
    /// MySQL `KILL`), as an administrator or a failover would.
    async fn kill_sessions(&self) -> Result<(), Unsupported> {
        Err(Unsupported)
    }
}

/// A backend without fault hooks.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFaults;

impl Faults for NoFaults {}

/// A fault hook the harness does not offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported;

/// Why a harness cannot run a case here, such as a database server that cannot
/// be reached.
#[derive(Debug, Clone)]
pub struct Skip(pub String);

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `DISTRLOCK_REQUIRE_DB=1` is set: then a skip is a failure.
pub fn require_db() -> bool {
    std::env::var("DISTRLOCK_REQUIRE_DB").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Reports a skipped test on stderr, or panics when [`require_db`] is set.
///
/// Database tests call this when their server cannot be reached, so a missing
/// server is visible in the output and fails CI.
pub fn skip(test: &str, reason: &str) {
    if require_db() {
        panic!("{test}: DISTRLOCK_REQUIRE_DB=1 but {reason}");
    }
    eprintln!("SKIPPED {test}: {reason} (set DISTRLOCK_REQUIRE_DB=1 to make this fail)");
}
