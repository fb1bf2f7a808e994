//! The host clock that leases are measured on.
//!
//! Every process that shares a database file runs on the same host, so the host's
//! clock is "the database's clock". Which of the host's clocks matters:
//!
//! - On Linux, leases are measured on `CLOCK_MONOTONIC`, tagged with the kernel's
//!   boot id (`/proc/sys/kernel/random/boot_id`). The monotonic clock is shared by
//!   all processes of one boot, never jumps when the wall clock is set, and is the
//!   clock `std::time::Instant` (and so the guard's local deadline) runs on: a
//!   lease can neither end early because NTP stepped the wall clock forward, nor
//!   outlive the guard's deadline because of a suspend. A row written on another
//!   clock (an earlier boot, or a process that could not read the boot id) is
//!   judged by its wall-clock expiry, since instants of two clocks cannot be
//!   compared: a live lease is respected, and after a reboot a dead holder's lease
//!   lasts at most until its wall-clock end.
//! - Elsewhere (or if the boot id cannot be read), leases are measured on the wall
//!   clock, tagged `wall`. Then a step of the wall clock moves every lease's end
//!   by the same amount: forward ends leases early, backward keeps them longer.
//!
//! The backend reports each grant's and renewal's clock reading to the lock
//! manager (contract item 9 of `LockBackend`) as a [`SystemTime`]: the
//! [wall-clock equivalent](HostClock::as_system_time) of the lease clock's
//! reading, which advances exactly as the lease clock does.

use std::time::{SystemTime, UNIX_EPOCH};

use distrlock_core::server_clock::from_unix_micros;

/// One reading of the host clock.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Microseconds on the lease clock.
    pub lease: i64,
    /// Microseconds since the Unix epoch on the wall clock, for display.
    pub wall: i64,
}

/// The lease clock of this host, chosen once per backend.
#[derive(Debug, Clone)]
pub struct HostClock {
    id: String,
    monotonic: bool,
    /// Wall-clock minus lease-clock microseconds, measured once in `detect`
    /// (zero when the lease clock is the wall clock).
    offset: i64,
}

impl HostClock {
    /// The monotonic clock of this boot where it can be named, else the wall clock.
    pub fn detect() -> Self {
        match (boot_id(), monotonic_micros()) {
            (Some(boot), Some(monotonic)) => Self {
                id: format!("boot:{boot}"),
                monotonic: true,
                offset: wall_micros().saturating_sub(monotonic),
            },
            _ => Self {
                id: "wall".to_owned(),
                monotonic: false,
                offset: 0,
            },
        }
    }

    /// The value stored in the `clock` column.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Reads the clock now.
    pub fn now(&self) -> Now {
        let wall = wall_micros();
        let lease = if self.monotonic {
            // `detect` checked that the clock can be read; it cannot start failing.
            monotonic_micros().unwrap_or(wall)
        } else {
            wall
        };
        Now { lease, wall }
    }

    /// The reading `now` of the lease clock as a [`SystemTime`]: the lease clock
    /// shifted by the offset between the wall clock and it, as measured when
    /// this clock was detected (no shift when the lease clock is the wall clock).
    ///
    /// This is the value the backend returns as the server's clock reading of a
    /// grant or a renewal. It moves exactly as the lease clock does, so the
    /// guard's comparison of successive readings with its own clock sees the
    /// clock leases are measured on: a step of the wall clock, which moves no
    /// monotonic lease, does not look like a server clock step. It matches the
    /// wall-clock `acquired_at` and `expires_at` that the same statement stores,
    /// up to however far the wall clock has been stepped since the backend
    /// opened.
    pub fn as_system_time(&self, now: Now) -> SystemTime {
        from_unix_micros(now.lease.saturating_add(self.offset))
    }
}

/// Microseconds since the Unix epoch (negative before it, saturating far out).
pub(crate) fn wall_micros() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_micros()).map_or(i64::MIN, |us| -us),
    }
}

#[cfg(target_os = "linux")]
fn boot_id() -> Option<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

#[cfg(not(target_os = "linux"))]
fn boot_id() -> Option<String> {
    None
}

#[cfg(target_os = "linux")]
// `time_t` and `c_long` are i32 on 32-bit Linux: the conversions are not useless there.
#[allow(clippy::useless_conversion)]
fn monotonic_micros() -> Option<i64> {
    use nix::time::{ClockId, clock_gettime};
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC).ok()?;
    let secs = i64::from(ts.tv_sec()).checked_mul(1_000_000)?;
    secs.checked_add(i64::from(ts.tv_nsec()) / 1_000)
}

#[cfg(not(target_os = "linux"))]
fn monotonic_micros() -> Option<i64> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn lease_clock_advances_with_real_time() {
        let clock = HostClock::detect();
        let a = clock.now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = clock.now();
        let advanced = b.lease - a.lease;
        assert!(
            (15_000..2_000_000).contains(&advanced),
            "lease clock advanced {advanced} µs in 20 ms"
        );
        assert!(b.wall > a.wall);
    }

    #[test]
    fn the_system_time_reading_follows_the_lease_clock_near_the_wall_clock() {
        let clock = HostClock::detect();
        let a = clock.now();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = clock.now();
        let (ta, tb) = (clock.as_system_time(a), clock.as_system_time(b));
        let moved = tb.duration_since(ta).expect("it does not go back");
        assert_eq!(
            i64::try_from(moved.as_micros()).unwrap(),
            b.lease - a.lease,
            "it advances exactly as the lease clock"
        );
        let wall = UNIX_EPOCH + Duration::from_micros(u64::try_from(b.wall).unwrap());
        let apart = match tb.duration_since(wall) {
            Ok(d) => d,
            Err(e) => e.duration(),
        };
        assert!(
            apart < Duration::from_secs(1),
            "{apart:?} from the wall clock"
        );
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_uses_the_monotonic_clock_of_this_boot() {
        let clock = HostClock::detect();
        assert!(clock.id().starts_with("boot:"), "clock id {}", clock.id());
        assert_eq!(clock.id(), HostClock::detect().id(), "stable within a boot");
    }
}
