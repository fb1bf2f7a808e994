//! `distrlock` against private PostgreSQL and MariaDB servers with TLS on (a
//! certificate from a throwaway test CA) and off: each TLS mode does what
//! libpq's does, and a failure says why in one line without the password.
//!
//! The servers are the testkit's throwaway ones, started from the installed
//! binaries; the tests skip loudly without them (and fail under
//! `DISTRLOCK_REQUIRE_DB=1`).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use distrlock_testkit::{ServerError, ThrowawayServer, skip};

const BIN: &str = env!("CARGO_BIN_EXE_distrlock");

/// A password that must never be printed. The servers trust every local
/// login, and TLS fails before any login where a test expects failure.
const PASSWORD: &str = "hunter2-never-shown";

fn started(test: &str, server: Result<ThrowawayServer, ServerError>) -> Option<ThrowawayServer> {
    match server {
        Ok(server) => Some(server),
        Err(error) => {
            skip(test, &error.to_string());
            None
        }
    }
}

/// `distrlock ARGS` with `url`, and nothing from this process's environment
/// that could change the connection.
fn distrlock(url: &str, args: &[&str], state: &Path) -> Output {
    let mut cmd = Command::new(BIN);
    for var in [
        "DISTRLOCK_URL_FILE",
        "DISTRLOCK_CA_FILE",
        "PGPASSWORD",
        "PGPASSFILE",
        "MYSQL_PWD",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.args(["--table", "distrlock_cli_tls"])
        .args(args)
        .env("DISTRLOCK_URL", url)
        .env("XDG_STATE_HOME", state)
        .env("HOME", state)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that `out` succeeded.
#[track_caller]
fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}, stderr: {}",
        out.status.code(),
        text(&out.stderr)
    );
}

/// Asserts that `out` failed with exit 69 and one line saying `needle`, without
/// the password.
#[track_caller]
fn unavailable(out: &Output, needle: &str, what: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{what}: {stderr}");
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{what}: one line: {stderr}"
    );
    assert!(
        stderr.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: should say {needle:?}: {stderr}"
    );
    assert!(
        !stderr.contains(PASSWORD),
        "{what}: the password is shown: {stderr}"
    );
    assert!(!text(&out.stdout).contains(PASSWORD), "{what}: on stdout");
}

fn psql() -> &'static str {
    if Path::new("/usr/bin/psql").is_file() {
        "/usr/bin/psql"
    } else {
        "psql"
    }
}

/// Whether the sessions of `distrlock run` are encrypted, as
/// `pg_stat_ssl` says while its command runs: `t`, `f`, or the error.
fn postgres_sessions_encrypted(server: &ThrowawayServer, url: &str, args: &[&str]) -> String {
    let state = tempfile::tempdir().unwrap();
    let port = server.port().to_string();
    let query = "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = 'distrlock-cli'";
    let mut all: Vec<&str> = args.to_vec();
    all.extend([
        "run",
        "--key",
        "tls-check",
        "--",
        psql(),
        "-h",
        "127.0.0.1",
        "-p",
        &port,
        "-U",
        "postgres",
        "-d",
        "test",
        "-X",
        "-Atc",
        query,
    ]);
    let out = distrlock(url, &all, state.path());
    if out.status.success() {
        text(&out.stdout).trim().to_owned()
    } else {
        format!("exit {:?}: {}", out.status.code(), text(&out.stderr))
    }
}

#[test]
fn postgres_tls_modes_against_a_server_with_a_test_ca() {
    let test = "postgres_tls_modes_against_a_server_with_a_test_ca";
    let Some(server) = started(test, ThrowawayServer::postgres_with_tls()) else {
        return;
    };
    let tls = server.tls().unwrap().clone();
    let ca = tls.ca.display().to_string();
    let other = tls.other_ca.display().to_string();
    let state = tempfile::tempdir().unwrap();
    let base = format!("postgres://postgres@127.0.0.1:{}/test", server.port());
    ok(&distrlock(&base, &["init"], state.path()), "init");

    // No sslmode: prefer, which encrypts (the certificate is not verified: a
    // self-signed one, like Debian's snakeoil, is fine on loopback).
    assert_eq!(
        postgres_sessions_encrypted(&server, &base, &[]),
        "t",
        "prefer"
    );
    let url = format!("{base}?sslmode=require");
    assert_eq!(
        postgres_sessions_encrypted(&server, &url, &[]),
        "t",
        "require"
    );
    let url = format!("{base}?sslmode=disable");
    assert_eq!(
        postgres_sessions_encrypted(&server, &url, &[]),
        "f",
        "disable"
    );

    // Verified with the right CA, named three ways.
    let url = format!("{base}?sslmode=verify-full");
    assert_eq!(
        postgres_sessions_encrypted(&server, &url, &["--ca-file", &ca]),
        "t",
        "verify-full --ca-file"
    );
    let url = format!("{base}?sslmode=verify-full&sslrootcert={ca}");
    assert_eq!(
        postgres_sessions_encrypted(&server, &url, &[]),
        "t",
        "sslrootcert="
    );
    let url = format!("{base}?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}");
    assert_eq!(
        postgres_sessions_encrypted(&server, &url, &[]),
        "t",
        "VERIFY_IDENTITY"
    );
    let url = format!("{base}?sslmode=verify-ca&sslrootcert={ca}");
    ok(&distrlock(&url, &["status"], state.path()), "verify-ca");
    // verify-ca does not look at the name: reached under a name the
    // certificate does not have, it passes, and verify-full does not.
    let other_name = format!(
        "postgres://postgres:{PASSWORD}@not-in-the-certificate.invalid:{}/test?hostaddr=127.0.0.1&sslrootcert={ca}",
        server.port()
    );
    ok(
        &distrlock(
            &format!("{other_name}&sslmode=verify-ca"),
            &["status"],
            state.path(),
        ),
        "verify-ca under another name",
    );
    unavailable(
        &distrlock(
            &format!("{other_name}&sslmode=verify-full"),
            &["status"],
            state.path(),
        ),
        "not valid for name",
        "verify-full under another name",
    );

    // The wrong CA, or none (the bundled and system roots do not know the
    // test CA): refused, exit 69, one line, no password.
    let with_password = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/test",
        server.port()
    );
    for (args, url, what) in [
        (
            vec!["--ca-file", other.as_str()],
            format!("{with_password}?sslmode=verify-full"),
            "the wrong CA",
        ),
        (
            vec![],
            format!("{with_password}?sslmode=verify-ca&sslrootcert={other}"),
            "the wrong CA in the URL",
        ),
        (
            vec![],
            format!("{with_password}?sslmode=verify-full"),
            "the default roots",
        ),
    ] {
        let mut all = args.clone();
        all.push("status");
        let out = distrlock(&url, &all, state.path());
        unavailable(&out, "certificate is not trusted", what);
        assert!(
            text(&out.stderr).contains("***"),
            "the URL is shown redacted"
        );
    }
}

#[test]
fn postgres_require_against_a_server_without_tls_fails() {
    let test = "postgres_require_against_a_server_without_tls_fails";
    let Some(server) = started(test, ThrowawayServer::postgres()) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let base = format!(
        "postgres://postgres:{PASSWORD}@127.0.0.1:{}/test",
        server.port()
    );
    // prefer falls back to a plain connection.
    ok(&distrlock(&base, &["init"], state.path()), "prefer");
    assert_eq!(
        postgres_sessions_encrypted(&server, &base, &[]),
        "f",
        "plain"
    );
    for mode in ["require", "verify-full", "verify-ca"] {
        let out = distrlock(&format!("{base}?sslmode={mode}"), &["status"], state.path());
        unavailable(&out, "offers no TLS", mode);
    }
}

/// The server's count of accepted TLS handshakes.
fn ssl_accepts(server: &ThrowawayServer) -> u64 {
    let row = server.sql("SHOW GLOBAL STATUS LIKE 'Ssl_accepts'").unwrap();
    row.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// How many TLS handshakes `distrlock status` made, less what the counting
/// itself costs.
fn mysql_handshakes(server: &ThrowawayServer, url: &str, args: &[&str]) -> Result<u64, String> {
    let state = tempfile::tempdir().unwrap();
    let a = ssl_accepts(server);
    let b = ssl_accepts(server);
    let counting = b - a;
    let mut all = args.to_vec();
    all.push("status");
    let out = distrlock(url, &all, state.path());
    let c = ssl_accepts(server);
    if !out.status.success() {
        return Err(format!(
            "exit {:?}: {}",
            out.status.code(),
            text(&out.stderr)
        ));
    }
    Ok((c - b).saturating_sub(counting))
}

#[test]
fn mysql_tls_modes_against_a_server_with_a_test_ca() {
    let test = "mysql_tls_modes_against_a_server_with_a_test_ca";
    let Some(server) = started(test, ThrowawayServer::mariadb_with_tls()) else {
        return;
    };
    let tls = server.tls().unwrap().clone();
    let ca = tls.ca.display().to_string();
    let other = tls.other_ca.display().to_string();
    let state = tempfile::tempdir().unwrap();
    let base = format!("mysql://root@127.0.0.1:{}/test", server.port());
    ok(&distrlock(&base, &["init"], state.path()), "init");

    assert!(
        mysql_handshakes(&server, &base, &[]).unwrap() >= 1,
        "prefer encrypts"
    );
    for url in [
        format!("{base}?ssl-mode=REQUIRED"),
        format!("{base}?sslmode=require"),
        format!("{base}?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}"),
        format!("{base}?sslmode=verify-full&sslrootcert={ca}"),
    ] {
        assert!(mysql_handshakes(&server, &url, &[]).unwrap() >= 1, "{url}");
    }
    let url = format!("{base}?ssl-mode=VERIFY_IDENTITY");
    assert!(mysql_handshakes(&server, &url, &["--ca-file", &ca]).unwrap() >= 1);
    let url = format!("{base}?ssl-mode=DISABLED");
    assert_eq!(mysql_handshakes(&server, &url, &[]).unwrap(), 0, "DISABLED");

    let with_password = format!("mysql://root:{PASSWORD}@127.0.0.1:{}/test", server.port());
    for (args, url, what) in [
        (
            vec!["--ca-file", other.as_str()],
            format!("{with_password}?ssl-mode=VERIFY_IDENTITY"),
            "the wrong CA",
        ),
        (
            vec![],
            format!("{with_password}?ssl-mode=VERIFY_CA&ssl-ca={other}"),
            "the wrong CA in the URL",
        ),
        (
            vec![],
            format!("{with_password}?ssl-mode=VERIFY_IDENTITY"),
            "the default roots",
        ),
    ] {
        let mut all = args.clone();
        all.push("status");
        unavailable(
            &distrlock(&url, &all, state.path()),
            "certificate is not trusted",
            what,
        );
    }
}

#[test]
fn mysql_require_against_a_server_without_tls_fails() {
    let test = "mysql_require_against_a_server_without_tls_fails";
    let Some(server) = started(test, ThrowawayServer::mariadb()) else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let base = format!("mysql://root@127.0.0.1:{}/test", server.port());
    // PREFERRED (the default) falls back to a plain connection.
    ok(&distrlock(&base, &["init"], state.path()), "prefer");
    ok(
        &distrlock(
            &format!("{base}?ssl-mode=PREFERRED"),
            &["status"],
            state.path(),
        ),
        "PREFERRED",
    );
    let with_password = format!("mysql://root:{PASSWORD}@127.0.0.1:{}/test", server.port());
    for mode in ["REQUIRED", "VERIFY_CA", "VERIFY_IDENTITY"] {
        let out = distrlock(
            &format!("{with_password}?ssl-mode={mode}"),
            &["status"],
            state.path(),
        );
        unavailable(&out, "offers no TLS", mode);
    }
}
