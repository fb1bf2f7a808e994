//! The command that `distrlock run` starts: process groups, signals, exit codes.
//!
//! Two situations, told apart at start:
//!
//! - **Interactive** (stdin is a terminal whose foreground process group is
//!   ours): the command stays in our process group, so it can read the terminal
//!   and the terminal's Ctrl-C reaches it directly. We therefore forward
//!   SIGTERM, SIGHUP, SIGUSR1, SIGUSR2 and SIGALRM but not SIGINT or SIGQUIT
//!   (they would arrive twice). Signals go to the command's process only.
//! - **Otherwise** (cron, CI, scripts, services): the command gets a process
//!   group of its own, and every signal we send, forwarded or on lock loss, goes
//!   to that whole group, so a shell script's children stop with it.

use std::io::IsTerminal;
use std::process::ExitStatus;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::{Pid, getpgrp, tcgetpgrp};
use tokio::signal::unix::{SignalKind, signal};

use crate::exit::CliError;

/// Whether distrlock runs in the foreground of a terminal.
pub(crate) fn interactive() -> bool {
    let stdin = std::io::stdin();
    stdin.is_terminal() && tcgetpgrp(&stdin).is_ok_and(|fg| fg == getpgrp())
}

/// Where signals for the command go.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Target {
    /// The command's process only (interactive).
    Process(Pid),
    /// The command's process group, led by the command.
    Group(Pid),
}

impl Target {
    /// Sends `signal`; a command that is already gone is not an error.
    pub(crate) fn send(self, signal: Signal) {
        let result = match self {
            Target::Process(pid) => kill(pid, signal),
            Target::Group(pgid) => killpg(pgid, signal),
        };
        match result {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(errno) => say!("distrlock: could not send {signal} to the command: {errno}"),
        }
    }
}

/// The signals `distrlock run` forwards to the command, each as itself: a
/// signal whose default action would kill distrlock and leave the command
/// running without the lock.
pub(crate) const FORWARDED: [Signal; 7] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGALRM,
];

/// Whether a terminal delivers `signal` to its whole foreground process group
/// itself (Ctrl-C, Ctrl-\), so that an interactive command already has it.
pub(crate) fn from_keyboard(signal: Signal) -> bool {
    matches!(signal, Signal::SIGINT | Signal::SIGQUIT)
}

/// The [`FORWARDED`] signals, caught from the start so that none of them kills
/// distrlock while it holds a lock.
pub(crate) struct Signals {
    streams: Vec<(Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    /// Installs the handlers.
    pub(crate) fn catch() -> Result<Self, CliError> {
        let streams = FORWARDED
            .iter()
            .map(|&sig| {
                signal(SignalKind::from_raw(sig as i32))
                    .map(|stream| (sig, stream))
                    .map_err(|e| {
                        CliError::new(
                            crate::exit::LOCK_LOST,
                            format!("cannot install signal handlers: {e}"),
                        )
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { streams })
    }

    /// The next of the caught signals.
    pub(crate) async fn recv(&mut self) -> Signal {
        std::future::poll_fn(|cx| {
            for (sig, stream) in &mut self.streams {
                if stream.poll_recv(cx).is_ready() {
                    return std::task::Poll::Ready(*sig);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }
}

/// The exit code that reports `signal` (128 + its number, as shells do).
pub(crate) fn signal_exit_code(signal: Signal) -> u8 {
    u8::try_from(128 + signal as i32).unwrap_or(u8::MAX)
}

/// The command's exit code, or 128+N if signal N killed it.
pub(crate) fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(u8::MAX),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(u8::MAX),
        (None, None) => u8::MAX,
    }
}
