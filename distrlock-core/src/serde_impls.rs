//! `serde` support (the `serde` feature), so that a service can load its lock
//! settings from its own config file and report lock states as JSON.
//!
//! Durations are written as humantime strings (`"30s"`, `"1m 30s"`, `"250ms"`)
//! and read from such strings or from a whole number of seconds; instants as
//! RFC 3339 strings in UTC. Values are validated as they are read: a key, ttl or
//! retry policy that its constructor would refuse is a deserialization error,
//! never a silently different value.

use std::time::{Duration, SystemTime};

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};

use crate::backend::{LockInfo, LockState};
use crate::fence::Fence;
use crate::key::LockKey;
use crate::owner::Owner;
use crate::retry::RetryPolicy;
use crate::token::Token;
use crate::ttl::Ttl;

/// A [`Duration`] in distrlock's format, for `#[serde(with = "…")]`: written
/// as a humantime string (`"30s"`, `"1m 30s"`, `"250ms"`), read from such a
/// string or from a whole number of seconds. The backends' configs use it, so
/// every duration in a config file reads the same way.
///
/// ```
/// use std::time::Duration;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Settings {
///     #[serde(with = "distrlock_core::serde_duration")]
///     wait: Duration,
/// }
///
/// let s: Settings = serde_json::from_str(r#"{"wait": "1m 30s"}"#).unwrap();
/// assert_eq!(s.wait, Duration::from_secs(90));
/// assert_eq!(serde_json::to_string(&s).unwrap(), r#"{"wait":"1m 30s"}"#);
/// ```
pub mod duration {
    use super::*;

    /// Writes `d` as a humantime string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads a humantime string or a whole number of seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Human(String),
            Seconds(u64),
        }
        match Text::deserialize(d)? {
            Text::Human(text) => humantime::parse_duration(&text)
                .map_err(|e| de::Error::custom(format!("invalid duration {text:?}: {e}"))),
            Text::Seconds(secs) => Ok(Duration::from_secs(secs)),
        }
    }
}

/// An optional [`Duration`] in the format of [`serde_duration`](crate::serde_duration),
/// `null` for none, for `#[serde(default, with = "…")]`.
pub mod option_duration {
    use super::*;

    /// Writes `d` as a humantime string, or `null`.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Reads what [`serde_duration`](crate::serde_duration) reads, or `null`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "duration")] Duration);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(d)| d))
    }
}

mod instant {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_rfc3339_micros(*at).to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&text)
            .map_err(|e| de::Error::custom(format!("invalid time {text:?}: {e}")))
    }
}

mod option_instant {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(
        at: &Option<SystemTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => instant::serialize(at, s),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<SystemTime>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "instant")] SystemTime);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|Wrapped(at)| at))
    }
}

impl Serialize for Owner {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Owner {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Owner::new(String::deserialize(d)?).map_err(de::Error::custom)
    }
}

impl Serialize for LockKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LockKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        LockKey::new(String::deserialize(d)?).map_err(de::Error::custom)
    }
}

impl Serialize for Fence {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(self.get())
    }
}

impl<'de> Deserialize<'de> for Fence {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Fence::new(i64::deserialize(d)?))
    }
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        duration::serialize(&self.get(), s)
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ttl::new(duration::deserialize(d)?).map_err(de::Error::custom)
    }
}

impl Serialize for LockState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for LockState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d)?.as_str() {
            "held" => Ok(LockState::Held),
            "expired" => Ok(LockState::Expired),
            "released" => Ok(LockState::Released),
            other => Err(de::Error::unknown_variant(
                other,
                &["held", "expired", "released"],
            )),
        }
    }
}

/// [`LockInfo`]'s fields, as written.
#[derive(Serialize, Deserialize)]
struct LockInfoFields {
    key: LockKey,
    owner: String,
    fence: Fence,
    #[serde(with = "instant")]
    acquired_at: SystemTime,
    #[serde(with = "option_instant")]
    expires_at: Option<SystemTime>,
    state: LockState,
    #[serde(with = "option_duration")]
    remaining: Option<Duration>,
}

impl Serialize for LockInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        LockInfoFields {
            key: self.key.clone(),
            owner: self.owner.clone(),
            fence: self.fence,
            acquired_at: self.acquired_at,
            expires_at: self.expires_at,
            state: self.state,
            remaining: self.remaining,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for LockInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = LockInfoFields::deserialize(d)?;
        Ok(LockInfo {
            key: f.key,
            owner: f.owner,
            fence: f.fence,
            acquired_at: f.acquired_at,
            expires_at: f.expires_at,
            state: f.state,
            remaining: f.remaining,
        })
    }
}

/// [`RetryPolicy`]'s settings, as written; every field may be left out.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryPolicyFields {
    #[serde(with = "duration", default = "default_initial")]
    initial_delay: Duration,
    #[serde(with = "duration", default = "default_max")]
    max_delay: Duration,
    #[serde(with = "option_duration", default)]
    deadline: Option<Duration>,
}

fn default_initial() -> Duration {
    RetryPolicy::default().initial_delay()
}

fn default_max() -> Duration {
    RetryPolicy::default().max_delay()
}

impl Serialize for RetryPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        RetryPolicyFields {
            initial_delay: self.initial_delay(),
            max_delay: self.max_delay(),
            deadline: self.deadline(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for RetryPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let f = RetryPolicyFields::deserialize(d)?;
        let policy = RetryPolicy::default()
            .with_initial_delay(f.initial_delay)
            .with_max_delay(f.max_delay)
            .with_deadline(f.deadline);
        policy.validate().map_err(de::Error::custom)?;
        Ok(policy)
    }
}
