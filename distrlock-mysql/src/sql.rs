//! Every SQL statement of the MySQL/MariaDB backend, each with why its clauses are
//! there, and the decoding of the answers they encode.
//!
//! One text serves MySQL 5.7, MySQL 8.x and MariaDB ≥ 10.5: no `RETURNING`, no
//! `INSERT … AS alias`, no `VALUES()` in `ON DUPLICATE KEY UPDATE` (deprecated in
//! MySQL 8.0.20; parameters are bound twice instead), no CTEs, no `SKIP LOCKED`
//! or `NOWAIT` (MariaDB 10.5 and MySQL 5.7 lack them); the MariaDB-only
//! clauses (statement timeout, per-statement lock waits, Galera's causality
//! wait) sit in `/*M! … */` comments that MySQL skips.
//!
//! # Galera: several clocks, causal reads
//!
//! On a MariaDB Galera cluster every node runs these statements on its own
//! clock and its own copy of the table. Two clauses are there for that:
//!
//! - the session setup's `wsrep_sync_wait = 7` ([`session_setup`]): every
//!   statement first waits until its node has applied what the cluster had
//!   committed, so no node answers from a stale copy (the clock read
//!   [`CLOCK`] alone skips it);
//! - the acquire's takeover test ([`acquire`]): a lease counts as expired for
//!   another token only `max_clock_skew` after its end, so a node whose clock
//!   runs ahead of the one that wrote the lease cannot hand it over early.
//!
//! Row values (`UTC_TIMESTAMP(6)` included) replicate as the writing node
//! computed them: Galera replicates rows, never statements.
//!
//! # Time
//!
//! Every instant is `UTC_TIMESTAMP(6)`: the server's clock, in UTC whatever the
//! session `time_zone`, fixed for the duration of one statement (so every use
//! within a statement sees the same instant: the statement's *clock reading*).
//! Columns are `DATETIME(6)`, which stores what it is given without any time-zone
//! conversion (unlike `TIMESTAMP`). Instants are read back as microseconds since
//! 1970 with `TIMESTAMPDIFF`, which is plain calendar arithmetic, never
//! `UNIX_TIMESTAMP(datetime)`, which would read the value in the session time
//! zone (and is ambiguous in a DST fold).
//!
//! # A pinned session clock
//!
//! `UTC_TIMESTAMP(6)` (like `NOW()`) reads the session's `@@timestamp`, which
//! `SET @@timestamp = …` pins to any instant (and the replication applier pins to
//! the primary's). A lease computed on a pinned clock ends at the wrong time: an
//! hour in the past, an acquire reports a lease that has already run out for
//! everyone else; an hour in the future, it takes over live leases. `SYSDATE(6)`
//! is the one clock a session cannot pin: it reads the system clock whenever it
//! is evaluated. So acquire, extend and release run only when [`real_clock`]
//! holds: the statement's clock is not ahead of `SYSDATE(6)` and trails it by at
//! most the backend's clock tolerance
//! ([`MySqlConfig::clock_tolerance`](crate::MySqlConfig::clock_tolerance)).
//!
//! An exact test is impossible within one statement: unpinned, `@@timestamp` is
//! the instant the statement *started*, and `SYSDATE(6)` is read after the
//! statement's waits for the table's metadata lock and for the row lock, each
//! up to the session's lock-wait bound. The tolerance covers those waits, so an
//! unpinned clock always passes. The price: a clock pinned less than the
//! tolerance in the past is not detected, and can make a lease end up to the
//! tolerance earlier than its holder counts on.
//!
//! The two readings are compared as local times in the session's time zone,
//! with `TIMESTAMPDIFF` (calendar arithmetic, like every other instant here),
//! never with `UNIX_TIMESTAMP(SYSDATE())`: in a DST fold that conversion picks
//! one of two instants an hour apart, and would refuse sound sessions (or pass
//! pinned ones) for that hour. Local readings are off only when a DST change
//! falls between the two, within one statement of an unpinned session.
//!
//! Limits: a server started with `--sysdate-is-now` makes `SYSDATE()` an alias
//! of `NOW()`, and then a pinned clock cannot be detected. `SYSDATE()` makes the
//! statements unsafe for statement-based replication: with `binlog_format =
//! STATEMENT` a replica would evaluate the guard again on its own clock, so use
//! `ROW` or `MIXED` (the defaults), which log these statements as rows.
//!
//! # No late effects: the bound
//!
//! A statement can reach the server long after it was sent (a network path that
//! froze and healed delivers it, and the FIN of the socket the client closed,
//! and the server runs and commits it). The caller's `not_after` is therefore
//! mapped onto the server's clock from an earlier reading
//! ([`ServerClock::bound_micros`](distrlock_core::server_clock::ServerClock::bound_micros),
//! rounded toward earlier), and every write takes that *bound* (µs since 1970)
//! as a parameter and changes nothing when [`SYS_US`] has passed it: the
//! statement's clock reading plus the time it has spent in the server so far
//! (`SYSDATE(6) − NOW(6)`, which the pinned-clock guard keeps within the
//! tolerance), so a statement that waited for a lock is judged by when it
//! writes, not by when it started. The updates evaluate it in their `WHERE`,
//! after the row lock is granted; the acquire once before it looks for the row
//! and once more in its `ON DUPLICATE KEY UPDATE`, after the row lock.
//!
//! One gap is left, documented on the backend: an acquire of a key *without a
//! row* that waits for another transaction's lock on that key (an uncommitted
//! insert of the same key that is then rolled back, or a gap lock) inserts
//! with the values it computed before the wait, so it can land up to the
//! session's row-lock bound after its check.
//!
//! The first statement of a backend needs an earlier reading: nothing comes for
//! free at connection setup (the handshake carries no clock, and `mysql_async`
//! drops the results of setup statements), so the backend reads the clock once
//! with [`CLOCK`] before its first write. After that every answer of a write
//! carries the statement's reading (below) and keeps the estimate fresh.
//!
//! # How a statement reports its outcome: the OK packet's insert id
//!
//! A write's OK packet carries an "insert id". When a statement calls
//! `LAST_INSERT_ID(expr)` (and the table has no `AUTO_INCREMENT` column, as ours),
//! the server reports the argument of the *last* such call in that statement, and
//! 0 when the statement never called it; `LAST_INSERT_ID()` without an argument,
//! later in the same statement, returns that argument too. Every write below
//! calls it on exactly the paths that matter, so the insert id alone says what
//! happened, and when.
//!
//! The affected-rows count cannot serve: it counts *changed* rows (so an extend or
//! a same-token re-acquire landing on the same expiry within one clock tick would
//! look like a failure), and with the `CLIENT_FOUND_ROWS` connection flag a refused
//! `ON DUPLICATE KEY UPDATE` reports 1, just like a fresh insert. The insert id is
//! the same with and without that flag, so this backend works on pools and
//! connections with either setting. The affected-rows count is still checked
//! against the insert id as a consistency check.
//!
//! The insert id is one 64-bit number (read as signed), and the acquire must fit
//! three things into it: the outcome, the fence and the statement's clock
//! reading (µs since 1970, 51 bits today). A fence and a full reading do not fit
//! together, so the reading travels as an offset from a *reference* the client
//! sends: 4.2 s ([`EARLY_US`]) before its own estimate of the server's clock
//! when it sent the statement (`bound_micros(now)`, itself a little early). The
//! statement runs only if its reading lies in `[reference, reference + 2^24
//! µs)`, from 4.2 s before the estimate to 12.6 s after it, so the offset takes
//! 24 bits and the fence the other 39 (fences up to 549,755,813,887: a key
//! acquired 1,000 times a second lasts 17 years; beyond that the acquire
//! refuses with a permanent error instead of handing out a fence it cannot
//! report). A reading outside the window means the estimate was off (the
//! server's clock stepped, or the backend was idle for hours and its estimate's
//! rate allowance grew): the statement refuses like a late one, reporting its
//! full reading, and the backend retries once with the new estimate.
//!
//! | statement | insert id | meaning |
//! |---|---|---|
//! | acquire | `fence · 2^24 + (reading − reference)` (≥ 2^24) | acquired (inserted, taken over, or renewed by the same token) |
//! | extend, release, batch extend | `reading` (> 0) | the token's live lease (at least one, for the batch) was extended / released |
//! | extend, release, batch extend | 0 | no live lease of the token: nothing changed |
//! | all writes | `−1 − (4 · payload + tag)` (< 0) | refused, nothing changed; `tag` below |
//!
//! | tag | payload | refusal |
//! |---|---|---|
//! | 0 | `(min(remaining ms, 2^26 − 1) · 2^10 + line) · 2^24 + (reading − reference)` | acquire only: another token holds a live lease, or the key is free in another waiter's turn; `line` is the caller's place in the key's line ([`LINE_BITS`]) |
//! | 1 | `reading` | the bound had passed, or the reading is outside the window: late, or the estimate was off |
//! | 2 | `reading` (of the pinned clock) | the session's clock is pinned |
//! | 3 | `reading` | acquire only: the next fence would not fit |
//!
//! Other designs considered:
//!
//! - *Two statements in one round trip* (`INSERT …; SELECT …` as a multi-statement
//!   text query, which `mysql_async` supports): it gives up prepared statements
//!   (every call parsed again, its parameters spliced into the text), a result
//!   set per call, and two statements per call in the server's counters, and the
//!   `SELECT` could only read user variables that the `INSERT` set with `@v :=`
//!   assignments in expressions, which MySQL 8.0 deprecates.
//! - *The OK packet's session-state tracking*: it reports system variables,
//!   which a statement cannot set, and user variables not at all.
//! - *`expires_at − ttl` read back*: needs a second round trip.
//! - *`RETURNING`*: MariaDB only, and not for `UPDATE` before 11.x.
//!
//! The price of the chosen design is the fence limit above, parameters bound
//! several times, and one extra round trip after a clock step or a long idle
//! period.
//!
//! `LAST_INSERT_ID(expr)` also sets the session's `LAST_INSERT_ID()` value; see the
//! notes on [`MySqlBackend::try_acquire_in`](crate::MySqlBackend::try_acquire_in).
//!
//! # Batch renewal
//!
//! [`extend_many`] renews up to 1,024 leases in one `UPDATE`, whose insert id
//! gives the reading and whose affected-rows count shows whether every lease was
//! renewed. When some were not (or a renewed expiry did not change within one
//! clock tick), one [`verify`] `SELECT` reads the batch's rows back, and
//! [`verdict`] tells per lease: renewed exactly when its row shows its token and
//! the batch's own expiry, `reading + ttl`. So every batch has per-lease answers
//! in at most two round trips.
//!
//! A row that another transaction has locked makes the whole `UPDATE` wait and
//! fail with error 1205; nothing is renewed. On MariaDB the first batch does
//! not wait at all ([`NO_WAIT`], `SET STATEMENT innodb_lock_wait_timeout = 0
//! FOR`) unless the ttl is at least [`FIRST_BATCH_WAIT_MIN_TTL`] (then it waits
//! at most one second, which rides out a competitor's brief lock on one of the
//! rows): a manager renews every third of its ttl and counts its deadline from
//! the call's start, so with a 2 s ttl a renewal that first waits a second ends
//! after the previous deadline, and every guard of the batch is lost (measured:
//! all 7 others around one locked row). The backend then renews the batch in
//! quarters, each without waiting, and splits again only the quarters that hit
//! a lock, so one locked row among
//! 1,000 costs about 20 statements and ends as a transient error of that one
//! lease. MySQL has no per-statement bound below one second (`SKIP LOCKED` and
//! `NOWAIT` exist only for locking reads, and only from 8.0): there each quarter
//! that hits a lock waits the session's bound, so the splitting takes about a
//! second per level, and the leases the caller's `not_after` leaves unresolved
//! get a transient error.

use std::time::Duration;

use distrlock_core::server_clock::from_unix_micros;
use distrlock_core::{
    Error, Fence, LockInfo, LockKey, LockState, Owner, Place, Result, TableName, Token, Ttl,
};
use mysql_async::{Row, Value};

/// The server clock's reading, in µs since 1970, by calendar arithmetic on
/// `UTC_TIMESTAMP(6)` (the statement's clock, the same all through a statement).
pub(crate) const UTC_US: &str =
    "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";

/// [`UTC_US`] plus the time the statement has spent in the server so far
/// (`SYSDATE(6)`, read at evaluation, minus `NOW(6)`, the statement's start):
/// the instant a write compares with its bound. Both are local times of the
/// session, subtracted as calendar values (see "A pinned session clock").
pub(crate) const SYS_US: &str = "(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) \
     + TIMESTAMPDIFF(MICROSECOND, NOW(6), SYSDATE(6)))";

/// Reads the server's clock, for the first reading of a backend.
///
/// Without Galera's causality wait (`wsrep_sync_wait = 0` for this statement,
/// MariaDB only): a clock needs no replicated state, and on a node outside the
/// primary component a causal read of no table fails with error 1205, which a
/// try-acquire would take for a row lock ("busy"), where the statements on the
/// table fail with the transient 1047 that says what is wrong.
pub(crate) const CLOCK: &str = "/*M! SET STATEMENT wsrep_sync_wait = 0 FOR */ \
    SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6))";

/// How many low bits of a grant's (or refusal's) insert id carry the reading's
/// offset from the reference: the window is `2^24` µs, 16.8 s.
pub(crate) const OFFSET_BITS: u32 = 24;

/// The width of the window in µs.
pub(crate) const WINDOW_US: i64 = 1 << OFFSET_BITS;

/// The largest fence a grant can report: `2^39 − 1`.
pub(crate) const MAX_FENCE: i64 = (1 << (63 - OFFSET_BITS)) - 1;

/// How many bits of a held refusal's payload, above the offset, carry the
/// caller's place in the key's line: 0 when its ticket is not in the line (or
/// it brought none), else `LINE_IN | min(ahead, LINE_MAX_AHEAD)`.
pub(crate) const LINE_BITS: u32 = 10;

/// The line field's flag: the ticket the caller brought is in the line.
pub(crate) const LINE_IN: i64 = 1 << (LINE_BITS - 1);

/// The most tickets ahead a refusal reports; more are reported as this.
pub(crate) const LINE_MAX_AHEAD: i64 = LINE_IN - 1;

/// The largest remaining lease (or turn) a refusal reports, in milliseconds
/// (18.6 hours); longer ones are reported as this.
pub(crate) const MAX_REMAINING_MS: i64 = (1 << 26) - 1;

/// One turn of the line of waiters, in µs ([`distrlock_core::line::TURN`]).
pub(crate) const TURN_US: i64 = distrlock_core::line::TURN.as_micros() as i64;

/// Refusal tags (see the table in the module docs).
const TAG_HELD: i64 = 0;
const TAG_CLOCK: i64 = 1;
const TAG_PINNED: i64 = 2;
const TAG_FENCE_EXHAUSTED: i64 = 3;

/// The insert id `−1 − (4 · payload + tag)` of a refusal whose payload is
/// [`UTC_US`], as SQL; `row` is `" + 0 * fence"` in an `UPDATE`'s `WHERE`, so
/// that the argument depends on the row and is never evaluated ahead of it.
fn refusal(tag: i64, row: &str) -> String {
    format!("-1 - {tag} - 4 * {UTC_US}{row}")
}

/// `IF(LAST_INSERT_ID(code), value, value)`: reports `code` in the insert id and
/// yields `value`. `IF(x, v, v)` evaluates `x` only for that side effect.
fn report(code: &str, value: &str) -> String {
    format!("IF(LAST_INSERT_ID({code}), {value}, {value})")
}

/// Whether the statement has granted so far: the last `LAST_INSERT_ID(expr)` of
/// this statement, read back, is not a refusal. `LAST_INSERT_ID()` is
/// unsigned, so a refusal (negative as a signed number) has its top bit set.
const GRANTED: &str = "LAST_INSERT_ID() >> 63 = 0";

/// How long before the client's estimate of the server's clock a statement's
/// reading may lie and still be reported: `2^22` µs, 4.2 s (a quarter of the
/// window). Readings are never earlier than the estimate unless the server's
/// clock went back, or the session's clock is pinned within the tolerance.
pub(crate) const EARLY_US: i64 = 1 << 22;

/// The clock parameters of one execution of a write, computed by the backend
/// for each attempt (see "No late effects" and "How a statement reports").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The origin of the reported offsets: [`EARLY_US`] before the client's
    /// estimate of the server's clock when it sent the statement.
    pub(crate) reference: i64,
    /// The last server-clock instant (µs since 1970) at which the write may take
    /// effect.
    pub(crate) bound: i64,
}

impl Stamp {
    /// The stamp of a write sent when the server's clock read at least
    /// `estimate` (µs since 1970), that may take effect until `bound`; with
    /// `window` (the acquire), no later than the offsets can report.
    pub(crate) fn new(estimate: i64, bound: i64, window: bool) -> Self {
        let reference = estimate.saturating_sub(EARLY_US);
        let bound = if window {
            bound.min(reference.saturating_add(WINDOW_US - 1))
        } else {
            bound
        };
        Self { reference, bound }
    }
}

/// The statements for one table, built once from its validated, backquoted name.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    pub(crate) table: String,
    pub(crate) create_table: String,
    pub(crate) acquire: String,
    pub(crate) extend: String,
    pub(crate) release: String,
    pub(crate) take_ticket: String,
    /// The line's columns and the ALTERs that add them to an older table.
    pub(crate) line_columns: Vec<(&'static str, String)>,
    pub(crate) inspect: String,
    pub(crate) list: String,
    /// The clock guard, for the batch extends built per batch size.
    pub(crate) real_clock: String,
}

impl Statements {
    /// The statements for `table`, refusing sessions whose clock is off the
    /// real one by more than `clock_tolerance` (see "A pinned session clock").
    pub(crate) fn new(
        table: &TableName,
        clock_tolerance: Duration,
        max_clock_skew: Duration,
    ) -> Self {
        // Safe to splice: TableName admits only [A-Za-z0-9_] parts, and each part
        // is backquoted, so the name can neither break out nor hit a keyword.
        let t = table.quoted('`');
        let real = real_clock(clock_tolerance);
        Self {
            create_table: create_table(&t),
            acquire: acquire(&t, &real, max_clock_skew),
            extend: extend(&t, &real),
            release: release(&t, &real),
            take_ticket: take_ticket(&t),
            line_columns: line_columns(&t),
            inspect: format!("{SELECT_INFO} FROM {t} WHERE lock_key = ?"),
            list: format!("{SELECT_INFO} FROM {t} ORDER BY lock_key"),
            real_clock: real,
            table: t,
        }
    }

    /// Where a connection keeps `sql` prepared ([`crate::parked`]), if it is
    /// one of this backend's fixed statements: found by the text's address,
    /// which only these strings (alive as long as the backend) can have, so no
    /// other text is ever taken for one of them.
    pub(crate) fn kept(&self, sql: &str) -> Option<usize> {
        let fixed: [&str; crate::parked::KEPT] = [
            &self.acquire,
            &self.release,
            &self.extend,
            &self.take_ticket,
            &self.inspect,
            &self.list,
        ];
        fixed.iter().position(|text| std::ptr::eq(*text, sql))
    }
}

/// The SQL texts of one table's lock statements, exactly as the backend sends
/// them, for tools that issue them without the backend (the benchmark's
/// raw-driver baseline). Not a stable API. Each reports through the OK
/// packet's insert id (see the module docs): a grant is positive, a refusal
/// negative, and a release that found nothing 0.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct LockSql {
    /// Try-acquire; build its parameters with [`acquire_params`](Self::acquire_params).
    pub acquire: String,
    /// Extend; parameters: ttl µs, key, token, bound.
    pub extend: String,
    /// Release; build its parameters with [`release_params`](Self::release_params).
    pub release: String,
    /// Reads the server clock (µs since 1970), for the parameter builders.
    pub clock: String,
    /// The DDL of the table.
    pub create_table: String,
}

impl LockSql {
    /// The statements for `table`, with the clock tolerance of the default
    /// [`MySqlConfig`](crate::MySqlConfig).
    pub fn for_table(table: &TableName) -> Self {
        let s = Statements::new(
            table,
            crate::MySqlConfig::default().clock_tolerance(),
            Duration::ZERO,
        );
        Self {
            acquire: s.acquire,
            extend: s.extend,
            release: s.release,
            clock: CLOCK.to_owned(),
            create_table: s.create_table,
        }
    }

    /// The parameters of [`acquire`](Self::acquire): `reading` is a reading of
    /// [`clock`](Self::clock) (µs since 1970) taken before, and the statement
    /// may take effect until 12 s after it.
    pub fn acquire_params(
        key: &[u8],
        token: &[u8],
        owner: &str,
        ttl_us: i64,
        reading: i64,
    ) -> Vec<Value> {
        acquire_params(
            Value::from(key),
            Value::from(token),
            Value::from(owner),
            Value::from(ttl_us),
            // A plain try: no ticket, fair.
            Value::NULL,
            Value::from(0),
            Stamp::new(reading, i64::MAX, true),
        )
    }

    /// The parameters of [`release`](Self::release), which may take effect
    /// until 12 s after `reading` (of [`clock`](Self::clock), taken before).
    pub fn release_params(key: &[u8], token: &[u8], reading: i64) -> Vec<Value> {
        let window = Stamp::new(reading, i64::MAX, true);
        release_params(Value::from(key), Value::from(token), window)
    }
}

/// The condition that the session's clock is the server's real clock, within
/// `tolerance` (see "A pinned session clock" in the module docs).
///
/// - `NOW(6)` is the statement's clock (`@@timestamp`, pinned or not) and
///   `SYSDATE(6)` the system clock at the moment of evaluation, both in the
///   session's time zone; `TIMESTAMPDIFF` subtracts them as calendar values.
/// - `BETWEEN 0 AND …`: an unpinned clock never runs ahead of the real one
///   (both read the same system clock, `SYSDATE` later), and trails it by the
///   time the statement has spent in the server so far.
/// - The tolerance is spliced as an integer literal (microseconds) so that the
///   parameters of every statement stay as documented.
pub(crate) fn real_clock(tolerance: Duration) -> String {
    format!(
        "TIMESTAMPDIFF(MICROSECOND, NOW(6), SYSDATE(6)) BETWEEN 0 AND {}",
        tolerance.as_micros()
    )
}

/// The condition an `UPDATE` (extend, release, batch extend) puts last in its
/// `WHERE`, after the key and token tests, evaluated on each candidate row once
/// InnoDB has granted its lock:
///
/// - `IF(<real clock>, …, <report pinned>)`: on a pinned session clock the row
///   matches nothing and the insert id is a refusal of tag 2. It comes after the
///   token test, so another token's lease is "not held" whatever the clock, and
///   before the expiry test, which would read the pinned clock.
/// - `expires_at > UTC_TIMESTAMP(6)`: only a live lease (a released lease has
///   NULL and never matches); a lease that is not live is "not held" (insert id
///   0), late or not.
/// - `SYS_US <= ?` (the bound): otherwise the row matches nothing and the insert
///   id is a refusal of tag 1 carrying the reading.
/// - Each report's argument depends on the row (`+ 0 * fence`), so the optimizer
///   never evaluates it as a constant ahead of the rows.
fn live_in_time(real_clock: &str) -> String {
    let late = report(&refusal(TAG_CLOCK, " + 0 * fence"), "FALSE");
    let pinned = report(&refusal(TAG_PINNED, " + 0 * fence"), "FALSE");
    format!(
        "IF({real_clock}, \
            IF(expires_at > UTC_TIMESTAMP(6), IF({SYS_US} <= ?, TRUE, {late}), FALSE), \
            {pinned})"
    )
}

/// What a matched row of an `UPDATE` assigns first: reports the statement's
/// reading in the insert id and keeps the fence. A row whose new expiry equals
/// the old one (two extends within one clock tick) is "unchanged", but the
/// assignment is still evaluated, so it still reports.
fn report_reading() -> String {
    format!(
        "fence = {}",
        report(&format!("{UTC_US} + 0 * fence"), "fence")
    )
}

/// The lock table.
///
/// - `lock_key VARBINARY(255)`: keys compare byte for byte. A `utf8mb4_bin`
///   column would still be case-sensitive, but it is a PAD SPACE collation on
///   MySQL 5.7 and MariaDB, where `'a' = 'a '` and the two keys would collide.
///   `utf8mb4_nopad_bin` exists only on MariaDB and `utf8mb4_0900_bin` only on
///   MySQL 8, so binary bytes are the one exact choice for every server. Keys are
///   at most 255 bytes of UTF-8 ([`LockKey::MAX_LEN`](distrlock_core::LockKey::MAX_LEN)),
///   which also keeps the primary key far below InnoDB's index-prefix limits.
/// - `token BINARY(16)`: the holding's UUID, as its 16 bytes.
/// - `fence BIGINT`: grows by one at every change of holder; rows are never
///   deleted by this backend, so it grows for the life of the table. No
///   `AUTO_INCREMENT` anywhere: it would take over the OK packet's insert id.
/// - `owner VARCHAR(255)` in `utf8mb4` (at most 255 bytes are ever written).
/// - `acquired_at`, `expires_at DATETIME(6)`: server UTC instants with
///   microseconds; `expires_at` is NULL once released.
/// - `released_at`, `line_next`, `line_head`: the line of waiters (tickets
///   below `line_next` were handed out; `line_head` is the first one not yet
///   served when the key last became free, at `released_at` or at its lease's
///   end). [`line_columns`] adds them to a table made before them.
/// - InnoDB for row locks and crash safety; `utf8mb4_bin` as the table default so
///   that `owner` holds any Unicode text and compares exactly.
fn create_table(t: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (\n\
        \x20   lock_key    VARBINARY(255) NOT NULL,\n\
        \x20   token       BINARY(16)     NOT NULL,\n\
        \x20   fence       BIGINT         NOT NULL,\n\
        \x20   owner       VARCHAR(255)   NOT NULL,\n\
        \x20   acquired_at DATETIME(6)    NOT NULL,\n\
        \x20   expires_at  DATETIME(6)    NULL,\n\
        \x20   released_at DATETIME(6)    NULL,\n\
        \x20   line_next   BIGINT         NOT NULL DEFAULT 0,\n\
        \x20   line_head   BIGINT         NOT NULL DEFAULT 0,\n\
        \x20   PRIMARY KEY (lock_key)\n\
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin \
        COMMENT='distrlock leases: one row per key, kept after release so fences never go back'"
    )
}

/// The line's columns, each with the `ALTER TABLE` that adds it to a table
/// made by an earlier version (`create_table` runs those whose column is
/// missing; MySQL has no `ADD COLUMN IF NOT EXISTS`).
pub(crate) fn line_columns(t: &str) -> Vec<(&'static str, String)> {
    [
        ("released_at", "DATETIME(6) NULL"),
        ("line_next", "BIGINT NOT NULL DEFAULT 0"),
        ("line_head", "BIGINT NOT NULL DEFAULT 0"),
    ]
    .into_iter()
    .map(|(name, ty)| (name, format!("ALTER TABLE {t} ADD COLUMN {name} {ty}")))
    .collect()
}

/// The names of a table's columns: params the table's schema (NULL for the
/// connection's database) and name.
pub(crate) const COLUMNS: &str = "SELECT column_name FROM information_schema.columns \
    WHERE table_schema = COALESCE(?, DATABASE()) AND table_name = ?";

/// The ticket served now on the row of an `ON DUPLICATE KEY UPDATE`
/// ([`distrlock_core::line::serving`]): while the lease is not yet open to
/// another token (live, or ended less than `max_clock_skew` ago), the line's
/// head; after that one more per whole turn since the key became free (its
/// release, or its lease's end plus the skew). A row released before the line
/// existed has neither instant: its line is empty (`line_next`).
fn serving(skew_us: u128) -> String {
    format!(
        "IF(expires_at > UTC_TIMESTAMP(6) - INTERVAL {skew_us} MICROSECOND, line_head, \
            COALESCE(line_head + GREATEST(0, {UTC_US} - {free_us}) DIV {TURN_US}, line_next))",
        free_us = free_us(skew_us),
    )
}

/// When the key became free, µs since 1970 (NULL for a row released before
/// the line existed).
fn free_us(skew_us: u128) -> String {
    format!(
        "TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', \
            COALESCE(expires_at + INTERVAL {skew_us} MICROSECOND, released_at))"
    )
}

/// Acquire: insert the key, or take over a released or expired lease, or renew
/// this token's own live lease; otherwise change nothing and report the holder's
/// remaining lease. One statement, one round trip. Build the parameters with
/// [`acquire_params`].
///
/// - `INSERT … SELECT … FROM DUAL WHERE …`: the `SELECT` yields the new row only
///   when the `WHERE` passes; otherwise nothing is inserted, no row is looked
///   for or locked, and the `WHERE` has reported why:
///   - `IF(<real clock>, …, <report pinned>)`: the session's clock is pinned
///     (tag 2).
///   - `UTC_US >= ? AND SYS_US <= ?` (reference, bound): the reading is within
///     the window and the bound has not passed; otherwise tag 1, with the
///     reading. The client makes the bound at most `reference + 2^24 − 1`, so a
///     statement that passes has an offset that fits 24 bits.
/// - The new row (a key never acquired): fence 1, reported as `2^24 + offset`
///   (`IF(LAST_INSERT_ID(…), 1, 1)` yields 1 and reports the grant). On a
///   duplicate key the `UPDATE` below always calls `LAST_INSERT_ID` again, and
///   the last call is the one reported.
/// - `ON DUPLICATE KEY UPDATE` takes the existing row under an exclusive row lock,
///   so concurrent acquires of one key are serialised and each sees the previous
///   one's result (exactly one of racing tokens wins).
/// - The assignments run left to right. The first, `fence`, decides and reports
///   the outcome, reading only the old row (and every report's argument depends
///   on the row, `+ 0 * fence` where nothing else does, so that none is
///   evaluated ahead of it); the others read that decision back
///   with `LAST_INSERT_ID()` ([`GRANTED`]), and each reads no column assigned
///   before it, so MariaDB's `SIMULTANEOUS_ASSIGNMENT` SQL mode (every
///   assignment sees the old row) gives the same result.
///   1. `fence`: `SYS_US > ?` (the bound, read again now that the row lock is
///      granted, after any wait for it): late, keep everything (tag 1). Else,
///      live and ours: keep the fence and report it (a renewal). Else, not yet
///      *taken over* — `expires_at` later than `max_clock_skew` ago (spliced
///      as an integer literal of µs, 0 by default; see
///      [`MySqlConfig::max_clock_skew`](crate::MySqlConfig::max_clock_skew)):
///      a live lease of another token, or one that ended less than the skew
///      ago (by the clock of this server, which may run ahead of the one that
///      wrote the lease): keep it and report the remaining lease plus the
///      skew (tag 0). Else (released: NULL, or expired more than the skew
///      ago): a new holding, `fence + 1`, if the line lets the caller in —
///      it is empty, or it is the turn of the caller's ticket, or the caller
///      is an unfair waiter; else refused like a held key (tag 0), reporting
///      what is left of the served ticket's turn. A fence past [`MAX_FENCE`]
///      is refused with tag 3 instead. Every tag 0 refusal reports, in
///      [`LINE_BITS`] bits above the offset, whether the caller's ticket is
///      in the line and how many come before it (the caller takes a ticket
///      with [`take_ticket`] when it is not).
///   2. `acquired_at` is reset only when a grant starts a new holding (the old
///      lease was not live).
///   3. `line_head` moves on when a grant starts a new holding: past every
///      ticket if the line was empty, past the caller's if it is in line
///      (served in turn, or an unfair waiter out of turn, which leaves no
///      turns behind), else (an unfair waiter without one) up to the ticket
///      served now, which keeps its place for the next release.
///   4. `owner`, 5. `token` and 6. `expires_at` take the caller's values on a
///      grant and keep the old ones otherwise.
/// - `expires_at > UTC_TIMESTAMP(6)` is false for NULL, so a released row is
///   never live; the comparison is on the server clock at microsecond precision.
fn acquire(t: &str, real_clock: &str, max_clock_skew: Duration) -> String {
    let skew_us = max_clock_skew.as_micros();
    // In parentheses: the reading alone would overflow `fence * 2^24 + …`.
    let offset = format!("({UTC_US} - ?)");
    let grant_new = report(&format!("{WINDOW_US} + {offset}"), "1");
    let late = report(&refusal(TAG_CLOCK, ""), "FALSE");
    let pinned = report(&refusal(TAG_PINNED, ""), "FALSE");
    let exhausted = report(&refusal(TAG_FENCE_EXHAUSTED, " + 0 * fence"), "fence");
    let late_now = report(&refusal(TAG_CLOCK, " + 0 * fence"), "fence");
    let renew = report(&format!("fence * {WINDOW_US} + {offset}"), "fence");
    let serving = serving(skew_us);
    // The caller's place (params: ticket ×3), see LINE_BITS: the releases
    // before its turn, less `running` (1 when a ticket's turn runs now on the
    // free key: that one takes it without a release).
    let line = |running: u8| {
        // CAST: a parameter of no declared type (NULL) would make the
        // arithmetic DOUBLE, which cannot carry the payload's 60 bits.
        format!(
            "CAST(IF(CAST(? AS SIGNED) >= {serving} AND CAST(? AS SIGNED) < line_next, \
                {LINE_IN} + LEAST(GREATEST(0, CAST(? AS SIGNED) - {serving} - {running}), \
                {LINE_MAX_AHEAD}), 0) AS SIGNED)"
        )
    };
    // A tag 0 refusal of `remaining_us`, with the caller's place.
    let held_for = |remaining_us: &str, line: String| {
        report(
            &format!(
                "-1 - {TAG_HELD} - 4 * ((LEAST(GREATEST(0, {remaining_us}) DIV 1000, \
                 {MAX_REMAINING_MS}) * {line_span} + {line}) * {WINDOW_US} + {offset})",
                line_span = 1i64 << LINE_BITS,
            ),
            "fence",
        )
    };
    let held = held_for(
        &format!("TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at) + {skew_us}"),
        line(0),
    );
    // Free, in another ticket's turn: what is left of that turn.
    let held_by_line = held_for(
        &format!(
            "{free_us} + ({serving} - line_head + 1) * {TURN_US} - {UTC_US}",
            free_us = free_us(skew_us),
        ),
        line(1),
    );
    // Params: ticket, unfair.
    let line_lets_in =
        format!("({serving} >= line_next OR {serving} = CAST(? AS SIGNED) OR ? = 1)");
    // Params: ticket ×3.
    let new_head = format!(
        "IF({serving} >= line_next, line_next, \
            IF(CAST(? AS SIGNED) >= {serving} AND CAST(? AS SIGNED) < line_next, \
               CAST(? AS SIGNED) + 1, {serving}))"
    );
    let take_over = report(
        &format!("(fence + 1) * {WINDOW_US} + {offset}"),
        "fence + 1",
    );
    format!(
        "INSERT INTO {t} (lock_key, token, fence, owner, acquired_at, expires_at) \
        SELECT ?, ?, {grant_new}, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
        FROM DUAL \
        WHERE IF({real_clock}, IF({UTC_US} >= ? AND {SYS_US} <= ?, TRUE, {late}), {pinned}) \
        ON DUPLICATE KEY UPDATE \
        fence = IF({SYS_US} > ?, {late_now}, \
            IF(expires_at > UTC_TIMESTAMP(6) AND token = ?, \
                IF(fence > {MAX_FENCE}, {exhausted}, {renew}), \
                IF(expires_at > UTC_TIMESTAMP(6) - INTERVAL {skew_us} MICROSECOND, {held}, \
                    IF({line_lets_in}, \
                        IF(fence >= {MAX_FENCE}, {exhausted}, {take_over}), \
                        {held_by_line})))), \
        acquired_at = IF({GRANTED}, \
            IF(expires_at > UTC_TIMESTAMP(6), acquired_at, UTC_TIMESTAMP(6)), acquired_at), \
        line_head = IF({GRANTED}, \
            IF(expires_at > UTC_TIMESTAMP(6) AND token = ?, line_head, {new_head}), line_head), \
        owner = IF({GRANTED}, ?, owner), \
        token = IF({GRANTED}, ?, token), \
        expires_at = IF({GRANTED}, UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, expires_at)"
    )
}

/// A refused waiter takes the next ticket in the key's line: the new
/// `line_next` is the insert id (the ticket is one less), 0 when the key has
/// no row or the bound has passed (then nothing changed, and the waiter asks
/// again at its next try). A second round trip, only for a waiter whose
/// refusal said its ticket is not in the line. It changes no lease.
///
/// Parameters ([`take_ticket_params`]): key, bound.
fn take_ticket(t: &str) -> String {
    format!(
        "UPDATE {t} SET line_next = LAST_INSERT_ID(line_next + 1) \
        WHERE lock_key = ? AND {SYS_US} <= ?"
    )
}

/// The parameters of [`take_ticket`].
pub(crate) fn take_ticket_params(key: Value, stamp: Stamp) -> Vec<Value> {
    vec![key, Value::from(stamp.bound)]
}

/// The parameters of [`acquire`], in the order of its placeholders. `ticket`
/// is the caller's ticket (NULL for none), `unfair` 1 for an unfair waiter.
#[allow(clippy::too_many_arguments)]
pub(crate) fn acquire_params(
    key: Value,
    token: Value,
    owner: Value,
    ttl_us: Value,
    ticket: Value,
    unfair: Value,
    stamp: Stamp,
) -> Vec<Value> {
    let (reference, bound) = (Value::from(stamp.reference), Value::from(stamp.bound));
    let line = [
        ticket.clone(),
        ticket.clone(),
        ticket.clone(),
        reference.clone(),
    ];
    let mut params = vec![
        // The new row.
        key,
        token.clone(),
        reference.clone(),
        owner.clone(),
        ttl_us.clone(),
        // The WHERE.
        reference.clone(),
        bound.clone(),
        // fence: late, ours, and the offset of renew.
        bound,
        token.clone(),
        reference.clone(),
    ];
    // held: the place in line and the offset.
    params.extend(line.clone());
    // Whether the line lets the caller in, and take-over's offset.
    params.extend([ticket.clone(), unfair, reference]);
    // held by the line: the place in line and the offset.
    params.extend(line);
    // line_head: ours, and the new head.
    params.extend([token.clone(), ticket.clone(), ticket.clone(), ticket]);
    // owner, token, expires_at.
    params.extend([owner, token, ttl_us]);
    params
}

/// Extend: a new expiry for this token's live lease. One statement.
///
/// Parameters ([`extend_params`]): ttl µs, key, token, bound.
///
/// - `WHERE lock_key = ? AND token = ? AND …`: only the lease of this token,
///   found through the primary key so only that one row is locked; then
///   [`live_in_time`]: live, on a real clock, before the bound.
/// - [`report_reading`] makes a matched row report the statement's reading in
///   the insert id; no match reports 0.
fn extend(t: &str, real_clock: &str) -> String {
    format!(
        "UPDATE {t} \
        SET {}, expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
        WHERE lock_key = ? AND token = ? AND {}",
        report_reading(),
        live_in_time(real_clock)
    )
}

/// The parameters of [`extend`].
pub(crate) fn extend_params(ttl_us: Value, key: Value, token: Value, stamp: Stamp) -> Vec<Value> {
    vec![ttl_us, key, token, Value::from(stamp.bound)]
}

/// Release: end this token's live lease now, keeping the row (and its fence) for
/// the next holder. One statement.
///
/// Parameters ([`release_params`]): key, token, bound.
///
/// Same guards and same insert-id report as [`extend`]; `expires_at = NULL`
/// marks the row released, so a second release matches nothing and reports 0,
/// and `released_at` starts the first turn of the key's line.
fn release(t: &str, real_clock: &str) -> String {
    format!(
        "UPDATE {t} \
        SET {}, expires_at = NULL, released_at = UTC_TIMESTAMP(6) \
        WHERE lock_key = ? AND token = ? AND {}",
        report_reading(),
        live_in_time(real_clock)
    )
}

/// The parameters of [`release`].
pub(crate) fn release_params(key: Value, token: Value, stamp: Stamp) -> Vec<Value> {
    vec![key, token, Value::from(stamp.bound)]
}

/// The parameters of one write, kept as values so that each attempt can bind
/// them with its own [`Stamp`] (see "No late effects" on the backend); each
/// variant lists them in the order of its statement's placeholders through
/// [`values`](Self::values).
pub(crate) enum WriteParams {
    /// [`acquire`]'s: key, token, owner, ttl µs, the caller's ticket (NULL for
    /// none) and whether it is an unfair waiter (1).
    Acquire {
        key: Value,
        token: Value,
        owner: Value,
        ttl_us: Value,
        ticket: Value,
        unfair: Value,
    },
    /// [`take_ticket`]'s: key.
    Ticket { key: Value },
    /// [`extend`]'s: ttl µs, key, token.
    Extend {
        ttl_us: Value,
        key: Value,
        token: Value,
    },
    /// [`release`]'s: key, token.
    Release { key: Value, token: Value },
    /// [`extend_many`]'s: ttl µs and the leases, padded to `slots`.
    ExtendMany {
        ttl_us: Value,
        leases: Vec<(Value, Value)>,
        slots: usize,
    },
}

impl WriteParams {
    /// An acquire of `key` for `token` by `owner`, with a lease of `ttl`, by a
    /// waiter at `place` or (`None`) a plain try.
    pub(crate) fn acquire(
        key: &LockKey,
        token: &Token,
        owner: Owner,
        ttl: Ttl,
        place: Option<Place>,
    ) -> Self {
        // A ticket past i64::MAX was never handed out: none.
        let ticket = place
            .and_then(|p| p.ticket)
            .and_then(|t| i64::try_from(t).ok());
        WriteParams::Acquire {
            key: key_value(key),
            token: token_value(token),
            owner: Value::from(owner.into_string()),
            ttl_us: Value::from(ttl.as_micros()),
            ticket: ticket.map_or(Value::NULL, Value::from),
            unfair: Value::from(i64::from(place.is_some_and(|p| !p.fair))),
        }
    }

    /// A ticket in the line of `key`.
    pub(crate) fn ticket(key: &LockKey) -> Self {
        WriteParams::Ticket {
            key: key_value(key),
        }
    }

    /// An extend of `token`'s lease on `key` to `ttl` from now.
    pub(crate) fn extend(key: &LockKey, token: &Token, ttl: Ttl) -> Self {
        WriteParams::Extend {
            ttl_us: Value::from(ttl.as_micros()),
            key: key_value(key),
            token: token_value(token),
        }
    }

    /// A release of `token`'s lease on `key`.
    pub(crate) fn release(key: &LockKey, token: &Token) -> Self {
        WriteParams::Release {
            key: key_value(key),
            token: token_value(token),
        }
    }

    /// The placeholders' values, with `stamp`'s clock parameters.
    pub(crate) fn values(&self, stamp: Stamp) -> Vec<Value> {
        match self {
            WriteParams::Acquire {
                key,
                token,
                owner,
                ttl_us,
                ticket,
                unfair,
            } => acquire_params(
                key.clone(),
                token.clone(),
                owner.clone(),
                ttl_us.clone(),
                ticket.clone(),
                unfair.clone(),
                stamp,
            ),
            WriteParams::Ticket { key } => take_ticket_params(key.clone(), stamp),
            WriteParams::Extend { ttl_us, key, token } => {
                extend_params(ttl_us.clone(), key.clone(), token.clone(), stamp)
            }
            WriteParams::Release { key, token } => {
                release_params(key.clone(), token.clone(), stamp)
            }
            WriteParams::ExtendMany {
                ttl_us,
                leases,
                slots,
            } => extend_many_params(ttl_us.clone(), leases, *slots, stamp),
        }
    }
}

/// The OK packet of a write: the answer of every write statement here, which
/// encodes it in the affected-rows count and the insert id (see the decoders
/// below).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OkPacket {
    /// Rows changed, as the server counts them (`CLIENT_FOUND_ROWS` off: a row
    /// updated to the values it had counts 0, inserted 1, updated 2 for
    /// `INSERT … ON DUPLICATE KEY UPDATE`).
    pub(crate) affected: u64,
    /// The insert id that `LAST_INSERT_ID(expr)` set, read back as signed.
    pub(crate) id: i64,
}

impl OkPacket {
    /// From the driver's affected rows and insert id. The server sends the
    /// insert id as an unsigned 64-bit number; our statements put signed values
    /// in it (negative remaining leases, tagged refusals), so the bits are read
    /// back as `i64`. No insert id (none set) reads as 0.
    pub(crate) fn from_driver(affected: u64, last_insert_id: Option<u64>) -> Self {
        Self {
            affected,
            id: last_insert_id.unwrap_or(0) as i64,
        }
    }
}

/// The most leases one [`extend_many`] statement renews.
pub(crate) const EXTEND_MANY_SLOTS: usize = 1024;

/// How long a batch extend waits for another transaction's row lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockWait {
    /// At most one second on MariaDB; the session's bound on MySQL.
    Short,
    /// Not at all on MariaDB ([`NO_WAIT`]); the session's bound on MySQL.
    None,
}

/// Makes the statement after it fail at once with error 1205 on a row that
/// another transaction has locked, instead of waiting: MariaDB runs what is in
/// a `/*M! … */` comment (10.3+ accept a lock-wait bound of 0), MySQL skips it.
pub(crate) const NO_WAIT: &str = "/*M! SET STATEMENT innodb_lock_wait_timeout = 0 FOR */ ";

/// The shortest ttl for which the first statement of a batch renewal may wait
/// up to one second for a row lock ([`LockWait::Short`]); shorter leases
/// start without waiting ([`LockWait::None`]), see "Batch renewal".
pub(crate) const FIRST_BATCH_WAIT_MIN_TTL: Duration = Duration::from_secs(10);

/// Bounds the statement after it to one second of waiting for a row lock, on
/// MariaDB; MySQL skips it.
const WAIT_ONE_SECOND: &str = "/*M! SET STATEMENT innodb_lock_wait_timeout = 1 FOR */ ";

/// Batch extend: a new expiry for every listed token's live lease, in one
/// statement and one commit. `slots` (a power of two up to
/// [`EXTEND_MANY_SLOTS`]) is the length of both lists; the caller pads them by
/// repeating its last lease, so that a handful of texts serve every batch size
/// and stay in the connection's prepared-statement cache.
///
/// Parameters ([`extend_many_params`]): ttl µs, `slots` keys, then `slots`
/// (key, token) pairs, then the bound.
///
/// - The prefix bounds its wait for other transactions' row locks
///   ([`LockWait`]; see "Batch renewal" in the module docs).
/// - `lock_key IN (…)` lets InnoDB find the rows through the primary key (a
///   row constructor alone may not use the index); `(lock_key, token) IN (…)`
///   then keeps only the rows of the listed token for each key.
/// - [`live_in_time`] and [`report_reading`], as in [`extend`]: every renewed
///   row reports the same reading (the statement's clock is one instant), and
///   the insert id is a refusal only if some row was refused. So the insert id
///   gives the reading whatever happened, and is 0 only when no listed lease
///   was live.
/// - There is no `RETURNING` on MySQL, so the OK packet's affected-rows count
///   says whether every lease was renewed: equal to the number of distinct
///   leases then. Anything less (a lease gone, or an expiry that did not change
///   within one clock tick and so is not counted) makes the caller read the
///   rows back with [`VERIFY`].
pub(crate) fn extend_many(t: &str, slots: usize, real_clock: &str, wait: LockWait) -> String {
    let keys = vec!["?"; slots].join(", ");
    let pairs = vec!["(?, ?)"; slots].join(", ");
    let prefix = match wait {
        LockWait::Short => WAIT_ONE_SECOND,
        LockWait::None => NO_WAIT,
    };
    format!(
        "{prefix}UPDATE {t} \
        SET {}, expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
        WHERE lock_key IN ({keys}) AND (lock_key, token) IN ({pairs}) AND {}",
        report_reading(),
        live_in_time(real_clock)
    )
}

/// The parameters of [`extend_many`] for `leases` (key and token values),
/// padded to `slots` by repeating the last one.
pub(crate) fn extend_many_params(
    ttl_us: Value,
    leases: &[(Value, Value)],
    slots: usize,
    stamp: Stamp,
) -> Vec<Value> {
    let last = leases.last().expect("a batch has at least one lease");
    let padded = || leases.iter().chain(std::iter::repeat(last)).take(slots);
    let mut params = Vec::with_capacity(2 + 3 * slots);
    params.push(ttl_us);
    params.extend(padded().map(|(key, _)| key.clone()));
    for (key, token) in padded() {
        params.push(key.clone());
        params.push(token.clone());
    }
    params.push(Value::from(stamp.bound));
    params
}

/// Reads back the rows of a batch extend that did not report every lease
/// renewed: key, token and expiry (µs since 1970, NULL once released), by a
/// consistent read, which never waits on a row lock. `slots` keys, padded like
/// [`extend_many`]'s.
pub(crate) fn verify(t: &str, slots: usize) -> String {
    let keys = vec!["?"; slots].join(", ");
    format!(
        "SELECT lock_key, token, TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', expires_at) \
        FROM {t} WHERE lock_key IN ({keys})"
    )
}

/// Why a write changed nothing, from a negative insert id (see the tables in
/// the module docs). Each carries the statement's clock reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Tag 1: the bound had passed, or the reading was outside the window.
    Clock { reading: i64 },
    /// Tag 2: the session's clock is pinned; the reading is the pinned one.
    Pinned { reading: i64 },
    /// Tag 3: the next fence would not fit the insert id.
    FenceExhausted { reading: i64 },
}

/// A negative insert id split into tag and payload.
fn refused(id: i64) -> Option<(i64, i64)> {
    let m = id.checked_neg()?.checked_sub(1)?;
    (id < 0).then_some((m & 3, m >> 2))
}

/// A refusal of tag 1 to 3.
fn refusal_of(tag: i64, reading: i64) -> Option<Refusal> {
    match tag {
        TAG_CLOCK => Some(Refusal::Clock { reading }),
        TAG_PINNED => Some(Refusal::Pinned { reading }),
        TAG_FENCE_EXHAUSTED => Some(Refusal::FenceExhausted { reading }),
        _ => None,
    }
}

/// What an acquire did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcquireAnswer {
    /// Acquired with `fence`; the lease runs from `reading`.
    Granted { fence: i64, reading: i64 },
    /// Another token holds a live lease with `remaining_us` left, or the key
    /// is free in another ticket's turn with that much of the turn left;
    /// `line` is the caller's place (see [`LINE_BITS`]).
    Held {
        remaining_us: i64,
        line: i64,
        reading: i64,
    },
    /// Nothing changed.
    Refused(Refusal),
}

/// Reads the answer of [`acquire`] run with `reference`; `None` when the OK
/// packet is not one the statement can produce.
pub(crate) fn decode_acquire(affected: u64, id: i64, reference: i64) -> Option<AcquireAnswer> {
    let offset_mask = WINDOW_US - 1;
    if id >= WINDOW_US {
        // 1: inserted; 2: taken over or renewed; 0: renewed to the same expiry
        // (1 with found-rows).
        return (affected <= 2).then_some(AcquireAnswer::Granted {
            fence: id >> OFFSET_BITS,
            reading: reference + (id & offset_mask),
        });
    }
    let (tag, payload) = refused(id)?;
    // Nothing inserted, or a duplicate left unchanged (1 with found-rows).
    if affected > 1 {
        return None;
    }
    if tag == TAG_HELD {
        return Some(AcquireAnswer::Held {
            remaining_us: (payload >> (OFFSET_BITS + LINE_BITS)) * 1000,
            line: (payload >> OFFSET_BITS) & ((1 << LINE_BITS) - 1),
            reading: reference + (payload & offset_mask),
        });
    }
    refusal_of(tag, payload).map(AcquireAnswer::Refused)
}

/// What an extend or a release did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GuardedAnswer {
    /// The token's live lease was extended or released at `reading`.
    Matched { reading: i64 },
    /// No live lease of the token; nothing changed.
    NotHeld,
    /// Nothing changed.
    Refused(Refusal),
}

/// Reads the answer of [`extend`] or [`release`]; `None` when the OK packet is
/// not one the statement can produce.
pub(crate) fn decode_guarded(affected: u64, id: i64) -> Option<GuardedAnswer> {
    match id {
        // Changed (1) or unchanged within one clock tick (0).
        1.. => (affected <= 1).then_some(GuardedAnswer::Matched { reading: id }),
        0 => (affected == 0).then_some(GuardedAnswer::NotHeld),
        _ if affected == 0 => match refused(id)? {
            (tag @ (TAG_CLOCK | TAG_PINNED), reading) => {
                refusal_of(tag, reading).map(GuardedAnswer::Refused)
            }
            _ => None,
        },
        _ => None,
    }
}

/// What a batch extend did, as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchAnswer {
    /// At least one lease was renewed at `reading`; `affected` rows changed.
    Renewed { reading: i64, affected: u64 },
    /// No listed lease was live: nothing changed.
    NoneHeld,
    /// At least one lease was refused; `affected` rows were renewed anyway (a
    /// bound that passed while the statement waited for a later row).
    Refused { refusal: Refusal, affected: u64 },
}

/// Reads the answer of [`extend_many`] for `distinct` leases; `None` when the
/// OK packet is not one the statement can produce.
pub(crate) fn decode_batch(affected: u64, id: i64, distinct: usize) -> Option<BatchAnswer> {
    if affected > distinct as u64 {
        return None;
    }
    match id {
        1.. => Some(BatchAnswer::Renewed {
            reading: id,
            affected,
        }),
        0 => (affected == 0).then_some(BatchAnswer::NoneHeld),
        _ => match refused(id)? {
            (tag @ (TAG_CLOCK | TAG_PINNED), reading) => Some(BatchAnswer::Refused {
                refusal: refusal_of(tag, reading)?,
                affected,
            }),
            _ => None,
        },
    }
}

/// What the [`verify`] read shows about one lease of a batch renewed at
/// `reading` with `ttl_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The row shows the token and the batch's own expiry: renewed.
    Renewed,
    /// No row, another token, a released row, or an expiry not after the
    /// batch's reading: the lease was not live when the batch ran.
    NotHeld,
    /// The token's lease was live at the batch's reading but the row shows
    /// another expiry: refused as late, or changed since by another call.
    Unknown,
}

/// Judges one lease from its [`verify`] row (`None`: the key has no row):
/// token and expiry µs.
pub(crate) fn verdict(
    row: Option<(&[u8], Option<i64>)>,
    token: &[u8],
    reading: i64,
    ttl_us: i64,
) -> Verdict {
    match row {
        Some((t, Some(expires))) if t == token => {
            if expires == reading.saturating_add(ttl_us) {
                Verdict::Renewed
            } else if expires > reading {
                Verdict::Unknown
            } else {
                Verdict::NotHeld
            }
        }
        _ => Verdict::NotHeld,
    }
}

/// The columns of [`LockInfo`](distrlock_core::LockInfo), read without locking
/// (a consistent read, so it never waits on a row lock). Instants come back as
/// microseconds since 1970 by calendar arithmetic on the stored UTC values, and the
/// remaining lease is computed on the server clock in the same statement.
const SELECT_INFO: &str = "SELECT lock_key, owner, fence, \
    TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', acquired_at), \
    TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', expires_at), \
    TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at)";

/// The per-session settings that bound every call, run once on each new
/// connection of a pool this backend builds.
///
/// - `autocommit = 1`: each statement commits on its own. A server (or
///   `init_connect`) that turns autocommit off would otherwise leave every acquire
///   uncommitted, to be rolled back when the connection closes.
/// - `innodb_lock_wait_timeout`: how long a statement waits for another
///   transaction's row lock before failing with error 1205 (whole seconds, at
///   least 1; MySQL and MariaDB both accept it per session).
/// - `lock_wait_timeout`: the same bound for metadata locks (a concurrent `ALTER
///   TABLE` or `LOCK TABLES`), whose default is a year.
/// - `max_statement_time` (MariaDB only, seconds): aborts any statement after the
///   statement timeout with error 1969. It sits in a `/*M! … */` comment, which
///   MariaDB executes and MySQL skips: MySQL's own `max_execution_time` applies to
///   `SELECT` only, so it would not bound the writes anyway; there the row-lock
///   bound and the client-side call timeout bound every call.
/// - `wsrep_sync_wait = 7` (MariaDB only, in the same comment): on a Galera
///   node, every read (1), update and delete (2) and insert (4) first waits
///   until the node has applied every write set the cluster had committed
///   when the statement arrived (a causality check). Without it a node
///   answers from its own state, which may lag: an inspect misses a lease
///   just acquired on another node, a try is refused by a lease just
///   released there. On a server without Galera (`wsrep_on = OFF`) it does
///   nothing. Every MariaDB built with the wsrep patch (Debian's, the
///   project's own packages and images) has the variable, Galera loaded or
///   not; a MariaDB built without it (`WITH_WSREP=OFF`) would refuse the
///   statement with error 1193, and then every connection fails to open.
pub(crate) fn session_setup(lock_wait_secs: u64, statement_timeout_secs: f64) -> String {
    format!(
        "SET SESSION autocommit = 1, innodb_lock_wait_timeout = {lock_wait_secs}, \
        lock_wait_timeout = {lock_wait_secs} \
        /*M! , max_statement_time = {statement_timeout_secs:.3}, wsrep_sync_wait = 7 */"
    )
}

/// A key as the `lock_key` column's bytes.
pub(crate) fn key_value(key: &LockKey) -> Value {
    Value::Bytes(key.as_str().as_bytes().to_vec())
}

/// A token as the `token` column's 16 bytes.
pub(crate) fn token_value(token: &Token) -> Value {
    Value::Bytes(token.as_uuid().as_bytes().to_vec())
}

/// A row that [`decode_lock_info`] (or a batch's read-back) cannot read.
pub(crate) fn corrupt(table: &TableName, reason: &str) -> Error {
    Error::backend(
        format!("lock table {table} holds a row this backend cannot read: {reason}"),
        false,
    )
}

/// The columns of `inspect` and `list`, in order.
type InfoRow = (Vec<u8>, String, i64, i64, Option<i64>, Option<i64>);

/// One row of `inspect` or `list` (key, owner, fence, acquired µs, expiry µs
/// or NULL once released, µs left by the statement's clock), as a
/// [`LockInfo`]: held while time is left, released when the expiry is NULL,
/// expired otherwise.
pub(crate) fn decode_lock_info(row: Row, table: &TableName) -> Result<LockInfo> {
    let corrupt = |reason: String| corrupt(table, &reason);
    let (key, owner, fence, acquired, expires, remaining): InfoRow =
        mysql_async::from_row_opt(row).map_err(|e| corrupt(e.to_string()))?;
    let key = String::from_utf8(key).map_err(|_| corrupt("a key is not UTF-8".into()))?;
    let key = LockKey::new(key).map_err(|e| corrupt(e.to_string()))?;
    let (state, remaining) = match (expires, remaining) {
        (None, _) => (LockState::Released, None),
        (Some(_), Some(left)) if left > 0 => (
            LockState::Held,
            Some(Duration::from_micros(left.unsigned_abs())),
        ),
        (Some(_), _) => (LockState::Expired, None),
    };
    Ok(LockInfo {
        key,
        owner,
        fence: Fence::new(fence),
        acquired_at: from_unix_micros(acquired),
        expires_at: expires.map(from_unix_micros),
        state,
        remaining,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_millis(5500);

    fn statements(table: &TableName) -> Statements {
        Statements::new(table, TOLERANCE, Duration::ZERO)
    }

    fn stamp() -> Stamp {
        Stamp {
            reference: 1_700_000_000_000_000,
            bound: 1_700_000_005_000_000,
        }
    }

    #[test]
    fn every_statement_backquotes_the_qualified_name() {
        let s = statements(&TableName::new("locks.Dist_Locks").unwrap());
        let t = "`locks`.`Dist_Locks`";
        let batch = extend_many(&s.table, 4, &s.real_clock, LockWait::Short);
        for sql in [
            &s.create_table,
            &s.acquire,
            &s.extend,
            &s.release,
            &s.inspect,
            &s.list,
            &batch,
            &verify(&s.table, 4),
        ] {
            assert!(sql.contains(t), "{sql}");
        }
    }

    #[test]
    fn placeholders_match_the_bound_parameters() {
        let s = statements(&TableName::default());
        let count = |sql: &str| sql.matches('?').count();
        let v = || Value::from(1);
        assert_eq!(count(&s.acquire), 28);
        assert_eq!(
            acquire_params(v(), v(), v(), v(), v(), v(), stamp()).len(),
            28
        );
        assert_eq!(count(&s.take_ticket), 2);
        assert_eq!(take_ticket_params(v(), stamp()).len(), 2);
        assert_eq!(count(&s.extend), 4);
        assert_eq!(extend_params(v(), v(), v(), stamp()).len(), 4);
        assert_eq!(count(&s.release), 3);
        assert_eq!(release_params(v(), v(), stamp()).len(), 3);
        assert_eq!(count(&s.inspect), 1);
        assert_eq!(count(&s.list), 0);
        let batch = extend_many("`t`", 8, "TRUE", LockWait::None);
        assert_eq!(count(&batch), 1 + 8 + 16 + 1);
        let leases = vec![(v(), v()); 5];
        assert_eq!(
            extend_many_params(v(), &leases, 8, stamp()).len(),
            1 + 8 + 16 + 1
        );
        assert_eq!(count(&verify("`t`", 8)), 8);
        assert_eq!(count(CLOCK), 0);
    }

    #[test]
    fn no_syntax_that_only_one_server_accepts() {
        let s = statements(&TableName::default());
        // The clock guard and the bound's clock are the places that read NOW()
        // and SYSDATE(); the lock-wait prefixes are MariaDB-only comments.
        let guard = real_clock(TOLERANCE);
        let batches = [LockWait::Short, LockWait::None].map(|w| extend_many("`t`", 4, &guard, w));
        for sql in [&s.acquire, &s.extend, &s.release, &s.inspect, &s.list]
            .into_iter()
            .chain(&batches)
        {
            let plain = sql
                .replace(&guard, "")
                .replace(SYS_US, "")
                .replace(NO_WAIT, "")
                .replace(WAIT_ONE_SECOND, "");
            let upper = plain.to_uppercase();
            for banned in [
                "RETURNING",
                "VALUES(",
                " AS NEW",
                "WITH ",
                "NOW(",
                "SYSDATE",
                "UNIX_TIMESTAMP",
                "SKIP LOCKED",
                "NOWAIT",
                "SET STATEMENT",
                "/*",
                ":=",
            ] {
                assert!(!upper.contains(banned), "{banned} in {sql}");
            }
        }
    }

    #[test]
    fn every_write_checks_the_clock_and_the_bound() {
        let s = statements(&TableName::default());
        let guard = real_clock(TOLERANCE);
        assert_eq!(
            guard,
            "TIMESTAMPDIFF(MICROSECOND, NOW(6), SYSDATE(6)) BETWEEN 0 AND 5500000"
        );
        let batch = extend_many("`t`", 4, &guard, LockWait::Short);
        for sql in [&s.acquire, &s.extend, &s.release, &batch] {
            assert_eq!(sql.matches(&guard).count(), 1, "{sql}");
        }
        // The acquire checks the bound before it looks for the row and again
        // once it holds the row's lock; the updates once, per locked row.
        assert_eq!(s.acquire.matches(&format!("{SYS_US} <= ?")).count(), 1);
        assert_eq!(s.acquire.matches(&format!("{SYS_US} > ?")).count(), 1);
        let tail = live_in_time(&guard);
        for sql in [&s.extend, &s.release, &batch] {
            assert!(sql.ends_with(&tail), "{sql}");
            assert_eq!(sql.matches(SYS_US).count(), 1, "{sql}");
        }
        for sql in [&s.inspect, &s.list, &verify("`t`", 2)] {
            assert!(!sql.contains("SYSDATE"), "{sql}");
        }
    }

    #[test]
    fn max_clock_skew_delays_only_the_takeover() {
        let table = TableName::default();
        let plain = Statements::new(&table, TOLERANCE, Duration::ZERO);
        let skewed = Statements::new(&table, TOLERANCE, Duration::from_millis(2500));
        // The takeover test and the reported remaining lease carry the skew.
        assert!(plain.acquire.contains("- INTERVAL 0 MICROSECOND"));
        assert!(skewed.acquire.contains("- INTERVAL 2500000 MICROSECOND"));
        assert!(skewed.acquire.contains("expires_at) + 2500000) DIV 1000"));
        // A renewal by the same token needs its lease live, as before, and the
        // holder's own statements do not change.
        assert!(
            skewed
                .acquire
                .contains("IF(expires_at > UTC_TIMESTAMP(6) AND token = ?")
        );
        assert_eq!(
            (&plain.extend, &plain.release),
            (&skewed.extend, &skewed.release)
        );
        assert_eq!(skewed.acquire.matches('?').count(), 28);
    }

    #[test]
    fn the_insert_id_layout_fits_64_bits() {
        assert_eq!(WINDOW_US, 16_777_216);
        assert_eq!(MAX_FENCE, 549_755_813_887);
        // The largest grant, held refusal and clock refusal stay within i64.
        assert!(
            i128::from(MAX_FENCE) * i128::from(WINDOW_US) + i128::from(WINDOW_US - 1)
                <= i128::from(i64::MAX)
        );
        let held = (i128::from(MAX_REMAINING_MS) << LINE_BITS | ((1 << LINE_BITS) - 1))
            * i128::from(WINDOW_US)
            + i128::from(WINDOW_US - 1);
        assert!(1 + 3 + 4 * held <= -(i128::from(i64::MIN)));
        // Year 9999 fits a clock refusal's payload.
        let year_9999 = 253_402_300_799_999_999_i128;
        assert!(1 + 3 + 4 * year_9999 < i128::from(i64::MAX));
    }

    #[test]
    fn decodes_acquire_answers() {
        let reference = 1_700_000_000_000_000;
        let grant = |fence: i64, offset: i64| fence * WINDOW_US + offset;
        let refusal = |tag: i64, payload: i64| -1 - (4 * payload + tag);
        for affected in [0, 1, 2] {
            assert_eq!(
                decode_acquire(affected, grant(7, 1234), reference),
                Some(AcquireAnswer::Granted {
                    fence: 7,
                    reading: reference + 1234
                })
            );
        }
        assert_eq!(
            decode_acquire(1, grant(MAX_FENCE, WINDOW_US - 1), reference),
            Some(AcquireAnswer::Granted {
                fence: MAX_FENCE,
                reading: reference + WINDOW_US - 1
            })
        );
        // Refused: the holder's remaining lease (ms), the caller's place in
        // line and the reading's offset.
        for affected in [0, 1] {
            let line = LINE_IN + 3;
            assert_eq!(
                decode_acquire(
                    affected,
                    refusal(0, ((1_500 << LINE_BITS) + line) * WINDOW_US + 42),
                    reference
                ),
                Some(AcquireAnswer::Held {
                    remaining_us: 1_500_000,
                    line,
                    reading: reference + 42
                })
            );
        }
        let reading = reference + 3_600_000_000;
        for (tag, expected) in [
            (1, Refusal::Clock { reading }),
            (2, Refusal::Pinned { reading }),
            (3, Refusal::FenceExhausted { reading }),
        ] {
            assert_eq!(
                decode_acquire(0, refusal(tag, reading), reference),
                Some(AcquireAnswer::Refused(expected))
            );
        }
        // What the statement never reports: nothing, a grant offset alone, too
        // many affected rows.
        for (affected, id) in [
            (0, 0),
            (1, WINDOW_US - 1),
            (3, grant(1, 0)),
            (2, refusal(0, 5)),
        ] {
            assert_eq!(
                decode_acquire(affected, id, reference),
                None,
                "{affected} {id}"
            );
        }
        assert_eq!(decode_acquire(0, i64::MIN, reference), None);
    }

    #[test]
    fn decodes_extend_release_and_batch_answers() {
        let reading = 1_700_000_000_000_000;
        let refusal = |tag: i64| -1 - (4 * reading + tag);
        assert_eq!(
            decode_guarded(1, reading),
            Some(GuardedAnswer::Matched { reading })
        );
        // Matched but unchanged (same expiry within one clock tick): still held.
        assert_eq!(
            decode_guarded(0, reading),
            Some(GuardedAnswer::Matched { reading })
        );
        assert_eq!(decode_guarded(0, 0), Some(GuardedAnswer::NotHeld));
        assert_eq!(
            decode_guarded(0, refusal(1)),
            Some(GuardedAnswer::Refused(Refusal::Clock { reading }))
        );
        assert_eq!(
            decode_guarded(0, refusal(2)),
            Some(GuardedAnswer::Refused(Refusal::Pinned { reading }))
        );
        for (affected, id) in [
            (1, 0),
            (1, refusal(1)),
            (0, refusal(0)),
            (0, refusal(3)),
            (2, reading),
        ] {
            assert_eq!(decode_guarded(affected, id), None, "{affected} {id}");
        }
        assert_eq!(
            decode_batch(3, reading, 4),
            Some(BatchAnswer::Renewed {
                reading,
                affected: 3
            })
        );
        assert_eq!(decode_batch(0, 0, 4), Some(BatchAnswer::NoneHeld));
        assert_eq!(
            decode_batch(2, refusal(1), 4),
            Some(BatchAnswer::Refused {
                refusal: Refusal::Clock { reading },
                affected: 2
            })
        );
        for (affected, id) in [(1, 0), (5, reading), (0, refusal(0))] {
            assert_eq!(decode_batch(affected, id, 4), None, "{affected} {id}");
        }
    }

    #[test]
    fn verdicts_of_a_batch_read_back() {
        let (reading, ttl) = (1_000_000_000, 30_000_000);
        let ours: &[u8] = b"ours";
        let v = |row| verdict(row, ours, reading, ttl);
        assert_eq!(v(Some((ours, Some(reading + ttl)))), Verdict::Renewed);
        assert_eq!(v(None), Verdict::NotHeld);
        assert_eq!(v(Some((b"other", Some(reading + ttl)))), Verdict::NotHeld);
        assert_eq!(v(Some((ours, None))), Verdict::NotHeld);
        assert_eq!(v(Some((ours, Some(reading)))), Verdict::NotHeld);
        assert_eq!(v(Some((ours, Some(reading + 1)))), Verdict::Unknown);
        assert_eq!(v(Some((ours, Some(reading + ttl + 1)))), Verdict::Unknown);
    }

    #[test]
    fn session_setup_keeps_the_mariadb_part_in_its_comment() {
        assert_eq!(
            session_setup(2, 5.0),
            "SET SESSION autocommit = 1, innodb_lock_wait_timeout = 2, lock_wait_timeout = 2 \
             /*M! , max_statement_time = 5.000, wsrep_sync_wait = 7 */"
        );
    }
}
