//! [`Lease`]: what a successful acquisition hands back.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::fence::Fence;
use crate::key::LockKey;
use crate::token::Token;
use crate::ttl::Ttl;

/// A snapshot of one holding of a lock: its key, token, fence and ttl, and the
/// local deadline and the backend-side expiry at the moment the snapshot was
/// taken.
///
/// The local deadline is the monotonic instant at which this process stops
/// claiming the lock unless an extend succeeds first: the instant the latest
/// successful acquire or extend request was *sent*, plus the ttl, minus a safety
/// margin. Because the database computes expiry from a later instant (when it ran
/// the statement), the server never frees the lock before this deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub(crate) key: LockKey,
    pub(crate) token: Token,
    pub(crate) fence: Fence,
    pub(crate) ttl: Ttl,
    pub(crate) deadline: Instant,
    pub(crate) expires_at: SystemTime,
}

impl Lease {
    /// The key this lease is on.
    pub fn key(&self) -> &LockKey {
        &self.key
    }

    /// The token of this holding.
    pub fn token(&self) -> Token {
        self.token
    }

    /// The fencing token of this holding: pass it to the resource you protect.
    pub fn fence(&self) -> Fence {
        self.fence
    }

    /// The lease length each acquire or extend asks for.
    pub fn ttl(&self) -> Ttl {
        self.ttl
    }

    /// The local deadline when this snapshot was taken.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// When the lease ends on the backend's clock, as of the latest grant or
    /// renewal before the snapshot (see
    /// [`LockGuard::expires_at`](crate::LockGuard::expires_at)).
    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Time left until the snapshot's deadline (zero once it has passed).
    pub fn time_left(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}
