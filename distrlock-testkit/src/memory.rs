//! [`MemoryHarness`]: runs the conformance suite on core's in-memory backend.

use std::sync::Arc;

use async_trait::async_trait;
use distrlock_core::MemoryBackend;

use crate::harness::{Faults, Harness, Setup, Skip, Unsupported};

/// A fresh [`MemoryBackend`] per case, with the `make_unreachable` hook.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryHarness;

#[async_trait]
impl Harness for MemoryHarness {
    async fn setup(&self) -> Result<Setup, Skip> {
        let backend = Arc::new(MemoryBackend::new());
        Ok(Setup::with_faults(
            backend.clone(),
            Arc::new(MemoryFaults(backend)),
        ))
    }
}

struct MemoryFaults(Arc<MemoryBackend>);

#[async_trait]
impl Faults for MemoryFaults {
    async fn make_unreachable(&self) -> Result<(), Unsupported> {
        self.0.set_unreachable(true);
        Ok(())
    }

    async fn restore(&self) -> Result<(), Unsupported> {
        self.0.set_unreachable(false);
        Ok(())
    }
}
