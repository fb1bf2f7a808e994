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
//!   A process in a time namespace (`unshare --time`) reads `CLOCK_MONOTONIC`
//!   shifted by its namespace's offset, with the same boot id: its readings are
//!   corrected by the offset in `/proc/self/timens_offsets`, so that all of
//!   them are the host's clock. Where the offset cannot be read, the clock id
//!   also names the namespace, so rows written outside it count by wall clock.
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
    /// Microseconds this process's time namespace adds to `CLOCK_MONOTONIC`,
    /// subtracted from every reading so that it is the host's clock (zero
    /// outside a time namespace, and when the lease clock is the wall clock).
    namespace_offset: i64,
    /// Wall-clock minus lease-clock microseconds, measured once in `detect`
    /// (zero when the lease clock is the wall clock).
    offset: i64,
}

impl HostClock {
    /// The monotonic clock of this boot where it can be named, else the wall clock.
    ///
    /// A process in a Linux time namespace (`unshare --time`) has the boot id of
    /// every other process but reads `CLOCK_MONOTONIC` shifted by its
    /// namespace's offset: its readings are corrected by that offset (from
    /// `/proc/self/timens_offsets`), so that every process of the boot measures
    /// leases on the same clock. Where the offset cannot be read, the clock is
    /// named after the namespace too, and rows written by processes outside it
    /// are judged by their wall-clock expiry.
    pub fn detect() -> Self {
        Self::detect_with(boot_id(), monotonic_micros(), time_namespace())
    }

    fn detect_with(boot: Option<String>, monotonic: Option<i64>, namespace: TimeNamespace) -> Self {
        match (boot, monotonic) {
            (Some(boot), Some(monotonic)) => {
                let (id, namespace_offset) = match namespace {
                    TimeNamespace::Offset(offset) => (format!("boot:{boot}"), offset),
                    TimeNamespace::Unknown(name) => (format!("boot:{boot}/timens:{name}"), 0),
                };
                let lease = monotonic.saturating_sub(namespace_offset);
                Self {
                    id,
                    monotonic: true,
                    namespace_offset,
                    offset: wall_micros().saturating_sub(lease),
                }
            }
            _ => Self {
                id: "wall".to_owned(),
                monotonic: false,
                namespace_offset: 0,
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
            monotonic_micros().map_or(wall, |us| us.saturating_sub(self.namespace_offset))
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

/// What this process's time namespace does to `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TimeNamespace {
    /// It adds this many microseconds (zero in the host's namespace, or on a
    /// kernel without time namespaces).
    Offset(i64),
    /// Unknown: the offsets could not be read. The namespace's name (its
    /// inode), or `unknown`.
    Unknown(String),
}

#[cfg(target_os = "linux")]
fn time_namespace() -> TimeNamespace {
    match std::fs::read_to_string("/proc/self/timens_offsets") {
        Ok(text) => match monotonic_offset(&text) {
            Some(offset) => TimeNamespace::Offset(offset),
            None => TimeNamespace::Unknown(namespace_name()),
        },
        // Before Linux 5.6, or without CONFIG_TIME_NS, there are no time
        // namespaces, unless /proc is not there at all.
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                && std::fs::metadata("/proc/self/ns/time").is_err()
                && std::fs::metadata("/proc/self/stat").is_ok() =>
        {
            TimeNamespace::Offset(0)
        }
        Err(_) => TimeNamespace::Unknown(namespace_name()),
    }
}

#[cfg(not(target_os = "linux"))]
fn time_namespace() -> TimeNamespace {
    TimeNamespace::Offset(0)
}

#[cfg(target_os = "linux")]
fn namespace_name() -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self/ns/time")
        .map_or_else(|_| "unknown".to_owned(), |m| m.ino().to_string())
}

/// The `monotonic` line of `/proc/self/timens_offsets` (`monotonic SECS NSECS`,
/// Linux 5.6+) in microseconds; `None` if there is no such line or it is
/// malformed. The file's offsets are relative to the host's clocks.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn monotonic_offset(text: &str) -> Option<i64> {
    let line = text.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let name = fields.next()?;
        // Linux prints the clock's name; the id 1 is CLOCK_MONOTONIC.
        (name == "monotonic" || name == "1").then_some(fields)
    })?;
    let mut fields = line;
    let secs: i64 = fields.next()?.parse().ok()?;
    let nanos: i64 = fields.next()?.parse().ok()?;
    if fields.next().is_some() || !(0..1_000_000_000).contains(&nanos) {
        return None;
    }
    secs.checked_mul(1_000_000)?.checked_add(nanos / 1_000)
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

    #[test]
    fn reads_the_monotonic_offset_of_a_time_namespace() {
        let host = "monotonic           0         0\nboottime            0         0\n";
        assert_eq!(monotonic_offset(host), Some(0));
        let shifted = "monotonic        3600         0\nboottime            0         0\n";
        assert_eq!(monotonic_offset(shifted), Some(3_600_000_000));
        let back = "boottime 0 0\nmonotonic -5 250000000\n";
        assert_eq!(monotonic_offset(back), Some(-4_750_000));
        assert_eq!(monotonic_offset("1 7 1000\n"), Some(7_000_001));
        for bad in [
            "",
            "boottime 0 0",
            "monotonic x 0",
            "monotonic 1",
            "monotonic 1 2 3",
        ] {
            assert_eq!(monotonic_offset(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_time_namespace_offset_is_taken_off_every_reading() {
        let boot = Some("b".to_owned());
        let reading = monotonic_micros().unwrap_or_else(wall_micros);
        let host = HostClock::detect_with(boot.clone(), Some(reading), TimeNamespace::Offset(0));
        // Detected inside a namespace an hour ahead, whose readings are an hour
        // ahead too: the same clock, and the same id.
        let hour = 3_600_000_000;
        let shifted = HostClock::detect_with(
            boot.clone(),
            Some(reading + hour),
            TimeNamespace::Offset(hour),
        );
        assert_eq!(host.id(), shifted.id());
        assert_eq!(host.offset / 1_000_000, shifted.offset / 1_000_000);
        let unknown = HostClock::detect_with(
            boot,
            Some(reading),
            TimeNamespace::Unknown("4026532177".into()),
        );
        assert_eq!(unknown.id(), "boot:b/timens:4026532177");
        assert_ne!(unknown.id(), host.id(), "an unknown shift is another clock");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn linux_uses_the_monotonic_clock_of_this_boot() {
        let clock = HostClock::detect();
        assert!(clock.id().starts_with("boot:"), "clock id {}", clock.id());
        assert_eq!(clock.id(), HostClock::detect().id(), "stable within a boot");
    }
}
