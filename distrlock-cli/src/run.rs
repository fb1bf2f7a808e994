//! `distrlock run`: hold a lock while a command runs.

use std::time::Duration;

use distrlock_core::{Error, LockGuard, LockManager};
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::time::Instant;

use crate::child::{Signals, Target, exit_code, from_keyboard, interactive, signal_exit_code};
use crate::cli::{RunArgs, Wait};
use crate::exit::{self, CliError, show_key};
use crate::open::{CALL_TIMEOUT, Db, settle};
use crate::owner::default_owner;
use crate::progress::Progress;
use crate::supervise::{STOP_ALL, SuperviseArgs};

/// Runs `args.command` under the lock and returns distrlock's exit code.
///
/// The lock is taken, extended and released by core's [`LockManager`] with a
/// fresh random token: waiting and retries are core's, and so is the cleanup
/// of an acquire that is given up (a signal during the wait, a try cut short by
/// its timeout), which releases whatever such a try may have been granted, only
/// once that try can no longer take effect. Before returning, distrlock waits
/// for that cleanup and for any background release ([`settle`]).
pub(crate) async fn run(db: Db, args: RunArgs, quiet: bool) -> Result<u8, CliError> {
    // Caught before anything is acquired, so a signal never kills distrlock while
    // it holds the lock (the command would lose its protection unnoticed).
    let signals = Signals::catch()?;
    let command = args.command_line();
    let program = command[0].to_string_lossy().into_owned();
    let owner = args
        .owner
        .clone()
        .unwrap_or_else(|| default_owner(std::process::id(), &program));
    let timing = Timing::new(args.ttl, args.kill_grace)?;
    let manager = LockManager::builder(db.backend.clone())
        .ttl(args.ttl)
        .owner(owner)
        .safety_margin(timing.margin)
        .heartbeat_interval(timing.heartbeat)
        .call_timeout(CALL_TIMEOUT)
        .build()
        .map_err(|e| db.error(e))?;
    let result = acquire_and_supervise(&db, &manager, &args, &timing, signals, quiet).await;
    settle(&manager).await;
    result
}

async fn acquire_and_supervise(
    db: &Db,
    manager: &LockManager,
    args: &RunArgs,
    timing: &Timing,
    mut signals: Signals,
    quiet: bool,
) -> Result<u8, CliError> {
    let lock = manager.lock(args.key.as_str()).map_err(|e| db.error(e))?;
    let progress = Progress::start(db.backend.clone(), args.key.clone(), quiet);
    let mut acquire = Box::pin(async {
        match args.wait {
            None => lock.try_acquire().await,
            Some(Wait::For(wait)) => lock.acquire_timeout(wait).await,
            Some(Wait::Forever) => lock.acquire().await,
        }
    });
    let acquired = tokio::select! {
        acquired = &mut acquire => acquired,
        signal = signals.recv() => {
            // Dropping the acquire hands any try in flight to core's cleanup,
            // which `run` waits for before exiting.
            drop(acquire);
            progress.stop();
            if !quiet {
                say!("distrlock: {signal} while waiting for lock {}; not running the command",
                    show_key(&args.key));
            }
            return Ok(signal_exit_code(signal));
        }
    };
    progress.stop();
    let guard = match acquired {
        Ok(guard) => guard,
        Err(Error::HeldByOther { remaining, .. }) => {
            if !quiet {
                say!(
                    "distrlock: lock {} is held by {}; not running the command (use --wait to \
                     wait for it)",
                    show_key(&args.key),
                    crate::progress::holder(db, &args.key, remaining).await
                );
            }
            return Ok(args.conflict_exit_code);
        }
        Err(Error::Timeout { waited, .. }) => {
            if !quiet {
                say!(
                    "distrlock: lock {} still held after waiting {}; not running the command",
                    show_key(&args.key),
                    crate::output::short_duration(waited)
                );
            }
            return Ok(args.conflict_exit_code);
        }
        Err(error) => return Err(db.error(error)),
    };
    supervise(guard, args, timing, signals, quiet).await
}

/// Starts the command under `guard` and waits for it, forwarding signals and
/// stopping it if the lock is lost.
async fn supervise(
    guard: LockGuard,
    args: &RunArgs,
    timing: &Timing,
    mut signals: Signals,
    quiet: bool,
) -> Result<u8, CliError> {
    let interactive = interactive();
    // The supervisor starts CMD, kills it and everything it started if we die,
    // and exits once they all have (see `supervise.rs`).
    let supervisor = SuperviseArgs {
        parent: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        interactive,
        kill_leftovers: args.kill_leftovers,
        grace: timing.kill_grace,
        quiet,
        command: args.command_line(),
    };
    let mut command = Command::new(own_executable());
    command
        .arg0("distrlock")
        .args(supervisor.to_args())
        .env("DISTRLOCK_KEY", guard.key().as_str())
        .env("DISTRLOCK_TOKEN", guard.token().to_string())
        .env("DISTRLOCK_FENCE", guard.fence().to_string());
    if !interactive {
        command.process_group(0);
    }
    // Spawned from this thread, the main one (the runtime is current-thread):
    // the supervisor's parent-death signal fires when the thread that forked
    // it ends.
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(error) => {
            let _ = guard.release().await;
            return Err(CliError::new(
                exit::CANNOT_EXECUTE,
                format!("cannot start distrlock's supervisor for the command: {error}"),
            ));
        }
    };
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    // Outside a terminal: the group the supervisor leads, CMD and its children
    // in it. In a terminal: the supervisor, which passes signals on to CMD.
    let target = pid.map(|pid| {
        if interactive {
            Target::Process(pid)
        } else {
            Target::Group(pid)
        }
    });
    let lost = guard.lost();
    tokio::pin!(lost);
    let grace = timing.kill_grace;
    // Set once renewals failed for so long that the stop sequence began: SIGTERM
    // `grace` before the local deadline, SIGKILL at it.
    let mut stopping = false;
    loop {
        // Renewals keep the deadline more than `grace` ahead (see `Timing`):
        // this only fires once they have failed for a while.
        let at_risk = guard
            .deadline()
            .checked_sub(grace)
            .unwrap_or_else(Instant::now);
        tokio::select! {
            status = child.wait() => {
                let code = match status {
                    Ok(status) => exit_code(status),
                    Err(error) => {
                        say!("distrlock: lost track of the command: {error}");
                        exit::LOCK_LOST
                    }
                };
                if let Some(Target::Group(pgid)) = target {
                    stop_stray_group(pgid).await;
                }
                let key = guard.key().clone();
                if stopping {
                    let _ = guard.release().await;
                    return Err(CliError::new(
                        exit::LOCK_LOST,
                        format!(
                            "the command was stopped (it exited with {code}) because the lease \
                             of lock {} could not be renewed",
                            show_key(&key)
                        ),
                    ));
                }
                return match guard.release().await {
                    Ok(()) => Ok(code),
                    Err(Error::LockLost { .. }) => Err(CliError::new(
                        exit::LOCK_LOST,
                        format!(
                            "lock {} was lost before the command finished (it exited with {code})",
                            show_key(&key)
                        ),
                    )),
                    Err(error) => {
                        say!(
                            "distrlock: could not release lock {}: {error}; it frees itself when \
                             its ttl runs out",
                            show_key(&key)
                        );
                        Ok(code)
                    }
                };
            }
            () = &mut lost => {
                if let Some(target) = target {
                    if stopping {
                        say!(
                            "distrlock: lock {} was lost; killing the command (SIGKILL)",
                            show_key(guard.key())
                        );
                    } else {
                        say!(
                            "distrlock: lock {} was lost; stopping the command (SIGTERM, then \
                             SIGKILL after {})",
                            show_key(guard.key()),
                            crate::output::short_duration(grace)
                        );
                        target.send(Signal::SIGTERM);
                    }
                    if stopping || tokio::time::timeout(grace, child.wait()).await.is_err() {
                        kill_all(target, &mut child).await;
                    }
                }
                let _ = child.wait().await;
                // Frees the lease if, against the odds, it is still ours.
                let _ = guard.release().await;
                return Ok(exit::LOCK_LOST);
            }
            () = tokio::time::sleep_until(at_risk), if !stopping => {
                // A renewal may have moved the deadline meanwhile: look again.
                if guard.deadline().saturating_duration_since(Instant::now()) <= grace
                    && !guard.is_lost()
                {
                    stopping = true;
                    say!(
                        "distrlock: the lease of lock {} could not be renewed; stopping the \
                         command before it runs out (SIGTERM now, SIGKILL in {})",
                        show_key(guard.key()),
                        crate::output::short_duration(guard.time_left())
                    );
                    if let Some(target) = target {
                        target.send(Signal::SIGTERM);
                    }
                }
            }
            signal = signals.recv() => {
                let already_delivered = interactive && from_keyboard(signal);
                if let (Some(target), false) = (target, already_delivered) {
                    target.send(signal);
                }
            }
        }
    }
}

/// This program, to start the supervisor: `/proc/self/exe` on Linux, which
/// stays valid when the file is replaced or removed while distrlock runs.
fn own_executable() -> std::path::PathBuf {
    if cfg!(any(target_os = "linux", target_os = "android")) {
        return "/proc/self/exe".into();
    }
    std::env::current_exe().unwrap_or_else(|_| "distrlock".into())
}

/// SIGKILLs CMD and everything it started: the supervisor does it on
/// [`STOP_ALL`] and exits; if it has not within a second, the supervisor's
/// group (or, in a terminal, the supervisor) gets SIGKILL.
async fn kill_all(target: Target, supervisor: &mut tokio::process::Child) {
    let pid = match target {
        Target::Process(pid) | Target::Group(pid) => pid,
    };
    Target::Process(pid).send(STOP_ALL);
    if tokio::time::timeout(Duration::from_secs(1), supervisor.wait())
        .await
        .is_err()
    {
        target.send(Signal::SIGKILL);
    }
}

/// After the supervisor exited: if anything is left in the group it led, the
/// supervisor did not end normally (it was killed), and the group must not run
/// on without the lock: SIGKILL it, and wait (at most a second) until it is
/// empty.
async fn stop_stray_group(pgid: Pid) {
    let alive = || nix::sys::signal::killpg(pgid, None).is_ok();
    if !alive() {
        return;
    }
    say!(
        "distrlock: the command's supervisor ended before the command's process group; killing the group"
    );
    Target::Group(pgid).send(Signal::SIGKILL);
    let until = tokio::time::Instant::now() + Duration::from_secs(1);
    while alive() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The lease's timing for `run`: what the lock manager is given, and the kill
/// grace that fits in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Timing {
    /// The local deadline comes this long before the lease ends on the server.
    pub(crate) margin: Duration,
    /// How often the lease is renewed.
    pub(crate) heartbeat: Duration,
    /// Between SIGTERM and SIGKILL.
    pub(crate) kill_grace: Duration,
}

/// The kill grace when none is given, unless the ttl leaves less room.
const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);

impl Timing {
    /// Core's defaults for a lease of `ttl` (margin ttl/10, at most
    /// 1 s + ttl/500; heartbeat ttl/3), made explicit, and the kill grace.
    ///
    /// While renewals succeed, the local deadline stays at least
    /// `ttl − margin − heartbeat` ahead. A kill grace shorter than that starts
    /// the stop sequence (SIGTERM at deadline − grace) only once a renewal is
    /// overdue, and lands SIGKILL at the deadline, `margin` before the server
    /// can hand the lock to anyone else. A longer one is a usage error; the
    /// default is 10 s, or half of that window when it is shorter.
    pub(crate) fn new(ttl: Duration, kill_grace: Option<Duration>) -> Result<Self, CliError> {
        let margin = (ttl / 10).min(Duration::from_secs(1) + ttl / 500);
        let heartbeat = ttl / 3;
        let window = ttl.saturating_sub(margin).saturating_sub(heartbeat);
        let kill_grace = match kill_grace {
            Some(grace) if grace >= window => {
                return Err(CliError::usage(format!(
                    "--kill-grace {} is too long for --ttl {}: it must be shorter than {} (the \
                     ttl less the safety margin of {} and the heartbeat of {}), so that when \
                     renewals fail, SIGKILL lands before the lease can end on the server",
                    crate::output::short_duration(grace),
                    crate::output::short_duration(ttl),
                    crate::output::short_duration(window),
                    crate::output::short_duration(margin),
                    crate::output::short_duration(heartbeat),
                )));
            }
            Some(grace) => grace,
            None if DEFAULT_KILL_GRACE < window => DEFAULT_KILL_GRACE,
            None => window / 2,
        };
        Ok(Self {
            margin,
            heartbeat,
            kill_grace,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kill_grace_fits_between_the_heartbeat_and_the_deadline() {
        let t = Timing::new(Duration::from_secs(30), None).unwrap();
        assert_eq!(t.margin, Duration::from_millis(1060));
        assert_eq!(t.heartbeat, Duration::from_secs(10));
        assert_eq!(t.kill_grace, DEFAULT_KILL_GRACE);
        let short = Timing::new(Duration::from_secs(3), None).unwrap();
        assert_eq!(short.kill_grace, Duration::from_millis(850));
        assert!(Timing::new(Duration::from_secs(3), Some(Duration::from_secs(1))).is_ok());
        let error =
            Timing::new(Duration::from_secs(30), Some(Duration::from_secs(19))).unwrap_err();
        assert_eq!(error.code, exit::USAGE);
        assert!(error.message.contains("--kill-grace"), "{}", error.message);
    }
}
