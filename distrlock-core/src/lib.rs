#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backend;
mod error;
mod exclusive;
mod fence;
mod guard;
mod key;
mod leader;
mod lease;
pub mod line;
mod lock;
mod loss;
mod manager;
mod memory;
pub mod metrics;
mod notify;
mod owner;
mod renewal;
mod retry;
#[cfg(feature = "serde")]
mod serde_impls;
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
pub use leader::{LeaderElection, Leadership};
pub use lease::Lease;
pub use line::{Place, Ticket, WaiterAnswer};
pub use lock::Lock;
pub use loss::LossReason;
pub use manager::{LockManager, LockManagerBuilder};
pub use memory::MemoryBackend;
pub use notify::{ReleaseNotifier, ReleaseSubscription};
pub use owner::Owner;
pub use retry::RetryPolicy;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub use serde_impls::duration as serde_duration;
#[cfg(feature = "serde")]
#[cfg_attr(docsrs, doc(cfg(feature = "serde")))]
pub use serde_impls::option_duration as serde_option_duration;
pub use table::TableName;
pub use token::Token;
pub use ttl::Ttl;

/// Re-exported so backends and users name the same version.
pub use async_trait::async_trait;

/// The workspace README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadmeDoctests;
