//! More torture runs on MariaDB, each with worker processes (the same
//! `distrlock-torture-worker` as `tests/torture.rs`) and the same history
//! checker:
//!
//! - **Galera**: a private 3-node cluster, workers spread over the nodes (each
//!   given its own node first, then the others), one node's clock 1.5 s ahead
//!   (libfaketime) with `max_clock_skew=2s`, one node killed and rejoined
//!   while they work: 0 overlaps, fences strictly increasing per key.
//! - **Clock steps**: a private server under libfaketime whose clock steps by
//!   ±(ttl + 1 s) at run time. Without `max_clock_skew` a forward step may make
//!   two holders overlap, by at most one heartbeat interval plus one round
//!   trip (contract item 4; the checker's stated allowance); with
//!   `max_clock_skew` larger than the step, never.
//! - **Foreign row lock**: another session holds one key's row (`SELECT … FOR
//!   UPDATE` in an open transaction) for two ttls, again and again: no guard of
//!   any other key is lost meanwhile, neither a worker's nor one of the eight
//!   guards of a manager whose batch renewal includes the locked row.
//!
//! Each run prints one summary line. `DISTRLOCK_TORTURE_SECS` sets the run
//! time (default 40 s per run; the Galera run takes at least 45 s).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{LockManager, RetryPolicy};
use distrlock_testkit::{
    GaleraCluster, ServerOptions, ThrowawayServer, skip, write_faketime_offset,
};
use distrlock_torture::backends;
use distrlock_torture::checker::{CheckOptions, Report, WorkerRun, check_with, losses_during};
use distrlock_torture::history::{monotonic_ns, read_history};
use distrlock_torture::process::wait_or_kill;

const KEYS: usize = 5;
const TTL: Duration = Duration::from_secs(2);
const HOLD_MAX_MS: u64 = 150;
const TABLE: &str = "torture_locks";
/// The step of the clock-step runs: ttl + 1 s, each way.
const STEP: Duration = Duration::from_secs(3);
/// The heartbeat interval of the workers' managers (a third of the ttl).
const HEARTBEAT: Duration = Duration::from_millis(667);
/// One round trip of an extend, generously (a loopback server under load).
const ROUND_TRIP: Duration = Duration::from_millis(150);

fn run_secs() -> u64 {
    std::env::var("DISTRLOCK_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Worker processes, one per URL, until `run_until`.
struct Workers {
    dir: PathBuf,
    children: Vec<(Child, PathBuf, String)>,
}

impl Workers {
    fn spawn(name: &str, urls: &[String], run_until: std::time::Instant) -> Self {
        let dir =
            std::env::temp_dir().join(format!("distrlock-torture-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let left = run_until.saturating_duration_since(std::time::Instant::now());
        let children = urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let history = dir.join(format!("worker-{i}.jsonl"));
                let owner = format!("torture-worker-{i}");
                let child = Command::new(env!("CARGO_BIN_EXE_distrlock-torture-worker"))
                    .args([
                        url.clone(),
                        TABLE.to_owned(),
                        history.display().to_string(),
                        KEYS.to_string(),
                        TTL.as_millis().to_string(),
                        HOLD_MAX_MS.to_string(),
                        left.as_millis().to_string(),
                        owner.clone(),
                    ])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit())
                    .spawn()
                    .expect("start a torture worker");
                (child, history, owner)
            })
            .collect();
        Self { dir, children }
    }

    /// Waits for every worker to finish by itself (its run time, plus one wait
    /// and one hold); returns the runs, the hung and the failed ones.
    async fn finish(mut self, run_until: std::time::Instant) -> Finished {
        let grace = std::time::Instant::now().max(run_until) + TTL * 3 + Duration::from_secs(10);
        let mut finished = Finished::default();
        for (i, (child, history, owner)) in self.children.iter_mut().enumerate() {
            let status = wait_or_kill(child, grace).await;
            match status {
                None => finished.hung.push(i),
                Some(status) if !status.success() => finished.failed.push(i),
                Some(_) => {}
            }
            finished.runs.push(WorkerRun {
                name: history.file_name().unwrap().to_string_lossy().into_owned(),
                events: read_history(history).unwrap_or_default(),
                killed_at: None,
                owner: owner.clone(),
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        finished
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for (child, _, _) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[derive(Default)]
struct Finished {
    runs: Vec<WorkerRun>,
    hung: Vec<usize>,
    failed: Vec<usize>,
}

impl Finished {
    /// The checks every run makes: the guarantees the checker proves, enough
    /// work, and workers that ended by themselves.
    fn assert_sound(&self, report: &Report) {
        assert!(
            report.overlaps.is_empty(),
            "overlapping holdings: {:#?}",
            report.overlaps
        );
        assert!(
            report.fence_regressions.is_empty(),
            "fence regressions or repeats: {:#?}",
            report.fence_regressions
        );
        assert!(
            report.acquisitions() > 50,
            "too few acquisitions to mean anything: {}",
            report.acquisitions()
        );
        assert!(self.hung.is_empty(), "workers that hung: {:?}", self.hung);
        assert!(
            self.failed.is_empty(),
            "workers that failed: {:?}",
            self.failed
        );
    }
}

/// `url` kept on TCP (mysql_async would switch a loopback connection to the
/// server's socket), with `extra` parameters.
fn tcp(url: &str, extra: &str) -> String {
    format!("{url}?prefer_socket=false{extra}")
}

async fn create_table(url: &str) {
    let admin = backends::open(url, TABLE, "torture-admin")
        .await
        .expect("open the admin backend");
    admin.create_table().await.expect("create the lock table");
}

fn ms(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

// ---------------------------------------------------------------------------
// Galera

/// Three nodes, node 3's clock 1.5 s ahead, `max_clock_skew=2s`; two workers
/// per node, each given its node first; node 1 killed a quarter into the run
/// and rejoined at half time.
#[test]
#[ignore = "about a minute and a half: run by scripts/test-all, or with --ignored"]
fn torture_galera() {
    let test = "torture_galera";
    let cluster = match GaleraCluster::start_with_offsets(&[None, None, Some("+1.5s")]) {
        Ok(cluster) => cluster,
        Err(error) => return skip(test, &error.to_string()),
    };
    runtime().block_on(galera(cluster));
}

async fn galera(cluster: GaleraCluster) {
    let secs = run_secs().max(45);
    let skew = "&max_clock_skew=2s";
    create_table(&tcp(&cluster.url(0), skew)).await;
    let orders = [[0, 1, 2], [1, 2, 0], [2, 0, 1]];
    let urls: Vec<String> = (0..6)
        .map(|i| tcp(&cluster.multi_host_url(&orders[i % 3]), skew))
        .collect();
    let started = std::time::Instant::now();
    let run_until = started + Duration::from_secs(secs);
    let workers = Workers::spawn("galera", &urls, run_until);
    let cluster = Arc::new(std::sync::Mutex::new(cluster));

    tokio::time::sleep(Duration::from_secs(secs / 4)).await;
    let killed_at = monotonic_ns();
    cluster.lock().unwrap().kill(0);
    tokio::time::sleep(Duration::from_secs(secs / 4)).await;
    let rejoin_started = std::time::Instant::now();
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.lock().unwrap().restart_node(0))
        .await
        .unwrap()
        .expect("node 1 rejoins");
    let rejoin = rejoin_started.elapsed();
    let rejoined_at = monotonic_ns();

    let finished = workers.finish(run_until).await;
    let report = check_with(&finished.runs, &CheckOptions::default());
    // Acquisitions while node 1 was down, and after it came back.
    let between = |from: u64, until: u64| {
        report
            .holdings
            .values()
            .flatten()
            .filter(|h| h.start >= from && h.start < until)
            .count()
    };
    let while_down = between(killed_at, rejoined_at);
    let after = between(rejoined_at, u64::MAX);
    let size = cluster
        .lock()
        .unwrap()
        .status(0, "wsrep_cluster_size")
        .unwrap_or_default();
    println!(
        "torture[galera]: {secs}s, 3 nodes (node 3 +1.5 s, max_clock_skew 2 s), 6 workers on {KEYS} keys, ttl {TTL:?}: acquisitions={} (while node 1 was down: {while_down}, after it rejoined: {after}) lost_by_guard={} node_kills=1 rejoin_ist_or_sst={} cluster_size_after={size} | overlaps={} fence_regressions={} hung={} failed={}",
        report.acquisitions(),
        report.lost,
        ms(rejoin),
        report.overlaps.len(),
        report.fence_regressions.len(),
        finished.hung.len(),
        finished.failed.len(),
    );
    finished.assert_sound(&report);
    assert!(
        while_down > 5 && after > 5,
        "work went on while node 1 was down ({while_down}) and after it rejoined ({after})"
    );
    assert_eq!(size, "3", "node 1 is back in the cluster");
}

// ---------------------------------------------------------------------------
// Clock steps

/// The server's clock steps +3 s, back, −3 s and back while the workers run;
/// no `max_clock_skew`: overlaps only within one heartbeat plus one round trip.
#[test]
#[ignore = "about a minute: run by scripts/test-all, or with --ignored"]
fn torture_mariadb_clock_steps() {
    clock_steps("torture_mariadb_clock_steps", None);
}

/// The same steps with `max_clock_skew=4s`, more than the step: no overlap at
/// all.
#[test]
#[ignore = "about a minute: run by scripts/test-all, or with --ignored"]
fn torture_mariadb_clock_steps_with_max_clock_skew() {
    clock_steps(
        "torture_mariadb_clock_steps_with_max_clock_skew",
        Some(Duration::from_secs(4)),
    );
}

fn clock_steps(test: &str, grace: Option<Duration>) {
    let file = std::env::temp_dir().join(format!(
        "distrlock-faketime-{}-{:x}",
        std::process::id(),
        fastrand::u64(..)
    ));
    if let Err(error) = write_faketime_offset(&file, "+0") {
        return skip(test, &error.to_string());
    }
    let server = match ServerOptions::new()
        .faketime_file(&file)
        .and_then(ThrowawayServer::mariadb_with)
    {
        Ok(server) => server,
        Err(error) => {
            let _ = std::fs::remove_file(&file);
            return skip(test, &error.to_string());
        }
    };
    runtime().block_on(run_clock_steps(&server, &file, grace));
    let _ = std::fs::remove_file(&file);
}

async fn run_clock_steps(server: &ThrowawayServer, file: &Path, grace: Option<Duration>) {
    let secs = run_secs();
    let extra = grace.map_or(String::new(), |g| {
        format!("&max_clock_skew={}ms", g.as_millis())
    });
    let url = tcp(&server.url(), &extra);
    create_table(&url).await;
    let started = std::time::Instant::now();
    let run_until = started + Duration::from_secs(secs);
    let workers = Workers::spawn("clock-steps", &vec![url; 6], run_until);
    let step = format!("{}s", STEP.as_secs());
    // Forward, back (a backward step), backward, back (a forward step).
    let schedule = [
        format!("+{step}"),
        "+0".into(),
        format!("-{step}"),
        "+0".into(),
    ];
    let every = Duration::from_secs(secs) / (schedule.len() as u32 + 1);
    let mut steps = 0;
    for offset in &schedule {
        tokio::time::sleep(every).await;
        write_faketime_offset(file, offset).expect("step the server's clock");
        steps += 1;
    }
    let finished = workers.finish(run_until).await;
    let options = match grace {
        None => CheckOptions::clock_step(HEARTBEAT, ROUND_TRIP),
        Some(_) => CheckOptions::default(),
    };
    let report = check_with(&finished.runs, &options);
    let worst_tolerated = report.tolerated_overlaps.iter().map(|o| o.2).max();
    let reasons = loss_reasons(&report);
    println!(
        "torture[mariadb-clock-steps]: {secs}s, 6 workers on {KEYS} keys, ttl {TTL:?}, steps={steps} of ±{STEP:?}, max_clock_skew={}: acquisitions={} lost_by_guard={} ({reasons}) | overlaps={} (beyond the allowance {}) tolerated_overlaps={} worst={} fence_regressions={} hung={} failed={}",
        grace.map_or("0".into(), ms),
        report.acquisitions(),
        report.lost,
        report.overlaps.len(),
        ms(options.overlap_allowance),
        report.tolerated_overlaps.len(),
        worst_tolerated.map_or("-".into(), ms),
        report.fence_regressions.len(),
        finished.hung.len(),
        finished.failed.len(),
    );
    finished.assert_sound(&report);
    if grace.is_some() {
        assert!(report.tolerated_overlaps.is_empty());
    }
}

/// `reason=count` for every loss reason seen.
fn loss_reasons(report: &Report) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for h in report.holdings.values().flatten() {
        if let Some(reason) = &h.lost {
            *counts.entry(reason.as_str()).or_default() += 1;
        }
    }
    let parts: Vec<String> = counts.iter().map(|(r, n)| format!("{r}={n}")).collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(" ")
    }
}

// ---------------------------------------------------------------------------
// Foreign row lock

/// The key whose row another session locks.
const LOCKED_KEY: &str = "torture-0";
/// The keys of the test's own manager, which holds them all at once; the
/// first is locked along with `LOCKED_KEY`.
const BATCH_KEYS: usize = 8;

/// Another session locks one worker key's row and one of eight rows that a
/// manager renews in one batch, for two ttls, four times: no other guard is
/// lost.
#[test]
#[ignore = "about a minute: run by scripts/test-all, or with --ignored"]
fn torture_mariadb_foreign_row_lock() {
    let test = "torture_mariadb_foreign_row_lock";
    let server = match ThrowawayServer::mariadb() {
        Ok(server) => server,
        Err(error) => return skip(test, &error.to_string()),
    };
    runtime().block_on(foreign_row_lock(Arc::new(server)));
}

async fn foreign_row_lock(server: Arc<ThrowawayServer>) {
    let secs = run_secs();
    let url = tcp(&server.url(), "");
    create_table(&url).await;
    // The test's own manager, holding BATCH_KEYS guards at once: its heartbeat
    // renews them in one extend_many.
    let backend = backends::open(&url, TABLE, "torture-batch").await.unwrap();
    let manager = LockManager::builder(backend)
        .ttl(TTL)
        .owner("torture-batch")
        .call_timeout(TTL)
        .retry_policy(RetryPolicy::default().with_max_delay(Duration::from_millis(200)))
        .build()
        .unwrap();
    let mut batch = Vec::new();
    for i in 0..BATCH_KEYS {
        let guard = manager
            .lock(format!("batch-{i}"))
            .unwrap()
            .acquire_timeout(TTL * 2)
            .await
            .expect("the batch keys are free");
        batch.push(guard);
    }
    let started = std::time::Instant::now();
    let run_until = started + Duration::from_secs(secs);
    let workers = Workers::spawn("row-lock", &vec![url; 6], run_until);
    let faults = 4;
    let every = Duration::from_secs(secs) / (faults + 1);
    let hold = TTL * 2;
    let mut windows = Vec::new();
    for _ in 0..faults {
        tokio::time::sleep(every.saturating_sub(hold)).await;
        let server = server.clone();
        let from = monotonic_ns();
        let locked = tokio::task::spawn_blocking(move || {
            // One equality lookup per row: a locking read of an IN list
            // would take a range scan's next-key locks, on the next rows too.
            server.sql(&format!(
                "BEGIN; \
                 SELECT lock_key FROM {TABLE} WHERE lock_key = '{LOCKED_KEY}' FOR UPDATE; \
                 SELECT lock_key FROM {TABLE} WHERE lock_key = 'batch-0' FOR UPDATE; \
                 DO SLEEP({}); COMMIT",
                hold.as_secs_f64()
            ))
        })
        .await
        .unwrap()
        .expect("the foreign transaction");
        let until = monotonic_ns();
        assert!(
            locked.contains("batch-0"),
            "the rows were locked: {locked:?}"
        );
        windows.push((from, until));
    }
    // Each batch guard other than the locked one is still held.
    let batch_lost: Vec<String> = batch
        .iter()
        .skip(1)
        .filter(|g| g.is_lost())
        .map(|g| format!("{} ({:?})", g.key(), g.loss_reason()))
        .collect();
    let locked_batch_lost = batch[0].is_lost();
    let finished = workers.finish(run_until).await;
    for guard in batch {
        let _ = guard.release().await;
    }
    let report = check_with(&finished.runs, &CheckOptions::default());
    // Losses of other keys during a fault, or within a ttl after it (the
    // renewal that the fault held up may fail just after).
    let ttl_ns = TTL.as_nanos() as u64;
    let other_losses: Vec<_> = windows
        .iter()
        .flat_map(|&(from, until)| losses_during(&report, from, until + ttl_ns, LOCKED_KEY))
        .collect();
    println!(
        "torture[mariadb-foreign-row-lock]: {secs}s, 6 workers on {KEYS} keys + a manager holding {BATCH_KEYS}, ttl {TTL:?}, row locks={} of {hold:?} on {LOCKED_KEY} and batch-0: acquisitions={} lost_by_guard={} ({}) | lost_other_keys_during_faults={} batch_guards_lost={} (locked batch-0 lost: {locked_batch_lost}) overlaps={} fence_regressions={} hung={} failed={}",
        windows.len(),
        report.acquisitions(),
        report.lost,
        loss_reasons(&report),
        other_losses.len(),
        batch_lost.len(),
        report.overlaps.len(),
        report.fence_regressions.len(),
        finished.hung.len(),
        finished.failed.len(),
    );
    finished.assert_sound(&report);
    assert!(
        other_losses.is_empty(),
        "guards of other keys lost during a foreign row lock: {other_losses:#?}"
    );
    assert!(
        batch_lost.is_empty(),
        "batch guards lost around one locked row: {batch_lost:?}"
    );
}
