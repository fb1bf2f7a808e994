//! `FaultProxy` freezes against the shared PostgreSQL: a statement sent into a
//! frozen path by a client that then closes its socket still runs once the path
//! thaws, as over a real network whose packets were held, not dropped. That late
//! delivery is what backends must survive, so the proxy must reproduce it.
//!
//! The server comes from `DISTRLOCK_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); without it the tests skip, and
//! fail under `DISTRLOCK_REQUIRE_DB=1`.

use std::net::SocketAddr;
use std::time::Duration;

use distrlock_testkit::{FaultProxy, skip};
use tokio_postgres::{Client, Config, NoTls};

fn config() -> Config {
    std::env::var("DISTRLOCK_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
        .parse()
        .expect("DISTRLOCK_TEST_POSTGRES_URL is a valid connection string")
}

/// A connection with `config`, its connection task spawned.
async fn connect(config: &Config) -> Result<(Client, tokio::task::JoinHandle<()>), String> {
    match tokio::time::timeout(Duration::from_secs(5), config.connect(NoTls)).await {
        Ok(Ok((client, connection))) => {
            let task = tokio::spawn(async move {
                let _ = connection.await;
            });
            Ok((client, task))
        }
        Ok(Err(e)) => Err(format!("cannot connect to PostgreSQL: {e}")),
        Err(_) => Err("connecting to PostgreSQL timed out".to_owned()),
    }
}

/// The server's TCP address.
async fn upstream(config: &Config) -> Result<SocketAddr, String> {
    let Some(tokio_postgres::config::Host::Tcp(host)) = config.get_hosts().first() else {
        return Err("the test server is not reached over TCP".to_owned());
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| format!("cannot resolve {host}:{port}"))
}

/// `config` pointed at `proxy` instead.
fn through(config: &Config, proxy: &FaultProxy) -> Config {
    let mut via = Config::new();
    via.host("127.0.0.1").port(proxy.port());
    if let Some(user) = config.get_user() {
        via.user(user);
    }
    if let Some(password) = config.get_password() {
        via.password(password);
    }
    if let Some(dbname) = config.get_dbname() {
        via.dbname(dbname);
    }
    via
}

/// Rounds of: connect through a fresh proxy, freeze it, send
/// `INSERT INTO <table> VALUES (<round>)`, give up on the answer and close the
/// socket, thaw. With `notify`, the connection LISTENs and the server sends it
/// notifications during the freeze (more than one proxy read's worth), which
/// meet the closed client on thaw. Returns the values in the table after the
/// last thaw, or why the server cannot be used.
async fn frozen_inserts(test: &str, rounds: i32, notify: bool) -> Option<Vec<i32>> {
    let config = config();
    let (direct, _direct_task) = match connect(&config).await {
        Ok(direct) => direct,
        Err(reason) => {
            skip(test, &reason);
            return None;
        }
    };
    let upstream = match upstream(&config).await {
        Ok(upstream) => upstream,
        Err(reason) => {
            skip(test, &reason);
            return None;
        }
    };
    let table = format!("distrlock_proxy_freeze_{:016x}", fastrand::u64(..));
    let channel = format!("{table}_news");
    direct
        .batch_execute(&format!("CREATE TABLE {table} (x int)"))
        .await
        .expect("create the table");

    let mut found = Vec::new();
    for round in 0..rounds {
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let (client, connection) = connect(&through(&config, &proxy))
            .await
            .expect("connects through the proxy");
        if notify {
            client
                .batch_execute(&format!("LISTEN {channel}"))
                .await
                .unwrap();
        }

        proxy.freeze();
        let insert = format!("INSERT INTO {table} VALUES ({round})");
        let answer =
            tokio::time::timeout(Duration::from_millis(200), client.batch_execute(&insert));
        assert!(answer.await.is_err(), "no answer through a frozen path");
        if notify {
            let payload = "n".repeat(7_000);
            for _ in 0..4 {
                direct
                    .batch_execute(&format!("NOTIFY {channel}, '{payload}'"))
                    .await
                    .unwrap();
            }
            // Time for the server to send them into the frozen path.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The caller gives up and discards the connection: its socket closes
        // with the INSERT written into it.
        drop(client);
        connection.abort();
        let _ = connection.await;
        let count = direct
            .query_one(
                &format!("SELECT count(*) FROM {table} WHERE x = $1"),
                &[&round],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(count, 0, "round {round}: the INSERT is held while frozen");

        proxy.thaw();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let count = direct
                .query_one(
                    &format!("SELECT count(*) FROM {table} WHERE x = $1"),
                    &[&round],
                )
                .await
                .unwrap()
                .get::<_, i64>(0);
            if count > 0 || tokio::time::Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for row in direct
        .query(&format!("SELECT x FROM {table} ORDER BY x"), &[])
        .await
        .unwrap()
    {
        found.push(row.get::<_, i32>(0));
    }
    direct
        .batch_execute(&format!("DROP TABLE {table}"))
        .await
        .expect("drop the table");
    Some(found)
}

/// The reviewer's case on a real server: the INSERT lands after the thaw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_sent_into_a_frozen_path_lands_after_the_thaw() {
    let test = "insert_sent_into_a_frozen_path_lands_after_the_thaw";
    let Some(found) = frozen_inserts(test, 1, false).await else {
        return;
    };
    assert_eq!(found, [0], "the INSERT arrived late and was committed");
}

/// The same while the server sends the connection notifications during the
/// freeze, as it does to a listening session: every round's INSERT lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_sent_into_a_frozen_path_lands_despite_notifications() {
    let test = "insert_sent_into_a_frozen_path_lands_despite_notifications";
    let Some(found) = frozen_inserts(test, 10, true).await else {
        return;
    };
    assert_eq!(
        found,
        (0..10).collect::<Vec<_>>(),
        "every round's INSERT arrived late and was committed"
    );
}
