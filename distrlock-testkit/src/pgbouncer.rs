//! [`PgBouncer`]: a private PgBouncer started from the installed binary, in front
//! of a PostgreSQL server, for tests of a backend behind a connection pooler.

use std::fmt;
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::throwaway::{chown_recursive, free_port, is_root, user_ids};
use crate::{ServerError, ThrowawayServer};

type Result<T> = std::result::Result<T, ServerError>;

/// How a [`PgBouncer`] lends its server connections to its clients
/// (PgBouncer's `pool_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps one server connection from connect to disconnect.
    Session,
    /// A client holds a server connection only for one transaction; its next
    /// transaction may run on another one, and other clients' transactions run
    /// on the one it used. Session state (`SET`, `LISTEN`, prepared statements)
    /// therefore leaks between clients or is lost.
    Transaction,
    /// A client holds a server connection for one statement; multi-statement
    /// transactions are refused.
    Statement,
}

impl PoolMode {
    /// The value of PgBouncer's `pool_mode` setting.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// A private PgBouncer on a free loopback port, in front of one PostgreSQL
/// server (the shared test server or a [`ThrowawayServer`]), from Debian's
/// `pgbouncer` package (`/usr/sbin/pgbouncer`). The system's PgBouncer service,
/// if any, is never touched.
///
/// Its config file, user list and log live in a temporary directory. Clients
/// connect without a password (`auth_type = trust`) as one of the configured
/// users (default `postgres`), to any database: PgBouncer connects on to the
/// database of the same name on the server, as the same user, with the
/// password given to [`user`](PgBouncerBuilder::user) if the server needs one.
/// Each database and user pair gets at most
/// [`default_pool_size`](PgBouncerBuilder::default_pool_size) server
/// connections, so with more clients than that, clients really share sessions
/// in transaction mode.
///
/// Dropping it kills PgBouncer (SIGKILL) and deletes its directory, also when
/// the test fails. The calls block (they wait for PgBouncer); from async code,
/// call [`start`](PgBouncerBuilder::start) inside `tokio::task::spawn_blocking`
/// or accept a short block of one worker thread.
///
/// ```no_run
/// use distrlock_testkit::{PgBouncer, PoolMode};
///
/// let bouncer = PgBouncer::builder("127.0.0.1", 5432)
///     .pool_mode(PoolMode::Transaction)
///     .default_pool_size(2)
///     .start()
///     .unwrap();
/// let url = bouncer.url("postgres", "test"); // postgres://postgres@127.0.0.1:PORT/test
/// # drop(url);
/// ```
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    pool_mode: PoolMode,
    child: Option<Child>,
}

/// Configures and starts a [`PgBouncer`]; see [`PgBouncer::builder`].
#[derive(Debug, Clone)]
pub struct PgBouncerBuilder {
    upstream_host: String,
    upstream_port: u16,
    pool_mode: PoolMode,
    default_pool_size: u32,
    max_client_conn: u32,
    users: Vec<(String, Option<String>)>,
}

impl PgBouncer {
    /// A builder for a PgBouncer in front of the PostgreSQL server at
    /// `upstream_host:upstream_port`, with the defaults: transaction mode,
    /// 2 server connections per database and user, 500 clients, user
    /// `postgres` without a password.
    pub fn builder(upstream_host: impl Into<String>, upstream_port: u16) -> PgBouncerBuilder {
        PgBouncerBuilder {
            upstream_host: upstream_host.into(),
            upstream_port,
            pool_mode: PoolMode::Transaction,
            default_pool_size: 2,
            max_client_conn: 500,
            users: Vec::new(),
        }
    }

    /// A builder for a PgBouncer in front of `server` (a throwaway PostgreSQL).
    pub fn builder_for(server: &ThrowawayServer) -> PgBouncerBuilder {
        Self::builder("127.0.0.1", server.port())
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its pool mode.
    pub fn pool_mode(&self) -> PoolMode {
        self.pool_mode
    }

    /// A URL for `database` through it as `user`, without a password:
    /// `postgres://USER@127.0.0.1:PORT/DATABASE`.
    pub fn url(&self, user: &str, database: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{database}", self.port)
    }

    /// Whether the PgBouncer process is running.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Kills PgBouncer with SIGKILL and reaps it; every client connection
    /// through it breaks.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its log so far, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

impl PgBouncerBuilder {
    /// How server connections are lent to clients. Default
    /// [`PoolMode::Transaction`].
    pub fn pool_mode(mut self, mode: PoolMode) -> Self {
        self.pool_mode = mode;
        self
    }

    /// The most server connections per database and user pair. Default 2.
    pub fn default_pool_size(mut self, size: u32) -> Self {
        self.default_pool_size = size;
        self
    }

    /// The most client connections. Default 500.
    pub fn max_client_conn(mut self, clients: u32) -> Self {
        self.max_client_conn = clients;
        self
    }

    /// Lets clients in as `name` (without a password), and logs in to the
    /// server as `name` with `password`, if the server needs one. Without any
    /// call, the one user is `postgres` without a password.
    pub fn user(mut self, name: impl Into<String>, password: Option<&str>) -> Self {
        self.users
            .push((name.into(), password.map(ToOwned::to_owned)));
        self
    }

    /// Writes the config and starts PgBouncer, waiting (up to 10 s) until it
    /// accepts connections.
    ///
    /// Errors: [`ServerError::MissingBinary`] if `pgbouncer` is not installed,
    /// [`ServerError::Failed`] if it does not start.
    pub fn start(self) -> Result<PgBouncer> {
        let binary = find_pgbouncer()?;
        let dir = std::env::temp_dir().join(format!(
            "distrlock-pgbouncer-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir)
            .map_err(|e| ServerError::Failed(format!("creating {}: {e}", dir.display())))?;
        let mut bouncer = PgBouncer {
            dir,
            port: 0,
            pool_mode: self.pool_mode,
            child: None,
        };
        // PgBouncer refuses to run as root: run it as the `postgres` user then
        // (Debian's postgresql and pgbouncer packages create it), or `nobody`.
        let run_as = if is_root() {
            let ids = user_ids("postgres")
                .or_else(|| user_ids("nobody"))
                .ok_or_else(|| {
                    ServerError::Failed(
                        "running as root, but there is neither a `postgres` nor a `nobody` user \
                         to run PgBouncer as"
                            .into(),
                    )
                })?;
            Some(ids)
        } else {
            None
        };
        write_file(&bouncer.dir.join("userlist.txt"), &self.userlist())?;
        // The port may be taken between finding it and PgBouncer binding it.
        let mut last_error = None;
        for _ in 0..5 {
            bouncer.port = free_port()?;
            write_file(&bouncer.dir.join("pgbouncer.ini"), &self.ini(&bouncer))?;
            if let Some(ids) = run_as {
                chown_recursive(&bouncer.dir, ids)?;
            }
            let mut cmd = Command::new(&binary);
            cmd.arg(bouncer.dir.join("pgbouncer.ini"));
            if let Some((uid, gid)) = run_as {
                cmd.uid(uid).gid(gid);
            }
            let stderr = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(bouncer.dir.join("stderr.log"))
                .map_err(|e| ServerError::Failed(format!("pgbouncer stderr log: {e}")))?;
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .map_err(|e| ServerError::Failed(format!("starting pgbouncer: {e}")))?;
            match bouncer.wait_ready(&mut child) {
                Ok(()) => {
                    bouncer.child = Some(child);
                    return Ok(bouncer);
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| ServerError::Failed("pgbouncer did not start".into())))
    }

    fn userlist(&self) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let default = [("postgres".to_owned(), None)];
        let users = match self.users.is_empty() {
            true => &default[..],
            false => &self.users[..],
        };
        users
            .iter()
            .map(|(name, password)| {
                format!(
                    "{} {}\n",
                    quote(name),
                    quote(password.as_deref().unwrap_or(""))
                )
            })
            .collect()
    }

    fn ini(&self, bouncer: &PgBouncer) -> String {
        let dir = bouncer.dir.display();
        format!(
            "[databases]\n\
             * = host={host} port={upstream_port}\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             ; no Unix socket: nothing in /tmp that another instance could collide with\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = {mode}\n\
             default_pool_size = {pool}\n\
             max_client_conn = {clients}\n\
             ; a restarted server is retried after 1 s, not 15\n\
             server_login_retry = 1\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            host = self.upstream_host,
            upstream_port = self.upstream_port,
            port = bouncer.port,
            mode = self.pool_mode.as_str(),
            pool = self.default_pool_size,
            clients = self.max_client_conn,
        )
    }
}

impl PgBouncer {
    fn wait_ready(&self, child: &mut Child) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(ServerError::Failed(format!(
                    "pgbouncer exited with {status} while starting: {}{}",
                    std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default(),
                    self.log()
                )));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(ServerError::Failed(format!(
            "pgbouncer did not listen on port {} within 10 s: {}",
            self.port,
            self.log()
        )))
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl fmt::Debug for PgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgBouncer")
            .field("port", &self.port)
            .field("pool_mode", &self.pool_mode)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents)
        .map_err(|e| ServerError::Failed(format!("writing {}: {e}", path.display())))
}

/// `pgbouncer` on PATH, or where Debian puts it (`/usr/sbin`, often not on a
/// user's PATH).
fn find_pgbouncer() -> Result<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join("pgbouncer"))
        .chain(["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"].map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(ServerError::MissingBinary {
            binary: "pgbouncer",
            package: "pgbouncer",
        })
}
