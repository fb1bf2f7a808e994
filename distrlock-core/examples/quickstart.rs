//! Four workers share one lock on the in-memory backend; each runs its critical
//! section alone, with a fence that grows every time the lock changes hands.
//!
//! Run with `cargo run -p distrlock-core --example quickstart`.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{LockManager, MemoryBackend};

#[tokio::main]
async fn main() -> Result<(), distrlock_core::Error> {
    let manager = LockManager::builder(Arc::new(MemoryBackend::new()))
        .ttl(Duration::from_secs(5))
        .build()?;

    let mut workers = Vec::new();
    for worker in 0..4 {
        let manager = manager.clone();
        workers.push(tokio::spawn(async move {
            manager
                .do_exclusively("nightly-report", |lease| async move {
                    println!(
                        "worker {worker}: running alone with fence {}",
                        lease.fence()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                })
                .await
        }));
    }
    for worker in workers {
        worker.await.expect("worker task")?;
    }
    println!("all workers done, one at a time");
    Ok(())
}
