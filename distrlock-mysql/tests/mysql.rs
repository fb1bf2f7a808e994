//! MySQL/MariaDB-specific tests, against the real server
//! (`DISTRLOCK_TEST_MYSQL_URL`). Each test uses a table (or database) of its own.

mod common;

use std::time::{Duration, Instant, SystemTime};

use common::{
    backend, config, drop_table, kill, lazy, raw_conn, recording_opts, server_now_secs,
    session_status, soon, unique,
};
use distrlock_core::{AcquireOutcome, Error, Fence, LockBackend, LockKey, LockState, Token, Ttl};
use distrlock_mysql::mysql_async::prelude::Queryable;
use distrlock_mysql::mysql_async::{Opts, OptsBuilder, TxOpts};
use distrlock_mysql::{MySqlBackend, MySqlConfig};

const LONG: Duration = Duration::from_secs(30);

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).unwrap()
}

fn key(name: &str) -> LockKey {
    LockKey::new(name).unwrap()
}

async fn acquire(
    backend: &MySqlBackend,
    key: &LockKey,
    token: &Token,
    d: Duration,
) -> AcquireOutcome {
    backend
        .try_acquire(key, token, ttl(d), "mysql-test", soon())
        .await
        .expect("try_acquire")
}

fn fence(outcome: AcquireOutcome) -> Fence {
    match outcome {
        AcquireOutcome::Acquired { fence, .. } => fence,
        other => panic!("expected Acquired, got {other:?}"),
    }
}

fn remaining(outcome: AcquireOutcome) -> Duration {
    match outcome {
        AcquireOutcome::Held {
            remaining: Some(left),
        } => left,
        other => panic!("expected Held with a remaining lease, got {other:?}"),
    }
}

/// A backend whose sessions first run `setup` (such as a `time_zone`).
async fn backend_with_setup(
    table: &str,
    setup: &str,
) -> Result<MySqlBackend, distrlock_testkit::Skip> {
    let (opts, _) = recording_opts()?;
    let opts = OptsBuilder::from_opts(opts).setup(vec![setup.to_owned()]);
    let backend = lazy(config(table), opts).expect("valid config");
    common::create_or_skip(&backend).await?;
    Ok(backend)
}

/// Sessions in time zones 25 hours apart (and a DST zone where the server has
/// the named zones loaded) see one lease the same way: refusals report the
/// same remaining lease, expiry hands over on time, and stored instants are UTC.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_in_different_time_zones_contend_correctly() {
    let test = "sessions_in_different_time_zones_contend_correctly";
    let table = unique("dl_tz");
    let mut zones = vec![
        "'+13:00'".to_owned(),
        "'-12:00'".to_owned(),
        "'+05:45'".to_owned(),
        "'SYSTEM'".to_owned(),
    ];
    let mut probe = require!(test, raw_conn().await);
    let named: Option<Option<String>> = probe
        .query_first("SELECT CONVERT_TZ('2024-03-31 00:30:00', 'UTC', 'America/New_York')")
        .await
        .unwrap();
    if named.flatten().is_some() {
        // Two DST zones on opposite hemispheres' schedules.
        zones.push("'America/New_York'".to_owned());
        zones.push("'Australia/Sydney'".to_owned());
    } else {
        eprintln!(
            "NOTE {test}: the server has no named time zones loaded (mysql.time_zone* empty), \
             so this run covers fixed offsets 25 hours apart, not a DST zone"
        );
    }
    let _ = probe.disconnect().await;
    let mut backends = Vec::new();
    for zone in &zones {
        let b = require!(
            test,
            backend_with_setup(&table, &format!("SET time_zone = {zone}")).await
        );
        // The session really is in that zone.
        let mut conn = b.pool().get_conn().await.unwrap();
        let tz: Option<String> = conn
            .query_first("SELECT @@session.time_zone")
            .await
            .unwrap();
        assert_eq!(format!("'{}'", tz.unwrap()), *zone);
        drop(conn);
        backends.push(b);
    }

    let k = key("tz-contended");
    let holder = Token::new();
    let lease = Duration::from_millis(1500);
    let before = SystemTime::now();
    let f1 = fence(acquire(&backends[0], &k, &holder, lease).await);
    for (zone, b) in zones.iter().zip(&backends).skip(1) {
        let left = remaining(acquire(b, &k, &Token::new(), LONG).await);
        assert!(
            left <= lease && left > lease - Duration::from_millis(1000),
            "a session in {zone} sees {left:?} left of a {lease:?} lease"
        );
        let info = b.inspect(&k).await.unwrap().expect("row");
        assert_eq!(info.state, LockState::Held, "{zone}");
        // Stored instants are UTC: within a few seconds of this machine's clock.
        let skew = info
            .acquired_at
            .duration_since(before)
            .unwrap_or_else(|e| e.duration());
        assert!(
            skew < Duration::from_secs(5),
            "{zone}: acquired_at is {skew:?} off"
        );
    }
    tokio::time::sleep(lease + Duration::from_millis(150)).await;
    for (zone, b) in zones.iter().zip(&backends) {
        let info = b.inspect(&k).await.unwrap().expect("row");
        assert_eq!(
            info.state,
            LockState::Expired,
            "{zone} must see the lease expired"
        );
    }
    let taker = Token::new();
    let f2 = fence(acquire(&backends[1], &k, &taker, LONG).await);
    assert!(f2 > f1);
    assert!(matches!(
        backends[0].extend(&k, &holder, ttl(LONG), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    let mut expiries = Vec::new();
    for b in &backends {
        expiries.push(b.inspect(&k).await.unwrap().unwrap().expires_at);
    }
    assert!(
        expiries.windows(2).all(|w| w[0] == w[1]),
        "every zone reads the same expiry: {expiries:?}"
    );
    assert!(matches!(
        backends[2].release(&k, &Token::new(), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    // The holder's token releases from a session in any zone.
    backends[3].release(&k, &taker, soon()).await.unwrap();
    drop_table(&table).await;
}

/// A row locked by another open transaction (here `SELECT … FOR UPDATE`, and an
/// uncommitted insert of a new key): within the row-lock bound (1 s),
/// try-acquire answers `Held` with no remaining lease (busy, holder unknown, as
/// on PostgreSQL), while extend, release and the locked lease's entry of
/// extend_many give a transient error (outcome unknown to the caller, but the
/// statement was rolled back). None of them changes the lease; the batch still
/// renews its other lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn row_locked_by_foreign_transaction_returns_within_bound() {
    let test = "row_locked_by_foreign_transaction_returns_within_bound";
    let table = unique("dl_rowlock");
    let (b, _) = require!(test, backend(config(&table)).await);
    let k = key("row-locked");
    let token = Token::new();
    let f = fence(acquire(&b, &k, &token, LONG).await);
    // A second lease, on a row nobody locks, renewed in the same batch.
    let free = key("row-free");
    let free_token = Token::new();
    fence(acquire(&b, &free, &free_token, LONG).await);
    let before = b.inspect(&k).await.unwrap().expect("row");
    let free_before = b.inspect(&free).await.unwrap().expect("row");

    let mut foreign = require!(test, raw_conn().await);
    let mut tx = foreign.start_transaction(TxOpts::default()).await.unwrap();
    let locked: Option<u64> = tx
        .exec_first(
            format!("SELECT fence FROM `{table}` WHERE lock_key = ? FOR UPDATE"),
            (k.as_str().as_bytes(),),
        )
        .await
        .unwrap();
    assert!(locked.is_some());
    // A key with no row yet, locked by an uncommitted insert.
    let fresh = key("row-locked-new");
    tx.exec_drop(
        format!(
            "INSERT INTO `{table}` (lock_key, token, fence, owner, acquired_at, expires_at) \
             VALUES (?, ?, 1, 'foreign', UTC_TIMESTAMP(6), NULL)"
        ),
        (
            fresh.as_str().as_bytes(),
            Token::new().as_uuid().as_bytes().to_vec(),
        ),
    )
    .await
    .unwrap();

    let bound = Duration::from_secs(1);
    let slack = Duration::from_millis(1500);
    let within_bound = |what: &str, took: Duration| {
        assert!(
            took >= bound - Duration::from_millis(100) && took < bound + slack,
            "{what} returned after {took:?}, bound {bound:?}"
        );
    };
    for (what, k) in [("acquire existing", &k), ("acquire new", &fresh)] {
        let started = Instant::now();
        let outcome = b
            .try_acquire(k, &Token::new(), ttl(LONG), "t", soon())
            .await;
        within_bound(what, started.elapsed());
        assert!(
            matches!(outcome, Ok(AcquireOutcome::Held { remaining: None })),
            "{what}: a row locked by another transaction is busy, holder unknown: {outcome:?}"
        );
    }
    for (what, call) in [("extend", 0), ("extend_many", 1), ("release", 2)] {
        let started = Instant::now();
        let result = match call {
            0 => b.extend(&k, &token, ttl(LONG), soon()).await.map(|_| ()),
            1 => {
                let mut results = b
                    .extend_many(
                        &[(free.clone(), free_token), (k.clone(), token)],
                        ttl(LONG),
                        soon(),
                    )
                    .await
                    .expect("extend_many answers per lease");
                assert!(results[0].is_ok(), "the free lease is renewed: {results:?}");
                results.pop().unwrap().map(|_| ())
            }
            _ => b.release(&k, &token, soon()).await,
        };
        within_bound(what, started.elapsed());
        let error = result.expect_err(what);
        assert!(
            matches!(
                error,
                Error::Backend {
                    transient: true,
                    ..
                }
            ),
            "{what}: outcome unknown is a transient backend error, got {error:?}"
        );
        assert!(
            error.to_string().contains("1205"),
            "{what}: expected a lock wait timeout, got {error}"
        );
    }
    // Nothing changed: same fence, same expiry, still held; the batch's free
    // lease was renewed all the same.
    let after = b.inspect(&k).await.unwrap().expect("row");
    assert_eq!(after.fence, f);
    assert_eq!(after.state, LockState::Held);
    assert_eq!(
        after.expires_at, before.expires_at,
        "the lease is unchanged"
    );
    let free_after = b.inspect(&free).await.unwrap().expect("row");
    assert!(free_after.expires_at > free_before.expires_at);
    assert!(b.inspect(&fresh).await.unwrap().is_none());

    tx.rollback().await.unwrap();
    let _ = foreign.disconnect().await;
    // Once the foreign transaction is gone, everything works again.
    b.extend(&k, &token, ttl(LONG), soon()).await.unwrap();
    fence(acquire(&b, &fresh, &Token::new(), LONG).await);
    b.release(&k, &token, soon()).await.unwrap();
    drop_table(&table).await;
}

/// After `KILL` of every session of the pool, each kind of call succeeds: dead
/// pooled connections are discarded (by the driver's check at checkout, or by the
/// backend's one retry on a connection that answers a ping). A call whose session
/// is killed while it waits fails alone, and the next one works. Over the Unix
/// socket (the driver's default for a local server) and over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sessions_are_recovered_over_the_unix_socket() {
    killed_sessions_case("killed_sessions_are_recovered_over_the_unix_socket", true).await;
}

/// The same over TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_sessions_are_recovered_over_tcp() {
    killed_sessions_case("killed_sessions_are_recovered_over_tcp", false).await;
}

async fn killed_sessions_case(test: &str, prefer_socket: bool) {
    let table = unique("dl_kill");
    let (opts, ids) = require!(test, recording_opts());
    let opts = OptsBuilder::from_opts(opts).prefer_socket(prefer_socket);
    let b = lazy(config(&table), opts).unwrap();
    require!(test, common::create_or_skip(&b).await);
    let mut probe = b.pool().get_conn().await.unwrap();
    let host: Option<String> = probe
        .exec_first(
            "SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = ?",
            (probe.id(),),
        )
        .await
        .unwrap();
    drop(probe);
    let over_socket = host.as_deref() == Some("localhost");
    if over_socket != prefer_socket {
        eprintln!(
            "NOTE {test}: sessions connect from {host:?}, so this run tests the other transport"
        );
    }
    let k = key("killed");
    let token = Token::new();
    let f = fence(acquire(&b, &k, &token, LONG).await);
    // Open several pooled connections so several dead ones wait in the pool.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(b.pool().get_conn().await.unwrap());
    }
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let killed = ids.lock().unwrap().clone();
    assert!(killed.len() >= 4, "sessions opened: {killed:?}");
    for round in 0..2 {
        let sessions = ids.lock().unwrap().clone();
        kill(&sessions).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.extend(&k, &token, ttl(LONG), soon())
            .await
            .unwrap_or_else(|e| panic!("round {round}: extend: {e}"));
        assert_eq!(
            fence(acquire(&b, &k, &token, LONG).await),
            f,
            "round {round}"
        );
        let other = key(&format!("killed-other-{round}"));
        let t2 = Token::new();
        fence(acquire(&b, &other, &t2, LONG).await);
        assert!(b.inspect(&k).await.unwrap().unwrap().is_live());
        assert!(!b.list().await.unwrap().is_empty());
        b.release(&other, &t2, soon()).await.unwrap();
    }

    // A session killed in the middle of a statement: that call fails, the next
    // one succeeds.
    let mut foreign = require!(test, raw_conn().await);
    let mut tx = foreign.start_transaction(TxOpts::default()).await.unwrap();
    tx.exec_drop(
        format!("SELECT fence FROM `{table}` WHERE lock_key = ? FOR UPDATE"),
        (k.as_str().as_bytes(),),
    )
    .await
    .unwrap();
    let waiting = {
        let b = b.clone();
        let k = k.clone();
        tokio::spawn(async move { b.extend(&k, &token, ttl(LONG), soon()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sessions = ids.lock().unwrap().clone();
    kill(&sessions).await;
    let result = waiting.await.unwrap();
    let error = result.expect_err("the row is still locked by the foreign transaction");
    assert!(error.is_transient(), "{error}");
    tx.rollback().await.unwrap();
    let _ = foreign.disconnect().await;
    b.extend(&k, &token, ttl(LONG), soon())
        .await
        .expect("the next call works");
    b.release(&k, &token, soon())
        .await
        .expect("the holder still releases");
    drop_table(&table).await;
}

/// `database.table` names work (here with a reserved word as the table name,
/// which only works because every name is backquoted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qualified_database_table_names_work() {
    let test = "qualified_database_table_names_work";
    let db = unique("dl_db");
    let mut admin = require!(test, raw_conn().await);
    admin
        .query_drop(format!("CREATE DATABASE `{db}`"))
        .await
        .unwrap();
    let table = format!("{db}.select");
    let (b, _) = require!(test, backend(config(&table)).await);
    assert!(b.schema_sql().contains(&format!("`{db}`.`select`")));
    b.create_table().await.expect("create_table is idempotent");
    let k = key("qualified");
    let token = Token::new();
    let f = fence(acquire(&b, &k, &token, LONG).await);
    let info = b.inspect(&k).await.unwrap().expect("row");
    assert_eq!((info.fence, info.state), (f, LockState::Held));
    let count: Option<u64> = admin
        .query_first(format!("SELECT COUNT(*) FROM `{db}`.`select`"))
        .await
        .unwrap();
    assert_eq!(count, Some(1), "the row lives in the named database");
    b.release(&k, &token, soon()).await.unwrap();
    admin
        .query_drop(format!("DROP DATABASE `{db}`"))
        .await
        .unwrap();
    let _ = admin.disconnect().await;
}

/// Injection attempts in the table name are refused before any SQL runs.
#[tokio::test]
async fn injection_in_table_names_is_refused() {
    let opts = Opts::from_url(&common::url()).unwrap();
    for bad in [
        "x`; DROP TABLE y; --",
        "x`.`y",
        "t; DROP DATABASE test",
        "a.b.c",
        "t'",
        "t\"",
        "t/*",
        "`t`",
        "t\0",
        "db.",
        "",
    ] {
        match MySqlConfig::builder().table(bad).opts(opts.clone()).build() {
            Err(Error::InvalidTableName { .. }) => {}
            other => panic!("{bad:?} must be refused, got {other:?}"),
        }
    }
}

/// Two extends (and two same-token acquires) within one clock tick leave the
/// row unchanged, so the server reports 0 changed rows: the backend must still
/// see the lock as held. The session's clock is pinned with `SET timestamp`, to
/// the real clock's reading: the test runs well within the clock tolerance
/// (5.5 s), so the pinned-clock guard lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_extend_within_one_clock_tick_keeps_the_lock() {
    let test = "double_extend_within_one_clock_tick_keeps_the_lock";
    let table = unique("dl_tick");
    // One connection, so the pinned clock applies to every call.
    let (b, _) = require!(
        test,
        backend(config(&table).pool_size(1).min_pool_size(1)).await
    );
    let k = key("tick");
    let token = Token::new();
    let f = fence(acquire(&b, &k, &token, LONG).await);

    let mut conn = b.pool().get_conn().await.unwrap();
    let id = conn.id();
    let now = server_now_secs(&mut conn).await;
    conn.query_drop(format!("SET timestamp = {now:.6}"))
        .await
        .unwrap();
    drop(conn);

    let changed = |b: MySqlBackend| async move {
        let mut conn = b.pool().get_conn().await.unwrap();
        assert_eq!(conn.id(), id, "the pool has one connection");
        let rows: Option<i64> = conn.query_first("SELECT ROW_COUNT()").await.unwrap();
        rows.unwrap()
    };
    b.extend(&k, &token, ttl(LONG), soon())
        .await
        .expect("first extend");
    let first = changed(b.clone()).await;
    b.extend(&k, &token, ttl(LONG), soon())
        .await
        .expect("second extend in the same tick");
    let second = changed(b.clone()).await;
    assert_eq!((first, second), (1, 0), "the second extend changed nothing");
    for _ in 0..2 {
        assert_eq!(fence(acquire(&b, &k, &token, LONG).await), f);
    }
    assert_eq!(
        changed(b.clone()).await,
        0,
        "the same-token acquire changed nothing"
    );
    assert!(matches!(
        acquire(&b, &k, &Token::new(), LONG).await,
        AcquireOutcome::Held { .. }
    ));
    let info = b.inspect(&k).await.unwrap().unwrap();
    let pinned = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(now) + LONG;
    let off = info
        .expires_at
        .unwrap()
        .duration_since(pinned)
        .unwrap_or_else(|e| e.duration());
    assert!(
        off < Duration::from_millis(1),
        "expiry {off:?} off the pinned clock"
    );

    let mut conn = b.pool().get_conn().await.unwrap();
    conn.query_drop("SET timestamp = DEFAULT").await.unwrap();
    drop(conn);
    b.release(&k, &token, soon()).await.unwrap();
    drop_table(&table).await;
}

/// The refusal of a call made with a pinned session clock: the typed error
/// that names the cause.
fn assert_refused_for_pinned_clock<T: std::fmt::Debug>(what: &str, result: Result<T, Error>) {
    match result {
        Err(Error::InvalidConfig { reason }) if reason.contains("@@timestamp") => {}
        other => panic!("{what}: a pinned session clock must be refused, got {other:?}"),
    }
}

type LeaseState = (Fence, String, SystemTime, Option<SystemTime>, LockState);

/// What must not change about a lease: everything but the remaining time.
fn lease_state(info: &distrlock_core::LockInfo) -> LeaseState {
    (
        info.fence,
        info.owner.clone(),
        info.acquired_at,
        info.expires_at,
        info.state,
    )
}

/// A caller's session that pinned its clock with `SET @@timestamp` (an hour in
/// the past, then an hour in the future) gets a typed error from
/// `try_acquire_in` and `release_in`, and nothing changes: no new row, no
/// takeover of a live lease, no renewal of its own lease. With the past clock,
/// an acquire would otherwise report a lease that has already run out on the
/// real clock, and another token would take the key at once; with the future
/// clock it would take over a live lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_session_clock_is_refused_on_the_callers_connection() {
    let test = "pinned_session_clock_is_refused_on_the_callers_connection";
    let table = unique("dl_pinned_in");
    let (b, _) = require!(test, backend(config(&table)).await);
    let held = key("pinned-held");
    let holder = Token::new();
    fence(acquire(&b, &held, &holder, LONG).await);
    let snapshot = lease_state(&b.inspect(&held).await.unwrap().expect("row"));
    let mut own = require!(test, raw_conn().await);
    let ten_minutes = ttl(Duration::from_secs(600));

    for offset in [-3600, 3600] {
        own.query_drop(format!(
            "SET @@timestamp = UNIX_TIMESTAMP(SYSDATE(6)) + {offset}"
        ))
        .await
        .unwrap();
        let pinned: f64 = own
            .query_first("SELECT @@timestamp")
            .await
            .unwrap()
            .unwrap();
        let real: f64 = own
            .query_first("SELECT UNIX_TIMESTAMP(SYSDATE(6))")
            .await
            .unwrap()
            .unwrap();
        assert!(
            ((pinned - real) - f64::from(offset)).abs() < 5.0,
            "the session clock is pinned {offset} s off"
        );

        // A key nobody holds: no row appears, and so another token that takes
        // it on the real clock is its first holder, not a second one.
        let fresh = key(&format!("pinned-fresh{offset}"));
        let mine = Token::new();
        assert_refused_for_pinned_clock(
            &format!("acquire of a new key, clock {offset} s off"),
            b.try_acquire_in(&mut own, &fresh, &mine, ten_minutes, "pinned")
                .await,
        );
        assert!(
            b.inspect(&fresh).await.unwrap().is_none(),
            "{offset}: no row"
        );
        let other = Token::new();
        assert_eq!(
            fence(acquire(&b, &fresh, &other, LONG).await),
            Fence::new(1),
            "{offset}: the first holder on the real clock"
        );
        // Nor can the pinned session sneak in now that the other token holds it.
        assert_refused_for_pinned_clock(
            &format!("acquire of a key held by another token, clock {offset} s off"),
            b.try_acquire_in(&mut own, &fresh, &mine, ten_minutes, "pinned")
                .await,
        );

        // A live lease of another token: no takeover; and its holder's own
        // token on the pinned clock neither renews nor releases it.
        for (what, token) in [("another token", Token::new()), ("the holder", holder)] {
            assert_refused_for_pinned_clock(
                &format!("acquire of a held key by {what}, clock {offset} s off"),
                b.try_acquire_in(&mut own, &held, &token, ten_minutes, "pinned")
                    .await,
            );
        }
        assert_refused_for_pinned_clock(
            &format!("release by the holder, clock {offset} s off"),
            b.release_in(&mut own, &held, &holder).await,
        );
        let info = b.inspect(&held).await.unwrap().expect("row");
        assert_eq!(
            lease_state(&info),
            snapshot,
            "{offset}: the lease is unchanged"
        );
        let info = b.inspect(&fresh).await.unwrap().expect("row");
        assert_eq!(info.fence, Fence::new(1), "{offset}");
        assert_eq!(info.owner, "mysql-test", "{offset}: the real holder's row");
        b.release(&fresh, &other, soon()).await.unwrap();
        own.query_drop("SET @@timestamp = DEFAULT").await.unwrap();
    }

    // The same session with its clock back works as before.
    let k = key("pinned-then-real");
    let mine = Token::new();
    fence(
        b.try_acquire_in(&mut own, &k, &mine, ten_minutes, "real")
            .await
            .unwrap(),
    );
    b.release_in(&mut own, &k, &mine).await.unwrap();
    b.release_in(&mut own, &held, &holder).await.unwrap();
    let _ = own.disconnect().await;
    drop_table(&table).await;
}

/// The pooled path refuses sessions whose clock the pool's own setup pinned
/// (`SET @@timestamp` in the caller's setup statements, which the backend's
/// session setup does not undo): try_acquire, extend, extend_many and release
/// all give the typed error, and no lease changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_pool_sessions_are_refused() {
    let test = "pinned_pool_sessions_are_refused";
    let table = unique("dl_pinned_pool");
    let (real, _) = require!(test, backend(config(&table)).await);
    let held = key("pool-held");
    let holder = Token::new();
    fence(acquire(&real, &held, &holder, LONG).await);
    let snapshot = lease_state(&real.inspect(&held).await.unwrap().expect("row"));

    for offset in [-3600, 3600] {
        let pinned = require!(
            test,
            backend_with_setup(
                &table,
                &format!("SET @@timestamp = UNIX_TIMESTAMP(SYSDATE(6)) + {offset}")
            )
            .await
        );
        let fresh = key(&format!("pool-fresh{offset}"));
        assert_refused_for_pinned_clock(
            &format!("acquire of a new key, clock {offset} s off"),
            pinned
                .try_acquire(&fresh, &Token::new(), ttl(LONG), "pinned", soon())
                .await,
        );
        assert!(
            real.inspect(&fresh).await.unwrap().is_none(),
            "{offset}: no row"
        );
        for (what, token) in [("another token", Token::new()), ("the holder", holder)] {
            assert_refused_for_pinned_clock(
                &format!("acquire of a held key by {what}, clock {offset} s off"),
                pinned
                    .try_acquire(&held, &token, ttl(LONG), "pinned", soon())
                    .await,
            );
        }
        assert_refused_for_pinned_clock(
            &format!("extend, clock {offset} s off"),
            pinned.extend(&held, &holder, ttl(LONG), soon()).await,
        );
        assert_refused_for_pinned_clock(
            &format!("extend_many, clock {offset} s off"),
            pinned
                .extend_many(&[(held.clone(), holder)], ttl(LONG), soon())
                .await,
        );
        assert_refused_for_pinned_clock(
            &format!("release, clock {offset} s off"),
            pinned.release(&held, &holder, soon()).await,
        );
        let info = real.inspect(&held).await.unwrap().expect("row");
        assert_eq!(
            lease_state(&info),
            snapshot,
            "{offset}: the lease is unchanged"
        );
        pinned.disconnect().await.unwrap();
    }
    real.release(&held, &holder, soon()).await.unwrap();
    drop_table(&table).await;
}

/// Keys compare byte for byte: case, trailing and inner white space, and
/// Unicode normalisation all make different keys (a PAD SPACE or accent-folding
/// collation would merge some of them), and each reads back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_byte_exact() {
    let test = "keys_are_byte_exact";
    let table = unique("dl_keys");
    let (b, _) = require!(test, backend(config(&table)).await);
    let names = [
        "a", "A", "a ", "a  ", " a", "a\t", "ss", "ß", "é", "e\u{301}", "ﬃ", "ffi", "😀",
    ];
    for name in names {
        let k = key(name);
        assert_eq!(
            fence(acquire(&b, &k, &Token::new(), LONG).await),
            Fence::new(1),
            "{name:?} must be a key of its own"
        );
    }
    let listed: Vec<String> = b
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.key.into_string())
        .collect();
    let mut expected: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
    expected.sort();
    assert_eq!(
        listed, expected,
        "list returns every key exactly, in byte order"
    );
    drop_table(&table).await;
}

/// Measures, from the server's session status counters on the one connection of
/// the pool, that each operation is exactly one statement (`Questions`), one
/// execution of an already prepared statement (`Com_stmt_execute`,
/// `Com_stmt_prepare`), on the pool path and on the caller's-connection path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operation_is_one_statement() {
    let test = "each_operation_is_one_statement";
    let table = unique("dl_count");
    let (b, _) = require!(
        test,
        backend(config(&table).pool_size(1).min_pool_size(1)).await
    );
    let k = key("counted");
    let token = Token::new();
    let other = Token::new();
    let t = ttl(LONG);

    // Warm up: prepare every statement once on the connection. The backend's
    // first write reads the server's clock first, once: one `SELECT` more.
    let mut conn = b.pool().get_conn().await.unwrap();
    let before = session_status(&mut conn).await;
    drop(conn);
    fence(acquire(&b, &k, &token, LONG).await);
    let mut conn = b.pool().get_conn().await.unwrap();
    let after = session_status(&mut conn).await;
    drop(conn);
    assert_eq!(
        after["Com_select"] - before["Com_select"],
        1,
        "the first write reads the clock"
    );
    b.extend(&k, &token, t, soon()).await.unwrap();
    b.inspect(&k).await.unwrap();
    b.list().await.unwrap();
    b.release(&k, &token, soon()).await.unwrap();

    let mut conn = b.pool().get_conn().await.unwrap();
    let id = conn.id();
    let a = session_status(&mut conn).await;
    let c = session_status(&mut conn).await;
    // What reading the counters costs by itself.
    let base = c["Questions"] - a["Questions"];
    drop(conn);

    macro_rules! counted {
        ($label:expr, $op:expr) => {{
            let mut conn = b.pool().get_conn().await.unwrap();
            let before = session_status(&mut conn).await;
            drop(conn);
            $op;
            let mut conn = b.pool().get_conn().await.unwrap();
            assert_eq!(conn.id(), id, "one connection");
            let after = session_status(&mut conn).await;
            drop(conn);
            let delta = |name: &str| after[name] - before[name];
            let statements = delta("Questions") - base;
            eprintln!(
                "{}: {} statement(s), {} execute(s), {} prepare(s)",
                $label,
                statements,
                delta("Com_stmt_execute"),
                delta("Com_stmt_prepare")
            );
            assert_eq!(statements, 1, "{}: statements", $label);
            assert_eq!(delta("Com_stmt_execute"), 1, "{}: executions", $label);
            assert_eq!(
                delta("Com_stmt_prepare"),
                0,
                "{}: prepared once per connection",
                $label
            );
        }};
    }
    counted!("acquire (won)", fence(acquire(&b, &k, &token, LONG).await));
    counted!(
        "acquire (refused, with remaining lease)",
        remaining(acquire(&b, &k, &other, LONG).await)
    );
    counted!(
        "acquire (same token)",
        fence(acquire(&b, &k, &token, LONG).await)
    );
    counted!("extend", b.extend(&k, &token, t, soon()).await.unwrap());
    counted!(
        "extend (not held)",
        assert!(b.extend(&k, &other, t, soon()).await.is_err())
    );
    counted!("inspect", b.inspect(&k).await.unwrap());
    counted!("list", b.list().await.unwrap());
    counted!("release", b.release(&k, &token, soon()).await.unwrap());

    // The caller's-connection path runs the same statements.
    let mut own = require!(test, raw_conn().await);
    let k2 = key("counted-in");
    fence(
        b.try_acquire_in(&mut own, &k2, &token, t, "in")
            .await
            .unwrap(),
    );
    b.release_in(&mut own, &k2, &token).await.unwrap();
    let before = session_status(&mut own).await;
    fence(
        b.try_acquire_in(&mut own, &k2, &token, t, "in")
            .await
            .unwrap(),
    );
    let middle = session_status(&mut own).await;
    b.release_in(&mut own, &k2, &token).await.unwrap();
    let after = session_status(&mut own).await;
    for (label, x, y) in [
        ("acquire_in", &before, &middle),
        ("release_in", &middle, &after),
    ] {
        assert_eq!(x.len(), y.len());
        assert_eq!(y["Questions"] - x["Questions"] - base, 1, "{label}");
        assert_eq!(y["Com_stmt_execute"] - x["Com_stmt_execute"], 1, "{label}");
        assert_eq!(y["Com_stmt_prepare"] - x["Com_stmt_prepare"], 0, "{label}");
    }
    let _ = own.disconnect().await;
    drop_table(&table).await;
}

/// Acquire and release inside the caller's own transaction: invisible and
/// blocking until commit, undone by rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_and_release_inside_the_callers_transaction() {
    let test = "acquire_and_release_inside_the_callers_transaction";
    let table = unique("dl_tx");
    let (b, _) = require!(test, backend(config(&table)).await);
    let mut own = require!(test, raw_conn().await);
    let t = ttl(LONG);

    // Rolled back: as if it never happened.
    let k = key("tx-rollback");
    let token = Token::new();
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    fence(
        b.try_acquire_in(&mut tx, &k, &token, t, "tx")
            .await
            .unwrap(),
    );
    tx.rollback().await.unwrap();
    assert!(b.inspect(&k).await.unwrap().is_none(), "rolled back");

    // Committed: others wait on the row until then, and see it held after.
    let k = key("tx-commit");
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    let f = fence(
        b.try_acquire_in(&mut tx, &k, &token, t, "tx")
            .await
            .unwrap(),
    );
    let started = Instant::now();
    let blocked = b.try_acquire(&k, &Token::new(), t, "other", soon()).await;
    assert!(
        matches!(blocked, Ok(AcquireOutcome::Held { remaining: None })),
        "an uncommitted acquire makes the key busy, holder unknown: {blocked:?}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "others wait for the row-lock bound (1 s), took {took:?}"
    );
    tx.commit().await.unwrap();
    assert!(matches!(
        acquire(&b, &k, &Token::new(), LONG).await,
        AcquireOutcome::Held { .. }
    ));
    assert_eq!(b.inspect(&k).await.unwrap().unwrap().fence, f);

    // A release rolled back keeps the lock; a release committed ends it.
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    b.release_in(&mut tx, &k, &token).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(b.inspect(&k).await.unwrap().unwrap().is_live());
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    b.release_in(&mut tx, &k, &token).await.unwrap();
    assert!(matches!(
        b.release_in(&mut tx, &k, &token).await,
        Err(Error::NotHeld { .. })
    ));
    tx.commit().await.unwrap();
    assert_eq!(
        b.inspect(&k).await.unwrap().unwrap().state,
        LockState::Released
    );
    let _ = own.disconnect().await;
    drop_table(&table).await;
}

/// `extend_in` inside the caller's own transaction, on the real server: a
/// committed extend moves the expiry on (same fence), a rolled-back one leaves
/// it where it was, and another token's extend is `NotHeld` and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_in_the_callers_transaction_takes_effect_at_commit_only() {
    let test = "extend_in_the_callers_transaction_takes_effect_at_commit_only";
    let table = unique("dl_extend_in");
    let (b, _) = require!(test, backend(config(&table)).await);
    let mut own = require!(test, raw_conn().await);
    let k = key("extend-in");
    let token = Token::new();
    let f = fence(acquire(&b, &k, &token, Duration::from_secs(5)).await);
    let expiry = |info: Option<distrlock_core::LockInfo>| info.unwrap().expires_at.unwrap();
    let first = expiry(b.inspect(&k).await.unwrap());

    // Rolled back: the expiry stays.
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    b.extend_in(&mut tx, &k, &token, ttl(LONG)).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(expiry(b.inspect(&k).await.unwrap()), first, "rolled back");

    // Committed: the lease ends `ttl` after the reading the call returned.
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    let at = b.extend_in(&mut tx, &k, &token, ttl(LONG)).await.unwrap();
    tx.commit().await.unwrap();
    let info = b.inspect(&k).await.unwrap().unwrap();
    assert_eq!(info.fence, f, "an extend keeps the fence");
    assert!(info.is_live());
    let end = info.expires_at.unwrap();
    assert!(end > first, "moved on: {end:?} after {first:?}");
    let drift = end
        .duration_since(at + LONG)
        .unwrap_or_else(|e| e.duration());
    assert!(
        drift < Duration::from_millis(50),
        "ends ttl after {at:?}: {end:?}"
    );

    // Another token holds nothing here.
    assert!(matches!(
        b.extend_in(&mut own, &k, &Token::new(), ttl(LONG)).await,
        Err(Error::NotHeld { .. })
    ));
    assert_eq!(b.inspect(&k).await.unwrap().unwrap().expires_at, Some(end));
    b.release(&k, &token, soon()).await.unwrap();
    assert!(matches!(
        b.extend_in(&mut own, &k, &token, ttl(LONG)).await,
        Err(Error::NotHeld { .. })
    ));
    let _ = own.disconnect().await;
    drop_table(&table).await;
}

/// The documented fence rule of `try_acquire_in`: the fence counts only once
/// the transaction commits. A rolled-back acquire leaves no trace, so the next
/// acquisition gets the same fence number, for a new key and for a takeover;
/// after a commit, the next holding's fence is greater.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_acquire_hands_out_its_fence_again() {
    let test = "rolled_back_acquire_hands_out_its_fence_again";
    let table = unique("dl_txfence");
    let (b, _) = require!(test, backend(config(&table)).await);
    let mut own = require!(test, raw_conn().await);
    let t = ttl(LONG);
    let k = key("tx-fence");

    // A new key: fence 1 in the rolled-back transaction, and fence 1 again.
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    let rolled_back = fence(
        b.try_acquire_in(&mut tx, &k, &Token::new(), t, "tx")
            .await
            .unwrap(),
    );
    tx.rollback().await.unwrap();
    let first = Token::new();
    let f1 = fence(acquire(&b, &k, &first, LONG).await);
    assert_eq!((rolled_back, f1), (Fence::new(1), Fence::new(1)));
    b.release(&k, &first, soon()).await.unwrap();

    // A takeover of the released row: the same number twice too.
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    let rolled_back = fence(
        b.try_acquire_in(&mut tx, &k, &Token::new(), t, "tx")
            .await
            .unwrap(),
    );
    tx.rollback().await.unwrap();
    assert_eq!(b.inspect(&k).await.unwrap().unwrap().fence, f1);
    let second = Token::new();
    let f2 = fence(acquire(&b, &k, &second, LONG).await);
    assert!(rolled_back > f1);
    assert_eq!(
        f2, rolled_back,
        "the rolled-back acquire's fence is handed out again"
    );
    b.release(&k, &second, soon()).await.unwrap();

    // Committed: it counts, and the next holding's fence is greater.
    let mut tx = own.start_transaction(TxOpts::default()).await.unwrap();
    let third = Token::new();
    let f3 = fence(
        b.try_acquire_in(&mut tx, &k, &third, t, "tx")
            .await
            .unwrap(),
    );
    b.release_in(&mut tx, &k, &third).await.unwrap();
    tx.commit().await.unwrap();
    assert!(f3 > f2);
    let f4 = fence(acquire(&b, &k, &Token::new(), LONG).await);
    assert!(f4 > f3, "{f4:?} after the committed {f3:?}");
    let _ = own.disconnect().await;
    drop_table(&table).await;
}

/// Connections with the `CLIENT_FOUND_ROWS` flag (where a refused
/// `ON DUPLICATE KEY UPDATE` reports 1 row, like an insert) read every outcome
/// the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn found_rows_connections_read_outcomes_correctly() {
    let test = "found_rows_connections_read_outcomes_correctly";
    let table = unique("dl_found");
    let (opts, _) = require!(test, recording_opts());
    let opts = OptsBuilder::from_opts(opts).client_found_rows(true);
    let b = lazy(config(&table), opts).unwrap();
    require!(test, common::create_or_skip(&b).await);
    let k = key("found");
    let (a, other) = (Token::new(), Token::new());
    let f = fence(acquire(&b, &k, &a, LONG).await);
    remaining(acquire(&b, &k, &other, LONG).await);
    assert_eq!(fence(acquire(&b, &k, &a, LONG).await), f);
    b.extend(&k, &a, ttl(LONG), soon()).await.unwrap();
    assert!(matches!(
        b.extend(&k, &other, ttl(LONG), soon()).await,
        Err(Error::NotHeld { .. })
    ));
    b.release(&k, &a, soon()).await.unwrap();
    assert!(matches!(
        b.release(&k, &a, soon()).await,
        Err(Error::NotHeld { .. })
    ));
    assert!(fence(acquire(&b, &k, &other, LONG).await) > f);
    drop_table(&table).await;
}

/// A table that does not exist gives the typed schema-missing error with a hint,
/// for every operation; `create_table` is idempotent under concurrency and
/// `schema_sql` is the DDL it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_table_is_typed_and_create_table_is_idempotent() {
    let test = "missing_table_is_typed_and_create_table_is_idempotent";
    let table = unique("dl_missing");
    let (opts, _) = require!(test, recording_opts());
    let b = lazy(config(&table), opts).unwrap();
    let k = key("missing");
    let token = Token::new();
    let results = [
        b.try_acquire(&k, &token, ttl(LONG), "x", soon())
            .await
            .map(|_| ()),
        b.extend(&k, &token, ttl(LONG), soon()).await.map(|_| ()),
        b.release(&k, &token, soon()).await,
        b.inspect(&k).await.map(|_| ()),
        b.list().await.map(|_| ()),
    ];
    for result in results {
        match result {
            Err(Error::SchemaMissing { table: t, hint }) => {
                assert_eq!(t, table);
                assert!(hint.contains("create_table"), "{hint}");
            }
            Err(e) if e.is_transient() => {
                distrlock_testkit::skip(test, &format!("no MySQL/MariaDB server: {e}"));
                return;
            }
            other => panic!("expected SchemaMissing, got {other:?}"),
        }
    }
    let ddl = b.schema_sql();
    for part in [
        "ENGINE=InnoDB",
        "utf8mb4",
        "VARBINARY(255)",
        "DATETIME(6)",
        "PRIMARY KEY (lock_key)",
    ] {
        assert!(ddl.contains(part), "{part} missing from {ddl}");
    }
    let mut creators = Vec::new();
    for _ in 0..4 {
        let b = b.clone();
        creators.push(tokio::spawn(async move { b.create_table().await }));
    }
    for c in creators {
        c.await.unwrap().expect("concurrent create_table");
    }
    b.create_table().await.expect("again");
    fence(acquire(&b, &k, &token, LONG).await);
    drop_table(&table).await;
}

/// The pool's sessions carry the configured bounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_carry_the_configured_bounds() {
    let test = "sessions_carry_the_configured_bounds";
    let table = unique("dl_bounds");
    let (b, _) = require!(
        test,
        backend(
            config(&table)
                .lock_timeout(Duration::from_millis(2500))
                .statement_timeout(Duration::from_secs(7))
        )
        .await
    );
    let mut conn = b.pool().get_conn().await.unwrap();
    let wait: Option<u64> = conn
        .query_first("SELECT @@session.innodb_lock_wait_timeout")
        .await
        .unwrap();
    assert_eq!(wait, Some(3), "2.5 s rounds up to 3 s");
    let version: Option<String> = conn.query_first("SELECT VERSION()").await.unwrap();
    if version.unwrap_or_default().contains("MariaDB") {
        let limit: Option<f64> = conn
            .query_first("SELECT @@session.max_statement_time")
            .await
            .unwrap();
        assert_eq!(limit, Some(7.0));
    }
    drop(conn);
    drop_table(&table).await;
}

/// A server that accepts the TCP connection but never answers: connecting gives
/// up at the connect timeout with `Unavailable`. Needs no database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_timeout_bounds_a_silent_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            open.push(socket);
        }
    });
    let started = Instant::now();
    let result = common::connect_with(
        MySqlConfig::builder().connect_timeout(Duration::from_millis(300)),
        &format!("mysql://root:pw-SECRET@127.0.0.1:{port}/test?prefer_socket=false"),
    )
    .await;
    let took = started.elapsed();
    match result {
        Err(e @ Error::Unavailable { .. }) => {
            assert!(!format!("{e} {e:?}").contains("pw-SECRET"), "{e:?}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    silent.abort();
}

/// Wrong credentials: a permanent error whose text has no password, from the
/// real server; and `Debug` never shows one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_never_appear_in_errors_or_debug() {
    let url = common::url();
    let Some((scheme, rest)) = url.split_once("://") else {
        panic!("test URL without a scheme")
    };
    let host = rest.rsplit('@').next().unwrap();
    let wrong = format!("{scheme}://distrlock_nobody:pw-SECRET-123@{host}");
    let result = MySqlBackend::connect(&wrong).await;
    let error = result.expect_err("unknown user");
    let shown = format!("{error} {error:?}");
    assert!(!shown.contains("pw-SECRET-123"), "{shown}");
    let backend = lazy(MySqlConfig::builder(), Opts::from_url(&wrong).unwrap()).unwrap();
    let shown = format!("{backend:?} {:?}", backend.config());
    assert!(!shown.contains("pw-SECRET-123"), "{shown}");
    assert!(!shown.contains("distrlock_nobody"), "{shown}");
}

/// MariaDB's `SIMULTANEOUS_ASSIGNMENT` SQL mode makes every assignment of an
/// `UPDATE` see the old row. A takeover of a released or expired lease must still
/// set the new expiry, so that the next token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_assignment_mode_keeps_mutual_exclusion() {
    let test = "simultaneous_assignment_mode_keeps_mutual_exclusion";
    let mut conn = require!(test, raw_conn().await);
    let version: String = conn.query_first("SELECT VERSION()").await.unwrap().unwrap();
    if !version.contains("MariaDB") {
        eprintln!("SKIPPED {test}: SIMULTANEOUS_ASSIGNMENT is a MariaDB SQL mode ({version})");
        return;
    }
    let table = unique("dl_simul");
    let b = require!(
        test,
        backend_with_setup(
            &table,
            "SET SESSION sql_mode = CONCAT(@@sql_mode, ',SIMULTANEOUS_ASSIGNMENT')"
        )
        .await
    );
    let mode: String = {
        let (opts, _) = recording_opts().unwrap();
        let mut c = mysql_async::Conn::new(OptsBuilder::from_opts(opts).setup(vec![
            "SET SESSION sql_mode = CONCAT(@@sql_mode, ',SIMULTANEOUS_ASSIGNMENT')".to_owned(),
        ]))
        .await
        .unwrap();
        c.query_first("SELECT @@sql_mode").await.unwrap().unwrap()
    };
    assert!(
        mode.contains("SIMULTANEOUS_ASSIGNMENT"),
        "the mode is on: {mode}"
    );
    // Released row taken over.
    let k = key("released");
    let (a, b_token, c) = (Token::new(), Token::new(), Token::new());
    let f1 = fence(acquire(&b, &k, &a, LONG).await);
    b.release(&k, &a, soon()).await.unwrap();
    let f2 = fence(acquire(&b, &k, &b_token, LONG).await);
    assert!(f2 > f1);
    remaining(acquire(&b, &k, &c, LONG).await);
    assert_eq!(b.inspect(&k).await.unwrap().unwrap().state, LockState::Held);
    b.extend(&k, &b_token, ttl(LONG), soon())
        .await
        .expect("the new holder extends");
    // Expired row taken over.
    let k = key("expired");
    fence(acquire(&b, &k, &a, Duration::from_millis(50)).await);
    tokio::time::sleep(Duration::from_millis(150)).await;
    fence(acquire(&b, &k, &b_token, LONG).await);
    remaining(acquire(&b, &k, &c, LONG).await);
    drop_table(&table).await;
}

/// A session that starts with autocommit off (a server default or a pool's own
/// setup) still commits each acquire: the backend's session setup turns it on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_with_autocommit_off_still_commit() {
    let test = "sessions_with_autocommit_off_still_commit";
    let table = unique("dl_autocommit");
    let first = require!(
        test,
        backend_with_setup(&table, "SET SESSION autocommit = 0").await
    );
    let k = key("committed");
    let holder = Token::new();
    let f = fence(acquire(&first, &k, &holder, LONG).await);
    // Closing every connection of the first backend would roll back anything
    // left uncommitted.
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (second, _) = require!(test, backend(config(&table)).await);
    remaining(acquire(&second, &k, &Token::new(), LONG).await);
    assert_eq!(second.inspect(&k).await.unwrap().unwrap().fence, f);
    drop_table(&table).await;
}

/// The edges of the insert id's layout (see `src/sql.rs`): the largest fence a
/// grant can report is handed out, the next acquire is refused with a permanent
/// error and changes nothing; a holder's remaining lease beyond 19 hours is
/// reported as 19 hours. And the clock readings are the statement's: a new
/// holding starts at the reading and ends `ttl` after it, and so does a renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_id_layout_edges_and_clock_readings() {
    let test = "insert_id_layout_edges_and_clock_readings";
    let table = unique("dl_layout");
    let (b, _) = require!(test, backend(config(&table)).await);
    let mut own = require!(test, raw_conn().await);
    const MAX_FENCE: i64 = (1 << 39) - 1;
    let insert = |key: &str, fence: i64, expires: &str| {
        format!(
            "INSERT INTO `{table}` (lock_key, token, fence, owner, acquired_at, expires_at) \
             VALUES ('{key}', UNHEX(REPEAT('AB', 16)), {fence}, 'seeded', UTC_TIMESTAMP(6), {expires})"
        )
    };
    own.query_drop(insert("edge-fence", MAX_FENCE - 1, "NULL"))
        .await
        .unwrap();
    let k = key("edge-fence");
    let token = Token::new();
    assert_eq!(
        fence(acquire(&b, &k, &token, LONG).await),
        Fence::new(MAX_FENCE)
    );
    b.release(&k, &token, soon()).await.unwrap();
    let before = b.inspect(&k).await.unwrap().unwrap();
    let refused = b
        .try_acquire(&k, &Token::new(), ttl(LONG), "next", soon())
        .await;
    match refused {
        Err(e @ Error::Backend { .. }) => {
            assert!(!e.is_transient(), "{e}");
            assert!(e.to_string().contains("549755813887"), "{e}");
        }
        other => panic!("a fence past the layout must be refused, got {other:?}"),
    }
    assert_eq!(
        b.inspect(&k).await.unwrap().unwrap(),
        before,
        "nothing changed"
    );

    own.query_drop(insert("edge-long", 1, "UTC_TIMESTAMP(6) + INTERVAL 30 DAY"))
        .await
        .unwrap();
    assert_eq!(
        remaining(acquire(&b, &key("edge-long"), &Token::new(), LONG).await),
        Duration::from_millis((1 << 26) - 1),
        "a remaining lease past 2^26 ms is reported as 2^26 - 1 ms"
    );

    let k = key("edge-clock");
    let token = Token::new();
    let lease = Duration::from_secs(20);
    let granted = match acquire(&b, &k, &token, lease).await {
        AcquireOutcome::Acquired { server_time, .. } => server_time,
        other => panic!("{other:?}"),
    };
    let info = b.inspect(&k).await.unwrap().unwrap();
    assert_eq!(
        info.acquired_at, granted,
        "a new holding starts at the reading"
    );
    assert_eq!(info.expires_at, Some(granted + lease));
    let skew = granted
        .duration_since(SystemTime::now())
        .unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(5),
        "the server's clock is {skew:?} off ours"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    let renewed = b.extend(&k, &token, ttl(lease), soon()).await.unwrap();
    assert!(renewed > granted);
    let info = b.inspect(&k).await.unwrap().unwrap();
    assert_eq!(
        info.expires_at,
        Some(renewed + lease),
        "a renewal ends ttl after its reading"
    );
    let batch = b
        .extend_many(&[(k.clone(), token)], ttl(lease), soon())
        .await
        .unwrap();
    let batched = *batch[0].as_ref().unwrap();
    assert!(batched > renewed);
    let info = b.inspect(&k).await.unwrap().unwrap();
    assert_eq!(info.expires_at, Some(batched + lease));
    let _ = own.disconnect().await;
    drop_table(&table).await;
}

/// The statement texts for tools without the backend (`LockSql`, the
/// benchmark's raw-driver baseline) work as documented: a grant is a positive
/// insert id, a refusal a negative one, and a release reports its clock
/// reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_sql_runs_without_the_backend() {
    let test = "lock_sql_runs_without_the_backend";
    let table = unique("dl_locksql");
    let (b, _) = require!(test, backend(config(&table)).await);
    let sql = distrlock_mysql::LockSql::for_table(&distrlock_core::TableName::new(&table).unwrap());
    let mut conn = require!(test, raw_conn().await);
    let reading: Option<i64> = conn.query_first(sql.clock.as_str()).await.unwrap();
    let clock = distrlock_core::server_clock::ServerClock::new();
    clock.observe(tokio::time::Instant::now(), reading.unwrap());
    let acquire = conn.prep(&sql.acquire).await.unwrap();
    let release = conn.prep(&sql.release).await.unwrap();
    let insert_id = async |conn: &mut distrlock_mysql::mysql_async::Conn,
                           stmt: &distrlock_mysql::mysql_async::Statement,
                           params| {
        let result = conn.exec_iter(stmt, params).await.unwrap();
        let id = result.last_insert_id().unwrap_or(0) as i64;
        result.drop_result().await.unwrap();
        id
    };
    let (k, t, other) = ("raw", Token::new(), Token::new());
    let now = clock.bound_micros(tokio::time::Instant::now()).unwrap();
    let params = distrlock_mysql::LockSql::acquire_params(
        k.as_bytes(),
        t.as_uuid().as_bytes(),
        "raw",
        30_000_000,
        now,
    );
    assert!(insert_id(&mut conn, &acquire, params).await > 0, "granted");
    let params = distrlock_mysql::LockSql::acquire_params(
        k.as_bytes(),
        other.as_uuid().as_bytes(),
        "raw",
        30_000_000,
        now,
    );
    assert!(insert_id(&mut conn, &acquire, params).await < 0, "refused");
    let params =
        distrlock_mysql::LockSql::release_params(k.as_bytes(), t.as_uuid().as_bytes(), now);
    let released = insert_id(&mut conn, &release, params).await;
    assert!(
        released >= now,
        "a release reports its clock reading: {released}"
    );
    clock.observe(tokio::time::Instant::now(), released);
    let params =
        distrlock_mysql::LockSql::release_params(k.as_bytes(), t.as_uuid().as_bytes(), now);
    assert_eq!(
        insert_id(&mut conn, &release, params).await,
        0,
        "nothing to release"
    );
    assert_eq!(
        b.inspect(&key(k)).await.unwrap().unwrap().state,
        LockState::Released
    );
    let _ = conn.disconnect().await;
    drop_table(&table).await;
}

/// A table made before the line of waiters: the lock statements fail with a
/// hint, and `create_table` adds the line's columns, keeping the live lock
/// (also in a database named in the table name).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_table_adds_the_line_to_a_table_made_before_it() {
    let test = "create_table_adds_the_line_to_a_table_made_before_it";
    let mut admin = require!(test, raw_conn().await);
    let table = unique("dl_old");
    // The table as the earlier version made it, with a lock held for an hour.
    admin
        .query_drop(format!(
            "CREATE TABLE `{table}` (lock_key VARBINARY(255) NOT NULL, token BINARY(16) NOT NULL, \
             fence BIGINT NOT NULL, owner VARCHAR(255) NOT NULL, acquired_at DATETIME(6) NOT NULL, \
             expires_at DATETIME(6) NULL, PRIMARY KEY (lock_key)) ENGINE=InnoDB"
        ))
        .await
        .unwrap();
    admin
        .query_drop(format!(
            "INSERT INTO `{table}` VALUES ('held-before', UNHEX(REPEAT('ab', 16)), 7, 'old', \
             UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL 1 HOUR)"
        ))
        .await
        .unwrap();
    let (opts, _) = require!(test, recording_opts());
    let b = lazy(config(&table), opts).unwrap();
    let k = key("after");
    let error = b
        .try_acquire(&k, &Token::new(), ttl(LONG), "o", soon())
        .await
        .expect_err("the lock statements need the line's columns");
    assert!(
        error.to_string().contains("create_table"),
        "no hint in: {error}"
    );
    assert!(!error.is_transient(), "{error:?}");
    b.create_table().await.unwrap();
    // Twice: the second finds the columns and changes nothing.
    b.create_table().await.unwrap();
    let token = Token::new();
    fence(acquire(&b, &k, &token, LONG).await);
    b.release(&k, &token, soon()).await.unwrap();
    let held = key("held-before");
    assert!(matches!(
        b.try_acquire(&held, &Token::new(), ttl(LONG), "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    let info = b.inspect(&held).await.unwrap().unwrap();
    assert_eq!((info.fence.get(), info.state), (7, LockState::Held));
    drop_table(&table).await;
    let _ = admin.disconnect().await;
}

/// A connection the backend keeps between calls runs its statements by the
/// ids it prepared them under. The batch renewal has a text per batch size
/// and wait bound: here 16 of them, on one connection whose driver cache
/// holds 16 (the fewest the backend lets it keep), which pushes out older
/// statements and closes them. None of those is ever run by its old id
/// (which a proxy could have given to another statement): the server never
/// refuses one as unknown, every call succeeds, and the table is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_renewals_never_leave_a_closed_statement_kept() {
    let test = "batch_renewals_never_leave_a_closed_statement_kept";
    let table = unique("dl_kept");
    // Two connections: the backend keeps one between calls, and calls made one
    // after the other all run on it.
    let (opts, _) = require!(test, recording_opts());
    let opts = OptsBuilder::from_opts(opts).stmt_cache_size(1);
    let b = require!(
        test,
        common::owned(config(&table).pool_size(2).min_pool_size(1), opts).await
    );
    require!(test, common::create_or_skip(&b).await);
    let held: Vec<(LockKey, Token)> = (0..128)
        .map(|i| (key(&format!("held-{i}")), Token::new()))
        .collect();
    for (k, token) in &held {
        fence(acquire(&b, k, token, LONG).await);
    }
    // 8 batch sizes × 2 wait bounds: 16 new texts, so the acquire's (prepared
    // first, and never looked up by text since) is closed in the driver.
    for ttl_secs in [30, 5] {
        for size in [1, 2, 4, 8, 16, 32, 64, 128] {
            let renewed = b
                .extend_many(&held[..size], ttl(Duration::from_secs(ttl_secs)), soon())
                .await
                .expect("extend_many");
            assert!(renewed.iter().all(Result::is_ok), "{renewed:?}");
        }
    }
    let k = key("after-the-cache-closed-it");
    let token = Token::new();
    assert_eq!(fence(acquire(&b, &k, &token, LONG).await).get(), 1);
    b.release(&k, &token, soon()).await.unwrap();
    assert_eq!(
        b.inspect(&k).await.unwrap().map(|info| info.state),
        Some(LockState::Released)
    );
    // Everything held is still held, by its own token.
    let (first_key, first_token) = &held[0];
    assert!(matches!(
        b.try_acquire(first_key, &Token::new(), ttl(LONG), "o", soon())
            .await
            .unwrap(),
        AcquireOutcome::Held { .. }
    ));
    b.release(first_key, first_token, soon()).await.unwrap();
    assert_eq!(
        b.kept_statements_refused(),
        0,
        "a kept statement was run after the driver's cache closed it"
    );
    b.disconnect().await.unwrap();
    drop_table(&table).await;
}

/// The connections a backend keeps between its calls go back to its pool
/// within a fraction of a second when no call takes them, so code that takes
/// connections from [`MySqlBackend::pool`] gets every one of them, and
/// `disconnect` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_go_back_to_the_pool_when_the_backend_is_idle() {
    let test = "kept_connections_go_back_to_the_pool_when_the_backend_is_idle";
    let table = unique("dl_parked");
    let (b, _) = require!(
        test,
        backend(config(&table).pool_size(3).min_pool_size(1)).await
    );
    // Three calls at once use three connections, which stay with the backend.
    let tokens: Vec<Token> = (0..3).map(|_| Token::new()).collect();
    let keys: Vec<LockKey> = (0..3).map(|i| key(&format!("k{i}"))).collect();
    let (a, c, d) = tokio::join!(
        acquire(&b, &keys[0], &tokens[0], LONG),
        acquire(&b, &keys[1], &tokens[1], LONG),
        acquire(&b, &keys[2], &tokens[2], LONG),
    );
    for outcome in [a, c, d] {
        fence(outcome);
    }
    let started = Instant::now();
    let take_all = async {
        let mut taken = Vec::new();
        for _ in 0..3 {
            taken.push(b.pool().get_conn().await.expect("a pooled connection"));
        }
        taken
    };
    let taken = tokio::time::timeout(Duration::from_secs(5), take_all)
        .await
        .expect("every connection of the pool within 5 s");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    drop(taken);
    // The backend still works, and closes.
    for (k, token) in keys.iter().zip(&tokens) {
        b.release(k, token, soon()).await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(5), b.disconnect())
        .await
        .expect("disconnect returns")
        .unwrap();
    drop_table(&table).await;
}

/// `disconnect` returns while other tasks keep calling: once it has begun, the
/// backend parks no connection again, so the pool gets every one back (before,
/// a steady stream of calls could keep one parked and the pool waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_returns_while_calls_go_on() {
    let test = "disconnect_returns_while_calls_go_on";
    let table = unique("dl_disconnect");
    let (b, _) = require!(
        test,
        backend(config(&table).pool_size(2).min_pool_size(1)).await
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = (0..2)
        .map(|i| {
            let (b, stop) = (b.clone(), stop.clone());
            tokio::spawn(async move {
                let k = key(&format!("busy-{i}"));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // Errors are expected once the pool is closing.
                    let _ = b.inspect(&k).await;
                    // A closed pool refuses at once: let the others run.
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), b.disconnect()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    closed.expect("disconnect returns within 5 s").unwrap();
    drop_table(&table).await;
}
