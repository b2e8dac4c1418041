//! SQLite: admin connection and the relay's outbox (no NOTIFY: the relay
//! polls, and is woken in process by `Relay::wake` / `flush`).

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, TransactionBehavior};

use super::admin::Admin;
use super::relay::{BatchError, Outbox, Row};
use super::sql::Table;
use super::url::DbUrl;
use super::{DbError, DbErrorKind};

/// How long a statement waits for another connection's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn db_error(url: &DbUrl, e: &rusqlite::Error) -> DbError {
    if let rusqlite::Error::SqliteFailure(f, _) = e
        && f.code == rusqlite::ErrorCode::NotADatabase
    {
        return DbError::usage(format!("{url}: the file is not a SQLite database ({e})"));
    }
    DbError::database(format!("{url}: {e}"))
}

fn open(path: &Path, url: &DbUrl) -> Result<Connection, DbError> {
    // Never create the file: a typo in the path would otherwise get a new,
    // empty database that no application writes to.
    if !path.is_file() {
        return Err(DbError::usage(format!(
            "{url}: no database file at {}",
            path.display()
        )));
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| db_error(url, &e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| db_error(url, &e))?;
    // Reading the schema is the first access: a file that is not a database
    // fails here with a clear message.
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(()))
        .map_err(|e| db_error(url, &e))?;
    Ok(conn)
}

fn installed(conn: &Connection, url: &DbUrl) -> Result<bool, DbError> {
    conn.query_row(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'icache_outbox'",
        [],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
    .map_err(|e| db_error(url, &e))
}

fn pending(conn: &Connection, url: &DbUrl) -> Result<(u64, Option<Duration>), DbError> {
    conn.query_row(
        "SELECT count(*), (julianday('now') - 2440587.5) * 86400.0 - min(created_at) FROM icache_outbox",
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<f64>>(1)?)),
    )
    .map(|(n, age)| {
        (
            u64::try_from(n).unwrap_or(0),
            age.map(|s| Duration::from_secs_f64(s.max(0.0))),
        )
    })
    .map_err(|e| db_error(url, &e))
}

pub(crate) struct SqliteAdmin {
    conn: Connection,
    url: DbUrl,
}

pub(crate) fn connect(path: &Path, url: &DbUrl) -> Result<SqliteAdmin, DbError> {
    Ok(SqliteAdmin {
        conn: open(path, url)?,
        url: url.clone(),
    })
}

impl Admin for SqliteAdmin {
    fn execute_all(&mut self, statements: &[String]) -> Result<(), DbError> {
        let url = &self.url;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| db_error(url, &e))?;
        for statement in statements {
            tx.execute_batch(statement).map_err(|e| db_error(url, &e))?;
        }
        tx.commit().map_err(|e| db_error(url, &e))
    }

    fn outbox_installed(&mut self) -> Result<bool, DbError> {
        installed(&self.conn, &self.url)
    }

    fn columns(&mut self, table: &Table) -> Result<Option<Vec<String>>, DbError> {
        let url = &self.url;
        let kind: Option<String> = self
            .conn
            .query_row(
                "SELECT type FROM sqlite_master WHERE name = ?1 AND type IN ('table', 'view')",
                [&table.name],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| db_error(url, &e))?;
        match kind.as_deref() {
            None => return Ok(None),
            Some("view") => {
                return Err(DbError::new(
                    DbErrorKind::Schema,
                    format!(
                        "{} is a view: triggers can watch tables only",
                        table.display()
                    ),
                ));
            }
            Some(_) => {}
        }
        let mut st = self
            .conn
            .prepare(&format!(
                "SELECT name FROM pragma_table_info({})",
                super::sql::literal(&table.name)
            ))
            .map_err(|e| db_error(url, &e))?;
        let columns = st
            .query_map([], |r| r.get::<_, String>(0))
            .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
            .map_err(|e| db_error(url, &e))?;
        Ok(Some(columns))
    }

    fn probe(&mut self, sql: &str) -> Result<(), String> {
        self.conn.prepare(sql).map(drop).map_err(|e| match e {
            // The message alone: the probe's SQL is ours, not the user's.
            rusqlite::Error::SqlInputError { msg, .. } => msg,
            rusqlite::Error::SqliteFailure(_, Some(msg)) => msg,
            e => e.to_string(),
        })
    }

    fn first_row(&mut self, sql: &str, n: usize) -> Result<Option<Vec<Option<String>>>, DbError> {
        let url = &self.url;
        self.conn
            .query_row(sql, [], |r| {
                (0..n).map(|i| r.get::<_, Option<String>>(i)).collect()
            })
            .optional()
            .map_err(|e| db_error(url, &e))
    }

    fn pending(&mut self) -> Result<(u64, Option<Duration>), DbError> {
        pending(&self.conn, &self.url)
    }

    fn watched(&mut self) -> Result<Vec<(String, String)>, DbError> {
        let url = &self.url;
        let mut st = self
            .conn
            .prepare(
                "SELECT table_name, expression FROM icache_watch ORDER BY table_name, position",
            )
            .map_err(|e| db_error(url, &e))?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|rows| rows.collect())
            .map_err(|e| db_error(url, &e))
    }
}

/// The relay's connection.
pub(crate) struct SqliteOutbox {
    conn: Connection,
    url: DbUrl,
}

impl SqliteOutbox {
    pub(crate) fn open(path: &Path, url: &DbUrl) -> Result<SqliteOutbox, DbError> {
        let conn = open(path, url)?;
        if !installed(&conn, url)? {
            return Err(DbError::not_installed(&url.to_string()));
        }
        Ok(SqliteOutbox {
            conn,
            url: url.clone(),
        })
    }
}

impl Outbox for SqliteOutbox {
    fn claim(
        &mut self,
        limit: usize,
        apply: &mut dyn FnMut(&[Row]) -> Result<(), String>,
    ) -> Result<usize, BatchError> {
        let url = &self.url;
        // Read, bump, then delete: no write lock is held while the cache is
        // asked (a cache that hangs must not stall the application's writes).
        let (rows, last) = {
            let mut st = self
                .conn
                .prepare_cached(
                    "SELECT seq, token, (julianday('now') - 2440587.5) * 86400.0 - created_at \
                     FROM icache_outbox ORDER BY seq LIMIT ?1",
                )
                .map_err(|e| db_error(url, &e))?;
            let mut last = 0i64;
            let rows = st
                .query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<f64>>(2)?,
                    ))
                })
                .and_then(|rows| {
                    rows.map(|row| {
                        row.map(|(seq, token, age)| {
                            last = last.max(seq);
                            Row {
                                token,
                                age: age.unwrap_or(0.0),
                            }
                        })
                    })
                    .collect::<Result<Vec<Row>, _>>()
                })
                .map_err(|e| db_error(url, &e))?;
            (rows, last)
        };
        if rows.is_empty() {
            return Ok(0);
        }
        apply(&rows).map_err(BatchError::Apply)?;
        // seq is AUTOINCREMENT and rows commit in seq order (one writer at a
        // time): every row up to `last` was among those just read.
        self.conn
            .prepare_cached("DELETE FROM icache_outbox WHERE seq <= ?1")
            .and_then(|mut st| st.execute([last]))
            .map_err(|e| db_error(url, &e))?;
        Ok(rows.len())
    }

    fn max_seq(&mut self) -> Result<i64, DbError> {
        self.conn
            .query_row("SELECT coalesce(max(seq), 0) FROM icache_outbox", [], |r| {
                r.get(0)
            })
            .map_err(|e| db_error(&self.url, &e))
    }

    fn any_up_to(&mut self, seq: i64) -> Result<bool, DbError> {
        self.conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM icache_outbox WHERE seq <= ?1)",
                [seq],
                |r| r.get(0),
            )
            .map_err(|e| db_error(&self.url, &e))
    }

    fn pending(&mut self) -> Result<(u64, Option<Duration>), DbError> {
        pending(&self.conn, &self.url)
    }
}
