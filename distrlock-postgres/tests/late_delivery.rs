//! No late effects (contract item 8), against the real server
//! (`DISTRLOCK_TEST_POSTGRES_URL`): a lock statement that a frozen network path
//! delivers after its caller gave up changes nothing.
//!
//! Each test sends one call through a `FaultProxy` that is frozen, gives up on it
//! at its `not_after`, waits until the backend has closed that connection (it
//! discards a connection whose call was dropped or timed out), then thaws the
//! proxy: the held statement and the client's FIN reach the server, which runs and
//! commits the statement as it would after a real network heals. The proxy keeps
//! the server's side open until the server closes it, so once no connection is
//! open through the proxy the server has finished with the late statement. A
//! direct connection then checks that nothing changed.

mod common;

use std::time::Duration;

use common::{key, soon, ttl, unique, url};
use distrlock_core::{AcquireOutcome, LockBackend, LockInfo, LockKey, LockState, Token};
use distrlock_postgres::{PostgresBackend, PostgresConfig};
use distrlock_testkit::FaultProxy;
use tokio::time::Instant;

/// How long the caller waits for each frozen call.
const GIVE_UP: Duration = Duration::from_millis(300);

/// A backend reaching the server through a fault proxy (one pooled connection,
/// short timeouts, no listener), and one reaching it directly, on a fresh table.
struct Frozen {
    proxy: FaultProxy,
    via_proxy: PostgresBackend,
    direct: PostgresBackend,
    admin: distrlock_postgres::tokio_postgres::Client,
    table: String,
}

impl Frozen {
    async fn new(test: &str) -> Option<Self> {
        let admin = common::admin_or_skip(test).await?;
        let proxy = match common::proxy_to_server().await {
            Ok(proxy) => proxy,
            Err(skip) => {
                distrlock_testkit::skip(test, &skip.0);
                return None;
            }
        };
        let table = unique("dl_late");
        let via_proxy = PostgresBackend::from_config(
            PostgresConfig::builder()
                .pg_config(common::through(&proxy))
                .table(&table)
                .pool_size(1)
                .listen(false)
                .connect_timeout(Duration::from_secs(1))
                .statement_timeout(Duration::from_secs(1))
                .lock_timeout(Duration::from_millis(500))
                .build()
                .unwrap(),
        )
        .await
        .expect("the backend connects through the proxy");
        via_proxy.create_table().await.unwrap();
        // Prepare every lock statement on the one pooled connection: a first use
        // would wait for its Parse round trip and never send the statement itself.
        let (warm, token) = (key("warm-up"), Token::new());
        let lease = ttl(Duration::from_secs(5));
        via_proxy
            .try_acquire(&warm, &token, lease, "warm", soon())
            .await
            .unwrap();
        via_proxy
            .extend(&warm, &token, lease, soon())
            .await
            .unwrap();
        via_proxy.release(&warm, &token, soon()).await.unwrap();
        let direct = PostgresBackend::from_config(
            PostgresConfig::builder()
                .url(url())
                .table(&table)
                .pool_size(2)
                .listen(false)
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
        Some(Self {
            proxy,
            via_proxy,
            direct,
            admin,
            table,
        })
    }

    /// Runs `call` with the path frozen, giving up at `not_after`; then lets the
    /// backend drop the connection, thaws, and waits until the server is done
    /// with everything the path held.
    async fn send_frozen<F, T>(&self, not_after: Instant, call: F)
    where
        F: std::future::Future<Output = T>,
        T: std::fmt::Debug,
    {
        self.proxy.freeze();
        let answer = tokio::time::timeout_at(not_after, call).await;
        assert!(
            answer.is_err(),
            "a frozen path cannot answer, got {answer:?}"
        );
        // The backend closes the connection of a call it gave up on, at its call
        // timeout at the latest; the bytes it sent wait in the frozen path.
        let call_timeout = self.via_proxy.config().call_timeout();
        tokio::time::sleep(call_timeout + Duration::from_millis(300)).await;
        assert!(
            Instant::now() > not_after + Duration::from_secs(1),
            "delivery must be late"
        );
        self.proxy.thaw();
        let drained = Instant::now() + Duration::from_secs(10);
        while self.proxy.open_connections() > 0 {
            assert!(
                Instant::now() < drained,
                "the server never closed the late connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn inspect(&self, k: &LockKey) -> Option<LockInfo> {
        self.direct.inspect(k).await.unwrap()
    }

    async fn drop_table(self) {
        let _ = self
            .admin
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{}\"", self.table))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_delivered_after_its_bound_takes_no_effect() {
    let name = "acquire_delivered_after_its_bound_takes_no_effect";
    let Some(f) = Frozen::new(name).await else {
        return;
    };
    let lease = ttl(Duration::from_secs(30));
    // A key without a row (the insert path), and one whose row is free (the
    // takeover path).
    let (absent, free) = (key("late-absent"), key("late-free"));
    let old = Token::new();
    f.direct
        .try_acquire(&free, &old, lease, "old", soon())
        .await
        .unwrap();
    f.direct.release(&free, &old, soon()).await.unwrap();
    for k in [&absent, &free] {
        let before = f.inspect(k).await;
        let not_after = Instant::now() + GIVE_UP;
        f.send_frozen(
            not_after,
            f.via_proxy
                .try_acquire(k, &Token::new(), lease, "late", not_after),
        )
        .await;
        let after = f.inspect(k).await;
        assert!(
            after.as_ref().is_none_or(|info| !info.is_live()),
            "{k}: an acquire delivered after its not_after took the lock: {after:?}"
        );
        assert_eq!(after, before, "{k}: the late acquire changed the row");
    }
    // The backend still works once the path is back.
    assert!(matches!(
        f.via_proxy
            .try_acquire(&absent, &Token::new(), lease, "now", soon())
            .await
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
    f.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_delivered_after_its_bound_takes_no_effect() {
    let name = "extend_delivered_after_its_bound_takes_no_effect";
    let Some(f) = Frozen::new(name).await else {
        return;
    };
    let k = key("late-extend");
    let token = Token::new();
    // Long enough to be live still when the late extend arrives.
    let lease = Duration::from_secs(20);
    f.direct
        .try_acquire(&k, &token, ttl(lease), "holder", soon())
        .await
        .unwrap();
    let before = f.inspect(&k).await.unwrap();
    let not_after = Instant::now() + GIVE_UP;
    f.send_frozen(
        not_after,
        f.via_proxy
            .extend(&k, &token, ttl(Duration::from_secs(120)), not_after),
    )
    .await;
    let after = f.inspect(&k).await.unwrap();
    assert_eq!(
        after.expires_at, before.expires_at,
        "an extend delivered after its not_after renewed the lease"
    );
    f.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_delivered_after_its_bound_does_not_end_a_later_holding() {
    let name = "release_delivered_after_its_bound_does_not_end_a_later_holding";
    let Some(f) = Frozen::new(name).await else {
        return;
    };
    let k = key("late-release");
    // A static token: the same token holds the key again after the release that
    // did not answer, as core allows once that release's not_after has passed.
    let token = Token::new();
    let lease = ttl(Duration::from_secs(30));
    f.direct
        .try_acquire(&k, &token, lease, "first", soon())
        .await
        .unwrap();
    let not_after = Instant::now() + GIVE_UP;
    f.proxy.freeze();
    let gave_up =
        tokio::time::timeout_at(not_after, f.via_proxy.release(&k, &token, not_after)).await;
    assert!(gave_up.is_err(), "a frozen path cannot answer");
    tokio::time::sleep_until(not_after).await;
    // The next holding of the same token, while the release is still held back.
    f.direct
        .try_acquire(&k, &token, lease, "second", soon())
        .await
        .unwrap();
    // Now deliver the stale release (send_frozen freezes again: a no-op).
    f.send_frozen(not_after, std::future::pending::<()>()).await;
    let after = f.inspect(&k).await.unwrap();
    assert_eq!(
        (after.state, after.owner.as_str()),
        (LockState::Held, "second"),
        "a release delivered after its not_after ended the next holding"
    );
    f.drop_table().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_whose_prepare_answers_after_not_after_is_never_sent() {
    let name = "a_statement_whose_prepare_answers_after_not_after_is_never_sent";
    let Some(admin) = common::admin_or_skip(name).await else {
        return;
    };
    let proxy = match common::proxy_to_server().await {
        Ok(proxy) => proxy,
        Err(skip) => {
            distrlock_testkit::skip(name, &skip.0);
            return;
        }
    };
    // backend → counting proxy → fault proxy → server: the counts are of what
    // the backend sends, before the frozen path holds it.
    let counting = common::counting_proxy::CountingProxy::start(proxy.addr())
        .await
        .unwrap();
    let via = common::through_port(counting.addr.port());
    let table = unique("dl_late_prepare");
    let backend = PostgresBackend::from_config(
        PostgresConfig::builder()
            .pg_config(via)
            .table(&table)
            .pool_size(1)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    backend.create_table().await.unwrap();
    // The acquire statement is not prepared on the connection yet: its first use
    // waits for the Parse round trip before it sends Bind and Execute.
    let k = key("late-prepare");
    let before = counting.counts();
    proxy.freeze();
    let not_after = Instant::now() + GIVE_UP;
    let gave_up = tokio::time::timeout_at(
        not_after,
        backend.try_acquire(
            &k,
            &Token::new(),
            ttl(Duration::from_secs(30)),
            "late",
            not_after,
        ),
    )
    .await;
    assert!(gave_up.is_err(), "a frozen path cannot answer");
    // Thaw while the backend still waits for the Parse (well within its call
    // timeout): the answer comes after not_after.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.thaw();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let sent = counting.counts().since(&before);
    assert_eq!(
        sent.get('E'),
        0,
        "the statement was sent after its not_after: {sent:?}"
    );
    let direct = PostgresBackend::from_config(
        PostgresConfig::builder()
            .url(url())
            .table(&table)
            .listen(false)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    assert!(direct.inspect(&k).await.unwrap().is_none());
    admin
        .batch_execute(&format!("DROP TABLE \"{table}\""))
        .await
        .unwrap();
}
