//! [`LockGuard`]: a held lock, its heartbeat and its local deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::error::{Error, Result};
use crate::fence::Fence;
use crate::key::LockKey;
use crate::lease::Lease;
use crate::manager::ManagerConfig;
use crate::renewal::Registration;
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
/// The deadline is measured on the monotonic clock, which stops while the host is
/// suspended; a suspended host must be treated as having lost its locks.
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
    deadline: Mutex<Instant>,
    lost: watch::Sender<bool>,
}

impl GuardShared {
    pub(crate) fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the lock is lost; marks it so when the deadline has passed.
    pub(crate) fn check_lost(&self) -> bool {
        if *self.lost.borrow() {
            return true;
        }
        if Instant::now() >= self.deadline() {
            self.mark_lost("local deadline passed");
            return true;
        }
        false
    }

    /// Records a successful extend whose request was sent at `sent`.
    ///
    /// Taking the later of the two deadlines is safe even for concurrent extends:
    /// the server's expiry is set by whichever extend it ran last, and every extend
    /// it ran, ran after it was sent.
    pub(crate) fn extended(&self, sent: Instant) {
        let new = sent + self.ttl.get() - self.margin;
        let mut deadline = self.deadline.lock().unwrap_or_else(PoisonError::into_inner);
        if new > *deadline {
            *deadline = new;
        }
    }

    pub(crate) fn mark_lost(&self, why: &str) {
        let newly = self
            .lost
            .send_if_modified(|lost| !std::mem::replace(lost, true));
        if newly {
            tracing::warn!(key = %self.key, fence = %self.fence, reason = why, "lock lost");
        }
    }

    fn lost_error(&self) -> Error {
        Error::LockLost {
            key: self.key.clone(),
        }
    }

    /// One extend, bounded by the call timeout and by the local deadline. On
    /// success the deadline moves; when the lease is gone, or the deadline passes
    /// first, the lock is lost. A call that times out before the deadline is a
    /// transient error, and the lease may still be live.
    async fn extend_once(&self) -> Result<()> {
        if self.check_lost() {
            return Err(self.lost_error());
        }
        let sent = Instant::now();
        let timeout_at = sent + self.config.call_timeout;
        let call = self.config.backend.extend(&self.key, &self.token, self.ttl);
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
                        return Err(Error::unavailable(
                            format!("extend of {} did not answer in time", self.key),
                            None,
                        ));
                    }
                }
            }
        };
        match result? {
            Ok(()) => {
                self.extended(sent);
                tracing::trace!(key = %self.key, fence = %self.fence, "lease extended");
                Ok(())
            }
            Err(Error::NotHeld { .. }) => {
                self.mark_lost("extend found the lease gone");
                Err(self.lost_error())
            }
            Err(error) => Err(error),
        }
    }
}

impl LockGuard {
    /// Starts guarding a lease granted by a request sent at `sent`.
    pub(crate) fn start(
        config: Arc<ManagerConfig>,
        key: LockKey,
        token: Token,
        fence: Fence,
        ttl: Ttl,
        sent: Instant,
        is_static: bool,
    ) -> Self {
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
            deadline: Mutex::new(sent + ttl.get() - margin),
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

    /// A snapshot of key, token, fence, ttl and the current deadline.
    pub fn lease(&self) -> Lease {
        Lease {
            key: self.shared.key.clone(),
            token: self.shared.token,
            fence: self.shared.fence,
            ttl: self.shared.ttl,
            deadline: self.shared.deadline(),
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
    /// `Ok` means the lease was held without interruption until now. Returns
    /// [`Error::LockLost`] if the lock had been lost (it is released anyway if the
    /// backend still has it), and the backend's error if the release failed (the
    /// lease then runs out at its ttl). If this future is dropped before it
    /// finishes, the guard releases in the background as on drop.
    pub async fn release(mut self) -> Result<()> {
        drop(self.renewal.take());
        let shared = self.shared.clone();
        let was_lost = shared.check_lost();
        let call = shared.config.backend.release(&shared.key, &shared.token);
        let result = match tokio::time::timeout(shared.config.call_timeout, call).await {
            Ok(result) => result,
            Err(_) => Err(Error::unavailable(
                format!("release of {} did not answer in time", shared.key),
                None,
            )),
        };
        self.released = true;
        if shared.is_static {
            shared
                .config
                .unregister_static_guard(&shared.key, &shared.token);
        }
        // Wake anyone awaiting `lost()`: this process no longer holds the lock.
        shared.lost.send_replace(true);
        match result {
            Ok(()) if !was_lost => {
                tracing::debug!(key = %shared.key, fence = %shared.fence, "lock released");
                Ok(())
            }
            Ok(()) | Err(Error::NotHeld { .. }) => Err(shared.lost_error()),
            Err(error) => Err(error),
        }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(self.renewal.take());
        if !self.released {
            let shared = &self.shared;
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

/// Releases `token`'s lease on `key` without waiting, if a runtime is available.
/// A static token is unregistered from the manager only after its release, so a
/// new guard with the same token cannot have its lease ended by this one.
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
    runtime.spawn(async move {
        let call = config.backend.release(&key, &token);
        match tokio::time::timeout(config.call_timeout, call).await {
            Ok(Ok(())) => tracing::debug!(key = %key, "lock released in the background"),
            Ok(Err(Error::NotHeld { .. })) => {}
            Ok(Err(error)) => {
                tracing::warn!(key = %key, %error, "background release failed; the lease will expire")
            }
            Err(_) => {
                tracing::warn!(key = %key, "background release timed out; the lease will expire")
            }
        }
        if is_static {
            config.unregister_static_guard(&key, &token);
        }
    });
}
