//! Mapping `mysql_async` errors into distrlock's one [`Error`].

use std::time::Duration;

use distrlock_core::{Error, TableName};
use mysql_async::{DriverError, Error as MyError};

/// MySQL/MariaDB server error numbers this backend tells apart.
pub(crate) mod code {
    /// `ER_NO_SUCH_TABLE`: the lock table (or its database) does not exist.
    pub(crate) const NO_SUCH_TABLE: u16 = 1146;
    /// `ER_BAD_DB_ERROR`: unknown database (from `CREATE TABLE db.t`).
    pub(crate) const BAD_DB: u16 = 1049;
    /// `ER_BAD_FIELD_ERROR`: unknown column (a table older than the line).
    pub(crate) const BAD_FIELD: u16 = 1054;
    /// `ER_LOCK_DEADLOCK`: chosen as a deadlock victim; the statement was rolled back.
    pub(crate) const DEADLOCK: u16 = 1213;
    /// `ER_UNKNOWN_STMT_HANDLER`: no prepared statement has that id on this
    /// connection (it was closed); nothing ran.
    pub(crate) const UNKNOWN_STMT_HANDLER: u16 = 1243;
    /// `ER_LOCK_WAIT_TIMEOUT`: waited `innodb_lock_wait_timeout` for a row lock.
    pub(crate) const LOCK_WAIT_TIMEOUT: u16 = 1205;
    /// `ER_OPTION_PREVENTS_STATEMENT`: `--read-only` (a replica, or a primary
    /// being demoted during failover).
    pub(crate) const READ_ONLY_OPTION: u16 = 1290;
    /// `ER_CANT_EXECUTE_IN_READ_ONLY_TRANSACTION`.
    pub(crate) const READ_ONLY_TRANSACTION: u16 = 1792;
    /// `ER_READ_ONLY_MODE` (MySQL, `super_read_only`-style refusals).
    pub(crate) const READ_ONLY_MODE: u16 = 1836;
    /// `ER_QUERY_INTERRUPTED`: `KILL QUERY`.
    pub(crate) const QUERY_INTERRUPTED: u16 = 1317;
    /// `ER_STATEMENT_TIMEOUT` (MariaDB `max_statement_time`).
    pub(crate) const STATEMENT_TIMEOUT: u16 = 1969;
    /// `ER_QUERY_TIMEOUT` (MySQL `max_execution_time`).
    pub(crate) const QUERY_TIMEOUT: u16 = 3024;
    /// `ER_CON_COUNT_ERROR`: too many connections.
    pub(crate) const TOO_MANY_CONNECTIONS: u16 = 1040;
    /// `ER_TOO_MANY_USER_CONNECTIONS`.
    pub(crate) const TOO_MANY_USER_CONNECTIONS: u16 = 1203;
    /// `ER_SERVER_SHUTDOWN`: the server is shutting down.
    pub(crate) const SERVER_SHUTDOWN: u16 = 1053;
    /// `ER_CONNECTION_KILLED` (MariaDB): sent to a session killed with `KILL`.
    pub(crate) const CONNECTION_KILLED: u16 = 1927;
    /// `ER_CLIENT_INTERACTION_TIMEOUT` (MySQL 8.0.24+): closed after `wait_timeout`.
    pub(crate) const CLIENT_INTERACTION_TIMEOUT: u16 = 4031;
    /// `CR_SERVER_GONE_ERROR`, as relayed by proxies.
    pub(crate) const SERVER_GONE: u16 = 2006;
    /// `CR_SERVER_LOST`, as relayed by proxies.
    pub(crate) const SERVER_LOST: u16 = 2013;
    /// `ER_ABORTING_CONNECTION`.
    pub(crate) const ABORTING_CONNECTION: u16 = 1152;
    /// `ER_NET_PACKETS_OUT_OF_ORDER`.
    pub(crate) const NET_PACKETS_OUT_OF_ORDER: u16 = 1156;
    /// `ER_NET_READ_ERROR`.
    pub(crate) const NET_READ_ERROR: u16 = 1158;
    /// `ER_NET_READ_INTERRUPTED`.
    pub(crate) const NET_READ_INTERRUPTED: u16 = 1159;
    /// `ER_NET_ERROR_ON_WRITE`.
    pub(crate) const NET_ERROR_ON_WRITE: u16 = 1160;
    /// `ER_NET_WRITE_INTERRUPTED`.
    pub(crate) const NET_WRITE_INTERRUPTED: u16 = 1161;
    /// `ER_NEW_ABORTING_CONNECTION`.
    pub(crate) const NEW_ABORTING_CONNECTION: u16 = 1184;
    /// `ER_UNKNOWN_COM_ERROR`, which Galera sends as "WSREP has not yet
    /// prepared node for application use": the node is not in the primary
    /// component (quorum lost, or still joining).
    pub(crate) const WSREP_NOT_PREPARED: u16 = 1047;
    /// `ER_ERROR_DURING_COMMIT`, which Galera sends as "Got error 6 \"No such
    /// device or address\" during COMMIT" (and similar) when the node lost
    /// the primary component while committing: the transaction was rolled back.
    pub(crate) const ERROR_DURING_COMMIT: u16 = 1180;
}

/// Server errors that mean the connection itself is gone or unusable.
fn connection_gone(code: u16) -> bool {
    use code::*;
    matches!(
        code,
        SERVER_SHUTDOWN
            | CONNECTION_KILLED
            | CLIENT_INTERACTION_TIMEOUT
            | SERVER_GONE
            | SERVER_LOST
            | ABORTING_CONNECTION
            | NET_PACKETS_OUT_OF_ORDER
            | NET_READ_ERROR
            | NET_READ_INTERRUPTED
            | NET_ERROR_ON_WRITE
            | NET_WRITE_INTERRUPTED
            | NEW_ABORTING_CONNECTION
            | TOO_MANY_CONNECTIONS
            | TOO_MANY_USER_CONNECTIONS
    )
}

/// Server errors after which the same call may succeed later.
fn transient_server(code: u16) -> bool {
    use code::*;
    matches!(
        code,
        DEADLOCK
            | LOCK_WAIT_TIMEOUT
            | READ_ONLY_OPTION
            | READ_ONLY_TRANSACTION
            | READ_ONLY_MODE
            | QUERY_INTERRUPTED
            | STATEMENT_TIMEOUT
            | QUERY_TIMEOUT
            | WSREP_NOT_PREPARED
            | ERROR_DURING_COMMIT
    )
}

/// Whether `error` says that this node cannot serve now but another node of
/// a Galera cluster might: it is not in the primary component. A backend
/// given several hosts moves to the next one.
pub(crate) fn is_node_not_ready(error: &MyError) -> bool {
    matches!(
        error,
        MyError::Server(s) if s.code == code::WSREP_NOT_PREPARED || s.code == code::ERROR_DURING_COMMIT
    )
}

/// Whether `error` means the connection that produced it is broken: the driver
/// saw an I/O failure or a protocol mix-up, or the server said the session is
/// gone. Such a connection must not be reused, and the call never reached a
/// healthy session, which is what makes a retry on another connection worth it.
pub(crate) fn is_connection_error(error: &MyError) -> bool {
    match error {
        MyError::Io(_) | MyError::Other(_) => true,
        MyError::Driver(driver) => matches!(
            driver,
            DriverError::ConnectionClosed
                | DriverError::PacketOutOfOrder
                | DriverError::PoolDisconnected
                | DriverError::UnexpectedPacket { .. }
                | DriverError::PacketTooLarge
                | DriverError::BadCompressedPacketHeader
        ),
        MyError::Server(server) => connection_gone(server.code),
        MyError::Url(_) => false,
    }
}

/// Whether `error` is a deadlock: the server rolled the statement back, so an
/// autocommit statement may simply run again.
pub(crate) fn is_deadlock(error: &MyError) -> bool {
    matches!(error, MyError::Server(s) if s.code == code::DEADLOCK)
}

/// Whether `error`, from a single try-acquire, means "someone else is busy with
/// the key": the statement was rolled back and changed nothing, so the honest
/// answer is [`AcquireOutcome::Held`](distrlock_core::AcquireOutcome::Held)
/// with no remaining lease, not an error.
///
/// - 1205: it waited out the row-lock bound on a row another transaction
///   holds.
/// - 1213: chosen as a deadlock victim, or, on Galera, a certification
///   conflict (another node committed a write to the same row first; the
///   server reports it as a deadlock), and still so after the backend's one
///   retry.
pub(crate) fn is_busy_for_try(error: &MyError) -> bool {
    is_lock_wait_timeout(error) || is_deadlock(error)
}

/// Whether `error` says the statement's id is unknown on its connection (it
/// was closed): nothing ran, and preparing the text again gives a statement
/// that runs.
pub(crate) fn is_unknown_statement(error: &MyError) -> bool {
    matches!(error, MyError::Server(s) if s.code == code::UNKNOWN_STMT_HANDLER)
}

/// Whether `error` is a row-lock (or metadata-lock) wait that ran out its
/// bound (`innodb_lock_wait_timeout`, `lock_wait_timeout`): the statement was
/// rolled back and changed nothing, because another transaction holds a lock
/// it needs.
pub(crate) fn is_lock_wait_timeout(error: &MyError) -> bool {
    matches!(error, MyError::Server(s) if s.code == code::LOCK_WAIT_TIMEOUT)
}

/// The error of a write refused because the session's clock is pinned (a
/// refusal of tag 2 in the insert id, see `sql`).
///
/// [`Error::InvalidConfig`]: the cause is the session's own setting (`SET
/// @@timestamp`, in the caller's code or a pool's setup statements), not a
/// failing database, and retrying cannot help until the session is fixed.
pub(crate) fn pinned_clock(what: &str, tolerance: Duration) -> Error {
    Error::InvalidConfig {
        reason: format!(
            "{what} refused: the session's clock (@@timestamp, which NOW() and UTC_TIMESTAMP() \
             read) is not the server's real clock (SYSDATE()): it runs ahead of it or trails it \
             by more than {tolerance:?}, as after `SET @@timestamp = …` (undo it with \
             `SET @@timestamp = DEFAULT`), or the statement waited that long for a lock. \
             A lease on that clock would end at the wrong time, so nothing was changed"
        ),
    }
}

/// Maps a driver error from an operation on `table` (`what` names the
/// operation) into distrlock's error.
///
/// Messages carry the server's error text or the driver's description, never
/// connection options, so no password can appear.
pub(crate) fn map(error: MyError, table: &TableName, what: &str) -> Error {
    match &error {
        MyError::Server(server) if server.code == code::NO_SUCH_TABLE => Error::SchemaMissing {
            table: table.to_string(),
            hint: format!(
                "create it with MySqlBackend::create_table() or run the DDL from schema_sql() \
                 ({})",
                server.message
            ),
        },
        MyError::Server(server) if server.code == code::BAD_DB => Error::SchemaMissing {
            table: table.to_string(),
            hint: format!(
                "its database does not exist; create the database first ({})",
                server.message
            ),
        },
        // A table made by an earlier version, before waiters stood in line.
        MyError::Server(server)
            if server.code == code::BAD_FIELD
                && ["released_at", "line_next", "line_head"]
                    .iter()
                    .any(|column| server.message.contains(column)) =>
        {
            Error::permanent(
                format!(
                    "{what}: the table {table} predates the line of waiters ({}); run \
                     MySqlBackend::create_table() (or `distrlock init`) once to add its columns",
                    server.message
                ),
                error,
            )
        }
        MyError::Server(server) => {
            let message = format!("{what}: {error}");
            if connection_gone(server.code) {
                Error::unavailable(message, Some(Box::new(error)))
            } else if transient_server(server.code) {
                Error::transient(message, error)
            } else {
                Error::permanent(message, error)
            }
        }
        MyError::Url(_) => Error::InvalidConfig {
            reason: format!("{what}: {error}"),
        },
        _ if is_connection_error(&error) => {
            Error::unavailable(format!("{what}: {error}"), Some(Box::new(error)))
        }
        _ => Error::permanent(format!("{what}: {error}"), error),
    }
}

/// Maps an error from getting a connection (opening it, logging in, running the
/// session setup) into distrlock's error.
///
/// Unreachable servers and broken connections are [`Error::Unavailable`]; a
/// server that answers with a refusal (wrong credentials, unknown database, a bad
/// setup statement) is a permanent [`Error::Backend`], unless the refusal is one
/// that passes (too many connections, shutting down, read-only).
pub(crate) fn map_connect(error: MyError) -> Error {
    let message = format!("connecting to the MySQL server: {error}");
    match &error {
        MyError::Server(server) if connection_gone(server.code) => {
            Error::unavailable(message, Some(Box::new(error)))
        }
        MyError::Server(server) if transient_server(server.code) => {
            Error::transient(message, error)
        }
        MyError::Server(_) => Error::permanent(message, error),
        MyError::Url(_) => Error::InvalidConfig { reason: message },
        _ if is_connection_error(&error) => Error::unavailable(message, Some(Box::new(error))),
        _ => Error::permanent(message, error),
    }
}

#[cfg(test)]
mod tests {
    use mysql_async::ServerError;

    use super::*;

    fn server(code: u16) -> MyError {
        MyError::Server(ServerError {
            code,
            message: format!("message {code}"),
            state: "HY000".into(),
        })
    }

    #[test]
    fn classifies_server_errors() {
        let table = TableName::default();
        assert!(matches!(
            map(server(1146), &table, "acquire"),
            Error::SchemaMissing { .. }
        ));
        // 1047 and 1180: a Galera node outside the primary component (quorum
        // lost, or still joining); it answers again once it rejoins.
        for transient in [1213, 1205, 1290, 1792, 1836, 1317, 1969, 3024, 1047, 1180] {
            let e = map(server(transient), &table, "acquire");
            assert!(
                matches!(
                    e,
                    Error::Backend {
                        transient: true,
                        ..
                    }
                ),
                "{transient}: {e:?}"
            );
        }
        for gone in [1927, 1053, 4031, 2006, 2013, 1040] {
            let e = map(server(gone), &table, "acquire");
            assert!(matches!(e, Error::Unavailable { .. }), "{gone}: {e:?}");
            assert!(is_connection_error(&server(gone)));
        }
        for permanent in [1064, 1142, 1690] {
            let e = map(server(permanent), &table, "acquire");
            assert!(
                matches!(
                    e,
                    Error::Backend {
                        transient: false,
                        ..
                    }
                ),
                "{permanent}: {e:?}"
            );
        }
        assert!(is_deadlock(&server(1213)));
        assert!(!is_connection_error(&server(1213)));
        assert!(is_lock_wait_timeout(&server(1205)));
        let refused = pinned_clock("acquire", Duration::from_millis(5500));
        assert!(
            matches!(&refused, Error::InvalidConfig { reason } if reason.contains("@@timestamp"))
        );
        assert!(!refused.is_transient());
        assert!(!is_lock_wait_timeout(&server(1213)));
    }

    #[test]
    fn a_try_that_meets_a_conflict_is_busy() {
        // A row-lock wait that ran out, and a deadlock victim or a Galera
        // certification conflict (both 1213) that stayed one after the retry:
        // rolled back, nothing changed, another transaction was busy with the
        // key.
        assert!(is_busy_for_try(&server(1205)));
        assert!(is_busy_for_try(&server(1213)));
        for other in [1047, 1180, 1290, 1146, 1927, 2013] {
            assert!(!is_busy_for_try(&server(other)), "{other}");
        }
    }

    #[test]
    fn io_errors_are_unavailable() {
        let io = MyError::Io(mysql_async::IoError::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset by peer",
        )));
        assert!(is_connection_error(&io));
        let e = map(io, &TableName::default(), "extend");
        assert!(matches!(e, Error::Unavailable { .. }));
        assert!(e.is_transient());
    }
}
