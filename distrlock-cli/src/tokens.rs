//! `distrlock acquire`, `extend` and `release`: a lock held across several shell
//! steps, identified by its token.
//!
//! `acquire` must leave the lock held when distrlock exits, so it does not go
//! through a `LockGuard` (which releases when dropped and extends in the
//! background). It calls the backend's `try_acquire` itself, waiting between
//! tries with the same `RetryPolicy` the guard-based path uses, and with one
//! token for all tries, so a retry after a lost answer is an idempotent
//! re-acquire rather than a second holding.

use std::time::Duration;

use distrlock_core::{AcquireOutcome, Error, LockKey, MAX_OWNER_LEN, RetryPolicy, Token, Ttl};
use serde_json::json;
use tokio::time::Instant;

use crate::child::{Signals, signal_exit_code};
use crate::cli::{AcquireArgs, ExtendArgs, ReleaseArgs, Wait};
use crate::exit::{CliError, show_key};
use crate::open::Db;
use crate::output::{rfc3339, short_duration};
use crate::owner::default_owner;
use crate::progress::Progress;

/// The longest any one backend call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn acquire(db: Db, args: AcquireArgs, quiet: bool) -> Result<u8, CliError> {
    let ttl = Ttl::new(args.ttl).map_err(|e| db.error(e))?;
    // The process that holds the lock, as far as anyone can tell, is the shell
    // that called us: distrlock itself exits at once.
    let owner = args
        .owner
        .clone()
        .unwrap_or_else(|| default_owner(nix::unistd::getppid().as_raw() as u32, "(shell)"));
    check_owner(&owner)?;
    let mut signals = Signals::catch()?;
    let token = Token::new();
    let progress = Progress::start(db.backend.clone(), args.key.clone(), quiet);
    let outcome = tokio::select! {
        outcome = wait_for(&db, &args.key, &token, ttl, &owner, args.wait) => outcome,
        signal = signals.recv() => {
            progress.stop();
            // A try may have been granted while we were interrupted: undo it.
            let _ = tokio::time::timeout(CALL_TIMEOUT, db.backend.release(&args.key, &token)).await;
            return Ok(signal_exit_code(signal));
        }
    };
    progress.stop();
    if !matches!(outcome, Ok(Ok(_))) {
        // A try cut short by its timeout, or failed transiently, may still have
        // been granted on the server: do not leave it to linger for a ttl.
        let _ = tokio::time::timeout(CALL_TIMEOUT, db.backend.release(&args.key, &token)).await;
    }
    let sent = match outcome.map_err(|e| db.error(e))? {
        Ok(sent) => sent,
        Err(Refused { waited, remaining }) => {
            if !quiet {
                let left = remaining
                    .map(|r| format!(" for another {}", short_duration(r)))
                    .unwrap_or_default();
                let waited = if args.wait.is_none() {
                    " (use --wait to wait for it)".to_owned()
                } else {
                    format!(" after waiting {}", short_duration(waited))
                };
                say!(
                    "distrlock: lock {} is held by another owner{left}{waited}",
                    show_key(&args.key)
                );
            }
            return Ok(args.conflict_exit_code);
        }
    };
    print_lease(&db, &args.key, &token, ttl, sent).await?;
    Ok(0)
}

/// Why a wait ended without the lock.
struct Refused {
    waited: Duration,
    remaining: Option<Duration>,
}

/// Tries until acquired or the wait is over. `Ok(Ok(fence_and_time))` when
/// acquired: the wall-clock time the successful request was sent.
async fn wait_for(
    db: &Db,
    key: &LockKey,
    token: &Token,
    ttl: Ttl,
    owner: &str,
    wait: Option<Wait>,
) -> Result<Result<(i64, std::time::SystemTime), Refused>, Error> {
    let started = Instant::now();
    let deadline = match wait {
        None => Some(started),
        Some(Wait::For(d)) => Some(started + d),
        Some(Wait::Forever) => None,
    };
    let policy = RetryPolicy::default();
    let mut tries: u32 = 0;
    loop {
        let sent = std::time::SystemTime::now();
        let call = db.backend.try_acquire(key, token, ttl, owner);
        let remaining = match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(AcquireOutcome::Acquired { fence })) => return Ok(Ok((fence.get(), sent))),
            Ok(Ok(AcquireOutcome::Held { remaining })) => remaining,
            Ok(Err(error))
                if error.is_transient() && deadline.is_none_or(|d| Instant::now() < d) =>
            {
                None
            }
            Ok(Err(error)) => return Err(error),
            Err(_) => None,
        };
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Ok(Err(Refused {
                waited: now - started,
                remaining,
            }));
        }
        let mut wake = now + policy.delay(tries, remaining);
        if let Some(deadline) = deadline {
            wake = wake.min(deadline);
        }
        tries = tries.saturating_add(1);
        tokio::time::sleep_until(wake).await;
    }
}

/// Prints the JSON line for a lease that `token` holds on `key`.
async fn print_lease(
    db: &Db,
    key: &LockKey,
    token: &Token,
    ttl: Ttl,
    (fence, sent): (i64, std::time::SystemTime),
) -> Result<(), CliError> {
    let info = db.backend.inspect(key).await.map_err(|e| db.error(e))?;
    // The database's own expiry if the row is still this holding; otherwise (it
    // cannot have changed unless the lease already ran out) the earliest it ends.
    let (owner, expires_at) = match info {
        Some(info) if info.fence.get() == fence && info.is_live() => (
            Some(info.owner),
            info.expires_at.unwrap_or(sent + ttl.get()),
        ),
        _ => (None, sent + ttl.get()),
    };
    let line = json!({
        "key": key.as_str(),
        "token": token.to_string(),
        "fence": fence,
        "owner": owner,
        "ttl_ms": ttl.get().as_millis(),
        "expires_at": rfc3339(expires_at),
        "expires_at_unix_ms": expires_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .ok(),
    });
    out!("{line}");
    Ok(())
}

pub(crate) async fn extend(db: Db, args: ExtendArgs) -> Result<u8, CliError> {
    let ttl = Ttl::new(args.ttl).map_err(|e| db.error(e))?;
    let sent = std::time::SystemTime::now();
    match db.backend.extend(&args.key, &args.token, ttl).await {
        Ok(()) => {
            let info = db
                .backend
                .inspect(&args.key)
                .await
                .map_err(|e| db.error(e))?;
            let fence = info.map_or(0, |i| i.fence.get());
            print_lease(&db, &args.key, &args.token, ttl, (fence, sent)).await?;
            Ok(0)
        }
        Err(Error::NotHeld { key }) => Err(CliError::not_held(&key)),
        Err(error) => Err(db.error(error)),
    }
}

pub(crate) async fn release(db: Db, args: ReleaseArgs) -> Result<u8, CliError> {
    match db.backend.release(&args.key, &args.token).await {
        Ok(()) => Ok(0),
        Err(Error::NotHeld { key }) => Err(CliError::not_held(&key)),
        Err(error) => Err(db.error(error)),
    }
}

fn check_owner(owner: &str) -> Result<(), CliError> {
    if owner.len() > MAX_OWNER_LEN || owner.contains('\0') {
        return Err(CliError::usage(format!(
            "--owner must be at most {MAX_OWNER_LEN} bytes without NUL"
        )));
    }
    Ok(())
}
