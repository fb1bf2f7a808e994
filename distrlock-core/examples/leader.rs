//! Leader election: three contenders campaign on one key; the leader works until
//! it shuts down, and another takes over at once.
//!
//! ```text
//! cargo run -p distrlock-core --example leader
//! ```
//!
//! With a database backend instead of the in-memory one, run the same program in
//! several processes: one leads, and when it dies another takes over within a ttl.

use std::time::Duration;

use distrlock_core::{LockManager, MemoryBackend};

#[tokio::main]
async fn main() -> distrlock_core::Result<()> {
    let manager = LockManager::builder(MemoryBackend::new())
        .ttl(Duration::from_secs(3))
        .build()?;
    let mut contenders = Vec::new();
    for name in ["alpha", "beta", "gamma"] {
        let campaign = manager
            .leader_election("scheduler")?
            .spawn(move |lease| async move {
                // The leader's work. It is stopped (this future is dropped) as soon
                // as the lock is lost; pass the fence to whatever it writes.
                loop {
                    println!("{name} leads (fence {})", lease.fence());
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            });
        contenders.push((name, campaign));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(i) = contenders.iter().position(|(_, c)| c.is_leader()) else {
            continue;
        };
        let (name, leader) = contenders.remove(i);
        println!("{name} shuts down");
        leader.shutdown().await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (_, campaign) in contenders {
        campaign.shutdown().await?;
    }
    Ok(())
}
