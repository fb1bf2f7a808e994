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

/// RFC 3339 in UTC with milliseconds, e.g. `2026-01-02T03:04:05.678Z`.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn unix_ms(t: SystemTime) -> Option<u128> {
    t.duration_since(UNIX_EPOCH).ok().map(|d| d.as_millis())
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
        "expires_at_unix_ms": info.expires_at.and_then(unix_ms),
        "remaining_ms": info.remaining.map(|r| r.as_millis()),
    })
}

/// What the "time left" column says.
pub(crate) fn time_left(info: &LockInfo, now: SystemTime) -> String {
    match info.state {
        LockState::Held => info
            .remaining
            .map_or_else(|| "?".to_owned(), |r| format!("{} left", short_duration(r))),
        LockState::Expired => match info.expires_at.and_then(|at| now.duration_since(at).ok()) {
            Some(ago) => format!("expired {} ago", short_duration(ago)),
            None => "expired".to_owned(),
        },
        LockState::Released => "-".to_owned(),
    }
}

/// The `status` table: one row per lock, columns aligned.
pub(crate) fn lock_table(locks: &[LockInfo], now: SystemTime) -> String {
    let header = ["KEY", "STATE", "OWNER", "FENCE", "TIME LEFT", "ACQUIRED AT"].map(String::from);
    let mut rows = vec![header];
    for info in locks {
        rows.push([
            info.key.as_str().escape_debug().to_string(),
            info.state.to_string(),
            info.owner.escape_debug().to_string(),
            info.fence.to_string(),
            time_left(info, now),
            humantime::format_rfc3339_seconds(info.acquired_at).to_string(),
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
}
