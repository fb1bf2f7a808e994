//! Waiting for worker processes.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits until `child` exits by itself, polling every 100 ms without blocking
/// the runtime; past `deadline` it is killed as hung, and `None` is returned.
pub async fn wait_or_kill(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
