#![doc = include_str!("../README.md")]

mod backend;
mod clock;
mod driver_error;
mod sql;
mod worker;

pub use backend::{SqliteBackend, SqliteBackendBuilder};

/// Re-exported so users name the same driver version.
pub use rusqlite;
