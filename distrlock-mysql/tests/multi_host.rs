//! Several hosts in one URL: the backend tries them in order and stays on the
//! first that answers.

mod common;

use std::time::Duration;

use distrlock_core::{AcquireOutcome, LockBackend, LockKey, Token, Ttl};
use distrlock_testkit::skip;

/// A loopback port nothing listens on.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    listener.local_addr().unwrap().port()
}

/// `mysql://user@HOST:PORT/db?…` with `first` put before its host.
fn with_host_before(url: &str, first: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (userinfo, place) = match rest.rsplit_once('@') {
        Some((user, place)) => (format!("{user}@"), place),
        None => (String::new(), rest),
    };
    format!("{scheme}://{userinfo}{first},{place}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_host_dead_connects_to_the_second() {
    let url = with_host_before(&common::url(), &format!("127.0.0.1:{}", dead_port()));
    let table = common::unique("multi_host");
    let backend = match common::connect_with(common::config(&table), &url).await {
        Ok(backend) => backend,
        Err(e) if e.is_transient() && !url.contains(",127.0.0.1") => {
            return skip("first_host_dead_connects_to_the_second", &e.to_string());
        }
        Err(e) => panic!("a URL whose first host is dead: {e}"),
    };
    backend.create_table().await.unwrap();
    let key = LockKey::new("multi-host").unwrap();
    let token = Token::new();
    let got = backend
        .try_acquire(
            &key,
            &token,
            Ttl::new(Duration::from_secs(5)).unwrap(),
            "x",
            common::soon(),
        )
        .await
        .unwrap();
    assert!(matches!(got, AcquireOutcome::Acquired { .. }), "{got:?}");
    backend.release(&key, &token, common::soon()).await.unwrap();
    // Debug names the hosts, never the user or password.
    let shown = format!("{backend:?}");
    assert!(shown.contains(','), "{shown}");
    common::drop_table(&table).await;
}
