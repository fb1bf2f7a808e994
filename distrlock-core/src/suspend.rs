//! How long the host has been suspended, so that local deadlines count suspend
//! time as the database server's clock does.
//!
//! tokio's clock is `CLOCK_MONOTONIC`, which stops while the host is suspended
//! (a laptop's lid closed, a VM paused); the server's clock goes on, and leases
//! expire meanwhile. On Linux, `CLOCK_BOOTTIME − CLOCK_MONOTONIC` grows by exactly
//! the time spent suspended, so a guard subtracts that growth from its deadline.
//! Elsewhere the growth reads as zero and a suspended host must be treated as
//! having lost its locks.

use std::time::Duration;

use tokio::time::Instant;

/// An instant of tokio's clock, with how long the host had been suspended by
/// then: the moment a request was sent.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sent {
    pub(crate) at: Instant,
    pub(crate) suspended: Duration,
}

impl Sent {
    pub(crate) fn now() -> Self {
        Self {
            at: Instant::now(),
            suspended: suspended(),
        }
    }

    /// `at + after` on tokio's clock, less any suspend time since `self`.
    pub(crate) fn deadline(&self, after: Duration) -> Instant {
        let slept = suspended().saturating_sub(self.suspended);
        let at = self.at + after;
        at.checked_sub(slept).unwrap_or(self.at)
    }
}

/// The host's total time suspended since boot.
pub(crate) fn suspended() -> Duration {
    measured() + simulated()
}

#[cfg(target_os = "linux")]
fn measured() -> Duration {
    use nix::time::{ClockId, clock_gettime};
    let read = |id| clock_gettime(id).map(Duration::from);
    match (
        read(ClockId::CLOCK_BOOTTIME),
        read(ClockId::CLOCK_MONOTONIC),
    ) {
        (Ok(boot), Ok(mono)) => boot.saturating_sub(mono),
        _ => Duration::ZERO,
    }
}

#[cfg(not(target_os = "linux"))]
fn measured() -> Duration {
    Duration::ZERO
}

#[cfg(test)]
static SIMULATED_US: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Tests add a suspend of their own.
#[cfg(test)]
pub(crate) fn simulate(suspend: Duration) {
    SIMULATED_US.fetch_add(
        suspend.as_micros() as u64,
        std::sync::atomic::Ordering::SeqCst,
    );
}

#[cfg(test)]
fn simulated() -> Duration {
    Duration::from_micros(SIMULATED_US.load(std::sync::atomic::Ordering::SeqCst))
}

#[cfg(not(test))]
fn simulated() -> Duration {
    Duration::ZERO
}
