//! `distrlock acquire`, `extend` and `release`: a lock held across several shell
//! steps, identified by its token.
//!
//! `acquire` takes the lock through core's [`Lock`](distrlock_core::Lock) like
//! `run` does (the same waiting, retries with one token, and cleanup of tries
//! given up on), then [detaches](distrlock_core::LockGuard::detach) the guard:
//! the lease stays held when distrlock exits, and nothing extends it. `extend`
//! and `release` call the backend once with the token they are given, bounded
//! by [`CALL_TIMEOUT`] both locally and as the call's `not_after`, so a call
//! distrlock stopped waiting for cannot take effect later.

use std::time::SystemTime;

use distrlock_core::{Error, LockManager, Owner, Ttl};
use serde_json::json;
use tokio::time::Instant;

use crate::child::{Signals, signal_exit_code};
use crate::cli::{AcquireArgs, ExtendArgs, ReleaseArgs, Wait};
use crate::exit::{CliError, show_key};
use crate::open::{CALL_TIMEOUT, Db, settle};
use crate::output::{rfc3339, short_duration};
use crate::owner::default_owner;
use crate::progress::Progress;

pub(crate) async fn acquire(db: Db, args: AcquireArgs, quiet: bool) -> Result<u8, CliError> {
    // The process that holds the lock, as far as anyone can tell, is the shell
    // that called us: distrlock itself exits at once.
    let owner = args
        .owner
        .clone()
        .unwrap_or_else(|| default_owner(nix::unistd::getppid().as_raw() as u32, "(shell)"));
    Ttl::new(args.ttl).map_err(|e| db.error(e))?;
    check_owner(&owner)?;
    // No heartbeat: the guard is detached as soon as it exists.
    let manager = db.manager(args.ttl, owner, false)?;
    let result = acquire_and_detach(&db, &manager, &args, quiet).await;
    // Whatever a try given up on was granted is released before we exit.
    settle(&manager).await;
    result
}

async fn acquire_and_detach(
    db: &Db,
    manager: &LockManager,
    args: &AcquireArgs,
    quiet: bool,
) -> Result<u8, CliError> {
    let mut signals = Signals::catch()?;
    let lock = manager.lock(args.key.as_str()).map_err(|e| db.error(e))?;
    let progress = Progress::start(db.backend.clone(), args.key.clone(), quiet);
    let mut acquire = Box::pin(async {
        match args.wait {
            None => lock.try_acquire().await,
            Some(Wait::For(wait)) => lock.acquire_timeout(wait).await,
            Some(Wait::Forever) => lock.acquire().await,
        }
    });
    let acquired = tokio::select! {
        acquired = &mut acquire => acquired,
        signal = signals.recv() => {
            // Dropping the acquire hands any try in flight to core's cleanup,
            // which `acquire` waits for before exiting.
            drop(acquire);
            progress.stop();
            return Ok(signal_exit_code(signal));
        }
    };
    progress.stop();
    let (remaining, waited) = match acquired {
        Ok(guard) => {
            let lease = guard.detach();
            print_lease(
                lease.key().as_str(),
                &lease.token().to_string(),
                lease.fence().get(),
                Some(manager.owner()),
                lease.ttl(),
                lease.expires_at(),
            );
            return Ok(0);
        }
        Err(Error::HeldByOther { remaining, .. }) => (remaining, None),
        Err(Error::Timeout { waited, .. }) => (None, Some(waited)),
        Err(error) => return Err(db.error(error)),
    };
    if !quiet {
        let (holder, waited) = match waited {
            None => (
                crate::progress::holder(db, &args.key, remaining).await,
                " (use --wait to wait for it)".to_owned(),
            ),
            Some(waited) => (
                "another owner".to_owned(),
                format!(" after waiting {}", short_duration(waited)),
            ),
        };
        say!(
            "distrlock: lock {} is held by {holder}{waited}",
            show_key(&args.key)
        );
    }
    Ok(args.conflict_exit_code)
}

/// Prints the JSON line for a lease: `expires_at` is its end on the database's
/// clock.
fn print_lease(
    key: &str,
    token: &str,
    fence: i64,
    owner: Option<&str>,
    ttl: Ttl,
    expires_at: SystemTime,
) {
    let line = json!({
        "key": key,
        "token": token,
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
}

pub(crate) async fn extend(db: Db, args: ExtendArgs) -> Result<u8, CliError> {
    let ttl = Ttl::new(args.ttl).map_err(|e| db.error(e))?;
    let not_after = Instant::now() + CALL_TIMEOUT;
    let call = db.backend.extend(&args.key, &args.token, ttl, not_after);
    let renewed_at = match bounded(not_after, "extend", call).await {
        Ok(renewed_at) => renewed_at,
        Err(Error::NotHeld { key }) => return Err(CliError::not_held(&key)),
        Err(error) => return Err(db.error(error)),
    };
    // The backend's extend does not return the fence or the owner: one read for
    // them. If the row is no longer this live holding (it ran out or was
    // released since), the owner is left out.
    let info = db
        .backend
        .inspect(&args.key)
        .await
        .map_err(|e| db.error(e))?;
    let fence = info.as_ref().map_or(0, |i| i.fence.get());
    let owner = info
        .as_ref()
        .filter(|i| i.is_live())
        .map(|i| i.owner.as_str());
    // The lease now ends `ttl` after the renewal's reading of the database's
    // clock (contract item 9 of `LockBackend`).
    let expires_at = renewed_at.checked_add(ttl.get()).unwrap_or(renewed_at);
    print_lease(
        args.key.as_str(),
        &args.token.to_string(),
        fence,
        owner,
        ttl,
        expires_at,
    );
    Ok(0)
}

pub(crate) async fn release(db: Db, args: ReleaseArgs) -> Result<u8, CliError> {
    let not_after = Instant::now() + CALL_TIMEOUT;
    let call = db.backend.release(&args.key, &args.token, not_after);
    match bounded(not_after, "release", call).await {
        Ok(()) => Ok(0),
        Err(Error::NotHeld { key }) => Err(CliError::not_held(&key)),
        Err(error) => Err(db.error(error)),
    }
}

/// Waits for `call` until `not_after`, the bound the call itself carries (past
/// it the backend lets the call take no effect, contract item 8); no answer by
/// then is reported as an unreachable database.
async fn bounded<T>(
    not_after: Instant,
    what: &str,
    call: impl Future<Output = distrlock_core::Result<T>>,
) -> distrlock_core::Result<T> {
    match tokio::time::timeout_at(not_after, call).await {
        Ok(result) => result,
        Err(_) => Err(Error::unavailable(
            format!(
                "the {what} did not answer within {}",
                short_duration(CALL_TIMEOUT)
            ),
            None,
        )),
    }
}

fn check_owner(owner: &str) -> Result<(), CliError> {
    match Owner::new(owner) {
        Ok(_) => Ok(()),
        Err(Error::InvalidConfig { reason }) => Err(CliError::usage(format!("--owner: {reason}"))),
        Err(other) => Err(CliError::usage(format!("--owner: {other}"))),
    }
}
