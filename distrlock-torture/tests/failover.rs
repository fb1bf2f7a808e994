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
//! - the quarantine ends: a key some worker waits for `max_ttl` plus a stated
//!   slack after the promotion has been granted since the promotion, and every
//!   worker holds a lock again before its run ends (how soon depends on the
//!   keys it draws and how long their holders keep them, so it is reported,
//!   not bounded);
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
use distrlock_torture::checker::{Report, WorkerRun, check, first_holding_after};
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
/// Allowed on top of `MAX_TTL` after the promotion for the quarantine to be
/// over and a waiting key granted: the quarantine's own margin (1 s and
/// 0.2 %), the moving of the connections, the waiters' polling and a round
/// trip.
const KEY_RECOVERY_SLACK: Duration = Duration::from_secs(3);

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

/// The first grant of `key` at or after `since`.
fn first_grant(report: &Report, key: &str, since: u64) -> Option<u64> {
    report
        .holdings
        .get(key)?
        .iter()
        .map(|h| h.start)
        .filter(|&t| t >= since)
        .min()
}

/// The keys some worker was waiting for at `at` that nobody was granted
/// between `since` and `at`, each with that worker and when (ms after
/// `since`) its wait began.
fn starved_keys(
    report: &Report,
    runs: &[WorkerRun],
    since: u64,
    at: u64,
) -> Vec<(String, String, i64)> {
    let mut starved = Vec::new();
    for run in runs {
        for event in &run.events {
            let (key, waited_from, ended) = match event {
                Event::Acquired {
                    key,
                    waited_from,
                    t,
                    ..
                }
                | Event::Failed {
                    key,
                    waited_from,
                    t,
                    ..
                } => (key, *waited_from, *t),
                _ => continue,
            };
            if key.is_empty() || waited_from > at || ended <= at {
                continue;
            }
            if first_grant(report, key, since).is_none_or(|t| t > at) {
                let began = (waited_from as i64 - since as i64) / 1_000_000;
                starved.push((key.clone(), run.name.clone(), began));
            }
        }
    }
    starved
}

/// What each worker did with `key` between `from` and `to` (monotonic
/// nanoseconds), and which other keys it waited for meanwhile, as lines with
/// times in milliseconds after `from`.
fn key_story(runs: &[WorkerRun], key: &str, from: u64, to: u64) -> String {
    let ms = |t: u64| (t as i64 - from as i64) / 1_000_000;
    let mut lines = vec![format!("key {key}, from the promotion on (ms after it):")];
    for run in runs {
        for event in &run.events {
            let line = match event {
                Event::Acquired {
                    key: k,
                    fence,
                    t,
                    hold_ms,
                    waited_from,
                } if *t >= from && *t <= to => format!(
                    "acquired {k} fence {fence} at {} (waited from {}), holds {hold_ms} ms",
                    ms(*t),
                    ms(*waited_from)
                ),
                Event::Ended {
                    key: k,
                    t,
                    lost,
                    reason,
                    ..
                } if *t >= from && *t <= to => {
                    format!("ended {k} at {} lost={lost} {reason:?}", ms(*t))
                }
                Event::Unused { key: k, fence, t } if *t >= from && *t <= to => {
                    format!("unused grant of {k} fence {fence} at {}", ms(*t))
                }
                Event::Failed {
                    key: k,
                    waited_from,
                    error,
                    t,
                } if *t >= from && *waited_from <= to => format!(
                    "failed {k} at {} (waited from {}): {error}",
                    ms(*t),
                    ms(*waited_from)
                ),
                _ => continue,
            };
            lines.push(format!("  {}: {line}", run.name));
        }
    }
    lines.join("\n")
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
    // Each worker's first holding after the promotion: reported, and required
    // before the run ends. No bound on it: a worker may lose the race for its
    // key when the quarantine ends, time out behind a three-ttl hold, pick
    // another key held as long, and so on; that is the workload, not the lock.
    let recovery = first_holding_after(&runs, promoted_at);
    let worst_recovery = recovery.iter().filter_map(|(_, d)| *d).max();
    let unrecovered: Vec<_> = recovery.iter().filter(|(_, d)| d.is_none()).collect();
    // Each key's first grant after the promotion, reported.
    let key_recovery: Vec<(String, Option<Duration>)> = (0..KEYS)
        .map(|i| {
            let key = format!("torture-{i}");
            let first = first_grant(&report, &key, promoted_at)
                .map(|t| Duration::from_nanos(t - promoted_at));
            (key, first)
        })
        .collect();
    let worst_key_recovery = key_recovery.iter().filter_map(|(_, d)| *d).max();
    // What the lock controls: `key_bound` after the promotion, the quarantine
    // is over, so a key that someone is waiting for then must have been
    // granted since the promotion. (A key nobody asks for stays free, and
    // proves nothing either way.)
    let key_bound = MAX_TTL + KEY_RECOVERY_SLACK;
    let starved = starved_keys(
        &report,
        &runs,
        promoted_at,
        promoted_at + key_bound.as_nanos() as u64,
    );
    for (key, _, _) in &starved {
        eprintln!(
            "{}",
            key_story(&runs, key, promoted_at, promoted_at + 12_000_000_000)
        );
    }
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
        "torture[postgres-failover]: {}s, {} workers on {} keys, ttl {:?}, max_ttl {:?}, quarantine {}: acquisitions={} lost_by_guard={} during_lag={} lost_commits={} failover={}ms (kill to writable) moved={}ms | overlaps={} (across the failover {}, worst {}) fence_regressions={} worst_key_recovery={} starved_at_{:?}={} worst_worker_recovery={} hung={} failed={} left_held={}",
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
        starved.len(),
        ms(worst_recovery),
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
        starved.is_empty(),
        "keys waited for {key_bound:?} after the promotion and not granted since it \
         (key, worker, waiting since ms after the promotion): {starved:?}"
    );
    assert!(
        unrecovered.is_empty(),
        "workers that never held a lock again after the promotion: {unrecovered:?}"
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
