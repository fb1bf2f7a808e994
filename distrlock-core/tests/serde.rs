//! With the `serde` feature: settings load from a config file's text and are
//! validated as they load; lock states round-trip as JSON.
#![cfg(feature = "serde")]

use std::time::Duration;

use distrlock_core::{LockInfo, LockKey, LockManager, MemoryBackend, RetryPolicy, Ttl};

#[test]
fn a_retry_policy_loads_from_humantime_text_and_is_validated() {
    let policy: RetryPolicy = serde_json::from_str(
        r#"{"initial_delay": "10ms", "max_delay": "2s", "deadline": "1m 30s"}"#,
    )
    .unwrap();
    assert_eq!(policy.initial_delay(), Duration::from_millis(10));
    assert_eq!(policy.max_delay(), Duration::from_secs(2));
    assert_eq!(policy.deadline(), Some(Duration::from_secs(90)));
    let defaults: RetryPolicy = serde_json::from_str("{}").unwrap();
    assert_eq!(defaults, RetryPolicy::default());
    let back: RetryPolicy = serde_json::from_str(&serde_json::to_string(&policy).unwrap()).unwrap();
    assert_eq!(back, policy);
    // Refused as the builder would refuse it, not silently changed.
    assert!(
        serde_json::from_str::<RetryPolicy>(r#"{"initial_delay": "5s", "max_delay": "1s"}"#)
            .is_err()
    );
    assert!(serde_json::from_str::<RetryPolicy>(r#"{"initial_delay": "soon"}"#).is_err());
    assert!(
        serde_json::from_str::<RetryPolicy>(r#"{"inital_delay": "1s"}"#).is_err(),
        "typos are errors"
    );
}

#[test]
fn keys_and_ttls_are_validated_as_they_load() {
    assert!(serde_json::from_str::<LockKey>(r#""""#).is_err());
    assert_eq!(
        serde_json::from_str::<LockKey>(r#""jobs/a""#)
            .unwrap()
            .as_str(),
        "jobs/a"
    );
    assert!(serde_json::from_str::<Ttl>(r#""0s""#).is_err());
    assert_eq!(
        serde_json::from_str::<Ttl>("30").unwrap().get(),
        Duration::from_secs(30)
    );
}

#[tokio::test(start_paused = true)]
async fn lock_info_round_trips_as_json() {
    let manager = LockManager::new(MemoryBackend::new());
    let guard = manager.lock("report").unwrap().try_acquire().await.unwrap();
    let info = manager
        .backend()
        .inspect(guard.key())
        .await
        .unwrap()
        .unwrap();
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["key"], "report");
    assert_eq!(json["state"], "held");
    assert_eq!(json["fence"], 1);
    let back: LockInfo = serde_json::from_value(json).unwrap();
    assert_eq!(back.key, info.key);
    assert_eq!(back.state, info.state);
    // Microsecond precision on the way through text.
    let delta = |a: std::time::SystemTime, b: std::time::SystemTime| {
        a.duration_since(b)
            .or_else(|e| Ok::<_, ()>(e.duration()))
            .unwrap()
    };
    assert!(delta(back.acquired_at, info.acquired_at) < Duration::from_micros(1));
    guard.release().await.unwrap();
}

#[test]
fn an_owner_round_trips_and_a_bad_one_is_refused() {
    use distrlock_core::Owner;
    let owner: Owner = serde_json::from_str(r#""report-job@host-a""#).unwrap();
    assert_eq!(owner.as_str(), "report-job@host-a");
    assert_eq!(
        serde_json::to_string(&owner).unwrap(),
        r#""report-job@host-a""#
    );
    let error = serde_json::from_str::<Owner>(r#""a\u0000b""#).unwrap_err();
    assert!(error.to_string().contains("NUL"), "{error}");
    let long = format!("\"{}\"", "x".repeat(256));
    assert!(serde_json::from_str::<Owner>(&long).is_err());
}
