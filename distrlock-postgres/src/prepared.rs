//! [`Prepared`]: the statements prepared on each pooled connection, found
//! without hashing their text.
//!
//! deadpool-postgres caches prepared statements per connection, keyed by the
//! statement's text, which it hashes (SipHash) on every lookup. The acquire
//! statement is about 20 KB of SQL, so that hash alone cost about half of the
//! client's instructions per acquire + release cycle. This cache is found by
//! the connection's pool id instead, and then by the address and length of
//! the statement's text: every text the backend sends is a field of its
//! [`Statements`](crate::sql::Statements), built once and never changed or
//! moved while the backend (and so this cache, which lives beside it) exists,
//! so an address names one text. A text of any other origin is compared in
//! full (a `memcmp`, still many times cheaper than the hash).
//!
//! A miss (a new connection, or one forgotten to keep the cache small) falls
//! back to deadpool's cache, so the statement is still prepared once per
//! connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deadpool_postgres::{Object, ObjectId};
use tokio_postgres::Statement;
use tokio_postgres::types::Type;

/// The statements prepared on each connection of one pool.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    by_connection: Mutex<HashMap<ObjectId, Vec<Entry>>>,
}

#[derive(Debug)]
struct Entry {
    /// The address of the caller's text when it was prepared.
    at: usize,
    sql: Arc<str>,
    types: Vec<Type>,
    statement: Statement,
}

/// How many connections' statements are kept before the oldest are
/// forgotten (a pool has at most a few dozen connections alive).
const KEEP: usize = 256;

impl Prepared {
    /// The statement `sql` with parameter `types`, prepared on `conn`.
    pub(crate) async fn get(
        &self,
        conn: &Object,
        sql: &str,
        types: &[Type],
    ) -> Result<Statement, tokio_postgres::Error> {
        let id = Object::id(conn);
        if let Some(found) = self.find(id, sql, types) {
            return Ok(found);
        }
        let statement = conn.prepare_typed_cached(sql, types).await?;
        self.keep(id, sql, types, statement.clone());
        Ok(statement)
    }

    fn find(&self, id: ObjectId, sql: &str, types: &[Type]) -> Option<Statement> {
        let map = self.by_connection.lock().unwrap_or_else(|e| e.into_inner());
        let entries = map.get(&id)?;
        let at = sql.as_ptr() as usize;
        let same_text = |e: &&Entry| {
            e.sql.len() == sql.len() && (e.at == at || *e.sql == *sql) && e.types == types
        };
        let found = entries.iter().find(same_text)?;
        debug_assert_eq!(*found.sql, *sql, "a statement text changed at its address");
        Some(found.statement.clone())
    }

    fn keep(&self, id: ObjectId, sql: &str, types: &[Type], statement: Statement) {
        let mut map = self.by_connection.lock().unwrap_or_else(|e| e.into_inner());
        if !map.contains_key(&id) && map.len() >= KEEP {
            // Ids grow with each new connection: the smallest are the oldest,
            // most likely closed long ago. One still open only misses here.
            let mut ids: Vec<ObjectId> = map.keys().copied().collect();
            ids.sort_unstable();
            for old in &ids[..KEEP / 2] {
                map.remove(old);
            }
        }
        let entries = map.entry(id).or_default();
        if !entries.iter().any(|e| *e.sql == *sql && e.types == types) {
            entries.push(Entry {
                at: sql.as_ptr() as usize,
                sql: sql.into(),
                types: types.to_vec(),
                statement,
            });
        }
    }
}
