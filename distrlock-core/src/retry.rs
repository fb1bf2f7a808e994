//! [`RetryPolicy`]: how a waiting acquire spaces its tries.

use std::time::Duration;

use crate::error::{Error, Result};

/// Exponential backoff with full jitter, a cap and an optional overall deadline.
///
/// Before try number `n` (counting from 0) a waiter sleeps a random time between
/// 1 ms and `min(max_delay, initial_delay × 2ⁿ)`. It never sleeps past the holder's
/// reported expiry, and with a backend that sends release notifications it wakes as
/// soon as the lock is released. The cap (`max_delay`) is therefore the longest a
/// waiter can take to notice a lock that became free without a notification: the
/// poll interval.
///
/// ```
/// use std::time::Duration;
/// use distrlock_core::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .with_initial_delay(Duration::from_millis(10))
///     .with_max_delay(Duration::from_millis(500))
///     .with_deadline(Some(Duration::from_secs(60)));
/// for attempt in 0..20 {
///     assert!(policy.delay(attempt, None) <= Duration::from_millis(500));
/// }
/// // Never past the holder's remaining lease.
/// assert!(policy.delay(10, Some(Duration::from_millis(3))) <= Duration::from_millis(3));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    initial_delay: Duration,
    max_delay: Duration,
    deadline: Option<Duration>,
}

impl RetryPolicy {
    /// The shortest sleep between tries, so that waiters never spin.
    pub const MIN_DELAY: Duration = Duration::from_millis(1);

    /// 25 ms initial delay, 1 s cap, no deadline (wait until acquired).
    pub fn new() -> Self {
        Self {
            initial_delay: Duration::from_millis(25),
            max_delay: Duration::from_secs(1),
            deadline: None,
        }
    }

    /// Sets the upper bound of the first sleep.
    pub fn with_initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Sets the cap on any one sleep: the poll interval.
    pub fn with_max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Sets how long a waiting acquire may take in all; `None` waits until acquired.
    pub fn with_deadline(mut self, deadline: Option<Duration>) -> Self {
        self.deadline = deadline;
        self
    }

    /// The upper bound of the first sleep.
    pub fn initial_delay(&self) -> Duration {
        self.initial_delay
    }

    /// The cap on any one sleep: the poll interval.
    pub fn max_delay(&self) -> Duration {
        self.max_delay
    }

    /// How long a waiting acquire may take in all; `None` waits until acquired.
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// The longest `max_delay` accepted: one hour.
    pub const MAX_DELAY: Duration = Duration::from_secs(60 * 60);

    /// Checks that the delays are non-zero, ordered, and at most
    /// [`RetryPolicy::MAX_DELAY`]. Any deadline is accepted; one too far in the
    /// future to represent means no deadline.
    pub fn validate(&self) -> Result<()> {
        if self.initial_delay.is_zero() {
            return Err(Error::InvalidConfig {
                reason: "retry policy: initial delay must be non-zero".into(),
            });
        }
        if self.max_delay < self.initial_delay {
            return Err(Error::InvalidConfig {
                reason: "retry policy: max delay must be at least the initial delay".into(),
            });
        }
        if self.max_delay > Self::MAX_DELAY {
            return Err(Error::InvalidConfig {
                reason: "retry policy: max delay must be at most one hour".into(),
            });
        }
        Ok(())
    }

    /// The sleep before try number `attempt + 1`: full jitter over the capped
    /// exponential bound, and never longer than `holder_remaining`.
    pub fn delay(&self, attempt: u32, holder_remaining: Option<Duration>) -> Duration {
        let bound = self.ceiling(attempt);
        let jittered = bound.mul_f64(fastrand::f64()).max(Self::MIN_DELAY);
        match holder_remaining {
            // A lease about to end: wake right when it does (but never spin).
            Some(remaining) => jittered.min(remaining.max(Self::MIN_DELAY)),
            None => jittered,
        }
    }

    /// `min(max_delay, initial_delay × 2^attempt)`, without overflow.
    fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial_delay
            .checked_mul(factor)
            .unwrap_or(self.max_delay)
            .min(self.max_delay)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let p = RetryPolicy::new()
            .with_initial_delay(Duration::from_millis(10))
            .with_max_delay(Duration::from_millis(100));
        assert_eq!(p.ceiling(0), Duration::from_millis(10));
        assert_eq!(p.ceiling(1), Duration::from_millis(20));
        assert_eq!(p.ceiling(3), Duration::from_millis(80));
        assert_eq!(p.ceiling(4), Duration::from_millis(100));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn delays_are_jittered_within_bounds() {
        let p = RetryPolicy::new()
            .with_initial_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(1));
        let delays: Vec<_> = (0..200).map(|_| p.delay(10, None)).collect();
        assert!(delays.iter().all(|d| *d >= RetryPolicy::MIN_DELAY));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 100, "full jitter spreads the delays");
    }

    #[test]
    fn never_sleeps_past_holder_expiry() {
        let p = RetryPolicy::new().with_max_delay(Duration::from_secs(60));
        for _ in 0..100 {
            assert!(p.delay(20, Some(Duration::from_millis(7))) <= Duration::from_millis(7));
        }
        assert_eq!(p.delay(20, Some(Duration::ZERO)), RetryPolicy::MIN_DELAY);
    }

    #[test]
    fn validate_refuses_zero_and_inverted_delays() {
        assert!(
            RetryPolicy::new()
                .with_initial_delay(Duration::ZERO)
                .validate()
                .is_err()
        );
        assert!(
            RetryPolicy::new()
                .with_initial_delay(Duration::from_secs(2))
                .with_max_delay(Duration::from_secs(1))
                .validate()
                .is_err()
        );
        assert!(RetryPolicy::new().validate().is_ok());
    }
}
