//! The one [`Error`] type of distrlock and its [`Result`] alias.

use std::time::Duration;

use crate::key::LockKey;
use crate::loss::LossReason;

/// A boxed error from a database driver.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of every fallible distrlock operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a lock.
///
/// Backends map their driver's errors into [`Error::Unavailable`] and
/// [`Error::Backend`]; every other variant has one meaning across all backends, so
/// code written against one backend behaves the same on another.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock key is empty, too long or contains NUL.
    #[error("invalid lock key: {reason}")]
    InvalidKey {
        /// Why the key was refused.
        reason: String,
    },

    /// The ttl is zero, too short or too long.
    #[error("invalid ttl: {reason}")]
    InvalidTtl {
        /// Why the ttl was refused.
        reason: String,
    },

    /// A token string is not a UUID.
    #[error("invalid token: {reason}")]
    InvalidToken {
        /// Why the token was refused.
        reason: String,
    },

    /// The table name is not a plain (optionally qualified) SQL identifier.
    #[error("invalid table name {name:?}: {reason}")]
    InvalidTableName {
        /// The refused name (cut to 80 characters).
        name: String,
        /// Why it was refused.
        reason: String,
    },

    /// Some other setting is out of range, such as an owner text or a heartbeat
    /// interval that is not shorter than the ttl.
    #[error("invalid configuration: {reason}")]
    InvalidConfig {
        /// What is wrong.
        reason: String,
    },

    /// A try-acquire found the lock held by another token.
    #[error("lock {key} is held by another owner{}", fmt_remaining(*remaining))]
    HeldByOther {
        /// The contended key.
        key: LockKey,
        /// How long the holder's lease has left on the server's clock, if known.
        remaining: Option<Duration>,
    },

    /// Extend or release with a token that does not hold a live lease: the lease
    /// expired, was released, or was taken over. Nothing was changed.
    #[error("lock {key} is not held by this token (expired, released or taken over)")]
    NotHeld {
        /// The key.
        key: LockKey,
    },

    /// Waiting to acquire gave up at its deadline.
    #[error("timed out after {waited:?} waiting for lock {key}")]
    Timeout {
        /// The contended key.
        key: LockKey,
        /// How long the caller waited.
        waited: Duration,
    },

    /// The guard passed its local deadline without a successful extend, or an
    /// extend found the lease gone: this process must no longer act as the holder.
    #[error("lock {key} was lost: {reason}")]
    LockLost {
        /// The key whose lock was lost.
        key: LockKey,
        /// Why.
        reason: LossReason,
    },

    /// The lock table does not exist.
    #[error("lock table {table} does not exist: {hint}")]
    SchemaMissing {
        /// The table that was looked for.
        table: String,
        /// How to create it.
        hint: String,
    },

    /// The database could not be reached: connecting failed or timed out, or the
    /// connection broke. Always transient.
    #[error("database unavailable: {message}")]
    Unavailable {
        /// What happened, without credentials.
        message: String,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },

    /// The database answered with an error.
    #[error("database error: {message}")]
    Backend {
        /// What happened, without credentials.
        message: String,
        /// Whether retrying the same call may succeed (deadlock, serialization
        /// failure, lock wait timeout, server shutting down, …).
        transient: bool,
        /// The driver's error, if any.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Whether retrying the same call later may succeed.
    ///
    /// True for [`Error::Unavailable`] and for transient [`Error::Backend`] errors.
    /// The waiting acquire retries these; everything else ends the wait.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Backend { transient, .. } => *transient,
            _ => false,
        }
    }

    /// A transient backend error with a message and its source.
    pub fn transient(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            message: message.into(),
            transient: true,
            source: Some(source.into()),
        }
    }

    /// A permanent backend error with a message and its source.
    pub fn permanent(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend {
            message: message.into(),
            transient: false,
            source: Some(source.into()),
        }
    }

    /// An [`Error::Backend`] without a driver error behind it: the database
    /// answered something the backend cannot use (an unexpected reply, a fence at
    /// its maximum). `transient` says whether retrying may help.
    pub fn backend(message: impl Into<String>, transient: bool) -> Self {
        Error::Backend {
            message: message.into(),
            transient,
            source: None,
        }
    }

    /// An [`Error::Unavailable`] with a message and its source.
    pub fn unavailable(message: impl Into<String>, source: Option<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source,
        }
    }
}

fn fmt_remaining(remaining: Option<Duration>) -> String {
    match remaining {
        Some(d) => format!(" for another {d:?}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_transient_errors() {
        let io = std::io::Error::other("boom");
        assert!(Error::transient("deadlock", io).is_transient());
        assert!(Error::unavailable("refused", None).is_transient());
        let io = std::io::Error::other("boom");
        assert!(!Error::permanent("syntax", io).is_transient());
        let key = LockKey::new("k").unwrap();
        assert!(!Error::NotHeld { key }.is_transient());
    }

    #[test]
    fn held_message_names_remaining_lease() {
        let key = LockKey::new("k").unwrap();
        let e = Error::HeldByOther {
            key,
            remaining: Some(Duration::from_secs(3)),
        };
        assert_eq!(
            e.to_string(),
            "lock k is held by another owner for another 3s"
        );
    }
}
