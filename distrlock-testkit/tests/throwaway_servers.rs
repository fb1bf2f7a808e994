//! Private PostgreSQL and MariaDB servers: start, query, kill -9, restart on the
//! same port with the data kept, stop, and clean up on drop.

use distrlock_testkit::{ServerError, ThrowawayServer, skip};

fn started(test: &str, server: Result<ThrowawayServer, ServerError>) -> Option<ThrowawayServer> {
    match server {
        Ok(server) => Some(server),
        Err(error) => {
            skip(test, &error.to_string());
            None
        }
    }
}

fn survives_kill_and_restart(mut server: ThrowawayServer, create: &str, count: &str) {
    let port = server.port();
    server.sql(create).expect("create and fill a table");
    server.kill();
    assert!(!server.is_running());
    assert!(
        server.sql("SELECT 1").is_err(),
        "a killed server answers nothing"
    );
    server.start().expect("restart after kill -9");
    assert_eq!(server.port(), port, "same port after a restart");
    assert_eq!(
        server.sql(count).expect("query after restart"),
        "3",
        "data kept"
    );
    server.restart().expect("clean restart");
    assert_eq!(server.sql(count).unwrap(), "3");
    server.stop().expect("clean stop");
    assert!(!server.is_running());
}

#[test]
fn postgres_throwaway_server_survives_kill_and_restart() {
    let test = "postgres_throwaway_server_survives_kill_and_restart";
    let Some(server) = started(test, ThrowawayServer::postgres()) else {
        return;
    };
    assert!(server.url().starts_with("postgres://postgres@127.0.0.1:"));
    survives_kill_and_restart(
        server,
        "CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2), (3)",
        "SELECT count(*) FROM t",
    );
}

#[test]
fn mariadb_throwaway_server_survives_kill_and_restart() {
    let test = "mariadb_throwaway_server_survives_kill_and_restart";
    let Some(server) = started(test, ThrowawayServer::mariadb()) else {
        return;
    };
    assert!(server.url().starts_with("mysql://root@127.0.0.1:"));
    survives_kill_and_restart(
        server,
        "CREATE TABLE t (x int) ENGINE=InnoDB; INSERT INTO t VALUES (1), (2), (3)",
        "SELECT count(*) FROM t",
    );
}

#[test]
fn postgres_throwaway_server_with_password_refuses_a_wrong_one() {
    let test = "postgres_throwaway_server_with_password_refuses_a_wrong_one";
    let Some(server) = started(test, ThrowawayServer::postgres_with_password("s3cr et/pw")) else {
        return;
    };
    assert_eq!(
        server.url(),
        format!(
            "postgres://postgres:s3cr%20et%2Fpw@127.0.0.1:{}/test",
            server.port()
        )
    );
    assert_eq!(
        server.sql("SELECT 1").unwrap(),
        "1",
        "its own client logs in"
    );
    let psql = |password: &str| {
        std::process::Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", &server.port().to_string()])
            .args(["-U", "postgres", "-d", "test", "-X", "-w", "-c", "SELECT 1"])
            .env("PGPASSWORD", password)
            .output()
            .expect("psql runs")
    };
    let wrong = psql("not-the-password");
    assert!(!wrong.status.success(), "a wrong password is refused");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("password authentication failed"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert!(psql("s3cr et/pw").status.success(), "the right one works");
}

/// Whether `openssl verify` accepts the server's certificate under `ca`.
fn verifies(ca: &std::path::Path, cert: &std::path::Path) -> bool {
    std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(ca)
        .arg(cert)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn postgres_throwaway_server_with_tls_encrypts() {
    let test = "postgres_throwaway_server_with_tls_encrypts";
    let Some(server) = started(test, ThrowawayServer::postgres_with_tls()) else {
        return;
    };
    assert_eq!(server.sql("SHOW ssl").unwrap(), "on");
    let tls = server.tls().expect("TLS files");
    assert!(verifies(&tls.ca, &tls.server_cert), "signed by its CA");
    assert!(
        !verifies(&tls.other_ca, &tls.server_cert),
        "not by the other"
    );
    // psql prefers TLS: its own session is encrypted.
    assert_eq!(
        server
            .sql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .unwrap(),
        "t"
    );
    assert!(ThrowawayServer::postgres().unwrap().tls().is_none());
}

#[test]
fn mariadb_throwaway_server_with_tls_encrypts() {
    let test = "mariadb_throwaway_server_with_tls_encrypts";
    let Some(server) = started(test, ThrowawayServer::mariadb_with_tls()) else {
        return;
    };
    assert_eq!(server.sql("SELECT @@have_ssl").unwrap(), "YES", "TLS is on");
    let tls = server.tls().expect("TLS files");
    assert!(verifies(&tls.ca, &tls.server_cert));
}

#[test]
fn mariadb_under_faketime_runs_its_clock_at_an_offset_that_can_step() {
    use distrlock_testkit::{ServerOptions, write_faketime_offset};
    let test = "mariadb_under_faketime_runs_its_clock_at_an_offset_that_can_step";
    let file = std::env::temp_dir().join(format!("distrlock-faketime-{}", std::process::id()));
    write_faketime_offset(&file, "+5s").unwrap();
    let options = match ServerOptions::new().faketime_file(&file) {
        Ok(options) => options,
        Err(error) => return skip(test, &error.to_string()),
    };
    let Some(server) = started(test, ThrowawayServer::mariadb_with(options)) else {
        return;
    };
    let ahead = |server: &ThrowawayServer| -> f64 {
        let server_us: i64 = server
            .sql("SELECT TIMESTAMPDIFF(MICROSECOND, '1970-01-01', UTC_TIMESTAMP(6))")
            .unwrap()
            .parse()
            .unwrap();
        let ours = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        (server_us - ours) as f64 / 1e6
    };
    let before = ahead(&server);
    assert!((4.0..6.0).contains(&before), "5 s ahead: {before}");
    write_faketime_offset(&file, "-3s").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let after = ahead(&server);
    assert!(
        (-4.0..-2.0).contains(&after),
        "stepped to 3 s behind: {after}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn galera_cluster_of_three_replicates_and_a_killed_node_rejoins() {
    use distrlock_testkit::GaleraCluster;
    let test = "galera_cluster_of_three_replicates_and_a_killed_node_rejoins";
    let mut cluster = match GaleraCluster::start_with_offsets(&[None, Some("+1.5s"), None]) {
        Ok(cluster) => cluster,
        Err(error) => return skip(test, &error.to_string()),
    };
    assert_eq!(cluster.status(2, "wsrep_cluster_size").unwrap(), "3");
    cluster
        .sql(
            0,
            "CREATE TABLE t (k INT PRIMARY KEY) ENGINE=InnoDB; INSERT INTO t VALUES (1)",
        )
        .unwrap();
    // Without a causal wait a read on another node may not see the write yet.
    let count = "SET SESSION wsrep_sync_wait = 7; SELECT COUNT(*) FROM t";
    assert_eq!(cluster.sql(1, count).unwrap(), "1");
    let skew: f64 = cluster
        .sql(1, "SELECT UNIX_TIMESTAMP(SYSDATE(6))")
        .unwrap()
        .parse::<f64>()
        .unwrap()
        - cluster
            .sql(0, "SELECT UNIX_TIMESTAMP(SYSDATE(6))")
            .unwrap()
            .parse::<f64>()
            .unwrap();
    assert!((1.2..1.9).contains(&skew), "node 2 is 1.5 s ahead: {skew}");
    cluster.kill(2);
    cluster.sql(0, "INSERT INTO t VALUES (2)").unwrap();
    cluster.restart_node(2).expect("rejoin after kill -9");
    assert_eq!(cluster.sql(2, count).unwrap(), "2");
    assert_eq!(cluster.status(0, "wsrep_cluster_size").unwrap(), "3");
}
