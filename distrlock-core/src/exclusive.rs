//! [`ExclusiveError`]: why work run under a lock did not finish as the only
//! holder.

use std::convert::Infallible;
use std::fmt;

use crate::error::Error;
use crate::key::LockKey;

/// Why [`LockManager::do_exclusively`](crate::LockManager::do_exclusively) did not
/// finish its work while holding the lock.
///
/// `T` is the work's output and `E` its error type, for work that returns a
/// `Result` (`Infallible` for work that cannot fail).
///
/// It converts into [`Error`] with `?` when `E` is `Infallible`, so code that
/// propagates distrlock's errors needs no change; match on it to keep the output
/// of work whose lock was lost after it finished.
///
/// ```
/// use std::sync::Arc;
/// use distrlock_core::{ExclusiveError, LockManager, MemoryBackend};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let manager = LockManager::new(Arc::new(MemoryBackend::new()));
/// match manager.do_exclusively("report", |_lease| async { 42 }).await {
///     Ok(output) => assert_eq!(output, 42),
///     // The work ran to its end, but the lease lapsed first (say, a blocking
///     // step starved the heartbeat): another process may have held the key.
///     Err(ExclusiveError::LostAfterWork { output, .. }) => println!("unprotected: {output}"),
///     Err(error) => panic!("{error}"),
/// }
/// # }
/// ```
#[non_exhaustive]
pub enum ExclusiveError<T, E = Infallible> {
    /// The lock was not acquired ([`Error::Timeout`], a backend error, …), or it
    /// was lost while the work ran and the work was stopped: its future was
    /// dropped before it was polled again ([`Error::LockLost`]).
    Lock(Error),
    /// The work ran to its end and returned `output`, but the lock was lost
    /// before it was released: the lease lapsed during the work's last step (a
    /// blocking call, a CPU loop), so another holder may have started meanwhile.
    /// Treat the work's effects as unprotected, except those checked against the
    /// lease's fence.
    LostAfterWork {
        /// The key whose lock was lost.
        key: LockKey,
        /// What the work returned.
        output: T,
    },
    /// The work returned this error. The lock was released (or its loss is
    /// irrelevant: the work failed either way).
    Work(E),
}

impl<T, E> ExclusiveError<T, E> {
    /// The work's output, if it ran to its end.
    pub fn into_output(self) -> Option<T> {
        match self {
            ExclusiveError::LostAfterWork { output, .. } => Some(output),
            _ => None,
        }
    }

    /// The lock error, for [`Lock`](Self::Lock).
    pub fn lock_error(&self) -> Option<&Error> {
        match self {
            ExclusiveError::Lock(error) => Some(error),
            _ => None,
        }
    }

    /// Whether the lock was lost: during the work ([`Error::LockLost`], the work
    /// was stopped) or after it ([`LostAfterWork`](Self::LostAfterWork)).
    pub fn is_lock_lost(&self) -> bool {
        matches!(
            self,
            ExclusiveError::Lock(Error::LockLost { .. }) | ExclusiveError::LostAfterWork { .. }
        )
    }
}

impl<T, E> From<Error> for ExclusiveError<T, E> {
    fn from(error: Error) -> Self {
        ExclusiveError::Lock(error)
    }
}

/// For `?` in code that returns distrlock's [`Result`](crate::Result): a lock
/// lost after the work becomes [`Error::LockLost`], and the output is dropped.
impl<T> From<ExclusiveError<T, Infallible>> for Error {
    fn from(error: ExclusiveError<T, Infallible>) -> Self {
        match error {
            ExclusiveError::Lock(error) => error,
            ExclusiveError::LostAfterWork { key, .. } => Error::LockLost { key },
            ExclusiveError::Work(never) => match never {},
        }
    }
}

impl<T, E: fmt::Debug> fmt::Debug for ExclusiveError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExclusiveError::Lock(error) => f.debug_tuple("Lock").field(error).finish(),
            ExclusiveError::LostAfterWork { key, .. } => f
                .debug_struct("LostAfterWork")
                .field("key", key)
                .finish_non_exhaustive(),
            ExclusiveError::Work(error) => f.debug_tuple("Work").field(error).finish(),
        }
    }
}

impl<T, E: fmt::Display> fmt::Display for ExclusiveError<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExclusiveError::Lock(error) => error.fmt(f),
            ExclusiveError::LostAfterWork { key, .. } => write!(
                f,
                "lock {key} was lost before the work finished: another holder may have started"
            ),
            ExclusiveError::Work(error) => write!(f, "the exclusive work failed: {error}"),
        }
    }
}

impl<T, E> std::error::Error for ExclusiveError<T, E>
where
    E: std::error::Error + 'static,
{
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ExclusiveError::Lock(error) => Some(error),
            ExclusiveError::LostAfterWork { .. } => None,
            ExclusiveError::Work(error) => Some(error),
        }
    }
}
