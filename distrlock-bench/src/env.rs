//! [`Env`]: one database server (or SQLite file) the scenarios run against.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use distrlock_core::LockBackend;

use crate::proxy::Wire;
use crate::workload::{Cycle, Waiter};

/// Who issues the statements of a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// distrlock: `LockManager` on the backend.
    Library,
    /// The backend's own SQL text through the raw driver, one connection per
    /// client, no state machine.
    Raw,
    /// The Go original's statement sequence through the raw driver.
    Go,
    /// The server's native lock: PostgreSQL advisory locks, MariaDB `GET_LOCK`.
    Native,
}

impl Variant {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Variant::Library => "distrlock",
            Variant::Raw => "raw driver",
            Variant::Go => "Go sequence",
            Variant::Native => "native",
        }
    }
}

/// Where the library's connections go.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Connect {
    pub(crate) pool_size: usize,
    /// Release notifications (PostgreSQL LISTEN); ignored elsewhere.
    pub(crate) listen: bool,
    /// Connect through this counting proxy instead of directly.
    pub(crate) via: Option<SocketAddr>,
}

/// One database the scenarios run against.
#[async_trait]
pub(crate) trait Env: Send + Sync {
    /// `postgres`, `mariadb`, `sqlite`.
    fn name(&self) -> &'static str;
    /// The name of the native lock, if the database has one.
    fn native_name(&self) -> Option<&'static str>;
    /// The server's address and wire protocol, for a counting proxy.
    fn upstream(&self) -> Option<(SocketAddr, Wire)>;
    /// Version and durability settings, for the report.
    async fn describe(&self) -> anyhow::Result<BTreeMap<String, String>>;
    /// Creates `table` empty (dropping an old one).
    async fn reset_table(&self, table: &str) -> anyhow::Result<()>;
    /// Drops `table`.
    async fn drop_table(&self, table: &str) -> anyhow::Result<()>;
    /// Adds released rows to `table` until it holds `rows` rows.
    async fn fill(&self, table: &str, rows: u64) -> anyhow::Result<()>;
    /// A library backend on `table`.
    async fn backend(&self, table: &str, connect: Connect) -> anyhow::Result<Arc<dyn LockBackend>>;
    /// `n` clients of `variant` (not `Library`) for the uncontended cycle.
    async fn cycles(
        &self,
        variant: Variant,
        table: &str,
        n: usize,
    ) -> anyhow::Result<Vec<Box<dyn Cycle>>>;
    /// `n` waiters of the native lock on `key`.
    async fn native_waiters(&self, key: &str, n: usize) -> anyhow::Result<Vec<Box<dyn Waiter>>>;
    /// The server's own statement counters (cumulative), where it has them.
    async fn server_counters(&self) -> anyhow::Result<BTreeMap<String, u64>>;
    /// How many more connections the server accepts now, where it limits them.
    async fn free_connections(&self) -> anyhow::Result<Option<usize>> {
        Ok(None)
    }
}

/// A stable 64-bit hash of a key, for native locks that take integers.
pub(crate) fn key_hash(key: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key.as_bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}
