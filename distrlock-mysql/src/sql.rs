//! Every SQL statement of the MySQL/MariaDB backend, each with why its clauses are
//! there.
//!
//! One text serves MySQL 5.7, MySQL 8.x and MariaDB ≥ 10.5: no `RETURNING`, no
//! `INSERT … AS alias`, no `VALUES()` in `ON DUPLICATE KEY UPDATE` (deprecated in
//! MySQL 8.0.20; parameters are bound twice instead), no CTEs.
//!
//! # Time
//!
//! Every instant is `UTC_TIMESTAMP(6)`: the server's clock, in UTC whatever the
//! session `time_zone`, fixed for the duration of one statement (so every use
//! within a statement sees the same instant). Columns are `DATETIME(6)`, which
//! stores what it is given without any time-zone conversion (unlike `TIMESTAMP`).
//! Instants are read back as microseconds since 1970 with `TIMESTAMPDIFF`, which is
//! plain calendar arithmetic, never `UNIX_TIMESTAMP(datetime)`, which would read the
//! value in the session time zone (and is ambiguous in a DST fold).
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
//! How a refusal is reported, without changing anything: the acquire's `VALUES`
//! list, evaluated before any row is locked or written, puts `NULL` in
//! `lock_key`, which fails with error 1048 in every SQL mode (a single-row
//! `INSERT` never turns `NULL` into a default); extend and release report
//! `-1` in the insert id (below).
//!
//! # How a statement reports its outcome: the OK packet's insert id
//!
//! A write's OK packet carries an "insert id". When a statement calls
//! `LAST_INSERT_ID(expr)` (and the table has no `AUTO_INCREMENT` column, as ours),
//! the server reports the argument of the *last* such call in that statement, and
//! 0 when the statement never called it. Every write below calls it on exactly the
//! paths that matter, so the insert id alone says what happened:
//!
//! | statement | insert id | meaning |
//! |---|---|---|
//! | acquire | `fence` ≥ 1 | acquired (inserted, taken over, or renewed by the same token) |
//! | acquire | `-1 - remaining_µs` (≤ −2, as a signed 64-bit number) | refused: another token holds a live lease |
//! | extend / release | `fence` ≥ 1 | the token's live lease was extended / released |
//! | extend / release | 0 | no live lease of this token: nothing changed |
//! | extend / release / batch extend | −1 | the token matched, but the session's clock is pinned: nothing changed |
//!
//! The affected-rows count cannot serve: it counts *changed* rows (so an extend or
//! a same-token re-acquire landing on the same expiry within one clock tick would
//! look like a failure), and with the `CLIENT_FOUND_ROWS` connection flag a refused
//! `ON DUPLICATE KEY UPDATE` reports 1, just like a fresh insert. The insert id is
//! the same with and without that flag, so this backend works on pools and
//! connections with either setting. The affected-rows count is still checked
//! against the insert id as a consistency check.
//!
//! `LAST_INSERT_ID(expr)` also sets the session's `LAST_INSERT_ID()` value; see the
//! notes on [`MySqlBackend::try_acquire_in`](crate::MySqlBackend::try_acquire_in).

use std::time::Duration;

use distrlock_core::TableName;

/// The statements for one table, built once from its validated, backquoted name.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    pub(crate) create_table: String,
    pub(crate) acquire: String,
    pub(crate) extend: String,
    pub(crate) release: String,
    pub(crate) inspect: String,
    pub(crate) list: String,
    /// The clock guard, for the batch extends built per batch size.
    pub(crate) real_clock: String,
}

impl Statements {
    /// The statements for `table`, refusing sessions whose clock is off the
    /// real one by more than `clock_tolerance` (see "A pinned session clock").
    pub(crate) fn new(table: &TableName, clock_tolerance: Duration) -> Self {
        // Safe to splice: TableName admits only [A-Za-z0-9_] parts, and each part
        // is backquoted, so the name can neither break out nor hit a keyword.
        let t = table.quoted('`');
        let real = real_clock(clock_tolerance);
        Self {
            create_table: create_table(&t),
            acquire: acquire(&t, &real),
            extend: extend(&t, &real),
            release: release(&t, &real),
            inspect: format!("{SELECT_INFO} FROM {t} WHERE lock_key = ?"),
            list: format!("{SELECT_INFO} FROM {t} ORDER BY lock_key"),
            real_clock: real,
        }
    }
}

/// The SQL texts of one table's lock statements, exactly as the backend sends
/// them, for tools that issue them without the backend (the benchmark's
/// raw-driver baseline). Not a stable API. Each reports through the OK
/// packet's insert id (see the module docs).
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct LockSql {
    /// Try-acquire. Parameters: key, token, owner, ttl µs, token, token, owner,
    /// token, token, ttl µs.
    pub acquire: String,
    /// Extend. Parameters: ttl µs, key, token.
    pub extend: String,
    /// Release. Parameters: key, token.
    pub release: String,
    /// The DDL of the table.
    pub create_table: String,
}

impl LockSql {
    /// The statements for `table`, with the clock tolerance of the default
    /// [`MySqlConfig`](crate::MySqlConfig).
    pub fn for_table(table: &TableName) -> Self {
        let s = Statements::new(table, crate::MySqlConfig::new().clock_tolerance());
        Self {
            acquire: s.acquire,
            extend: s.extend,
            release: s.release,
            create_table: s.create_table,
        }
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

/// What extend and release (and the batch extend) evaluate instead of the
/// liveness test when the session's clock is pinned: reports −1 in the insert
/// id and matches nothing. `0 * fence` makes the argument depend on the row, so
/// that the optimizer never evaluates it as a constant ahead of the row; `IF(x,
/// FALSE, FALSE)` evaluates `x` only for its side effect.
const PINNED: &str = "IF(LAST_INSERT_ID(-1 + 0 * fence), FALSE, FALSE)";

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
        \x20   PRIMARY KEY (lock_key)\n\
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin \
        COMMENT='distrlock leases: one row per key, kept after release so fences never go back'"
    )
}

/// Acquire: insert the key, or take over a released or expired lease, or renew
/// this token's own live lease; otherwise change nothing and report the holder's
/// remaining lease. One statement, one round trip.
///
/// Parameters: key, token, owner, ttl µs, token, token, owner, token, token, ttl µs.
///
/// - `IF(<real clock>, ?, NULL)` for `lock_key`: on a pinned session clock the
///   key is `NULL` and the statement fails with error 1048 before it looks for
///   the row, so it neither inserts, takes over, renews nor locks anything.
///   `VALUES` is evaluated before the duplicate row is locked, so a row-lock
///   wait never counts against the tolerance here.
/// - `INSERT … VALUES (…, LAST_INSERT_ID(1), …)`: a new key starts at fence 1 and
///   reports it. On a duplicate key the UPDATE below always calls
///   `LAST_INSERT_ID` again, and the last call is the one reported.
/// - `ON DUPLICATE KEY UPDATE` takes the existing row under an exclusive row lock,
///   so concurrent acquires of one key are serialised and each sees the previous
///   one's result (exactly one of racing tokens wins).
/// - MySQL and MariaDB run the assignments left to right, each seeing the values
///   assigned before it, but MariaDB's `SIMULTANEOUS_ASSIGNMENT` SQL mode makes
///   every one see the old row. The statement gives the same result either way:
///   each assignment reads only columns assigned *after* it (or its own), so it
///   sees the old row in both modes.
///   1. `fence`, first, while `token` and `expires_at` still hold the old values.
///      Live and ours: keep the fence and report it. Live and not ours: keep it and
///      report `-1 - remaining µs` (the holder's remaining lease, in this same round
///      trip; `IF(x, fence, fence)` evaluates `x` only for that side effect).
///      Not live (released: NULL, or expired): a new holding, `fence + 1`.
///   2. `acquired_at` is reset only when a new holding starts.
///   3. `owner` is written unless another token holds a live lease (`NULL AND …`
///      is not true, so a released row takes the new owner).
///   4. `token` changes only when the lease is not live: a live lease keeps its
///      token (ours or the holder's).
///   5. `expires_at`, last: kept only while another token's lease is live (the
///      caller lost); otherwise the caller took over or renewed its own lease, and
///      the lease gets a new expiry. With left-to-right assignment `token` is then
///      already the caller's when the lease was not live, which gives the same
///      answer, since the first condition is false then.
/// - `expires_at > UTC_TIMESTAMP(6)` is false for NULL, so a released row is
///   never live; the comparison is on the server clock at microsecond precision.
fn acquire(t: &str, real_clock: &str) -> String {
    format!(
        "INSERT INTO {t} (lock_key, token, fence, owner, acquired_at, expires_at) \
        VALUES (IF({real_clock}, ?, NULL), ?, LAST_INSERT_ID(1), ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
        ON DUPLICATE KEY UPDATE \
        fence = IF(expires_at > UTC_TIMESTAMP(6), \
            IF(token = ?, LAST_INSERT_ID(fence), \
                IF(LAST_INSERT_ID(-1 - TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), expires_at)), fence, fence)), \
            LAST_INSERT_ID(fence + 1)), \
        acquired_at = IF(expires_at > UTC_TIMESTAMP(6), acquired_at, UTC_TIMESTAMP(6)), \
        owner = IF(expires_at > UTC_TIMESTAMP(6) AND token <> ?, owner, ?), \
        token = IF(expires_at > UTC_TIMESTAMP(6), token, ?), \
        expires_at = IF(expires_at > UTC_TIMESTAMP(6) AND token <> ?, expires_at, \
            UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)"
    )
}

/// Extend: a new expiry for this token's live lease. One statement.
///
/// Parameters: ttl µs, key, token.
///
/// - `WHERE lock_key = ? AND token = ? AND … expires_at > UTC_TIMESTAMP(6)`: only
///   the live lease of this token (a released lease has NULL and never matches),
///   found through the primary key so only that one row is locked.
/// - `IF(<real clock>, <live>, <pinned>)`: on a pinned session clock the row
///   matches nothing and the insert id is −1 ([`PINNED`]). It comes after the
///   token test, so another token's lease is "not held" whatever the clock, and
///   before the expiry test, which would read the pinned clock.
/// - `fence = LAST_INSERT_ID(fence)` changes nothing but makes a matched row
///   report its fence in the insert id, even when the new expiry equals the old
///   one (two extends within one clock tick) and the row is therefore "unchanged".
///   No match reports 0.
fn extend(t: &str, real_clock: &str) -> String {
    format!(
        "UPDATE {t} \
        SET fence = LAST_INSERT_ID(fence), \
        expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
        WHERE lock_key = ? AND token = ? \
        AND IF({real_clock}, expires_at > UTC_TIMESTAMP(6), {PINNED})"
    )
}

/// The most leases one [`extend_many`] statement renews.
pub(crate) const EXTEND_MANY_SLOTS: usize = 1024;

/// Batch extend: a new expiry for every listed token's live lease, in one
/// statement and one commit. `slots` (a power of two up to
/// [`EXTEND_MANY_SLOTS`]) is the length of both lists; the caller pads them by
/// repeating its last lease, so that a handful of texts serve every batch size
/// and stay in the connection's prepared-statement cache.
///
/// Parameters: ttl µs, `slots` keys, then `slots` (key, token) pairs.
///
/// - `lock_key IN (…)` lets InnoDB find the rows through the primary key (a
///   row constructor alone may not use the index); `(lock_key, token) IN (…)`
///   then keeps only the rows of the listed token for each key.
/// - `IF(<real clock>, expires_at > UTC_TIMESTAMP(6), <pinned>)`: the same
///   guards as [`extend`]: only live leases, on the server's real clock; a
///   pinned session clock renews nothing and reports −1 in the insert id (which
///   is otherwise 0: nothing else here calls `LAST_INSERT_ID`).
/// - There is no `RETURNING` on MySQL, so the OK packet's affected-rows count is
///   the answer: equal to the number of distinct leases when every one was
///   renewed. Anything less (a lease gone, or an expiry that did not change
///   within one clock tick and so is not counted) makes the caller ask each lease
///   on its own with [`extend`].
pub(crate) fn extend_many(t: &str, slots: usize, real_clock: &str) -> String {
    let keys = vec!["?"; slots].join(", ");
    let pairs = vec!["(?, ?)"; slots].join(", ");
    format!(
        "UPDATE {t} \
        SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
        WHERE lock_key IN ({keys}) AND (lock_key, token) IN ({pairs}) \
        AND IF({real_clock}, expires_at > UTC_TIMESTAMP(6), {PINNED})"
    )
}

/// Release: end this token's live lease now, keeping the row (and its fence) for
/// the next holder. One statement.
///
/// Parameters: key, token.
///
/// Same guards and same insert-id report as [`extend`] (−1 on a pinned session
/// clock); `expires_at = NULL` marks the row released, so a second release
/// matches nothing and reports 0.
fn release(t: &str, real_clock: &str) -> String {
    format!(
        "UPDATE {t} \
        SET fence = LAST_INSERT_ID(fence), expires_at = NULL \
        WHERE lock_key = ? AND token = ? \
        AND IF({real_clock}, expires_at > UTC_TIMESTAMP(6), {PINNED})"
    )
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
pub(crate) fn session_setup(lock_wait_secs: u64, statement_timeout_secs: f64) -> String {
    format!(
        "SET SESSION autocommit = 1, innodb_lock_wait_timeout = {lock_wait_secs}, \
        lock_wait_timeout = {lock_wait_secs} \
        /*M! , max_statement_time = {statement_timeout_secs:.3} */"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOLERANCE: Duration = Duration::from_millis(5500);

    fn statements(table: &TableName) -> Statements {
        Statements::new(table, TOLERANCE)
    }

    #[test]
    fn every_statement_backquotes_the_qualified_name() {
        let s = statements(&TableName::new("locks.Dist_Locks").unwrap());
        for sql in [
            &s.create_table,
            &s.acquire,
            &s.extend,
            &s.release,
            &s.inspect,
            &s.list,
        ] {
            assert!(sql.contains("`locks`.`Dist_Locks`"), "{sql}");
        }
    }

    #[test]
    fn placeholders_match_the_bound_parameters() {
        let s = statements(&TableName::default());
        let count = |sql: &str| sql.matches('?').count();
        assert_eq!(count(&s.acquire), 10);
        assert_eq!(count(&s.extend), 3);
        assert_eq!(count(&s.release), 2);
        assert_eq!(count(&s.inspect), 1);
        assert_eq!(count(&s.list), 0);
        assert_eq!(count(&extend_many("`t`", 8, "TRUE")), 1 + 8 + 16);
    }

    #[test]
    fn no_syntax_that_only_one_server_accepts() {
        let s = statements(&TableName::default());
        // The clock guard is the one place that reads NOW() and SYSDATE().
        let guard = real_clock(TOLERANCE);
        for sql in [&s.acquire, &s.extend, &s.release, &s.inspect, &s.list] {
            let upper = sql.replace(&guard, "").to_uppercase();
            for banned in [
                "RETURNING",
                "VALUES(",
                " AS NEW",
                "WITH ",
                "NOW(",
                "SYSDATE",
                "UNIX_TIMESTAMP",
            ] {
                assert!(!upper.contains(banned), "{banned} in {sql}");
            }
        }
    }

    #[test]
    fn every_write_checks_the_clock_once() {
        let s = statements(&TableName::default());
        let guard = real_clock(TOLERANCE);
        assert_eq!(
            guard,
            "TIMESTAMPDIFF(MICROSECOND, NOW(6), SYSDATE(6)) BETWEEN 0 AND 5500000"
        );
        let batch = extend_many("`t`", 4, &guard);
        for sql in [&s.acquire, &s.extend, &s.release, &batch] {
            assert_eq!(sql.matches(&guard).count(), 1, "{sql}");
        }
        assert!(
            s.acquire
                .contains(&format!("VALUES (IF({guard}, ?, NULL), ?"))
        );
        for sql in [&s.extend, &s.release, &batch] {
            assert!(
                sql.ends_with(&format!(
                    "AND IF({guard}, expires_at > UTC_TIMESTAMP(6), {PINNED})"
                )),
                "{sql}"
            );
        }
        for sql in [&s.inspect, &s.list] {
            assert!(!sql.contains("SYSDATE"), "{sql}");
        }
    }

    #[test]
    fn session_setup_keeps_the_mariadb_part_in_its_comment() {
        assert_eq!(
            session_setup(2, 5.0),
            "SET SESSION autocommit = 1, innodb_lock_wait_timeout = 2, lock_wait_timeout = 2 \
             /*M! , max_statement_time = 5.000 */"
        );
    }
}
