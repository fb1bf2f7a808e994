//! The whole conformance suite against core's in-memory backend, through
//! `Arc<dyn LockBackend>`.

use distrlock_testkit::MemoryHarness;

distrlock_testkit::conformance_tests!(MemoryHarness);
