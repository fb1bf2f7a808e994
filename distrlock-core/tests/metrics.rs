//! With the `metrics` feature: acquisitions, refusals, timeouts, losses by reason,
//! failed extends and renewal batches are counted, waits and holds timed.
#![cfg(feature = "metrics")]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distrlock_core::{LockManager, MemoryBackend, metrics as names};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

/// Keeps every counter's total and every histogram's sample count, by name and
/// labels.
#[derive(Default)]
struct Capture {
    counters: Mutex<HashMap<String, Arc<Total>>>,
    histograms: Mutex<HashMap<String, Arc<Total>>>,
}

#[derive(Default)]
struct Total(AtomicU64);

impl CounterFn for Total {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::SeqCst);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::SeqCst);
    }
}

impl HistogramFn for Total {
    fn record(&self, _value: f64) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

fn name(key: &Key) -> String {
    let mut name = key.name().to_owned();
    for label in key.labels() {
        name.push_str(&format!("{{{}={}}}", label.key(), label.value()));
    }
    name
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let total = self
            .counters
            .lock()
            .unwrap()
            .entry(name(key))
            .or_default()
            .clone();
        Counter::from_arc(total)
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let total = self
            .histograms
            .lock()
            .unwrap()
            .entry(name(key))
            .or_default()
            .clone();
        Histogram::from_arc(total)
    }
}

impl Capture {
    fn counter(&self, name: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |t| t.0.load(Ordering::SeqCst))
    }
    fn samples(&self, name: &str) -> u64 {
        self.histograms
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |t| t.0.load(Ordering::SeqCst))
    }
}

#[test]
fn the_lock_life_cycle_is_counted_and_timed() {
    let capture = Capture::default();
    metrics::with_local_recorder(&capture, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let backend = Arc::new(MemoryBackend::new());
            let manager = LockManager::builder(backend.clone())
                .ttl(Duration::from_secs(3))
                .call_timeout(Duration::from_millis(500))
                .build()
                .unwrap();
            let guard = manager.lock("k").unwrap().try_acquire().await.unwrap();
            assert!(manager.lock("k").unwrap().try_acquire().await.is_err());
            let waited = manager
                .lock("k")
                .unwrap()
                .acquire_timeout(Duration::from_millis(200))
                .await;
            assert!(waited.is_err());
            // Two heartbeats, then the database goes away: failed extends, a loss.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            backend.set_unreachable(true);
            guard.lost().await;
            backend.set_unreachable(false);
            drop(guard);
            let again = manager.lock("k2").unwrap().try_acquire().await.unwrap();
            again.release().await.unwrap();
        });
    });
    assert_eq!(capture.counter(names::ACQUISITIONS), 2);
    assert!(
        capture.counter(names::REFUSALS) >= 2,
        "the try and the wait's tries"
    );
    assert_eq!(capture.counter(names::ACQUIRE_TIMEOUTS), 1);
    assert_eq!(
        capture.counter(&format!("{}{{reason=unreachable}}", names::LOCKS_LOST)),
        1
    );
    assert!(capture.counter(names::EXTEND_FAILURES) >= 1);
    assert!(capture.counter(names::RENEWAL_BATCHES) >= 2);
    assert_eq!(
        capture.samples(names::WAIT_SECONDS),
        3,
        "two grants and a timeout"
    );
    assert_eq!(
        capture.samples(names::HOLD_SECONDS),
        2,
        "a loss and a release"
    );
}
