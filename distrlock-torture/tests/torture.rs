//! The torture test: worker processes take and hold locks on a private database
//! server while this test SIGKILLs holders, kills their database sessions,
//! restarts the server, stalls a holder's network past its ttl, freezes a
//! waiter's network for longer than its wait (and then delivers everything it
//! held back) and adds latency.
//! The history checker then proves, from what the workers recorded:
//!
//! - no two holdings of a key overlap (mutual exclusion, conservative client view);
//! - fences per key strictly increase in acquisition order;
//! - every lock of a killed holder was taken again within ttl + one poll interval
//!   + a stated slack;
//! - after the server restart, every worker acquires again within a stated time;
//! - no lease is live that no worker claimed, once its owner had given up on the
//!   key for longer than a ttl (a statement delivered after its caller and the
//!   cleanup were done must change nothing);
//! - no worker hangs or fails; at the end no lock is left held.
//!
//! Each run prints one summary line. `DISTRLOCK_TORTURE_SECS` sets the run time
//! per backend (default 40 s); a larger value turns it into a soak.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distrlock_testkit::{FaultProxy, ServerKind, ThrowawayServer, skip};
use distrlock_torture::backends;
use distrlock_torture::checker::{
    LeaseSample, WorkerRun, check, first_acquisition_after, orphaned_leases,
};
use distrlock_torture::history::{Event, monotonic_ns, read_history};
use distrlock_torture::process::wait_or_kill;

const WORKERS: usize = 6;
const KEYS: usize = 5;
const TTL: Duration = Duration::from_secs(2);
const HOLD_MAX_MS: u64 = 150;
/// The waiters' poll interval (the worker's `RetryPolicy` cap).
const POLL: Duration = Duration::from_millis(200);
/// Allowed on top of ttl + poll for a takeover: scheduling, a round trip, and the
/// holder's last extend landing just before its death.
const TAKEOVER_SLACK: Duration = Duration::from_millis(1500);
/// How soon every worker must acquire again after the server is back.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// How often a fault is injected.
const FAULT_EVERY: Duration = Duration::from_secs(3);
/// How often the table is sampled for leases that nobody claimed.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// How long after its owner gave up a lease nobody claimed may stay live: the
/// cleanup of an abandoned try waits for the try's bound (under a ttl), and a
/// lease whose cleanup could not reach the server runs out within a ttl.
const ORPHAN_GRACE: Duration = Duration::from_millis(3000);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillHolder,
    KillSessions,
    StallHolder,
    FreezeWaiter,
    Latency,
    RestartServer,
}

/// The faults, in turn; the restart comes once, near the middle.
const SCHEDULE: [Fault; 14] = [
    Fault::KillHolder,
    Fault::FreezeWaiter,
    Fault::KillSessions,
    Fault::StallHolder,
    Fault::Latency,
    Fault::RestartServer,
    Fault::FreezeWaiter,
    Fault::KillHolder,
    Fault::KillSessions,
    Fault::StallHolder,
    Fault::KillHolder,
    Fault::Latency,
    Fault::FreezeWaiter,
    Fault::StallHolder,
];

struct Slot {
    proxy: FaultProxy,
    child: Child,
    history: PathBuf,
    generation: usize,
    /// Earlier runs of this slot: history file and kill time.
    finished: Vec<(PathBuf, Option<u64>)>,
}

struct Torture {
    name: &'static str,
    server: Arc<Mutex<ThrowawayServer>>,
    dir: PathBuf,
    table: String,
    run_until: std::time::Instant,
    slots: Vec<Slot>,
    counts: std::collections::BTreeMap<&'static str, usize>,
    restarted_at: Option<u64>,
}

fn run_secs() -> u64 {
    std::env::var("DISTRLOCK_TORTURE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40)
}

impl Torture {
    fn worker_url(&self, port: u16) -> String {
        let server = self.server.lock().unwrap();
        match server.kind() {
            ServerKind::Postgres => format!("postgres://postgres@127.0.0.1:{port}/test"),
            // mysql_async would otherwise switch a loopback connection to the
            // server's unix socket, around the fault proxy.
            ServerKind::MariaDb => {
                format!("mysql://root@127.0.0.1:{port}/test?prefer_socket=false")
            }
        }
    }

    fn spawn_worker(&self, slot: usize, generation: usize, port: u16) -> (Child, PathBuf) {
        let history = self.dir.join(format!("worker-{slot}-{generation}.jsonl"));
        let left = self
            .run_until
            .saturating_duration_since(std::time::Instant::now());
        let child = Command::new(env!("CARGO_BIN_EXE_distrlock-torture-worker"))
            .args([
                self.worker_url(port),
                self.table.clone(),
                history.display().to_string(),
                KEYS.to_string(),
                TTL.as_millis().to_string(),
                HOLD_MAX_MS.to_string(),
                left.as_millis().to_string(),
                format!("torture-worker-{slot}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a torture worker");
        (child, history)
    }

    /// A slot whose worker holds a lock right now, per its history, and means to
    /// hold it for at least `for_at_least` more.
    fn holder(&self, rng: &mut fastrand::Rng, for_at_least: Duration) -> Option<usize> {
        let now = monotonic_ns();
        let mut holding: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let events = read_history(&self.slots[i].history).unwrap_or_default();
                let last = events
                    .iter()
                    .rev()
                    .find(|e| matches!(e, Event::Acquired { .. } | Event::Ended { .. }));
                matches!(last, Some(Event::Acquired { t, hold_ms, .. })
                    if t + hold_ms * 1_000_000 >= now + for_at_least.as_nanos() as u64)
            })
            .collect();
        if holding.is_empty() {
            return None;
        }
        Some(holding.swap_remove(rng.usize(..holding.len())))
    }

    /// A slot whose worker holds nothing right now, per its history: it is
    /// waiting for a key (or about to).
    fn waiter(&self, rng: &mut fastrand::Rng) -> Option<usize> {
        let mut waiting: Vec<usize> = (0..self.slots.len())
            .filter(|&i| {
                let events = read_history(&self.slots[i].history).unwrap_or_default();
                let last = events
                    .iter()
                    .rev()
                    .find(|e| matches!(e, Event::Acquired { .. } | Event::Ended { .. }));
                !matches!(last, Some(Event::Acquired { .. }))
            })
            .collect();
        if waiting.is_empty() {
            return None;
        }
        Some(waiting.swap_remove(rng.usize(..waiting.len())))
    }

    async fn inject(&mut self, fault: Fault, rng: &mut fastrand::Rng) {
        match fault {
            Fault::KillHolder => {
                let Some(i) = self.holder(rng, Duration::ZERO) else {
                    return;
                };
                let slot = &mut self.slots[i];
                let _ = slot.child.kill();
                let _ = slot.child.wait();
                let killed_at = monotonic_ns();
                slot.finished.push((slot.history.clone(), Some(killed_at)));
                slot.generation += 1;
                let (generation, port) = (slot.generation, slot.proxy.port());
                let (child, history) = self.spawn_worker(i, generation, port);
                let slot = &mut self.slots[i];
                slot.child = child;
                slot.history = history;
            }
            Fault::KillSessions => {
                let server = self.server.clone();
                tokio::task::spawn_blocking(move || {
                    let server = server.lock().unwrap();
                    let sql = match server.kind() {
                        ServerKind::Postgres => "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'torture-worker-%'".to_owned(),
                        ServerKind::MariaDb => {
                            let ids = server
                                .sql("SELECT id FROM information_schema.processlist WHERE user = 'root' AND db = 'test' AND id <> CONNECTION_ID()")
                                .unwrap_or_default();
                            ids.lines().map(|id| format!("KILL {id};")).collect::<String>()
                        }
                    };
                    if !sql.is_empty() {
                        // A session may be gone already: errors here are fine.
                        let _ = server.sql(&sql);
                    }
                })
                .await
                .unwrap();
            }
            Fault::StallHolder => {
                // A holder with more than the stall's effect still to go: its
                // guard must declare the lock lost during the stall.
                let Some(i) = self.holder(rng, TTL + Duration::from_millis(500)) else {
                    return;
                };
                // Longer than the ttl: the holder must give up before anyone else
                // gets in.
                self.slots[i].proxy.stall_for(TTL * 3 / 2);
            }
            Fault::FreezeWaiter => {
                let Some(i) = self.waiter(rng) else {
                    return;
                };
                // Longer than a whole wait (2 ttls): the worker gives up and its
                // cleanup runs while every statement it sent is held back; the
                // thaw then delivers them all, and the FIN of each connection the
                // backend dropped, to the server.
                let freeze = TTL * 5 / 2 + Duration::from_millis(rng.u64(..=1000));
                self.slots[i].proxy.stall_for(freeze);
            }
            Fault::Latency => {
                for slot in self.slots.iter().take(2) {
                    slot.proxy.set_latency(Duration::from_millis(30));
                }
                tokio::time::sleep(FAULT_EVERY / 2).await;
                for slot in self.slots.iter().take(2) {
                    slot.proxy.set_latency(Duration::ZERO);
                }
            }
            Fault::RestartServer => {
                let server = self.server.clone();
                tokio::task::spawn_blocking(move || server.lock().unwrap().restart())
                    .await
                    .unwrap()
                    .expect("restart the server");
                self.restarted_at = Some(monotonic_ns());
            }
        }
        *self.counts.entry(fault_name(fault)).or_default() += 1;
    }
}

fn fault_name(fault: Fault) -> &'static str {
    match fault {
        Fault::KillHolder => "sigkill",
        Fault::KillSessions => "session_kills",
        Fault::StallHolder => "stalls",
        Fault::FreezeWaiter => "freezes",
        Fault::Latency => "latency",
        Fault::RestartServer => "restarts",
    }
}

fn torture(
    name: &'static str,
    start: fn() -> Result<ThrowawayServer, distrlock_testkit::ServerError>,
) {
    let test = format!("torture_{name}");
    let server = match start() {
        Ok(server) => server,
        Err(error) => return skip(&test, &error.to_string()),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(name, server));
}

async fn run(name: &'static str, server: ThrowawayServer) {
    let dir = std::env::temp_dir().join(format!("distrlock-torture-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let table = "torture_locks".to_owned();
    let admin = backends::open(&server.url(), &table, "torture-admin")
        .await
        .expect("open the admin backend");
    admin.create_table().await.expect("create the lock table");
    let upstream = ([127, 0, 0, 1], server.port()).into();
    let secs = run_secs();
    let started = std::time::Instant::now();
    let mut torture = Torture {
        name,
        server: Arc::new(Mutex::new(server)),
        dir: dir.clone(),
        table: table.clone(),
        run_until: started + Duration::from_secs(secs),
        slots: Vec::new(),
        counts: Default::default(),
        restarted_at: None,
    };
    for i in 0..WORKERS {
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let (child, history) = torture.spawn_worker(i, 0, proxy.port());
        torture.slots.push(Slot {
            proxy,
            child,
            history,
            generation: 0,
            finished: Vec::new(),
        });
    }

    // Samples the live leases, to find any that nobody claimed.
    let samples = Arc::new(Mutex::new(Vec::<LeaseSample>::new()));
    let sampler = tokio::spawn({
        let (admin, samples) = (admin.clone(), samples.clone());
        async move {
            loop {
                tokio::time::sleep(SAMPLE_EVERY).await;
                // The server may be restarting: a missed sample is fine.
                let Ok(Ok(infos)) = tokio::time::timeout(TTL, admin.list()).await else {
                    continue;
                };
                let t = monotonic_ns();
                samples
                    .lock()
                    .unwrap()
                    .extend(
                        infos
                            .into_iter()
                            .filter(|i| i.is_live())
                            .map(|i| LeaseSample {
                                key: i.key.into_string(),
                                fence: i.fence.get(),
                                owner: i.owner,
                                t,
                            }),
                    );
            }
        }
    });

    let mut rng = fastrand::Rng::new();
    let mut next = 0;
    // Faults until 5 s before the end, so the last ones' effects are checked too.
    while started.elapsed() + Duration::from_secs(5) < Duration::from_secs(secs) {
        tokio::time::sleep(FAULT_EVERY).await;
        let mut fault = SCHEDULE[next % SCHEDULE.len()];
        // One restart per run, in its slot of the first round.
        if fault == Fault::RestartServer && torture.restarted_at.is_some() {
            fault = Fault::KillHolder;
        }
        // A fault needs a worker in some state (a holder with more than a
        // stall still to go, a waiter): when none is, try again shortly, so
        // that each kind the checks below require is injected in every run
        // (one run met no holder with 2.5 s to go at either stall slot).
        let name = fault_name(fault);
        for _ in 0..10 {
            let before = torture.counts.get(name).copied().unwrap_or_default();
            torture.inject(fault, &mut rng).await;
            if torture.counts.get(name).copied().unwrap_or_default() > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        next += 1;
    }

    // Every worker must finish by itself: its run time, plus one wait and one hold.
    let grace =
        std::time::Instant::now().max(torture.run_until) + TTL * 2 + Duration::from_secs(10);
    let mut hung = Vec::new();
    let mut failed = Vec::new();
    let mut runs = Vec::new();
    for (i, slot) in torture.slots.iter_mut().enumerate() {
        let status = wait_or_kill(&mut slot.child, grace).await;
        match status {
            None => hung.push(i),
            Some(status) if !status.success() => failed.push((i, status)),
            Some(_) => {}
        }
        for (history, killed_at) in slot
            .finished
            .iter()
            .cloned()
            .chain([(slot.history.clone(), None)])
        {
            runs.push(WorkerRun {
                name: history.file_name().unwrap().to_string_lossy().into_owned(),
                events: read_history(&history).unwrap_or_default(),
                killed_at,
                owner: format!("torture-worker-{i}"),
            });
        }
    }

    sampler.abort();
    let samples = samples.lock().unwrap().clone();
    let orphans = orphaned_leases(&runs, &samples, TTL, ORPHAN_GRACE);
    let report = check(&runs);
    let recovery = torture
        .restarted_at
        .map(|at| first_acquisition_after(&runs, at))
        .unwrap_or_default();
    let worst_recovery = recovery.iter().filter_map(|(_, d)| *d).max();
    let unrecovered: Vec<_> = recovery
        .iter()
        .filter(|(_, d)| d.is_none_or(|d| d > RECOVERY_BOUND))
        .collect();

    // At the end no lock is left held: the last leases of killed workers run out
    // within a ttl.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let server_port = torture.server.lock().unwrap().port();
    let admin = backends::open(&torture.worker_url(server_port), &table, "torture-admin")
        .await
        .expect("reopen the admin backend after the restart");
    let still_held: Vec<_> = admin
        .list()
        .await
        .expect("list locks")
        .into_iter()
        .filter(|info| info.is_live())
        .map(|info| info.key.into_string())
        .collect();

    let counts = &torture.counts;
    let count = |k: &str| counts.get(k).copied().unwrap_or(0);
    println!(
        "torture[{}]: {}s, {} workers on {} keys, ttl {:?}: acquisitions={} lost_by_guard={} faults: sigkill={} session_kills={} restarts={} stalls={} freezes={} latency={} | overlaps={} fence_regressions={} orphaned_leases={} (of {} samples) worst_takeover={} (bound {:?}) worst_recovery={} (bound {:?}) hung={} failed={} left_held={}",
        torture.name,
        secs,
        WORKERS,
        KEYS,
        TTL,
        report.acquisitions(),
        report.lost,
        count("sigkill"),
        count("session_kills"),
        count("restarts"),
        count("stalls"),
        count("freezes"),
        count("latency"),
        report.overlaps.len(),
        report.fence_regressions.len(),
        orphans.len(),
        samples.len(),
        report
            .worst_takeover()
            .map_or("-".into(), |d| format!("{}ms", d.as_millis())),
        TTL + POLL + TAKEOVER_SLACK,
        worst_recovery.map_or("-".into(), |d| format!("{}ms", d.as_millis())),
        RECOVERY_BOUND,
        hung.len(),
        failed.len(),
        still_held.len(),
    );

    assert!(
        report.overlaps.is_empty(),
        "overlapping holdings: {:#?}",
        report.overlaps
    );
    assert!(
        report.fence_regressions.is_empty(),
        "fence regressions: {:#?}",
        report.fence_regressions
    );
    assert!(
        orphans.is_empty(),
        "leases that nobody claimed, live long after their owner gave up: {orphans:#?}"
    );
    if let Some(worst) = report.worst_takeover() {
        assert!(
            worst <= TTL + POLL + TAKEOVER_SLACK,
            "a killed holder's lock was taken again only after {worst:?}"
        );
    }
    assert!(
        report.lost >= count("stalls"),
        "each stalled holder's guard must give the lock up: {} losses for {} stalls",
        report.lost,
        count("stalls")
    );
    assert!(
        report.acquisitions() > 50,
        "too few acquisitions to mean anything: {}",
        report.acquisitions()
    );
    assert!(
        count("sigkill") > 0
            && count("stalls") > 0
            && count("session_kills") > 0
            && count("freezes") > 0,
        "faults were injected: {counts:?}"
    );
    assert_eq!(count("restarts"), 1, "the server was restarted once");
    assert!(
        unrecovered.is_empty(),
        "workers that did not recover within {RECOVERY_BOUND:?} of the restart: {unrecovered:?}"
    );
    assert!(hung.is_empty(), "workers that hung: {hung:?}");
    assert!(failed.is_empty(), "workers that failed: {failed:?}");
    assert!(
        still_held.is_empty(),
        "locks left held at the end: {still_held:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "about a minute: run by scripts/test-all, or with --ignored"]
fn torture_postgres() {
    torture("postgres", ThrowawayServer::postgres);
}

#[test]
#[ignore = "about a minute: run by scripts/test-all, or with --ignored"]
fn torture_mariadb() {
    torture("mariadb", ThrowawayServer::mariadb);
}
