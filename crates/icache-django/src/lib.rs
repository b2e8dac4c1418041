//! `django_icache._core`: the native half of the Django drop-in.
//!
//! A thin PyO3 layer over [`icache::ICache`]; everything Django (settings,
//! the template tag, pickling) lives in the Python package beside it
//! (`python/django_icache`).
//!
//! **The GIL.** Every call that may wait (network I/O, a single-flight
//! follower waiting for another thread's render) runs with the GIL released
//! (`Python::detach`). A block's body is a Python callable: the Rust engine
//! calls it on the same OS thread, which takes the GIL back only for the
//! render (`Python::attach`). So a thread that waits for another's render
//! never holds the GIL the renderer needs, and blocks rendered inside a body
//! (nested `{% icache %}`, an `{% include %}`) run on the thread the engine
//! tracks for nested dependencies.
//!
//! **Logging.** The core logs through `tracing`, which falls back to the `log`
//! facade. Records are queued here (never written while another thread might
//! hold the GIL and wait for us) and handed to Python's `logging` logger
//! `django_icache` when a call returns to Python. The core already limits its
//! warnings to one every 10 s.

mod db;
mod pages;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use icache::{ErrorKind, ICache, Value};
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

create_exception!(
    _core,
    CacheError,
    PyException,
    "A cache operation failed: `str(e)` names the operation and the cause, `e.kind` is one of \
     \"unavailable\", \"timeout\", \"too_large\", \"backend\" or \"other\"."
);

/// Turns a core error of the operation `op` (`"get_sum"`, `"incr('movies')"`,
/// …) into a Python exception: configuration errors are `ValueError` (the
/// Python side names the setting), the rest `CacheError` whose message starts
/// with the operation and whose `.kind` says what went wrong.
fn to_py(op: &str, e: icache::Error) -> PyErr {
    let kind = match e.kind() {
        ErrorKind::Config => return PyValueError::new_err(format!("{op}: {e}")),
        ErrorKind::Unavailable => "unavailable",
        ErrorKind::Timeout => "timeout",
        ErrorKind::TooLarge => "too_large",
        ErrorKind::Backend => "backend",
        _ => "other",
    };
    cache_error(format!("{op}: {e}"), kind)
}

/// A `CacheError` with this message and `.kind`.
pub(crate) fn cache_error(message: String, kind: &str) -> PyErr {
    let err = CacheError::new_err(message);
    Python::attach(|py| {
        // Setting an attribute on a fresh exception object cannot fail in
        // practice; if it did, the message still says everything.
        let _ = err.value(py).setattr("kind", kind);
    });
    err
}

/// `name(['a', 'b'])` for error messages (at most a few tokens shown).
fn op_tokens(name: &str, tokens: &[String]) -> String {
    let mut shown: Vec<String> = tokens.iter().take(3).map(|t| format!("{t:?}")).collect();
    if tokens.len() > 3 {
        shown.push(format!("… {} more", tokens.len() - 3));
    }
    format!("{name}([{}])", shown.join(", "))
}

// ---- logging bridge ----------------------------------------------------------

/// At most this many records wait for Python (the core rate-limits its
/// warnings, so this bound is only a guard).
const LOG_QUEUE: usize = 256;

struct Bridge {
    queue: Mutex<VecDeque<(log::Level, String)>>,
    pending: AtomicBool,
}

static BRIDGE: Bridge = Bridge {
    queue: Mutex::new(VecDeque::new()),
    pending: AtomicBool::new(false),
};

struct BridgeLogger;

impl log::Log for BridgeLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info && metadata.target().starts_with("icache")
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut queue = BRIDGE
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if queue.len() < LOG_QUEUE {
            queue.push_back((record.level(), record.args().to_string()));
            BRIDGE.pending.store(true, Ordering::Release);
        }
    }

    fn flush(&self) {}
}

static LOGGER: BridgeLogger = BridgeLogger;

/// Hands the queued records to `logging.getLogger("django_icache")`.
fn flush_logs(py: Python<'_>) {
    if !BRIDGE.pending.load(Ordering::Acquire) {
        return;
    }
    let records: Vec<(log::Level, String)> = {
        let mut queue = BRIDGE
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        BRIDGE.pending.store(false, Ordering::Release);
        queue.drain(..).collect()
    };
    let Ok(logger) = py
        .import("logging")
        .and_then(|m| m.call_method1("getLogger", ("django_icache",)))
    else {
        return;
    };
    for (level, message) in records {
        let level = match level {
            log::Level::Error => 40,
            log::Level::Warn => 30,
            log::Level::Info => 20,
            log::Level::Debug => 10,
            log::Level::Trace => 5,
        };
        // A failing handler must not turn a cache call into an error.
        if let Err(e) = logger.call_method1("log", (level, message)) {
            e.print(py);
        }
    }
}

/// Runs `f` without the GIL, then forwards what the core logged meanwhile.
fn detached<T: Send>(py: Python<'_>, f: impl FnOnce() -> T + Send) -> T {
    let out = py.detach(f);
    flush_logs(py);
    out
}

// ---- the handle -----------------------------------------------------------------

/// A handle on one cache, opened from an icache URL (`memory://`,
/// `redis://…`, `memcached://…`, `none://`, …). Cheap to share between threads.
#[pyclass(frozen, module = "django_icache._core")]
struct Cache {
    inner: ICache,
}

/// Tokens as the core wants them.
fn refs(tokens: &[String]) -> Vec<&str> {
    tokens.iter().map(String::as_str).collect()
}

#[pymethods]
impl Cache {
    /// Opens the cache named by `url` (never blocks: network backends
    /// connect on first use). A malformed URL raises `ValueError` naming the
    /// bad part.
    #[new]
    fn new(py: Python<'_>, url: &str) -> PyResult<Self> {
        let inner = detached(py, || ICache::from_url(url)).map_err(|e| to_py("Cache(url)", e))?;
        Ok(Cache { inner })
    }

    /// The URL, password replaced by `***`.
    #[getter]
    fn url(&self) -> &str {
        self.inner.url()
    }

    /// `"memory"`, `"redis"`, `"redis-cluster"`, `"memcached"` or `"none"`.
    #[getter]
    fn backend(&self) -> &'static str {
        self.inner.backend_name()
    }

    /// Bumps a token's generation; returns the new one.
    fn incr(&self, py: Python<'_>, token: &str) -> PyResult<u64> {
        detached(py, || self.inner.incr(token)).map_err(|e| to_py(&format!("incr({token:?})"), e))
    }

    /// Bumps several tokens in one round trip.
    fn incr_many(&self, py: Python<'_>, tokens: Vec<String>) -> PyResult<Vec<u64>> {
        detached(py, || self.inner.incr_many(&refs(&tokens)))
            .map_err(|e| to_py(&op_tokens("incr_many", &tokens), e))
    }

    /// The version of a set of tokens (sum of their generations).
    fn get_sum(&self, py: Python<'_>, tokens: Vec<String>) -> PyResult<u64> {
        detached(py, || self.inner.get_sum(&refs(&tokens)))
            .map_err(|e| to_py(&op_tokens("get_sum", &tokens), e))
    }

    /// Each token's generation.
    fn generations(&self, py: Python<'_>, tokens: Vec<String>) -> PyResult<Vec<u64>> {
        detached(py, || self.inner.generations(&refs(&tokens)))
            .map_err(|e| to_py(&op_tokens("generations", &tokens), e))
    }

    /// Stores `value` (str: as text; bytes: as bytes) with `version`.
    fn set_versioned(
        &self,
        py: Python<'_>,
        key: &str,
        value: &Bound<'_, PyAny>,
        version: u64,
    ) -> PyResult<()> {
        if let Ok(text) = value.cast::<PyString>() {
            let text = text.to_str()?;
            detached(py, || self.inner.set_versioned(key, text, version))
                .map_err(|e| to_py(&format!("set_versioned({key:?})"), e))
        } else if let Ok(bytes) = value.cast::<PyBytes>() {
            let bytes = icache::Bytes::copy_from_slice(bytes.as_bytes());
            detached(py, || self.inner.set_versioned_bytes(key, bytes, version))
                .map_err(|e| to_py(&format!("set_versioned({key:?})"), e))
        } else {
            Err(PyTypeError::new_err(
                "_core.Cache.set_versioned takes str or bytes (django_icache pickles the rest)",
            ))
        }
    }

    /// Stores `pickle` (bytes) with `version`, marked in the entry's header as
    /// a Python pickle: the only entries `get_versioned_value` reports as
    /// `"pickle"`.
    fn set_versioned_pickle(
        &self,
        py: Python<'_>,
        key: &str,
        pickle: &Bound<'_, PyBytes>,
        version: u64,
    ) -> PyResult<()> {
        let bytes = icache::Bytes::copy_from_slice(pickle.as_bytes());
        detached(py, || self.inner.set_versioned_pickle(key, bytes, version))
            .map_err(|e| to_py(&format!("set_versioned({key:?})"), e))
    }

    /// The value stored under `key` with exactly `version` (str or bytes, as
    /// stored; a pickle's bytes), or `None`.
    fn get_versioned<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        version: u64,
    ) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(self
            .get_versioned_value(py, key, version)?
            .map(|(_, value)| value))
    }

    /// `(kind, value)` stored under `key` with exactly `version`, or `None`:
    /// kind `"text"` (a str), `"bytes"` or `"pickle"` (bytes; `"pickle"` only
    /// for what `set_versioned_pickle` stored).
    fn get_versioned_value<'py>(
        &self,
        py: Python<'py>,
        key: &str,
        version: u64,
    ) -> PyResult<Option<(&'static str, Bound<'py, PyAny>)>> {
        let value = detached(py, || self.inner.get_versioned_value(key, version))
            .map_err(|e| to_py(&format!("get_versioned({key:?})"), e))?;
        Ok(match value {
            Some(Value::Text(s)) => Some(("text", PyString::new(py, &s).into_any())),
            Some(Value::Bytes(b)) => Some(("bytes", PyBytes::new(py, &b).into_any())),
            Some(Value::Pickle(b)) => Some(("pickle", PyBytes::new(py, &b).into_any())),
            Some(_) | None => None,
        })
    }

    /// A cached block: `render()` (a Python callable returning str) runs only
    /// on a miss, once per process for concurrent misses, under the GIL;
    /// waiting and I/O happen without it. Blocks rendered inside `render` on
    /// this thread become dependencies of this one. Backend trouble renders
    /// uncached (fail-open); an exception from `render` propagates unchanged
    /// and nothing is stored. `stale`: this block's `stale=render` choice
    /// (`None`: the handle's). `page`: the `Page` of the request being
    /// rendered (`django_icache.middleware`), which learns what the block
    /// read, nested blocks included.
    #[pyo3(signature = (name, tokens, render, stale=None, page=None))]
    fn fragment(
        &self,
        py: Python<'_>,
        name: &str,
        tokens: Vec<String>,
        render: Py<PyAny>,
        stale: Option<bool>,
        page: Option<Py<pages::Page>>,
    ) -> PyResult<String> {
        detached(py, || {
            let block = || {
                let body = || Python::attach(|py| render.bind(py).call0()?.extract::<String>());
                match stale {
                    None => self.inner.fragment(name, &tokens, body),
                    Some(on) => self.inner.fragment_with(
                        name,
                        &tokens,
                        icache::BlockOptions::new().stale_render(on),
                        body,
                    ),
                }
            };
            match page {
                None => block(),
                Some(page) => {
                    let (out, events) = icache::observe(block);
                    page.get().record(events);
                    out
                }
            }
        })
    }

    /// Every block misses once (one epoch bump, `ICache::flush`); returns the
    /// new epoch.
    fn flush(&self, py: Python<'_>) -> PyResult<u64> {
        detached(py, || self.inner.flush()).map_err(|e| to_py("flush", e))
    }

    /// The backend's own counters as `(name, value)` pairs (Redis `INFO`,
    /// memcached `stats`, …), for `manage.py icache stats`.
    fn server_stats(&self, py: Python<'_>) -> PyResult<Vec<(String, String)>> {
        detached(py, || self.inner.server_stats()).map_err(|e| to_py("server_stats", e))
    }

    /// Checks that the backend answers (raises `CacheError` if not).
    fn ping(&self, py: Python<'_>) -> PyResult<()> {
        detached(py, || self.inner.ping()).map_err(|e| to_py("ping", e))
    }

    /// This handle's counters: hits, misses, stores, errors, …
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("hits", s.hits)?;
        d.set_item("misses", s.misses)?;
        d.set_item("mismatches", s.mismatches)?;
        d.set_item("errors", s.errors)?;
        d.set_item("stores", s.stores)?;
        d.set_item("outdated", s.outdated)?;
        d.set_item("too_large", s.too_large)?;
        d.set_item("shared_renders", s.shared_renders)?;
        d.set_item("evictions", s.evictions)?;
        d.set_item("render_seconds", s.render_time.as_secs_f64())?;
        d.set_item("near_hits", s.near_hits)?;
        d.set_item("near_misses", s.near_misses)?;
        d.set_item("body_fetches", s.body_fetches)?;
        d.set_item("tracked_hits", s.tracked_hits)?;
        d.set_item("near_bytes", s.near_bytes)?;
        d.set_item("lease_waits", s.lease_waits)?;
        d.set_item("stale_served", s.stale_served)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        format!("<django_icache._core.Cache {}>", self.inner.url())
    }
}

/// Forwards whatever the core logged to Python now (the tests call it; every
/// method does it on return).
#[pyfunction]
fn flush_log(py: Python<'_>) {
    flush_logs(py);
}

/// The native module.
#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Another logger already set (in this module's own copy of `log`) only
    // means records go there instead.
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    m.add_class::<Cache>()?;
    m.add("CacheError", m.py().get_type::<CacheError>())?;
    m.add_function(wrap_pyfunction!(flush_log, m)?)?;
    db::register(m)?;
    pages::register(m)?;
    Ok(())
}
