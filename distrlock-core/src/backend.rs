//! The [`LockBackend`] trait that every storage implements, the values it
//! returns, and the toolkit a backend author needs, in one place:
//!
//! - time as integer microseconds since the Unix epoch, the form SQL backends
//!   read and write: [`unix_micros`] and [`from_unix_micros`];
//! - the server's clock as the backend has seen it, for the not-after bound
//!   of contract item 8: [`ServerClock`];
//! - owner texts checked once: [`Owner`];
//! - an error for an answer the backend cannot use, with no made-up driver
//!   error behind it: [`Error::backend`](crate::Error::backend); and
//!   [`Error::transient`](crate::Error::transient),
//!   [`Error::permanent`](crate::Error::permanent) and
//!   [`Error::unavailable`](crate::Error::unavailable) for driver errors;
//! - [`MAX_OWNER_LEN`] and [`MAX_EXTEND_BATCH`].
//!
//! Everything here is also exported at the crate's root.

pub use crate::owner::Owner;
pub use crate::server_clock::{ServerClock, from_unix_micros, unix_micros};

/// Percent-encodes `text` for a URL's user, host or path part: every byte but
/// the unreserved ones (`A–Z a–z 0–9 - _ . ~`) becomes `%XX`, so nothing in it
/// can end the part early. For backends that write a connection URL back (a
/// config's `Serialize`), never with its password.
///
/// ```
/// use distrlock_core::backend::encode_url_part;
/// assert_eq!(encode_url_part("app user/1"), "app%20user%2F1");
/// assert_eq!(encode_url_part("café"), "caf%C3%A9");
/// ```
pub fn encode_url_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(char::from(byte));
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::time::Instant;

use crate::error::Result;
use crate::fence::Fence;
use crate::key::LockKey;
use crate::line::{Place, WaiterAnswer};
use crate::notify::ReleaseNotifier;
use crate::token::Token;
use crate::ttl::Ttl;

/// Storage for leases: one row (or entry) per key holding a token, a fence, an
/// owner text and an expiry.
///
/// Users rarely call a backend directly: [`LockManager`](crate::LockManager) adds
/// waiting, heartbeats and guards on top. Implement this trait to store locks
/// somewhere new, then run the conformance suite from `distrlock-testkit` against it.
///
/// # Contract
///
/// Every implementation keeps these promises. The conformance suite of
/// `distrlock-testkit` checks them: each of its cases names the item it proves.
///
/// 1. **Mutual exclusion.** At any instant of the backend's clock at most one token
///    holds a live lease on a key. A lease is live from a successful
///    [`try_acquire`](Self::try_acquire) or [`extend`](Self::extend) until `ttl`
///    later on the backend's clock, or until [`release`](Self::release).
/// 2. **Fencing.** Every successful acquisition that starts a new holding — the
///    key had no row, or its lease had been released or had expired, whatever the
///    token — returns a [`Fence`] strictly greater than every fence returned
///    before for that key, for the life of the storage. Re-acquiring while the
///    same token's lease is still live is not a new holding: it succeeds, renews
///    the lease and returns the *same* fence, so a retried acquire is idempotent.
///    "For the life of the storage" includes a failover to a replica: a backend
///    whose failover can lose commits must still never repeat a fence (the
///    PostgreSQL backend puts the server's timeline, which grows at every
///    promotion, into the fence's high bits: on timeline N fences are at least
///    (N − 1)·2⁴⁰). Deleting rows or restoring an older backup can make fences
///    go back; nothing here protects against that.
/// 3. **Ownership.** Only the token of the live lease can extend or release it. Any
///    other token, or the right token after expiry or release, gets
///    [`Error::NotHeld`](crate::Error::NotHeld) and changes nothing.
/// 4. **One clock.** Expiry is computed and compared on the backend's own clock
///    (the database server's), never on the caller's, and independent of session
///    settings such as time zones. That clock must *slew, never step* (NTP with
///    stepping off, no `date -s`, no VM snapshot restores). A forward step
///    expires every lease at once: a guard learns of it at its next extend, so
///    two processes may both act as holder for at most one heartbeat interval
///    plus one round trip; a backward step makes a dead holder's lease outlive
///    its ttl by the step. [`LockManager`](crate::LockManager) notices a step
///    from the readings of item 9, shortens its deadlines by the excess and logs
///    a warning.
///
///    Liveness rests on the same clock: a holder that dies without releasing
///    blocks the key until its lease ends, `ttl` after its last successful
///    extend, and then the next try-acquire takes over. A backend whose
///    storage has several clocks (a Galera cluster: every node judges expiry
///    by its own) may be configured with a maximum clock skew (the MySQL
///    backend's `max_clock_skew`): a try-acquire by another token then counts
///    a lease as expired only that long after its end, so mutual exclusion
///    holds while the clocks disagree by less than it, and a takeover after a
///    holder's death comes `ttl + max_clock_skew` after its last extend
///    instead of `ttl`. The holder's own extend and release judge its lease as
///    before.
/// 5. **Refusal is cheap and harmless.** A refused try-acquire changes nothing and
///    reports the holder's remaining lease when the backend knows it. A refused
///    [`try_acquire_as_waiter`](Self::try_acquire_as_waiter) may write one thing,
///    the caller's ticket in the key's line (item 14), and never the lease.
/// 6. **Bounded calls.** Every call returns, with a result or an error, within the
///    backend's configured timeouts; a call never waits indefinitely on another
///    transaction's row lock.
/// 7. **Errors are typed.** A missing table gives
///    [`Error::SchemaMissing`](crate::Error::SchemaMissing); an unreachable database
///    gives [`Error::Unavailable`](crate::Error::Unavailable); other database errors
///    give [`Error::Backend`](crate::Error::Backend) with
///    [`is_transient`](crate::Error::is_transient) telling whether a retry may help.
///    No error message contains a password.
/// 8. **No late effects.** [`try_acquire`](Self::try_acquire),
///    [`extend`](Self::extend), [`extend_many`](Self::extend_many) and
///    [`release`](Self::release) take `not_after`, an instant of the caller's
///    monotonic clock (tokio's) at which the caller stops waiting for the answer.
///    The call must change nothing if it would take effect after that instant,
///    even when its request reaches the database late: a network path that froze
///    and healed delivers everything it held back, long after the caller gave up
///    and closed the connection. An SQL backend maps `not_after` onto the server's
///    clock from an earlier reading, rounding toward earlier
///    ([`ServerClock`]), and each statement
///    compares its own clock reading with that bound. A call refused this way
///    returns a transient error ([`Error::Unavailable`](crate::Error::Unavailable)).
///    Once `not_after` has passed, the caller may rely on the call never taking
///    effect: [`LockManager`](crate::LockManager) releases the leases of abandoned
///    acquires, and lets a static token acquire again after a release whose
///    answer was lost, only after that instant. (A statement that read its clock
///    before the bound but whose commit is held up, say by a synchronous standby,
///    still commits; it holds the row's lock meanwhile, so a later call on the
///    key waits for it.)
/// 9. **Clock readings.** A granted [`try_acquire`](Self::try_acquire) and a
///    successful [`extend`](Self::extend) or [`extend_many`](Self::extend_many)
///    entry return the backend clock's reading at which the lease was granted or
///    renewed: the lease ends `ttl` after it. A backend without a clock of its
///    own (the in-memory one) returns a reading of a clock that advances with the
///    process's monotonic clock. [`LockManager`](crate::LockManager) compares how
///    far these readings move with how far its own clock moved, to notice a
///    server clock that steps.
/// 10. **Cancel safety.** A caller may drop the future of any call at any point
///     (a timeout, a `select!`, a cancelled task). The backend stays usable, and
///     the dropped call took effect entirely or not at all, never half (say, a
///     renewed expiry under a changed fence). It lets go of whatever it held — a
///     row lock, an open transaction, a connection in mid-statement — so that
///     once its `not_after` has passed, no later call on the key, by any token,
///     waits for it: a connection dropped mid-transaction is closed or rolled
///     back, never returned to a pool with the transaction open. A later call
///     with the same token sees a consistent state: what the dropped call would
///     have acquired, renewed or released is in its old state or in its new one.
///     A dropped mutating call may still take effect until its `not_after`,
///     never after it (item 8). [`LockManager`](crate::LockManager) runs each
///     try-acquire in a task of its own unless the backend
///     [settles dropped acquires](Self::settles_dropped_acquires) itself, and its
///     heartbeat and releases drop backend calls that outlive their call timeout.
/// 11. **Liveness.** A lease that is not extended ends `ttl` after the clock
///     reading at which it was last granted or renewed (item 9), and from then on
///     any token can acquire the key, as a new holding (item 2), once the
///     key's line (item 14) lets it — at most one [turn](crate::line::TURN)
///     per ticket ahead of it: a holder that
///     died, was partitioned or had its session killed keeps the key no longer
///     than its ttl, and nothing it left behind (an open transaction, a dead
///     connection's row lock) holds up the next holder beyond the backend's
///     configured timeouts. One exception keeps item 1 across a failover that
///     loses commits: such a backend may grant and extend nothing, for a bounded
///     and documented time after the failover, until every lease the old storage
///     may have granted has ended. The PostgreSQL backend does so for the table's
///     `max_ttl` (the longest ttl it allows) after a promotion; a try then
///     reports the quarantine's end as the holder's remaining lease, and an
///     extend fails with a transient error. A lease neither ends before its ttl (item 1) nor
///     outlives it, within the clock-rate allowance of item 4
///     ([`MAX_CLOCK_RATE_DIFFERENCE`](crate::server_clock::MAX_CLOCK_RATE_DIFFERENCE)).
/// 12. **A conservative client view.** A statement runs after its request was
///     sent and reads its own clock (items 4 and 9), so a lease granted or renewed
///     by a request sent at instant `s` of the caller's monotonic clock lasts at
///     least until `s + ttl` by that clock, less the clock-rate allowance.
///     [`LockManager`](crate::LockManager) gives a lock up at its local deadline,
///     `s + ttl − margin`, which is therefore never after the backend's expiry: a
///     guard that has not reported the lock lost is its only holder. The backend
///     keeps this true by ending or shortening a lease only by its expiry, its own
///     token's [`release`](Self::release), or its own token's renewal to a
///     shorter ttl. A refused acquire (item 5), another token's calls (item 3), a
///     dropped call (item 10) or a call past its `not_after` (item 8) never do,
///     and every [`extend`](Self::extend) or [`extend_many`](Self::extend_many)
///     entry that answers `Ok` has renewed its lease.
/// 13. **Faithful inspection.** [`inspect`](Self::inspect) and
///     [`list`](Self::list) report each row as the mutating calls left it, on the
///     backend's clock: the fence, owner and `acquired_at` (the grant's clock
///     reading) of the latest holding; `expires_at`, the reading of the last
///     grant or renewal plus its ttl (`None` once released); the state, `held`
///     exactly while the lease is live; and for a held lease the `remaining`
///     time, `expires_at` less the clock when read. `list` returns every row,
///     released and expired ones included, ordered by [`LockKey`]'s order (byte
///     for byte, case-sensitive).
/// 14. **Fair order** (a backend that keeps a line; the conformance suite's
///     harness declares it). Waiters on a key are served in the order of their
///     tickets ([`crate::line`]): a refused
///     [`try_acquire_as_waiter`](Self::try_acquire_as_waiter) without a valid
///     ticket gets the next one, and while the key is free, ticket `head + i`
///     alone may take it during the `i`-th [turn](crate::line::TURN) after the key became free (its release, or its lease's end), where
///     `head` is the first ticket not served when it became free. A try
///     without the served ticket — a plain [`try_acquire`](Self::try_acquire),
///     a newcomer, the holder that released and asks again — is refused while
///     a ticket's turn runs, with the turn's remaining time as `remaining`, so
///     a waiter that died or gave up holds the line up for one turn at most.
///     An unfair waiter ([`Place::fair`](crate::line::Place::fair) false) takes
///     a free key whenever it finds it free; a grant moves the line past the
///     grantee's ticket (and every ticket before it), so unfair grants leave
///     no turns behind. Fair order never overrides items 1
///     to 13: a line only ever refuses more, never grants more.
///
/// # Wrappers
///
/// A backend that wraps another (to count calls, add latency, inject faults)
/// must forward *every* method, the provided ones included: a wrapper that
/// forgets [`release_notifier`](Self::release_notifier) silently turns
/// notifications off, one that forgets
/// [`try_acquire_as_waiter`](Self::try_acquire_as_waiter) leaves waiters
/// unannounced to a backend that wakes only marked waiters, so they poll, and one
/// that forgets [`extend_many`](Self::extend_many)
/// turns one batched statement into one statement per lease. Put
/// `#[deny(clippy::missing_trait_methods)]` on the `impl` so that clippy catches
/// a forgotten one, as distrlock's own forwarding impls for `Arc<T>` and `Box<T>`
/// do. A wrapper that delays calls passes `not_after` through unchanged: the
/// deadline belongs to the caller.
///
/// Keys, tokens and ttls arrive validated ([`LockKey`], [`Token`], [`Ttl`]). The
/// owner text is at most [`MAX_OWNER_LEN`] bytes without NUL when it comes from
/// [`LockManager`](crate::LockManager); a backend checks a text from any other
/// caller with [`Owner::new`](crate::Owner::new) and returns its
/// [`Error::InvalidConfig`](crate::Error::InvalidConfig), changing nothing.
#[async_trait]
pub trait LockBackend: Send + Sync + fmt::Debug {
    /// Tries once to acquire `key` for `token` with a lease of `ttl`.
    ///
    /// Succeeds when the key has no row, its lease is released or expired, or it is
    /// live and held by this same `token` (then the fence stays the same). On success
    /// the lease runs until `ttl` after the backend's clock at the moment of
    /// acquisition. When another token holds a live lease, returns
    /// [`AcquireOutcome::Held`] and changes nothing. Changes nothing either if it
    /// would take effect after `not_after` (contract item 8).
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome>;

    /// [`try_acquire`](Self::try_acquire) by a caller that waits for the key if
    /// refused, at `place` in the key's line: [`LockManager`](crate::LockManager)'s
    /// waiting acquires call this for every try, and only they do.
    ///
    /// It answers as `try_acquire` does and has the same contract, and for a
    /// backend that keeps a line (contract item 14) it also hands out and
    /// honours tickets: a refused caller without a valid ticket gets one at
    /// the back of the line, and a caller whose ticket's turn has come takes
    /// the free key ahead of everyone else. Taking a ticket is the only write
    /// a refusal may make: it leaves the lease as it was (expiry, token,
    /// fence: contract item 12) and must not wait for a row lock another
    /// transaction holds (so it never holds up the holder's extend or release
    /// for longer than its own commit; a caller refused a ticket for that
    /// reason asks again at its next try). A backend whose releases announce
    /// themselves ([`release_notifier`](Self::release_notifier)) may announce
    /// only the releases of keys with someone in line.
    ///
    /// The default is `try_acquire`, with no line: waiters are then served in
    /// no particular order.
    async fn try_acquire_as_waiter(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        place: Place,
        not_after: Instant,
    ) -> Result<WaiterAnswer> {
        let _ = place;
        let outcome = self.try_acquire(key, token, ttl, owner, not_after).await?;
        Ok(WaiterAnswer {
            outcome,
            ticket: None,
        })
    }

    /// Renews the live lease of `token` on `key` to end `ttl` from now on the
    /// backend's clock.
    ///
    /// Returns the backend clock's reading at which the lease was renewed (it now
    /// ends `ttl` after it), or [`Error::NotHeld`](crate::Error::NotHeld) if
    /// `token` does not hold a live lease. Extending twice in a row (even within
    /// one clock tick) succeeds both times. Changes nothing if it would take
    /// effect after `not_after` (contract item 8).
    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime>;

    /// Renews many leases at once, each exactly as [`extend`](Self::extend) would,
    /// all to end `ttl` from now on the backend's clock.
    ///
    /// [`LockManager`](crate::LockManager) renews the leases of all its guards
    /// through this method, in batches of at most [`MAX_EXTEND_BATCH`], so that a
    /// process holding many locks sends few statements per heartbeat interval.
    ///
    /// Returns one result per entry of `leases`, in the same order: the backend
    /// clock's reading at which that lease was renewed, [`Error::NotHeld`](crate::Error::NotHeld) if its
    /// token does not hold a live lease on its key (nothing is changed for it). An
    /// entry may appear twice; both positions get the same answer. An `Err` of
    /// the whole call (the database could not be reached, the statement failed)
    /// means nothing is known about any entry: each lease may or may not have been
    /// renewed.
    ///
    /// Nothing is changed for any entry after `not_after` (contract item 8).
    ///
    /// The default calls [`extend`](Self::extend) once per entry, one after the
    /// other; a backend that can renew a batch in one statement or transaction
    /// should override it.
    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        let mut results = Vec::with_capacity(leases.len());
        for (key, token) in leases {
            results.push(self.extend(key, token, ttl, not_after).await);
        }
        Ok(results)
    }

    /// Ends the live lease of `token` on `key` at once, keeping the row (and so
    /// the fence) for the next holder.
    ///
    /// Returns [`Error::NotHeld`](crate::Error::NotHeld) if `token` does not hold a
    /// live lease, including on a second release. Changes nothing if it would
    /// take effect after `not_after` (contract item 8), so a release whose answer
    /// was lost cannot end a later holding of the same token.
    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()>;

    /// The state of one key, or `None` if it was never acquired.
    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>>;

    /// The state of every key, ordered by key.
    async fn list(&self) -> Result<Vec<LockInfo>>;

    /// Creates the lock table if it does not exist. Safe to call concurrently and
    /// repeatedly.
    async fn create_table(&self) -> Result<()>;

    /// The DDL that [`create_table`](Self::create_table) runs, for users who manage
    /// their schema with their own migration tool.
    fn schema_sql(&self) -> String;

    /// Whether a [`try_acquire`](Self::try_acquire) (or
    /// [`try_acquire_as_waiter`](Self::try_acquire_as_waiter)) whose future is
    /// dropped settles by itself (what it sent still ends, committed or
    /// failed, and nothing more is sent), and this backend's
    /// [`release`](Self::release) of the same token, called after the drop,
    /// takes effect only after that: a backend that marks the connection of a
    /// dropped acquire in flight until the server has answered it, and has
    /// releases wait for the mark (PostgreSQL), or one that runs every call in
    /// order on one thread (SQLite).
    ///
    /// [`LockManager`](crate::LockManager) then calls `try_acquire` directly,
    /// with no task of its own, and releases the lease of an acquire whose
    /// caller gave up at once. With the default, `false`, it runs each try in a
    /// task of its own and releases only after that task ends or the try's
    /// `not_after` passes. A wrapper that delays or drops calls must keep the
    /// default unless it keeps the promise itself.
    fn settles_dropped_acquires(&self) -> bool {
        false
    }

    /// The backend's release notifications, if it has them.
    ///
    /// Waiters subscribe before each try and wake as soon as a release of their key
    /// is announced, instead of sleeping out their backoff. A notification is only a
    /// hint: waiters still poll, so a lost notification costs latency, never
    /// correctness. The default is `None`.
    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        None
    }
}

/// The most leases [`LockManager`](crate::LockManager) passes to one
/// [`LockBackend::extend_many`] call.
pub const MAX_EXTEND_BATCH: usize = 1000;

/// The longest owner text, in bytes, that [`LockManager`](crate::LockManager) passes
/// to a backend.
pub const MAX_OWNER_LEN: usize = 255;

/// What a single [`LockBackend::try_acquire`] achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcquireOutcome {
    /// The token now holds the lease.
    Acquired {
        /// The fence of this holding.
        fence: Fence,
        /// The backend clock's reading at which the lease was granted: it ends
        /// `ttl` after this.
        server_time: SystemTime,
    },
    /// Another token holds a live lease; nothing was changed.
    Held {
        /// How long that lease has left on the backend's clock, if known.
        remaining: Option<Duration>,
    },
}

/// The state of a key's lease, as [`LockBackend::inspect`] and
/// [`LockBackend::list`] report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockState {
    /// A live lease holds the key.
    Held,
    /// The last lease ran out without being released.
    Expired,
    /// The last lease was released.
    Released,
}

impl LockState {
    /// The lowercase name used in the CLI and in JSON: `held`, `expired`, `released`.
    pub fn as_str(self) -> &'static str {
        match self {
            LockState::Held => "held",
            LockState::Expired => "expired",
            LockState::Released => "released",
        }
    }
}

impl fmt::Display for LockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One key's row, as seen by the backend at one instant of its clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockInfo {
    /// The key.
    pub key: LockKey,
    /// The owner text of the latest holding.
    pub owner: String,
    /// The fence of the latest holding.
    pub fence: Fence,
    /// When the latest holding was acquired, on the backend's clock.
    pub acquired_at: SystemTime,
    /// When its lease ends or ended, on the backend's clock; `None` once released.
    pub expires_at: Option<SystemTime>,
    /// Held, expired or released.
    pub state: LockState,
    /// For a held lock, how long its lease has left on the backend's clock.
    pub remaining: Option<Duration>,
}

impl LockInfo {
    /// Whether a live lease holds the key.
    pub fn is_live(&self) -> bool {
        self.state == LockState::Held
    }
}

macro_rules! forward_backend {
    ($($ty:ty),*) => {$(
        #[async_trait]
        #[deny(clippy::missing_trait_methods)]
        impl<T: LockBackend + ?Sized> LockBackend for $ty {
            async fn try_acquire(
                &self,
                key: &LockKey,
                token: &Token,
                ttl: Ttl,
                owner: &str,
                not_after: Instant,
            ) -> Result<AcquireOutcome> {
                (**self).try_acquire(key, token, ttl, owner, not_after).await
            }
            async fn try_acquire_as_waiter(
                &self,
                key: &LockKey,
                token: &Token,
                ttl: Ttl,
                owner: &str,
                place: Place,
                not_after: Instant,
            ) -> Result<WaiterAnswer> {
                (**self)
                    .try_acquire_as_waiter(key, token, ttl, owner, place, not_after)
                    .await
            }
            async fn extend(
                &self,
                key: &LockKey,
                token: &Token,
                ttl: Ttl,
                not_after: Instant,
            ) -> Result<SystemTime> {
                (**self).extend(key, token, ttl, not_after).await
            }
            async fn extend_many(
                &self,
                leases: &[(LockKey, Token)],
                ttl: Ttl,
                not_after: Instant,
            ) -> Result<Vec<Result<SystemTime>>> {
                (**self).extend_many(leases, ttl, not_after).await
            }
            async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
                (**self).release(key, token, not_after).await
            }
            async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
                (**self).inspect(key).await
            }
            async fn list(&self) -> Result<Vec<LockInfo>> {
                (**self).list().await
            }
            async fn create_table(&self) -> Result<()> {
                (**self).create_table().await
            }
            fn schema_sql(&self) -> String {
                (**self).schema_sql()
            }
            fn settles_dropped_acquires(&self) -> bool {
                (**self).settles_dropped_acquires()
            }
            fn release_notifier(&self) -> Option<&ReleaseNotifier> {
                (**self).release_notifier()
            }
        }
    )*};
}

forward_backend!(Arc<T>, Box<T>);
