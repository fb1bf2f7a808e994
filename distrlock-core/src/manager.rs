//! [`LockManager`]: a backend plus the defaults every lock taken through it uses.

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::backend::LockBackend;
use crate::error::{Error, Result};
use crate::exclusive::ExclusiveError;
use crate::guard::LockGuard;
use crate::key::LockKey;
use crate::lease::Lease;
use crate::lock::Lock;
use crate::loss::LossReason;
use crate::owner::Owner;
use crate::renewal::Renewer;
use crate::retry::RetryPolicy;
use crate::token::Token;
use crate::ttl::Ttl;

/// The longest call timeout a manager accepts: one day.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Hands out [`Lock`]s on one backend with shared defaults: ttl, retry policy,
/// heartbeat interval, safety margin and owner text.
///
/// Cheap to clone; clones share the backend.
///
/// # What must keep running
///
/// A guard's lease is renewed by a background task on the tokio runtime the
/// guard was acquired on (one task per runtime that holds guards of this
/// manager), so keep that runtime driven while you hold the guard: a
/// `current_thread` runtime whose `block_on` has returned renews nothing, and
/// its guards are lost at their deadline (guards on other runtimes are not
/// affected). The backend's connections are served by the runtime that opened
/// them: create the backend on a runtime that outlives its use. Releases of
/// dropped guards also run in the background; call [`settle`](Self::settle)
/// before a short-lived process exits.
///
/// ```
/// use std::sync::Arc;
/// use std::time::Duration;
/// use distrlock_core::{LockManager, MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> distrlock_core::Result<()> {
/// let manager = LockManager::builder(Arc::new(MemoryBackend::new()))
///     .ttl(Duration::from_secs(10))
///     .owner("report-job@host-a")
///     .build()?;
/// let report = manager
///     .do_exclusively("nightly-report", |lease| async move {
///         format!("ran with fence {}", lease.fence())
///     })
///     .await?;
/// assert_eq!(report, "ran with fence 1");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct LockManager {
    pub(crate) inner: Arc<ManagerConfig>,
}

/// The settings a [`LockManager`] was built with.
pub(crate) struct ManagerConfig {
    pub(crate) backend: Arc<dyn LockBackend>,
    pub(crate) ttl: Ttl,
    pub(crate) retry: RetryPolicy,
    pub(crate) heartbeat: Heartbeat,
    pub(crate) safety_margin: Option<Duration>,
    pub(crate) owner: Owner,
    pub(crate) call_timeout: Duration,
    /// Whether waiting acquires keep their turn in the key's line (see
    /// [`LockManagerBuilder::fair`]).
    pub(crate) fair: bool,
    /// Keys held by a live guard with a static token, so that two guards never
    /// share one lease (see [`Lock::with_token`]).
    pub(crate) static_guards: Mutex<HashSet<(LockKey, Token)>>,
    /// Extends the leases of all this manager's guards, in batches.
    pub(crate) renewer: Arc<Renewer>,
    /// Background releases and cleanups, for [`LockManager::settle`].
    pub(crate) background: Background,
}

/// Counts a manager's background jobs (releases of dropped guards, cleanups of
/// abandoned acquires), so that [`LockManager::settle`] can wait for them.
#[derive(Debug, Clone)]
pub(crate) struct Background {
    running: Arc<watch::Sender<usize>>,
}

impl Background {
    fn new() -> Self {
        Self {
            running: Arc::new(watch::channel(0).0),
        }
    }

    /// Runs `job` on `runtime`, counted until it ends (or is dropped with its
    /// runtime).
    pub(crate) fn spawn<F>(&self, runtime: &tokio::runtime::Handle, job: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        /// Uncounts the job when it ends, however it ends.
        struct Done(Arc<watch::Sender<usize>>);
        impl Drop for Done {
            fn drop(&mut self) {
                self.0.send_modify(|n| *n = n.saturating_sub(1));
            }
        }
        self.running.send_modify(|n| *n += 1);
        let done = Done(self.running.clone());
        runtime.spawn(async move {
            let _done = done;
            job.await;
        });
    }

    async fn idle(&self) {
        let mut running = self.running.subscribe();
        // The sender lives in `self`, so this only returns at zero.
        let _ = running.wait_for(|n| *n == 0).await;
    }
}

/// How often a guard extends its lease in the background.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heartbeat {
    /// Every ttl/3.
    ThirdOfTtl,
    /// At a fixed interval.
    Every(Duration),
    /// Never: the lease ends at its ttl unless extended by hand.
    Off,
}

impl ManagerConfig {
    /// The margin subtracted from the ttl for the local deadline: the configured
    /// one, or by default ttl/10, capped at 1 s + ttl/500 (so that long leases
    /// still cover a clock-rate difference of 0.2%).
    pub(crate) fn margin_for(&self, ttl: Ttl) -> Duration {
        self.safety_margin.unwrap_or_else(|| {
            let ttl = ttl.get();
            (ttl / 10).min(Duration::from_secs(1) + ttl / 500)
        })
    }

    /// Whether a live guard of this manager holds `key` with the static `token`.
    pub(crate) fn static_guard_live(&self, key: &LockKey, token: &Token) -> bool {
        self.static_guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&(key.clone(), *token))
    }

    /// Records a new guard with a static token; false if one is live already.
    pub(crate) fn register_static_guard(&self, key: &LockKey, token: &Token) -> bool {
        self.static_guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((key.clone(), *token))
    }

    /// Forgets a guard with a static token once its release is done.
    pub(crate) fn unregister_static_guard(&self, key: &LockKey, token: &Token) {
        self.static_guards
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(key.clone(), *token));
    }

    /// The heartbeat interval for a lease of `ttl`, or `None` when auto-extend is
    /// off.
    pub(crate) fn heartbeat_for(&self, ttl: Ttl) -> Option<Duration> {
        match self.heartbeat {
            Heartbeat::ThirdOfTtl => Some(ttl.get() / 3),
            Heartbeat::Every(interval) => Some(interval),
            Heartbeat::Off => None,
        }
    }

    /// Checks that a lease of `ttl` leaves room for the margin and the heartbeat.
    pub(crate) fn check_ttl(&self, ttl: Ttl) -> Result<()> {
        let margin = self.margin_for(ttl);
        if margin.is_zero() || margin >= ttl.get() {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "safety margin {margin:?} must be non-zero and shorter than the ttl {ttl:?}"
                ),
            });
        }
        if let Some(interval) = self.heartbeat_for(ttl)
            && (interval < Duration::from_millis(1) || interval >= ttl.get() - margin)
        {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "heartbeat interval {interval:?} must be at least 1ms and shorter than \
                         the ttl minus the safety margin ({:?})",
                    ttl.get() - margin
                ),
            });
        }
        Ok(())
    }
}

impl LockManager {
    /// A manager with the defaults: 30 s ttl, [`RetryPolicy::default`], heartbeat
    /// every ttl/3, margin ttl/10 (at most 1 s + ttl/500), owner `host:pid`, call
    /// timeout 10 s.
    ///
    /// Takes any backend: a `PostgresBackend` as it is, an `Arc` of one, or an
    /// `Arc<dyn LockBackend>` (used as it is, not wrapped again).
    pub fn new(backend: impl LockBackend + 'static) -> Self {
        Self {
            inner: Arc::new(
                LockManagerBuilder::new(shared(backend))
                    .config(Ttl::DEFAULT, Owner::this_process()),
            ),
        }
    }

    /// A builder for a manager with other defaults; takes any backend, as
    /// [`new`](Self::new) does.
    pub fn builder(backend: impl LockBackend + 'static) -> LockManagerBuilder {
        LockManagerBuilder::new(shared(backend))
    }

    /// The backend locks are stored in.
    pub fn backend(&self) -> &Arc<dyn LockBackend> {
        &self.inner.backend
    }

    /// The default ttl of locks from this manager.
    pub fn ttl(&self) -> Ttl {
        self.inner.ttl
    }

    /// The owner text written with every acquisition.
    pub fn owner(&self) -> &str {
        self.inner.owner.as_str()
    }

    /// The policy waiting acquires follow.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }

    /// Waits until this manager's background jobs have finished: the releases of
    /// dropped guards and of [`release`](LockGuard::release) futures that were
    /// dropped, and the cleanup of abandoned acquires (which first waits for
    /// each abandoned try to answer or pass the bound after which it can no
    /// longer take effect).
    ///
    /// Each job is bounded by the call timeout, so this returns within about two
    /// call timeouts. Call it before a short-lived process exits, or before its
    /// runtime shuts down, so that nothing it acquired lingers until its ttl.
    pub async fn settle(&self) {
        self.inner.background.idle().await;
    }

    /// A handle on the lock named `key`. Nothing is sent to the backend yet.
    ///
    /// Returns [`Error::InvalidKey`] for an empty, over-long or NUL-bearing key.
    pub fn lock(&self, key: impl AsRef<str>) -> Result<Lock> {
        let key = LockKey::new(key.as_ref())?;
        Ok(Lock::new(self.clone(), key))
    }

    /// Runs `work` while holding `key`, the Go original's `DoExclusively`.
    ///
    /// **Waits** for the lock per the [`RetryPolicy`] (without limit by default),
    /// runs `work` with a snapshot of the [`Lease`] while the guard extends it in
    /// the background, and releases it afterwards, also when `work` panics (the
    /// guard releases on drop).
    ///
    /// `Ok` means the work finished while the lease was live, as the only holder.
    /// Otherwise ([`ExclusiveError`], which converts into [`Error`] with `?`):
    /// - the lock was not acquired, or was lost while `work` ran: `work`'s future
    ///   is dropped before it is polled again and the call returns
    ///   [`ExclusiveError::Lock`] with [`Error::LockLost`];
    /// - the work's last poll outlived the lease (code that blocks the thread
    ///   inside `work` cannot be interrupted, and starves the heartbeat): the
    ///   output comes back in [`ExclusiveError::LostAfterWork`].
    ///
    /// Loss is checked between polls; protect side effects with the lease's fence.
    /// Tasks that `work` spawns are not cancelled when the lock is lost: stop them
    /// yourself (for example with [`LockGuard::lost`] through a lock you acquire
    /// and pass in).
    pub async fn do_exclusively<F, Fut, T>(
        &self,
        key: impl AsRef<str>,
        work: F,
    ) -> std::result::Result<T, ExclusiveError<T>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock(key)?.acquire().await?;
        guard.run(work).await
    }

    /// Like [`do_exclusively`](Self::do_exclusively), but tries **once**, as the
    /// Go original's `DoExclusively` does: when another owner holds the lock it
    /// returns [`Error::HeldByOther`] at once and `work` does not run.
    pub async fn try_do_exclusively<F, Fut, T>(
        &self,
        key: impl AsRef<str>,
        work: F,
    ) -> std::result::Result<T, ExclusiveError<T>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock(key)?.try_acquire().await?;
        guard.run(work).await
    }

    /// Like [`do_exclusively`](Self::do_exclusively), but waits for the lock at
    /// most `timeout`, then returns [`Error::Timeout`] and `work` does not run.
    pub async fn do_exclusively_timeout<F, Fut, T>(
        &self,
        key: impl AsRef<str>,
        timeout: Duration,
        work: F,
    ) -> std::result::Result<T, ExclusiveError<T>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock(key)?.acquire_timeout(timeout).await?;
        guard.run(work).await
    }

    /// Like [`do_exclusively`](Self::do_exclusively), for work that returns a
    /// `Result`: its error comes back as [`ExclusiveError::Work`], with no nested
    /// `Result` to untangle. For other waits, acquire a guard yourself and call
    /// [`LockGuard::run_fallible`].
    ///
    /// ```
    /// use std::sync::Arc;
    /// use distrlock_core::{ExclusiveError, LockManager, MemoryBackend};
    ///
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// let manager = LockManager::new(MemoryBackend::new());
    /// let result = manager
    ///     .do_exclusively_fallible("import", |_lease| async { "x".parse::<u32>() })
    ///     .await;
    /// assert!(matches!(result, Err(ExclusiveError::Work(_))));
    /// # }
    /// ```
    pub async fn do_exclusively_fallible<F, Fut, T, E>(
        &self,
        key: impl AsRef<str>,
        work: F,
    ) -> std::result::Result<T, ExclusiveError<T, E>>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = std::result::Result<T, E>>,
    {
        let guard = self.lock(key)?.acquire().await?;
        guard.run_fallible(work).await
    }
}

/// `backend` as the shared trait object the manager keeps: an
/// `Arc<dyn LockBackend>` as it is, anything else in a new `Arc`.
fn shared<B: LockBackend + 'static>(backend: B) -> Arc<dyn LockBackend> {
    let mut slot = Some(backend);
    if let Some(already) =
        (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Arc<dyn LockBackend>>>()
        && let Some(already) = already.take()
    {
        return already;
    }
    match slot {
        Some(backend) => Arc::new(backend),
        None => unreachable!("taken only when it was already shared"),
    }
}

/// Runs `work` under `guard`, stopping it if the lock is lost, then releases.
/// Returns the work's output, also when the lock was lost after the work
/// finished (then in [`ExclusiveError::LostAfterWork`]).
pub(crate) async fn run_while_held<F, Fut, T, E>(
    guard: LockGuard,
    work: F,
) -> std::result::Result<T, ExclusiveError<T, E>>
where
    F: FnOnce(Lease) -> Fut,
    Fut: Future<Output = T>,
{
    let lost = guard.lost();
    tokio::pin!(lost);
    // Boxed so that it can be dropped, not just left unpolled, once the lock is lost.
    let mut work = Box::pin(work(guard.lease()));
    let output = tokio::select! {
        // Checked first, against the clock, before every poll of the work: once
        // the local deadline has passed, the work is never polled again.
        biased;
        () = &mut lost => None,
        output = &mut work => Some(output),
    };
    let key = guard.key().clone();
    let Some(output) = output else {
        let reason = guard.loss_reason().unwrap_or(LossReason::LeaseRanOut);
        // Stop the work now; dropping the guard releases in the background in
        // case the backend still has the lease, without making the caller wait
        // on a backend that may be unreachable.
        drop(work);
        drop(guard);
        return Err(ExclusiveError::Lock(Error::LockLost { key, reason }));
    };
    match guard.release().await {
        Ok(()) => Ok(output),
        // The lease lapsed during the work's last poll.
        Err(Error::LockLost { reason, .. }) => Err(ExclusiveError::LostAfterWork {
            key,
            output,
            reason,
        }),
        // Sent while the lease was live, so the work finished as the only holder;
        // the lease runs out at its ttl.
        Err(error) => {
            tracing::warn!(key = %key, %error, "release after exclusive work failed; the lease will expire");
            Ok(output)
        }
    }
}

impl fmt::Debug for LockManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManager")
            .field("backend", &self.inner.backend)
            .field("ttl", &self.inner.ttl)
            .field("retry", &self.inner.retry)
            .field("heartbeat", &self.inner.heartbeat)
            .field("owner", &self.inner.owner)
            .finish_non_exhaustive()
    }
}

/// Builds a [`LockManager`]; every setting is checked in [`build`](Self::build).
pub struct LockManagerBuilder {
    backend: Arc<dyn LockBackend>,
    ttl: Duration,
    retry: RetryPolicy,
    heartbeat: Heartbeat,
    safety_margin: Option<Duration>,
    owner: Option<String>,
    call_timeout: Duration,
    fair: bool,
}

impl LockManagerBuilder {
    fn new(backend: Arc<dyn LockBackend>) -> Self {
        Self {
            backend,
            ttl: Ttl::DEFAULT.get(),
            retry: RetryPolicy::default(),
            heartbeat: Heartbeat::ThirdOfTtl,
            safety_margin: None,
            owner: None,
            call_timeout: Duration::from_secs(10),
            fair: true,
        }
    }

    /// The lease length (default 30 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How waiting acquires space their tries (default [`RetryPolicy::default`]).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Extend held leases in the background every `interval` instead of every
    /// ttl/3. It must be shorter than the ttl minus the safety margin.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat = Heartbeat::Every(interval);
        self
    }

    /// Turns background extension on (the default, every ttl/3) or off.
    pub fn auto_extend(mut self, on: bool) -> Self {
        self.heartbeat = if on {
            match self.heartbeat {
                Heartbeat::Off => Heartbeat::ThirdOfTtl,
                other => other,
            }
        } else {
            Heartbeat::Off
        };
        self
    }

    /// How much earlier than `sent + ttl` a guard gives the lock up (default:
    /// ttl/10, at most 1 s + ttl/500). It covers clock-rate differences between
    /// this host and the database, and the time your code needs to stop. It must
    /// be non-zero and shorter than the ttl.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// The owner text stored with each acquisition (default `host:pid`); at most
    /// 255 bytes, no NUL (checked by [`build`](Self::build) with [`Owner::new`]).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// The longest the manager waits for any one backend call (default 10 s, at
    /// most one day), on top of the backend's own timeouts.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Whether waiting acquires are served in the order they started waiting
    /// (`true`, the default) or may take a free key ahead of earlier waiters
    /// (`false`); per lock, [`Lock::fair`] overrides it.
    ///
    /// On a backend that keeps a line of waiters (all of distrlock's), a fair
    /// waiter takes a ticket when first refused and takes the key only in its
    /// ticket's turn: a holder that releases and asks again at once gets in
    /// line behind the waiters. An unfair waiter still takes a ticket (so that
    /// a release that notifies wakes it) but takes a free key whenever it finds
    /// it free, which hands over sooner under heavy contention and lets
    /// waiters starve. Use one choice for all callers of a key: fair waiters
    /// mixed with unfair ones are only as fair as the unfair ones let them.
    pub fn fair(mut self, fair: bool) -> Self {
        self.fair = fair;
        self
    }

    /// Checks every setting and builds the manager.
    ///
    /// Returns [`Error::InvalidTtl`] or [`Error::InvalidConfig`] for settings out
    /// of range.
    pub fn build(mut self) -> Result<LockManager> {
        let ttl = Ttl::new(self.ttl)?;
        self.retry.validate()?;
        let owner = match self.owner.take() {
            Some(owner) => Owner::new(owner)?,
            None => Owner::this_process(),
        };
        if self.call_timeout.is_zero() || self.call_timeout > MAX_CALL_TIMEOUT {
            return Err(Error::InvalidConfig {
                reason: "call timeout must be non-zero and at most one day".into(),
            });
        }
        let config = self.config(ttl, owner);
        config.check_ttl(ttl)?;
        Ok(LockManager {
            inner: Arc::new(config),
        })
    }

    /// The configuration as given, with the already validated `ttl`.
    fn config(self, ttl: Ttl, owner: Owner) -> ManagerConfig {
        ManagerConfig {
            renewer: Arc::new(Renewer::new(self.backend.clone(), self.call_timeout)),
            backend: self.backend,
            ttl,
            retry: self.retry,
            heartbeat: self.heartbeat,
            safety_margin: self.safety_margin,
            owner,
            call_timeout: self.call_timeout,
            fair: self.fair,
            static_guards: Mutex::new(HashSet::new()),
            background: Background::new(),
        }
    }
}

impl fmt::Debug for LockManagerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockManagerBuilder")
            .field("backend", &self.backend)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}
