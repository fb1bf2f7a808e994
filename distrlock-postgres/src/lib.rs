#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod backend;
mod calls;
mod config;
mod connect;
mod error;
mod listener;
mod lock_backend;
mod prepared;
#[cfg(feature = "serde")]
mod settings;
mod sql;
#[cfg(feature = "tls")]
mod tls;

pub use backend::PostgresBackend;
pub use config::{Pooler, PostgresConfig, PostgresConfigBuilder};
#[doc(hidden)]
pub use sql::LockSql;
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use tls::{TlsConfig, TlsVerify};

/// Re-exported so users name the same driver version as the backend.
pub use deadpool_postgres;
/// Re-exported so users name the same driver version as the backend.
pub use tokio_postgres;
