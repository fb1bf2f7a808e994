//! [`Lock`]: a handle on one key, with try-acquire and waiting acquire.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::AcquireOutcome;
use crate::error::{Error, Result};
use crate::fence::Fence;
use crate::guard::{ClockMark, LockGuard, release_in_background};
use crate::key::LockKey;
use crate::line::{self, Place, Ticket, WaiterAnswer};
use crate::manager::{LockManager, ManagerConfig};
use crate::suspend::Sent;
use crate::token::Token;
use crate::ttl::Ttl;

/// A handle on the lock named by one key, made by [`LockManager::lock`].
///
/// Creating it sends nothing. Each acquire returns a [`LockGuard`] that holds the
/// lock until it is released, dropped or lost.
#[derive(Debug, Clone)]
pub struct Lock {
    manager: LockManager,
    key: LockKey,
    ttl: Ttl,
    token: Option<Token>,
    fair: bool,
}

/// How soon a waiter that polls (its backend announces no releases) asks
/// again when its ticket is next in line; one more of this per ticket ahead
/// of it, and at most a quarter turn, so that it never misses its turn.
const HEAD_POLL: Duration = Duration::from_millis(1);

impl Lock {
    pub(crate) fn new(manager: LockManager, key: LockKey) -> Self {
        let ttl = manager.inner.ttl;
        let fair = manager.inner.fair;
        Self {
            manager,
            key,
            ttl,
            token: None,
            fair,
        }
    }

    /// The key.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// The lease length this lock asks for.
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    /// Uses `ttl` instead of the manager's default.
    ///
    /// Returns [`Error::InvalidTtl`] when out of range, or [`Error::InvalidConfig`]
    /// when it leaves no room for the manager's heartbeat interval and margin.
    pub fn with_ttl(mut self, ttl: Duration) -> Result<Self> {
        let ttl = Ttl::new(ttl)?;
        self.manager.inner.check_ttl(ttl)?;
        self.ttl = ttl;
        Ok(self)
    }

    /// Acquires with this fixed token instead of a fresh random one each time (the
    /// Go original's static token).
    ///
    /// The backend treats every holder of the token as the same owner: acquiring
    /// while the token holds the lock succeeds, renews the lease and keeps the
    /// fence. Within one [`LockManager`], distrlock still allows only one live guard
    /// per key and token: a second acquire waits for (or, as a try, is refused with
    /// [`Error::HeldByOther`] by) the first guard, so that one guard's release
    /// cannot end another's lease. Sharing a static token between managers or
    /// processes makes them one owner: their leases are one lease.
    ///
    /// An acquire with a static token that is abandoned mid-flight is left to
    /// expire at its ttl instead of being released, since the lease may belong to
    /// a guard elsewhere.
    pub fn with_token(mut self, token: Token) -> Self {
        self.token = Some(token);
        self
    }

    /// Whether waiting acquires of this lock keep their turn in the key's line
    /// (`true`) or may take a free key ahead of earlier waiters; the default is
    /// the manager's ([`LockManagerBuilder::fair`](crate::LockManagerBuilder::fair)).
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// Tries once. Returns [`Error::HeldByOther`], with the holder's remaining lease
    /// when known, if another token holds the lock.
    pub async fn try_acquire(&self) -> Result<LockGuard> {
        self.observed("try", self.try_once_into_guard()).await
    }

    async fn try_once_into_guard(&self) -> Result<LockGuard> {
        let mut attempt = Attempt::new(self);
        let (answer, sent) = attempt.try_once(None).await?;
        match (answer.outcome, sent) {
            (AcquireOutcome::Acquired { fence, server_time }, sent) => {
                match attempt.make_guard(fence, sent, server_time) {
                    Ok(guard) => Ok(guard),
                    Err(Unusable::Late) => Err(Error::unavailable(
                        format!("the grant of {} arrived after its local deadline", self.key),
                        None,
                    )),
                    Err(Unusable::TokenInUse) => Err(Error::HeldByOther {
                        key: self.key.clone(),
                        remaining: None,
                    }),
                }
            }
            (AcquireOutcome::Held { remaining }, _) => Err(Error::HeldByOther {
                key: self.key.clone(),
                remaining,
            }),
        }
    }

    /// Waits until acquired, within the manager's [`RetryPolicy`](crate::RetryPolicy)
    /// deadline if it has one (else without limit).
    ///
    /// Transient backend errors (an unreachable database, a deadlock) are retried
    /// with the same backoff; any other error ends the wait. Retries reuse one
    /// token, so a try whose answer was lost cannot make the next one fail.
    pub async fn acquire(&self) -> Result<LockGuard> {
        self.acquire_until(self.manager.inner.retry.deadline())
            .await
    }

    /// Waits at most `timeout`, then returns [`Error::Timeout`]. A zero timeout
    /// tries exactly once. A try in flight at the deadline is allowed to finish
    /// (it is bounded by the call timeout), so the wait may end that much later.
    pub async fn acquire_timeout(&self, timeout: Duration) -> Result<LockGuard> {
        self.acquire_until(Some(timeout)).await
    }

    async fn acquire_until(&self, timeout: Option<Duration>) -> Result<LockGuard> {
        self.observed("wait", self.wait_for_guard(timeout)).await
    }

    /// Runs one acquire in a `distrlock.acquire` span (key, try or wait, fence,
    /// outcome) and records it in the metrics.
    async fn observed(
        &self,
        wait: &'static str,
        acquire: impl Future<Output = Result<LockGuard>>,
    ) -> Result<LockGuard> {
        let span = tracing::debug_span!(
            "distrlock.acquire",
            key = %self.key,
            wait,
            fence = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        let started = Instant::now();
        let result = acquire.instrument(span.clone()).await;
        let outcome = match &result {
            Ok(guard) => {
                span.record("fence", guard.fence().get());
                crate::metrics::acquired(started.elapsed());
                "acquired"
            }
            Err(Error::HeldByOther { .. }) => "held",
            Err(Error::Timeout { waited, .. }) => {
                crate::metrics::timed_out(*waited);
                "timeout"
            }
            Err(_) => "error",
        };
        span.record("outcome", outcome);
        result
    }

    async fn wait_for_guard(&self, timeout: Option<Duration>) -> Result<LockGuard> {
        let config = &self.manager.inner;
        let started = Instant::now();
        // An unrepresentable deadline (say, Duration::MAX) means no deadline.
        let deadline = timeout.and_then(|t| started.checked_add(t));
        let mut attempt = Attempt::new(self);
        // A caller that will wait if refused (any timeout but zero) says so to
        // the backend, which then hands it a ticket in the key's line (and may
        // announce the release to it).
        let waits = timeout != Some(Duration::ZERO);
        let notifier = config.backend.release_notifier();
        let mut ticket: Option<Ticket> = None;
        let mut tries: u32 = 0;
        let mut failures: u32 = 0;
        loop {
            // Subscribe before trying, so a release between the try and the sleep
            // still wakes us.
            let mut released = notifier.map(|n| n.subscribe());
            let place = waits.then_some(Place {
                ticket: ticket.map(|t| t.number),
                fair: self.fair,
            });
            // Whether this try was refused (not failed).
            let mut refused = false;
            // When the holder's lease ends, if the backend said.
            let holder_expiry = match attempt.try_once(place).await {
                Ok((answer, sent)) => match answer.outcome {
                    AcquireOutcome::Acquired { fence, server_time } => {
                        match attempt.make_guard(fence, sent, server_time) {
                            Ok(guard) => return Ok(guard),
                            // A late grant is like a failed try: back off and
                            // mind the deadline. The next try with the same
                            // token renews it.
                            Err(Unusable::Late | Unusable::TokenInUse) => None,
                        }
                    }
                    AcquireOutcome::Held { remaining } => {
                        failures = 0;
                        refused = true;
                        // A refusal without a ticket (the backend keeps no
                        // line, or could not tell this time) keeps the one we
                        // have, if any: the next try brings it again, and the
                        // backend hands out a new one if it is out of line.
                        ticket = answer.ticket.or(ticket);
                        remaining.and_then(|r| sent.at.checked_add(r))
                    }
                },
                Err(error) if error.is_transient() => {
                    failures = failures.saturating_add(1);
                    if failures.is_multiple_of(10) {
                        tracing::warn!(key = %self.key, %error, failures, "acquire keeps failing; still retrying");
                    } else {
                        tracing::debug!(key = %self.key, %error, "acquire failed transiently; retrying");
                    }
                    None
                }
                Err(error) => return Err(error),
            };
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Err(Error::Timeout {
                    key: self.key.clone(),
                    waited: now - started,
                });
            }
            let holder_left = holder_expiry.map(|at| at.saturating_duration_since(now));
            let delay = match ticket {
                // In line, and just refused (after a failed try, back off as
                // usual): ask again often enough never to miss our turn, which
                // lasts one TURN once it comes, and when the holder's lease (or
                // the running turn) ends. When every release is announced, the
                // announcements wake us; otherwise poll, the nearer the head
                // of the line the sooner (a long wait polls less often: 1/64
                // of it).
                Some(ticket) if refused => {
                    let poll = if notifier.is_some_and(|n| n.is_complete()) {
                        line::TURN / 2
                    } else {
                        HEAD_POLL
                            .saturating_mul(u32::try_from(ticket.ahead + 1).unwrap_or(u32::MAX))
                            .max((now - started) / 64)
                            .min(line::TURN / 4)
                    };
                    poll.min(holder_left.unwrap_or(poll))
                        .max(crate::RetryPolicy::MIN_DELAY)
                }
                // After a failed try: the usual backoff, but within a quarter
                // turn while we hold a ticket, so that a passing error does
                // not cost us our place.
                Some(_) => config.retry.delay(tries, holder_left).min(line::TURN / 4),
                None => config.retry.delay(tries, holder_left),
            };
            let mut wake = now
                .checked_add(delay)
                .unwrap_or(now + config.retry.max_delay());
            if let Some(deadline) = deadline {
                wake = wake.min(deadline);
            }
            tries = tries.saturating_add(1);
            match released.as_mut() {
                Some(subscription) => loop {
                    tokio::select! {
                        () = tokio::time::sleep_until(wake) => break,
                        () = subscription.released(&self.key) => {
                            tracing::trace!(key = %self.key, "woken by a release notification");
                            // Each release starts one ticket's turn: a fair
                            // waiter with releases still ahead of it moves up
                            // and sleeps on, and only the next in line asks.
                            // (A miscount is corrected by the next poll,
                            // within our turn.)
                            match ticket.as_mut() {
                                Some(t) if self.fair && t.ahead > 0 => t.ahead -= 1,
                                _ => break,
                            }
                        }
                    }
                },
                None => tokio::time::sleep_until(wake).await,
            }
        }
    }
}

/// The backend call of one try: [`LockBackend::try_acquire_as_waiter`] for a
/// caller that waits if refused (at `place` in the line), else
/// [`LockBackend::try_acquire`].
///
/// [`LockBackend::try_acquire_as_waiter`]: crate::LockBackend::try_acquire_as_waiter
/// [`LockBackend::try_acquire`]: crate::LockBackend::try_acquire
async fn backend_try(
    config: &ManagerConfig,
    key: &LockKey,
    token: &Token,
    ttl: Ttl,
    place: Option<Place>,
    not_after: Instant,
) -> Result<WaiterAnswer> {
    let (backend, owner) = (&config.backend, config.owner.as_str());
    match place {
        Some(place) => {
            backend
                .try_acquire_as_waiter(key, token, ttl, owner, place, not_after)
                .await
        }
        None => {
            let outcome = backend
                .try_acquire(key, token, ttl, owner, not_after)
                .await?;
            Ok(WaiterAnswer {
                outcome,
                ticket: None,
            })
        }
    }
}

/// Why a granted lease cannot be handed out as a guard.
enum Unusable {
    /// The answer came after the lease's local deadline.
    Late,
    /// A live guard of this manager already holds the key with this static token.
    TokenInUse,
}

/// One acquire call: its token, and what must be cleaned up if it is abandoned.
///
/// Dropping the caller never cancels a statement half-way. A backend whose
/// dropped acquires run to their end by themselves, with its later release of
/// the same token waiting for them ([`LockBackend::settles_dropped_acquires`]),
/// is called directly; for any other, each try runs in a task of its own. Until
/// the attempt turns into a guard, it remembers every try that may have granted
/// a lease without us seeing it: tries still running (timed out here, or
/// running when the caller gave up) and tries that failed transiently. Dropping
/// the attempt then releases the token's lease in the background, after those
/// tries, so a cancelled acquire never leaves a lock behind, and the release
/// cannot overtake the statement it undoes.
///
/// [`LockBackend::settles_dropped_acquires`]: crate::LockBackend::settles_dropped_acquires
struct Attempt<'a> {
    lock: &'a Lock,
    token: Token,
    /// Tries that may still take effect, each with its `not_after`: past that
    /// instant the backend guarantees it never will (contract item 8).
    in_flight: Vec<(JoinHandle<Result<WaiterAnswer>>, Instant)>,
    /// A try called directly (not in a task) is running: if the attempt is
    /// dropped now, the backend finishes it, and orders the cleanup's release
    /// after it.
    running_direct: bool,
    /// Whether a finished try may have granted a lease we did not see (it
    /// failed transiently, or its grant came too late to use).
    maybe_granted: bool,
    /// The latest `not_after` of such tries: a try that failed (its backend
    /// gave up before we did) may still take effect until then, so the cleanup
    /// releases only after it.
    settles_at: Option<Instant>,
    done: bool,
}

impl<'a> Attempt<'a> {
    fn new(lock: &'a Lock) -> Self {
        Self {
            lock,
            token: lock.token.unwrap_or_default(),
            in_flight: Vec::new(),
            running_direct: false,
            maybe_granted: false,
            settles_at: None,
            done: false,
        }
    }

    fn config(&self) -> &Arc<ManagerConfig> {
        &self.lock.manager.inner
    }

    /// One try, and the instant its request was sent. It is bounded by the call
    /// timeout and by the lease's own length minus the margin, since an answer
    /// that arrives later grants nothing usable. `place`: the caller waits for
    /// the key if refused, at this place in its line
    /// ([`LockBackend::try_acquire_as_waiter`]).
    ///
    /// [`LockBackend::try_acquire_as_waiter`]: crate::LockBackend::try_acquire_as_waiter
    async fn try_once(&mut self, place: Option<Place>) -> Result<(WaiterAnswer, Sent)> {
        let config = self.config().clone();
        let lock = self.lock;
        if lock.token.is_some() && config.static_guard_live(&lock.key, &self.token) {
            let refused = WaiterAnswer {
                outcome: AcquireOutcome::Held { remaining: None },
                ticket: None,
            };
            return Ok((refused, Sent::now()));
        }
        let bound = config
            .call_timeout
            .min(lock.ttl.get() - config.margin_for(lock.ttl));
        let (key, token, ttl) = (lock.key.clone(), self.token, lock.ttl);
        let sent = Sent::now();
        // We stop waiting at `not_after`; the backend makes sure the statement
        // cannot take effect after it, however late it reaches the server.
        let not_after = sent.at + bound;
        let timed_out = || {
            Error::unavailable(
                format!("acquire of {} did not answer within {bound:?}", lock.key),
                None,
            )
        };
        let answer = if config.backend.settles_dropped_acquires() {
            // No task: if we are dropped meanwhile, the backend finishes the
            // statement and orders our cleanup's release after it.
            self.running_direct = true;
            let call = backend_try(&config, &key, &token, ttl, place, not_after);
            let answer = tokio::time::timeout_at(not_after, call).await;
            self.running_direct = false;
            match answer {
                Err(_elapsed) => {
                    // The backend still runs it, and it may grant until
                    // `not_after`, which has passed.
                    self.may_have_granted(not_after);
                    return Err(timed_out());
                }
                Ok(answer) => Ok(answer),
            }
        } else {
            let task_config = config.clone();
            let call = tokio::spawn(async move {
                backend_try(&task_config, &key, &token, ttl, place, not_after).await
            });
            let index = self.in_flight.len();
            self.in_flight.push((call, not_after));
            let answer = tokio::time::timeout_at(not_after, &mut self.in_flight[index].0).await;
            match answer {
                Err(_elapsed) => {
                    // Leave it running in `in_flight`: it may still grant.
                    return Err(timed_out());
                }
                Ok(joined) => {
                    self.in_flight.swap_remove(index);
                    joined
                }
            }
        };
        match answer {
            Ok(Ok(answer)) => {
                if let AcquireOutcome::Held { .. } = answer.outcome {
                    crate::metrics::refused();
                }
                Ok((answer, sent))
            }
            Ok(Err(error)) => {
                // A transient error (a broken connection, the backend's own
                // timeout) may hide a grant, which may still land until the
                // try's bound.
                if error.is_transient() {
                    self.may_have_granted(not_after);
                }
                Err(error)
            }
            Err(join_error) => {
                self.may_have_granted(not_after);
                Err(Error::Backend {
                    message: format!("the backend's acquire of {} panicked", lock.key),
                    transient: false,
                    source: Some(Box::new(join_error)),
                })
            }
        }
    }

    /// Records a finished try that may have granted a lease unseen, and may
    /// still take effect until `not_after`.
    fn may_have_granted(&mut self, not_after: Instant) {
        self.maybe_granted = true;
        self.settles_at = self.settles_at.max(Some(not_after));
    }

    fn make_guard(
        &mut self,
        fence: Fence,
        sent: Sent,
        server_time: SystemTime,
    ) -> Result<LockGuard, Unusable> {
        let lock = self.lock;
        let config = self.config().clone();
        let deadline = sent.deadline(lock.ttl.get() - config.margin_for(lock.ttl));
        if Instant::now() >= deadline {
            tracing::debug!(key = %lock.key, "acquire answered after its local deadline");
            self.maybe_granted = true;
            return Err(Unusable::Late);
        }
        let is_static = lock.token.is_some();
        if is_static && !config.register_static_guard(&lock.key, &self.token) {
            return Err(Unusable::TokenInUse);
        }
        self.done = true;
        tracing::debug!(key = %lock.key, fence = %fence, "lock acquired");
        Ok(LockGuard::start(
            config,
            lock.key.clone(),
            self.token,
            fence,
            lock.ttl,
            ClockMark {
                sent,
                answered: Instant::now(),
                server: server_time,
            },
            is_static,
        ))
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        let in_flight = std::mem::take(&mut self.in_flight);
        // A static token's lease may belong to a guard elsewhere: let it expire.
        if self.done || self.lock.token.is_some() {
            return;
        }
        if in_flight.is_empty() && !self.maybe_granted && !self.running_direct {
            return;
        }
        let config = self.config().clone();
        let (key, token) = (self.lock.key.clone(), self.token);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let settles_at = self.settles_at;
        let background = config.background.clone();
        background.spawn(&runtime, async move {
            // The release must come after every abandoned try: wait until each
            // has answered, or has passed its `not_after`, after which the backend
            // guarantees it can no longer take effect; and until the bound of
            // every try that failed but may still land. A try called directly
            // that was running when we were dropped needs no wait here: its
            // backend orders this release after it.
            for (call, not_after) in in_flight {
                let _ = tokio::time::timeout_at(not_after, call).await;
            }
            if let Some(at) = settles_at {
                tokio::time::sleep_until(at).await;
            }
            release_in_background(config, key, token, false);
        });
    }
}
