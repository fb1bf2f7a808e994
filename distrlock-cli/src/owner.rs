//! Default owner texts: who holds a lock, as `status` shows it.

use distrlock_core::MAX_OWNER_LEN;

/// `HOST:PID PROGRAM`, cut to the longest owner text a backend stores.
pub(crate) fn default_owner(pid: u32, program: &str) -> String {
    let program = program.rsplit('/').next().unwrap_or(program);
    let mut owner = if program.is_empty() {
        format!("{}:{pid}", host_name())
    } else {
        format!("{}:{pid} {program}", host_name())
    };
    owner.retain(|c| c != '\0');
    if owner.len() > MAX_OWNER_LEN {
        let mut cut = MAX_OWNER_LEN;
        while !owner.is_char_boundary(cut) {
            cut -= 1;
        }
        owner.truncate(cut);
    }
    owner
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| read_trimmed("/proc/sys/kernel/hostname"))
        .or_else(|| read_trimmed("/etc/hostname"))
        .map_or_else(|| "localhost".to_owned(), |h| h.trim().to_owned())
}

fn read_trimmed(path: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_host_pid_and_program_within_the_limit() {
        let owner = default_owner(42, "/usr/local/bin/backup.sh");
        assert!(owner.ends_with(":42 backup.sh"), "{owner}");
        let long = default_owner(1, &"€".repeat(200));
        assert!(long.len() <= MAX_OWNER_LEN);
    }
}
