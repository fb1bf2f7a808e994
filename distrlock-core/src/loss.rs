//! [`LossReason`]: why a guard stopped claiming its lock.

use std::fmt;

/// Why a lock was lost, as [`Error::LockLost`](crate::Error::LockLost) and
/// [`LockGuard::loss_reason`](crate::LockGuard::loss_reason) report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LossReason {
    /// An extend found the lease gone: someone released it with the token, or it
    /// ran out on the server and another token took the key.
    TakenOver,
    /// The local deadline passed while extends kept failing or timing out: the
    /// database could not be reached in time.
    Unreachable,
    /// The local deadline passed without a failed extend: heartbeats are off, or
    /// the process was too busy to run them (a blocking step in async code).
    LeaseRanOut,
    /// The local deadline passed after it was shortened because the database
    /// server's clock ran ahead of this host's (a clock step).
    ClockStep,
    /// The host was suspended long enough for the lease to run out meanwhile.
    Suspended,
}

impl LossReason {
    /// A short lowercase name: `taken_over`, `unreachable`, `lease_ran_out`,
    /// `clock_step`, `suspended` (for logs, metrics and JSON).
    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::TakenOver => "taken_over",
            LossReason::Unreachable => "unreachable",
            LossReason::LeaseRanOut => "lease_ran_out",
            LossReason::ClockStep => "clock_step",
            LossReason::Suspended => "suspended",
        }
    }
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LossReason::TakenOver => "the lease was taken over or released elsewhere",
            LossReason::Unreachable => "the database could not be reached before the lease ran out",
            LossReason::LeaseRanOut => "the lease ran out without being extended",
            LossReason::ClockStep => "the database server's clock stepped ahead",
            LossReason::Suspended => "the host was suspended while the lease ran out",
        })
    }
}
