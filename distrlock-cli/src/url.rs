//! Database URLs: which backend, the default SQLite file, and redaction for
//! messages.

use std::fmt;
use std::path::PathBuf;

use distrlock_sqlite::SqliteBackend;

use crate::exit::CliError;

/// A parsed `--url`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum DbUrl {
    /// `postgres://…` or `postgresql://…`, as given.
    Postgres(String),
    /// `mysql://…`, as given.
    MySql(String),
    /// `sqlite://PATH`, or the per-user default file when `default` is set.
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Whether this is the default file (its directory is created).
        default: bool,
    },
}

impl DbUrl {
    /// Parses `--url`, or picks the per-user SQLite file when there is none.
    pub(crate) fn from_arg(url: Option<&str>) -> Result<Self, CliError> {
        match url {
            None => Ok(DbUrl::Sqlite {
                path: default_sqlite_path()?,
                default: true,
            }),
            Some(url) => Self::parse(url),
        }
    }

    fn parse(url: &str) -> Result<Self, CliError> {
        let scheme = match url.split_once(':') {
            Some((scheme, _)) if !scheme.is_empty() => scheme.to_ascii_lowercase(),
            _ => {
                return Err(CliError::usage(format!(
                    "--url {}: not a URL; use postgres://…, mysql://… or sqlite://PATH",
                    redact(url)
                )));
            }
        };
        match scheme.as_str() {
            "postgres" | "postgresql" => Ok(DbUrl::Postgres(url.to_owned())),
            "mysql" => Ok(DbUrl::MySql(url.to_owned())),
            "sqlite" => SqliteBackend::path_from_url(url)
                .map(|path| DbUrl::Sqlite {
                    path,
                    default: false,
                })
                .map_err(|e| CliError::usage(format!("--url {}: {e}", redact(url)))),
            other => Err(CliError::usage(format!(
                "--url {}: unsupported scheme {other:?}; use postgres://, mysql:// or sqlite://PATH",
                redact(url)
            ))),
        }
    }
}

/// Shows the URL with any password replaced by `***`.
impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DbUrl::Postgres(url) | DbUrl::MySql(url) => f.write_str(&redact(url)),
            DbUrl::Sqlite { path, default } => {
                write!(f, "sqlite://{}", path.display())?;
                if *default {
                    f.write_str(" (the default per-user file)")?;
                }
                Ok(())
            }
        }
    }
}

/// Never prints the password.
impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

/// `$XDG_STATE_HOME/distrlock/locks.db`, or the platform's equivalent: one file
/// per user, so that every shell of the user contends for the same locks.
fn default_sqlite_path() -> Result<PathBuf, CliError> {
    let base = dirs::state_dir()
        // macOS and Windows have no state directory; their local data directory
        // plays the same role.
        .or_else(dirs::data_local_dir)
        .or_else(|| dirs::home_dir().map(|home| home.join(".local").join("state")))
        .ok_or_else(|| {
            CliError::unavailable(
                "cannot find a per-user state directory for the default SQLite file (is HOME \
                 set?); pass --url sqlite:///path/to/locks.db"
                    .to_owned(),
            )
        })?;
    Ok(base.join("distrlock").join("locks.db"))
}

/// `url` with the password of `scheme://user:password@host` and any
/// `password=` query parameter replaced by `***`.
pub(crate) fn redact(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let authority_end = out[start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| start + i);
        // The last '@' of the authority ends the user info (a password may contain '@').
        if let Some(at) = out[start..authority_end].rfind('@').map(|i| start + i) {
            if let Some(colon) = out[start..at].find(':').map(|i| start + i) {
                out.replace_range(colon + 1..at, "***");
            }
        }
    }
    if let Some(query) = out.find('?') {
        let (head, tail) = out.split_at(query + 1);
        let redacted: Vec<String> = tail
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if name.eq_ignore_ascii_case("password") => {
                    format!("{name}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        out = format!("{head}{}", redacted.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_in_user_info_and_query() {
        assert_eq!(
            redact("postgres://app:s3cr%40t@db:5432/prod"),
            "postgres://app:***@db:5432/prod"
        );
        assert_eq!(
            redact("mysql://root:p@ss@localhost/test"),
            "mysql://root:***@localhost/test"
        );
        assert_eq!(
            redact("postgres://app@db/prod?sslmode=require&password=hunter2"),
            "postgres://app@db/prod?sslmode=require&password=***"
        );
        assert_eq!(
            redact("postgres://db/prod?user=a:b@c"),
            "postgres://db/prod?user=a:b@c"
        );
        assert_eq!(redact("sqlite:///tmp/x.db"), "sqlite:///tmp/x.db");
    }

    #[test]
    fn picks_the_backend_by_scheme() {
        assert!(matches!(
            DbUrl::parse("postgresql://u@h/db"),
            Ok(DbUrl::Postgres(_))
        ));
        assert!(matches!(
            DbUrl::parse("mysql://u@h/db"),
            Ok(DbUrl::MySql(_))
        ));
        assert_eq!(
            DbUrl::parse("sqlite:///tmp/a.db"),
            Ok(DbUrl::Sqlite {
                path: "/tmp/a.db".into(),
                default: false
            })
        );
        let err = DbUrl::parse("redis://:pw@host").unwrap_err();
        assert_eq!(err.code, 2);
        assert!(!err.message.contains("pw"), "{}", err.message);
        assert_eq!(DbUrl::parse("sqlite://").unwrap_err().code, 2);
        assert_eq!(DbUrl::parse("locks.db").unwrap_err().code, 2);
    }

    #[test]
    fn display_hides_the_password() {
        let url = DbUrl::parse("postgres://app:hunter2@db/prod").unwrap();
        assert_eq!(url.to_string(), "postgres://app:***@db/prod");
        assert!(!format!("{url:?}").contains("hunter2"));
    }
}
