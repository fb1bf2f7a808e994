//! [`Renewer`]: one background task per [`LockManager`](crate::LockManager) that
//! extends the leases of all its guards, in batches.
//!
//! Each guard keeps its own schedule (`next_extend`, every heartbeat interval) and
//! its own local deadline, exactly as if it had a task of its own. What is shared
//! is the sending: when one guard is due, every other guard that would be due
//! within half its own interval rides along in the same
//! [`LockBackend::extend_many`] call, so the guards of a manager soon share one
//! schedule and a process holding 10,000 locks sends
//! `10,000 / MAX_EXTEND_BATCH` statements per interval instead of 10,000.
//! Renewing a lease early is always safe: its deadline only moves to the new
//! request's `sent + ttl − margin`.
//!
//! Per guard, an answer means what a single extend's answer means:
//! - renewed: the deadline moves to `sent + ttl − margin` of this batch request
//!   (never backwards), unless the deadline had already passed when the answer
//!   came (then the lock is lost and stays lost);
//! - missing from the batch result ([`Error::NotHeld`]): the lease is gone and the
//!   guard reports the lock lost;
//! - any other error, of the entry or of the whole batch (including no answer
//!   within the call timeout): transient, the guard tries again after a short
//!   delay, bounded as always by its deadline.
//!
//! There is one task per tokio runtime that holds guards of the manager, and it
//! renews only the guards taken on its runtime: a runtime that stops being driven
//! (a `current_thread` runtime whose `block_on` returned) then stops only its own
//! guards' renewal, which it could not drive anyway. A task runs while its
//! runtime has guards. When it looks and finds none (it looks when the next
//! guard it knew of was due, not when a guard goes), it stays [`LINGER`] more
//! before it ends, so a caller that takes and frees one lock after another
//! does not start a task for each; the next guard starts it again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use tokio::runtime::{Handle, Id as RuntimeId};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use crate::backend::{LockBackend, MAX_EXTEND_BATCH};
use crate::error::{Error, Result};
use crate::guard::GuardShared;
use crate::key::LockKey;
use crate::loss::LossReason;
use crate::suspend::Sent;
use crate::token::Token;
use crate::ttl::Ttl;

/// How long a runtime's renewal task stays once it has found no guard left.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// The shared renewal of one manager's guards.
pub(crate) struct Renewer {
    backend: Arc<dyn LockBackend>,
    call_timeout: Duration,
    state: Mutex<State>,
}

struct State {
    next_id: u64,
    guards: HashMap<u64, Entry>,
    /// The renewal task of each runtime that has guards.
    tasks: HashMap<RuntimeId, Task>,
}

/// The renewal task on one runtime.
struct Task {
    handle: JoinHandle<()>,
    /// When the task will look again on its own.
    wakes_at: Option<Instant>,
    /// Wakes the task: a guard came that is due before the task would wake, or
    /// a batch answered.
    wake: Arc<Notify>,
    /// Since when the runtime has had no guard (the task ends [`LINGER`]
    /// later), or `None` while it has some.
    idle_since: Option<Instant>,
}

/// One registered guard.
struct Entry {
    guard: Weak<GuardShared>,
    /// The runtime whose task renews it: the one the guard was taken on.
    runtime: RuntimeId,
    /// The heartbeat interval, or `None` when auto-extend is off (then the entry
    /// only watches the deadline).
    interval: Option<Duration>,
    /// When this guard's next extend is due.
    next_extend: Option<Instant>,
    /// Part of a batch that has not answered yet.
    in_flight: bool,
}

/// A guard's place in the renewal; dropping it stops the renewal of that guard.
pub(crate) struct Registration {
    renewer: Arc<Renewer>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        // No need to wake the task: it forgets the guard (and ends, if it was
        // the last) when it next looks.
        self.renewer.state().guards.remove(&self.id);
    }
}

impl Renewer {
    pub(crate) fn new(backend: Arc<dyn LockBackend>, call_timeout: Duration) -> Self {
        Self {
            backend,
            call_timeout,
            state: Mutex::new(State {
                next_id: 0,
                guards: HashMap::new(),
                tasks: HashMap::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts renewing `guard` every `interval` from now (or only watching its
    /// deadline when `interval` is `None`), by the task of `runtime`, starting
    /// that task if it is not running.
    pub(crate) fn register(
        self: &Arc<Self>,
        runtime: &Handle,
        guard: Weak<GuardShared>,
        interval: Option<Duration>,
    ) -> Registration {
        let first_look = match (guard.upgrade(), interval) {
            (Some(shared), Some(interval)) => (Instant::now() + interval).min(shared.deadline()),
            (Some(shared), None) => shared.deadline(),
            (None, _) => Instant::now(),
        };
        let runtime_id = runtime.id();
        let mut state = self.state();
        let id = state.next_id;
        state.next_id += 1;
        state.guards.insert(
            id,
            Entry {
                guard,
                runtime: runtime_id,
                interval,
                next_extend: interval.map(|i| Instant::now() + i),
                in_flight: false,
            },
        );
        // A task whose runtime shut down is finished: start another.
        let running = state
            .tasks
            .get_mut(&runtime_id)
            .filter(|task| !task.handle.is_finished());
        let wake = match running {
            // Wake the task only if this guard needs it sooner than it planned
            // (a shorter interval or deadline than every other guard's).
            Some(task) => {
                task.idle_since = None;
                task.wakes_at
                    .is_none_or(|at| first_look < at)
                    .then(|| task.wake.clone())
            }
            None => {
                let wake = Arc::new(Notify::new());
                let handle = runtime.spawn(run(Arc::downgrade(self), runtime_id, wake.clone()));
                state.tasks.insert(
                    runtime_id,
                    Task {
                        handle,
                        wakes_at: None,
                        wake,
                        idle_since: None,
                    },
                );
                None
            }
        };
        drop(state);
        if let Some(wake) = wake {
            wake.notify_one();
        }
        Registration {
            renewer: self.clone(),
            id,
        }
    }

    /// Forgets lost and dropped guards, sends the batches of `runtime`'s guards
    /// that are due, and returns when to look again, or `None` when the runtime
    /// has had no guard for [`LINGER`] (its task has then been unregistered and
    /// must end).
    fn tick(self: &Arc<Self>, runtime: RuntimeId) -> Option<Instant> {
        let mut state = self.state();
        let now = Instant::now();
        state.guards.retain(|_, entry| {
            entry
                .guard
                .upgrade()
                .is_some_and(|guard| !guard.check_lost())
        });
        if !state.guards.values().any(|e| e.runtime == runtime) {
            // Decided under the lock that `register` takes: a guard that
            // comes later finds no task and starts one.
            let task = state.tasks.get_mut(&runtime)?;
            let ends_at = *task.idle_since.get_or_insert(now) + LINGER;
            if now >= ends_at {
                state.tasks.remove(&runtime);
                return None;
            }
            task.wakes_at = Some(ends_at);
            return Some(ends_at);
        }
        let any_due = state.guards.values().any(|e| {
            e.runtime == runtime && !e.in_flight && e.next_extend.is_some_and(|next| next <= now)
        });
        if any_due {
            // Everyone due now, or within half their interval: one batch.
            let mut by_ttl: HashMap<Ttl, Vec<(u64, Arc<GuardShared>)>> = HashMap::new();
            for (id, entry) in state.guards.iter_mut() {
                if entry.runtime != runtime {
                    continue;
                }
                let (Some(interval), Some(next)) = (entry.interval, entry.next_extend) else {
                    continue;
                };
                if entry.in_flight || next > now + interval / 2 {
                    continue;
                }
                let Some(guard) = entry.guard.upgrade() else {
                    continue;
                };
                entry.in_flight = true;
                by_ttl.entry(guard.ttl).or_default().push((*id, guard));
            }
            for (ttl, guards) in by_ttl {
                let mut guards = guards.into_iter().peekable();
                while guards.peek().is_some() {
                    let chunk: Vec<_> = guards.by_ref().take(MAX_EXTEND_BATCH).collect();
                    tokio::spawn(self.clone().renew(runtime, ttl, chunk));
                }
            }
        }
        // The earliest due extend, or the earliest deadline (to report a loss on
        // time even while a batch hangs).
        let wakes_at = state
            .guards
            .values()
            .filter(|entry| entry.runtime == runtime)
            .filter_map(|entry| {
                let deadline = entry.guard.upgrade()?.deadline();
                Some(match entry.next_extend {
                    Some(next) if !entry.in_flight => next.min(deadline),
                    _ => deadline,
                })
            })
            .min();
        if let Some(task) = state.tasks.get_mut(&runtime) {
            task.wakes_at = wakes_at;
        }
        wakes_at
    }

    /// Sends one batch and applies its answer to each of its guards.
    async fn renew(
        self: Arc<Self>,
        runtime: RuntimeId,
        ttl: Ttl,
        chunk: Vec<(u64, Arc<GuardShared>)>,
    ) {
        let leases: Vec<(LockKey, Token)> = chunk
            .iter()
            .map(|(_, guard)| (guard.key.clone(), guard.token))
            .collect();
        // Past the latest deadline every guard of the batch is lost: stop waiting.
        let latest_deadline = chunk.iter().map(|(_, guard)| guard.deadline()).max();
        // Each guard counts the batch as an extend on its way until it answers.
        let _out: Vec<_> = chunk.iter().map(|(_, guard)| guard.extend_out()).collect();
        // Hold only weak references while waiting, so a dropped guard goes at once.
        let chunk: Vec<(u64, Weak<GuardShared>)> = chunk
            .into_iter()
            .map(|(id, guard)| (id, Arc::downgrade(&guard)))
            .collect();
        let sent = Sent::now();
        let mut give_up = sent
            .at
            .checked_add(self.call_timeout)
            .unwrap_or(sent.at + Duration::from_secs(86_400));
        if let Some(latest) = latest_deadline {
            give_up = give_up.min(latest);
        }
        // The batch must not land after we stopped waiting for it (contract item
        // 8): then it would renew leases that their guards may already have given
        // up.
        crate::metrics::renewal_batch();
        let call =
            self.backend
                .extend_many(&leases, ttl, give_up)
                .instrument(tracing::debug_span!(
                    "distrlock.renew",
                    leases = leases.len(),
                ));
        let answer = tokio::time::timeout_at(give_up, call).await;
        let answer: Result<Vec<Result<SystemTime>>> = match answer {
            Err(_) => Err(Error::unavailable(
                format!("a batch of {} extends did not answer in time", leases.len()),
                None,
            )),
            Ok(Ok(results)) if results.len() != leases.len() => Err(Error::Backend {
                message: format!(
                    "the backend answered {} results for a batch of {} extends",
                    results.len(),
                    leases.len()
                ),
                transient: true,
                source: None,
            }),
            Ok(answer) => answer,
        };
        let answered = Instant::now();
        let mut state = self.state();
        for (i, (id, guard)) in chunk.iter().enumerate() {
            // Gone from the map: released, dropped or already found lost.
            let Some(entry) = state.guards.get_mut(id) else {
                continue;
            };
            entry.in_flight = false;
            let (Some(guard), Some(interval)) = (guard.upgrade(), entry.interval) else {
                continue;
            };
            let outcome = match &answer {
                Ok(results) => match &results[i] {
                    Ok(server_time) => Outcome::Renewed(*server_time),
                    Err(Error::NotHeld { .. }) => Outcome::Gone,
                    Err(error) => Outcome::Failed(error),
                },
                // The whole batch failed: nothing is known about any lease.
                Err(error) => Outcome::Failed(error),
            };
            match outcome {
                Outcome::Renewed(server_time) => {
                    // An answer after the deadline does not revive the lock.
                    if guard.check_lost() {
                        continue;
                    }
                    guard.extended(sent, server_time);
                    entry.next_extend = Some(sent.at + interval);
                    tracing::trace!(key = %guard.key, fence = %guard.fence, "lease extended");
                }
                Outcome::Gone => guard.mark_lost(LossReason::TakenOver),
                Outcome::Failed(error) => {
                    guard.extend_failed();
                    // Try again soon; the deadline still bounds how long we claim the lock.
                    let retry =
                        (interval / 4).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    entry.next_extend = Some(answered + retry);
                    tracing::debug!(key = %guard.key, %error, ?retry, "extend failed; retrying");
                }
            }
        }
        let wake = state.tasks.get(&runtime).map(|task| task.wake.clone());
        drop(state);
        if let Some(wake) = wake {
            wake.notify_one();
        }
    }
}

/// What one batch answer means for one guard.
enum Outcome<'a> {
    Renewed(SystemTime),
    Gone,
    Failed(&'a Error),
}

/// The renewal task: sends due batches and sleeps until the next is due, a
/// deadline passes, or something changes. It holds the renewer (and so the
/// backend) only while it looks, so a manager dropped with its guards is freed
/// at once; the task then ends when it next wakes.
async fn run(renewer: Weak<Renewer>, runtime: RuntimeId, wake: Arc<Notify>) {
    loop {
        // Subscribe before looking, so a change while we look still wakes us.
        let changed = wake.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let Some(wake) = renewer.upgrade().and_then(|renewer| renewer.tick(runtime)) else {
            return;
        };
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = changed => {}
        }
    }
}
