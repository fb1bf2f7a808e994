//! [`Token`]: the secret that identifies one holding of a lock.

use std::fmt;

use uuid::Uuid;

use crate::error::{Error, Result};

/// Identifies one holding of a lock: a random UUID v4.
///
/// Whoever knows the token may extend or release the lock, so treat it like a
/// short-lived secret. Acquiring again with the token of the current, live holding
/// succeeds and keeps the fence; this makes a retried acquire idempotent.
///
/// ```
/// use distrlock_core::Token;
///
/// let token = Token::new();
/// let parsed: Token = token.to_string().parse().unwrap();
/// assert_eq!(token, parsed);
/// assert!("not-a-uuid".parse::<Token>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Token(Uuid);

impl Token {
    /// A new random token.
    pub fn new() -> Self {
        Self(Uuid::new_v4())
    }

    /// Wraps an existing UUID, for example one read back from a database.
    pub fn from_uuid(uuid: Uuid) -> Self {
        Self(uuid)
    }

    /// The token as a UUID.
    pub fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for Token {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.0.hyphenated())
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl std::str::FromStr for Token {
    type Err = Error;
    /// Parses the hyphenated UUID form that [`Display`](fmt::Display) writes.
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(Self)
            .map_err(|e| Error::InvalidToken {
                reason: format!("a token is a UUID: {e}"),
            })
    }
}

impl From<Uuid> for Token {
    fn from(value: Uuid) -> Self {
        Self(value)
    }
}
