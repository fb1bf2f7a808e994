//! [`Owner`]: the validated text stored with each acquisition, saying who holds
//! a lock.

use std::fmt;

use crate::backend::MAX_OWNER_LEN;
use crate::error::{Error, Result};

/// Who holds a lock, as written to the `owner` column with each acquisition and
/// shown by [`LockInfo`](crate::LockInfo): at most [`MAX_LEN`](Self::MAX_LEN)
/// bytes of UTF-8 without NUL (the widest column every backend stores; NUL ends
/// text in C clients). The text is free-form, empty included, and says nothing
/// about who may release a lock: that is the [`Token`](crate::Token)'s job.
///
/// This type is the one place the rule lives: the manager, each backend and the
/// CLI check an owner text with [`Owner::new`].
///
/// ```
/// use distrlock_core::Owner;
///
/// let owner = Owner::new("report-job@host-a").unwrap();
/// assert_eq!(owner.as_str(), "report-job@host-a");
/// assert!(Owner::new("a\0b").is_err());
/// assert!(Owner::new("x".repeat(256)).is_err());
///
/// // For texts made up from the environment: cut to fit instead of refused.
/// assert_eq!(Owner::lossy("€".repeat(100)).as_str().len(), 255);
/// assert!(Owner::this_process().as_str().ends_with(&format!(":{}", std::process::id())));
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Owner(String);

impl Owner {
    /// The longest owner text, in bytes.
    pub const MAX_LEN: usize = MAX_OWNER_LEN;

    /// Checks `text`; returns [`Error::InvalidConfig`] if it is longer than
    /// [`MAX_LEN`](Self::MAX_LEN) bytes or contains NUL.
    pub fn new(text: impl Into<String>) -> Result<Self> {
        let text = text.into();
        if text.len() > Self::MAX_LEN {
            return Err(Error::InvalidConfig {
                reason: format!(
                    "an owner text is at most {} bytes, this one has {}",
                    Self::MAX_LEN,
                    text.len()
                ),
            });
        }
        if text.contains('\0') {
            return Err(Error::InvalidConfig {
                reason: "an owner text must not contain NUL".into(),
            });
        }
        Ok(Self(text))
    }

    /// `text` without its NULs, cut at a character boundary to at most
    /// [`MAX_LEN`](Self::MAX_LEN) bytes: for owner texts made up from host
    /// names and program names, which should not make a lock fail.
    pub fn lossy(text: impl Into<String>) -> Self {
        let mut text = text.into();
        text.retain(|c| c != '\0');
        if text.len() > Self::MAX_LEN {
            let mut cut = Self::MAX_LEN;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        Self(text)
    }

    /// `host:pid` of this process, the [`LockManager`](crate::LockManager)'s
    /// default.
    pub fn this_process() -> Self {
        Self::lossy(format!("{}:{}", Self::host_name(), std::process::id()))
    }

    /// This host's name, as [`this_process`](Self::this_process) writes it:
    /// `$HOSTNAME`, else the kernel's host name, else `localhost`.
    pub fn host_name() -> String {
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.trim().is_empty())
            .or_else(|| read_trimmed("/proc/sys/kernel/hostname"))
            .or_else(|| read_trimmed("/etc/hostname"))
            .map_or_else(|| "localhost".to_owned(), |h| h.trim().to_owned())
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The text, as an owned string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Owner {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Owner {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Self::new(text)
    }
}

impl TryFrom<String> for Owner {
    type Error = Error;

    fn try_from(text: String) -> Result<Self> {
        Self::new(text)
    }
}

impl From<Owner> for String {
    fn from(owner: Owner) -> Self {
        owner.0
    }
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_host_and_pid_and_valid() {
        let owner = Owner::this_process();
        assert!(
            owner
                .as_str()
                .ends_with(&format!(":{}", std::process::id()))
        );
        assert!(Owner::new(owner.as_str()).is_ok());
    }

    #[test]
    fn refuses_long_or_nul_owner_with_invalid_config() {
        for bad in ["x".repeat(256), "a\0b".to_owned()] {
            assert!(matches!(Owner::new(bad), Err(Error::InvalidConfig { .. })));
        }
        assert!(Owner::new("").is_ok());
        assert!(Owner::new("x".repeat(255)).is_ok());
    }

    #[test]
    fn lossy_cuts_at_a_character_boundary_and_drops_nul() {
        let cut = Owner::lossy("€".repeat(200));
        assert!(cut.as_str().len() <= Owner::MAX_LEN);
        assert!(Owner::new(cut.as_str()).is_ok());
        assert_eq!(Owner::lossy("a\0b").as_str(), "ab");
    }
}
