//! What a backend provides to run the conformance suite: a [`Harness`] that makes
//! fresh [`Setup`]s, optional [`Faults`], and the [`Capabilities`] it declares.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use distrlock_core::{LockBackend, LockKey, LockManager, LockManagerBuilder, RetryPolicy};

use crate::watch::{Watch, Watched};

/// Makes a fresh, isolated backend for each conformance case.
///
/// "Isolated" means no other case sees its keys: use a table of its own, or share a
/// table and rely on [`Setup::key`], which prefixes every key with a name unique
/// to the setup.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A backend whose table exists, or [`Skip`] when its server cannot be reached
    /// (a failure under `DISTRLOCK_REQUIRE_DB=1`).
    async fn setup(&self) -> Result<Setup, Skip>;
}

/// The latency budget of a [`Setup`] that does not set one: 250 ms.
pub const DEFAULT_LATENCY_BUDGET: Duration = Duration::from_millis(250);

/// The fault timeout of a [`Setup`] that does not set one: 30 s.
pub const DEFAULT_FAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How far apart two readings of the same clock instant may be in what a backend
/// reports (a reading rounded to the microseconds a database stores, say): 2 ms.
/// Durations are compared within this plus 1/500 of their length
/// ([`MAX_CLOCK_RATE_DIFFERENCE`](distrlock_core::server_clock::MAX_CLOCK_RATE_DIFFERENCE)),
/// see [`Setup::tolerance`].
pub const TIME_TOLERANCE: Duration = Duration::from_millis(2);

/// One case's backend, with its fault hooks, a unique key prefix and the timing it
/// runs under.
///
/// # Timing
///
/// - The **latency budget** ([`with_latency_budget`](Self::with_latency_budget),
///   default [`DEFAULT_LATENCY_BUDGET`]) is the longest one call of a correct
///   backend takes while its database is reachable, on a loaded CI machine,
///   waiting for a pooled connection (or opening one) included. A call that takes
///   longer fails the case with a message naming the call and the budget
///   (`create_table` is exempt: DDL may be slower). The cases scale their ttls
///   and waits by it (see [`short_ttl`](Self::short_ttl),
///   [`long_ttl`](Self::long_ttl)).
/// - The **fault timeout** ([`with_fault_timeout`](Self::with_fault_timeout),
///   default [`DEFAULT_FAULT_TIMEOUT`]) bounds every call while a fault is on (the
///   database made unreachable, sessions killed) and for that long after it ended:
///   the backend's own connect and statement timeouts, plus some slack. A call that
///   has not returned by then is cut, and the case fails naming it (contract item
///   6, bounded calls).
/// - Each case runs within [`case_timeout`](Self::case_timeout); one that does not
///   finish fails, listing the calls still in flight.
pub struct Setup {
    /// The backend under test.
    ///
    /// [`run_case`](crate::run_case) wraps it in a watcher that times every call
    /// against the latency budget and the fault timeout and records panics.
    pub backend: Arc<dyn LockBackend>,
    /// Ways to break the backend on purpose; [`NoFaults`] if it has none.
    pub faults: Arc<dyn Faults>,
    prefix: String,
    latency_budget: Duration,
    fault_timeout: Duration,
    capabilities: Capabilities,
    pub(crate) watch: Arc<Watch>,
    armed: bool,
}

impl Setup {
    /// A setup without fault hooks.
    pub fn new(backend: Arc<dyn LockBackend>) -> Self {
        Self::with_faults(backend, Arc::new(NoFaults))
    }

    /// A setup with fault hooks.
    pub fn with_faults(backend: Arc<dyn LockBackend>, faults: Arc<dyn Faults>) -> Self {
        let prefix = format!("conformance-{:016x}/", fastrand::u64(..));
        Self {
            backend,
            faults,
            watch: Arc::new(Watch::new(prefix.clone())),
            prefix,
            latency_budget: DEFAULT_LATENCY_BUDGET,
            fault_timeout: DEFAULT_FAULT_TIMEOUT,
            capabilities: Capabilities::none(),
            armed: false,
        }
    }

    /// Sets the latency budget: the longest one call of a correct backend takes
    /// on this setup while its database is reachable (see [Timing](Self#timing)).
    /// At least 1 ms.
    pub fn with_latency_budget(mut self, budget: Duration) -> Self {
        self.latency_budget = budget.max(Duration::from_millis(1));
        self
    }

    /// Sets the fault timeout: the longest a call may take while a fault is on,
    /// and for as long after it ended (see [Timing](Self#timing)). Never less
    /// than twice the latency budget.
    pub fn with_fault_timeout(mut self, timeout: Duration) -> Self {
        self.fault_timeout = timeout;
        self
    }

    /// The latency budget.
    pub fn latency_budget(&self) -> Duration {
        self.latency_budget
    }

    /// The fault timeout, at least twice the latency budget.
    pub fn fault_timeout(&self) -> Duration {
        self.fault_timeout.max(self.latency_budget * 2)
    }

    /// The ttl of leases a case waits out: 800 ms, or 8 latency budgets if longer.
    pub fn short_ttl(&self) -> Duration {
        Duration::from_millis(800).max(self.latency_budget * 8)
    }

    /// The ttl of leases that must not run out during a case: 30 s, or 100
    /// latency budgets if longer.
    pub fn long_ttl(&self) -> Duration {
        Duration::from_secs(30).max(self.latency_budget * 100)
    }

    /// How long one case may run: 120 s + 100 latency budgets + 4 fault timeouts.
    pub fn case_timeout(&self) -> Duration {
        Duration::from_secs(120) + self.latency_budget * 100 + self.fault_timeout() * 4
    }

    /// How far a duration the backend reports may be from the one the case
    /// expects: [`TIME_TOLERANCE`] plus 1/500 of `length` (the clock-rate
    /// allowance of contract item 4).
    pub fn tolerance(&self, length: Duration) -> Duration {
        TIME_TOLERANCE + length / distrlock_core::server_clock::MAX_CLOCK_RATE_DIFFERENCE
    }

    /// The capabilities the suite was told this harness has (by
    /// [`conformance_tests!`](crate::conformance_tests) or
    /// [`run_case_with`](crate::run_case_with)).
    pub fn capabilities(&self) -> Capabilities {
        self.capabilities
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
    /// backoff (5–50 ms), the given ttl, and a call timeout of 10 s or 4 latency
    /// budgets if longer.
    pub fn manager_builder(&self, ttl: Duration) -> LockManagerBuilder {
        LockManager::builder(self.backend.clone())
            .ttl(ttl)
            .owner("distrlock-conformance")
            .call_timeout(Duration::from_secs(10).max(self.latency_budget * 4))
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

    /// Calls [`Faults::make_unreachable`]; panics if the harness does not offer it.
    /// Calls during the fault (and for a fault timeout after it) are bounded by
    /// the fault timeout instead of the latency budget.
    pub async fn make_unreachable(&self) {
        self.watch.fault_started();
        if self.faults.make_unreachable().await.is_err() {
            panic!(
                "{}",
                Capability::Unreachable.unsupported_message("make_unreachable")
            );
        }
    }

    /// Calls [`Faults::restore`]; panics if the harness does not offer it.
    pub async fn restore(&self) {
        let restored = self.faults.restore().await;
        self.watch.fault_ended();
        if restored.is_err() {
            panic!("{}", Capability::Unreachable.unsupported_message("restore"));
        }
    }

    /// Calls [`Faults::kill_sessions`]; panics if the harness does not offer it.
    pub async fn kill_sessions(&self) {
        self.watch.fault_started();
        let killed = self.faults.kill_sessions().await;
        self.watch.fault_ended();
        if killed.is_err() {
            panic!(
                "{}",
                Capability::KillSessions.unsupported_message("kill_sessions")
            );
        }
    }

    /// Calls [`Faults::missing_table`], watched like the setup's backend; panics
    /// if the harness does not offer it.
    pub async fn missing_table(&self) -> Arc<dyn LockBackend> {
        match self.faults.missing_table().await {
            Ok(backend) => self.watched(backend),
            Err(Unsupported) => {
                panic!(
                    "{}",
                    Capability::SchemaMissing.unsupported_message("missing_table")
                )
            }
        }
    }

    /// `backend`, wrapped in this setup's watcher (as the setup's own backend is
    /// once [`run_case`](crate::run_case) armed it).
    pub(crate) fn watched(&self, backend: Arc<dyn LockBackend>) -> Arc<dyn LockBackend> {
        Arc::new(Watched::new(backend, self.watch.clone()))
    }

    /// Gets the setup ready to run a case: records the capabilities and the
    /// timing in the watcher, and wraps the backend in it (once).
    pub(crate) fn arm(&mut self, capabilities: Capabilities) {
        self.capabilities = capabilities;
        self.watch
            .configure(self.latency_budget, self.fault_timeout());
        if !self.armed {
            self.armed = true;
            self.backend = self.watched(self.backend.clone());
        }
    }
}

impl fmt::Debug for Setup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Setup")
            .field("backend", &self.backend)
            .field("prefix", &self.prefix)
            .field("latency_budget", &self.latency_budget)
            .field("fault_timeout", &self.fault_timeout())
            .field("capabilities", &self.capabilities)
            .finish_non_exhaustive()
    }
}

/// Ways to break a backend on purpose. Every hook defaults to [`Unsupported`].
///
/// A hook is used only by the cases that need its [`Capability`], and only when
/// the harness declares it (`conformance_tests!(H, supports = [...])`); a
/// declared capability whose hook returns [`Unsupported`] fails those cases.
#[async_trait]
pub trait Faults: Send + Sync {
    /// Makes the backend's database unreachable, as a network path that freezes:
    /// requests stall, and every call must still return (with an error) within
    /// the setup's fault timeout, by the backend's own timeouts (contract item 6).
    /// Capability [`Capability::Unreachable`].
    async fn make_unreachable(&self) -> Result<(), Unsupported> {
        Err(Unsupported)
    }

    /// Undoes [`make_unreachable`](Self::make_unreachable). Requests that were
    /// held back may be delivered now, late, as a healed network delivers them
    /// (contract item 8 says they must then change nothing), or be lost.
    async fn restore(&self) -> Result<(), Unsupported> {
        Err(Unsupported)
    }

    /// Kills the backend's current server sessions (`pg_terminate_backend`,
    /// MySQL `KILL`), as an administrator or a failover would, and returns once
    /// they are gone. The backend's next call on each may fail (transiently);
    /// the one after must work. Capability [`Capability::KillSessions`].
    async fn kill_sessions(&self) -> Result<(), Unsupported> {
        Err(Unsupported)
    }

    /// A second backend configured like the setup's, but on a table that does
    /// not exist (a fresh name on each call). Its calls must fail with
    /// [`Error::SchemaMissing`](distrlock_core::Error::SchemaMissing) until the
    /// case calls `create_table` on it; the harness may drop that table later.
    /// Capability [`Capability::SchemaMissing`].
    async fn missing_table(&self) -> Result<Arc<dyn LockBackend>, Unsupported> {
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

/// Something a harness or its backend may or may not offer, that some cases need.
///
/// A case that needs a capability the harness does not declare is generated as
/// `#[ignore = "needs …"]`, so `cargo test` counts it as ignored, not passed.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    /// [`Faults::make_unreachable`] and [`Faults::restore`] work. Token: `unreachable`.
    Unreachable,
    /// [`Faults::kill_sessions`] works. Token: `kill_sessions`.
    KillSessions,
    /// The backend announces releases: [`LockBackend::release_notifier`] is `Some`
    /// and wakes subscribers of a released key. Token: `release_notifications`.
    ReleaseNotifications,
    /// [`Faults::missing_table`] gives a backend whose table does not exist.
    /// Token: `schema_missing`.
    SchemaMissing,
    /// The backend keeps a line of waiters and serves it in order (contract
    /// item 14). Token: `fair_order`.
    FairOrder,
}

impl Capability {
    /// Every capability.
    pub const ALL: [Capability; 5] = [
        Capability::Unreachable,
        Capability::KillSessions,
        Capability::ReleaseNotifications,
        Capability::SchemaMissing,
        Capability::FairOrder,
    ];

    /// The token that names it in `conformance_tests!(H, supports = [...])`.
    pub const fn name(self) -> &'static str {
        match self {
            Capability::Unreachable => "unreachable",
            Capability::KillSessions => "kill_sessions",
            Capability::ReleaseNotifications => "release_notifications",
            Capability::SchemaMissing => "schema_missing",
            Capability::FairOrder => "fair_order",
        }
    }

    /// What a harness that declares it must provide.
    pub const fn requires(self) -> &'static str {
        match self {
            Capability::Unreachable => "Faults::make_unreachable and Faults::restore",
            Capability::KillSessions => "Faults::kill_sessions",
            Capability::ReleaseNotifications => {
                "a backend whose release_notifier() announces releases"
            }
            Capability::SchemaMissing => "Faults::missing_table",
            Capability::FairOrder => {
                "a backend that serves waiters in ticket order (contract item 14)"
            }
        }
    }

    fn unsupported_message(self, hook: &str) -> String {
        format!(
            "this case needs the `{}` capability, but Faults::{hook} returned Unsupported: \
             implement {} in the harness, or do not declare `{}`",
            self.name(),
            self.requires(),
            self.name()
        )
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The set of [`Capability`]s a harness declares. [`Default`] is
/// [`none`](Self::none).
///
/// `conformance_tests!(H, supports = [unreachable, kill_sessions])` builds it
/// from the tokens; build it yourself for [`run_case_with`](crate::run_case_with):
///
/// ```
/// use distrlock_testkit::{Capabilities, Capability};
///
/// let caps = Capabilities::none().with(Capability::Unreachable);
/// assert!(caps.has(Capability::Unreachable));
/// assert!(!caps.has(Capability::KillSessions));
/// assert!(caps.unreachable && !caps.schema_missing);
/// ```
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Capabilities {
    /// [`Capability::Unreachable`].
    pub unreachable: bool,
    /// [`Capability::KillSessions`].
    pub kill_sessions: bool,
    /// [`Capability::ReleaseNotifications`].
    pub release_notifications: bool,
    /// [`Capability::SchemaMissing`].
    pub schema_missing: bool,
    /// [`Capability::FairOrder`].
    pub fair_order: bool,
}

impl Capabilities {
    /// No capability: only the cases that need none run.
    pub const fn none() -> Self {
        Self {
            unreachable: false,
            kill_sessions: false,
            release_notifications: false,
            schema_missing: false,
            fair_order: false,
        }
    }

    /// Every capability.
    pub const fn all() -> Self {
        Self {
            unreachable: true,
            kill_sessions: true,
            release_notifications: true,
            schema_missing: true,
            fair_order: true,
        }
    }

    /// This set and `capability`.
    pub const fn with(mut self, capability: Capability) -> Self {
        match capability {
            Capability::Unreachable => self.unreachable = true,
            Capability::KillSessions => self.kill_sessions = true,
            Capability::ReleaseNotifications => self.release_notifications = true,
            Capability::SchemaMissing => self.schema_missing = true,
            Capability::FairOrder => self.fair_order = true,
        }
        self
    }

    /// Whether `capability` is in the set.
    pub const fn has(&self, capability: Capability) -> bool {
        match capability {
            Capability::Unreachable => self.unreachable,
            Capability::KillSessions => self.kill_sessions,
            Capability::ReleaseNotifications => self.release_notifications,
            Capability::SchemaMissing => self.schema_missing,
            Capability::FairOrder => self.fair_order,
        }
    }

    /// Those of `needs` that are not in the set.
    pub fn missing(&self, needs: &[Capability]) -> Vec<Capability> {
        needs.iter().copied().filter(|c| !self.has(*c)).collect()
    }
}

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
