//! Maps tokio-postgres and deadpool errors into distrlock's one [`Error`].
//!
//! SQLSTATE classes follow the PostgreSQL manual's appendix A. Messages are built
//! from the server's message and the driver's error kind, neither of which carries
//! the connection string, so no password reaches an error.

use distrlock_core::{Error, TableName};
use tokio_postgres::error::SqlState;

/// What a driver error means for the caller.
pub(crate) fn from_pg(error: tokio_postgres::Error, table: &TableName) -> Error {
    if let Some(db) = error.as_db_error() {
        let code = db.code().clone();
        let message = format!("{} (SQLSTATE {})", db.message(), code.code());
        // object_not_in_prerequisite_state is mostly permanent, but "recovery is
        // in progress" (pg_current_wal_lsn() on a standby) means this connection
        // reached a standby: it may be promoted, or the address may move to the
        // new primary, as with read_only_sql_transaction.
        let class = match classify(&code) {
            Class::Permanent if is_in_recovery(code.code(), db.message(), db.routine()) => {
                Class::Transient
            }
            class => class,
        };
        return match class {
            Class::TableMissing => Error::SchemaMissing {
                table: table.to_string(),
                hint: format!(
                    "create it with PostgresBackend::create_table(), or run the DDL from \
                     PostgresBackend::schema_sql() in your migrations{} (server said: {message})",
                    match table.schema() {
                        Some(schema) => format!(
                            "; if schema \"{schema}\" is missing too, run CREATE SCHEMA first"
                        ),
                        None => String::new(),
                    }
                ),
            },
            Class::SchemaMissing => Error::SchemaMissing {
                table: table.to_string(),
                hint: format!(
                    "its schema {:?} does not exist: run CREATE SCHEMA first, then \
                     PostgresBackend::create_table() (server said: {message})",
                    table.schema().unwrap_or("")
                ),
            },
            // undefined_column on a line column: a table made by an earlier
            // version, before waiters stood in line.
            Class::Permanent
                if code.code() == "42703"
                    && ["line_next", "line_head", "released_at"]
                        .iter()
                        .any(|column| db.message().contains(column)) =>
            {
                Error::permanent(
                    format!(
                        "{message}: the table {table} predates the line of waiters; run \
                         PostgresBackend::create_table() (or `distrlock init`) once to add \
                         its columns"
                    ),
                    error,
                )
            }
            Class::Unavailable => Error::unavailable(message, Some(Box::new(error))),
            Class::Transient => Error::transient(message, error),
            Class::Permanent => Error::permanent(message, error),
        };
    }
    if is_connection_error(&error) {
        let message = format!("connection to PostgreSQL failed: {}", describe(&error));
        return Error::unavailable(message, Some(Box::new(error)));
    }
    Error::permanent(describe(&error), error)
}

/// What a pool error means for the caller.
pub(crate) fn from_pool(error: deadpool_postgres::PoolError, table: &TableName) -> Error {
    use deadpool_postgres::{HookError, PoolError};
    match error {
        PoolError::Backend(e) => from_pg(e, table),
        PoolError::PostCreateHook(HookError::Backend(e)) => from_pg(e, table),
        PoolError::Timeout(kind) => Error::unavailable(
            format!("no PostgreSQL connection in time ({kind:?} timed out)"),
            None,
        ),
        PoolError::PostCreateHook(HookError::Message(m)) => {
            Error::unavailable(format!("setting up a new connection failed: {m}"), None)
        }
        PoolError::Closed => Error::Backend {
            message: "the connection pool was closed".into(),
            transient: false,
            source: None,
        },
        PoolError::NoRuntimeSpecified => Error::Backend {
            message: "the connection pool has no async runtime configured".into(),
            transient: false,
            source: None,
        },
    }
}

/// Whether `error` reports the server taking the row lock too long
/// (`lock_timeout`, SQLSTATE 55P03 lock_not_available).
pub(crate) fn is_lock_not_available(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE)
}

/// Whether `error` says a prepared statement the call named does not exist on
/// its session (SQLSTATE 26000 invalid_sql_statement_name): someone deallocated
/// it (`DEALLOCATE ALL`, `DISCARD ALL`). The statement did not run.
pub(crate) fn is_statement_gone(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::INVALID_SQL_STATEMENT_NAME)
}

/// Whether `error` means the session is gone (killed, server shut down, socket
/// broken), so the statement may be retried on another connection.
pub(crate) fn is_session_lost(error: &tokio_postgres::Error) -> bool {
    match error.code() {
        Some(code) => classify(code) == Class::Unavailable,
        None => is_connection_error(error),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    TableMissing,
    SchemaMissing,
    Unavailable,
    Transient,
    Permanent,
}

/// A statement refused because the server is a standby (still in recovery):
/// `pg_current_wal_lsn()` raising object_not_in_prerequisite_state. The C
/// function that raised it (`routine`) says so whatever the server's
/// `lc_messages`; the English message is the fallback for a server that does not
/// send it.
fn is_in_recovery(code: &str, message: &str, routine: Option<&str>) -> bool {
    code == "55000"
        && (routine == Some("pg_current_wal_lsn") || message.contains("recovery is in progress"))
}

fn classify(code: &SqlState) -> Class {
    let c = code.code();
    match c {
        // undefined_table
        "42P01" => Class::TableMissing,
        // invalid_schema_name
        "3F000" => Class::SchemaMissing,
        // admin_shutdown (pg_terminate_backend), crash_shutdown, cannot_connect_now,
        // idle_session_timeout: the session is gone or the server is not up yet.
        "57P01" | "57P02" | "57P03" | "57P05" => Class::Unavailable,
        // serialization_failure, deadlock_detected, statement_completion_unknown,
        // lock_not_available (lock_timeout), query_canceled (statement_timeout),
        // read_only_sql_transaction (a failover briefly left us on a standby),
        // idle_in_transaction_session_timeout.
        "40001" | "40P01" | "40003" | "55P03" | "57014" | "25006" | "25P03" => Class::Transient,
        // connection_exception: the session is gone. insufficient_resources
        // (too_many_connections, out of memory or disk): may pass.
        _ if c.starts_with("08") => Class::Unavailable,
        _ if c.starts_with("53") => Class::Transient,
        _ => Class::Permanent,
    }
}

/// Driver errors without a SQLSTATE that mean the network or the session failed.
fn is_connection_error(error: &tokio_postgres::Error) -> bool {
    if error.is_closed() {
        return true;
    }
    // tokio-postgres does not expose its error kind; its Display names it.
    let text = error.to_string();
    [
        "error communicating with the server",
        "error connecting to server",
        "timeout waiting for server",
        "error performing TLS handshake",
        "unexpected message from server",
    ]
    .iter()
    .any(|prefix| text.starts_with(prefix))
}

/// The driver's message with its cause, for errors without a server message.
fn describe(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(source) => format!("{error}: {source}"),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_sqlstates() {
        let class = |c: &str| classify(&SqlState::from_code(c));
        assert_eq!(class("42P01"), Class::TableMissing);
        assert_eq!(class("3F000"), Class::SchemaMissing);
        assert_eq!(class("40001"), Class::Transient);
        assert_eq!(class("40P01"), Class::Transient);
        assert_eq!(class("55P03"), Class::Transient);
        assert_eq!(class("57014"), Class::Transient);
        assert_eq!(class("53300"), Class::Transient);
        assert_eq!(class("57P01"), Class::Unavailable);
        assert_eq!(class("57P02"), Class::Unavailable);
        assert_eq!(class("08006"), Class::Unavailable);
        assert_eq!(class("42601"), Class::Permanent);
        assert_eq!(class("23505"), Class::Permanent);
        assert_eq!(class("22003"), Class::Permanent);
        assert_eq!(class("25006"), Class::Transient);
        assert!(is_in_recovery("55000", "recovery is in progress", None));
        assert!(is_in_recovery(
            "55000",
            "la recuperación está en proceso",
            Some("pg_current_wal_lsn")
        ));
        assert!(!is_in_recovery("55000", "something else", Some("other")));
        assert!(!is_in_recovery("XX000", "recovery is in progress", None));
    }
}
