//! A runnable tour of the MySQL/MariaDB backend.
//!
//! ```text
//! cargo run -p distrlock-mysql --example mysql_lock -- mysql://root@127.0.0.1:3306/test
//! ```
//!
//! The URL comes from the first argument, else `DISTRLOCK_TEST_MYSQL_URL`, else
//! `mysql://root@127.0.0.1:3306/test`. It creates the table
//! `distrlock_example` if needed, then takes and releases a few locks.

use std::sync::Arc;
use std::time::Duration;

use distrlock_core::{Error, LockBackend, LockManager};
use distrlock_mysql::{MySqlBackend, MySqlConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let url = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("DISTRLOCK_TEST_MYSQL_URL").ok())
        .unwrap_or_else(|| "mysql://root@127.0.0.1:3306/test".to_owned());

    let config = MySqlConfig::builder()
        .url(url)
        .table("distrlock_example")
        .pool_size(4)
        .lock_timeout(Duration::from_secs(1))
        .build()?;
    let backend = MySqlBackend::from_config(config).await?;
    backend.create_table().await?;
    println!("using {backend:?}");

    let manager = LockManager::builder(Arc::new(backend.clone()))
        .ttl(Duration::from_secs(10))
        .owner(format!("mysql_lock example, pid {}", std::process::id()))
        .build()?;

    // One instance at a time runs the closure; the lease is extended meanwhile.
    let fence = manager
        .do_exclusively("example/nightly-report", |lease| async move {
            println!("running the report with fence {}", lease.fence());
            tokio::time::sleep(Duration::from_millis(200)).await;
            lease.fence()
        })
        .await?;
    println!("report done (fence {fence})");

    // A guard held by hand: a second try is refused with the remaining lease.
    let lock = manager.lock("example/migrations")?;
    let guard = lock.acquire_timeout(Duration::from_secs(5)).await?;
    match lock.try_acquire().await {
        Err(Error::HeldByOther { remaining, .. }) => {
            println!("second try refused; the lease has {remaining:?} left")
        }
        other => println!("unexpected: {other:?}"),
    }
    if let Some(info) = backend.inspect(guard.key()).await? {
        println!(
            "{} is {} by {:?} with fence {}",
            info.key, info.state, info.owner, info.fence
        );
    }
    guard.release().await?;

    for info in backend.list().await? {
        if info.key.as_str().starts_with("example/") {
            println!("{:<24} {:<8} fence {}", info.key, info.state, info.fence);
        }
    }
    backend.disconnect().await
}
