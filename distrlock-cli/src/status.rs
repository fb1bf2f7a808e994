//! `distrlock status`, `init` and `schema`.

use std::time::SystemTime;

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
        out_raw!("{}", lock_table(&locks, SystemTime::now()));
    }
    Ok(0)
}

pub(crate) async fn init(db: Db, quiet: bool) -> Result<u8, CliError> {
    db.backend.create_table().await.map_err(|e| db.error(e))?;
    if !quiet {
        say!("distrlock: lock table {} is ready in {}", db.table, db.url);
    }
    Ok(0)
}

pub(crate) fn schema(url: &DbUrl, table: &distrlock_core::TableName) -> Result<u8, CliError> {
    out_raw!("{}", schema_sql(url, table)?);
    Ok(0)
}
