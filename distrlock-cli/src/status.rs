//! `distrlock status`, `init` and `schema`.

use serde_json::json;

use crate::cli::StatusArgs;
use crate::exit::{CliError, show_key};
use crate::open::{Db, schema_sql};
use crate::output::{lock_json, lock_table};
use crate::url::DbUrl;

pub(crate) async fn status(db: Db, args: StatusArgs) -> Result<u8, CliError> {
    let locks = match &args.key {
        Some(key) => db
            .backend
            .inspect(key)
            .await
            .map_err(|e| db.error(e))?
            .into_iter()
            .collect(),
        None => db.backend.list().await.map_err(|e| db.error(e))?,
    };
    if args.json {
        let line = json!({
            "database": db.url.to_string(),
            "table": db.table.to_string(),
            "locks": locks.iter().map(lock_json).collect::<Vec<_>>(),
        });
        out!("{line}");
        return Ok(0);
    }
    out!("database: {}", db.url);
    out!("table:    {}", db.table);
    if locks.is_empty() {
        match &args.key {
            Some(key) => out!("no lock {} has been taken yet", show_key(key)),
            None => out!("no locks have been taken yet"),
        }
    } else {
        out!();
        out_raw!("{}", lock_table(&locks));
    }
    Ok(0)
}

pub(crate) async fn init(db: Db, quiet: bool) -> Result<u8, CliError> {
    let foreign = |error: distrlock_core::Error| match error {
        distrlock_core::Error::Backend { message, .. } => CliError::unavailable(format!(
            "the table {} in {} exists but is not a distrlock lock table ({message}); pick \
             another --table, or compare it with `distrlock schema`",
            db.table, db.url
        )),
        other => db.error(other),
    };
    // PostgreSQL finds a foreign table already here: its failover marker does
    // not fit.
    match db.backend.create_table().await {
        Err(error @ distrlock_core::Error::Backend { .. })
            if error.to_string().contains("is not a distrlock lock table") =>
        {
            return Err(foreign(error));
        }
        other => other.map_err(|e| db.error(e))?,
    }
    // CREATE TABLE IF NOT EXISTS leaves a table of that name alone, whatever
    // it holds: read a row the way every command does, to be sure it is ours.
    let probe = distrlock_core::LockKey::new("distrlock init check").map_err(|e| db.error(e))?;
    if let Err(error) = db.backend.inspect(&probe).await {
        return Err(foreign(error));
    }
    if !quiet {
        say!("distrlock: lock table {} is ready in {}", db.table, db.url);
    }
    Ok(0)
}

pub(crate) fn schema(url: &DbUrl, table: &distrlock_core::TableName) -> Result<u8, CliError> {
    out_raw!("{}", schema_sql(url, table)?);
    Ok(0)
}
