//! What a worker writes as it goes: one JSON object per line, appended with a
//! single `write` so that a SIGKILL never leaves half a line.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Nanoseconds on `CLOCK_MONOTONIC`, which every process on one host shares.
pub fn monotonic_ns() -> u64 {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available on Linux");
    u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000_000
        + u64::try_from(now.tv_nsec()).unwrap_or(0)
}

/// One line of a worker's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "snake_case")]
pub enum Event {
    /// The worker started.
    Start {
        /// Its process id.
        pid: u32,
        /// When.
        t: u64,
    },
    /// The worker holds `key` from `t` on: its guard said so after the clock was
    /// read.
    Acquired {
        /// The key.
        key: String,
        /// The fence of the holding.
        fence: i64,
        /// The first moment the worker claimed the lock.
        t: u64,
        /// How long the worker means to hold it, in milliseconds.
        hold_ms: u64,
        /// When the worker began waiting for this key.
        waited_from: u64,
    },
    /// The worker stopped claiming `key` at `t`, the last moment its guard still
    /// said the lock was held.
    Ended {
        /// The key.
        key: String,
        /// The fence of the holding.
        fence: i64,
        /// The last moment the worker claimed the lock.
        t: u64,
        /// Whether the guard had declared the lock lost.
        lost: bool,
        /// Why, when it was lost (`LossReason::as_str`: `taken_over`,
        /// `unreachable`, `clock_step`, …).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The worker was granted `key` but found the guard already lost before it
    /// could use it (the grant came too late), so it never claimed the lock.
    Unused {
        /// The key.
        key: String,
        /// The fence of the grant.
        fence: i64,
        /// When.
        t: u64,
    },
    /// An acquire failed (timed out, or the database was unreachable).
    Failed {
        /// The key waited for (empty when the backend could not be opened).
        key: String,
        /// When the worker began waiting.
        waited_from: u64,
        /// The error's text.
        error: String,
        /// When it gave up.
        t: u64,
    },
    /// A call to the database succeeded (a look at a key after a failed acquire).
    Contact {
        /// When the answer came.
        t: u64,
    },
    /// The worker finished its run and exits cleanly.
    Exit {
        /// When.
        t: u64,
    },
}

/// Appends events to a history file, one unbuffered write per line.
#[derive(Debug)]
pub struct HistoryWriter {
    file: File,
}

impl HistoryWriter {
    /// Opens (creating or appending to) the history at `path`.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file })
    }

    /// Writes one event as one line.
    pub fn write(&mut self, event: &Event) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)
    }
}

/// Reads every complete line of a history; a torn last line is ignored.
pub fn read_history(path: &Path) -> io::Result<Vec<Event>> {
    let reader = BufReader::new(File::open(path)?);
    let mut events = Vec::new();
    for line in reader.lines() {
        let line = line?;
        if let Ok(event) = serde_json::from_str(&line) {
            events.push(event);
        }
    }
    Ok(events)
}
