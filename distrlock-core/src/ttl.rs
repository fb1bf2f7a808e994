//! [`Ttl`]: the validated length of a lease.

use std::fmt;
use std::time::Duration;

use crate::error::{Error, Result};

/// How long a lease lasts after the database grants or extends it.
///
/// A ttl is at least [`Ttl::MIN`] (one millisecond) and at most [`Ttl::MAX`]
/// (365 days), so that no arithmetic on the client or on the server can overflow.
///
/// ```
/// use std::time::Duration;
/// use distrlock_core::Ttl;
///
/// let ttl = Ttl::new(Duration::from_secs(30)).unwrap();
/// assert_eq!(ttl.as_micros(), 30_000_000);
/// assert!(Ttl::new(Duration::ZERO).is_err());
/// assert!(Ttl::new(Duration::MAX).is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ttl(Duration);

impl Ttl {
    /// The shortest ttl: one millisecond.
    pub const MIN: Duration = Duration::from_millis(1);
    /// The longest ttl: 365 days.
    pub const MAX: Duration = Duration::from_secs(365 * 24 * 60 * 60);

    /// The default ttl of a [`LockManager`](crate::LockManager): 30 seconds.
    pub const DEFAULT: Ttl = Ttl(Duration::from_secs(30));

    /// Validates `ttl`; returns [`Error::InvalidTtl`] outside [`Ttl::MIN`]..=[`Ttl::MAX`].
    pub fn new(ttl: Duration) -> Result<Self> {
        if ttl < Self::MIN {
            return Err(Error::InvalidTtl {
                reason: format!("a ttl must be at least 1ms, got {ttl:?}"),
            });
        }
        if ttl > Self::MAX {
            return Err(Error::InvalidTtl {
                reason: format!("a ttl must be at most 365 days, got {ttl:?}"),
            });
        }
        Ok(Self(ttl))
    }

    /// The ttl as a [`Duration`].
    pub const fn get(self) -> Duration {
        self.0
    }

    /// Whole microseconds, the unit the SQL backends store.
    pub fn as_micros(self) -> i64 {
        // At most 365 days = 3.2e13 µs: always fits.
        i64::try_from(self.0.as_micros()).unwrap_or(i64::MAX)
    }
}

impl fmt::Debug for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ttl({:?})", self.0)
    }
}

impl TryFrom<Duration> for Ttl {
    type Error = Error;
    fn try_from(value: Duration) -> Result<Self> {
        Self::new(value)
    }
}

impl From<Ttl> for Duration {
    fn from(value: Ttl) -> Self {
        value.0
    }
}
