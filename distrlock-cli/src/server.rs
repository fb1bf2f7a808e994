//! Server URLs as users write them: the TLS and CA parameters of libpq and the
//! mysql client, which the drivers do not all take, and passwords from the
//! environment and password files rather than the command line.
//!
//! The parameters are taken out of the URL here and turned into the drivers'
//! own settings; what is left goes to the driver as it is.

use std::path::{Path, PathBuf};

use crate::exit::CliError;
use crate::url::redact;

/// How a connection uses TLS, in libpq's terms (the mysql client's in
/// brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsMode {
    /// Never (`DISABLED`).
    Disable,
    /// When the server offers it, without verifying its certificate: the
    /// default (`PREFERRED`).
    Prefer,
    /// Always, without verifying the certificate (`REQUIRED`).
    Require,
    /// Always, with a certificate from a trusted CA, for whatever host name
    /// (`VERIFY_CA`).
    VerifyCa,
    /// Always, with a certificate from a trusted CA for the host connected to
    /// (`VERIFY_IDENTITY`).
    VerifyFull,
}

impl TlsMode {
    fn parse(value: &str) -> Option<Self> {
        Some(
            match value.to_ascii_lowercase().replace('_', "-").as_str() {
                "disable" | "disabled" => TlsMode::Disable,
                // libpq's `allow` tries without TLS first; with TLS first is as good
                // for a client that verifies nothing either way.
                "allow" | "prefer" | "preferred" => TlsMode::Prefer,
                "require" | "required" => TlsMode::Require,
                "verify-ca" => TlsMode::VerifyCa,
                "verify-full" | "verify-identity" => TlsMode::VerifyFull,
                _ => return None,
            },
        )
    }

    /// The libpq name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            TlsMode::Disable => "disable",
            TlsMode::Prefer => "prefer",
            TlsMode::Require => "require",
            TlsMode::VerifyCa => "verify-ca",
            TlsMode::VerifyFull => "verify-full",
        }
    }
}

/// Which root certificates a verifying connection trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Roots {
    /// The bundled Mozilla roots and the system's store.
    Default,
    /// Only the certificates of this PEM file (`sslrootcert=`, `ssl-ca=`,
    /// `--ca-file`), with its contents, read when the URL was parsed.
    File(PathBuf, Vec<u8>),
}

/// A `postgres://` or `mysql://` URL with its TLS parameters taken out.
#[derive(Debug, Clone)]
pub(crate) struct ServerUrl {
    /// The URL without the parameters this module handles, for the driver.
    pub(crate) url: String,
    /// How the connection uses TLS.
    pub(crate) tls: TlsMode,
    /// The roots a verifying connection trusts.
    #[cfg_attr(not(feature = "tls"), allow(dead_code))]
    pub(crate) roots: Roots,
}

/// The TLS parameters a URL may carry.
#[derive(Default)]
struct Params {
    mode: Option<(TlsMode, String)>,
    ca: Option<(String, String)>,
    /// mysql_async's own spellings: `require_ssl`, `verify_ca`, `verify_identity`.
    require_ssl: Option<bool>,
    verify_ca: Option<bool>,
    verify_identity: Option<bool>,
}

impl ServerUrl {
    /// Takes the TLS parameters out of `url`: `sslmode`/`ssl-mode`/`ssl_mode`
    /// (libpq's and the mysql client's values), `sslrootcert`/`ssl-ca`/`ssl_ca`
    /// (a PEM file, or libpq's `system`), and on MySQL URLs mysql_async's
    /// `require_ssl`, `verify_ca` and `verify_identity`. `ca_file` is
    /// `--ca-file`.
    ///
    /// With a CA file and no mode, or `require`, the certificate is verified
    /// against that CA (`verify-ca`), as libpq does for `require` and the mysql
    /// client for `--ssl-ca`. Errors are usage errors that never show the
    /// password.
    pub(crate) fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, CliError> {
        let bad = |why: String| CliError::usage(format!("--url {}: {why}", redact(url)));
        let (base, query) = match url.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (url, None),
        };
        let mut params = Params::default();
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode(raw_name)
                .to_ascii_lowercase()
                .replace('-', "_");
            let value = percent_decode(raw_value);
            match name.as_str() {
                "sslmode" | "ssl_mode" => {
                    let mode = TlsMode::parse(&value).ok_or_else(|| {
                        bad(format!(
                            "{raw_name}={value:?} is not a TLS mode: use disable, prefer, \
                             require, verify-ca or verify-full (or DISABLED, PREFERRED, \
                             REQUIRED, VERIFY_CA, VERIFY_IDENTITY)"
                        ))
                    })?;
                    match &params.mode {
                        Some((other, given)) if *other != mode => {
                            return Err(bad(format!(
                                "{given} and {raw_name}={value} disagree: give one TLS mode"
                            )));
                        }
                        _ => params.mode = Some((mode, format!("{raw_name}={value}"))),
                    }
                }
                "sslrootcert" | "ssl_ca" | "sslca" => match &params.ca {
                    Some((other, given)) if *other != value => {
                        return Err(bad(format!(
                            "{given} and {raw_name}= name different CA files: give one"
                        )));
                    }
                    _ => params.ca = Some((value, format!("{raw_name}="))),
                },
                "require_ssl" | "verify_ca" | "verify_identity" => {
                    let flag = parse_flag(&value)
                        .ok_or_else(|| bad(format!("{raw_name} takes true or false")))?;
                    match name.as_str() {
                        "require_ssl" => params.require_ssl = Some(flag),
                        "verify_ca" => params.verify_ca = Some(flag),
                        _ => params.verify_identity = Some(flag),
                    }
                }
                "sslcert" | "sslkey" | "ssl_cert" | "ssl_key" | "sslpassword" => {
                    return Err(bad(format!(
                        "{raw_name}: client certificates are not supported; log in with a \
                         password (PGPASSWORD, PGPASSFILE, MYSQL_PWD or --url-file keep it out \
                         of the command line)"
                    )));
                }
                "built_in_roots" | "ssl_capath" | "sslcrl" | "sslcrldir" => {
                    return Err(bad(format!(
                        "{raw_name} is not supported; name a CA file with sslrootcert= or \
                         --ca-file"
                    )));
                }
                _ => kept.push(pair),
            }
        }
        let mut mode = params.mode.map(|(mode, _)| mode);
        if params.require_ssl == Some(true) {
            // mysql_async's meaning: verified unless switched off.
            let legacy = match (params.verify_ca, params.verify_identity) {
                (Some(false), _) => TlsMode::Require,
                (_, Some(false)) => TlsMode::VerifyCa,
                _ => TlsMode::VerifyFull,
            };
            if mode.is_some_and(|m| m != legacy) {
                return Err(bad(
                    "require_ssl and sslmode disagree: give one TLS mode".into()
                ));
            }
            mode = Some(legacy);
        }
        let from_url = params.ca.map(|(path, _)| path);
        let ca = match (from_url, ca_file) {
            (Some(a), Some(b)) if Path::new(&a) != b => {
                return Err(bad(format!(
                    "the URL names the CA file {a} and --ca-file {}: give one",
                    b.display()
                )));
            }
            (Some(a), _) => Some(a),
            (None, Some(b)) => Some(b.to_string_lossy().into_owned()),
            (None, None) => None,
        };
        let (tls, roots) = match ca.as_deref() {
            None => (mode.unwrap_or(TlsMode::Prefer), Roots::Default),
            // libpq 16: the system's roots, and nothing less than verify-full.
            Some("system") => match mode.unwrap_or(TlsMode::VerifyFull) {
                TlsMode::VerifyFull => (TlsMode::VerifyFull, Roots::Default),
                weaker => {
                    return Err(bad(format!(
                        "sslrootcert=system needs sslmode=verify-full, not {}",
                        weaker.name()
                    )));
                }
            },
            Some(path) => {
                let tls = match mode {
                    None | Some(TlsMode::Require) => TlsMode::VerifyCa,
                    Some(mode) => mode,
                };
                (
                    tls,
                    Roots::File(PathBuf::from(path), read_ca_file(Path::new(path))?),
                )
            }
        };
        let url = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok(Self { url, tls, roots })
    }
}

/// Reads a CA file, checking that it holds a PEM certificate.
fn read_ca_file(path: &Path) -> Result<Vec<u8>, CliError> {
    let pem = std::fs::read(path)
        .map_err(|e| CliError::usage(format!("cannot read the CA file {}: {e}", path.display())))?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(CliError::usage(format!(
            "the CA file {} holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        )));
    }
    Ok(pem)
}

fn parse_flag(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `%XX` escapes decoded (invalid ones kept as they are).
pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(byte) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The password for a PostgreSQL login that has none in its URL: `PGPASSWORD`,
/// else the first matching line of the password file (`PGPASSFILE`, by
/// default `~/.pgpass`), as libpq finds it. A password file that others may
/// read is ignored with a warning, as libpq does.
pub(crate) fn postgres_password(
    host: &str,
    port: u16,
    database: &str,
    user: &str,
    warn: &mut dyn FnMut(String),
) -> Option<String> {
    if let Some(password) = std::env::var("PGPASSWORD").ok().filter(|p| !p.is_empty()) {
        return Some(password);
    }
    let file = match std::env::var_os("PGPASSFILE").filter(|f| !f.is_empty()) {
        Some(file) => PathBuf::from(file),
        None => dirs::home_dir()?.join(".pgpass"),
    };
    let meta = std::fs::metadata(&file).ok()?;
    if !meta.is_file() {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o077 != 0 {
            warn(format!(
                "password file {} has group or world access and is ignored; permissions \
                 should be u=rw (0600) or less",
                file.display()
            ));
            return None;
        }
    }
    let text = std::fs::read_to_string(&file).ok()?;
    pgpass_lookup(&text, host, &port.to_string(), database, user)
}

/// The password of the first line of a `.pgpass` file that matches
/// (`hostname:port:database:username:password`, `*` matching anything, `\`
/// escaping `:` and `\`).
pub(crate) fn pgpass_lookup(
    text: &str,
    host: &str,
    port: &str,
    database: &str,
    user: &str,
) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.trim_end_matches('\r');
        if line.starts_with('#') || line.trim().is_empty() {
            return None;
        }
        let fields = split_pgpass(line);
        if fields.len() < 5 {
            return None;
        }
        let matches = |field: &str, value: &str| field == "*" || field == value;
        (matches(&fields[0], host)
            && matches(&fields[1], port)
            && matches(&fields[2], database)
            && matches(&fields[3], user))
        .then(|| fields[4..].join(":"))
    })
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("one field").push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

/// `MYSQL_PWD`, for a MySQL login that has no password in its URL.
pub(crate) fn mysql_password() -> Option<String> {
    std::env::var("MYSQL_PWD").ok().filter(|p| !p.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> ServerUrl {
        ServerUrl::parse(url, None).unwrap()
    }

    #[test]
    fn takes_the_tls_parameters_out() {
        let u = parse("postgres://app:pw@db/prod");
        assert_eq!(
            (u.url.as_str(), u.tls),
            ("postgres://app:pw@db/prod", TlsMode::Prefer)
        );
        let u = parse("postgres://app@db/prod?sslmode=verify-full&application_name=x");
        assert_eq!(u.url, "postgres://app@db/prod?application_name=x");
        assert_eq!((u.tls, u.roots), (TlsMode::VerifyFull, Roots::Default));
        for (query, mode) in [
            ("sslmode=disable", TlsMode::Disable),
            ("sslmode=require", TlsMode::Require),
            ("sslmode=verify-ca", TlsMode::VerifyCa),
            ("ssl-mode=REQUIRED", TlsMode::Require),
            ("ssl-mode=VERIFY_CA", TlsMode::VerifyCa),
            ("ssl-mode=VERIFY_IDENTITY", TlsMode::VerifyFull),
            ("ssl_mode=PREFERRED", TlsMode::Prefer),
            ("ssl-mode=DISABLED", TlsMode::Disable),
            ("require_ssl=true", TlsMode::VerifyFull),
            ("require_ssl=true&verify_ca=false", TlsMode::Require),
            ("require_ssl=true&verify_identity=false", TlsMode::VerifyCa),
            ("sslmode=require&ssl-mode=REQUIRED", TlsMode::Require),
        ] {
            let u = parse(&format!("mysql://root@db/test?{query}"));
            assert_eq!(u.tls, mode, "{query}");
            assert_eq!(u.url, "mysql://root@db/test", "{query}");
        }
    }

    #[test]
    fn a_ca_file_means_verifying_against_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMII\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let shown = ca.display().to_string();
        let u = parse(&format!("postgres://u@h/d?sslrootcert={shown}"));
        assert_eq!(u.tls, TlsMode::VerifyCa);
        assert!(matches!(&u.roots, Roots::File(p, _) if *p == ca));
        let u = parse(&format!(
            "postgres://u@h/d?sslmode=require&sslrootcert={shown}"
        ));
        assert_eq!(u.tls, TlsMode::VerifyCa, "libpq: require with a root file");
        let u = parse(&format!(
            "mysql://u@h/d?ssl-mode=VERIFY_IDENTITY&ssl-ca={shown}"
        ));
        assert_eq!(u.tls, TlsMode::VerifyFull);
        let u = ServerUrl::parse("postgres://u@h/d?sslmode=verify-full", Some(&ca)).unwrap();
        assert!(matches!(&u.roots, Roots::File(..)));
        let u = parse("postgres://u@h/d?sslrootcert=system");
        assert_eq!((u.tls, u.roots), (TlsMode::VerifyFull, Roots::Default));
    }

    #[test]
    fn refuses_what_it_cannot_honour_without_showing_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("x.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        for url in [
            "postgres://u:hunter2@h/d?sslmode=verify-everything".to_owned(),
            "postgres://u:hunter2@h/d?sslmode=require&ssl-mode=DISABLED".to_owned(),
            "postgres://u:hunter2@h/d?sslcert=/x.crt".to_owned(),
            "postgres://u:hunter2@h/d?sslrootcert=system&sslmode=require".to_owned(),
            "postgres://u:hunter2@h/d?sslrootcert=/does/not/exist.pem".to_owned(),
            format!("postgres://u:hunter2@h/d?sslrootcert={}", not_pem.display()),
            "mysql://u:hunter2@h/d?require_ssl=maybe".to_owned(),
            "mysql://u:hunter2@h/d?require_ssl=true&sslmode=require".to_owned(),
        ] {
            let error = ServerUrl::parse(&url, None).unwrap_err();
            assert_eq!(error.code, 2, "{url}: {}", error.message);
            assert!(!error.message.contains("hunter2"), "{}", error.message);
        }
    }

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("%2Ftmp%2Fca.pem"), "/tmp/ca.pem");
        assert_eq!(percent_decode("a%zzb%"), "a%zzb%");
        assert_eq!(percent_decode("%41"), "A");
    }

    #[test]
    fn finds_passwords_in_a_pgpass_file() {
        let text = "# comment\n\
                    other:5432:*:*:nope\n\
                    127.0.0.1:5433:test:postgres:s3cr\\:et\n\
                    *:*:*:postgres:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", "5433", "test", "postgres").as_deref(),
            Some("s3cr:et")
        );
        assert_eq!(
            pgpass_lookup(text, "127.0.0.1", "5432", "test", "postgres").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup(text, "h", "1", "d", "app"), None);
    }
}
