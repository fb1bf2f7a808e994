//! Batched renewal (`extend_many`) against the real server
//! (`DISTRLOCK_TEST_MYSQL_URL`): one lease's trouble must cost that lease only.

mod common;

use std::time::Duration;

use common::{backend, config, drop_table, lazy, proxied_opts, raw_conn, soon, unique};
use distrlock_core::{
    AcquireOutcome, Error, LockBackend, LockGuard, LockKey, LockManager, Token, Ttl,
};
use distrlock_mysql::MySqlBackend;
use distrlock_mysql::mysql_async::prelude::Queryable;
use distrlock_mysql::mysql_async::{Conn, Transaction, TxOpts};
use tokio::time::Instant;

fn key(name: &str) -> LockKey {
    LockKey::new(name).unwrap()
}

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).unwrap()
}

async fn hold(b: &MySqlBackend, k: &LockKey, lease: Duration) -> Token {
    let token = Token::new();
    let outcome = b
        .try_acquire(k, &token, ttl(lease), "renewal-test", soon())
        .await
        .unwrap();
    assert!(
        matches!(outcome, AcquireOutcome::Acquired { .. }),
        "{outcome:?}"
    );
    token
}

async fn guards(manager: &LockManager, names: &[String]) -> Vec<LockGuard> {
    let mut out = Vec::new();
    for name in names {
        out.push(manager.lock(name).unwrap().try_acquire().await.unwrap());
    }
    out
}

/// Locks the rows of `keys` in a transaction on `foreign`, as `SELECT … FOR
/// UPDATE` (or a refused `try_acquire_in`, or any application transaction)
/// would; the locks last until the transaction ends.
async fn lock_rows<'a>(foreign: &'a mut Conn, table: &str, keys: &[&str]) -> Transaction<'a> {
    let mut tx = foreign.start_transaction(TxOpts::default()).await.unwrap();
    for locked in keys {
        let row: Option<i64> = tx
            .exec_first(
                format!("SELECT fence FROM `{table}` WHERE lock_key = ? FOR UPDATE"),
                (locked.as_bytes(),),
            )
            .await
            .unwrap();
        assert!(row.is_some(), "{locked} has a row");
    }
    tx
}

/// Another transaction holds the row lock of one of five leases for 10 s. The
/// other four keep being renewed: `extend_many` answers them `Ok` and the locked
/// one with a transient error (its outcome is unknown, so neither renewed nor
/// `NotHeld`), well within its `not_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_many_renews_the_leases_around_a_locked_row() {
    let test = "extend_many_renews_the_leases_around_a_locked_row";
    let table = unique("dl_rowlock_batch");
    let (b, _) = require!(test, backend(config(&table)).await);
    let raw: Vec<LockKey> = (0..5).map(|i| key(&format!("raw-{i}"))).collect();
    let mut tokens = Vec::new();
    for k in &raw {
        tokens.push(hold(&b, k, Duration::from_secs(30)).await);
    }
    let leases: Vec<(LockKey, Token)> = raw.iter().cloned().zip(tokens).collect();
    let mut foreign = require!(test, raw_conn().await);
    let tx = lock_rows(&mut foreign, &table, &["raw-2"]).await;
    let until = Instant::now() + Duration::from_secs(10);
    let mut rounds = 0;
    while Instant::now() < until {
        let mut before = Vec::new();
        for k in &raw {
            before.push(b.inspect(k).await.unwrap().unwrap().expires_at);
        }
        let started = Instant::now();
        let not_after = started + Duration::from_secs(3);
        let results = tokio::time::timeout_at(
            not_after,
            b.extend_many(&leases, ttl(Duration::from_secs(30)), not_after),
        )
        .await
        .expect("extend_many answers within its not_after")
        .expect("one locked row must not fail the whole batch");
        eprintln!("round {rounds}: {:?}", started.elapsed());
        for (i, result) in results.iter().enumerate() {
            match (i, result) {
                (2, Err(e)) => assert!(
                    e.is_transient() && !matches!(e, Error::NotHeld { .. }),
                    "the locked lease's outcome is unknown: {e:?}"
                ),
                (2, Ok(_)) => panic!("the locked row cannot have been renewed"),
                (_, Ok(_)) => {}
                (_, Err(e)) => panic!("lease {i} failed because of another row's lock: {e}"),
            }
        }
        for (i, k) in raw.iter().enumerate() {
            let after = b.inspect(k).await.unwrap().unwrap().expires_at;
            if i == 2 {
                assert_eq!(after, before[i], "the locked lease is unchanged");
            } else {
                assert!(after > before[i], "lease {i} was renewed");
            }
        }
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(rounds >= 3, "only {rounds} rounds in 10 s");
    tx.rollback().await.unwrap();
    drop_table(&table).await;
}

/// The same through a `LockManager` (ttl 3 s): while another transaction holds
/// one guard's row lock for 10 s, none of the other four guards is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_survive_another_keys_row_lock() {
    let test = "guards_survive_another_keys_row_lock";
    let table = unique("dl_rowlock_guards");
    let (b, _) = require!(test, backend(config(&table)).await);
    let manager = LockManager::builder(std::sync::Arc::new(b.clone()))
        .ttl(Duration::from_secs(3))
        .call_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let names: Vec<String> = (0..5).map(|i| format!("guarded-{i}")).collect();
    let held = guards(&manager, &names).await;
    let mut foreign = require!(test, raw_conn().await);
    let tx = lock_rows(&mut foreign, &table, &["guarded-2"]).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    for (i, guard) in held.iter().enumerate() {
        if i == 2 {
            assert!(
                guard.is_lost(),
                "the locked guard could not renew for 10 s, past its 3 s ttl"
            );
        } else {
            assert!(
                !guard.is_lost(),
                "guard {i} was lost because of another key's row lock"
            );
            assert!(b.inspect(guard.key()).await.unwrap().unwrap().is_live());
        }
    }
    tx.rollback().await.unwrap();
    drop(held);
    drop_table(&table).await;
}

/// The same with a 2 s ttl, as the torture run's managers use: the heartbeat
/// comes every 667 ms, so a renewal that first waits a whole second on the
/// locked row, and only then renews the others, renews them too late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_with_a_short_ttl_survive_another_keys_row_lock() {
    let test = "guards_with_a_short_ttl_survive_another_keys_row_lock";
    let table = unique("dl_rowlock_short");
    let (b, _) = require!(test, backend(config(&table)).await);
    let manager = LockManager::builder(std::sync::Arc::new(b.clone()))
        .ttl(Duration::from_secs(2))
        .call_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let names: Vec<String> = (0..8).map(|i| format!("short-{i}")).collect();
    let held = guards(&manager, &names).await;
    let mut foreign = require!(test, raw_conn().await);
    let tx = lock_rows(&mut foreign, &table, &["short-0"]).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let lost: Vec<String> = held
        .iter()
        .skip(1)
        .filter(|g| g.is_lost())
        .map(|g| format!("{} ({:?})", g.key(), g.loss_reason()))
        .collect();
    tx.rollback().await.unwrap();
    assert!(
        held[0].is_lost(),
        "the locked guard could not renew for 6 s"
    );
    assert!(
        lost.is_empty(),
        "guards lost because of another key's row lock: {lost:?}"
    );
    drop(held);
    drop_table(&table).await;
}

/// 150 leases over a 50 ms round trip, one of them released from another
/// connection: `extend_many` renews the other 149 and reports the released one
/// `NotHeld`, within a 3 s `not_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_many_answers_per_lease_within_its_not_after() {
    let test = "extend_many_answers_per_lease_within_its_not_after";
    let table = unique("dl_one_gone");
    let (opts, _, proxy) = require!(test, proxied_opts().await);
    let slow = lazy(config(&table), opts).unwrap();
    require!(test, common::create_or_skip(&slow).await);
    let (direct, _) = require!(test, backend(config(&table)).await);
    let keys: Vec<LockKey> = (0..150).map(|i| key(&format!("lease-{i:03}"))).collect();
    let mut leases = Vec::new();
    for k in &keys {
        leases.push((k.clone(), hold(&direct, k, Duration::from_secs(30)).await));
    }
    let (gone, gone_token) = leases[77].clone();
    direct.release(&gone, &gone_token, soon()).await.unwrap();
    proxy.set_latency(Duration::from_millis(25));
    let started = Instant::now();
    let not_after = started + Duration::from_secs(3);
    let results = tokio::time::timeout_at(
        not_after,
        slow.extend_many(&leases, ttl(Duration::from_secs(30)), not_after),
    )
    .await
    .expect("extend_many must answer within its not_after")
    .expect("extend_many answers per lease");
    eprintln!("extend_many of 150 over 50 ms took {:?}", started.elapsed());
    for (i, result) in results.iter().enumerate() {
        match (i, result) {
            (77, Err(Error::NotHeld { .. })) => {}
            (77, other) => panic!("the released lease must be NotHeld, got {other:?}"),
            (_, Ok(_)) => {}
            (_, Err(e)) => panic!("lease {i} was not renewed: {e}"),
        }
    }
    drop_table(&table).await;
}

/// Through a `LockManager` with a 3 s call timeout, over a 50 ms round trip:
/// when another connection releases one of 150 guards' leases, only that guard
/// is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guards_survive_another_guards_lost_lease() {
    let test = "guards_survive_another_guards_lost_lease";
    let table = unique("dl_one_gone_guards");
    let (opts, _, proxy) = require!(test, proxied_opts().await);
    let slow = lazy(config(&table), opts).unwrap();
    require!(test, common::create_or_skip(&slow).await);
    let (direct, _) = require!(test, backend(config(&table)).await);
    let manager = LockManager::builder(std::sync::Arc::new(slow.clone()))
        .ttl(Duration::from_secs(6))
        .call_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let names: Vec<String> = (0..150).map(|i| format!("guard-{i:03}")).collect();
    let held = guards(&manager, &names).await;
    let victim = &held[77];
    direct
        .release(victim.key(), &victim.token(), soon())
        .await
        .unwrap();
    proxy.set_latency(Duration::from_millis(25));
    // Three heartbeats (every 2 s) and more than one ttl.
    tokio::time::sleep(Duration::from_secs(7)).await;
    proxy.set_latency(Duration::ZERO);
    let lost: Vec<usize> = held
        .iter()
        .enumerate()
        .filter(|(_, g)| g.is_lost())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(lost, vec![77], "only the released guard is lost");
    drop(held);
    drop_table(&table).await;
}

/// Batched renewal stays cheap: 1,500 leases are renewed with two statements
/// (one per 1,024 leases), so 10,000 held locks cost 10 per heartbeat; with
/// one of them released, one `SELECT` more reads that batch back, and every
/// other lease is still renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_many_costs_one_statement_per_batch() {
    let test = "extend_many_costs_one_statement_per_batch";
    let table = unique("dl_batch_count");
    let (b, _) = require!(
        test,
        backend(config(&table).pool_size(1).min_pool_size(1)).await
    );
    let mut leases = Vec::new();
    for i in 0..1500 {
        let k = key(&format!("count-{i:04}"));
        let token = hold(&b, &k, Duration::from_secs(30)).await;
        leases.push((k, token));
    }
    let lease = ttl(Duration::from_secs(30));
    // Prepare both batch sizes on the one connection.
    b.extend_many(&leases, lease, soon()).await.unwrap();
    let counted = async |b: &MySqlBackend| {
        let mut conn = b.pool().get_conn().await.unwrap();
        common::session_status(&mut conn).await
    };
    let before = counted(&b).await;
    let results = b.extend_many(&leases, lease, soon()).await.unwrap();
    let after = counted(&b).await;
    assert!(results.iter().all(Result::is_ok));
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(
        (
            delta("Com_stmt_execute"),
            delta("Com_update"),
            delta("Com_select")
        ),
        (2, 2, 0),
        "1,500 leases, all held: one UPDATE per 1,024"
    );

    let (gone, gone_token) = leases[1234].clone();
    b.release(&gone, &gone_token, soon()).await.unwrap();
    let before = counted(&b).await;
    let results = b.extend_many(&leases, lease, soon()).await.unwrap();
    let after = counted(&b).await;
    for (i, result) in results.iter().enumerate() {
        match (i, result) {
            (1234, Err(Error::NotHeld { .. })) | (_, Ok(_)) => {}
            (_, other) => panic!("lease {i}: {other:?}"),
        }
    }
    assert!(results[1234].is_err());
    let delta = |name: &str| after[name] - before[name];
    assert_eq!(
        (
            delta("Com_stmt_execute"),
            delta("Com_update"),
            delta("Com_select")
        ),
        (3, 2, 1),
        "one lease gone: its batch is read back once"
    );
    drop_table(&table).await;
}
