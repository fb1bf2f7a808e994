//! The whole distrlock conformance suite against the real MySQL/MariaDB server
//! (`DISTRLOCK_TEST_MYSQL_URL`).

mod common;

use common::MySqlHarness;

distrlock_testkit::conformance_tests!(
    MySqlHarness,
    supports = [
        unreachable,
        kill_sessions,
        release_notifications,
        schema_missing,
        fair_order
    ]
);
