//! The distrlock benchmark program. See `BENCHMARKS.md` at the repository root
//! for what it measures, the latest figures and the command that produced them.
//!
//! ```text
//! cargo run -p distrlock-bench --release -- [--smoke] [--backends postgres,mariadb,sqlite]
//! ```

mod env;
mod go;
mod lite;
mod measure;
mod mysql;
mod pg;
mod procstat;
mod proxy;
mod scenarios;
mod stats;
mod workload;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Benchmarks distrlock against the raw driver, the Go original's protocol and
/// the databases' native locks.
#[derive(Debug, Parser)]
#[command(name = "distrlock-bench", version)]
struct Args {
    /// A seconds-long run that checks every scenario works, not how fast.
    #[arg(long)]
    smoke: bool,
    /// Which backends to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "postgres,mariadb,sqlite")]
    backends: Vec<String>,
    /// Which scenarios to run (1–6), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6")]
    scenarios: Vec<u8>,
    /// Which clients to run in scenarios 1 and 4 (distrlock, raw, go, native),
    /// comma-separated; for profiling one of them.
    #[arg(long, value_delimiter = ',', default_value = "raw,distrlock,go,native")]
    clients: Vec<String>,
    /// Client counts for scenario 1 (default 1,4,16; smoke 1,4).
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Waiter counts for scenario 2 (default 2,8,32,64; smoke 2).
    #[arg(long, value_delimiter = ',')]
    waiters: Vec<usize>,
    /// Whether the library's PostgreSQL backend listens for release
    /// notifications in scenarios 1 and 4 (its default: true).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    listen: bool,
    /// Repetitions of each measurement.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Length of each repetition, in milliseconds.
    #[arg(long, default_value_t = 3_000)]
    measure_ms: u64,
    /// Warm-up before the repetitions, in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    warmup_ms: u64,
    /// PostgreSQL server (the benchmark creates and uses database `distrlock_bench`).
    #[arg(
        long,
        env = "DISTRLOCK_TEST_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    postgres_url: String,
    /// MariaDB / MySQL server (the benchmark creates and uses database `distrlock_bench`).
    #[arg(
        long,
        env = "DISTRLOCK_TEST_MYSQL_URL",
        default_value = "mysql://root@127.0.0.1:3306/test"
    )]
    mysql_url: String,
    /// Directory for the SQLite files (on a real disk, so commits are synced).
    #[arg(long, default_value = "/var/tmp/distrlock-bench")]
    sqlite_dir: PathBuf,
    /// Where to write the JSON results.
    #[arg(long, default_value = "target/distrlock-bench/results.json")]
    json: PathBuf,
    /// Where to write the Markdown tables.
    #[arg(long, default_value = "target/distrlock-bench/results.md")]
    markdown: PathBuf,
    /// Print the PostgreSQL statements (DDL, acquire, release, Go sequence) for
    /// this table and exit, for profiling them with other tools (pgbench).
    #[arg(long, value_name = "TABLE")]
    print_postgres_sql: Option<String>,
    /// Run this many uncontended cycles of the one `--clients` variant on the
    /// one `--backends` backend, on a single-threaded runtime, and exit: for
    /// counting instructions with `valgrind --tool=callgrind`
    /// (`scripts/instructions`).
    #[arg(long, value_name = "N")]
    count_cycles: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(table) = &args.print_postgres_sql {
        return match print_postgres_sql(table) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("distrlock-bench: {error:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(cycles) = args.count_cycles {
        // One thread: the count does not depend on how work is spread over
        // worker threads.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        return match runtime.block_on(scenarios::count_cycles(args.into(), cycles)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("distrlock-bench: {error:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(scenarios::run(args.into())) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("distrlock-bench: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn print_postgres_sql(table: &str) -> anyhow::Result<()> {
    let name = distrlock_core::TableName::new(table)?;
    let sql = distrlock_postgres::LockSql::for_table(&name);
    let t = name.quoted('"');
    println!(
        "-- create table\n{}",
        distrlock_postgres::PostgresBackend::schema_sql_for(&name)
    );
    println!("-- acquire\n{};\n", sql.acquire);
    println!("-- release (channel {})\n{};\n", sql.channel, sql.release);
    println!("-- Go sequence: init\n{};\n", go::postgres_init(&t));
    println!("-- Go sequence: acquire\n{};\n", go::postgres_acquire(&t));
    println!("-- Go sequence: release\n{};", go::postgres_release(&t));
    Ok(())
}

impl From<Args> for scenarios::Options {
    fn from(args: Args) -> Self {
        let plan = if args.smoke {
            measure::Plan {
                warmup: Duration::from_millis(100),
                measure: Duration::from_millis(300),
                reps: 1,
            }
        } else {
            measure::Plan {
                warmup: Duration::from_millis(args.warmup_ms),
                measure: Duration::from_millis(args.measure_ms),
                reps: args.reps.max(1),
            }
        };
        scenarios::Options {
            smoke: args.smoke,
            backends: args.backends,
            scenarios: args.scenarios,
            clients: args.clients,
            concurrency: args.concurrency,
            waiters: (!args.waiters.is_empty()).then_some(args.waiters),
            listen: args.listen,
            plan,
            postgres_url: args.postgres_url,
            mysql_url: args.mysql_url,
            sqlite_dir: args.sqlite_dir,
            json: args.json,
            markdown: args.markdown,
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}
