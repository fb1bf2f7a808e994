//! Running clients for a fixed time: warm-up, repetitions, latencies.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use crate::stats::{Samples, Spread};
use crate::workload::{Cycle, Waiter};

/// How long to warm up and measure, and how often.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub(crate) warmup: Duration,
    pub(crate) measure: Duration,
    pub(crate) reps: usize,
}

/// Scenario 1 and 4 figures: cycles/s and cycle latency, per repetition.
#[derive(Debug, Clone)]
pub(crate) struct CycleFigures {
    pub(crate) rate: Spread,
    pub(crate) p50_ms: Spread,
    pub(crate) p99_ms: Spread,
    pub(crate) cycles: u64,
}

type Client = (Box<dyn Cycle>, Vec<String>);

/// Runs `clients` (each cycling over its own keys) for the plan.
pub(crate) async fn cycles(
    clients: Vec<Box<dyn Cycle>>,
    prefix: &str,
    plan: Plan,
) -> anyhow::Result<CycleFigures> {
    let mut clients: Vec<Client> = clients
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, (0..4).map(|k| format!("{prefix}/c{i}/k{k}")).collect()))
        .collect();
    if !plan.warmup.is_zero() {
        clients = cycle_phase(clients, plan.warmup).await?.0;
    }
    let (mut rates, mut p50, mut p99, mut total) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..plan.reps {
        let (back, rate, samples) = cycle_phase(clients, plan.measure).await?;
        clients = back;
        rates.push(rate);
        p50.push(samples.percentile_ms(50.0));
        p99.push(samples.percentile_ms(99.0));
        total += samples.0.len() as u64;
    }
    Ok(CycleFigures {
        rate: Spread::of(&rates),
        p50_ms: Spread::of(&p50),
        p99_ms: Spread::of(&p99),
        cycles: total,
    })
}

async fn cycle_phase(
    clients: Vec<Client>,
    length: Duration,
) -> anyhow::Result<(Vec<Client>, f64, Samples)> {
    let start = Instant::now();
    let stop = start + length;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(mut client, keys)| {
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut i = 0;
                while Instant::now() < stop {
                    let t = Instant::now();
                    client.cycle(&keys[i % keys.len()]).await?;
                    samples.push(t.elapsed());
                    i += 1;
                }
                Ok::<_, anyhow::Error>((client, keys, samples))
            })
        })
        .collect();
    let mut back = Vec::new();
    let mut all = Samples::default();
    for task in tasks {
        let (client, keys, samples) = task.await??;
        back.push((client, keys));
        all.extend(samples);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = all.0.len() as f64 / elapsed;
    Ok((back, rate, all))
}

/// Scenario 2 figures.
#[derive(Debug, Clone)]
pub(crate) struct ContentionFigures {
    pub(crate) rate: Spread,
    pub(crate) handoff_p50_ms: Spread,
    pub(crate) handoff_p99_ms: Spread,
    pub(crate) handoff_max_ms: Spread,
    pub(crate) wait_max_ms: Spread,
    pub(crate) wait_mean_ms: Spread,
    pub(crate) acquisitions: u64,
    /// Acquisitions by a waiter other than the previous holder.
    pub(crate) handoffs: u64,
}

/// Runs `waiters` on one key, each holding it for `hold`, for the plan.
pub(crate) async fn contention(
    mut waiters: Vec<Box<dyn Waiter>>,
    hold: Duration,
    plan: Plan,
) -> anyhow::Result<ContentionFigures> {
    if !plan.warmup.is_zero() {
        waiters = contention_phase(waiters, hold, plan.warmup).await?.0;
    }
    let mut figures: [Vec<f64>; 6] = Default::default();
    let (mut total, mut total_handoffs) = (0, 0);
    for _ in 0..plan.reps {
        let (back, rate, handoffs, waits) = contention_phase(waiters, hold, plan.measure).await?;
        waiters = back;
        total += waits.0.len() as u64;
        total_handoffs += handoffs.0.len() as u64;
        for (slot, value) in figures.iter_mut().zip([
            rate,
            handoffs.percentile_ms(50.0),
            handoffs.percentile_ms(99.0),
            handoffs.max_ms(),
            waits.max_ms(),
            waits.mean_ms(),
        ]) {
            slot.push(value);
        }
    }
    Ok(ContentionFigures {
        rate: Spread::of(&figures[0]),
        handoff_p50_ms: Spread::of(&figures[1]),
        handoff_p99_ms: Spread::of(&figures[2]),
        handoff_max_ms: Spread::of(&figures[3]),
        wait_max_ms: Spread::of(&figures[4]),
        wait_mean_ms: Spread::of(&figures[5]),
        acquisitions: total,
        handoffs: total_handoffs,
    })
}

async fn contention_phase(
    waiters: Vec<Box<dyn Waiter>>,
    hold: Duration,
    length: Duration,
) -> anyhow::Result<(Vec<Box<dyn Waiter>>, f64, Samples, Samples)> {
    let start = Instant::now();
    let stop = start + length;
    // Who last held the key and when they began to release it: the next
    // acquisition by another waiter is a handoff from there. (A holder that
    // takes the key straight back is no handoff: nobody waited for it.)
    let released: Arc<Mutex<Option<(usize, Instant)>>> = Arc::new(Mutex::new(None));
    let tasks: Vec<_> = waiters
        .into_iter()
        .enumerate()
        .map(|(me, mut waiter)| {
            let released = released.clone();
            tokio::spawn(async move {
                let (mut handoffs, mut waits) = (Samples::default(), Samples::default());
                loop {
                    let asked = Instant::now();
                    waiter.lock().await?;
                    let got = Instant::now();
                    let last = released
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take();
                    if got >= stop {
                        // Past the end: hand it on so the others can finish too.
                        waiter.unlock().await?;
                        break;
                    }
                    waits.push(got - asked);
                    if let Some((holder, at)) = last
                        && holder != me
                    {
                        handoffs.push(got - at);
                    }
                    if !hold.is_zero() {
                        tokio::time::sleep(hold).await;
                    }
                    *released.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some((me, Instant::now()));
                    waiter.unlock().await?;
                }
                Ok::<_, anyhow::Error>((waiter, handoffs, waits))
            })
        })
        .collect();
    let (mut back, mut handoffs, mut waits) = (Vec::new(), Samples::default(), Samples::default());
    for task in tasks {
        let (waiter, h, w) = task.await??;
        back.push(waiter);
        handoffs.extend(h);
        waits.extend(w);
    }
    let rate = waits.0.len() as f64 / length.as_secs_f64();
    Ok((back, rate, handoffs, waits))
}

/// Scenario 6's workload: which keys the clients ask for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyMix {
    /// Keys in all.
    pub(crate) keys: usize,
    /// How many of them are hot.
    pub(crate) hot: usize,
    /// The share of operations on a hot key (0–1).
    pub(crate) hot_share: f64,
}

/// Scenario 6 figures, per repetition: operations/s, and the waits for hot
/// and for cold keys.
#[derive(Debug, Clone)]
pub(crate) struct MixFigures {
    pub(crate) rate: Spread,
    pub(crate) hot_p50_ms: Spread,
    pub(crate) hot_p99_ms: Spread,
    pub(crate) hot_max_ms: Spread,
    pub(crate) cold_p50_ms: Spread,
    pub(crate) cold_p99_ms: Spread,
    pub(crate) operations: u64,
}

/// Runs `clients` lock managers' worth of clients (one manager each; several
/// clients may share a manager's backend) on the keys of `mix`: each
/// operation picks a key (hot with probability `hot_share`), waits for it
/// with `Lock::acquire`, holds it for `hold` and releases it.
pub(crate) async fn key_mix(
    clients: Vec<distrlock_core::LockManager>,
    prefix: &str,
    mix: KeyMix,
    hold: Duration,
    plan: Plan,
) -> anyhow::Result<MixFigures> {
    let keys: Vec<String> = (0..mix.keys).map(|k| format!("{prefix}/k{k}")).collect();
    let keys = Arc::new(keys);
    let phase = |length: Duration, seed: u64| {
        let keys = keys.clone();
        let clients = clients.clone();
        async move {
            let stop = Instant::now() + length;
            let tasks: Vec<_> = clients
                .into_iter()
                .enumerate()
                .map(|(i, manager)| {
                    let keys = keys.clone();
                    tokio::spawn(async move {
                        let mut rng = fastrand::Rng::with_seed(seed ^ (i as u64) << 16);
                        let (mut hot, mut cold) = (Samples::default(), Samples::default());
                        while Instant::now() < stop {
                            let k = if mix.hot > 0 && rng.f64() < mix.hot_share {
                                rng.usize(..mix.hot)
                            } else {
                                rng.usize(mix.hot.min(mix.keys - 1)..mix.keys)
                            };
                            let asked = Instant::now();
                            let guard = manager.lock(&keys[k])?.acquire().await?;
                            let waited = asked.elapsed();
                            if !hold.is_zero() {
                                tokio::time::sleep(hold).await;
                            }
                            guard.release().await?;
                            if k < mix.hot {
                                hot.push(waited);
                            } else {
                                cold.push(waited);
                            }
                        }
                        Ok::<_, anyhow::Error>((hot, cold))
                    })
                })
                .collect();
            let (mut hot, mut cold) = (Samples::default(), Samples::default());
            for task in tasks {
                let (h, c) = task.await??;
                hot.extend(h);
                cold.extend(c);
            }
            Ok::<_, anyhow::Error>((hot, cold))
        }
    };
    if !plan.warmup.is_zero() {
        phase(plan.warmup, 0).await?;
    }
    let mut figures: [Vec<f64>; 6] = Default::default();
    let mut operations = 0;
    for rep in 0..plan.reps {
        let (hot, cold) = phase(plan.measure, rep as u64 + 1).await?;
        let done = (hot.0.len() + cold.0.len()) as u64;
        operations += done;
        for (slot, value) in figures.iter_mut().zip([
            done as f64 / plan.measure.as_secs_f64(),
            hot.percentile_ms(50.0),
            hot.percentile_ms(99.0),
            hot.max_ms(),
            cold.percentile_ms(50.0),
            cold.percentile_ms(99.0),
        ]) {
            slot.push(value);
        }
    }
    Ok(MixFigures {
        rate: Spread::of(&figures[0]),
        hot_p50_ms: Spread::of(&figures[1]),
        hot_p99_ms: Spread::of(&figures[2]),
        hot_max_ms: Spread::of(&figures[3]),
        cold_p50_ms: Spread::of(&figures[4]),
        cold_p99_ms: Spread::of(&figures[5]),
        operations,
    })
}
