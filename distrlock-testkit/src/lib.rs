#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cases;
mod delayed;
mod galera;
mod harness;
mod memory;
mod pg_pair;
mod pgbouncer;
mod proxy;
mod throwaway;
mod watch;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::time::Duration;

use futures_util::FutureExt;

pub use delayed::{DelayedBackend, DelayedHarness};
pub use galera::{GALERA_PROVIDER, GaleraCluster};
pub use harness::{
    Capabilities, Capability, DEFAULT_FAULT_TIMEOUT, DEFAULT_LATENCY_BUDGET, Faults, Harness,
    NoFaults, Setup, Skip, TIME_TOLERANCE, Unsupported, require_db, skip,
};
pub use memory::MemoryHarness;
pub use pg_pair::PostgresPair;
pub use pgbouncer::{PgBouncer, PgBouncerBuilder, PoolMode};
pub use proxy::FaultProxy;
pub use throwaway::{
    LIBFAKETIME, ServerError, ServerKind, ServerOptions, ThrowawayServer, TlsFiles,
    write_faketime_offset,
};

/// The future of one conformance case running on a [`Setup`].
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// One conformance case, as listed in [`CASES`].
#[derive(Clone, Copy)]
pub struct Case {
    /// The case's name: the function in [`cases`] and the test in the
    /// `conformance` module that [`conformance_tests!`] makes.
    pub name: &'static str,
    /// The item of [`LockBackend`](distrlock_core::LockBackend)'s `# Contract`
    /// the case proves.
    pub item: u8,
    /// What the harness must declare for the case to run.
    pub needs: &'static [Capability],
    /// Runs the case.
    pub run: fn(&Setup) -> CaseFuture<'_>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("item", &self.item)
            .field("needs", &self.needs)
            .finish_non_exhaustive()
    }
}

/// The case named `name`, if there is one.
pub fn case(name: &str) -> Option<&'static Case> {
    CASES.iter().find(|case| case.name == name)
}

__with_cases!(__case_table! {});

/// How long a harness may take to make a setup.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one conformance case as [`run_case_with`] does, with no capabilities
/// declared.
pub fn run_case<H, F>(name: &str, harness: H, case: F)
where
    H: Harness,
    F: FnOnce(Setup) -> Pin<Box<dyn Future<Output = ()> + Send>>,
{
    run_case_with(name, harness, Capabilities::none(), case);
}

/// Runs one conformance case: makes a setup with `harness` on a fresh multi-thread
/// runtime, records `capabilities` in it, wraps its backend in the watcher, then
/// runs `case` on it. A [`Skip`] is reported with [`skip`] (a failure under
/// `DISTRLOCK_REQUIRE_DB=1`).
///
/// Panics (the test fails) when the case panics; when it does not finish within
/// [`Setup::case_timeout`] (the message lists the backend calls in flight); when
/// a backend call took longer than the latency budget outside faults, or did not
/// return within the fault timeout; and when the backend panicked in any call,
/// even one the case did not make itself (say, `extend_many` in the manager's
/// heartbeat).
///
/// [`conformance_tests!`] calls this once per case; call it yourself to run a
/// single case.
pub fn run_case_with<H, F>(name: &str, harness: H, capabilities: Capabilities, case: F)
where
    H: Harness,
    F: FnOnce(Setup) -> Pin<Box<dyn Future<Output = ()> + Send>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime for the conformance case");
    let verdict: Result<(), Failure> = runtime.block_on(async move {
        let setup = match tokio::time::timeout(SETUP_TIMEOUT, harness.setup()).await {
            Ok(Ok(setup)) => setup,
            Ok(Err(Skip(reason))) => {
                skip(name, &reason);
                return Ok(());
            }
            Err(_) => {
                return Err(Failure::Message(format!(
                    "{name}: the harness did not make a setup within {SETUP_TIMEOUT:?}"
                )));
            }
        };
        let mut setup = setup;
        setup.arm(capabilities);
        let watch = setup.watch.clone();
        let limit = setup.case_timeout();
        let budget = setup.latency_budget();
        let fault_timeout = setup.fault_timeout();
        let outcome =
            tokio::time::timeout(limit, AssertUnwindSafe(case(setup)).catch_unwind()).await;
        if std::env::var_os("DISTRLOCK_CONFORMANCE_STATS").is_some() {
            eprintln!("STATS {name}: {}", watch.stats());
        }
        match outcome {
            Err(_) => Err(Failure::Message(format!(
                "{name} did not finish within {limit:?} (the case timeout, for a latency budget \
                 of {budget:?} and a fault timeout of {fault_timeout:?}; see Setup's Timing)\n{}{}",
                watch.report(),
                watch
                    .problems()
                    .map(|p| format!("recorded problems:\n{p}"))
                    .unwrap_or_default()
            ))),
            // What the watcher saw (a hang, a call over budget, a backend panic)
            // is the cause of whatever the case then tripped over: say it first.
            Ok(Err(panic)) => match watch.problems() {
                Some(problems) => Err(Failure::Message(format!(
                    "{name}:\n{problems}and then the case failed: {}",
                    watch::panic_message(&*panic)
                ))),
                None => Err(Failure::Panic(panic)),
            },
            Ok(Ok(())) => match watch.problems() {
                Some(problems) => Err(Failure::Message(format!("{name}:\n{problems}"))),
                None => Ok(()),
            },
        }
    });
    // Never wait for ever on a backend's blocking threads.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match verdict {
        Ok(()) => {}
        Err(Failure::Message(message)) => panic!("{message}"),
        Err(Failure::Panic(panic)) => std::panic::resume_unwind(panic),
    }
}

enum Failure {
    Message(String),
    Panic(Box<dyn std::any::Any + Send>),
}

/// Expands to one `#[test]` per conformance case, in a module named
/// `conformance`, each running the case against a fresh setup from `$harness`.
///
/// ```ignore
/// // Only the cases that need no capability run; the others are #[ignore]d.
/// distrlock_testkit::conformance_tests!(MyHarness::new());
/// // Declares what the harness and its backend offer (see `Capability`).
/// distrlock_testkit::conformance_tests!(
///     MyHarness::new(),
///     supports = [unreachable, kill_sessions, release_notifications, schema_missing, fair_order]
/// );
/// ```
///
/// `supports` lists [`Capability`] tokens: `unreachable`, `kill_sessions`,
/// `release_notifications`, `schema_missing`, `fair_order` (an unknown token does not
/// compile). A case that needs a capability not listed is still generated, as
/// `#[ignore = "needs …"]`: `cargo test` reports it as ignored (and
/// `cargo test -- --ignored` runs it, to see what fails). The one-argument form
/// declares no capability, so it never fails a correct backend for a hook its
/// harness lacks, and never counts an unchecked promise as passed.
///
/// `$harness` is evaluated once per test, inside the `conformance` module (which
/// imports the parent module's names).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr $(,)?) => {
        $crate::conformance_tests!($harness, supports = []);
    };
    ($harness:expr, supports = [$($cap:ident),* $(,)?] $(,)?) => {
        $crate::__with_cases!(__conformance_tests! { ($harness) [$($cap)*] });
    };
}

/// The one list of conformance cases, grouped by contract item, each with the
/// capabilities it needs. Calls `$callback!` with `{ $args }` and the list.
#[doc(hidden)]
#[macro_export]
macro_rules! __with_cases {
    ($callback:ident ! { $($args:tt)* }) => {
        $crate::$callback! { { $($args)* }
            // 1. Mutual exclusion.
            1 acquire_release_reacquire [],
            1 second_token_refused_while_held [],
            1 concurrent_try_acquires_one_winner [],
            1 independent_keys [],
            1 keys_are_exact [],
            1 lease_lasts_its_ttl [],
            1 extend_sets_its_own_ttl [],
            1 extend_keeps_lock_and_fails_after_expiry [],
            1 extend_many_renews_only_held_leases [],
            1 do_exclusively_is_exclusive [],
            // 2. Fencing.
            2 fences_strictly_increase [],
            2 same_token_reacquires_idempotently [],
            2 same_token_after_release_or_expiry_gets_a_new_fence [],
            // 3. Ownership.
            3 wrong_token_not_held [],
            3 double_release [],
            3 release_after_expiry_is_not_held [],
            // 4. One clock.
            4 times_are_on_one_clock [],
            // 5. Refusal is cheap and harmless.
            5 refused_acquire_changes_nothing [],
            // 6. Bounded calls.
            6 calls_are_bounded_while_unreachable [unreachable],
            // 7. Errors are typed.
            7 bad_input_is_refused [],
            7 missing_table_gives_schema_missing [schema_missing],
            7 killed_sessions_are_recovered [kill_sessions],
            // 8. No late effects.
            8 passed_not_after_changes_nothing [],
            8 timed_out_try_takes_no_effect_later [unreachable],
            // 9. Clock readings.
            9 clock_readings_advance [],
            // 10. Cancel safety.
            10 dropped_calls_leave_a_consistent_state [],
            10 cancelled_acquire_leaves_no_lock [],
            10 dropped_guard_frees_lock [],
            // 11. Liveness.
            11 expiry_hands_over [],
            11 wait_with_timeout [],
            11 release_wakes_waiter [release_notifications],
            // 12. A conservative client view.
            12 held_until_local_deadline [],
            12 heartbeats_keep_the_lease [],
            12 lost_lock_stops_do_exclusively [],
            12 unreachable_backend_loses_lock_by_deadline [unreachable],
            // 13. Faithful inspection.
            13 inspect_and_list_show_holder [],
            13 inspect_reports_the_latest_holding [],
            13 list_shows_every_row_in_key_order [],
            // 14. Fair order.
            14 waiters_are_served_in_order [fair_order],
            14 a_gone_waiter_holds_the_line_one_turn [fair_order],
            14 waiting_acquires_are_served_in_order [fair_order],
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __case_table {
    ({} $($item:literal $case:ident [$($need:ident)*]),* $(,)?) => {
        /// Every conformance case, in the order of the contract items they prove
        /// (the list [`conformance_tests!`] expands).
        pub const CASES: &[Case] = &[$(
            Case {
                name: stringify!($case),
                item: $item,
                needs: &[$($crate::__capability!($need)),*],
                run: {
                    fn run(setup: &Setup) -> CaseFuture<'_> {
                        Box::pin(cases::$case(setup))
                    }
                    run
                },
            },
        )*];
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ({ ($harness:expr) $caps:tt } $($item:literal $case:ident [$($need:ident)*]),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                $crate::__conformance_test! { ($harness) $caps $case [$($need)*] [] }
            )*
        }
    };
}

/// One test: checks each need against the declared capabilities, collecting the
/// missing ones, then emits a plain or an ignored test.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test {
    (($harness:expr) [$($cap:ident)*] $case:ident [] []) => {
        $crate::__test_fn! { () ($harness) [$($cap)*] $case }
    };
    (($harness:expr) [$($cap:ident)*] $case:ident [] [$missing:ident $($more:ident)*]) => {
        $crate::__ignored_test! { $missing ($harness) [$($cap)*] $case }
    };
    (($harness:expr) [$($cap:ident)*] $case:ident [$need:ident $($rest:ident)*] [$($missing:ident)*]) => {
        $crate::__if_declared! { $need [$($cap)*]
            { $crate::__conformance_test! { ($harness) [$($cap)*] $case [$($rest)*] [$($missing)*] } }
            { $crate::__conformance_test! { ($harness) [$($cap)*] $case [$($rest)*] [$($missing)* $need] } }
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __if_declared {
    (unreachable [unreachable $($_rest:ident)*] {$($yes:tt)*} $no:tt) => { $($yes)* };
    (kill_sessions [kill_sessions $($_rest:ident)*] {$($yes:tt)*} $no:tt) => { $($yes)* };
    (release_notifications [release_notifications $($_rest:ident)*] {$($yes:tt)*} $no:tt) => { $($yes)* };
    (schema_missing [schema_missing $($_rest:ident)*] {$($yes:tt)*} $no:tt) => { $($yes)* };
    (fair_order [fair_order $($_rest:ident)*] {$($yes:tt)*} $no:tt) => { $($yes)* };
    ($need:ident [$_other:ident $($rest:ident)*] $yes:tt $no:tt) => {
        $crate::__if_declared! { $need [$($rest)*] $yes $no }
    };
    ($need:ident [] $yes:tt {$($no:tt)*}) => { $($no)* };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __ignored_test {
    (unreachable $($rest:tt)*) => {
        $crate::__test_fn! {
            (#[ignore = "needs the `unreachable` capability (Faults::make_unreachable and restore); declare it with conformance_tests!(H, supports = [unreachable])"])
            $($rest)*
        }
    };
    (kill_sessions $($rest:tt)*) => {
        $crate::__test_fn! {
            (#[ignore = "needs the `kill_sessions` capability (Faults::kill_sessions); declare it with conformance_tests!(H, supports = [kill_sessions])"])
            $($rest)*
        }
    };
    (release_notifications $($rest:tt)*) => {
        $crate::__test_fn! {
            (#[ignore = "needs the `release_notifications` capability (a backend whose release_notifier() announces releases); declare it with conformance_tests!(H, supports = [release_notifications])"])
            $($rest)*
        }
    };
    (schema_missing $($rest:tt)*) => {
        $crate::__test_fn! {
            (#[ignore = "needs the `schema_missing` capability (Faults::missing_table); declare it with conformance_tests!(H, supports = [schema_missing])"])
            $($rest)*
        }
    };
    (fair_order $($rest:tt)*) => {
        $crate::__test_fn! {
            (#[ignore = "needs the `fair_order` capability (a backend that keeps a line of waiters, contract item 14); declare it with conformance_tests!(H, supports = [fair_order])"])
            $($rest)*
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __test_fn {
    (($(#[$attr:meta])*) ($harness:expr) [$($cap:ident)*] $case:ident) => {
        #[test]
        $(#[$attr])*
        fn $case() {
            $crate::run_case_with(
                concat!("conformance::", stringify!($case)),
                $harness,
                $crate::__capabilities!($($cap)*),
                |setup| ::std::boxed::Box::pin(async move {
                    $crate::cases::$case(&setup).await
                }),
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __capabilities {
    ($($cap:ident)*) => {
        $crate::Capabilities::none()$(.with($crate::__capability!($cap)))*
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __capability {
    (unreachable) => {
        $crate::Capability::Unreachable
    };
    (kill_sessions) => {
        $crate::Capability::KillSessions
    };
    (release_notifications) => {
        $crate::Capability::ReleaseNotifications
    };
    (schema_missing) => {
        $crate::Capability::SchemaMissing
    };
    (fair_order) => {
        $crate::Capability::FairOrder
    };
    ($other:ident) => {
        compile_error!(concat!(
            "unknown conformance capability `",
            stringify!($other),
            "`; the capabilities are unreachable, kill_sessions, release_notifications, \
             schema_missing and fair_order"
        ))
    };
}
