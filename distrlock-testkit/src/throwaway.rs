//! [`ThrowawayServer`]: a private PostgreSQL or MariaDB started from the installed
//! binaries, for tests that stop, kill or restart a database.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which database a [`ThrowawayServer`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// PostgreSQL (`initdb`, `postgres`), from Debian's `postgresql` package.
    Postgres,
    /// MariaDB (`mariadb-install-db`, `mariadbd`), from Debian's `mariadb-server`.
    MariaDb,
}

impl ServerKind {
    fn package(self) -> &'static str {
        match self {
            ServerKind::Postgres => "postgresql",
            ServerKind::MariaDb => "mariadb-server",
        }
    }
}

/// Why a throwaway server, or a [`PgBouncer`](crate::PgBouncer), could not be started
/// or controlled.
#[derive(Debug)]
pub enum ServerError {
    /// A server binary is not installed.
    MissingBinary {
        /// The binary that was looked for.
        binary: &'static str,
        /// The Debian package that provides it.
        package: &'static str,
    },
    /// A command failed or the server did not become ready.
    Failed(String),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::MissingBinary { binary, package } => {
                write!(
                    f,
                    "{binary} is not installed: install the `{package}` package (apt-get install {package})"
                )
            }
            ServerError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for ServerError {}

type Result<T> = std::result::Result<T, ServerError>;

/// A private database server in a temporary directory, on a free loopback port,
/// with a `test` database and passwordless local access (`postgres` with trust
/// auth; MariaDB `root` with an empty password), or a PostgreSQL whose superuser
/// needs a password ([`postgres_with_password`](Self::postgres_with_password)).
///
/// [`stop`](Self::stop), [`kill`](Self::kill) (SIGKILL) and [`start`](Self::start)
/// (same port, same data) control it; dropping it kills the server and deletes its
/// directory, also when the test fails. The shared servers are never touched.
///
/// The calls block (they wait for the server); from async code, call them inside
/// `tokio::task::spawn_blocking` or accept a short block of one worker thread.
pub struct ThrowawayServer {
    kind: ServerKind,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// The user to run the server as, when this process is root.
    run_as: Option<(u32, u32)>,
    /// The superuser's password, if it has one.
    password: Option<String>,
    /// The certificates, when TLS is on.
    tls: Option<TlsFiles>,
    /// Environment and extra arguments of the server process.
    options: ServerOptions,
}

/// The certificates of a throwaway server with TLS on, made with the `openssl`
/// command in the server's directory: a test CA, the server's certificate from
/// it (valid for `localhost` and `127.0.0.1`), and another CA that did not sign
/// it.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The PEM certificate of the CA that signed the server's certificate.
    pub ca: PathBuf,
    /// The PEM certificate of a CA that has nothing to do with the server.
    pub other_ca: PathBuf,
    /// The server's PEM certificate.
    pub server_cert: PathBuf,
    /// The server's PEM private key.
    pub server_key: PathBuf,
}

/// The path of libfaketime on Debian (package `faketime`).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// How a [`ThrowawayServer`]'s process is started: extra environment variables
/// (say, libfaketime's), extra server arguments, and whether its data directory
/// is initialised first.
///
/// ```no_run
/// use distrlock_testkit::{ServerOptions, ThrowawayServer};
///
/// // A MariaDB whose clock runs 1.5 s ahead of the machine's.
/// let server = ThrowawayServer::mariadb_with(ServerOptions::new().faketime("+1.5s")?)?;
/// # Ok::<(), distrlock_testkit::ServerError>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    env: BTreeMap<String, String>,
    args: Vec<String>,
    install_args: Vec<String>,
    no_install: bool,
}

impl ServerOptions {
    /// No extra environment or arguments: what [`ThrowawayServer::mariadb`] uses.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets an environment variable of the server process (and of the
    /// processes it starts, such as a Galera state transfer script).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Appends an argument to the server's command line.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends an argument to the data directory's initialisation
    /// (`mariadb-install-db`).
    pub fn install_arg(mut self, arg: impl Into<String>) -> Self {
        self.install_args.push(arg.into());
        self
    }

    /// Leaves the data directory empty, for a Galera node that receives its
    /// data from the cluster (a state snapshot transfer); no `test` database is
    /// created either.
    pub fn empty_data_dir(mut self) -> Self {
        self.no_install = true;
        self
    }

    /// Runs the server under libfaketime with its wall clock `offset` from the
    /// machine's (libfaketime's relative syntax: `"+1.5s"`, `"-30s"`), its
    /// monotonic clock untouched (`FAKETIME_DONT_FAKE_MONOTONIC=1`, so that
    /// timeouts and sleeps inside the server are real).
    ///
    /// [`ServerError::MissingBinary`] when libfaketime is not installed.
    pub fn faketime(self, offset: &str) -> Result<Self> {
        Ok(self.preload_faketime()?.env("FAKETIME", offset))
    }

    /// Runs the server under libfaketime with its wall-clock offset read from
    /// `file` (`FAKETIME_TIMESTAMP_FILE`), at most once a second
    /// (`FAKETIME_CACHE_DURATION=1`; `FAKETIME_NO_CACHE` would read it at every
    /// clock call and slow the server down a lot). Write an offset such as
    /// `"+3s"` into the file ([`write_faketime_offset`]) to step the server's
    /// clock at run time; it takes effect within about a second. The monotonic
    /// clock stays real.
    pub fn faketime_file(self, file: &Path) -> Result<Self> {
        if !file.exists() {
            write_faketime_offset(file, "+0")?;
        }
        Ok(self
            .preload_faketime()?
            .env("FAKETIME_TIMESTAMP_FILE", file.display().to_string())
            .env("FAKETIME_CACHE_DURATION", "1"))
    }

    fn preload_faketime(self) -> Result<Self> {
        if !Path::new(LIBFAKETIME).is_file() {
            return Err(ServerError::MissingBinary {
                binary: "libfaketime.so.1",
                package: "faketime",
            });
        }
        Ok(self
            .env("LD_PRELOAD", LIBFAKETIME)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1"))
    }
}

/// Writes `offset` (libfaketime's syntax, `"+3s"`, `"-3s"`, `"+0"`) into a
/// faketime file (see [`ServerOptions::faketime_file`]), replacing it whole (a
/// write to a temporary file, then a rename), readable by the server's user.
pub fn write_faketime_offset(file: &Path, offset: &str) -> Result<()> {
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, format!("{offset}\n"))
        .and_then(|()| {
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        })
        .and_then(|()| std::fs::rename(&tmp, file))
        .map_err(|e| ServerError::Failed(format!("writing {}: {e}", file.display())))
}

impl ThrowawayServer {
    /// Starts a private PostgreSQL.
    pub fn postgres() -> Result<Self> {
        Self::start_postgres(None, false, "")
    }

    /// Starts a private PostgreSQL with TLS on (`ssl = on`, a certificate from a
    /// test CA: see [`tls`](Self::tls)). Clients may still connect without TLS.
    /// Needs the `openssl` command.
    pub fn postgres_with_tls() -> Result<Self> {
        Self::start_postgres(None, true, "")
    }

    /// Starts a private PostgreSQL whose `postgres` user needs `password`
    /// (`scram-sha-256` for every connection), for tests of a wrong password.
    ///
    /// [`url`](Self::url) carries the password; [`sql`](Self::sql) passes it to
    /// `psql`.
    pub fn postgres_with_password(password: &str) -> Result<Self> {
        Self::start_postgres(Some(password), false, "")
    }

    /// Starts a private PostgreSQL with `conf` (lines of `postgresql.conf`, such
    /// as `wal_level = replica`) appended to its configuration.
    pub(crate) fn postgres_with_conf(conf: &str) -> Result<Self> {
        Self::start_postgres(None, false, conf)
    }

    /// Starts a private PostgreSQL from a base backup of the server on
    /// `127.0.0.1:source_port`, as a streaming standby of it: `pg_basebackup -R`
    /// writes `standby.signal` and a `primary_conninfo` that names the source
    /// (with `application_name`, the name `synchronous_standby_names` knows
    /// it by), and `conf` is appended to the configuration copied from the
    /// source.
    ///
    /// [`ServerError::MissingBinary`] when `pg_basebackup` is not installed.
    pub(crate) fn postgres_standby(
        source_port: u16,
        application_name: &str,
        conf: &str,
    ) -> Result<Self> {
        let basebackup = find_binary(ServerKind::Postgres, "pg_basebackup")?;
        let server = Self::prepare(ServerKind::Postgres)?;
        let mut cmd = Command::new(basebackup);
        cmd.arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={source_port} user=postgres application_name={application_name}"
            ))
            .arg("-D")
            .arg(server.data_dir())
            // -R: standby.signal and primary_conninfo; a fast checkpoint on the
            // source instead of waiting for the next one.
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        server.run_setup(&mut cmd, "pg_basebackup")?;
        server.append_conf(conf)?;
        let mut server = server;
        server.start()?;
        Ok(server)
    }

    fn start_postgres(password: Option<&str>, tls: bool, conf: &str) -> Result<Self> {
        let mut server = Self::prepare(ServerKind::Postgres)?;
        if tls {
            server.make_certificates()?;
        }
        let initdb = find_binary(ServerKind::Postgres, "initdb")?;
        let mut cmd = Command::new(initdb);
        cmd.arg("-D")
            .arg(server.data_dir())
            .args(["-U", "postgres", "-E", "UTF8", "--no-sync"]);
        let pwfile = server.dir.join("pwfile");
        match password {
            Some(password) => {
                std::fs::write(&pwfile, password)
                    .map_err(|e| ServerError::Failed(format!("writing the password file: {e}")))?;
                cmd.args(["--auth=scram-sha-256", "--pwfile"]).arg(&pwfile);
                server.password = Some(password.to_owned());
            }
            None => {
                cmd.arg("--auth=trust");
            }
        }
        let initdb = server.run_setup(&mut cmd, "initdb");
        let _ = std::fs::remove_file(&pwfile);
        initdb?;
        server.append_conf(conf)?;
        server.start()?;
        server.client(&["-c", "CREATE DATABASE test"], "postgres")?;
        Ok(server)
    }

    /// Starts a private MariaDB.
    pub fn mariadb() -> Result<Self> {
        Self::mariadb_with(ServerOptions::new())
    }

    /// Starts a private MariaDB with TLS on (`ssl_cert`, `ssl_key` and `ssl_ca`
    /// from a test CA: see [`tls`](Self::tls)). Clients may still connect
    /// without TLS. Needs the `openssl` command.
    pub fn mariadb_with_tls() -> Result<Self> {
        Self::start_mariadb(true, ServerOptions::new())
    }

    /// Starts a private MariaDB with extra environment and arguments (under
    /// libfaketime, as a Galera node, …), see [`ServerOptions`].
    pub fn mariadb_with(options: ServerOptions) -> Result<Self> {
        Self::start_mariadb(false, options)
    }

    fn start_mariadb(tls: bool, options: ServerOptions) -> Result<Self> {
        let mut server = Self::prepare(ServerKind::MariaDb)?;
        server.options = options;
        if tls {
            server.make_certificates()?;
        }
        if server.options.no_install {
            server.start()?;
            return Ok(server);
        }
        let install = find_binary(ServerKind::MariaDb, "mariadb-install-db")?;
        let mut cmd = Command::new(install);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", server.data_dir().display()))
            .args([
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ]);
        if server.run_as.is_some() {
            cmd.arg("--user=mysql");
        }
        cmd.args(&server.options.install_args);
        // mariadb-install-db switches user itself; run it as we are. Its
        // bootstrap server has been seen to crash (signal 11 in Aria's
        // temporary tables) when several run at once: try again on a clean
        // directory.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let output = cmd
                .stdin(Stdio::null())
                .output()
                .map_err(|e| ServerError::Failed(format!("mariadb-install-db: {e}")))?;
            if output.status.success() {
                break;
            }
            if attempts == 3 {
                return Err(ServerError::Failed(format!(
                    "mariadb-install-db failed {attempts} times: {}",
                    String::from_utf8_lossy(&output.stderr)
                )));
            }
            let data = server.data_dir();
            let _ = std::fs::remove_dir_all(&data);
            std::fs::create_dir_all(&data)
                .map_err(|e| ServerError::Failed(format!("creating {}: {e}", data.display())))?;
            if let Some(ids) = server.run_as {
                chown_recursive(&server.dir, ids)?;
            }
        }
        server.start()?;
        server.client(&["-e", "CREATE DATABASE IF NOT EXISTS test"], "")?;
        Ok(server)
    }

    /// Which database this is.
    pub fn kind(&self) -> ServerKind {
        self.kind
    }

    /// The certificates, if TLS is on.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The loopback port it listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the `test` database: `postgres://postgres@127.0.0.1:PORT/test` or
    /// `mysql://root@127.0.0.1:PORT/test`, with the password (percent-encoded) if
    /// the server has one.
    pub fn url(&self) -> String {
        let password = match &self.password {
            Some(password) => format!(":{}", percent_encode(password)),
            None => String::new(),
        };
        match self.kind {
            ServerKind::Postgres => {
                format!("postgres://postgres{password}@127.0.0.1:{}/test", self.port)
            }
            ServerKind::MariaDb => format!("mysql://root{password}@127.0.0.1:{}/test", self.port),
        }
    }

    /// The server's own directory (data, log, socket), deleted on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The options the server runs with.
    pub fn options(&self) -> &ServerOptions {
        &self.options
    }

    /// Changes the options for the next [`start`](Self::start) (a running
    /// server keeps its own until restarted): say, drop a Galera node's
    /// `--wsrep-new-cluster` once the cluster exists.
    pub fn set_options(&mut self, options: ServerOptions) {
        self.options = options;
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Starts the server (again) on the same port and data, and waits until it
    /// accepts connections (up to 60 s).
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let started = Instant::now();
        loop {
            let mut child = self.spawn_server()?;
            match self.wait_ready(&mut child) {
                Ok(()) => {
                    self.child = Some(child);
                    return Ok(());
                }
                // After a kill -9 the old processes may still hold the port or
                // shared memory for a moment: try again.
                Err(e) if started.elapsed() < Duration::from_secs(60) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(250));
                    if started.elapsed() > Duration::from_secs(55) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stops the server cleanly, as `pg_ctl stop -m fast` (SIGINT: disconnect
    /// clients, then shut down) or `mariadb-admin shutdown` (SIGTERM) would, and
    /// waits for it to exit.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // PostgreSQL's SIGTERM is a "smart" shutdown that waits for every client
        // to leave; SIGINT is the "fast" one.
        let signal = match self.kind {
            ServerKind::Postgres => "-INT",
            ServerKind::MariaDb => "-TERM",
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .map_err(|e| ServerError::Failed(format!("kill -TERM: {e}")))?;
        if !status.success() {
            let _ = child.kill();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                self.wait_port_free();
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        Err(ServerError::Failed(
            "the server did not stop within 30 s; killed it".into(),
        ))
    }

    /// Kills the server with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server and every process it started (PostgreSQL's backends,
    /// WAL sender, checkpointer) with SIGKILL at once, as a crash of its
    /// machine would, and reaps it. [`kill`](Self::kill) kills only the main
    /// process, whose PostgreSQL children then take a moment to notice and
    /// exit; until then a WAL sender may still send what it had.
    pub fn crash(&mut self) {
        let Some(pid) = self.pid() else {
            return;
        };
        let mut pids = vec![pid.to_string()];
        pids.extend(children_of(pid).into_iter().map(|p| p.to_string()));
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(&pids)
            .stderr(Stdio::null())
            .status();
        self.kill();
    }

    /// [`stop`](Self::stop), then [`start`](Self::start).
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.start()
    }

    /// Runs SQL through the server's command-line client (`psql` or `mariadb`) as
    /// the superuser, in the `test` database, and returns its output.
    pub fn sql(&self, sql: &str) -> Result<String> {
        match self.kind {
            ServerKind::Postgres => self.client(&["-Atqc", sql], "test"),
            ServerKind::MariaDb => self.client(&["-N", "-B", "-e", sql], "test"),
        }
    }

    fn prepare(kind: ServerKind) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "distrlock-{}-{}-{:x}",
            match kind {
                ServerKind::Postgres => "pg",
                ServerKind::MariaDb => "mariadb",
            },
            std::process::id(),
            unique()
        ));
        std::fs::create_dir_all(dir.join("data"))
            .map_err(|e| ServerError::Failed(format!("creating {}: {e}", dir.display())))?;
        let run_as = if is_root() {
            let user = match kind {
                ServerKind::Postgres => "postgres",
                ServerKind::MariaDb => "mysql",
            };
            let ids = user_ids(user).ok_or_else(|| {
                ServerError::Failed(format!(
                    "running as root, but there is no `{user}` user to run the server as (install {})",
                    kind.package()
                ))
            })?;
            chown_recursive(&dir, ids)?;
            Some(ids)
        } else {
            None
        };
        Ok(Self {
            kind,
            dir,
            port: free_port()?,
            child: None,
            run_as,
            password: None,
            tls: None,
            options: ServerOptions::new(),
        })
    }

    /// Makes a CA, a server certificate signed by it, and an unrelated CA, in
    /// the server's directory, readable by the server's user only.
    fn make_certificates(&mut self) -> Result<()> {
        let openssl = Path::new("/usr/bin/openssl");
        let openssl = if openssl.is_file() {
            openssl.to_owned()
        } else {
            std::env::var("PATH")
                .unwrap_or_default()
                .split(':')
                .map(|dir| Path::new(dir).join("openssl"))
                .find(|p| p.is_file())
                .ok_or(ServerError::MissingBinary {
                    binary: "openssl",
                    package: "openssl",
                })?
        };
        let dir = self.dir.join("tls");
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError::Failed(format!("creating {}: {e}", dir.display())))?;
        let file = |name: &str| dir.join(name);
        let run = |args: &[&std::ffi::OsStr], what: &str| -> Result<()> {
            let output = Command::new(&openssl)
                .args(args)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| ServerError::Failed(format!("openssl ({what}): {e}")))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(ServerError::Failed(format!(
                    "openssl ({what}) failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                )))
            }
        };
        let os = |s: &'static str| std::ffi::OsStr::new(s);
        for (name, subject) in [
            ("ca", "/CN=distrlock throwaway test CA"),
            ("other-ca", "/CN=distrlock unrelated test CA"),
        ] {
            let (key, cert) = (file(&format!("{name}.key")), file(&format!("{name}.crt")));
            run(
                &[
                    os("req"),
                    os("-x509"),
                    os("-newkey"),
                    os("rsa:2048"),
                    os("-nodes"),
                    os("-days"),
                    os("3"),
                    os("-subj"),
                    os(subject),
                    os("-addext"),
                    os("basicConstraints=critical,CA:TRUE"),
                    os("-addext"),
                    os("keyUsage=critical,keyCertSign,cRLSign"),
                    os("-keyout"),
                    key.as_os_str(),
                    os("-out"),
                    cert.as_os_str(),
                ],
                "a CA",
            )?;
        }
        let extensions = file("server.ext");
        std::fs::write(
            &extensions,
            "basicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth\n\
             subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .map_err(|e| ServerError::Failed(format!("writing {}: {e}", extensions.display())))?;
        let (key, csr, cert) = (file("server.key"), file("server.csr"), file("server.crt"));
        run(
            &[
                os("req"),
                os("-newkey"),
                os("rsa:2048"),
                os("-nodes"),
                os("-subj"),
                os("/CN=localhost"),
                os("-keyout"),
                key.as_os_str(),
                os("-out"),
                csr.as_os_str(),
            ],
            "the server's key",
        )?;
        run(
            &[
                os("x509"),
                os("-req"),
                os("-in"),
                csr.as_os_str(),
                os("-CA"),
                file("ca.crt").as_os_str(),
                os("-CAkey"),
                file("ca.key").as_os_str(),
                os("-CAcreateserial"),
                os("-days"),
                os("3"),
                os("-extfile"),
                extensions.as_os_str(),
                os("-out"),
                cert.as_os_str(),
            ],
            "the server's certificate",
        )?;
        // PostgreSQL refuses a key that others may read.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| ServerError::Failed(format!("chmod {}: {e}", key.display())))?;
        if let Some(ids) = self.run_as {
            chown_recursive(&dir, ids)?;
        }
        self.tls = Some(TlsFiles {
            ca: file("ca.crt"),
            other_ca: file("other-ca.crt"),
            server_cert: cert,
            server_key: key,
        });
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Puts `line` first in a PostgreSQL server's `pg_hba.conf` (the first
    /// matching line decides); takes effect at the next reload or start.
    pub(crate) fn prepend_hba(&self, line: &str) -> Result<()> {
        let path = self.data_dir().join("pg_hba.conf");
        std::fs::read_to_string(&path)
            .and_then(|hba| std::fs::write(&path, format!("{line}\n{hba}")))
            .map_err(|e| ServerError::Failed(format!("writing {}: {e}", path.display())))
    }

    /// Appends `conf` to a PostgreSQL data directory's `postgresql.conf` (later
    /// lines win), and gives the directory the mode PostgreSQL insists on.
    fn append_conf(&self, conf: &str) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::PermissionsExt;
        let data = self.data_dir();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| ServerError::Failed(format!("chmod {}: {e}", data.display())))?;
        if conf.is_empty() {
            return Ok(());
        }
        let path = data.join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut file| writeln!(file, "\n{conf}"))
            .map_err(|e| ServerError::Failed(format!("writing {}: {e}", path.display())))
    }

    fn as_server_user<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn run_setup(&self, cmd: &mut Command, what: &str) -> Result<()> {
        let output = self
            .as_server_user(cmd)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ServerError::Failed(format!("{what}: {e}")))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(ServerError::Failed(format!(
                "{what} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )))
        }
    }

    fn spawn_server(&self) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .map_err(|e| ServerError::Failed(format!("server log: {e}")))?;
        let log2 = log
            .try_clone()
            .map_err(|e| ServerError::Failed(format!("server log: {e}")))?;
        let mut cmd = match self.kind {
            ServerKind::Postgres => {
                let mut cmd = Command::new(find_binary(self.kind, "postgres")?);
                cmd.arg("-D")
                    .arg(self.data_dir())
                    .args(["-p", &self.port.to_string(), "-k"])
                    .arg(&self.dir)
                    .args([
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        "fsync=off",
                        "-c",
                        "max_connections=200",
                    ]);
                if let Some(tls) = &self.tls {
                    cmd.args(["-c", "ssl=on", "-c"])
                        .arg(format!("ssl_cert_file={}", tls.server_cert.display()))
                        .arg("-c")
                        .arg(format!("ssl_key_file={}", tls.server_key.display()));
                }
                cmd
            }
            ServerKind::MariaDb => {
                let mut cmd = Command::new(find_binary(self.kind, "mariadbd")?);
                cmd.arg("--no-defaults")
                    .arg(format!("--datadir={}", self.data_dir().display()))
                    .arg(format!("--port={}", self.port))
                    .arg(format!(
                        "--socket={}",
                        self.dir.join("mysqld.sock").display()
                    ))
                    .arg(format!(
                        "--pid-file={}",
                        self.dir.join("mysqld.pid").display()
                    ))
                    .args([
                        "--bind-address=127.0.0.1",
                        "--skip-name-resolve",
                        "--skip-log-bin",
                        "--innodb-buffer-pool-size=64M",
                        "--max-connections=200",
                    ]);
                if self.run_as.is_some() {
                    cmd.arg("--user=mysql");
                }
                if let Some(tls) = &self.tls {
                    cmd.arg(format!("--ssl-cert={}", tls.server_cert.display()))
                        .arg(format!("--ssl-key={}", tls.server_key.display()))
                        .arg(format!("--ssl-ca={}", tls.ca.display()));
                }
                cmd.args(&self.options.args);
                cmd
            }
        };
        cmd.envs(&self.options.env);
        if self.kind == ServerKind::Postgres {
            self.as_server_user(&mut cmd);
        }
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| ServerError::Failed(format!("starting the server: {e}")))
    }

    fn wait_ready(&self, child: &mut Child) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ServerError::Failed(format!(
                    "the server exited with {status} while starting; see {}",
                    self.dir.join("server.log").display()
                )));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() && self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(ServerError::Failed(format!(
            "the server did not accept connections within 30 s; see {}",
            self.dir.join("server.log").display()
        )))
    }

    fn ping(&self) -> bool {
        let database = match self.kind {
            ServerKind::Postgres => "postgres",
            ServerKind::MariaDb => "",
        };
        self.client(&["-c", "SELECT 1"], database).is_ok()
            || (self.kind == ServerKind::MariaDb && self.client(&["-e", "SELECT 1"], "").is_ok())
    }

    fn client(&self, args: &[&str], database: &str) -> Result<String> {
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            ServerKind::Postgres => {
                let mut cmd = Command::new(find_binary(self.kind, "psql")?);
                cmd.args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-X",
                    "-v",
                    "ON_ERROR_STOP=1",
                ]);
                if !database.is_empty() {
                    cmd.args(["-d", database]);
                }
                if let Some(password) = &self.password {
                    cmd.env("PGPASSWORD", password);
                }
                cmd
            }
            ServerKind::MariaDb => {
                let mut cmd = Command::new(find_binary(self.kind, "mariadb")?);
                cmd.args([
                    "--no-defaults",
                    "-h",
                    "127.0.0.1",
                    "-P",
                    &port,
                    "-u",
                    "root",
                ]);
                if !database.is_empty() {
                    cmd.arg(database);
                }
                cmd
            }
        };
        let output = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| ServerError::Failed(format!("client: {e}")))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(ServerError::Failed(format!(
                "client failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )))
        }
    }

    fn wait_port_free(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ThrowawayServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl fmt::Debug for ThrowawayServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrowawayServer")
            .field("kind", &self.kind)
            .field("port", &self.port)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// Finds a server binary on PATH or in Debian's versioned PostgreSQL folders.
fn find_binary(kind: ServerKind, name: &'static str) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if kind == ServerKind::Postgres {
        // Debian keeps initdb and postgres off PATH, under /usr/lib/postgresql/N/bin.
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            versions.sort();
            for v in versions.into_iter().rev() {
                candidates.push(v.join("bin").join(name));
            }
        }
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        candidates.push(Path::new(dir).join(name));
    }
    candidates.extend(["/usr/sbin", "/usr/bin"].map(|d| Path::new(d).join(name)));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(ServerError::MissingBinary {
            binary: name,
            package: kind.package(),
        })
}

/// The processes whose parent is `pid`, from `/proc/*/stat`.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let child: u32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The uid and gid of `user`, from `/etc/passwd`.
pub(crate) fn user_ids(user: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&user) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

pub(crate) fn chown_recursive(dir: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(dir)
        .status()
        .map_err(|e| ServerError::Failed(format!("chown: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(ServerError::Failed(format!(
            "chown -R {uid}:{gid} {} failed",
            dir.display()
        )))
    }
}

/// `text` with every byte outside URL's unreserved set written as `%XX`.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) fn free_port() -> Result<u16> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| ServerError::Failed(format!("finding a free port: {e}")))
}

fn unique() -> u64 {
    fastrand::u64(..)
}
