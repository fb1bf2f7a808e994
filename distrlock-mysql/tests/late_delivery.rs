//! No late effects (contract item 8), against the real server
//! (`DISTRLOCK_TEST_MYSQL_URL`): a lock statement that a frozen network path
//! delivers after its caller gave up changes nothing.
//!
//! Each test sends one call through a `FaultProxy` that is frozen, gives up on it
//! at its `not_after`, waits until the backend has closed that connection (it
//! drops a connection whose call was abandoned or timed out), then thaws the
//! proxy: the held statement and the client's FIN reach the server, which runs
//! and commits the statement as it would after a real network heals. Once the
//! server has closed the sessions that were open through the proxy, it has
//! finished with the late statement, and a direct connection checks that nothing
//! changed.

mod common;

use std::time::Duration;

use common::{backend, config, create_or_skip, drop_table, proxied_opts, raw_conn, soon, unique};
use distrlock_core::{AcquireOutcome, LockBackend, LockInfo, LockKey, Token, Ttl};
use distrlock_mysql::MySqlBackend;
use distrlock_mysql::mysql_async::prelude::Queryable;
use distrlock_testkit::{FaultProxy, Skip};
use tokio::time::Instant;

/// How long the caller waits for each frozen call.
const GIVE_UP: Duration = Duration::from_millis(300);

/// The statement timeout of the proxied backend: its call timeout is 0.5 s more.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(1);

fn key(name: &str) -> LockKey {
    LockKey::new(name).unwrap()
}

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).unwrap()
}

/// A backend reaching the server through a fault proxy (one pooled connection,
/// short timeouts) and one reaching it directly, on a fresh table.
struct Frozen {
    proxy: FaultProxy,
    via_proxy: MySqlBackend,
    ids: common::SessionIds,
    direct: MySqlBackend,
    table: String,
}

impl Frozen {
    async fn new() -> Result<Self, Skip> {
        let table = unique("dl_late");
        let (opts, ids, proxy) = proxied_opts().await?;
        let via_proxy = config(&table)
            .pool_size(1)
            .min_pool_size(1)
            .statement_timeout(STATEMENT_TIMEOUT);
        let via_proxy = common::lazy(via_proxy, opts).expect("test configs are valid");
        create_or_skip(&via_proxy).await?;
        // Prepare every lock statement on the one pooled connection: a first use
        // would wait for its prepare round trip and never send the statement.
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
        let renewed = via_proxy
            .extend_many(&[(warm.clone(), token)], lease, soon())
            .await
            .unwrap();
        assert!(renewed[0].is_ok(), "{renewed:?}");
        via_proxy.release(&warm, &token, soon()).await.unwrap();
        let (direct, _) = backend(config(&table)).await?;
        Ok(Self {
            proxy,
            via_proxy,
            ids,
            direct,
            table,
        })
    }

    /// Runs `call` with the path frozen, giving up at `not_after`; then lets the
    /// backend drop the connection, thaws, and waits until the server is done
    /// with everything the path held.
    async fn send_frozen<F, T>(&self, not_after: Instant, call: F)
    where
        F: std::future::Future<Output = distrlock_core::Result<T>>,
        T: std::fmt::Debug,
    {
        self.proxy.freeze();
        let answer = tokio::time::timeout_at(not_after, call).await;
        gave_up(answer);
        // The backend closes the connection of a call it gave up on, at its call
        // timeout at the latest; the bytes it sent wait in the frozen path.
        tokio::time::sleep(STATEMENT_TIMEOUT + Duration::from_millis(800)).await;
        assert!(
            Instant::now() > not_after + Duration::from_secs(1),
            "delivery must be late"
        );
        let frozen_sessions = self.ids.lock().unwrap().clone();
        self.proxy.thaw();
        // The server runs the late statement, then reads the FIN and ends the
        // session: once none of those sessions is left, it is done.
        let mut admin = raw_conn().await.expect("a direct connection");
        let drained = Instant::now() + Duration::from_secs(10);
        loop {
            let ids = frozen_sessions
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            let left: Option<u64> = admin
                .query_first(format!(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({ids})"
                ))
                .await
                .unwrap();
            if left == Some(0) {
                break;
            }
            assert!(
                Instant::now() < drained,
                "the server never ended the late sessions"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = admin.disconnect().await;
    }

    async fn inspect(&self, k: &LockKey) -> Option<LockInfo> {
        self.direct.inspect(k).await.unwrap()
    }
}

/// Checks the answer of a call through a frozen path: none by `not_after`, or
/// the backend's own transient error just before it.
fn gave_up<T: std::fmt::Debug>(
    answer: Result<distrlock_core::Result<T>, tokio::time::error::Elapsed>,
) {
    assert!(
        answer.is_err() || matches!(&answer, Ok(Err(e)) if e.is_transient()),
        "a frozen path cannot answer, got {answer:?}"
    );
}

/// The setup of a test, or a skip.
macro_rules! frozen {
    ($test:expr) => {
        match Frozen::new().await {
            Ok(f) => f,
            Err(Skip(reason)) => {
                distrlock_testkit::skip($test, &reason);
                return;
            }
        }
    };
}

/// A try-acquire whose request a frozen path delivers after its `not_after`
/// takes no lock, neither on a key without a row (the insert) nor on a released
/// row (the takeover).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_delivered_after_its_bound_takes_no_effect() {
    let f = frozen!("acquire_delivered_after_its_bound_takes_no_effect");
    let lease = ttl(Duration::from_secs(30));
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
        assert_eq!(
            after.map(|i| (i.fence, i.expires_at)),
            before.map(|i| (i.fence, i.expires_at)),
            "{k}: the late acquire changed the row"
        );
    }
    // The backend still works once the path is back.
    assert!(matches!(
        f.via_proxy
            .try_acquire(&absent, &Token::new(), lease, "now", soon())
            .await
            .unwrap(),
        AcquireOutcome::Acquired { .. }
    ));
    drop_table(&f.table).await;
}

/// An extend (single, and in a batch) delivered after its `not_after` does not
/// renew the lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extends_delivered_after_their_bound_take_no_effect() {
    let f = frozen!("extends_delivered_after_their_bound_take_no_effect");
    let k = key("late-extend");
    let token = Token::new();
    // Long enough to be live still when the late extends arrive.
    let lease = ttl(Duration::from_secs(30));
    f.direct
        .try_acquire(&k, &token, lease, "holder", soon())
        .await
        .unwrap();
    let before = f.inspect(&k).await.unwrap();
    let longer = ttl(Duration::from_secs(120));
    let not_after = Instant::now() + GIVE_UP;
    f.send_frozen(not_after, f.via_proxy.extend(&k, &token, longer, not_after))
        .await;
    let after = f.inspect(&k).await.unwrap();
    assert_eq!(
        after.expires_at, before.expires_at,
        "an extend delivered after its not_after renewed the lease"
    );
    let not_after = Instant::now() + GIVE_UP;
    let leases = [(k.clone(), token)];
    f.send_frozen(
        not_after,
        f.via_proxy.extend_many(&leases, longer, not_after),
    )
    .await;
    let after = f.inspect(&k).await.unwrap();
    assert_eq!(
        after.expires_at, before.expires_at,
        "a batch extend delivered after its not_after renewed the lease"
    );
    drop_table(&f.table).await;
}

/// A release delivered after its `not_after` does not end the same token's next
/// holding (a static token that acquired again once the bound had passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_delivered_after_its_bound_does_not_end_a_later_holding() {
    let f = frozen!("release_delivered_after_its_bound_does_not_end_a_later_holding");
    let k = key("late-release");
    let token = Token::new();
    let lease = ttl(Duration::from_secs(30));
    f.direct
        .try_acquire(&k, &token, lease, "first", soon())
        .await
        .unwrap();
    let not_after = Instant::now() + GIVE_UP;
    // The path is frozen only for the release; meanwhile (after its bound)
    // the token's first holding ends and a second one starts, directly.
    let release = f.via_proxy.release(&k, &token, not_after);
    f.proxy.freeze();
    gave_up(tokio::time::timeout_at(not_after, release).await);
    f.direct.release(&k, &token, soon()).await.unwrap();
    let second = match f
        .direct
        .try_acquire(&k, &token, lease, "second", soon())
        .await
        .unwrap()
    {
        AcquireOutcome::Acquired { fence, .. } => fence,
        other => panic!("the token acquires again: {other:?}"),
    };
    // `send_frozen` with nothing left to send: just the late delivery.
    f.send_frozen(
        Instant::now(),
        std::future::pending::<distrlock_core::Result<()>>(),
    )
    .await;
    let after = f.inspect(&k).await.unwrap();
    assert!(
        after.is_live() && after.fence == second,
        "a release delivered after its not_after ended the next holding: {after:?}"
    );
    drop_table(&f.table).await;
}

/// A write that reads its clock before its bound but then waits for a row lock
/// (another transaction's `SELECT … FOR UPDATE`) until after the bound changes
/// nothing once it gets the lock: the acquire's takeover, the extend and the
/// release each compare the bound again after the wait. No proxy here: the
/// caller gives up at `not_after` while the statement still waits in the
/// server, and the other transaction commits after the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_wait_for_a_row_lock_past_their_bound_take_no_effect() {
    let test = "writes_that_wait_for_a_row_lock_past_their_bound_take_no_effect";
    let table = unique("dl_late_wait");
    // A row-lock bound (2 s) longer than the wait the test makes (0.7 s).
    let (b, _) = require!(
        test,
        backend(config(&table).lock_timeout(Duration::from_secs(2))).await
    );
    let lease = ttl(Duration::from_secs(30));
    let (free, held) = (key("wait-free"), key("wait-held"));
    let (old, holder) = (Token::new(), Token::new());
    b.try_acquire(&free, &old, lease, "old", soon())
        .await
        .unwrap();
    b.release(&free, &old, soon()).await.unwrap();
    b.try_acquire(&held, &holder, lease, "holder", soon())
        .await
        .unwrap();
    let longer = ttl(Duration::from_secs(120));
    let calls: [(&str, &LockKey); 3] = [("acquire", &free), ("extend", &held), ("release", &held)];
    for (what, k) in calls {
        let before = b.inspect(k).await.unwrap();
        let mut foreign = require!(test, raw_conn().await);
        let mut tx = foreign
            .start_transaction(distrlock_mysql::mysql_async::TxOpts::default())
            .await
            .unwrap();
        let _: Option<i64> = tx
            .exec_first(
                format!("SELECT fence FROM `{table}` WHERE lock_key = ? FOR UPDATE"),
                (k.as_str().as_bytes(),),
            )
            .await
            .unwrap();
        let not_after = Instant::now() + GIVE_UP;
        let call = {
            let (b, k) = (b.clone(), k.clone());
            tokio::spawn(async move {
                match what {
                    "acquire" => b
                        .try_acquire(&k, &Token::new(), lease, "late", not_after)
                        .await
                        .map(|_| ()),
                    "extend" => b.extend(&k, &holder, longer, not_after).await.map(|_| ()),
                    _ => b.release(&k, &holder, not_after).await,
                }
            })
        };
        tokio::time::sleep_until(not_after + Duration::from_millis(400)).await;
        // The statement still waits in the server; the bound has passed.
        tx.commit().await.unwrap();
        let answer = call.await.unwrap();
        assert!(
            answer.as_ref().is_err_and(|e| e.is_transient()),
            "{what}: the caller gave up at not_after: {answer:?}"
        );
        // Time for the statement to get the lock and finish.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = b.inspect(k).await.unwrap();
        assert_eq!(
            after.as_ref().map(|i| (i.fence, i.expires_at, &i.owner)),
            before.as_ref().map(|i| (i.fence, i.expires_at, &i.owner)),
            "{what}: a write that got its row lock after its bound changed the row"
        );
        let _ = foreign.disconnect().await;
    }
    drop_table(&table).await;
}
