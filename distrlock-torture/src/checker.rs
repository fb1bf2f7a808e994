//! The history checker: turns workers' histories into holdings and checks the
//! guarantees against them.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::history::Event;

/// One worker process's history, and when the test killed it, if it did.
#[derive(Debug, Clone)]
pub struct WorkerRun {
    /// A name for messages (file name).
    pub name: String,
    /// The events, in the order written.
    pub events: Vec<Event>,
    /// When the test sent SIGKILL, on `CLOCK_MONOTONIC`.
    pub killed_at: Option<u64>,
    /// The worker's name, which it writes as the owner of its leases.
    pub owner: String,
}

/// One continuous claim on a key by one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    /// The worker it belongs to.
    pub worker: String,
    /// The key.
    pub key: String,
    /// The fence.
    pub fence: i64,
    /// First moment claimed.
    pub start: u64,
    /// Last moment claimed (the kill time for a killed holder).
    pub end: u64,
    /// Whether the holding ended because the worker was killed.
    pub killed: bool,
    /// Why the guard declared the lock lost, when it did (`None` for a
    /// holding that ended as planned, or by a kill).
    pub lost: Option<String>,
}

/// What the checker found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Holdings, by key, in order of start.
    pub holdings: BTreeMap<String, Vec<Holding>>,
    /// Pairs of holdings of one key that overlap in time by more than
    /// [`CheckOptions::overlap_allowance`].
    pub overlaps: Vec<(Holding, Holding)>,
    /// Pairs of holdings of one key that overlap by at most the allowance (a
    /// bound the contract states for a fault, such as a forward clock step),
    /// with the length of the overlap.
    pub tolerated_overlaps: Vec<(Holding, Holding, Duration)>,
    /// Pairs of consecutive holdings of one key whose fence did not grow.
    pub fence_regressions: Vec<(Holding, Holding)>,
    /// For each killed holding that someone wanted afterwards: the longest any
    /// waiter went without the key after the kill, from the kill (or the start of
    /// its wait, if later) until the key was taken by anyone or the waiter gave
    /// up.
    pub takeovers: Vec<Duration>,
    /// Holdings that ended because the guard declared the lock lost.
    pub lost: usize,
}

impl Report {
    /// The number of acquisitions seen.
    pub fn acquisitions(&self) -> usize {
        self.holdings.values().map(Vec::len).sum()
    }

    /// The longest takeover delay after a killed holder, if any.
    pub fn worst_takeover(&self) -> Option<Duration> {
        self.takeovers.iter().max().copied()
    }
}

/// What [`check_with`] tolerates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckOptions {
    /// The longest overlap of two holdings of one key that is reported as
    /// tolerated instead of as a violation: 0 (the default) for runs whose
    /// faults leave mutual exclusion intact; for a server clock that steps
    /// forward (contract item 4), one heartbeat interval plus one round trip.
    pub overlap_allowance: Duration,
}

impl CheckOptions {
    /// The bound for a server clock that steps forward: a holder learns of the
    /// step at its next extend, one `heartbeat` interval later at most, plus
    /// the `round_trip` of that extend.
    pub fn clock_step(heartbeat: Duration, round_trip: Duration) -> Self {
        Self {
            overlap_allowance: heartbeat + round_trip,
        }
    }
}

/// Builds holdings from the runs and checks mutual exclusion, fence order and
/// takeover delays, tolerating no overlap at all.
pub fn check(runs: &[WorkerRun]) -> Report {
    check_with(runs, &CheckOptions::default())
}

/// [`check`], with overlaps up to `options.overlap_allowance` reported apart
/// (in [`Report::tolerated_overlaps`]).
pub fn check_with(runs: &[WorkerRun], options: &CheckOptions) -> Report {
    let mut report = Report::default();
    // Every wait for a key: (key, began, ended).
    let mut waits: Vec<(String, u64, u64)> = Vec::new();
    for run in runs {
        for event in &run.events {
            match event {
                Event::Acquired {
                    key,
                    t,
                    waited_from,
                    ..
                } => waits.push((key.clone(), *waited_from, *t)),
                Event::Failed {
                    key,
                    waited_from,
                    t,
                    ..
                } if !key.is_empty() => waits.push((key.clone(), *waited_from, *t)),
                _ => {}
            }
        }
    }
    for run in runs {
        let mut open: Option<(String, i64, u64)> = None;
        for event in &run.events {
            match event {
                Event::Acquired { key, fence, t, .. } => open = Some((key.clone(), *fence, *t)),
                Event::Ended {
                    key,
                    fence,
                    t,
                    lost,
                    reason,
                } => {
                    if let Some((k, f, start)) = open.take() {
                        debug_assert_eq!((&k, f), (key, *fence));
                        report.lost += usize::from(*lost);
                        let why = lost.then(|| reason.clone().unwrap_or_else(|| "lost".into()));
                        push(&mut report, run, k, f, start, (*t).max(start), false, why);
                    }
                }
                _ => {}
            }
        }
        // A holding still open when the worker was killed lasted until the kill.
        if let (Some((key, fence, start)), Some(killed_at)) = (open, run.killed_at) {
            push(
                &mut report,
                run,
                key,
                fence,
                start,
                killed_at.max(start),
                true,
                None,
            );
        }
    }
    for holdings in report.holdings.values_mut() {
        holdings.sort_by_key(|h| (h.start, h.end));
    }
    let mut overlaps = Vec::new();
    let mut tolerated = Vec::new();
    let allowance = options.overlap_allowance.as_nanos() as u64;
    let mut regressions = Vec::new();
    let mut takeovers = Vec::new();
    for holdings in report.holdings.values() {
        // The holding that reaches furthest so far: any later start before its
        // end is an overlap.
        let mut furthest: Option<&Holding> = None;
        for pair in holdings.windows(2) {
            if pair[1].fence <= pair[0].fence {
                regressions.push((pair[0].clone(), pair[1].clone()));
            }
        }
        for (i, h) in holdings.iter().enumerate() {
            if let Some(f) = furthest
                && h.start < f.end
            {
                let overlap = f.end.min(h.end) - h.start;
                if overlap <= allowance && allowance > 0 {
                    tolerated.push((f.clone(), h.clone(), Duration::from_nanos(overlap)));
                } else {
                    overlaps.push((f.clone(), h.clone()));
                }
            }
            if furthest.is_none_or(|f| h.end > f.end) {
                furthest = Some(h);
            }
            if h.killed {
                // Each wait for the key that was on after the kill measures how
                // long that waiter went without the key: from the kill (or its
                // start, if later) until the key was taken by anyone, or until
                // the waiter itself gave up. Time in which nobody waited is not
                // a delay.
                let taken = holdings[i + 1..]
                    .iter()
                    .find(|n| n.start >= h.end)
                    .map(|n| n.start);
                let worst = waits
                    .iter()
                    .filter(|(k, _, ended)| *k == h.key && *ended >= h.end)
                    .map(|(_, began, ended)| {
                        let from = (*began).max(h.end);
                        let until = taken.map_or(*ended, |t| t.min(*ended));
                        Duration::from_nanos(until.saturating_sub(from))
                    })
                    .max();
                takeovers.extend(worst);
            }
        }
    }
    report.overlaps = overlaps;
    report.tolerated_overlaps = tolerated;
    report.fence_regressions = regressions;
    report.takeovers = takeovers;
    report
}

#[allow(clippy::too_many_arguments)]
fn push(
    report: &mut Report,
    run: &WorkerRun,
    key: String,
    fence: i64,
    start: u64,
    end: u64,
    killed: bool,
    lost: Option<String>,
) {
    report
        .holdings
        .entry(key.clone())
        .or_default()
        .push(Holding {
            worker: run.name.clone(),
            key,
            fence,
            start,
            end,
            killed,
            lost,
        });
}

/// Holdings that the guard declared lost while they were on during
/// `[from, until]`, except those of `except_key`: with a fault that
/// concerns one key only (another transaction holding its row), none may be
/// lost.
pub fn losses_during<'r>(
    report: &'r Report,
    from: u64,
    until: u64,
    except_key: &str,
) -> Vec<&'r Holding> {
    report
        .holdings
        .iter()
        .filter(|(key, _)| key.as_str() != except_key)
        .flat_map(|(_, holdings)| holdings)
        .filter(|h| h.lost.is_some() && h.start <= until && h.end >= from)
        .collect()
}

/// How long after `since` each run first heard from the database (acquired a
/// lock, or looked at one after a failed acquire); `None` for a run that never
/// did. Used to measure recovery after a server restart.
pub fn first_acquisition_after(runs: &[WorkerRun], since: u64) -> Vec<(String, Option<Duration>)> {
    first_after(runs, since, |e| match e {
        Event::Acquired { t, .. } | Event::Contact { t } => Some(*t),
        _ => None,
    })
}

/// How long after `since` each run first held a lock again (its first
/// [`Event::Acquired`] from `since` on); `None` for a run that never did.
/// Unlike [`first_acquisition_after`], an answer that grants nothing does not
/// count: after a failover the new primary answers long before it grants.
pub fn first_holding_after(runs: &[WorkerRun], since: u64) -> Vec<(String, Option<Duration>)> {
    first_after(runs, since, |e| match e {
        Event::Acquired { t, .. } => Some(*t),
        _ => None,
    })
}

/// For each run alive across `since` (started before it, not killed before
/// it), how long after `since` its first event that `at` gives a time for came.
fn first_after(
    runs: &[WorkerRun],
    since: u64,
    at: impl Fn(&Event) -> Option<u64>,
) -> Vec<(String, Option<Duration>)> {
    runs.iter()
        .filter(|run| {
            let started = run
                .events
                .iter()
                .any(|e| matches!(e, Event::Start { t, .. } if *t <= since));
            started && run.killed_at.is_none_or(|k| k > since)
        })
        .map(|run| {
            let first = run
                .events
                .iter()
                .filter_map(&at)
                .find(|t| *t >= since)
                .map(|t| Duration::from_nanos(t - since));
            (run.name.clone(), first)
        })
        .collect()
}

/// A live lease seen in the table by the test's sampler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSample {
    /// The key.
    pub key: String,
    /// The fence of the lease.
    pub fence: i64,
    /// The owner text of the lease: the worker's name.
    pub owner: String,
    /// When it was seen live, on `CLOCK_MONOTONIC`.
    pub t: u64,
}

/// A lease that no worker claimed and whose acquirer had given up long before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Orphan {
    /// The sample that shows it live.
    pub sample: LeaseSample,
    /// How long before the sample its owner last gave up waiting for the key
    /// (`None`: the owner never waited for it).
    pub gave_up_before: Option<Duration>,
}

/// Leases that were live although no worker claimed them, at a moment when
/// their owner was not waiting for the key and had given up on it more than
/// `grace` earlier (and was not killed within a ttl before).
///
/// An unclaimed lease is normal for a while: a try that was granted while its
/// answer was lost stays live until the waiter's cleanup releases it, shortly
/// after the waiter gives up. One still live `grace` after the give-up belongs
/// to nobody: a statement that arrived after its caller and the cleanup were done
/// took effect (contract item 8 broken).
pub fn orphaned_leases(
    runs: &[WorkerRun],
    samples: &[LeaseSample],
    ttl: Duration,
    grace: Duration,
) -> Vec<Orphan> {
    let claimed: std::collections::HashSet<(&str, i64)> = runs
        .iter()
        .flat_map(|run| run.events.iter())
        .filter_map(|e| match e {
            Event::Acquired { key, fence, .. } | Event::Unused { key, fence, .. } => {
                Some((key.as_str(), *fence))
            }
            _ => None,
        })
        .collect();
    let (ttl_ns, grace_ns) = (ttl.as_nanos() as u64, grace.as_nanos() as u64);
    samples
        .iter()
        .filter(|sample| !claimed.contains(&(sample.key.as_str(), sample.fence)))
        .filter_map(|sample| {
            let owners: Vec<&WorkerRun> = runs.iter().filter(|r| r.owner == sample.owner).collect();
            let t = sample.t;
            let killed_recently = owners
                .iter()
                .filter_map(|r| r.killed_at)
                .any(|kill| kill <= t && t <= kill + ttl_ns);
            let mut waiting = false;
            let mut last_give_up = None;
            for event in owners.iter().flat_map(|r| r.events.iter()) {
                match event {
                    Event::Failed {
                        key,
                        waited_from,
                        t: gave_up,
                        ..
                    } if *key == sample.key => {
                        if *waited_from <= t && t <= *gave_up {
                            waiting = true;
                        }
                        if *gave_up <= t {
                            last_give_up = last_give_up.max(Some(*gave_up));
                        }
                    }
                    Event::Acquired {
                        key,
                        waited_from,
                        t: got,
                        ..
                    } if *key == sample.key && *waited_from <= t && t <= *got => {
                        waiting = true;
                    }
                    _ => {}
                }
            }
            let stale = last_give_up.is_none_or(|g| t > g + grace_ns);
            (!waiting && !killed_recently && stale).then(|| Orphan {
                sample: sample.clone(),
                gave_up_before: last_give_up.map(|g| Duration::from_nanos(t - g)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unclaimed_lease_long_after_its_owner_gave_up_is_an_orphan() {
        let ms = 1_000_000;
        let failed = |key: &str, from: u64, t: u64| Event::Failed {
            key: key.into(),
            waited_from: from * ms,
            error: "timed out".into(),
            t: t * ms,
        };
        let mut a = run(
            "a",
            vec![
                acq("k", 1, 10 * ms),
                end("k", 1, 20 * ms),
                failed("k", 100, 4_100),
            ],
            None,
        );
        a.owner = "w-a".into();
        let mut b = run("b", vec![], Some(5_000 * ms));
        b.owner = "w-b".into();
        let runs = [a, b];
        let sample = |fence, owner: &str, t| LeaseSample {
            key: "k".into(),
            fence,
            owner: owner.into(),
            t: t * ms,
        };
        let samples = [
            // Claimed.
            sample(1, "w-a", 15),
            // Granted during a's wait, its answer lost: normal until the cleanup.
            sample(2, "w-a", 3_000),
            sample(2, "w-a", 4_500),
            // Appeared long after a gave up: nobody's.
            sample(3, "w-a", 9_000),
            // Right after b's kill: b's own grant, never written down.
            sample(4, "w-b", 5_100),
        ];
        let orphans = orphaned_leases(
            &runs,
            &samples,
            Duration::from_secs(2),
            Duration::from_secs(3),
        );
        assert_eq!(orphans.len(), 1, "{orphans:?}");
        assert_eq!(orphans[0].sample.fence, 3);
        assert_eq!(
            orphans[0].gave_up_before,
            Some(Duration::from_millis(4_900))
        );
    }

    fn run(name: &str, events: Vec<Event>, killed_at: Option<u64>) -> WorkerRun {
        WorkerRun {
            name: name.into(),
            events,
            killed_at,
            owner: name.into(),
        }
    }

    fn acq(key: &str, fence: i64, t: u64) -> Event {
        Event::Acquired {
            key: key.into(),
            fence,
            t,
            hold_ms: 0,
            waited_from: t,
        }
    }

    fn end(key: &str, fence: i64, t: u64) -> Event {
        Event::Ended {
            key: key.into(),
            fence,
            t,
            lost: false,
            reason: None,
        }
    }

    fn lost(key: &str, fence: i64, t: u64, reason: &str) -> Event {
        Event::Ended {
            key: key.into(),
            fence,
            t,
            lost: true,
            reason: Some(reason.into()),
        }
    }

    #[test]
    fn overlaps_within_the_allowance_are_tolerated_and_counted_apart() {
        // b starts 30 into a's holding (overlap 30), c 200 into b's (overlap 200).
        let runs = [
            run("a", vec![acq("k", 1, 100), end("k", 1, 130)], None),
            run(
                "b",
                vec![acq("k", 2, 100), lost("k", 2, 500, "clock_step")],
                None,
            ),
            run("c", vec![acq("k", 3, 300), end("k", 3, 600)], None),
        ];
        let strict = check(&runs);
        assert_eq!(strict.overlaps.len(), 2);
        assert!(strict.tolerated_overlaps.is_empty());
        let options = CheckOptions {
            overlap_allowance: Duration::from_nanos(50),
        };
        let report = check_with(&runs, &options);
        assert_eq!(report.overlaps.len(), 1, "200 is beyond 50");
        assert_eq!(report.tolerated_overlaps.len(), 1);
        assert_eq!(report.tolerated_overlaps[0].2, Duration::from_nanos(30));
        assert_eq!(
            CheckOptions::clock_step(Duration::from_millis(600), Duration::from_millis(50))
                .overlap_allowance,
            Duration::from_millis(650)
        );
    }

    #[test]
    fn losses_during_a_window_skip_the_faulted_key() {
        let runs = [
            run(
                "a",
                vec![acq("k", 1, 100), lost("k", 1, 500, "unreachable")],
                None,
            ),
            run(
                "b",
                vec![acq("j", 1, 100), lost("j", 1, 500, "taken_over")],
                None,
            ),
            run("c", vec![acq("i", 1, 100), end("i", 1, 500)], None),
            run(
                "d",
                vec![acq("h", 1, 900), lost("h", 1, 950, "taken_over")],
                None,
            ),
        ];
        let report = check(&runs);
        let lost = losses_during(&report, 400, 800, "k");
        assert_eq!(lost.len(), 1);
        assert_eq!(
            (lost[0].key.as_str(), lost[0].lost.as_deref()),
            ("j", Some("taken_over"))
        );
    }

    #[test]
    fn clean_history_passes() {
        let runs = [
            run(
                "a",
                vec![
                    acq("k", 1, 10),
                    end("k", 1, 20),
                    acq("k", 3, 50),
                    end("k", 3, 60),
                ],
                None,
            ),
            run(
                "b",
                vec![
                    acq("k", 2, 30),
                    end("k", 2, 40),
                    acq("j", 1, 35),
                    end("j", 1, 45),
                ],
                None,
            ),
        ];
        let report = check(&runs);
        assert_eq!(report.acquisitions(), 4);
        assert!(report.overlaps.is_empty());
        assert!(report.fence_regressions.is_empty());
    }

    #[test]
    fn finds_overlaps_even_behind_a_short_holding() {
        // a holds 10..100; b's 20..30 and c's 50..60 both overlap it.
        let runs = [
            run("a", vec![acq("k", 1, 10), end("k", 1, 100)], None),
            run("b", vec![acq("k", 2, 20), end("k", 2, 30)], None),
            run("c", vec![acq("k", 3, 50), end("k", 3, 60)], None),
        ];
        assert_eq!(check(&runs).overlaps.len(), 2);
    }

    #[test]
    fn finds_fence_regressions_and_repeats() {
        let runs = [
            run("a", vec![acq("k", 5, 10), end("k", 5, 20)], None),
            run(
                "b",
                vec![
                    acq("k", 4, 30),
                    end("k", 4, 40),
                    acq("k", 4, 50),
                    end("k", 4, 60),
                ],
                None,
            ),
        ];
        assert_eq!(check(&runs).fence_regressions.len(), 2);
    }

    #[test]
    fn a_killed_holder_holds_until_the_kill_and_its_takeover_is_timed() {
        let waited = |from: u64, t: u64| Event::Acquired {
            key: "k".into(),
            fence: 3,
            t,
            hold_ms: 0,
            waited_from: from,
        };
        let runs = [
            run("a", vec![acq("k", 1, 10)], Some(1_000)),
            run("b", vec![acq("k", 2, 500), end("k", 2, 600)], None),
            // c began waiting at 1_500, after the kill, and got the key at 3_000.
            run("c", vec![waited(1_500, 3_000), end("k", 3, 3_100)], None),
        ];
        let report = check(&runs);
        assert_eq!(
            report.overlaps.len(),
            1,
            "b started while the killed a still held"
        );
        assert_eq!(report.takeovers, vec![Duration::from_nanos(1_500)]);
    }

    #[test]
    fn a_waiter_that_gave_up_on_a_dead_holders_key_counts_as_a_slow_takeover() {
        let runs = [
            run("a", vec![acq("k", 1, 10)], Some(1_000)),
            run(
                "b",
                vec![Event::Failed {
                    key: "k".into(),
                    waited_from: 900,
                    error: "timeout".into(),
                    t: 9_000,
                }],
                None,
            ),
            run("c", vec![acq("k", 2, 20_000), end("k", 2, 20_100)], None),
        ];
        let report = check(&runs);
        assert_eq!(
            report.takeovers,
            vec![Duration::from_nanos(8_000)],
            "b waited from the kill until it gave up, without the key"
        );
    }

    #[test]
    fn time_in_which_nobody_waits_is_not_a_takeover_delay() {
        let runs = [
            run("a", vec![acq("k", 1, 10)], Some(1_000)),
            // b gave up 500 after the kill (the lease was still live then)...
            run(
                "b",
                vec![Event::Failed {
                    key: "k".into(),
                    waited_from: 200,
                    error: "timeout".into(),
                    t: 1_500,
                }],
                None,
            ),
            // ...and nobody wanted the key until c, who got it at once.
            run(
                "c",
                vec![Event::Acquired {
                    key: "k".into(),
                    fence: 2,
                    t: 9_010,
                    hold_ms: 0,
                    waited_from: 9_000,
                }],
                None,
            ),
        ];
        assert_eq!(check(&runs).takeovers, vec![Duration::from_nanos(500)]);
    }

    #[test]
    fn recovery_counts_only_runs_alive_across_the_restart() {
        let runs = [
            run(
                "a",
                vec![Event::Start { pid: 1, t: 0 }, acq("k", 1, 150)],
                None,
            ),
            run("b", vec![Event::Start { pid: 2, t: 0 }], Some(50)),
            run("c", vec![Event::Start { pid: 3, t: 0 }], None),
        ];
        let recovery = first_acquisition_after(&runs, 100);
        assert_eq!(
            recovery,
            vec![
                ("a".to_owned(), Some(Duration::from_nanos(50))),
                ("c".to_owned(), None)
            ]
        );
    }

    #[test]
    fn a_holding_after_a_failover_needs_a_grant_not_just_an_answer() {
        let runs = [
            run(
                "a",
                vec![
                    Event::Start { pid: 1, t: 0 },
                    Event::Contact { t: 120 },
                    acq("k", 1, 180),
                ],
                None,
            ),
            run(
                "b",
                vec![Event::Start { pid: 2, t: 0 }, Event::Contact { t: 110 }],
                None,
            ),
        ];
        assert_eq!(
            first_acquisition_after(&runs, 100),
            vec![
                ("a".to_owned(), Some(Duration::from_nanos(20))),
                ("b".to_owned(), Some(Duration::from_nanos(10)))
            ]
        );
        assert_eq!(
            first_holding_after(&runs, 100),
            vec![
                ("a".to_owned(), Some(Duration::from_nanos(80))),
                ("b".to_owned(), None)
            ]
        );
    }
}
