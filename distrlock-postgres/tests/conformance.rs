//! The whole distrlock conformance suite against the real PostgreSQL server
//! (`DISTRLOCK_TEST_POSTGRES_URL`), through `Arc<dyn LockBackend>`.
//!
//! `killed_sessions_are_recovered` kills this backend's sessions with
//! `pg_terminate_backend`; `unreachable_backend_loses_lock_by_deadline` stalls
//! the fault proxy the backend connects through.

mod common;

distrlock_testkit::conformance_tests!(
    common::PostgresHarness,
    supports = [
        unreachable,
        kill_sessions,
        release_notifications,
        schema_missing,
        fair_order
    ]
);
