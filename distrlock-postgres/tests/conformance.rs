//! The whole distrlock conformance suite against the real PostgreSQL server
//! (`DISTRLOCK_TEST_POSTGRES_URL`), through `Arc<dyn LockBackend>`.
//!
//! `killed_sessions_are_recovered` kills this backend's sessions with
//! `pg_terminate_backend`; `unreachable_backend_loses_lock_by_deadline` skips (the
//! harness cannot cut the network to a shared server; a later issue adds a fault
//! proxy on throwaway servers).

mod common;

distrlock_testkit::conformance_tests!(common::PostgresHarness);
