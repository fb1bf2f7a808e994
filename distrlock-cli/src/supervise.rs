//! The supervisor: a small process between `distrlock run` and the command, so
//! that the command never outlives the lock.
//!
//! `distrlock run` starts itself again as `distrlock __supervise … -- CMD`
//! (an internal subcommand, answered before the command line is parsed), and
//! the supervisor starts CMD. The supervisor:
//!
//! - sets its **parent-death signal** ([`STOP_ALL`]) and checks with `getppid`
//!   that distrlock is still there, so that when distrlock dies, even of
//!   SIGKILL, the kernel tells it, and it kills CMD and everything CMD started;
//! - is a **child subreaper**: processes CMD leaves behind (`x &`, `nohup`, a
//!   daemon's double fork, `setsid`) become its children when their parent
//!   exits, so it sees every one of them, wherever their process group;
//! - after CMD exits, **waits for those leftovers** to end (or, with
//!   `--kill-leftovers`, stops them) before it exits with CMD's code: distrlock
//!   holds the lock until then;
//! - on [`STOP_ALL`] from distrlock (the lock was lost and the grace is over)
//!   or from the kernel (distrlock died), SIGKILLs its children until none is
//!   left, then exits.
//!
//! Outside a terminal the supervisor leads CMD's process group (distrlock starts
//! it in a new group), distrlock signals that whole group, and the supervisor
//! ignores what reaches it. In the foreground of a terminal it shares the
//! terminal's group and passes the signals distrlock sends it on to CMD,
//! except SIGINT and SIGQUIT, which the terminal gives CMD itself.
//!
//! Only Linux (and Android) have the parent-death signal and subreapers. On
//! other systems the supervisor still waits for CMD and forwards signals, but
//! SIGKILL of distrlock leaves CMD running, and it cannot see leftovers.

use std::ffi::{OsStr, OsString};
use std::process::ExitCode;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{Pid, getpgrp, getpid, getppid};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::child::from_keyboard;
use crate::exit;

/// The internal subcommand's name: `distrlock __supervise …`.
pub(crate) const SUBCOMMAND: &str = "__supervise";

/// The signal that tells the supervisor to kill everything and exit: its
/// parent-death signal, and what distrlock sends when the grace after a loss
/// is over. A signal nothing else sends to a process like this one.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) const STOP_ALL: Signal = Signal::SIGPWR;
/// See the Linux definition.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) const STOP_ALL: Signal = Signal::SIGXCPU;

/// How often the supervisor looks again without being woken by a signal: a
/// SIGCHLD can be coalesced, and `getppid` is the parent-death check of last
/// resort.
const POLL_EVERY: Duration = Duration::from_millis(100);

/// How long the final sweep keeps killing children that appear (orphans of
/// killed children, reparented to us) before it gives up.
const SWEEP_LIMIT: Duration = Duration::from_secs(3);

/// The supervisor's settings, as `distrlock run` passes them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct SuperviseArgs {
    /// distrlock's pid: if `getppid` is anything else, distrlock is gone.
    pub(crate) parent: i32,
    /// Whether CMD shares the terminal's process group (see the module docs).
    pub(crate) interactive: bool,
    /// Stop the processes CMD leaves running instead of waiting for them.
    pub(crate) kill_leftovers: bool,
    /// Between SIGTERM and SIGKILL for leftovers, with `kill_leftovers`.
    pub(crate) grace: Duration,
    /// No note about leftovers.
    pub(crate) quiet: bool,
    /// CMD and its arguments.
    pub(crate) command: Vec<OsString>,
}

impl SuperviseArgs {
    /// The arguments after [`SUBCOMMAND`] that [`parse`](Self::parse) reads back.
    pub(crate) fn to_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            SUBCOMMAND.into(),
            "--parent".into(),
            self.parent.to_string().into(),
            "--grace-ms".into(),
            self.grace.as_millis().to_string().into(),
        ];
        for (on, flag) in [
            (self.interactive, "--interactive"),
            (self.kill_leftovers, "--kill-leftovers"),
            (self.quiet, "--quiet"),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        args.push("--".into());
        args.extend(self.command.iter().cloned());
        args
    }

    /// Reads what [`to_args`](Self::to_args) wrote (without the subcommand).
    pub(crate) fn parse(mut args: impl Iterator<Item = OsString>) -> Result<Self, String> {
        let mut parsed = Self::default();
        let number = |value: Option<OsString>, name: &str| -> Result<u64, String> {
            value
                .and_then(|v| v.to_str().and_then(|v| v.parse().ok()))
                .ok_or_else(|| format!("{name} needs a number"))
        };
        while let Some(arg) = args.next() {
            match arg.to_str() {
                Some("--parent") => {
                    parsed.parent = i32::try_from(number(args.next(), "--parent")?)
                        .map_err(|e| e.to_string())?;
                }
                Some("--grace-ms") => {
                    parsed.grace = Duration::from_millis(number(args.next(), "--grace-ms")?);
                }
                Some("--interactive") => parsed.interactive = true,
                Some("--kill-leftovers") => parsed.kill_leftovers = true,
                Some("--quiet") => parsed.quiet = true,
                Some("--") => {
                    parsed.command = args.collect();
                    break;
                }
                _ => return Err(format!("unexpected argument {arg:?}")),
            }
        }
        if parsed.command.is_empty() || parsed.parent <= 0 {
            return Err("needs --parent PID and a command after --".into());
        }
        Ok(parsed)
    }
}

/// `distrlock __supervise …`: parses the rest of the command line and
/// supervises; the exit code is CMD's (128+N if signal N killed it).
pub(crate) fn main(args: impl Iterator<Item = OsString>) -> ExitCode {
    let args = match SuperviseArgs::parse(args) {
        Ok(args) => args,
        Err(error) => {
            say!("distrlock: {SUBCOMMAND} is internal to `distrlock run`: {error}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            say!("distrlock: cannot start the async runtime: {error}");
            return ExitCode::from(exit::LOCK_LOST);
        }
    };
    ExitCode::from(runtime.block_on(supervise(args)))
}

async fn supervise(args: SuperviseArgs) -> u8 {
    // Handlers first: from here on no forwarded signal kills the supervisor.
    // Handlers (unlike ignored signals) are reset when CMD execs.
    let catch = |sig: Signal| signal(SignalKind::from_raw(sig as i32));
    let (Ok(mut child_exited), Ok(mut stop_all), Ok(mut forwarded)) = (
        catch(Signal::SIGCHLD),
        catch(STOP_ALL),
        crate::child::Signals::catch(),
    ) else {
        say!("distrlock: cannot install signal handlers");
        return exit::LOCK_LOST;
    };
    let parent = Pid::from_raw(args.parent);
    guard_against_parent_death();
    if getppid() != parent {
        // distrlock died before the parent-death signal was set.
        return exit::LOCK_LOST;
    }
    let program = args.command[0].clone();
    let cmd = match std::process::Command::new(&program)
        .args(&args.command[1..])
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            let code = if error.kind() == std::io::ErrorKind::NotFound {
                exit::NOT_FOUND
            } else {
                exit::CANNOT_EXECUTE
            };
            say!("distrlock: cannot run {:?}: {error}", show(&program));
            return code;
        }
    };
    // Reaped below with waitpid(-1), with the orphans.
    let cmd = Pid::from_raw(i32::try_from(cmd.id()).unwrap_or(i32::MAX));
    let mut cmd_code: Option<u8> = None;
    let mut noted = false;
    let mut kill_at: Option<Instant> = None;
    loop {
        if reap(cmd, &mut cmd_code) == Children::None {
            break;
        }
        if let (Some(code), false) = (cmd_code, noted) {
            noted = true;
            on_leftovers(&args, code, &mut kill_at);
        }
        // CMD's pid is only ours to signal until it is reaped.
        let unreaped = cmd_code.is_none().then_some(cmd);
        if getppid() != parent {
            sweep(&args, unreaped);
            return cmd_code.unwrap_or(exit::LOCK_LOST);
        }
        let kill_leftovers_at = kill_at;
        tokio::select! {
            _ = child_exited.recv() => {}
            _ = stop_all.recv() => {
                sweep(&args, unreaped);
                return cmd_code.unwrap_or(exit::LOCK_LOST);
            }
            sig = forwarded.recv() => {
                // Outside a terminal distrlock signals the whole group, CMD
                // included: nothing to do. In a terminal, pass it on to CMD.
                if let (true, false, Some(cmd)) = (args.interactive, from_keyboard(sig), unreaped) {
                    let _ = kill(cmd, sig);
                }
            }
            () = tokio::time::sleep(POLL_EVERY) => {}
            () = async {
                match kill_leftovers_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                kill_at = None;
                sweep_children(Signal::SIGKILL);
            }
        }
    }
    cmd_code.unwrap_or(exit::LOCK_LOST)
}

/// Once CMD has exited: says which processes it left running, and stops them
/// with `--kill-leftovers` (SIGTERM now, SIGKILL at `kill_at`).
fn on_leftovers(args: &SuperviseArgs, code: u8, kill_at: &mut Option<Instant>) {
    let left = children();
    let key = std::env::var("DISTRLOCK_KEY").unwrap_or_default();
    let pids = left
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(" ");
    let what = if left.is_empty() {
        // Reaped meanwhile, or no /proc to list them.
        "processes".to_owned()
    } else {
        format!("pid {pids}")
    };
    if args.kill_leftovers {
        if !args.quiet {
            say!(
                "distrlock: the command exited ({code}) and left running {what}; stopping them \
                 (SIGTERM, then SIGKILL after {}) before releasing lock {key:?}",
                crate::output::short_duration(args.grace)
            );
        }
        sweep_children(Signal::SIGTERM);
        if leads_group(args) {
            let _ = killpg(getpgrp(), Signal::SIGTERM);
        }
        *kill_at = Some(Instant::now() + args.grace);
    } else if !args.quiet {
        say!(
            "distrlock: the command exited ({code}) and left running {what}; lock {key:?} stays \
             held until they end (--kill-leftovers stops them instead)"
        );
    }
}

/// Whether the supervisor leads the process group CMD runs in.
fn leads_group(args: &SuperviseArgs) -> bool {
    !args.interactive && getpgrp() == getpid()
}

/// What [`reap`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Children {
    /// Some are still running.
    Some,
    /// None is left: CMD and every leftover have exited.
    None,
}

/// Reaps every child that has exited, noting CMD's exit code.
fn reap(cmd: Pid, cmd_code: &mut Option<u8>) -> Children {
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => return Children::Some,
            Ok(WaitStatus::Exited(pid, code)) => {
                if pid == cmd {
                    *cmd_code = Some(u8::try_from(code & 0xff).unwrap_or(u8::MAX));
                }
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                if pid == cmd {
                    *cmd_code = Some(crate::child::signal_exit_code(sig));
                }
            }
            Ok(_) | Err(Errno::EINTR) => {}
            Err(_) => return Children::None,
        }
    }
}

/// Kills CMD (while `cmd` is unreaped) and everything it started, until no
/// child is left; past [`SWEEP_LIMIT`], the whole group if the supervisor
/// leads it (which ends the supervisor too).
fn sweep(args: &SuperviseArgs, mut cmd: Option<Pid>) {
    let until = std::time::Instant::now() + SWEEP_LIMIT;
    loop {
        if let (Some(pid), true) = (cmd, children().is_empty()) {
            // No /proc to list children: CMD at least.
            let _ = kill(pid, Signal::SIGKILL);
        }
        sweep_children(Signal::SIGKILL);
        let mut code = None;
        let left = reap(cmd.unwrap_or(Pid::from_raw(0)), &mut code);
        if code.is_some() {
            cmd = None;
        }
        if left == Children::None {
            return;
        }
        if std::time::Instant::now() > until {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // Children we could not list or that kept coming: the group, at least.
    if leads_group(args) {
        let _ = killpg(getpgrp(), Signal::SIGKILL);
    }
}

/// Sends `sig` to every child of the supervisor.
fn sweep_children(sig: Signal) {
    for pid in children() {
        let _ = kill(pid, sig);
    }
}

/// The supervisor's children, from `/proc/self/task/*/children` (empty where
/// that does not exist).
fn children() -> Vec<Pid> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .map(Pid::from_raw),
            );
        }
    }
    pids
}

/// Asks the kernel for [`STOP_ALL`] when distrlock dies, and to make orphans
/// of CMD's processes our children.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn guard_against_parent_death() {
    use nix::sys::prctl;
    if let Err(errno) = prctl::set_child_subreaper(true) {
        say!("distrlock: cannot become a subreaper ({errno}); leftovers are not tracked");
    }
    if let Err(errno) = prctl::set_pdeathsig(STOP_ALL) {
        say!(
            "distrlock: cannot set the parent-death signal ({errno}); SIGKILL of distrlock \
             would leave the command running"
        );
    }
}

/// Not available outside Linux: see the module docs.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn guard_against_parent_death() {}

/// A program name for messages.
fn show(program: &OsStr) -> String {
    program.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let args = SuperviseArgs {
            parent: 42,
            interactive: true,
            kill_leftovers: true,
            grace: Duration::from_millis(1500),
            quiet: false,
            command: vec!["sh".into(), "-c".into(), "--parent".into()],
        };
        let written = args.to_args();
        assert_eq!(written[0], SUBCOMMAND);
        assert_eq!(
            SuperviseArgs::parse(written.into_iter().skip(1)),
            Ok(args.clone())
        );
        assert!(SuperviseArgs::parse(["--parent".into(), "1".into()].into_iter()).is_err());
    }
}
