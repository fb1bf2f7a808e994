//! Every SQL text the PostgreSQL backend sends, built once per table.
//!
//! Rules every statement here keeps:
//!
//! - **One clock.** Time comes only from `clock_timestamp()`, read once per statement
//!   in the `clock` CTE. `now()` would be frozen at the start of the caller's
//!   transaction (a lock taken late in a long transaction would get a short lease),
//!   and the client's clock is never sent.
//! - **No late effects.** Every mutating statement (acquire, extend, extend_many,
//!   release) takes a last parameter, the caller's `not_after` mapped onto the
//!   server's clock (whole µs since the epoch, rounded toward earlier by
//!   [`ServerClock::bound_micros`](distrlock_core::server_clock::ServerClock::bound_micros)),
//!   and every write in it requires `clock.at_us < bound`: a statement that reaches
//!   the server after its caller gave up (a frozen network path delivers it late,
//!   even after the client closed the socket) changes nothing. The comparison is of
//!   two integers, so no floating point, rounding or `TimeZone` enters it. A
//!   statement that read its clock before the bound and then waits for a row lock,
//!   or for its commit, still takes effect. A later acquire of the key waits for it
//!   (its WHERE matches the row version it sees, so it queues for the row's lock,
//!   or its insert meets the uncommitted one), so mutual exclusion holds; a later
//!   release of the same token does not (its WHERE is false on the previous
//!   holder's version, and an UPDATE never waits for an uncommitted insert), which
//!   is why the backend orders its own releases after its running acquires.
//! - **The reading goes back.** Every mutating statement returns its clock reading
//!   (`server_us`, integer µs since the epoch) in every case, granted or refused, so
//!   the backend learns the server's clock from each answer
//!   ([`ServerClock`](distrlock_core::server_clock::ServerClock)) and can report when
//!   a lease was granted or renewed.
//! - **No session settings leak in.** Durations are added as a whole number of
//!   microseconds (`$n * interval '1 microsecond'` has no day or month part, so
//!   `TimeZone` and daylight saving never change its length), and every time goes back
//!   to the client as integer microseconds (epoch or remaining), never as text, so
//!   `TimeZone`, `DateStyle` and `IntervalStyle` cannot change a result.
//! - **Values are bind parameters.** Only the validated, quoted table name and
//!   numbers computed here are formatted into the text; parameter types are fixed
//!   with explicit casts so every session prepares the same statement.
//! - **Named first.** Each statement starts with a comment naming it and its
//!   table (`/* distrlock acquire on "t" */`), so that `pg_stat_activity`, whose
//!   `query` is cut at `track_activity_query_size` (1 kB by default), and the
//!   server's logs show which lock statement a session runs, on which table.
//! - **One statement, one round trip.** Acquire, extend and release are each a single
//!   statement (CTEs where needed), so a pooled connection runs each with one
//!   Bind/Execute/Sync exchange once it has prepared it. The one allowance: a
//!   transaction-pooler mode may pipeline `BEGIN; SET LOCAL …`, the statement
//!   (unnamed: Parse/Bind/Describe/Execute/Sync) and `COMMIT` in one round trip,
//!   all sent before the first answer, since a pooled session may carry neither
//!   the settings nor a prepared statement from one transaction to the next.

use distrlock_core::TableName;
use tokio_postgres::types::Type;

/// The `clock` CTE every statement starts with: one reading of the server's clock,
/// as a `timestamptz` (`at`) and as integer µs since the epoch (`at_us`).
const CLOCK_CTE: &str = r#"-- One reading of the server's clock for the whole statement: clock_timestamp(),
-- not now(), which is frozen at the start of the caller's transaction. `at_us` is
-- the same instant in whole µs since the epoch (an instant, whatever TimeZone
-- says; EXTRACT gives an exact numeric from PostgreSQL 14 on, a double exact to
-- far below a µs before), computed once here: the bound is compared with it and
-- it is what goes back to the client.
clock AS MATERIALIZED (
    SELECT reading.at, (EXTRACT(EPOCH FROM reading.at) * 1000000)::int8 AS at_us
    FROM (SELECT clock_timestamp() AS at) AS reading
)"#;

/// One reading of the server's clock, in whole µs since the epoch, as the `clock`
/// CTE computes it: for a session that has sent no statement yet.
pub(crate) const CLOCK_READING: &str =
    "SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000000)::int8 AS server_us";

/// How the lock statements guard against a failover that lost commits: see
/// [`failover_ctes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failover {
    /// The max_ttl a new failover marker gets (whole µs): the longest ttl the
    /// table allows and the length of its quarantine after a promotion.
    pub(crate) max_ttl_us: i64,
    /// Whether a server on a new timeline grants nothing until the quarantine
    /// has passed.
    pub(crate) quarantine: bool,
}

impl Failover {
    /// What a config with every setting at its default uses.
    pub(crate) const DEFAULT: Failover = Failover {
        max_ttl_us: DEFAULT_MAX_TTL.as_micros() as i64,
        quarantine: true,
    };
}

/// The default max_ttl of a new table: the longest ttl it allows, and how long
/// it grants nothing after a promotion.
pub(crate) const DEFAULT_MAX_TTL: std::time::Duration = std::time::Duration::from_secs(5 * 60);

/// Raises `synchronous_commit` for the statement's own transaction, as a SQL
/// expression (see [`failover_ctes`]).
const DURABLE_COMMIT: &str = "CASE WHEN current_setting('synchronous_commit') IN ('off', 'local')
                THEN set_config('synchronous_commit', 'on', true) END";

/// This server's timeline, as a SQL `int8` expression: the first 8 hex digits of
/// the current WAL file's name.
const TIMELINE: &str =
    "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int8";

/// The quarantine after a promotion lasts the table's max_ttl plus this margin
/// (µs): the clock-rate allowance of 0.2 % (max_ttl / 500) is added to it, and
/// this covers a statement's own time on both servers.
const QUARANTINE_MARGIN_US: i64 = 1_000_000;

/// The CTEs that every statement granting time (acquire, extend, extend_many)
/// runs after `clock`, for durable commits and failover:
///
/// - `server`: raises `synchronous_commit` for this transaction and reads the
///   timeline.
/// - `marker`: the table's failover marker, read without a lock.
/// - `gate`: whether this statement may grant time (`quarantine_us` NULL and
///   not `unrecorded`) and the table's `max_ttl_us`.
///
/// A statement that finds its timeline newer than the marker's (`unrecorded`:
/// the first on a new timeline, or on a table without a marker) grants nothing;
/// the backend then runs [`Statements::record_timeline`], which starts the
/// quarantine, and the statement once more. That write stays out of the
/// statements themselves, which would otherwise set up an `INSERT … ON
/// CONFLICT` on every run for what happens once per promotion.
fn failover_ctes(t: &str, f: Failover) -> String {
    let durable = DURABLE_COMMIT;
    let timeline = TIMELINE;
    let default_max_ttl_us = f.max_ttl_us;
    let margin = QUARANTINE_MARGIN_US;
    let marker = marker_cte(t);
    let extra = format!(
        "GREATEST(0, {default_max_ttl_us} - COALESCE(marker.max_ttl_us, 0)) * 501 / 500 \
         + COALESCE(marker.max_ttl_us, 0) / 500 + {margin}"
    );
    let quarantine = if f.quarantine {
        format!(
            r#"CASE
            -- Promoted, and not yet recorded (`unrecorded`): the first statement
            -- on a new timeline, or on a table without a marker past the first
            -- timeline. Recording it starts the quarantine.
            WHEN server.timeline <> COALESCE(marker.timeline, 1)
                THEN GREATEST(COALESCE(marker.max_ttl_us, 0), {default_max_ttl_us}) * 501 / 500
                     + {margin}
            -- Within the quarantine that began on this timeline. It lasts the
            -- longer of the table's max_ttl and this client's: a raise of the
            -- table's that a failover lost still counts.
            WHEN marker.until_us + quarantine.extra_us > clock.at_us
                THEN marker.until_us + quarantine.extra_us - clock.at_us
        END"#
        )
    } else {
        "NULL::int8".to_owned()
    };
    format!(
        r#"-- Durable commits: synchronous_commit 'off' and 'local' become 'on' for this
-- statement's transaction only (set_config(…, true)); it is read at commit, so
-- setting it here is in time. 'on' flushes the commit before the lock is
-- reported, and with synchronous_standby_names waits for the standby too;
-- stronger levels ('remote_write', 'on', 'remote_apply') are kept, never
-- lowered. The timeline: the first 8 hex digits of the current WAL file's
-- name, which grow at every promotion and need no privilege
-- (pg_current_wal_lsn() fails on a standby, where nothing can be written).
server AS MATERIALIZED (
    SELECT {durable} AS synchronous_commit,
           {timeline} AS timeline
),
{marker},
-- Whether this statement may grant time: not while a quarantine runs
-- (`quarantine_us`, the µs it has left: max_ttl, plus 0.2 % for the two
-- servers' clock rates, plus a margin), not on a timeline the marker has not
-- recorded (`unrecorded`: a promotion, or a timeline that went back), and no
-- ttl above the table's max_ttl.
gate AS MATERIALIZED (
    SELECT {quarantine} AS quarantine_us,
        server.timeline <> COALESCE(marker.timeline, 0) AS unrecorded,
        COALESCE(marker.max_ttl_us, {default_max_ttl_us}) AS max_ttl_us,
        -- Fences are at least this (see `marker`).
        COALESCE(marker.epoch, 0) << 40 AS fence_floor
    FROM clock
    CROSS JOIN server
    LEFT JOIN marker ON true
    CROSS JOIN LATERAL (SELECT {extra} AS extra_us) AS quarantine
)"#
    )
}

/// The `marker` CTE: the table's failover marker, the row of the empty key.
fn marker_cte(t: &str) -> String {
    format!(
        r#"-- The failover marker: the row of the empty key, which no lock can have.
-- `fence` packs two numbers: the server timeline it last saw (low 32 bits) and
-- the fence epoch (the rest): fences are at least epoch * 2^40. The epoch grows
-- at every change of timeline that the marker records, by as much as the
-- timeline grew, and by one when the timeline went back (pg_upgrade and
-- pg_resetwal start a cluster on timeline 1 again), so it never goes back.
-- `expires_at - acquired_at` is the table's max_ttl (the longest ttl a lock may
-- have); a quarantine that began at `acquired_at` ends at `expires_at` (plus
-- margin). With no quarantine, acquired_at is the epoch. A plain read: it takes
-- no lock.
marker AS MATERIALIZED (
    SELECT m.fence & 4294967295 AS timeline,
           m.fence >> 32 AS epoch,
           (EXTRACT(EPOCH FROM m.expires_at) * 1000000)::int8 AS until_us,
           (EXTRACT(EPOCH FROM (m.expires_at - m.acquired_at)) * 1000000)::int8 AS max_ttl_us
    FROM {t} AS m
    WHERE m.lock_key = ''
)"#
    )
}

/// One turn of the line of waiters, in µs ([`distrlock_core::line::TURN`]).
const TURN_US: i64 = distrlock_core::line::TURN.as_micros() as i64;

/// The ticket served at `clock.at` on the lock row `{l}`
/// ([`distrlock_core::line::serving`]): while a lease is live, the line's head;
/// once the key is free (released at `released_at`, or expired at
/// `expires_at`), one more ticket per whole turn since. A row released before
/// the line existed has neither instant: its line is empty (`line_next`).
/// The line is empty when this is at or past `line_next`. A clock that went
/// back counts as no time since (never a ticket before the head).
fn serving(l: &str) -> String {
    format!(
        "CASE WHEN {l}.expires_at > clock.at THEN {l}.line_head
              ELSE COALESCE({l}.line_head
                            + GREATEST(0, clock.at_us
                                          - (EXTRACT(EPOCH FROM COALESCE({l}.expires_at, {l}.released_at))
                                             * 1000000)::int8) / {TURN_US},
                            {l}.line_next) END"
    )
}

/// Whether the acquire statement hands the caller a new ticket on the lock
/// row `{l}`: a waiter (`$5` not plain) whose ticket `$6` is not in the line
/// (none, one whose turn passed, one from before the row was re-created),
/// refused: the key is live and another token's, or free in another ticket's
/// turn and the caller is fair. `taken` needs the opposite, so the two never
/// both match.
fn needs_ticket(l: &str) -> String {
    let serving = serving(l);
    format!(
        "($5::int8 <> {MODE_PLAIN}
          AND ($6::int8 IS NULL OR $6::int8 < {serving} OR $6::int8 >= {l}.line_next)
          AND (({l}.expires_at > clock.at AND {l}.token <> $2::uuid)
               OR (({l}.expires_at IS NULL OR {l}.expires_at <= clock.at)
                   AND {serving} < {l}.line_next AND $5::int8 = {MODE_FAIR})))"
    )
}

/// The SQL of one lock table.
#[derive(Debug, Clone)]
pub(crate) struct Statements {
    /// `CREATE TABLE IF NOT EXISTS …` and the failover marker's `INSERT`, as
    /// [`schema_sql`](crate::PostgresBackend) returns them.
    pub(crate) create_table: String,
    /// Serialises concurrent `create_table` calls, then runs `create_table`; one
    /// simple-query message, so both run in one implicit transaction.
    pub(crate) create_table_locked: String,
    /// Try-acquire: params `$1` key, `$2` token, `$3` ttl µs, `$4` owner, `$5`
    /// the caller's mode ([`MODE_PLAIN`], [`MODE_FAIR`], [`MODE_UNFAIR`]), `$6`
    /// its ticket (NULL for none), `$7` not-after bound µs; one row `(fence,
    /// remaining_us, ticket, ahead, ticket_skipped, server_us, quarantine_us,
    /// max_ttl_us)`, a
    /// NULL fence when refused (held, or not this caller's turn; late:
    /// `server_us >= $7`; in a failover quarantine: `quarantine_us` not NULL;
    /// too long: `$3 > max_ttl_us`).
    pub(crate) acquire: String,
    /// [`acquire`](Self::acquire) for a caller's own transaction: a refusal's
    /// commit keeps the caller's level (raised to 'on' at least), where the
    /// backend's own transaction does not wait for a refusal's flush.
    pub(crate) acquire_in: String,
    /// Extend: params `$1` key, `$2` token, `$3` ttl µs, `$4` not-after bound µs;
    /// one row `(renewed, server_us, quarantine_us, max_ttl_us)`, read as for
    /// `acquire`.
    pub(crate) extend: String,
    /// Extend a batch: params `$1` keys, `$2` tokens (same length), `$3` ttl µs,
    /// `$4` not-after bound µs; rows `(lock_key, token, busy, server_us,
    /// quarantine_us, max_ttl_us)`: one per
    /// lease it renewed (`busy` false) or one row with NULL key and token when it
    /// renewed none, then one per lease whose row another transaction held
    /// locked (`busy` true: not renewed, outcome unknown).
    pub(crate) extend_many: String,
    /// Release: params `$1` key, `$2` token, `$3` notification channel, `$4`
    /// not-after bound µs; one row `(released, server_us)`.
    pub(crate) release: String,
    /// Records this server's timeline in the failover marker, when it is newer
    /// than the marker's (a promotion), which starts the quarantine; on a table
    /// without a marker, writes one (on the first timeline with no quarantine).
    /// Param `$1` not-after bound µs; one row `(server_us)`. Run when a lock
    /// statement answered `unrecorded`.
    pub(crate) record_timeline: String,
    /// Inspect one key: param `$1` key.
    pub(crate) inspect: String,
    /// List every key.
    pub(crate) list: String,
    /// The `LISTEN` command of the release channel.
    pub(crate) listen: String,
    /// The channel releases are announced on (`pg_notify` payload: the key).
    pub(crate) channel: String,
}

/// Parameter types of [`Statements::acquire`].
pub(crate) const ACQUIRE_TYPES: &[Type] = &[
    Type::TEXT,
    Type::UUID,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
];
/// `$5` of [`Statements::acquire`]: a plain try, which waits for nothing; it
/// takes no ticket and keeps to the line (refused in a waiter's turn).
pub(crate) const MODE_PLAIN: i64 = 0;
/// `$5` of [`Statements::acquire`]: a fair waiter; refused, it takes a ticket,
/// and it takes a free key only in its ticket's turn (or with no line).
pub(crate) const MODE_FAIR: i64 = 1;
/// `$5` of [`Statements::acquire`]: an unfair waiter; refused, it takes a
/// ticket (so that the release notifies), and it takes a free key whenever.
pub(crate) const MODE_UNFAIR: i64 = 2;
/// Parameter types of [`Statements::extend`].
pub(crate) const EXTEND_TYPES: &[Type] = &[Type::TEXT, Type::UUID, Type::INT8, Type::INT8];
/// Parameter types of [`Statements::extend_many`].
pub(crate) const EXTEND_MANY_TYPES: &[Type] =
    &[Type::TEXT_ARRAY, Type::UUID_ARRAY, Type::INT8, Type::INT8];
/// Parameter types of [`Statements::release`].
pub(crate) const RELEASE_TYPES: &[Type] = &[Type::TEXT, Type::UUID, Type::TEXT, Type::INT8];
/// Parameter types of [`Statements::record_timeline`].
pub(crate) const RECORD_TIMELINE_TYPES: &[Type] = &[Type::INT8];
/// Parameter types of [`Statements::inspect`].
pub(crate) const INSPECT_TYPES: &[Type] = &[Type::TEXT];

impl Statements {
    pub(crate) fn new(table: &TableName, failover: Failover) -> Self {
        let t = table.quoted('"');
        let channel = channel_name(table);

        let create_table = format!(
            r#"CREATE TABLE IF NOT EXISTS {t} (
    -- The lock's name. COLLATE "C" compares and sorts byte for byte, so 'a', 'A'
    -- and 'a ' are three locks whatever the database's default collation.
    lock_key    text COLLATE "C" PRIMARY KEY,
    -- The current holding's secret; only it may extend or release.
    token       uuid        NOT NULL,
    -- Raised by one on every change of holder, and on timeline N (after N - 1
    -- promotions) to at least (N - 1) * 2^40; rows are never deleted, so it
    -- never goes back, even when a failover lost commits.
    fence       bigint      NOT NULL,
    -- Free text naming the holder (host:pid by default).
    owner       text        NOT NULL,
    -- timestamptz: an instant, not a wall-clock reading.
    acquired_at timestamptz NOT NULL,
    -- NULL once released.
    expires_at  timestamptz NULL,
    -- When the last holding was released (expires_at is then NULL): the line's
    -- first turn starts then.
    released_at timestamptz NULL,
    -- The line of waiters: tickets below line_next have been handed out, and
    -- line_head is the first one not yet served when the key last became
    -- free. While free, ticket line_head + i alone may take the key in the
    -- i-th turn ({turn_us} µs each) after it became free.
    line_next   bigint      NOT NULL DEFAULT 0,
    line_head   bigint      NOT NULL DEFAULT 0
);
-- A table made by an earlier version has no line: add its columns. Only when
-- missing, since ALTER TABLE takes the table's strongest lock even when it
-- changes nothing. (Constant defaults add columns without rewriting the
-- table.) A `waiting` column of the version before is left alone.
DO $distrlock$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute
                   WHERE attrelid = '{t}'::regclass AND attname = 'line_head'
                     AND NOT attisdropped) THEN
        ALTER TABLE {t} ADD COLUMN IF NOT EXISTS released_at timestamptz NULL,
                        ADD COLUMN IF NOT EXISTS line_next bigint NOT NULL DEFAULT 0,
                        ADD COLUMN IF NOT EXISTS line_head bigint NOT NULL DEFAULT 0;
    END IF;
END $distrlock$;
-- The failover marker (the empty key, which no lock can have): the timeline
-- the table last saw and the fence epoch, packed in fence (epoch * 2^32 +
-- timeline; the epoch starts at timeline - 1), and its max_ttl, the longest
-- ttl a lock may have (expires_at - acquired_at). A promotion starts a
-- quarantine of max_ttl in it, in which no lock is granted or extended.
-- Created with the table, in the same transaction. On a table that has one, a
-- longer max_ttl raises it (a shorter one is never set here: leases that long
-- may be live): after a quarantine has ended, the marker starts again at the
-- epoch; in one, the quarantine is made as long as the new max_ttl.
INSERT INTO {t} AS m (lock_key, token, fence, owner, acquired_at, expires_at)
SELECT '', '00000000-0000-0000-0000-000000000000'::uuid,
       ((server.timeline - 1) << 32) | server.timeline,
       'distrlock failover marker', timestamptz 'epoch',
       timestamptz 'epoch' + {max_ttl_us}::int8 * interval '1 microsecond'
FROM (SELECT {timeline} AS timeline) AS server
ON CONFLICT (lock_key) DO UPDATE
    SET acquired_at = CASE WHEN clock_timestamp() > m.expires_at
                                + (m.expires_at - m.acquired_at) / 500
                                + interval '{margin_us} microseconds'
                           THEN timestamptz 'epoch' ELSE m.acquired_at END,
        expires_at = CASE WHEN clock_timestamp() > m.expires_at
                               + (m.expires_at - m.acquired_at) / 500
                               + interval '{margin_us} microseconds'
                          THEN timestamptz 'epoch' ELSE m.acquired_at END
                     + (EXCLUDED.expires_at - EXCLUDED.acquired_at)
    WHERE m.expires_at - m.acquired_at < EXCLUDED.expires_at - EXCLUDED.acquired_at"#,
            margin_us = QUARANTINE_MARGIN_US,
            timeline = TIMELINE,
            max_ttl_us = failover.max_ttl_us,
            turn_us = TURN_US,
        );

        // pg_advisory_xact_lock makes concurrent CREATE TABLE IF NOT EXISTS safe: two
        // sessions that both pass the IF NOT EXISTS check would otherwise race on the
        // catalog and one would fail with a unique violation. The lock id is a stable
        // hash of the table name; both statements share the message's implicit
        // transaction, which releases the lock (or rolls back) at its end.
        let lock_id = fnv1a64(format!("distrlock:create:{table}").as_bytes()) as i64;
        let create_table_locked =
            format!("SELECT pg_advisory_xact_lock({lock_id});\n{create_table}");

        let clock = CLOCK_CTE;
        let acquire_failover = failover_ctes(&t, failover);
        let serving_l = serving("l");
        let (needs_ticket_l, needs_ticket_w) = (needs_ticket("l"), needs_ticket("w"));
        let acquire = format!(
            r#"/* distrlock acquire on {t} */
WITH
{clock},
{acquire_failover},
-- Present and free (released or expired), or held by this same token: take it or
-- renew it. A held row fails the WHERE clause before it is locked, so a refused
-- try writes nothing and takes no row lock (unlike INSERT … ON CONFLICT DO UPDATE
-- … WHERE false, which locks the conflicting row and costs a WAL flush per try).
taken AS (
    UPDATE {t} AS l SET
        -- Same token on a live lease keeps the fence (an idempotent retry), if
        -- it is of the current fence epoch; any other takeover raises it by one,
        -- and to at least the epoch's floor, so fences only grow, even past
        -- commits a failover lost.
        fence = CASE WHEN l.token = $2::uuid AND l.expires_at > clock.at
                          AND l.fence >= gate.fence_floor
                     THEN l.fence
                     ELSE GREATEST(l.fence + 1, gate.fence_floor) END,
        acquired_at = CASE WHEN l.token = $2::uuid AND l.expires_at > clock.at
                                AND l.fence >= gate.fence_floor
                           THEN l.acquired_at ELSE clock.at END,
        token = $2::uuid,
        owner = $4::text,
        -- Whole microseconds: no day part, so TimeZone cannot change the length.
        expires_at = clock.at + $3::int8 * interval '1 microsecond',
        -- The line moves on: past every ticket if it was empty; past the
        -- caller's ticket if it is in line (served in turn, or an unfair waiter
        -- out of turn: the tickets before it go too, so that unfair grants
        -- leave no turns behind); else (an unfair waiter without one) up to the
        -- ticket served now, which keeps its place for the next release. A
        -- retry of the same live holding leaves it.
        line_head = CASE WHEN l.token = $2::uuid AND l.expires_at > clock.at THEN l.line_head
                         WHEN {serving_l} >= l.line_next THEN l.line_next
                         WHEN $6::int8 >= {serving_l} AND $6::int8 < l.line_next
                         THEN $6::int8 + 1
                         ELSE {serving_l} END
    FROM clock, gate
    WHERE l.lock_key = $1::text
      AND (l.expires_at IS NULL OR l.expires_at <= clock.at OR l.token = $2::uuid)
      -- Fair order: the same live holding; else the line is empty, or this is
      -- the turn of the caller's ticket, or the caller is an unfair waiter.
      AND ((l.token = $2::uuid AND l.expires_at > clock.at)
           OR {serving_l} >= l.line_next
           OR {serving_l} = $6::int8
           OR $5::int8 = {MODE_UNFAIR})
      -- Not in a failover quarantine (nor on a timeline the marker has not
      -- recorded), and no longer than the table allows.
      AND gate.quarantine_us IS NULL AND NOT gate.unrecorded
      AND $3::int8 <= gate.max_ttl_us
      -- No late effects: only before the caller's bound on the server's clock.
      AND clock.at_us < $7::int8
    RETURNING l.fence
),
-- Absent: insert the first holding with fence 1 (or the epoch's floor), with
-- an empty line. The NOT EXISTS probe keeps the present-row paths from even
-- attempting an insert; ON CONFLICT DO NOTHING settles a race with a
-- concurrent first acquirer without an error (the loser gets no row and
-- reports the lock as held).
inserted AS (
    INSERT INTO {t} AS l (lock_key, token, fence, owner, acquired_at, expires_at)
    SELECT $1::text, $2::uuid, GREATEST(1, gate.fence_floor), $4::text,
           clock.at, clock.at + $3::int8 * interval '1 microsecond'
    FROM clock, gate
    WHERE NOT EXISTS (SELECT 1 FROM {t} WHERE lock_key = $1::text)
      -- Not in a failover quarantine (nor on a timeline the marker has not
      -- recorded), and no longer than the table allows.
      AND gate.quarantine_us IS NULL AND NOT gate.unrecorded
      AND $3::int8 <= gate.max_ttl_us
      -- No late effects: only before the caller's bound on the server's clock.
      AND clock.at_us < $7::int8
    ON CONFLICT (lock_key) DO NOTHING
    RETURNING l.fence
),
-- A refused waiter whose ticket is not in the line gets the next ticket
-- (see needs_ticket in the source). Never waiting for the row's lock: a row
-- another transaction has locked (the holder's extend or release under way)
-- gets no ticket now, and the waiter asks again at its next try. The ticket
-- changes no lease (expiry, token and fence are untouched).
ticketed AS (
    UPDATE {t} AS l SET line_next = l.line_next + 1
    FROM clock, gate
    WHERE l.lock_key = (SELECT w.lock_key FROM {t} AS w
                        WHERE w.lock_key = $1::text AND {needs_ticket_w}
                        FOR UPDATE OF w SKIP LOCKED)
      -- The subquery's conditions again, on the row version this UPDATE
      -- writes (the one the subquery locked and checked). They are in the
      -- subquery too so that a waiter that keeps its ticket does not even
      -- lock the row (a row lock is a write, and would hold up the holder).
      AND {needs_ticket_l}
      -- Writes nothing in a failover quarantine either (the holding may be
      -- one the old primary granted), nor for a ttl the table refuses.
      AND gate.quarantine_us IS NULL AND NOT gate.unrecorded
      AND $3::int8 <= gate.max_ttl_us
      -- No late effects: only before the caller's bound on the server's clock.
      AND clock.at_us < $7::int8
    RETURNING l.line_next - 1 AS ticket
)
-- Exactly one row whatever happened (granted, refused, refused as late, key
-- absent, insert race lost), so the clock reading always comes back: `clock` has one row and each join
-- adds at most one (taken, inserted and ticketed touch at most the one row of
-- the primary key). The table read here is the one before the CTEs' writes
-- (the main query of a data-modifying CTE does not see its changes), which is
-- what a refusal reports.
SELECT
    -- Success: the fence of this holding; NULL when refused (held, or late: then
    -- server_us is at or past the bound).
    COALESCE(taken.fence, inserted.fence) AS fence,
    -- Refused: the holder's remaining lease in µs, on the server's clock; or,
    -- refused on a free key in another ticket's turn, what is left of that
    -- turn. NULL when there is nothing to report: the row was free but another
    -- acquirer took it first, or the key had no row and another first
    -- acquirer inserted it.
    CASE WHEN taken.fence IS NOT NULL OR inserted.fence IS NOT NULL THEN NULL
         WHEN l.expires_at > clock.at
         THEN (EXTRACT(EPOCH FROM (l.expires_at - clock.at)) * 1000000)::int8
         WHEN {serving_l} < l.line_next
         THEN GREATEST(0, (EXTRACT(EPOCH FROM COALESCE(l.expires_at, l.released_at)) * 1000000)::int8
                          + ({serving_l} - l.line_head + 1) * {TURN_US} - clock.at_us)
    END AS remaining_us,
    -- Refused: the caller's ticket, new or the one it brought (if still in
    -- line).
    CASE WHEN taken.fence IS NULL AND inserted.fence IS NULL THEN
         COALESCE(ticketed.ticket,
                  CASE WHEN $5::int8 <> {MODE_PLAIN} AND $6::int8 >= {serving_l}
                            AND $6::int8 < l.line_next THEN $6::int8 END)
    END AS ticket,
    -- Releases before its turn: the tickets before it, less one whose turn
    -- runs now on the free key (that one takes it without a release).
    CASE WHEN taken.fence IS NULL AND inserted.fence IS NULL THEN
         GREATEST(0, COALESCE(ticketed.ticket,
                              CASE WHEN $5::int8 <> {MODE_PLAIN} AND $6::int8 >= {serving_l}
                                        AND $6::int8 < l.line_next THEN $6::int8 END)
                     - {serving_l}
                     - CASE WHEN COALESCE(l.expires_at <= clock.at, true)
                                 AND {serving_l} < l.line_next THEN 1 ELSE 0 END)
    END AS ahead,
    -- Refused, needing a ticket, and none handed out: the row was locked by
    -- another transaction (the caller asks again at once).
    COALESCE(taken.fence IS NULL AND inserted.fence IS NULL AND ticketed.ticket IS NULL
             AND {needs_ticket_l}, false) AS ticket_skipped,
    -- The statement's clock reading: when the lease was granted (it ends ttl later).
    clock.at_us AS server_us,
    -- Refused for a failover quarantine: the µs it has left; else NULL.
    gate.quarantine_us,
    -- Refused until the marker records this timeline (see record_timeline).
    gate.unrecorded,
    -- The table's max_ttl: a ttl above it is refused.
    gate.max_ttl_us{{lazy_refusal}}
FROM clock
LEFT JOIN gate ON true
LEFT JOIN taken ON true
LEFT JOIN inserted ON true
LEFT JOIN ticketed ON true
LEFT JOIN {t} AS l ON l.lock_key = $1::text"#
        );
        // In the backend's own transaction (not a caller's), a refusal commits
        // without waiting for its flush: it wrote at most the caller's ticket,
        // which a crash may lose at no cost to safety (a waiter whose ticket
        // is lost waits one more turn, or shares a number with a later one; a
        // grant still needs a free row). Evaluated in the main query, after
        // `server` raised the level for a grant, so that it wins for a
        // refusal only. A grant is flushed ('on' or stronger) before it is
        // reported, as before.
        let acquire_in = acquire.replace("{lazy_refusal}", "");
        let acquire = acquire.replace(
            "{lazy_refusal}",
            ",\n    -- A refusal's commit is not waited for (see the backend).\n    \
             CASE WHEN taken.fence IS NULL AND inserted.fence IS NULL\n              \
             THEN set_config('synchronous_commit', 'off', true) END AS lazy_commit",
        );

        let extend_failover = failover_ctes(&t, failover);
        let extend = format!(
            r#"/* distrlock extend on {t} */
WITH
{clock},
{extend_failover},
-- Only the token of a live lease: a stale token updates nothing (NotHeld) and
-- writes nothing. The new expiry counts from the server's clock now.
renewed AS (
    UPDATE {t} AS l
    SET expires_at = clock.at + $3::int8 * interval '1 microsecond'
    FROM clock, gate
    WHERE l.lock_key = $1::text
      AND l.token = $2::uuid
      AND l.expires_at > clock.at
      -- Not in a failover quarantine (nor on a timeline the marker has not
      -- recorded), and no longer than the table allows.
      AND gate.quarantine_us IS NULL AND NOT gate.unrecorded
      AND $3::int8 <= gate.max_ttl_us
      -- No late effects: only before the caller's bound on the server's clock.
      AND clock.at_us < $4::int8
    RETURNING l.fence
)
-- One row whatever happened, so the clock reading always comes back (renewed has
-- at most the one row of the primary key).
SELECT renewed.fence IS NOT NULL AS renewed,
       -- When the lease was renewed: it now ends ttl after this.
       clock.at_us AS server_us,
       -- Not renewed for a failover quarantine, or a ttl above max_ttl.
       gate.quarantine_us,
       gate.unrecorded,
       gate.max_ttl_us
FROM clock
LEFT JOIN gate ON true
LEFT JOIN renewed ON true"#
        );

        let extend_many = format!(
            r#"/* distrlock extend_many on {t} */
WITH
{clock},
{extend_failover},
-- The same guard as the single extend, for every (key, token) pair of the two
-- arrays at once: one statement, one round trip, one commit for the batch, and
-- one clock reading for all of it. Each lease is renewed only if its token holds
-- it live; the others update nothing and are missing from RETURNING (NotHeld).
-- COLLATE "C": the column's collation, so the join uses the primary key's index.
batch AS (
    SELECT * FROM unnest($1::text[], $2::uuid[]) AS b(lock_key, token)
),
-- The rows to renew, locked here first, skipping any row that another
-- transaction holds locked (a refused try_acquire_in, a hand-written SELECT …
-- FOR UPDATE): one busy row must not make the whole batch wait and fail, which
-- would put every lease of the manager at risk. A skipped lease is reported as
-- busy below, and the manager retries it on its own.
lockable AS (
    SELECT l.lock_key
    FROM {t} AS l
    JOIN batch ON l.lock_key = batch.lock_key COLLATE "C" AND l.token = batch.token
    FOR UPDATE OF l SKIP LOCKED
),
-- A pair listed twice updates its row once (PostgreSQL joins each target row to
-- one source row) and is returned once. Only rows locked above are updated, so
-- this never waits.
renewed AS (
    UPDATE {t} AS l
    SET expires_at = clock.at + $3::int8 * interval '1 microsecond'
    FROM clock, gate, batch
    WHERE l.lock_key = batch.lock_key COLLATE "C"
      AND l.token = batch.token
      AND l.lock_key IN (SELECT lock_key FROM lockable)
      AND l.expires_at > clock.at
      -- Not in a failover quarantine (nor on a timeline the marker has not
      -- recorded), and no longer than the table allows.
      AND gate.quarantine_us IS NULL AND NOT gate.unrecorded
      AND $3::int8 <= gate.max_ttl_us
      -- No late effects: only before the caller's bound on the server's clock.
      AND clock.at_us < $4::int8
    RETURNING l.lock_key, l.token
),
-- Busy: the token's row exists but another transaction holds it locked, so the
-- lease was neither renewed nor found gone; the outcome is unknown.
busy AS (
    SELECT batch.lock_key, batch.token
    FROM batch
    WHERE NOT EXISTS (SELECT 1 FROM lockable WHERE lockable.lock_key = batch.lock_key COLLATE "C")
      AND EXISTS (
          SELECT 1 FROM {t} AS l
          WHERE l.lock_key = batch.lock_key COLLATE "C" AND l.token = batch.token
      )
)
-- One row per renewed lease, or a single row with NULL key and token when none
-- was renewed: the clock reading always comes back. Then the busy leases (or a
-- row of NULLs when none was busy).
SELECT renewed.lock_key, renewed.token, false AS busy,
       -- When the leases were renewed: each now ends ttl after this.
       clock.at_us AS server_us,
       -- None renewed for a failover quarantine, or a ttl above max_ttl.
       gate.quarantine_us,
       gate.unrecorded,
       gate.max_ttl_us
FROM clock
LEFT JOIN gate ON true
LEFT JOIN renewed ON true
UNION ALL
SELECT busy.lock_key, busy.token, true, clock.at_us, gate.quarantine_us, gate.unrecorded,
       gate.max_ttl_us
FROM clock
LEFT JOIN gate ON true
LEFT JOIN busy ON true"#
        );

        let marker = marker_cte(&t);
        let timeline = TIMELINE;
        let durable = DURABLE_COMMIT;
        let default_max_ttl_us = failover.max_ttl_us;
        let record_timeline = format!(
            r#"/* distrlock record_timeline on {t} */
WITH
{clock},
{marker}
-- A promotion: the first statement on a new timeline (or one that went back)
-- records it, which starts the quarantine: leases granted on the old timeline
-- may have been lost with their commits, and may still be live for up to
-- max_ttl from the promotion (the old primary must have stopped writing by
-- then). It also raises the fence epoch (see `marker`). A table without a
-- marker gets one here, with no quarantine on the first timeline (no promotion
-- can have happened). The SELECT has no row when the marker is current, so ON
-- CONFLICT never meets the marker then; two sessions that both record wait
-- their turn on its row, and the second updates nothing.
INSERT INTO {t} AS m (lock_key, token, fence, owner, acquired_at, expires_at)
SELECT '', '00000000-0000-0000-0000-000000000000'::uuid,
       (CASE WHEN marker.timeline IS NULL THEN server.timeline - 1
             WHEN server.timeline > marker.timeline
                 THEN marker.epoch + (server.timeline - marker.timeline)
             ELSE marker.epoch + 1 END << 32) | server.timeline,
       'distrlock failover marker', start.at,
       start.at + COALESCE(marker.max_ttl_us, {default_max_ttl_us}) * interval '1 microsecond'
FROM clock
-- Durable, as every lock write (see `server` in the lock statements).
CROSS JOIN (SELECT {timeline} AS timeline, {durable} AS synchronous_commit) AS server
LEFT JOIN marker ON true
CROSS JOIN LATERAL (
    SELECT CASE WHEN marker.timeline IS NULL AND server.timeline = 1
                THEN timestamptz 'epoch' ELSE clock.at END AS at
) AS start
WHERE server.timeline <> COALESCE(marker.timeline, 0)
  -- No late effects: only before the caller's bound on the server's clock.
  AND clock.at_us < $1::int8
ON CONFLICT (lock_key) DO UPDATE
    SET fence = EXCLUDED.fence,
        acquired_at = EXCLUDED.acquired_at,
        expires_at = EXCLUDED.expires_at
    WHERE m.fence <> EXCLUDED.fence"#
        );

        let release = format!(
            r#"/* distrlock release on {t} */
WITH
{clock},
{{commit}}
-- Only the token of a live lease. The row is kept (expires_at NULL) so the next
-- holder's fence continues from this one.
released AS (
    UPDATE {t} AS l SET expires_at = NULL,
                        -- The first ticket's turn starts now.
                        released_at = clock.at
    FROM clock, durable
    WHERE l.lock_key = $1::text
      AND l.token = $2::uuid
      AND l.expires_at > clock.at
      -- No late effects: a release held back in the network must not end a later
      -- holding of the same token.
      AND clock.at_us < $4::int8
    -- Wakes waiters in every process LISTENing on the channel, in this same
    -- statement (no extra round trip); PostgreSQL delivers it at commit, so a
    -- release inside the caller's transaction announces only once committed.
    -- Only when someone is in line (tickets handed out since the line's head):
    -- a notifying transaction holds the database's notification queue lock
    -- until its commit is flushed, so notifying every release would make
    -- releases commit one at a time.
    RETURNING CASE WHEN l.line_next > l.line_head THEN pg_notify($3::text, l.lock_key) END
)
-- One row whatever happened, so the clock reading always comes back. The table
-- read here is the one before `released` (the main query does not see the CTE's
-- change), so a match below means released by an earlier statement.
SELECT
    -- true: released now. false: this token's holding was already released (a
    -- retry after a lost answer can tell "my first try went through" from "never
    -- held"). NULL: not held.
    CASE WHEN EXISTS (SELECT 1 FROM released) THEN true
         WHEN l.lock_key IS NOT NULL THEN false
    END AS released,
    clock.at_us AS server_us
FROM clock
LEFT JOIN {t} AS l
       ON l.lock_key = $1::text
      AND l.token = $2::uuid
      AND l.expires_at IS NULL"#
        );
        // Durable, like a grant: 'off' and 'local' become 'on', never
        // lowered. A release whose commit a crash lost would leave the lease
        // live, and a holder with a static token asking again would then be
        // granted it again at the same fence: fences must not repeat, so the
        // release is flushed before it is reported. (In a caller's
        // transaction the caller's own writes share the commit.)
        let release = release.replace(
            "{commit}",
            &format!(
                "-- Durable commits, as for acquire: 'off' and 'local' become 'on' for this\n\
                 -- transaction only, stronger levels are kept.\n\
                 durable AS MATERIALIZED (\n    SELECT {durable} AS synchronous_commit\n),"
            ),
        );

        // Times leave as integer microseconds since the epoch: timestamptz's epoch is
        // an instant, independent of TimeZone and DateStyle. `held` and `remaining_us`
        // use the same clock reading.
        let columns = r#"l.lock_key, l.owner, l.fence,
       (EXTRACT(EPOCH FROM l.acquired_at) * 1000000)::int8 AS acquired_us,
       (EXTRACT(EPOCH FROM l.expires_at) * 1000000)::int8 AS expires_us,
       COALESCE(l.expires_at > clock.at, false) AS held,
       CASE WHEN l.expires_at > clock.at
            THEN (EXTRACT(EPOCH FROM (l.expires_at - clock.at)) * 1000000)::int8
       END AS remaining_us"#;
        let inspect = format!(
            "/* distrlock inspect on {t} */\nWITH\n{clock}\nSELECT {columns}\nFROM {t} AS l, clock\nWHERE l.lock_key = $1::text"
        );
        // COLLATE "C": byte order, as LockKey's Ord, even on a table created by
        // hand with another collation.
        // The failover marker (the empty key) is no lock: never listed.
        let list = format!(
            "/* distrlock list on {t} */\nWITH\n{clock}\nSELECT {columns}\nFROM {t} AS l, clock\nWHERE l.lock_key <> ''\n\
             ORDER BY l.lock_key COLLATE \"C\""
        );

        // The channel holds only [A-Za-z0-9_.:], so quoting it is safe; quoted, its
        // case is kept, matching pg_notify's exact string.
        let listen = format!("LISTEN \"{channel}\"");

        Self {
            create_table,
            create_table_locked,
            acquire,
            acquire_in,
            extend,
            extend_many,
            release,
            record_timeline,
            inspect,
            list,
            listen,
            channel,
        }
    }
}

/// The answers of the statements above, decoded from their rows: the column
/// names and types are read only here, next to the SQL that makes them.
pub(crate) mod answer {
    use tokio_postgres::{Error, Row};

    /// Every lock statement's clock reading (`server_us`, µs since the epoch).
    pub(crate) fn server_us(row: &Row) -> Result<i64, Error> {
        row.try_get("server_us")
    }

    /// The failover gate of `acquire`, `extend` and `extend_many` (see
    /// `failover_ctes`).
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Gate {
        /// The µs a failover quarantine has left, if one runs.
        pub(crate) quarantine_us: Option<i64>,
        /// The marker has not recorded this server's timeline yet.
        pub(crate) unrecorded: bool,
        /// The table's max_ttl.
        pub(crate) max_ttl_us: Option<i64>,
    }

    impl Gate {
        pub(crate) fn decode(row: &Row) -> Result<Self, Error> {
            Ok(Self {
                quarantine_us: row.try_get("quarantine_us")?,
                unrecorded: row.try_get::<_, Option<bool>>("unrecorded")? == Some(true),
                max_ttl_us: row.try_get("max_ttl_us")?,
            })
        }

        /// Whether a row (any statement's) says `unrecorded`: only the gated
        /// statements have the column.
        pub(crate) fn says_unrecorded(row: &Row) -> bool {
            row.columns().iter().any(|c| c.name() == "unrecorded")
                && row.try_get::<_, Option<bool>>("unrecorded").ok() == Some(Some(true))
        }
    }

    /// The one row of `acquire`.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Acquire {
        /// The holding's fence; `None` when refused.
        pub(crate) fence: Option<i64>,
        /// Refused: the holder's remaining lease in µs, if there is one.
        pub(crate) remaining_us: Option<i64>,
        /// Refused, for a waiter: its ticket in the key's line, and how many
        /// tickets come before it.
        pub(crate) ticket: Option<i64>,
        pub(crate) ahead: Option<i64>,
        /// Refused, needing a ticket, and none handed out (the row was busy).
        pub(crate) ticket_skipped: bool,
        pub(crate) gate: Gate,
    }

    impl Acquire {
        pub(crate) fn decode(row: &Row) -> Result<Self, Error> {
            Ok(Self {
                fence: row.try_get("fence")?,
                remaining_us: row.try_get("remaining_us")?,
                ticket: row.try_get("ticket")?,
                ahead: row.try_get("ahead")?,
                ticket_skipped: row.try_get("ticket_skipped")?,
                gate: Gate::decode(row)?,
            })
        }
    }

    /// The one row of `extend`.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Extend {
        pub(crate) renewed: bool,
        pub(crate) gate: Gate,
    }

    impl Extend {
        pub(crate) fn decode(row: &Row) -> Result<Self, Error> {
            Ok(Self {
                renewed: row.try_get("renewed")?,
                gate: Gate::decode(row)?,
            })
        }
    }

    /// One row of `extend_many`: a renewed or a busy lease, or the row of
    /// NULLs that says there was none.
    #[derive(Debug, Clone)]
    pub(crate) struct BatchEntry<'a> {
        /// The lease; `None` in the row of NULLs.
        pub(crate) lease: Option<(&'a str, uuid::Uuid)>,
        /// Locked by another transaction: neither renewed nor gone.
        pub(crate) busy: bool,
    }

    impl<'a> BatchEntry<'a> {
        pub(crate) fn decode(row: &'a Row) -> Result<Self, Error> {
            let key: Option<&str> = row.try_get("lock_key")?;
            let token: Option<uuid::Uuid> = row.try_get("token")?;
            Ok(Self {
                lease: key.zip(token),
                busy: row.try_get("busy")?,
            })
        }
    }

    /// The one row of `release`: `Some(true)` released now, `Some(false)`
    /// released by an earlier statement of this token, `None` not held.
    pub(crate) fn released(row: &Row) -> Result<Option<bool>, Error> {
        row.try_get("released")
    }

    /// One row of `inspect` or `list`.
    #[derive(Debug, Clone)]
    pub(crate) struct Lock {
        pub(crate) key: String,
        pub(crate) owner: String,
        pub(crate) fence: i64,
        pub(crate) acquired_us: i64,
        /// `None` once released.
        pub(crate) expires_us: Option<i64>,
        /// Live at the statement's clock reading.
        pub(crate) held: bool,
        pub(crate) remaining_us: Option<i64>,
    }

    impl Lock {
        pub(crate) fn decode(row: &Row) -> Result<Self, Error> {
            Ok(Self {
                key: row.try_get("lock_key")?,
                owner: row.try_get("owner")?,
                fence: row.try_get("fence")?,
                acquired_us: row.try_get("acquired_us")?,
                expires_us: row.try_get("expires_us")?,
                held: row.try_get("held")?,
                remaining_us: row.try_get("remaining_us")?,
            })
        }
    }
}

/// The SQL texts of one table's lock statements, exactly as the backend sends
/// them, for tools that issue them without the backend (the benchmark's
/// raw-driver baseline). Not a stable API.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct LockSql {
    /// Try-acquire: `$1` key text, `$2` token uuid, `$3` ttl µs int8, `$4` owner
    /// text, `$5` int8 mode (0 a plain try, 1 a fair waiter, 2 an unfair one),
    /// `$6` int8 ticket (NULL for none), `$7` not-after bound int8 (µs since
    /// the epoch on the server's clock; `i64::MAX` for none); returns one row
    /// `(fence, remaining_us, ticket, ahead, ticket_skipped, server_us,
    /// quarantine_us, max_ttl_us)`, a NULL fence when refused.
    pub acquire: String,
    /// Extend: `$1` key, `$2` token, `$3` ttl µs, `$4` bound; one row `(renewed,
    /// server_us, quarantine_us, max_ttl_us)`.
    pub extend: String,
    /// Batch extend: `$1` text[], `$2` uuid[], `$3` ttl µs, `$4` bound; the renewed
    /// pairs `(lock_key, token, busy, server_us, quarantine_us, max_ttl_us)`, or
    /// one row with NULL pair if none, then the busy ones.
    pub extend_many: String,
    /// Release: `$1` key, `$2` token, `$3` channel, `$4` bound; one row
    /// `(released, server_us)`, `released` true when released now.
    pub release: String,
    /// The notification channel to pass to `release`.
    pub channel: String,
}

impl LockSql {
    /// The statements for `table`.
    pub fn for_table(table: &TableName) -> Self {
        let s = Statements::new(table, Failover::DEFAULT);
        Self {
            acquire: s.acquire,
            extend: s.extend,
            extend_many: s.extend_many,
            release: s.release,
            channel: s.channel,
        }
    }
}

/// One setting every backend statement runs under: set once per session (`SET`)
/// on a direct connection or behind a session pooler, or in each call's own
/// transaction (`SET LOCAL`) behind a transaction pooler, whose sessions are not
/// ours to change. [`settings`] is the one list both forms come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Setting {
    /// The parameter a session sets (`SET name = value`).
    pub(crate) name: &'static str,
    /// The parameter that has the same effect on the current transaction
    /// (`SET LOCAL local_name = value`): the same one, except where the session
    /// form only acts on later transactions.
    pub(crate) local_name: &'static str,
    /// The value, as SQL: an integer or a quoted literal made here, never user
    /// text.
    pub(crate) value: String,
}

impl Setting {
    fn same(name: &'static str, value: String) -> Self {
        Self {
            name,
            local_name: name,
            value,
        }
    }
}

/// The settings that bound every call: how long a statement may wait on another
/// transaction's row lock (`lock_timeout`), and how long any statement may run
/// (`statement_timeout`; plain integers are milliseconds for both); and READ
/// COMMITTED for the one-statement transactions, so that a server whose default
/// isolation is REPEATABLE READ or SERIALIZABLE does not turn the loser of a
/// takeover race into a serialization failure instead of a plain refusal.
/// `default_transaction_isolation` applies to a session's later transactions
/// only, so its per-transaction form is `transaction_isolation`, which must be
/// set before the transaction's first query, as [`transaction_settings`] does.
pub(crate) fn settings(lock_timeout_ms: u64, statement_timeout_ms: u64) -> Vec<Setting> {
    vec![
        Setting::same("lock_timeout", lock_timeout_ms.to_string()),
        Setting::same("statement_timeout", statement_timeout_ms.to_string()),
        Setting {
            name: "default_transaction_isolation",
            local_name: "transaction_isolation",
            value: "'read committed'".to_owned(),
        },
    ]
}

/// The `SET` commands that give a session [`settings`], in one simple-query
/// message.
pub(crate) fn session_settings(lock_timeout_ms: u64, statement_timeout_ms: u64) -> String {
    settings(lock_timeout_ms, statement_timeout_ms)
        .iter()
        .map(|s| format!("SET {} = {}", s.name, s.value))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The `SET LOCAL` commands that give the current transaction [`settings`],
/// behind a transaction pooler; they end with it, so no other client of the
/// pooled session sees them. Placed first in the transaction, before any query:
/// `statement_timeout` is armed when a statement starts, so it bounds the
/// statements after it (set inside the lock statement itself, with
/// `set_config(…, true)`, it would not bound that statement), and
/// `transaction_isolation` cannot change once the transaction has run a query.
///
/// One more, for the pooler only: `idle_in_transaction_session_timeout`, at the
/// statement timeout. A call's transaction is sent in one piece (`BEGIN …` and
/// `COMMIT` pipelined with the statement), so it never waits for the client
/// between its statements, unless the network held back the rest of it: then
/// the server ends the session (rolling the transaction back, and releasing the
/// row locks it took) instead of keeping them until the `COMMIT` turns up, late.
pub(crate) fn transaction_settings(lock_timeout_ms: u64, statement_timeout_ms: u64) -> String {
    let mut all = settings(lock_timeout_ms, statement_timeout_ms);
    all.push(Setting::same(
        "idle_in_transaction_session_timeout",
        statement_timeout_ms.to_string(),
    ));
    all.iter()
        .map(|s| format!("SET LOCAL {} = {}", s.local_name, s.value))
        .collect::<Vec<_>>()
        .join("; ")
}

/// How a call opens its own transaction behind a transaction pooler: `BEGIN`
/// and the [`transaction_settings`], one simple-query message. `BEGIN` opens an
/// explicit block, which outlives the message, so the lock statement sent next
/// runs in it, and [`COMMIT`] ends it.
pub(crate) fn begin_with_settings(lock_timeout_ms: u64, statement_timeout_ms: u64) -> String {
    format!(
        "BEGIN; {}",
        transaction_settings(lock_timeout_ms, statement_timeout_ms)
    )
}

/// Ends a call's own transaction. After a failed statement the transaction is
/// aborted, and `COMMIT` rolls it back without an error, so the session is left
/// idle either way.
pub(crate) const COMMIT: &str = "COMMIT";

/// The `NOTIFY` channel of a table: `distrlock:<table>`, or a stable hash of it when
/// that would pass PostgreSQL's 63-byte identifier limit.
pub(crate) fn channel_name(table: &TableName) -> String {
    let plain = format!("distrlock:{table}");
    if plain.len() <= 63 {
        plain
    } else {
        format!("distrlock:{:016x}", fnv1a64(plain.as_bytes()))
    }
}

/// 64-bit FNV-1a: stable across processes, versions and platforms (unlike std's
/// hashers), so every process derives the same channel and advisory lock id.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(s: &Statements) -> [&str; 8] {
        [
            &s.create_table,
            &s.create_table_locked,
            &s.acquire,
            &s.extend,
            &s.extend_many,
            &s.release,
            &s.inspect,
            &s.list,
        ]
    }

    fn without_comments(sql: &str) -> String {
        sql.lines()
            .map(|line| line.split("--").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn uses_only_the_server_clock_and_timestamptz() {
        let s = Statements::new(&TableName::default(), Failover::DEFAULT);
        for sql in all(&s) {
            let lower = without_comments(sql).to_lowercase();
            assert!(!lower.contains("now()"), "now() in {sql}");
            assert!(!lower.contains("current_timestamp"), "{sql}");
            assert!(!lower.contains("localtimestamp"), "{sql}");
            // Every `timestamp` is `timestamptz`.
            for (i, _) in lower.match_indices("timestamp") {
                let rest = &lower[i..];
                assert!(
                    rest.starts_with("timestamptz") || rest.starts_with("timestamp()"),
                    "bare timestamp in {sql}"
                );
            }
        }
        assert!(s.acquire.contains("clock_timestamp()"));
    }

    /// The acquire, extend, extend_many and release statements.
    fn lock_statements(s: &Statements) -> [&str; 4] {
        [&s.acquire, &s.extend, &s.extend_many, &s.release]
    }

    #[test]
    fn every_lock_statement_answers_its_clock_reading_in_every_case() {
        let s = Statements::new(&TableName::default(), Failover::DEFAULT);
        for sql in lock_statements(&s) {
            let code = without_comments(sql);
            assert!(code.contains("clock.at_us AS server_us"), "{sql}");
            // The main query starts from the one-row clock and only LEFT JOINs to
            // it, with no WHERE: it answers at least one row whatever the CTEs did.
            let main = &code[code.rfind("\nSELECT").expect("a main SELECT")..];
            let from = &main[main.find("\nFROM clock\n").expect("FROM clock")..];
            assert!(!from.contains("WHERE"), "{sql}");
            for line in from.lines().filter(|line| line.contains("JOIN")) {
                assert!(line.starts_with("LEFT JOIN "), "{line} in {sql}");
            }
        }
    }

    #[test]
    fn every_write_is_bounded_by_the_callers_not_after_in_integer_micros() {
        let s = Statements::new(&TableName::default(), Failover::DEFAULT);
        for (sql, types) in [
            (&s.acquire, ACQUIRE_TYPES),
            (&s.extend, EXTEND_TYPES),
            (&s.extend_many, EXTEND_MANY_TYPES),
            (&s.release, RELEASE_TYPES),
        ] {
            let code = without_comments(sql);
            // The bound is the last parameter, an int8.
            let n = types.len();
            assert_eq!(types[n - 1], Type::INT8, "{sql}");
            assert!(!code.contains(&format!("${}", n + 1)), "{sql}");
            let guard = format!("AND clock.at_us < ${n}::int8");
            // Every UPDATE and INSERT (each a CTE) carries the guard before its
            // RETURNING or ON CONFLICT.
            let writes: Vec<&str> = code
                .split(" AS (")
                .skip(1)
                .filter(|cte| {
                    let head = cte.trim_start();
                    head.starts_with("UPDATE") || head.starts_with("INSERT")
                })
                .collect();
            assert!(!writes.is_empty(), "{sql}");
            // (`FOR UPDATE … SKIP LOCKED` locks rows; it writes nothing.)
            assert_eq!(
                code.matches("UPDATE ").count() - code.matches("FOR UPDATE ").count()
                    + code.matches("INSERT INTO").count(),
                writes.len(),
                "a write outside a CTE in {sql}"
            );
            for write in writes {
                // The CTE ends at the first closing parenthesis in column 0.
                let body = write.split("\n)").next().unwrap();
                assert!(body.contains(&guard), "unguarded write in {sql}");
            }
            // Integers only: no seconds as a float, no text times.
            let lower = code.to_lowercase();
            for banned in [
                "to_timestamp",
                "1e6",
                "float",
                "double",
                "::numeric",
                "/ 1000000",
            ] {
                assert!(!lower.contains(banned), "{banned} in {sql}");
            }
            // at_us is computed once, in the clock CTE.
            assert_eq!(code.matches("EXTRACT(EPOCH FROM reading.at)").count(), 1);
        }
    }

    #[test]
    fn quotes_qualified_mixed_case_names_everywhere() {
        let table = TableName::new("Locks_Schema.My_Locks").unwrap();
        let s = Statements::new(&table, Failover::DEFAULT);
        for sql in all(&s) {
            assert!(sql.contains(r#""Locks_Schema"."My_Locks""#), "{sql}");
            assert!(!sql.contains(" Locks_Schema.My_Locks"), "{sql}");
        }
        assert_eq!(s.channel, "distrlock:Locks_Schema.My_Locks");
        assert_eq!(s.listen, r#"LISTEN "distrlock:Locks_Schema.My_Locks""#);
    }

    #[test]
    fn long_names_get_a_short_stable_channel() {
        let long = format!("{}.{}", "s".repeat(63), "t".repeat(63));
        let table = TableName::new(&long).unwrap();
        let channel = channel_name(&table);
        assert!(channel.len() <= 63, "{channel}");
        assert_eq!(channel, channel_name(&TableName::new(&long).unwrap()));
        let other = TableName::new(&format!("{}.{}", "s".repeat(63), "u".repeat(63))).unwrap();
        assert_ne!(channel, channel_name(&other));
        assert_eq!(
            channel_name(&TableName::default()),
            "distrlock:distributed_locks"
        );
    }

    #[test]
    fn session_and_transaction_settings_come_from_one_list() {
        assert_eq!(
            session_settings(2, 5000),
            "SET lock_timeout = 2; SET statement_timeout = 5000; \
             SET default_transaction_isolation = 'read committed'"
        );
        assert_eq!(
            begin_with_settings(2, 5000),
            "BEGIN; SET LOCAL lock_timeout = 2; SET LOCAL statement_timeout = 5000; \
             SET LOCAL transaction_isolation = 'read committed'; \
             SET LOCAL idle_in_transaction_session_timeout = 5000"
        );
        // Every session setting has its SET LOCAL form.
        let local = transaction_settings(2, 5000);
        for setting in settings(2, 5000) {
            assert!(
                local.contains(&format!(
                    "SET LOCAL {} = {}",
                    setting.local_name, setting.value
                )),
                "{setting:?} in {local}"
            );
        }
        assert!(!local.contains("BEGIN"));
    }

    #[test]
    fn only_the_backends_own_refusals_skip_the_flush() {
        let s = Statements::new(&TableName::default(), Failover::DEFAULT);
        let lazy = "set_config('synchronous_commit', 'off', true)";
        let acquire = without_comments(&s.acquire);
        assert!(
            acquire.contains(&format!(
                "CASE WHEN taken.fence IS NULL AND inserted.fence IS NULL\n              THEN {lazy} END AS lazy_commit"
            )),
            "{acquire}"
        );
        for sql in [&s.acquire_in, &s.release, &s.extend, &s.extend_many] {
            assert!(!without_comments(sql).contains(lazy), "{sql}");
        }
    }

    #[test]
    fn every_grant_commits_durably_and_passes_the_failover_gate() {
        let s = Statements::new(&TableName::default(), Failover::DEFAULT);
        // Every grant of time, and everything in a caller's transaction.
        for sql in [
            &s.acquire,
            &s.extend,
            &s.extend_many,
            &s.release,
            &s.acquire_in,
        ] {
            let code = without_comments(sql);
            // 'off' and 'local' are raised to 'on' for this transaction; the
            // rest kept as they are.
            assert!(
                code.contains(
                    "CASE WHEN current_setting('synchronous_commit') IN ('off', 'local')\n                \
                     THEN set_config('synchronous_commit', 'on', true) END"
                ),
                "{sql}"
            );
        }
        for (sql, ttl) in [
            (&s.acquire, "$3"),
            (&s.extend, "$3"),
            (&s.extend_many, "$3"),
        ] {
            let code = without_comments(sql);
            assert!(
                code.contains("pg_walfile_name(pg_current_wal_lsn())"),
                "{sql}"
            );
            let gate = format!(
                "AND gate.quarantine_us IS NULL AND NOT gate.unrecorded\n      AND {ttl}::int8 <= gate.max_ttl_us"
            );
            // Every write passes the gate.
            let grants = code
                .split(" AS (")
                .skip(1)
                .filter(|cte| {
                    let head = cte.trim_start();
                    head.starts_with("UPDATE") || head.starts_with("INSERT")
                })
                .collect::<Vec<_>>();
            assert!(!grants.is_empty());
            for grant in grants {
                assert!(grant.contains(&gate), "ungated grant in {sql}");
            }
            assert!(code.contains("gate.quarantine_us,"), "{sql}");
            assert!(code.contains("gate.unrecorded,"), "{sql}");
            // The marker is only read here; record_timeline writes it.
            assert!(!code.contains("'distrlock failover marker'"), "{sql}");
        }
        let record = without_comments(&s.record_timeline);
        assert!(record.contains("'distrlock failover marker'"));
        assert!(record.contains("AND clock.at_us < $1::int8"));
        assert!(record.contains("THEN set_config('synchronous_commit', 'on', true) END"));
        // Fences start at (timeline - 1) * 2^40 on every path that sets one.
        assert_eq!(
            s.acquire
                .matches("GREATEST(l.fence + 1, gate.fence_floor)")
                .count(),
            1
        );
        assert_eq!(
            s.acquire.matches("GREATEST(1, gate.fence_floor)").count(),
            1
        );
        assert_eq!(
            s.acquire.matches("AND l.fence >= gate.fence_floor").count(),
            2
        );
        // The marker is created with the table, in its transaction.
        assert!(s.create_table.contains("'distrlock failover marker'"));
        assert!(s.create_table_locked.ends_with(&s.create_table));
        // Never listed; a quarantine that is off never refuses.
        assert!(s.list.contains("WHERE l.lock_key <> ''"));
        let off = Statements::new(
            &TableName::default(),
            Failover {
                quarantine: false,
                ..Failover::DEFAULT
            },
        );
        assert!(off.acquire.contains("SELECT NULL::int8 AS quarantine_us"));
        assert!(!s.acquire.contains("SELECT NULL::int8 AS quarantine_us"));
        // A table without a marker gets the config's max_ttl: 5 min by default.
        assert!(s.acquire.contains("COALESCE(marker.max_ttl_us, 300000000)"));
        assert!(
            s.record_timeline
                .contains("COALESCE(marker.max_ttl_us, 300000000)")
        );
    }

    #[test]
    fn fnv_matches_the_reference_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
