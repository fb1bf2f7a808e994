//! [`ReleaseNotifier`]: how a backend wakes waiters when a lock is released.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::broadcast;

use crate::key::LockKey;

/// A fan-out of release announcements from a backend to every waiter in this
/// process.
///
/// A backend that learns of releases (its own, or other processes' through, say,
/// PostgreSQL `LISTEN`) calls [`notify`](Self::notify); waiters hold a
/// [`ReleaseSubscription`]. Announcements are hints: a waiter that misses one still
/// polls.
#[derive(Debug, Clone)]
pub struct ReleaseNotifier {
    // `None` means "anything may have been released": sent after a listener
    // reconnects and may have missed announcements.
    tx: broadcast::Sender<Option<LockKey>>,
    /// Whether every release, by any process, is announced here right now
    /// (see [`set_complete`](Self::set_complete)).
    complete: Arc<AtomicBool>,
}

impl ReleaseNotifier {
    /// A notifier with room for 1,024 announcements per slow subscriber. It
    /// starts incomplete: only some releases are announced.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(1024);
        Self {
            tx,
            complete: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Says whether every release of every key, by any process, is announced
    /// here (`true`: a PostgreSQL backend while its `LISTEN` connection is up,
    /// the in-memory backend), or only this process's own (`false`, the
    /// default).
    ///
    /// A waiter in line ([`crate::line`]) then relies on the announcements
    /// and asks again only when its turn may have come; with an incomplete
    /// notifier it also polls, more often the nearer it is to the head of the
    /// line.
    pub fn set_complete(&self, complete: bool) {
        self.complete.store(complete, Ordering::Relaxed);
    }

    /// Whether every release is announced here (see
    /// [`set_complete`](Self::set_complete)).
    pub fn is_complete(&self) -> bool {
        self.complete.load(Ordering::Relaxed)
    }

    /// Announces that `key` was released.
    pub fn notify(&self, key: &LockKey) {
        // No subscribers is fine: nobody is waiting.
        let _ = self.tx.send(Some(key.clone()));
    }

    /// Wakes every waiter, for when announcements may have been missed.
    pub fn notify_all(&self) {
        let _ = self.tx.send(None);
    }

    /// Starts listening. Subscribe *before* trying to acquire, so that a release
    /// between the try and the wait is not missed.
    pub fn subscribe(&self) -> ReleaseSubscription {
        ReleaseSubscription {
            rx: self.tx.subscribe(),
        }
    }
}

impl Default for ReleaseNotifier {
    fn default() -> Self {
        Self::new()
    }
}

/// One waiter's view of a [`ReleaseNotifier`].
#[derive(Debug)]
pub struct ReleaseSubscription {
    rx: broadcast::Receiver<Option<LockKey>>,
}

impl ReleaseSubscription {
    /// Resolves when `key` (or possibly any key) is announced as released.
    ///
    /// If announcements were dropped because this subscriber fell behind, it
    /// resolves at once, since one of them may have been for `key`. If the notifier
    /// is gone, it never resolves and the waiter falls back to polling.
    pub async fn released(&mut self, key: &LockKey) {
        loop {
            match self.rx.recv().await {
                Ok(Some(released)) if &released == key => return,
                Ok(Some(_)) => continue,
                Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => std::future::pending().await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wakes_only_for_its_key() {
        let notifier = ReleaseNotifier::new();
        let a = LockKey::new("a").unwrap();
        let b = LockKey::new("b").unwrap();
        let mut sub = notifier.subscribe();
        notifier.notify(&b);
        let waited = tokio::time::timeout(Duration::from_secs(1), sub.released(&a)).await;
        assert!(
            waited.is_err(),
            "a release of b must not wake a waiter on a"
        );
        notifier.notify(&a);
        tokio::time::timeout(Duration::from_secs(1), sub.released(&a))
            .await
            .expect("a release of a wakes its waiter");
        notifier.notify_all();
        tokio::time::timeout(Duration::from_secs(1), sub.released(&a))
            .await
            .expect("notify_all wakes every waiter");
    }
}
