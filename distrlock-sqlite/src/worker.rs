//! The dedicated thread that owns the SQLite connection.
//!
//! SQLite calls block (on the disk, and on other processes' write locks for up to
//! the busy timeout), so they must not run on the async runtime's worker threads.
//! One thread with one connection, fed through a channel, was chosen over
//! `spawn_blocking` with a connection pool:
//!
//! - **Order.** Jobs run in the order they were sent. A cancelled acquire is
//!   followed by a background release of its token; with a FIFO queue the
//!   release always runs after the acquire it cleans up, so it cannot run first,
//!   find nothing, and leave the acquire's lease behind. Blocking-pool threads
//!   racing for a mutex give no such order.
//!   A job can still wait here after its caller gave up; the backend's mutating
//!   jobs therefore check their caller's `not_after` once they hold the write
//!   lock, and do nothing when it has passed (contract item 8).
//! - **No lost throughput.** SQLite admits one writer per file at a time, and
//!   every lock operation writes; more connections in one process would only
//!   queue on the file lock, through the busy handler's sleeps.
//! - **Prepared once.** The one connection caches every statement.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::thread;

use distrlock_core::{Error, Result};
use rusqlite::Connection;
use tokio::sync::oneshot;

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle on the connection thread. The thread ends when every handle is gone
/// and the queued jobs are done.
#[derive(Debug)]
pub(crate) struct Worker {
    jobs: mpsc::Sender<Job>,
}

impl Worker {
    /// Starts the thread, opening the connection there with `open`.
    pub(crate) async fn start<F>(name: String, open: F) -> Result<Self>
    where
        F: FnOnce() -> Result<Connection> + Send + 'static,
    {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (opened, opened_rx) = oneshot::channel();
        thread::Builder::new()
            .name(name)
            .spawn(move || {
                let mut conn = match open() {
                    Ok(conn) => {
                        let _ = opened.send(Ok(()));
                        conn
                    }
                    Err(error) => {
                        let _ = opened.send(Err(error));
                        return;
                    }
                };
                for job in queue {
                    // A panicking job must not take the connection down with it:
                    // its caller sees a closed channel, the next job runs as usual.
                    // Open transactions roll back when their handle drops.
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut conn)));
                }
            })
            .map_err(|e| Error::unavailable("cannot start the SQLite thread", Some(e.into())))?;
        match opened_rx.await {
            Ok(Ok(())) => Ok(Self { jobs }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(Error::unavailable(
                "the SQLite thread stopped while opening the database",
                None,
            )),
        }
    }

    /// Runs `job` on the connection thread and waits for its result.
    ///
    /// Dropping the returned future does not cancel a job already sent: it still
    /// runs, in order, and its result is discarded.
    pub(crate) async fn run<T, F>(&self, job: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move |conn| {
                let _ = tx.send(job(conn));
            }))
            .map_err(|_| Error::unavailable("the SQLite thread has stopped", None))?;
        rx.await.map_err(|_| {
            Error::permanent(
                "the SQLite operation panicked",
                std::io::Error::other("job dropped without an answer"),
            )
        })?
    }
}
