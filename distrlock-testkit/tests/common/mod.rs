//! Shared by the testkit's own tests: running cases by name on their own
//! threads, and a small reference backend with one switchable bug at a time.
#![allow(dead_code, unreachable_pub)]

pub mod reference;

use std::sync::{Condvar, Mutex};

use distrlock_testkit::{Capabilities, Harness};

/// At most this many cases run at once in one test binary, so that timing stays
/// sane on a small machine.
const AT_ONCE: usize = 6;

static RUNNING: Mutex<usize> = Mutex::new(0);
static FREED: Condvar = Condvar::new();

/// Runs the case `name` on a thread of its own with `harness`; `Err` holds its
/// failure message.
pub fn run_case<H: Harness + 'static>(
    harness: H,
    capabilities: Capabilities,
    name: &str,
) -> Result<(), String> {
    let case = distrlock_testkit::case(name).unwrap_or_else(|| panic!("no case named {name}"));
    {
        let mut running = RUNNING.lock().unwrap();
        while *running >= AT_ONCE {
            running = FREED.wait(running).unwrap();
        }
        *running += 1;
    }
    let joined = std::thread::spawn(move || {
        distrlock_testkit::run_case_with(case.name, harness, capabilities, move |setup| {
            Box::pin(async move { (case.run)(&setup).await })
        })
    })
    .join();
    *RUNNING.lock().unwrap() -= 1;
    FREED.notify_one();
    joined.map_err(|payload| {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "(a non-text panic)".to_owned()
        }
    })
}

/// Runs the cases `names` at once (a few at a time), each on its own thread, and
/// returns each one's verdict in order.
pub fn run_cases<H: Harness + Clone + 'static>(
    harness: &H,
    capabilities: Capabilities,
    names: &[&str],
) -> Vec<(String, Result<(), String>)> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = names
            .iter()
            .map(|name| {
                let harness = harness.clone();
                let name = (*name).to_owned();
                scope.spawn(move || {
                    let verdict = run_case(harness, capabilities, &name);
                    (name, verdict)
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    })
}
