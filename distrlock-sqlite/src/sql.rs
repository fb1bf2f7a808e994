//! Every SQL statement of the SQLite backend, each next to why its clauses are there.
//!
//! Time never comes from SQLite's `'now'`: the backend binds the current instant
//! of the host clock ([`crate::clock`]) as `:now` (microseconds on the clock named
//! by `:clock`) and the wall-clock time as `:wall_now` (microseconds since the Unix
//! epoch, for display only). All processes that share the file run on the same
//! host and so read the same clock.
//!
//! A lease is **live** when `lease_end IS NOT NULL` and, on the row's clock,
//! it has not ended:
//! - `lease_end IS NULL` marks a released row (the row stays, so the fence does);
//! - `clock = :clock`: the row was written on the clock this process reads, and
//!   `lease_end > :now` is the expiry test itself, on the monotonic clock, so a
//!   step of the wall clock (NTP, an administrator) neither ends nor prolongs a
//!   lease;
//! - otherwise the row was written on another clock: under an earlier boot of the
//!   host, or by a process of this boot that could not read the boot id (a
//!   sandbox) and fell back to the wall clock. Instants of two clocks cannot be
//!   compared, so the wall-clock `expires_at > :wall_now` decides. A live lease of
//!   a process that sees another clock is therefore respected; after a reboot a
//!   dead holder's lease is honoured until its wall-clock end, at most one ttl.

use distrlock_core::TableName;

/// The predicate for "the row's lease is live", on the row being read or updated.
const LIVE: &str = "(lease_end IS NOT NULL AND CASE WHEN clock = :clock \
     THEN lease_end > :now ELSE expires_at > :wall_now END)";

/// The largest fence: a row at this fence can never be taken over again.
pub(crate) const MAX_FENCE: i64 = i64::MAX;

/// One turn of the line of waiters, in µs ([`distrlock_core::line::TURN`]).
pub(crate) const TURN_US: i64 = distrlock_core::line::TURN.as_micros() as i64;

/// `:mode` of the acquire statement: a plain try (no ticket; keeps to the line).
pub(crate) const MODE_PLAIN: i64 = 0;
/// `:mode`: a fair waiter (takes the free key only in its ticket's turn).
pub(crate) const MODE_FAIR: i64 = 1;
/// `:mode`: an unfair waiter (takes the free key whenever it is free).
pub(crate) const MODE_UNFAIR: i64 = 2;

/// The ticket served now on a row whose lease is not live
/// ([`distrlock_core::line::serving`]): one more per whole turn since the key
/// became free (its release at `freed_at`, or its lease's end). Instants of
/// another clock (an earlier boot) cannot be compared: the line then counts
/// as empty (`line_next`), as it does on a row released before the line
/// existed. A clock that went back counts as no time since.
const SERVING: &str = "(CASE WHEN clock = :clock AND COALESCE(lease_end, freed_at) IS NOT NULL \
     THEN line_head + max(0, :now - COALESCE(lease_end, freed_at)) / {TURN} ELSE line_next END)";

/// The statements for one table, with its name quoted in.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    pub(crate) create_table: String,
    /// The line's columns and the ALTERs that add them to an older table.
    pub(crate) line_columns: Vec<(&'static str, String)>,
    pub(crate) acquire: String,
    pub(crate) holder: String,
    pub(crate) ticket: String,
    pub(crate) extend: String,
    pub(crate) release: String,
    pub(crate) inspect: String,
    pub(crate) list: String,
}

impl Statements {
    /// The statements for `table`, which has no schema part (checked by the
    /// builder). The name is safe to quote in: [`TableName`] admits only letters,
    /// digits and `_`.
    pub(crate) fn new(table: &TableName) -> Self {
        let t = table.quoted('"');
        let serving = SERVING.replace("{TURN}", &TURN_US.to_string());
        Self {
            create_table: create_table(table),
            line_columns: line_columns(table),
            // Insert a first row, or take over / renew an existing one.
            //
            // - `ON CONFLICT (lock_key) DO UPDATE`: one statement decides and
            //   writes, so no other connection can slip in between a read and a
            //   write (the surrounding BEGIN IMMEDIATE makes that doubly sure).
            // - The UPDATE's WHERE: take the row only when its lease is not live
            //   (released, expired, or from another boot) or when the live lease
            //   is ours (same token: an idempotent re-acquire). Otherwise nothing
            //   is written and RETURNING yields no row: refused.
            // - `fence < MAX_FENCE` on a takeover: SQLite would turn `fence + 1`
            //   past i64::MAX into a REAL; refuse instead (the caller reports an
            //   exhausted fence).
            // - The SET clauses read the *old* row (SQLite evaluates every right
            //   hand side before assigning), so the CASEs see the old token and
            //   lease: a live same-token re-acquire keeps fence and acquired_at;
            //   every other acquisition raises the fence by one, so fences only
            //   grow, also across release (rows are never deleted).
            // - Fair order, on a free row: the line is empty, or it is the turn
            //   of the caller's `:ticket`, or the caller is an unfair waiter
            //   (`:mode`); otherwise refused, and the caller stays in line.
            // - `line_head`: the line moves on past every ticket if it was
            //   empty, past the caller's if it is in line (served in turn, or
            //   an unfair waiter out of turn, which leaves no turns behind),
            //   else (an unfair waiter without one) up to the ticket served
            //   now, which keeps its place for the next release; a retry of
            //   the same live holding leaves it.
            // - `RETURNING fence` hands back the fence of this holding.
            acquire: format!(
                "INSERT INTO {t} \
                     (lock_key, token, fence, owner, acquired_at, expires_at, clock, lease_end) \
                 VALUES (:key, :token, 1, :owner, :wall_now, :wall_now + :ttl, :clock, :now + :ttl) \
                 ON CONFLICT (lock_key) DO UPDATE SET \
                     fence = CASE WHEN {LIVE} AND token = excluded.token \
                                  THEN fence ELSE fence + 1 END, \
                     acquired_at = CASE WHEN {LIVE} AND token = excluded.token \
                                        THEN acquired_at ELSE excluded.acquired_at END, \
                     line_head = CASE WHEN {LIVE} AND token = excluded.token THEN line_head \
                                      WHEN {serving} >= line_next THEN line_next \
                                      WHEN :ticket >= {serving} AND :ticket < line_next \
                                      THEN :ticket + 1 \
                                      ELSE {serving} END, \
                     token = excluded.token, \
                     owner = excluded.owner, \
                     expires_at = excluded.expires_at, \
                     clock = excluded.clock, \
                     lease_end = excluded.lease_end \
                 WHERE CASE WHEN {LIVE} THEN token = excluded.token \
                            ELSE fence < {MAX_FENCE} \
                                 AND ({serving} >= line_next OR {serving} = :ticket \
                                      OR :mode = {MODE_UNFAIR}) END \
                 RETURNING fence"
            ),
            // After a refused acquire, in the same transaction: who holds the key
            // and until when, so a waiter sleeps exactly as long as needed, and
            // the key's line, to judge the caller's ticket.
            holder: format!(
                "SELECT fence, clock, lease_end, expires_at, freed_at, line_next, line_head, \
                     token \
                 FROM {t} WHERE lock_key = :key"
            ),
            // A refused waiter whose ticket is not in the line takes the next
            // one; the same transaction, so no other caller gets the same.
            ticket: format!(
                "UPDATE {t} SET line_next = line_next + 1 WHERE lock_key = :key \
                 RETURNING line_next - 1"
            ),
            // Renew only our own live lease: token AND liveness in the WHERE, so a
            // stale token, an expired lease or a released row match nothing and
            // the caller sees 0 changed rows (NotHeld) with nothing changed.
            // `clock` is rewritten too, so the new `lease_end` is on the clock it
            // names (the holder wrote the row on this same clock).
            extend: format!(
                "UPDATE {t} \
                 SET expires_at = :wall_now + :ttl, clock = :clock, lease_end = :now + :ttl \
                 WHERE lock_key = :key AND token = :token AND {LIVE}"
            ),
            // End our own live lease by clearing its end; the row (and its fence)
            // stays for the next holder. Same WHERE as extend, for the same reason:
            // a second release, or one after expiry, changes nothing (NotHeld).
            // `freed_at`, on this process's clock (which `clock` then names):
            // the first ticket's turn starts now. `RETURNING line_next >
            // line_head`: whether someone is in line, so that only then are
            // other processes woken (wake.rs).
            release: format!(
                "UPDATE {t} SET expires_at = NULL, lease_end = NULL, freed_at = :now, \
                     clock = :clock \
                 WHERE lock_key = :key AND token = :token AND {LIVE} \
                 RETURNING line_next > line_head"
            ),
            // Read-only views; the state (held / expired / released) is decided in
            // Rust against the same clock reading as the other statements use.
            inspect: format!(
                "SELECT lock_key, owner, fence, acquired_at, expires_at, clock, lease_end \
                 FROM {t} WHERE lock_key = :key"
            ),
            // ORDER BY the primary key: BINARY collation compares bytes, which is
            // the order of Rust's `str`, so the list is sorted as `LockKey`s are.
            list: format!(
                "SELECT lock_key, owner, fence, acquired_at, expires_at, clock, lease_end \
                 FROM {t} ORDER BY lock_key"
            ),
        }
    }
}

/// The SQL texts of one table's lock statements, exactly as the backend sends
/// them, for tools that issue them without the backend (the benchmark's
/// raw-driver baseline). Not a stable API. Parameters are named (`:key`,
/// `:token`, `:owner`, `:ttl`, `:clock`, `:now`, `:wall_now`); see
/// [`LeaseClock`](crate::LeaseClock) for `:clock`, `:now` and `:wall_now`.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct LockSql {
    /// Try-acquire; returns the fence, or no row when refused.
    pub acquire: String,
    /// After a refused acquire: the holder's fence, clock and lease end (and
    /// the key's line, and the holder's token).
    pub holder: String,
    /// Extend; one changed row when renewed.
    pub extend: String,
    /// Release; one row (whether someone is in line) when released, none
    /// otherwise.
    pub release: String,
    /// The DDL of the table.
    pub create_table: String,
}

impl LockSql {
    /// The statements for `table`, which must have no schema part.
    pub fn for_table(table: &TableName) -> Self {
        let s = Statements::new(table);
        Self {
            acquire: s.acquire,
            holder: s.holder,
            extend: s.extend,
            release: s.release,
            create_table: s.create_table,
        }
    }
}

/// The DDL of the lock table.
///
/// - `IF NOT EXISTS`: creating is idempotent, and safe when several processes
///   start at once (each runs it under BEGIN IMMEDIATE).
/// - `lock_key TEXT PRIMARY KEY`: one row per key; SQLite's default BINARY
///   collation compares bytes, so keys are exact (case and trailing spaces
///   matter).
/// - `token TEXT`: the holding's UUID in its hyphenated form, readable with the
///   `sqlite3` shell.
/// - `acquired_at`, `expires_at`: wall-clock microseconds since the Unix epoch,
///   for people and `status` only; never compared to decide anything.
/// - `clock`, `lease_end`: the clock the lease is measured on (`boot:<boot id>`
///   for the monotonic clock of one boot of a Linux host, `wall` elsewhere) and
///   the lease's end on it, in microseconds; NULL once released.
/// - `freed_at`: when the last holding was released, on `clock`, in
///   microseconds; `line_next`, `line_head`: the line of waiters (tickets
///   below `line_next` were handed out; `line_head` is the first not yet
///   served when the key last became free).
/// - `STRICT`: SQLite refuses values of the wrong type instead of storing them
///   (a REAL fence could never compare correctly again).
/// - `WITHOUT ROWID`: the table is a B-tree on `lock_key`, so every statement
///   finds its row in one lookup.
pub(crate) fn create_table(table: &TableName) -> String {
    let t = table.quoted('"');
    format!(
        "CREATE TABLE IF NOT EXISTS {t} (\n\
         \x20   lock_key    TEXT    NOT NULL PRIMARY KEY,\n\
         \x20   token       TEXT    NOT NULL,\n\
         \x20   fence       INTEGER NOT NULL,\n\
         \x20   owner       TEXT    NOT NULL,\n\
         \x20   acquired_at INTEGER NOT NULL,\n\
         \x20   expires_at  INTEGER,\n\
         \x20   clock       TEXT    NOT NULL,\n\
         \x20   lease_end   INTEGER,\n\
         \x20   freed_at    INTEGER,\n\
         \x20   line_next   INTEGER NOT NULL DEFAULT 0,\n\
         \x20   line_head   INTEGER NOT NULL DEFAULT 0\n\
         ) STRICT, WITHOUT ROWID;\n"
    )
}

/// The line's columns, each with the `ALTER TABLE` that adds it to a table
/// made by an earlier version (`create_table` runs those whose column is
/// missing; SQLite has no `ADD COLUMN IF NOT EXISTS`).
pub(crate) fn line_columns(table: &TableName) -> Vec<(&'static str, String)> {
    let t = table.quoted('"');
    [
        ("freed_at", "INTEGER"),
        ("line_next", "INTEGER NOT NULL DEFAULT 0"),
        ("line_head", "INTEGER NOT NULL DEFAULT 0"),
    ]
    .into_iter()
    .map(|(name, ty)| (name, format!("ALTER TABLE {t} ADD COLUMN {name} {ty}")))
    .collect()
}

/// The names of a table's columns: param 1 the table's name, unquoted.
pub(crate) const COLUMNS: &str = "SELECT name FROM pragma_table_info(?1)";

/// Reads the file's journal mode. WAL is a property of the file: once one
/// process has switched it, the others only need to read it, which takes no
/// exclusive lock.
pub(crate) const JOURNAL_MODE: &str = "PRAGMA journal_mode";

/// Switches the file to WAL: readers (`status`) never block the writer and the
/// writer never blocks readers, so several processes use the file at once. WAL
/// needs memory shared between the processes, one reason the file must be on a
/// local filesystem. The switch needs an exclusive lock and SQLite may refuse it
/// at once (SQLITE_BUSY, no busy wait) while another process has the file open,
/// so the opener retries it within the busy timeout.
pub(crate) const SET_WAL: &str = "PRAGMA journal_mode = WAL";

/// Every commit is on disk before the call returns. With NORMAL, a power cut
/// could forget the last acquisitions, and the next holder would be handed a
/// fence that was already given out.
pub(crate) const SYNCHRONOUS_FULL: &str = "PRAGMA synchronous = FULL";
