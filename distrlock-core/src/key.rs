//! [`LockKey`]: the validated name of a lock.

use std::fmt;

use crate::error::{Error, Result};

/// The name of a lock: 1 to 255 bytes of UTF-8 without NUL characters.
///
/// Keys are compared exactly: `"a"`, `"A"` and `"a "` are three different locks.
/// Every backend stores and compares them byte for byte.
///
/// ```
/// use distrlock_core::LockKey;
///
/// let key = LockKey::new("billing/nightly-report").unwrap();
/// assert_eq!(key.as_str(), "billing/nightly-report");
/// assert!(LockKey::new("").is_err());
/// assert!(LockKey::new("a\0b").is_err());
/// assert!(LockKey::new("x".repeat(256)).is_err());
/// ```
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockKey(String);

impl LockKey {
    /// The longest key, in bytes of UTF-8.
    pub const MAX_LEN: usize = 255;

    /// Validates `key` and wraps it.
    ///
    /// Returns [`Error::InvalidKey`] when the key is empty, longer than
    /// [`LockKey::MAX_LEN`] bytes, or contains a NUL character (which PostgreSQL
    /// cannot store in text).
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        if key.is_empty() {
            return Err(Error::InvalidKey {
                reason: "a lock key must not be empty".into(),
            });
        }
        if key.len() > Self::MAX_LEN {
            return Err(Error::InvalidKey {
                reason: format!(
                    "a lock key is at most {} bytes of UTF-8, this one has {}",
                    Self::MAX_LEN,
                    key.len()
                ),
            });
        }
        if key.contains('\0') {
            return Err(Error::InvalidKey {
                reason: "a lock key must not contain a NUL character".into(),
            });
        }
        Ok(Self(key))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the key and returns its text.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for LockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for LockKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<&str> for LockKey {
    type Error = Error;
    fn try_from(value: &str) -> Result<Self> {
        Self::new(value)
    }
}

impl TryFrom<String> for LockKey {
    type Error = Error;
    fn try_from(value: String) -> Result<Self> {
        Self::new(value)
    }
}

impl std::str::FromStr for LockKey {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_max_length_multibyte_key() {
        // 85 three-byte characters = 255 bytes.
        let key = "€".repeat(85);
        assert_eq!(key.len(), 255);
        assert!(LockKey::new(key).is_ok());
        assert!(matches!(
            LockKey::new("€".repeat(86)),
            Err(Error::InvalidKey { .. })
        ));
    }

    #[test]
    fn keeps_case_and_spaces_exactly() {
        let a = LockKey::new("a").unwrap();
        assert_ne!(a, LockKey::new("A").unwrap());
        assert_ne!(a, LockKey::new("a ").unwrap());
        assert_eq!(LockKey::new(" a ").unwrap().as_str(), " a ");
    }
}
