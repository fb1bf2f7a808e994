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
//! The list holds at most one connection fewer than the pool's size, and
//! each for at most [`PARKED_AT_MOST`]: a task that runs while anything is
//! parked sends older ones back to the pool. So a connection taken from
//! [`MySqlBackend::pool`](crate::MySqlBackend::pool) waits for a parked one no
//! longer than that, and an idle backend leaves its connections to the pool's
//! own idle timeout.
//!
//! The driver's cache may close one of those statements to make room for
//! another (the batch renewals have a text per batch size). Its id is then
//! unknown to the server, which refuses it (1243) without running anything;
//! the statements of that connection are forgotten and prepared again. Statement
//! ids are never reused within a session, so a closed id can never name another
//! statement.

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
pub(crate) const PARKED_AT_MOST: Duration = Duration::from_secs(1);

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

    /// Forgets every kept statement (after the server refused one as unknown).
    pub(crate) fn forget(&mut self) {
        self.kept = Default::default();
    }
}

/// The connections a backend parks between calls, for one host: newest last.
pub(crate) struct Parking {
    idle: Mutex<VecDeque<Pooled>>,
    /// At most this many parked: one fewer than the pool's size (0 for a pool
    /// of the caller's own, whose connections the backend never holds back).
    limit: usize,
    /// Whether a [`sweep`] task runs for this list.
    sweeping: AtomicBool,
}

impl Parking {
    /// A list for a pool of `pool_size` connections, or for none with
    /// `owned` false.
    pub(crate) fn new(pool_size: usize, owned: bool) -> Arc<Self> {
        Arc::new(Self {
            idle: Mutex::new(VecDeque::new()),
            limit: if owned {
                pool_size.saturating_sub(1)
            } else {
                0
            },
            sweeping: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pooled>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently parked connection, unless it has been parked longer
    /// than [`PARKED_AT_MOST`]; such ones go back to the pool.
    pub(crate) fn take(&self) -> Option<Pooled> {
        if self.limit == 0 {
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
        if self.limit == 0 {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        pooled.parked_at = Instant::now();
        let mut idle = self.lock();
        if idle.len() >= self.limit {
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
            runtime.spawn(sweep(Arc::downgrade(self)));
        }
    }

    /// Sends every parked connection back to the pool (before the pool checks
    /// its connections, or closes).
    pub(crate) fn clear(&self) {
        let all: Vec<Pooled> = self.lock().drain(..).collect();
        drop(all);
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

/// While anything is parked on `parking`, sends what has been parked longer
/// than [`PARKED_AT_MOST`] back to the pool, every [`PARKED_AT_MOST`]; ends
/// when the list is empty or the backend is gone.
async fn sweep(parking: Weak<Parking>) {
    // Clears the flag if the task is dropped before it ends (a runtime that
    // shuts down drops it), so that the next park starts another.
    struct Dropped(Option<Weak<Parking>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(parking) = self.0.take().and_then(|weak| weak.upgrade()) {
                parking.sweeping.store(false, Ordering::Release);
            }
        }
    }
    let mut dropped = Dropped(Some(parking.clone()));
    loop {
        tokio::time::sleep(PARKED_AT_MOST).await;
        let Some(parking) = parking.upgrade() else {
            dropped.0 = None;
            return;
        };
        let stale = {
            let mut idle = parking.lock();
            let stale = stale(&mut idle);
            if idle.is_empty() {
                parking.sweeping.store(false, Ordering::Release);
                dropped.0 = None;
            }
            stale
        };
        drop(stale);
        if dropped.0.is_none() {
            return;
        }
    }
}
