#![doc = include_str!("../README.md")]

mod backend;
mod error;
mod exclusive;
mod fence;
mod guard;
mod key;
mod lease;
mod lock;
mod manager;
mod memory;
mod notify;
mod owner;
mod renewal;
mod retry;
pub mod server_clock;
mod suspend;
mod table;
mod token;
mod ttl;

pub use backend::{
    AcquireOutcome, LockBackend, LockInfo, LockState, MAX_EXTEND_BATCH, MAX_OWNER_LEN,
};
pub use error::{BoxError, Error, Result};
pub use exclusive::ExclusiveError;
pub use fence::Fence;
pub use guard::LockGuard;
pub use key::LockKey;
pub use lease::Lease;
pub use lock::Lock;
pub use manager::{LockManager, LockManagerBuilder};
pub use memory::MemoryBackend;
pub use notify::{ReleaseNotifier, ReleaseSubscription};
pub use retry::RetryPolicy;
pub use table::TableName;
pub use token::Token;
pub use ttl::Ttl;

/// Re-exported so backends and users name the same version.
pub use async_trait::async_trait;

/// The workspace README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadmeDoctests;
