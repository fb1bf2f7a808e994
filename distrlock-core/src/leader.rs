//! [`LeaderElection`]: one leader among the processes that campaign on a key.

use std::fmt;
use std::future::Future;
use std::sync::{Mutex, PoisonError};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::lease::Lease;
use crate::lock::Lock;
use crate::manager::LockManager;

/// "One of us is the leader; if it dies, another takes over."
///
/// Every process that may lead campaigns on the same key. A campaign waits for
/// the lock, runs the leader's work with the lease (pass its fence to what the
/// leader writes), stops the work as soon as the lock is lost (the work's future
/// is dropped), and then waits again, with backoff. When the work returns by
/// itself the leader steps down: the lock is released and the campaign waits
/// again after a backoff, so that another process may take over.
///
/// Made by [`LockManager::leader_election`]; the ttl, heartbeat and retry policy
/// are the manager's.
///
/// ```
/// use std::time::Duration;
/// use distrlock_core::{LockManager, MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> distrlock_core::Result<()> {
/// let manager = LockManager::new(MemoryBackend::new());
/// let leadership = manager.leader_election("scheduler")?.spawn(|lease| async move {
///     // The leader's work: runs until the lock is lost or the campaign stops.
///     loop {
///         println!("leading with fence {}", lease.fence());
///         tokio::time::sleep(Duration::from_millis(50)).await;
///     }
/// });
/// tokio::time::sleep(Duration::from_millis(120)).await;
/// assert!(leadership.is_leader());
/// leadership.shutdown().await?; // stops the work, releases the lock
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct LeaderElection {
    lock: Lock,
    manager: LockManager,
}

impl LockManager {
    /// A leader election on `key`: see [`LeaderElection`].
    ///
    /// Returns [`Error::InvalidKey`] for a key that is not valid.
    pub fn leader_election(&self, key: impl AsRef<str>) -> Result<LeaderElection> {
        Ok(LeaderElection {
            lock: self.lock(key)?,
            manager: self.clone(),
        })
    }
}

impl LeaderElection {
    /// Starts campaigning in a task of its own on the current tokio runtime, and
    /// returns its handle. `work` is called each time this process becomes the
    /// leader.
    ///
    /// Dropping the handle stops the campaign as [`Leadership::shutdown`] does,
    /// without waiting for it.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, as `tokio::spawn` does.
    pub fn spawn<F, Fut>(self, work: F) -> Leadership
    where
        F: FnMut(Lease) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, stopped) = watch::channel(false);
        let (state, leader) = watch::channel(None);
        let task = tokio::spawn(self.campaign(work, stopped, state));
        Leadership {
            stop,
            leader,
            task: Mutex::new(Some(task)),
        }
    }

    /// Campaigns until `stop` says so (or its sender is gone), publishing the
    /// lease while leading.
    async fn campaign<F, Fut>(
        self,
        mut work: F,
        mut stop: watch::Receiver<bool>,
        state: watch::Sender<Option<Lease>>,
    ) -> Result<()>
    where
        F: FnMut(Lease) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let retry = self.manager.retry_policy().clone();
        let mut rounds: u32 = 0;
        loop {
            let acquired = tokio::select! {
                biased;
                () = stopped(&mut stop) => return Ok(()),
                acquired = self.lock.acquire() => acquired,
            };
            let guard = match acquired {
                Ok(guard) => guard,
                // A manager whose policy has a deadline: campaign again.
                Err(Error::Timeout { .. }) => continue,
                Err(error) if error.is_transient() => {
                    rounds = rounds.saturating_add(1);
                    tracing::debug!(key = %self.lock.key(), %error, "leader campaign: acquire failed; retrying");
                    if sleep_or_stop(retry.delay(rounds, None), &mut stop).await {
                        return Ok(());
                    }
                    continue;
                }
                Err(error) => return Err(error),
            };
            let lease = guard.lease();
            tracing::info!(key = %lease.key(), fence = %lease.fence(), "became the leader");
            state.send_replace(Some(lease.clone()));
            let lost = guard.lost();
            let mut leading = Box::pin(work(lease));
            let ended = tokio::select! {
                // The lock first: a lost lock stops the work before its next poll.
                biased;
                () = lost => Ended::Lost,
                () = stopped(&mut stop) => Ended::Stopped,
                () = &mut leading => Ended::SteppedDown,
            };
            drop(leading);
            state.send_replace(None);
            match ended {
                Ended::Lost => {
                    let reason = guard.loss_reason();
                    tracing::warn!(key = %self.lock.key(), ?reason, "leadership lost; campaigning again");
                    drop(guard);
                }
                Ended::Stopped => {
                    // Released, or left to expire if the database is away.
                    let _ = guard.release().await;
                    return Ok(());
                }
                Ended::SteppedDown => {
                    tracing::info!(key = %self.lock.key(), "the leader's work returned; stepping down");
                    let _ = guard.release().await;
                }
            }
            rounds = rounds.saturating_add(1);
            if sleep_or_stop(retry.delay(rounds, None), &mut stop).await {
                return Ok(());
            }
        }
    }
}

enum Ended {
    Lost,
    Stopped,
    SteppedDown,
}

/// Resolves once the campaign is asked to stop, or its handle is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Sleeps `delay`; true if asked to stop meanwhile.
async fn sleep_or_stop(delay: std::time::Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = stopped(stop) => true,
    }
}

/// The handle of a running [`LeaderElection`] campaign.
pub struct Leadership {
    stop: watch::Sender<bool>,
    leader: watch::Receiver<Option<Lease>>,
    task: Mutex<Option<JoinHandle<Result<()>>>>,
}

impl Leadership {
    /// Whether this process leads now (its work is running under the lock).
    pub fn is_leader(&self) -> bool {
        self.leader.borrow().is_some()
    }

    /// The lease this process leads with, if it leads.
    pub fn lease(&self) -> Option<Lease> {
        self.leader.borrow().clone()
    }

    /// A receiver that sees every change of leadership: `Some(lease)` while
    /// leading, `None` otherwise.
    pub fn watch(&self) -> watch::Receiver<Option<Lease>> {
        self.leader.clone()
    }

    /// Stops the campaign: stops the leader's work if it runs, releases the
    /// lock, and waits for that. Returns the error that ended the campaign
    /// early, if one did (a permanent backend error such as
    /// [`Error::SchemaMissing`]).
    pub async fn shutdown(self) -> Result<()> {
        self.stop.send_replace(true);
        let task = self
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match task {
            Some(task) => match task.await {
                Ok(result) => result,
                Err(join) => Err(Error::Backend {
                    message: "the leader campaign panicked".into(),
                    transient: false,
                    source: Some(Box::new(join)),
                }),
            },
            None => Ok(()),
        }
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl fmt::Debug for Leadership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leadership")
            .field("lease", &*self.leader.borrow())
            .finish_non_exhaustive()
    }
}
