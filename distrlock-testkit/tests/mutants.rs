//! The suite catches broken backends and passes a correct one.
//!
//! `RefBackend` (in `common/reference.rs`) is a small backend built like an SQL
//! one; each [`Mutant`] switches on one realistic bug. The correct backend must
//! pass every case; each mutant must fail every case listed for it here (the
//! cases that catch it). `catch_matrix` (ignored: it runs every case on every
//! mutant, a few minutes) prints which cases catch which mutant.

mod common;

use common::line::{LineBug, LineHarness};
use common::reference::{Mutant, RefHarness};
use common::{Limiter, run_cases};
use distrlock_testkit::{CASES, Capabilities, Capability};

/// What the reference backend offers: everything but a line of waiters
/// (contract item 14), which `LineHarness`'s mutants cover.
fn reference_capabilities() -> Capabilities {
    Capabilities::none()
        .with(Capability::Unreachable)
        .with(Capability::KillSessions)
        .with(Capability::ReleaseNotifications)
        .with(Capability::SchemaMissing)
}

/// Every case but those of the line, which the reference backend lacks.
fn reference_cases() -> Vec<&'static str> {
    CASES
        .iter()
        .filter(|case| !case.needs.contains(&Capability::FairOrder))
        .map(|case| case.name)
        .collect()
}

/// The cases of contract item 14.
const LINE_CASES: &[&str] = &[
    "waiters_are_served_in_order",
    "a_gone_waiter_holds_the_line_one_turn",
    "waiting_acquires_are_served_in_order",
];

/// The line cases that call `try_acquire_as_waiter` directly: they catch every
/// broken line, each time (the manager-level one only most of the time).
const DIRECT_LINE_CASES: [&str; 2] = [
    "waiters_are_served_in_order",
    "a_gone_waiter_holds_the_line_one_turn",
];

/// The verdicts of the line cases on `bug`.
fn line_verdicts(bug: LineBug) -> Vec<(String, Result<(), String>)> {
    let caps = Capabilities::none().with(Capability::FairOrder);
    run_cases(&LineHarness(bug), caps, LINE_CASES, &LIMITER)
}

/// At most 6 cases at once in this binary.
static LIMITER: Limiter = Limiter::new(6);

/// Asserts that every case in `cases` fails on `mutant`.
fn caught_by(mutant: Mutant, cases: &[&str]) {
    let verdicts = run_cases(
        &RefHarness(mutant),
        reference_capabilities(),
        cases,
        &LIMITER,
    );
    let mut passed = Vec::new();
    for (name, verdict) in verdicts {
        match verdict {
            Ok(()) => passed.push(name),
            Err(message) => {
                let first = message.lines().next().unwrap_or_default().to_owned();
                eprintln!("{mutant:?} fails {name}: {first}");
            }
        }
    }
    assert!(
        passed.is_empty(),
        "{mutant:?} passed {passed:?}, which should catch it"
    );
}

#[test]
fn the_reference_backend_passes_every_case() {
    let names = reference_cases();
    let verdicts = run_cases(
        &RefHarness(Mutant::None),
        reference_capabilities(),
        &names,
        &LIMITER,
    );
    let failed: Vec<_> = verdicts
        .into_iter()
        .filter_map(|(name, verdict)| verdict.err().map(|message| format!("{name}: {message}")))
        .collect();
    assert!(
        failed.is_empty(),
        "the correct backend failed:\n{}",
        failed.join("\n")
    );
}

#[test]
#[ignore = "runs every case on every mutant (minutes); prints the catch matrix"]
fn catch_matrix() {
    let names = reference_cases();
    let mut report = String::new();
    for mutant in Mutant::ALL {
        let verdicts = run_cases(
            &RefHarness(mutant),
            reference_capabilities(),
            &names,
            &LIMITER,
        );
        let catchers: Vec<String> = verdicts
            .into_iter()
            .filter(|(_, verdict)| verdict.is_err())
            .map(|(name, _)| name)
            .collect();
        let line = format!("{mutant:?}: {}\n", catchers.join(", "));
        eprint!("{line}");
        report.push_str(&line);
    }
    println!("{report}");
}

// One test per bug, with the cases that must catch it. (`catch_matrix` shows
// every case that does.)

#[test]
fn heartbeat_batch_answers_ok_without_renewing() {
    caught_by(
        Mutant::BatchOkWithoutRenewing,
        &[
            "heartbeats_keep_the_lease",
            "extend_many_renews_only_held_leases",
        ],
    );
}

#[test]
fn batch_skips_its_last_entry() {
    caught_by(
        Mutant::BatchSkipsLast,
        &["extend_many_renews_only_held_leases"],
    );
}

#[test]
fn a_panic_only_on_the_heartbeat_path() {
    // extend_many panics; the manager's renewal task swallows the panic, but the
    // guard is lost and the watcher records the panic.
    caught_by(Mutant::BatchPanics, &["heartbeats_keep_the_lease"]);
}

#[test]
fn a_refusal_overwrites_the_owner() {
    caught_by(
        Mutant::RefusalOverwritesOwner,
        &["refused_acquire_changes_nothing"],
    );
}

#[test]
fn a_refusal_bumps_the_fence() {
    caught_by(
        Mutant::RefusalBumpsFence,
        &["refused_acquire_changes_nothing"],
    );
}

#[test]
fn a_refusal_renews_the_holder() {
    caught_by(
        Mutant::RefusalRenewsHolder,
        &["refused_acquire_changes_nothing", "lease_lasts_its_ttl"],
    );
}

#[test]
fn release_after_expiry_answers_ok() {
    caught_by(
        Mutant::ReleaseAfterExpiryOk,
        &["release_after_expiry_is_not_held"],
    );
}

#[test]
fn extend_after_expiry_revives_the_lease() {
    caught_by(
        Mutant::ExtendAfterExpiryOk,
        &[
            "extend_keeps_lock_and_fails_after_expiry",
            "release_after_expiry_is_not_held",
        ],
    );
}

#[test]
fn a_wrong_token_releases() {
    caught_by(Mutant::WrongTokenReleases, &["wrong_token_not_held"]);
}

#[test]
fn leases_five_percent_short() {
    caught_by(
        Mutant::ShortLease,
        &["lease_lasts_its_ttl", "extend_sets_its_own_ttl"],
    );
}

#[test]
fn leases_five_percent_long() {
    caught_by(
        Mutant::LongLease,
        &["lease_lasts_its_ttl", "expiry_hands_over"],
    );
}

#[test]
fn leases_expire_early_for_acquire_only() {
    caught_by(Mutant::ExpiresEarly, &["lease_lasts_its_ttl"]);
}

#[test]
fn extend_renews_by_the_acquire_ttl() {
    caught_by(
        Mutant::ExtendUsesAcquireTtl,
        &[
            "lease_lasts_its_ttl",
            "extend_sets_its_own_ttl",
            "extend_many_renews_only_held_leases",
        ],
    );
}

#[test]
fn extend_bumps_the_fence() {
    caught_by(Mutant::ExtendBumpsFence, &["extend_sets_its_own_ttl"]);
}

#[test]
fn a_reacquire_by_the_holder_bumps_the_fence() {
    caught_by(
        Mutant::ReacquireBumpsFence,
        &[
            "same_token_reacquires_idempotently",
            "same_token_after_release_or_expiry_gets_a_new_fence",
        ],
    );
}

#[test]
fn inspect_shows_a_stale_owner() {
    caught_by(Mutant::StaleOwner, &["inspect_reports_the_latest_holding"]);
}

#[test]
fn inspect_shows_a_stale_acquired_at() {
    caught_by(
        Mutant::StaleAcquiredAt,
        &["inspect_reports_the_latest_holding"],
    );
}

#[test]
fn times_an_hour_off() {
    caught_by(
        Mutant::TimesAnHourOff,
        &[
            "times_are_on_one_clock",
            "inspect_reports_the_latest_holding",
        ],
    );
}

#[test]
fn list_drops_released_rows() {
    caught_by(
        Mutant::ListDropsReleased,
        &["list_shows_every_row_in_key_order"],
    );
}

#[test]
fn list_sorts_case_insensitively() {
    caught_by(
        Mutant::ListCaseInsensitive,
        &["list_shows_every_row_in_key_order"],
    );
}

#[test]
fn a_missing_table_gives_another_error() {
    caught_by(
        Mutant::WrongErrorForMissingTable,
        &["missing_table_gives_schema_missing"],
    );
}

#[test]
fn calls_hang_while_unreachable() {
    caught_by(
        Mutant::HangsWhenUnreachable,
        &["calls_are_bounded_while_unreachable"],
    );
}

#[test]
fn a_dropped_extend_keeps_its_row_lock() {
    caught_by(
        Mutant::DroppedExtendKeepsRowLock,
        &["dropped_calls_leave_a_consistent_state"],
    );
}

#[test]
fn extend_readings_do_not_advance() {
    caught_by(Mutant::FrozenReadings, &["clock_readings_advance"]);
}

#[test]
fn the_grant_reading_lags_acquired_at() {
    caught_by(
        Mutant::GrantReadingLags,
        &["times_are_on_one_clock", "clock_readings_advance"],
    );
}

#[test]
fn not_after_is_ignored() {
    caught_by(
        Mutant::IgnoresNotAfter,
        &["passed_not_after_changes_nothing"],
    );
}

#[test]
fn releases_are_not_announced() {
    caught_by(Mutant::SilentReleases, &["release_wakes_waiter"]);
}

#[test]
fn a_correct_line_passes_the_line_cases() {
    for (name, verdict) in line_verdicts(LineBug::None) {
        assert!(
            verdict.is_ok(),
            "the memory backend's line failed {name}: {verdict:?}"
        );
    }
}

#[test]
fn a_backend_without_a_line_is_caught() {
    let verdicts = line_verdicts(LineBug::NoLine);
    // The direct cases ask for a ticket and must always see none. Through the
    // manager, woken waiters race for the free key, and now and then they
    // win it in their arrival order (about one run in 20-40 on a quiet
    // machine, seen in CI): that case catches a missing line most of the
    // time, not always, so it is only reported here.
    for case in DIRECT_LINE_CASES {
        let verdict = verdicts
            .iter()
            .find(|(name, _)| name == case)
            .map(|(_, verdict)| verdict);
        assert!(
            matches!(verdict, Some(Err(_))),
            "a backend without a line passed {case}"
        );
    }
    for (name, verdict) in &verdicts {
        eprintln!(
            "a backend without a line: {name}: {}",
            match verdict {
                Ok(()) => "passed",
                Err(_) => "caught",
            }
        );
    }
}

#[test]
fn a_line_whose_turns_are_ignored_is_caught() {
    let caught: Vec<String> = line_verdicts(LineBug::IgnoresTurns)
        .into_iter()
        .filter(|(_, verdict)| verdict.is_err())
        .map(|(name, _)| name)
        .collect();
    // Through the manager, waiters that count releases may keep their order
    // even when the backend does not enforce it; the direct cases see it.
    for case in DIRECT_LINE_CASES {
        assert!(
            caught.iter().any(|name| name == case),
            "{case} passed a line whose turns are ignored (caught by {caught:?})"
        );
    }
}
