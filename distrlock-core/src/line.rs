//! The line of waiters on a key: tickets handed out at refusal, served in order.
//!
//! A backend that serves waiters in order keeps three things with each key's
//! row, next to the lease: `next`, the number of the next ticket to hand out;
//! `head`, the first ticket not yet served or skipped when the key last became
//! free; and the instant the key became free (its release, or its lease's
//! end). [`LockBackend::try_acquire_as_waiter`] hands a refused waiter a ticket
//! once; the waiter passes it back on every later try of the same wait.
//!
//! While the key is free, ticket `head` has the first [`TURN`] to take it, ticket `head + 1` the next turn, and so on: the ticket served at an
//! instant is [`serving`]. A waiter that died or gave up holds the line up for
//! one turn, never longer. A try without the served ticket (a newcomer, or the
//! holder that just released and asks again) is refused until the line is
//! empty, so it gets in line behind the waiters. Once every ticket is served
//! or skipped, the line is empty and the first try wins, as without a line.
//!
//! [`LockBackend::try_acquire_as_waiter`]: crate::LockBackend::try_acquire_as_waiter

use std::time::Duration;

use crate::backend::AcquireOutcome;

/// How long a waiter whose turn has come has to take a free key before the
/// next ticket's turn begins.
///
/// A waiter that died or gave up holds the line up by this much. A live waiter
/// whose try comes later than this after its turn began (a stall, a lost
/// notification) loses its place and gets a new ticket at the back. It is one
/// constant for every caller, so that all of them reckon the same turns.
pub const TURN: Duration = Duration::from_millis(250);

/// A waiting caller's place in the key's line, as it passes it to
/// [`LockBackend::try_acquire_as_waiter`](crate::LockBackend::try_acquire_as_waiter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The ticket an earlier refusal of this same wait handed out, if any.
    pub ticket: Option<u64>,
    /// `true`: take a free key only in turn. `false` (unfair): take a free key
    /// whenever it is free, ahead of earlier waiters; the ticket then serves
    /// only to be woken by the release.
    pub fair: bool,
}

impl Place {
    /// A fair first try: no ticket yet.
    pub const fn first() -> Self {
        Self {
            ticket: None,
            fair: true,
        }
    }
}

impl Default for Place {
    fn default() -> Self {
        Self::first()
    }
}

/// A waiter's ticket, as a refusal reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket {
    /// The ticket's number; pass it back in [`Place::ticket`].
    pub number: u64,
    /// How many releases of the key come before this ticket's turn, by the
    /// backend's reckoning when it answered: the tickets before it, less one
    /// whose turn is running on the free key (that one takes it without a
    /// release). 0: the next release starts this ticket's turn.
    pub ahead: u64,
}

/// What one [`LockBackend::try_acquire_as_waiter`](crate::LockBackend::try_acquire_as_waiter)
/// achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaiterAnswer {
    /// Granted, or refused with the holder's remaining lease.
    pub outcome: AcquireOutcome,
    /// When refused by a backend that keeps a line: the caller's ticket, new
    /// or the one it passed in. `None` from a backend without a line, or when
    /// no ticket could be handed out this time (the caller asks again).
    pub ticket: Option<Ticket>,
}

/// The ticket served `free_for` after the key became free, when the first
/// ticket not yet served was `head`: `head + ⌊free_for / turn⌋` (saturating;
/// backends pass [`TURN`]).
///
/// The line is empty when this is at or past `next`. A backend written in
/// Rust can use it; an SQL backend computes the same in its statement.
pub fn serving(head: u64, free_for: Duration, turn: Duration) -> u64 {
    let turns = free_for.as_micros() / turn.as_micros().max(1);
    head.saturating_add(u64::try_from(turns).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_turn_serves_the_next_ticket() {
        let turn = Duration::from_millis(100);
        assert_eq!(serving(5, Duration::ZERO, turn), 5);
        assert_eq!(serving(5, Duration::from_millis(99), turn), 5);
        assert_eq!(serving(5, Duration::from_millis(100), turn), 6);
        assert_eq!(serving(5, Duration::from_millis(250), turn), 7);
        assert_eq!(
            serving(u64::MAX - 1, Duration::from_secs(10), turn),
            u64::MAX
        );
        assert_eq!(
            serving(0, Duration::from_secs(1), Duration::ZERO),
            1_000_000
        );
    }
}
