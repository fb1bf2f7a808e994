//! Passwords kept out of argv: `PGPASSWORD`, `PGPASSFILE` (and `~/.pgpass`),
//! `MYSQL_PWD`, `--url-file` and `DISTRLOCK_URL`, against throwaway servers
//! that need a password (skipping loudly without them, failing under
//! `DISTRLOCK_REQUIRE_DB=1`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use distrlock_testkit::{ServerError, ThrowawayServer, skip};

const BIN: &str = env!("CARGO_BIN_EXE_distrlock");

fn started(test: &str, server: Result<ThrowawayServer, ServerError>) -> Option<ThrowawayServer> {
    match server {
        Ok(server) => Some(server),
        Err(error) => {
            skip(test, &error.to_string());
            None
        }
    }
}

/// `distrlock ARGS` with only the environment given here (and PATH), HOME
/// and the state directory in `home`.
fn distrlock(home: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .env("XDG_STATE_HOME", home.join("state"))
        .env("DISTRLOCK_TABLE", "distrlock_cli_secrets");
    for (name, value) in env {
        cmd.env(name, value);
    }
    cmd.args(args).stdin(Stdio::null()).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[track_caller]
fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}",
        out.status.code(),
        text(&out.stderr)
    );
}

/// Asserts a failed login: exit 69, without `secret` in the output.
#[track_caller]
fn refused(out: &Output, secret: &str, what: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{what}: {stderr}");
    assert!(
        !stderr.contains(secret),
        "{what}: the password is shown: {stderr}"
    );
}

fn write_private(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn postgres_passwords_from_pgpassword_and_the_password_file() {
    let test = "postgres_passwords_from_pgpassword_and_the_password_file";
    let password = "s3cr:et pw";
    let Some(server) = started(test, ThrowawayServer::postgres_with_password(password)) else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let port = server.port().to_string();
    let url = format!("postgres://postgres@127.0.0.1:{port}/test");
    let with_url = |env: &[(&str, &str)], args: &[&str]| {
        let mut all = vec![("DISTRLOCK_URL", url.as_str())];
        all.extend_from_slice(env);
        distrlock(home, &all, args)
    };

    refused(&with_url(&[], &["init"]), password, "no password anywhere");
    ok(
        &with_url(&[("PGPASSWORD", password)], &["init"]),
        "PGPASSWORD",
    );
    refused(
        &with_url(&[("PGPASSWORD", "wrong-pw-not-shown")], &["status"]),
        "wrong-pw-not-shown",
        "a wrong PGPASSWORD",
    );
    // The URL's own password comes first.
    let encoded = format!("postgres://postgres:s3cr%3Aet%20pw@127.0.0.1:{port}/test");
    ok(
        &distrlock(
            home,
            &[("DISTRLOCK_URL", &encoded), ("PGPASSWORD", "wrong-pw")],
            &["status"],
        ),
        "the URL's password over PGPASSWORD",
    );

    // PGPASSFILE: `:` escaped, the first matching line wins.
    let passfile = home.join("pgpass");
    let lines = format!(
        "# host:port:database:user:password\n\
         otherhost:*:*:*:nope\n\
         127.0.0.1:{port}:test:postgres:s3cr\\:et pw\n\
         *:*:*:*:nope\n"
    );
    write_private(&passfile, &lines, 0o600);
    let passfile_str = passfile.to_str().unwrap();
    ok(
        &with_url(&[("PGPASSFILE", passfile_str)], &["status"]),
        "PGPASSFILE",
    );
    // One that others may read is ignored, as libpq does, with a warning.
    write_private(&passfile, &lines, 0o644);
    let out = with_url(&[("PGPASSFILE", passfile_str)], &["status"]);
    refused(&out, password, "a world-readable PGPASSFILE");
    assert!(
        text(&out.stderr).contains("group or world access"),
        "{}",
        text(&out.stderr)
    );
    // Without PGPASSFILE: ~/.pgpass.
    write_private(&home.join(".pgpass"), &lines, 0o600);
    ok(&with_url(&[], &["status"]), "~/.pgpass");
}

#[test]
fn mysql_password_from_mysql_pwd() {
    let test = "mysql_password_from_mysql_pwd";
    let Some(server) = started(test, ThrowawayServer::mariadb()) else {
        return;
    };
    let password = "my-s3cret pw";
    server
        .sql(&format!(
            "CREATE USER 'app'@'%' IDENTIFIED BY '{password}'; \
             GRANT ALL ON test.* TO 'app'@'%'"
        ))
        .unwrap();
    let home = tempfile::tempdir().unwrap();
    let url = format!("mysql://app@127.0.0.1:{}/test", server.port());
    let env = |extra: Option<&str>| {
        let mut env = vec![("DISTRLOCK_URL", url.clone())];
        if let Some(pw) = extra {
            env.push(("MYSQL_PWD", pw.to_owned()));
        }
        env
    };
    let run = |extra: Option<&str>, args: &[&str]| {
        let env = env(extra);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        distrlock(home.path(), &env, args)
    };
    refused(&run(None, &["init"]), password, "no password");
    ok(&run(Some(password), &["init"]), "MYSQL_PWD");
    refused(
        &run(Some("wrong-pw-not-shown"), &["status"]),
        "wrong-pw-not-shown",
        "a wrong MYSQL_PWD",
    );
}

#[test]
fn url_file_and_distrlock_url_keep_the_url_out_of_argv() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let db = home.join("from-file.db");
    let file = home.join("url");
    write_private(
        &file,
        &format!("# the lock database\nsqlite://{}\n", db.display()),
        0o600,
    );
    let file_str = file.to_str().unwrap();
    let shown = |out: &Output| text(&out.stdout).lines().next().unwrap_or("").to_owned();
    let expected = format!("database: sqlite://{}", db.display());

    let out = distrlock(home, &[], &["--url-file", file_str, "status"]);
    ok(&out, "--url-file");
    assert_eq!(shown(&out), expected);
    let out = distrlock(home, &[("DISTRLOCK_URL_FILE", file_str)], &["status"]);
    ok(&out, "DISTRLOCK_URL_FILE");
    assert_eq!(shown(&out), expected);
    // The command line wins over the environment.
    let other = format!("sqlite://{}", home.join("env.db").display());
    let out = distrlock(
        home,
        &[("DISTRLOCK_URL", &other)],
        &["--url-file", file_str, "status"],
    );
    assert_eq!(shown(&out), expected);
    let out = distrlock(home, &[("DISTRLOCK_URL", &other)], &["status"]);
    assert_eq!(shown(&out), format!("database: {other}"), "DISTRLOCK_URL");
    // Twice on the command line is a usage error.
    let out = distrlock(
        home,
        &[],
        &["--url", &other, "--url-file", file_str, "status"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));

    // A password in the file is never printed.
    write_private(
        &file,
        "postgres://app:file-pw-never-shown@127.0.0.1:1/app\n",
        0o600,
    );
    let out = distrlock(home, &[], &["--url-file", file_str, "status"]);
    refused(
        &out,
        "file-pw-never-shown",
        "an unreachable server from a URL file",
    );
    assert!(
        text(&out.stderr).contains("app:***@127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
    let out = distrlock(
        home,
        &[],
        &[
            "--url-file",
            &home.join("missing").display().to_string(),
            "status",
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
}

#[test]
fn help_tells_how_to_keep_passwords_out_of_argv() {
    let home = tempfile::tempdir().unwrap();
    let out = distrlock(home.path(), &[], &["--help"]);
    ok(&out, "--help");
    let help = text(&out.stdout);
    for needle in [
        "DISTRLOCK_URL",
        "--url-file",
        "DISTRLOCK_URL_FILE",
        "PGPASSWORD",
        "PGPASSFILE",
        "MYSQL_PWD",
        "--ca-file",
        "sslmode",
        "VERIFY_IDENTITY",
    ] {
        assert!(
            help.contains(needle),
            "--help should mention {needle}:\n{help}"
        );
    }
}
