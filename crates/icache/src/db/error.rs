//! The error of `icache::db`.

use std::fmt;

/// What kind of failure a [`DbError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DbErrorKind {
    /// A bad argument: the database URL (the message names the bad part), a
    /// table name, an empty token expression, a database that is neither
    /// PostgreSQL nor SQLite.
    Usage,
    /// The outbox is not installed in that database (`icache db install`).
    NotInstalled,
    /// The table or a column a token expression names does not exist, or an
    /// expression is not valid SQL there.
    Schema,
    /// The database could not be reached or failed a statement.
    Database,
    /// The cache did not take the bumps.
    Cache,
    /// [`Relay::flush`](super::Relay::flush) timed out, or the relay stopped.
    Timeout,
}

impl fmt::Display for DbErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DbErrorKind::Usage => "bad argument",
            DbErrorKind::NotInstalled => "outbox not installed",
            DbErrorKind::Schema => "schema error",
            DbErrorKind::Database => "database error",
            DbErrorKind::Cache => "cache error",
            DbErrorKind::Timeout => "timed out",
        })
    }
}

/// The error of every fallible `icache::db` call. Messages name what was
/// wrong; they never contain passwords.
#[derive(Clone)]
pub struct DbError {
    kind: DbErrorKind,
    message: String,
}

impl DbError {
    pub(crate) fn new(kind: DbErrorKind, message: impl Into<String>) -> DbError {
        DbError {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn usage(message: impl Into<String>) -> DbError {
        DbError::new(DbErrorKind::Usage, message)
    }

    pub(crate) fn database(message: impl Into<String>) -> DbError {
        DbError::new(DbErrorKind::Database, message)
    }

    pub(crate) fn not_installed(db: &str) -> DbError {
        DbError::new(
            DbErrorKind::NotInstalled,
            format!(
                "the icache outbox is not installed in {db} (table icache_outbox missing): \
                 run `icache db install --db {db}`"
            ),
        )
    }

    /// The kind of failure.
    ///
    /// ```
    /// use icache::db::{DbErrorKind, DbUrl};
    /// let e = DbUrl::parse("mysql://db/app").err().expect("not supported");
    /// assert_eq!(e.kind(), DbErrorKind::Usage);
    /// ```
    pub fn kind(&self) -> DbErrorKind {
        self.kind
    }

    /// The message alone, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbError({:?}: {})", self.kind, self.message)
    }
}

impl std::error::Error for DbError {}
