//! The Go original's lock protocol, for the second baseline: an initialising
//! `INSERT … DO NOTHING` so the row exists, then the acquire `UPDATE` in a
//! transaction of its own (BEGIN, UPDATE, COMMIT), then the release `UPDATE` in
//! another. The statements run on the same table as distrlock's, so the row
//! layout and indexes are the same; only the protocol differs.

/// PostgreSQL: make sure the row exists (a nil token, never live).
pub(crate) fn postgres_init(t: &str) -> String {
    format!(
        "INSERT INTO {t} (lock_key, token, fence, owner, acquired_at, expires_at) \
         VALUES ($1::text, '00000000-0000-0000-0000-000000000000', 0, '', clock_timestamp(), NULL) \
         ON CONFLICT (lock_key) DO NOTHING"
    )
}

/// PostgreSQL: take the row if free or expired; one affected row on success.
pub(crate) fn postgres_acquire(t: &str) -> String {
    format!(
        "UPDATE {t} SET token = $2::uuid, fence = fence + 1, owner = $3::text, \
         acquired_at = clock_timestamp(), \
         expires_at = clock_timestamp() + $4::int8 * interval '1 microsecond' \
         WHERE lock_key = $1::text AND (expires_at IS NULL OR expires_at <= clock_timestamp())"
    )
}

/// PostgreSQL: end the holding of this token.
pub(crate) fn postgres_release(t: &str) -> String {
    format!(
        "UPDATE {t} SET expires_at = NULL \
         WHERE lock_key = $1::text AND token = $2::uuid AND expires_at > clock_timestamp()"
    )
}

/// SQLite: make sure the row exists (never live: no lease end).
pub(crate) fn sqlite_init(t: &str) -> String {
    format!(
        "INSERT OR IGNORE INTO {t} \
         (lock_key, token, fence, owner, acquired_at, expires_at, clock, lease_end) \
         VALUES (:key, '', 0, '', :wall_now, NULL, :clock, NULL)"
    )
}

/// SQLite: take the row if its lease is not live.
pub(crate) fn sqlite_acquire(t: &str) -> String {
    format!(
        "UPDATE {t} SET token = :token, fence = fence + 1, owner = :owner, \
         acquired_at = :wall_now, expires_at = :wall_now + :ttl, clock = :clock, \
         lease_end = :now + :ttl \
         WHERE lock_key = :key \
           AND NOT (lease_end IS NOT NULL AND clock = :clock AND lease_end > :now)"
    )
}

/// SQLite: end the holding of this token.
pub(crate) fn sqlite_release(t: &str) -> String {
    format!(
        "UPDATE {t} SET expires_at = NULL, lease_end = NULL \
         WHERE lock_key = :key AND token = :token"
    )
}

/// MariaDB / MySQL: make sure the row exists (an all-zero token, never live).
pub(crate) fn mysql_init(t: &str) -> String {
    format!(
        "INSERT IGNORE INTO {t} (lock_key, token, fence, owner, acquired_at, expires_at) \
         VALUES (?, UNHEX('00000000000000000000000000000000'), 0, '', UTC_TIMESTAMP(6), NULL)"
    )
}

/// MariaDB / MySQL: take the row if free or expired. Parameters: token, owner,
/// ttl µs, key.
pub(crate) fn mysql_acquire(t: &str) -> String {
    format!(
        "UPDATE {t} SET token = ?, fence = fence + 1, owner = ?, \
         acquired_at = UTC_TIMESTAMP(6), \
         expires_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND \
         WHERE lock_key = ? AND (expires_at IS NULL OR expires_at <= UTC_TIMESTAMP(6))"
    )
}

/// MariaDB / MySQL: end the holding of this token. Parameters: key, token.
pub(crate) fn mysql_release(t: &str) -> String {
    format!(
        "UPDATE {t} SET expires_at = NULL \
         WHERE lock_key = ? AND token = ? AND expires_at > UTC_TIMESTAMP(6)"
    )
}
