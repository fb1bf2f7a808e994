//! TLS through rustls (feature `tls`), against the real server.
//!
//! Run with `cargo test -p distrlock-postgres --features tls --test tls`. The
//! positive case needs the server to have `ssl = on` and its certificate readable
//! here (true for a local Debian/Ubuntu server with the snakeoil certificate); it
//! says SKIPPED otherwise, since that is the server's setup, not its reachability.
#![cfg(feature = "tls")]

mod common;

use std::time::Duration;

use common::{soon, unique};
use distrlock_core::{AcquireOutcome, Error, LockBackend, LockKey, Token, Ttl};
use distrlock_postgres::{PostgresBackend, PostgresConfig, TlsConfig, tokio_postgres};

/// The server certificate's PEM and the DNS name it is valid for, or why not.
async fn server_certificate(admin: &tokio_postgres::Client) -> Result<(Vec<u8>, String), String> {
    let ssl: String = admin.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    if ssl != "on" {
        return Err("the server has ssl = off".into());
    }
    let path: String = admin
        .query_one("SHOW ssl_cert_file", &[])
        .await
        .unwrap()
        .get(0);
    let pem = std::fs::read(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
    // The test drives the TLS name through `host` and the address through
    // `hostaddr`, so the certificate's name need not resolve here.
    let name =
        std::env::var("DISTRLOCK_TEST_POSTGRES_TLS_NAME").unwrap_or_else(|_| "localhost".into());
    Ok((pem, name))
}

/// The test server's config, reaching its address but verifying `name`.
async fn pg_for_name(name: &str) -> tokio_postgres::Config {
    let real = common::pg_config();
    let host = match &real.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        #[allow(unreachable_patterns)]
        _ => "localhost".to_owned(),
    };
    let port = real.get_ports().first().copied().unwrap_or(5432);
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .unwrap()
        .next()
        .unwrap();
    let mut pg = tokio_postgres::Config::new();
    pg.host(name).hostaddr(addr.ip()).port(port);
    if let Some(user) = real.get_user() {
        pg.user(user);
    }
    if let Some(password) = real.get_password() {
        pg.password(password);
    }
    if let Some(db) = real.get_dbname() {
        pg.dbname(db);
    }
    pg.ssl_mode(tokio_postgres::config::SslMode::Require);
    pg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_the_servers_ca_encrypts_pool_and_listener() {
    let name = "tls_with_the_servers_ca_encrypts_pool_and_listener";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let (pem, tls_name) = match server_certificate(&admin).await {
        Ok(found) => found,
        Err(why) => {
            eprintln!("SKIPPED {name}: {why}");
            return;
        }
    };
    let table = unique("dl_tls");
    let app = unique("distrlock-tls");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(pg_for_name(&tls_name).await)
            .tls(TlsConfig::from_pem(&pem).unwrap())
            .table(&table)
            .application_name(&app)
            .build()
            .unwrap(),
    )
    .await
    .expect("connects over TLS, trusting the server's certificate");
    backend.create_table().await.unwrap();
    let k = LockKey::new("tls").unwrap();
    let token = Token::new();
    let lease = Ttl::new(Duration::from_secs(5)).unwrap();
    assert!(matches!(
        backend
            .try_acquire(&k, &token, lease, "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
    backend.release(&k, &token, soon()).await.unwrap();
    let rows = admin
        .query(
            "SELECT s.ssl, a.query LIKE 'LISTEN%' FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = $1",
            &[&app],
        )
        .await
        .unwrap();
    assert!(
        rows.len() >= 2,
        "expected pool and listener sessions, got {}",
        rows.len()
    );
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(0)),
        "a session is not encrypted"
    );
    assert!(
        rows.iter().any(|r| r.get::<_, bool>(1)),
        "no listening session"
    );
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_a_certificate_it_does_not_trust() {
    let name = "tls_refuses_a_certificate_it_does_not_trust";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let tls_name = match server_certificate(&admin).await {
        Ok((_, tls_name)) => tls_name,
        Err(why) => {
            eprintln!("SKIPPED {name}: {why}");
            return;
        }
    };
    // A self-signed server certificate is not under the Mozilla roots.
    let result = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(pg_for_name(&tls_name).await)
            .tls(TlsConfig::webpki_roots())
            .build()
            .unwrap(),
    )
    .await;
    match result {
        Err(error @ Error::Unavailable { .. }) => {
            assert!(error.to_string().contains("TLS"), "{error}")
        }
        other => panic!("an untrusted certificate must be refused, got {other:?}"),
    }
}

#[test]
fn tls_config_refuses_pem_without_certificates() {
    assert!(matches!(
        TlsConfig::from_pem(b"not a certificate"),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(TlsConfig::webpki_roots().root_count() > 50);
}
