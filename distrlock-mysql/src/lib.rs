#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod config;
mod connection;
mod error;
mod lock_backend;
mod parked;
#[cfg(feature = "serde")]
mod settings;
mod sql;

pub use backend::MySqlBackend;
pub use config::{MySqlConfig, MySqlConfigBuilder};
#[doc(hidden)]
pub use sql::LockSql;

/// The driver this backend is built on, re-exported so that your code names the
/// same version (for [`MySqlBackend::from_pool`], [`MySqlBackend::try_acquire_in`]
/// and [`MySqlConfigBuilder::opts`]).
pub use mysql_async;
