#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod busy;
mod clock;
mod config;
mod driver_error;
mod file;
mod lock_backend;
#[cfg(feature = "serde")]
mod settings;
mod sql;
mod wake;
mod worker;

pub use backend::SqliteBackend;
#[doc(hidden)]
pub use clock::{HostClock as LeaseClock, Now as LeaseNow};
pub use config::{SqliteConfig, SqliteConfigBuilder};
#[doc(hidden)]
pub use sql::LockSql;

/// Re-exported so users name the same driver version.
pub use rusqlite;
