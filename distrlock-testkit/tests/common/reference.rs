//! [`RefBackend`]: a small backend written the way an SQL backend works — a
//! connection that can be cut, a table that may be missing, one row lock per key
//! held across the statement's round trip — with one [`Mutant`] bug switched on
//! at a time, and [`RefHarness`], which declares every capability.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, ReleaseNotifier,
    Result, Token, Ttl,
};
use distrlock_testkit::{Faults, Harness, Setup, Skip, Unsupported};
use tokio::sync::{OwnedMutexGuard, watch};
use tokio::time::Instant;

/// One bug, or none. Each breaks one promise of the contract, the way a real
/// backend might.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mutant {
    /// The correct backend.
    None,
    /// `extend_many` answers Ok for the held leases of a batch without renewing
    /// them (the heartbeat path; `extend` is right).
    BatchOkWithoutRenewing,
    /// `extend_many` renews every entry but the last, and answers Ok for it.
    BatchSkipsLast,
    /// `extend_many` panics (an index out of bounds in the batch code).
    BatchPanics,
    /// A refused try-acquire writes its owner text into the row.
    RefusalOverwritesOwner,
    /// A refused try-acquire bumps the row's fence.
    RefusalBumpsFence,
    /// A refused try-acquire renews the holder's lease (an upsert that always
    /// updates the expiry).
    RefusalRenewsHolder,
    /// Release by the right token after its lease expired answers Ok and marks
    /// the row released.
    ReleaseAfterExpiryOk,
    /// Extend by the right token after its lease expired revives it.
    ExtendAfterExpiryOk,
    /// A wrong token's release ends the lease anyway (the token is not compared).
    WrongTokenReleases,
    /// Leases last 5% less than their ttl (stored that way, reported honestly).
    ShortLease,
    /// Leases last 5% more than their ttl.
    LongLease,
    /// The expiry is stored and reported right, but try-acquire treats a lease
    /// with less than 5% of its ttl left as expired.
    ExpiresEarly,
    /// Extend renews by the ttl the lease was acquired with, not its own.
    ExtendUsesAcquireTtl,
    /// Extend bumps the fence.
    ExtendBumpsFence,
    /// A new holding keeps the previous holding's owner text.
    StaleOwner,
    /// A new holding keeps the previous holding's `acquired_at`.
    StaleAcquiredAt,
    /// `inspect` and `list` report times an hour late (a session time zone).
    TimesAnHourOff,
    /// `list` leaves out released rows.
    ListDropsReleased,
    /// `list` sorts case-insensitively.
    ListCaseInsensitive,
    /// A missing table gives a permanent `Error::Backend` instead of
    /// `SchemaMissing`.
    WrongErrorForMissingTable,
    /// Calls wait for ever for an unreachable database (no connect or statement
    /// timeout).
    HangsWhenUnreachable,
    /// An extend dropped mid-flight keeps its row lock (its connection goes back
    /// to the pool with the transaction open); others wait for it in vain.
    DroppedExtendKeepsRowLock,
    /// Extend returns the grant's clock reading instead of its own.
    FrozenReadings,
    /// The grant's reading is a second behind the `acquired_at` it stores.
    GrantReadingLags,
    /// `not_after` is ignored: a late call still takes effect.
    IgnoresNotAfter,
    /// The backend has a release notifier but never announces releases.
    SilentReleases,
    /// Re-acquiring with the holder's token starts a new holding (a new fence).
    ReacquireBumpsFence,
}

impl Mutant {
    /// Every bug.
    pub const ALL: [Mutant; 28] = [
        Mutant::BatchOkWithoutRenewing,
        Mutant::BatchSkipsLast,
        Mutant::BatchPanics,
        Mutant::RefusalOverwritesOwner,
        Mutant::RefusalBumpsFence,
        Mutant::RefusalRenewsHolder,
        Mutant::ReleaseAfterExpiryOk,
        Mutant::ExtendAfterExpiryOk,
        Mutant::WrongTokenReleases,
        Mutant::ShortLease,
        Mutant::LongLease,
        Mutant::ExpiresEarly,
        Mutant::ExtendUsesAcquireTtl,
        Mutant::ExtendBumpsFence,
        Mutant::StaleOwner,
        Mutant::StaleAcquiredAt,
        Mutant::TimesAnHourOff,
        Mutant::ListDropsReleased,
        Mutant::ListCaseInsensitive,
        Mutant::WrongErrorForMissingTable,
        Mutant::HangsWhenUnreachable,
        Mutant::DroppedExtendKeepsRowLock,
        Mutant::FrozenReadings,
        Mutant::GrantReadingLags,
        Mutant::IgnoresNotAfter,
        Mutant::SilentReleases,
        Mutant::ReacquireBumpsFence,
        Mutant::None,
    ];
}

/// How long a call waits for an unreachable database before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a statement waits for another's row lock before it fails.
const LOCK_WAIT_TIMEOUT: Duration = Duration::from_secs(1);
const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
struct Row {
    token: Token,
    fence: Fence,
    owner: String,
    acquired_at: SystemTime,
    /// `None` once released.
    expires: Option<Instant>,
    /// The ttl the lease was acquired with.
    acquired_ttl: Duration,
    /// The ttl of the last grant or renewal.
    ttl: Duration,
}

/// See the module docs.
#[derive(Debug)]
pub struct RefBackend {
    mutant: Mutant,
    table: String,
    table_exists: AtomicBool,
    rows: Mutex<BTreeMap<LockKey, Row>>,
    row_locks: Mutex<HashMap<LockKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Row locks of dropped calls that the `DroppedExtendKeepsRowLock` bug keeps.
    leaked: Mutex<Vec<OwnedMutexGuard<()>>>,
    reachable: watch::Sender<bool>,
    /// A killed session: the next call fails.
    killed: AtomicBool,
    notifier: ReleaseNotifier,
    epoch: (Instant, SystemTime),
}

impl RefBackend {
    /// A backend with `mutant`, on a table that exists or not.
    pub fn new(mutant: Mutant, table_exists: bool) -> Self {
        Self {
            mutant,
            table: format!("locks_{:08x}", fastrand::u32(..)),
            table_exists: AtomicBool::new(table_exists),
            rows: Mutex::new(BTreeMap::new()),
            row_locks: Mutex::new(HashMap::new()),
            leaked: Mutex::new(Vec::new()),
            reachable: watch::channel(true).0,
            killed: AtomicBool::new(false),
            notifier: ReleaseNotifier::new(),
            epoch: (Instant::now(), SystemTime::now()),
        }
    }

    fn is(&self, mutant: Mutant) -> bool {
        self.mutant == mutant
    }

    fn rows(&self) -> MutexGuard<'_, BTreeMap<LockKey, Row>> {
        self.rows.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn clock(&self, at: Instant) -> SystemTime {
        self.epoch.1 + at.saturating_duration_since(self.epoch.0)
    }

    /// Reaches the database: waits while it is unreachable, up to the connect
    /// timeout; a killed session fails once; a missing table fails.
    async fn connect(&self) -> Result<()> {
        let mut reachable = self.reachable.subscribe();
        let wait = reachable.wait_for(|r| *r);
        if self.is(Mutant::HangsWhenUnreachable) {
            let _ = wait.await;
        } else if tokio::time::timeout(CONNECT_TIMEOUT, wait).await.is_err() {
            return Err(Error::unavailable("connect timed out", None));
        }
        if self.killed.swap(false, Ordering::SeqCst) {
            return Err(Error::unavailable("the server closed the session", None));
        }
        if !self.table_exists.load(Ordering::SeqCst) {
            if self.is(Mutant::WrongErrorForMissingTable) {
                return Err(Error::permanent(
                    format!("relation \"{}\" does not exist", self.table),
                    std::io::Error::other("42P01"),
                ));
            }
            return Err(Error::SchemaMissing {
                table: self.table.clone(),
                hint: "call create_table".into(),
            });
        }
        Ok(())
    }

    /// Takes `key`'s row lock, waiting at most the lock wait timeout, then lets
    /// the statement's round trip pass (a point where a drop lands mid-flight).
    async fn lock_row(&self, key: &LockKey) -> Result<OwnedMutexGuard<()>> {
        let lock = self
            .row_locks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = tokio::time::timeout(LOCK_WAIT_TIMEOUT, lock.lock_owned())
            .await
            .map_err(|_| {
                Error::transient("lock wait timeout exceeded", std::io::Error::other("1205"))
            })?;
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        Ok(guard)
    }

    /// The statement's clock reading, or a transient error past `not_after`.
    fn now(&self, not_after: Instant, key: &LockKey) -> Result<Instant> {
        let now = Instant::now();
        if now > not_after && !self.is(Mutant::IgnoresNotAfter) {
            return Err(Error::unavailable(
                format!("the statement on {key} ran after its not_after"),
                None,
            ));
        }
        Ok(now)
    }

    fn lease(&self, d: Duration) -> Duration {
        match self.mutant {
            Mutant::ShortLease => d * 19 / 20,
            Mutant::LongLease => d * 21 / 20,
            _ => d,
        }
    }

    /// Whether `row` is live at `now` for try-acquire.
    fn live_for_acquire(&self, row: &Row, now: Instant) -> bool {
        match row.expires {
            Some(at) if self.is(Mutant::ExpiresEarly) => {
                at.checked_sub(row.ttl / 20).is_some_and(|e| e > now)
            }
            Some(at) => at > now,
            None => false,
        }
    }

    fn info(&self, key: &LockKey, row: &Row, now: Instant) -> LockInfo {
        let (state, remaining) = match row.expires {
            None => (LockState::Released, None),
            Some(at) if at > now => (LockState::Held, Some(at - now)),
            Some(_) => (LockState::Expired, None),
        };
        let shift = |t: SystemTime| {
            if self.is(Mutant::TimesAnHourOff) {
                t + HOUR
            } else {
                t
            }
        };
        LockInfo {
            key: key.clone(),
            owner: row.owner.clone(),
            fence: row.fence,
            acquired_at: shift(row.acquired_at),
            expires_at: row.expires.map(|at| shift(self.clock(at))),
            state,
            remaining,
        }
    }

    /// One renewal, as `extend` and each `extend_many` entry do it.
    fn renew(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Duration,
        now: Instant,
        apply: bool,
    ) -> Result<SystemTime> {
        let reading = self.clock(now);
        let mut rows = self.rows();
        let Some(row) = rows.get_mut(key) else {
            return Err(Error::NotHeld { key: key.clone() });
        };
        let live = row.expires.is_some_and(|at| at > now);
        let revivable = self.is(Mutant::ExtendAfterExpiryOk) && row.expires.is_some();
        if row.token != *token || !(live || revivable) {
            return Err(Error::NotHeld { key: key.clone() });
        }
        if apply {
            let d = if self.is(Mutant::ExtendUsesAcquireTtl) {
                row.acquired_ttl
            } else {
                ttl
            };
            row.expires = Some(now + self.lease(d));
            row.ttl = d;
            if self.is(Mutant::ExtendBumpsFence) {
                row.fence = Fence::new(row.fence.get() + 1);
            }
        }
        if self.is(Mutant::FrozenReadings) {
            return Ok(row.acquired_at);
        }
        Ok(reading)
    }
}

#[async_trait]
impl LockBackend for RefBackend {
    async fn try_acquire(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        owner: &str,
        not_after: Instant,
    ) -> Result<AcquireOutcome> {
        self.connect().await?;
        let _row_lock = self.lock_row(key).await?;
        let now = self.now(not_after, key)?;
        let reading = self.clock(now);
        let d = ttl.get();
        let mut rows = self.rows();
        let old = rows.get(key).cloned();
        if let Some(row) = rows.get_mut(key)
            && self.live_for_acquire(row, now)
        {
            if row.token == *token && !self.is(Mutant::ReacquireBumpsFence) {
                row.expires = Some(now + self.lease(d));
                row.ttl = d;
                row.owner = owner.to_owned();
                return Ok(AcquireOutcome::Acquired {
                    fence: row.fence,
                    server_time: reading,
                });
            }
            if row.token != *token {
                let remaining = row.expires.map(|at| at.saturating_duration_since(now));
                match self.mutant {
                    Mutant::RefusalOverwritesOwner => row.owner = owner.to_owned(),
                    Mutant::RefusalBumpsFence => row.fence = Fence::new(row.fence.get() + 1),
                    Mutant::RefusalRenewsHolder => row.expires = Some(now + self.lease(row.ttl)),
                    _ => {}
                }
                return Ok(AcquireOutcome::Held { remaining });
            }
        }
        let fence = Fence::new(old.as_ref().map_or(1, |row| row.fence.get() + 1));
        let owner = match &old {
            Some(row) if self.is(Mutant::StaleOwner) => row.owner.clone(),
            _ => owner.to_owned(),
        };
        let acquired_at = match &old {
            Some(row) if self.is(Mutant::StaleAcquiredAt) => row.acquired_at,
            _ => reading,
        };
        rows.insert(
            key.clone(),
            Row {
                token: *token,
                fence,
                owner,
                acquired_at,
                expires: Some(now + self.lease(d)),
                acquired_ttl: d,
                ttl: d,
            },
        );
        let server_time = if self.is(Mutant::GrantReadingLags) {
            reading - Duration::from_secs(1)
        } else {
            reading
        };
        Ok(AcquireOutcome::Acquired { fence, server_time })
    }

    async fn extend(
        &self,
        key: &LockKey,
        token: &Token,
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<SystemTime> {
        self.connect().await?;
        let row_lock = self.lock_row(key).await?;
        /// Keeps the row lock of an extend dropped mid-flight, for the
        /// `DroppedExtendKeepsRowLock` bug.
        struct Leaky<'a> {
            guard: Option<OwnedMutexGuard<()>>,
            backend: &'a RefBackend,
            done: bool,
        }
        impl Drop for Leaky<'_> {
            fn drop(&mut self) {
                if !self.done
                    && self.backend.is(Mutant::DroppedExtendKeepsRowLock)
                    && let Some(guard) = self.guard.take()
                {
                    self.backend.leaked.lock().unwrap().push(guard);
                }
            }
        }
        let mut leaky = Leaky {
            guard: Some(row_lock),
            backend: self,
            done: false,
        };
        tokio::task::yield_now().await;
        // Answered (with an error or not): only a drop from here on leaks.
        leaky.done = true;
        let now = self.now(not_after, key)?;
        self.renew(key, token, ttl.get(), now, true)
    }

    async fn extend_many(
        &self,
        leases: &[(LockKey, Token)],
        ttl: Ttl,
        not_after: Instant,
    ) -> Result<Vec<Result<SystemTime>>> {
        self.connect().await?;
        if self.is(Mutant::BatchPanics) && !leases.is_empty() {
            panic!(
                "index out of bounds: the len is 0 but the index is {}",
                leases.len() - 1
            );
        }
        let mut results = Vec::with_capacity(leases.len());
        for (i, (key, token)) in leases.iter().enumerate() {
            let _row_lock = self.lock_row(key).await?;
            let now = match self.now(not_after, key) {
                Ok(now) => now,
                Err(error) => {
                    results.push(Err(error));
                    continue;
                }
            };
            let apply = match self.mutant {
                Mutant::BatchOkWithoutRenewing => false,
                Mutant::BatchSkipsLast => i + 1 != leases.len(),
                _ => true,
            };
            results.push(self.renew(key, token, ttl.get(), now, apply));
        }
        Ok(results)
    }

    async fn release(&self, key: &LockKey, token: &Token, not_after: Instant) -> Result<()> {
        self.connect().await?;
        let _row_lock = self.lock_row(key).await?;
        let now = self.now(not_after, key)?;
        {
            let mut rows = self.rows();
            let Some(row) = rows.get_mut(key) else {
                return Err(Error::NotHeld { key: key.clone() });
            };
            let live = row.expires.is_some_and(|at| at > now);
            let ours = row.token == *token || self.is(Mutant::WrongTokenReleases);
            let expired_ok = self.is(Mutant::ReleaseAfterExpiryOk) && row.expires.is_some();
            if !ours || !(live || expired_ok) {
                return Err(Error::NotHeld { key: key.clone() });
            }
            row.expires = None;
        }
        if !self.is(Mutant::SilentReleases) {
            self.notifier.notify(key);
        }
        Ok(())
    }

    async fn inspect(&self, key: &LockKey) -> Result<Option<LockInfo>> {
        self.connect().await?;
        let now = Instant::now();
        Ok(self.rows().get(key).map(|row| self.info(key, row, now)))
    }

    async fn list(&self) -> Result<Vec<LockInfo>> {
        self.connect().await?;
        let now = Instant::now();
        let mut all: Vec<LockInfo> = self
            .rows()
            .iter()
            .map(|(key, row)| self.info(key, row, now))
            .filter(|info| {
                !(self.is(Mutant::ListDropsReleased) && info.state == LockState::Released)
            })
            .collect();
        if self.is(Mutant::ListCaseInsensitive) {
            all.sort_by_key(|info| info.key.as_str().to_lowercase());
        }
        Ok(all)
    }

    async fn create_table(&self) -> Result<()> {
        self.table_exists.store(true, Ordering::SeqCst);
        Ok(())
    }

    fn schema_sql(&self) -> String {
        format!("CREATE TABLE {} (...);\n", self.table)
    }

    fn release_notifier(&self) -> Option<&ReleaseNotifier> {
        Some(&self.notifier)
    }
}

/// A fresh [`RefBackend`] with one bug per setup; declares every capability.
#[derive(Debug, Clone, Copy)]
pub struct RefHarness(pub Mutant);

#[async_trait]
impl Harness for RefHarness {
    async fn setup(&self) -> std::result::Result<Setup, Skip> {
        let backend = Arc::new(RefBackend::new(self.0, true));
        Ok(
            Setup::with_faults(backend.clone(), Arc::new(RefFaults(backend, self.0)))
                .with_latency_budget(Duration::from_millis(100))
                .with_fault_timeout(Duration::from_secs(3)),
        )
    }
}

struct RefFaults(Arc<RefBackend>, Mutant);

#[async_trait]
impl Faults for RefFaults {
    async fn make_unreachable(&self) -> std::result::Result<(), Unsupported> {
        self.0.reachable.send_replace(false);
        Ok(())
    }

    async fn restore(&self) -> std::result::Result<(), Unsupported> {
        self.0.reachable.send_replace(true);
        Ok(())
    }

    async fn kill_sessions(&self) -> std::result::Result<(), Unsupported> {
        self.0.killed.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn missing_table(&self) -> std::result::Result<Arc<dyn LockBackend>, Unsupported> {
        Ok(Arc::new(RefBackend::new(self.1, false)))
    }
}
