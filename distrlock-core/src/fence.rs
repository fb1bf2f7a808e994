//! [`Fence`]: the fencing token of one acquisition.

use std::fmt;

/// A fencing token: a 64-bit number that every successful acquisition of a key
/// makes strictly greater than every fence returned before for that key.
///
/// Pass it to the resource you protect and have the resource refuse any write that
/// carries a smaller fence than one it has seen. That keeps a paused or partitioned
/// former holder from doing damage after its lease ran out.
///
/// ```
/// use distrlock_core::Fence;
///
/// assert!(Fence::new(2) > Fence::new(1));
/// assert_eq!(Fence::new(7).get(), 7);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fence(i64);

impl Fence {
    /// Wraps a raw fence value as stored by a backend.
    pub const fn new(value: i64) -> Self {
        Self(value)
    }

    /// The raw value.
    pub const fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Debug for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fence({})", self.0)
    }
}

impl fmt::Display for Fence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<Fence> for i64 {
    fn from(value: Fence) -> Self {
        value.0
    }
}
