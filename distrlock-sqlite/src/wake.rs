//! [`Wake`]: wake-ups on release between the processes of one host.
//!
//! SQLite has no `LISTEN`/`NOTIFY`, so a waiter in another process would only
//! notice a release at its next poll. Instead, the processes that share a
//! database file meet in a directory beside it, `<file>-wake/`:
//!
//! - a backend that waits binds one Unix datagram socket there, `<dir>/<id>`
//!   (`id`: 16 random hex digits), and a thread that reads it;
//! - for each key it waits on, it puts a symlink to that socket in the key's
//!   directory, `<dir>/<hash>/<id>` (`hash`: 16 hex digits of the table and
//!   key), and removes it two seconds after its last waiter's last try;
//! - a release that leaves someone in line (the release statement says so)
//!   sends one datagram, `table NUL key`, to each link in the key's directory
//!   but its own.
//!
//! So a release nobody waits for sends nothing, and one that somebody waits
//! for costs one datagram per waiting process: the cost grows with the
//! waiters, not with the locks held. (A file watch would not do: every write
//! touches the `-wal` file and would wake every waiter.)
//!
//! Wake-ups are hints. One that is lost (the releasing process died between
//! its commit and the send, a socket buffer was full, the releaser runs an
//! older distrlock) costs the waiter time, never a lock: it still asks at
//! least every half turn of the line. A link whose socket is gone (its process
//! died) is removed by the next release that finds it.
//!
//! `sun_path` holds about 100 bytes. If the directory beside the file would
//! make a socket's path longer, the directory is
//! `$TMPDIR/distrlock-<hash of the file's canonical path>-wake/` (mode 0700)
//! instead. Every process computes the same place from the file's canonical
//! path, so they still meet.

use std::path::{Path, PathBuf};

use distrlock_core::{LockKey, ReleaseNotifier, TableName};

/// The longest socket path used (`sun_path` is 108 bytes on Linux, 104 on
/// macOS, each with its NUL).
const MAX_SOCKET_PATH: usize = 100;

/// FNV-1a, 64 bits: a hash every process computes alike, whatever its Rust
/// version (unlike `std`'s `DefaultHasher`).
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            // A separator, so that ("ab", "c") and ("a", "bc") differ.
            hash ^= 0xff;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

/// The meeting directory of the database file at `canonical`, or `None` if
/// no directory gives short enough socket paths.
fn meeting_dir(canonical: &Path) -> Option<PathBuf> {
    // `<dir>/<16 hex>/<16 hex>` is the longest path used.
    let fits = |dir: &Path| dir.as_os_str().len() + 34 <= MAX_SOCKET_PATH;
    let mut beside = canonical.as_os_str().to_owned();
    beside.push("-wake");
    let beside = PathBuf::from(beside);
    if fits(&beside) {
        return Some(beside);
    }
    let name = format!(
        "distrlock-{:016x}-wake",
        fnv1a(&[canonical.as_os_str().as_encoded_bytes()])
    );
    [std::env::temp_dir(), PathBuf::from("/tmp")]
        .into_iter()
        .map(|tmp| tmp.join(&name))
        .find(|dir| fits(dir))
}

/// This backend's end of the wake-ups: it sends them on release and, once it
/// waits, receives them; see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct Wake {
    #[cfg(unix)]
    inner: Option<std::sync::Arc<unix::Inner>>,
}

impl Wake {
    /// No wake-ups: neither sent nor received.
    pub(crate) fn off() -> Self {
        Self {
            #[cfg(unix)]
            inner: None,
        }
    }

    /// Wake-ups for the table `table` of the database file at `path` (which
    /// exists), delivered to `notifier`. Creates nothing yet. Off where there
    /// are no Unix sockets, or if the file's canonical path cannot be had.
    pub(crate) fn new(path: &Path, table: &TableName, notifier: ReleaseNotifier) -> Self {
        #[cfg(unix)]
        {
            let inner = std::fs::canonicalize(path)
                .ok()
                .and_then(|canonical| meeting_dir(&canonical))
                .and_then(|dir| unix::Inner::new(dir, table, notifier));
            if inner.is_none() {
                tracing::debug!(path = %path.display(), "no wake-ups on release for this SQLite file");
            }
            Self {
                inner: inner.map(std::sync::Arc::new),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (path, table, notifier, meeting_dir);
            Self {}
        }
    }

    /// Says that this backend waits on `key` now (a waiter's try was just
    /// refused). Returns `true` if it was not listening for `key` before:
    /// then a release since the caller's last read of the row sent it
    /// nothing, and the caller should look once more. Touches the file system
    /// the first time: not for an async thread.
    pub(crate) fn waiting(&self, key: &LockKey) -> bool {
        #[cfg(unix)]
        if let Some(inner) = &self.inner {
            return unix::Inner::waiting(inner, key);
        }
        let _ = key;
        false
    }

    /// Whether [`waiting`](Self::waiting) has anything to do for `key`:
    /// `false` if wake-ups are off or failed, or if `key` is registered
    /// already (whose last use is then noted, as `waiting` would). Touches no
    /// file.
    pub(crate) fn needs_listening(&self, key: &LockKey) -> bool {
        #[cfg(unix)]
        if let Some(inner) = &self.inner {
            return inner.needs_listening(key);
        }
        let _ = key;
        false
    }

    /// Wakes the other backends that wait on `key`, just released with
    /// someone in line, from this backend's sending thread: the sends touch
    /// the file system, and wait up to 2 ms for each waiting process whose
    /// queue is full, which must hold up neither the caller's runtime nor the
    /// SQLite thread. Returns at once.
    pub(crate) fn released_later(&self, key: &LockKey) {
        #[cfg(unix)]
        if let Some(inner) = &self.inner {
            unix::Inner::queue(inner, key);
        }
        let _ = key;
    }

    /// [`released_later`](Self::released_later), on the caller's thread.
    #[cfg(all(test, unix))]
    fn released(&self, key: &LockKey) {
        if let Some(inner) = &self.inner {
            inner.released(key);
        }
    }

    /// The meeting directory, if wake-ups are on (for tests).
    #[cfg(all(test, unix))]
    fn dir(&self) -> Option<&Path> {
        self.inner.as_ref().map(|inner| inner.dir.as_path())
    }
}

#[cfg(unix)]
mod unix {
    use std::collections::HashMap;
    use std::io::ErrorKind;
    use std::os::unix::fs::DirBuilderExt;
    use std::os::unix::net::UnixDatagram;
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex, MutexGuard, Weak};
    use std::time::{Duration, Instant};

    use distrlock_core::{LockKey, ReleaseNotifier, TableName};

    use super::fnv1a;

    /// How long a key stays registered after its last waiter's last try. A
    /// waiter in line tries at least every half turn (125 ms), so this only
    /// ends registrations nobody uses.
    pub(super) const IDLE: Duration = Duration::from_secs(2);

    /// How long after a failure to bind or link the next key's wait tries
    /// again (a full disk, a file where a directory should be).
    pub(super) const RETRY: Duration = Duration::from_secs(1);

    /// How many releases' wake-ups may wait for the sending thread.
    pub(super) const QUEUED: usize = 256;

    /// The shared part of a [`Wake`](super::Wake).
    #[derive(Debug)]
    pub(super) struct Inner {
        pub(super) dir: PathBuf,
        /// This backend's socket's name in `dir`, and its links' names.
        pub(super) id: String,
        table: String,
        notifier: ReleaseNotifier,
        /// An unbound socket to send from.
        sender: UnixDatagram,
        /// Another, blocking for at most 2 ms, for a receiver whose queue is
        /// full.
        patient_sender: Option<UnixDatagram>,
        /// `dir` is in the shared temporary directory (path too long beside
        /// the file).
        in_temp: bool,
        idle: Duration,
        state: Mutex<State>,
        /// The sending thread's queue, once it runs (see `queue`).
        sends: Mutex<Option<std::sync::mpsc::SyncSender<LockKey>>>,
    }

    #[derive(Debug, Default)]
    struct State {
        /// Whether our socket is bound (and its thread runs).
        bound: bool,
        /// When binding or linking last failed, until a later try succeeds.
        /// Meanwhile wake-ups may be missed (the notifier says so, so waiters
        /// poll), and a key not yet linked is tried again [`RETRY`] after the
        /// failure. Sending goes on.
        failed_at: Option<Instant>,
        /// The keys we wait on, with their last waiter's last try.
        keys: HashMap<LockKey, Instant>,
    }

    impl State {
        /// Whether a wait on `key` has nothing to register: a failure was
        /// too recent to try again, or `key` is registered on a bound socket
        /// (its last use is then noted).
        fn nothing_to_do(&mut self, key: &LockKey) -> bool {
            if self.failed_at.is_some_and(|at| at.elapsed() < RETRY) {
                return true;
            }
            match self.keys.get_mut(key) {
                Some(last) if self.bound => {
                    *last = Instant::now();
                    true
                }
                _ => false,
            }
        }
    }

    impl Inner {
        pub(super) fn new(
            dir: PathBuf,
            table: &TableName,
            notifier: ReleaseNotifier,
        ) -> Option<Self> {
            let sender = UnixDatagram::unbound().ok()?;
            sender.set_nonblocking(true).ok()?;
            let in_temp = dir.starts_with(std::env::temp_dir()) || dir.starts_with("/tmp");
            let patient_sender = UnixDatagram::unbound()
                .ok()
                .filter(|s| s.set_write_timeout(Some(Duration::from_millis(2))).is_ok());
            Some(Self {
                patient_sender,
                in_temp,
                dir,
                id: format!("{:016x}", fastrand::u64(..)),
                table: table.to_string(),
                notifier,
                sender,
                idle: IDLE,
                state: Mutex::new(State::default()),
                sends: Mutex::new(None),
            })
        }

        fn state(&self) -> MutexGuard<'_, State> {
            // A panic while holding the lock leaves a usable map.
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        fn key_dir(&self, key: &LockKey) -> PathBuf {
            let hash = fnv1a(&[self.table.as_bytes(), key.as_str().as_bytes()]);
            self.dir.join(format!("{hash:016x}"))
        }

        fn payload(&self, key: &LockKey) -> Vec<u8> {
            let mut payload = Vec::with_capacity(self.table.len() + 1 + key.as_str().len());
            payload.extend_from_slice(self.table.as_bytes());
            payload.push(0);
            payload.extend_from_slice(key.as_str().as_bytes());
            payload
        }

        fn make_dir(&self, dir: &Path) -> std::io::Result<()> {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            if !self.in_temp {
                return builder.create(dir);
            }
            // In a shared temporary directory: ours alone, checked before
            // anything is made below it.
            builder.mode(0o700).create(&self.dir)?;
            self.check_private()?;
            if dir != self.dir {
                builder.create(dir)?;
            }
            Ok(())
        }

        /// In a shared temporary directory, the meeting directory must be
        /// ours alone: one made by someone else (who could plant links in it,
        /// to steer our datagrams), or a symlink in its place, is refused, and
        /// then no wake-ups are sent or received there.
        fn check_private(&self) -> std::io::Result<()> {
            use std::os::unix::fs::{MetadataExt, PermissionsExt};
            let meta = std::fs::symlink_metadata(&self.dir)?;
            #[cfg(target_os = "linux")]
            let ours = meta.uid() == nix::unistd::geteuid().as_raw();
            #[cfg(not(target_os = "linux"))]
            let ours = {
                let _ = meta.uid();
                true
            };
            if !meta.file_type().is_dir() || meta.permissions().mode() & 0o077 != 0 || !ours {
                return Err(std::io::Error::new(
                    ErrorKind::PermissionDenied,
                    "the wake-up directory in the temporary directory is not private",
                ));
            }
            Ok(())
        }

        pub(super) fn needs_listening(&self, key: &LockKey) -> bool {
            !self.state().nothing_to_do(key)
        }

        pub(super) fn waiting(this: &Arc<Self>, key: &LockKey) -> bool {
            let mut state = this.state();
            if state.nothing_to_do(key) {
                return false;
            }
            match this.listen(&mut state, key) {
                Ok(()) => {
                    state.keys.insert(key.clone(), Instant::now());
                    // The receiving thread's next check says whether every
                    // key is linked again (the notifier complete).
                    state.failed_at = None;
                    true
                }
                Err(error) => {
                    tracing::debug!(%error, dir = %this.dir.display(), "cannot receive wake-ups on release for now; waiters poll");
                    state.failed_at = Some(Instant::now());
                    this.notifier.set_complete(false);
                    false
                }
            }
        }

        /// Binds our socket if need be, and links `key`'s directory to it.
        fn listen(self: &Arc<Self>, state: &mut State, key: &LockKey) -> std::io::Result<()> {
            if !state.bound {
                self.make_dir(&self.dir)?;
                self.sweep_sockets();
                let socket = self.bind()?;
                let weak = Arc::downgrade(self);
                let started = std::thread::Builder::new()
                    .name("distrlock-sqlite-wake".into())
                    .stack_size(256 * 1024)
                    .spawn(move || receive(socket, &weak));
                if let Err(error) = started {
                    let _ = std::fs::remove_file(self.dir.join(&self.id));
                    return Err(error);
                }
                state.bound = true;
                // Every release by a backend of this host that can reach the
                // directory now reaches us.
                self.notifier.set_complete(true);
            }
            self.link(key)
        }

        /// Binds our socket, in the meeting directory (which exists).
        fn bind(&self) -> std::io::Result<UnixDatagram> {
            let path = self.dir.join(&self.id);
            // Our own socket's file, left by a receiving thread that failed:
            // nobody else uses our id (and a symlink here is removed, not
            // followed).
            let _ = std::fs::remove_file(&path);
            let socket = UnixDatagram::bind(&path)?;
            // The thread checks for idle keys (and for this backend's end) at
            // least this often.
            if let Err(error) =
                socket.set_read_timeout(Some(self.idle.min(Duration::from_secs(1)) / 2))
            {
                let _ = std::fs::remove_file(&path);
                return Err(error);
            }
            Ok(socket)
        }

        /// If our socket's file is gone (a cleaner of the temporary directory
        /// removed it, or the whole meeting directory), a socket bound anew
        /// in its place: nobody could reach the old one any more. `Ok(None)`
        /// if it is there.
        fn rebind_if_gone(&self) -> std::io::Result<Option<UnixDatagram>> {
            if is_socket(&self.dir.join(&self.id)) {
                return Ok(None);
            }
            self.make_dir(&self.dir)?;
            self.bind().map(Some)
        }

        /// Links `key`'s directory to our socket (made if need be), after
        /// removing the dangling links found there.
        fn link(&self, key: &LockKey) -> std::io::Result<()> {
            let dir = self.key_dir(key);
            let link = dir.join(&self.id);
            let target = Path::new("..").join(&self.id);
            for attempt in 0..2 {
                self.make_dir(&dir)?;
                if attempt == 0 {
                    sweep_links(&dir);
                }
                match std::os::unix::fs::symlink(&target, &link) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
                    // Another process removed the empty directory between our
                    // mkdir and our link: once more.
                    Err(e) if e.kind() == ErrorKind::NotFound && attempt == 0 => continue,
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }

        /// Hands `key` to the sending thread (started on first use), which
        /// runs [`released`](Self::released) for it. At most [`QUEUED`] keys
        /// wait; past that a wake-up is dropped (a hint: waiters still poll).
        pub(super) fn queue(this: &Arc<Self>, key: &LockKey) {
            let mut sends = this.sends.lock().unwrap_or_else(|e| e.into_inner());
            if sends.is_none() {
                let (tx, rx) = std::sync::mpsc::sync_channel::<LockKey>(QUEUED);
                let weak = Arc::downgrade(this);
                // The thread ends when the backend goes (its sender with it).
                let started = std::thread::Builder::new()
                    .name("distrlock-sqlite-send".into())
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        for key in rx {
                            let Some(inner) = weak.upgrade() else {
                                return;
                            };
                            inner.released(&key);
                        }
                    });
                match started {
                    Ok(_) => *sends = Some(tx),
                    Err(error) => {
                        tracing::debug!(%error, "cannot start the wake-up sending thread; waiters poll");
                        return;
                    }
                }
            }
            if let Some(tx) = sends.as_ref()
                && tx.try_send(key.clone()).is_err()
            {
                tracing::debug!(key = %key, "a wake-up on release was dropped: the sending queue is full");
            }
        }

        /// Sends the wake-ups of `key`'s release (see [`Wake::released_later`](super::Wake::released_later)).
        pub(super) fn released(&self, key: &LockKey) {
            if self.in_temp && self.check_private().is_err() {
                // Not ours alone: whoever made it chose its links.
                return;
            }
            let dir = self.key_dir(key);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                // Nobody has ever waited here (or the directory is gone).
                return;
            };
            let payload = self.payload(key);
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(name) = name.to_str().filter(|n| is_id(n)) else {
                    // Not one of ours: leave it alone.
                    continue;
                };
                if name == self.id {
                    // Our own waiters learn of it through the notifier.
                    continue;
                }
                let link = entry.path();
                match self.sender.send_to(&payload, &link) {
                    Ok(_) => {}
                    // Its queue is full (10 datagrams by default, maybe for
                    // other keys): wait for room, briefly.
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if let Some(patient) = &self.patient_sender {
                            let _ = patient.send_to(&payload, &link);
                        }
                    }
                    // Nobody reads its socket: its process died. Remove the
                    // link, and the socket of the same name in the meeting
                    // directory if it is one (a link's target is never
                    // followed: anyone who can write here could aim it).
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        let socket = self.dir.join(name);
                        if is_socket(&socket) {
                            let _ = std::fs::remove_file(&socket);
                        }
                        remove_if_dangling(&link);
                    }
                    // Its socket is gone (or the link was just replaced).
                    Err(e) if e.kind() == ErrorKind::NotFound => remove_if_dangling(&link),
                    Err(error) => {
                        tracing::debug!(%error, link = %link.display(), "a wake-up on release failed");
                    }
                }
            }
        }

        /// Removes the sockets in the meeting directory that nobody reads any
        /// more (their processes died without cleaning up), once per backend,
        /// before it binds its own. An empty datagram tests each: a live
        /// backend ignores it.
        fn sweep_sockets(&self) {
            use std::os::unix::fs::FileTypeExt;
            let Ok(entries) = std::fs::read_dir(&self.dir) else {
                return;
            };
            for entry in entries.flatten() {
                let named = entry.file_name().to_str().is_some_and(is_id);
                if !named || !entry.file_type().is_ok_and(|t| t.is_socket()) {
                    continue;
                }
                let path = entry.path();
                if let Err(e) = self.sender.send_to(b"", &path)
                    && e.kind() == ErrorKind::ConnectionRefused
                {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }

        /// A datagram arrived: announce its key, if it is of our table.
        fn deliver(&self, datagram: &[u8]) {
            let Some((table, key)) = datagram
                .iter()
                .position(|&b| b == 0)
                .map(|at| (&datagram[..at], &datagram[at + 1..]))
            else {
                return;
            };
            if table != self.table.as_bytes() {
                return;
            }
            if let Some(key) = std::str::from_utf8(key)
                .ok()
                .and_then(|k| LockKey::new(k).ok())
            {
                self.notifier.notify(&key);
            }
        }

        /// Unlinks the keys nobody has waited on for `idle`, and links again
        /// those of the others whose link is gone. `false` if one of those
        /// cannot be linked.
        fn forget_idle(&self) -> bool {
            let mut state = self.state();
            let now = Instant::now();
            let idle: Vec<LockKey> = state
                .keys
                .iter()
                .filter(|(_, last)| now.duration_since(**last) >= self.idle)
                .map(|(key, _)| key.clone())
                .collect();
            for key in idle {
                state.keys.remove(&key);
                self.unlink(&key);
            }
            // A link of ours that is gone (removed by a race with another
            // process's clean-up, or by a cleaner of the temporary
            // directory) is made again, so that its key is still announced.
            let mut linked = true;
            for key in state.keys.keys() {
                let ours = self.key_dir(key).join(&self.id);
                if std::fs::symlink_metadata(&ours).is_err() && self.link(key).is_err() {
                    linked = false;
                }
            }
            linked
        }

        fn unlink(&self, key: &LockKey) {
            let dir = self.key_dir(key);
            let _ = std::fs::remove_file(dir.join(&self.id));
            // Fails while another process still links there, as it should.
            let _ = std::fs::remove_dir(&dir);
        }
    }

    impl Drop for Inner {
        fn drop(&mut self) {
            let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
            let keys: Vec<LockKey> = state.keys.drain().map(|(key, _)| key).collect();
            let bound = state.bound;
            for key in keys {
                self.unlink(&key);
            }
            if bound {
                let _ = std::fs::remove_file(self.dir.join(&self.id));
            }
        }
    }

    /// Whether `name` is a backend's id: 16 lowercase hex digits.
    fn is_id(name: &str) -> bool {
        name.len() == 16 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }

    /// Whether `path` is a socket (not following a symlink).
    pub(super) fn is_socket(path: &Path) -> bool {
        use std::os::unix::fs::FileTypeExt;
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
    }

    /// Removes `link` if it is a symlink whose target is gone: a live
    /// backend's link (re-made since a send failed) stays.
    fn remove_if_dangling(link: &Path) {
        let is_link = std::fs::symlink_metadata(link).is_ok_and(|m| m.file_type().is_symlink());
        if is_link && std::fs::metadata(link).is_err_and(|e| e.kind() == ErrorKind::NotFound) {
            let _ = std::fs::remove_file(link);
        }
    }

    /// Removes the links in a key's directory whose socket is gone.
    fn sweep_links(dir: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            remove_if_dangling(&entry.path());
        }
    }

    /// The receiving thread: until its backend is gone, announces each
    /// datagram's key and forgets idle keys.
    fn receive(mut socket: UnixDatagram, backend: &Weak<Inner>) {
        let mut buf = [0u8; 1024];
        let mut next_check = Instant::now();
        loop {
            let got = socket.recv(&mut buf);
            let Some(inner) = backend.upgrade() else {
                return;
            };
            // Whatever arrived: steady traffic must not keep idle keys.
            if Instant::now() >= next_check {
                let bound = match inner.rebind_if_gone() {
                    Ok(rebound) => {
                        socket = rebound.unwrap_or(socket);
                        true
                    }
                    Err(error) => {
                        tracing::debug!(%error, dir = %inner.dir.display(), "the wake-up socket is gone and cannot be made again; waiters poll");
                        false
                    }
                };
                let linked = inner.forget_idle();
                // Complete again once the socket and links are back (the
                // next check tries again if not).
                let failed = inner.state().failed_at.is_some();
                inner.notifier.set_complete(bound && linked && !failed);
                next_check = Instant::now() + (inner.idle / 4).min(Duration::from_millis(500));
            }
            match got {
                Ok(n) => inner.deliver(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(error) => {
                    tracing::debug!(%error, "the wake-up socket failed; waiters poll, and a later wait binds another");
                    let mut state = inner.state();
                    // The links stay: a later wait binds a socket of the same
                    // name, which they lead to again.
                    state.failed_at = Some(Instant::now());
                    state.bound = false;
                    inner.notifier.set_complete(false);
                    return;
                }
            }
        }
    }

    #[cfg(test)]
    impl Inner {
        pub(super) fn set_idle(this: &mut Arc<Self>, idle: Duration) {
            if let Some(inner) = Arc::get_mut(this) {
                inner.idle = idle;
            }
        }

        /// How long a send waits for room in a full queue (2 ms otherwise).
        pub(super) fn set_patience(&self, patience: Duration) {
            if let Some(patient) = &self.patient_sender {
                patient.set_write_timeout(Some(patience)).unwrap();
            }
        }
    }
}

#[cfg(all(test, unix))]
mod tests {
    use std::time::Duration;

    use super::unix::is_socket;
    use super::*;

    fn key(name: &str) -> LockKey {
        LockKey::new(name).unwrap()
    }

    /// An empty database file in a directory of its own.
    fn database() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("locks.db");
        std::fs::write(&file, b"").unwrap();
        (dir, file)
    }

    /// The one key directory in the meeting directory.
    fn the_key_dir(meeting: &Path) -> PathBuf {
        std::fs::read_dir(meeting)
            .unwrap()
            .flatten()
            .find(|e| e.path().is_dir())
            .unwrap()
            .path()
    }

    fn wake(path: &Path) -> (Wake, ReleaseNotifier) {
        let notifier = ReleaseNotifier::new();
        let table = TableName::new("locks").unwrap();
        (Wake::new(path, &table, notifier.clone()), notifier)
    }

    /// A fresh database with two backends on it: `waiter` waits on `a`,
    /// `releaser` is there to release it.
    struct WaitingOnA {
        _dir: tempfile::TempDir,
        releaser: Wake,
        waiter: Wake,
        notifier: ReleaseNotifier,
        a: LockKey,
        meeting: PathBuf,
        key_dir: PathBuf,
    }

    fn waiting_on_a() -> WaitingOnA {
        let (dir, file) = database();
        let (releaser, _) = wake(&file);
        let (waiter, notifier) = wake(&file);
        let a = key("a");
        assert!(waiter.waiting(&a));
        let meeting = waiter.dir().unwrap().to_owned();
        let key_dir = the_key_dir(&meeting);
        WaitingOnA {
            _dir: dir,
            releaser,
            waiter,
            notifier,
            a,
            meeting,
            key_dir,
        }
    }

    async fn woken(notifier: &ReleaseNotifier, key: &LockKey, f: impl FnOnce()) -> bool {
        let mut sub = notifier.subscribe();
        f();
        tokio::time::timeout(Duration::from_secs(5), sub.released(key))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_release_wakes_the_other_backends_waiting_on_its_key_only() {
        let (_dir, file) = database();
        let (releaser, _) = wake(&file);
        let (waiter, notifier) = wake(&file);
        let (a, b) = (key("a"), key("b"));
        assert!(!notifier.is_complete(), "complete only once it listens");
        assert!(waiter.waiting(&a), "the first wait registers");
        assert!(!waiter.waiting(&a), "a second wait finds it registered");
        assert!(notifier.is_complete());
        assert!(woken(&notifier, &a, || releaser.released(&a)).await);
        // A release of another key wakes nobody on `a`.
        let mut sub = notifier.subscribe();
        releaser.released(&b);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), sub.released(&a))
                .await
                .is_err()
        );
        // A backend's own release is announced by its notifier, not by a
        // datagram to itself.
        let mut sub = notifier.subscribe();
        waiter.released(&a);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), sub.released(&a))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_dead_backends_link_is_removed_and_a_dropped_one_cleans_up() {
        let WaitingOnA {
            _dir,
            releaser,
            waiter,
            a,
            meeting,
            key_dir,
            ..
        } = waiting_on_a();
        // A link left by a process that died: its socket is gone.
        let stale = key_dir.join("00000000deadbeef");
        std::os::unix::fs::symlink("../00000000deadbeef", &stale).unwrap();
        // And one whose socket is still there, but nobody reads it.
        let dead_socket = meeting.join("00000000deadbee2");
        drop(std::os::unix::net::UnixDatagram::bind(&dead_socket).unwrap());
        let unread = key_dir.join("00000000deadbee2");
        std::os::unix::fs::symlink("../00000000deadbee2", &unread).unwrap();
        releaser.released(&a);
        assert!(
            std::fs::symlink_metadata(&stale).is_err(),
            "the release removed the dead link"
        );
        assert!(std::fs::symlink_metadata(&unread).is_err());
        assert!(!dead_socket.exists(), "and the dead socket");
        assert_eq!(std::fs::read_dir(&key_dir).unwrap().count(), 1);
        drop(waiter);
        // (The receiving thread may hold the backend for a moment.)
        let start = std::time::Instant::now();
        while key_dir.exists() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!key_dir.exists(), "the last link's directory goes with it");
        assert_eq!(std::fs::read_dir(&meeting).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_new_listener_sweeps_dead_sockets_and_dangling_links() {
        let (_dir, file) = database();
        let (live, _) = wake(&file);
        let a = key("a");
        assert!(live.waiting(&a));
        let meeting = live.dir().unwrap().to_owned();
        let key_dir = the_key_dir(&meeting);
        let dead_socket = meeting.join("00000000deadbeef");
        drop(std::os::unix::net::UnixDatagram::bind(&dead_socket).unwrap());
        let dangling = key_dir.join("00000000deadbee2");
        std::os::unix::fs::symlink("../00000000deadbee2", &dangling).unwrap();
        let (later, _) = wake(&file);
        assert!(later.waiting(&a));
        assert!(!dead_socket.exists(), "the dead socket is swept");
        assert!(
            std::fs::symlink_metadata(&dangling).is_err(),
            "and the dangling link"
        );
        // The live backends' sockets and links stay: 2 sockets, 2 links.
        let sockets = std::fs::read_dir(&meeting)
            .unwrap()
            .flatten()
            .filter(|e| !e.path().is_dir())
            .count();
        assert_eq!(sockets, 2);
        assert_eq!(std::fs::read_dir(&key_dir).unwrap().count(), 2);
    }

    #[tokio::test]
    async fn a_planted_link_never_makes_a_release_remove_its_target() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("locks.db");
        std::fs::write(&file, b"precious").unwrap();
        let (releaser, _) = wake(&file);
        let (waiter, _) = wake(&file);
        let a = key("a");
        assert!(waiter.waiting(&a));
        let meeting = waiter.dir().unwrap().to_owned();
        let key_dir = the_key_dir(&meeting);
        // Links aimed at the database itself, by absolute path and relative,
        // under names that look like a backend's and that do not.
        for (name, target) in [
            ("00000000deadbeef", file.clone()),
            ("00000000deadbee2", PathBuf::from("../../locks.db")),
            ("victim", file.clone()),
        ] {
            std::os::unix::fs::symlink(&target, key_dir.join(name)).unwrap();
        }
        releaser.released(&a);
        assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn an_idle_key_is_unlinked() {
        let (_dir, file) = database();
        let (mut waiter, _) = wake(&file);
        unix::Inner::set_idle(waiter.inner.as_mut().unwrap(), Duration::from_millis(100));
        let a = key("a");
        assert!(waiter.waiting(&a));
        let meeting = waiter.dir().unwrap().to_owned();
        let dirs = || {
            std::fs::read_dir(&meeting)
                .unwrap()
                .flatten()
                .filter(|e| e.path().is_dir())
                .count()
        };
        assert_eq!(dirs(), 1);
        let start = std::time::Instant::now();
        while dirs() > 0 && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(dirs(), 0, "an idle key's link and directory are removed");
        assert!(waiter.waiting(&a), "and a later wait registers again");
    }

    #[tokio::test]
    async fn a_long_path_meets_in_the_temporary_directory() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("x".repeat(90));
        std::fs::create_dir(&deep).unwrap();
        let file = deep.join("locks.db");
        std::fs::write(&file, b"").unwrap();
        let (releaser, _) = wake(&file);
        let (waiter, notifier) = wake(&file);
        let meeting = waiter.dir().unwrap().to_owned();
        assert!(meeting.as_os_str().len() + 34 <= MAX_SOCKET_PATH);
        assert!(!meeting.starts_with(&deep));
        let a = key("a");
        assert!(waiter.waiting(&a));
        assert!(woken(&notifier, &a, || releaser.released(&a)).await);
        drop((waiter, releaser));
        let _ = std::fs::remove_dir(&meeting);
    }

    #[tokio::test]
    async fn a_release_waits_briefly_for_room_in_a_full_queue() {
        use std::os::unix::net::UnixDatagram;
        let WaitingOnA {
            _dir,
            releaser,
            waiter: _waiter,
            a,
            meeting,
            key_dir,
            ..
        } = waiting_on_a();
        // A process waiting on `a` that is slow to read: its queue is full.
        let id = "00000000feedbeef";
        let slow = UnixDatagram::bind(meeting.join(id)).unwrap();
        std::os::unix::fs::symlink(format!("../{id}"), key_dir.join(id)).unwrap();
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        let mut queued = 0;
        while filler.send_to(b"x", meeting.join(id)).is_ok() {
            queued += 1;
        }
        assert!(queued > 0);
        // It reads after 50 ms; the release waits up to 2 s for room here
        // (2 ms in use), so its wake-up must still arrive.
        releaser
            .inner
            .as_ref()
            .unwrap()
            .set_patience(Duration::from_secs(2));
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            slow.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 64];
            let mut got = Vec::new();
            while let Ok(n) = slow.recv(&mut buf) {
                got.push(buf[..n].to_vec());
            }
            got
        });
        releaser.released(&a);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), queued + 1, "the filler's datagrams, then ours");
        assert_eq!(got.last().unwrap().as_slice(), b"locks\0a");
    }

    #[tokio::test]
    async fn a_shared_temporary_directory_not_ours_alone_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::net::UnixDatagram;
        // Paths too long to meet beside the file meet in the temporary
        // directory, where anyone may have made the directory first.
        for planted in ["open to others", "a symlink", "another user's"] {
            let dir = tempfile::tempdir().unwrap();
            let deep = dir.path().join("x".repeat(90));
            std::fs::create_dir(&deep).unwrap();
            let file = deep.join("locks.db");
            std::fs::write(&file, b"").unwrap();
            let meeting = meeting_dir(&std::fs::canonicalize(&file).unwrap()).unwrap();
            assert!(!meeting.starts_with(&deep));
            let elsewhere = tempfile::tempdir().unwrap();
            match planted {
                "a symlink" => {
                    std::fs::set_permissions(elsewhere.path(), PermissionsExt::from_mode(0o700))
                        .unwrap();
                    std::os::unix::fs::symlink(elsewhere.path(), &meeting).unwrap();
                }
                "open to others" => {
                    std::fs::create_dir(&meeting).unwrap();
                    std::fs::set_permissions(&meeting, PermissionsExt::from_mode(0o777)).unwrap();
                }
                _ => {
                    std::fs::create_dir(&meeting).unwrap();
                    std::fs::set_permissions(&meeting, PermissionsExt::from_mode(0o700)).unwrap();
                    // Only root can give a directory away.
                    if std::os::unix::fs::chown(&meeting, Some(65534), Some(65534)).is_err() {
                        std::fs::remove_dir(&meeting).unwrap();
                        continue;
                    }
                }
            }
            let a = key("a");
            let (waiter, notifier) = wake(&file);
            assert!(!waiter.waiting(&a), "{planted}: not listening");
            assert!(!notifier.is_complete(), "{planted}: waiters poll");
            assert_eq!(
                std::fs::read_dir(&meeting).unwrap().count(),
                0,
                "{planted}: nothing was made in it"
            );
            // Links its maker planted there are not followed either: a
            // release sends nothing to them.
            let key_dir = meeting.join(format!("{:016x}", fnv1a(&[b"locks", b"a"])));
            std::fs::create_dir(&key_dir).unwrap();
            let spy = elsewhere.path().join("spy");
            let spy_socket = UnixDatagram::bind(&spy).unwrap();
            spy_socket.set_nonblocking(true).unwrap();
            std::os::unix::fs::symlink(&spy, key_dir.join("00000000feedbeef")).unwrap();
            let (releaser, _) = wake(&file);
            releaser.released(&a);
            let mut buf = [0u8; 64];
            assert!(
                spy_socket.recv(&mut buf).is_err(),
                "{planted}: a release sent a datagram through a planted link"
            );
            drop((waiter, releaser));
            std::fs::remove_dir_all(&key_dir).unwrap();
            if planted == "a symlink" {
                std::fs::remove_file(&meeting).unwrap();
            } else {
                std::fs::remove_dir(&meeting).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn a_removed_socket_link_or_directory_is_made_again() {
        let WaitingOnA {
            _dir,
            releaser,
            waiter,
            notifier,
            a,
            meeting,
            key_dir,
        } = waiting_on_a();
        let id = waiter.inner.as_ref().unwrap().id.clone();
        let socket = meeting.join(&id);
        let link = key_dir.join(&id);
        let back = || {
            let start = std::time::Instant::now();
            while !(is_socket(&socket) && std::fs::symlink_metadata(&link).is_ok())
                && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        // A cleaner of the temporary directory removes the link, then the
        // socket, then everything.
        std::fs::remove_file(&link).unwrap();
        back();
        assert!(woken(&notifier, &a, || releaser.released(&a)).await, "link");
        std::fs::remove_file(&socket).unwrap();
        back();
        assert!(
            woken(&notifier, &a, || releaser.released(&a)).await,
            "socket"
        );
        std::fs::remove_dir_all(&meeting).unwrap();
        back();
        assert!(woken(&notifier, &a, || releaser.released(&a)).await, "all");
        assert!(notifier.is_complete());
    }

    #[tokio::test]
    async fn a_key_that_cannot_be_linked_is_tried_again_a_second_later() {
        let WaitingOnA {
            _dir,
            releaser,
            waiter,
            notifier,
            a,
            meeting,
            ..
        } = waiting_on_a();
        let b = key("b");
        // A file where b's directory goes: b cannot be linked.
        let b_dir = meeting.join(format!("{:016x}", fnv1a(&[b"locks", b"b"])));
        std::fs::write(&b_dir, b"").unwrap();
        assert!(!waiter.waiting(&b));
        assert!(!notifier.is_complete(), "b's releases would be missed");
        assert!(!waiter.waiting(&b), "not tried again at once");
        // `a` is still announced meanwhile.
        assert!(woken(&notifier, &a, || releaser.released(&a)).await);
        std::fs::remove_file(&b_dir).unwrap();
        std::thread::sleep(unix::RETRY + Duration::from_millis(100));
        assert!(waiter.waiting(&b), "tried again after a while");
        let start = std::time::Instant::now();
        while !notifier.is_complete() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(notifier.is_complete(), "complete again");
        assert!(woken(&notifier, &b, || releaser.released(&b)).await);
    }

    #[tokio::test]
    async fn releases_queue_their_wake_ups_and_drop_them_when_the_queue_is_full() {
        use std::os::unix::net::UnixDatagram;
        let WaitingOnA {
            _dir,
            releaser,
            waiter: _waiter,
            a,
            meeting,
            key_dir,
            ..
        } = waiting_on_a();
        // A waiting process that never reads, and a sender that waits a
        // second for room in its queue: the sending thread is stuck on it.
        let id = "00000000feedbeef";
        let _stuck = UnixDatagram::bind(meeting.join(id)).unwrap();
        std::os::unix::fs::symlink(format!("../{id}"), key_dir.join(id)).unwrap();
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        while filler.send_to(b"x", meeting.join(id)).is_ok() {}
        releaser
            .inner
            .as_ref()
            .unwrap()
            .set_patience(Duration::from_secs(1));
        // Twice the queue's room: the releases never wait for the thread,
        // the ones past the room are dropped.
        let started = std::time::Instant::now();
        for _ in 0..2 * unix::QUEUED {
            releaser.released_later(&a);
        }
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "queueing {} wake-ups took {took:?}",
            2 * unix::QUEUED
        );
    }

    #[test]
    fn the_hash_is_fixed() {
        // Every process, of every build, must find the same directory.
        assert_eq!(fnv1a(&[b"a"]), 0xaf63_dc4c_8601_ec8c);
        assert_ne!(fnv1a(&[b"ab", b"c"]), fnv1a(&[b"a", b"bc"]));
    }
}
