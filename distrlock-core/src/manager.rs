//! [`LockManager`]: a backend plus the defaults every lock taken through it uses.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::LockBackend;
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::key::LockKey;
use crate::lease::Lease;
use crate::lock::Lock;
use crate::owner::{default_owner, validate_owner};
use crate::retry::RetryPolicy;
use crate::ttl::Ttl;

/// Hands out [`Lock`]s on one backend with shared defaults: ttl, retry policy,
/// heartbeat interval, safety margin and owner text.
///
/// Cheap to clone; clones share the backend.
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
    pub(crate) owner: String,
    pub(crate) call_timeout: Duration,
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
    /// one, or ttl/10 capped at one second.
    pub(crate) fn margin_for(&self, ttl: Ttl) -> Duration {
        self.safety_margin
            .unwrap_or_else(|| (ttl.get() / 10).min(Duration::from_secs(1)))
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
        if margin >= ttl.get() {
            return Err(Error::InvalidConfig {
                reason: format!("safety margin {margin:?} must be shorter than the ttl {ttl:?}"),
            });
        }
        if let Some(interval) = self.heartbeat_for(ttl) {
            if interval.is_zero() || interval >= ttl.get() - margin {
                return Err(Error::InvalidConfig {
                    reason: format!(
                        "heartbeat interval {interval:?} must be non-zero and shorter than \
                         the ttl minus the safety margin ({:?})",
                        ttl.get() - margin
                    ),
                });
            }
        }
        Ok(())
    }
}

impl LockManager {
    /// A manager with the defaults: 30 s ttl, [`RetryPolicy::default`], heartbeat
    /// every ttl/3, margin ttl/10 (at most 1 s), owner `host:pid`.
    pub fn new(backend: Arc<dyn LockBackend>) -> Self {
        Self {
            inner: Arc::new(LockManagerBuilder::new(backend).config(Ttl::DEFAULT)),
        }
    }

    /// A builder for a manager with other defaults.
    pub fn builder(backend: Arc<dyn LockBackend>) -> LockManagerBuilder {
        LockManagerBuilder::new(backend)
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
        &self.inner.owner
    }

    /// The policy waiting acquires follow.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
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
    /// Waits for the lock per the [`RetryPolicy`], runs `work` with the [`Lease`]
    /// while the guard extends it in the background, and releases it afterwards,
    /// also when `work` panics (the guard releases on drop). If the lock is lost
    /// while `work` runs, `work`'s future is dropped at once and the call returns
    /// [`Error::LockLost`]; protect side effects with the lease's fence.
    pub async fn do_exclusively<F, Fut, T>(&self, key: impl AsRef<str>, work: F) -> Result<T>
    where
        F: FnOnce(Lease) -> Fut,
        Fut: Future<Output = T>,
    {
        let guard = self.lock(key)?.acquire().await?;
        run_while_held(guard, work).await
    }
}

/// Runs `work` under `guard`, stopping it if the lock is lost, then releases.
pub(crate) async fn run_while_held<F, Fut, T>(guard: LockGuard, work: F) -> Result<T>
where
    F: FnOnce(Lease) -> Fut,
    Fut: Future<Output = T>,
{
    let lost = guard.lost();
    let work = work(guard.lease());
    let output = tokio::select! {
        // Checked first: once lost, the work must not be polled again.
        biased;
        () = lost => None,
        output = work => Some(output),
    };
    let key = guard.key().clone();
    match (output, guard.release().await) {
        (Some(output), Ok(())) => Ok(output),
        (None, _) | (_, Err(Error::LockLost { .. } | Error::NotHeld { .. })) => {
            Err(Error::LockLost { key })
        }
        (Some(output), Err(error)) => {
            // The work finished while the lease was live; the lease will simply
            // run out on the server.
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
    /// ttl/10, at most 1 s). It covers clock-rate differences between this host
    /// and the database, and the time your code needs to stop.
    pub fn safety_margin(mut self, margin: Duration) -> Self {
        self.safety_margin = Some(margin);
        self
    }

    /// The owner text stored with each acquisition (default `host:pid`); at most
    /// 255 bytes, no NUL.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// The longest the manager waits for any one backend call (default 10 s), on
    /// top of the backend's own timeouts.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// Checks every setting and builds the manager.
    ///
    /// Returns [`Error::InvalidTtl`] or [`Error::InvalidConfig`] for settings out
    /// of range.
    pub fn build(self) -> Result<LockManager> {
        let ttl = Ttl::new(self.ttl)?;
        self.retry.validate()?;
        if let Some(owner) = &self.owner {
            validate_owner(owner)?;
        }
        if self.call_timeout.is_zero() {
            return Err(Error::InvalidConfig {
                reason: "call timeout must be non-zero".into(),
            });
        }
        let config = self.config(ttl);
        config.check_ttl(ttl)?;
        Ok(LockManager {
            inner: Arc::new(config),
        })
    }

    /// The configuration as given, with the already validated `ttl`.
    fn config(self, ttl: Ttl) -> ManagerConfig {
        ManagerConfig {
            backend: self.backend,
            ttl,
            retry: self.retry,
            heartbeat: self.heartbeat,
            safety_margin: self.safety_margin,
            owner: self.owner.unwrap_or_else(default_owner),
            call_timeout: self.call_timeout,
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
