//! The failover torture test: worker processes take and hold locks on a private
//! PostgreSQL primary with an asynchronous standby ([`PostgresPair`]) while
//! this test makes the standby lag, crashes the primary, promotes the standby
//! and moves the workers' connections to it, as a virtual IP or an HAProxy
//! would. The commits the standby never received are lost: leases the workers
//! were granted, releases, fences. The history checker then proves, from what
//! the workers recorded:
//!
//! - no two holdings of a key overlap, across the failover too (a worker whose
//!   lease was lost still claims it until its guard's deadline; the new primary
//!   must not grant the key to anyone else meanwhile);
//! - fences per key strictly increase in acquisition order, with no repeat of a
//!   fence the old primary handed out and the new one never heard of;
//! - every key is granted again within the table's `max_ttl` plus a stated
//!   slack after the promotion (the quarantine ends), and every worker holds a
//!   lock again within `max_ttl` plus a larger slack (it may lose the race for
//!   its key and wait behind the winner's hold);
//! - no worker hangs or fails; at the end no lock is left held.
//!
//! Each run prints one summary line. `DISTRLOCK_TORTURE_SECS` sets the run time
//! (default 35 s; the failover comes after a third of it). With
//! `DISTRLOCK_TORTURE_QUARANTINE=off` the workers run with
//! `failover_quarantine(false)`, to measure what the quarantine prevents: that
//! run reports overlaps instead of failing on them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use distrlock_testkit::{FaultProxy, PostgresPair, skip};
use distrlock_torture::backends::{self, BackendOptions};
use distrlock_torture::checker::{WorkerRun, check, first_holding_after};
use distrlock_torture::history::{Event, monotonic_ns, read_history};
use distrlock_torture::process::wait_or_kill;

const WORKERS: usize = 6;
const KEYS: usize = 4;
const TTL: Duration = Duration::from_secs(2);
/// The table's longest ttl, and so the quarantine after a failover.
const MAX_TTL: Duration = Duration::from_secs(3);
const HOLD_MAX_MS: u64 = 150;
/// How long the standby lags (replication frozen) before the primary dies,
/// while the workers go on taking locks: at least `LAG`, and until the workers
/// took `LAG_HOLDINGS` locks meanwhile (whose commits are then lost), or
/// `LAG_MAX` has passed.
const LAG: Duration = Duration::from_secs(1);
const LAG_HOLDINGS: usize = 3;
const LAG_MAX: Duration = Duration::from_secs(5);
/// Allowed on top of `MAX_TTL` for every key to be granted again after the
/// promotion: the quarantine's own margin (1 s and 0.2 %), the moving of the
/// connections, a wait that timed out just then, the waiters' polling and a
/// round trip.
const KEY_RECOVERY_SLACK: Duration = Duration::from_secs(3);
/// Allowed on top of `MAX_TTL` for every worker to hold a lock again after the
/// promotion: [`KEY_RECOVERY_SLACK`], and a worker that lost the race for its
/// key when the quarantine ended and waits behind the winner's hold (up to
/// three ttls).
const WORKER_RECOVERY_SLACK: Duration = Duration::from_secs(3 + 3 * 2);

const TABLE: &str = "torture_failover";

fn run_secs() -> u64 {
    std::env::var("DISTRLOCK_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(35)
}

/// `false` under `DISTRLOCK_TORTURE_QUARANTINE=off`.
fn quarantine() -> bool {
    !std::env::var("DISTRLOCK_TORTURE_QUARANTINE").is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

struct Worker {
    proxy: FaultProxy,
    child: Child,
    history: PathBuf,
}

fn spawn_worker(
    dir: &std::path::Path,
    slot: usize,
    port: u16,
    run_for: Duration,
    options: &BackendOptions,
) -> (Child, PathBuf) {
    let history = dir.join(format!("worker-{slot}.jsonl"));
    let child = Command::new(env!("CARGO_BIN_EXE_distrlock-torture-worker"))
        .args([
            format!("postgres://postgres@127.0.0.1:{port}/test"),
            TABLE.to_owned(),
            history.display().to_string(),
            KEYS.to_string(),
            TTL.as_millis().to_string(),
            HOLD_MAX_MS.to_string(),
            run_for.as_millis().to_string(),
            format!("torture-worker-{slot}"),
            options.to_arg(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a torture worker");
    (child, history)
}

/// How many locks the workers took from `since` on, per their histories.
fn holdings_since(workers: &[Worker], since: u64) -> usize {
    workers
        .iter()
        .flat_map(|w| read_history(&w.history).unwrap_or_default())
        .filter(|e| matches!(e, Event::Acquired { t, .. } if *t >= since))
        .count()
}

/// The fence of every key's row, from psql's output (`key|fence`
/// lines), leaving out rows with an empty key (the failover marker).
fn fences(rows: &str) -> BTreeMap<String, i64> {
    rows.lines()
        .filter_map(|line| {
            let (key, fence) = line.split_once('|')?;
            let fence = fence.parse().ok()?;
            (!key.is_empty()).then(|| (key.to_owned(), fence))
        })
        .collect()
}

#[test]
#[ignore = "about a minute: run by scripts/test-all, or with --ignored"]
fn torture_postgres_failover() {
    let test = "torture_postgres_failover";
    let pair = match PostgresPair::start() {
        Ok(pair) => pair,
        Err(error) => return skip(test, &format!("no PostgreSQL pair: {error}")),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(pair));
}

async fn run(mut pair: PostgresPair) {
    let quarantine = quarantine();
    let options = BackendOptions {
        failover_quarantine: quarantine,
        max_ttl: Some(MAX_TTL),
    };
    let dir = std::env::temp_dir().join(format!(
        "distrlock-torture-failover-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let admin = backends::open_with(&pair.primary_url(), TABLE, "torture-admin", &options)
        .await
        .expect("open the admin backend");
    admin.create_table().await.expect("create the lock table");
    drop(admin);
    pair.wait_caught_up().expect("the standby has the table");

    let secs = run_secs();
    let run_for = Duration::from_secs(secs);
    let started = std::time::Instant::now();
    let mut workers = Vec::new();
    for slot in 0..WORKERS {
        let proxy = FaultProxy::start(pair.primary_addr()).await.unwrap();
        let (child, history) = spawn_worker(&dir, slot, proxy.port(), run_for, &options);
        workers.push(Worker {
            proxy,
            child,
            history,
        });
    }

    // The failover, a third of the way in: the standby lags, the workers go
    // on, the primary dies.
    tokio::time::sleep(run_for / 3).await;
    pair.replication_proxy().freeze();
    let lag_from = monotonic_ns();
    tokio::time::sleep(LAG).await;
    let lag_until = std::time::Instant::now() + LAG_MAX - LAG;
    while holdings_since(&workers, lag_from) < LAG_HOLDINGS && std::time::Instant::now() < lag_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed_at = monotonic_ns();
    pair.kill_primary();
    pair.promote().expect("promote the standby");
    let promoted_at = monotonic_ns();
    // What the new primary knows, before any worker reaches it.
    let survived = fences(
        &pair
            .standby()
            .sql(&format!("SELECT lock_key, fence FROM \"{TABLE}\""))
            .expect("read the promoted standby's table"),
    );
    for worker in &workers {
        worker.proxy.set_upstream(pair.standby_addr());
        worker.proxy.cut();
    }
    let moved_at = monotonic_ns();

    // Every worker must finish by itself: its run time, plus one wait and one hold.
    let grace = (started + run_for).max(std::time::Instant::now()) + TTL * 4 + MAX_TTL;
    let mut hung = Vec::new();
    let mut failed = Vec::new();
    let mut runs = Vec::new();
    for (i, worker) in workers.iter_mut().enumerate() {
        let status = wait_or_kill(&mut worker.child, grace).await;
        match status {
            None => hung.push(i),
            Some(status) if !status.success() => failed.push((i, status)),
            Some(_) => {}
        }
        runs.push(WorkerRun {
            name: worker
                .history
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned(),
            events: read_history(&worker.history).unwrap_or_default(),
            killed_at: None,
            owner: format!("torture-worker-{i}"),
        });
    }

    let report = check(&runs);
    // Holdings the old primary granted that the new one never heard of.
    let lost_commits = report
        .holdings
        .iter()
        .flat_map(|(key, holdings)| {
            let survived = survived.get(key).copied().unwrap_or(0);
            holdings
                .iter()
                .filter(move |h| h.start < killed_at && h.fence > survived)
        })
        .count();
    let lagged = report
        .holdings
        .values()
        .flatten()
        .filter(|h| h.start >= lag_from && h.start < killed_at)
        .count();
    let recovery = first_holding_after(&runs, promoted_at);
    let bound = MAX_TTL + WORKER_RECOVERY_SLACK;
    let worst_recovery = recovery.iter().filter_map(|(_, d)| *d).max();
    let unrecovered: Vec<_> = recovery
        .iter()
        .filter(|(_, d)| d.is_none_or(|d| d > bound))
        .collect();
    // Each key's first grant after the promotion.
    let key_bound = MAX_TTL + KEY_RECOVERY_SLACK;
    let key_recovery: Vec<(String, Option<Duration>)> = (0..KEYS)
        .map(|i| {
            let key = format!("torture-{i}");
            let first = report.holdings.get(&key).and_then(|holdings| {
                holdings
                    .iter()
                    .map(|h| h.start)
                    .find(|&t| t >= promoted_at)
                    .map(|t| Duration::from_nanos(t - promoted_at))
            });
            (key, first)
        })
        .collect();
    let worst_key_recovery = key_recovery.iter().filter_map(|(_, d)| *d).max();
    let keys_unrecovered: Vec<_> = key_recovery
        .iter()
        .filter(|(_, d)| d.is_none_or(|d| d > key_bound))
        .collect();
    let worst_overlap = report
        .overlaps
        .iter()
        .map(|(a, b)| Duration::from_nanos(a.end.min(b.end) - b.start))
        .max();
    let across_failover = report
        .overlaps
        .iter()
        .filter(|(a, b)| a.start < killed_at && b.start >= promoted_at)
        .count();

    // At the end no lock is left held.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let admin = backends::open_with(&pair.standby_url(), TABLE, "torture-admin", &options)
        .await
        .expect("open the admin backend on the new primary");
    let still_held: Vec<_> = admin
        .list()
        .await
        .expect("list locks")
        .into_iter()
        .filter(|info| info.is_live())
        .map(|info| info.key.into_string())
        .collect();

    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{}ms", d.as_millis()));
    println!(
        "torture[postgres-failover]: {}s, {} workers on {} keys, ttl {:?}, max_ttl {:?}, quarantine {}: acquisitions={} lost_by_guard={} during_lag={} lost_commits={} failover={}ms (kill to writable) moved={}ms | overlaps={} (across the failover {}, worst {}) fence_regressions={} worst_key_recovery={} (bound {:?}) worst_worker_recovery={} (bound {:?}) hung={} failed={} left_held={}",
        secs,
        WORKERS,
        KEYS,
        TTL,
        MAX_TTL,
        if quarantine { "on" } else { "off" },
        report.acquisitions(),
        report.lost,
        lagged,
        lost_commits,
        (promoted_at - killed_at) / 1_000_000,
        (moved_at - promoted_at) / 1_000_000,
        report.overlaps.len(),
        across_failover,
        ms(worst_overlap),
        report.fence_regressions.len(),
        ms(worst_key_recovery),
        key_bound,
        ms(worst_recovery),
        bound,
        hung.len(),
        failed.len(),
        still_held.len(),
    );

    assert!(
        lost_commits > 0,
        "the failover lost no commit: the run proves nothing (holdings during the lag: {lagged})"
    );
    assert!(
        report.fence_regressions.is_empty(),
        "fence regressions or repeats: {:#?}",
        report.fence_regressions
    );
    if quarantine {
        assert!(
            report.overlaps.is_empty(),
            "overlapping holdings: {:#?}",
            report.overlaps
        );
    }
    assert!(
        keys_unrecovered.is_empty(),
        "keys not granted again within {key_bound:?} of the promotion: {keys_unrecovered:?}"
    );
    assert!(
        unrecovered.is_empty(),
        "workers that did not hold a lock within {bound:?} of the promotion: {unrecovered:?}"
    );
    assert!(
        report.acquisitions() > 30,
        "too few acquisitions to mean anything: {}",
        report.acquisitions()
    );
    assert!(hung.is_empty(), "workers that hung: {hung:?}");
    assert!(failed.is_empty(), "workers that failed: {failed:?}");
    assert!(
        still_held.is_empty(),
        "locks left held at the end: {still_held:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
