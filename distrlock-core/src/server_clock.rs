//! [`ServerClock`]: what a backend knows of its database server's clock, so that
//! a call can carry a server-side "not after" bound; and the conversions between
//! [`SystemTime`] and the integer microseconds that SQL statements return.
//!
//! A request can reach the server long after it was sent: a network path that
//! froze and healed delivers everything it held back, the FIN of a closed socket
//! included, and the server then runs the statement. By then the caller has given
//! up. [`LockBackend`](crate::LockBackend)'s contract therefore gives every
//! mutating call a `not_after` instant of the caller's monotonic clock, and an SQL
//! backend turns it into a bound on the server's clock with
//! [`ServerClock::bound_micros`]: the statement compares its own clock reading
//! with that bound and changes nothing when it runs too late.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// How much faster the local monotonic clock may run than the server's clock, as
/// a fraction: 1/500 (0.2 %), the same allowance as the guard's default safety
/// margin. NTP-disciplined clocks differ by far less (at most 500 ppm).
pub const MAX_CLOCK_RATE_DIFFERENCE: u32 = 500;

/// The latest reading of a database server's clock, and when its answer arrived.
///
/// Every statement of an SQL backend reads the server's clock once; feed that
/// reading to [`observe`](Self::observe) with the instant the answer arrived.
/// [`bound_micros`](Self::bound_micros) then maps an instant of this process's
/// monotonic clock onto the server's clock, rounding toward *earlier*: since the
/// reading was taken before the answer arrived, `reading + (instant − arrival)`
/// is never later than the server's clock at `instant` (less a rate allowance of
/// [`MAX_CLOCK_RATE_DIFFERENCE`]). A statement that refuses to act once its
/// clock passes that bound can therefore never act after `instant`.
///
/// ```
/// use std::time::Duration;
/// use distrlock_core::server_clock::ServerClock;
/// use tokio::time::Instant;
///
/// let clock = ServerClock::new();
/// let now = Instant::now();
/// assert_eq!(clock.bound_micros(now + Duration::from_secs(1)), None);
/// clock.observe(now, 1_700_000_000_000_000);
/// let bound = clock.bound_micros(now + Duration::from_secs(1)).unwrap();
/// // One second later on the server, less the 0.2 % allowance.
/// assert_eq!(bound, 1_700_000_000_000_000 + 998_000);
/// ```
#[derive(Debug, Default)]
pub struct ServerClock {
    latest: Mutex<Option<Reading>>,
}

#[derive(Debug, Clone, Copy)]
struct Reading {
    /// When the answer carrying the reading arrived.
    arrived: Instant,
    /// The server's clock, in microseconds since the Unix epoch.
    server_us: i64,
}

impl ServerClock {
    /// A clock with no reading yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that an answer which arrived at `arrived` carried the server clock
    /// reading `server_us` (microseconds since the Unix epoch). The latest answer
    /// wins, so a server clock that steps is followed at the next answer.
    pub fn observe(&self, arrived: Instant, server_us: i64) {
        let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        if latest.is_none_or(|r| arrived >= r.arrived) {
            *latest = Some(Reading { arrived, server_us });
        }
    }

    /// Whether a reading has been observed.
    pub fn is_known(&self) -> bool {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// `instant` on the server's clock, in microseconds since the Unix epoch,
    /// rounded toward earlier (see the type's docs); `None` before any reading.
    pub fn bound_micros(&self, instant: Instant) -> Option<i64> {
        let reading = (*self.latest.lock().unwrap_or_else(PoisonError::into_inner))?;
        Some(if instant >= reading.arrived {
            let elapsed = instant - reading.arrived;
            let allowance = elapsed / MAX_CLOCK_RATE_DIFFERENCE;
            reading
                .server_us
                .saturating_add(micros_i64(elapsed - allowance))
        } else {
            let before = reading.arrived - instant;
            let allowance = before / MAX_CLOCK_RATE_DIFFERENCE;
            reading
                .server_us
                .saturating_sub(micros_i64(before.saturating_add(allowance)))
        })
    }
}

fn micros_i64(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Microseconds since the Unix epoch of `at` (negative before 1970), saturating
/// at the ends of `i64`.
///
/// ```
/// use std::time::{Duration, UNIX_EPOCH};
/// use distrlock_core::server_clock::{from_unix_micros, unix_micros};
///
/// assert_eq!(unix_micros(UNIX_EPOCH + Duration::from_micros(42)), 42);
/// assert_eq!(from_unix_micros(-1_000_000), UNIX_EPOCH - Duration::from_secs(1));
/// ```
pub fn unix_micros(at: SystemTime) -> i64 {
    match at.duration_since(UNIX_EPOCH) {
        Ok(after) => micros_i64(after),
        Err(before) => micros_i64(before.duration()).saturating_neg(),
    }
}

/// The instant `us` microseconds after the Unix epoch (before it when negative).
/// Values beyond what [`SystemTime`] can hold saturate to the epoch's side they
/// are on, so decoding a server's answer never panics.
pub fn from_unix_micros(us: i64) -> SystemTime {
    let magnitude = Duration::from_micros(us.unsigned_abs());
    let at = if us >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    at.unwrap_or(UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bound_never_runs_ahead_of_the_server() {
        let clock = ServerClock::new();
        let sent = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await;
        // The server read its clock somewhere between sending and arrival.
        clock.observe(Instant::now(), 10_000_000);
        // An instant before the arrival maps to before the reading.
        assert!(clock.bound_micros(sent).unwrap() <= 10_000_000 - 5_000);
        let later = Instant::now() + Duration::from_secs(100);
        assert_eq!(clock.bound_micros(later).unwrap(), 10_000_000 + 99_800_000);
    }

    #[tokio::test(start_paused = true)]
    async fn the_latest_reading_wins_so_steps_are_followed() {
        let clock = ServerClock::new();
        let first = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        let second = Instant::now();
        clock.observe(second, 500_000_000);
        // An older answer that arrives late does not replace it.
        clock.observe(first, 1_000_000_000_000);
        assert_eq!(clock.bound_micros(second), Some(500_000_000));
    }

    #[test]
    fn conversions_saturate_instead_of_panicking() {
        for us in [i64::MIN, i64::MAX] {
            let _ = unix_micros(from_unix_micros(us));
        }
        assert_eq!(from_unix_micros(0), UNIX_EPOCH);
        assert_eq!(
            unix_micros(from_unix_micros(1_700_000_000_123_456)),
            1_700_000_000_123_456
        );
        assert_eq!(unix_micros(from_unix_micros(-5)), -5);
    }
}
