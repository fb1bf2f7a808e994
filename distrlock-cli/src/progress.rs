//! What the user sees on stderr while distrlock waits for a lock.
//!
//! Nothing for the first second. Then, on a terminal, a spinner line redrawn ten
//! times a second; otherwise (cron, CI logs) one line now and then: at once, every
//! 10 seconds, and whenever the holder changes. The holder is read with
//! `inspect` at most once a second.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use distrlock_core::{LockBackend, LockInfo, LockKey, LockState};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::exit::show_key;
use crate::output::short_duration;

const FIRST_AFTER: Duration = Duration::from_secs(1);
const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
const SPIN_EVERY: Duration = Duration::from_millis(100);
const LINE_EVERY: Duration = Duration::from_secs(10);
const INSPECT_EVERY: Duration = Duration::from_secs(1);

/// The waiting display; [`stop`](Self::stop) it (or drop it) when the wait ends.
pub(crate) struct Progress {
    task: Option<JoinHandle<()>>,
    /// Set once the spinner line has been drawn, so that it gets cleared.
    drew: Arc<AtomicBool>,
}

impl Progress {
    /// Starts reporting on waiting for `key`, unless `quiet`.
    pub(crate) fn start(backend: Arc<dyn LockBackend>, key: LockKey, quiet: bool) -> Self {
        let drew = Arc::new(AtomicBool::new(false));
        let task = (!quiet).then(|| {
            let spinner = std::io::stderr().is_terminal();
            tokio::spawn(report(backend, key, spinner.then(|| drew.clone())))
        });
        Self { task, drew }
    }

    /// Stops reporting and clears the spinner line.
    pub(crate) fn stop(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if self.drew.swap(false, Ordering::SeqCst) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Reports until aborted; draws a spinner when `spinner` is given (set on the
/// first draw), else prints lines.
async fn report(backend: Arc<dyn LockBackend>, key: LockKey, spinner: Option<Arc<AtomicBool>>) {
    let started = Instant::now();
    tokio::time::sleep(FIRST_AFTER).await;
    let mut holder: Option<LockInfo> = None;
    let mut read_at = Instant::now();
    let mut fetched = false;
    let mut last_line: Option<(Instant, Option<i64>)> = None;
    let mut frame = 0usize;
    loop {
        let now = Instant::now();
        if !fetched || now - read_at >= INSPECT_EVERY {
            // A failed read just shows no holder; the acquire reports real errors.
            holder = backend.inspect(&key).await.ok().flatten();
            read_at = Instant::now();
            fetched = true;
        }
        let text = describe(&key, holder.as_ref(), read_at.elapsed(), started.elapsed());
        if let Some(drew) = &spinner {
            drew.store(true, Ordering::SeqCst);
            {
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{} {text}", FRAMES[frame % FRAMES.len()]);
                let _ = err.flush();
            }
            frame += 1;
            tokio::time::sleep(SPIN_EVERY).await;
        } else {
            let fence = holder.as_ref().map(|h| h.fence.get());
            let due = match last_line {
                None => true,
                Some((at, last_fence)) => now - at >= LINE_EVERY || last_fence != fence,
            };
            if due {
                say!("distrlock: {text}");
                last_line = Some((now, fence));
            }
            tokio::time::sleep(INSPECT_EVERY).await;
        }
    }
}

/// `waiting 3s for lock "k": held by web1:42 ./job.sh (fence 7), lease ends in 12s`
fn describe(
    key: &LockKey,
    holder: Option<&LockInfo>,
    since_read: Duration,
    waited: Duration,
) -> String {
    let head = format!(
        "waiting {} for lock {}",
        short_duration(waited),
        show_key(key)
    );
    let Some(info) = holder else {
        return format!("{head}: it looks free, trying again");
    };
    let owner = owner_text(info);
    match info.state {
        LockState::Held => {
            let left = info
                .remaining
                .map(|r| r.saturating_sub(since_read))
                .unwrap_or_default();
            format!(
                "{head}: held by {owner} (fence {}), lease ends in {}",
                info.fence,
                short_duration(left)
            )
        }
        LockState::Expired | LockState::Released => format!(
            "{head}: {owner} (fence {}) has let it go, trying again",
            info.fence
        ),
    }
}

/// Who holds `key` after a refusal, for the one-line message: `OWNER (fence N)
/// for another 12s`, from one `inspect`; `another owner for another 12s` (as
/// the refusal said) when that read fails or finds the lock free by now.
pub(crate) async fn holder(
    db: &crate::open::Db,
    key: &LockKey,
    remaining: Option<Duration>,
) -> String {
    let info = tokio::time::timeout(crate::open::CALL_TIMEOUT, db.backend.inspect(key))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten()
        .filter(LockInfo::is_live);
    let left = info
        .as_ref()
        .and_then(|i| i.remaining)
        .or(remaining)
        .map(|r| format!(", {} left", short_duration(r)))
        .unwrap_or_default();
    match info {
        Some(info) => format!("{} (fence {}){left}", owner_text(&info), info.fence),
        None => format!("another owner{left}"),
    }
}

fn owner_text(info: &LockInfo) -> String {
    if info.owner.is_empty() {
        "an unnamed owner".to_owned()
    } else {
        info.owner.escape_debug().to_string()
    }
}
