//! The outbox for Django (`django_icache.outbox`, `django_icache.relay`):
//! the SQL of [`icache::db`] as text (Django runs it through its own
//! connection, in its own transaction) and the PostgreSQL relay.
//!
//! SQLite's relay is not here on purpose: icache's SQLite driver links its
//! own copy of SQLite, and two copies in one process break SQLite's POSIX
//! locks (closing a file in one copy drops the other's locks), while Django
//! opens and closes its `sqlite3` connections all the time. The Python side
//! runs the same loop through Python's `sqlite3` instead.

use std::sync::Mutex;
use std::time::Duration;

use icache::db::{DbError, DbErrorKind, Dialect, Relay as CoreRelay};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::pages::Purger;
use crate::{Cache, detached};

fn dialect(name: &str) -> PyResult<Dialect> {
    match name {
        "postgres" | "postgresql" => Ok(Dialect::Postgres),
        "sqlite" => Ok(Dialect::Sqlite),
        other => Err(PyValueError::new_err(format!(
            "unknown SQL dialect {other:?} (expected \"postgres\" or \"sqlite\")"
        ))),
    }
}

/// Usage and schema errors are the caller's (`ValueError`); the rest
/// `RuntimeError`, message as the core wrote it (never a password).
fn db_err(e: DbError) -> PyErr {
    match e.kind() {
        DbErrorKind::Usage | DbErrorKind::Schema => PyValueError::new_err(e.to_string()),
        _ => PyRuntimeError::new_err(e.to_string()),
    }
}

/// The statements that create the outbox (idempotent), one each.
#[pyfunction]
fn outbox_install_sql(dialect_name: &str) -> PyResult<Vec<String>> {
    Ok(icache::db::install_sql(dialect(dialect_name)?))
}

/// The statements that make every change of `table` bump the tokens the
/// SQL `token_exprs` compute from its rows (`columns`: the table's columns,
/// needed on SQLite).
#[pyfunction]
fn outbox_watch_sql(
    dialect_name: &str,
    table: &str,
    columns: Vec<String>,
    token_exprs: Vec<String>,
) -> PyResult<Vec<String>> {
    let columns: Vec<&str> = columns.iter().map(String::as_str).collect();
    let exprs: Vec<&str> = token_exprs.iter().map(String::as_str).collect();
    icache::db::watch_sql(dialect(dialect_name)?, table, &columns, &exprs).map_err(db_err)
}

/// The statements that drop `table`'s triggers.
#[pyfunction]
fn outbox_unwatch_sql(dialect_name: &str, table: &str) -> PyResult<Vec<String>> {
    icache::db::unwatch_sql(dialect(dialect_name)?, table).map_err(db_err)
}

/// icache's relay from a PostgreSQL outbox to a cache, in background
/// threads of this process: `Relay(db_url, cache, poll_ms, batch)`.
#[pyclass(frozen, module = "django_icache._core")]
struct Relay {
    inner: Mutex<Option<CoreRelay>>,
    /// The process that started the threads: a forked child has none of
    /// them, so it must neither stop nor join them.
    pid: u32,
}

impl Relay {
    fn with<T>(&self, f: impl FnOnce(&CoreRelay) -> T) -> Option<T> {
        if self.pid != std::process::id() {
            return None;
        }
        let guard = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        guard.as_ref().map(f)
    }
}

#[pymethods]
impl Relay {
    /// Starts the relay (a database that is down is retried, not an error;
    /// a malformed URL is a `ValueError` naming the bad part).
    #[new]
    /// `purger`: purges the pages of every batch's tokens after its bump
    /// (a failed purge keeps the rows, so purges are at least once).
    #[pyo3(signature = (db_url, cache, poll_ms = 1000, batch = 1000, purger = None))]
    fn new(
        py: Python<'_>,
        db_url: &str,
        cache: &Bound<'_, Cache>,
        poll_ms: u64,
        batch: usize,
        purger: Option<&Bound<'_, Purger>>,
    ) -> PyResult<Self> {
        let handle = cache.get().inner.clone();
        let purger = purger.map(|p| p.get().inner.clone());
        let relay = detached(py, || {
            CoreRelay::builder(db_url, handle).and_then(|b| {
                let b = b
                    .poll_interval(Duration::from_millis(poll_ms))
                    .batch_size(batch);
                match purger {
                    Some(p) => b.after_bump(p.relay_hook()),
                    None => b,
                }
                .spawn()
            })
        })
        .map_err(db_err)?;
        Ok(Relay {
            inner: Mutex::new(Some(relay)),
            pid: std::process::id(),
        })
    }

    /// Wakes the relay now.
    fn wake(&self) {
        self.with(CoreRelay::wake);
    }

    /// Waits (without the GIL) until every outbox row committed before the
    /// call is applied, at most `timeout` seconds: `True` when applied,
    /// `False` on time-out (the rows stay and are applied later) or when
    /// the relay is stopped.
    fn flush(&self, py: Python<'_>, timeout: f64) -> bool {
        // Bounded: a deadline past `Instant`'s range would overflow (an
        // infinite time-out is a day here).
        let secs = if timeout.is_nan() {
            0.0
        } else {
            timeout.clamp(0.0, 86_400.0)
        };
        let timeout = Duration::from_secs_f64(secs);
        detached(py, || self.with(|r| r.flush(timeout).is_ok())).unwrap_or(false)
    }

    /// What the relay did so far: batches, rows, bumps, errors, pending,
    /// last_error.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        if let Some(s) = self.with(CoreRelay::stats) {
            d.set_item("batches", s.batches)?;
            d.set_item("rows", s.rows)?;
            d.set_item("bumps", s.bumps)?;
            d.set_item("errors", s.errors)?;
            d.set_item("pending", s.pending)?;
            d.set_item("last_error", s.last_error)?;
        }
        Ok(d)
    }

    /// Finishes the batch in hand and joins the threads (without the GIL).
    fn stop(&self, py: Python<'_>) {
        if self.pid != std::process::id() {
            return;
        }
        let relay = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(relay) = relay {
            detached(py, || relay.stop());
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.pid != std::process::id() {
            // Dropping would join threads that do not exist in this
            // (forked) process.
            if let Some(relay) = self
                .inner
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take()
            {
                std::mem::forget(relay);
            }
        }
    }
}

/// Adds this module's functions and classes to `_core`.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(outbox_install_sql, m)?)?;
    m.add_function(wrap_pyfunction!(outbox_watch_sql, m)?)?;
    m.add_function(wrap_pyfunction!(outbox_unwatch_sql, m)?)?;
    m.add_class::<Relay>()?;
    Ok(())
}
