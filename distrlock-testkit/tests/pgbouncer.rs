//! A private PgBouncer in front of the shared PostgreSQL: in transaction mode
//! clients share its few server sessions, in session mode each keeps its own,
//! and dropping it stops it.
//!
//! The server comes from `DISTRLOCK_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without it, or without the
//! `pgbouncer` binary, the tests skip, and fail under `DISTRLOCK_REQUIRE_DB=1`.

use std::time::Duration;

use distrlock_testkit::{PgBouncer, PoolMode, skip};
use tokio_postgres::{Client, Config, NoTls};

fn server() -> Config {
    std::env::var("DISTRLOCK_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
        .parse()
        .expect("DISTRLOCK_TEST_POSTGRES_URL is a valid connection string")
}

/// A PgBouncer in front of the test server, or `None` after reporting the test
/// skipped.
fn start_bouncer(test: &str, mode: PoolMode, pool: u32) -> Option<(PgBouncer, Config)> {
    let server = server();
    let Some(tokio_postgres::config::Host::Tcp(host)) = server.get_hosts().first().cloned() else {
        skip(test, "the test server is not reached over TCP");
        return None;
    };
    let port = server.get_ports().first().copied().unwrap_or(5432);
    let user = server.get_user().unwrap_or("postgres").to_owned();
    let bouncer = match PgBouncer::builder(host, port)
        .pool_mode(mode)
        .default_pool_size(pool)
        .user(
            &user,
            server
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .as_deref(),
        )
        .start()
    {
        Ok(bouncer) => bouncer,
        Err(error) => {
            skip(test, &error.to_string());
            return None;
        }
    };
    let mut through = Config::new();
    through
        .host("127.0.0.1")
        .port(bouncer.port())
        .user(&user)
        .dbname(server.get_dbname().unwrap_or("test"));
    Some((bouncer, through))
}

async fn connect(config: &Config) -> Result<Client, String> {
    match tokio::time::timeout(Duration::from_secs(5), config.connect(NoTls)).await {
        Ok(Ok((client, connection))) => {
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok(client)
        }
        Ok(Err(e)) => Err(format!("cannot connect through pgbouncer: {e}")),
        Err(_) => Err("connecting through pgbouncer timed out".to_owned()),
    }
}

async fn backend_pid(client: &Client) -> i32 {
    // The simple protocol: no prepared statement for PgBouncer to mix up.
    let messages = client
        .simple_query("SELECT pg_backend_pid()")
        .await
        .expect("a query through pgbouncer");
    messages
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0)?.parse().ok(),
            _ => None,
        })
        .expect("one row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_mode_shares_sessions_and_session_mode_does_not() {
    let test = "transaction_mode_shares_sessions_and_session_mode_does_not";
    let Some((bouncer, through)) = start_bouncer(test, PoolMode::Transaction, 1) else {
        return;
    };
    assert_eq!(bouncer.pool_mode(), PoolMode::Transaction);
    let Ok(a) = connect(&through).await.map_err(|e| skip(test, &e)) else {
        return;
    };
    let b = connect(&through).await.unwrap();
    // One server connection: a SET by one client is seen by the other.
    a.simple_query("SET application_name = 'leaked-by-a'")
        .await
        .unwrap();
    assert_eq!(backend_pid(&a).await, backend_pid(&b).await);
    let seen = b.simple_query("SHOW application_name").await.unwrap();
    assert!(
        seen.iter().any(|m| matches!(m,
            tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("leaked-by-a"))),
        "a transaction pooler lends one session to both clients"
    );

    let Some((_session, through)) = start_bouncer(test, PoolMode::Session, 2) else {
        return;
    };
    let a = connect(&through).await.unwrap();
    let b = connect(&through).await.unwrap();
    assert_ne!(backend_pid(&a).await, backend_pid(&b).await);
}

#[test]
fn dropped_pgbouncer_stops_listening() {
    let test = "dropped_pgbouncer_stops_listening";
    let Some((mut bouncer, _)) = start_bouncer(test, PoolMode::Transaction, 2) else {
        return;
    };
    let port = bouncer.port();
    assert!(
        bouncer
            .url("postgres", "test")
            .ends_with(&format!(":{port}/test"))
    );
    assert!(bouncer.is_running());
    drop(bouncer);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on port {port} once the PgBouncer is dropped"
    );
}
