//! How a connection waits for another connection's write lock: the busy
//! handler.
//!
//! SQLite's own handler (`PRAGMA busy_timeout`) sleeps 1, 2, 5, 10, 15, 20, 25,
//! 25, 25, 50, 50 and then 100 ms between its tries. A writer that found the
//! lock taken may so sleep for up to 100 ms after it became free. A lock handed
//! from waiter to waiter every millisecond or two is then held up, for
//! everyone in line, by whoever sleeps longest: that was the worst wait in the
//! benchmark's handover scenario.
//!
//! This handler tries again every 100 µs for the first 5 ms of a wait, then
//! every millisecond, until the lock timeout: at most a millisecond lost once
//! the lock is free, for a few dozen wake-ups per contended write.

use std::cell::Cell;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// The pause between tries early in a wait, and for how long.
const SHORT_PAUSE: Duration = Duration::from_micros(100);
const SHORT_FOR: Duration = Duration::from_millis(5);
/// The pause between tries after that.
const LONG_PAUSE: Duration = Duration::from_millis(1);

thread_local! {
    /// The lock timeout of the connection on this thread. Each backend's one
    /// connection lives on the backend's own thread (see `worker.rs`), and
    /// SQLite's busy handler is a plain function: its setting is kept here.
    static LIMIT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    /// When the current wait for the lock began.
    static STARTED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Makes `conn`, which lives on this thread, wait up to `limit` for another
/// connection's lock.
pub(crate) fn install(conn: &mut Connection, limit: Duration) -> rusqlite::Result<()> {
    LIMIT.with(|l| l.set(limit));
    conn.busy_handler(Some(on_busy))
}

/// SQLite calls this while the lock it needs is taken, `count` being how many
/// times it already did in this wait. `true`: try again; `false`: give up
/// (SQLITE_BUSY, which the backend reports as transient).
fn on_busy(count: i32) -> bool {
    let now = Instant::now();
    let started = STARTED.with(|s| match s.get() {
        Some(started) if count > 0 => started,
        _ => {
            s.set(Some(now));
            now
        }
    });
    let waited = now.duration_since(started);
    let limit = LIMIT.with(Cell::get);
    if waited >= limit {
        STARTED.with(|s| s.set(None));
        return false;
    }
    let pause = if waited < SHORT_FOR {
        SHORT_PAUSE
    } else {
        LONG_PAUSE
    };
    std::thread::sleep(pause.min(limit - waited));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gives_up_at_the_limit_and_starts_afresh_with_each_wait() {
        LIMIT.with(|l| l.set(Duration::from_millis(20)));
        let start = Instant::now();
        let mut count = 0;
        while on_busy(count) {
            count += 1;
        }
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(20), "{waited:?}");
        assert!(waited < Duration::from_secs(1), "{waited:?}");
        // Tries often: dozens of times in 20 ms, not SQLite's 6.
        assert!(count > 20, "{count} tries");
        // A new wait (count 0) has the whole limit again.
        assert!(on_busy(0));
    }
}
