//! Run this in two terminals at once: the first takes the lock and holds it for a
//! few seconds, the second waits, and takes it the moment the first releases (woken
//! by PostgreSQL `NOTIFY`, not by polling).
//!
//! ```text
//! export DISTRLOCK_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo run -p distrlock-postgres --example two_terminals -- 10   # terminal 1
//! cargo run -p distrlock-postgres --example two_terminals -- 10   # terminal 2
//! ```
//!
//! The argument is how many seconds to hold the lock (default 10).

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{Error, LockBackend, LockKey, LockManager};
use distrlock_postgres::PostgresBackend;
use tokio::time::Instant;

const KEY: &str = "distrlock-examples/two-terminals";

#[tokio::main]
async fn main() -> Result<(), Error> {
    let hold = std::env::args()
        .nth(1)
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(10));
    let url = std::env::var("DISTRLOCK_POSTGRES_URL")
        .or_else(|_| std::env::var("DISTRLOCK_TEST_POSTGRES_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let me = format!("two_terminals pid {}", std::process::id());

    let backend = Arc::new(PostgresBackend::connect(&url).await?);
    backend.create_table().await?;
    let manager = LockManager::builder(backend.clone())
        .ttl(Duration::from_secs(10))
        .owner(&me)
        .build()?;
    let lock = manager.lock(KEY)?;

    let guard = match lock.try_acquire().await {
        Ok(guard) => guard,
        Err(Error::HeldByOther { remaining, .. }) => {
            let holder = backend
                .inspect(&LockKey::new(KEY)?)
                .await?
                .map(|info| info.owner)
                .unwrap_or_default();
            println!("[{me}] {KEY} is held by {holder:?} (lease left: {remaining:?}); waiting…");
            let started = Instant::now();
            let guard = lock.acquire_timeout(Duration::from_secs(300)).await?;
            println!("[{me}] waited {:?}", started.elapsed());
            guard
        }
        Err(other) => return Err(other),
    };

    println!(
        "[{me}] acquired {KEY} with fence {}; holding it for {hold:?} (the lease is \
         extended in the background)",
        guard.fence()
    );
    let until = Instant::now() + hold;
    while Instant::now() < until {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                let left = until.saturating_duration_since(Instant::now());
                println!("[{me}] working… {}s left", left.as_millis().div_ceil(1000));
            }
            () = guard.lost() => {
                let reason = guard.loss_reason().unwrap_or(distrlock_core::LossReason::LeaseRanOut);
                println!("[{me}] the lock was lost ({reason}); stopping");
                return Err(Error::LockLost { key: guard.key().clone(), reason });
            }
        }
    }
    guard.release().await?;
    println!("[{me}] released {KEY}");
    Ok(())
}
