//! The whole conformance suite against core's in-memory backend, through
//! `Arc<dyn LockBackend>`.
//!
//! The memory backend has no table and no server sessions, so
//! `missing_table_gives_schema_missing` and `killed_sessions_are_recovered` are
//! reported as ignored: `tests/mutants.rs` runs them on a reference backend that
//! has both.

use distrlock_testkit::MemoryHarness;

distrlock_testkit::conformance_tests!(
    MemoryHarness,
    supports = [unreachable, release_notifications, fair_order]
);
