//! [`TableName`]: a validated, optionally schema-qualified table name for SQL backends.

use std::fmt;

use crate::error::{Error, Result};

/// The name of the table that holds the locks, validated so that it can be quoted
/// into SQL safely.
///
/// Each part matches `[A-Za-z_][A-Za-z0-9_]*` and is at most 63 bytes; an optional
/// qualifier (`schema.table` on PostgreSQL, `database.table` on MySQL) is allowed.
/// Backends always quote both parts, so mixed case is kept as written.
///
/// ```
/// use distrlock_core::TableName;
///
/// let t = TableName::new("locks.Distributed_Locks").unwrap();
/// assert_eq!(t.schema(), Some("locks"));
/// assert_eq!(t.name(), "Distributed_Locks");
/// assert_eq!(t.quoted('"'), "\"locks\".\"Distributed_Locks\"");
/// assert!(TableName::new("x\"; DROP TABLE y; --").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// The default table name, as in the Go original.
    pub const DEFAULT: &'static str = "distributed_locks";
    /// The longest part of a name, in bytes (PostgreSQL's identifier limit).
    pub const MAX_PART_LEN: usize = 63;

    /// Parses `table` or `schema.table`; returns [`Error::InvalidTableName`] otherwise.
    pub fn new(qualified: &str) -> Result<Self> {
        let mut parts = qualified.split('.');
        let first = parts.next().unwrap_or_default();
        let second = parts.next();
        if parts.next().is_some() {
            return Err(invalid(qualified, "at most one '.' is allowed"));
        }
        let (schema, name) = match second {
            Some(name) => (Some(first), name),
            None => (None, first),
        };
        if let Some(schema) = schema {
            check_part(qualified, schema)?;
        }
        check_part(qualified, name)?;
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The qualifier (schema or database), if one was given.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table's own name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Both parts, each wrapped in `quote`, joined by `.`.
    ///
    /// Safe because validation admits only letters, digits and underscores.
    pub fn quoted(&self, quote: char) -> String {
        match &self.schema {
            Some(schema) => format!("{quote}{schema}{quote}.{quote}{}{quote}", self.name),
            None => format!("{quote}{}{quote}", self.name),
        }
    }
}

impl Default for TableName {
    fn default() -> Self {
        Self {
            schema: None,
            name: Self::DEFAULT.to_owned(),
        }
    }
}

impl fmt::Debug for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TableName({self})")
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl std::str::FromStr for TableName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

fn check_part(whole: &str, part: &str) -> Result<()> {
    if part.is_empty() {
        return Err(invalid(whole, "a name part must not be empty"));
    }
    if part.len() > TableName::MAX_PART_LEN {
        return Err(invalid(whole, "a name part is at most 63 bytes"));
    }
    let mut chars = part.chars();
    let starts_well = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !starts_well || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(invalid(
            whole,
            "use only letters, digits and '_', not starting with a digit",
        ));
    }
    Ok(())
}

fn invalid(whole: &str, reason: &str) -> Error {
    Error::InvalidTableName {
        name: whole.chars().take(80).collect(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_injection_and_odd_shapes() {
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "1abc",
            "a-b",
            "a b",
            "x\"; DROP TABLE y; --",
            "x`; DROP TABLE y; --",
            "ünïcode",
        ] {
            assert!(
                matches!(TableName::new(bad), Err(Error::InvalidTableName { .. })),
                "{bad:?} should be refused"
            );
        }
        assert!(TableName::new(&"a".repeat(64)).is_err());
        assert!(TableName::new(&"a".repeat(63)).is_ok());
    }

    #[test]
    fn keeps_case_and_qualifier() {
        let t = TableName::new("MyLocks").unwrap();
        assert_eq!(t.schema(), None);
        assert_eq!(t.quoted('`'), "`MyLocks`");
        assert_eq!(TableName::default().to_string(), "distributed_locks");
    }
}
