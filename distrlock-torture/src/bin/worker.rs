//! A torture worker: takes random keys, holds each for a random short time, and
//! records every holding in its history file, until its run time is up.
//!
//! ```text
//! distrlock-torture-worker URL TABLE HISTORY KEYS TTL_MS HOLD_MAX_MS RUN_MS NAME [OPTIONS]
//! ```
//!
//! `OPTIONS` is [`BackendOptions::to_arg`]'s text (`quarantine=off,max_ttl_ms=3000`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use distrlock_core::{LockManager, RetryPolicy};
use distrlock_torture::backends::{self, BackendOptions};
use distrlock_torture::history::{Event, HistoryWriter, monotonic_ns};
use tokio::time::Instant;

struct Args {
    url: String,
    table: String,
    history: PathBuf,
    keys: usize,
    ttl: Duration,
    hold_max: Duration,
    run_for: Duration,
    name: String,
    options: BackendOptions,
}

fn parse() -> Option<Args> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (options, a) = match a.as_slice() {
        [rest @ .., options] if a.len() == 9 => (BackendOptions::from_arg(options)?, rest),
        all => (BackendOptions::default(), all),
    };
    let [url, table, history, keys, ttl, hold, run, name] = a else {
        return None;
    };
    Some(Args {
        url: url.clone(),
        table: table.clone(),
        history: PathBuf::from(history),
        keys: keys.parse().ok()?,
        ttl: Duration::from_millis(ttl.parse().ok()?),
        hold_max: Duration::from_millis(hold.parse().ok()?),
        run_for: Duration::from_millis(run.parse().ok()?),
        name: name.clone(),
        options,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let Some(args) = parse() else {
        eprintln!(
            "usage: distrlock-torture-worker URL TABLE HISTORY KEYS TTL_MS HOLD_MAX_MS RUN_MS NAME [OPTIONS]"
        );
        return ExitCode::from(2);
    };
    match work(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn work(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut history = HistoryWriter::open(&args.history)?;
    history.write(&Event::Start {
        pid: std::process::id(),
        t: monotonic_ns(),
    })?;
    let end_at = Instant::now() + args.run_for;
    // The database may be down when we start (a restart under way): keep trying.
    let backend = loop {
        match backends::open_with(&args.url, &args.table, &args.name, &args.options).await {
            Ok(backend) => break backend,
            Err(error) if Instant::now() < end_at => {
                let t = monotonic_ns();
                history.write(&Event::Failed {
                    key: String::new(),
                    waited_from: t,
                    error: error.to_string(),
                    t,
                })?;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => return Err(error.into()),
        }
    };
    let manager = LockManager::builder(backend)
        .ttl(args.ttl)
        .owner(args.name.clone())
        .call_timeout(args.ttl)
        .retry_policy(
            RetryPolicy::default()
                .with_initial_delay(Duration::from_millis(10))
                .with_max_delay(Duration::from_millis(200)),
        )
        .build()?;
    let mut rng = fastrand::Rng::new();
    while Instant::now() < end_at {
        let key = format!("torture-{}", rng.usize(..args.keys));
        let lock = manager.lock(&key)?;
        let waited_from = monotonic_ns();
        let guard = match lock.acquire_timeout(args.ttl * 2).await {
            Ok(guard) => guard,
            Err(error) => {
                let t = monotonic_ns();
                history.write(&Event::Failed {
                    key: key.clone(),
                    waited_from,
                    error: error.to_string(),
                    t,
                })?;
                // Tell "the lock was busy" from "the database was away".
                if manager.backend().inspect(lock.key()).await.is_ok() {
                    history.write(&Event::Contact { t: monotonic_ns() })?;
                }
                continue;
            }
        };
        // Read the clock, then ask the guard: if it still holds now, it held then.
        let start = monotonic_ns();
        if guard.is_lost() {
            history.write(&Event::Unused {
                key: key.clone(),
                fence: guard.fence().get(),
                t: start,
            })?;
            continue;
        }
        let fence = guard.fence().get();
        // Mostly short holds; one in ten lasts three ttls, long enough for the
        // heartbeat to matter and for a network stall to hit a holder.
        let hold = if rng.u8(..10) == 0 {
            args.ttl * 3
        } else {
            Duration::from_millis(rng.u64(..=args.hold_max.as_millis() as u64))
        };
        let hold_ms = hold.as_millis() as u64;
        history.write(&Event::Acquired {
            key: key.clone(),
            fence,
            t: start,
            hold_ms,
            waited_from,
        })?;
        let until = Instant::now() + hold;
        let mut last_claimed = start;
        loop {
            let t = monotonic_ns();
            if guard.is_lost() {
                break;
            }
            last_claimed = t;
            let now = Instant::now();
            if now >= until {
                break;
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(5))).await;
        }
        let lost = guard.is_lost();
        history.write(&Event::Ended {
            key,
            fence,
            t: last_claimed,
            lost,
            reason: guard.loss_reason().map(|r| r.as_str().to_owned()),
        })?;
        // A failed release (say, the database is away) leaves the lease to expire.
        let _ = guard.release().await;
    }
    history.write(&Event::Exit { t: monotonic_ns() })?;
    Ok(())
}
