//! The watcher around a case's backend: times every call against the latency
//! budget and the fault timeout, cuts calls that hang, records panics, and knows
//! which calls are in flight, so that a failing case can name the call at fault.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::{self, Write as _};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockInfo, LockKey, Place, ReleaseNotifier, Result, Token,
    Ttl, WaiterAnswer,
};
use futures_util::FutureExt;
use tokio::time::Instant;

/// How many finished calls a report lists.
const RECENT: usize = 12;

/// What one case's watcher knows. Shared by the [`Setup`](crate::Setup) and
/// every [`Watched`] backend of the case.
pub(crate) struct Watch {
    prefix: String,
    state: Mutex<State>,
}

struct State {
    budget: Duration,
    fault_timeout: Duration,
    next_id: u64,
    in_flight: BTreeMap<u64, (String, Instant)>,
    recent: VecDeque<String>,
    violations: Vec<String>,
    panics: Vec<String>,
    /// Faults currently on.
    faults_on: usize,
    last_fault_start: Option<Instant>,
    last_fault_end: Option<Instant>,
    calls: u64,
    slowest: Option<(Duration, String)>,
}

impl Watch {
    pub(crate) fn new(prefix: String) -> Self {
        Self {
            prefix,
            state: Mutex::new(State {
                budget: crate::harness::DEFAULT_LATENCY_BUDGET,
                fault_timeout: crate::harness::DEFAULT_FAULT_TIMEOUT,
                next_id: 0,
                in_flight: BTreeMap::new(),
                recent: VecDeque::new(),
                violations: Vec::new(),
                panics: Vec::new(),
                faults_on: 0,
                last_fault_start: None,
                last_fault_end: None,
                calls: 0,
                slowest: None,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn configure(&self, budget: Duration, fault_timeout: Duration) {
        let mut state = self.state();
        state.budget = budget;
        state.fault_timeout = fault_timeout;
    }

    pub(crate) fn fault_started(&self) {
        let mut state = self.state();
        state.faults_on += 1;
        state.last_fault_start = Some(Instant::now());
    }

    pub(crate) fn fault_ended(&self) {
        let mut state = self.state();
        state.faults_on = state.faults_on.saturating_sub(1);
        state.last_fault_end = Some(Instant::now());
    }

    /// A key as reports show it: without the setup's prefix.
    pub(crate) fn key(&self, key: &LockKey) -> String {
        match key.as_str().strip_prefix(&self.prefix) {
            Some(rest) => format!("…/{rest}"),
            None => key.as_str().to_owned(),
        }
    }

    /// The violations and panics recorded so far, if any.
    pub(crate) fn problems(&self) -> Option<String> {
        let state = self.state();
        if state.violations.is_empty() && state.panics.is_empty() {
            return None;
        }
        let mut out = String::new();
        for panic in &state.panics {
            let _ = writeln!(out, "- {panic}");
        }
        for violation in &state.violations {
            let _ = writeln!(out, "- {violation}");
        }
        Some(out)
    }

    /// The calls in flight and the last calls that finished.
    pub(crate) fn report(&self) -> String {
        let state = self.state();
        let now = Instant::now();
        let mut out = String::new();
        if state.in_flight.is_empty() {
            out.push_str("no backend call in flight\n");
        } else {
            out.push_str("backend calls in flight:\n");
            for (what, started) in state.in_flight.values() {
                let _ = writeln!(out, "- {what}, for {:?}", now - *started);
            }
        }
        if !state.recent.is_empty() {
            out.push_str("last calls that returned:\n");
            for what in &state.recent {
                let _ = writeln!(out, "- {what}");
            }
        }
        out
    }

    /// How many calls finished, and the slowest outside faults.
    pub(crate) fn stats(&self) -> String {
        let state = self.state();
        match &state.slowest {
            Some((took, what)) => format!(
                "{} calls, slowest {what} in {took:?} (budget {:?})",
                state.calls, state.budget
            ),
            None => format!("{} calls", state.calls),
        }
    }

    /// Whether a call that ran from `started` to `ended` overlapped a fault, or
    /// ran within a fault timeout after one.
    fn faulty(state: &State, started: Instant, ended: Instant) -> bool {
        let after_last = match (state.last_fault_start, state.last_fault_end) {
            (Some(start), Some(end)) => start <= ended && end + state.fault_timeout > started,
            (Some(start), None) => start <= ended,
            (None, _) => false,
        };
        state.faults_on > 0 || after_last
    }

    /// Runs one backend call described by `what`, watched.
    pub(crate) async fn run<T, F>(&self, what: String, call: F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
        T: fmt::Debug,
    {
        self.run_with(what, true, call).await
    }

    /// Runs one backend call described by `what`, watched; `budgeted` says
    /// whether the latency budget applies (not to DDL), or only the fault
    /// timeout.
    pub(crate) async fn run_with<T, F>(&self, what: String, budgeted: bool, call: F) -> Result<T>
    where
        F: Future<Output = Result<T>>,
        T: fmt::Debug,
    {
        let started = Instant::now();
        let (id, limit) = {
            let mut state = self.state();
            let id = state.next_id;
            state.next_id += 1;
            state.in_flight.insert(id, (what.clone(), started));
            (id, state.fault_timeout)
        };
        /// Forgets the call when it ends, also when its future is dropped.
        struct InFlight<'a>(&'a Watch, u64);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.state().in_flight.remove(&self.1);
            }
        }
        let _in_flight = InFlight(self, id);
        let outcome = tokio::time::timeout(limit, AssertUnwindSafe(call).catch_unwind()).await;
        let ended = Instant::now();
        let took = ended - started;
        let mut state = self.state();
        match outcome {
            Err(_elapsed) => {
                let message = format!(
                    "{what} did not return within {limit:?} (the fault timeout; contract item \
                     6, bounded calls): the backend hangs"
                );
                state.violations.push(message.clone());
                Err(Error::unavailable(format!("conformance: {message}"), None))
            }
            Ok(Err(panic)) => {
                let message = panic_message(&*panic);
                state
                    .panics
                    .push(format!("the backend panicked in {what}: {message}"));
                drop(state);
                std::panic::resume_unwind(panic)
            }
            Ok(Ok(result)) => {
                state.calls += 1;
                let faulty = Self::faulty(&state, started, ended);
                if budgeted && !faulty {
                    if took > state.budget {
                        let message = format!(
                            "{what} took {took:?}, over the latency budget of {:?} (set it with \
                             Setup::with_latency_budget if the backend is this slow when \
                             healthy)",
                            state.budget
                        );
                        state.violations.push(message);
                    }
                    if state.slowest.as_ref().is_none_or(|(t, _)| took > *t) {
                        state.slowest = Some((took, what.clone()));
                    }
                }
                if state.recent.len() == RECENT {
                    state.recent.pop_front();
                }
                let shown = match &result {
                    Ok(value) => format!("{value:?}"),
                    Err(error) => format!("Err({error})"),
                };
                let shown: String = shown.chars().take(160).collect();
                state
                    .recent
                    .push_back(format!("{what} → {shown} in {took:?}"));
                result
            }
        }
    }
}

/// The text of a panic payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a non-text panic payload)".to_owned()
    }
}

/// A backend whose every call is run through a [`Watch`].
pub(crate) struct Watched {
    inner: Arc<dyn LockBackend>,
    watch: Arc<Watch>,
}

impl Watched {
    pub(crate) fn new(inner: Arc<dyn LockBackend>, watch: Arc<Watch>) -> Self {
        Self { inner, watch }
    }
}

impl fmt::Debug for Watched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

#[async_trait]
impl LockBackend for Watched {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        let what = format!("try_acquire({}, ttl {:?})", self.watch.key(key), ttl.get());
        let call = self.inner.try_acquire(key, token, ttl, owner, not_after);
        self.watch.run(what, call).await
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
        let what = format!(
            "try_acquire_as_waiter({}, ttl {:?})",
            self.watch.key(key),
            ttl.get()
        );
        let call = self
            .inner
            .try_acquire_as_waiter(key, token, ttl, owner, place, not_after);
        self.watch.run(what, call).await
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        let what = format!("extend({}, ttl {:?})", self.watch.key(key), ttl.get());
        let call = self.inner.extend(key, token, ttl, not_after);
        self.watch.run(what, call).await
    }

    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let first = leases.first().map(|(key, _)| self.watch.key(key));
        let what = format!(
            "extend_many({} leases{}, ttl {:?})",
            leases.len(),
            first.map(|k| format!(" from {k}")).unwrap_or_default(),
            ttl.get()
        );
        let call = self.inner.extend_many(leases, ttl, not_after);
        self.watch.run(what, call).await
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        let what = format!("release({})", self.watch.key(key));
        let call = self.inner.release(key, token, not_after);
        self.watch.run(what, call).await
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        let what = format!("inspect({})", self.watch.key(key));
        self.watch.run(what, self.inner.inspect(key)).await
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        let call = async {
            // Shown as a count: the table may be shared with other setups.
            self.inner.list().await.map(Listed)
        };
        self.watch
            .run("list()".to_owned(), call)
            .await
            .map(|listed| listed.0)
    }

    async fn create_table(&self) -> Result<()> {
        // DDL may take longer than a lock call: only the fault timeout applies.
        self.watch
            .run_with(
                "create_table()".to_owned(),
                false,
                self.inner.create_table(),
            )
            .await
    }

    fn schema_sql(&self) -> String {
        self.inner.schema_sql()
    }

    /// Watching adds nothing a dropped call could leave half done: the inner
    /// backend's promise holds as it is.
    fn settles_dropped_acquires(&self) -> bool {
        self.inner.settles_dropped_acquires()
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        self.inner.release_notifier()
    }
}

/// A list answer, shown by its length.
struct Listed(Vec<LockInfo>);

impl fmt::Debug for Listed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} rows", self.0.len())
    }
}
