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
}

impl Statements {
    pub(crate) fn new(table: &TableName) -> Self {
        // Safe to splice: TableName admits only [A-Za-z0-9_] parts, and each part
        // is backquoted, so the name can neither break out nor hit a keyword.
        let t = table.quoted('`');
        Self {
            create_table: create_table(&t),
            acquire: acquire(&t),
            extend: extend(&t),
            release: release(&t),
            inspect: format!("{SELECT_INFO} FROM {t} WHERE lock_key = ?"),
            list: format!("{SELECT_INFO} FROM {t} ORDER BY lock_key"),
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
    /// The statements for `table`.
    pub fn for_table(table: &TableName) -> Self {
        let s = Statements::new(table);
        Self {
            acquire: s.acquire,
            extend: s.extend,
            release: s.release,
            create_table: s.create_table,
        }
    }
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
fn acquire(t: &str) -> String {
    format!(
        "INSERT INTO {t} (lock_key, token, fence, owner, acquired_at, expires_at) \
        VALUES (?, ?, LAST_INSERT_ID(1), ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND) \
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
/// - `WHERE lock_key = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)`: only
///   the live lease of this token (a released lease has NULL and never matches),
///   found through the primary key so only that one row is locked.
/// - `fence = LAST_INSERT_ID(fence)` changes nothing but makes a matched row
///   report its fence in the insert id, even when the new expiry equals the old
///   one (two extends within one clock tick) and the row is therefore "unchanged".
///   No match reports 0.
fn extend(t: &str) -> String {
    format!(
        "UPDATE {t} \
        SET fence = LAST_INSERT_ID(fence), \
        expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
        WHERE lock_key = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
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
/// - `expires_at > UTC_TIMESTAMP(6)`: the same guard as [`extend`]: only live
///   leases, on the server clock.
/// - There is no `RETURNING` on MySQL, so the OK packet's affected-rows count is
///   the answer: equal to the number of distinct leases when every one was
///   renewed. Anything less (a lease gone, or an expiry that did not change
///   within one clock tick and so is not counted) makes the caller ask each lease
///   on its own with [`extend`].
pub(crate) fn extend_many(t: &str, slots: usize) -> String {
    let keys = vec!["?"; slots].join(", ");
    let pairs = vec!["(?, ?)"; slots].join(", ");
    format!(
        "UPDATE {t} \
        SET expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
        WHERE lock_key IN ({keys}) AND (lock_key, token) IN ({pairs}) \
        AND expires_at > UTC_TIMESTAMP(6)"
    )
}

/// Release: end this token's live lease now, keeping the row (and its fence) for
/// the next holder. One statement.
///
/// Parameters: key, token.
///
/// Same guard and same insert-id report as [`extend`]; `expires_at = NULL` marks
/// the row released, so a second release matches nothing and reports 0.
fn release(t: &str) -> String {
    format!(
        "UPDATE {t} \
        SET fence = LAST_INSERT_ID(fence), expires_at = NULL \
        WHERE lock_key = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
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

    #[test]
    fn every_statement_backquotes_the_qualified_name() {
        let s = Statements::new(&TableName::new("locks.Dist_Locks").unwrap());
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
        let s = Statements::new(&TableName::default());
        let count = |sql: &str| sql.matches('?').count();
        assert_eq!(count(&s.acquire), 10);
        assert_eq!(count(&s.extend), 3);
        assert_eq!(count(&s.release), 2);
        assert_eq!(count(&s.inspect), 1);
        assert_eq!(count(&s.list), 0);
        assert_eq!(count(&extend_many("`t`", 8)), 1 + 8 + 16);
    }

    #[test]
    fn no_syntax_that_only_one_server_accepts() {
        let s = Statements::new(&TableName::default());
        for sql in [&s.acquire, &s.extend, &s.release, &s.inspect, &s.list] {
            let upper = sql.to_uppercase();
            for banned in [
                "RETURNING",
                "VALUES(",
                " AS NEW",
                "WITH ",
                "NOW(",
                "UNIX_TIMESTAMP",
            ] {
                assert!(!upper.contains(banned), "{banned} in {sql}");
            }
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
