//! [`LockGuard`]: a held lock, its heartbeat and its local deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tracing::Instrument;

use crate::error::{Error, Result};
use crate::exclusive::ExclusiveError;
use crate::fence::Fence;
use crate::key::LockKey;
use crate::lease::Lease;
use crate::loss::LossReason;
use crate::manager::ManagerConfig;
use crate::renewal::Registration;
use crate::suspend::Sent;
use crate::token::Token;
use crate::ttl::Ttl;

/// A held lock.
///
/// While the guard lives, its manager's renewal task extends the lease (every
/// ttl/3 by default, batched with the manager's other guards through
/// [`LockBackend::extend_many`](crate::LockBackend::extend_many)) and watches the
/// **local deadline**: the instant the last successful
/// acquire or extend request was sent, plus the ttl, minus the safety margin. When
/// the deadline passes without a successful extend, or an extend finds the lease
/// gone, the guard declares the lock lost — even when the database cannot be
/// reached at all — and [`lost`](Self::lost) resolves. The database never frees the
/// lock before that deadline, so a guard that has not reported loss is the only
/// holder.
///
/// [`release`](Self::release) ends the lease. Dropping the guard releases it in the
/// background when a tokio runtime is available; otherwise (for example while the
/// runtime shuts down) the lease runs out at its ttl, so release guards explicitly
/// before leaving `main`.
///
/// The deadline counts time the host spends suspended (on Linux, through
/// `CLOCK_BOOTTIME`): tokio's clock stops during a suspend while the server's
/// does not, so a guard re-reads the suspend time whenever it looks at its
/// deadline, and after a resume it reports a lease that ran out meanwhile as
/// lost. On other systems a suspended host must be treated as having lost its
/// locks.
pub struct LockGuard {
    shared: Arc<GuardShared>,
    /// The guard's place in the manager's renewal; `None` without a runtime.
    renewal: Option<Registration>,
    released: bool,
}

/// What the guard, the renewal task and its `lost()` futures share.
pub(crate) struct GuardShared {
    config: Arc<ManagerConfig>,
    pub(crate) key: LockKey,
    pub(crate) token: Token,
    pub(crate) fence: Fence,
    pub(crate) ttl: Ttl,
    margin: Duration,
    /// Whether the token is static and registered with the manager.
    is_static: bool,
    /// The local deadline, as `at` less any suspend time since `suspended`.
    deadline: Mutex<Deadline>,
    /// The latest server clock reading, to notice a server clock that steps.
    clock: Mutex<ClockMark>,
    /// Whether the latest extend failed (an error or no answer): if the
    /// deadline passes now, the database was unreachable.
    failing: AtomicBool,
    /// Extends sent and not answered yet: one still out at the deadline means
    /// the database did not answer in time.
    extends_out: AtomicUsize,
    /// Whether the deadline was shortened because the server's clock ran ahead.
    stepped: AtomicBool,
    /// Why the lock was lost, once it is.
    reason: Mutex<Option<LossReason>>,
    /// When the lock was acquired, and whether its hold time was recorded.
    acquired: Instant,
    hold_recorded: AtomicBool,
    lost: watch::Sender<bool>,
}

/// An extend on its way; see [`GuardShared::extend_out`].
pub(crate) struct ExtendOut(Weak<GuardShared>);

impl Drop for ExtendOut {
    fn drop(&mut self) {
        if let Some(guard) = self.0.upgrade() {
            guard.extends_out.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// A local deadline: `at` on tokio's clock, less the time the host spends
/// suspended after it was computed (see [`crate::suspend`]).
#[derive(Debug, Clone, Copy)]
struct Deadline {
    at: Instant,
    suspended: std::time::Duration,
}

impl Deadline {
    fn new(sent: Sent, after: Duration) -> Self {
        Self {
            at: sent.at + after,
            suspended: sent.suspended,
        }
    }

    fn get(&self) -> Instant {
        Sent {
            at: self.at,
            suspended: self.suspended,
        }
        .deadline(Duration::ZERO)
    }
}

/// A reading of the backend's clock by the statement of a request sent at
/// `sent` whose answer arrived at `answered`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClockMark {
    pub(crate) sent: Sent,
    pub(crate) answered: Instant,
    pub(crate) server: SystemTime,
}

impl ClockMark {
    /// How far the server's clock ran ahead of (`Ok`) or behind (`Err`) ours
    /// between `self` and the later `next`, beyond what the round trips and the
    /// clock-rate allowance explain; zero when it kept time.
    fn drift_to(&self, next: &ClockMark) -> std::result::Result<Duration, Duration> {
        // The server read its clock between sending and answering, so between the
        // two readings our clock moved at least `next.sent − self.answered` and at
        // most `next.answered − self.sent`.
        // Time the host spent suspended counts too: the server's clock ran on.
        let slept = next.sent.suspended.saturating_sub(self.sent.suspended);
        let most = next.answered.saturating_duration_since(self.sent.at) + slept;
        let least = next.sent.at.saturating_duration_since(self.answered) + slept;
        let allowance = most / crate::server_clock::MAX_CLOCK_RATE_DIFFERENCE;
        match next.server.duration_since(self.server) {
            Ok(server) if server > most + allowance => Ok(server - most - allowance),
            Ok(server) if server + allowance < least => Err(least - server - allowance),
            Ok(_) => Ok(Duration::ZERO),
            Err(back) => Err(least + back.duration().saturating_sub(allowance)),
        }
    }
}

impl GuardShared {
    /// The local deadline, less any time the host spent suspended since it was
    /// computed: read afresh on every call, so a guard that wakes after a
    /// resume sees it passed.
    pub(crate) fn deadline(&self) -> Instant {
        self.deadline
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get()
    }

    /// The latest server clock reading plus the ttl (see
    /// [`LockGuard::expires_at`]).
    pub(crate) fn expires_at(&self) -> SystemTime {
        let server = self
            .clock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .server;
        server.checked_add(self.ttl.get()).unwrap_or(server)
    }

    /// Whether the lock is lost; marks it so when the deadline has passed.
    pub(crate) fn check_lost(&self) -> bool {
        if *self.lost.borrow() {
            return true;
        }
        let deadline = *self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        if Instant::now() >= deadline.get() {
            let reason = if crate::suspend::suspended()
                > deadline.suspended + Duration::from_millis(1)
                && Instant::now() < deadline.at
            {
                LossReason::Suspended
            } else if self.failing.load(Ordering::SeqCst)
                || self.extends_out.load(Ordering::SeqCst) > 0
            {
                LossReason::Unreachable
            } else if self.stepped.load(Ordering::SeqCst) {
                LossReason::ClockStep
            } else {
                LossReason::LeaseRanOut
            };
            self.mark_lost(reason);
            return true;
        }
        false
    }

    /// Counts an extend as sent until the returned token is dropped (when its
    /// answer is in, or it is given up).
    pub(crate) fn extend_out(self: &Arc<Self>) -> ExtendOut {
        self.extends_out.fetch_add(1, Ordering::SeqCst);
        ExtendOut(Arc::downgrade(self))
    }

    /// Records that an extend failed or did not answer in time.
    pub(crate) fn extend_failed(&self) {
        self.failing.store(true, Ordering::SeqCst);
        crate::metrics::extend_failed();
    }

    /// Records, once, how long the lock was held: at loss, release, drop or
    /// detach, whichever comes first.
    fn hold_ended(&self) {
        if !self.hold_recorded.swap(true, Ordering::SeqCst) {
            crate::metrics::held(self.acquired.elapsed());
        }
    }

    /// Why the lock was lost, if it was.
    pub(crate) fn loss_reason(&self) -> Option<LossReason> {
        *self.reason.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a successful extend whose request was sent at `sent` and whose
    /// statement read `server_time` on the backend's clock.
    ///
    /// Taking the later of the two deadlines is safe even for concurrent extends:
    /// the server's expiry is set by whichever extend it ran last, and every extend
    /// it ran, ran after it was sent.
    ///
    /// The server's clock is compared with ours since the previous reading: if it
    /// ran ahead by more than the round trips explain, it may run ahead again
    /// before the next extend, so the new deadline is shortened by that excess. A
    /// clock that went back is reported: leases then last longer than their ttl.
    pub(crate) fn extended(&self, sent: Sent, server_time: SystemTime) {
        self.failing.store(false, Ordering::SeqCst);
        let mark = ClockMark {
            sent,
            answered: Instant::now(),
            server: server_time,
        };
        let drift = {
            let mut clock = self.clock.lock().unwrap_or_else(PoisonError::into_inner);
            let drift = clock.drift_to(&mark);
            if mark.sent.at >= clock.sent.at {
                *clock = mark;
            }
            drift
        };
        let mut after = self.ttl.get() - self.margin;
        let mut shorten = false;
        match drift {
            Ok(ahead) if !ahead.is_zero() => {
                shorten = true;
                self.stepped.store(true, Ordering::SeqCst);
                tracing::warn!(
                    key = %self.key,
                    ahead_ms = ahead.as_millis() as u64,
                    "the database server's clock ran ahead of this host's; shortening the \
                     lock's local deadline (server clocks must slew, never step)"
                );
                after = after.saturating_sub(ahead);
            }
            Err(behind) if !behind.is_zero() => {
                tracing::warn!(
                    key = %self.key,
                    behind_ms = behind.as_millis() as u64,
                    "the database server's clock went back; a dead holder's lease may outlive \
                     its ttl (server clocks must slew, never step)"
                );
            }
            _ => {}
        }
        let new = Deadline::new(sent, after);
        let mut deadline = self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        // A clock that ran ahead shortens even a later deadline; otherwise the
        // later one stands.
        if new.get() > deadline.get() || shorten {
            *deadline = new;
        }
    }

    pub(crate) fn mark_lost(&self, reason: LossReason) {
        let newly = self
            .lost
            .send_if_modified(|lost| !std::mem::replace(lost, true));
        if newly {
            *self.reason.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
            crate::metrics::lost(reason);
            self.hold_ended();
            tracing::warn!(key = %self.key, fence = %self.fence, reason = reason.as_str(), "lock lost: {reason}");
        }
    }

    fn lost_error(&self) -> Error {
        Error::LockLost {
            key: self.key.clone(),
            reason: self.loss_reason().unwrap_or(LossReason::LeaseRanOut),
        }
    }

    /// One extend, bounded by the call timeout and by the local deadline. On
    /// success the deadline moves; when the lease is gone, or the deadline passes
    /// first, the lock is lost. A call that times out before the deadline is a
    /// transient error, and the lease may still be live.
    async fn extend_once(self: &Arc<Self>) -> Result<()> {
        if self.check_lost() {
            return Err(self.lost_error());
        }
        let sent = Sent::now();
        let _out = self.extend_out();
        let timeout_at = sent.at + self.config.call_timeout;
        // Past the deadline we no longer claim the lock: an extend that lands
        // later would keep a lease alive that nobody holds.
        let not_after = timeout_at.min(self.deadline());
        let call = self
            .config
            .backend
            .extend(&self.key, &self.token, self.ttl, not_after)
            .instrument(tracing::debug_span!(
                "distrlock.extend",
                key = %self.key,
                fence = %self.fence,
            ));
        tokio::pin!(call);
        let result = loop {
            let deadline = self.deadline();
            tokio::select! {
                result = &mut call => break Ok(result),
                // A concurrent extend may have moved the deadline: look again.
                () = tokio::time::sleep_until(deadline.min(timeout_at)) => {
                    if self.check_lost() {
                        break Err(self.lost_error());
                    }
                    if Instant::now() >= timeout_at {
                        self.extend_failed();
                        return Err(Error::unavailable(
                            format!("extend of {} did not answer in time", self.key),
                            None,
                        ));
                    }
                }
            }
        };
        match result? {
            Ok(server_time) => {
                self.extended(sent, server_time);
                tracing::trace!(key = %self.key, fence = %self.fence, "lease extended");
                Ok(())
            }
            Err(Error::NotHeld { .. }) => {
                self.mark_lost(LossReason::TakenOver);
                Err(self.lost_error())
            }
            Err(error) => {
                self.extend_failed();
                Err(error)
            }
        }
    }
}

impl LockGuard {
    /// Starts guarding a lease granted by the request of `granted`.
    pub(crate) fn start(
        config: Arc<ManagerConfig>,
        key: LockKey,
        token: Token,
        fence: Fence,
        ttl: Ttl,
        granted: ClockMark,
        is_static: bool,
    ) -> Self {
        let sent = granted.sent;
        let margin = config.margin_for(ttl);
        let interval = config.heartbeat_for(ttl);
        let (lost, _) = watch::channel(false);
        let shared = Arc::new(GuardShared {
            config,
            key,
            token,
            fence,
            ttl,
            margin,
            is_static,
            deadline: Mutex::new(Deadline::new(sent, ttl.get() - margin)),
            clock: Mutex::new(granted),
            failing: AtomicBool::new(false),
            extends_out: AtomicUsize::new(0),
            stepped: AtomicBool::new(false),
            reason: Mutex::new(None),
            acquired: Instant::now(),
            hold_recorded: AtomicBool::new(false),
            lost,
        });
        // Without a runtime there is no heartbeat; `is_lost` still compares with
        // the deadline on every call.
        let renewal = tokio::runtime::Handle::try_current().ok().map(|rt| {
            shared
                .config
                .renewer
                .register(&rt, Arc::downgrade(&shared), interval)
        });
        Self {
            shared,
            renewal,
            released: false,
        }
    }

    /// The key.
    pub fn key(&self) -> &LockKey {
        &self.shared.key
    }

    /// The token of this holding.
    pub fn token(&self) -> Token {
        self.shared.token
    }

    /// The fencing token of this holding: pass it to the resource you protect.
    pub fn fence(&self) -> Fence {
        self.shared.fence
    }

    /// The lease length each extend asks for.
    pub fn ttl(&self) -> Ttl {
        self.shared.ttl
    }

    /// The current local deadline.
    pub fn deadline(&self) -> Instant {
        self.shared.deadline()
    }

    /// Time left until the local deadline; zero once the lock is lost.
    pub fn time_left(&self) -> Duration {
        if self.is_lost() {
            return Duration::ZERO;
        }
        self.shared
            .deadline()
            .saturating_duration_since(Instant::now())
    }

    /// Whether this process must no longer act as the holder. Once true, it stays
    /// true.
    pub fn is_lost(&self) -> bool {
        self.shared.check_lost()
    }

    /// Why the lock was lost, once [`is_lost`](Self::is_lost) is true.
    pub fn loss_reason(&self) -> Option<LossReason> {
        self.shared.check_lost();
        self.shared.loss_reason()
    }

    /// When the lease ends on the backend's clock, as of the latest grant or
    /// renewal this guard has seen: that statement's clock reading (contract
    /// item 9 of [`LockBackend`](crate::LockBackend)) plus the ttl.
    ///
    /// It costs no round trip. It is for people and for handing the lease on
    /// (`distrlock acquire` prints it); the guard itself decides by its local
    /// [`deadline`](Self::deadline), which never comes later.
    pub fn expires_at(&self) -> SystemTime {
        self.shared.expires_at()
    }

    /// A snapshot of key, token, fence, ttl, the current deadline and the
    /// backend-side expiry.
    pub fn lease(&self) -> Lease {
        Lease {
            key: self.shared.key.clone(),
            token: self.shared.token,
            fence: self.shared.fence,
            ttl: self.shared.ttl,
            deadline: self.shared.deadline(),
            expires_at: self.shared.expires_at(),
        }
    }

    /// Resolves once this process must no longer act as the holder: the lock was
    /// lost (checked against the local deadline on every poll, not only when the
    /// heartbeat notices), or the guard was released or dropped.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut flag = self.shared.lost.subscribe();
        Lost {
            shared: Arc::downgrade(&self.shared),
            changed: Box::pin(async move {
                // Resolves when the flag is set, or the guard is gone.
                let _ = flag.wait_for(|lost| *lost).await;
            }),
            sleep: Box::pin(tokio::time::sleep_until(self.shared.deadline())),
        }
    }

    /// Extends the lease now, by the guard's ttl from the backend's clock.
    ///
    /// Returns [`Error::LockLost`] if the lease is gone or the local deadline passes
    /// first, and a transient error if the backend failed or did not answer within
    /// the call timeout (the lease may still be live; the heartbeat keeps trying).
    pub async fn extend(&self) -> Result<()> {
        self.shared.extend_once().await
    }

    /// Releases the lock and waits for the backend to confirm.
    ///
    /// `Ok` means the lease was held without interruption until the release was
    /// sent: the guard had not reached its local deadline, so no one else can
    /// have held the key meanwhile. That stays true when the backend answers
    /// [`Error::NotHeld`] (a retried release whose first run went through, or a
    /// lease that ran out while the release travelled). Returns
    /// [`Error::LockLost`] if the lock had been lost before (it is released anyway
    /// if the backend still has it), and the backend's error if the release
    /// failed or did not answer in time (the lease then runs out at its ttl). If
    /// this future is dropped before it finishes, the guard releases in the
    /// background as on drop.
    pub async fn release(mut self) -> Result<()> {
        drop(self.renewal.take());
        let shared = self.shared.clone();
        let was_lost = shared.check_lost();
        shared.hold_ended();
        let not_after = Instant::now() + shared.config.call_timeout;
        let span = tracing::debug_span!(
            "distrlock.release",
            key = %shared.key,
            fence = %shared.fence,
            outcome = tracing::field::Empty,
        );
        let call = shared
            .config
            .backend
            .release(&shared.key, &shared.token, not_after)
            .instrument(span.clone());
        let result = match tokio::time::timeout_at(not_after, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::unavailable(
                format!("release of {} did not answer in time", shared.key),
                None,
            )),
        };
        self.released = true;
        if shared.is_static {
            settle_static_release(
                &shared.config,
                &shared.key,
                shared.token,
                &result,
                not_after,
            );
        }
        // Wake anyone awaiting `lost()`: this process no longer holds the lock.
        shared.lost.send_replace(true);
        match result {
            Ok(()) | Err(Error::NotHeld { .. }) if !was_lost => {
                tracing::debug!(key = %shared.key, fence = %shared.fence, "lock released");
                Ok(())
            }
            Ok(()) | Err(Error::NotHeld { .. }) => Err(shared.lost_error()),
            Err(error) => Err(error),
        }
    }

    /// Runs `work` while holding the lock, as
    /// [`LockManager::do_exclusively`](crate::LockManager::do_exclusively) does
    /// after acquiring: stops it if the lock is lost, then releases. Combine with
    /// any acquire: `lock.acquire_timeout(d).await?.run(work).await`.
    pub async fn run<F, Fut, T>(self, work: F) -> std::result::Result<T, ExclusiveError<T>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = T>,
    {
        crate::manager::run_while_held(self, work).await
    }

    /// Like [`run`](Self::run), for work that returns a `Result`: its error comes
    /// back as [`ExclusiveError::Work`] (after the lock is released).
    pub async fn run_fallible<F, Fut, T, E>(
        self,
        work: F,
    ) -> std::result::Result<T, ExclusiveError<T, E>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        match crate::manager::run_while_held::<_, _, _, E>(self, work).await {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(error)) => Err(ExclusiveError::Work(error)),
            Err(ExclusiveError::LostAfterWork {
                key,
                output,
                reason,
            }) => match output {
                Ok(output) => Err(ExclusiveError::LostAfterWork {
                    key,
                    output,
                    reason,
                }),
                // The work failed anyway: its error is the news.
                Err(error) => Err(ExclusiveError::Work(error)),
            },
            Err(ExclusiveError::Lock(error)) => Err(ExclusiveError::Lock(error)),
            Err(ExclusiveError::Work(error)) => Err(ExclusiveError::Work(error)),
        }
    }

    /// Stops guarding the lease without releasing it, and returns its snapshot.
    ///
    /// The heartbeat stops and dropping no longer releases: the lease runs out at
    /// its ttl unless someone extends or releases it with the token (for example a
    /// later process, as `distrlock acquire` hands the lock to the shell). The
    /// snapshot's deadline is the last one this guard computed.
    pub fn detach(mut self) -> Lease {
        drop(self.renewal.take());
        let lease = self.lease();
        self.shared.hold_ended();
        self.released = true;
        if self.shared.is_static {
            self.shared
                .config
                .unregister_static_guard(&self.shared.key, &self.shared.token);
        }
        self.shared.lost.send_replace(true);
        lease
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(self.renewal.take());
        if !self.released {
            let shared = &self.shared;
            shared.hold_ended();
            shared.lost.send_replace(true);
            release_in_background(
                shared.config.clone(),
                shared.key.clone(),
                shared.token,
                shared.is_static,
            );
        }
    }
}

impl fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("key", &self.shared.key)
            .field("fence", &self.shared.fence)
            .field("ttl", &self.shared.ttl)
            .field("time_left", &self.time_left())
            .finish_non_exhaustive()
    }
}

/// The future behind [`LockGuard::lost`].
struct Lost {
    shared: Weak<GuardShared>,
    changed: Pin<Box<dyn Future<Output = ()> + Send>>,
    sleep: Pin<Box<Sleep>>,
}

impl Future for Lost {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let Some(shared) = self.shared.upgrade() else {
                return Poll::Ready(());
            };
            // Compare with the clock on every poll: a late heartbeat task must not
            // let a caller go on past the deadline.
            if shared.check_lost() {
                return Poll::Ready(());
            }
            let deadline = shared.deadline();
            drop(shared);
            if self.sleep.deadline() != deadline {
                self.sleep.as_mut().reset(deadline);
            }
            if self.changed.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The sleep fired: loop to check the (possibly moved) deadline.
        }
    }
}

/// Releases `token`'s lease on `key` without waiting, if a runtime is available,
/// as a background job of the manager ([`LockManager::settle`](crate::LockManager::settle)
/// waits for it).
pub(crate) fn release_in_background(
    config: Arc<ManagerConfig>,
    key: LockKey,
    token: Token,
    is_static: bool,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(key = %key, "no tokio runtime to release the lock; the lease will expire");
        if is_static {
            config.unregister_static_guard(&key, &token);
        }
        return;
    };
    let background = config.background.clone();
    background.spawn(&runtime, async move {
        let not_after = Instant::now() + config.call_timeout;
        let call = config.backend.release(&key, &token, not_after);
        let result = match tokio::time::timeout_at(not_after, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::unavailable("no answer in time", None)),
        };
        match &result {
            Ok(()) => tracing::debug!(key = %key, "lock released in the background"),
            Err(Error::NotHeld { .. }) => {}
            Err(error) => {
                tracing::warn!(key = %key, %error, "background release failed; the lease will expire")
            }
        }
        if is_static {
            settle_static_release(&config, &key, token, &result, not_after);
        }
    });
}

/// Lets a new guard of the static `token` start once its release is settled.
///
/// After a definite answer (released, or not held) at once. After an unknown one
/// (no answer in time, a broken connection) the release may still be on its way
/// to the database, and landing after a new guard of the same token acquired it
/// would end that guard's lease behind its back. The backend guarantees that it
/// cannot land after its `not_after` (contract item 8), so the token stays taken
/// until then.
fn settle_static_release(
    config: &Arc<ManagerConfig>,
    key: &LockKey,
    token: Token,
    result: &Result<()>,
    not_after: Instant,
) {
    let settled = matches!(result, Ok(()) | Err(Error::NotHeld { .. }));
    let runtime = tokio::runtime::Handle::try_current();
    match runtime {
        Ok(runtime) if !settled && Instant::now() < not_after => {
            tracing::debug!(key = %key, "release outcome unknown; the static token waits for its bound");
            let (config, key) = (config.clone(), key.clone());
            let background = config.background.clone();
            background.spawn(&runtime, async move {
                tokio::time::sleep_until(not_after).await;
                config.unregister_static_guard(&key, &token);
            });
        }
        _ => config.unregister_static_guard(key, &token),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, SystemTime};

    use async_trait::async_trait;
    use tokio::time::Instant;

    use crate::backend::{AcquireOutcome, LockBackend, LockInfo};
    use crate::error::Result;
    use crate::key::LockKey;
    use crate::manager::LockManager;
    use crate::memory::MemoryBackend;
    use crate::token::Token;
    use crate::ttl::Ttl;

    /// A memory backend whose clock readings can be moved, as a server clock
    /// that steps would move them.
    #[derive(Debug, Default)]
    struct Stepping {
        inner: MemoryBackend,
        /// Added to (or, when negative, taken from) every reading.
        step: Mutex<(Duration, bool)>,
    }

    impl Stepping {
        fn shift(&self, at: SystemTime) -> SystemTime {
            let (by, back) = *self.step.lock().unwrap();
            if back { at - by } else { at + by }
        }
    }

    #[async_trait]
    impl LockBackend for Stepping {
        async fn try_acquire(
            &self,
            key: &LockKey,
            token: &Token,
            ttl: Ttl,
            owner: &str,
            not_after: Instant,
        ) -> Result<AcquireOutcome> {
            self.inner
                .try_acquire(key, token, ttl, owner, not_after)
                .await
        }
        async fn extend(
            &self,
            key: &LockKey,
            token: &Token,
            ttl: Ttl,
            not_after: Instant,
        ) -> Result<SystemTime> {
            let at = self.inner.extend(key, token, ttl, not_after).await?;
            Ok(self.shift(at))
        }
        async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
            self.inner.release(key, token, not_after).await
        }
        async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
            self.inner.inspect(key).await
        }
        async fn list(&self) -> Result<Vec<LockInfo>> {
            self.inner.list().await
        }
        async fn create_table(&self) -> Result<()> {
            Ok(())
        }
        fn schema_sql(&self) -> String {
            String::new()
        }
    }

    fn manager(backend: std::sync::Arc<dyn LockBackend>) -> LockManager {
        LockManager::builder(backend)
            .ttl(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_clock_that_steps_forward_shortens_the_deadline() {
        let backend = std::sync::Arc::new(Stepping::default());
        let m = manager(backend.clone());
        let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
        *backend.step.lock().unwrap() = (Duration::from_secs(20), false);
        // The heartbeat at ttl/3 sees the server 20 s ahead of us.
        tokio::time::sleep(Duration::from_secs(10) + Duration::from_millis(10)).await;
        let left = guard.time_left();
        assert!(
            // ttl − margin = 28.94 s from the extend, less the 20 s jump.
            left <= Duration::from_millis(28_940 - 20_000 + 100),
            "the deadline must shrink by the server's jump: {left:?} left"
        );
        assert!(!guard.is_lost());
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_clock_that_steps_back_keeps_the_deadline() {
        let backend = std::sync::Arc::new(Stepping::default());
        let m = manager(backend.clone());
        let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
        *backend.step.lock().unwrap() = (Duration::from_secs(20), true);
        tokio::time::sleep(Duration::from_secs(10) + Duration::from_millis(10)).await;
        let left = guard.time_left();
        assert!(left > Duration::from_secs(26), "{left:?} left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_suspend_counts_against_the_deadline() {
        let backend = std::sync::Arc::new(MemoryBackend::new());
        let m = manager(backend);
        let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let before = guard.time_left();
        // Ten seconds of suspend: tokio's clock did not move, the server's did.
        crate::suspend::simulate(Duration::from_secs(10));
        let after = guard.time_left();
        assert!(
            before - after >= Duration::from_secs(10) - Duration::from_millis(1),
            "{before:?} then {after:?}"
        );
        // Longer than the lease: lost at once, without waiting for a timer.
        crate::suspend::simulate(Duration::from_secs(30));
        assert!(
            guard.is_lost(),
            "a lease that ran out during a suspend is lost"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_loss_reason_says_why() {
        use crate::loss::LossReason;
        let key = || LockKey::new("k").unwrap();
        // Taken over: someone with the token released it; the next heartbeat sees.
        let backend = std::sync::Arc::new(MemoryBackend::new());
        let m = manager(backend.clone());
        let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
        let not_after = Instant::now() + Duration::from_secs(5);
        backend
            .release(&key(), &guard.token(), not_after)
            .await
            .unwrap();
        guard.lost().await;
        assert_eq!(guard.loss_reason(), Some(LossReason::TakenOver));
        // Unreachable: every heartbeat fails until the deadline.
        let guard = m.lock("k").unwrap().try_acquire().await.unwrap();
        backend.set_unreachable(true);
        guard.lost().await;
        assert_eq!(guard.loss_reason(), Some(LossReason::Unreachable));
        backend.set_unreachable(false);
        drop(guard);
        // Ran out: no heartbeats at all.
        let quiet = LockManager::builder(backend.clone())
            .ttl(Duration::from_secs(30))
            .auto_extend(false)
            .build()
            .unwrap();
        let guard = quiet.lock("k2").unwrap().try_acquire().await.unwrap();
        assert_eq!(guard.loss_reason(), None);
        guard.lost().await;
        assert_eq!(guard.loss_reason(), Some(LossReason::LeaseRanOut));
        let error = guard.release().await.unwrap_err();
        assert!(error.to_string().contains("ran out"), "{error}");
        // A clock step: the shortened deadline passes with no failed extend.
        let stepping = std::sync::Arc::new(Stepping::default());
        let m = manager(stepping.clone());
        let guard = m.lock("k3").unwrap().try_acquire().await.unwrap();
        *stepping.step.lock().unwrap() = (Duration::from_secs(25), false);
        guard.lost().await;
        assert_eq!(guard.loss_reason(), Some(LossReason::ClockStep));
    }
}
