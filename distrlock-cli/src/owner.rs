//! Default owner texts: who holds a lock, as `status` shows it.

use distrlock_core::Owner;

/// `HOST:PID PROGRAM`, cut to the longest owner text a backend stores.
pub(crate) fn default_owner(pid: u32, program: &str) -> String {
    let program = program.rsplit('/').next().unwrap_or(program);
    let host = Owner::host_name();
    let text = if program.is_empty() {
        format!("{host}:{pid}")
    } else {
        format!("{host}:{pid} {program}")
    };
    Owner::lossy(text).into_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_host_pid_and_program_within_the_limit() {
        let owner = default_owner(42, "/usr/local/bin/backup.sh");
        assert!(owner.ends_with(":42 backup.sh"), "{owner}");
        let long = default_owner(1, &"€".repeat(200));
        assert!(long.len() <= Owner::MAX_LEN);
    }
}
