//! The command line, as clap parses it.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use distrlock_core::{LockKey, TableName, Token};

/// How long `--wait` waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// At most this long.
    For(Duration),
    /// Until acquired.
    Forever,
}

const EXIT_CODES: &str = "\
Exit codes:
  0    success (for `run`: the command's own exit code is passed through)
  1    extend/release: the token does not hold the lock (expired, released or taken over)
  2    usage error: bad option, duration, key, token, table name or URL
  69   the database cannot be reached (or TLS failed) or has no lock table
  70   run: the lock was lost while the command ran (the command was stopped); internal errors
  75   run/acquire: the lock was not acquired in time (see --conflict-exit-code)
  126  run: the command could not be started; 127: the command was not found
  128+N  run: signal N killed the command, or reached distrlock while it waited";

const URL_HELP: &str = "\
The database that stores the locks:
  postgres://USER:PASSWORD@HOST:PORT/DB   PostgreSQL
  mysql://USER:PASSWORD@HOST:PORT/DB      MySQL or MariaDB
  sqlite://PATH                           a SQLite file on this host (sqlite:///abs/path.db)
Without a URL, a per-user SQLite file in the state directory is used
($XDG_STATE_HOME/distrlock/locks.db, by default ~/.local/state/distrlock/locks.db), so two
shells of the same user contend for the same locks. `distrlock status` shows which file.

Keep passwords out of the command line: set DISTRLOCK_URL, use --url-file, or leave the
password out of the URL and set PGPASSWORD / PGPASSFILE (~/.pgpass) or MYSQL_PWD.
TLS: ?sslmode=disable|prefer|require|verify-ca|verify-full (or ssl-mode=DISABLED|PREFERRED|
REQUIRED|VERIFY_CA|VERIFY_IDENTITY); the default, prefer, encrypts when the server offers TLS
without verifying its certificate. Verifying modes trust the bundled and system roots, or
the CA file of sslrootcert= / ssl-ca= / --ca-file.";

/// Distributed locks for shell scripts, cron jobs and deploy steps, stored as rows in
/// the SQL database you already run.
#[derive(Debug, Parser)]
#[command(
    name = "distrlock",
    version,
    about = "Run commands under distributed locks stored in PostgreSQL, MySQL/MariaDB or SQLite",
    long_about = "Run commands under distributed locks stored as rows in the SQL database you \
                  already run (PostgreSQL, MySQL/MariaDB), or in a local SQLite file when no \
                  database is named. `distrlock run --key nightly -- ./job.sh` runs ./job.sh on \
                  one host at a time, like flock(1) across machines.",
    after_help = EXIT_CODES,
    propagate_version = true
)]
pub(crate) struct Cli {
    /// Database URL: postgres://…, mysql://… or sqlite://PATH [default: per-user SQLite file]
    #[arg(
        long,
        env = "DISTRLOCK_URL",
        global = true,
        value_name = "URL",
        hide_env_values = true,
        long_help = URL_HELP
    )]
    pub(crate) url: Option<String>,

    /// Read the database URL from the first line of this file (keeps the password out of argv)
    #[arg(long, env = "DISTRLOCK_URL_FILE", global = true, value_name = "PATH")]
    pub(crate) url_file: Option<std::path::PathBuf>,

    /// PEM file of the CA that signed the server's certificate (like sslrootcert=)
    #[arg(long, env = "DISTRLOCK_CA_FILE", global = true, value_name = "PATH")]
    pub(crate) ca_file: Option<std::path::PathBuf>,

    /// Table that holds the locks: a plain name, or schema.table on PostgreSQL/MySQL
    #[arg(
        long,
        env = "DISTRLOCK_TABLE",
        global = true,
        value_name = "NAME",
        default_value = TableName::DEFAULT,
        value_parser = parse_table
    )]
    pub(crate) table: TableName,

    /// Print no progress or notes on stderr (errors are still printed)
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,

    /// Show the lock library's events on stderr (-vv for more); RUST_LOG also
    /// works, e.g. RUST_LOG=distrlock_core=debug
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a command while holding a lock; release it when the command exits
    #[command(
        long_about = "Acquire KEY (waiting up to --wait), run CMD with DISTRLOCK_KEY, \
                      DISTRLOCK_TOKEN and DISTRLOCK_FENCE in its environment while the lease is \
                      extended in the background, then release and exit with CMD's exit code \
                      (128+N if signal N killed it). SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, \
                      SIGUSR2 and SIGALRM are forwarded to CMD. Processes CMD leaves running \
                      keep the lock until they end (or --kill-leftovers stops them). If \
                      distrlock dies, even of SIGKILL, CMD and everything it started are killed \
                      (on Linux). If renewals keep failing, CMD gets SIGTERM --kill-grace \
                      before the lease's local deadline and SIGKILL at it; if the lock is lost \
                      otherwise (another holder took over), SIGTERM, then SIGKILL after \
                      --kill-grace; either way distrlock exits 70. If the lock is not acquired \
                      in time, CMD is not run and distrlock exits 75 (or --conflict-exit-code).",
        after_help = "Examples:\n  \
                      distrlock run --key demo -- echo hello\n  \
                      distrlock run --key nightly-report --wait 5m --ttl 1m -- ./report.sh --full\n  \
                      distrlock run -q --key cleanup --conflict-exit-code 0 -- ./cleanup.sh   # skip quietly if busy"
    )]
    Run(RunArgs),

    /// Acquire a lock and keep it after distrlock exits; print key, token, fence and expiry as JSON
    #[command(
        long_about = "Acquire KEY (waiting up to --wait) and print one line of JSON with key, \
                      token, fence, owner, ttl and expiry. The lock stays held after distrlock \
                      exits, until the ttl runs out: nothing extends it in the background. Keep \
                      it with `distrlock extend` and end it with `distrlock release`, passing \
                      the token. Exits 75 (or --conflict-exit-code) if not acquired in time.",
        after_help = "Example:\n  \
                      lock=$(distrlock acquire --key deploy --ttl 10m --wait 1m) || exit\n  \
                      token=$(printf '%s' \"$lock\" | jq -r .token)\n  \
                      ./step1 && distrlock extend --key deploy --token \"$token\" --ttl 10m && ./step2\n  \
                      distrlock release --key deploy --token \"$token\""
    )]
    Acquire(AcquireArgs),

    /// Renew a lock held by TOKEN for another --ttl; print the new expiry as JSON
    Extend(ExtendArgs),

    /// Release a lock held by TOKEN
    Release(ReleaseArgs),

    /// Show the database in use and its locks: owner, fence, state and time left
    Status(StatusArgs),

    /// Create the lock table in the database (safe to repeat)
    Init(InitArgs),

    /// Print the DDL of the lock table for the URL's backend, for your migration tool
    Schema,

    /// Print a shell completion script: `distrlock completions bash > /etc/bash_completion.d/distrlock`
    #[command(hide = true)]
    Completions {
        /// The shell to complete for
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff): `distrlock man > /usr/local/share/man/man1/distrlock.1`
    #[command(hide = true)]
    Man,
}

#[derive(Debug, Args)]
pub(crate) struct InitArgs {
    /// PostgreSQL: the table's longest ttl, which is also how long a promoted
    /// standby grants no lock after a failover (the failover quarantine); a
    /// table that has a shorter one is raised to it, never lowered. Other
    /// databases have no such limit
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = parse_ttl)]
    pub(crate) max_ttl: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Name of the lock (1 to 255 bytes)
    #[arg(short, long, value_parser = parse_key)]
    pub(crate) key: LockKey,

    /// Lease length; the lease is extended every ttl/3 while CMD runs
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_ttl)]
    pub(crate) ttl: Duration,

    /// How long to wait for the lock, like 10s, 5m, 1h30m or forever [default: do not wait]
    #[arg(short, long, value_name = "DURATION|forever", value_parser = parse_wait)]
    pub(crate) wait: Option<Wait>,

    /// Owner text stored with the lock, shown by `status` [default: HOST:PID CMD]
    #[arg(long, value_name = "TEXT")]
    pub(crate) owner: Option<String>,

    /// Exit code when the lock is not acquired in time
    #[arg(short = 'E', long, value_name = "N", default_value_t = 75)]
    pub(crate) conflict_exit_code: u8,

    /// How long CMD has between SIGTERM and SIGKILL when distrlock stops it:
    /// while renewals fail, SIGTERM comes this long before the lease's local
    /// deadline and SIGKILL at it. It must be shorter than the ttl minus the
    /// safety margin and the heartbeat (ttl/3) [default: 10s, or half that
    /// window when it is shorter]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub(crate) kill_grace: Option<Duration>,

    /// When the command exits but left processes running (`x &`, nohup, a
    /// daemon), stop them (SIGTERM, then SIGKILL after --kill-grace) instead of
    /// holding the lock until they end
    #[arg(long)]
    pub(crate) kill_leftovers: bool,

    /// Run this shell command line with `sh -c` instead of CMD, as flock -c does
    #[arg(
        short = 'c',
        long = "command",
        id = "shell",
        value_name = "SHELL_COMMAND",
        conflicts_with = "command"
    )]
    pub(crate) shell: Option<OsString>,

    /// The command to run, and its arguments (put them after --)
    #[arg(
        value_name = "CMD",
        required_unless_present = "shell",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub(crate) command: Vec<OsString>,
}

impl RunArgs {
    /// The program and its arguments: CMD, or `sh -c SHELL_COMMAND`.
    pub(crate) fn command_line(&self) -> Vec<OsString> {
        match &self.shell {
            Some(line) => vec!["sh".into(), "-c".into(), line.clone()],
            None => self.command.clone(),
        }
    }
}

#[derive(Debug, Args)]
pub(crate) struct AcquireArgs {
    /// Name of the lock (1 to 255 bytes)
    #[arg(short, long, value_parser = parse_key)]
    pub(crate) key: LockKey,

    /// Lease length: the lock is free again this long after acquiring unless extended
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_ttl)]
    pub(crate) ttl: Duration,

    /// How long to wait for the lock, like 10s, 5m, 1h30m or forever [default: do not wait]
    #[arg(short, long, value_name = "DURATION|forever", value_parser = parse_wait)]
    pub(crate) wait: Option<Wait>,

    /// Owner text stored with the lock, shown by `status` [default: "HOST:PARENT-PID (shell)"]
    #[arg(long, value_name = "TEXT")]
    pub(crate) owner: Option<String>,

    /// Exit code when the lock is not acquired in time
    #[arg(short = 'E', long, value_name = "N", default_value_t = 75)]
    pub(crate) conflict_exit_code: u8,
}

#[derive(Debug, Args)]
pub(crate) struct ExtendArgs {
    /// Name of the lock
    #[arg(short, long, value_parser = parse_key)]
    pub(crate) key: LockKey,

    /// The token printed by `distrlock acquire`
    #[arg(short, long, value_parser = parse_token)]
    pub(crate) token: Token,

    /// New lease length, counted from now
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_ttl)]
    pub(crate) ttl: Duration,
}

#[derive(Debug, Args)]
pub(crate) struct ReleaseArgs {
    /// Name of the lock
    #[arg(short, long, value_parser = parse_key)]
    pub(crate) key: LockKey,

    /// The token printed by `distrlock acquire`
    #[arg(short, long, value_parser = parse_token)]
    pub(crate) token: Token,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// Show only this lock
    #[arg(short, long, value_parser = parse_key)]
    pub(crate) key: Option<LockKey>,

    /// Print JSON instead of a table
    #[arg(long)]
    pub(crate) json: bool,
}

fn parse_key(s: &str) -> Result<LockKey, String> {
    LockKey::new(s).map_err(|e| e.to_string())
}

fn parse_token(s: &str) -> Result<Token, String> {
    s.parse().map_err(|e: distrlock_core::Error| e.to_string())
}

fn parse_table(s: &str) -> Result<TableName, String> {
    TableName::new(s).map_err(|e| e.to_string())
}

/// Parses `30s`, `5m`, `1h30m`, `250ms`, … (humantime's syntax), or bare
/// seconds as flock(1) takes them: `5`, `0.5`.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return s
            .parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or_else(|| format!("{s:?} is not a number of seconds"));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{e}; write a duration like 30s, 5m or 1h30m (or seconds: 30)"))
}

/// The shortest ttl the commands accept: a lease must outlast several round
/// trips to the database (the acquire itself, and each renewal at ttl/3).
pub(crate) const MIN_TTL: Duration = Duration::from_secs(1);

/// Parses a ttl: a duration of at least [`MIN_TTL`].
pub(crate) fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = parse_duration(s)?;
    if ttl < MIN_TTL {
        return Err(format!(
            "--ttl {} is too short: a lease must last at least {}, to outlast several round \
             trips to the database",
            s.trim(),
            humantime::format_duration(MIN_TTL)
        ));
    }
    Ok(ttl)
}

/// Parses a duration or `forever`.
pub(crate) fn parse_wait(s: &str) -> Result<Wait, String> {
    if s.trim().eq_ignore_ascii_case("forever") {
        Ok(Wait::Forever)
    } else {
        parse_duration(s).map(Wait::For)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_like_the_docs_say() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-5s").is_err());
        assert_eq!(parse_wait("forever"), Ok(Wait::Forever));
        assert_eq!(parse_wait("0s"), Ok(Wait::For(Duration::ZERO)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("1.2.3").is_err());
        assert!(parse_ttl("3ms").unwrap_err().contains("too short"));
        assert_eq!(parse_ttl("30"), Ok(Duration::from_secs(30)));
    }
}
