#![doc = include_str!("../README.md")]

/// `eprintln!` that cannot panic: a closed stderr must not turn into a crash.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` that cannot panic: `distrlock status | head -1` closes stdout early.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that cannot panic.
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

mod child;
mod cli;
mod exit;
mod open;
mod output;
mod owner;
mod progress;
mod run;
mod server;
mod status;
mod supervise;
mod tokens;
mod url;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::exit::CliError;
use crate::open::Db;
use crate::url::DbUrl;

fn main() -> ExitCode {
    // A bug must still end in one line, never a backtrace (RUST_BACKTRACE may be
    // set in the environment of a cron job).
    std::panic::set_hook(Box::new(|info| {
        say!(
            "distrlock: internal error (please report it): {}",
            info.to_string().replace('\n', " ")
        );
    }));
    // `distrlock run`'s supervisor, answered before clap: it takes no options
    // from the environment, and starts fast.
    let mut args = std::env::args_os();
    if args.nth(1).as_deref() == Some(std::ffi::OsStr::new(supervise::SUBCOMMAND)) {
        return supervise::main(args);
    }
    // Clap prints usage errors itself and exits 2 (0 for --help and --version).
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    let code = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            runtime.block_on(dispatch(cli))
        }))
        .unwrap_or(Ok(exit::LOCK_LOST)),
        Err(error) => Err(CliError::new(
            exit::LOCK_LOST,
            format!("cannot start the async runtime: {error}"),
        )),
    };
    match code {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            // Errors print even with --quiet: a silent failure helps no one.
            say!("distrlock: {}", error.message);
            ExitCode::from(error.code)
        }
    }
}

async fn dispatch(cli: Cli) -> Result<u8, CliError> {
    match cli.command {
        Command::Completions { shell } => return Ok(completions(shell)),
        Command::Man => return man(),
        _ => {}
    }
    let url = DbUrl::from_args(
        cli.url.as_deref(),
        cli.url_file.as_deref(),
        cli.ca_file.as_deref(),
    )?;
    if let Command::Schema = cli.command {
        return status::schema(&url, &cli.table);
    }
    // Only a command that waits for a lock wants release notifications.
    let listen = match &cli.command {
        Command::Run(args) => args.wait.is_some(),
        Command::Acquire(args) => args.wait.is_some(),
        _ => false,
    };
    // PostgreSQL's table-wide max_ttl, for `init`, and for a table that has
    // none yet (made by an older version): long enough for this command's ttl.
    let max_ttl = match &cli.command {
        Command::Init(args) => args.max_ttl,
        Command::Run(args) => args.ttl.max(open::DEFAULT_MAX_TTL),
        Command::Acquire(args) => args.ttl.max(open::DEFAULT_MAX_TTL),
        Command::Extend(args) => args.ttl.max(open::DEFAULT_MAX_TTL),
        _ => open::DEFAULT_MAX_TTL,
    };
    let db = Db::open(url, cli.table, listen, max_ttl).await?;
    match cli.command {
        Command::Run(args) => run::run(db, args, cli.quiet).await,
        Command::Acquire(args) => tokens::acquire(db, args, cli.quiet).await,
        Command::Extend(args) => tokens::extend(db, args).await,
        Command::Release(args) => tokens::release(db, args).await,
        Command::Status(args) => status::status(db, args).await,
        Command::Init(_) => status::init(db, cli.quiet).await,
        // Answered above without opening the database.
        Command::Schema => status::schema(&db.url, &db.table),
        Command::Completions { .. } | Command::Man => Ok(0),
    }
}

/// Shows the lock library's tracing events on stderr with `-v` (debug; `-vv`:
/// trace) or when `RUST_LOG` is set (its filter then decides). Without either,
/// nothing is installed: distrlock's own messages say what matters.
fn init_tracing(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::new(spec),
        _ if verbose > 0 => {
            let level = if verbose > 1 { "trace" } else { "debug" };
            EnvFilter::new(
                [
                    "distrlock",
                    "distrlock_core",
                    "distrlock_postgres",
                    "distrlock_mysql",
                    "distrlock_sqlite",
                ]
                .map(|target| format!("{target}={level}"))
                .join(","),
            )
        }
        _ => return,
    };
    use std::io::IsTerminal as _;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// `distrlock completions SHELL`: the completion script, from the same clap
/// definition as the parser.
fn completions(shell: clap_complete::Shell) -> u8 {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "distrlock", &mut out);
    out_raw!("{}", String::from_utf8_lossy(&out));
    0
}

/// `distrlock man`: the man page, in roff.
fn man() -> Result<u8, CliError> {
    use clap::CommandFactory as _;
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(|e| CliError::new(exit::LOCK_LOST, format!("cannot write the man page: {e}")))?;
    out_raw!("{}", String::from_utf8_lossy(&out));
    Ok(0)
}
