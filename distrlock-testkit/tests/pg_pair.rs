//! `PostgresPair`: an asynchronous standby that lags behind a frozen
//! replication proxy really loses the primary's last commits when it is
//! promoted, and a synchronous one loses nothing. The failover tests rely on
//! both.

use distrlock_testkit::{PostgresPair, skip};

fn started(test: &str) -> Option<PostgresPair> {
    match PostgresPair::start() {
        Ok(pair) => Some(pair),
        Err(error) => {
            skip(test, &error.to_string());
            None
        }
    }
}

#[test]
fn a_lagging_async_standby_loses_the_last_commit_when_promoted() {
    let test = "a_lagging_async_standby_loses_the_last_commit_when_promoted";
    let Some(mut pair) = started(test) else {
        return;
    };
    let primary = pair.primary();
    primary
        .sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .unwrap();
    pair.wait_caught_up().unwrap();
    assert_eq!(pair.standby().sql("SELECT count(*) FROM t").unwrap(), "1");
    assert_eq!(pair.standby_timeline().unwrap(), 1);
    assert!(
        pair.standby().sql("INSERT INTO t VALUES (9)").is_err(),
        "a standby is read-only"
    );

    pair.replication_proxy().freeze();
    pair.primary().sql("INSERT INTO t VALUES (2)").unwrap();
    assert_eq!(pair.primary().sql("SELECT count(*) FROM t").unwrap(), "2");
    pair.kill_primary();
    assert!(
        pair.primary().sql("SELECT 1").is_err(),
        "the primary is dead"
    );
    pair.promote().unwrap();

    assert_eq!(
        pair.standby().sql("SELECT count(*) FROM t").unwrap(),
        "1",
        "the commit made while replication was frozen is lost"
    );
    assert_eq!(pair.standby_timeline().unwrap(), 2, "a new timeline");
    pair.standby().sql("INSERT INTO t VALUES (3)").unwrap();
}

#[test]
fn a_synchronous_standby_keeps_every_commit_when_promoted() {
    let test = "a_synchronous_standby_keeps_every_commit_when_promoted";
    let Some(mut pair) = started(test) else {
        return;
    };
    pair.make_synchronous().unwrap();
    pair.primary()
        .sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        .unwrap();
    // No wait_caught_up: the commit returned only once the standby had it.
    pair.kill_primary();
    pair.promote().unwrap();
    assert_eq!(pair.standby().sql("SELECT count(*) FROM t").unwrap(), "1");
}
