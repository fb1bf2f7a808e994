//! The `distrlock` binary, driven as users drive it: real processes, real
//! signals, real exit codes.
//!
//! Every case is a function of a [`Target`] (a database URL plus a unique key
//! prefix), and `cli_tests!` runs it once per database:
//! - `sqlite`: a fresh SQLite file per test, in every test run;
//! - `postgres` / `mysql`: the servers at `DISTRLOCK_TEST_POSTGRES_URL` /
//!   `DISTRLOCK_TEST_MYSQL_URL`, skipping loudly when unreachable (failing under
//!   `DISTRLOCK_REQUIRE_DB=1`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

#[path = "common/counting_proxy.rs"]
#[allow(dead_code)]
mod counting_proxy;

const BIN: &str = env!("CARGO_BIN_EXE_distrlock");

/// Where one test keeps its locks.
struct Target {
    url: String,
    table: String,
    /// Unique per test: the tests share server tables, never keys.
    prefix: String,
    /// The SQLite file, for the cases that reach into it.
    sqlite_path: Option<PathBuf>,
    /// Scratch files, and the SQLite file; also `XDG_STATE_HOME`.
    dir: TempDir,
}

fn unique() -> String {
    format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff)
}

impl Target {
    fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks.db");
        Self {
            url: format!("sqlite://{}", path.display()),
            table: "distributed_locks".into(),
            prefix: format!("t{}/", unique()),
            sqlite_path: Some(path),
            dir,
        }
    }

    /// A server target, or `None` (after a loud skip) if it cannot be used.
    fn server(kind: &'static str, env: &str, default: &str, test: &str) -> Option<Self> {
        let url = std::env::var(env).unwrap_or_else(|_| default.to_owned());
        let target = Self {
            url,
            // One shared table per server; each test has its own key prefix.
            table: "distrlock_cli_tests".into(),
            prefix: format!("t{}/", unique()),
            sqlite_path: None,
            dir: tempfile::tempdir().unwrap(),
        };
        let init = target.cmd(["init"]).output().unwrap();
        if !init.status.success() {
            distrlock_testkit::skip(
                test,
                &format!(
                    "{kind} at {env}: `distrlock init` failed: {}",
                    stderr(&init)
                ),
            );
            return None;
        }
        Some(target)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `distrlock ARGS` against this target (URL and table from the environment).
    fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env("DISTRLOCK_URL", &self.url)
            .env("DISTRLOCK_TABLE", &self.table)
            .env("XDG_STATE_HOME", self.dir.path().join("state"))
            .stdin(Stdio::null());
        cmd
    }

    fn output<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd(args).output().unwrap()
    }

    /// `distrlock status --json --key KEY`: the lock's JSON, if it has a row.
    fn lock(&self, key: &str) -> Option<Value> {
        let out = self.output(["status", "--json", "--key", key]);
        assert!(out.status.success(), "status failed: {}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
        v["locks"].as_array().unwrap().first().cloned()
    }

    fn state(&self, key: &str) -> Option<String> {
        self.lock(key)
            .and_then(|l| l["state"].as_str().map(str::to_owned))
    }

    fn wait_held(&self, key: &str) {
        wait_until(Duration::from_secs(20), || {
            self.state(key).as_deref() == Some("held")
        });
    }

    /// Stops process `pid` (SIGSTOP). For SQLite, only at a moment when it does
    /// not hold the file's write lock, since a stopped writer would block every
    /// other process, which is not the situation being tested.
    fn pause(&self, pid: Pid) {
        for _ in 0..200 {
            kill(pid, Signal::SIGSTOP).unwrap();
            let Some(path) = &self.sqlite_path else {
                return;
            };
            let conn = rusqlite::Connection::open(path).unwrap();
            if conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok() {
                return;
            }
            kill(pid, Signal::SIGCONT).unwrap();
            std::thread::sleep(Duration::from_millis(7));
        }
        panic!("could not stop {pid} outside a write transaction");
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status
        .code()
        .expect("distrlock exits, it is not killed")
}

fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "condition not met within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `child` at most `limit`; its exit code.
fn wait_exit(child: &mut Child, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().expect("distrlock exits, it is not killed");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("distrlock did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills a background `distrlock run` and the command's process group, if
/// still there.
struct Background {
    child: Child,
    pidfile: Option<PathBuf>,
}

impl Background {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// SIGTERM to distrlock, which forwards it and releases once the command
    /// exits; returns distrlock's exit code.
    fn stop(mut self) -> i32 {
        kill(self.pid(), Signal::SIGTERM).unwrap();
        wait_exit(&mut self.child, Duration::from_secs(10))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(pid) = self.pidfile.as_ref().and_then(|p| read_pid(p)) {
            let _ = killpg(pid, Signal::SIGKILL);
        }
    }
}

fn read_pid(path: &Path) -> Option<Pid> {
    let text = std::fs::read_to_string(path).ok()?;
    text.trim().parse().ok().map(Pid::from_raw)
}

/// Whether `pid` is a running process: neither gone nor a zombie (a zombie
/// whose parent died waits for init, which may be slow to reap it).
fn alive(pid: Pid) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the command name's closing ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

/// Waits until `path` holds a pid, and returns it.
fn wait_pid(path: &Path) -> Pid {
    wait_until(Duration::from_secs(10), || read_pid(path).is_some());
    read_pid(path).unwrap()
}

/// `distrlock run ARGS -- sh -c SCRIPT` in the background; the script's pid is
/// written to `pidfile` first.
fn spawn_run(t: &Target, args: &[&str], script: &str) -> Background {
    let pidfile = t.file(&format!("pid-{}", unique()));
    let script = format!("echo $$ > '{}'; {script}", pidfile.display());
    let mut full: Vec<&str> = vec!["run"];
    full.extend_from_slice(args);
    full.extend_from_slice(&["--", "sh", "-c", &script]);
    let child = t
        .cmd(&full)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Background {
        child,
        pidfile: Some(pidfile),
    }
}

// ───────────────────────────── cases for every database ─────────────────────────────

/// `run` gives the command DISTRLOCK_KEY/TOKEN/FENCE, passes its output through,
/// and releases afterwards.
fn run_gives_the_command_its_lease(t: &Target) {
    let key = t.key("env");
    let out = t.output([
        "run",
        "--key",
        &key,
        "--",
        "sh",
        "-c",
        "echo \"$DISTRLOCK_KEY|$DISTRLOCK_FENCE|$DISTRLOCK_TOKEN\"",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let line = stdout(&out);
    let parts: Vec<&str> = line.trim().split('|').collect();
    assert_eq!(parts[0], key);
    let fence: i64 = parts[1].parse().expect("a numeric fence");
    assert_eq!(parts[2].len(), 36, "a UUID token: {line}");
    let lock = t.lock(&key).expect("the row is kept");
    assert_eq!(lock["state"], "released");
    assert_eq!(lock["fence"], fence);
    let again = t.output([
        "run",
        "--key",
        &key,
        "--",
        "sh",
        "-c",
        "echo $DISTRLOCK_FENCE",
    ]);
    let next: i64 = stdout(&again).trim().parse().unwrap();
    assert!(next > fence, "fence {next} after {fence}");
}

/// The command's exit code is distrlock's; a signal death is 128+N.
fn run_propagates_the_exit_code(t: &Target) {
    let key = t.key("exit");
    let out = t.output(["run", "--key", &key, "--", "sh", "-c", "exit 7"]);
    assert_eq!(code(&out), 7);
    let out = t.output(["run", "--key", &key, "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(code(&out), 128 + 15);
    let out = t.output(["run", "--key", &key, "--", "true"]);
    assert_eq!(code(&out), 0);
    assert_eq!(t.state(&key).as_deref(), Some("released"));
    let out = t.output(["run", "--key", &key, "--", "/no/such/program"]);
    assert_eq!(code(&out), 127, "{}", stderr(&out));
    assert_eq!(
        t.state(&key).as_deref(),
        Some("released"),
        "released when the command cannot start"
    );
}

/// Six `distrlock run` processes on one key: their commands never overlap, and
/// each sees a greater fence than the one before.
fn concurrent_runs_never_overlap(t: &Target) {
    let key = t.key("overlap");
    let log = t.file("overlap.log");
    let script = format!(
        "echo \"start $$ $DISTRLOCK_FENCE\" >> '{0}'; sleep 0.15; echo \"end $$\" >> '{0}'",
        log.display()
    );
    let children: Vec<Child> = (0..6)
        .map(|_| {
            t.cmd([
                "run", "--key", &key, "--wait", "60s", "--", "sh", "-c", &script,
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    for mut child in children {
        assert_eq!(wait_exit(&mut child, Duration::from_secs(90)), 0);
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Vec<&str>> = text.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 12, "six starts and six ends:\n{text}");
    let mut last_fence = 0i64;
    for pair in lines.chunks(2) {
        assert_eq!(pair[0][0], "start", "overlap:\n{text}");
        assert_eq!(pair[1][0], "end", "overlap:\n{text}");
        assert_eq!(
            pair[0][1], pair[1][1],
            "another command ran in between:\n{text}"
        );
        let fence: i64 = pair[0][2].parse().unwrap();
        assert!(fence > last_fence, "fence {fence} after {last_fence}");
        last_fence = fence;
    }
}

/// Without --wait a held lock is refused at once with 75 (or the conflict code)
/// and the command does not run; --wait waits that long; a long enough wait
/// gets the lock when the holder finishes.
fn wait_timing_and_conflict_codes(t: &Target) {
    let key = t.key("wait");
    let holder = spawn_run(t, &["--key", &key], "sleep 4");
    t.wait_held(&key);
    let marker = t.file("ran");
    let touch = format!("touch '{}'", marker.display());

    let started = Instant::now();
    let out = t.output(["run", "--key", &key, "--", "sh", "-c", &touch]);
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "no wait by default"
    );
    assert!(stderr(&out).contains("held by "), "{}", stderr(&out));

    let out = t.output([
        "run",
        "--key",
        &key,
        "--conflict-exit-code",
        "9",
        "-q",
        "--",
        "sh",
        "-c",
        &touch,
    ]);
    assert_eq!(code(&out), 9);
    assert!(
        stderr(&out).is_empty(),
        "-q silences the refusal: {}",
        stderr(&out)
    );

    let started = Instant::now();
    let out = t.output([
        "run", "--key", &key, "--wait", "1s", "--", "sh", "-c", &touch,
    ]);
    let waited = started.elapsed();
    assert_eq!(code(&out), 75);
    assert!(
        waited >= Duration::from_secs(1),
        "gave up early: {waited:?}"
    );
    assert!(waited < Duration::from_secs(4), "gave up late: {waited:?}");
    assert!(
        stderr(&out).contains("waiting"),
        "a wait over a second says who holds the lock: {}",
        stderr(&out)
    );

    let out = t.output(["acquire", "--key", &key]);
    assert_eq!(code(&out), 75, "acquire refuses too");
    assert!(!marker.exists(), "a refused run must not run the command");

    let started = Instant::now();
    let out = t.output([
        "run", "--key", &key, "--wait", "30s", "--", "sh", "-c", &touch,
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(marker.exists());
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?} to notice the release",
        started.elapsed()
    );
    drop(holder);
}

/// A holder killed with SIGKILL cannot release; its lock is taken over once its
/// lease runs out, not before, and not much later.
fn killed_holder_is_taken_over_after_the_ttl(t: &Target) {
    let key = t.key("killed");
    let mut holder = spawn_run(t, &["--key", &key, "--ttl", "2s"], "exec sleep 60");
    t.wait_held(&key);
    let fence = t.lock(&key).unwrap()["fence"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let killed = Instant::now();
    let out = t.output([
        "run",
        "--key",
        &key,
        "--wait",
        "20s",
        "--",
        "sh",
        "-c",
        "echo $DISTRLOCK_FENCE",
    ]);
    let took = killed.elapsed();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let next: i64 = stdout(&out).trim().parse().unwrap();
    assert!(next > fence);
    // The last extend was at most ttl/3 before the kill, so the lease had at
    // least 2/3 of 2 s left.
    assert!(
        took >= Duration::from_millis(1200),
        "taken over after {took:?}: too early"
    );
    assert!(
        took < Duration::from_secs(5),
        "taken over after {took:?}: too late"
    );
}

/// A holder that stalls past its lease (SIGSTOP: a VM pause or a swap storm)
/// loses the lock to another process; when it runs again it stops its command
/// (SIGTERM) and exits 70.
fn stalled_holder_stops_its_command_when_it_resumes(t: &Target) {
    let key = t.key("stalled");
    let log = t.file("term.log");
    let holder_script = format!(
        "trap 'echo term >> \"{}\"; exit 0' TERM; while :; do sleep 0.05; done",
        log.display()
    );
    let mut holder = spawn_run(
        t,
        &["--key", &key, "--ttl", "1500ms", "--kill-grace", "500ms"],
        &holder_script,
    );
    t.wait_held(&key);
    let pid = holder.pid();
    t.pause(pid);
    wait_until(Duration::from_secs(10), || {
        t.state(&key).as_deref() == Some("expired")
    });
    let out = t.output(["acquire", "--key", &key, "--ttl", "30s"]);
    let resumed = Instant::now();
    kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(code(&out), 0, "the expired lock is taken: {}", stderr(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(wait_exit(&mut holder.child, Duration::from_secs(10)), 70);
    assert!(resumed.elapsed() < Duration::from_secs(5));
    wait_until(Duration::from_secs(5), || log.exists());
    assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), "term");
    let mut err = String::new();
    use std::io::Read as _;
    holder
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("was lost"), "{err}");
    let lock = t.lock(&key).unwrap();
    assert_eq!(lock["state"], "held", "the new holder keeps the lock");
    assert_eq!(lock["fence"], lease["fence"]);
}

/// SIGTERM and SIGINT to distrlock reach the command; distrlock exits with the
/// command's code and releases.
fn signals_are_forwarded(t: &Target) {
    for (signal, name, exit) in [(Signal::SIGTERM, "TERM", 3), (Signal::SIGINT, "INT", 4)] {
        let key = t.key(&format!("signal-{name}"));
        let log = t.file(&format!("{name}.log"));
        let script = format!(
            "trap 'echo {name} >> \"{}\"; exit {exit}' {name}; while :; do sleep 0.05; done",
            log.display()
        );
        let mut holder = spawn_run(t, &["--key", &key], &script);
        t.wait_held(&key);
        wait_until(Duration::from_secs(5), || {
            holder
                .pidfile
                .as_ref()
                .is_some_and(|p| read_pid(p).is_some())
        });
        kill(holder.pid(), signal).unwrap();
        assert_eq!(wait_exit(&mut holder.child, Duration::from_secs(10)), exit);
        assert_eq!(std::fs::read_to_string(&log).unwrap().trim(), name);
        assert_eq!(t.state(&key).as_deref(), Some("released"));
    }
}

/// SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGALRM to distrlock reach the
/// command too (a closed terminal sends SIGHUP to `distrlock run … &`), and
/// distrlock keeps the lock until the command has exited: no other run gets it
/// meanwhile.
fn other_signals_are_forwarded_and_the_lock_kept(t: &Target) {
    for (signal, name) in [
        (Signal::SIGHUP, "HUP"),
        (Signal::SIGQUIT, "QUIT"),
        (Signal::SIGUSR1, "USR1"),
        (Signal::SIGUSR2, "USR2"),
        (Signal::SIGALRM, "ALRM"),
    ] {
        let key = t.key(&format!("signal-{name}"));
        let log = t.file(&format!("{name}.log"));
        // On the signal: note it, go on for a while (finishing its work), exit 5.
        let script = format!(
            "trap 'echo {name} >> \"{log}\"; sleep 1.5; echo done >> \"{log}\"; exit 5' {name}; \
             while :; do sleep 0.05; done",
            log = log.display()
        );
        let mut holder = spawn_run(t, &["--key", &key], &script);
        t.wait_held(&key);
        let pid = wait_pid(holder.pidfile.as_ref().unwrap());
        kill(holder.pid(), signal).unwrap();
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&log).is_ok_and(|l| l.starts_with(name))
        });
        assert!(alive(pid), "{name}: the command is still finishing");
        let out = t.output(["run", "--key", &key, "--", "true"]);
        assert_eq!(
            code(&out),
            75,
            "{name}: the lock must stay held while the command runs: {}",
            stderr(&out)
        );
        let status = {
            let start = Instant::now();
            loop {
                if let Some(status) = holder.child.try_wait().unwrap() {
                    break status;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "{name}: no exit");
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        assert_eq!(
            status.code(),
            Some(5),
            "{name}: distrlock exits with the command's code, not killed by the signal"
        );
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            format!("{name}\ndone\n"),
            "{name}: the command got the signal once and finished"
        );
        assert!(!alive(pid));
        assert_eq!(t.state(&key).as_deref(), Some("released"));
    }
}

/// Steps that the command leaves running in the background (`x &`, `nohup`)
/// keep the lock: distrlock releases only once they have ended too, and says
/// so. With --kill-leftovers it stops them instead (SIGTERM), then releases.
fn background_steps_keep_the_lock(t: &Target) {
    let key = t.key("leftovers");
    let bg = t.file("bg-pid");
    let script = format!("sleep 2 & echo $! > '{}'; exit 0", bg.display());
    let started = Instant::now();
    let mut holder = spawn_run(t, &["--key", &key], &script);
    let cmd = wait_pid(holder.pidfile.as_ref().unwrap());
    let bg_pid = wait_pid(&bg);
    let _cleanup = KillOnDrop(vec![bg_pid]);
    wait_until(Duration::from_secs(5), || !alive(cmd));
    assert!(alive(bg_pid), "the background step still runs");
    let out = t.output(["run", "--key", &key, "--", "true"]);
    assert_eq!(
        code(&out),
        75,
        "the lock stays held while the command's background step runs: {}",
        stderr(&out)
    );
    assert_eq!(wait_exit(&mut holder.child, Duration::from_secs(10)), 0);
    assert!(!alive(bg_pid));
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "released only after the background step ended"
    );
    let mut err = String::new();
    use std::io::Read as _;
    holder
        .child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(err.contains("left running"), "a note says why: {err}");
    assert_eq!(t.state(&key).as_deref(), Some("released"));

    // --kill-leftovers: the background step is stopped, the lock released.
    let script = format!("sleep 60 & echo $! > '{}'; exit 3", bg.display());
    let _ = std::fs::remove_file(&bg);
    let started = Instant::now();
    let mut holder = spawn_run(t, &["--key", &key, "--kill-leftovers"], &script);
    let bg_pid = wait_pid(&bg);
    let _cleanup = KillOnDrop(vec![bg_pid]);
    assert_eq!(wait_exit(&mut holder.child, Duration::from_secs(15)), 3);
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_until(Duration::from_secs(2), || !alive(bg_pid));
    assert_eq!(t.state(&key).as_deref(), Some("released"));
}

/// A signal while waiting ends the wait (128+N) without running the command.
fn a_signal_while_waiting_gives_up(t: &Target) {
    let key = t.key("wait-signal");
    let _holder = spawn_run(t, &["--key", &key], "sleep 30");
    t.wait_held(&key);
    let marker = t.file("ran");
    let mut waiter = t
        .cmd([
            "run",
            "--key",
            &key,
            "--wait",
            "forever",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    kill(Pid::from_raw(waiter.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(wait_exit(&mut waiter, Duration::from_secs(10)), 143);
    assert!(!marker.exists());
    assert_eq!(
        t.state(&key).as_deref(),
        Some("held"),
        "the holder keeps it"
    );
}

/// `acquire` leaves the lock held after exiting; `extend` and `release` work
/// with its token; a stale token exits 1 and changes nothing.
fn acquire_extend_release_across_processes(t: &Target) {
    let key = t.key("script");
    let out = t.output([
        "acquire",
        "--key",
        &key,
        "--ttl",
        "20s",
        "--owner",
        "deploy-script",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).expect("acquire prints JSON");
    assert_eq!(lease["key"], key.as_str());
    assert_eq!(lease["owner"], "deploy-script");
    assert_eq!(lease["ttl_ms"], 20_000);
    let token = lease["token"].as_str().unwrap().to_owned();
    let fence = lease["fence"].as_i64().unwrap();
    assert!(lease["expires_at"].as_str().unwrap().ends_with('Z'));

    // Held after acquire exited.
    let lock = t.lock(&key).unwrap();
    assert_eq!(lock["state"], "held");
    assert_eq!(lock["owner"], "deploy-script");
    assert_eq!(code(&t.output(["run", "--key", &key, "--", "true"])), 75);

    let out = t.output(["extend", "--key", &key, "--token", &token, "--ttl", "1m"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let extended: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(extended["fence"], fence, "extending keeps the fence");
    assert!(
        extended["expires_at_unix_ms"].as_u64().unwrap()
            > lease["expires_at_unix_ms"].as_u64().unwrap()
    );
    let remaining = t.lock(&key).unwrap()["remaining_ms"].as_u64().unwrap();
    assert!(
        remaining > 30_000,
        "extended to a minute: {remaining} ms left"
    );

    let stale = "00000000-0000-4000-8000-000000000000";
    let out = t.output(["release", "--key", &key, "--token", stale]);
    assert_eq!(code(&out), 1);
    assert!(
        stderr(&out).contains("not held by this token"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        stderr(&out).lines().count(),
        1,
        "one line: {}",
        stderr(&out)
    );
    assert_eq!(
        t.state(&key).as_deref(),
        Some("held"),
        "a stale token changes nothing"
    );

    let out = t.output(["release", "--key", &key, "--token", &token]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(t.state(&key).as_deref(), Some("released"));
    assert_eq!(
        code(&t.output(["release", "--key", &key, "--token", &token])),
        1
    );
    assert_eq!(
        code(&t.output(["extend", "--key", &key, "--token", &token])),
        1
    );

    let out = t.output([
        "run",
        "--key",
        &key,
        "--",
        "sh",
        "-c",
        "echo $DISTRLOCK_FENCE",
    ]);
    assert_eq!(code(&out), 0);
    assert!(stdout(&out).trim().parse::<i64>().unwrap() > fence);
}

/// `status` shows the database, and each lock's owner, fence, state and time
/// left, as a table and as JSON.
fn status_shows_owner_fence_state_and_time_left(t: &Target) {
    let key = t.key("status");
    let holder = spawn_run(
        t,
        &["--key", &key, "--ttl", "40s", "--owner", "nightly@web1"],
        "sleep 30",
    );
    t.wait_held(&key);
    let out = t.output(["status", "--key", &key]);
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    assert!(text.contains("database:"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{key:?}")))
        .expect("a row for the key");
    for column in ["held", "nightly@web1", " left"] {
        assert!(row.contains(column), "{column:?} missing from {row:?}");
    }
    let lock = t.lock(&key).unwrap();
    assert_eq!(lock["owner"], "nightly@web1");
    assert!(lock["fence"].as_i64().unwrap() >= 1);
    let left = lock["remaining_ms"].as_u64().unwrap();
    assert!((20_000..=40_000).contains(&left), "{left} ms left of 40 s");
    assert!(lock["expires_at"].is_string());
    assert_eq!(holder.stop(), 143);
    assert_eq!(t.state(&key).as_deref(), Some("released"));

    // A ttl with room for a slow try on a loaded machine: a try is bounded by
    // the ttl less the safety margin.
    let out = t.output(["acquire", "--key", &key, "--ttl", "1s"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    std::thread::sleep(Duration::from_millis(1500));
    let lock = t.lock(&key).unwrap();
    assert_eq!(lock["state"], "expired");
    assert!(lock["remaining_ms"].is_null());
    let out = t.output(["status", "--key", &key]);
    assert!(stdout(&out).contains("expired"), "{}", stdout(&out));

    let missing = t.key("never-taken");
    assert!(t.lock(&missing).is_none());
    let out = t.output(["status", "--key", &missing]);
    assert!(
        stdout(&out).contains("has been taken yet"),
        "{}",
        stdout(&out)
    );
}

/// A refusal without --wait names the holder: owner, fence and time left.
fn a_refusal_names_the_holder(t: &Target) {
    let key = t.key("refusal");
    let out = t.output([
        "acquire",
        "--key",
        &key,
        "--ttl",
        "60s",
        "--owner",
        "nightly@web1",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    let fence = lease["fence"].as_i64().unwrap();
    for args in [
        vec!["run", "--key", &key, "--", "true"],
        vec!["acquire", "--key", &key],
    ] {
        let out = t.output(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), 75, "{args:?}: {err}");
        assert!(err.contains("nightly@web1"), "{args:?}: the owner: {err}");
        assert!(err.contains(&format!("fence {fence}")), "{args:?}: {err}");
        assert!(err.contains("left"), "{args:?}: the time left: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

/// `status` quotes keys, so that `k` and `k ` are told apart.
fn status_quotes_keys(t: &Target) {
    let key = t.key("quoted");
    let spaced = format!("{key} ");
    for k in [&key, &spaced] {
        assert_eq!(code(&t.output(["acquire", "--key", k.as_str()])), 0);
    }
    let text = stdout(&t.output(["status"]));
    assert!(text.contains(&format!("{key:?}")), "{text}");
    assert!(text.contains(&format!("{spaced:?}")), "{text}");
}

/// The habits of flock(1) users work: `-c 'shell string'`, `-E` for the
/// conflict exit code, and bare seconds in --wait and --ttl.
fn flock_habits_work(t: &Target) {
    let key = t.key("flock");
    let out = t.output([
        "run",
        "--key",
        &key,
        "--ttl",
        "30",
        "-c",
        "echo \"$DISTRLOCK_KEY\" && exit 4",
    ]);
    assert_eq!(code(&out), 4, "{}", stderr(&out));
    assert_eq!(stdout(&out).trim(), key);
    let _holder = spawn_run(t, &["--key", &key], "sleep 20");
    t.wait_held(&key);
    let out = t.output(["run", "--key", &key, "-E", "9", "--", "true"]);
    assert_eq!(code(&out), 9, "{}", stderr(&out));
    let started = Instant::now();
    let out = t.output(["run", "--key", &key, "--wait", "1", "-E", "0", "-c", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited a second"
    );
}

/// `-v` (and RUST_LOG) shows the library's tracing events on stderr.
fn verbose_shows_the_library_events(t: &Target) {
    let key = t.key("verbose");
    let out = t.output(["-v", "run", "--key", &key, "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("lock released"), "{}", stderr(&out));
    let out = t
        .cmd(["run", "--key", &key, "--", "true"])
        .env("RUST_LOG", "distrlock_core=debug")
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stderr(&out).contains("lock released"), "{}", stderr(&out));
    let quiet = t.output(["run", "--key", &key, "--", "true"]);
    assert!(stderr(&quiet).is_empty(), "{}", stderr(&quiet));
}

/// Bad input exits 2 with one clear line and touches nothing.
fn bad_input_exits_2(t: &Target) {
    let key = t.key("bad");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--url".into(),
                "redis://user:hunter2@h/0".into(),
                "status".into(),
            ],
            "unsupported scheme",
        ),
        (
            vec![
                "run".into(),
                "--key".into(),
                key.clone(),
                "--ttl".into(),
                "5parsecs".into(),
                "--".into(),
                "true".into(),
            ],
            "5parsecs",
        ),
        (
            vec![
                "run".into(),
                "--key".into(),
                key.clone(),
                "--wait".into(),
                "soon".into(),
                "--".into(),
                "true".into(),
            ],
            "soon",
        ),
        (
            vec![
                "run".into(),
                "--key".into(),
                String::new(),
                "--".into(),
                "true".into(),
            ],
            "must not be empty",
        ),
        (
            vec![
                "run".into(),
                "--key".into(),
                "x".repeat(256),
                "--".into(),
                "true".into(),
            ],
            "at most 255 bytes",
        ),
        (
            vec![
                "--table".into(),
                "locks; DROP TABLE users".into(),
                "status".into(),
            ],
            "invalid table name",
        ),
        (
            vec![
                "release".into(),
                "--key".into(),
                key.clone(),
                "--token".into(),
                "not-a-token".into(),
            ],
            "UUID",
        ),
        (vec!["run".into(), "--key".into(), key.clone()], "CMD"),
        (
            vec![
                "run".into(),
                "--key".into(),
                key.clone(),
                "--ttl".into(),
                "0s".into(),
                "--".into(),
                "true".into(),
            ],
            "ttl",
        ),
        (
            vec![
                "run".into(),
                "--key".into(),
                key.clone(),
                "--ttl".into(),
                "3ms".into(),
                "--".into(),
                "true".into(),
            ],
            "--ttl 3ms is too short",
        ),
        (
            vec![
                "acquire".into(),
                "--key".into(),
                key.clone(),
                "--ttl".into(),
                "3ms".into(),
            ],
            "--ttl 3ms is too short",
        ),
        (
            vec![
                "run".into(),
                "--key".into(),
                key.clone(),
                "--ttl".into(),
                "30s".into(),
                "--kill-grace".into(),
                "19s".into(),
                "--".into(),
                "true".into(),
            ],
            "--kill-grace 19s is too long",
        ),
        (
            vec![
                "run".into(),
                "--key".into(),
                key.clone(),
                "--owner".into(),
                "x".repeat(300),
                "--".into(),
                "true".into(),
            ],
            "owner",
        ),
    ];
    for (args, expect) in cases {
        let out = t.output(&args);
        let err = stderr(&out);
        assert_eq!(code(&out), 2, "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {expect:?} not in {err}");
        assert!(!err.contains("hunter2"), "a password leaked: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    assert!(t.lock(&key).is_none(), "refused input writes nothing");
}

// ─────────────────────────── cases for server databases ───────────────────────────

/// A table that does not exist exits 69 and says to run `distrlock init`.
fn missing_table_exits_69(t: &Target) {
    let table = format!("dl_missing_{}", unique());
    let out = t
        .cmd(["status"])
        .env("DISTRLOCK_TABLE", &table)
        .output()
        .unwrap();
    assert_eq!(code(&out), 69, "{}", stderr(&out));
    assert!(stderr(&out).contains("distrlock init"), "{}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 1);
}

// ─────────────────────────────────── the matrix ───────────────────────────────────

macro_rules! cli_tests {
    (every: [$($case:ident),* $(,)?], servers: [$($server_case:ident),* $(,)?]) => {
        mod sqlite {
            $(
                #[test]
                fn $case() {
                    super::$case(&super::Target::sqlite());
                }
            )*
        }
        cli_tests!(@server postgres, "DISTRLOCK_TEST_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test"; $($case,)* $($server_case,)*);
        cli_tests!(@server mysql, "DISTRLOCK_TEST_MYSQL_URL",
            "mysql://root@127.0.0.1:3306/test"; $($case,)* $($server_case,)*);
    };
    (@server $db:ident, $env:literal, $default:literal; $($case:ident,)*) => {
        mod $db {
            $(
                #[test]
                fn $case() {
                    let name = concat!(stringify!($db), "::", stringify!($case));
                    if let Some(t) = super::Target::server(stringify!($db), $env, $default, name) {
                        super::$case(&t);
                    }
                }
            )*
        }
    };
}

cli_tests!(
    every: [
        run_gives_the_command_its_lease,
        run_propagates_the_exit_code,
        concurrent_runs_never_overlap,
        wait_timing_and_conflict_codes,
        killed_holder_is_taken_over_after_the_ttl,
        stalled_holder_stops_its_command_when_it_resumes,
        signals_are_forwarded,
        other_signals_are_forwarded_and_the_lock_kept,
        background_steps_keep_the_lock,
        a_signal_while_waiting_gives_up,
        acquire_extend_release_across_processes,
        status_shows_owner_fence_state_and_time_left,
        bad_input_exits_2,
        a_refusal_names_the_holder,
        status_quotes_keys,
        flock_habits_work,
        verbose_shows_the_library_events,
    ],
    servers: [missing_table_exits_69]
);

// ──────────────────────────────── SQLite and local ────────────────────────────────

/// A takeover found by the heartbeat (another token in the row) stops the
/// command with SIGTERM, then SIGKILL after --kill-grace, and exits 70.
#[test]
fn sqlite_taken_over_lock_kills_a_stubborn_command() {
    let t = Target::sqlite();
    let key = t.key("taken");
    let log = t.file("ignored.log");
    // Ignores SIGTERM: only SIGKILL ends it.
    let script = format!(
        "trap 'echo ignored-term >> \"{}\"' TERM; while :; do sleep 0.05; done",
        log.display()
    );
    let mut holder = spawn_run(
        &t,
        &["--key", &key, "--ttl", "3s", "--kill-grace", "1s"],
        &script,
    );
    t.wait_held(&key);
    let conn = rusqlite::Connection::open(t.sqlite_path.as_ref().unwrap()).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let changed = conn
        .execute(
            "UPDATE distributed_locks SET token = '00000000-0000-4000-8000-000000000001' \
             WHERE lock_key = ?1",
            [&key],
        )
        .unwrap();
    assert_eq!(changed, 1);
    let taken = Instant::now();
    assert_eq!(wait_exit(&mut holder.child, Duration::from_secs(10)), 70);
    let took = taken.elapsed();
    // Found by the next extend (every ttl/3 = 1 s), then 1 s of grace.
    assert!(took >= Duration::from_secs(1), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().trim(),
        "ignored-term"
    );
    let pid = read_pid(holder.pidfile.as_ref().unwrap()).unwrap();
    assert!(
        kill(pid, None).is_err(),
        "the command that ignored SIGTERM was killed"
    );
}

/// SIGKILL of distrlock (which it cannot catch) kills the command, the
/// command's children, and a child that left the process group with setsid:
/// none of them goes on without the lock.
#[test]
fn sqlite_sigkill_of_distrlock_kills_the_command_and_its_children() {
    let t = Target::sqlite();
    let key = t.key("sigkill");
    let child_file = t.file("child-pid");
    let setsid_file = t.file("setsid-pid");
    let script = format!(
        "sleep 300 & echo $! > '{}'; setsid sleep 300 & echo $! > '{}'; wait",
        child_file.display(),
        setsid_file.display()
    );
    let mut holder = spawn_run(&t, &["--key", &key], &script);
    t.wait_held(&key);
    let pids = [
        wait_pid(holder.pidfile.as_ref().unwrap()),
        wait_pid(&child_file),
        wait_pid(&setsid_file),
    ];
    let _cleanup = KillOnDrop(pids.to_vec());
    std::thread::sleep(Duration::from_millis(200));
    assert!(pids.iter().all(|&p| alive(p)), "all three run: {pids:?}");
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    let killed = Instant::now();
    wait_until(Duration::from_secs(3), || !pids.iter().any(|&p| alive(p)));
    assert!(killed.elapsed() < Duration::from_secs(3));
}

/// SIGKILLs its processes when dropped: a failed test leaves none behind.
struct KillOnDrop(Vec<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
    }
}

/// `url` with its `host:port` replaced by `127.0.0.1:port`, and the address it
/// named: to put a [`FaultProxy`](distrlock_testkit::FaultProxy) in between.
fn through_proxy(url: &str, port: u16) -> (std::net::SocketAddr, String) {
    let start = url
        .find('@')
        .map_or_else(|| url.find("://").unwrap() + 3, |at| at + 1);
    let end = url[start..].find('/').map_or(url.len(), |i| start + i);
    let upstream = url[start..end]
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("a URL with an IP address and a port");
    let proxied = format!("{}127.0.0.1:{port}{}", &url[..start], &url[end..]);
    (upstream, proxied)
}

/// Renewals that keep failing (the path to PostgreSQL freezes) start the stop
/// sequence early: SIGTERM --kill-grace before the local deadline, SIGKILL at
/// it, so that a command that ignores SIGTERM is dead before the lease ends on
/// the server, when another host may take the lock. distrlock exits 70.
#[test]
fn postgres_failing_renewals_kill_a_stubborn_command_before_the_lease_ends() {
    let name = "postgres_failing_renewals_kill_a_stubborn_command_before_the_lease_ends";
    let Some(direct) = Target::server(
        "postgres",
        "DISTRLOCK_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
        name,
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (upstream, _) = through_proxy(&direct.url, 0);
    let proxy = runtime
        .block_on(distrlock_testkit::FaultProxy::start(upstream))
        .unwrap();
    let (_, url) = through_proxy(&direct.url, proxy.port());
    let t = Target {
        url,
        table: direct.table.clone(),
        prefix: direct.prefix.clone(),
        sqlite_path: None,
        dir: tempfile::tempdir().unwrap(),
    };
    let key = t.key("frozen");
    let log = t.file("term.log");
    // Notes SIGTERM and goes on: only SIGKILL ends it.
    let script = format!(
        "trap 'echo term >> \"{}\"' TERM; while :; do sleep 0.02; done",
        log.display()
    );
    let mut holder = spawn_run(
        &t,
        &["--key", &key, "--ttl", "3s", "--kill-grace", "1s"],
        &script,
    );
    direct.wait_held(&key);
    let cmd = wait_pid(holder.pidfile.as_ref().unwrap());
    let _cleanup = KillOnDrop(vec![cmd]);
    std::thread::sleep(Duration::from_millis(1200));
    proxy.freeze();
    let frozen = Instant::now();
    let died_at = loop {
        if !alive(cmd) {
            break std::time::SystemTime::now();
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(8),
            "the command still runs {:?} after the freeze",
            frozen.elapsed()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // Nothing reaches the server through the frozen path: this is the expiry
    // of the last renewal that landed.
    let lock = direct.lock(&key).unwrap();
    let expires =
        std::time::UNIX_EPOCH + Duration::from_millis(lock["expires_at_unix_ms"].as_u64().unwrap());
    assert!(
        died_at < expires,
        "the command died {:?} after the lease ended on the server",
        died_at.duration_since(expires).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("term")),
        "SIGTERM came first"
    );
    drop(proxy);
    assert_eq!(wait_exit(&mut holder.child, Duration::from_secs(30)), 70);
}

/// `status` (of every lock and of one) never panics on a row whose times
/// are before 1970 or after 9999: written directly with SQL.
#[test]
fn sqlite_status_survives_times_out_of_range() {
    let t = Target::sqlite();
    let key = t.key("anchor");
    assert_eq!(code(&t.output(["acquire", "--key", &key])), 0);
    let conn = rusqlite::Connection::open(t.sqlite_path.as_ref().unwrap()).unwrap();
    for (name, at) in [
        ("old", -100_000_000_000_000i64),
        ("far", 300_000_000_000_000_000),
    ] {
        conn.execute(
            "INSERT INTO distributed_locks \
                 (lock_key, token, fence, owner, acquired_at, expires_at, clock, lease_end) \
             SELECT ?1, token, fence, owner, ?2, ?2 + 1000, clock, NULL \
             FROM distributed_locks WHERE lock_key = ?3",
            rusqlite::params![t.key(name), at, key],
        )
        .unwrap();
    }
    check_status_of_odd_rows(&t, &[t.key("old"), t.key("far")]);
}

/// The same on PostgreSQL: timestamptz reaches from 4713 BC to 294276 AD.
#[test]
fn postgres_status_survives_times_out_of_range() {
    let name = "postgres_status_survives_times_out_of_range";
    let Some(t) = Target::server(
        "postgres",
        "DISTRLOCK_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
        name,
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let keys = [t.key("old"), t.key("far")];
    let client = runtime.block_on(async {
        let (client, conn) = tokio_postgres::connect(&t.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
    });
    // Other tests (and other checkouts) list this shared table: the odd rows
    // go again, pass or fail.
    struct Cleanup<'a>(
        &'a tokio::runtime::Runtime,
        &'a tokio_postgres::Client,
        String,
    );
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            let _ = self.0.block_on(self.1.execute(&self.2, &[]));
        }
    }
    let _cleanup = Cleanup(
        &runtime,
        &client,
        format!("DELETE FROM {} WHERE owner = 'odd'", t.table),
    );
    runtime.block_on(async {
        for (key, at) in keys
            .iter()
            .zip(["1900-01-01 00:00:00+00", "12000-01-01 00:00:00+00"])
        {
            client
                .execute(
                    &format!(
                        "INSERT INTO {} (lock_key, token, fence, owner, acquired_at, expires_at) \
                         VALUES ($1, gen_random_uuid(), 1, 'odd', $2::text::timestamptz, \
                         $2::text::timestamptz + interval '1 day')",
                        t.table
                    ),
                    &[key, &at],
                )
                .await
                .unwrap();
        }
    });
    check_status_of_odd_rows(&t, &keys);
}

fn check_status_of_odd_rows(t: &Target, keys: &[String]) {
    for args in [vec!["status"], vec!["status", "--json"]] {
        let out = t.output(&args);
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        assert!(!stderr(&out).contains("internal error"), "{}", stderr(&out));
        for key in keys {
            assert!(
                stdout(&out).contains(key.as_str()),
                "{args:?}: {key} in {}",
                stdout(&out)
            );
        }
    }
    for key in keys {
        let out = t.output(["status", "--key", key]);
        assert_eq!(code(&out), 0, "{key}: {}", stderr(&out));
        let lock = t.lock(key).unwrap();
        assert!(
            lock["acquired_at"].as_str().unwrap().starts_with("unix:"),
            "{lock}"
        );
    }
}

/// `init` on a table that exists but is not a lock table says so, and fails.
#[test]
fn sqlite_init_on_a_foreign_table_fails_clearly() {
    let t = Target::sqlite();
    let conn = rusqlite::Connection::open(t.sqlite_path.as_ref().unwrap()).unwrap();
    conn.execute_batch("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
        .unwrap();
    assert_init_refused(&init_with_table(&t, "users"));
}

/// The same on PostgreSQL.
#[test]
fn postgres_init_on_a_foreign_table_fails_clearly() {
    let name = "postgres_init_on_a_foreign_table_fails_clearly";
    let Some(t) = Target::server(
        "postgres",
        "DISTRLOCK_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
        name,
    ) else {
        return;
    };
    let table = format!("dl_foreign_{}", unique());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (client, conn) = tokio_postgres::connect(&t.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!(
                "CREATE TABLE {table} (id int PRIMARY KEY, name text)"
            ))
            .await
            .unwrap();
        let out = init_with_table(&t, &table);
        client
            .batch_execute(&format!("DROP TABLE {table}"))
            .await
            .unwrap();
        assert_init_refused(&out);
    });
}

fn init_with_table(t: &Target, table: &str) -> Output {
    t.cmd(["init"])
        .env("DISTRLOCK_TABLE", table)
        .output()
        .unwrap()
}

fn assert_init_refused(out: &Output) {
    let err = stderr(out);
    assert_ne!(code(out), 0, "{err}");
    assert!(err.contains("not a distrlock lock table"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

/// SIGTERM while `run` waits behind another process's lock: distrlock exits
/// 143 and leaves no lease of its own; the holder's lock is untouched, and once
/// the holder releases, the key is free within one turn of the key's line
/// (the gone waiter's ticket holds the line up that long, 250 ms).
#[test]
fn sqlite_a_signal_while_waiting_leaves_no_lease_behind() {
    let t = Target::sqlite();
    let key = t.key("term-wait");
    let out = t.output([
        "acquire", "--key", &key, "--ttl", "60s", "--owner", "holder",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = lease["token"].as_str().unwrap().to_owned();
    let mut waiter = t
        .cmd(["run", "--wait", "30s", "--key", &key, "--", "true"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    kill(Pid::from_raw(waiter.id() as i32), Signal::SIGTERM).unwrap();
    assert_eq!(wait_exit(&mut waiter, Duration::from_secs(30)), 143);
    let lock = t.lock(&key).unwrap();
    assert_eq!(lock["state"], "held");
    assert_eq!(lock["owner"], "holder", "only the original holder");
    assert_eq!(lock["fence"], lease["fence"]);
    let out = t.output(["release", "--key", &key, "--token", &token]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let released = std::time::Instant::now();
    loop {
        let out = t.output(["acquire", "--key", &key]);
        if code(&out) == 0 {
            break;
        }
        assert!(
            released.elapsed() < Duration::from_secs(2),
            "not free within a turn of the release: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM while a try of `run` is in flight and about to be granted: core's
/// cleanup waits for that try and releases what it was granted before
/// distrlock exits. The try is held up on the SQLite file's write lock, taken
/// by this test in a transaction that also frees the holder's row, and
/// committed only after the signal.
#[test]
fn sqlite_a_signal_during_a_granted_try_releases_it_before_exiting() {
    let t = Target::sqlite();
    let key = t.key("term-try");
    let out = t.output([
        "acquire", "--key", &key, "--ttl", "60s", "--owner", "holder",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let fence = t.lock(&key).unwrap()["fence"].as_i64().unwrap();
    let mut waiter = t
        .cmd(["run", "--wait", "30s", "--key", &key, "--", "true"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut conn = rusqlite::Connection::open(t.sqlite_path.as_ref().unwrap()).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    // The holder's release, not yet visible: the waiter's next try blocks on
    // the write lock (its busy timeout is 5 s; it polls at least every second).
    let changed = tx
        .execute(
            "UPDATE distributed_locks SET lease_end = NULL, expires_at = NULL \
             WHERE lock_key = ?1",
            [&key],
        )
        .unwrap();
    assert_eq!(changed, 1);
    std::thread::sleep(Duration::from_millis(1500));
    kill(Pid::from_raw(waiter.id() as i32), Signal::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tx.commit().unwrap();
    assert_eq!(wait_exit(&mut waiter, Duration::from_secs(30)), 143);
    let lock = t.lock(&key).unwrap();
    assert_eq!(
        lock["fence"].as_i64().unwrap(),
        fence + 1,
        "the try in flight at the signal was granted"
    );
    assert_eq!(lock["state"], "released", "and released before exiting");
    let out = t.output(["acquire", "--key", &key]);
    assert_eq!(code(&out), 0, "free at once: {}", stderr(&out));
}

/// `acquire` prints the lease's expiry on the database's clock without reading
/// the row again; `release --token` ends it, and the key is free at once.
#[test]
fn sqlite_acquire_then_release_round_trip() {
    let t = Target::sqlite();
    let key = t.key("round-trip");
    let out = t.output(["acquire", "--key", &key, "--ttl", "45s"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    let lock = t.lock(&key).unwrap();
    assert_eq!(lock["state"], "held");
    assert_eq!(lock["fence"], lease["fence"]);
    assert_eq!(lock["owner"], lease["owner"]);
    let printed = lease["expires_at_unix_ms"].as_i64().unwrap();
    let stored = lock["expires_at_unix_ms"].as_i64().unwrap();
    assert!(
        (printed - stored).abs() < 1000,
        "printed expiry {printed} vs stored {stored}"
    );
    let token = lease["token"].as_str().unwrap();
    let out = t.output(["release", "--key", &key, "--token", token]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(t.state(&key).as_deref(), Some("released"));
    let out = t.output(["acquire", "--key", &key]);
    assert_eq!(code(&out), 0, "free at once: {}", stderr(&out));
    let next: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(next["fence"].as_i64() > lease["fence"].as_i64());
}

/// With no --url, locks live in $XDG_STATE_HOME/distrlock/locks.db, created on
/// first use, and `status` says so.
#[test]
fn default_database_is_a_per_user_sqlite_file() {
    let state = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env_remove("DISTRLOCK_URL")
            .env_remove("DISTRLOCK_TABLE")
            .env("XDG_STATE_HOME", state.path())
            .output()
            .unwrap()
    };
    let out = cmd(&["run", "--key", "demo", "--", "echo", "hello"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello\n");
    let file = state.path().join("distrlock").join("locks.db");
    assert!(file.exists(), "{} was created", file.display());
    let out = cmd(&["status"]);
    let text = stdout(&out);
    assert!(text.contains(&file.display().to_string()), "{text}");
    assert!(text.contains("demo"), "{text}");
}

/// A database that cannot be opened, and servers that are not there, exit 69
/// with one line and no password.
#[test]
fn unreachable_databases_exit_69_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("sqlite://{}/no/such/dir/locks.db", dir.path().display());
    for url in [
        missing.as_str(),
        "postgres://app:hunter2@127.0.0.1:1/db",
        "mysql://root:hunter2@127.0.0.1:1/db",
    ] {
        let out = Command::new(BIN)
            .args(["--url", url, "run", "--key", "k", "--", "true"])
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(code(&out), 69, "{url}: {err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        assert!(err.starts_with("distrlock: "), "{err}");
        assert!(!err.contains("hunter2"), "a password leaked: {err}");
    }
}

/// `schema` prints the DDL without touching the database.
#[test]
fn schema_prints_ddl_offline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent").join("locks.db");
    let out = Command::new(BIN)
        .args([
            "--url",
            &format!("sqlite://{}", path.display()),
            "--table",
            "job_locks",
            "schema",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert!(stdout(&out).starts_with("CREATE TABLE IF NOT EXISTS \"job_locks\""));
    assert!(!path.exists());
    let out = Command::new(BIN)
        .args([
            "--url",
            "sqlite:///tmp/x.db",
            "--table",
            "main.locks",
            "schema",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "SQLite has no schemas: {}", stderr(&out));
}

/// `--help` of the tool and of every command documents its options.
#[test]
fn help_is_complete() {
    let help = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(code(&out), 0, "{args:?}");
        stdout(&out)
    };
    let top = help(&["--help"]);
    for word in [
        "run",
        "acquire",
        "extend",
        "release",
        "status",
        "init",
        "schema",
        "--url",
        "DISTRLOCK_URL",
        "--table",
        "DISTRLOCK_TABLE",
        "--quiet",
        "Exit codes",
        "69",
        "75",
    ] {
        assert!(top.contains(word), "--help lacks {word:?}:\n{top}");
    }
    let run = help(&["run", "--help"]);
    for word in [
        "--key",
        "--ttl",
        "--wait",
        "forever",
        "--owner",
        "--conflict-exit-code",
        "--kill-grace",
        "DISTRLOCK_TOKEN",
        "DISTRLOCK_FENCE",
        "SIGTERM",
        "[default: 30s]",
        "[default: 10s",
    ] {
        assert!(run.contains(word), "run --help lacks {word:?}:\n{run}");
    }
    for (cmd, words) in [
        (
            "acquire",
            &["--key", "--ttl", "--wait", "--owner", "JSON", "token"][..],
        ),
        ("extend", &["--key", "--token", "--ttl"][..]),
        ("release", &["--key", "--token"][..]),
        ("status", &["--key", "--json"][..]),
        ("init", &["--url"][..]),
        ("schema", &["--table"][..]),
    ] {
        let text = help(&[cmd, "--help"]);
        for word in words {
            assert!(text.contains(word), "{cmd} --help lacks {word:?}:\n{text}");
        }
    }
}

/// `distrlock completions SHELL` and `distrlock man` print what packagers
/// install, generated from the same definition as the parser.
#[test]
fn completions_and_man_page_are_generated() {
    for (shell, expect) in [
        ("bash", "_distrlock()"),
        ("zsh", "#compdef distrlock"),
        ("fish", "complete -c distrlock"),
        ("elvish", "distrlock"),
        ("powershell", "distrlock"),
    ] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{shell}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains(expect), "{shell}: {expect:?} not in {text}");
        assert!(
            text.contains("kill-leftovers"),
            "{shell}: run's options too"
        );
    }
    let out = Command::new(BIN).arg("man").output().unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let page = stdout(&out);
    assert!(
        page.starts_with(".ie") || page.contains(".TH distrlock"),
        "{page}"
    );
    for word in ["distrlock", "run", "acquire", "status", "Exit codes"] {
        assert!(page.contains(word), "the man page lacks {word:?}");
    }
    let help = stdout(&Command::new(BIN).arg("--help").output().unwrap());
    assert!(!help.contains("completions"), "hidden from --help: {help}");
}

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// `distrlock run -- true` on PostgreSQL costs one connection and, on it,
/// the session setup, the acquire and the release: no listening connection
/// for a try without --wait, no second pooled connection, no extra read.
#[test]
fn postgres_run_true_uses_one_connection_and_three_statements() {
    let name = "postgres_run_true_uses_one_connection_and_three_statements";
    let Some(direct) = Target::server(
        "postgres",
        "DISTRLOCK_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
        name,
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (upstream, _) = through_proxy(&direct.url, 0);
    let proxy = runtime
        .block_on(counting_proxy::CountingProxy::start(upstream))
        .unwrap();
    let (_, url) = through_proxy(&direct.url, proxy.addr.port());
    // Counted in plain text: the proxy reads the protocol (`prefer`, the
    // default, would encrypt it against a server that offers TLS).
    let url = with_param(&url, "sslmode=disable");
    let key = direct.key("cheap");
    let out = direct
        .cmd(["run", "--key", &key, "--", "true"])
        .env("DISTRLOCK_URL", &url)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let counts = proxy.counts();
    eprintln!(
        "run -- true: {} connections, {counts:?}",
        proxy.connections()
    );
    assert_eq!(proxy.connections(), 1, "{counts:?}");
    // The setup (session settings and a clock reading, one simple query), the
    // acquire and the release; each of these is prepared first (a Parse and
    // Describe answered before the Bind and Execute).
    assert_eq!(counts.get('Q'), 1, "{counts:?}");
    assert_eq!(counts.get('E'), 2, "{counts:?}");
    assert!(counts.round_trips() <= 5, "{counts:?}");

    // A refusal: the try and the one read that names the holder, no release.
    assert_eq!(code(&direct.output(["acquire", "--key", &key])), 0);
    let before = proxy.counts();
    let connections = proxy.connections();
    let out = direct
        .cmd(["run", "--key", &key, "--", "true"])
        .env("DISTRLOCK_URL", &url)
        .output()
        .unwrap();
    assert_eq!(code(&out), 75, "{}", stderr(&out));
    let counts = proxy.counts().since(&before);
    assert_eq!(proxy.connections() - connections, 1, "{counts:?}");
    assert_eq!(counts.get('Q'), 1, "{counts:?}");
    assert_eq!(counts.get('E'), 2, "the try and the inspect: {counts:?}");
}

/// A MariaDB URL of several hosts with `max_clock_skew`, as the README shows
/// for a Galera cluster: the backend's own URL parsing takes it, skips the dead
/// first host and runs the command on the next.
#[test]
fn mysql_several_hosts_and_max_clock_skew_in_the_url() {
    let name = "mysql_several_hosts_and_max_clock_skew_in_the_url";
    let Some(direct) = Target::server(
        "mysql",
        "DISTRLOCK_TEST_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
        name,
    ) else {
        return;
    };
    // A closed port first: refused at once, so the next host is used.
    let (scheme, rest) = direct.url.split_once("://").unwrap();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let at = rest[..end].rfind('@').map_or(0, |at| at + 1);
    let mut url = format!("{scheme}://{}127.0.0.1:1,{}", &rest[..at], &rest[at..]);
    url.push(if url.contains('?') { '&' } else { '?' });
    url.push_str("max_clock_skew=500ms&prefer_socket=false");
    let key = direct.key("several-hosts");
    let out = direct
        .cmd(["run", "--key", &key, "--", "true"])
        .env("DISTRLOCK_URL", &url)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{url}: {}", stderr(&out));
    let bad = direct
        .cmd(["status"])
        .env("DISTRLOCK_URL", url.replace("500ms", "soon"))
        .output()
        .unwrap();
    assert_eq!(code(&bad), 2, "{}", stderr(&bad));
    assert!(stderr(&bad).contains("max_clock_skew"), "{}", stderr(&bad));
}

/// The same on MariaDB, counted as connections.
#[test]
fn mysql_run_true_and_release_use_one_connection() {
    let name = "mysql_run_true_and_release_use_one_connection";
    let Some(direct) = Target::server(
        "mysql",
        "DISTRLOCK_TEST_MYSQL_URL",
        "mysql://root@127.0.0.1:3306/test",
        name,
    ) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (upstream, _) = through_proxy(&direct.url, 0);
    let key = direct.key("cheap");
    for args in [
        vec!["run", "--key", &key, "--", "true"],
        vec!["acquire", "--key", &key],
        vec!["status", "--key", &key],
    ] {
        let proxy = runtime
            .block_on(distrlock_testkit::FaultProxy::start(upstream))
            .unwrap();
        let (_, url) = through_proxy(&direct.url, proxy.port());
        // Without TLS: `prefer` against a server that offers none costs a
        // second connection (mysql_async cannot fall back on the first).
        let url = with_param(&url, "ssl-mode=DISABLED");
        let out = direct
            .cmd(&args)
            .env("DISTRLOCK_URL", &url)
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{args:?}: {}", stderr(&out));
        assert_eq!(proxy.accepted_connections(), 1, "{args:?}");
        if args[0] == "acquire" {
            let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
            let token = lease["token"].as_str().unwrap().to_owned();
            let proxy = runtime
                .block_on(distrlock_testkit::FaultProxy::start(upstream))
                .unwrap();
            let (_, url) = through_proxy(&direct.url, proxy.port());
            let url = with_param(&url, "ssl-mode=DISABLED");
            let out = direct
                .cmd(["release", "--key", &key, "--token", &token])
                .env("DISTRLOCK_URL", &url)
                .output()
                .unwrap();
            assert_eq!(code(&out), 0, "{}", stderr(&out));
            assert_eq!(proxy.accepted_connections(), 1, "release");
        }
    }
}

/// A wait longer than any clock can count (`--wait 500000000000y`) waits like
/// `forever`, without a panic, and a signal ends it as usual.
#[test]
fn sqlite_an_enormous_wait_waits_without_panicking() {
    let t = Target::sqlite();
    let key = t.key("enormous");
    assert_eq!(
        code(&t.output(["acquire", "--key", &key, "--ttl", "60s"])),
        0
    );
    for args in [
        vec!["acquire", "--key", &key, "--wait", "500000000000y"],
        vec![
            "run",
            "--key",
            &key,
            "--wait",
            "500000000000y",
            "--",
            "true",
        ],
    ] {
        let mut waiter = t
            .cmd(&args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        assert!(
            waiter.try_wait().unwrap().is_none(),
            "{args:?}: still waiting"
        );
        kill(Pid::from_raw(waiter.id() as i32), Signal::SIGTERM).unwrap();
        assert_eq!(
            wait_exit(&mut waiter, Duration::from_secs(10)),
            143,
            "{args:?}"
        );
        let mut err = String::new();
        use std::io::Read as _;
        waiter
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(!err.contains("internal error"), "{args:?}: {err}");
    }
}

/// PostgreSQL's table-wide max_ttl: a longer --ttl is a usage error that says how
/// to raise it, and `init --max-ttl` raises it.
#[test]
fn postgres_init_max_ttl_bounds_every_ttl() {
    let name = "postgres_init_max_ttl_bounds_every_ttl";
    let Some(mut t) = Target::server(
        "postgres",
        "DISTRLOCK_TEST_POSTGRES_URL",
        "postgres://postgres@127.0.0.1:5432/test",
        name,
    ) else {
        return;
    };
    t.table = format!("dl_cli_max_ttl_{}", unique());
    let init = t.output(["init"]);
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    let key = t.key("long");
    let out = t.output(["acquire", "--key", &key, "--ttl", "10m"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("--max-ttl"), "{}", stderr(&out));

    let init = t.output(["init", "--max-ttl", "15m"]);
    assert_eq!(code(&init), 0, "{}", stderr(&init));
    let out = t.output(["acquire", "--key", &key, "--ttl", "10m"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = lease["token"].as_str().unwrap().to_owned();
    let out = t.output(["extend", "--key", &key, "--token", &token, "--ttl", "16m"]);
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = t.output(["release", "--key", &key, "--token", &token]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (client, conn) = tokio_postgres::connect(&t.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP TABLE IF EXISTS \"{}\"", t.table))
            .await
            .unwrap();
    });
}

/// A `run` waiting behind another process's lock is woken by that lock's
/// release in a third process (the release finds it in line and sends a
/// datagram to its socket beside the file), and leaves no socket behind
/// when it exits.
#[test]
fn sqlite_a_waiting_run_is_woken_by_another_process_and_leaves_no_socket_behind() {
    let t = Target::sqlite();
    let key = t.key("woken");
    let out = t.output([
        "acquire", "--key", &key, "--ttl", "60s", "--owner", "holder",
    ]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let lease: Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = lease["token"].as_str().unwrap().to_owned();
    let mut waiter = t
        .cmd(["run", "--wait", "30s", "--key", &key, "--", "true"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut wake_dir = t.sqlite_path.clone().unwrap().into_os_string();
    wake_dir.push("-wake");
    let wake_dir = PathBuf::from(wake_dir);
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    wait_until(Duration::from_secs(10), || {
        entries(&wake_dir).iter().any(|p| p.is_dir())
    });
    let sockets = entries(&wake_dir)
        .into_iter()
        .filter(|p| !p.is_dir())
        .count();
    assert_eq!(
        sockets,
        1,
        "the waiting process listens: {:?}",
        entries(&wake_dir)
    );
    let out = t.output(["release", "--key", &key, "--token", &token]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(wait_exit(&mut waiter, Duration::from_secs(30)), 0);
    assert_eq!(t.lock(&key).unwrap()["state"], "released");
    // Gone with its process: no socket, no link, no key directory.
    assert_eq!(entries(&wake_dir), Vec::<PathBuf>::new());
}
