#![doc = include_str!("../README.md")]

pub mod cases;
mod delayed;
mod galera;
mod harness;
mod memory;
mod proxy;
mod throwaway;

use std::future::Future;
use std::pin::Pin;

pub use delayed::DelayedBackend;
pub use galera::{GALERA_PROVIDER, GaleraCluster};
pub use harness::{Faults, Harness, NoFaults, Setup, Skip, Unsupported, require_db, skip};
pub use memory::MemoryHarness;
pub use proxy::FaultProxy;
pub use throwaway::{
    LIBFAKETIME, ServerError, ServerKind, ServerOptions, ThrowawayServer, write_faketime_offset,
};

/// Runs one conformance case: makes a setup with `harness` on a fresh multi-thread
/// runtime, then runs `case` on it. A [`Skip`] is reported with [`skip`] (a failure
/// under `DISTRLOCK_REQUIRE_DB=1`).
///
/// [`conformance_tests!`] calls this once per case; call it yourself to run a
/// single case.
pub fn run_case<H, F>(name: &str, harness: H, case: F)
where
    H: Harness,
    F: FnOnce(Setup) -> Pin<Box<dyn Future<Output = ()> + Send>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime for the conformance case");
    runtime.block_on(async move {
        match harness.setup().await {
            Ok(setup) => case(setup).await,
            Err(Skip(reason)) => skip(name, &reason),
        }
    });
}

/// Expands to one `#[test]` per conformance case, in a module named
/// `conformance`, each running the case against a fresh setup from `$harness`.
///
/// ```ignore
/// distrlock_testkit::conformance_tests!(MyHarness::new());
/// ```
///
/// `$harness` is evaluated once per test, inside the `conformance` module (which
/// imports the parent module's names).
#[macro_export]
macro_rules! conformance_tests {
    ($harness:expr) => {
        $crate::__conformance_tests!(
            $harness;
            acquire_release_reacquire,
            second_token_refused_while_held,
            same_token_reacquires_idempotently,
            concurrent_try_acquires_one_winner,
            independent_keys,
            keys_are_exact,
            wrong_token_not_held,
            double_release,
            extend_keeps_lock_and_fails_after_expiry,
            expiry_hands_over,
            fences_strictly_increase,
            wait_with_timeout,
            do_exclusively_is_exclusive,
            lost_lock_stops_do_exclusively,
            unreachable_backend_loses_lock_by_deadline,
            dropped_guard_frees_lock,
            inspect_and_list_show_holder,
            bad_input_is_refused,
            cancelled_acquire_leaves_no_lock,
            release_wakes_waiter,
            killed_sessions_are_recovered,
            held_until_local_deadline,
            same_token_after_release_or_expiry_gets_a_new_fence,
            extend_many_renews_only_held_leases,
            timed_out_try_takes_no_effect_later,
        );
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_tests {
    ($harness:expr; $($case:ident),* $(,)?) => {
        mod conformance {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[test]
                fn $case() {
                    $crate::run_case(
                        concat!("conformance::", stringify!($case)),
                        $harness,
                        |setup| ::std::boxed::Box::pin(async move {
                            $crate::cases::$case(&setup).await
                        }),
                    );
                }
            )*
        }
    };
}
