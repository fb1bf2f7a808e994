//! The default owner text, `host:pid`, and its validation.

use crate::backend::MAX_OWNER_LEN;
use crate::error::{Error, Result};

/// `host:pid` of this process, for the `owner` column.
pub(crate) fn default_owner() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| read_trimmed("/proc/sys/kernel/hostname"))
        .or_else(|| read_trimmed("/etc/hostname"))
        .unwrap_or_else(|| "localhost".to_owned());
    let mut owner = format!("{}:{}", host.trim(), std::process::id());
    truncate_to_boundary(&mut owner, MAX_OWNER_LEN);
    owner.retain(|c| c != '\0');
    owner
}

/// Checks an owner text given by the user.
pub(crate) fn validate_owner(owner: &str) -> Result<()> {
    if owner.len() > MAX_OWNER_LEN {
        return Err(Error::InvalidConfig {
            reason: format!("owner text is at most {MAX_OWNER_LEN} bytes"),
        });
    }
    if owner.contains('\0') {
        return Err(Error::InvalidConfig {
            reason: "owner text must not contain NUL".into(),
        });
    }
    Ok(())
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn truncate_to_boundary(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_owner_is_host_and_pid() {
        let owner = default_owner();
        assert!(owner.ends_with(&format!(":{}", std::process::id())));
        assert!(validate_owner(&owner).is_ok());
    }

    #[test]
    fn refuses_long_or_nul_owner() {
        assert!(validate_owner(&"x".repeat(256)).is_err());
        assert!(validate_owner("a\0b").is_err());
        assert!(validate_owner("").is_ok());
    }
}
