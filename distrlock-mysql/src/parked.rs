//! Connections kept between calls together with the statements they prepared
//! (see "Prepared statements" on [`MySqlBackend`](crate::MySqlBackend)).
//!
//! Given a statement's text, mysql_async scans all of it for named
//! parameters and hashes it to find the prepared form in the connection's
//! cache, on every call: for the 6 KB acquire that is about 170,000
//! instructions, two thirds of a try-acquire + release cycle's client work
//! (callgrind, `scripts/instructions`). Given a driver [`Statement`], it sends
//! the statement's id at once.
//!
//! A [`Statement`] is valid only on the connection that prepared it, and
//! mysql_async has no way to ask a connection which one it is (its id is the
//! server's thread id, which two servers behind one address can share). So a
//! [`Pooled`] connection carries its statements with it, and the two never
//! part: a call on a backend that owns its pool puts the connection back in a
//! short list of its own ([`Parking`]) instead of the pool, statements and
//! all, and the next call takes it from there. A connection that goes back to
//! the pool leaves its statements behind; the next one to take it prepares
//! them again (from the driver's cache: no round trip).
//!
//! A connection parked for [`PARKED_AT_MOST`] (0.1 s) goes back to the pool:
//! a task that runs while anything is parked looks every [`SWEEP_EVERY`]
//! (50 ms). A backend busy enough for the scan to matter calls again well
//! within that; a connection taken from
//! [`MySqlBackend::pool`](crate::MySqlBackend::pool) waits for a parked one at
//! most 0.15 s; an idle backend leaves its connections to the pool's own idle
//! timeout; and once [`close`](Parking::close)d (by `disconnect`) nothing is
//! parked again.
//!
//! # Kept statements are never closed
//!
//! The driver's cache closes its least recently used statement to make room
//! for a new one, and a kept statement is never looked up there (it runs by
//! id), so it ages. A closed id is unknown to the server, but a proxy that
//! hands out statement ids of its own (ProxySQL) may give it to the next
//! statement prepared, and running the kept one would then run that one. So
//! a kept statement must never be closed while it is kept:
//! - Only the backend prepares on a connection while it holds it (from the
//!   pool to the pool, parked or not), and only its own texts.
//! - A call of any other text first forgets every kept statement (the batch
//!   renewals have a text per batch size, which may push kept ones out).
//! - So between two forgets the only statements added to the driver's cache
//!   are kept ones, at most [`KEPT`], each the most recent when added; a full
//!   cache (at least 16 entries) holds at least 10 older entries, which go
//!   first. No kept statement is pushed out.
//!
//! Should the server still refuse a kept statement as unknown (1243: nothing
//! ran), the connection's statements are forgotten, that one is closed in the
//! driver's cache, and it is prepared again.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mysql_async::{Conn, Statement};
use tokio::time::Instant;

/// How many of the backend's statements a connection keeps prepared beside it:
/// see [`Statements::kept`](crate::sql::Statements::kept).
pub(crate) const KEPT: usize = 6;

/// A connection parked for longer than this goes back to the pool (whose idle
/// timeout then applies to it) instead of serving the next call.
pub(crate) const PARKED_AT_MOST: Duration = Duration::from_millis(100);

/// How often the [`sweep`] looks for connections parked too long.
const SWEEP_EVERY: Duration = Duration::from_millis(50);

/// A connection for one call, with the statements it has prepared.
pub(crate) struct Pooled {
    pub(crate) conn: Conn,
    /// By [`Statements::kept`](crate::sql::Statements::kept) index: prepared on
    /// `conn`, and only ever run on it.
    kept: [Option<Statement>; KEPT],
    parked_at: Instant,
}

impl Pooled {
    /// A connection just taken from the pool: nothing kept yet.
    pub(crate) fn new(conn: Conn) -> Self {
        Self {
            conn,
            kept: Default::default(),
            parked_at: Instant::now(),
        }
    }

    /// The statement kept at `slot`, if any.
    pub(crate) fn kept(&self, slot: usize) -> Option<Statement> {
        self.kept[slot].clone()
    }

    /// Keeps `statement`, prepared on this connection, at `slot`.
    pub(crate) fn keep(&mut self, slot: usize, statement: Statement) {
        self.kept[slot] = Some(statement);
    }

    /// Forgets every kept statement: before a statement of another text is
    /// prepared on the connection, or after the server refused one as
    /// unknown (see "Kept statements are never closed").
    pub(crate) fn forget(&mut self) {
        self.kept = Default::default();
    }
}

/// The connections a backend parks between calls, for one host: newest last.
pub(crate) struct Parking {
    idle: Mutex<VecDeque<Pooled>>,
    /// At most this many parked: the pool's size (0 for a pool
    /// of the caller's own, whose connections the backend never holds back).
    limit: usize,
    /// Whether a [`sweep`] task runs for this list.
    sweeping: AtomicBool,
    /// Set by [`close`](Self::close): nothing is parked any more.
    closed: AtomicBool,
}

impl Parking {
    /// A list for a pool of `pool_size` connections, or for none with
    /// `owned` false.
    pub(crate) fn new(pool_size: usize, owned: bool) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(VecDeque::new()),
            limit: if owned { pool_size } else { 0 },
            sweeping: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pooled>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently parked connection, unless it has been parked longer
    /// than [`PARKED_AT_MOST`]; such ones go back to the pool.
    pub(crate) fn take(&self) -> Option<Pooled> {
        if self.limit == 0 || self.closed.load(Ordering::Acquire) {
            return None;
        }
        let (taken, stale) = {
            let mut idle = self.lock();
            let taken = idle.pop_back();
            (taken, stale(&mut idle))
        };
        // Dropped outside the lock: a dropped connection goes back to the pool.
        drop(stale);
        taken.filter(|p| p.parked_at.elapsed() <= PARKED_AT_MOST)
    }

    /// Parks `pooled` for the next call, or lets it go back to the pool when
    /// the list is full (or no runtime can run the [`sweep`]).
    pub(crate) fn park(self: &Arc<Self>, mut pooled: Pooled) {
        if self.limit == 0 || self.closed.load(Ordering::Acquire) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        pooled.parked_at = Instant::now();
        let mut idle = self.lock();
        // Read again under the lock, which `close` takes after setting it.
        if idle.len() >= self.limit || self.closed.load(Ordering::Acquire) {
            drop(idle);
            drop(pooled);
            return;
        }
        idle.push_back(pooled);
        // Under the lock, as the sweep's last look: a sweep that found the
        // list empty has cleared the flag before this connection was parked.
        let start = !self.sweeping.swap(true, Ordering::AcqRel);
        drop(idle);
        if start {
            // Made before the task: should the runtime drop the task unpolled
            // (it is shutting down), the guard still clears the flag.
            let guard = SweepGuard(Some(Arc::downgrade(self)));
            runtime.spawn(sweep(guard));
        }
    }

    /// Sends every parked connection back to the pool (before the pool checks
    /// its connections, or closes).
    pub(crate) fn clear(&self) {
        let all: Vec<Pooled> = self.lock().drain(..).collect();
        drop(all);
    }

    /// Sends every parked connection back to the pool and parks none from
    /// now on (before the pool closes: it waits for all its connections).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.clear();
    }
}

/// Takes the connections parked longer than [`PARKED_AT_MOST`] off `idle`
/// (oldest first), for the caller to drop once it has let go of the lock.
fn stale(idle: &mut VecDeque<Pooled>) -> Vec<Pooled> {
    let fresh = idle
        .iter()
        .position(|p| p.parked_at.elapsed() <= PARKED_AT_MOST)
        .unwrap_or(idle.len());
    idle.drain(..fresh).collect()
}

/// Clears its list's `sweeping` flag when dropped, unless disarmed: so a
/// sweep that ends in any way, its task dropped by a runtime that shuts down
/// included, lets the next park start another.
struct SweepGuard(Option<Weak<Parking>>);

impl Drop for SweepGuard {
    fn drop(&mut self) {
        if let Some(parking) = self.0.take().and_then(|weak| weak.upgrade()) {
            parking.sweeping.store(false, Ordering::Release);
        }
    }
}

/// While anything is parked on the guard's list, sends what has been parked
/// longer than [`PARKED_AT_MOST`] back to the pool, every [`SWEEP_EVERY`];
/// ends when the list is empty or the backend is gone.
async fn sweep(mut guard: SweepGuard) {
    let Some(weak) = guard.0.clone() else {
        return;
    };
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(parking) = weak.upgrade() else {
            return;
        };
        let (stale, empty) = {
            let mut idle = parking.lock();
            let stale = stale(&mut idle);
            let empty = idle.is_empty();
            if empty {
                // Under the lock, as `park` sets it: a connection parked after
                // this starts a new sweep.
                parking.sweeping.store(false, Ordering::Release);
                guard.0 = None;
            }
            (stale, empty)
        };
        drop(stale);
        if empty {
            return;
        }
    }
}
