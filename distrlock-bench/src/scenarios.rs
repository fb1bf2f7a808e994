//! The six scenarios, the report they fill, and the smoke checks.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use distrlock_core::{LockBackend, LockGuard, LockManager, Ttl};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::env::{Connect, Env, Variant};
use crate::lite::Sqlite;
use crate::measure::{self, CycleFigures, Plan};
use crate::pg::{self, Postgres};
use crate::procstat;
use crate::proxy::CountingProxy;
use crate::stats::Spread;
use crate::workload::{CountingBackend, Cycle, LibraryCycle, LibraryWaiter, Waiter};

/// What to run, from the command line.
pub(crate) struct Options {
    pub(crate) smoke: bool,
    pub(crate) backends: Vec<String>,
    pub(crate) scenarios: Vec<u8>,
    pub(crate) clients: Vec<String>,
    pub(crate) concurrency: Vec<usize>,
    /// Scenario 2's waiter counts, when given.
    pub(crate) waiters: Option<Vec<usize>>,
    pub(crate) listen: bool,
    pub(crate) plan: Plan,
    pub(crate) postgres_url: String,
    pub(crate) mysql_url: String,
    pub(crate) sqlite_dir: PathBuf,
    pub(crate) json: PathBuf,
    pub(crate) markdown: PathBuf,
    pub(crate) command: String,
}

impl Options {
    /// Whether `--clients` asks for `variant`.
    fn wants(&self, variant: Variant) -> bool {
        let name = match variant {
            Variant::Library => "distrlock",
            Variant::Raw => "raw",
            Variant::Go => "go",
            Variant::Native => "native",
        };
        self.clients.iter().any(|c| c == name)
    }

    fn concurrencies(&self) -> Vec<usize> {
        if !self.concurrency.is_empty() {
            self.concurrency.clone()
        } else if self.smoke {
            vec![1, 4]
        } else {
            vec![1, 4, 16]
        }
    }
}

/// The results as JSON records and Markdown tables, plus smoke-check failures.
struct Report {
    records: Vec<Value>,
    tables: BTreeMap<u8, (String, Vec<String>)>,
    machine: BTreeMap<String, String>,
    servers: BTreeMap<String, BTreeMap<String, String>>,
    failures: Vec<String>,
    notes: Vec<String>,
}

impl Report {
    fn row(&mut self, scenario: u8, header: &str, cells: &[String], record: Value) {
        let table = self
            .tables
            .entry(scenario)
            .or_insert_with(|| (header.to_owned(), Vec::new()));
        table.1.push(format!("| {} |", cells.join(" | ")));
        self.records.push(record);
    }

    fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            let what = what.into();
            eprintln!("CHECK FAILED: {what}");
            self.failures.push(what);
        }
    }

    fn markdown(&self, command: &str) -> String {
        let titles = [
            (1, "Scenario 1: uncontended try-acquire + release cycles"),
            (2, "Scenario 2: single-key contention (waiting API)"),
            (
                3,
                "Scenario 3: heartbeat cost of held locks (ttl 30 s, auto-extend)",
            ),
            (4, "Scenario 4: table size (uncontended cycles)"),
            (5, "Scenario 5: statements per operation"),
            (
                6,
                "Scenario 6: 64 clients on 64 keys, 4 of them hot (waiting API, hold ~1 ms)",
            ),
        ];
        let mut out = format!("Command: `{command}`\n\n");
        out.push_str("Machine:\n\n");
        for (k, v) in &self.machine {
            out.push_str(&format!("- {k}: {v}\n"));
        }
        for (server, settings) in &self.servers {
            let list: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("- {server}: {}\n", list.join(", ")));
        }
        for (n, title) in titles {
            if let Some((header, rows)) = self.tables.get(&n) {
                out.push_str(&format!("\n### {title}\n\n{header}\n"));
                for row in rows {
                    out.push_str(row);
                    out.push('\n');
                }
            }
        }
        if !self.notes.is_empty() {
            out.push_str("\nNotes from the run:\n\n");
            for note in &self.notes {
                out.push_str(&format!("- {note}\n"));
            }
        }
        out
    }
}

fn machine() -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    out.insert("nproc".into(), cpus.to_string());
    if let Ok(info) = std::fs::read_to_string("/proc/meminfo")
        && let Some(total) = info.lines().find(|l| l.starts_with("MemTotal:"))
    {
        out.insert(
            "memory".into(),
            total.trim_start_matches("MemTotal:").trim().into(),
        );
    }
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo")
        && let Some(model) = info.lines().find(|l| l.starts_with("model name"))
    {
        out.insert(
            "cpu".into(),
            model.split(':').nth(1).unwrap_or("").trim().into(),
        );
    }
    if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
        out.insert(
            "load average at start".into(),
            load.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    out
}

/// Runs the chosen scenarios on the chosen backends and writes the report.
pub(crate) async fn run(opts: Options) -> anyhow::Result<()> {
    let ttl = Ttl::new(Duration::from_secs(30))?;
    let mut envs: Vec<Box<dyn Env>> = Vec::new();
    let notes = Vec::new();
    for name in &opts.backends {
        match name.as_str() {
            "postgres" | "postgresql" => {
                envs.push(Box::new(Postgres::connect(&opts.postgres_url, ttl).await?))
            }
            "sqlite" => envs.push(Box::new(Sqlite::new(opts.sqlite_dir.clone(), ttl)?)),
            "mariadb" | "mysql" => envs.push(Box::new(
                crate::mysql::MariaDb::connect(&opts.mysql_url, ttl).await?,
            )),
            other => bail!("unknown backend {other:?} (postgres, mariadb, sqlite)"),
        }
    }
    let mut report = Report {
        records: Vec::new(),
        tables: BTreeMap::new(),
        machine: machine(),
        servers: BTreeMap::new(),
        failures: Vec::new(),
        notes,
    };
    for env in &envs {
        report
            .servers
            .insert(env.name().to_owned(), env.describe().await?);
    }
    for &scenario in &opts.scenarios {
        for env in &envs {
            let env = env.as_ref();
            eprintln!("== scenario {scenario} on {}", env.name());
            let result = match scenario {
                1 => uncontended(env, &opts, &mut report).await,
                2 => contention(env, &opts, &mut report).await,
                3 => heartbeat(env, &opts, &mut report).await,
                4 => table_size(env, &opts, &mut report).await,
                5 => round_trips(env, &opts, &mut report).await,
                6 => hot_keys(env, &opts, &mut report).await,
                other => bail!("no scenario {other} (1–6)"),
            };
            if let Err(error) = result {
                let what = format!("scenario {scenario} on {} failed: {error:#}", env.name());
                eprintln!("{what}");
                report.failures.push(what);
            }
        }
    }
    let markdown = report.markdown(&opts.command);
    let json = json!({
        "command": opts.command,
        "smoke": opts.smoke,
        "machine": report.machine,
        "servers": report.servers,
        "results": report.records,
        "failures": report.failures,
        "notes": report.notes,
    });
    for path in [&opts.json, &opts.markdown] {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
    }
    std::fs::write(&opts.json, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", opts.json.display()))?;
    std::fs::write(&opts.markdown, &markdown)
        .with_context(|| format!("writing {}", opts.markdown.display()))?;
    println!("{markdown}");
    eprintln!(
        "wrote {} and {}",
        opts.json.display(),
        opts.markdown.display()
    );
    if !report.failures.is_empty() {
        bail!(
            "{} check(s) failed:\n  {}",
            report.failures.len(),
            report.failures.join("\n  ")
        );
    }
    Ok(())
}

/// Runs `cycles` uncontended try-acquire + release cycles with one client
/// of the one variant in `--clients` on the one backend in `--backends`, and
/// nothing else: for counting the client's instructions under
/// `valgrind --tool=callgrind` (see `scripts/instructions`). The set-up is
/// the same whatever `cycles` is, so the difference of two counts, divided by
/// the difference of the cycles, is the cost of one cycle.
pub(crate) async fn count_cycles(opts: Options, cycles: u64) -> anyhow::Result<()> {
    let ttl = Ttl::new(Duration::from_secs(30))?;
    let ([backend], [client]) = (opts.backends.as_slice(), opts.clients.as_slice()) else {
        bail!("--count-cycles takes one backend and one client");
    };
    let env: Box<dyn Env> = match backend.as_str() {
        "postgres" | "postgresql" => Box::new(Postgres::connect(&opts.postgres_url, ttl).await?),
        "sqlite" => Box::new(Sqlite::new(opts.sqlite_dir.clone(), ttl)?),
        "mariadb" | "mysql" => {
            Box::new(crate::mysql::MariaDb::connect(&opts.mysql_url, ttl).await?)
        }
        other => bail!("unknown backend {other:?} (postgres, mariadb, sqlite)"),
    };
    let variant = match client.as_str() {
        "distrlock" => Variant::Library,
        "raw" => Variant::Raw,
        "go" => Variant::Go,
        "native" => Variant::Native,
        other => bail!("unknown client {other:?} (distrlock, raw, go, native)"),
    };
    let table = "distrlock_bench_count";
    env.reset_table(table).await?;
    let mut clients = if variant == Variant::Library {
        library_cycles(env.as_ref(), table, 1, opts.listen).await?.0
    } else {
        env.cycles(variant, table, 1).await?
    };
    let client = clients.first_mut().context("the backend made no client")?;
    // The same four keys as scenario 1's, each used once before counting
    // starts to matter (their rows exist), so every cycle does the same work.
    let keys: Vec<String> = (0..4).map(|k| format!("count/k{k}")).collect();
    for key in &keys {
        client.cycle(key).await?;
    }
    for i in 0..cycles {
        client.cycle(&keys[(i % 4) as usize]).await?;
    }
    drop(clients);
    env.drop_table(table).await?;
    println!("{cycles} cycles");
    Ok(())
}

fn spread_json(s: &Spread) -> Value {
    json!({ "median": s.median, "min": s.min, "max": s.max })
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 && a.is_finite() => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

fn cycle_json(f: &CycleFigures) -> Value {
    json!({
        "cycles_per_s": spread_json(&f.rate),
        "p50_ms": spread_json(&f.p50_ms),
        "p99_ms": spread_json(&f.p99_ms),
        "cycles": f.cycles,
    })
}

async fn library_cycles(
    env: &dyn Env,
    table: &str,
    n: usize,
    listen: bool,
) -> anyhow::Result<(Vec<Box<dyn Cycle>>, Arc<dyn LockBackend>)> {
    let backend = env
        .backend(
            table,
            Connect {
                pool_size: n,
                listen,
                via: None,
            },
        )
        .await?;
    let mut clients: Vec<Box<dyn Cycle>> = Vec::new();
    for _ in 0..n {
        clients.push(Box::new(LibraryCycle::new(backend.clone())?));
    }
    Ok((clients, backend))
}

/// Measures the given variants at one concurrency; returns their figures.
async fn measure_variants(
    env: &dyn Env,
    table: &str,
    variants: &[Variant],
    n: usize,
    plan: Plan,
    listen: bool,
) -> anyhow::Result<Vec<(Variant, CycleFigures)>> {
    let mut out = Vec::new();
    for &variant in variants {
        let prefix = format!("{}-n{n}", variant.name().replace(' ', "-"));
        let figures = if variant == Variant::Library {
            let (clients, _backend) = library_cycles(env, table, n, listen).await?;
            measure::cycles(clients, &prefix, plan).await?
        } else {
            let clients = env.cycles(variant, table, n).await?;
            measure::cycles(clients, &prefix, plan).await?
        };
        eprintln!(
            "   {} n={n}: {:.0} cycles/s",
            variant.name(),
            figures.rate.median
        );
        out.push((variant, figures));
    }
    Ok(out)
}

const S1_HEADER: &str = "| backend | clients | client | cycles/s median (min–max) | p50 ms | p99 ms | vs raw driver | vs Go sequence |\n|---|---|---|---|---|---|---|---|";

async fn uncontended(env: &dyn Env, opts: &Options, report: &mut Report) -> anyhow::Result<()> {
    let table = "distrlock_bench_s1";
    env.reset_table(table).await?;
    let mut variants = vec![Variant::Raw, Variant::Library, Variant::Go];
    if env.native_name().is_some() {
        variants.push(Variant::Native);
    }
    variants.retain(|v| opts.wants(*v));
    for n in opts.concurrencies() {
        let results = measure_variants(env, table, &variants, n, opts.plan, opts.listen).await?;
        let rate = |v: Variant| {
            results
                .iter()
                .find(|(x, _)| *x == v)
                .map(|(_, f)| f.rate.median)
        };
        let (raw, go) = (rate(Variant::Raw), rate(Variant::Go));
        for (variant, f) in &results {
            report.check(
                f.cycles > 0,
                format!("{} {} n={n}: no cycle", env.name(), variant.name()),
            );
            let client = match variant {
                Variant::Native => env.native_name().unwrap_or("native").to_owned(),
                v => v.name().to_owned(),
            };
            let cells = [
                env.name().to_owned(),
                n.to_string(),
                client.clone(),
                f.rate.show(0),
                f.p50_ms.show(2),
                f.p99_ms.show(2),
                ratio(f.rate.median, raw),
                ratio(f.rate.median, go),
            ];
            let record = json!({
                "scenario": 1, "backend": env.name(), "client": client, "concurrency": n,
                "figures": cycle_json(f),
                "ratio_to_raw": raw.map(|r| f.rate.median / r),
                "ratio_to_go": go.map(|g| f.rate.median / g),
            });
            report.row(1, S1_HEADER, &cells, record);
        }
    }
    env.drop_table(table).await
}

const S2_HEADER: &str = "| backend | waiters | hold | client | acquisitions/s | handoffs % | handoff p50 ms | handoff p99 ms | handoff max ms | worst wait ms | mean wait ms | worst / mean |\n|---|---|---|---|---|---|---|---|---|---|---|---|";

async fn contention(env: &dyn Env, opts: &Options, report: &mut Report) -> anyhow::Result<()> {
    let table = "distrlock_bench_s2";
    env.reset_table(table).await?;
    let waiter_counts: &[usize] = if opts.smoke {
        &[2]
    } else {
        opts.waiters.as_deref().unwrap_or(&[2, 8, 32, 64])
    };
    let holds: &[u64] = &[0, 1];
    // Each waiter gets a backend of its own, as separate processes would: a
    // release then reaches the other waiters only through the database
    // (notifications or polling), never through an in-process wake-up. Fair
    // waiters (the default) beside unfair ones, in the same run: the cost of
    // the line.
    let mut kinds: Vec<(String, Option<(bool, bool)>)> = Vec::new();
    if env.name() == "postgres" {
        kinds.push(("distrlock, notifications on".into(), Some((true, true))));
        kinds.push((
            "distrlock, notifications on, unfair".into(),
            Some((true, false)),
        ));
        kinds.push(("distrlock, notifications off".into(), Some((false, true))));
    } else if env.name() == "sqlite" {
        // `listen` turns the wake-ups between processes on.
        kinds.push(("distrlock, wake-ups on".into(), Some((true, true))));
        kinds.push(("distrlock, wake-ups on, unfair".into(), Some((true, false))));
        kinds.push(("distrlock (polling)".into(), Some((false, true))));
    } else {
        kinds.push(("distrlock (polling)".into(), Some((false, true))));
        kinds.push(("distrlock (polling), unfair".into(), Some((false, false))));
    }
    if let Some(native) = env.native_name() {
        kinds.push((native.to_owned(), None));
    }
    for &n in waiter_counts {
        for &hold_ms in holds {
            for (label, listen) in &kinds {
                let key = format!("contended-{n}-{hold_ms}");
                // A connection per waiter, and one more when it listens: skip
                // what the server cannot accept, saying so.
                let needs = match listen {
                    Some((true, _)) => 2 * n,
                    _ => n,
                };
                if let Some(free) = env.free_connections().await?
                    && needs + 2 > free
                {
                    eprintln!(
                        "   {label} waiters={n}: skipped, needs {needs} connections and the \
                         server accepts {free} more (max_connections)"
                    );
                    continue;
                }
                let waiters: Vec<Box<dyn Waiter>> = match listen {
                    Some((listen, fair)) => {
                        let mut out: Vec<Box<dyn Waiter>> = Vec::new();
                        for _ in 0..n {
                            let backend = env
                                .backend(
                                    table,
                                    Connect {
                                        pool_size: 1,
                                        listen: *listen,
                                        via: None,
                                    },
                                )
                                .await?;
                            out.push(Box::new(LibraryWaiter::new(backend, &key, *fair)?));
                        }
                        out
                    }
                    None => env.native_waiters(&key, n).await?,
                };
                let f =
                    measure::contention(waiters, Duration::from_millis(hold_ms), opts.plan).await?;
                eprintln!(
                    "   {label} waiters={n} hold={hold_ms}ms: {:.0}/s, handoff p50 {:.2} ms",
                    f.rate.median, f.handoff_p50_ms.median
                );
                report.check(
                    f.acquisitions > 0,
                    format!("{} {label}: no acquisition", env.name()),
                );
                let starvation = f.wait_max_ms.median / f.wait_mean_ms.median;
                let cells = [
                    env.name().to_owned(),
                    n.to_string(),
                    format!("~{hold_ms} ms"),
                    label.clone(),
                    f.rate.show(0),
                    format!(
                        "{:.0}",
                        100.0 * f.handoffs as f64 / f.acquisitions.max(1) as f64
                    ),
                    f.handoff_p50_ms.show(2),
                    f.handoff_p99_ms.show(2),
                    f.handoff_max_ms.show(1),
                    f.wait_max_ms.show(1),
                    f.wait_mean_ms.show(2),
                    format!("{starvation:.1}"),
                ];
                let record = json!({
                    "scenario": 2, "backend": env.name(), "client": label, "waiters": n,
                    "hold_ms": hold_ms,
                    "acquisitions_per_s": spread_json(&f.rate),
                    "handoff_p50_ms": spread_json(&f.handoff_p50_ms),
                    "handoff_p99_ms": spread_json(&f.handoff_p99_ms),
                    "handoff_max_ms": spread_json(&f.handoff_max_ms),
                    "worst_wait_ms": spread_json(&f.wait_max_ms),
                    "mean_wait_ms": spread_json(&f.wait_mean_ms),
                    "worst_over_mean": starvation,
                    "acquisitions": f.acquisitions,
                    "handoffs": f.handoffs,
                });
                report.row(2, S2_HEADER, &cells, record);
            }
        }
    }
    env.drop_table(table).await
}

const S6_HEADER: &str = "| backend | clients | keys (hot) | client | operations/s | hot wait p50 ms | hot wait p99 ms | hot wait max ms | cold wait p50 ms | cold wait p99 ms | cold p50 vs no hot keys |\n|---|---|---|---|---|---|---|---|---|---|---|";

/// Scenario 6: 64 clients (8 backends, as 8 processes, of 8 clients each) on
/// 64 keys, half of the operations on 4 hot keys; each operation waits for
/// its key, holds it ~1 ms and releases it. Fair beside unfair, and beside
/// the same clients on 64 keys none of which is hot (the baseline for the
/// cold keys' waits: hot keys must not slow the others down).
async fn hot_keys(env: &dyn Env, opts: &Options, report: &mut Report) -> anyhow::Result<()> {
    let table = "distrlock_bench_s6";
    env.reset_table(table).await?;
    let (backends, per_backend) = if opts.smoke { (2, 4) } else { (8, 8) };
    let clients = backends * per_backend;
    let keys = if opts.smoke { 16 } else { 64 };
    let needs = backends * (per_backend + 1);
    if let Some(free) = env.free_connections().await?
        && needs + 2 > free
    {
        eprintln!(
            "   scenario 6: skipped, needs {needs} connections and the server accepts {free} more"
        );
        report.notes.push(format!(
            "scenario 6 on {} skipped: it needs {needs} connections and the server accepted {free} more",
            env.name()
        ));
        return env.drop_table(table).await;
    }
    let hot_mix = measure::KeyMix {
        keys,
        hot: 4,
        hot_share: 0.5,
    };
    let kinds = [
        (
            "distrlock, fair, no hot keys",
            true,
            measure::KeyMix { hot: 0, ..hot_mix },
        ),
        ("distrlock, fair", true, hot_mix),
        ("distrlock, unfair", false, hot_mix),
    ];
    let mut baseline_cold_p50 = None;
    for (label, fair, mix) in kinds {
        let mut managers = Vec::new();
        for _ in 0..backends {
            let backend = env
                .backend(
                    table,
                    Connect {
                        pool_size: per_backend,
                        listen: true,
                        via: None,
                    },
                )
                .await?;
            let manager = LockManager::builder(backend)
                .owner("distrlock-bench")
                .fair(fair)
                .build()?;
            managers.extend(std::iter::repeat_n(manager, per_backend));
        }
        let prefix = format!("s6-{}", label.replace([' ', ','], ""));
        let f =
            measure::key_mix(managers, &prefix, mix, Duration::from_millis(1), opts.plan).await?;
        eprintln!(
            "   {label}: {:.0} ops/s, hot p50 {:.2} ms, cold p50 {:.2} ms",
            f.rate.median, f.hot_p50_ms.median, f.cold_p50_ms.median
        );
        report.check(
            f.operations > 0,
            format!("{} {label}: no operation", env.name()),
        );
        if mix.hot == 0 {
            baseline_cold_p50 = Some(f.cold_p50_ms.median);
        }
        let vs_baseline = match (mix.hot, baseline_cold_p50) {
            (0, _) => "1.00× (baseline)".to_owned(),
            (_, Some(b)) if b > 0.0 => format!("{:.2}×", f.cold_p50_ms.median / b),
            _ => "–".to_owned(),
        };
        let cells = [
            env.name().to_owned(),
            clients.to_string(),
            format!("{} ({})", mix.keys, mix.hot),
            label.to_owned(),
            f.rate.show(0),
            f.hot_p50_ms.show(2),
            f.hot_p99_ms.show(2),
            f.hot_max_ms.show(1),
            f.cold_p50_ms.show(2),
            f.cold_p99_ms.show(2),
            vs_baseline,
        ];
        let record = json!({
            "scenario": 6, "backend": env.name(), "client": label, "clients": clients,
            "keys": mix.keys, "hot_keys": mix.hot, "hot_share": mix.hot_share,
            "operations_per_s": spread_json(&f.rate),
            "hot_wait_p50_ms": spread_json(&f.hot_p50_ms),
            "hot_wait_p99_ms": spread_json(&f.hot_p99_ms),
            "hot_wait_max_ms": spread_json(&f.hot_max_ms),
            "cold_wait_p50_ms": spread_json(&f.cold_p50_ms),
            "cold_wait_p99_ms": spread_json(&f.cold_p99_ms),
            "operations": f.operations,
        });
        report.row(6, S6_HEADER, &cells, record);
    }
    env.drop_table(table).await
}

const S3_HEADER: &str = "| backend | held locks | window s | statements/s | statements per heartbeat interval | one extend per lock would be | renewal transactions per interval | client CPU % | RSS MiB before → holding |\n|---|---|---|---|---|---|---|---|---|";

/// Acquires `keys` through `manager` with 16 at a time.
async fn acquire_all(manager: &LockManager, keys: Vec<String>) -> anyhow::Result<Vec<LockGuard>> {
    let mut guards = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(16) {
        let mut set = JoinSet::new();
        for key in chunk {
            let lock = manager.lock(key)?;
            set.spawn(async move { lock.try_acquire().await });
        }
        while let Some(joined) = set.join_next().await {
            guards.push(joined??);
        }
    }
    Ok(guards)
}

async fn release_all(guards: Vec<LockGuard>) -> anyhow::Result<()> {
    let mut guards = guards.into_iter().peekable();
    while guards.peek().is_some() {
        let mut set = JoinSet::new();
        for guard in guards.by_ref().take(16) {
            set.spawn(guard.release());
        }
        while let Some(joined) = set.join_next().await {
            joined??;
        }
    }
    Ok(())
}

async fn heartbeat(env: &dyn Env, opts: &Options, report: &mut Report) -> anyhow::Result<()> {
    let table = "distrlock_bench_s3";
    let (ttl, window) = if opts.smoke {
        (Duration::from_secs(3), Duration::from_millis(2_500))
    } else {
        (Duration::from_secs(30), Duration::from_secs(30))
    };
    let interval = ttl / 3;
    let counts: &[usize] = if opts.smoke { &[50] } else { &[1_000, 10_000] };
    let proxy = match env.upstream() {
        Some((upstream, wire)) => Some(CountingProxy::start(upstream, wire)?),
        None => None,
    };
    for &n in counts {
        env.reset_table(table).await?;
        let backend = env
            .backend(
                table,
                Connect {
                    pool_size: 16,
                    listen: false,
                    via: proxy.as_ref().map(|p| p.addr),
                },
            )
            .await?;
        let counting = Arc::new(CountingBackend::new(backend));
        let manager = LockManager::builder(counting.clone())
            .ttl(ttl)
            .owner("distrlock-bench")
            .build()?;
        let rss_before = procstat::rss_mib();
        let keys: Vec<String> = (0..n).map(|i| format!("held/{i}")).collect();
        let guards = acquire_all(&manager, keys).await?;
        let client_cpu = || {
            procstat::cpu_seconds(None)
                - proxy
                    .as_ref()
                    .and_then(|p| p.tid)
                    .map_or(0.0, |t| procstat::cpu_seconds(Some(t)))
        };
        let (stmts0, tx0, cpu0) = (
            proxy.as_ref().map(CountingProxy::counts),
            counting.transactions.load(Ordering::Relaxed),
            client_cpu(),
        );
        let started = Instant::now();
        tokio::time::sleep(window).await;
        let elapsed = started.elapsed().as_secs_f64();
        let (stmts1, tx1, cpu1) = (
            proxy.as_ref().map(CountingProxy::counts),
            counting.transactions.load(Ordering::Relaxed),
            client_cpu(),
        );
        let rss = procstat::rss_mib();
        let lost = guards.iter().filter(|g| g.is_lost()).count();
        report.check(
            lost == 0,
            format!("{}: {lost} of {n} held locks lost", env.name()),
        );
        // The server's statements, counted on the wire; an embedded database has
        // none to count, so there the backend's renewal transactions stand in.
        let statements = match (stmts0, stmts1) {
            (Some(a), Some(b)) => b.since(a).statements as f64,
            _ => f64::NAN,
        };
        let transactions = (tx1 - tx0) as f64;
        let per_interval = |x: f64| x * interval.as_secs_f64() / elapsed;
        let stmts_per_interval = if statements.is_nan() {
            per_interval(transactions)
        } else {
            per_interval(statements)
        };
        let cpu_pct = (cpu1 - cpu0) / elapsed * 100.0;
        report.check(
            transactions > 0.0,
            format!("{}: no renewal in the {window:?} window", env.name()),
        );
        // Batched renewal: one statement (or transaction) per batch of
        // MAX_EXTEND_BATCH leases per interval, with room for a round that
        // falls on the window's edge, never one per lock.
        let batches = n.div_ceil(distrlock_core::MAX_EXTEND_BATCH) as f64;
        report.check(
            stmts_per_interval <= 2.0 * batches,
            format!(
                "{}: {stmts_per_interval:.1} statements per interval for {n} locks, expected about {batches}",
                env.name()
            ),
        );
        if !opts.smoke && n == 10_000 {
            report.check(
                stmts_per_interval <= 20.0,
                format!(
                    "{}: {stmts_per_interval:.1} statements per interval for 10,000 locks",
                    env.name()
                ),
            );
        }
        eprintln!(
            "   {n} locks: {stmts_per_interval:.1} statements per interval, CPU {cpu_pct:.2}%, RSS {rss:.1} MiB"
        );
        let shown_statements = if statements.is_nan() {
            format!("{:.2} (transactions)", transactions / elapsed)
        } else {
            format!("{:.2}", statements / elapsed)
        };
        let cells = [
            env.name().to_owned(),
            n.to_string(),
            format!("{elapsed:.0}"),
            shown_statements,
            format!("{stmts_per_interval:.1}"),
            n.to_string(),
            format!("{:.1}", per_interval(transactions)),
            format!("{cpu_pct:.2}"),
            format!("{rss_before:.0} → {rss:.0}"),
        ];
        let record = json!({
            "scenario": 3, "backend": env.name(), "held_locks": n, "ttl_s": ttl.as_secs(),
            "heartbeat_interval_s": interval.as_secs_f64(), "window_s": elapsed,
            "statements_seen_by_server": if statements.is_nan() { Value::Null } else { json!(statements) },
            "renewal_transactions": transactions,
            "statements_per_interval": stmts_per_interval,
            "client_cpu_percent": cpu_pct,
            "rss_mib_before": rss_before, "rss_mib_holding": rss,
            "lost": lost,
        });
        report.row(3, S3_HEADER, &cells, record);
        release_all(guards).await?;
    }
    env.drop_table(table).await
}

const S4_HEADER: &str = "| backend | rows in table | clients | client | cycles/s median (min–max) | p50 ms | p99 ms | vs raw driver | large vs small table |\n|---|---|---|---|---|---|---|---|---|";

async fn table_size(env: &dyn Env, opts: &Options, report: &mut Report) -> anyhow::Result<()> {
    let table = "distrlock_bench_s4";
    let sizes: &[u64] = if opts.smoke {
        &[1_000, 5_000]
    } else {
        &[10_000, 1_000_000]
    };
    let concurrencies: &[usize] = if opts.smoke { &[1] } else { &[1, 16] };
    env.reset_table(table).await?;
    let mut small: BTreeMap<(usize, &'static str), f64> = BTreeMap::new();
    for (i, &rows) in sizes.iter().enumerate() {
        let filled = Instant::now();
        env.fill(table, rows).await?;
        eprintln!(
            "   filled to {rows} rows in {:.1} s",
            filled.elapsed().as_secs_f64()
        );
        for &n in concurrencies {
            let mut variants = vec![Variant::Raw, Variant::Library];
            variants.retain(|v| opts.wants(*v));
            let results =
                measure_variants(env, table, &variants, n, opts.plan, opts.listen).await?;
            let raw = results
                .iter()
                .find(|(v, _)| *v == Variant::Raw)
                .map(|(_, f)| f.rate.median);
            for (variant, f) in &results {
                let versus_small = if i == 0 {
                    small.insert((n, variant.name()), f.rate.median);
                    "–".to_owned()
                } else {
                    small.get(&(n, variant.name())).map_or("–".into(), |s| {
                        format!("{:.2}× slower", s / f.rate.median)
                    })
                };
                let cells = [
                    env.name().to_owned(),
                    rows.to_string(),
                    n.to_string(),
                    variant.name().to_owned(),
                    f.rate.show(0),
                    f.p50_ms.show(2),
                    f.p99_ms.show(2),
                    ratio(f.rate.median, raw),
                    versus_small,
                ];
                let record = json!({
                    "scenario": 4, "backend": env.name(), "client": variant.name(), "rows": rows,
                    "concurrency": n, "figures": cycle_json(f),
                    "ratio_to_raw": raw.map(|r| f.rate.median / r),
                });
                report.row(4, S4_HEADER, &cells, record);
            }
        }
    }
    env.drop_table(table).await
}

const S5_HEADER: &str = "| backend | operation | statements per op (wire) | round trips per op (wire) | server counters per op |\n|---|---|---|---|---|";

async fn round_trips(env: &dyn Env, opts: &Options, report: &mut Report) -> anyhow::Result<()> {
    let Some((upstream, wire)) = env.upstream() else {
        report.notes.push(format!(
            "scenario 5 on {}: an embedded database has no server counters; each operation is one statement in one BEGIN IMMEDIATE transaction (sqlite/src/backend.rs)",
            env.name()
        ));
        return Ok(());
    };
    let table = "distrlock_bench_s5";
    env.reset_table(table).await?;
    let proxy = CountingProxy::start(upstream, wire)?;
    let n: usize = if opts.smoke { 20 } else { 1_000 };
    let ttl = Ttl::new(Duration::from_secs(30))?;
    let keys: Vec<distrlock_core::LockKey> = (0..n)
        .map(|i| distrlock_core::LockKey::new(format!("op/{i}")))
        .collect::<Result<_, _>>()?;
    let tokens: Vec<distrlock_core::Token> = (0..n).map(|_| distrlock_core::Token::new()).collect();
    let connect = Connect {
        pool_size: 1,
        listen: false,
        via: Some(proxy.addr),
    };
    // One phase: a fresh backend (its sessions' counts reach the server's
    // statistics when they close), `ops` operations, then the deltas.
    async fn phase<F, Fut>(
        env: &dyn Env,
        table: &str,
        connect: Connect,
        proxy: &CountingProxy,
        op: F,
    ) -> anyhow::Result<(crate::proxy::Counts, BTreeMap<String, i64>)>
    where
        F: FnOnce(Arc<dyn LockBackend>) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>>,
    {
        pg::settle_stats().await;
        let server0 = env.server_counters().await?;
        let backend = env.backend(table, connect).await?;
        // The first use of each statement on the connection prepares it.
        let warm = distrlock_core::LockKey::new("op/warm-up")?;
        let token = distrlock_core::Token::new();
        let ttl = Ttl::new(Duration::from_secs(30))?;
        let soon = || tokio::time::Instant::now() + Duration::from_secs(30);
        backend
            .try_acquire(&warm, &token, ttl, "bench", soon())
            .await?;
        backend.extend(&warm, &token, ttl, soon()).await?;
        backend.release(&warm, &token, soon()).await?;
        let wire0 = proxy.counts();
        op(backend.clone()).await?;
        let wire = proxy.counts().since(wire0);
        drop(backend);
        pg::settle_stats().await;
        let server1 = env.server_counters().await?;
        let delta = server1
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    *v as i64 - server0.get(k).copied().unwrap_or(0) as i64,
                )
            })
            .collect();
        Ok((wire, delta))
    }
    // The connection set-up and warm-up alone, to subtract from the server's counts.
    let (_, base) = phase(env, table, connect, &proxy, |_| async { Ok(()) }).await?;
    let ops: [(&str, u8); 3] = [("acquire", 0), ("extend", 1), ("release", 2)];
    for (name, which) in ops {
        let (k, t) = (keys.clone(), tokens.clone());
        let (wire, server) = phase(env, table, connect, &proxy, move |backend| async move {
            for (key, token) in k.iter().zip(&t) {
                match which {
                    0 => {
                        let not_after = tokio::time::Instant::now() + Duration::from_secs(30);
                        let outcome = backend
                            .try_acquire(key, token, ttl, "bench", not_after)
                            .await?;
                        if !matches!(outcome, distrlock_core::AcquireOutcome::Acquired { .. }) {
                            bail!("acquire of {key} refused");
                        }
                    }
                    1 => {
                        let not_after = tokio::time::Instant::now() + Duration::from_secs(30);
                        backend.extend(key, token, ttl, not_after).await?;
                    }
                    _ => {
                        let not_after = tokio::time::Instant::now() + Duration::from_secs(30);
                        backend.release(key, token, not_after).await?;
                    }
                }
            }
            Ok(())
        })
        .await?;
        let per_op = |x: f64| x / n as f64;
        let stmts = per_op(wire.statements as f64);
        let trips = per_op(wire.round_trips as f64);
        report.check(
            (stmts - 1.0).abs() < 1e-9 && (trips - 1.0).abs() < 1e-9,
            format!(
                "{} {name}: {stmts} statements and {trips} round trips per operation",
                env.name()
            ),
        );
        let server_per_op: BTreeMap<String, f64> = server
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    per_op((v - base.get(k).copied().unwrap_or(0)) as f64),
                )
            })
            .collect();
        let shown: Vec<String> = server_per_op
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        eprintln!(
            "   {name}: {stmts} statements, {trips} round trips; server {}",
            shown.join(", ")
        );
        let cells = [
            env.name().to_owned(),
            name.to_owned(),
            format!("{stmts:.2}"),
            format!("{trips:.2}"),
            shown.join(", "),
        ];
        let record = json!({
            "scenario": 5, "backend": env.name(), "operation": name, "operations": n,
            "statements_per_op_wire": stmts, "round_trips_per_op_wire": trips,
            "server_counters_per_op": server_per_op,
        });
        report.row(5, S5_HEADER, &cells, record);
    }
    env.drop_table(table).await
}
