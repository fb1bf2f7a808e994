//! Shared by the testkit's own tests: running cases by name on their own
//! threads, a small reference backend with one switchable bug at a time, and
//! broken lines of waiters.
#![allow(dead_code, unreachable_pub)]

pub mod line;
pub mod reference;

use std::sync::{Condvar, Mutex};

use distrlock_testkit::{Capabilities, Harness};

/// Lets at most a given number of cases run at once in one test binary, so
/// that timing stays sane on a small machine.
pub struct Limiter {
    running: Mutex<usize>,
    freed: Condvar,
    at_once: usize,
}

impl Limiter {
    pub const fn new(at_once: usize) -> Self {
        Self {
            running: Mutex::new(0),
            freed: Condvar::new(),
            at_once,
        }
    }

    fn enter(&self) {
        let mut running = self.running.lock().unwrap();
        while *running >= self.at_once {
            running = self.freed.wait(running).unwrap();
        }
        *running += 1;
    }

    fn leave(&self) {
        *self.running.lock().unwrap() -= 1;
        self.freed.notify_one();
    }
}

/// Runs the case `name` on a thread of its own with `harness`; `Err` holds its
/// failure message.
pub fn run_case<H: Harness + 'static>(
    harness: H,
    capabilities: Capabilities,
    name: &str,
) -> Result<(), String> {
    let case = distrlock_testkit::case(name).unwrap_or_else(|| panic!("no case named {name}"));
    std::thread::spawn(move || {
        distrlock_testkit::run_case_with(case.name, harness, capabilities, move |setup| {
            Box::pin(async move { (case.run)(&setup).await })
        })
    })
    .join()
    .map_err(|payload| {
        if let Some(s) = payload.downcast_ref::<&str>() {
            (*s).to_owned()
        } else if let Some(s) = payload.downcast_ref::<String>() {
            s.clone()
        } else {
            "(a non-text panic)".to_owned()
        }
    })
}

/// Runs the cases `names` at once (as many as `limiter` lets), each on its own
/// thread, and returns each one's verdict in order.
pub fn run_cases<H: Harness + Clone + 'static>(
    harness: &H,
    capabilities: Capabilities,
    names: &[&str],
    limiter: &Limiter,
) -> Vec<(String, Result<(), String>)> {
    std::thread::scope(|scope| {
        let runs: Vec<_> = names
            .iter()
            .map(|name| {
                let harness = harness.clone();
                let name = (*name).to_owned();
                scope.spawn(move || {
                    limiter.enter();
                    let verdict = run_case(harness, capabilities, &name);
                    limiter.leave();
                    (name, verdict)
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    })
}
