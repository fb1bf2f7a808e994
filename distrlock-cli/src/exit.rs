//! Exit codes, and turning errors into one-line messages.

use distrlock_core::{Error, LockKey};

use crate::url::DbUrl;

/// The token does not hold the lock (extend, release).
pub(crate) const NOT_HELD: u8 = 1;
/// Bad command line (clap uses the same code for its own errors).
pub(crate) const USAGE: u8 = 2;
/// `EX_UNAVAILABLE`: database unreachable or table missing.
pub(crate) const UNAVAILABLE: u8 = 69;
/// `EX_SOFTWARE`: the lock was lost while the command ran.
pub(crate) const LOCK_LOST: u8 = 70;
/// `EX_TEMPFAIL`: the lock was not acquired in time (the default conflict code).
pub(crate) const CONFLICT: u8 = 75;
/// The command could not be started (as in shells).
pub(crate) const CANNOT_EXECUTE: u8 = 126;
/// The command was not found (as in shells).
pub(crate) const NOT_FOUND: u8 = 127;

/// A failure that ends distrlock: its exit code and a one-line message for stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CliError {
    /// The process's exit code.
    pub(crate) code: u8,
    /// What went wrong and what to do, on one line, without secrets.
    pub(crate) message: String,
}

impl CliError {
    pub(crate) fn new(code: u8, message: String) -> Self {
        // One line, always: the message may quote driver text or a key.
        let message = message.replace(['\n', '\r'], " ");
        Self { code, message }
    }

    pub(crate) fn usage(message: String) -> Self {
        Self::new(USAGE, message)
    }

    pub(crate) fn unavailable(message: String) -> Self {
        Self::new(UNAVAILABLE, message)
    }

    /// Maps a lock error to its exit code and a message that says what to do.
    pub(crate) fn from_lock(error: Error, url: &DbUrl, table: &str) -> Self {
        match error {
            // PostgreSQL: longer than the table's max_ttl.
            Error::InvalidTtl { ref reason } if reason.contains("max_ttl") => Self::usage(format!(
                "{error}; raise the table's max_ttl with `distrlock init --max-ttl <DURATION>` \
                 (it is also how long a promoted standby grants no lock)"
            )),
            Error::InvalidKey { .. }
            | Error::InvalidTtl { .. }
            | Error::InvalidToken { .. }
            | Error::InvalidTableName { .. }
            | Error::InvalidConfig { .. } => Self::usage(error.to_string()),
            Error::SchemaMissing { table, .. } => Self::unavailable(format!(
                "the lock table {table} does not exist in {url}; create it with `distrlock init` \
                 (or apply the DDL from `distrlock schema` with your migration tool)"
            )),
            Error::Unavailable { message, .. } => Self::unavailable(format!(
                "cannot reach the database {url}: {message}; check --url (or DISTRLOCK_URL) and \
                 that the database is running"
            )),
            Error::Backend { message, .. } => Self::unavailable(format!(
                "database error on {url} (table {table}): {message}"
            )),
            Error::NotHeld { key } => Self::not_held(&key),
            Error::LockLost { key, .. } => {
                Self::new(LOCK_LOST, format!("lock {} was lost", show_key(&key)))
            }
            Error::HeldByOther { .. } | Error::Timeout { .. } => {
                Self::new(CONFLICT, error.to_string())
            }
            other => Self::new(LOCK_LOST, other.to_string()),
        }
    }

    pub(crate) fn not_held(key: &LockKey) -> Self {
        Self::new(
            NOT_HELD,
            format!(
                "lock {} is not held by this token: it expired, was released or was taken over; \
                 nothing was changed",
                show_key(key)
            ),
        )
    }
}

/// A key quoted for messages, with control characters escaped.
pub(crate) fn show_key(key: &LockKey) -> String {
    format!("{key:?}")
}
