//! Formatting of times, locks and JSON for stdout.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use distrlock_core::{LockInfo, LockState};
use serde_json::{Value, json};

/// `850ms`, `12s`, `4m 3s`, `1h 30m`: whole seconds from one second up.
pub(crate) fn short_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    let rounded = if secs >= 3600 { secs - secs % 60 } else { secs };
    humantime::format_duration(Duration::from_secs(rounded)).to_string()
}

/// The first instant RFC 3339 (and humantime) cannot write: year 10000.
const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);

/// RFC 3339 in UTC with milliseconds, e.g. `2026-01-02T03:04:05.678Z`; a time
/// before 1970 or after 9999 (a row written by hand) as `unix:SECONDSs`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) if since < YEAR_10000 => humantime::format_rfc3339_millis(t).to_string(),
        _ => unix_text(t),
    }
}

/// Like [`rfc3339`], to the second.
pub(crate) fn rfc3339_seconds(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(since) if since < YEAR_10000 => humantime::format_rfc3339_seconds(t).to_string(),
        _ => unix_text(t),
    }
}

/// `unix:-2208988800s`: seconds from 1970, for any time.
fn unix_text(t: SystemTime) -> String {
    format!("unix:{}s", unix_ms(t) / 1000)
}

/// Milliseconds since 1970, negative before it.
pub(crate) fn unix_ms(t: SystemTime) -> i128 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => after.as_millis() as i128,
        Err(before) => -(before.duration().as_millis() as i128),
    }
}

/// The database server's clock at the moment of a `list` or `inspect`
/// answer, as far as its rows tell: a live row's end less its time left. None
/// when no row is live.
pub(crate) fn server_now(locks: &[LockInfo]) -> Option<SystemTime> {
    locks
        .iter()
        .filter(|info| info.is_live())
        .filter_map(|info| info.expires_at?.checked_sub(info.remaining?))
        .max()
}

/// One lock as JSON: the fields `status --json` prints.
pub(crate) fn lock_json(info: &LockInfo) -> Value {
    json!({
        "key": info.key.as_str(),
        "state": info.state.as_str(),
        "owner": info.owner,
        "fence": info.fence.get(),
        "acquired_at": rfc3339(info.acquired_at),
        "expires_at": info.expires_at.map(rfc3339),
        "expires_at_unix_ms": info.expires_at.map(unix_ms),
        "remaining_ms": info.remaining.map(|r| r.as_millis()),
    })
}

/// What the "time left" column says; `server_now` is the database's clock
/// (see [`server_now`]), never this host's: the two may differ by months.
pub(crate) fn time_left(info: &LockInfo, server_now: Option<SystemTime>) -> String {
    match info.state {
        LockState::Held => info
            .remaining
            .map_or_else(|| "?".to_owned(), |r| format!("{} left", short_duration(r))),
        LockState::Expired => match info
            .expires_at
            .zip(server_now)
            .and_then(|(at, now)| now.duration_since(at).ok())
        {
            Some(ago) => format!("expired {} ago", short_duration(ago)),
            None => "expired".to_owned(),
        },
        LockState::Released => "-".to_owned(),
    }
}

/// The `status` table: one row per lock, columns aligned, keys quoted (so
/// that `a` and `a ` differ).
pub(crate) fn lock_table(locks: &[LockInfo]) -> String {
    let now = server_now(locks);
    let header = ["KEY", "STATE", "OWNER", "FENCE", "TIME LEFT", "ACQUIRED AT"].map(String::from);
    let mut rows = vec![header];
    for info in locks {
        rows.push([
            format!("{:?}", info.key.as_str()),
            info.state.to_string(),
            info.owner.escape_debug().to_string(),
            info.fence.to_string(),
            time_left(info, now),
            rfc3339_seconds(info.acquired_at),
        ]);
    }
    let mut widths = [0usize; 6];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = w - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_naturally() {
        assert_eq!(short_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(short_duration(Duration::from_millis(12_400)), "12s");
        assert_eq!(short_duration(Duration::from_secs(243)), "4m 3s");
        assert_eq!(short_duration(Duration::from_secs(5_412)), "1h 30m");
    }

    #[test]
    fn any_time_can_be_written() {
        let before = UNIX_EPOCH - Duration::from_secs(2_208_988_800);
        assert_eq!(rfc3339(before), "unix:-2208988800s");
        let after = UNIX_EPOCH + YEAR_10000;
        assert_eq!(rfc3339_seconds(after), "unix:253402300800s");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn expired_ago_counts_on_the_servers_clock() {
        use distrlock_core::{Fence, LockKey};
        // The server is 248 days behind this host: only its clock counts.
        let server = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let row = |key: &str, state, expires_at: SystemTime, remaining| LockInfo {
            key: LockKey::new(key).unwrap(),
            owner: "o".into(),
            fence: Fence::new(1),
            acquired_at: expires_at - Duration::from_secs(30),
            expires_at: Some(expires_at),
            state,
            remaining,
        };
        let locks = [
            row(
                "live",
                LockState::Held,
                server + Duration::from_secs(20),
                Some(Duration::from_secs(20)),
            ),
            row(
                "old",
                LockState::Expired,
                server - Duration::from_secs(120),
                None,
            ),
        ];
        assert_eq!(server_now(&locks), Some(server));
        assert_eq!(time_left(&locks[1], server_now(&locks)), "expired 2m ago");
        assert_eq!(time_left(&locks[1], None), "expired");
        let table = lock_table(&locks);
        assert!(table.contains("\"live\""), "{table}");
    }
}
