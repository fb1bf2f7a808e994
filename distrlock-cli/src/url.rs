//! Database URLs: which backend, the default SQLite file, and redaction for
//! messages.

use std::fmt;
use std::path::{Path, PathBuf};

use distrlock_sqlite::SqliteConfig;

use crate::exit::CliError;

/// A parsed `--url`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum DbUrl {
    /// `postgres://…` or `postgresql://…`, as given.
    Postgres {
        /// The URL, with its TLS parameters (see `server.rs`).
        url: String,
        /// `--ca-file`.
        ca_file: Option<PathBuf>,
    },
    /// `mysql://…`, as given.
    MySql {
        /// The URL, with its TLS parameters (see `server.rs`).
        url: String,
        /// `--ca-file`.
        ca_file: Option<PathBuf>,
    },
    /// `sqlite://PATH`, or the per-user default file when `default` is set.
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Whether this is the default file (its directory is created).
        default: bool,
        /// `?allow_network_filesystem=true`.
        allow_network_filesystem: bool,
    },
}

impl DbUrl {
    /// The database the command line names: `--url` or `--url-file`'s URL
    /// (the command line's over the environment's `DISTRLOCK_URL` or
    /// `DISTRLOCK_URL_FILE`; both given the same way is a usage error), else the
    /// per-user SQLite file; `ca_file` is `--ca-file`, for server URLs.
    pub(crate) fn from_args(
        url: Option<&str>,
        url_file: Option<&Path>,
        ca_file: Option<&Path>,
    ) -> Result<Self, CliError> {
        let from_env = |name: &str, given: Option<&std::ffi::OsStr>| {
            given.is_some() && std::env::var_os(name).as_deref() == given
        };
        let url_in_env = from_env("DISTRLOCK_URL", url.map(std::ffi::OsStr::new));
        let file_in_env = from_env("DISTRLOCK_URL_FILE", url_file.map(Path::as_os_str));
        let use_file = match (url, url_file) {
            (Some(_), Some(_)) if url_in_env == file_in_env => {
                return Err(CliError::usage(if url_in_env {
                    "DISTRLOCK_URL and DISTRLOCK_URL_FILE are both set: unset one".to_owned()
                } else {
                    "--url and --url-file name the database twice: give one".to_owned()
                }));
            }
            // The command line's choice wins over the environment's.
            (Some(_), Some(_)) => url_in_env,
            (_, file) => file.is_some(),
        };
        let from_file;
        let url = match url_file.filter(|_| use_file) {
            Some(file) => {
                from_file = read_url_file(file)?;
                Some(from_file.as_str())
            }
            None => url,
        };
        let mut parsed = Self::from_arg(url)?;
        match &mut parsed {
            DbUrl::Postgres { ca_file: ca, .. } | DbUrl::MySql { ca_file: ca, .. } => {
                *ca = ca_file.map(Path::to_owned);
            }
            DbUrl::Sqlite { .. } => {}
        }
        Ok(parsed)
    }

    /// Parses `--url`, or picks the per-user SQLite file when there is none.
    pub(crate) fn from_arg(url: Option<&str>) -> Result<Self, CliError> {
        match url {
            None => Ok(DbUrl::Sqlite {
                path: default_sqlite_path()?,
                default: true,
                allow_network_filesystem: false,
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
            "postgres" | "postgresql" => Ok(DbUrl::Postgres {
                url: url.to_owned(),
                ca_file: None,
            }),
            "mysql" => Ok(DbUrl::MySql {
                url: url.to_owned(),
                ca_file: None,
            }),
            "sqlite" => {
                let usage = |e: distrlock_core::Error| {
                    CliError::usage(format!("--url {}: {e}", redact(url)))
                };
                // Checks the parameters; the config is made again at open.
                let config = SqliteConfig::builder().url(url).build().map_err(usage)?;
                let path = config.path().to_owned();
                Ok(DbUrl::Sqlite {
                    path,
                    default: false,
                    allow_network_filesystem: allows_network_filesystem(url),
                })
            }
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
            DbUrl::Postgres { url, .. } | DbUrl::MySql { url, .. } => f.write_str(&redact(url)),
            DbUrl::Sqlite {
                path,
                default,
                allow_network_filesystem,
            } => {
                write!(f, "sqlite://{}", path.display())?;
                if *allow_network_filesystem {
                    f.write_str("?allow_network_filesystem=true")?;
                }
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

/// Whether a `sqlite://` URL (already checked by the SQLite backend) says
/// `allow_network_filesystem=true` (or `1`, `yes`, `on`, or no value).
fn allows_network_filesystem(url: &str) -> bool {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    query.split('&').any(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, "true"));
        name == "allow_network_filesystem"
            && matches!(
                value.to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
    })
}

/// The URL in a `--url-file`: its first line that is neither empty nor a `#`
/// comment, without surrounding whitespace.
fn read_url_file(file: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| CliError::usage(format!("cannot read --url-file {}: {e}", file.display())))?;
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| {
            CliError::usage(format!(
                "--url-file {} holds no URL (one line: postgres://…, mysql://… or sqlite://PATH)",
                file.display()
            ))
        })
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
        if let Some(at) = out[start..authority_end].rfind('@').map(|i| start + i)
            && let Some(colon) = out[start..at].find(':').map(|i| start + i)
        {
            out.replace_range(colon + 1..at, "***");
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
            Ok(DbUrl::Postgres { .. })
        ));
        assert!(matches!(
            DbUrl::parse("mysql://u@h/db"),
            Ok(DbUrl::MySql { .. })
        ));
        assert_eq!(
            DbUrl::parse("sqlite:///tmp/a.db"),
            Ok(DbUrl::Sqlite {
                path: "/tmp/a.db".into(),
                default: false,
                allow_network_filesystem: false,
            })
        );
        let nfs = DbUrl::parse("sqlite:///mnt/nfs/a.db?allow_network_filesystem=true").unwrap();
        assert_eq!(
            nfs,
            DbUrl::Sqlite {
                path: "/mnt/nfs/a.db".into(),
                default: false,
                allow_network_filesystem: true,
            }
        );
        assert_eq!(
            nfs.to_string(),
            "sqlite:///mnt/nfs/a.db?allow_network_filesystem=true"
        );
        assert_eq!(DbUrl::parse("sqlite:///a.db?bogus=1").unwrap_err().code, 2);
        let err = DbUrl::parse("redis://:pw@host").unwrap_err();
        assert_eq!(err.code, 2);
        assert!(!err.message.contains("pw"), "{}", err.message);
        assert_eq!(DbUrl::parse("sqlite://").unwrap_err().code, 2);
        assert_eq!(DbUrl::parse("locks.db").unwrap_err().code, 2);
    }

    #[test]
    fn url_files_hold_one_url() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("url");
        std::fs::write(
            &file,
            "# the lock database

  postgres://app:hunter2@db/prod  
",
        )
        .unwrap();
        let url = DbUrl::from_args(None, Some(&file), None).unwrap();
        assert_eq!(url.to_string(), "postgres://app:***@db/prod");
        let twice = DbUrl::from_args(Some("mysql://u@h/x"), Some(&file), None).unwrap_err();
        assert_eq!(twice.code, 2, "{}", twice.message);
        std::fs::write(
            &file,
            "# nothing
",
        )
        .unwrap();
        assert_eq!(
            DbUrl::from_args(None, Some(&file), None).unwrap_err().code,
            2
        );
        let missing = DbUrl::from_args(None, Some(&dir.path().join("nope")), None).unwrap_err();
        assert_eq!(missing.code, 2);
        let ca = dir.path().join("ca.pem");
        match DbUrl::from_args(Some("postgres://u@h/d"), None, Some(&ca)).unwrap() {
            DbUrl::Postgres { ca_file, .. } => assert_eq!(ca_file.as_deref(), Some(ca.as_path())),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn display_hides_the_password() {
        let url = DbUrl::parse("postgres://app:hunter2@db/prod").unwrap();
        assert_eq!(url.to_string(), "postgres://app:***@db/prod");
        assert!(!format!("{url:?}").contains("hunter2"));
    }
}
