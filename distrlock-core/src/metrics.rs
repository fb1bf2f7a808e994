//! What distrlock counts and times, on the [`metrics`](https://docs.rs/metrics)
//! crate's facade (the `metrics` feature): install any `metrics` recorder (a
//! Prometheus exporter, say) and these appear. Without the feature every
//! function here does nothing.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `distrlock_acquisitions_total` | counter | | locks acquired (a guard was handed out) |
//! | `distrlock_refusals_total` | counter | | tries refused because another owner held the key |
//! | `distrlock_acquire_timeouts_total` | counter | | waits that gave up at their deadline |
//! | `distrlock_locks_lost_total` | counter | `reason` | guards that lost their lock, by [`LossReason::as_str`] |
//! | `distrlock_extend_failures_total` | counter | | extends (single or in a batch) that failed or did not answer |
//! | `distrlock_renewal_batches_total` | counter | | `extend_many` batches sent by the heartbeat |
//! | `distrlock_wait_seconds` | histogram | | time from the start of an acquire to the guard (or the timeout) |
//! | `distrlock_hold_seconds` | histogram | | time from acquisition to release, drop, detach or loss |
//!
//! Keys are not labels: their number is unbounded.

use std::time::Duration;

use crate::loss::LossReason;

/// Locks acquired.
pub const ACQUISITIONS: &str = "distrlock_acquisitions_total";
/// Tries refused because another owner held the key.
pub const REFUSALS: &str = "distrlock_refusals_total";
/// Waits that gave up at their deadline.
pub const ACQUIRE_TIMEOUTS: &str = "distrlock_acquire_timeouts_total";
/// Locks lost, labelled by `reason`.
pub const LOCKS_LOST: &str = "distrlock_locks_lost_total";
/// Extends that failed or did not answer.
pub const EXTEND_FAILURES: &str = "distrlock_extend_failures_total";
/// Renewal batches sent.
pub const RENEWAL_BATCHES: &str = "distrlock_renewal_batches_total";
/// Wait durations, in seconds.
pub const WAIT_SECONDS: &str = "distrlock_wait_seconds";
/// Hold durations, in seconds.
pub const HOLD_SECONDS: &str = "distrlock_hold_seconds";

pub(crate) fn acquired(waited: Duration) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::counter!(ACQUISITIONS).increment(1);
        ::metrics::histogram!(WAIT_SECONDS).record(waited.as_secs_f64());
    }
    let _ = waited;
}

pub(crate) fn refused() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(REFUSALS).increment(1);
}

pub(crate) fn timed_out(waited: Duration) {
    #[cfg(feature = "metrics")]
    {
        ::metrics::counter!(ACQUIRE_TIMEOUTS).increment(1);
        ::metrics::histogram!(WAIT_SECONDS).record(waited.as_secs_f64());
    }
    let _ = waited;
}

pub(crate) fn lost(reason: LossReason) {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(LOCKS_LOST, "reason" => reason.as_str()).increment(1);
    let _ = reason;
}

pub(crate) fn extend_failed() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(EXTEND_FAILURES).increment(1);
}

pub(crate) fn renewal_batch() {
    #[cfg(feature = "metrics")]
    ::metrics::counter!(RENEWAL_BATCHES).increment(1);
}

pub(crate) fn held(held: Duration) {
    #[cfg(feature = "metrics")]
    ::metrics::histogram!(HOLD_SECONDS).record(held.as_secs_f64());
    let _ = held;
}
