//! PostgreSQL: admin connection, the relay's outbox, its LISTEN thread.

use std::sync::Arc;
use std::time::{Duration, Instant};

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, Config, NoTls, Statement};

use super::DbError;
use super::admin::Admin;
use super::relay::{Backoff, BatchError, Outbox, Row, Shared, Waker};
use super::sql::{CHANNEL, Table};
use super::url::DbUrl;

/// The database's own message when it has one (`column "x" does not
/// exist`), else the client's (`error connecting to server: …`).
fn message(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.hint() {
            Some(hint) => format!("{} (hint: {hint})", db.message()),
            None => db.message().to_owned(),
        },
        None => e.to_string(),
    }
}

fn db_error(url: &DbUrl, e: &postgres::Error) -> DbError {
    DbError::database(format!("{url}: {}", message(e)))
}

pub(crate) struct PgAdmin {
    client: Client,
    url: DbUrl,
}

pub(crate) fn connect(config: &Config, url: &DbUrl) -> Result<PgAdmin, DbError> {
    let client = config.connect(NoTls).map_err(|e| db_error(url, &e))?;
    Ok(PgAdmin {
        client,
        url: url.clone(),
    })
}

fn installed(client: &mut Client, url: &DbUrl) -> Result<bool, DbError> {
    let row = client
        .query_one("SELECT to_regclass('icache_outbox') IS NOT NULL", &[])
        .map_err(|e| db_error(url, &e))?;
    row.try_get(0).map_err(|e| db_error(url, &e))
}

impl Admin for PgAdmin {
    fn execute_all(&mut self, statements: &[String]) -> Result<(), DbError> {
        let url = &self.url;
        let mut tx = self.client.transaction().map_err(|e| db_error(url, &e))?;
        for statement in statements {
            tx.batch_execute(statement).map_err(|e| db_error(url, &e))?;
        }
        tx.commit().map_err(|e| db_error(url, &e))
    }

    fn outbox_installed(&mut self) -> Result<bool, DbError> {
        installed(&mut self.client, &self.url)
    }

    fn columns(&mut self, table: &Table) -> Result<Option<Vec<String>>, DbError> {
        let url = &self.url;
        let row = self
            .client
            .query_opt(
                "SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)",
                &[&table.quoted()],
            )
            .map_err(|e| db_error(url, &e))?;
        let Some(row) = row else { return Ok(None) };
        let kind: String = row.try_get(0).map_err(|e| db_error(url, &e))?;
        if kind != "r" && kind != "p" {
            return Err(DbError::new(
                super::DbErrorKind::Schema,
                format!(
                    "{} is not a table (relkind {kind}): triggers can watch tables only",
                    table.display()
                ),
            ));
        }
        let rows = self
            .client
            .query(
                "SELECT attname::text FROM pg_attribute WHERE attrelid = to_regclass($1) \
                 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&table.quoted()],
            )
            .map_err(|e| db_error(url, &e))?;
        rows.iter()
            .map(|r| r.try_get(0).map_err(|e| db_error(url, &e)))
            .collect::<Result<Vec<String>, _>>()
            .map(Some)
    }

    fn probe(&mut self, sql: &str) -> Result<(), String> {
        self.client.prepare(sql).map(drop).map_err(|e| message(&e))
    }

    fn first_row(&mut self, sql: &str, n: usize) -> Result<Option<Vec<Option<String>>>, DbError> {
        let url = &self.url;
        let row = self
            .client
            .query_opt(sql, &[])
            .map_err(|e| db_error(url, &e))?;
        row.map(|row| {
            (0..n)
                .map(|i| {
                    row.try_get::<_, Option<String>>(i)
                        .map_err(|e| db_error(url, &e))
                })
                .collect()
        })
        .transpose()
    }

    fn pending(&mut self) -> Result<(u64, Option<Duration>), DbError> {
        pending(&mut self.client, &self.url)
    }

    fn watched(&mut self) -> Result<Vec<(String, String)>, DbError> {
        let url = &self.url;
        let rows = self
            .client
            .query(
                "SELECT table_name, expression FROM icache_watch ORDER BY table_name, position",
                &[],
            )
            .map_err(|e| db_error(url, &e))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get(0).map_err(|e| db_error(url, &e))?,
                    r.try_get(1).map_err(|e| db_error(url, &e))?,
                ))
            })
            .collect()
    }
}

fn pending(client: &mut Client, url: &DbUrl) -> Result<(u64, Option<Duration>), DbError> {
    let row = client
        .query_one(
            "SELECT count(*)::int8, extract(epoch FROM clock_timestamp() - min(created_at))::float8 \
             FROM icache_outbox",
            &[],
        )
        .map_err(|e| db_error(url, &e))?;
    let count: i64 = row.try_get(0).map_err(|e| db_error(url, &e))?;
    let oldest: Option<f64> = row.try_get(1).map_err(|e| db_error(url, &e))?;
    Ok((
        u64::try_from(count).unwrap_or(0),
        oldest.map(|s| Duration::from_secs_f64(s.max(0.0))),
    ))
}

/// The relay's connection: statements prepared once.
pub(crate) struct PgOutbox {
    client: Client,
    url: DbUrl,
    claim: Statement,
    max_seq: Statement,
    any_up_to: Statement,
}

impl PgOutbox {
    pub(crate) fn open(config: &Config, url: &DbUrl) -> Result<PgOutbox, DbError> {
        let mut client = config.connect(NoTls).map_err(|e| db_error(url, &e))?;
        if !installed(&mut client, url)? {
            return Err(DbError::not_installed(&url.to_string()));
        }
        let mut prepare = |sql: &str| client.prepare(sql).map_err(|e| db_error(url, &e));
        // SKIP LOCKED: relays take disjoint rows; the rows of a relay killed
        // mid-batch are unlocked (and kept) when its transaction dies.
        let claim = prepare(
            "DELETE FROM icache_outbox WHERE seq IN \
             (SELECT seq FROM icache_outbox ORDER BY seq FOR UPDATE SKIP LOCKED LIMIT $1) \
             RETURNING token, extract(epoch FROM clock_timestamp() - created_at)::float8",
        )?;
        let max_seq = prepare("SELECT coalesce(max(seq), 0)::int8 FROM icache_outbox")?;
        let any_up_to = prepare("SELECT EXISTS (SELECT 1 FROM icache_outbox WHERE seq <= $1)")?;
        Ok(PgOutbox {
            client,
            url: url.clone(),
            claim,
            max_seq,
            any_up_to,
        })
    }
}

impl Outbox for PgOutbox {
    fn claim(
        &mut self,
        limit: usize,
        apply: &mut dyn FnMut(&[Row]) -> Result<(), String>,
    ) -> Result<usize, BatchError> {
        let url = &self.url;
        let mut tx = self.client.transaction().map_err(|e| db_error(url, &e))?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let found = tx
            .query(&self.claim, &[&limit])
            .map_err(|e| db_error(url, &e))?;
        if found.is_empty() {
            return Ok(0);
        }
        let rows = found
            .iter()
            .map(|r| {
                Ok(Row {
                    token: r.try_get(0).map_err(|e| db_error(url, &e))?,
                    age: r
                        .try_get::<_, Option<f64>>(1)
                        .map_err(|e| db_error(url, &e))?
                        .unwrap_or(0.0),
                })
            })
            .collect::<Result<Vec<Row>, DbError>>()?;
        // Dropping `tx` on failure rolls back: the rows are there again.
        apply(&rows).map_err(BatchError::Apply)?;
        tx.commit().map_err(|e| db_error(url, &e))?;
        Ok(rows.len())
    }

    fn max_seq(&mut self) -> Result<i64, DbError> {
        let row = self
            .client
            .query_one(&self.max_seq, &[])
            .map_err(|e| db_error(&self.url, &e))?;
        row.try_get(0).map_err(|e| db_error(&self.url, &e))
    }

    fn any_up_to(&mut self, seq: i64) -> Result<bool, DbError> {
        let row = self
            .client
            .query_one(&self.any_up_to, &[&seq])
            .map_err(|e| db_error(&self.url, &e))?;
        row.try_get(0).map_err(|e| db_error(&self.url, &e))
    }

    fn pending(&mut self) -> Result<(u64, Option<Duration>), DbError> {
        pending(&mut self.client, &self.url)
    }
}

/// LISTEN on a connection of its own; every notification and every
/// (re)connect wakes the worker (which then drains everything).
pub(crate) struct Listener {
    config: Config,
    url: DbUrl,
    shared: Arc<Shared>,
    wake: Waker,
}

/// How long one wait for a notification lasts (the stop check's period).
const LISTEN_SLICE: Duration = Duration::from_millis(250);
/// An idle listener checks its connection this often.
const KEEPALIVE: Duration = Duration::from_secs(10);

impl Listener {
    pub(crate) fn new(config: Config, url: DbUrl, shared: Arc<Shared>, wake: Waker) -> Listener {
        Listener {
            config,
            url,
            shared,
            wake,
        }
    }

    pub(crate) fn run(self) {
        let mut backoff = Backoff::new();
        while !self.shared.stopped() {
            match self.listen() {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    tracing::debug!(db = %self.url, error = %e, "icache relay: LISTEN connection lost; reconnecting");
                    let deadline = Instant::now() + backoff.next();
                    while Instant::now() < deadline && !self.shared.stopped() {
                        std::thread::sleep(
                            Duration::from_millis(20).min(deadline - Instant::now()),
                        );
                    }
                }
            }
        }
    }

    /// One connection's life: `Ok` when stopped, `Err` when it broke.
    fn listen(&self) -> Result<(), DbError> {
        let mut client = self
            .config
            .connect(NoTls)
            .map_err(|e| db_error(&self.url, &e))?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .map_err(|e| db_error(&self.url, &e))?;
        // Notifications sent while we were not listening are lost: the
        // worker drains the table now.
        let _ = self.wake.send(());
        let mut last_check = Instant::now();
        while !self.shared.stopped() {
            let next = client.notifications().timeout_iter(LISTEN_SLICE).next();
            match next {
                Ok(Some(_)) => {
                    let _ = self.wake.send(());
                }
                Ok(None) => {
                    // Also what a closed connection looks like.
                    if client.is_closed() {
                        return Err(DbError::database(format!(
                            "{}: connection closed",
                            self.url
                        )));
                    }
                    if last_check.elapsed() >= KEEPALIVE {
                        last_check = Instant::now();
                        client
                            .simple_query("SELECT 1")
                            .map_err(|e| db_error(&self.url, &e))?;
                    }
                }
                Err(e) => return Err(db_error(&self.url, &e)),
            }
        }
        Ok(())
    }
}
