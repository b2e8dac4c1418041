//! install / watch / unwatch / status, over one connection of either dialect.

use std::fmt;
use std::time::Duration;

use super::sql::{self, Table};
use super::url::Target;
use super::{DbError, DbErrorKind, DbUrl, Dialect};

/// One connection, as the admin commands use it.
pub(crate) trait Admin {
    /// Runs `statements` in one transaction.
    fn execute_all(&mut self, statements: &[String]) -> Result<(), DbError>;
    /// Whether `icache_outbox` exists.
    fn outbox_installed(&mut self) -> Result<bool, DbError>;
    /// The table's columns, `None` if there is no such table.
    fn columns(&mut self, table: &Table) -> Result<Option<Vec<String>>, DbError>;
    /// Prepares `sql` without running it: the database's message on failure.
    fn probe(&mut self, sql: &str) -> Result<(), String>;
    /// The first row of `sql`, its `n` columns as text.
    fn first_row(&mut self, sql: &str, n: usize) -> Result<Option<Vec<Option<String>>>, DbError>;
    /// Rows waiting, and the age of the oldest.
    fn pending(&mut self) -> Result<(u64, Option<Duration>), DbError>;
    /// `(table, expression)` rows of `icache_watch`, in order.
    fn watched(&mut self) -> Result<Vec<(String, String)>, DbError>;
}

fn open(url: &DbUrl) -> Result<Box<dyn Admin>, DbError> {
    match url.target() {
        #[cfg(feature = "postgres")]
        Target::Postgres(config) => Ok(Box::new(super::pg::connect(config, url)?)),
        #[cfg(feature = "sqlite")]
        Target::Sqlite(path) => Ok(Box::new(super::sqlite::connect(path, url)?)),
        #[allow(unreachable_patterns)]
        _ => Err(DbError::usage(format!(
            "{url}: no driver for {} in this build",
            url.dialect()
        ))),
    }
}

fn open_installed(db_url: &str) -> Result<(DbUrl, Box<dyn Admin>), DbError> {
    let url = DbUrl::parse(db_url)?;
    let mut conn = open(&url)?;
    if !conn.outbox_installed()? {
        return Err(DbError::not_installed(&url.to_string()));
    }
    Ok((url, conn))
}

/// Creates the outbox in the database at `db_url` (and `icache_bump` on
/// PostgreSQL): the statements of [`install_sql`](super::install_sql), in
/// one transaction. Idempotent.
///
/// ```no_run
/// icache::db::install("sqlite:///var/lib/app/app.db")?;
/// # Ok::<(), icache::db::DbError>(())
/// ```
pub fn install(db_url: &str) -> Result<(), DbError> {
    let url = DbUrl::parse(db_url)?;
    let mut conn = open(&url)?;
    conn.execute_all(&sql::install_sql(url.dialect()))
}

/// What [`watch`] set up; its `Display` says what each change will bump.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Watch {
    /// The database's dialect.
    pub dialect: Dialect,
    /// The table, as given.
    pub table: String,
    /// The token expressions, in order.
    pub expressions: Vec<String>,
    /// The tokens of one row of the table now (`None` for an expression
    /// that is NULL there: it bumps nothing), if the table has a row.
    pub example: Option<Vec<Option<String>>>,
}

impl fmt::Display for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "watching {} ({})", self.table, self.dialect)?;
        writeln!(f, "  INSERT   bumps the new row's tokens")?;
        writeln!(f, "  UPDATE   bumps the old row's and the new row's tokens")?;
        writeln!(f, "  DELETE   bumps the old row's tokens")?;
        if self.dialect == Dialect::Postgres {
            writeln!(f, "  TRUNCATE bumps the tokens of every row")?;
        }
        writeln!(f, "a row's tokens:")?;
        for e in &self.expressions {
            writeln!(f, "  {e}")?;
        }
        match &self.example {
            Some(tokens) => {
                let shown: Vec<&str> = tokens
                    .iter()
                    .map(|t| t.as_deref().unwrap_or("(NULL: nothing)"))
                    .collect();
                write!(
                    f,
                    "e.g. a change of one row now bumps: {}",
                    shown.join(", ")
                )
            }
            None => write!(f, "(the table is empty: no example row)"),
        }
    }
}

/// Makes every change of `table` bump the tokens `token_exprs` compute from
/// its rows (see [`watch_sql`](super::watch_sql)), replacing the table's
/// earlier triggers. Each expression is checked against the table first: a
/// missing table or column is a [`Schema`](DbErrorKind::Schema) error naming
/// it, and nothing is changed.
///
/// ```no_run
/// let watch = icache::db::watch("sqlite:///var/lib/app/app.db", "ratings", &["'movies'", "user_id"])?;
/// println!("{watch}");
/// # Ok::<(), icache::db::DbError>(())
/// ```
pub fn watch(db_url: &str, table: &str, token_exprs: &[&str]) -> Result<Watch, DbError> {
    let (url, mut conn) = open_installed(db_url)?;
    let dialect = url.dialect();
    let parsed = Table::parse(dialect, table)?;
    let exprs = sql::check_exprs(token_exprs)?;
    let Some(columns) = conn.columns(&parsed)? else {
        return Err(DbError::new(
            DbErrorKind::Schema,
            format!("table {} does not exist in {url}", parsed.display()),
        ));
    };
    for (i, e) in exprs.iter().enumerate() {
        if let Err(why) = conn.probe(&sql::probe_sql(dialect, &parsed, e)) {
            return Err(DbError::new(
                DbErrorKind::Schema,
                format!(
                    "token expression {} ({e}) does not work on table {}: {why}",
                    i + 1,
                    parsed.display()
                ),
            ));
        }
    }
    let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
    let refs: Vec<&str> = exprs.iter().map(String::as_str).collect();
    conn.execute_all(&sql::watch_sql(dialect, table, &columns, &refs)?)?;
    let example = conn.first_row(&sql::example_sql(dialect, &parsed, &exprs), exprs.len())?;
    Ok(Watch {
        dialect,
        table: parsed.display(),
        expressions: exprs,
        example,
    })
}

/// Drops the triggers [`watch`] made on `table`. `true` if it was watched.
///
/// ```no_run
/// assert!(icache::db::unwatch("sqlite:///var/lib/app/app.db", "ratings")?);
/// # Ok::<(), icache::db::DbError>(())
/// ```
pub fn unwatch(db_url: &str, table: &str) -> Result<bool, DbError> {
    let (url, mut conn) = open_installed(db_url)?;
    let parsed = Table::parse(url.dialect(), table)?;
    let name = parsed.display();
    let was = conn.watched()?.iter().any(|(t, _)| *t == name);
    conn.execute_all(&sql::unwatch_sql(url.dialect(), table)?)?;
    Ok(was)
}

/// A watched table and its token expressions.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Watched {
    /// The table, as given to [`watch`].
    pub table: String,
    /// Its token expressions, in order.
    pub expressions: Vec<String>,
}

/// What [`status`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Status {
    /// Rows waiting for a relay.
    pub pending: u64,
    /// How long the oldest has waited.
    pub oldest: Option<Duration>,
    /// The watched tables.
    pub watched: Vec<Watched>,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pending {}", self.pending)?;
        match self.oldest {
            Some(age) => writeln!(f, "oldest {:.3}s", age.as_secs_f64())?,
            None => writeln!(f, "oldest -")?,
        }
        if self.watched.is_empty() {
            write!(f, "watched (none)")?;
        }
        for (i, w) in self.watched.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "watched {}: {}", w.table, w.expressions.join(" | "))?;
        }
        Ok(())
    }
}

/// Rows waiting in the outbox, the age of the oldest, the watched tables.
///
/// ```no_run
/// let status = icache::db::status("sqlite:///var/lib/app/app.db")?;
/// assert_eq!(status.pending, 0);
/// # Ok::<(), icache::db::DbError>(())
/// ```
pub fn status(db_url: &str) -> Result<Status, DbError> {
    let (_url, mut conn) = open_installed(db_url)?;
    let (pending, oldest) = conn.pending()?;
    let mut watched: Vec<Watched> = Vec::new();
    for (table, expression) in conn.watched()? {
        match watched.last_mut() {
            Some(w) if w.table == table => w.expressions.push(expression),
            _ => watched.push(Watched {
                table,
                expressions: vec![expression],
            }),
        }
    }
    Ok(Status {
        pending,
        oldest,
        watched,
    })
}
