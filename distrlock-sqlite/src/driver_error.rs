//! Mapping rusqlite's errors onto [`distrlock_core::Error`].

use distrlock_core::{Error, TableName};
use rusqlite::ErrorCode;

/// What was being done when the error happened, for the message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Doing {
    /// Opening the file and setting up the connection.
    Opening,
    /// Running a lock statement.
    Statement,
}

/// Maps a rusqlite error to distrlock's error kinds.
///
/// - `SQLITE_BUSY` / `SQLITE_LOCKED`: another process held the write lock past
///   the busy timeout: transient, a retry may succeed.
/// - `no such table`: [`Error::SchemaMissing`].
/// - `no such column` of the line: a table older than the line, permanent,
///   with a hint to run `create_table`.
/// - `SQLITE_CANTOPEN` (missing directory, permissions): [`Error::Unavailable`].
/// - I/O errors and a full disk: transient, they can clear.
/// - Anything else (not a database, corrupt file, read-only file): permanent.
pub(crate) fn from_sqlite(error: rusqlite::Error, table: &TableName, doing: Doing) -> Error {
    let code = error.sqlite_error_code();
    let text = error.to_string();
    if text.contains("no such table") {
        return Error::SchemaMissing {
            table: table.to_string(),
            hint: "create it with SqliteBackend::create_table() or `distrlock init`".into(),
        };
    }
    // A table made by an earlier version, before waiters stood in line.
    if text.contains("no such column")
        && ["freed_at", "line_next", "line_head"]
            .iter()
            .any(|column| text.contains(column))
    {
        return Error::permanent(
            format!(
                "the table {table} predates the line of waiters ({text}); run \
                 SqliteBackend::create_table() (or `distrlock init`) once to add its columns"
            ),
            error,
        );
    }
    let what = match doing {
        Doing::Opening => "opening the SQLite database",
        Doing::Statement => "SQLite",
    };
    match code {
        Some(ErrorCode::CannotOpen) => Error::unavailable(
            format!("{what}: cannot open the database file ({text})"),
            Some(error.into()),
        ),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::transient(
            format!(
                "{what}: the database stayed locked by another connection past the busy \
                 timeout ({text})"
            ),
            error,
        ),
        Some(ErrorCode::SystemIoFailure | ErrorCode::DiskFull | ErrorCode::OutOfMemory) => {
            Error::transient(format!("{what}: {text}"), error)
        }
        _ => Error::permanent(format!("{what}: {text}"), error),
    }
}
