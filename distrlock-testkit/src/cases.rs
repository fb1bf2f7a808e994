//! The conformance cases: each a public async function that takes a [`Setup`] and
//! panics (with a message naming the broken promise) when the backend fails it.
//!
//! Each case's documentation starts with the item of
//! [`LockBackend`]'s `# Contract` it proves; [`CASES`](crate::CASES) lists them
//! in that order, with the capabilities they need. Run them all with
//! [`conformance_tests!`](crate::conformance_tests), or call any one directly.
//!
//! # How the cases judge time
//!
//! A case never fails a correct backend because of how long its calls took,
//! within the latency budget. Every time-dependent verdict is drawn from the
//! instants, on the caller's clock, at which requests were sent and answered: a
//! backend that granted a lease for `ttl` by a request sent at `s` must still
//! hold it for a probe answered before `s + ttl`, and must have let it go for a
//! probe sent after `a + ttl`, where `a` is when the grant was answered — both
//! within [`Setup::tolerance`]. The cases pick their waits so that, with every
//! call within the latency budget, each such check is conclusive; one that is not
//! fails saying the budget was exceeded.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use distrlock_core::server_clock::MAX_CLOCK_RATE_DIFFERENCE;
use distrlock_core::{
    AcquireOutcome, Error, Fence, LockBackend, LockInfo, LockKey, LockState, Place, Result, Ticket,
    Token, Ttl, WaiterAnswer,
};
use futures_util::future::join_all;
use tokio::sync::Barrier;
use tokio::time::Instant;

use crate::delayed::DelayedBackend;
use crate::harness::{Setup, TIME_TOLERANCE};

/// The owner text of the cases' direct calls.
const OWNER: &str = "distrlock-conformance";

/// How far the backend's clock may be from the test host's wall clock. A
/// session time zone shifts times by at least 30 minutes.
const WALL_CLOCK_AGREEMENT: Duration = Duration::from_secs(5 * 60);

// ---------------------------------------------------------------------------
// Helpers.

fn ttl(d: Duration) -> Ttl {
    Ttl::new(d).expect("case ttls are valid")
}

/// A `not_after` for direct backend calls: well after any answer a case expects.
fn soon(setup: &Setup) -> Instant {
    Instant::now() + setup.long_ttl()
}

/// An answer, and when its request was sent and the answer arrived, on the
/// caller's clock.
#[derive(Debug, Clone)]
struct Timed<T> {
    value: T,
    sent: Instant,
    answered: Instant,
}

impl<T> Timed<T> {
    fn took(&self) -> Duration {
        self.answered - self.sent
    }
}

async fn timed<T>(call: impl Future<Output = T>) -> Timed<T> {
    let sent = Instant::now();
    let value = call.await;
    Timed {
        value,
        sent,
        answered: Instant::now(),
    }
}

/// `call`, failing the case if it does not return within the fault timeout (the
/// watcher around the backend cuts it then too, with an error naming it).
async fn bounded<T>(setup: &Setup, what: &str, call: impl Future<Output = T>) -> T {
    let limit = setup.fault_timeout() + Duration::from_secs(1);
    match tokio::time::timeout(limit, call).await {
        Ok(value) => value,
        Err(_) => panic!(
            "{what} did not return within {limit:?} (contract item 6, bounded calls; latency \
             budget {:?})",
            setup.latency_budget()
        ),
    }
}

/// Fails the case because a check could not be concluded: the calls took longer
/// than the latency budget lets the case plan for.
fn inconclusive(setup: &Setup, what: &str, detail: String) -> ! {
    panic!(
        "{what}: the check is inconclusive because calls were slower than the latency budget of \
         {:?} allows ({detail}); set Setup::with_latency_budget if the backend is this slow when \
         healthy",
        setup.latency_budget()
    )
}

/// A granted acquire.
#[derive(Debug, Clone, Copy)]
struct Grant {
    fence: Fence,
    reading: SystemTime,
}

async fn try_acquire_as(
    setup: &Setup,
    key: &LockKey,
    token: &Token,
    d: Duration,
    owner: &str,
) -> Timed<AcquireOutcome> {
    let call = setup
        .backend
        .try_acquire(key, token, ttl(d), owner, soon(setup));
    let answer = timed(bounded(setup, "try_acquire", call)).await;
    match answer.value {
        Ok(value) => Timed {
            value,
            sent: answer.sent,
            answered: answer.answered,
        },
        Err(error) => panic!("try_acquire of {key} must not fail: {error}"),
    }
}

async fn try_acquire(
    setup: &Setup,
    key: &LockKey,
    token: &Token,
    d: Duration,
) -> Timed<AcquireOutcome> {
    try_acquire_as(setup, key, token, d, OWNER).await
}

fn granted(answer: Timed<AcquireOutcome>, what: &str) -> Timed<Grant> {
    match answer.value {
        AcquireOutcome::Acquired { fence, server_time } => Timed {
            value: Grant {
                fence,
                reading: server_time,
            },
            sent: answer.sent,
            answered: answer.answered,
        },
        AcquireOutcome::Held { remaining } => {
            panic!(
                "{what}: expected the lock to be acquired, it was held (remaining {remaining:?})"
            )
        }
    }
}

async fn acquire_as(
    setup: &Setup,
    key: &LockKey,
    token: &Token,
    d: Duration,
    owner: &str,
) -> Timed<Grant> {
    granted(
        try_acquire_as(setup, key, token, d, owner).await,
        &format!("acquire of {key}"),
    )
}

async fn acquire(setup: &Setup, key: &LockKey, token: &Token, d: Duration) -> Timed<Grant> {
    acquire_as(setup, key, token, d, OWNER).await
}

fn is_held(outcome: &AcquireOutcome) -> bool {
    matches!(outcome, AcquireOutcome::Held { .. })
}

async fn extend(
    setup: &Setup,
    key: &LockKey,
    token: &Token,
    d: Duration,
) -> Timed<Result<SystemTime>> {
    let call = setup.backend.extend(key, token, ttl(d), soon(setup));
    timed(bounded(setup, "extend", call)).await
}

async fn extended(setup: &Setup, key: &LockKey, token: &Token, d: Duration) -> Timed<SystemTime> {
    let answer = extend(setup, key, token, d).await;
    match answer.value {
        Ok(reading) => Timed {
            value: reading,
            sent: answer.sent,
            answered: answer.answered,
        },
        Err(error) => panic!("extend of {key} by its holder must succeed: {error}"),
    }
}

async fn release(setup: &Setup, key: &LockKey, token: &Token) -> Result<()> {
    let call = setup.backend.release(key, token, soon(setup));
    bounded(setup, "release", call).await
}

async fn inspect(setup: &Setup, key: &LockKey) -> Timed<Option<LockInfo>> {
    let answer = timed(bounded(setup, "inspect", setup.backend.inspect(key))).await;
    match answer.value {
        Ok(value) => Timed {
            value,
            sent: answer.sent,
            answered: answer.answered,
        },
        Err(error) => panic!("inspect of {key} must not fail: {error}"),
    }
}

async fn row(setup: &Setup, key: &LockKey) -> LockInfo {
    inspect(setup, key)
        .await
        .value
        .unwrap_or_else(|| panic!("inspect of {key} must find its row"))
}

/// The rows of this setup's keys, as `list` returns them.
async fn listed(setup: &Setup) -> Vec<LockInfo> {
    bounded(setup, "list", setup.backend.list())
        .await
        .expect("list must not fail")
        .into_iter()
        .filter(|info| info.key.as_str().starts_with(setup.prefix()))
        .collect()
}

fn is_not_held<T>(result: &Result<T>) -> bool {
    matches!(result, Err(Error::NotHeld { .. }))
}

/// `d` plus or minus the clock-rate allowance.
fn rate_up(d: Duration) -> Duration {
    d + d / MAX_CLOCK_RATE_DIFFERENCE
}

fn rate_down(d: Duration) -> Duration {
    d - d / MAX_CLOCK_RATE_DIFFERENCE
}

/// Whether a lease granted for `d` by a request sent at `grant_sent` was surely
/// still live when the statement of a probe answered at `probe_answered` ran.
fn surely_live(setup: &Setup, grant_sent: Instant, d: Duration, probe_answered: Instant) -> bool {
    probe_answered + setup.tolerance(d) < grant_sent + d
}

/// Whether a lease granted for `d` by a request answered at `grant_answered` had
/// surely ended when the statement of a probe sent at `probe_sent` ran.
fn surely_over(setup: &Setup, grant_answered: Instant, d: Duration, probe_sent: Instant) -> bool {
    probe_sent > grant_answered + d + setup.tolerance(d)
}

/// Sleeps until a lease granted for `d` by a request answered at `answered` has
/// surely ended.
async fn sleep_past_expiry(setup: &Setup, answered: Instant, d: Duration) {
    tokio::time::sleep_until(answered + d + setup.tolerance(d) + Duration::from_millis(20)).await;
}

/// `a − b`, signed, as text.
fn signed_diff(a: SystemTime, b: SystemTime) -> String {
    match a.duration_since(b) {
        Ok(d) => format!("+{d:?}"),
        Err(e) => format!("-{:?}", e.duration()),
    }
}

fn abs_diff(a: SystemTime, b: SystemTime) -> Duration {
    match a.duration_since(b) {
        Ok(d) => d,
        Err(e) => e.duration(),
    }
}

/// Asserts that the time `got` is `want` within `tolerance`.
fn assert_time(what: &str, got: SystemTime, want: SystemTime, tolerance: Duration) {
    assert!(
        abs_diff(got, want) <= tolerance,
        "{what}: off by {} (tolerance {tolerance:?})",
        signed_diff(got, want)
    );
}

/// Checks that `info` shows the live lease of `d` that the call `call` granted
/// or renewed with the clock reading `reading`, as an inspect made at `seen`
/// sees it: state, expiry (`reading + d`) and remaining lease.
fn check_lease<A, B>(
    setup: &Setup,
    what: &str,
    info: &LockInfo,
    reading: SystemTime,
    d: Duration,
    call: &Timed<A>,
    seen: &Timed<B>,
) {
    assert_eq!(
        info.state,
        LockState::Held,
        "{what}: the lease must be held right after it was granted or renewed for {d:?}"
    );
    let expires = info
        .expires_at
        .unwrap_or_else(|| panic!("{what}: a held lease reports expires_at"));
    assert_time(
        &format!(
            "{what}: expires_at must be the grant's clock reading plus the ttl asked for ({d:?})"
        ),
        expires,
        reading + d,
        setup.tolerance(d),
    );
    let remaining = info
        .remaining
        .unwrap_or_else(|| panic!("{what}: a held lease reports its remaining lease"));
    let tolerance = setup.tolerance(d);
    let least = d
        .saturating_sub(rate_up(seen.answered.saturating_duration_since(call.sent)))
        .saturating_sub(tolerance);
    let most = d.saturating_sub(rate_down(
        seen.sent.saturating_duration_since(call.answered),
    )) + tolerance;
    assert!(
        remaining >= least && remaining <= most,
        "{what}: remaining lease {remaining:?}, but a lease of {d:?} granted between \
         {:?} and {:?} before the inspect was answered must have between {least:?} and \
         {most:?} left",
        seen.answered.saturating_duration_since(call.answered),
        seen.answered.saturating_duration_since(call.sent),
    );
}

/// The fields of a row a call must not change, for comparisons.
fn fixed(info: &LockInfo) -> (Fence, &str, SystemTime, Option<SystemTime>, LockState) {
    (
        info.fence,
        info.owner.as_str(),
        info.acquired_at,
        info.expires_at,
        info.state,
    )
}

/// Probes `key` with other tokens from 90% of the lease's ttl on, until one
/// acquires it, and checks that the lease (granted or renewed for `d` by a
/// request sent at `sent` and answered at `answered`) ended neither before its
/// ttl nor after it, within tolerance.
async fn probe_expiry(
    setup: &Setup,
    what: &str,
    key: &LockKey,
    sent: Instant,
    answered: Instant,
    d: Duration,
) {
    let step =
        (setup.latency_budget() / 20).clamp(Duration::from_millis(2), Duration::from_millis(50));
    tokio::time::sleep_until((answered + d * 9 / 10).max(Instant::now())).await;
    loop {
        let probe = Token::new();
        let p = try_acquire(setup, key, &probe, setup.long_ttl()).await;
        match p.value {
            AcquireOutcome::Held { .. } => {
                assert!(
                    !surely_over(setup, answered, d, p.sent),
                    "{what}: the lease outlived its ttl of {d:?}: another token was refused {:?} \
                     after the grant was answered (contract item 11, liveness; tolerance {:?})",
                    p.sent - answered,
                    setup.tolerance(d)
                );
                tokio::time::sleep(step).await;
            }
            AcquireOutcome::Acquired { .. } => {
                assert!(
                    !surely_live(setup, sent, d, p.answered),
                    "{what}: the lease ended early: another token acquired it {:?} after the \
                     grant's request was sent, before its ttl of {d:?} (contract item 1; \
                     tolerance {:?})",
                    p.answered - sent,
                    setup.tolerance(d)
                );
                release(setup, key, &probe)
                    .await
                    .expect("the probe's token releases");
                return;
            }
        }
    }
}

/// Checks that the backend clock moved from `earlier` to `later` (readings of
/// the calls `a` and `b`) by about as much as ours did.
fn check_advance<A, B>(
    what: &str,
    earlier: SystemTime,
    a: &Timed<A>,
    later: SystemTime,
    b: &Timed<B>,
) {
    let moved = later.duration_since(earlier).unwrap_or_else(|back| {
        panic!(
            "{what}: the backend clock's reading went back by {:?} (contract item 9)",
            back.duration()
        )
    });
    let least =
        rate_down(b.sent.saturating_duration_since(a.answered)).saturating_sub(TIME_TOLERANCE);
    let most = rate_up(b.answered.saturating_duration_since(a.sent)) + TIME_TOLERANCE;
    assert!(
        moved >= least && moved <= most,
        "{what}: the backend clock's reading moved by {moved:?} while ours moved between \
         {least:?} and {most:?} (contract item 9: the readings advance with the clock)"
    );
}

// ---------------------------------------------------------------------------
// 1. Mutual exclusion.

/// Contract item 1 (mutual exclusion). Acquire, release, acquire again through a
/// manager: both succeed, the released row shows `released`, and the fence grows.
pub async fn acquire_release_reacquire(setup: &Setup) {
    let manager = setup.manager(setup.long_ttl());
    let key = setup.key("basic");
    let first = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let f1 = first.fence();
    first
        .release()
        .await
        .expect("release of a held lock succeeds");
    assert_eq!(
        row(setup, &key).await.state,
        LockState::Released,
        "a released row shows `released`"
    );
    let second = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    assert!(
        second.fence() > f1,
        "fence must grow: {f1} then {}",
        second.fence()
    );
    assert_ne!(second.token(), Token::default(), "tokens are random");
    second.release().await.unwrap();
}

/// Contract item 1 (mutual exclusion). While one token holds the lock, another is
/// refused, with the holder's remaining lease when the backend reports it.
pub async fn second_token_refused_while_held(setup: &Setup) {
    let long = setup.long_ttl();
    let key = setup.key("contended");
    let holder = Token::new();
    let grant = acquire(setup, &key, &holder, long).await;
    let refused = try_acquire(setup, &key, &Token::new(), long).await;
    match refused.value {
        AcquireOutcome::Held { remaining } => {
            if let Some(remaining) = remaining {
                let tolerance = setup.tolerance(long);
                assert!(
                    remaining <= long + tolerance,
                    "remaining {remaining:?} exceeds the ttl {long:?}"
                );
                let least = long
                    .saturating_sub(rate_up(refused.answered - grant.sent))
                    .saturating_sub(tolerance);
                assert!(
                    remaining >= least,
                    "remaining {remaining:?} is too short: the lease of {long:?} was granted at \
                     most {:?} earlier",
                    refused.answered - grant.sent
                );
            }
        }
        other => panic!("a second token must be refused, got {other:?}"),
    }
    let manager = setup.manager(long);
    match manager.lock(key.as_str()).unwrap().try_acquire().await {
        Err(Error::HeldByOther { key: k, .. }) => assert_eq!(k, key),
        other => panic!("try_acquire must return HeldByOther, got {other:?}"),
    }
    release(setup, &key, &holder).await.unwrap();
}

/// Contract item 1 (mutual exclusion). 32 concurrent try-acquires on one key:
/// exactly one wins.
pub async fn concurrent_try_acquires_one_winner(setup: &Setup) {
    let key = setup.key("race");
    let barrier = Arc::new(Barrier::new(32));
    let not_after = soon(setup);
    let long = ttl(setup.long_ttl());
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let backend = setup.backend.clone();
        let barrier = barrier.clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            backend
                .try_acquire(&key, &Token::new(), long, "racer", not_after)
                .await
        }));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await.expect("racer task") {
            Ok(AcquireOutcome::Acquired { .. }) => winners += 1,
            Ok(AcquireOutcome::Held { .. }) => {}
            Err(error) => panic!("a racing try_acquire failed: {error}"),
        }
    }
    assert_eq!(winners, 1, "exactly one of 32 racers must win");
}

/// Contract item 1 (mutual exclusion). Different keys are independent locks.
pub async fn independent_keys(setup: &Setup) {
    let long = setup.long_ttl();
    let (a, b) = (setup.key("independent-a"), setup.key("independent-b"));
    let (ta, tb) = (Token::new(), Token::new());
    acquire(setup, &a, &ta, long).await;
    acquire(setup, &b, &tb, long).await;
    release(setup, &a, &ta).await.unwrap();
    assert!(
        is_held(&try_acquire(setup, &b, &Token::new(), long).await.value),
        "releasing one key must not free another"
    );
    release(setup, &b, &tb).await.unwrap();
}

/// Contract item 1 (mutual exclusion). Keys are exact: case matters, a trailing
/// space matters, and a 255-byte multibyte key is stored and read back unchanged.
pub async fn keys_are_exact(setup: &Setup) {
    let long = setup.long_ttl();
    let keys = [
        setup.key("a"),
        setup.key("A"),
        setup.key("a "),
        setup.key("å"),
    ];
    for key in &keys {
        acquire(setup, key, &Token::new(), long).await;
    }
    for key in &keys {
        let info = row(setup, key).await;
        assert_eq!(&info.key, key, "the key must read back exactly");
    }
    // The longest key: prefix plus three-byte characters, padded to 255 bytes.
    let mut long_key = setup.prefix().to_owned();
    while long_key.len() + 3 <= LockKey::MAX_LEN {
        long_key.push('€');
    }
    while long_key.len() < LockKey::MAX_LEN {
        long_key.push('x');
    }
    let long_key = LockKey::new(long_key).unwrap();
    assert_eq!(long_key.as_str().len(), 255);
    acquire(setup, &long_key, &Token::new(), long).await;
    let info = row(setup, &long_key).await;
    assert_eq!(
        info.key, long_key,
        "a 255-byte multibyte key must read back exactly"
    );
}

/// Contract item 1 (mutual exclusion). A lease lasts exactly its ttl on the
/// backend's clock: `inspect` reports `expires_at` = grant reading + ttl and a
/// matching `remaining`, other tokens are refused until the ttl is nearly over
/// and let in once it is (probed from 90% of the ttl on), within tolerance. The
/// same for a lease that an extend shortened to a ttl other than the acquire's.
pub async fn lease_lasts_its_ttl(setup: &Setup) {
    let short = setup.short_ttl();
    let acquired = async {
        let key = setup.key("ttl-acquired");
        let token = Token::new();
        let grant = acquire(setup, &key, &token, short).await;
        let seen = inspect(setup, &key).await;
        let info = seen.value.clone().expect("row");
        check_lease(
            setup,
            "a fresh lease",
            &info,
            grant.value.reading,
            short,
            &grant,
            &seen,
        );
        probe_expiry(
            setup,
            "a fresh lease",
            &key,
            grant.sent,
            grant.answered,
            short,
        )
        .await;
    };
    let shortened = async {
        let key = setup.key("ttl-extended");
        let token = Token::new();
        acquire(setup, &key, &token, setup.long_ttl()).await;
        let renewal = extended(setup, &key, &token, short).await;
        let seen = inspect(setup, &key).await;
        let info = seen.value.clone().expect("row");
        check_lease(
            setup,
            "a lease extended to a shorter ttl",
            &info,
            renewal.value,
            short,
            &renewal,
            &seen,
        );
        probe_expiry(
            setup,
            "a lease extended to a shorter ttl",
            &key,
            renewal.sent,
            renewal.answered,
            short,
        )
        .await;
    };
    tokio::join!(acquired, shortened);
}

/// Contract item 1 (mutual exclusion). An extend renews the lease to end its own
/// ttl (not the acquire's) after the extend's clock reading, longer or shorter,
/// and changes nothing else: same fence, owner and `acquired_at`. A lease
/// extended past its first ttl is still held then.
pub async fn extend_sets_its_own_ttl(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let key = setup.key("extend-ttl");
    let token = Token::new();
    let grant = acquire_as(setup, &key, &token, short, "extend-owner").await;
    let before = row(setup, &key).await;

    let longer = extended(setup, &key, &token, long).await;
    let seen = inspect(setup, &key).await;
    let info = seen.value.clone().expect("row");
    check_lease(
        setup,
        "extended to a longer ttl",
        &info,
        longer.value,
        long,
        &longer,
        &seen,
    );
    assert_eq!(
        info.fence, grant.value.fence,
        "an extend must keep the fence"
    );
    assert_eq!(info.owner, before.owner, "an extend must keep the owner");
    assert_eq!(
        info.acquired_at, before.acquired_at,
        "an extend is not a new holding: acquired_at must stay"
    );

    sleep_past_expiry(setup, grant.answered, short).await;
    let probe = try_acquire(setup, &key, &Token::new(), long).await;
    if !is_held(&probe.value) {
        assert!(
            !surely_live(setup, longer.sent, long, probe.answered),
            "a lease extended to {long:?} ended with its first ttl of {short:?}"
        );
    }

    let shorter = extended(setup, &key, &token, short).await;
    let seen = inspect(setup, &key).await;
    let info = seen.value.clone().expect("row");
    check_lease(
        setup,
        "extended to a shorter ttl",
        &info,
        shorter.value,
        short,
        &shorter,
        &seen,
    );
    assert_eq!(
        info.fence, grant.value.fence,
        "an extend must keep the fence"
    );

    let again = acquire(setup, &key, &token, long).await;
    assert_eq!(
        again.value.fence, grant.value.fence,
        "re-acquiring an extended lease with its token keeps the fence"
    );
    release(setup, &key, &token).await.unwrap();
}

/// Contract item 1 (mutual exclusion). Extending keeps the lock past the original
/// ttl; two extends in a row both succeed; extending after expiry fails.
pub async fn extend_keeps_lock_and_fails_after_expiry(setup: &Setup) {
    let short = setup.short_ttl();
    let key = setup.key("extend");
    let token = Token::new();
    let grant = acquire(setup, &key, &token, short).await;
    tokio::time::sleep_until(grant.answered + short / 2).await;
    let first = extend(setup, &key, &token, short).await;
    if let Err(error) = &first.value {
        if surely_live(setup, grant.sent, short, first.answered) {
            panic!("extend while live must succeed, got {error}");
        }
        inconclusive(
            setup,
            "extend while live",
            format!(
                "the extend was answered {:?} after the acquire was sent",
                first.answered - grant.sent
            ),
        );
    }
    let second = extend(setup, &key, &token, short).await;
    second
        .value
        .as_ref()
        .expect("a second extend at once must succeed");
    sleep_past_expiry(setup, grant.answered, short).await;
    // Past the original ttl, still held thanks to the extends.
    let probe = try_acquire(setup, &key, &Token::new(), setup.long_ttl()).await;
    if !is_held(&probe.value) {
        if surely_live(setup, second.sent, short, probe.answered) {
            panic!("an extended lease must outlive its original ttl");
        }
        inconclusive(
            setup,
            "an extended lease outlives its original ttl",
            format!(
                "the probe was answered {:?} after the extend was sent",
                probe.answered - second.sent
            ),
        );
    }
    sleep_past_expiry(setup, second.answered, short).await;
    assert!(
        is_not_held(&extend(setup, &key, &token, short).await.value),
        "an expired lease cannot be extended"
    );
}

/// Contract item 1 (mutual exclusion). `extend_many` renews exactly the leases
/// its tokens hold, each to end the batch's ttl after that entry's clock reading
/// (checked on the backend with `inspect`, for every entry, the last one
/// included), answers each entry in order, and changes nothing for the others: a
/// wrong token, a key never acquired, a released and an expired lease all get
/// `NotHeld`. A batch of 40 shuffled entries too.
pub async fn extend_many_renews_only_held_leases(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let backend = &setup.backend;
    assert!(
        bounded(
            setup,
            "extend_many",
            backend.extend_many(&[], ttl(long), soon(setup))
        )
        .await
        .expect("an empty batch succeeds")
        .is_empty(),
        "an empty batch has no results"
    );
    let expired = setup.key("many-expired");
    let expired_token = Token::new();
    let expiring = acquire(setup, &expired, &expired_token, short).await;
    sleep_past_expiry(setup, expiring.answered, short).await;

    // Acquired all at once, so that the short leases are young at any latency.
    let held: Vec<(LockKey, Token)> = ["many-held-a", "many-held-b", "many-held-c"]
        .iter()
        .map(|name| (setup.key(name), Token::new()))
        .collect();
    let other = setup.key("many-other");
    let released = setup.key("many-released");
    let released_token = Token::new();
    let acquiring = held
        .iter()
        .map(|(key, token)| async move {
            acquire(setup, key, token, short).await;
        })
        .collect::<Vec<_>>();
    let other_holder = Token::new();
    tokio::join!(
        join_all(acquiring),
        acquire(setup, &other, &other_holder, long),
        async {
            acquire(setup, &released, &released_token, long).await;
            release(setup, &released, &released_token).await.unwrap();
        }
    );
    let other_before = row(setup, &other).await;
    let missing = setup.key("many-missing");

    let leases = [
        held[0].clone(),
        (other.clone(), Token::new()),
        (missing.clone(), Token::new()),
        held[1].clone(),
        (released.clone(), released_token),
        (expired.clone(), expired_token),
        held[0].clone(),
        held[2].clone(),
    ];
    let batch = timed(bounded(
        setup,
        "extend_many",
        backend.extend_many(&leases, ttl(long), soon(setup)),
    ))
    .await;
    let results = batch
        .value
        .as_ref()
        .expect("extend_many must not fail as a whole");
    assert_eq!(results.len(), leases.len(), "one result per entry");
    let renewed: Vec<bool> = results
        .iter()
        .map(|result| match result {
            Ok(_) => true,
            Err(Error::NotHeld { .. }) => false,
            Err(error) => panic!("an entry failed with {error} instead of NotHeld"),
        })
        .collect();
    assert_eq!(
        renewed,
        [true, false, false, true, false, false, true, true],
        "held leases renewed in their positions, every other entry NotHeld"
    );
    for (i, (key, _)) in leases.iter().enumerate() {
        let Ok(reading) = results[i] else { continue };
        let seen = inspect(setup, key).await;
        let info = seen.value.clone().expect("row");
        check_lease(
            setup,
            &format!("entry {i} of the batch ({key})"),
            &info,
            reading,
            long,
            &batch,
            &seen,
        );
    }
    let other_after = row(setup, &other).await;
    assert_eq!(
        fixed(&other_after),
        fixed(&other_before),
        "a wrong token's entry must change nothing"
    );
    assert_eq!(
        row(setup, &released).await.state,
        LockState::Released,
        "a released lease's entry must leave it released"
    );
    assert_eq!(
        row(setup, &expired).await.state,
        LockState::Expired,
        "an expired lease's entry must leave it expired"
    );
    assert!(
        inspect(setup, &missing).await.value.is_none(),
        "no row is created for a key never acquired"
    );

    // 40 entries whose keys sort against their order: held by their token, held
    // by another, or never acquired.
    let mut big = Vec::new();
    let mut expect = Vec::new();
    let mut acquiring = Vec::new();
    for i in 0..40 {
        let key = setup.key(&format!("many-big-{:02}", 39 - i));
        let token = Token::new();
        let (holder, d) = match i % 3 {
            0 | 2 if i % 7 != 5 => (Some(token), short),
            1 => (Some(Token::new()), long),
            _ => (None, long),
        };
        expect.push(holder == Some(token));
        if let Some(holder) = holder {
            let key = key.clone();
            acquiring.push(async move {
                acquire(setup, &key, &holder, d).await;
            });
        }
        big.push((key, token));
    }
    join_all(acquiring).await;
    let batch = timed(bounded(
        setup,
        "extend_many",
        backend.extend_many(&big, ttl(long), soon(setup)),
    ))
    .await;
    let results = batch.value.as_ref().expect("a batch of 40 must not fail");
    assert_eq!(results.len(), big.len(), "one result per entry of 40");
    let renewed: Vec<bool> = results.iter().map(Result::is_ok).collect();
    assert_eq!(
        renewed, expect,
        "a batch of 40: each held lease renewed in its position"
    );
    for (i, (key, _)) in big.iter().enumerate() {
        let Ok(reading) = results[i] else {
            assert!(is_not_held(&results[i]), "entry {i}: {:?}", results[i]);
            continue;
        };
        let seen = inspect(setup, key).await;
        let info = seen.value.clone().expect("row");
        check_lease(
            setup,
            &format!("entry {i} of the batch of 40 ({key})"),
            &info,
            reading,
            long,
            &batch,
            &seen,
        );
    }
    for (key, token) in &held {
        release(setup, key, token).await.unwrap();
    }
}

/// Contract item 1 (mutual exclusion), through the manager. `do_exclusively` keeps
/// an occupancy counter at most 1 across 16 concurrent callers (fewer, down to 4,
/// when the latency budget is over 100 ms: they take turns), and runs each of
/// them.
pub async fn do_exclusively_is_exclusive(setup: &Setup) {
    let manager = setup.manager(setup.long_ttl());
    let key = setup.key("exclusive");
    let inside = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicUsize::new(0));
    let budget_ms = setup.latency_budget().as_millis().max(1);
    let callers = (1600 / budget_ms).clamp(4, 16) as usize;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (manager, key, inside, ran) =
            (manager.clone(), key.clone(), inside.clone(), ran.clone());
        tasks.push(tokio::spawn(async move {
            manager
                .do_exclusively(key.as_str(), |_lease| async move {
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    assert_eq!(now, 1, "two callers inside do_exclusively at once");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                    ran.fetch_add(1, Ordering::SeqCst);
                })
                .await
                .expect("do_exclusively");
        }));
    }
    for task in tasks {
        task.await.expect("caller task");
    }
    assert_eq!(
        ran.load(Ordering::SeqCst),
        callers,
        "every caller's work ran once"
    );
}

// ---------------------------------------------------------------------------
// 2. Fencing.

/// Contract item 2 (fencing). Over up to 1,000 acquisitions by 8 clients (fewer
/// on a slow backend: the clients stop after 10 s or 20 latency budgets, with at
/// least 3 acquisitions each), the fences seen inside the critical sections
/// strictly increase.
pub async fn fences_strictly_increase(setup: &Setup) {
    const CLIENTS: usize = 8;
    const TOTAL: usize = 1000;
    let manager = setup.manager(setup.long_ttl());
    let key = setup.key("fences");
    let stop_at = Instant::now() + Duration::from_secs(10).max(setup.latency_budget() * 20);
    let seen = Arc::new(std::sync::Mutex::new(Vec::with_capacity(TOTAL)));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let lock = manager.lock(key.as_str()).unwrap();
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = 0;
            loop {
                let enough = seen.lock().unwrap().len() >= TOTAL;
                if mine >= 3 && (enough || Instant::now() >= stop_at) {
                    break;
                }
                let guard = lock
                    .acquire_timeout(Duration::from_secs(120))
                    .await
                    .expect("acquire");
                // Pushed while holding the lock: the vector is in acquisition order.
                seen.lock().unwrap().push(guard.fence());
                guard.release().await.expect("release");
                mine += 1;
                // Step back briefly so that one client cannot win every round.
                let pause = fastrand::u64(0..2_000);
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
        }));
    }
    for task in tasks {
        task.await.expect("client task");
    }
    let seen = seen.lock().unwrap();
    assert!(seen.len() >= CLIENTS * 3);
    for pair in seen.windows(2) {
        assert!(
            pair[1] > pair[0],
            "fence went from {} to {}",
            pair[0],
            pair[1]
        );
    }
}

/// Contract item 2 (fencing). The holder's own token re-acquires: same fence,
/// the lease renewed to the new ttl, others still refused after the first ttl.
pub async fn same_token_reacquires_idempotently(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let key = setup.key("idempotent");
    let token = Token::new();
    let first = acquire(setup, &key, &token, short).await;
    let again = acquire(setup, &key, &token, long).await;
    assert_eq!(
        first.value.fence, again.value.fence,
        "re-acquiring with the holder's token keeps the fence"
    );
    let seen = inspect(setup, &key).await;
    let info = seen.value.clone().expect("row");
    check_lease(
        setup,
        "a re-acquired lease",
        &info,
        again.value.reading,
        long,
        &again,
        &seen,
    );
    sleep_past_expiry(setup, first.answered, short).await;
    assert!(
        is_held(&try_acquire(setup, &key, &Token::new(), long).await.value),
        "the renewed lease must still be held after the first ttl"
    );
    release(setup, &key, &token).await.unwrap();
}

/// Contract item 2 (fencing). The same token after its lease was released, or ran
/// out, starts a new holding: a greater fence, not the old one.
pub async fn same_token_after_release_or_expiry_gets_a_new_fence(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let key = setup.key("same-token-again");
    let token = Token::new();
    let f1 = acquire(setup, &key, &token, long).await.value.fence;
    release(setup, &key, &token).await.unwrap();
    let second = acquire(setup, &key, &token, short).await;
    let f2 = second.value.fence;
    assert!(f2 > f1, "after a release: {f1} then {f2}");
    sleep_past_expiry(setup, second.answered, short).await;
    let f3 = acquire(setup, &key, &token, long).await.value.fence;
    assert!(f3 > f2, "after expiry: {f2} then {f3}");
    assert_eq!(
        acquire(setup, &key, &token, long).await.value.fence,
        f3,
        "while live: the same"
    );
    release(setup, &key, &token).await.unwrap();
}

// ---------------------------------------------------------------------------
// 3. Ownership.

/// Contract item 3 (ownership). A wrong token gets `NotHeld` on release and
/// extend, and changes nothing: fence, owner, `acquired_at`, expiry and state
/// stay. Nor do release and extend of a key never acquired create a row.
pub async fn wrong_token_not_held(setup: &Setup) {
    let long = setup.long_ttl();
    let key = setup.key("wrong-token");
    let token = Token::new();
    acquire(setup, &key, &token, long).await;
    let before = row(setup, &key).await;
    let wrong = Token::new();
    assert!(
        is_not_held(&release(setup, &key, &wrong).await),
        "a wrong token's release must get NotHeld"
    );
    assert!(
        is_not_held(&extend(setup, &key, &wrong, long).await.value),
        "a wrong token's extend must get NotHeld"
    );
    let after = row(setup, &key).await;
    assert_eq!(
        fixed(&after),
        fixed(&before),
        "a refused release or extend must change nothing"
    );
    extended(setup, &key, &token, long).await;
    release(setup, &key, &token)
        .await
        .expect("the holder still releases");
    assert!(
        is_not_held(&release(setup, &key, &Token::new()).await),
        "a released lease: any token's release gets NotHeld"
    );
    let missing = setup.key("never-acquired");
    assert!(
        is_not_held(&release(setup, &missing, &token).await),
        "release of a key never acquired gets NotHeld"
    );
    assert!(is_not_held(
        &extend(setup, &missing, &token, long).await.value
    ));
    assert!(
        inspect(setup, &missing).await.value.is_none(),
        "release or extend of a key never acquired must not create a row"
    );
}

/// Contract item 3 (ownership). A second release of the same holding gets
/// `NotHeld`, and a released lease cannot be extended.
pub async fn double_release(setup: &Setup) {
    let long = setup.long_ttl();
    let key = setup.key("double-release");
    let token = Token::new();
    acquire(setup, &key, &token, long).await;
    release(setup, &key, &token).await.unwrap();
    let before = row(setup, &key).await;
    assert!(
        is_not_held(&release(setup, &key, &token).await),
        "a second release must get NotHeld"
    );
    assert!(
        is_not_held(&extend(setup, &key, &token, long).await.value),
        "a released lease cannot be extended"
    );
    let info = row(setup, &key).await;
    assert_eq!(info.state, LockState::Released, "the row stays released");
    assert_eq!(fixed(&info), fixed(&before), "and they change nothing");
}

/// Contract item 3 (ownership). The right token, after its lease simply expired
/// (nobody took the key over), gets `NotHeld` on release and extend, and changes
/// nothing: the row stays expired with its fence, owner and times, and the next
/// holder gets a greater fence.
pub async fn release_after_expiry_is_not_held(setup: &Setup) {
    let short = setup.short_ttl();
    let key = setup.key("release-after-expiry");
    let token = Token::new();
    let grant = acquire(setup, &key, &token, short).await;
    sleep_past_expiry(setup, grant.answered, short).await;
    let before = row(setup, &key).await;
    assert_eq!(
        before.state,
        LockState::Expired,
        "a lease past its ttl shows `expired`"
    );
    assert!(
        is_not_held(&release(setup, &key, &token).await),
        "a release after the lease expired must get NotHeld"
    );
    assert!(
        is_not_held(&extend(setup, &key, &token, short).await.value),
        "an extend after the lease expired must get NotHeld"
    );
    let after = row(setup, &key).await;
    assert_eq!(
        fixed(&after),
        fixed(&before),
        "a release or extend after expiry must change nothing"
    );
    let next = acquire(setup, &key, &Token::new(), setup.long_ttl()).await;
    assert!(
        next.value.fence > grant.value.fence,
        "the next holding's fence must be greater"
    );
}

// ---------------------------------------------------------------------------
// 4. One clock.

/// Contract item 4 (one clock). Every time the backend reports is on one clock,
/// whatever the session's time zone: the grant's and the extend's readings,
/// `acquired_at` and `expires_at` from `inspect` and from `list` agree with each
/// other within tolerance, and with the test host's wall clock within 5 minutes
/// (a time-zone offset is at least 30).
pub async fn times_are_on_one_clock(setup: &Setup) {
    let long = setup.long_ttl();
    let key = setup.key("one-clock");
    let token = Token::new();
    let wall = SystemTime::now();
    let grant = acquire(setup, &key, &token, long).await;
    let reading = grant.value.reading;
    assert!(
        abs_diff(reading, wall) <= WALL_CLOCK_AGREEMENT,
        "the grant's clock reading is {} from the host's wall clock: more than \
         {WALL_CLOCK_AGREEMENT:?} (a time-zone offset, or a clock far off)",
        signed_diff(reading, wall)
    );
    let info = row(setup, &key).await;
    assert_time(
        "inspect's acquired_at must be the grant's clock reading",
        info.acquired_at,
        reading,
        TIME_TOLERANCE,
    );
    assert_time(
        "inspect's expires_at must be the grant's clock reading plus the ttl",
        info.expires_at.expect("a held lease has an expiry"),
        reading + long,
        setup.tolerance(long),
    );
    let listed = listed(setup).await;
    let entry = listed
        .iter()
        .find(|i| i.key == key)
        .expect("list shows the row");
    assert_eq!(
        (entry.acquired_at, entry.expires_at),
        (info.acquired_at, info.expires_at),
        "list and inspect must report the same times"
    );
    let renewal = extended(setup, &key, &token, long).await;
    assert!(
        abs_diff(renewal.value, SystemTime::now()) <= WALL_CLOCK_AGREEMENT,
        "the extend's clock reading is {} from the host's wall clock",
        signed_diff(renewal.value, SystemTime::now())
    );
    let info = row(setup, &key).await;
    assert_time(
        "after an extend, expires_at must be its clock reading plus the ttl",
        info.expires_at.expect("a held lease has an expiry"),
        renewal.value + long,
        setup.tolerance(long),
    );
    release(setup, &key, &token).await.unwrap();
}

// ---------------------------------------------------------------------------
// 5. Refusal is cheap and harmless.

/// Contract item 5 (refusal). A refused try-acquire changes nothing, whatever
/// owner and ttl it asks for: the row keeps its fence, owner, `acquired_at`,
/// expiry and state, the holder still extends and releases, the refusal reports
/// a remaining lease that fits the holder's, and the next holding's fence is
/// greater than the holder's.
pub async fn refused_acquire_changes_nothing(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let key = setup.key("refused");
    let holder = Token::new();
    let grant = acquire_as(setup, &key, &holder, long, "the-holder").await;
    let before = row(setup, &key).await;
    for (i, d) in [short, long, long * 2].into_iter().enumerate() {
        let intruder = Token::new();
        let refused = try_acquire_as(setup, &key, &intruder, d, &format!("intruder-{i}")).await;
        match refused.value {
            AcquireOutcome::Held { remaining } => {
                if let Some(remaining) = remaining {
                    let tolerance = setup.tolerance(long);
                    let least = long
                        .saturating_sub(rate_up(refused.answered - grant.sent))
                        .saturating_sub(tolerance);
                    assert!(
                        remaining <= long + tolerance && remaining >= least,
                        "a refusal reports {remaining:?} left of the holder's {long:?} lease, \
                         granted {:?} before",
                        refused.answered - grant.sent
                    );
                }
            }
            other => panic!("a live lease must refuse another token, got {other:?}"),
        }
        let after = row(setup, &key).await;
        assert_eq!(
            fixed(&after),
            fixed(&before),
            "a refused try_acquire (ttl {d:?}, another owner) must change nothing"
        );
        assert!(
            is_not_held(&release(setup, &key, &intruder).await),
            "a refused token must not hold the lease"
        );
    }
    extended(setup, &key, &holder, long).await;
    release(setup, &key, &holder)
        .await
        .expect("the holder still releases after refusals");
    let next = acquire(setup, &key, &Token::new(), long).await;
    assert!(
        next.value.fence > grant.value.fence,
        "the next holding's fence must be greater"
    );
}

// ---------------------------------------------------------------------------
// 6. Bounded calls.

/// Contract item 6 (bounded calls). While the database is unreachable, every
/// call — `try_acquire` of a free and of a held key, `extend`, `extend_many`,
/// `release`, `inspect`, `list` — returns within the fault timeout, with a
/// result or a transient error (item 7: an unreachable database gives
/// `Error::Unavailable`). Once reachable again, the backend works within the
/// fault timeout. Needs `unreachable`.
pub async fn calls_are_bounded_while_unreachable(setup: &Setup) {
    let long = setup.long_ttl();
    let held = setup.key("bounded-held");
    let token = Token::new();
    acquire(setup, &held, &token, long).await;
    let free = setup.key("bounded-free");
    setup.make_unreachable().await;
    let limit = setup.fault_timeout();
    let not_after = Instant::now() + limit;
    let backend = &setup.backend;
    let (long_ttl, other) = (ttl(long), Token::new());
    let lease = [(held.clone(), token)];
    type Call<'a> =
        std::pin::Pin<Box<dyn Future<Output = std::result::Result<String, Error>> + Send + 'a>>;
    let calls: Vec<(&str, Call<'_>)> = vec![
        (
            "try_acquire of a free key",
            Box::pin(async {
                let r = backend
                    .try_acquire(&free, &other, long_ttl, OWNER, not_after)
                    .await;
                r.map(|o| format!("{o:?}"))
            }),
        ),
        (
            "try_acquire of a held key",
            Box::pin(async {
                let r = backend
                    .try_acquire(&held, &other, long_ttl, OWNER, not_after)
                    .await;
                r.map(|o| format!("{o:?}"))
            }),
        ),
        (
            "extend",
            Box::pin(async {
                let r = backend.extend(&held, &token, long_ttl, not_after).await;
                r.map(|o| format!("{o:?}"))
            }),
        ),
        (
            "extend_many",
            Box::pin(async {
                let r = backend.extend_many(&lease, long_ttl, not_after).await;
                r.map(|o| format!("{o:?}"))
            }),
        ),
        (
            "release",
            Box::pin(async {
                let r = backend.release(&held, &token, not_after).await;
                r.map(|o| format!("{o:?}"))
            }),
        ),
        (
            "inspect",
            Box::pin(async { backend.inspect(&held).await.map(|o| format!("{o:?}")) }),
        ),
        (
            "list",
            Box::pin(async { backend.list().await.map(|o| format!("{} rows", o.len())) }),
        ),
    ];
    let started = Instant::now();
    let answers = join_all(calls.into_iter().map(|(what, call)| async move {
        let answer = tokio::time::timeout(limit + Duration::from_secs(1), call).await;
        (what, answer, started.elapsed())
    }))
    .await;
    setup.restore().await;
    for (what, answer, took) in answers {
        let answer = answer.unwrap_or_else(|_| {
            panic!("{what} did not return within {limit:?} while the database was unreachable (contract item 6)")
        });
        assert!(
            took < limit,
            "{what} took {took:?} while the database was unreachable, beyond the fault timeout \
             of {limit:?} (contract item 6): {answer:?}"
        );
        if let Err(error) = answer {
            assert!(
                error.is_transient(),
                "{what} on an unreachable database must fail with a transient error (contract \
                 item 7), got {error}"
            );
        }
    }
    // Reachable again: the backend works, after transient errors at most.
    let fresh = setup.key("bounded-after");
    let until = Instant::now() + limit;
    let mut last = None;
    loop {
        match bounded(
            setup,
            "try_acquire",
            backend.try_acquire(&fresh, &other, long_ttl, OWNER, soon(setup)),
        )
        .await
        {
            Ok(AcquireOutcome::Acquired { .. }) => break,
            Ok(held) => panic!("a key nobody acquired is held after the restore: {held:?}"),
            Err(error) if error.is_transient() && Instant::now() < until => {
                last = Some(error);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!(
                "the backend must work again within {limit:?} of the database coming back: \
                 {error} (before: {last:?})"
            ),
        }
    }
}

// ---------------------------------------------------------------------------
// 7. Errors are typed.

/// Contract item 7 (typed errors), through the manager. Bad input gets its typed
/// error and writes nothing.
pub async fn bad_input_is_refused(setup: &Setup) {
    let manager = setup.manager(setup.long_ttl());
    assert!(matches!(manager.lock(""), Err(Error::InvalidKey { .. })));
    assert!(matches!(
        manager.lock("k".repeat(256)),
        Err(Error::InvalidKey { .. })
    ));
    assert!(matches!(
        manager.lock(format!("{}a\0b", setup.prefix())),
        Err(Error::InvalidKey { .. })
    ));
    let lock = manager.lock(setup.key("bad-ttl").as_str()).unwrap();
    assert!(matches!(
        lock.clone().with_ttl(Duration::ZERO),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        lock.clone().with_ttl(Duration::MAX),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        lock.clone().with_ttl(Duration::from_secs(u64::MAX / 2)),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        setup.manager_builder(Duration::ZERO).build(),
        Err(Error::InvalidTtl { .. })
    ));
    assert!(matches!(
        setup
            .manager_builder(setup.long_ttl())
            .owner("a\0b")
            .build(),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(
        listed(setup).await.is_empty(),
        "refused input must not write a row"
    );
}

/// Contract item 7 (typed errors). On a table that does not exist, every call —
/// `try_acquire`, `extend`, `extend_many` (as a whole, or for every entry),
/// `release`, `inspect`, `list` — fails with `Error::SchemaMissing`, which is not
/// transient; `create_table` then creates the table (twice at once, and again,
/// without error) and the backend works. Needs `schema_missing`.
pub async fn missing_table_gives_schema_missing(setup: &Setup) {
    let backend = setup.missing_table().await;
    let long = ttl(setup.long_ttl());
    let key = setup.key("no-table");
    let token = Token::new();
    fn check<T: std::fmt::Debug>(what: &str, result: Result<T>) {
        match result {
            Err(error @ Error::SchemaMissing { .. }) => {
                assert!(!error.is_transient(), "SchemaMissing is not transient");
            }
            other => panic!(
                "{what} on a missing table must fail with Error::SchemaMissing (contract item \
                 7), got {other:?}"
            ),
        }
    }
    let not_after = soon(setup);
    check(
        "try_acquire",
        bounded(
            setup,
            "try_acquire",
            backend.try_acquire(&key, &token, long, OWNER, not_after),
        )
        .await,
    );
    check(
        "extend",
        bounded(
            setup,
            "extend",
            backend.extend(&key, &token, long, not_after),
        )
        .await,
    );
    match bounded(
        setup,
        "extend_many",
        backend.extend_many(&[(key.clone(), token)], long, not_after),
    )
    .await
    {
        Ok(entries) => {
            assert_eq!(entries.len(), 1, "one result per entry");
            for entry in entries {
                check("each entry of extend_many", entry);
            }
        }
        whole => check("extend_many", whole),
    }
    check(
        "release",
        bounded(setup, "release", backend.release(&key, &token, not_after)).await,
    );
    check(
        "inspect",
        bounded(setup, "inspect", backend.inspect(&key)).await,
    );
    check("list", bounded(setup, "list", backend.list()).await);

    let (a, b) = tokio::join!(backend.create_table(), backend.create_table());
    a.expect("create_table creates the missing table");
    b.expect("create_table is safe to call concurrently");
    backend
        .create_table()
        .await
        .expect("create_table is safe to call again");
    match bounded(
        setup,
        "try_acquire",
        backend.try_acquire(&key, &token, long, OWNER, soon(setup)),
    )
    .await
    {
        Ok(AcquireOutcome::Acquired { .. }) => {}
        other => panic!("after create_table the backend must work, got {other:?}"),
    }
    let info = bounded(setup, "inspect", backend.inspect(&key))
        .await
        .expect("inspect after create_table")
        .expect("the row");
    assert_eq!(
        info.state,
        LockState::Held,
        "the lease taken after create_table is held"
    );
    bounded(setup, "release", backend.release(&key, &token, soon(setup)))
        .await
        .expect("release after create_table");
}

/// Contract item 7 (typed errors). Killed server sessions cost at most one failed
/// call, with a transient error; the lock stays held. Needs `kill_sessions`.
pub async fn killed_sessions_are_recovered(setup: &Setup) {
    let long = setup.long_ttl();
    let key = setup.key("killed");
    let token = Token::new();
    acquire(setup, &key, &token, long).await;
    setup.kill_sessions().await;
    let mut failures = 0;
    for _ in 0..3 {
        match extend(setup, &key, &token, long).await.value {
            Ok(_) => break,
            Err(error) => {
                assert!(
                    error.is_transient(),
                    "a killed session must give a transient error, got {error}"
                );
                failures += 1;
            }
        }
    }
    assert!(
        failures <= 1,
        "{failures} calls failed after the sessions were killed"
    );
    assert!(
        is_held(&try_acquire(setup, &key, &Token::new(), long).await.value),
        "the lock stays held when sessions are killed"
    );
    release(setup, &key, &token)
        .await
        .expect("the holder still releases");
}

// ---------------------------------------------------------------------------
// 8. No late effects.

/// Contract item 8 (no late effects). A call whose `not_after` has passed when it
/// reaches the backend changes nothing and fails with a transient error:
/// `try_acquire` of a free key (no row appears) and of the holder's own key (no
/// renewal), `extend`, `extend_many` and `release` (the lease stays as it was).
pub async fn passed_not_after_changes_nothing(setup: &Setup) {
    let long = setup.long_ttl();
    let key = setup.key("late");
    let token = Token::new();
    acquire(setup, &key, &token, long).await;
    let before = row(setup, &key).await;
    let fresh = setup.key("late-free");
    let backend = &setup.backend;
    let passed = || {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(1)).unwrap_or(now)
    };
    fn refused<T: std::fmt::Debug>(what: &str, result: &Result<T>) {
        match result {
            Err(error) if error.is_transient() => {}
            other => panic!(
                "{what} with a not_after that has passed must be refused with a transient error \
                 (contract item 8), got {other:?}"
            ),
        }
    }
    let long_ttl = ttl(long * 2);
    refused(
        "try_acquire of a free key",
        &bounded(
            setup,
            "try_acquire",
            backend.try_acquire(&fresh, &token, long_ttl, OWNER, passed()),
        )
        .await,
    );
    assert!(
        inspect(setup, &fresh).await.value.is_none(),
        "a late try_acquire must not create a row"
    );
    refused(
        "try_acquire by the holder",
        &bounded(
            setup,
            "try_acquire",
            backend.try_acquire(&key, &token, long_ttl, "late-owner", passed()),
        )
        .await,
    );
    refused(
        "extend",
        &bounded(
            setup,
            "extend",
            backend.extend(&key, &token, long_ttl, passed()),
        )
        .await,
    );
    match bounded(
        setup,
        "extend_many",
        backend.extend_many(&[(key.clone(), token)], long_ttl, passed()),
    )
    .await
    {
        Ok(entries) => {
            assert_eq!(entries.len(), 1, "one result per entry");
            refused("the entry of extend_many", &entries[0]);
        }
        whole => refused("extend_many", &whole),
    }
    refused(
        "release",
        &bounded(setup, "release", backend.release(&key, &token, passed())).await,
    );
    let after = row(setup, &key).await;
    assert_eq!(
        fixed(&after),
        fixed(&before),
        "calls past their not_after must change nothing"
    );
    release(setup, &key, &token)
        .await
        .expect("the holder still releases");
}

/// Contract item 8 (no late effects), through the manager. A try-acquire whose
/// request is held back by an unreachable database, and that its caller gave up
/// on (with the manager's cleanup run while still unreachable), takes no effect
/// when the database is reachable again and the held-back requests arrive: no
/// lease that nobody holds appears later. Needs `unreachable`; `restore` may
/// deliver what the network held back, as a frozen path that heals does.
pub async fn timed_out_try_takes_no_effect_later(setup: &Setup) {
    let key = setup.key("late-delivery");
    let call_timeout = Duration::from_millis(500).max(setup.latency_budget() * 3);
    let manager = setup
        .manager_builder(setup.long_ttl())
        .call_timeout(call_timeout)
        .build()
        .unwrap();
    setup.make_unreachable().await;
    let bound = call_timeout + setup.fault_timeout();
    let tried = tokio::time::timeout(bound, manager.lock(key.as_str()).unwrap().try_acquire())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "a try on an unreachable backend must end by its call timeout of {call_timeout:?}"
            )
        });
    assert!(
        tried.as_ref().is_err_and(Error::is_transient),
        "a try on an unreachable backend fails transiently, got {tried:?}"
    );
    // The cleanup of the abandoned try runs (and gives up) while unreachable.
    tokio::time::timeout(bound * 2, manager.settle())
        .await
        .expect("the manager's cleanup must end within two call timeouts");
    setup.restore().await;
    // Time for the held-back requests to arrive and run.
    tokio::time::sleep(Duration::from_secs(1).max(setup.latency_budget() * 4)).await;
    let info = inspect(setup, &key).await.value;
    assert!(
        !info.as_ref().is_some_and(|i| i.is_live()),
        "a try that arrived after its caller gave up took the lock: {info:?}"
    );
    let other = Token::new();
    acquire(setup, &key, &other, setup.long_ttl()).await;
    release(setup, &key, &other).await.unwrap();
}

// ---------------------------------------------------------------------------
// 9. Clock readings.

/// Contract item 9 (clock readings). The readings of a grant, an extend, an
/// `extend_many` entry and a same-token re-acquire advance as the clock does:
/// between two calls they move by about as much as the caller's clock moved
/// (within the round trips and the clock-rate allowance), never back; and each
/// renewal sets `expires_at` to its reading plus the ttl.
pub async fn clock_readings_advance(setup: &Setup) {
    let long = setup.long_ttl();
    let pause = Duration::from_millis(100).max(setup.latency_budget() * 2);
    let key = setup.key("readings");
    let token = Token::new();
    let grant = acquire(setup, &key, &token, long).await;
    tokio::time::sleep(pause).await;
    let first = extended(setup, &key, &token, long).await;
    check_advance(
        "from the grant to an extend",
        grant.value.reading,
        &grant,
        first.value,
        &first,
    );
    tokio::time::sleep(pause).await;
    let batch = timed(bounded(
        setup,
        "extend_many",
        setup
            .backend
            .extend_many(&[(key.clone(), token)], ttl(long), soon(setup)),
    ))
    .await;
    let second = match &batch.value {
        Ok(entries) if entries.len() == 1 => match &entries[0] {
            Ok(reading) => *reading,
            Err(error) => panic!("the holder's extend_many entry must succeed: {error}"),
        },
        other => panic!("extend_many of one held lease: {other:?}"),
    };
    check_advance(
        "from an extend to extend_many",
        first.value,
        &first,
        second,
        &batch,
    );
    let seen = inspect(setup, &key).await;
    let info = seen.value.clone().expect("row");
    check_lease(
        setup,
        "after extend_many",
        &info,
        second,
        long,
        &batch,
        &seen,
    );
    tokio::time::sleep(pause).await;
    let again = acquire(setup, &key, &token, long).await;
    check_advance(
        "from extend_many to a re-acquire",
        second,
        &batch,
        again.value.reading,
        &again,
    );
    release(setup, &key, &token).await.unwrap();
}

// ---------------------------------------------------------------------------
// 10. Cancel safety.

/// One kind of call that `dropped_calls_leave_a_consistent_state` drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dropped {
    /// `try_acquire` of a free key.
    Acquire,
    /// `try_acquire` by the holder.
    Reacquire,
    Extend,
    ExtendMany,
    Release,
}

/// Where `dropped_calls_leave_a_consistent_state` drops a call.
#[derive(Debug, Clone, Copy)]
enum DropPoint {
    /// After this many polls (with a yield between them).
    Polls(u32),
    /// After this long.
    After(Duration),
}

/// Contract item 10 (cancel safety), on the trait itself. Every mutating call
/// (`try_acquire` of a free key and by the holder, `extend`, `extend_many`,
/// `release`) is dropped mid-flight: after 1 to 4 polls, and after a quarter,
/// half and three quarters of its usual round trip. Once its `not_after` has
/// passed, another token's `try_acquire` on the key answers within the latency
/// budget (no row lock is left behind), and the state is consistent: the dropped
/// call took effect or it did not, so exactly one of the holder's token and the
/// other token holds the key, a dropped renewal never ends a lease, and fence,
/// owner and `acquired_at` are unchanged by it.
pub async fn dropped_calls_leave_a_consistent_state(setup: &Setup) {
    let long = setup.long_ttl();
    // A usual round trip, for the drop points.
    let mut round_trip = Duration::ZERO;
    for i in 0..3 {
        let key = setup.key(&format!("dropped-warmup-{i}"));
        let token = Token::new();
        let grant = acquire(setup, &key, &token, long).await;
        round_trip = round_trip.max(grant.took());
        release(setup, &key, &token).await.unwrap();
    }
    let kinds = [
        Dropped::Acquire,
        Dropped::Reacquire,
        Dropped::Extend,
        Dropped::ExtendMany,
        Dropped::Release,
    ];
    let points = [
        DropPoint::Polls(1),
        DropPoint::Polls(2),
        DropPoint::Polls(3),
        DropPoint::Polls(4),
        DropPoint::After(round_trip / 4),
        DropPoint::After(round_trip / 2),
        DropPoint::After(round_trip * 3 / 4),
    ];
    let mut rounds = Vec::new();
    for (k, kind) in kinds.into_iter().enumerate() {
        for (p, point) in points.into_iter().enumerate() {
            rounds.push(drop_round(setup, kind, point, round_trip, k * 10 + p));
        }
    }
    join_all(rounds).await;
}

async fn drop_round(
    setup: &Setup,
    kind: Dropped,
    point: DropPoint,
    round_trip: Duration,
    n: usize,
) {
    let long = setup.long_ttl();
    let key = setup.key(&format!("dropped-{n}"));
    let token = Token::new();
    let before = if kind == Dropped::Acquire {
        None
    } else {
        acquire(setup, &key, &token, long).await;
        Some(row(setup, &key).await)
    };
    let not_after = Instant::now() + round_trip * 4 + Duration::from_millis(50);
    let backend = &setup.backend;
    let lease = [(key.clone(), token)];
    let mut call: std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> = match kind {
        Dropped::Acquire | Dropped::Reacquire => Box::pin(async {
            let _ = backend
                .try_acquire(&key, &token, ttl(long), OWNER, not_after)
                .await;
        }),
        Dropped::Extend => Box::pin(async {
            let _ = backend.extend(&key, &token, ttl(long), not_after).await;
        }),
        Dropped::ExtendMany => Box::pin(async {
            let _ = backend.extend_many(&lease, ttl(long), not_after).await;
        }),
        Dropped::Release => Box::pin(async {
            let _ = backend.release(&key, &token, not_after).await;
        }),
    };
    let what = match point {
        DropPoint::Polls(n) => format!("{kind:?} dropped after {n} polls"),
        DropPoint::After(after) => format!("{kind:?} dropped after {after:?}"),
    };
    match point {
        DropPoint::Polls(n) => {
            for i in 0..n {
                if i > 0 {
                    tokio::task::yield_now().await;
                }
                let done =
                    std::future::poll_fn(|cx| Poll::Ready(call.as_mut().poll(cx).is_ready())).await;
                if done {
                    break;
                }
            }
        }
        DropPoint::After(after) => {
            let _ = tokio::time::timeout(after, call.as_mut()).await;
        }
    }
    drop(call);
    tokio::time::sleep_until(not_after + Duration::from_millis(10)).await;
    let other = Token::new();
    let probe = timed(bounded(
        setup,
        "try_acquire",
        backend.try_acquire(&key, &other, ttl(long), OWNER, soon(setup)),
    ))
    .await;
    let outcome = probe.value.as_ref().unwrap_or_else(|error| {
        panic!(
            "{what}: another token's try_acquire on the key afterwards failed after {:?}:              {error} (contract item 10: a dropped call lets go of its row locks)",
            probe.took()
        )
    });
    assert!(
        probe.took() <= setup.latency_budget(),
        "{what}: another token's try_acquire on the key took {:?}, over the latency budget:          the dropped call kept the row locked (contract item 10)",
        probe.took()
    );
    let other_holds = !is_held(outcome);
    let renewed = extend(setup, &key, &token, long).await.value;
    let token_holds = match &renewed {
        Ok(_) => true,
        Err(Error::NotHeld { .. }) => false,
        Err(error) => panic!("{what}: the token's extend afterwards failed: {error}"),
    };
    assert!(
        token_holds != other_holds,
        "{what}: after the drop, the token {} and another token {} the key: the dropped call \
         must take effect or not, consistently (contract item 10)",
        if token_holds {
            "holds"
        } else {
            "does not hold"
        },
        if other_holds {
            "acquired"
        } else {
            "was refused"
        },
    );
    let info = row(setup, &key).await;
    if let Some(before) = before
        && kind != Dropped::Release
    {
        assert!(
            token_holds,
            "{what}: a dropped renewal must not end the lease (contract item 10)"
        );
        assert_eq!(
            (info.fence, info.owner.as_str(), info.acquired_at),
            (before.fence, before.owner.as_str(), before.acquired_at),
            "{what}: a dropped renewal must not change fence, owner or acquired_at"
        );
    }
    let holder = if token_holds { token } else { other };
    release(setup, &key, &holder)
        .await
        .unwrap_or_else(|e| panic!("{what}: the holder releases: {e}"));
}

/// Contract item 10 (cancel safety), through the manager. An acquire dropped at
/// any point — before the backend acted, after it granted the lease but before
/// the answer arrived (answers are delayed by a latency budget), or after it
/// returned — leaves no lease behind once the manager settled: the manager
/// releases what an abandoned acquire may have been granted.
pub async fn cancelled_acquire_leaves_no_lock(setup: &Setup) {
    let delay = Duration::from_millis(20).max(setup.latency_budget());
    let delayed = Arc::new(DelayedBackend::new(setup.backend.clone(), delay));
    let call_timeout = Duration::from_secs(10).max((setup.latency_budget() + delay) * 4);
    let manager = distrlock_core::LockManager::builder(delayed)
        .ttl(setup.long_ttl())
        .call_timeout(call_timeout)
        .build()
        .unwrap();
    let points = [
        Duration::ZERO,
        delay / 4,
        delay / 2,
        delay,
        delay * 3 / 2,
        delay * 2,
        delay * 3,
    ];
    let keys: Vec<LockKey> = (0..points.len())
        .map(|i| setup.key(&format!("cancelled-{i}")))
        .collect();
    join_all(points.iter().zip(&keys).map(|(after, key)| {
        let lock = manager.lock(key.as_str()).unwrap();
        async move {
            // Whether the acquire was still in flight or had finished does not
            // matter: either way nothing may stay behind.
            if let Ok(Ok(guard)) = tokio::time::timeout(*after, lock.acquire()).await {
                drop(guard);
            }
        }
    }))
    .await;
    tokio::time::timeout(call_timeout * 3 + delay * 4, manager.settle())
        .await
        .expect("the manager's cleanup of dropped acquires ends within its call timeouts");
    for (after, key) in points.iter().zip(&keys) {
        let info = inspect(setup, key).await.value;
        assert!(
            !info.as_ref().is_some_and(LockInfo::is_live),
            "an acquire dropped after {after:?} left a live lease behind: {info:?}"
        );
        acquire(setup, key, &Token::new(), setup.long_ttl()).await;
    }
}

/// Contract item 10 (cancel safety), through the manager. Dropping a guard frees
/// the lock without waiting for its ttl: once the manager settled, the row is not
/// live and another token acquires at once.
pub async fn dropped_guard_frees_lock(setup: &Setup) {
    let manager = setup.manager(setup.long_ttl());
    let key = setup.key("dropped");
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    drop(guard);
    tokio::time::timeout(setup.case_timeout() / 4, manager.settle())
        .await
        .expect("the background release of a dropped guard ends");
    let info = row(setup, &key).await;
    assert!(
        !info.is_live(),
        "a dropped guard must free the lock long before its ttl: {info:?}"
    );
    acquire(setup, &key, &Token::new(), setup.long_ttl()).await;
}

// ---------------------------------------------------------------------------
// 11. Liveness.

/// Contract item 11 (liveness). After expiry the row shows `expired`, another
/// token takes the lock with a greater fence, and the old token can neither
/// extend nor release, nor take it back while the new lease lives.
pub async fn expiry_hands_over(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let key = setup.key("expiry");
    let old = Token::new();
    let first = acquire(setup, &key, &old, short).await;
    sleep_past_expiry(setup, first.answered, short).await;
    let info = row(setup, &key).await;
    assert_eq!(
        info.state,
        LockState::Expired,
        "a lease past its ttl shows `expired`"
    );
    let new = Token::new();
    let f2 = acquire(setup, &key, &new, long).await.value.fence;
    assert!(
        f2 > first.value.fence,
        "a takeover must raise the fence: {} then {f2}",
        first.value.fence
    );
    assert!(
        is_not_held(&release(setup, &key, &old).await),
        "the old token's release after a takeover gets NotHeld"
    );
    assert!(
        is_not_held(&extend(setup, &key, &old, long).await.value),
        "the old token's extend after a takeover gets NotHeld"
    );
    // The old holder's same-token acquire is a takeover attempt now: refused.
    assert!(
        is_held(&try_acquire(setup, &key, &old, long).await.value),
        "the old token cannot take the key back while the new lease lives"
    );
    release(setup, &key, &new)
        .await
        .expect("the new holder releases");
}

/// Contract item 11 (liveness), through the manager. A timed wait gives up near
/// its deadline, and takes the lock soon after it is released mid-wait.
pub async fn wait_with_timeout(setup: &Setup) {
    let budget = setup.latency_budget();
    let manager = setup.manager(setup.long_ttl());
    let key = setup.key("wait");
    let holder = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let waiter = manager.lock(key.as_str()).unwrap();

    let timeout = Duration::from_millis(400).max(budget * 4);
    let started = Instant::now();
    match waiter.acquire_timeout(timeout).await {
        Err(Error::Timeout { waited, .. }) => {
            let elapsed = started.elapsed();
            assert!(elapsed >= timeout, "gave up early, after {elapsed:?}");
            // One try may be in flight at the deadline, and the backoff is 50 ms.
            let late = Duration::from_millis(750) + budget * 2;
            assert!(
                elapsed < timeout + late,
                "gave up late, after {elapsed:?} (more than {late:?} past the {timeout:?} \
                 deadline)"
            );
            assert!(waited >= timeout);
        }
        other => panic!("waiting on a held lock must time out, got {other:?}"),
    }

    let release_after = Duration::from_millis(300).max(budget * 2);
    let spawned = Instant::now();
    let releaser = tokio::spawn(async move {
        tokio::time::sleep(release_after).await;
        holder.release().await.expect("release");
        Instant::now()
    });
    let guard = waiter
        .acquire_timeout(Duration::from_secs(10).max(budget * 20))
        .await
        .expect("a release mid-wait lets the waiter in");
    let acquired = Instant::now();
    let released = releaser.await.unwrap();
    assert!(
        acquired >= spawned + release_after,
        "acquired {:?} after the release was scheduled, before it",
        acquired - spawned
    );
    let notice = Duration::from_secs(2) + budget * 4;
    assert!(
        acquired.saturating_duration_since(released) < notice,
        "took {:?} after the release to take the lock",
        acquired.saturating_duration_since(released)
    );
    guard.release().await.unwrap();
}

/// Contract item 11 (liveness), through the manager. With release notifications,
/// a waiter with a 60 s poll interval takes the lock promptly after a release.
/// Needs `release_notifications`.
pub async fn release_wakes_waiter(setup: &Setup) {
    let budget = setup.latency_budget();
    assert!(
        setup.backend.release_notifier().is_some(),
        "the harness declares `release_notifications`, but the backend's release_notifier() \
         is None"
    );
    let manager = setup
        .manager_builder(setup.long_ttl())
        .retry_policy(
            distrlock_core::RetryPolicy::default()
                .with_initial_delay(Duration::from_secs(60))
                .with_max_delay(Duration::from_secs(60)),
        )
        .build()
        .unwrap();
    let key = setup.key("notify");
    let holder = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let waiter = manager.lock(key.as_str()).unwrap();
    let bound = Duration::from_secs(2).max(budget * 6);
    let waiting = tokio::spawn(async move {
        let guard = waiter.acquire_timeout(bound * 2).await?;
        let woke = Instant::now();
        guard.release().await?;
        Ok::<_, Error>(woke)
    });
    // Let the waiter make its first try and go to sleep (if it has not, it
    // simply finds the lock free).
    tokio::time::sleep(Duration::from_millis(300).max(budget * 3)).await;
    let released = Instant::now();
    holder.release().await.unwrap();
    let woke = waiting.await.unwrap().unwrap_or_else(|error| {
        panic!(
            "a waiter with a 60 s poll interval did not take the lock within {bound:?} of its \
             release: no release notification woke it ({error})"
        )
    });
    let handoff = woke - released;
    assert!(
        handoff < bound,
        "handoff took {handoff:?} despite a notification (bound {bound:?})"
    );
}

// ---------------------------------------------------------------------------
// 12. A conservative client view.

/// Contract item 12 (conservative client view), through the manager. The backend
/// refuses every other token right up to the guard's local deadline: the
/// server's expiry (on its own clock, from when it ran the statement) is never
/// earlier than the client's conservative deadline.
pub async fn held_until_local_deadline(setup: &Setup) {
    let lease = Duration::from_millis(1500).max(setup.latency_budget() * 20);
    let margin = lease / 10;
    let manager = setup
        .manager_builder(lease)
        .auto_extend(false)
        .safety_margin(margin)
        .build()
        .unwrap();
    let key = setup.key("deadline");
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let deadline = guard.deadline();
    // The request that granted the lease was sent at `deadline − (lease − margin)`.
    let sent = deadline - (lease - margin);
    tokio::time::sleep_until(deadline - Duration::from_millis(50).min(margin / 4)).await;
    let probe = try_acquire(setup, &key, &Token::new(), setup.long_ttl()).await;
    if !is_held(&probe.value) {
        if surely_live(setup, sent, lease, probe.answered) {
            panic!("the backend let another token in before the holder's local deadline");
        }
        inconclusive(
            setup,
            "held until the local deadline",
            format!(
                "the probe answered {:?} after the deadline",
                probe.answered - deadline
            ),
        );
    }
    drop(guard);
}

/// Contract item 12 (conservative client view), through the manager. A guard
/// kept alive by its heartbeats (the manager's `extend_many` batches) for three
/// ttls is really renewed on the backend: while the guard says it holds the
/// lock, another token is refused and `inspect` shows it held. A backend whose
/// batch answers Ok without renewing, or that fails or panics on the heartbeat
/// path, fails here.
pub async fn heartbeats_keep_the_lease(setup: &Setup) {
    let lease = setup.short_ttl();
    let margin = lease / 10;
    let manager = setup
        .manager_builder(lease)
        .safety_margin(margin)
        .build()
        .unwrap();
    let key = setup.key("heartbeats");
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let end = Instant::now() + lease * 3;
    while Instant::now() < end {
        tokio::time::sleep(lease / 4).await;
        assert!(
            !guard.is_lost(),
            "the guard lost the lock while the backend was reachable: its heartbeats \
             (extend_many) did not renew the lease"
        );
        // The last renewal's request was sent at `deadline − (lease − margin)`.
        let sent = guard.deadline() - (lease - margin);
        let probe = try_acquire(setup, &key, &Token::new(), setup.long_ttl()).await;
        if !is_held(&probe.value) {
            if surely_live(setup, sent, lease, probe.answered) {
                panic!(
                    "the backend gave the key to another token while the guard held it, {:?} \
                     after the guard's last renewal was sent: the heartbeat's extend_many \
                     answered without renewing the lease",
                    probe.answered - sent
                );
            }
            inconclusive(
                setup,
                "heartbeats keep the lease",
                format!(
                    "the probe answered {:?} after the renewal",
                    probe.answered - sent
                ),
            );
        }
        let seen = inspect(setup, &key).await;
        let state = seen.value.as_ref().map(|i| i.state);
        if state != Some(LockState::Held) && surely_live(setup, sent, lease, seen.answered) {
            panic!("inspect shows {state:?} while the guard holds the lock");
        }
    }
    guard
        .release()
        .await
        .expect("a guard kept alive by heartbeats releases");
}

/// Contract item 12 (conservative client view), through the manager. When the
/// lease runs out under `do_exclusively` (heartbeats off), the work is stopped
/// (its future dropped) by the local deadline, and the call returns `LockLost`.
pub async fn lost_lock_stops_do_exclusively(setup: &Setup) {
    let short = setup.short_ttl();
    let manager = setup
        .manager_builder(short)
        .auto_extend(false)
        .build()
        .unwrap();
    let key = setup.key("lost");
    let dropped = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    struct SetOnDrop(Arc<AtomicBool>);
    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let started = Instant::now();
    let result = manager
        .do_exclusively(key.as_str(), {
            let (dropped, finished) = (dropped.clone(), finished.clone());
            |_lease| async move {
                let _flag = SetOnDrop(dropped);
                tokio::time::sleep(short * 10).await;
                finished.store(true, Ordering::SeqCst);
            }
        })
        .await;
    assert!(
        matches!(
            result,
            Err(distrlock_core::ExclusiveError::Lock(Error::LockLost { .. }))
        ),
        "got {result:?}"
    );
    assert!(
        dropped.load(Ordering::SeqCst),
        "the work's future must be dropped"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the work must not run to completion"
    );
    let bound = short + Duration::from_millis(500) + setup.latency_budget() * 2;
    assert!(
        started.elapsed() <= bound,
        "stopped late: {:?} (bound {bound:?})",
        started.elapsed()
    );
}

/// Contract item 12 (conservative client view), through the manager. With the
/// backend unreachable, a guard reports the lock lost by its local deadline, not
/// before. Needs `unreachable`.
pub async fn unreachable_backend_loses_lock_by_deadline(setup: &Setup) {
    let manager = setup.manager(setup.short_ttl());
    let key = setup.key("unreachable");
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    setup.make_unreachable().await;
    let deadline = guard.deadline();
    let late = Duration::from_millis(300).max(setup.latency_budget() * 2);
    tokio::time::timeout_at(deadline + late, guard.lost())
        .await
        .expect("the guard must report the lock lost by its local deadline");
    assert!(
        Instant::now() >= deadline - Duration::from_millis(5),
        "lost reported before the deadline"
    );
    assert!(guard.is_lost());
    assert_eq!(guard.time_left(), Duration::ZERO);
    setup.restore().await;
    drop(guard);
}

// ---------------------------------------------------------------------------
// 13. Faithful inspection.

/// Contract item 13 (faithful inspection). `inspect` and `list` show the holder:
/// owner, fence, state and remaining lease; no row before the first acquire;
/// then the released and expired states, with the row kept.
pub async fn inspect_and_list_show_holder(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let manager = setup
        .manager_builder(long)
        .owner("host-a:42")
        .build()
        .unwrap();
    let key = setup.key("inspect");
    assert!(
        inspect(setup, &key).await.value.is_none(),
        "no row before the first acquire"
    );
    let sent = Instant::now();
    let guard = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let seen = inspect(setup, &key).await;
    let info = seen.value.clone().expect("row");
    assert_eq!(info.owner, "host-a:42", "inspect shows the owner text");
    assert_eq!(
        info.fence,
        guard.fence(),
        "inspect shows the holding's fence"
    );
    assert_eq!(info.state, LockState::Held, "inspect shows the lock held");
    assert!(info.is_live());
    let remaining = info
        .remaining
        .expect("a held lock reports its remaining lease");
    let least = long
        .saturating_sub(rate_up(seen.answered - sent))
        .saturating_sub(setup.tolerance(long));
    assert!(
        remaining <= long + setup.tolerance(long) && remaining >= least,
        "remaining {remaining:?} of a {long:?} lease granted at most {:?} before",
        seen.answered - sent
    );
    let expires = info.expires_at.expect("a held lock has an expiry");
    assert!(expires > info.acquired_at, "expiry after acquisition");

    let other = setup.key("inspect-other");
    let token = Token::new();
    let expiring = acquire(setup, &other, &token, short).await;
    let keys: Vec<_> = listed(setup).await.into_iter().map(|i| i.key).collect();
    assert!(
        keys.contains(&key) && keys.contains(&other),
        "list shows both: {keys:?}"
    );
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "list is ordered by key");

    guard.release().await.unwrap();
    let info = row(setup, &key).await;
    assert_eq!(
        info.state,
        LockState::Released,
        "a released row shows `released`"
    );
    assert_eq!(
        info.remaining, None,
        "a released row has no remaining lease"
    );
    assert_eq!(info.expires_at, None, "a released row has no expiry");
    sleep_past_expiry(setup, expiring.answered, short).await;
    let info = row(setup, &other).await;
    assert_eq!(
        info.state,
        LockState::Expired,
        "an expired row shows `expired`"
    );
    assert_eq!(
        info.remaining, None,
        "an expired row has no remaining lease"
    );
}

/// Contract item 13 (faithful inspection). `inspect` reports the latest holding,
/// not a stale one: after a release, after an expiry, and for the same token
/// coming back, the owner is the new holder's, `acquired_at` is the new grant's
/// clock reading, `expires_at` its reading plus its ttl, and the fence the new
/// one.
pub async fn inspect_reports_the_latest_holding(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let key = setup.key("latest");
    // Far enough apart that a stale acquired_at cannot pass for a fresh one.
    let apart = Duration::from_millis(50).max(TIME_TOLERANCE * 10);
    async fn check(
        setup: &Setup,
        what: &str,
        key: &LockKey,
        grant: &Timed<Grant>,
        owner: &str,
        d: Duration,
    ) {
        let seen = inspect(setup, key).await;
        let info = seen.value.clone().expect("row");
        assert_eq!(
            info.owner, owner,
            "{what}: inspect must show the latest holder's owner"
        );
        assert_eq!(
            info.fence, grant.value.fence,
            "{what}: inspect must show the latest fence"
        );
        assert_time(
            &format!("{what}: acquired_at must be the latest grant's clock reading"),
            info.acquired_at,
            grant.value.reading,
            TIME_TOLERANCE,
        );
        check_lease(setup, what, &info, grant.value.reading, d, grant, &seen);
    }
    let (a, b, c) = (Token::new(), Token::new(), Token::new());
    let first = acquire_as(setup, &key, &a, long, "owner-a").await;
    check(setup, "the first holding", &key, &first, "owner-a", long).await;
    release(setup, &key, &a).await.unwrap();
    tokio::time::sleep(apart).await;
    let second = acquire_as(setup, &key, &b, short, "owner-b").await;
    check(
        setup,
        "a holding after a release",
        &key,
        &second,
        "owner-b",
        short,
    )
    .await;
    sleep_past_expiry(setup, second.answered, short).await;
    let third = acquire_as(setup, &key, &c, long, "owner-c").await;
    check(
        setup,
        "a holding after an expiry",
        &key,
        &third,
        "owner-c",
        long,
    )
    .await;
    release(setup, &key, &c).await.unwrap();
    tokio::time::sleep(apart).await;
    let fourth = acquire_as(setup, &key, &a, long, "owner-a-again").await;
    check(
        setup,
        "the first token's new holding",
        &key,
        &fourth,
        "owner-a-again",
        long,
    )
    .await;
    release(setup, &key, &a).await.unwrap();
}

/// Contract item 13 (faithful inspection). `list` returns every row — held,
/// released and expired alike — ordered by key byte for byte (`LockKey`'s order:
/// `"B"` before `"a"`, case-sensitive), each as `inspect` reports it.
pub async fn list_shows_every_row_in_key_order(setup: &Setup) {
    let (short, long) = (setup.short_ttl(), setup.long_ttl());
    let names = [
        "B", "a", "C", "b", "A", "c", "a b", "a-b", "ab", "é", "Z", "z", "_", "aB",
    ];
    let mut expiring = Vec::new();
    let mut expected = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let key = setup.key(name);
        let token = Token::new();
        let state = match i % 3 {
            0 => {
                acquire_as(setup, &key, &token, long, &format!("owner-{i}")).await;
                LockState::Held
            }
            1 => {
                acquire_as(setup, &key, &token, long, &format!("owner-{i}")).await;
                release(setup, &key, &token).await.unwrap();
                LockState::Released
            }
            _ => {
                let grant = acquire_as(setup, &key, &token, short, &format!("owner-{i}")).await;
                expiring.push(grant.answered);
                LockState::Expired
            }
        };
        expected.push((key, state));
    }
    if let Some(last) = expiring.iter().max() {
        sleep_past_expiry(setup, *last, short).await;
    }
    let listed = listed(setup).await;
    let keys: Vec<&LockKey> = listed.iter().map(|i| &i.key).collect();
    let mut want: Vec<&LockKey> = expected.iter().map(|(k, _)| k).collect();
    want.sort();
    assert_eq!(
        keys, want,
        "list must return every row (released and expired ones too), ordered by key byte for \
         byte"
    );
    for (key, state) in &expected {
        let entry = listed.iter().find(|i| &i.key == key).expect("listed");
        assert_eq!(entry.state, *state, "list's state of {key}");
        let info = row(setup, key).await;
        assert_eq!(
            fixed(entry),
            fixed(&info),
            "list and inspect must report the same row for {key}"
        );
    }
}

// ---------------------------------------------------------------------------
// 14. Fair order.

/// A waiter's direct try, at `place`, failing the case on an error.
async fn try_as_waiter(
    setup: &Setup,
    key: &LockKey,
    token: &Token,
    place: Place,
) -> Timed<WaiterAnswer> {
    let call = setup.backend.try_acquire_as_waiter(
        key,
        token,
        ttl(setup.long_ttl()),
        OWNER,
        place,
        soon(setup),
    );
    let answer = timed(bounded(setup, "try_acquire_as_waiter", call)).await;
    match answer.value {
        Ok(value) => Timed {
            value,
            sent: answer.sent,
            answered: answer.answered,
        },
        Err(error) => panic!("try_acquire_as_waiter of {key} must not fail: {error}"),
    }
}

/// The ticket a refusal handed out, failing the case if it was a grant or
/// came without one.
fn refused_ticket(answer: &WaiterAnswer, who: &str) -> Ticket {
    assert!(
        is_held(&answer.outcome),
        "{who}: a waiter's try on a held key must be refused, got {:?}",
        answer.outcome
    );
    answer.ticket.unwrap_or_else(|| {
        panic!(
            "{who}: a backend that keeps a line must hand a refused waiter a ticket (contract \
             item 14); got none"
        )
    })
}

/// A fair waiter's place with `ticket`.
fn in_line(ticket: Ticket) -> Place {
    Place {
        ticket: Some(ticket.number),
        fair: true,
    }
}

/// Contract item 14 (fair order). Refused waiters get tickets in the order
/// they asked; once the key is released, only the first ticket may take it —
/// not a newcomer, not the holder that released and asks again, not a later
/// ticket — and each release then serves the next ticket, the released
/// holder's new ticket last. Needs `fair_order`.
pub async fn waiters_are_served_in_order(setup: &Setup) {
    let key = setup.key("line");
    let long = setup.long_ttl();
    let holder = Token::new();
    assert!(!is_held(
        &try_acquire(setup, &key, &holder, long).await.value
    ));
    let waiters: Vec<Token> = (0..3).map(|_| Token::new()).collect();
    let mut tickets = Vec::new();
    for (i, waiter) in waiters.iter().enumerate() {
        let answer = try_as_waiter(setup, &key, waiter, Place::first()).await;
        let first = refused_ticket(&answer.value, &format!("waiter {i}"));
        // Asking again with the ticket keeps it (and says how far back it
        // is, which a backend may not know when it hands a ticket out).
        let again = try_as_waiter(setup, &key, waiter, in_line(first)).await;
        let ticket = refused_ticket(&again.value, &format!("waiter {i} again"));
        assert_eq!(
            ticket.number, first.number,
            "waiter {i} asked again with its ticket and must keep it"
        );
        if let Some(previous) = tickets.last() {
            let previous: &Ticket = previous;
            assert!(
                ticket.number > previous.number && ticket.ahead > previous.ahead,
                "waiter {i} asked after waiter {}, so its ticket must come later: {ticket:?} \
                 after {previous:?}",
                i - 1
            );
        }
        tickets.push(ticket);
    }
    // The refusals changed no lease (contract item 12).
    let info = row(setup, &key).await;
    assert_eq!(
        info.state,
        LockState::Held,
        "the waiters' tickets ended the lease"
    );

    let released_at = Instant::now();
    release(setup, &key, &holder)
        .await
        .expect("the holder releases");
    let turn = distrlock_core::line::TURN;
    // Within the first turn, only ticket 0 may take the free key.
    let newcomer = try_acquire(setup, &key, &Token::new(), long).await;
    let returning = try_as_waiter(setup, &key, &holder, Place::first()).await;
    let later = try_as_waiter(setup, &key, &waiters[1], in_line(tickets[1])).await;
    if later.answered - released_at < turn {
        assert!(
            is_held(&newcomer.value),
            "a newcomer took the key in the first waiter's turn (contract item 14)"
        );
        let back = refused_ticket(&returning.value, "the holder asking again");
        assert!(
            back.number > tickets[2].number,
            "the holder that released and asks again must get in line behind the waiters: \
             ticket {back:?} after {:?}",
            tickets[2]
        );
        assert!(
            is_held(&later.value.outcome),
            "the second ticket took the key in the first one's turn (contract item 14)"
        );
    } else {
        inconclusive(
            setup,
            "waiters_are_served_in_order",
            format!(
                "three tries took {:?} after the release, longer than a turn ({turn:?})",
                later.answered - released_at
            ),
        );
    }
    let returning_ticket = returning.value.ticket.expect("checked above");
    // Each release serves the next ticket.
    let order = [
        (&waiters[0], tickets[0]),
        (&waiters[1], tickets[1]),
        (&waiters[2], tickets[2]),
        (&holder, returning_ticket),
    ];
    for (i, (token, ticket)) in order.iter().enumerate() {
        let answer = try_as_waiter(setup, &key, token, in_line(*ticket)).await;
        assert!(
            !is_held(&answer.value.outcome),
            "in turn {i}, ticket {ticket:?} was refused the key it was served: {:?} (contract \
             item 14)",
            answer.value.outcome
        );
        if let Some((next, next_ticket)) = order.get(i + 1) {
            let early = try_as_waiter(setup, &key, next, in_line(*next_ticket)).await;
            let kept = refused_ticket(&early.value, &format!("ticket {next_ticket:?} early"));
            assert_eq!(kept.number, next_ticket.number, "a held key keeps the line");
        }
        release(setup, &key, token).await.expect("release in turn");
    }
    // The line is empty: anyone may take the key.
    let last = try_acquire(setup, &key, &Token::new(), long).await;
    assert!(
        !is_held(&last.value),
        "with every ticket served, the key must be free for anyone"
    );
}

/// Contract item 14 (fair order). A waiter that took a ticket and never came
/// back holds the line up for one turn only: the next ticket takes the key in
/// the second turn after the release, and not before it. Needs `fair_order`.
pub async fn a_gone_waiter_holds_the_line_one_turn(setup: &Setup) {
    let key = setup.key("gone");
    let long = setup.long_ttl();
    let turn = distrlock_core::line::TURN;
    let holder = Token::new();
    assert!(!is_held(
        &try_acquire(setup, &key, &holder, long).await.value
    ));
    let gone = try_as_waiter(setup, &key, &Token::new(), Place::first()).await;
    refused_ticket(&gone.value, "the waiter that goes away");
    let next = Token::new();
    let answer = try_as_waiter(setup, &key, &next, Place::first()).await;
    let ticket = refused_ticket(&answer.value, "the next waiter");
    let released = timed(release(setup, &key, &holder)).await;
    released.value.expect("the holder releases");
    // In the gone waiter's turn: refused.
    let early = try_as_waiter(setup, &key, &next, in_line(ticket)).await;
    if early.answered - released.sent < turn {
        refused_ticket(&early.value, "the next waiter in the gone one's turn");
    }
    // After it: granted, well before a lease would have run out.
    tokio::time::sleep_until(released.answered + turn + setup.tolerance(turn)).await;
    let granted = try_as_waiter(setup, &key, &next, in_line(ticket)).await;
    assert!(
        !is_held(&granted.value.outcome),
        "the next waiter was still refused {:?} after the release: a gone waiter must hold the \
         line up for one turn ({turn:?}) only (contract item 14): {:?}",
        granted.answered - released.sent,
        granted.value.outcome
    );
    release(setup, &key, &next).await.expect("release");
}

/// Contract item 14 (fair order), through the manager. Three waiting acquires
/// that start one after another, and then the holder asking again right after
/// its release, get the key in that order; the holder's plain try right after
/// its release is refused. Needs `fair_order`.
pub async fn waiting_acquires_are_served_in_order(setup: &Setup) {
    let budget = setup.latency_budget();
    let manager = setup.manager(setup.long_ttl());
    let key = setup.key("fifo");
    let holder = manager
        .lock(key.as_str())
        .unwrap()
        .try_acquire()
        .await
        .unwrap();
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hold = Duration::from_millis(20);
    let wait_for = Duration::from_secs(20).max(budget * 40);
    let spawn_waiter = |name: &'static str| {
        let lock = manager.lock(key.as_str()).unwrap();
        let order = order.clone();
        tokio::spawn(async move {
            let guard = lock.acquire_timeout(wait_for).await?;
            order.lock().unwrap().push(name);
            tokio::time::sleep(hold).await;
            guard.release().await
        })
    };
    // Far enough apart that each has been refused (and taken its ticket)
    // before the next starts.
    let spacing = Duration::from_millis(100).max(budget * 3);
    let mut waiting = Vec::new();
    for name in ["first", "second", "third"] {
        waiting.push(spawn_waiter(name));
        tokio::time::sleep(spacing).await;
    }
    holder.release().await.unwrap();
    // Right after its release, the holder's plain try must be refused: the
    // key is the first waiter's turn. (Without a line it is free and usually
    // taken, since the woken waiters have most often not asked yet.)
    let again = manager.lock(key.as_str()).unwrap().try_acquire().await;
    assert!(
        matches!(again, Err(Error::HeldByOther { .. })),
        "a holder that releases and at once tries again must be refused while waiters are in \
         line (contract item 14), got {}",
        match &again {
            Ok(guard) => format!("a grant (fence {:?})", guard.fence()),
            Err(error) => format!("{error}"),
        }
    );
    waiting.push(spawn_waiter("holder again"));
    for task in waiting {
        task.await
            .unwrap()
            .expect("every waiter gets the key in time");
    }
    let order = order.lock().unwrap().clone();
    assert_eq!(
        order,
        ["first", "second", "third", "holder again"],
        "waiters must be served in the order they started waiting, and a holder that releases \
         and asks again gets in line behind them (contract item 14)"
    );
}
